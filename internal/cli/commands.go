package cli

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"os/user"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/mitosis-fork/mitosis/image"

	"github.com/spf13/cobra"

	"github.com/mitosis-fork/mitosis/client"
)

// Version is set at build time with
// -ldflags "-X github.com/mitosis-fork/mitosis/internal/cli.Version=...".
var Version = "dev"

// Globals are the flags shared by every verb.
type Globals struct {
	// Socket is the daemon's socket (--socket; empty: the client's default).
	Socket string
}

// Dial connects to the daemon at g.Socket.
func (g *Globals) Dial() (*client.Client, error) { return client.Dial(g.Socket) }

// NewRoot returns the root command named use with the client verbs, and
// the globals its flags fill. The caller adds the server verbs (mitosisd)
// or the shims that run them (mitosis).
func NewRoot(use string) (*cobra.Command, *Globals) {
	g := &Globals{}
	root := &cobra.Command{
		Use:   use,
		Short: "Userspace remote fork of Linux processes",
		Long: `mitosis prepares a running process into a seed (a snapshot plus a frozen
copy-on-write copy) and forks children from it whose memory is paged in on
demand. A node daemon (` + "`mitosis daemon`" + `) does the work; the other verbs talk
to it over its unix socket.`,
		Example: `  mitosis daemon &
  mitosis prepare --pid 1234 --name web
  mitosis fork web
  mitosis fork web --count 10
  mitosis ps`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.Socket, "socket", "",
		"daemon socket path (default $"+client.SocketEnv+", else "+client.DefaultSocket+")")
	root.AddCommand(
		newPrepareCmd(g),
		newRunCmd(g),
		newImageCmd(),
		newForkCmd(g),
		newSeedsCmd(g),
		newPSCmd(g),
		newRmCmd(g),
		newVersionCmd(),
	)
	return root, g
}

func newPrepareCmd(g *Globals) *cobra.Command {
	var pid int
	var name string
	var asJSON bool
	var allow []string
	var ttl time.Duration
	var share []string
	cmd := &cobra.Command{
		Use:   "prepare --pid PID [--name NAME] [--allow NODE,...] [--ttl DURATION] [--share WHO,...]",
		Short: "Prepare a running process into a seed",
		Long: `Snapshot the running process PID, all its threads, into a seed that children can
be forked from. The process keeps running. The seed id is the last word
printed.

Other nodes fork it as NODE/SEED (see ` + "`mitosis fork`" + `). --allow restricts which
peer nodes may fetch it. --ttl removes the seed that long after prepare; if
children (here or on other nodes) still page from it then, removal waits for
them up to 10 s more and then goes ahead (remote children fail).

Local users: a user other than root (on a daemon whose --socket-mode lets it
connect) may prepare only processes it could ptrace itself, and owns the seed.
Only its owner, root and users in --share may fork it; only its owner and root
may remove it. Children run with the prepared process's credentials.`,
		Example: `  mitosis prepare --pid 1234 --name web
  mitosis prepare --pid 1234 --name web --allow b,c --ttl 1h
  mitosis prepare --pid 1234 --name web --share user:alice,group:web
  seed=$(mitosis prepare --pid 1234 | awk '{print $NF}')`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if pid <= 0 {
				return errors.New("prepare: --pid PID is required (a running process)")
			}
			c, err := g.Dial()
			if err != nil {
				return err
			}
			defer c.Close()
			if ttl < 0 {
				return fmt.Errorf("prepare: --ttl must be positive, got %v", ttl)
			}
			s, err := c.PrepareWith(client.PrepareRequest{PID: pid, Name: name, Allow: allow, TTL: ttl, Share: share})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printJSON(out, s)
			}
			label := ""
			if s.Name != "" {
				label = fmt.Sprintf(" %q", s.Name)
			}
			threads := ""
			if s.Threads > 1 {
				threads = fmt.Sprintf(", %d threads", s.Threads)
			}
			fmt.Fprintf(out, "prepared pid %d into seed%s (%d VMAs, %d present pages%s) in %.1fms: %s\n",
				s.ParentPID, label, s.VMAs, s.PresentPages, threads, s.PrepareMS, s.ID)
			return nil
		},
	}
	cmd.Flags().IntVar(&pid, "pid", 0, "process to prepare (required)")
	cmd.Flags().StringVar(&name, "name", "", "seed name, usable instead of the id")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the seed as JSON")
	cmd.Flags().StringSliceVar(&allow, "allow", nil, "peer nodes that may fetch the seed (comma separated; default: every node of the cluster)")
	cmd.Flags().DurationVar(&ttl, "ttl", 0, "remove the seed this long after prepare (e.g. 30m; default: never)")
	cmd.Flags().StringSliceVar(&share, "share", nil, "other local users who may fork the seed: uid:N, gid:N, user:NAME, group:NAME or * (comma separated; default: only you and root)")
	return cmd
}

