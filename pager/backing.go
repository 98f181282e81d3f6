package pager

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
)

// A Cache's file is a memfd, or, with SetHugePageCache(true) (mitosis
// daemon --huge-page-cache), a file of a private tmpfs mounted with
// huge=always: its page cache is then made of 2 MiB folios instead of
// 4 KiB pages. Every page still reaches a child one PTE at a time
// (UFFDIO_CONTINUE), but the kernel's per-page work shrinks: the page-cache
// lookup finds one large entry, filling the cache allocates a folio per
// 2 MiB instead of per page, and a child's exit unmaps runs of one folio in
// batches. Measured on a FINRA rule (bench/finra-rule-cost.sh, 4M trades,
// warm cache): 60 ms of CPU per remote-fork rule with a memfd, 49.5 ms with
// the huge tmpfs (the os.fork bound: 32 ms).
//
// It is not the default because filling it costs more, on this project's
// VM far more than the mapping saves where a cache serves few children:
// the fills write into freshly allocated 2 MiB folios (zeroing what a fill
// does not write), which the hypervisor must back first (the guest reports
// free 2 MiB blocks to it). Per rule of the FINRA workflow at 132 MB, 32
// rules: the node caches' writes took 23 ms of CPU against 6.5, and the
// per-run-seed workflow ran 25% slower, the stage-seed one 14% faster
// (BENCHMARKS.md).
//
// It also costs memory: a fill that writes one page of a 2 MiB extent the
// cache has not touched yet allocates the whole folio. A seed whose
// children touch scattered pages can cost its node's cache up to 512 times
// the pages filled; Cache.Bytes counts the pages filled, Cache.Allocated
// the memory taken.
//
// The tmpfs is mounted on a temporary directory and detached at once
// (MNT_DETACH) while the daemon holds a descriptor of its root: it lives as
// long as that descriptor and the files are open, nobody else can reach it,
// and a crashed daemon leaves no mount behind. Children open a cache file
// through /proc/DAEMON/fd, as they opened the memfd. Where mounting is not
// allowed (no CAP_SYS_ADMIN), caches are memfds as before.
var backing struct {
	once   sync.Once
	huge   atomic.Bool // SetHugePageCache(true)
	dirFD  int
	err    error
	serial atomic.Uint64
}

// SetHugePageCache chooses what caches made from now on are backed by: true
// a private tmpfs with transparent huge pages where the process may mount
// one, false (the default) a memfd of 4 KiB pages.
func SetHugePageCache(on bool) { backing.huge.Store(on) }

// HugePageCache reports what SetHugePageCache chose last.
func HugePageCache() bool { return backing.huge.Load() }

// CacheBacking describes what a cache made now is backed by, and why not
// huge pages when it is not: for the daemon's start-up log.
func CacheBacking() string {
	if !backing.huge.Load() {
		return "memfd (4 KiB pages)"
	}
	if _, err := hugeDir(); err != nil {
		return fmt.Sprintf("memfd (4 KiB pages: %v)", err)
	}
	return "tmpfs huge=always (2 MiB folios)"
}

// hugeDir returns the root of the private huge-page tmpfs, mounting it on
// first use.
func hugeDir() (int, error) {
	backing.once.Do(func() { backing.dirFD, backing.err = mountHuge() })
	return backing.dirFD, backing.err
}

func mountHuge() (int, error) {
	dir, err := os.MkdirTemp("", "mitosis-cache-")
	if err != nil {
		return -1, fmt.Errorf("huge-page cache: %w", err)
	}
	defer os.Remove(dir)
	// size=0 and nr_inodes=0: no limits but memory's, as for a memfd.
	if err := unix.Mount("mitosis-cache", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV,
		"huge=always,mode=0700,size=0,nr_inodes=0"); err != nil {
		return -1, fmt.Errorf("huge-page cache: mount tmpfs on %s: %w", dir, err)
	}
	fd, oerr := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		if oerr == nil {
			unix.Close(fd)
		}
		return -1, fmt.Errorf("huge-page cache: detach tmpfs %s: %w", dir, err)
	}
	if oerr != nil {
		return -1, fmt.Errorf("huge-page cache: open tmpfs %s: %w", dir, oerr)
	}
	return fd, nil
}

// cacheFile creates the file of a cache for seed id: an unlinked file of
// the huge-page tmpfs, or a memfd. Either way its name starts with
// descriptor.CacheMemfdPrefix, which is how a mapping of it is recognized
// in a child prepared as a seed (snapshot).
func cacheFile(id string) (int, error) {
	name := descriptor.CacheMemfdPrefix + id
	if backing.huge.Load() {
		if dir, err := hugeDir(); err == nil {
			// Unique even if the same seed's cache is made twice.
			name = fmt.Sprintf("%s.%d", name, backing.serial.Add(1))
			// 0644: a child running as another user maps it
			// MAP_PRIVATE, which needs only read access; only
			// processes that may ptrace the daemon reach it.
			fd, err := unix.Openat(dir, name, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
			if err != nil {
				return -1, fmt.Errorf("page cache file: %w", err)
			}
			if err := unix.Unlinkat(dir, name, 0); err != nil {
				unix.Close(fd)
				return -1, fmt.Errorf("page cache file: unlink: %w", err)
			}
			return fd, nil
		}
	}
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("page cache memfd: %w", err)
	}
	return fd, nil
}
