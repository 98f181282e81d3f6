package platform

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/mitosis-fork/mitosis/function"
	"github.com/mitosis-fork/mitosis/trace"
)

// PolicyResult is one policy's replay of the trace.
type PolicyResult struct {
	Policy   function.Policy `json:"policy"`
	Function string          `json:"function"`
	DeployMS float64         `json:"deploy_ms"`
	Latency  Latency         `json:"latency"`
	// Instances counts the requests by the kind of instance that served
	// them: fork (a child of a seed), warm (a kept instance), cold.
	Instances map[string]int `json:"served_by"`
	// MaxLatenessMS is the worst delay between an arrival's due time and
	// its send (the replayer's own accuracy).
	MaxLatenessMS float64 `json:"max_lateness_ms"`
	// Seconds is the replay's wall time (the trace's, or longer when the
	// last responses came later).
	Seconds float64 `json:"seconds"`
	// PeakInstances and PeakMemory are the samples' maxima; MemorySeconds
	// the integral of memory over the replay, in GiB·s.
	PeakInstances int      `json:"peak_instances"`
	PeakMemory    uint64   `json:"peak_memory_bytes"`
	PeakSeeds     int      `json:"peak_seeds"`
	MemorySeconds float64  `json:"memory_gib_seconds"`
	Samples       []Sample `json:"samples"`
	// Requests lists every request in the order they completed.
	Requests []Request `json:"requests"`
}

// HelloResult is the Python hello through the gateway.
type HelloResult struct {
	Policy function.Policy `json:"policy"`
	// Latency of sequential invocations (after warm-up): a fork child
	// per request, or a warm (SIGCONT'ed) instance under keep-alive.
	Latency Latency `json:"latency"`
	// Rate is hey's requests/s at HeyConcurrency; Codes its status codes.
	Rate  float64 `json:"rate_per_s"`
	Codes string  `json:"codes"`
}

// Report is the benchmark's outcome.
type Report struct {
	When        time.Time      `json:"when"`
	CommandLine string         `json:"command_line"`
	Config      Config         `json:"config"`
	Trace       TraceInfo      `json:"trace"`
	Policies    []PolicyResult `json:"policies"`
	Hello       []HelloResult  `json:"hello"`
	Errors      []string       `json:"errors,omitempty"`
}

// TraceInfo describes the replayed trace.
type TraceInfo struct {
	Source      string `json:"source"`
	Function    string `json:"function"`
	Minutes     int    `json:"minutes"`
	Invocations int    `json:"invocations"`
	PeakMinute  int    `json:"peak_minute"`
	PeakCount   int    `json:"peak_count"`
	Counts      []int  `json:"counts"`
}

// loadTrace returns the function replayed: a row of the file, or a
// generated spike trace.
func (c *Config) loadTrace() (trace.Function, string, error) {
	if c.TracePath == "" {
		t := c.Trace
		f := trace.GenerateSpiky(trace.SpikeConfig{Minutes: t.Minutes, BaseRate: t.BaseRate, Spikes: t.Spikes,
			SpikeSize: t.SpikeSize, FirstSpike: t.FirstSpike, Gap: t.Gap, Seed: t.Seed})
		return f, fmt.Sprintf("generated (mitosis-trace gen --minutes %d --base-rate %g --spikes %d --spike-size %d --first-spike %d --gap %d --seed %d)",
			t.Minutes, t.BaseRate, t.Spikes, t.SpikeSize, t.FirstSpike, t.Gap, t.Seed), nil
	}
	fns, err := trace.ReadFile(c.TracePath)
	if err != nil {
		return trace.Function{}, "", err
	}
	if c.Row < 0 || c.Row >= len(fns) {
		return trace.Function{}, "", fmt.Errorf("trace %s has %d functions; row %d does not exist", c.TracePath, len(fns), c.Row)
	}
	f := fns[c.Row]
	if c.Trace.Minutes > 0 && c.Trace.Minutes < len(f.Counts) {
		f.Counts = f.Counts[:c.Trace.Minutes]
	}
	return f, fmt.Sprintf("%s row %d", c.TracePath, c.Row), nil
}

