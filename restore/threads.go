package restore

import (
	"fmt"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
	"github.com/mitosis-fork/mitosis/internal/stub"
	"github.com/mitosis-fork/mitosis/snapshot"
)

// threadCloneFlags are pthread_create's clone flags, less
// CLONE_PARENT_SETTID and CLONE_SETTLS (added when the thread restores
// itself; on the tracer's path fs_base comes with its registers).
const threadCloneFlags = unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND |
	unix.CLONE_THREAD | unix.CLONE_SYSVSEM

// thread is one recreated thread of the child, stopped under the tracer.
type thread struct {
	tid     int
	pending []syscall.Signal
}

// threadSlot is the size of one thread's slot in the Cloner's arena: the
// header, up to threadCalls Runner entries (arch_prctl for gs,
// set_robust_list, rseq, sigaltstack on the tracer's path, prctl
// PR_SET_NAME) and threadArena bytes of their data (the stack_t sigaltstack
// reads, the thread's name: 24 + 16).
const (
	threadCalls = 5
	threadArena = 56
	threadSlot  = stub.ThreadSlotHeader + threadCalls*stub.EntrySize + threadArena
)

// threadTables is the arena space makeThreads needs for n threads: one
// slot per thread (their clone entries go in the leader's table).
func threadTables(n int) uint64 { return uint64(n)*threadSlot + 8 }

