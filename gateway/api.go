package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/directory"
	"github.com/mitosis-fork/mitosis/node"
)

// Version is reported by /system/info.
var Version = "dev"

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func (g *Gateway) info(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{
		"provider":      map[string]any{"provider": "mitosis", "orchestration": "mitosis", "version": map[string]string{"release": Version}},
		"version":       map[string]string{"release": Version},
		"arch":          "x86_64",
		"orchestration": "mitosis",
	})
}

// namespaces serves GET /system/namespaces: the one namespace functions
// live in (faas-cli namespaces list).
func (g *Gateway) namespaces(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, []string{Namespace})
}

// readDeployment decodes a deployment body.
func (g *Gateway) readDeployment(w http.ResponseWriter, r *http.Request) (FunctionDeployment, []byte, bool) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
	if err != nil {
		httpError(w, http.StatusRequestEntityTooLarge, "deployment body too large (limit 1 MiB)")
		return FunctionDeployment{}, nil, false
	}
	var d FunctionDeployment
	if err := decodeJSON(b, &d); err != nil {
		httpError(w, http.StatusBadRequest, "malformed deployment: "+err.Error())
		return FunctionDeployment{}, nil, false
	}
	spec, err := specOf(&d, g.cfg.DefaultPolicy)
	if err != nil {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("deploy %s: %v", d.Service, err))
		return FunctionDeployment{}, nil, false
	}
	rec, err := json.Marshal(stored{Deployment: d, Spec: spec})
	if err != nil {
		httpError(w, http.StatusInternalServerError, err.Error())
		return FunctionDeployment{}, nil, false
	}
	return d, rec, true
}

// deployFunction: POST /system/functions. The function is stored in the
// directory and deployed on the nodes; the answer waits for its seed (fork
// policies), so an initialization error reaches the deployer: 500 with the
// traceback's last line (the function stays deployed, broken, until it is
// updated or deleted).
func (g *Gateway) deployFunction(w http.ResponseWriter, r *http.Request) {
	g.putFunction(w, r, false)
}

// updateFunction: PUT /system/functions (a new generation replaces every
// instance and seed of the old one).
func (g *Gateway) updateFunction(w http.ResponseWriter, r *http.Request) {
	g.putFunction(w, r, true)
}

func (g *Gateway) putFunction(w http.ResponseWriter, r *http.Request, update bool) {
	d, rec, ok := g.readDeployment(w, r)
	if !ok {
		return
	}
	ttl, _ := ttlOf(&d) // checked by readDeployment
	g.deployMu.Lock()
	var f directory.Function
	var err error
	switch {
	case update:
		// The deployment's TTL, from now, under a new lease if it
		// changed (none: the function lives until deleted).
		f, err = g.dir.UpdateFunctionTTL(r.Context(), d.Service, rec, ttl)
	case ttl > 0:
		f, err = g.dir.CreateFunctionTTL(r.Context(), d.Service, rec, ttl)
	default:
		f, err = g.dir.CreateFunction(r.Context(), d.Service, rec)
	}
	g.deployMu.Unlock()
	switch {
	case errors.Is(err, directory.ErrExists):
		httpError(w, http.StatusConflict, fmt.Sprintf("function %q already exists; update it with PUT /system/functions", d.Service))
		return
	case errors.Is(err, directory.ErrNotFound):
		httpError(w, http.StatusNotFound, fmt.Sprintf("function %q not found", d.Service))
		return
	case err != nil:
		httpError(w, http.StatusInternalServerError, "store function: "+err.Error())
		return
	}
	fr, err := decodeRecord(f)
	if err != nil {
		httpError(w, http.StatusInternalServerError, err.Error())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), deployTimeout)
	defer cancel()
	start := time.Now()
	if err := g.rec.ensure(ctx, fr.Spec); err != nil {
		g.log.Warn("deploy: initialization failed", "function", d.Service, "err", err)
		httpError(w, http.StatusInternalServerError, fmt.Sprintf("function %s deployed, but its initialization failed: %v", d.Service, err))
		return
	}
	if update {
		// A new generation replaces the old one's stage seeds too.
		g.sched.dropStages("", d.Service, "")
		g.dropStageLeases(ctx, d.Service)
	}
	g.log.Info("deploy", "function", d.Service, "policy", fr.Spec.Policy, "generation", fr.Spec.Generation, "update", update, "took", time.Since(start))
	w.WriteHeader(http.StatusAccepted)
}

