package suite

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/mitosis-fork/mitosis/internal/procfs"
)

// lineReader reads lines a process writes to a pipe, with deadlines.
type lineReader struct {
	f   *os.File
	buf []byte
}

func (r *lineReader) readLine(deadline time.Time) (string, error) {
	for {
		if i := bytes.IndexByte(r.buf, '\n'); i >= 0 {
			l := string(r.buf[:i])
			r.buf = r.buf[i+1:]
			return l, nil
		}
		if err := r.f.SetReadDeadline(deadline); err != nil {
			return "", err
		}
		var tmp [4096]byte
		n, err := r.f.Read(tmp[:])
		r.buf = append(r.buf, tmp[:n]...)
		if n > 0 {
			continue
		}
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			err = errors.New("timed out")
		case err == io.EOF:
			err = errors.New("EOF (every writer closed the pipe)")
		}
		if len(r.buf) > 0 {
			return "", fmt.Errorf("%w (partial line %q)", err, r.buf)
		}
		return "", err
	}
}

// Smaps is the memory accounting of one process (see procfs.Smaps).
type Smaps = procfs.Smaps

func readSmaps(pid int) (Smaps, error) { return procfs.ReadSmaps(pid) }
