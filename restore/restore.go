// Package restore rebuilds a seed's process in a fresh stub process on this
// host: it recreates the address space (memory left missing, to be paged in
// through userfaultfd), the kernel-side task state and the registers, then
// lets the child run.
//
// The sequence follows what works on Linux 6.x: exec a libc-less stub under
// PTRACE_TRACEME; map a gadget page in a hole of both layouts; run batches of
// system calls from it (one ptrace round trip each): unmap the stub, move
// [vvar]/[vdso] to the parent's addresses, recreate every VMA, create the
// userfaultfd inside the child (it binds to current->mm) and take it with
// pidfd_getfd; register the anonymous VMAs; restore mm fields with
// PR_SET_MM_MAP, signal state, robust list, tid address, rseq and
// credentials; unmap the gadget with a syscall instruction in [vdso]; load
// XSTATE and registers; detach.
package restore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
	"github.com/mitosis-fork/mitosis/internal/stub"
	"github.com/mitosis-fork/mitosis/internal/uffd"
	"github.com/mitosis-fork/mitosis/pager"
	"github.com/mitosis-fork/mitosis/snapshot"
)

// UFFDFeatures are the userfaultfd events every child's pager needs:
// without REMAP, realloc's mremap reads moved pages as zero; without FORK a
// fork() inside the child faults without a server; REMOVE and UNMAP mark
// freed ranges so they are never refilled with stale parent data.
// MINOR_SHMEM lets the pager map pages of the node's page cache (a memfd
// the child maps privately) with UFFDIO_CONTINUE.
const UFFDFeatures = uffd.FeatureEventFork | uffd.FeatureEventRemap | uffd.FeatureEventRemove | uffd.FeatureEventUnmap | uffd.FeatureMinorShmem

// Options tune a restore.
type Options struct {
	// StubPath is an executable path of the stub image (stub.ELF).
	StubPath string
	// Stdio are the child's fds 0, 1, 2 (must be non-nil).
	Stdio [3]*os.File
	// Channel is installed at the descriptor's channel fd, if any.
	Channel *os.File
	// Cache, if set, is the node's page cache for the seed: VMAs it backs
	// are mapped MAP_PRIVATE from it and registered for MISSING and MINOR
	// faults.
	Cache *pager.Cache
	// Root, if set, makes the child a container of its own: new mount,
	// PID, UTS and IPC namespaces, chrooted to Root (a directory holding
	// the same image the parent runs in; the parent's paths resolve
	// inside it). Hostname is set in its UTS namespace.
	Root     string
	Hostname string
	// OnSpawn is called with the stub's pid before it runs anything.
	OnSpawn func(pid int) error
	// OnUFFD is called with the child's pid and the daemon's copy of its
	// userfaultfd (registered, API done) before the child runs any of its
	// own code and before anything of the child touches lazy memory. It
	// must start serving faults; it may copy pages eagerly. It owns ufd.
	OnUFFD func(pid, nsPID int, ufd int) error
	// Preload, when set (by OnUFFD's pager), installs n pages at addr
	// before the child runs; patch, if non-nil, may change each chunk
	// first. The restore installs the other threads' TCB and stack pages
	// through it, with their signal frames written in.
	Preload func(addr uint64, n int, patch func(addr uint64, b []byte)) error
}

// Result describes a restored, running child.
type Result struct {
	PID  int
	Took time.Duration
}

