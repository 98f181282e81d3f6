package suite

// Remote cases: a three-node lab (bench/netlab: one network namespace per
// node, veths on a bridge in a hub namespace, addresses in 198.18.0.0/15,
// one `mitosis daemon` per node). The workload parents run on this host as
// for the same-node cases and are prepared a second time by node a's
// daemon; children of that seed are forked on node b (attached forks sent
// to b's daemon socket, seed "a/ID"), their pages crossing the lab network
// from a into b's node page cache. All on one host: the nodes share its
// CPUs.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"

	"github.com/mitosis-fork/mitosis/bench/netlab"
	"github.com/mitosis-fork/mitosis/client"
)

// Remote start cases (node b, seed prepared on node a).
const (
	CaseRemoteCold         = "remote lazy, cold cache"
	CaseRemote             = "remote lazy"
	CaseRemotePrefetch     = "remote lazy + prefetch"
	CaseRemotePrefetchCold = "remote prefetch, cold cache"
)

// RemoteCases lists the remote start cases, in report order.
var RemoteCases = []string{CaseRemoteCold, CaseRemote, CaseRemotePrefetch, CaseRemotePrefetchCold}

// GroupRemoteFanOut selects the remote fan-out group (Config.Remote only).
const GroupRemoteFanOut = "remote-fanout"

// lab is the suite's wrapper of a netlab cluster.
type lab struct {
	l       *netlab.Lab
	a, b, c *netlab.Node
	seq     int
}

// newLab builds mitosis, the namespaces and the daemons of nodes a, b, c.
// On error whatever was created is torn down again.
func (r *runner) newLab() (lb *lab, err error) {
	if why := netlab.Available(); why != "" {
		return nil, errors.New("remote cases: " + why)
	}
	bin := r.cfg.Mitosis
	if bin == "" {
		r.logf("remote: go build -o %s/ ./cmd/mitosis ./cmd/mitosisd", r.dir)
		var err error
		if bin, err = testenv.BuildMitosis("", r.dir); err != nil {
			return nil, fmt.Errorf("remote: %w (or set Config.Mitosis)", err)
		}
	}
	l, err := netlab.New(netlab.Config{Bin: bin, Dir: filepath.Join(r.dir, "lab"), Subnet: "198.18.5",
		Nodes: []netlab.NodeSpec{{Name: "a"}, {Name: "b"}, {Name: "c"}}, Log: r.log})
	if err != nil {
		return nil, err
	}
	lb = &lab{l: l, a: l.Node("a"), b: l.Node("b"), c: l.Node("c")}
	defer func() {
		if err != nil {
			err = errors.Join(err, lb.close())
			lb = nil
		}
	}()
	for _, n := range l.Nodes {
		if err := n.Start(); err != nil {
			return lb, err
		}
	}
	return lb, nil
}

// close stops the daemons and removes the namespaces; it reports anything
// left behind.
func (lb *lab) close() error {
	if lb == nil {
		return nil
	}
	err := lb.l.Close()
	if left := netlab.Leftovers(lb.l.Prefix); len(left) > 0 {
		err = errors.Join(err, fmt.Errorf("netlab: LEFT BEHIND: %s", strings.Join(left, ", ")))
	}
	return err
}

// daemonLogs is the end of every daemon's log, for error messages.
func (lb *lab) daemonLogs() string {
	var b strings.Builder
	for _, n := range lb.l.Nodes {
		fmt.Fprintf(&b, "; daemon %s log ends with: %s", n.Name, strings.ReplaceAll(netlab.Tail(n.LogFile, 4), "\n", " ⏎ "))
	}
	return b.String()
}

// call runs fn with a fresh client of node n.
func call[T any](n *netlab.Node, fn func(c *client.Client) (T, error)) (T, error) {
	c, err := client.Dial(n.Sock)
	if err != nil {
		var zero T
		return zero, fmt.Errorf("dial daemon %s: %w", n.Name, err)
	}
	defer c.Close()
	return fn(c)
}

// prepare prepares the stopped parent p with node a's daemon.
func (lb *lab) prepare(p *parent) (client.SeedInfo, error) {
	lb.seq++
	name := fmt.Sprintf("%s-%d", strings.ReplaceAll(p.name, ":", "-"), lb.seq)
	s, err := call(lb.a, func(c *client.Client) (client.SeedInfo, error) {
		return c.PrepareWith(client.PrepareRequest{PID: p.pid, Name: name})
	})
	if err != nil {
		return s, fmt.Errorf("daemon a: prepare pid %d: %w", p.pid, err)
	}
	if err := testenv.WaitStopped(p.pid, 10*time.Second); err != nil {
		return s, errors.Join(fmt.Errorf("parent %d after daemon prepare: %w", p.pid, err), lb.removeSeed(s.ID))
	}
	return s, nil
}

