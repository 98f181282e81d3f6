package transport

// Wire protocol.
//
// A connection is a byte stream of frames:
//
//	u32 length (little endian; counts everything after itself)
//	u8  type
//	u64 request id (little endian)
//	payload (length-9 bytes)
//
// Integers are little endian. A string or byte blob is a length prefix
// (u16 for names, seed ids and messages; u32 for descriptors and fork
// payloads) followed by its bytes; every length has a cap and is checked
// against the cap and against the bytes that remain before anything is
// allocated.
//
// Handshake (request id 0):
//
//	server -> client  Challenge  u16 version | [32]byte server nonce
//	client -> server  Hello      u16 version | name | [32]byte mac | [32]byte client nonce
//	                  mac = HMAC-SHA256(secret, "mitosis-auth-v1" || server nonce || client name)
//	server -> client  Auth       name | [32]byte mac
//	                  mac = HMAC-SHA256(secret, "mitosis-auth-v1-server" || client nonce || server name)
//
// Requests and their responses (the response carries the request's id; any
// request may instead be answered by an Error frame with the same id):
//
//	DescReq   seed                           DescResp  u32 len | desc | u32 n | n × (u64 addr, u64 len)
//	PagesReq  seed | u32 n | n × (addr, len)  PagesResp the bytes of every range, concatenated
//	ForkReq   seed | u32 count | u8 eager | u32 len | payload
//	                                         ForkResp  u32 n | n × (id | i64 pid | i64 start µs) | u16 code | message
//	LeaseReq  seed | i32 delta               LeaseResp (empty)
//	Ping      (empty)                        Pong      (empty)
//	Error     u16 code | message
//
// A fork that fails after forking some children answers with a ForkResp
// listing them and a non-zero code and message (a fork that forked nothing
// answers with an Error frame).
//
// An Error frame with request id 0 concerns the whole connection (failed
// authentication, malformed frame); its sender closes the connection.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// ProtocolVersion is the version sent in the handshake.
const ProtocolVersion = 1

// PageSize is the page size every Range is aligned to.
const PageSize = 4096

// Frame types.
const (
	TypeChallenge uint8 = 1  // server -> client: version, nonce
	TypeHello     uint8 = 2  // client -> server: version, name, mac, nonce
	TypeAuth      uint8 = 3  // server -> client: name, mac
	TypeDescReq   uint8 = 4  // descriptor request
	TypeDescResp  uint8 = 5  // descriptor response
	TypePagesReq  uint8 = 6  // pages request
	TypePagesResp uint8 = 7  // pages response
	TypeForkReq   uint8 = 8  // fork request
	TypeForkResp  uint8 = 9  // fork response
	TypeLeaseReq  uint8 = 10 // lease request
	TypeLeaseResp uint8 = 11 // lease response
	TypePing      uint8 = 12 // ping
	TypePong      uint8 = 13 // pong
	TypeError     uint8 = 14 // error: u16 code, message
)

// Limits of the protocol.
const (
	HeaderSize      = 4 + 1 + 8 // length, type, request id
	NonceSize       = 32
	MACSize         = 32
	MaxSeedID       = 128     // bytes of a seed id (also a forked child's id)
	MaxNodeName     = 64      // bytes of a node name
	MaxMessage      = 4 << 10 // bytes of an error message
	MaxPayload      = 1 << 20 // bytes of a fork request payload
	MaxDescriptor   = 16 << 20
	MaxRanges       = 1024    // ranges per pages request
	MaxPagesBytes   = 4 << 20 // bytes per pages request
	MaxWorkingSet   = 1 << 18 // ranges of a descriptor's working set
	MaxForkCount    = 1 << 16 // children per fork request
	minFrameLength  = 1 + 8
	maxSmallFrame   = 64 << 10 // handshake, lease, ping, error frames
	maxRequestFrame = 1<<20 + 64<<10
	// maxRequestLength bounds any frame a server reads (an invocation
	// with its body is the largest request); each type's own limit
	// applies below it.
	maxRequestLength = minFrameLength + 2*2 + 2*MaxSeedID + MaxNodeName + 1 + 4 + 4 + MaxInvokeMeta + 4 + MaxInvokeBody
)

