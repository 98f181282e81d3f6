// Package platform is the serverless platform benchmark: a gateway and
// three node daemons in network namespaces on this host (bench/netlab),
// one function deployed under each policy in turn (fork, local-fork,
// keep-alive, cold), the same load-spike trace (Azure Functions 2019
// format, see package trace) replayed against each through the gateway's
// HTTP API, and per policy: request latency (p50/p99/max), instances alive
// and total memory (Σ Pss of every function process, seed and node page
// cache, sampled) over time, and memory × time. It also measures a Python
// hello through the gateway against a warm (SIGCONT'ed) instance, and the
// gateway's throughput with hey.
package platform

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/mitosis-fork/mitosis/internal/testenv"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/bench/netlab"
	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/function"
	"github.com/mitosis-fork/mitosis/node"
)

//go:embed fn/handler.py
var frameHandler []byte

//go:embed hello/handler.py
var helloHandler []byte

// token authenticates the benchmark to its gateway.
const token = "platform-bench-token"

// Config configures Run.
type Config struct {
	// Mitosis is the mitosis binary (default: go build ./cmd/mitosis ./cmd/mitosisd; mitosisd must sit next to it).
	Mitosis string
	// Dir is the work directory (default: a temporary one, removed).
	Dir string
	// Log receives progress lines.
	Log io.Writer
	// TracePath, if set, is an Azure Functions trace file
	// (invocations_per_function_md.anon.dNN.csv) and Row the row of the
	// function replayed; default: a generated spike trace (TraceConfig).
	TracePath string
	Row       int
	// Trace shapes the generated trace.
	Trace TraceConfig
	// Compression: a trace minute lasts 60 s / Compression.
	Compression float64
	// Policies to compare (default all four, in the order of
	// function.Policies).
	Policies []function.Policy
	// NodeConcurrency and NodeMemory are each node's capacity; FnMemory
	// the function's memory limit.
	NodeConcurrency int
	NodeMemory      string
	FnMemory        string
	// HugePageCache starts the daemons with --huge-page-cache.
	HugePageCache bool
	// KeepAlive is the warm instances' TTL (default 10 minutes of trace
	// time: 10m / Compression).
	KeepAlive time.Duration
	// Sample is the memory sampling period.
	Sample time.Duration
	// HelloRuns is the number of sequential hello invocations per case
	// (0: skip the hello section); HeyRequests the throughput run's size.
	HelloRuns, HeyRequests, HeyConcurrency int
	// CommandLine reproduces the run (printed in the report).
	CommandLine string
	// Rows is the spike function's frame size (default 1e6).
	Rows int
}

// TraceConfig shapes the generated trace (trace.GenerateSpiky): Minutes of
// trace at a Poisson base rate per minute, and Spikes minutes carrying
// SpikeSize invocations each, the first at minute FirstSpike, then every
// Gap minutes. A spike minute's invocations are fired within its first
// BurstSeconds (trace time), the other minutes' evenly over the minute
// (trace.Spiky). With the Gap longer than the keep-alive TTL
// (10 minutes), every spike finds the warm pool shrunk to the base rate's
// needs: the case the MITOSIS paper replays.
type TraceConfig struct {
	Minutes      int
	BaseRate     float64
	Spikes       int
	SpikeSize    int
	FirstSpike   int
	Gap          int
	BurstSeconds float64
	Seed         int64
}

func (c *Config) defaults() {
	if c.Log == nil {
		c.Log = io.Discard
	}
	if c.Compression <= 0 {
		c.Compression = 60
	}
	if len(c.Policies) == 0 {
		c.Policies = function.Policies
	}
	if c.NodeConcurrency <= 0 {
		c.NodeConcurrency = 16
	}
	if c.NodeMemory == "" {
		c.NodeMemory = "4G"
	}
	if c.FnMemory == "" {
		c.FnMemory = "256Mi"
	}
	if c.KeepAlive <= 0 {
		c.KeepAlive = time.Duration(float64(function.DefaultKeepAlive) / c.Compression)
	}
	if c.Sample <= 0 {
		c.Sample = 250 * time.Millisecond
	}
	t := &c.Trace
	if t.Minutes <= 0 {
		t.Minutes = 45
	}
	if t.BaseRate <= 0 {
		t.BaseRate = 6
	}
	if t.Spikes <= 0 {
		t.Spikes = 3
	}
	if t.SpikeSize <= 0 {
		t.SpikeSize = 100
	}
	if t.FirstSpike <= 0 {
		t.FirstSpike = 3
	}
	if t.Gap <= 0 {
		t.Gap = 15
	}
	if t.BurstSeconds <= 0 {
		t.BurstSeconds = 2
	}
	if t.Seed == 0 {
		t.Seed = 660323
	}
	if c.Rows <= 0 {
		c.Rows = 1000000
	}
	if c.HeyConcurrency <= 0 {
		c.HeyConcurrency = 32
	}
}

