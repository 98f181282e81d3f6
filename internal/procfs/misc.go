package procfs

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"

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

// Limit is one resource limit of a process (RLIM_INFINITY as ^uint64(0)).
type Limit struct {
	Resource int
	Cur, Max uint64
}

// Limits reads /proc/PID/limits. Unlike prlimit(2) on another process it
// needs no CAP_SYS_RESOURCE when the target's credentials differ.
func Limits(pid int) ([]Limit, error) {
	b, err := os.ReadFile(procPath(pid, "limits"))
	if err != nil {
		return nil, fmt.Errorf("read limits of %d: %w", pid, err)
	}
	ls, err := ParseLimits(b)
	if err != nil {
		return nil, fmt.Errorf("limits of %d: %w", pid, err)
	}
	return ls, nil
}

// ParseLimits parses /proc/PID/limits: after the header, one line per
// resource in RLIMIT_* order, columns at fixed offsets (name 26 bytes,
// soft and hard limit 21 bytes each).
func ParseLimits(data []byte) ([]Limit, error) {
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) < 1 || !strings.HasPrefix(lines[0], "Limit") {
		return nil, fmt.Errorf("no header")
	}
	var out []Limit
	for i, l := range lines[1:] {
		if len(l) < 26+21 {
			return nil, fmt.Errorf("line %d %q: too short", i+2, truncate(l, 80))
		}
		f := strings.Fields(l[26:])
		if len(f) < 2 {
			return nil, fmt.Errorf("line %d %q: no limits", i+2, truncate(l, 80))
		}
		parse := func(s string) (uint64, error) {
			if s == "unlimited" {
				return ^uint64(0), nil
			}
			return strconv.ParseUint(s, 10, 64)
		}
		cur, err := parse(f[0])
		if err != nil {
			return nil, fmt.Errorf("line %d: soft limit: %w", i+2, err)
		}
		max, err := parse(f[1])
		if err != nil {
			return nil, fmt.Errorf("line %d: hard limit: %w", i+2, err)
		}
		out = append(out, Limit{Resource: i, Cur: cur, Max: max})
	}
	return out, nil
}

// Tasks returns the thread ids of process pid (/proc/PID/task), sorted.
func Tasks(pid int) ([]int, error) {
	ents, err := os.ReadDir(procPath(pid, "task"))
	if err != nil {
		return nil, fmt.Errorf("list threads of %d: %w", pid, err)
	}
	tids := make([]int, 0, len(ents))
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	sort.Ints(tids)
	return tids, nil
}
