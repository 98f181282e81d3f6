package gateway

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/directory"
)

// Placement: every invocation takes a slot on one node, chosen among the
// live nodes (the directory's view, minus nodes this gateway saw fail in
// the last downFor) with a free slot: the least loaded, i.e. the fewest
// invocations in flight from this gateway relative to the node's
// concurrency, ties broken at random. Keep-alive invocations prefer nodes
// where this gateway left idle warm instances of the function. When no
// node has a free slot the invocation waits in one FIFO queue (bounded;
// full: 429) until a slot frees.

// errQueueFull is returned when the wait queue is full.
var errQueueFull = errors.New("every node is at capacity and the queue is full")

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
	info      directory.NodeInfo
	inflight  int
	downUntil time.Time
	gone      bool           // no longer in the directory
	idle      map[string]int // function -> idle warm instances believed there
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

// setNodes replaces the node set with the directory's.
func (s *sched) setNodes(infos []directory.NodeInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[string]bool{}
	for _, in := range infos {
		seen[in.Name] = true
		n := s.nodes[in.Name]
		if n == nil || !n.info.Started.Equal(in.Started) {
			// New node, or the same name restarted: nothing of ours
			// is deployed there any more.
			old := n
			n = &nodeState{idle: map[string]int{}}
			if old != nil {
				n.inflight = old.inflight
				old.gone = true
			}
			s.nodes[in.Name] = n
		}
		n.info = in
	}
	for name, n := range s.nodes {
		if !seen[name] {
			n.gone = true
			delete(s.nodes, name)
		}
	}
	close(s.changed)
	s.changed = make(chan struct{})
	s.dispatchLocked()
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

// pickLocked chooses a node with a free slot for fn, or nil. s.mu must be
// held.
func (s *sched) pickLocked(fn string, avoid map[string]bool) *nodeState {
	var best []*nodeState
	bestIdle, bestLoad := 0, 2.0
	for _, n := range s.liveLocked(time.Now()) {
		if avoid[n.info.Name] || n.inflight >= n.capacity() {
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

// acquire takes a slot for an invocation of fn, waiting in the queue while
// every node is full. queued reports how long it waited.
func (s *sched) acquire(ctx context.Context, fn string, avoid map[string]bool) (n *nodeState, queued time.Duration, err error) {
	s.mu.Lock()
	if len(s.liveLocked(time.Now())) == 0 {
		s.mu.Unlock()
		return nil, 0, errNoNodes
	}
	if len(s.waiters) == 0 {
		if n := s.pickLocked(fn, avoid); n != nil {
			n.inflight++
			s.mu.Unlock()
			return n, 0, nil
		}
	}
	if len(s.waiters) >= s.maxQueue {
		s.mu.Unlock()
		return nil, 0, errQueueFull
	}
	w := &waiter{fn: fn, ch: make(chan *nodeState, 1)}
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
		n := <-w.ch
		n.inflight--
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

// release gives a slot back.
func (s *sched) release(n *nodeState) {
	s.mu.Lock()
	n.inflight--
	s.dispatchLocked()
	s.mu.Unlock()
}

// dispatchLocked hands free slots to waiters, first come first served.
// s.mu must be held.
func (s *sched) dispatchLocked() {
	for len(s.waiters) > 0 {
		w := s.waiters[0]
		n := s.pickLocked(w.fn, nil)
		if n == nil {
			return
		}
		n.inflight++
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
