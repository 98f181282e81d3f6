package stub

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/internal/ptrace"
)

// TestMain marks every inherited fd close-on-exec so the stub processes the
// tests start hold nothing of the test runner.
func TestMain(m *testing.M) {
	testenv.CloseInheritedFDs()
	os.Exit(m.Run())
}

func TestELFParses(t *testing.T) {
	img := ELF()
	f, err := elf.NewFile(bytes.NewReader(img))
	if err != nil {
		t.Fatalf("debug/elf rejects the stub: %v", err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB {
		t.Errorf("class %v data %v, want ELFCLASS64 ELFDATA2LSB", f.Class, f.Data)
	}
	if f.Type != elf.ET_EXEC {
		t.Errorf("type %v, want ET_EXEC", f.Type)
	}
	if f.Machine != elf.EM_X86_64 {
		t.Errorf("machine %v, want EM_X86_64", f.Machine)
	}
	if f.Entry != Base+EntryOffset {
		t.Errorf("entry %#x, want %#x", f.Entry, Base+EntryOffset)
	}
	if len(f.Progs) != 1 {
		t.Fatalf("%d program headers, want 1", len(f.Progs))
	}
	p := f.Progs[0]
	if p.Type != elf.PT_LOAD || p.Flags != elf.PF_R|elf.PF_X {
		t.Errorf("segment type %v flags %v, want PT_LOAD R+X", p.Type, p.Flags)
	}
	if p.Vaddr != Base || p.Paddr != Base || p.Off != 0 {
		t.Errorf("segment vaddr %#x paddr %#x off %#x, want %#x %#x 0", p.Vaddr, p.Paddr, p.Off, Base, Base)
	}
	if p.Filesz != uint64(len(img)) || p.Memsz != uint64(len(img)) {
		t.Errorf("segment filesz %d memsz %d, want %d", p.Filesz, p.Memsz, len(img))
	}
	if p.Align != 0x1000 || Base%p.Align != 0 {
		t.Errorf("segment align %#x (base %#x)", p.Align, Base)
	}
	if len(f.Sections) != 0 {
		t.Errorf("%d sections, want none", len(f.Sections))
	}
	// The entry point, within the segment, is `syscall; int3`.
	off := f.Entry - p.Vaddr + p.Off
	if off+3 > uint64(len(img)) {
		t.Fatalf("entry offset %d outside the image of %d bytes", off, len(img))
	}
	if got := img[off : off+3]; !bytes.Equal(got, []byte{0x0f, 0x05, 0xcc}) {
		t.Errorf("entry bytes % x, want 0f 05 cc", got)
	}
	// The loop back: jmp rel8 lands on the entry.
	if img[off+3] != 0xeb || int(off)+5+int(int8(img[off+4])) != int(off) {
		t.Errorf("jmp at entry+3 is % x, want a jump back to the entry", img[off+3:off+5])
	}
	if Base < 0x10000 {
		t.Errorf("Base %#x is below the default vm.mmap_min_addr", Base)
	}
}

func TestCode(t *testing.T) {
	c := Code()
	if len(c) < SyscallOffset+3 {
		t.Fatalf("Code is %d bytes", len(c))
	}
	if !bytes.Equal(c[:len(Runner)], Runner) {
		t.Errorf("Code does not start with Runner")
	}
	if len(Runner) > SyscallOffset {
		t.Errorf("Runner (%d bytes) overlaps the syscall gadget at %#x", len(Runner), SyscallOffset)
	}
	if got := c[SyscallOffset : SyscallOffset+3]; !bytes.Equal(got, []byte{0x0f, 0x05, 0xcc}) {
		t.Errorf("bytes at SyscallOffset % x, want 0f 05 cc", got)
	}
	if len(c) < ClonerOffset+len(Cloner) || !bytes.Equal(c[ClonerOffset:ClonerOffset+len(Cloner)], Cloner) || SyscallOffset+3 > ClonerOffset {
		t.Errorf("Cloner is not at ClonerOffset %#x (or overlaps the syscall gadget)", ClonerOffset)
	}
	if Runner[len(Runner)-1] != 0xcc {
		t.Errorf("Runner ends with %#x, want int3", Runner[len(Runner)-1])
	}
	// Code must return a fresh copy.
	c[0] ^= 0xff
	if Code()[0] != Runner[0] {
		t.Errorf("Code shares its buffer between calls")
	}
}

func TestTableBytes(t *testing.T) {
	b := NewBatch(0x7000, 0x400)
	if i := b.Add("one", 39); i != 0 {
		t.Errorf("first Add = %d", i)
	}
	if i := b.Add("two", 9, 1, 2, 3, 4, 5, 6); i != 1 {
		t.Errorf("second Add = %d", i)
	}
	if i := b.Add("three", 3, ^uint64(0)); i != 2 {
		t.Errorf("third Add = %d", i)
	}
	if b.Calls[1].What != "two" || b.Calls[2].Args != [6]uint64{^uint64(0)} {
		t.Errorf("calls recorded as %+v", b.Calls)
	}
	tb := b.TableBytes()
	if len(tb) != 3*EntrySize {
		t.Fatalf("table is %d bytes, want %d", len(tb), 3*EntrySize)
	}
	want := [][8]uint64{
		{39, 0, 0, 0, 0, 0, 0, NotRun},
		{9, 1, 2, 3, 4, 5, 6, NotRun},
		{3, ^uint64(0), 0, 0, 0, 0, 0, NotRun},
	}
	for i, w := range want {
		for j, v := range w {
			if got := binary.LittleEndian.Uint64(tb[i*EntrySize+8*j:]); got != v {
				t.Errorf("entry %d word %d = %#x, want %#x", i, j, got, v)
			}
		}
	}
	// Fresh table: nothing ran.
	for i, r := range Results(tb) {
		if r != NotRun {
			t.Errorf("result %d of a fresh table = %#x", i, r)
		}
	}
	if len(NewBatch(0, 0).TableBytes()) != 0 {
		t.Errorf("empty batch has a non-empty table")
	}
}

func TestArena(t *testing.T) {
	b := NewBatch(0x10000, 0x100)
	a0 := b.Data([]byte{1, 2, 3})
	a1 := b.String("ab")
	a2 := b.Data([]byte{9})
	a3 := b.Data(nil)
	a4 := b.String("")
	if a0 != 0x10100 {
		t.Errorf("first datum at %#x, want %#x", a0, 0x10100)
	}
	if a1 != 0x10108 || a2 != 0x10110 || a3 != 0x10118 || a4 != 0x10118 {
		t.Errorf("addresses %#x %#x %#x %#x, want 0x10108 0x10110 0x10118 0x10118", a1, a2, a3, a4)
	}
	addr, arena := b.Arena()
	if addr != 0x10100 {
		t.Errorf("arena address %#x", addr)
	}
	want := []byte{1, 2, 3, 0, 0, 0, 0, 0, 'a', 'b', 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0}
	if !bytes.Equal(arena, want) {
		t.Errorf("arena\n% x\nwant\n% x", arena, want)
	}
	for _, a := range []uint64{a0, a1, a2, a3} {
		if a%8 != 0 {
			t.Errorf("datum at %#x not 8-byte aligned", a)
		}
	}
}

func TestResults(t *testing.T) {
	tb := make([]byte, 2*EntrySize+10) // a trailing partial entry is ignored
	binary.LittleEndian.PutUint64(tb[56:], 42)
	binary.LittleEndian.PutUint64(tb[EntrySize+56:], ^uint64(8))
	binary.LittleEndian.PutUint64(tb[EntrySize:], 77) // nr, not a result
	r := Results(tb)
	if len(r) != 2 || r[0] != 42 || r[1] != ^uint64(8) {
		t.Errorf("Results = %#x, want [0x2a 0xfffffffffffffff7]", r)
	}
	if len(Results(nil)) != 0 {
		t.Errorf("Results(nil) not empty")
	}
}

// stubProc is a stub process started under ptrace by a Tracer.
type stubProc struct {
	t    *testing.T
	tr   *ptrace.Tracer
	pid  int
	regs unix.PtraceRegs
}

// startStub writes the stub image to an executable file, starts it under
// PTRACE_TRACEME from the tracer thread and waits for its exec stop.
func startStub(t *testing.T, dir string) *stubProc {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (ptrace)")
	}
	path := filepath.Join(dir, "stub")
	if err := os.WriteFile(path, ELF(), 0o755); err != nil {
		t.Fatal(err)
	}
	tr := ptrace.NewTracer()
	s := &stubProc{t: t, tr: tr, pid: -1}
	t.Cleanup(func() {
		if s.pid > 0 {
			_ = tr.Do(func() error {
				_ = unix.Kill(s.pid, unix.SIGKILL)
				for {
					ws, err := ptrace.Wait(s.pid)
					if err != nil || ws.Exited() || ws.Signaled() {
						return nil
					}
				}
			})
		}
		tr.Close()
	})
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	err = tr.Do(func() error {
		attr := &syscall.ProcAttr{
			Dir:   dir,
			Files: []uintptr{null.Fd(), null.Fd(), null.Fd()},
			Sys:   &syscall.SysProcAttr{Ptrace: true, Pdeathsig: syscall.SIGKILL},
		}
		pid, err := syscall.ForkExec(path, []string{"mitosis-stub"}, attr)
		if err != nil {
			return err
		}
		s.pid = pid
		if _, err := ptrace.WaitStop(pid, syscall.SIGTRAP, nil, func() error { return ptrace.Cont(pid, 0) }); err != nil {
			return err
		}
		if err := ptrace.SetOptions(pid, unix.PTRACE_O_EXITKILL); err != nil {
			return err
		}
		return ptrace.GetRegs(pid, &s.regs)
	})
	if err != nil {
		t.Fatalf("start stub: %v", err)
	}
	return s
}

// run executes the batch from the Runner at gadget and returns the table
// read back and the rip of the final stop.
func (s *stubProc) run(gadget uint64, b *Batch) ([]byte, uint64) {
	s.t.Helper()
	table := b.TableBytes()
	arenaAddr, arena := b.Arena()
	var rip uint64
	err := s.tr.Do(func() error {
		if err := ptrace.WriteMem(s.pid, b.Addr, table); err != nil {
			return err
		}
		if err := ptrace.WriteMem(s.pid, arenaAddr, arena); err != nil {
			return err
		}
		r := s.regs
		r.Rip = gadget
		r.Rbx = b.Addr
		r.R12 = uint64(len(b.Calls))
		r.Orig_rax = ^uint64(0)
		if err := ptrace.SetRegs(s.pid, &r); err != nil {
			return err
		}
		if err := ptrace.Cont(s.pid, 0); err != nil {
			return err
		}
		if _, err := ptrace.WaitStop(s.pid, syscall.SIGTRAP, nil, func() error { return ptrace.Cont(s.pid, 0) }); err != nil {
			return err
		}
		var out unix.PtraceRegs
		if err := ptrace.GetRegs(s.pid, &out); err != nil {
			return err
		}
		rip = out.Rip
		return ptrace.ReadMem(s.pid, b.Addr, table)
	})
	if err != nil {
		s.t.Fatalf("run batch: %v", err)
	}
	return table, rip
}

// TestStubRunsBatch execs the real stub image, maps a gadget with a single
// injected mmap at the stub's entry and runs batches from it.
func TestStubRunsBatch(t *testing.T) {
	dir := t.TempDir()
	s := startStub(t, dir)
	entry := uint64(Base + EntryOffset)
	if s.regs.Rip != entry {
		t.Fatalf("exec stop at rip %#x, want the entry %#x", s.regs.Rip, entry)
	}
	// The stub's text is where the ELF says.
	maps, err := os.ReadFile("/proc/" + strconv.Itoa(s.pid) + "/maps")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(maps, []byte("00010000-00011000 r-xp 00000000")) {
		t.Errorf("stub maps lack the R+X segment at %#x:\n%s", Base, maps)
	}

	const gadget = 0x200000000
	const size = 2 * 4096
	var ret uint64
	err = s.tr.Do(func() error {
		var err error
		ret, err = ptrace.Inject(s.pid, entry, &s.regs, nil, unix.SYS_MMAP, gadget, size,
			unix.PROT_READ|unix.PROT_WRITE|unix.PROT_EXEC,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE, ^uint64(0), 0)
		if err != nil {
			return err
		}
		return ptrace.WriteMem(s.pid, gadget, Code())
	})
	if err != nil {
		t.Fatalf("map gadget: %v", err)
	}
	if ret != gadget {
		t.Fatalf("mmap returned %#x, want %#x", ret, gadget)
	}

	// A lone syscall at SyscallOffset.
	err = s.tr.Do(func() error {
		var err error
		ret, err = ptrace.Inject(s.pid, gadget+SyscallOffset, &s.regs, nil, unix.SYS_GETPID)
		return err
	})
	if err != nil || ret != uint64(s.pid) {
		t.Fatalf("getpid at the gadget's syscall = %d, %v; want %d", ret, err, s.pid)
	}

	// Runner: stops at the failing close(-1), later calls keep NotRun.
	b := NewBatch(gadget+4096, 0x200)
	b.Add("getpid", unix.SYS_GETPID)
	b.Add("getppid", unix.SYS_GETPPID)
	b.Add("close -1", unix.SYS_CLOSE, ^uint64(0))
	b.Add("getpid again", unix.SYS_GETPID)
	table, rip := s.run(gadget, b)
	res := Results(table)
	want := []uint64{uint64(s.pid), uint64(os.Getpid()), ^uint64(unix.EBADF - 1), NotRun}
	for i := range want {
		if res[i] != want[i] {
			t.Errorf("result %d (%s) = %#x, want %#x", i, b.Calls[i].What, res[i], want[i])
		}
	}
	if done := gadget + uint64(len(Runner)); rip != done {
		t.Errorf("runner stopped at rip %#x, want %#x (after its int3)", rip, done)
	}
	if e := ptrace.Errno(res[2]); e != unix.EBADF {
		t.Errorf("Errno of close(-1) result = %v", e)
	}

	// A full run with arena arguments: getcwd into an arena buffer.
	b = NewBatch(gadget+4096, 0x200)
	path := b.String("/")
	buf := b.Data(make([]byte, 256))
	b.Add("access /", unix.SYS_ACCESS, path, unix.F_OK)
	b.Add("getcwd", unix.SYS_GETCWD, buf, 256)
	b.Add("getpid", unix.SYS_GETPID)
	table, rip = s.run(gadget, b)
	res = Results(table)
	if res[0] != 0 || res[1] != uint64(len(dir)+1) || res[2] != uint64(s.pid) {
		t.Errorf("results %#x, want [0 %#x %#x]", res, len(dir)+1, s.pid)
	}
	if done := gadget + uint64(len(Runner)); rip != done {
		t.Errorf("runner stopped at rip %#x, want %#x", rip, done)
	}
	got := make([]byte, len(dir)+1)
	if err := s.tr.Do(func() error { return ptrace.ReadMem(s.pid, buf, got) }); err != nil {
		t.Fatal(err)
	}
	if string(got) != dir+"\x00" {
		t.Errorf("getcwd wrote %q at the arena address, want %q", got, dir+"\x00")
	}

	// An empty batch runs nothing and stops at once.
	b = NewBatch(gadget+4096, 0x200)
	_, rip = s.run(gadget, b)
	if done := gadget + uint64(len(Runner)); rip != done {
		t.Errorf("empty batch stopped at rip %#x, want %#x", rip, done)
	}

	// Cloner: a getpid and a prctl that returns 0 (not to be taken for a
	// new thread), then two threads, each running its own table (getpid, gettid) and
	// parking in pause(2); the caller stops after the last clone.
	b = NewBatch(gadget+4096, 0x200)
	b.Add("getpid", unix.SYS_GETPID)
	b.Add("prctl PR_SET_KEEPCAPS 0", unix.SYS_PRCTL, unix.PR_SET_KEEPCAPS, 0)
	var kids []uint64
	for i := 0; i < 2; i++ {
		own := NewBatch(0, 0)
		own.Add("getpid", unix.SYS_GETPID)
		own.Add("gettid", unix.SYS_GETTID)
		// Header: 2 entries, no futex word (park in pause(2)).
		tb := append(binary.LittleEndian.AppendUint64(make([]byte, 0, ThreadSlotHeader), 2), make([]byte, ThreadSlotHeader-8)...)
		tb = append(tb, own.TableBytes()...)
		at := b.Data(tb)
		kids = append(kids, at)
		b.Add("clone", unix.SYS_CLONE, unix.CLONE_VM|unix.CLONE_FS|unix.CLONE_FILES|unix.CLONE_SIGHAND|unix.CLONE_THREAD, 0, 0, 0, 0, at)
	}
	table, rip = s.run(gadget+ClonerOffset, b)
	if done := gadget + uint64(ClonerOffset) + 0x43; rip != done {
		t.Errorf("cloner stopped at rip %#x, want %#x (after its int3)", rip, done)
	}
	tids := Results(table)
	if tids[0] != uint64(s.pid) || tids[1] != 0 {
		t.Errorf("cloner's other calls returned %#x, want [getpid %#x, prctl 0]", tids[:2], s.pid)
	}
	tids = tids[2:]
	for i, at := range kids {
		tid := tids[i]
		if ptrace.Errno(tid) != nil || tid == NotRun || int(tid) == s.pid {
			t.Fatalf("clone %d returned %#x", i, tid)
		}
		got := make([]byte, ThreadSlotHeader+2*EntrySize)
		deadline := time.Now().Add(5 * time.Second)
		for {
			if err := s.tr.Do(func() error { return ptrace.ReadMem(s.pid, at, got) }); err != nil {
				t.Fatal(err)
			}
			if r := Results(got[ThreadSlotHeader:]); r[1] != NotRun || time.Now().After(deadline) {
				break
			}
			time.Sleep(time.Millisecond)
		}
		if r := Results(got[ThreadSlotHeader:]); r[0] != uint64(s.pid) || r[1] != tid {
			t.Errorf("thread %d ran its table to %#x, want [getpid %#x, gettid %#x]", i, r, s.pid, tid)
		}
		var sc []byte
		for time.Now().Before(deadline) {
			sc, _ = os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/syscall", s.pid, tid))
			if bytes.HasPrefix(sc, []byte("34 ")) {
				break
			}
			time.Sleep(time.Millisecond)
		}
		if !bytes.HasPrefix(sc, []byte("34 ")) {
			t.Errorf("thread %d (tid %d) is not parked in pause(2): syscall %q", i, tid, sc)
		}
	}
}
