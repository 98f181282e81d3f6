package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/internal/procfs"
)

// restartScript is a prepare-self parent holding 24 MiB of pseudo-random
// bytes and a 200,000-entry dict; it stays alive. Children sleep for the
// payload's "sleep" seconds, then hash all of it (touching pages they
// never touched before) and print the digest.
const restartScript = `
import hashlib, random, sys, time
sys.path.insert(0, sys.argv[1])
import mitosis
blob = random.Random(42).randbytes(24 << 20)
table = {i: str(i * 7) for i in range(200000)}
def digest():
    h = hashlib.sha256(blob)
    h.update(repr(table).encode())
    return h.hexdigest()
r = mitosis.prepare(name="rs")
if r.is_parent:
    print("PARENT", r.seed, digest(), flush=True)
    while True:
        time.sleep(1000)
time.sleep((r.payload or {}).get("sleep", 0))
print("DIGEST", digest(), flush=True)
`

// startRestartParent starts restartScript against d and returns the seed
// id, the parent's digest and the parent (killed when the test ends).
func startRestartParent(t *testing.T, d *testDaemon) (seed, digest string, parent *exec.Cmd) {
	t.Helper()
	script := filepath.Join(t.TempDir(), "parent.py")
	if err := os.WriteFile(script, []byte(restartScript), 0o600); err != nil {
		t.Fatal(err)
	}
	parent = exec.Command("/usr/bin/python3", script, filepath.Join(clientDir(t), "python"))
	parent.Env = append(os.Environ(), client.SocketEnv+"="+d.sock)
	out, err := parent.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	parent.Stderr = os.Stderr
	if err := parent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = parent.Process.Kill()
		_ = parent.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if _, serr := fmt.Sscanf(line, "PARENT %s %s", &seed, &digest); err != nil || serr != nil {
		t.Fatalf("parent printed %q (%v, %v)", line, err, serr)
	}
	return seed, digest, parent
}

