package bench

// The remote-fork benchmarks: a three-node cluster (a, b, c) built on this
// host with netlab (one network namespace per node, veths on a bridge in a
// hub namespace, 198.19.0.0/24), one `mitosis daemon` per namespace. The
// parents run on the host and are prepared by node a's daemon; children are
// forked on a (local), b and c and time themselves with the wall clock in
// their log files (same host, same clock).

import (
	"bufio"
	"errors"
	"fmt"
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

	"github.com/mitosis-fork/mitosis/bench/netlab"
	"github.com/mitosis-fork/mitosis/client"
)

// Remote group names (all selected by GroupRemote).
const (
	groupRemoteHello  = "remote-start-python-hello"
	groupRemoteArray  = "remote-array64"
	groupRemoteFanOut = "remote-fan-out"
	groupRemoteBytes  = "remote-bytes"
)

// remoteLogTimeout bounds waiting for a child's timestamp or its exit.
const remoteLogTimeout = 60 * time.Second

// remote is the state of the remote benchmarks.
type remote struct {
	r       *runner
	lab     *netlab.Lab
	a, b, c *netlab.Node
	// clients to each node's socket, by node name (one request at a time
	// each: a client serialises its requests)
	cl map[string]*client.Client
	// seq numbers the seeds prepared for cold-cache runs
	seq int
}

// remoteGroups builds the cluster, runs the remote groups and tears the
// cluster down. Setup failures become a failed group; the returned notes go
// to the report's observations.
func (r *runner) remoteGroups() ([]*Group, []string) {
	fail := func(err error) ([]*Group, []string) {
		return []*Group{{Name: GroupRemote, Title: "remote-fork benchmarks", Error: err.Error()}}, nil
	}
	if why := netlab.Available(); why != "" {
		return fail(errors.New("remote benchmarks: " + why))
	}
	rm, err := r.newRemote()
	if rm != nil {
		defer func() {
			for _, c := range rm.cl {
				c.Close()
			}
			if cerr := rm.lab.Close(); cerr != nil {
				fmt.Fprintf(r.log, "remote: closing the cluster: %v\n", cerr)
			}
			if left := netlab.Leftovers(rm.lab.Prefix); len(left) > 0 {
				fmt.Fprintf(r.log, "remote: LEFT BEHIND: %s\n", strings.Join(left, ", "))
			}
		}()
	}
	if err != nil {
		return fail(err)
	}
	var notes []string
	notes = append(notes, fmt.Sprintf("remote: cluster %s: nodes a (%s), b (%s), c (%s) in network namespaces %s-{a,b,c}, veths on a bridge in %s; all on this host, so node b and c's children share its %d vCPUs with the daemons and the origin",
		rm.lab.Prefix, rm.a.IP, rm.b.IP, rm.c.IP, rm.lab.Prefix, rm.lab.Hub, r.machineCPUs()))
	var groups []*Group
	hello, helloP := rm.helloGroup("")
	groups = append(groups, hello)
	array, arrayP := rm.arrayGroup("")
	groups = append(groups, array, rm.fanOutGroup(helloP), rm.bytesGroup(arrayP))
	// Latency scaling with tc netem, if this kernel has it.
	if err := rm.netem("1ms"); err != nil {
		notes = append(notes, fmt.Sprintf("remote: tc netem is not available here, the 1 ms delay runs were skipped (%v)", err))
	} else {
		h, _ := rm.helloGroup(" (netem 1ms)")
		a, _ := rm.arrayGroup(" (netem 1ms)")
		groups = append(groups, h, a)
	}
	return groups, notes
}

func (r *runner) machineCPUs() int { return machineInfo().NProc }

