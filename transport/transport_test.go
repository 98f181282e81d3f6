package transport

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// ---- fake provider ----

// patternLen is deliberately not a power of two, so every page of a seed
// has distinct contents.
const patternLen = 1<<20 + 4093

var pattern = func() []byte {
	r := mrand.New(mrand.NewPCG(1, 2))
	p := make([]byte, patternLen)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}()

// fillPattern fills buf with the expected contents of seed memory at addr.
func fillPattern(addr uint64, buf []byte) {
	for off := 0; off < len(buf); {
		i := (addr + uint64(off)) % patternLen
		off += copy(buf[off:], pattern[i:])
	}
}

const (
	seedBase = 0x7f0000000000
	seedSize = 64 << 20
)

// fakeProvider serves seed "a/s1" of seedSize bytes at seedBase.
type fakeProvider struct {
	calls  atomic.Int64
	leases atomic.Int64
	// block, if set, stalls every ReadPages until it is closed or the
	// request's context ends.
	block chan struct{}
	peers sync.Map
}

var testDesc = bytes.Repeat([]byte("descriptor!"), 10000)

func (p *fakeProvider) Descriptor(ctx context.Context, peer, seed string) ([]byte, []Range, error) {
	p.calls.Add(1)
	p.peers.Store(peer, true)
	if seed != "a/s1" {
		return nil, nil, fmt.Errorf("seed %q: %w", seed, ErrUnknownSeed)
	}
	return testDesc, []Range{{seedBase, 4 * PageSize}, {seedBase + 1<<20, PageSize}}, nil
}

