package node

import (
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/internal/procfs"
)

// Memory of function processes, for the node's stats (polled by every
// gateway, by default every 5 s): Σ Pss of a function's processes. A Pss
// costs the kernel a walk of the process's page tables (smaps_rollup:
// about a millisecond per few hundred megabytes mapped), so a node with
// many large instances would spend a good part of a CPU on its stats. A
// process's last Pss is reused while the process is the same (pid and
// start time), its resident size (read in O(1) from /proc/PID/stat) has
// not moved by more than 1/16, and the measure is younger than pssMaxAge.
// What drifts unseen in the meantime is the share of pages other
// processes map too (a sibling exiting raises a child's Pss): bounded by
// pssMaxAge.
type pssCache struct {
	read func(pid int) (procfs.Smaps, error) // procfs.ReadSmaps; tests count calls

	mu sync.Mutex
	m  map[int]pssEntry
}

type pssEntry struct {
	start uint64 // the process's start time (ticks after boot)
	rss   int    // its resident pages when measured
	pss   uint64
	at    time.Time
}

// pssMaxAge bounds how long a process's Pss is reused.
const pssMaxAge = 30 * time.Second

func newPssCache() *pssCache {
	return &pssCache{read: procfs.ReadSmaps, m: map[int]pssEntry{}}
}

// pss returns pid's proportional set size in bytes, measured anew or
// reused (see pssCache); false if the process is gone.
func (c *pssCache) pss(pid int, now time.Time) (uint64, bool) {
	st, err := procfs.ReadStat(pid)
	if err != nil {
		return 0, false
	}
	c.mu.Lock()
	e, ok := c.m[pid]
	c.mu.Unlock()
	if ok && e.start == st.StartTime && now.Sub(e.at) < pssMaxAge && near(e.rss, st.RSSPages) {
		return e.pss, true
	}
	sm, err := c.read(pid)
	if err != nil {
		return 0, false
	}
	c.mu.Lock()
	c.m[pid] = pssEntry{start: st.StartTime, rss: st.RSSPages, pss: sm.Pss, at: now}
	c.mu.Unlock()
	return sm.Pss, true
}

// keepOnly forgets every process not in live.
func (c *pssCache) keepOnly(live map[int]bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for pid := range c.m {
		if !live[pid] {
			delete(c.m, pid)
		}
	}
}

// near reports whether resident sizes a and b (pages) differ by at most a
// sixteenth of the larger.
func near(a, b int) bool {
	d := a - b
	if d < 0 {
		d = -d
	}
	return d <= max(a, b)/16
}
