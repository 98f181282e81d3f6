package gateway

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mitosis-fork/mitosis/node"
)

// metrics are the gateway's Prometheus metrics: the OpenFaaS gateway's
// names for invocations, plus mitosis's start latency, queueing, instances
// and memory.
type metrics struct {
	reg *prometheus.Registry

	invocations *prometheus.CounterVec   // gateway_function_invocation_total{function_name,code}
	seconds     *prometheus.HistogramVec // gateway_functions_seconds{function_name,code}
	start       *prometheus.HistogramVec // mitosis_function_start_seconds{function_name,kind}
	queueDelay  *prometheus.HistogramVec // mitosis_function_queue_seconds{function_name}
	queued      prometheus.Gauge
	asyncQueued prometheus.Gauge
	// asyncDropped counts async invocations accepted and dropped when the
	// gateway stopped (Config.AsyncDrain ran out).
	asyncDropped prometheus.Counter
	// asyncClaimed counts async invocations of gateways that were gone,
	// run here.
	asyncClaimed prometheus.Counter
	callbacks    *prometheus.CounterVec
	instances    *prometheus.GaugeVec     // mitosis_function_instances{function_name,node}
	memory       *prometheus.GaugeVec     // mitosis_function_memory_bytes{function_name,node}
	replicas     *prometheus.GaugeVec     // gateway_service_count{function_name}
	inflight     *prometheus.GaugeVec     // mitosis_node_inflight{node}
	expired      prometheus.Counter       // mitosis_gateway_stage_seeds_expired_total
	wfRuns       *prometheus.CounterVec   // mitosis_gateway_workflow_runs_total{workflow,transfer,status}
	wfSeconds    *prometheus.HistogramVec // mitosis_gateway_workflow_run_seconds{workflow,transfer}
	wfRunning    prometheus.Gauge         // mitosis_gateway_workflow_runs_running
}

// schedCollector reports, at each scrape, what this gateway holds on each
// node: its stage seeds and the memory its invocations and stage seeds
// reserve (a stage seed nobody removes shows here before it fills a node).
type schedCollector struct {
	s                *sched
	stages, reserved *prometheus.Desc
}

