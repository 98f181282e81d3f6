package bench

// The userpath benchmarks (issue #11): the fork path as a user measures it,
// from the call to the function's result and the child's exit, through a
// real `mitosis daemon` process and the real `mitosis` command line, side
// by side with a warm instance (a stopped, initialized process continued
// with SIGCONT: keep-alive) and a cold start of the same program.

import (
	"fmt"
	"github.com/mitosis-fork/mitosis/internal/testenv"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/mitosis-fork/mitosis/client"
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
	// parents are the seeds' parents and the local-fork parents; forkers
	// are the latter by kind: stopped, initialized parents that fork(2) a
	// child per SIGCONT.
	parents []*parent
	forkers map[string]*parent
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
	up.forkers = map[string]*parent{}
	for _, s := range []struct{ mode, kind, name string }{
		{"seed", "hello", "hello"}, {"seed-exit", "hello", "hello-exit"},
		{"seed", "groupby", "groupby"}, {"seed-exit", "groupby", "groupby-exit"},
		{"forker", "hello", ""}, {"forker", "groupby", ""},
	} {
		p, err := up.python(s.mode, s.kind, s.name)
		if err != nil {
			return fmt.Errorf("userpath: %s %s: %w", s.mode, s.kind, err)
		}
		up.parents = append(up.parents, p)
		if s.mode == "forker" {
			up.forkers[s.kind] = p
		}
	}
	return nil
}

// python starts userpath.py MODE KIND [NAME] against the daemon and waits
// until it has printed READY and stopped itself (startParent).
func (up *userPath) python(mode, kind, name string) (*parent, error) {
	args := []string{Python, filepath.Join(up.r.dir, "userpath.py"), mode, kind}
	if name != "" {
		args = append(args, name)
	}
	env := append(os.Environ(), client.SocketEnv+"="+up.sock)
	return startParent(mode+" "+kind, args, env, up.r.dir, readyTimeout)
}

func (up *userPath) close() {
	for _, p := range up.parents {
		p.kill()
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
		p, err := up.python("warm", kind, "")
		if err != nil {
			return upSample{}, "", err
		}
		defer p.kill()
		return continueParent(p, "")
	case upLocalFork:
		p := up.forkers[kind]
		if err := testenv.WaitStopped(p.pid, 10*time.Second); err != nil {
			return upSample{}, "", err
		}
		return continueParent(p, "DONE")
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

// continueParent times a stopped parent from SIGCONT to its RESULT line
// and to its end: its exit (done "") or its done line (the forker, whose
// child has exited then).
func continueParent(p *parent, done string) (upSample, string, error) {
	t0 := time.Now()
	if err := syscall.Kill(p.pid, syscall.SIGCONT); err != nil {
		return upSample{}, "", err
	}
	line, err := p.out.readLine(t0.Add(resultTimeout))
	tr := time.Since(t0)
	if err != nil {
		return upSample{}, "", fmt.Errorf("%s: %w%s", p.name, err, p.stderrNote())
	}
	if done != "" {
		if l, err := p.out.readLine(t0.Add(resultTimeout + doneTimeout)); err != nil || l != done {
			return upSample{}, "", fmt.Errorf("%s: %q, %v, want %s", p.name, l, err, done)
		}
	} else if err := p.cmd.Wait(); err != nil {
		return upSample{}, "", fmt.Errorf("%s: %v%s", p.name, err, p.stderrNote())
	}
	return upSample{result: tr, exit: time.Since(t0)}, line, nil
}

// timeCmd runs cmd, timing its RESULT line and its exit from t0.
func (up *userPath) timeCmd(t0 time.Time, cmd *exec.Cmd) (upSample, string, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return upSample{}, "", err
	}
	defer pr.Close()
	cmd.Stdout, cmd.Stderr = pw, os.Stderr
	err = cmd.Start()
	pw.Close()
	if err != nil {
		return upSample{}, "", err
	}
	line, rerr := (&pipeReader{f: pr}).readLine(t0.Add(resultTimeout))
	tr := time.Since(t0)
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
	type result struct {
		line string
		at   time.Duration
		err  error
	}
	results := make(chan result, 1)
	t0 := time.Now()
	go func() {
		l, err := (&pipeReader{f: pr}).readLine(t0.Add(resultTimeout))
		results <- result{l, time.Since(t0), err}
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
	res := <-results
	if res.err != nil {
		return upSample{}, "", fmt.Errorf("child %s: %w", info.ID, res.err)
	}
	tr := res.at
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
	return s, res.line, nil
}
