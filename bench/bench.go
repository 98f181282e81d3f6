// Package bench is the benchmark harness of the mitosis engine: it starts
// parent programs (C and Python sources embedded under workloads/, the C
// ones built with gcc at startup), prepares them into seeds and measures
// Prepare, the start latency of forked children and start+execution of a
// memory-bound child against local fork(2) and exec-from-scratch baselines,
// and the cost of a multi-threaded parent's threads (threads.go), all on one
// host in one run. cmd/mitosis-bench is its command line.
//
// Every group runs one discarded warm-up iteration and then Config.Runs
// measured iterations; within an iteration the group's cases run
// round-robin, so they share the host's noise. Every child's output and exit
// status is checked: a wrong result aborts the group with an error.
package bench

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"

	"github.com/mitosis-fork/mitosis/engine"
)

//go:embed workloads
var workloadFS embed.FS

// Python is the interpreter of the Python parents; it must have numpy and
// pandas.
const Python = "/usr/bin/python3"

// Timeouts of one step of a run.
const (
	readyTimeout  = 180 * time.Second // a parent printing READY (pandas builds a frame)
	resultTimeout = 60 * time.Second  // a child's output after the request
	doneTimeout   = 30 * time.Second  // a child's exit after its output
)

// Group names accepted by Config.Only.
const (
	GroupPrepare    = "prepare"
	GroupHello      = "start-python-hello"
	GroupArray      = "array64"
	GroupArrayNumpy = "array64-numpy"
	// GroupRemote selects the remote-fork benchmarks (see remote.go): a
	// three-node cluster in network namespaces on this host. They run only
	// when named, never by default.
	GroupRemote = "remote"
)

// groupOrder is the order groups run and are reported in.
var groupOrder = []string{GroupPrepare, GroupHello, GroupArray, GroupArrayNumpy, GroupThreads}

// prepareSubjects are the parents of the prepare group; each name is also
// accepted by Config.Only to run only that parent.
var prepareSubjects = []string{"prepare-16mb", "prepare-64mb", "prepare-256mb", "prepare-pandas"}

// Config configures Run.
type Config struct {
	// Runs is the number of measured runs per case (a warm-up run is added
	// and discarded).
	Runs int
	// Only restricts the run to these groups (GroupPrepare, ...,
	// GroupThreads, GroupContainer, GroupRemote) or prepare cases
	// (prepare-16mb, prepare-64mb, prepare-256mb, prepare-pandas). Empty
	// means every group but GroupContainer and GroupRemote.
	Only []string
	// Log receives progress lines; nil discards them.
	Log io.Writer
	// CommandLine is recorded in the report header.
	CommandLine string
	// Mitosis is the mitosis binary the remote benchmarks run as node
	// daemons; empty builds github.com/mitosis-fork/mitosis/cmd/mitosis
	// with `go build` (the current directory must be inside the module).
	Mitosis string
	// FanOut is the number of children per node of the remote fan-out
	// benchmark (default 10).
	FanOut int
}

// Names lists what Config.Only accepts.
func Names() []string {
	return append(append(slices.Clone(groupOrder), prepareSubjects...), GroupRemote, GroupContainer, GroupUserPath)
}

type runner struct {
	ctx     context.Context
	cfg     Config
	log     io.Writer
	dir     string
	env     []string
	devnull *os.File
	e       *engine.Engine
	parents []*parent
	// seedRetries counts RemoveSeed calls refused because a child whose
	// Done was closed was still counted as running.
	seedRetries int
}

