package node

// The function runtime of a node: functions deployed here (their seeds, for
// the fork policies, or pools of warm instances for keep-alive), and the
// invocations run on this node's capacity. The gateway (package gateway)
// drives it over the peer transport (Invoke and Call requests); the local
// API exposes the same operations to the CLI.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/container"
	"github.com/mitosis-fork/mitosis/function"
	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/transport"
)

// Control calls of the function runtime (peer Call requests, and local API
// ops of the same names with their body in "args").
const (
	CallFnDeploy  = "fn-deploy"
	CallFnRemove  = "fn-rm"
	CallFnList    = "fn-ls"
	CallNodeStats = "node-stats"
	// CallFnStageRemove removes a stage seed (StageRemoveRequest) and
	// every node's import of it.
	CallFnStageRemove = "fn-stage-rm"
)

// DefaultInstanceMemory is the memory an instance of a function without a
// memory limit reserves against the node's capacity.
const DefaultInstanceMemory = 128 << 20

// errNotDeployed is wrapped by invocations of a function this node does not
// have (or of a fork function it holds no seed of, without a seed named):
// a gateway deploys it and tries again.
var errNotDeployed = transport.ErrNotDeployed

// DeployRequest deploys a function on a node (CallFnDeploy).
type DeployRequest struct {
	Spec function.Spec `json:"spec"`
	// Seed asks this node to hold a seed of the function (the seed node of
	// a fork function, every node of a local-fork one). Without it the
	// node only knows the function: its invocations fork from a seed of
	// another node, or start warm/cold instances.
	Seed bool `json:"seed"`
	// Directory says the function is the cluster directory's (a gateway
	// deploys it from there, Spec.Generation being its record's
	// revision): the node removes it on its own once the directory no
	// longer has it (deleted, or its TTL ran out; dirsweep.go), so a
	// gateway that is down or cut off then leaves nothing behind.
	Directory bool `json:"directory,omitempty"`
}

// RemoveRequest removes a function from a node (CallFnRemove).
type RemoveRequest struct {
	Name string `json:"name"`
}

// StageRemoveRequest removes a stage seed of a function (CallFnStageRemove):
// on the seed's node, the seed and the instance it was made of; on every
// other node, its import and node page cache.
type StageRemoveRequest struct {
	Function string `json:"function"`
	Seed     string `json:"seed"` // NODE/SEED, as the invocation reported it
}

// FunctionInfo describes a function deployed on a node.
type FunctionInfo struct {
	Name       string `json:"name"`
	Policy     string `json:"policy"`
	Generation int64  `json:"generation"`
	Node       string `json:"node"`
	// Seed is the id of this node's seed of the function ("" if none);
	// SeedRef is NODE/SEED, how other nodes fork from it.
	Seed      string  `json:"seed,omitempty"`
	SeedRef   string  `json:"seed_ref,omitempty"`
	InitMS    float64 `json:"init_ms,omitempty"`
	PrepareMS float64 `json:"prepare_ms,omitempty"`
	// InitError is the last initialization failure (the traceback's last
	// line), while the function has no working seed.
	InitError   string `json:"init_error,omitempty"`
	Running     int    `json:"running"`
	Warm        int    `json:"warm"`
	Invocations uint64 `json:"invocations"`
	Errors      uint64 `json:"errors"`
	// MemoryBytes is Σ Pss of the function's processes on this node
	// (seed parent and frozen copy, running instances, warm instances)
	// plus the node page caches of the seeds it forks from (node-stats
	// only).
	MemoryBytes uint64 `json:"memory_bytes,omitempty"`
	CacheBytes  uint64 `json:"cache_bytes,omitempty"`
}

// NodeStats is a node's capacity, load and memory (CallNodeStats).
type NodeStats struct {
	Node           string         `json:"node"`
	MaxConcurrency int            `json:"max_concurrency"`
	MaxMemory      int64          `json:"max_memory"`
	Running        int            `json:"running"`
	Warm           int            `json:"warm"`
	Reserved       int64          `json:"reserved"`
	MemoryBytes    uint64         `json:"memory_bytes"` // Σ over functions
	Functions      []FunctionInfo `json:"functions"`
	Taken          time.Time      `json:"taken"`
}

// fnRegistry is the function runtime's state; its own lock, never held
// while taking d.mu.
type fnRegistry struct {
	d *Daemon

	mu      sync.Mutex
	fns     map[string]*fnRec
	waiters map[int]chan *seedRec // seed processes awaiting their prepare-self, by pid
	// stageWaiters are instances asked to become stage seeds, by the
	// seed name they were given.
	stageWaiters map[string]chan stagePrepared
	running      int   // invocations in progress on this node
	reserved     int64 // memory reserved by instances (running and warm)
	closed       bool
	pss          *pssCache // the stats' memory measures

	bootstrapOnce sync.Once
	bootstrap     string
	bootstrapErr  error
}

// fnRec is one function deployed on this node.
type fnRec struct {
	spec    function.Spec
	log     *fnLog // init output and the instances' stdout/stderr
	logPath string

	// The seed (fork policies, when this node holds one).
	seed      *seedRec
	parent    *function.Process
	seeding   chan struct{} // non-nil while a seed is being made; closed when done
	initErr   error
	initMS    float64
	prepareMS float64

	forkedFrom map[*seedRec]struct{} // seeds (local or imported) its children fork from
	stages     map[string]*stageRec  // stage seeds made on this node, by seed id
	kids       map[int]struct{}      // pids of running fork children
	warm       []*warmInst           // idle warm instances, most recently used last
	busy       map[*warmInst]struct{}

	running     int
	invocations uint64
	errors      uint64
	removed     bool
	// managed: deployed from the cluster directory (DeployRequest.Directory).
	managed bool
}