func newRunCmd(g *Globals) *cobra.Command {
	var req client.RunRequest
	cmd := &cobra.Command{
		Use:   "run --rootfs DIR [--name NAME] [--memory SIZE] [--cpus N] [--pids N] [--env K=V]... -- CMD [ARG...]",
		Short: "Start a process in a container (an image directory, namespaces, limits)",
		Long: `Start CMD inside the image directory DIR: chrooted to it, in new mount, UTS and
IPC namespaces, in a cgroup with the given limits. CMD is a path inside the
image. Its output goes to the daemon's STATE_DIR/children/run-*.log. The pid
is the last word printed: prepare it like any process with ` + "`mitosis prepare --pid`" + `.

Children of a seed prepared from it run in containers of their own from the
same image: new mount, PID, UTS and IPC namespaces (each child is PID 1 and
has its id as hostname), each in its own cgroup with the same limits. A child
that exceeds the memory limit is killed; ` + "`mitosis ps`" + ` shows it as oom-killed.

Without --env the process gets PATH, HOME=/ and OPENBLAS_NUM_THREADS=1 (and the
OMP/MKL equivalents: multi-threaded processes can be prepared, but every
extra thread adds to each child's start; pass --env to keep numpy's pool).`,
		Example: `  mitosis run --rootfs /srv/images/py --memory 256M --cpus 1 -- /usr/bin/python3 /app/fn.py
  pid=$(mitosis run --rootfs /srv/images/py -- /app/server | awk '{print $NF}')`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if req.Rootfs == "" || len(args) == 0 {
				return errors.New("run: --rootfs DIR and a command (after --) are required")
			}
			req.Argv = args
			c, err := g.Dial()
			if err != nil {
				return err
			}
			defer c.Close()
			pid, err := c.Run(req)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "started %s in %s: %d\n", args[0], req.Rootfs, pid)
			return nil
		},
	}
	cmd.Flags().StringVar(&req.Rootfs, "rootfs", "", "image directory (absolute path; required)")
	cmd.Flags().StringVar(&req.Name, "name", "", "a name for the logs")
	cmd.Flags().StringVar(&req.Memory, "memory", "", "memory limit, e.g. 256M or 1G (default: none)")
	cmd.Flags().Float64Var(&req.CPUs, "cpus", 0, "CPU limit in CPUs, e.g. 0.5 (default: none)")
	cmd.Flags().Int64Var(&req.Pids, "pids", 0, "limit on processes (default: none)")
	cmd.Flags().StringArrayVar(&req.Env, "env", nil, "environment KEY=VALUE (repeatable; replaces the default)")
	return cmd
}

func newImageCmd() *cobra.Command {
	img := &cobra.Command{Use: "image", Short: "Prepare function images (root filesystem directories)"}
	var ref string
	unpack := &cobra.Command{
		Use:   "unpack OCI_LAYOUT DIR [--ref NAME]",
		Short: "Unpack an OCI image layout into an image directory for `mitosis run --rootfs`",
		Long: `Apply the layers of an OCI image layout (index.json + blobs/) in order into the
new directory DIR, honouring whiteouts; entries cannot escape DIR. --ref picks
the manifest by its org.opencontainers.image.ref.name (default: the first).
Runs locally, no daemon needed.`,
		Example: `  mitosis image unpack ./py-layout /srv/images/py --ref 3.11
  mitosis run --rootfs /srv/images/py -- /usr/bin/python3 /app/fn.py`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := image.UnpackOCI(args[0], ref, args[1]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "unpacked %s into %s\n", args[0], args[1])
			return nil
		},
	}
	unpack.Flags().StringVar(&ref, "ref", "", "manifest reference name (default: the first manifest)")
	img.AddCommand(unpack)
	return img
}

