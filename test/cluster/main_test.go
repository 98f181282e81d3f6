package cluster

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/bench/netlab"
	"github.com/mitosis-fork/mitosis/client"
)

const pyExe = "/usr/bin/python3"

// Bounds: nothing in a test waits longer than these.
const (
	cliTimeout    = 30 * time.Second
	parentTimeout = 90 * time.Second // a Python parent reaching prepare
	childTimeout  = 60 * time.Second // a child running to its end
)

var (
	skipReason string
	setupErr   error

	repoRoot   string
	tmpRoot    string
	mitosisBin string
	seedPy     string
	runTag     string // MITOSIS_CLUSTER_TAG=<hex>, in the environment of everything we start

	prefixMu sync.Mutex
	prefixes []string // of every lab built, for the leftovers check

	leftoversChecked bool
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	switch {
	case os.Getenv("MITOSIS_CLUSTER") == "0":
		skipReason = "MITOSIS_CLUSTER=0"
	case runtime.GOOS != "linux" || runtime.GOARCH != "amd64":
		skipReason = "mitosis runs on linux/amd64 only"
	case netlab.Available() != "":
		skipReason = netlab.Available()
	default:
		if out, err := exec.Command(pyExe, "-c", "import numpy, pandas").CombinedOutput(); err != nil {
			skipReason = fmt.Sprintf("%s cannot import numpy and pandas: %v %s", pyExe, err, out)
		}
	}
	if skipReason != "" {
		return m.Run()
	}
	setupErr = setup()
	if setupErr != nil {
		fmt.Fprintf(os.Stderr, "cluster setup failed: %v\n", setupErr)
	}
	code := m.Run()
	if setupErr == nil && !leftoversChecked {
		if probs := checkLeftovers(); len(probs) > 0 {
			fmt.Fprintf(os.Stderr, "cluster: leftovers after the run:\n  %s\n", strings.Join(probs, "\n  "))
			code = 1
		}
	}
	if code != 0 && tmpRoot != "" {
		fmt.Fprintf(os.Stderr, "cluster: kept %s for inspection\n", tmpRoot)
	} else if tmpRoot != "" {
		os.RemoveAll(tmpRoot)
	}
	return code
}

// setup makes us a child subreaper (orphans of what we start come back to
// us, so the leftovers check sees them), marks inherited fds close-on-exec
// (mitosis refuses to prepare a process holding a stray pipe, and the
// daemons would pass them on to their children), builds mitosis and tags
// the environment.
func setup() error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("PR_SET_CHILD_SUBREAPER: %v", err)
	}
	testenv.CloseInheritedFDs()
	var err error
	repoRoot, err = filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(repoRoot, "go.mod")); err != nil {
		return fmt.Errorf("repository root not found from %s: %v", repoRoot, err)
	}
	tmpRoot, err = os.MkdirTemp("", "mtcluster-")
	if err != nil {
		return err
	}
	bin := filepath.Join(tmpRoot, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	if mitosisBin, err = testenv.BuildMitosis(goBin, bin); err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(repoRoot, "test", "cluster", "testdata", "seed.py"))
	if err != nil {
		return err
	}
	seedPy = filepath.Join(bin, "seed.py")
	if err := os.WriteFile(seedPy, b, 0o755); err != nil {
		return err
	}
	var tb [8]byte
	_, _ = rand.Read(tb[:])
	runTag = "MITOSIS_CLUSTER_TAG=" + hex.EncodeToString(tb[:])
	os.Setenv("MITOSIS_CLUSTER_TAG", strings.TrimPrefix(runTag, "MITOSIS_CLUSTER_TAG="))
	go reapOrphans()
	return nil
}

// reapOrphans does what init does for the orphans reparented to us (we are
// a child subreaper): it reaps zombies that are not in our own process
// group. Processes we start with os/exec share our process group and are
// left to their exec.Cmd; mitosis children and everything they fork (a
// multi-hop seed's frozen copy, say) run in process groups of their own.
func reapOrphans() {
	self, pgrp := os.Getpid(), syscall.Getpgrp()
	for {
		time.Sleep(50 * time.Millisecond)
		for _, pid := range allPIDs() {
			if pp, err := procPPid(pid); err != nil || pp != self {
				continue
			}
			if st, _ := procState(pid); st != "Z" {
				continue
			}
			if g, err := syscall.Getpgid(pid); err != nil || g == pgrp {
				continue
			}
			var ws syscall.WaitStatus
			_, _ = syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		}
	}
}

// requireSetup skips or fails t when the shared setup is not usable.
func requireSetup(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	if setupErr != nil {
		t.Fatalf("setup failed: %v", setupErr)
	}
}

// ---------------------------------------------------------------------------
// The cluster

