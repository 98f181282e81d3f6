package uffd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioc computes a Linux ioctl number like the _IOC macro.
func ioc(dir, typ, nr, size uintptr) uintptr { return dir<<30 | size<<16 | typ<<8 | nr }

func TestABI(t *testing.T) {
	const r, w = 2, 1 // _IOC_READ, _IOC_WRITE
	tests := []struct {
		name      string
		got, want uintptr
	}{
		{"sizeof uffdio_api", unsafe.Sizeof(uffdioAPI{}), 24},
		{"sizeof uffdio_range", unsafe.Sizeof(uffdioRange{}), 16},
		{"sizeof uffdio_register", unsafe.Sizeof(uffdioRegister{}), 32},
		{"sizeof uffdio_copy", unsafe.Sizeof(uffdioCopy{}), 40},
		{"sizeof uffdio_zeropage", unsafe.Sizeof(uffdioZeroPage{}), 32},
		{"UFFDIO_API", ioctlAPI, ioc(r|w, 0xAA, 0x3F, 24)},
		{"UFFDIO_REGISTER", ioctlRegister, ioc(r|w, 0xAA, 0x00, 32)},
		{"UFFDIO_UNREGISTER", ioctlUnregister, ioc(r, 0xAA, 0x01, 16)},
		{"UFFDIO_WAKE", ioctlWake, ioc(r, 0xAA, 0x02, 16)},
		{"UFFDIO_COPY", ioctlCopy, ioc(r|w, 0xAA, 0x03, 40)},
		{"UFFDIO_ZEROPAGE", ioctlZeroPage, ioc(r|w, 0xAA, 0x04, 32)},
	}
	for _, tc := range tests {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}

// msgBytes encodes a struct uffd_msg: event byte, then the union words.
func msgBytes(event byte, words ...uint64) []byte {
	b := make([]byte, MsgSize)
	b[0] = event
	for i, w := range words {
		binary.LittleEndian.PutUint64(b[8+8*i:], w)
	}
	return b
}

func TestParseMsg(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		want    Msg
		wantErr bool
	}{
		{"pagefault", msgBytes(EventPagefault, PagefaultFlagWrite, 0x7f0000001000, 0xdeadbeef_00001234),
			Msg{Event: EventPagefault, Flags: PagefaultFlagWrite, Address: 0x7f0000001000, PTID: 0x1234}, false},
		{"fork", msgBytes(EventFork, 0xffffffff_00000007), Msg{Event: EventFork, ForkUFD: 7}, false},
		{"remap", msgBytes(EventRemap, 0x1000, 0x5000, 0x3000), Msg{Event: EventRemap, From: 0x1000, To: 0x5000, Len: 0x3000}, false},
		{"remove", msgBytes(EventRemove, 0x1000, 0x2000, 99), Msg{Event: EventRemove, Start: 0x1000, End: 0x2000}, false},
		{"unmap", msgBytes(EventUnmap, 0x1000, 0x2000), Msg{Event: EventUnmap, Start: 0x1000, End: 0x2000}, false},
		{"max values", msgBytes(EventPagefault, ^uint64(0), ^uint64(0), ^uint64(0)),
			Msg{Event: EventPagefault, Flags: ^uint64(0), Address: ^uint64(0), PTID: ^uint32(0)}, false},
		{"unknown event", msgBytes(0x17), Msg{}, true},
		{"zero event", msgBytes(0), Msg{}, true},
		{"short", msgBytes(EventPagefault)[:31], Msg{}, true},
		{"long", append(msgBytes(EventPagefault), 0), Msg{}, true},
		{"nil", nil, Msg{}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseMsg(tc.in)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Fatalf("ParseMsg = %+v, %v; want %+v, error %v", got, err, tc.want, tc.wantErr)
			}
		})
	}
}

func FuzzParseMsg(f *testing.F) {
	f.Add(msgBytes(EventPagefault, 1, 0x1000, 5))
	f.Add(msgBytes(EventRemap, 1, 2, 3))
	f.Add([]byte{0x13})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseMsg(b)
		if err == nil && (len(b) != MsgSize || m.Event != b[0]) {
			t.Fatalf("accepted %x as %+v", b, m)
		}
	})
}

