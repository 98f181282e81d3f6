package function

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/internal/ptrace"
)

//go:embed bootstrap.py
var bootstrapPy []byte

// BootstrapSource is the Python bootstrap's source.
func BootstrapSource() []byte { return bootstrapPy }

// InstallBootstrap writes the bootstrap into dir (created if missing) and
// returns its path. Writing the same content again is a no-op, so running
// processes never see a half-written file.
func InstallBootstrap(dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("install bootstrap: %w", err)
	}
	path := filepath.Join(dir, "mitosis-bootstrap.py")
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, bootstrapPy) {
		return path, nil
	}
	tmp, err := os.CreateTemp(dir, ".bootstrap-*")
	if err != nil {
		return "", fmt.Errorf("install bootstrap: %w", err)
	}
	_, werr := tmp.Write(bootstrapPy)
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr, os.Chmod(tmp.Name(), 0o644)); err != nil {
		_ = os.Remove(tmp.Name())
		return "", fmt.Errorf("install bootstrap: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		_ = os.Remove(tmp.Name())
		return "", fmt.Errorf("install bootstrap: %w", err)
	}
	return path, nil
}

// Mode is how a function process runs.
type Mode string

// Modes of the bootstrap.
const (
	// ModeSeed initializes, then prepares itself into the function's seed.
	ModeSeed Mode = "seed"
	// ModeServe initializes, then serves requests on its socket.
	ModeServe Mode = "serve"
)

// StartOptions configure Start.
type StartOptions struct {
	Spec *Spec
	Mode Mode
	// Python is the interpreter (default /usr/bin/python3; inside Root
	// when Root is set).
	Python string
	// Bootstrap is the bootstrap's path (inside Root when Root is set).
	Bootstrap string
	// Dir is the function directory the bootstrap loads (inside Root when
	// Root is set).
	Dir string
	// Root, if set, is the image directory the process is chrooted to
	// (new mount, UTS and IPC namespaces).
	Root string
	// SeedName is the seed's name (ModeSeed).
	SeedName string
	// Socket is the daemon's socket, $MITOSIS_SOCKET of a seed process
	// (a path the process can reach: inside Root, if set).
	Socket string
	// Log receives the process's stdout and stderr (nil: /dev/null).
	Log *os.File
	// OnStart runs with the new pid before the process is let go to run
	// its initialization, e.g. to move it into a cgroup. An error kills it.
	OnStart func(pid int) error
}

// Process is a running function process.
type Process struct {
	PID  int
	Mode Mode

	conn  *os.File // the daemon's end of the status/request socket
	lines *bufio.Reader
	mu    sync.Mutex // serializes requests on conn (ModeServe)

	done   chan struct{}
	status unix.WaitStatus
}

