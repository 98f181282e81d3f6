package node

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/container"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
)

// containerRec is a process the daemon started in a container (`mitosis
// run`); a seed prepared from it makes containerized children with the same
// limits.
type containerRec struct {
	pid    int
	name   string
	rootfs string
	limits container.Limits
	group  *container.Group // nil without limits
	log    string
	// pool is the size of its seed's cgroup pool (0: the daemon's
	// CgroupPool); a function's seed serves bursts and keeps more.
	pool int
}

// fnCgroupPool is the cgroup pool of a function's seed: enough that a
// burst of invocations does not create groups on the fork path while the
// background refill catches up.
const fnCgroupPool = 16

// run starts req.Argv inside req.Rootfs: new mount, UTS and IPC
// namespaces, chrooted to the image, in a cgroup with the limits. (No PID
// namespace for the parent: it stays preparable with `prepare --pid` like
// any process; its children get one each.)
func (d *Daemon) run(req client.Request) (int, error) {
	if d.isClosing() {
		return 0, fmt.Errorf("run: the daemon is shutting down")
	}
	if !filepath.IsAbs(req.Rootfs) {
		return 0, fmt.Errorf("run: --rootfs %q must be an absolute path", req.Rootfs)
	}
	if st, err := os.Stat(req.Rootfs); err != nil || !st.IsDir() {
		return 0, fmt.Errorf("run: image directory %s: not a directory (%v)", req.Rootfs, err)
	}
	if len(req.Argv) == 0 || !filepath.IsAbs(req.Argv[0]) {
		return 0, fmt.Errorf("run: the command must be an absolute path inside the image, e.g. /usr/bin/python3")
	}
	if _, err := os.Stat(filepath.Join(req.Rootfs, req.Argv[0])); err != nil {
		return 0, fmt.Errorf("run: %s is not in the image %s: %w", req.Argv[0], req.Rootfs, err)
	}
	lim := container.Limits{CPUs: req.CPUs, Pids: req.Pids}
	if req.Memory != "" {
		m, err := container.ParseMemory(req.Memory)
		if err != nil {
			return 0, fmt.Errorf("run: --memory: %w", err)
		}
		lim.MemoryBytes = m
	}
	rec := &containerRec{name: req.Name, rootfs: req.Rootfs, limits: lim}
	if lim != (container.Limits{}) {
		g, err := container.New(d.cgroupName(fmt.Sprintf("run-%d", time.Now().UnixNano())), lim)
		if err != nil {
			return 0, fmt.Errorf("run: cgroup: %w", err)
		}
		rec.group = g
	}
	logf, err := os.CreateTemp(filepath.Join(d.cfg.StateDir, "children"), "run-*.log")
	if err != nil {
		d.dropGroup(rec)
		return 0, fmt.Errorf("run: log: %w", err)
	}
	defer logf.Close()
	rec.log = logf.Name()
	env := req.Env
	if len(env) == 0 {
		// numpy's OpenBLAS threads would make the process unpreparable.
		env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/", "OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"}
	}
	cmd := exec.Command(req.Argv[0], req.Argv[1:]...)
	cmd.Env = env
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Chroot:     req.Rootfs,
		Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC,
		Setpgid:    true,
	}
	if err := cmd.Start(); err != nil {
		d.dropGroup(rec)
		return 0, fmt.Errorf("run %s: %w", req.Argv[0], err)
	}
	rec.pid = cmd.Process.Pid
	if rec.group != nil {
		if err := rec.group.Add(rec.pid); err != nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			d.dropGroup(rec)
			return 0, fmt.Errorf("run: move into cgroup: %w", err)
		}
	}
	d.mu.Lock()
	d.containers[rec.pid] = rec
	d.mu.Unlock()
	// Not cmd.Wait: wait4 on a process this daemon may be tracing (it is
	// prepared with `mitosis prepare --pid`) would consume its ptrace stops.
	go func() {
		ptrace.ReapExit(rec.pid, nil)
		_ = cmd.Process.Release()
		d.mu.Lock()
		delete(d.containers, rec.pid)
		d.mu.Unlock()
		d.dropGroup(rec)
		d.log.Info("run exited", "pid", rec.pid, "name", rec.name)
	}()
	d.log.Info("run", "pid", rec.pid, "name", rec.name, "rootfs", rec.rootfs, "memory", lim.MemoryBytes, "cpus", lim.CPUs, "pids", lim.Pids, "log", rec.log)
	return rec.pid, nil
}

func (d *Daemon) dropGroup(rec *containerRec) {
	if rec.group != nil {
		if err := rec.group.Delete(); err != nil {
			d.log.Warn("delete cgroup", "pid", rec.pid, "err", err)
		}
	}
}

// childGroup puts a containerized seed's child into a cgroup of its own
// with the seed's limits, from the seed's pool.
func (d *Daemon) childGroup(s *seedRec) (*container.Group, func(pid int) error, error) {
	if s.pool == nil {
		return nil, nil, nil
	}
	g, err := s.pool.Get()
	if err != nil {
		return nil, nil, fmt.Errorf("child cgroup: %w", err)
	}
	return g, g.Add, nil
}