// Restore creates a running child from d. Precondition: t is the tracer
// that will own the child until it is detached.
func Restore(t *ptrace.Tracer, d *descriptor.Descriptor, opts Options) (*Result, error) {
	start := time.Now()
	if opts.Root == "" && d.Root != "" && d.Root != "/" {
		// The parent runs in an image: its children run in containers
		// of their own in the same image.
		opts.Root = d.Root
	}
	files, closeFiles, err := openFDs(d, opts)
	if err != nil {
		return nil, err
	}
	defer closeFiles()
	var pid int
	err = t.Do(func() error {
		setPhaseStart(start)
		p, err := restoreLocked(d, opts, files)
		pid = p
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("restore %s: %w", d.SeedID, err)
	}
	return &Result{PID: pid, Took: time.Since(start)}, nil
}

// openFDs opens, in the daemon, every fd the child gets at spawn time: its
// stdio, the channel and the parent's files reopened at their offsets.
func openFDs(d *descriptor.Descriptor, opts Options) ([]uintptr, func(), error) {
	maxfd := 2
	for _, f := range d.FDs {
		maxfd = max(maxfd, int(f.Num))
	}
	files := make([]uintptr, maxfd+1)
	for i := range files {
		files[i] = ^uintptr(0) // closed in the child
	}
	var opened []*os.File
	closeAll := func() {
		for _, f := range opened {
			f.Close()
		}
	}
	for i := 0; i < 3; i++ {
		if opts.Stdio[i] == nil {
			closeAll()
			return nil, nil, fmt.Errorf("restore: stdio %d not supplied", i)
		}
		files[i] = opts.Stdio[i].Fd()
	}
	// One new pipe per parent pipe, one eventfd per parent eventfd
	// (descriptors of one share Group).
	pipes := map[uint64][2]int{}
	eventfds := map[uint64]int{}
	own := func(fd int, what string) {
		opened = append(opened, os.NewFile(uintptr(fd), what))
	}
	for _, f := range d.FDs {
		switch f.Kind {
		case descriptor.FDPipe:
			p, ok := pipes[f.Group]
			if !ok {
				var err error
				if p, err = newPipe(d, f.Group); err != nil {
					closeAll()
					return nil, nil, fmt.Errorf("restore: fd %d: %w", f.Num, err)
				}
				own(p[0], "pipe")
				own(p[1], "pipe")
				pipes[f.Group] = p
			}
			end := p[0]
			if f.Flags&unix.O_ACCMODE == unix.O_WRONLY {
				end = p[1]
			}
			if f.Flags&unix.O_NONBLOCK != 0 {
				if err := unix.SetNonblock(end, true); err != nil {
					closeAll()
					return nil, nil, fmt.Errorf("restore: fd %d (pipe): %w", f.Num, err)
				}
			}
			files[f.Num] = uintptr(end)
			continue
		case descriptor.FDEventfd:
			e, ok := eventfds[f.Group]
			if !ok {
				flags := unix.EFD_CLOEXEC
				if f.Flags&unix.O_NONBLOCK != 0 {
					flags |= unix.EFD_NONBLOCK
				}
				if f.Pos == descriptor.EventfdSemaphore {
					flags |= unix.EFD_SEMAPHORE
				}
				// eventfd2 takes an unsigned int: a larger counter is
				// added with a write.
				var err error
				if e, err = unix.Eventfd(0, flags); err != nil {
					closeAll()
					return nil, nil, fmt.Errorf("restore: fd %d (eventfd): %w", f.Num, err)
				}
				own(e, "eventfd")
				if f.Count != 0 {
					var b [8]byte
					*(*uint64)(unsafe.Pointer(&b[0])) = f.Count
					if _, err := unix.Write(e, b[:]); err != nil {
						closeAll()
						return nil, nil, fmt.Errorf("restore: fd %d (eventfd): set counter %d: %w", f.Num, f.Count, err)
					}
				}
				eventfds[f.Group] = e
			}
			files[f.Num] = uintptr(e)
			continue
		case descriptor.FDSocket:
			fd, err := newSocket(f)
			if err != nil {
				closeAll()
				return nil, nil, fmt.Errorf("restore: fd %d (socket): %w", f.Num, err)
			}
			own(fd, "socket")
			files[f.Num] = uintptr(fd)
			continue
		case descriptor.FDEpoll:
			// Created empty here; the child adds its watches itself
			// (epoll keys a watch by the watcher's descriptor number).
			e, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
			if err != nil {
				closeAll()
				return nil, nil, fmt.Errorf("restore: fd %d (epoll): %w", f.Num, err)
			}
			own(e, "epoll")
			files[f.Num] = uintptr(e)
			continue
		}
	}
	for _, f := range d.FDs {
		switch f.Kind {
		case descriptor.FDChannel:
			if opts.Channel == nil {
				closeAll()
				return nil, nil, fmt.Errorf("restore: seed expects a channel at fd %d but none was given", f.Num)
			}
			files[f.Num] = opts.Channel.Fd()
		case descriptor.FDFile:
			flags := int(f.Flags) &^ (unix.O_CREAT | unix.O_TRUNC | unix.O_EXCL | unix.O_CLOEXEC | unix.O_NOCTTY)
			fh, err := os.OpenFile(filepath.Join("/", opts.Root, f.Path), flags|unix.O_CLOEXEC, 0)
			if err != nil {
				closeAll()
				return nil, nil, fmt.Errorf("restore: reopen fd %d: %w", f.Num, err)
			}
			opened = append(opened, fh)
			if f.File.Ino != 0 {
				var st unix.Stat_t
				if err := unix.Fstat(int(fh.Fd()), &st); err == nil && (st.Ino != f.File.Ino || st.Dev != f.File.Dev) {
					closeAll()
					return nil, nil, fmt.Errorf("restore: fd %d: file %s was replaced since prepare (inode %d, now %d)", f.Num, f.Path, f.File.Ino, st.Ino)
				}
			}
			if f.Pos != 0 {
				if _, err := unix.Seek(int(fh.Fd()), f.Pos, 0); err != nil && !errors.Is(err, unix.ESPIPE) {
					closeAll()
					return nil, nil, fmt.Errorf("restore: seek fd %d (%s) to %d: %w", f.Num, f.Path, f.Pos, err)
				}
			}
			files[f.Num] = fh.Fd()
		}
	}
	return files, closeAll, nil
}

// newPipe makes the child's copy of the parent pipe group: a pipe holding
// the bytes buffered in the parent's at prepare.
func newPipe(d *descriptor.Descriptor, group uint64) ([2]int, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return p, fmt.Errorf("pipe: %w", err)
	}
	var data []byte
	for _, f := range d.FDs {
		if f.Kind == descriptor.FDPipe && f.Group == group && len(f.Data) > 0 {
			data = f.Data
		}
	}
	if len(data) > 0 {
		err := func() error {
			if len(data) > 64<<10 {
				if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, len(data)); err != nil {
					return fmt.Errorf("size the pipe for %d buffered bytes: %w", len(data), err)
				}
			}
			for off := 0; off < len(data); {
				n, err := unix.Write(p[1], data[off:])
				if err != nil {
					return fmt.Errorf("refill the pipe: %w", err)
				}
				off += n
			}
			return nil
		}()
		if err != nil {
			unix.Close(p[0])
			unix.Close(p[1])
			return p, err
		}
	}
	return p, nil
}

// child is the state of one restore on the tracer thread.
type child struct {
	pid     int
	d       *descriptor.Descriptor
	regs    unix.PtraceRegs // scratch register base for injections
	gadget  uint64
	gsize   uint64
	pending []syscall.Signal
	threads []*thread // recreated other threads, stopped until released
	// The threads' self-restore (sigframe.go), decided by preloadThreads:
	// frames[i] is thread i's signal frame address and frameData[i] its
	// bytes, nil once the preload installed them.
	self      selfRestore
	selfOK    bool
	frames    []uint64
	frameData [][]byte
	// newTIDs[i] is thread i's tid in the child (as the child sees it:
	// what clone(2) returned in it), once makeThreads made them.
	newTIDs []uint64
}