// newLab builds a lab of the given nodes (all sharing one secret unless a
// spec says otherwise), starts every daemon and removes it all when t ends.
func newLab(t *testing.T, specs ...netlab.NodeSpec) *netlab.Lab {
	t.Helper()
	dir, err := os.MkdirTemp(tmpRoot, strings.ReplaceAll(t.Name(), "/", "_")+"-")
	if err != nil {
		t.Fatal(err)
	}
	lab, err := netlab.New(netlab.Config{Bin: mitosisBin, Dir: dir, Nodes: specs})
	if err != nil {
		t.Fatalf("building the lab: %v", err)
	}
	prefixMu.Lock()
	prefixes = append(prefixes, lab.Prefix)
	prefixMu.Unlock()
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range lab.Nodes {
				t.Logf("daemon %s log (last lines):\n%s", n.Name, netlab.Tail(n.LogFile, 25))
			}
		}
		if err := lab.Close(); err != nil {
			t.Errorf("closing the lab: %v", err)
		}
		for _, n := range lab.Nodes {
			for _, p := range stateLeftovers(n.StateDir) {
				t.Errorf("node %s: %s", n.Name, p)
			}
		}
	})
	for _, n := range lab.Nodes {
		if err := n.Start(); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("lab %s: %d nodes in namespaces %s-*, dir %s", lab.Prefix, len(lab.Nodes), lab.Prefix, dir)
	return lab
}

// nodes returns specs of plain nodes sharing the lab's secret.
func nodes(names ...string) []netlab.NodeSpec {
	var s []netlab.NodeSpec
	for _, n := range names {
		s = append(s, netlab.NodeSpec{Name: n})
	}
	return s
}

// stateLeftovers lists files a stopped daemon left in its state dir other
// than child logs.
func stateLeftovers(dir string) []string {
	var probs []string
	_ = filepath.Walk(dir, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return nil
		}
		if info.Mode().IsRegular() && (strings.HasSuffix(path, ".log") || strings.HasSuffix(path, ".log.1")) {
			return nil // logs, rotated ones included, are kept
		}
		probs = append(probs, fmt.Sprintf("leftover in the state dir after the daemon stopped: %s (%s)", path, info.Mode()))
		return nil
	})
	return probs
}

// cli runs the CLI against node n and fails t unless it succeeds.
func cli(t *testing.T, n *netlab.Node, args ...string) string {
	t.Helper()
	start := time.Now()
	out, errOut, err := n.CLI(cliTimeout, args...)
	if err != nil {
		t.Fatalf("node %s: mitosis %s: %v (after %v)\nstdout: %s\nstderr: %s", n.Name, strings.Join(args, " "), err,
			time.Since(start).Round(time.Millisecond), out, errOut)
	}
	return out
}

// cliFail runs the CLI against node n, expects it to fail and returns
// its stderr.
func cliFail(t *testing.T, n *netlab.Node, args ...string) string {
	t.Helper()
	out, errOut, err := n.CLI(cliTimeout, args...)
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("node %s: mitosis %s: want a failure, got %v\nstdout: %s\nstderr: %s", n.Name, strings.Join(args, " "), err, out, errOut)
	}
	return errOut
}

// forkIDs parses the ids a detached fork printed (NODE/c-... or c-...).
func forkIDs(t *testing.T, out string) []string {
	t.Helper()
	var ids []string
	for _, f := range strings.Fields(out) {
		_, id, _ := strings.Cut(f, "/")
		if id == "" {
			id = f
		}
		if !strings.HasPrefix(id, "c-") {
			t.Fatalf("fork printed %q, want child ids", out)
		}
		ids = append(ids, id)
	}
	if len(ids) == 0 {
		t.Fatalf("fork printed no child id: %q", out)
	}
	return ids
}

// ps returns `mitosis ps --json` of n.
func ps(t *testing.T, n *netlab.Node) []client.ChildInfo {
	t.Helper()
	var kids []client.ChildInfo
	out := cli(t, n, "ps", "--json")
	if err := json.Unmarshal([]byte(out), &kids); err != nil {
		t.Fatalf("node %s: ps --json: %v\n%s", n.Name, err, out)
	}
	return kids
}

// seeds returns `mitosis seeds --json` of n.
func seeds(t *testing.T, n *netlab.Node) []client.SeedInfo {
	t.Helper()
	var s []client.SeedInfo
	out := cli(t, n, "seeds", "--json")
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("node %s: seeds --json: %v\n%s", n.Name, err, out)
	}
	return s
}

// child returns child id of n's ps.
func child(t *testing.T, n *netlab.Node, id string) client.ChildInfo {
	t.Helper()
	for _, k := range ps(t, n) {
		if k.ID == id {
			return k
		}
	}
	t.Fatalf("node %s: child %s not in ps", n.Name, id)
	return client.ChildInfo{}
}

