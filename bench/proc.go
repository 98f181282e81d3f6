package bench

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"

	"golang.org/x/sys/unix"
)

// pipeReader reads what a process writes to a pipe, with deadlines, keeping
// bytes read past what a caller asked for.
type pipeReader struct {
	f   *os.File
	buf []byte
}

// fill reads once from the pipe into r.buf.
func (r *pipeReader) fill(deadline time.Time) error {
	if err := r.f.SetReadDeadline(deadline); err != nil {
		return err
	}
	var tmp [4096]byte
	n, err := r.f.Read(tmp[:])
	r.buf = append(r.buf, tmp[:n]...)
	if n > 0 {
		return nil
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("timed out")
	}
	if err == io.EOF {
		return fmt.Errorf("EOF (every writer closed the pipe)")
	}
	return err
}

// pending returns, without waiting, whatever is buffered or can be read
// from the pipe right now, and consumes it.
func (r *pipeReader) pending() ([]byte, error) {
	rc, err := r.f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var rerr error
	var tmp [4096]byte
	for {
		n := 0
		err = rc.Read(func(fd uintptr) bool {
			n, rerr = unix.Read(int(fd), tmp[:])
			return true // never wait for more
		})
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			break
		}
		r.buf = append(r.buf, tmp[:n]...)
	}
	if rerr != nil && rerr != unix.EAGAIN {
		return nil, rerr
	}
	b := r.buf
	r.buf = nil
	return b, nil
}

// readByte returns the next byte.
func (r *pipeReader) readByte(deadline time.Time) (byte, error) {
	for len(r.buf) == 0 {
		if err := r.fill(deadline); err != nil {
			return 0, err
		}
	}
	b := r.buf[0]
	r.buf = r.buf[1:]
	return b, nil
}

// readLine returns the next line without its newline.
func (r *pipeReader) readLine(deadline time.Time) (string, error) {
	for {
		if i := bytes.IndexByte(r.buf, '\n'); i >= 0 {
			l := string(r.buf[:i])
			r.buf = r.buf[i+1:]
			return l, nil
		}
		if err := r.fill(deadline); err != nil {
			if len(r.buf) > 0 {
				return "", fmt.Errorf("%w (partial line %q)", err, r.buf)
			}
			return "", err
		}
	}
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.TrimSpace(string(t.b))
}

// parent is a long-lived parent program: it prints READY and stops itself;
// the benchmark prepares it, continues it (local-fork baseline) and kills it
// at the end.
type parent struct {
	name   string
	cmd    *exec.Cmd
	pid    int
	out    *pipeReader // its stdout (shared with its local children)
	errR   *os.File
	stderr *tailBuffer
	killed bool
}

// startParent starts argv with stdout and stderr on pipes and stdin on
// /dev/null (no other fds: exec.Cmd closes everything else), waits for its
// "READY" line and for it to be stopped.
func startParent(name string, argv, env []string, dir string, readyTimeout time.Duration) (*parent, error) {
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Dir = dir
	cmd.Stdout = outW
	cmd.Stderr = errW
	err = cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &parent{name: name, cmd: cmd, pid: cmd.Process.Pid, out: &pipeReader{f: outR},
		errR: errR, stderr: &tailBuffer{max: 4096}}
	go func() { _, _ = io.Copy(p.stderr, errR) }()
	l, err := p.out.readLine(time.Now().Add(readyTimeout))
	if err == nil && l != "READY" {
		err = fmt.Errorf("printed %q, want READY", l)
	}
	if err == nil {
		err = testenv.WaitStopped(p.pid, 10*time.Second)
	}
	if err != nil {
		err = fmt.Errorf("parent %s (pid %d): %v%s", name, p.pid, err, p.stderrNote())
		p.kill()
		return nil, err
	}
	return p, nil
}

func (p *parent) stderrNote() string {
	if s := p.stderr.String(); s != "" {
		return "; its stderr: " + s
	}
	return ""
}

// checkQuiet makes sure the stopped parent wrote nothing since its last
// expected output: output there would mean it ran user code when it should
// have stayed stopped (and would be read as a later run's result).
func (p *parent) checkQuiet() error {
	b, err := p.out.pending()
	if err != nil {
		return fmt.Errorf("parent %d: reading its stdout: %w", p.pid, err)
	}
	if len(b) > 0 {
		return fmt.Errorf("parent %d ran while it should have stayed stopped: it wrote %q%s", p.pid, b, p.stderrNote())
	}
	return nil
}

// kill ends the parent by pid (SIGKILL also ends a stopped process) and
// reaps it.
func (p *parent) kill() {
	if p.killed {
		return
	}
	p.killed = true
	if p.cmd.ProcessState == nil { // not reaped yet: the pid is still ours
		_ = syscall.Kill(p.pid, syscall.SIGKILL)
		_ = p.cmd.Wait()
	}
	p.out.f.Close()
	p.errR.Close()
}
