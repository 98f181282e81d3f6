package descriptor

import (
	"encoding/binary"
	"fmt"
)

// Binary format (version 5). All integers are little-endian and fixed width;
// signed integers are stored as their two's-complement bit pattern. Strings
// and byte slices are a u32 length followed by the bytes; lists are a u32
// count followed by the elements. Fields appear in exactly this order:
//
//	magic "MTSD"  version u16
//	SeedID Name Node Kernel Exe (str)  ExeFile (file)  PID u32
//	Regs 27×u64  XState (bytes)
//	VMAs (list of: Start u64, End u64, Prot u32, Flags u32, Kind u32,
//	      Offset u64, File file, Path str)
//	Present (list of: Start u64, End u64)
//	MM 11×u64 (struct order)  Auxv (bytes)  VDSOSyscall TIDAddr ClearTID u64
//	SigActions (list of: Signo u32, Handler Flags Restorer Mask u64)
//	SigMask u64  AltStackSP u64  AltStackFlags u32  AltStackSize u64
//	RobustHead u64  RobustLen u64  Rseq (Addr u64, Len Sig Flags u32)
//	FDs (list of: Num u32, Kind u32, Flags u32, Pos u64, Cloexec u8 (0 or 1),
//	     File file, Path str, Group u64, Count u64, Data bytes,
//	     Watches (list of: TFD u32, Events u32, Data u64))
//	Cwd str  Umask u32  Rlimits (list of: Resource u32, Cur Max u64)
//	Creds (UID EUID SUID FSUID GID EGID SGID FSGID u32, Groups list of u32)
//	Root str
//	Threads (list of: TID u32, Regs 27×u64, SigMask u64, TIDAddr u64,
//	         AltStackSP u64, AltStackFlags u32, AltStackSize u64,
//	         RobustHead u64, RobustLen u64, Rseq (Addr u64, Len Sig Flags u32),
//	         XState bytes, Comm str)
//	Comm str
//	TIDRefs (list of: Addr u64, Thread u32)
//
// where file is Dev u64, Ino u64, Size u64, MtimeNsec u64. The encoding is
// canonical: a valid encoding decodes and re-encodes to the same bytes.

// Magic is the four bytes every encoded descriptor starts with.
const Magic = "MTSD"

// Limits enforced by Decode and Validate.
const (
	MaxVMAs       = 1 << 20  // entries in VMAs
	MaxRuns       = 1 << 24  // entries in Present
	MaxString     = 4096     // bytes in any string (PATH_MAX)
	MaxXState     = 64 << 10 // bytes in XState
	MaxAuxv       = 4 << 10  // bytes in Auxv
	MaxFDs        = 65536    // entries in FDs
	MaxGroups     = 65536    // entries in Creds.Groups (NGROUPS_MAX)
	MaxSigActions = 64       // entries in SigActions (_NSIG)
	MaxRlimits    = 64       // entries in Rlimits
	MaxThreads    = 4096     // entries in Threads
	MaxPipeData   = 1 << 20  // bytes in one FD's Data (the largest pipe buffer by default)
	MaxWatches    = 65536    // entries in one FD's Watches
	MaxComm       = 15       // bytes in Comm (TASK_COMM_LEN less the NUL)
	MaxTIDRefs    = 4096     // entries in TIDRefs
)

// Encoded sizes of fixed-size parts, used for pre-sizing buffers and for
// bounding claimed counts by the remaining input.
const (
	headerSize    = len(Magic) + 2
	fileIDSize    = 4 * 8
	vmaFixedSize  = 8 + 8 + 4 + 4 + 4 + 8 + fileIDSize
	vmaMinSize    = vmaFixedSize + 4 // + path
	runSize       = 8 + 8
	sigActionSize = 4 + 4*8
	fdFixedSize   = 4 + 4 + 4 + 8 + 1 + fileIDSize
	fdMinSize     = fdFixedSize + 4 + 8 + 8 + 4 + 4 // + path, data, watches
	watchSize     = 4 + 4 + 8
	rlimitSize    = 4 + 8 + 8
	tidRefSize    = 8 + 4
	threadFixed   = 4 + 27*8 + 8 + 8 + 8 + 4 + 8 + 8 + 8 + (8 + 4 + 4 + 4)
	threadMinSize = threadFixed + 4 + 4 // + xstate, comm
)

