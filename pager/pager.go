// Package pager serves a child's missing pages through userfaultfd.
//
// One Pager serves a child and every process the child forks: each mm has
// its own userfaultfd (the kernel hands the daemon a new one with
// UFFD_EVENT_FORK) and its own goroutine. Pages the parent never had are
// filled with UFFDIO_ZEROPAGE without touching the source; present pages are
// read from the Source in fault-around windows and installed with
// UFFDIO_COPY. REMAP, REMOVE and UNMAP events keep the pager's view of the
// address space in step with the child's, so moved memory keeps its
// contents and freed memory is never refilled with stale parent data.
package pager

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/uffd"
)

const pageSize = descriptor.PageSize

// Source reads page contents of a seed.
type Source interface {
	// ReadPages fills buf with the seed's memory at addr (page aligned,
	// len(buf) a multiple of the page size).
	ReadPages(addr uint64, buf []byte) error
}

// Config configures a Pager.
type Config struct {
	Desc   *descriptor.Descriptor
	Source Source
	// Window is the base fault-around window in pages (default 16). It
	// doubles on sequential faults up to MaxWindow.
	Window    int
	MaxWindow int
	// Cache, if set, backs every CacheBacked VMA: the child maps it and
	// pages are installed with UFFDIO_CONTINUE from the shared cache
	// instead of copied into each child.
	Cache *Cache
	// OnError is called once with the first error that stops a space
	// (e.g. the source is gone). The child cannot make progress after it.
	OnError func(error)
}

// Stats are paging counters.
type Stats struct {
	Faults      uint64
	PagesCopied uint64
	PagesZero   uint64
	PagesShared uint64 // mapped from the node's page cache
	// PagesFetched counts pages this child's faults brought into the
	// node's page cache from the seed's source (local frozen copy or
	// a remote node).
	PagesFetched uint64
	Eager        uint64
	// Spaces counts the address spaces served so far: the child's and
	// one per fork inside its tree; SpacesLive those still served (a
	// forked process's space ends once it has exited or exec'd).
	Spaces     uint64
	SpacesLive uint64
}

// Pager serves one child tree.
type Pager struct {
	cfg     Config
	present []descriptor.Run

	faults, copied, zeroed, shared, fetched, eager, spacesN atomic.Uint64

	mu     sync.Mutex
	spaces map[*space]struct{}
	closed bool
	// wakeFD is an eventfd (made with the first forked space, -1 before)
	// that Close signals to wake the spaces blocked in poll(2).
	wakeFD  int
	wg      sync.WaitGroup
	errOnce sync.Once
	err     error
}

// New creates a pager for children of cfg.Desc.
func New(cfg Config) *Pager {
	if cfg.Window <= 0 {
		cfg.Window = 16
	}
	if cfg.MaxWindow < cfg.Window {
		cfg.MaxWindow = max(256, cfg.Window)
	}
	return &Pager{cfg: cfg, present: cfg.Desc.Present, spaces: map[*space]struct{}{}, wakeFD: -1}
}

// Stats returns the counters of all spaces.
func (p *Pager) Stats() Stats {
	p.mu.Lock()
	live := uint64(len(p.spaces))
	p.mu.Unlock()
	return Stats{Faults: p.faults.Load(), PagesCopied: p.copied.Load(), PagesZero: p.zeroed.Load(),
		PagesShared: p.shared.Load(), PagesFetched: p.fetched.Load(), Eager: p.eager.Load(), Spaces: p.spacesN.Load(),
		SpacesLive: live}
}

// Err returns the error that stopped a space, if any.
func (p *Pager) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

func (p *Pager) fail(err error) {
	p.errOnce.Do(func() {
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		if p.cfg.OnError != nil {
			p.cfg.OnError(err)
		}
	})
}

// region maps a child address range to the source; zero regions read as
// zero whatever the source holds.
type region struct {
	start, end, src uint64
	zero            bool
	image           bool // backed by the Cache (map with CONTINUE)
}

