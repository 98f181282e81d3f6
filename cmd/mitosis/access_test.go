package main

import (
	"encoding/json"
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

// Two unprivileged users of the tests (no passwd entries needed).
const (
	uidA = 61001
	uidB = 61002
)

// asUser runs the CLI against d as uid (its own group, no supplementary
// groups).
func (d *testDaemon) asUser(uid int, args ...string) result {
	d.t.Helper()
	cmd := exec.Command(bin, append([]string{"--socket", d.sock}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{}}}
	return runCmd(d.t, cmd)
}

// sleepAs starts `sleep 1000` as uid and kills it when the test ends.
func sleepAs(t *testing.T, uid int) int {
	t.Helper()
	cmd := exec.Command("sleep", "1000")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{}}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd.Process.Pid
}

// reachable lets other users reach d's socket and run the CLI binary: the
// test's temp directories are 0700.
func reachable(t *testing.T, d *testDaemon) {
	t.Helper()
	for _, dir := range []string{filepath.Dir(d.dir), filepath.Dir(bin)} {
		if err := os.Chmod(dir, 0o711); err != nil {
			t.Fatal(err)
		}
	}
}

func seedsAs(t *testing.T, d *testDaemon, uid int) []client.SeedInfo {
	t.Helper()
	r := d.asUser(uid, "seeds", "--json")
	r.wantOK(t)
	var seeds []client.SeedInfo
	if err := json.Unmarshal([]byte(r.stdout), &seeds); err != nil {
		t.Fatalf("seeds --json as uid %d: %q: %v", uid, r.stdout, err)
	}
	return seeds
}

func psAs(t *testing.T, d *testDaemon, uid int) []client.ChildInfo {
	t.Helper()
	r := d.asUser(uid, "ps", "--json")
	r.wantOK(t)
	var kids []client.ChildInfo
	if err := json.Unmarshal([]byte(r.stdout), &kids); err != nil {
		t.Fatalf("ps --json as uid %d: %q: %v", uid, r.stdout, err)
	}
	return kids
}

// lastWord is the seed id prepare prints last.
func lastWord(s string) string {
	f := strings.Fields(s)
	if len(f) == 0 {
		return ""
	}
	return f[len(f)-1]
}

// wantChildCreds checks that the running child pid has exactly uid as its
// real, effective, saved and filesystem uid and no capabilities: the
// seed's credentials, not the daemon's.
func wantChildCreds(t *testing.T, pid, uid int) {
	t.Helper()
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		t.Fatalf("child %d: %v", pid, err)
	}
	u := uint32(uid)
	if st.Uid != [4]uint32{u, u, u, u} || st.Gid != [4]uint32{u, u, u, u} || st.CapEff != 0 || st.CapPrm != 0 {
		t.Fatalf("child %d runs with uid %v gid %v CapPrm %#x CapEff %#x; want uid and gid %d and no capabilities", pid, st.Uid, st.Gid, st.CapPrm, st.CapEff, uid)
	}
}

// TestLocalUsers: on a daemon whose socket lets every local user connect,
// a user prepares only processes it could ptrace itself, forks only its
// own seeds and those shared with it, removes only its own seeds and
// children, sees only those, cannot use the admin ops, and every child runs
// with its seed's credentials (never root's). Root sees and may do all.
func TestLocalUsers(t *testing.T) {
	d := startDaemonWith(t, "--socket-mode", "0666")
	reachable(t, d)
	pA, pB, pRoot := sleepAs(t, uidA), sleepAs(t, uidB), startSleep(t).Process.Pid

	// prepare: own process only.
	r := d.asUser(uidA, "prepare", "--pid", fmt.Sprint(pA), "--name", "a-seed")
	r.wantOK(t)
	seedA := lastWord(r.stdout)
	d.asUser(uidA, "prepare", "--pid", fmt.Sprint(pRoot)).wantFail(t, fmt.Sprintf("permission denied: uid %d may not prepare pid %d: its real uid is 0", uidA, pRoot))
	d.asUser(uidA, "prepare", "--pid", fmt.Sprint(pB)).wantFail(t, fmt.Sprintf("may not prepare pid %d: its real uid is %d", pB, uidB))
	d.asUser(uidA, "prepare", "--pid", fmt.Sprint(pA), "--share", "bogus").wantFail(t, `share "bogus"`)
	if s := seedsAs(t, d, uidA); len(s) != 1 || s[0].ID != seedA || s[0].Owner != uidA {
		t.Fatalf("A's seeds = %+v; want %s owned by %d", s, seedA, uidA)
	}

	// B sees nothing of A's, may not fork or remove it.
	if s := seedsAs(t, d, uidB); len(s) != 0 {
		t.Fatalf("B sees seeds %+v of another user", s)
	}
	d.asUser(uidB, "fork", "a-seed", "--detach").wantFail(t, `no seed "a-seed" you may fork`)
	d.asUser(uidB, "fork", seedA, "--detach").wantFail(t, "you may fork")
	d.asUser(uidB, "rm", "--force", seedA).wantFail(t, fmt.Sprintf("permission denied: seed %s belongs to uid %d", seedA, uidA))

	// A forks its seed: the child is A's, with A's credentials.
	r = d.asUser(uidA, "fork", "a-seed", "--detach")
	r.wantOK(t)
	childA := strings.TrimSpace(r.stdout)
	kids := psAs(t, d, uidA)
	if len(kids) != 1 || kids[0].ID != childA || kids[0].State != client.StateRunning {
		t.Fatalf("A's ps = %+v; want %s running", kids, childA)
	}
	wantChildCreds(t, kids[0].PID, uidA)
	if k := psAs(t, d, uidB); len(k) != 0 {
		t.Fatalf("B sees children %+v of another user", k)
	}
	d.asUser(uidB, "rm", "--force", childA).wantFail(t, fmt.Sprintf("permission denied: child %s belongs to uid %d", childA, uidA))
	if err := syscall.Kill(kids[0].PID, 0); err != nil {
		t.Fatalf("A's child after B's rm: %v", err)
	}

	// A shares a second seed with B: B forks it (the child runs as A, the
	// seed's owner) but still may not remove it.
	r = d.asUser(uidA, "prepare", "--pid", fmt.Sprint(pA), "--name", "shared", "--share", fmt.Sprintf("uid:%d", uidB))
	r.wantOK(t)
	shared := lastWord(r.stdout)
	if s := seedsAs(t, d, uidB); len(s) != 1 || s[0].ID != shared || len(s[0].Share) != 1 || s[0].Share[0] != fmt.Sprintf("uid:%d", uidB) {
		t.Fatalf("B's seeds = %+v; want the shared seed %s", s, shared)
	}
	r = d.asUser(uidB, "fork", "shared", "--detach")
	r.wantOK(t)
	childB := strings.TrimSpace(r.stdout)
	kids = psAs(t, d, uidB)
	if len(kids) != 1 || kids[0].ID != childB {
		t.Fatalf("B's ps = %+v; want its child %s", kids, childB)
	}
	wantChildCreds(t, kids[0].PID, uidA)
	d.asUser(uidB, "rm", "--force", shared).wantFail(t, "permission denied")

	// Admin ops.
	d.asUser(uidB, "run", "--rootfs", "/", "--", "/bin/true").wantFail(t, "permission denied: run is reserved to root")
	d.asUser(uidB, "fork", "--node", "elsewhere", "shared", "--detach").wantFail(t, "permission denied: a fork on another node is reserved")

	// Root sees everything; the owners clean up their own.
	if s := seedsAs(t, d, 0); len(s) != 2 {
		t.Fatalf("root's seeds = %+v; want both", s)
	}
	if k := psAs(t, d, 0); len(k) != 2 {
		t.Fatalf("root's ps = %+v; want both children", k)
	}
	d.asUser(uidB, "rm", "--force", childB).wantOK(t)
	d.asUser(uidA, "rm", "--force", shared).wantOK(t)
	d.asUser(uidA, "rm", "--force", seedA).wantOK(t)
	if s := seedsAs(t, d, 0); len(s) != 0 {
		t.Fatalf("seeds after the owners removed them: %+v", s)
	}
}

