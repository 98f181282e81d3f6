package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/container"
	"github.com/mitosis-fork/mitosis/internal/cli"
	"github.com/mitosis-fork/mitosis/node"
	"github.com/mitosis-fork/mitosis/pager"
)

// daemonFlags are the flags of `mitosis daemon`.
type daemonFlags struct {
	stateDir    string
	node        string
	listen      string
	peers       []string
	peersFile   string
	secretFile  string
	insecure    bool
	tlsCert     string
	tlsKey      string
	tlsCA       string
	metrics     string
	peerTimeout time.Duration
	cgroupPool  int
	hugeCache   bool

	etcd           []string
	etcdPrefix     string
	advertise      string
	maxConcurrency int
	maxMemory      string
	fnLogMax       string
	socketMode     string
	socketGroup    string
	handover       time.Duration
}

// envDefault returns $name, or def when it is unset.
func envDefault(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

func newDaemonCmd(g *cli.Globals) *cobra.Command {
	f := &daemonFlags{}
	cmd := &cobra.Command{
		Use:   "daemon",
		Short: "Run the node daemon (foreground)",
		Long: `Run the node daemon in the foreground. It listens on the unix socket, keeps
seeds and children, and logs one line per prepare, fork, exit and rm to
stderr. Detached children's stdout and stderr go to
STATE_DIR/children/<id>.log.

The socket's mode is --socket-mode (default 0600: only root and the
daemon's own user may connect); 0660 with --socket-group GROUP, or 0666,
let other local users connect, each confined to the processes it could
ptrace itself and to its own and shared seeds (see mitosis prepare --help).
SIGINT kills every running child, removes every seed and the socket, and
exits 0. SIGTERM restarts without loss: the daemon gives up its socket at
once and waits up to --handover-timeout for a new daemon started on the
same --state-dir, which adopts its seeds (same ids); the old one keeps
serving the children it forked until they end (the new one lists them in
ps), then exits 0. Without a successor in time it stops as on SIGINT; a
second signal cuts the wait short. A SIGKILLed daemon takes its children
and seeds with it (none can run on without its memory); the next daemon
reaps what it left.

Cluster: --listen serves this node's seeds (descriptors and pages), forwarded
forks and leases to the other nodes over TCP; --peer/--peers-file name the
other nodes. Every node shares one cluster secret (--secret-file): peer
connections are mutually authenticated with it, and the daemon refuses to
listen without one unless --insecure. --tls-cert/--tls-key (and --tls-ca)
add TLS to peer traffic in both directions. --metrics serves Prometheus
metrics on http://IP:PORT/metrics.

Functions: with --etcd-endpoints the node joins a cluster directory (the
one a gateway serves from; see mitosis gateway) and runs function
invocations within --max-concurrency and --max-memory.

Environment: MITOSIS_NODE, MITOSIS_LISTEN, MITOSIS_ETCD_ENDPOINTS, MITOSIS_ADVERTISE, MITOSIS_PEERS (NAME=IP:PORT,...),
MITOSIS_PEERS_FILE, MITOSIS_SECRET_FILE, MITOSIS_TLS_CERT, MITOSIS_TLS_KEY,
MITOSIS_TLS_CA and MITOSIS_METRICS are the defaults of the flags.`,
		Example: `  mitosis daemon
  mitosis daemon --socket /tmp/mitosis.sock --state-dir /tmp/mitosis
  mitosis daemon --node a --listen 10.0.0.1:7070 --peers-file /etc/mitosis/peers \
      --secret-file /etc/mitosis/secret --metrics 127.0.0.1:9090`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Descriptors the daemon inherited without O_CLOEXEC (a
			// shell's or job server's pipes) would otherwise pass into
			// every function process and child it starts, where a pipe
			// makes the process unpreparable. Everything the Go runtime
			// and the daemon open is close-on-exec already.
			if err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err != nil {
				return fmt.Errorf("daemon: mark inherited descriptors close-on-exec: %w", err)
			}
			cfg, err := f.config(g)
			if err != nil {
				return err
			}
			d, err := node.New(cfg)
			if err != nil {
				return err
			}
			sigs := make(chan os.Signal, 2)
			signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
			defer signal.Stop(sigs)
			ctx, cancel := context.WithCancel(context.Background())
			firstc := make(chan os.Signal, 1)
			go func() {
				select {
				case sig := <-sigs:
					firstc <- sig
				case <-ctx.Done():
					firstc <- nil
				}
				cancel()
			}()
			serveErr := d.Serve(ctx)
			cancel() // Serve failed on its own: stop as on SIGINT
			first := <-firstc
			var closeErr error
			if first == syscall.SIGTERM {
				// Hand the seeds to a successor; a second signal
				// cuts the wait short.
				again, stop := context.WithCancel(context.Background())
				go func() {
					select {
					case <-sigs:
						stop()
					case <-again.Done():
					}
				}()
				closeErr = d.Handover(again)
				stop()
			} else {
				closeErr = d.Close()
			}
			return errors.Join(serveErr, closeErr)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.stateDir, "state-dir", "",
		"state directory: pid file, engine scratch, child logs (default $"+node.StateDirEnv+", else "+node.DefaultStateDir+")")
	fl.StringVar(&f.node, "node", os.Getenv("MITOSIS_NODE"), "this node's name in the cluster (default $MITOSIS_NODE, else the hostname)")
	fl.StringVar(&f.listen, "listen", os.Getenv("MITOSIS_LISTEN"), "IP:PORT to serve peer nodes on (default $MITOSIS_LISTEN; none: serve no peers)")
	var envPeers []string
	if v := os.Getenv("MITOSIS_PEERS"); v != "" {
		envPeers = strings.Split(v, ",")
	}
	fl.StringArrayVar(&f.peers, "peer", envPeers, "a peer node as NAME=IP:PORT (repeatable; default $MITOSIS_PEERS, comma separated)")
	fl.StringVar(&f.peersFile, "peers-file", os.Getenv("MITOSIS_PEERS_FILE"), "file of peer nodes, one `NAME IP:PORT` a line, # comments (default $MITOSIS_PEERS_FILE)")
	fl.StringVar(&f.secretFile, "secret-file", os.Getenv("MITOSIS_SECRET_FILE"), "file holding the cluster secret shared by every node (default $MITOSIS_SECRET_FILE)")
	fl.BoolVar(&f.insecure, "insecure", false, "allow peer traffic without a cluster secret (no authentication)")
	fl.StringVar(&f.tlsCert, "tls-cert", os.Getenv("MITOSIS_TLS_CERT"), "PEM certificate of this node for peer TLS (with --tls-key)")
	fl.StringVar(&f.tlsKey, "tls-key", os.Getenv("MITOSIS_TLS_KEY"), "PEM private key of --tls-cert")
	fl.StringVar(&f.tlsCA, "tls-ca", os.Getenv("MITOSIS_TLS_CA"), "PEM CA that signed every node's certificate (default: system roots)")
	fl.StringVar(&f.metrics, "metrics", os.Getenv("MITOSIS_METRICS"), "IP:PORT to serve Prometheus metrics on, at /metrics (default $MITOSIS_METRICS)")
	fl.BoolVar(&f.hugeCache, "huge-page-cache", false, "back each seed's node page cache with 2 MiB pages (a private tmpfs mounted huge=always and detached at once; needs CAP_SYS_ADMIN, else 4 KiB memfd pages): less CPU per page a child maps, more per page filled, up to 2 MiB of memory per extent a child touches; worth it on hosts that keep freed memory (bare metal, VMs without free page reporting: README, Paging)")
	fl.IntVar(&f.cgroupPool, "cgroup-pool", 2, "cgroups kept pre-created for the children of each containerized seed (mitosis run with limits)")
	fl.DurationVar(&f.peerTimeout, "peer-timeout", 0, "bound on one page request to a peer (default 1s); a child whose page cannot be fetched in time fails")
	var envEtcd []string
	if v := os.Getenv("MITOSIS_ETCD_ENDPOINTS"); v != "" {
		envEtcd = strings.Split(v, ",")
	}
	fl.StringSliceVar(&f.etcd, "etcd-endpoints", envEtcd, "etcd endpoints of the cluster directory to register in (comma separated; the gateway's embedded etcd by default has http://127.0.0.1:2379); needs --listen")
	fl.StringVar(&f.etcdPrefix, "etcd-prefix", "", "key prefix of the cluster directory (default /mitosis/)")
	fl.StringVar(&f.advertise, "advertise", os.Getenv("MITOSIS_ADVERTISE"), "IP:PORT other nodes and the gateway reach this node's --listen at (default: --listen)")
	fl.IntVar(&f.maxConcurrency, "max-concurrency", 0, "function invocations this node runs at once (default 16 per CPU); more are refused as busy")
	fl.StringVar(&f.socketMode, "socket-mode", "0600", "permission bits of the socket, octal: 0600 (root and the daemon's user), 0660 (with --socket-group), 0666 (every local user)")
	fl.DurationVar(&f.handover, "handover-timeout", 30*time.Second, "on SIGTERM, how long to wait for a new daemon on the same --state-dir to adopt the seeds (0: stop at once, as on SIGINT)")
	fl.StringVar(&f.socketGroup, "socket-group", "", "group (name or gid) of the socket, for --socket-mode 0660")
	fl.StringVar(&f.maxMemory, "max-memory", "", "memory function instances may reserve on this node, e.g. 16G (default 80% of RAM)")
	fl.StringVar(&f.fnLogMax, "function-log-max", "64M", "size at which a function's log (what its instances write to stderr, served by /system/logs) is rotated to NAME.log.1")
	return cmd
}

// config turns the flags into a node.Config, reading the files they name.
func (f *daemonFlags) config(g *cli.Globals) (node.Config, error) {
	pager.SetHugePageCache(f.hugeCache)
	cfg := node.Config{
		Socket:      g.Socket,
		StateDir:    f.stateDir,
		Node:        f.node,
		Listen:      f.listen,
		Insecure:    f.insecure,
		Metrics:     f.metrics,
		PeerTimeout: f.peerTimeout,
		CgroupPool:  f.cgroupPool,
		Peers:       map[string]string{},

		Etcd:           f.etcd,
		EtcdPrefix:     f.etcdPrefix,
		Advertise:      f.advertise,
		MaxConcurrency: f.maxConcurrency,
	}
	mode, err := strconv.ParseUint(f.socketMode, 8, 32)
	if err != nil || !validSocketMode(mode) {
		return cfg, fmt.Errorf("--socket-mode %q: want octal permission bits where each class is read-write or nothing, like 0600, 0660 or 0666", f.socketMode)
	}
	cfg.SocketMode, cfg.SocketGroup = os.FileMode(mode), f.socketGroup
	if f.handover < 0 {
		return cfg, fmt.Errorf("--handover-timeout must not be negative, got %v", f.handover)
	}
	cfg.HandoverTimeout = f.handover
	if f.maxMemory != "" {
		m, err := container.ParseMemory(f.maxMemory)
		if err != nil {
			return cfg, fmt.Errorf("--max-memory: %w", err)
		}
		cfg.MaxMemory = m
	}
	m, err := container.ParseMemory(f.fnLogMax)
	if err != nil || m <= 0 {
		return cfg, fmt.Errorf("--function-log-max %q: want a size such as 64M", f.fnLogMax)
	}
	cfg.FunctionLogMax = m
	if f.peersFile != "" {
		peers, err := readPeersFile(f.peersFile)
		if err != nil {
			return cfg, err
		}
		cfg.Peers = peers
	}
	for _, p := range f.peers {
		name, addr, err := parsePeer(p)
		if err != nil {
			return cfg, fmt.Errorf("--peer %q: %w", p, err)
		}
		cfg.Peers[name] = addr
	}
	if f.secretFile != "" {
		secret, err := readSecret(f.secretFile)
		if err != nil {
			return cfg, err
		}
		cfg.Secret = secret
	}
	if f.tlsCert != "" || f.tlsKey != "" || f.tlsCA != "" {
		tc, err := loadTLS(f.tlsCert, f.tlsKey, f.tlsCA)
		if err != nil {
			return cfg, err
		}
		cfg.TLS = tc
	}
	return cfg, nil
}

// parsePeer splits NAME=IP:PORT.
func parsePeer(s string) (name, addr string, err error) {
	name, addr, ok := strings.Cut(strings.TrimSpace(s), "=")
	if !ok || name == "" || addr == "" {
		return "", "", errors.New("want NAME=IP:PORT")
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return "", "", fmt.Errorf("address %q is not IP:PORT: %w", addr, err)
	}
	return name, addr, nil
}

// readPeersFile reads lines `NAME IP:PORT` (or NAME=IP:PORT); blank lines
// and # comments are skipped.
func readPeersFile(path string) (map[string]string, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("--peers-file: %w", err)
	}
	defer fh.Close()
	peers := map[string]string{}
	sc := bufio.NewScanner(fh)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		fields := strings.Fields(strings.Replace(line, "=", " ", 1))
		if len(fields) == 0 {
			continue
		}
		if len(fields) != 2 {
			return nil, fmt.Errorf("--peers-file %s:%d: want `NAME IP:PORT`, got %q", path, n, strings.TrimSpace(line))
		}
		if _, _, err := net.SplitHostPort(fields[1]); err != nil {
			return nil, fmt.Errorf("--peers-file %s:%d: address %q is not IP:PORT: %w", path, n, fields[1], err)
		}
		if old, dup := peers[fields[0]]; dup && old != fields[1] {
			return nil, fmt.Errorf("--peers-file %s:%d: node %s listed twice (%s and %s)", path, n, fields[0], old, fields[1])
		}
		peers[fields[0]] = fields[1]
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("--peers-file %s: %w", path, err)
	}
	return peers, nil
}

