// Package netlab builds a throwaway multi-node mitosis cluster on one host:
// one network namespace per node, each with a veth whose other end is
// attached to a bridge that lives in a separate hub namespace, and one
// `mitosis daemon` per node started inside its namespace with
// nsenter (network namespace only). Only the network differs between the nodes: the process
// tree and the filesystem are shared, so every node's socket, state dir and
// child logs are plain paths of the lab's directory.
//
// Everything the lab creates (namespaces, links, the bridge) carries the
// lab's prefix ("mt" + 4 random hex digits) and lives only inside the
// lab's namespaces: nothing is created in, routed to or changed in the
// host's own network namespace. Close removes it all; Leftovers lists what
// remains of a prefix. Peer traffic uses addresses of 198.18.0.0/15
// (RFC 2544 benchmarking space).
//
// It needs root and the `ip` tool of iproute2. It is used by the
// multi-node test (test/cluster) and the remote benchmarks (bench).
package netlab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Port is the peer port of every daemon, MetricsPort its metrics port.
const (
	Port        = 7070
	MetricsPort = 9090
)

// NodeSpec describes one node of a lab.
type NodeSpec struct {
	// Name is the node's name (--node) and the last part of its namespace
	// name; one lower-case letter or word.
	Name string
	// Secret overrides the lab's cluster secret for this node.
	Secret string
	// NoPeers starts the daemon without --peer flags for the other nodes.
	NoPeers bool
	// Peers restricts the --peer flags to these nodes (default: every
	// other node of the lab).
	Peers []string
	// Args are extra daemon arguments.
	Args []string
	// NoDaemon makes a plain host (e.g. for a gateway started with
	// Command): no other daemon lists it as a peer.
	NoDaemon bool
}

// Config configures New.
type Config struct {
	// Bin is the mitosis binary.
	Bin string
	// Dir holds the sockets, state dirs, logs and secrets (created if
	// missing; not removed by Close).
	Dir string
	// Subnet is the first three octets of the nodes' /24, inside
	// 198.18.0.0/15; node i (from 0) gets .i+1. Default "198.18.0".
	Subnet string
	// Secret is the cluster secret (default: random).
	Secret string
	// Nodes are the nodes, in address order.
	Nodes []NodeSpec
	// Env is added to the environment of every process the lab starts
	// (daemons and Command).
	Env []string
	// Log receives one line per namespace operation; nil discards.
	Log io.Writer
}

// Node is one node of a lab.
type Node struct {
	Spec NodeSpec
	Name string
	// NS is its network namespace, Link its veth there, HubLink the other
	// end (in the hub namespace, on the bridge).
	NS, Link, HubLink string
	// IP is its address; Addr is IP:Port, MetricsAddr IP:MetricsPort.
	IP, Addr, MetricsAddr string
	// Sock, StateDir and LogFile are the daemon's socket, state dir and
	// stderr/stdout file; SecretFile its --secret-file.
	Sock, StateDir, LogFile, SecretFile string

	lab    *Lab
	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{}
	waitEr error
}

// Lab is a running set of namespaces and daemons.
type Lab struct {
	Prefix string
	// Hub is the namespace of the bridge Bridge.
	Hub, Bridge string
	Nodes       []*Node
	cfg         Config
	log         io.Writer
	namespaces  []string
	closed      bool
}

// NewPrefix returns a fresh "mt" + 4 hex prefix.
func NewPrefix() string {
	var b [2]byte
	_, _ = rand.Read(b[:])
	return "mt" + hex.EncodeToString(b[:])
}

