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

// writeTimeout bounds a single response write; a peer that stops reading
// for that long loses its connection.
const writeTimeout = 10 * time.Second

// Server answers peers' requests from a Provider.
type Server struct {
	cfg Config
	p   Provider

	ctx    context.Context
	cancel context.CancelFunc

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	wg        sync.WaitGroup

	st serverCounters
}

type serverCounters struct {
	conns, active, authFail, malformed, errors atomic.Uint64
	byType                                     [32]atomic.Uint64
	pages, bytes, fileBytes                    atomic.Uint64
}

// ServerStats are a server's counters.
type ServerStats struct {
	Conns        uint64 // connections accepted
	ActiveConns  uint64 // connections open now
	AuthFailures uint64 // handshakes that failed authentication
	Malformed    uint64 // connections closed for a malformed frame
	Errors       uint64 // requests answered with an Error frame

	DescRequests  uint64
	PagesRequests uint64
	ForkRequests  uint64
	LeaseRequests uint64
	Pings         uint64

	PagesServed uint64
	BytesServed uint64
	// BytesSentFile counts page bytes sent with sendfile(2) from a
	// FileProvider's file (part of BytesServed).
	BytesSentFile uint64
}

// NewServer returns a server answering from p. cfg.Secret must be set
// unless cfg.Insecure.
func NewServer(cfg Config, p Provider) (*Server, error) {
	cfg, err := cfg.normalize()
	if err != nil {
		return nil, err
	}
	if p == nil {
		return nil, errors.New("transport: nil provider")
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		cfg:       cfg,
		p:         p,
		ctx:       ctx,
		cancel:    cancel,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[net.Conn]struct{}),
	}, nil
}

// Stats returns a snapshot of the server's counters.
func (s *Server) Stats() ServerStats {
	return ServerStats{
		Conns:         s.st.conns.Load(),
		ActiveConns:   s.st.active.Load(),
		AuthFailures:  s.st.authFail.Load(),
		Malformed:     s.st.malformed.Load(),
		Errors:        s.st.errors.Load(),
		DescRequests:  s.st.byType[TypeDescReq].Load(),
		PagesRequests: s.st.byType[TypePagesReq].Load(),
		ForkRequests:  s.st.byType[TypeForkReq].Load(),
		LeaseRequests: s.st.byType[TypeLeaseReq].Load(),
		Pings:         s.st.byType[TypePing].Load(),
		PagesServed:   s.st.pages.Load(),
		BytesServed:   s.st.bytes.Load(),
		BytesSentFile: s.st.fileBytes.Load(),
	}
}

// Serve accepts connections on l until Close is called (then it returns
// nil) or l fails. Serve may be called for several listeners.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return fmt.Errorf("transport: serve: %w", ErrClosed)
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("transport: accept on %s: %w", l.Addr(), err)
		}
		backoff = 0
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return nil
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		s.st.conns.Add(1)
		go s.handle(c)
	}
}

// Close stops every listener, closes every connection and waits for their
// handlers to return.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	var first error
	for l := range s.listeners {
		if err := l.Close(); err != nil && first == nil {
			first = fmt.Errorf("transport: close listener: %w", err)
		}
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return first
}

// serverConn is one authenticated connection.
type serverConn struct {
	s    *Server
	c    net.Conn // possibly a *tls.Conn
	br   *bufio.Reader
	peer string

	// raw is the socket of a plain TCP connection (nil under TLS): pages
	// from a FileProvider are sent from it with sendfile.
	raw syscall.RawConn

	wmu    sync.Mutex
	werr   error
	ctx    context.Context
	cancel context.CancelFunc

	// cmu guards cancels: the cancel functions of the requests in flight
	// that a CancelOp call may cancel, by request id.
	cmu     sync.Mutex
	cancels map[uint64]context.CancelFunc
}