// renewFunction: PATCH /system/functions {"functionName": NAME} renews a
// function deployed with a TTL (AnnotationTTL) for its TTL from now: 202;
// 404 when it does not exist (deleted, or its TTL ran out); 409 when it
// has no TTL; 400 for a malformed request.
func (g *Gateway) renewFunction(w http.ResponseWriter, r *http.Request) {
	var req RenewFunctionRequest
	if err := readSmallJSON(w, r, &req); err != nil || req.FunctionName == "" {
		httpError(w, http.StatusBadRequest, `malformed request: want {"functionName": "NAME"}`)
		return
	}
	err := g.dir.RenewFunction(r.Context(), req.FunctionName)
	switch {
	case err == nil:
		w.WriteHeader(http.StatusAccepted)
	case errors.Is(err, directory.ErrNotFound):
		httpError(w, http.StatusNotFound, fmt.Sprintf("function %q not found (deleted, or its TTL ran out)", req.FunctionName))
	case errors.Is(err, directory.ErrNoTTL):
		httpError(w, http.StatusConflict, fmt.Sprintf("function %q was deployed without a TTL (%s); it lives until deleted", req.FunctionName, AnnotationTTL))
	default:
		httpError(w, http.StatusBadGateway, err.Error())
	}
}

// readSmallJSON decodes a request body of at most 64 KiB into v.
func readSmallJSON(w http.ResponseWriter, r *http.Request, v any) error {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 64<<10))
	if err != nil {
		return err
	}
	return decodeJSON(b, v)
}

// deleteFunction: DELETE /system/functions {"functionName": NAME}.
func (g *Gateway) deleteFunction(w http.ResponseWriter, r *http.Request) {
	var req DeleteFunctionRequest
	if err := readSmallJSON(w, r, &req); err != nil || req.FunctionName == "" {
		httpError(w, http.StatusBadRequest, `malformed delete request: want {"functionName": "NAME"}`)
		return
	}
	g.deployMu.Lock()
	err := g.dir.DeleteFunction(r.Context(), req.FunctionName)
	g.deployMu.Unlock()
	if errors.Is(err, directory.ErrNotFound) {
		httpError(w, http.StatusNotFound, fmt.Sprintf("function %q not found", req.FunctionName))
		return
	}
	if err != nil {
		httpError(w, http.StatusInternalServerError, "delete function: "+err.Error())
		return
	}
	// Remove it from the nodes now rather than on the next round.
	ctx, cancel := context.WithTimeout(r.Context(), removeTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, n := range g.view.Nodes() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.rec.removeOn(ctx, n, req.FunctionName)
		}()
	}
	wg.Wait()
	g.dropStageLeases(ctx, req.FunctionName)
	g.log.Info("delete", "function", req.FunctionName)
	w.WriteHeader(http.StatusAccepted)
}

// dropStageLeases deletes the directory leases of fn's stage seeds, which
// went with the function (they are not expiries).
func (g *Gateway) dropStageLeases(ctx context.Context, fn string) {
	for _, l := range g.view.StageLeases() {
		if l.Function != fn {
			continue
		}
		g.stageMu.Lock()
		g.stageGone[l.Ref] = time.Now()
		g.stageMu.Unlock()
		if err := g.dir.DeleteStageLease(ctx, fn, l.Ref); err != nil {
			g.log.Warn("delete function: a stage seed's lease stays until it runs out", "function", fn, "seed", l.Ref, "err", err)
		}
	}
}

// renewStageSeed renews a stage seed's lease (gwapi.RenewStageSeedRequest)
// in the directory, so any gateway can: 202, or 404 when the seed has no
// lease (unknown, made without a TTL, removed, or expired already), 400
// for a malformed request.
func (g *Gateway) renewStageSeed(w http.ResponseWriter, r *http.Request) {
	var req RenewStageSeedRequest
	if err := readSmallJSON(w, r, &req); err != nil || req.FunctionName == "" || req.Seed == "" || req.TTL == "" {
		httpError(w, http.StatusBadRequest, `malformed request: want {"functionName": "NAME", "seed": "NODE/SEED", "ttl": "2m"}`)
		return
	}
	if err := checkSeedRef(req.Seed); err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	ttl, err := parseTTL("ttl", req.TTL)
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	ok, err := g.dir.RenewStageLease(r.Context(), req.FunctionName, req.Seed, ttl)
	switch {
	case err != nil:
		httpError(w, http.StatusBadGateway, fmt.Sprintf("renew stage seed %s: %v", req.Seed, err))
	case !ok:
		httpError(w, http.StatusNotFound, fmt.Sprintf("stage seed %s of function %q has no lease (unknown, made without a TTL, removed, or its TTL ran out)", req.Seed, req.FunctionName))
	default:
		w.WriteHeader(http.StatusAccepted)
	}
}

