// Package client talks to the mitosis node daemon over its unix socket (see
// docs/PROTOCOL.md): prepare processes into seeds, fork children, list and
// remove them. It also defines the wire types shared with package node.
package client

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// maxResponse bounds one response line read by the client.
const maxResponse = 64 << 20

// Client is a connection to the mitosis daemon. Its methods are safe for
// concurrent use; requests are sent one at a time.
type Client struct {
	path string
	mu   sync.Mutex
	conn *net.UnixConn
	r    *bufio.Reader
}

// Dial connects to the daemon at socketPath; an empty path means
// $MITOSIS_SOCKET, else /run/mitosis/mitosis.sock.
func Dial(socketPath string) (*Client, error) {
	path := SocketPath(socketPath)
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("cannot reach mitosis daemon at %s: %w (start it with `mitosis daemon`)", path, err)
	}
	return &Client{path: path, conn: conn, r: bufio.NewReaderSize(conn, 64<<10)}, nil
}

// Path is the socket path the client is connected to.
func (c *Client) Path() string { return c.path }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// send writes req as one line, with fds as SCM_RIGHTS on the same sendmsg.
func (c *Client) send(req Request, fds []int) error {
	line, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encode %s request: %w", req.Op, err)
	}
	line = append(line, '\n')
	if len(fds) == 0 {
		if _, err := c.conn.Write(line); err != nil {
			return fmt.Errorf("send %s request to %s: %w", req.Op, c.path, err)
		}
		return nil
	}
	raw, err := c.conn.SyscallConn()
	if err != nil {
		return fmt.Errorf("send %s request: %w", req.Op, err)
	}
	oob := unix.UnixRights(fds...)
	var n int
	var serr error
	werr := raw.Write(func(fd uintptr) bool {
		n, serr = unix.SendmsgN(int(fd), line, oob, nil, 0)
		return !errors.Is(serr, unix.EAGAIN)
	})
	if werr == nil {
		werr = serr
	}
	if werr != nil {
		return fmt.Errorf("send %s request with %d fds to %s: %w", req.Op, len(fds), c.path, werr)
	}
	if n < len(line) { // rest of the line, without the fds
		if _, err := c.conn.Write(line[n:]); err != nil {
			return fmt.Errorf("send %s request to %s: %w", req.Op, c.path, err)
		}
	}
	return nil
}

// recv reads one response line; a response with ok=false becomes an error
// carrying the daemon's message.
func (c *Client) recv(op string) (*Response, error) {
	var buf []byte
	for {
		chunk, err := c.r.ReadSlice('\n')
		buf = append(buf, chunk...)
		if err == nil {
			break
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			if len(buf) > maxResponse {
				return nil, fmt.Errorf("%s: response from daemon longer than %d bytes", op, maxResponse)
			}
			continue
		}
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%s: daemon at %s closed the connection", op, c.path)
		}
		return nil, fmt.Errorf("%s: read response from %s: %w", op, c.path, err)
	}
	var resp Response
	if err := json.Unmarshal(bytes.TrimSpace(buf), &resp); err != nil {
		return nil, fmt.Errorf("%s: malformed response from daemon: %w", op, err)
	}
	if !resp.OK {
		if resp.Error == "" {
			resp.Error = "daemon reported failure without a message"
		}
		return nil, errors.New(resp.Error)
	}
	return &resp, nil
}

// roundTrip sends req and reads its (first) response.
func (c *Client) roundTrip(req Request, fds []int) (*Response, error) {
	if err := c.send(req, fds); err != nil {
		return nil, err
	}
	return c.recv(req.Op)
}

// Ping checks the daemon answers and returns its pid and version.
func (c *Client) Ping() (pid int, version string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	resp, err := c.roundTrip(Request{Op: OpPing}, nil)
	if err != nil {
		return 0, "", err
	}
	return resp.PID, resp.Version, nil
}

// NodeName returns the name of the node the daemon runs on.
func (c *Client) NodeName() (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	resp, err := c.roundTrip(Request{Op: OpPing}, nil)
	if err != nil {
		return "", err
	}
	return resp.Node, nil
}

