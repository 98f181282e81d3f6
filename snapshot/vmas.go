package snapshot

import (
	"errors"
	"fmt"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/procfs"
)

func unsafePtr(p *uint64) unsafe.Pointer { return unsafe.Pointer(p) }

type fileStat struct {
	id  descriptor.FileID
	err error
}

func statFile(path string) fileStat {
	id, err := fileID(path)
	return fileStat{id, err}
}

// statFiles stats every distinct mapped file, resolving paths under root
// ("/proc/PID/root" of the mapping process: its own root, which differs
// from ours when it runs in a container).
func statFiles(maps []procfs.Mapping, root string) map[string]fileStat {
	out := map[string]fileStat{}
	for _, m := range maps {
		if m.Inode == 0 || strings.HasPrefix(m.Path, "[") || m.Deleted {
			continue
		}
		if _, ok := out[m.Path]; !ok {
			out[m.Path] = statFile(root + m.Path)
		}
	}
	return out
}

func fileID(path string) (descriptor.FileID, error) {
	id, err := procfs.StatFileID(path)
	if err != nil {
		return descriptor.FileID{}, err
	}
	return descriptor.FileID{Dev: id.Dev, Ino: id.Ino, Size: id.Size, MtimeNsec: id.MtimeNsec}, nil
}

// classify turns /proc maps into descriptor VMAs, refusing mappings mitosis
// cannot carry. regions (from PAGEMAP_SCAN) decide which private file
// mappings were written (KindFileDirty). files caches the identity of mapped
// files by path; with files == nil (a pre-check) files are not examined.
func classify(maps []procfs.Mapping, regions []procfs.PageRegion, files map[string]fileStat) ([]descriptor.VMA, error) {
	out := make([]descriptor.VMA, 0, len(maps))
	ri := 0
	for _, m := range maps {
		v := descriptor.VMA{Start: m.Start, End: m.End, Prot: m.Prot, Offset: m.Offset, Path: m.Path}
		if m.Shared {
			v.Flags |= descriptor.FlagShared
		}
		rng := fmt.Sprintf("%#x-%#x", m.Start, m.End)
		switch {
		case m.Path == "[vdso]":
			v.Kind = descriptor.KindVDSO
		case m.Path == "[vvar]":
			v.Kind = descriptor.KindVVAR
		case m.Path == "[vvar_vclock]":
			v.Kind = descriptor.KindVVARClock
		case m.Path == "[vsyscall]":
			v.Kind = descriptor.KindVsyscall
		case m.Path == "" || m.Path == "[heap]" || m.Path == "[stack]" || strings.HasPrefix(m.Path, "[anon:"):
			if m.Shared {
				return nil, refuse("shared anonymous memory at %s (MAP_SHARED|MAP_ANONYMOUS): mitosis cannot carry memory shared with other processes", rng)
			}
			v.Kind = descriptor.KindAnon
			switch m.Path {
			case "[heap]":
				v.Flags |= descriptor.FlagHeap
			case "[stack]":
				v.Flags |= descriptor.FlagStack | descriptor.FlagGrowsDown
			}
		case !m.Shared && (strings.HasPrefix(m.Path, "/memfd:"+descriptor.CacheMemfdPrefix) ||
			m.Deleted && strings.HasPrefix(m.Path, "/"+descriptor.CacheMemfdPrefix)):
			// A mitosis child's memory, mapped privately from its node's
			// page cache (multi-hop: a child prepared as a seed): a memfd,
			// or an unlinked file at the root of the daemon's private
			// huge-page tmpfs (pager.SetHugePageCache). Every page is read
			// from the frozen copy, whose faults the child's pager serves.
			v.Kind = descriptor.KindFileDirty
			v.Path = ""
		case strings.HasPrefix(m.Path, "/memfd:"):
			return nil, refuse("memfd mapping %q at %s: mitosis cannot carry memfd memory", m.Path, rng)
		case strings.HasPrefix(m.Path, "/SYSV"):
			return nil, refuse("System V shared memory %q at %s: mitosis cannot carry shared memory", m.Path, rng)
		case strings.HasPrefix(m.Path, "["):
			return nil, refuse("special mapping %s at %s is not supported", m.Path, rng)
		default:
			if m.Deleted {
				if m.Shared {
					return nil, refuse("shared mapping of deleted file %q at %s (shared memory?): mitosis cannot carry it", m.Path, rng)
				}
				return nil, refuse("mapping of deleted file %q at %s: the file was removed or replaced after it was mapped; restart the process", m.Path, rng)
			}
			v.Kind = descriptor.KindFile
			if files == nil {
				out = append(out, v)
				continue
			}
			fs, ok := files[m.Path]
			if !ok {
				fs = statFile(m.Path)
				files[m.Path] = fs
			}
			if fs.err != nil {
				return nil, refuse("mapped file %q at %s: %v", m.Path, rng, fs.err)
			}
			id := fs.id
			if id.Ino != m.Inode || (m.Dev != 0 && id.Dev != m.Dev) {
				return nil, refuse("mapped file %q at %s was replaced since it was mapped (inode %d, now %d)", m.Path, rng, m.Inode, id.Ino)
			}
			v.File = id
			if !m.Shared && regions != nil {
				// Skip regions entirely below this VMA.
				for ri < len(regions) && regions[ri].End <= m.Start {
					ri++
				}
				for j := ri; j < len(regions) && regions[j].Start < m.End; j++ {
					c := regions[j].Categories
					if c&procfs.PageIsSwapped != 0 || (c&procfs.PageIsPresent != 0 && c&procfs.PageIsFile == 0) {
						v.Kind = descriptor.KindFileDirty
						break
					}
				}
			}
		}
		out = append(out, v)
	}
	return out, nil
}

