package trace

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// Spread says how a minute's invocations are placed inside it.
type Spread int

const (
	// Uniform spaces a minute's n invocations evenly: i·minute/n.
	Uniform Spread = iota
	// Poisson places them at independent uniform random times (the
	// arrival times of a Poisson process conditioned on n arrivals).
	Poisson
	// Burst places them at uniform random times in the minute's first
	// burst window: a spike that arrives within seconds.
	Burst
	// Spiky bursts the spike minutes (more than SpikeFactor times the
	// trace's median non-zero minute, and at least SpikeMin invocations)
	// and spaces the other minutes evenly, so a base rate stays a base
	// rate and a spike arrives within seconds.
	Spiky
)

// SpikeFactor and SpikeMin decide which minutes Spiky treats as spikes.
const (
	SpikeFactor = 4
	SpikeMin    = 10
)

// String returns the spread's name as ParseSpread accepts it.
func (s Spread) String() string {
	switch s {
	case Uniform:
		return "uniform"
	case Poisson:
		return "poisson"
	case Burst:
		return "burst"
	case Spiky:
		return "spiky"
	}
	return fmt.Sprintf("Spread(%d)", int(s))
}

// ParseSpread parses "uniform", "poisson", "burst" or "spiky".
func ParseSpread(s string) (Spread, error) {
	for _, v := range []Spread{Uniform, Poisson, Burst, Spiky} {
		if v.String() == s {
			return v, nil
		}
	}
	return 0, fmt.Errorf("unknown spread %q: want uniform, poisson, burst or spiky", s)
}

// SpikeThreshold returns the count above which Spiky bursts a minute.
func SpikeThreshold(counts []int) int {
	var nz []int
	for _, c := range counts {
		if c > 0 {
			nz = append(nz, c)
		}
	}
	if len(nz) == 0 {
		return SpikeMin
	}
	slices.Sort(nz)
	return max(SpikeMin-1, SpikeFactor*nz[len(nz)/2])
}

// Schedule returns the arrival offsets, sorted, of counts replayed with
// each trace minute lasting minute (real time: a compression of
// time.Minute/minute). With Burst (and Spiky's spike minutes), a minute's
// invocations fall in its first burst (clamped to the minute); seed makes
// the random spreads repeatable.
func Schedule(counts []int, minute time.Duration, spread Spread, burst time.Duration, seed int64) []time.Duration {
	rng := rand.New(rand.NewPCG(uint64(seed), 0x7363686564))
	if burst <= 0 || burst > minute {
		burst = minute
	}
	threshold := SpikeThreshold(counts)
	var out []time.Duration
	for m, n := range counts {
		base := time.Duration(m) * minute
		start := len(out)
		sp := spread
		if sp == Spiky {
			sp = Uniform
			if n > threshold {
				sp = Burst
			}
		}
		for i := 0; i < n; i++ {
			var off time.Duration
			switch sp {
			case Uniform:
				off = time.Duration(int64(minute) * int64(i) / int64(n))
			case Poisson:
				off = time.Duration(rng.Int64N(int64(minute)))
			default:
				off = time.Duration(rng.Int64N(int64(burst)))
			}
			out = append(out, base+off)
		}
		slices.Sort(out[start:])
	}
	return out
}

// Result is the outcome of one replayed invocation.
type Result struct {
	Index    int           // position in the schedule
	Due      time.Duration // scheduled offset from the replay's start
	Lateness time.Duration // how late it was fired (timer and in-flight limit)
	Latency  time.Duration // how long the invocation took
	Err      error         // the invocation's error, or the context's if it never ran
}

// Replay calls fn(ctx, i) for every arrival at its offset from now, each
// in its own goroutine, with at most maxInFlight running at once (0: no
// limit; an arrival that finds the limit reached waits and is reported
// late). It returns when every started call has returned; arrivals not
// yet fired when ctx ends are reported with ctx's error.
func Replay(ctx context.Context, arrivals []time.Duration, maxInFlight int, fn func(ctx context.Context, i int) error) []Result {
	res := make([]Result, len(arrivals))
	var sem chan struct{}
	if maxInFlight > 0 {
		sem = make(chan struct{}, maxInFlight)
	}
	var wg sync.WaitGroup
	start := time.Now()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for i, due := range arrivals {
		res[i] = Result{Index: i, Due: due}
		if d := time.Until(start.Add(due)); d > 0 {
			timer.Reset(d)
			select {
			case <-timer.C:
			case <-ctx.Done():
			}
		}
		if sem != nil {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
			}
		}
		if ctx.Err() != nil {
			for j := i; j < len(arrivals); j++ {
				res[j] = Result{Index: j, Due: arrivals[j], Err: ctx.Err()}
			}
			break
		}
		fired := time.Now()
		res[i].Lateness = max(0, fired.Sub(start)-due)
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			t := time.Now()
			err := fn(ctx, i)
			res[i].Latency, res[i].Err = time.Since(t), err
			if sem != nil {
				<-sem
			}
		}(i)
	}
	wg.Wait()
	return res
}

// Stats summarizes replay results.
type Stats struct {
	N           int           // invocations
	Errors      int           // invocations that returned an error
	P50, P99    time.Duration // latency percentiles of all invocations
	Max         time.Duration
	MaxLateness time.Duration
}

// Summarize computes Stats over rs.
func Summarize(rs []Result) Stats {
	s := Stats{N: len(rs)}
	lat := make([]time.Duration, 0, len(rs))
	for _, r := range rs {
		if r.Err != nil {
			s.Errors++
		}
		lat = append(lat, r.Latency)
		s.MaxLateness = max(s.MaxLateness, r.Lateness)
	}
	slices.Sort(lat)
	s.P50, s.P99 = Percentile(lat, 50), Percentile(lat, 99)
	if len(lat) > 0 {
		s.Max = lat[len(lat)-1]
	}
	return s
}

// Percentile returns the p-th percentile (nearest rank) of sorted.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	k := int(float64(len(sorted))*p/100+0.999999) - 1
	return sorted[min(max(k, 0), len(sorted)-1)]
}
