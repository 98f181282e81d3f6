package node

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/engine"
)

// A daemon restart that loses nothing: the stopping daemon (SIGTERM, see
// Handover) gives up its socket at once but keeps its seeds and running
// children while it waits for a successor on STATE_DIR/handover.sock. A
// daemon started on the same state directory (New) connects there and
// adopts the seeds: the old daemon detaches each frozen copy leaving it
// stopped (engine.Release), the new one seizes it (engine.Adopt) and
// serves forks of it under the same id. The old daemon keeps serving the
// pages of the children it forked until they end, reporting each exit to
// the new one (which lists them in ps), and then exits.
//
// Children are tied to the daemon that forked them (PR_SET_PDEATHSIG and
// their userfaultfds): they cannot move to another process without the
// risk of reading missing memory as zero, so they finish where they
// started. A SIGKILLed daemon therefore takes its children and frozen
// copies with it; the next daemon reaps what the killed one left (see
// sweepFrozen).
//
// Not handed over: seeds imported from other nodes (the successor fetches
// them again on demand), seeds of function deployments (the function
// runtime stops with the old daemon; the gateway initializes them again),
// seeds of `mitosis run` containers with limits, and seeds prepared from
// a child of the old daemon (multi-hop: their frozen copy pages through
// the old daemon). Those end with the old daemon.

// handoverFile is the rendezvous socket in the state directory.
const handoverFile = "handover.sock"

// handoverReplyTimeout bounds each step of the handover conversation.
const handoverReplyTimeout = 30 * time.Second

// handoverSeed is one seed as handed over.
type handoverSeed struct {
	ID         string           `json:"id"`
	Name       string           `json:"name,omitempty"`
	Desc       []byte           `json:"desc"`
	SourcePID  int              `json:"source_pid"`
	ParentPID  int              `json:"parent_pid"`
	Created    time.Time        `json:"created"`
	Took       time.Duration    `json:"took"`
	Self       bool             `json:"self,omitempty"`
	Owner      uint32           `json:"owner"`
	Share      []string         `json:"share,omitempty"`
	Allow      []string         `json:"allow,omitempty"`
	Leases     map[string]int   `json:"leases,omitempty"`
	Expires    time.Time        `json:"expires,omitzero"`
	WorkingSet []descriptor.Run `json:"working_set,omitempty"`
}

// handoverChild is a child still running under the old daemon.
type handoverChild struct {
	ID       string        `json:"id"`
	Seed     string        `json:"seed"`
	PID      int           `json:"pid"`
	Created  time.Time     `json:"created"`
	Took     time.Duration `json:"took"`
	Log      string        `json:"log,omitempty"`
	Owner    uint32        `json:"owner"`
	Attached bool          `json:"attached,omitempty"`
}

// handoverExit reports how a handed-over child ended.
type handoverExit struct {
	Child string            `json:"child"`
	Exit  client.ExitInfo   `json:"exit"`
	Stats engine.ChildStats `json:"stats"`
	Error string            `json:"error,omitempty"`
	OOM   bool              `json:"oom,omitempty"`
}

// handoverMsg is one line of the handover conversation:
//
//	new -> old  {"op":"adopt","pid":N}
//	old -> new  {"op":"state","seeds":[...],"children":[...]}
//	new -> old  {"op":"adopted","adopted":[ids],"failed":{id:error}}
//	old -> new  {"op":"exit","exit":{...}} for each child, then {"op":"done"}
type handoverMsg struct {
	Op       string            `json:"op"`
	PID      int               `json:"pid,omitempty"`
	Seeds    []handoverSeed    `json:"seeds,omitempty"`
	Children []handoverChild   `json:"children,omitempty"`
	Adopted  []string          `json:"adopted,omitempty"`
	Failed   map[string]string `json:"failed,omitempty"`
	Exit     *handoverExit     `json:"exit,omitempty"`
}

// prevChild is what a daemon knows of a child its predecessor forked and
// still serves (childRec.prev).
type prevChild struct {
	pid     int
	took    time.Duration
	started time.Time
	daemon  int // the predecessor's pid
}

// handoverConn is a JSON-lines connection with a lock for writers.
type handoverConn struct {
	c  *net.UnixConn
	r  *bufio.Reader
	mu sync.Mutex
}

func newHandoverConn(c *net.UnixConn) *handoverConn {
	return &handoverConn{c: c, r: bufio.NewReaderSize(c, 64<<10)}
}

func (h *handoverConn) send(m handoverMsg) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	_ = h.c.SetWriteDeadline(time.Now().Add(handoverReplyTimeout))
	_, err = h.c.Write(append(b, '\n'))
	return err
}

