package snapshot

import (
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
		case strings.HasPrefix(m.Path, "/memfd:"+descriptor.CacheMemfdPrefix) && !m.Shared:
			// A mitosis child's memory, mapped privately from its node's
			// page cache (multi-hop: a child prepared as a seed). Every
			// page is read from the frozen copy, whose faults the
			// child's pager serves.
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

// checkFDs records the fds a child must reopen and refuses those that cannot
// be carried. Stdin, stdout and stderr are supplied by each child's caller.
func checkFDs(fds []procfs.FDInfo, channel int) ([]descriptor.FD, bool, error) {
	var out []descriptor.FD
	sawChannel := false
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
		switch f.Kind {
		case procfs.FDRegular, procfs.FDDir, procfs.FDCharDev:
			if !strings.HasPrefix(f.Target, "/") {
				return nil, false, refuse("fd %d (%s) has no path to reopen", f.Num, f.Target)
			}
			out = append(out, descriptor.FD{
				Num: int32(f.Num), Kind: descriptor.FDFile, Path: f.Target,
				Flags: f.Flags, Pos: f.Pos, Cloexec: f.Cloexec,
				File: descriptor.FileID{Dev: f.File.Dev, Ino: f.File.Ino, Size: f.File.Size, MtimeNsec: f.File.MtimeNsec},
			})
		default:
			return nil, false, refuse("fd %d is a %s (%s): mitosis cannot carry %ss across a fork; close it before prepare", f.Num, f.Kind, f.Target, f.Kind)
		}
	}
	if channel >= 0 && !sawChannel {
		return nil, false, fmt.Errorf("channel fd %d is not open in the process", channel)
	}
	_ = unix.O_RDONLY
	return out, sawChannel, nil
}