// stageRec is a stage seed: an instance of the function kept, once it
// answered, as a seed later invocations fork from (function.Request.Stage).
// Its parent is that instance, paused in the runtime until the stage seed
// is removed.
type stageRec struct {
	seed   *seedRec
	parent *childRec
	// reserved is the memory the parent instance keeps reserved on this
	// node while it is a stage seed (its invocation's reservation).
	reserved int64
	// leased: made with a TTL (function.Request.StageLease), so it lives
	// while its lease in the cluster directory does (dirsweep.go).
	leased bool
	made   time.Time
}

// stagePrepared is a prepare-self of an instance asked to become a stage.
type stagePrepared struct {
	pid  int
	seed *seedRec
}

// warmInst is an instance of the keep-alive policy.
type warmInst struct {
	p        *function.Process
	group    *container.Group
	reserved int64
	timer    *time.Timer
	idle     time.Time // when it was parked
}

func newFnRegistry(d *Daemon) *fnRegistry {
	return &fnRegistry{d: d, fns: map[string]*fnRec{}, waiters: map[int]chan *seedRec{}, stageWaiters: map[string]chan stagePrepared{}, pss: newPssCache()}
}

// Reservation is the memory one instance of spec reserves on a node: its
// memory limit, or DefaultInstanceMemory without one.
func Reservation(spec *function.Spec) int64 {
	if spec.MemoryBytes > 0 {
		return spec.MemoryBytes
	}
	return DefaultInstanceMemory
}

func (f *fnRegistry) limits(spec *function.Spec) container.Limits {
	return container.Limits{MemoryBytes: spec.MemoryBytes, CPUs: spec.CPUs}
}

// bootstrapPath installs the Python bootstrap under the state dir once.
func (f *fnRegistry) bootstrapPath() (string, error) {
	f.bootstrapOnce.Do(func() {
		f.bootstrap, f.bootstrapErr = function.InstallBootstrap(filepath.Join(f.d.cfg.StateDir, "runtime"))
	})
	return f.bootstrap, f.bootstrapErr
}

// preparedSeed is called by prepare when pid became a seed: a seed process
// of a function waiting for it takes it.
func (f *fnRegistry) preparedSeed(pid int, s *seedRec) bool {
	f.mu.Lock()
	ch := f.waiters[pid]
	delete(f.waiters, pid)
	var sch chan stagePrepared
	if ch == nil && s.name != "" {
		sch = f.stageWaiters[s.name]
		delete(f.stageWaiters, s.name)
	}
	f.mu.Unlock()
	switch {
	case ch != nil:
		ch <- s
	case sch != nil:
		sch <- stagePrepared{pid, s} // buffered: the waiter may be gone
	default:
		return false
	}
	return true
}

// info describes fn. f.mu must be held.
func (f *fnRegistry) infoLocked(fn *fnRec) FunctionInfo {
	in := FunctionInfo{
		Name: fn.spec.Name, Policy: string(fn.spec.Policy), Generation: fn.spec.Generation, Node: f.d.node,
		InitMS: fn.initMS, PrepareMS: fn.prepareMS, Running: fn.running, Warm: len(fn.warm),
		Invocations: fn.invocations, Errors: fn.errors,
	}
	if fn.seed != nil {
		in.Seed = fn.seed.id
		in.SeedRef = f.d.node + "/" + fn.seed.id
	}
	if fn.initErr != nil && fn.seed == nil {
		// The cause alone: whoever shows it says it is an initialization
		// failure ("function X deployed, but its initialization failed: ...").
		in.InitError = strings.TrimPrefix(fn.initErr.Error(), function.ErrInit.Error()+": ")
	}
	return in
}

// deploy registers a function on this node and, with req.Seed, makes its
// seed: it runs the function's initialization once and prepares it. An
// initialization failure is reported in FunctionInfo.InitError (the
// function stays deployed; its invocations fail with that error until it
// is deployed again).
func (f *fnRegistry) deploy(ctx context.Context, req DeployRequest) (FunctionInfo, error) {
	spec := req.Spec
	if err := spec.Validate(); err != nil {
		return FunctionInfo{}, fmt.Errorf("deploy: %w", err)
	}
	if spec.IsOCI() {
		return FunctionInfo{}, fmt.Errorf("deploy %s: OCI image layouts are not runnable yet; unpack it with `mitosis image unpack` and deploy the function directory", spec.Name)
	}
	if req.Seed && !spec.Policy.Seeded() {
		return FunctionInfo{}, fmt.Errorf("deploy %s: policy %s has no seed", spec.Name, spec.Policy)
	}
	for {
		f.mu.Lock()
		if f.closed {
			f.mu.Unlock()
			return FunctionInfo{}, errors.New("deploy: the daemon is shutting down")
		}
		fn := f.fns[spec.Name]
		if fn != nil && fn.spec.Generation > spec.Generation {
			f.mu.Unlock()
			return FunctionInfo{}, fmt.Errorf("deploy %s: generation %d is older than the deployed %d", spec.Name, spec.Generation, fn.spec.Generation)
		}
		if fn != nil && fn.spec.Generation < spec.Generation {
			f.mu.Unlock()
			f.remove(spec.Name) // an update replaces the old instances
			continue
		}
		if fn == nil {
			var err error
			if fn, err = f.newFn(spec); err != nil {
				f.mu.Unlock()
				return FunctionInfo{}, err
			}
			f.fns[spec.Name] = fn
		}
		fn.managed = fn.managed || req.Directory
		if ch := fn.seeding; ch != nil {
			f.mu.Unlock()
			select { // another deploy is making the seed
			case <-ch:
				continue
			case <-ctx.Done():
				return FunctionInfo{}, fmt.Errorf("deploy %s: %w", spec.Name, ctx.Err())
			}
		}
		if !req.Seed || fn.seed != nil {
			in := f.infoLocked(fn)
			f.mu.Unlock()
			return in, nil
		}
		done := make(chan struct{})
		fn.seeding = done
		f.mu.Unlock()
		s, parent, st, took, err := f.makeSeed(ctx, fn)
		f.mu.Lock()
		fn.seeding = nil
		close(done)
		if err == nil && (fn.removed || f.closed) {
			err = fmt.Errorf("deploy %s: removed while its seed was made", spec.Name)
			f.mu.Unlock()
			f.dropSeed(s, parent)
			return FunctionInfo{}, err
		}
		if err != nil {
			fn.initErr = err
		} else {
			fn.seed, fn.parent, fn.initErr = s, parent, nil
			fn.initMS, fn.prepareMS = st.InitMS, float64(took.Microseconds())/1000
		}
		in := f.infoLocked(fn)
		f.mu.Unlock()
		if err != nil {
			f.d.log.Warn("function init failed", "function", spec.Name, "generation", spec.Generation, "err", err)
			if !errors.Is(err, function.ErrInit) {
				return in, fmt.Errorf("deploy %s: %w", spec.Name, err)
			}
			return in, nil
		}
		f.d.log.Info("function seed", "function", spec.Name, "generation", spec.Generation, "seed", s.id,
			"init_ms", st.InitMS, "prepare", took)
		if f.d.dir != nil {
			f.d.dir.putSeed(spec.Name, s, spec.Generation, took)
		}
		return in, nil
	}
}