// cancelable returns the context of request id, which a CancelOp call
// naming id cancels, and what forgets it once the request is answered.
// Precondition: called from the read loop before the next frame is read,
// so a cancel that follows the request on the wire finds it.
func (sc *serverConn) cancelable(id uint64) (context.Context, func()) {
	ctx, cancel := context.WithCancel(sc.ctx)
	sc.cmu.Lock()
	if sc.cancels == nil {
		sc.cancels = make(map[uint64]context.CancelFunc)
	}
	sc.cancels[id] = cancel
	sc.cmu.Unlock()
	return ctx, func() {
		sc.cmu.Lock()
		delete(sc.cancels, id)
		sc.cmu.Unlock()
		cancel()
	}
}

// cancelRequest cancels request id if it is in flight on this connection
// and says whether it was.
func (sc *serverConn) cancelRequest(id uint64) bool {
	sc.cmu.Lock()
	cancel, ok := sc.cancels[id]
	sc.cmu.Unlock()
	if ok {
		cancel()
	}
	return ok
}

func (s *Server) handle(raw net.Conn) {
	s.st.active.Add(1)
	defer func() {
		raw.Close()
		s.mu.Lock()
		delete(s.conns, raw)
		s.mu.Unlock()
		s.st.active.Add(^uint64(0))
		s.wg.Done()
	}()

	c := raw
	_ = c.SetDeadline(time.Now().Add(HandshakeTimeout))
	if s.cfg.TLS != nil {
		tc := tls.Server(raw, s.cfg.TLS)
		hctx, cancel := context.WithTimeout(s.ctx, HandshakeTimeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			return
		}
		c = tc
	}
	br := bufio.NewReaderSize(c, 64<<10)
	peer, err := serverHandshake(c, br, &s.cfg)
	if err != nil {
		if errors.Is(err, ErrAuth) {
			s.st.authFail.Add(1)
		}
		return
	}
	_ = c.SetDeadline(time.Time{})

	ctx, cancel := context.WithCancel(s.ctx)
	sc := &serverConn{s: s, c: c, br: br, peer: peer, ctx: ctx, cancel: cancel}
	if tc, ok := c.(*net.TCPConn); ok {
		if rc, err := tc.SyscallConn(); err == nil {
			sc.raw = rc
		}
	}
	sc.serve()
}

// serve reads requests until the connection fails, dispatching each to a
// goroutine (at most MaxInFlight at a time).
func (sc *serverConn) serve() {
	var hwg sync.WaitGroup
	defer func() {
		sc.cancel()
		sc.c.Close()
		hwg.Wait()
	}()
	sem := make(chan struct{}, MaxInFlight)
	for {
		f, err := ReadFrame(sc.br, maxRequestLength)
		if err != nil {
			if errors.Is(err, ErrMalformed) || errors.Is(err, ErrTooLarge) {
				sc.malformed(err)
			}
			return
		}
		var h func() error
		switch f.Type {
		case TypeDescReq:
			seed, err := DecodeSeed(f.Payload)
			if err != nil {
				sc.malformed(err)
				return
			}
			h = func() error { return sc.descriptor(f.ID, seed) }
		case TypePagesReq:
			req, err := DecodePagesRequest(f.Payload)
			if err != nil {
				if errors.Is(err, ErrMalformed) {
					sc.malformed(err)
					return
				}
				// Well-formed but over the limits or misaligned:
				// refuse this request, keep the connection.
				sc.s.st.byType[TypePagesReq].Add(1)
				sc.reply(f.ID, err)
				continue
			}
			h = func() error { return sc.pages(f.ID, &req) }
		case TypeForkReq:
			req, err := DecodeForkRequest(f.Payload)
			if err != nil {
				sc.malformed(err)
				return
			}
			h = func() error { return sc.fork(f.ID, req) }
		case TypeLeaseReq:
			req, err := DecodeLeaseRequest(f.Payload)
			if err != nil {
				sc.malformed(err)
				return
			}
			h = func() error {
				err := sc.s.p.Lease(sc.ctx, sc.peer, req.Seed, int(req.Delta))
				if err != nil {
					return err
				}
				return sc.write(TypeLeaseResp, f.ID, nil)
			}
		case TypeInvokeReq:
			req, err := DecodeInvokeRequest(f.Payload)
			if err != nil {
				sc.malformed(err)
				return
			}
			if f.ID == 0 {
				break // refused below
			}
			ctx, done := sc.cancelable(f.ID)
			h = func() error {
				defer done()
				return sc.invoke(ctx, f.ID, req)
			}
		case TypeCallReq:
			op, body, err := DecodeCall(f.Payload)
			if err != nil {
				sc.malformed(err)
				return
			}
			if op == CancelOp {
				// Cancelled here, not in a handler: a cancel must not
				// wait for a free slot behind the request it cancels.
				var c cancelCall
				if err := json.Unmarshal(body, &c); err != nil || c.ID == 0 {
					h = func() error {
						return fmt.Errorf("%w: %s wants {\"id\": N} with N > 0, got %q", ErrMalformed, CancelOp, body)
					}
					break
				}
				ans, _ := json.Marshal(cancelCall{Cancelled: sc.cancelRequest(c.ID)})
				h = func() error { return sc.answerCall(f.ID, ans) }
				break
			}
			h = func() error { return sc.call(f.ID, op, body) }
		case TypePing:
			if len(f.Payload) != 0 {
				sc.malformed(fmt.Errorf("%w: ping with %d byte payload", ErrMalformed, len(f.Payload)))
				return
			}
			h = func() error { return sc.write(TypePong, f.ID, nil) }
		default:
			sc.malformed(fmt.Errorf("%w: frame type %d is not a request", ErrMalformed, f.Type))
			return
		}
		if f.ID == 0 {
			sc.malformed(fmt.Errorf("%w: request id 0", ErrMalformed))
			return
		}
		sc.s.st.byType[f.Type].Add(1)
		select {
		case sem <- struct{}{}:
		case <-sc.ctx.Done():
			return
		}
		hwg.Add(1)
		go func() {
			defer func() { <-sem; hwg.Done() }()
			if err := h(); err != nil {
				sc.reply(f.ID, err)
			}
		}()
	}
}