// Encode appends the descriptor in the versioned binary format to dst and
// returns it. Encode does not validate d; Decode rejects what Validate
// rejects.
func Encode(dst []byte, d *Descriptor) []byte {
	w := writer{b: grow(dst, encodedSize(d))}
	w.b = append(w.b, Magic...)
	w.b = binary.LittleEndian.AppendUint16(w.b, Version)

	w.str(d.SeedID)
	w.str(d.Name)
	w.str(d.Node)
	w.str(d.Kernel)
	w.str(d.Exe)
	w.file(d.ExeFile)
	w.u32(uint32(d.PID))

	for _, r := range d.Regs {
		w.u64(r)
	}
	w.bytes(d.XState)

	w.u32(uint32(len(d.VMAs)))
	for i := range d.VMAs {
		v := &d.VMAs[i]
		w.u64(v.Start)
		w.u64(v.End)
		w.u32(v.Prot)
		w.u32(v.Flags)
		w.u32(v.Kind)
		w.u64(v.Offset)
		w.file(v.File)
		w.str(v.Path)
	}
	w.u32(uint32(len(d.Present)))
	for _, r := range d.Present {
		w.u64(r.Start)
		w.u64(r.End)
	}
	m := &d.MM
	for _, x := range [...]uint64{m.StartCode, m.EndCode, m.StartData, m.EndData,
		m.StartBrk, m.Brk, m.StartStack, m.ArgStart, m.ArgEnd, m.EnvStart, m.EnvEnd} {
		w.u64(x)
	}
	w.bytes(d.Auxv)
	w.u64(d.VDSOSyscall)
	w.u64(d.TIDAddr)
	w.u64(d.ClearTID)

	w.u32(uint32(len(d.SigActions)))
	for _, s := range d.SigActions {
		w.u32(s.Signo)
		w.u64(s.Handler)
		w.u64(s.Flags)
		w.u64(s.Restorer)
		w.u64(s.Mask)
	}
	w.u64(d.SigMask)
	w.u64(d.AltStackSP)
	w.u32(d.AltStackFlags)
	w.u64(d.AltStackSize)
	w.u64(d.RobustHead)
	w.u64(d.RobustLen)
	w.u64(d.Rseq.Addr)
	w.u32(d.Rseq.Len)
	w.u32(d.Rseq.Sig)
	w.u32(d.Rseq.Flags)

	w.u32(uint32(len(d.FDs)))
	for i := range d.FDs {
		f := &d.FDs[i]
		w.u32(uint32(f.Num))
		w.u32(f.Kind)
		w.u32(f.Flags)
		w.u64(uint64(f.Pos))
		w.bool(f.Cloexec)
		w.file(f.File)
		w.str(f.Path)
		w.u64(f.Group)
		w.u64(f.Count)
		w.bytes(f.Data)
		w.u32(uint32(len(f.Watches)))
		for _, e := range f.Watches {
			w.u32(uint32(e.TFD))
			w.u32(e.Events)
			w.u64(e.Data)
		}
	}
	w.str(d.Cwd)
	w.u32(d.Umask)
	w.u32(uint32(len(d.Rlimits)))
	for _, r := range d.Rlimits {
		w.u32(r.Resource)
		w.u64(r.Cur)
		w.u64(r.Max)
	}
	c := &d.Creds
	for _, x := range [...]uint32{c.UID, c.EUID, c.SUID, c.FSUID, c.GID, c.EGID, c.SGID, c.FSGID} {
		w.u32(x)
	}
	w.u32(uint32(len(c.Groups)))
	for _, g := range c.Groups {
		w.u32(g)
	}
	w.str(d.Root)
	w.u32(uint32(len(d.Threads)))
	for i := range d.Threads {
		th := &d.Threads[i]
		w.u32(uint32(th.TID))
		for _, r := range th.Regs {
			w.u64(r)
		}
		w.u64(th.SigMask)
		w.u64(th.TIDAddr)
		w.u64(th.AltStackSP)
		w.u32(th.AltStackFlags)
		w.u64(th.AltStackSize)
		w.u64(th.RobustHead)
		w.u64(th.RobustLen)
		w.u64(th.Rseq.Addr)
		w.u32(th.Rseq.Len)
		w.u32(th.Rseq.Sig)
		w.u32(th.Rseq.Flags)
		w.bytes(th.XState)
		w.str(th.Comm)
	}
	w.str(d.Comm)
	w.u32(uint32(len(d.TIDRefs)))
	for _, t := range d.TIDRefs {
		w.u64(t.Addr)
		w.u32(uint32(t.Thread))
	}
	return w.b
}