// newFn creates the record and log of a function. f.mu must be held.
func (f *fnRegistry) newFn(spec function.Spec) (*fnRec, error) {
	dir := filepath.Join(f.d.cfg.StateDir, "functions")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("deploy %s: %w", spec.Name, err)
	}
	path := filepath.Join(dir, spec.Name+".log")
	log, err := openFnLog(path, f.d.cfg.FunctionLogMax)
	if err != nil {
		return nil, fmt.Errorf("deploy %s: log: %w", spec.Name, err)
	}
	return &fnRec{spec: spec, log: log, logPath: path, forkedFrom: map[*seedRec]struct{}{}, stages: map[string]*stageRec{},
		kids: map[int]struct{}{}, busy: map[*warmInst]struct{}{}}, nil
}

// makeSeed starts the function in seed mode, waits for its initialization
// and its prepare-self, and returns the seed.
func (f *fnRegistry) makeSeed(ctx context.Context, fn *fnRec) (*seedRec, *function.Process, function.Status, time.Duration, error) {
	d := f.d
	bs, err := f.bootstrapPath()
	if err != nil {
		return nil, nil, function.Status{}, 0, err
	}
	spec := &fn.spec
	lim := f.limits(spec)
	var group *container.Group
	if lim != (container.Limits{}) {
		if group, err = container.New(d.cgroupName(fmt.Sprintf("fn-%s-%d", spec.Name, time.Now().UnixNano())), lim); err != nil {
			return nil, nil, function.Status{}, 0, fmt.Errorf("seed cgroup: %w", err)
		}
	}
	ready := make(chan *seedRec, 1)
	logf, releaseLog := fn.log.acquire()
	p, err := function.Start(function.StartOptions{
		Spec: spec, Mode: function.ModeSeed, Bootstrap: bs, Dir: spec.Image,
		SeedName: "fn." + spec.Name, Socket: d.cfg.Socket, Log: logf,
		OnStart: func(pid int) error {
			f.mu.Lock()
			f.waiters[pid] = ready
			f.mu.Unlock()
			// A seed of a process with limits gets a pool of cgroups
			// for its children (see prepare).
			d.mu.Lock()
			d.containers[pid] = &containerRec{pid: pid, name: spec.Name, limits: lim, group: group, pool: fnCgroupPool}
			d.mu.Unlock()
			if group != nil {
				return group.Add(pid)
			}
			return nil
		},
	})
	releaseLog() // the process has its own descriptor of the log
	cleanup := func() {
		if p != nil {
			f.mu.Lock()
			delete(f.waiters, p.PID)
			f.mu.Unlock()
			p.Kill()
			<-p.Done()
			d.mu.Lock()
			delete(d.containers, p.PID)
			d.mu.Unlock()
		}
		if group != nil {
			_ = group.Delete()
		}
	}
	if err != nil {
		p = nil
		cleanup()
		return nil, nil, function.Status{}, 0, err
	}
	ictx, cancel := context.WithTimeout(ctx, function.DefaultInitTimeout)
	defer cancel()
	st, err := p.WaitReady(ictx)
	if err != nil {
		cleanup()
		return nil, nil, st, 0, err
	}
	p.CloseStatus()
	start := time.Now()
	select {
	case s := <-ready:
		go f.watchParent(fn, p, group)
		return s, p, st, time.Since(start), nil
	case <-p.Done():
		cleanup()
		return nil, nil, st, 0, fmt.Errorf("%w: the process ended (%s) before it was prepared; see %s", function.ErrInit, p.Exited(), fn.logPath)
	case <-ictx.Done():
		cleanup()
		return nil, nil, st, 0, fmt.Errorf("%w: not prepared in time: %w", function.ErrInit, ictx.Err())
	}
}

// watchParent forgets a seed parent's container record once it exits.
func (f *fnRegistry) watchParent(fn *fnRec, p *function.Process, group *container.Group) {
	<-p.Done()
	d := f.d
	d.mu.Lock()
	delete(d.containers, p.PID)
	d.mu.Unlock()
	if group != nil {
		_ = group.Delete()
	}
}

// dropSeed removes a function's seed and its parent process.
func (f *fnRegistry) dropSeed(s *seedRec, parent *function.Process) {
	if s != nil {
		if err := f.d.remove(s.id, true); err != nil {
			f.d.log.Warn("remove function seed", "seed", s.id, "err", err)
		}
	}
	if parent != nil {
		parent.Kill()
		<-parent.Done()
	}
}