// env is the running platform.
type env struct {
	cfg   Config
	dir   string
	lab   *netlab.Lab
	gw    *netlab.Gateway
	nodes []*netlab.Node
	http  *http.Client
	stats map[string]*client.Client // node-stats over each daemon's socket
	log   io.Writer
}

func (e *env) logf(format string, args ...any) {
	fmt.Fprintf(e.log, "platform: "+format+"\n", args...)
}

// setup builds the cluster: nodes a, b, c and the gateway's host gw.
func setup(cfg Config) (*env, error) {
	e := &env{cfg: cfg, dir: cfg.Dir, log: cfg.Log, stats: map[string]*client.Client{}}
	bin := cfg.Mitosis
	if bin == "" {
		e.logf("go build -o %s/ ./cmd/mitosis ./cmd/mitosisd", e.dir)
		var err error
		if bin, err = testenv.BuildMitosis("", e.dir); err != nil {
			return nil, fmt.Errorf("%w (or give the binary)", err)
		}
	}
	// gw is the fourth host of the lab: 198.19.20.4.
	etcd := fmt.Sprintf("http://198.19.20.4:%d", netlab.EtcdPort)
	args := []string{"--etcd-endpoints", etcd, "--max-concurrency", strconv.Itoa(cfg.NodeConcurrency), "--max-memory", cfg.NodeMemory}
	if cfg.HugePageCache {
		args = append(args, "--huge-page-cache")
	}
	lab, err := netlab.New(netlab.Config{Bin: bin, Dir: filepath.Join(e.dir, "cluster"), Subnet: "198.19.20",
		Nodes: []netlab.NodeSpec{{Name: "a", Args: args}, {Name: "b", Args: args}, {Name: "c", Args: args}, {Name: "gw", NoDaemon: true}}})
	if err != nil {
		return nil, err
	}
	e.lab = lab
	gwHost := lab.Node("gw")
	if netlab.EtcdURL(gwHost) != etcd {
		return e, fmt.Errorf("gateway host at %s, want %s", gwHost.IP, etcd)
	}
	if e.gw, err = lab.StartGateway(gwHost, token, "--max-queue", "100000", "--queue-timeout", "120s"); err != nil {
		return e, err
	}
	e.http = e.gw.Client(5 * time.Minute)
	for _, name := range []string{"a", "b", "c"} {
		n := lab.Node(name)
		if err := n.Start(); err != nil {
			return e, err
		}
		e.nodes = append(e.nodes, n)
		c, err := client.Dial(n.Sock)
		if err != nil {
			return e, err
		}
		e.stats[name] = c
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var ns []json.RawMessage
		if code, body, err := e.do("GET", "/system/nodes", nil); err == nil && code == 200 && json.Unmarshal(body, &ns) == nil && len(ns) == 3 {
			break
		}
		if time.Now().After(deadline) {
			return e, errors.New("the gateway does not list 3 nodes after 30 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.logf("cluster %s: nodes a, b, c and gateway %s (etcd %s)", lab.Prefix, e.gw.URL, e.gw.Etcd)
	return e, nil
}

func (e *env) close() {
	for _, c := range e.stats {
		c.Close()
	}
	for _, n := range e.nodes {
		if err := n.Stop(60 * time.Second); err != nil {
			e.logf("stop %s: %v", n.Name, err)
		}
	}
	if e.gw != nil {
		if err := e.gw.Stop(20 * time.Second); err != nil {
			e.logf("stop gateway: %v", err)
		}
	}
	if e.lab != nil {
		if err := e.lab.Close(); err != nil {
			e.logf("close lab: %v", err)
		}
	}
}

// do runs one API request.
func (e *env) do(method, path string, body []byte) (int, []byte, error) {
	req, err := http.NewRequest(method, e.gw.URL+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := e.http.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// writeFn writes a function directory and returns its path.
func (e *env) writeFn(name string, src []byte) (string, error) {
	dir := filepath.Join(e.dir, "functions", name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	return dir, os.WriteFile(filepath.Join(dir, "handler.py"), src, 0o644)
}

// deploy deploys a function and waits for it (and its seed).
func (e *env) deploy(name, dir string, pol function.Policy) (time.Duration, error) {
	d := map[string]any{"service": name, "image": dir, "limits": map[string]string{"memory": e.cfg.FnMemory},
		"envVars":     map[string]string{"ROWS": strconv.Itoa(e.cfg.Rows)},
		"annotations": map[string]string{"com.mitosis.policy": string(pol), "com.mitosis.keep-alive": e.cfg.KeepAlive.String()}}
	b, _ := json.Marshal(d)
	start := time.Now()
	code, body, err := e.do("POST", "/system/functions", b)
	if err != nil {
		return 0, err
	}
	if code != http.StatusAccepted {
		err := fmt.Errorf("deploy %s: %d %s", name, code, body)
		if code == http.StatusInternalServerError { // deployed, but its init failed: take it down again
			if rerr := e.remove(name); rerr != nil {
				err = fmt.Errorf("%w (and removing it: %v)", err, rerr)
			}
		}
		return 0, err
	}
	return time.Since(start), nil
}

// remove deletes a function and waits until no node holds memory for it.
func (e *env) remove(name string) error {
	b, _ := json.Marshal(map[string]string{"functionName": name})
	code, body, err := e.do("DELETE", "/system/functions", b)
	if err != nil {
		return err
	}
	if code != http.StatusAccepted {
		return fmt.Errorf("delete %s: %d %s", name, code, body)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		s := e.sample()
		if s.Functions == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("delete %s: nodes still report %d functions after 30 s", name, s.Functions)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Sample is one measurement of the cluster's function memory and instances.
type Sample struct {
	T         float64 `json:"t"` // seconds since the replay started
	Memory    uint64  `json:"memory_bytes"`
	Cache     uint64  `json:"cache_bytes"`
	Instances int     `json:"instances"` // running invocations + warm instances
	Seeds     int     `json:"seeds"`
	Functions int     `json:"-"`
}

// sample measures every node (node-stats over their unix sockets).
func (e *env) sample() Sample {
	var s Sample
	for _, n := range e.nodes {
		var st node.NodeStats
		if err := e.stats[n.Name].Call(client.OpNodeStats, nil, &st); err != nil {
			continue
		}
		s.Memory += st.MemoryBytes
		for _, f := range st.Functions {
			s.Cache += f.CacheBytes
			s.Instances += f.Running + f.Warm
			if f.Seed != "" {
				s.Seeds++
			}
			s.Functions++
		}
	}
	return s
}

// sampler samples every period until stop is closed.
func (e *env) sampler(start time.Time, stop <-chan struct{}) <-chan []Sample {
	out := make(chan []Sample, 1)
	go func() {
		var ss []Sample
		t := time.NewTicker(e.cfg.Sample)
		defer t.Stop()
		for {
			s := e.sample()
			s.T = time.Since(start).Seconds()
			ss = append(ss, s)
			select {
			case <-stop:
				out <- ss
				return
			case <-t.C:
			}
		}
	}()
	return out
}

// invoke sends one invocation and reports its status and latency.
func (e *env) invoke(ctx context.Context, fn string, body string) (invocation, error) {
	req, err := http.NewRequestWithContext(ctx, "POST", e.gw.URL+"/function/"+fn, strings.NewReader(body))
	if err != nil {
		return invocation{}, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	start := time.Now()
	resp, err := e.http.Do(req)
	if err != nil {
		return invocation{took: time.Since(start)}, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	took := time.Since(start)
	sec := func(h string) float64 {
		v, _ := strconv.ParseFloat(resp.Header.Get(h), 64)
		return v * 1000
	}
	return invocation{code: resp.StatusCode, took: took, kind: resp.Header.Get("X-Mitosis-Instance"),
		queueMS: sec("X-Mitosis-Queue-Seconds"), startMS: sec("X-Mitosis-Start-Seconds"), runMS: sec("X-Mitosis-Run-Seconds"),
		node: resp.Header.Get("X-Mitosis-Node")}, nil
}

// invocation is one request's outcome: status, latency and the kind of
// instance that served it (the gateway's X-Mitosis-Instance: fork, warm,
// cold).
type invocation struct {
	code int
	took time.Duration
	kind string
	node string
	// The gateway's breakdown: queueing for a slot, the instance's start
	// (fork, SIGCONT or cold start) and its run to the reply, in ms.
	queueMS, startMS, runMS float64
}

// ---- statistics ----

// Latency summarizes request latencies in milliseconds.
type Latency struct {
	N      int            `json:"n"`
	OK     int            `json:"ok"`
	Codes  map[string]int `json:"codes"`
	P50    float64        `json:"p50_ms"`
	P90    float64        `json:"p90_ms"`
	P99    float64        `json:"p99_ms"`
	Max    float64        `json:"max_ms"`
	Median float64        `json:"-"`
}

func summarize(lat []time.Duration, codes map[string]int) Latency {
	l := Latency{N: len(lat), Codes: codes, OK: codes["200"]}
	if len(lat) == 0 {
		return l
	}
	ms := make([]float64, len(lat))
	for i, d := range lat {
		ms[i] = float64(d.Microseconds()) / 1000
	}
	sort.Float64s(ms)
	q := func(p float64) float64 {
		i := int(p*float64(len(ms)) + 0.5)
		if i >= len(ms) {
			i = len(ms) - 1
		}
		if i > 0 {
			i--
		}
		return ms[i]
	}
	l.P50, l.P90, l.P99, l.Max = q(0.5), q(0.9), q(0.99), ms[len(ms)-1]
	l.Median = l.P50
	return l
}

var heyRate = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)

// hey runs hey inside the gateway's namespace and returns requests/s and
// its status code distribution.
func (e *env) hey(fn string, n, c int) (float64, string, error) {
	cmd := e.gw.Host.Command("hey", "-n", strconv.Itoa(n), "-c", strconv.Itoa(c), "-m", "POST", "-d", "x",
		"-H", "Authorization: Bearer "+token, e.gw.URL+"/function/"+fn)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return 0, "", fmt.Errorf("hey: %v: %s", err, out)
	}
	m := heyRate.FindSubmatch(out)
	if m == nil {
		return 0, "", fmt.Errorf("hey printed no Requests/sec:\n%s", out)
	}
	rate, _ := strconv.ParseFloat(string(m[1]), 64)
	dist := ""
	if i := bytes.Index(out, []byte("Status code distribution:")); i >= 0 {
		dist = strings.Join(strings.Fields(string(out[i+len("Status code distribution:"):])), " ")
		if j := strings.Index(dist, "Error"); j >= 0 {
			dist = dist[:j]
		}
	}
	return rate, strings.TrimSpace(dist), nil
}

// mutex-protected list of latencies and codes.
type recorder struct {
	mu    sync.Mutex
	lat   []time.Duration
	codes map[string]int
	kinds map[string]int
	reqs  []Request
}

// Request is one replayed request: when it was sent (seconds since the
// replay began), how long it took (ms), its status and serving instance.
type Request struct {
	T       float64 `json:"t"`
	MS      float64 `json:"ms"`
	Code    int     `json:"code"`
	Kind    string  `json:"kind,omitempty"`
	Node    string  `json:"node,omitempty"`
	QueueMS float64 `json:"queue_ms"`
	StartMS float64 `json:"start_ms"`
	RunMS   float64 `json:"run_ms"`
}

// addAt records iv like add, and as a Request sent at t.
func (r *recorder) addAt(t float64, iv invocation, err error) {
	r.add(iv, err)
	r.mu.Lock()
	r.reqs = append(r.reqs, Request{T: t, MS: float64(iv.took.Microseconds()) / 1000, Code: iv.code, Kind: iv.kind,
		Node: iv.node, QueueMS: iv.queueMS, StartMS: iv.startMS, RunMS: iv.runMS})
	r.mu.Unlock()
}

func (r *recorder) add(iv invocation, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.codes == nil {
		r.codes, r.kinds = map[string]int{}, map[string]int{}
	}
	k := strconv.Itoa(iv.code)
	if err != nil {
		k = "error"
	}
	r.codes[k]++
	if iv.kind != "" {
		r.kinds[iv.kind]++
	}
	r.lat = append(r.lat, iv.took)
}