// Run builds the cluster, replays the trace under every policy, measures
// the hello cases and returns the report. The cluster is removed before it
// returns.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg.defaults()
	rep := &Report{When: time.Now().UTC(), Config: cfg, CommandLine: cfg.CommandLine}
	fn, src, err := cfg.loadTrace()
	if err != nil {
		return nil, err
	}
	pm, pc := fn.Peak()
	rep.Trace = TraceInfo{Source: src, Function: fn.Function, Minutes: len(fn.Counts), Invocations: fn.Total(),
		PeakMinute: pm, PeakCount: pc, Counts: fn.Counts}
	if cfg.Dir == "" {
		d, err := os.MkdirTemp("", "mitosis-platform-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		cfg.Dir = d
	}
	e, err := setup(cfg)
	if e != nil {
		defer e.close()
	}
	if err != nil {
		return nil, fmt.Errorf("platform setup: %w", err)
	}
	fnDir, err := e.writeFn("spike", frameHandler)
	if err != nil {
		return nil, err
	}
	minute := time.Duration(float64(time.Minute) / cfg.Compression)
	burst := time.Duration(cfg.Trace.BurstSeconds * float64(time.Second) / cfg.Compression)
	arrivals := trace.Schedule(fn.Counts, minute, trace.Spiky, burst, cfg.Trace.Seed)
	e.logf("trace %s: %d invocations over %d minutes (%s each), peak %d in minute %d", src, len(arrivals), len(fn.Counts), minute, pc, pm)
	for _, pol := range cfg.Policies {
		if ctx.Err() != nil {
			return rep, ctx.Err()
		}
		r, err := e.replay(ctx, fnDir, pol, arrivals)
		if err != nil {
			rep.Errors = append(rep.Errors, fmt.Sprintf("%s: %v", pol, err))
			e.logf("%s: %v", pol, err)
			continue
		}
		rep.Policies = append(rep.Policies, r)
	}
	if cfg.HelloRuns > 0 {
		dir, err := e.writeFn("hello", helloHandler)
		if err != nil {
			return rep, err
		}
		for _, pol := range []function.Policy{function.PolicyFork, function.PolicyKeepAlive} {
			h, err := e.hello(ctx, dir, pol)
			if err != nil {
				rep.Errors = append(rep.Errors, fmt.Sprintf("hello %s: %v", pol, err))
				e.logf("hello %s: %v", pol, err)
				continue
			}
			rep.Hello = append(rep.Hello, h)
		}
	}
	return rep, nil
}

// replay deploys the spike function under pol, replays the arrivals
// against it with the memory sampler running, and removes it.
func (e *env) replay(ctx context.Context, fnDir string, pol function.Policy, arrivals []time.Duration) (PolicyResult, error) {
	name := "spike-" + string(pol)
	r := PolicyResult{Policy: pol, Function: name}
	took, err := e.deploy(name, fnDir, pol)
	if err != nil {
		return r, err
	}
	r.DeployMS = float64(took.Microseconds()) / 1000
	e.logf("%s: deployed in %s; replaying %d invocations", pol, took.Round(time.Millisecond), len(arrivals))
	var rec recorder
	stop := make(chan struct{})
	start := time.Now()
	samples := e.sampler(start, stop)
	results := trace.Replay(ctx, arrivals, 0, func(ctx context.Context, i int) error {
		sent := time.Since(start).Seconds()
		iv, err := e.invoke(ctx, name, "req-"+strconv.Itoa(i))
		rec.addAt(sent, iv, err)
		if err != nil {
			return err
		}
		if iv.code != 200 {
			return fmt.Errorf("status %d", iv.code)
		}
		return nil
	})
	r.Seconds = time.Since(start).Seconds()
	close(stop)
	r.Samples = <-samples
	for _, res := range results {
		r.MaxLatenessMS = max(r.MaxLatenessMS, float64(res.Lateness.Microseconds())/1000)
	}
	r.Latency = summarize(rec.lat, rec.codes)
	r.Instances = rec.kinds
	r.Requests = rec.reqs
	for i, s := range r.Samples {
		r.PeakInstances = max(r.PeakInstances, s.Instances)
		r.PeakMemory = max(r.PeakMemory, s.Memory)
		r.PeakSeeds = max(r.PeakSeeds, s.Seeds)
		if i > 0 {
			dt := s.T - r.Samples[i-1].T
			r.MemorySeconds += float64(s.Memory+r.Samples[i-1].Memory) / 2 / (1 << 30) * dt
		}
	}
	e.logf("%s: served by %v", pol, r.Instances)
	e.logf("%s: %d requests (%v) p50 %.1f ms p99 %.1f ms max %.1f ms; peak %d instances, %.0f MiB; %.2f GiB·s",
		pol, r.Latency.N, r.Latency.Codes, r.Latency.P50, r.Latency.P99, r.Latency.Max, r.PeakInstances,
		float64(r.PeakMemory)/(1<<20), r.MemorySeconds)
	if err := e.remove(name); err != nil {
		return r, err
	}
	if ctx.Err() != nil {
		return r, ctx.Err()
	}
	return r, nil
}

