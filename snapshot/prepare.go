// Package snapshot prepares a live process into a seed: it freezes a
// copy-on-write copy of the process (the page source) by injecting a clone()
// into it, and records everything a child needs in a descriptor.
//
// The parent is stopped only for the clone injection (a few ms for a large
// process); all other state is read from the frozen copy, which never runs
// again. The frozen copy is created with exit_signal 0, so the parent's
// ordinary wait() calls never see it and its end sends the parent no SIGCHLD.
package snapshot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
)

// Options tune Prepare.
type Options struct {
	// ChannelFD is the fd number of the parent's connection to its node
	// daemon (client API), or -1.
	ChannelFD int
	// Lazy marks a process whose own memory is still paged in lazily (a
	// mitosis child prepared as a seed: multi-hop). A page missing from
	// its page tables is then not zero but not fetched yet, so every page
	// of its private memory is read from the frozen copy, whose faults
	// the child's pager serves.
	Lazy bool
	// LazyRuns, with Lazy, returns the addresses whose pages may hold data
	// though the process's page tables do not map them (its pager's view,
	// pager.Space.LazyRuns), and whether it knows them. Prepare calls it
	// while the process is stopped, after the frozen copy exists, and marks
	// present only those pages and the pages mapped: the rest of its
	// lazily paged memory is zero. Without it, or when it does not know,
	// every page of that memory is marked present (read from the frozen
	// copy, zero or not).
	LazyRuns func() ([]descriptor.Run, bool)
}

// Result is a prepared seed on this host.
type Result struct {
	Desc      *descriptor.Descriptor
	SourcePID int // the frozen copy; stopped and traced by the tracer
	Took      time.Duration
	Stopped   time.Duration // how long the parent was stopped
	// WasStopped: the parent was in a group-stop (SIGSTOP) before
	// prepare; it gets SIGSTOP back at detach and re-enters its stop
	// asynchronously (see WaitStopped).
	WasStopped bool
}

// WaitStopped waits (up to ~100 ms) until pid is back in its group-stop.
// A parent that was stopped before prepare never runs its own code after
// the detach, but for a moment shows state R while it takes the SIGSTOP.
func WaitStopped(pid int) {
	for i := 0; i < 2000; i++ {
		st, err := procfs.ReadStat(pid)
		if err != nil || st.State == 'T' {
			return
		}
		time.Sleep(50 * time.Microsecond)
	}
}

// ErrRefused marks errors for processes mitosis cannot carry.
var ErrRefused = errors.New("unsupported process")

func refuse(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, a...))
}

const taskSize = 0x7ffffffff000

// Prepare snapshots the process pid (all its threads). On success the frozen
// copy stays stopped under t; the caller must eventually kill it and reap it
// on t (see Release). On failure the parent is left running (or stopped, if
// it was stopped) and untraced.
func Prepare(t *ptrace.Tracer, pid int, opts Options) (*Result, error) {
	start := time.Now()
	if pid <= 0 {
		return nil, fmt.Errorf("prepare: invalid pid %d", pid)
	}
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("prepare %d: no such process (check the pid with `ps -p %d`)", pid, pid)
		}
		return nil, fmt.Errorf("prepare %d: %w", pid, err)
	}
	if st.TracerPid != 0 {
		return nil, fmt.Errorf("prepare %d: process is already traced by pid %d (a debugger?)", pid, st.TracerPid)
	}
	if strings.HasPrefix(st.State, "Z") || strings.HasPrefix(st.State, "X") {
		return nil, fmt.Errorf("prepare %d: process has exited (state %s)", pid, st.State)
	}
	pfds, err := procfs.FDs(pid)
	if err != nil {
		return nil, fmt.Errorf("prepare %d: %w", pid, err)
	}
	if _, _, err := checkFDs(pfds, opts.ChannelFD, probeSockets(pid)); err != nil {
		return nil, fmt.Errorf("prepare %d: %w", pid, err)
	}
	wasStopped := strings.HasPrefix(st.State, "T")
	phase("precheck", start)

	var res *Result
	err = t.Do(func() error {
		r, err := prepareLocked(pid, wasStopped, opts)
		res = r
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("prepare %d: %w", pid, err)
	}
	res.Took = time.Since(start)
	res.WasStopped = wasStopped
	return res, nil
}