// Error codes carried by Error frames.
const (
	CodeMalformed   uint16 = 1 // undecodable or oversized frame
	CodeAuth        uint16 = 2 // authentication failed
	CodeUnknownSeed uint16 = 3 // no such seed
	CodeBadRange    uint16 = 4 // range outside the seed or misaligned
	CodeTooLarge    uint16 = 5 // request exceeds a protocol limit
	CodeInternal    uint16 = 6 // the provider failed
	CodeUnsupported uint16 = 7 // unknown request type
	CodeShutdown    uint16 = 8 // server is shutting down
)

// Errors. Remote errors (*RemoteError) match these with errors.Is by code.
var (
	ErrMalformed   = errors.New("malformed frame")
	ErrTooLarge    = errors.New("exceeds protocol limit")
	ErrAuth        = errors.New("authentication failed")
	ErrUnknownSeed = errors.New("unknown seed")
	ErrBadRange    = errors.New("bad range")
	ErrUnsupported = errors.New("unsupported request")
	ErrShutdown    = errors.New("peer shutting down")
	ErrTimeout     = errors.New("request timed out")
	ErrClosed      = errors.New("transport closed")
)

// RemoteError is an Error frame received from a peer.
type RemoteError struct {
	Peer string
	Code uint16
	Msg  string
}

// Error describes the peer's refusal.
func (e *RemoteError) Error() string {
	if e.Peer != "" {
		return fmt.Sprintf("peer %s: %s (code %d)", e.Peer, e.Msg, e.Code)
	}
	return fmt.Sprintf("peer: %s (code %d)", e.Msg, e.Code)
}

// Is matches the sentinel error of the code.
func (e *RemoteError) Is(target error) bool {
	return codeErr(e.Code) == target && target != nil
}

func codeErr(code uint16) error {
	switch code {
	case CodeMalformed:
		return ErrMalformed
	case CodeAuth:
		return ErrAuth
	case CodeUnknownSeed:
		return ErrUnknownSeed
	case CodeBadRange:
		return ErrBadRange
	case CodeTooLarge:
		return ErrTooLarge
	case CodeUnsupported:
		return ErrUnsupported
	case CodeShutdown:
		return ErrShutdown
	case CodeBusy:
		return ErrBusy
	case CodeNotDeployed:
		return ErrNotDeployed
	}
	return nil
}

// errCode picks the code for a local error.
func errCode(err error) uint16 {
	switch {
	case errors.Is(err, ErrUnknownSeed):
		return CodeUnknownSeed
	case errors.Is(err, ErrBadRange):
		return CodeBadRange
	case errors.Is(err, ErrTooLarge):
		return CodeTooLarge
	case errors.Is(err, ErrMalformed):
		return CodeMalformed
	case errors.Is(err, ErrAuth):
		return CodeAuth
	case errors.Is(err, ErrUnsupported):
		return CodeUnsupported
	case errors.Is(err, ErrShutdown):
		return CodeShutdown
	case errors.Is(err, ErrBusy):
		return CodeBusy
	case errors.Is(err, ErrNotDeployed):
		return CodeNotDeployed
	}
	return CodeInternal
}

// maxFrameLength is the largest length field accepted for a frame type.
func maxFrameLength(typ uint8) uint32 {
	switch typ {
	case TypeDescResp:
		return minFrameLength + 4 + MaxDescriptor + 4 + MaxWorkingSet*16
	case TypePagesResp:
		return minFrameLength + MaxPagesBytes
	case TypeForkResp:
		return minFrameLength + 4 + MaxForkCount*(2+MaxSeedID+16) + 2 + 2 + MaxMessage
	case TypeForkReq, TypePagesReq, TypeDescReq:
		return maxRequestFrame
	case TypeInvokeReq:
		return maxRequestLength
	case TypeInvokeResp:
		return minFrameLength + 2 + 1 + 16 + 3*2 + MaxSeedID + 256 + MaxMessage + 4 + MaxInvokeBody
	case TypeCallReq, TypeCallResp:
		return minFrameLength + 2 + MaxOpName + 4 + MaxCallBody
	case TypeChallenge, TypeHello, TypeAuth, TypeLeaseReq, TypeLeaseResp,
		TypePing, TypePong, TypeError:
		return maxSmallFrame
	}
	return 0
}

