package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Bounds: a hung child or CLI call must fail a test in well under a minute.
const (
	cliTimeout     = 30 * time.Second // prepare, seeds, ps, rm
	forkTimeout    = 45 * time.Second // one attached fork, child run included
	cliWaitDelay   = 5 * time.Second  // after the CLI is gone, how long its stdout may stay open
	readyTimeout   = 60 * time.Second // a C parent printing READY
	pyReadyTimeout = 120 * time.Second
	lineTimeout    = 60 * time.Second
)

var (
	seedIDRe  = regexp.MustCompile(`^s-[0-9a-f]{8}$`)
	childIDRe = regexp.MustCompile(`\bc-[0-9a-f]{8}\b`)
)

// ---------------------------------------------------------------------------
// Parent processes

// proc is a process started by a test (a parent program) whose merged
// stdout/stderr is read line by line. Its stdout pipe may outlive it (the
// seed's frozen copy holds it), so nothing waits for EOF.
type proc struct {
	name  string
	cmd   *exec.Cmd
	pid   int
	stdin *os.File // write end of its stdin

	rd      *os.File
	mu      sync.Mutex
	lines   []string
	next    int
	changed chan struct{}

	exited  chan struct{}
	waitErr error
}

// parentEnv is the environment of every parent program.
func parentEnv() []string {
	env := os.Environ()
	py := filepath.Join(repoRoot, "client", "python")
	if old := os.Getenv("PYTHONPATH"); old != "" {
		py += ":" + old
	}
	return append(env,
		"PYTHONPATH="+py,
		"OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1",
		"PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1",
	)
}

func startProc(t *testing.T, name string, argv ...string) *proc {
	t.Helper()
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = parentEnv()
	cmd.Dir = tmpRoot
	cmd.Stdin = inR
	cmd.Stdout = outW
	cmd.Stderr = outW
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	inR.Close()
	outW.Close()
	p := &proc{name: name, cmd: cmd, pid: cmd.Process.Pid, stdin: inW, rd: outR,
		changed: make(chan struct{}, 1), exited: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(outR)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
			p.notify()
		}
	}()
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
		p.notify()
	}()
	t.Cleanup(func() { p.kill(t) })
	return p
}

func (p *proc) notify() {
	select {
	case p.changed <- struct{}{}:
	default:
	}
}

// kill ends the process by pid (SIGKILL also ends a stopped one) and waits for it.
func (p *proc) kill(t *testing.T) {
	select {
	case <-p.exited:
	default:
		syscall.Kill(p.pid, syscall.SIGKILL)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("%s (pid %d) did not die within 10 s of SIGKILL", p.name, p.pid)
		}
	}
	p.stdin.Close()
	p.rd.Close()
}

func (p *proc) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// waitLine returns the next line (after the previous match) that starts with prefix.
func (p *proc) waitLine(prefix string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	exitSeen := false
	for {
		p.mu.Lock()
		for i := p.next; i < len(p.lines); i++ {
			if strings.HasPrefix(p.lines[i], prefix) {
				p.next = i + 1
				l := p.lines[i]
				p.mu.Unlock()
				return l, nil
			}
		}
		p.mu.Unlock()
		if !exitSeen && p.hasExited() {
			// let the reader drain what the process wrote before it died
			exitSeen = true
			if d := time.Now().Add(time.Second); d.Before(deadline) {
				deadline = d
			}
		}
		left := time.Until(deadline)
		if left <= 0 {
			state := "still running"
			if p.hasExited() {
				state = fmt.Sprintf("exited: %v", p.waitErr)
			}
			return "", fmt.Errorf("%s (pid %d, %s): no line %q within %v; output so far:\n%s",
				p.name, p.pid, state, prefix, timeout, p.output())
		}
		select {
		case <-p.changed:
		case <-time.After(left):
		}
	}
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// outputSince returns the lines from index from on (for parsing one phase).
func (p *proc) lineCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.lines)
}

func (p *proc) linesFrom(from int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if from > len(p.lines) {
		from = len(p.lines)
	}
	return strings.Join(p.lines[from:], "\n")
}

// waitExit waits for the process to exit and returns its exit code.
func (p *proc) waitExit(timeout time.Duration) (int, error) {
	select {
	case <-p.exited:
	case <-time.After(timeout):
		return -1, fmt.Errorf("%s (pid %d) did not exit within %v", p.name, p.pid, timeout)
	}
	if p.waitErr == nil {
		return 0, nil
	}
	var ee *exec.ExitError
	if errors.As(p.waitErr, &ee) {
		return ee.ExitCode(), nil
	}
	return -1, p.waitErr
}

