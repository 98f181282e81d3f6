// Command mitosis-workflow-bench is the workflow benchmark: the FINRA
// audit (examples/finra) on three network-namespace nodes behind a gateway,
// for several trade counts and rule counts, with state passed by fork and
// through a real Redis server (pickle), the ways' runs interleaved (-order
// balanced) or back to back (-order blocked). It prints a markdown
// table and, with -out-dir, writes workflow.md, workflow.json and
// workflow.svg. It must run as root.
//
//	go run ./cmd/mitosis-workflow-bench -out-dir results/workflow
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/mitosis-fork/mitosis/bench/platform"
)

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q: want positive integers separated by commas", s)
		}
		out = append(out, n)
	}
	return out, nil
}

func main() {
	var wc platform.WorkflowConfig
	trades := flag.String("trades", "300000,1500000,6000000", "portfolio sizes (trades; ~33 bytes each in the frame: 10, 50 and 198 MB pickled, the issue's 10-200 MB)")
	rules := flag.String("rules", "1,8,32", "rule counts M")
	flag.IntVar(&wc.Runs, "runs", 5, "runs per cell and transfer")
	flag.IntVar(&wc.Window, "window", 0, "each rule checks a window of N trades instead of all")
	flag.StringVar(&wc.Spec, "spec", "examples/finra/finra.json", "the workflow definition")
	flag.StringVar(&wc.Mitosis, "mitosis", "", "the mitosis binary (default: go build ./cmd/mitosis ./cmd/mitosisd; mitosisd must sit next to it)")
	flag.StringVar(&wc.Order, "order", platform.OrderBalanced, "the order of a cell's runs, each after one uncounted warm-up run of each way: balanced (the ways interleaved so that each runs right after each other way about equally often: a run pays for what the run before it left, and no way for its own), crossed (each way runs right after each way, itself included, about equally often: every way pays alike) or blocked (each way's runs back to back: each way in its own steady state, paying for its own aftermath only)")
	flag.BoolVar(&wc.HugePage, "huge-page-cache", false, "start the node daemons with --huge-page-cache (page caches of 2 MiB pages)")
	flag.IntVar(&wc.NodeConc, "node-concurrency", 8, "invocations each node runs at once (the gateway queues the rest)")
	flag.StringVar(&wc.NodeMem, "node-memory", "18G", "each node's function memory (default: 8 invocations of 2Gi and one 2Gi stage seed)")
	forkSeeds := flag.String("fork-seeds", "stage", "the fork transfer's run seeds to measure, comma-separated: stage (an instance of the deployed workflow kept as a stage seed), per-run (a fresh runtime per run whose init runs the sources)")
	flag.BoolVar(&wc.Bound, "bound", true, "also measure the bound of any fork-based transfer: the workflow in one local process whose rules are os.fork()ed children (examples/finra/local_fork.py)")
	outDir := flag.String("out-dir", "", "write workflow.md, workflow.json, workflow.svg here")
	runsOut := flag.String("runs-out", "", "write every run's record (steps and instances with their timings) to this file, one JSON object per line")
	pipeline := flag.Bool("pipeline", false, "measure the ML inference pipeline instead (examples/pipeline: kept steps hand numpy matrices on; fork vs storage), for each of -samples")
	samples := flag.String("samples", "250000,1000000", "with -pipeline: sample counts (32 float64 features each: 256 bytes)")
	shards := flag.Int("shards", 8, "with -pipeline: inference instances")
	pageReporting := flag.String("free-page-reporting", platform.PageReportingKeep, "the guest's free page reporting during the run: keep (the host's setting) or off (page_reporting_order above the largest block, restored after). With it on, memory a run frees goes back to the hypervisor within seconds and the next run pays a host fault for each page it takes again; a storage run frees gigabytes")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "mitosis-workflow-bench: must run as root")
		os.Exit(2)
	}
	var err error
	if wc.Trades, err = ints(*trades); err == nil {
		wc.Rules, err = ints(*rules)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mitosis-workflow-bench:", err)
		os.Exit(2)
	}
	wc.ForkSeeds = strings.Split(*forkSeeds, ",")
	wc.Log = os.Stderr
	if *runsOut != "" {
		f, err := os.Create(*runsOut)
		if err != nil {
			fmt.Fprintln(os.Stderr, "mitosis-workflow-bench:", err)
			os.Exit(2)
		}
		defer f.Close()
		wc.RunsOut = f
	}
	wc.Command = strings.Join(append([]string{"go run ./cmd/mitosis-workflow-bench"}, os.Args[1:]...), " ")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	restore, host, err := platform.SetPageReporting(*pageReporting)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mitosis-workflow-bench:", err)
		os.Exit(2)
	}
	wc.Host = host
	code := run(ctx, wc, *pipeline, *samples, *shards, *outDir)
	if err := restore(); err != nil {
		fmt.Fprintln(os.Stderr, "mitosis-workflow-bench: restore the host's setting:", err)
		code = 1
	}
	stop()
	os.Exit(code)
}

// run runs the benchmark wc (or, with pipeline, the -pipeline one) and
// returns the exit code.
func run(ctx context.Context, wc platform.WorkflowConfig, pipeline bool, samples string, shards int, outDir string) int {
	if pipeline {
		return runPipeline(ctx, wc, samples, shards, outDir)
	}
	cells, err := platform.RunWorkflows(ctx, wc)
	md := platform.WorkflowMarkdown(wc, cells)
	fmt.Print(md)
	if outDir != "" && len(cells) > 0 {
		b, _ := json.MarshalIndent(cells, "", "  ")
		_ = os.MkdirAll(outDir, 0o755)
		for name, data := range map[string][]byte{"workflow.md": []byte(md), "workflow.json": b, "workflow.svg": []byte(platform.WorkflowChart(cells))} {
			if werr := os.WriteFile(filepath.Join(outDir, name), data, 0o644); werr != nil {
				fmt.Fprintln(os.Stderr, "mitosis-workflow-bench:", werr)
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mitosis-workflow-bench:", err)
		return 1
	}
	return 0
}

// runPipeline runs the -pipeline benchmark and returns the exit code.
func runPipeline(ctx context.Context, wc platform.WorkflowConfig, samples string, shards int, outDir string) int {
	pc := platform.PipelineConfig{Spec: "examples/pipeline/pipeline.json", Shards: shards, Runs: wc.Runs,
		ForkSeeds: wc.ForkSeeds, Mitosis: wc.Mitosis, Log: wc.Log, Command: wc.Command,
		NodeMem: wc.NodeMem, NodeConc: wc.NodeConc, RunsOut: wc.RunsOut, Order: wc.Order, Host: wc.Host}
	if wc.Spec != "examples/finra/finra.json" {
		pc.Spec = wc.Spec
	}
	var err error
	if pc.Samples, err = ints(samples); err != nil {
		fmt.Fprintln(os.Stderr, "mitosis-workflow-bench: -samples", err)
		return 2
	}
	cells, err := platform.RunPipelines(ctx, pc)
	md := platform.PipelineMarkdown(pc, cells)
	fmt.Print(md)
	if outDir != "" && len(cells) > 0 {
		b, _ := json.MarshalIndent(cells, "", "  ")
		_ = os.MkdirAll(outDir, 0o755)
		for name, data := range map[string][]byte{"pipeline.md": []byte(md), "pipeline.json": b} {
			if werr := os.WriteFile(filepath.Join(outDir, name), data, 0o644); werr != nil {
				fmt.Fprintln(os.Stderr, "mitosis-workflow-bench:", werr)
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mitosis-workflow-bench:", err)
		return 1
	}
	return 0
}
