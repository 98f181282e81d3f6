package gateway

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/mitosis-fork/mitosis/directory"
	"github.com/mitosis-fork/mitosis/function"
	"github.com/mitosis-fork/mitosis/gateway/gwapi"
	"github.com/mitosis-fork/mitosis/node"
	"github.com/mitosis-fork/mitosis/transport"
)

// call is one invocation on its way to a node.
type call struct {
	fn    string
	meta  []byte
	body  []byte
	start time.Time
	seed  string // X-Mitosis-Seed: fork from this seed (NODE/SEED)
	stage bool   // X-Mitosis-Stage: keep the instance as a stage seed
	// stageTTL (X-Mitosis-Stage-TTL): remove the stage seed after this
	// long (0: when asked).
	stageTTL time.Duration
}

// Headers of stage seeds (gwapi.HeaderSeed, gwapi.HeaderStage,
// gwapi.HeaderStageTTL).
const (
	HeaderSeed     = gwapi.HeaderSeed
	HeaderStage    = gwapi.HeaderStage
	HeaderStageTTL = gwapi.HeaderStageTTL
)

// maxStageTTL bounds the TTLs of stage seeds and functions.
const maxStageTTL = 7 * 24 * time.Hour

// parseTTL parses the TTL what gives (a header, a field, an annotation):
// a Go duration from 1s to maxStageTTL.
func parseTTL(what, v string) (time.Duration, error) {
	t, err := time.ParseDuration(v)
	if err != nil || t < time.Second || t > maxStageTTL {
		return 0, fmt.Errorf("%s: %q is not a duration from 1s to %v (e.g. 2m)", what, v, maxStageTTL)
	}
	return t, nil
}

// outcome is what a call produced.
type outcome struct {
	resp   transport.InvokeResponse
	node   string
	queued time.Duration
	status int    // HTTP status to answer
	msg    string // error text when the gateway (not the function) failed
	retry  bool   // 429/503: set Retry-After
}

// readBody reads a request body within the limit (413 beyond).
func (g *Gateway) readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	if r.ContentLength > g.cfg.MaxBody {
		httpError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body of %d bytes exceeds the limit of %d", r.ContentLength, g.cfg.MaxBody))
		return nil, false
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.cfg.MaxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			httpError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds the limit of %d bytes", g.cfg.MaxBody))
		} else {
			httpError(w, http.StatusBadRequest, "read request body: "+err.Error())
		}
		return nil, false
	}
	return b, true
}

// newCall builds the call of an HTTP request to fn.
func newCall(r *http.Request, fn string, body []byte) (*call, error) {
	hdr := map[string]string{}
	for k, v := range r.Header {
		if k == "Authorization" || k == HeaderSeed || k == HeaderStage || k == HeaderStageTTL || len(v) == 0 {
			continue
		}
		hdr[k] = v[0]
	}
	seed := r.Header.Get(HeaderSeed)
	if seed != "" {
		if err := checkSeedRef(seed); err != nil {
			return nil, err
		}
	}
	var stage bool
	if v := r.Header.Get(HeaderStage); v != "" {
		var err error
		if stage, err = strconv.ParseBool(v); err != nil {
			return nil, &badRequest{fmt.Sprintf("%s: %q is not true or false", HeaderStage, v)}
		}
	}
	var ttl time.Duration
	if v := r.Header.Get(HeaderStageTTL); v != "" {
		if !stage {
			return nil, &badRequest{fmt.Sprintf("%s needs %s: true (it bounds the life of the stage seed the request makes)", HeaderStageTTL, HeaderStage)}
		}
		var err error
		if ttl, err = parseTTL(HeaderStageTTL, v); err != nil {
			return nil, &badRequest{err.Error()}
		}
	}
	m := function.Request{Method: r.Method, Path: "/" + r.PathValue("path"), Query: r.URL.RawQuery, Headers: hdr, Stage: stage, StageLease: stage && ttl > 0}
	meta, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if len(meta) > transport.MaxInvokeMeta {
		return nil, fmt.Errorf("request headers of %d bytes exceed the limit of %d", len(meta), transport.MaxInvokeMeta)
	}
	return &call{fn: fn, meta: meta, body: body, start: time.Now(), seed: seed, stage: stage, stageTTL: ttl}, nil
}

