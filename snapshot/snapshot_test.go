package snapshot

import (
	"encoding/binary"
	"errors"
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
)

func TestFindTID(t *testing.T) {
	tcb := func(offs ...int) []byte {
		b := make([]byte, 4096)
		for _, o := range offs {
			binary.LittleEndian.PutUint32(b[o:], 4321)
		}
		return b
	}
	tests := []struct {
		name string
		tcb  []byte
		want int
	}{
		{"absent", tcb(), -1},
		{"only at glibc's offset", tcb(0x2d0), 0x2d0},
		{"glibc's offset preferred over an earlier match", tcb(0x10, 0x2d0, 0x400), 0x2d0},
		{"first match otherwise", tcb(0x300, 0x40, 0x800), 0x40},
		{"at the last word", tcb(4092), 4092},
		{"at offset 0", tcb(0), 0},
		{"unaligned occurrences are not matches", tcb(0x2d2), -1},
		{"short tcb without 0x2d0", tcb(0x10)[:0x100], 0x10},
		{"empty", nil, -1},
	}
	for _, tc := range tests {
		if got := findTID(tc.tcb, 4321); got != tc.want {
			t.Errorf("%s: findTID = %#x, want %#x", tc.name, got, tc.want)
		}
	}
	// Only the low 32 bits of each word are the tid.
	b := make([]byte, 16)
	binary.LittleEndian.PutUint64(b[8:], 4321<<32)
	if got := findTID(b, 4321); got != 12 {
		t.Errorf("findTID on the high half of a word = %d, want 12", got)
	}
}

func TestRegsRoundTrip(t *testing.T) {
	var a [27]uint64
	for i := range a {
		a[i] = uint64(i+1)*0x0101010101 + 0x1000000000000000
	}
	r := RegsFromArray(a)
	if got := regsToArray(&r); got != a {
		t.Errorf("round trip\n%#x\nwant\n%#x", got, a)
	}
	// The array is struct user_regs_struct in order: the same bytes as
	// unix.PtraceRegs.
	if unsafe.Sizeof(r) != 27*8 {
		t.Fatalf("sizeof PtraceRegs = %d", unsafe.Sizeof(r))
	}
	if mem := *(*[27]uint64)(unsafe.Pointer(&r)); mem != a {
		t.Errorf("RegsFromArray differs from the kernel layout\n%#x\nwant\n%#x", mem, a)
	}
	if r.Orig_rax != a[15] || r.Rip != a[16] || r.Rsp != a[19] || r.Fs_base != a[21] || r.R15 != a[0] || r.Gs != a[26] {
		t.Errorf("named fields: %+v", r)
	}
}

const rw = unix.PROT_READ | unix.PROT_WRITE