// findVDSOSyscall returns the address of a `syscall` instruction in the
// process's [vdso]. The kernel's vDSO contains syscall fallbacks, and using
// it avoids writing into the parent's text.
func findVDSOSyscall(pid int, maps []procfs.Mapping) (uint64, error) {
	for _, m := range maps {
		if m.Path != "[vdso]" {
			continue
		}
		buf := make([]byte, m.End-m.Start)
		if err := ptrace.ReadMem(pid, m.Start, buf); err != nil {
			return 0, fmt.Errorf("read [vdso]: %w", err)
		}
		i := bytes.Index(buf, []byte{0x0f, 0x05})
		if i < 0 {
			return 0, errors.New("no syscall instruction in [vdso]")
		}
		return m.Start + uint64(i), nil
	}
	return 0, refuse("process has no [vdso] mapping")
}

// stopped is a process seized and held in a ptrace-stop by the tracer.
type stopped struct {
	pid        int  // tid of the thread
	tgid       int  // its process (0: pid)
	wasStopped bool // in a group-stop before: gets SIGSTOP back at detach
	pending    []syscall.Signal
	attached   bool
}

// seizeStop seizes pid with options and waits for the PTRACE_INTERRUPT
// trap-stop. Signal-delivery-stops that come first are recorded and
// suppressed; detach re-delivers them.
//
// Precondition: runs on the tracer thread.
func seizeStop(pid, options int, wasStopped bool) (*stopped, error) {
	if err := ptrace.Seize(pid, options); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("no such process")
		}
		return nil, err
	}
	s := &stopped{pid: pid, wasStopped: wasStopped, attached: true}
	if err := ptrace.Interrupt(pid); err != nil {
		s.detach()
		return nil, err
	}
	for {
		ws, err := ptrace.Wait(pid)
		if err != nil {
			s.detach()
			return nil, err
		}
		if ws.Exited() || ws.Signaled() {
			s.attached = false
			return nil, fmt.Errorf("process exited during prepare (status %#x)", uint32(ws))
		}
		if ptrace.Event(ws) == unix.PTRACE_EVENT_STOP {
			return s, nil
		}
		s.pending = append(s.pending, ws.StopSignal())
		if err := ptrace.Cont(pid, 0); err != nil {
			s.detach()
			return nil, err
		}
	}
}

// detach lets the process go, re-delivering suppressed signals (and
// SIGSTOP to a process that was stopped). Idempotent.
func (s *stopped) detach() {
	if !s.attached {
		return
	}
	var sig syscall.Signal
	pending := s.pending
	if s.wasStopped {
		sig = syscall.SIGSTOP
	} else if len(pending) > 0 {
		sig, pending = pending[0], pending[1:]
	}
	_ = ptrace.Detach(s.pid, sig)
	tgid := s.tgid
	if tgid == 0 {
		tgid = s.pid
	}
	for _, p := range pending {
		_ = unix.Tgkill(tgid, s.pid, p)
	}
	s.attached = false
}

