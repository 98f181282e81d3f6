package cluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/bench/netlab"
	"github.com/mitosis-fork/mitosis/client"
)

// TestRemoteFork prepares a Python parent (dict, numpy array, pandas frame)
// on node a and forks children of it onto b and c, sent to a's daemon and,
// once, to c's daemon for b (forwarding from a third node). Every child
// prints the parent's digest; b's first child fetched the pages it
// touched from a, later children on b find them in b's page cache.
func TestRemoteFork(t *testing.T) {
	requireSetup(t)
	lab := newLab(t, nodes("a", "b", "c")...)
	a, b, c := lab.Node("a"), lab.Node("b"), lab.Node("c")
	_, seed, want := startSeed(t, a, "pyseed", 64, true)

	// The first child on b: cold page cache.
	t0 := time.Now()
	id1 := forkIDs(t, cli(t, a, "fork", "--node", "b", "a/pyseed"))[0]
	k1 := waitExited0(t, b, id1)
	t.Logf("first child on b %s: done after %v, start %.1fms, faults %d, fetched %d, shared %d",
		id1, time.Since(t0).Round(time.Millisecond), k1.StartMS, k1.Faults, k1.PagesFetched, k1.PagesShared)
	checkChild(t, b, k1, seed, "a", want)
	if k1.PagesFetched == 0 {
		t.Errorf("first child on b fetched no page from a: %+v", k1)
	}

	// Then 3 more on b and 3 on c, sent to a, and one for b sent to c,
	// all at once.
	type batch struct {
		via, target *netlab.Node
		count       string
		ids         []string
	}
	batches := []*batch{{via: a, target: b, count: "3"}, {via: a, target: c, count: "3"}, {via: c, target: b, count: "1"}}
	var wg sync.WaitGroup
	errs := make([]string, len(batches))
	for i, bt := range batches {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, errOut, err := bt.via.CLI(cliTimeout, "fork", "--node", bt.target.Name, "a/pyseed", "--count", bt.count)
			if err != nil {
				errs[i] = fmt.Sprintf("node %s: fork --node %s a/pyseed --count %s: %v\n%s%s", bt.via.Name, bt.target.Name, bt.count, err, out, errOut)
				return
			}
			for _, f := range strings.Fields(out) {
				if !strings.HasPrefix(f, bt.target.Name+"/c-") {
					errs[i] = fmt.Sprintf("node %s: fork --node %s printed %q, want %s/c-...", bt.via.Name, bt.target.Name, out, bt.target.Name)
					return
				}
				bt.ids = append(bt.ids, strings.TrimPrefix(f, bt.target.Name+"/"))
			}
		}()
	}
	wg.Wait()
	for _, e := range errs {
		if e != "" {
			t.Fatal(e)
		}
	}
	var laterB []client.ChildInfo
	var fetchedC uint64
	for _, bt := range batches {
		if want := map[string]int{"3": 3, "1": 1}[bt.count]; len(bt.ids) != want {
			t.Fatalf("fork via %s onto %s: %d children, want %d", bt.via.Name, bt.target.Name, len(bt.ids), want)
		}
		for _, id := range bt.ids {
			k := waitExited0(t, bt.target, id)
			checkChild(t, bt.target, k, seed, "a", want)
			if bt.target == b {
				laterB = append(laterB, k)
			} else {
				fetchedC += k.PagesFetched
			}
			t.Logf("child %s/%s (sent to %s): start %.1fms, faults %d, fetched %d, shared %d",
				bt.target.Name, id, bt.via.Name, k.StartMS, k.Faults, k.PagesFetched, k.PagesShared)
		}
	}
	for _, k := range laterB {
		if k.PagesFetched*4 > k1.PagesFetched {
			t.Errorf("later child %s on b fetched %d pages, the first %d: b's page cache was not reused", k.ID, k.PagesFetched, k1.PagesFetched)
		}
	}
	if fetchedC == 0 {
		t.Errorf("the children on c fetched no page from a")
	}
	if fetchedC > k1.PagesFetched*2 {
		t.Errorf("the 3 children on c fetched %d pages together, one child on b %d: c's page cache was not shared", fetchedC, k1.PagesFetched)
	}

	// b and c list the seed as imported from a; a has no lease left once
	// every remote child ended.
	for _, n := range []*netlab.Node{b, c} {
		found := false
		for _, s := range seeds(t, n) {
			if s.ID == seed && s.Origin == "a" && s.Name == "pyseed" {
				found = true
			}
		}
		if !found {
			t.Errorf("node %s: seeds lists no %s imported from a: %+v", n.Name, seed, seeds(t, n))
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		s := seeds(t, a)
		if len(s) == 1 && s[0].Leases == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node a: seeds %+v, want one seed without leases after every remote child ended", s)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The bytes b fetched from a are in its metrics.
	mb, err := b.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	if got := mb["mitosis_peer_bytes_fetched_total"]; got < float64(k1.PagesFetched)*4096 {
		t.Errorf("node b: mitosis_peer_bytes_fetched_total %v, want at least the %d pages of the first child", got, k1.PagesFetched)
	}
	// Nothing sent so far came from a page cache on a: no child of the
	// seed ran there. b spliced what it fetched into its cache.
	ma, err := a.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	fetched, spliced := mb["mitosis_peer_bytes_fetched_total"], mb[`mitosis_peer_bytes_zero_copy_total{direction="received"}`]
	if spliced < fetched/2 || spliced > fetched {
		t.Errorf("node b: %v of %v fetched bytes spliced into its page cache, want most", spliced, fetched)
	}
	if sent := ma[`mitosis_peer_bytes_zero_copy_total{direction="sent"}`]; sent != 0 {
		t.Errorf("node a: %v bytes sent from a page cache it does not have", sent)
	}

	// A seed whose child ran on a first: a sends the pages a child on c
	// needs from its own page cache with sendfile.
	_, seed2, want2 := startSeed(t, a, "zcseed", 16, false)
	k0 := waitExited0(t, a, forkIDs(t, cli(t, a, "fork", "zcseed", "--detach"))[0])
	checkChild(t, a, k0, seed2, "local", want2)
	k2 := waitExited0(t, c, forkIDs(t, cli(t, a, "fork", "--node", "c", "a/zcseed"))[0])
	checkChild(t, c, k2, seed2, "a", want2)
	ma2, err := a.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	served := ma2["mitosis_peer_bytes_served_total"] - ma["mitosis_peer_bytes_served_total"]
	sent := ma2[`mitosis_peer_bytes_zero_copy_total{direction="sent"}`]
	if sent < 16<<20 || sent > served {
		t.Errorf("node a: %v bytes sent from its page cache with sendfile of %v served for a child reading 16 MiB", sent, served)
	}
}

// TestRemoteThreads: a multi-threaded seed (a Python pool of 4 threads,
// every thread started before prepare) on a; children on b, forked through
// a, have every thread and compute on the inherited pool what the parent
// computes.
func TestRemoteThreads(t *testing.T) {
	requireSetup(t)
	lab := newLab(t, nodes("a", "b")...)
	a, b := lab.Node("a"), lab.Node("b")
	p, seed, want := startSeed(t, a, "poolseed", 16, false, "4")
	pool := p.line(t, "POOL ", 30*time.Second)
	if f := strings.Fields(pool); len(f) != 2 || f[0] == "1" {
		t.Fatalf("parent printed POOL %q, want its thread count (> 1) and the sums", pool)
	}
	ids := forkIDs(t, cli(t, a, "fork", "--node", "b", "a/poolseed", "--count", "3", "--payload", `{"pool":true}`))
	if len(ids) != 3 {
		t.Fatalf("fork --count 3 printed %v", ids)
	}
	for _, id := range ids {
		k := waitExited0(t, b, id)
		checkChild(t, b, k, seed, "a", want)
		if v, _ := logLine(readLog(k), "POOL "); v != pool {
			t.Errorf("node b: child %s printed POOL %q, the parent %q:\n%s", id, v, pool, readLog(k))
		}
	}
}

// checkChild checks one exited child of a Python seed: its node, source,
// seed, and the digest in its log.
func checkChild(t *testing.T, n *netlab.Node, k client.ChildInfo, seed, source, want string) {
	t.Helper()
	log := readLog(k)
	if k.Source != source || k.Seed != seed || (k.Node != "" && k.Node != n.Name) {
		t.Errorf("node %s: child %s: source %q seed %q node %q, want %s %s %s", n.Name, k.ID, k.Source, k.Seed, k.Node, source, seed, n.Name)
	}
	if v, _ := logLine(log, "ROLE child "); v != k.ID {
		t.Errorf("node %s: child %s printed ROLE child %q:\n%s", n.Name, k.ID, v, log)
	}
	if v, _ := logLine(log, "DIGEST "); v != want {
		t.Errorf("node %s: child %s printed DIGEST %q, the parent's is %s:\n%s", n.Name, k.ID, v, want, log)
	}
}

// TestGrandchild forks a child of a's seed on c that changes its state and
// stops itself; c prepares it into seed "hop", and b forks a grandchild from
// c/hop: it resumes after the stop and sees the child's changed state.
func TestGrandchild(t *testing.T) {
	requireSetup(t)
	lab := newLab(t, nodes("a", "b", "c")...)
	a, b, c := lab.Node("a"), lab.Node("b"), lab.Node("c")
	_, seed, want := startSeed(t, a, "hopbase", 32, false)

	id := forkIDs(t, cli(t, a, "fork", "--node", "c", "a/hopbase", "--payload", `{"hop":true}`))[0]
	k := child(t, c, id)
	hop := waitLog(t, k, "HOP ", childTimeout)
	if v, _ := logLine(readLog(k), "DIGEST "); v != "" {
		t.Fatalf("hop child printed a DIGEST line before stopping:\n%s", readLog(k))
	}
	if hop == want || len(hop) != 64 {
		t.Fatalf("hop child printed HOP %q, the parent's digest is %s: want a different digest", hop, want)
	}
	// Its pid from c's ps; wait until it has stopped itself.
	k = child(t, c, id)
	if k.State != client.StateRunning || k.PID <= 0 || k.Source != "a" || k.Seed != seed {
		t.Fatalf("hop child on c: %+v, want running with source a", k)
	}
	if err := waitStopped(k.PID, 10*time.Second); err != nil {
		t.Fatalf("hop child %s (pid %d): %v\n%s", id, k.PID, err, readLog(k))
	}
	t.Cleanup(func() {
		// It stays stopped (so is its frozen copy); end it before c stops.
		if _, errOut, err := c.CLI(cliTimeout, "rm", "--force", id); err != nil {
			t.Errorf("node c: rm --force %s: %v %s", id, err, errOut)
		}
	})
	out := cli(t, c, "prepare", "--pid", fmt.Sprint(k.PID), "--name", "hop")
	f := strings.Fields(out)
	hopSeed := f[len(f)-1]
	if !strings.HasPrefix(hopSeed, "s-") {
		t.Fatalf("prepare printed %q", out)
	}
	t.Cleanup(func() {
		if _, errOut, err := c.CLI(cliTimeout, "rm", "--force", "hop"); err != nil {
			t.Errorf("node c: rm --force hop: %v %s", err, errOut)
		}
	})
	t.Logf("node c: child %s (pid %d) of a/%s prepared into %s: %s", id, k.PID, seed, hopSeed, strings.TrimSpace(out))

	gid := forkIDs(t, cli(t, c, "fork", "--node", "b", "c/hop"))[0]
	g := waitExited0(t, b, gid)
	glog := readLog(g)
	t.Logf("grandchild b/%s: start %.1fms, faults %d, fetched %d from %s", gid, g.StartMS, g.Faults, g.PagesFetched, g.Source)
	if v, _ := logLine(glog, "RESUMED "); v != "True" {
		t.Errorf("grandchild printed RESUMED %q, want True (a new pid after the stop):\n%s", v, glog)
	}
	if v, _ := logLine(glog, "AFTER "); v != hop {
		t.Errorf("grandchild printed AFTER %q, want the child's digest %s (parent's %s):\n%s", v, hop, want, glog)
	}
	if g.Source != "c" || g.Seed != hopSeed || g.PagesFetched == 0 {
		t.Errorf("grandchild on b: source %q seed %q fetched %d, want c %s >0", g.Source, g.Seed, g.PagesFetched, hopSeed)
	}
	// The child on c is still there, stopped.
	if k := child(t, c, id); k.State != client.StateRunning {
		t.Errorf("hop child on c after the grandchild: %+v", k)
	}
}

// TestOriginDies: a child on b of a seed of a is about to fault its 200 MiB
// array in when a's daemon is killed (or a's link goes down). The child
// must be ended within 2 s, shown failed with an error about the fetch,
// while a child on b of a seed prepared on b carries on.
func TestOriginDies(t *testing.T) {
	requireSetup(t)
	lab := newLab(t, nodes("a", "b")...)
	a, b := lab.Node("a"), lab.Node("b")
	_, local, localWant := startSeed(t, b, "local", 32, false)

	for _, mode := range []string{"sigkill", "link-down"} {
		t.Run(mode, func(t *testing.T) {
			if !a.Running() {
				if err := a.Start(); err != nil {
					t.Fatal(err)
				}
			}
			name := "far-" + mode
			_, seed, _ := startSeed(t, a, name, 200, false)
			goFile := filepath.Join(tmpRoot, fmt.Sprintf("go-%s-%d", mode, time.Now().UnixNano()))
			payload := fmt.Sprintf(`{"walk":%q}`, goFile)
			far := forkIDs(t, cli(t, b, "fork", "--detach", "a/"+name, "--payload", payload))[0]
			near := forkIDs(t, cli(t, b, "fork", "--detach", local, "--payload", payload))[0]
			waitLog(t, child(t, b, far), "READY", childTimeout)
			waitLog(t, child(t, b, near), "READY", childTimeout)

			switch mode {
			case "sigkill":
				if err := a.Kill(); err != nil {
					t.Fatal(err)
				}
			case "link-down":
				if err := a.SetLink(false); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					if err := a.SetLink(true); err != nil {
						t.Error(err)
					}
				})
			}
			if err := os.WriteFile(goFile, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			k := waitEnd(t, b, far, 10*time.Second)
			took := time.Since(t0)
			t.Logf("child b/%s of a/%s (%s): %s after %v (signal %d): %s", far, seed, mode, k.State, took.Round(time.Millisecond), k.Signal, k.Error)
			if k.State != client.StateFailed && k.State != client.StateKilled {
				t.Errorf("child of a/%s after %s: state %s (exit %d), want failed or killed:\n%s", name, mode, k.State, k.ExitCode, readLog(k))
			}
			// The daemon's wording: "paging failed: serve fault at ...: page
			// source: transport: read pages of SEED from IP:PORT: ...".
			if e := strings.ToLower(k.Error); !strings.Contains(e, "fetch") && !strings.Contains(e, "read pages") {
				t.Errorf("child of a/%s after %s: error %q does not mention the fetch", name, mode, k.Error)
			}
			if took > 2*time.Second {
				t.Errorf("child of a/%s took %v to end after %s, want at most 2 s", name, took, mode)
			}
			if _, ok := logLine(readLog(k), "WALKED"); ok {
				t.Errorf("child of a/%s finished its walk although its origin was gone:\n%s", name, readLog(k))
			}
			// The child of b's own seed is unaffected.
			nk := waitExited0(t, b, near)
			if v, _ := logLine(readLog(nk), "DIGEST "); v != localWant {
				t.Errorf("child b/%s of the local seed printed DIGEST %q, want %s:\n%s", near, v, localWant, readLog(nk))
			}
			if nk.Source != "local" {
				t.Errorf("child b/%s of the local seed: source %q, want local", near, nk.Source)
			}
		})
	}
	// b still works after all this.
	id := forkIDs(t, cli(t, b, "fork", "--detach", local))[0]
	k := waitExited0(t, b, id)
	checkChild(t, b, k, k.Seed, "local", localWant)
}

