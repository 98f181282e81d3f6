package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// mtChecks are the in-process checks of testdata/mthreads.c.
var mtChecks = []string{"join", "threads"}

// mtWorkers is the number of worker threads of mthreads.c (plus main).
const mtWorkers = 8

// startThreaded starts mthreads with args and waits for READY; without
// --live also until it has stopped itself at the prepare point.
func startThreaded(t *testing.T, args ...string) *proc {
	t.Helper()
	p := startProc(t, "mthreads", append([]string{mthreadsBin}, args...)...)
	l, err := p.waitLine("READY ", readyTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(strings.TrimPrefix(l, "READY ")); got != strconv.Itoa(p.pid) {
		t.Fatalf("mthreads printed %q, want READY %d", l, p.pid)
	}
	live := false
	for _, a := range args {
		live = live || a == "--live"
	}
	if !live {
		if err := waitState(p.pid, "T", 10*time.Second); err != nil {
			t.Fatalf("mthreads did not stop itself at the prepare point: %v", err)
		}
	}
	if n, err := procInt(p.pid, "Threads"); err != nil || n < mtWorkers+1 {
		t.Fatalf("mthreads has %d threads (%v), want at least %d", n, err, mtWorkers+1)
	}
	return p
}

// mtVerdict checks one child of an mthreads seed: its checks, a pid other
// than parentPID and, when want is set, the parent's digest.
func mtVerdict(parentPID int, want string, checks []string) func(r *forkResult) []string {
	return func(r *forkResult) []string {
		probs := r.out.problems("child", checks)
		if r.out.roleArg == strconv.Itoa(parentPID) {
			probs = append(probs, "child runs with the parent's pid")
		}
		if want != "" && r.out.digest() != want {
			probs = append(probs, fmt.Sprintf("DIGEST %s, parent's %s", r.out.digest(), want))
		}
		return probs
	}
}

// checkDigests reports every result of res whose DIGEST is not want.
func checkDigests(t *testing.T, who string, res []*forkResult, want string) {
	t.Helper()
	for _, r := range res {
		if r != nil && r.out.digest() != want {
			t.Errorf("%s %d: DIGEST %s, parent's %s", who, r.idx, r.out.digest(), want)
		}
	}
}

// finishParent lets a prepared mthreads parent go on (SIGCONT when it is
// stopped, SIGUSR1 when it runs live), checks its own run and returns its
// digest.
func finishParent(t *testing.T, p *proc, sig syscall.Signal, checks []string) string {
	t.Helper()
	from := p.lineCount()
	if err := syscall.Kill(p.pid, sig); err != nil {
		t.Fatalf("kill -%v %d: %v", sig, p.pid, err)
	}
	if _, err := p.waitLine("DONE", lineTimeout); err != nil {
		t.Fatal(err)
	}
	o := parseOut(p.linesFrom(from))
	if probs := o.problems("parent", checks); len(probs) > 0 {
		t.Fatalf("the parent itself fails (the test program or the machine is broken, not mitosis): %s\n%s",
			strings.Join(probs, "; "), p.output())
	}
	if code, err := p.waitExit(30 * time.Second); err != nil || code != 0 {
		t.Errorf("parent exit %d (%v), want 0\n%s", code, err, p.output())
	}
	return o.digest()
}

// TestThreadsC: a C parent with 8 threads, stopped at the prepare point
// while they loop on their counters, sleep, wait on condition variables with
// and without a timeout and hand a token back and forth: 20 children (4 at a
// time) continue all 8 threads from their own state (counters, 1 MiB
// buffers, __thread values, glibc's cached tids: mthreads.c checks each) and
// print the parent's digest.
func TestThreadsC(t *testing.T) {
	requireSetup(t)
	p := startThreaded(t)
	seed := prepareSeed(t, p.pid, "threads-c")
	assertPreparedParent(t, p)
	if n, err := procInt(p.pid, "Threads"); err != nil || n != mtWorkers+1 {
		t.Errorf("parent has %d threads after prepare (%v), want %d", n, err, mtWorkers+1)
	}
	if r := mitosis(cliTimeout, "seeds", "--json"); !r.ok() {
		t.Errorf("seeds --json:\n%s", r)
	} else {
		var seeds []struct {
			ID      string `json:"id"`
			Threads int    `json:"threads"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &seeds); err != nil {
			t.Errorf("seeds --json: %v\n%s", err, r.stdout)
		}
		for _, s := range seeds {
			if s.ID == seed && s.Threads != mtWorkers+1 {
				t.Errorf("seeds reports %d threads for %s, want %d", s.Threads, seed, mtWorkers+1)
			}
		}
	}
	start := time.Now()
	res := forkMany(t, seed, 20, 4, mtVerdict(p.pid, "", mtChecks))
	t.Logf("20 children of a 9-thread parent (4 at a time) in %v", time.Since(start).Round(time.Millisecond))
	want := finishParent(t, p, syscall.SIGCONT, mtChecks)
	checkDigests(t, "child", res, want)
}

// TestThreadsLive: prepare a running multi-threaded parent while one of its
// threads keeps creating and joining short-lived threads (threads are born
// and exit during every prepare); three seeds taken one after the other
// each fork children that continue every thread, the churning one included.
func TestThreadsLive(t *testing.T) {
	requireSetup(t)
	checks := append([]string{"churn"}, mtChecks...)
	p := startThreaded(t, "--live", "--churn")
	var seeds []string
	for i := 0; i < 3; i++ {
		seeds = append(seeds, prepareSeed(t, p.pid, fmt.Sprintf("threads-live-%d", i)))
		if st, err := procState(p.pid); err != nil || st == "T" || st == "t" {
			t.Errorf("parent should keep running after a live prepare: state %q (%v)", st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var res []*forkResult
	for _, s := range seeds {
		res = append(res, forkMany(t, s, 6, 3, mtVerdict(p.pid, "", checks))...)
	}
	want := finishParent(t, p, syscall.SIGUSR1, checks)
	checkDigests(t, "child", res, want)
}

// TestThreadsMultiHop: a child of a multi-threaded seed, stopped again with
// its 8 workers still in their loops, is prepared into a seed of its own;
// its children (grandchildren of the parent) continue every thread, and so
// does the child itself afterwards.
func TestThreadsMultiHop(t *testing.T) {
	requireSetup(t)
	p := startThreaded(t, "--hop")
	seed := prepareSeed(t, p.pid, "threads-hop")
	r := mitosis(cliTimeout, "fork", seed, "--detach", "--json")
	if !r.ok() {
		t.Fatalf("fork --detach failed:\n%s", r)
	}
	var kids []struct {
		ID  string `json:"id"`
		PID int    `json:"pid"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &kids); err != nil || len(kids) != 1 || kids[0].PID <= 0 {
		var one struct {
			ID  string `json:"id"`
			PID int    `json:"pid"`
		}
		if err2 := json.Unmarshal([]byte(r.stdout), &one); err2 != nil || one.PID <= 0 {
			t.Fatalf("fork --detach --json: want the child with its pid (%v, %v):\n%s", err, err2, r)
		}
		kids = append(kids[:0], one)
	}
	hop := kids[0]
	logPath := filepath.Join(stateDir, "children", hop.ID+".log")
	if err := waitState(hop.PID, "T", 20*time.Second); err != nil {
		b, _ := os.ReadFile(logPath)
		t.Fatalf("child %s (pid %d) did not stop at its HOP point: %v\n%s", hop.ID, hop.PID, err, b)
	}
	if n, err := procInt(hop.PID, "Threads"); err != nil || n != mtWorkers+1 {
		t.Fatalf("child %s has %d threads at its HOP point (%v), want %d", hop.ID, n, err, mtWorkers+1)
	}
	seed2 := prepareSeed(t, hop.PID, "threads-hop2")
	grand := forkMany(t, seed2, 8, 4, mtVerdict(p.pid, "", mtChecks))
	for _, g := range grand {
		if g != nil && g.out.roleArg == strconv.Itoa(hop.PID) {
			t.Errorf("grandchild %d runs with its parent's pid %d", g.idx, hop.PID)
		}
	}
	if err := syscall.Kill(hop.PID, syscall.SIGCONT); err != nil {
		t.Fatalf("SIGCONT child %d: %v", hop.PID, err)
	}
	deadline := time.Now().Add(forkTimeout)
	var k map[string]any
	for k == nil {
		all, err := psChildren()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range all {
			if jsonStr(c, "id") == hop.ID && jsonStr(c, "state") != "running" {
				k = c
			}
		}
		if k == nil && time.Now().After(deadline) {
			t.Fatalf("child %s did not end within %v of SIGCONT", hop.ID, forkTimeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if c, ok := jsonInt(k, "exit_code"); jsonStr(k, "state") != "exited" || !ok || c != 0 {
		t.Errorf("child %s: %v, want exited 0", hop.ID, k)
	}
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	ho := parseOut(string(b))
	if probs := ho.problems("child", mtChecks); len(probs) > 0 {
		t.Errorf("child %s after SIGCONT: %s\n%s", hop.ID, strings.Join(probs, "; "), b)
	}
	want := finishParent(t, p, syscall.SIGCONT, mtChecks)
	if ho.digest() != want {
		t.Errorf("child %s: DIGEST %s, parent's %s", hop.ID, ho.digest(), want)
	}
	checkDigests(t, "grandchild", grand, want)
}

// TestThreadsPython: a Python parent with numpy (OpenBLAS's pthread pool),
// pandas, igraph and a concurrent.futures pool of 4 threads, imported and
// started WITHOUT any thread-limiting variable, prepares itself through the
// client library; 20 children (4 at a time) have the parent's threads, run a
// matrix multiply on OpenBLAS's pool, a groupby and per-key sums on the
// Python pool, and print the parent's digest.
func TestThreadsPython(t *testing.T) {
	requireSetup(t)
	name := "pythreads-" + strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
	p := startProc(t, "mtparent.py", pyExe, mtParentPy, name)
	l, err := p.waitLine("THREADS ", pyReadyTimeout)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(l, "THREADS ")))
	// main + 4 pool threads, + OpenBLAS's workers (one per extra CPU).
	if n < 5 {
		t.Fatalf("mtparent.py has %d threads at its prepare point, want at least 5\n%s", n, p.output())
	}
	l, err = p.waitLine("ROLE ", pyReadyTimeout)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(l)
	if len(f) < 3 || f[1] != "parent" || !seedIDRe.MatchString(f[2]) {
		t.Fatalf("mtparent.py printed %q after mitosis.prepare, want ROLE parent <seed>\n%s", l, p.output())
	}
	seed := f[2]
	adoptSeed(t, seed)
	if _, err := p.waitLine("DIGEST ", lineTimeout); err != nil {
		t.Fatal(err)
	}
	po := parseOut(p.output())
	want := po.digest()
	checks := []string{"threads", "state"}
	for _, c := range checks {
		if po.checks[c] != "ok" {
			t.Fatalf("the parent itself fails CHECK %s %q\n%s", c, po.checks[c], p.output())
		}
	}
	t.Logf("parent pid %d with %d threads prepared itself into %s; digest %s", p.pid, n, seed, want)
	start := time.Now()
	forkMany(t, seed, 20, 4, func(r *forkResult) []string {
		probs := r.out.problems("child", checks)
		if r.out.digest() != want {
			probs = append(probs, fmt.Sprintf("DIGEST %s, parent's %s", r.out.digest(), want))
		}
		return probs
	})
	t.Logf("20 children of a %d-thread Python parent (4 at a time) in %v", n, time.Since(start).Round(time.Millisecond))
	fmt.Fprintln(p.stdin)
	if _, err := p.waitLine("DONE", lineTimeout); err != nil {
		t.Fatal(err)
	}
	if code, err := p.waitExit(30 * time.Second); err != nil || code != 0 {
		t.Errorf("parent exit %d (%v), want 0\n%s", code, err, p.output())
	}
}

// nodeExe is the Node.js interpreter (Debian's nodejs package).
const nodeExe = "/usr/bin/node"

// TestThreadsNode: a Node.js parent that has required modules, built a Map
// of 200k entries and started a worker thread (plus libuv's pool and V8's
// platform threads, and their event loops: epoll instances, eventfds and
// self-pipes) stops itself and is prepared; 8 children (4 at a time) run a
// timer, a job on libuv's pool and a round trip to the worker, and print the
// parent's digest of the Map, the job and the worker's state.
func TestThreadsNode(t *testing.T) {
	requireSetup(t)
	if _, err := os.Stat(nodeExe); err != nil {
		t.Fatalf("%s: %v (.ci/deps installs Debian's nodejs)", nodeExe, err)
	}
	p := startProc(t, "mtparent.js", nodeExe, mtParentJS)
	forkStoppedRuntime(t, p, "threads-node", 3, []string{"timer", "pool", "worker"})
}

// forkStoppedRuntime runs the common part of the runtime tests (Node.js,
// JVM): p prints READY <pid> and stops itself with at least minThreads
// threads; it is prepared as seed name, 8 children (4 at a time) must pass
// checks, and the parent, continued, must print the digest they printed.
func forkStoppedRuntime(t *testing.T, p *proc, name string, minThreads int, checks []string) {
	t.Helper()
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
	n, err := procInt(p.pid, "Threads")
	if err != nil || n < minThreads {
		t.Fatalf("%s has %d threads (%v), want at least %d", p.name, n, err, minThreads)
	}
	seed := prepareSeed(t, p.pid, name)
	assertPreparedParent(t, p)
	start := time.Now()
	res := forkMany(t, seed, 8, 4, mtVerdict(p.pid, "", checks))
	t.Logf("8 children of a %d-thread %s parent (4 at a time) in %v", n, p.name, time.Since(start).Round(time.Millisecond))
	want := finishParent(t, p, syscall.SIGCONT, checks)
	checkDigests(t, "child", res, want)
}

// TestThreadsContainer: a multi-threaded parent started by `mitosis run` in
// an image; its children run in PID namespaces of their own, where the
// threads the restore creates get other ids than in the node's namespace:
// every thread still continues, with glibc's cached tids right.
func TestThreadsContainer(t *testing.T) {
	requireSetup(t)
	img := imageDir(t)
	b, err := os.ReadFile(mthreadsBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(img, "app", "mthreads"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	pid := runStopped(t, "run", "--rootfs", img, "--", "/app/mthreads")
	if n, err := procInt(pid, "Threads"); err != nil || n != mtWorkers+1 {
		t.Fatalf("containerized mthreads has %d threads (%v), want %d", n, err, mtWorkers+1)
	}
	seed := prepareSeed(t, pid, "threads-box")
	var want string // one child at a time: the verdict reads and sets it
	forkMany(t, seed, 4, 1, func(r *forkResult) []string {
		// Each child is PID 1 of its namespace, as the parent was of its
		// own: mthreads cannot tell it is a child and says "parent".
		probs := r.out.problems(r.out.role, mtChecks)
		if r.out.role == "" {
			probs = append(probs, "no ROLE line")
		}
		if want == "" {
			want = r.out.digest()
		} else if r.out.digest() != want {
			probs = append(probs, fmt.Sprintf("DIGEST %s, another child's %s", r.out.digest(), want))
		}
		return probs
	})
}

// TestThreadsLoaderLock: a thread is inside dlopen() at the prepare point
// (its library's constructor waits), holding the dynamic loader's
// recursive lock, whose owner field is that thread's tid. In a child the
// thread has another tid: unless the restore rewrites the owner, the
// thread's dlopen cannot unlock and the next dlopen hangs (alarm: SIGALRM).
// Every child and the parent finish both dlopens.
func TestThreadsLoaderLock(t *testing.T) {
	requireSetup(t)
	p := startProc(t, "dlparent", dlparentBin, slowInitSo, "libm.so.6")
	if _, err := p.waitLine("READY ", lineTimeout); err != nil {
		t.Fatal(err)
	}
	seed := prepareSeed(t, p.pid, "loader-lock")
	for i := 0; i < 3; i++ {
		r := mitosis(forkTimeout, "fork", seed)
		if !r.ok() || !strings.Contains(r.stdout, "ROLE child") || !strings.Contains(r.stdout, "DLOPEN ok") {
			t.Errorf("child %d of a parent prepared inside dlopen():\n%s", i, r)
		}
	}
	if err := syscall.Kill(p.pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	if l, err := p.waitLine("DLOPEN ", lineTimeout); err != nil || l != "DLOPEN ok" {
		t.Errorf("parent after prepare: %q (%v)\n%s", l, err, p.output())
	}
}
