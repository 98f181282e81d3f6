// Package suite is the FunctionBench-style benchmark suite of mitosis: Python
// functions with a realistic import/initialisation phase before the prepare
// point and a handler after it (workloads/wl_*.py, driven by
// workloads/runner.py), measured on this host in one run as cold start,
// warm start (a stopped instance continued with SIGCONT), local fork(2) of
// the initialised parent, and mitosis eager, lazy (cold and warm node page
// cache) and lazy + working-set prefetch forks; plus Prepare time against
// parent memory size, fan-out throughput from one seed, and the memory of
// N mitosis children against N warm or cold instances. Run writes a
// markdown report and SVG charts into a results directory.
//
// Every child's handler output is hashed (sha256) by the child and must equal
// the hash of every other instance of the same workload, cold starts
// included: a wrong result fails the group.
//
// The parents run on this host and are prepared from outside with the
// engine (no daemon); all cases are same-node (see Report.Notes).
package suite

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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"

	"github.com/mitosis-fork/mitosis/engine"
)

//go:embed workloads/*.py
var workloadFS embed.FS

// Python is the interpreter of every workload.
const Python = "/usr/bin/python3"

// Workloads are the FunctionBench-style workloads, in report order.
var Workloads = []string{"hello", "json", "aes", "template", "image", "pagerank", "zip", "pandas"}

// Other groups accepted by Config.Only.
const (
	GroupPrepare = "prepare"
	GroupFanOut  = "fanout"
	GroupMemory  = "memory"
)

var workloadDesc = map[string]string{
	"hello":    "hello world: no init; handler returns a constant",
	"json":     "json: init builds a 20k-record (~4 MB) document; handler json.dumps + json.loads + json.dumps",
	"aes":      "aes: init imports pyaes; handler AES-256-CTR encrypts and decrypts 12 KiB (pure Python)",
	"template": "template: init imports chameleon and compiles a template; handler renders a 1000x10 HTML table",
	"image":    "image: init imports Pillow and builds a 1024x1024 RGB image; handler rotate, flip, Gaussian blur, sharpen, resize",
	"pagerank": "pagerank: init imports igraph and builds a 100k-node Barabasi-Albert graph (m=3); handler PageRank",
	"zip":      "zip: init generates (once) a folder of 64 text files (4.2 MB) and lists it; handler reads and deflates them into an in-memory zip",
	"pandas":   "pandas: init imports numpy+pandas and builds a 1e6-row DataFrame; handler filter + group-by aggregation to CSV",
}

// Packages are the Debian packages the workloads import.
var Packages = []string{"python3-pyaes", "python3-chameleon", "python3-pil", "python3-igraph", "python3-numpy", "python3-pandas"}

// Timeouts of one step.
const (
	readyTimeout  = 180 * time.Second
	resultTimeout = 120 * time.Second
	doneTimeout   = 30 * time.Second
)

// Config configures Run.
type Config struct {
	// Quick runs every case once without warm-up, with small prepare
	// sizes, counts and fan-out (for CI: only checks numbers are produced).
	Quick bool
	// Runs is the number of measured runs per case (default 10; a warm-up
	// run is added and discarded unless Quick).
	Runs int
	// Only restricts the run to these workloads and groups (prepare,
	// fanout, memory). Empty means everything.
	Only []string
	// Out is the results directory (created).
	Out string
	// Log receives progress lines; nil discards them.
	Log io.Writer
	// CommandLine is recorded in the report and in every chart.
	CommandLine string
	// MemoryWorkloads are measured by the memory group (default hello,
	// pandas); MemoryCounts the instance counts (default 1, 10, 100; quick
	// 1, 2). ColdCap bounds the cold-started instances of a workload whose
	// cold start takes longer than 100 ms (default 10).
	MemoryWorkloads []string
	MemoryCounts    []int
	ColdCap         int
	// PrepareSizes are the parent memory sizes in MiB (default 1, 16, 64,
	// 256, 1024; quick 1, 16).
	PrepareSizes []int
	// FanOutWorkload (default hello), FanOutChildren (default 100, quick 4)
	// and FanOutConc (in-flight Fork requests, default 1, 2, 4).
	FanOutWorkload string
	FanOutChildren int
	FanOutConc     []int
	// NoInstall skips the apt-get install of missing Packages.
	NoInstall bool
	// Remote builds a 3-node bench/netlab lab (network namespaces, one
	// mitosis daemon each; needs root and iproute2) and adds the remote
	// start cases (RemoteCases: children on node b of a seed prepared by
	// node a) to every workload and the remote-fanout group. Mitosis is
	// the mitosis binary for the daemons (default: go build into the
	// scratch dir). RemoteFanOutChildren (default 40, quick 4) children of
	// one seed go to each target node, RemoteFanOutConc (default 2)
	// attached requests in flight per node.
	Remote               bool
	Mitosis              string
	RemoteFanOutChildren int
	RemoteFanOutConc     int
}

