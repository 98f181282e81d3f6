package platform

import "fmt"

// Orders of a benchmark cell's runs (WorkflowConfig.Order).
const (
	// OrderBalanced interleaves the ways so that each runs right after
	// each other way about equally often, after one warm-up run of each
	// way that is not counted.
	OrderBalanced = "balanced"
	// OrderBlocked runs each way's runs back to back, after one warm-up
	// run of that way that is not counted.
	OrderBlocked = "blocked"
)

// run is one scheduled run of a cell: way k; a warm-up run is not counted.
type run struct {
	way    int
	warmup bool
}

// schedule orders the runs of a cell of n ways, runs counted runs each.
//
// Why the order matters: a run pays for what the run before it left. A
// storage run frees gigabytes (every rule's unpickled copy), which this
// VM's free page reporting hands back to the host within seconds, and the
// next run's fresh memory then costs a host fault per page. A cyclic
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
// OrderBlocked measures each way in its own steady state, as a platform
// that uses one transfer sees it: a warm-up run (which follows the previous
// way's block) and then runs runs.
func schedule(n, runs int, order string) ([]run, error) {
	var out []run
	switch order {
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
		return nil, fmt.Errorf("order %q: want %s or %s", order, OrderBalanced, OrderBlocked)
	}
	return out, nil
}

// orderText says in a report's words how a cell's runs were ordered.
func orderText(order string) string {
	if order == OrderBlocked {
		return "each way's runs back to back after one warm-up run that is not counted (-order blocked)"
	}
	return "the ways interleaved so that each runs right after each other way about equally often, after one warm-up run of each that is not counted (-order balanced)"
}
