package client_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mitosis-fork/mitosis/client"
)

func TestDialNoDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "missing.sock")
	_, err := client.Dial(sock)
	if err == nil {
		t.Fatal("Dial of a missing socket succeeded")
	}
	msg := err.Error()
	if !strings.HasPrefix(msg, "cannot reach mitosis daemon at "+sock+": ") || !strings.HasSuffix(msg, "(start it with `mitosis daemon`)") {
		t.Fatalf("Dial error %q", msg)
	}
}

func TestSocketPath(t *testing.T) {
	t.Setenv(client.SocketEnv, "")
	if got := client.SocketPath(""); got != client.DefaultSocket {
		t.Fatalf("SocketPath(\"\") = %q", got)
	}
	t.Setenv(client.SocketEnv, "/tmp/x.sock")
	if got := client.SocketPath(""); got != "/tmp/x.sock" {
		t.Fatalf("SocketPath with env = %q", got)
	}
	if got := client.SocketPath("/a"); got != "/a" {
		t.Fatalf("SocketPath(/a) = %q", got)
	}
}

func TestExitInfoShellCode(t *testing.T) {
	if c := (client.ExitInfo{Code: 3}).ShellCode(); c != 3 {
		t.Fatal(c)
	}
	if c := (client.ExitInfo{Code: -1, Signal: 9}).ShellCode(); c != 137 {
		t.Fatal(c)
	}
}

// TestPythonMissingSocket imports mitosis.py and checks prepare() against a
// missing socket raises MitosisError.
func TestPythonMissingSocket(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	sock := filepath.Join(t.TempDir(), "missing.sock")
	prog := `
import sys
sys.path.insert(0, sys.argv[1])
import mitosis
try:
    mitosis.prepare(name="x", socket_path=sys.argv[2])
except mitosis.MitosisError as e:
    print("OK", e)
    sys.exit(0)
print("no error raised")
sys.exit(1)
`
	out, err := exec.Command(py, "-c", prog, "python", sock).CombinedOutput()
	if err != nil {
		t.Fatalf("python: %v\n%s", err, out)
	}
	if !strings.HasPrefix(string(out), "OK cannot reach mitosis daemon at "+sock) {
		t.Fatalf("python output %q", out)
	}
	// The environment variable is honoured too, and Role has its properties.
	prog2 := `
import sys
sys.path.insert(0, sys.argv[1])
import mitosis
r = mitosis.Role("child", "s-1", "c-2", {"a": 1})
assert r.is_child and not r.is_parent and r.payload == {"a": 1}
try:
    mitosis.prepare()
except mitosis.MitosisError as e:
    assert sys.argv[2] in str(e), str(e)
    print("OK")
`
	cmd := exec.Command(py, "-c", prog2, "python", sock)
	cmd.Env = append(os.Environ(), client.SocketEnv+"="+sock)
	out, err = cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "OK" {
		t.Fatalf("python: %v\n%s", err, out)
	}
}

// cProg uses mitosis.h: it prints its role, or the error and exits 2.
const cProg = `#include "mitosis.h"

int main(int argc, char **argv)
{
	struct mitosis_role r;
	if (mitosis_prepare_at(argc > 1 ? argv[1] : NULL, "c-test", &r) < 0) {
		printf("ERROR errno=%d %s\n", errno, r.error);
		return 2;
	}
	if (r.role == MITOSIS_PARENT)
		printf("PARENT %s\n", r.seed);
	else
		printf("CHILD %s %s %s\n", r.child, r.seed, r.payload);
	return 0;
}
`

// TestCHeader compiles a tiny program with mitosis.h (warnings are errors)
// and runs it against a missing socket.
func TestCHeader(t *testing.T) {
	cc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("gcc not installed")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "prog.c")
	if err := os.WriteFile(src, []byte(cProg), 0o600); err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "prog")
	out, err := exec.Command(cc, "-std=c99", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-O2",
		"-I", "c", "-o", exe, src).CombinedOutput()
	if err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	sock := filepath.Join(dir, "missing.sock")
	out, err = exec.Command(exe, sock).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
		t.Fatalf("prog: %v, want exit 2\n%s", err, out)
	}
	if !strings.Contains(string(out), "cannot reach mitosis daemon at "+sock) {
		t.Fatalf("prog output %q", out)
	}
}

// TestPythonExit: mitosis.exit runs the atexit handlers, flushes buffered
// stdout and ends with the given code.
func TestPythonExit(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	prog := `
import atexit, sys
sys.path.insert(0, sys.argv[1])
import mitosis
atexit.register(lambda: print("ATEXIT"))
print("HELLO")  # block-buffered: stdout is a pipe
mitosis.exit(3)
print("NOT REACHED")
`
	cmd := exec.Command(py, "-c", prog, "python")
	out, err := cmd.Output()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Fatalf("exit status %v; want 3 (output %q)", err, out)
	}
	if string(out) != "HELLO\nATEXIT\n" {
		t.Fatalf("output %q; want HELLO then ATEXIT", out)
	}
}