// waitEnd polls n's ps until child id is no longer running.
func waitEnd(t *testing.T, n *netlab.Node, id string, timeout time.Duration) client.ChildInfo {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		k := child(t, n, id)
		if k.State != client.StateRunning {
			return k
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s: child %s still running after %v; its log:\n%s", n.Name, id, timeout, readLog(k))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitExited0 waits for child id on n to end and insists on exit status 0.
func waitExited0(t *testing.T, n *netlab.Node, id string) client.ChildInfo {
	t.Helper()
	k := waitEnd(t, n, id, childTimeout)
	if k.State != client.StateExited || k.ExitCode != 0 {
		t.Fatalf("node %s: child %s ended %s (exit %d, signal %d, error %q); its log:\n%s",
			n.Name, id, k.State, k.ExitCode, k.Signal, k.Error, readLog(k))
	}
	return k
}

func readLog(k client.ChildInfo) string {
	if k.Log == "" {
		return "(no log)"
	}
	b, err := os.ReadFile(k.Log)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	return string(b)
}

// waitLog polls a child's log until it has a line starting with prefix and
// returns the rest of that line.
func waitLog(t *testing.T, k client.ChildInfo, prefix string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if v, ok := logLine(readLog(k), prefix); ok {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("child %s: no %q line in its log after %v:\n%s", k.ID, prefix, timeout, readLog(k))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// logLine finds the first line of s starting with prefix and returns the
// rest of it, trimmed.
func logLine(s, prefix string) (string, bool) {
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			return strings.TrimSpace(strings.TrimPrefix(l, prefix)), true
		}
	}
	return "", false
}

// ---------------------------------------------------------------------------
// Processes

// proc is a process the test started inside a node's namespace; its merged
// output is collected line by line.
type proc struct {
	name   string
	cmd    *exec.Cmd
	pid    int
	mu     sync.Mutex
	lines  []string
	exited chan struct{}
}

// start runs argv in node n's namespace with extra environment.
func start(t *testing.T, n *netlab.Node, name string, env []string, argv ...string) *proc {
	t.Helper()
	cmd := n.Command(argv...)
	cmd.Env = append(cmd.Env, env...)
	cmd.Dir = tmpRoot
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = outW, outW
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	outW.Close()
	p := &proc{name: name, cmd: cmd, pid: cmd.Process.Pid, exited: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(outR)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
		}
	}()
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		syscall.Kill(p.pid, syscall.SIGKILL)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("%s (pid %d) did not die within 10 s of SIGKILL", p.name, p.pid)
		}
		outR.Close() // the seed's frozen copy may hold the write end until its daemon ends
	})
	return p
}

// line waits for an output line starting with prefix and returns the rest.
func (p *proc) line(t *testing.T, prefix string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		p.mu.Lock()
		for _, l := range p.lines {
			if strings.HasPrefix(l, prefix) {
				p.mu.Unlock()
				return strings.TrimSpace(strings.TrimPrefix(l, prefix))
			}
		}
		out := strings.Join(p.lines, "\n")
		p.mu.Unlock()
		select {
		case <-p.exited:
			time.Sleep(100 * time.Millisecond) // let the reader drain
			p.mu.Lock()
			out = strings.Join(p.lines, "\n")
			p.mu.Unlock()
			if v, ok := logLine(out, prefix); ok {
				return v
			}
			t.Fatalf("%s (pid %d) exited without a %q line:\n%s", p.name, p.pid, prefix, out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s (pid %d): no %q line within %v:\n%s", p.name, p.pid, prefix, timeout, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startSeed starts testdata/seed.py on node n (prepare-self against n's
// daemon) and returns it with its seed id and digest; extra are more
// arguments of seed.py (its pool size).
func startSeed(t *testing.T, n *netlab.Node, name string, mib int, pandas bool, extra ...string) (p *proc, seed, digest string) {
	t.Helper()
	pd := "0"
	if pandas {
		pd = "1"
	}
	env := []string{
		client.SocketEnv + "=" + n.Sock,
		"PYTHONPATH=" + filepath.Join(repoRoot, "client", "python"),
		"OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1",
		"PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1",
	}
	started := time.Now()
	p = start(t, n, "seed.py "+name, env, append([]string{pyExe, seedPy, name, strconv.Itoa(mib), pd}, extra...)...)
	seed = p.line(t, "ROLE parent ", parentTimeout)
	digest = p.line(t, "DIGEST ", 10*time.Second)
	if !strings.HasPrefix(seed, "s-") || len(digest) != 64 {
		t.Fatalf("seed.py on %s printed seed %q digest %q", n.Name, seed, digest)
	}
	t.Logf("node %s: seed %s (%s, %d MiB array, pandas %v) prepared after %v; digest %s",
		n.Name, seed, name, mib, pandas, time.Since(started).Round(time.Millisecond), digest[:16])
	return p, seed, digest
}