type space struct {
	p       *Pager
	fd      int
	f       *os.File
	mu      sync.Mutex
	regions []region
	served  map[uint64]uint64 // bitset of installed pages, by page>>6
	buf     []byte
	retry   []uint64
	streams [maxStreams]stream
	tick    uint64
	// touched holds the seed addresses of the data pages this space's
	// faults installed (fault-around windows included), for Touched, once
	// RecordTouched asked for it (recording is off for other children).
	touched     []descriptor.Run
	recordTouch bool
	closed      atomic.Bool // set by Pager.Close before it closes f
	// blocking spaces wait for messages in poll(2) on their own thread,
	// not in Go's netpoller: a forked space's process (a multi-hop seed's
	// frozen copy) mostly faults inside the daemon's own process_vm_readv,
	// and Go noticed those messages only at its 10 ms background poll
	// (measured: the first child of a stage seed took 1.4 s instead of
	// 0.14 s). Root spaces, one per child, stay on the netpoller.
	blocking bool
}

// stream is one run of faults walking through memory: a numpy ufunc over two
// arrays faults on both in turn, so the pager follows several at once (as
// the kernel's readahead keeps per-file state) instead of restarting the
// window whenever faults alternate between them.
type stream struct {
	start, end uint64 // the window served last
	dir        int    // 1 walking up, -1 down, 0 not yet known
	window     int    // pages
	used       uint64 // s.tick when last extended (for replacement)
}

// maxStreams is how many fault streams a space follows at once.
const maxStreams = 8

// Attach starts serving the userfaultfd ufd (API done, ranges registered)
// of the root child. The pager owns ufd afterwards.
func (p *Pager) Attach(ufd int) (*Space, error) {
	s := &space{p: p, fd: ufd, served: map[uint64]uint64{}}
	for _, v := range p.cfg.Desc.VMAs {
		if v.Kind == descriptor.KindAnon || v.Kind == descriptor.KindFileDirty {
			img := p.cfg.Cache != nil && CacheBacked(v)
			s.regions = append(s.regions, region{start: v.Start, end: v.End, src: v.Start, image: img})
		}
	}
	if err := p.start(s); err != nil {
		return nil, err
	}
	return &Space{s}, nil
}

func (p *Pager) start(s *space) error {
	if err := unix.SetNonblock(s.fd, true); err != nil {
		unix.Close(s.fd)
		return fmt.Errorf("uffd nonblock: %w", err)
	}
	s.f = os.NewFile(uintptr(s.fd), "userfaultfd")
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		s.f.Close()
		return errors.New("pager closed")
	}
	if s.blocking && p.wakeFD < 0 {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			s.blocking = false // serve it through the netpoller
		} else {
			p.wakeFD = fd
		}
	}
	p.spaces[s] = struct{}{}
	p.wg.Add(1)
	p.mu.Unlock()
	p.spacesN.Add(1)
	go s.serve()
	return nil
}

// Close stops every space and closes their userfaultfds. Processes still
// using them then get zero pages for missing memory, so Close only after
// the child tree has exited (or been killed).
func (p *Pager) Close() {
	p.mu.Lock()
	p.closed = true
	files := make([]*os.File, 0, len(p.spaces))
	for s := range p.spaces {
		s.closed.Store(true)
		files = append(files, s.f)
	}
	wake := p.wakeFD
	p.mu.Unlock()
	// Wake the blocking spaces first: closing a file waits until nothing
	// uses it, and a blocking space's poll(2) does. The eventfd is never
	// drained, so a space that polls after this returns at once.
	if wake >= 0 {
		var one [8]byte
		one[0] = 1
		_, _ = unix.Write(wake, one[:])
	}
	for _, f := range files {
		f.Close()
	}
	p.wg.Wait()
	if wake >= 0 {
		unix.Close(wake)
	}
}

// Space is the root child's address space, for eager loading.
type Space struct{ s *space }

// Preload installs pages [addr, addr+n pages) now, before the child runs.
// patch, if non-nil, may modify each chunk before it is installed.
func (sp *Space) Preload(addr uint64, n int, patch func(addr uint64, b []byte)) error {
	s := sp.s
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.preload(addr, n, patch, false)
}

// PreloadAll installs every present page of the seed (eager mode: the
// checkpoint/restore baseline).
func (sp *Space) PreloadAll() error {
	s := sp.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.p.present {
		for a := r.Start; a < r.End; {
			n := int(min((r.End-a)/pageSize, 256))
			if err := s.preload(a, n, nil, true); err != nil {
				return err
			}
			a += uint64(n) * pageSize
		}
	}
	return nil
}

