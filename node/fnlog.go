package node

import (
	"os"
	"sync"
)

// A function's log on a node (STATE_DIR/functions/NAME.log) takes its
// instances' stderr and its initialization's output: every process of the
// function writes to it through a descriptor of its own, in append mode.
// Past its maximum (mitosis daemon --function-log-max) the daemon rotates it: the log becomes NAME.log.1
// (replacing the one before) and a new NAME.log takes what processes
// started from then on write. Processes already running keep writing to
// the file they had, now NAME.log.1. /system/logs reads NAME.log.

// defaultFnLogMax is the size at which a function's log is rotated when the
// daemon's configuration does not say.
const defaultFnLogMax = 64 << 20

// fnLog is a function's log file, rotated as it grows.
type fnLog struct {
	path string
	max  int64 // rotate past this size

	mu  sync.Mutex
	cur *logRef
}

// logRef is one generation of the log file, closed once it is retired
// (rotated or the function removed) and no start of a process uses it.
type logRef struct {
	f       *os.File
	refs    int
	retired bool
}

func openFnLog(path string, max int64) (*fnLog, error) {
	if max <= 0 {
		max = defaultFnLogMax
	}
	f, err := openAppend(path)
	if err != nil {
		return nil, err
	}
	return &fnLog{path: path, max: max, cur: &logRef{f: f}}, nil
}

func openAppend(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
}

// acquire returns the file to give a process being started, rotating the
// log first if it has grown past its maximum, and the function to call once
// the process has its own descriptor of it.
func (l *fnLog) acquire() (*os.File, func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if st, err := l.cur.f.Stat(); err == nil && st.Size() >= l.max {
		l.rotateLocked()
	}
	r := l.cur
	r.refs++
	return r.f, func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		r.refs--
		if r.retired && r.refs == 0 {
			_ = r.f.Close()
		}
	}
}

// rotateLocked moves the log to PATH.1 and opens a new one; if it cannot,
// the log goes on growing. l.mu must be held.
func (l *fnLog) rotateLocked() {
	if err := os.Rename(l.path, l.path+".1"); err != nil {
		return
	}
	f, err := openAppend(l.path)
	if err != nil {
		_ = os.Rename(l.path+".1", l.path)
		return
	}
	l.retireLocked()
	l.cur = &logRef{f: f}
}

// retireLocked retires the current file. l.mu must be held.
func (l *fnLog) retireLocked() {
	l.cur.retired = true
	if l.cur.refs == 0 {
		_ = l.cur.f.Close()
	}
}

// close retires the log (the function is removed); starts still using it
// keep it open until they are done.
func (l *fnLog) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.cur.retired {
		l.retireLocked()
	}
}