func restoreLocked(d *descriptor.Descriptor, opts Options, files []uintptr) (int, error) {
	dir := d.Cwd
	var cloneflags uintptr
	if opts.Root != "" {
		// The cwd is set after the chroot, in batch 1: chrooting before
		// the exec would hide the stub image (/proc/<daemon>/fd/N).
		dir = ""
		cloneflags = syscall.CLONE_NEWNS | syscall.CLONE_NEWPID | syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC
	}
	attr := &syscall.ProcAttr{
		Dir:   dir,
		Files: files,
		// Each child leads its own process group, so the engine can tell
		// when a child's whole tree (processes it forked) has exited and
		// end them all together.
		Sys: &syscall.SysProcAttr{Ptrace: true, Pdeathsig: syscall.SIGKILL, Setpgid: true, Cloneflags: cloneflags},
	}
	mark("openfds")
	pid, err := syscall.ForkExec(opts.StubPath, []string{"mitosis-stub"}, attr)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return 0, fmt.Errorf("start stub: %w (does the parent's cwd %q still exist?)", err, d.Cwd)
		}
		return 0, fmt.Errorf("start stub: %w", err)
	}
	c := &child{pid: pid, d: d}
	ok := false
	defer func() {
		if !ok {
			_ = unix.Kill(pid, unix.SIGKILL)
			reapThreads(c.threads)
			for {
				ws, err := ptrace.Wait(pid)
				if err != nil || ws.Exited() || ws.Signaled() {
					break
				}
			}
		}
	}()
	if _, err := ptrace.WaitStop(pid, syscall.SIGTRAP, &c.pending, func() error { return ptrace.Cont(pid, 0) }); err != nil {
		return 0, fmt.Errorf("stub exec stop: %w", err)
	}
	if err := ptrace.SetOptions(pid, unix.PTRACE_O_EXITKILL); err != nil {
		return 0, err
	}
	if opts.OnSpawn != nil {
		if err := opts.OnSpawn(pid); err != nil {
			return 0, fmt.Errorf("set up child %d: %w", pid, err)
		}
	}
	if err := ptrace.GetRegs(pid, &c.regs); err != nil {
		return 0, err
	}
	mark("spawn")
	if err := c.build(opts); err != nil {
		return 0, err
	}
	ok = true
	return pid, nil
}

func (c *child) inject(at uint64, nr uint64, args ...uint64) (uint64, error) {
	ret, err := ptrace.Inject(c.pid, at, &c.regs, &c.pending, nr, args...)
	if err != nil {
		return 0, err
	}
	return ret, ptrace.Errno(ret)
}

// run executes a batch in the child from the gadget and returns the
// results, or an error naming the first call that failed.
func (c *child) run(b *stub.Batch) ([]uint64, error) {
	return c.runOn(c.pid, b, 0, &c.regs, &c.pending)
}

// runOn runs batch b on task tid (the leader or one of its threads) with
// the gadget code at offset off (Runner or Cloner) and returns the results.
func (c *child) runOn(tid int, b *stub.Batch, off uint64, base *unix.PtraceRegs, pending *[]syscall.Signal) ([]uint64, error) {
	if err := c.startOn(tid, b, off, base); err != nil {
		return nil, err
	}
	return c.finishOn(tid, b, pending)
}

// startOn writes b to the gadget and lets task tid run it from the code at
// offset off; finishOn waits for the end. Between the two, other tasks can
// run batches of their own at other addresses.
func (c *child) startOn(tid int, b *stub.Batch, off uint64, base *unix.PtraceRegs) error {
	table := b.TableBytes()
	arenaAddr, arena := b.Arena()
	if arenaAddr+uint64(len(arena)) > c.gadget+c.gsize || b.Addr+uint64(len(table)) > arenaAddr {
		return fmt.Errorf("batch of %d calls does not fit the gadget", len(b.Calls))
	}
	if err := ptrace.WriteMem(c.pid, b.Addr, table); err != nil {
		return err
	}
	if err := ptrace.WriteMem(c.pid, arenaAddr, arena); err != nil {
		return err
	}
	r := *base
	r.Rip = c.gadget + off
	r.Rbx = b.Addr
	r.R12 = uint64(len(b.Calls))
	r.Orig_rax = ^uint64(0)
	r.Eflags &^= 0x100
	if err := ptrace.SetRegs(tid, &r); err != nil {
		return err
	}
	return ptrace.Cont(tid, 0)
}

// finishOn waits for task tid to stop at the end of batch b (started by
// startOn) and returns the results, or the first call that failed.
func (c *child) finishOn(tid int, b *stub.Batch, pending *[]syscall.Signal) ([]uint64, error) {
	if _, err := ptrace.WaitStop(tid, syscall.SIGTRAP, pending, func() error { return ptrace.Cont(tid, 0) }); err != nil {
		return nil, fmt.Errorf("batch: %w", err)
	}
	table := make([]byte, len(b.Calls)*stub.EntrySize)
	if err := ptrace.ReadMem(c.pid, b.Addr, table); err != nil {
		return nil, err
	}
	res := stub.Results(table)
	for i, v := range res {
		if v == stub.NotRun {
			return nil, fmt.Errorf("batch stopped before call %d (%s)", i, b.Calls[i].What)
		}
		if e := ptrace.Errno(v); e != nil {
			return nil, fmt.Errorf("%s: %w", b.Calls[i].What, e)
		}
	}
	return res, nil
}

func overlaps(s, e uint64, vmas []descriptor.VMA, extra []procfs.Mapping) bool {
	for _, v := range vmas {
		if s < v.End && v.Start < e {
			return true
		}
	}
	for _, m := range extra {
		if s < m.End && m.Start < e {
			return true
		}
	}
	return false
}

// hole finds size bytes free in both the parent's and the stub's layout.
func hole(size uint64, vmas []descriptor.VMA, stubMaps []procfs.Mapping, avoid uint64) (uint64, error) {
	for a := uint64(0x100000000); a < 0x7f0000000000; a += 0x40000000 {
		if a == avoid {
			continue
		}
		if !overlaps(a, a+size, vmas, stubMaps) && (avoid == 0 || a+size <= avoid || a >= avoid+0x40000000) {
			return a, nil
		}
	}
	return 0, errors.New("no address range free in both layouts")
}

// atFDCWD is AT_FDCWD (-100) as a raw syscall argument.
const atFDCWD = ^uint64(99)

func pageUp(n uint64) uint64 { return (n + 4095) &^ 4095 }

