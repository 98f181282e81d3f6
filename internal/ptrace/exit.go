package ptrace

import (
	"encoding/binary"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ReapExit waits until pid, a child of this process, has exited and reaps
// it, returning its wait status. Unlike wait4 on the pid it never consumes
// a ptrace-stop: while a child of ours is also our tracee (a process being
// prepared, or prepared from a child), wait4 from another thread would
// steal the tracer's events. pidfd may be nil (it is opened here then);
// ReapExit closes it.
func ReapExit(pid int, pidfd *os.File) unix.WaitStatus {
	if pidfd == nil {
		if fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK); err == nil {
			pidfd = os.NewFile(uintptr(fd), "pidfd")
		}
	}
	if pidfd != nil {
		waitExitFD(pidfd, pid)
		pidfd.Close()
	}
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(pid, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			// Reaped by the tracer (it died while being traced).
			ws = unix.WaitStatus(unix.SIGKILL)
		}
		return ws
	}
}

// waitExitFD returns once pid has exited (it is then a zombie, or already
// reaped), without consuming any other wait event. It waits on the pidfd
// and, as a safety net, also checks with waitid(WEXITED|WNOWAIT).
func waitExitFD(pidfd *os.File, pid int) {
	rc, err := pidfd.SyscallConn()
	if err != nil {
		return
	}
	// The pidfd is edge-triggered in the netpoller; a wake-up that comes
	// before the exit is complete can be missed, so the wait is also
	// bounded, backing off from 5 ms to 200 ms between waitid checks.
	wait := 5 * time.Millisecond
	for {
		_ = pidfd.SetReadDeadline(time.Now().Add(wait))
		wait = min(2*wait, 200*time.Millisecond)
		first := true
		err := rc.Read(func(uintptr) bool {
			if first {
				first = false
				return false // park until readable: the process exited
			}
			return true
		})
		if err == nil {
			return
		}
		var info unix.Siginfo
		if e := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil); e != nil {
			return // ECHILD: reaped elsewhere
		}
		if pidOf(&info) == pid && (info.Code == cldExited || info.Code == cldKilled || info.Code == cldDumped) {
			return
		}
	}
}

// si_code values of SIGCHLD.
const (
	cldExited = 1
	cldKilled = 2
	cldDumped = 3
)

// pidOf returns si_pid of a SIGCHLD siginfo.
func pidOf(info *unix.Siginfo) int {
	// si_pid is the first int of the union after the 16-byte header.
	b := (*[128]byte)(unsafe.Pointer(info))
	return int(int32(binary.LittleEndian.Uint32(b[16:])))
}
