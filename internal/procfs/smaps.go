package procfs

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Smaps is the memory accounting of one process from
// /proc/PID/smaps_rollup, in bytes.
type Smaps struct {
	Rss, Pss, SharedClean, SharedDirty, PrivateClean, PrivateDirty uint64
}

// Private is the memory only this process maps.
func (s Smaps) Private() uint64 { return s.PrivateClean + s.PrivateDirty }

// Shared is the memory this process maps together with others.
func (s Smaps) Shared() uint64 { return s.SharedClean + s.SharedDirty }

// Add adds o's counters to s.
func (s *Smaps) Add(o Smaps) {
	s.Rss += o.Rss
	s.Pss += o.Pss
	s.SharedClean += o.SharedClean
	s.SharedDirty += o.SharedDirty
	s.PrivateClean += o.PrivateClean
	s.PrivateDirty += o.PrivateDirty
}

// ReadSmaps reads /proc/PID/smaps_rollup. The kernel walks the process's
// page tables to produce it: about a millisecond per 100 MB mapped.
func ReadSmaps(pid int) (Smaps, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return Smaps{}, err
	}
	return ParseSmaps(pid, b)
}

// ParseSmaps parses the contents of a smaps_rollup file of pid.
func ParseSmaps(pid int, b []byte) (Smaps, error) {
	var s Smaps
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) < 1 {
			continue
		}
		kb, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			continue
		}
		switch k {
		case "Rss":
			s.Rss = kb << 10
		case "Pss":
			s.Pss = kb << 10
		case "Shared_Clean":
			s.SharedClean = kb << 10
		case "Shared_Dirty":
			s.SharedDirty = kb << 10
		case "Private_Clean":
			s.PrivateClean = kb << 10
		case "Private_Dirty":
			s.PrivateDirty = kb << 10
		}
	}
	if s.Rss == 0 {
		return s, fmt.Errorf("/proc/%d/smaps_rollup: no Rss", pid)
	}
	return s, nil
}

// ReadMemTotal returns the machine's RAM (MemTotal of /proc/meminfo) in
// bytes.
func ReadMemTotal() (uint64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				kb, err := strconv.ParseUint(f[0], 10, 64)
				if err == nil {
					return kb << 10, nil
				}
			}
		}
	}
	return 0, fmt.Errorf("/proc/meminfo: no MemTotal")
}