// deleteStageSeed removes a stage seed: on its node the seed and the
// instance it was made of, on every other live node its import and page
// cache. 202 once the seed's node removed it; 404 for an unknown function;
// 502 when the seed's node is unreachable or failed (the seed may remain:
// the function's removal removes it too).
func (g *Gateway) deleteStageSeed(w http.ResponseWriter, r *http.Request) {
	var req DeleteStageSeedRequest
	if err := readSmallJSON(w, r, &req); err != nil || req.FunctionName == "" || req.Seed == "" {
		httpError(w, http.StatusBadRequest, `malformed request: want {"functionName": "NAME", "seed": "NODE/SEED"}`)
		return
	}
	if err := checkSeedRef(req.Seed); err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	if _, ok := g.function(req.FunctionName); !ok {
		httpError(w, http.StatusNotFound, fmt.Sprintf("function %q not found", req.FunctionName))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), removeTimeout)
	defer cancel()
	found, ownerErr := g.removeStageSeed(ctx, req.FunctionName, req.Seed)
	owner, _, _ := strings.Cut(req.Seed, "/")
	switch {
	case !found:
		httpError(w, http.StatusBadGateway, fmt.Sprintf("node %s of seed %s is not live", owner, req.Seed))
	case ownerErr != nil:
		httpError(w, http.StatusBadGateway, fmt.Sprintf("node %s: remove seed %s: %v", owner, req.Seed, ownerErr))
	default:
		w.WriteHeader(http.StatusAccepted)
	}
}

// removeStageSeed removes stage seed ref (NODE/SEED) of function fn on
// every node (the seed and its instance on NODE, imports elsewhere), its
// lease in the directory, and, once its node removed it, its memory
// reservation. It reports whether the seed's node was live, and that
// node's error.
func (g *Gateway) removeStageSeed(ctx context.Context, fn, ref string) (found bool, ownerErr error) {
	g.stageMu.Lock()
	g.stageGone[ref] = time.Now() // its lease's disappearance is ours
	g.stageMu.Unlock()
	owner, _, _ := strings.Cut(ref, "/")
	body, _ := json.Marshal(node.StageRemoveRequest{Function: fn, Seed: ref})
	for _, a := range g.callNodes(ctx, g.view.Nodes(), node.CallFnStageRemove, removeTimeout, func(directory.NodeInfo) []byte { return body }) {
		found = found || a.node == owner
		if a.err != nil {
			g.log.Warn("remove stage seed", "node", a.node, "function", fn, "seed", ref, "err", a.err)
			if a.node == owner {
				ownerErr = a.err
			}
		}
	}
	if found && ownerErr == nil {
		g.sched.dropStages(owner, fn, ref)
	}
	if err := g.dir.DeleteStageLease(ctx, fn, ref); err != nil {
		g.log.Warn("remove stage seed: its lease stays until it expires", "function", fn, "seed", ref, "err", err)
	}
	return found, ownerErr
}

// leaseStage records stage seed ref of fn in the directory under a lease
// of ttl (X-Mitosis-Stage-TTL). Any gateway on the directory renews it
// (PATCH /system/stage-seeds); when it expires, every gateway's view sees
// it go and removes the seed (expireStages).
func (g *Gateway) leaseStage(fn, ref string, mem int64, ttl time.Duration) error {
	ctx, cancel := context.WithTimeout(g.ctx, removeTimeout)
	defer cancel()
	return g.dir.PutStageLease(ctx, fn, ref, mem, ttl)
}

