package suite

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"

	"github.com/mitosis-fork/mitosis/engine"
)

// Case names of the start groups, in report order.
const (
	CaseCold     = "cold start"
	CaseWarm     = "warm start"
	CaseLocal    = "local fork"
	CaseEager    = "mitosis eager"
	CaseLazyCold = "mitosis lazy, cold cache"
	CaseLazy     = "mitosis lazy"
	CasePrefetch = "mitosis lazy + prefetch"
)

// StartCases lists the same-node start cases (with Config.Remote,
// RemoteCases follow them).
var StartCases = []string{CaseCold, CaseWarm, CaseLocal, CaseEager, CaseLazyCold, CaseLazy, CasePrefetch}

// startMethod is one measured start case.
type startMethod struct {
	name string
	run  func(warm bool) (served, error)
}

// startGroup measures every start case of one workload, interleaved.
func (r *runner) startGroup(wl string) *StartGroup {
	g := &StartGroup{Workload: wl, Description: workloadDesc[wl]}
	cases := map[string]*Case{}
	names := StartCases
	if r.lab != nil {
		names = append(slices.Clone(StartCases), RemoteCases...)
	}
	for _, n := range names {
		cases[n] = &Case{Name: n}
		g.Cases = append(g.Cases, cases[n])
	}
	var v verifier
	defer func() { g.Hash, g.Verified = v.hash, v.n }()
	p, err := r.startParent(wl)
	if err != nil {
		g.Error = err.Error()
		return g
	}
	defer p.kill()
	seed, err := r.prepare(p)
	if err != nil {
		g.Error = err.Error()
		return g
	}
	defer func() {
		if err := r.removeSeed(seed); err != nil && g.Error == "" {
			g.Error = err.Error()
		}
	}()
	if ps, err := readSmaps(p.pid); err == nil {
		g.ParentRSS = ps.Rss
	}
	g.Notes = append(g.Notes, fmt.Sprintf("seed: prepared in %s; %d VMAs, %d present pages (%.1f MiB); parent RSS %s",
		fmtDur(seed.Took), len(seed.Desc.VMAs), seed.Desc.PresentPages(), float64(seed.Desc.PresentPages())*4096/(1<<20), fmtBytes(g.ParentRSS)))
	stats := map[string][]engine.ChildStats{}
	fork := func(name string, s *engine.Seed, opts engine.ForkOptions, warm bool) (served, error) {
		sv, st, err := r.mitosisFork(s, opts)
		if err == nil && !warm {
			stats[name] = append(stats[name], st)
		}
		return sv, err
	}
	methods := []startMethod{
		{CaseCold, func(bool) (served, error) { return r.coldStart(wl) }},
		{CaseWarm, func(bool) (served, error) { return r.warmStart(p) }},
		{CaseLocal, func(bool) (served, error) { return r.localFork(p) }},
		{CaseEager, func(w bool) (served, error) { return fork(CaseEager, seed, engine.ForkOptions{Eager: true}, w) }},
		{CaseLazyCold, func(w bool) (served, error) {
			fresh, err := r.prepare(p)
			if err != nil {
				return served{}, err
			}
			sv, err := fork(CaseLazyCold, fresh, engine.ForkOptions{}, w)
			return sv, errors.Join(err, r.removeSeed(fresh))
		}},
		{CaseLazy, func(w bool) (served, error) { return fork(CaseLazy, seed, engine.ForkOptions{}, w) }},
		{CasePrefetch, func(w bool) (served, error) { return fork(CasePrefetch, seed, engine.ForkOptions{Prefetch: true}, w) }},
	}
	if r.lab != nil {
		rs, err := r.lab.prepare(p)
		if err != nil {
			g.Error = err.Error() + r.lab.daemonLogs()
			return g
		}
		defer func() {
			if err := r.lab.removeSeed(rs.ID); err != nil && g.Error == "" {
				g.Error = err.Error()
			}
		}()
		g.Notes = append(g.Notes, fmt.Sprintf("remote seed: prepared by node a's daemon in %.2f ms (%d VMAs, %d present pages); remote cases fork on node b", rs.PrepareMS, rs.VMAs, rs.PresentPages))
		methods = append(methods, r.remoteMethods(p, rs)...)
	}
	first := 1
	if r.cfg.Quick {
		first = 0
	}
	for it := first - 1; it < r.cfg.Runs; it++ {
		if err := r.ctx.Err(); err != nil {
			g.Error = "interrupted: " + err.Error()
			return g
		}
		warm := it < 0
		r.logf("%s: iteration %d/%d%s", wl, it+1, r.cfg.Runs, map[bool]string{true: " (warm-up)"}[warm])
		for _, k := range rotate(len(methods), it+1) {
			m := methods[k]
			sv, err := m.run(warm)
			if err == nil {
				err = v.check(m.name, sv)
			}
			if err != nil {
				g.Error = fmt.Sprintf("%s, iteration %d: %v", m.name, it+1, err)
				if r.lab != nil && slices.Contains(RemoteCases, m.name) {
					g.Error += r.lab.daemonLogs()
				}
				return g
			}
			if !warm {
				c := cases[m.name]
				c.Start = append(c.Start, sv.start)
				c.Total = append(c.Total, sv.total)
				c.Handler = append(c.Handler, sv.handler)
			}
		}
	}
	for _, n := range []string{CaseEager, CaseLazyCold, CaseLazy, CasePrefetch} {
		g.Notes = append(g.Notes, statsNote(n, stats[n]))
	}
	g.CacheBytes = seed.CacheBytes()
	g.Notes = append(g.Notes, fmt.Sprintf("the seed's node page cache held %s at the end", fmtBytes(g.CacheBytes)))
	return g
}

