package pager

import (
	"bytes"
	"cmp"
	"errors"
	"os"
	"reflect"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
	"github.com/mitosis-fork/mitosis/internal/uffd"
)

// engineFeatures mirrors restore.UFFDFeatures (restore imports pager, so
// the test cannot import it).
const engineFeatures = uffd.FeatureEventFork | uffd.FeatureEventRemap | uffd.FeatureEventRemove | uffd.FeatureEventUnmap | uffd.FeatureMinorShmem

// area is a 64 KiB aligned range of this process's address space reserved
// for a test; cleanup unmaps the whole reservation.
type area struct {
	base uint64
	size uint64
}

func reserve(t *testing.T, pages int) area {
	t.Helper()
	const align = 64 << 10
	size := uint64(pages)*pageSize + align
	r, _, e := unix.Syscall6(unix.SYS_MMAP, 0, uintptr(size), unix.PROT_NONE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE, ^uintptr(0), 0)
	if e != 0 {
		t.Fatalf("reserve: %v", e)
	}
	t.Cleanup(func() { _, _, _ = unix.Syscall(unix.SYS_MUNMAP, r, uintptr(size), 0) })
	return area{base: (uint64(r) + align - 1) &^ (align - 1), size: uint64(pages) * pageSize}
}

func mmapFixed(t *testing.T, addr, size uint64, flags int, fd int, off uint64) {
	t.Helper()
	r, _, e := unix.Syscall6(unix.SYS_MMAP, uintptr(addr), uintptr(size), unix.PROT_READ|unix.PROT_WRITE,
		uintptr(flags|unix.MAP_FIXED), uintptr(fd), uintptr(off))
	if e != 0 || uint64(r) != addr {
		t.Fatalf("mmap %#x: %#x %v", addr, r, e)
	}
}

// newUFFD creates a userfaultfd of this process with the engine's features
// and registers [addr, addr+size) in mode.
func newUFFD(t *testing.T, addr, size, mode uint64) int {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (userfaultfd for kernel-mode faults)")
	}
	fd, err := uffd.New(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOSYS) {
		t.Skipf("userfaultfd unavailable: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := uffd.API(fd, engineFeatures); err != nil {
		unix.Close(fd)
		t.Skipf("userfaultfd features: %v", err)
	}
	if _, err := uffd.Register(fd, addr, size, mode); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	return fd
}

// kread reads our own memory from the kernel side (process_vm_readv), so a
// userfault blocks a thread in a system call, not one running Go code. It
// fails the test if the pager does not serve the fault in time.
func kread(t *testing.T, p *Pager, addr uint64, n int) []byte {
	t.Helper()
	buf := make([]byte, n)
	done := make(chan error, 1)
	go func() { done <- ptrace.ReadMem(os.Getpid(), addr, buf) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("read %#x: %v", addr, err)
		}
	case <-time.After(5 * time.Second):
		p.Close() // releases the blocked fault
		<-done
		t.Fatalf("read of %#x not served in 5s (pager error %v)", addr, p.Err())
	}
	return buf
}

// settled waits (up to 2 s) until ok holds for the pager's counters and
// returns them: a faulting thread is woken by the ioctl that installs its
// page, before the pager adds the pages to its counters.
func settled(p *Pager, ok func(Stats) bool) Stats {
	deadline := time.Now().Add(2 * time.Second)
	for {
		st := p.Stats()
		if ok(st) || time.Now().After(deadline) {
			return st
		}
		time.Sleep(time.Millisecond)
	}
}

func startPager(t *testing.T, cfg Config, ufd int) (*Pager, *Space) {
	t.Helper()
	cfg.OnError = func(err error) { t.Errorf("pager OnError: %v", err) }
	p := New(cfg)
	sp, err := p.Attach(ufd)
	if err != nil {
		t.Fatal(err)
	}
	// Runs before the unmap cleanups registered earlier: with the uffd
	// closed the unmaps raise no events.
	t.Cleanup(p.Close)
	return p, sp
}

