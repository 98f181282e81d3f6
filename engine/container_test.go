package engine

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// boxSrc reports what a process sees of its container after the prepare
// point, and a digest of state built before it.
const boxSrc = `
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <unistd.h>
int main(int argc, char **argv) {
	size_t n = 8 << 20;
	unsigned char *a = malloc(n);
	for (size_t i = 0; i < n; i++) a[i] = (unsigned char)(i * 31 + 7);
	FILE *f = fopen(argv[1], "r");
	char head[8] = {0};
	fread(head, 1, 4, f);
	printf("READY %d\n", getpid());
	fflush(stdout);
	raise(SIGSTOP);
	unsigned long h = 1469598103934665603UL;
	for (size_t i = 0; i < n; i++) { h ^= a[i]; h *= 1099511628211UL; }
	char host[64] = {0};
	gethostname(host, sizeof host);
	char rest[8] = {0};
	fread(rest, 1, 4, f);
	printf("DIGEST %lx %s%s host %s pid %d var %d\n", h, head, rest, host, getpid(), access("/var", F_OK) == 0);
	return 0;
}
`

// makeRoot builds a minimal image directory from the host's /usr (bind
// mounted) and returns it; everything is unmounted and removed at cleanup.
func makeRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "mitosis-box-")
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "root")
	for _, d := range []string{"usr", "app", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, l := range []string{"bin", "lib", "lib64", "sbin"} {
		if err := os.Symlink("usr/"+l, filepath.Join(root, l)); err != nil {
			t.Fatal(err)
		}
	}
	usr := filepath.Join(root, "usr")
	if err := unix.Mount("/usr", usr, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		t.Fatalf("bind /usr: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(usr, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", usr, err)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	return root
}

// TestForkIntoContainer: a parent running chrooted in an image is
// prepared; its child runs in namespaces of its own in the same image:
// its own hostname, PID 1, only the image's files, the parent's memory
// and open file at its offset.
func TestForkIntoContainer(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	root := makeRoot(t)
	src := filepath.Join(root, "app", "box.c")
	if err := os.WriteFile(src, []byte(boxSrc), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("gcc", "-O1", "-o", filepath.Join(root, "app", "box"), src).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	if err := os.WriteFile(filepath.Join(root, "app", "data"), []byte("abcdefgh"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/app/box", "/app/data")
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root}
	cmd.Dir = "/"
	p := startCmd(t, cmd)
	out := p.out
	e, s := prepared(t, cmd.Process.Pid)
	got, st := runChild(t, e, s, ForkOptions{Root: root, Hostname: "mitosis-box-1"})
	if st.ExitStatus() != 0 || st.Signaled() {
		t.Fatalf("child status %v output %q", st, got)
	}
	_ = unix.Kill(cmd.Process.Pid, unix.SIGCONT)
	want, err := out.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	gf, wf := strings.Fields(got), strings.Fields(want)
	if len(gf) != 9 || len(wf) != 9 {
		t.Fatalf("child %q parent %q", got, want)
	}
	host, _ := os.Hostname()
	switch {
	case gf[1] != wf[1] || gf[2] != wf[2] || gf[2] != "abcdefgh":
		t.Errorf("memory/file: child %q, parent %q", got, want)
	case gf[4] != "mitosis-box-1" || wf[4] != host:
		t.Errorf("hostname: child %q, parent %q (host %q)", gf[4], wf[4], host)
	case gf[6] != "1" || wf[6] != strconv.Itoa(cmd.Process.Pid):
		t.Errorf("pid: child %q, parent %q", gf[6], wf[6])
	case gf[8] != "0":
		t.Errorf("child sees /var, a file outside its image")
	}
	// Another image path: the fork names the file that differs.
	other := makeRoot(t)
	_, err = e.Fork(s, ForkOptions{Root: other, Hostname: "x"})
	if err == nil || !strings.Contains(err.Error(), "/app/") {
		t.Fatalf("fork into an image without the parent's files: %v", err)
	}
}
