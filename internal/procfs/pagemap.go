package procfs

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Page categories of the PAGEMAP_SCAN ioctl (PAGE_IS_* in
// include/uapi/linux/fs.h), used in masks and in PageRegion.Categories.
const (
	// PageIsWPAllowed: the page has userfaultfd async write protection enabled.
	PageIsWPAllowed = 1 << 0
	// PageIsWritten: the page was written since it was write protected.
	PageIsWritten = 1 << 1
	// PageIsFile: the page is file backed.
	PageIsFile = 1 << 2
	// PageIsPresent: the page is present in memory.
	PageIsPresent = 1 << 3
	// PageIsSwapped: the page is swapped out.
	PageIsSwapped = 1 << 4
	// PageIsPFNZero: the page maps the shared zero page.
	PageIsPFNZero = 1 << 5
	// PageIsHuge: the page is THP or hugetlb backed.
	PageIsHuge = 1 << 6
	// PageIsSoftDirty: the page is soft-dirty.
	PageIsSoftDirty = 1 << 7
	// PageIsGuard: the page is a guard page (MADV_GUARD_INSTALL, Linux 6.14+).
	PageIsGuard = 1 << 8
)

// pagemapScan is PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg).
const pagemapScan = 0xc0606610

// pmScanArg mirrors struct pm_scan_arg.
type pmScanArg struct {
	size, flags, start, end, walkEnd, vec, vecLen, maxPages uint64
	categoryInverted, categoryMask, categoryAnyofMask       uint64
	returnMask                                              uint64
}

// PageRegion is a run of pages [Start, End) sharing the categories in
// Categories (masked by the scan's return mask).
type PageRegion struct{ Start, End, Categories uint64 }

// scanBufRegions is the number of regions one PAGEMAP_SCAN call may return.
const scanBufRegions = 512

// Pagemap is an open /proc/PID/pagemap, used for PAGEMAP_SCAN.
// It is not safe for concurrent use.
type Pagemap struct {
	pid int
	f   *os.File
	buf []PageRegion
}

// OpenPagemap opens /proc/PID/pagemap. The caller must be allowed to
// ptrace-read pid.
func OpenPagemap(pid int) (*Pagemap, error) {
	f, err := os.Open(procPath(pid, "pagemap"))
	if err != nil {
		return nil, fmt.Errorf("open pagemap of %d: %w", pid, err)
	}
	return &Pagemap{pid: pid, f: f, buf: make([]PageRegion, scanBufRegions)}, nil
}

// Close closes the pagemap file.
func (p *Pagemap) Close() error {
	if err := p.f.Close(); err != nil {
		return fmt.Errorf("close pagemap of %d: %w", p.pid, err)
	}
	return nil
}

// Scan returns the regions in [start, end) whose pages match: every
// category in required is set, at least one of anyOf is set (if anyOf is
// not 0) and none in excluded is set. The categories reported are those in
// returnMask; adjacent matching pages with equal reported categories form
// one region. start must be page aligned; end is rounded up to a page.
func (p *Pagemap) Scan(start, end, required, anyOf, excluded, returnMask uint64) ([]PageRegion, error) {
	var out []PageRegion
	arg := pmScanArg{
		size:              uint64(unsafe.Sizeof(pmScanArg{})),
		vecLen:            uint64(len(p.buf)),
		categoryInverted:  excluded,
		categoryMask:      required | excluded,
		categoryAnyofMask: anyOf,
		returnMask:        returnMask,
	}
	// The kernel writes regions into p.buf through arg.vec, a Go pointer
	// hidden in an integer: pin the buffer so it stays put.
	var pin runtime.Pinner
	pin.Pin(&p.buf[0])
	defer pin.Unpin()
	arg.vec = uint64(uintptr(unsafe.Pointer(&p.buf[0])))

	for cur := start; cur < end; {
		arg.start, arg.end, arg.walkEnd = cur, end, 0
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, p.f.Fd(), pagemapScan, uintptr(unsafe.Pointer(&arg)))
		if errno != 0 {
			return nil, fmt.Errorf("PAGEMAP_SCAN of %d [%#x, %#x): %w", p.pid, cur, end, errno)
		}
		n := int(r)
		if n > len(p.buf) {
			return nil, fmt.Errorf("PAGEMAP_SCAN of %d: kernel returned %d regions for a buffer of %d", p.pid, n, len(p.buf))
		}
		for _, reg := range p.buf[:n] {
			if k := len(out) - 1; k >= 0 && out[k].End == reg.Start && out[k].Categories == reg.Categories {
				out[k].End = reg.End // split across calls
				continue
			}
			out = append(out, reg)
		}
		if arg.walkEnd <= cur {
			return nil, fmt.Errorf("PAGEMAP_SCAN of %d made no progress at %#x (walk_end %#x)", p.pid, cur, arg.walkEnd)
		}
		cur = arg.walkEnd
	}
	runtime.KeepAlive(p)
	return out, nil
}
