package node

import (
	"bufio"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/internal/procfs"
)

// TestPssCache: a process's Pss is measured once while it stays the same
// size, measured again when its resident size grows, and forgotten when it
// is no longer listed; a process that is gone has none.
func TestPssCache(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("no python3")
	}
	cmd := exec.Command(py, "-c", `import sys
print("ready", flush=True)
sys.stdin.readline()
b = bytearray(96 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
print("grown", flush=True)
sys.stdin.readline()`)
	in, _ := cmd.StdinPipe()
	outp, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	out := bufio.NewReader(outp)
	pid := cmd.Process.Pid
	if l, err := out.ReadString('\n'); err != nil || strings.TrimSpace(l) != "ready" {
		t.Fatalf("child: %q %v", l, err)
	}

	c := newPssCache()
	reads := 0
	c.read = func(pid int) (procfs.Smaps, error) { reads++; return procfs.ReadSmaps(pid) }
	now := time.Now()
	var first uint64
	for i := 0; i < 50; i++ {
		p, ok := c.pss(pid, now)
		if !ok {
			t.Fatal("no Pss for a live process")
		}
		if first == 0 {
			first = p
		}
		time.Sleep(10 * time.Millisecond)
	}
	if first == 0 || reads != 1 {
		t.Fatalf("50 measures of an idle process read smaps %d times (Pss %d)", reads, first)
	}
	before := reads
	if p, _ := c.pss(pid, now.Add(pssMaxAge)); reads != before+1 || p == 0 {
		t.Errorf("a measure older than %v was reused (reads %d -> %d)", pssMaxAge, before, reads)
	}

	if _, err := in.Write([]byte("go\n")); err != nil {
		t.Fatal(err)
	}
	if l, err := out.ReadString('\n'); err != nil || strings.TrimSpace(l) != "grown" {
		t.Fatalf("child: %q %v", l, err)
	}
	before = reads
	grown, ok := c.pss(pid, now.Add(pssMaxAge))
	if !ok || reads != before+1 || grown < first+80<<20 {
		t.Errorf("after the process grew by 96 MiB: Pss %d (was %d), smaps read %d times (want one more than %d)", grown, first, reads, before)
	}

	c.keepOnly(map[int]bool{})
	if len(c.m) != 0 {
		t.Errorf("keepOnly(none) left %d entries", len(c.m))
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if _, ok := c.pss(pid, now); ok {
		t.Error("a Pss for a process that is gone")
	}
}

func TestNear(t *testing.T) {
	for _, tc := range []struct {
		a, b int
		want bool
	}{{1600, 1600, true}, {1600, 1700, true}, {1600, 1710, false}, {1700, 1600, true}, {0, 0, true}, {0, 1, false}} {
		if got := near(tc.a, tc.b); got != tc.want {
			t.Errorf("near(%d, %d) = %v", tc.a, tc.b, got)
		}
	}
}