func TestClassifySpecialAndAnon(t *testing.T) {
	maps := []procfs.Mapping{
		{Start: 0x1000, End: 0x3000, Prot: rw, Path: "[heap]"},
		{Start: 0x3000, End: 0x4000, Prot: rw},
		{Start: 0x4000, End: 0x5000, Prot: unix.PROT_READ, Path: "[anon:glibc malloc]"},
		{Start: 0x10000, End: 0x12000, Prot: unix.PROT_READ, Path: "[vvar]"},
		{Start: 0x12000, End: 0x13000, Prot: unix.PROT_READ, Path: "[vvar_vclock]"},
		{Start: 0x13000, End: 0x15000, Prot: unix.PROT_READ | unix.PROT_EXEC, Path: "[vdso]"},
		{Start: 0x20000, End: 0x40000, Prot: rw, Path: "[stack]"},
		{Start: 0x50000, End: 0x52000, Prot: rw, Path: "/memfd:" + descriptor.CacheMemfdPrefix + "abc", Inode: 77},
		{Start: 0x60000, End: 0x62000, Prot: rw, Path: "/" + descriptor.CacheMemfdPrefix + "abc.3", Deleted: true, Inode: 2},
		{Start: 0xffffffffff600000, End: 0xffffffffff601000, Prot: unix.PROT_EXEC, Path: "[vsyscall]"},
	}
	got, err := classify(maps, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []descriptor.VMA{
		{Start: 0x1000, End: 0x3000, Prot: rw, Kind: descriptor.KindAnon, Flags: descriptor.FlagHeap, Path: "[heap]"},
		{Start: 0x3000, End: 0x4000, Prot: rw, Kind: descriptor.KindAnon},
		{Start: 0x4000, End: 0x5000, Prot: unix.PROT_READ, Kind: descriptor.KindAnon, Path: "[anon:glibc malloc]"},
		{Start: 0x10000, End: 0x12000, Prot: unix.PROT_READ, Kind: descriptor.KindVVAR, Path: "[vvar]"},
		{Start: 0x12000, End: 0x13000, Prot: unix.PROT_READ, Kind: descriptor.KindVVARClock, Path: "[vvar_vclock]"},
		{Start: 0x13000, End: 0x15000, Prot: unix.PROT_READ | unix.PROT_EXEC, Kind: descriptor.KindVDSO, Path: "[vdso]"},
		{Start: 0x20000, End: 0x40000, Prot: rw, Kind: descriptor.KindAnon, Flags: descriptor.FlagStack | descriptor.FlagGrowsDown, Path: "[stack]"},
		{Start: 0x50000, End: 0x52000, Prot: rw, Kind: descriptor.KindFileDirty},
		{Start: 0x60000, End: 0x62000, Prot: rw, Kind: descriptor.KindFileDirty},
		{Start: 0xffffffffff600000, End: 0xffffffffff601000, Prot: unix.PROT_EXEC, Kind: descriptor.KindVsyscall, Path: "[vsyscall]"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("classify\n%+v\nwant\n%+v", got, want)
	}
}

func TestClassifyRefusals(t *testing.T) {
	tests := []struct {
		name string
		m    procfs.Mapping
		want []string // substrings of the error
	}{
		{"shared anonymous", procfs.Mapping{Start: 0x1000, End: 0x2000, Shared: true, Prot: rw}, []string{"shared", "0x1000-0x2000"}},
		{"shared named anonymous", procfs.Mapping{Start: 0x1000, End: 0x2000, Shared: true, Path: "[anon:x]"}, []string{"shared"}},
		{"memfd", procfs.Mapping{Start: 0x1000, End: 0x2000, Path: "/memfd:foo", Inode: 5}, []string{"memfd", "/memfd:foo"}},
		{"shared page cache memfd", procfs.Mapping{Start: 0x1000, End: 0x2000, Shared: true, Path: "/memfd:" + descriptor.CacheMemfdPrefix + "x", Inode: 5}, []string{"memfd"}},
		{"SysV shm", procfs.Mapping{Start: 0x1000, End: 0x2000, Shared: true, Path: "/SYSV00000000", Inode: 5}, []string{"System V"}},
		{"other special", procfs.Mapping{Start: 0x1000, End: 0x2000, Path: "[uprobes]"}, []string{"special mapping [uprobes]"}},
		{"deleted file", procfs.Mapping{Start: 0x1000, End: 0x2000, Path: "/tmp/lib.so", Inode: 5, Deleted: true}, []string{"deleted file", "/tmp/lib.so"}},
		{"shared deleted file", procfs.Mapping{Start: 0x1000, End: 0x2000, Shared: true, Path: "/dev/shm/x", Inode: 5, Deleted: true}, []string{"shared mapping of deleted file"}},
	}
	for _, tc := range tests {
		maps := []procfs.Mapping{{Start: 0x100, End: 0x1000, Prot: rw}, tc.m}
		for _, files := range []map[string]fileStat{nil, {}} {
			_, err := classify(maps, nil, files)
			if err == nil {
				t.Errorf("%s: accepted", tc.name)
				continue
			}
			if !errors.Is(err, ErrRefused) {
				t.Errorf("%s: %v is not ErrRefused", tc.name, err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%s: error %q lacks %q", tc.name, err, w)
				}
			}
		}
	}
}

func TestClassifyFiles(t *testing.T) {
	dir := t.TempDir()
	lib := filepath.Join(dir, "lib.so")
	if err := os.WriteFile(lib, make([]byte, 5*4096), 0o644); err != nil {
		t.Fatal(err)
	}
	id, err := fileID(lib)
	if err != nil {
		t.Fatal(err)
	}
	fm := func(s, e uint64, shared bool) procfs.Mapping {
		return procfs.Mapping{Start: s, End: e, Prot: rw, Shared: shared, Path: lib, Inode: id.Ino, Dev: id.Dev, Offset: s - 0x10000}
	}
	maps := []procfs.Mapping{
		fm(0x10000, 0x12000, false), // clean: only file pages present
		fm(0x12000, 0x13000, false), // an anonymous (written) page
		fm(0x13000, 0x14000, false), // a swapped page
		fm(0x14000, 0x15000, true),  // shared, written: stays KindFile
		{Start: 0x15000, End: 0x16000, Prot: rw},
	}
	regions := []procfs.PageRegion{
		{Start: 0x10000, End: 0x12000, Categories: procfs.PageIsPresent | procfs.PageIsFile},
		{Start: 0x12000, End: 0x13000, Categories: procfs.PageIsPresent},
		{Start: 0x13000, End: 0x14000, Categories: procfs.PageIsSwapped},
		{Start: 0x14000, End: 0x15000, Categories: procfs.PageIsPresent},
	}
	files := map[string]fileStat{}
	got, err := classify(maps, regions, files)
	if err != nil {
		t.Fatal(err)
	}
	kinds := []uint32{descriptor.KindFile, descriptor.KindFileDirty, descriptor.KindFileDirty, descriptor.KindFile, descriptor.KindAnon}
	for i, k := range kinds {
		if got[i].Kind != k {
			t.Errorf("vma %d %#x: kind %d, want %d", i, got[i].Start, got[i].Kind, k)
		}
	}
	if got[0].File != id || got[0].Path != lib || got[0].Offset != 0 || got[2].Offset != 0x3000 {
		t.Errorf("file vma %+v, want identity %+v", got[0], id)
	}
	if got[3].Flags != descriptor.FlagShared {
		t.Errorf("shared file vma flags %#x", got[3].Flags)
	}
	if _, ok := files[lib]; !ok || len(files) != 1 {
		t.Errorf("file identities cached: %v", files)
	}
	// Without page regions (the pre-check) no file is dirty.
	got, err = classify(maps, nil, map[string]fileStat{})
	if err != nil || got[1].Kind != descriptor.KindFile {
		t.Errorf("without regions: %+v, %v", got, err)
	}
	// files == nil: files are not examined, even a missing one.
	gone := []procfs.Mapping{{Start: 0x1000, End: 0x2000, Path: filepath.Join(dir, "gone"), Inode: 9}}
	if got, err := classify(gone, nil, nil); err != nil || got[0].Kind != descriptor.KindFile {
		t.Errorf("pre-check of an unstattable file: %+v, %v", got, err)
	}
	if _, err := classify(gone, nil, map[string]fileStat{}); err == nil || !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "gone") {
		t.Errorf("missing file: %v", err)
	}
	// A file replaced since it was mapped (another inode).
	replaced := []procfs.Mapping{fm(0x10000, 0x11000, false)}
	replaced[0].Inode++
	if _, err := classify(replaced, nil, map[string]fileStat{}); err == nil || !strings.Contains(err.Error(), "replaced") {
		t.Errorf("replaced file: %v", err)
	}
	// Another device.
	replaced[0].Inode, replaced[0].Dev = id.Ino, id.Dev+1
	if _, err := classify(replaced, nil, map[string]fileStat{}); err == nil || !strings.Contains(err.Error(), "replaced") {
		t.Errorf("file on another device: %v", err)
	}
	// A cached stat result is used as is.
	fake := map[string]fileStat{lib: {id: descriptor.FileID{Ino: id.Ino + 100}}}
	if _, err := classify([]procfs.Mapping{fm(0x10000, 0x11000, false)}, nil, fake); err == nil {
		t.Errorf("cached identity ignored")
	}
}

func TestStatFiles(t *testing.T) {
	lib := filepath.Join(t.TempDir(), "a")
	if err := os.WriteFile(lib, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	maps := []procfs.Mapping{
		{Path: lib, Inode: 3},
		{Path: lib, Inode: 3},
		{Path: "[vdso]", Inode: 0},
		{Path: "/deleted", Inode: 4, Deleted: true},
		{Path: "", Inode: 0},
		{Path: "/nonexistent/x", Inode: 5},
	}
	got := statFiles(maps, "")
	if len(got) != 2 || got[lib].err != nil || got[lib].id.Size != 1 || got["/nonexistent/x"].err == nil {
		t.Errorf("statFiles = %+v", got)
	}
}

func TestPresentRuns(t *testing.T) {
	vmas := []descriptor.VMA{
		{Start: 0x10000, End: 0x20000, Kind: descriptor.KindAnon},
		{Start: 0x20000, End: 0x22000, Kind: descriptor.KindFile},
		{Start: 0x22000, End: 0x24000, Kind: descriptor.KindFileDirty},
		{Start: 0x24000, End: 0x28000, Kind: descriptor.KindAnon},
		{Start: 0x30000, End: 0x31000, Kind: descriptor.KindVDSO},
		{Start: 0x40000, End: 0x44000, Kind: descriptor.KindAnon},
	}
	regions := []procfs.PageRegion{
		{Start: 0x8000, End: 0x12000, Categories: procfs.PageIsPresent},                         // clipped to the VMA
		{Start: 0x13000, End: 0x14000, Categories: procfs.PageIsPresent | procfs.PageIsPFNZero}, // zero page: skipped
		{Start: 0x14000, End: 0x15000, Categories: procfs.PageIsSwapped},                        // swapped: kept
		{Start: 0x15000, End: 0x16000, Categories: procfs.PageIsPresent},                        // merges with the previous
		{Start: 0x16000, End: 0x17000, Categories: procfs.PageIsFile},                           // not present: skipped
		{Start: 0x1f000, End: 0x21000, Categories: procfs.PageIsPresent},                        // into the file VMA: clipped
		{Start: 0x21000, End: 0x22000, Categories: procfs.PageIsPresent | procfs.PageIsFile},    // file VMA: ignored
		{Start: 0x24000, End: 0x25000, Categories: procfs.PageIsPresent},                        // adjacent to the dirty file VMA
		{Start: 0x30000, End: 0x31000, Categories: procfs.PageIsPresent},                        // vdso: ignored
		{Start: 0x43000, End: 0x50000, Categories: procfs.PageIsPresent},                        // past the end: clipped
	}
	got := presentRuns(vmas, regions)
	want := []descriptor.Run{
		{Start: 0x10000, End: 0x12000},
		{Start: 0x14000, End: 0x16000},
		{Start: 0x1f000, End: 0x20000},
		{Start: 0x22000, End: 0x25000}, // whole dirty file VMA + the next anon page
		{Start: 0x43000, End: 0x44000},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("presentRuns\n%#x\nwant\n%#x", got, want)
	}
	if got := presentRuns(vmas[:1], nil); len(got) != 0 {
		t.Errorf("no regions: %#x", got)
	}
}

func TestCheckFDs(t *testing.T) {
	file := func(n int, target string) procfs.FDInfo {
		return procfs.FDInfo{Num: n, Target: target, Kind: procfs.FDRegular, Pos: 17, Flags: unix.O_RDWR | unix.O_APPEND | unix.O_CLOEXEC, Cloexec: true,
			File: procfs.FileID{Dev: 1, Ino: 2, Size: 3, MtimeNsec: 4}}
	}
	fds := []procfs.FDInfo{
		{Num: 0, Kind: procfs.FDPipe, Target: "pipe:[1]"},
		{Num: 1, Kind: procfs.FDSocket, Target: "socket:[2]"},
		{Num: 2, Kind: procfs.FDCharDev, Target: "/dev/pts/0"},
		file(3, "/var/log/x.log"),
		{Num: 4, Kind: procfs.FDDir, Target: "/etc"},
		{Num: 5, Kind: procfs.FDCharDev, Target: "/dev/null", Flags: unix.O_WRONLY},
		{Num: 9, Kind: procfs.FDSocket, Target: "socket:[77]", Cloexec: true},
	}
	got, saw, err := checkFDs(fds, 9, nil)
	if err != nil || !saw {
		t.Fatalf("checkFDs = %v, %v", saw, err)
	}
	want := []descriptor.FD{
		{Num: 3, Kind: descriptor.FDFile, Path: "/var/log/x.log", Flags: unix.O_RDWR | unix.O_APPEND | unix.O_CLOEXEC, Pos: 17, Cloexec: true,
			File: descriptor.FileID{Dev: 1, Ino: 2, Size: 3, MtimeNsec: 4}},
		{Num: 4, Kind: descriptor.FDFile, Path: "/etc"},
		{Num: 5, Kind: descriptor.FDFile, Path: "/dev/null", Flags: unix.O_WRONLY},
		{Num: 9, Kind: descriptor.FDChannel, Cloexec: true},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("checkFDs\n%+v\nwant\n%+v", got, want)
	}
	// No channel.
	got, saw, err = checkFDs(fds[:6], -1, nil)
	if err != nil || saw || len(got) != 3 {
		t.Errorf("without a channel: %+v %v %v", got, saw, err)
	}

	refused := []struct {
		f    procfs.FDInfo
		want []string
	}{
		{procfs.FDInfo{Num: 7, Kind: procfs.FDSocket, Target: "socket:[5]"}, []string{"fd 7", "socket"}},
		{procfs.FDInfo{Num: 8, Kind: procfs.FDPipe, Target: "pipe:[6]"}, []string{"fd 8", "pipe"}},
		{procfs.FDInfo{Num: 11, Kind: procfs.FDAnonInode, Target: "anon_inode:[signalfd]"}, []string{"fd 11", "signalfd"}},
		{procfs.FDInfo{Num: 16, Kind: procfs.FDAnonInode, Target: "anon_inode:[eventpoll]", Epoll: []procfs.EpollTarget{{TFD: 40}}}, []string{"epoll fd 16", "fd 40", "not open"}},
		{procfs.FDInfo{Num: 17, Kind: procfs.FDPipe, Target: "pipe:[9]", Flags: unix.O_WRONLY, File: procfs.FileID{Ino: 9}}, []string{"fd 17", "write end", "other end"}},
		{procfs.FDInfo{Num: 12, Kind: procfs.FDMemfd, Target: "/memfd:x (deleted)"}, []string{"fd 12", "memfd"}},
		{procfs.FDInfo{Num: 13, Kind: procfs.FDDeleted, Target: "/tmp/x (deleted)"}, []string{"fd 13", "deleted"}},
		{procfs.FDInfo{Num: 14, Kind: procfs.FDRegular, Target: "relative"}, []string{"fd 14", "no path"}},
		{procfs.FDInfo{Num: 15, Kind: procfs.FDBlockDev, Target: "/dev/sda"}, []string{"fd 15"}},
	}
	for _, tc := range refused {
		_, _, err := checkFDs(append([]procfs.FDInfo{file(3, "/a")}, tc.f), -1, nil)
		if err == nil || !errors.Is(err, ErrRefused) {
			t.Errorf("fd %d (%s): %v, want refused", tc.f.Num, tc.f.Kind, err)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("fd %d: error %q lacks %q", tc.f.Num, err, w)
			}
		}
	}
	// A self-pipe, an eventfd and an epoll instance watching them.
	loop := []procfs.FDInfo{
		{Num: 3, Kind: procfs.FDPipe, Target: "pipe:[50]", Flags: unix.O_RDONLY | unix.O_NONBLOCK, File: procfs.FileID{Ino: 50}},
		{Num: 4, Kind: procfs.FDPipe, Target: "pipe:[50]", Flags: unix.O_WRONLY, File: procfs.FileID{Ino: 50}, Cloexec: true},
		{Num: 5, Kind: procfs.FDAnonInode, Target: "anon_inode:[eventfd]", Eventfd: procfs.EventfdState{Count: 7, ID: 3, Semaphore: true}},
		{Num: 6, Kind: procfs.FDAnonInode, Target: "anon_inode:[eventpoll]", Epoll: []procfs.EpollTarget{{TFD: 3, Events: 0x19, Data: 3}, {TFD: 5, Events: 1 << 31, Data: 1 << 40}}},
	}
	got, _, err = checkFDs(loop, -1, nil)
	wantLoop := []descriptor.FD{
		{Num: 3, Kind: descriptor.FDPipe, Flags: unix.O_RDONLY | unix.O_NONBLOCK, Group: 50},
		{Num: 4, Kind: descriptor.FDPipe, Flags: unix.O_WRONLY, Group: 50, Cloexec: true},
		{Num: 5, Kind: descriptor.FDEventfd, Group: 3, Count: 7, Pos: descriptor.EventfdSemaphore},
		{Num: 6, Kind: descriptor.FDEpoll, Watches: []descriptor.EpollWatch{{TFD: 3, Events: 0x19, Data: 3}, {TFD: 5, Events: 1 << 31, Data: 1 << 40}}},
	}
	if err != nil || !reflect.DeepEqual(got, wantLoop) {
		t.Errorf("event loop fds: %v\n%+v\nwant\n%+v", err, got, wantLoop)
	}
	// A socket at fd <= 2 is the caller's business.
	if _, _, err := checkFDs(fds[:3], -1, nil); err != nil {
		t.Errorf("stdio sockets/pipes refused: %v", err)
	}
	// Channel problems.
	if _, _, err := checkFDs(fds[:4], 9, nil); err == nil || !strings.Contains(err.Error(), "channel fd 9 is not open") {
		t.Errorf("missing channel: %v", err)
	}
	if _, _, err := checkFDs(fds[:4], 3, nil); err == nil || !strings.Contains(err.Error(), "channel fd 3 is regular file") {
		t.Errorf("channel that is a file: %v", err)
	}
}

func TestMissingRuns(t *testing.T) {
	m := func(s, e uint64) procfs.Mapping { return procfs.Mapping{Start: s << 12, End: e << 12} }
	r := func(s, e uint64) [2]uint64 { return [2]uint64{s << 12, e << 12} }
	tests := []struct {
		name         string
		parent, copy []procfs.Mapping
		want         [][2]uint64
	}{
		{"none missing", []procfs.Mapping{m(1, 2), m(3, 5)}, []procfs.Mapping{m(1, 2), m(3, 5)}, nil},
		{"one", []procfs.Mapping{m(1, 2), m(3, 5), m(6, 7)}, []procfs.Mapping{m(1, 2), m(6, 7)}, [][2]uint64{r(3, 5)}},
		{"adjacent merged", []procfs.Mapping{m(1, 2), m(2, 4), m(4, 5), m(9, 10)}, []procfs.Mapping{m(1, 2), m(9, 10)}, [][2]uint64{r(2, 5)}},
		{"separate", []procfs.Mapping{m(1, 2), m(3, 4), m(5, 6), m(7, 8)}, []procfs.Mapping{m(3, 4), m(7, 8)}, [][2]uint64{r(1, 2), r(5, 6)}},
		{"last", []procfs.Mapping{m(1, 2), m(3, 4)}, []procfs.Mapping{m(1, 2)}, [][2]uint64{r(3, 4)}},
		{"vsyscall ignored", []procfs.Mapping{m(1, 2), {Start: 0xff600000, End: 0xff601000, Path: "[vsyscall]"}}, []procfs.Mapping{m(1, 2)}, nil},
	}
	for _, tc := range tests {
		if got := missingRuns(tc.parent, tc.copy); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: missingRuns = %x, want %x", tc.name, got, tc.want)
		}
	}
}

