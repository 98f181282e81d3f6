package snapshot

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
)

// TestMain marks every inherited fd close-on-exec: a runner's pipe in a
// parent the tests start would make Prepare refuse it.
func TestMain(m *testing.M) {
	testenv.CloseInheritedFDs()
	os.Exit(m.Run())
}

func startSleep(t *testing.T, extra ...*os.File) *exec.Cmd {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (ptrace)")
	}
	cmd := exec.Command("sleep", "30")
	cmd.ExtraFiles = extra
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot start sleep: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := procfs.ReadStatus(cmd.Process.Pid)
		if err == nil && strings.HasPrefix(st.State, "S") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sleep not sleeping: %q %v", st.State, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return cmd
}

func TestPrepareSleep(t *testing.T) {
	cmd := startSleep(t)
	pid := cmd.Process.Pid
	tr := ptrace.NewTracer()
	defer tr.Close()
	res, err := Prepare(tr, pid, Options{ChannelFD: -1})
	if err != nil {
		t.Fatal(err)
	}
	src := res.SourcePID
	released := false
	defer func() {
		if !released {
			_ = tr.Do(func() error { return Release(src) })
		}
	}()
	d := res.Desc
	if src <= 0 || src == pid {
		t.Fatalf("frozen copy pid %d", src)
	}
	// The parent runs on untraced; the copy is stopped under us.
	pst, err := procfs.ReadStatus(pid)
	if err != nil || pst.TracerPid != 0 {
		t.Errorf("parent after prepare: %+v %v", pst, err)
	}
	sst, err := procfs.ReadStatus(src)
	if err != nil || !isOurThread(sst.TracerPid) || !strings.HasPrefix(sst.State, "t") {
		t.Errorf("frozen copy: state %q tracer %d (%v), want t and a thread of %d", sst.State, sst.TracerPid, err, os.Getpid())
	}
	if d.PID != int32(pid) || d.Exe != "/usr/bin/sleep" && !strings.HasSuffix(d.Exe, "/sleep") {
		t.Errorf("pid %d exe %q", d.PID, d.Exe)
	}
	wd, _ := os.Getwd()
	if d.Cwd != wd {
		t.Errorf("cwd %q, want %q", d.Cwd, wd)
	}
	if len(d.FDs) != 0 {
		t.Errorf("fds %+v, want none beyond stdio", d.FDs)
	}
	kinds := map[uint32]int{}
	var stack, vdso *descriptor.VMA
	for i, v := range d.VMAs {
		kinds[v.Kind]++
		if i > 0 && v.Start < d.VMAs[i-1].End {
			t.Errorf("vma %d overlaps the previous one", i)
		}
		switch v.Kind {
		case descriptor.KindVDSO:
			vdso = &d.VMAs[i]
		case descriptor.KindAnon:
			if v.Flags&descriptor.FlagStack != 0 {
				stack = &d.VMAs[i]
			}
		}
	}
	if vdso == nil || stack == nil || kinds[descriptor.KindFile] == 0 {
		t.Fatalf("vmas lack the vdso, the stack or file mappings: %+v", d.VMAs)
	}
	if d.VDSOSyscall < vdso.Start || d.VDSOSyscall+2 > vdso.End {
		t.Errorf("VDSOSyscall %#x outside [vdso] %#x-%#x", d.VDSOSyscall, vdso.Start, vdso.End)
	}
	regs := RegsFromArray(d.Regs)
	if regs.Rsp < stack.Start || regs.Rsp >= stack.End {
		t.Errorf("rsp %#x outside the stack %#x-%#x", regs.Rsp, stack.Start, stack.End)
	}
	if d.PresentPages() == 0 {
		t.Errorf("no present pages")
	}
	for i, r := range d.Present {
		if r.Start%descriptor.PageSize != 0 || r.End <= r.Start || i > 0 && r.Start <= d.Present[i-1].End {
			t.Errorf("present run %d %#x-%#x malformed or not merged", i, r.Start, r.End)
		}
	}
	if len(d.XState) < 576 {
		t.Errorf("xstate %d bytes", len(d.XState))
	}
	if d.MM.Brk < d.MM.StartBrk || d.MM.StartStack < stack.Start || d.MM.StartStack >= stack.End {
		t.Errorf("mm fields %+v", d.MM)
	}
	// glibc's tid cache in the TCB was found and holds the parent's pid.
	if d.TIDAddr == 0 || d.ClearTID != d.TIDAddr {
		t.Errorf("TIDAddr %#x ClearTID %#x", d.TIDAddr, d.ClearTID)
	}
	// The frozen copy's memory is the parent's: the stack page at rsp,
	// and the tid in the TCB.
	a := make([]byte, 256)
	b := make([]byte, 256)
	err = tr.Do(func() error {
		if err := ptrace.ReadMem(src, regs.Rsp, a); err != nil {
			return err
		}
		return ptrace.ReadMem(pid, regs.Rsp, b)
	})
	if err != nil || !bytes.Equal(a, b) {
		t.Errorf("stack at rsp differs between the copy and the parent (%v)", err)
	}
	if d.TIDAddr != 0 {
		v, err := ptrace.ReadU64(src, d.TIDAddr)
		if err != nil || uint32(v) != uint32(pid) {
			t.Errorf("tid at %#x = %d (%v), want %d", d.TIDAddr, uint32(v), err, pid)
		}
	}
	// The copy keeps no fds.
	if ents, err := os.ReadDir("/proc/" + strconv.Itoa(src) + "/fd"); err != nil || len(ents) != 0 {
		t.Errorf("frozen copy fds: %d (%v), want none", len(ents), err)
	}

	if err := tr.Do(func() error { return Release(src) }); err != nil {
		t.Fatal(err)
	}
	released = true
	// Killed and no longer traced (see TestReleaseLeavesNoZombie for
	// what remains of it).
	if st, err := procfs.ReadStatus(src); err == nil && (!strings.HasPrefix(st.State, "Z") || st.TracerPid != 0) {
		t.Errorf("frozen copy after Release: state %q tracer %d", st.State, st.TracerPid)
	}
	// The parent still sleeps, and was not signalled.
	if err := unix.Kill(pid, 0); err != nil {
		t.Errorf("parent gone: %v", err)
	}
	// Back to sleep: a task the tracer stopped restarts its nanosleep
	// when let go, and may be seen running (R) for that instant.
	var st procfs.Status
	for deadline := time.Now().Add(time.Second); ; time.Sleep(time.Millisecond) {
		st, _ = procfs.ReadStatus(pid)
		if strings.HasPrefix(st.State, "S") || time.Now().After(deadline) {
			break
		}
	}
	if !strings.HasPrefix(st.State, "S") {
		t.Errorf("parent state %q a second after release", st.State)
	}
}

