package snapshot

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
)

// carryDontfork makes the frozen copy hold the parent's MADV_DONTFORK
// mappings too. The clone that freezes the parent does not copy them (V8,
// and so Node.js, marks its heap pages so), and a child restored without
// them faults on memory its parent uses. When the copy src maps less than
// the parent's layout pmaps, the mappings it lacks are made forkable in
// the parent (MADV_DOFORK), src is replaced by a second clone and the
// parent's mappings are marked MADV_DONTFORK again: the parent ends as it
// was. It returns the frozen copy to use.
//
// MADV_WIPEONFORK mappings keep fork semantics (children see zeros, as a
// forked child would: that is what makes a library reseed its RNG state).
//
// Precondition: runs on the tracer thread; pid and every thread of it are
// in ptrace-stops; regs are the leader's registers (restored by the caller
// after the injections).
func carryDontfork(pid, src int, at uint64, regs *unix.PtraceRegs, pending *[]syscall.Signal, pmaps []procfs.Mapping) (int, error) {
	var total uint64
	for _, m := range pmaps {
		if m.Path != "[vsyscall]" {
			total += m.End - m.Start
		}
	}
	size, err := statmSize(src)
	if err != nil || size >= total {
		return src, nil // nothing missing (or unknown: describe re-checks)
	}
	cmaps, err := procfs.Maps(src)
	if err != nil {
		return src, err
	}
	runs := missingRuns(pmaps, cmaps)
	if len(runs) == 0 {
		return src, nil
	}
	// The first copy goes: killed, then reaped in the parent (its
	// exit_signal is 0: only the parent's wait4 with __WALL reaps it).
	_ = unix.Kill(src, unix.SIGKILL)
	_, _ = ptrace.Wait(src)
	inject := func(nr uint64, args ...uint64) error {
		ret, err := ptrace.Inject(pid, at, regs, pending, nr, args...)
		if err == nil {
			err = ptrace.Errno(ret)
		}
		return err
	}
	if err := inject(unix.SYS_WAIT4, uint64(src), 0, unix.WALL, 0); err != nil {
		return 0, fmt.Errorf("reap the first frozen copy %d: wait4: %w", src, err)
	}
	advise := func(advice uint64) error {
		for _, r := range runs {
			if err := inject(unix.SYS_MADVISE, r[0], r[1]-r[0], advice); err != nil {
				return fmt.Errorf("madvise %#x-%#x: %w", r[0], r[1], err)
			}
		}
		return nil
	}
	if err := advise(unix.MADV_DOFORK); err != nil {
		_ = advise(unix.MADV_DONTFORK)
		return 0, fmt.Errorf("make the parent's MADV_DONTFORK mappings forkable: %w", err)
	}
	src2, cerr := injectClone(pid, at, regs, pending)
	if err := advise(unix.MADV_DONTFORK); err != nil && cerr == nil {
		cerr = fmt.Errorf("restore the parent's MADV_DONTFORK mappings: %w", err)
		_ = unix.Kill(src2, unix.SIGKILL)
		_, _ = ptrace.Wait(src2)
		_ = inject(unix.SYS_WAIT4, uint64(src2), 0, unix.WALL, 0)
	}
	if cerr != nil {
		return 0, cerr
	}
	return src2, nil
}

// missingRuns returns the address ranges of the parent's mappings pmaps
// that the copy's mappings cmaps lack, adjacent ones merged. Both lists are
// sorted; the copy's mappings are the parent's less the missing ones.
func missingRuns(pmaps, cmaps []procfs.Mapping) [][2]uint64 {
	var runs [][2]uint64
	j := 0
	for _, m := range pmaps {
		if m.Path == "[vsyscall]" {
			continue
		}
		for j < len(cmaps) && cmaps[j].End <= m.Start {
			j++
		}
		if j < len(cmaps) && cmaps[j].Start <= m.Start {
			continue // copied
		}
		if n := len(runs); n > 0 && runs[n-1][1] == m.Start {
			runs[n-1][1] = m.End
		} else {
			runs = append(runs, [2]uint64{m.Start, m.End})
		}
	}
	return runs
}

// statmSize returns the size of pid's address space in bytes (the first
// field of /proc/PID/statm, in pages).
func statmSize(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/statm", pid))
	if err != nil {
		return 0, err
	}
	f := bytes.Fields(b)
	if len(f) == 0 {
		return 0, fmt.Errorf("empty statm of %d", pid)
	}
	pages, err := strconv.ParseUint(string(f[0]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("statm of %d: %w", pid, err)
	}
	return pages * uint64(os.Getpagesize()), nil
}
