// Package hostmem tells whether this host hands the memory it frees back
// to a hypervisor (free page reporting), which decides whether the node
// page cache of 2 MiB pages pays off: a guest whose balloon reports free
// 2 MiB blocks makes every fresh huge folio wait for the host to back it
// again (BENCHMARKS.md, workflows, ninth session).
package hostmem

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// MaxBuddyOrder is the largest block the page allocator makes on x86-64
// and arm64 with 4 KiB pages (MAX_PAGE_ORDER, 4 MiB): a reporting order
// above it reports nothing.
const MaxBuddyOrder = 10

// ParamsDir is where the kernel's page_reporting module keeps its
// parameters.
const ParamsDir = "/sys/module/page_reporting/parameters"

// Params are a kernel's free page reporting parameters, in Dir (ParamsDir
// on a live host).
type Params struct{ Dir string }

// Order is the smallest block order the kernel reports
// (page_reporting_order); ok is false when the kernel has no free page
// reporting.
func (p Params) Order() (order int, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(p.Dir, "page_reporting_order"))
	if os.IsNotExist(err) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("free page reporting: %w", err)
	}
	order, err = strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, false, fmt.Errorf("free page reporting: page_reporting_order %q unreadable: %w", strings.TrimSpace(string(b)), err)
	}
	return order, true, nil
}

// SetOrder sets page_reporting_order and checks that the kernel kept it.
func (p Params) SetOrder(order int) error {
	path := filepath.Join(p.Dir, "page_reporting_order")
	if err := os.WriteFile(path, []byte(strconv.Itoa(order)), 0o644); err != nil {
		return fmt.Errorf("free page reporting: set %s to %d: %w", path, order, err)
	}
	got, _, err := p.Order()
	if err != nil {
		return err
	}
	if got != order {
		return fmt.Errorf("free page reporting: set %s to %d: the kernel kept %d", path, order, got)
	}
	return nil
}

// ReportedKiB is the memory the guest has reported to the host since boot,
// where the kernel counts it (reported_kib is not in every kernel).
func (p Params) ReportedKiB() (kib int64, ok bool) {
	b, err := os.ReadFile(filepath.Join(p.Dir, "reported_kib"))
	if err != nil {
		return 0, false
	}
	kib, err = strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return kib, err == nil
}

// virtioBalloon is the virtio device id of a memory balloon, and
// featReporting the bit of VIRTIO_BALLOON_F_REPORTING in its features.
const (
	virtioBalloon = "0x0005"
	featReporting = 5
)

// Reporting says whether the kernel reports free pages to a hypervisor,
// and why it says so.
func Reporting() (on bool, why string) { return reporting("/sys") }

// reporting is Reporting for the sysfs mounted at sys.
func reporting(sys string) (bool, string) {
	order, ok, err := Params{filepath.Join(sys, "module/page_reporting/parameters")}.Order()
	if err != nil {
		return false, err.Error()
	}
	if !ok {
		return false, "the kernel has no free page reporting"
	}
	if order > MaxBuddyOrder {
		return false, fmt.Sprintf("free page reporting off (page_reporting_order %d)", order)
	}
	devs, _ := filepath.Glob(filepath.Join(sys, "bus/virtio/devices/*"))
	for _, d := range devs {
		id, err := os.ReadFile(filepath.Join(d, "device"))
		if err != nil || strings.TrimSpace(string(id)) != virtioBalloon {
			continue
		}
		feat, err := os.ReadFile(filepath.Join(d, "features"))
		if f := strings.TrimSpace(string(feat)); err == nil && len(f) > featReporting && f[featReporting] == '1' {
			return true, fmt.Sprintf("a virtio balloon reports free blocks of %d KiB and up to the hypervisor (page_reporting_order %d)", 4<<order, order)
		}
	}
	return false, "no virtio balloon reports free pages"
}