// remove removes a function from this node: its seed, parent, warm
// instances and the imported seeds only it used. Running invocations are
// killed.
func (f *fnRegistry) remove(name string) error {
	f.mu.Lock()
	fn := f.fns[name]
	if fn == nil {
		f.mu.Unlock()
		return fmt.Errorf("fn-rm: function %q is not deployed on node %s", name, f.d.node)
	}
	fn.removed = true
	delete(f.fns, name)
	warm := fn.warm
	fn.warm = nil
	for _, w := range warm {
		w.timer.Stop()
	}
	busy := make([]*warmInst, 0, len(fn.busy))
	for w := range fn.busy {
		busy = append(busy, w)
	}
	seed, parent := fn.seed, fn.parent
	fn.seed, fn.parent = nil, nil
	stages := fn.stages
	fn.stages = map[string]*stageRec{}
	for _, st := range stages {
		f.unreserveLocked(st)
	}
	var imported []*seedRec
	for s := range fn.forkedFrom {
		if s.origin != "" && !f.usedByOtherLocked(s, fn) {
			imported = append(imported, s)
		}
	}
	f.mu.Unlock()
	for _, w := range append(warm, busy...) {
		f.killInst(w)
	}
	f.dropSeed(seed, parent)
	for _, st := range stages {
		f.dropStage(st)
	}
	// Stage seeds this daemon did not make (handed over by a predecessor).
	f.d.mu.Lock()
	var inherited []*seedRec
	for _, s := range f.d.seeds {
		if s.origin == "" && !s.removing && isStageName(s.name) && seedOf(name, s.name) {
			inherited = append(inherited, s)
		}
	}
	f.d.mu.Unlock()
	for _, s := range inherited {
		f.dropStage(&stageRec{seed: s})
	}
	for _, s := range imported {
		if err := f.d.remove(s.id, true); err != nil {
			f.d.log.Warn("remove imported seed", "seed", s.id, "err", err)
		}
	}
	if f.d.dir != nil {
		f.d.dir.deleteSeed(name)
	}
	fn.log.close()
	f.d.log.Info("function removed", "function", name, "warm_killed", len(warm)+len(busy))
	return nil
}

func (f *fnRegistry) usedByOtherLocked(s *seedRec, self *fnRec) bool {
	for _, o := range f.fns {
		if o == self {
			continue
		}
		if _, ok := o.forkedFrom[s]; ok {
			return true
		}
	}
	return false
}

// killInst ends a warm instance and releases its reservation.
func (f *fnRegistry) killInst(w *warmInst) {
	w.p.Kill()
	<-w.p.Done()
	if w.group != nil {
		_ = w.group.Delete()
	}
	f.mu.Lock()
	f.reserved -= w.reserved
	f.mu.Unlock()
}

// closeAll removes every function (daemon shutdown).
func (f *fnRegistry) closeAll() {
	f.mu.Lock()
	f.closed = true
	names := make([]string, 0, len(f.fns))
	for n := range f.fns {
		names = append(names, n)
	}
	f.mu.Unlock()
	for _, n := range names {
		_ = f.remove(n)
	}
	// The bootstrap (written at the first deploy, by this daemon or a
	// killed predecessor) goes with the daemon: the runtime dir is ours.
	_ = os.RemoveAll(filepath.Join(f.d.cfg.StateDir, "runtime"))
}

// admit takes one invocation slot and res bytes of memory, evicting idle
// warm instances (least recently used first) to make room; ErrBusy if the
// node is full. With warm, an idle instance of fn, if there is one, is
// taken out of its pool in the same step and returned: its reservation
// becomes the invocation's, so reusing it never evicts another instance.
func (f *fnRegistry) admit(fn *fnRec, res int64, warm bool) (*warmInst, error) {
	d := f.d
	maxC, maxM := d.maxConcurrency(), d.maxMemory()
	var evict []*warmInst
	f.mu.Lock()
	if f.running >= maxC {
		f.mu.Unlock()
		return nil, fmt.Errorf("node %s runs %d invocations (its limit): %w", d.node, maxC, transport.ErrBusy)
	}
	var w *warmInst
	if n := len(fn.warm); warm && n > 0 {
		w = fn.warm[n-1] // the most recently used: its pages are the likeliest resident
		fn.warm = fn.warm[:n-1]
		w.timer.Stop()
		fn.busy[w] = struct{}{}
		f.reserved -= w.reserved
		w.reserved = 0
	}
	for f.reserved+res > maxM {
		v := f.oldestIdleLocked()
		if v == nil {
			if w != nil { // cannot happen: w's own reservation was at least res
				break
			}
			f.mu.Unlock()
			return nil, fmt.Errorf("node %s has %d of %d bytes reserved, %d more needed: %w", d.node, f.reserved, maxM, res, transport.ErrBusy)
		}
		evict = append(evict, v)
		f.reserved -= v.reserved
		v.reserved = 0
	}
	f.running++
	f.reserved += res
	f.mu.Unlock()
	for _, v := range evict {
		f.killInst(v)
	}
	return w, nil
}

func (f *fnRegistry) release(res int64) {
	f.mu.Lock()
	f.running--
	f.reserved -= res
	f.mu.Unlock()
}

// oldestIdleLocked takes the least recently used idle warm instance of any
// function out of its pool. f.mu must be held.
func (f *fnRegistry) oldestIdleLocked() *warmInst {
	var best *fnRec
	for _, fn := range f.fns {
		if len(fn.warm) == 0 {
			continue
		}
		if best == nil || fn.warm[0].idle.Before(best.warm[0].idle) {
			best = fn
		}
	}
	if best == nil {
		return nil
	}
	w := best.warm[0]
	best.warm = best.warm[1:]
	w.timer.Stop()
	return w
}