func statsNote(name string, st []engine.ChildStats) string {
	med := func(f func(engine.ChildStats) uint64) uint64 {
		v := make([]uint64, len(st))
		for i, s := range st {
			v[i] = f(s)
		}
		slices.Sort(v)
		if len(v) == 0 {
			return 0
		}
		return v[len(v)/2]
	}
	return fmt.Sprintf("%s, paging per child (median of %d): %d faults, %d pages copied, %d mapped from the shared cache, %d zero pages, %d fetched into the cache, %d installed before the child ran",
		name, len(st), med(func(s engine.ChildStats) uint64 { return s.Faults }), med(func(s engine.ChildStats) uint64 { return s.PagesCopied }),
		med(func(s engine.ChildStats) uint64 { return s.PagesShared }), med(func(s engine.ChildStats) uint64 { return s.PagesZero }),
		med(func(s engine.ChildStats) uint64 { return s.PagesFetched }), med(func(s engine.ChildStats) uint64 { return s.Eager }))
}

// prepareGroup measures Prepare against parent memory size.
func (r *runner) prepareGroup() *PrepareGroup {
	g := &PrepareGroup{}
	first := 1
	if r.cfg.Quick {
		first = 0
	}
	for _, mb := range r.cfg.PrepareSizes {
		row := &PrepareRow{MB: mb, Wall: &Case{Name: fmt.Sprintf("%d MiB", mb)}, Took: &Case{Name: fmt.Sprintf("%d MiB (Seed.Took)", mb)}}
		g.Rows = append(g.Rows, row)
		p, err := r.startParent(fmt.Sprintf("mem:%d", mb))
		if err != nil {
			g.Error = err.Error()
			return g
		}
		if s, err := readSmaps(p.pid); err == nil {
			row.ParentRSS = s.Rss
		}
		for it := first - 1; it < r.cfg.Runs; it++ {
			if err := r.ctx.Err(); err != nil {
				p.kill()
				g.Error = "interrupted"
				return g
			}
			t0 := time.Now()
			seed, err := r.e.Prepare(p.pid, engine.PrepareOptions{Name: p.name, ChannelFD: -1})
			d := time.Since(t0)
			if err != nil {
				p.kill()
				g.Error = fmt.Sprintf("%d MiB: engine Prepare(%d): %v", mb, p.pid, err)
				return g
			}
			row.Pages, row.VMAs = seed.Desc.PresentPages(), len(seed.Desc.VMAs)
			if it >= 0 {
				row.Wall.Start = append(row.Wall.Start, d)
				row.Took.Start = append(row.Took.Start, seed.Took)
			}
			err = errors.Join(r.removeSeed(seed), testenv.WaitStopped(p.pid, 10*time.Second))
			if err != nil {
				p.kill()
				g.Error = fmt.Sprintf("%d MiB: %v", mb, err)
				return g
			}
		}
		p.kill()
		r.logf("prepare %d MiB: done", mb)
	}
	return g
}

