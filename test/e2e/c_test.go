package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// cChecks are the in-process checks parent.c runs after the prepare point.
var cChecks = []string{"realloc", "dontneed", "fork", "spawn", "system", "signal", "clock", "sbrk", "file", "pid", "thread"}

// continueParent sends SIGCONT to a C parent stopped at the prepare point and
// returns its output up to DONE (the parent's one and only digest run).
func continueParent(t *testing.T, p *proc) progOut {
	t.Helper()
	if p.hasExited() {
		t.Fatalf("%s (pid %d) died while stopped at the prepare point: %v\n%s", p.name, p.pid, p.waitErr, p.output())
	}
	if st, err := procState(p.pid); err != nil || st != "T" {
		t.Errorf("%s (pid %d) should still be stopped after prepare, state %q (%v)", p.name, p.pid, st, err)
	}
	from := p.lineCount()
	if err := syscall.Kill(p.pid, syscall.SIGCONT); err != nil {
		t.Fatalf("SIGCONT %d: %v", p.pid, err)
	}
	if _, err := p.waitLine("DONE", lineTimeout); err != nil {
		t.Fatal(err)
	}
	o := parseOut(p.linesFrom(from))
	if probs := o.problems("parent", cChecks); len(probs) > 0 {
		t.Fatalf("the parent itself fails (the test program or the machine is broken, not mitosis): %s\n%s",
			strings.Join(probs, "; "), p.output())
	}
	if o.roleArg != strconv.Itoa(p.pid) {
		t.Errorf("parent printed ROLE parent %s, want its pid %d", o.roleArg, p.pid)
	}
	return o
}

// assertSeedListed checks that `mitosis seeds` shows the seed.
func assertSeedListed(t *testing.T, seed string) {
	t.Helper()
	r := mitosis(cliTimeout, "seeds")
	if !r.ok() {
		t.Errorf("seeds failed:\n%s", r)
	} else if !strings.Contains(r.stdout, seed) {
		t.Errorf("seeds does not list %s:\n%s", seed, r.stdout)
	}
}

// assertPreparedParent checks that prepare left the parent as it was:
// stopped (it stopped itself) and no longer traced.
func assertPreparedParent(t *testing.T, p *proc) {
	t.Helper()
	if tr, err := procInt(p.pid, "TracerPid"); err != nil || tr != 0 {
		t.Errorf("parent (pid %d) still traced after prepare: TracerPid %d (%v)", p.pid, tr, err)
	}
	if st, err := procState(p.pid); err != nil || st != "T" {
		t.Errorf("parent (pid %d) was stopped before prepare and should stay stopped: state %q (%v)", p.pid, st, err)
	}
}

func testCParent(t *testing.T, bin, name string) {
	requireSetup(t)
	p := startCParent(t, bin)
	seed := prepareSeed(t, p.pid, name)
	assertPreparedParent(t, p)
	assertSeedListed(t, seed)

	start := time.Now()
	res := forkMany(t, seed, 20, 4, func(r *forkResult) []string {
		probs := r.out.problems("child", cChecks)
		if r.out.roleArg == strconv.Itoa(p.pid) {
			probs = append(probs, "child runs with the parent's pid")
		}
		return probs
	})
	t.Logf("20 children (4 at a time) in %v", time.Since(start).Round(time.Millisecond))

	// The parent's digest, taken once, after the children.
	po := continueParent(t, p)
	want := po.digest()
	pids := map[string]int{}
	for _, r := range res {
		if r == nil {
			continue
		}
		if got := r.out.digest(); got != want {
			t.Errorf("child %d: DIGEST %s, parent's %s", r.idx, got, want)
		}
		if r.out.roleArg != "" {
			if j, dup := pids[r.out.roleArg]; dup {
				t.Errorf("children %d and %d both ran as pid %s", j, r.idx, r.out.roleArg)
			}
			pids[r.out.roleArg] = r.idx
		}
	}
	if code, err := p.waitExit(30 * time.Second); err != nil || code != 0 {
		t.Errorf("parent exit %d (%v), want 0\n%s", code, err, p.output())
	}
}

func TestStaticC(t *testing.T)  { testCParent(t, parentStatic, "static-c") }
func TestDynamicC(t *testing.T) { testCParent(t, parentDynamic, "dynamic-c") }