// New creates the namespaces and links of cfg.Nodes and writes their
// secret files; it starts no daemon (see Start). On error, whatever was
// created is removed again.
func New(cfg Config) (l *Lab, err error) {
	if cfg.Bin == "" || cfg.Dir == "" || len(cfg.Nodes) == 0 {
		return nil, errors.New("netlab: Bin, Dir and Nodes are required")
	}
	if cfg.Subnet == "" {
		cfg.Subnet = "198.18.0"
	}
	if !strings.HasPrefix(cfg.Subnet, "198.18.") && !strings.HasPrefix(cfg.Subnet, "198.19.") {
		return nil, fmt.Errorf("netlab: subnet %s is outside 198.18.0.0/15", cfg.Subnet)
	}
	if cfg.Secret == "" {
		var b [16]byte
		_, _ = rand.Read(b[:])
		cfg.Secret = hex.EncodeToString(b[:])
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, err
	}
	p := NewPrefix()
	l = &Lab{Prefix: p, Hub: p + "-hub", Bridge: p + "br", cfg: cfg, log: cfg.Log}
	if l.log == nil {
		l.log = io.Discard
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, l.Close())
			l = nil
		}
	}()
	if err := l.addNS(l.Hub); err != nil {
		return l, err
	}
	if err := l.ip("-n", l.Hub, "link", "set", "lo", "up"); err != nil {
		return l, err
	}
	if err := l.ip("-n", l.Hub, "link", "add", l.Bridge, "type", "bridge"); err != nil {
		return l, err
	}
	if err := l.ip("-n", l.Hub, "link", "set", l.Bridge, "up"); err != nil {
		return l, err
	}
	for i, spec := range cfg.Nodes {
		n := &Node{Spec: spec, Name: spec.Name, lab: l,
			NS: p + "-" + spec.Name, Link: p + spec.Name, HubLink: p + spec.Name + "h",
			IP: fmt.Sprintf("%s.%d", cfg.Subnet, i+1)}
		if len(n.HubLink) > 15 {
			return l, fmt.Errorf("netlab: node name %q too long for an interface name", spec.Name)
		}
		n.Addr = net.JoinHostPort(n.IP, strconv.Itoa(Port))
		n.MetricsAddr = net.JoinHostPort(n.IP, strconv.Itoa(MetricsPort))
		n.Sock = filepath.Join(cfg.Dir, spec.Name+".sock")
		n.StateDir = filepath.Join(cfg.Dir, spec.Name)
		n.LogFile = filepath.Join(cfg.Dir, spec.Name+".log")
		n.SecretFile = filepath.Join(cfg.Dir, spec.Name+".secret")
		secret := cfg.Secret
		if spec.Secret != "" {
			secret = spec.Secret
		}
		if err := os.WriteFile(n.SecretFile, []byte(secret+"\n"), 0o600); err != nil {
			return l, err
		}
		l.Nodes = append(l.Nodes, n)
		if err := l.addNS(n.NS); err != nil {
			return l, err
		}
		steps := [][]string{
			{"-n", n.NS, "link", "set", "lo", "up"},
			// both ends are created inside our namespaces, never in the host's
			{"-n", n.NS, "link", "add", n.Link, "type", "veth", "peer", "name", n.HubLink, "netns", l.Hub},
			{"-n", l.Hub, "link", "set", n.HubLink, "master", l.Bridge},
			{"-n", l.Hub, "link", "set", n.HubLink, "up"},
			{"-n", n.NS, "addr", "add", n.IP + "/24", "dev", n.Link},
			{"-n", n.NS, "link", "set", n.Link, "up"},
		}
		for _, s := range steps {
			if err := l.ip(s...); err != nil {
				return l, err
			}
		}
	}
	return l, nil
}

func (l *Lab) addNS(name string) error {
	if err := l.ip("netns", "add", name); err != nil {
		return err
	}
	l.namespaces = append(l.namespaces, name)
	return nil
}

// ip runs the ip tool with a time bound.
func (l *Lab) ip(args ...string) error {
	fmt.Fprintf(l.log, "netlab: ip %s\n", strings.Join(args, " "))
	return run(10*time.Second, "ip", args...)
}

func run(timeout time.Duration, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// Node returns the node called name, or nil.
func (l *Lab) Node(name string) *Node {
	for _, n := range l.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// Env is the environment of the processes the lab starts.
func (l *Lab) Env() []string {
	return append(os.Environ(), l.cfg.Env...)
}

// Command returns argv to be run inside node's network namespace with the
// lab's environment. It enters only the network namespace
// (`nsenter --net=/run/netns/NS`, which execs argv: the pid is argv's):
// `ip netns exec` would also unshare the mount namespace and remount /sys,
// hiding the host's cgroup v1 hierarchies under /sys/fs/cgroup from the
// daemon, which puts every function instance in a cgroup.
func (n *Node) Command(argv ...string) *exec.Cmd {
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + n.NS, "--"}, argv...)...)
	cmd.Env = n.lab.Env()
	return cmd
}