func (c *child) build(opts Options) error {
	d := c.d
	stubMaps, err := procfs.Maps(c.pid)
	if err != nil {
		return err
	}
	// Gadget: code page + table + arena.
	nTable := uint64(len(d.VMAs)*2+len(d.SigActions)+len(d.FDs)+len(d.Threads)+64) * stub.EntrySize
	arenaSize := uint64(64<<10) + threadTables(len(d.Threads))
	for _, v := range d.VMAs {
		arenaSize += uint64(len(v.Path)) + 8
	}
	arenaSize += uint64(len(d.Auxv)) + 4096
	c.gsize = pageUp(4096 + pageUp(nTable) + arenaSize)
	c.gadget, err = hole(c.gsize, d.VMAs, stubMaps, 0)
	if err != nil {
		return err
	}
	entry := uint64(stub.Base + stub.EntryOffset)
	if _, err := c.inject(entry, unix.SYS_MMAP, c.gadget, c.gsize,
		unix.PROT_READ|unix.PROT_WRITE|unix.PROT_EXEC,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE, ^uint64(0), 0); err != nil {
		return fmt.Errorf("map gadget at %#x: %w", c.gadget, err)
	}
	if err := ptrace.WriteMem(c.pid, c.gadget, stub.Code()); err != nil {
		return err
	}
	tableAddr := c.gadget + 4096
	newBatch := func() *stub.Batch { return stub.NewBatch(tableAddr, pageUp(nTable)) }

	// Batch 1: drop the stub's own mappings, move the special mappings,
	// open the files to map.
	b := newBatch()
	// Descriptors above the ones we installed can only have leaked from
	// the daemon (any fd it holds without close-on-exec survives the
	// stub's exec): close them all, the child must hold exactly the
	// parent's.
	maxfd := 2
	for _, f := range d.FDs {
		maxfd = max(maxfd, int(f.Num))
	}
	b.Add("close leaked descriptors", unix.SYS_CLOSE_RANGE, uint64(maxfd+1), uint64(^uint32(0)), 0)
	// The page cache is opened through /proc before any chroot hides it.
	imageIdx := -1
	if opts.Cache != nil {
		imageIdx = b.Add("open page cache", unix.SYS_OPENAT, atFDCWD, b.String(opts.Cache.Path()), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	}
	if opts.Root != "" {
		b.Add("chroot "+opts.Root, unix.SYS_CHROOT, b.String(opts.Root))
		b.Add("chdir "+d.Cwd, unix.SYS_CHDIR, b.String(d.Cwd))
	}
	var specialsStub = map[string]procfs.Mapping{}
	for _, m := range stubMaps {
		switch m.Path {
		case "[vdso]", "[vvar]", "[vvar_vclock]":
			specialsStub[m.Path] = m
			continue
		case "[vsyscall]":
			continue
		}
		if m.Start == c.gadget {
			continue
		}
		b.Add(fmt.Sprintf("munmap stub %s %#x", m.Path, m.Start), unix.SYS_MUNMAP, m.Start, m.End-m.Start)
	}
	specialNames := map[uint32]string{descriptor.KindVDSO: "[vdso]", descriptor.KindVVAR: "[vvar]", descriptor.KindVVARClock: "[vvar_vclock]"}
	type move struct{ from, tmp, to, size uint64 }
	var moves []move
	tmpBase, err := hole(64<<20, d.VMAs, stubMaps, c.gadget)
	if err != nil {
		return err
	}
	tmp := tmpBase
	for _, v := range d.VMAs {
		name, ok := specialNames[v.Kind]
		if !ok {
			continue
		}
		m, ok := specialsStub[name]
		if !ok {
			return fmt.Errorf("the stub has no %s mapping (different kernel?)", name)
		}
		if m.End-m.Start != v.End-v.Start {
			return fmt.Errorf("%s is %d bytes here, %d in the seed: the seed was prepared on a different kernel build", name, m.End-m.Start, v.End-v.Start)
		}
		moves = append(moves, move{m.Start, tmp, v.Start, v.End - v.Start})
		tmp += v.End - v.Start
		delete(specialsStub, name)
	}
	for name, m := range specialsStub {
		// The parent lacks a special mapping the stub has: drop it.
		b.Add("munmap stub "+name, unix.SYS_MUNMAP, m.Start, m.End-m.Start)
	}
	for _, mv := range moves {
		b.Add(fmt.Sprintf("mremap special %#x to temporary %#x", mv.from, mv.tmp), unix.SYS_MREMAP, mv.from, mv.size, mv.size, unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, mv.tmp)
	}
	for _, mv := range moves {
		b.Add(fmt.Sprintf("mremap special to %#x", mv.to), unix.SYS_MREMAP, mv.tmp, mv.size, mv.size, unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, mv.to)
	}
	type fileOpen struct {
		idx    int
		rw     bool
		result uint64
		path   string
		id     descriptor.FileID
		stat   uint64 // arena address of its struct stat (batch 2)
	}
	opens := map[string]*fileOpen{}
	var openOrder []string
	for _, v := range d.VMAs {
		if v.Kind != descriptor.KindFile {
			continue
		}
		rw := v.Flags&descriptor.FlagShared != 0 && v.Prot&unix.PROT_WRITE != 0
		key := v.Path
		if rw {
			key += "\x00rw"
		}
		if _, ok := opens[key]; ok {
			continue
		}
		flags := uint64(unix.O_RDONLY | unix.O_CLOEXEC)
		if rw {
			flags = unix.O_RDWR | unix.O_CLOEXEC
		}
		idx := b.Add("open "+v.Path, unix.SYS_OPENAT, atFDCWD, b.String(v.Path), flags, 0)
		opens[key] = &fileOpen{idx: idx, rw: rw, path: v.Path, id: v.File}
		openOrder = append(openOrder, key)
	}
	exeIdx := -1
	if d.Exe != "" {
		exeIdx = b.Add("open exe "+d.Exe, unix.SYS_OPENAT, atFDCWD, b.String(d.Exe), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	}
	mark("plan1")
	res, err := c.run(b)
	if err != nil {
		return fmt.Errorf("unmap stub and open files: %w", err)
	}
	for _, o := range opens {
		o.result = res[o.idx]
	}
	imageFD := ^uint64(0)
	if imageIdx >= 0 {
		imageFD = res[imageIdx]
	}
	exeFD := uint64(0)
	if exeIdx >= 0 {
		exeFD = res[exeIdx]
	}

	// Batch 2: recreate every VMA, close the files, create the uffd.
	b = newBatch()
	holes := zeroHoles(d)
	for i, v := range d.VMAs {
		size := v.End - v.Start
		what := fmt.Sprintf("mmap %#x-%#x %s", v.Start, v.End, v.Path)
		switch v.Kind {
		case descriptor.KindFile:
			key := v.Path
			if v.Flags&descriptor.FlagShared != 0 && v.Prot&unix.PROT_WRITE != 0 {
				key += "\x00rw"
			}
			flags := uint64(unix.MAP_PRIVATE | unix.MAP_FIXED)
			if v.Flags&descriptor.FlagShared != 0 {
				flags = unix.MAP_SHARED | unix.MAP_FIXED
			}
			b.Add(what, unix.SYS_MMAP, v.Start, size, uint64(v.Prot), flags, opens[key].result, v.Offset)
		case descriptor.KindAnon, descriptor.KindFileDirty:
			if off, ok := cacheOffset(opts.Cache, v); ok {
				b.Add(what+" (page cache)", unix.SYS_MMAP, v.Start, size, uint64(v.Prot), unix.MAP_PRIVATE|unix.MAP_FIXED|unix.MAP_NORESERVE, imageFD, off)
				for _, h := range holes[i] {
					b.Add(fmt.Sprintf("mmap %#x-%#x (zero)", h.Start, h.End), unix.SYS_MMAP, h.Start, h.End-h.Start, uint64(v.Prot),
						unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED|unix.MAP_NORESERVE, ^uint64(0), 0)
				}
				continue
			}
			flags := uint64(unix.MAP_PRIVATE | unix.MAP_ANONYMOUS | unix.MAP_FIXED)
			if v.Flags&descriptor.FlagGrowsDown != 0 {
				flags |= unix.MAP_GROWSDOWN
			}
			b.Add(what, unix.SYS_MMAP, v.Start, size, uint64(v.Prot), flags, ^uint64(0), 0)
		}
	}
	// Identity of each opened file, checked on the open file itself (no
	// window between check and map) before the child runs.
	for _, k := range openOrder {
		o := opens[k]
		o.stat = b.Data(make([]byte, statSize))
		b.Add("fstat "+o.path, unix.SYS_FSTAT, o.result, o.stat)
	}
	for _, k := range openOrder {
		b.Add("close "+k, unix.SYS_CLOSE, opens[k].result)
	}
	if imageIdx >= 0 {
		b.Add("close page cache", unix.SYS_CLOSE, imageFD)
	}
	ufdIdx := b.Add("userfaultfd", unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK)
	mark("batch1+plan2")
	res, err = c.run(b)
	if err != nil {
		return fmt.Errorf("recreate mappings: %w", err)
	}
	childUFD := res[ufdIdx]
	if len(openOrder) > 0 {
		first := opens[openOrder[0]].stat
		last := opens[openOrder[len(openOrder)-1]].stat + statSize
		buf := make([]byte, last-first)
		if err := ptrace.ReadMem(c.pid, first, buf); err != nil {
			return err
		}
		for _, k := range openOrder {
			o := opens[k]
			if err := checkStat(o.path, o.id, buf[o.stat-first:]); err != nil {
				return err
			}
		}
	}

	// Take the uffd: it is bound to the child's mm.
	mark("batch2")
	pidfd, err := unix.PidfdOpen(c.pid, 0)
	if err != nil {
		return fmt.Errorf("pidfd_open: %w", err)
	}
	ufd, err := unix.PidfdGetfd(pidfd, int(childUFD), 0)
	unix.Close(pidfd)
	if err != nil {
		return fmt.Errorf("pidfd_getfd uffd: %w", err)
	}
	if _, _, err := uffd.API(ufd, UFFDFeatures); err != nil {
		unix.Close(ufd)
		return fmt.Errorf("uffd api: %w", err)
	}
	for _, r := range registerRanges(d.VMAs, holes, opts.Cache) {
		if _, err := uffd.Register(ufd, r.Start, r.End-r.Start, r.mode); err != nil {
			unix.Close(ufd)
			return fmt.Errorf("uffd register %#x-%#x: %w", r.Start, r.End, err)
		}
	}
	mark("uffd register")
	if opts.OnUFFD != nil {
		if err := opts.OnUFFD(c.pid, nsPID(c.pid), ufd); err != nil {
			return fmt.Errorf("start pager: %w", err)
		}
	} else {
		unix.Close(ufd)
	}

	if len(d.Threads) > 0 {
		if err := c.preloadThreads(opts.Preload); err != nil {
			return fmt.Errorf("preload threads: %w", err)
		}
	}
	mark("onuffd")
	// Batch 3: kernel-side task state.
	b = newBatch()
	b.Add("close uffd", unix.SYS_CLOSE, childUFD)
	mm := make([]byte, 104)
	put := func(off int, v uint64) { *(*uint64)(unsafe.Pointer(&mm[off])) = v }
	f := d.MM
	for i, v := range []uint64{f.StartCode, f.EndCode, f.StartData, f.EndData, f.StartBrk, f.Brk, f.StartStack, f.ArgStart, f.ArgEnd, f.EnvStart, f.EnvEnd} {
		put(i*8, v)
	}
	auxv := d.Auxv
	if len(auxv) > 0 {
		put(88, b.Data(auxv))
	}
	*(*uint32)(unsafe.Pointer(&mm[96])) = uint32(len(auxv))
	*(*uint32)(unsafe.Pointer(&mm[100])) = uint32(exeFD)
	if exeIdx < 0 {
		*(*uint32)(unsafe.Pointer(&mm[100])) = ^uint32(0)
	}
	b.Add("prctl PR_SET_MM_MAP", unix.SYS_PRCTL, unix.PR_SET_MM, unix.PR_SET_MM_MAP, b.Data(mm), 104)
	if exeIdx >= 0 {
		b.Add("close exe", unix.SYS_CLOSE, exeFD)
	}
	for _, sa := range d.SigActions {
		act := make([]byte, 32)
		for i, v := range []uint64{sa.Handler, sa.Flags, sa.Restorer, sa.Mask} {
			*(*uint64)(unsafe.Pointer(&act[i*8])) = v
		}
		b.Add(fmt.Sprintf("rt_sigaction %d", sa.Signo), unix.SYS_RT_SIGACTION, uint64(sa.Signo), b.Data(act), 0, 8)
	}
	if d.AltStackFlags&ssDisable == 0 && d.AltStackSize != 0 {
		ss := make([]byte, 24)
		*(*uint64)(unsafe.Pointer(&ss[0])) = d.AltStackSP
		*(*uint32)(unsafe.Pointer(&ss[8])) = d.AltStackFlags &^ ssOnStack
		*(*uint64)(unsafe.Pointer(&ss[16])) = d.AltStackSize
		b.Add("sigaltstack", unix.SYS_SIGALTSTACK, b.Data(ss), 0)
	}
	if d.RobustHead != 0 {
		b.Add("set_robust_list", unix.SYS_SET_ROBUST_LIST, d.RobustHead, d.RobustLen)
	}
	if d.ClearTID != 0 {
		b.Add("set_tid_address", unix.SYS_SET_TID_ADDRESS, d.ClearTID)
	}
	if opts.Hostname != "" {
		b.Add("sethostname", unix.SYS_SETHOSTNAME, b.String(opts.Hostname), uint64(len(opts.Hostname)))
	}
	if d.Comm != "" {
		// The stub's name is the fd it was exec'ed from; threads cloned
		// after this inherit the parent's program name.
		b.Add("prctl PR_SET_NAME", unix.SYS_PRCTL, unix.PR_SET_NAME, b.String(d.Comm))
	}
	b.Add("umask", unix.SYS_UMASK, uint64(d.Umask))
	for _, fd := range d.FDs {
		if fd.Cloexec {
			b.Add(fmt.Sprintf("fcntl FD_CLOEXEC %d", fd.Num), unix.SYS_FCNTL, uint64(fd.Num), unix.F_SETFD, unix.FD_CLOEXEC)
		}
		for _, w := range fd.Watches {
			// struct epoll_event is packed on x86-64: events u32, data u64.
			ev := make([]byte, 12)
			*(*uint32)(unsafe.Pointer(&ev[0])) = w.Events
			*(*uint64)(unsafe.Pointer(&ev[4])) = w.Data
			b.Add(fmt.Sprintf("epoll_ctl %d ADD %d", fd.Num, w.TFD), unix.SYS_EPOLL_CTL, uint64(fd.Num), unix.EPOLL_CTL_ADD, uint64(w.TFD), b.Data(ev))
		}
	}
	if d.Rseq.Addr != 0 {
		b.Add("rseq", unix.SYS_RSEQ, d.Rseq.Addr, uint64(d.Rseq.Len), 0, uint64(d.Rseq.Sig))
	}
	// Resource limits, set by the child itself before it drops its
	// credentials. Raising a hard limit needs CAP_SYS_RESOURCE, which a
	// daemon may lack: a hard limit above the one the stub inherited from
	// the daemon is capped at the daemon's.
	for _, rl := range d.Rlimits {
		var own unix.Rlimit
		if err := unix.Getrlimit(int(rl.Resource), &own); err != nil {
			continue
		}
		hard := min(rl.Max, own.Max)
		lim := make([]byte, 16)
		*(*uint64)(unsafe.Pointer(&lim[0])) = min(rl.Cur, hard)
		*(*uint64)(unsafe.Pointer(&lim[8])) = hard
		b.Add(fmt.Sprintf("prlimit64 %d", rl.Resource), unix.SYS_PRLIMIT64, 0, uint64(rl.Resource), b.Data(lim), 0)
	}
	cr := d.Creds
	if cr.UID != 0 || cr.EUID != 0 || cr.GID != 0 || cr.EGID != 0 || len(cr.Groups) > 0 {
		if len(cr.Groups) > 0 {
			g := make([]byte, 4*len(cr.Groups))
			for i, v := range cr.Groups {
				*(*uint32)(unsafe.Pointer(&g[4*i])) = v
			}
			b.Add("setgroups", unix.SYS_SETGROUPS, uint64(len(cr.Groups)), b.Data(g))
		}
		b.Add("setresgid", unix.SYS_SETRESGID, uint64(cr.GID), uint64(cr.EGID), uint64(cr.SGID))
		b.Add("setresuid", unix.SYS_SETRESUID, uint64(cr.UID), uint64(cr.EUID), uint64(cr.SUID))
	}
	var release func() error
	if len(d.Threads) == 0 {
		if _, err := c.run(b); err != nil {
			return fmt.Errorf("restore task state: %w", err)
		}
		mark("batch3")
	} else {
		// The threads are cloned at the end of the same run, after the
		// shared task state (credentials, limits, signal handlers),
		// which they share or inherit.
		var err error
		c.threads, release, err = c.makeThreads(b)
		if err != nil {
			return fmt.Errorf("restore task state and threads: %w", err)
		}
		mark("threads")
	}
	if err := c.rewriteTIDRefs(); err != nil {
		return err
	}
	// Unmap the gadget from a syscall instruction in the (moved) vDSO.
	if _, err := c.inject(d.VDSOSyscall, unix.SYS_MUNMAP, c.gadget, c.gsize); err != nil {
		return fmt.Errorf("unmap gadget: %w", err)
	}
	if err := ptrace.SetXState(c.pid, d.XState); err != nil {
		return err
	}
	if err := ptrace.SetSigMask(c.pid, d.SigMask); err != nil {
		return err
	}
	if release != nil {
		// Threads that restore themselves run from here on; the leader
		// follows right after (an injection changes only its general
		// registers, set next).
		if err := release(); err != nil {
			return fmt.Errorf("restore threads: %w", err)
		}
	}
	regs := snapshot.RegsFromArray(d.Regs)
	fixRestart(&regs)
	regs.Eflags &^= 0x100
	if err := ptrace.SetRegs(c.pid, &regs); err != nil {
		return err
	}
	var sig syscall.Signal
	if len(c.pending) > 0 {
		sig = c.pending[0]
	}
	mark("final regs")
	// Every thread is complete: let them all run, the leader last.
	if err := releaseThreads(c, c.threads); err != nil {
		return err
	}
	if err := ptrace.Detach(c.pid, sig); err != nil {
		return err
	}
	for _, s := range c.pending[min(1, len(c.pending)):] {
		_ = unix.Tgkill(c.pid, c.pid, s)
	}
	return nil
}

// Kernel-internal restart codes seen in rax when a task stopped inside a
// system call.
const (
	errRestartSys         = 512
	errRestartNoIntr      = 513
	errRestartNoHand      = 514
	errRestartRestartBlck = 516
)

// fixRestart turns a "stopped inside a syscall" register set into one that
// re-executes that syscall when the child runs: rip back over the 2-byte
// syscall instruction and rax = the syscall number. ERESTART_RESTARTBLOCK
// (nanosleep and friends) is restarted the same way with its original
// arguments, since the child has no restart block.
func fixRestart(r *unix.PtraceRegs) {
	if int64(r.Orig_rax) >= 0 {
		switch -int64(r.Rax) {
		case errRestartSys, errRestartNoIntr, errRestartNoHand, errRestartRestartBlck:
			r.Rip -= 2
			r.Rax = r.Orig_rax
		}
	}
	r.Orig_rax = ^uint64(0)
}

type regRange struct {
	descriptor.Run
	mode uint64
}

// cacheOffset reports where the page cache holds v, if it backs it.
func cacheOffset(c *pager.Cache, v descriptor.VMA) (uint64, bool) {
	if c == nil || !pager.CacheBacked(v) {
		return 0, false
	}
	return c.Offset(v.Start)
}

// registerRanges merges adjacent lazily paged VMAs with the same mode into
// the ranges to register with userfaultfd, leaving out each VMA's holes
// (holes[i] for d.VMAs[i], from zeroHoles).
func registerRanges(vmas []descriptor.VMA, holes [][]descriptor.Run, c *pager.Cache) []regRange {
	var out []regRange
	add := func(s, e, mode uint64) {
		if s >= e {
			return
		}
		if n := len(out); n > 0 && out[n-1].End == s && out[n-1].mode == mode {
			out[n-1].End = e
			return
		}
		out = append(out, regRange{descriptor.Run{Start: s, End: e}, mode})
	}
	for i, v := range vmas {
		if v.Kind != descriptor.KindAnon && v.Kind != descriptor.KindFileDirty {
			continue
		}
		mode := uint64(uffd.RegisterModeMissing)
		if _, ok := cacheOffset(c, v); ok {
			mode |= uffd.RegisterModeMinor
		}
		at := v.Start
		if i < len(holes) {
			for _, h := range holes[i] {
				add(at, h.Start, mode)
				at = h.End
			}
		}
		add(at, v.End, mode)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Start < out[j].Start })
	return out
}

// holeMinPages is the shortest run of pages a seed does not have (they read
// as zero) that a child gets as plain anonymous memory, not registered with
// userfaultfd: a child that allocates anew in a heap the seed had freed
// (malloc_trim, a lean prepare) then takes the kernel's own zero-fill fault
// per page, with no round trip to the pager and no copy-on-write of the
// zero page after it. Shorter runs stay lazily paged: each hole costs the
// child up to two VMAs.
const holeMinPages = 64

// maxHoles bounds the holes per child (the longest are kept), and so the
// VMAs they add.
const maxHoles = 1024

// hotPages returns the pages the restore preloads whether the seed has them
// or not, sorted and merged: each thread's stack around its rsp (where a
// self-restoring thread's signal frame goes, below rsp) and its TCB. They
// must stay registered with the pager, which installs them.
func hotPages(d *descriptor.Descriptor) []descriptor.Run {
	const P = descriptor.PageSize
	var runs []descriptor.Run
	hot := func(regs [27]uint64, tidAddr uint64) {
		r := snapshot.RegsFromArray(regs)
		sp := r.Rsp &^ (P - 1)
		runs = append(runs, descriptor.Run{Start: sp - min(sp, 16*P), End: sp + 2*P})
		if fs := r.Fs_base &^ (P - 1); fs != 0 {
			runs = append(runs, descriptor.Run{Start: fs, End: fs + 2*P})
		}
		if t := tidAddr &^ (P - 1); t != 0 {
			runs = append(runs, descriptor.Run{Start: t, End: t + P})
		}
	}
	hot(d.Regs, d.TIDAddr)
	for _, t := range d.Threads {
		hot(t.Regs, t.TIDAddr)
	}
	return descriptor.MergeRuns(runs)
}

// zeroHoles returns, for each VMA of d, the runs of at least holeMinPages
// pages of its lazily paged memory that the seed does not have, except in
// the main stack (MAP_GROWSDOWN) and the pages the restore installs before
// the child runs (hotPages). They read as zero in the child whatever it
// does: the pager would only ever install zero pages there. It runs on
// every fork: one pass over the VMAs and the present runs, and a few hot
// ranges cut out of the gaps.
func zeroHoles(d *descriptor.Descriptor) [][]descriptor.Run {
	type hole struct {
		vma int
		run descriptor.Run
	}
	var all []hole
	hot := hotPages(d)
	present := d.Present
	k := 0
	for i, v := range d.VMAs {
		if (v.Kind != descriptor.KindAnon && v.Kind != descriptor.KindFileDirty) || v.Flags&descriptor.FlagGrowsDown != 0 {
			continue
		}
		for k < len(present) && present[k].End <= v.Start {
			k++
		}
		at := v.Start
		// gap adds [at, end) less the hot pages, in pieces long enough.
		gap := func(end uint64) {
			s := at
			for _, h := range hot {
				if h.End <= s || h.Start >= end {
					continue
				}
				if h.Start >= s+holeMinPages*descriptor.PageSize {
					all = append(all, hole{i, descriptor.Run{Start: s, End: h.Start}})
				}
				s = max(s, h.End)
			}
			if end >= s+holeMinPages*descriptor.PageSize {
				all = append(all, hole{i, descriptor.Run{Start: s, End: end}})
			}
		}
		for j := k; j < len(present) && present[j].Start < v.End; j++ {
			gap(max(at, present[j].Start))
			at = max(at, min(present[j].End, v.End))
		}
		gap(v.End)
	}
	if len(all) > maxHoles {
		sort.Slice(all, func(i, j int) bool {
			return all[i].run.End-all[i].run.Start > all[j].run.End-all[j].run.Start
		})
		all = all[:maxHoles]
		sort.Slice(all, func(i, j int) bool { return all[i].run.Start < all[j].run.Start })
	}
	out := make([][]descriptor.Run, len(d.VMAs))
	for _, h := range all {
		out[h.vma] = append(out[h.vma], h.run)
	}
	return out
}

// nsPID returns pid as its own PID namespace sees it (the last NSpid of
// /proc/PID/status), or pid if that cannot be read.
func nsPID(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return pid
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "NSpid:"); ok {
			if f := strings.Fields(v); len(f) > 0 {
				if n, err := strconv.Atoi(f[len(f)-1]); err == nil {
					return n
				}
			}
		}
	}
	return pid
}

