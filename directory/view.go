package directory

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// View is an in-memory picture of the directory, kept current by one watch
// on the whole prefix: it loads everything, then watches from the load's
// revision; when the watch breaks (compaction, lost leader, a cancelled
// stream) it loads again. Reads never touch etcd: they load one atomic
// pointer to an immutable snapshot. It is safe for concurrent use.
type View struct {
	c      *Client
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	snap atomic.Pointer[viewSnap]

	mu      sync.Mutex
	changed chan struct{}
	closed  bool

	reloads atomic.Int64 // loads after the first (for tests)
	// watchFrom, if set, replaces the first watch's start revision (tests
	// use it to start behind a compaction).
	watchFrom int64
}

// viewSnap is one immutable picture. Its slices are never modified after
// publication; readers get copies.
type viewSnap struct {
	rev       int64
	nodes     map[string]NodeInfo
	nodeList  []NodeInfo
	functions map[string]Function
	fnList    []Function
	seeds     map[string][]SeedRecord // by function, sorted by node
	stages    map[string]StageLease   // stage seed leases, by function + "\x00" + ref
}

// NewView loads the directory and starts watching it. Close it when done
// (the client's Close closes it too).
func (c *Client) NewView(ctx context.Context) (*View, error) {
	return c.newView(ctx, 0)
}

func (c *Client) newView(ctx context.Context, watchFrom int64) (*View, error) {
	st, err := c.load(ctx)
	if err != nil {
		return nil, fmt.Errorf("new view: %w", err)
	}
	vctx, cancel := context.WithCancel(context.Background())
	v := &View{
		c:         c,
		ctx:       vctx,
		cancel:    cancel,
		done:      make(chan struct{}),
		changed:   make(chan struct{}),
		watchFrom: watchFrom,
	}
	v.snap.Store(st.snapshot(nil, true, true, true, true))
	if err := c.track(nil, v); err != nil {
		cancel()
		return nil, fmt.Errorf("new view: %w", err)
	}
	go v.run(st)
	return v, nil
}

// viewState is the watch goroutine's mutable copy of the directory.
type viewState struct {
	rev       int64
	nodes     map[string]NodeInfo
	functions map[string]Function
	seeds     map[string]map[string]SeedRecord
	stages    map[string]StageLease
}

// load reads the whole prefix at one revision.
func (c *Client) load(ctx context.Context) (*viewState, error) {
	resp, err := c.cli.Get(ctx, c.prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("load directory %s: %w", c.prefix, err)
	}
	st := &viewState{
		rev:       resp.Header.Revision,
		nodes:     make(map[string]NodeInfo),
		functions: make(map[string]Function),
		seeds:     make(map[string]map[string]SeedRecord),
		stages:    make(map[string]StageLease),
	}
	for _, kv := range resp.Kvs {
		st.apply(c, mvccpb.PUT, kv)
	}
	return st, nil
}

// apply changes st by one event and reports which parts changed.
func (st *viewState) apply(c *Client, typ mvccpb.Event_EventType, kv *mvccpb.KeyValue) (nodes, fns, seeds, stages bool) {
	rest, ok := strings.CutPrefix(string(kv.Key), c.prefix)
	if !ok {
		return
	}
	kind, name, _ := strings.Cut(rest, "/")
	del := typ == mvccpb.DELETE
	bad := func(err error) {
		c.log.Warn("directory view: ignoring a malformed record", "key", string(kv.Key), "err", err)
	}
	switch kind {
	case "nodes":
		if del {
			_, nodes = st.nodes[name]
			delete(st.nodes, name)
			return
		}
		n, err := decodeNode(name, kv.Value)
		if err != nil {
			bad(err)
			return
		}
		st.nodes[name] = n
		return true, false, false, false
	case "functions":
		if del {
			_, fns = st.functions[name]
			delete(st.functions, name)
			return
		}
		f, err := decodeFunction(name, kv)
		if err != nil {
			bad(err)
			return
		}
		st.functions[name] = f
		return false, true, false, false
	case "seeds":
		fn, node, _ := strings.Cut(name, "/")
		if del {
			if m := st.seeds[fn]; m != nil {
				_, seeds = m[node]
				delete(m, node)
				if len(m) == 0 {
					delete(st.seeds, fn)
				}
			}
			return
		}
		if err := checkName("function", fn); err != nil {
			bad(err)
			return
		}
		s, err := decodeSeed(fn, node, kv.Value)
		if err != nil {
			bad(err)
			return
		}
		m := st.seeds[fn]
		if m == nil {
			m = make(map[string]SeedRecord)
			st.seeds[fn] = m
		}
		m[node] = s
		return false, false, true, false
	case "stages":
		fn, ref, _ := strings.Cut(name, "/")
		k := fn + "\x00" + ref
		if del {
			_, stages = st.stages[k]
			delete(st.stages, k)
			return
		}
		var l StageLease
		if err := json.Unmarshal(kv.Value, &l); err != nil || l.Function != fn || l.Ref != ref {
			bad(fmt.Errorf("stage lease record %q does not match its key (%v)", kv.Value, err))
			return
		}
		st.stages[k] = l
		return false, false, false, true
	}
	return
}