// FrameHeader is a decoded frame header.
type FrameHeader struct {
	Type uint8
	ID   uint64
	Len  uint32 // payload bytes (length field minus 9)
}

// ParseHeader decodes a frame header and checks its length against the
// limit of its type and against max (0 = no extra limit).
func ParseHeader(h *[HeaderSize]byte, max uint32) (FrameHeader, error) {
	n := binary.LittleEndian.Uint32(h[0:4])
	typ := h[4]
	id := binary.LittleEndian.Uint64(h[5:13])
	if n < minFrameLength {
		return FrameHeader{}, fmt.Errorf("%w: frame length %d below minimum", ErrMalformed, n)
	}
	lim := maxFrameLength(typ)
	if lim == 0 {
		return FrameHeader{}, fmt.Errorf("%w: unknown frame type %d", ErrMalformed, typ)
	}
	if max != 0 && max < lim {
		lim = max
	}
	if n > lim {
		return FrameHeader{}, fmt.Errorf("%w: frame type %d length %d > %d", ErrTooLarge, typ, n, lim)
	}
	return FrameHeader{Type: typ, ID: id, Len: n - minFrameLength}, nil
}

// putHeader encodes a header for a payload of n bytes.
func putHeader(h []byte, typ uint8, id uint64, n int) {
	binary.LittleEndian.PutUint32(h[0:4], uint32(minFrameLength+n))
	h[4] = typ
	binary.LittleEndian.PutUint64(h[5:13], id)
}

// AppendFrame appends a complete frame to dst.
func AppendFrame(dst []byte, typ uint8, id uint64, payload []byte) []byte {
	var h [HeaderSize]byte
	putHeader(h[:], typ, id, len(payload))
	dst = append(dst, h[:]...)
	return append(dst, payload...)
}

// Frame is a whole frame.
type Frame struct {
	Type    uint8
	ID      uint64
	Payload []byte
}

// ReadFrame reads one frame from r. max (0 = none) further limits the
// length field. Memory is allocated in step with the bytes actually
// received, so a huge claimed length with no data behind it costs little.
func ReadFrame(r io.Reader, max uint32) (Frame, error) {
	var h [HeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Frame{}, err
	}
	fh, err := ParseHeader(&h, max)
	if err != nil {
		return Frame{}, err
	}
	p, err := readPayload(r, fh.Len)
	if err != nil {
		return Frame{}, err
	}
	return Frame{Type: fh.Type, ID: fh.ID, Payload: p}, nil
}

// readPayload reads exactly n bytes, growing its buffer as data arrives.
func readPayload(r io.Reader, n uint32) ([]byte, error) {
	const chunk = 256 << 10
	if n <= chunk {
		p := make([]byte, n)
		if _, err := io.ReadFull(r, p); err != nil {
			return nil, unexpectedEOF(err)
		}
		return p, nil
	}
	var b bytes.Buffer
	b.Grow(chunk)
	got, err := b.ReadFrom(io.LimitReader(r, int64(n)))
	if err != nil {
		return nil, err
	}
	if got != int64(n) {
		return nil, fmt.Errorf("frame truncated after %d of %d bytes: %w", got, n, io.ErrUnexpectedEOF)
	}
	return b.Bytes(), nil
}

func unexpectedEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// ---- payload encoding ----

type encoder struct{ b []byte }

