package platform

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mitosis-fork/mitosis/internal/hostmem"
)

func TestPageReporting(t *testing.T) {
	write := func(dir, name, v string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("off and restored", func(t *testing.T) {
		p := hostmem.Params{Dir: t.TempDir()}
		write(p.Dir, "page_reporting_order", "9\n")
		write(p.Dir, "reported_kib", "2048\n")
		restore, said, err := disableReporting(p)
		if err != nil {
			t.Fatal(err)
		}
		if o, _, _ := p.Order(); o != hostmem.MaxBuddyOrder+1 {
			t.Errorf("order after disable = %d, want %d", o, hostmem.MaxBuddyOrder+1)
		}
		if !strings.Contains(said, "off for this run") || !strings.Contains(said, "restored to 9") {
			t.Errorf("disable said %q", said)
		}
		if err := restore(); err != nil {
			t.Fatal(err)
		}
		if o, _, _ := p.Order(); o != 9 {
			t.Errorf("order after restore = %d, want 9", o)
		}
		if kib, ok := p.ReportedKiB(); !ok || kib != 2048 {
			t.Errorf("reportedKiB = %d, %v", kib, ok)
		}
	})
	t.Run("off already", func(t *testing.T) {
		p := hostmem.Params{Dir: t.TempDir()}
		write(p.Dir, "page_reporting_order", "11")
		restore, said, err := disableReporting(p)
		if err != nil || !strings.Contains(said, "off already") {
			t.Fatalf("disable = %q, %v", said, err)
		}
		if err := restore(); err != nil {
			t.Fatal(err)
		}
		if o, _, _ := p.Order(); o != 11 {
			t.Errorf("order = %d, want 11", o)
		}
	})
	t.Run("no reporting", func(t *testing.T) {
		p := hostmem.Params{Dir: filepath.Join(t.TempDir(), "absent")}
		restore, said, err := disableReporting(p)
		if err != nil || restore() != nil || !strings.Contains(said, "no free page reporting") {
			t.Fatalf("disable = %q, %v", said, err)
		}
		if _, ok := p.ReportedKiB(); ok {
			t.Error("reportedKiB ok without the file")
		}
	})
	t.Run("malformed", func(t *testing.T) {
		p := hostmem.Params{Dir: t.TempDir()}
		write(p.Dir, "page_reporting_order", "nine")
		if _, _, err := disableReporting(p); err == nil || !strings.Contains(err.Error(), "page_reporting_order") {
			t.Fatalf("disable of a malformed order: %v", err)
		}
	})
	if _, _, err := SetPageReporting("sometimes"); err == nil || !strings.Contains(err.Error(), "want keep or off") {
		t.Errorf("SetPageReporting(sometimes) = %v", err)
	}
}
