package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/directory"
	"github.com/mitosis-fork/mitosis/workflow"
)

// Workflows through the gateway (a mitosis extension): a workflow's
// definition is deployed with POST /system/workflows and run with POST
// /workflow/NAME, so a client needs nothing but an HTTP client. The
// gateway runs it with package workflow's Runner, whose calls (deploying
// the workflow's function, invoking the steps, keeping and removing the
// run's stage seeds) go through this gateway's own handlers in process,
// with the caller's credentials: a run does what its caller may do. The
// definition is stored as an annotation of the workflow's function
// (workflow.SpecOf), so every gateway of the cluster runs a workflow any
// of them (or `mitosis workflow deploy`) deployed.

// WorkflowConfig configures the workflows the gateway runs.
type WorkflowConfig struct {
	// RedisSocket is the unix socket of the Redis server of the storage
	// transfer, which every node must reach at that path; without it a
	// run under storage is refused.
	RedisSocket string
	// WorkDir holds each workflow's function directory (the step
	// runtime); every node must see it at the same path (default
	// os.TempDir()).
	WorkDir string
	// StepTimeout bounds one step instance (default 5 minutes).
	StepTimeout time.Duration
	// StageTTL is the lease of a run's stage seeds and keys, renewed
	// while the run goes on (default 2 minutes).
	StageTTL time.Duration
	// RunTTL is how long the directory keeps a run's record, which every
	// gateway of the cluster serves (GET /system/workflow-runs; default
	// 24 hours).
	RunTTL time.Duration
}

// WorkflowStatus is an element of GET /system/workflows.
type WorkflowStatus struct {
	Name     string   `json:"name"`
	Function string   `json:"function"` // the workflow's function (its step runtime)
	Dir      string   `json:"dir"`
	Module   string   `json:"module"`
	Transfer string   `json:"transfer"` // the definition's default
	Steps    []string `json:"steps"`
	// Error is why the function's definition cannot be read (a function
	// deployed by an older runner: deploy the workflow again).
	Error string `json:"error,omitempty"`
}

// workflowRunner returns a Runner whose calls go through g's handlers with
// r's credentials.
func (g *Gateway) workflowRunner(r *http.Request) *workflow.Runner {
	c := g.cfg.Workflows
	rn := &workflow.Runner{
		Gateway:     "http://gateway.in-process",
		HTTP:        &http.Client{Transport: inProcess{g.mux}},
		RedisSocket: c.RedisSocket,
		WorkDir:     c.WorkDir,
		Timeout:     c.StepTimeout,
		StageTTL:    c.StageTTL,
	}
	if user, pass, ok := r.BasicAuth(); ok {
		rn.User, rn.Password = user, pass
	} else if tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		rn.Token = tok
	}
	return rn
}

// workflowSpec returns the definition of workflow name, or the HTTP status
// and error to answer. A function the directory's view does not have yet
// (deployed an instant ago, through another gateway) is read from the
// directory itself.
func (g *Gateway) workflowSpec(ctx context.Context, name string) (*workflow.Spec, int, error) {
	fn := workflow.FunctionName(&workflow.Spec{Name: name})
	fr, ok := g.function(fn)
	if !ok {
		if f, err := g.dir.GetFunction(ctx, fn); err == nil {
			fr, err = decodeRecord(f)
			ok = err == nil
		}
	}
	if !ok || meta(&fr.Deployment, workflow.AnnotationWorkflow) != name {
		return nil, http.StatusNotFound, fmt.Errorf("workflow %q not found: deploy it with POST /system/workflows", name)
	}
	spec, err := workflow.SpecOf(annotations(&fr.Deployment))
	if err != nil {
		return nil, http.StatusConflict, fmt.Errorf("workflow %s: %w", name, err)
	}
	return spec, 0, nil
}

func annotations(d *FunctionDeployment) map[string]string {
	if d.Annotations == nil {
		return nil
	}
	return *d.Annotations
}