func (c *Config) defaults() {
	if c.Runs <= 0 {
		c.Runs = 10
	}
	if c.Quick {
		c.Runs = 1
	}
	if c.Out == "" {
		c.Out = "results"
	}
	if len(c.MemoryWorkloads) == 0 {
		c.MemoryWorkloads = []string{"hello", "pandas"}
	}
	if len(c.MemoryCounts) == 0 {
		c.MemoryCounts = []int{1, 10, 100}
		if c.Quick {
			c.MemoryCounts = []int{1, 2}
		}
	}
	if c.ColdCap <= 0 {
		c.ColdCap = 10
	}
	if len(c.PrepareSizes) == 0 {
		c.PrepareSizes = []int{1, 16, 64, 256, 1024}
		if c.Quick {
			c.PrepareSizes = []int{1, 16}
		}
	}
	if c.FanOutWorkload == "" {
		c.FanOutWorkload = "hello"
	}
	if c.FanOutChildren <= 0 {
		c.FanOutChildren = 100
		if c.Quick {
			c.FanOutChildren = 4
		}
	}
	if len(c.FanOutConc) == 0 {
		c.FanOutConc = []int{1, 2, 4}
	}
	if c.RemoteFanOutChildren <= 0 {
		c.RemoteFanOutChildren = 40
		if c.Quick {
			c.RemoteFanOutChildren = 4
		}
	}
	if c.RemoteFanOutConc <= 0 {
		c.RemoteFanOutConc = 2
	}
}

// Names lists what Config.Only accepts.
func Names() []string {
	return append(slices.Clone(Workloads), GroupPrepare, GroupFanOut, GroupMemory, GroupRemoteFanOut)
}

type runner struct {
	ctx     context.Context
	cfg     Config
	log     io.Writer
	dir     string // scratch: workloads, ctl files, data
	env     []string
	devnull *os.File
	errf    *os.File // stderr of every process the suite starts
	hold    string
	e       *engine.Engine
	parents []*parent
	lab     *lab // nil unless Config.Remote

	mu        sync.Mutex
	slowExits []string // children whose exit a daemon reported late
}

func (r *runner) logf(format string, a ...any) { fmt.Fprintf(r.log, format+"\n", a...) }

