// Package testenv holds set-up shared by the tests and benchmarks that
// start real processes.
package testenv

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// CloseInheritedFDs marks every descriptor above stderr close-on-exec, so
// processes this one starts hold only what it gives them. mitosis refuses
// to prepare a process holding a pipe or socket other than its stdio, and
// test runners and CI often leak one (fd 251 here). The flag is per
// descriptor-table entry: the fds stay usable by this process.
func CloseInheritedFDs() error {
	if err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err == nil {
		return nil
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 {
			continue
		}
		// The directory listing's own fd is gone by now: ignore EBADF.
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil && err != unix.EBADF {
			return fmt.Errorf("set close-on-exec on fd %d: %w", fd, err)
		}
	}
	return nil
}