// maxTouched bounds the runs a space keeps for Touched (16 bytes each): a
// child faulting more scattered windows than this records only the first.
const maxTouched = 1 << 16

// touch records that a fault installed the n data pages at seed address
// src. Precondition: s.mu held.
func (s *space) touch(src uint64, n int) {
	if k := len(s.touched); k > 0 && s.touched[k-1].End == src {
		s.touched[k-1].End += uint64(n) * pageSize
		return
	}
	if len(s.touched) >= maxTouched {
		if s.touched = descriptor.MergeRuns(s.touched); len(s.touched) >= maxTouched {
			return
		}
	}
	s.touched = append(s.touched, descriptor.Run{Start: src, End: src + uint64(n)*pageSize})
}

// RecordTouched makes the space record what its faults bring in, for
// Touched. Call it before the child runs.
func (sp *Space) RecordTouched() {
	s := sp.s
	s.mu.Lock()
	s.recordTouch = true
	s.mu.Unlock()
}

// Touched returns the runs of seed memory (seed addresses, merged) whose
// data this child's faults brought in, fault-around windows included: what
// it read or wrote beyond the pages preloaded before it ran. A child forked
// without a prefetch shows what it needs (its working set), which a
// prefetching child's page tables cannot tell apart from what it was given.
func (sp *Space) Touched() []descriptor.Run {
	s := sp.s
	s.mu.Lock()
	defer s.mu.Unlock()
	return descriptor.MergeRuns(slices.Clone(s.touched))
}

// LazyRuns returns the child addresses whose pages may hold the seed's data
// though the child's page tables do not map them: every page the pager
// would fill from the source, whether it has installed it already or not
// (an installed clean page of the node's cache can be reclaimed from the
// page tables). Pages that read as zero (never present in the seed, or
// freed by the child) are not in it. Prepare of the child itself as a
// seed (multi-hop) uses it to mark present only pages that are: the rest
// of its lazily paged memory is zero, and its own children need not fetch
// it across the network.
//
// Precondition: the child is stopped. LazyRuns first waits until every
// event the child raised (an mremap, an madvise) has been handled, so the
// answer is the child's layout as it stopped; ok is false if that did not
// happen within a second (the caller must then take every page as
// possibly holding data).
func (sp *Space) LazyRuns() (runs []descriptor.Run, ok bool) {
	s := sp.s
	for start := time.Now(); ; {
		s.mu.Lock()
		if s.quiet() {
			break
		}
		s.mu.Unlock()
		if time.Since(start) > time.Second {
			return nil, false
		}
		time.Sleep(50 * time.Microsecond)
	}
	defer s.mu.Unlock()
	present := s.p.present
	out := []descriptor.Run{}
	for _, r := range s.regions {
		if r.zero {
			continue
		}
		n := r.end - r.start
		k := sort.Search(len(present), func(k int) bool { return present[k].End > r.src })
		for ; k < len(present) && present[k].Start < r.src+n; k++ {
			a := max(present[k].Start, r.src) - r.src + r.start
			b := min(present[k].End, r.src+n) - r.src + r.start
			if m := len(out); m > 0 && out[m-1].End == a {
				out[m-1].End = b
			} else {
				out = append(out, descriptor.Run{Start: a, End: b})
			}
		}
	}
	return out, true
}

func (s *space) preload(addr uint64, n int, patch func(uint64, []byte), copyAll bool) error {
	addr &^= pageSize - 1
	for i := 0; i < n; {
		a := addr + uint64(i)*pageSize
		if s.isServed(a) || s.find(a) < 0 {
			// Installed already, or not lazily paged memory.
			i++
			continue
		}
		j := i + 1
		for j < n && j-i < 256 && !s.isServed(addr+uint64(j)*pageSize) {
			j++
		}
		zero, _, hi := s.bounds(a)
		cnt := min(j-i, int((hi-a)/pageSize))
		switch {
		case zero && patch == nil:
			if _, err := s.zero(a, cnt); err != nil {
				return err
			}
		case zero:
			b := s.buffer(cnt)
			clear(b)
			patch(a, b)
			if _, err := s.copy(a, b, &s.p.copied); err != nil {
				return err
			}
		case s.isImage(a) && patch == nil && !copyAll:
			if err := s.mapShared(a, cnt); err != nil {
				return err
			}
		default:
			b := s.buffer(cnt)
			if err := s.read(a, b); err != nil {
				return err
			}
			if patch != nil {
				patch(a, b)
			}
			if _, err := s.copy(a, b, &s.p.copied); err != nil {
				return err
			}
		}
		s.p.eager.Add(uint64(cnt))
		i += cnt
	}
	return nil
}

