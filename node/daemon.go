// Package node is the mitosis node daemon: it owns one engine.Engine and
// serves the local API of docs/PROTOCOL.md on a unix socket, keeping a
// registry of seeds and children.
package node

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/container"
	"github.com/mitosis-fork/mitosis/engine"
	"github.com/mitosis-fork/mitosis/internal/hostmem"
	"github.com/mitosis-fork/mitosis/pager"
	"github.com/mitosis-fork/mitosis/transport"
)

// Version is the daemon's version, reported by the ping op.
var Version = "dev"

// DefaultStateDir is the state directory when neither Config.StateDir nor
// $MITOSIS_STATE_DIR is set.
const DefaultStateDir = "/run/mitosis"

// StateDirEnv is the environment variable naming the state directory.
const StateDirEnv = "MITOSIS_STATE_DIR"

// Config configures a Daemon.
type Config struct {
	// Socket is the unix socket path; empty means $MITOSIS_SOCKET, else
	// /run/mitosis/mitosis.sock.
	Socket string
	// SocketMode is the socket's permission bits (default 0600: root and
	// the daemon's user only). Granting group or other access (0660,
	// 0666) lets those local users connect; they are confined to their
	// own processes and seeds (see caller).
	SocketMode os.FileMode
	// SocketGroup, if set (a group name or gid), is the socket's group.
	SocketGroup string
	// HandoverTimeout is how long Handover (SIGTERM) waits for a successor
	// daemon to adopt the seeds (0: Handover stops like Close).
	HandoverTimeout time.Duration
	// StateDir holds the pid file, the engine's scratch files and the
	// detached children's logs (children/<id>.log); empty means
	// $MITOSIS_STATE_DIR, else /run/mitosis.
	StateDir string
	// Logger receives one line per prepare, fork, exit and rm; nil means a
	// text handler on stderr.
	Logger *slog.Logger

	// Node is this node's name in the cluster; empty means the hostname.
	Node string
	// Listen is the TCP address (IP:PORT) of the peer server that serves
	// this node's seeds and forwarded forks to other nodes; empty means no
	// peer server.
	Listen string
	// Peers maps the other nodes' names to their peer addresses. Clients
	// are dialed on first use and reused. An entry for Node is ignored.
	Peers map[string]string
	// Secret is the cluster secret every node shares (peer connections are
	// mutually authenticated with it). Required with Listen or Peers
	// unless Insecure.
	Secret []byte
	// Insecure allows peer traffic without a secret.
	Insecure bool
	// TLS, if set, wraps peer connections in both directions: it needs
	// this node's certificate and the CA that signed every node's.
	TLS *tls.Config
	// Metrics is the address (IP:PORT) of the Prometheus endpoint
	// /metrics; empty means none.
	Metrics string
	// PeerTimeout bounds every page request to a peer (default: the
	// transport's, 1 s); a child whose page cannot be fetched in time
	// fails.
	PeerTimeout time.Duration
	// CgroupPool is how many cgroups are kept pre-created for the children
	// of each seed prepared from a `mitosis run` container with limits
	// (default 2).
	CgroupPool int

	// MaxConcurrency is how many function invocations may run on this
	// node at once (default 16 per CPU); more are refused as busy.
	MaxConcurrency int
	// MaxMemory is how much memory function instances may reserve on
	// this node (default 80% of RAM): each running or warm instance
	// reserves its function's memory limit (128 MiB without one).
	MaxMemory int64
	// FunctionLogMax is the size at which a function's log on this node is
	// rotated to NAME.log.1 (default 64 MiB).
	FunctionLogMax int64
	// Etcd lists the endpoints of the cluster directory (etcd) the node
	// registers in; empty: no directory.
	Etcd []string
	// EtcdPrefix is the directory's key prefix (default "/mitosis/").
	EtcdPrefix string
	// Advertise is the peer address registered in the directory
	// (default: the Listen address, which must then be a specific IP).
	Advertise string
}