// DaemonArgs are the daemon's arguments (after `mitosis daemon`).
func (n *Node) DaemonArgs() []string {
	args := []string{"--node", n.Name, "--listen", n.Addr, "--secret-file", n.SecretFile,
		"--socket", n.Sock, "--state-dir", n.StateDir, "--metrics", n.MetricsAddr}
	args = append(args, n.Spec.Args...)
	if n.Spec.NoPeers {
		return args
	}
	for _, o := range n.lab.Nodes {
		if o == n || o.Spec.NoDaemon || (len(n.Spec.Peers) > 0 && !contains(n.Spec.Peers, o.Name)) {
			continue
		}
		args = append(args, "--peer", o.Name+"="+o.Addr)
	}
	return args
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Start starts the node's daemon in its namespace (its output appended to
// LogFile) and waits until it answers on its socket.
func (n *Node) Start() error {
	n.mu.Lock()
	if n.cmd != nil && !n.exited() {
		n.mu.Unlock()
		return fmt.Errorf("netlab: daemon %s already running", n.Name)
	}
	logf, err := os.OpenFile(n.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		n.mu.Unlock()
		return err
	}
	defer logf.Close()
	fmt.Fprintf(logf, "netlab: starting daemon %s at %s\n", n.Name, time.Now().Format(time.RFC3339Nano))
	cmd := n.Command(append([]string{n.lab.cfg.Bin, "daemon"}, n.DaemonArgs()...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = n.lab.cfg.Dir
	if err := cmd.Start(); err != nil {
		n.mu.Unlock()
		return fmt.Errorf("netlab: start daemon %s: %w", n.Name, err)
	}
	done := make(chan struct{})
	n.cmd, n.done = cmd, done
	go func() {
		err := cmd.Wait()
		n.mu.Lock()
		n.waitEr = err
		n.mu.Unlock()
		close(done)
	}()
	n.mu.Unlock()
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-done:
			return fmt.Errorf("netlab: daemon %s exited at start (%v); log:\n%s", n.Name, n.WaitErr(), Tail(n.LogFile, 20))
		default:
		}
		if c, err := net.DialTimeout("unix", n.Sock, time.Second); err == nil {
			// answered: the socket exists and is accepted
			_, werr := c.Write([]byte(`{"op":"ping"}` + "\n"))
			buf := make([]byte, 512)
			_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
			k, rerr := c.Read(buf)
			c.Close()
			if werr == nil && rerr == nil && bytes.Contains(buf[:k], []byte(`"ok":true`)) {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("netlab: daemon %s did not answer on %s within 20 s; log:\n%s", n.Name, n.Sock, Tail(n.LogFile, 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// exited reports (mu held or not) whether the daemon process has ended.
func (n *Node) exited() bool {
	if n.done == nil {
		return true
	}
	select {
	case <-n.done:
		return true
	default:
		return false
	}
}

// Running reports whether the daemon runs.
func (n *Node) Running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd != nil && !n.exited()
}

// PID is the daemon's pid (0 if never started).
func (n *Node) PID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil || n.cmd.Process == nil {
		return 0
	}
	return n.cmd.Process.Pid
}

// WaitErr is the daemon's exit status once it exited.
func (n *Node) WaitErr() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.waitEr
}

// Kill sends SIGKILL to the daemon and waits for it.
func (n *Node) Kill() error {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.mu.Unlock()
	if cmd == nil {
		return nil
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("netlab: daemon %s did not die within 10 s of SIGKILL", n.Name)
	}
}

// Stop sends SIGINT (stop for good: no handover) and expects exit status 0 within timeout (then
// SIGKILL and an error).
func (n *Node) Stop(timeout time.Duration) error {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-done:
		return nil // already gone (killed by a test)
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-done:
		if err := n.WaitErr(); err != nil {
			return fmt.Errorf("netlab: daemon %s: exit on SIGINT: %v; log:\n%s", n.Name, err, Tail(n.LogFile, 20))
		}
		return nil
	case <-time.After(timeout):
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-done
		return fmt.Errorf("netlab: daemon %s did not exit within %v of SIGINT (killed); log:\n%s", n.Name, timeout, Tail(n.LogFile, 20))
	}
}

// SetLink sets the node's veth up or down (inside its namespace).
func (n *Node) SetLink(up bool) error {
	state := "down"
	if up {
		state = "up"
	}
	return n.lab.ip("-n", n.NS, "link", "set", n.Link, state)
}

// CLI runs `mitosis --socket SOCK args...` (from the host namespace: the
// socket is a path) bounded by timeout and returns stdout, stderr and the
// error (an *exec.ExitError for a non-zero status).
func (n *Node) CLI(timeout time.Duration, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, n.lab.cfg.Bin, append([]string{"--socket", n.Sock}, args...)...)
	cmd.Env = n.lab.Env()
	cmd.Dir = n.lab.cfg.Dir
	cmd.WaitDelay = 2 * time.Second
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("mitosis %s: timed out after %v: %w", strings.Join(args, " "), timeout, ctx.Err())
	}
	return out.String(), errb.String(), err
}

// InNetns runs fn on an OS thread that has entered the node's network
// namespace (sockets created by fn live there). fn must not start
// goroutines that create sockets.
func (n *Node) InNetns(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// If anything below fails after setns, the thread stays locked and
		// is discarded when this goroutine exits.
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer self.Close()
		target, err := os.Open("/run/netns/" + n.NS)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", n.NS, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("setns back: %w", err))
			return // thread stays locked: discarded
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Metrics fetches the node's /metrics (from inside its namespace) and
// returns the samples by their full name with labels, e.g.
// `mitosis_pages_total{kind="fetched"}`.
func (n *Node) Metrics() (map[string]float64, error) {
	var body []byte
	err := n.InNetns(func() error {
		c, err := net.DialTimeout("tcp", n.MetricsAddr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "GET /metrics HTTP/1.0\r\nHost: "+n.MetricsAddr+"\r\n\r\n"); err != nil {
			return err
		}
		body, err = io.ReadAll(c)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("metrics of node %s: %w", n.Name, err)
	}
	_, rest, ok := bytes.Cut(body, []byte("\r\n\r\n"))
	if !ok || !bytes.HasPrefix(body, []byte("HTTP/1.")) || !bytes.Contains(body[:bytes.IndexByte(body, '\n')+1], []byte(" 200 ")) {
		return nil, fmt.Errorf("metrics of node %s: bad response %q", n.Name, firstLine(body))
	}
	m := map[string]float64{}
	for _, line := range strings.Split(string(rest), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			m[line[:i]] = v
		}
	}
	return m, nil
}

func firstLine(b []byte) string {
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}

// Close stops every daemon (SIGTERM, exit 0 expected within 30 s) and
// deletes every namespace of the lab (which removes their links and the
// bridge). It returns what went wrong; it always tries everything.
func (l *Lab) Close() error {
	if l == nil || l.closed {
		return nil
	}
	l.closed = true
	var errs []error
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, n := range l.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := n.Stop(30 * time.Second); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for i := len(l.namespaces) - 1; i >= 0; i-- {
		if err := l.ip("netns", "del", l.namespaces[i]); err != nil {
			errs = append(errs, err)
		}
	}
	if left := Leftovers(l.Prefix); len(left) > 0 {
		errs = append(errs, fmt.Errorf("netlab: left after Close: %s", strings.Join(left, ", ")))
	}
	return errors.Join(errs...)
}

// Leftovers lists the network namespaces whose name starts with prefix
// (all of a lab's links live in its namespaces, so none means nothing is
// left), and links of the host namespace with that prefix (there should
// never be any).
func Leftovers(prefix string) []string {
	var left []string
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), prefix) {
				left = append(left, "netns "+e.Name())
			}
		}
	}
	if ifs, err := net.Interfaces(); err == nil {
		for _, i := range ifs {
			if strings.HasPrefix(i.Name, prefix) {
				left = append(left, "host link "+i.Name)
			}
		}
	}
	return left
}

// Tail returns the last n lines of a file.
func Tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Available reports why a lab cannot be built here ("" if it can): root
// and the ip tool are needed.
func Available() string {
	if os.Geteuid() != 0 {
		return "needs root (network namespaces, ptrace, userfaultfd)"
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return "needs the ip tool (iproute2)"
	}
	return ""
}