func (s *space) buffer(n int) []byte {
	if len(s.buf) < n*pageSize {
		s.buf = make([]byte, max(n, 16)*pageSize)
	}
	return s.buf[:n*pageSize]
}

func (s *space) isImage(a uint64) bool {
	i := s.find(a)
	return i >= 0 && s.regions[i].image
}

// mapShared fills the cache for n source-present pages at a (one region)
// and maps them into the child from the page cache.
func (s *space) mapShared(a uint64, n int) error {
	f, err := s.p.cfg.Cache.Ensure(s.srcOf(a), n)
	s.p.fetched.Add(uint64(f))
	if err != nil {
		return fmt.Errorf("page source: %w", err)
	}
	done := 0
	for done < n {
		m, err := uffd.Continue(s.fd, a+uint64(done)*pageSize, uint64(n-done)*pageSize)
		if m > 0 {
			s.setServed(a+uint64(done)*pageSize, int(m)/pageSize, true)
			s.p.shared.Add(uint64(m) / pageSize)
			done += int(m) / pageSize
		}
		if err == nil {
			if m <= 0 {
				return fmt.Errorf("uffd continue at %#x: no progress", a)
			}
			continue
		}
		if errors.Is(err, unix.EEXIST) {
			s.present(a + uint64(done)*pageSize)
			done++
			continue
		}
		return err
	}
	return nil
}

// read fills b with the seed's pages for the child address a: from the
// node's page cache when it backs them (filling it first), so a private
// copy (a patched TCB, eager mode) costs no trip to a remote source once
// the node holds the page; else straight from the source.
func (s *space) read(a uint64, b []byte) error {
	src := s.srcOf(a)
	if c := s.p.cfg.Cache; c != nil && s.isImage(a) {
		f, err := c.ReadAt(src, b)
		s.p.fetched.Add(uint64(f))
		return err
	}
	return s.p.cfg.Source.ReadPages(src, b)
}

// present records that the page at a is already mapped in the child (an
// install met EEXIST) and wakes the threads waiting on it. The wake is not
// redundant: with several threads, one can fault on a page while another
// thread's write copies it on write (the PTE is cleared and set again under
// the PTE lock, but the fault path reads it without the lock). The late
// fault finds no PTE, queues a message and sleeps; when the copy's PTE is
// in place our install meets EEXIST, which wakes no one, so the thread would
// sleep forever.
func (s *space) present(a uint64) {
	s.setServed(a, 1, true)
	_ = uffd.Wake(s.fd, a, pageSize)
}

func (s *space) isServed(a uint64) bool {
	pg := a / pageSize
	return s.served[pg>>6]&(1<<(pg&63)) != 0
}

func (s *space) setServed(a uint64, n int, v bool) {
	pg := a / pageSize
	for i := 0; i < n; i++ {
		w, bit := (pg+uint64(i))>>6, uint64(1)<<((pg+uint64(i))&63)
		if v {
			s.served[w] |= bit
		} else if s.served[w]&bit != 0 {
			s.served[w] &^= bit
			if s.served[w] == 0 {
				delete(s.served, w)
			}
		}
	}
}

// find returns the region containing a, or -1.
func (s *space) find(a uint64) int {
	i := sort.Search(len(s.regions), func(i int) bool { return s.regions[i].end > a })
	if i < len(s.regions) && s.regions[i].start <= a {
		return i
	}
	return -1
}

func (s *space) srcOf(a uint64) uint64 {
	i := s.find(a)
	r := s.regions[i]
	return r.src + (a - r.start)
}