// deployWorkflow: POST /system/workflows with a workflow definition (JSON;
// its dir an absolute path every node sees). 202 when it deployed the
// workflow's function, 200 when the same definition and module were
// deployed already.
func (g *Gateway) deployWorkflow(w http.ResponseWriter, r *http.Request) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
	if err != nil {
		httpError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("workflow definition: %v", err))
		return
	}
	spec, err := workflow.ParseSpec(b)
	if err == nil {
		err = spec.Validate()
	}
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	deployed, err := g.workflowRunner(r).Deploy(r.Context(), spec)
	if err != nil {
		g.log.Warn("workflow deploy failed", "workflow", spec.Name, "err", err)
		httpError(w, http.StatusBadGateway, err.Error())
		return
	}
	g.log.Info("workflow deploy", "workflow", spec.Name, "function", workflow.FunctionName(spec), "deployed", deployed)
	code := http.StatusOK
	if deployed {
		code = http.StatusAccepted
	}
	writeJSON(w, code, map[string]any{"name": spec.Name, "function": workflow.FunctionName(spec), "deployed": deployed})
}

// listWorkflows: GET /system/workflows.
func (g *Gateway) listWorkflows(w http.ResponseWriter, r *http.Request) {
	out := []WorkflowStatus{}
	for _, f := range g.view.Functions() {
		fr, err := decodeRecord(f)
		if err != nil {
			continue
		}
		name := meta(&fr.Deployment, workflow.AnnotationWorkflow)
		if name == "" || workflow.FunctionName(&workflow.Spec{Name: name}) != f.Name {
			continue // not a workflow's function (a run's own, or another)
		}
		ws := WorkflowStatus{Name: name, Function: f.Name, Steps: []string{}}
		if spec, err := workflow.SpecOf(annotations(&fr.Deployment)); err != nil {
			ws.Error = err.Error()
		} else {
			ws.Dir, ws.Module, ws.Transfer = spec.Dir, spec.Module, string(spec.Transfer)
			for _, st := range spec.Steps {
				ws.Steps = append(ws.Steps, st.Name)
			}
		}
		out = append(out, ws)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	writeJSON(w, http.StatusOK, out)
}

// deleteWorkflow: DELETE /system/workflows {"name": NAME} removes the
// workflow's function (its seed and instances on every node) and its
// function directory.
func (g *Gateway) deleteWorkflow(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Name string `json:"name"`
	}
	if b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 64<<10)); err != nil || json.Unmarshal(b, &req) != nil || req.Name == "" {
		httpError(w, http.StatusBadRequest, `want {"name": WORKFLOW}`)
		return
	}
	spec, code, err := g.workflowSpec(r.Context(), req.Name)
	if err != nil && code == http.StatusNotFound {
		httpError(w, code, err.Error())
		return
	}
	if err != nil { // no readable definition: remove the function alone
		spec = &workflow.Spec{Name: req.Name}
	}
	if err := g.workflowRunner(r).Remove(r.Context(), spec); err != nil {
		httpError(w, http.StatusBadGateway, err.Error())
		return
	}
	g.log.Info("workflow removed", "workflow", req.Name)
	w.WriteHeader(http.StatusAccepted)
}

