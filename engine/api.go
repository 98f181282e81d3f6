// Package engine is the single-host remote-fork engine: it prepares live
// processes into seeds and forks children from them, paging memory in on
// demand. It ties together the tracer (internal/ptrace), snapshot (prepare),
// restore and pager packages. A node daemon owns one Engine.
package engine

import (
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/pager"
)

// PrepareOptions tune Prepare.
type PrepareOptions struct {
	// Name is a human-readable seed name (optional).
	Name string
	// ChannelFD is the parent's fd number of its connection to the node
	// daemon when the parent prepares itself through the client API, or -1.
	// It is not refused like other sockets: every child gets a fresh
	// connection at the same number.
	ChannelFD int
}

// ForkOptions tune Fork.
type ForkOptions struct {
	// Stdio are the child's stdin, stdout and stderr. A nil entry becomes
	// /dev/null.
	Stdio [3]*os.File
	// Channel, if the seed has a channel fd, is installed in the child at
	// that fd number. The caller keeps the other end.
	Channel *os.File
	// Eager copies every present page before the child runs (the
	// checkpoint/restore baseline) instead of paging on demand.
	Eager bool
	// Prefetch maps the seed's recorded working set (the pages earlier
	// children touched) into the child before it runs, fetching into the
	// node's page cache what it does not hold yet, so the child takes
	// fewer faults. Now and then a prefetching fork runs without it (a
	// probe: one in 8, growing rarer while probes agree): the pages its
	// faults bring in are what such a child needs, and the working set a
	// prefetch maps is what each of the last two probes touched, so it
	// follows what children do now instead of growing to everything any
	// child ever touched.
	Prefetch bool
	// Root, if set, runs the child in a container of its own: new mount,
	// (A seed whose parent runs chrooted, in an image, gets containerized
	// children in that image by default.)
	// PID, UTS and IPC namespaces, chrooted to Root, which must hold the
	// image the parent runs from (the parent's paths are resolved inside
	// it; a mapped file that differs fails the fork, naming the file).
	// The child is PID 1 of its PID namespace.
	Root string
	// Hostname is the child's hostname in its UTS namespace (with Root;
	// default: the child's id).
	Hostname string
	// OnSpawn, if set, is called with the child's pid right after its
	// process exists and before it runs any of the parent's code (e.g. to
	// move it into a cgroup). An error fails the fork.
	OnSpawn func(pid int) error
	// NoCache pages the child by copying from the frozen copy
	// (UFFDIO_COPY) instead of mapping the node's shared page cache. For
	// comparisons; slower and uses more memory.
	NoCache bool
}

// Seed is a prepared parent: its descriptor plus its frozen copy-on-write
// copy, which stays stopped as the page source.
type Seed struct {
	ID        string
	Name      string
	Desc      *descriptor.Descriptor
	SourcePID int           // pid of the frozen copy
	ParentPID int           // pid of the prepared parent
	Created   time.Time     // when Prepare finished
	Took      time.Duration // Prepare wall time
	// Origin is the node that holds the seed's page source, "" for a
	// seed prepared on this node.
	Origin string

	src      pager.Source
	imported []descriptor.Run // working set received with an imported seed

	cacheMu    sync.Mutex
	cache      *pager.Cache
	remoteRuns []descriptor.Run   // pages served to other nodes
	sinceProbe int                // prefetching forks since the last probe
	probeGap   int                // prefetching forks from one probe to the next (0: probeEvery)
	probes     [][]descriptor.Run // what the last keptProbes probes touched
	probeSet   []descriptor.Run   // what each of them touched (read-only once set)
}

// CacheBytes is the memory the node's page cache of the seed takes (with
// the huge-page cache, whole 2 MiB folios: pager.Cache.Allocated).
func (s *Seed) CacheBytes() uint64 {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	if s.cache == nil {
		return 0
	}
	return s.cache.Allocated()
}

// ChildStats are counters of one child's paging.
type ChildStats struct {
	Faults      uint64 // missing-page faults served
	PagesCopied uint64
	PagesZero   uint64
	PagesShared uint64 // mapped from the node's shared page cache
	// PagesFetched are pages this child's faults brought into the node's
	// page cache from the seed's source (the local frozen copy, or the
	// origin node over the network).
	PagesFetched uint64
	Eager        uint64 // pages copied before the child ran
	// Spaces counts the address spaces paged: the child's and one per
	// fork in its tree; SpacesLive those of processes still running
	// (0 once the tree has ended).
	Spaces, SpacesLive uint64
}

// Child is a process forked from a seed on this host.
type Child struct {
	ID  string
	PID int
	// Seed is the seed it was forked from; nil once TreeDone is closed
	// (a record of the child must not keep a removed seed alive).
	Seed    *Seed
	Started time.Time
	Took    time.Duration // Fork wall time until the child was released

	done   chan struct{}
	tree   chan struct{} // closed when the child's whole process group is gone
	status syscall.WaitStatus
	pg     statser
	space  *pager.Space // the child's address space; nil once TreeDone is closed
	probe  bool         // forked without its prefetch, to learn the working set

	mu  sync.Mutex
	err error
}

func (c *Child) setErr(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
}

// Err is the engine-side error that ended the child (e.g. its pages could
// not be served), or nil.
func (c *Child) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

type statser interface{ Stats() ChildStats }

// Done is closed when the child has exited and been reaped.
func (c *Child) Done() <-chan struct{} { return c.done }

// TreeDone is closed when the child and every process it forked (its
// process group) have exited and its pager has stopped.
func (c *Child) TreeDone() <-chan struct{} { return c.tree }

// Kill sends sig to the child's process group (the child and what it
// forked) and to the child itself.
func (c *Child) Kill(sig syscall.Signal) {
	_ = syscall.Kill(-c.PID, sig)
	_ = syscall.Kill(c.PID, sig)
}

// Status is the child's wait status; valid after Done is closed.
func (c *Child) Status() syscall.WaitStatus { return c.status }

// Stats returns paging counters of the child's whole process tree.
func (c *Child) Stats() ChildStats {
	c.mu.Lock()
	pg := c.pg
	c.mu.Unlock()
	if pg == nil {
		return ChildStats{}
	}
	return pg.Stats()
}
