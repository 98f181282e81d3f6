package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/directory"
	"github.com/mitosis-fork/mitosis/function"
	"github.com/mitosis-fork/mitosis/node"
)

// The reconciler keeps the nodes in line with the directory's functions:
// every live node has every function deployed at its current generation;
// a fork function has exactly one seed in the cluster (made on the
// least-loaded live node when it has none: at deploy, and again when its
// seed's node dies), a local-fork function one on every node; a deleted
// function is removed from the nodes. It runs on every directory change
// and once a second.

// Bounds of reconciliation calls.
const (
	deployTimeout = function.DefaultInitTimeout + 10*time.Second
	removeTimeout = 30 * time.Second
	// initRetry is how long a failed initialization is left alone before
	// the reconciler tries the same generation again.
	initRetry = 30 * time.Second
)

type reconciler struct {
	g *Gateway

	mu sync.Mutex
	// deployed[node][fn] is the generation deployed there, with seedOn
	// when that node holds its seed; started[node] the node's start time
	// they were deployed to (a restarted node has nothing).
	deployed map[string]map[string]deployment
	started  map[string]time.Time
	initErrs map[string]initFailure // by function
	locks    map[string]*sync.Mutex // one reconciliation of a function at a time
	running  bool
	again    bool
}

type deployment struct {
	gen  int64
	seed bool
}

type initFailure struct {
	gen int64
	msg string
	at  time.Time
}

func newReconciler(g *Gateway) *reconciler {
	return &reconciler{g: g, deployed: map[string]map[string]deployment{}, started: map[string]time.Time{},
		initErrs: map[string]initFailure{}, locks: map[string]*sync.Mutex{}}
}

// kick asks for a reconciliation soon.
func (r *reconciler) kick() {
	go r.run(r.g.ctx)
}

// initError is the initialization failure of a function's generation, if
// its last seed attempt failed.
func (r *reconciler) initError(fn string, gen int64) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if f, ok := r.initErrs[fn]; ok && f.gen == gen {
		return f.msg
	}
	return ""
}

// functionRecord is a function as the gateway keeps it.
type functionRecord struct {
	stored
	Created time.Time
}

// function returns a deployed function from the directory's view, with its
// spec's generation set to the record's revision.
func (g *Gateway) function(name string) (functionRecord, bool) {
	f, ok := g.view.Function(name)
	if !ok {
		return functionRecord{}, false
	}
	fr, err := decodeRecord(f)
	if err != nil {
		g.log.Warn("undecodable function record", "function", name, "err", err)
		return functionRecord{}, false
	}
	return fr, true
}

func decodeRecord(f directory.Function) (functionRecord, error) {
	var st stored
	if err := json.Unmarshal(f.Spec, &st); err != nil {
		return functionRecord{}, fmt.Errorf("function %s: %w", f.Name, err)
	}
	st.Spec.Generation = f.Revision
	return functionRecord{stored: st, Created: f.Created}, nil
}

// run reconciles once; concurrent calls fold into one more round.
func (r *reconciler) run(ctx context.Context) {
	r.mu.Lock()
	if r.running {
		r.again = true
		r.mu.Unlock()
		return
	}
	r.running = true
	r.mu.Unlock()
	for {
		r.round(ctx)
		r.mu.Lock()
		if !r.again || ctx.Err() != nil {
			r.running = false
			r.mu.Unlock()
			return
		}
		r.again = false
		r.mu.Unlock()
	}
}

