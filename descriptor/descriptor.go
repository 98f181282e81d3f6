// Package descriptor defines the seed descriptor: everything a node needs to
// rebuild a prepared process except the contents of its memory pages.
//
// A descriptor is small (kilobytes): registers, the VMA layout with the
// identity of every mapped file, the runs of pages the page source holds, and
// the kernel-side state (signals, rseq, robust list, fds, credentials) that a
// child must inherit. It is encoded with a lean, versioned binary format (see
// codec.go); Decode rejects anything it cannot fully validate.
package descriptor

import (
	"cmp"
	"slices"
)

// Version is the current encoding version written by Encode.
const Version = 5

// CacheMemfdPrefix starts the name of every node page-cache memfd; a
// private mapping of one is a mitosis child's own memory (see pager.Cache).
const CacheMemfdPrefix = "mitosis-seed-"

// PageSize is the only page size mitosis supports (x86-64 base pages).
const PageSize = 4096

// VMA kinds.
const (
	// KindAnon is private anonymous memory (heap, mmap'd arenas, stack).
	// Its pages come from the page source or are zero.
	KindAnon = 0
	// KindFile is a private or shared file mapping whose pages are all
	// still clean (page cache): the child maps the same file.
	KindFile = 1
	// KindFileDirty is a private file mapping in which the parent wrote
	// (.data, GOT, RELRO). The child maps it anonymous and every page is
	// served from the page source.
	KindFileDirty = 2
	// KindVDSO, KindVVAR and KindVVARClock are the kernel's special
	// mappings; the child moves its own to the recorded addresses.
	KindVDSO      = 3
	KindVVAR      = 4
	KindVVARClock = 5
	// KindVsyscall is the fixed legacy vsyscall page; nothing to do.
	KindVsyscall = 6
)

// VMA flags.
const (
	// FlagShared marks a MAP_SHARED mapping.
	FlagShared = 1 << 0
	// FlagGrowsDown marks the main stack ([stack], MAP_GROWSDOWN).
	FlagGrowsDown = 1 << 1
	// FlagHeap marks the [heap] (brk) area.
	FlagHeap = 1 << 2
	// FlagStack marks the [stack] area.
	FlagStack = 1 << 3
)

// VMA is one mapping of the parent's address space.
type VMA struct {
	Start, End uint64 // [Start, End), page aligned
	Prot       uint32 // PROT_READ|PROT_WRITE|PROT_EXEC
	Flags      uint32 // Flag* bits
	Kind       uint32 // Kind* value
	Offset     uint64 // file offset of Start (file kinds)
	Path       string // file path for file kinds, pseudo name otherwise
	File       FileID // identity of the mapped file (file kinds)
}

// FileID identifies the exact file a mapping or descriptor was taken from, so
// that a restore can refuse a file that changed since prepare.
type FileID struct {
	Dev       uint64
	Ino       uint64
	Size      int64
	MtimeNsec int64
}

// Run is a half-open range [Start, End) of page-aligned addresses in the page
// source (the seed's frozen copy).
type Run struct {
	Start, End uint64
}

// MergeRuns sorts runs by start, in place, and merges those that overlap or
// touch; it returns the merged runs, which share runs' backing array.
func MergeRuns(runs []Run) []Run {
	slices.SortFunc(runs, func(a, b Run) int { return cmp.Compare(a.Start, b.Start) })
	out := runs[:0]
	for _, r := range runs {
		if n := len(out); n > 0 && r.Start <= out[n-1].End {
			out[n-1].End = max(out[n-1].End, r.End)
			continue
		}
		out = append(out, r)
	}
	return out
}

// SigAction is one installed signal disposition (kernel struct k_sigaction
// layout on x86-64).
type SigAction struct {
	Signo    uint32
	Handler  uint64 // SIG_DFL=0, SIG_IGN=1, or a handler address
	Flags    uint64
	Restorer uint64
	Mask     uint64
}

// MMFields are the mm_struct fields restored with PR_SET_MM_MAP.
type MMFields struct {
	StartCode, EndCode uint64
	StartData, EndData uint64
	StartBrk, Brk      uint64
	StartStack         uint64
	ArgStart, ArgEnd   uint64
	EnvStart, EnvEnd   uint64
}

// FD kinds carried across a fork.
const (
	// FDFile is a regular file, directory or device reopened by path.
	FDFile = 0
	// FDChannel is the client's connection to its node daemon: every child
	// gets a fresh connection at the same number (see client semantics).
	FDChannel = 1
	// FDPipe is one end of a pipe whose both ends are open in the parent
	// (a self-pipe, as event loops use for wake-ups): each child gets a new
	// pipe, with the bytes that were buffered at prepare (Data, on one FD
	// of the pipe). FDs of one pipe share Group (the pipe's inode); the
	// access mode in Flags says which end an FD is.
	FDPipe = 2
	// FDEventfd is an eventfd: each child gets a new one with the counter
	// (Count) at prepare; Group tells dup'ed descriptors of one eventfd.
	FDEventfd = 3
	// FDEpoll is an epoll instance: each child gets a new one watching the
	// child's descriptors of the same numbers (Watches).
	FDEpoll = 4
	// FDSocket is a unix socket with no connection to carry: either one
	// end of a socketpair whose other end is closed (SocketPeerGone: reads
	// give end-of-file, writes EPIPE; the JDK keeps one as the target of
	// its dup2-before-close), or a socket never connected nor bound
	// (SocketFresh). Each child gets a new one in the same state; Group is
	// its type (SOCK_STREAM, SOCK_SEQPACKET).
	FDSocket = 5
	// FDKindMax is the largest FD kind.
	FDKindMax = FDSocket
)

