package procfs

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// FDKind classifies an open file descriptor.
type FDKind int

// The kinds of file descriptors FDs reports.
const (
	// FDOther is anything not covered by another kind.
	FDOther FDKind = iota
	// FDRegular is a regular file that still has a name.
	FDRegular
	// FDDir is a directory.
	FDDir
	// FDCharDev is a character device.
	FDCharDev
	// FDBlockDev is a block device.
	FDBlockDev
	// FDPipe is a pipe or FIFO.
	FDPipe
	// FDSocket is a socket.
	FDSocket
	// FDAnonInode is an anonymous inode: eventfd, epoll, signalfd,
	// timerfd, userfaultfd, pidfd, inotify... (see FDInfo.AnonType).
	FDAnonInode
	// FDMemfd is a memfd_create(2) file (link target "/memfd:NAME ...").
	FDMemfd
	// FDDeleted is a regular file that was unlinked while open.
	FDDeleted
)

// String returns a readable name of the kind.
func (k FDKind) String() string {
	switch k {
	case FDOther:
		return "other"
	case FDRegular:
		return "regular file"
	case FDDir:
		return "directory"
	case FDCharDev:
		return "character device"
	case FDBlockDev:
		return "block device"
	case FDPipe:
		return "pipe"
	case FDSocket:
		return "socket"
	case FDAnonInode:
		return "anon inode"
	case FDMemfd:
		return "memfd"
	case FDDeleted:
		return "deleted file"
	}
	return "FDKind(" + strconv.Itoa(int(k)) + ")"
}

// FDInfo describes one open file descriptor of a process.
type FDInfo struct {
	// Num is the descriptor number.
	Num int
	// Target is the /proc/PID/fd/NUM link target, e.g. "/etc/passwd",
	// "pipe:[1234]", "socket:[5678]", "anon_inode:[eventfd]".
	Target string
	// Kind classifies the descriptor.
	Kind FDKind
	// Pos is the file position ("pos:" of fdinfo).
	Pos int64
	// Flags are the open(2) flags ("flags:" of fdinfo), including
	// O_CLOEXEC for a close-on-exec descriptor.
	Flags uint32
	// Cloexec is Flags&O_CLOEXEC != 0.
	Cloexec bool
	// File identifies the open file (stat through the fd link).
	File FileID
	// SocketInode is the N of "socket:[N]" for sockets, else 0.
	SocketInode uint64
	// Eventfd is the state of an eventfd ("eventfd-*" lines of fdinfo).
	Eventfd EventfdState
	// Epoll are the descriptors an epoll instance watches ("tfd:" lines
	// of fdinfo), in fdinfo order.
	Epoll []EpollTarget
}

// EventfdState is an eventfd's counter, id and mode.
type EventfdState struct {
	Count     uint64
	ID        uint64
	Semaphore bool
}

// EpollTarget is one "tfd:" line of an epoll instance's fdinfo: the watched
// descriptor number, its event mask and user data, and the inode of the
// watched file.
type EpollTarget struct {
	TFD    int
	Events uint32
	Data   uint64
	Ino    uint64
}

// AnonType returns the type of an anonymous inode descriptor as named by
// the kernel, e.g. "eventfd", "eventpoll", "signalfd", "timerfd",
// "userfaultfd", "pidfd", "inotify"; "" for other descriptors.
func (f FDInfo) AnonType() string {
	t, ok := strings.CutPrefix(f.Target, "anon_inode:")
	if !ok {
		return ""
	}
	if len(t) >= 2 && t[0] == '[' && t[len(t)-1] == ']' {
		t = t[1 : len(t)-1]
	}
	return t
}

// Describe returns a readable name of the descriptor's kind: the anon inode
// type for anonymous inodes (e.g. "eventfd"), else Kind.String().
func (f FDInfo) Describe() string {
	if t := f.AnonType(); t != "" {
		return t
	}
	return f.Kind.String()
}

// FDs lists the open file descriptors of pid, sorted by number. Descriptors
// that are closed while FDs runs are left out.
func FDs(pid int) ([]FDInfo, error) {
	dir := procPath(pid, "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list fds of %d: %w", pid, err)
	}
	fds := make([]FDInfo, 0, len(ents))
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			return nil, fmt.Errorf("list fds of %d: bad entry %q", pid, e.Name())
		}
		fi, err := readFD(pid, n)
		if errors.Is(err, unix.ENOENT) {
			continue // closed meanwhile
		}
		if err != nil {
			return nil, err
		}
		fds = append(fds, fi)
	}
	slices.SortFunc(fds, func(a, b FDInfo) int { return a.Num - b.Num })
	return fds, nil
}