// encodedSize returns the exact number of bytes Encode appends for d.
func encodedSize(d *Descriptor) int {
	n := headerSize
	n += 5*4 + len(d.SeedID) + len(d.Name) + len(d.Node) + len(d.Kernel) + len(d.Exe)
	n += fileIDSize + 4
	n += len(d.Regs)*8 + 4 + len(d.XState)
	n += 4 + len(d.VMAs)*vmaMinSize
	for i := range d.VMAs {
		n += len(d.VMAs[i].Path)
	}
	n += 4 + len(d.Present)*runSize
	n += 11*8 + 4 + len(d.Auxv) + 3*8
	n += 4 + len(d.SigActions)*sigActionSize
	n += 8 + 8 + 4 + 8 + 8 + 8 + (8 + 4 + 4 + 4)
	n += 4 + len(d.FDs)*fdMinSize
	for i := range d.FDs {
		n += len(d.FDs[i].Path) + len(d.FDs[i].Data) + len(d.FDs[i].Watches)*watchSize
	}
	n += 4 + len(d.Cwd) + 4
	n += 4 + len(d.Rlimits)*rlimitSize
	n += 8*4 + 4 + len(d.Creds.Groups)*4
	n += 4 + len(d.Root)
	n += 4 + len(d.Threads)*threadMinSize
	for i := range d.Threads {
		n += len(d.Threads[i].XState) + len(d.Threads[i].Comm)
	}
	n += 4 + len(d.Comm)
	n += 4 + len(d.TIDRefs)*tidRefSize
	return n
}

// grow returns b with room for at least n more bytes.
func grow(b []byte, n int) []byte {
	if cap(b)-len(b) >= n {
		return b
	}
	nb := make([]byte, len(b), len(b)+n)
	copy(nb, b)
	return nb
}

// writer appends fixed-width little-endian fields.
type writer struct{ b []byte }

func (w *writer) u32(v uint32) { w.b = binary.LittleEndian.AppendUint32(w.b, v) }
func (w *writer) u64(v uint64) { w.b = binary.LittleEndian.AppendUint64(w.b, v) }

func (w *writer) bool(v bool) {
	if v {
		w.b = append(w.b, 1)
	} else {
		w.b = append(w.b, 0)
	}
}

func (w *writer) str(s string) {
	w.u32(uint32(len(s)))
	w.b = append(w.b, s...)
}

func (w *writer) bytes(p []byte) {
	w.u32(uint32(len(p)))
	w.b = append(w.b, p...)
}

func (w *writer) file(f FileID) {
	w.u64(f.Dev)
	w.u64(f.Ino)
	w.u64(uint64(f.Size))
	w.u64(uint64(f.MtimeNsec))
}