// Daemon is a running node daemon.
type Daemon struct {
	cfg     Config
	log     *slog.Logger
	eng     *engine.Engine
	ln      *net.UnixListener
	pidFile string
	uid     int
	node    string

	// ctx is cancelled when the daemon closes; it bounds work done for
	// local requests.
	ctx    context.Context
	cancel context.CancelFunc

	metrics     *metrics
	metricsSrv  *http.Server
	peers       *peerSet // nil without peers
	peerSrv     *transport.Server
	peerAddr    string
	peerDone    chan struct{}
	metricsAddr string
	leaseWG     sync.WaitGroup // lease releases in flight

	mu         sync.Mutex
	seeds      map[string]*seedRec
	children   map[string]*childRec
	containers map[int]*containerRec // `mitosis run` processes, by pid
	order      []string              // child ids in fork order, for ps
	conns      map[*net.UnixConn]struct{}
	userConns  map[uint32]int // open connections per non-admin uid
	closing    bool
	draining   atomic.Bool   // handing over to a successor (Handover); read on every request
	handedOver bool          // a successor took the seeds and the socket
	successor  *handoverConn // where child exits go after the handover

	peerCloseOnce sync.Once

	handlers sync.WaitGroup

	fn  *fnRegistry // the function runtime
	dir *dirMember  // membership in the cluster directory (nil without one)

	closeOnce sync.Once
	closeErr  error
}

// seedRec is a seed in the registry.
type seedRec struct {
	id       string
	name     string
	seed     *engine.Seed
	self     bool // made by prepare-self: children get a channel
	removing bool
	owner    uint32    // uid of the caller that prepared it (see caller)
	share    shareList // who else may fork it

	origin   string         // node the seed was imported from ("" local)
	originID string         // the seed's id on its origin
	allow    []string       // peers that may fetch it (empty: all)
	leases   map[string]int // children on other nodes paging from it, by node
	expires  time.Time      // TTL expiry (zero: none)
	// pool of cgroups for the children of a seed prepared from a `run`
	// container with limits (nil otherwise).
	pool *container.Pool
}

// childRec is a child in the registry.
type childRec struct {
	id       string
	seed     *seedRec
	child    *engine.Child
	logPath  string
	attached bool
	exited   chan struct{} // closed by the reaper after recording exit
	exit     client.ExitInfo
	stats    engine.ChildStats // final stats, after exit
	err      error             // why the engine ended it (paging failed)
	ended    time.Time
	group    *container.Group // its cgroup (containerized seeds with limits)
	oom      bool             // killed by the OOM killer
	invoke   bool             // forked for a function invocation
	owner    uint32           // uid of the caller that forked it
	prev     *prevChild       // forked by the predecessor, which still serves it (child is nil)
}