// copy installs b at a, counting the pages in ctr.
func (s *space) copy(a uint64, b []byte, ctr *atomic.Uint64) (int, error) {
	done := 0
	for done < len(b) {
		n, err := uffd.Copy(s.fd, a+uint64(done), unsafe.Pointer(&b[done]), uint64(len(b)-done), 0)
		if n > 0 {
			s.setServed(a+uint64(done), int(n)/pageSize, true)
			ctr.Add(uint64(n) / pageSize)
			done += int(n)
		}
		if err == nil {
			if n <= 0 {
				return done, fmt.Errorf("uffd copy at %#x: no progress", a+uint64(done))
			}
			continue
		}
		if errors.Is(err, unix.EEXIST) {
			s.present(a + uint64(done))
			done += pageSize
			continue
		}
		return done, err
	}
	return done, nil
}

func (s *space) zero(a uint64, n int) (int, error) {
	done := 0
	for done < n {
		z, err := uffd.ZeroPage(s.fd, a+uint64(done)*pageSize, uint64(n-done)*pageSize, 0)
		if z > 0 {
			s.setServed(a+uint64(done)*pageSize, int(z)/pageSize, true)
			s.p.zeroed.Add(uint64(z) / pageSize)
			done += int(z) / pageSize
		}
		if err == nil {
			if z <= 0 {
				return done, fmt.Errorf("uffd zeropage at %#x: no progress", a)
			}
			continue
		}
		if errors.Is(err, unix.EEXIST) {
			s.present(a + uint64(done)*pageSize)
			done++
			continue
		}
		return done, err
	}
	return done, nil
}

func (s *space) serve() {
	defer s.p.wg.Done()
	defer func() {
		s.p.mu.Lock()
		delete(s.p.spaces, s)
		s.p.mu.Unlock()
	}()
	stop := func(err error) {
		s.p.fail(err)
		s.f.Close()
	}
	rc, err := s.f.SyscallConn()
	if err != nil {
		stop(fmt.Errorf("userfaultfd: %w", err))
		return
	}
	raw := make([]byte, 64*uffd.MsgSize)
	if s.blocking {
		// Not runtime.LockOSThread to end the thread with the space: a
		// thread that exits takes with it the processes the daemon
		// started from it with Pdeathsig (function runtimes), and this
		// goroutine may run on any thread. The probe in serveBlocking
		// keeps the threads parked in ppoll(2) to the spaces of
		// processes alive or just ended.
		s.serveBlocking(rc, raw, stop)
		return
	}
	deadline, waitRetry := false, false
	for {
		// A fault that met EAGAIN waits for a non-cooperative event
		// (REMOVE, REMAP, ...) to complete, which can happen after its
		// message was read (the task that madvised or mremapped has to
		// run again first) with no further message to wake this loop:
		// poll for the retry instead of blocking in read.
		if waitRetry {
			_ = s.f.SetReadDeadline(time.Now().Add(retryPoll))
			deadline = true
		} else if deadline {
			_ = s.f.SetReadDeadline(time.Time{})
			deadline = false
		}
		var herr error
		// Messages are read and handled in one step under s.mu: whoever
		// holds s.mu and finds the userfaultfd empty knows that every
		// event the child has raised is in s's state (Space.LazyRuns).
		err := rc.Read(func(fd uintptr) bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			n, rerr := unix.Read(int(fd), raw)
			switch {
			case rerr == unix.EAGAIN || rerr == unix.EINTR:
				return false // wait until readable (or the deadline)
			case rerr != nil:
				herr = fmt.Errorf("read userfaultfd: %w", rerr)
				return true
			}
			herr = s.handleAll(raw[:n])
			waitRetry = len(s.retry) > 0
			return true
		})
		if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			s.mu.Lock()
			herr = s.handleAll(nil)
			waitRetry = len(s.retry) > 0
			s.mu.Unlock()
			err = nil
		}
		if s.ended(err, herr, stop) {
			return
		}
	}
}