// presentRuns lists the source pages a child must copy: present or swapped
// anonymous pages that are not the shared zero page, and every page of a
// written private file mapping.
func presentRuns(vmas []descriptor.VMA, regions []procfs.PageRegion) []descriptor.Run {
	var runs []descriptor.Run
	add := func(s, e uint64) {
		if s >= e {
			return
		}
		if n := len(runs); n > 0 && runs[n-1].End == s {
			runs[n-1].End = e
			return
		}
		runs = append(runs, descriptor.Run{Start: s, End: e})
	}
	ri := 0
	for _, v := range vmas {
		switch v.Kind {
		case descriptor.KindFileDirty:
			add(v.Start, v.End)
			continue
		case descriptor.KindAnon:
		default:
			continue
		}
		for ri < len(regions) && regions[ri].End <= v.Start {
			ri++
		}
		for j := ri; j < len(regions) && regions[j].Start < v.End; j++ {
			c := regions[j].Categories
			if c&(procfs.PageIsPresent|procfs.PageIsSwapped) == 0 || c&procfs.PageIsPFNZero != 0 {
				continue
			}
			add(max(regions[j].Start, v.Start), min(regions[j].End, v.End))
		}
	}
	return runs
}

// clipToVMAs returns the parts of runs inside vmas (both sorted by address,
// vmas not overlapping).
func clipToVMAs(runs []descriptor.Run, vmas []descriptor.VMA) []descriptor.Run {
	var out []descriptor.Run
	j := 0
	for _, r := range runs {
		for j < len(vmas) && vmas[j].End <= r.Start {
			j++
		}
		for k := j; k < len(vmas) && vmas[k].Start < r.End; k++ {
			if s, e := max(r.Start, vmas[k].Start), min(r.End, vmas[k].End); s < e {
				out = append(out, descriptor.Run{Start: s, End: e})
			}
		}
	}
	return out
}

// unionRuns merges two lists of runs into one sorted list of disjoint,
// non-adjacent runs.
func unionRuns(a, b []descriptor.Run) []descriptor.Run {
	return descriptor.MergeRuns(append(append(make([]descriptor.Run, 0, len(a)+len(b)), a...), b...))
}

