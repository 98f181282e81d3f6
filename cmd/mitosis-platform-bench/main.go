// Command mitosis-platform-bench is the serverless platform benchmark: it
// builds three node daemons and a gateway (with its embedded etcd) in
// network namespaces on this host, deploys a pandas function under each
// policy in turn (fork, local-fork, keep-alive, cold), replays the same
// load-spike trace (Azure Functions 2019 format: generated, or a row of a
// real invocations_per_function_md.anon.dNN.csv) against it through the
// gateway's HTTP API, and reports request latency (p50/p99/max), instances
// alive and total memory over time, and memory × time. It then measures a
// Python hello through the gateway (fork vs a warm SIGCONT'ed instance)
// and the gateway's throughput with hey. It must run as root.
//
// Usage:
//
//	go run ./cmd/mitosis-platform-bench [-out-dir results/platform] [-trace FILE -row N] [flags]
//
// The markdown report goes to stdout and, with the JSON results and the
// SVG charts, into -out-dir; progress goes to stderr.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/mitosis-fork/mitosis/bench/platform"
	"github.com/mitosis-fork/mitosis/function"
)

func main() {
	var cfg platform.Config
	outDir := flag.String("out-dir", "", "write report.md, results.json and the SVG charts here (e.g. results/platform)")
	flag.StringVar(&cfg.TracePath, "trace", "", "replay this Azure Functions trace file instead of a generated one")
	flag.IntVar(&cfg.Row, "row", 0, "with -trace: the row (function) to replay, from 0")
	flag.IntVar(&cfg.Trace.Minutes, "minutes", 0, "generated trace: minutes (default 45); with -trace: replay only the first N minutes")
	flag.Float64Var(&cfg.Trace.BaseRate, "base-rate", 0, "generated trace: mean invocations per minute outside spikes (default 6)")
	flag.IntVar(&cfg.Trace.Spikes, "spikes", 0, "generated trace: number of spikes (default 3)")
	flag.IntVar(&cfg.Trace.SpikeSize, "spike-size", 0, "generated trace: invocations in a spike minute (default 100)")
	flag.IntVar(&cfg.Trace.FirstSpike, "first-spike", 0, "generated trace: minute of the first spike (default 3)")
	flag.IntVar(&cfg.Trace.Gap, "gap", 0, "generated trace: minutes between spikes (default 15: longer than the 10-minute keep-alive)")
	flag.Int64Var(&cfg.Trace.Seed, "seed", 0, "generated trace and arrival times: random seed")
	flag.Float64Var(&cfg.Trace.BurstSeconds, "burst", 0, "fire a spike minute's invocations within its first N trace-seconds (default 2; other minutes are evenly spaced)")
	flag.Float64Var(&cfg.Compression, "compression", 0, "time compression: a trace minute lasts 60s/N (default 60)")
	policies := flag.String("policies", "", "comma-separated policies to compare (default fork,local-fork,keep-alive,cold)")
	flag.IntVar(&cfg.NodeConcurrency, "node-concurrency", 0, "each node's invocation limit (default 16)")
	flag.StringVar(&cfg.NodeMemory, "node-memory", "", "each node's function memory (default 4G)")
	flag.StringVar(&cfg.FnMemory, "fn-memory", "", "the function's memory limit (default 256Mi)")
	flag.IntVar(&cfg.Rows, "rows", 0, "rows of the function's frame (default 1e6)")
	keep := flag.Duration("keep-alive", 0, "warm instances' TTL (default 10 trace-minutes)")
	flag.IntVar(&cfg.HelloRuns, "hello-runs", 200, "sequential hello invocations per policy (0: skip the hello section)")
	flag.IntVar(&cfg.HeyRequests, "hey-requests", 4000, "requests of the hey throughput run (0: skip)")
	flag.IntVar(&cfg.HeyConcurrency, "hey-concurrency", 32, "hey's concurrency")
	flag.StringVar(&cfg.Mitosis, "mitosis", "", "the mitosis binary (default: go build ./cmd/mitosis ./cmd/mitosisd; mitosisd must sit next to it)")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "mitosis-platform-bench: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "mitosis-platform-bench: must run as root (ptrace, userfaultfd, network namespaces)")
		os.Exit(2)
	}
	if _, err := exec.LookPath("hey"); err != nil && cfg.HeyRequests > 0 {
		fmt.Fprintln(os.Stderr, "mitosis-platform-bench: hey not found (apt-get install hey, or -hey-requests 0)")
		os.Exit(2)
	}
	cfg.KeepAlive = *keep
	if *policies != "" {
		for _, p := range strings.Split(*policies, ",") {
			pol, err := function.ParsePolicy(strings.TrimSpace(p))
			if err != nil {
				fmt.Fprintln(os.Stderr, "mitosis-platform-bench: -policies:", err)
				os.Exit(2)
			}
			cfg.Policies = append(cfg.Policies, pol)
		}
	}
	cfg.Log = os.Stderr
	cfg.CommandLine = strings.Join(append([]string{"go run ./cmd/mitosis-platform-bench"}, os.Args[1:]...), " ")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	start := time.Now()
	rep, err := platform.Run(ctx, cfg)
	code := 0
	if rep != nil {
		fmt.Print(rep.Markdown())
		if *outDir != "" {
			if werr := rep.WriteFiles(*outDir); werr != nil {
				fmt.Fprintln(os.Stderr, "mitosis-platform-bench:", werr)
				code = 1
			} else {
				fmt.Fprintf(os.Stderr, "mitosis-platform-bench: wrote %s\n", filepath.Join(*outDir, "report.md"))
			}
		}
		if len(rep.Errors) > 0 {
			code = 1
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mitosis-platform-bench:", err)
		code = 1
	}
	fmt.Fprintf(os.Stderr, "mitosis-platform-bench: done in %s\n", time.Since(start).Round(time.Second))
	stop()
	os.Exit(code)
}
