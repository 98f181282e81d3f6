// Package gateway is the mitosis serverless platform's front door: an
// OpenFaaS-compatible REST API (deploy, list, update, delete, invoke sync
// and async, health, Prometheus metrics) over a cluster of mitosis node
// daemons found in the cluster directory (etcd).
//
// Every invocation runs on the least-loaded live node with a free slot;
// how it gets an instance there is the function's policy: fork (one seed
// for the whole cluster, the child forked on the chosen node and paging
// from the seed's node), local-fork (a seed on every node), keep-alive
// (warm instances kept for a TTL) or cold (a new process per request). The
// gateway keeps every function deployed where its policy needs it and
// re-initializes a fork function on another node when its seed's node
// dies (see reconcile.go).
package gateway

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mitosis-fork/mitosis/directory"
	"github.com/mitosis-fork/mitosis/function"
	"github.com/mitosis-fork/mitosis/transport"
)

// Defaults of Config.
const (
	DefaultMaxBody      = 4 << 20
	DefaultMaxQueue     = 4096
	DefaultQueueTimeout = 60 * time.Second
	DefaultAsyncWorkers = 32
	DefaultAsyncQueue   = 10000
	DefaultAsyncDrain   = 30 * time.Second
	// runSessionTTL bounds how long a workflow run in the background of
	// a gateway that died still looks running to the others.
	runSessionTTL = 10 * time.Second
	// seedWait bounds how long an invocation of a fork function waits for
	// its seed to (re)appear.
	seedWait = 30 * time.Second
	// maxAttempts bounds the nodes one invocation is tried on when nodes
	// refuse it (busy, function not deployed yet).
	maxAttempts = 4
)

// Auth says who may call the gateway. With neither credentials nor
// Disabled, New fails: a gateway is never open by accident.
type Auth struct {
	// User and Password enable HTTP basic auth (OpenFaaS: user admin).
	User, Password string
	// Tokens are accepted as "Authorization: Bearer TOKEN".
	Tokens []string
	// Disabled turns authentication off (development only).
	Disabled bool
	// PublicFunctions leaves /function/ and /async-function/ open, as
	// the OpenFaaS gateway does by default; /system/ stays authenticated.
	PublicFunctions bool
}

// Config configures a Gateway.
type Config struct {
	// Directory is the cluster directory; the gateway stores functions in
	// it and places invocations on the nodes it lists.
	Directory *directory.Client
	// Transport is how the gateway reaches the node daemons: its own name
	// (Node) and the cluster secret they share.
	Transport transport.Config
	Auth      Auth
	// MaxBody caps a request body (larger: 413).
	MaxBody int64
	// MaxQueue caps invocations waiting for a free slot (beyond: 429).
	MaxQueue int
	// QueueTimeout bounds the wait for a slot (then 429).
	QueueTimeout time.Duration
	// DefaultPolicy applies to deployments that name none (default fork).
	DefaultPolicy function.Policy
	// AsyncWorkers run queued async invocations; AsyncQueue caps them.
	AsyncWorkers, AsyncQueue int
	// AsyncDrain bounds how long Close lets the async workers finish the
	// invocations queued and running (and post their callbacks) once the
	// gateway stopped accepting requests (0: DefaultAsyncDrain; negative:
	// drop them at once). What is left then is dropped, logged and counted
	// (mitosis_gateway_async_dropped_total).
	AsyncDrain time.Duration
	// AsyncMemoryOnly keeps accepted async invocations in this gateway's
	// memory only instead of filing each in the directory first: 5-6
	// times the accept rate on embedded etcd, and what the gateway had
	// accepted is lost if it dies (README, Known limits).
	AsyncMemoryOnly bool
	// StatsInterval is how often node memory and instances are polled for
	// the metrics (default 5s; negative: never).
	StatsInterval time.Duration
	// Logger receives one line per deploy, delete and failure.
	Logger *slog.Logger
	// Workflows configures the workflows the gateway runs (POST
	// /workflow/NAME).
	Workflows WorkflowConfig
	// Name names the gateway in the workflow run records it files for
	// the cluster (default: HOST:PID).
	Name string
}

