package transport

// Function invocations and control calls (the serverless platform's
// gateway talks to node daemons with these):
//
//	InvokeReq  function | seed | u32 timeout ms | blob32 meta | blob32 body
//	InvokeResp u16 status | u8 kind | i64 start µs | i64 run µs | child | content type | error | blob32 body
//	CallReq    op | blob32 JSON body
//	CallResp   blob32 JSON body
//
// A client that gives up on an invocation before its answer (its caller
// cancelled, not a timeout) tells the server with a call of op CancelOp
// whose body is {"id": N}, N the invocation's request id on the same
// connection; the server cancels the invocation's context, and the node
// ends the instance running it. A server that predates the op answers it
// with an Error frame and lets the invocation run: the client ignores
// either answer, so old and new peers mix.
//
// meta is JSON (method, path, query, headers) at most MaxInvokeMeta bytes;
// body at most MaxInvokeBody. An invocation that fails before the
// function ran (no such function, node full, seed unreachable) is
// answered with an Error frame; a function that ran and failed (its
// handler raised, it crashed or timed out) is an InvokeResp with status
// 500 or 504 and the error.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"
)

// Frame types of invocations and calls.
const (
	TypeInvokeReq  uint8 = 15
	TypeInvokeResp uint8 = 16
	TypeCallReq    uint8 = 17
	TypeCallResp   uint8 = 18
)

// Limits of invocations and calls.
const (
	MaxInvokeBody = 16 << 20 // request or response body
	MaxInvokeMeta = 64 << 10 // request metadata (JSON)
	MaxCallBody   = 4 << 20  // JSON of a call or its answer
	MaxOpName     = 64
	// CancelOp is the call op that cancels a request in flight on the
	// same connection (body: {"id": N}; answer: {"cancelled": bool}).
	CancelOp = "transport.cancel"
	// invokeMargin is added to an invocation's own timeout to bound the
	// transport request: the node enforces the function's timeout and
	// answers; only a dead or stuck node hits this bound.
	invokeMargin = 5 * time.Second
)

// Instance kinds reported by InvokeResponse.Kind.
const (
	KindFork uint8 = 1 // a child forked from a seed
	KindWarm uint8 = 2 // an idle warm instance (keep-alive)
	KindCold uint8 = 3 // a process started for this invocation
)

// Error codes of invocations.
const (
	// CodeBusy: the node has no capacity left.
	CodeBusy uint16 = 9
	// CodeNotDeployed: the function is not deployed on the node.
	CodeNotDeployed uint16 = 10
)

// Errors of invocations (remote errors match them with errors.Is).
var (
	ErrBusy        = errors.New("node at capacity")
	ErrNotDeployed = errors.New("function not deployed on this node")
)

// InvokeRequest asks a node to run one invocation of a function deployed
// on it.
type InvokeRequest struct {
	Function string
	// Seed is "NODE/SEED", the seed to fork from (fork policies; empty:
	// the node's own seed of the function, or no seed).
	Seed    string
	Timeout time.Duration
	Meta    []byte // JSON, may be nil
	Body    []byte
}

// InvokeResponse is the result of one invocation.
type InvokeResponse struct {
	Status      int
	Kind        uint8
	Start       time.Duration // getting an instance: restore, warm resume or cold start
	Run         time.Duration // from the instance's start until its reply
	Child       string        // the instance's id on the node
	ContentType string
	Error       string
	Body        []byte
	// Seed is "NODE/SEED" of the stage seed the instance became, when the
	// request asked for one (function.Request.Stage).
	Seed string
}

// Invoker is implemented by a Provider that runs function invocations.
type Invoker interface {
	Invoke(ctx context.Context, peer string, req InvokeRequest) (InvokeResponse, error)
}

// Caller is implemented by a Provider that answers control calls: op names
// an operation, body and answer are JSON.
type Caller interface {
	Call(ctx context.Context, peer, op string, body []byte) ([]byte, error)
}

// Encode encodes an invoke request payload.
func (r *InvokeRequest) Encode() []byte {
	e := encoder{b: make([]byte, 0, 16+len(r.Function)+len(r.Seed)+len(r.Meta)+len(r.Body))}
	e.str16(r.Function)
	e.str16(r.Seed)
	e.u32(uint32(r.Timeout / time.Millisecond))
	e.blob32(r.Meta)
	e.blob32(r.Body)
	return e.b
}

