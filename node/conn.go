package node

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/mitosis-fork/mitosis/client"
)

// incoming is one request line read from a connection (or the error that
// ended reading).
type incoming struct {
	line []byte
	fds  []int
	err  error
}

// conn is one client connection. Its requests are handled one at a time.
type conn struct {
	d    *Daemon
	c    *net.UnixConn
	in   chan incoming
	eof  chan struct{} // closed when the peer is gone (read failed)
	done chan struct{} // closed when the handler returns
	pid  int           // peer pid from SO_PEERCRED
	who  caller        // the peer's credentials, for access checks
}

func (d *Daemon) serveConn(uc *net.UnixConn) {
	cred, err := peerCred(uc)
	if err != nil {
		d.log.Warn("peer credentials", "err", err)
		writeLine(uc, errResp(fmt.Errorf("cannot read peer credentials: %w", err)))
		return
	}
	c := &conn{
		d:    d,
		c:    uc,
		in:   make(chan incoming),
		eof:  make(chan struct{}),
		done: make(chan struct{}),
		pid:  int(cred.Pid),
		who:  d.callerOf(cred.Uid, cred.Gid, int(cred.Pid)),
	}
	if !c.who.admin {
		// One local user must not exhaust the daemon's descriptors.
		d.mu.Lock()
		n := d.userConns[c.who.uid]
		if n < MaxUserConns {
			d.userConns[c.who.uid] = n + 1
		}
		d.mu.Unlock()
		if n >= MaxUserConns {
			d.log.Warn("refused connection", "uid", c.who.uid, "pid", c.pid, "open", n)
			c.reply(errResp(fmt.Errorf("too many connections: uid %d already has %d open to this daemon (at most %d); close some", c.who.uid, n, MaxUserConns)))
			return
		}
		defer func() {
			d.mu.Lock()
			if d.userConns[c.who.uid]--; d.userConns[c.who.uid] <= 0 {
				delete(d.userConns, c.who.uid)
			}
			d.mu.Unlock()
		}()
	}
	defer close(c.done)
	go c.readLoop()
	for m := range c.in {
		if m.err != nil {
			if errors.Is(m.err, errLineTooLong) {
				if !c.reply(errResp(m.err)) {
					return
				}
				continue
			}
			return // peer gone
		}
		if !c.handle(m) {
			return
		}
	}
}

// readLoop feeds c.in until the connection fails, then closes c.eof.
func (c *conn) readLoop() {
	r := newLineReader(c.c)
	defer r.close()
	defer close(c.in)
	for {
		line, fds, err := r.next()
		if err != nil && !errors.Is(err, errLineTooLong) {
			close(c.eof)
			return
		}
		select {
		case c.in <- incoming{line: line, fds: fds, err: err}:
		case <-c.done:
			closeFDs(fds)
			return
		}
	}
}

// MaxUserConns is how many connections one non-admin uid may hold open at
// once.
const MaxUserConns = 64

// replyTimeout bounds each response write: a client that stops reading
// loses its connection instead of holding a handler forever.
var replyTimeout = 10 * time.Second

// reply writes one response line; false if the connection is broken or
// the client did not take the line within replyTimeout.
func (c *conn) reply(v any) bool {
	_ = c.c.SetWriteDeadline(time.Now().Add(replyTimeout))
	return writeLine(c.c, v)
}

func writeLine(w interface{ Write([]byte) (int, error) }, v any) bool {
	b, err := json.Marshal(v)
	if err != nil {
		b, _ = json.Marshal(errResp(fmt.Errorf("encode response: %w", err)))
	}
	b = append(b, '\n')
	_, err = w.Write(b)
	return err == nil
}

func jsonUnmarshalLine(b []byte, v any) error {
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		b = b[:i]
	}
	return json.Unmarshal(b, v)
}

// errorResponse is a failure line.
type errorResponse struct {
	OK    bool   `json:"ok"`
	Error string `json:"error"`
}

func errResp(err error) errorResponse { return errorResponse{OK: false, Error: err.Error()} }

// okResponse is a bare success line.
type okResponse struct {
	OK bool `json:"ok"`
}

