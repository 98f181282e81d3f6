package snapshot

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
)

// group is a process all of whose threads are seized and held in
// ptrace-stops by the tracer: while it exists no thread of the process runs,
// so its memory and every thread's state are stable.
type group struct {
	pid     int
	leader  *stopped
	threads []*stopped // the other threads, by tid
}

// maxSeizeRounds bounds how often the thread list is re-read while threads
// keep appearing during the seize (each round seizes every new one).
const maxSeizeRounds = 64

// threadDead reports whether the thread tid is gone or has exited (a
// zombie or dead task still listed in /proc/PID/task).
func threadDead(tid int) bool {
	st, err := procfs.ReadStat(tid)
	return err != nil || st.State == 'Z' || st.State == 'X'
}

// seizeGroup seizes and stops every thread of pid. Threads created while it
// runs are caught two ways: a seized thread's clone auto-attaches the new
// thread (PTRACE_O_TRACECLONE), and a thread not yet seized shows up when
// /proc/PID/task is read again; the seize ends when a re-read finds nothing
// new. A thread that exits meanwhile is dropped. On error nothing stays
// attached.
//
// Precondition: runs on the tracer thread.
func seizeGroup(pid, options int, wasStopped bool) (*group, error) {
	options |= unix.PTRACE_O_TRACECLONE
	g := &group{pid: pid}
	byTID := map[int]*stopped{}
	fail := func(err error) (*group, error) {
		g.detach()
		return nil, err
	}
	// add waits for the stop of a thread that is attached (seized and
	// interrupted, or auto-attached by a clone) and records it.
	var add func(tid int) error
	add = func(tid int) error {
		s := &stopped{pid: tid, tgid: pid, wasStopped: wasStopped && tid == pid, attached: true}
		byTID[tid] = s
		for {
			ws, err := ptrace.Wait(tid)
			if err != nil {
				s.attached = false
				return err
			}
			if ws.Exited() || ws.Signaled() {
				s.attached = false
				return errThreadGone
			}
			switch ptrace.Event(ws) {
			case unix.PTRACE_EVENT_STOP:
				if tid == pid {
					g.leader = s
				} else {
					g.threads = append(g.threads, s)
				}
				return nil
			case unix.PTRACE_EVENT_CLONE:
				m, err := ptrace.EventMsg(tid)
				if err != nil {
					return err
				}
				// Any ptrace trap clears a pending PTRACE_INTERRUPT
				// (the kernel's ptrace_stop: "any trap clears pending
				// STOP trap"): a thread seized in the middle of a
				// clone() reports this event in place of the
				// interrupt's stop and would run on, unstopped, after
				// the Cont below, while this loop waits for a stop that
				// never comes (its pthread_join of the new thread, held
				// stopped here, then blocks it for good). Interrupt it
				// again; while it is in this stop the request stays
				// pending, so its next stop is the PTRACE_EVENT_STOP.
				if err := ptrace.Interrupt(tid); err != nil {
					return err
				}
				if err := ptrace.Cont(tid, 0); err != nil {
					return err
				}
				// The new thread is attached and starts with a
				// PTRACE_EVENT_STOP of its own.
				if err := add(int(m)); err != nil && !errors.Is(err, errThreadGone) {
					return err
				}
				continue
			case 0:
				s.pending = append(s.pending, ws.StopSignal())
			}
			if err := ptrace.Cont(tid, 0); err != nil {
				return err
			}
		}
	}
	for round := 0; ; round++ {
		tids, err := procfs.Tasks(pid)
		if err != nil {
			return fail(fmt.Errorf("no such process"))
		}
		found := false
		for _, tid := range tids {
			if _, ok := byTID[tid]; ok {
				continue
			}
			found = true
			if err := ptrace.Seize(tid, options); err != nil {
				if errors.Is(err, unix.ESRCH) {
					continue // exited since the listing
				}
				if errors.Is(err, unix.EPERM) && threadDead(tid) {
					// Exited since the listing but not released yet:
					// the kernel refuses to attach to a task with an
					// exit state with EPERM, not ESRCH.
					byTID[tid] = &stopped{pid: tid, tgid: pid}
					continue
				}
				return fail(err)
			}
			if err := ptrace.Interrupt(tid); err != nil {
				byTID[tid] = &stopped{pid: tid, tgid: pid, attached: true}
				if errors.Is(err, unix.ESRCH) {
					byTID[tid].attached = false
					continue
				}
				return fail(err)
			}
			if err := add(tid); err != nil {
				if errors.Is(err, errThreadGone) && tid != pid {
					continue
				}
				if errors.Is(err, errThreadGone) {
					return fail(errors.New("process exited during prepare"))
				}
				return fail(err)
			}
		}
		if !found {
			break
		}
		if round == maxSeizeRounds {
			return fail(fmt.Errorf("threads kept being created while seizing %d (%d seen): retry when the process is idle", pid, len(byTID)))
		}
	}
	// Threads attached but not (yet) stopped cannot happen: add waits for
	// each. Order the others by tid for a stable descriptor.
	sortStopped(g.threads)
	if g.leader == nil {
		return fail(refuse("the main thread of process %d has exited while other threads run; mitosis forks a process from its main thread", pid))
	}
	return g, nil
}

// errThreadGone: a thread exited before it could be stopped.
var errThreadGone = errors.New("thread exited")

func sortStopped(s []*stopped) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j].pid < s[j-1].pid; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// detach lets every thread go. The leader goes first: a process that was
// group-stopped re-enters its stop through the SIGSTOP the leader gets back,
// and the other threads join that stop as soon as they run. Idempotent.
func (g *group) detach() {
	if g.leader != nil {
		g.leader.detach()
	}
	for _, s := range g.threads {
		s.detach()
	}
}