// DecodeInvokeRequest decodes an invoke request. Meta and Body alias p.
func DecodeInvokeRequest(p []byte) (InvokeRequest, error) {
	d := decoder{b: p}
	var r InvokeRequest
	r.Function = d.str16("function", MaxSeedID)
	if d.err == nil && r.Function == "" {
		d.fail("empty function name")
	}
	r.Seed = d.str16("seed", MaxSeedID+MaxNodeName+1)
	r.Timeout = time.Duration(d.u32("timeout")) * time.Millisecond
	r.Meta = d.blob32("meta", MaxInvokeMeta)
	r.Body = d.blob32("body", MaxInvokeBody)
	return r, d.done("invoke request")
}

func checkInvokeRequest(r InvokeRequest) error {
	switch {
	case r.Function == "" || len(r.Function) > MaxSeedID:
		return fmt.Errorf("%w: function name of %d bytes", ErrMalformed, len(r.Function))
	case len(r.Seed) > MaxSeedID+MaxNodeName+1:
		return fmt.Errorf("%w: seed of %d bytes", ErrTooLarge, len(r.Seed))
	case len(r.Meta) > MaxInvokeMeta:
		return fmt.Errorf("%w: invocation metadata of %d bytes > %d", ErrTooLarge, len(r.Meta), MaxInvokeMeta)
	case len(r.Body) > MaxInvokeBody:
		return fmt.Errorf("%w: request body of %d bytes > %d", ErrTooLarge, len(r.Body), MaxInvokeBody)
	case r.Timeout < 0 || r.Timeout/time.Millisecond > 1<<32-1:
		return fmt.Errorf("%w: timeout %v", ErrTooLarge, r.Timeout)
	}
	return nil
}

// Encode encodes an invoke response payload (the error is truncated to
// MaxMessage).
func (r *InvokeResponse) Encode() []byte {
	msg := truncate(r.Error, MaxMessage)
	e := encoder{b: make([]byte, 0, 34+len(r.Child)+len(r.ContentType)+len(msg)+len(r.Body)+len(r.Seed))}
	e.u16(uint16(r.Status))
	e.u8(r.Kind)
	e.u64(uint64(max(r.Start, 0).Microseconds()))
	e.u64(uint64(max(r.Run, 0).Microseconds()))
	e.str16(r.Child)
	e.str16(r.ContentType)
	e.str16(msg)
	e.blob32(r.Body)
	if r.Seed != "" {
		// Optional and last: a response without it decodes on peers
		// that predate it.
		e.str16(r.Seed)
	}
	return e.b
}

// DecodeInvokeResponse decodes an invoke response. Body aliases p.
func DecodeInvokeResponse(p []byte) (InvokeResponse, error) {
	d := decoder{b: p}
	var r InvokeResponse
	r.Status = int(d.u16("status"))
	if d.err == nil && (r.Status < 100 || r.Status > 599) {
		d.fail("status %d", r.Status)
	}
	r.Kind = d.u8("kind")
	r.Start = d.micros("start")
	r.Run = d.micros("run")
	r.Child = d.str16("child", MaxSeedID)
	r.ContentType = d.str16("content type", 256)
	r.Error = d.str16("error", MaxMessage)
	r.Body = d.blob32("body", MaxInvokeBody)
	if d.err == nil && len(d.b) > 0 {
		if r.Seed = d.str16("seed", MaxSeedID+MaxNodeName+1); d.err == nil && r.Seed == "" {
			d.fail("empty stage seed") // absent, not empty, when there is none
		}
	}
	return r, d.done("invoke response")
}

// micros decodes a non-negative duration in microseconds.
func (d *decoder) micros(what string) time.Duration {
	v := d.u64(what)
	if d.err == nil && v > math.MaxInt64/1000 {
		d.fail("%s of %d µs out of range", what, v)
	}
	return time.Duration(v) * time.Microsecond
}

// EncodeCall encodes a call request payload.
func EncodeCall(op string, body []byte) []byte {
	e := encoder{b: make([]byte, 0, 6+len(op)+len(body))}
	e.str16(op)
	e.blob32(body)
	return e.b
}

