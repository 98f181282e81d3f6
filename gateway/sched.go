package gateway

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/directory"
)

// Placement: every invocation takes a slot on one node, chosen among the
// live nodes (the directory's view, minus nodes this gateway saw fail in
// the last downFor) with a free slot and room for the instance's memory
// reservation: the least loaded, i.e. the fewest invocations in flight
// from this gateway relative to the node's concurrency, ties broken at
// random. Keep-alive invocations prefer nodes where this gateway left idle
// warm instances of the function. When no node has a free slot the
// invocation waits in one FIFO queue (bounded; full: 429) until a slot
// frees.
//
// Memory: a node registers the memory its function instances may reserve
// (Capacity.MemoryBytes); each instance reserves its function's memory
// limit (node.Reservation) while it runs, and a stage seed's instance until
// the stage seed is removed. The gateway counts what its own invocations
// and stage seeds reserve, so a burst of big instances queues here rather
// than being refused by nodes short of memory and retried elsewhere (what
// other gateways place there still meets the node's own refusal). An
// instance larger than every node's memory is refused at once.

// errQueueFull is returned when the wait queue is full.
var errQueueFull = errors.New("every node is at capacity and the queue is full")

// errTooBig is returned for an instance no node has the memory for.
var errTooBig = errors.New("no node has the memory for one instance")

// errNoNodes is returned when the directory lists no live node.
var errNoNodes = errors.New("no live node in the cluster directory")

// downFor is how long a node this gateway could not reach is left out of
// placement (its directory entry expires within its lease TTL anyway).
const downFor = 5 * time.Second

// slot is one invocation's place on a node.
type slot struct {
	node *nodeState
}

type nodeState struct {
	// name and peer are the node's name and peer address, fixed for the
	// state's life (a node that restarts gets a new state): read them
	// without s.mu. info, which the directory rewrites every second, is
	// read under s.mu only.
	name, peer string
	info       directory.NodeInfo
	inflight   int
	reserved   int64               // memory this gateway's invocations and stage seeds reserve
	stages     map[string]stageRes // stage seed (NODE/SEED) -> what its instance keeps reserved
	downUntil  time.Time
	gone       bool           // no longer in the directory
	successor  *nodeState     // the state of the same node restarted, which took over its in-flight counts
	idle       map[string]int // function -> idle warm instances believed there
}

// stageRes is a stage seed's reservation on its node.
type stageRes struct {
	fn  string
	mem int64
}

// fits reports whether mem more bytes may be reserved on n (always, for a
// node that registered no memory capacity).
func (n *nodeState) fits(mem int64) bool {
	c := int64(n.info.Capacity.MemoryBytes)
	return c <= 0 || n.reserved+mem <= c
}

// capacity is the node's concurrency limit as it registered it.
func (n *nodeState) capacity() int {
	if n.info.Capacity.Concurrency > 0 {
		return n.info.Capacity.Concurrency
	}
	return 32
}

type waiter struct {
	fn   string
	mem  int64
	ch   chan *nodeState // receives the node whose slot it got
	done bool            // given a slot or abandoned
}

type sched struct {
	maxQueue int

	mu      sync.Mutex
	nodes   map[string]*nodeState
	waiters []*waiter
	changed chan struct{} // closed on every change of the node set
}

func newSched(maxQueue int) *sched {
	return &sched{maxQueue: maxQueue, nodes: map[string]*nodeState{}, changed: make(chan struct{})}
}

// nodeChange is a change setNodes made to the node set, for the log.
type nodeChange struct {
	node, what string // what: "joined", "restarted" or "left"
}

// setNodes replaces the node set with the directory's and returns what
// changed.
func (s *sched) setNodes(infos []directory.NodeInfo) []nodeChange {
	s.mu.Lock()
	defer s.mu.Unlock()
	var changes []nodeChange
	seen := map[string]bool{}
	for _, in := range infos {
		seen[in.Name] = true
		n := s.nodes[in.Name]
		if n == nil || !n.info.Started.Equal(in.Started) {
			what := "joined"
			if n != nil {
				what = "restarted"
			}
			changes = append(changes, nodeChange{in.Name, what})
			// New node, or the same name restarted: nothing of ours
			// is deployed there any more.
			old := n
			// Stage seeds did not survive a restart; the invocations
			// in flight still hold their slots and memory.
			n = &nodeState{name: in.Name, peer: in.PeerAddr, idle: map[string]int{}, stages: map[string]stageRes{}}
			if old != nil {
				n.inflight = old.inflight
				n.reserved = old.reserved
				for _, st := range old.stages {
					n.reserved -= st.mem
				}
				old.gone = true
				old.successor = n
			}
			s.nodes[in.Name] = n
		}
		n.info = in
	}
	for name, n := range s.nodes {
		if !seen[name] {
			n.gone = true
			delete(s.nodes, name)
			changes = append(changes, nodeChange{name, "left"})
		}
	}
	close(s.changed)
	s.changed = make(chan struct{})
	s.dispatchLocked()
	return changes
}

// live lists the usable nodes. s.mu must be held.
func (s *sched) liveLocked(now time.Time) []*nodeState {
	out := make([]*nodeState, 0, len(s.nodes))
	for _, n := range s.nodes {
		if now.After(n.downUntil) {
			out = append(out, n)
		}
	}
	return out
}