// prepareLocked runs on the tracer thread.
func prepareLocked(pid int, wasStopped bool, opts Options) (*Result, error) {
	g, err := seizeGroup(pid, unix.PTRACE_O_TRACECLONE, wasStopped)
	if err != nil {
		return nil, err
	}
	st := g.leader
	stopAt := time.Now()
	defer g.detach()
	detach := g.detach
	// While the parent is stopped its /proc state is stable: read it on
	// another thread while this one reads the layout and registers and
	// injects the clone.
	infoc := make(chan procInfo, 1)
	go func() { infoc <- readProc(pid, opts.ChannelFD) }()
	filesc := make(chan map[string]fileStat, 1)
	waitInfo := func() procInfo { return <-infoc }
	pmaps, err := procfs.Maps(pid)
	if err != nil {
		return nil, err
	}
	if _, err := classify(pmaps, nil, nil); err != nil {
		waitInfo()
		return nil, err
	}
	at, err := findVDSOSyscall(pid, pmaps)
	if err != nil {
		waitInfo()
		return nil, err
	}
	// The leader's own state, as for every other thread.
	lead, err := readThread(pid)
	if err != nil {
		waitInfo()
		return nil, err
	}
	regs := lead.regs
	threads := make([]threadState, len(g.threads))
	for i, s := range g.threads {
		if threads[i], err = readThread(s.pid); err != nil {
			waitInfo()
			return nil, err
		}
	}
	info := waitInfo()
	if info.err != nil {
		return nil, info.err
	}
	info.robustHead, info.robustLen = lead.robust[0], lead.robust[1]
	go func() { filesc <- statFiles(pmaps, "") }()

	// Freeze: clone(flags=0) -> exit_signal 0, a full copy-on-write copy.
	phase("s.beforeclone", stopAt)
	tq := time.Now()
	src, err := injectClone(pid, at, &regs, &st.pending)
	phase("s.clone", tq)
	if err != nil {
		<-filesc
		return nil, err
	}
	if src, err = carryDontfork(pid, src, at, &regs, &st.pending, pmaps); err != nil {
		<-filesc
		_ = ptrace.SetRegs(pid, &regs)
		return nil, err
	}
	phase("s.dontfork", tq)
	killSrc := func() {
		_ = unix.Kill(src, unix.SIGKILL)
		_, _ = ptrace.Wait(src)
	}
	if err := ptrace.SetRegs(pid, &regs); err != nil {
		<-filesc
		killSrc()
		return nil, err
	}
	// The other threads' alternate signal stacks, asked of each thread
	// now that the frozen copy exists (the query writes below its rsp).
	tregs := make([]*unix.PtraceRegs, len(g.threads))
	for i := range threads {
		tregs[i] = &threads[i].regs
	}
	alts, err := threadAltStacks(g.threads, at, tregs)
	if err != nil {
		<-filesc
		killSrc()
		return nil, err
	}
	phase("s.altstacks", tq)
	var lazyRuns []descriptor.Run
	if opts.Lazy && opts.LazyRuns != nil {
		// Precondition of LazyRuns: the parent is stopped. Asked after
		// the frozen copy exists and before the parent runs again, so no
		// page it frees later is taken for zero here while the frozen
		// copy still holds it.
		if runs, ok := opts.LazyRuns(); ok {
			lazyRuns = append([]descriptor.Run{}, runs...) // not nil: known
		}
	}
	// A parent that was stopped gets SIGSTOP back with the detach: it
	// re-enters its group-stop before running any of its own code (it may
	// show state R for that moment).
	detach()
	stopped := time.Since(stopAt)
	phase("stopped", stopAt)
	t1 := time.Now()

	d, err := describe(pid, src, at, &regs, pmaps, &info, filesc, opts.Lazy, lazyRuns)
	if err != nil {
		killSrc()
		return nil, err
	}
	phase("describe", t1)
	d.Threads = describeThreads(src, threads, alts)
	d.TIDRefs = loaderLockOwners(src, pmaps, threadIDs(pid, &info.status, threads))
	d.XState = lead.xstate
	d.SigMask = lead.sigmask
	d.Rseq = descriptor.Rseq{Addr: lead.rseq.Addr, Len: lead.rseq.Size, Sig: lead.rseq.Sig, Flags: lead.rseq.Flags}
	return &Result{Desc: d, SourcePID: src, Stopped: stopped}, nil
}

// injectClone makes pid clone itself and returns the new, stopped and
// auto-attached copy.
func injectClone(pid int, at uint64, base *unix.PtraceRegs, pending *[]syscall.Signal) (int, error) {
	child, err := ptrace.InjectClone(pid, at, base, pending)
	if err != nil {
		return 0, err
	}
	// The copy starts with a ptrace stop (auto-attached).
	if _, err := ptrace.WaitStop(child, 0, nil, nil); err != nil {
		return 0, fmt.Errorf("wait for frozen copy: %w", err)
	}
	if err := ptrace.SetOptions(child, unix.PTRACE_O_EXITKILL); err != nil {
		_ = unix.Kill(child, unix.SIGKILL)
		return 0, err
	}
	return child, nil
}

