package pager

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
)

// patternByte is the fake seed's memory: a function of the address.
func patternByte(a uint64) byte {
	return byte(a>>12)*31 + byte(a)*7 + byte(a>>20) + 1
}

// fakeSource serves patternByte and counts its calls.
type fakeSource struct {
	mu    sync.Mutex
	calls []readCall
	err   error
}

type readCall struct {
	addr uint64
	n    int
}

func (f *fakeSource) ReadPages(addr uint64, buf []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, readCall{addr, len(buf)})
	if f.err != nil {
		return f.err
	}
	if addr%pageSize != 0 || len(buf)%pageSize != 0 {
		return errors.New("unaligned read")
	}
	for i := range buf {
		buf[i] = patternByte(addr + uint64(i))
	}
	return nil
}

func (f *fakeSource) reset() []readCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	return c
}

func pattern(addr uint64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = patternByte(addr + uint64(i))
	}
	return b
}

func TestCacheBacked(t *testing.T) {
	tests := []struct {
		v    descriptor.VMA
		want bool
	}{
		{descriptor.VMA{Kind: descriptor.KindAnon}, true},
		{descriptor.VMA{Kind: descriptor.KindAnon, Flags: descriptor.FlagHeap}, true},
		{descriptor.VMA{Kind: descriptor.KindFileDirty}, true},
		{descriptor.VMA{Kind: descriptor.KindAnon, Flags: descriptor.FlagStack | descriptor.FlagGrowsDown}, false},
		{descriptor.VMA{Kind: descriptor.KindFile}, false},
		{descriptor.VMA{Kind: descriptor.KindVDSO}, false},
		{descriptor.VMA{Kind: descriptor.KindVVAR}, false},
	}
	for _, tc := range tests {
		if got := CacheBacked(tc.v); got != tc.want {
			t.Errorf("CacheBacked(%+v) = %v, want %v", tc.v, got, tc.want)
		}
	}
}

func cacheDesc() *descriptor.Descriptor {
	return &descriptor.Descriptor{
		SeedID: "cachetest",
		VMAs: []descriptor.VMA{
			{Start: 0x10000, End: 0x14000, Kind: descriptor.KindAnon},
			{Start: 0x20000, End: 0x21000, Kind: descriptor.KindFile, Path: "/bin/true"},
			{Start: 0x30000, End: 0x32000, Kind: descriptor.KindAnon, Flags: descriptor.FlagStack | descriptor.FlagGrowsDown},
			{Start: 0x40000, End: 0x43000, Kind: descriptor.KindFileDirty, Path: "/x"},
			{Start: 0x43000, End: 0x44000, Kind: descriptor.KindAnon},
		},
		Present: []descriptor.Run{{Start: 0x10000, End: 0x14000}, {Start: 0x40000, End: 0x44000}},
	}
}

// TestCache runs testCache on both backings: a file of the private
// huge-page tmpfs (where this process may mount one) and a memfd.
func TestCache(t *testing.T) {
	for _, huge := range []bool{true, false} {
		t.Run(map[bool]string{true: "huge", false: "memfd"}[huge], func(t *testing.T) {
			SetHugePageCache(huge)
			defer SetHugePageCache(false)
			testCache(t, huge && !strings.HasPrefix(CacheBacking(), "memfd"))
		})
	}
}

