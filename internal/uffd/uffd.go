// Package uffd wraps userfaultfd(2): creating the descriptor, the
// UFFDIO_* ioctls and decoding the struct uffd_msg events read from it.
// golang.org/x/sys/unix does not provide these; the values below follow
// include/uapi/linux/userfaultfd.h.
//
// The functions are thin: they issue one system call each and never retry.
// Errors wrap the kernel's errno (use errors.Is), except that Read returns
// unix.EAGAIN unwrapped.
package uffd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// APIVersion is UFFD_API, the only API version.
const APIVersion = 0xAA

// Features negotiated with API (UFFD_FEATURE_*).
const (
	FeaturePagefaultFlagWP  = 1 << 0
	FeatureEventFork        = 1 << 1
	FeatureEventRemap       = 1 << 2
	FeatureEventRemove      = 1 << 3
	FeatureMissingHugetlbfs = 1 << 4
	FeatureMissingShmem     = 1 << 5
	FeatureEventUnmap       = 1 << 6
	FeatureSigbus           = 1 << 7
	FeatureThreadID         = 1 << 8
	FeatureMinorHugetlbfs   = 1 << 9
	FeatureMinorShmem       = 1 << 10
	FeatureExactAddress     = 1 << 11
	FeatureWPHugetlbfsShmem = 1 << 12
	FeatureWPUnpopulated    = 1 << 13
	FeaturePoison           = 1 << 14
	FeatureWPAsync          = 1 << 15
	FeatureMove             = 1 << 16
)

// Register modes (UFFDIO_REGISTER_MODE_*).
const (
	RegisterModeMissing = 1 << 0
	RegisterModeWP      = 1 << 1
	RegisterModeMinor   = 1 << 2
)

// Modes of Copy (UFFDIO_COPY_MODE_*) and ZeroPage (UFFDIO_ZEROPAGE_MODE_*).
const (
	CopyModeDontWake     = 1 << 0
	CopyModeWP           = 1 << 1
	ZeroPageModeDontWake = 1 << 0
)

// Bits of the ioctls masks returned by API and Register: bit n set means the
// ioctl with number n is supported (1 << _UFFDIO_*).
const (
	IoctlRegister   = 1 << 0x00
	IoctlUnregister = 1 << 0x01
	IoctlWake       = 1 << 0x02
	IoctlCopy       = 1 << 0x03
	IoctlZeroPage   = 1 << 0x04
	IoctlAPI        = 1 << 0x3F
)

// Event types of Msg.Event (UFFD_EVENT_*).
const (
	EventPagefault = 0x12
	EventFork      = 0x13
	EventRemap     = 0x14
	EventRemove    = 0x15
	EventUnmap     = 0x16
)

// Flags of a pagefault Msg (UFFD_PAGEFAULT_FLAG_*).
const (
	PagefaultFlagWrite = 1 << 0
	PagefaultFlagWP    = 1 << 1
	PagefaultFlagMinor = 1 << 2
)

// MsgSize is the size of struct uffd_msg, the unit read(2) returns.
const MsgSize = 32

// ioctl request numbers.
const (
	ioctlAPI        = 0xc018aa3f // _IOWR(0xAA, 0x3F, struct uffdio_api)
	ioctlRegister   = 0xc020aa00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	ioctlUnregister = 0x8010aa01 // _IOR(0xAA, 0x01, struct uffdio_range)
	ioctlWake       = 0x8010aa02 // _IOR(0xAA, 0x02, struct uffdio_range)
	ioctlCopy       = 0xc028aa03 // _IOWR(0xAA, 0x03, struct uffdio_copy)
	ioctlZeroPage   = 0xc020aa04 // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
	ioctlContinue   = 0xc020aa07 // _IOWR(0xAA, 0x07, struct uffdio_continue)
	ioctlWP         = 0xc018aa06 // _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
)

// Kernel argument structures. They hold no Go pointers except
// uffdioCopy.src, see Copy.
type (
	uffdioAPI      struct{ api, features, ioctls uint64 }
	uffdioRange    struct{ start, len uint64 }
	uffdioRegister struct {
		rng          uffdioRange
		mode, ioctls uint64
	}
	uffdioCopy struct {
		dst, src, len, mode uint64
		copy                int64
	}
	uffdioZeroPage struct {
		rng      uffdioRange
		mode     uint64
		zeropage int64
	}
)

// ioctl issues ioctl(fd, req, arg). arg points to one of the structs above;
// passing it as unsafe.Pointer converted in the Syscall argument list keeps
// it alive and in place for the duration of the call.
func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}