// waitGone waits until path does not exist.
func waitGone(t *testing.T, path string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if _, err := os.Lstat(path); os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still exists after %v", path, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// tracerOf is the process (thread group) that traces pid, 0 if none.
func tracerOf(t *testing.T, pid int) int {
	t.Helper()
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		t.Fatalf("status of %d: %v", pid, err)
	}
	if st.TracerPid == 0 {
		return 0
	}
	// TracerPid names the tracer thread; its Tgid is the daemon.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", st.TracerPid))
	if err != nil {
		t.Fatalf("status of tracer %d: %v", st.TracerPid, err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		var tgid int
		if _, err := fmt.Sscanf(l, "Tgid: %d", &tgid); err == nil {
			return tgid
		}
	}
	t.Fatalf("no Tgid in /proc/%d/status", st.TracerPid)
	return 0
}

// TestDaemonRestart: SIGTERM, then a new daemon on the same state
// directory. The new daemon adopts the seed (same id, same frozen copy,
// now its tracee) and lists the running child; the child, forked before
// the restart, hashes the parent's memory after it (its faults served by
// the old daemon, which drains) and prints the parent's digest; the old
// daemon exits 0 once the child is done; a fork of the seed through the
// new daemon gives the digest again.
func TestDaemonRestart(t *testing.T) {
	dir := t.TempDir()
	a := startDaemonIn(t, dir)
	seed, want, _ := startRestartParent(t, a)
	before := seedsJSON(t, a)
	if len(before) != 1 || before[0].ID != seed {
		t.Fatalf("seeds before the restart: %+v", before)
	}
	src := before[0].SourcePID
	r := a.cli("fork", "rs", "--detach", "--payload", `{"sleep": 3}`)
	r.wantOK(t)
	child := strings.TrimSpace(r.stdout)

	if err := syscall.Kill(a.cmd.Process.Pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitGone(t, a.sock, 5*time.Second) // the old daemon gives up its socket at once
	select {
	case <-a.exited:
		t.Fatalf("the old daemon exited while its child runs: %v\n%s", a.err, a.stderr.String())
	default:
	}

	b := startDaemonIn(t, dir)
	after := seedsJSON(t, b)
	if len(after) != 1 || after[0].ID != seed || after[0].Name != "rs" || after[0].SourcePID != src {
		t.Fatalf("seeds after the restart: %+v; want %s (rs) with frozen copy %d", after, seed, src)
	}
	if tp := tracerOf(t, src); tp != b.cmd.Process.Pid {
		t.Fatalf("frozen copy %d is traced by %d; want the new daemon %d", src, tp, b.cmd.Process.Pid)
	}
	var k *client.ChildInfo
	deadline := time.Now().Add(60 * time.Second)
	for {
		k = nil
		for _, c := range psJSON(t, b) {
			if c.ID == child {
				k = &c
			}
		}
		if k == nil {
			t.Fatalf("the new daemon does not list child %s", child)
		}
		if k.State != client.StateRunning {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("child %s still running after 60 s", child)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if k.State != client.StateExited || k.ExitCode != 0 {
		t.Fatalf("child %s after the restart: %+v; want exited 0", child, *k)
	}
	logText, err := os.ReadFile(k.Log)
	if err != nil || !strings.Contains(string(logText), "DIGEST "+want) {
		t.Fatalf("child log %s = %q (%v); want DIGEST %s", k.Log, logText, err, want)
	}
	select {
	case <-a.exited:
		if a.err != nil {
			t.Fatalf("old daemon: %v", a.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the old daemon did not exit within 10 s of its last child")
	}
	if !strings.Contains(a.stderr.String(), "seeds handed over") {
		t.Fatalf("old daemon log does not report the handover:\n%s", a.stderr.String())
	}

	r = b.cli("fork", seed, "--payload", `{"sleep": 0}`)
	r.wantOK(t)
	if !strings.Contains(r.stdout, "DIGEST "+want) {
		t.Fatalf("fork after the restart printed %q; want DIGEST %s", r.stdout, want)
	}
	b.cli("rm", seed).wantOK(t)
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", src)); err == nil {
		if st, _ := procfs.ReadStat(src); st.State != 'Z' {
			t.Fatalf("frozen copy %d still there (state %c) after rm", src, st.State)
		}
	}
}

// TestDaemonRestartNoSuccessor: SIGTERM with a seed and nobody taking it:
// after --handover-timeout the daemon stops as on SIGINT (seed removed,
// its frozen copy reaped, socket and pid file gone, exit 0).
func TestDaemonRestartNoSuccessor(t *testing.T) {
	a := startDaemonWith(t, "--handover-timeout", "500ms")
	pid := startSleep(t).Process.Pid
	r := a.cli("prepare", "--pid", fmt.Sprint(pid))
	r.wantOK(t)
	src := seedsJSON(t, a)[0].SourcePID
	start := time.Now()
	if err := a.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("daemon exit after SIGTERM: %v\n%s", err, a.stderr.String())
	}
	if took := time.Since(start); took < 400*time.Millisecond || took > 10*time.Second {
		t.Fatalf("stopped %v after SIGTERM; want the 500ms handover wait, then a stop", took)
	}
	if !strings.Contains(a.stderr.String(), "no successor") {
		t.Fatalf("log does not say no successor came:\n%s", a.stderr.String())
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", src)); err == nil {
		t.Fatalf("frozen copy %d still exists", src)
	}
	for _, p := range []string{a.sock, filepath.Join(a.state, "mitosis.pid"), filepath.Join(a.state, "handover.sock")} {
		if _, err := os.Lstat(p); err == nil {
			t.Fatalf("%s left behind", p)
		}
	}
	if tp := tracerOf(t, pid); tp != 0 {
		t.Fatalf("parent %d still traced by %d", pid, tp)
	}
}

// TestDaemonKilled: a SIGKILLed daemon leaves no child that could read
// missing memory as zero (its children die with it) and its frozen copy
// dies too; the next daemon on the same state directory reaps the
// zombie it left in the parent and starts with no seeds; the parent runs
// on, untraced.
func TestDaemonKilled(t *testing.T) {
	dir := t.TempDir()
	a := startDaemonIn(t, dir)
	parent := startSleep(t).Process.Pid
	a.cli("prepare", "--pid", fmt.Sprint(parent), "--name", "k").wantOK(t)
	src := seedsJSON(t, a)[0].SourcePID
	r := a.cli("fork", "k", "--detach")
	r.wantOK(t)
	kid := psJSON(t, a)[0].PID
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", kid)); err != nil || string(comm) != "sleep\n" {
		t.Fatalf("child %d is named %q (%v); want its parent's name, sleep", kid, comm, err)
	}
	if err := syscall.Kill(a.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-a.exited
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := procfs.ReadStat(kid)
		if err != nil || st.State == 'Z' {
			break // gone: PR_SET_PDEATHSIG
		}
		if time.Now().After(deadline) {
			t.Fatalf("child %d still %c 5 s after its daemon was killed", kid, st.State)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The frozen copy dies with the daemon's tracer thread
	// (PTRACE_O_EXITKILL); the SIGKILL may take a moment to finish it.
	sawZombie := false
	for deadline := time.Now().Add(5 * time.Second); ; {
		st, err := procfs.ReadStat(src)
		if err != nil || st.State == 'Z' {
			sawZombie = err == nil
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("frozen copy %d is %c 5 s after its daemon was killed; want dead", src, st.State)
		}
		time.Sleep(10 * time.Millisecond)
	}

	b := startDaemonIn(t, dir)
	if s := seedsJSON(t, b); len(s) != 0 {
		t.Fatalf("seeds after a killed daemon: %+v", s)
	}
	deadline = time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", src)); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			st, _ := procfs.ReadStat(src)
			t.Fatalf("the zombie frozen copy %d (state %c) was not reaped by the next daemon\n%s", src, st.State, b.stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The daemon's stderr reaches the test through a pipe, a moment late.
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(b.stderr.String(), "ended a frozen copy left by a previous daemon"); {
		if time.Now().After(deadline) {
			t.Fatalf("the next daemon's log does not report the sweep (zombie seen: %v):\n%s", sawZombie, b.stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	st, err := procfs.ReadStatus(parent)
	if err != nil || st.TracerPid != 0 || !strings.HasPrefix(st.State, "S") {
		t.Fatalf("parent %d after the sweep: %+v, %v; want sleeping, untraced", parent, st, err)
	}
	b.cli("prepare", "--pid", fmt.Sprint(parent)).wantOK(t)
}
