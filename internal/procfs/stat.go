package procfs

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Stat holds the fields of /proc/PID/stat that mitosis uses (see proc(5);
// the numbers in comments are the 1-based field numbers there).
type Stat struct {
	// State is the process state character (3), e.g. 'R', 'S', 't', 'Z'.
	State byte
	// PPid is the parent's pid (4).
	PPid int
	// PGrp is the process group id (5).
	PGrp int
	// NumThreads is the number of threads (20).
	NumThreads int
	// StartTime is when the process started, in clock ticks after boot
	// (22): with the pid, it names one process (pids are reused).
	StartTime uint64
	// RSSPages is the resident set size in pages (24).
	RSSPages int
	// StartCode and EndCode delimit the program text (26, 27).
	StartCode, EndCode uint64
	// StartStack is the bottom of the main thread's stack (28).
	StartStack uint64
	// StartData and EndData delimit initialized and uninitialized data (45, 46).
	StartData, EndData uint64
	// StartBrk is the start of the heap (47).
	StartBrk uint64
	// ArgStart and ArgEnd delimit the command line arguments (48, 49).
	ArgStart, ArgEnd uint64
	// EnvStart and EnvEnd delimit the environment (50, 51).
	EnvStart, EnvEnd uint64
}

// statMinFields is the number of fields ParseStat needs (up to env_end).
const statMinFields = 51

// ReadStat reads and parses /proc/PID/stat.
func ReadStat(pid int) (Stat, error) {
	data, err := os.ReadFile(procPath(pid, "stat"))
	if err != nil {
		return Stat{}, fmt.Errorf("read stat of %d: %w", pid, err)
	}
	st, err := ParseStat(data)
	if err != nil {
		return Stat{}, fmt.Errorf("stat of %d: %w", pid, err)
	}
	return st, nil
}

// ParseStat parses the contents of a /proc/PID/stat file. The command name
// (field 2) may contain spaces and parentheses: it ends at the last ')'.
func ParseStat(data []byte) (Stat, error) {
	var st Stat
	data = bytes.TrimSuffix(data, []byte("\n"))
	open := bytes.IndexByte(data, '(')
	closing := bytes.LastIndexByte(data, ')')
	if open < 0 || closing < open {
		return st, fmt.Errorf("stat: no (comm) field")
	}
	if _, err := strconv.Atoi(strings.TrimSuffix(string(data[:open]), " ")); err != nil {
		return st, fmt.Errorf("stat: bad pid %q: %w", truncate(string(data[:open]), 40), err)
	}
	rest := data[closing+1:]
	if !bytes.HasPrefix(rest, []byte(" ")) {
		return st, fmt.Errorf("stat: no space after comm")
	}
	// fields[0] is field 3 (state).
	fields := strings.Split(string(rest[1:]), " ")
	if len(fields)+2 < statMinFields {
		return st, fmt.Errorf("stat: %d fields, want at least %d", len(fields)+2, statMinFields)
	}
	get := func(n int) string { return fields[n-3] }

	if s := get(3); len(s) != 1 {
		return st, fmt.Errorf("stat: bad state %q", truncate(s, 40))
	}
	st.State = get(3)[0]

	var err error
	atoi := func(n int, name string) int {
		if err != nil {
			return 0
		}
		v, e := strconv.Atoi(get(n))
		if e != nil {
			err = fmt.Errorf("stat: bad %s (field %d): %w", name, n, e)
		}
		return v
	}
	atou := func(n int, name string) uint64 {
		if err != nil {
			return 0
		}
		v, e := strconv.ParseUint(get(n), 10, 64)
		if e != nil {
			err = fmt.Errorf("stat: bad %s (field %d): %w", name, n, e)
		}
		return v
	}
	st.PPid = atoi(4, "ppid")
	st.PGrp = atoi(5, "pgrp")
	st.NumThreads = atoi(20, "num_threads")
	st.StartTime = atou(22, "starttime")
	st.RSSPages = atoi(24, "rss")
	st.StartCode = atou(26, "startcode")
	st.EndCode = atou(27, "endcode")
	st.StartStack = atou(28, "startstack")
	st.StartData = atou(45, "start_data")
	st.EndData = atou(46, "end_data")
	st.StartBrk = atou(47, "start_brk")
	st.ArgStart = atou(48, "arg_start")
	st.ArgEnd = atou(49, "arg_end")
	st.EnvStart = atou(50, "env_start")
	st.EnvEnd = atou(51, "env_end")
	if err != nil {
		return Stat{}, err
	}
	return st, nil
}
