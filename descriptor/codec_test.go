package descriptor

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"reflect"
	"runtime"
	"strings"
	"testing"
)

// fullDescriptor returns a valid descriptor in which every field, nested
// field and slice is non-zero (checked by TestFullDescriptorNonZero).
func fullDescriptor() *Descriptor {
	d := &Descriptor{
		SeedID:  "seed-0123456789abcdef",
		Name:    "python-warm",
		Node:    "node-7",
		Kernel:  "6.8.0-45-generic",
		Exe:     "/usr/bin/python3.12",
		ExeFile: FileID{Dev: 0x803, Ino: 123456, Size: 6_000_000, MtimeNsec: 1_700_000_000_123_456_789},
		PID:     4242,
		XState:  []byte("xstate-area\x00\x01\x02\xff"),
		VMAs: []VMA{
			{Start: 0x400000, End: 0x401000, Prot: 5, Flags: FlagShared, Kind: KindFile, Offset: 0x1000,
				Path: "/usr/bin/python3.12", File: FileID{Dev: 1, Ino: 2, Size: 3, MtimeNsec: 4}},
			{Start: 0x600000, End: 0x602000, Prot: 3, Flags: FlagHeap, Kind: KindFileDirty, Offset: 0x2000,
				Path: "/usr/bin/python3.12", File: FileID{Dev: 1, Ino: 2, Size: 3, MtimeNsec: 4}},
			{Start: 0x7ffd0000, End: 0x7fff0000, Prot: 3, Flags: FlagGrowsDown | FlagStack, Kind: KindAnon, Offset: 9,
				Path: "[stack]", File: FileID{Dev: 5, Ino: 6, Size: 7, MtimeNsec: 8}},
		},
		Present: []Run{{Start: 0x600000, End: 0x601000}, {Start: 0x601000, End: 0x602000}, {Start: 0x7ffe0000, End: 0x7fff0000}},
		MM: MMFields{
			StartCode: 1, EndCode: 2, StartData: 3, EndData: 4, StartBrk: 5, Brk: 6,
			StartStack: 7, ArgStart: 8, ArgEnd: 9, EnvStart: 10, EnvEnd: 11,
		},
		Auxv:        []byte{33, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x10, 0xff, 0xf7},
		VDSOSyscall: 0x7fff_f7ff_0a1c,
		TIDAddr:     0x7fff_f7d8_0990,
		ClearTID:    0x7fff_f7d8_0990,
		SigActions: []SigAction{
			{Signo: 2, Handler: 0x401234, Flags: 0x04000000, Restorer: 0x7fff_f7c4_2520, Mask: 1 << 14},
			{Signo: 13, Handler: 1, Flags: 2, Restorer: 3, Mask: 4},
		},
		SigMask:       1 << 9,
		AltStackSP:    0x7fff_0000_0000,
		AltStackFlags: 1,
		AltStackSize:  8192,
		RobustHead:    0x7fff_f7d8_09a0,
		RobustLen:     24,
		Rseq:          Rseq{Addr: 0x7fff_f7d8_0fe0, Len: 32, Sig: 0x53053053, Flags: 1},
		FDs: []FD{
			{Num: 3, Kind: FDFile, Path: "/var/log/app.log", Flags: 0x401, Pos: 1 << 40, Cloexec: true,
				File: FileID{Dev: 9, Ino: 10, Size: 11, MtimeNsec: 12}},
			{Num: 7, Kind: FDChannel, Path: "channel", Flags: 2, Pos: -1, Cloexec: true,
				File: FileID{Dev: 13, Ino: 14, Size: -15, MtimeNsec: -16}},
			{Num: 8, Kind: FDPipe, Group: 1 << 50, Data: []byte("wake\x00\xff")},
			{Num: 9, Kind: FDEventfd, Group: 3, Count: 1<<64 - 2, Pos: EventfdSemaphore},
			{Num: 10, Kind: FDEpoll, Watches: []EpollWatch{{TFD: 8, Events: 1<<31 | 0x19, Data: 1<<63 | 8}, {TFD: 9, Events: 1, Data: 9}}},
		},
		Cwd:     "/srv/app",
		Root:    "/srv/images/py",
		Comm:    "python3",
		TIDRefs: []TIDRef{{Addr: 0x7fff_f7ff_e0a0, Thread: -1}, {Addr: 0x7fff_f7ff_e0c8, Thread: 1}},
		Umask:   0o022,
		Rlimits: []Rlimit{{Resource: 7, Cur: 1024, Max: 4096}, {Resource: 3, Cur: 8 << 20, Max: ^uint64(0)}},
		Creds: Creds{
			UID: 1000, EUID: 1001, SUID: 1002, FSUID: 1003,
			GID: 2000, EGID: 2001, SGID: 2002, FSGID: 2003,
			Groups: []uint32{4, 24, 27, 1000},
		},
		Threads: []Thread{
			{TID: 4243, XState: []byte("thread-xstate\x07"), SigMask: 1 << 10, TIDAddr: 0x7fff_f700_09d0,
				AltStackSP: 0x7fff_0001_0000, AltStackFlags: 2, AltStackSize: 4096,
				RobustHead: 0x7fff_f700_09e0, RobustLen: 24,
				Rseq: Rseq{Addr: 0x7fff_f700_0fe0, Len: 32, Sig: 0x53053053, Flags: 2}, Comm: "GC Thread#0"},
			{TID: 4250, XState: []byte{1}, SigMask: 1},
		},
	}
	for i := range d.Regs {
		d.Regs[i] = uint64(i+1) * 0x0101_0101_0101_0101
		d.Threads[0].Regs[i] = uint64(i+7) * 0x0202_0202_0202_0202
	}
	return d
}

