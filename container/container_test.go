package container

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseMemory(t *testing.T) {
	good := map[string]int64{
		"1048576": 1048576, "512k": 512 << 10, "256M": 256 << 20, "1G": 1 << 30,
		"1g": 1 << 30, "2T": 2 << 40, "1.5G": 3 << 29, "64MiB": 64 << 20, "100B": 100, "0": 0,
	}
	for in, want := range good {
		got, err := ParseMemory(in)
		if err != nil || got != want {
			t.Errorf("ParseMemory(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "-1", "12X", "1.2.3k", "9999999999T", "abc"} {
		if _, err := ParseMemory(in); err == nil {
			t.Errorf("ParseMemory(%q): no error", in)
		} else if in != "" && !strings.Contains(err.Error(), in) {
			t.Errorf("ParseMemory(%q): error %q does not name the input", in, err)
		}
	}
}

// needCgroups skips the test unless it runs as root with cgroups usable.
func needCgroups(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if err := Available(); err != nil {
		t.Skipf("cgroups unavailable: %v", err)
	}
}

// newGroup creates a group and makes sure it and its directories are gone
// at the end of the test.
func newGroup(t *testing.T, name string, l Limits) *Group {
	t.Helper()
	g, err := New(fmt.Sprintf("%s-%d", name, os.Getpid()), l)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { deleteAndCheck(t, g) })
	return g
}

func deleteAndCheck(t *testing.T, g *Group) {
	t.Helper()
	if err := g.Delete(); err != nil {
		t.Errorf("Delete: %v", err)
	}
	for _, d := range g.Paths() {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after Delete (%v)", d, err)
		}
	}
}