// Start starts a function process. It returns once the process exists;
// WaitReady then waits for its initialization.
func Start(o StartOptions) (*Process, error) {
	if o.Spec == nil {
		return nil, errors.New("function: start: no spec")
	}
	python := o.Python
	if python == "" {
		python = "/usr/bin/python3"
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("function %s: socketpair: %w", o.Spec.Name, err)
	}
	// The daemon's end is non-blocking so reads honour deadlines (the
	// runtime poller); the process's end stays blocking for plain read().
	if err := unix.SetNonblock(pair[0], true); err != nil {
		unix.Close(pair[0])
		unix.Close(pair[1])
		return nil, fmt.Errorf("function %s: socketpair: %w", o.Spec.Name, err)
	}
	mine := os.NewFile(uintptr(pair[0]), "function-daemon")
	theirs := os.NewFile(uintptr(pair[1]), "function-process")
	defer theirs.Close()
	// A gate keeps the process from running its initialization until
	// OnStart has placed it (e.g. in its cgroup): the bootstrap's
	// interpreter starts only after the gate's write end closes.
	gateR, gateW, err := os.Pipe()
	if err != nil {
		mine.Close()
		return nil, fmt.Errorf("function %s: pipe: %w", o.Spec.Name, err)
	}
	defer gateR.Close()
	out := o.Log
	if out == nil {
		dn, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		if err != nil {
			mine.Close()
			gateW.Close()
			return nil, err
		}
		defer dn.Close()
		out = dn
	}
	env := o.Spec.Environ("MITOSIS_STATUS_FD=3", "MITOSIS_FUNCTION="+o.Spec.Name)
	if o.Socket != "" {
		env = append(env, "MITOSIS_SOCKET="+o.Socket)
	}
	// sh waits on the gate (fd 4) and then execs the interpreter with
	// the gate closed; it needs nothing beyond /bin/sh.
	script := `read _ <&4; exec 4<&-; exec "$0" "$@"`
	args := []string{"-c", script, python, "-X", "frozen_modules=on", o.Bootstrap, string(o.Mode), o.Dir, o.SeedName}
	if o.SeedName == "" {
		args[len(args)-1] = o.Spec.Name
	}
	cmd := exec.Command("/bin/sh", args...)
	cmd.Env = env
	cmd.Dir = "/"
	cmd.Stdin = nil
	cmd.Stdout, cmd.Stderr = out, out
	cmd.ExtraFiles = []*os.File{theirs, gateR}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if o.Root != "" {
		cmd.SysProcAttr.Chroot = o.Root
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWNS | syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC
	}
	if err := cmd.Start(); err != nil {
		mine.Close()
		gateW.Close()
		return nil, fmt.Errorf("function %s: start %s: %w", o.Spec.Name, python, err)
	}
	p := &Process{PID: cmd.Process.Pid, Mode: o.Mode, conn: mine, lines: bufio.NewReaderSize(mine, 64<<10), done: make(chan struct{})}
	pidfd, _ := unix.PidfdOpen(p.PID, unix.PIDFD_NONBLOCK)
	go func() {
		var f *os.File
		if pidfd > 0 {
			f = os.NewFile(uintptr(pidfd), "pidfd")
		}
		// Not cmd.Wait: a seed process is traced while it is prepared,
		// and wait4 would consume its ptrace stops.
		p.status = ptrace.ReapExit(p.PID, f)
		_ = cmd.Process.Release()
		close(p.done)
	}()
	if o.OnStart != nil {
		if err := o.OnStart(p.PID); err != nil {
			gateW.Close()
			p.Kill()
			return nil, fmt.Errorf("function %s: %w", o.Spec.Name, err)
		}
	}
	_, _ = gateW.Write([]byte("go\n"))
	gateW.Close()
	return p, nil
}

// Done is closed once the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// ExitStatus is the process's wait status, valid after Done.
func (p *Process) ExitStatus() unix.WaitStatus { return p.status }

// Exited describes how the process ended ("exit code 1", "killed by signal
// 9"); valid after Done.
func (p *Process) Exited() string {
	ws := p.status
	if ws.Signaled() {
		return "killed by signal " + strconv.Itoa(int(ws.Signal()))
	}
	return "exit code " + strconv.Itoa(ws.ExitStatus())
}

// Kill ends the process and everything it started (its process group).
func (p *Process) Kill() {
	select {
	case <-p.done:
	default:
		_ = unix.Kill(-p.PID, unix.SIGKILL)
		_ = unix.Kill(p.PID, unix.SIGKILL)
	}
	_ = p.conn.Close()
}

// readLine reads one protocol line before ctx ends, or fails when the
// process dies or closes its end.
func (p *Process) readLine(ctx context.Context) ([]byte, error) {
	if dl, ok := ctx.Deadline(); ok {
		_ = p.conn.SetReadDeadline(dl)
	} else {
		_ = p.conn.SetReadDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { _ = p.conn.SetReadDeadline(time.Now()) })
	defer stop()
	var buf []byte
	for {
		chunk, err := p.lines.ReadSlice('\n')
		buf = append(buf, chunk...)
		if err == nil {
			return bytes.TrimSuffix(buf, []byte("\n")), nil
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			if len(buf) > MaxLine {
				return nil, fmt.Errorf("line from the function process longer than %d bytes", MaxLine)
			}
			continue
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, context.DeadlineExceeded
		}
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, err
	}
}

