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

// maxBuddyOrder is MAX_PAGE_ORDER with 4 KiB pages: a reporting order
// above it reports nothing.
const maxBuddyOrder = 10

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
	b, err := os.ReadFile(filepath.Join(sys, "module/page_reporting/parameters/page_reporting_order"))
	if err != nil {
		return false, "the kernel has no free page reporting"
	}
	order, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return false, fmt.Sprintf("page_reporting_order %q unreadable", strings.TrimSpace(string(b)))
	}
	if order > maxBuddyOrder {
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