func (p *fakeProvider) ReadPages(ctx context.Context, peer, seed string, addr uint64, buf []byte) error {
	p.calls.Add(1)
	if p.block != nil {
		select {
		case <-p.block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if seed != "a/s1" {
		return fmt.Errorf("seed %q: %w", seed, ErrUnknownSeed)
	}
	if addr < seedBase || addr+uint64(len(buf)) > seedBase+seedSize {
		return fmt.Errorf("[%#x, +%#x) outside the seed: %w", addr, len(buf), ErrBadRange)
	}
	fillPattern(addr, buf)
	return nil
}

func (p *fakeProvider) Fork(ctx context.Context, peer string, req ForkRequest) ([]ForkedChild, error) {
	p.calls.Add(1)
	if req.Seed != "a/s1" {
		return nil, fmt.Errorf("seed %q: %w", req.Seed, ErrUnknownSeed)
	}
	cs := make([]ForkedChild, req.Count)
	for i := range cs {
		cs[i] = ForkedChild{ID: fmt.Sprintf("%s-c%d-%s", peer, i, req.Payload), PID: 1000 + i, StartUS: int64(i * 10)}
	}
	if string(req.Payload) == "fail-after-2" {
		return cs[:2], errors.New("out of memory")
	}
	return cs, nil
}

func (p *fakeProvider) Lease(ctx context.Context, peer, seed string, delta int) error {
	p.calls.Add(1)
	if seed != "a/s1" {
		return fmt.Errorf("seed %q: %w", seed, ErrUnknownSeed)
	}
	p.leases.Add(int64(delta))
	return nil
}

// ---- helpers ----

var secret = []byte("cluster-secret-for-tests")

func serverCfg() Config { return Config{Node: "node-a", Secret: secret} }
func clientCfg() Config { return Config{Node: "node-b", Secret: secret} }

// startServer serves p on a fresh 127.0.0.1 port (or addr if given).
func startServer(t testing.TB, cfg Config, p Provider, addr string) (*Server, string) {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(cfg, p)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return s, l.Addr().String()
}

func dial(t testing.TB, addr string, cfg Config) *Client {
	t.Helper()
	c, err := Dial(context.Background(), addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func checkPattern(t testing.TB, addr uint64, got []byte) {
	t.Helper()
	want := make([]byte, len(got))
	fillPattern(addr, want)
	if !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		t.Fatalf("contents at %#x differ from the pattern at offset %d", addr, i)
	}
}

// ---- tests ----

func TestNewServerNeedsSecret(t *testing.T) {
	_, err := NewServer(Config{Node: "x"}, &fakeProvider{})
	if err == nil || err.Error() != "refusing to serve peers without a cluster secret; give --secret-file or --insecure" {
		t.Fatalf("got %v", err)
	}
	if _, err := Dial(context.Background(), "127.0.0.1:1", Config{Node: "x"}); err == nil {
		t.Fatal("client without secret dialed")
	}
}

func TestDescriptor(t *testing.T) {
	p := &fakeProvider{}
	_, addr := startServer(t, serverCfg(), p, "")
	c := dial(t, addr, clientCfg())
	if c.Peer() != "node-a" {
		t.Errorf("peer %q", c.Peer())
	}
	desc, ws, err := c.Descriptor(context.Background(), "a/s1")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(desc, testDesc) || len(ws) != 2 || ws[1] != (Range{seedBase + 1<<20, PageSize}) {
		t.Fatalf("descriptor %d bytes, ws %v", len(desc), ws)
	}
	if _, ok := p.peers.Load("node-b"); !ok {
		t.Error("provider did not see the client's name")
	}
	_, _, err = c.Descriptor(context.Background(), "a/nope")
	if !errors.Is(err, ErrUnknownSeed) {
		t.Fatalf("unknown seed: %v", err)
	}
	// The connection survives a refused request.
	if _, _, err := c.Descriptor(context.Background(), "a/s1"); err != nil {
		t.Fatal(err)
	}
}

func TestReadPages(t *testing.T) {
	s, addr := startServer(t, serverCfg(), &fakeProvider{}, "")
	c := dial(t, addr, clientCfg())
	ctx := context.Background()

	one := make([]byte, PageSize)
	if err := c.ReadPages(ctx, "a/s1", seedBase+5*PageSize, one); err != nil {
		t.Fatal(err)
	}
	checkPattern(t, seedBase+5*PageSize, one)

	many := make([]byte, 1024*PageSize)
	if err := c.ReadPages(ctx, "a/s1", seedBase+PageSize, many); err != nil {
		t.Fatal(err)
	}
	checkPattern(t, seedBase+PageSize, many)

	// Bigger than one request: split and sent concurrently.
	huge := make([]byte, 10<<20+3*PageSize)
	if err := c.ReadPages(ctx, "a/s1", seedBase+7*PageSize, huge); err != nil {
		t.Fatal(err)
	}
	checkPattern(t, seedBase+7*PageSize, huge)

	// 300 scattered ranges of 1..8 pages.
	r := mrand.New(mrand.NewPCG(3, 4))
	var rs []Range
	var total uint64
	for i := 0; i < 300; i++ {
		g := Range{Addr: seedBase + uint64(r.IntN(seedSize/PageSize-8))*PageSize, Len: uint64(1+r.IntN(8)) * PageSize}
		rs = append(rs, g)
		total += g.Len
	}
	buf := make([]byte, total)
	if err := c.ReadRanges(ctx, "a/s1", rs, buf); err != nil {
		t.Fatal(err)
	}
	off := uint64(0)
	for _, g := range rs {
		checkPattern(t, g.Addr, buf[off:off+g.Len])
		off += g.Len
	}
	// 3000 ranges: more than one request by count.
	rs = rs[:0]
	for i := 0; i < 3000; i++ {
		rs = append(rs, Range{Addr: seedBase + uint64(i)*2*PageSize, Len: PageSize})
	}
	buf = make([]byte, 3000*PageSize)
	if err := c.ReadRanges(ctx, "a/s1", rs, buf); err != nil {
		t.Fatal(err)
	}
	for i, g := range rs {
		checkPattern(t, g.Addr, buf[i*PageSize:(i+1)*PageSize])
	}

	// Errors: bad range (remote), misaligned (local), length mismatch.
	if err := c.ReadPages(ctx, "a/s1", seedBase+seedSize, one); !errors.Is(err, ErrBadRange) {
		t.Fatalf("outside the seed: %v", err)
	}
	if err := c.ReadPages(ctx, "a/s1", seedBase+1, one); !errors.Is(err, ErrBadRange) {
		t.Fatalf("misaligned: %v", err)
	}
	if err := c.ReadPages(ctx, "a/s9", seedBase, one); !errors.Is(err, ErrUnknownSeed) {
		t.Fatalf("unknown seed: %v", err)
	}
	if err := c.ReadPages(ctx, "a/s1", seedBase, one); err != nil {
		t.Fatalf("after errors: %v", err)
	}
	st := s.Stats()
	if st.Conns != 4 || st.Malformed != 0 || st.Errors != 2 || st.PagesServed == 0 {
		t.Errorf("server stats %+v", st)
	}
	cs := c.Stats()
	if cs.Requests == 0 || cs.BytesFetched != st.BytesServed || cs.Errors != 2 {
		t.Errorf("client stats %+v (server served %d bytes)", cs, st.BytesServed)
	}
	var n uint64
	for _, v := range cs.LatencyUS {
		n += v
	}
	if n != cs.Requests-cs.Errors {
		t.Errorf("histogram holds %d of %d successful requests", n, cs.Requests-cs.Errors)
	}
}

func TestConcurrent(t *testing.T) {
	s, addr := startServer(t, serverCfg(), &fakeProvider{}, "")
	c := dial(t, addr, clientCfg())
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := mrand.New(mrand.NewPCG(uint64(g), 9))
			for i := 0; i < 200; i++ {
				n := 1 + r.IntN(64)
				a := seedBase + uint64(r.IntN(seedSize/PageSize-64))*PageSize
				buf := make([]byte, n*PageSize)
				if err := c.ReadPages(context.Background(), "a/s1", a, buf); err != nil {
					errs <- err
					return
				}
				want := make([]byte, len(buf))
				fillPattern(a, want)
				if !bytes.Equal(buf, want) {
					errs <- fmt.Errorf("goroutine %d request %d: wrong contents", g, i)
					return
				}
				if i%50 == 0 {
					if _, err := c.Ping(context.Background()); err != nil {
						errs <- err
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if st := s.Stats(); st.PagesRequests != 1600 || st.Pings != 32 {
		t.Errorf("server stats %+v", st)
	}
}

func TestForkLeasePing(t *testing.T) {
	p := &fakeProvider{}
	_, addr := startServer(t, serverCfg(), p, "")
	c := dial(t, addr, clientCfg())
	ctx := context.Background()
	cs, err := c.Fork(ctx, ForkRequest{Seed: "a/s1", Count: 3, Eager: true, Payload: []byte("p")})
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 3 || cs[2] != (ForkedChild{ID: "node-b-c2-p", PID: 1002, StartUS: 20}) {
		t.Fatalf("children %+v", cs)
	}
	cs, err = c.Fork(ctx, ForkRequest{Seed: "a/s1", Count: 5, Payload: []byte("fail-after-2")})
	var re *RemoteError
	if len(cs) != 2 || !errors.As(err, &re) || re.Code != CodeInternal || re.Peer != "node-a" {
		t.Fatalf("partial fork: %+v %v", cs, err)
	}
	if _, err := c.Fork(ctx, ForkRequest{Seed: "a/x", Count: 1}); !errors.Is(err, ErrUnknownSeed) {
		t.Fatalf("fork of unknown seed: %v", err)
	}
	if _, err := c.Fork(ctx, ForkRequest{Seed: "a/s1", Count: 0}); err == nil {
		t.Fatal("fork of 0 children sent")
	}
	for _, d := range []int{1, 1, -1} {
		if err := c.Lease(ctx, "a/s1", d); err != nil {
			t.Fatal(err)
		}
	}
	if p.leases.Load() != 1 {
		t.Fatalf("leases %d", p.leases.Load())
	}
	rtt, err := c.Ping(ctx)
	if err != nil || rtt <= 0 || rtt > time.Second {
		t.Fatalf("ping %v %v", rtt, err)
	}
	src := c.SeedSource("a/s1")
	var _ interface{ ReadPages(uint64, []byte) error } = src
	buf := make([]byte, 2*PageSize)
	if err := src.ReadPages(seedBase, buf); err != nil {
		t.Fatal(err)
	}
	checkPattern(t, seedBase, buf)
}

// invokingProvider adds invocations and calls to fakeProvider.
type invokingProvider struct {
	fakeProvider
	busy atomic.Bool
	// ended, if set, receives how each "slow" invocation ended: nil when
	// it ran its time out, else its context's error.
	ended chan error
}

func (p *invokingProvider) Invoke(ctx context.Context, peer string, req InvokeRequest) (InvokeResponse, error) {
	switch {
	case p.busy.Load():
		return InvokeResponse{}, fmt.Errorf("node full: %w", ErrBusy)
	case req.Function == "slow":
		select {
		case <-time.After(req.Timeout):
			if p.ended != nil {
				p.ended <- nil
			}
			return InvokeResponse{Status: 504, Error: "function timed out"}, nil
		case <-ctx.Done():
			if p.ended != nil {
				p.ended <- ctx.Err()
			}
			return InvokeResponse{}, ctx.Err()
		}
	case req.Function != "echo":
		return InvokeResponse{}, fmt.Errorf("no function %q", req.Function)
	}
	return InvokeResponse{Status: 200, Kind: KindFork, Start: time.Millisecond, Child: peer + "-c",
		ContentType: "text/plain", Body: append(append([]byte(req.Seed+"|"), req.Meta...), req.Body...)}, nil
}

func (p *invokingProvider) Call(ctx context.Context, peer, op string, body []byte) ([]byte, error) {
	if op != "echo" {
		return nil, fmt.Errorf("unknown op %q", op)
	}
	return append([]byte(peer+":"), body...), nil
}

func TestInvokeAndCall(t *testing.T) {
	p := &invokingProvider{}
	_, addr := startServer(t, serverCfg(), p, "")
	c := dial(t, addr, clientCfg())
	ctx := context.Background()
	big := bytes.Repeat([]byte("x"), 3<<20) // over the fork payload cap, under the body cap
	r, err := c.Invoke(ctx, InvokeRequest{Function: "echo", Seed: "a/s1", Timeout: time.Second, Meta: []byte("{}"), Body: big})
	if err != nil {
		t.Fatal(err)
	}
	want := append([]byte("a/s1|{}"), big...)
	if r.Status != 200 || r.Kind != KindFork || r.Child != "node-b-c" || r.Start != time.Millisecond || !bytes.Equal(r.Body, want) {
		t.Fatalf("invoke: status %d kind %d child %q start %v body %d bytes", r.Status, r.Kind, r.Child, r.Start, len(r.Body))
	}
	if _, err := c.Invoke(ctx, InvokeRequest{Function: "nope", Timeout: time.Second}); err == nil || !strings.Contains(err.Error(), `no function "nope"`) {
		t.Fatalf("unknown function: %v", err)
	}
	p.busy.Store(true)
	if _, err := c.Invoke(ctx, InvokeRequest{Function: "echo", Timeout: time.Second}); !errors.Is(err, ErrBusy) {
		t.Fatalf("busy node: %v, want ErrBusy", err)
	}
	p.busy.Store(false)
	// A function timeout longer than the client's default request bound
	// is honoured: the node answers 504, the transport does not give up.
	start := time.Now()
	r, err = c.Invoke(ctx, InvokeRequest{Function: "slow", Timeout: 1500 * time.Millisecond})
	if err != nil || r.Status != 504 || time.Since(start) < 1500*time.Millisecond {
		t.Fatalf("slow: %+v %v after %v", r, err, time.Since(start))
	}
	if _, err := c.Invoke(ctx, InvokeRequest{Function: "echo", Body: make([]byte, MaxInvokeBody+1)}); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized body: %v", err)
	}
	out, err := c.Call(ctx, "echo", []byte(`{"a":1}`), 0)
	if err != nil || string(out) != `node-b:{"a":1}` {
		t.Fatalf("call: %q %v", out, err)
	}
	if _, err := c.Call(ctx, "nope", nil, 0); err == nil || !strings.Contains(err.Error(), "unknown op") {
		t.Fatalf("unknown op: %v", err)
	}
	// A provider without functions refuses invocations, keeps serving.
	_, addr2 := startServer(t, serverCfg(), &fakeProvider{}, "")
	c2 := dial(t, addr2, clientCfg())
	if _, err := c2.Invoke(ctx, InvokeRequest{Function: "echo", Timeout: time.Second}); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("plain provider: %v, want ErrUnsupported", err)
	}
	if _, err := c2.Ping(ctx); err != nil {
		t.Fatalf("connection unusable after refusal: %v", err)
	}
}

// TestInvokeCancel: an invocation whose caller gives up ends on the
// server too (a CancelOp call), and only that one: the connection and the
// other invocations on it go on.
func TestInvokeCancel(t *testing.T) {
	p := &invokingProvider{ended: make(chan error, 4)}
	_, addr := startServer(t, serverCfg(), p, "")
	cfg := clientCfg()
	cfg.Conns = 1 // every request on one connection
	c := dial(t, addr, cfg)

	// A neighbour on the same connection that must not be cancelled.
	other := make(chan error, 1)
	go func() {
		r, err := c.Invoke(context.Background(), InvokeRequest{Function: "slow", Timeout: 1500 * time.Millisecond})
		if err == nil && r.Status != 504 {
			err = fmt.Errorf("status %d", r.Status)
		}
		other <- err
	}()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := c.Invoke(ctx, InvokeRequest{Function: "slow", Timeout: time.Minute})
		errc <- err
	}()
	time.Sleep(200 * time.Millisecond)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled invoke returned %v, want context.Canceled", err)
	}
	select {
	case err := <-p.ended:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("the server's invocation ended with %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the server's invocation still runs 5 s after its caller gave up")
	}
	if err := <-other; err != nil {
		t.Fatalf("the other invocation on the connection: %v", err)
	}
	if err := <-p.ended; err != nil {
		t.Fatalf("the other invocation ended with %v, want its own timeout", err)
	}
	if _, err := c.Ping(context.Background()); err != nil {
		t.Fatalf("connection unusable after a cancel: %v", err)
	}
	// The op itself: an id not in flight, and a malformed body, are
	// answered without harm to the connection.
	out, err := c.Call(context.Background(), CancelOp, []byte(`{"id": 99999}`), 0)
	if err != nil || string(out) != `{"cancelled":false}` {
		t.Fatalf("cancel of an unknown id: %q %v", out, err)
	}
	if _, err := c.Call(context.Background(), CancelOp, []byte(`nope`), 0); err == nil || !strings.Contains(err.Error(), "wants {\"id\": N}") {
		t.Fatalf("malformed cancel: %v", err)
	}
	if r, err := c.Invoke(context.Background(), InvokeRequest{Function: "echo", Timeout: time.Second, Body: []byte("x")}); err != nil || r.Status != 200 {
		t.Fatalf("invoke after the cancels: %+v %v", r, err)
	}
}

func TestWrongSecret(t *testing.T) {
	p := &fakeProvider{}
	s, addr := startServer(t, serverCfg(), p, "")

	// The server refuses a client with another secret.
	bad := clientCfg()
	bad.Secret = []byte("other secret")
	_, err := Dial(context.Background(), addr, bad)
	if !errors.Is(err, ErrAuth) {
		t.Fatalf("dial with wrong secret: %v", err)
	}
	// So does it an insecure client.
	_, err = Dial(context.Background(), addr, Config{Node: "node-b", Insecure: true})
	if !errors.Is(err, ErrAuth) {
		t.Fatalf("insecure dial to secure server: %v", err)
	}
	if st := s.Stats(); st.AuthFailures < 2 {
		t.Errorf("auth failures %d", st.AuthFailures)
	}

	// A peer that fails authentication gets nothing, even if it pipelines
	// requests behind its Hello.
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	br := bufio.NewReader(conn)
	f, err := ReadFrame(br, 0)
	if err != nil || f.Type != TypeChallenge {
		t.Fatalf("challenge: %v %+v", err, f)
	}
	h := Hello{Version: ProtocolVersion, Name: "mallory"} // zero MAC
	var out []byte
	out = AppendFrame(out, TypeHello, 0, h.Encode())
	out = AppendFrame(out, TypeDescReq, 1, EncodeSeed("a/s1"))
	pr := PagesRequest{Seed: "a/s1", Ranges: []Range{{seedBase, PageSize}}}
	out = AppendFrame(out, TypePagesReq, 2, pr.Encode())
	conn.Write(out)
	f, err = ReadFrame(br, 0)
	if err != nil || f.Type != TypeError {
		t.Fatalf("want error frame, got %v %+v", err, f)
	}
	m, _ := DecodeError(f.Payload)
	if m.Code != CodeAuth || m.Msg != "authentication failed" {
		t.Fatalf("error %+v", m)
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Fatalf("after auth failure: %d more bytes, %v", len(rest), err)
	}
	if p.calls.Load() != 0 {
		t.Fatalf("provider called %d times for unauthenticated peers", p.calls.Load())
	}

	// The client refuses a server that does not know its secret: a
	// server with another secret that skips checking the client...
	rogue := rogueServer(t, []byte("other secret"))
	if _, err := Dial(context.Background(), rogue, clientCfg()); !errors.Is(err, ErrAuth) {
		t.Fatalf("dial to server with wrong secret: %v", err)
	}
	// ...and an insecure one.
	_, insecure := startServer(t, Config{Node: "node-x", Insecure: true}, p, "")
	if _, err := Dial(context.Background(), insecure, clientCfg()); !errors.Is(err, ErrAuth) {
		t.Fatalf("dial to insecure server: %v", err)
	}
	if p.calls.Load() != 0 {
		t.Fatal("provider called")
	}
}

// rogueServer accepts any client and proves a different secret.
func rogueServer(t *testing.T, sec []byte) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(3 * time.Second))
				br := bufio.NewReader(c)
				var sn [NonceSize]byte
				ch := Challenge{Version: ProtocolVersion, Nonce: sn}
				writeFrame(c, TypeChallenge, 0, ch.Encode())
				p, err := readHandshakeFrame(br, TypeHello)
				if err != nil {
					return
				}
				h, _ := DecodeHello(p)
				a := Auth{Name: "rogue", MAC: authMAC(sec, serverLabel, &h.Nonce, "rogue")}
				writeFrame(c, TypeAuth, 0, a.Encode())
				io.Copy(io.Discard, br)
			}()
		}
	}()
	return l.Addr().String()
}

