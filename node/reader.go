package node

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/client"
)

// errLineTooLong reports a request line longer than client.MaxLine; the rest
// of the line is discarded and the connection keeps serving.
var errLineTooLong = fmt.Errorf("request line longer than %d bytes (one JSON object per line, see docs/PROTOCOL.md)", client.MaxLine)

// fdBatch is a set of fds received with one recvmsg. at is the stream offset
// of the last byte that recvmsg returned: the kernel ends a stream read at
// the message that carried the fds, so that byte belongs to the request the
// fds were sent with.
type fdBatch struct {
	at  int64
	fds []int
}

// lineReader splits a unix stream connection into request lines, keeping the
// SCM_RIGHTS fds that arrived with each line.
type lineReader struct {
	conn    *net.UnixConn
	buf     []byte
	off     int64 // stream offset of buf[0]
	batches []fdBatch
	discard bool // dropping the rest of a too long line
	tmp     []byte
	oob     []byte
}

func newLineReader(conn *net.UnixConn) *lineReader {
	return &lineReader{
		conn: conn,
		tmp:  make([]byte, 64<<10),
		oob:  make([]byte, unix.CmsgSpace(16*4)),
	}
}

// next returns the next line (without '\n') and the fds sent with it. A line
// longer than client.MaxLine yields errLineTooLong once, then reading goes on
// after its end. Other errors (io.EOF) end the stream.
func (r *lineReader) next() ([]byte, []int, error) {
	for {
		if i := bytes.IndexByte(r.buf, '\n'); i >= 0 {
			start, end := r.off, r.off+int64(i)+1
			line := append([]byte(nil), r.buf[:i]...)
			r.buf = r.buf[i+1:]
			r.off = end
			fds := r.take(start, end)
			if r.discard {
				r.discard = false
				closeFDs(fds)
				continue
			}
			if len(line)+1 > client.MaxLine {
				closeFDs(fds)
				return nil, nil, errLineTooLong
			}
			return line, fds, nil
		}
		if r.discard {
			r.off += int64(len(r.buf))
			r.buf = r.buf[:0]
			closeFDs(r.take(0, r.off))
		} else if len(r.buf) >= client.MaxLine {
			r.discard = true
			r.off += int64(len(r.buf))
			r.buf = r.buf[:0]
			closeFDs(r.take(0, r.off))
			return nil, nil, errLineTooLong
		}
		if err := r.fill(); err != nil {
			return nil, nil, err
		}
	}
}

// fill reads more data (and any fds) from the connection.
func (r *lineReader) fill() error {
	n, oobn, _, _, err := r.conn.ReadMsgUnix(r.tmp, r.oob)
	n, oobn = max(n, 0), max(oobn, 0)
	if oobn > 0 {
		fds := parseRights(r.oob[:oobn])
		if n > 0 && len(fds) > 0 {
			r.batches = append(r.batches, fdBatch{at: r.off + int64(len(r.buf)) + int64(n) - 1, fds: fds})
		} else {
			closeFDs(fds)
		}
	}
	r.buf = append(r.buf, r.tmp[:n]...)
	if n == 0 && err == nil {
		return errors.New("connection read returned no data")
	}
	if n > 0 {
		return nil
	}
	return err
}

// take removes and returns the fds of batches before end; those before start
// (sent with a line already consumed) are closed instead.
func (r *lineReader) take(start, end int64) []int {
	var out []int
	keep := r.batches[:0]
	for _, b := range r.batches {
		switch {
		case b.at < start:
			closeFDs(b.fds)
		case b.at < end:
			out = append(out, b.fds...)
		default:
			keep = append(keep, b)
		}
	}
	r.batches = keep
	return out
}

// close releases fds received but never handed out.
func (r *lineReader) close() {
	for _, b := range r.batches {
		closeFDs(b.fds)
	}
	r.batches = nil
}

func parseRights(oob []byte) []int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err == nil {
			fds = append(fds, got...)
		}
	}
	return fds
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		_ = unix.Close(fd)
	}
}

// maxCount bounds the children of one fork request.
const maxCount = 10000

// decodeRequest parses and validates one request line.
func decodeRequest(line []byte) (client.Request, error) {
	var req client.Request
	line = bytes.TrimSpace(line)
	if len(line) == 0 {
		return req, errors.New("empty request line (send one JSON object per line, see docs/PROTOCOL.md)")
	}
	if line[0] != '{' {
		return req, errors.New("malformed request: not a JSON object (send one JSON object per line, see docs/PROTOCOL.md)")
	}
	if err := json.Unmarshal(line, &req); err != nil {
		return client.Request{}, fmt.Errorf("malformed request: %v (send one JSON object per line, see docs/PROTOCOL.md)", err)
	}
	switch req.Op {
	case "":
		return req, errors.New(`request has no "op" (one of prepare, prepare-self, fork, seeds, ps, rm, ping)`)
	case client.OpPrepare:
		if req.PID <= 0 {
			return req, fmt.Errorf("prepare: pid must be a positive process id, got %d", req.PID)
		}
	case client.OpPrepareSelf:
		if req.FD == nil || *req.FD < 0 {
			return req, errors.New(`prepare-self: "fd" (the caller's fd number of this connection) is required`)
		}
	case client.OpFork:
		if req.Seed == "" {
			return req, errors.New(`fork: "seed" (a seed id or name) is required`)
		}
		if strings.Contains(req.Seed, "/") {
			node, seed := splitSeedRef(req.Seed)
			if node == "" || seed == "" || strings.Contains(seed, "/") {
				return req, fmt.Errorf("fork: seed %q: use SEED or NODE/SEED", req.Seed)
			}
			if err := checkNodeName(node); err != nil {
				return req, fmt.Errorf("fork: seed %q: %w", req.Seed, err)
			}
		}
		if req.Node != "" {
			if err := checkNodeName(req.Node); err != nil {
				return req, fmt.Errorf("fork: node: %w", err)
			}
		}
		if req.Count == 0 {
			req.Count = 1
		}
		if req.Count < 0 || req.Count > maxCount {
			return req, fmt.Errorf("fork: count must be between 1 and %d, got %d", maxCount, req.Count)
		}
		if req.Stdio && req.Count != 1 {
			return req, fmt.Errorf("fork: stdio needs count 1, got %d", req.Count)
		}
		if len(req.Payload) > 0 && !json.Valid(req.Payload) {
			return req, errors.New("fork: payload is not valid JSON")
		}
	case client.OpRm:
		if req.ID == "" {
			return req, errors.New(`rm: "id" (a seed id or name, or a child id) is required`)
		}
	case client.OpRun:
		if req.Rootfs == "" || len(req.Argv) == 0 {
			return req, errors.New(`run: "rootfs" and "argv" are required`)
		}
		if req.CPUs < 0 || req.Pids < 0 {
			return req, errors.New("run: limits must not be negative")
		}
	case client.OpSeeds, client.OpPS, client.OpPing:
	case client.OpFnDeploy, client.OpFnRm, client.OpInvoke:
		if len(req.Args) == 0 || req.Args[0] != '{' {
			return req, fmt.Errorf(`%s: "args" (a JSON object) is required`, req.Op)
		}
	case client.OpFnList, client.OpNodeStats:
	default:
		return req, fmt.Errorf("unknown op %q (one of prepare, prepare-self, fork, run, seeds, ps, rm, ping, fn-deploy, fn-rm, fn-ls, node-stats, invoke)", req.Op)
	}
	return req, nil
}
