// Package ptrace drives tracees from one locked OS thread.
//
// Linux binds the tracer relation to the thread that attached (or forked a
// PTRACE_TRACEME child): every ptrace request on a tracee must come from that
// thread. A Tracer therefore runs one goroutine locked to its OS thread and
// executes closures submitted with Do on it, in order. The functions in this
// package that take a pid have the precondition that they run inside Do.
package ptrace

import (
	"errors"
	"fmt"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Tracer owns one locked OS thread that issues every ptrace request.
type Tracer struct {
	reqs chan func()
	done chan struct{}
}

// NewTracer starts the tracer thread.
func NewTracer() *Tracer {
	t := &Tracer{reqs: make(chan func()), done: make(chan struct{})}
	started := make(chan struct{})
	go t.loop(started)
	<-started
	return t
}

// loop serves requests on one locked OS thread until Close.
func (t *Tracer) loop(started chan struct{}) {
	// The thread stays locked for its whole life and is never returned
	// to the scheduler: when the goroutine exits while locked, the
	// runtime terminates the thread, which detaches (or, with
	// PTRACE_O_EXITKILL, kills) any tracee left behind.
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// The main thread is never terminated (the runtime parks it
		// instead), so a tracer there would never let its tracees go.
		// Hold it while another goroutine, which therefore runs on
		// another thread, becomes the tracer.
		done := make(chan struct{})
		go func() {
			t.loop(started)
			close(done)
		}()
		<-done
		runtime.UnlockOSThread()
		return
	}
	close(started)
	for f := range t.reqs {
		f()
	}
	close(t.done)
}

// Do runs f on the tracer thread and returns its error.
func (t *Tracer) Do(f func() error) error {
	errc := make(chan error, 1)
	t.reqs <- func() { errc <- f() }
	return <-errc
}

// Close stops the tracer thread. Tracees still attached are detached by the
// kernel when the thread exits (or killed if they carry PTRACE_O_EXITKILL).
func (t *Tracer) Close() {
	close(t.reqs)
	<-t.done
}

