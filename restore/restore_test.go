package restore

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/internal/uffd"
	"github.com/mitosis-fork/mitosis/pager"
	"github.com/mitosis-fork/mitosis/snapshot"
)

func neg(n int64) uint64 { return uint64(-n) }

func TestFixRestart(t *testing.T) {
	const rip = 0x401000
	none := ^uint64(0)
	tests := []struct {
		name             string
		rax, orig        uint64
		wantRip, wantRax uint64
	}{
		{"ERESTARTSYS", neg(512), 7, rip - 2, 7},
		{"ERESTARTNOINTR", neg(513), 61, rip - 2, 61},
		{"ERESTARTNOHAND", neg(514), 0, rip - 2, 0},
		{"ERESTART_RESTARTBLOCK", neg(516), 230, rip - 2, 230},
		{"ERESTARTSYS outside a syscall", neg(512), none, rip, neg(512)},
		{"515 (ENOIOCTLCMD) is not restarted", neg(515), 35, rip, neg(515)},
		{"EINTR", neg(4), 35, rip, neg(4)},
		{"success", 0, 35, rip, 0},
		{"positive 512", 512, 35, rip, 512},
		{"not in a syscall", 0x1234, none, rip, 0x1234},
	}
	for _, tc := range tests {
		r := unix.PtraceRegs{Rip: rip, Rax: tc.rax, Orig_rax: tc.orig, Rdi: 11, Rsp: 0x7ffc0000}
		fixRestart(&r)
		if r.Rip != tc.wantRip || r.Rax != tc.wantRax || r.Orig_rax != none {
			t.Errorf("%s: rip %#x rax %#x orig_rax %#x; want rip %#x rax %#x orig_rax -1",
				tc.name, r.Rip, r.Rax, r.Orig_rax, tc.wantRip, tc.wantRax)
		}
		if r.Rdi != 11 || r.Rsp != 0x7ffc0000 {
			t.Errorf("%s: other registers changed: %+v", tc.name, r)
		}
	}
}

func TestRegisterRanges(t *testing.T) {
	vmas := []descriptor.VMA{
		{Start: 0x1000, End: 0x3000, Kind: descriptor.KindAnon},
		{Start: 0x3000, End: 0x5000, Kind: descriptor.KindAnon, Flags: descriptor.FlagHeap},
		{Start: 0x5000, End: 0x6000, Kind: descriptor.KindFile, Path: "/lib/x.so"},
		{Start: 0x6000, End: 0x8000, Kind: descriptor.KindFileDirty, Path: "/lib/x.so"},
		{Start: 0x8000, End: 0x9000, Kind: descriptor.KindAnon},
		{Start: 0x9000, End: 0xb000, Kind: descriptor.KindAnon, Flags: descriptor.FlagStack | descriptor.FlagGrowsDown},
		{Start: 0xc000, End: 0xd000, Kind: descriptor.KindAnon},
		{Start: 0xd000, End: 0xe000, Kind: descriptor.KindVDSO},
		{Start: 0xe000, End: 0xf000, Kind: descriptor.KindAnon},
	}
	const M, N = uffd.RegisterModeMissing, uffd.RegisterModeMissing | uffd.RegisterModeMinor
	rr := func(s, e, mode uint64) regRange { return regRange{descriptor.Run{Start: s, End: e}, mode} }

	got := registerRanges(vmas, nil, nil)
	want := []regRange{rr(0x1000, 0x5000, M), rr(0x6000, 0xb000, M), rr(0xc000, 0xd000, M), rr(0xe000, 0xf000, M)}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("without a cache:\n%+v\nwant\n%+v", got, want)
	}

	c, err := pager.NewCache(&descriptor.Descriptor{SeedID: "rr", VMAs: vmas}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got = registerRanges(vmas, nil, c)
	want = []regRange{rr(0x1000, 0x5000, N), rr(0x6000, 0x9000, N), rr(0x9000, 0xb000, M), rr(0xc000, 0xd000, N), rr(0xe000, 0xf000, N)}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("with a cache:\n%+v\nwant\n%+v", got, want)
	}
	// Where each VMA lives in the cache: packed in VMA order.
	for _, tc := range []struct {
		v    int
		off  uint64
		isIn bool
	}{{0, 0, true}, {1, 0x2000, true}, {2, 0, false}, {3, 0x4000, true}, {4, 0x6000, true}, {5, 0, false}, {6, 0x7000, true}, {7, 0, false}, {8, 0x8000, true}} {
		off, ok := cacheOffset(c, vmas[tc.v])
		if off != tc.off || ok != tc.isIn {
			t.Errorf("cacheOffset(vma %d) = %#x %v, want %#x %v", tc.v, off, ok, tc.off, tc.isIn)
		}
	}
	if _, ok := cacheOffset(nil, vmas[0]); ok {
		t.Errorf("cacheOffset without a cache reported an offset")
	}
	if got := registerRanges(nil, nil, c); len(got) != 0 {
		t.Errorf("no VMAs: %+v", got)
	}
}