// round is one pass over every function.
func (r *reconciler) round(ctx context.Context) {
	g := r.g
	nodes := g.view.Nodes()
	live := map[string]directory.NodeInfo{}
	for _, n := range nodes {
		if st := g.sched.node(n.Name); st != nil && time.Now().Before(st.downUntil) {
			continue
		}
		live[n.Name] = n
	}
	r.mu.Lock()
	for name := range r.deployed {
		if n, ok := live[name]; !ok || !n.Started.Equal(r.started[name]) {
			delete(r.deployed, name) // gone or restarted: nothing of ours there
		}
	}
	for name, n := range live {
		if r.deployed[name] == nil {
			r.deployed[name] = map[string]deployment{}
			r.started[name] = n.Started
		}
	}
	r.mu.Unlock()
	fns := map[string]functionRecord{}
	for _, f := range g.view.Functions() {
		fr, err := decodeRecord(f)
		if err == nil {
			fns[f.Name] = fr
		}
	}
	var wg sync.WaitGroup
	for _, fr := range fns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.reconcile(ctx, fr.Spec, live)
		}()
	}
	// Functions deleted from the directory leave the nodes.
	r.mu.Lock()
	var stale [][2]string
	for nodeName, fs := range r.deployed {
		for fn := range fs {
			if _, ok := fns[fn]; !ok {
				stale = append(stale, [2]string{nodeName, fn})
			}
		}
	}
	r.mu.Unlock()
	for _, s := range stale {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.removeOn(ctx, live[s[0]], s[1])
		}()
	}
	wg.Wait()
}

// reconcile brings one function in line on the live nodes and returns its
// seed node's answer when it made a seed.
func (r *reconciler) reconcile(ctx context.Context, spec function.Spec, live map[string]directory.NodeInfo) {
	g := r.g
	r.mu.Lock()
	l := r.locks[spec.Name]
	if l == nil {
		l = &sync.Mutex{}
		r.locks[spec.Name] = l
	}
	r.mu.Unlock()
	l.Lock()
	defer l.Unlock()
	seedNodes := map[string]bool{}
	switch spec.Policy {
	case function.PolicyLocalFork:
		for name := range live {
			seedNodes[name] = true
		}
	case function.PolicyFork:
		var cur []directory.SeedRecord
		for _, s := range g.view.Seeds(spec.Name) {
			if _, ok := live[s.Node]; ok && s.Generation == spec.Generation {
				cur = append(cur, s)
			}
		}
		sort.Slice(cur, func(i, j int) bool { return cur[i].Created.Before(cur[j].Created) })
		if len(cur) > 0 {
			seedNodes[cur[0].Node] = true
			// One seed per function: drop extras (e.g. two gateways
			// raced); their nodes keep the function, seedless.
			for _, s := range cur[1:] {
				r.dropSeed(ctx, live[s.Node], spec)
			}
		} else if n := r.seededOn(spec, live); n != "" {
			// Made by us a moment ago; its record is on its way.
			seedNodes[n] = true
		} else if r.mayInit(spec) {
			if n, ok := r.pickSeedNode(live); ok {
				seedNodes[n] = true
			}
		}
	}
	var wg sync.WaitGroup
	for name, n := range live {
		want := deployment{gen: spec.Generation, seed: seedNodes[name]}
		r.mu.Lock()
		have, ok := r.deployed[name][spec.Name]
		r.mu.Unlock()
		if ok && have.gen == want.gen && (have.seed || !want.seed) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.deploy(ctx, n, spec, want.seed)
		}()
	}
	wg.Wait()
}

// seededOn is a live node this gateway deployed spec's seed on.
func (r *reconciler) seededOn(spec function.Spec, live map[string]directory.NodeInfo) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	for name := range live {
		if d, ok := r.deployed[name][spec.Name]; ok && d.gen == spec.Generation && d.seed {
			return name
		}
	}
	return ""
}

// mayInit reports whether a seed may be (re)made for spec's generation now.
func (r *reconciler) mayInit(spec function.Spec) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	f, ok := r.initErrs[spec.Name]
	return !ok || f.gen != spec.Generation || time.Since(f.at) > initRetry
}

// pickSeedNode chooses where a fork function's seed goes: the live node
// with the lowest load in the directory.
func (r *reconciler) pickSeedNode(live map[string]directory.NodeInfo) (string, bool) {
	best, bestLoad := "", -1.0
	names := make([]string, 0, len(live))
	for n := range live {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		n := live[name]
		c := max(n.Capacity.Concurrency, 1)
		load := float64(n.Load.Running) / float64(c)
		if bestLoad < 0 || load < bestLoad {
			best, bestLoad = name, load
		}
	}
	return best, best != ""
}