// TestEager: `fork --eager` (copy every page before the child runs) gives
// the same child as the lazy fork, whether its stdout is a pipe or a file.
func TestEager(t *testing.T) {
	requireSetup(t)
	p := startCParent(t, parentStatic)
	seed := prepareSeed(t, p.pid, "eager-c")
	res := forkMany(t, seed, 8, 2, childProblems(cChecks), "--eager")
	for i := 0; i < 2 && !t.Failed(); i++ {
		f, err := os.Create(filepath.Join(tmpRoot, fmt.Sprintf("eager-%d.out", i)))
		if err != nil {
			t.Fatal(err)
		}
		cr := mitosisTo(forkTimeout, f, "fork", seed, "--eager")
		f.Close()
		r := &forkResult{idx: len(res), cli: cr, out: parseOut(cr.stdout)}
		probs := r.out.problems("child", cChecks)
		if cr.err != nil {
			probs = append(probs, cr.err.Error())
		} else if cr.code != 0 {
			probs = append(probs, exitText(cr.code))
		}
		if len(probs) > 0 {
			t.Errorf("eager child with stdout to a file: %s\n%s", strings.Join(probs, "; "), cr)
		}
		res = append(res, r)
	}
	po := continueParent(t, p)
	for _, r := range res {
		if r == nil {
			continue
		}
		if got := r.out.digest(); got != po.digest() {
			t.Errorf("eager child %d: DIGEST %s, parent's %s", r.idx, got, po.digest())
		}
	}
	// The daemon accounts the eager copies (ChildInfo.pages_eager).
	kids, err := psChildren()
	if err != nil {
		t.Errorf("%v", err)
		return
	}
	for _, r := range res {
		if r == nil || r.out.roleArg == "" {
			continue
		}
		found := false
		for _, k := range kids {
			if pid, ok := jsonInt(k, "pid"); ok && strconv.FormatInt(pid, 10) == r.out.roleArg && jsonStr(k, "seed") == seed {
				found = true
				if n, ok := jsonInt(k, "pages_eager"); !ok || n <= 0 {
					t.Errorf("eager child %s (pid %d): pages_eager %v, want > 0", jsonStr(k, "id"), pid, k["pages_eager"])
				}
			}
		}
		if !found {
			t.Errorf("eager child %d (pid %s) not in ps --json", r.idx, r.out.roleArg)
		}
	}
	if code, err := p.waitExit(30 * time.Second); err != nil || code != 0 {
		t.Errorf("parent exit %d (%v), want 0", code, err)
	}
}

