package pager

import (
	"fmt"
	"math/bits"
	"os"
	"slices"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
)

// Cache is a node's page cache for one seed: a memfd that holds the seed's
// lazily paged memory at fixed offsets, filled from the Source on first use.
//
// Children map it MAP_PRIVATE at their VMAs' addresses and register those
// ranges for MISSING and MINOR userfaultfd faults. A page crosses from the
// source into the cache once per node; after that every child maps the same
// page-cache page (UFFDIO_CONTINUE, read-only, copy-on-write on a write), so
// clean pages are shared between children instead of copied into each.
type Cache struct {
	src     Source
	present []descriptor.Run
	fd      int
	path    string
	slots   []slot
	buf     []byte // staging buffer for fills, under mu

	mu     sync.Mutex
	filled map[uint64]uint64 // bitset of image pages present in the cache
	bytes  atomic.Uint64
}

type slot struct{ start, end, off uint64 }

// imageSpan is the memfd's i_size: larger than any image, so a child that
// grows a mapping with mremap never runs past EOF (which would be SIGBUS
// before userfaultfd could intervene). The file is sparse.
const imageSpan = 1 << 40

// CacheBacked reports whether a VMA's memory is served through a Cache:
// private anonymous memory and written private file mappings, except the
// main stack (MAP_GROWSDOWN needs an anonymous mapping).
func CacheBacked(v descriptor.VMA) bool {
	return (v.Kind == descriptor.KindAnon || v.Kind == descriptor.KindFileDirty) &&
		v.Flags&descriptor.FlagGrowsDown == 0
}

// NewCache creates an empty cache for d's memory, filled from src.
func NewCache(d *descriptor.Descriptor, src Source) (*Cache, error) {
	c := &Cache{src: src, present: d.Present, fd: -1, filled: map[uint64]uint64{}}
	var off uint64
	for _, v := range d.VMAs {
		if CacheBacked(v) {
			c.slots = append(c.slots, slot{v.Start, v.End, off})
			off += v.End - v.Start
		}
	}
	fd, err := unix.MemfdCreate(descriptor.CacheMemfdPrefix+d.SeedID, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("page cache memfd: %w", err)
	}
	c.fd = fd
	c.path = fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), fd)
	if err := unix.Ftruncate(fd, imageSpan); err != nil {
		c.Close()
		return nil, fmt.Errorf("page cache size: %w", err)
	}
	return c, nil
}

// Path is a path any process of this host (with ptrace access to the daemon)
// can open to map the cache.
func (c *Cache) Path() string { return c.path }

// Offset returns the cache offset of the seed address src.
func (c *Cache) Offset(src uint64) (uint64, bool) {
	i := sort.Search(len(c.slots), func(i int) bool { return c.slots[i].end > src })
	if i < len(c.slots) && c.slots[i].start <= src {
		return c.slots[i].off + (src - c.slots[i].start), true
	}
	return 0, false
}

// Bytes is how much of the seed's memory the cache holds.
func (c *Cache) Bytes() uint64 { return c.bytes.Load() }

