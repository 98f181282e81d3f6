package pager

import (
	"reflect"
	"sort"
	"testing"

	"github.com/mitosis-fork/mitosis/descriptor"
)

const P = pageSize

// newSpace builds a space with the given regions over a pager whose source
// holds the present runs. It is not attached to any userfaultfd.
func newSpace(present []descriptor.Run, regions ...region) *space {
	p := &Pager{present: present, cfg: Config{Window: 16, MaxWindow: 256}}
	return &space{p: p, fd: -1, served: map[uint64]uint64{}, regions: regions}
}

// servedPages lists the served pages (page numbers) in ascending order.
func servedPages(s *space) []uint64 {
	var out []uint64
	for w, bits := range s.served {
		if bits == 0 {
			out = append(out, ^uint64(0)) // an empty word must be deleted
		}
		for b := uint64(0); b < 64; b++ {
			if bits&(1<<b) != 0 {
				out = append(out, w<<6|b)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func checkRegions(t *testing.T, what string, s *space, want []region) {
	t.Helper()
	if len(s.regions) == 0 && len(want) == 0 {
		return
	}
	if !reflect.DeepEqual(s.regions, want) {
		t.Errorf("%s: regions\n%+v\nwant\n%+v", what, s.regions, want)
	}
}

func TestFind(t *testing.T) {
	s := newSpace(nil, region{start: 0x1000, end: 0x3000}, region{start: 0x5000, end: 0x6000})
	for _, tc := range []struct {
		a    uint64
		want int
	}{{0, -1}, {0xfff, -1}, {0x1000, 0}, {0x2fff, 0}, {0x3000, -1}, {0x4fff, -1}, {0x5000, 1}, {0x5fff, 1}, {0x6000, -1}, {1 << 46, -1}} {
		if got := s.find(tc.a); got != tc.want {
			t.Errorf("find(%#x) = %d, want %d", tc.a, got, tc.want)
		}
	}
}

func TestServedBits(t *testing.T) {
	s := newSpace(nil)
	// Pages 60..67 straddle the first two bitset words.
	s.setServed(60*P, 8, true)
	if got, want := servedPages(s), []uint64{60, 61, 62, 63, 64, 65, 66, 67}; !reflect.DeepEqual(got, want) {
		t.Fatalf("served %v, want %v", got, want)
	}
	if len(s.served) != 2 || s.served[0] != 0xf<<60 || s.served[1] != 0xf {
		t.Errorf("bitset words %#x, want {0: 0xf000000000000000, 1: 0xf}", s.served)
	}
	for pg := uint64(58); pg < 70; pg++ {
		want := pg >= 60 && pg < 68
		// Any address inside the page answers for it.
		if got := s.isServed(pg*P + 123); got != want {
			t.Errorf("isServed(page %d) = %v, want %v", pg, got, want)
		}
	}
	s.setServed(62*P, 2, false)
	if got, want := servedPages(s), []uint64{60, 61, 64, 65, 66, 67}; !reflect.DeepEqual(got, want) {
		t.Errorf("after clearing 62,63: served %v, want %v", got, want)
	}
	// Clearing what is not set is a no-op and adds no words.
	s.setServed(1000*P, 3, false)
	if len(s.served) != 2 {
		t.Errorf("clearing unset pages added words: %#x", s.served)
	}
	// Emptied words are deleted.
	s.setServed(60*P, 8, false)
	if len(s.served) != 0 {
		t.Errorf("all cleared, bitset still %#x", s.served)
	}
	// High addresses.
	hi := uint64(0x7ffffffff000)
	s.setServed(hi, 1, true)
	if !s.isServed(hi) || s.isServed(hi-P) {
		t.Errorf("served bit of the top page wrong: %#x", s.served)
	}
}

func TestSplit(t *testing.T) {
	s := newSpace(nil,
		region{start: 0x1000, end: 0x5000, src: 0x11000, image: true},
		region{start: 0x8000, end: 0xa000, zero: true})
	s.split(0x3000)
	s.split(0x1000) // at a boundary: nothing
	s.split(0x6000) // in a gap: nothing
	s.split(0xa000) // at an end: nothing
	s.split(0x9000)
	checkRegions(t, "split", s, []region{
		{start: 0x1000, end: 0x3000, src: 0x11000, image: true},
		{start: 0x3000, end: 0x5000, src: 0x13000, image: true},
		{start: 0x8000, end: 0x9000, zero: true},
		{start: 0x9000, end: 0xa000, src: 0x1000, zero: true},
	})
}

func TestCutInsert(t *testing.T) {
	s := newSpace(nil,
		region{start: 0x1000, end: 0x5000, src: 0x1000},
		region{start: 0x6000, end: 0x7000, src: 0x6000},
		region{start: 0x8000, end: 0xa000, src: 0x20000})
	out := s.cut(0x4000, 0x9000)
	wantOut := []region{
		{start: 0x4000, end: 0x5000, src: 0x4000},
		{start: 0x6000, end: 0x7000, src: 0x6000},
		{start: 0x8000, end: 0x9000, src: 0x20000},
	}
	if !reflect.DeepEqual(out, wantOut) {
		t.Errorf("cut returned %+v, want %+v", out, wantOut)
	}
	checkRegions(t, "after cut", s, []region{
		{start: 0x1000, end: 0x4000, src: 0x1000},
		{start: 0x9000, end: 0xa000, src: 0x21000},
	})
	if got := s.cut(0x50000, 0x60000); len(got) != 0 || len(s.regions) != 2 {
		t.Errorf("cut of a gap removed %+v", got)
	}
	s.insert([]region{{start: 0x5000, end: 0x6000, src: 0x99000}, {start: 0x20000, end: 0x21000, zero: true}})
	checkRegions(t, "after insert", s, []region{
		{start: 0x1000, end: 0x4000, src: 0x1000},
		{start: 0x5000, end: 0x6000, src: 0x99000},
		{start: 0x9000, end: 0xa000, src: 0x21000},
		{start: 0x20000, end: 0x21000, zero: true},
	})
	// Everything.
	all := s.cut(0, 1<<47)
	if len(all) != 4 || len(s.regions) != 0 {
		t.Errorf("cut of everything: removed %d, left %+v", len(all), s.regions)
	}
}

func TestZeroRange(t *testing.T) {
	s := newSpace(nil, region{start: 0x10000, end: 0x20000, src: 0x10000, image: true})
	s.setServed(0x10000, 16, true)
	s.zeroRange(0x13000, 0x15000)
	checkRegions(t, "zeroRange", s, []region{
		{start: 0x10000, end: 0x13000, src: 0x10000, image: true},
		{start: 0x13000, end: 0x15000, zero: true},
		{start: 0x15000, end: 0x20000, src: 0x15000, image: true},
	})
	want := []uint64{0x10, 0x11, 0x12, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f}
	if got := servedPages(s); !reflect.DeepEqual(got, want) {
		t.Errorf("served %#x, want %#x", got, want)
	}
	// Empty and inverted ranges change nothing.
	before := append([]region(nil), s.regions...)
	s.zeroRange(0x18000, 0x18000)
	s.zeroRange(0x19000, 0x18000)
	checkRegions(t, "empty zeroRange", s, before)
	// Over a gap and a region end: the whole range becomes one zero region.
	s.zeroRange(0x1e000, 0x30000)
	checkRegions(t, "zeroRange past the end", s, []region{
		{start: 0x10000, end: 0x13000, src: 0x10000, image: true},
		{start: 0x13000, end: 0x15000, zero: true},
		{start: 0x15000, end: 0x1e000, src: 0x15000, image: true},
		{start: 0x1e000, end: 0x30000, zero: true},
	})
	if s.isServed(0x1e000) || s.isServed(0x1f000) || !s.isServed(0x1d000) {
		t.Errorf("served bits after the second zeroRange: %#x", servedPages(s))
	}
}

func TestRemap(t *testing.T) {
	// Pages 0x3e..0x45 straddle a bitset word boundary.
	s := newSpace(nil,
		region{start: 0x3e000, end: 0x46000, src: 0x3e000},
		region{start: 0x100000, end: 0x104000, src: 0x500000, zero: false})
	s.setServed(0x3e000, 1, true) // 0x3e
	s.setServed(0x40000, 2, true) // 0x40, 0x41
	s.setServed(0x45000, 1, true) // 0x45, not moved
	s.setServed(0x101000, 1, true)
	// Move 0x3e000..0x44000 (6 pages) over part of the second region.
	s.remap(0x3e000, 0x100000, 0x6000)
	checkRegions(t, "remap", s, []region{
		{start: 0x44000, end: 0x46000, src: 0x44000},
		{start: 0x100000, end: 0x106000, src: 0x3e000},
	})
	want := []uint64{0x45, 0x100, 0x102, 0x103}
	if got := servedPages(s); !reflect.DeepEqual(got, want) {
		t.Errorf("served %#x, want %#x", got, want)
	}
	if got := s.srcOf(0x103000); got != 0x41000 {
		t.Errorf("srcOf(moved page) = %#x, want 0x41000", got)
	}
	// Moving a range with a hole keeps the hole a hole.
	s = newSpace(nil, region{start: 0x1000, end: 0x2000, src: 0x1000}, region{start: 0x3000, end: 0x4000, src: 0x3000})
	s.remap(0x1000, 0x10000, 0x3000)
	checkRegions(t, "remap with a hole", s, []region{
		{start: 0x10000, end: 0x11000, src: 0x1000},
		{start: 0x12000, end: 0x13000, src: 0x3000},
	})
	// A zero region stays zero when moved.
	s = newSpace(nil, region{start: 0x1000, end: 0x3000, zero: true})
	s.remap(0x1000, 0x7000, 0x2000)
	checkRegions(t, "remap zero", s, []region{{start: 0x7000, end: 0x9000, zero: true}})
}

func TestBounds(t *testing.T) {
	present := []descriptor.Run{
		{Start: 0x52000, End: 0x54000},
		{Start: 0x58000, End: 0x5a000},
		{Start: 0x90000, End: 0x91000},
	}
	s := newSpace(present,
		// Child [0x10000,0x20000) holds source [0x50000,0x60000).
		region{start: 0x10000, end: 0x20000, src: 0x50000},
		// A zero region.
		region{start: 0x30000, end: 0x34000, zero: true},
		// Source 0x8f000: a run starts in the middle of the region.
		region{start: 0x40000, end: 0x42000, src: 0x8f000},
		// Identity region with no present run at all.
		region{start: 0x70000, end: 0x72000, src: 0x70000},
	)
	type b struct {
		zero   bool
		lo, hi uint64
	}
	tests := []struct {
		a    uint64
		want b
	}{
		{0x10000, b{true, 0x10000, 0x12000}}, // before the first run
		{0x11000, b{true, 0x10000, 0x12000}},
		{0x12000, b{false, 0x12000, 0x14000}}, // in run 1
		{0x13000, b{false, 0x12000, 0x14000}},
		{0x14000, b{true, 0x14000, 0x18000}}, // between runs
		{0x17000, b{true, 0x14000, 0x18000}},
		{0x18000, b{false, 0x18000, 0x1a000}}, // run 2
		{0x1a000, b{true, 0x1a000, 0x20000}},  // after the last run in the region
		{0x1f000, b{true, 0x1a000, 0x20000}},
		{0x30000, b{true, 0x30000, 0x34000}}, // zero region
		{0x33000, b{true, 0x30000, 0x34000}},
		{0x40000, b{true, 0x40000, 0x41000}},  // zero up to run 3
		{0x41000, b{false, 0x41000, 0x42000}}, // run 3
		{0x70000, b{true, 0x70000, 0x72000}},
		{0x71000, b{true, 0x70000, 0x72000}},
		{0x20000, b{true, 0x20000, 0x30000}}, // gaps: bounded by regions
		{0x2f000, b{true, 0x20000, 0x30000}},
		{0x5000, b{true, 0, 0x10000}},
		{0x72000, b{true, 0x72000, 1 << 47}},
	}
	for _, tc := range tests {
		zero, lo, hi := s.bounds(tc.a)
		if got := (b{zero, lo, hi}); got != tc.want {
			t.Errorf("bounds(%#x) = %v %#x-%#x, want %v %#x-%#x", tc.a, zero, lo, hi, tc.want.zero, tc.want.lo, tc.want.hi)
		}
	}
}

// TestBoundsRunAcrossRegion: a source run that starts before the region's
// source and ends after it bounds nothing but the region.
func TestBoundsRunAcrossRegion(t *testing.T) {
	s := newSpace([]descriptor.Run{{Start: 0x1000, End: 0x100000}},
		region{start: 0x7f0000, end: 0x7f4000, src: 0x8000})
	for _, a := range []uint64{0x7f0000, 0x7f3000} {
		zero, lo, hi := s.bounds(a)
		if zero || lo != 0x7f0000 || hi != 0x7f4000 {
			t.Errorf("bounds(%#x) = %v %#x-%#x, want present 0x7f0000-0x7f4000", a, zero, lo, hi)
		}
	}
	// The region's source ends inside a run that starts in it.
	s = newSpace([]descriptor.Run{{Start: 0x2000, End: 0x100000}},
		region{start: 0x10000, end: 0x14000, src: 0x0})
	if zero, lo, hi := s.bounds(0x10000); !zero || lo != 0x10000 || hi != 0x12000 {
		t.Errorf("bounds(0x10000) = %v %#x-%#x, want zero 0x10000-0x12000", zero, lo, hi)
	}
	if zero, lo, hi := s.bounds(0x13000); zero || lo != 0x12000 || hi != 0x14000 {
		t.Errorf("bounds(0x13000) = %v %#x-%#x, want present 0x12000-0x14000", zero, lo, hi)
	}
	// A run that ended before the region's source: lo is not moved into it.
	s = newSpace([]descriptor.Run{{Start: 0x1000, End: 0x2000}},
		region{start: 0x10000, end: 0x14000, src: 0x5000})
	if zero, lo, hi := s.bounds(0x11000); !zero || lo != 0x10000 || hi != 0x14000 {
		t.Errorf("bounds(0x11000) = %v %#x-%#x, want zero 0x10000-0x14000", zero, lo, hi)
	}
}

func TestNewDefaults(t *testing.T) {
	d := &descriptor.Descriptor{Present: []descriptor.Run{{Start: 0x1000, End: 0x2000}}}
	p := New(Config{Desc: d})
	if p.cfg.Window != 16 || p.cfg.MaxWindow != 256 {
		t.Errorf("defaults window %d max %d, want 16 256", p.cfg.Window, p.cfg.MaxWindow)
	}
	p = New(Config{Desc: d, Window: 4, MaxWindow: 64})
	if p.cfg.Window != 4 || p.cfg.MaxWindow != 64 {
		t.Errorf("window %d max %d, want 4 64", p.cfg.Window, p.cfg.MaxWindow)
	}
	if !reflect.DeepEqual(p.present, d.Present) {
		t.Errorf("present %v", p.present)
	}
	if p.Stats() != (Stats{}) || p.Err() != nil {
		t.Errorf("fresh pager stats %+v err %v", p.Stats(), p.Err())
	}
}

// TestStreams walks two arrays in lockstep (as a numpy ufunc over two
// operands faults on each in turn) and one down: each walk keeps its own
// growing window instead of restarting it whenever another walk faults.
func TestStreams(t *testing.T) {
	s := newSpace(nil)
	// serve records a fault at a served with the window stream() picks,
	// as fault does, and returns the window's size in pages.
	serve := func(a uint64) (int, uint64, uint64) {
		st, dir, w := s.stream(a)
		start, end := window(a, dir, w)
		*st = stream{start: start, end: end, dir: dir, window: int(w), used: s.tick}
		return dir, start, end
	}
	x, y, z := uint64(1<<30), uint64(2<<30), uint64(3<<30)+P*1024
	_, _, xe := serve(x)
	_, _, ye := serve(y)
	_, zs, _ := serve(z)
	for step := 1; step <= 6; step++ {
		var dx, dy, dz int
		dx, _, xe = serve(xe)
		dy, _, ye = serve(ye)
		if dx != 1 || dy != 1 {
			t.Fatalf("step %d: directions %d %d, want 1 1 (streams lost)", step, dx, dy)
		}
		if dz, zs, _ = serve(zs - P); dz != -1 {
			t.Fatalf("step %d: downward walk direction %d, want -1", step, dz)
		}
	}
	// 16 pages, then doubling on each of the six steps up to MaxWindow 256.
	if got := xe - x; got != (16+32+64+128+256+256+256)*P {
		t.Errorf("x walked %d pages, want %d", got/P, 16+32+64+128+256+256+256)
	}
	// A fault nowhere near any stream restarts the least recently used one
	// with the base window, and the others keep theirs.
	if dir, _, _ := serve(5 << 30); dir != 0 {
		t.Errorf("unrelated fault continued a stream (dir %d)", dir)
	}
	if dx, _, _ := serve(xe); dx != 1 {
		t.Errorf("x's stream was replaced by an unrelated fault")
	}
}
