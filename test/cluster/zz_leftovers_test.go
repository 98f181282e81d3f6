package cluster

// This file sorts last so that TestNoLeftovers runs after every other test.

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/bench/netlab"
)

// TestNoLeftovers runs last: every lab has been closed by its test, so no
// process this run started may remain (they descend from the test binary,
// which is a child subreaper, or carry this run's tag in their
// environment), and no network namespace or link of ours may remain.
func TestNoLeftovers(t *testing.T) {
	requireSetup(t)
	leftoversChecked = true
	for _, p := range checkLeftovers() {
		t.Error(p)
	}
}

// checkLeftovers reports processes and namespaces this run left behind;
// processes get 10 s to go away, then are killed.
func checkLeftovers() []string {
	var probs []string
	var ours []int
	deadline := time.Now().Add(10 * time.Second)
	for {
		reapZombies()
		probs, ours = procLeftovers()
		if len(probs) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, pid := range ours {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	prefixMu.Lock()
	defer prefixMu.Unlock()
	for _, p := range prefixes {
		for _, l := range netlab.Leftovers(p) {
			probs = append(probs, "leftover "+l)
		}
	}
	// What `ip netns list` says, for the record.
	if out, err := exec.Command("ip", "netns", "list").Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			for _, p := range prefixes {
				if strings.HasPrefix(line, p) {
					probs = append(probs, "ip netns list still shows "+line)
				}
			}
		}
	}
	return probs
}

// reapZombies waits for exited processes reparented to us.
func reapZombies() {
	self := os.Getpid()
	for _, pid := range allPIDs() {
		if pp, err := procPPid(pid); err != nil || pp != self {
			continue
		}
		if st, _ := procState(pid); st == "Z" {
			var ws syscall.WaitStatus
			syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		}
	}
}

// procLeftovers lists processes of this run other than ourselves.
func procLeftovers() (probs []string, ours []int) {
	self := os.Getpid()
	ppid := map[int]int{}
	pids := allPIDs()
	for _, pid := range pids {
		if pp, err := procPPid(pid); err == nil {
			ppid[pid] = pp
		}
	}
	tag := []byte(runTag + "\x00")
	for _, pid := range pids {
		pp, ok := ppid[pid]
		if !ok || pid == self || pid == 2 || pp == 2 {
			continue
		}
		reason := ""
		for q, n := pp, 0; q > 1 && n < 4096; q, n = ppid[q], n+1 {
			if q == self {
				reason = "descends from the test binary"
				break
			}
		}
		if reason == "" {
			env, err := readProcFile(fmt.Sprintf("/proc/%d/environ", pid), 2*time.Second)
			if err == nil && strings.Contains(string(env)+"\x00", string(tag)) {
				reason = "carries this run's MITOSIS_CLUSTER_TAG"
			}
		}
		if reason == "" {
			continue
		}
		st, err := procState(pid)
		if err != nil {
			continue // gone meanwhile
		}
		cmd, _ := readProcFile(fmt.Sprintf("/proc/%d/cmdline", pid), 2*time.Second)
		probs = append(probs, fmt.Sprintf("leftover process %d (state %s, ppid %d) %q: %s",
			pid, st, pp, strings.TrimSpace(strings.ReplaceAll(string(cmd), "\x00", " ")), reason))
		ours = append(ours, pid)
	}
	return probs, ours
}

func procPPid(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "PPid:"); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, errors.New("no PPid")
}

func allPIDs() []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids
}

// readProcFile reads a /proc file with a time bound (reading another
// process's memory must never hang the test).
func readProcFile(path string, timeout time.Duration) ([]byte, error) {
	type res struct {
		b   []byte
		err error
	}
	ch := make(chan res, 1)
	go func() {
		b, err := os.ReadFile(path)
		ch <- res{b, err}
	}()
	select {
	case r := <-ch:
		return r.b, r.err
	case <-time.After(timeout):
		return nil, fmt.Errorf("reading %s: timed out after %v", path, timeout)
	}
}