// readSecret reads the cluster secret (surrounding white space is not part
// of it).
func readSecret(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--secret-file: %w", err)
	}
	b = []byte(strings.TrimSpace(string(b)))
	if len(b) == 0 {
		return nil, fmt.Errorf("--secret-file %s is empty; put the cluster secret in it (e.g. `head -c 32 /dev/urandom | base64 > %s`)", path, path)
	}
	return b, nil
}

// loadTLS builds the peer TLS configuration: this node's certificate for
// both the server and the client side, and the CA (if any) that verifies
// the other nodes in both directions.
func loadTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	if certFile == "" || keyFile == "" {
		return nil, errors.New("peer TLS needs both --tls-cert and --tls-key")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in it", caFile)
		}
		tc.RootCAs = pool
		tc.ClientCAs = pool
		tc.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return tc, nil
}

// validSocketMode reports whether mode gives the owner read-write and each
// of group and other read-write or nothing (execute bits are ignored).
// Connecting needs write permission, so a class with only read (0644) is
// a typo that would let nobody else connect.
func validSocketMode(mode uint64) bool {
	if mode&^0o777 != 0 || mode&0o600 != 0o600 {
		return false
	}
	for _, class := range []uint64{(mode >> 3) & 0o6, mode & 0o6} {
		if class != 0 && class != 0o6 {
			return false
		}
	}
	return true
}