// Release kills the frozen copy of a seed and reaps it.
//
// Precondition: runs on the tracer thread that owns src.
func Release(src int) error {
	if err := unix.Kill(src, unix.SIGKILL); err != nil && err != unix.ESRCH {
		return fmt.Errorf("kill frozen copy %d: %w", src, err)
	}
	for {
		ws, err := ptrace.Wait(src)
		if err != nil {
			if errors.Is(err, unix.ECHILD) {
				return nil
			}
			return err
		}
		if ws.Exited() || ws.Signaled() {
			return nil
		}
	}
}

// describe builds the descriptor from the frozen copy src (a clone of pid
// stopped right after the clone).
//
// Precondition: runs on the tracer thread.
//
// With lazy, the process's own memory is paged in lazily: lazyRuns (nil:
// unknown) are the pages of it that may hold data though not mapped.
func describe(pid, src int, at uint64, regs *unix.PtraceRegs, maps []procfs.Mapping, info *procInfo, filesc chan map[string]fileStat, lazy bool, lazyRuns []descriptor.Run) (*descriptor.Descriptor, error) {
	d := &descriptor.Descriptor{PID: int32(pid), VDSOSyscall: at}
	d.Regs = regsToArray(regs)
	d.Kernel = kernelRelease

	// Page presence and file identities are gathered concurrently with
	// the tracer-thread work below.
	type scanResult struct {
		regions []procfs.PageRegion
		err     error
	}
	scanc := make(chan scanResult, 1)
	go func() {
		pm, err := procfs.OpenPagemap(src)
		if err != nil {
			scanc <- scanResult{err: err}
			return
		}
		regions, err := pm.Scan(0, taskSize, 0, procfs.PageIsPresent|procfs.PageIsSwapped, 0,
			procfs.PageIsPresent|procfs.PageIsSwapped|procfs.PageIsFile|procfs.PageIsPFNZero)
		pm.Close()
		scanc <- scanResult{regions, err}
	}()
	finish := func() (*descriptor.Descriptor, error) {
		tw := time.Now()
		sr := <-scanc
		phase("d.waitscan", tw)
		files := <-filesc
		if sr.err != nil {
			return nil, sr.err
		}
		vmas, err := classify(maps, sr.regions, files)
		if err != nil {
			return nil, err
		}
		var lazyVMAs []descriptor.VMA
		if lazy {
			// Its anonymous memory, and its memory mapped from its
			// node's page cache (a KindFileDirty without a path), may
			// hold pages not mapped yet: all of them are present, or,
			// when the pager said which, those it said.
			for i := range vmas {
				v := &vmas[i]
				if v.Kind != descriptor.KindAnon && (v.Kind != descriptor.KindFileDirty || v.Path != "") {
					continue
				}
				if lazyRuns == nil {
					v.Kind = descriptor.KindFileDirty
					continue
				}
				v.Kind = descriptor.KindAnon
				lazyVMAs = append(lazyVMAs, *v)
			}
		}
		d.VMAs = vmas
		d.Present = presentRuns(vmas, sr.regions)
		if lazyRuns != nil {
			d.Present = unionRuns(d.Present, clipToVMAs(lazyRuns, lazyVMAs))
		}
		relativize(d, pid)
		return d, nil
	}
	drain := func(err error) (*descriptor.Descriptor, error) {
		<-scanc
		<-filesc
		return nil, err
	}

	// The parent's /proc state, read while it was stopped, is the frozen
	// copy's too (a clone copies it), except for what is checked below.
	stat, status := info.stat, info.status
	d.Auxv, d.Exe, d.ExeFile, d.Cwd = info.auxv, info.exe, info.exeID, info.cwd
	d.Comm = readComm(pid)
	d.Umask = status.Umask
	d.Creds = descriptor.Creds{
		UID: status.Uid[0], EUID: status.Uid[1], SUID: status.Uid[2], FSUID: status.Uid[3],
		GID: status.Gid[0], EGID: status.Gid[1], SGID: status.Gid[2], FSGID: status.Gid[3],
		Groups: status.Groups,
	}
	d.Rlimits, d.FDs = info.rlimits, info.fds
	d.RobustHead, d.RobustLen = info.robustHead, info.robustLen
	tq := time.Now()
	defer func() { phase("d.tail", tq) }()
	srcStatus, err := procfs.ReadStatus(src)
	if err != nil {
		return drain(err)
	}

	// Queries injected into the frozen copy: it shares the parent's
	// dispositions, alternate stack and brk, and it never runs again, so
	// scratch writes below its stack pointer are harmless.
	var sregs unix.PtraceRegs
	if err := ptrace.GetRegs(src, &sregs); err != nil {
		return drain(err)
	}
	var pending []syscall.Signal
	inj := func(nr uint64, args ...uint64) (uint64, error) {
		ret, err := ptrace.Inject(src, at, &sregs, &pending, nr, args...)
		if err != nil {
			return 0, err
		}
		if e := ptrace.Errno(ret); e != nil {
			return ret, fmt.Errorf("syscall %d in frozen copy: %w", nr, e)
		}
		return ret, nil
	}
	brk, err := inj(unix.SYS_BRK, 0)
	if err != nil {
		return drain(err)
	}
	d.MM = descriptor.MMFields{
		StartCode: stat.StartCode, EndCode: stat.EndCode,
		StartData: stat.StartData, EndData: stat.EndData,
		StartBrk: stat.StartBrk, Brk: brk,
		StartStack: stat.StartStack,
		ArgStart:   stat.ArgStart, ArgEnd: stat.ArgEnd,
		EnvStart: stat.EnvStart, EnvEnd: stat.EnvEnd,
	}
	scratch := (sregs.Rsp - 2048) &^ 15
	buf := make([]byte, 32)
	for sig := 1; sig <= 64; sig++ {
		bit := uint64(1) << (sig - 1)
		if sig == int(unix.SIGKILL) || sig == int(unix.SIGSTOP) {
			continue
		}
		if status.SigIgn&bit != 0 {
			d.SigActions = append(d.SigActions, descriptor.SigAction{Signo: uint32(sig), Handler: 1})
			continue
		}
		if status.SigCgt&bit == 0 {
			continue
		}
		if _, err := inj(unix.SYS_RT_SIGACTION, uint64(sig), 0, scratch, 8); err != nil {
			return drain(err)
		}
		if err := ptrace.ReadMem(src, scratch, buf); err != nil {
			return drain(err)
		}
		le := binary.LittleEndian
		d.SigActions = append(d.SigActions, descriptor.SigAction{
			Signo: uint32(sig), Handler: le.Uint64(buf[0:]), Flags: le.Uint64(buf[8:]),
			Restorer: le.Uint64(buf[16:]), Mask: le.Uint64(buf[24:]),
		})
	}
	if _, err := inj(unix.SYS_SIGALTSTACK, 0, scratch); err != nil {
		return drain(err)
	}
	if err := ptrace.ReadMem(src, scratch, buf[:24]); err != nil {
		return drain(err)
	}
	le := binary.LittleEndian
	d.AltStackSP, d.AltStackFlags, d.AltStackSize = le.Uint64(buf[0:]), le.Uint32(buf[8:]), le.Uint64(buf[16:])

	// glibc caches the thread id in the TCB (struct pthread.tid) and
	// registers its address with set_tid_address. Find it by value.
	if regs.Fs_base != 0 {
		tcb := make([]byte, 4096)
		if err := ptrace.ReadMem(src, regs.Fs_base, tcb); err == nil {
			if off := findTID(tcb, uint32(pid)); off >= 0 {
				d.TIDAddr = regs.Fs_base + uint64(off)
				d.ClearTID = d.TIDAddr
			}
		}
	}
	// The frozen copy keeps no fds: they would hold pipes and sockets of
	// the parent open (children reopen files by path).
	if _, err := inj(unix.SYS_CLOSE_RANGE, 0, ^uint64(0)>>32, 0); err != nil {
		return drain(err)
	}
	// Signals queued for the frozen copy (pending) are dropped: it never
	// runs again.

	// MADV_DONTFORK ranges are absent in the frozen copy: its mapped size
	// then differs from the parent's layout, and the copy's own layout is
	// what children get.
	var total uint64
	for _, m := range maps {
		if m.Path != "[vsyscall]" {
			total += m.End - m.Start
		}
	}
	if srcStatus.VmSize != 0 && srcStatus.VmSize != total {
		if debugPhases {
			fmt.Fprintf(os.Stderr, "prepare: frozen copy maps %d bytes, parent layout %d: re-reading\n", srcStatus.VmSize, total)
		}
		<-filesc
		if maps, err = procfs.Maps(src); err != nil {
			return drain(err)
		}
		filesc <- statFiles(maps, "")
	}
	return finish()
}