// expireStages follows the stage seed leases of the directory (called from
// watch): it counts the memory of every leased stage seed in placement,
// whichever gateway made it (so every replica, and this one after a
// restart, sees what the seeds hold), and removes the stage seeds whose
// lease went since the last call without this gateway removing them (their
// TTL ran out, or another gateway removed them: removal is idempotent). A
// removal that fails (the seed's node unreachable) is tried again every
// call until it succeeds, the node leaves the directory, or
// stageRetryFor passed; the node removes the seed itself meanwhile
// (node/dirsweep.go), the retries release this gateway's reservation and
// the other nodes' imports.
func (g *Gateway) expireStages() {
	now := map[string]directory.StageLease{}
	for _, l := range g.view.StageLeases() {
		now[l.Ref] = l
	}
	g.stageMu.Lock()
	var gone []directory.StageLease
	for ref, l := range g.stageLeases {
		if _, ok := now[ref]; !ok {
			owner, _, _ := strings.Cut(ref, "/")
			if _, ours := g.stageGone[ref]; ours {
				g.sched.dropStages(owner, l.Function, ref) // an adoption may have raced our removal
			} else {
				gone = append(gone, l)
			}
		}
	}
	for _, r := range g.stageRetry {
		if !r.busy {
			r.busy = true
			gone = append(gone, r.lease)
		}
	}
	for ref, l := range now {
		if _, ours := g.stageGone[ref]; ours || l.Memory <= 0 {
			continue
		}
		owner, _, _ := strings.Cut(ref, "/")
		if n := g.sched.node(owner); n != nil {
			g.sched.keepStage(n, l.Function, ref, l.Memory) // no-op if counted already
		}
	}
	g.stageLeases = now
	for ref, t := range g.stageGone { // remembered long enough to see their lease go
		if time.Since(t) > time.Minute {
			delete(g.stageGone, ref)
		}
	}
	if g.ctx.Err() != nil {
		g.stageMu.Unlock()
		return
	}
	g.wg.Add(len(gone))
	g.stageMu.Unlock()
	for _, l := range gone {
		go func() {
			defer g.wg.Done()
			g.expireStage(l)
		}()
	}
}

// stageRetryFor bounds how long a gateway retries removing an expired
// stage seed whose node does not answer.
const stageRetryFor = 10 * time.Minute

// stageRetry is an expired stage seed whose removal failed, tried again by
// expireStages.
type stageRetry struct {
	lease directory.StageLease
	since time.Time // the first failure
	busy  bool      // a removal is in flight
}

// expireStage removes stage seed l, whose lease ran out, and records a
// failure for expireStages to try again.
func (g *Gateway) expireStage(l directory.StageLease) {
	ctx, cancel := context.WithTimeout(g.ctx, removeTimeout)
	defer cancel()
	found, err := g.removeStageSeed(ctx, l.Function, l.Ref)
	g.stageMu.Lock()
	defer g.stageMu.Unlock()
	r := g.stageRetry[l.Ref]
	owner, _, _ := strings.Cut(l.Ref, "/")
	switch {
	case found && err == nil:
		delete(g.stageRetry, l.Ref)
		g.m.expired.Inc()
		g.log.Info("stage seed's lease ran out; removed", "function", l.Function, "seed", l.Ref, "ttl_s", l.TTL, "retried", r != nil)
	case !found || (r != nil && time.Since(r.since) > stageRetryFor):
		// Its node left the directory (its seeds are not placed on, and
		// it removes them itself when it returns: node/dirsweep.go),
		// or it did not answer for stageRetryFor: stop counting it.
		delete(g.stageRetry, l.Ref)
		g.sched.dropStages(owner, l.Function, l.Ref)
		g.log.Warn("stage seed's lease ran out; its node did not remove it, and removes it itself when it can", "function", l.Function, "seed", l.Ref, "node live", found, "err", err)
	case r == nil:
		g.stageRetry[l.Ref] = &stageRetry{lease: l, since: time.Now()}
		g.log.Warn("stage seed's lease ran out; removing it failed, retrying every second", "function", l.Function, "seed", l.Ref, "ttl_s", l.TTL, "err", err)
	default:
		r.busy = false
	}
}

// nodeAnswer is one node's answer to a control call made on many nodes.
type nodeAnswer struct {
	node string
	body []byte
	err  error
}

// callNodes makes control call op on every node of ns at once, with the
// request body(n) (body nil: none), within ctx and timeout, and returns the
// answers in the order of ns.
func (g *Gateway) callNodes(ctx context.Context, ns []directory.NodeInfo, op string, timeout time.Duration, body func(directory.NodeInfo) []byte) []nodeAnswer {
	out := make([]nodeAnswer, len(ns))
	var wg sync.WaitGroup
	for i, n := range ns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i].node = n.Name
			cl, err := g.peers.client(ctx, n.Name, n.PeerAddr)
			if err == nil {
				var b []byte
				if body != nil {
					b = body(n)
				}
				out[i].body, err = cl.Call(ctx, op, b, timeout)
			}
			out[i].err = err
		}()
	}
	wg.Wait()
	return out
}

// nodeFunctions asks every live node for its functions (bounded); a node
// that does not answer is left out.
func (g *Gateway) nodeFunctions(ctx context.Context, op string) map[string][]node.FunctionInfo {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	out := map[string][]node.FunctionInfo{}
	for _, a := range g.callNodes(ctx, g.view.Nodes(), op, 2*time.Second, nil) {
		if a.err != nil {
			continue
		}
		var fns []node.FunctionInfo
		if op == node.CallNodeStats {
			var st node.NodeStats
			if json.Unmarshal(a.body, &st) != nil {
				continue
			}
			fns = st.Functions
		} else if json.Unmarshal(a.body, &fns) != nil {
			continue
		}
		out[a.node] = fns
	}
	return out
}