// snapshot builds a picture of st, reusing prev's parts that did not change.
func (st *viewState) snapshot(prev *viewSnap, nodes, fns, seeds, stages bool) *viewSnap {
	s := &viewSnap{rev: st.rev}
	if prev != nil {
		*s = *prev
		s.rev = st.rev
	}
	if nodes || prev == nil {
		s.nodes = make(map[string]NodeInfo, len(st.nodes))
		s.nodeList = make([]NodeInfo, 0, len(st.nodes))
		for k, n := range st.nodes {
			s.nodes[k] = n
			s.nodeList = append(s.nodeList, n)
		}
		sort.Slice(s.nodeList, func(i, j int) bool { return s.nodeList[i].Name < s.nodeList[j].Name })
	}
	if fns || prev == nil {
		s.functions = make(map[string]Function, len(st.functions))
		s.fnList = make([]Function, 0, len(st.functions))
		for k, f := range st.functions {
			s.functions[k] = f
			s.fnList = append(s.fnList, f)
		}
		sort.Slice(s.fnList, func(i, j int) bool { return s.fnList[i].Name < s.fnList[j].Name })
	}
	if seeds || prev == nil {
		s.seeds = make(map[string][]SeedRecord, len(st.seeds))
		for fn, m := range st.seeds {
			l := make([]SeedRecord, 0, len(m))
			for _, r := range m {
				l = append(l, r)
			}
			sort.Slice(l, func(i, j int) bool { return l[i].Node < l[j].Node })
			s.seeds[fn] = l
		}
	}
	if stages || prev == nil {
		s.stages = make(map[string]StageLease, len(st.stages))
		for k, l := range st.stages {
			s.stages[k] = l
		}
	}
	return s
}

// publish makes s the current picture and wakes the Changed waiters.
func (v *View) publish(s *viewSnap) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.snap.Store(s)
	if !v.closed {
		close(v.changed)
		v.changed = make(chan struct{})
	}
}

// run watches from st's revision, applying events; on a broken watch it
// reloads (retrying every 250 ms up to 2 s apart) and watches again.
func (v *View) run(st *viewState) {
	defer close(v.done)
	from := st.rev + 1
	if v.watchFrom != 0 {
		from = v.watchFrom
	}
	for {
		err := v.watch(st, from)
		if v.ctx.Err() != nil {
			return
		}
		v.c.log.Warn("directory view: watch broken, reloading", "rev", st.rev, "err", err)
		backoff := 250 * time.Millisecond
		for {
			lctx, cancel := context.WithTimeout(v.ctx, v.c.timeout)
			nst, lerr := v.c.load(lctx)
			cancel()
			if lerr == nil {
				st = nst
				break
			}
			if v.ctx.Err() != nil {
				return
			}
			v.c.log.Warn("directory view: reload failed, retrying", "in", backoff, "err", lerr)
			select {
			case <-v.ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 2*time.Second)
		}
		v.reloads.Add(1)
		v.publish(st.snapshot(nil, true, true, true, true))
		from = st.rev + 1
	}
}

// watch applies the events from revision from on until the watch ends,
// and returns why it ended.
func (v *View) watch(st *viewState, from int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(v.ctx))
	defer cancel()
	wch := v.c.cli.Watch(wctx, v.c.prefix, clientv3.WithPrefix(), clientv3.WithRev(from))
	for resp := range wch {
		if resp.CompactRevision != 0 {
			return fmt.Errorf("watch from revision %d: compacted up to %d", from, resp.CompactRevision)
		}
		if err := resp.Err(); err != nil {
			return err
		}
		var nodes, fns, seeds, stages bool
		for _, ev := range resp.Events {
			n, f, s, g := st.apply(v.c, ev.Type, ev.Kv)
			nodes, fns, seeds, stages = nodes || n, fns || f, seeds || s, stages || g
		}
		if resp.Header.Revision > st.rev {
			st.rev = resp.Header.Revision
		}
		from = st.rev + 1
		if nodes || fns || seeds || stages {
			v.publish(st.snapshot(v.snap.Load(), nodes, fns, seeds, stages))
		}
	}
	return errors.New("watch channel closed")
}

// Revision is the etcd revision the picture reflects.
func (v *View) Revision() int64 { return v.snap.Load().rev }

// Nodes returns the member nodes, sorted by name.
func (v *View) Nodes() []NodeInfo {
	return append([]NodeInfo(nil), v.snap.Load().nodeList...)
}

// Node returns the node called name, if it is a member.
func (v *View) Node(name string) (NodeInfo, bool) {
	n, ok := v.snap.Load().nodes[name]
	return n, ok
}

// Functions returns the deployed functions, sorted by name.
func (v *View) Functions() []Function {
	return append([]Function(nil), v.snap.Load().fnList...)
}

// Function returns the function called name, if it is deployed. Its Spec
// is shared with the view: do not modify it.
func (v *View) Function(name string) (Function, bool) {
	f, ok := v.snap.Load().functions[name]
	return f, ok
}

// Seeds returns the seeds of function, sorted by node.
func (v *View) Seeds(function string) []SeedRecord {
	return append([]SeedRecord(nil), v.snap.Load().seeds[function]...)
}

// StageLeases returns the stage seed leases in the directory (any order).
func (v *View) StageLeases() []StageLease {
	m := v.snap.Load().stages
	out := make([]StageLease, 0, len(m))
	for _, l := range m {
		out = append(out, l)
	}
	return out
}

// Changed returns a channel closed at the next change of the picture (or
// at Close). Take it before reading, then read, then wait on it, and take a
// new one after each close:
//
//	for {
//		ch := v.Changed()
//		use(v.Nodes())
//		<-ch
//	}
func (v *View) Changed() <-chan struct{} {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.changed
}

// Close stops the watch and waits for it; the picture stays readable.
func (v *View) Close() {
	v.cancel()
	<-v.done
	v.mu.Lock()
	if !v.closed {
		v.closed = true
		close(v.changed)
	}
	v.mu.Unlock()
	v.c.untrack(nil, v)
}