// threadState is the per-thread state read while the group is stopped.
type threadState struct {
	tid     int
	regs    unix.PtraceRegs
	xstate  []byte
	sigmask uint64
	rseq    ptrace.RseqConfig
	robust  [2]uint64 // head, len
	comm    string    // its name, /proc/TID/comm
}

// readThread reads the registers and kernel-side state of a stopped thread.
//
// Precondition: runs on the tracer thread; tid is in a ptrace-stop.
func readThread(tid int) (threadState, error) {
	ts := threadState{tid: tid}
	var err error
	if err = ptrace.GetRegs(tid, &ts.regs); err != nil {
		return ts, err
	}
	if ts.xstate, err = ptrace.GetXState(tid); err != nil {
		return ts, err
	}
	if ts.sigmask, err = ptrace.GetSigMask(tid); err != nil {
		return ts, err
	}
	if ts.rseq, err = ptrace.GetRseq(tid); err != nil {
		return ts, err
	}
	if _, _, e := unix.Syscall(unix.SYS_GET_ROBUST_LIST, uintptr(tid), uintptr(unsafePtr(&ts.robust[0])), uintptr(unsafePtr(&ts.robust[1]))); e != 0 {
		return ts, fmt.Errorf("get_robust_list of thread %d: %w", tid, e)
	}
	ts.comm = readComm(tid)
	return ts, nil
}

// threadAltStacks asks stopped threads for their sigaltstack with an
// injected sigaltstack(NULL, &old) each, and puts their registers back. The
// queries run in every thread at the same time, so the round trips overlap.
// Each scratch buffer lies 2 KiB below its thread's stack pointer, memory
// the ABI leaves free (a signal frame could be written there at any time);
// call it only after the frozen copy was taken, so the write never reaches
// the seed. It returns {sp, flags, size} of each.
//
// Precondition: runs on the tracer thread; every thread of ss is stopped.
func threadAltStacks(ss []*stopped, at uint64, regs []*unix.PtraceRegs) ([][3]uint64, error) {
	out := make([][3]uint64, len(ss))
	started := 0
	var err error
	for i, s := range ss {
		scratch := (regs[i].Rsp - 2048) &^ 15
		if err = ptrace.StartInject(s.pid, at, regs[i], unix.SYS_SIGALTSTACK, 0, scratch); err != nil {
			err = fmt.Errorf("sigaltstack of thread %d: %w", s.pid, err)
			break
		}
		started++
	}
	for i, s := range ss[:started] {
		scratch := (regs[i].Rsp - 2048) &^ 15
		ret, ierr := ptrace.FinishInject(s.pid, at, regs[i], &s.pending, unix.SYS_SIGALTSTACK, 0, scratch)
		if rerr := ptrace.SetRegs(s.pid, regs[i]); ierr == nil {
			ierr = rerr
		}
		if ierr == nil {
			out[i], ierr = readAltStack(s, scratch, ret)
		}
		if ierr != nil && err == nil {
			err = fmt.Errorf("sigaltstack of thread %d: %w", s.pid, ierr)
		}
	}
	if err != nil {
		return nil, err
	}
	return out, nil
}

// readAltStack decodes the stack_t sigaltstack(NULL, scratch) returned
// (ret) and wrote at scratch in s.
func readAltStack(s *stopped, scratch, ret uint64) ([3]uint64, error) {
	if e := ptrace.Errno(ret); e != nil {
		if errors.Is(e, unix.EFAULT) {
			// No writable stack below rsp: the thread's alternate
			// stack cannot be read; it is left disabled.
			return [3]uint64{0, ssDisable, 0}, nil
		}
		return [3]uint64{}, e
	}
	buf := make([]byte, 24)
	if err := ptrace.ReadMem(s.tgid, scratch, buf); err != nil {
		return [3]uint64{}, err
	}
	le := binary.LittleEndian
	return [3]uint64{le.Uint64(buf[0:]), uint64(le.Uint32(buf[8:])), le.Uint64(buf[16:])}, nil
}

// ssDisable is SS_DISABLE (not in x/sys/unix).
const ssDisable = 2

// describeThreads turns the other threads' recorded state into descriptor
// entries; each thread's cached tid is found in its TCB, read from the
// frozen copy src (the same memory as the parent at the freeze).
func describeThreads(src int, states []threadState, alts [][3]uint64) []descriptor.Thread {
	out := make([]descriptor.Thread, len(states))
	tcb := make([]byte, 4096)
	for i, ts := range states {
		th := descriptor.Thread{
			TID: int32(ts.tid), Regs: regsToArray(&ts.regs), XState: ts.xstate, SigMask: ts.sigmask,
			AltStackSP: alts[i][0], AltStackFlags: uint32(alts[i][1]), AltStackSize: alts[i][2],
			RobustHead: ts.robust[0], RobustLen: ts.robust[1],
			Rseq: descriptor.Rseq{Addr: ts.rseq.Addr, Len: ts.rseq.Size, Sig: ts.rseq.Sig, Flags: ts.rseq.Flags},
			Comm: ts.comm,
		}
		if fs := ts.regs.Fs_base; fs != 0 {
			// struct pthread may end less than a page above fs_base
			// (the top of the thread's stack mapping).
			b := tcb
			err := ptrace.ReadMem(src, fs, b)
			if err != nil {
				b = tcb[:1024]
				err = ptrace.ReadMem(src, fs, b)
			}
			if err == nil {
				if off := findTID(b, uint32(ts.tid)); off >= 0 {
					th.TIDAddr = fs + uint64(off)
				}
			}
		}
		out[i] = th
	}
	return out
}
