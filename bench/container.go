package bench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/container"
	"github.com/mitosis-fork/mitosis/engine"
	"github.com/mitosis-fork/mitosis/internal/testenv"
)

// GroupContainer selects the fork-into-container benchmark (run only when
// named, like GroupRemote).
const GroupContainer = "container"

// stopHello stops at its prepare point; a resumed child writes "x".
const stopHello = `#include <signal.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
	printf("READY\n");
	fflush(stdout);
	raise(SIGSTOP);
	write(1, "x", 1);
	return 0;
}
`

// Container case names.
const (
	ctrPlain  = "plain process fork"
	ctrNS     = "container: namespaces + chroot, no cgroup"
	ctrCgroup = "container + cgroup created at fork"
	ctrPool   = "container + cgroup from the pool"
)

// containerGroup measures the start latency of a fork into a container
// (new mount/PID/UTS/IPC namespaces, chroot to the image, a cgroup with
// limits) against a plain fork of the same program, in one run.
func (r *runner) containerGroup() *Group {
	g := &Group{Name: GroupContainer, Title: "fork into a container vs a plain process fork",
		Description: "A C program that stops itself at its prepare point; its children write one byte. Start latency = from just before `engine.Fork` until the byte is read. " +
			"plain: its seed was prepared from a copy running unconfined. container: the same program running chrooted in an image directory (the host's /usr bind-mounted), whose children get new mount, PID, UTS and IPC namespaces and a chroot to the image; " +
			"+ cgroup: each child is moved into its own cgroup (memory 256 MiB, 1 CPU, 100 pids) before it runs, created at fork time or taken from a pool of pre-created ones.",
		Baseline: ctrPlain}
	fail := func(err error) *Group { g.Error = err.Error(); return g }
	img := filepath.Join(r.dir, "image")
	for _, d := range []string{"usr", "app", "tmp"} {
		if err := os.MkdirAll(filepath.Join(img, d), 0o755); err != nil {
			return fail(err)
		}
	}
	for _, l := range []string{"bin", "lib", "lib64", "sbin"} {
		if err := os.Symlink("usr/"+l, filepath.Join(img, l)); err != nil {
			return fail(err)
		}
	}
	usr := filepath.Join(img, "usr")
	if err := unix.Mount("/usr", usr, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fail(fmt.Errorf("bind /usr into the image: %w", err))
	}
	defer unix.Unmount(usr, unix.MNT_DETACH)
	src := filepath.Join(img, "app", "hello.c")
	if err := os.WriteFile(src, []byte(stopHello), 0o644); err != nil {
		return fail(err)
	}
	if out, err := exec.Command("gcc", "-O2", "-o", filepath.Join(img, "app", "hello"), src).CombinedOutput(); err != nil {
		return fail(fmt.Errorf("gcc: %v: %s", err, out))
	}
	start := func(chroot bool) (*exec.Cmd, *engine.Seed, error) {
		cmd := exec.Command(filepath.Join(img, "app", "hello"))
		if chroot {
			cmd = exec.Command("/app/hello")
			cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: img}
			cmd.Dir = "/"
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			return nil, nil, err
		}
		if err := cmd.Start(); err != nil {
			return nil, nil, err
		}
		buf := make([]byte, 6)
		if _, err := out.Read(buf); err != nil {
			return cmd, nil, err
		}
		if err := testenv.WaitStopped(cmd.Process.Pid, 10*time.Second); err != nil {
			return cmd, nil, err
		}
		s, err := r.e.Prepare(cmd.Process.Pid, engine.PrepareOptions{ChannelFD: -1})
		return cmd, s, err
	}
	plainCmd, plain, err := start(false)
	if plainCmd != nil {
		defer func() { _ = plainCmd.Process.Kill(); _ = plainCmd.Wait() }()
	}
	if err != nil {
		return fail(fmt.Errorf("plain parent: %w", err))
	}
	boxCmd, box, err := start(true)
	if boxCmd != nil {
		defer func() { _ = boxCmd.Process.Kill(); _ = boxCmd.Wait() }()
	}
	if err != nil {
		return fail(fmt.Errorf("chrooted parent: %w", err))
	}
	lim := container.Limits{MemoryBytes: 256 << 20, CPUs: 1, Pids: 100}
	pool := container.NewPool(fmt.Sprintf("mitosis-bench-%d", os.Getpid()), lim, 4)
	defer pool.Close()
	names := []string{ctrPlain, ctrNS, ctrCgroup, ctrPool}
	lat, took := map[string]*Case{}, map[string]*Case{}
	for _, n := range names {
		lat[n], took[n] = &Case{Name: n}, &Case{Name: n + ": Fork() return"}
	}
	seq := 0
	one := func(name string, warm bool) error {
		s := box
		if name == ctrPlain {
			s = plain
		}
		rd, wr, err := os.Pipe()
		if err != nil {
			return err
		}
		defer rd.Close()
		var grp *container.Group
		opts := engine.ForkOptions{Stdio: [3]*os.File{nil, wr, nil}}
		t0 := time.Now()
		switch name {
		case ctrCgroup:
			seq++
			if grp, err = container.New(fmt.Sprintf("mitosis-bench-%d-new-%d", os.Getpid(), seq), lim); err != nil {
				wr.Close()
				return err
			}
		case ctrPool:
			if grp, err = pool.Get(); err != nil {
				wr.Close()
				return err
			}
		}
		if grp != nil {
			opts.OnSpawn = grp.Add
		}
		c, err := r.e.Fork(s, opts)
		wr.Close()
		if err != nil {
			if grp != nil {
				_ = grp.Delete()
			}
			return fmt.Errorf("%s: %w", name, err)
		}
		_ = rd.SetReadDeadline(time.Now().Add(10 * time.Second))
		b := make([]byte, 1)
		if _, err := rd.Read(b); err != nil || b[0] != 'x' {
			c.Kill(unix.SIGKILL)
			return fmt.Errorf("%s: child wrote %q: %v", name, b, err)
		}
		lat[name].add(time.Since(t0), warm)
		took[name].add(c.Took, warm)
		select {
		case <-c.TreeDone():
		case <-time.After(10 * time.Second):
			c.Kill(unix.SIGKILL)
			return fmt.Errorf("%s: child did not exit", name)
		}
		if st := c.Status(); st.ExitStatus() != 0 {
			return fmt.Errorf("%s: child exit status %v", name, st)
		}
		if grp != nil {
			return grp.Delete()
		}
		return nil
	}
	for it := 0; it <= r.cfg.Runs; it++ {
		for k := range names {
			if err := one(names[(it+k)%len(names)], it == 0); err != nil {
				return fail(err)
			}
		}
	}
	for _, n := range names {
		g.Cases = append(g.Cases, lat[n])
	}
	for _, n := range names {
		g.Cases = append(g.Cases, took[n])
	}
	return g
}