// New creates a userfaultfd for this process's address space with flags
// (e.g. unix.O_CLOEXEC|unix.O_NONBLOCK). It does not set
// UFFD_USER_MODE_ONLY, so faults taken by the kernel on user memory are
// reported too; that needs CAP_SYS_PTRACE unless
// vm.unprivileged_userfaultfd is 1. The descriptor must then be
// initialized with API.
func New(flags int) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	if errno != 0 {
		return -1, fmt.Errorf("userfaultfd(%#x): %w", flags, errno)
	}
	return int(fd), nil
}

// API performs the UFFDIO_API handshake requesting features. It returns the
// features the kernel enabled and the mask of ioctls (Ioctl*) usable on fd.
// It fails with EINVAL if a requested feature is unsupported.
func API(fd int, features uint64) (gotFeatures, ioctls uint64, err error) {
	a := uffdioAPI{api: APIVersion, features: features}
	if err := ioctl(fd, ioctlAPI, unsafe.Pointer(&a)); err != nil {
		return 0, 0, fmt.Errorf("UFFDIO_API features %#x: %w", features, err)
	}
	return a.features, a.ioctls, nil
}

// Register registers [start, start+length) in mode (RegisterMode* bits)
// and returns the mask of ioctls (Ioctl*) usable on the range.
func Register(fd int, start, length, mode uint64) (ioctls uint64, err error) {
	r := uffdioRegister{rng: uffdioRange{start, length}, mode: mode}
	if err := ioctl(fd, ioctlRegister, unsafe.Pointer(&r)); err != nil {
		return 0, fmt.Errorf("UFFDIO_REGISTER %#x+%#x mode %#x: %w", start, length, mode, err)
	}
	return r.ioctls, nil
}

// Unregister unregisters [start, start+length).
func Unregister(fd int, start, length uint64) error {
	r := uffdioRange{start, length}
	if err := ioctl(fd, ioctlUnregister, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("UFFDIO_UNREGISTER %#x+%#x: %w", start, length, err)
	}
	return nil
}

// Copy copies length bytes from src, an address in this process, to dst in
// the address space of fd, and wakes the threads waiting on that range
// unless mode has CopyModeDontWake. It returns the number of bytes copied.
// On a partial copy it returns that count and the error: EEXIST when a
// destination page is already present, EAGAIN when the address space is
// changing (the caller retries the rest). It does not retry.
func Copy(fd int, dst uint64, src unsafe.Pointer, length uint64, mode uint64) (int64, error) {
	// src is stored in the argument struct as an integer, so the compiler
	// does not know the kernel reads through it: pin it (a no-op for
	// memory outside the Go heap, such as mmap'ed buffers).
	var pin runtime.Pinner
	pin.Pin(src)
	defer pin.Unpin()
	c := uffdioCopy{dst: dst, src: uint64(uintptr(src)), len: length, mode: mode}
	err := ioctl(fd, ioctlCopy, unsafe.Pointer(&c))
	n := max(c.copy, 0) // negative: -errno
	if err != nil {
		return n, fmt.Errorf("UFFDIO_COPY %#x+%#x (copied %d): %w", dst, length, n, err)
	}
	return n, nil
}

// ZeroPage maps zero pages on [start, start+length) in the address space of
// fd, and wakes the waiting threads unless mode has ZeroPageModeDontWake.
// It returns the number of bytes mapped, with errors as for Copy.
func ZeroPage(fd int, start, length, mode uint64) (int64, error) {
	z := uffdioZeroPage{rng: uffdioRange{start, length}, mode: mode}
	err := ioctl(fd, ioctlZeroPage, unsafe.Pointer(&z))
	n := max(z.zeropage, 0)
	if err != nil {
		return n, fmt.Errorf("UFFDIO_ZEROPAGE %#x+%#x (mapped %d): %w", start, length, n, err)
	}
	return n, nil
}

// uffdioContinue is struct uffdio_continue.
type uffdioContinue struct {
	rng    uffdioRange
	mode   uint64
	mapped int64
}

// Continue maps the page-cache pages already present for
// [start, start+length) of a MINOR-registered shmem mapping (for a private
// mapping: read-only, so a write copies on write as usual) and wakes the
// waiting threads. It returns the number of bytes mapped, with errors as for
// Copy (EFAULT when a page is not in the page cache).
func Continue(fd int, start, length uint64) (int64, error) {
	c := uffdioContinue{rng: uffdioRange{start, length}}
	err := ioctl(fd, ioctlContinue, unsafe.Pointer(&c))
	n := max(c.mapped, 0)
	if err != nil {
		return n, fmt.Errorf("UFFDIO_CONTINUE %#x+%#x (mapped %d): %w", start, length, n, err)
	}
	return n, nil
}