// runWorkflow: POST /workflow/NAME runs a deployed workflow with the body
// as its input (JSON; empty: null) and answers with the run's record
// (workflow.Run: its result, every step's timings and nodes): 200, or 500
// with the record and its error when a step failed. Query parameters:
// transfer=fork|storage (default: the definition's), seed_per_run=true
// (Runner.SeedPerRun). The run ends with the request: a client that hangs
// up cancels it, and what it made is removed; so does a gateway that
// closes, before it stops serving.
func (g *Gateway) runWorkflow(w http.ResponseWriter, r *http.Request) {
	job, ok := g.workflowJob(w, r)
	if !ok {
		return
	}
	if !g.track() {
		httpError(w, http.StatusServiceUnavailable, "the gateway is shutting down")
		return
	}
	defer g.untrack()
	// The run ends with the request or when the gateway starts closing;
	// the gateway's HTTP server waits for its cleanup, which the gateway
	// still serves.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	defer context.AfterFunc(g.wfCtx, cancel)()
	run, err := job.rn.Run(ctx, job.spec, job.input, job.transfer)
	code, body := g.workflowRecord(job, run, err, false)
	g.fileRun(g.wfRuns.end("", job.spec.Name, run, false))
	if run != nil {
		w.Header().Set("X-Mitosis-Run", run.ID)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write(body)
}

// asyncWorkflow: POST /async-workflow/NAME runs a workflow as
// /workflow/NAME does, in the background: 202 with X-Call-Id at once, and
// the run's record POSTed to the X-Callback-Url (if given) when it ends,
// with X-Call-Id, X-Workflow-Name, X-Workflow-Status (200, or 500 when a
// step failed), X-Mitosis-Run and X-Duration-Seconds. At most
// maxAsyncWorkflows run at once (429 beyond); closing the gateway cancels
// them, and each removes what it made.
func (g *Gateway) asyncWorkflow(w http.ResponseWriter, r *http.Request) {
	cb, ok := callbackURL(w, r)
	if !ok {
		return
	}
	job, ok := g.workflowJob(w, r)
	if !ok {
		return
	}
	id := r.Header.Get("X-Call-Id")
	if id == "" {
		id = callID()
	} else if len(id) > 128 || strings.ContainsAny(id, "/ \t\r\n") {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("X-Call-Id %q: want at most 128 bytes with no '/' or white space", id))
		return
	}
	// Cancelled by the gateway closing, or by DELETE
	// /system/workflow-runs/ID on any gateway (watchRunCancels).
	ctx, cancel := context.WithCancelCause(g.wfCtx)
	if !g.wfRuns.start(id, job.spec.Name, cancel) {
		cancel(nil)
		httpError(w, http.StatusConflict, fmt.Sprintf("X-Call-Id %q names a workflow run still running on this gateway", id))
		return
	}
	if notFiled, err := g.fileRunStart(r.Context(), id, job.spec.Name); err != nil {
		g.wfRuns.forget(id)
		cancel(nil)
		httpError(w, http.StatusConflict, err.Error())
		return
	} else if notFiled {
		g.log.Warn("workflow run not filed in the directory; only this gateway serves its record", "call_id", id)
	}
	select {
	case g.wfSlots <- struct{}{}:
	default:
		g.wfRuns.forget(id)
		cancel(nil)
		g.dropRunStart(id)
		w.Header().Set("Retry-After", "1")
		httpError(w, http.StatusTooManyRequests, fmt.Sprintf("%d workflow runs in the background already", cap(g.wfSlots)))
		return
	}
	if !g.track() {
		<-g.wfSlots
		g.wfRuns.forget(id)
		cancel(nil)
		g.dropRunStart(id)
		httpError(w, http.StatusServiceUnavailable, "the gateway is shutting down")
		return
	}
	go func() {
		defer g.untrack()
		defer func() { <-g.wfSlots }()
		defer cancel(nil)
		start := time.Now()
		run, err := job.rn.Run(ctx, job.spec, job.input, job.transfer)
		cancelled := err != nil && errors.Is(context.Cause(ctx), errRunCancelled)
		if cancelled && run != nil {
			run.Error = fmt.Sprintf("%v: %s", errRunCancelled, run.Error)
		}
		code, body := g.workflowRecord(job, run, err, cancelled)
		g.fileRun(g.wfRuns.end(id, job.spec.Name, run, cancelled))
		if cb == "" {
			return
		}
		h := http.Header{
			"Content-Type":       {"application/json"},
			"X-Call-Id":          {id},
			"X-Workflow-Name":    {job.spec.Name},
			"X-Workflow-Status":  {strconv.Itoa(code)},
			"X-Duration-Seconds": {strconv.FormatFloat(time.Since(start).Seconds(), 'f', 6, 64)},
		}
		if run != nil {
			h.Set("X-Mitosis-Run", run.ID)
		}
		g.postCallback(g.wfCtx, callbackClient, cb, body, h, "workflow", job.spec.Name)
	}()
	w.Header().Set("X-Call-Id", id)
	w.WriteHeader(http.StatusAccepted)
}