// hello measures a Python hello under pol: sequential latency, then hey.
func (e *env) hello(ctx context.Context, dir string, pol function.Policy) (HelloResult, error) {
	name := "hello-" + string(pol)
	h := HelloResult{Policy: pol}
	if _, err := e.deploy(name, dir, pol); err != nil {
		return h, err
	}
	defer e.remove(name)
	for i := 0; i < 5; i++ { // warm-up: node caches, a warm instance
		if iv, err := e.invoke(ctx, name, "w"); err != nil || iv.code != 200 {
			return h, fmt.Errorf("warm-up invocation: %d %v", iv.code, err)
		}
	}
	var rec recorder
	for i := 0; i < e.cfg.HelloRuns; i++ {
		rec.add(e.invoke(ctx, name, "x"))
	}
	h.Latency = summarize(rec.lat, rec.codes)
	if e.cfg.HeyRequests > 0 {
		rate, codes, err := e.hey(name, e.cfg.HeyRequests, e.cfg.HeyConcurrency)
		if err != nil {
			return h, err
		}
		h.Rate, h.Codes = rate, codes
	}
	e.logf("hello %s: p50 %.2f ms p99 %.2f ms; hey %.0f req/s (%s)", pol, h.Latency.P50, h.Latency.P99, h.Rate, h.Codes)
	return h, nil
}

// policy returns the result of pol, if it ran.
func (r *Report) policy(pol function.Policy) (PolicyResult, bool) {
	for _, p := range r.Policies {
		if p.Policy == pol {
			return p, true
		}
	}
	return PolicyResult{}, false
}

func (r *Report) hello(pol function.Policy) (HelloResult, bool) {
	for _, h := range r.Hello {
		if h.Policy == pol {
			return h, true
		}
	}
	return HelloResult{}, false
}

// WriteFiles writes report.md, results.json and the SVG charts into dir.
func (r *Report) WriteFiles(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	files := map[string]string{"results.json": string(b) + "\n", "report.md": r.Markdown()}
	for name, svg := range r.charts() {
		files[name] = svg
	}
	var errs []error
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(files[n]), 0o644); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Targets lists the targets with their measured values.
func (r *Report) Targets() []Target {
	var ts []Target
	fork, okF := r.policy(function.PolicyFork)
	ka, okK := r.policy(function.PolicyKeepAlive)
	lf, okL := r.policy(function.PolicyLocalFork)
	cold, okC := r.policy(function.PolicyCold)
	if okF && okK {
		ts = append(ts, target("fork p99 <= 0.2x keep-alive p99", fork.Latency.P99/ka.Latency.P99, 0.2, true),
			target("keep-alive memory×time >= 10x fork's", ka.MemorySeconds/fork.MemorySeconds, 10, false))
	}
	if okF && okL {
		ts = append(ts, target("fork p99 <= 1.2x local-fork p99", fork.Latency.P99/lf.Latency.P99, 1.2, true))
	}
	if okF && okC {
		ts = append(ts, target("cold p99 >= 5x fork p99", cold.Latency.P99/fork.Latency.P99, 5, false))
	}
	hf, okHF := r.hello(function.PolicyFork)
	hk, okHK := r.hello(function.PolicyKeepAlive)
	if okHF && okHK {
		ts = append(ts, target("hello via gateway: fork p50 <= 2x warm (SIGCONT) p50", hf.Latency.P50/hk.Latency.P50, 2, true))
	}
	if okHF && hf.Rate > 0 {
		ts = append(ts, target("gateway hello throughput (fork) >= 500/s", hf.Rate, 500, false))
	}
	return ts
}