func (e *encoder) u8(v uint8)   { e.b = append(e.b, v) }
func (e *encoder) u16(v uint16) { e.b = binary.LittleEndian.AppendUint16(e.b, v) }
func (e *encoder) u32(v uint32) { e.b = binary.LittleEndian.AppendUint32(e.b, v) }
func (e *encoder) u64(v uint64) { e.b = binary.LittleEndian.AppendUint64(e.b, v) }
func (e *encoder) str16(s string) {
	e.u16(uint16(len(s)))
	e.b = append(e.b, s...)
}
func (e *encoder) blob32(p []byte) {
	e.u32(uint32(len(p)))
	e.b = append(e.b, p...)
}
func (e *encoder) raw(p []byte) { e.b = append(e.b, p...) }

// decoder reads a payload; the first error sticks.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
	}
}

func (d *decoder) tooLarge(what string, n, max int) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s %d > %d", ErrTooLarge, what, n, max)
	}
}

func (d *decoder) take(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.b) {
		d.fail("%s: need %d bytes, %d left", what, n, len(d.b))
		return nil
	}
	p := d.b[:n:n]
	d.b = d.b[n:]
	return p
}

func (d *decoder) u8(what string) uint8 {
	p := d.take(1, what)
	if p == nil {
		return 0
	}
	return p[0]
}

func (d *decoder) u16(what string) uint16 {
	p := d.take(2, what)
	if p == nil {
		return 0
	}
	return binary.LittleEndian.Uint16(p)
}

func (d *decoder) u32(what string) uint32 {
	p := d.take(4, what)
	if p == nil {
		return 0
	}
	return binary.LittleEndian.Uint32(p)
}

func (d *decoder) u64(what string) uint64 {
	p := d.take(8, what)
	if p == nil {
		return 0
	}
	return binary.LittleEndian.Uint64(p)
}

// str16 reads a u16-prefixed string of at most max bytes.
func (d *decoder) str16(what string, max int) string {
	n := int(d.u16(what))
	if d.err != nil {
		return ""
	}
	if n > max {
		d.tooLarge(what, n, max)
		return ""
	}
	p := d.take(n, what)
	if d.err != nil {
		return ""
	}
	return string(p)
}

// blob32 reads a u32-prefixed blob of at most max bytes (aliases d.b).
func (d *decoder) blob32(what string, max int) []byte {
	n := uint64(d.u32(what))
	if d.err != nil {
		return nil
	}
	if n > uint64(max) {
		d.tooLarge(what, int(n), max)
		return nil
	}
	return d.take(int(n), what)
}

// count reads a u32 element count, checking it against max and against
// the bytes left (each element needs at least elem bytes).
func (d *decoder) count(what string, max, elem int) int {
	n := uint64(d.u32(what))
	if d.err != nil {
		return 0
	}
	if n > uint64(max) {
		d.tooLarge(what, int(n), max)
		return 0
	}
	if n*uint64(elem) > uint64(len(d.b)) {
		d.fail("%s: %d elements need %d bytes, %d left", what, n, n*uint64(elem), len(d.b))
		return 0
	}
	return int(n)
}

func (d *decoder) done(what string) error {
	if d.err == nil && len(d.b) != 0 {
		d.fail("%s: %d trailing bytes", what, len(d.b))
	}
	if d.err != nil {
		return fmt.Errorf("decode %s: %w", what, d.err)
	}
	return nil
}

func checkSeed(d *decoder, seed string) {
	if d.err == nil && seed == "" {
		d.fail("empty seed id")
	}
}

// ---- handshake ----

// Challenge is the server's first message.
type Challenge struct {
	Version uint16
	Nonce   [NonceSize]byte
}

// Encode encodes the payload.
func (c *Challenge) Encode() []byte {
	e := encoder{b: make([]byte, 0, 2+NonceSize)}
	e.u16(c.Version)
	e.raw(c.Nonce[:])
	return e.b
}

// DecodeChallenge decodes a Challenge payload.
func DecodeChallenge(p []byte) (Challenge, error) {
	d := decoder{b: p}
	var c Challenge
	c.Version = d.u16("version")
	copy(c.Nonce[:], d.take(NonceSize, "nonce"))
	return c, d.done("challenge")
}

// Hello is the client's answer to a Challenge.
type Hello struct {
	Version uint16
	Name    string
	MAC     [MACSize]byte
	Nonce   [NonceSize]byte
}