// unicodeDescriptor has non-ASCII strings everywhere strings occur.
func unicodeDescriptor() *Descriptor {
	return &Descriptor{
		SeedID: "種子-🌱",
		Name:   "naïve café",
		Exe:    "/opt/приложение/bin/app",
		VMAs: []VMA{{Start: 0x10000, End: 0x20000, Kind: KindFile,
			Path: "/home/用户/ライブラリ/libé.so"}},
		FDs: []FD{{Num: 5, Path: "/tmp/données/日志.txt"}},
		Cwd: "/home/用户/🚀",
	}
}

// benchDescriptor is a realistic large descriptor: 600 VMAs, 2000 present
// runs and a 2.7 KiB XState.
func benchDescriptor() *Descriptor {
	d := fullDescriptor()
	d.XState = make([]byte, 2765)
	for i := range d.XState {
		d.XState[i] = byte(i * 7)
	}
	d.VMAs = make([]VMA, 600)
	addr := uint64(0x5555_5555_0000)
	for i := range d.VMAs {
		v := VMA{Start: addr, End: addr + uint64(8+i%5)*PageSize, Prot: 3}
		switch i % 3 {
		case 0:
			v.Kind = KindAnon
		case 1, 2:
			// Groups of mappings of the same library, as in /proc/PID/maps.
			v.Kind = KindFile
			v.Path = fmt.Sprintf("/usr/lib/x86_64-linux-gnu/libexample-%d.so.1.2.3", i/6)
			v.Offset = uint64(i%3) * PageSize
			v.File = FileID{Dev: 0x803, Ino: uint64(1000 + i/6), Size: 1 << 20, MtimeNsec: 1_700_000_000_000_000_000}
		}
		d.VMAs[i] = v
		addr = v.End + 4*PageSize
	}
	// Up to four one-page runs with gaps per VMA (600×4 > 2000).
	d.Present = make([]Run, 0, 2000)
	for _, v := range d.VMAs {
		for p := uint64(0); p < 8 && len(d.Present) < cap(d.Present); p += 2 {
			s := v.Start + p*PageSize
			d.Present = append(d.Present, Run{Start: s, End: s + PageSize})
		}
	}
	return d
}

