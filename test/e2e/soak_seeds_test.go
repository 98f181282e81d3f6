package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/node"
)

// soakSeedsWarmup is how many prepare/remove cycles run before the
// measurement.
const soakSeedsWarmup = 100

// parentUsage is what repeated prepares could leave in the parent: its
// own descriptors and mappings (the injected clone and wait4 must leave
// nothing), threads, child processes (the frozen copies: a removed seed's
// copy must be reaped, not left a zombie), and its tracer and state.
type parentUsage struct {
	fds, maps, threads int
	kids               []int
	tracer             int
	state              string
}

func (u parentUsage) String() string {
	return fmt.Sprintf("fds %d, mappings %d, threads %d, child processes %v, TracerPid %d, state %s",
		u.fds, u.maps, u.threads, u.kids, u.tracer, u.state)
}

func parentUsageOf(pid int) (parentUsage, error) {
	var u parentUsage
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return u, err
	}
	u.fds = len(ents)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return u, err
	}
	u.maps = strings.Count(string(b), "\n")
	if u.threads, err = procInt(pid, "Threads"); err != nil {
		return u, err
	}
	if u.tracer, err = procInt(pid, "TracerPid"); err != nil {
		return u, err
	}
	if u.state, err = procState(pid); err != nil {
		return u, err
	}
	u.kids = childrenOf(pid)
	return u, nil
}

// frozenCopyGone reports whether the frozen copy src of parent pid is gone
// (no process src, or src is another process now).
func frozenCopyGone(pid, src int) (bool, string) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", src))
	if err != nil {
		return true, ""
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return true, ""
	}
	f := strings.Fields(s[i+1:])
	if len(f) > 1 && f[1] == strconv.Itoa(pid) {
		return false, "state " + f[0]
	}
	return true, ""
}