// track adds a workflow run to g.wg, which Close waits for, unless the
// gateway is closing. Under stageMu: a run starting now either sees the
// gateway closing (wfCtx) or joins g.wg before Close waits for it.
func (g *Gateway) track() bool {
	g.stageMu.Lock()
	defer g.stageMu.Unlock()
	if g.wfCtx.Err() != nil {
		return false
	}
	g.wg.Add(1)
	g.m.wfRunning.Inc()
	return true
}

// untrack ends what track began.
func (g *Gateway) untrack() {
	g.m.wfRunning.Dec()
	g.wg.Done()
}

// callbackClient posts the records of workflow runs to their
// X-Callback-Url.
var callbackClient = &http.Client{Timeout: 30 * time.Second}

// maxAsyncWorkflows bounds the workflow runs in the background
// (/async-workflow/NAME).
const maxAsyncWorkflows = 16

// keptRuns is how many ended workflow runs a gateway keeps the records of
// (GET /system/workflow-runs), newest first.
const keptRuns = 256

// WorkflowRun is an element of GET /system/workflow-runs: a run a
// gateway of the cluster ran, ended or (in the background) still running.
type WorkflowRun struct {
	CallID   string    `json:"call_id,omitempty"` // /async-workflow's X-Call-Id
	Status   string    `json:"status"`            // running, succeeded, failed, cancelled or lost (Note)
	Workflow string    `json:"workflow"`
	Started  time.Time `json:"started"`
	// Gateway is the gateway that ran it (Config.Name: mitosis gateway
	// --listen).
	Gateway string `json:"gateway,omitempty"`
	// StepsOmitted says the record was filed without its steps and
	// result: with them it exceeded directory.MaxRunRecord.
	StepsOmitted bool `json:"steps_omitted,omitempty"`
	// Note explains a status: why a run is lost.
	Note string `json:"note,omitempty"`
	// Run is the run's record once it ended (id, steps, timings, result).
	Run *workflow.Run `json:"run,omitempty"`
}

// wfRuns are the records of the workflow runs a gateway ran.
type wfRuns struct {
	mu      sync.Mutex
	running map[string]*WorkflowRun // by call id
	ended   []*WorkflowRun          // oldest first, at most keptRuns
	// cancels cancel the runs in the background, by call id.
	cancels map[string]context.CancelCauseFunc
}

// errRunCancelled is the cause of a run's end that DELETE
// /system/workflow-runs/ID asked for.
var errRunCancelled = errors.New("cancelled by DELETE /system/workflow-runs")

// start records a run in the background, which cancel cancels (nil: it
// cannot be), unless one with that call id is running.
func (w *wfRuns) start(callID, name string, cancel context.CancelCauseFunc) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.running == nil {
		w.running = map[string]*WorkflowRun{}
		w.cancels = map[string]context.CancelCauseFunc{}
	}
	if _, ok := w.running[callID]; ok {
		return false
	}
	w.running[callID] = &WorkflowRun{CallID: callID, Status: "running", Workflow: name, Started: time.Now().UTC()}
	if cancel != nil {
		w.cancels[callID] = cancel
	}
	return true
}

// cancel cancels the run in the background with that call id, and says
// whether there was one.
func (w *wfRuns) cancel(callID string) bool {
	w.mu.Lock()
	cancel, ok := w.cancels[callID]
	w.mu.Unlock()
	if ok {
		cancel(errRunCancelled)
	}
	return ok
}