// fanOutGroup forks many children of one seed with 1..k requests in flight.
func (r *runner) fanOutGroup() *FanOutGroup {
	wl := r.cfg.FanOutWorkload
	g := &FanOutGroup{Workload: wl, Children: r.cfg.FanOutChildren}
	p, err := r.startParent(wl)
	if err != nil {
		g.Error = err.Error()
		return g
	}
	defer p.kill()
	seed, err := r.prepare(p)
	if err != nil {
		g.Error = err.Error()
		return g
	}
	defer func() {
		if err := r.removeSeed(seed); err != nil && g.Error == "" {
			g.Error = err.Error()
		}
	}()
	var v verifier
	ref, err := r.coldStart(wl)
	if err == nil {
		err = v.check("cold start", ref)
	}
	// warm the node cache and record the working set
	for i := 0; i < 2 && err == nil; i++ {
		var sv served
		sv, _, err = r.mitosisFork(seed, engine.ForkOptions{Prefetch: true})
		if err == nil {
			err = v.check("warm-up child", sv)
		}
	}
	if err != nil {
		g.Error = err.Error()
		return g
	}
	for _, conc := range r.cfg.FanOutConc {
		row := &FanOutRow{Conc: conc, Lat: &Case{Name: fmt.Sprintf("%d in flight", conc)}}
		g.Rows = append(g.Rows, row)
		r.logf("fanout: %d children, %d in flight", g.Children, conc)
		var mu sync.Mutex
		var firstErr error
		next := 0
		var wg sync.WaitGroup
		t0 := time.Now()
		for w := 0; w < conc; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					mu.Lock()
					if next >= g.Children || firstErr != nil {
						mu.Unlock()
						return
					}
					next++
					mu.Unlock()
					sv, _, err := r.mitosisFork(seed, engine.ForkOptions{Prefetch: true})
					mu.Lock()
					if err == nil {
						err = v.check("fan-out child", sv)
					}
					if err != nil && firstErr == nil {
						firstErr = err
					}
					if err == nil {
						row.Lat.Start = append(row.Lat.Start, sv.start)
						row.Lat.Total = append(row.Lat.Total, sv.total)
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		row.Wall = time.Since(t0)
		if firstErr != nil {
			g.Error = fmt.Sprintf("%d in flight: %v", conc, firstErr)
			return g
		}
	}
	g.Verified = v.n
	return g
}

// memoryGroup measures N held instances of one workload three ways.
func (r *runner) memoryGroup(wl string) (g *MemoryGroup) {
	g = &MemoryGroup{Workload: wl}
	var v verifier
	p, err := r.startParent(wl)
	if err != nil {
		g.Error = err.Error()
		return g
	}
	defer p.kill()
	if g.ParentBefore, err = readSmaps(p.pid); err != nil {
		g.Error = err.Error()
		return g
	}
	seed, err := r.prepare(p)
	if err != nil {
		g.Error = err.Error()
		return g
	}
	defer func() {
		if err := r.removeSeed(seed); err != nil && g.Error == "" {
			g.Error = err.Error()
		}
	}()
	if g.ParentAfter, err = readSmaps(p.pid); err == nil {
		g.Frozen, err = readSmaps(seed.SourcePID)
	}
	if err != nil {
		g.Error = err.Error()
		return g
	}
	// cold starts take how long? (decides the cap on cold instances)
	ref, err := r.coldStart(wl)
	if err == nil {
		err = v.check("cold start", ref)
	}
	if err != nil {
		g.Error = err.Error()
		return g
	}
	if err := os.WriteFile(r.hold, nil, 0o644); err != nil {
		g.Error = err.Error()
		return g
	}
	defer os.Remove(r.hold)
	for _, n := range r.cfg.MemoryCounts {
		for _, ap := range []string{MemMitosis, MemWarm, MemCold} {
			if r.ctx.Err() != nil {
				g.Error = "interrupted"
				return g
			}
			k := n
			if ap == MemCold && ref.total > 100*time.Millisecond && k > r.cfg.ColdCap {
				k = r.cfg.ColdCap
			}
			r.logf("memory %s: %d × %s", wl, k, ap)
			row, err := r.memoryRow(wl, ap, k, p, seed, &v)
			if err != nil {
				g.Error = fmt.Sprintf("%d × %s: %v", k, ap, err)
				return g
			}
			row.N = n
			g.Rows = append(g.Rows, row)
		}
	}
	g.Verified = v.n
	return g
}

// memoryRow starts k instances of one approach, lets each serve one request
// and stop itself (SIGSTOP, $SUITE_HOLD exists), measures them, and ends them.
func (r *runner) memoryRow(wl, ap string, k int, p *parent, seed *engine.Seed, v *verifier) (row *MemoryRow, err error) {
	row = &MemoryRow{Approach: ap, Instances: k}
	var pids []int
	var cleanup []func()
	defer func() {
		for _, f := range cleanup {
			f()
		}
	}()
	var mu sync.Mutex
	switch ap {
	case MemMitosis:
		var kids []*engine.Child
		cleanup = append(cleanup, func() {
			for _, c := range kids {
				c.Kill(syscall.SIGKILL)
			}
			for _, c := range kids {
				<-c.Done()
			}
		})
		err = parallel(k, 2, func(i int) error {
			c, rd, t0, err := r.forkChild(seed, engine.ForkOptions{})
			if err != nil {
				return err
			}
			mu.Lock()
			kids = append(kids, c)
			mu.Unlock()
			defer rd.f.Close()
			sv, err := readServe(rd, t0)
			if err == nil {
				mu.Lock()
				err = v.check("held mitosis child", sv)
				mu.Unlock()
			}
			if err == nil {
				err = testenv.WaitStopped(c.PID, resultTimeout)
			}
			if err != nil {
				return fmt.Errorf("child %d: %w; engine error: %v%s", c.PID, err, c.Err(), r.stderrTail())
			}
			return nil
		})
		for _, c := range kids {
			pids = append(pids, c.PID)
		}
	case MemWarm:
		wp, werr := r.warmChildren(p, k)
		cleanup = append(cleanup, func() {
			if rerr := r.reapWarm(p, wp); rerr != nil && err == nil {
				err = rerr
			}
		})
		if werr != nil {
			return row, werr
		}
		for _, pid := range wp {
			t0 := time.Now()
			if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
				return row, err
			}
			sv, err := readServe(p.out, t0)
			if err == nil {
				err = v.check("held warm instance", sv)
			}
			if err == nil {
				err = testenv.WaitStopped(pid, resultTimeout)
			}
			if err != nil {
				return row, fmt.Errorf("warm instance %d: %w%s", pid, err, r.stderrTail())
			}
		}
		pids = wp
	case MemCold:
		var cmds []*exec.Cmd
		cleanup = append(cleanup, func() {
			for _, c := range cmds {
				_ = c.Process.Kill()
				_ = c.Wait()
			}
		})
		err = parallel(k, 2, func(i int) error {
			cmd, rd, t0, err := r.execCold(wl)
			if err != nil {
				return err
			}
			mu.Lock()
			cmds = append(cmds, cmd)
			mu.Unlock()
			defer rd.f.Close()
			sv, err := readServe(rd, t0)
			if err == nil {
				mu.Lock()
				err = v.check("held cold instance", sv)
				mu.Unlock()
			}
			if err == nil {
				err = testenv.WaitStopped(cmd.Process.Pid, resultTimeout)
			}
			if err != nil {
				return fmt.Errorf("cold instance %d: %w%s", cmd.Process.Pid, err, r.stderrTail())
			}
			return nil
		})
		for _, c := range cmds {
			pids = append(pids, c.Process.Pid)
		}
	}
	if err != nil {
		return row, err
	}
	var per []Smaps
	for _, pid := range pids {
		s, err := readSmaps(pid)
		if err != nil {
			return row, err
		}
		per = append(per, s)
		row.Sum.Add(s)
	}
	row.Median = medianSmaps(per)
	switch ap {
	case MemMitosis:
		ps, err1 := readSmaps(p.pid)
		fs, err2 := readSmaps(seed.SourcePID)
		if err := errors.Join(err1, err2); err != nil {
			return row, err
		}
		row.Overhead = ps.Pss + fs.Pss
		row.Cache = seed.CacheBytes()
	case MemWarm:
		ps, err := readSmaps(p.pid)
		if err != nil {
			return row, err
		}
		row.Overhead = ps.Pss
	}
	return row, nil
}