func TestInsecure(t *testing.T) {
	_, addr := startServer(t, Config{Node: "open-a", Insecure: true}, &fakeProvider{}, "")
	c := dial(t, addr, Config{Node: "open-b", Insecure: true, Conns: 2})
	if c.Peer() != "open-a" {
		t.Fatalf("peer %q", c.Peer())
	}
	buf := make([]byte, PageSize)
	if err := c.ReadPages(context.Background(), "a/s1", seedBase, buf); err != nil {
		t.Fatal(err)
	}
	checkPattern(t, seedBase, buf)
}

// selfSigned returns a certificate for 127.0.0.1 and a pool trusting it.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "mitosis test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}, pool
}

func TestTLS(t *testing.T) {
	cert, pool := selfSigned(t)
	scfg := serverCfg()
	scfg.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	_, addr := startServer(t, scfg, &fakeProvider{}, "")
	ccfg := clientCfg()
	ccfg.TLS = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
	c := dial(t, addr, ccfg)
	buf := make([]byte, 256*PageSize)
	if err := c.ReadPages(context.Background(), "a/s1", seedBase, buf); err != nil {
		t.Fatal(err)
	}
	checkPattern(t, seedBase, buf)
	if desc, _, err := c.Descriptor(context.Background(), "a/s1"); err != nil || !bytes.Equal(desc, testDesc) {
		t.Fatalf("descriptor over TLS: %v", err)
	}
	// A plaintext client, or one not trusting the certificate, fails.
	if _, err := Dial(context.Background(), addr, clientCfg()); err == nil {
		t.Fatal("plaintext client talked to TLS server")
	}
	untrusting := clientCfg()
	untrusting.TLS = &tls.Config{}
	if _, err := Dial(context.Background(), addr, untrusting); err == nil {
		t.Fatal("client accepted an untrusted certificate")
	}
	// TLS does not replace the secret.
	wrong := ccfg
	wrong.Secret = []byte("nope")
	if _, err := Dial(context.Background(), addr, wrong); !errors.Is(err, ErrAuth) {
		t.Fatalf("TLS with wrong secret: %v", err)
	}
}