// Every leaf field of fullDescriptor is non-zero (in at least one element of
// each slice), so the round trip exercises every field.
func TestFullDescriptorNonZero(t *testing.T) {
	nonZero := map[string]bool{}
	var walk func(path string, v reflect.Value)
	walk = func(path string, v reflect.Value) {
		switch v.Kind() {
		case reflect.Struct:
			for i := 0; i < v.NumField(); i++ {
				walk(path+"."+v.Type().Field(i).Name, v.Field(i))
			}
		case reflect.Slice, reflect.Array:
			nonZero[path] = nonZero[path] || v.Len() > 0
			for i := 0; i < v.Len(); i++ {
				walk(path+"[]", v.Index(i))
			}
		default:
			nonZero[path] = nonZero[path] || !v.IsZero()
		}
	}
	walk("Descriptor", reflect.ValueOf(*fullDescriptor()))
	for path, ok := range nonZero {
		if !ok {
			t.Errorf("%s is zero everywhere", path)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		d    *Descriptor
	}{
		{"empty", &Descriptor{}},
		{"full", fullDescriptor()},
		{"unicode", unicodeDescriptor()},
		{"large", benchDescriptor()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.d.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			b := Encode(nil, tt.d)
			if got, want := len(b), encodedSize(tt.d); got != want {
				t.Errorf("len(Encode) = %d, encodedSize = %d", got, want)
			}
			got, err := Decode(b)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if !reflect.DeepEqual(got, tt.d) {
				t.Errorf("round trip mismatch:\n got %+v\nwant %+v", got, tt.d)
			}
			if b2 := Encode(nil, got); !bytes.Equal(b2, b) {
				t.Errorf("re-encoding differs")
			}
		})
	}
}

// Empty but non-nil slices decode as nil.
func TestDecodeNormalizesEmptyToNil(t *testing.T) {
	d := &Descriptor{
		XState: []byte{}, VMAs: []VMA{}, Present: []Run{}, Auxv: []byte{},
		SigActions: []SigAction{}, FDs: []FD{}, Rlimits: []Rlimit{},
		Creds: Creds{Groups: []uint32{}},
	}
	got, err := Decode(Encode(nil, d))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, &Descriptor{}) {
		t.Errorf("got %+v, want all-nil slices", got)
	}
}

func TestEncodeAppends(t *testing.T) {
	d := fullDescriptor()
	prefix := []byte("prefix")
	b := Encode(prefix, d)
	if !bytes.HasPrefix(b, prefix) || !bytes.Equal(b[len(prefix):], Encode(nil, d)) {
		t.Fatal("Encode did not append to dst")
	}
	if !bytes.HasPrefix(b[len(prefix):], []byte("MTSD\x05\x00")) {
		t.Fatalf("header = %q", b[len(prefix):len(prefix)+6])
	}
}

// Decode must not alias its input.
func TestDecodeCopies(t *testing.T) {
	b := Encode(nil, fullDescriptor())
	d, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	for i := range b {
		b[i] = 0xAA
	}
	if !reflect.DeepEqual(d, fullDescriptor()) {
		t.Fatal("decoded descriptor changed when the input was overwritten")
	}
}

// firstDiff returns the first index at which a and b differ.
func firstDiff(t *testing.T, a, b []byte) int {
	t.Helper()
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	t.Fatal("encodings do not differ")
	return -1
}

// offsetOf returns the offset in Encode(fullDescriptor()) of the first byte
// that changes when change is applied: for a length or count, change adds
// one element, and the offset is that of the u32 length.
func offsetOf(t *testing.T, change func(d *Descriptor)) int {
	t.Helper()
	d := fullDescriptor()
	change(d)
	return firstDiff(t, Encode(nil, fullDescriptor()), Encode(nil, d))
}