// handle serves one request; false ends the connection.
func (c *conn) handle(m incoming) bool {
	req, err := decodeRequest(m.line)
	if err != nil {
		closeFDs(m.fds)
		return c.reply(errResp(err))
	}
	if req.Op != client.OpFork || !req.Stdio {
		if len(m.fds) > 0 {
			closeFDs(m.fds)
			return c.reply(errResp(fmt.Errorf("%s: unexpected file descriptors attached (only fork with stdio takes 3)", req.Op)))
		}
	}
	d := c.d
	if err := c.d.handoverRefusal(req.Op); err != nil {
		closeFDs(m.fds)
		return c.reply(errResp(err))
	}
	switch req.Op {
	case client.OpRun, client.OpFnDeploy, client.OpFnRm:
		// These start processes as root or change what the node
		// serves to everyone.
		if !c.who.admin {
			return c.reply(errResp(errAdminOnly(req.Op, c.who)))
		}
	}
	switch req.Op {
	case client.OpPing:
		return c.reply(client.Response{OK: true, PID: os.Getpid(), Version: Version, Node: d.node})
	case client.OpSeeds:
		return c.reply(struct {
			OK    bool              `json:"ok"`
			Seeds []client.SeedInfo `json:"seeds"`
		}{true, d.seedInfos(c.who)})
	case client.OpPS:
		return c.reply(struct {
			OK       bool               `json:"ok"`
			Children []client.ChildInfo `json:"children"`
		}{true, d.childInfos(c.who)})
	case client.OpPrepare:
		po, err := parsePrepareOpts(req)
		if err != nil {
			return c.reply(errResp(err))
		}
		if err := mayPtrace(c.who, req.PID); err != nil {
			return c.reply(errResp(err))
		}
		po.owner = c.who.uid
		info, err := d.prepare(req.PID, req.Name, -1, po)
		if err != nil {
			return c.reply(errResp(err))
		}
		return c.reply(struct {
			OK   bool            `json:"ok"`
			Seed client.SeedInfo `json:"seed"`
		}{true, info})
	case client.OpPrepareSelf:
		po, err := parsePrepareOpts(req)
		if err != nil {
			return c.reply(errResp(err))
		}
		if err := mayPtrace(c.who, c.pid); err != nil {
			return c.reply(errResp(err))
		}
		po.owner = c.who.uid
		info, err := d.prepare(c.pid, req.Name, *req.FD, po)
		if err != nil {
			return c.reply(errResp(err))
		}
		return c.reply(roleReply{OK: true, Role: client.RoleParent, Seed: info.ID})
	case client.OpRun:
		pid, err := d.run(req)
		if err != nil {
			return c.reply(errResp(err))
		}
		return c.reply(client.Response{OK: true, PID: pid})
	case client.OpFnDeploy, client.OpFnRm, client.OpFnList, client.OpNodeStats:
		v, err := d.fn.call(d.ctx, req.Op, req.Args)
		if err != nil {
			return c.reply(errResp(err))
		}
		return c.reply(resultReply{OK: true, Result: v})
	case client.OpInvoke:
		r, err := d.invokeLocal(req.Args)
		if err != nil {
			return c.reply(errResp(err))
		}
		return c.reply(resultReply{OK: true, Result: r})
	case client.OpRm:
		if err := d.authorizeRemove(c.who, req.ID); err != nil {
			return c.reply(errResp(err))
		}
		if err := d.remove(req.ID, req.Force); err != nil {
			return c.reply(errResp(err))
		}
		return c.reply(okResponse{OK: true})
	case client.OpFork:
		if err := d.authorizeFork(c.who, &req); err != nil {
			closeFDs(m.fds)
			return c.reply(errResp(err))
		}
		if req.Node != "" && req.Node != d.node {
			if req.Stdio {
				closeFDs(m.fds)
				return c.reply(errResp(fmt.Errorf("fork: an attached child runs on the daemon's own node (%s), not on %s; fork detached (--detach or --count N) with --node %s", d.node, req.Node, req.Node)))
			}
			if req.Prefetch {
				return c.reply(errResp(fmt.Errorf("fork: --prefetch is not carried to another node (the peer fork request has no such field); run `mitosis fork --prefetch` against node %s's daemon instead", req.Node)))
			}
			return c.forkRemote(req)
		}
		if req.Stdio {
			return c.forkAttached(req, m.fds)
		}
		kids, err := d.fork(withOwner(d.ctx, c.who.uid), req, [3]*os.File{}, false)
		infos := make([]client.ChildInfo, 0, len(kids))
		for _, k := range kids {
			infos = append(infos, d.childInfo(k))
		}
		if err != nil {
			if len(kids) > 0 {
				err = fmt.Errorf("%w (%d of %d children were started and keep running, see `mitosis ps`)", err, len(kids), req.Count)
			}
			return c.reply(struct {
				OK       bool               `json:"ok"`
				Error    string             `json:"error"`
				Children []client.ChildInfo `json:"children,omitempty"`
			}{false, err.Error(), infos})
		}
		return c.reply(childrenReply{OK: true, Children: infos})
	}
	return c.reply(errResp(fmt.Errorf("unknown op %q", req.Op)))
}

