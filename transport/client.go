package transport

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// errConnLost marks errors that ended a connection (as opposed to a
// request refused by the peer); idempotent requests are retried once on a
// fresh connection after one.
var errConnLost = errors.New("connection lost")

// LatencyBucketsUS are the upper bounds (µs) of ClientStats.LatencyUS
// buckets; the last bucket (index len(LatencyBucketsUS)) is +Inf.
var LatencyBucketsUS = [...]uint64{50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000}

// ClientStats are a client's counters.
type ClientStats struct {
	Requests      uint64 // requests issued (each wire request once)
	Errors        uint64 // requests that failed (including timeouts)
	Timeouts      uint64 // requests that ran out of time
	Redials       uint64 // connections re-established after a failure
	PagesRequests uint64
	BytesFetched  uint64 // page bytes received
	// BytesSpliced counts page bytes ReadRangesTo moved from the socket
	// into their file with splice(2) (part of BytesFetched).
	BytesSpliced uint64
	// LatencyUS counts completed requests by latency: bucket i holds
	// latencies ≤ LatencyBucketsUS[i] (and above the previous bound); the
	// last bucket holds the rest.
	LatencyUS    [len(LatencyBucketsUS) + 1]uint64
	LatencySumUS uint64
}

type clientCounters struct {
	requests, errors, timeouts, redials, pagesReqs, bytes, spliced atomic.Uint64
	lat                                                            [len(LatencyBucketsUS) + 1]atomic.Uint64
	latSum                                                         atomic.Uint64
}

func (s *clientCounters) observe(d time.Duration) {
	us := uint64(d.Microseconds())
	i := 0
	for i < len(LatencyBucketsUS) && us > LatencyBucketsUS[i] {
		i++
	}
	s.lat[i].Add(1)
	s.latSum.Add(us)
}

// Client talks to one peer over a small pool of authenticated connections.
// It is safe for concurrent use.
type Client struct {
	cfg  Config
	addr string

	peerMu    sync.Mutex
	peer      string
	peerKnown bool

	slots  []*slot
	rr     atomic.Uint64
	closed atomic.Bool

	st clientCounters
}

// slot holds one of the client's connections, re-dialed when broken.
type slot struct {
	lock chan struct{} // held while dialing
	cc   atomic.Pointer[clientConn]
}

// Dial opens cfg.Conns authenticated connections to the node at addr.
func Dial(ctx context.Context, addr string, cfg Config) (*Client, error) {
	cfg, err := cfg.normalize()
	if err != nil {
		return nil, err
	}
	c := &Client{cfg: cfg, addr: addr, slots: make([]*slot, cfg.Conns)}
	for i := range c.slots {
		c.slots[i] = &slot{lock: make(chan struct{}, 1)}
	}
	ctx, cancel := context.WithTimeout(ctx, max(cfg.Timeout, HandshakeTimeout))
	defer cancel()
	errs := make([]error, len(c.slots))
	var wg sync.WaitGroup
	for i, sl := range c.slots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cc, err := c.dial(ctx)
			if err != nil {
				errs[i] = err
				return
			}
			sl.cc.Store(cc)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		c.Close()
		return nil, fmt.Errorf("transport: dial %s: %w", addr, firstErr(errs))
	}
	return c, nil
}

