package procfs

import (
	"os"
	"reflect"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sink keeps reads of test memory from being optimized away.
var sink byte

// mapAnon maps n private anonymous pages without transparent huge pages
// and unmaps them when the test ends.
func mapAnon(t *testing.T, n int) ([]byte, uint64) {
	t.Helper()
	ps := os.Getpagesize()
	mem, err := unix.Mmap(-1, 0, n*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Munmap(mem) })
	if err := unix.Madvise(mem, unix.MADV_NOHUGEPAGE); err != nil {
		t.Fatal(err)
	}
	return mem, uint64(uintptr(unsafe.Pointer(&mem[0])))
}

func openSelfPagemap(t *testing.T) *Pagemap {
	t.Helper()
	pm, err := OpenPagemap(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := pm.Close(); err != nil {
			t.Error(err)
		}
	})
	// Probe for PAGEMAP_SCAN (Linux 6.7+).
	if _, err := pm.Scan(0, 0, 0, 0, 0, 0); err != nil {
		t.Skipf("PAGEMAP_SCAN unavailable: %v", err)
	}
	return pm
}

func TestPagemapScan(t *testing.T) {
	ps := uint64(os.Getpagesize())
	mem, base := mapAnon(t, 64)
	for i := 0; i < 10; i++ {
		mem[i*int(ps)] = 1
	}
	mem[20*ps] = 1
	end := base + 64*ps
	pg := func(i uint64) uint64 { return base + i*ps }

	pm := openSelfPagemap(t)
	tests := []struct {
		name                                  string
		required, anyOf, excluded, returnMask uint64
		want                                  []PageRegion
	}{
		{"present", PageIsPresent, 0, 0, PageIsPresent,
			[]PageRegion{{pg(0), pg(10), PageIsPresent}, {pg(20), pg(21), PageIsPresent}}},
		{"present, no categories returned", PageIsPresent, 0, 0, 0,
			[]PageRegion{{pg(0), pg(10), 0}, {pg(20), pg(21), 0}}},
		{"not present", 0, 0, PageIsPresent, PageIsPresent,
			[]PageRegion{{pg(10), pg(20), 0}, {pg(21), end, 0}}},
		{"any of present or swapped", 0, PageIsPresent | PageIsSwapped, 0, PageIsPresent | PageIsSwapped,
			[]PageRegion{{pg(0), pg(10), PageIsPresent}, {pg(20), pg(21), PageIsPresent}}},
		{"everything, present reported", 0, 0, 0, PageIsPresent,
			[]PageRegion{{pg(0), pg(10), PageIsPresent}, {pg(10), pg(20), 0}, {pg(20), pg(21), PageIsPresent}, {pg(21), end, 0}}},
		{"file pages", PageIsFile, 0, 0, PageIsFile, nil},
		{"present, zero and file pages excluded", PageIsPresent, 0, PageIsPFNZero | PageIsFile, PageIsPresent | PageIsPFNZero,
			[]PageRegion{{pg(0), pg(10), PageIsPresent}, {pg(20), pg(21), PageIsPresent}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := pm.Scan(base, end, tc.required, tc.anyOf, tc.excluded, tc.returnMask)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got  %x\nwant %x", got, tc.want)
			}
		})
	}

	// A sub-range starting mid-run, with an unaligned end rounded up.
	got, err := pm.Scan(pg(5), pg(20)+1, PageIsPresent, 0, 0, PageIsPresent)
	if err != nil {
		t.Fatal(err)
	}
	if want := []PageRegion{{pg(5), pg(10), PageIsPresent}, {pg(20), pg(21), PageIsPresent}}; !reflect.DeepEqual(got, want) {
		t.Errorf("sub-range: got %x, want %x", got, want)
	}

	// An unaligned start is rejected by the kernel.
	if _, err := pm.Scan(base+1, end, PageIsPresent, 0, 0, 0); err == nil {
		t.Error("unaligned start accepted")
	}

	// A one-region buffer forces one ioctl per region; the result must be
	// the same.
	small := &Pagemap{pid: pm.pid, f: pm.f, buf: make([]PageRegion, 1)}
	for _, tc := range tests {
		got, err := small.Scan(base, end, tc.required, tc.anyOf, tc.excluded, tc.returnMask)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s with 1-region buffer: got %x, want %x", tc.name, got, tc.want)
		}
	}
}

func TestPagemapScanZeroPage(t *testing.T) {
	ps := uint64(os.Getpagesize())
	mem, base := mapAnon(t, 8)
	sink += mem[3*ps] // read fault: maps the shared zero page
	mem[5*ps] = 7     // write fault: a private page
	pm := openSelfPagemap(t)
	got, err := pm.Scan(base, base+8*ps, PageIsPresent, 0, 0, PageIsPFNZero)
	if err != nil {
		t.Fatal(err)
	}
	want := []PageRegion{{base + 3*ps, base + 4*ps, PageIsPFNZero}, {base + 5*ps, base + 6*ps, 0}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %x, want %x", got, want)
	}
}

func TestPagemapScanChild(t *testing.T) {
	cmd := startSleep(t, t.TempDir())
	ms, err := Maps(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := OpenPagemap(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	var stack Mapping
	for _, m := range ms {
		if m.Path == "[stack]" {
			stack = m
		}
	}
	// The stack top holds argv and the environment: it is present.
	regs, err := pm.Scan(stack.Start, stack.End, PageIsPresent, 0, 0, PageIsPresent|PageIsFile)
	if err != nil {
		t.Skipf("PAGEMAP_SCAN unavailable: %v", err)
	}
	if len(regs) == 0 || regs[len(regs)-1].End != stack.End || regs[len(regs)-1].Categories != PageIsPresent {
		t.Errorf("stack %x-%x: present regions %x", stack.Start, stack.End, regs)
	}
	// Over the whole user address space: both ends of every present region
	// lie in mappings ([vsyscall] is above the user range and left out).
	top := uint64(0)
	for _, m := range ms {
		if m.Path != "[vsyscall]" {
			top = max(top, m.End)
		}
	}
	all, err := pm.Scan(0, top, PageIsPresent, 0, 0, PageIsFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) < 2 {
		t.Errorf("only %d present regions in the whole address space", len(all))
	}
	in := func(a uint64) bool {
		for _, m := range ms {
			if a >= m.Start && a < m.End {
				return true
			}
		}
		return false
	}
	for _, r := range all {
		if r.Start >= r.End || !in(r.Start) || !in(r.End-1) {
			t.Errorf("region %x outside the mappings", r)
		}
	}
}