// invoke runs one invocation of a function deployed on this node.
func (f *fnRegistry) invoke(ctx context.Context, req transport.InvokeRequest) (transport.InvokeResponse, error) {
	d := f.d
	f.mu.Lock()
	fn := f.fns[req.Function]
	if fn == nil {
		f.mu.Unlock()
		return transport.InvokeResponse{}, fmt.Errorf("function %q is not deployed on node %s: %w", req.Function, d.node, errNotDeployed)
	}
	spec := fn.spec
	f.mu.Unlock()
	var freq function.Request
	if len(req.Meta) > 0 {
		if err := json.Unmarshal(req.Meta, &freq); err != nil {
			return transport.InvokeResponse{}, fmt.Errorf("invoke %s: malformed metadata: %w", spec.Name, err)
		}
	}
	freq.Body = req.Body
	timeout := req.Timeout
	if timeout <= 0 || timeout > spec.ExecTimeout() {
		timeout = spec.ExecTimeout()
	}
	res := Reservation(&spec)
	w, err := f.admit(fn, res, spec.Policy == function.PolicyKeepAlive)
	if err != nil {
		return transport.InvokeResponse{}, err
	}
	defer f.release(res)
	f.mu.Lock()
	fn.running++
	f.mu.Unlock()
	var resp transport.InvokeResponse
	switch spec.Policy {
	case function.PolicyFork, function.PolicyLocalFork:
		resp, err = f.invokeFork(ctx, fn, req.Seed, freq, timeout, res)
	case function.PolicyKeepAlive:
		resp, err = f.invokeWarm(ctx, fn, w, freq, timeout, true)
	default:
		resp, err = f.invokeWarm(ctx, fn, nil, freq, timeout, false)
	}
	f.mu.Lock()
	fn.running--
	fn.invocations++
	if err != nil || resp.Status >= 500 {
		fn.errors++
	}
	f.mu.Unlock()
	if err == nil {
		d.metrics.invocations.WithLabelValues(kindName(resp.Kind), statusClass(resp.Status)).Inc()
		d.metrics.instanceStart.WithLabelValues(kindName(resp.Kind)).Observe(resp.Start.Seconds())
	}
	return resp, err
}

func kindName(k uint8) string {
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

func statusClass(s int) string { return fmt.Sprintf("%dxx", s/100) }

// failed is the response of an invocation whose function failed.
func failed(kind uint8, start, run time.Duration, child string, status int, err error) transport.InvokeResponse {
	return transport.InvokeResponse{Status: status, Kind: kind, Start: start, Run: run, Child: child, Error: err.Error()}
}

func replyResponse(kind uint8, start, run time.Duration, child string, r function.Reply) transport.InvokeResponse {
	resp := transport.InvokeResponse{Status: r.Status, Kind: kind, Start: start, Run: run, Child: child,
		ContentType: r.ContentType, Body: r.Body, Error: r.Error}
	return resp
}

// invokeFork forks one child of the function's seed (seedRef, or this
// node's own seed) with the request as its payload and reads its reply
// from its channel.
func (f *fnRegistry) invokeFork(ctx context.Context, fn *fnRec, seedRef string, freq function.Request, timeout time.Duration, res int64) (transport.InvokeResponse, error) {
	d := f.d
	f.mu.Lock()
	local, initErr := fn.seed, fn.initErr
	f.mu.Unlock()
	var s *seedRec
	switch {
	case seedRef != "":
		var err error
		// A seed of another function is refused before it is imported.
		accept := func(name string) error {
			if !seedOf(fn.spec.Name, name) {
				return fmt.Errorf("%q is not a seed of this function", name)
			}
			return nil
		}
		if s, err = d.resolveSeedFor(ctx, seedRef, accept); err != nil {
			return transport.InvokeResponse{}, fmt.Errorf("invoke %s: seed %s: %w", fn.spec.Name, seedRef, err)
		}
	case local != nil:
		s = local
	case initErr != nil:
		return failed(0, 0, 0, "", 500, fmt.Errorf("function %s failed to initialize: %w", fn.spec.Name, initErr)), nil
	default:
		return transport.InvokeResponse{}, fmt.Errorf("invoke %s: node %s holds no seed of it and the request names none: %w", fn.spec.Name, d.node, errNotDeployed)
	}
	if !s.self {
		return transport.InvokeResponse{}, fmt.Errorf("invoke %s: seed %s was not made by the function runtime", fn.spec.Name, s.id)
	}
	lim := f.limits(&fn.spec)
	d.mu.Lock()
	if s.pool == nil && lim != (container.Limits{}) {
		// Children of an imported seed get the function's limits too.
		s.pool = container.NewPool(d.cgroupName("seed-"+s.id), lim, max(d.cfg.CgroupPool, fnCgroupPool))
	}
	d.mu.Unlock()
	freq.SeedName, freq.Socket = "", ""
	var stage chan stagePrepared
	if freq.Stage {
		freq.SeedName, freq.Socket = stageSeedName(fn.spec.Name), d.cfg.Socket
		stage = make(chan stagePrepared, 1)
		f.mu.Lock()
		f.stageWaiters[freq.SeedName] = stage
		f.mu.Unlock()
		defer f.abandonStage(freq.SeedName, stage)
	}
	payload, err := json.Marshal(freq)
	if err != nil {
		return transport.InvokeResponse{}, fmt.Errorf("invoke %s: encode request: %w", fn.spec.Name, err)
	}
	logf, releaseLog := fn.log.acquire()
	inv := &invocation{payload: payload, log: logf}
	start := time.Now()
	k, err := d.forkOne(ctx, s, client.Request{Op: client.OpFork, Seed: s.id, Prefetch: true}, [3]*os.File{}, false, inv)
	releaseLog() // the child has its own descriptor of the log
	if err != nil {
		return transport.InvokeResponse{}, fmt.Errorf("invoke %s: %w", fn.spec.Name, err)
	}
	defer inv.channel.Close()
	started := time.Since(start)
	f.mu.Lock()
	fn.forkedFrom[s] = struct{}{}
	fn.kids[k.child.PID] = struct{}{}
	f.mu.Unlock()
	go func() {
		<-k.exited
		f.mu.Lock()
		delete(fn.kids, k.child.PID)
		f.mu.Unlock()
	}()
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	r, err := function.ReadReply(rctx, inv.channel, k.exited, func() string { return exitString(k.exit) })
	run := time.Since(start) - started
	if err != nil {
		d.killChild(k)
		status := 500
		if errors.Is(err, function.ErrTimeout) {
			status = 504
			err = fmt.Errorf("function %s timed out after %v", fn.spec.Name, timeout)
		} else if k.hasExited() && k.exit.Error != "" {
			err = fmt.Errorf("%w: %s", err, k.exit.Error)
		}
		return failed(transport.KindFork, started, run, k.id, status, err), nil
	}
	resp := replyResponse(transport.KindFork, started, run, k.id, r)
	if stage == nil || r.Status != http.StatusOK {
		return resp, nil
	}
	// The instance answered; it now prepares itself as the stage seed.
	select {
	case sp := <-stage:
		f.mu.Lock()
		ok := !fn.removed && sp.pid == k.child.PID
		if ok {
			// The instance lives on as the stage seed's parent: its
			// memory stays reserved (the invocation's reservation ends
			// when it returns) until the stage seed is removed.
			fn.stages[sp.seed.id] = &stageRec{seed: sp.seed, parent: k, reserved: res, leased: freq.StageLease, made: time.Now()}
			f.reserved += res
		}
		f.mu.Unlock()
		if !ok {
			f.dropStage(&stageRec{seed: sp.seed, parent: k})
			return failed(transport.KindFork, started, run, k.id, 500, fmt.Errorf("function %s was removed while its instance became a stage seed", fn.spec.Name)), nil
		}
		resp.Seed = d.node + "/" + sp.seed.id
		resp.Run = time.Since(start) - started
		return resp, nil
	case <-k.exited:
		return failed(transport.KindFork, started, run, k.id, 500,
			fmt.Errorf("function %s: the instance ended (%s) after it answered, before it became a stage seed; see %s", fn.spec.Name, exitString(k.exit), fn.logPath)), nil
	case <-rctx.Done():
		d.killChild(k)
		return failed(transport.KindFork, started, run, k.id, 504,
			fmt.Errorf("function %s: the instance answered but was not prepared as a stage seed within %v", fn.spec.Name, timeout)), nil
	}
}

// stageSeedName is a fresh seed name for a stage seed of function fn.
func stageSeedName(fn string) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "fn." + fn + ".stage." + hex.EncodeToString(b[:])
}

