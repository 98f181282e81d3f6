package snapshot

import (
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
)

// Hand stops tracing the frozen copy src and leaves it in a group-stop, so
// another tracer (a new daemon) can take it with Adopt.
//
// SIGSTOP is queued before the detach: the copy dequeues it on its way
// back to user mode and stops before running any instruction of the
// parent's code it was cloned at. Only a SIGCONT sent to it by someone
// else before Adopt could let it run.
//
// Precondition: runs on the tracer thread that owns src.
func Hand(src int) error {
	if err := unix.Kill(src, unix.SIGSTOP); err != nil {
		return fmt.Errorf("stop frozen copy %d: %w", src, err)
	}
	if err := ptrace.Detach(src, syscall.SIGSTOP); err != nil {
		return fmt.Errorf("detach frozen copy %d: %w", src, err)
	}
	WaitStopped(src)
	if st, err := procfs.ReadStat(src); err != nil || st.State != 'T' {
		return fmt.Errorf("frozen copy %d did not stop after the detach (state %q, %v)", src, stateOf(st, err), err)
	}
	return nil
}

// Adopt makes the calling tracer thread the tracer of a frozen copy that
// Hand released: it seizes it (with PTRACE_O_EXITKILL, so it dies with
// this tracer) and holds it in a ptrace stop. The copy must be stopped (a
// zombie or a running process is refused).
//
// Precondition: runs on the tracer thread that will own src.
func Adopt(src, parent int) error {
	st, err := procfs.ReadStat(src)
	if err != nil {
		return fmt.Errorf("frozen copy %d: %w", src, err)
	}
	// Its parent may have exited since prepare (the copy then belongs to
	// a reaper); it must still be the stopped copy Hand left.
	if st.State != 'T' {
		return fmt.Errorf("frozen copy %d (of pid %d): want a stopped process, found state %c", src, parent, st.State)
	}
	s, err := seizeStop(src, unix.PTRACE_O_EXITKILL, true)
	if err != nil {
		return fmt.Errorf("seize frozen copy %d: %w", src, err)
	}
	// Keep the attachment: the copy stays stopped under this tracer.
	s.attached = false
	return nil
}

func stateOf(st procfs.Stat, err error) string {
	if err != nil {
		return "gone"
	}
	return string(st.State)
}

// EndOrphan ends the frozen copy src of parent if a killed daemon left it
// (see engine.EndOrphan).
//
// Precondition: runs on a tracer thread.
func EndOrphan(src, parent int, vdsoSyscall uint64) error {
	st, err := procfs.ReadStat(src)
	if err != nil {
		return nil // gone
	}
	switch st.State {
	case 'Z':
	case 'T':
		status, err := procfs.ReadStatus(src)
		if err != nil || status.TracerPid != 0 {
			return nil
		}
		if st.PPid != parent {
			return fmt.Errorf("stopped pid %d is not a child of %d (parent %d): not ours to kill", src, parent, st.PPid)
		}
		if err := unix.Kill(src, unix.SIGKILL); err != nil {
			return err
		}
		for i := 0; i < 200; i++ {
			if st, err = procfs.ReadStat(src); err != nil || st.State == 'Z' {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	default:
		return nil
	}
	return ReapInParent(parent, src, vdsoSyscall)
}