// rawAuthed opens an authenticated raw connection to addr.
func rawAuthed(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(conn)
	cfg := clientCfg()
	if _, err := clientHandshake(conn, br, &cfg); err != nil {
		t.Fatal(err)
	}
	return conn, br
}

// expectConnError reads frames until a connection-level Error frame and
// then EOF.
func expectConnError(t *testing.T, br *bufio.Reader, code uint16) {
	t.Helper()
	for {
		f, err := ReadFrame(br, 0)
		if err != nil {
			t.Fatalf("want error frame, got %v", err)
		}
		if f.Type == TypeError && f.ID == 0 {
			m, err := DecodeError(f.Payload)
			if err != nil || m.Code != code {
				t.Fatalf("error frame %+v %v, want code %d", m, err, code)
			}
			break
		}
	}
	if _, err := ReadFrame(br, 0); err != io.EOF {
		t.Fatalf("connection not closed after error: %v", err)
	}
}

func TestGarbage(t *testing.T) {
	s, addr := startServer(t, serverCfg(), &fakeProvider{}, "")
	good := dial(t, addr, clientCfg())
	buf := make([]byte, PageSize)

	// Before authentication.
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	br := bufio.NewReader(conn)
	if f, err := ReadFrame(br, 0); err != nil || f.Type != TypeChallenge {
		t.Fatalf("challenge: %+v %v", f, err)
	}
	expectConnError(t, br, CodeMalformed)

	// After authentication: random garbage, bad payloads, a response type,
	// a huge claimed length.
	r := mrand.New(mrand.NewPCG(5, 6))
	junk := make([]byte, 4096)
	for i := range junk {
		junk[i] = byte(r.Uint32())
	}
	junk[4] = 200 // unknown type
	truncated := AppendFrame(nil, TypePagesReq, 1, []byte{3, 0, 'a', '/'})
	var huge [HeaderSize]byte
	putHeader(huge[:], TypeForkReq, 1, 0xfffffff0-minFrameLength)
	for name, tc := range map[string]struct {
		in   []byte
		code uint16
	}{
		"random":    {junk, CodeMalformed},
		"truncated": {truncated, CodeMalformed},
		"response":  {AppendFrame(nil, TypePong, 1, nil), CodeMalformed},
		"hello":     {AppendFrame(nil, TypeHello, 1, nil), CodeMalformed},
		"id0":       {AppendFrame(nil, TypePing, 0, nil), CodeMalformed},
		"huge":      {huge[:], CodeTooLarge},
	} {
		t.Run(name, func(t *testing.T) {
			conn, br := rawAuthed(t, addr)
			before := s.Stats().Malformed
			n := allocated(func() {
				conn.Write(tc.in)
				expectConnError(t, br, tc.code)
			})
			if n > 4<<20 {
				t.Errorf("server allocated %d bytes for %d bytes of garbage", n, len(tc.in))
			}
			if s.Stats().Malformed != before+1 {
				t.Errorf("malformed count %d -> %d", before, s.Stats().Malformed)
			}
			if err := good.ReadPages(context.Background(), "a/s1", seedBase, buf); err != nil {
				t.Fatalf("good client after garbage: %v", err)
			}
		})
	}

	// Over-limit requests are refused but keep the connection.
	conn2, br2 := rawAuthed(t, addr)
	pr := PagesRequest{Seed: "a/s1"}
	for i := 0; i <= MaxRanges; i++ {
		pr.Ranges = append(pr.Ranges, Range{seedBase + uint64(i)*PageSize, PageSize})
	}
	var e encoder
	e.str16("a/s1")
	e.u32(1 << 30)
	var out []byte
	out = AppendFrame(out, TypePagesReq, 7, pr.Encode())
	out = AppendFrame(out, TypePagesReq, 8, e.b)
	out = AppendFrame(out, TypePing, 9, nil)
	conn2.Write(out)
	for _, want := range []struct {
		typ uint8
		id  uint64
	}{{TypeError, 7}, {TypeError, 8}, {TypePong, 9}} {
		f, err := ReadFrame(br2, 0)
		if err != nil || f.Type != want.typ || f.ID != want.id {
			t.Fatalf("got %+v %v, want type %d id %d", f, err, want.typ, want.id)
		}
		if f.Type == TypeError {
			if m, _ := DecodeError(f.Payload); m.Code != CodeTooLarge {
				t.Fatalf("error %+v", m)
			}
		}
	}
}

