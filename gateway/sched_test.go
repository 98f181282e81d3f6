package gateway

import (
	"context"
	"errors"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/directory"
)

const gib = int64(1) << 30

func testNodes(mems ...int64) []directory.NodeInfo {
	var out []directory.NodeInfo
	for i, m := range mems {
		out = append(out, directory.NodeInfo{Name: string(rune('a' + i)), Started: time.Unix(1, 0),
			Capacity: directory.Capacity{Concurrency: 8, MemoryBytes: uint64(m)}})
	}
	return out
}

// acquireNow takes a slot without waiting, or fails the test.
func acquireNow(t *testing.T, s *sched, fn string, mem int64) *nodeState {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	n, _, err := s.acquire(ctx, fn, mem, nil)
	if err != nil {
		t.Fatalf("acquire %s (%d bytes): %v", fn, mem, err)
	}
	return n
}

// acquireLater starts an acquire that must wait, and returns its result
// channel.
func acquireLater(t *testing.T, s *sched, fn string, mem int64) chan *nodeState {
	t.Helper()
	got := make(chan *nodeState, 1)
	go func() {
		n, _, err := s.acquire(context.Background(), fn, mem, nil)
		if err != nil {
			n = nil
		}
		got <- n
	}()
	select {
	case n := <-got:
		t.Fatalf("acquire of %d bytes got node %v at once; want it queued", mem, n)
	case <-time.After(50 * time.Millisecond):
	}
	return got
}

func receive(t *testing.T, ch chan *nodeState) *nodeState {
	t.Helper()
	select {
	case n := <-ch:
		if n == nil {
			t.Fatal("queued acquire failed")
		}
		return n
	case <-time.After(2 * time.Second):
		t.Fatal("queued acquire still waiting")
	}
	return nil
}

// TestSchedMemory: invocations reserve their function's memory on a node;
// one that fits nowhere waits until memory frees, not only a slot.
func TestSchedMemory(t *testing.T) {
	s := newSched(100)
	s.setNodes(testNodes(5 * gib))
	a := acquireNow(t, s, "f", 2*gib)
	acquireNow(t, s, "f", 2*gib)
	// 4 of 5 GiB reserved, 2 of 8 slots taken: the third waits.
	later := acquireLater(t, s, "f", 2*gib)
	// A smaller instance fits in the gap, but the queue is FIFO.
	small := acquireLater(t, s, "g", gib)
	s.release(a, 2*gib)
	n1, n2 := receive(t, later), receive(t, small)
	if n1 != a || n2 != a {
		t.Fatalf("queued invocations got %s and %s, want a", n1.info.Name, n2.info.Name)
	}
	if s.mu.Lock(); a.reserved != 5*gib || a.inflight != 3 {
		t.Errorf("%d bytes reserved by %d invocations, want 5 GiB by 3", a.reserved, a.inflight)
	}
	s.mu.Unlock()
}

// TestSchedTooBig: an instance larger than every node's memory is refused
// at once; a node that registered no memory capacity takes anything.
func TestSchedTooBig(t *testing.T) {
	s := newSched(100)
	s.setNodes(testNodes(2*gib, 4*gib))
	_, _, err := s.acquire(context.Background(), "f", 8*gib, nil)
	if !errors.Is(err, errTooBig) {
		t.Fatalf("acquire of 8 GiB on nodes of 2 and 4 GiB: %v, want errTooBig", err)
	}
	if n := acquireNow(t, s, "f", 3*gib); n.info.Name != "b" {
		t.Fatalf("3 GiB placed on %s, want b (the only node with room)", n.info.Name)
	}
	s.setNodes(testNodes(2*gib, 0))
	if n := acquireNow(t, s, "f", 8*gib); n.info.Name != "b" {
		t.Fatalf("8 GiB placed on %s, want b (no memory capacity registered)", n.info.Name)
	}
}

// TestSchedStages: a stage seed's instance keeps its memory reserved until
// the stage seed, or its function, is dropped; a restarted node has none.
func TestSchedStages(t *testing.T) {
	s := newSched(100)
	nodes := testNodes(4 * gib)
	s.setNodes(nodes)
	a := acquireNow(t, s, "wf", 2*gib)
	s.release(a, 2*gib)
	s.keepStage(a, "wf", "a/s-1", 2*gib)
	s.keepStage(a, "wf", "a/s-1", 2*gib) // idempotent
	b := acquireNow(t, s, "wf", 2*gib)
	later := acquireLater(t, s, "wf", 2*gib)
	s.dropStages("a", "other", "")   // another function's: nothing
	s.dropStages("a", "wf", "a/s-9") // another seed: nothing
	select {
	case <-later:
		t.Fatal("memory freed by dropping nothing")
	case <-time.After(50 * time.Millisecond):
	}
	s.dropStages("a", "wf", "a/s-1")
	if n := receive(t, later); n.reserved != 4*gib {
		t.Fatalf("%d reserved, want 4 GiB (two invocations)", n.reserved)
	}
	s.keepStage(b, "wf", "a/s-2", 2*gib)
	s.release(b, 2*gib)
	// The node restarts: its stage seeds are gone, the invocation in
	// flight keeps its 2 GiB.
	nodes[0].Started = time.Unix(2, 0)
	s.setNodes(nodes)
	if n := s.node("a"); n.reserved != 2*gib || len(n.stages) != 0 {
		t.Fatalf("after a restart: %d reserved, stages %v; want 2 GiB and none", n.reserved, n.stages)
	}
}

// TestSchedRestart: invocations in flight when their node restarted give
// their slot and memory back to the restarted node's state, which counted
// them (a gateway used to lose that capacity for good).
func TestSchedRestart(t *testing.T) {
	s := newSched(100)
	nodes := testNodes(4 * gib)
	s.setNodes(nodes)
	old := acquireNow(t, s, "f", gib)
	nodes[0].Started = time.Unix(2, 0)
	s.setNodes(nodes)
	cur := s.node("a")
	if cur == old || cur.inflight != 1 || cur.reserved != gib {
		t.Fatalf("after the restart: same state %v, %d in flight, %d reserved; want a new state with 1 and 1 GiB", cur == old, cur.inflight, cur.reserved)
	}
	nodes[0].Started = time.Unix(3, 0)
	s.setNodes(nodes)
	s.release(old, gib)
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.nodes["a"]; n.inflight != 0 || n.reserved != 0 {
		t.Errorf("after the release: %d in flight, %d reserved on a; want 0 and 0", n.inflight, n.reserved)
	}
}

// TestSchedNodeChanges: setNodes reports each node that joined, restarted
// or left placement (the gateway logs them), and nothing when nothing
// changed.
func TestSchedNodeChanges(t *testing.T) {
	s := newSched(100)
	nodes := testNodes(gib, gib, gib)
	steps := []struct {
		nodes []directory.NodeInfo
		want  string
	}{
		{nodes, "a joined, b joined, c joined"},
		{nodes, ""},
		{[]directory.NodeInfo{nodes[0], nodes[2]}, "b left"},
		{[]directory.NodeInfo{nodes[0], {Name: "b", Started: time.Unix(1, 0)}, {Name: "c", Started: time.Unix(9, 0)}}, "b joined, c restarted"},
		{nil, "a left, b left, c left"},
	}
	for i, st := range steps {
		var got []string
		for _, c := range s.setNodes(st.nodes) {
			got = append(got, c.node+" "+c.what)
		}
		sort.Strings(got)
		if g := strings.Join(got, ", "); g != st.want {
			t.Errorf("step %d: changes %q, want %q", i, g, st.want)
		}
	}
}
