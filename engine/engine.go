package engine

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
	"github.com/mitosis-fork/mitosis/internal/stub"
	"github.com/mitosis-fork/mitosis/pager"
	"github.com/mitosis-fork/mitosis/restore"
	"github.com/mitosis-fork/mitosis/snapshot"
)

// restorer picks the tracer thread for the next restore. Restores mostly
// wait for the stub to run its batches, so two tracer threads overlap two
// restores; each child stays with the thread that spawned it (its
// PR_SET_PDEATHSIG parent) until it is detached.
func (e *Engine) restorer() *ptrace.Tracer {
	n := e.next.Add(1)
	return e.restorers[n%uint64(len(e.restorers))]
}

// Options configure an Engine.
type Options struct {
	// StateDir is a directory the engine may use for scratch files.
	StateDir string
}

// Engine owns the tracer thread, every seed's frozen copy and every child's
// pager on this host.
type Engine struct {
	opts      Options
	tracer    *ptrace.Tracer   // prepares, owns frozen copies
	restorers []*ptrace.Tracer // restores (see restorer)
	next      atomic.Uint64
	stubFile  *os.File
	stubPath  string
	devNull   *os.File

	mu       sync.Mutex
	seeds    map[string]*Seed
	released []*Seed // handed over (Release); their caches close last
	children map[string]*Child
	closed   bool
	wg       sync.WaitGroup
}

// New starts an engine: its tracer thread and the stub executable (kept in
// a memfd, so nothing is written to disk).
func New(opts Options) (*Engine, error) {
	fd, err := unix.MemfdCreate("mitosis-stub", unix.MFD_CLOEXEC|unix.MFD_EXEC)
	if err != nil {
		fd, err = unix.MemfdCreate("mitosis-stub", unix.MFD_CLOEXEC)
	}
	if err != nil {
		return nil, fmt.Errorf("create stub memfd: %w", err)
	}
	f := os.NewFile(uintptr(fd), "mitosis-stub")
	if _, err := f.Write(stub.ELF()); err != nil {
		f.Close()
		return nil, fmt.Errorf("write stub: %w", err)
	}
	dn, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		f.Close()
		return nil, err
	}
	return &Engine{
		opts:      opts,
		tracer:    ptrace.NewTracer(),
		restorers: []*ptrace.Tracer{ptrace.NewTracer(), ptrace.NewTracer()},
		stubFile:  f,
		// The path names the daemon's fd, so it stays valid in the
		// forked stub whatever its own fd table looks like.
		stubPath: fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), fd),
		devNull:  dn,
		seeds:    map[string]*Seed{},
		children: map[string]*Child{},
	}, nil
}

func newID(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// Prepare snapshots the process pid, every thread of it, into a seed. The
// process keeps running (or stays stopped if it was stopped).
func (e *Engine) Prepare(pid int, opts PrepareOptions) (*Seed, error) {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil, errors.New("engine closed")
	}
	e.mu.Unlock()
	lazy, sp := e.pagedHere(pid)
	sopts := snapshot.Options{ChannelFD: opts.ChannelFD, Lazy: lazy}
	if sp != nil {
		sopts.LazyRuns = sp.LazyRuns
	}
	res, err := snapshot.Prepare(e.tracer, pid, sopts)
	if err != nil {
		return nil, err
	}
	if res.WasStopped {
		// Seed.Took excludes this: the parent is frozen already.
		snapshot.WaitStopped(pid)
	}
	s := &Seed{
		ID: newID("s-"), Name: opts.Name, Desc: res.Desc, SourcePID: res.SourcePID,
		ParentPID: pid, Created: time.Now(), Took: res.Took,
	}
	s.Desc.SeedID, s.Desc.Name = s.ID, s.Name
	s.src = pager.LocalSource{PID: s.SourcePID}
	e.mu.Lock()
	e.seeds[s.ID] = s
	e.mu.Unlock()
	return s, nil
}

