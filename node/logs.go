package node

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

// Function logs: a function's instances write their stdout and stderr to
// one log file per function on each node (its initialization output too).
// CallFnLogs reads it for the gateway's /system/logs: the last lines, or the
// lines written since an offset a previous call returned (to follow it).
// The lines carry no time of their own; a reply says when the log was last
// written.

// CallFnLogs reads a function's log on this node (LogsRequest, LogsReply).
const CallFnLogs = "fn-logs"

// MaxLogRead bounds the bytes of log one call reads: the last MaxLogRead
// bytes for a tail, MaxLogRead from the offset to follow. Its JSON answer
// stays within transport.MaxCallBody even if every byte needs escaping
// (\u00XX: six bytes each).
const MaxLogRead = 512 << 10

// LogsRequest asks for lines of a function's log on one node.
type LogsRequest struct {
	Name string `json:"name"`
	// Tail is how many of the last lines to return (<= 0: every complete
	// line of the last MaxLogRead bytes) when From is negative.
	Tail int `json:"tail"`
	// From, when not negative, asks instead for the complete lines from
	// that byte offset (the Next of a previous reply). An offset past the
	// end means the log was rotated since: the answer is the rest of the
	// rotated log (NAME.log.1) from that offset, with Next 0, so that the
	// next call reads the new log from its beginning.
	From int64 `json:"from"`
}

// LogsReply carries complete lines, without their newlines.
type LogsReply struct {
	Lines []string `json:"lines"`
	// Next is the offset after the last line returned: where to follow.
	Next int64 `json:"next"`
	// Modified is when the log was last written.
	Modified time.Time `json:"modified"`

	size int64 // the log's size when read
}

// errNoLog is returned for a function that has no log on this node.
var errNoLog = errors.New("no log of this function on this node")

// logs answers CallFnLogs.
func (f *fnRegistry) logs(req LogsRequest) (LogsReply, error) {
	f.mu.Lock()
	fn, ok := f.fns[req.Name]
	var path string
	if ok {
		path = fn.logPath
	}
	f.mu.Unlock()
	if !ok {
		return LogsReply{}, fmt.Errorf("%s: %w", req.Name, errNoLog)
	}
	if req.From >= 0 {
		if st, err := os.Stat(path); err == nil && req.From > st.Size() {
			// Rotated since the last call: the rest of the old log now,
			// the new one from its beginning at the next call.
			if old, err := readLog(path+".1", 0, req.From); err == nil && old.size >= req.From {
				old.Next = 0
				return old, nil
			}
		}
	}
	return readLog(path, req.Tail, req.From)
}

// readLog reads complete lines of the log at path: the last tail of them
// (from < 0), or those from offset from on.
func readLog(path string, tail int, from int64) (LogsReply, error) {
	fl, err := os.Open(path)
	if err != nil {
		return LogsReply{}, err
	}
	defer fl.Close()
	st, err := fl.Stat()
	if err != nil {
		return LogsReply{}, err
	}
	size := st.Size()
	rep := LogsReply{Lines: []string{}, Modified: st.ModTime(), size: size}
	start, end := from, size
	if from < 0 {
		start = max(0, size-MaxLogRead)
	} else {
		if from > size {
			start = 0
		}
		end = min(size, start+MaxLogRead)
	}
	b := make([]byte, end-start)
	if _, err := fl.ReadAt(b, start); err != nil && !errors.Is(err, io.EOF) {
		return LogsReply{}, err
	}
	if from < 0 && start > 0 {
		// The window began inside a line: drop its rest.
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			b = nil
		} else {
			start += int64(i + 1)
			b = b[i+1:]
		}
	}
	last := bytes.LastIndexByte(b, '\n')
	switch {
	case last >= 0:
		b = b[:last+1]
	case from >= 0 && int64(len(b)) == MaxLogRead:
		// A line longer than a whole read: return it in pieces rather
		// than never.
	default:
		b = nil
	}
	rep.Next = start + int64(len(b))
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			i = len(b)
		}
		rep.Lines = append(rep.Lines, string(b[:i]))
		b = b[min(i+1, len(b)):]
	}
	if from < 0 && tail > 0 && len(rep.Lines) > tail {
		rep.Lines = rep.Lines[len(rep.Lines)-tail:]
	}
	return rep, nil
}