// TestClientRejectsHugeResponse: a server claiming a 20 MiB answer and
// then dying costs the client no 20 MiB buffer, and the call fails.
func TestClientRejectsHugeResponse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				cfg := serverCfg()
				if _, err := serverHandshake(c, br, &cfg); err != nil {
					return
				}
				f, err := ReadFrame(br, 0)
				if err != nil {
					return
				}
				var h [HeaderSize]byte
				putHeader(h[:], TypeDescResp, f.ID, int(maxFrameLength(TypeDescResp)-minFrameLength))
				c.Write(h[:])
				c.Write(make([]byte, 1000))
			}()
		}
	}()
	c := dial(t, l.Addr().String(), Config{Node: "b", Secret: secret, Conns: 1})
	n := allocated(func() {
		if _, _, err := c.Descriptor(context.Background(), "a/s1"); err == nil {
			t.Error("truncated descriptor accepted")
		}
	})
	if n > 4<<20 {
		t.Errorf("client allocated %d bytes", n)
	}
}

func TestTimeoutStalledServer(t *testing.T) {
	p := &fakeProvider{block: make(chan struct{})}
	defer close(p.block)
	_, addr := startServer(t, serverCfg(), p, "")
	c := dial(t, addr, clientCfg())
	buf := make([]byte, PageSize)
	start := time.Now()
	err := c.ReadPages(context.Background(), "a/s1", seedBase, buf)
	d := time.Since(start)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("stalled read: %v", err)
	}
	if d < DefaultTimeout-100*time.Millisecond || d > DefaultTimeout+time.Second {
		t.Fatalf("stalled read failed after %v, want ~%v", d, DefaultTimeout)
	}
	if c.Stats().Timeouts != 1 {
		t.Errorf("timeouts %d", c.Stats().Timeouts)
	}
	// A caller's own context still wins.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start = time.Now()
	if err := c.ReadPages(ctx, "a/s1", seedBase, buf); !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > time.Second {
		t.Fatalf("ctx deadline: %v after %v", err, time.Since(start))
	}
}