// status builds a function's OpenFaaS status from its record and what the
// nodes report.
func status(fr functionRecord, perNode map[string][]node.FunctionInfo) FunctionStatus {
	d := fr.Deployment
	st := FunctionStatus{Name: d.Service, Image: d.Image, Namespace: Namespace, EnvProcess: d.EnvProcess,
		EnvVars: d.EnvVars, Constraints: d.Constraints, Labels: d.Labels, Annotations: d.Annotations,
		Limits: d.Limits, Requests: d.Requests, ReadOnlyRootFilesystem: d.ReadOnlyRootFilesystem, CreatedAt: fr.Created}
	seeds := uint64(0)
	for _, fns := range perNode {
		for _, in := range fns {
			if in.Name != d.Service || in.Generation != fr.Spec.Generation {
				continue
			}
			st.InvocationCount += float64(in.Invocations)
			st.Replicas += uint64(in.Running + in.Warm)
			if in.Seed != "" {
				seeds++
			}
		}
	}
	// A seeded function is available while a seed is (one seed serves any
	// number of invocations); warm and cold ones have their instances.
	st.AvailableReplicas = st.Replicas
	if fr.Spec.Policy.Seeded() {
		st.AvailableReplicas = seeds
		if st.Replicas < seeds {
			st.Replicas = seeds
		}
	} else if st.Replicas == 0 {
		st.Replicas, st.AvailableReplicas = 1, 1 // started on demand
	}
	return st
}

func (g *Gateway) listFunctions(w http.ResponseWriter, r *http.Request) {
	perNode := g.nodeFunctions(r.Context(), node.CallFnList)
	out := []FunctionStatus{}
	for _, f := range g.view.Functions() {
		fr, err := decodeRecord(f)
		if err != nil {
			continue
		}
		out = append(out, status(fr, perNode))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	writeJSON(w, http.StatusOK, out)
}

func (g *Gateway) getFunction(w http.ResponseWriter, r *http.Request) {
	fr, ok := g.function(r.PathValue("name"))
	if !ok {
		httpError(w, http.StatusNotFound, fmt.Sprintf("function %q not found", r.PathValue("name")))
		return
	}
	writeJSON(w, http.StatusOK, status(fr, g.nodeFunctions(r.Context(), node.CallFnList)))
}

// scaleFunction: POST /system/scale-function/NAME (OpenFaaS: faas-cli
// scale, autoscalers) has nothing to set here: the gateway places every
// invocation itself, on an instance it makes for it (a fork of the
// function's seed, or a warm instance under keep-alive). It answers 404
// for an unknown function and 400 saying so for a known one.
func (g *Gateway) scaleFunction(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	fr, ok := g.function(name)
	if !ok {
		httpError(w, http.StatusNotFound, fmt.Sprintf("function %q not found", name))
		return
	}
	httpError(w, http.StatusBadRequest, fmt.Sprintf("function %q (policy %s) has no replicas to scale: mitosis makes an instance per invocation "+
		"(fork: a child of the function's one seed in the cluster; local-fork: of a seed per node; keep-alive: a warm instance kept for its TTL) "+
		"on the least-loaded node with room (each node admits up to its --max-concurrency); delete the function to free its memory", name, fr.Spec.Policy))
}

// NodeStatus is an element of GET /system/nodes (a mitosis extension).
type NodeStatus struct {
	directory.NodeInfo
	Inflight int `json:"inflight"` // invocations from this gateway
	// ReservedBytes is the memory this gateway's invocations in flight
	// and stage seeds reserve on the node (of Capacity.MemoryBytes).
	ReservedBytes int64 `json:"reserved_bytes"`
	Down          bool  `json:"down"` // left out of placement after a failure
}

func (g *Gateway) listNodes(w http.ResponseWriter, r *http.Request) {
	out := []NodeStatus{}
	now := time.Now()
	for _, n := range g.sched.snapshot() {
		g.sched.mu.Lock()
		ns := NodeStatus{NodeInfo: n.info, Inflight: n.inflight, ReservedBytes: n.reserved, Down: now.Before(n.downUntil)}
		g.sched.mu.Unlock()
		out = append(out, ns)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	writeJSON(w, http.StatusOK, out)
}