// readFD collects what FDs reports about descriptor n of pid.
func readFD(pid, n int) (FDInfo, error) {
	fi := FDInfo{Num: n}
	link := procPath(pid, "fd/"+strconv.Itoa(n))
	var err error
	if fi.Target, err = os.Readlink(link); err != nil {
		return fi, fmt.Errorf("fd %d of %d: %w", n, pid, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(link, &st); err != nil {
		return fi, fmt.Errorf("fd %d of %d: stat: %w", n, pid, err)
	}
	fi.File = fileIDOf(&st)
	info, err := os.ReadFile(procPath(pid, "fdinfo/"+strconv.Itoa(n)))
	if err != nil {
		return fi, fmt.Errorf("fd %d of %d: read fdinfo: %w", n, pid, err)
	}
	if fi.Pos, fi.Flags, err = parseFDInfo(info); err != nil {
		return fi, fmt.Errorf("fd %d of %d: %w", n, pid, err)
	}
	fi.Cloexec = fi.Flags&unix.O_CLOEXEC != 0
	fi.Kind, fi.SocketInode = classifyFD(fi.Target, st.Mode)
	switch fi.AnonType() {
	case "eventfd":
		if fi.Eventfd, err = parseEventfd(info); err != nil {
			return fi, fmt.Errorf("fd %d of %d: %w", n, pid, err)
		}
	case "eventpoll":
		if fi.Epoll, err = parseEpoll(info); err != nil {
			return fi, fmt.Errorf("fd %d of %d: %w", n, pid, err)
		}
	}
	return fi, nil
}

// parseEventfd extracts the "eventfd-count:" (hex), "eventfd-id:" and
// "eventfd-semaphore:" lines of an eventfd's fdinfo.
func parseEventfd(data []byte) (EventfdState, error) {
	var e EventfdState
	haveCount := false
	for _, line := range strings.Split(string(data), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		val = strings.TrimSpace(val)
		var err error
		switch key {
		case "eventfd-count":
			e.Count, err = strconv.ParseUint(val, 16, 64)
			haveCount = true
		case "eventfd-id":
			e.ID, err = strconv.ParseUint(val, 10, 64)
		case "eventfd-semaphore":
			e.Semaphore = val == "1"
		}
		if err != nil {
			return e, fmt.Errorf("fdinfo %s %q: %w", key, val, err)
		}
	}
	if !haveCount {
		return e, fmt.Errorf("eventfd fdinfo without eventfd-count")
	}
	return e, nil
}

// parseEpoll extracts the "tfd:" lines of an epoll instance's fdinfo:
// "tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x".
func parseEpoll(data []byte) ([]EpollTarget, error) {
	var out []EpollTarget
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.HasPrefix(line, "tfd:") {
			continue
		}
		f := strings.Fields(line)
		var t EpollTarget
		have := 0
		for i := 0; i+1 < len(f); i++ {
			var err error
			switch f[i] {
			case "tfd:":
				var v int64
				v, err = strconv.ParseInt(f[i+1], 10, 32)
				t.TFD = int(v)
				have++
			case "events:":
				var v uint64
				v, err = strconv.ParseUint(f[i+1], 16, 32)
				t.Events = uint32(v)
				have++
			case "data:":
				t.Data, err = strconv.ParseUint(f[i+1], 16, 64)
				have++
			}
			if err != nil {
				return nil, fmt.Errorf("epoll fdinfo %q: %w", line, err)
			}
			if v, ok := strings.CutPrefix(f[i], "ino:"); ok {
				t.Ino, _ = strconv.ParseUint(v, 16, 64)
			}
		}
		if have != 3 || t.TFD < 0 {
			return nil, fmt.Errorf("epoll fdinfo: malformed line %q", line)
		}
		out = append(out, t)
	}
	return out, nil
}

// parseFDInfo extracts the decimal "pos:" and octal "flags:" lines of a
// /proc/PID/fdinfo/N file.
func parseFDInfo(data []byte) (pos int64, flags uint32, err error) {
	var havePos, haveFlags bool
	for _, line := range strings.Split(string(data), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		val = strings.TrimSpace(val)
		switch key {
		case "pos":
			if pos, err = strconv.ParseInt(val, 10, 64); err != nil {
				return 0, 0, fmt.Errorf("fdinfo pos %q: %w", val, err)
			}
			havePos = true
		case "flags":
			f, err := strconv.ParseUint(val, 8, 32)
			if err != nil {
				return 0, 0, fmt.Errorf("fdinfo flags %q: %w", val, err)
			}
			flags, haveFlags = uint32(f), true
		}
	}
	if !havePos || !haveFlags {
		return 0, 0, fmt.Errorf("fdinfo without pos or flags")
	}
	return pos, flags, nil
}

// classifyFD derives the kind of a descriptor from its link target and the
// mode of the open file.
func classifyFD(target string, mode uint32) (FDKind, uint64) {
	switch {
	case strings.HasPrefix(target, "socket:["):
		ino, _ := strconv.ParseUint(strings.TrimSuffix(target[len("socket:["):], "]"), 10, 64)
		return FDSocket, ino
	case strings.HasPrefix(target, "pipe:["):
		return FDPipe, 0
	case strings.HasPrefix(target, "anon_inode:"):
		return FDAnonInode, 0
	case strings.HasPrefix(target, "/memfd:"):
		return FDMemfd, 0
	}
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		if strings.HasSuffix(target, deletedSuffix) {
			return FDDeleted, 0
		}
		return FDRegular, 0
	case unix.S_IFDIR:
		return FDDir, 0
	case unix.S_IFCHR:
		return FDCharDev, 0
	case unix.S_IFBLK:
		return FDBlockDev, 0
	case unix.S_IFIFO:
		return FDPipe, 0
	case unix.S_IFSOCK:
		return FDSocket, 0
	}
	return FDOther, 0
}