func newForkCmd(g *Globals) *cobra.Command {
	var count int
	var eager, prefetch, detach, asJSON bool
	var payload, target string
	cmd := &cobra.Command{
		Use:   "fork [--node TARGET] [NODE/]SEED [--count N] [--eager] [--prefetch] [--payload JSON] [--detach]",
		Short: "Fork children from a seed",
		Long: `Fork children from SEED (an id or a name). NODE/SEED names a seed prepared on
another node: this node imports it once and its children page its memory in
from there, each page crossing the network once per node.

--node TARGET creates the children on node TARGET (default: the daemon's own
node); the request is forwarded there. Children on another node run detached
(their stdout/stderr go to that node's STATE_DIR/children/<id>.log) and are
printed as TARGET/c-...; see them with ` + "`mitosis ps`" + ` on TARGET.

On this node with --count 1 (the default) the child is attached: its stdin,
stdout and stderr are this command's own, and mitosis exits with the child's
exit code (128+signal if it was killed). Interrupting mitosis (SIGINT/SIGTERM)
kills the child, like ` + "`docker run`" + `.

With --count N>1 or --detach the children run detached (stdin /dev/null,
stdout/stderr appended to the daemon's STATE_DIR/children/<id>.log) and their
ids are printed one per line; see ` + "`mitosis ps`" + `.

--payload is JSON handed to children of seeds made with the client libraries'
prepare() (prepare-self). --prefetch maps the pages earlier children touched
into each child before it runs.`,
		Example: `  mitosis fork web
  mitosis fork s-1a2b3c4d --eager
  mitosis fork web --count 8
  mitosis fork worker --detach --payload '{"shard": 3}'
  mitosis fork a/web                      # a seed of node a, child here, attached
  mitosis fork --node b a/web --count 4   # children on node b`,
		Args: exactArgs(1, "fork needs exactly one SEED (an id or name, or NODE/SEED; see `mitosis seeds`)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if count < 1 {
				return fmt.Errorf("fork: --count must be at least 1, got %d", count)
			}
			var raw json.RawMessage
			if payload != "" {
				if !json.Valid([]byte(payload)) {
					return fmt.Errorf("fork: --payload is not valid JSON: %s", payload)
				}
				raw = json.RawMessage(payload)
			}
			c, err := g.Dial()
			if err != nil {
				return err
			}
			defer c.Close()
			out := cmd.OutOrStdout()
			req := client.ForkRequest{Seed: args[0], Count: count, Eager: eager, Prefetch: prefetch, Payload: raw}
			if target != "" {
				own, err := c.NodeName()
				if err != nil {
					return err
				}
				if target != own {
					req.Node = target
				}
			}
			if req.Node != "" || count > 1 || detach {
				kids, err := c.Fork(req)
				if asJSON && len(kids) > 0 {
					if jerr := printJSON(out, kids); jerr != nil {
						return jerr
					}
				} else {
					for _, k := range kids {
						if req.Node != "" {
							fmt.Fprintf(out, "%s/%s\n", req.Node, k.ID)
						} else {
							fmt.Fprintln(out, k.ID)
						}
					}
				}
				return err
			}
			sigs := make(chan os.Signal, 1)
			signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
			defer signal.Stop(sigs)
			go func() {
				<-sigs
				// Our connection closes with us; the daemon kills the child.
				os.Exit(130)
			}()
			child, exit, err := c.ForkAttachedWith(req, os.Stdin, os.Stdout, os.Stderr)
			if err != nil {
				return err
			}
			if exit.Error != "" {
				fmt.Fprintf(os.Stderr, "mitosis: child %s failed: %s\n", child.ID, exit.Error)
			}
			if code := exit.ShellCode(); code != 0 {
				return ExitError{Code: code}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&target, "node", "", "create the children on this node (default: the daemon's own)")
	cmd.Flags().IntVarP(&count, "count", "n", 1, "number of children (more than 1 runs them detached)")
	cmd.Flags().BoolVar(&eager, "eager", false, "copy every page before the child runs instead of paging on demand")
	cmd.Flags().BoolVar(&prefetch, "prefetch", false, "map the seed's recorded working set into each child before it runs")
	cmd.Flags().BoolVarP(&detach, "detach", "d", false, "run detached and print the child id")
	cmd.Flags().StringVar(&payload, "payload", "", "JSON delivered to children of prepare-self seeds")
	cmd.Flags().BoolVar(&asJSON, "json", false, "detached: print the children as JSON")
	return cmd
}

func newSeedsCmd(g *Globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "seeds",
		Short: "List seeds",
		Example: `  mitosis seeds
  mitosis seeds --json | jq -r '.[].id'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return list(cmd, g, asJSON, (*client.Client).Seeds,
				"ID\tNAME\tOWNER\tORIGIN\tPARENT\tSOURCE\tTHREADS\tVMAS\tPAGES\tPREPARE\tCHILDREN\tREMOTE\tAGE",
				func(tw io.Writer, s client.SeedInfo) {
					origin, prep := "local", fmt.Sprintf("%.1fms", s.PrepareMS)
					if s.Origin != "" {
						origin, prep = "imported from "+s.Origin, "-"
					}
					remote := fmt.Sprint(s.Leases)
					if len(s.LeaseNodes) > 0 {
						remote += " (" + strings.Join(s.LeaseNodes, ",") + ")"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\t%d\t%s\t%s\n", s.ID, Dash(s.Name), ownerName(s.Owner), origin, pidOrDash(s.ParentPID),
						pidOrDash(s.SourcePID), s.Threads, s.VMAs, s.PresentPages, prep, s.Children, remote, age(s.Created))
				})
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	return cmd
}

// list asks the daemon for a list (get), then prints it as a JSON array
// or as a table: the header, then one row per element.
func list[T any](cmd *cobra.Command, g *Globals, asJSON bool, get func(*client.Client) ([]T, error), header string, row func(io.Writer, T)) error {
	c, err := g.Dial()
	if err != nil {
		return err
	}
	defer c.Close()
	items, err := get(c)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if asJSON {
		return printJSON(out, items)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, it := range items {
		row(tw, it)
	}
	return tw.Flush()
}

func newPSCmd(g *Globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ps",
		Short: "List children (running and exited)",
		Example: `  mitosis ps
  mitosis ps --json | jq '.[] | select(.state == "running") | .pid'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return list(cmd, g, asJSON, (*client.Client).PS,
				"ID\tSEED\tPID\tSTATE\tEXIT\tSTART\tSOURCE\tFAULTS\tFETCHED\tSHARED\tCOPIED\tZERO\tEAGER\tAGE\tERROR",
				func(tw io.Writer, k client.ChildInfo) {
					exit := "-"
					switch k.State {
					case client.StateExited:
						exit = fmt.Sprint(k.ExitCode)
					case client.StateKilled, client.StateFailed:
						exit = "sig " + fmt.Sprint(k.Signal)
					}
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%.1fms\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\n", k.ID, k.Seed, k.PID, k.State, exit,
						k.StartMS, Dash(k.Source), k.Faults, k.PagesFetched, k.PagesShared, k.PagesCopied, k.PagesZero, k.PagesEager,
						age(k.Created), Dash(k.Error))
				})
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	return cmd
}