// WaitReady waits for the process's initialization to end. An
// initialization error (the handler module raised) is returned wrapping
// ErrInit, with the traceback's last line.
func (p *Process) WaitReady(ctx context.Context) (Status, error) {
	line, err := p.readLine(ctx)
	if err != nil {
		if errors.Is(err, io.EOF) {
			select {
			case <-p.done:
				return Status{}, fmt.Errorf("%w: the process ended (%s) before reporting its initialization", ErrInit, p.Exited())
			case <-time.After(time.Second):
			}
			return Status{}, fmt.Errorf("%w: the process closed its status socket without reporting", ErrInit)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return Status{}, fmt.Errorf("%w: still initializing after the init timeout", ErrInit)
		}
		return Status{}, fmt.Errorf("%w: %w", ErrInit, err)
	}
	st, err := DecodeStatus(line)
	if err != nil {
		return Status{}, fmt.Errorf("%w: %w", ErrInit, err)
	}
	if !st.Ready {
		return st, fmt.Errorf("%w: %s", ErrInit, st.Error)
	}
	return st, nil
}

// CloseStatus closes the daemon's end of the status socket (a seed process
// closes its own before it prepares).
func (p *Process) CloseStatus() { _ = p.conn.Close() }

// Invoke sends one request to a serving process (ModeServe) and reads its
// reply. One request at a time: concurrent calls queue.
func (p *Process) Invoke(ctx context.Context, req Request) (Reply, error) {
	line, err := json.Marshal(req)
	if err != nil {
		return Reply{}, fmt.Errorf("encode request: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := p.conn.Write(append(line, '\n')); err != nil {
		return Reply{}, fmt.Errorf("send request to pid %d: %w", p.PID, err)
	}
	resp, err := p.readLine(ctx)
	if err != nil {
		return Reply{}, p.replyErr(err)
	}
	return DecodeReply(resp)
}

// replyErr explains a failed read of a reply.
func (p *Process) replyErr(err error) error {
	switch {
	case errors.Is(err, io.EOF):
		select {
		case <-p.done:
			return fmt.Errorf("the function process ended (%s) without replying", p.Exited())
		case <-time.After(500 * time.Millisecond):
			return errors.New("the function process closed its socket without replying")
		}
	case errors.Is(err, context.DeadlineExceeded):
		return ErrTimeout
	}
	return fmt.Errorf("read reply: %w", err)
}

// ErrTimeout is returned when an invocation exceeds its timeout.
var ErrTimeout = errors.New("function timed out")

// ReadReply reads one reply line from ch (a forked child's channel, opened
// non-blocking so deadlines work) before ctx ends. done, if not nil, is closed when the replying process has
// exited, to tell a crash from a slow handler.
func ReadReply(ctx context.Context, ch *os.File, done <-chan struct{}, exited func() string) (Reply, error) {
	p := &Process{conn: ch, lines: bufio.NewReaderSize(ch, 16<<10), done: make(chan struct{})}
	line, err := p.readLine(ctx)
	if err != nil {
		switch {
		case errors.Is(err, io.EOF):
			if done != nil {
				select {
				case <-done:
					return Reply{}, fmt.Errorf("the function's child ended (%s) without replying", exited())
				case <-time.After(500 * time.Millisecond):
				}
			}
			return Reply{}, errors.New("the function's child closed its channel without replying")
		case errors.Is(err, context.DeadlineExceeded):
			return Reply{}, ErrTimeout
		}
		return Reply{}, fmt.Errorf("read reply: %w", err)
	}
	return DecodeReply(line)
}

// Stop and Continue pause and resume an idle warm instance (the keep-alive
// baseline keeps idle instances stopped, resumed with SIGCONT on use).
func (p *Process) Stop() error { return unix.Kill(p.PID, unix.SIGSTOP) }

// Continue resumes a stopped instance.
func (p *Process) Continue() error { return unix.Kill(p.PID, unix.SIGCONT) }

// Tail returns the last n lines of a log file, for error messages.
func Tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