func TestTimeoutSilentListener(t *testing.T) {
	// Accepts but never speaks: dialing fails in bounded time.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()
	start := time.Now()
	_, err = Dial(context.Background(), l.Addr().String(), clientCfg())
	if err == nil || time.Since(start) > 3*time.Second {
		t.Fatalf("dial to silent server: %v after %v", err, time.Since(start))
	}
}

func TestServerKilledMidRequest(t *testing.T) {
	p := &fakeProvider{block: make(chan struct{})}
	s, addr := startServer(t, serverCfg(), p, "")
	c := dial(t, addr, clientCfg())
	go func() {
		time.Sleep(100 * time.Millisecond)
		s.Close()
	}()
	start := time.Now()
	err := c.ReadPages(context.Background(), "a/s1", seedBase, make([]byte, PageSize))
	d := time.Since(start)
	if err == nil || errors.Is(err, ErrTimeout) || d > 700*time.Millisecond {
		t.Fatalf("read from killed server: %v after %v", err, d)
	}
	t.Logf("failed after %v: %v", d, err)
}

func TestRestartedServer(t *testing.T) {
	p := &fakeProvider{}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	s1, _ := NewServer(serverCfg(), p)
	done := make(chan error, 1)
	go func() { done <- s1.Serve(l) }()

	c := dial(t, addr, Config{Node: "node-b", Secret: secret, Conns: 2})
	buf := make([]byte, 4*PageSize)
	if err := c.ReadPages(context.Background(), "a/s1", seedBase, buf); err != nil {
		t.Fatal(err)
	}
	s1.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Down: requests fail quickly.
	start := time.Now()
	if err := c.ReadPages(context.Background(), "a/s1", seedBase, buf); err == nil || time.Since(start) > 2*time.Second {
		t.Fatalf("read while down: %v after %v", err, time.Since(start))
	}
	// Up again on the same port.
	startServer(t, serverCfg(), p, addr)
	for i := 0; i < 10; i++ {
		clear(buf)
		if err := c.ReadPages(context.Background(), "a/s1", seedBase+PageSize, buf); err != nil {
			t.Fatalf("read %d after restart: %v", i, err)
		}
		checkPattern(t, seedBase+PageSize, buf)
	}
	if c.Stats().Redials < 2 {
		t.Errorf("redials %d", c.Stats().Redials)
	}
}