// Fork starts one child of s on this host. The child runs when Fork returns;
// it is reaped by the engine (see Child.Done).
func (e *Engine) Fork(s *Seed, opts ForkOptions) (*Child, error) {
	start := time.Now()
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil, errors.New("engine closed")
	}
	if e.seeds[s.ID] != s {
		e.mu.Unlock()
		return nil, fmt.Errorf("seed %s was removed", s.ID)
	}
	e.mu.Unlock()
	stdio := opts.Stdio
	for i := range stdio {
		if stdio[i] == nil {
			stdio[i] = e.devNull
		}
	}
	c := &Child{ID: newID("c-"), Seed: s, done: make(chan struct{}), tree: make(chan struct{})}
	if opts.Prefetch && !opts.Eager {
		c.probe = s.nextPrefetchProbes()
	}
	hostname := opts.Hostname
	if hostname == "" && (opts.Root != "" || (s.Desc.Root != "" && s.Desc.Root != "/")) {
		hostname = c.ID
	}
	d := s.Desc
	src := s.src
	var cache *pager.Cache
	if !opts.NoCache || s.Origin != "" {
		var err error
		if cache, err = s.pageCache(src); err != nil {
			return nil, err
		}
	}
	var pg *pager.Pager
	// Mapping from the page cache costs no copy, so wider fault-around
	// windows are cheap there.
	window, maxWindow := 16, 256
	if cache != nil {
		window, maxWindow = 64, 1024
	}
	pg = pager.New(pager.Config{
		Desc:      d,
		Source:    src,
		Cache:     cache,
		Window:    window,
		MaxWindow: maxWindow,
		OnError: func(err error) {
			// The child cannot make progress: end it rather than let
			// it hang on a fault that will never be served.
			c.setErr(fmt.Errorf("paging failed: %w", err))
			if c.PID > 0 {
				_ = unix.Kill(-c.PID, unix.SIGKILL)
				_ = unix.Kill(c.PID, unix.SIGKILL)
			}
		},
	})
	c.pg = pagerStats{pg}
	var sp *pager.Space // the child's, once OnUFFD attached it
	res, err := restore.Restore(e.restorer(), d, restore.Options{
		StubPath: e.stubPath,
		Cache:    cache,
		Stdio:    stdio,
		Channel:  opts.Channel,
		Root:     opts.Root,
		Hostname: hostname,
		OnSpawn:  opts.OnSpawn,
		OnUFFD: func(pid, nsPID, ufd int) error {
			c.PID = pid
			var err error
			sp, err = pg.Attach(ufd)
			if err != nil {
				return err
			}
			c.space = sp
			if opts.Eager {
				return sp.PreloadAll()
			}
			if err := preloadHot(sp, d, nsPID); err != nil {
				return err
			}
			if c.probe {
				sp.RecordTouched()
			}
			if opts.Prefetch && !c.probe {
				for _, r := range s.prefetchSet(cache) {
					if err := sp.Preload(r.Start, int((r.End-r.Start)/descriptor.PageSize), nil); err != nil {
						return fmt.Errorf("prefetch working set: %w", err)
					}
				}
			}
			return nil
		},
		Preload: func(addr uint64, n int, patch func(uint64, []byte)) error {
			if sp == nil {
				return errors.New("no pager yet")
			}
			return sp.Preload(addr, n, patch)
		},
	})
	if err != nil {
		pg.Close()
		return nil, err
	}
	c.PID = res.PID
	c.Started = time.Now()
	c.Took = time.Since(start)
	e.mu.Lock()
	e.children[c.ID] = c
	e.wg.Add(1)
	e.mu.Unlock()
	var pidfd *os.File
	if fd, err := unix.PidfdOpen(c.PID, unix.PIDFD_NONBLOCK); err == nil {
		pidfd = os.NewFile(uintptr(fd), "pidfd")
	}
	go e.reap(c, pg, pidfd)
	return c, nil
}

// preloadHot installs the pages the child touches first, before it runs:
// the TCB (with the cached tid rewritten to the child's) and the stack page
// at rsp, so the kernel-side accesses at resume (rseq, signal frames) find
// them present. The restore does the same for the other threads
// (Options.Preload).
func preloadHot(sp *pager.Space, d *descriptor.Descriptor, pid int) error {
	regs := snapshot.RegsFromArray(d.Regs)
	if regs.Fs_base != 0 {
		tid := d.TIDAddr
		patch := func(addr uint64, b []byte) {
			if tid >= addr && tid+4 <= addr+uint64(len(b)) {
				binary.LittleEndian.PutUint32(b[tid-addr:], uint32(pid))
			}
		}
		if err := sp.Preload(regs.Fs_base, 2, patch); err != nil {
			return fmt.Errorf("preload tcb: %w", err)
		}
	}
	if err := sp.Preload((regs.Rsp&^4095)-4096, 2, nil); err != nil {
		return fmt.Errorf("preload stack: %w", err)
	}
	return nil
}