// Values of an FDSocket's Pos.
const (
	// SocketPeerGone: a socketpair end whose other end is closed.
	SocketPeerGone = 0
	// SocketFresh: a socket neither connected nor bound.
	SocketFresh = 1
)

// EventfdSemaphore is the value of an FDEventfd's Pos (otherwise unused for
// an eventfd) that marks one created with EFD_SEMAPHORE.
const EventfdSemaphore = 1

// EpollWatch is one descriptor an epoll instance watches, as epoll_ctl(2)
// added it: the watched descriptor's number, the event mask (with EPOLLET,
// EPOLLONESHOT...) and the user data.
type EpollWatch struct {
	TFD    int32
	Events uint32
	Data   uint64
}

// FD is one open file descriptor of the parent (other than stdin, stdout and
// stderr, which each child gets from its caller).
type FD struct {
	Num     int32
	Kind    uint32
	Path    string
	Flags   uint32 // open(2) flags from fdinfo (access mode, O_APPEND, ...)
	Pos     int64
	Cloexec bool
	File    FileID
	// Group identifies the pipe (its inode) or eventfd (its id) an
	// FDPipe or FDEventfd descriptor belongs to.
	Group uint64
	// Count is an eventfd's counter.
	Count uint64
	// Data is a pipe's buffered content at prepare (on one FD of the pipe).
	Data []byte
	// Watches are an epoll instance's watched descriptors.
	Watches []EpollWatch
}

// Rlimit is one resource limit.
type Rlimit struct {
	Resource uint32
	Cur, Max uint64
}

// Creds are the process credentials.
type Creds struct {
	UID, EUID, SUID, FSUID uint32
	GID, EGID, SGID, FSGID uint32
	Groups                 []uint32
}

// Rseq is a registered restartable-sequences area.
type Rseq struct {
	Addr  uint64
	Len   uint32
	Sig   uint32
	Flags uint32
}

// Thread is the state of one thread of the parent other than the one the
// child is rebuilt on (the thread group leader, whose state is the
// Descriptor's own Regs, XState, SigMask, ... fields). The restore
// recreates it inside the child with clone(CLONE_THREAD) and loads this
// state before any thread of the child runs.
type Thread struct {
	TID     int32      // the parent's tid (informational)
	Regs    [27]uint64 // struct user_regs_struct, x86-64 order
	XState  []byte     // NT_X86_XSTATE regset
	SigMask uint64
	// TIDAddr is the address of glibc's cached tid in this thread's TCB
	// (struct pthread.tid), which is also its clear_child_tid pointer
	// (pthread_join waits on it), or 0 when the thread has none.
	TIDAddr       uint64
	AltStackSP    uint64
	AltStackFlags uint32
	AltStackSize  uint64
	RobustHead    uint64
	RobustLen     uint64
	Rseq          Rseq
	// Comm is the thread's name (/proc/TID/comm, at most 15 bytes: what
	// pthread_setname_np set, e.g. "GC Thread#0"); the restored thread
	// takes it back.
	Comm string
}

// Descriptor is a complete seed descriptor.
type Descriptor struct {
	// Identity.
	SeedID  string
	Name    string
	Node    string // node that holds the page source
	Kernel  string // uname release; restore requires the same build (vdso)
	Exe     string // /proc/PID/exe target
	ExeFile FileID
	PID     int32 // parent pid at prepare time (informational)

	// CPU state.
	Regs   [27]uint64 // struct user_regs_struct, x86-64 order
	XState []byte     // NT_X86_XSTATE regset

	// Memory.
	VMAs        []VMA
	Present     []Run // source-present, non-zero pages; sorted, disjoint
	MM          MMFields
	Auxv        []byte
	VDSOSyscall uint64 // address of a `syscall` instruction in [vdso]
	TIDAddr     uint64 // address of glibc's cached tid in the TCB, or 0
	ClearTID    uint64 // set_tid_address pointer for the child, or 0

	// Kernel-side task state.
	SigActions    []SigAction
	SigMask       uint64
	AltStackSP    uint64
	AltStackFlags uint32
	AltStackSize  uint64
	RobustHead    uint64
	RobustLen     uint64
	Rseq          Rseq
	// Threads are the parent's other threads (empty for a
	// single-threaded parent), in the order of their tids.
	Threads []Thread

	// Process resources.
	FDs []FD
	Cwd string
	// Root is the parent's root directory as its node sees it ("/" or
	// "" normally; a container image directory for a chrooted parent).
	// Paths in the descriptor (VMAs, Exe, Cwd, FDs) are relative to it.
	Root    string
	Umask   uint32
	Rlimits []Rlimit
	Creds   Creds
	// Comm is the parent's command name (/proc/PID/comm, at most 15
	// bytes): children get it back (ps and top show them as the parent's
	// program, not as the stub that was exec'ed).
	Comm string
	// TIDRefs are the places in the seed's memory that hold the tid of one
	// of its threads and must hold the restored thread's instead.
	TIDRefs []TIDRef
}

// TIDRef is a 4-byte place in the seed's memory holding the tid (as the
// process sees it) of one of its threads: the owner of a recursive or
// error-checking mutex of the dynamic loader (ld.so's locks in
// _rtld_global) that the thread held at the prepare point. A child's
// threads have new tids; unless the owner is rewritten, the thread's
// unlock fails (the caller is not the owner) and the lock is held for
// good: the next dlopen, thread creation or TLS allocation hangs.
type TIDRef struct {
	Addr   uint64
	Thread int32 // -1: the main thread; else an index into Threads
}

// PresentPages returns the number of pages covered by d.Present.
func (d *Descriptor) PresentPages() uint64 {
	var n uint64
	for _, r := range d.Present {
		n += (r.End - r.Start) / PageSize
	}
	return n
}