// Ensure fills the cache for the n source-present pages at src (which must
// lie in one slot) that it does not hold yet, and returns how many pages it
// fetched from the source.
func (c *Cache) Ensure(src uint64, n int) (int, error) {
	off, ok := c.Offset(src)
	if !ok {
		return 0, fmt.Errorf("page cache: address %#x is not cached memory", src)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.errClosed(); err != nil {
		return 0, err
	}
	fetched := 0
	for i := 0; i < n; {
		pg := off/pageSize + uint64(i)
		if c.filled[pg>>6]&(1<<(pg&63)) != 0 {
			i++
			continue
		}
		j := i + 1
		for j < n {
			q := off/pageSize + uint64(j)
			if c.filled[q>>6]&(1<<(q&63)) != 0 {
				break
			}
			j++
		}
		// Staged through a buffer and pwrite(2): measured 1.7x faster
		// than process_vm_readv straight into a shared mapping of the
		// memfd (which takes a page fault per page).
		o := off + uint64(i)*pageSize
		size := (j - i) * pageSize
		if len(c.buf) < size {
			c.buf = make([]byte, max(size, 64*pageSize))
		}
		b := c.buf[:size]
		if err := c.src.ReadPages(src+uint64(i)*pageSize, b); err != nil {
			return fetched, err
		}
		if _, err := unix.Pwrite(c.fd, b, int64(o)); err != nil {
			return fetched, fmt.Errorf("page cache write: %w", err)
		}
		fetched += j - i
		for k := i; k < j; k++ {
			q := off/pageSize + uint64(k)
			c.filled[q>>6] |= 1 << (q & 63)
		}
		c.bytes.Add(uint64(j-i) * pageSize)
		i = j
	}
	return fetched, nil
}

// Filled returns the runs of seed addresses the cache holds: the working
// set the seed's children on this node have touched so far. Its cost is in
// the pages held, not the size of the seed's address space (a prefetching
// fork asks for it every time).
func (c *Cache) Filled() []descriptor.Run {
	c.mu.Lock()
	words := make([]uint64, 0, len(c.filled))
	for w := range c.filled {
		words = append(words, w)
	}
	slices.Sort(words)
	vals := make([]uint64, len(words))
	for i, w := range words {
		vals[i] = c.filled[w]
	}
	c.mu.Unlock()
	var runs []descriptor.Run
	k := 0 // the slot of the current page: pages come in ascending offset order
	for i, w := range words {
		for v := vals[i]; v != 0; v &= v - 1 {
			off := (w*64 + uint64(bits.TrailingZeros64(v))) * pageSize
			for k < len(c.slots) && c.slots[k].off+(c.slots[k].end-c.slots[k].start) <= off {
				k++
			}
			if k == len(c.slots) || off < c.slots[k].off {
				continue // past the image (not filled by Ensure)
			}
			a := c.slots[k].start + (off - c.slots[k].off)
			if n := len(runs); n > 0 && runs[n-1].End == a {
				runs[n-1].End = a + pageSize
			} else {
				runs = append(runs, descriptor.Run{Start: a, End: a + pageSize})
			}
		}
	}
	return runs
}

// ReadAt fills b with the seed's pages at src (one slot, source-present),
// filling the cache first with what it lacks. It returns how many pages it
// fetched from the source.
func (c *Cache) ReadAt(src uint64, b []byte) (int, error) {
	n := len(b) / pageSize
	f, err := c.Ensure(src, n)
	if err != nil {
		return f, err
	}
	off, _ := c.Offset(src)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.errClosed(); err != nil {
		return f, err
	}
	if _, err := unix.Pread(c.fd, b, int64(off)); err != nil {
		return f, fmt.Errorf("page cache read: %w", err)
	}
	return f, nil
}

// RunReader is a Source that can read many runs in one batched request
// (a network transport); EnsureRuns uses it to fill a working set at once.
type RunReader interface {
	// ReadRuns fills buf with the runs' memory, one after the other.
	ReadRuns(runs []descriptor.Run, buf []byte) error
}

// EnsureRuns fills the cache with every page of runs it does not hold yet
// (runs must be source-present memory), in as few source requests as the
// Source allows. It returns the number of pages fetched.
func (c *Cache) EnsureRuns(runs []descriptor.Run) (int, error) {
	rr, ok := c.src.(RunReader)
	if !ok {
		n := 0
		for _, r := range runs {
			f, err := c.Ensure(r.Start, int((r.End-r.Start)/pageSize))
			n += f
			if err != nil {
				return n, err
			}
		}
		return n, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.errClosed(); err != nil {
		return 0, err
	}
	// The missing pages, as runs with their cache offsets.
	type piece struct {
		run descriptor.Run
		off uint64
	}
	var missing []piece
	for _, r := range runs {
		for a := r.Start; a < r.End; a += pageSize {
			off, ok := c.Offset(a)
			if !ok {
				return 0, fmt.Errorf("page cache: address %#x is not cached memory", a)
			}
			pg := off / pageSize
			if c.filled[pg>>6]&(1<<(pg&63)) != 0 {
				continue
			}
			if n := len(missing); n > 0 && missing[n-1].run.End == a && missing[n-1].off+(a-missing[n-1].run.Start) == off {
				missing[n-1].run.End = a + pageSize
				continue
			}
			missing = append(missing, piece{descriptor.Run{Start: a, End: a + pageSize}, off})
		}
	}
	fetched := 0
	const batch = 16 << 20
	for len(missing) > 0 {
		var size uint64
		k := 0
		for k < len(missing) && (k == 0 || size+(missing[k].run.End-missing[k].run.Start) <= batch) {
			size += missing[k].run.End - missing[k].run.Start
			k++
		}
		part := missing[:k]
		missing = missing[k:]
		buf := make([]byte, size)
		rs := make([]descriptor.Run, len(part))
		for i, p := range part {
			rs[i] = p.run
		}
		if err := rr.ReadRuns(rs, buf); err != nil {
			return fetched, err
		}
		var o uint64
		for _, p := range part {
			n := p.run.End - p.run.Start
			if _, err := unix.Pwrite(c.fd, buf[o:o+n], int64(p.off)); err != nil {
				return fetched, fmt.Errorf("page cache write: %w", err)
			}
			for q := p.off / pageSize; q < (p.off+n)/pageSize; q++ {
				c.filled[q>>6] |= 1 << (q & 63)
			}
			o += n
			fetched += int(n / pageSize)
			c.bytes.Add(n)
		}
	}
	return fetched, nil
}

// Close releases the cache. Children mapping it keep their mappings (the
// memfd lives as long as they map it), but it is no longer filled.
//
// The staging buffer (up to MaxWindow pages) and the fill bitmap are
// dropped too: the Cache itself stays reachable after its seed is removed,
// from the pagers of the seed's children that the daemon keeps in its
// bounded `ps` history, and would otherwise pin that memory for as long.
func (c *Cache) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd >= 0 {
		unix.Close(c.fd)
		c.fd = -1
	}
	c.buf = nil
	c.filled = nil
}

// errClosed reports a fill after Close. Precondition: c.mu held.
func (c *Cache) errClosed() error {
	if c.fd < 0 {
		return fmt.Errorf("page cache closed (the seed was removed)")
	}
	return nil
}
