package suite

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
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

// Smaps is the memory accounting of one process from
// /proc/PID/smaps_rollup, in bytes.
type Smaps struct {
	Rss, Pss, SharedClean, SharedDirty, PrivateClean, PrivateDirty uint64
}

func (s Smaps) Private() uint64 { return s.PrivateClean + s.PrivateDirty }
func (s Smaps) Shared() uint64  { return s.SharedClean + s.SharedDirty }

func (s *Smaps) add(o Smaps) {
	s.Rss += o.Rss
	s.Pss += o.Pss
	s.SharedClean += o.SharedClean
	s.SharedDirty += o.SharedDirty
	s.PrivateClean += o.PrivateClean
	s.PrivateDirty += o.PrivateDirty
}

func readSmaps(pid int) (Smaps, error) {
	var s Smaps
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return s, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) < 1 {
			continue
		}
		kb, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			continue
		}
		switch k {
		case "Rss":
			s.Rss = kb << 10
		case "Pss":
			s.Pss = kb << 10
		case "Shared_Clean":
			s.SharedClean = kb << 10
		case "Shared_Dirty":
			s.SharedDirty = kb << 10
		case "Private_Clean":
			s.PrivateClean = kb << 10
		case "Private_Dirty":
			s.PrivateDirty = kb << 10
		}
	}
	if s.Rss == 0 {
		return s, fmt.Errorf("/proc/%d/smaps_rollup: no Rss", pid)
	}
	return s, nil
}
