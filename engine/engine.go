package engine

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
	"github.com/mitosis-fork/mitosis/internal/stub"
	"github.com/mitosis-fork/mitosis/pager"
	"github.com/mitosis-fork/mitosis/restore"
	"github.com/mitosis-fork/mitosis/snapshot"
)

// Options configure an Engine.
type Options struct {
	// StateDir is a directory the engine may use for scratch files.
	StateDir string
}

// Engine owns the tracer thread, every seed's frozen copy and every child's
// pager on this host.
type Engine struct {
	opts     Options
	tracer   *ptrace.Tracer
	stubFile *os.File
	stubPath string
	devNull  *os.File

	mu       sync.Mutex
	seeds    map[string]*Seed
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
		opts:     opts,
		tracer:   ptrace.NewTracer(),
		stubFile: f,
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

// Prepare snapshots the single-threaded process pid into a seed. The process
// keeps running (or stays stopped if it was stopped).
func (e *Engine) Prepare(pid int, opts PrepareOptions) (*Seed, error) {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil, errors.New("engine closed")
	}
	e.mu.Unlock()
	res, err := snapshot.Prepare(e.tracer, pid, snapshot.Options{ChannelFD: opts.ChannelFD})
	if err != nil {
		return nil, err
	}
	s := &Seed{
		ID: newID("s-"), Name: opts.Name, Desc: res.Desc, SourcePID: res.SourcePID,
		ParentPID: pid, Created: time.Now(), Took: res.Took,
	}
	s.Desc.SeedID, s.Desc.Name = s.ID, s.Name
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
	d := s.Desc
	src := pager.LocalSource{PID: s.SourcePID}
	var cache *pager.Cache
	if !opts.NoCache {
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
	res, err := restore.Restore(e.tracer, d, restore.Options{
		StubPath: e.stubPath,
		Cache:    cache,
		Stdio:    stdio,
		Channel:  opts.Channel,
		OnUFFD: func(pid, ufd int) error {
			c.PID = pid
			sp, err := pg.Attach(ufd)
			if err != nil {
				return err
			}
			if opts.Eager {
				return sp.PreloadAll()
			}
			return preloadHot(sp, d, pid)
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
	go e.reap(c, pg)
	return c, nil
}

// preloadHot installs the pages the child touches first, before it runs:
// the TCB (with the cached tid rewritten to the child's) and the stack page
// at rsp, so the kernel-side accesses at resume (rseq, signal frames) find
// them present.
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

type pagerStats struct{ p *pager.Pager }

func (p pagerStats) Stats() ChildStats {
	s := p.p.Stats()
	return ChildStats{Faults: s.Faults, PagesCopied: s.PagesCopied, PagesZero: s.PagesZero, PagesShared: s.PagesShared, Eager: s.Eager}
}

func (e *Engine) reap(c *Child, pg *pager.Pager) {
	defer e.wg.Done()
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(c.PID, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		break
	}
	c.status = syscall.WaitStatus(ws)
	close(c.done)
	// Processes the child forked (same process group) may outlive it and
	// still fault: keep serving them until the group is empty. Closing
	// their userfaultfds earlier would let them read missing memory as
	// zeros.
	for unix.Kill(-c.PID, 0) == nil {
		e.mu.Lock()
		closed := e.closed
		e.mu.Unlock()
		if closed {
			_ = unix.Kill(-c.PID, unix.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
	pg.Close()
	e.mu.Lock()
	delete(e.children, c.ID)
	e.mu.Unlock()
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
	return e.tracer.Do(func() error { return snapshot.Release(s.SourcePID) })
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
	e.wg.Wait()
	var errs []error
	for _, s := range seeds {
		s.closeCache()
		if err := e.tracer.Do(func() error { return snapshot.Release(s.SourcePID) }); err != nil {
			errs = append(errs, err)
		}
	}
	e.tracer.Close()
	e.stubFile.Close()
	e.devNull.Close()
	return errors.Join(errs...)
}
