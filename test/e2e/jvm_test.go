package e2e

import (
	"os"
	"path/filepath"
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
	if out, err := runTimeout(2*time.Minute, dir, javacExe, "-J-XX:-UsePerfData", "-d", dir, src); err != nil {
		t.Fatalf("javac: %v\n%s", err, out)
	}
	// No hsperfdata: a shared file mapping in /tmp that children would
	// share with the parent (and this run's /tmp would keep).
	p := startProc(t, "MtParent", javaExe, "-XX:-UsePerfData", "-Xmx256m", "-cp", dir, "MtParent")
	forkStoppedRuntime(t, p, "threads-jvm", 10, []string{"pool", "queue", "gc"})
}
