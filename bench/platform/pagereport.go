package platform

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/mitosis-fork/mitosis/internal/hostmem"
)

// Free page reporting is how a guest kernel hands memory it has freed back
// to its hypervisor (virtio-balloon's VIRTIO_BALLOON_F_REPORTING): a few
// seconds after a run of free blocks of at least 2^page_reporting_order
// pages appears, the kernel reports it and the host discards its backing.
// The guest memory that takes those pages again then pays a host fault
// per page before its own fault completes. A run that frees gigabytes (a
// storage run: 32 unpickled copies of the state) thus makes whichever run
// comes after it slower, whatever that run does; the workflow benchmark
// lets the run turn reporting off to measure the ways without it, as on
// a host with no balloon (bare metal, or a VM whose memory is pinned).

// pageReportingDir is where the kernel's page_reporting module keeps its
// parameters.
const pageReportingDir = "/sys/module/page_reporting/parameters"

// Page reporting settings of WorkflowConfig.PageReporting.
const (
	PageReportingKeep = "keep" // leave the host's setting as it is (the default)
	PageReportingOff  = "off"  // turn reporting off for the benchmark's run, then restore it
)

// pageReporting is one host's free page reporting parameters, in dir.
type pageReporting struct{ dir string }

// order is the smallest block order the kernel reports (page_reporting_order).
// ok is false when this kernel has no free page reporting.
func (p pageReporting) order() (order int, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(p.dir, "page_reporting_order"))
	if os.IsNotExist(err) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("free page reporting: %w", err)
	}
	order, err = strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, false, fmt.Errorf("free page reporting: page_reporting_order %q: %w", b, err)
	}
	return order, true, nil
}

func (p pageReporting) setOrder(order int) error {
	path := filepath.Join(p.dir, "page_reporting_order")
	if err := os.WriteFile(path, []byte(strconv.Itoa(order)), 0o644); err != nil {
		return fmt.Errorf("free page reporting: set %s to %d: %w", path, order, err)
	}
	got, _, err := p.order()
	if err != nil {
		return err
	}
	if got != order {
		return fmt.Errorf("free page reporting: set %s to %d: the kernel kept %d", path, order, got)
	}
	return nil
}

// reportedKiB is the memory the guest has reported to the host since boot,
// where the kernel counts it (reported_kib is not in every kernel).
func (p pageReporting) reportedKiB() (kib int64, ok bool) {
	b, err := os.ReadFile(filepath.Join(p.dir, "reported_kib"))
	if err != nil {
		return 0, false
	}
	kib, err = strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return kib, err == nil
}

// maxBuddyOrder is the largest block the page allocator makes on x86-64
// and arm64 with 4 KiB pages (MAX_PAGE_ORDER, 4 MiB): a reporting order
// above it reports nothing.
const maxBuddyOrder = 10

// disable turns reporting off and returns what restores the setting it
// found, and a line saying what it did. Kernels that refuse an order above
// maxBuddyOrder get maxBuddyOrder: only whole 4 MiB blocks are reported,
// which the line says. Without free page reporting, disable does nothing.
func (p pageReporting) disable() (restore func() error, said string, err error) {
	was, ok, err := p.order()
	if err != nil {
		return nil, "", err
	}
	if !ok {
		return func() error { return nil }, "this kernel has no free page reporting", nil
	}
	restore = func() error { return p.setOrder(was) }
	if was > maxBuddyOrder {
		return restore, fmt.Sprintf("free page reporting was off already (page_reporting_order %d)", was), nil
	}
	if err := p.setOrder(maxBuddyOrder + 1); err == nil {
		return restore, fmt.Sprintf("free page reporting off for this run (page_reporting_order %d, restored to %d after)", maxBuddyOrder+1, was), nil
	}
	if err := p.setOrder(maxBuddyOrder); err != nil {
		return nil, "", fmt.Errorf("%w (run as root, or use -free-page-reporting keep)", err)
	}
	return restore, fmt.Sprintf("free page reporting of 4 MiB blocks only for this run (page_reporting_order %d: the kernel refused %d; restored to %d after)", maxBuddyOrder, maxBuddyOrder+1, was), nil
}

// SetPageReporting applies a -free-page-reporting setting (PageReportingKeep
// or PageReportingOff) to this host and returns what restores it and a line
// for the results saying how the host reported free pages.
func SetPageReporting(mode string) (restore func() error, said string, err error) {
	p := pageReporting{pageReportingDir}
	switch mode {
	case "", PageReportingKeep:
		_, why := hostmem.Reporting()
		return func() error { return nil }, why + ", as the host has it", nil
	case PageReportingOff:
		return p.disable()
	}
	return nil, "", fmt.Errorf("free page reporting %q: want keep or off", mode)
}
