package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"
)

// Everything the tests share: built binaries, the daemon, temp dirs.
var (
	skipReason string // non-empty: every test skips with it
	setupErr   error  // non-nil: every test fails with it

	repoRoot  string
	tmpRoot   string // everything of this run lives below it
	binDir    string
	sockPath  string
	stateDir  string
	daemonTmp string // TMPDIR of the daemon: must be empty at the end
	daemonLog string
	dataFile  string // the file the C parents open before prepare
	runTag    string // MITOSIS_E2E_TAG=<hex>, in the environment of every process we start

	mitosisBin    string
	parentStatic  string
	parentDynamic string
	mthreadsBin   string
	dlparentBin   string
	slowInitSo    string
	mtParentPy    string
	mtParentJS    string
	parentPy      string
	sockParentPy  string
	leanParentPy  string

	daemon     *exec.Cmd
	daemonPID  int
	daemonDone = make(chan struct{})
	daemonErr  error
	stopOnce   sync.Once
	stopErr    error

	shmBefore map[string]bool

	seedsMu      sync.Mutex
	createdSeeds []string

	leftoversChecked bool
)

const pyExe = "/usr/bin/python3"

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	switch {
	case os.Getenv("MITOSIS_E2E") == "0":
		skipReason = "MITOSIS_E2E=0"
	case runtime.GOOS != "linux" || runtime.GOARCH != "amd64":
		skipReason = "mitosis runs on linux/amd64 only"
	case os.Geteuid() != 0:
		skipReason = "the end-to-end tests need root (ptrace, userfaultfd)"
	}
	if skipReason != "" {
		return m.Run()
	}
	setupErr = setup()
	if setupErr != nil {
		fmt.Fprintf(os.Stderr, "e2e setup failed: %v\n", setupErr)
	}
	code := m.Run()

	if daemon != nil {
		if err := stopDaemon(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: stopping the daemon: %v\n", err)
			code = 1
		}
	}
	if setupErr == nil && !leftoversChecked {
		// TestNoLeftovers did not run (e.g. -run filtered it out): check anyway.
		if problems := checkLeftovers(); len(problems) > 0 {
			fmt.Fprintf(os.Stderr, "e2e: leftovers after the run:\n  %s\n", strings.Join(problems, "\n  "))
			code = 1
		}
	}
	if code != 0 {
		if daemonLog != "" {
			fmt.Fprintf(os.Stderr, "e2e: daemon log %s (last lines):\n%s\n", daemonLog, tailFile(daemonLog, 60))
		}
		if tmpRoot != "" {
			fmt.Fprintf(os.Stderr, "e2e: kept %s for inspection\n", tmpRoot)
		}
	} else if tmpRoot != "" {
		os.RemoveAll(tmpRoot)
	}
	return code
}

// requireSetup skips or fails t when the shared setup is not usable.
func requireSetup(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	if setupErr != nil {
		t.Fatalf("setup failed: %v", setupErr)
	}
	select {
	case <-daemonDone:
		t.Fatalf("the mitosis daemon is not running (exited: %v); log:\n%s", daemonErr, tailFile(daemonLog, 40))
	default:
	}
}