// Encode encodes the payload.
func (h *Hello) Encode() []byte {
	e := encoder{b: make([]byte, 0, 4+len(h.Name)+MACSize+NonceSize)}
	e.u16(h.Version)
	e.str16(h.Name)
	e.raw(h.MAC[:])
	e.raw(h.Nonce[:])
	return e.b
}

// DecodeHello decodes a Hello payload.
func DecodeHello(p []byte) (Hello, error) {
	d := decoder{b: p}
	var h Hello
	h.Version = d.u16("version")
	h.Name = d.str16("node name", MaxNodeName)
	copy(h.MAC[:], d.take(MACSize, "mac"))
	copy(h.Nonce[:], d.take(NonceSize, "nonce"))
	return h, d.done("hello")
}

// Auth is the server's proof, the last handshake message.
type Auth struct {
	Name string
	MAC  [MACSize]byte
}

// Encode encodes the payload.
func (a *Auth) Encode() []byte {
	e := encoder{b: make([]byte, 0, 2+len(a.Name)+MACSize)}
	e.str16(a.Name)
	e.raw(a.MAC[:])
	return e.b
}

// DecodeAuth decodes an Auth payload.
func DecodeAuth(p []byte) (Auth, error) {
	d := decoder{b: p}
	var a Auth
	a.Name = d.str16("node name", MaxNodeName)
	copy(a.MAC[:], d.take(MACSize, "mac"))
	return a, d.done("auth")
}

// ---- requests and responses ----

// EncodeSeed encodes a descriptor request (a bare seed id).
func EncodeSeed(seed string) []byte {
	e := encoder{b: make([]byte, 0, 2+len(seed))}
	e.str16(seed)
	return e.b
}

// DecodeSeed decodes a descriptor request.
func DecodeSeed(p []byte) (string, error) {
	d := decoder{b: p}
	s := d.str16("seed id", MaxSeedID)
	checkSeed(&d, s)
	return s, d.done("descriptor request")
}

// DescResponse is a descriptor response.
type DescResponse struct {
	Desc       []byte
	WorkingSet []Range
}

// Encode encodes the payload.
func (r *DescResponse) Encode() []byte {
	e := encoder{b: make([]byte, 0, 8+len(r.Desc)+16*len(r.WorkingSet))}
	e.blob32(r.Desc)
	e.u32(uint32(len(r.WorkingSet)))
	for _, w := range r.WorkingSet {
		e.u64(w.Addr)
		e.u64(w.Len)
	}
	return e.b
}

// DecodeDescResponse decodes a descriptor response. Desc aliases p.
func DecodeDescResponse(p []byte) (DescResponse, error) {
	d := decoder{b: p}
	var r DescResponse
	r.Desc = d.blob32("descriptor", MaxDescriptor)
	n := d.count("working set", MaxWorkingSet, 16)
	if n > 0 {
		r.WorkingSet = make([]Range, n)
		for i := range r.WorkingSet {
			r.WorkingSet[i] = Range{Addr: d.u64("addr"), Len: d.u64("len")}
		}
	}
	return r, d.done("descriptor response")
}

// PagesRequest asks for the contents of ranges of a seed.
type PagesRequest struct {
	Seed   string
	Ranges []Range
}

// Encode encodes the payload.
func (r *PagesRequest) Encode() []byte {
	e := encoder{b: make([]byte, 0, 6+len(r.Seed)+16*len(r.Ranges))}
	e.str16(r.Seed)
	e.u32(uint32(len(r.Ranges)))
	for _, g := range r.Ranges {
		e.u64(g.Addr)
		e.u64(g.Len)
	}
	return e.b
}

// Total is the number of bytes the ranges cover.
func (r *PagesRequest) Total() uint64 {
	var t uint64
	for _, g := range r.Ranges {
		t += g.Len
	}
	return t
}

