package procfs

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Status holds the fields of /proc/PID/status that mitosis uses.
type Status struct {
	// Threads is the number of threads.
	Threads int
	// TracerPid is the pid of the ptrace tracer, 0 if none.
	TracerPid int
	// SigBlk, SigIgn and SigCgt are the blocked, ignored and caught signal
	// masks (bit n-1 is signal n) of the thread the file was read through.
	SigBlk, SigIgn, SigCgt uint64
	// Uid and Gid are the real, effective, saved and filesystem ids.
	Uid, Gid [4]uint32
	// Groups are the supplementary groups.
	Groups []uint32
	// Umask is the file mode creation mask; 0o022 when the kernel does not
	// report it.
	Umask uint32
	// State is the state line's value, e.g. "S (sleeping)".
	State string
	// VmSize is the total mapped size in bytes (0 for kernel threads).
	VmSize uint64
	// NSpid is the process's (or thread's) id in each PID namespace it is
	// in, from the reader's namespace (first) to its own (last).
	NSpid []int
	// CapPrm and CapEff are the permitted and effective capability sets
	// (bit n is capability n).
	CapPrm, CapEff uint64
}

// defaultUmask is Status.Umask when the file has no Umask line.
const defaultUmask = 0o022

// ReadStatus reads and parses /proc/PID/status.
func ReadStatus(pid int) (Status, error) {
	data, err := os.ReadFile(procPath(pid, "status"))
	if err != nil {
		return Status{}, fmt.Errorf("read status of %d: %w", pid, err)
	}
	st, err := ParseStatus(data)
	if err != nil {
		return Status{}, fmt.Errorf("status of %d: %w", pid, err)
	}
	return st, nil
}

// ParseStatus parses the contents of a /proc/PID/status file. The State,
// Threads, TracerPid, Uid, Gid, SigBlk, SigIgn and SigCgt lines are required;
// unknown lines are ignored.
func ParseStatus(data []byte) (Status, error) {
	st := Status{Umask: defaultUmask}
	const (
		hasState = 1 << iota
		hasThreads
		hasTracer
		hasUid
		hasGid
		hasSigBlk
		hasSigIgn
		hasSigCgt
		hasAll = 1<<iota - 1
	)
	seen := 0
	for lineNo, line := range strings.Split(string(bytes.TrimSuffix(data, []byte("\n"))), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			if line == "" {
				continue
			}
			return Status{}, fmt.Errorf("status line %d %q: no colon", lineNo+1, truncate(line, 80))
		}
		val = strings.TrimSpace(val)
		var err error
		switch key {
		case "NSpid":
			for _, f := range strings.Fields(val) {
				n, perr := strconv.Atoi(f)
				if perr != nil {
					err = perr
					break
				}
				st.NSpid = append(st.NSpid, n)
			}
		case "State":
			st.State, seen = val, seen|hasState
			if val == "" {
				err = fmt.Errorf("empty")
			}
		case "Threads":
			st.Threads, err = strconv.Atoi(val)
			seen |= hasThreads
		case "TracerPid":
			st.TracerPid, err = strconv.Atoi(val)
			seen |= hasTracer
		case "Uid":
			st.Uid, err = parseIDs(val)
			seen |= hasUid
		case "Gid":
			st.Gid, err = parseIDs(val)
			seen |= hasGid
		case "Groups":
			st.Groups, err = parseGroups(val)
		case "Umask":
			var v uint64
			v, err = strconv.ParseUint(val, 8, 32)
			st.Umask = uint32(v)
		case "VmSize":
			var v uint64
			v, err = strconv.ParseUint(strings.TrimSuffix(val, " kB"), 10, 64)
			st.VmSize = v << 10
		case "CapPrm":
			st.CapPrm, err = strconv.ParseUint(val, 16, 64)
		case "CapEff":
			st.CapEff, err = strconv.ParseUint(val, 16, 64)
		case "SigBlk":
			st.SigBlk, err = strconv.ParseUint(val, 16, 64)
			seen |= hasSigBlk
		case "SigIgn":
			st.SigIgn, err = strconv.ParseUint(val, 16, 64)
			seen |= hasSigIgn
		case "SigCgt":
			st.SigCgt, err = strconv.ParseUint(val, 16, 64)
			seen |= hasSigCgt
		}
		if err != nil {
			return Status{}, fmt.Errorf("status line %d %q: %w", lineNo+1, truncate(line, 80), err)
		}
	}
	if seen != hasAll {
		var missing []string
		for i, name := range []string{"State", "Threads", "TracerPid", "Uid", "Gid", "SigBlk", "SigIgn", "SigCgt"} {
			if seen&(1<<i) == 0 {
				missing = append(missing, name)
			}
		}
		return Status{}, fmt.Errorf("status: missing %s", strings.Join(missing, ", "))
	}
	return st, nil
}

// parseIDs parses the four tab separated ids of a Uid or Gid line.
func parseIDs(s string) ([4]uint32, error) {
	var ids [4]uint32
	f := strings.Fields(s)
	if len(f) != 4 {
		return ids, fmt.Errorf("want 4 ids, got %d", len(f))
	}
	for i, x := range f {
		v, err := strconv.ParseUint(x, 10, 32)
		if err != nil {
			return ids, err
		}
		ids[i] = uint32(v)
	}
	return ids, nil
}

// parseGroups parses the space separated ids of a Groups line.
func parseGroups(s string) ([]uint32, error) {
	f := strings.Fields(s)
	gs := make([]uint32, 0, len(f))
	for _, x := range f {
		v, err := strconv.ParseUint(x, 10, 32)
		if err != nil {
			return nil, err
		}
		gs = append(gs, uint32(v))
	}
	return gs, nil
}