func ptrace(req int, pid int, addr, data uintptr) error {
	_, _, e := unix.Syscall6(unix.SYS_PTRACE, uintptr(req), uintptr(pid), addr, data, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// Seize attaches to pid with PTRACE_SEIZE and the given options.
func Seize(pid int, options int) error {
	if err := ptrace(unix.PTRACE_SEIZE, pid, 0, uintptr(options)); err != nil {
		return fmt.Errorf("ptrace seize %d: %w", pid, err)
	}
	return nil
}

// Interrupt asks a seized tracee to enter a trap-stop (PTRACE_INTERRUPT).
func Interrupt(pid int) error {
	if err := ptrace(unix.PTRACE_INTERRUPT, pid, 0, 0); err != nil {
		return fmt.Errorf("ptrace interrupt %d: %w", pid, err)
	}
	return nil
}

// SetOptions sets ptrace options on a stopped tracee.
func SetOptions(pid, options int) error {
	if err := ptrace(unix.PTRACE_SETOPTIONS, pid, 0, uintptr(options)); err != nil {
		return fmt.Errorf("ptrace setoptions %d: %w", pid, err)
	}
	return nil
}

// Detach detaches from a stopped tracee, delivering sig (0 for none) if the
// tracee is in a signal-delivery-stop.
func Detach(pid int, sig syscall.Signal) error {
	if err := ptrace(unix.PTRACE_DETACH, pid, 0, uintptr(sig)); err != nil {
		return fmt.Errorf("ptrace detach %d: %w", pid, err)
	}
	return nil
}

// Cont resumes a stopped tracee.
func Cont(pid int, sig syscall.Signal) error {
	if err := ptrace(unix.PTRACE_CONT, pid, 0, uintptr(sig)); err != nil {
		return fmt.Errorf("ptrace cont %d: %w", pid, err)
	}
	return nil
}

// Step single-steps a stopped tracee.
func Step(pid int) error {
	if err := ptrace(unix.PTRACE_SINGLESTEP, pid, 0, 0); err != nil {
		return fmt.Errorf("ptrace singlestep %d: %w", pid, err)
	}
	return nil
}

// GetRegs reads the general purpose registers.
func GetRegs(pid int, r *unix.PtraceRegs) error {
	if err := unix.PtraceGetRegs(pid, r); err != nil {
		return fmt.Errorf("ptrace getregs %d: %w", pid, err)
	}
	return nil
}

// SetRegs writes the general purpose registers.
func SetRegs(pid int, r *unix.PtraceRegs) error {
	if err := unix.PtraceSetRegs(pid, r); err != nil {
		return fmt.Errorf("ptrace setregs %d: %w", pid, err)
	}
	return nil
}

// EventMsg returns PTRACE_GETEVENTMSG (e.g. the new pid at a fork event).
func EventMsg(pid int) (uint64, error) {
	m, err := unix.PtraceGetEventMsg(pid)
	if err != nil {
		return 0, fmt.Errorf("ptrace geteventmsg %d: %w", pid, err)
	}
	return uint64(m), nil
}

// XStateMax is the buffer size used to read the XSAVE area; the kernel
// shortens the iovec to the real size.
const XStateMax = 16384

// GetXState reads the NT_X86_XSTATE register set (FPU, SSE, AVX, ...).
// The result is a copy of its real size: a seed's descriptor keeps one per
// thread for the seed's lifetime (and the daemon's history of its children
// keeps the descriptor longer), so it must not pin the XStateMax buffer.
func GetXState(pid int) ([]byte, error) {
	// A heap buffer: with an array on the stack the compiler does not see
	// the kernel's writes through the iovec (it reaches the syscall as a
	// uintptr) and the copy below came out wrong (children lost their YMM
	// registers, TestThreadedParent).
	buf := make([]byte, XStateMax)
	iov := unix.Iovec{Base: &buf[0]}
	iov.SetLen(len(buf))
	if err := ptrace(unix.PTRACE_GETREGSET, pid, unix.NT_X86_XSTATE, uintptr(unsafe.Pointer(&iov))); err != nil {
		return nil, fmt.Errorf("ptrace getregset xstate %d: %w", pid, err)
	}
	return append([]byte(nil), buf[:iov.Len]...), nil
}

// SetXState writes the NT_X86_XSTATE register set.
func SetXState(pid int, xs []byte) error {
	if len(xs) == 0 {
		return nil
	}
	iov := unix.Iovec{Base: &xs[0]}
	iov.SetLen(len(xs))
	if err := ptrace(unix.PTRACE_SETREGSET, pid, unix.NT_X86_XSTATE, uintptr(unsafe.Pointer(&iov))); err != nil {
		return fmt.Errorf("ptrace setregset xstate %d: %w", pid, err)
	}
	return nil
}

// GetSigMask reads the blocked signal mask.
func GetSigMask(pid int) (uint64, error) {
	var m uint64
	if err := ptrace(unix.PTRACE_GETSIGMASK, pid, 8, uintptr(unsafe.Pointer(&m))); err != nil {
		return 0, fmt.Errorf("ptrace getsigmask %d: %w", pid, err)
	}
	return m, nil
}

// SetSigMask writes the blocked signal mask.
func SetSigMask(pid int, m uint64) error {
	if err := ptrace(unix.PTRACE_SETSIGMASK, pid, 8, uintptr(unsafe.Pointer(&m))); err != nil {
		return fmt.Errorf("ptrace setsigmask %d: %w", pid, err)
	}
	return nil
}

// RseqConfig is struct ptrace_rseq_configuration.
type RseqConfig struct {
	Addr  uint64
	Size  uint32
	Sig   uint32
	Flags uint32
	_     uint32
}

// GetRseq reads the tracee's rseq registration (Addr is 0 when none).
func GetRseq(pid int) (RseqConfig, error) {
	var c RseqConfig
	if err := ptrace(unix.PTRACE_GET_RSEQ_CONFIGURATION, pid, unsafe.Sizeof(c), uintptr(unsafe.Pointer(&c))); err != nil {
		return c, fmt.Errorf("ptrace get rseq configuration %d: %w", pid, err)
	}
	return c, nil
}

// Wait waits for a state change of pid (any kind of child, __WALL).
func Wait(pid int) (unix.WaitStatus, error) {
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(pid, &ws, unix.WALL, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return ws, fmt.Errorf("wait4 %d: %w", pid, err)
		}
		return ws, nil
	}
}

// ErrExited reports that a tracee exited or was killed while we waited for
// it to stop.
var ErrExited = errors.New("tracee exited")

// WaitStop waits until pid stops. Signal-delivery-stops for signals other
// than want are recorded in *pending (to be re-delivered later) and the
// tracee is resumed with the same kind of request that was outstanding
// (resume). It returns the stop status.
func WaitStop(pid int, want syscall.Signal, pending *[]syscall.Signal, resume func() error) (unix.WaitStatus, error) {
	for {
		ws, err := Wait(pid)
		if err != nil {
			return ws, err
		}
		if ws.Exited() || ws.Signaled() {
			return ws, fmt.Errorf("pid %d: %w (%s)", pid, ErrExited, describe(ws))
		}
		if !ws.Stopped() {
			continue
		}
		sig := ws.StopSignal()
		if sig == want || Event(ws) != 0 || want == 0 {
			return ws, nil
		}
		if pending != nil {
			*pending = append(*pending, sig)
		}
		if err := resume(); err != nil {
			return ws, err
		}
	}
}

func describe(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Sprintf("killed by %v", ws.Signal())
	case ws.Stopped():
		return fmt.Sprintf("stopped by %v", ws.StopSignal())
	}
	return fmt.Sprintf("status %#x", uint32(ws))
}

// Event returns the PTRACE_EVENT_* of a ptrace-stop status (status>>16), or
// 0 for a plain signal-delivery-stop. Unlike WaitStatus.TrapCause it also
// reports PTRACE_EVENT_STOP for group-stops (stop signal SIGSTOP etc.).
func Event(ws unix.WaitStatus) int {
	if !ws.Stopped() {
		return 0
	}
	return int(uint32(ws)>>16) & 0xff
}