// newRemote builds mitosis if needed, the lab and its daemons, and
// compiles the remote workloads.
func (r *runner) newRemote() (*remote, error) {
	bin := r.cfg.Mitosis
	if bin == "" {
		var err error
		if bin, err = r.buildMitosis(); err != nil {
			return nil, fmt.Errorf("remote: %w", err)
		}
	}
	out, err := exec.Command("gcc", "-O2", "-o", filepath.Join(r.dir, "array_ts"), filepath.Join(r.dir, "array_ts.c")).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("gcc array_ts.c: %v\n%s", err, out)
	}
	lab, err := netlab.New(netlab.Config{Bin: bin, Dir: filepath.Join(r.dir, "cluster"), Subnet: "198.19.0",
		Nodes: []netlab.NodeSpec{{Name: "a"}, {Name: "b"}, {Name: "c"}}, Log: r.log})
	if err != nil {
		return nil, err
	}
	rm := &remote{r: r, lab: lab, a: lab.Node("a"), b: lab.Node("b"), c: lab.Node("c"), cl: map[string]*client.Client{}}
	for _, n := range lab.Nodes {
		if err := n.Start(); err != nil {
			return rm, err
		}
		c, err := client.Dial(n.Sock)
		if err != nil {
			return rm, err
		}
		rm.cl[n.Name] = c
	}
	return rm, nil
}

// netem adds a delay to every node's veth (both directions of every path
// between two nodes cross two of them).
func (rm *remote) netem(delay string) error {
	for _, n := range rm.lab.Nodes {
		cmd := n.Command("tc", "qdisc", "add", "dev", n.Link, "root", "netem", "delay", delay)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("tc qdisc add dev %s root netem delay %s: %v: %s", n.Link, delay, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// prepare prepares the stopped parent p on node a as a seed named name.
func (rm *remote) prepare(p *parent, name string) (client.SeedInfo, error) {
	s, err := rm.cl["a"].PrepareWith(client.PrepareRequest{PID: p.pid, Name: name})
	if err != nil {
		return s, fmt.Errorf("prepare pid %d on a: %w", p.pid, err)
	}
	if err := testenv.WaitStopped(p.pid, 10*time.Second); err != nil {
		return s, fmt.Errorf("parent %d after prepare: %w", p.pid, err)
	}
	return s, p.checkQuiet()
}

// removeSeed removes a seed of a and its import on the other nodes.
func (rm *remote) removeSeed(id string) error {
	var errs []error
	for _, n := range []string{"b", "c"} {
		if err := rm.cl[n].Remove("a/"+id, true); err != nil && !strings.Contains(err.Error(), "no seed") {
			errs = append(errs, fmt.Errorf("rm a/%s on %s: %w", id, n, err))
		}
	}
	if err := rm.cl["a"].Remove(id, true); err != nil {
		errs = append(errs, fmt.Errorf("rm %s on a: %w", id, err))
	}
	return errors.Join(errs...)
}

// forkOn forks one detached child on node (its own daemon) and returns the
// request time and the child.
func (rm *remote) forkOn(node string, req client.ForkRequest) (time.Time, client.ChildInfo, time.Duration, error) {
	t0 := time.Now()
	kids, err := rm.cl[node].Fork(req)
	rpc := time.Since(t0)
	if err != nil {
		return t0, client.ChildInfo{}, 0, fmt.Errorf("fork %s on %s: %w", req.Seed, node, err)
	}
	if len(kids) != 1 {
		return t0, client.ChildInfo{}, 0, fmt.Errorf("fork %s on %s: %d children", req.Seed, node, len(kids))
	}
	return t0, kids[0], rpc, nil
}

// logPath is the log of child id on node.
func (rm *remote) logPath(node string, k client.ChildInfo) string {
	if k.Log != "" {
		return k.Log
	}
	return filepath.Join(rm.lab.Node(node).StateDir, "children", k.ID+".log")
}

// waitLine polls a log file until it has a line starting with prefix and
// returns its fields after the prefix.
func waitLine(path, prefix string, timeout time.Duration) ([]string, error) {
	deadline := time.Now().Add(timeout)
	for {
		if f, err := os.Open(path); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				if rest, ok := strings.CutPrefix(sc.Text(), prefix); ok {
					f.Close()
					return strings.Fields(rest), nil
				}
			}
			f.Close()
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(path)
			return nil, fmt.Errorf("%s: no %q line within %v; it has %q", path, prefix, timeout, b)
		}
		time.Sleep(500 * time.Microsecond)
	}
}

// nsTime parses a wall-clock timestamp in ns.
func nsTime(s string) (time.Time, error) {
	ns, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("bad timestamp %q", s)
	}
	return time.Unix(0, ns), nil
}

