package client

import (
	"encoding/json"
	"os"
	"time"
)

// DefaultSocket is the daemon's socket path when neither an explicit path nor
// $MITOSIS_SOCKET is given.
const DefaultSocket = "/run/mitosis/mitosis.sock"

// SocketEnv is the environment variable naming the daemon's socket.
const SocketEnv = "MITOSIS_SOCKET"

// MaxLine is the longest request line the daemon accepts, in bytes,
// including the terminating newline.
const MaxLine = 1 << 20

// Request ops, see docs/PROTOCOL.md.
const (
	OpPrepare     = "prepare"
	OpPrepareSelf = "prepare-self"
	OpFork        = "fork"
	OpSeeds       = "seeds"
	OpPS          = "ps"
	OpRm          = "rm"
	OpPing        = "ping"
	// OpRun starts a process in a container (rootfs, namespaces, limits).
	OpRun = "run"
	// Function runtime (see docs/PROTOCOL.md, "Functions"): the request's
	// "args" carries the op's JSON body, the response's "result" its
	// answer.
	OpFnDeploy  = "fn-deploy"
	OpFnRm      = "fn-rm"
	OpFnList    = "fn-ls"
	OpNodeStats = "node-stats"
	// OpInvoke runs one invocation of a deployed function.
	OpInvoke = "invoke"
)

// Roles returned by prepare-self.
const (
	RoleParent = "parent"
	RoleChild  = "child"
)

// Child states reported in ChildInfo.State.
const (
	StateRunning = "running"
	StateExited  = "exited"
	StateKilled  = "killed"
	// StateFailed is a child the daemon ended because its memory could not
	// be served (for example the seed's origin node died); ChildInfo.Error
	// says why.
	StateFailed = "failed"
	// StateOOM is a child the kernel killed for exceeding its container's
	// memory limit.
	StateOOM = "oom-killed"
)

// SourceLocal is ChildInfo.Source for a child of a seed prepared on the
// daemon's own node.
const SourceLocal = "local"

// SocketPath resolves the daemon's socket path: path if not empty, else
// $MITOSIS_SOCKET, else DefaultSocket.
func SocketPath(path string) string {
	if path != "" {
		return path
	}
	if env := os.Getenv(SocketEnv); env != "" {
		return env
	}
	return DefaultSocket
}

// Request is one request line sent to the daemon. Only the fields the op
// uses are set; see docs/PROTOCOL.md.
type Request struct {
	Op      string          `json:"op"`
	PID     int             `json:"pid,omitempty"`
	Name    string          `json:"name,omitempty"`
	FD      *int            `json:"fd,omitempty"`
	Seed    string          `json:"seed,omitempty"`
	Count   int             `json:"count,omitempty"`
	Eager   bool            `json:"eager,omitempty"`
	Stdio   bool            `json:"stdio,omitempty"`
	Payload json.RawMessage `json:"payload,omitempty"`
	ID      string          `json:"id,omitempty"`
	Force   bool            `json:"force,omitempty"`
	// Node is the node a fork's children are created on (empty: the
	// daemon's own node).
	Node string `json:"node,omitempty"`
	// Prefetch maps the seed's recorded working set into each child
	// before it runs.
	Prefetch bool `json:"prefetch,omitempty"`
	// Allow lists the peer nodes that may fetch a prepared seed (empty:
	// every authenticated peer).
	Allow []string `json:"allow,omitempty"`
	// Share lists who besides the preparing user may fork a prepared
	// seed: "uid:N", "gid:N", "user:NAME", "group:NAME" or "*" (every
	// user who can reach the socket).
	Share []string `json:"share,omitempty"`
	// TTL is a Go duration ("90s", "1h") after which a prepared seed is
	// removed (empty: never).
	TTL string `json:"ttl,omitempty"`
	// Run: the image directory, the command (argv[0] is a path inside
	// the image), its environment (KEY=VALUE), and container limits.
	Rootfs string   `json:"rootfs,omitempty"`
	Argv   []string `json:"argv,omitempty"`
	Env    []string `json:"env,omitempty"`
	Memory string   `json:"memory,omitempty"`
	CPUs   float64  `json:"cpus,omitempty"`
	Pids   int64    `json:"pids,omitempty"`
	// Args is the JSON body of a function-runtime op.
	Args json.RawMessage `json:"args,omitempty"`
}

// Response is one response line from the daemon. Seed is a SeedInfo object
// for prepare and a seed id string for prepare-self, so it is kept raw.
type Response struct {
	OK       bool            `json:"ok"`
	Error    string          `json:"error,omitempty"`
	Role     string          `json:"role,omitempty"`
	Seed     json.RawMessage `json:"seed,omitempty"`
	Child    string          `json:"child,omitempty"`
	Seeds    []SeedInfo      `json:"seeds,omitempty"`
	Children []ChildInfo     `json:"children,omitempty"`
	Exit     *ExitInfo       `json:"exit,omitempty"`
	PID      int             `json:"pid,omitempty"`
	Version  string          `json:"version,omitempty"`
	// Node is the daemon's node name (ping).
	Node string `json:"node,omitempty"`
	// Result is the answer of a function-runtime op.
	Result json.RawMessage `json:"result,omitempty"`
}