func TestClientClose(t *testing.T) {
	_, addr := startServer(t, serverCfg(), &fakeProvider{}, "")
	c := dial(t, addr, clientCfg())
	c.Close()
	if _, err := c.Ping(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("ping after close: %v", err)
	}
}

// ---- benchmarks ----

func benchClient(b *testing.B, conns int) *Client {
	_, addr := startServer(b, serverCfg(), &fakeProvider{}, "")
	return dial(b, addr, Config{Node: "bench", Secret: secret, Conns: conns})
}

func BenchmarkReadPages4K(b *testing.B) {
	for _, conns := range []int{1, 4} {
		b.Run(fmt.Sprintf("conns=%d", conns), func(b *testing.B) {
			c := benchClient(b, conns)
			buf := make([]byte, PageSize)
			ctx := context.Background()
			b.SetBytes(PageSize)
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				if err := c.ReadPages(ctx, "a/s1", seedBase+uint64(i%4096)*PageSize, buf); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "µs/op")
		})
		b.Run(fmt.Sprintf("conns=%d/parallel", conns), func(b *testing.B) {
			c := benchClient(b, conns)
			b.SetBytes(PageSize)
			b.SetParallelism(4)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, PageSize)
				for i := 0; pb.Next(); i++ {
					if err := c.ReadPages(context.Background(), "a/s1", seedBase+uint64(i%4096)*PageSize, buf); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

func BenchmarkReadPages1M(b *testing.B) {
	for _, conns := range []int{1, 4} {
		b.Run(fmt.Sprintf("conns=%d", conns), func(b *testing.B) {
			c := benchClient(b, conns)
			buf := make([]byte, 1<<20)
			b.SetBytes(1 << 20)
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				if err := c.ReadPages(context.Background(), "a/s1", seedBase+uint64(i%32)<<20, buf); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("conns=%d/parallel", conns), func(b *testing.B) {
			c := benchClient(b, conns)
			b.SetBytes(1 << 20)
			b.SetParallelism(2)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, 1<<20)
				for i := 0; pb.Next(); i++ {
					if err := c.ReadPages(context.Background(), "a/s1", seedBase+uint64(i%32)<<20, buf); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