// New checks that no other daemon serves cfg.Socket, creates the state
// directory and the socket (mode 0600, in a directory created 0700), and
// starts the engine. Serve then accepts connections.
func New(cfg Config) (*Daemon, error) {
	cfg.Socket = client.SocketPath(cfg.Socket)
	if cfg.StateDir == "" {
		cfg.StateDir = os.Getenv(StateDirEnv)
	}
	if cfg.StateDir == "" {
		cfg.StateDir = DefaultStateDir
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	if cfg.Node == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("node name: no --node given and no hostname: %w", err)
		}
		cfg.Node = h
	}
	if err := checkNodeName(cfg.Node); err != nil {
		return nil, fmt.Errorf("--node: %w", err)
	}
	peers := map[string]string{}
	for name, addr := range cfg.Peers {
		if err := checkNodeName(name); err != nil {
			return nil, fmt.Errorf("peer %q: %w", name, err)
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, fmt.Errorf("peer %s: address %q is not IP:PORT: %w", name, addr, err)
		}
		if name != cfg.Node {
			peers[name] = addr
		}
	}
	if len(cfg.Secret) == 0 && !cfg.Insecure {
		if cfg.Listen != "" {
			return nil, fmt.Errorf("refusing to serve peers on %s without a cluster secret: give --secret-file FILE (the same secret on every node), or --insecure to run without authentication", cfg.Listen)
		}
		if len(peers) > 0 {
			return nil, errors.New("peers are configured but there is no cluster secret: give --secret-file FILE (the same secret on every node), or --insecure to run without authentication")
		}
	}
	d := &Daemon{
		cfg:        cfg,
		log:        cfg.Logger,
		pidFile:    filepath.Join(cfg.StateDir, "mitosis.pid"),
		uid:        os.Getuid(),
		seeds:      map[string]*seedRec{},
		children:   map[string]*childRec{},
		containers: map[int]*containerRec{},
		conns:      map[*net.UnixConn]struct{}{},
		userConns:  map[uint32]int{},
		node:       cfg.Node,
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.fn = newFnRegistry(d)
	d.metrics = newMetrics(d)
	if err := clearStaleSocket(cfg.Socket); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(cfg.Socket), 0o700); err != nil {
		return nil, fmt.Errorf("create socket dir for %s: %w", cfg.Socket, err)
	}
	if err := os.MkdirAll(filepath.Join(cfg.StateDir, "children"), 0o700); err != nil {
		return nil, fmt.Errorf("create state dir %s: %w", cfg.StateDir, err)
	}
	// Bind under a temporary name, set the socket's mode and group, then
	// link it to its path: nobody can connect before the permissions are
	// final, and the link fails if another daemon took the path meanwhile.
	tmp := fmt.Sprintf("%s.%d.tmp", cfg.Socket, os.Getpid())
	_ = os.Remove(tmp)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", cfg.Socket, err)
	}
	ln.SetUnlinkOnClose(false) // Close removes it, after the children are gone
	d.ln = ln
	if err := d.setSocketAccess(tmp); err != nil {
		_ = ln.Close()
		_ = os.Remove(tmp)
		return nil, err
	}
	err = os.Link(tmp, cfg.Socket)
	_ = os.Remove(tmp)
	if err != nil {
		_ = ln.Close()
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("%s appeared while this daemon started (another daemon?); stop it first or use another --socket", cfg.Socket)
		}
		return nil, fmt.Errorf("listen on %s: %w", cfg.Socket, err)
	}
	// We hold the socket: no other daemon of this state serves. Clear what
	// a killed predecessor left.
	d.sweepCgroups("start")
	eng, err := engine.New(engine.Options{StateDir: cfg.StateDir})
	if err != nil {
		d.closeListener()
		return nil, fmt.Errorf("start engine: %w", err)
	}
	d.eng = eng
	// A daemon stopping with SIGTERM on this state directory hands us its
	// seeds (see Handover).
	d.adoptPredecessor()
	d.sweepFrozen()
	tcfg := transport.Config{Node: cfg.Node, Secret: cfg.Secret, Insecure: cfg.Insecure, TLS: cfg.TLS, Timeout: cfg.PeerTimeout,
		// forwardFork bounds each fork by its size instead.
		ForkTimeout: time.Hour}
	if len(peers) > 0 {
		d.peers = newPeerSet(tcfg, peers)
	}
	if cfg.Listen != "" {
		if err := d.listenPeers(tcfg); err != nil {
			_ = eng.Close()
			d.closeListener()
			return nil, err
		}
	}
	if len(cfg.Etcd) > 0 {
		if err := d.joinDirectory(); err != nil {
			d.closePeers()
			_ = eng.Close()
			d.closeListener()
			return nil, err
		}
	}
	if cfg.Metrics != "" {
		if err := d.serveMetrics(cfg.Metrics); err != nil {
			d.leaveDirectory()
			d.closePeers()
			_ = eng.Close()
			d.closeListener()
			return nil, err
		}
	}
	if err := os.WriteFile(d.pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600); err != nil {
		d.leaveDirectory()
		d.closePeers()
		d.closeMetrics()
		_ = eng.Close()
		d.closeListener()
		return nil, fmt.Errorf("write pid file: %w", err)
	}
	d.log.Info("listening", "socket", cfg.Socket, "state_dir", cfg.StateDir, "pid", os.Getpid(), "version", Version,
		"node", cfg.Node, "peer_listen", d.peerAddr, "peers", len(peers), "tls", cfg.TLS != nil, "insecure", cfg.Insecure,
		"metrics", d.MetricsAddr(), "page_cache", pager.CacheBacking())
	// The huge-page cache pays off where freed memory stays with the
	// guest (README, Paging): say so when the choice looks wrong.
	switch reports, why := hostmem.Reporting(); {
	case !reports && !pager.HugePageCache():
		d.log.Info("this host keeps the memory it frees; --huge-page-cache would make mapping pages into children cheaper", "host_memory", why)
	case reports && pager.HugePageCache():
		d.log.Info("this host hands freed memory back to its hypervisor; fresh 2 MiB cache pages wait for it (--huge-page-cache may cost more than it saves)", "host_memory", why)
	}
	return d, nil
}