// removeSeed removes seed id of node a and its imports on b and c,
// retrying while a just-ended child is still counted.
func (lb *lab) removeSeed(id string) error {
	rm := func(n *netlab.Node, seed string, missingOK bool) error {
		deadline := time.Now().Add(5 * time.Second)
		for {
			_, err := call(n, func(c *client.Client) (struct{}, error) { return struct{}{}, c.Remove(seed, true) })
			if err == nil || missingOK && strings.Contains(err.Error(), "no seed") {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("daemon %s: rm %s: %w", n.Name, seed, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return errors.Join(rm(lb.b, "a/"+id, true), rm(lb.c, "a/"+id, true), rm(lb.a, id, false))
}

// daemonFork forks one attached child of seed on node n (stdout on a
// fresh pipe), reads its S and R lines and waits for the daemon to report
// its exit, which must be status 0.
func (r *runner) daemonFork(n *netlab.Node, seed string, prefetch bool) (served, error) {
	s, wait, err := r.daemonForkStart(n, seed, prefetch)
	if err != nil {
		return s, err
	}
	return s, wait()
}

// slowExitAfter is when a child's exit report counts as late.
const slowExitAfter = 200 * time.Millisecond

// daemonForkStart is daemonFork up to the child's result line; wait then
// waits for the exit report (it must be called).
func (r *runner) daemonForkStart(n *netlab.Node, seed string, prefetch bool) (served, func() error, error) {
	c, err := client.Dial(n.Sock)
	if err != nil {
		return served{}, nil, fmt.Errorf("dial daemon %s: %w", n.Name, err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		c.Close()
		return served{}, nil, err
	}
	type end struct {
		info client.ChildInfo
		exit client.ExitInfo
		err  error
		at   time.Time
	}
	done := make(chan end, 1)
	t0 := time.Now()
	go func() {
		info, exit, err := c.ForkAttachedWith(client.ForkRequest{Seed: seed, Prefetch: prefetch}, r.devnull, pw, r.errf)
		pw.Close()
		done <- end{info, exit, err, time.Now()}
	}()
	// wait for the exit report; closing the connection on a timeout makes
	// the daemon kill the child
	finish := func() (end, error) {
		defer c.Close()
		defer pr.Close()
		select {
		case e := <-done:
			return e, nil
		case <-time.After(doneTimeout):
			c.Close()
			e := <-done
			return e, fmt.Errorf("child %s of %s on %s: no exit report within %v (connection closed: the daemon kills it); fork: %v", e.info.ID, seed, n.Name, doneTimeout, e.err)
		}
	}
	rd := &lineReader{f: pr}
	s, rerr := readServe(rd, t0)
	if rerr != nil {
		e, _ := finish()
		return s, nil, fmt.Errorf("child of %s on %s: %w; fork: %v; exit %+v%s", seed, n.Name, rerr, e.err, e.exit, r.stderrTail())
	}
	resultAt := t0.Add(s.total)
	wait := func() error {
		e, err := finish()
		if err != nil {
			return err
		}
		if e.err != nil {
			return fmt.Errorf("fork %s on %s: %w", seed, n.Name, e.err)
		}
		if e.exit.Code != 0 || e.exit.Signal != 0 || e.exit.Error != "" {
			return fmt.Errorf("child %s of %s on %s: exit %+v%s", e.info.ID, seed, n.Name, e.exit, r.stderrTail())
		}
		if d := e.at.Sub(resultAt); d > slowExitAfter {
			r.mu.Lock()
			r.slowExits = append(r.slowExits, fmt.Sprintf("%s on %s: %s", e.info.ID, n.Name, fmtDur(d)))
			r.mu.Unlock()
		}
		return nil
	}
	return s, wait, nil
}

// remoteMethods are the remote start cases of one workload: rs is the
// warm seed node a's daemon prepared of p.
func (r *runner) remoteMethods(p *parent, rs client.SeedInfo) []startMethod {
	lb := r.lab
	fresh := func(prefetch bool, record func(string) error) (served, error) {
		s, err := lb.prepare(p)
		if err != nil {
			return served{}, err
		}
		if record != nil {
			if err := record(s.ID); err != nil {
				return served{}, errors.Join(err, lb.removeSeed(s.ID))
			}
		}
		sv, err := r.daemonFork(lb.b, "a/"+s.ID, prefetch)
		return sv, errors.Join(err, lb.removeSeed(s.ID))
	}
	return []startMethod{
		{CaseRemoteCold, func(bool) (served, error) { return fresh(false, nil) }},
		{CaseRemote, func(bool) (served, error) { return r.daemonFork(lb.b, "a/"+rs.ID, false) }},
		{CaseRemotePrefetch, func(bool) (served, error) { return r.daemonFork(lb.b, "a/"+rs.ID, true) }},
		{CaseRemotePrefetchCold, func(bool) (served, error) {
			var rec served
			sv, err := fresh(true, func(id string) error {
				// an untimed local child on a records the working set that
				// b's import then fetches in bulk
				var err error
				rec, err = r.daemonFork(lb.a, id, false)
				return err
			})
			if err == nil && rec.hash != sv.hash {
				err = fmt.Errorf("WRONG RESULT: the recording child on a returned sha256 %s, the child on b %s", rec.hash, sv.hash)
			}
			return sv, err
		}},
	}
}

// RemoteFanOutGroup is children per second from one parent onto 1..3
// nodes.
type RemoteFanOutGroup struct {
	Workload string             `json:"workload"`
	PerNode  int                `json:"children_per_node"`
	InFlight int                `json:"in_flight_per_node"`
	Rows     []*RemoteFanOutRow `json:"rows"`
	Verified int                `json:"results_verified"`
	Error    string             `json:"error,omitempty"`
}

// RemoteFanOutRow is one set of target nodes.
type RemoteFanOutRow struct {
	Nodes []string      `json:"nodes"`
	Wall  time.Duration `json:"wall_ns"`
	Lat   *Case         `json:"latency"`
	// PerNode is each target's share of the latency samples.
	PerNode map[string]*Case `json:"per_node"`
}

func (r *RemoteFanOutRow) rate() float64 {
	if r.Wall <= 0 {
		return 0
	}
	return float64(len(r.Lat.Total)) / r.Wall.Seconds()
}

// remoteFanOutGroup forks PerNode children of one hello seed of node a on
// each target node at once, InFlight attached requests per node.
func (r *runner) remoteFanOutGroup() *RemoteFanOutGroup {
	wl := r.cfg.FanOutWorkload
	g := &RemoteFanOutGroup{Workload: wl, PerNode: r.cfg.RemoteFanOutChildren, InFlight: r.cfg.RemoteFanOutConc}
	lb := r.lab
	p, err := r.startParent(wl)
	if err != nil {
		g.Error = err.Error()
		return g
	}
	defer p.kill()
	s, err := lb.prepare(p)
	if err != nil {
		g.Error = err.Error()
		return g
	}
	defer func() {
		if err := lb.removeSeed(s.ID); err != nil && g.Error == "" {
			g.Error = err.Error()
		}
	}()
	var v verifier
	var mu sync.Mutex
	seedOn := func(n string) string {
		if n == "a" {
			return s.ID
		}
		return "a/" + s.ID
	}
	// warm every node: import, node cache, working set
	ref, err := r.coldStart(wl)
	if err == nil {
		err = v.check("cold start", ref)
	}
	for _, n := range []string{"a", "b", "c", "b", "c", "a"} {
		if err != nil {
			break
		}
		var sv served
		sv, err = r.daemonFork(lb.l.Node(n), seedOn(n), true)
		if err == nil {
			err = v.check("warm-up child on "+n, sv)
		}
	}
	if err != nil {
		g.Error = err.Error() + lb.daemonLogs()
		return g
	}
	for _, nodes := range [][]string{{"b"}, {"b", "c"}, {"b", "c", "a"}} {
		if r.ctx.Err() != nil {
			g.Error = "interrupted"
			return g
		}
		row := &RemoteFanOutRow{Nodes: nodes, Lat: &Case{Name: fmt.Sprintf("%d node%s", len(nodes), map[bool]string{true: "s"}[len(nodes) > 1])}, PerNode: map[string]*Case{}}
		for _, n := range nodes {
			row.PerNode[n] = &Case{Name: n}
		}
		g.Rows = append(g.Rows, row)
		r.logf("remote fanout: %d children on each of %s, %d in flight per node", g.PerNode, strings.Join(nodes, ", "), g.InFlight)
		var firstErr error
		var wg, waits sync.WaitGroup
		var last time.Time
		t0 := time.Now()
		for _, n := range nodes {
			left := g.PerNode
			for w := 0; w < g.InFlight; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						mu.Lock()
						if left <= 0 || firstErr != nil {
							mu.Unlock()
							return
						}
						left--
						mu.Unlock()
						sv, wait, err := r.daemonForkStart(lb.l.Node(n), seedOn(n), true)
						resultAt := time.Now() // just after its result line was read
						if err == nil {
							waits.Add(1)
							go func() {
								defer waits.Done()
								if err := wait(); err != nil {
									mu.Lock()
									if firstErr == nil {
										firstErr = fmt.Errorf("node %s: %w", n, err)
									}
									mu.Unlock()
								}
							}()
						}
						mu.Lock()
						if err == nil {
							err = v.check("fan-out child on "+n, sv)
						}
						if err != nil && firstErr == nil {
							firstErr = fmt.Errorf("node %s: %w", n, err)
						}
						if err == nil {
							row.Lat.Start = append(row.Lat.Start, sv.start)
							row.Lat.Total = append(row.Lat.Total, sv.total)
							row.PerNode[n].Start = append(row.PerNode[n].Start, sv.start)
							row.PerNode[n].Total = append(row.PerNode[n].Total, sv.total)
							if resultAt.After(last) {
								last = resultAt
							}
						}
						mu.Unlock()
					}
				}()
			}
		}
		wg.Wait()
		row.Wall = last.Sub(t0)
		waits.Wait()
		if firstErr != nil {
			g.Error = fmt.Sprintf("%s: %v%s", strings.Join(nodes, ", "), firstErr, lb.daemonLogs())
			return g
		}
	}
	g.Verified = v.n
	return g
}

func (g *RemoteFanOutGroup) finish() {
	for _, row := range g.Rows {
		row.Lat.finish()
		for _, c := range row.PerNode {
			c.finish()
		}
	}
}
