package ptrace

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/mitosis-fork/mitosis/internal/testenv"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/internal/procfs"
)

// TestMain marks every inherited fd close-on-exec, so the children the
// tests start hold nothing of the test runner.
func TestMain(m *testing.M) {
	testenv.CloseInheritedFDs()
	os.Exit(m.Run())
}

func TestErrno(t *testing.T) {
	tests := []struct {
		ret  uint64
		want error
	}{
		{0, nil},
		{1234, nil},
		{0x7fff_ffff_ffff_ffff, nil},
		{^uint64(0), syscall.EPERM},             // -1
		{^uint64(8), syscall.EBADF},             // -9
		{^uint64(unix.ENOSYS - 1), unix.ENOSYS}, // -38
		{^uint64(4094), syscall.Errno(4095)},    // -4095, the lowest error
		{^uint64(4095), nil},                    // -4096: an address, not an error
		{0x8000_0000_0000_0000, nil},
	}
	for _, tc := range tests {
		got := Errno(tc.ret)
		if got != tc.want {
			t.Errorf("Errno(%#x) = %v, want %v", tc.ret, got, tc.want)
		}
	}
}

func TestEvent(t *testing.T) {
	stop := func(sig syscall.Signal, ev int) unix.WaitStatus {
		return unix.WaitStatus(0x7f | uint32(sig)<<8 | uint32(ev)<<16)
	}
	tests := []struct {
		name string
		ws   unix.WaitStatus
		want int
	}{
		{"interrupt trap stop", stop(syscall.SIGTRAP, unix.PTRACE_EVENT_STOP), unix.PTRACE_EVENT_STOP},
		{"group stop", stop(syscall.SIGSTOP, unix.PTRACE_EVENT_STOP), unix.PTRACE_EVENT_STOP},
		{"group stop SIGTSTP", stop(syscall.SIGTSTP, unix.PTRACE_EVENT_STOP), unix.PTRACE_EVENT_STOP},
		{"clone", stop(syscall.SIGTRAP, unix.PTRACE_EVENT_CLONE), unix.PTRACE_EVENT_CLONE},
		{"exec", stop(syscall.SIGTRAP, unix.PTRACE_EVENT_EXEC), unix.PTRACE_EVENT_EXEC},
		{"signal delivery", stop(syscall.SIGUSR1, 0), 0},
		{"plain SIGTRAP", stop(syscall.SIGTRAP, 0), 0},
		{"exited", unix.WaitStatus(3 << 8), 0},
		{"killed", unix.WaitStatus(syscall.SIGKILL), 0},
	}
	for _, tc := range tests {
		if got := Event(tc.ws); got != tc.want {
			t.Errorf("%s: Event(%#x) = %d, want %d", tc.name, uint32(tc.ws), got, tc.want)
		}
	}
}

func TestTracerOneThread(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	me := unix.Gettid()
	tr := NewTracer()
	defer tr.Close()
	var tids []int
	var order []int
	for i := 0; i < 20; i++ {
		// Spread the calls over goroutines too.
		done := make(chan error)
		go func() {
			done <- tr.Do(func() error {
				tids = append(tids, unix.Gettid())
				order = append(order, i)
				return nil
			})
		}()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		runtime.Gosched()
	}
	for i, tid := range tids {
		if tid != tids[0] {
			t.Fatalf("call %d ran on thread %d, call 0 on %d", i, tid, tids[0])
		}
		if order[i] != i {
			t.Fatalf("calls ran in order %v", order)
		}
	}
	if tids[0] == me {
		t.Errorf("tracer thread %d is the caller's locked thread", tids[0])
	}
	want := errors.New("boom")
	if err := tr.Do(func() error { return want }); err != want {
		t.Errorf("Do returned %v, want the closure's error", err)
	}
}

// sleeper is a `sleep 30` child of the test process.
type sleeper struct {
	cmd *exec.Cmd
	pid int
}

func startSleeper(t *testing.T) *sleeper {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (ptrace)")
	}
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot start sleep: %v", err)
	}
	s := &sleeper{cmd: cmd, pid: cmd.Process.Pid}
	waitState(t, s.pid, "S", 5*time.Second)
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return s
}