// Decode parses a descriptor produced by Encode. It never panics and rejects
// a wrong magic, an unknown version, truncated or trailing data, lengths and
// counts larger than the remaining input or than the Max* limits, and
// anything Validate rejects. Errors name the offending field. Empty slices
// decode as nil. Decode allocates in proportion to len(b) and does not
// retain b.
func Decode(b []byte) (*Descriptor, error) {
	r := reader{b: b, idx: -1}
	if len(b) < len(Magic) || string(b[:len(Magic)]) != Magic {
		return nil, fmt.Errorf("descriptor: magic: bad magic %q, want %q", b[:min(len(b), len(Magic))], Magic)
	}
	r.off = len(Magic)
	if v := r.u16("version"); r.err == nil && v != Version {
		return nil, fmt.Errorf("descriptor: version: unsupported version %d (want %d)", v, Version)
	}

	d := new(Descriptor)
	d.SeedID = r.str("seed id")
	d.Name = r.str("name")
	d.Node = r.str("node")
	d.Kernel = r.str("kernel")
	d.Exe = r.str("exe")
	d.ExeFile = r.file("exe file")
	d.PID = int32(r.u32("pid"))

	for i := range d.Regs {
		d.Regs[i] = r.u64("regs")
	}
	d.XState = r.bytes("xstate", MaxXState)

	if n := r.length("vmas", MaxVMAs, vmaMinSize); n > 0 {
		d.VMAs = make([]VMA, n)
		r.sect = "vma"
		var prev string
		for i := range d.VMAs {
			r.idx = i
			f := r.fixed("fields", vmaFixedSize)
			if f == nil {
				break
			}
			v := &d.VMAs[i]
			v.Start = f.u64()
			v.End = f.u64()
			v.Prot = f.u32()
			v.Flags = f.u32()
			v.Kind = f.u32()
			v.Offset = f.u64()
			v.File = f.file()
			// Nearby VMAs often map the same file; share the string.
			if p := r.strBytes("path"); string(p) == prev {
				v.Path = prev
			} else if v.Path = string(p); v.Path != "" {
				prev = v.Path
			}
		}
		r.sect, r.idx = "", -1
	}
	if n := r.length("present", MaxRuns, runSize); n > 0 {
		f := r.fixed("present", n*runSize) // cannot fail: length checked n
		d.Present = make([]Run, n)
		for i := range d.Present {
			d.Present[i] = Run{Start: f.u64(), End: f.u64()}
		}
	}
	m := &d.MM
	for _, p := range [...]*uint64{&m.StartCode, &m.EndCode, &m.StartData, &m.EndData,
		&m.StartBrk, &m.Brk, &m.StartStack, &m.ArgStart, &m.ArgEnd, &m.EnvStart, &m.EnvEnd} {
		*p = r.u64("mm")
	}
	d.Auxv = r.bytes("auxv", MaxAuxv)
	d.VDSOSyscall = r.u64("vdso syscall")
	d.TIDAddr = r.u64("tid addr")
	d.ClearTID = r.u64("clear tid")

	if n := r.length("sigactions", MaxSigActions, sigActionSize); n > 0 {
		f := r.fixed("sigactions", n*sigActionSize)
		d.SigActions = make([]SigAction, n)
		for i := range d.SigActions {
			d.SigActions[i] = SigAction{Signo: f.u32(), Handler: f.u64(), Flags: f.u64(), Restorer: f.u64(), Mask: f.u64()}
		}
	}
	d.SigMask = r.u64("sigmask")
	d.AltStackSP = r.u64("altstack sp")
	d.AltStackFlags = r.u32("altstack flags")
	d.AltStackSize = r.u64("altstack size")
	d.RobustHead = r.u64("robust head")
	d.RobustLen = r.u64("robust len")
	d.Rseq.Addr = r.u64("rseq addr")
	d.Rseq.Len = r.u32("rseq len")
	d.Rseq.Sig = r.u32("rseq sig")
	d.Rseq.Flags = r.u32("rseq flags")

	if n := r.length("fds", MaxFDs, fdMinSize); n > 0 {
		d.FDs = make([]FD, n)
		r.sect = "fd"
		for i := range d.FDs {
			r.idx = i
			f := r.fixed("fields", fdFixedSize)
			if f == nil {
				break
			}
			fd := &d.FDs[i]
			fd.Num = int32(f.u32())
			fd.Kind = f.u32()
			fd.Flags = f.u32()
			fd.Pos = int64(f.u64())
			switch b := f.u8(); b {
			case 0, 1:
				fd.Cloexec = b == 1
			default:
				r.fail("cloexec", "invalid bool %d", b)
			}
			fd.File = f.file()
			fd.Path = r.str("path")
			fd.Group = r.u64("group")
			fd.Count = r.u64("count")
			fd.Data = r.bytes("data", MaxPipeData)
			if n := r.length("watches", MaxWatches, watchSize); n > 0 {
				w := r.fixed("watches", n*watchSize)
				if w == nil {
					break
				}
				fd.Watches = make([]EpollWatch, n)
				for j := range fd.Watches {
					fd.Watches[j] = EpollWatch{TFD: int32(w.u32()), Events: w.u32(), Data: w.u64()}
				}
			}
		}
		r.sect, r.idx = "", -1
	}
	d.Cwd = r.str("cwd")
	d.Umask = r.u32("umask")
	if n := r.length("rlimits", MaxRlimits, rlimitSize); n > 0 {
		f := r.fixed("rlimits", n*rlimitSize)
		d.Rlimits = make([]Rlimit, n)
		for i := range d.Rlimits {
			d.Rlimits[i] = Rlimit{Resource: f.u32(), Cur: f.u64(), Max: f.u64()}
		}
	}
	c := &d.Creds
	for _, p := range [...]*uint32{&c.UID, &c.EUID, &c.SUID, &c.FSUID, &c.GID, &c.EGID, &c.SGID, &c.FSGID} {
		*p = r.u32("creds")
	}
	if n := r.length("creds groups", MaxGroups, 4); n > 0 {
		f := r.fixed("creds groups", n*4)
		c.Groups = make([]uint32, n)
		for i := range c.Groups {
			c.Groups[i] = f.u32()
		}
	}
	d.Root = r.str("root")
	if n := r.length("threads", MaxThreads, threadMinSize); n > 0 {
		d.Threads = make([]Thread, n)
		r.sect = "thread"
		for i := range d.Threads {
			r.idx = i
			f := r.fixed("fields", threadFixed)
			if f == nil {
				break
			}
			th := &d.Threads[i]
			th.TID = int32(f.u32())
			for j := range th.Regs {
				th.Regs[j] = f.u64()
			}
			th.SigMask = f.u64()
			th.TIDAddr = f.u64()
			th.AltStackSP = f.u64()
			th.AltStackFlags = f.u32()
			th.AltStackSize = f.u64()
			th.RobustHead = f.u64()
			th.RobustLen = f.u64()
			th.Rseq.Addr = f.u64()
			th.Rseq.Len = f.u32()
			th.Rseq.Sig = f.u32()
			th.Rseq.Flags = f.u32()
			th.XState = r.bytes("xstate", MaxXState)
			th.Comm = r.str("comm")
		}
		r.sect, r.idx = "", -1
	}
	d.Comm = r.str("comm")
	if n := r.length("tid refs", MaxTIDRefs, tidRefSize); n > 0 {
		f := r.fixed("tid refs", n*tidRefSize)
		d.TIDRefs = make([]TIDRef, n)
		for i := range d.TIDRefs {
			d.TIDRefs[i] = TIDRef{Addr: f.u64(), Thread: int32(f.u32())}
		}
	}

	if r.err != nil {
		return nil, r.err
	}
	if rest := len(b) - r.off; rest != 0 {
		return nil, fmt.Errorf("descriptor: trailing data: %d bytes after the last field", rest)
	}
	if err := d.Validate(); err != nil {
		return nil, err
	}
	return d, nil
}

