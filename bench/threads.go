package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mitosis-fork/mitosis/engine"
	"github.com/mitosis-fork/mitosis/internal/testenv"
)

// GroupThreads selects the multi-threaded-parent benchmarks (issue #10):
// Prepare and start latency of C parents with 1, 4, 16 and 64 threads
// against local fork(2), and a numpy parent with its default BLAS thread
// pool against the same parent limited to one thread.
const GroupThreads = "threads"

// threadCounts are the thread counts (the main thread included) of the C
// parents of the threads group; the first is the one-thread reference the
// per-thread costs are computed against.
var threadCounts = []int{1, 4, 16, 64}

// Targets of issue #10.
const (
	// threadStartTarget bounds the start latency each extra thread of
	// the parent may add.
	threadStartTarget = 50 * time.Microsecond
	// numpyPoolTarget bounds the start latency of a numpy child with the
	// default BLAS pool, as a multiple of the one-thread parent's.
	numpyPoolTarget = 1.3
)

// blasThreadVars limit the thread pools of OpenBLAS, OpenMP and MKL; the
// harness sets the first three to 1 for its other Python parents.
var blasThreadVars = []string{"OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS"}

// Case name parts of the threads group.
const (
	thPrepWall = "prepare (wall)"
	thPrepTook = "prepare (Seed.Took)"
	thStart    = "mitosis start"
	thTook     = "mitosis: Fork() return (Child.Took)"
	thLocal    = "local fork"
	thTraced   = "mitosis start, threads set by the tracer"

	npDefault = "numpy, default BLAS pool"
	npOne     = "numpy, OPENBLAS_NUM_THREADS=1"
)

// threadCase names the case what of the C parent with n threads.
func threadCase(n int, what string) string { return fmt.Sprintf("N=%d %s", n, what) }

// perExtraThread is the cost of one extra thread: the growth of a median
// from the one-thread parent (med1) to the n-thread one (medN), divided by
// the n-1 extra threads. It is negative when noise outweighs the growth.
func perExtraThread(medN, med1 time.Duration, n int) time.Duration {
	if n <= 1 {
		return 0
	}
	return (medN - med1) / time.Duration(n-1)
}

// verdict renders whether a target was met.
func verdict(met bool) string {
	if met {
		return "met"
	}
	return "**missed**"
}

// envWithout returns env without the variables named in keys.
func envWithout(env []string, keys ...string) []string {
	return slices.DeleteFunc(slices.Clone(env), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		return slices.Contains(keys, k)
	})
}

// taskIDs lists the threads of process pid (/proc/PID/task).
func taskIDs(pid int) ([]int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return nil, err
	}
	var tids []int
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids, nil
}

