package pager

import (
	"errors"
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

// Cache is a node's page cache for one seed: a file (of a private huge-page
// tmpfs, or a memfd: see SetHugePageCache) that holds the seed's lazily
// paged memory at fixed offsets, filled from the Source on first use.
//
// Children map it MAP_PRIVATE at their VMAs' addresses and register those
// ranges for MISSING and MINOR userfaultfd faults. A page crosses from the
// source into the cache once per node; after that every child maps the same
// page-cache page (UFFDIO_CONTINUE, read-only, copy-on-write on a write), so
// clean pages are shared between children instead of copied into each.
//
// Fills run concurrently: a fill claims the pages it fetches, and a child
// that needs pages another fill has claimed waits for that fill alone, so a
// slow fetch from a remote node holds up only the children that need its
// pages, and a working-set push can run while children fault.
type Cache struct {
	src     Source
	fsrc    FileSource // src, if it can write into the cache's file itself
	present []descriptor.Run
	path    string
	slots   []slot

	// fdMu guards fd against Close while a fill writes or a reader reads
	// (it is not held while a fill waits on the source).
	fdMu sync.RWMutex
	fd   int

	bufMu sync.Mutex // held while a fill uses buf
	buf   []byte     // staging buffer of fills (fillBuffer)

	mu     sync.Mutex
	filled map[uint64]uint64 // bitset of cache pages filled, by page>>6
	fills  []*fill           // fills in flight
	bytes  atomic.Uint64
}

// fill is a claim on cache pages [lo, hi) (page numbers of the memfd) that
// one fetch is filling; done is closed when it ends, filled or not.
type fill struct {
	lo, hi uint64
	done   chan struct{}
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
	c.fsrc, _ = src.(FileSource)
	var off uint64
	for _, v := range d.VMAs {
		if CacheBacked(v) {
			c.slots = append(c.slots, slot{v.Start, v.End, off})
			off += v.End - v.Start
		}
	}
	fd, err := cacheFile(d.SeedID)
	if err != nil {
		return nil, err
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

// Allocated is the memory the cache's file takes: Bytes rounded up to the
// 2 MiB folios of the huge-page cache (about Bytes for a memfd), 0 once
// closed.
func (c *Cache) Allocated() uint64 {
	c.fdMu.RLock()
	defer c.fdMu.RUnlock()
	var st unix.Stat_t
	if c.fd < 0 || unix.Fstat(c.fd, &st) != nil {
		return 0
	}
	return uint64(st.Blocks) * 512
}

// Ensure fills the cache for the n source-present pages at src (which must
// lie in one slot) that it does not hold yet, and returns how many pages it
// fetched from the source. Pages another fill is fetching are waited for,
// and fetched here after all if that fill failed.
func (c *Cache) Ensure(src uint64, n int) (int, error) {
	off, ok := c.Offset(src)
	if !ok {
		return 0, fmt.Errorf("page cache: address %#x is not cached memory", src)
	}
	lo := off / pageSize
	fetched := 0
	for {
		c.mu.Lock()
		if err := c.errClosed(); err != nil {
			c.mu.Unlock()
			return fetched, err
		}
		mine, wait := c.claim(lo, lo+uint64(n))
		c.mu.Unlock()
		for i, f := range mine {
			if err := c.fetch(f, src+(f.lo-lo)*pageSize); err != nil {
				c.release(mine[i+1:])
				return fetched, err
			}
			fetched += int(f.hi - f.lo)
		}
		if len(wait) == 0 {
			return fetched, nil
		}
		for _, ch := range wait {
			<-ch
		}
		// Check again: a fill waited for may have failed.
	}
}

// claim splits the cache pages [lo, hi) into pages filled (skipped), pages
// a fill in flight holds (its done channel is returned to wait on) and the
// rest, which it claims as new fills for the caller to fetch.
// Precondition: c.mu held.
func (c *Cache) claim(lo, hi uint64) (mine []*fill, wait []chan struct{}) {
	for pg := lo; pg < hi; {
		if c.isFilled(pg) {
			pg++
			continue
		}
		if f := c.inFlight(pg); f != nil {
			if len(wait) == 0 || wait[len(wait)-1] != f.done {
				wait = append(wait, f.done)
			}
			pg = min(f.hi, hi)
			continue
		}
		// Up to the next page filled or held by a fill in flight.
		limit := hi
		for _, f := range c.fills {
			if f.lo > pg && f.lo < limit {
				limit = f.lo
			}
		}
		end := pg + 1
		for end < limit && !c.isFilled(end) {
			end++
		}
		f := &fill{lo: pg, hi: end, done: make(chan struct{})}
		c.fills = append(c.fills, f)
		mine = append(mine, f)
		pg = end
	}
	return mine, wait
}

func (c *Cache) isFilled(pg uint64) bool { return c.filled[pg>>6]&(1<<(pg&63)) != 0 }

// inFlight returns the fill in flight that holds page pg, if any.
// Precondition: c.mu held.
func (c *Cache) inFlight(pg uint64) *fill {
	for _, f := range c.fills {
		if f.lo <= pg && pg < f.hi {
			return f
		}
	}
	return nil
}

// fetch reads the claimed pages of f from the source at src into the cache
// and ends the claim.
func (c *Cache) fetch(f *fill, src uint64) error {
	var err error
	if c.fsrc != nil {
		run := [1]descriptor.Run{{Start: src, End: src + (f.hi-f.lo)*pageSize}}
		off := [1]int64{int64(f.lo * pageSize)}
		err = c.readTo(run[:], off[:])
	} else {
		b, put := c.fillBuffer(int(f.hi-f.lo) * pageSize)
		err = c.src.ReadPages(src, b)
		if err == nil {
			err = c.write(b, f.lo*pageSize)
		}
		put()
	}
	if err != nil {
		c.release([]*fill{f})
		return err
	}
	c.complete(f)
	return nil
}

// fillBufSize is the size of a cache's staging buffer: a fetch reads into
// it and pwrites it (measured 1.7x faster than process_vm_readv straight
// into a shared mapping of the memfd, which takes a page fault per page).
// Kept per cache, so the read and the network transport do not fault in
// fresh memory for every fill, and dropped with the cache, so a daemon's
// memory does not keep one per seed it ever served. 4 MiB is the largest
// fault-around window.
const fillBufSize = 4 << 20

// fillBuffer returns a staging buffer of n bytes and the function that
// gives it back: the cache's own when it is free, else one of its own.
func (c *Cache) fillBuffer(n int) ([]byte, func()) {
	if n > fillBufSize || !c.bufMu.TryLock() {
		return make([]byte, n), func() {}
	}
	if c.buf == nil {
		c.buf = make([]byte, fillBufSize)
	}
	return c.buf[:n], c.bufMu.Unlock
}

// FileSource is a Source that can write pages straight into a file (a
// network transport that splices them from its socket): a fill then needs
// no staging buffer and no copy through user space.
type FileSource interface {
	Source
	// ReadRunsTo writes the seed's memory of runs into the file fd, run i
	// at offset offs[i]. fd stays the caller's.
	ReadRunsTo(runs []descriptor.Run, fd int, offs []int64) error
}

// readTo fills the cache's file at offs with runs from c.fsrc, through a
// duplicate of its descriptor: Close does not wait for a fill from the
// network, and a closed cache's descriptor number, reused by another file,
// is never written. A fill that outlives Close writes into the orphaned
// file, which is freed with the duplicate.
func (c *Cache) readTo(runs []descriptor.Run, offs []int64) error {
	fd, err := c.dup()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return c.fsrc.ReadRunsTo(runs, fd, offs)
}

// dup returns a duplicate of the cache's file descriptor (close-on-exec),
// which the caller closes.
func (c *Cache) dup() (int, error) {
	c.fdMu.RLock()
	defer c.fdMu.RUnlock()
	if c.fd < 0 {
		return -1, errCacheClosed
	}
	fd, err := unix.FcntlInt(uintptr(c.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("page cache: dup: %w", err)
	}
	return fd, nil
}

// FileRuns makes the cache hold runs, each of them source-present memory of
// one slot, fetching what it lacks, and returns a duplicate of its file
// descriptor (the caller closes it) with each run's offset in the file: the
// owner node sends a peer's pages from there with sendfile(2). ok is false,
// with nothing fetched, when a run is not wholly cached, present memory.
func (c *Cache) FileRuns(runs []descriptor.Run) (fd int, offs []int64, ok bool, err error) {
	offs = make([]int64, len(runs))
	for i, r := range runs {
		off, in := c.Offset(r.Start)
		if !in || r.End <= r.Start || r.Start%pageSize != 0 || r.End%pageSize != 0 {
			return -1, nil, false, nil
		}
		if end, _ := c.Offset(r.End - 1); end != off+(r.End-r.Start)-1 || !covered(c.present, r) {
			return -1, nil, false, nil
		}
		offs[i] = int64(off)
	}
	for _, r := range runs {
		if _, err := c.Ensure(r.Start, int((r.End-r.Start)/pageSize)); err != nil {
			return -1, nil, false, err
		}
	}
	if fd, err = c.dup(); err != nil {
		return -1, nil, false, err
	}
	return fd, offs, true, nil
}

// covered reports whether r lies inside one run of present (sorted,
// disjoint runs).
func covered(present []descriptor.Run, r descriptor.Run) bool {
	i := sort.Search(len(present), func(i int) bool { return present[i].End > r.Start })
	return i < len(present) && present[i].Start <= r.Start && r.End <= present[i].End
}

// write stores b in the memfd at off.
func (c *Cache) write(b []byte, off uint64) error {
	c.fdMu.RLock()
	defer c.fdMu.RUnlock()
	if c.fd < 0 {
		return errCacheClosed
	}
	if _, err := unix.Pwrite(c.fd, b, int64(off)); err != nil {
		return fmt.Errorf("page cache write: %w", err)
	}
	return nil
}

// complete marks f's pages filled and ends the claim.
func (c *Cache) complete(f *fill) {
	c.mu.Lock()
	if c.filled != nil {
		for q := f.lo; q < f.hi; q++ {
			c.filled[q>>6] |= 1 << (q & 63)
		}
		c.bytes.Add((f.hi - f.lo) * pageSize)
	}
	c.drop(f)
	c.mu.Unlock()
	close(f.done)
}

// release ends claims without filling their pages (the fetch failed): whoever
// waits on them claims the pages again.
func (c *Cache) release(fs []*fill) {
	c.mu.Lock()
	for _, f := range fs {
		c.drop(f)
	}
	c.mu.Unlock()
	for _, f := range fs {
		close(f.done)
	}
}

// drop removes f from the fills in flight. Precondition: c.mu held.
func (c *Cache) drop(f *fill) {
	if i := slices.Index(c.fills, f); i >= 0 {
		c.fills = slices.Delete(c.fills, i, i+1)
	}
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

// Held returns the part of runs a child can map from the cache without a
// fetch: their pages the cache holds, and the pages outside cached memory
// (which are not the cache's to fetch).
func (c *Cache) Held(runs []descriptor.Run) []descriptor.Run {
	var out []descriptor.Run
	add := func(s, e uint64) {
		if n := len(out); n > 0 && out[n-1].End == s {
			out[n-1].End = e
		} else {
			out = append(out, descriptor.Run{Start: s, End: e})
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range runs {
		for a := r.Start; a < r.End; {
			i := sort.Search(len(c.slots), func(i int) bool { return c.slots[i].end > a })
			if i == len(c.slots) || c.slots[i].start >= r.End {
				add(a, r.End) // the rest is not cached memory
				break
			}
			sl := c.slots[i]
			if a < sl.start {
				add(a, sl.start)
				a = sl.start
			}
			end := min(r.End, sl.end)
			for pg := (sl.off + a - sl.start) / pageSize; a < end; a, pg = a+pageSize, pg+1 {
				if c.isFilled(pg) {
					add(a, a+pageSize)
				}
			}
		}
	}
	return out
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
	c.fdMu.RLock()
	defer c.fdMu.RUnlock()
	if c.fd < 0 {
		return f, errCacheClosed
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
// and no other fill is fetching (runs must be source-present memory), in as
// few source requests as the Source allows. It returns the number of pages
// it fetched.
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
	// The runs' pages as pieces of one slot each, with their cache offsets.
	type piece struct {
		run descriptor.Run
		off uint64
	}
	var pieces []piece
	for _, r := range runs {
		for a := r.Start; a < r.End; {
			off, ok := c.Offset(a)
			if !ok {
				return 0, fmt.Errorf("page cache: address %#x is not cached memory", a)
			}
			i := sort.Search(len(c.slots), func(i int) bool { return c.slots[i].end > a })
			end := min(r.End, c.slots[i].end)
			pieces = append(pieces, piece{descriptor.Run{Start: a, End: end}, off})
			a = end
		}
	}
	// Claim, fetch and write at most batch bytes at a time, so that a
	// child faulting on a page this push has not reached yet fetches it
	// itself instead of waiting for the whole push. Pages another fill
	// holds are left to it.
	const batch = fillBufSize
	type claimed struct {
		f   *fill
		src uint64
	}
	fetched := 0
	for len(pieces) > 0 {
		var part []claimed
		var size uint64
		c.mu.Lock()
		if err := c.errClosed(); err != nil {
			c.mu.Unlock()
			return fetched, err
		}
		for len(pieces) > 0 && size < batch {
			p := &pieces[0]
			lo := p.off / pageSize
			hi := lo + min(p.run.End-p.run.Start, batch-size)/pageSize
			mine, _ := c.claim(lo, hi)
			for _, f := range mine {
				part = append(part, claimed{f, p.run.Start + (f.lo-lo)*pageSize})
				size += (f.hi - f.lo) * pageSize
			}
			adv := (hi - lo) * pageSize
			p.run.Start += adv
			p.off += adv
			if p.run.Start >= p.run.End {
				pieces = pieces[1:]
			}
		}
		c.mu.Unlock()
		if len(part) == 0 {
			continue
		}
		rs := make([]descriptor.Run, len(part))
		fs := make([]*fill, len(part))
		for i, p := range part {
			rs[i] = descriptor.Run{Start: p.src, End: p.src + (p.f.hi-p.f.lo)*pageSize}
			fs[i] = p.f
		}
		if c.fsrc != nil {
			offs := make([]int64, len(part))
			for i, p := range part {
				offs[i] = int64(p.f.lo * pageSize)
			}
			if err := c.readTo(rs, offs); err != nil {
				c.release(fs)
				return fetched, err
			}
			for _, p := range part {
				c.complete(p.f)
				fetched += int(p.f.hi - p.f.lo)
			}
			continue
		}
		buf, put := c.fillBuffer(int(size))
		if err := rr.ReadRuns(rs, buf); err != nil {
			put()
			c.release(fs)
			return fetched, err
		}
		var o uint64
		for i, p := range part {
			n := (p.f.hi - p.f.lo) * pageSize
			if err := c.write(buf[o:o+n], p.f.lo*pageSize); err != nil {
				put()
				c.release(fs[i:])
				return fetched, err
			}
			c.complete(p.f)
			o += n
			fetched += int(n / pageSize)
		}
		put()
	}
	return fetched, nil
}

// Close releases the cache. Children mapping it keep their mappings (the
// memfd lives as long as they map it), but it is no longer filled.
//
// The staging buffer and the fill bitmap are dropped too: the Cache itself stays reachable after
// its seed is removed, from the pagers of the seed's children that the
// daemon keeps in its bounded `ps` history, and would otherwise pin that
// memory for as long. Fills in flight fail when they come to write.
func (c *Cache) Close() {
	c.mu.Lock()
	c.filled = nil
	c.mu.Unlock()
	c.fdMu.Lock()
	if c.fd >= 0 {
		unix.Close(c.fd)
		c.fd = -1
	}
	c.fdMu.Unlock()
	// A fill in flight keeps the buffer until it ends; the next one
	// (there is none once closed) would allocate again.
	if c.bufMu.TryLock() {
		c.buf = nil
		c.bufMu.Unlock()
	}
}

// errClosed reports a fill after Close. Precondition: c.mu held.
func (c *Cache) errClosed() error {
	if c.filled == nil {
		return errCacheClosed
	}
	return nil
}

var errCacheClosed = errors.New("page cache closed (the seed was removed)")
