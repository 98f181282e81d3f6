package procfs

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Auxv returns the raw bytes of /proc/PID/auxv (pairs of native words).
func Auxv(pid int) ([]byte, error) {
	b, err := os.ReadFile(procPath(pid, "auxv"))
	if err != nil {
		return nil, fmt.Errorf("read auxv of %d: %w", pid, err)
	}
	return b, nil
}

// Exe returns the target of the /proc/PID/exe link.
func Exe(pid int) (string, error) {
	s, err := os.Readlink(procPath(pid, "exe"))
	if err != nil {
		return "", fmt.Errorf("read exe of %d: %w", pid, err)
	}
	return s, nil
}

// Cwd returns the target of the /proc/PID/cwd link.
func Cwd(pid int) (string, error) {
	s, err := os.Readlink(procPath(pid, "cwd"))
	if err != nil {
		return "", fmt.Errorf("read cwd of %d: %w", pid, err)
	}
	return s, nil
}

// FileID identifies a version of a file, as reported by stat(2).
type FileID struct {
	// Dev and Ino are the device and inode numbers.
	Dev, Ino uint64
	// Size is the size in bytes.
	Size int64
	// MtimeNsec is the modification time in nanoseconds since the epoch.
	MtimeNsec int64
}

// StatFileID stats path, following symbolic links (including the magic
// links of /proc/PID/fd and /proc/PID/map_files).
func StatFileID(path string) (FileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return FileID{}, fmt.Errorf("stat %s: %w", path, err)
	}
	return fileIDOf(&st), nil
}

// fileIDOf converts a stat result to a FileID.
func fileIDOf(st *unix.Stat_t) FileID {
	return FileID{Dev: st.Dev, Ino: st.Ino, Size: st.Size, MtimeNsec: st.Mtim.Nano()}
}