// Run runs the selected groups, writes the report (README.md, results.json)
// and the SVG charts into cfg.Out and returns the report. A failed group is
// reported with its Error set and the others still run. Every process the
// suite started is killed and reaped and the scratch directory removed
// before Run returns.
func Run(ctx context.Context, cfg Config) (rep *Report, err error) {
	cfg.defaults()
	sel := map[string]bool{}
	for _, n := range cfg.Only {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		if !slices.Contains(Names(), n) {
			return nil, fmt.Errorf("unknown benchmark %q (known: %s)", n, strings.Join(Names(), ", "))
		}
		sel[n] = true
	}
	all := len(sel) == 0
	want := func(n string) bool { return all || sel[n] }
	if err := testenv.CloseInheritedFDs(); err != nil {
		return nil, err
	}
	start := time.Now()
	rep = &Report{Machine: machineInfo(), Date: start, CommandLine: cfg.CommandLine, Runs: cfg.Runs, Quick: cfg.Quick}
	r := &runner{ctx: ctx, cfg: cfg, log: cfg.Log}
	if r.log == nil {
		r.log = io.Discard
	}
	if !cfg.NoInstall {
		if note := installPackages(r.log); note != "" {
			rep.Notes = append(rep.Notes, note)
		}
	}
	r.dir, err = os.MkdirTemp("", "mitosis-suite-")
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
		if r.errf != nil {
			r.errf.Close()
		}
	}()
	if err := r.setup(&rep.Machine); err != nil {
		return nil, err
	}
	if cfg.Remote && ctx.Err() == nil {
		r.lab, err = r.newLab()
		if err != nil {
			return nil, fmt.Errorf("remote lab: %w", err)
		}
		defer func() {
			// before the parents are killed and the scratch dir removed
			if cerr := r.lab.close(); cerr != nil {
				err = errors.Join(err, fmt.Errorf("remote lab: %w", cerr))
			}
		}()
		rep.Notes = append(rep.Notes, fmt.Sprintf("remote: lab %s built with bench/netlab: nodes a (%s), b (%s), c (%s), each a network namespace (%s-a/b/c) running `mitosis daemon`, veths on a bridge in namespace %s; all on this host, so the daemons, the origin and the children share its %d vCPUs and the 'network' is a veth pair + bridge (no latency added). The lab was removed at the end of the run.",
			r.lab.l.Prefix, r.lab.a.IP, r.lab.b.IP, r.lab.c.IP, r.lab.l.Prefix, r.lab.l.Hub, rep.Machine.NProc))
	}
	for _, wl := range Workloads {
		if !want(wl) || ctx.Err() != nil {
			continue
		}
		g := r.startGroup(wl)
		if g.Error != "" {
			r.logf("%s: FAILED: %s", wl, g.Error)
		}
		rep.Start = append(rep.Start, g)
	}
	if want(GroupPrepare) && ctx.Err() == nil {
		rep.Prepare = r.prepareGroup()
		if rep.Prepare.Error != "" {
			r.logf("prepare: FAILED: %s", rep.Prepare.Error)
		}
	}
	if want(GroupFanOut) && ctx.Err() == nil {
		rep.FanOut = r.fanOutGroup()
		if rep.FanOut.Error != "" {
			r.logf("fanout: FAILED: %s", rep.FanOut.Error)
		}
	}
	if r.lab != nil && want(GroupRemoteFanOut) && ctx.Err() == nil {
		rep.RemoteFanOut = r.remoteFanOutGroup()
		if rep.RemoteFanOut.Error != "" {
			r.logf("remote fanout: FAILED: %s", rep.RemoteFanOut.Error)
		}
	}
	if want(GroupMemory) {
		for _, wl := range cfg.MemoryWorkloads {
			if ctx.Err() != nil {
				break
			}
			g := r.memoryGroup(wl)
			if g.Error != "" {
				r.logf("memory %s: FAILED: %s", wl, g.Error)
			}
			rep.Memory = append(rep.Memory, g)
		}
	}
	if r.lab == nil {
		rep.Notes = append(rep.Notes, "All mitosis cases are same-node: the parents are prepared and forked by one in-process engine on this host (run with Config.Remote / `-remote` for the remote cases), so 'lazy' means lazy paging from the local frozen copy through the node page cache, not over the network.")
	} else {
		rep.Notes = append(rep.Notes, "The same-node mitosis cases (eager, lazy, lazy + prefetch) use one in-process engine on this host; the remote cases use the lab's daemons (a seed prepared by node a's daemon, children attached-forked by node b's daemon, pages over the lab network). Both kinds are timed the same way (request → line read from the child's stdout pipe).")
	}
	if n := len(r.slowExits); n > 0 {
		rep.Notes = append(rep.Notes, fmt.Sprintf("DAEMON EXIT REPORTS LATE: for %d children a daemon reported the exit of an attached child more than %v after the child wrote its result line (it exits right after): %s. The ~1 s delays match the 1 s safety-net waitid poll of engine.waitExit, i.e. the pidfd wake-up was apparently missed (not investigated further; engine code unchanged). It does not affect the measured latencies (they end at the result line), but it held up the sequential cases and, in remote-fanout, only the exit bookkeeping (a new request does not wait for the previous child's exit report).",
			n, slowExitAfter, strings.Join(r.slowExits[:min(n, 20)], "; ")))
	}
	if b, err := os.ReadFile(r.errf.Name()); err == nil && len(strings.TrimSpace(string(b))) > 0 {
		rep.Notes = append(rep.Notes, "stderr of the suite's processes (last 2000 bytes): `"+strings.ReplaceAll(tail(string(b), 2000), "\n", " ⏎ ")+"`")
	}
	rep.Wall = time.Since(start)
	rep.finish()
	if werr := rep.Write(cfg.Out); werr != nil {
		err = errors.Join(err, werr)
	}
	return rep, errors.Join(err, ctx.Err())
}

