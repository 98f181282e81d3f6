package e2e

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestPythonLean: mitosis.prepare() sheds before it prepares (lean, the
// default): a parent that freed 80 MiB of C heap gives a seed without
// those pages, where prepare(lean=False) keeps them; the parent's garbage
// collector is unfrozen again when prepare returns, a child's keeps the
// inherited objects frozen; both see every object the parent kept.
func TestPythonLean(t *testing.T) {
	requireSetup(t)
	const kept = 16 * 1024
	present := map[string]uint64{}
	seeds := map[string]string{}
	for _, mode := range []string{"lean", "exact"} {
		name := "lean-" + mode + "-" + strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
		p := startProc(t, "leanparent.py "+mode, pyExe, leanParentPy, name, mode)
		l, err := p.waitLine("ROLE ", pyReadyTimeout)
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Fields(l)
		if len(f) < 3 || f[1] != "parent" {
			t.Fatalf("%s: printed %q, want ROLE parent <seed>\n%s", mode, l, p.output())
		}
		seeds[mode] = f[2]
		adoptSeed(t, f[2])
		if l, err := p.waitLine("FROZEN ", lineTimeout); err != nil || l != "FROZEN 0" {
			t.Errorf("%s parent after prepare: %q (%v), want FROZEN 0 (the parent's collector unfrozen)", mode, l, err)
		}
		if l, err := p.waitLine("KEPT ", lineTimeout); err != nil || l != "KEPT "+strconv.Itoa(kept) {
			t.Errorf("%s parent: %q (%v), want KEPT %d", mode, l, err, kept)
		}
	}
	r := mitosis(cliTimeout, "seeds", "--json")
	if !r.ok() {
		t.Fatalf("seeds --json:\n%s", r)
	}
	var list []struct {
		ID           string `json:"id"`
		PresentPages uint64 `json:"present_pages"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil {
		t.Fatalf("seeds --json: %v\n%s", err, r.stdout)
	}
	for _, s := range list {
		for mode, id := range seeds {
			if s.ID == id {
				present[mode] = s.PresentPages
			}
		}
	}
	t.Logf("present pages: lean %d, exact %d", present["lean"], present["exact"])
	// 80 MiB freed is 20480 pages; allow for what malloc_trim cannot give
	// back (chunk headers at page edges, the allocator's own bookkeeping).
	if present["lean"] == 0 || present["exact"] < present["lean"]+16000 {
		t.Errorf("lean seed has %d present pages, exact %d: want at least 16000 fewer (80 MiB of freed heap trimmed)", present["lean"], present["exact"])
	}
	for mode, id := range seeds {
		out := mitosis(forkTimeout, "fork", id)
		if !out.ok() {
			t.Errorf("fork %s seed:\n%s", mode, out)
			continue
		}
		frozen := "FROZEN 0"
		if !strings.Contains(out.stdout, "ROLE child") || !strings.Contains(out.stdout, "KEPT "+strconv.Itoa(kept)) {
			t.Errorf("%s child printed:\n%s", mode, out.stdout)
		}
		if mode == "lean" {
			if strings.Contains(out.stdout, frozen+"\n") || !strings.Contains(out.stdout, "FROZEN ") {
				t.Errorf("lean child: want its inherited objects frozen (FROZEN > 0), printed:\n%s", out.stdout)
			}
		} else if !strings.Contains(out.stdout, frozen+"\n") {
			t.Errorf("exact child: want FROZEN 0, printed:\n%s", out.stdout)
		}
	}
}
