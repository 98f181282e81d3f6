package engine

import (
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/mitosis-fork/mitosis/descriptor"
)

func TestAddRun(t *testing.T) {
	r := func(s, e uint64) descriptor.Run { return descriptor.Run{Start: s, End: e} }
	for _, tc := range []struct {
		name string
		runs []descriptor.Run
		add  descriptor.Run
		want []descriptor.Run
	}{
		{"empty", nil, r(10, 20), []descriptor.Run{r(10, 20)}},
		{"before", []descriptor.Run{r(30, 40)}, r(10, 20), []descriptor.Run{r(10, 20), r(30, 40)}},
		{"after", []descriptor.Run{r(30, 40)}, r(50, 60), []descriptor.Run{r(30, 40), r(50, 60)}},
		{"between", []descriptor.Run{r(0, 5), r(30, 40)}, r(10, 20), []descriptor.Run{r(0, 5), r(10, 20), r(30, 40)}},
		{"touches left", []descriptor.Run{r(0, 10)}, r(10, 20), []descriptor.Run{r(0, 20)}},
		{"touches right", []descriptor.Run{r(20, 30)}, r(10, 20), []descriptor.Run{r(10, 30)}},
		{"bridges", []descriptor.Run{r(0, 10), r(20, 30), r(40, 50)}, r(5, 25), []descriptor.Run{r(0, 30), r(40, 50)}},
		{"swallows", []descriptor.Run{r(10, 12), r(14, 16), r(18, 20)}, r(0, 100), []descriptor.Run{r(0, 100)}},
		{"inside", []descriptor.Run{r(0, 100)}, r(10, 20), []descriptor.Run{r(0, 100)}},
	} {
		if got := addRun(append([]descriptor.Run(nil), tc.runs...), tc.add); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: addRun(%v, %v) = %v, want %v", tc.name, tc.runs, tc.add, got, tc.want)
		}
	}
}

// TestRunsRandom checks addRun and mergeRuns against a set of units.
func TestRunsRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	toRuns := func(set map[uint64]bool) []descriptor.Run {
		var out []descriptor.Run
		for u := uint64(0); u < 200; u++ {
			if !set[u] {
				continue
			}
			if n := len(out); n > 0 && out[n-1].End == u {
				out[n-1].End = u + 1
			} else {
				out = append(out, descriptor.Run{Start: u, End: u + 1})
			}
		}
		return out
	}
	for round := 0; round < 200; round++ {
		set := map[uint64]bool{}
		var runs, all []descriptor.Run
		for k := 0; k < 1+rng.IntN(20); k++ {
			s := rng.Uint64N(190)
			x := descriptor.Run{Start: s, End: s + 1 + rng.Uint64N(10)}
			for u := x.Start; u < x.End; u++ {
				set[u] = true
			}
			runs = addRun(runs, x)
			all = append(all, x)
		}
		want := toRuns(set)
		if !reflect.DeepEqual(runs, want) {
			t.Fatalf("round %d: addRun built %v, want %v", round, runs, want)
		}
		if got := mergeRuns(all); !reflect.DeepEqual(got, want) {
			t.Fatalf("round %d: mergeRuns = %v, want %v", round, got, want)
		}
	}
}

// TestIntersectRuns checks intersectRuns against sets of units.
func TestIntersectRuns(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	toRuns := func(set map[uint64]bool) []descriptor.Run {
		var out []descriptor.Run
		for u := uint64(0); u < 200; u++ {
			if set[u] {
				out = addRun(out, descriptor.Run{Start: u, End: u + 1})
			}
		}
		return out
	}
	randomSet := func() map[uint64]bool {
		set := map[uint64]bool{}
		for k := 0; k < rng.IntN(12); k++ {
			s := rng.Uint64N(190)
			for u := s; u < s+1+rng.Uint64N(15) && u < 200; u++ {
				set[u] = true
			}
		}
		return set
	}
	for round := 0; round < 500; round++ {
		a, b := randomSet(), randomSet()
		both := map[uint64]bool{}
		for u := range a {
			if b[u] {
				both[u] = true
			}
		}
		got := intersectRuns(toRuns(a), toRuns(b))
		if want := toRuns(both); !reflect.DeepEqual(got, want) && !(len(got) == 0 && len(want) == 0) {
			t.Fatalf("round %d: intersectRuns(%v, %v) = %v, want %v", round, toRuns(a), toRuns(b), got, want)
		}
	}
}

// TestProbes: the first prefetching fork is never a probe; probes come one
// in probeEvery, then rarer (up to maxProbeGap) while they touch the same
// pages, and often again once one differs; the prefetch set is what each of
// the last keptProbes probes touched.
func TestProbes(t *testing.T) {
	s := &Seed{}
	r := func(s, e uint64) descriptor.Run { return descriptor.Run{Start: s, End: e} }
	whole := []descriptor.Run{r(0, 100)}
	// forksToProbe counts the forks up to and including the next probe.
	forksToProbe := func() int {
		for i := 1; i <= 10*maxProbeGap; i++ {
			if s.nextPrefetchProbes() {
				return i
			}
		}
		t.Fatal("no probe")
		return 0
	}
	var gaps []int
	for k := 0; k < 7; k++ {
		gaps = append(gaps, forksToProbe())
		s.addProbe(whole) // every child reads the whole state
	}
	if want := []int{8, 8, 16, 32, 64, 128, 256}; !reflect.DeepEqual(gaps, want) {
		t.Errorf("probes after %v forks, want %v", gaps, want)
	}
	if g := forksToProbe(); g != maxProbeGap {
		t.Errorf("then after %d forks, want %d at most", g, maxProbeGap)
	}
	if got := s.prefetchSet(nil); !reflect.DeepEqual(got, whole) {
		t.Errorf("prefetch set %v, want %v", got, whole)
	}
	// Children change: they now read a tenth of it. The first probe that
	// sees it narrows the set at once and brings the probes back.
	s.addProbe([]descriptor.Run{r(0, 10), r(50, 60)})
	if got := s.prefetchSet(nil); !reflect.DeepEqual(got, []descriptor.Run{r(0, 10), r(50, 60)}) {
		t.Errorf("after a probe that read less: %v, want what both of the last two touched", got)
	}
	if g := forksToProbe(); g != probeEvery {
		t.Errorf("next probe after %d forks, want %d", g, probeEvery)
	}
	s.addProbe([]descriptor.Run{r(0, 10), r(55, 70)})
	if got := s.prefetchSet(nil); !reflect.DeepEqual(got, []descriptor.Run{r(0, 10), r(55, 60)}) {
		t.Errorf("after three probes: %v", got)
	}
	if len(s.probes) != keptProbes {
		t.Errorf("%d probes kept, want %d", len(s.probes), keptProbes)
	}
}

func TestSimilarRuns(t *testing.T) {
	r := func(s, e uint64) descriptor.Run { return descriptor.Run{Start: s, End: e} }
	for _, tc := range []struct {
		a, b []descriptor.Run
		want bool
	}{
		{[]descriptor.Run{r(0, 100)}, []descriptor.Run{r(0, 100)}, true},
		{[]descriptor.Run{r(0, 100)}, []descriptor.Run{r(0, 91)}, true},
		{[]descriptor.Run{r(0, 100)}, []descriptor.Run{r(0, 89)}, false},
		{[]descriptor.Run{r(0, 50)}, []descriptor.Run{r(50, 100)}, false},
		{nil, nil, true},
		{nil, []descriptor.Run{r(0, 1)}, false},
	} {
		if got := similarRuns(tc.a, tc.b); got != tc.want {
			t.Errorf("similarRuns(%v, %v) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}