// recv reads one message; timeout 0 waits forever.
func (h *handoverConn) recv(timeout time.Duration) (handoverMsg, error) {
	var m handoverMsg
	if timeout > 0 {
		_ = h.c.SetReadDeadline(time.Now().Add(timeout))
	} else {
		_ = h.c.SetReadDeadline(time.Time{})
	}
	line, err := h.r.ReadBytes('\n')
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(line, &m); err != nil {
		return m, fmt.Errorf("malformed handover message: %w", err)
	}
	return m, nil
}

// trustedPeer checks that the other end of c is root or the daemon's user.
func (d *Daemon) trustedPeer(c *net.UnixConn) error {
	cred, err := peerCred(c)
	if err != nil {
		return err
	}
	if cred.Uid != 0 && int(cred.Uid) != d.uid {
		return fmt.Errorf("peer uid %d is neither root nor the daemon's uid %d", cred.Uid, d.uid)
	}
	return nil
}

func (d *Daemon) handoverPath() string { return filepath.Join(d.cfg.StateDir, handoverFile) }

// Handover stops the daemon so that a successor loses nothing (see the
// comment at the top of this file). It releases the socket, the pid file,
// the peer port, the metrics port and the directory membership at once,
// stops the function runtime, and waits up to Config.HandoverTimeout for a
// daemon started on the same state directory. Without one (or with
// nothing to hand over, or HandoverTimeout 0) it stops as Close does. With
// one, it hands its seeds over, keeps serving the children it forked until
// they end, and returns. Cancelling ctx (a second signal) ends the wait,
// or the draining: running children are then killed as by Close.
func (d *Daemon) Handover(ctx context.Context) error {
	wait := d.cfg.HandoverTimeout
	if wait <= 0 || !d.hasHandoverWork() {
		return d.Close()
	}
	start := time.Now()
	d.draining.Store(true)
	d.closeListener()
	_ = os.Remove(d.pidFile)
	d.leaveDirectory()
	d.fn.closeAll()
	d.closePeerServer()
	d.closeMetrics()
	path := d.handoverPath()
	_ = os.Remove(path)
	hl, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		d.log.Error("handover: cannot listen; stopping", "path", path, "err", err)
		return d.Close()
	}
	_ = os.Chmod(path, 0o600)
	d.log.Info("handover: waiting for a successor; start `mitosis daemon` on the same --state-dir", "path", path, "timeout", wait)
	conn, err := acceptWithin(ctx, hl, wait)
	_ = hl.Close()
	_ = os.Remove(path)
	if err != nil {
		d.log.Warn("handover: no successor; stopping", "err", err)
		return d.Close()
	}
	h := newHandoverConn(conn)
	n, err := d.handTo(h)
	if err != nil {
		d.log.Error("handover failed; stopping", "err", err)
		_ = conn.Close()
		return d.Close()
	}
	d.mu.Lock()
	d.successor = h
	d.handedOver = true
	d.mu.Unlock()
	d.log.Info("handover: seeds handed over; serving the running children until they end", "seeds", n, "children", len(d.runningChildren()), "took", time.Since(start))
	d.drain(ctx)
	err = d.Close()
	_ = h.send(handoverMsg{Op: "done"})
	_ = conn.Close()
	return err
}

// hasHandoverWork reports whether there are seeds or running children a
// successor should not lose.
func (d *Daemon) hasHandoverWork() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.seeds {
		if d.handableLocked(s) {
			return true
		}
	}
	for _, k := range d.children {
		if k != nil && !k.invoke && !k.hasExited() {
			return true
		}
	}
	return false
}

// handableLocked reports whether seed s can be handed over. d.mu held.
func (d *Daemon) handableLocked(s *seedRec) bool {
	if s.origin != "" || s.removing || s.pool != nil || s.seed.SourcePID == 0 || d.fn.ownsSeed(s) {
		return false
	}
	for _, k := range d.children {
		if k != nil && k.child != nil && k.child.PID == s.seed.ParentPID {
			return false // multi-hop: prepared from one of our children
		}
	}
	return true
}

// acceptWithin accepts one trusted connection on l within wait.
func acceptWithin(ctx context.Context, l *net.UnixListener, wait time.Duration) (*net.UnixConn, error) {
	deadline := time.Now().Add(wait)
	for {
		if err := ctx.Err(); err != nil {
			return nil, errors.New("stopped by a second signal")
		}
		step := min(time.Until(deadline), 200*time.Millisecond)
		if step <= 0 {
			return nil, fmt.Errorf("none within %v", wait)
		}
		_ = l.SetDeadline(time.Now().Add(step))
		c, err := l.AcceptUnix()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return nil, err
		}
		return c, nil
	}
}