// reader consumes fields from b. The first error sticks: it consumes the rest
// of the input, and later reads return zero values. sect and idx
// name the list element being read (idx < 0: none) for error messages.
type reader struct {
	b    []byte
	off  int
	err  error
	sect string
	idx  int
}

// fail records an error about field unless one is already recorded, and
// consumes the rest of the input so that later reads fail cheaply.
func (r *reader) fail(field, format string, args ...any) {
	if r.err != nil {
		return
	}
	msg := fmt.Sprintf(format, args...)
	switch {
	case r.sect == "":
		r.err = fmt.Errorf("descriptor: %s: %s", field, msg)
	case r.idx < 0:
		r.err = fmt.Errorf("descriptor: %s: %s: %s", r.sect, field, msg)
	default:
		r.err = fmt.Errorf("descriptor: %s %d: %s: %s", r.sect, r.idx, field, msg)
	}
	r.off = len(r.b)
}

// next returns the next n bytes, or nil after recording a truncation error.
func (r *reader) next(field string, n int) []byte {
	if len(r.b)-r.off < n {
		r.truncated(field, n)
		return nil
	}
	p := r.b[r.off:][:n]
	r.off += n
	return p
}

// truncated records a truncation error. It is separate from next so that the
// arguments are only boxed for fmt when the error is actually recorded.
func (r *reader) truncated(field string, n int) {
	if r.err == nil {
		r.fail(field, "truncated input: need %d bytes at offset %d, have %d", n, r.off, len(r.b)-r.off)
	}
}

func (r *reader) u16(field string) uint16 {
	if p := r.next(field, 2); p != nil {
		return binary.LittleEndian.Uint16(p)
	}
	return 0
}