// waitState waits until pid's state letter is want.
func waitState(t *testing.T, pid int, want string, d time.Duration) procfs.Status {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st, err := procfs.ReadStatus(pid)
		if err == nil && strings.HasPrefix(st.State, want) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d: state %q (%v), want %s", pid, st.State, err, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// seizeStop seizes pid and interrupts it into a trap-stop; it runs on the
// tracer thread.
func seizeStop(pid int, opts int) (unix.WaitStatus, error) {
	if err := Seize(pid, opts); err != nil {
		return 0, err
	}
	if err := Interrupt(pid); err != nil {
		return 0, err
	}
	return WaitStop(pid, syscall.SIGTRAP, nil, func() error { return Cont(pid, 0) })
}

// vdsoSyscall returns the address of a syscall instruction in pid's vDSO.
func vdsoSyscall(t *testing.T, pid int) uint64 {
	t.Helper()
	ms, err := procfs.Maps(pid)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.Path == "[vdso]" {
			buf := make([]byte, m.Len())
			if err := ReadMem(pid, m.Start, buf); err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(buf, []byte("\x7fELF")) {
				t.Fatalf("[vdso] read as % x...", buf[:8])
			}
			i := bytes.Index(buf, []byte{0x0f, 0x05})
			if i < 0 {
				t.Skip("no syscall instruction in [vdso]")
			}
			return m.Start + uint64(i)
		}
	}
	t.Skip("no [vdso]")
	return 0
}

func TestSeizeInjectDetach(t *testing.T) {
	s := startSleeper(t)
	pid := s.pid
	at := vdsoSyscall(t, pid)
	tr := NewTracer()
	defer tr.Close()

	var (
		ws                  unix.WaitStatus
		base, after         unix.PtraceRegs
		gotPID, mapped      uint64
		xs                  []byte
		mask0, mask1, mask2 uint64
		rseq                RseqConfig
		readBack            []byte
		unmapRet            uint64
		pending             []syscall.Signal
	)
	pattern := []byte("mitosis ptrace WriteMem/ReadMem round trip\x00\xff")
	err := tr.Do(func() error {
		var err error
		if ws, err = seizeStop(pid, 0); err != nil {
			return err
		}
		if err := GetRegs(pid, &base); err != nil {
			return err
		}
		if gotPID, err = Inject(pid, at, &base, &pending, unix.SYS_GETPID); err != nil {
			return err
		}
		if err := GetRegs(pid, &after); err != nil {
			return err
		}
		// A page to exercise WriteMem and ReadMem in the tracee.
		if mapped, err = Inject(pid, at, &base, &pending, unix.SYS_MMAP, 0, 4096,
			unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, ^uint64(0), 0); err != nil {
			return err
		}
		if Errno(mapped) != nil {
			return Errno(mapped)
		}
		if err := WriteMem(pid, mapped+100, pattern); err != nil {
			return err
		}
		readBack = make([]byte, len(pattern)+8)
		if err := ReadMem(pid, mapped+96, readBack); err != nil {
			return err
		}
		if unmapRet, err = Inject(pid, at, &base, &pending, unix.SYS_MUNMAP, mapped, 4096); err != nil {
			return err
		}
		if xs, err = GetXState(pid); err != nil {
			return err
		}
		if err := SetXState(pid, xs); err != nil {
			return err
		}
		if mask0, err = GetSigMask(pid); err != nil {
			return err
		}
		want := mask0 | 1<<(unix.SIGUSR2-1) | 1<<(unix.SIGWINCH-1)
		if err := SetSigMask(pid, want); err != nil {
			return err
		}
		if mask1, err = GetSigMask(pid); err != nil {
			return err
		}
		if err := SetSigMask(pid, mask0); err != nil {
			return err
		}
		if mask2, err = GetSigMask(pid); err != nil {
			return err
		}
		if rseq, err = GetRseq(pid); err != nil {
			return err
		}
		if err := SetRegs(pid, &base); err != nil {
			return err
		}
		return Detach(pid, 0)
	})
	if err != nil {
		t.Fatal(err)
	}
	if !ws.Stopped() || Event(ws) != unix.PTRACE_EVENT_STOP {
		t.Errorf("interrupt stop status %#x, event %d; want PTRACE_EVENT_STOP", uint32(ws), Event(ws))
	}
	if gotPID != uint64(pid) {
		t.Errorf("injected getpid = %d, want %d", gotPID, pid)
	}
	if after.Rip != at+2 || after.Rax != uint64(pid) {
		t.Errorf("after inject rip %#x rax %d, want %#x %d", after.Rip, after.Rax, at+2, pid)
	}
	if len(pending) != 0 {
		t.Errorf("pending signals %v", pending)
	}
	if mapped&4095 != 0 || mapped == 0 {
		t.Errorf("mmap returned %#x", mapped)
	}
	if want := append(make([]byte, 4), pattern...); !bytes.Equal(readBack[:len(want)], want) {
		t.Errorf("read back % x, want % x", readBack[:len(want)], want)
	}
	if unmapRet != 0 {
		t.Errorf("munmap returned %#x", unmapRet)
	}
	// The XSAVE area holds at least the legacy region and the header.
	if len(xs) < 576 || len(xs) >= XStateMax {
		t.Errorf("xstate is %d bytes", len(xs))
	}
	want := mask0 | 1<<(unix.SIGUSR2-1) | 1<<(unix.SIGWINCH-1)
	if mask1 != want || mask2 != mask0 {
		t.Errorf("sigmask round trip: set %#x got %#x, restored %#x got %#x", want, mask1, mask0, mask2)
	}
	if rseq.Addr != 0 && (rseq.Sig != 0x53053053 || rseq.Size < 32) {
		t.Errorf("rseq %+v: glibc registers RSEQ_SIG 0x53053053 and size >= 32", rseq)
	}

	// Detached: it goes back to sleep, untraced.
	st := waitState(t, pid, "S", 5*time.Second)
	if st.TracerPid != 0 {
		t.Errorf("TracerPid %d after detach", st.TracerPid)
	}
	if err := unix.Kill(pid, 0); err != nil {
		t.Errorf("sleep gone after detach: %v", err)
	}
}

