package ptrace

import (
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Inject runs one system call inside a stopped tracee: it points rip at a
// `syscall` instruction at address at, loads nr and args, sets orig_rax to -1
// (so the kernel applies no syscall-restart logic to the stop we resume
// from) and single-steps. The stop comes at syscall exit. Registers are left
// modified; the caller restores them. Signals that arrive meanwhile are
// appended to *pending.
//
// Precondition: runs on the tracer thread; pid is in a ptrace-stop.
func Inject(pid int, at uint64, base *unix.PtraceRegs, pending *[]syscall.Signal, nr uint64, args ...uint64) (uint64, error) {
	if err := StartInject(pid, at, base, nr, args...); err != nil {
		return 0, err
	}
	return FinishInject(pid, at, base, pending, nr, args...)
}

// StartInject is the first half of Inject: it loads the call and lets pid
// run it. FinishInject, with the same arguments, waits for the call's end.
// Between the two the tracer can start calls in other tracees, which then
// run at the same time.
func StartInject(pid int, at uint64, base *unix.PtraceRegs, nr uint64, args ...uint64) error {
	r := injectRegs(at, base, nr, args)
	if err := SetRegs(pid, &r); err != nil {
		return err
	}
	return Step(pid)
}

// FinishInject waits for the call StartInject started in pid and returns
// its raw result.
func FinishInject(pid int, at uint64, base *unix.PtraceRegs, pending *[]syscall.Signal, nr uint64, args ...uint64) (uint64, error) {
	r := injectRegs(at, base, nr, args)
	ws, err := WaitStop(pid, syscall.SIGTRAP, pending, func() error { return Step(pid) })
	// A trap-stop left queued by PTRACE_INTERRUPT or a group-stop (e.g.
	// seizing a SIGSTOPped process) can be reported before the step:
	// step on past it.
	for i := 0; err == nil && Event(ws) == unix.PTRACE_EVENT_STOP && i < 4; i++ {
		if err = SetRegs(pid, &r); err != nil {
			return 0, err
		}
		if err = Step(pid); err != nil {
			return 0, err
		}
		ws, err = WaitStop(pid, syscall.SIGTRAP, pending, func() error { return Step(pid) })
	}
	if err != nil {
		return 0, fmt.Errorf("inject syscall %d: %w", nr, err)
	}
	if Event(ws) > 0 {
		return 0, fmt.Errorf("inject syscall %d into %d: unexpected ptrace event %d", nr, pid, Event(ws))
	}
	var out unix.PtraceRegs
	if err := GetRegs(pid, &out); err != nil {
		return 0, err
	}
	if out.Rip != at+2 {
		return 0, fmt.Errorf("inject syscall %d into %d: stopped at %#x, want %#x", nr, pid, out.Rip, at+2)
	}
	return out.Rax, nil
}

// injectRegs are base set up to run syscall nr with args at address at.
func injectRegs(at uint64, base *unix.PtraceRegs, nr uint64, args []uint64) unix.PtraceRegs {
	r := *base
	r.Rip = at
	r.Rax = nr
	r.Orig_rax = ^uint64(0)
	dst := []*uint64{&r.Rdi, &r.Rsi, &r.Rdx, &r.R10, &r.R8, &r.R9}
	for i, a := range args {
		*dst[i] = a
	}
	r.Eflags &^= 0x100 // TF: the kernel sets it for the step itself
	return r
}

// Errno converts a raw syscall return value into an error (nil if it is not
// in the kernel's error range).
func Errno(ret uint64) error {
	if ret > ^uint64(4095) {
		return syscall.Errno(-int64(ret))
	}
	return nil
}

// ReadMem copies len(buf) bytes at addr of pid into buf with
// process_vm_readv, which (unlike /proc/PID/mem) faults pages in through
// userfaultfd. It does not need the tracer thread.
func ReadMem(pid int, addr uint64, buf []byte) error {
	if len(buf) == 0 {
		return nil
	}
	local := []unix.Iovec{{Base: &buf[0], Len: uint64(len(buf))}}
	remote := []unix.RemoteIovec{{Base: uintptr(addr), Len: len(buf)}}
	n, err := unix.ProcessVMReadv(pid, local, remote, 0)
	if err != nil {
		return fmt.Errorf("read %d bytes at %#x of pid %d: %w", len(buf), addr, pid, err)
	}
	if n != len(buf) {
		return fmt.Errorf("read %d bytes at %#x of pid %d: short read %d", len(buf), addr, pid, n)
	}
	return nil
}

// WriteMem copies buf to addr in pid with process_vm_writev.
func WriteMem(pid int, addr uint64, buf []byte) error {
	if len(buf) == 0 {
		return nil
	}
	local := []unix.Iovec{{Base: &buf[0], Len: uint64(len(buf))}}
	remote := []unix.RemoteIovec{{Base: uintptr(addr), Len: len(buf)}}
	n, err := unix.ProcessVMWritev(pid, local, remote, 0)
	if err != nil {
		return fmt.Errorf("write %d bytes at %#x of pid %d: %w", len(buf), addr, pid, err)
	}
	if n != len(buf) {
		return fmt.Errorf("write %d bytes at %#x of pid %d: short write %d", len(buf), addr, pid, n)
	}
	return nil
}

// WriteMemv copies each bufs[i] to addrs[i] in pid with as few
// process_vm_writev calls as the kernel's iovec limit allows.
func WriteMemv(pid int, addrs []uint64, bufs [][]byte) error {
	const max = 1024 // IOV_MAX
	for start := 0; start < len(bufs); start += max {
		end := min(start+max, len(bufs))
		var local []unix.Iovec
		var remote []unix.RemoteIovec
		want := 0
		for i := start; i < end; i++ {
			if len(bufs[i]) == 0 {
				continue
			}
			local = append(local, unix.Iovec{Base: &bufs[i][0], Len: uint64(len(bufs[i]))})
			remote = append(remote, unix.RemoteIovec{Base: uintptr(addrs[i]), Len: len(bufs[i])})
			want += len(bufs[i])
		}
		if len(local) == 0 {
			continue
		}
		n, err := unix.ProcessVMWritev(pid, local, remote, 0)
		if err != nil {
			return fmt.Errorf("write %d buffers to pid %d: %w", len(local), pid, err)
		}
		if n != want {
			return fmt.Errorf("write %d buffers to pid %d: short write %d of %d", len(local), pid, n, want)
		}
	}
	return nil
}

// ReadU64 reads one little-endian word of pid's memory.
func ReadU64(pid int, addr uint64) (uint64, error) {
	var v uint64
	b := unsafe.Slice((*byte)(unsafe.Pointer(&v)), 8)
	err := ReadMem(pid, addr, b)
	return v, err
}

// InjectClone runs a clone(2) (flags and args as for the raw syscall:
// flags, newsp, parent_tid, child_tid, tls) inside a stopped tracee that has
// PTRACE_O_TRACECLONE (or TRACEFORK for a plain fork-like clone) set, and
// returns the new task's id. The new task is attached to the tracer and
// starts in a ptrace-stop of its own, which the caller must wait for. The
// PTRACE_EVENT_CLONE/FORK stop on the way is consumed here.
//
// Precondition: runs on the tracer thread; pid is in a ptrace-stop.
func InjectClone(pid int, at uint64, base *unix.PtraceRegs, pending *[]syscall.Signal, args ...uint64) (int, error) {
	all := make([]uint64, 5) // unset clone arguments are 0
	copy(all, args)
	r := injectRegs(at, base, unix.SYS_CLONE, all)
	if err := SetRegs(pid, &r); err != nil {
		return 0, err
	}
	if err := Step(pid); err != nil {
		return 0, err
	}
	child := 0
	for {
		ws, err := WaitStop(pid, syscall.SIGTRAP, pending, func() error { return Step(pid) })
		if err != nil {
			return 0, fmt.Errorf("inject clone: %w", err)
		}
		ev := Event(ws)
		if ev == 0 {
			break
		}
		if ev == unix.PTRACE_EVENT_CLONE || ev == unix.PTRACE_EVENT_FORK {
			m, err := EventMsg(pid)
			if err != nil {
				return 0, err
			}
			child = int(m)
		}
		if err := Step(pid); err != nil {
			return 0, err
		}
	}
	var out unix.PtraceRegs
	if err := GetRegs(pid, &out); err != nil {
		return 0, err
	}
	if e := Errno(out.Rax); e != nil {
		return 0, fmt.Errorf("inject clone: %w", e)
	}
	if child == 0 {
		return 0, fmt.Errorf("inject clone: no clone event (rax %d): is PTRACE_O_TRACECLONE set?", int64(out.Rax))
	}
	return child, nil
}