// CheckRanges validates ranges against the per-request limits: at most
// MaxRanges non-empty, page-aligned, non-wrapping ranges covering at most
// MaxPagesBytes in total.
func CheckRanges(rs []Range) error {
	if len(rs) == 0 {
		return fmt.Errorf("%w: no ranges", ErrBadRange)
	}
	if len(rs) > MaxRanges {
		return fmt.Errorf("%w: %d ranges > %d", ErrTooLarge, len(rs), MaxRanges)
	}
	var total uint64
	for _, g := range rs {
		if g.Len == 0 || g.Addr%PageSize != 0 || g.Len%PageSize != 0 || g.Addr+g.Len < g.Addr {
			return fmt.Errorf("%w: [%#x, +%#x) empty, misaligned or wrapping", ErrBadRange, g.Addr, g.Len)
		}
		if g.Len > MaxPagesBytes {
			return fmt.Errorf("%w: range of %d bytes > %d", ErrTooLarge, g.Len, MaxPagesBytes)
		}
		total += g.Len
		if total > MaxPagesBytes {
			return fmt.Errorf("%w: request of more than %d bytes", ErrTooLarge, MaxPagesBytes)
		}
	}
	return nil
}

// DecodePagesRequest decodes a pages request and checks its limits: too
// many ranges or bytes give an error wrapping ErrTooLarge, misaligned or
// empty ranges one wrapping ErrBadRange, undecodable input ErrMalformed.
func DecodePagesRequest(p []byte) (PagesRequest, error) {
	d := decoder{b: p}
	var r PagesRequest
	r.Seed = d.str16("seed id", MaxSeedID)
	checkSeed(&d, r.Seed)
	n := d.count("ranges", MaxRanges, 16)
	if d.err == nil {
		r.Ranges = make([]Range, n)
		for i := range r.Ranges {
			r.Ranges[i] = Range{Addr: d.u64("addr"), Len: d.u64("len")}
		}
	}
	if err := d.done("pages request"); err != nil {
		return PagesRequest{}, err
	}
	if err := CheckRanges(r.Ranges); err != nil {
		return PagesRequest{}, fmt.Errorf("pages request: %w", err)
	}
	return r, nil
}

// Encode encodes a fork request payload.
func (r *ForkRequest) Encode() []byte {
	e := encoder{b: make([]byte, 0, 11+len(r.Seed)+len(r.Payload))}
	e.str16(r.Seed)
	e.u32(uint32(r.Count))
	var eager uint8
	if r.Eager {
		eager = 1
	}
	e.u8(eager)
	e.blob32(r.Payload)
	return e.b
}

// DecodeForkRequest decodes a fork request. Payload aliases p (nil if
// empty).
func DecodeForkRequest(p []byte) (ForkRequest, error) {
	d := decoder{b: p}
	var r ForkRequest
	r.Seed = d.str16("seed id", MaxSeedID)
	checkSeed(&d, r.Seed)
	c := d.u32("count")
	if d.err == nil && (c == 0 || c > MaxForkCount) {
		d.fail("fork count %d not in [1, %d]", c, MaxForkCount)
	}
	r.Count = int(c)
	switch e := d.u8("eager"); {
	case d.err != nil:
	case e == 0:
	case e == 1:
		r.Eager = true
	default:
		d.fail("eager flag %d", e)
	}
	r.Payload = d.blob32("payload", MaxPayload)
	if len(r.Payload) == 0 {
		r.Payload = nil
	}
	return r, d.done("fork request")
}

// checkForkRequest validates a fork request before sending it.
func checkForkRequest(r ForkRequest) error {
	if err := checkSeedID(r.Seed); err != nil {
		return err
	}
	if r.Count <= 0 || r.Count > MaxForkCount {
		return fmt.Errorf("%w: fork count %d not in [1, %d]", ErrTooLarge, r.Count, MaxForkCount)
	}
	if len(r.Payload) > MaxPayload {
		return fmt.Errorf("%w: fork payload of %d bytes > %d", ErrTooLarge, len(r.Payload), MaxPayload)
	}
	return nil
}

// ForkResponse is the answer to a fork request: the children forked and,
// if the fork stopped early, the error that stopped it (Code != 0). Children
// forked before a failure are reported so the requester can track them.
type ForkResponse struct {
	Children []ForkedChild
	Code     uint16
	Msg      string
}