func TestGetRseqRegistered(t *testing.T) {
	// The Go test binary does not register rseq; a glibc >= 2.35 program
	// (sleep) does, unless glibc.pthread.rseq=0.
	if os.Getenv("GLIBC_TUNABLES") != "" {
		t.Skip("GLIBC_TUNABLES set")
	}
	s := startSleeper(t)
	tr := NewTracer()
	defer tr.Close()
	var c RseqConfig
	err := tr.Do(func() error {
		if _, err := seizeStop(s.pid, 0); err != nil {
			return err
		}
		var err error
		c, err = GetRseq(s.pid)
		if err != nil {
			return err
		}
		return Detach(s.pid, 0)
	})
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr == 0 {
		t.Skip("sleep registered no rseq (old glibc?)")
	}
	// The rseq area lives in the TCB, i.e. in a writable mapping.
	ms, err := procfs.Maps(s.pid)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, m := range ms {
		if m.Start <= c.Addr && c.Addr+uint64(c.Size) <= m.End && m.Prot&unix.PROT_WRITE != 0 {
			found = true
		}
	}
	if !found || c.Sig != 0x53053053 {
		t.Errorf("rseq %+v: not in a writable mapping (%v) or wrong signature", c, found)
	}
}

func TestWaitStopPending(t *testing.T) {
	s := startSleeper(t)
	pid := s.pid
	tr := NewTracer()
	defer tr.Close()
	var pending []syscall.Signal
	var ws unix.WaitStatus
	err := tr.Do(func() error {
		if err := Seize(pid, 0); err != nil {
			return err
		}
		// SIGUSR1 (10) is dequeued before SIGUSR2 (12): WaitStop must
		// record and suppress it, and return at SIGUSR2.
		if err := unix.Kill(pid, unix.SIGUSR1); err != nil {
			return err
		}
		if err := unix.Kill(pid, unix.SIGUSR2); err != nil {
			return err
		}
		var err error
		ws, err = WaitStop(pid, syscall.SIGUSR2, &pending, func() error { return Cont(pid, 0) })
		if err != nil {
			return err
		}
		// Suppress SIGUSR2 too: both would kill sleep.
		return Detach(pid, 0)
	})
	if err != nil {
		t.Fatal(err)
	}
	if !ws.Stopped() || ws.StopSignal() != syscall.SIGUSR2 || Event(ws) != 0 {
		t.Errorf("WaitStop status %#x, want a SIGUSR2 signal-delivery-stop", uint32(ws))
	}
	if len(pending) != 1 || pending[0] != syscall.SIGUSR1 {
		t.Errorf("pending %v, want [SIGUSR1]", pending)
	}
	st := waitState(t, pid, "S", 5*time.Second)
	if st.TracerPid != 0 {
		t.Errorf("TracerPid %d after detach", st.TracerPid)
	}
}