// Gateway is a running gateway. Handler serves its HTTP API.
type Gateway struct {
	cfg   Config
	dir   *directory.Client
	view  *directory.View
	log   *slog.Logger
	sched *sched
	peers *peers
	m     *metrics
	mux   *http.ServeMux

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// wfCtx ends the workflow runs, first thing when the gateway closes,
	// so that they remove what they made while the gateway still works.
	wfCtx    context.Context
	wfCancel context.CancelFunc

	async chan asyncCall
	// runSession marks the workflow runs in the background this gateway
	// runs, for every gateway to tell a running one from a lost one.
	runSession *directory.RunSession
	// asyncPending counts the async invocations accepted and not yet
	// done (queued, running, or posting their callback).
	asyncPending atomic.Int64
	// asyncFiled counts those of them filed in the directory, which
	// another gateway runs if this one stops before they are done.
	asyncFiled atomic.Int64
	// wfSlots bounds the workflow runs in the background; wfRuns keeps
	// the records of the runs.
	wfSlots chan struct{}
	wfRuns  wfRuns
	// follows bounds the /system/logs follows streaming at once (each
	// polls every node twice a second).
	follows chan struct{}

	deployMu sync.Mutex // serializes deploys, updates and deletes
	rec      *reconciler

	srvMu sync.Mutex
	srv   *http.Server

	// stageLeases are the stage seed leases of the directory at the last
	// expireStages, by NODE/SEED; stageGone the stage seeds this gateway
	// removed itself (when), whose leases' going is not an expiry.
	stageMu     sync.Mutex
	stageLeases map[string]directory.StageLease
	stageGone   map[string]time.Time
	stageRetry  map[string]*stageRetry // expired seeds whose removal failed, by NODE/SEED
}