func firstErr(errs []error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// Peer returns the peer's node name, learned from the handshake.
func (c *Client) Peer() string {
	c.peerMu.Lock()
	defer c.peerMu.Unlock()
	return c.peer
}

// where names the peer for error messages: "node a (198.18.0.1:7070)".
func (c *Client) where() string {
	if p := c.Peer(); p != "" {
		return fmt.Sprintf("node %s (%s)", p, c.addr)
	}
	return c.addr
}

// Addr returns the address the client dials.
func (c *Client) Addr() string { return c.addr }

// Stats returns a snapshot of the client's counters.
func (c *Client) Stats() ClientStats {
	s := ClientStats{
		Requests:      c.st.requests.Load(),
		Errors:        c.st.errors.Load(),
		Timeouts:      c.st.timeouts.Load(),
		Redials:       c.st.redials.Load(),
		PagesRequests: c.st.pagesReqs.Load(),
		BytesFetched:  c.st.bytes.Load(),
		BytesSpliced:  c.st.spliced.Load(),
		LatencySumUS:  c.st.latSum.Load(),
	}
	for i := range s.LatencyUS {
		s.LatencyUS[i] = c.st.lat[i].Load()
	}
	return s
}

// Close closes every connection; pending requests fail with ErrClosed.
func (c *Client) Close() error {
	c.closed.Store(true)
	for _, sl := range c.slots {
		if cc := sl.cc.Load(); cc != nil {
			cc.fail(ErrClosed)
			<-cc.done
		}
	}
	return nil
}

// dial opens and authenticates one connection.
func (c *Client) dial(ctx context.Context) (*clientConn, error) {
	var d net.Dialer
	d.KeepAlive = 15 * time.Second
	raw, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return nil, err
	}
	// Abort the handshake when ctx ends.
	stop := context.AfterFunc(ctx, func() { _ = raw.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl)
	} else {
		_ = raw.SetDeadline(time.Now().Add(HandshakeTimeout))
	}
	conn := raw
	if c.cfg.TLS != nil {
		tcfg := c.cfg.TLS.Clone()
		if tcfg.ServerName == "" {
			if host, _, err := net.SplitHostPort(c.addr); err == nil {
				tcfg.ServerName = host
			}
		}
		tc := tls.Client(raw, tcfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			raw.Close()
			return nil, fmt.Errorf("tls handshake: %w", err)
		}
		conn = tc
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	peer, err := clientHandshake(conn, br, &c.cfg)
	if err != nil {
		raw.Close()
		if ctx.Err() != nil && !errors.Is(err, ErrAuth) {
			return nil, fmt.Errorf("handshake: %w (%w)", ErrTimeout, err)
		}
		return nil, fmt.Errorf("handshake: %w", err)
	}
	if !stop() {
		raw.Close()
		return nil, fmt.Errorf("handshake: %w", ctx.Err())
	}
	_ = raw.SetDeadline(time.Time{})

	c.peerMu.Lock()
	if !c.peerKnown {
		c.peer, c.peerKnown = peer, true
	} else if c.peer != peer {
		was := c.peer
		c.peerMu.Unlock()
		raw.Close()
		return nil, fmt.Errorf("%w: node at %s is now %q, was %q", ErrAuth, c.addr, peer, was)
	}
	c.peerMu.Unlock()

	cc := &clientConn{
		cl:      c,
		c:       conn,
		br:      br,
		peer:    peer,
		pending: make(map[uint64]*call),
		done:    make(chan struct{}),
		pipe:    [2]int{-1, -1},
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		if rc, err := tc.SyscallConn(); err == nil {
			cc.raw = rc
		}
	}
	go cc.readLoop()
	return cc, nil
}

// conn returns a live connection of sl, re-dialing it if it broke.
func (c *Client) conn(ctx context.Context, sl *slot) (*clientConn, error) {
	if cc := sl.cc.Load(); cc != nil && !cc.dead.Load() {
		return cc, nil
	}
	select {
	case sl.lock <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-sl.lock }()
	if c.closed.Load() {
		return nil, ErrClosed
	}
	old := sl.cc.Load()
	if old != nil && !old.dead.Load() {
		return old, nil
	}
	cc, err := c.dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("redial: %w", err)
	}
	sl.cc.Store(cc)
	if c.closed.Load() { // raced with Close
		cc.fail(ErrClosed)
		return nil, ErrClosed
	}
	if old != nil {
		c.st.redials.Add(1)
	}
	return cc, nil
}

// result is what the reader hands a waiting request.
type result struct {
	typ     uint8
	payload []byte
	err     error
}

// pageSink is where a pages request's answer goes: a buffer, or places
// in a file.
type pageSink struct {
	dst     []byte
	segs    []fileSeg
	fd      int
	spliced *atomic.Uint64 // bytes spliced into fd
}