func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// installPackages apt-get installs the workloads' packages that are missing.
func installPackages(log io.Writer) string {
	var missing []string
	for _, p := range Packages {
		out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", p).Output()
		if err != nil || !strings.Contains(string(out), "install ok installed") {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return ""
	}
	fmt.Fprintf(log, "apt-get install -y %s\n", strings.Join(missing, " "))
	cmd := exec.Command("apt-get", append([]string{"install", "-y"}, missing...)...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Sprintf("apt-get install -y %s failed: %v: %s", strings.Join(missing, " "), err, tail(string(out), 500))
	}
	return "installed with apt-get: " + strings.Join(missing, " ")
}

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
	data := filepath.Join(r.dir, "data")
	if err := os.Mkdir(data, 0o755); err != nil {
		return err
	}
	r.hold = filepath.Join(r.dir, "hold")
	r.env = append(os.Environ(), "OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1",
		"PYTHONDONTWRITEBYTECODE=1", "SUITE_DATA="+data, "SUITE_HOLD="+r.hold)
	ver := exec.Command(Python, "-c", `import sys
def v(m):
    try:
        return getattr(__import__(m), "__version__", "(no version)")
    except Exception:
        return "missing"
print("Python %s, numpy %s, pandas %s, PIL %s, igraph %s, chameleon %s, pyaes %s" % (sys.version.split()[0], v("numpy"), v("pandas"), v("PIL"), v("igraph"), v("chameleon"), v("pyaes")))`)
	ver.Env = r.env
	if out, err := ver.Output(); err == nil {
		m.Python = strings.TrimSpace(string(out))
	}
	if r.devnull, err = os.OpenFile(os.DevNull, os.O_RDWR, 0); err != nil {
		return err
	}
	if r.errf, err = os.OpenFile(filepath.Join(r.dir, "stderr.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err != nil {
		return err
	}
	r.e, err = engine.New(engine.Options{StateDir: r.dir})
	if err != nil {
		return fmt.Errorf("engine New: %w", err)
	}
	return nil
}

// stderrTail is the end of the shared stderr file, for error messages.
func (r *runner) stderrTail() string {
	b, _ := os.ReadFile(r.errf.Name())
	if s := tail(string(b), 600); s != "" {
		return "; stderr of the suite's processes ends with: " + s
	}
	return ""
}

// parent is a workload's long-lived parent (runner.py NAME parent).
type parent struct {
	name   string
	cmd    *exec.Cmd
	pid    int
	out    *lineReader
	ctl    string
	killed bool
}

func (r *runner) startParent(wl string) (*parent, error) {
	ctl := filepath.Join(r.dir, "ctl-"+strings.ReplaceAll(wl, ":", "-"))
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(Python, filepath.Join(r.dir, "runner.py"), wl, "parent")
	cmd.Env = append(slices.Clone(r.env), "SUITE_CTL="+ctl)
	cmd.Dir = r.dir
	cmd.Stdout = pw
	cmd.Stderr = r.errf
	r.logf("starting parent %s", wl)
	err = cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		return nil, fmt.Errorf("start parent %s: %w", wl, err)
	}
	p := &parent{name: wl, cmd: cmd, pid: cmd.Process.Pid, out: &lineReader{f: pr}, ctl: ctl}
	r.parents = append(r.parents, p)
	l, err := p.out.readLine(time.Now().Add(readyTimeout))
	if err == nil && l != "READY" {
		err = fmt.Errorf("printed %q, want READY", l)
	}
	if err == nil {
		err = testenv.WaitStopped(p.pid, 10*time.Second)
	}
	if err != nil {
		p.kill()
		return nil, fmt.Errorf("parent %s (pid %d): %v%s", wl, p.pid, err, r.stderrTail())
	}
	return p, nil
}

// command writes the parent's next command; cont then resumes it.
func (p *parent) command(c string) error { return os.WriteFile(p.ctl, []byte(c+"\n"), 0o644) }

func (p *parent) cont() error { return syscall.Kill(p.pid, syscall.SIGCONT) }

func (p *parent) kill() {
	if p.killed {
		return
	}
	p.killed = true
	_ = syscall.Kill(p.pid, syscall.SIGKILL)
	_ = p.cmd.Wait()
	p.out.f.Close()
	_ = os.Remove(p.ctl)
}

// served is the outcome of one request to an instance.
type served struct {
	start, total, handler time.Duration
	hash                  string
}

