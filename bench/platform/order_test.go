package platform

import (
	"slices"
	"testing"
)

// TestScheduleBalanced checks the balanced order for 1 to 4 ways and 1 to
// 7 runs: a warm-up run of each way first, then every way gets its runs,
// no way runs twice in a row, and each way's counted runs follow the
// others about equally often (successor counts differ by at most one).
func TestScheduleBalanced(t *testing.T) {
	for n := 1; n <= 4; n++ {
		for runs := 1; runs <= 7; runs++ {
			s, err := schedule(n, runs, OrderBalanced)
			if err != nil {
				t.Fatal(err)
			}
			count, follows := tally(t, s, n)
			for a := 0; a < n; a++ {
				if count[a] != runs {
					t.Errorf("n=%d runs=%d: way %d runs %d times", n, runs, a, count[a])
				}
				if n > 1 && follows[a][a] > 0 {
					t.Errorf("n=%d runs=%d: way %d follows itself (%v)", n, runs, a, s)
				}
				var succ []int
				for b := 0; b < n; b++ {
					if b != a {
						succ = append(succ, follows[a][b])
					}
				}
				if len(succ) > 0 && slices.Max(succ)-slices.Min(succ) > 1 {
					t.Errorf("n=%d runs=%d: way %d is followed %v times by the others (%v)", n, runs, a, succ, s)
				}
			}
		}
	}
}

// tally checks that s starts with one warm-up run of each of n ways, in
// order, and has no other warm-up run; it returns how many counted runs
// each way has and how often each way (row) is followed by each (column).
func tally(t *testing.T, s []run, n int) (count []int, follows [][]int) {
	t.Helper()
	count = make([]int, n)
	follows = make([][]int, n)
	for k := range follows {
		follows[k] = make([]int, n)
	}
	for i, r := range s {
		if i < n {
			if !r.warmup || r.way != i {
				t.Fatalf("n=%d: run %d is %+v, want the warm-up of way %d (%v)", n, i, r, i, s)
			}
			continue
		}
		if r.warmup {
			t.Fatalf("n=%d: a warm-up run after the first round: %v", n, s)
		}
		count[r.way]++
		follows[s[i-1].way][r.way]++
	}
	return count, follows
}

// TestScheduleBlocked checks the blocked order: each way's runs together,
// after one warm-up run of it.
func TestScheduleBlocked(t *testing.T) {
	s, err := schedule(3, 2, OrderBlocked)
	if err != nil {
		t.Fatal(err)
	}
	want := []run{{0, true}, {0, false}, {0, false}, {1, true}, {1, false}, {1, false}, {2, true}, {2, false}, {2, false}}
	if !slices.Equal(s, want) {
		t.Errorf("schedule = %v, want %v", s, want)
	}
	if _, err := schedule(2, 1, "cyclic"); err == nil {
		t.Error("an unknown order is accepted")
	}
}

// TestScheduleCrossed checks the crossed order for 1 to 4 ways and 1 to 7
// runs: a warm-up run of each way first, every way gets its runs, and each
// way is followed by every way, itself included, about equally often
// (successor counts differ by at most one), so that a way pays for its own
// aftermath as often as for another's. The order is the same every time.
func TestScheduleCrossed(t *testing.T) {
	for n := 1; n <= 4; n++ {
		for runs := 1; runs <= 7; runs++ {
			s, err := schedule(n, runs, OrderCrossed)
			if err != nil {
				t.Fatal(err)
			}
			if again, _ := schedule(n, runs, OrderCrossed); !slices.Equal(s, again) {
				t.Fatalf("n=%d runs=%d: two orders %v and %v", n, runs, s, again)
			}
			count, follows := tally(t, s, n)
			for a := 0; a < n; a++ {
				if count[a] != runs {
					t.Errorf("n=%d runs=%d: way %d runs %d times", n, runs, a, count[a])
				}
				if slices.Max(follows[a])-slices.Min(follows[a]) > 1 {
					t.Errorf("n=%d runs=%d: way %d is followed %v times by the ways (%v)", n, runs, a, follows[a], s)
				}
			}
		}
	}
}