func setup() error {
	// Orphans of anything we start (the frozen copies of killed parents,
	// grandchildren, stubs of a dead daemon) are reparented to us, so that
	// TestNoLeftovers sees everything that descends from this test.
	if _, _, e := syscall.RawSyscall(syscall.SYS_PRCTL, 36 /* PR_SET_CHILD_SUBREAPER */, 1, 0); e != 0 {
		return fmt.Errorf("PR_SET_CHILD_SUBREAPER: %v", e)
	}
	// Descriptors inherited from whatever started `go test` must not leak
	// into the parents: mitosis refuses to prepare a process holding a pipe
	// or socket other than its stdio.
	testenv.CloseInheritedFDs()
	var err error
	repoRoot, err = filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(repoRoot, "go.mod")); err != nil {
		return fmt.Errorf("repository root not found from %s: %v", repoRoot, err)
	}
	shmBefore = listDir("/dev/shm")

	tmpRoot, err = os.MkdirTemp("", "mte2e-")
	if err != nil {
		return err
	}
	binDir = filepath.Join(tmpRoot, "bin")
	stateDir = filepath.Join(tmpRoot, "state")
	daemonTmp = filepath.Join(tmpRoot, "tmp")
	for _, d := range []string{binDir, stateDir, daemonTmp} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	sockPath = filepath.Join(tmpRoot, "mitosis.sock")
	daemonLog = filepath.Join(tmpRoot, "daemon.log")
	dataFile = filepath.Join(tmpRoot, "data.bin")
	var tb [8]byte
	if _, err := rand.Read(tb[:]); err != nil {
		return err
	}
	runTag = "MITOSIS_E2E_TAG=" + hex.EncodeToString(tb[:])

	// Build mitosis.
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	mitosisBin = filepath.Join(binDir, "mitosis")
	if pre := os.Getenv("MITOSIS_E2E_BIN"); pre != "" {
		// a prebuilt binary (e.g. to bisect); copied so its path names tmpRoot
		b, err := os.ReadFile(pre)
		if err != nil {
			return fmt.Errorf("MITOSIS_E2E_BIN: %v", err)
		}
		if err := os.WriteFile(mitosisBin, b, 0o755); err != nil {
			return err
		}
	} else if _, err := testenv.BuildMitosis(goBin, filepath.Dir(mitosisBin)); err != nil {
		return err
	}

	// Build the C parents.
	td := filepath.Join(repoRoot, "test", "e2e", "testdata")
	parentStatic = filepath.Join(binDir, "parent-static")
	parentDynamic = filepath.Join(binDir, "parent-dynamic")
	mthreadsBin = filepath.Join(binDir, "mthreads")
	dlparentBin = filepath.Join(binDir, "dlparent")
	slowInitSo = filepath.Join(binDir, "libslowinit.so")
	builds := [][]string{
		{"gcc", "-O1", "-Wall", "-static", "-pthread", "-o", parentStatic, filepath.Join(td, "parent.c")},
		{"gcc", "-O1", "-Wall", "-pthread", "-o", parentDynamic, filepath.Join(td, "parent.c")},
		{"gcc", "-O1", "-Wall", "-pthread", "-o", mthreadsBin, filepath.Join(td, "mthreads.c")},
		{"gcc", "-O1", "-Wall", "-shared", "-fPIC", "-o", slowInitSo, filepath.Join(td, "slowinit.c")},
		{"gcc", "-O1", "-Wall", "-pthread", "-rdynamic", "-o", dlparentBin, filepath.Join(td, "dlparent.c"), "-ldl"},
	}
	for _, b := range builds {
		if out, err := runTimeout(2*time.Minute, td, b[0], b[1:]...); err != nil {
			return fmt.Errorf("%s: %v\n%s", strings.Join(b, " "), err, out)
		}
	}
	// Copy the Python parents next to the binaries, so that every parent's
	// command line names tmpRoot.
	parentPy = filepath.Join(binDir, "parent.py")
	sockParentPy = filepath.Join(binDir, "sockparent.py")
	leanParentPy = filepath.Join(binDir, "leanparent.py")
	mtParentPy = filepath.Join(binDir, "mtparent.py")
	mtParentJS = filepath.Join(binDir, "mtparent.js")
	for src, dst := range map[string]string{"parent.py": parentPy, "sockparent.py": sockParentPy, "leanparent.py": leanParentPy, "mtparent.py": mtParentPy, "mtparent.js": mtParentJS} {
		b, err := os.ReadFile(filepath.Join(td, src))
		if err != nil {
			return err
		}
		if err := os.WriteFile(dst, b, 0o755); err != nil {
			return err
		}
	}
	data := make([]byte, 4096)
	for i := range data {
		data[i] = fileByte(i)
	}
	if err := os.WriteFile(dataFile, data, 0o644); err != nil {
		return err
	}

	// Everything started from here on carries the tag and finds the daemon.
	os.Setenv("MITOSIS_E2E_TAG", strings.TrimPrefix(runTag, "MITOSIS_E2E_TAG="))
	os.Setenv("MITOSIS_SOCKET", sockPath)
	os.Setenv("MITOSIS_STATE_DIR", stateDir)
	return startDaemon()
}

// fileByte is the content of dataFile; parent.c's file_byte() is the same.
func fileByte(i int) byte { return byte('a' + (i*7+3)%26) }

func startDaemon() error {
	logf, err := os.Create(daemonLog)
	if err != nil {
		return err
	}
	defer logf.Close()
	daemon = exec.Command(mitosisBin, "daemon", "--socket", sockPath, "--state-dir", stateDir)
	daemon.Env = append(os.Environ(), "TMPDIR="+daemonTmp)
	daemon.Stdout = logf
	daemon.Stderr = logf
	daemon.Dir = tmpRoot
	if err := daemon.Start(); err != nil {
		daemon = nil
		return fmt.Errorf("starting the daemon: %v", err)
	}
	daemonPID = daemon.Process.Pid
	go func() {
		daemonErr = daemon.Wait()
		close(daemonDone)
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-daemonDone:
			return fmt.Errorf("the daemon exited at start (%v); log:\n%s", daemonErr, tailFile(daemonLog, 40))
		default:
		}
		if c, err := net.DialTimeout("unix", sockPath, time.Second); err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the daemon did not listen on %s within 20 s; log:\n%s", sockPath, tailFile(daemonLog, 40))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stopDaemon sends SIGINT (stop for good, no handover) and expects a clean
// exit 0 within 30 s.
func stopDaemon() error {
	stopOnce.Do(func() {
		if daemon == nil {
			return
		}
		select {
		case <-daemonDone:
			stopErr = fmt.Errorf("the daemon had already exited: %v", daemonErr)
			return
		default:
		}
		if err := daemon.Process.Signal(syscall.SIGINT); err != nil {
			stopErr = fmt.Errorf("SIGINT: %v", err)
		}
		select {
		case <-daemonDone:
			if daemonErr != nil && stopErr == nil {
				stopErr = fmt.Errorf("the daemon did not exit 0 on SIGINT: %v", daemonErr)
			}
		case <-time.After(30 * time.Second):
			daemon.Process.Kill()
			<-daemonDone
			stopErr = errors.New("the daemon did not exit within 30 s of SIGINT (killed)")
		}
	})
	return stopErr
}

func runTimeout(d time.Duration, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	done := make(chan struct{})
	var out []byte
	var err error
	go func() {
		out, err = cmd.CombinedOutput()
		close(done)
	}()
	select {
	case <-done:
		return out, err
	case <-time.After(d):
		if cmd.Process != nil {
			cmd.Process.Kill()
		}
		<-done
		return out, fmt.Errorf("timed out after %v", d)
	}
}

func listDir(dir string) map[string]bool {
	m := map[string]bool{}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		m[e.Name()] = true
	}
	return m
}

func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func noteSeed(id string) {
	seedsMu.Lock()
	createdSeeds = append(createdSeeds, id)
	seedsMu.Unlock()
}
