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

// boxPy stops itself at its prepare point; after it, it reports what it
// sees of its container, or blows its memory limit when /app/mode says so.
const boxPy = `import hashlib, os, signal, socket
data = bytes(range(256)) * 40000
print("READY", os.getpid(), flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
if open("/app/mode").read().strip() == "oom":
    hog = [b"x" * (8 << 20) for _ in range(64)]
print("BOX", socket.gethostname(), os.getpid(), os.path.exists("/var"), hashlib.sha256(data).hexdigest()[:16], flush=True)
`

// imageDir builds an image directory from the host's /usr (bind mounted)
// holding boxPy; it is unmounted and removed when the test ends.
func imageDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp(tmpRoot, "image-")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"usr", "app", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, l := range []string{"bin", "lib", "lib64", "sbin"} {
		if err := os.Symlink("usr/"+l, filepath.Join(dir, l)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "app", "box.py"), []byte(boxPy), 0o644); err != nil {
		t.Fatal(err)
	}
	usr := filepath.Join(dir, "usr")
	if err := syscall.Mount("/usr", usr, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		t.Fatalf("bind /usr: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(usr, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", usr, err)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove image %s: %v", dir, err)
		}
	})
	return dir
}

// runStopped runs `mitosis ARGS...` (a `mitosis run` of a parent that stops
// itself at its prepare point), returns the parent's pid once it has
// stopped, and kills it when the test ends.
func runStopped(t *testing.T, args ...string) int {
	t.Helper()
	r := mitosis(cliTimeout, args...)
	if !r.ok() {
		t.Fatalf("run:\n%s", r)
	}
	f := strings.Fields(r.stdout)
	pid, err := strconv.Atoi(f[len(f)-1])
	if err != nil {
		t.Fatalf("run printed no pid:\n%s", r)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	if err := waitState(pid, "T", 60*time.Second); err != nil {
		t.Fatalf("containerized parent %d did not reach its prepare point: %v", pid, err)
	}
	return pid
}

// TestContainer: `mitosis run` starts a Python parent in an image with a
// memory limit; children of its seed run in containers of their own: their
// own hostname and PID 1, only the image's files, the parent's memory; a
// child that exceeds the limit is killed and reported oom-killed while the
// parent and its siblings are unaffected.
func TestContainer(t *testing.T) {
	img := imageDir(t)
	mode := filepath.Join(img, "app", "mode")
	if err := os.WriteFile(mode, []byte("ok"), 0o644); err != nil {
		t.Fatal(err)
	}
	pid := runStopped(t, "run", "--rootfs", img, "--memory", "96M", "--", "/usr/bin/python3", "/app/box.py")
	seed := prepareSeed(t, pid, "box")

	var digests []string
	for i := 0; i < 2; i++ {
		out, err := os.CreateTemp(tmpRoot, "box-out-")
		if err != nil {
			t.Fatal(err)
		}
		r := mitosisTo(cliTimeout, out, "fork", seed)
		out.Close()
		os.Remove(out.Name())
		if !r.ok() {
			t.Fatalf("fork into a container:\n%s", r)
		}
		w := strings.Fields(r.stdout)
		if len(w) != 5 || w[0] != "BOX" {
			t.Fatalf("child printed %q", r.stdout)
		}
		if !strings.HasPrefix(w[1], "c-") || w[2] != "1" || w[3] != "False" {
			t.Errorf("child sees hostname %s, pid %s, /var %s; want its id, 1, False", w[1], w[2], w[3])
		}
		digests = append(digests, w[4])
	}
	if digests[0] != digests[1] {
		t.Errorf("children digests differ: %v", digests)
	}

	if err := os.WriteFile(mode, []byte("oom"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := mitosis(2*cliTimeout, "fork", seed)
	if r.code != 128+int(syscall.SIGKILL) {
		t.Fatalf("child over its memory limit: want exit %d (SIGKILL):\n%s", 128+int(syscall.SIGKILL), r)
	}
	kids, err := psChildren()
	if err != nil {
		t.Fatal(err)
	}
	oom := 0
	for _, k := range kids {
		if jsonStr(k, "seed") == seed && jsonStr(k, "state") == "oom-killed" {
			oom++
		}
	}
	if oom != 1 {
		t.Errorf("ps shows %d oom-killed children of %s, want 1: %v", oom, seed, kids)
	}
	// The parent is unharmed and a sibling still works.
	if st, err := procState(pid); err != nil || st != "T" {
		t.Errorf("parent after the OOM kill: state %q, %v", st, err)
	}
	if err := os.WriteFile(mode, []byte("ok"), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := mitosis(cliTimeout, "fork", seed); !r.ok() || !strings.Contains(r.stdout, digests[0]) {
		t.Errorf("sibling after the OOM kill:\n%s", r)
	}
	// Removing the seed removes its children's cgroups and its pool.
	if r := mitosis(cliTimeout, "rm", seed, "--force"); !r.ok() {
		t.Fatalf("rm:\n%s", r)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		left, _ := filepath.Glob("/sys/fs/cgroup/*/*/*/seed-" + seed + "*")
		more, _ := filepath.Glob("/sys/fs/cgroup/*/seed-" + seed + "*")
		unified, _ := filepath.Glob("/sys/fs/cgroup/seed-" + seed + "*")
		left = append(append(left, more...), unified...)
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cgroups left after rm: %v", left)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
