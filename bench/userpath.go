package bench

// The userpath benchmarks (issue #11): the fork path as a user measures it,
// from the call to the function's result and the child's exit, through a
// real `mitosis daemon` process and the real `mitosis` command line, side
// by side with a warm instance (a stopped, initialized process continued
// with SIGCONT: keep-alive) and a cold start of the same program.

import (
	"bufio"
	"fmt"
	"github.com/mitosis-fork/mitosis/internal/testenv"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/internal/procfs"
)

// GroupUserPath selects the userpath benchmarks (run only when named).
const GroupUserPath = "userpath"

// Userpath case names.
const (
	upCold        = "cold start (exec python3, init, handler, exit)"
	upWarm        = "warm instance (SIGCONT of a stopped initialized process)"
	upCLI         = "`mitosis fork` (CLI, attached), normal exit"
	upCLIExit     = "`mitosis fork` (CLI, attached), mitosis.exit()"
	upAPI         = "daemon API (Go client, attached), normal exit"
	upAPIExit     = "daemon API (Go client, attached), mitosis.exit()"
	upAPIPrefetch = "daemon API, normal exit, --prefetch"
	upAPIExitPref = "daemon API, mitosis.exit(), --prefetch"
	upCLIStart    = "`mitosis version` (CLI process alone)"
	upLocalFork   = "local fork(2) of the initialized parent (SIGCONT, fork, os._exit)"
)

// upSample is one timed run: to the RESULT line and to the exit.
type upSample struct {
	result, exit time.Duration
	// stages of a fork through the API (zero otherwise)
	stages [5]time.Duration
}

// upStageNames name upSample.stages.
var upStageNames = [5]string{
	"request sent → restore begins (socket, decode, daemon bookkeeping)",
	"restore (the daemon rebuilds the child: START in ps)",
	"child resumes → RESULT written (first faults, handler)",
	"RESULT → child reaped (teardown, exit, reap)",
	"reaped → exit reply at the client",
}

// userPath is the state of the userpath benchmarks.
type userPath struct {
	r      *runner
	bin    string
	sock   string
	daemon *exec.Cmd
	done   chan struct{}
	cl     *client.Client
	seeds  []*exec.Cmd
	// forkers are the local-fork baselines, by kind: stopped, initialized
	// parents that fork(2) a child per SIGCONT.
	forkers map[string]*forker
}

// forker is a running `userpath.py forker KIND`.
type forker struct {
	cmd *exec.Cmd
	rd  *bufio.Reader
}

// userPathGroups starts a daemon, runs the hello and groupby groups and
// stops everything.
func (r *runner) userPathGroups() []*Group {
	up := &userPath{r: r}
	defer up.close()
	if err := up.start(); err != nil {
		return []*Group{{Name: GroupUserPath, Title: "the fork path as users see it", Error: err.Error()}}
	}
	return []*Group{up.group("hello"), up.group("groupby")}
}

// buildMitosis returns the mitosis binary (Config.Mitosis, else built
// with mitosisd next to it in the run's directory).
func (r *runner) buildMitosis() (string, error) {
	if r.cfg.Mitosis != "" {
		return r.cfg.Mitosis, nil
	}
	bin := filepath.Join(r.dir, "mitosis")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	fmt.Fprintf(r.log, "go build -o %s/ ./cmd/mitosis ./cmd/mitosisd\n", r.dir)
	bin, err := testenv.BuildMitosis("", r.dir)
	if err != nil {
		return "", fmt.Errorf("%w (or pass -mitosis)", err)
	}
	return bin, nil
}