// glibcTIDOffset is offsetof(struct pthread, tid) in glibc 2.3x on x86-64;
// preferred when the pid occurs more than once in the TCB.
const glibcTIDOffset = 0x2d0

func findTID(tcb []byte, pid uint32) int {
	first := -1
	for off := 0; off+4 <= len(tcb); off += 4 {
		if binary.LittleEndian.Uint32(tcb[off:]) == pid {
			if off == glibcTIDOffset {
				return off
			}
			if first < 0 {
				first = off
			}
		}
	}
	return first
}

func regsToArray(r *unix.PtraceRegs) [27]uint64 {
	return [27]uint64{r.R15, r.R14, r.R13, r.R12, r.Rbp, r.Rbx, r.R11, r.R10, r.R9, r.R8,
		r.Rax, r.Rcx, r.Rdx, r.Rsi, r.Rdi, r.Orig_rax, r.Rip, r.Cs, r.Eflags, r.Rsp, r.Ss,
		r.Fs_base, r.Gs_base, r.Ds, r.Es, r.Fs, r.Gs}
}

// RegsFromArray converts a descriptor register array back.
func RegsFromArray(a [27]uint64) unix.PtraceRegs {
	return unix.PtraceRegs{R15: a[0], R14: a[1], R13: a[2], R12: a[3], Rbp: a[4], Rbx: a[5], R11: a[6],
		R10: a[7], R9: a[8], R8: a[9], Rax: a[10], Rcx: a[11], Rdx: a[12], Rsi: a[13], Rdi: a[14],
		Orig_rax: a[15], Rip: a[16], Cs: a[17], Eflags: a[18], Rsp: a[19], Ss: a[20],
		Fs_base: a[21], Gs_base: a[22], Ds: a[23], Es: a[24], Fs: a[25], Gs: a[26]}
}