func newSchedCollector(s *sched) *schedCollector {
	return &schedCollector{s: s,
		stages: prometheus.NewDesc("mitosis_gateway_stage_seeds",
			"Stage seeds this gateway keeps, per node (each holds its instance's memory reservation).", []string{"node"}, nil),
		reserved: prometheus.NewDesc("mitosis_node_reserved_bytes",
			"Memory this gateway's invocations and stage seeds reserve on the node.", []string{"node"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *schedCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.stages
	ch <- c.reserved
}

// Collect implements prometheus.Collector.
func (c *schedCollector) Collect(ch chan<- prometheus.Metric) {
	for _, n := range c.s.snapshot() {
		c.s.mu.Lock()
		stages, reserved := len(n.stages), n.reserved
		c.s.mu.Unlock()
		ch <- prometheus.MustNewConstMetric(c.stages, prometheus.GaugeValue, float64(stages), n.name)
		ch <- prometheus.MustNewConstMetric(c.reserved, prometheus.GaugeValue, float64(reserved), n.name)
	}
}

func newMetrics(g *Gateway) *metrics {
	reg := prometheus.NewRegistry()
	m := &metrics{reg: reg}
	lat := prometheus.ExponentialBuckets(0.0005, 2, 18) // 0.5 ms .. 65 s
	m.invocations = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gateway_function_invocation_total",
		Help: "Function invocations by function and HTTP status code."}, []string{"function_name", "code"})
	m.seconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "gateway_functions_seconds",
		Help: "Invocation latency at the gateway (queueing included).", Buckets: lat}, []string{"function_name", "code"})
	m.start = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "mitosis_function_start_seconds",
		Help: "Time to get an instance on the node: fork restore, warm resume or cold start.", Buckets: lat}, []string{"function_name", "kind"})
	m.queueDelay = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "mitosis_function_queue_seconds",
		Help: "Time invocations waited at the gateway for a free slot.", Buckets: lat}, []string{"function_name"})
	m.queued = prometheus.NewGauge(prometheus.GaugeOpts{Name: "mitosis_gateway_queued", Help: "Invocations waiting for a slot."})
	m.asyncQueued = prometheus.NewGauge(prometheus.GaugeOpts{Name: "mitosis_gateway_async_queued", Help: "Async invocations queued."})
	m.asyncDropped = prometheus.NewCounter(prometheus.CounterOpts{Name: "mitosis_gateway_async_dropped_total", Help: "Async invocations accepted (202) and dropped when the gateway stopped: the drain timeout ran out, and they were not filed in the directory for another gateway."})
	m.asyncClaimed = prometheus.NewCounter(prometheus.CounterOpts{Name: "mitosis_gateway_async_claimed_total", Help: "Async invocations of gateways that were gone (died, or stopped before they were done), run by this one."})
	m.callbacks = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mitosis_gateway_callbacks_total",
		Help: "Async callbacks by outcome (HTTP status class or error)."}, []string{"result"})
	m.instances = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mitosis_function_instances",
		Help: "Instances alive (running invocations and warm instances) per function and node, polled."}, []string{"function_name", "node"})
	m.memory = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mitosis_function_memory_bytes",
		Help: "Σ Pss of a function's processes plus its node page caches, per node, polled."}, []string{"function_name", "node"})
	m.replicas = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "gateway_service_count",
		Help: "Instances alive per function, polled."}, []string{"function_name"})
	m.inflight = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mitosis_node_inflight",
		Help: "Invocations in flight from this gateway, per node."}, []string{"node"})
	m.expired = prometheus.NewCounter(prometheus.CounterOpts{Name: "mitosis_gateway_stage_seeds_expired_total",
		Help: "Stage seeds this gateway removed because their lease (X-Mitosis-Stage-TTL) went without this gateway removing them: it ran out, or another gateway removed the seed."})
	m.wfRuns = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mitosis_gateway_workflow_runs_total",
		Help: "Workflow runs this gateway ran (/workflow/, /async-workflow/), by workflow, transfer and outcome (succeeded, failed or cancelled)."},
		[]string{"workflow", "transfer", "status"})
	m.wfSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "mitosis_gateway_workflow_run_seconds",
		Help: "End-to-end time of the workflow runs this gateway ran.", Buckets: lat}, []string{"workflow", "transfer"})
	m.wfRunning = prometheus.NewGauge(prometheus.GaugeOpts{Name: "mitosis_gateway_workflow_runs_running",
		Help: "Workflow runs this gateway is running."})
	reg.MustRegister(m.invocations, m.seconds, m.start, m.queueDelay, m.queued, m.asyncQueued, m.asyncDropped, m.asyncClaimed, m.callbacks,
		m.instances, m.memory, m.replicas, m.inflight, m.expired, m.wfRuns, m.wfSeconds, m.wfRunning, newSchedCollector(g.sched))
	reg.MustRegister(prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// observe records one finished invocation.
func (m *metrics) observe(fn string, code int, d time.Duration, o outcome) {
	c := strconv.Itoa(code)
	m.invocations.WithLabelValues(fn, c).Inc()
	m.seconds.WithLabelValues(fn, c).Observe(d.Seconds())
	if o.msg == "" {
		m.start.WithLabelValues(fn, instanceKind(o.resp.Kind)).Observe(o.resp.Start.Seconds())
	}
}

// every runs f every d until the gateway closes. Precondition: g.wg
// counts it.
func (g *Gateway) every(d time.Duration, f func()) {
	defer g.wg.Done()
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-g.ctx.Done():
			return
		case <-t.C:
		}
		f()
	}
}

func (g *Gateway) refreshStats(ctx context.Context) {
	perNode := g.nodeFunctions(ctx, node.CallNodeStats)
	m := g.m
	m.instances.Reset()
	m.memory.Reset()
	m.replicas.Reset()
	total := map[string]float64{}
	for nodeName, fns := range perNode {
		for _, in := range fns {
			m.instances.WithLabelValues(in.Name, nodeName).Set(float64(in.Running + in.Warm))
			m.memory.WithLabelValues(in.Name, nodeName).Set(float64(in.MemoryBytes))
			total[in.Name] += float64(in.Running + in.Warm)
		}
	}
	for fn, v := range total {
		m.replicas.WithLabelValues(fn).Set(v)
	}
	m.inflight.Reset()
	for _, n := range g.sched.snapshot() {
		g.sched.mu.Lock()
		v := n.inflight
		g.sched.mu.Unlock()
		m.inflight.WithLabelValues(n.name).Set(float64(v))
	}
}