func testCache(t *testing.T, huge bool) {
	src := &fakeSource{}
	c, err := NewCache(cacheDesc(), src)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !strings.HasPrefix(c.Path(), "/proc/") {
		t.Errorf("Path %q", c.Path())
	}
	// The file is named for the seed and spans imageSpan.
	var st unix.Stat_t
	if err := unix.Fstat(c.fd, &st); err != nil || st.Size != imageSpan {
		t.Errorf("cache file size %d (%v), want %d", st.Size, err, int64(imageSpan))
	}
	want := "/memfd:" + descriptor.CacheMemfdPrefix + "cachetest"
	if huge {
		want = "/" + descriptor.CacheMemfdPrefix + "cachetest."
	}
	if link, err := readlink(c.Path()); err != nil || !strings.HasPrefix(link, want) {
		t.Errorf("cache file link %q (%v), want %s...", link, err, want)
	}

	for _, tc := range []struct {
		a    uint64
		off  uint64
		isIn bool
	}{
		{0x10000, 0, true}, {0x13fff, 0x3fff, true}, {0x14000, 0, false},
		{0x20000, 0, false}, {0x30000, 0, false}, {0x31000, 0, false},
		{0x40000, 0x4000, true}, {0x41234, 0x5234, true}, {0x43000, 0x7000, true},
		{0x43fff, 0x7fff, true}, {0x44000, 0, false}, {0xffff, 0, false}, {0, 0, false},
	} {
		off, ok := c.Offset(tc.a)
		if ok != tc.isIn || off != tc.off {
			t.Errorf("Offset(%#x) = %#x, %v; want %#x, %v", tc.a, off, ok, tc.off, tc.isIn)
		}
	}

	// Pages 1 and 2, then all four: only 0 and 3 are fetched, in two reads.
	n, err := c.Ensure(0x11000, 2)
	if err != nil || n != 2 {
		t.Fatalf("Ensure(0x11000, 2) = %d, %v; want 2", n, err)
	}
	if calls := src.reset(); !reflect.DeepEqual(calls, []readCall{{0x11000, 2 * pageSize}}) {
		t.Errorf("first Ensure read %+v", calls)
	}
	n, err = c.Ensure(0x10000, 4)
	if err != nil || n != 2 {
		t.Fatalf("Ensure(0x10000, 4) = %d, %v; want 2", n, err)
	}
	if calls := src.reset(); !reflect.DeepEqual(calls, []readCall{{0x10000, pageSize}, {0x13000, pageSize}}) {
		t.Errorf("second Ensure read %+v", calls)
	}
	n, err = c.Ensure(0x10000, 4)
	if err != nil || n != 0 || len(src.reset()) != 0 {
		t.Errorf("third Ensure = %d, %v, with reads; want 0 and none", n, err)
	}
	if c.Bytes() != 4*pageSize {
		t.Errorf("Bytes = %d, want %d", c.Bytes(), 4*pageSize)
	}
	// A second slot: the FileDirty VMA and the adjacent anonymous one
	// are separate slots but contiguous in the memfd.
	if n, err := c.Ensure(0x42000, 2); err != nil || n != 2 {
		t.Errorf("Ensure(0x42000, 2) = %d, %v", n, err)
	}
	if n, err := c.Ensure(0x43000, 1); err != nil || n != 0 {
		t.Errorf("Ensure(0x43000, 1) after filling it = %d, %v", n, err)
	}
	src.reset()
	wantRuns := []descriptor.Run{{Start: 0x10000, End: 0x14000}, {Start: 0x42000, End: 0x43000}, {Start: 0x43000, End: 0x44000}}
	got := c.Filled()
	// Runs of different slots may or may not be merged; compare pages.
	if pagesOf(got) != pagesOf(wantRuns) {
		t.Errorf("Filled = %+v, want %+v", got, wantRuns)
	}
	if len(got) < 2 || got[0] != wantRuns[0] || got[1].Start != 0x42000 {
		t.Errorf("Filled = %+v", got)
	}
	if c.Bytes() != 6*pageSize {
		t.Errorf("Bytes = %d, want %d", c.Bytes(), 6*pageSize)
	}

	// The memfd holds the source's bytes at the slots' offsets.
	for _, a := range []uint64{0x10000, 0x13000, 0x42000, 0x43000} {
		off, _ := c.Offset(a)
		b := make([]byte, pageSize)
		if _, err := unix.Pread(c.fd, b, int64(off)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, pattern(a, pageSize)) {
			t.Errorf("cache at offset %#x does not hold the page at %#x", off, a)
		}
	}
	// Unfilled pages of the memfd are holes: zero.
	b := make([]byte, pageSize)
	if _, err := unix.Pread(c.fd, b, 0x4000); err != nil || !bytes.Equal(b, make([]byte, pageSize)) {
		t.Errorf("unfilled page of the cache is not zero (%v)", err)
	}

	// Errors: an address outside the cache; a failing source.
	if _, err := c.Ensure(0x20000, 1); err == nil || !strings.Contains(err.Error(), "0x20000") {
		t.Errorf("Ensure of file memory: %v", err)
	}
	src.err = errors.New("source gone")
	n, err = c.Ensure(0x40000, 2)
	if err == nil || !strings.Contains(err.Error(), "source gone") || n != 0 {
		t.Errorf("Ensure with a failing source = %d, %v", n, err)
	}
	if c.Bytes() != 6*pageSize || pagesOf(c.Filled()) != 6 {
		t.Errorf("a failed fill changed the cache: %d bytes, %+v", c.Bytes(), c.Filled())
	}
	// Memory taken: the pages filled, or with huge pages the one 2 MiB
	// folio they all lie in (the slots take the file's first 64 KiB).
	alloc := c.Bytes()
	if huge {
		alloc = 2 << 20
	}
	if c.Allocated() != alloc {
		t.Errorf("Allocated = %d, want %d", c.Allocated(), alloc)
	}
	c.Close()
	if c.fd != -1 {
		t.Errorf("fd %d after Close", c.fd)
	}
	if c.Allocated() != 0 {
		t.Errorf("Allocated = %d after Close", c.Allocated())
	}
	c.Close() // idempotent
}