// isOurThread reports whether tid is a thread of the test process.
func isOurThread(tid int) bool {
	_, err := os.Stat("/proc/self/task/" + strconv.Itoa(tid))
	return tid > 0 && err == nil
}

// TestReleaseLeavesNoZombie: Release is documented to kill and reap the
// frozen copy, but the copy is the parent's child (clone with exit_signal
// 0): the tracer's wait4 only detaches the dead tracee, the kernel hands
// the zombie back to its real parent, which never waits for it (it needs
// __WALL/__WCLONE). Each released seed leaves a zombie under the parent
// until the parent exits.
// TestReleaseLeavesNoZombie: Release kills the frozen copy, ReapInParent
// reaps it in its parent (an exit-signal-0 clone the parent never waits
// for), so no zombie is left and the parent runs on.
func TestReleaseLeavesNoZombie(t *testing.T) {
	cmd := startSleep(t)
	pid := cmd.Process.Pid
	tr := ptrace.NewTracer()
	defer tr.Close()
	res, err := Prepare(tr, pid, Options{ChannelFD: -1})
	if err != nil {
		t.Fatal(err)
	}
	src := res.SourcePID
	if err := tr.Do(func() error {
		if err := Release(src); err != nil {
			return err
		}
		return ReapInParent(pid, src, res.Desc.VDSOSyscall)
	}); err != nil {
		t.Fatal(err)
	}
	if st, err := procfs.ReadStatus(pid); err != nil || st.TracerPid != 0 || strings.HasPrefix(st.State, "T") {
		t.Fatalf("parent after ReapInParent: %+v %v", st, err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		err := unix.Kill(src, 0)
		if errors.Is(err, unix.ESRCH) {
			return
		}
		if time.Now().After(deadline) {
			st, _ := procfs.ReadStatus(src)
			t.Fatalf("frozen copy %d still exists after Release (state %q), parent %d alive", src, st.State, pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPrepareRefusesPipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	cmd := startSleep(t, w) // fd 3 in sleep
	pid := cmd.Process.Pid
	tr := ptrace.NewTracer()
	defer tr.Close()
	_, err = Prepare(tr, pid, Options{ChannelFD: -1})
	if err == nil || !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "fd 3") || !strings.Contains(err.Error(), "pipe") {
		t.Fatalf("Prepare of a process holding a pipe: %v, want a refusal naming fd 3", err)
	}
	st, err := procfs.ReadStatus(pid)
	if err != nil || st.TracerPid != 0 || !strings.HasPrefix(st.State, "S") {
		t.Errorf("refused parent: state %q tracer %d (%v)", st.State, st.TracerPid, err)
	}
	// Missing channel.
	_, err = Prepare(tr, pid, Options{ChannelFD: 9})
	if err == nil || !strings.Contains(err.Error(), "fd 3") && !strings.Contains(err.Error(), "channel fd 9") {
		t.Errorf("Prepare with a missing channel: %v", err)
	}
	if _, err := Prepare(tr, 0, Options{ChannelFD: -1}); err == nil || !strings.Contains(err.Error(), "invalid pid") {
		t.Errorf("Prepare(0): %v", err)
	}
}