type call struct {
	dst     []byte    // pages responses are read straight into dst
	segs    []fileSeg // or into a file, here
	fd      int       // (the file of segs)
	spliced *atomic.Uint64
	ch      chan result
}

// fileSeg is where a stretch of a pages response goes in the file of a
// ReadRangesTo call.
type fileSeg struct {
	off int64
	n   int
}

// clientConn is one connection; its reader matches responses to pending
// requests by id.
type clientConn struct {
	cl   *Client
	c    net.Conn
	br   *bufio.Reader
	peer string

	wmu sync.Mutex // serializes writes

	// raw is the socket of a plain TCP connection (nil under TLS): pages
	// responses bound for a file are spliced from it. The pipe they pass
	// through is the reader's alone, made on first use.
	raw  syscall.RawConn
	pipe [2]int

	mu      sync.Mutex
	pending map[uint64]*call
	nextID  uint64
	err     error
	dead    atomic.Bool

	done chan struct{} // closed when the reader returns
}

// fail ends the connection: every pending request gets err.
func (cc *clientConn) fail(err error) {
	cc.mu.Lock()
	if cc.err != nil {
		cc.mu.Unlock()
		return
	}
	if !errors.Is(err, ErrClosed) {
		err = fmt.Errorf("%w to %s: %w", errConnLost, cc.peer, err)
	}
	cc.err = err
	cc.dead.Store(true)
	pend := cc.pending
	cc.pending = nil
	cc.mu.Unlock()
	cc.c.Close()
	for _, k := range pend {
		k.ch <- result{err: err}
	}
}

func (cc *clientConn) take(id uint64) *call {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	k := cc.pending[id]
	delete(cc.pending, id)
	return k
}

func (cc *clientConn) readLoop() {
	defer close(cc.done)
	defer cc.closePipe()
	for {
		var h [HeaderSize]byte
		if _, err := io.ReadFull(cc.br, h[:]); err != nil {
			cc.fail(err)
			return
		}
		fh, err := ParseHeader(&h, 0)
		if err != nil {
			cc.fail(err)
			return
		}
		switch fh.Type {
		case TypeDescResp, TypePagesResp, TypeForkResp, TypeLeaseResp, TypePong, TypeError, TypeInvokeResp, TypeCallResp:
		default:
			cc.fail(fmt.Errorf("%w: unexpected frame type %d", ErrMalformed, fh.Type))
			return
		}
		if fh.ID == 0 {
			if fh.Type != TypeError {
				cc.fail(fmt.Errorf("%w: response with id 0", ErrMalformed))
				return
			}
			p, err := readPayload(cc.br, fh.Len)
			if err == nil {
				var m ErrorMsg
				if m, err = DecodeError(p); err == nil {
					err = &RemoteError{Peer: cc.peer, Code: m.Code, Msg: m.Msg}
				}
			}
			cc.fail(err)
			return
		}
		k := cc.take(fh.ID)
		if k == nil { // its caller gave up; skip the answer
			if _, err := io.CopyN(io.Discard, cc.br, int64(fh.Len)); err != nil {
				cc.fail(err)
				return
			}
			continue
		}
		if fh.Type == TypePagesResp && k.segs != nil {
			if want := segsLen(k.segs); uint64(want) != uint64(fh.Len) {
				err := fmt.Errorf("%w: pages response of %d bytes, want %d", ErrMalformed, fh.Len, want)
				k.ch <- result{err: err}
				cc.fail(err)
				return
			}
			if err := cc.readToFile(k.fd, k.segs, k.spliced); err != nil {
				k.ch <- result{err: err}
				cc.fail(err)
				return
			}
			k.ch <- result{typ: fh.Type}
			continue
		}
		if fh.Type == TypePagesResp {
			if k.dst == nil || uint64(len(k.dst)) != uint64(fh.Len) {
				err := fmt.Errorf("%w: pages response of %d bytes, want %d", ErrMalformed, fh.Len, len(k.dst))
				k.ch <- result{err: err}
				cc.fail(err)
				return
			}
			if _, err := io.ReadFull(cc.br, k.dst); err != nil {
				err = fmt.Errorf("%w to %s: %w", errConnLost, cc.peer, unexpectedEOF(err))
				k.ch <- result{err: err}
				cc.fail(err)
				return
			}
			k.ch <- result{typ: fh.Type}
			continue
		}
		p, err := readPayload(cc.br, fh.Len)
		if err != nil {
			err = fmt.Errorf("%w to %s: %w", errConnLost, cc.peer, err)
			k.ch <- result{err: err}
			cc.fail(err)
			return
		}
		k.ch <- result{typ: fh.Type, payload: p}
	}
}