// statBuf fills a struct stat (x86-64 layout) with the fields checkStat
// reads.
func statBuf(dev, ino uint64, size int64, mtimeSec, mtimeNsec int64) []byte {
	b := make([]byte, statSize)
	le := binary.LittleEndian
	le.PutUint64(b[0:], dev)
	le.PutUint64(b[8:], ino)
	le.PutUint64(b[16:], 1)        // nlink
	le.PutUint32(b[24:], 0o100644) // mode
	le.PutUint64(b[48:], uint64(size))
	le.PutUint64(b[72:], 99) // atime: ignored
	le.PutUint64(b[88:], uint64(mtimeSec))
	le.PutUint64(b[96:], uint64(mtimeNsec))
	le.PutUint64(b[104:], 12345) // ctime: ignored
	return b
}

func TestCheckStat(t *testing.T) {
	want := descriptor.FileID{Dev: 0x803, Ino: 4242, Size: 8192, MtimeNsec: 1700000000*1e9 + 123456789}
	if err := checkStat("/lib/libfoo.so", want, statBuf(0x803, 4242, 8192, 1700000000, 123456789)); err != nil {
		t.Errorf("matching stat refused: %v", err)
	}
	for name, b := range map[string][]byte{
		"inode": statBuf(0x803, 4243, 8192, 1700000000, 123456789),
		"dev":   statBuf(0x804, 4242, 8192, 1700000000, 123456789),
		"size":  statBuf(0x803, 4242, 8193, 1700000000, 123456789),
		"mtime": statBuf(0x803, 4242, 8192, 1700000000, 123456788),
		"secs":  statBuf(0x803, 4242, 8192, 1700000001, 123456789),
	} {
		err := checkStat("/lib/libfoo.so", want, b)
		if err == nil || !strings.Contains(err.Error(), "/lib/libfoo.so") || !strings.Contains(err.Error(), "changed since prepare") {
			t.Errorf("%s mismatch: %v, want an error naming the path", name, err)
		}
	}
	err := checkStat("/x", want, statBuf(0x803, 4243, 8192, 1700000000, 123456789))
	if err == nil || !strings.Contains(err.Error(), "inode 4243") || !strings.Contains(err.Error(), "inode 4242") {
		t.Errorf("inode mismatch error %v should name both inodes", err)
	}
}

// TestCheckStatRealFstat checks the struct stat offsets against the kernel:
// a buffer filled by a raw fstat(2) matches the file's procfs identity.
func TestCheckStatRealFstat(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("0123456789"), 0o644); err != nil {
		t.Fatal(err)
	}
	id, err := procfs.StatFileID(p)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, statSize+16)
	if _, _, e := unix.Syscall(unix.SYS_FSTAT, f.Fd(), uintptr(unsafe.Pointer(&buf[0])), 0); e != 0 {
		t.Fatal(e)
	}
	if unsafe.Sizeof(unix.Stat_t{}) != statSize {
		t.Errorf("statSize %d, sizeof(struct stat) %d", statSize, unsafe.Sizeof(unix.Stat_t{}))
	}
	want := descriptor.FileID{Dev: id.Dev, Ino: id.Ino, Size: id.Size, MtimeNsec: id.MtimeNsec}
	if id.Size != 10 {
		t.Fatalf("size %d", id.Size)
	}
	if err := checkStat(p, want, buf); err != nil {
		t.Errorf("real fstat of the same file refused: %v", err)
	}
	want.Ino++
	if err := checkStat(p, want, buf); err == nil || !strings.Contains(err.Error(), p) {
		t.Errorf("other inode accepted or error lacks the path: %v", err)
	}
}

