package procfs

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// startSleep starts `sleep 100` in dir with extra files as fds 3.. and
// kills and reaps it when the test ends.
func startSleep(t *testing.T, dir string, extra ...*os.File) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "100")
	cmd.Dir = dir
	cmd.ExtraFiles = extra
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	// cmd.Start returns once the exec has passed the point of no return,
	// before the new image is fully set up: wait until sleep sleeps.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		st, err := ReadStat(cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		if st.State == 'S' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sleep %d still in state %c", cmd.Process.Pid, st.State)
		}
	}
	return cmd
}

// sleepPath is the resolved path of the sleep binary.
func sleepPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep binary")
	}
	if p, err = filepath.EvalSymlinks(p); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLiveProcess(t *testing.T) {
	bin := sleepPath(t)
	dir := t.TempDir()
	cmd := startSleep(t, dir)
	pid := cmd.Process.Pid

	ms, err := Maps(pid)
	if err != nil {
		t.Fatal(err)
	}
	binID, err := StatFileID(bin)
	if err != nil {
		t.Fatal(err)
	}
	var stack *Mapping
	var haveText bool
	for i, m := range ms {
		if i > 0 && m.Start < ms[i-1].End {
			t.Errorf("mapping %d overlaps the previous one: %+v", i, m)
		}
		switch {
		case m.Path == "[stack]":
			stack = &ms[i]
		case m.Path == bin && m.Prot&unix.PROT_EXEC != 0:
			haveText = true
			if m.Inode != binID.Ino || m.Dev != binID.Dev || m.Shared || m.Deleted {
				t.Errorf("text mapping %+v does not match %s %+v", m, bin, binID)
			}
		}
	}
	if stack == nil || stack.Prot != unix.PROT_READ|unix.PROT_WRITE || stack.Inode != 0 {
		t.Errorf("bad or missing [stack] mapping: %+v", stack)
	}
	if !haveText {
		t.Errorf("no executable mapping of %s in %+v", bin, ms)
	}

	st, err := ReadStat(pid)
	if err != nil {
		t.Fatal(err)
	}
	if st.PPid != os.Getpid() || st.NumThreads != 1 {
		t.Errorf("stat %+v: want ppid %d and 1 thread", st, os.Getpid())
	}
	if stack != nil && (st.StartStack < stack.Start || st.StartStack >= stack.End) {
		t.Errorf("startstack %#x outside [stack] %#x-%#x", st.StartStack, stack.Start, stack.End)
	}
	if !(st.StartCode < st.EndCode && st.ArgStart < st.ArgEnd && st.EnvStart <= st.EnvEnd && st.StartData <= st.EndData) {
		t.Errorf("implausible stat ranges: %+v", st)
	}
	if st.ArgEnd-st.ArgStart != uint64(len("sleep\x00100\x00")) {
		t.Fatalf("argv is %d bytes", st.ArgEnd-st.ArgStart)
	}
	args := make([]byte, st.ArgEnd-st.ArgStart)
	n, err := unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &args[0], Len: uint64(len(args))}},
		[]unix.RemoteIovec{{Base: uintptr(st.ArgStart), Len: len(args)}}, 0)
	if err != nil || n != len(args) || string(args) != "sleep\x00100\x00" {
		t.Errorf("argv at arg_start = %q (%d, %v)", args, n, err)
	}

	status, err := ReadStatus(pid)
	if err != nil {
		t.Fatal(err)
	}
	uid, gid := uint32(os.Getuid()), uint32(os.Getgid())
	if status.State != "S (sleeping)" || status.Threads != 1 || status.TracerPid != 0 ||
		status.Uid != [4]uint32{uid, uid, uid, uid} || status.Gid != [4]uint32{gid, gid, gid, gid} {
		t.Errorf("status %+v", status)
	}
	if exe, err := Exe(pid); err != nil || exe != bin {
		t.Errorf("Exe = %q, %v; want %q", exe, err, bin)
	}
	if cwd, err := Cwd(pid); err != nil || cwd != dir {
		t.Errorf("Cwd = %q, %v; want %q", cwd, err, dir)
	}

	// A gone process gives errors, not garbage.
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if _, err := Maps(pid); err == nil {
		t.Errorf("Maps of reaped pid %d succeeded", pid)
	}
	if _, err := ReadStat(pid); err == nil || !strings.Contains(err.Error(), "stat of") {
		t.Errorf("ReadStat of reaped pid: %v", err)
	}
}