func segsLen(segs []fileSeg) int {
	n := 0
	for _, g := range segs {
		n += g.n
	}
	return n
}

// fileWriteError is a failure to write a pages response into its file: the
// request fails with it (it is not the connection's fault, so it is not
// retried), and the connection, whose stream is then out of step, is cut.
type fileWriteError struct{ err error }

func (e *fileWriteError) Error() string { return "write pages into their file: " + e.err.Error() }
func (e *fileWriteError) Unwrap() error { return e.err }

// readToFile reads a pages response's payload into fd at segs: the bytes
// the buffered reader already holds with pwrite, the rest (on a plain TCP
// connection) spliced from the socket through a pipe into the file, so
// they are copied once, in the kernel, instead of into a buffer and out
// again. Under TLS every byte goes through the reader's buffer and pwrite.
func (cc *clientConn) readToFile(fd int, segs []fileSeg, spliced *atomic.Uint64) error {
	for _, g := range segs {
		off, left := g.off, g.n
		for left > 0 {
			if b := cc.br.Buffered(); b > 0 || cc.raw == nil {
				// Through the reader's buffer: the bytes it holds, or
				// under TLS all of them (Peek fills it as needed).
				n := min(left, cc.br.Size())
				if b > 0 {
					n = min(left, b)
				}
				p, err := cc.br.Peek(n)
				if err != nil {
					return fmt.Errorf("%w to %s: %w", errConnLost, cc.peer, unexpectedEOF(err))
				}
				if err := pwriteAll(fd, p, off); err != nil {
					return &fileWriteError{err}
				}
				_, _ = cc.br.Discard(n)
				off += int64(n)
				left -= n
				continue
			}
			n, err := cc.spliceToFile(fd, off, left)
			if spliced != nil {
				spliced.Add(uint64(n))
			}
			if err != nil {
				return err
			}
			off += int64(n)
			left -= n
		}
	}
	return nil
}

func pwriteAll(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(fd, p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// pipeSize is the pipe a spliced response passes through (the default
// limit for unprivileged processes, /proc/sys/fs/pipe-max-size).
const pipeSize = 1 << 20

// spliceToFile moves up to n bytes of the socket into fd at off: socket
// to pipe without a copy (the pipe takes the received buffers' pages),
// pipe to file with one. It returns how many it moved.
// Precondition: the buffered reader holds no bytes (they come first).
func (cc *clientConn) spliceToFile(fd int, off int64, n int) (int, error) {
	if cc.pipe[0] < 0 {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			return 0, &fileWriteError{fmt.Errorf("pipe: %w", err)}
		}
		// A larger pipe moves more per splice; the default (64 KiB)
		// works too.
		_, _ = unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, pipeSize)
		cc.pipe = p
	}
	moved := 0
	var serr error
	err := cc.raw.Read(func(sfd uintptr) bool {
		for moved < n {
			k, err := unix.Splice(int(sfd), nil, cc.pipe[1], nil, min(n-moved, pipeSize), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EAGAIN:
				return false // wait until the socket is readable
			case err == unix.EINTR:
				continue
			case err != nil:
				serr = fmt.Errorf("%w to %s: splice: %w", errConnLost, cc.peer, err)
				return true
			case k == 0:
				serr = fmt.Errorf("%w to %s: %w", errConnLost, cc.peer, io.ErrUnexpectedEOF)
				return true
			}
			// Drain the pipe into the file: it is empty again before
			// the next splice from the socket.
			for d := int64(0); d < k; {
				w, err := unix.Splice(cc.pipe[0], nil, fd, &off, int(k-d), unix.SPLICE_F_MOVE)
				if err == unix.EINTR {
					continue
				}
				if err == nil && w == 0 {
					err = io.ErrShortWrite
				}
				if err != nil {
					serr = &fileWriteError{err}
					return true
				}
				d += w
			}
			moved += int(k)
		}
		return true
	})
	if serr == nil && err != nil {
		serr = fmt.Errorf("%w to %s: %w", errConnLost, cc.peer, err)
	}
	cc.cl.st.spliced.Add(uint64(moved))
	if serr != nil {
		cc.closePipe() // it may hold bytes that never reached the file
	}
	return moved, serr
}