func TestWaitStopExited(t *testing.T) {
	s := startSleeper(t)
	pid := s.pid
	tr := NewTracer()
	defer tr.Close()
	var werr error
	var ws unix.WaitStatus
	err := tr.Do(func() error {
		if _, err := seizeStop(pid, 0); err != nil {
			return err
		}
		if err := unix.Kill(pid, unix.SIGKILL); err != nil {
			return err
		}
		ws, werr = WaitStop(pid, syscall.SIGTRAP, nil, func() error { return Cont(pid, 0) })
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(werr, ErrExited) || !strings.Contains(werr.Error(), "killed by killed") {
		t.Errorf("WaitStop after SIGKILL: %v, want ErrExited naming the signal", werr)
	}
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Errorf("status %#x, want killed by SIGKILL", uint32(ws))
	}
}

// TestCloseKillsExitkillTracee checks that closing the tracer ends its
// thread, which kills tracees seized with PTRACE_O_EXITKILL.
func TestCloseKillsExitkillTracee(t *testing.T) {
	s := startSleeper(t)
	tr := NewTracer()
	if _, err := func() (unix.WaitStatus, error) {
		var ws unix.WaitStatus
		err := tr.Do(func() error {
			var err error
			ws, err = seizeStop(s.pid, unix.PTRACE_O_EXITKILL)
			return err
		})
		return ws, err
	}(); err != nil {
		tr.Close()
		t.Fatal(err)
	}
	tr.Close()
	done := make(chan error, 1)
	go func() { done <- s.cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("sleep ended with %v", err)
		}
		ws := ee.Sys().(syscall.WaitStatus)
		if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Errorf("sleep ended with status %v, want killed by SIGKILL", ws)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("tracee still alive 10s after the tracer closed")
	}
}

func TestReadMemErrors(t *testing.T) {
	if err := ReadMem(os.Getpid(), 0x1000, nil); err != nil {
		t.Errorf("empty ReadMem: %v", err)
	}
	if err := WriteMem(os.Getpid(), 0x1000, nil); err != nil {
		t.Errorf("empty WriteMem: %v", err)
	}
	buf := make([]byte, 16)
	err := ReadMem(os.Getpid(), 0x1000, buf)
	if !errors.Is(err, unix.EFAULT) || !strings.Contains(err.Error(), "0x1000") {
		t.Errorf("ReadMem of an unmapped address: %v, want EFAULT naming the address", err)
	}
	err = WriteMem(os.Getpid(), 0x1000, buf)
	if !errors.Is(err, unix.EFAULT) {
		t.Errorf("WriteMem of an unmapped address: %v, want EFAULT", err)
	}
	// Our own memory, through process_vm_readv.
	src := []byte("0123456789abcdef")
	var v uint64
	v, err = ReadU64(os.Getpid(), uint64(uintptrOf(src)))
	if err != nil || v != 0x3736353433323130 {
		t.Errorf("ReadU64 = %#x, %v; want 0x3736353433323130", v, err)
	}
	runtime.KeepAlive(src)
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }
