package workflow

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/mitosis-fork/mitosis/gateway/gwapi"
)

//go:embed shim.py
var shim []byte

// Runner runs workflows through a mitosis gateway.
type Runner struct {
	// Gateway is the gateway's base URL, e.g. http://127.0.0.1:8080.
	Gateway string
	// Token (bearer) or User and Password (basic auth) authenticate.
	Token, User, Password string
	// HTTP is the client (default: one with a 10-minute timeout).
	HTTP *http.Client
	// RedisSocket is the unix socket of the Redis server of the storage
	// transfer (every node must reach it at that path).
	RedisSocket string
	// WorkDir holds each run's generated function directory (default
	// os.TempDir()); every node must see it at the same path.
	WorkDir string
	// Timeout bounds one step instance (default 5 minutes).
	Timeout time.Duration
	// StageTTL is how long a run's stage seeds (gwapi.HeaderStageTTL)
	// and storage keys (a Redis expiry) outlive a runner that died
	// mid-run (SIGKILL, a lost machine): the runner renews both every
	// third of it while it runs, so a run may take any time, and one
	// that dies leaves no seed, memory reservation or key behind for
	// longer. A run that ends removes them at once. Default 2 minutes.
	StageTTL time.Duration
	// SeedPerRun makes the fork transfer start a fresh step runtime for
	// each run: a function of the run's own whose initialization runs the
	// sources and whose seed every later instance forks from (removed with
	// the run), instead of keeping an instance of the workflow's function,
	// which ran the sources, as the run's stage seed. It pays the
	// runtime's start and imports on every run; its seed is one hop from
	// the instances where a stage seed is two (BENCHMARKS.md compares).
	SeedPerRun bool
}

// Instance is one step instance's outcome.
type Instance struct {
	Node string `json:"node"`
	// AtMS is when the runner sent its request, in ms after the run's
	// start.
	AtMS    float64 `json:"at_ms"`
	MS      float64 `json:"ms"`       // request to response, at the runner
	StartMS float64 `json:"start_ms"` // the fork, as the gateway reports it
	RunMS   float64 `json:"run_ms"`   // the child's run to its reply
	// The step runtime's own timings: the step function, and the
	// storage transfer's GET, unpickle, pickle and SET.
	CallMS   float64 `json:"call_ms"`
	LoadMS   float64 `json:"load_ms"`
	DeserMS  float64 `json:"deser_ms"`
	SerMS    float64 `json:"ser_ms"`
	StoreMS  float64 `json:"store_ms"`
	BytesIn  int64   `json:"bytes_in"`
	BytesOut int64   `json:"bytes_out"`
}

// StepResult is one step of a run.
type StepResult struct {
	Name   string  `json:"name"`
	AtMS   float64 `json:"at_ms"` // when it started (its first request), after the run's start
	MS     float64 `json:"ms"`    // wall time of the step (all its instances)
	InInit bool    `json:"in_init,omitempty"`
	// Kept: the step's result stayed where downstream steps take it in
	// place (fork: its instance became a stage seed) or went to storage,
	// instead of coming back as JSON (Spec.Kept).
	Kept      bool       `json:"kept,omitempty"`
	Instances []Instance `json:"instances,omitempty"`
	Nodes     []string   `json:"nodes,omitempty"`
	Error     string     `json:"error,omitempty"`
}

// TransferMS returns the step's time in (de)serialization and storage
// round trips, summed over its instances.
func (s StepResult) TransferMS() float64 {
	t := 0.0
	for _, in := range s.Instances {
		t += in.LoadMS + in.DeserMS + in.SerMS + in.StoreMS
	}
	return t
}

// Run is one workflow run.
type Run struct {
	ID       string       `json:"id"`
	Workflow string       `json:"workflow"`
	Transfer Transfer     `json:"transfer"`
	Started  time.Time    `json:"started"`
	MS       float64      `json:"ms"`        // end to end
	DeployMS float64      `json:"deploy_ms"` // the run's function: init (fork: the source steps) and prepare
	Steps    []StepResult `json:"steps"`
	// Result is the sink step's result (JSON).
	Result json.RawMessage `json:"result,omitempty"`
	Error  string          `json:"error,omitempty"`
	// Cleanup is the error of removing the run's function, seed and
	// storage keys, if any.
	Cleanup string `json:"cleanup,omitempty"`
}

// Step returns the named step's result.
func (r *Run) Step(name string) (StepResult, bool) {
	for _, s := range r.Steps {
		if s.Name == name {
			return s, true
		}
	}
	return StepResult{}, false
}

// StepError is a step that failed (its instance's HTTP error, e.g. the
// Python exception's last line).
type StepError struct {
	Step string
	Err  error
}

func (e *StepError) Error() string { return fmt.Sprintf("step %s: %v", e.Step, e.Err) }
func (e *StepError) Unwrap() error { return e.Err }

// Run executes spec with input (JSON; nil is null) under transfer (""
// is the spec's). It returns the run record (also on error, with the
// failing step) and removes everything the run made: its function and
// seed on every node and, under storage, its Redis keys.
func (rn *Runner) Run(ctx context.Context, spec *Spec, input json.RawMessage, transfer Transfer) (*Run, error) {
	if transfer == "" {
		transfer = spec.Transfer
	}
	if _, err := ParseTransfer(string(transfer)); err != nil {
		return nil, err
	}
	if transfer == TransferStorage && rn.RedisSocket == "" {
		return nil, errors.New("workflow: the storage transfer needs a Redis server (RedisSocket)")
	}
	if len(input) == 0 {
		input = json.RawMessage("null")
	}
	order, err := spec.order()
	if err != nil {
		return nil, err
	}
	var idb [4]byte
	_, _ = rand.Read(idb[:])
	run := &Run{ID: spec.Name + "-" + hex.EncodeToString(idb[:]), Workflow: spec.Name, Transfer: transfer, Started: time.Now().UTC()}
	x := &execution{rn: rn, spec: spec, run: run, results: map[string]json.RawMessage{}, keys: map[string]string{}, seedOf: map[string]string{}}
	if transfer == TransferStorage {
		x.rdb = redis.NewClient(&redis.Options{Network: "unix", Addr: rn.RedisSocket})
		defer x.rdb.Close()
	}
	stopRenewing := x.keepAlive()
	err = x.execute(ctx, order, input)
	run.MS = ms(time.Since(run.Started))
	stopRenewing()
	if err != nil {
		run.Error = err.Error()
	}
	if cerr := x.cleanup(); cerr != nil {
		run.Cleanup = cerr.Error()
		if err == nil {
			err = fmt.Errorf("workflow run %s: cleanup: %w", run.ID, cerr)
		}
	}
	return run, err
}

// execution is one run in progress.
type execution struct {
	rn      *Runner
	spec    *Spec
	run     *Run
	fn      string // the workflow's function, or the run's own
	stage   string // NODE/SEED of the run's stage seed (fork; "" is fn's own seed)
	runFn   bool   // fn is the run's own function, removed with it
	rdb     *redis.Client
	mu      sync.Mutex
	results map[string]json.RawMessage // non-source step -> result
	keys    map[string]string          // kept step -> storage key (storage)
	seedOf  map[string]string          // kept non-source step -> the stage seed its instance became (fork)
	seeds   []string                   // the run's stage seeds, in the order they were made
}

// FunctionName is the gateway function of a workflow: its step runtime,
// with the workflow's module imported in its initialization.
func FunctionName(spec *Spec) string { return "wf-" + spec.Name }

// Deploy deploys the workflow's function on the gateway (its seed holds
// the step runtime with the workflow's module imported: every step
// instance, of every run, is forked from it or from a run's stage seed
// made of one), unless the definition and module deployed there are the
// same. It reports whether it deployed. Run deploys when needed; Remove
// undeploys.
func (rn *Runner) Deploy(ctx context.Context, spec *Spec) (bool, error) {
	fn := FunctionName(spec)
	digest, err := rn.specDigest(spec)
	if err != nil {
		return false, err
	}
	code, body, err := rn.do(ctx, "GET", "/system/function/"+fn, nil)
	if err != nil {
		return false, fmt.Errorf("workflow %s: read its function: %w", spec.Name, err)
	}
	method := "POST"
	switch code {
	case http.StatusOK:
		var st struct {
			Annotations map[string]string `json:"annotations"`
		}
		if json.Unmarshal(body, &st) == nil && st.Annotations[annotationDigest] == digest {
			return false, nil
		}
		method = "PUT" // another definition or module: a new generation
	case http.StatusNotFound:
	default:
		return false, fmt.Errorf("workflow %s: read its function: HTTP %d: %s", spec.Name, code, strings.TrimSpace(string(body)))
	}
	def, err := json.Marshal(spec)
	if err != nil {
		return false, err
	}
	code, body, err = rn.deployFunction(ctx, spec, method, fn, rn.functionDir(spec), nil,
		map[string]string{AnnotationWorkflow: spec.Name, annotationDigest: digest, AnnotationDefinition: string(def)})
	if err != nil {
		return false, fmt.Errorf("workflow %s: deploy its function: %w", spec.Name, err)
	}
	switch code {
	case http.StatusAccepted:
		return true, nil
	case http.StatusConflict: // deployed meanwhile by another run
		return false, nil
	}
	return false, fmt.Errorf("workflow %s: deploy its function: HTTP %d: %s", spec.Name, code, strings.TrimSpace(string(body)))
}

// deployFunction deploys the step runtime as function fn from dir, with
// extra environment and annotations.
func (rn *Runner) deployFunction(ctx context.Context, spec *Spec, method, fn, dir string, extra, annotations map[string]string) (int, []byte, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "handler.py"), shim, 0o644); err != nil {
		return 0, nil, err
	}
	env := map[string]string{
		"MITOSIS_WF_DIR": spec.Dir, "MITOSIS_WF_MODULE": spec.Module,
		"exec_timeout": rn.timeout().String(),
	}
	if rn.RedisSocket != "" {
		env["MITOSIS_WF_REDIS"] = rn.RedisSocket
	}
	for k, v := range spec.Env {
		env[k] = v
	}
	for k, v := range extra {
		env[k] = v
	}
	annotations["com.mitosis.policy"] = "fork"
	b, _ := json.Marshal(map[string]any{"service": fn, "image": dir, "envVars": env,
		"limits": map[string]string{"memory": spec.Memory}, "annotations": annotations})
	return rn.do(ctx, method, "/system/functions", b)
}

// Remove undeploys the workflow's function (its seed, instances and any
// stage seed left on every node) and its generated directory.
func (rn *Runner) Remove(ctx context.Context, spec *Spec) error {
	if err := rn.deleteFunction(ctx, FunctionName(spec)); err != nil {
		return fmt.Errorf("workflow %s: %w", spec.Name, err)
	}
	return os.RemoveAll(rn.functionDir(spec))
}

// deleteFunction removes function fn from the gateway (gone already is
// not an error).
func (rn *Runner) deleteFunction(ctx context.Context, fn string) error {
	b, _ := json.Marshal(map[string]string{"functionName": fn})
	code, body, err := rn.do(ctx, "DELETE", "/system/functions", b)
	if err != nil {
		return fmt.Errorf("delete function %s: %w", fn, err)
	}
	if code != http.StatusAccepted && code != http.StatusNotFound {
		return fmt.Errorf("delete function %s: HTTP %d: %s", fn, code, strings.TrimSpace(string(body)))
	}
	return nil
}

// annotationDigest is the function annotation holding specDigest.
const annotationDigest = "com.mitosis.workflow-digest"

// Annotations of a workflow's function (FunctionName): the workflow's
// name, and its definition (JSON), from which a gateway runs it
// (SpecOf).
const (
	AnnotationWorkflow   = "com.mitosis.workflow"
	AnnotationDefinition = "com.mitosis.workflow-definition"
)

// SpecOf returns the definition a workflow's function was deployed with
// (its annotations), validated.
func SpecOf(annotations map[string]string) (*Spec, error) {
	def, ok := annotations[AnnotationDefinition]
	if !ok {
		return nil, fmt.Errorf("the function carries no workflow definition (annotation %s): deploy the workflow again", AnnotationDefinition)
	}
	s, err := ParseSpec([]byte(def))
	if err != nil {
		return nil, fmt.Errorf("the function's workflow definition: %w", err)
	}
	return s, nil
}

// specDigest identifies a definition, its module's contents, the step
// runtime and the runner settings in the function's environment, so a
// changed workflow is deployed again.
func (rn *Runner) specDigest(spec *Spec) (string, error) {
	h := sha256.New()
	b, _ := json.Marshal(spec)
	h.Write(b)
	h.Write(shim)
	// "def": the function carries its definition (a function deployed
	// without it is deployed again).
	fmt.Fprintf(h, "\x00%s\x00%v\x00def\x00", rn.RedisSocket, rn.timeout())
	mod, err := os.ReadFile(filepath.Join(spec.Dir, spec.Module+".py"))
	if err != nil {
		return "", fmt.Errorf("workflow %s: %w", spec.Name, err)
	}
	h.Write(mod)
	return hex.EncodeToString(h.Sum(nil)[:12]), nil
}

func (rn *Runner) functionDir(spec *Spec) string {
	work := rn.WorkDir
	if work == "" {
		work = os.TempDir()
	}
	return filepath.Join(work, "mitosis-"+FunctionName(spec))
}

// sweepRunDirs removes the function directories of other --seed-per-run
// runs of spec whose function is gone (a run's cleanup calls it): a runner killed midway leaves its
// run's function to expire (its TTL) but nobody to remove its directory.
// A directory younger than a minute may be a run's that is deploying its
// function right now, and one whose function the gateway still has is a
// live run's: both stay.
func (rn *Runner) sweepRunDirs(ctx context.Context, spec *Spec) {
	base := rn.functionDir(spec)
	ents, err := os.ReadDir(filepath.Dir(base))
	if err != nil {
		return
	}
	prefix := filepath.Base(base) + "-"
	for _, e := range ents {
		id, ok := strings.CutPrefix(e.Name(), prefix) // the run's ID: NAME-XXXXXXXX
		hexID, ok2 := strings.CutPrefix(id, spec.Name+"-")
		if !ok || !ok2 || len(hexID) != 8 || strings.Trim(hexID, "0123456789abcdef") != "" || !e.IsDir() {
			continue
		}
		fi, err := e.Info()
		if err != nil || time.Since(fi.ModTime()) < time.Minute {
			continue
		}
		if code, _, err := rn.do(ctx, "GET", "/system/function/wf-"+id, nil); err == nil && code == http.StatusNotFound {
			_ = os.RemoveAll(filepath.Join(filepath.Dir(base), e.Name()))
		}
	}
}

func (x *execution) execute(ctx context.Context, order []*Step, input json.RawMessage) error {
	rn, spec, run := x.rn, x.spec, x.run
	x.mu.Lock() // renew reads it
	x.fn = FunctionName(spec)
	x.mu.Unlock()
	t0 := time.Now()
	if _, err := rn.Deploy(ctx, spec); err != nil {
		return err
	}
	run.DeployMS = ms(time.Since(t0))
	var sources []*Step
	for _, st := range order {
		if len(st.After) == 0 {
			sources = append(sources, st)
		}
	}
	if run.Transfer == TransferFork && rn.SeedPerRun {
		// A function of the run's own runs the sources in its
		// initialization; its seed is the run's.
		init := []map[string]string{}
		for _, st := range sources {
			init = append(init, map[string]string{"name": st.Name, "call": st.Call})
		}
		initJSON, _ := json.Marshal(init)
		x.mu.Lock() // renew reads them
		x.fn, x.runFn = "wf-"+run.ID, true
		x.mu.Unlock()
		t := time.Now()
		code, body, err := rn.deployFunction(ctx, spec, "POST", x.fn, rn.functionDir(spec)+"-"+run.ID,
			map[string]string{"MITOSIS_WF_INIT": string(initJSON), "MITOSIS_WF_INPUT": string(input)},
			// It lives by a lease the runner renews, as the stage seeds
			// do: a runner that dies leaves it for at most the TTL.
			map[string]string{"com.mitosis.workflow-run": run.ID, gwapi.AnnotationTTL: rn.stageTTL().String()})
		if err != nil {
			return fmt.Errorf("deploy the run's function: %w", err)
		}
		run.DeployMS += ms(time.Since(t))
		if code != http.StatusAccepted {
			msg := strings.TrimSpace(string(body))
			if code == http.StatusInternalServerError { // a source raised in the init
				return &StepError{Step: strings.Join(names(sources), ","), Err: errors.New(msg)}
			}
			return fmt.Errorf("deploy the run's function: HTTP %d: %s", code, msg)
		}
		for _, st := range sources {
			run.Steps = append(run.Steps, StepResult{Name: st.Name, InInit: true, AtMS: x.at(t), MS: ms(time.Since(t))})
		}
	} else if run.Transfer == TransferFork {
		// One instance runs the sources, in order, and is kept as the
		// run's stage seed: every later instance forks from it.
		type initStep struct {
			Name string `json:"name"`
			Call string `json:"call"`
		}
		init := []initStep{}
		for _, st := range sources {
			init = append(init, initStep{Name: st.Name, Call: st.Call})
		}
		t := time.Now()
		in, out, seed, err := x.invokeAs(ctx, map[string]any{"init": init, "input": input}, "", true)
		x.addSeed(seed)
		if err != nil {
			run.Steps = append(run.Steps, StepResult{Name: strings.Join(names(sources), ","), InInit: true, AtMS: x.at(t), MS: ms(time.Since(t)),
				Instances: []Instance{in}, Error: err.Error()})
			return &StepError{Step: strings.Join(names(sources), ","), Err: err}
		}
		x.stage = seed
		var took map[string]float64
		_ = json.Unmarshal(out, &took)
		for i, st := range sources {
			r := StepResult{Name: st.Name, InInit: true, AtMS: x.at(t), MS: took[st.Name], Nodes: nodes([]Instance{in})}
			if i == 0 {
				r.Instances = []Instance{in}
			}
			run.Steps = append(run.Steps, r)
		}
	}
	if run.Transfer == TransferStorage {
		// The source steps run concurrently, each storing its result.
		res := make([]StepResult, len(sources))
		errs := make([]error, len(sources))
		var wg sync.WaitGroup
		for i, st := range sources {
			key := "mitosis:wf:" + run.ID + ":" + st.Name
			x.keys[st.Name] = key
			wg.Add(1)
			go func() {
				defer wg.Done()
				t := time.Now()
				in, _, err := x.invoke(ctx, map[string]any{"call": st.Call, "source": true, "input": input, "store": key, "store_ttl": x.storeTTL()}, "")
				res[i] = StepResult{Name: st.Name, AtMS: x.at(t), MS: ms(time.Since(t)), Instances: []Instance{in}, Nodes: nodes([]Instance{in})}
				errs[i] = err
			}()
		}
		wg.Wait()
		for i, st := range sources {
			if errs[i] != nil {
				res[i].Error = errs[i].Error()
				run.Steps = append(run.Steps, res[i])
				return &StepError{Step: st.Name, Err: errs[i]}
			}
			run.Steps = append(run.Steps, res[i])
		}
	}
	if err := x.steps(ctx, order); err != nil {
		return err
	}
	var last json.RawMessage
	for _, st := range order {
		if len(st.After) > 0 {
			last = x.results[st.Name]
		}
	}
	if sinks := spec.sinks(); len(sinks) == 1 {
		if v, ok := x.results[sinks[0]]; ok {
			last = v
		} else if v, err := x.resultOf(ctx, sinks[0], x.stage); err == nil {
			last = v
		}
	}
	run.Result = last
	return nil
}

// steps runs the non-source steps, each as soon as its upstream steps
// and, under fork, the step whose stage seed it forks from (Spec.Parent)
// have ended: independent branches run at the same time. Once a step
// fails no other starts; those running end, and the run fails with the
// first failure. The run records the steps that ran, in order.
func (x *execution) steps(ctx context.Context, order []*Step) error {
	var later []*Step
	done := map[string]chan struct{}{}
	for _, st := range order {
		if len(st.After) > 0 {
			later = append(later, st)
			done[st.Name] = make(chan struct{})
		}
	}
	results := make([]StepResult, len(later))
	ran := make([]bool, len(later))
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		first  error
		failed atomic.Bool
	)
	for i, st := range later {
		parent := x.spec.Parent(st.Name)
		deps := slices.Clone(st.After)
		if x.run.Transfer == TransferFork {
			deps = append(deps, parent)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(done[st.Name])
			for _, d := range deps {
				if c, ok := done[d]; ok { // a source, or "": done already
					<-c
				}
			}
			if failed.Load() {
				return
			}
			r, err := x.step(ctx, st, parent)
			mu.Lock()
			defer mu.Unlock()
			results[i], ran[i] = r, true
			if err != nil && first == nil {
				first = &StepError{Step: st.Name, Err: err}
				failed.Store(true)
			}
		}()
	}
	wg.Wait()
	for i := range later {
		if ran[i] {
			x.run.Steps = append(x.run.Steps, results[i])
		}
	}
	return first
}

// at is t in ms after the run's start.
func (x *execution) at(t time.Time) float64 { return ms(t.Sub(x.run.Started)) }

// step runs one non-source step: one instance, or one per element of its
// Map step's list, all at once. Its instances fork from the seed that
// holds its upstream steps' state (fork): the stage seed of parent (the
// kept step Spec.Parent names) if any, else the run's seed. A kept step (Spec.Kept)
// keeps its result: under fork its instance is kept as a stage seed, under
// storage the result is pickled into Redis.
func (x *execution) step(ctx context.Context, st *Step, parent string) (StepResult, error) {
	t0 := time.Now()
	res := StepResult{Name: st.Name, AtMS: x.at(t0)}
	base := map[string]any{"call": st.Call, "name": st.Name}
	// The arguments: the sources first, then the other upstreams, each
	// in the order After lists them. A kept upstream's result is taken
	// in place (fork) or loaded (storage); a fan-out's list is given.
	var after, later []string
	given := map[string]json.RawMessage{}
	load := map[string]string{}
	x.mu.Lock() // other branches' steps record theirs meanwhile
	for _, a := range st.After {
		up := x.spec.step(a)
		if len(up.After) == 0 {
			after = append(after, a)
		} else {
			later = append(later, a)
		}
		if up.Map != "" {
			given[a] = x.results[a]
		}
		if k, ok := x.keys[a]; ok {
			load[a] = k
		}
	}
	after = append(after, later...)
	from := x.stage
	if parent != "" {
		if seed, ok := x.seedOf[parent]; ok {
			from = seed
		}
	}
	x.mu.Unlock()
	base["after"] = after
	if len(given) > 0 {
		base["given"] = given
	}
	if len(load) > 0 {
		base["load"] = load
	}
	var items []json.RawMessage
	if st.Map != "" {
		v, err := x.resultOf(ctx, st.Map, from)
		if err != nil {
			return res, fmt.Errorf("read the list of %s to map over: %w", st.Map, err)
		}
		if err := json.Unmarshal(v, &items); err != nil {
			return res, fmt.Errorf("step %s maps over %s, whose result is not a JSON list: %s", st.Name, st.Map, abbrev(v))
		}
	}
	keep := x.spec.Kept(st.Name)
	key := ""
	if keep {
		res.Kept = true
		if x.run.Transfer == TransferStorage {
			key = "mitosis:wf:" + x.run.ID + ":" + st.Name
			base["store"], base["store_ttl"] = key, x.storeTTL()
		} else {
			base["keep"] = true
		}
	}
	n := 1
	if st.Map != "" {
		n = len(items)
	}
	ins := make([]Instance, n)
	outs := make([]json.RawMessage, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	var failed atomic.Bool  // an instance failed: start no more
	var slots chan struct{} // Step.MaxConcurrency
	if st.MaxConcurrency > 0 && st.MaxConcurrency < n {
		slots = make(chan struct{}, st.MaxConcurrency)
	}
	for i := 0; i < n; i++ {
		req := map[string]any{}
		for k, v := range base {
			req[k] = v
		}
		if st.Map != "" {
			req["item"] = items[i]
		}
		if slots != nil {
			select { // in the list's order
			case slots <- struct{}{}:
			case <-ctx.Done():
				errs[i] = ctx.Err()
				continue
			}
			if failed.Load() {
				<-slots
				errs[i] = errors.New("not run: another instance of the step failed")
				continue
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if slots != nil {
				defer func() { <-slots }()
			}
			at := x.at(time.Now())
			defer func() { ins[i].AtMS = at }()
			if keep && key == "" {
				var seed string
				ins[i], outs[i], seed, errs[i] = x.invokeAs(ctx, req, from, true)
				x.addSeed(seed)
				if errs[i] == nil {
					x.mu.Lock()
					x.seedOf[st.Name] = seed
					x.mu.Unlock()
				}
				return
			}
			ins[i], outs[i], errs[i] = x.invoke(ctx, req, from)
			if errs[i] != nil {
				failed.Store(true)
			}
		}()
	}
	wg.Wait()
	res.MS = ms(time.Since(t0))
	res.Instances = ins
	res.Nodes = nodes(ins)
	for i, err := range errs {
		if err != nil {
			if n > 1 {
				err = fmt.Errorf("instance %d (item %s): %w", i, abbrev(items[i]), err)
			}
			res.Error = err.Error()
			return res, err
		}
	}
	var out json.RawMessage
	if st.Map != "" {
		b, _ := json.Marshal(outs)
		out = b
	} else {
		out = outs[0]
	}
	x.mu.Lock()
	x.results[st.Name] = out
	if key != "" {
		x.keys[st.Name] = key
	}
	x.mu.Unlock()
	return res, nil
}

// storeTTL is the expiry of the run's storage keys, in seconds: the stage
// seeds' TTL (Runner.StageTTL), so a runner that dies leaves neither.
func (x *execution) storeTTL() int {
	return int(max(x.rn.stageTTL().Seconds(), 1))
}

// keepAlive renews the run's stage seeds and storage keys every third of
// their TTL until the returned stop is called.
func (x *execution) keepAlive() (stop func()) {
	ttl := x.rn.stageTTL()
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(ttl / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			x.renew(ttl)
		}
	}()
	return func() { close(done); wg.Wait() }
}

// renew re-arms the TTL of the run's stage seeds and storage keys. Errors
// are left for the steps to meet: a seed or key that is gone fails the
// step that needs it.
func (x *execution) renew(ttl time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), ttl/3)
	defer cancel()
	x.mu.Lock()
	seeds := slices.Clone(x.seeds)
	fn, runFn := x.fn, x.runFn
	x.mu.Unlock()
	if runFn {
		b, _ := json.Marshal(gwapi.RenewFunctionRequest{FunctionName: fn})
		_, _, _ = x.rn.do(ctx, "PATCH", "/system/functions", b)
	}
	for _, s := range seeds {
		b, _ := json.Marshal(gwapi.RenewStageSeedRequest{FunctionName: fn, Seed: s, TTL: ttl.String()})
		_, _, _ = x.rn.do(ctx, "PATCH", "/system/stage-seeds", b)
	}
	if x.rdb != nil {
		iter := x.rdb.Scan(ctx, 0, "mitosis:wf:"+x.run.ID+":*", 1000).Iterator()
		for iter.Next(ctx) {
			x.rdb.Expire(ctx, iter.Val(), ttl)
		}
	}
}

// addSeed records a stage seed the run made (none for ""), for cleanup.
func (x *execution) addSeed(seed string) {
	if seed == "" {
		return
	}
	x.mu.Lock()
	x.seeds = append(x.seeds, seed)
	x.mu.Unlock()
}

// resultOf reads a kept step's result as JSON, through a child of seed
// (fork: in place; a seed that holds the step's state) or from storage.
func (x *execution) resultOf(ctx context.Context, name, seed string) (json.RawMessage, error) {
	req := map[string]any{"result_of": name}
	x.mu.Lock()
	if k, ok := x.keys[name]; ok {
		req["load"] = map[string]string{name: k}
	}
	x.mu.Unlock()
	_, out, err := x.invoke(ctx, req, seed)
	return out, err
}

// reply is the step runtime's answer.
type reply struct {
	Result json.RawMessage `json:"result"`
	Stored string          `json:"stored"`
	Bytes  int64           `json:"bytes"`
	T      struct {
		LoadMS  float64 `json:"load_ms"`
		DeserMS float64 `json:"deser_ms"`
		SerMS   float64 `json:"ser_ms"`
		StoreMS float64 `json:"store_ms"`
		RunMS   float64 `json:"run_ms"`
		BytesIn int64   `json:"bytes_in"`
	} `json:"t"`
}

// invoke runs one step instance through the gateway: a child of the
// stage seed from (NODE/SEED), or of the function's own seed if from is "".
func (x *execution) invoke(ctx context.Context, req map[string]any, from string) (Instance, json.RawMessage, error) {
	in, out, _, err := x.invokeAs(ctx, req, from, false)
	return in, out, err
}

// invokeAs runs one step instance, forked from from (see invoke); with
// stage it is kept as a stage seed once it answered, and its NODE/SEED is
// returned (also with an error, if the seed was made: it must be removed).
func (x *execution) invokeAs(ctx context.Context, req map[string]any, from string, stage bool) (Instance, json.RawMessage, string, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return Instance{}, nil, "", err
	}
	t0 := time.Now()
	deadline := t0.Add(x.rn.timeout())
	var (
		resp *http.Response
		body []byte
	)
	for {
		hreq, err := http.NewRequestWithContext(ctx, "POST", x.rn.Gateway+"/function/"+x.fn, bytes.NewReader(b))
		if err != nil {
			return Instance{}, nil, "", err
		}
		x.rn.auth(hreq)
		if from != "" {
			hreq.Header.Set(gwapi.HeaderSeed, from)
		}
		if stage {
			hreq.Header.Set(gwapi.HeaderStage, "true")
			hreq.Header.Set(gwapi.HeaderStageTTL, x.rn.stageTTL().String())
		}
		if resp, err = x.rn.client().Do(hreq); err != nil {
			return Instance{}, nil, "", err
		}
		body, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return Instance{}, nil, "", err
		}
		// 429: the cluster is at capacity for now; a workflow waits
		// its turn rather than failing (until the step's bound).
		if resp.StatusCode != http.StatusTooManyRequests || time.Now().After(deadline) {
			break
		}
		wait := 200 * time.Millisecond
		if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
			wait = min(time.Duration(s)*time.Second, time.Until(deadline))
		}
		select {
		case <-ctx.Done():
			return Instance{}, nil, "", ctx.Err()
		case <-time.After(wait):
		}
	}
	in := Instance{Node: resp.Header.Get("X-Mitosis-Node"), MS: ms(time.Since(t0)),
		StartMS: hdrMS(resp.Header, "X-Mitosis-Start-Seconds"), RunMS: hdrMS(resp.Header, "X-Mitosis-Run-Seconds")}
	seed := resp.Header.Get(gwapi.HeaderSeed)
	if !stage {
		seed = ""
	}
	if resp.StatusCode != http.StatusOK {
		return in, nil, seed, fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}
	if stage && seed == "" {
		return in, nil, "", fmt.Errorf("the gateway kept no stage seed of the instance (no %s header in its response)", gwapi.HeaderSeed)
	}
	var r reply
	if err := json.Unmarshal(body, &r); err != nil {
		return in, nil, seed, fmt.Errorf("malformed step reply %s: %w", abbrev(body), err)
	}
	in.CallMS, in.LoadMS, in.DeserMS, in.SerMS, in.StoreMS = r.T.RunMS, r.T.LoadMS, r.T.DeserMS, r.T.SerMS, r.T.StoreMS
	in.BytesIn, in.BytesOut = r.T.BytesIn, r.Bytes
	return in, r.Result, seed, nil
}

// cleanup removes what the run made: its stage seeds (the instances that
// ran the sources and the kept steps, and every node's import of them),
// its own function (Runner.SeedPerRun) and its storage keys. The
// workflow's function stays deployed for the next run (Runner.Remove).
func (x *execution) cleanup() error {
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Newest first: a stage seed made of a child of another pages from
	// it until it is removed.
	for i := len(x.seeds) - 1; i >= 0; i-- {
		b, _ := json.Marshal(gwapi.DeleteStageSeedRequest{FunctionName: x.fn, Seed: x.seeds[i]})
		code, body, err := x.rn.do(ctx, "DELETE", "/system/stage-seeds", b)
		if err != nil {
			errs = append(errs, fmt.Errorf("remove stage seed %s: %w", x.seeds[i], err))
		} else if code != http.StatusAccepted {
			errs = append(errs, fmt.Errorf("remove stage seed %s: HTTP %d: %s", x.seeds[i], code, strings.TrimSpace(string(body))))
		}
	}
	if x.runFn {
		if err := x.rn.deleteFunction(ctx, x.fn); err != nil {
			errs = append(errs, err)
		}
		if err := os.RemoveAll(x.rn.functionDir(x.spec) + "-" + x.run.ID); err != nil {
			errs = append(errs, err)
		}
		x.rn.sweepRunDirs(ctx, x.spec) // and those of killed runs
	}
	if x.rdb != nil {
		// Every key of the run, including those of instances that
		// stored before a sibling failed.
		var keys []string
		iter := x.rdb.Scan(ctx, 0, "mitosis:wf:"+x.run.ID+":*", 1000).Iterator()
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
		if err := iter.Err(); err != nil {
			errs = append(errs, fmt.Errorf("list storage keys: %w", err))
		} else if len(keys) > 0 {
			if err := x.rdb.Del(ctx, keys...).Err(); err != nil {
				errs = append(errs, fmt.Errorf("delete storage keys: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}

func (rn *Runner) stageTTL() time.Duration {
	if rn.StageTTL > 0 {
		return max(rn.StageTTL, time.Second)
	}
	return 2 * time.Minute
}

func (rn *Runner) timeout() time.Duration {
	if rn.Timeout > 0 {
		return rn.Timeout
	}
	return 5 * time.Minute
}

func (rn *Runner) client() *http.Client {
	if rn.HTTP != nil {
		return rn.HTTP
	}
	return &http.Client{Timeout: 10 * time.Minute}
}

func (rn *Runner) auth(r *http.Request) {
	switch {
	case rn.Token != "":
		r.Header.Set("Authorization", "Bearer "+rn.Token)
	case rn.User != "":
		r.SetBasicAuth(rn.User, rn.Password)
	}
}

func (rn *Runner) do(ctx context.Context, method, path string, body []byte) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, rn.Gateway+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	rn.auth(req)
	resp, err := rn.client().Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

func hdrMS(h http.Header, k string) float64 {
	v, _ := strconv.ParseFloat(h.Get(k), 64)
	return v * 1000
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func nodes(ins []Instance) []string {
	seen := map[string]bool{}
	var out []string
	for _, in := range ins {
		if in.Node != "" && !seen[in.Node] {
			seen[in.Node] = true
			out = append(out, in.Node)
		}
	}
	sort.Strings(out)
	return out
}

func names(steps []*Step) []string {
	var out []string
	for _, s := range steps {
		out = append(out, s.Name)
	}
	return out
}

func abbrev(b []byte) string {
	if len(b) > 120 {
		return string(b[:120]) + "…"
	}
	return string(b)
}