// ImportSeed registers a seed prepared on another node: d is its descriptor
// and src reads its pages (over the network). Its children on this node
// share one page cache filled from src, so each page crosses the network
// at most once per node. ws is the working set the origin recorded; it is
// fetched into the cache in the background.
func (e *Engine) ImportSeed(d *descriptor.Descriptor, src pager.Source, origin string, ws []descriptor.Run) (*Seed, error) {
	if d.Kernel != kernelRelease() {
		return nil, fmt.Errorf("seed %s was prepared on kernel %s, this node runs %s: the vDSO differs, children cannot run here", d.SeedID, d.Kernel, kernelRelease())
	}
	s := &Seed{ID: d.SeedID, Name: d.Name, Desc: d, Origin: origin, Created: time.Now(), src: src, imported: ws}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil, errors.New("engine closed")
	}
	if old, ok := e.seeds[s.ID]; ok {
		e.mu.Unlock()
		return old, nil
	}
	e.seeds[s.ID] = s
	e.mu.Unlock()
	if len(ws) > 0 {
		// Working-set push: the pages the seed's children touched
		// elsewhere come into this node's cache in bulk, in the
		// background, so the first child here does not fault them in one
		// window at a time and does not wait for them either: its faults
		// on pages the push has claimed wait for that batch alone, and it
		// fetches the others itself. Best effort; it ends with an error
		// when the seed is removed (its cache closed) mid-way.
		if c, err := s.pageCache(src); err == nil {
			go func() { _, _ = c.EnsureRuns(clipRuns(ws, d)) }()
		}
	}
	return s, nil
}