// waitGroupStopped polls until every thread of pid is stopped (state T):
// testenv.WaitStopped looks at the main thread only, and the other
// threads of a group-stopping process join the stop a moment later.
func waitGroupStopped(pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		tids, err := taskIDs(pid)
		if err != nil {
			return fmt.Errorf("pid %d: waiting for its threads to stop: %w", pid, err)
		}
		running := ""
		for _, tid := range tids {
			st, err := testenv.ProcState(tid)
			if err != nil {
				continue // exited since the listing
			}
			if st == 'Z' || st == 'X' {
				return fmt.Errorf("pid %d: thread %d exited (state %c) instead of stopping", pid, tid, st)
			}
			if st != 'T' {
				running = fmt.Sprintf("thread %d in state %c", tid, st)
				break
			}
		}
		if running == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pid %d not stopped within %v: %s", pid, timeout, running)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// threadsGroup measures, in one round-robin run, Prepare and the start
// latency of mitosis children of C parents with threadCounts threads
// against a local fork(2) of the same parent, and the start latency of a
// numpy parent with and without its BLAS thread pool.
func (r *runner) threadsGroup() *Group {
	g := &Group{
		Name:  GroupThreads,
		Title: "multi-threaded parents (issue #10)",
		Description: "C parent: workloads/threads.c N (gcc -O2 -pthread): N-1 worker threads, each incrementing its own counter with a 1 ms nanosleep between increments; the main thread prints READY and stops the process with raise(SIGSTOP). " +
			"prepare: `e.Prepare(pid)` on the stopped parent, wall time and `Seed.Took` (the seed is removed after each run, untimed, after checking that it recorded N-1 other threads). " +
			"mitosis start: time from just before `e.Fork(seed, {})` to the moment the bench reads the byte \"x\" the child's main thread writes, from one seed prepared before the runs (warm page cache, as `mitosis lazy` of the start groups); " +
			"after that, untimed, the child checks that it has N threads (/proc/self/task) and that every worker's counter moves on, and prints `THREADS N ok`, which the bench checks. " +
			"local fork: SIGCONT to the stopped parent, whose main thread fork()s a child that writes \"x\" (fork(2) copies only the calling thread: a baseline for the cost of starting the process, not its threads). " +
			"numpy: /usr/bin/python3 running workloads/numpy_threads.py (imports numpy, multiplies two 256x256 matrices, stops itself with SIGSTOP) with OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS and GOTO_NUM_THREADS removed from its environment (numpy's BLAS starts its default pool) " +
			"or with OPENBLAS_NUM_THREADS=1; mitosis start as above, and afterwards, untimed, the child multiplies again on its inherited pool and prints `MATMUL ok` if the product equals the parent's. " +
			"Per extra thread = (median at N - median at N=1) / (N-1).",
		Baseline: threadCase(1, thStart),
	}
	type cparent struct {
		n                                      int
		p                                      *parent
		seed                                   *engine.Seed
		prepWall, prepTook, start, took, local *Case
		traced                                 *Case // MITOSIS_PTRACE_THREADS=1
		spec, localSpec                        startSpec
		stats                                  []engine.ChildStats
	}
	type npParent struct {
		label string
		p     *parent
		seed  *engine.Seed
		tasks int
		start *Case
		took  *Case
		spec  startSpec
		stats []engine.ChildStats
	}
	var cs []*cparent
	for _, n := range threadCounts {
		c := &cparent{n: n,
			prepWall: &Case{Name: threadCase(n, thPrepWall)}, prepTook: &Case{Name: threadCase(n, thPrepTook)},
			start: &Case{Name: threadCase(n, thStart)}, took: &Case{Name: threadCase(n, thTook)}, local: &Case{Name: threadCase(n, thLocal)},
			traced:    &Case{Name: threadCase(n, thTraced)},
			spec:      startSpec{want: "x", after: fmt.Sprintf("THREADS %d ok", n)},
			localSpec: startSpec{want: "x"},
		}
		cs = append(cs, c)
	}
	for _, c := range cs {
		g.Cases = append(g.Cases, c.start)
	}
	for _, c := range cs {
		g.Cases = append(g.Cases, c.traced)
	}
	for _, c := range cs {
		g.Cases = append(g.Cases, c.took)
	}
	for _, c := range cs {
		g.Cases = append(g.Cases, c.local)
	}
	for _, c := range cs {
		g.Cases = append(g.Cases, c.prepWall, c.prepTook)
	}
	base := envWithout(r.env, blasThreadVars...)
	nps := []*npParent{
		{label: npDefault, start: &Case{Name: npDefault + ": " + thStart}, took: &Case{Name: npDefault + ": Fork() return (Child.Took)"}},
		{label: npOne, start: &Case{Name: npOne + ": " + thStart}, took: &Case{Name: npOne + ": Fork() return (Child.Took)"}},
	}
	for _, np := range nps {
		np.spec = startSpec{want: "x", after: "MATMUL ok"}
		g.Cases = append(g.Cases, np.start, np.took)
	}
	fail := func(format string, args ...any) *Group {
		g.Error = fmt.Sprintf(format, args...)
		return g
	}
	// removeLater removes a long-lived seed when the group ends; deferred
	// after its parent's kill, it runs before it.
	removeLater := func(s *engine.Seed) {
		if err := r.removeSeed(s); err != nil && g.Error == "" {
			g.Error = err.Error()
		}
	}
	for _, c := range cs {
		p, err := r.startParent(fmt.Sprintf("threads-%d", c.n), filepath.Join(r.dir, "threads"), strconv.Itoa(c.n))
		if err != nil {
			return fail("%v", err)
		}
		defer p.kill()
		c.p = p
		if err := waitGroupStopped(p.pid, 10*time.Second); err != nil {
			return fail("N=%d parent: %v%s", c.n, err, p.stderrNote())
		}
		if tids, err := taskIDs(p.pid); err != nil || len(tids) != c.n {
			return fail("N=%d parent %d has %d threads (%v), want %d", c.n, p.pid, len(tids), err, c.n)
		}
		if c.seed, err = r.prepareStopped(p, fmt.Sprintf("threads-%d", c.n)); err != nil {
			return fail("N=%d: %v", c.n, err)
		}
		defer removeLater(c.seed)
		if got := len(c.seed.Desc.Threads); got != c.n-1 {
			return fail("N=%d: the seed recorded %d other threads, want %d", c.n, got, c.n-1)
		}
	}
	for i, np := range nps {
		env := base
		if np.label == npOne {
			env = append(slices.Clone(base), "OPENBLAS_NUM_THREADS=1")
		}
		p, err := r.startParentEnv(fmt.Sprintf("numpy-threads-%d", i), env, Python, filepath.Join(r.dir, "numpy_threads.py"))
		if err != nil {
			return fail("%v", err)
		}
		defer p.kill()
		np.p = p
		if err := waitGroupStopped(p.pid, 10*time.Second); err != nil {
			return fail("%s parent: %v%s", np.label, err, p.stderrNote())
		}
		tids, err := taskIDs(p.pid)
		if err != nil {
			return fail("%s parent %d: %v", np.label, p.pid, err)
		}
		np.tasks = len(tids)
		if np.seed, err = r.prepareStopped(p, fmt.Sprintf("numpy-threads-%d", i)); err != nil {
			return fail("%s: %v", np.label, err)
		}
		defer removeLater(np.seed)
		if got := len(np.seed.Desc.Threads); got != np.tasks-1 {
			return fail("%s: the seed recorded %d other threads, the parent has %d threads", np.label, got, np.tasks)
		}
	}

	type method struct {
		name string
		run  func(warm bool) error
	}
	var methods []method
	for _, c := range cs {
		methods = append(methods,
			method{c.prepWall.Name, func(warm bool) error {
				t0 := time.Now()
				seed, err := r.e.Prepare(c.p.pid, engine.PrepareOptions{Name: fmt.Sprintf("threads-%d-prepare", c.n), ChannelFD: -1})
				d := time.Since(t0)
				if err != nil {
					return fmt.Errorf("engine Prepare(%d): %v", c.p.pid, err)
				}
				others := len(seed.Desc.Threads)
				if err := r.removeSeed(seed); err != nil {
					return err
				}
				if others != c.n-1 {
					return fmt.Errorf("the seed recorded %d other threads, want %d", others, c.n-1)
				}
				if err := waitGroupStopped(c.p.pid, 10*time.Second); err != nil {
					return fmt.Errorf("parent after Prepare: %v%s", err, c.p.stderrNote())
				}
				if err := c.p.checkQuiet(); err != nil {
					return fmt.Errorf("after Prepare: %w", err)
				}
				c.prepWall.add(d, warm)
				c.prepTook.add(seed.Took, warm)
				return nil
			}},
			method{c.start.Name, func(warm bool) error {
				d, took, st, err := r.mitosisFork(c.seed, engine.ForkOptions{}, &c.spec)
				if err != nil {
					return err
				}
				c.start.add(d, warm)
				c.took.add(took, warm)
				if !warm {
					c.stats = append(c.stats, st)
				}
				return nil
			}},
			method{c.traced.Name, func(warm bool) error {
				// The restore's other way, side by side: the tracer seizes
				// the threads and sets their state with ptrace.
				os.Setenv("MITOSIS_PTRACE_THREADS", "1")
				d, _, _, err := r.mitosisFork(c.seed, engine.ForkOptions{}, &c.spec)
				os.Unsetenv("MITOSIS_PTRACE_THREADS")
				if err != nil {
					return err
				}
				c.traced.add(d, warm)
				return nil
			}},
			method{c.local.Name, func(warm bool) error {
				d, err := r.localFork(c.p, &c.localSpec)
				if err != nil {
					return err
				}
				if err := waitGroupStopped(c.p.pid, resultTimeout); err != nil {
					return fmt.Errorf("parent after its local fork: %v%s", err, c.p.stderrNote())
				}
				c.local.add(d, warm)
				return nil
			}},
		)
	}
	for _, np := range nps {
		methods = append(methods, method{np.start.Name, func(warm bool) error {
			d, took, st, err := r.mitosisFork(np.seed, engine.ForkOptions{}, &np.spec)
			if err != nil {
				return err
			}
			np.start.add(d, warm)
			np.took.add(took, warm)
			if !warm {
				np.stats = append(np.stats, st)
			}
			return nil
		}})
	}
	for it := 0; it <= r.cfg.Runs; it++ {
		if err := r.ctx.Err(); err != nil {
			return fail("interrupted: %v", err)
		}
		fmt.Fprintf(r.log, "%s: iteration %d/%d\n", g.Name, it, r.cfg.Runs)
		for _, k := range rotate(len(methods), it) {
			m := methods[k]
			if err := m.run(it == 0); err != nil {
				return fail("%s, iteration %d: %v", m.name, it, err)
			}
		}
	}

	// Tables: per thread count, the numpy pair, the targets.
	med := func(c *Case) time.Duration { return summarize(c.Samples).Median }
	p99 := func(c *Case) time.Duration { return summarize(c.Samples).P99 }
	one := cs[0]
	perN := Table{Header: []string{"threads N", "mitosis start", "start p99", "Fork() return", "local fork", "prepare wall", "Seed.Took",
		"start per extra thread", "Fork() return per extra thread", "prepare wall per extra thread", "start, threads set by the tracer", "per extra thread"}}
	slopes := map[int]time.Duration{}
	for _, c := range cs {
		row := []string{strconv.Itoa(c.n), fmtDur(med(c.start)), fmtDur(p99(c.start)), fmtDur(med(c.took)), fmtDur(med(c.local)),
			fmtDur(med(c.prepWall)), fmtDur(med(c.prepTook)), "-", "-", "-", fmtDur(med(c.traced)), "-"}
		if c.n > 1 {
			slopes[c.n] = perExtraThread(med(c.start), med(one.start), c.n)
			row[7] = fmtDur(slopes[c.n])
			row[8] = fmtDur(perExtraThread(med(c.took), med(one.took), c.n))
			row[9] = fmtDur(perExtraThread(med(c.prepWall), med(one.prepWall), c.n))
			row[11] = fmtDur(perExtraThread(med(c.traced), med(one.traced), c.n))
		}
		perN.Rows = append(perN.Rows, row)
	}
	npT := Table{Header: []string{"numpy parent", "threads (/proc/PID/task)", "mitosis start", "start p99", "Fork() return", "start ratio to one thread"}}
	for _, np := range nps {
		npT.Rows = append(npT.Rows, []string{np.label, strconv.Itoa(np.tasks), fmtDur(med(np.start)), fmtDur(p99(np.start)), fmtDur(med(np.took)),
			fmt.Sprintf("%.2f×", float64(med(np.start))/float64(med(nps[1].start)))})
	}
	last := cs[len(cs)-1]
	var others []string
	for _, c := range cs[1 : len(cs)-1] {
		others = append(others, fmt.Sprintf("%s at N=%d", fmtDur(slopes[c.n]), c.n))
	}
	ratio := float64(med(nps[0].start)) / float64(med(nps[1].start))
	// The marginal cost of a thread, apart from the fixed cost of taking
	// the threaded path at all (one Cloner run, a requeue count, a wake):
	// the least-squares line through the start medians over N.
	var ns, ts []float64
	for _, c := range cs {
		ns, ts = append(ns, float64(c.n)), append(ts, float64(med(c.start)))
	}
	icpt, slope := fitLine(ns, ts)
	fixed := time.Duration(icpt+slope) - med(one.start)
	targets := Table{Header: []string{"target (issue #10)", "measured", "verdict"}, Rows: [][]string{
		{fmt.Sprintf("each extra thread adds ≤ %s to the start latency", fmtDur(threadStartTarget)),
			fmt.Sprintf("%s per extra thread at N=%d (median %s vs %s at N=1; p99 %s vs %s); %s; least-squares slope over N: %s per thread, plus %s once for the threaded path",
				fmtDur(slopes[last.n]), last.n, fmtDur(med(last.start)), fmtDur(med(one.start)), fmtDur(p99(last.start)), fmtDur(p99(one.start)),
				strings.Join(others, ", "), fmtDur(time.Duration(slope)), fmtDur(fixed)),
			verdict(slopes[last.n] <= threadStartTarget)},
		{fmt.Sprintf("numpy child with the default BLAS pool starts within %.1f× of one thread", numpyPoolTarget),
			fmt.Sprintf("%.2f× (median %s with %d threads vs %s with %d)", ratio, fmtDur(med(nps[0].start)), nps[0].tasks, fmtDur(med(nps[1].start)), nps[1].tasks),
			verdict(ratio <= numpyPoolTarget)},
	}}
	g.Tables = append(g.Tables, perN, npT, targets)

	for _, c := range cs {
		g.Notes = append(g.Notes, fmt.Sprintf("N=%d: seed of %d VMAs, %d present pages (%.1f MiB), %d other threads in the descriptor",
			c.n, len(c.seed.Desc.VMAs), c.seed.Desc.PresentPages(), float64(c.seed.Desc.PresentPages())*4096/(1<<20), len(c.seed.Desc.Threads)))
	}
	for _, np := range nps {
		g.Notes = append(g.Notes, fmt.Sprintf("%s: parent with %d thread(s); seed of %d VMAs, %d present pages (%.1f MiB)",
			np.label, np.tasks, len(np.seed.Desc.VMAs), np.seed.Desc.PresentPages(), float64(np.seed.Desc.PresentPages())*4096/(1<<20)))
	}
	if nps[0].tasks <= 1 {
		g.Notes = append(g.Notes, "the numpy parent without thread limits has a single thread here (numpy's BLAS starts no pool on this host): its comparison with OPENBLAS_NUM_THREADS=1 measures nothing about threads")
	}
	for _, c := range cs {
		g.Notes = append(g.Notes, statsNote(c.start.Name, c.stats))
	}
	for _, np := range nps {
		g.Notes = append(g.Notes, statsNote(np.start.Name, np.stats))
	}
	return g
}

// fitLine returns the least-squares line y = a + b*x through the points.
func fitLine(xs, ys []float64) (a, b float64) {
	n := float64(len(xs))
	var sx, sy, sxx, sxy float64
	for i := range xs {
		sx, sy = sx+xs[i], sy+ys[i]
		sxx, sxy = sxx+xs[i]*xs[i], sxy+xs[i]*ys[i]
	}
	if d := n*sxx - sx*sx; d != 0 {
		b = (n*sxy - sx*sy) / d
	}
	return (sy - b*sx) / n, b
}
