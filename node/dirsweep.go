package node

import (
	"context"
	"strings"
	"time"

	"github.com/mitosis-fork/mitosis/directory"
)

// The node's part in removing what the cluster directory no longer holds.
// A gateway removes a deleted function, or a stage seed whose lease ran
// out, from the nodes; the node holding it removes it too, so that a
// gateway that is down then (with an external etcd) or cannot reach the
// node (a partition: its removal fails) leaves nothing behind for good.
// Every second, a node in a directory reads, with one read of the keys:
//   - the functions, when it holds functions a gateway deployed from the
//     directory (DeployRequest.Directory): one the directory no longer
//     has, though it had the revision this node runs, was deleted or its
//     TTL ran out (directory.CreateFunctionTTL), and is removed here;
//   - the stage seed leases, when it holds stage seeds: its own and its
//     imports of other nodes' whose lease it saw and that is gone now are
//     removed, and its own made with a TTL (function.Request.StageLease)
//     whose lease never appeared within stageLeaseGrace (the gateway
//     failed between the seed and its lease).
//
// Stage seeds made without a TTL have no lease, and functions deployed
// locally (mitosis fn deploy) are not the directory's: neither is removed
// here. A directory that does not answer removes nothing: only a
// successful read says something is gone. Removal is idempotent: a
// gateway removing the same thing at the same time finds it gone.

// stageLeaseGrace is how long a stage seed made with a TTL may wait for
// its lease to appear in the directory (the gateway records it as soon as
// the seed answers).
const stageLeaseGrace = 30 * time.Second

// heldStage is a stage seed this node holds: its own, or an import of
// another node's.
type heldStage struct {
	fn, ref string // function; the seed as NODE/SEED on the node that made it
	// leased: made here with a TTL, so a lease must appear by made+grace.
	leased bool
	made   time.Time
	// unseen (set by due): removed because its lease never appeared.
	unseen bool
}

// heldStages lists the stage seeds this node holds.
func (f *fnRegistry) heldStages() []heldStage {
	d := f.d
	var out []heldStage
	own := map[string]bool{}
	f.mu.Lock()
	for name, fn := range f.fns {
		for id, st := range fn.stages {
			out = append(out, heldStage{fn: name, ref: d.node + "/" + id, leased: st.leased, made: st.made})
			own[id] = true
		}
	}
	f.mu.Unlock()
	d.mu.Lock()
	for _, s := range d.seeds {
		fn, ok := stageFunction(s.name)
		switch {
		case !ok || s.removing || (s.origin == "" && own[s.id]):
		case s.origin == "":
			// Handed over by a predecessor daemon: governed once its
			// lease is seen.
			out = append(out, heldStage{fn: fn, ref: d.node + "/" + s.id})
		default:
			out = append(out, heldStage{fn: fn, ref: s.origin + "/" + s.originID})
		}
	}
	d.mu.Unlock()
	return out
}

// stageFunction returns the function of a stage seed's name
// (stageSeedName), and whether name is one.
func stageFunction(name string) (string, bool) {
	rest, ok := strings.CutPrefix(name, "fn.")
	i := strings.LastIndex(rest, ".stage.")
	if !ok || i <= 0 {
		return "", false
	}
	return rest[:i], true
}

// stageSweep is the node's record of the stage seed leases it has seen.
type stageSweep struct {
	seen map[string]bool // by NODE/SEED
}

// due returns the held stage seeds to remove, given the leases the
// directory holds now (NODE/SEED to function), and updates what was seen.
func (s *stageSweep) due(held []heldStage, leases map[string]string, now time.Time) []heldStage {
	if s.seen == nil {
		s.seen = map[string]bool{}
	}
	var gone []heldStage
	keep := make(map[string]bool, len(held))
	for _, h := range held {
		if _, ok := leases[h.ref]; ok {
			s.seen[h.ref], keep[h.ref] = true, true
			continue
		}
		if s.seen[h.ref] || (h.leased && now.Sub(h.made) > stageLeaseGrace) {
			h.unseen = !s.seen[h.ref]
			gone = append(gone, h)
			keep[h.ref] = s.seen[h.ref] // until removed (forget), due again
		}
	}
	for ref := range s.seen {
		if !keep[ref] {
			delete(s.seen, ref)
		}
	}
	return gone
}

// forget drops what was seen of a stage seed that was removed.
func (s *stageSweep) forget(ref string) { delete(s.seen, ref) }

// sweepStages removes the stage seeds whose lease is gone (see above).
// A directory that does not answer removes nothing: only a successful
// read says a lease is gone.
func (m *dirMember) sweepStages(cl *directory.Client) {
	held := m.d.fn.heldStages()
	if len(held) == 0 {
		m.stages.seen = nil
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), loadEvery)
	leases, err := cl.StageLeaseRefs(ctx)
	cancel()
	if err != nil {
		return
	}
	for _, h := range m.stages.due(held, leases, time.Now()) {
		why := "its lease in the directory is gone (expired or deleted)"
		if h.unseen {
			why = "its lease never appeared in the directory"
		}
		if err := m.d.fn.removeStage(h.fn, h.ref); err != nil {
			m.d.log.Warn("remove stage seed whose lease is gone", "function", h.fn, "seed", h.ref, "err", err)
			continue
		}
		m.stages.forget(h.ref)
		m.d.metrics.dirRemoved.WithLabelValues("stage-seed").Inc()
		m.d.log.Info("stage seed removed: "+why, "function", h.fn, "seed", h.ref)
	}
}

// managedFunctions returns the generations of the functions a gateway
// deployed here from the directory.
func (f *fnRegistry) managedFunctions() map[string]int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out map[string]int64
	for name, fn := range f.fns {
		if fn.managed && !fn.removed {
			if out == nil {
				out = map[string]int64{}
			}
			out[name] = fn.spec.Generation
		}
	}
	return out
}

// goneFunctions returns the functions of held (name to generation) that the
// directory's answer (names, read at revision rev) says were removed.
func goneFunctions(held map[string]int64, names map[string]bool, rev int64) []string {
	var gone []string
	for name, gen := range held {
		if !names[name] && gen <= rev {
			gone = append(gone, name)
		}
	}
	return gone
}

// sweepFunctions removes the directory's functions that it no longer has.
func (m *dirMember) sweepFunctions(cl *directory.Client) {
	held := m.d.fn.managedFunctions()
	if len(held) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), loadEvery)
	names, rev, err := cl.FunctionNames(ctx)
	cancel()
	if err != nil {
		return
	}
	for _, name := range goneFunctions(held, names, rev) {
		if err := m.d.fn.remove(name); err != nil {
			m.d.log.Warn("remove a function the directory no longer has", "function", name, "err", err)
			continue
		}
		m.d.metrics.dirRemoved.WithLabelValues("function").Inc()
		m.d.log.Info("function removed: the cluster directory no longer has it (deleted, or its TTL ran out)", "function", name, "generation", held[name])
	}
}