func (cc *clientConn) closePipe() {
	if cc.pipe[0] >= 0 {
		unix.Close(cc.pipe[0])
		unix.Close(cc.pipe[1])
		cc.pipe = [2]int{-1, -1}
	}
}

// roundTrip sends one request and waits for k's answer until ctx ends.
// cancelRemote asks the server to cancel request id (a CancelOp call), so
// an invocation its caller gave up on ends on the node too. Its answer is
// not waited for: the read loop skips it, as the answer of id.
func (cc *clientConn) cancelRemote(id uint64) {
	body, _ := json.Marshal(cancelCall{ID: id})
	cc.mu.Lock()
	if cc.err != nil {
		cc.mu.Unlock()
		return
	}
	cc.nextID++
	cid := cc.nextID
	cc.mu.Unlock()
	cc.wmu.Lock()
	_ = cc.c.SetWriteDeadline(time.Now().Add(time.Second))
	err := writeFrame(cc.c, TypeCallReq, cid, EncodeCall(CancelOp, body))
	cc.wmu.Unlock()
	if err != nil {
		cc.fail(fmt.Errorf("write: %w", err))
	}
}

func (cc *clientConn) roundTrip(ctx context.Context, typ uint8, payload []byte, k *call) result {
	cc.mu.Lock()
	if cc.err != nil {
		err := cc.err
		cc.mu.Unlock()
		return result{err: err}
	}
	cc.nextID++
	id := cc.nextID
	cc.pending[id] = k
	cc.mu.Unlock()

	cc.wmu.Lock()
	dl, _ := ctx.Deadline()
	_ = cc.c.SetWriteDeadline(dl)
	err := writeFrame(cc.c, typ, id, payload)
	cc.wmu.Unlock()
	if err != nil {
		cc.fail(fmt.Errorf("write: %w", err)) // answers k too
	}

	select {
	case r := <-k.ch:
		return r
	case <-ctx.Done():
	}
	cc.mu.Lock()
	_, waiting := cc.pending[id]
	delete(cc.pending, id)
	cc.mu.Unlock()
	timedOut := errors.Is(ctx.Err(), context.DeadlineExceeded)
	if waiting {
		if timedOut {
			// The peer did not answer in time: drop the connection so
			// the next request starts afresh.
			cc.fail(ErrTimeout)
		} else if typ == TypeInvokeReq {
			cc.cancelRemote(id)
		}
		return result{err: ctx.Err()}
	}
	// The reader owns k (it may be filling dst): take its answer if it
	// is there, else cut the connection so it finishes at once.
	select {
	case r := <-k.ch:
		return r
	default:
	}
	cc.fail(ctx.Err())
	<-k.ch
	return result{err: ctx.Err()}
}

// do runs one request against the peer with the client's timeout.
func (c *Client) do(ctx context.Context, op string, typ, want uint8, payload []byte, sink *pageSink, idempotent bool) ([]byte, error) {
	timeout := c.cfg.Timeout
	if typ == TypeForkReq {
		timeout = c.cfg.ForkTimeout
	}
	return c.doTimeout(ctx, op, typ, want, payload, sink, idempotent, timeout)
}