// env is a userfaultfd of this process with a registered anonymous region.
type env struct {
	fd    int
	mem   []byte
	base  uint64
	ps    uint64
	extra [][2]uint64 // more ranges to unmap at cleanup: address, length
}

// newEnv creates a non-blocking uffd with features, maps pages anonymous
// pages and registers them in MISSING mode. Cleanup closes the uffd before
// unmapping anything, so the unmaps generate no events (nobody would read
// them) and goroutines blocked on events are released.
func newEnv(t *testing.T, features uint64, pages int) *env {
	t.Helper()
	ps := uint64(os.Getpagesize())
	mem, err := unix.Mmap(-1, 0, pages*int(ps), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{fd: -1, mem: mem, base: uint64(uintptr(unsafe.Pointer(&mem[0]))), ps: ps}
	t.Cleanup(func() {
		if e.fd >= 0 {
			_ = unix.Close(e.fd)
		}
		_ = unix.Munmap(mem)
		for _, r := range e.extra {
			_, _, _ = unix.Syscall(unix.SYS_MUNMAP, uintptr(r[0]), uintptr(r[1]), 0)
		}
	})
	if err := unix.Madvise(mem, unix.MADV_NOHUGEPAGE); err != nil {
		t.Fatal(err)
	}
	fd, err := New(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOSYS) {
		t.Skipf("userfaultfd unavailable: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	e.fd = fd
	got, ioctls, err := API(fd, features)
	if err != nil {
		t.Fatal(err)
	}
	if got&features != features || ioctls&(IoctlRegister|IoctlUnregister|IoctlAPI) != IoctlRegister|IoctlUnregister|IoctlAPI {
		t.Fatalf("API features %#x ioctls %#x, asked %#x", got, ioctls, features)
	}
	rio, err := Register(fd, e.base, uint64(len(mem)), RegisterModeMissing)
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(IoctlWake | IoctlCopy | IoctlZeroPage); rio&want != want {
		t.Fatalf("range ioctls %#x lack %#x", rio, want)
	}
	return e
}

// page returns the address of page i.
func (e *env) page(i int) uint64 { return e.base + uint64(i)*e.ps }

// pageBytes returns page i of the region.
func (e *env) pageBytes(i int) []byte { return e.mem[uint64(i)*e.ps : uint64(i+1)*e.ps] }

// next waits up to 5s for one message.
func (e *env) next(t *testing.T) Msg {
	t.Helper()
	pfd := []unix.PollFd{{Fd: int32(e.fd), Events: unix.POLLIN}}
	n, err := unix.Poll(pfd, 5000)
	if err != nil || n != 1 {
		t.Fatalf("poll uffd: %d, %v", n, err)
	}
	msgs := make([]Msg, 1)
	got, err := Read(e.fd, msgs, make([]byte, MsgSize))
	if err != nil || got != 1 {
		t.Fatalf("Read = %d, %v", got, err)
	}
	return msgs[0]
}

// faultViaPipe makes the kernel read page i of the region (write(2) of it
// into a pipe) in a goroutine, so the fault blocks that goroutine's thread
// in the kernel rather than the Go runtime. It returns the read end of the
// pipe and a channel with the write's result.
func (e *env) faultViaPipe(t *testing.T, i int) (*os.File, chan error) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pr.Close() })
	done := make(chan error, 1)
	src := e.pageBytes(i)
	go func() {
		defer pw.Close()
		n, err := unix.Write(int(pw.Fd()), src)
		if err == nil && n != len(src) {
			err = errors.New("short write")
		}
		done <- err
	}()
	return pr, done
}

// expectPipe checks that the write finished and delivered want.
func expectPipe(t *testing.T, pr *os.File, done chan error, want []byte) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("faulting write not woken")
	}
	got := make([]byte, len(want)+1)
	n, err := pr.Read(got)
	if err != nil || !bytes.Equal(got[:n], want) {
		t.Fatalf("pipe delivered %d bytes (%v), want %d bytes of %#x", n, err, len(want), want[0])
	}
}