func readFile(t *testing.T, dir, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestGroupLimitsAddDelete(t *testing.T) {
	needCgroups(t)
	g := newGroup(t, "mitosis-test-basic", Limits{MemoryBytes: 64 << 20, CPUs: 0.5, Pids: 50})
	paths := g.Paths()
	if unified {
		d := paths[0]
		for f, want := range map[string]string{"memory.max": "67108864\n", "cpu.max": "50000 100000\n", "pids.max": "50\n"} {
			if got := readFile(t, d, f); got != want {
				t.Errorf("%s = %q, want %q", f, got, want)
			}
		}
	} else {
		if len(paths) != 3 {
			t.Fatalf("paths %v", paths)
		}
		for _, c := range []struct{ dir, file, want string }{
			{paths[0], "memory.limit_in_bytes", "67108864\n"},
			{paths[1], "cpu.cfs_quota_us", "50000\n"},
			{paths[1], "cpu.cfs_period_us", "100000\n"},
			{paths[2], "pids.max", "50\n"},
		} {
			if got := readFile(t, c.dir, c.file); got != c.want {
				t.Errorf("%s/%s = %q, want %q", c.dir, c.file, got, c.want)
			}
		}
	}
	t.Logf("paths: %v", paths)
	if _, err := New(g.Name(), Limits{}); err == nil {
		t.Error("New of an existing group succeeded")
	}

	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	defer func() { _ = cmd.Process.Kill() }()
	if err := g.Add(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	procs, err := g.Procs()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(procs, cmd.Process.Pid) {
		t.Fatalf("Procs = %v, want %d in it", procs, cmd.Process.Pid)
	}
	for _, d := range paths {
		if !strings.Contains(readFile(t, d, "cgroup.procs"), fmt.Sprint(cmd.Process.Pid)) {
			t.Errorf("%d not in %s/cgroup.procs", cmd.Process.Pid, d)
		}
	}
	n, err := g.OOMKills()
	if err != nil || n != 0 {
		t.Errorf("OOMKills = %d, %v", n, err)
	}
	deleteAndCheck(t, g)
	select {
	case err := <-waited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("sleep ended with %v, want SIGKILL", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("sleep not killed by Delete")
	}
	if err := g.Delete(); err != nil {
		t.Errorf("second Delete: %v", err)
	}
	if err := g.Add(os.Getpid()); err == nil {
		t.Error("Add after Delete succeeded")
	}
}

// oomSrc allocates and touches 200 MiB.
const oomSrc = `
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
int main(void) {
	raise(SIGSTOP); /* wait to be put in the cgroup */
	size_t n = 200u << 20;
	char *p = malloc(n);
	if (!p) return 2;
	for (size_t i = 0; i < n; i += 4096) p[i] = 1;
	printf("survived\n");
	return 0;
}
`

func TestOOMKill(t *testing.T) {
	needCgroups(t)
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("gcc not found")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "oom.c")
	bin := filepath.Join(dir, "oom")
	if err := os.WriteFile(src, []byte(oomSrc), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(gcc, "-O0", "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	g := newGroup(t, "mitosis-test-oom", Limits{MemoryBytes: 32 << 20})
	cmd := exec.Command(bin)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill() }()
	// Wait for the SIGSTOP so the allocation happens inside the group.
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(cmd.Process.Pid, &ws, syscall.WUNTRACED, nil); err != nil || !ws.Stopped() {
		t.Fatalf("wait for stop: %v %v", err, ws)
	}
	if err := g.Add(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if _, err := syscall.Wait4(cmd.Process.Pid, &ws, 0, nil); err != nil {
		t.Fatal(err)
	}
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("allocator ended with %v (exit %d), want SIGKILL", ws, ws.ExitStatus())
	}
	n, err := g.OOMKills()
	if errors.Is(err, ErrNotSupported) {
		// Old v1 kernels: no oom_kill counter; fall back to failcnt.
		fc, ferr := os.ReadFile(filepath.Join(g.Paths()[0], "memory.failcnt"))
		t.Logf("OOMKills unsupported (%v); killed by SIGKILL, memory.failcnt %q %v", err, fc, ferr)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if n < 1 {
		t.Fatalf("OOMKills = %d, want >= 1", n)
	}
	t.Logf("OOMKills = %d", n)
}

func TestPool(t *testing.T) {
	needCgroups(t)
	l := Limits{MemoryBytes: 64 << 20, CPUs: 0.5, Pids: 50}
	p := NewPool("mitosis-test-pool", l, 4)
	var all []*Group
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = p.Close()
		}
		for _, g := range all {
			deleteAndCheck(t, g)
		}
	})
	waitReady := func(n int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for p.Ready() < n {
			if time.Now().After(deadline) {
				t.Fatalf("pool has %d ready, want %d", p.Ready(), n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitReady(4)
	seen := map[string]bool{}
	var warm time.Duration
	const gets = 6 // more than the pool holds: some Gets may create
	for i := 0; i < gets; i++ {
		waitReady(4)
		start := time.Now()
		g, err := p.Get()
		warm += time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, g)
		if seen[g.Name()] {
			t.Fatalf("Get returned %s twice", g.Name())
		}
		seen[g.Name()] = true
	}
	waitReady(4) // refilled after the Gets
	// Time New for comparison.
	var cold time.Duration
	for i := 0; i < gets; i++ {
		start := time.Now()
		g, err := New(fmt.Sprintf("mitosis-test-new-%d-%d", os.Getpid(), i), l)
		cold += time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, g)
	}
	t.Logf("warm Pool.Get: %.1f µs/op; New: %.1f µs/op", float64(warm.Nanoseconds())/gets/1e3, float64(cold.Nanoseconds())/gets/1e3)

	// The unused groups' directories must vanish on Close.
	p.mu.Lock()
	var unused []string
	for _, g := range p.ready {
		unused = append(unused, g.Paths()...)
	}
	p.mu.Unlock()
	if len(unused) == 0 {
		t.Fatal("no unused groups to check")
	}
	closed = true
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	for _, d := range unused {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after Close", d)
		}
	}
	if _, err := p.Get(); err == nil {
		t.Error("Get after Close succeeded")
	}
}

func BenchmarkNewDelete(b *testing.B) {
	if os.Geteuid() != 0 || Available() != nil {
		b.Skip("needs root and cgroups")
	}
	for i := 0; i < b.N; i++ {
		g, err := New(fmt.Sprintf("mitosis-bench-%d-%d", os.Getpid(), i), Limits{MemoryBytes: 64 << 20, CPUs: 0.5, Pids: 50})
		if err != nil {
			b.Fatal(err)
		}
		if err := g.Delete(); err != nil {
			b.Fatal(err)
		}
	}
}

// TestV2NoControllers exercises the cgroup v2 code path on a hybrid host
// whose unified hierarchy (/sys/fs/cgroup/unified) has no controllers:
// creation without limits, Add, Procs and Delete.
func TestV2NoControllers(t *testing.T) {
	needCgroups(t)
	const mnt = "/sys/fs/cgroup/unified"
	if unified {
		t.Skip("host is cgroup v2; the other tests cover it")
	}
	if _, err := os.Stat(filepath.Join(mnt, "cgroup.procs")); err != nil {
		t.Skip("no unified hierarchy mounted")
	}
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	var own string
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			own = p
		}
	}
	oldMount, oldUnified, oldBase := v2Mount, unified, baseV2
	v2Mount, unified, baseV2 = mnt, true, own
	defer func() { v2Mount, unified, baseV2 = oldMount, oldUnified, oldBase }()

	g := newGroup(t, "mitosis-test-v2", Limits{})
	if d := g.Paths()[0]; d != filepath.Join(mnt, own, g.Name()) {
		t.Fatalf("path %s", d)
	}
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	defer func() { _ = cmd.Process.Kill() }()
	if err := g.Add(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	procs, err := g.Procs()
	if err != nil || !slices.Contains(procs, cmd.Process.Pid) {
		t.Fatalf("Procs = %v, %v; want %d in it", procs, err, cmd.Process.Pid)
	}
	deleteAndCheck(t, g)
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Fatal("sleep not killed by Delete")
	}
}