// uffdioWriteProtect is struct uffdio_writeprotect.
type uffdioWriteProtect struct {
	rng  uffdioRange
	mode uint64
}

// Alive reports whether the address space of fd still exists. A
// userfaultfd does not signal its process's exit: the one a fork handed over
// (EventFork) stays open, and quiet, after that process has exited or
// exec'd, so its reader must ask. Alive asks with UFFDIO_WRITEPROTECT
// (mode 0: remove write protection) on the page at addr, any page-aligned
// user address: the kernel answers ESRCH once the address space is gone,
// before it looks at the range, and otherwise changes nothing in ranges not
// registered for write protection (ENOENT), which no range of this
// package's users is. Any answer but ESRCH counts as alive.
func Alive(fd int, addr uint64) bool {
	wp := uffdioWriteProtect{rng: uffdioRange{addr, uint64(unix.Getpagesize())}}
	err := ioctl(fd, ioctlWP, unsafe.Pointer(&wp))
	return !errors.Is(err, unix.ESRCH)
}

// Wake wakes the threads waiting on faults in [start, start+length).
func Wake(fd int, start, length uint64) error {
	r := uffdioRange{start, length}
	if err := ioctl(fd, ioctlWake, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("UFFDIO_WAKE %#x+%#x: %w", start, length, err)
	}
	return nil
}

// Msg is a decoded struct uffd_msg. Which fields are set depends on Event:
// EventPagefault sets Flags, Address and PTID (with FeatureThreadID);
// EventFork sets ForkUFD, the new userfaultfd installed in the reader;
// EventRemap sets From, To and Len; EventRemove and EventUnmap set Start
// and End.
type Msg struct {
	Event          uint8  // Event* constant
	Flags, Address uint64 // pagefault: PagefaultFlag* bits, faulting address
	PTID           uint32 // pagefault: faulting thread id (FeatureThreadID)
	ForkUFD        int    // fork: uffd of the child's mm, open in the reader
	From, To, Len  uint64 // remap: old address, new address, old length
	Start, End     uint64 // remove, unmap: [Start, End)
}

// ParseMsg decodes one struct uffd_msg; b must be MsgSize bytes and hold a
// known event.
func ParseMsg(b []byte) (Msg, error) {
	if len(b) != MsgSize {
		return Msg{}, fmt.Errorf("uffd msg of %d bytes, want %d", len(b), MsgSize)
	}
	le := binary.LittleEndian // amd64 and arm64 Linux are little-endian
	m := Msg{Event: b[0]}
	switch m.Event {
	case EventPagefault:
		m.Flags, m.Address, m.PTID = le.Uint64(b[8:]), le.Uint64(b[16:]), le.Uint32(b[24:])
	case EventFork:
		m.ForkUFD = int(le.Uint32(b[8:]))
	case EventRemap:
		m.From, m.To, m.Len = le.Uint64(b[8:]), le.Uint64(b[16:]), le.Uint64(b[24:])
	case EventRemove, EventUnmap:
		m.Start, m.End = le.Uint64(b[8:]), le.Uint64(b[16:])
	default:
		return Msg{}, fmt.Errorf("unknown uffd event %#x", m.Event)
	}
	return m, nil
}

// Read performs one read(2) of up to len(msgs) messages from fd into
// scratch (which needs room for them: at most len(scratch)/MsgSize are
// read) and decodes them into msgs. It returns the number of messages.
// On a non-blocking fd with nothing pending it returns unix.EAGAIN as is.
func Read(fd int, msgs []Msg, scratch []byte) (int, error) {
	want := min(len(msgs), len(scratch)/MsgSize)
	if want == 0 {
		return 0, fmt.Errorf("read uffd %d: no room (%d msgs, %d scratch bytes)", fd, len(msgs), len(scratch))
	}
	var n int
	var err error
	for {
		n, err = unix.Read(fd, scratch[:want*MsgSize])
		if err != unix.EINTR {
			break
		}
	}
	if err == unix.EAGAIN {
		return 0, unix.EAGAIN
	}
	if err != nil {
		return 0, fmt.Errorf("read uffd %d: %w", fd, err)
	}
	if n%MsgSize != 0 {
		return 0, fmt.Errorf("read uffd %d: %d bytes, not a multiple of %d", fd, n, MsgSize)
	}
	for i := 0; i < n/MsgSize; i++ {
		if msgs[i], err = ParseMsg(scratch[i*MsgSize : (i+1)*MsgSize]); err != nil {
			return i, fmt.Errorf("read uffd %d: %w", fd, err)
		}
	}
	return n / MsgSize, nil
}