// TestIsolation: writes of the parent after prepare are invisible to the
// children; a child's writes are invisible to a sibling forked after it and
// to the parent.
func TestIsolation(t *testing.T) {
	requireSetup(t)
	p := startCParent(t, parentStatic, "--isolate", "--hold")
	seed := prepareSeed(t, p.pid, "isolation-c")

	// The parent runs first: digest D0, then writes its marker (PM).
	from := p.lineCount()
	if err := syscall.Kill(p.pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if _, err := p.waitLine("MARKED", lineTimeout); err != nil {
		t.Fatal(err)
	}
	po := parseOut(p.linesFrom(from))
	d0, pm := po.digest(), po.marked
	if d0 == "" || pm == "" || d0 == pm {
		t.Fatalf("parent: DIGEST %q MARKED %q: want two different digests\n%s", d0, pm, p.output())
	}
	var pprobs []string
	for _, pr := range po.problems("parent", cChecks) {
		if !strings.Contains(pr, "no DONE") { // it holds before DONE
			pprobs = append(pprobs, pr)
		}
	}
	if len(pprobs) > 0 {
		t.Fatalf("the parent itself fails: %s\n%s", strings.Join(pprobs, "; "), p.output())
	}

	check := func(r *forkResult) []string {
		probs := r.out.problems("child", cChecks)
		if r.out.digest() != d0 {
			probs = append(probs, fmt.Sprintf("DIGEST %s, want the prepare-time %s (parent after its write: %s)",
				r.out.digest(), d0, pm))
		}
		if r.out.marked == "" || r.out.marked == d0 || r.out.marked == pm {
			probs = append(probs, fmt.Sprintf("MARKED %q: want a digest of its own (prepare-time %s, parent %s)",
				r.out.marked, d0, pm))
		}
		if r.out.final != r.out.marked {
			probs = append(probs, fmt.Sprintf("FINAL %s != MARKED %s", r.out.final, r.out.marked))
		}
		return probs
	}
	// Child A writes its marker and exits; B, forked afterwards, must not see it.
	a := forkMany(t, seed, 1, 1, check)
	if t.Failed() {
		t.FailNow() // a hung child would hang its siblings too: one timeout is enough
	}
	b := forkMany(t, seed, 1, 1, check)
	if a[0] != nil && b[0] != nil && a[0].out.marked != "" && a[0].out.marked == b[0].out.marked {
		t.Errorf("children A and B end with the same marked digest %s: one saw the other's write", a[0].out.marked)
	}
	// Concurrent siblings.
	if !t.Failed() {
		forkMany(t, seed, 4, 4, check)
	}

	// The parent's state is still its own.
	if _, err := p.stdin.WriteString("go\n"); err != nil {
		t.Fatal(err)
	}
	l, err := p.waitLine("FINAL", lineTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if f := strings.Fields(l); len(f) < 2 || f[1] != pm {
		t.Errorf("parent: %q after the children ran, want FINAL %s (children's writes leaked into the parent)", l, pm)
	}
	if code, err := p.waitExit(30 * time.Second); err != nil || code != 0 {
		t.Errorf("parent exit %d (%v), want 0\n%s", code, err, p.output())
	}
}

// TestDetached: `fork SEED --count N` starts N children in the background;
// their output goes to STATE/children/<id>.log and ps shows how they ended.
func TestDetached(t *testing.T) {
	requireSetup(t)
	p := startCParent(t, parentStatic)
	seed := prepareSeed(t, p.pid, "detached-c")
	r := mitosis(cliTimeout, "fork", seed, "--count", "3")
	if !r.ok() {
		t.Fatalf("fork --count 3 failed:\n%s", r)
	}
	ids := childIDRe.FindAllString(r.stdout, -1)
	if len(ids) != 3 {
		t.Fatalf("fork --count 3 printed %d child ids, want 3:\n%s", len(ids), r)
	}

	// Wait until ps shows all three ended.
	deadline := time.Now().Add(forkTimeout)
	ended := map[string]map[string]any{}
	for len(ended) < len(ids) {
		kids, err := psChildren()
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range kids {
			id := jsonStr(k, "id")
			for _, want := range ids {
				if id == want && jsonStr(k, "state") != "running" {
					ended[id] = k
				}
			}
		}
		if len(ended) == len(ids) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v only %d of %v ended; ps: %v", forkTimeout, len(ended), ids, kids)
		}
		time.Sleep(100 * time.Millisecond)
	}
	po := continueParent(t, p)
	for _, id := range ids {
		k := ended[id]
		if st := jsonStr(k, "state"); st != "exited" {
			t.Errorf("child %s: state %q, want exited (%v)", id, st, k)
		}
		if c, ok := jsonInt(k, "exit_code"); !ok || c != 0 {
			t.Errorf("child %s: exit_code %v, want 0", id, k["exit_code"])
		}
		if s, ok := jsonInt(k, "signal"); ok && s != 0 {
			t.Errorf("child %s: signal %d", id, s)
		}
		if jsonStr(k, "seed") != seed {
			t.Errorf("child %s: seed %q, want %s", id, jsonStr(k, "seed"), seed)
		}
		logPath := filepath.Join(stateDir, "children", id+".log")
		b, err := os.ReadFile(logPath)
		if err != nil {
			t.Errorf("child %s: %v", id, err)
			continue
		}
		o := parseOut(string(b))
		probs := o.problems("child", cChecks)
		if o.digest() != po.digest() {
			probs = append(probs, fmt.Sprintf("DIGEST %s, parent's %s", o.digest(), po.digest()))
		}
		if len(probs) > 0 {
			t.Errorf("child %s (%s): %s\n%s", id, logPath, strings.Join(probs, "; "), b)
		}
	}
	if code, err := p.waitExit(30 * time.Second); err != nil || code != 0 {
		t.Errorf("parent exit %d (%v), want 0", code, err)
	}
}
