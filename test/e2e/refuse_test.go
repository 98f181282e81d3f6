package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRefuse: processes mitosis cannot fork faithfully are refused with a
// clear error, and left exactly as they were: alive, running, untraced.
func TestRefuse(t *testing.T) {
	requireSetup(t)

	refused := func(t *testing.T, pid int, name, want string) {
		t.Helper()
		r := mitosis(cliTimeout, "prepare", "--pid", strconv.Itoa(pid), "--name", name)
		if r.err != nil {
			t.Fatalf("prepare: %v\n%s", r.err, r)
		}
		if r.code == 0 {
			if f := strings.Fields(r.stdout); len(f) > 0 && seedIDRe.MatchString(f[len(f)-1]) {
				adoptSeed(t, f[len(f)-1])
			}
			t.Errorf("prepare of pid %d succeeded, want a refusal mentioning %q:\n%s", pid, want, r)
			return
		}
		if msg := strings.ToLower(r.stdout + r.stderr); !strings.Contains(msg, strings.ToLower(want)) {
			t.Errorf("prepare of pid %d failed without mentioning %q:\n%s", pid, want, r)
		}
		t.Logf("refused as expected: %s", strings.TrimSpace(r.stderr+r.stdout))
	}
	responds := func(t *testing.T, p *proc) {
		t.Helper()
		if err := syscall.Kill(p.pid, syscall.SIGUSR1); err != nil {
			t.Errorf("kill -USR1 %d: %v", p.pid, err)
			return
		}
		if _, err := p.waitLine("PONG", 10*time.Second); err != nil {
			t.Errorf("the refused process no longer works: %v", err)
		}
	}
	ready := func(t *testing.T, p *proc) {
		t.Helper()
		l, err := p.waitLine("READY ", pyReadyTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(l); len(f) < 2 || f[1] != strconv.Itoa(p.pid) {
			t.Fatalf("%s printed %q, want READY %d", p.name, l, p.pid)
		}
	}

	t.Run("socket", func(t *testing.T) {
		p := startProc(t, "sockparent.py", pyExe, sockParentPy)
		ready(t, p)
		refused(t, p.pid, "refuse-socket", "socket")
		assertHealthy(t, p)
		responds(t, p)
	})

	t.Run("nopid", func(t *testing.T) {
		cmd := exec.Command("/bin/true")
		if err := cmd.Run(); err != nil {
			t.Fatal(err)
		}
		pid := cmd.Process.Pid // reaped: no such process now
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			t.Skipf("pid %d was reused already", pid)
		}
		refused(t, pid, "refuse-nopid", strconv.Itoa(pid))
	})
}