// serveBlocking is serve for a blocking space: it waits in ppoll(2) for a
// message (or Pager.Close's wake-up, or the retry poll) and reads and
// handles what is there under s.mu. A forked process's userfaultfd does not
// signal that process's end (exit, or exec, which drops the address space
// the fork made): after every quiet wait the loop asks the kernel
// (uffd.Alive) and ends the space once the address space is gone, so a
// child that forks again and again does not leave the daemon a thread and a
// descriptor per fork until the child itself ends. The wait starts at
// livePollMin, for the many forks that exec or exit at once, and doubles up
// to livePollMax for long-lived ones (a multi-hop seed's frozen copy).
func (s *space) serveBlocking(rc syscall.RawConn, raw []byte, stop func(error)) {
	retryTS := unix.NsecToTimespec(retryPoll.Nanoseconds())
	live := livePollMin
	probe := uint64(1 << 32) // any page-aligned user address will do
	if len(s.regions) > 0 {
		probe = s.regions[0].start
	}
	for {
		var herr error
		gone := false
		cerr := rc.Control(func(fd uintptr) {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(s.p.wakeFD), Events: unix.POLLIN}}
			liveTS := unix.NsecToTimespec(live.Nanoseconds())
			ts := &liveTS
			s.mu.Lock()
			if len(s.retry) > 0 {
				ts = &retryTS
			}
			s.mu.Unlock()
			n, err := unix.Ppoll(fds, ts, nil)
			if err != nil && err != unix.EINTR {
				herr = fmt.Errorf("poll userfaultfd: %w", err)
				return
			}
			if s.closed.Load() {
				return
			}
			s.mu.Lock()
			defer s.mu.Unlock()
			if n == 0 && ts == &liveTS {
				if !uffd.Alive(int(fd), probe) {
					gone = true
					return
				}
				live = min(2*live, livePollMax)
			}
			n, rerr := unix.Read(int(fd), raw)
			switch {
			case rerr == unix.EAGAIN || rerr == unix.EINTR:
				n = 0 // a retry poll, or a spurious wake-up
			case rerr != nil:
				herr = fmt.Errorf("read userfaultfd: %w", rerr)
				return
			}
			herr = s.handleAll(raw[:max(n, 0)])
		})
		if gone {
			s.f.Close()
			return
		}
		if s.ended(cerr, herr, stop) {
			return
		}
	}
}

// ended reports whether a serve loop must end after a wait that returned err
// and a round of handling that returned herr, stopping the space on an error
// (not after Pager.Close, which ends it quietly).
func (s *space) ended(err, herr error, stop func(error)) bool {
	switch {
	case s.closed.Load() || (err != nil && errors.Is(err, os.ErrClosed)):
		return true
	case err != nil:
		stop(fmt.Errorf("userfaultfd: %w", err))
		return true
	case herr != nil:
		stop(herr)
		return true
	}
	return false
}

// handleAll handles the messages in raw, then retries the faults that met
// EAGAIN before. Precondition: s.mu held.
func (s *space) handleAll(raw []byte) error {
	for off := 0; off+uffd.MsgSize <= len(raw); off += uffd.MsgSize {
		m, err := uffd.ParseMsg(raw[off : off+uffd.MsgSize])
		if err != nil {
			continue
		}
		if err := s.handle(m); err != nil {
			return err
		}
	}
	if len(s.retry) > 0 {
		pending := s.retry
		s.retry = nil
		for _, a := range pending {
			if err := s.fault(a, false); err != nil {
				return err
			}
		}
	}
	return nil
}

// quiet reports whether the child's userfaultfd holds no unread message.
// Messages are read only under s.mu (serve), so with s.mu held a quiet
// space has handled every event the child raised. Precondition: s.mu held.
func (s *space) quiet() bool {
	rc, err := s.f.SyscallConn()
	if err != nil {
		return false
	}
	ready := true
	if err := rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, perr := unix.Poll(fds, 0)
		ready = perr != nil || n > 0
	}); err != nil {
		return false
	}
	return !ready
}

func (s *space) handle(m uffd.Msg) error {
	if debugFaults && m.Event != uffd.EventPagefault {
		println("event", s.fd, m.Event, m.Start, m.End, m.From, m.To)
	}
	switch m.Event {
	case uffd.EventPagefault:
		s.p.faults.Add(1)
		return s.fault(m.Address&^(pageSize-1), m.Flags&uffd.PagefaultFlagWrite != 0)
	case uffd.EventFork:
		c := &space{p: s.p, fd: m.ForkUFD, served: make(map[uint64]uint64, len(s.served)), blocking: true}
		c.regions = append([]region(nil), s.regions...)
		for k, v := range s.served {
			c.served[k] = v
		}
		return s.p.start(c)
	case uffd.EventRemap:
		s.remap(m.From, m.To, m.Len)
	case uffd.EventRemove, uffd.EventUnmap:
		s.zeroRange(m.Start, m.End)
	}
	return nil
}