// makeThreads recreates the seed's other threads inside the child, in a
// few stops whatever their number. The leader runs the Cloner once: one
// clone(2) per thread (CLONE_THREAD, so each shares everything the
// parent's threads shared); each new thread at once sets what is per
// thread and not inherited (robust futex list, rseq; its fs base) from its
// own table. Then, when the parent's signal restorer and a returning vDSO
// syscall are at hand (selfRestorer), each thread waits on a futex in the
// vDSO with its stack pointer at a signal frame holding its registers,
// XSTATE, signal mask and alternate stack; once all wait, one FUTEX_WAKE
// lets them rt_sigreturn into their state (see sigframe.go): no ptrace
// request per thread. Otherwise each parks in pause(2) and the tracer
// seizes them and sets their state with ptrace (makeTracedThreads).
//
// The leader's signals are blocked while the threads are made (new threads
// inherit that), so no handler runs on a thread before its state is in
// place. The kernel writes each new thread's tid into its TCB
// (CLONE_CHILD_SETTID at the thread's cached-tid address, in the child's
// PID namespace) and clears it at exit (CLONE_CHILD_CLEARTID), as
// pthread_create does: glibc's cached tid and pthread_join keep working.
//
// The clones are appended to cb, the leader's last batch (its task state:
// credentials, limits, signal handlers, which the threads share or
// inherit), and run with it by the Cloner in one stop: a round trip less
// than a run of its own.
//
// Precondition: runs on the tracer thread; the address space (and its
// pager) is complete; the gadget is still mapped, with room in cb's table
// for one entry per thread and in its arena for threadTables.
func (c *child) makeThreads(cb *stub.Batch) ([]*thread, func() error, error) {
	d := c.d
	n := len(d.Threads)
	if err := ptrace.SetSigMask(c.pid, ^uint64(0)); err != nil {
		return nil, nil, err
	}
	self, selfOK := c.self, c.selfOK
	// Two futex words in the code page (read-only zeros past the code):
	// threads wait on the first, are requeued to the second once counted.
	waitOn, wakeOn := c.gadget+4096-16, c.gadget+4096-8
	// The threads' slots, one after the other in cb's arena.
	slots := cb.Data(make([]byte, n*threadSlot))
	first := len(cb.Calls) // the leader's own calls come first
	inits := make([]*stub.Batch, n)
	for i := range d.Threads {
		th := &d.Threads[i]
		slot := slots + uint64(i)*threadSlot
		b := stub.NewBatch(slot+stub.ThreadSlotHeader, threadCalls*stub.EntrySize)
		tr := snapshot.RegsFromArray(th.Regs)
		var frame uint64
		if selfOK {
			// fs_base comes with the clone (CLONE_SETTLS).
			if tr.Gs_base != 0 {
				b.Add("arch_prctl ARCH_SET_GS", unix.SYS_ARCH_PRCTL, archSetGS, tr.Gs_base)
			}
			frame = c.frames[i]
		}
		if th.RobustHead != 0 {
			b.Add("set_robust_list", unix.SYS_SET_ROBUST_LIST, th.RobustHead, th.RobustLen)
		}
		if th.Rseq.Addr != 0 {
			b.Add("rseq", unix.SYS_RSEQ, th.Rseq.Addr, uint64(th.Rseq.Len), 0, uint64(th.Rseq.Sig))
		}
		if !selfOK && th.AltStackFlags&ssDisable == 0 && th.AltStackSize != 0 {
			ss := make([]byte, 24)
			*(*uint64)(unsafe.Pointer(&ss[0])) = th.AltStackSP
			*(*uint32)(unsafe.Pointer(&ss[8])) = th.AltStackFlags &^ ssOnStack
			*(*uint64)(unsafe.Pointer(&ss[16])) = th.AltStackSize
			b.Add("sigaltstack", unix.SYS_SIGALTSTACK, b.Data(ss), 0)
		}
		if th.Comm != "" && th.Comm != d.Comm {
			// Its own name (the leader's, set in batch 3, is inherited).
			b.Add("prctl PR_SET_NAME", unix.SYS_PRCTL, unix.PR_SET_NAME, b.String(th.Comm))
		}
		inits[i] = b
		if _, arena := b.Arena(); len(b.Calls) > threadCalls || len(arena) > threadArena {
			return nil, nil, fmt.Errorf("thread %d: %d init calls and %d bytes of data, the slot holds %d and %d", i+1, len(b.Calls), len(arena), threadCalls, threadArena)
		}
		buf := make([]byte, threadSlot)
		hdr := unsafe.Slice((*uint64)(unsafe.Pointer(&buf[0])), 4)
		hdr[0] = uint64(len(b.Calls))
		if selfOK {
			hdr[1], hdr[2], hdr[3] = waitOn, self.vdsoRet, frame
		}
		copy(buf[stub.ThreadSlotHeader:], b.TableBytes())
		_, arena := b.Arena()
		copy(buf[stub.ThreadSlotHeader+threadCalls*stub.EntrySize:], arena)
		cb.Put(slot, buf)
		flags := uint64(threadCloneFlags)
		if th.TIDAddr != 0 {
			flags |= unix.CLONE_CHILD_SETTID | unix.CLONE_CHILD_CLEARTID
		}
		var tls uint64
		if selfOK && tr.Fs_base != 0 {
			flags, tls = flags|unix.CLONE_SETTLS, tr.Fs_base
		}
		// Parked on its own stack, below the red zone.
		sp := (tr.Rsp - 256) &^ 15
		cb.Add(fmt.Sprintf("clone thread %d of %d (parent tid %d)", i+1, n, th.TID), unix.SYS_CLONE, flags, sp, 0, th.TIDAddr, tls, slot)
	}
	// The frames the preload did not install (their pages were there
	// already, e.g. an eager fork).
	if selfOK {
		if err := ptrace.WriteMemv(c.pid, c.frames, c.frameData); err != nil {
			return nil, nil, fmt.Errorf("write the threads' signal frames: %w", err)
		}
	}
	mark("threads: tables")
	// On failure the threads created so far are untraced: they die with
	// the child when the caller kills it.
	res, err := c.runOn(c.pid, cb, stub.ClonerOffset, &c.regs, &c.pending)
	if err != nil {
		return nil, nil, err
	}
	res = res[first:]
	mark("threads: clone")
	c.newTIDs = res
	if !selfOK {
		ts, err := c.makeTracedThreads(slots, inits, res)
		return ts, nil, err
	}
	// Every thread waits in the vDSO (out of the gadget) once the requeue
	// has counted it; then its table is done too.
	deadline := time.Now().Add(threadInitWait)
	for waiting := 0; waiting < n; {
		moved, err := c.inject(d.VDSOSyscall, unix.SYS_FUTEX, waitOn, futexCmpRequeuePrivate, 0, 1<<31-1, wakeOn, 0)
		if err != nil {
			return nil, nil, fmt.Errorf("count the waiting threads: %w", err)
		}
		waiting += int(moved)
		if waiting < n {
			if time.Now().After(deadline) {
				return nil, nil, fmt.Errorf("only %d of %d new threads reached their release point within %v", waiting, n, threadInitWait)
			}
			_, _, _ = unix.Syscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
		}
	}
	mark("threads: parked")
	if err := c.checkInits(slots, inits); err != nil {
		return nil, nil, err
	}
	// The release: waiting in the vDSO, the threads need the gadget no
	// more; the caller wakes them once it is unmapped.
	release := func() error {
		woken, err := c.inject(d.VDSOSyscall, unix.SYS_FUTEX, wakeOn, futexWakePrivate, 1<<31-1)
		if err != nil {
			return fmt.Errorf("release the threads: %w", err)
		}
		if int(woken) != n {
			return fmt.Errorf("released %d threads, want %d", woken, n)
		}
		return nil
	}
	return nil, release, nil
}