// startCParent starts a C parent and waits until it is stopped at the prepare point.
func startCParent(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	argv := append([]string{bin, dataFile}, args...)
	p := startProc(t, filepath.Base(bin), argv...)
	l, err := p.waitLine("READY ", readyTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(strings.TrimPrefix(l, "READY ")); got != strconv.Itoa(p.pid) {
		t.Fatalf("%s printed %q, want READY %d", p.name, l, p.pid)
	}
	if err := waitState(p.pid, "T", 10*time.Second); err != nil {
		t.Fatalf("%s did not stop itself at the prepare point: %v", p.name, err)
	}
	return p
}

// ---------------------------------------------------------------------------
// The CLI

type cliResult struct {
	args   []string
	stdout string
	stderr string
	code   int // -1: did not exit by itself
	err    error
	took   time.Duration
}

func (r cliResult) String() string {
	return fmt.Sprintf("mitosis %s: exit %d, err %v, took %v\n--- stdout:\n%s\n--- stderr:\n%s",
		strings.Join(r.args, " "), r.code, r.err, r.took.Round(time.Millisecond), r.stdout, r.stderr)
}

func (r cliResult) ok() bool { return r.err == nil && r.code == 0 }

// mitosis runs the CLI against the test daemon with a bounded time.
func mitosis(timeout time.Duration, args ...string) cliResult {
	return mitosisTo(timeout, nil, args...)
}

// mitosisTo is mitosis with the CLI's stdout (and so an attached child's)
// going to the regular file out when it is not nil; r.stdout is then the
// file's content.
func mitosisTo(timeout time.Duration, out *os.File, args ...string) cliResult {
	full := append([]string{"--socket", sockPath}, args...)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, mitosisBin, full...)
	cmd.Dir = tmpRoot
	var outb, errb bytes.Buffer
	cmd.Stdout = &outb
	if out != nil {
		cmd.Stdout = out
	}
	cmd.Stderr = &errb
	cmd.WaitDelay = cliWaitDelay
	start := time.Now()
	err := cmd.Run()
	r := cliResult{args: args, took: time.Since(start), code: -1}
	if cmd.ProcessState != nil && cmd.ProcessState.Exited() {
		r.code = cmd.ProcessState.ExitCode()
	}
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		r.err = fmt.Errorf("timed out after %v (killed)", timeout)
	case errors.Is(err, exec.ErrWaitDelay):
		r.err = fmt.Errorf("stdout/stderr still open %v after the CLI exited (a child or grandchild kept them)", cliWaitDelay)
	case errors.As(err, &ee):
		// exit code carries it
	case err != nil:
		r.err = err
	}
	r.stdout, r.stderr = outb.String(), errb.String()
	if out != nil {
		b, err := os.ReadFile(out.Name())
		if err != nil && r.err == nil {
			r.err = err
		}
		r.stdout = string(b)
	}
	return r
}

// prepareSeed runs `mitosis prepare --pid PID --name NAME` and returns the seed id.
// The seed is removed (--force) when the test ends.
func prepareSeed(t *testing.T, pid int, name string) string {
	t.Helper()
	r := mitosis(cliTimeout, "prepare", "--pid", strconv.Itoa(pid), "--name", name)
	if !r.ok() {
		t.Fatalf("prepare failed:\n%s", r)
	}
	f := strings.Fields(r.stdout)
	if len(f) == 0 {
		t.Fatalf("prepare printed nothing:\n%s", r)
	}
	id := f[len(f)-1]
	if !seedIDRe.MatchString(id) {
		t.Fatalf("prepare: last word of stdout %q is not a seed id (s-<8 hex>):\n%s", id, r)
	}
	t.Logf("prepared pid %d into seed %s in %v", pid, id, r.took.Round(time.Millisecond))
	adoptSeed(t, id)
	return id
}

// adoptSeed makes the test remove seed id when it ends.
func adoptSeed(t *testing.T, id string) {
	noteSeed(id)
	t.Cleanup(func() {
		r := mitosis(cliTimeout, "rm", id, "--force")
		if !r.ok() && !strings.Contains(r.stderr, "no seed or child") {
			t.Errorf("removing seed %s:\n%s", id, r)
		}
	})
}