// handTo runs the old daemon's side of the conversation and returns how
// many seeds the successor adopted.
func (d *Daemon) handTo(h *handoverConn) (int, error) {
	if err := d.trustedPeer(h.c); err != nil {
		return 0, err
	}
	m, err := h.recv(handoverReplyTimeout)
	if err != nil || m.Op != "adopt" {
		return 0, fmt.Errorf("successor's request: op %q, %v", m.Op, err)
	}
	d.mu.Lock()
	var cands []*seedRec
	for _, s := range d.seeds {
		if d.handableLocked(s) {
			s.removing = true // no fork or rm from here on
			cands = append(cands, s)
		}
	}
	var kids []handoverChild
	for _, id := range d.order {
		k := d.children[id]
		if k == nil || k.child == nil || k.invoke || k.hasExited() {
			continue
		}
		kids = append(kids, handoverChild{ID: k.id, Seed: k.seed.id, PID: k.child.PID, Created: k.child.Started,
			Took: k.child.Took, Log: k.logPath, Owner: k.owner, Attached: k.attached})
	}
	d.mu.Unlock()
	var seeds []handoverSeed
	released := map[string]*seedRec{}
	for _, s := range cands {
		if err := d.eng.Release(s.seed); err != nil {
			d.log.Warn("handover: keeping seed", "seed", s.id, "err", err)
			d.mu.Lock()
			s.removing = false
			d.mu.Unlock()
			continue
		}
		d.mu.Lock()
		hs := handoverSeed{ID: s.id, Name: s.name, Desc: descriptor.Encode(nil, s.seed.Desc),
			SourcePID: s.seed.SourcePID, ParentPID: s.seed.ParentPID, Created: s.seed.Created, Took: s.seed.Took,
			Self: s.self, Owner: s.owner, Share: s.share.strings(), Allow: s.allow, Expires: s.expires}
		if len(s.leases) > 0 {
			hs.Leases = map[string]int{}
			for n, c := range s.leases {
				hs.Leases[n] = c
			}
		}
		d.mu.Unlock()
		hs.WorkingSet = s.seed.WorkingSet()
		seeds = append(seeds, hs)
		released[s.id] = s
	}
	// From here on a failure leaves released frozen copies nobody traces:
	// end them.
	drop := func(s *seedRec, why string) {
		delete(released, s.id)
		d.log.Warn("handover: seed not adopted; removing it", "seed", s.id, "why", why)
		if err := d.eng.KillReleased(s.seed); err != nil {
			d.log.Warn("handover: end frozen copy", "seed", s.id, "err", err)
		}
		d.mu.Lock()
		delete(d.seeds, s.id)
		d.mu.Unlock()
	}
	dropRest := func(why string) {
		for _, s := range released {
			drop(s, why)
		}
	}
	if err := h.send(handoverMsg{Op: "state", Seeds: seeds, Children: kids}); err != nil {
		dropRest(err.Error())
		return 0, fmt.Errorf("send state: %w", err)
	}
	m, err = h.recv(handoverReplyTimeout)
	if err != nil || m.Op != "adopted" {
		dropRest(fmt.Sprintf("no answer from the successor: %v", err))
		return 0, fmt.Errorf("successor's answer: op %q, %v", m.Op, err)
	}
	for id, why := range m.Failed {
		if s := released[id]; s != nil {
			drop(s, "the successor could not adopt it: "+why)
		}
	}
	n := 0
	for _, id := range m.Adopted {
		if released[id] != nil {
			delete(released, id)
			n++
			d.mu.Lock()
			delete(d.seeds, id) // the successor's now; our children keep the record
			d.mu.Unlock()
		}
	}
	dropRest("the successor did not answer for it")
	return n, nil
}

// drain waits until every child this daemon forked has ended (their
// exits go to the successor, see reportExit), or ctx is cancelled.
func (d *Daemon) drain(ctx context.Context) {
	for {
		running := d.runningChildren()
		if len(running) == 0 {
			return
		}
		select {
		case <-running[0].exited:
		case <-ctx.Done():
			d.log.Warn("handover: stopped while children were running; killing them", "children", len(running))
			return
		}
	}
}