// roleReply is the prepare-self reply line, to the parent or to a child.
// payload comes last so minimal parsers can take the rest of the line.
type roleReply struct {
	OK      bool            `json:"ok"`
	Role    string          `json:"role"`
	Seed    string          `json:"seed"`
	Child   string          `json:"child,omitempty"`
	Payload json.RawMessage `json:"payload,omitempty"`
}

// resultReply carries the answer of a function-runtime op.
type resultReply struct {
	OK     bool `json:"ok"`
	Result any  `json:"result"`
}

type childrenReply struct {
	OK       bool               `json:"ok"`
	Children []client.ChildInfo `json:"children"`
}

type exitReply struct {
	OK   bool            `json:"ok"`
	Exit client.ExitInfo `json:"exit"`
}

// forkAttached forks one child on the client's stdio, replies with it, then
// waits for it to end and sends the exit line. If the client goes away
// first, the child is killed.
func (c *conn) forkAttached(req client.Request, fds []int) bool {
	if len(fds) != 3 {
		closeFDs(fds)
		return c.reply(errResp(fmt.Errorf("fork: stdio needs exactly 3 file descriptors attached with SCM_RIGHTS (stdin, stdout, stderr), got %d", len(fds))))
	}
	stdio := [3]*os.File{
		os.NewFile(uintptr(fds[0]), "stdin"),
		os.NewFile(uintptr(fds[1]), "stdout"),
		os.NewFile(uintptr(fds[2]), "stderr"),
	}
	kids, err := c.d.fork(withOwner(c.d.ctx, c.who.uid), req, stdio, true)
	for _, f := range stdio {
		_ = f.Close()
	}
	if err != nil {
		return c.reply(errResp(err))
	}
	k := kids[0]
	ok := c.reply(childrenReply{OK: true, Children: []client.ChildInfo{c.d.childInfo(k)}})
	select {
	case <-k.exited:
	case <-c.eof:
		c.d.log.Info("client gone, killing attached child", "child", k.id, "pid", k.child.PID)
		c.d.killChild(k)
		<-k.exited
		return false
	}
	if !ok {
		return false
	}
	return c.reply(exitReply{OK: true, Exit: k.exit})
}

// forkRemote forwards a fork to another node and replies with the children
// created there (detached; their logs are on that node).
func (c *conn) forkRemote(req client.Request) bool {
	d := c.d
	kids, err := d.forwardFork(d.ctx, req.Node, req)
	origin, _ := splitSeedRef(req.Seed)
	if origin == "" {
		origin = d.node
	}
	source := origin
	if origin == req.Node {
		source = client.SourceLocal
	}
	infos := make([]client.ChildInfo, 0, len(kids))
	for _, k := range kids {
		infos = append(infos, client.ChildInfo{ID: k.id, Seed: req.Seed, PID: k.pid, State: client.StateRunning,
			StartMS: k.startMS, Source: source, Node: req.Node, Created: time.Now()})
	}
	if err != nil {
		if len(kids) > 0 {
			err = fmt.Errorf("%w (%d of %d children were started on node %s and keep running)", err, len(kids), req.Count, req.Node)
		}
		return c.reply(struct {
			OK       bool               `json:"ok"`
			Error    string             `json:"error"`
			Children []client.ChildInfo `json:"children,omitempty"`
		}{false, err.Error(), infos})
	}
	return c.reply(childrenReply{OK: true, Children: infos})
}