// malformed answers a broken frame with a connection-level Error frame;
// the caller then closes the connection.
func (sc *serverConn) malformed(err error) {
	sc.s.st.malformed.Add(1)
	code := CodeMalformed
	if errors.Is(err, ErrTooLarge) {
		code = CodeTooLarge
	}
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	if sc.werr == nil {
		_ = sc.c.SetWriteDeadline(time.Now().Add(time.Second))
		_ = writeError(sc.c, 0, code, err.Error())
	}
}

// reply sends an Error frame for a failed request (err == nil: nothing).
func (sc *serverConn) reply(id uint64, err error) {
	if err == nil || sc.ctx.Err() != nil {
		return
	}
	sc.s.st.errors.Add(1)
	m := ErrorMsg{Code: errCode(err), Msg: err.Error()}
	_ = sc.write(TypeError, id, m.Encode())
}

// write sends one frame; a failed write closes the connection. The error
// it returns is only for the caller to stop; it is never sent.
func (sc *serverConn) write(typ uint8, id uint64, payload []byte) error {
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	if sc.werr != nil {
		return nil
	}
	_ = sc.c.SetWriteDeadline(time.Now().Add(writeTimeout))
	if err := writeFrame(sc.c, typ, id, payload); err != nil {
		sc.werr = err
		sc.cancel()
		sc.c.Close()
	}
	return nil
}

// sendFile sends a pages response whose payload is ranges of fd at offs,
// with sendfile(2). Like write, a failed send closes the connection.
func (sc *serverConn) sendFile(id uint64, total uint64, fd int, ranges []Range, offs []int64) {
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	if sc.werr != nil {
		return
	}
	_ = sc.c.SetWriteDeadline(time.Now().Add(writeTimeout))
	var h [HeaderSize]byte
	putHeader(h[:], TypePagesResp, id, int(total))
	_, err := sc.c.Write(h[:])
	for i := 0; err == nil && i < len(ranges); i++ {
		off, left := offs[i], int(ranges[i].Len)
		var serr error
		err = sc.raw.Write(func(sfd uintptr) bool {
			for left > 0 {
				n, err := unix.Sendfile(int(sfd), fd, &off, left)
				switch {
				case err == unix.EAGAIN:
					return false // wait until the socket is writable
				case err == unix.EINTR:
					continue
				case err != nil:
					serr = fmt.Errorf("sendfile: %w", err)
					return true
				case n == 0:
					serr = fmt.Errorf("sendfile: %w", io.ErrUnexpectedEOF) // the file is shorter
					return true
				}
				left -= n
			}
			return true
		})
		if err == nil {
			err = serr
		}
	}
	if err != nil {
		sc.werr = err
		sc.cancel()
		sc.c.Close()
	}
}

