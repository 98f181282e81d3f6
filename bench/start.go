package bench

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"

	"github.com/mitosis-fork/mitosis/engine"
)

// Case names of the start groups.
const (
	caseLocal     = "local fork"
	caseLazy      = "mitosis lazy"
	caseLazyCold  = "mitosis lazy, cold cache"
	caseLazyCopy  = "mitosis lazy, NoCache"
	casePrefetch  = "mitosis lazy + working-set prefetch"
	caseEager     = "mitosis eager"
	caseExec      = "exec from scratch"
	caseLazyTook  = "mitosis lazy: Fork() return (Child.Took)"
	caseEagerTook = "mitosis eager: Fork() return (Child.Took)"
)

// startCaseDoc explains the mitosis cases in every start group's notes.
const startCaseDoc = "mitosis lazy: `e.Fork(seed, {})` from one seed prepared before the runs; its children map pages from the seed's shared page cache, " +
	"which the warm-up child and every earlier child have filled (warm cache). " +
	"mitosis lazy, cold cache: the first child of a seed prepared just before it (Prepare and RemoveSeed untimed), so every page it touches goes from the frozen copy into the cache. " +
	"mitosis lazy + working-set prefetch: `ForkOptions{Prefetch: true}`, the pages earlier children touched are mapped from the warm cache before the child runs. " +
	"mitosis lazy, NoCache: `ForkOptions{NoCache: true}`, pages copied into the child with UFFDIO_COPY on fault. " +
	"mitosis eager: `ForkOptions{Eager: true}`, every present page installed before the child runs."

// startSpec describes a start group: a parent that stops itself in a loop
// (see workloads/hello.py) and what its children print.
type startSpec struct {
	name, title, desc string
	parentArgv        []string
	execArgv          []string
	// want is the child's whole output: a single byte "x", or a line
	// (without its newline) when line is set.
	want string
	line bool
	// after, if set, is a line the child prints after its result, read
	// and compared once the result was timed (mitosis children only: a
	// check the child makes of itself that the latency must not include).
	after string
}

func (r *runner) helloSpec() startSpec {
	return startSpec{
		name:  GroupHello,
		title: "start latency of a Python child",
		desc: "Time from just before the request to the moment the bench reads the byte \"x\" the child writes to its stdout pipe. " +
			"Parent: /usr/bin/python3 running workloads/hello.py (stops itself; a resumed mitosis child writes \"x\" and exits). " +
			"local fork: SIGCONT to the stopped parent, which os.fork()s a child that writes \"x\" (the parent then waits for it and stops again, untimed). " +
			"exec from scratch: `python3 -c 'import os; os.write(1,b\"x\")'`. " +
			"mitosis: `e.Fork(seed, {Stdio: devnull, pipe, devnull, ...})`; the bench closes its copy of the pipe's write end when Fork returns.",
		parentArgv: []string{Python, filepath.Join(r.dir, "hello.py")},
		execArgv:   []string{Python, "-c", `import os; os.write(1,b"x")`},
		want:       "x",
	}
}

// arrayLen is the length of the array of workloads/array.c.
const arrayLen = 64 << 20

// arraySum is the SUM workloads/array.c's work() prints.
func arraySum() uint64 {
	var s uint64
	for i := uint64(0); i < arrayLen; i++ {
		s += uint64(byte(i*7 + i>>12))
	}
	return s
}

func (r *runner) arraySpec() startSpec {
	return startSpec{
		name:  GroupArray,
		title: "start + execution of a C child reading 64 MiB",
		desc: "Time from the request to the moment the bench reads the child's \"SUM <n>\" line. " +
			"Parent: workloads/array.c (gcc -O2, dynamic) with a 64 MiB malloc'd array filled with a pattern; the child's work sums every byte (reads every page) and write(2)s the sum. " +
			"local fork: SIGCONT, the parent fork()s the worker. exec from scratch: the same binary with `once` (fills the array, sums it, exits). " +
			"The mitosis children page the array in through userfaultfd as they read it (lazy) or get it before they run (eager). Every SUM is checked against the value computed by the bench.",
		parentArgv: []string{filepath.Join(r.dir, "array")},
		execArgv:   []string{filepath.Join(r.dir, "array"), "once"},
		want:       fmt.Sprintf("SUM %d", arraySum()),
		line:       true,
	}
}

