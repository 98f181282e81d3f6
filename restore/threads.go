package restore

import (
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/internal/ptrace"
	"github.com/mitosis-fork/mitosis/snapshot"
)

// threadCloneFlags are pthread_create's clone flags, less CLONE_SETTLS
// (fs_base is loaded with the thread's registers) and CLONE_PARENT_SETTID.
const threadCloneFlags = unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND |
	unix.CLONE_THREAD | unix.CLONE_SYSVSEM

// thread is one recreated thread of the child, stopped under the tracer.
type thread struct {
	tid     int
	pending []syscall.Signal
}

// makeThreads recreates the seed's other threads inside the child: each is
// cloned from the leader (CLONE_THREAD, so it shares everything the
// parent's threads shared), starts in a ptrace-stop before running a single
// instruction, and gets its own kernel-side state (robust list, rseq,
// alternate stack: all per thread and not inherited by clone) by injection,
// then its registers, XSTATE and signal mask. Nothing runs until the caller
// releases them (releaseThreads), after every thread is restored.
//
// The kernel writes each new thread's tid into its TCB (CLONE_CHILD_SETTID
// at the thread's cached-tid address, in the child's PID namespace) and
// clears it at exit (CLONE_CHILD_CLEARTID), as pthread_create does: glibc's
// cached tid and pthread_join keep working.
//
// Precondition: runs on the tracer thread; the leader carries
// PTRACE_O_TRACECLONE; the address space (and its pager) is complete; the
// gadget is still mapped (its arena is scratch for the alternate stacks).
func (c *child) makeThreads() ([]*thread, error) {
	d := c.d
	var out []*thread
	scratch := c.gadget + c.gsize - 64
	for i := range d.Threads {
		th := &d.Threads[i]
		flags := uint64(threadCloneFlags)
		if th.TIDAddr != 0 {
			flags |= unix.CLONE_CHILD_SETTID | unix.CLONE_CHILD_CLEARTID
		}
		tid, err := ptrace.InjectClone(c.pid, d.VDSOSyscall, &c.regs, &c.pending, flags, 0, 0, th.TIDAddr, 0)
		if err != nil {
			return out, fmt.Errorf("thread %d of %d (parent tid %d): %w", i+1, len(d.Threads), th.TID, err)
		}
		t := &thread{tid: tid}
		out = append(out, t)
		// Auto-attached: it starts with a SIGSTOP, suppressed by the
		// first resume below.
		if _, err := ptrace.WaitStop(tid, 0, nil, nil); err != nil {
			return out, fmt.Errorf("thread %d (parent tid %d) start: %w", i+1, th.TID, err)
		}
		var base unix.PtraceRegs
		if err := ptrace.GetRegs(tid, &base); err != nil {
			return out, err
		}
		inj := func(what string, nr uint64, args ...uint64) error {
			ret, err := ptrace.Inject(tid, d.VDSOSyscall, &base, &t.pending, nr, args...)
			if err == nil {
				err = ptrace.Errno(ret)
			}
			if err != nil {
				return fmt.Errorf("thread %d (parent tid %d): %s: %w", i+1, th.TID, what, err)
			}
			return nil
		}
		if th.RobustHead != 0 {
			if err := inj("set_robust_list", unix.SYS_SET_ROBUST_LIST, th.RobustHead, th.RobustLen); err != nil {
				return out, err
			}
		}
		if th.Rseq.Addr != 0 {
			if err := inj("rseq", unix.SYS_RSEQ, th.Rseq.Addr, uint64(th.Rseq.Len), 0, uint64(th.Rseq.Sig)); err != nil {
				return out, err
			}
		}
		if th.AltStackFlags&ssDisable == 0 && th.AltStackSize != 0 {
			ss := make([]byte, 24)
			*(*uint64)(unsafe.Pointer(&ss[0])) = th.AltStackSP
			*(*uint32)(unsafe.Pointer(&ss[8])) = th.AltStackFlags &^ ssOnStack
			*(*uint64)(unsafe.Pointer(&ss[16])) = th.AltStackSize
			if err := ptrace.WriteMem(c.pid, scratch, ss); err != nil {
				return out, err
			}
			if err := inj("sigaltstack", unix.SYS_SIGALTSTACK, scratch, 0); err != nil {
				return out, err
			}
		}
		if err := ptrace.SetXState(tid, th.XState); err != nil {
			return out, err
		}
		regs := snapshot.RegsFromArray(th.Regs)
		fixRestart(&regs)
		regs.Eflags &^= 0x100
		if err := ptrace.SetRegs(tid, &regs); err != nil {
			return out, err
		}
		if err := ptrace.SetSigMask(tid, th.SigMask); err != nil {
			return out, err
		}
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