// deploy deploys spec on node n (with its seed if seed).
func (r *reconciler) deploy(ctx context.Context, n directory.NodeInfo, spec function.Spec, seed bool) (node.FunctionInfo, error) {
	g := r.g
	cl, err := g.peers.client(ctx, n.Name, n.PeerAddr)
	if err != nil {
		return node.FunctionInfo{}, err
	}
	body, err := json.Marshal(node.DeployRequest{Spec: spec, Seed: seed, Directory: true})
	if err != nil {
		return node.FunctionInfo{}, err
	}
	start := time.Now()
	out, err := cl.Call(ctx, node.CallFnDeploy, body, deployTimeout)
	if err != nil {
		g.log.Warn("deploy on node failed", "function", spec.Name, "node", n.Name, "seed", seed, "err", err)
		return node.FunctionInfo{}, err
	}
	var info node.FunctionInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return node.FunctionInfo{}, fmt.Errorf("node %s: malformed deploy answer: %w", n.Name, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if seed && info.InitError != "" {
		r.initErrs[spec.Name] = initFailure{gen: spec.Generation, msg: info.InitError, at: time.Now()}
		g.log.Warn("function initialization failed", "function", spec.Name, "node", n.Name, "err", info.InitError)
		seed = false
	} else if seed {
		delete(r.initErrs, spec.Name)
		g.log.Info("function seed ready", "function", spec.Name, "node", n.Name, "seed", info.Seed,
			"init_ms", info.InitMS, "prepare_ms", info.PrepareMS, "took", time.Since(start))
	}
	if r.deployed[n.Name] != nil && n.Started.Equal(r.started[n.Name]) {
		r.deployed[n.Name][spec.Name] = deployment{gen: spec.Generation, seed: seed || info.Seed != ""}
	}
	return info, nil
}

// deployOn deploys spec on a node that said it does not have it.
func (r *reconciler) deployOn(ctx context.Context, n directory.NodeInfo, spec function.Spec) {
	r.mu.Lock()
	if fs := r.deployed[n.Name]; fs != nil {
		delete(fs, spec.Name)
	}
	r.mu.Unlock()
	seed := spec.Policy == function.PolicyLocalFork
	_, _ = r.deploy(ctx, n, spec, seed)
}

// dropSeed removes an extra seed of a fork function from a node.
func (r *reconciler) dropSeed(ctx context.Context, n directory.NodeInfo, spec function.Spec) {
	r.removeOn(ctx, n, spec.Name)
	_, _ = r.deploy(ctx, n, spec, false)
}

// removeOn removes a function from a node.
func (r *reconciler) removeOn(ctx context.Context, n directory.NodeInfo, fn string) {
	g := r.g
	// The node removes the function's stage seeds with it.
	g.sched.dropStages(n.Name, fn, "")
	defer func() {
		r.mu.Lock()
		if fs := r.deployed[n.Name]; fs != nil {
			delete(fs, fn)
		}
		r.mu.Unlock()
	}()
	if n.Name == "" {
		return
	}
	cl, err := g.peers.client(ctx, n.Name, n.PeerAddr)
	if err != nil {
		return
	}
	body, _ := json.Marshal(node.RemoveRequest{Name: fn})
	if _, err := cl.Call(ctx, node.CallFnRemove, body, removeTimeout); err != nil && !strings.Contains(err.Error(), "is not deployed") {
		g.log.Warn("remove from node failed", "function", fn, "node", n.Name, "err", err)
	}
}

// ensure reconciles one function now (deploy and update requests wait for
// it) and reports its seed's initialization error, if any.
func (r *reconciler) ensure(ctx context.Context, spec function.Spec) error {
	g := r.g
	live := map[string]directory.NodeInfo{}
	for _, n := range g.view.Nodes() {
		live[n.Name] = n
	}
	if len(live) == 0 {
		return nil // deployed when nodes appear
	}
	r.mu.Lock()
	for name, n := range live {
		if r.deployed[name] == nil || !n.Started.Equal(r.started[name]) {
			r.deployed[name] = map[string]deployment{}
			r.started[name] = n.Started
		}
	}
	delete(r.initErrs, spec.Name)
	r.mu.Unlock()
	r.reconcile(ctx, spec, live)
	if msg := r.initError(spec.Name, spec.Generation); msg != "" {
		return fmt.Errorf("%s", msg)
	}
	return nil
}