func TestHole(t *testing.T) {
	const G = 0x40000000
	base := uint64(0x100000000)
	tests := []struct {
		name  string
		size  uint64
		vmas  []descriptor.VMA
		maps  []procfs.Mapping
		avoid uint64
		want  uint64
	}{
		{"empty layouts", 0x10000, nil, nil, 0, base},
		{"first slot taken by a vma", 0x10000, []descriptor.VMA{{Start: base + 0x5000, End: base + 0x6000}}, nil, 0, base + G},
		{"vma ends at the slot", 0x10000, []descriptor.VMA{{Start: base - 0x1000, End: base}}, nil, 0, base},
		{"vma starts after the range", 0x10000, []descriptor.VMA{{Start: base + 0x10000, End: base + 0x20000}}, nil, 0, base},
		{"stub mapping in the way", 0x10000, nil, []procfs.Mapping{{Start: base, End: base + 0x1000}}, 0, base + G},
		{"both layouts", 0x10000,
			[]descriptor.VMA{{Start: base, End: base + 0x1000}},
			[]procfs.Mapping{{Start: base + G + 0x8000, End: base + G + 0x9000}}, 0, base + 2*G},
		{"avoid the first slot", 0x10000, nil, nil, base, base + G},
		{"avoid a later slot", 0x10000, nil, nil, base + 2*G, base},
		// A range reaching into the avoided slot is refused.
		{"avoid overlap", G + 0x1000, nil, nil, base + G, base + 2*G},
		{"large range over a later vma", 2 * G, []descriptor.VMA{{Start: base + G, End: base + G + 0x1000}}, nil, 0, base + 2*G},
	}
	for _, tc := range tests {
		got, err := hole(tc.size, tc.vmas, tc.maps, tc.avoid)
		if err != nil || got != tc.want {
			t.Errorf("%s: hole = %#x, %v; want %#x", tc.name, got, err, tc.want)
		}
		if err == nil && overlaps(got, got+tc.size, tc.vmas, tc.maps) {
			t.Errorf("%s: hole %#x overlaps a mapping", tc.name, got)
		}
	}
	// Nothing free.
	all := []descriptor.VMA{{Start: 0, End: 0x7f0000000000}}
	if a, err := hole(0x1000, all, nil, 0); err == nil || !strings.Contains(err.Error(), "no address range") {
		t.Errorf("full layout: hole = %#x, %v; want an error", a, err)
	}
}