// Target is one target and its measured value.
type Target struct {
	Name  string
	Value float64
	Bound float64
	Met   bool
}

func target(name string, v, bound float64, atMost bool) Target {
	met := v >= bound
	if atMost {
		met = v <= bound
	}
	return Target{Name: name, Value: v, Bound: bound, Met: met}
}

// Markdown renders the report.
func (r *Report) Markdown() string {
	var b strings.Builder
	c := r.Config
	fmt.Fprintf(&b, "# Platform benchmark: load-spike replay on 3 nodes\n\n")
	fmt.Fprintf(&b, "Run %s. Command: `%s`.\n\n", r.When.Format(time.RFC3339), r.CommandLine)
	fmt.Fprintf(&b, "Trace: %s, %d minutes, %d invocations, peak %d in minute %d; a trace minute lasts %s (compression %g), a spike minute's invocations (more than %d) fired within its first %g trace-seconds, the other minutes' evenly spaced. ",
		r.Trace.Source, r.Trace.Minutes, r.Trace.Invocations, r.Trace.PeakCount, r.Trace.PeakMinute,
		time.Duration(float64(time.Minute)/c.Compression), c.Compression, trace.SpikeThreshold(r.Trace.Counts), c.Trace.BurstSeconds)
	fmt.Fprintf(&b, "Nodes a, b, c (network namespaces), %d invocations each at most, %s of function memory; function memory limit %s; keep-alive TTL %s (10 trace-minutes). Function: pandas, 1e6-row frame built at init (~126 MB RSS), handler filters and aggregates it.\n\n",
		c.NodeConcurrency, c.NodeMemory, c.FnMemory, c.KeepAlive)
	b.WriteString("| policy | requests | non-200 | p50 ms | p99 ms | max ms | peak instances | peak seeds | peak memory MiB | memory×time GiB·s | deploy ms |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, p := range r.Policies {
		fmt.Fprintf(&b, "| %s | %d | %d | %.1f | %.1f | %.1f | %d | %d | %.0f | %.2f | %.0f |\n", p.Policy, p.Latency.N, p.Latency.N-p.Latency.OK,
			p.Latency.P50, p.Latency.P99, p.Latency.Max, p.PeakInstances, p.PeakSeeds, float64(p.PeakMemory)/(1<<20), p.MemorySeconds, p.DeployMS)
	}
	if len(r.Hello) > 0 {
		fmt.Fprintf(&b, "\nPython hello through the gateway, %d sequential invocations after 5 warm-up ones, then `hey -n %d -c %d`:\n\n", c.HelloRuns, c.HeyRequests, c.HeyConcurrency)
		b.WriteString("| policy | p50 ms | p99 ms | hey req/s | hey status codes |\n|---|---|---|---|---|\n")
		for _, h := range r.Hello {
			what := string(h.Policy)
			if h.Policy == function.PolicyKeepAlive {
				what += " (warm instance, SIGCONT)"
			}
			fmt.Fprintf(&b, "| %s | %.2f | %.2f | %.0f | %s |\n", what, h.Latency.P50, h.Latency.P99, h.Rate, h.Codes)
		}
	}
	if ts := r.Targets(); len(ts) > 0 {
		b.WriteString("\n| target | measured | met |\n|---|---|---|\n")
		for _, t := range ts {
			met := "yes"
			if !t.Met {
				met = "**missed**"
			}
			fmt.Fprintf(&b, "| %s | %.3g | %s |\n", t.Name, t.Value, met)
		}
	}
	for _, e := range r.Errors {
		fmt.Fprintf(&b, "\nerror: %s\n", e)
	}
	return b.String()
}