// waitExit polls node's ps until the children ids have all exited with
// status 0; it then removes them from the listing and returns their info.
func (rm *remote) waitExit(node string, ids []string) ([]client.ChildInfo, error) {
	deadline := time.Now().Add(remoteLogTimeout)
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	c, err := client.Dial(rm.lab.Node(node).Sock)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	for {
		kids, err := c.PS()
		if err != nil {
			return nil, err
		}
		var done []client.ChildInfo
		for _, k := range kids {
			if want[k.ID] && k.State != client.StateRunning {
				done = append(done, k)
			}
		}
		if len(done) == len(ids) {
			for _, k := range done {
				if k.State != client.StateExited || k.ExitCode != 0 {
					b, _ := os.ReadFile(rm.logPath(node, k))
					return done, fmt.Errorf("child %s on %s: %s exit %d signal %d error %q; log %q", k.ID, node, k.State, k.ExitCode, k.Signal, k.Error, b)
				}
				if err := c.Remove(k.ID, false); err != nil {
					return done, err
				}
			}
			return done, nil
		}
		if time.Now().After(deadline) {
			return done, fmt.Errorf("node %s: %d of %d children still running after %v", node, len(ids)-len(done), len(ids), remoteLogTimeout)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// bytesFetched is node's mitosis_peer_bytes_fetched_total.
func (rm *remote) bytesFetched(node string) (float64, error) {
	m, err := rm.lab.Node(node).Metrics()
	if err != nil {
		return 0, err
	}
	return m["mitosis_peer_bytes_fetched_total"], nil
}

// remoteCase names.
const (
	rcLocalFork = "local fork(2) on a"
	rcLocalA    = "mitosis on a, local seed (warm cache)"
	rcColdB     = "mitosis on b from a, cold cache (first child: import + faults over the network)"
	rcWarmB     = "mitosis on b from a, warm cache"
	rcForwardB  = "mitosis on b, request sent to a (forwarded), warm cache"
	rcRPCWarmB  = "fork request return on b, warm cache (child started)"
	rcRPCColdB  = "fork request return on b, cold cache"
)

// timedRun is one measured method of a remote start group: it returns the
// duration to record, or an error.
type timedRun struct {
	name string
	run  func(it int) (map[string]time.Duration, error)
}

// runRounds runs the methods Runs+1 times (the first iteration is the
// discarded warm-up) in rotating order and records their samples.
func (rm *remote) runRounds(g *Group, methods []timedRun, caseNames []string) {
	cases := map[string]*Case{}
	for _, n := range caseNames {
		cases[n] = &Case{Name: n}
		g.Cases = append(g.Cases, cases[n])
	}
	for it := 0; it <= rm.r.cfg.Runs; it++ {
		if err := rm.r.ctx.Err(); err != nil {
			g.Error = "interrupted: " + err.Error()
			return
		}
		fmt.Fprintf(rm.r.log, "%s: iteration %d/%d\n", g.Name, it, rm.r.cfg.Runs)
		for _, k := range rotate(len(methods), it) {
			m := methods[k]
			res, err := m.run(it)
			if err != nil {
				g.Error = fmt.Sprintf("%s, iteration %d: %v", m.name, it, err)
				return
			}
			for n, d := range res {
				cases[n].add(d, it == 0)
			}
		}
	}
}

// startMethods are the methods shared by the hello and array groups: the
// local fork(2) baseline, a local mitosis child on a, children on b (warm,
// cold, forwarded). result(node, child, t0) waits for the child's
// timestamp and returns the time to record.
func (rm *remote) startMethods(p *parent, warm string, localResult func() (time.Time, error),
	result func(node string, k client.ChildInfo) (time.Time, error)) []timedRun {
	one := func(node string, k client.ChildInfo, t0 time.Time) (time.Duration, error) {
		t, err := result(node, k)
		if err != nil {
			return 0, err
		}
		if _, err := rm.waitExit(node, []string{k.ID}); err != nil {
			return 0, err
		}
		return t.Sub(t0), nil
	}
	return []timedRun{
		{rcLocalFork, func(int) (map[string]time.Duration, error) {
			if err := p.checkQuiet(); err != nil {
				return nil, err
			}
			t0 := time.Now()
			if err := syscall.Kill(p.pid, syscall.SIGCONT); err != nil {
				return nil, err
			}
			t, err := localResult()
			if err != nil {
				return nil, fmt.Errorf("parent %d: %w%s", p.pid, err, p.stderrNote())
			}
			if err := testenv.WaitStopped(p.pid, resultTimeout); err != nil {
				return nil, err
			}
			return map[string]time.Duration{rcLocalFork: t.Sub(t0)}, nil
		}},
		{rcLocalA, func(int) (map[string]time.Duration, error) {
			t0, k, _, err := rm.forkOn("a", client.ForkRequest{Seed: warm})
			if err != nil {
				return nil, err
			}
			d, err := one("a", k, t0)
			return map[string]time.Duration{rcLocalA: d}, err
		}},
		{rcWarmB, func(int) (map[string]time.Duration, error) {
			t0, k, rpc, err := rm.forkOn("b", client.ForkRequest{Seed: "a/" + warm})
			if err != nil {
				return nil, err
			}
			d, err := one("b", k, t0)
			return map[string]time.Duration{rcWarmB: d, rcRPCWarmB: rpc}, err
		}},
		{rcForwardB, func(int) (map[string]time.Duration, error) {
			t0, k, _, err := rm.forkOn("a", client.ForkRequest{Seed: warm, Node: "b"})
			if err != nil {
				return nil, err
			}
			d, err := one("b", k, t0)
			return map[string]time.Duration{rcForwardB: d}, err
		}},
		{rcColdB, func(int) (map[string]time.Duration, error) {
			rm.seq++
			s, err := rm.prepare(p, fmt.Sprintf("%s-cold-%d", warm, rm.seq))
			if err != nil {
				return nil, err
			}
			t0, k, rpc, err := rm.forkOn("b", client.ForkRequest{Seed: "a/" + s.ID})
			var d time.Duration
			if err == nil {
				d, err = one("b", k, t0)
			}
			if rerr := rm.removeSeed(s.ID); err == nil {
				err = rerr
			}
			return map[string]time.Duration{rcColdB: d, rcRPCColdB: rpc}, err
		}},
	}
}

var startCaseNames = []string{rcLocalFork, rcLocalA, rcWarmB, rcForwardB, rcColdB, rcRPCWarmB, rcRPCColdB}

// helloGroup measures the start of a Python child on b from a seed on a
// (cold and warm node cache) against a local child on a and a local
// fork(2). It returns the group and the parent, whose seed "hello" stays
// prepared for the fan-out group.
func (rm *remote) helloGroup(suffix string) (*Group, *parent) {
	r := rm.r
	g := &Group{Name: groupRemoteHello + suffix, Title: "start latency of a Python child on another node" + suffix, Baseline: rcLocalA,
		Description: "Time from just before the fork request is sent to the daemon's unix socket to the wall-clock timestamp (time.time_ns) the child writes as its first act after resuming (read from its log file afterwards; same host clock). " +
			"Parent: /usr/bin/python3 running workloads/remote_hello.py on the host (stops itself; prepared by node a's daemon with `prepare --pid`). " +
			"local fork(2) on a: SIGCONT, the parent os.fork()s a child that writes its timestamp to the parent's stdout pipe. " +
			"mitosis on a: a detached child of a's daemon (local seed). mitosis on b: a detached child of b's daemon from `a/hello`; warm cache: b imported the seed and has its pages (earlier children); " +
			"cold cache: a seed prepared just before (untimed) that b has never seen, so the request includes the import (descriptor fetch) and every page the child touches crosses the network. " +
			"Every remote fork also takes a lease at the origin (one round trip) before the child starts. forwarded: the request goes to a's daemon with `node: b`.",
	}
	p, err := r.startParent("remote-hello"+suffix, Python, filepath.Join(r.dir, "remote_hello.py"))
	if err != nil {
		g.Error = err.Error()
		return g, nil
	}
	warm := "hello" + nameTag(suffix)
	if _, err := rm.prepare(p, warm); err != nil {
		g.Error = err.Error()
		return g, p
	}
	tsLine := func(node string, k client.ChildInfo) (time.Time, error) {
		f, err := waitLine(rm.logPath(node, k), "T ", remoteLogTimeout)
		if err != nil || len(f) != 1 {
			return time.Time{}, fmt.Errorf("child %s on %s: %v %q", k.ID, node, err, f)
		}
		return nsTime(f[0])
	}
	local := func() (time.Time, error) {
		l, err := p.out.readLine(time.Now().Add(resultTimeout))
		if err != nil {
			return time.Time{}, err
		}
		ts, ok := strings.CutPrefix(l, "T ")
		if !ok {
			return time.Time{}, fmt.Errorf("WRONG RESULT: parent printed %q", l)
		}
		return nsTime(ts)
	}
	rm.runRounds(g, rm.startMethods(p, warm, local, tsLine), startCaseNames)
	return g, p
}

// arrayGroup measures start + execution of the 64 MiB C array child on b
// (warm and cold cache) against a local child on a and local fork(2).
func (rm *remote) arrayGroup(suffix string) (*Group, *parent) {
	r := rm.r
	g := &Group{Name: groupRemoteArray + suffix, Title: "start + execution of a C child reading 64 MiB, remote vs local" + suffix, Baseline: rcLocalA,
		Description: "Time from just before the fork request (or SIGCONT for local fork(2)) to the wall-clock timestamp the child takes after summing every byte of the parent's 64 MiB array (workloads/array_ts.c: \"SUM <n> <ns>\"; the sum is checked). " +
			"Cases as in remote-start-python-hello; on b with a cold cache all 64 MiB cross the network while the child faults them in (fault-around up to 4 MiB).",
	}
	p, err := r.startParent("remote-array"+suffix, filepath.Join(r.dir, "array_ts"))
	if err != nil {
		g.Error = err.Error()
		return g, nil
	}
	warm := "array" + nameTag(suffix)
	if _, err := rm.prepare(p, warm); err != nil {
		g.Error = err.Error()
		return g, p
	}
	want := strconv.FormatUint(arraySum(), 10)
	check := func(f []string) (time.Time, error) {
		if len(f) != 2 || f[0] != want {
			return time.Time{}, fmt.Errorf("WRONG RESULT: SUM %q, want %s <ns>", f, want)
		}
		return nsTime(f[1])
	}
	sumLine := func(node string, k client.ChildInfo) (time.Time, error) {
		f, err := waitLine(rm.logPath(node, k), "SUM ", remoteLogTimeout)
		if err != nil {
			return time.Time{}, err
		}
		return check(f)
	}
	local := func() (time.Time, error) {
		l, err := p.out.readLine(time.Now().Add(resultTimeout))
		if err != nil {
			return time.Time{}, err
		}
		rest, ok := strings.CutPrefix(l, "SUM ")
		if !ok {
			return time.Time{}, fmt.Errorf("WRONG RESULT: parent printed %q", l)
		}
		return check(strings.Fields(rest))
	}
	rm.runRounds(g, rm.startMethods(p, warm, local, sumLine), startCaseNames)
	return g, p
}

// fanOutGroup forks N hello children onto 1, 2 and 3 nodes at once
// (requests sent concurrently to a's daemon, forwarded to b and c) and
// measures how fast they all start.
func (rm *remote) fanOutGroup(p *parent) *Group {
	n := rm.r.cfg.FanOut
	if n <= 0 {
		n = 10
	}
	g := &Group{Name: groupRemoteFanOut, Title: fmt.Sprintf("fan-out: %d Python hello children per node onto 1, 2, 3 nodes", n), Baseline: "1 node: whole batch",
		Description: fmt.Sprintf("One request `fork --count %d` per target node, sent concurrently to node a's daemon (`node: b` / `node: c` forwarded; a's own children local), from the warm seed `hello` of remote-start-python-hello (every node has imported it and cached its pages in the warm-up). "+
			"Targets: 1 node = b; 2 = b, c; 3 = b, c, a. A child writes its wall-clock timestamp and exits. whole batch: from just before the requests to the last child's timestamp; per child: each child's timestamp minus the request time (all children of all runs). "+
			"Children per second = children / whole batch. Within one request the target forks its children one after another.", n),
	}
	if p == nil {
		g.Error = "no hello parent (remote-start-python-hello failed)"
		return g
	}
	targets := [][]string{{"b"}, {"b", "c"}, {"b", "c", "a"}}
	batch := map[int]*Case{}
	per := map[int]*Case{}
	for k := 1; k <= 3; k++ {
		batch[k] = &Case{Name: fmt.Sprintf("%d node%s: whole batch", k, plural(k))}
		per[k] = &Case{Name: fmt.Sprintf("%d node%s: per child", k, plural(k))}
	}
	for k := 1; k <= 3; k++ {
		g.Cases = append(g.Cases, batch[k])
	}
	for k := 1; k <= 3; k++ {
		g.Cases = append(g.Cases, per[k])
	}
	rates := map[int][]float64{}
	for it := 0; it <= rm.r.cfg.Runs; it++ {
		if err := rm.r.ctx.Err(); err != nil {
			g.Error = "interrupted: " + err.Error()
			return g
		}
		fmt.Fprintf(rm.r.log, "%s: iteration %d/%d\n", g.Name, it, rm.r.cfg.Runs)
		for _, ki := range rotate(3, it) {
			nodes := targets[ki]
			t0 := time.Now()
			var wg sync.WaitGroup
			ids := make([][]string, len(nodes))
			errs := make([]error, len(nodes))
			for i, node := range nodes {
				wg.Add(1)
				go func() {
					defer wg.Done()
					c, err := client.Dial(rm.a.Sock)
					if err != nil {
						errs[i] = err
						return
					}
					defer c.Close()
					req := client.ForkRequest{Seed: "hello", Count: n}
					if node != "a" {
						req.Node = node
					}
					kids, err := c.Fork(req)
					for _, kd := range kids {
						ids[i] = append(ids[i], kd.ID)
					}
					errs[i] = err
				}()
			}
			wg.Wait()
			if err := errors.Join(errs...); err != nil {
				g.Error = fmt.Sprintf("%d nodes, iteration %d: %v", len(nodes), it, err)
				return g
			}
			var last time.Time
			var lat []time.Duration
			for i, node := range nodes {
				if len(ids[i]) != n {
					g.Error = fmt.Sprintf("%d nodes, iteration %d: node %s started %d children, want %d", len(nodes), it, node, len(ids[i]), n)
					return g
				}
				kids, err := rm.waitExit(node, ids[i])
				if err != nil {
					g.Error = fmt.Sprintf("%d nodes, iteration %d: %v", len(nodes), it, err)
					return g
				}
				for _, kd := range kids {
					f, err := waitLine(rm.logPath(node, kd), "T ", time.Second)
					if err != nil || len(f) != 1 {
						g.Error = fmt.Sprintf("%d nodes, iteration %d: child %s: %v", len(nodes), it, kd.ID, err)
						return g
					}
					ts, err := nsTime(f[0])
					if err != nil {
						g.Error = err.Error()
						return g
					}
					lat = append(lat, ts.Sub(t0))
					if ts.After(last) {
						last = ts
					}
				}
			}
			k := len(nodes)
			whole := last.Sub(t0)
			batch[k].add(whole, it == 0)
			for _, d := range lat {
				per[k].add(d, it == 0)
			}
			if it > 0 {
				rates[k] = append(rates[k], float64(k*n)/whole.Seconds())
			}
		}
	}
	tb := Table{Header: []string{"targets", "children per batch", "children/s (median)", "children/s (min)", "children/s (max)"}}
	for k := 1; k <= 3; k++ {
		rs := slices.Clone(rates[k])
		slices.Sort(rs)
		if len(rs) == 0 {
			continue
		}
		tb.Rows = append(tb.Rows, []string{strings.Join(targets[k-1], ", "), strconv.Itoa(k * n),
			fmt.Sprintf("%.0f", medianF(rs)), fmt.Sprintf("%.0f", rs[0]), fmt.Sprintf("%.0f", rs[len(rs)-1])})
	}
	g.Tables = append(g.Tables, tb)
	return g
}

// nameTag turns a group suffix like " (netem 1ms)" into a seed name part
// ("-netem").
func nameTag(suffix string) string {
	if suffix == "" {
		return ""
	}
	return "-netem"
}

func plural(k int) string {
	if k == 1 {
		return ""
	}
	return "s"
}

func medianF(s []float64) float64 {
	n := len(s)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// bytesGroup measures the network bytes a child of the 64 MiB array seed
// costs node b: the first child (cold cache: what every child would cost
// without a node cache), a second child (warm cache), and a first child
// forked with --prefetch after a local child on a recorded the working set.
func (rm *remote) bytesGroup(p *parent) *Group {
	g := &Group{Name: groupRemoteBytes, Title: "network bytes per child on b (64 MiB array seed of a)", Baseline: "cold cache",
		Description: "Bytes node b fetched from a for one child, from b's `mitosis_peer_bytes_fetched_total` (read from /metrics inside b's namespace before and after; descriptor, pages and working set included) and the child's `pages_fetched` in `ps`. " +
			"Per run a fresh seed of the array_ts parent is prepared on a. cold cache: b's first child of it. warm cache: a second child on b right after. " +
			"prefetch: another fresh seed, one local child on a first (it records the working set), then b's first child forked with `--prefetch` (sent to b's daemon): b fetches the working set in bulk at import, in the background, while the child starts (it maps what b holds by then and faults the rest, waiting only for the batch holding a page the push has claimed). " +
			"Without the node cache every child would pay the cold-cache bytes: the table's last rows compare 10 children with and without it. Durations: fork request to the child's SUM timestamp.",
	}
	if p == nil {
		g.Error = "no array parent (remote-array64 failed)"
		return g
	}
	names := []string{"cold cache", "warm cache", "prefetch (working set recorded on a)"}
	cases := map[string]*Case{}
	for _, n := range names {
		cases[n] = &Case{Name: n}
		g.Cases = append(g.Cases, cases[n])
	}
	bytesOf := map[string][]float64{}
	pagesOf := map[string][]float64{}
	want := strconv.FormatUint(arraySum(), 10)
	// child forks one child on node and returns its duration, fetched
	// pages and the bytes node b fetched meanwhile.
	child := func(node string, req client.ForkRequest) (time.Duration, uint64, float64, error) {
		b0, err := rm.bytesFetched("b")
		if err != nil {
			return 0, 0, 0, err
		}
		t0, k, _, err := rm.forkOn(node, req)
		if err != nil {
			return 0, 0, 0, err
		}
		f, err := waitLine(rm.logPath(node, k), "SUM ", remoteLogTimeout)
		if err != nil {
			return 0, 0, 0, err
		}
		if len(f) != 2 || f[0] != want {
			return 0, 0, 0, fmt.Errorf("WRONG RESULT: SUM %q, want %s", f, want)
		}
		ts, err := nsTime(f[1])
		if err != nil {
			return 0, 0, 0, err
		}
		kids, err := rm.waitExit(node, []string{k.ID})
		if err != nil {
			return 0, 0, 0, err
		}
		// background working-set fetches may still be landing: wait until
		// the counter is still for 200 ms
		b1, err := rm.bytesFetched("b")
		for still := time.Now(); err == nil && time.Since(still) < 200*time.Millisecond; {
			time.Sleep(50 * time.Millisecond)
			var b2 float64
			b2, err = rm.bytesFetched("b")
			if b2 != b1 {
				b1, still = b2, time.Now()
			}
		}
		return ts.Sub(t0), kids[0].PagesFetched, b1 - b0, err
	}
	for it := 0; it <= rm.r.cfg.Runs; it++ {
		if err := rm.r.ctx.Err(); err != nil {
			g.Error = "interrupted: " + err.Error()
			return g
		}
		fmt.Fprintf(rm.r.log, "%s: iteration %d/%d\n", g.Name, it, rm.r.cfg.Runs)
		rec := func(name string, d time.Duration, pages uint64, bytes float64) {
			cases[name].add(d, it == 0)
			if it > 0 {
				bytesOf[name] = append(bytesOf[name], bytes)
				pagesOf[name] = append(pagesOf[name], float64(pages))
			}
		}
		rm.seq++
		s, err := rm.prepare(p, fmt.Sprintf("bytes-%d", rm.seq))
		if err != nil {
			g.Error = err.Error()
			return g
		}
		for _, name := range names[:2] {
			d, pages, by, err := child("b", client.ForkRequest{Seed: "a/" + s.ID})
			if err != nil {
				g.Error = fmt.Sprintf("%s, iteration %d: %v", name, it, err)
				return g
			}
			rec(name, d, pages, by)
		}
		if err := rm.removeSeed(s.ID); err != nil {
			g.Error = err.Error()
			return g
		}
		rm.seq++
		s, err = rm.prepare(p, fmt.Sprintf("bytes-%d", rm.seq))
		if err != nil {
			g.Error = err.Error()
			return g
		}
		if _, _, _, err := child("a", client.ForkRequest{Seed: s.ID}); err != nil {
			g.Error = fmt.Sprintf("local child recording the working set, iteration %d: %v", it, err)
			return g
		}
		d, pages, by, err := child("b", client.ForkRequest{Seed: "a/" + s.ID, Prefetch: true})
		if err != nil {
			g.Error = fmt.Sprintf("prefetch, iteration %d: %v", it, err)
			return g
		}
		rec(names[2], d, pages, by)
		if err := rm.removeSeed(s.ID); err != nil {
			g.Error = err.Error()
			return g
		}
	}
	tb := Table{Header: []string{"child on b", "bytes fetched (median)", "MiB", "pages_fetched (median)", "runs"}}
	med := func(v []float64) float64 {
		v = slices.Clone(v)
		slices.Sort(v)
		return medianF(v)
	}
	for _, n := range names {
		by := med(bytesOf[n])
		tb.Rows = append(tb.Rows, []string{n, fmt.Sprintf("%.0f", by), fmt.Sprintf("%.1f", by/(1<<20)),
			fmt.Sprintf("%.0f", med(pagesOf[n])), strconv.Itoa(len(bytesOf[n]))})
	}
	cold, warm := med(bytesOf[names[0]]), med(bytesOf[names[1]])
	tb.Rows = append(tb.Rows,
		[]string{"10 children, with the node cache (1 cold + 9 warm)", fmt.Sprintf("%.0f", cold+9*warm), fmt.Sprintf("%.1f", (cold+9*warm)/(1<<20)), "-", "-"},
		[]string{"10 children, without a node cache (10 × cold)", fmt.Sprintf("%.0f", 10*cold), fmt.Sprintf("%.1f", 10*cold/(1<<20)), "-", "-"})
	g.Tables = append(g.Tables, tb)
	return g
}
