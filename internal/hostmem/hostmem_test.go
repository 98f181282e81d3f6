package hostmem

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReporting(t *testing.T) {
	write := func(root, path, v string) {
		t.Helper()
		p := filepath.Join(root, path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	balloon := func(root, dev, features string) {
		write(root, "bus/virtio/devices/"+dev+"/device", "0x0005\n")
		write(root, "bus/virtio/devices/"+dev+"/features", features+"\n")
	}
	const order = "module/page_reporting/parameters/page_reporting_order"
	for _, tc := range []struct {
		name  string
		setup func(root string)
		on    bool
		why   string
	}{
		{"no page reporting in the kernel", func(string) {}, false, "no free page reporting"},
		{"order above the largest block", func(r string) {
			write(r, order, "11\n")
			balloon(r, "virtio0", "0110010100")
		}, false, "off (page_reporting_order 11)"},
		{"a balloon that reports", func(r string) {
			write(r, order, "9\n")
			write(r, "bus/virtio/devices/virtio1/device", "0x0002\n") // a block device
			write(r, "bus/virtio/devices/virtio1/features", "1111111111\n")
			balloon(r, "virtio0", "0110010100")
		}, true, "free blocks of 2048 KiB"},
		{"a balloon without the feature", func(r string) {
			write(r, order, "9\n")
			balloon(r, "virtio0", "0110000000")
		}, false, "no virtio balloon reports"},
		{"no balloon", func(r string) { write(r, order, "9\n") }, false, "no virtio balloon reports"},
		{"malformed order", func(r string) { write(r, order, "nine\n") }, false, "unreadable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			tc.setup(root)
			on, why := reporting(root)
			if on != tc.on || !strings.Contains(why, tc.why) {
				t.Errorf("reporting = %v, %q; want %v and %q", on, why, tc.on, tc.why)
			}
		})
	}
	// This host: whatever it says, it says why.
	if _, why := Reporting(); why == "" {
		t.Error("Reporting gave no reason")
	}
}
