package node

import (
	"slices"
	"testing"
	"time"
)

func TestStageFunction(t *testing.T) {
	for _, c := range []struct {
		name, fn string
		ok       bool
	}{
		{stageSeedName("wf-finra"), "wf-finra", true},
		{stageSeedName("a.b"), "a.b", true},
		{"fn.x.stage.", "x", true},
		{"fn.x", "", false},         // a function's own seed
		{"fn..stage.ab", "", false}, // no function
		{"web.stage.ab", "", false}, // not a function's
		{"fn.stage.ab", "", false},  // no function either
		{"", "", false},
	} {
		fn, ok := stageFunction(c.name)
		if fn != c.fn || ok != c.ok {
			t.Errorf("stageFunction(%q) = %q, %v; want %q, %v", c.name, fn, ok, c.fn, c.ok)
		}
	}
}

// TestStageSweep: a stage seed is due for removal once the lease it was
// seen with is gone, or when it was made with a TTL and no lease appeared
// within the grace; a seed without a lease ever seen (made without a TTL)
// stays; what is no longer held is forgotten.
func TestStageSweep(t *testing.T) {
	t0 := time.Now()
	own := heldStage{fn: "wf", ref: "a/s-1", leased: true, made: t0}
	untimed := heldStage{fn: "wf", ref: "a/s-2", made: t0}
	imp := heldStage{fn: "wf", ref: "b/s-9"}
	refs := func(hs []heldStage) (out []string) {
		for _, h := range hs {
			out = append(out, h.ref)
		}
		slices.Sort(out)
		return out
	}
	var s stageSweep
	steps := []struct {
		what   string
		held   []heldStage
		leases map[string]string
		at     time.Duration
		want   []string
		unseen bool
	}{
		{"before the leases appear", []heldStage{own, untimed, imp}, map[string]string{}, time.Second, nil, false},
		{"leases appear", []heldStage{own, untimed, imp}, map[string]string{"a/s-1": "wf", "b/s-9": "wf"}, 2 * time.Second, nil, false},
		{"the import's lease goes", []heldStage{own, untimed, imp}, map[string]string{"a/s-1": "wf"}, 3 * time.Second, []string{"b/s-9"}, false},
		{"its removal failed: due again", []heldStage{own, untimed, imp}, map[string]string{"a/s-1": "wf"}, 3 * time.Second, []string{"b/s-9"}, false},
		{"removed import forgotten", []heldStage{own, untimed}, map[string]string{"a/s-1": "wf"}, 4 * time.Second, nil, false},
		{"own lease goes", []heldStage{own, untimed}, map[string]string{}, 5 * time.Second, []string{"a/s-1"}, false},
		{"the untimed seed stays, long after", []heldStage{untimed}, map[string]string{}, time.Hour, nil, false},
	}
	for _, st := range steps {
		got := s.due(st.held, st.leases, t0.Add(st.at))
		if !slices.Equal(refs(got), st.want) {
			t.Errorf("%s: due %v, want %v", st.what, refs(got), st.want)
		}
		for _, h := range got {
			if h.unseen != st.unseen {
				t.Errorf("%s: %s unseen = %v", st.what, h.ref, h.unseen)
			}
		}
	}
	if len(s.seen) != 0 {
		t.Errorf("seen leases of seeds no longer held: %v", s.seen)
	}
	// A seed made with a TTL whose lease never appears: due after the grace.
	var s2 stageSweep
	if got := s2.due([]heldStage{own}, nil, t0.Add(stageLeaseGrace-time.Second)); len(got) != 0 {
		t.Errorf("due within the grace: %v", refs(got))
	}
	got := s2.due([]heldStage{own}, nil, t0.Add(stageLeaseGrace+time.Second))
	if len(got) != 1 || !got[0].unseen {
		t.Errorf("after the grace: %+v, want a/s-1, unseen", got)
	}
}

// TestGoneFunctions: a function held here is gone when the directory's
// answer lacks it and was read at or after the revision this node runs.
func TestGoneFunctions(t *testing.T) {
	held := map[string]int64{"a": 10, "b": 20, "c": 30}
	for _, c := range []struct {
		names map[string]bool
		rev   int64
		want  []string
	}{
		{map[string]bool{"a": true, "b": true, "c": true}, 40, nil},
		{map[string]bool{"a": true}, 40, []string{"b", "c"}},
		{map[string]bool{"a": true}, 25, []string{"b"}}, // c: an answer older than its record
		{map[string]bool{}, 5, nil},
		{nil, 30, []string{"a", "b", "c"}},
	} {
		got := goneFunctions(held, c.names, c.rev)
		slices.Sort(got)
		if !slices.Equal(got, c.want) {
			t.Errorf("goneFunctions(%v, rev %d) = %v, want %v", c.names, c.rev, got, c.want)
		}
	}
}