// TestRemoveTree: what a crashed daemon left (nested groups, one with a
// live process) is cleared by the next one: the process killed, every
// directory removed; a missing tree is not an error.
func TestRemoveTree(t *testing.T) {
	needCgroups(t)
	root := fmt.Sprintf("rmtree-%d", os.Getpid())
	g, err := New(root+"/inner/fn-1", Limits{MemoryBytes: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	cmd, waited := sleepIn(t, g)
	if _, err := New(root+"/empty", Limits{}); err != nil {
		t.Fatal(err)
	}
	killed, err := RemoveTree(root)
	if err != nil {
		t.Fatalf("RemoveTree: %v", err)
	}
	if len(killed) != 1 || killed[0] != cmd.Process.Pid {
		t.Errorf("killed %v, want [%d]", killed, cmd.Process.Pid)
	}
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		t.Fatal("the process in the tree is still running")
	}
	for _, d := range g.Paths() {
		for p := d; p != filepath.Dir(p) && strings.Contains(p, root); p = filepath.Dir(p) {
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s still exists (%v)", p, err)
			}
		}
	}
	if k, err := RemoveTree(root); err != nil || len(k) != 0 {
		t.Errorf("RemoveTree of a missing tree: %v, %v", k, err)
	}
	if _, err := RemoveTree("../x"); err == nil {
		t.Error("RemoveTree(\"../x\") succeeded")
	}
}

// TestDeleteNested: a group that grew a sub-group (with a process in it)
// is still deleted whole, through the slow path.
func TestDeleteNested(t *testing.T) {
	needCgroups(t)
	name := fmt.Sprintf("nested-%d", os.Getpid())
	g, err := New(name, Limits{MemoryBytes: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	inner, err := New(name+"/sub", Limits{})
	if err != nil {
		g.Delete()
		t.Fatal(err)
	}
	cmd, waited := sleepIn(t, inner)
	if err := g.Delete(); err != nil {
		cmd.Process.Kill()
		t.Fatalf("Delete: %v", err)
	}
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		t.Fatal("the sub-group's process was not killed")
	}
	for _, d := range append(g.Paths(), inner.Paths()...) {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("%s still exists (%v)", d, err)
		}
	}
}

// sleepIn starts a sleep(1) in g; waited receives its exit.
func sleepIn(t *testing.T, g *Group) (*exec.Cmd, chan error) {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	if err := g.Add(cmd.Process.Pid); err != nil {
		cmd.Process.Kill()
		t.Fatal(err)
	}
	return cmd, waited
}