// doTimeout is do with an explicit bound.
func (c *Client) doTimeout(ctx context.Context, op string, typ, want uint8, payload []byte, sink *pageSink, idempotent bool, timeout time.Duration) ([]byte, error) {
	if c.closed.Load() {
		return nil, fmt.Errorf("transport: %s: %w", op, ErrClosed)
	}
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	c.st.requests.Add(1)
	var r result
	for attempt := 0; ; attempt++ {
		sl := c.slots[c.rr.Add(1)%uint64(len(c.slots))]
		cc, err := c.conn(ctx, sl)
		if err != nil {
			r = result{err: err}
		} else {
			k := &call{ch: make(chan result, 1)}
			if sink != nil {
				k.dst, k.segs, k.fd, k.spliced = sink.dst, sink.segs, sink.fd, sink.spliced
			}
			r = cc.roundTrip(ctx, typ, payload, k)
			if r.err == nil && r.typ != want && r.typ != TypeError {
				r.err = fmt.Errorf("%w: answer of type %d to request type %d", ErrMalformed, r.typ, typ)
				cc.fail(r.err)
			}
		}
		if r.err == nil || !idempotent || attempt > 0 || ctx.Err() != nil || !errors.Is(r.err, errConnLost) {
			break
		}
	}
	if r.err == nil && r.typ == TypeError {
		m, err := DecodeError(r.payload)
		if err != nil {
			r.err = err
		} else {
			r.err = &RemoteError{Peer: c.Peer(), Code: m.Code, Msg: m.Msg}
		}
	}
	if r.err != nil {
		c.st.errors.Add(1)
		switch {
		case parent.Err() != nil:
			return nil, fmt.Errorf("transport: %s from %s: %w", op, c.where(), parent.Err())
		case ctx.Err() != nil:
			c.st.timeouts.Add(1)
			return nil, fmt.Errorf("transport: %s from %s: %w after %v", op, c.where(), ErrTimeout, timeout)
		}
		return nil, fmt.Errorf("transport: %s from %s: %w", op, c.where(), r.err)
	}
	c.st.observe(time.Since(start))
	return r.payload, nil
}

// Descriptor fetches a seed's encoded descriptor and working set.
func (c *Client) Descriptor(ctx context.Context, seed string) (desc []byte, ws []Range, err error) {
	if err := checkSeedID(seed); err != nil {
		return nil, nil, fmt.Errorf("transport: descriptor: %w", err)
	}
	p, err := c.do(ctx, "descriptor of "+seed, TypeDescReq, TypeDescResp, EncodeSeed(seed), nil, true)
	if err != nil {
		return nil, nil, err
	}
	r, err := DecodeDescResponse(p)
	if err != nil {
		return nil, nil, fmt.Errorf("transport: descriptor of %s from %s: %w", seed, c.where(), err)
	}
	return r.Desc, r.WorkingSet, nil
}

// ReadPages fills buf with the seed's memory at addr (page aligned, len(buf)
// a multiple of PageSize).
func (c *Client) ReadPages(ctx context.Context, seed string, addr uint64, buf []byte) error {
	rs := [1]Range{{Addr: addr, Len: uint64(len(buf))}}
	return c.ReadRanges(ctx, seed, rs[:], buf)
}

// pageChunk is one wire request of a ReadRanges or ReadRangesTo call.
type pageChunk struct {
	ranges []Range
	dst    []byte    // ReadRanges: the chunk's part of the buffer
	segs   []fileSeg // ReadRangesTo: where its ranges go in the file fd
	fd     int
	// spliced counts the bytes of a ReadRangesTo call spliced into fd.
	spliced *atomic.Uint64
}

// piece is part of one of a read's ranges: ranges[idx], from byte at of
// the read's stream.
type piece struct {
	Range
	idx int
	at  uint64
}