func TestPagefaultCopyZeroPage(t *testing.T) {
	e := newEnv(t, FeatureEventFork|FeatureEventRemap|FeatureEventRemove|FeatureEventUnmap, 16)
	ps := int(e.ps)

	// Nothing pending yet: EAGAIN, unwrapped.
	if _, err := Read(e.fd, make([]Msg, 4), make([]byte, 4*MsgSize)); err != unix.EAGAIN {
		t.Fatalf("Read on idle uffd = %v, want EAGAIN", err)
	}

	// Page 0: served by Copy.
	pr, done := e.faultViaPipe(t, 0)
	m := e.next(t)
	if m.Event != EventPagefault || m.Address != e.page(0) || m.Flags&PagefaultFlagWrite != 0 {
		t.Fatalf("got %+v, want read fault at %#x", m, e.page(0))
	}
	src := bytes.Repeat([]byte{0xAB}, ps)
	n, err := Copy(e.fd, e.page(0), unsafe.Pointer(&src[0]), e.ps, 0)
	if err != nil || n != int64(ps) {
		t.Fatalf("Copy = %d, %v", n, err)
	}
	expectPipe(t, pr, done, src)
	if !bytes.Equal(e.pageBytes(0), src) {
		t.Error("page 0 does not hold the copied bytes")
	}

	// Page 1: served by ZeroPage.
	pr, done = e.faultViaPipe(t, 1)
	if m := e.next(t); m.Event != EventPagefault || m.Address != e.page(1) {
		t.Fatalf("got %+v, want fault at %#x", m, e.page(1))
	}
	if n, err := ZeroPage(e.fd, e.page(1), e.ps, 0); err != nil || n != int64(ps) {
		t.Fatalf("ZeroPage = %d, %v", n, err)
	}
	expectPipe(t, pr, done, make([]byte, ps))

	// Copying onto a present page fails with EEXIST and copies nothing.
	if n, err := Copy(e.fd, e.page(0), unsafe.Pointer(&src[0]), e.ps, 0); !errors.Is(err, unix.EEXIST) || n != 0 {
		t.Errorf("Copy onto present page = %d, %v; want 0, EEXIST", n, err)
	}
	if n, err := ZeroPage(e.fd, e.page(1), e.ps, 0); !errors.Is(err, unix.EEXIST) || n != 0 {
		t.Errorf("ZeroPage onto present page = %d, %v; want 0, EEXIST", n, err)
	}
	// A two-page copy over pages 2-3 before anyone faults; then a copy
	// over 3-4 stops at the present page 3.
	two := append(bytes.Repeat([]byte{1}, ps), bytes.Repeat([]byte{2}, ps)...)
	if n, err := Copy(e.fd, e.page(2), unsafe.Pointer(&two[0]), 2*e.ps, 0); err != nil || n != 2*int64(ps) {
		t.Fatalf("two-page Copy = %d, %v", n, err)
	}
	if !bytes.Equal(e.mem[2*ps:4*ps], two) {
		t.Error("pages 2-3 do not hold the copied bytes")
	}
	if _, err := Copy(e.fd, e.page(3), unsafe.Pointer(&two[0]), 2*e.ps, 0); !errors.Is(err, unix.EEXIST) {
		t.Errorf("Copy over a present page = %v, want EEXIST", err)
	}
	// Unaligned destination: EINVAL.
	if _, err := Copy(e.fd, e.page(5)+1, unsafe.Pointer(&src[0]), e.ps, 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("unaligned Copy = %v, want EINVAL", err)
	}
}

func TestCopyDontWakeThenWake(t *testing.T) {
	e := newEnv(t, 0, 8)
	pr, done := e.faultViaPipe(t, 5)
	if m := e.next(t); m.Event != EventPagefault || m.Address != e.page(5) {
		t.Fatalf("got %+v, want fault at %#x", m, e.page(5))
	}
	src := bytes.Repeat([]byte{0x5A}, int(e.ps))
	if n, err := Copy(e.fd, e.page(5), unsafe.Pointer(&src[0]), e.ps, CopyModeDontWake); err != nil || n != int64(e.ps) {
		t.Fatalf("Copy = %d, %v", n, err)
	}
	select {
	case err := <-done:
		t.Fatalf("write finished (%v) before Wake", err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := Wake(e.fd, e.page(5), e.ps); err != nil {
		t.Fatal(err)
	}
	expectPipe(t, pr, done, src)
}

// inThread runs f on a locked OS thread in a goroutine: f's system call
// blocks until the test reads the event it generates.
func inThread(f func() error) chan error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		done <- f()
	}()
	return done
}