var debugPhases = os.Getenv("MITOSIS_DEBUG_PHASES") != ""

func phase(name string, since time.Time) {
	if debugPhases {
		fmt.Fprintf(os.Stderr, "prepare phase %s: %v\n", name, time.Since(since))
	}
}

var kernelRelease = func() string {
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	return unix.ByteSliceToString(uts.Release[:])
}()

// procInfo is the /proc and kernel state of a stopped parent that its
// frozen copy shares.
type procInfo struct {
	stat                  procfs.Stat
	status                procfs.Status
	auxv                  []byte
	exe, cwd              string
	exeID                 descriptor.FileID
	rlimits               []descriptor.Rlimit
	fds                   []descriptor.FD
	robustHead, robustLen uint64
	err                   error
}

// readProc reads pid's procInfo; unsupported fds set err.
func readProc(pid, channel int) (pi procInfo) {
	fail := func(err error) procInfo { pi.err = err; return pi }
	var err error
	if pi.stat, err = procfs.ReadStat(pid); err != nil {
		return fail(err)
	}
	if pi.status, err = procfs.ReadStatus(pid); err != nil {
		return fail(err)
	}
	if pi.auxv, err = procfs.Auxv(pid); err != nil {
		return fail(err)
	}
	if pi.exe, err = procfs.Exe(pid); err != nil {
		return fail(err)
	}
	pi.exeID, _ = fileID(fmt.Sprintf("/proc/%d/exe", pid))
	if pi.cwd, err = procfs.Cwd(pid); err != nil {
		return fail(err)
	}
	// From /proc: prlimit(2) on a process with other credentials needs
	// CAP_SYS_RESOURCE, which a daemon may lack.
	lims, err := procfs.Limits(pid)
	if err != nil {
		return fail(err)
	}
	for _, l := range lims {
		pi.rlimits = append(pi.rlimits, descriptor.Rlimit{Resource: uint32(l.Resource), Cur: l.Cur, Max: l.Max})
	}
	fds, err := procfs.FDs(pid)
	if err != nil {
		return fail(err)
	}
	if pi.fds, _, err = checkFDs(fds, channel, probeSockets(pid)); err != nil {
		return fail(err)
	}
	if err := capturePipes(pid, pi.fds); err != nil {
		return fail(err)
	}
	return pi
}

// ReapInParent reaps the dead frozen copy src in its parent pid. The copy
// is the parent's clone with exit signal 0, so only a wait with __WALL
// reaps it, which the parent never does: without this, each removed seed
// would leave a zombie in a long-lived parent. The parent is stopped for
// one injected wait4. vdsoSyscall is the seed's VDSOSyscall.
//
// Precondition: runs on the tracer thread; src was released (Release).
func ReapInParent(pid, src int, vdsoSyscall uint64) error {
	st, err := procfs.ReadStat(src)
	if err != nil || st.State != 'Z' || st.PPid != pid {
		return nil // already reaped, or reparented to a reaper
	}
	ps, err := procfs.ReadStat(pid)
	if err != nil {
		return nil
	}
	s, err := seizeStop(pid, 0, ps.State == 'T')
	if err != nil {
		return fmt.Errorf("reap frozen copy %d in parent %d: %w", src, pid, err)
	}
	defer s.detach()
	var regs unix.PtraceRegs
	if err := ptrace.GetRegs(pid, &regs); err != nil {
		return err
	}
	ret, err := ptrace.Inject(pid, vdsoSyscall, &regs, &s.pending, unix.SYS_WAIT4, uint64(src), 0, unix.WALL, 0)
	if rerr := ptrace.SetRegs(pid, &regs); err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("reap frozen copy %d in parent %d: %w", src, pid, err)
	}
	if e := ptrace.Errno(ret); e != nil {
		return fmt.Errorf("reap frozen copy %d in parent %d: wait4: %w", src, pid, e)
	}
	return nil
}

// relativize records the parent's root directory and makes the
// descriptor's paths relative to it. /proc shows a chrooted (container)
// process's paths as this node sees them (/images/py/usr/lib/...); a child
// resolves them inside its own copy of the image.
func relativize(d *descriptor.Descriptor, pid int) {
	root, err := os.Readlink(fmt.Sprintf("/proc/%d/root", pid))
	if err != nil || root == "/" {
		return
	}
	d.Root = root
	rel := func(p string) string {
		if p == root {
			return "/"
		}
		if r, ok := strings.CutPrefix(p, root); ok && strings.HasPrefix(r, "/") {
			return r
		}
		return p
	}
	for i := range d.VMAs {
		if d.VMAs[i].Kind == descriptor.KindFile || (d.VMAs[i].Kind == descriptor.KindFileDirty && strings.HasPrefix(d.VMAs[i].Path, "/")) {
			d.VMAs[i].Path = rel(d.VMAs[i].Path)
		}
	}
	d.Exe, d.Cwd = rel(d.Exe), rel(d.Cwd)
	for i := range d.FDs {
		if d.FDs[i].Kind == descriptor.FDFile {
			d.FDs[i].Path = rel(d.FDs[i].Path)
		}
	}
}

// readComm returns /proc/ID/comm of a process or thread (a thread id
// resolves under /proc too), at most descriptor.MaxComm bytes, or "" if it
// cannot be read (the task is gone: its name is not worth failing for).
func readComm(id int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", id))
	if err != nil {
		return ""
	}
	c := strings.TrimSuffix(string(b), "\n")
	return c[:min(len(c), descriptor.MaxComm)]
}

// threadIDs maps every tid the process sees for its threads to their index
// in Descriptor.Threads (-1: the main thread, pid): the host tid and, for a
// process in a PID namespace of its own (status lists more than one id),
// the tid there, which is what glibc stores.
func threadIDs(pid int, status *procfs.Status, threads []threadState) map[int32]int32 {
	m := map[int32]int32{int32(pid): -1}
	nested := len(status.NSpid) > 1
	if nested {
		m[int32(status.NSpid[len(status.NSpid)-1])] = -1
	}
	for i, ts := range threads {
		m[int32(ts.tid)] = int32(i)
		if nested {
			if st, err := procfs.ReadStatus(ts.tid); err == nil && len(st.NSpid) > 0 {
				m[int32(st.NSpid[len(st.NSpid)-1])] = int32(i)
			}
		}
	}
	return m
}