// pagedHere reports whether pid belongs to the process tree of one of our
// children (its process group), i.e. its memory is paged in lazily by us,
// and, when pid is that child itself, its address space in the pager.
func (e *Engine) pagedHere(pid int) (bool, *pager.Space) {
	st, err := procfs.ReadStat(pid)
	if err != nil {
		return false, nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, c := range e.children {
		if c.PID == st.PGrp {
			if c.PID == pid {
				return true, c.space
			}
			return true, nil
		}
	}
	return false, nil
}

// groupAlive reports whether process group pgid has a member that is not a
// zombie (zombies left to a parent that does not reap them would otherwise
// keep a finished tree alive forever).
func groupAlive(pgid int) bool {
	if unix.Kill(-pgid, 0) != nil {
		return false
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return true
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := procfs.ReadStat(pid)
		if err != nil || st.State == 'Z' || st.State == 'X' {
			continue
		}
		if st.PGrp == pgid {
			return true
		}
	}
	return false
}

// clipRuns keeps the parts of runs that are source-present memory of d
// (a peer's working set is not trusted beyond that).
func clipRuns(runs []descriptor.Run, d *descriptor.Descriptor) []descriptor.Run {
	var out []descriptor.Run
	j := 0
	for _, r := range runs {
		for j < len(d.Present) && d.Present[j].End <= r.Start {
			j++
		}
		for k := j; k < len(d.Present) && d.Present[k].Start < r.End; k++ {
			s, e := max(r.Start, d.Present[k].Start), min(r.End, d.Present[k].End)
			if s < e {
				out = append(out, descriptor.Run{Start: s, End: e})
			}
		}
	}
	return out
}

// ReadPages serves a local seed's memory to a peer node from the frozen
// copy.
func (e *Engine) ReadPages(s *Seed, addr uint64, buf []byte) error {
	if err := s.checkServed(addr, uint64(len(buf))); err != nil {
		return err
	}
	s.recordRemote(addr, uint64(len(buf)))
	return s.src.ReadPages(addr, buf)
}

// checkServed checks a peer's read of n bytes at addr of s: s is prepared
// here, and the range is page aligned, lazily paged memory of it.
func (s *Seed) checkServed(addr, n uint64) error {
	if s.Origin != "" {
		return fmt.Errorf("seed %s is not prepared on this node (origin %s)", s.ID, s.Origin)
	}
	if addr%descriptor.PageSize != 0 || n%descriptor.PageSize != 0 {
		return fmt.Errorf("seed %s: unaligned read %#x+%d", s.ID, addr, n)
	}
	if !s.covers(addr, n) {
		return fmt.Errorf("seed %s: range %#x+%#x is not memory of the seed", s.ID, addr, n)
	}
	return nil
}

// PageFile serves runs of a local seed to a peer node from the seed's page
// cache on this node, for a zero-copy send: it fills the cache with what it
// lacks (from the frozen copy) and returns a duplicate of the cache's file
// descriptor, which the caller closes, with each run's offset in it. ok is
// false when the seed has no page cache here (no child of it ran on this
// node: the owner does not hold a second copy of memory only peers read)
// or a run is not wholly cached, present memory; ReadPages serves those.
func (e *Engine) PageFile(s *Seed, runs []descriptor.Run) (fd int, offs []int64, ok bool, err error) {
	for _, r := range runs {
		if r.End < r.Start {
			return -1, nil, false, fmt.Errorf("seed %s: range %#x-%#x ends before it starts", s.ID, r.Start, r.End)
		}
		if err := s.checkServed(r.Start, r.End-r.Start); err != nil {
			return -1, nil, false, err
		}
	}
	s.cacheMu.Lock()
	c := s.cache
	s.cacheMu.Unlock()
	if c == nil {
		return -1, nil, false, nil
	}
	fd, offs, ok, err = c.FileRuns(runs)
	if err != nil {
		return -1, nil, false, fmt.Errorf("seed %s: %w", s.ID, err)
	}
	if ok {
		for _, r := range runs {
			s.recordRemote(r.Start, r.End-r.Start)
		}
	}
	return fd, offs, ok, nil
}

// covers reports whether [addr, addr+n) lies in lazily paged VMAs.
func (s *Seed) covers(addr, n uint64) bool {
	for _, v := range s.Desc.VMAs {
		if addr >= v.Start && addr+n <= v.End && (v.Kind == descriptor.KindAnon || v.Kind == descriptor.KindFileDirty) {
			return true
		}
	}
	return false
}

func (s *Seed) recordRemote(addr, n uint64) {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	s.remoteRuns = addRun(s.remoteRuns, descriptor.Run{Start: addr, End: addr + n})
}

// addRun inserts r into sorted disjoint runs, merging it with the runs it
// overlaps or touches, in place: a binary search and one shift.
func addRun(runs []descriptor.Run, r descriptor.Run) []descriptor.Run {
	i := sort.Search(len(runs), func(i int) bool { return runs[i].End >= r.Start })
	j := i
	for j < len(runs) && runs[j].Start <= r.End {
		r.Start, r.End = min(r.Start, runs[j].Start), max(r.End, runs[j].End)
		j++
	}
	if i == j {
		return slices.Insert(runs, i, r)
	}
	runs[i] = r
	return slices.Delete(runs, i+1, j)
}

// mergeRuns sorts runs and merges those that overlap or touch.
func mergeRuns(runs []descriptor.Run) []descriptor.Run { return descriptor.MergeRuns(runs) }

// WorkingSet returns the runs of seed memory its children have touched so
// far: pages in this node's page cache, pages served to other nodes, and
// the working set an imported seed came with.
func (s *Seed) WorkingSet() []descriptor.Run {
	s.cacheMu.Lock()
	c := s.cache
	runs := append(append([]descriptor.Run(nil), s.remoteRuns...), s.imported...)
	s.cacheMu.Unlock()
	if c != nil {
		runs = append(runs, c.Filled()...)
	}
	return mergeRuns(runs)
}

// Working-set probes (ForkOptions.Prefetch). The prefetch maps what each of
// the last keptProbes probes touched: pages in every recent probe, not in
// any, because mapping a page a child does not touch costs about what its
// fault would (~0.6 µs of CPU a page, mapping and unmapping; measured:
// 20 ms for 128 MiB), while a child that needs a page the prefetch left out
// faults it in a fault-around window of up to 4 MiB, a round trip per
// window. So a request that reads the whole state now and then does not make
// every other request map it. A probe takes the faults a prefetch would
// have spared it (a round trip each), so probes start one in probeEvery
// prefetching forks and grow rarer, up to one in maxProbeGap, while
// successive probes touch the same pages (nine tenths of their pages in
// common); a probe that differs brings the rate back. (Measured: requests
// reading 128 MiB, 240 one at a time over three nodes, had the same latency
// distribution with probes and without, p50 25-31 ms, p99 46-49 ms.)
const (
	probeEvery  = 8
	maxProbeGap = 256
	keptProbes  = 2
)

// nextPrefetchProbes counts a prefetching fork and reports whether it is
// to be a probe: never the first (a seed imported from another node comes
// with the working set its children there touched, and the first child on
// this node should have it), then one every probe gap.
func (s *Seed) nextPrefetchProbes() bool {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	if s.probeGap == 0 {
		s.probeGap = probeEvery
	}
	s.sinceProbe++
	if s.sinceProbe < s.probeGap {
		return false
	}
	s.sinceProbe = 0
	return true
}

// intersectRuns returns the runs in both a and b (each sorted, merged).
func intersectRuns(a, b []descriptor.Run) []descriptor.Run {
	var out []descriptor.Run
	for i, j := 0, 0; i < len(a) && j < len(b); {
		lo, hi := max(a[i].Start, b[j].Start), min(a[i].End, b[j].End)
		if lo < hi {
			out = append(out, descriptor.Run{Start: lo, End: hi})
		}
		if a[i].End < b[j].End {
			i++
		} else {
			j++
		}
	}
	return out
}

// addProbe records what a probe child's faults brought in, and sets how
// soon the next probe comes.
func (s *Seed) addProbe(touched []descriptor.Run) {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	if n := len(s.probes); n > 0 && similarRuns(s.probes[n-1], touched) {
		s.probeGap = min(max(s.probeGap, probeEvery)*2, maxProbeGap)
	} else {
		s.probeGap = probeEvery
	}
	s.probes = append(s.probes, touched)
	if len(s.probes) > keptProbes {
		s.probes = slices.Delete(s.probes, 0, len(s.probes)-keptProbes)
	}
	// What every kept probe touched, computed here once rather than on
	// every fork: a new slice, never modified after (prefetchSet shares it).
	set := s.probes[0]
	for _, p := range s.probes[1:] {
		set = intersectRuns(set, p)
	}
	s.probeSet = slices.Clip(slices.Clone(set))
}

// similarRuns reports whether a and b (sorted, merged) have nine tenths of
// the pages either holds in common.
func similarRuns(a, b []descriptor.Run) bool {
	size := func(rs []descriptor.Run) (n uint64) {
		for _, r := range rs {
			n += r.End - r.Start
		}
		return n
	}
	both := size(intersectRuns(a, b))
	either := size(a) + size(b) - both
	return both*10 >= either*9
}

// prefetchSet is what a prefetching fork maps before the child runs: what
// the last probes touched (before any probe ended: the whole working
// set), and with the node's cache c only the part c holds. The child
// faults in the rest (or meets the working-set push that is fetching it),
// so a child that needs little of a big working set (a workflow's merge
// step forked from the state its rules read) starts at once instead of
// waiting for the whole set to arrive. The cache's own pages are held by
// definition; only the runs recorded elsewhere are checked against it.
func (s *Seed) prefetchSet(c *pager.Cache) []descriptor.Run {
	s.cacheMu.Lock()
	probed, learned := s.probeSet, len(s.probes) > 0
	s.cacheMu.Unlock()
	if learned {
		if c == nil {
			return slices.Clone(probed)
		}
		return c.Held(probed)
	}
	if c == nil {
		return s.WorkingSet()
	}
	s.cacheMu.Lock()
	other := append(append([]descriptor.Run(nil), s.remoteRuns...), s.imported...)
	s.cacheMu.Unlock()
	return mergeRuns(append(c.Filled(), c.Held(mergeRuns(other))...))
}

func kernelRelease() string {
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	return unix.ByteSliceToString(uts.Release[:])
}

// pageCache returns the seed's page cache on this node, creating it.
func (s *Seed) pageCache(src pager.Source) (*pager.Cache, error) {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	if s.cache == nil {
		c, err := pager.NewCache(s.Desc, src)
		if err != nil {
			return nil, err
		}
		s.cache = c
	}
	return s.cache, nil
}

func (s *Seed) closeCache() {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	if s.cache != nil {
		s.cache.Close()
		s.cache = nil
	}
}

// finalStats are the counters of a child whose pager has stopped.
type finalStats ChildStats

func (f finalStats) Stats() ChildStats { return ChildStats(f) }

type pagerStats struct{ p *pager.Pager }

func (p pagerStats) Stats() ChildStats {
	s := p.p.Stats()
	return ChildStats{Faults: s.Faults, PagesCopied: s.PagesCopied, PagesZero: s.PagesZero,
		PagesShared: s.PagesShared, PagesFetched: s.PagesFetched, Eager: s.Eager,
		Spaces: s.Spaces, SpacesLive: s.SpacesLive}
}

func (e *Engine) reap(c *Child, pg *pager.Pager, pidfd *os.File) {
	defer e.wg.Done()
	// Wait for the exit through the pidfd, not wait4: while the child is
	// being prepared as a seed (multi-hop) it is our tracee too, and a
	// wait4 from this thread would consume its ptrace stops.
	ws := ptrace.ReapExit(c.PID, pidfd)
	c.status = syscall.WaitStatus(ws)
	close(c.done)
	// Processes the child forked (same process group) may outlive it and
	// still fault: keep serving them until the group is empty. Closing
	// their userfaultfds earlier would let them read missing memory as
	// zeros.
	for groupAlive(c.PID) {
		e.mu.Lock()
		closed := e.closed
		e.mu.Unlock()
		if closed {
			_ = unix.Kill(-c.PID, unix.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
	pg.Close()
	// A record of the child may outlive it by far (a daemon's ps
	// history): keep its counters, not the pager, the seed and their
	// descriptor (with every thread's registers), which a removed seed
	// would otherwise leave behind for as long.
	final := finalStats(pagerStats{pg}.Stats())
	if c.probe && c.space != nil && c.Err() == nil {
		c.Seed.addProbe(c.space.Touched())
	}
	e.mu.Lock()
	delete(e.children, c.ID)
	c.Seed = nil
	c.space = nil
	e.mu.Unlock()
	c.mu.Lock()
	c.pg = final
	c.mu.Unlock()
	close(c.tree)
}

// RemoveSeed kills the seed's frozen copy. Children still paging from it
// must have exited first, otherwise an error is returned.
func (e *Engine) RemoveSeed(s *Seed) error {
	e.mu.Lock()
	if e.seeds[s.ID] != s {
		e.mu.Unlock()
		return fmt.Errorf("seed %s is not known", s.ID)
	}
	var running, draining []*Child
	for _, c := range e.children {
		if c.Seed != s {
			continue
		}
		select {
		case <-c.done:
			draining = append(draining, c)
		default:
			running = append(running, c)
		}
	}
	e.mu.Unlock()
	if len(running) > 0 {
		return fmt.Errorf("seed %s still has %d running children; stop them first (or remove with force)", s.ID, len(running))
	}
	// Children that exited may leave processes they forked, which still
	// page from the seed: give them a moment to finish.
	deadline := time.After(2 * time.Second)
	for _, c := range draining {
		select {
		case <-c.tree:
		case <-deadline:
			return fmt.Errorf("seed %s: processes forked by child %s (process group %d) are still running and paging from it; kill them first", s.ID, c.ID, c.PID)
		}
	}
	e.mu.Lock()
	if e.seeds[s.ID] != s {
		e.mu.Unlock()
		return fmt.Errorf("seed %s is not known", s.ID)
	}
	delete(e.seeds, s.ID)
	e.mu.Unlock()
	s.closeCache()
	if s.SourcePID == 0 {
		return nil
	}
	return e.endFrozen(s)
}

// endFrozen kills s's frozen copy on the tracer thread and reaps it in its
// parent (the copy is the parent's clone).
func (e *Engine) endFrozen(s *Seed) error {
	return e.tracer.Do(func() error {
		if err := snapshot.Release(s.SourcePID); err != nil {
			return err
		}
		return snapshot.ReapInParent(s.ParentPID, s.SourcePID, s.Desc.VDSOSyscall)
	})
}

// Close kills every child and frozen copy the engine owns and stops its
// tracer thread.
func (e *Engine) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	for _, c := range e.children {
		_ = unix.Kill(-c.PID, unix.SIGKILL)
		_ = unix.Kill(c.PID, unix.SIGKILL)
	}
	seeds := make([]*Seed, 0, len(e.seeds))
	for _, s := range e.seeds {
		seeds = append(seeds, s)
	}
	e.seeds = map[string]*Seed{}
	e.mu.Unlock()
	// Frozen copies go first: a seed prepared from a child (multi-hop) has
	// its frozen copy in that child's process group, which the child's
	// reaper waits to see empty.
	var errs []error
	for _, s := range seeds {
		if s.SourcePID == 0 {
			continue
		}
		if err := e.endFrozen(s); err != nil {
			errs = append(errs, err)
		}
	}
	e.wg.Wait()
	// Caches last: the pagers of children still dying may be filling them.
	e.mu.Lock()
	seeds = append(seeds, e.released...)
	e.released = nil
	e.mu.Unlock()
	for _, s := range seeds {
		s.closeCache()
	}
	e.tracer.Close()
	for _, t := range e.restorers {
		t.Close()
	}
	e.stubFile.Close()
	e.devNull.Close()
	return errors.Join(errs...)
}