// ---------------------------------------------------------------------------
// Output of the parent programs

type progOut struct {
	role    string // parent | child
	roleArg string // pid (C) or seed/child id (Python)
	digests []string
	marked  string
	final   string
	payload string            // PAYLOAD line (Python children)
	checks  map[string]string // name -> "ok" or "FAIL ..."
	done    bool
	errs    []string // ERROR lines
}

func parseOut(s string) progOut {
	o := progOut{checks: map[string]string{}}
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimRight(l, "\r")
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "ROLE":
			if len(f) > 1 {
				o.role = f[1]
			}
			if len(f) > 2 {
				o.roleArg = f[2]
			}
		case "DIGEST":
			if len(f) > 1 {
				o.digests = append(o.digests, f[1])
			}
		case "MARKED":
			if len(f) > 1 {
				o.marked = f[1]
			}
		case "PAYLOAD":
			o.payload = strings.TrimSpace(strings.TrimPrefix(l, "PAYLOAD"))
		case "FINAL":
			if len(f) > 1 {
				o.final = f[1]
			}
		case "CHECK":
			if len(f) > 2 {
				o.checks[f[1]] = strings.Join(f[2:], " ")
			}
		case "DONE":
			o.done = true
		case "ERROR":
			o.errs = append(o.errs, l)
		}
	}
	return o
}

func (o progOut) digest() string {
	if len(o.digests) == 0 {
		return ""
	}
	return o.digests[0]
}

// problems lists what is wrong with a program's output: role, missing or
// failed checks, errors, not finished.
func (o progOut) problems(wantRole string, checks []string) []string {
	var p []string
	if o.role != wantRole {
		p = append(p, fmt.Sprintf("ROLE %q, want %q", o.role, wantRole))
	}
	if o.digest() == "" {
		p = append(p, "no DIGEST line")
	}
	var missing []string
	for _, c := range checks {
		v, ok := o.checks[c]
		switch {
		case !ok:
			missing = append(missing, c)
		case v != "ok" && !strings.HasPrefix(v, "ok "):
			p = append(p, fmt.Sprintf("CHECK %s %s", c, v))
		}
	}
	if len(missing) > 0 {
		p = append(p, fmt.Sprintf("checks not reached: %s", strings.Join(missing, " ")))
	}
	p = append(p, o.errs...)
	if !o.done {
		p = append(p, "no DONE line (did not finish)")
	}
	return p
}

// ---------------------------------------------------------------------------
// Forking many children

type forkResult struct {
	idx int
	cli cliResult
	out progOut
}

// forkMany forks n children of seed with `mitosis fork SEED [extra...]`
// (attached), par at a time. bad(r) reports what is wrong with one result;
// after the first bad result no new child is started, so a hang costs one
// forkTimeout, not n of them. Every problem is reported with t.Errorf.
// Results are returned in index order (nil for children not started).
func forkMany(t *testing.T, seed string, n, par int, bad func(r *forkResult) []string, extra ...string) []*forkResult {
	t.Helper()
	res := make([]*forkResult, n)
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	var reported atomic.Int64
	for w := 0; w < par; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for failed.Load() == 0 {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				args := append([]string{"fork", seed}, extra...)
				cr := mitosis(forkTimeout, args...)
				r := &forkResult{idx: i, cli: cr, out: parseOut(cr.stdout)}
				res[i] = r
				var probs []string
				if cr.err != nil {
					probs = append(probs, cr.err.Error())
				} else if cr.code != 0 {
					probs = append(probs, exitText(cr.code))
				}
				if bad != nil {
					probs = append(probs, bad(r)...)
				}
				if len(probs) > 0 {
					failed.Add(1)
					if reported.Add(1) <= 3 {
						t.Errorf("child %d of %s: %s\n%s", i, seed, strings.Join(probs, "; "), cr)
					} else {
						t.Errorf("child %d of %s: %s", i, seed, strings.Join(probs, "; "))
					}
				}
			}
		}()
	}
	wg.Wait()
	if f := failed.Load(); f > 0 {
		started := 0
		for _, r := range res {
			if r != nil {
				started++
			}
		}
		t.Errorf("%d of %d children started had problems; stopped after %d of %d", f, started, started, n)
	}
	return res
}