// New starts a gateway on the directory: it loads the directory's view and
// starts the reconciler, the async workers and the stats poller.
func New(ctx context.Context, cfg Config) (*Gateway, error) {
	if cfg.Directory == nil {
		return nil, errors.New("gateway: no cluster directory")
	}
	a := cfg.Auth
	if !a.Disabled && (a.User == "" || a.Password == "") && len(a.Tokens) == 0 {
		return nil, errors.New("gateway: no credentials: give a basic-auth user and password or a token (or disable authentication explicitly)")
	}
	if cfg.MaxBody <= 0 {
		cfg.MaxBody = DefaultMaxBody
	}
	if cfg.Name == "" {
		host, _ := os.Hostname()
		cfg.Name = fmt.Sprintf("%s:%d", host, os.Getpid())
	}
	if cfg.MaxBody > transport.MaxInvokeBody {
		return nil, fmt.Errorf("gateway: max body %d exceeds the transport's limit of %d bytes", cfg.MaxBody, transport.MaxInvokeBody)
	}
	if cfg.MaxQueue <= 0 {
		cfg.MaxQueue = DefaultMaxQueue
	}
	if cfg.QueueTimeout <= 0 {
		cfg.QueueTimeout = DefaultQueueTimeout
	}
	if cfg.DefaultPolicy == "" {
		cfg.DefaultPolicy = function.PolicyFork
	}
	if cfg.AsyncWorkers <= 0 {
		cfg.AsyncWorkers = DefaultAsyncWorkers
	}
	if cfg.AsyncQueue <= 0 {
		cfg.AsyncQueue = DefaultAsyncQueue
	}
	if cfg.AsyncDrain == 0 {
		cfg.AsyncDrain = DefaultAsyncDrain
	}
	if cfg.StatsInterval == 0 {
		cfg.StatsInterval = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Transport.Node == "" {
		cfg.Transport.Node = "gateway"
	}
	view, err := cfg.Directory.NewView(ctx)
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	g := &Gateway{cfg: cfg, dir: cfg.Directory, view: view, log: cfg.Logger, sched: newSched(cfg.MaxQueue),
		peers: newPeers(cfg.Transport), async: make(chan asyncCall, cfg.AsyncQueue),
		follows: make(chan struct{}, maxFollows), wfSlots: make(chan struct{}, maxAsyncWorkflows), stageGone: map[string]time.Time{}, stageRetry: map[string]*stageRetry{}}
	g.ctx, g.cancel = context.WithCancel(context.Background())
	g.wfCtx, g.wfCancel = context.WithCancel(g.ctx)
	g.runSession = cfg.Directory.OpenRunSession(cfg.Name, runSessionTTL)
	g.m = newMetrics(g)
	g.rec = newReconciler(g)
	g.logNodes(g.sched.setNodes(view.Nodes()))
	g.routes()
	g.wg.Add(3)
	go g.watch()
	go g.watchRunCancels()
	go g.every(asyncClaimEvery, g.claimAsync)
	for i := 0; i < cfg.AsyncWorkers; i++ {
		g.wg.Add(1)
		go g.asyncWorker()
	}
	if cfg.StatsInterval > 0 {
		g.wg.Add(1)
		go g.every(cfg.StatsInterval, func() { g.refreshStats(g.ctx) })
	}
	return g, nil
}

// logNodes logs changes of the placement's node set: a node that left
// (its directory lease lapsed or it unregistered) gets no invocations
// until it registers again.
func (g *Gateway) logNodes(changes []nodeChange) {
	for _, c := range changes {
		if c.what == "left" {
			g.log.Warn("node left the directory; out of placement until it registers again", "node", c.node)
			continue
		}
		g.log.Info("node in placement", "node", c.node, "event", c.what)
	}
}

// watch follows the directory: node changes go to placement, and every
// change (and a tick) runs the reconciler.
func (g *Gateway) watch() {
	defer g.wg.Done()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		ch := g.view.Changed()
		g.logNodes(g.sched.setNodes(g.view.Nodes()))
		g.expireStages()
		g.rec.run(g.ctx)
		select {
		case <-g.ctx.Done():
			return
		case <-ch:
		case <-tick.C:
		}
	}
}

// Registry is the gateway's Prometheus registry (served at /metrics).
func (g *Gateway) Registry() *prometheus.Registry { return g.m.reg }

// Handler is the gateway's HTTP API.
func (g *Gateway) Handler() http.Handler { return g.mux }

// Serve serves the API on ln until Close.
func (g *Gateway) Serve(ln net.Listener) error {
	srv := &http.Server{Handler: g.mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
	g.srvMu.Lock()
	g.srv = srv
	g.srvMu.Unlock()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("gateway: serve: %w", err)
	}
	return nil
}

// Close stops serving (in-flight requests get up to 10 s to finish), stops
// the background work and closes the node connections. Functions stay
// deployed: they live in the directory and on the nodes.
func (g *Gateway) Close() error {
	// Under stageMu: a workflow run starting now either sees the gateway
	// closing or joins g.wg first (track).
	g.stageMu.Lock()
	g.wfCancel()
	g.stageMu.Unlock()
	g.srvMu.Lock()
	srv := g.srv
	g.srvMu.Unlock()
	var err error
	if srv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err = srv.Shutdown(sctx)
		cancel()
	}
	// No request comes in now: let the async workers finish what was
	// accepted (202) before the invocations still waiting are dropped.
	g.drainAsync()
	// Under stageMu: an expiry starting now either sees the gateway
	// closed or joins g.wg before Wait.
	g.stageMu.Lock()
	g.cancel()
	g.stageMu.Unlock()
	g.wg.Wait()
	g.runSession.Close()
	g.view.Close()
	g.peers.close()
	return err
}