// TestSocketModeDefault: without --socket-mode the socket is 0600 and the
// kernel turns other users away at connect.
func TestSocketModeDefault(t *testing.T) {
	d := startDaemon(t)
	reachable(t, d)
	fi, err := os.Stat(d.sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v; want 0600", fi.Mode().Perm())
	}
	d.asUser(uidA, "seeds").wantFail(t, "permission denied")
	r := runCLI(t, nil, "daemon", "--socket", filepath.Join(t.TempDir(), "s"), "--socket-mode", "0644")
	r.wantFail(t, `--socket-mode "0644"`)
	r = runCLI(t, nil, "daemon", "--socket", filepath.Join(t.TempDir(), "s"), "--function-log-max", "lots")
	r.wantFail(t, `--function-log-max "lots"`)
}

// connFlood is a Python client that opens n connections to a socket, pings
// on each and prints how many were answered ok and how many were refused
// as too many.
const connFlood = `
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
conns, ok, refused = [], 0, 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    try:
        s.sendall(b'{"op":"ping"}\n')
    except BrokenPipeError:
        pass  # refused at connect: the error line is already there
    r = json.loads(s.makefile().readline())
    if r.get("ok"):
        ok += 1
    elif "too many connections" in r.get("error", ""):
        refused += 1
    conns.append(s)
print(ok, refused)
`

// TestUserConnectionCap: one local user cannot exhaust the daemon's
// descriptors by opening connections; root still gets in, and the
// daemon's descriptors are back to where they were once the user leaves.
func TestUserConnectionCap(t *testing.T) {
	d := startDaemonWith(t, "--socket-mode", "0666")
	reachable(t, d)
	// The socket's path appears before the daemon has opened its engine's
	// descriptors (the stub memfd, /dev/null): count once it serves.
	runCLI(t, nil, "--socket", d.sock, "seeds").wantOK(t)
	before := countFDs(t, d.cmd.Process.Pid)
	beforeList := fdList(d.cmd.Process.Pid)
	cmd := exec.Command("/usr/bin/python3", "-c", connFlood, d.sock, "100")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uidA, Gid: uidA, Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("flood: %v\n%s", err, out)
	}
	var ok, refused int
	if _, err := fmt.Sscan(string(out), &ok, &refused); err != nil || ok != 64 || refused != 36 {
		t.Fatalf("flood of 100 connections as uid %d: %q; want 64 answered and 36 refused", uidA, out)
	}
	runCLI(t, nil, "--socket", d.sock, "seeds").wantOK(t)
	deadline := time.Now().Add(5 * time.Second)
	for countFDs(t, d.cmd.Process.Pid) > before {
		if time.Now().After(deadline) {
			t.Fatalf("daemon holds %d descriptors after the flood; %d before\nbefore: %s\nafter:  %s", countFDs(t, d.cmd.Process.Pid), before,
				beforeList, fdList(d.cmd.Process.Pid))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fdList lists pid's open descriptors and what they are.
func fdList(pid int) string {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	var b strings.Builder
	for _, e := range ents {
		l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		fmt.Fprintf(&b, "%s=%s ", e.Name(), l)
	}
	return b.String()
}

// countFDs counts pid's open descriptors.
func countFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