func (sc *serverConn) descriptor(id uint64, seed string) error {
	desc, ws, err := sc.s.p.Descriptor(sc.ctx, sc.peer, seed)
	if err != nil {
		return fmt.Errorf("descriptor of %s: %w", seed, err)
	}
	if len(desc) > MaxDescriptor {
		return fmt.Errorf("descriptor of %s: %w: %d bytes > %d", seed, ErrTooLarge, len(desc), MaxDescriptor)
	}
	if len(ws) > MaxWorkingSet {
		ws = ws[:MaxWorkingSet] // a hint; a prefix is still useful
	}
	r := DescResponse{Desc: desc, WorkingSet: ws}
	return sc.write(TypeDescResp, id, r.Encode())
}

// Page buffers: requests up to 64 KiB and up to MaxPagesBytes.
var (
	smallBufs = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}
	largeBufs = sync.Pool{New: func() any { b := make([]byte, MaxPagesBytes); return &b }}
)

func (sc *serverConn) pages(id uint64, req *PagesRequest) error {
	total := req.Total()
	if fp, ok := sc.s.p.(FileProvider); ok && sc.raw != nil {
		fd, offs, release, ok, err := fp.PageFile(sc.ctx, sc.peer, req.Seed, req.Ranges)
		if err != nil {
			return fmt.Errorf("read %s: %w", req.Seed, err)
		}
		if ok {
			defer release()
			if len(offs) != len(req.Ranges) {
				return fmt.Errorf("read %s: page file gave %d offsets for %d ranges", req.Seed, len(offs), len(req.Ranges))
			}
			sc.s.st.pages.Add(total / PageSize)
			sc.s.st.bytes.Add(total)
			sc.s.st.fileBytes.Add(total)
			sc.sendFile(id, total, fd, req.Ranges, offs)
			return nil
		}
	}
	pool := &smallBufs
	if total > 64<<10 {
		pool = &largeBufs
	}
	bp := pool.Get().(*[]byte)
	defer pool.Put(bp)
	buf := (*bp)[:total]
	off := uint64(0)
	for _, g := range req.Ranges {
		if err := sc.s.p.ReadPages(sc.ctx, sc.peer, req.Seed, g.Addr, buf[off:off+g.Len]); err != nil {
			return fmt.Errorf("read %s [%#x, +%#x): %w", req.Seed, g.Addr, g.Len, err)
		}
		off += g.Len
	}
	// Counted before the answer goes out, so a client that has its pages
	// never sees stats that do not include them.
	sc.s.st.pages.Add(total / PageSize)
	sc.s.st.bytes.Add(total)
	if err := sc.write(TypePagesResp, id, buf); err != nil {
		return err
	}
	return nil
}

func (sc *serverConn) fork(id uint64, req ForkRequest) error {
	cs, err := sc.s.p.Fork(sc.ctx, sc.peer, req)
	if err != nil {
		err = fmt.Errorf("fork %s: %w", req.Seed, err)
	}
	if len(cs) == 0 {
		if err == nil {
			return sc.write(TypeForkResp, id, (&ForkResponse{}).Encode())
		}
		return err
	}
	if cerr := checkForkResponse(cs); cerr != nil {
		return fmt.Errorf("fork %s: %w", req.Seed, cerr)
	}
	r := ForkResponse{Children: cs}
	if err != nil {
		// Partial success: report the children with the error.
		sc.s.st.errors.Add(1)
		r.Code, r.Msg = errCode(err), err.Error()
	}
	return sc.write(TypeForkResp, id, r.Encode())
}