// TestSoakSeeds: a running 9-thread process (mthreads --live) is prepared
// into a seed and the seed removed, 150 times in a row after a warm-up of
// soakSeedsWarmup cycles (MITOSIS_SOAK_SEEDS=1000 for the long run). One
// seed in 5 first forks an attached child (which creates the seed's page
// cache memfd and a pager) whose checks must pass; its record stays in the
// daemon's history, as any child's does, and must not keep the removed
// seed's memory (its descriptor, its cache) alive with it. After every removal the seed's
// frozen copy is gone (reaped in the parent, not left a zombie) and the
// parent is running and not traced. After the loop the daemon holds
// exactly the descriptors, memfds, cgroups, state files and child
// processes it held before and lists the seeds it listed before, ps lists
// the loop's children (history bound permitting), threads, mappings and
// RSS are within soakCompare's bounds; the parent has exactly the
// descriptors, mappings and threads it had and no child process, and
// finishes its own run correctly.
//
// MITOSIS_SOAK_SEEDS_FORK_EVERY=N forks in one seed of N instead (0: never);
// MITOSIS_SOAK_SEEDS_CHURN=1 adds mthreads' churning thread (threads are
// created and joined during every prepare).
func TestSoakSeeds(t *testing.T) {
	requireSetup(t)
	n := soakN("MITOSIS_SOAK_SEEDS", 150)
	// One seed in forkEvery forks a child (MITOSIS_SOAK_SEEDS_FORK_EVERY;
	// 0: none).
	forkEvery := 5
	if v, err := strconv.Atoi(os.Getenv("MITOSIS_SOAK_SEEDS_FORK_EVERY")); err == nil && v >= 0 {
		forkEvery = v
	}
	// MITOSIS_SOAK_SEEDS_CHURN=1: a thread of the parent keeps creating
	// and joining threads, so threads are born and die during every
	// prepare (as in TestThreadsLive).
	args, checks := []string{"--live"}, mtChecks
	if os.Getenv("MITOSIS_SOAK_SEEDS_CHURN") == "1" {
		args, checks = append(args, "--churn"), append([]string{"churn"}, mtChecks...)
	}
	p := startThreaded(t, args...)
	mon := newSoakMonitor(t)
	c, err := client.Dial(sockPath)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	out, err := os.CreateTemp(tmpRoot, "soak-seeds-out-*")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(out.Name())
	defer out.Close()
	in, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	seedsBefore, err := c.Seeds()
	if err != nil {
		t.Fatal(err)
	}

	digests := map[string]int{}
	forked := 0
	var prepTotal, rmTotal, forkTotal time.Duration
	var prepMax, rmMax time.Duration
	// cycle prepares, optionally forks one child, removes; false after
	// the first problem.
	cycle := func(i int) bool {
		t0 := time.Now()
		info, err := c.Prepare(p.pid, fmt.Sprintf("soak-seed-%d", i))
		if err != nil {
			t.Errorf("prepare %d: %v", i, err)
			return false
		}
		noteSeed(info.ID)
		dt := time.Since(t0)
		prepTotal += dt
		prepMax = max(prepMax, dt)
		ok := true
		if gone, _ := frozenCopyGone(p.pid, info.SourcePID); gone || info.SourcePID <= 0 {
			t.Errorf("seed %d (%s): frozen copy %d is not a child of the parent %d", i, info.ID, info.SourcePID, p.pid)
			ok = false
		}
		if ok && forkEvery > 0 && i%forkEvery == 0 {
			ok = soakSeedChild(t, c, info.ID, p.pid, checks, in, out, digests)
			forked++
			forkTotal += time.Since(t0) - dt
		}
		t1 := time.Now()
		if err := c.Remove(info.ID, false); err != nil {
			t.Errorf("rm seed %d (%s): %v", i, info.ID, err)
			return false
		}
		dt = time.Since(t1)
		rmTotal += dt
		rmMax = max(rmMax, dt)
		if gone, st := frozenCopyGone(p.pid, info.SourcePID); !gone {
			t.Errorf("seed %d (%s) removed, but its frozen copy %d is still the parent's child (%s)", i, info.ID, info.SourcePID, st)
			ok = false
		}
		pu, err := parentUsageOf(p.pid)
		if err != nil {
			t.Errorf("parent after seed %d: %v", i, err)
			return false
		}
		if pu.tracer != 0 || !strings.Contains("RSD", pu.state) {
			t.Errorf("parent after seed %d (%s) was removed: %v, want running and not traced", i, info.ID, pu)
			ok = false
		}
		return ok
	}

	// Warm-up: the daemon's tracer threads, pools and caches, and enough
	// GC cycles that its heap and the code it runs are resident at their
	// steady-state size (see soakRSSPercent).
	for i := 0; i < soakSeedsWarmup && !t.Failed(); i++ {
		cycle(i)
	}
	if t.Failed() {
		t.FailNow()
	}
	probeHeap(t) // the probe's own code and buffers, once before measuring
	time.Sleep(200 * time.Millisecond)
	before := mon.usage(t)
	hb := probeHeap(t)
	pBefore, err := parentUsageOf(p.pid)
	if err != nil {
		t.Fatal(err)
	}
	forked, prepTotal, rmTotal, forkTotal, prepMax, rmMax = 0, 0, 0, 0, 0, 0
	start := time.Now()
	done := 0
	for i := 0; i < n; i++ {
		if !cycle(i) {
			break
		}
		done++
	}
	took := time.Since(start)
	after := mon.settle(t, before)
	ha := probeHeap(t)
	pAfter, err := parentUsageOf(p.pid)
	if err != nil {
		t.Fatal(err)
	}
	per := func(d time.Duration, k int) time.Duration {
		if k == 0 {
			return 0
		}
		return (d / time.Duration(k)).Round(10 * time.Microsecond)
	}
	t.Logf("%d seeds prepared and removed in %v (%.1f/s; prepare mean %v max %v, rm mean %v max %v; %d with a child, fork+run mean %v)\n  daemon before: %v\n                 %v\n  daemon after:  %v\n                 %v\n  parent before: %v\n  parent after:  %v",
		done, took.Round(time.Millisecond), float64(done)/took.Seconds(), per(prepTotal, done), prepMax.Round(10*time.Microsecond),
		per(rmTotal, done), rmMax.Round(10*time.Microsecond), forked, per(forkTotal, forked), before, hb, after, ha, pBefore, pAfter)
	soakCompare(t, fmt.Sprintf("after %d seeds", done), before, after, min(before.records+forked, node.MaxHistory))
	if pAfter.fds != pBefore.fds || pAfter.maps != pBefore.maps || (pAfter.threads != pBefore.threads && len(checks) == len(mtChecks)) ||
		len(pAfter.kids) != 0 || pAfter.tracer != 0 || !strings.Contains("RSD", pAfter.state) {
		t.Errorf("parent after %d seeds: %v, before: %v (want the same descriptors, mappings and threads, no child process, not traced, running)",
			done, pAfter, pBefore)
		if len(pAfter.kids) > 0 {
			for _, k := range pAfter.kids {
				st, _ := procState(k)
				t.Errorf("  child process %d of the parent: state %s %q", k, st, procCmdline(k))
			}
		}
	}
	seeds, err := c.Seeds()
	if err != nil {
		t.Fatal(err)
	}
	if len(seeds) != len(seedsBefore) {
		t.Errorf("daemon lists %d seeds after the loop, %d before: %v", len(seeds), len(seedsBefore), seeds)
	}
	want := finishParent(t, p, syscall.SIGUSR1, checks)
	for d, k := range digests {
		if d != want {
			t.Errorf("%d children printed DIGEST %s, the parent's is %s", k, d, want)
		}
	}
}

