package node

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the daemon's Prometheus metrics, in a registry of its own
// (several daemons may live in one process in tests).
type metrics struct {
	reg *prometheus.Registry

	forks         *prometheus.CounterVec
	prepares      prometheus.Counter
	childFailures prometheus.Counter
	// dirRemoved counts what this node removed on its own because the
	// cluster directory no longer has it (dirsweep.go), by kind.
	dirRemoved *prometheus.CounterVec
	faults     prometheus.Counter

	pagesShared, pagesCopied, pagesZero, pagesFetched, pagesEager prometheus.Counter

	peerDescriptor, peerPages, peerFork, peerLease prometheus.Counter

	bytesServed  prometheus.Counter
	bytesFetched prometheus.Counter
	// zeroCopySent and zeroCopyReceived count page bytes that skipped the
	// copy through a user-space buffer: sent from this node's page cache
	// with sendfile, and received into it with splice.
	zeroCopySent, zeroCopyReceived prometheus.Counter
	fetchLatency                   prometheus.Histogram
	restore                        prometheus.Histogram

	invocations   *prometheus.CounterVec   // by instance kind and status class
	instanceStart *prometheus.HistogramVec // time to get an instance, by kind
}

func newMetrics(d *Daemon) *metrics {
	reg := prometheus.NewRegistry()
	f := func(c prometheus.Collector) { reg.MustRegister(c) }
	m := &metrics{reg: reg}
	m.forks = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mitosis_forks_total", Help: "Children forked on this node, by paging mode.",
	}, []string{"mode"})
	f(m.forks)
	for _, mode := range []string{"lazy", "eager"} {
		m.forks.WithLabelValues(mode)
	}
	m.invocations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mitosis_invocations_total", Help: "Function invocations run on this node, by instance kind (fork, warm, cold) and status class.",
	}, []string{"kind", "status"})
	f(m.invocations)
	m.instanceStart = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "mitosis_instance_start_seconds", Help: "Time to get an instance for an invocation (fork restore, warm resume or cold start), by kind.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
	}, []string{"kind"})
	f(m.instanceStart)
	m.prepares = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "mitosis_prepares_total", Help: "Seeds prepared on this node.",
	})
	f(m.prepares)
	m.dirRemoved = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mitosis_directory_removed_total",
		Help: "What this node removed on its own because the cluster directory no longer has it, by kind: function (deleted, or its TTL ran out), stage-seed (own or imported; its lease went or never appeared).",
	}, []string{"kind"})
	f(m.dirRemoved)
	for _, k := range []string{"function", "stage-seed"} {
		m.dirRemoved.WithLabelValues(k)
	}
	m.childFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "mitosis_child_failures_total", Help: "Children ended by the daemon because their pages could not be served.",
	})
	f(m.childFailures)
	m.faults = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "mitosis_faults_total", Help: "Page faults served, summed over exited children (added at exit).",
	})
	f(m.faults)
	pages := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mitosis_pages_total", Help: "Pages installed into exited children, by kind (added at exit).",
	}, []string{"kind"})
	f(pages)
	m.pagesShared = pages.WithLabelValues("shared")
	m.pagesCopied = pages.WithLabelValues("copied")
	m.pagesZero = pages.WithLabelValues("zero")
	m.pagesFetched = pages.WithLabelValues("fetched")
	m.pagesEager = pages.WithLabelValues("eager")
	peerReqs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mitosis_peer_requests_total", Help: "Requests served to peer nodes, by type.",
	}, []string{"type"})
	f(peerReqs)
	m.peerDescriptor = peerReqs.WithLabelValues("descriptor")
	m.peerPages = peerReqs.WithLabelValues("pages")
	m.peerFork = peerReqs.WithLabelValues("fork")
	m.peerLease = peerReqs.WithLabelValues("lease")
	m.bytesServed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "mitosis_peer_bytes_served_total", Help: "Descriptor and page bytes served to peer nodes.",
	})
	f(m.bytesServed)
	m.bytesFetched = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "mitosis_peer_bytes_fetched_total", Help: "Page bytes fetched from peer nodes for imported seeds.",
	})
	f(m.bytesFetched)
	zeroCopy := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mitosis_peer_bytes_zero_copy_total",
		Help: "Page bytes moved between nodes without a copy through a buffer: sent from this node's page cache with sendfile, received into it with splice (plain TCP only; included in the served and fetched totals).",
	}, []string{"direction"})
	f(zeroCopy)
	m.zeroCopySent = zeroCopy.WithLabelValues("sent")
	m.zeroCopyReceived = zeroCopy.WithLabelValues("received")
	m.fetchLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "mitosis_fetch_latency_seconds",
		Help:    "Latency of page reads from a peer node, as the pager sees them.",
		Buckets: prometheus.ExponentialBuckets(25e-6, 2, 17), // 25 µs .. 1.6 s
	})
	f(m.fetchLatency)
	m.restore = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "mitosis_restore_seconds",
		Help:    "Fork wall time until a child was released (restore).",
		Buckets: prometheus.ExponentialBuckets(250e-6, 2, 14), // 0.25 ms .. 2 s
	})
	f(m.restore)
	f(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "mitosis_children_running", Help: "Children running on this node.",
	}, func() float64 { return float64(d.runningCount()) }))
	f(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "mitosis_cache_bytes", Help: "Memory taken by this node's page caches (whole 2 MiB folios with the huge-page cache).",
	}, func() float64 { return float64(d.cacheBytes()) }))
	return m
}

// runningCount is the number of running children.
func (d *Daemon) runningCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, k := range d.children {
		if k != nil && !k.hasExited() {
			n++
		}
	}
	return n
}

// cacheBytes sums the page caches of every seed.
func (d *Daemon) cacheBytes() uint64 {
	d.mu.Lock()
	seeds := make([]*seedRec, 0, len(d.seeds))
	for _, s := range d.seeds {
		seeds = append(seeds, s)
	}
	d.mu.Unlock()
	var n uint64
	for _, s := range seeds {
		n += s.seed.CacheBytes()
	}
	return n
}

// serveMetrics serves /metrics on addr, and the Go profiler under
// /debug/pprof/ (the address is an operator's private one, like etcd's and
// containerd's debug endpoints).
func (d *Daemon) serveMetrics(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: listen on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	d.metricsSrv = srv
	d.metricsAddr = ln.Addr().String()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Warn("metrics server stopped", "err", err)
		}
	}()
	return nil
}

// closeMetrics stops the metrics endpoint.
func (d *Daemon) closeMetrics() {
	if d.metricsSrv != nil {
		_ = d.metricsSrv.Close()
	}
}

// MetricsAddr is the address the metrics endpoint listens on ("" without
// Config.Metrics).
func (d *Daemon) MetricsAddr() string { return d.metricsAddr }