func (r *runner) numpySpec() startSpec {
	const n = 8 << 20
	return startSpec{
		name:  GroupArrayNumpy,
		title: "start + execution of a Python child summing a 64 MiB numpy array",
		desc: "As array64, with a /usr/bin/python3 parent (workloads/numpy_array.py) holding `np.arange(8<<20, dtype=np.float64)`; the work is `float(a.sum())`. " +
			"exec from scratch: the same script with `once` (python start, numpy import, arange, sum).",
		parentArgv: []string{Python, filepath.Join(r.dir, "numpy_array.py")},
		execArgv:   []string{Python, filepath.Join(r.dir, "numpy_array.py"), "once"},
		want:       fmt.Sprintf("SUM %d", uint64(n)*(n-1)/2),
		line:       true,
	}
}

// check reads the child's result from rd and compares it with the expected
// one.
func (sp *startSpec) check(rd *pipeReader, deadline time.Time) error {
	if sp.line {
		l, err := rd.readLine(deadline)
		if err != nil {
			return fmt.Errorf("reading the result line: %w", err)
		}
		if l != sp.want {
			return fmt.Errorf("WRONG RESULT: child printed %q, want %q", l, sp.want)
		}
		return nil
	}
	b, err := rd.readByte(deadline)
	if err != nil {
		return fmt.Errorf("reading the result byte: %w", err)
	}
	if string(b) != sp.want {
		return fmt.Errorf("WRONG RESULT: child wrote %q, want %q", b, sp.want)
	}
	return nil
}

// checkLine reads the next line from rd and compares it with want.
func checkLine(rd *pipeReader, want string, deadline time.Time) error {
	l, err := rd.readLine(deadline)
	if err != nil {
		return fmt.Errorf("reading the line after the result (want %q): %w", want, err)
	}
	if l != want {
		return fmt.Errorf("WRONG RESULT: child printed %q after its result, want %q", l, want)
	}
	return nil
}

// startGroup runs one start group: the parent is prepared once, then each
// iteration runs every case once, in a rotating order.
func (r *runner) startGroup(sp startSpec) *Group {
	g := &Group{Name: sp.name, Title: sp.title, Description: sp.desc + " " + startCaseDoc, Baseline: caseLocal}
	cases := map[string]*Case{}
	for _, n := range []string{caseLocal, caseLazy, casePrefetch, caseLazyCold, caseLazyCopy, caseEager, caseExec, caseLazyTook, caseEagerTook} {
		cases[n] = &Case{Name: n}
		g.Cases = append(g.Cases, cases[n])
	}
	p, err := r.startParent(sp.name, sp.parentArgv...)
	if err != nil {
		g.Error = err.Error()
		return g
	}
	defer p.kill()
	seed, err := r.prepareStopped(p, sp.name)
	if err != nil {
		g.Error = err.Error()
		return g
	}
	defer func() {
		if err := r.removeSeed(seed); err != nil && g.Error == "" {
			g.Error = err.Error()
		}
	}()
	g.Notes = append(g.Notes, fmt.Sprintf("seed: prepared once in %s; %d VMAs, %d present pages (%.1f MiB)",
		fmtDur(seed.Took), len(seed.Desc.VMAs), seed.Desc.PresentPages(), float64(seed.Desc.PresentPages())*4096/(1<<20)))

	stats := map[string][]engine.ChildStats{}
	// fork runs one mitosis case and records its samples.
	fork := func(name, tookName string, s *engine.Seed, opts engine.ForkOptions, warm bool) error {
		d, took, st, err := r.mitosisFork(s, opts, &sp)
		if err != nil {
			return err
		}
		cases[name].add(d, warm)
		if tookName != "" {
			cases[tookName].add(took, warm)
		}
		if !warm {
			stats[name] = append(stats[name], st)
		}
		return nil
	}
	type method struct {
		name string
		run  func(warm bool) error
	}
	methods := []method{
		{caseLocal, func(warm bool) error {
			d, err := r.localFork(p, &sp)
			if err == nil {
				cases[caseLocal].add(d, warm)
			}
			return err
		}},
		{caseLazy, func(warm bool) error {
			return fork(caseLazy, caseLazyTook, seed, engine.ForkOptions{}, warm)
		}},
		{caseLazyCold, func(warm bool) error {
			fresh, err := r.prepareStopped(p, sp.name+"-cold")
			if err != nil {
				return err
			}
			err = fork(caseLazyCold, "", fresh, engine.ForkOptions{}, warm)
			if rerr := r.removeSeed(fresh); err == nil {
				err = rerr
			}
			return err
		}},
		{casePrefetch, func(warm bool) error {
			return fork(casePrefetch, "", seed, engine.ForkOptions{Prefetch: true}, warm)
		}},
		{caseLazyCopy, func(warm bool) error {
			return fork(caseLazyCopy, "", seed, engine.ForkOptions{NoCache: true}, warm)
		}},
		{caseEager, func(warm bool) error {
			return fork(caseEager, caseEagerTook, seed, engine.ForkOptions{Eager: true}, warm)
		}},
		{caseExec, func(warm bool) error {
			d, err := r.execFromScratch(&sp)
			if err == nil {
				cases[caseExec].add(d, warm)
			}
			return err
		}},
	}
	for it := 0; it <= r.cfg.Runs; it++ {
		if err := r.ctx.Err(); err != nil {
			g.Error = "interrupted: " + err.Error()
			return g
		}
		fmt.Fprintf(r.log, "%s: iteration %d/%d\n", g.Name, it, r.cfg.Runs)
		for _, k := range rotate(len(methods), it) {
			m := methods[k]
			if err := m.run(it == 0); err != nil {
				g.Error = fmt.Sprintf("%s, iteration %d: %v", m.name, it, err)
				return g
			}
		}
	}
	for _, n := range []string{caseLazy, casePrefetch, caseLazyCold, caseLazyCopy, caseEager} {
		g.Notes = append(g.Notes, statsNote(n, stats[n]))
	}
	g.Notes = append(g.Notes, fmt.Sprintf("the seed's page cache held %.1f MiB at the end", float64(seed.CacheBytes())/(1<<20)))
	return g
}

