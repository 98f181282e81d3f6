package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/node"
)

// daemonUsage is what a leaking daemon would grow: descriptors, threads,
// mappings, resident memory, child logs.
type daemonUsage struct {
	fds, threads, maps, rssKB, logs int
}

func usage(t *testing.T) daemonUsage {
	t.Helper()
	var u daemonUsage
	ents, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(daemonPID), "fd"))
	if err != nil {
		t.Fatal(err)
	}
	u.fds = len(ents)
	if u.threads, err = procInt(daemonPID, "Threads"); err != nil {
		t.Fatal(err)
	}
	rss, err := procStatus(daemonPID, "VmRSS")
	if err != nil {
		t.Fatal(err)
	}
	if u.rssKB, err = strconv.Atoi(strings.Fields(rss)[0]); err != nil {
		t.Fatalf("VmRSS %q: %v", rss, err)
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(daemonPID), "maps"))
	if err != nil {
		t.Fatal(err)
	}
	u.maps = strings.Count(string(b), "\n")
	logs, _ := os.ReadDir(filepath.Join(stateDir, "children"))
	u.logs = len(logs)
	return u
}

// TestSoakShort: 1,200 children of one seed, 4 in flight, through the
// daemon; afterwards the daemon holds exactly the descriptors it held
// before, no more threads than the Go runtime's bound below, a bounded
// child history, and about the same memory. (The 10,000-child version is
// the same loop run longer: MITOSIS_SOAK=10000.)
func TestSoakShort(t *testing.T) {
	requireSetup(t)
	n := 1200
	if v := os.Getenv("MITOSIS_SOAK"); v != "" {
		if k, err := strconv.Atoi(v); err == nil && k > 0 {
			n = k
		}
	}
	p := startCParent(t, parentStatic)
	seed := prepareSeed(t, p.pid, "soak-c")
	forkMany(t, seed, 40, 4, nil) // warm-up: pools, caches, runtime threads
	time.Sleep(200 * time.Millisecond)
	before := usage(t)
	start := time.Now()
	forkMany(t, seed, n, 4, nil)
	took := time.Since(start)
	// Reaping is asynchronous: give the last exits a moment.
	var after daemonUsage
	deadline := time.Now().Add(10 * time.Second)
	for {
		after = usage(t)
		if after.fds <= before.fds || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%d children in %v (%.0f/s); daemon before %+v after %+v", n, took.Round(time.Millisecond), float64(n)/took.Seconds(), before, after)
	if after.fds != before.fds {
		t.Errorf("daemon descriptors %d -> %d after %d children", before.fds, after.fds, n)
	}
	if after.threads > before.threads+4 {
		t.Errorf("daemon threads %d -> %d", before.threads, after.threads)
	}
	if after.maps > before.maps+32 {
		t.Errorf("daemon mappings %d -> %d", before.maps, after.maps)
	}
	if after.rssKB > before.rssKB*13/10+8<<10 {
		t.Errorf("daemon RSS %d kB -> %d kB", before.rssKB, after.rssKB)
	}
	kids, err := psChildren()
	if err != nil {
		t.Fatal(err)
	}
	if len(kids) > node.MaxHistory+8 {
		t.Errorf("ps lists %d children after %d; the history is bounded at %d", len(kids), n+40, node.MaxHistory)
	}
	running := 0
	for _, k := range kids {
		if jsonStr(k, "state") == "running" {
			running++
		}
	}
	if running != 0 {
		t.Errorf("%d children still running", running)
	}
	continueParent(t, p)
	if code, err := p.waitExit(30 * time.Second); err != nil || code != 0 {
		t.Errorf("parent exit %d (%v)", code, err)
	}
}