// Run builds the workloads in a temporary directory, starts an engine,
// runs the selected groups and returns their report. A group that fails is
// reported with its Error set (see Report.Failed) and the others still run;
// the returned error is for failures outside a group (setup, engine close).
// Every parent is killed and reaped, the engine closed and the temporary
// directory removed before Run returns.
func Run(ctx context.Context, cfg Config) (rep *Report, err error) {
	if cfg.Runs < 1 {
		return nil, fmt.Errorf("runs must be at least 1, got %d", cfg.Runs)
	}
	groups, subjects, err := selection(cfg.Only)
	if err != nil {
		return nil, err
	}
	if err := testenv.CloseInheritedFDs(); err != nil {
		return nil, err
	}
	start := time.Now()
	rep = &Report{Machine: machineInfo(), Date: start, CommandLine: cfg.CommandLine, Runs: cfg.Runs}
	r := &runner{ctx: ctx, cfg: cfg, log: cfg.Log}
	if r.log == nil {
		r.log = io.Discard
	}
	r.dir, err = os.MkdirTemp("", "mitosis-bench-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if rmErr := os.RemoveAll(r.dir); rmErr != nil {
			err = errors.Join(err, rmErr)
		}
	}()
	defer func() {
		for _, p := range r.parents {
			p.kill()
		}
		if r.e != nil {
			if cerr := r.e.Close(); cerr != nil {
				err = errors.Join(err, fmt.Errorf("engine Close: %w", cerr))
			}
		}
		if r.devnull != nil {
			r.devnull.Close()
		}
	}()
	if err := r.setup(&rep.Machine); err != nil {
		return nil, err
	}
	for _, name := range groupOrder {
		if !groups[name] {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		var g *Group
		switch name {
		case GroupPrepare:
			g = r.prepareGroup(subjects)
		case GroupHello:
			g = r.startGroup(r.helloSpec())
		case GroupArray:
			g = r.startGroup(r.arraySpec())
		case GroupArrayNumpy:
			g = r.startGroup(r.numpySpec())
		case GroupThreads:
			g = r.threadsGroup()
		}
		if g.Error != "" {
			fmt.Fprintf(r.log, "%s: FAILED: %s\n", g.Name, g.Error)
		}
		rep.Groups = append(rep.Groups, g)
	}
	if groups[GroupContainer] && ctx.Err() == nil {
		g := r.containerGroup()
		if g.Error != "" {
			fmt.Fprintf(r.log, "%s: FAILED: %s\n", g.Name, g.Error)
		}
		rep.Groups = append(rep.Groups, g)
	}
	if groups[GroupUserPath] && ctx.Err() == nil {
		for _, g := range r.userPathGroups() {
			if g.Error != "" {
				fmt.Fprintf(r.log, "%s: FAILED: %s\n", g.Name, g.Error)
			}
			rep.Groups = append(rep.Groups, g)
		}
	}
	if groups[GroupRemote] && ctx.Err() == nil {
		gs, notes := r.remoteGroups()
		rep.Groups = append(rep.Groups, gs...)
		rep.Notes = append(rep.Notes, notes...)
		if len(groups) == 1 {
			rep.Title = "mitosis remote-fork benchmarks"
		}
	}
	if r.seedRetries > 0 {
		rep.Notes = append(rep.Notes, fmt.Sprintf("RemoveSeed right after the last child's Done() was closed was refused (\"still has N running children\") %d times and retried: the engine closes Done before it forgets the child", r.seedRetries))
	}
	rep.Wall = time.Since(start)
	rep.finish()
	return rep, ctx.Err()
}

// selection resolves Config.Only into the groups to run and the prepare
// subjects.
func selection(only []string) (map[string]bool, []string, error) {
	groups := map[string]bool{}
	var subjects []string
	if len(only) == 0 {
		for _, g := range groupOrder {
			groups[g] = true
		}
		return groups, prepareSubjects, nil
	}
	allSubjects := false
	for _, n := range only {
		n = strings.TrimSpace(n)
		switch {
		case slices.Contains(groupOrder, n):
			groups[n] = true
			if n == GroupPrepare {
				allSubjects = true
			}
		case n == GroupRemote, n == GroupContainer, n == GroupUserPath:
			groups[n] = true
		case slices.Contains(prepareSubjects, n):
			groups[GroupPrepare] = true
			subjects = append(subjects, n)
		default:
			return nil, nil, fmt.Errorf("unknown benchmark %q (known: %s)", n, strings.Join(Names(), ", "))
		}
	}
	if allSubjects {
		subjects = prepareSubjects
	} else {
		// keep the canonical order
		subjects = slices.DeleteFunc(slices.Clone(prepareSubjects), func(s string) bool { return !slices.Contains(subjects, s) })
	}
	return groups, subjects, nil
}

// setup writes the workloads, builds the C ones, records tool versions and
// starts the engine.
func (r *runner) setup(m *Machine) error {
	err := fs.WalkDir(workloadFS, "workloads", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := workloadFS.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(r.dir, filepath.Base(path)), b, 0o644)
	})
	if err != nil {
		return fmt.Errorf("write workloads: %w", err)
	}
	for _, name := range []string{"alloc", "array", "threads"} {
		args := []string{"-O2", "-o", filepath.Join(r.dir, name), filepath.Join(r.dir, name+".c")}
		if name == "threads" {
			args = append(args, "-pthread")
		}
		out, err := exec.Command("gcc", args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("gcc %s.c: %v\n%s", name, err, out)
		}
	}
	if out, err := exec.Command("gcc", "--version").Output(); err == nil {
		m.GCC, _, _ = strings.Cut(string(out), "\n")
	}
	r.env = append(os.Environ(),
		"OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1",
		"PYTHONDONTWRITEBYTECODE=1")
	ver := exec.Command(Python, "-c", "import sys, numpy, pandas; print('Python %s, numpy %s, pandas %s' % (sys.version.split()[0], numpy.__version__, pandas.__version__))")
	ver.Env = r.env
	if out, err := ver.Output(); err == nil {
		m.Python = strings.TrimSpace(string(out))
	} else {
		m.Python = fmt.Sprintf("%s: %v", Python, err)
	}
	r.devnull, err = os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	r.e, err = engine.New(engine.Options{StateDir: r.dir})
	if err != nil {
		return fmt.Errorf("engine New: %w", err)
	}
	return nil
}

// startParent starts a parent program and remembers it for the final
// cleanup.
func (r *runner) startParent(name string, argv ...string) (*parent, error) {
	return r.startParentEnv(name, r.env, argv...)
}