// reportExit tells the successor, if any, how child k ended.
func (d *Daemon) reportExit(k *childRec) {
	if !d.draining.Load() {
		return // no successor (the common case: every exit passes here)
	}
	d.mu.Lock()
	h := d.successor
	ex := handoverExit{Child: k.id, Exit: k.exit, Stats: k.stats, OOM: k.oom}
	if k.err != nil {
		ex.Error = k.err.Error()
	}
	d.mu.Unlock()
	if h != nil {
		_ = h.send(handoverMsg{Op: "exit", Exit: &ex})
	}
}

// adoptPredecessor runs the new daemon's side: if a stopping daemon waits
// on the state directory's handover socket, take its seeds and the records
// of its running children. A stale socket is removed. Errors are logged:
// the daemon starts without them.
func (d *Daemon) adoptPredecessor() {
	path := d.handoverPath()
	if _, err := os.Lstat(path); err != nil {
		return
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		d.log.Info("handover: removing a stale handover socket", "path", path, "err", err)
		_ = os.Remove(path)
		return
	}
	conn := c.(*net.UnixConn)
	h := newHandoverConn(conn)
	fail := func(err error) {
		d.log.Error("handover: could not adopt the predecessor's seeds", "err", err)
		_ = conn.Close()
	}
	if err := d.trustedPeer(conn); err != nil {
		fail(err)
		return
	}
	cred, _ := peerCred(conn)
	prevPID := 0
	if cred != nil {
		prevPID = int(cred.Pid)
	}
	if err := h.send(handoverMsg{Op: "adopt", PID: os.Getpid()}); err != nil {
		fail(err)
		return
	}
	m, err := h.recv(handoverReplyTimeout)
	if err != nil || m.Op != "state" {
		fail(fmt.Errorf("predecessor's state: op %q, %v", m.Op, err))
		return
	}
	reply := handoverMsg{Op: "adopted", Failed: map[string]string{}}
	for _, hs := range m.Seeds {
		rec, err := d.adoptSeed(hs)
		if err != nil {
			reply.Failed[hs.ID] = err.Error()
			d.log.Warn("handover: seed not adopted", "seed", hs.ID, "err", err)
			continue
		}
		reply.Adopted = append(reply.Adopted, rec.id)
	}
	d.mu.Lock()
	for _, hc := range m.Children {
		s := d.seeds[hc.Seed]
		if s == nil {
			// Its seed stayed with the predecessor (not handable):
			// keep a record anyway so ps shows it.
			s = tombstone(&seedRec{id: hc.Seed})
		}
		if _, dup := d.children[hc.ID]; dup {
			continue
		}
		d.children[hc.ID] = &childRec{id: hc.ID, seed: s, logPath: hc.Log, attached: hc.Attached, owner: hc.Owner,
			exited: make(chan struct{}), prev: &prevChild{pid: hc.PID, took: hc.Took, started: hc.Created, daemon: prevPID}}
		d.order = append(d.order, hc.ID)
	}
	d.mu.Unlock()
	if err := h.send(reply); err != nil {
		fail(err)
		return
	}
	d.log.Info("handover: adopted the predecessor's seeds", "from_pid", prevPID, "seeds", len(reply.Adopted),
		"failed", len(reply.Failed), "children_still_running_there", len(m.Children))
	go d.followPredecessor(h, prevPID)
}

// adoptSeed registers a handed-over seed under its id.
func (d *Daemon) adoptSeed(hs handoverSeed) (*seedRec, error) {
	desc, err := descriptor.Decode(hs.Desc)
	if err != nil {
		return nil, err
	}
	share, err := parseShare("adopt", hs.Share)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	_, dup := d.seeds[hs.ID]
	d.mu.Unlock()
	if dup {
		return nil, fmt.Errorf("seed id %s is taken", hs.ID)
	}
	s, err := d.eng.Adopt(engine.Adopted{ID: hs.ID, Name: hs.Name, Desc: desc, SourcePID: hs.SourcePID,
		ParentPID: hs.ParentPID, Created: hs.Created, Took: hs.Took, WorkingSet: hs.WorkingSet})
	if err != nil {
		return nil, err
	}
	rec := &seedRec{id: hs.ID, name: hs.Name, seed: s, self: hs.Self, owner: hs.Owner, share: share,
		allow: hs.Allow, expires: hs.Expires}
	if len(hs.Leases) > 0 {
		rec.leases = map[string]int{}
		for n, c := range hs.Leases {
			rec.leases[n] = c
		}
	}
	d.mu.Lock()
	d.seeds[rec.id] = rec
	d.mu.Unlock()
	d.recordFrozen()
	if !rec.expires.IsZero() {
		time.AfterFunc(time.Until(rec.expires), func() { d.expire(rec) })
	}
	return rec, nil
}

