package platform

import (
	"fmt"

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

// Settings of SetPageReporting (mitosis-workflow-bench -free-page-reporting).
const (
	PageReportingKeep = "keep" // leave the host's setting as it is (the default)
	PageReportingOff  = "off"  // turn reporting off for the benchmark's run, then restore it
)

// disableReporting turns reporting off and returns what restores the
// setting it found, and a line saying what it did. Kernels that refuse an
// order above hostmem.MaxBuddyOrder get MaxBuddyOrder: only whole 4 MiB
// blocks are reported, which the line says. Without free page reporting,
// it does nothing.
func disableReporting(p hostmem.Params) (restore func() error, said string, err error) {
	const maxBuddyOrder = hostmem.MaxBuddyOrder
	was, ok, err := p.Order()
	if err != nil {
		return nil, "", err
	}
	if !ok {
		return func() error { return nil }, "this kernel has no free page reporting", nil
	}
	restore = func() error { return p.SetOrder(was) }
	if was > maxBuddyOrder {
		return restore, fmt.Sprintf("free page reporting was off already (page_reporting_order %d)", was), nil
	}
	if err := p.SetOrder(maxBuddyOrder + 1); err == nil {
		return restore, fmt.Sprintf("free page reporting off for this run (page_reporting_order %d, restored to %d after)", maxBuddyOrder+1, was), nil
	}
	if err := p.SetOrder(maxBuddyOrder); err != nil {
		return nil, "", fmt.Errorf("%w (run as root, or use -free-page-reporting keep)", err)
	}
	return restore, fmt.Sprintf("free page reporting of 4 MiB blocks only for this run (page_reporting_order %d: the kernel refused %d; restored to %d after)", maxBuddyOrder, maxBuddyOrder+1, was), nil
}

// SetPageReporting applies a -free-page-reporting setting (PageReportingKeep
// or PageReportingOff) to this host and returns what restores it and a line
// for the results saying how the host reported free pages.
func SetPageReporting(mode string) (restore func() error, said string, err error) {
	switch mode {
	case "", PageReportingKeep:
		_, why := hostmem.Reporting()
		return func() error { return nil }, why + ", as the host has it", nil
	case PageReportingOff:
		return disableReporting(hostmem.Params{Dir: hostmem.ParamsDir})
	}
	return nil, "", fmt.Errorf("free page reporting %q: want keep or off", mode)
}