// isStageName reports whether a seed name is a stage seed's.
func isStageName(name string) bool {
	return strings.HasPrefix(name, "fn.") && strings.Contains(name, ".stage.")
}

// seedOf reports whether a seed named name belongs to function fn: its
// seed or one of its stage seeds.
func seedOf(fn, name string) bool {
	return name == "fn."+fn || strings.HasPrefix(name, "fn."+fn+".stage.")
}

// abandonStage forgets the stage waiter of an invocation that is over
// and removes a stage seed made after it stopped waiting (it failed or
// timed out as the instance prepared itself): a seed the invocation took
// is no longer in the channel.
func (f *fnRegistry) abandonStage(name string, ch chan stagePrepared) {
	f.mu.Lock()
	delete(f.stageWaiters, name)
	f.mu.Unlock()
	select {
	case sp := <-ch:
		f.dropStage(&stageRec{seed: sp.seed, parent: f.d.childByPID(sp.pid)})
	default:
	}
}

// dropStage removes a stage seed and ends the instance it was made of.
// unreserveLocked gives back the memory a stage seed's parent instance
// held reserved. Precondition: f.mu held, st taken out of its function's
// stages.
func (f *fnRegistry) unreserveLocked(st *stageRec) {
	f.reserved -= st.reserved
	st.reserved = 0
}

func (f *fnRegistry) dropStage(st *stageRec) {
	if err := f.d.remove(st.seed.id, true); err != nil {
		f.d.log.Warn("remove stage seed", "seed", st.seed.id, "err", err)
	}
	if st.parent != nil {
		f.d.killChild(st.parent)
	}
}

// removeStage removes the stage seed ref ("NODE/SEED") of function name:
// the seed and its parent instance when this node made it, else this
// node's import of it (and its page cache). A stage seed this node does
// not know is not an error: every node is asked.
func (f *fnRegistry) removeStage(name, ref string) error {
	node, id := splitSeedRef(ref)
	if node == "" || id == "" {
		return fmt.Errorf("%s: seed %q: want NODE/SEED", CallFnStageRemove, ref)
	}
	d := f.d
	if node == d.node {
		f.mu.Lock()
		fn := f.fns[name]
		var st *stageRec
		if fn != nil {
			st = fn.stages[id]
			delete(fn.stages, id)
		}
		if st != nil {
			f.unreserveLocked(st)
		}
		f.mu.Unlock()
		if st == nil {
			// Not made by this daemon (a predecessor handed it over):
			// the seed by its id, if it is one of the function's.
			d.mu.Lock()
			s := d.seeds[id]
			d.mu.Unlock()
			if s == nil || s.origin != "" || !isStageName(s.name) || !seedOf(name, s.name) {
				return nil
			}
			st = &stageRec{seed: s}
		}
		f.dropStage(st)
		return nil
	}
	d.mu.Lock()
	s := d.importedLocked(node, id)
	d.mu.Unlock()
	if s == nil || !seedOf(name, s.name) {
		return nil
	}
	f.mu.Lock()
	if fn := f.fns[name]; fn != nil {
		delete(fn.forkedFrom, s)
	}
	f.mu.Unlock()
	if err := d.remove(s.id, true); err != nil {
		return fmt.Errorf("%s: remove the import of %s: %w", CallFnStageRemove, ref, err)
	}
	return nil
}