func medianSmaps(ss []Smaps) Smaps {
	med := func(f func(Smaps) uint64) uint64 {
		v := make([]uint64, len(ss))
		for i, s := range ss {
			v[i] = f(s)
		}
		sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
		if len(v) == 0 {
			return 0
		}
		return v[len(v)/2]
	}
	return Smaps{
		Rss: med(func(s Smaps) uint64 { return s.Rss }), Pss: med(func(s Smaps) uint64 { return s.Pss }),
		SharedClean: med(func(s Smaps) uint64 { return s.SharedClean }), SharedDirty: med(func(s Smaps) uint64 { return s.SharedDirty }),
		PrivateClean: med(func(s Smaps) uint64 { return s.PrivateClean }), PrivateDirty: med(func(s Smaps) uint64 { return s.PrivateDirty }),
	}
}

// parallel runs f(0..n-1) with at most k at a time; the first error stops
// new work.
func parallel(n, k int, f func(int) error) error {
	var mu sync.Mutex
	var errs error
	next := 0
	var wg sync.WaitGroup
	for w := 0; w < k; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				if next >= n || errs != nil {
					mu.Unlock()
					return
				}
				i := next
				next++
				mu.Unlock()
				if err := f(i); err != nil {
					mu.Lock()
					errs = errors.Join(errs, err)
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return errs
}