// closePeers closes the peer clients and the peer server.
func (d *Daemon) closePeers() {
	if d.peers != nil {
		d.peers.close()
	}
	d.closePeerServer()
}

// closePeerServer stops serving peers (once).
func (d *Daemon) closePeerServer() {
	d.peerCloseOnce.Do(func() {
		if d.peerSrv == nil {
			return
		}
		_ = d.peerSrv.Close()
		select {
		case <-d.peerDone:
		case <-time.After(5 * time.Second):
			d.log.Warn("shutdown: peer server did not stop within 5s")
		}
	})
}

func (d *Daemon) closeListener() {
	_ = d.ln.Close()
	_ = os.Remove(d.cfg.Socket)
}

// clearStaleSocket removes path if it is a socket nobody answers on, and
// fails if a daemon answers there or path is not a socket.
func clearStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check socket %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket; remove it or choose another --socket", path)
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		who := "another mitosis daemon"
		if pid := pingPID(conn); pid > 0 {
			who = fmt.Sprintf("another mitosis daemon (pid %d)", pid)
		}
		_ = conn.Close()
		return fmt.Errorf("%s is already listening on %s; stop it first or use another --socket", who, path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("check socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

// pingPID asks whatever listens on conn for its pid; 0 if it cannot tell.
func pingPID(conn net.Conn) int {
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte(`{"op":"ping"}` + "\n")); err != nil {
		return 0
	}
	buf := make([]byte, 4096)
	n, _ := conn.Read(buf)
	var resp client.Response
	if err := jsonUnmarshalLine(buf[:n], &resp); err != nil {
		return 0
	}
	return resp.PID
}

// Serve accepts connections until ctx is done or Close is called, handling
// each connection in its own goroutine. It returns nil on a clean stop.
func (d *Daemon) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { _ = d.ln.Close() })
	defer stop()
	for {
		conn, err := d.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || d.isClosing() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				d.log.Warn("accept", "err", err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			return fmt.Errorf("accept on %s: %w", d.cfg.Socket, err)
		}
		d.mu.Lock()
		if d.closing {
			d.mu.Unlock()
			_ = conn.Close()
			return nil
		}
		d.conns[conn] = struct{}{}
		d.handlers.Add(1)
		d.mu.Unlock()
		go func() {
			defer d.handlers.Done()
			defer func() {
				d.mu.Lock()
				delete(d.conns, conn)
				d.mu.Unlock()
				_ = conn.Close()
			}()
			d.serveConn(conn)
		}()
	}
}

func (d *Daemon) isClosing() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.closing
}

// Close stops accepting, kills every running child and waits for it, closes
// the connections and the engine, and removes the socket and the pid file.
func (d *Daemon) Close() error {
	d.closeOnce.Do(func() { d.closeErr = d.close() })
	return d.closeErr
}