// bounds returns whether page a reads as zero and the widest range
// [lo, hi) around a whose pages all share that answer and one source
// mapping (bounded by regions and by the source's present runs).
func (s *space) bounds(a uint64) (zero bool, lo, hi uint64) {
	i := s.find(a)
	if i < 0 {
		lo, hi = 0, uint64(1)<<47
		j := sort.Search(len(s.regions), func(j int) bool { return s.regions[j].start > a })
		if j < len(s.regions) {
			hi = s.regions[j].start
		}
		if j > 0 {
			lo = s.regions[j-1].end
		}
		return true, lo, hi
	}
	r := s.regions[i]
	lo, hi = r.start, r.end
	if r.zero {
		return true, lo, hi
	}
	src := r.src + (a - r.start)
	toChild := func(x uint64) uint64 { return x - r.src + r.start }
	runs := s.p.present
	k := sort.Search(len(runs), func(k int) bool { return runs[k].End > src })
	if k < len(runs) && runs[k].Start <= src {
		if runs[k].Start > r.src {
			lo = max(lo, toChild(runs[k].Start))
		}
		hi = min(hi, toChild(max(runs[k].End, r.src)))
		return false, lo, hi
	}
	if k < len(runs) && runs[k].Start < r.src+(r.end-r.start) {
		hi = min(hi, toChild(runs[k].Start))
	}
	if k > 0 && runs[k-1].End > r.src {
		lo = max(lo, toChild(runs[k-1].End))
	}
	return true, lo, hi
}

// stream returns the stream the fault at a continues (and its direction and
// next window), or the least recently used one to restart at a.
func (s *space) stream(a uint64) (st *stream, dir int, w uint64) {
	s.tick++
	maxW := uint64(s.p.cfg.MaxWindow)
	for i := range s.streams {
		st := &s.streams[i]
		if st.window == 0 {
			continue
		}
		switch {
		case a == st.end && st.dir >= 0:
			return st, 1, min(uint64(st.window)*2, maxW)
		case a+pageSize == st.start && st.dir <= 0:
			return st, -1, min(uint64(st.window)*2, maxW)
		}
	}
	st = &s.streams[0]
	for i := range s.streams {
		if s.streams[i].used < st.used {
			st = &s.streams[i]
		}
	}
	return st, 0, uint64(s.p.cfg.Window)
}

// window returns the fault-around window of w pages for a fault at a: after
// a walking up (dir 1), before it walking down (dir -1), else the aligned
// block holding a.
func window(a uint64, dir int, w uint64) (start, end uint64) {
	switch dir {
	case 1:
		return a, a + w*pageSize
	case -1:
		return a + pageSize - min(w*pageSize, a), a + pageSize
	}
	start = a &^ (w*pageSize - 1)
	return start, start + w*pageSize
}

// fault serves the page at a together with a fault-around window: forward
// after a when it continues a stream of faults walking up, backward when
// one walks down (the window doubles on each step of a streak), otherwise
// the aligned block holding a. write is a write fault.
func (s *space) fault(a uint64, write bool) error {
	st, dir, w := s.stream(a)
	ws, we := window(a, dir, w)
	zero, lo, hi := s.bounds(a)
	ws, we = max(ws, lo), min(we, hi)
	// Keep to the unserved pages contiguous with a.
	start, end := a, a+pageSize
	for start > ws && !s.isServed(start-pageSize) {
		start -= pageSize
	}
	for end < we && !s.isServed(end) {
		end += pageSize
	}
	if zero && write && end-start > zeroCopyPages*pageSize {
		if dir < 0 {
			start = end - zeroCopyPages*pageSize
		} else {
			start = max(start, a)
			end = start + zeroCopyPages*pageSize
		}
	}
	n := int((end - start) / pageSize)
	err := s.install(start, n, zero, write)
	if n > 1 && (errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EFAULT)) {
		// The window ran past the VMA (the pager's regions do not see
		// every VMA boundary, e.g. after mremap grew or shrank one):
		// serve the faulting page alone.
		start, end, n = a, a+pageSize, 1
		err = s.install(a, 1, zero, write)
	}
	*st = stream{start: start, end: end, dir: dir, window: int(w), used: s.tick}
	if err == nil && !zero && s.recordTouch {
		s.touch(s.srcOf(start), n)
	}
	if debugFaults {
		es := "ok"
		if err != nil {
			es = err.Error()
		}
		println("fault", s.fd, a, start, n, zero, dir, es)
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EAGAIN):
		// The mm is changing (an event is queued): retry after it.
		s.retry = append(s.retry, a)
		return nil
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.EFAULT), errors.Is(err, unix.ESRCH):
		// The range is gone (unmapped, or the process exited).
		_ = uffd.Wake(s.fd, a, pageSize)
		return nil
	}
	return fmt.Errorf("serve fault at %#x: %w", a, err)
}