// Prepare snapshots the running process pid into a new seed named name
// (optional).
func (c *Client) Prepare(pid int, name string) (SeedInfo, error) {
	return c.PrepareWith(PrepareRequest{PID: pid, Name: name})
}

// PrepareRequest asks for a seed made from a running process.
type PrepareRequest struct {
	// PID is the process to prepare.
	PID int
	// Name is the seed's name (optional).
	Name string
	// Allow lists the peer nodes that may fetch the seed's descriptor and
	// pages; empty means every authenticated peer.
	Allow []string
	// TTL removes the seed this long after it was prepared (0: never).
	TTL time.Duration
	// Share lists the other local users who may fork the seed: "uid:N",
	// "gid:N", "user:NAME", "group:NAME" or "*" (see Request.Share).
	Share []string
}

// PrepareWith snapshots a running process into a new seed, with sharing
// and expiry options.
func (c *Client) PrepareWith(req PrepareRequest) (SeedInfo, error) {
	if req.TTL < 0 {
		return SeedInfo{}, fmt.Errorf("prepare: ttl must not be negative, got %v", req.TTL)
	}
	r := Request{Op: OpPrepare, PID: req.PID, Name: req.Name, Allow: req.Allow, Share: req.Share}
	if req.TTL > 0 {
		r.TTL = req.TTL.String()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	resp, err := c.roundTrip(r, nil)
	if err != nil {
		return SeedInfo{}, err
	}
	var s SeedInfo
	if err := json.Unmarshal(resp.Seed, &s); err != nil {
		return SeedInfo{}, fmt.Errorf("prepare: malformed seed in response: %w", err)
	}
	return s, nil
}

// ForkRequest asks for detached children of a seed.
type ForkRequest struct {
	// Seed is a seed id or name.
	Seed string
	// Count is the number of children; 0 means 1.
	Count int
	// Eager copies every present page before each child runs.
	Eager bool
	// Payload is JSON delivered to children of prepare-self seeds
	// (optional).
	Payload json.RawMessage
	// Node is the node the children are created on; empty means the
	// daemon's own node. Seed may be "NODE/SEED" for a seed prepared on
	// another node.
	Node string
	// Prefetch maps the seed's recorded working set into each child before
	// it runs.
	Prefetch bool
}

// Fork starts detached children of a seed: stdin is /dev/null, stdout and
// stderr go to a per-child log file on the daemon's host (ChildInfo.Log).
// If some children were started before a failure, they are returned along
// with the error.
func (c *Client) Fork(req ForkRequest) ([]ChildInfo, error) {
	if len(req.Payload) > 0 && !json.Valid(req.Payload) {
		return nil, fmt.Errorf("fork: payload is not valid JSON: %q", req.Payload)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	resp, err := c.roundTrip(Request{Op: OpFork, Seed: req.Seed, Count: req.Count, Eager: req.Eager, Payload: req.Payload,
		Node: req.Node, Prefetch: req.Prefetch}, nil)
	if err != nil {
		return nil, err
	}
	return resp.Children, nil
}

// ForkAttached starts one child of seed whose stdin, stdout and stderr are
// the given files (sent to the daemon with SCM_RIGHTS) and waits until it
// ends. If the connection closes first (for example the caller exits), the
// daemon kills the child.
func (c *Client) ForkAttached(seed string, eager bool, stdin, stdout, stderr *os.File, payload json.RawMessage) (ChildInfo, ExitInfo, error) {
	return c.ForkAttachedWith(ForkRequest{Seed: seed, Eager: eager, Payload: payload}, stdin, stdout, stderr)
}

// ForkAttachedWith is ForkAttached with every fork option (Count must be 0
// or 1, Node empty or the daemon's own node). If the daemon ends the child
// because its memory could not be served, the returned ExitInfo carries
// the reason in Error.
func (c *Client) ForkAttachedWith(req ForkRequest, stdin, stdout, stderr *os.File) (ChildInfo, ExitInfo, error) {
	payload := req.Payload
	if len(payload) > 0 && !json.Valid(payload) {
		return ChildInfo{}, ExitInfo{}, fmt.Errorf("fork: payload is not valid JSON: %q", payload)
	}
	if req.Count > 1 {
		return ChildInfo{}, ExitInfo{}, fmt.Errorf("fork: an attached fork starts one child, got count %d", req.Count)
	}
	files := [3]*os.File{stdin, stdout, stderr}
	fds := make([]int, 3)
	for i, f := range files {
		if f == nil {
			return ChildInfo{}, ExitInfo{}, fmt.Errorf("fork: stdio file %d is nil", i)
		}
		fds[i] = int(f.Fd())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	resp, err := c.roundTrip(Request{Op: OpFork, Seed: req.Seed, Count: 1, Eager: req.Eager, Stdio: true, Payload: payload,
		Node: req.Node, Prefetch: req.Prefetch}, fds)
	runtime.KeepAlive(files) // their fds must stay open until sent
	if err != nil {
		return ChildInfo{}, ExitInfo{}, err
	}
	if len(resp.Children) != 1 {
		return ChildInfo{}, ExitInfo{}, fmt.Errorf("fork: daemon returned %d children, want 1", len(resp.Children))
	}
	child := resp.Children[0]
	end, err := c.recv(OpFork)
	if err != nil {
		return child, ExitInfo{}, fmt.Errorf("fork: waiting for child %s: %w", child.ID, err)
	}
	if end.Exit == nil {
		return child, ExitInfo{}, fmt.Errorf("fork: daemon sent no exit status for child %s", child.ID)
	}
	return child, *end.Exit, nil
}

// Seeds lists the daemon's seeds.
func (c *Client) Seeds() ([]SeedInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	resp, err := c.roundTrip(Request{Op: OpSeeds}, nil)
	if err != nil {
		return nil, err
	}
	if resp.Seeds == nil {
		resp.Seeds = []SeedInfo{}
	}
	return resp.Seeds, nil
}

// PS lists the daemon's children, running and exited.
func (c *Client) PS() ([]ChildInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	resp, err := c.roundTrip(Request{Op: OpPS}, nil)
	if err != nil {
		return nil, err
	}
	if resp.Children == nil {
		resp.Children = []ChildInfo{}
	}
	return resp.Children, nil
}

// Remove removes a seed (by id or name) or a child (by id). With force, a
// seed's running children, or a running child, are killed first.
func (c *Client) Remove(id string, force bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, err := c.roundTrip(Request{Op: OpRm, ID: id, Force: force}, nil)
	return err
}

// RunRequest starts a process in a container (see `mitosis run`).
type RunRequest struct {
	Name   string
	Rootfs string   // image directory (absolute)
	Argv   []string // argv[0]: absolute path inside the image
	Env    []string // KEY=VALUE; empty: a minimal default
	Memory string   // e.g. "256M" ("" no limit)
	CPUs   float64  // 0: no limit
	Pids   int64    // 0: no limit
}

// Run starts a process in a container and returns its pid.
func (c *Client) Run(req RunRequest) (int, error) {
	resp, err := c.roundTrip(Request{Op: OpRun, Name: req.Name, Rootfs: req.Rootfs, Argv: req.Argv, Env: req.Env,
		Memory: req.Memory, CPUs: req.CPUs, Pids: req.Pids}, nil)
	if err != nil {
		return 0, err
	}
	return resp.PID, nil
}

// Call runs a function-runtime op (OpFnDeploy, OpFnRm, OpFnList,
// OpNodeStats, OpInvoke) with args encoded as JSON, decoding its result
// into out (if not nil).
func (c *Client) Call(op string, args, out any) error {
	var raw json.RawMessage
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("%s: encode args: %w", op, err)
		}
		raw = b
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	resp, err := c.roundTrip(Request{Op: op, Args: raw}, nil)
	if err != nil {
		return err
	}
	if out != nil {
		if err := json.Unmarshal(resp.Result, out); err != nil {
			return fmt.Errorf("%s: malformed result: %w", op, err)
		}
	}
	return nil
}

// Invoke runs one invocation of a function deployed on the daemon's node.
func (c *Client) Invoke(args InvokeArgs) (InvokeResult, error) {
	var r InvokeResult
	err := c.Call(OpInvoke, args, &r)
	return r, err
}