func (d *Daemon) close() error {
	start := time.Now()
	d.mu.Lock()
	d.closing = true
	d.mu.Unlock()
	_ = d.ln.Close()
	draining := d.draining.Load() // Handover released the socket and stopped the functions
	d.leaveDirectory()            // out of placement first
	if !draining {
		d.fn.closeAll()
	}
	killed := d.killAll(10 * time.Second)
	// Attached handlers have sent their exit lines; cut everyone off.
	d.mu.Lock()
	for conn := range d.conns {
		_ = conn.Close()
	}
	d.mu.Unlock()
	if !waitTimeout(&d.handlers, 5*time.Second) {
		d.log.Warn("shutdown: some connections did not finish within 5s")
	}
	killed += d.killAll(5 * time.Second) // forked while we were closing
	d.cancel()
	// Children of imported seeds have ended: let their lease releases
	// reach the origins (each is bounded) before the clients close.
	if !waitTimeout(&d.leaseWG, leaseReleaseTimeout+time.Second) {
		d.log.Warn("shutdown: some lease releases did not finish")
	}
	d.closePeers()
	d.closeMetrics()
	var errs []error
	if err := d.eng.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close engine: %w", err))
	}
	d.mu.Lock()
	for _, s := range d.seeds {
		if s.pool != nil {
			_ = s.pool.Close()
		}
	}
	runs := make([]*containerRec, 0, len(d.containers))
	for _, c := range d.containers {
		runs = append(runs, c)
	}
	d.mu.Unlock()
	for _, c := range runs {
		_ = syscall.Kill(c.pid, syscall.SIGKILL)
		d.dropGroup(c)
	}
	if draining {
		// The socket, the pid file and the node's cgroup tree may be a
		// successor's by now.
		d.log.Info("shutdown", "killed", killed, "took", time.Since(start), "handed_over", d.handedOver)
		return errors.Join(errs...)
	}
	d.sweepCgroups("shutdown")
	_ = os.Remove(filepath.Join(d.cfg.StateDir, frozenFile)) // the engine ended them all
	if err := os.Remove(d.cfg.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove socket: %w", err))
	}
	if err := os.Remove(d.pidFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove pid file: %w", err))
	}
	d.log.Info("shutdown", "killed", killed, "took", time.Since(start))
	return errors.Join(errs...)
}

// killAll kills every running child and waits (up to timeout) until they
// are reaped. It returns how many it killed.
func (d *Daemon) killAll(timeout time.Duration) int {
	deadline := time.After(timeout)
	n := 0
	for {
		running := d.runningChildren()
		if len(running) == 0 {
			return n
		}
		for _, k := range running {
			d.killChild(k)
		}
		n += len(running)
		for _, k := range running {
			select {
			case <-k.exited:
			case <-deadline:
				d.log.Warn("shutdown: children not reaped in time", "timeout", timeout)
				return n
			}
		}
	}
}

// runningChildren lists the children that have not exited (those of a
// predecessor included).
func (d *Daemon) runningChildren() []*childRec {
	d.mu.Lock()
	defer d.mu.Unlock()
	var running []*childRec
	for _, k := range d.children {
		if k != nil && !k.hasExited() {
			running = append(running, k)
		}
	}
	return running
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// pickID returns the engine's id for a seed or child if it is well formed
// and unused, else a fresh one. d.mu must be held.
func (d *Daemon) pickID(engineID, prefix string) string {
	if len(engineID) == len(prefix)+8 && strings.HasPrefix(engineID, prefix) {
		_, inSeeds := d.seeds[engineID]
		_, inChildren := d.children[engineID]
		if !inSeeds && !inChildren {
			return engineID
		}
	}
	return d.newID(prefix)
}

// newID returns prefix + 8 random hex digits not used by any seed or child.
// d.mu must be held.
func (d *Daemon) newID(prefix string) string {
	for {
		var b [4]byte
		if _, err := rand.Read(b[:]); err != nil {
			panic(fmt.Sprintf("crypto/rand: %v", err))
		}
		id := prefix + hex.EncodeToString(b[:])
		if _, ok := d.seeds[id]; ok {
			continue
		}
		if _, ok := d.children[id]; ok {
			continue
		}
		return id
	}
}

// peerCred returns the peer's credentials (as of connect).
func peerCred(conn *net.UnixConn) (*unix.Ucred, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

func (c *childRec) hasExited() bool {
	select {
	case <-c.exited:
		return true
	default:
		return false
	}
}