// forget drops a run start recorded that did not start after all.
func (w *wfRuns) forget(callID string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.running, callID)
	delete(w.cancels, callID)
}

// end records a run's end (callID "" for a run answered synchronously)
// and returns its record.
func (w *wfRuns) end(callID, name string, run *workflow.Run, cancelled bool) WorkflowRun {
	w.mu.Lock()
	defer w.mu.Unlock()
	rec := w.running[callID]
	delete(w.running, callID)
	delete(w.cancels, callID)
	if rec == nil {
		rec = &WorkflowRun{CallID: callID, Workflow: name, Started: time.Now().UTC()}
	}
	rec.Status, rec.Run = "succeeded", run
	switch {
	case cancelled:
		rec.Status = "cancelled"
	case run == nil || run.Error != "":
		rec.Status = "failed"
	}
	if run != nil {
		rec.Started = run.Started
	}
	w.ended = append(w.ended, rec)
	if len(w.ended) > keptRuns {
		w.ended = slices.Delete(w.ended, 0, len(w.ended)-keptRuns)
	}
	return *rec
}

// list returns the runs, running ones first, then ended ones newest first.
func (w *wfRuns) list() []WorkflowRun {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := []WorkflowRun{}
	for _, r := range w.running {
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Started.After(out[j].Started) })
	for i := len(w.ended) - 1; i >= 0; i-- {
		out = append(out, *w.ended[i])
	}
	return out
}

// listWorkflowRuns: GET /system/workflow-runs[?workflow=NAME] lists the
// runs of the cluster's gateways that the directory holds (of the latest
// 256 filed, those running in the background and those that ended within
// the run TTL, latest started first), without their steps; GET
// /system/workflow-runs/ID gives one in full, by its run id or its call id.
// A run this gateway could not file (the directory unreachable) is
// served by id from its memory (its last 256), and the list is when the
// directory does not answer.
func (g *Gateway) listWorkflowRuns(w http.ResponseWriter, r *http.Request) {
	name := r.URL.Query().Get("workflow")
	runs, err := g.filedRuns(r.Context())
	if err != nil {
		g.log.Warn("workflow runs: the directory does not answer; listing this gateway's own", "err", err)
		runs = g.wfRuns.list()
	}
	out := []WorkflowRun{}
	for _, wr := range runs {
		if name != "" && wr.Workflow != name {
			continue
		}
		if wr.Run != nil {
			brief := *wr.Run
			brief.Steps, brief.Result = nil, nil
			wr.Run = &brief
		}
		out = append(out, wr)
	}
	writeJSON(w, http.StatusOK, out)
}

func (g *Gateway) getWorkflowRun(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if wr, err := g.filedRun(r.Context(), id); err == nil {
		writeJSON(w, http.StatusOK, wr)
		return
	}
	for _, wr := range g.wfRuns.list() {
		if wr.CallID == id || (wr.Run != nil && wr.Run.ID == id) {
			writeJSON(w, http.StatusOK, wr)
			return
		}
	}
	httpError(w, http.StatusNotFound, fmt.Sprintf("workflow run %q not found: the directory keeps runs for %v", id, g.runTTL()))
}

// cancelWorkflowRun: DELETE /system/workflow-runs/ID cancels a run in the
// background by its X-Call-Id, on any gateway: the gateway running it
// cancels it (at once if it is this one, else once the directory tells it:
// watchRunCancels), its steps' instances end on their nodes, what it made
// is removed, and its record ends failed, its error starting "cancelled by
// DELETE /system/workflow-runs". 202 when asked; 404 for a run the
// directory does not hold; 409 for one that ended.
func (g *Gateway) cancelWorkflowRun(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if g.wfRuns.cancel(id) {
		writeJSON(w, http.StatusAccepted, map[string]string{"cancelled": id, "gateway": g.cfg.Name})
		return
	}
	wr, err := g.filedRun(r.Context(), id)
	if errors.Is(err, directory.ErrNotFound) {
		httpError(w, http.StatusNotFound, fmt.Sprintf("workflow run %q not found: give the X-Call-Id of a run in the background", id))
		return
	}
	if err != nil {
		httpError(w, http.StatusBadGateway, fmt.Sprintf("cancel workflow run %q: %v", id, err))
		return
	}
	if wr.CallID == "" {
		httpError(w, http.StatusConflict, fmt.Sprintf("workflow run %q is not a run in the background: a run answered synchronously ends when its client hangs up", id))
		return
	}
	if wr.Status != "running" {
		httpError(w, http.StatusConflict, fmt.Sprintf("workflow run %q ended (%s): nothing to cancel", id, wr.Status))
		return
	}
	if err := g.dir.CancelRun(r.Context(), wr.CallID, g.runTTL()); err != nil {
		httpError(w, http.StatusBadGateway, err.Error())
		return
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"cancelled": wr.CallID, "gateway": wr.Gateway})
}

// watchRunCancels cancels the runs in the background that a DELETE on
// another gateway asked to cancel.
func (g *Gateway) watchRunCancels() {
	defer g.wg.Done()
	for id := range g.dir.RunCancels(g.ctx) {
		if !g.wfRuns.cancel(id) {
			continue // another gateway's, or one that ended
		}
		ctx, cancel := context.WithTimeout(g.ctx, 5*time.Second)
		if err := g.dir.ForgetRunCancel(ctx, id); err != nil {
			g.log.Warn("workflow run cancelled, but its cancel request stays until its TTL", "call_id", id, "err", err)
		}
		cancel()
	}
}

// runTTL is how long the directory keeps run records.
func (g *Gateway) runTTL() time.Duration {
	if t := g.cfg.Workflows.RunTTL; t > 0 {
		return t
	}
	return 24 * time.Hour
}

// fileRunStart files a run in the background as running under its call
// id, so that every gateway lists it and none starts another run with that
// id. It fails when a gateway of the cluster runs one with that id; it
// says notFiled when the directory did not answer (the run goes on,
// known to this gateway alone).
func (g *Gateway) fileRunStart(ctx context.Context, callID, name string) (notFiled bool, err error) {
	rec := WorkflowRun{CallID: callID, Status: "running", Workflow: name, Started: time.Now().UTC(), Gateway: g.cfg.Name}
	b, _ := json.Marshal(rec)
	old, created, err := g.dir.CreateRun(ctx, callID, b, g.runTTL(), g.runSession)
	if err != nil {
		return true, nil
	}
	if created {
		// A cancel asked for an earlier run with this id is not this
		// run's.
		_ = g.dir.ForgetRunCancel(ctx, callID)
		return false, nil
	}
	var prev WorkflowRun
	if json.Unmarshal(old, &prev) == nil && prev.Status == "running" {
		if alive, err := g.dir.RunAlive(ctx, callID); err != nil || alive {
			return false, fmt.Errorf("X-Call-Id %q names a workflow run still running (on gateway %s, since %s)", callID, prev.Gateway, prev.Started.Format(time.RFC3339))
		}
		// Lost: the gateway that ran it stopped before it ended.
	}
	// An ended (or lost) run's id is used again: its record gives way.
	// Marked first, so that the record never says running unmarked.
	_ = g.runSession.Mark(callID)
	if err := g.dir.PutRun(ctx, callID, "", b, g.runTTL()); err != nil {
		return true, nil
	}
	_ = g.dir.ForgetRunCancel(ctx, callID)
	return false, nil
}

// filedRun returns the record the directory holds under id (a call id or
// a run id); a run filed as running whose gateway no longer marks it comes
// back lost (lostRun).
func (g *Gateway) filedRun(ctx context.Context, id string) (WorkflowRun, error) {
	b, err := g.dir.GetRun(ctx, id)
	if err != nil {
		return WorkflowRun{}, err
	}
	var wr WorkflowRun
	if err := json.Unmarshal(b, &wr); err != nil {
		return WorkflowRun{}, fmt.Errorf("workflow run %q: malformed record: %w", id, err)
	}
	if wr.Status == "running" {
		if alive, err := g.dir.RunAlive(ctx, wr.CallID); err == nil && !alive {
			lostRun(&wr)
		}
	}
	return wr, nil
}

// lostRun is the note on a run filed as running whose gateway no longer
// marks it (directory.RunSession): it stopped before the run ended.
func lostRun(wr *WorkflowRun) {
	wr.Status = "lost"
	wr.Note = fmt.Sprintf("the gateway running it (%s) stopped before it ended", wr.Gateway)
}

// dropRunStart removes what fileRunStart filed for a run that did not
// start after all.
func (g *Gateway) dropRunStart(callID string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = g.runSession.Unmark(callID)
	if err := g.dir.DeleteRun(ctx, callID); err != nil {
		g.log.Warn("workflow run refused, but its record stays until its TTL", "call_id", callID, "err", err)
	}
}

// fileRun files an ended run's record in the directory: under its call id
// (and its run id as an alias) for a run in the background, under its run
// id otherwise. A record over directory.MaxRunRecord is filed without its
// steps and result. A run without a record (it failed before it began)
// is kept in this gateway's memory only.
func (g *Gateway) fileRun(wr WorkflowRun) {
	if wr.Run == nil {
		if wr.CallID != "" { // filed as running: now failed, with no run
			b, _ := json.Marshal(wr)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = g.dir.PutRun(ctx, wr.CallID, "", b, g.runTTL())
			_ = g.runSession.Unmark(wr.CallID)
		}
		return
	}
	wr.Gateway = g.cfg.Name
	id, alias := wr.Run.ID, ""
	if wr.CallID != "" {
		id, alias = wr.CallID, wr.Run.ID
	}
	b, _ := json.Marshal(wr)
	if len(b) > directory.MaxRunRecord {
		brief := *wr.Run
		brief.Steps, brief.Result = nil, nil
		wr.Run, wr.StepsOmitted = &brief, true
		b, _ = json.Marshal(wr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := g.dir.PutRun(ctx, id, alias, b, g.runTTL()); err != nil {
		g.log.Warn("workflow run not filed in the directory; only this gateway serves its record", "run", wr.Run.ID, "err", err)
	}
	if wr.CallID != "" {
		_ = g.runSession.Unmark(wr.CallID)
	}
}

// filedRuns returns the run records the directory holds, latest first.
func (g *Gateway) filedRuns(ctx context.Context) ([]WorkflowRun, error) {
	recs, err := g.dir.Runs(ctx, keptRuns)
	if err != nil {
		return nil, err
	}
	alive, err := g.dir.RunsAlive(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]WorkflowRun, 0, len(recs))
	for _, b := range recs {
		var wr WorkflowRun
		if json.Unmarshal(b, &wr) == nil {
			if _, ok := alive[wr.CallID]; wr.Status == "running" && !ok {
				lostRun(&wr)
			}
			out = append(out, wr)
		}
	}
	return out, nil
}

// workflowJob is a workflow run a request asked for.
type workflowJob struct {
	spec     *workflow.Spec
	input    []byte
	transfer workflow.Transfer
	rn       *workflow.Runner
}

// workflowJob reads a run request (/workflow/NAME, /async-workflow/NAME),
// or answers it with an error and returns false.
func (g *Gateway) workflowJob(w http.ResponseWriter, r *http.Request) (workflowJob, bool) {
	spec, code, err := g.workflowSpec(r.Context(), r.PathValue("name"))
	if err != nil {
		httpError(w, code, err.Error())
		return workflowJob{}, false
	}
	input, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.cfg.MaxBody))
	if err != nil {
		httpError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("workflow input: %v", err))
		return workflowJob{}, false
	}
	if input = bytes.TrimSpace(input); len(input) > 0 && !json.Valid(input) {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("workflow %s: the input is not JSON", spec.Name))
		return workflowJob{}, false
	}
	q := r.URL.Query()
	job := workflowJob{spec: spec, input: input, transfer: spec.Transfer, rn: g.workflowRunner(r)}
	if v := q.Get("transfer"); v != "" {
		if job.transfer, err = workflow.ParseTransfer(v); err != nil {
			httpError(w, http.StatusBadRequest, err.Error())
			return workflowJob{}, false
		}
	}
	if job.transfer == workflow.TransferStorage && g.cfg.Workflows.RedisSocket == "" {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("workflow %s: the storage transfer needs a Redis server, and this gateway has none (start it with --workflow-redis-socket)", spec.Name))
		return workflowJob{}, false
	}
	if v := q.Get("seed_per_run"); v != "" {
		if job.rn.SeedPerRun, err = strconv.ParseBool(v); err != nil {
			httpError(w, http.StatusBadRequest, fmt.Sprintf("seed_per_run=%q: want true or false", v))
			return workflowJob{}, false
		}
	}
	return job, true
}

// workflowRecord logs a run's end and returns its status and record (JSON)
// to answer: 200, or 500 when it failed.
func (g *Gateway) workflowRecord(job workflowJob, run *workflow.Run, err error, cancelled bool) (int, []byte) {
	if run == nil {
		g.m.wfRuns.WithLabelValues(job.spec.Name, string(job.transfer), runStatus(err, cancelled)).Inc()
		b, _ := json.Marshal(map[string]string{"error": err.Error()})
		return http.StatusInternalServerError, b
	}
	code := http.StatusOK
	if err != nil {
		code = http.StatusInternalServerError
		if run.Error == "" {
			run.Error = err.Error() // the run ended, its cleanup did not
		}
	}
	status := runStatus(err, cancelled)
	g.log.Info("workflow run", "workflow", job.spec.Name, "run", run.ID, "transfer", run.Transfer, "status", status, "ms", run.MS, "err", run.Error)
	g.m.wfRuns.WithLabelValues(job.spec.Name, string(run.Transfer), status).Inc()
	g.m.wfSeconds.WithLabelValues(job.spec.Name, string(run.Transfer)).Observe(run.MS / 1000)
	b, _ := json.Marshal(run)
	return code, b
}

// runStatus is a run's status by how it ended: succeeded, failed or
// cancelled (DELETE /system/workflow-runs/ID).
func runStatus(err error, cancelled bool) string {
	switch {
	case cancelled:
		return "cancelled"
	case err != nil:
		return "failed"
	}
	return "succeeded"
}

// inProcess is an http.RoundTripper that serves a request with a handler in
// this process: the gateway's own API, for the workflows it runs.
type inProcess struct{ h http.Handler }

func (t inProcess) RoundTrip(req *http.Request) (*http.Response, error) {
	r := req.Clone(req.Context())
	if r.Body == nil {
		r.Body = http.NoBody
	}
	r.RequestURI = req.URL.RequestURI()
	r.RemoteAddr = "in-process"
	rec := &recorder{header: http.Header{}}
	t.h.ServeHTTP(rec, r)
	if rec.code == 0 {
		rec.code = http.StatusOK
	}
	return &http.Response{
		Status:        fmt.Sprintf("%d %s", rec.code, http.StatusText(rec.code)),
		StatusCode:    rec.code,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        rec.header,
		Body:          io.NopCloser(&rec.body),
		ContentLength: int64(rec.body.Len()),
		Request:       req,
	}, nil
}

// recorder is the http.ResponseWriter of an inProcess request.
type recorder struct {
	header http.Header
	code   int
	body   bytes.Buffer
}

func (w *recorder) Header() http.Header { return w.header }

func (w *recorder) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
}

func (w *recorder) Write(b []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return w.body.Write(b)
}