// soakSeedChild forks one attached child of seed and checks it like
// TestThreadsLive does.
func soakSeedChild(t *testing.T, c *client.Client, seed string, parentPID int, checks []string, in, out *os.File, digests map[string]int) bool {
	t.Helper()
	r, err := forkAttachedFile(c, seed, in, out, func(sofar []byte) {
		t.Fatalf("child of %s did not end within %v (the test's connection is stuck); its threads:\n%s\noutput so far:\n%s",
			seed, forkTimeout, runningChildThreads(seed), sofar)
	})
	if err != nil {
		t.Fatal(err)
	}
	if r.err != nil {
		t.Errorf("fork %s: %v", seed, r.err)
		return false
	}
	o, probs := r.problems(checks, parentPID)
	b := r.out
	if len(probs) > 0 {
		t.Errorf("child %s of %s: %s\n%s", r.info.ID, seed, strings.Join(probs, "; "), b)
		return false
	}
	digests[o.digest()]++
	return true
}

// runningChildThreads describes the threads of seed's running children
// (state, wait channel, syscall), for the report of a hung child.
func runningChildThreads(seed string) string {
	c, err := client.Dial(sockPath)
	if err != nil {
		return err.Error()
	}
	defer c.Close()
	kids, err := c.PS()
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, k := range kids {
		if k.Seed != seed || k.State != client.StateRunning {
			continue
		}
		fmt.Fprintf(&b, "child %s pid %d:\n", k.ID, k.PID)
		var words []uint64
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", k.PID))
		for _, task := range tasks {
			dir := fmt.Sprintf("/proc/%d/task/%s", k.PID, task.Name())
			st, _ := os.ReadFile(dir + "/stat")
			wchan, _ := os.ReadFile(dir + "/wchan")
			sc, _ := os.ReadFile(dir + "/syscall")
			state := ""
			if i := strings.LastIndexByte(string(st), ')'); i > 0 && i+2 < len(st) {
				state = string(st[i+2 : i+3])
			}
			fmt.Fprintf(&b, "  tid %s state %s wchan %s syscall %s\n", task.Name(), state, wchan, strings.TrimSpace(string(sc)))
			// A futex wait's word: the mapping it lies in.
			if f := strings.Fields(string(sc)); len(f) > 1 && f[0] == "202" {
				if a, err := strconv.ParseUint(strings.TrimPrefix(f[1], "0x"), 16, 64); err == nil {
					fmt.Fprintf(&b, "    futex word %#x in %s\n", a, mappingOf(k.PID, a))
					words = append(words, a)
				}
			}
		}
		// User stacks, when gdb is at hand (the child is not traced once
		// it runs).
		if gdb, err := exec.LookPath("gdb"); err == nil {
			args := []string{"-p", strconv.Itoa(k.PID), "-batch", "-nx", "-ex", "thread apply all bt 12"}
			for _, w := range words {
				args = append(args, "-ex", fmt.Sprintf("x/8dw %#x", w))
			}
			out, _ := runTimeout(30*time.Second, "/", gdb, args...)
			fmt.Fprintf(&b, "  gdb:\n%s\n", out)
		}
	}
	return b.String()
}

// mappingOf returns the /proc/PID/maps line holding address a.
func mappingOf(pid int, a uint64) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return err.Error()
	}
	for _, l := range strings.Split(string(b), "\n") {
		var lo, hi uint64
		if _, err := fmt.Sscanf(l, "%x-%x", &lo, &hi); err == nil && a >= lo && a < hi {
			return l
		}
	}
	return "no mapping"
}
