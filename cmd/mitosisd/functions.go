package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/container"
	"github.com/mitosis-fork/mitosis/function"
	"github.com/mitosis-fork/mitosis/internal/cli"
	"github.com/mitosis-fork/mitosis/node"
)

// newFnCmd is `mitosis fn`: functions on the local node, without a gateway.
func newFnCmd(g *cli.Globals) *cobra.Command {
	fn := &cobra.Command{
		Use:   "fn",
		Short: "Deploy, list and remove functions on this node (no gateway needed)",
		Long: `Functions on the local daemon's node. A function is a directory with
handler.py: its module-level code is the initialization, handle(req) serves
one request (the OpenFaaS classic python3 template). Across a cluster, use
the gateway (mitosis gateway) instead: it deploys on every node.`,
	}
	var (
		image, policy, memory, timeout, keepAlive string
		env                                       []string
		cpus                                      float64
	)
	deploy := &cobra.Command{
		Use:   "deploy NAME --image DIR",
		Short: "Deploy a function; fork policies run its initialization once and keep it as a seed",
		Example: `  mitosis fn deploy hello --image /srv/fn/hello
  mitosis fn deploy frame --image /srv/fn/frame --policy keep-alive --memory 512M --env ROWS=1000000`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			pol, err := function.ParsePolicy(policy)
			if err != nil {
				return err
			}
			spec := function.Spec{Name: args[0], Image: image, Policy: pol, CPUs: cpus, Env: map[string]string{},
				Generation: time.Now().UnixNano()}
			for _, kv := range env {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					return fmt.Errorf("--env %q: want KEY=VALUE", kv)
				}
				spec.Env[k] = v
			}
			if memory != "" {
				if spec.MemoryBytes, err = container.ParseMemory(memory); err != nil {
					return fmt.Errorf("--memory: %w", err)
				}
			}
			for _, d := range []struct {
				flag string
				v    string
				to   *function.Duration
			}{{"--timeout", timeout, &spec.Timeout}, {"--keep-alive", keepAlive, &spec.KeepAlive}} {
				if d.v != "" {
					t, err := function.ParseDuration(d.v)
					if err != nil {
						return fmt.Errorf("%s: %w", d.flag, err)
					}
					*d.to = function.Duration(t)
				}
			}
			c, err := g.Dial()
			if err != nil {
				return err
			}
			defer c.Close()
			var info node.FunctionInfo
			if err := c.Call(client.OpFnDeploy, node.DeployRequest{Spec: spec, Seed: pol.Seeded()}, &info); err != nil {
				return err
			}
			if info.InitError != "" {
				return fmt.Errorf("function %s deployed, but its initialization failed: %s", info.Name, info.InitError)
			}
			if info.Seed != "" {
				fmt.Printf("%s\t%s\tseed %s (init %.1f ms, prepare %.2f ms)\n", info.Name, info.Policy, info.Seed, info.InitMS, info.PrepareMS)
			} else {
				fmt.Printf("%s\t%s\n", info.Name, info.Policy)
			}
			return nil
		},
	}
	df := deploy.Flags()
	df.StringVar(&image, "image", "", "absolute path of the function directory (with handler.py)")
	df.StringVar(&policy, "policy", "fork", "fork, local-fork (the same on one node), keep-alive or cold")
	df.StringVar(&memory, "memory", "", "memory limit of each instance, e.g. 256M")
	df.Float64Var(&cpus, "cpus", 0, "CPU limit of each instance")
	df.StringArrayVar(&env, "env", nil, "KEY=VALUE in the function's environment (repeatable)")
	df.StringVar(&timeout, "timeout", "", "bound on one invocation (default 30s)")
	df.StringVar(&keepAlive, "keep-alive", "", "idle TTL of warm instances (keep-alive; default 10m)")
	_ = deploy.MarkFlagRequired("image")

	ls := &cobra.Command{
		Use:   "ls",
		Short: "List the functions deployed on this node",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.Dial()
			if err != nil {
				return err
			}
			defer c.Close()
			var st node.NodeStats
			if err := c.Call(client.OpNodeStats, nil, &st); err != nil {
				return err
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tPOLICY\tSEED\tRUNNING\tWARM\tINVOCATIONS\tERRORS\tMEMORY\tINIT ERROR")
			for _, in := range st.Functions {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%.1f MiB\t%s\n", in.Name, in.Policy, cli.Dash(in.Seed), in.Running, in.Warm,
					in.Invocations, in.Errors, float64(in.MemoryBytes)/(1<<20), in.InitError)
			}
			return tw.Flush()
		},
	}
	rm := &cobra.Command{
		Use:   "rm NAME",
		Short: "Remove a function from this node (its seed, warm instances and running invocations)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.Dial()
			if err != nil {
				return err
			}
			defer c.Close()
			return c.Call(client.OpFnRm, node.RemoveRequest{Name: args[0]}, nil)
		},
	}
	fn.AddCommand(deploy, ls, rm)
	return fn
}

// newInvokeCmd is `mitosis invoke`: one invocation on the local node.
func newInvokeCmd(g *cli.Globals) *cobra.Command {
	var data, timeout string
	var verbose bool
	cmd := &cobra.Command{
		Use:   "invoke NAME",
		Short: "Invoke a function deployed on this node (request body from --data or stdin)",
		Example: `  mitosis invoke hello --data world
  echo '{"n": 3}' | mitosis invoke hello`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			body := []byte(data)
			if !cmd.Flags().Changed("data") {
				b, err := io.ReadAll(io.LimitReader(os.Stdin, client.MaxLine))
				if err != nil {
					return fmt.Errorf("read stdin: %w", err)
				}
				body = b
			}
			c, err := g.Dial()
			if err != nil {
				return err
			}
			defer c.Close()
			r, err := c.Invoke(client.InvokeArgs{Function: args[0], Body: body, Timeout: timeout})
			if err != nil {
				return err
			}
			if verbose {
				fmt.Fprintf(os.Stderr, "status %d, %s instance %s, start %.2f ms, run %.2f ms\n", r.Status, r.Kind, r.Instance, r.StartMS, r.RunMS)
			}
			_, _ = os.Stdout.Write(r.Body)
			if r.Status >= 400 {
				return fmt.Errorf("function %s: status %d: %s", args[0], r.Status, r.Error)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&data, "data", "d", "", "the request body (default: read stdin)")
	cmd.Flags().StringVar(&timeout, "timeout", "", "bound on the invocation (default: the function's)")
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "print the status and timings to stderr")
	return cmd
}