// splitRanges checks ranges and cuts them into the pieces of requests
// within the protocol limits (at most MaxRanges ranges and MaxPagesBytes
// bytes each), in order. total is their byte count.
func splitRanges(ranges []Range) (chunks [][]piece, total uint64, err error) {
	for _, g := range ranges {
		if g.Len == 0 || g.Addr%PageSize != 0 || g.Len%PageSize != 0 || g.Addr+g.Len < g.Addr {
			return nil, 0, fmt.Errorf("%w: [%#x, +%#x) empty, misaligned or wrapping", ErrBadRange, g.Addr, g.Len)
		}
		total += g.Len
		if total < g.Len {
			return nil, 0, fmt.Errorf("%w: ranges overflow", ErrBadRange)
		}
	}
	var cur []piece
	var n, at uint64
	for i, g := range ranges {
		for g.Len > 0 {
			if len(cur) == MaxRanges || n == MaxPagesBytes {
				chunks, cur, n = append(chunks, cur), nil, 0
			}
			p := min(g.Len, MaxPagesBytes-n)
			cur = append(cur, piece{Range{Addr: g.Addr, Len: p}, i, at})
			n, at = n+p, at+p
			g.Addr += p
			g.Len -= p
		}
	}
	if len(cur) > 0 {
		chunks = append(chunks, cur)
	}
	return chunks, total, nil
}

func pieceRanges(ps []piece) []Range {
	rs := make([]Range, len(ps))
	for i, p := range ps {
		rs[i] = p.Range
	}
	return rs
}

// ReadRanges reads many ranges of a seed into consecutive parts of buf
// (len(buf) must equal the ranges' total). Large reads are split into
// requests of at most MaxRanges ranges and MaxPagesBytes bytes, sent
// concurrently over the client's connections.
func (c *Client) ReadRanges(ctx context.Context, seed string, ranges []Range, buf []byte) error {
	if err := checkSeedID(seed); err != nil {
		return fmt.Errorf("transport: read pages: %w", err)
	}
	split, total, err := splitRanges(ranges)
	if err == nil && total != uint64(len(buf)) {
		err = fmt.Errorf("%w: ranges cover %d bytes, buffer has %d", ErrBadRange, total, len(buf))
	}
	if err != nil {
		return fmt.Errorf("transport: read pages of %s: %w", seed, err)
	}
	chunks := make([]pageChunk, len(split))
	for i, ps := range split {
		last := ps[len(ps)-1]
		chunks[i] = pageChunk{ranges: pieceRanges(ps), dst: buf[ps[0].at : last.at+last.Len]}
	}
	return c.readChunks(ctx, seed, chunks)
}

// ReadRangesTo is ReadRanges into a file: range i goes to fd at offs[i].
// On a plain TCP connection the pages go from the socket into the file
// with splice(2), copied once in the kernel instead of through a buffer
// (the node page cache's fill from a peer); spliced is how many bytes did
// (the first bytes of a response the reader had already buffered are
// written from its buffer; under TLS all are). fd stays the caller's; it
// must stay open until ReadRangesTo returns.
func (c *Client) ReadRangesTo(ctx context.Context, seed string, ranges []Range, fd int, offs []int64) (spliced uint64, err error) {
	if err := checkSeedID(seed); err != nil {
		return 0, fmt.Errorf("transport: read pages: %w", err)
	}
	split, _, err := splitRanges(ranges)
	if err == nil && len(offs) != len(ranges) {
		err = fmt.Errorf("%w: %d ranges, %d file offsets", ErrBadRange, len(ranges), len(offs))
	}
	if err != nil {
		return 0, fmt.Errorf("transport: read pages of %s: %w", seed, err)
	}
	var n atomic.Uint64
	chunks := make([]pageChunk, len(split))
	for i, ps := range split {
		segs := make([]fileSeg, len(ps))
		for j, p := range ps {
			segs[j] = fileSeg{off: offs[p.idx] + int64(p.Addr-ranges[p.idx].Addr), n: int(p.Len)}
		}
		chunks[i] = pageChunk{ranges: pieceRanges(ps), segs: segs, fd: fd, spliced: &n}
	}
	err = c.readChunks(ctx, seed, chunks)
	return n.Load(), err
}