// statSize is sizeof(struct stat) on x86-64.
const statSize = 144

// checkStat verifies, from a struct stat of the opened file, that a file to
// map is the one the seed mapped.
func checkStat(path string, want descriptor.FileID, st []byte) error {
	le := func(off int) uint64 { return *(*uint64)(unsafe.Pointer(&st[off])) }
	id := descriptor.FileID{Dev: le(0), Ino: le(8), Size: int64(le(48)), MtimeNsec: int64(le(88))*1e9 + int64(le(96))}
	if id.Ino != want.Ino || id.Dev != want.Dev || id.Size != want.Size || id.MtimeNsec != want.MtimeNsec {
		return fmt.Errorf("mapped file %s differs from the seed's (inode %d size %d, seed has inode %d size %d): it changed since prepare", path, id.Ino, id.Size, want.Ino, want.Size)
	}
	return nil
}

// sigaltstack flags (not in x/sys/unix).
const (
	ssOnStack = 1
	ssDisable = 2
)

var (
	debugPhases = os.Getenv("MITOSIS_DEBUG_PHASES") != ""
	phaseMu     sync.Mutex
	phaseStart  = map[int]time.Time{} // by tracer thread: restores run on several
)

// setPhaseStart starts the phase clock of the calling tracer thread.
func setPhaseStart(t time.Time) {
	if debugPhases {
		phaseMu.Lock()
		phaseStart[unix.Gettid()] = t
		phaseMu.Unlock()
	}
}