func exitString(e client.ExitInfo) string {
	if e.Signal > 0 {
		return fmt.Sprintf("killed by signal %d", e.Signal)
	}
	return fmt.Sprintf("exit code %d", e.Code)
}

// invokeWarm serves an invocation with w, a warm instance admit took from
// the pool (keep: the keep-alive policy, idle instances are kept stopped
// for the TTL), or without one with a cold instance (a process started for
// this invocation, kept afterwards only under keep-alive).
func (f *fnRegistry) invokeWarm(ctx context.Context, fn *fnRec, w *warmInst, freq function.Request, timeout time.Duration, keep bool) (transport.InvokeResponse, error) {
	start := time.Now()
	kind := transport.KindCold
	if w != nil {
		kind = transport.KindWarm
		if err := w.p.Continue(); err != nil {
			f.dropBusy(fn, w)
			w = nil
			kind = transport.KindCold
		}
	}
	if w == nil {
		var err error
		if w, err = f.startInstance(ctx, fn); err != nil {
			if errors.Is(err, function.ErrInit) {
				return failed(kind, time.Since(start), 0, "", 500, fmt.Errorf("function %s failed to initialize: %w", fn.spec.Name, err)), nil
			}
			return transport.InvokeResponse{}, fmt.Errorf("invoke %s: %w", fn.spec.Name, err)
		}
	}
	started := time.Since(start)
	id := fmt.Sprintf("i-%d", w.p.PID)
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	r, err := w.p.Invoke(rctx, freq)
	run := time.Since(start) - started
	if err != nil {
		f.dropBusy(fn, w)
		status := 500
		if errors.Is(err, function.ErrTimeout) {
			status, err = 504, fmt.Errorf("function %s timed out after %v", fn.spec.Name, timeout)
		}
		return failed(kind, started, run, id, status, err), nil
	}
	if !keep {
		f.dropBusy(fn, w)
		return replyResponse(kind, started, run, id, r), nil
	}
	f.park(fn, w)
	return replyResponse(kind, started, run, id, r), nil
}

// startInstance cold-starts a serving instance of fn (its reservation is
// taken by the invocation that starts it, and moves to the pool with it).
func (f *fnRegistry) startInstance(ctx context.Context, fn *fnRec) (*warmInst, error) {
	bs, err := f.bootstrapPath()
	if err != nil {
		return nil, err
	}
	w := &warmInst{}
	if lim := f.limits(&fn.spec); lim != (container.Limits{}) {
		if w.group, err = container.New(f.d.cgroupName(fmt.Sprintf("fn-%s-%d", fn.spec.Name, time.Now().UnixNano())), lim); err != nil {
			return nil, fmt.Errorf("instance cgroup: %w", err)
		}
	}
	logf, releaseLog := fn.log.acquire()
	p, err := function.Start(function.StartOptions{
		Spec: &fn.spec, Mode: function.ModeServe, Bootstrap: bs, Dir: fn.spec.Image, Log: logf,
		OnStart: func(pid int) error {
			if w.group != nil {
				return w.group.Add(pid)
			}
			return nil
		},
	})
	releaseLog() // the process has its own descriptor of the log
	if err != nil {
		if w.group != nil {
			_ = w.group.Delete()
		}
		return nil, err
	}
	w.p = p
	f.mu.Lock()
	fn.busy[w] = struct{}{}
	f.mu.Unlock()
	ictx, cancel := context.WithTimeout(ctx, function.DefaultInitTimeout)
	defer cancel()
	if _, err := p.WaitReady(ictx); err != nil {
		f.dropBusy(fn, w)
		return nil, err
	}
	return w, nil
}

// dropBusy ends an instance that served (or failed) an invocation.
func (f *fnRegistry) dropBusy(fn *fnRec, w *warmInst) {
	f.mu.Lock()
	delete(fn.busy, w)
	f.mu.Unlock()
	f.killInst(w)
}

// park returns a warm instance to its function's pool, stopped, with a
// fresh TTL, and moves one instance's worth of reservation to it.
func (f *fnRegistry) park(fn *fnRec, w *warmInst) {
	if err := w.p.Stop(); err != nil {
		f.dropBusy(fn, w)
		return
	}
	res := Reservation(&fn.spec)
	f.mu.Lock()
	delete(fn.busy, w)
	if fn.removed || f.closed {
		f.mu.Unlock()
		f.killInst(w)
		return
	}
	// The invocation releases its reservation; the idle instance keeps
	// one of its own.
	w.reserved = res
	w.idle = time.Now()
	f.reserved += res
	fn.warm = append(fn.warm, w)
	w.timer = time.AfterFunc(fn.spec.KeepAliveTTL(), func() { f.expire(fn, w) })
	f.mu.Unlock()
}

// expire ends an idle warm instance whose TTL ran out.
func (f *fnRegistry) expire(fn *fnRec, w *warmInst) {
	f.mu.Lock()
	for i, x := range fn.warm {
		if x == w {
			fn.warm = append(fn.warm[:i], fn.warm[i+1:]...)
			f.mu.Unlock()
			f.killInst(w)
			return
		}
	}
	f.mu.Unlock()
}