// archSetGS is arch_prctl's ARCH_SET_GS.
const archSetGS = 0x1001

// makeTracedThreads finishes makeThreads on the tracer's path: once every
// thread has run its table and parked in pause(2), the tracer seizes and
// interrupts them all, waits for them all, and sets each one's registers,
// XSTATE and signal mask; the caller releases them (releaseThreads).
func (c *child) makeTracedThreads(slots uint64, inits []*stub.Batch, res []uint64) ([]*thread, error) {
	d := c.d
	if err := c.waitInits(slots, inits); err != nil {
		return nil, err
	}
	mark("threads: init")
	tids, err := hostTIDs(c.pid, res)
	if err != nil {
		return nil, err
	}
	out := make([]*thread, 0, len(tids))
	for i, tid := range tids {
		if err := ptrace.Seize(tid, unix.PTRACE_O_EXITKILL); err != nil {
			return out, fmt.Errorf("seize thread %d (tid %d): %w", i+1, tid, err)
		}
		out = append(out, &thread{tid: tid})
		if err := ptrace.Interrupt(tid); err != nil {
			return out, fmt.Errorf("interrupt thread %d (tid %d): %w", i+1, tid, err)
		}
	}
	for i, t := range out {
		if _, err := ptrace.WaitStop(t.tid, 0, nil, nil); err != nil {
			return out, fmt.Errorf("thread %d (tid %d) stop: %w", i+1, t.tid, err)
		}
	}
	mark("threads: stopped")
	for i, t := range out {
		th := &d.Threads[i]
		if err := ptrace.SetXState(t.tid, th.XState); err != nil {
			return out, err
		}
		regs := snapshot.RegsFromArray(th.Regs)
		fixRestart(&regs)
		regs.Eflags &^= 0x100
		if err := ptrace.SetRegs(t.tid, &regs); err != nil {
			return out, err
		}
		if err := ptrace.SetSigMask(t.tid, th.SigMask); err != nil {
			return out, err
		}
	}
	return out, nil
}

// threadInitWait bounds how long new threads may take to run their tables.
const threadInitWait = 5 * time.Second

// waitInits waits until every new thread has run its table (each result
// slot written: the thread is then at most a few instructions from its
// pause(2)) and checks the results.
func (c *child) waitInits(slots uint64, inits []*stub.Batch) error {
	deadline := time.Now().Add(threadInitWait)
	for spin := 0; ; spin++ {
		done, err := c.readInits(slots, inits)
		if err != nil || done {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("new threads did not set up their kernel state within %v", threadInitWait)
		}
		if spin < 100 {
			// Give the CPU to the new threads (this is the tracer's
			// locked OS thread).
			_, _, _ = unix.Syscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
		} else {
			time.Sleep(50 * time.Microsecond)
		}
	}
}

// checkInits checks the results of the threads' tables, which must all
// have run.
func (c *child) checkInits(slots uint64, inits []*stub.Batch) error {
	done, err := c.readInits(slots, inits)
	if err == nil && !done {
		err = fmt.Errorf("a new thread waits without having run its table")
	}
	return err
}

// readInits reads the threads' result slots: whether all ran, or the first
// failed call.
func (c *child) readInits(slots uint64, inits []*stub.Batch) (bool, error) {
	buf := make([]byte, len(inits)*threadSlot)
	if err := ptrace.ReadMem(c.pid, slots, buf); err != nil {
		return false, err
	}
	done := true
	for i, b := range inits {
		at := i*threadSlot + stub.ThreadSlotHeader
		res := stub.Results(buf[at : at+len(b.Calls)*stub.EntrySize])
		for j, v := range res {
			if v == stub.NotRun {
				done = false
				break
			}
			if e := ptrace.Errno(v); e != nil {
				return false, fmt.Errorf("thread %d (parent tid %d): %s: %w", i+1, c.d.Threads[i].TID, b.Calls[j].What, e)
			}
		}
	}
	return done, nil
}