// badRequest is a malformed request header (400, where newCall's other
// errors are 431).
type badRequest struct{ msg string }

func (e *badRequest) Error() string { return e.msg }

// callError answers newCall's error.
func callError(w http.ResponseWriter, err error) {
	var br *badRequest
	if errors.As(err, &br) {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	httpError(w, http.StatusRequestHeaderFieldsTooLarge, err.Error())
}

// checkSeedRef validates a NODE/SEED reference of a request header.
func checkSeedRef(ref string) error {
	node, id, ok := strings.Cut(ref, "/")
	if !ok || node == "" || id == "" || len(ref) > transport.MaxSeedID+transport.MaxNodeName+1 || strings.ContainsAny(ref, " \t\r\n") || strings.Contains(id, "/") {
		return &badRequest{fmt.Sprintf("%s: %q is not NODE/SEED (the %s header of the response that made the stage seed)", HeaderSeed, ref, HeaderSeed)}
	}
	return nil
}

func (g *Gateway) invokeSync(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if _, ok := g.function(name); !ok {
		httpError(w, http.StatusNotFound, fmt.Sprintf("function %q not found", name))
		return
	}
	body, ok := g.readBody(w, r)
	if !ok {
		return
	}
	c, err := newCall(r, name, body)
	if err != nil {
		callError(w, err)
		return
	}
	o := g.run(r.Context(), c)
	g.respond(w, c, o)
}

// respond writes an outcome as the HTTP response (the function's status
// and body; its error's text for a 5xx without a body).
func (g *Gateway) respond(w http.ResponseWriter, c *call, o outcome) {
	h := w.Header()
	h.Set("X-Duration-Seconds", strconv.FormatFloat(time.Since(c.start).Seconds(), 'f', 6, 64))
	if o.node != "" {
		h.Set("X-Mitosis-Node", o.node)
	}
	if o.msg != "" {
		if o.retry {
			h.Set("Retry-After", "1")
		}
		httpError(w, o.status, o.msg)
		return
	}
	h.Set("X-Mitosis-Instance", instanceKind(o.resp.Kind))
	h.Set("X-Mitosis-Start-Seconds", strconv.FormatFloat(o.resp.Start.Seconds(), 'f', 6, 64))
	h.Set("X-Mitosis-Run-Seconds", strconv.FormatFloat(o.resp.Run.Seconds(), 'f', 6, 64))
	h.Set("X-Mitosis-Queue-Seconds", strconv.FormatFloat(o.queued.Seconds(), 'f', 6, 64))
	if o.resp.Seed != "" {
		h.Set(HeaderSeed, o.resp.Seed)
	}
	if o.resp.Status >= 500 && len(o.resp.Body) == 0 {
		httpError(w, o.resp.Status, o.resp.Error)
		return
	}
	if ct := o.resp.ContentType; ct != "" {
		h.Set("Content-Type", ct)
	}
	w.WriteHeader(o.resp.Status)
	_, _ = w.Write(o.resp.Body)
}

func instanceKind(k uint8) string {
	switch k {
	case transport.KindFork:
		return "fork"
	case transport.KindWarm:
		return "warm"
	case transport.KindCold:
		return "cold"
	}
	return "none"
}

// run places and runs one call, retrying on other nodes when a node
// refuses it (busy, or the function not deployed there yet), and records
// its metrics.
func (g *Gateway) run(ctx context.Context, c *call) outcome {
	o := g.place(ctx, c)
	code := o.status
	if o.msg == "" {
		code = o.resp.Status
	}
	g.m.observe(c.fn, code, time.Since(c.start), o)
	return o
}

func (g *Gateway) place(ctx context.Context, c *call) outcome {
	fr, ok := g.function(c.fn)
	if !ok {
		return outcome{status: http.StatusNotFound, msg: fmt.Sprintf("function %q not found", c.fn)}
	}
	spec := fr.Spec
	if (c.seed != "" || c.stage) && !spec.Policy.Seeded() {
		return outcome{status: http.StatusBadRequest, msg: fmt.Sprintf("%s and %s need a function of policy fork or local-fork; %s is %s", HeaderSeed, HeaderStage, c.fn, spec.Policy)}
	}
	avoid := map[string]bool{}
	mem := node.Reservation(&spec)
	var queued time.Duration
	var last outcome
	for attempt := 0; attempt < maxAttempts; attempt++ {
		seed := c.seed
		if seed == "" && spec.Policy == function.PolicyFork {
			ref, err := g.waitSeed(ctx, spec)
			if errors.Is(err, function.ErrInit) {
				return outcome{status: http.StatusInternalServerError, msg: err.Error()}
			}
			if err != nil {
				return outcome{status: http.StatusServiceUnavailable, retry: true, msg: err.Error()}
			}
			seed = ref
		}
		qctx, cancel := context.WithTimeout(ctx, g.cfg.QueueTimeout)
		g.m.queued.Inc()
		n, q, err := g.sched.acquire(qctx, c.fn, mem, avoid)
		g.m.queued.Dec()
		cancel()
		queued += q
		g.m.queueDelay.WithLabelValues(c.fn).Observe(q.Seconds())
		switch {
		case errors.Is(err, errTooBig):
			return outcome{status: http.StatusInsufficientStorage, queued: queued,
				msg: fmt.Sprintf("function %s: %v; lower its memory limit or give the nodes more (mitosis daemon --max-memory)", c.fn, err)}
		case errors.Is(err, errQueueFull):
			return outcome{status: http.StatusTooManyRequests, retry: true, queued: queued, msg: "cluster at capacity: " + err.Error()}
		case errors.Is(err, errNoNodes):
			return outcome{status: http.StatusServiceUnavailable, retry: true, msg: err.Error()}
		case err != nil && ctx.Err() != nil:
			return outcome{status: 499, queued: queued, msg: "client went away while queued"}
		case err != nil:
			return outcome{status: http.StatusTooManyRequests, retry: true, queued: queued,
				msg: fmt.Sprintf("cluster at capacity: no free slot within %v", g.cfg.QueueTimeout)}
		}
		o := g.invokeOn(ctx, n, c, spec, seed)
		g.sched.release(n, mem)
		if c.stage && o.msg == "" && o.resp.Seed != "" {
			g.sched.keepStage(n, c.fn, o.resp.Seed, mem)
			if c.stageTTL > 0 {
				if err := g.leaseStage(c.fn, o.resp.Seed, mem, c.stageTTL); err != nil {
					// A client that asked for a TTL gets one or an error,
					// not a seed that may never go.
					rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), removeTimeout)
					g.removeStageSeed(rctx, c.fn, o.resp.Seed)
					cancel()
					return outcome{status: http.StatusBadGateway, msg: fmt.Sprintf("stage seed %s made, but its lease could not be recorded (removed it): %v", o.resp.Seed, err)}
				}
			}
		}
		o.queued = queued
		if o.msg == "" {
			if spec.Policy == function.PolicyKeepAlive {
				if o.resp.Kind == transport.KindWarm {
					g.sched.noteIdle(n, c.fn, -1)
				}
				if o.resp.Status < 500 {
					g.sched.noteIdle(n, c.fn, +1)
				}
			}
			return o
		}
		last = o
		if !o.retry {
			return o
		}
		g.log.Info("invocation refused by its node; placing it elsewhere", "function", c.fn, "node", n.name, "attempt", attempt+1, "status", o.status, "reason", o.msg)
		avoid[n.name] = true
	}
	return last
}