// checkFDs records the fds a child must reopen or recreate and refuses
// those that cannot be carried. Stdin, stdout and stderr are supplied by
// each child's caller. Pipes are carried when both ends are open in the
// process (self-pipes); their content is added by capturePipes.
//
// Sockets are carried only when probe (nil: none) finds a unix socket with
// nothing to carry (see classifySocket).
func checkFDs(fds []procfs.FDInfo, channel int, probe sockProbe) ([]descriptor.FD, bool, error) {
	var out []descriptor.FD
	sawChannel := false
	type ends struct{ r, w, first int }
	pipes := map[uint64]*ends{}
	open := map[int]bool{}
	for _, f := range fds {
		open[f.Num] = true
	}
	for _, f := range fds {
		if f.Num <= 2 {
			continue
		}
		if f.Num == channel {
			if f.Kind != procfs.FDSocket {
				return nil, false, fmt.Errorf("channel fd %d is %s, not the daemon connection", f.Num, f.Kind)
			}
			sawChannel = true
			out = append(out, descriptor.FD{Num: int32(f.Num), Kind: descriptor.FDChannel, Cloexec: f.Cloexec})
			continue
		}
		base := descriptor.FD{Num: int32(f.Num), Flags: f.Flags, Cloexec: f.Cloexec}
		switch {
		case f.Kind == procfs.FDRegular || f.Kind == procfs.FDDir || f.Kind == procfs.FDCharDev:
			if !strings.HasPrefix(f.Target, "/") {
				return nil, false, refuse("fd %d (%s) has no path to reopen", f.Num, f.Target)
			}
			base.Kind, base.Path, base.Pos = descriptor.FDFile, f.Target, f.Pos
			base.File = descriptor.FileID{Dev: f.File.Dev, Ino: f.File.Ino, Size: f.File.Size, MtimeNsec: f.File.MtimeNsec}
		case f.Kind == procfs.FDPipe && strings.HasPrefix(f.Target, "pipe:["):
			e := pipes[f.File.Ino]
			if e == nil {
				e = &ends{r: -1, w: -1, first: f.Num}
				pipes[f.File.Ino] = e
			}
			switch f.Flags & unix.O_ACCMODE {
			case unix.O_RDONLY:
				e.r = f.Num
			case unix.O_WRONLY:
				e.w = f.Num
			}
			base.Kind, base.Group = descriptor.FDPipe, f.File.Ino
		case f.AnonType() == "eventfd":
			base.Kind, base.Group, base.Count = descriptor.FDEventfd, f.Eventfd.ID, f.Eventfd.Count
			if f.Eventfd.ID == 0 {
				base.Group = uint64(1)<<63 | uint64(f.Num) // no id: not shared
			}
			if f.Eventfd.Semaphore {
				base.Pos = descriptor.EventfdSemaphore
			}
		case f.AnonType() == "eventpoll":
			base.Kind = descriptor.FDEpoll
			for _, w := range f.Epoll {
				if !open[w.TFD] {
					return nil, false, refuse("epoll fd %d watches fd %d, which is not open in the process (closed while another descriptor keeps it alive): mitosis cannot recreate that watch", f.Num, w.TFD)
				}
				base.Watches = append(base.Watches, descriptor.EpollWatch{TFD: int32(w.TFD), Events: w.Events, Data: w.Data})
			}
		case f.Kind == procfs.FDSocket && probe != nil:
			state, typ, err := probe(f.Num)
			if err != nil {
				return nil, false, refuse("fd %d is a socket (%s): %v; mitosis carries only unix sockets without a connection (a socketpair end whose peer is closed, or a fresh socket); close it before prepare", f.Num, f.Target, err)
			}
			base.Kind, base.Pos, base.Group = descriptor.FDSocket, int64(state), uint64(typ)
		default:
			return nil, false, refuse("fd %d is a %s (%s): mitosis cannot carry %ss across a fork; close it before prepare", f.Num, f.Describe(), f.Target, f.Describe())
		}
		out = append(out, base)
	}
	for _, e := range pipes {
		if e.r < 0 || e.w < 0 {
			end := "read"
			if e.r < 0 {
				end = "write"
			}
			return nil, false, refuse("fd %d is the %s end of a pipe whose other end is not open in the process (a pipe to another process): mitosis cannot carry it across a fork; close it before prepare", e.first, end)
		}
	}
	if channel >= 0 && !sawChannel {
		return nil, false, fmt.Errorf("channel fd %d is not open in the process", channel)
	}
	return out, sawChannel, nil
}

// capturePipes reads, without consuming it, the content buffered in each
// pipe of fds (FDPipe) of the stopped process pid and stores it in Data of
// the pipe's read end: the daemon opens the read end through
// /proc/PID/fd/N (a new reader of the same pipe) and tee(2)s it into a pipe
// of its own.
func capturePipes(pid int, fds []descriptor.FD) error {
	done := map[uint64]bool{}
	for i := range fds {
		f := &fds[i]
		if f.Kind != descriptor.FDPipe || f.Flags&unix.O_ACCMODE != unix.O_RDONLY || done[f.Group] {
			continue
		}
		done[f.Group] = true
		b, err := peekPipe(fmt.Sprintf("/proc/%d/fd/%d", pid, f.Num))
		if err != nil {
			return fmt.Errorf("fd %d (pipe): %w", f.Num, err)
		}
		f.Data = b
	}
	return nil
}

// peekPipe returns the bytes buffered in the pipe at path (a /proc fd
// link), leaving them in the pipe.
func peekPipe(path string) ([]byte, error) {
	src, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(src)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, descriptor.MaxPipeData); err != nil {
		return nil, fmt.Errorf("size the capture pipe: %w", err)
	}
	n, err := unix.Tee(src, p[1], descriptor.MaxPipeData, unix.SPLICE_F_NONBLOCK)
	if errors.Is(err, unix.EAGAIN) || n == 0 {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("tee: %w", err)
	}
	out := make([]byte, n)
	for got := 0; got < len(out); {
		m, err := unix.Read(p[0], out[got:])
		if err != nil || m <= 0 {
			return nil, fmt.Errorf("read the captured pipe content: %d bytes of %d (%v)", got, n, err)
		}
		got += m
	}
	return out, nil
}