// followPredecessor records the exits the predecessor reports until it is
// done. Children it never reported (it was killed) are marked failed once
// their process is gone.
func (d *Daemon) followPredecessor(h *handoverConn, prevPID int) {
	defer h.c.Close()
	for {
		m, err := h.recv(0)
		if err != nil || m.Op == "done" {
			break
		}
		if m.Op != "exit" || m.Exit == nil {
			continue
		}
		d.mu.Lock()
		k := d.children[m.Exit.Child]
		if k == nil || k.prev == nil || k.hasExited() {
			d.mu.Unlock()
			continue
		}
		k.exit, k.stats, k.oom, k.ended = m.Exit.Exit, m.Exit.Stats, m.Exit.OOM, time.Now()
		if m.Exit.Error != "" {
			k.err = errors.New(m.Exit.Error)
		}
		close(k.exited)
		d.mu.Unlock()
		d.trimHistory()
	}
	d.mu.Lock()
	var lost []*childRec
	for _, k := range d.children {
		if k != nil && k.prev != nil && !k.hasExited() {
			lost = append(lost, k)
		}
	}
	d.mu.Unlock()
	for _, k := range lost {
		// The predecessor is gone, and with it (PR_SET_PDEATHSIG) the
		// child: wait for the process to disappear.
		for i := 0; i < 100 && unix.Kill(k.prev.pid, 0) == nil; i++ {
			time.Sleep(20 * time.Millisecond)
		}
		d.mu.Lock()
		k.exit = client.ExitInfo{Code: -1, Signal: int(unix.SIGKILL)}
		k.err = fmt.Errorf("the previous daemon (pid %d) ended before reporting this child's exit", prevPID)
		k.ended = time.Now()
		close(k.exited)
		d.mu.Unlock()
	}
}

// handoverRefusal is the error for a request of op while the daemon hands
// over to a successor (nil otherwise, and for ping, ps and seeds, which
// still answer).
func (d *Daemon) handoverRefusal(op string) error {
	if !d.draining.Load() || slices.Contains([]string{client.OpPing, client.OpPS, client.OpSeeds}, op) {
		return nil
	}
	return fmt.Errorf("%s: this daemon is stopping and hands its seeds to the next `mitosis daemon` started on its --state-dir; run the command again once that one is up", op)
}

// frozenFile records the frozen copies this daemon owns, one
// "SOURCE_PID PARENT_PID VDSO_SYSCALL" line each, so that the next daemon
// can reap what a killed one left (sweepFrozen).
const frozenFile = "frozen"

// recordFrozen rewrites the record of the frozen copies from d.seeds.
// A daemon handing over leaves the file to its successor.
func (d *Daemon) recordFrozen() {
	if d.draining.Load() {
		return
	}
	d.mu.Lock()
	var b []byte
	for _, s := range d.seeds {
		if s.origin == "" && s.seed != nil && s.seed.SourcePID > 0 && s.seed.Desc != nil {
			b = fmt.Appendf(b, "%d %d %d\n", s.seed.SourcePID, s.seed.ParentPID, s.seed.Desc.VDSOSyscall)
		}
	}
	d.mu.Unlock()
	path := filepath.Join(d.cfg.StateDir, frozenFile)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err == nil {
		_ = os.Rename(tmp, path)
	}
}

// sweepFrozen ends the frozen copies a killed predecessor left: each one
// in the record that is not a seed of this daemon and is a zombie (its
// tracer died: PTRACE_O_EXITKILL killed it) or a stopped untraced process
// (a handover whose successor died) is killed and reaped in its parent.
func (d *Daemon) sweepFrozen() {
	b, err := os.ReadFile(filepath.Join(d.cfg.StateDir, frozenFile))
	if err != nil {
		return
	}
	d.mu.Lock()
	ours := map[int]bool{}
	for _, s := range d.seeds {
		if s.seed != nil {
			ours[s.seed.SourcePID] = true
		}
	}
	d.mu.Unlock()
	for _, line := range strings.Split(string(b), "\n") {
		var src, parent int
		var vdso uint64
		if n, _ := fmt.Sscanf(line, "%d %d %d", &src, &parent, &vdso); n != 3 || ours[src] {
			continue
		}
		if err := d.eng.EndOrphan(src, parent, vdso); err != nil {
			d.log.Warn("start: frozen copy left by a previous daemon", "pid", src, "parent", parent, "err", err)
		} else {
			d.log.Info("start: ended a frozen copy left by a previous daemon", "pid", src, "parent", parent)
		}
	}
	d.recordFrozen()
}