// mark prints the time since the previous mark of this tracer thread when
// MITOSIS_DEBUG_PHASES is set (development aid).
func mark(name string) {
	if debugPhases {
		now := time.Now()
		tid := unix.Gettid()
		phaseMu.Lock()
		d := now.Sub(phaseStart[tid])
		phaseStart[tid] = now
		phaseMu.Unlock()
		fmt.Fprintf(os.Stderr, "restore phase %s: %v\n", name, d)
	}
}

// newSocket makes a child's copy of an FDSocket: a fresh unix socket of
// its type, or one end of a new socketpair whose other end is closed.
func newSocket(f descriptor.FD) (int, error) {
	typ := int(f.Group)
	if typ != unix.SOCK_STREAM && typ != unix.SOCK_SEQPACKET {
		return -1, fmt.Errorf("socket type %d", typ)
	}
	flags := typ | unix.SOCK_CLOEXEC
	if f.Flags&unix.O_NONBLOCK != 0 {
		flags |= unix.SOCK_NONBLOCK
	}
	if f.Pos == descriptor.SocketFresh {
		return unix.Socket(unix.AF_UNIX, flags, 0)
	}
	p, err := unix.Socketpair(unix.AF_UNIX, flags, 0)
	if err != nil {
		return -1, err
	}
	unix.Close(p[1])
	return p[0], nil
}

// rewriteTIDRefs puts the child's tids where the seed's memory held its
// threads' tids (descriptor.TIDRef: the owners of loader locks a thread
// held at the prepare point), so the holder's unlock finds itself the
// owner.
//
// Precondition: runs on the tracer thread; the threads exist (newTIDs) and
// none has run past its init table; the leader is stopped.
func (c *child) rewriteTIDRefs() error {
	refs := c.d.TIDRefs
	if len(refs) == 0 {
		return nil
	}
	leader := uint64(nsPID(c.pid))
	addrs, data := make([]uint64, len(refs)), make([][]byte, len(refs))
	for i, r := range refs {
		tid := leader
		if r.Thread >= 0 {
			if int(r.Thread) >= len(c.newTIDs) {
				return fmt.Errorf("tid ref %d names thread %d of %d restored", i, r.Thread, len(c.newTIDs))
			}
			tid = c.newTIDs[r.Thread]
		}
		addrs[i], data[i] = r.Addr, binary.LittleEndian.AppendUint32(nil, uint32(tid))
	}
	if err := ptrace.WriteMemv(c.pid, addrs, data); err != nil {
		return fmt.Errorf("rewrite the owners of loader locks held at prepare: %w", err)
	}
	return nil
}