func pagesOf(rs []descriptor.Run) uint64 {
	var n uint64
	for _, r := range rs {
		n += (r.End - r.Start) / pageSize
	}
	return n
}

func readlink(p string) (string, error) {
	b := make([]byte, 256)
	n, err := unix.Readlink(p, b)
	if err != nil {
		return "", err
	}
	return string(b[:n]), nil
}

// TestCacheFilledRandom checks Filled, which walks the fill bitmap, against
// a walk of every page of every slot, for random fills over slots of many
// sizes (bitmap words that straddle slot boundaries included).
func TestCacheFilledRandom(t *testing.T) {
	_, c, fill := randomFill(t, "filledtest", []uint64{3, 64, 1, 70, 129, 5, 200}, 1)
	for round := 0; round < 50; round++ {
		fill()
		var want []descriptor.Run
		for _, sl := range c.slots {
			for pg := uint64(0); pg < (sl.end-sl.start)/pageSize; pg++ {
				q := sl.off/pageSize + pg
				if c.filled[q>>6]&(1<<(q&63)) == 0 {
					continue
				}
				a := sl.start + pg*pageSize
				if n := len(want); n > 0 && want[n-1].End == a {
					want[n-1].End = a + pageSize
				} else {
					want = append(want, descriptor.Run{Start: a, End: a + pageSize})
				}
			}
		}
		if got := c.Filled(); !reflect.DeepEqual(got, want) {
			t.Fatalf("round %d: Filled = %+v, want %+v", round, got, want)
		}
	}
}