// readServe reads the "S" and "R hash ns" lines of one request started at t0.
func readServe(rd *lineReader, t0 time.Time) (served, error) {
	var s served
	deadline := time.Now().Add(resultTimeout)
	l, err := rd.readLine(deadline)
	if err != nil {
		return s, fmt.Errorf("reading the start line: %w", err)
	}
	s.start = time.Since(t0)
	if l != "S" {
		return s, fmt.Errorf("instance printed %q, want S", l)
	}
	l, err = rd.readLine(deadline)
	if err != nil {
		return s, fmt.Errorf("reading the result line: %w", err)
	}
	s.total = time.Since(t0)
	f := strings.Fields(l)
	if len(f) != 3 || f[0] != "R" || len(f[1]) != 64 {
		return s, fmt.Errorf("instance printed %q, want R <sha256> <ns>", l)
	}
	ns, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		return s, fmt.Errorf("bad handler time in %q", l)
	}
	s.hash, s.handler = f[1], time.Duration(ns)
	return s, nil
}

// verifier checks that every instance of a workload returns the same hash.
type verifier struct {
	hash, first string
	n           int
}

func (v *verifier) check(what string, s served) error {
	v.n++
	if v.hash == "" {
		v.hash, v.first = s.hash, what
		return nil
	}
	if s.hash != v.hash {
		return fmt.Errorf("WRONG RESULT: %s returned sha256 %s, %s returned %s", what, s.hash, v.first, v.hash)
	}
	return nil
}

// execCold starts a cold instance with stdout on a fresh pipe. The caller
// reads from the returned reader and must call wait.
func (r *runner) execCold(wl string) (*exec.Cmd, *lineReader, time.Time, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	cmd := exec.Command(Python, filepath.Join(r.dir, "runner.py"), wl, "cold")
	cmd.Env = r.env
	cmd.Dir = r.dir
	cmd.Stdout = pw
	cmd.Stderr = r.errf
	t0 := time.Now()
	err = cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		return nil, nil, t0, err
	}
	return cmd, &lineReader{f: pr}, t0, nil
}

// waitCmd waits for cmd with a timeout (killing it then).
func waitCmd(cmd *exec.Cmd, timeout time.Duration) error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(timeout):
		_ = cmd.Process.Kill()
		return fmt.Errorf("did not exit within %v (killed): %v", timeout, <-done)
	}
}

// coldStart runs one cold start to completion.
func (r *runner) coldStart(wl string) (served, error) {
	cmd, rd, t0, err := r.execCold(wl)
	if err != nil {
		return served{}, err
	}
	defer rd.f.Close()
	s, err := readServe(rd, t0)
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return s, fmt.Errorf("cold %s: %w%s", wl, err, r.stderrTail())
	}
	if err := waitCmd(cmd, doneTimeout); err != nil {
		return s, fmt.Errorf("cold %s: %v%s", wl, err, r.stderrTail())
	}
	return s, nil
}

// localFork resumes the stopped parent, which forks a child that serves.
func (r *runner) localFork(p *parent) (served, error) {
	if err := p.command("fork"); err != nil {
		return served{}, err
	}
	t0 := time.Now()
	if err := p.cont(); err != nil {
		return served{}, err
	}
	s, err := readServe(p.out, t0)
	if err != nil {
		return s, fmt.Errorf("local fork of parent %d: %w%s", p.pid, err, r.stderrTail())
	}
	if err := testenv.WaitStopped(p.pid, resultTimeout); err != nil {
		return s, fmt.Errorf("parent after its local fork: %w%s", err, r.stderrTail())
	}
	return s, nil
}

// warmChildren makes the parent fork n children stopped before serving.
func (r *runner) warmChildren(p *parent, n int) ([]int, error) {
	if err := p.command("warm " + strconv.Itoa(n)); err != nil {
		return nil, err
	}
	if err := p.cont(); err != nil {
		return nil, err
	}
	l, err := p.out.readLine(time.Now().Add(resultTimeout))
	if err != nil {
		return nil, fmt.Errorf("parent %d, warm %d: %w%s", p.pid, n, err, r.stderrTail())
	}
	f := strings.Fields(l)
	if len(f) != n+1 || f[0] != "W" {
		return nil, fmt.Errorf("parent %d printed %q, want W and %d pids", p.pid, l, n)
	}
	var pids []int
	for _, s := range f[1:] {
		pid, err := strconv.Atoi(s)
		if err != nil {
			return nil, fmt.Errorf("parent printed %q", l)
		}
		pids = append(pids, pid)
	}
	for _, pid := range pids {
		if err := testenv.WaitStopped(pid, resultTimeout); err != nil {
			return pids, err
		}
	}
	return pids, testenv.WaitStopped(p.pid, resultTimeout)
}