// prepareStopped prepares the stopped parent p and checks that it is still
// stopped and ran no user code.
func (r *runner) prepareStopped(p *parent, name string) (*engine.Seed, error) {
	seed, err := r.e.Prepare(p.pid, engine.PrepareOptions{Name: name, ChannelFD: -1})
	if err != nil {
		return nil, fmt.Errorf("engine Prepare(%d): %v", p.pid, err)
	}
	if err := testenv.WaitStopped(p.pid, 10*time.Second); err != nil {
		err = fmt.Errorf("parent %d after Prepare: %v%s", p.pid, err, p.stderrNote())
		return nil, errors.Join(err, r.removeSeed(seed))
	}
	if err := p.checkQuiet(); err != nil {
		return nil, errors.Join(fmt.Errorf("after Prepare: %w", err), r.removeSeed(seed))
	}
	return seed, nil
}

// removeSeed removes a seed whose children have all exited (their Done
// channels closed). The engine closes Done before it forgets the child, so
// RemoveSeed may for a moment still count it: that refusal is retried for a
// while (and counted, see runner.seedRetries).
func (r *runner) removeSeed(s *engine.Seed) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := r.e.RemoveSeed(s)
		if err == nil {
			return nil
		}
		if !strings.Contains(err.Error(), "running children") || time.Now().After(deadline) {
			return fmt.Errorf("engine RemoveSeed(%s): %v", s.ID, err)
		}
		r.seedRetries++
		time.Sleep(time.Millisecond)
	}
}

// statsNote summarizes the children's paging counters (medians).
func statsNote(name string, st []engine.ChildStats) string {
	med := func(f func(engine.ChildStats) uint64) uint64 {
		v := make([]uint64, len(st))
		for i, s := range st {
			v[i] = f(s)
		}
		slices.Sort(v)
		if len(v) == 0 {
			return 0
		}
		return v[len(v)/2]
	}
	return fmt.Sprintf("%s, paging per child (median of %d): %d faults served, %d pages copied, %d mapped from the shared cache, %d zero pages, %d installed before the child ran",
		name, len(st), med(func(s engine.ChildStats) uint64 { return s.Faults }), med(func(s engine.ChildStats) uint64 { return s.PagesCopied }),
		med(func(s engine.ChildStats) uint64 { return s.PagesShared }), med(func(s engine.ChildStats) uint64 { return s.PagesZero }),
		med(func(s engine.ChildStats) uint64 { return s.Eager }))
}

// localFork continues the stopped parent, which forks a child that writes
// the result to the parent's stdout, and waits until the parent has stopped
// itself again (untimed).
func (r *runner) localFork(p *parent, sp *startSpec) (time.Duration, error) {
	if err := p.checkQuiet(); err != nil {
		return 0, err
	}
	t0 := time.Now()
	if err := syscall.Kill(p.pid, syscall.SIGCONT); err != nil {
		return 0, fmt.Errorf("SIGCONT %d: %w", p.pid, err)
	}
	err := sp.check(p.out, time.Now().Add(resultTimeout))
	d := time.Since(t0)
	if err != nil {
		return 0, fmt.Errorf("parent %d: %w%s", p.pid, err, p.stderrNote())
	}
	if err := testenv.WaitStopped(p.pid, resultTimeout); err != nil {
		return 0, fmt.Errorf("parent %d after its local fork: %w%s", p.pid, err, p.stderrNote())
	}
	return d, nil
}