// preloadThreads decides how the threads will be restored (selfRestorer),
// builds their signal frames and, with preload, installs each thread's TCB
// page and the stack pages around its stack pointer before the child runs,
// its frame written into them: the kernel writes the tid at clone, every
// thread touches its stack first, and a frame installed with its page
// costs no copy-on-write later. A thread's TCB sits at the top of its stack
// mapping, usually a few pages above rsp: one range covers both then.
// Ranges are clipped to the mapping they start in.
func (c *child) preloadThreads(preload func(uint64, int, func(uint64, []byte)) error) error {
	d := c.d
	c.self, c.selfOK = c.selfRestorer()
	if c.selfOK {
		c.frames = make([]uint64, len(d.Threads))
		c.frameData = make([][]byte, len(d.Threads))
		for i := range d.Threads {
			f, b, err := threadFrame(&d.Threads[i], c.self.restorer)
			if err != nil {
				// Not restorable by itself: the tracer does them all.
				c.selfOK, c.frames, c.frameData = false, nil, nil
				break
			}
			c.frames[i], c.frameData[i] = f, b
		}
	}
	if preload == nil {
		return nil
	}
	for i := range d.Threads {
		tr := snapshot.RegsFromArray(d.Threads[i].Regs)
		lo, hi := (tr.Rsp&^4095)-4096, (tr.Rsp&^4095)+4096
		var ranges [][2]uint64
		if tcb := d.Threads[i].TIDAddr &^ 4095; tcb >= lo && tcb < lo+16*4096 {
			ranges = [][2]uint64{{lo, max(hi, tcb+4096)}}
		} else {
			ranges = [][2]uint64{{lo, hi}}
			if tcb != 0 {
				ranges = append(ranges, [2]uint64{tcb, tcb + 4096})
			}
		}
		var patch func(uint64, []byte)
		covered := 0
		if c.selfOK {
			f, data := c.frames[i], c.frameData[i]
			patch = func(a uint64, b []byte) {
				s, e := max(a, f), min(a+uint64(len(b)), f+uint64(len(data)))
				if s < e {
					copy(b[s-a:e-a], data[s-f:e-f])
					covered += int(e - s)
				}
			}
		}
		for _, r := range ranges {
			if n := pagesIn(d, r[0], int((r[1]-r[0])/4096)); n > 0 {
				if err := preload(r[0], n, patch); err != nil {
					return fmt.Errorf("thread %d at %#x: %w", i+1, r[0], err)
				}
			}
		}
		if c.selfOK && covered == len(c.frameData[i]) {
			c.frameData[i] = nil // installed with its pages
		}
	}
	return nil
}

// pagesIn returns how many of the n pages at addr lie in one accessible
// mapping of d (0 if addr is in none).
func pagesIn(d *descriptor.Descriptor, addr uint64, n int) int {
	for _, v := range d.VMAs {
		if addr >= v.Start && addr < v.End {
			if v.Prot == 0 {
				return 0
			}
			return min(n, int((v.End-addr)/descriptor.PageSize))
		}
	}
	return 0
}

// hostTIDs maps the thread ids clone(2) returned in the child (in its own
// PID namespace, for a container child) to the tracer's.
func hostTIDs(pid int, ns []uint64) ([]int, error) {
	out := make([]int, len(ns))
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		return nil, err
	}
	if len(st.NSpid) <= 1 {
		for i, t := range ns {
			out[i] = int(t)
		}
		return out, nil
	}
	tasks, err := procfs.Tasks(pid)
	if err != nil {
		return nil, err
	}
	host := make(map[int]int, len(tasks))
	for _, t := range tasks {
		ts, err := procfs.ReadStatus(t)
		if err != nil || len(ts.NSpid) == 0 {
			continue
		}
		host[ts.NSpid[len(ts.NSpid)-1]] = t
	}
	for i, t := range ns {
		h, ok := host[int(t)]
		if !ok {
			return nil, fmt.Errorf("thread %d of %d (tid %d in the child's PID namespace) not found in /proc/%d/task", i+1, len(ns), t, pid)
		}
		out[i] = h
	}
	return out, nil
}

// releaseThreads detaches the restored threads; each resumes where its
// parent thread was stopped (a wait it was in restarts).
func releaseThreads(c *child, ts []*thread) error {
	for _, t := range ts {
		var sig syscall.Signal
		if len(t.pending) > 0 {
			sig = t.pending[0]
		}
		if err := ptrace.Detach(t.tid, sig); err != nil {
			return err
		}
		for _, s := range t.pending[min(1, len(t.pending)):] {
			_ = unix.Tgkill(c.pid, t.tid, s)
		}
	}
	return nil
}

// reapThreads waits for threads of a killed child: a traced thread stays a
// zombie until its tracer reaps it, and the leader is not reported before
// them.
func reapThreads(ts []*thread) {
	for _, t := range ts {
		for {
			ws, err := ptrace.Wait(t.tid)
			if err != nil || ws.Exited() || ws.Signaled() {
				break
			}
		}
	}
}