func TestOpenFDs(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "data")
	if err := os.WriteFile(p, []byte("abcdefgh"), 0o644); err != nil {
		t.Fatal(err)
	}
	id, err := procfs.StatFileID(p)
	if err != nil {
		t.Fatal(err)
	}
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	ch, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	stdio := [3]*os.File{null, null, null}
	fid := descriptor.FileID{Dev: id.Dev, Ino: id.Ino, Size: id.Size, MtimeNsec: id.MtimeNsec}
	d := &descriptor.Descriptor{FDs: []descriptor.FD{
		{Num: 5, Kind: descriptor.FDFile, Path: p, Flags: unix.O_RDONLY | unix.O_CLOEXEC, Pos: 3, File: fid},
		{Num: 7, Kind: descriptor.FDChannel},
	}}
	files, closeAll, err := openFDs(d, Options{Stdio: stdio, Channel: ch})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 8 {
		t.Fatalf("%d fd slots, want 8", len(files))
	}
	for i, want := range map[int]uintptr{0: null.Fd(), 1: null.Fd(), 2: null.Fd(), 3: ^uintptr(0), 4: ^uintptr(0), 6: ^uintptr(0), 7: ch.Fd()} {
		if files[i] != want {
			t.Errorf("slot %d = %d, want %d", i, int(files[i]), int(want))
		}
	}
	// Slot 5 is the reopened file at offset 3.
	pos, err := unix.Seek(int(files[5]), 0, 1)
	if err != nil || pos != 3 {
		t.Errorf("reopened file at offset %d (%v), want 3", pos, err)
	}
	b := make([]byte, 2)
	if n, _ := unix.Pread(int(files[5]), b, 3); n != 2 || string(b) != "de" {
		t.Errorf("reopened file reads %q", b)
	}
	fdflags, _ := unix.FcntlInt(files[5], unix.F_GETFD, 0)
	if fdflags&unix.FD_CLOEXEC == 0 {
		t.Errorf("daemon's copy of the reopened file is not close-on-exec")
	}
	closeAll()
	if _, err := unix.FcntlInt(files[5], unix.F_GETFD, 0); err == nil {
		t.Errorf("closeAll left fd %d open", files[5])
	}

	// Errors.
	if _, _, err := openFDs(d, Options{Stdio: [3]*os.File{null, nil, null}, Channel: ch}); err == nil || !strings.Contains(err.Error(), "stdio 1") {
		t.Errorf("missing stdout: %v", err)
	}
	if _, _, err := openFDs(d, Options{Stdio: stdio}); err == nil || !strings.Contains(err.Error(), "channel at fd 7") {
		t.Errorf("missing channel: %v", err)
	}
	replaced := *d
	replaced.FDs = []descriptor.FD{{Num: 4, Kind: descriptor.FDFile, Path: p, File: descriptor.FileID{Dev: id.Dev, Ino: id.Ino + 1}}}
	if _, _, err := openFDs(&replaced, Options{Stdio: stdio}); err == nil || !strings.Contains(err.Error(), "replaced") || !strings.Contains(err.Error(), p) {
		t.Errorf("replaced file: %v", err)
	}
	gone := *d
	gone.FDs = []descriptor.FD{{Num: 4, Kind: descriptor.FDFile, Path: filepath.Join(dir, "missing")}}
	if _, _, err := openFDs(&gone, Options{Stdio: stdio}); err == nil || !strings.Contains(err.Error(), "reopen fd 4") {
		t.Errorf("missing file: %v", err)
	}
}

// TestOpenFDsEventLoop: a parent's self-pipe (with buffered bytes), eventfd
// and epoll instance get new kernel objects of the same kinds and state.
func TestOpenFDsEventLoop(t *testing.T) {
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	d := &descriptor.Descriptor{FDs: []descriptor.FD{
		{Num: 3, Kind: descriptor.FDPipe, Flags: unix.O_RDONLY | unix.O_NONBLOCK, Group: 50, Data: []byte("xy")},
		{Num: 4, Kind: descriptor.FDPipe, Flags: unix.O_WRONLY, Group: 50},
		{Num: 5, Kind: descriptor.FDEventfd, Flags: unix.O_RDWR | unix.O_NONBLOCK, Group: 3, Count: 1<<40 + 7},
		{Num: 6, Kind: descriptor.FDEventfd, Flags: unix.O_RDWR, Group: 3},
		{Num: 7, Kind: descriptor.FDEpoll, Watches: []descriptor.EpollWatch{{TFD: 3, Events: unix.EPOLLIN, Data: 3}}},
	}}
	files, closeAll, err := openFDs(d, Options{Stdio: [3]*os.File{null, null, null}})
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll()
	r, w, e5, e6, ep := int(files[3]), int(files[4]), int(files[5]), int(files[6]), int(files[7])
	if fl, _ := unix.FcntlInt(uintptr(r), unix.F_GETFL, 0); fl&unix.O_NONBLOCK == 0 || fl&unix.O_ACCMODE != unix.O_RDONLY {
		t.Errorf("pipe read end flags %#o", fl)
	}
	if _, err := unix.Write(w, []byte("z")); err != nil {
		t.Fatalf("write end: %v", err)
	}
	buf := make([]byte, 8)
	if n, err := unix.Read(r, buf); err != nil || string(buf[:n]) != "xyz" {
		t.Errorf("pipe content %q (%v), want the buffered \"xy\" then \"z\"", buf[:n], err)
	}
	if e5 != e6 {
		t.Errorf("fds 5 and 6 of one eventfd got two eventfds (%d, %d)", e5, e6)
	}
	if n, err := unix.Read(e5, buf); err != nil || n != 8 || *(*uint64)(unsafe.Pointer(&buf[0])) != 1<<40+7 {
		t.Errorf("eventfd counter: %d bytes %x (%v), want %d", n, buf, err, uint64(1<<40+7))
	}
	if target, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(ep)); target != "anon_inode:[eventpoll]" {
		t.Errorf("fd 7 is %q, want an epoll instance", target)
	}
	// Empty: the child adds the watches itself, at its own fd numbers.
	if n, err := unix.EpollWait(ep, make([]unix.EpollEvent, 1), 0); n != 0 || err != nil {
		t.Errorf("epoll_wait on the new instance = %d, %v, want 0 events", n, err)
	}
}