// authorized checks a request's credentials.
func (g *Gateway) authorized(r *http.Request) bool {
	a := g.cfg.Auth
	if a.Disabled {
		return true
	}
	h := r.Header.Get("Authorization")
	if tok, ok := strings.CutPrefix(h, "Bearer "); ok {
		for _, t := range a.Tokens {
			if subtle.ConstantTimeCompare([]byte(tok), []byte(t)) == 1 {
				return true
			}
		}
		return false
	}
	if u, p, ok := r.BasicAuth(); ok && a.User != "" {
		uok := subtle.ConstantTimeCompare([]byte(u), []byte(a.User)) == 1
		pok := subtle.ConstantTimeCompare([]byte(p), []byte(a.Password)) == 1
		return uok && pok
	}
	return false
}

// authed wraps h with authentication.
func (g *Gateway) authed(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !g.authorized(r) {
			w.Header().Set("WWW-Authenticate", `Basic realm="mitosis gateway"`)
			httpError(w, http.StatusUnauthorized, "unauthorized: give basic auth credentials or a bearer token")
			return
		}
		h(w, r)
	}
}

func (g *Gateway) routes() {
	mux := http.NewServeMux()
	fnAuth := g.authed
	if g.cfg.Auth.PublicFunctions {
		fnAuth = func(h http.HandlerFunc) http.HandlerFunc { return h }
	}
	mux.HandleFunc("GET /healthz", g.healthz)
	mux.Handle("GET /metrics", g.m.handler())
	mux.HandleFunc("GET /system/info", g.authed(g.info))
	mux.HandleFunc("GET /system/namespaces", g.authed(g.namespaces))
	mux.HandleFunc("GET /system/functions", g.authed(g.listFunctions))
	mux.HandleFunc("POST /system/functions", g.authed(g.deployFunction))
	mux.HandleFunc("PUT /system/functions", g.authed(g.updateFunction))
	mux.HandleFunc("DELETE /system/functions", g.authed(g.deleteFunction))
	mux.HandleFunc("PATCH /system/functions", g.authed(g.renewFunction))
	mux.HandleFunc("GET /system/function/{name}", g.authed(g.getFunction))
	mux.HandleFunc("POST /system/scale-function/{name}", g.authed(g.scaleFunction))
	mux.HandleFunc("DELETE /system/stage-seeds", g.authed(g.deleteStageSeed))
	mux.HandleFunc("PATCH /system/stage-seeds", g.authed(g.renewStageSeed))
	mux.HandleFunc("GET /system/nodes", g.authed(g.listNodes))
	mux.HandleFunc("GET /system/logs", g.authed(g.logs))
	mux.HandleFunc("GET /system/workflows", g.authed(g.listWorkflows))
	mux.HandleFunc("POST /system/workflows", g.authed(g.deployWorkflow))
	mux.HandleFunc("DELETE /system/workflows", g.authed(g.deleteWorkflow))
	// A run deploys, keeps and removes seeds: the system's credentials.
	mux.HandleFunc("POST /workflow/{name}", g.authed(g.runWorkflow))
	mux.HandleFunc("POST /async-workflow/{name}", g.authed(g.asyncWorkflow))
	mux.HandleFunc("GET /system/workflow-runs", g.authed(g.listWorkflowRuns))
	mux.HandleFunc("GET /system/workflow-runs/{id}", g.authed(g.getWorkflowRun))
	mux.HandleFunc("DELETE /system/workflow-runs/{id}", g.authed(g.cancelWorkflowRun))
	mux.HandleFunc("/function/{name}", fnAuth(g.invokeSync))
	mux.HandleFunc("/function/{name}/{path...}", fnAuth(g.invokeSync))
	mux.HandleFunc("/async-function/{name}", fnAuth(g.invokeAsync))
	mux.HandleFunc("/async-function/{name}/{path...}", fnAuth(g.invokeAsync))
	g.mux = mux
}

func httpError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	_, _ = fmt.Fprintln(w, msg)
}

func (g *Gateway) healthz(w http.ResponseWriter, r *http.Request) {
	if n := len(g.view.Nodes()); n == 0 {
		httpError(w, http.StatusServiceUnavailable, "no live node in the cluster directory")
		return
	}
	_, _ = w.Write([]byte("OK"))
}