func TestSelfStatusAndAuxv(t *testing.T) {
	old := unix.Umask(0o027)
	defer unix.Umask(old)
	st, err := ReadStatus(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// status and stat describe the thread group leader, which may sleep.
	if st.Umask != 0o027 || st.Threads < 1 || st.State == "" {
		t.Errorf("own status %+v: want umask 027", st)
	}
	stat, err := ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.ContainsRune("RS", rune(stat.State)) || stat.PPid != os.Getppid() || stat.NumThreads != st.Threads {
		t.Errorf("own stat %+v vs status %+v", stat, st)
	}

	auxv, err := Auxv(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if len(auxv) == 0 || len(auxv)%16 != 0 {
		t.Fatalf("auxv of %d bytes", len(auxv))
	}
	pagesz := uint64(0)
	for i := 0; i+16 <= len(auxv); i += 16 {
		if binary.LittleEndian.Uint64(auxv[i:]) == 6 /* AT_PAGESZ */ {
			pagesz = binary.LittleEndian.Uint64(auxv[i+8:])
		}
	}
	if pagesz != uint64(os.Getpagesize()) {
		t.Errorf("AT_PAGESZ = %d, want %d", pagesz, os.Getpagesize())
	}
	if last := auxv[len(auxv)-16:]; binary.LittleEndian.Uint64(last) != 0 /* AT_NULL */ {
		t.Errorf("auxv does not end with AT_NULL: %x", last)
	}
}

func TestStatFileID(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	mt := time.Unix(1700000000, 123456789)
	if err := os.Chtimes(p, mt, mt); err != nil {
		t.Fatal(err)
	}
	id, err := StatFileID(p)
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	want := FileID{Dev: st.Dev, Ino: st.Ino, Size: 5, MtimeNsec: mt.UnixNano()}
	if id != want {
		t.Errorf("StatFileID = %+v, want %+v", id, want)
	}
	if _, err := StatFileID(p + ".missing"); err == nil {
		t.Error("StatFileID of a missing file succeeded")
	}
}

// fstatIno returns the inode number of fd.
func fstatIno(t *testing.T, fd uintptr) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(fd), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestFDsChild(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "data")
	if err := os.WriteFile(path, make([]byte, 200), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Seek(123, 0); err != nil {
		t.Fatal(err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	s0, s1 := os.NewFile(uintptr(sp[0]), "s0"), os.NewFile(uintptr(sp[1]), "s1")
	defer s0.Close()
	defer s1.Close()

	cmd := startSleep(t, dir, f, pr, s0)
	fds, err := FDs(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	// fds above 5 may be inherited from whoever runs the test.
	if len(fds) < 6 {
		t.Fatalf("got %d fds, want at least 6: %+v", len(fds), fds)
	}
	for i, fd := range fds[:6] {
		if fd.Num != i {
			t.Fatalf("fd %d at index %d: %+v", fd.Num, i, fds)
		}
		if fd.Cloexec {
			t.Errorf("fd %d is close-on-exec after exec: %+v", i, fd)
		}
	}
	if fd := fds[0]; fd.Kind != FDCharDev || fd.Target != os.DevNull || fd.Flags&unix.O_ACCMODE != unix.O_RDONLY {
		t.Errorf("stdin = %+v, want /dev/null read-only", fd)
	}
	fileID, err := StatFileID(path)
	if err != nil {
		t.Fatal(err)
	}
	if fd := fds[3]; fd.Kind != FDRegular || fd.Target != path || fd.Pos != 123 ||
		fd.Flags&(unix.O_ACCMODE|unix.O_APPEND) != unix.O_WRONLY|unix.O_APPEND || fd.File != fileID {
		t.Errorf("fd 3 = %+v, want regular %s at 123, O_WRONLY|O_APPEND, file %+v", fd, path, fileID)
	}
	pipeIno := fstatIno(t, pr.Fd())
	if fd := fds[4]; fd.Kind != FDPipe || fd.Target != "pipe:["+strconv.FormatUint(pipeIno, 10)+"]" ||
		fd.Flags&unix.O_ACCMODE != unix.O_RDONLY || fd.File.Ino != pipeIno || fd.Describe() != "pipe" {
		t.Errorf("fd 4 = %+v, want read end of pipe %d", fd, pipeIno)
	}
	sockIno := fstatIno(t, s0.Fd())
	if fd := fds[5]; fd.Kind != FDSocket || fd.SocketInode != sockIno || fd.Flags&unix.O_ACCMODE != unix.O_RDWR {
		t.Errorf("fd 5 = %+v, want socket %d", fd, sockIno)
	}
}

func TestFDsSelf(t *testing.T) {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	dupfd, err := unix.Dup(efd) // not close-on-exec
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dupfd)
	mfd, err := unix.MemfdCreate("procfs-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mfd)
	dir := t.TempDir()
	dirf, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer dirf.Close()
	gone := filepath.Join(dir, "gone")
	if err := os.WriteFile(gone, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	gonef, err := os.Open(gone)
	if err != nil {
		t.Fatal(err)
	}
	defer gonef.Close()
	if err := os.Remove(gone); err != nil {
		t.Fatal(err)
	}

	fds, err := FDs(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	byNum := map[int]FDInfo{}
	for i, fd := range fds {
		if i > 0 && fds[i-1].Num >= fd.Num {
			t.Errorf("fds not sorted: %d after %d", fd.Num, fds[i-1].Num)
		}
		byNum[fd.Num] = fd
	}
	tests := []struct {
		name     string
		fd       int
		kind     FDKind
		describe string
		cloexec  bool
		target   string
	}{
		{"eventfd", efd, FDAnonInode, "eventfd", true, "anon_inode:[eventfd]"},
		{"dup of eventfd", dupfd, FDAnonInode, "eventfd", false, "anon_inode:[eventfd]"},
		{"memfd", mfd, FDMemfd, "memfd", true, "/memfd:procfs-test (deleted)"},
		{"directory", int(dirf.Fd()), FDDir, "directory", true, dir},
		{"deleted file", int(gonef.Fd()), FDDeleted, "deleted file", true, gone + " (deleted)"},
	}
	for _, tc := range tests {
		fd, ok := byNum[tc.fd]
		if !ok {
			t.Errorf("%s: fd %d not listed", tc.name, tc.fd)
			continue
		}
		if fd.Kind != tc.kind || fd.Describe() != tc.describe || fd.Cloexec != tc.cloexec || fd.Target != tc.target {
			t.Errorf("%s: got %+v (%s), want kind %v, %q, cloexec %v, target %q", tc.name, fd, fd.Describe(), tc.kind, tc.describe, tc.cloexec, tc.target)
		}
	}
}