// mitosisFork forks a child from seed with stdout on a fresh pipe and
// returns the time until its result was read and Child.Took. It waits for
// the child to exit and checks its status.
func (r *runner) mitosisFork(seed *engine.Seed, opts engine.ForkOptions, sp *startSpec) (time.Duration, time.Duration, engine.ChildStats, error) {
	var st engine.ChildStats
	pr, pw, err := os.Pipe()
	if err != nil {
		return 0, 0, st, err
	}
	defer pr.Close()
	t0 := time.Now()
	opts.Stdio = [3]*os.File{r.devnull, pw, r.devnull}
	c, err := r.e.Fork(seed, opts)
	pw.Close()
	if err != nil {
		return 0, 0, st, fmt.Errorf("engine Fork(Eager=%v, NoCache=%v): %v", opts.Eager, opts.NoCache, err)
	}
	rd := &pipeReader{f: pr}
	cerr := sp.check(rd, time.Now().Add(resultTimeout))
	d := time.Since(t0)
	if cerr == nil && sp.after != "" {
		cerr = checkLine(rd, sp.after, time.Now().Add(resultTimeout))
	}
	if cerr != nil {
		_ = syscall.Kill(c.PID, syscall.SIGKILL)
	}
	select {
	case <-c.Done():
	case <-time.After(doneTimeout):
		_ = syscall.Kill(c.PID, syscall.SIGKILL)
		select {
		case <-c.Done():
		case <-time.After(doneTimeout):
		}
		return 0, 0, st, fmt.Errorf("child %d did not exit within %v of its result (killed); result check: %v; engine error: %v; paging: %+v",
			c.PID, doneTimeout, cerr, c.Err(), c.Stats())
	}
	st = c.Stats()
	if cerr != nil {
		return 0, 0, st, fmt.Errorf("child %d: %w; its exit: %s; engine error: %v; paging: %+v", c.PID, cerr, describeStatus(c.Status()), c.Err(), st)
	}
	if ws := c.Status(); !ws.Exited() || ws.ExitStatus() != 0 || c.Err() != nil {
		return 0, 0, st, fmt.Errorf("child %d: %s; engine error: %v; paging: %+v", c.PID, describeStatus(ws), c.Err(), st)
	}
	return d, c.Took, st, nil
}

// execFromScratch starts sp.execArgv with stdout on a fresh pipe and
// returns the time until its result was read; it checks the exit status.
func (r *runner) execFromScratch(sp *startSpec) (time.Duration, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	defer pr.Close()
	ef, err := os.CreateTemp(r.dir, "stderr-")
	if err != nil {
		pw.Close()
		return 0, err
	}
	defer os.Remove(ef.Name())
	defer ef.Close()
	cmd := exec.Command(sp.execArgv[0], sp.execArgv[1:]...)
	cmd.Env = r.env
	cmd.Dir = r.dir
	cmd.Stdout = pw
	cmd.Stderr = ef
	t0 := time.Now()
	err = cmd.Start()
	pw.Close()
	if err != nil {
		return 0, err
	}
	cerr := sp.check(&pipeReader{f: pr}, time.Now().Add(resultTimeout))
	d := time.Since(t0)
	if cerr != nil {
		_ = cmd.Process.Kill()
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	var werr error
	select {
	case werr = <-waited:
	case <-time.After(doneTimeout):
		_ = cmd.Process.Kill()
		werr = fmt.Errorf("did not exit within %v of its result (killed): %v", doneTimeout, <-waited)
	}
	stderr := func() string {
		b, _ := os.ReadFile(ef.Name())
		if s := strings.TrimSpace(string(b)); s != "" {
			return "; its stderr: " + s
		}
		return ""
	}
	if cerr != nil {
		return 0, fmt.Errorf("%s: %w (exit: %v)%s", strings.Join(sp.execArgv, " "), cerr, werr, stderr())
	}
	if werr != nil {
		return 0, fmt.Errorf("%s: %v%s", strings.Join(sp.execArgv, " "), werr, stderr())
	}
	return d, nil
}

func describeStatus(ws syscall.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Sprintf("killed by signal %v", ws.Signal())
	default:
		return fmt.Sprintf("wait status %#x", uint32(ws))
	}
}