// TestPagerCacheFaults serves a private mapping of the page cache memfd
// through MINOR and MISSING faults of this process.
func TestPagerCacheFaults(t *testing.T) {
	a := reserve(t, 8)
	base := a.base
	d := &descriptor.Descriptor{
		SeedID: "pagertest",
		VMAs:   []descriptor.VMA{{Start: base, End: base + 8*P, Prot: unix.PROT_READ | unix.PROT_WRITE, Kind: descriptor.KindAnon}},
		// Pages 0-3 and 6 present; 4, 5 and 7 never were.
		Present: []descriptor.Run{{Start: base, End: base + 4*P}, {Start: base + 6*P, End: base + 7*P}},
	}
	src := &fakeSource{}
	c, err := NewCache(d, src)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	off, ok := c.Offset(base)
	if !ok || off != 0 {
		t.Fatalf("Offset(base) = %#x %v", off, ok)
	}
	cfd, err := unix.Open(c.Path(), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mmapFixed(t, base, 8*P, unix.MAP_PRIVATE|unix.MAP_NORESERVE, cfd, off)
	unix.Close(cfd)
	ufd := newUFFD(t, base, 8*P, uffd.RegisterModeMissing|uffd.RegisterModeMinor)
	p, sp := startPager(t, Config{Desc: d, Source: src, Cache: c}, ufd)
	sp.RecordTouched()

	// A present page: the aligned window is clipped to the run (0-3).
	got := kread(t, p, base+P, P)
	if !bytes.Equal(got, pattern(base+P, P)) {
		t.Fatalf("page 1 does not hold the source's bytes")
	}
	st := settled(p, func(st Stats) bool { return st.PagesShared >= 4 })
	if st.Faults != 1 || st.PagesShared != 4 || st.PagesFetched != 4 || st.PagesCopied != 0 || st.PagesZero != 0 || st.Spaces != 1 {
		t.Errorf("stats after one fault %+v, want 1 fault, 4 shared and fetched, 1 space", st)
	}
	if f := c.Filled(); len(f) != 1 || f[0] != (descriptor.Run{Start: base, End: base + 4*P}) {
		t.Errorf("cache filled %+v, want pages 0-3", f)
	}
	if calls := src.reset(); len(calls) != 1 || calls[0] != (readCall{base, 4 * P}) {
		t.Errorf("source reads %+v, want one of 4 pages at base", calls)
	}
	// Pages 0-3 were installed by that fault: no new faults.
	got = kread(t, p, base, 4*P)
	if !bytes.Equal(got, pattern(base, 4*P)) {
		t.Errorf("pages 0-3 wrong")
	}
	if st := p.Stats(); st.Faults != 1 {
		t.Errorf("reading installed pages faulted: %+v", st)
	}

	// Never-present pages read as zero without touching the source.
	got = kread(t, p, base+5*P, P)
	if !bytes.Equal(got, make([]byte, P)) {
		t.Errorf("page 5 (not present in the source) is not zero")
	}
	if st := settled(p, func(st Stats) bool { return st.PagesZero >= 2 }); st.Faults != 2 || st.PagesZero != 2 {
		t.Errorf("stats after a zero fault %+v, want 2 faults, 2 zero pages (4, 5)", st)
	}
	got = kread(t, p, base+6*P, 2*P)
	if !bytes.Equal(got[:P], pattern(base+6*P, P)) || !bytes.Equal(got[P:], make([]byte, P)) {
		t.Errorf("pages 6 (present) and 7 (absent) wrong")
	}
	if calls := src.reset(); len(calls) != 1 || calls[0] != (readCall{base + 6*P, P}) {
		t.Errorf("source reads %+v, want one page at 6", calls)
	}
	// What the faults brought in: the data pages 0-3 and 6, not the zero
	// pages 4, 5 and 7.
	if got := sp.Touched(); !slices.Equal(got, []descriptor.Run{{Start: base, End: base + 4*P}, {Start: base + 6*P, End: base + 7*P}}) {
		t.Errorf("Touched() = %+v, want pages 0-3 and 6", got)
	}
	st = settled(p, func(st Stats) bool { return st.PagesShared >= 5 && st.PagesZero >= 3 })
	if st.PagesShared != 5 || st.PagesZero != 3 || st.PagesFetched != 5 {
		t.Errorf("stats %+v, want 5 shared and fetched, 3 zero", st)
	}

	// MADV_DONTNEED drops pages 1-2 (REMOVE event): they must read as
	// zero now, not as the cache's or the source's data.
	if _, _, e := unix.Syscall(unix.SYS_MADVISE, uintptr(base+P), 2*P, unix.MADV_DONTNEED); e != 0 {
		t.Fatal(e)
	}
	got = kread(t, p, base, 4*P)
	if !bytes.Equal(got[:P], pattern(base, P)) || !bytes.Equal(got[P:3*P], make([]byte, 2*P)) || !bytes.Equal(got[3*P:], pattern(base+3*P, P)) {
		t.Errorf("after MADV_DONTNEED of pages 1-2: want page 0 and 3 data, 1-2 zero")
	}
	if calls := src.reset(); len(calls) != 0 {
		t.Errorf("refilling freed pages read the source: %+v", calls)
	}
	if p.Err() != nil {
		t.Errorf("pager error %v", p.Err())
	}
}

// TestPagerCopyFaults serves an anonymous mapping with UFFDIO_COPY from the
// source (no cache), preloads with a patch, and follows an mremap.
func TestPagerCopyFaults(t *testing.T) {
	a := reserve(t, 32)
	to := reserve(t, 8)
	base := a.base
	d := &descriptor.Descriptor{
		VMAs:    []descriptor.VMA{{Start: base, End: base + 32*P, Prot: unix.PROT_READ | unix.PROT_WRITE, Kind: descriptor.KindAnon}},
		Present: []descriptor.Run{{Start: base, End: base + 32*P}},
	}
	mmapFixed(t, base, 32*P, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, -1, 0)
	ufd := newUFFD(t, base, 32*P, uffd.RegisterModeMissing)
	src := &fakeSource{}
	p, sp := startPager(t, Config{Desc: d, Source: src, Window: 2, MaxWindow: 8}, ufd)
	sp.RecordTouched()

	// Preload page 20 with a patch.
	var patched []uint64
	err := sp.Preload(base+20*P+17, 1, func(addr uint64, b []byte) {
		patched = append(patched, addr)
		b[0] = 0xAB
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(patched) != 1 || patched[0] != base+20*P {
		t.Errorf("patch called for %#x, want [%#x]", patched, base+20*P)
	}
	got := kread(t, p, base+20*P, P)
	want := pattern(base+20*P, P)
	want[0] = 0xAB
	if !bytes.Equal(got, want) {
		t.Errorf("preloaded page does not hold the patched data")
	}
	if st := p.Stats(); st.Faults != 0 || st.Eager != 1 || st.PagesCopied != 1 {
		t.Errorf("stats after preload %+v, want 0 faults, 1 eager, 1 copied", st)
	}
	if got := sp.Touched(); len(got) != 0 {
		t.Errorf("a preloaded page counts as touched: %+v", got)
	}
	// Preloading it again is a no-op.
	if err := sp.Preload(base+20*P, 1, nil); err != nil || p.Stats().Eager != 1 {
		t.Errorf("second preload: %v, eager %d", err, p.Stats().Eager)
	}

	// Sequential faults: the window grows 2 -> 4 -> 8.
	got = kread(t, p, base, P)
	if !bytes.Equal(got, pattern(base, P)) {
		t.Errorf("page 0 wrong")
	}
	_ = kread(t, p, base+2*P, P)
	_ = kread(t, p, base+6*P, P)
	calls := src.reset()
	wantCalls := []readCall{{base + 20*P, P}, {base, 2 * P}, {base + 2*P, 4 * P}, {base + 6*P, 8 * P}}
	if len(calls) != len(wantCalls) {
		t.Fatalf("source reads %+v, want %+v", calls, wantCalls)
	}
	for i := range calls {
		if calls[i] != wantCalls[i] {
			t.Errorf("read %d: %#x+%d, want %#x+%d", i, calls[i].addr, calls[i].n, wantCalls[i].addr, wantCalls[i].n)
		}
	}
	if st := settled(p, func(st Stats) bool { return st.PagesCopied >= 15 }); st.Faults != 3 || st.PagesCopied != 15 {
		t.Errorf("stats %+v, want 3 faults, 15 pages copied", st)
	}

	// Move pages 12..19 (12, 13 served, 14.. not) to another address:
	// the REMAP event keeps both kinds of page right.
	r, _, e := unix.Syscall6(unix.SYS_MREMAP, uintptr(base+12*P), 8*P, 8*P,
		unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, uintptr(to.base), 0)
	if e != 0 || uint64(r) != to.base {
		t.Fatalf("mremap: %#x %v", r, e)
	}
	got = kread(t, p, to.base, 8*P)
	if !bytes.Equal(got, pattern(base+12*P, 8*P)) {
		t.Errorf("moved pages do not hold the source's data of their old address")
	}
	for _, c := range src.reset() {
		if c.addr < base+14*P || c.addr+uint64(c.n) > base+20*P {
			t.Errorf("after the move the source was read at %#x+%d, want only pages 14-19", c.addr, c.n)
		}
	}
	// Free pages 24 and 25. The pages that may still hold the seed's data
	// (multi-hop prepare marks only these present) follow the move and
	// leave out the freed ones.
	if _, _, e := unix.Syscall(unix.SYS_MADVISE, uintptr(base+24*P), 2*P, unix.MADV_DONTNEED); e != 0 {
		t.Fatalf("madvise: %v", e)
	}
	runs, ok := sp.LazyRuns()
	wantRuns := []descriptor.Run{{Start: base, End: base + 12*P}, {Start: base + 20*P, End: base + 24*P},
		{Start: base + 26*P, End: base + 32*P}, {Start: to.base, End: to.base + 8*P}}
	slices.SortFunc(wantRuns, func(x, y descriptor.Run) int { return cmp.Compare(x.Start, y.Start) })
	if !ok || !reflect.DeepEqual(runs, wantRuns) {
		t.Errorf("LazyRuns = %+v, %v; want %+v", runs, ok, wantRuns)
	}
	if p.Err() != nil {
		t.Errorf("pager error %v", p.Err())
	}
}

// TestPagerSourceError: a failing source stops the space and reports the
// error once; the faulting read is released when the pager closes.
func TestPagerSourceError(t *testing.T) {
	a := reserve(t, 4)
	base := a.base
	d := &descriptor.Descriptor{
		VMAs:    []descriptor.VMA{{Start: base, End: base + 4*P, Prot: unix.PROT_READ | unix.PROT_WRITE, Kind: descriptor.KindAnon}},
		Present: []descriptor.Run{{Start: base, End: base + 4*P}},
	}
	mmapFixed(t, base, 4*P, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, -1, 0)
	ufd := newUFFD(t, base, 4*P, uffd.RegisterModeMissing)
	src := &fakeSource{err: errors.New("seed lost")}
	errs := make(chan error, 4)
	p := New(Config{Desc: d, Source: src, OnError: func(err error) { errs <- err }})
	if _, err := p.Attach(ufd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	done := make(chan error, 1)
	buf := make([]byte, P)
	go func() { done <- ptrace.ReadMem(os.Getpid(), base, buf) }()
	select {
	case err := <-errs:
		if err == nil || !errors.Is(err, src.err) {
			t.Errorf("OnError(%v), want the source's error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no OnError in 5s")
	}
	if !errors.Is(p.Err(), src.err) {
		t.Errorf("Err() = %v", p.Err())
	}
	// The space closed its uffd: the blocked read completes (the kernel
	// then handles the fault as a plain anonymous fault).
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("faulting read still blocked after the space stopped")
	}
	if len(errs) != 0 {
		t.Errorf("OnError called more than once")
	}
}

// TestPreloadPatchZero: a patched preload of a page the seed does not have
// (it reads as zero) installs the zero page with the patch applied, without
// reading the source.
func TestPreloadPatchZero(t *testing.T) {
	a := reserve(t, 4)
	base := a.base
	d := &descriptor.Descriptor{
		VMAs:    []descriptor.VMA{{Start: base, End: base + 4*P, Prot: unix.PROT_READ | unix.PROT_WRITE, Kind: descriptor.KindAnon}},
		Present: []descriptor.Run{{Start: base, End: base + P}},
	}
	mmapFixed(t, base, 4*P, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, -1, 0)
	ufd := newUFFD(t, base, 4*P, uffd.RegisterModeMissing)
	src := &fakeSource{}
	p, sp := startPager(t, Config{Desc: d, Source: src, Window: 1, MaxWindow: 1}, ufd)
	if err := sp.Preload(base+2*P, 1, func(addr uint64, b []byte) { b[5] = 0x5A }); err != nil {
		t.Fatal(err)
	}
	got := kread(t, p, base+2*P, P)
	want := make([]byte, P)
	want[5] = 0x5A
	if !bytes.Equal(got, want) {
		t.Errorf("patched zero page: want zeros and the patched byte, got % x...", got[:8])
	}
	if calls := src.reset(); len(calls) != 0 {
		t.Errorf("a zero page read the source: %+v", calls)
	}
	if st := p.Stats(); st.Faults != 0 || st.PagesCopied != 1 {
		t.Errorf("stats %+v, want 0 faults, 1 page copied", st)
	}
}