// install serves n pages at start: zero pages, pages mapped from the cache,
// or pages copied from the source. Memory that reads as zero is installed
// as fresh zeroed pages for a write fault (the child is about to write
// them: memory it allocates anew in a heap the seed had freed), and as the
// shared zero page for a read.
func (s *space) install(start uint64, n int, zero, write bool) error {
	switch {
	case zero && write:
		_, err := s.copy(start, zeroPages[:n*pageSize], &s.p.zeroed)
		return err
	case zero:
		_, err := s.zero(start, n)
		return err
	case s.isImage(start):
		return s.mapShared(start, n)
	default:
		b := s.buffer(n)
		if err := s.p.cfg.Source.ReadPages(s.srcOf(start), b); err != nil {
			return fmt.Errorf("page source: %w", err)
		}
		_, err := s.copy(start, b, &s.p.copied)
		return err
	}
}

// split ensures a region boundary at a.
func (s *space) split(a uint64) {
	i := s.find(a)
	if i < 0 || s.regions[i].start == a {
		return
	}
	r := s.regions[i]
	left := region{start: r.start, end: a, src: r.src, zero: r.zero, image: r.image}
	right := region{start: a, end: r.end, src: r.src + (a - r.start), zero: r.zero, image: r.image}
	s.regions = append(s.regions[:i+1], s.regions[i:]...)
	s.regions[i], s.regions[i+1] = left, right
}

// cut removes [start,end) from the regions and returns the removed pieces.
func (s *space) cut(start, end uint64) []region {
	s.split(start)
	s.split(end)
	var out, keep []region
	for _, r := range s.regions {
		if r.start >= start && r.end <= end {
			out = append(out, r)
		} else {
			keep = append(keep, r)
		}
	}
	s.regions = keep
	return out
}

func (s *space) insert(rs []region) {
	s.regions = append(s.regions, rs...)
	sort.Slice(s.regions, func(i, j int) bool { return s.regions[i].start < s.regions[j].start })
}

func (s *space) zeroRange(start, end uint64) {
	if start >= end {
		return
	}
	s.cut(start, end)
	s.insert([]region{{start: start, end: end, zero: true}})
	s.setServed(start, int((end-start)/pageSize), false)
}

func (s *space) remap(from, to, length uint64) {
	moved := s.cut(from, from+length)
	s.cut(to, to+length)
	for i := range moved {
		moved[i].start = moved[i].start - from + to
		moved[i].end = moved[i].end - from + to
	}
	s.insert(moved)
	// Move the installed-page bits along with the pages.
	n := int(length / pageSize)
	bits := make([]bool, n)
	for i := 0; i < n; i++ {
		bits[i] = s.isServed(from + uint64(i)*pageSize)
	}
	s.setServed(from, n, false)
	s.setServed(to, n, false)
	for i, b := range bits {
		if b {
			s.setServed(to+uint64(i)*pageSize, 1, true)
		}
	}
}

var debugFaults = os.Getenv("MITOSIS_DEBUG_FAULTS") != ""

// zeroCopyPages bounds the window of zeroed pages a write fault installs:
// each is a page of memory (the zero page is not), so a child that writes
// one page of a large freed range does not get megabytes it never uses.
const zeroCopyPages = 256

// zeroPages is the source of zeroed pages (UFFDIO_COPY reads it; it is
// never written).
var zeroPages = make([]byte, zeroCopyPages*pageSize)

// retryPoll is how long the fault loop waits for new messages before it
// retries faults that met EAGAIN.
const retryPoll = 50 * time.Microsecond

// livePollMin and livePollMax bound how long a forked space waits quietly
// before it checks that its process's address space still exists
// (serveBlocking).
const (
	livePollMin = 5 * time.Millisecond
	livePollMax = time.Second
)