// TestZeroHoles finds the long runs of lazily paged memory the seed does not
// have, and registerRanges leaves them out.
func TestZeroHoles(t *testing.T) {
	const P = descriptor.PageSize
	h := uint64(holeMinPages * P)
	base := uint64(1 << 30)
	d := &descriptor.Descriptor{
		VMAs: []descriptor.VMA{
			{Start: base, End: base + 4*h, Kind: descriptor.KindAnon},                                                               // 0: hole, data, short gap, data, hole
			{Start: base + 4*h, End: base + 5*h, Kind: descriptor.KindFile, Path: "/lib/x.so"},                                      // 1: not paged lazily
			{Start: base + 5*h, End: base + 7*h, Kind: descriptor.KindAnon, Flags: descriptor.FlagStack | descriptor.FlagGrowsDown}, // 2: the stack, never
			{Start: base + 7*h, End: base + 8*h, Kind: descriptor.KindAnon},                                                         // 3: all absent
		},
		Present: []descriptor.Run{
			{Start: base + h, End: base + h + 10*P},
			{Start: base + h + 20*P, End: base + 2*h},
		},
	}
	got := zeroHoles(d)
	want := [][]descriptor.Run{
		{{Start: base, End: base + h}, {Start: base + 2*h, End: base + 4*h}},
		nil, nil,
		{{Start: base + 7*h, End: base + 8*h}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("zeroHoles =\n%+v\nwant\n%+v", got, want)
	}
	const M = uffd.RegisterModeMissing
	rr := registerRanges(d.VMAs, got, nil)
	wantRR := []regRange{
		{descriptor.Run{Start: base + h, End: base + 2*h}, M},
		{descriptor.Run{Start: base + 5*h, End: base + 7*h}, M},
	}
	if !reflect.DeepEqual(rr, wantRR) {
		t.Errorf("registerRanges =\n%+v\nwant\n%+v", rr, wantRR)
	}
}

// TestZeroHolesHotPages: the pages the restore preloads around a thread's
// stack pointer stay out of the holes, which split around them.
func TestZeroHolesHotPages(t *testing.T) {
	const P = descriptor.PageSize
	base := uint64(1 << 30)
	d := &descriptor.Descriptor{VMAs: []descriptor.VMA{{Start: base, End: base + 1024*P, Kind: descriptor.KindAnon}}}
	rsp := base + 500*P + 123
	for i := range d.Regs { // the index of rsp in the register array
		var a [27]uint64
		a[i] = rsp
		if snapshot.RegsFromArray(a).Rsp == rsp {
			d.Regs[i] = rsp
		}
	}
	got := zeroHoles(d)[0]
	want := []descriptor.Run{{Start: base, End: base + 484*P}, {Start: base + 502*P, End: base + 1024*P}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("zeroHoles = %+v, want %+v (pages 484-501 around rsp kept registered)", got, want)
	}
}
