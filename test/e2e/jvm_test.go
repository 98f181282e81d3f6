package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// JVM tools (Debian's openjdk-17-jdk-headless, installed by .ci/deps).
const (
	javaExe  = "/usr/bin/java"
	javacExe = "/usr/bin/javac"
)

// TestThreadsJVM: an OpenJDK parent (its GC, JIT compiler, signal
// dispatcher and reference-handler threads, a pool of 4 workers, a thread
// blocked in a BlockingQueue, a 200k-entry HashMap; and the JDK's
// dup2-before-close socket, one end of a socketpair whose other end is
// closed) stops itself and is prepared; 8 children (4 at a time) run jobs
// on the pool, a round trip to the blocked thread and a full GC, and print
// the parent's digest.
func TestThreadsJVM(t *testing.T) {
	requireSetup(t)
	for _, exe := range []string{javaExe, javacExe} {
		if _, err := os.Stat(exe); err != nil {
			t.Fatalf("%s: %v (.ci/deps installs Debian's openjdk-17-jdk-headless)", exe, err)
		}
	}
	dir := filepath.Join(tmpRoot, "jvm")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := filepath.Abs(filepath.Join("testdata", "MtParent.java"))
	if err != nil {
		t.Fatal(err)
	}
	if out, err := runTimeout(2*time.Minute, dir, javacExe, "-d", dir, src); err != nil {
		t.Fatalf("javac: %v\n%s", err, out)
	}
	checks := []string{"pool", "queue", "gc"}
	// No hsperfdata: a shared file mapping in /tmp that children would
	// share with the parent (and this run's /tmp would keep).
	p := startProc(t, "MtParent", javaExe, "-XX:-UsePerfData", "-Xmx256m", "-cp", dir, "MtParent")
	l, err := p.waitLine("READY ", readyTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(strings.TrimPrefix(l, "READY ")); got != strconv.Itoa(p.pid) {
		t.Fatalf("MtParent printed %q, want READY %d", l, p.pid)
	}
	if err := waitState(p.pid, "T", 10*time.Second); err != nil {
		t.Fatalf("MtParent did not stop itself at the prepare point: %v", err)
	}
	n, err := procInt(p.pid, "Threads")
	if err != nil || n < 10 {
		t.Fatalf("the JVM has %d threads (%v), want its own and the pool's", n, err)
	}
	seed := prepareSeed(t, p.pid, "threads-jvm")
	assertPreparedParent(t, p)
	start := time.Now()
	res := forkMany(t, seed, 8, 4, mtVerdict(p.pid, "", checks))
	t.Logf("8 children of a %d-thread JVM (4 at a time) in %v", n, time.Since(start).Round(time.Millisecond))
	want := finishParent(t, p, syscall.SIGCONT, checks)
	checkDigests(t, "child", res, want)
}