// Encode encodes the payload (the message is truncated to MaxMessage).
func (r *ForkResponse) Encode() []byte {
	msg := truncate(r.Msg, MaxMessage)
	e := encoder{b: make([]byte, 0, 8+len(r.Children)*40+len(msg))}
	e.u32(uint32(len(r.Children)))
	for _, c := range r.Children {
		e.str16(c.ID)
		e.u64(uint64(int64(c.PID)))
		e.u64(uint64(c.StartUS))
	}
	e.u16(r.Code)
	e.str16(msg)
	return e.b
}

// DecodeForkResponse decodes a fork response.
func DecodeForkResponse(p []byte) (ForkResponse, error) {
	d := decoder{b: p}
	var r ForkResponse
	n := d.count("children", MaxForkCount, 2+16)
	if d.err == nil && n > 0 {
		r.Children = make([]ForkedChild, n)
		for i := range r.Children {
			r.Children[i].ID = d.str16("child id", MaxSeedID)
			r.Children[i].PID = int(int64(d.u64("pid")))
			r.Children[i].StartUS = int64(d.u64("start"))
		}
	}
	r.Code = d.u16("code")
	r.Msg = d.str16("message", MaxMessage)
	if err := d.done("fork response"); err != nil {
		return ForkResponse{}, err
	}
	return r, nil
}

// checkForkResponse validates children before encoding them.
func checkForkResponse(cs []ForkedChild) error {
	if len(cs) > MaxForkCount {
		return fmt.Errorf("%w: %d children > %d", ErrTooLarge, len(cs), MaxForkCount)
	}
	for _, c := range cs {
		if len(c.ID) > MaxSeedID {
			return fmt.Errorf("%w: child id of %d bytes > %d", ErrTooLarge, len(c.ID), MaxSeedID)
		}
	}
	return nil
}

// LeaseRequest adds or drops a lease on a seed.
type LeaseRequest struct {
	Seed  string
	Delta int32
}

// Encode encodes the payload.
func (r *LeaseRequest) Encode() []byte {
	e := encoder{b: make([]byte, 0, 6+len(r.Seed))}
	e.str16(r.Seed)
	e.u32(uint32(r.Delta))
	return e.b
}

// DecodeLeaseRequest decodes a lease request.
func DecodeLeaseRequest(p []byte) (LeaseRequest, error) {
	d := decoder{b: p}
	var r LeaseRequest
	r.Seed = d.str16("seed id", MaxSeedID)
	checkSeed(&d, r.Seed)
	r.Delta = int32(d.u32("delta"))
	if d.err == nil && r.Delta == 0 {
		d.fail("lease delta 0")
	}
	return r, d.done("lease request")
}

// ErrorMsg is an Error frame payload.
type ErrorMsg struct {
	Code uint16
	Msg  string
}

// Encode encodes the payload, truncating the message to MaxMessage bytes
// (on a UTF-8 boundary).
func (m *ErrorMsg) Encode() []byte {
	s := truncate(m.Msg, MaxMessage)
	e := encoder{b: make([]byte, 0, 4+len(s))}
	e.u16(m.Code)
	e.str16(s)
	return e.b
}

// DecodeError decodes an Error frame payload.
func DecodeError(p []byte) (ErrorMsg, error) {
	d := decoder{b: p}
	var m ErrorMsg
	m.Code = d.u16("code")
	m.Msg = d.str16("message", MaxMessage)
	return m, d.done("error")
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

func checkSeedID(seed string) error {
	if seed == "" {
		return fmt.Errorf("%w: empty seed id", ErrMalformed)
	}
	if len(seed) > MaxSeedID {
		return fmt.Errorf("%w: seed id of %d bytes > %d", ErrTooLarge, len(seed), MaxSeedID)
	}
	return nil
}

func checkNodeName(name string) error {
	if len(name) > MaxNodeName {
		return fmt.Errorf("%w: node name of %d bytes > %d", ErrTooLarge, len(name), MaxNodeName)
	}
	return nil
}
