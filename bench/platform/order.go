package platform

import (
	"fmt"
	"math/rand/v2"
)

// Orders of a benchmark cell's runs (WorkflowConfig.Order).
const (
	// OrderBalanced interleaves the ways so that each runs right after
	// each other way about equally often, after one warm-up run of each
	// way that is not counted.
	OrderBalanced = "balanced"
	// OrderBlocked runs each way's runs back to back, after one warm-up
	// run of that way that is not counted.
	OrderBlocked = "blocked"
	// OrderCrossed interleaves the ways so that each runs right after
	// each way, itself included, about equally often, after one warm-up
	// run of each way that is not counted.
	OrderCrossed = "crossed"
)

// run is one scheduled run of a cell: way k; a warm-up run is not counted.
type run struct {
	way    int
	warmup bool
}

// schedule orders the runs of a cell of n ways, runs counted runs each.
//
// Why the order matters: a run pays for what the run before it left. A
// storage run frees gigabytes (every rule's unpickled copy), and on this
// VM the run after it is slower, the bound's single local process too: its
// sources, which generate the state in fresh memory, took 0.8-1.1 s after
// 16 processes that had each unpickled the 198 MB state exited, against
// 0.2-0.65 s otherwise (eighth session; BENCHMARKS.md traces fresh
// memory's cost on this VM to its free page reporting). A cyclic
// rotation of one order (these benches' design until the seventh session)
// makes the way listed after storage its successor in most rounds: at 5
// runs of 4 ways the stage seed ran right after storage in 3 of its 5
// runs, the per-run seed in 1 and the bound in none.
//
// OrderBalanced first runs each way once as a warm-up that is not counted
// (the first run of a cell meets memory and caches the cell's size has not
// used yet), then builds the sequence one run at a time: the next run is
// the way, among those with runs left, that has followed the previous
// run's way least often so far (never the same way twice in a row while
// another is left; ties go to the way with most runs left, then the first
// listed). For up to 4 ways, every way's successors then differ in count
// by at most one: at 5 runs of 4 ways, storage is followed twice by one
// way and once by each other.
//
// OrderBalanced never runs a way right after itself, so what a run leaves
// is paid by the ways after it and never by its own way: a storage run's
// aftermath lands on the fork runs and the bound, never on the next storage
// run. Measured (BENCHMARKS.md): storage's median is about a second lower
// interleaved this way than back to back.
//
// OrderCrossed bills every way alike: each way runs right after each way,
// itself included, about equally often (successor counts differ by at most
// one), so a fork run follows a storage run as often as a storage run does.
// The sequence is a greedy walk (the next run is the way, among those with
// runs left, that has followed the previous run's way least often so far;
// ties go to the way with most runs left, then a seeded random one),
// repeated with other seeds until it is balanced: deterministic for given
// n and runs.
//
// OrderBlocked measures each way in its own steady state, as a platform
// that uses one transfer sees it: a warm-up run (which follows the previous
// way's block) and then runs runs. Each way then pays for its own
// aftermath and for no other's.
func schedule(n, runs int, order string) ([]run, error) {
	var out []run
	switch order {
	case OrderCrossed:
		for k := 0; k < n; k++ {
			out = append(out, run{way: k, warmup: true})
		}
		var best []run
		bestSpread := -1
		for seed := uint64(0); seed < 2000; seed++ {
			seq := crossedWalk(n, runs, n-1, rand.New(rand.NewPCG(seed, uint64(n*100+runs))))
			if sp := followSpread(n, n-1, seq); bestSpread < 0 || sp < bestSpread {
				best, bestSpread = seq, sp
				if sp <= 1 {
					break
				}
			}
		}
		out = append(out, best...)
	case OrderBalanced, "":
		left := make([]int, n)
		for k := range left {
			left[k] = runs
		}
		follows := map[[2]int]int{} // (previous way, way): times
		prev := -1
		for k := 0; k < n; k++ {
			out = append(out, run{way: k, warmup: true})
			follows[[2]int{prev, k}]++
			prev = k
		}
		for range n * runs {
			best := -1
			better := func(k int) bool {
				if best < 0 {
					return true
				}
				if (k == prev) != (best == prev) {
					return best == prev
				}
				if a, b := follows[[2]int{prev, k}], follows[[2]int{prev, best}]; a != b {
					return a < b
				}
				return left[k] > left[best]
			}
			for k := 0; k < n; k++ {
				if left[k] > 0 && better(k) {
					best = k
				}
			}
			out = append(out, run{way: best})
			left[best]--
			follows[[2]int{prev, best}]++
			prev = best
		}
	case OrderBlocked:
		for k := 0; k < n; k++ {
			out = append(out, run{way: k, warmup: true})
			for range runs {
				out = append(out, run{way: k})
			}
		}
	default:
		return nil, fmt.Errorf("order %q: want %s, %s or %s", order, OrderBalanced, OrderCrossed, OrderBlocked)
	}
	return out, nil
}

// crossedWalk is one greedy walk of OrderCrossed after a run of way prev.
func crossedWalk(n, runs, prev int, rng *rand.Rand) []run {
	left := make([]int, n)
	for k := range left {
		left[k] = runs
	}
	follows := make([]int, n*n) // [previous way * n + way]: times
	out := make([]run, 0, n*runs)
	for range n * runs {
		var cands []int
		for k := 0; k < n; k++ {
			if left[k] == 0 {
				continue
			}
			if len(cands) > 0 {
				c := cands[0]
				if a, b := follows[prev*n+k], follows[prev*n+c]; a > b || (a == b && left[k] < left[c]) {
					continue
				} else if a < b || left[k] > left[c] {
					cands = cands[:0]
				}
			}
			cands = append(cands, k)
		}
		k := cands[rng.IntN(len(cands))]
		out = append(out, run{way: k})
		left[k]--
		follows[prev*n+k]++
		prev = k
	}
	return out
}

// followSpread is the largest difference, over the ways, between how
// often two ways (itself included) ran right after it in seq, which
// follows a run of way prev.
func followSpread(n, prev int, seq []run) int {
	follows := make([]int, n*n)
	for _, r := range seq {
		follows[prev*n+r.way]++
		prev = r.way
	}
	spread := 0
	for a := 0; a < n; a++ {
		row := follows[a*n : (a+1)*n]
		lo, hi := row[0], row[0]
		for _, c := range row {
			lo, hi = min(lo, c), max(hi, c)
		}
		spread = max(spread, hi-lo)
	}
	return spread
}

// orderText says in a report's words how a cell's runs were ordered.
func orderText(order string) string {
	switch order {
	case OrderBlocked:
		return "each way's runs back to back after one warm-up run that is not counted (-order blocked)"
	case OrderCrossed:
		return "the ways interleaved so that each runs right after each way, itself included, about equally often, after one warm-up run of each that is not counted (-order crossed)"
	}
	return "the ways interleaved so that each runs right after each other way about equally often, after one warm-up run of each that is not counted (-order balanced)"
}