// invokeOn runs the call on node n. A refusal worth retrying elsewhere
// comes back with retry set.
func (g *Gateway) invokeOn(ctx context.Context, n *nodeState, c *call, spec function.Spec, seed string) outcome {
	node := n.name
	cl, err := g.peers.client(ctx, node, n.peer)
	if err != nil {
		g.sched.markDown(n)
		g.log.Warn("node unreachable; leaving it out of placement", "node", node, "for", downFor, "err", err)
		return outcome{node: node, status: http.StatusBadGateway, retry: true, msg: err.Error()}
	}
	req := transport.InvokeRequest{Function: c.fn, Seed: seed, Timeout: spec.ExecTimeout(), Meta: c.meta, Body: c.body}
	resp, err := cl.Invoke(ctx, req)
	if err == nil {
		return outcome{resp: resp, node: node}
	}
	var re *transport.RemoteError
	switch {
	case errors.Is(err, transport.ErrBusy):
		return outcome{node: node, status: http.StatusTooManyRequests, retry: true, msg: err.Error()}
	case errors.Is(err, transport.ErrNotDeployed):
		// The node does not know the function (yet): deploy it there
		// and let the next attempt use it.
		g.rec.deployOn(ctx, g.sched.info(n), spec)
		return outcome{node: node, status: http.StatusServiceUnavailable, retry: true, msg: err.Error()}
	case errors.As(err, &re):
		// The node answered: the invocation failed there (e.g. the
		// seed's node is unreachable from it).
		return outcome{node: node, status: http.StatusBadGateway, msg: fmt.Sprintf("node %s: %s", node, re.Msg)}
	case ctx.Err() != nil:
		return outcome{node: node, status: 499, msg: "client went away"}
	}
	// No answer: the node died or is unreachable. The invocation may have
	// run; it is not retried (invocations are not assumed idempotent).
	g.sched.markDown(n)
	g.log.Warn("node failed during an invocation", "node", node, "function", c.fn, "err", err)
	return outcome{node: node, status: http.StatusBadGateway, msg: fmt.Sprintf("node %s failed during the invocation: %v", node, err)}
}