// pickLocked chooses a node with a free slot and mem bytes of memory for
// fn, or nil. s.mu must be held.
func (s *sched) pickLocked(fn string, mem int64, avoid map[string]bool) *nodeState {
	var best []*nodeState
	bestIdle, bestLoad := 0, 2.0
	for _, n := range s.liveLocked(time.Now()) {
		if avoid[n.info.Name] || n.inflight >= n.capacity() || !n.fits(mem) {
			continue
		}
		idle := min(n.idle[fn], 1)
		load := float64(n.inflight) / float64(n.capacity())
		switch {
		case idle > bestIdle, idle == bestIdle && load < bestLoad:
			best, bestIdle, bestLoad = []*nodeState{n}, idle, load
		case idle == bestIdle && load == bestLoad:
			best = append(best, n)
		}
	}
	if len(best) == 0 {
		return nil
	}
	return best[rand.IntN(len(best))]
}

// acquire takes a slot and mem bytes of memory for an invocation of fn,
// waiting in the queue while no node has both. queued reports how long it
// waited.
func (s *sched) acquire(ctx context.Context, fn string, mem int64, avoid map[string]bool) (n *nodeState, queued time.Duration, err error) {
	s.mu.Lock()
	live := s.liveLocked(time.Now())
	if len(live) == 0 {
		s.mu.Unlock()
		return nil, 0, errNoNodes
	}
	fits, most := false, int64(0)
	for _, n := range live {
		c := int64(n.info.Capacity.MemoryBytes)
		fits = fits || c <= 0 || c >= mem
		most = max(most, c)
	}
	if !fits {
		s.mu.Unlock()
		return nil, 0, fmt.Errorf("%w: it reserves %d bytes, the largest node offers %d", errTooBig, mem, most)
	}
	if len(s.waiters) == 0 {
		if n := s.pickLocked(fn, mem, avoid); n != nil {
			n.inflight++
			n.reserved += mem
			s.mu.Unlock()
			return n, 0, nil
		}
	}
	if len(s.waiters) >= s.maxQueue {
		s.mu.Unlock()
		return nil, 0, errQueueFull
	}
	w := &waiter{fn: fn, mem: mem, ch: make(chan *nodeState, 1)}
	s.waiters = append(s.waiters, w)
	s.mu.Unlock()
	start := time.Now()
	select {
	case n := <-w.ch:
		return n, time.Since(start), nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	if w.done { // given a slot just now: hand it back
		s.putLocked(<-w.ch, mem)
		s.dispatchLocked()
	} else {
		w.done = true
		for i, x := range s.waiters {
			if x == w {
				s.waiters = append(s.waiters[:i], s.waiters[i+1:]...)
				break
			}
		}
	}
	s.mu.Unlock()
	return nil, time.Since(start), ctx.Err()
}

// release gives a slot and its mem bytes back.
func (s *sched) release(n *nodeState, mem int64) {
	s.mu.Lock()
	s.putLocked(n, mem)
	s.dispatchLocked()
	s.mu.Unlock()
}

// putLocked gives back a slot and mem bytes taken on n, and on every state
// of the same node since restarted (each took over n's counts). s.mu must
// be held.
func (s *sched) putLocked(n *nodeState, mem int64) {
	for ; n != nil; n = n.successor {
		n.inflight--
		n.reserved -= mem
	}
}

// keepStage records that the instance of fn that became stage seed seed on
// n keeps its mem bytes reserved there until dropStage.
func (s *sched) keepStage(n *nodeState, fn, seed string, mem int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := n.stages[seed]; ok || n.gone {
		return
	}
	n.stages[seed] = stageRes{fn: fn, mem: mem}
	n.reserved += mem
}

// dropStages forgets the reservations of the stage seeds of fn on node
// (every node when node is ""), of one stage seed when seed is not "",
// and dispatches the memory freed.
func (s *sched) dropStages(node, fn, seed string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, n := range s.nodes {
		if node != "" && name != node {
			continue
		}
		for id, st := range n.stages {
			if st.fn == fn && (seed == "" || id == seed) {
				n.reserved -= st.mem
				delete(n.stages, id)
			}
		}
	}
	s.dispatchLocked()
}

// dispatchLocked hands free slots to waiters, first come first served.
// s.mu must be held.
func (s *sched) dispatchLocked() {
	for len(s.waiters) > 0 {
		w := s.waiters[0]
		n := s.pickLocked(w.fn, w.mem, nil)
		if n == nil {
			return
		}
		n.inflight++
		n.reserved += w.mem
		w.done = true
		w.ch <- n
		s.waiters = s.waiters[1:]
	}
}

// markDown leaves a node out of placement for downFor.
func (s *sched) markDown(n *nodeState) {
	s.mu.Lock()
	n.downUntil = time.Now().Add(downFor)
	s.mu.Unlock()
}

// noteIdle records that an invocation of fn left (delta +1) or took (-1)
// an idle warm instance on n.
func (s *sched) noteIdle(n *nodeState, fn string, delta int) {
	s.mu.Lock()
	n.idle[fn] = max(n.idle[fn]+delta, 0)
	s.mu.Unlock()
}

// queued is the number of waiting invocations.
func (s *sched) queued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.waiters)
}

// snapshot lists the nodes (live or down) with their in-flight counts.
func (s *sched) snapshot() []*nodeState {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*nodeState, 0, len(s.nodes))
	for _, n := range s.nodes {
		out = append(out, n)
	}
	return out
}

// node returns the state of a node by name.
func (s *sched) node(name string) *nodeState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nodes[name]
}

// info returns n's directory record as the directory last gave it.
func (s *sched) info(n *nodeState) directory.NodeInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	return n.info
}