// exitText describes an attached fork's exit code (128+N: killed by signal N).
func exitText(code int) string {
	if code > 128 && code < 128+65 {
		sig := syscall.Signal(code - 128)
		extra := ""
		if sig == syscall.SIGALRM {
			extra = ": its own watchdog fired, it hung"
		}
		return fmt.Sprintf("exit code %d (killed by %v%s)", code, sig, extra)
	}
	return fmt.Sprintf("exit code %d", code)
}

// childProblems is the usual per-child verdict for a C or Python child.
func childProblems(checks []string) func(r *forkResult) []string {
	return func(r *forkResult) []string {
		return r.out.problems("child", checks)
	}
}

// ---------------------------------------------------------------------------
// The daemon's view

// psChildren returns the ChildInfo objects of `mitosis ps --json`.
func psChildren() ([]map[string]any, error) {
	r := mitosis(cliTimeout, "ps", "--json")
	if !r.ok() {
		return nil, fmt.Errorf("ps --json failed:\n%s", r)
	}
	var v any
	if err := json.Unmarshal([]byte(strings.TrimSpace(r.stdout)), &v); err != nil {
		return nil, fmt.Errorf("ps --json: %v\n%s", err, r.stdout)
	}
	if m, ok := v.(map[string]any); ok {
		v = m["children"]
	}
	if v == nil {
		return nil, nil
	}
	arr, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("ps --json: want a list of children (or {\"children\":[...]}), got:\n%s", r.stdout)
	}
	var out []map[string]any
	for _, e := range arr {
		if m, ok := e.(map[string]any); ok {
			out = append(out, m)
		}
	}
	return out, nil
}

func jsonInt(m map[string]any, k string) (int64, bool) {
	switch v := m[k].(type) {
	case float64:
		return int64(v), true
	case json.Number:
		i, err := v.Int64()
		return i, err == nil
	}
	return 0, false
}

func jsonStr(m map[string]any, k string) string {
	s, _ := m[k].(string)
	return s
}

// ---------------------------------------------------------------------------
// /proc

// procStat returns the state letter of pid (R, S, D, T, t, Z, ...).
func procState(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+3 > len(s) {
		return "", fmt.Errorf("bad /proc/%d/stat: %q", pid, s)
	}
	return s[i+2 : i+3], nil
}

// procStatus returns one field of /proc/PID/status.
func procStatus(pid int, field string) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == field {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

func procInt(pid int, field string) (int, error) {
	v, err := procStatus(pid, field)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(v)
}

// waitState waits until pid's state letter is one of states.
func waitState(pid int, states string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		s, err := procState(pid)
		if err != nil {
			return err
		}
		if strings.Contains(states, s) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pid %d is in state %q, want one of %q", pid, s, states)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func procCmdline(pid int) string {
	b, _ := readProcFile(fmt.Sprintf("/proc/%d/cmdline", pid), 2*time.Second)
	return strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
}

var errProcTimeout = errors.New("timed out")

// readProcFile reads a /proc file with a time bound: reading another
// process's memory (cmdline, environ) must never hang the suite.
func readProcFile(path string, timeout time.Duration) ([]byte, error) {
	type res struct {
		b   []byte
		err error
	}
	ch := make(chan res, 1)
	go func() {
		b, err := os.ReadFile(path)
		ch <- res{b, err}
	}()
	select {
	case r := <-ch:
		return r.b, r.err
	case <-time.After(timeout):
		return nil, fmt.Errorf("reading %s: %w after %v", path, errProcTimeout, timeout)
	}
}

func allPIDs() []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids
}

// assertHealthy checks that a process a refused prepare left alone is
// alive, not stopped, not traced.
func assertHealthy(t *testing.T, p *proc) {
	t.Helper()
	if err := syscall.Kill(p.pid, 0); err != nil {
		t.Errorf("%s (pid %d) is gone after the refused prepare: %v", p.name, p.pid, err)
		return
	}
	if p.hasExited() {
		t.Errorf("%s (pid %d) exited after the refused prepare: %v\n%s", p.name, p.pid, p.waitErr, p.output())
		return
	}
	// Give a detach a moment to take effect, then insist.
	if err := waitState(p.pid, "RSD", 2*time.Second); err != nil {
		t.Errorf("%s after the refused prepare: %v (stopped or traced?)", p.name, err)
	}
	if tr, err := procInt(p.pid, "TracerPid"); err != nil || tr != 0 {
		t.Errorf("%s (pid %d) after the refused prepare: TracerPid %d (%v), want 0", p.name, p.pid, tr, err)
	}
}