// randomFill builds a seed of anonymous VMAs of the given sizes (pages,
// every other one followed by a hole of 16 pages) and a cache for it, and
// returns a function that fills a random range of one VMA.
func randomFill(t *testing.T, id string, sizes []uint64, seed uint64) (*descriptor.Descriptor, *Cache, func()) {
	t.Helper()
	d := &descriptor.Descriptor{SeedID: id}
	a := uint64(0x100000)
	for i, n := range sizes {
		d.VMAs = append(d.VMAs, descriptor.VMA{Start: a, End: a + n*pageSize, Prot: 3, Kind: descriptor.KindAnon})
		d.Present = append(d.Present, descriptor.Run{Start: a, End: a + n*pageSize})
		a += n * pageSize
		if i%2 == 1 {
			a += 16 * pageSize // a hole between VMAs
		}
	}
	c, err := NewCache(d, &fakeSource{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	rng := rand.New(rand.NewPCG(seed, seed+1))
	fill := func() {
		v := d.VMAs[rng.IntN(len(d.VMAs))]
		np := (v.End - v.Start) / pageSize
		first := rng.Uint64N(np)
		if _, err := c.Ensure(v.Start+first*pageSize, int(1+rng.Uint64N(np-first))); err != nil {
			t.Fatal(err)
		}
	}
	return d, c, fill
}

// BenchmarkCacheFilled is a prefetching fork's working-set query on a seed
// of 1 GiB of lazily paged memory of which 30,000 pages are cached.
func BenchmarkCacheFilled(b *testing.B) {
	d := &descriptor.Descriptor{SeedID: "filledbench",
		VMAs:    []descriptor.VMA{{Start: 1 << 32, End: 1<<32 + 1<<30, Prot: 3, Kind: descriptor.KindAnon}},
		Present: []descriptor.Run{{Start: 1 << 32, End: 1<<32 + 1<<30}}}
	c, err := NewCache(d, &fakeSource{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	for i := uint64(0); i < 30000; i++ {
		q := i * 7
		c.filled[q>>6] |= 1 << (q & 63)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_ = c.Filled()
	}
}

// countingSource serves patternByte slowly, counts how often each page is
// read, fails the first read that covers failPage, and reads runs in one
// call (a RunReader, like the network transport).
type countingSource struct {
	mu       sync.Mutex
	reads    map[uint64]int
	failPage uint64
	failed   bool
}

func (s *countingSource) ReadPages(addr uint64, buf []byte) error {
	time.Sleep(200 * time.Microsecond) // a fetch takes a while: fills overlap
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.failed && addr <= s.failPage && s.failPage < addr+uint64(len(buf)) {
		s.failed = true
		return errors.New("link dropped once")
	}
	for a := addr; a < addr+uint64(len(buf)); a += pageSize {
		s.reads[a]++
	}
	copy(buf, pattern(addr, len(buf)))
	return nil
}

func (s *countingSource) ReadRuns(runs []descriptor.Run, buf []byte) error {
	// One request: it fails as a whole, before any page is counted.
	s.mu.Lock()
	for _, r := range runs {
		if !s.failed && r.Start <= s.failPage && s.failPage < r.End {
			s.failed = true
			s.mu.Unlock()
			return errors.New("link dropped once")
		}
	}
	s.mu.Unlock()
	var o uint64
	for _, r := range runs {
		if err := s.ReadPages(r.Start, buf[o:o+r.End-r.Start]); err != nil {
			return err
		}
		o += r.End - r.Start
	}
	return nil
}

// TestCacheConcurrentFills has children fault overlapping windows of one
// seed while a working-set push fills it too: each page is read from the
// source once (the page whose first fetch failed, twice: a fill that waited
// on the failed one fetches it itself), the memfd holds the seed's bytes,
// and no claim is left behind.
//
// It runs with a source that reads into the cache's staging buffer and with
// one that writes into the cache's file itself (FileSource, as the network
// transport does with splice).
func TestCacheConcurrentFills(t *testing.T) {
	t.Run("buffer", func(t *testing.T) { testCacheConcurrentFills(t, false) })
	t.Run("file", func(t *testing.T) { testCacheConcurrentFills(t, true) })
}

// fileCountingSource is a countingSource that writes pages into the
// cache's file (pager.FileSource).
type fileCountingSource struct {
	*countingSource
	calls int
}

func (s *fileCountingSource) ReadRunsTo(runs []descriptor.Run, fd int, offs []int64) error {
	s.mu.Lock()
	s.calls++
	s.mu.Unlock()
	var n uint64
	for _, r := range runs {
		n += r.End - r.Start
	}
	buf := make([]byte, n)
	if err := s.ReadRuns(runs, buf); err != nil {
		return err
	}
	for i, r := range runs {
		if _, err := unix.Pwrite(fd, buf[:r.End-r.Start], offs[i]); err != nil {
			return err
		}
		buf = buf[r.End-r.Start:]
	}
	return nil
}

func testCacheConcurrentFills(t *testing.T, viaFile bool) {
	const pages = 2048
	base := uint64(1 << 32)
	d := &descriptor.Descriptor{SeedID: "concurrenttest",
		VMAs:    []descriptor.VMA{{Start: base, End: base + pages*pageSize, Prot: 3, Kind: descriptor.KindAnon}},
		Present: []descriptor.Run{{Start: base, End: base + pages*pageSize}}}
	src := &countingSource{reads: map[uint64]int{}, failPage: base + 777*pageSize}
	var csrc Source = src
	fsrc := &fileCountingSource{countingSource: src}
	if viaFile {
		csrc = fsrc
	}
	c, err := NewCache(d, csrc)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			for i := 0; i < 40; i++ {
				first := rng.Uint64N(pages)
				n := 1 + rng.Uint64N(min(256, pages-first))
				if _, err := c.Ensure(base+first*pageSize, int(n)); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		}(g)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, _ = c.EnsureRuns([]descriptor.Run{{Start: base + 100*pageSize, End: base + 1900*pageSize}})
	}()
	wg.Wait()
	// Whatever the random windows missed, and the failed page if the push
	// was the one that failed on it.
	if _, err := c.Ensure(base, pages); err != nil {
		t.Fatal(err)
	}
	for _, err := range errs {
		if !strings.Contains(err.Error(), "link dropped once") {
			t.Errorf("Ensure: %v", err)
		}
	}
	if len(errs) > 1 {
		t.Errorf("%d fills failed, want at most the one that met the dropped link", len(errs))
	}
	for pg := uint64(0); pg < pages; pg++ {
		a := base + pg*pageSize
		if n := src.reads[a]; n != 1 {
			t.Errorf("page %d read %d times from the source, want 1", pg, n)
		}
	}
	if !src.failed {
		t.Error("the source never failed: the test did not exercise a failed fill")
	}
	b := make([]byte, pages*pageSize)
	if _, err := unix.Pread(c.fd, b, 0); err != nil || !bytes.Equal(b, pattern(base, len(b))) {
		t.Errorf("the cache does not hold the seed's bytes (%v)", err)
	}
	if c.Bytes() != pages*pageSize || len(c.fills) != 0 {
		t.Errorf("Bytes %d (want %d), %d fills left in flight", c.Bytes(), pages*pageSize, len(c.fills))
	}
	if viaFile && fsrc.calls == 0 {
		t.Error("the cache never filled through the file source")
	}
}

// TestCacheFileRuns checks what the owner node sends a peer from: FileRuns
// fills the runs it is asked for and hands out a descriptor of the cache's
// file with each run's offset; it refuses (ok false, nothing fetched) runs
// that are not cached, present memory, and fails once the cache is closed.
func TestCacheFileRuns(t *testing.T) {
	src := &fakeSource{}
	c, err := NewCache(cacheDesc(), src)
	if err != nil {
		t.Fatal(err)
	}
	runs := []descriptor.Run{{Start: 0x11000, End: 0x13000}, {Start: 0x42000, End: 0x44000}} // the second spans two slots
	fd, offs, ok, err := c.FileRuns(runs)
	if err != nil || !ok {
		t.Fatalf("FileRuns: ok %v, %v", ok, err)
	}
	for i, r := range runs {
		got := make([]byte, r.End-r.Start)
		if _, err := unix.Pread(fd, got, offs[i]); err != nil || !bytes.Equal(got, pattern(r.Start, len(got))) {
			t.Errorf("run %d at offset %#x does not hold the seed's bytes (%v)", i, offs[i], err)
		}
	}
	unix.Close(fd)
	if n := len(src.reset()); n == 0 {
		t.Error("FileRuns fetched nothing")
	}
	for _, r := range []descriptor.Run{
		{Start: 0x20000, End: 0x21000}, // a file mapping: not cached
		{Start: 0x30000, End: 0x31000}, // the stack: not cached
		{Start: 0x13000, End: 0x15000}, // runs off the end of a slot
		{Start: 0x10800, End: 0x11000}, // unaligned
	} {
		if _, _, ok, err := c.FileRuns([]descriptor.Run{r}); ok || err != nil {
			t.Errorf("FileRuns %#x-%#x: ok %v, %v; want a refusal", r.Start, r.End, ok, err)
		}
	}
	if calls := src.reset(); len(calls) != 0 {
		t.Errorf("refused runs fetched %v", calls)
	}
	c.Close()
	if _, _, _, err := c.FileRuns(runs[:1]); !errors.Is(err, errCacheClosed) {
		t.Errorf("FileRuns after Close: %v", err)
	}
}

// TestCacheCloseDuringFill holds a fill in its source: a fill of other pages
// goes on meanwhile (a slow fetch holds up only the children that need its
// pages), and closing the cache fails the held fill and later ones.
func TestCacheCloseDuringFill(t *testing.T) {
	d := &descriptor.Descriptor{SeedID: "closetest",
		VMAs:    []descriptor.VMA{{Start: 1 << 32, End: 1<<32 + 16*pageSize, Prot: 3, Kind: descriptor.KindAnon}},
		Present: []descriptor.Run{{Start: 1 << 32, End: 1<<32 + 16*pageSize}}}
	gate := make(chan struct{})
	c, err := NewCache(d, gatedSource{gate})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { _, err := c.Ensure(1<<32, 4); done <- err }()
	time.Sleep(10 * time.Millisecond)
	other := make(chan error)
	go func() { _, err := c.Ensure(1<<32+8*pageSize, 2); other <- err }()
	select {
	case err := <-other:
		if err != nil {
			t.Errorf("fill of other pages: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a fill of other pages waited for the held one")
	}
	c.Close()
	close(gate)
	if err := <-done; !errors.Is(err, errCacheClosed) {
		t.Errorf("fill across Close: %v, want %v", err, errCacheClosed)
	}
	if _, err := c.Ensure(1<<32, 1); !errors.Is(err, errCacheClosed) {
		t.Errorf("Ensure after Close: %v", err)
	}
}

type gatedSource struct{ gate chan struct{} }

func (g gatedSource) ReadPages(addr uint64, buf []byte) error {
	if addr == 1<<32 {
		<-g.gate
	}
	copy(buf, pattern(addr, len(buf)))
	return nil
}

// TestCacheHeld keeps the filled pages of cached memory and every page
// outside it.
func TestCacheHeld(t *testing.T) {
	c, err := NewCache(cacheDesc(), &fakeSource{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Ensure(0x11000, 2); err != nil {
		t.Fatal(err)
	}
	got := c.Held([]descriptor.Run{{Start: 0x10000, End: 0x14000}, {Start: 0x20000, End: 0x22000}, {Start: 0x40000, End: 0x41000}})
	want := []descriptor.Run{{Start: 0x11000, End: 0x13000}, {Start: 0x20000, End: 0x22000}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Held = %+v, want %+v", got, want)
	}
}

// TestCacheHeldRandom compares Held with a page-by-page reading of the fill
// bitmap over random fills and random runs that cross slots and holes.
func TestCacheHeldRandom(t *testing.T) {
	d, c, fill := randomFill(t, "heldtest", []uint64{3, 64, 1, 70, 129}, 3)
	lo, hi := d.VMAs[0].Start-4*pageSize, d.VMAs[len(d.VMAs)-1].End+4*pageSize
	rng := rand.New(rand.NewPCG(5, 6))
	for round := 0; round < 200; round++ {
		fill()
		var runs []descriptor.Run
		for x := lo; x < hi; {
			n := (1 + rng.Uint64N(40)) * pageSize
			if rng.IntN(2) == 0 {
				runs = append(runs, descriptor.Run{Start: x, End: min(x+n, hi)})
			}
			x += n
		}
		var want []descriptor.Run
		for _, r := range runs {
			for x := r.Start; x < r.End; x += pageSize {
				if off, ok := c.Offset(x); ok && c.filled[off/pageSize>>6]&(1<<(off/pageSize&63)) == 0 {
					continue
				}
				if n := len(want); n > 0 && want[n-1].End == x {
					want[n-1].End = x + pageSize
				} else {
					want = append(want, descriptor.Run{Start: x, End: x + pageSize})
				}
			}
		}
		if got := c.Held(runs); !reflect.DeepEqual(got, want) {
			t.Fatalf("round %d: Held(%+v) =\n%+v\nwant\n%+v", round, runs, got, want)
		}
	}
}

// TestCacheHugePages: as root, a cache is a file of the huge-page tmpfs and
// a filled, 2 MiB-aligned extent of it is one huge folio: a shared mapping
// of it at a 2 MiB-aligned address is mapped by one PMD.
func TestCacheHugePages(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting the huge-page tmpfs needs root")
	}
	SetHugePageCache(true)
	defer SetHugePageCache(false)
	if b := CacheBacking(); b != "tmpfs huge=always (2 MiB folios)" {
		t.Fatalf("CacheBacking() = %q as root", b)
	}
	const huge = 2 << 20
	d := &descriptor.Descriptor{SeedID: "hugetest", VMAs: []descriptor.VMA{
		{Start: 0x40000000, End: 0x40000000 + 2*huge, Prot: 3, Kind: descriptor.KindAnon}}}
	d.Present = []descriptor.Run{{Start: 0x40000000, End: 0x40000000 + 2*huge}}
	c, err := NewCache(d, &fakeSource{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Ensure(0x40000000, huge/pageSize); err != nil {
		t.Fatal(err)
	}
	// One page of the second extent costs a whole folio.
	if _, err := c.Ensure(0x40000000+huge, 1); err != nil {
		t.Fatal(err)
	}
	if c.Bytes() != huge+pageSize || c.Allocated() != 2*huge {
		t.Errorf("Bytes %d, Allocated %d; want %d and two folios", c.Bytes(), c.Allocated(), huge+pageSize)
	}
	// Reserve 4 MiB, map the first 2 MiB of the file at the aligned
	// address inside, read it.
	res, err := unix.Mmap(-1, 0, 2*huge, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(res)
	skip := (huge - uintptr(unsafe.Pointer(&res[0]))%huge) % huge
	p, err := unix.MmapPtr(c.fd, 0, unsafe.Pointer(&res[skip]), huge, unix.PROT_READ, unix.MAP_SHARED|unix.MAP_FIXED)
	if err != nil {
		t.Fatalf("mmap cache: %v", err)
	}
	base := uint64(uintptr(p))
	m := unsafe.Slice((*byte)(p), huge)
	if !bytes.Equal(m[:pageSize], pattern(0x40000000, pageSize)) {
		t.Fatal("the mapped cache does not hold the filled page")
	}
	smaps, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	head := fmt.Sprintf("%x-%x ", base, base+huge)
	i := strings.Index(string(smaps), head)
	if i < 0 {
		t.Fatalf("no smaps entry %s", head)
	}
	entry := string(smaps[i:])
	if j := strings.Index(entry[1:], "\nVmFlags"); j > 0 {
		entry = entry[:j+1]
	}
	if !strings.Contains(entry, "ShmemPmdMapped:     2048 kB") {
		t.Errorf("the filled extent is not one huge folio:\n%s", entry)
	}
}