// patched returns Encode(fullDescriptor()) with the u32 at the offset found by
// offsetOf(change) replaced by v.
func patched(t *testing.T, change func(d *Descriptor), v uint32) []byte {
	t.Helper()
	b := Encode(nil, fullDescriptor())
	binary.LittleEndian.PutUint32(b[offsetOf(t, change):], v)
	return b
}

func encodeWith(change func(d *Descriptor)) []byte {
	d := fullDescriptor()
	change(d)
	return Encode(nil, d)
}

var (
	addVMA       = func(d *Descriptor) { d.VMAs = append(d.VMAs, VMA{Start: 1 << 40, End: 1<<40 + PageSize}) }
	addRun       = func(d *Descriptor) { d.Present = append(d.Present, Run{Start: 1 << 40, End: 1<<40 + PageSize}) }
	addSigAction = func(d *Descriptor) { d.SigActions = append(d.SigActions, SigAction{Signo: 15}) }
	addFD        = func(d *Descriptor) { d.FDs = append(d.FDs, FD{Num: 9}) }
	addRlimit    = func(d *Descriptor) { d.Rlimits = append(d.Rlimits, Rlimit{}) }
	addGroup     = func(d *Descriptor) { d.Creds.Groups = append(d.Creds.Groups, 5) }
	growXState   = func(d *Descriptor) { d.XState = append(d.XState, 0) }
	growAuxv     = func(d *Descriptor) { d.Auxv = append(d.Auxv, 0) }
	growVMAPath  = func(d *Descriptor) { d.VMAs[1].Path += "x" }
	growFDPath   = func(d *Descriptor) { d.FDs[0].Path += "x" }
	growName     = func(d *Descriptor) { d.Name += "x" }
	growCwd      = func(d *Descriptor) { d.Cwd += "x" }
)