// readChunks sends a read's requests, concurrently when there are many,
// and returns the first error.
func (c *Client) readChunks(ctx context.Context, seed string, chunks []pageChunk) error {
	if len(chunks) == 1 {
		return c.readChunk(ctx, seed, &chunks[0])
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	sem := make(chan struct{}, 4*len(c.slots))
	for i := range chunks {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := c.readChunk(ctx, seed, &chunks[i]); err != nil {
				once.Do(func() { first = err; cancel() })
			}
		}()
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		return fmt.Errorf("transport: read pages of %s: %w", seed, ctx.Err())
	}
	return first
}

func (c *Client) readChunk(ctx context.Context, seed string, ch *pageChunk) error {
	req := PagesRequest{Seed: seed, Ranges: ch.ranges}
	c.st.pagesReqs.Add(1)
	sink := &pageSink{dst: ch.dst, segs: ch.segs, fd: ch.fd, spliced: ch.spliced}
	if _, err := c.do(ctx, "read pages of "+seed, TypePagesReq, TypePagesResp, req.Encode(), sink, true); err != nil {
		return err
	}
	c.st.bytes.Add(uint64(len(ch.dst) + segsLen(ch.segs)))
	return nil
}

// Fork asks the peer to fork children of req.Seed on itself. It is bounded
// by Config.ForkTimeout rather than Config.Timeout and never retried. If the
// fork failed after some children were forked, Fork returns them together
// with the error.
func (c *Client) Fork(ctx context.Context, req ForkRequest) ([]ForkedChild, error) {
	if err := checkForkRequest(req); err != nil {
		return nil, fmt.Errorf("transport: fork: %w", err)
	}
	p, err := c.do(ctx, "fork of "+req.Seed, TypeForkReq, TypeForkResp, req.Encode(), nil, false)
	if err != nil {
		return nil, err
	}
	r, err := DecodeForkResponse(p)
	if err != nil {
		return nil, fmt.Errorf("transport: fork of %s from %s: %w", req.Seed, c.addr, err)
	}
	if r.Code != 0 {
		c.st.errors.Add(1)
		return r.Children, fmt.Errorf("transport: fork of %s from %s: %d forked, then: %w",
			req.Seed, c.addr, len(r.Children), &RemoteError{Peer: c.Peer(), Code: r.Code, Msg: r.Msg})
	}
	return r.Children, nil
}

// Lease adds (delta=+1) or drops (delta=-1) a lease on a seed of the peer.
// It is not retried: a lost answer leaves the lease count unknown.
func (c *Client) Lease(ctx context.Context, seed string, delta int) error {
	if err := checkSeedID(seed); err != nil {
		return fmt.Errorf("transport: lease: %w", err)
	}
	if delta == 0 || delta != int(int32(delta)) {
		return fmt.Errorf("transport: lease of %s: bad delta %d", seed, delta)
	}
	r := LeaseRequest{Seed: seed, Delta: int32(delta)}
	_, err := c.do(ctx, "lease of "+seed, TypeLeaseReq, TypeLeaseResp, r.Encode(), nil, false)
	return err
}

// Ping measures a round trip to the peer.
func (c *Client) Ping(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	if _, err := c.do(ctx, "ping", TypePing, TypePong, nil, nil, true); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// SeedSource is one seed of the peer as a page source: it satisfies the
// pager's Source interface.
type SeedSource struct {
	c    *Client
	seed string
}

// SeedSource returns the peer's seed as a page source.
func (c *Client) SeedSource(seed string) *SeedSource {
	return &SeedSource{c: c, seed: seed}
}

// ReadPages fills buf with the seed's memory at addr, bounded by the
// client's timeout.
func (s *SeedSource) ReadPages(addr uint64, buf []byte) error {
	return s.c.ReadPages(context.Background(), s.seed, addr, buf)
}