// waitSeed returns NODE/SEED of a live seed of the current generation of a
// fork function, waiting (bounded) while the reconciler makes one.
func (g *Gateway) waitSeed(ctx context.Context, spec function.Spec) (string, error) {
	deadline := time.NewTimer(seedWait)
	defer deadline.Stop()
	for {
		ch := g.view.Changed()
		ref, initErr := g.seedRef(spec)
		if ref != "" {
			return ref, nil
		}
		if initErr != "" {
			return "", fmt.Errorf("function %s: %w: %s", spec.Name, function.ErrInit, initErr)
		}
		g.rec.kick()
		select {
		case <-ch:
		case <-time.After(100 * time.Millisecond):
		case <-deadline.C:
			return "", fmt.Errorf("function %s has no live seed (its initialization is still running, or no node could make one)", spec.Name)
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
}

// seedRef picks the seed of a fork function: the oldest live seed record of
// its generation.
func (g *Gateway) seedRef(spec function.Spec) (ref, initErr string) {
	var best *seedCandidate
	for _, s := range g.view.Seeds(spec.Name) {
		if s.Generation != spec.Generation {
			continue
		}
		n := g.sched.node(s.Node)
		if n == nil || time.Now().Before(n.downUntil) {
			continue
		}
		if best == nil || s.Created.Before(best.created) {
			best = &seedCandidate{ref: s.Node + "/" + s.SeedID, created: s.Created}
		}
	}
	if best != nil {
		return best.ref, ""
	}
	return "", g.rec.initError(spec.Name, spec.Generation)
}

type seedCandidate struct {
	ref     string
	created time.Time
}

// ---- async ----

// asyncCall is a queued async invocation.
type asyncCall struct {
	c        *call
	id       string
	callback string
	// owner is the session lease it is filed under in the directory
	// (directory.PutAsync; 0: kept in memory only).
	owner directory.Owner
}

// asyncRecord is what the directory holds of an async invocation: enough
// for another gateway to run it if this one dies.
type asyncRecord struct {
	Fn       string    `json:"fn"`
	Meta     []byte    `json:"meta"`
	Body     []byte    `json:"body"`
	Seed     string    `json:"seed,omitempty"`
	Callback string    `json:"callback,omitempty"`
	Start    time.Time `json:"start"`
}

// fileAsync files an accepted async invocation in the directory, so that
// another gateway runs it if this one dies before it is done; one too
// large, or one the directory does not take, stays in memory only.
func (g *Gateway) fileAsync(ctx context.Context, a *asyncCall) {
	owner := g.runSession.Owner()
	if owner == 0 || g.cfg.AsyncMemoryOnly {
		return
	}
	b, _ := json.Marshal(asyncRecord{Fn: a.c.fn, Meta: a.c.meta, Body: a.c.body, Seed: a.c.seed, Callback: a.callback, Start: a.c.start})
	if len(b) > directory.MaxAsyncRecord {
		return
	}
	if err := g.dir.PutAsync(ctx, owner, a.id, b); err != nil {
		g.log.Warn("async invocation kept in memory only: the directory did not take it", "call_id", a.id, "err", err)
		return
	}
	a.owner = owner
	g.asyncFiled.Add(1)
}

// doneAsync removes a finished async invocation's record.
func (g *Gateway) doneAsync(a asyncCall) {
	if a.owner == 0 {
		return
	}
	g.asyncFiled.Add(-1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := g.dir.DoneAsync(ctx, a.owner, a.id); err != nil {
		g.log.Warn("async invocation done, but its record stays: another gateway may run it again", "call_id", a.id, "err", err)
	}
}

// claimAsync runs the async invocations of gateways that are gone
// (directory.ClaimAsync), as many as the queue has room for.
func (g *Gateway) claimAsync() {
	owner := g.runSession.Owner()
	free := cap(g.async) - len(g.async)
	if owner == 0 || free <= 0 {
		return
	}
	ctx, cancel := context.WithTimeout(g.ctx, 10*time.Second)
	claimed, err := g.dir.ClaimAsync(ctx, owner, min(free, 256))
	cancel()
	if err != nil {
		return
	}
	for _, c := range claimed {
		var rec asyncRecord
		if err := json.Unmarshal(c.Rec, &rec); err != nil || rec.Fn == "" {
			g.log.Warn("dropping a malformed async invocation record", "call_id", c.ID, "err", err)
			_ = g.dir.DoneAsync(g.ctx, owner, c.ID)
			continue
		}
		a := asyncCall{c: &call{fn: rec.Fn, meta: rec.Meta, body: rec.Body, seed: rec.Seed, start: rec.Start},
			id: c.ID, callback: rec.Callback, owner: owner}
		g.asyncPending.Add(1)
		g.asyncFiled.Add(1)
		select {
		case g.async <- a:
			g.m.asyncQueued.Inc()
			g.m.asyncClaimed.Inc()
			g.log.Info("running an async invocation of a gateway that is gone", "call_id", c.ID, "function", rec.Fn)
		case <-g.ctx.Done():
			g.asyncPending.Add(-1)
			g.asyncFiled.Add(-1)
			return // the record stays ours until our lease goes; then another claims it
		}
	}
}

// asyncClaimEvery is how often a gateway looks for the async invocations
// of gateways that are gone.
const asyncClaimEvery = 2 * time.Second

func callID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (g *Gateway) invokeAsync(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if _, ok := g.function(name); !ok {
		httpError(w, http.StatusNotFound, fmt.Sprintf("function %q not found", name))
		return
	}
	body, ok := g.readBody(w, r)
	if !ok {
		return
	}
	cb, ok := callbackURL(w, r)
	if !ok {
		return
	}
	c, err := newCall(r, name, body)
	if err != nil {
		callError(w, err)
		return
	}
	if c.stage {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("%s needs a synchronous invocation (/function/%s): its response names the seed", HeaderStage, name))
		return
	}
	id := r.Header.Get("X-Call-Id")
	if id == "" {
		id = callID()
	}
	a := asyncCall{c: c, id: id, callback: cb}
	if len(g.async) < cap(g.async) {
		g.fileAsync(r.Context(), &a)
	}
	g.asyncPending.Add(1)
	select {
	case g.async <- a:
	default:
		g.asyncPending.Add(-1)
		g.doneAsync(a)
		w.Header().Set("Retry-After", "1")
		httpError(w, http.StatusTooManyRequests, fmt.Sprintf("async queue full (%d invocations waiting)", cap(g.async)))
		return
	}
	g.m.asyncQueued.Inc()
	w.Header().Set("X-Call-Id", id)
	w.WriteHeader(http.StatusAccepted)
}

// callbackURL returns a request's X-Callback-Url ("" for none), or answers
// 400 for one that is not an http(s) URL and returns false.
func callbackURL(w http.ResponseWriter, r *http.Request) (string, bool) {
	cb := r.Header.Get("X-Callback-Url")
	if cb != "" && !strings.HasPrefix(cb, "http://") && !strings.HasPrefix(cb, "https://") {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("X-Callback-Url %q is not an http(s) URL", cb))
		return "", false
	}
	return cb, true
}

func (g *Gateway) asyncWorker() {
	defer g.wg.Done()
	hc := &http.Client{Timeout: 30 * time.Second}
	for {
		select {
		case <-g.ctx.Done():
			return
		case a := <-g.async:
			g.m.asyncQueued.Dec()
			o := g.run(g.ctx, a.c)
			if g.ctx.Err() == nil {
				if a.callback != "" {
					g.callback(hc, a, o)
				}
				g.doneAsync(a)
			} else if a.owner != 0 {
				g.asyncFiled.Add(-1) // left for another gateway
			}
			g.asyncPending.Add(-1)
		}
	}
}

// drainAsync waits, up to Config.AsyncDrain, for the async invocations
// accepted to be done; it logs and counts those it gives up on, which the
// closing gateway then drops (queued) or cancels (running: their
// instances end on the nodes).
func (g *Gateway) drainAsync() {
	d := g.cfg.AsyncDrain
	if g.asyncPending.Load() == 0 {
		return
	}
	start := time.Now()
	g.log.Info("finishing the async invocations accepted before stopping", "pending", g.asyncPending.Load(), "timeout", d)
	for g.asyncPending.Load() > 0 {
		if d <= 0 || time.Since(start) >= d {
			n, filed := g.asyncPending.Load(), g.asyncFiled.Load()
			g.m.asyncDropped.Add(float64(n - filed))
			g.log.Warn("async invocations not finished at shutdown: the drain timeout ran out (--async-drain-timeout)",
				"handed_over", filed, "dropped", n-filed, "queued", len(g.async), "timeout", d)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	g.log.Info("async invocations finished before stopping", "took", time.Since(start).Round(time.Millisecond))
}

// callback posts an async invocation's result to its X-Callback-Url, with
// the OpenFaaS queue worker's headers.
func (g *Gateway) callback(hc *http.Client, a asyncCall, o outcome) {
	status := o.status
	body := []byte(o.msg)
	if o.msg == "" {
		status, body = o.resp.Status, o.resp.Body
		if status >= 500 && len(body) == 0 {
			body = []byte(o.resp.Error)
		}
	}
	g.postCallback(g.ctx, hc, a.callback, body, http.Header{
		"X-Call-Id":          {a.id},
		"X-Function-Name":    {a.c.fn},
		"X-Function-Status":  {strconv.Itoa(status)},
		"X-Duration-Seconds": {strconv.FormatFloat(time.Since(a.c.start).Seconds(), 'f', 6, 64)},
		"X-Start-Time":       {strconv.FormatInt(a.c.start.UnixNano(), 10)},
	}, "function", a.c.fn)
}

// postCallback POSTs body with header h to an X-Callback-Url, counting the
// outcome (mitosis_gateway_callbacks_total) and logging a failure with
// what (key-value pairs naming the call).
func (g *Gateway) postCallback(ctx context.Context, hc *http.Client, url string, body []byte, h http.Header, what ...any) {
	what = append(what, "call_id", h.Get("X-Call-Id"), "url", url)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		g.log.Warn("async callback", append(what, "err", err)...)
		return
	}
	req.Header = h
	resp, err := hc.Do(req)
	if err != nil {
		g.m.callbacks.WithLabelValues("error").Inc()
		g.log.Warn("async callback", append(what, "err", err)...)
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	g.m.callbacks.WithLabelValues(strconv.Itoa(resp.StatusCode / 100 * 100)).Inc()
}