// reapWarm kills the given warm children and lets the parent reap them.
func (r *runner) reapWarm(p *parent, pids []int) error {
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if err := p.command("reap"); err != nil {
		return err
	}
	if err := p.cont(); err != nil {
		return err
	}
	l, err := p.out.readLine(time.Now().Add(resultTimeout))
	if err != nil || l != "D" {
		return fmt.Errorf("parent %d reaping its warm children: %q %v%s", p.pid, l, err, r.stderrTail())
	}
	return testenv.WaitStopped(p.pid, resultTimeout)
}

// warmStart continues one stopped warm instance (forked untimed).
func (r *runner) warmStart(p *parent) (served, error) {
	pids, err := r.warmChildren(p, 1)
	if err != nil {
		return served{}, errors.Join(err, r.reapWarm(p, pids))
	}
	t0 := time.Now()
	if err := syscall.Kill(pids[0], syscall.SIGCONT); err != nil {
		return served{}, err
	}
	s, err := readServe(p.out, t0)
	if err != nil {
		err = fmt.Errorf("warm instance %d: %w%s", pids[0], err, r.stderrTail())
	}
	return s, errors.Join(err, r.reapWarm(p, pids))
}

// prepare prepares the stopped parent and waits until it is stopped again.
func (r *runner) prepare(p *parent) (*engine.Seed, error) {
	seed, err := r.e.Prepare(p.pid, engine.PrepareOptions{Name: p.name, ChannelFD: -1})
	if err != nil {
		return nil, fmt.Errorf("engine Prepare(%d): %v", p.pid, err)
	}
	if err := testenv.WaitStopped(p.pid, 10*time.Second); err != nil {
		return nil, errors.Join(fmt.Errorf("parent after Prepare: %w", err), r.removeSeed(seed))
	}
	return seed, nil
}

// removeSeed retries while the engine still counts a just-exited child.
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
		time.Sleep(time.Millisecond)
	}
}

// forkChild forks one child with stdout on a fresh pipe; the caller reads
// its result from the returned reader (and closes it).
func (r *runner) forkChild(seed *engine.Seed, opts engine.ForkOptions) (*engine.Child, *lineReader, time.Time, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	opts.Stdio = [3]*os.File{r.devnull, pw, r.errf}
	t0 := time.Now()
	c, err := r.e.Fork(seed, opts)
	pw.Close()
	if err != nil {
		pr.Close()
		return nil, nil, t0, fmt.Errorf("engine Fork(Eager=%v, Prefetch=%v, NoCache=%v): %v", opts.Eager, opts.Prefetch, opts.NoCache, err)
	}
	return c, &lineReader{f: pr}, t0, nil
}

// waitChild waits for a child to exit and checks it exited with status 0.
func (r *runner) waitChild(c *engine.Child) error {
	select {
	case <-c.Done():
	case <-time.After(doneTimeout):
		c.Kill(syscall.SIGKILL)
		<-c.Done()
		return fmt.Errorf("child %d did not exit within %v (killed); engine error: %v", c.PID, doneTimeout, c.Err())
	}
	if ws := c.Status(); !ws.Exited() || ws.ExitStatus() != 0 || c.Err() != nil {
		return fmt.Errorf("child %d: %s; engine error: %v; paging: %+v%s", c.PID, describeStatus(ws), c.Err(), c.Stats(), r.stderrTail())
	}
	return nil
}

// mitosisFork forks one child, reads its result and waits for its exit.
func (r *runner) mitosisFork(seed *engine.Seed, opts engine.ForkOptions) (served, engine.ChildStats, error) {
	c, rd, t0, err := r.forkChild(seed, opts)
	if err != nil {
		return served{}, engine.ChildStats{}, err
	}
	defer rd.f.Close()
	s, err := readServe(rd, t0)
	if err != nil {
		c.Kill(syscall.SIGKILL)
		<-c.Done()
		return s, c.Stats(), fmt.Errorf("child %d: %w; its exit: %s; engine error: %v; paging: %+v%s", c.PID, err, describeStatus(c.Status()), c.Err(), c.Stats(), r.stderrTail())
	}
	return s, c.Stats(), r.waitChild(c)
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

// rotate returns 0..n-1 starting at it mod n.
func rotate(n, it int) []int {
	idx := make([]int, n)
	for k := range idx {
		idx[k] = (it + k) % n
	}
	return idx
}