// startParentEnv is startParent with the environment env instead of the
// harness's (which limits the BLAS thread pools to one thread).
func (r *runner) startParentEnv(name string, env []string, argv ...string) (*parent, error) {
	fmt.Fprintf(r.log, "starting parent %s: %s\n", name, strings.Join(argv, " "))
	p, err := startParent(name, argv, env, r.dir, readyTimeout)
	if err != nil {
		return nil, err
	}
	r.parents = append(r.parents, p)
	return p, nil
}

// rotate returns the indices 0..n-1 starting at it mod n.
func rotate(n, it int) []int {
	idx := make([]int, n)
	for k := range idx {
		idx[k] = (it + k) % n
	}
	return idx
}

// prepareGroup measures e.Prepare on stopped parents of growing size and
// on a pandas parent.
func (r *runner) prepareGroup(subjects []string) *Group {
	g := &Group{
		Name:  GroupPrepare,
		Title: "Prepare wall time vs parent size",
		Description: "`e.Prepare(pid)` wall time on a stopped parent (the seed is removed with `RemoveSeed` after each run, untimed), " +
			"and the engine's own `Seed.Took`. prepare-NNmb: C parent (gcc -O2, dynamic) that mallocs and writes NN MiB, prints READY, raise(SIGSTOP). " +
			"prepare-pandas: /usr/bin/python3 with numpy and pandas imported and a 1e6-row DataFrame (int, float, categorical, string columns).",
		Baseline: subjects[0],
	}
	type subj struct {
		name  string
		p     *parent
		wall  *Case
		took  *Case
		seed  *engine.Seed
		pages uint64
		// runs after which the parent was not yet stopped again
		notStopped int
	}
	var ss []*subj
	for _, name := range subjects {
		var argv []string
		switch name {
		case "prepare-pandas":
			argv = []string{Python, filepath.Join(r.dir, "pandas_parent.py")}
		default:
			mib := strings.TrimSuffix(strings.TrimPrefix(name, "prepare-"), "mb")
			argv = []string{filepath.Join(r.dir, "alloc"), mib}
		}
		p, err := r.startParent(name, argv...)
		if err != nil {
			g.Error = err.Error()
			return g
		}
		defer p.kill()
		s := &subj{name: name, p: p, wall: &Case{Name: name}, took: &Case{Name: name + " (Seed.Took)"}}
		ss = append(ss, s)
		g.Cases = append(g.Cases, s.wall, s.took)
	}
	for it := 0; it <= r.cfg.Runs; it++ {
		if err := r.ctx.Err(); err != nil {
			g.Error = "interrupted: " + err.Error()
			return g
		}
		fmt.Fprintf(r.log, "%s: iteration %d/%d\n", g.Name, it, r.cfg.Runs)
		for _, k := range rotate(len(ss), it) {
			s := ss[k]
			t0 := time.Now()
			seed, err := r.e.Prepare(s.p.pid, engine.PrepareOptions{Name: s.name, ChannelFD: -1})
			d := time.Since(t0)
			if err != nil {
				g.Error = fmt.Sprintf("%s iteration %d: engine Prepare(%d): %v", s.name, it, s.p.pid, err)
				return g
			}
			s.wall.add(d, it == 0)
			s.took.add(seed.Took, it == 0)
			s.seed, s.pages = seed, seed.Desc.PresentPages()
			if err := r.e.RemoveSeed(seed); err != nil {
				g.Error = fmt.Sprintf("%s iteration %d: engine RemoveSeed(%s): %v", s.name, it, seed.ID, err)
				return g
			}
			// Prepare leaves a stopped parent stopped, but it may return
			// while the parent is still re-entering its stop after the
			// ptrace detach (state R for a moment): wait for T and make
			// sure it ran no user code (it would print RESUMED).
			if st, err := testenv.ProcState(s.p.pid); err == nil && st != 'T' {
				s.notStopped++
			}
			if err := testenv.WaitStopped(s.p.pid, 10*time.Second); err != nil {
				g.Error = fmt.Sprintf("%s iteration %d: parent %d after Prepare: %v%s", s.name, it, s.p.pid, err, s.p.stderrNote())
				return g
			}
			if err := s.p.checkQuiet(); err != nil {
				g.Error = fmt.Sprintf("%s iteration %d: after Prepare: %v", s.name, it, err)
				return g
			}
		}
	}
	for _, s := range ss {
		if s.notStopped > 0 {
			g.Notes = append(g.Notes, fmt.Sprintf("%s: right after Prepare returned, the parent was momentarily not in state T (re-entering its stop after the engine's ptrace detach) in %d of %d runs; each time it was stopped again shortly after and had run no user code (it wrote nothing)",
				s.name, s.notStopped, r.cfg.Runs+1))
		}
	}
	for _, s := range ss {
		g.Notes = append(g.Notes, fmt.Sprintf("%s: seed of %d VMAs, %d present pages (%.1f MiB) to copy-on-write",
			s.name, len(s.seed.Desc.VMAs), s.pages, float64(s.pages)*4096/(1<<20)))
	}
	return g
}