func wait(t *testing.T, done chan error) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("event-generating call still blocked")
	}
}

func TestRemoveUnmapRemapEvents(t *testing.T) {
	e := newEnv(t, FeatureEventRemap|FeatureEventRemove|FeatureEventUnmap, 16)

	// MADV_DONTNEED on pages 8-9: REMOVE.
	done := inThread(func() error { return unix.Madvise(e.mem[8*e.ps:10*e.ps], unix.MADV_DONTNEED) })
	if m := e.next(t); m != (Msg{Event: EventRemove, Start: e.page(8), End: e.page(10)}) {
		t.Fatalf("got %+v, want REMOVE %#x-%#x", m, e.page(8), e.page(10))
	}
	wait(t, done)

	// munmap of pages 14-15: UNMAP.
	done = inThread(func() error {
		_, _, errno := unix.Syscall(unix.SYS_MUNMAP, uintptr(e.page(14)), uintptr(2*e.ps), 0)
		if errno != 0 {
			return errno
		}
		return nil
	})
	if m := e.next(t); m != (Msg{Event: EventUnmap, Start: e.page(14), End: e.page(16)}) {
		t.Fatalf("got %+v, want UNMAP %#x-%#x", m, e.page(14), e.page(16))
	}
	wait(t, done)

	// mremap of pages 0-3 onto a reserved spot: REMAP.
	dst, err := unix.Mmap(-1, 0, 4*int(e.ps), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	to := uint64(uintptr(unsafe.Pointer(&dst[0])))
	// After the move the 4 pages live at to: unmap them there.
	e.extra = append(e.extra, [2]uint64{to, 4 * e.ps})
	done = inThread(func() error {
		r, _, errno := unix.Syscall6(unix.SYS_MREMAP, uintptr(e.page(0)), uintptr(4*e.ps), uintptr(4*e.ps),
			unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, uintptr(to), 0)
		if errno != 0 {
			return errno
		}
		if uint64(r) != to {
			return errors.New("mremap moved elsewhere")
		}
		return nil
	})
	if m := e.next(t); m != (Msg{Event: EventRemap, From: e.page(0), To: to, Len: 4 * e.ps}) {
		t.Fatalf("got %+v, want REMAP %#x -> %#x len %#x", m, e.page(0), to, 4*e.ps)
	}
	// The old range is then reported unmapped as well.
	if m := e.next(t); m != (Msg{Event: EventUnmap, Start: e.page(0), End: e.page(4)}) {
		t.Fatalf("got %+v, want UNMAP of the old range %#x-%#x", m, e.page(0), e.page(4))
	}
	wait(t, done)

	// The moved range is still registered: unregister it, then the rest.
	if err := Unregister(e.fd, to, 4*e.ps); err != nil {
		t.Fatal(err)
	}
	if err := Unregister(e.fd, e.page(4), 10*e.ps); err != nil {
		t.Fatal(err)
	}
	// Unregistered memory faults normally and reads as zero.
	if e.mem[9*e.ps] != 0 {
		t.Error("fresh page not zero")
	}
	// With nothing registered, Copy has no target.
	src := make([]byte, e.ps)
	if _, err := Copy(e.fd, e.page(6), unsafe.Pointer(&src[0]), e.ps, 0); err == nil {
		t.Error("Copy into unregistered memory succeeded")
	}
}

func TestReadBatchAndErrors(t *testing.T) {
	if _, err := Read(0, nil, make([]byte, MsgSize)); err == nil {
		t.Error("Read with no msgs succeeded")
	}
	if _, err := Read(0, make([]Msg, 1), make([]byte, MsgSize-1)); err == nil {
		t.Error("Read with short scratch succeeded")
	}
	if _, err := Register(-1, 0, 4096, RegisterModeMissing); !errors.Is(err, unix.EBADF) {
		t.Errorf("Register on bad fd = %v, want EBADF", err)
	}

	// Two pending REMOVE events are read in one batch.
	e := newEnv(t, FeatureEventRemove, 4)
	d1 := inThread(func() error { return unix.Madvise(e.mem[:e.ps], unix.MADV_DONTNEED) })
	d2 := inThread(func() error { return unix.Madvise(e.mem[2*e.ps:3*e.ps], unix.MADV_DONTNEED) })
	msgs := make([]Msg, 4)
	var got []Msg
	for deadline := time.Now().Add(5 * time.Second); len(got) < 2 && time.Now().Before(deadline); {
		n, err := Read(e.fd, msgs, make([]byte, 4*MsgSize))
		if err == unix.EAGAIN {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, msgs[:n]...)
	}
	wait(t, d1)
	wait(t, d2)
	if len(got) != 2 {
		t.Fatalf("got %d events: %+v", len(got), got)
	}
	if got[0].Start > got[1].Start {
		got[0], got[1] = got[1], got[0]
	}
	if got[0] != (Msg{Event: EventRemove, Start: e.page(0), End: e.page(1)}) ||
		got[1] != (Msg{Event: EventRemove, Start: e.page(2), End: e.page(3)}) {
		t.Errorf("events %+v", got)
	}
}

// TestMain runs the helper process of TestAliveAfterExit when asked to.
func TestMain(m *testing.M) {
	if os.Getenv("UFFD_TEST_HELPER") == "alive" {
		aliveHelper()
		return
	}
	os.Exit(m.Run())
}

// aliveHelper creates a userfaultfd of its own address space, prints its
// number and blocks until killed.
func aliveHelper() {
	fd, err := New(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err == nil {
		_, _, err = API(fd, 0)
	}
	if err != nil {
		os.Stdout.WriteString("error " + err.Error() + "\n")
		os.Exit(1)
	}
	os.Stdout.WriteString(strconv.Itoa(fd) + "\n")
	select {}
}

// TestAlive: Alive on a live address space answers true and leaves a
// missing page missing (the fault is still raised and served by Copy).
func TestAlive(t *testing.T) {
	e := newEnv(t, 0, 8)
	for _, i := range []int{0, 3, 7} {
		if !Alive(e.fd, e.page(i)) {
			t.Fatalf("Alive(page %d) = false on a live address space", i)
		}
	}
	if !Alive(e.fd, e.base+uint64(len(e.mem))+1<<30) {
		t.Fatal("Alive on an unmapped address = false on a live address space")
	}
	pr, done := e.faultViaPipe(t, 3)
	if m := e.next(t); m.Event != EventPagefault || m.Address != e.page(3) {
		t.Fatalf("got %+v, want a fault at %#x (Alive must not map the page)", m, e.page(3))
	}
	src := bytes.Repeat([]byte{0xA5}, int(e.ps))
	if _, err := Copy(e.fd, e.page(3), unsafe.Pointer(&src[0]), e.ps, 0); err != nil {
		t.Fatal(err)
	}
	expectPipe(t, pr, done, src)
}

// TestAliveAfterExit: the userfaultfd of another process (taken with
// pidfd_getfd, as the daemon holds a forked child's) is alive while that
// process runs and not once it has exited, though the descriptor stays open.
func TestAliveAfterExit(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), "UFFD_TEST_HELPER=alive")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := false
	t.Cleanup(func() {
		if !exited {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
	theirs, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Skipf("helper could not make a userfaultfd: %s", strings.TrimSpace(line))
	}
	pidfd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pidfd)
	fd, err := unix.PidfdGetfd(pidfd, theirs, 0)
	if err != nil {
		t.Skipf("pidfd_getfd: %v", err)
	}
	defer unix.Close(fd)
	addr := uint64(1 << 30)
	if !Alive(fd, addr) {
		t.Fatal("Alive = false while the helper runs")
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	exited = true
	if Alive(fd, addr) {
		t.Fatal("Alive = true after the helper exited")
	}
}