// TestDecodeRejectsEncoding covers errors found while parsing the bytes.
func TestDecodeRejectsEncoding(t *testing.T) {
	valid := Encode(nil, fullDescriptor())
	long := strings.Repeat("a", MaxString+1)
	tests := []struct {
		name  string
		input func(t *testing.T) []byte
		want  string
	}{
		{"empty input", func(*testing.T) []byte { return nil }, "descriptor: magic: bad magic"},
		{"short magic", func(*testing.T) []byte { return []byte("MT") }, "descriptor: magic: bad magic"},
		{"wrong magic", func(*testing.T) []byte {
			b := bytes.Clone(valid)
			b[3] = 'X'
			return b
		}, `descriptor: magic: bad magic "MTSX"`},
		{"no version", func(*testing.T) []byte { return []byte("MTSD\x01") }, "descriptor: version: truncated"},
		{"unknown version", func(*testing.T) []byte {
			b := bytes.Clone(valid)
			b[4] = 6
			return b
		}, "descriptor: version: unsupported version 6"},
		{"version 0", func(*testing.T) []byte { return []byte("MTSD\x00\x00") }, "descriptor: version: unsupported version 0"},
		{"header only", func(*testing.T) []byte { return []byte("MTSD\x05\x00") }, "descriptor: seed id: truncated"},
		{"truncated at end", func(*testing.T) []byte { return valid[:len(valid)-1] },
			"descriptor: tid refs: length 2 exceeds remaining input"},
		{"truncated in regs", func(t *testing.T) []byte { return valid[:offsetOf(t, growXState)-5] },
			"descriptor: regs: truncated input: need 8 bytes"},
		{"truncated in vma path", func(t *testing.T) []byte {
			// A long path so that the VMA count still fits the input.
			return encodeWith(func(d *Descriptor) { d.VMAs[1].Path = strings.Repeat("p", 1000) })[:offsetOf(t, growVMAPath)+500]
		}, "descriptor: vma 1: path: length 1000 exceeds remaining input (496 bytes)"},
		{"truncated in fd path", func(t *testing.T) []byte {
			return encodeWith(func(d *Descriptor) { d.FDs[0].Path = strings.Repeat("p", 1000) })[:offsetOf(t, growFDPath)+500]
		}, "descriptor: fd 0: path: length 1000 exceeds remaining input (496 bytes)"},
		{"trailing data", func(*testing.T) []byte { return append(bytes.Clone(valid), 0) }, "descriptor: trailing data: 1 bytes"},

		{"string over limit", func(*testing.T) []byte { return encodeWith(func(d *Descriptor) { d.Name = long }) },
			"descriptor: name: length 4097 exceeds limit 4096"},
		{"string over remaining", func(t *testing.T) []byte { return patched(t, growName, 4000) },
			"descriptor: name: length 4000 exceeds remaining input"},
		{"cwd over limit", func(*testing.T) []byte { return encodeWith(func(d *Descriptor) { d.Cwd = long }) },
			"descriptor: cwd: length 4097 exceeds limit 4096"},
		{"cwd over remaining", func(t *testing.T) []byte { return patched(t, growCwd, 4000) },
			"descriptor: cwd: length 4000 exceeds remaining input"},
		{"tid ref of no thread", func(*testing.T) []byte { return encodeWith(func(d *Descriptor) { d.TIDRefs[1].Thread = 2 }) },
			"descriptor: tid ref 1: thread 2 of 2"},
		{"tid ref below the main thread", func(*testing.T) []byte { return encodeWith(func(d *Descriptor) { d.TIDRefs[0].Thread = -2 }) },
			"descriptor: tid ref 0: thread -2 of 2"},
		{"tid ref unaligned", func(*testing.T) []byte { return encodeWith(func(d *Descriptor) { d.TIDRefs[0].Addr++ }) },
			"not 4-byte aligned"},
		{"vma path over limit", func(*testing.T) []byte { return encodeWith(func(d *Descriptor) { d.VMAs[1].Path = long }) },
			"descriptor: vma 1: path: length 4097 exceeds limit 4096"},
		{"vma path over remaining", func(t *testing.T) []byte { return patched(t, growVMAPath, 4000) },
			"descriptor: vma 1: path: length 4000 exceeds remaining input"},
		{"fd path over limit", func(*testing.T) []byte { return encodeWith(func(d *Descriptor) { d.FDs[0].Path = long }) },
			"descriptor: fd 0: path: length 4097 exceeds limit 4096"},
		{"fd path over remaining", func(t *testing.T) []byte { return patched(t, growFDPath, 4000) },
			"descriptor: fd 0: path: length 4000 exceeds remaining input"},
		{"xstate over limit", func(*testing.T) []byte {
			return encodeWith(func(d *Descriptor) { d.XState = make([]byte, MaxXState+1) })
		}, "descriptor: xstate: length 65537 exceeds limit 65536"},
		{"xstate over remaining", func(t *testing.T) []byte { return patched(t, growXState, 60000) },
			"descriptor: xstate: length 60000 exceeds remaining input"},
		{"auxv over limit", func(*testing.T) []byte {
			return encodeWith(func(d *Descriptor) { d.Auxv = make([]byte, MaxAuxv+1) })
		}, "descriptor: auxv: length 4097 exceeds limit 4096"},
		{"auxv over remaining", func(t *testing.T) []byte { return patched(t, growAuxv, 4000) },
			"descriptor: auxv: length 4000 exceeds remaining input"},

		{"vmas over limit", func(t *testing.T) []byte { return patched(t, addVMA, MaxVMAs+1) },
			"descriptor: vmas: length 1048577 exceeds limit 1048576"},
		{"vmas over remaining", func(t *testing.T) []byte { return patched(t, addVMA, MaxVMAs) },
			"descriptor: vmas: length 1048576 exceeds remaining input"},
		{"vmas count huge", func(t *testing.T) []byte { return patched(t, addVMA, 0xFFFFFFFF) },
			"descriptor: vmas: length 4294967295 exceeds limit"},
		{"present over limit", func(t *testing.T) []byte { return patched(t, addRun, MaxRuns+1) },
			"descriptor: present: length 16777217 exceeds limit 16777216"},
		{"present over remaining", func(t *testing.T) []byte { return patched(t, addRun, 1000) },
			"descriptor: present: length 1000 exceeds remaining input"},
		{"sigactions over limit", func(t *testing.T) []byte { return patched(t, addSigAction, 65) },
			"descriptor: sigactions: length 65 exceeds limit 64"},
		{"sigactions over remaining", func(t *testing.T) []byte { return patched(t, addSigAction, 64) },
			"descriptor: sigactions: length 64 exceeds remaining input"},
		{"fds over limit", func(t *testing.T) []byte { return patched(t, addFD, MaxFDs+1) },
			"descriptor: fds: length 65537 exceeds limit 65536"},
		{"fds over remaining", func(t *testing.T) []byte { return patched(t, addFD, MaxFDs) },
			"descriptor: fds: length 65536 exceeds remaining input"},
		{"rlimits over limit", func(t *testing.T) []byte { return patched(t, addRlimit, 65) },
			"descriptor: rlimits: length 65 exceeds limit 64"},
		{"rlimits over remaining", func(t *testing.T) []byte { return patched(t, addRlimit, 64) },
			"descriptor: rlimits: length 64 exceeds remaining input"},
		{"groups over limit", func(t *testing.T) []byte { return patched(t, addGroup, MaxGroups+1) },
			"descriptor: creds groups: length 65537 exceeds limit 65536"},
		{"groups over remaining", func(t *testing.T) []byte { return patched(t, addGroup, 1<<12) },
			"descriptor: creds groups: length 4096 exceeds remaining input"},
		{"invalid bool", func(t *testing.T) []byte {
			b := bytes.Clone(valid)
			b[offsetOf(t, func(d *Descriptor) { d.FDs[1].Cloexec = false })] = 2
			return b
		}, "descriptor: fd 1: cloexec: invalid bool 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Decode(tt.input(t))
			if err == nil {
				t.Fatalf("Decode succeeded: %+v", d)
			}
			if d != nil {
				t.Errorf("Decode returned a descriptor with error %v", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

// TestDecodeRejectsInvalid covers invariants checked by Validate, both on an
// in-memory descriptor and through Decode.
func TestDecodeRejectsInvalid(t *testing.T) {
	long := strings.Repeat("é", MaxString/2+1)
	tests := []struct {
		name   string
		change func(d *Descriptor)
		want   string
	}{
		{"vma start unaligned", func(d *Descriptor) { d.VMAs[1].Start += 1 }, "descriptor: vma 1: start 0x600001 not page aligned"},
		{"vma end unaligned", func(d *Descriptor) { d.VMAs[2].End -= 8 }, "descriptor: vma 2: end 0x7ffefff8 not page aligned"},
		{"vma empty", func(d *Descriptor) { d.VMAs[0].End = d.VMAs[0].Start }, "descriptor: vma 0: start 0x400000 not below end 0x400000"},
		{"vma inverted", func(d *Descriptor) { d.VMAs[0].End = 0x3ff000 }, "descriptor: vma 0: start 0x400000 not below end 0x3ff000"},
		{"vma overlap", func(d *Descriptor) { d.VMAs[1].Start = 0x400000 }, "descriptor: vma 1: start 0x400000 overlaps"},
		{"vma unsorted", func(d *Descriptor) { d.VMAs[0], d.VMAs[1] = d.VMAs[1], d.VMAs[0] }, "descriptor: vma 1: start 0x400000 overlaps or precedes"},
		{"vma kind", func(d *Descriptor) { d.VMAs[2].Kind = KindVsyscall + 1 }, "descriptor: vma 2: invalid kind 7"},
		{"vma kind huge", func(d *Descriptor) { d.VMAs[0].Kind = 0xFFFFFFFF }, "descriptor: vma 0: invalid kind 4294967295"},
		{"vma path long", func(d *Descriptor) { d.VMAs[0].Path = long }, "descriptor: vma 0: path: length 4098 exceeds limit 4096"},
		{"run start unaligned", func(d *Descriptor) { d.Present[0].Start = 0x600010 }, "descriptor: present run 0: start 0x600010 not page aligned"},
		{"run end unaligned", func(d *Descriptor) { d.Present[1].End = 0x601800 }, "descriptor: present run 1: end 0x601800 not page aligned"},
		{"run empty", func(d *Descriptor) { d.Present[2].End = d.Present[2].Start }, "descriptor: present run 2: start 0x7ffe0000 not below end 0x7ffe0000"},
		{"run overlap", func(d *Descriptor) { d.Present[1].Start = 0x600000 }, "descriptor: present run 1: start 0x600000 overlaps"},
		{"run unsorted", func(d *Descriptor) { d.Present[1], d.Present[2] = d.Present[2], d.Present[1] }, "descriptor: present run 2: start 0x601000 overlaps or precedes"},
		{"signo zero", func(d *Descriptor) { d.SigActions[0].Signo = 0 }, "descriptor: sigaction 0: invalid signo 0"},
		{"signo too big", func(d *Descriptor) { d.SigActions[1].Signo = 65 }, "descriptor: sigaction 1: invalid signo 65"},
		{"signo duplicate", func(d *Descriptor) { d.SigActions[1].Signo = 2 }, "descriptor: sigaction 1: duplicate signo 2"},
		{"too many sigactions", func(d *Descriptor) {
			d.SigActions = make([]SigAction, MaxSigActions+1)
			for i := range d.SigActions {
				d.SigActions[i].Signo = uint32(i + 1)
			}
		}, "descriptor: sigactions: length 65 exceeds limit 64"},
		{"fd kind", func(d *Descriptor) { d.FDs[1].Kind = FDKindMax + 1 }, "descriptor: fd 1: invalid kind 6"},
		{"fd data long", func(d *Descriptor) { d.FDs[2].Data = make([]byte, MaxPipeData+1) }, "descriptor: fd 2: data: length 1048577 exceeds limit 1048576"},
		{"fd watch negative", func(d *Descriptor) { d.FDs[4].Watches[1].TFD = -1 }, "descriptor: fd 4: watch 1: negative fd -1"},
		{"fd negative", func(d *Descriptor) { d.FDs[0].Num = -3 }, "descriptor: fd 0: negative num -3"},
		{"fd path long", func(d *Descriptor) { d.FDs[1].Path = long }, "descriptor: fd 1: path: length 4098 exceeds limit 4096"},
		{"too many fds", func(d *Descriptor) { d.FDs = make([]FD, MaxFDs+1) }, "descriptor: fds: length 65537 exceeds limit 65536"},
		{"too many rlimits", func(d *Descriptor) { d.Rlimits = make([]Rlimit, MaxRlimits+1) }, "descriptor: rlimits: length 65 exceeds limit 64"},
		{"too many groups", func(d *Descriptor) { d.Creds.Groups = make([]uint32, MaxGroups+1) }, "descriptor: creds groups: length 65537 exceeds limit 65536"},
		{"seed id long", func(d *Descriptor) { d.SeedID = long }, "descriptor: seed id: length 4098 exceeds limit 4096"},
		{"kernel long", func(d *Descriptor) { d.Kernel = long }, "descriptor: kernel: length 4098 exceeds limit 4096"},
		{"cwd long", func(d *Descriptor) { d.Cwd = long }, "descriptor: cwd: length 4098 exceeds limit 4096"},
		{"xstate big", func(d *Descriptor) { d.XState = make([]byte, MaxXState+1) }, "descriptor: xstate: length 65537 exceeds limit 65536"},
		{"auxv big", func(d *Descriptor) { d.Auxv = make([]byte, MaxAuxv+1) }, "descriptor: auxv: length 4097 exceeds limit 4096"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := fullDescriptor()
			tt.change(d)
			err := d.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Validate() = %v, want error containing %q", err, tt.want)
			}
			_, err = Decode(Encode(nil, d))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Decode() = %v, want error containing %q", err, tt.want)
			}
		})
	}
}

// Adjacent runs and VMAs (End == next Start) are allowed.
func TestValidateAdjacent(t *testing.T) {
	d := &Descriptor{
		VMAs:    []VMA{{Start: 0x1000, End: 0x2000}, {Start: 0x2000, End: 0x3000, Kind: KindVsyscall}},
		Present: []Run{{Start: 0x1000, End: 0x2000}, {Start: 0x2000, End: 0x3000}},
		FDs:     []FD{{Num: 0, Kind: FDChannel}},
	}
	if err := d.Validate(); err != nil {
		t.Fatal(err)
	}
}

// Every proper prefix of a valid encoding is rejected without panicking.
func TestDecodeEveryPrefix(t *testing.T) {
	for _, d := range []*Descriptor{{}, fullDescriptor(), unicodeDescriptor()} {
		b := Encode(nil, d)
		for i := range len(b) {
			if _, err := Decode(b[:i]); err == nil {
				t.Fatalf("Decode of %d-byte prefix of %d succeeded", i, len(b))
			}
		}
	}
}

// A tiny input claiming huge lengths is rejected without allocating them.
func TestDecodeAllocatesByInput(t *testing.T) {
	for _, change := range []func(*Descriptor){addVMA, addRun, addFD, addGroup, growXState} {
		b := patched(t, change, 1<<20)
		allocs := testing.AllocsPerRun(10, func() { _, _ = Decode(b) })
		// A failed Decode allocates the descriptor, the small strings and
		// slices before the bad field, and the error.
		if allocs > 40 {
			t.Errorf("Decode allocated %v times", allocs)
		}
	}
	// The bytes allocated do not depend on the claimed length.
	b := patched(t, addVMA, MaxVMAs)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, _ = Decode(b)
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > 4096 {
		t.Errorf("Decode of %d-byte input claiming %d VMAs allocated %d bytes", len(b), MaxVMAs, n)
	}
}

func FuzzDecode(f *testing.F) {
	small := benchDescriptor()
	small.VMAs = small.VMAs[:8]
	small.Present = small.Present[:10]
	small.XState = small.XState[:64]
	for _, d := range []*Descriptor{{}, fullDescriptor(), unicodeDescriptor(), small} {
		f.Add(Encode(nil, d))
	}
	f.Add([]byte("MTSD\x05\x00"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := Decode(b)
		if err != nil {
			if d != nil {
				t.Fatalf("Decode returned a descriptor with error %v", err)
			}
			return
		}
		if err := d.Validate(); err != nil {
			t.Fatalf("decoded descriptor does not validate: %v", err)
		}
		b2 := Encode(nil, d)
		if !bytes.Equal(b2, b) {
			t.Fatalf("encoding is not canonical:\n in %x\nout %x", b, b2)
		}
		d2, err := Decode(b2)
		if err != nil {
			t.Fatalf("Decode(Encode(Decode(b))): %v", err)
		}
		if !reflect.DeepEqual(d, d2) {
			t.Fatalf("round trip mismatch:\n got %+v\nwant %+v", d2, d)
		}
	})
}

func BenchmarkEncode(b *testing.B) {
	d := benchDescriptor()
	buf := Encode(nil, d)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		buf = Encode(buf[:0], d)
	}
}

// BenchmarkEncodeNew includes allocating the output buffer.
func BenchmarkEncodeNew(b *testing.B) {
	d := benchDescriptor()
	b.SetBytes(int64(len(Encode(nil, d))))
	b.ReportAllocs()
	for b.Loop() {
		_ = Encode(nil, d)
	}
}

func BenchmarkDecode(b *testing.B) {
	buf := Encode(nil, benchDescriptor())
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(buf); err != nil {
			b.Fatal(err)
		}
	}
}