func newRmCmd(g *Globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "rm ID [--force]",
		Short: "Remove a seed or a child",
		Long: `Remove a seed (by id or name) or a child (by id). A seed with running children,
or a running child, is only removed with --force, which kills them first.
A seed that children on other nodes still page from (leases) is only
removed with --force too; those children then fail with a paging error.`,
		Example: `  mitosis rm s-1a2b3c4d
  mitosis rm --force web
  mitosis rm c-5e6f7a8b`,
		Args: exactArgs(1, "rm needs exactly one ID (a seed id or name, or a child id)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.Dial()
			if err != nil {
				return err
			}
			defer c.Close()
			if err := c.Remove(args[0], force); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed %s\n", args[0])
			return nil
		},
	}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "kill running children first")
	return cmd
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print the version",
		Example: `  mitosis version`,
		Args:    cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintf(cmd.OutOrStdout(), "mitosis %s (%s, %s/%s)\n", Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		},
	}
}

func exactArgs(n int, msg string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) != n {
			return fmt.Errorf("%s; got %d arguments", msg, len(args))
		}
		return nil
	}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func pidOrDash(pid int) string {
	if pid <= 0 {
		return "-"
	}
	return fmt.Sprint(pid)
}

// Dash is s, or "-" when s is blank (a table cell).
func Dash(s string) string {
	if strings.TrimSpace(s) == "" {
		return "-"
	}
	return s
}

func age(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t)
	switch {
	case d < time.Minute:
		return d.Round(time.Second).String()
	case d < time.Hour:
		return d.Round(time.Minute).String()
	default:
		return d.Round(time.Hour).String()
	}
}

// ownerName is a seed owner's user name, else its uid.
func ownerName(uid int) string {
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		return u.Username
	}
	return strconv.Itoa(uid)
}