// list describes the functions deployed here (with memory, if measure).
func (f *fnRegistry) list(measure bool) []FunctionInfo {
	type procs struct {
		in    FunctionInfo
		pids  []int
		seeds []*seedRec
	}
	f.mu.Lock()
	all := make([]procs, 0, len(f.fns))
	for _, fn := range f.fns {
		p := procs{in: f.infoLocked(fn)}
		if measure {
			if fn.parent != nil {
				p.pids = append(p.pids, fn.parent.PID)
			}
			for pid := range fn.kids {
				p.pids = append(p.pids, pid)
			}
			for _, w := range fn.warm {
				p.pids = append(p.pids, w.p.PID)
			}
			for w := range fn.busy {
				p.pids = append(p.pids, w.p.PID)
			}
			if fn.seed != nil {
				p.seeds = append(p.seeds, fn.seed)
			}
			for s := range fn.forkedFrom {
				if s != fn.seed {
					p.seeds = append(p.seeds, s)
				}
			}
		}
		all = append(all, p)
	}
	f.mu.Unlock()
	out := make([]FunctionInfo, 0, len(all))
	now, live := time.Now(), map[int]bool{}
	for _, p := range all {
		for _, s := range p.seeds {
			if s.seed.SourcePID > 0 {
				p.pids = append(p.pids, s.seed.SourcePID)
			}
			p.in.CacheBytes += s.seed.CacheBytes()
		}
		for _, pid := range p.pids {
			if pss, ok := f.pss.pss(pid, now); ok {
				p.in.MemoryBytes += pss
				live[pid] = true
			}
		}
		p.in.MemoryBytes += p.in.CacheBytes
		out = append(out, p.in)
	}
	if measure {
		f.pss.keepOnly(live)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// stats measures the node's function load and memory.
func (f *fnRegistry) stats() NodeStats {
	fns := f.list(true)
	f.mu.Lock()
	st := NodeStats{Node: f.d.node, MaxConcurrency: f.d.maxConcurrency(), MaxMemory: f.d.maxMemory(),
		Running: f.running, Reserved: f.reserved, Functions: fns, Taken: time.Now()}
	f.mu.Unlock()
	for _, in := range fns {
		st.Warm += in.Warm
		st.MemoryBytes += in.MemoryBytes
	}
	return st
}

// load is the node's load for the cluster directory.
func (f *fnRegistry) load() (running, warm int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, fn := range f.fns {
		warm += len(fn.warm)
	}
	return f.running, warm
}

// call runs a control call of the function runtime.
func (f *fnRegistry) call(ctx context.Context, op string, body []byte) (any, error) {
	switch op {
	case CallFnDeploy:
		var req DeployRequest
		if err := json.Unmarshal(body, &req); err != nil {
			return nil, fmt.Errorf("%s: malformed request: %w", op, err)
		}
		return f.deploy(ctx, req)
	case CallFnRemove:
		var req RemoveRequest
		if err := json.Unmarshal(body, &req); err != nil {
			return nil, fmt.Errorf("%s: malformed request: %w", op, err)
		}
		return struct{}{}, f.remove(req.Name)
	case CallFnStageRemove:
		var req StageRemoveRequest
		if err := json.Unmarshal(body, &req); err != nil {
			return nil, fmt.Errorf("%s: malformed request: %w", op, err)
		}
		return struct{}{}, f.removeStage(req.Function, req.Seed)
	case CallFnList:
		return f.list(false), nil
	case CallFnLogs:
		var req LogsRequest
		if err := json.Unmarshal(body, &req); err != nil {
			return nil, fmt.Errorf("%s: malformed request: %w", op, err)
		}
		return f.logs(req)
	case CallNodeStats:
		return f.stats(), nil
	}
	return nil, fmt.Errorf("unknown call %q (want %s, %s, %s, %s, %s or %s)", op, CallFnDeploy, CallFnRemove, CallFnStageRemove, CallFnList, CallFnLogs, CallNodeStats)
}

// maxConcurrency is the node's limit of invocations at once.
func (d *Daemon) maxConcurrency() int {
	if d.cfg.MaxConcurrency > 0 {
		return d.cfg.MaxConcurrency
	}
	return 16 * runtime.NumCPU()
}

// maxMemory is the memory instances may reserve on this node.
func (d *Daemon) maxMemory() int64 {
	if d.cfg.MaxMemory > 0 {
		return d.cfg.MaxMemory
	}
	if mi, err := procfs.ReadMemTotal(); err == nil {
		return int64(mi) / 10 * 8
	}
	return 8 << 30
}

// invocation is a fork made for one function invocation: the child's
// payload is the request, its stdout and stderr go to the function's log,
// and the daemon keeps its end of the child's channel (channel) to read
// the reply. The child is not kept in the ps history after it exits.
type invocation struct {
	payload json.RawMessage
	log     *os.File
	channel *os.File
}

// invokeLocal runs an invocation asked for on the local API.
func (d *Daemon) invokeLocal(args []byte) (client.InvokeResult, error) {
	var a client.InvokeArgs
	if err := json.Unmarshal(args, &a); err != nil {
		return client.InvokeResult{}, fmt.Errorf("invoke: malformed args: %w", err)
	}
	req := transport.InvokeRequest{Function: a.Function, Seed: a.Seed, Body: a.Body}
	if a.Timeout != "" {
		t, err := function.ParseDuration(a.Timeout)
		if err != nil {
			return client.InvokeResult{}, fmt.Errorf("invoke: timeout: %w", err)
		}
		req.Timeout = t
	}
	r, err := d.fn.invoke(d.ctx, req)
	if err != nil {
		return client.InvokeResult{}, fmt.Errorf("invoke: %w", err)
	}
	return client.InvokeResult{Status: r.Status, Body: r.Body, ContentType: r.ContentType, Error: r.Error,
		Kind: kindName(r.Kind), Instance: r.Child, StartMS: ms(r.Start), RunMS: ms(r.Run)}, nil
}

// ownsSeed reports whether s is the seed of a deployed function. It takes
// f.mu, so callers may hold d.mu.
func (f *fnRegistry) ownsSeed(s *seedRec) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, fn := range f.fns {
		if fn.seed == s || fn.stages[s.id] != nil {
			return true
		}
	}
	return false
}