// InvokeArgs are the args of OpInvoke.
type InvokeArgs struct {
	Function string `json:"function"`
	// Seed is NODE/SEED to fork from (fork policies); empty: the node's
	// own seed of the function.
	Seed string `json:"seed,omitempty"`
	// Body is the request body (base64 in JSON).
	Body []byte `json:"body,omitempty"`
	// Timeout bounds the invocation (Go duration; empty: the function's).
	Timeout string `json:"timeout,omitempty"`
}

// InvokeResult is the answer of OpInvoke: the function's status, body
// and error (the traceback's last line), and how the instance was had.
type InvokeResult struct {
	Status      int     `json:"status"`
	Body        []byte  `json:"body,omitempty"`
	ContentType string  `json:"content_type,omitempty"`
	Error       string  `json:"error,omitempty"`
	Kind        string  `json:"kind"` // fork, warm or cold
	Instance    string  `json:"instance,omitempty"`
	StartMS     float64 `json:"start_ms"`
	RunMS       float64 `json:"run_ms"`
}

// SeedInfo describes one seed held by the daemon.
type SeedInfo struct {
	ID           string `json:"id"`
	Name         string `json:"name"`
	ParentPID    int    `json:"parent_pid"`
	SourcePID    int    `json:"source_pid"`
	VMAs         int    `json:"vmas"`
	PresentPages uint64 `json:"present_pages"`
	// Threads is the parent's thread count at prepare (each child gets as
	// many).
	Threads   int       `json:"threads"`
	PrepareMS float64   `json:"prepare_ms"`
	Created   time.Time `json:"created"`
	// Self is true for seeds made by prepare-self (their children get a
	// channel connection and a reply line).
	Self bool `json:"self"`
	// Children is the number of this seed's children still running.
	Children int `json:"children"`
	// Origin is the node the seed was prepared on, empty for a seed
	// prepared on this node (an imported seed pages from its origin).
	Origin string `json:"origin,omitempty"`
	// Allow lists the peer nodes that may fetch the seed (empty: all).
	Allow []string `json:"allow,omitempty"`
	// Leases is the number of children on other nodes that page from the
	// seed.
	Leases int `json:"leases"`
	// LeaseNodes are the nodes holding those leases.
	LeaseNodes []string `json:"lease_nodes,omitempty"`
	// Owner is the uid that prepared the seed; it, root and the daemon's
	// user may remove it.
	Owner int `json:"owner"`
	// Share lists who else may fork it (prepare --share).
	Share []string `json:"share,omitempty"`
	// Expires is when the seed is removed (prepare --ttl), if set.
	Expires *time.Time `json:"expires,omitempty"`
}

// ChildInfo describes one child forked by the daemon, running or exited.
type ChildInfo struct {
	ID          string  `json:"id"`
	Seed        string  `json:"seed"`
	PID         int     `json:"pid"`
	State       string  `json:"state"`
	ExitCode    int     `json:"exit_code"`
	Signal      int     `json:"signal"`
	StartMS     float64 `json:"start_ms"`
	Faults      uint64  `json:"faults"`
	PagesCopied uint64  `json:"pages_copied"`
	PagesZero   uint64  `json:"pages_zero"`
	PagesEager  uint64  `json:"pages_eager"`
	// PagesShared are pages mapped from the node's shared page cache.
	PagesShared uint64 `json:"pages_shared"`
	// PagesFetched are pages this child's faults brought into the node's
	// page cache from the seed's source (over the network for an
	// imported seed).
	PagesFetched uint64 `json:"pages_fetched"`
	// Source is where the child's pages come from: the seed's origin node,
	// or "local".
	Source string `json:"source"`
	// Node is the node the child runs on.
	Node string `json:"node,omitempty"`
	// Error is why the daemon ended the child (state "failed").
	Error   string    `json:"error,omitempty"`
	Created time.Time `json:"created"`
	// Ended is when the daemon reaped it (absent while it runs).
	Ended *time.Time `json:"ended,omitempty"`
	// Log is the file a detached child's stdout and stderr are appended to
	// (empty for attached children).
	Log string `json:"log,omitempty"`
}

// ExitInfo is how a child ended: Signal is 0 for a normal exit with Code,
// otherwise the child was killed by Signal and Code is -1.
type ExitInfo struct {
	Code   int `json:"code"`
	Signal int `json:"signal"`
	// Error is set when the daemon killed the child because its memory
	// could not be served.
	Error string `json:"error,omitempty"`
}

// ShellCode is the exit status a shell would report: Code, or 128+Signal.
func (e ExitInfo) ShellCode() int {
	if e.Signal > 0 {
		return 128 + e.Signal
	}
	return e.Code
}