func (r *reader) u32(field string) uint32 {
	if p := r.next(field, 4); p != nil {
		return binary.LittleEndian.Uint32(p)
	}
	return 0
}

func (r *reader) u64(field string) uint64 {
	if p := r.next(field, 8); p != nil {
		return binary.LittleEndian.Uint64(p)
	}
	return 0
}

// fixed returns the next n bytes for decoding with fixedFields, or nil after
// recording a truncation error.
func (r *reader) fixed(field string, n int) fixedFields {
	return fixedFields(r.next(field, n))
}

// length reads a u32 length or count and checks it against max and against
// the remaining input, assuming each unit takes at least unit bytes.
func (r *reader) length(field string, max, unit int) int {
	n := r.u32(field)
	if r.err != nil {
		return 0
	}
	if uint64(n) > uint64(max) {
		r.fail(field, "length %d exceeds limit %d", n, max)
		return 0
	}
	if rest := len(r.b) - r.off; uint64(n)*uint64(unit) > uint64(rest) {
		r.fail(field, "length %d exceeds remaining input (%d bytes)", n, rest)
		return 0
	}
	return int(n)
}

// strBytes reads a length-prefixed string without copying it.
func (r *reader) strBytes(field string) []byte {
	return r.next(field, r.length(field, MaxString, 1))
}

func (r *reader) str(field string) string {
	return string(r.strBytes(field))
}

// bytes reads a length-prefixed byte slice of at most max bytes into a new
// slice; empty decodes as nil.
func (r *reader) bytes(field string, max int) []byte {
	p := r.next(field, r.length(field, max, 1))
	if len(p) == 0 {
		return nil
	}
	return append([]byte(nil), p...)
}

func (r *reader) file(field string) FileID {
	f := r.fixed(field, fileIDSize)
	if f == nil {
		return FileID{}
	}
	return f.file()
}

// fixedFields decodes consecutive fixed-width fields from a block whose
// length the caller has checked; its methods are small enough to inline.
type fixedFields []byte

func (f *fixedFields) u8() uint8 {
	v := (*f)[0]
	*f = (*f)[1:]
	return v
}

func (f *fixedFields) u32() uint32 {
	v := binary.LittleEndian.Uint32(*f)
	*f = (*f)[4:]
	return v
}

func (f *fixedFields) u64() uint64 {
	v := binary.LittleEndian.Uint64(*f)
	*f = (*f)[8:]
	return v
}

func (f *fixedFields) file() FileID {
	return FileID{Dev: f.u64(), Ino: f.u64(), Size: int64(f.u64()), MtimeNsec: int64(f.u64())}
}