func (up *userPath) start() error {
	r := up.r
	bin, err := r.buildMitosis()
	if err != nil {
		return err
	}
	up.bin = bin
	if err := os.WriteFile(filepath.Join(r.dir, "mitosis.py"), client.PythonModule, 0o644); err != nil {
		return err
	}
	up.sock = filepath.Join(r.dir, "userpath.sock")
	logf, err := os.Create(filepath.Join(r.dir, "userpath-daemon.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	up.daemon = exec.Command(bin, "daemon", "--socket", up.sock, "--state-dir", filepath.Join(r.dir, "userpath-state"))
	up.daemon.Stderr = logf
	if err := up.daemon.Start(); err != nil {
		return err
	}
	up.done = make(chan struct{})
	go func() { _ = up.daemon.Wait(); close(up.done) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := client.Dial(up.sock); err == nil {
			up.cl = c
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("userpath: the daemon did not answer on %s within 10 s", up.sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, s := range []struct{ mode, kind, name string }{
		{"seed", "hello", "hello"}, {"seed-exit", "hello", "hello-exit"},
		{"seed", "groupby", "groupby"}, {"seed-exit", "groupby", "groupby-exit"},
	} {
		cmd, _, err := up.python(s.mode, s.kind, s.name)
		if err != nil {
			return fmt.Errorf("userpath: seed %s: %w", s.name, err)
		}
		up.seeds = append(up.seeds, cmd)
	}
	up.forkers = map[string]*forker{}
	for _, kind := range []string{"hello", "groupby"} {
		cmd, rd, err := up.python("forker", kind, "")
		if err != nil {
			return fmt.Errorf("userpath: local-fork parent: %w", err)
		}
		up.seeds = append(up.seeds, cmd)
		up.forkers[kind] = &forker{cmd: cmd, rd: rd}
	}
	return nil
}

// python starts userpath.py MODE KIND [NAME] and waits for its READY line
// (modes warm, seed, seed-exit); its stdout reader is returned.
func (up *userPath) python(mode, kind, name string) (*exec.Cmd, *bufio.Reader, error) {
	args := []string{filepath.Join(up.r.dir, "userpath.py"), mode, kind}
	if name != "" {
		args = append(args, name)
	}
	cmd := exec.Command(Python, args...)
	cmd.Env = append(os.Environ(), client.SocketEnv+"="+up.sock)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	rd := bufio.NewReader(out)
	line, err := readLine(rd, readyTimeout)
	if err != nil || !strings.HasPrefix(line, "READY") {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, nil, fmt.Errorf("%s %s printed %q (%v)", mode, kind, line, err)
	}
	return cmd, rd, nil
}

// readLine reads one line within timeout.
func readLine(rd *bufio.Reader, timeout time.Duration) (string, error) {
	type res struct {
		s   string
		err error
	}
	ch := make(chan res, 1)
	go func() {
		s, err := rd.ReadString('\n')
		ch <- res{strings.TrimSpace(s), err}
	}()
	select {
	case r := <-ch:
		return r.s, r.err
	case <-time.After(timeout):
		return "", fmt.Errorf("no line within %v", timeout)
	}
}

func (up *userPath) close() {
	for _, c := range up.seeds {
		_ = c.Process.Kill()
		_ = c.Wait()
	}
	if up.cl != nil {
		up.cl.Close()
	}
	if up.daemon != nil && up.daemon.Process != nil {
		_ = up.daemon.Process.Signal(syscall.SIGINT)
		select {
		case <-up.done:
		case <-time.After(30 * time.Second):
			_ = up.daemon.Process.Kill()
			<-up.done
		}
	}
}

// group measures one workload kind.
func (up *userPath) group(kind string) *Group {
	r := up.r
	g := &Group{Name: "userpath-" + kind, Baseline: upWarm}
	switch kind {
	case "hello":
		g.Title = "the fork path as users see it: Python hello, call to RESULT and exit"
	default:
		g.Title = "the fork path as users see it: pandas groupby over an inherited 1e6-row frame"
	}
	g.Description = "Every case ends when the process that ran the handler has exited and the caller knows " +
		"(the CLI exits, or the daemon's exit reply arrives). Cold: exec of the same program. Warm: the same " +
		"program initialized and stopped (SIGSTOP) beforehand, timed from SIGCONT. Forks go through a real " +
		"`mitosis daemon` (same host); normal exit runs the interpreter's teardown in the child, mitosis.exit() " +
		"skips it (client/python). Cases interleave round-robin; one warm-up round is discarded."
	names := []string{upWarm, upCold, upLocalFork, upCLI, upCLIExit, upAPI, upAPIExit, upAPIPrefetch, upAPIExitPref, upCLIStart}
	if kind == "groupby" {
		names = []string{upWarm, upCold, upLocalFork, upCLIExit, upAPIExit, upAPIExitPref, upAPI}
	}
	cases := map[string]*Case{}
	results := map[string]*Case{}
	for _, n := range names {
		cases[n] = &Case{Name: n + ": to exit"}
		results[n] = &Case{Name: n + ": to RESULT"}
	}
	var stages [5][]time.Duration
	var stagesExit [5][]time.Duration
	want := ""
	for run := 0; run <= r.cfg.Runs; run++ {
		warm := run == 0
		for _, n := range names {
			s, out, err := up.one(n, kind)
			if err != nil {
				g.Error = fmt.Sprintf("%s: %v", n, err)
				return up.finish(g, names, cases, results, stages, stagesExit)
			}
			if n == upCLIStart {
				cases[n].add(s.exit, warm)
				continue
			}
			if want == "" {
				want = out
			} else if out != want {
				g.Error = fmt.Sprintf("%s printed %q, other cases %q", n, out, want)
				return up.finish(g, names, cases, results, stages, stagesExit)
			}
			cases[n].add(s.exit, warm)
			results[n].add(s.result, warm)
			if !warm && n == upAPI {
				for i, d := range s.stages {
					stages[i] = append(stages[i], d)
				}
			}
			if !warm && n == upAPIExit {
				for i, d := range s.stages {
					stagesExit[i] = append(stagesExit[i], d)
				}
			}
		}
		fmt.Fprintf(r.log, "userpath-%s: round %d/%d\n", kind, run, r.cfg.Runs)
	}
	return up.finish(g, names, cases, results, stages, stagesExit)
}

func (up *userPath) finish(g *Group, names []string, cases, results map[string]*Case, stages, stagesExit [5][]time.Duration) *Group {
	for _, n := range names {
		if n == upCLIStart {
			g.Cases = append(g.Cases, cases[n])
			continue
		}
		g.Cases = append(g.Cases, cases[n], results[n])
	}
	t := Table{Header: []string{"stage (daemon API, attached)", "normal exit: median ms", "mitosis.exit(): median ms"}}
	for i, name := range upStageNames {
		t.Rows = append(t.Rows, []string{name, fmtMedian(stages[i]), fmtMedian(stagesExit[i])})
	}
	g.Tables = append(g.Tables, t)
	return g
}

// fmtMedian is the median of ds in ms, "-" without samples.
func fmtMedian(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return fmt.Sprintf("%.2f", float64(s[len(s)/2].Microseconds())/1000)
}

// one runs case n once and returns its timing and the handler's result.
func (up *userPath) one(n, kind string) (upSample, string, error) {
	seed := kind
	if strings.Contains(n, "mitosis.exit()") {
		seed = kind + "-exit"
	}
	switch n {
	case upCold:
		t0 := time.Now()
		return up.timeCmd(t0, exec.Command(Python, filepath.Join(up.r.dir, "userpath.py"), "cold", kind))
	case upWarm:
		cmd, rd, err := up.python("warm", kind, "")
		if err != nil {
			return upSample{}, "", err
		}
		defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
		if err := waitStopped(cmd.Process.Pid); err != nil {
			return upSample{}, "", err
		}
		t0 := time.Now()
		if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
			return upSample{}, "", err
		}
		line, err := readLine(rd, resultTimeout)
		tr := time.Since(t0)
		if err != nil {
			return upSample{}, "", err
		}
		if err := cmd.Wait(); err != nil {
			return upSample{}, "", fmt.Errorf("warm instance: %v", err)
		}
		return upSample{result: tr, exit: time.Since(t0)}, line, nil
	case upLocalFork:
		f := up.forkers[kind]
		if err := waitStopped(f.cmd.Process.Pid); err != nil {
			return upSample{}, "", err
		}
		t0 := time.Now()
		if err := f.cmd.Process.Signal(syscall.SIGCONT); err != nil {
			return upSample{}, "", err
		}
		line, err := readLine(f.rd, resultTimeout)
		tr := time.Since(t0)
		if err != nil {
			return upSample{}, "", err
		}
		if done, err := readLine(f.rd, doneTimeout); err != nil || done != "DONE" {
			return upSample{}, "", fmt.Errorf("local fork: %q, %v", done, err)
		}
		return upSample{result: tr, exit: time.Since(t0)}, line, nil
	case upCLI, upCLIExit:
		t0 := time.Now()
		return up.timeCmd(t0, exec.Command(up.bin, "--socket", up.sock, "fork", seed))
	case upCLIStart:
		t0 := time.Now()
		if err := exec.Command(up.bin, "version").Run(); err != nil {
			return upSample{}, "", err
		}
		return upSample{exit: time.Since(t0)}, "", nil
	default:
		return up.api(seed, strings.Contains(n, "prefetch"))
	}
}

// timeCmd runs cmd, timing its RESULT line and its exit from t0.
func (up *userPath) timeCmd(t0 time.Time, cmd *exec.Cmd) (upSample, string, error) {
	out, err := cmd.StdoutPipe()
	if err != nil {
		return upSample{}, "", err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return upSample{}, "", err
	}
	line, rerr := readLine(bufio.NewReader(out), resultTimeout)
	tr := time.Since(t0)
	_, _ = io.Copy(io.Discard, out)
	werr := cmd.Wait()
	te := time.Since(t0)
	if rerr != nil || werr != nil {
		return upSample{}, "", fmt.Errorf("%v: %q, %v, %v", cmd.Args, line, rerr, werr)
	}
	return upSample{result: tr, exit: te}, line, nil
}

// api forks seed through the Go client, attached, and splits the time
// into stages with the child's record (created, start_ms, ended).
func (up *userPath) api(seed string, prefetch bool) (upSample, string, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return upSample{}, "", err
	}
	defer pr.Close()
	rd := bufio.NewReader(pr)
	lines := make(chan string, 1)
	var tr time.Duration
	t0 := time.Now()
	go func() {
		s, _ := rd.ReadString('\n')
		tr = time.Since(t0)
		lines <- strings.TrimSpace(s)
	}()
	info, exit, err := up.cl.ForkAttachedWith(client.ForkRequest{Seed: seed, Prefetch: prefetch}, up.r.devnull, pw, up.r.devnull)
	te := time.Since(t0)
	pw.Close()
	if err != nil {
		return upSample{}, "", err
	}
	if exit.Code != 0 || exit.Signal != 0 {
		return upSample{}, "", fmt.Errorf("child %s exit %+v", info.ID, exit)
	}
	var line string
	select {
	case line = <-lines:
	case <-time.After(resultTimeout):
		return upSample{}, "", fmt.Errorf("child %s: no RESULT", info.ID)
	}
	s := upSample{result: tr, exit: te}
	kids, err := up.cl.PS()
	if err != nil {
		return upSample{}, "", err
	}
	for _, k := range kids {
		if k.ID != info.ID || k.Ended == nil {
			continue
		}
		restore := time.Duration(k.StartMS * float64(time.Millisecond))
		tResult := t0.Add(tr)
		s.stages = [5]time.Duration{
			k.Created.Sub(t0) - restore,
			restore,
			tResult.Sub(k.Created),
			k.Ended.Sub(tResult),
			t0.Add(te).Sub(*k.Ended),
		}
	}
	return s, line, nil
}

// waitStopped waits until pid is in a group-stop.
func waitStopped(pid int) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := procfs.ReadStat(pid)
		if err != nil {
			return err
		}
		if st.State == 'T' {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pid %d did not stop (state %c)", pid, st.State)
		}
		time.Sleep(time.Millisecond)
	}
}
