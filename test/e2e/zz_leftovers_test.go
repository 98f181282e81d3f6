package e2e

// This file sorts last so that TestNoLeftovers runs after every other test.

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestNoLeftovers runs last: it stops the daemon (SIGINT must give exit 0)
// and then asserts that nothing this run started is left: no process, no
// traced or stopped orphan, no file but logs in the state dir, nothing new
// in /dev/shm or /tmp.
func TestNoLeftovers(t *testing.T) {
	if skipReason != "" {
		t.Skip(skipReason)
	}
	if setupErr != nil {
		t.Fatalf("setup failed: %v", setupErr)
	}
	leftoversChecked = true

	daemonUp := true
	select {
	case <-daemonDone:
		daemonUp = false
		t.Errorf("the daemon died during the run: %v\n%s", daemonErr, tailFile(daemonLog, 40))
	default:
	}
	if daemonUp {
		// The daemon's own view: every test removed its seeds, no child runs.
		if kids, err := psChildren(); err != nil {
			t.Errorf("%v", err)
		} else {
			for _, k := range kids {
				if jsonStr(k, "state") == "running" {
					t.Errorf("child still running after all tests: %v", k)
				}
			}
		}
		r := mitosis(cliTimeout, "seeds")
		if !r.ok() {
			t.Errorf("seeds failed:\n%s", r)
		} else {
			seedsMu.Lock()
			for _, id := range createdSeeds {
				if strings.Contains(r.stdout, id) {
					t.Errorf("seed %s still listed after its test removed it:\n%s", id, r.stdout)
				}
			}
			seedsMu.Unlock()
		}
		if err := stopDaemon(); err != nil {
			t.Errorf("stopping the daemon: %v\n%s", err, tailFile(daemonLog, 40))
		}
	}
	for _, p := range checkLeftovers() {
		t.Error(p)
	}
}

// checkLeftovers reports processes and files this run left behind. Processes
// get 10 s to go away (killed ones may still be exiting).
func checkLeftovers() []string {
	var probs []string
	deadline := time.Now().Add(10 * time.Second)
	var ours []int
	for {
		reapZombies()
		probs, ours = procLeftovers()
		if len(probs) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Reported; now end them so that they do not outlive the run.
	for _, pid := range ours {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	return append(probs, fileLeftovers()...)
}

// reapZombies waits for exited processes reparented to us (we are a child
// subreaper): the frozen copies of killed parents, orphaned grandchildren.
func reapZombies() {
	self := os.Getpid()
	for _, pid := range allPIDs() {
		if pp, err := procInt(pid, "PPid"); err != nil || pp != self {
			continue
		}
		if st, _ := procState(pid); st == "Z" {
			var ws syscall.WaitStatus
			syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		}
	}
}

// procLeftovers reports leftover processes; ours are those this run started
// (descendants, tagged), which the caller may kill.
func procLeftovers() (probs []string, ours []int) {
	self := os.Getpid()
	ppid := map[int]int{}
	pids := allPIDs()
	for _, pid := range pids {
		if pp, err := procInt(pid, "PPid"); err == nil {
			ppid[pid] = pp
		}
	}
	tagged := []byte(runTag + "\x00")
	for _, pid := range pids {
		pp, ok := ppid[pid]
		if !ok || pid == self {
			continue
		}
		var reason string
		mine := true
		for q, n := pp, 0; q > 1 && n < 4096; q, n = ppid[q], n+1 {
			if q == self {
				reason = "descends from the test binary"
				break
			}
		}
		if reason == "" && daemonPID != 0 && pp == daemonPID {
			reason = "child of the stopped daemon"
		}
		if pid == 2 || pp == 2 {
			continue // kernel threads
		}
		if reason == "" {
			if env, err := readProcFile(fmt.Sprintf("/proc/%d/environ", pid), 2*time.Second); errors.Is(err, errProcTimeout) {
				reason = fmt.Sprintf("environment unreadable (%v)", err)
				mine = false
			} else if strings.Contains(string(env)+"\x00", string(tagged)) {
				reason = "carries this run's " + strings.SplitN(runTag, "=", 2)[0]
			}
		}
		if reason == "" && tmpRoot != "" && strings.Contains(procCmdline(pid), tmpRoot) {
			reason = "its command line names " + tmpRoot
		}
		st, _ := procState(pid)
		tracer, _ := procInt(pid, "TracerPid")
		if reason == "" && st == "t" {
			mine = false
			if tracer == 0 || tracer == daemonPID {
				reason = "traced (state t) with its tracer gone"
			} else if _, err := os.Stat(fmt.Sprintf("/proc/%d", tracer)); err != nil {
				reason = "traced (state t) with its tracer gone"
			}
		}
		if reason == "" {
			continue
		}
		if st == "" {
			continue // gone meanwhile
		}
		probs = append(probs, fmt.Sprintf("leftover process %d (state %s, ppid %d, tracer %d) %q: %s",
			pid, st, pp, tracer, procCmdline(pid), reason))
		if mine {
			ours = append(ours, pid)
		}
	}
	return probs, ours
}

func fileLeftovers() []string {
	var probs []string
	if stateDir != "" {
		filepath.WalkDir(stateDir, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				probs = append(probs, fmt.Sprintf("state dir: %v", err))
				return nil
			}
			if d.IsDir() {
				return nil
			}
			info, _ := d.Info()
			if info != nil && info.Mode().IsRegular() && strings.HasSuffix(d.Name(), ".log") {
				return nil
			}
			rel, _ := filepath.Rel(stateDir, path)
			mode := "?"
			if info != nil {
				mode = info.Mode().String()
			}
			probs = append(probs, fmt.Sprintf("leftover file in the state dir after the daemon stopped: %s (%s)", rel, mode))
			return nil
		})
	}
	if daemonTmp != "" {
		for name := range listDir(daemonTmp) {
			probs = append(probs, fmt.Sprintf("leftover in the daemon's TMPDIR: %s", filepath.Join(daemonTmp, name)))
		}
	}
	var shm []string
	for name := range listDir("/dev/shm") {
		if !shmBefore[name] {
			shm = append(shm, name)
		}
	}
	sort.Strings(shm)
	for _, name := range shm {
		probs = append(probs, fmt.Sprintf("new file in /dev/shm: %s", name))
	}
	// The system-wide temp dir is not scanned: other test packages run
	// concurrently and create their own files there. The daemon's own
	// TMPDIR (a private directory) is checked above.
	return probs
}