func TestRefuse(t *testing.T) {
	err := refuse("fd %d is bad", 4)
	if !errors.Is(err, ErrRefused) || err.Error() != "unsupported process: fd 4 is bad" {
		t.Errorf("refuse = %q", err)
	}
}

// TestPeekPipe: the content of a real pipe is read through its /proc link
// and stays in the pipe.
func TestPeekPipe(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	path := "/proc/self/fd/" + strconv.Itoa(p[0])
	if b, err := peekPipe(path); err != nil || len(b) != 0 {
		t.Fatalf("empty pipe: %q, %v", b, err)
	}
	msg := []byte("wake-up\x00\xff")
	if _, err := unix.Write(p[1], msg); err != nil {
		t.Fatal(err)
	}
	b, err := peekPipe(path)
	if err != nil || string(b) != string(msg) {
		t.Fatalf("peekPipe = %q, %v, want %q", b, err, msg)
	}
	got := make([]byte, 64)
	n, err := unix.Read(p[0], got)
	if err != nil || string(got[:n]) != string(msg) {
		t.Fatalf("the pipe lost its content: read %q, %v", got[:n], err)
	}
	if _, err := peekPipe("/proc/self/fd/99999"); err == nil {
		t.Errorf("peekPipe of a closed fd: want an error")
	}
}
