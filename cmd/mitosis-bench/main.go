// Command mitosis-bench measures the mitosis engine on this host: Prepare
// time against parent size and for a pandas parent, the start latency of a
// Python child, and start+execution of children that read a 64 MiB array
// (C and numpy), each against local fork(2) and exec-from-scratch baselines
// measured in the same run, and (group "threads", issue #10) Prepare and
// start latency of C parents with 1, 4, 16 and 64 threads and of a numpy
// parent with its default BLAS thread pool. It must run as root.
//
// With -remote (the same as -only remote) it measures remote forks instead,
// on a three-node cluster it builds in network namespaces on this host and
// removes afterwards (see bench/netlab): start latency of a Python child on
// another node with a cold and a warm node page cache, start+execution of
// the 64 MiB array child remote vs local, fan-out onto 1, 2 and 3 nodes, and
// network bytes per child with and without the node cache and --prefetch.
// It runs the node daemons from -mitosis, or builds cmd/mitosis with `go
// build` (run it from inside the module).
//
// Usage:
//
//	go run ./cmd/mitosis-bench [-runs N] [-quick] [-out FILE.md] [-json FILE.json] [-only NAME[,NAME...]]
//	go run ./cmd/mitosis-bench -remote [-runs N] [-mitosis BIN] [-fanout N] [-out FILE.md]
//
// The markdown report is printed to stdout (and written to -out); progress
// goes to stderr. The exit status is 1 if any group failed (an engine error
// or a wrong result from a child).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/mitosis-fork/mitosis/bench"
)

func main() {
	runs := flag.Int("runs", 20, "measured runs per case (plus one discarded warm-up)")
	quick := flag.Bool("quick", false, "3 runs per case (unless -runs is given)")
	out := flag.String("out", "", "write the markdown report to this file")
	jsonOut := flag.String("json", "", "write the report with raw samples as JSON to this file")
	only := flag.String("only", "", "comma-separated benchmarks to run: "+strings.Join(bench.Names(), ", ")+" (default: all but remote)")
	remote := flag.Bool("remote", false, "run the remote-fork benchmarks (same as -only remote)")
	mitosisBin := flag.String("mitosis", "", "remote: the mitosis binary for the node daemons (default: go build ./cmd/mitosis ./cmd/mitosisd; mitosisd must sit next to it)")
	fanOut := flag.Int("fanout", 10, "remote: children per node in the fan-out benchmark")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "mitosis-bench: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	runsSet := false
	flag.Visit(func(f *flag.Flag) { runsSet = runsSet || f.Name == "runs" })
	if *quick && !runsSet {
		*runs = 3
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "mitosis-bench: must run as root (ptrace, userfaultfd)")
		os.Exit(2)
	}
	cfg := bench.Config{
		Runs:        *runs,
		Log:         os.Stderr,
		CommandLine: strings.Join(append([]string{filepath.Base(os.Args[0])}, quoteArgs(os.Args[1:])...), " "),
	}
	if *only != "" {
		cfg.Only = strings.Split(*only, ",")
	}
	if *remote {
		cfg.Only = append(cfg.Only, bench.GroupRemote)
	}
	cfg.Mitosis, cfg.FanOut = *mitosisBin, *fanOut
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := bench.Run(ctx, cfg)
	code := 0
	if rep != nil {
		md := rep.Markdown()
		fmt.Print(md)
		if *out != "" {
			if werr := os.WriteFile(*out, []byte(md), 0o644); werr != nil {
				fmt.Fprintln(os.Stderr, "mitosis-bench:", werr)
				code = 1
			}
		}
		if *jsonOut != "" {
			b, jerr := rep.JSON()
			if jerr == nil {
				jerr = os.WriteFile(*jsonOut, append(b, '\n'), 0o644)
			}
			if jerr != nil {
				fmt.Fprintln(os.Stderr, "mitosis-bench:", jerr)
				code = 1
			}
		}
		if rep.Failed() {
			fmt.Fprintln(os.Stderr, "mitosis-bench: some benchmarks FAILED (see the report)")
			code = 1
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mitosis-bench:", err)
		code = 1
	}
	stop()
	os.Exit(code)
}

// quoteArgs quotes arguments that a shell would split.
func quoteArgs(args []string) []string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\n'\"\\$`*?[]{}()<>|&;#~") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q[i] = a
	}
	return q
}
