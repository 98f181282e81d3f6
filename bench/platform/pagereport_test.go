package platform

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPageReporting(t *testing.T) {
	write := func(dir, name, v string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("off and restored", func(t *testing.T) {
		p := pageReporting{t.TempDir()}
		write(p.dir, "page_reporting_order", "9\n")
		write(p.dir, "reported_kib", "2048\n")
		restore, said, err := p.disable()
		if err != nil {
			t.Fatal(err)
		}
		if o, _, _ := p.order(); o != maxBuddyOrder+1 {
			t.Errorf("order after disable = %d, want %d", o, maxBuddyOrder+1)
		}
		if !strings.Contains(said, "off for this run") || !strings.Contains(said, "restored to 9") {
			t.Errorf("disable said %q", said)
		}
		if err := restore(); err != nil {
			t.Fatal(err)
		}
		if o, _, _ := p.order(); o != 9 {
			t.Errorf("order after restore = %d, want 9", o)
		}
		if kib, ok := p.reportedKiB(); !ok || kib != 2048 {
			t.Errorf("reportedKiB = %d, %v", kib, ok)
		}
	})
	t.Run("off already", func(t *testing.T) {
		p := pageReporting{t.TempDir()}
		write(p.dir, "page_reporting_order", "11")
		restore, said, err := p.disable()
		if err != nil || !strings.Contains(said, "off already") {
			t.Fatalf("disable = %q, %v", said, err)
		}
		if err := restore(); err != nil {
			t.Fatal(err)
		}
		if o, _, _ := p.order(); o != 11 {
			t.Errorf("order = %d, want 11", o)
		}
	})
	t.Run("no reporting", func(t *testing.T) {
		p := pageReporting{filepath.Join(t.TempDir(), "absent")}
		restore, said, err := p.disable()
		if err != nil || restore() != nil || !strings.Contains(said, "no free page reporting") {
			t.Fatalf("disable = %q, %v", said, err)
		}
		if _, ok := p.reportedKiB(); ok {
			t.Error("reportedKiB ok without the file")
		}
	})
	t.Run("malformed", func(t *testing.T) {
		p := pageReporting{t.TempDir()}
		write(p.dir, "page_reporting_order", "nine")
		if _, _, err := p.disable(); err == nil || !strings.Contains(err.Error(), "page_reporting_order") {
			t.Fatalf("disable of a malformed order: %v", err)
		}
	})
	if _, _, err := SetPageReporting("sometimes"); err == nil || !strings.Contains(err.Error(), "want keep or off") {
		t.Errorf("SetPageReporting(sometimes) = %v", err)
	}
}