// TestWrongSecret: node d has another cluster secret than a and b. It can
// neither import a seed of a nor forward a fork to a, and a cannot forward
// to d; a serves it no descriptor and no page. b, with the right secret,
// forks from a.
func TestWrongSecret(t *testing.T) {
	requireSetup(t)
	lab := newLab(t, netlab.NodeSpec{Name: "a"}, netlab.NodeSpec{Name: "b"},
		netlab.NodeSpec{Name: "d", Secret: "not-the-cluster-secret"})
	a, b, d := lab.Node("a"), lab.Node("b"), lab.Node("d")
	sl := start(t, a, "sleep", nil, "sleep", "600")
	if err := waitState(sl.pid, "S", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	cli(t, a, "prepare", "--pid", fmt.Sprint(sl.pid), "--name", "sl")

	for _, c := range []struct {
		via  *netlab.Node
		args []string
	}{
		{d, []string{"fork", "--detach", "a/sl"}},
		{d, []string{"fork", "--node", "a", "sl"}},
		{a, []string{"fork", "--node", "d", "a/sl"}},
	} {
		t0 := time.Now()
		msg := cliFail(t, c.via, c.args...)
		t.Logf("node %s: mitosis %s: failed after %v: %s", c.via.Name, strings.Join(c.args, " "), time.Since(t0).Round(time.Millisecond), strings.TrimSpace(msg))
		if !strings.Contains(msg, "authentication") {
			t.Errorf("node %s: mitosis %s failed with %q, want an authentication error", c.via.Name, strings.Join(c.args, " "), msg)
		}
	}
	if kids := ps(t, d); len(kids) != 0 {
		t.Errorf("node d has children: %+v", kids)
	}
	if s := seeds(t, d); len(s) != 0 {
		t.Errorf("node d imported seeds: %+v", s)
	}
	ma, err := a.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	md, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []struct {
		node *netlab.Node
		ms   map[string]float64
		name string
	}{
		{a, ma, `mitosis_peer_requests_total{type="descriptor"}`},
		{a, ma, `mitosis_peer_requests_total{type="pages"}`},
		{a, ma, `mitosis_peer_requests_total{type="fork"}`},
		{a, ma, "mitosis_peer_bytes_served_total"},
		{d, md, "mitosis_peer_bytes_fetched_total"},
	} {
		v, ok := m.ms[m.name]
		if !ok {
			t.Errorf("node %s: no metric %s", m.node.Name, m.name)
		} else if v != 0 {
			t.Errorf("node %s: %s = %v after the refused requests, want 0", m.node.Name, m.name, v)
		}
	}

	// The right secret works.
	id := forkIDs(t, cli(t, b, "fork", "--detach", "a/sl"))[0]
	if k := child(t, b, id); k.State != client.StateRunning || k.Source != "a" {
		t.Fatalf("child of a/sl on b: %+v, want running from a", k)
	}
	cli(t, b, "rm", "--force", id)
}

// waitState polls /proc/PID/stat until the state letter is in states.
func waitState(pid int, states string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		st, err := procState(pid)
		if err != nil {
			return err
		}
		if strings.Contains(states, st) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pid %d in state %s, want one of %s", pid, st, states)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitStopped waits until pid is stopped (T).
func waitStopped(pid int, timeout time.Duration) error { return waitState(pid, "T", timeout) }

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