// Validate checks the invariants Decode enforces on an in-memory descriptor:
// the Max* limits on lengths and counts; VMAs page aligned with Start < End,
// sorted and non-overlapping, with a known Kind; Present runs page aligned
// with Start < End, sorted and disjoint; signal numbers in 1..64 and not
// repeated; FD numbers non-negative with a known Kind.
func (d *Descriptor) Validate() error {
	for _, s := range [...]struct{ field, s string }{
		{"seed id", d.SeedID}, {"name", d.Name}, {"node", d.Node},
		{"kernel", d.Kernel}, {"exe", d.Exe}, {"cwd", d.Cwd},
	} {
		if err := checkLen(s.field, len(s.s), MaxString); err != nil {
			return err
		}
	}
	if err := checkLen("xstate", len(d.XState), MaxXState); err != nil {
		return err
	}
	if err := checkLen("comm", len(d.Comm), MaxComm); err != nil {
		return err
	}
	if err := checkLen("tid refs", len(d.TIDRefs), MaxTIDRefs); err != nil {
		return err
	}
	for i, t := range d.TIDRefs {
		if t.Thread < -1 || int(t.Thread) >= len(d.Threads) {
			return fmt.Errorf("descriptor: tid ref %d: thread %d of %d", i, t.Thread, len(d.Threads))
		}
		if t.Addr%4 != 0 {
			return fmt.Errorf("descriptor: tid ref %d: address %#x is not 4-byte aligned", i, t.Addr)
		}
	}
	if err := checkLen("auxv", len(d.Auxv), MaxAuxv); err != nil {
		return err
	}
	if err := checkLen("vmas", len(d.VMAs), MaxVMAs); err != nil {
		return err
	}
	if err := checkLen("present", len(d.Present), MaxRuns); err != nil {
		return err
	}
	if err := checkLen("sigactions", len(d.SigActions), MaxSigActions); err != nil {
		return err
	}
	if err := checkLen("fds", len(d.FDs), MaxFDs); err != nil {
		return err
	}
	if err := checkLen("rlimits", len(d.Rlimits), MaxRlimits); err != nil {
		return err
	}
	if err := checkLen("creds groups", len(d.Creds.Groups), MaxGroups); err != nil {
		return err
	}
	if err := checkLen("threads", len(d.Threads), MaxThreads); err != nil {
		return err
	}
	for i := range d.Threads {
		if err := checkLen(fmt.Sprintf("thread %d: xstate", i), len(d.Threads[i].XState), MaxXState); err != nil {
			return err
		}
		if err := checkLen(fmt.Sprintf("thread %d: comm", i), len(d.Threads[i].Comm), MaxComm); err != nil {
			return err
		}
	}

	for i := range d.VMAs {
		v := &d.VMAs[i]
		if err := checkRange(v.Start, v.End); err != nil {
			return fmt.Errorf("descriptor: vma %d: %w", i, err)
		}
		if i > 0 && v.Start < d.VMAs[i-1].End {
			return fmt.Errorf("descriptor: vma %d: start %#x overlaps or precedes previous vma ending at %#x", i, v.Start, d.VMAs[i-1].End)
		}
		if v.Kind > KindVsyscall {
			return fmt.Errorf("descriptor: vma %d: invalid kind %d", i, v.Kind)
		}
		if len(v.Path) > MaxString {
			return fmt.Errorf("descriptor: vma %d: path: length %d exceeds limit %d", i, len(v.Path), MaxString)
		}
	}
	for i, r := range d.Present {
		if err := checkRange(r.Start, r.End); err != nil {
			return fmt.Errorf("descriptor: present run %d: %w", i, err)
		}
		if i > 0 && r.Start < d.Present[i-1].End {
			return fmt.Errorf("descriptor: present run %d: start %#x overlaps or precedes previous run ending at %#x", i, r.Start, d.Present[i-1].End)
		}
	}
	var seen uint64
	for i, s := range d.SigActions {
		if s.Signo < 1 || s.Signo > 64 {
			return fmt.Errorf("descriptor: sigaction %d: invalid signo %d", i, s.Signo)
		}
		bit := uint64(1) << (s.Signo - 1)
		if seen&bit != 0 {
			return fmt.Errorf("descriptor: sigaction %d: duplicate signo %d", i, s.Signo)
		}
		seen |= bit
	}
	for i := range d.FDs {
		f := &d.FDs[i]
		if f.Num < 0 {
			return fmt.Errorf("descriptor: fd %d: negative num %d", i, f.Num)
		}
		if f.Kind > FDKindMax {
			return fmt.Errorf("descriptor: fd %d: invalid kind %d", i, f.Kind)
		}
		if len(f.Data) > MaxPipeData {
			return fmt.Errorf("descriptor: fd %d: data: length %d exceeds limit %d", i, len(f.Data), MaxPipeData)
		}
		if err := checkLen(fmt.Sprintf("fd %d: watches", i), len(f.Watches), MaxWatches); err != nil {
			return err
		}
		for j, e := range f.Watches {
			if e.TFD < 0 {
				return fmt.Errorf("descriptor: fd %d: watch %d: negative fd %d", i, j, e.TFD)
			}
		}
		if len(f.Path) > MaxString {
			return fmt.Errorf("descriptor: fd %d: path: length %d exceeds limit %d", i, len(f.Path), MaxString)
		}
	}
	return nil
}

func checkLen(field string, n, max int) error {
	if n > max {
		return fmt.Errorf("descriptor: %s: length %d exceeds limit %d", field, n, max)
	}
	return nil
}

// checkRange checks that [start, end) is a non-empty page-aligned range.
func checkRange(start, end uint64) error {
	switch {
	case start%PageSize != 0:
		return fmt.Errorf("start %#x not page aligned", start)
	case end%PageSize != 0:
		return fmt.Errorf("end %#x not page aligned", end)
	case start >= end:
		return fmt.Errorf("start %#x not below end %#x", start, end)
	}
	return nil
}