// DecodeCall decodes a call request payload. body aliases p.
func DecodeCall(p []byte) (op string, body []byte, err error) {
	d := decoder{b: p}
	op = d.str16("op", MaxOpName)
	if d.err == nil && op == "" {
		d.fail("empty op")
	}
	body = d.blob32("body", MaxCallBody)
	return op, body, d.done("call request")
}

// Invoke runs one invocation on the peer. It is bounded by req.Timeout
// plus a margin (the node enforces the function's timeout itself) and never
// retried. A node without capacity answers with an error matching ErrBusy.
func (c *Client) Invoke(ctx context.Context, req InvokeRequest) (InvokeResponse, error) {
	if err := checkInvokeRequest(req); err != nil {
		return InvokeResponse{}, fmt.Errorf("transport: invoke: %w", err)
	}
	p, err := c.doTimeout(ctx, "invoke of "+req.Function, TypeInvokeReq, TypeInvokeResp, req.Encode(), nil, false, req.Timeout+invokeMargin)
	if err != nil {
		return InvokeResponse{}, err
	}
	r, err := DecodeInvokeResponse(p)
	if err != nil {
		return InvokeResponse{}, fmt.Errorf("transport: invoke of %s from %s: %w", req.Function, c.where(), err)
	}
	return r, nil
}

// Call runs a control call on the peer, bounded by timeout (0: the
// client's default), never retried.
func (c *Client) Call(ctx context.Context, op string, body []byte, timeout time.Duration) ([]byte, error) {
	if op == "" || len(op) > MaxOpName {
		return nil, fmt.Errorf("transport: call: bad op %q", op)
	}
	if len(body) > MaxCallBody {
		return nil, fmt.Errorf("transport: call %s: %w: body of %d bytes", op, ErrTooLarge, len(body))
	}
	if timeout <= 0 {
		timeout = c.cfg.Timeout
	}
	p, err := c.doTimeout(ctx, "call "+op, TypeCallReq, TypeCallResp, EncodeCall(op, body), nil, false, timeout)
	if err != nil {
		return nil, err
	}
	d := decoder{b: p}
	out := d.blob32("answer", MaxCallBody)
	if err := d.done("call response"); err != nil {
		return nil, fmt.Errorf("transport: call %s from %s: %w", op, c.where(), err)
	}
	return out, nil
}

// cancelCall is the body of a CancelOp call and its answer.
type cancelCall struct {
	ID        uint64 `json:"id,omitempty"`
	Cancelled bool   `json:"cancelled"`
}

// invoke runs one invocation under ctx, which the connection's end or a
// CancelOp call naming id cancels.
func (sc *serverConn) invoke(ctx context.Context, id uint64, req InvokeRequest) error {
	inv, ok := sc.s.p.(Invoker)
	if !ok {
		return fmt.Errorf("%w: this node runs no functions", ErrUnsupported)
	}
	r, err := inv.Invoke(ctx, sc.peer, req)
	if err != nil {
		return fmt.Errorf("invoke %s: %w", req.Function, err)
	}
	if len(r.Body) > MaxInvokeBody {
		r = InvokeResponse{Status: 502, Kind: r.Kind, Start: r.Start, Run: r.Run, Child: r.Child,
			Error: fmt.Sprintf("response body of %d bytes exceeds the transport limit of %d", len(r.Body), MaxInvokeBody)}
	}
	return sc.write(TypeInvokeResp, id, r.Encode())
}

func (sc *serverConn) call(id uint64, op string, body []byte) error {
	cl, ok := sc.s.p.(Caller)
	if !ok {
		return fmt.Errorf("%w: this node answers no calls", ErrUnsupported)
	}
	out, err := cl.Call(sc.ctx, sc.peer, op, body)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if len(out) > MaxCallBody {
		return fmt.Errorf("%s: %w: answer of %d bytes", op, ErrTooLarge, len(out))
	}
	return sc.answerCall(id, out)
}

// answerCall sends the answer of call id.
func (sc *serverConn) answerCall(id uint64, out []byte) error {
	e := encoder{b: make([]byte, 0, 4+len(out))}
	e.blob32(out)
	return sc.write(TypeCallResp, id, e.b)
}
