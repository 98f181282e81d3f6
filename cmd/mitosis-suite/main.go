// Command mitosis-suite runs the FunctionBench-style benchmark suite of
// mitosis (package suite) on this host and writes BENCHMARKS-style markdown
// (README.md), results.json and SVG charts into -out. It must run as root;
// it apt-get installs the workloads' Python packages when missing.
//
// Usage:
//
//	go run ./cmd/mitosis-suite [-quick] [-runs N] [-out DIR] [-only LIST] [-remote=false] [-mitosis BIN]
//
// By default it also builds a 3-node lab with bench/netlab (network
// namespaces with a mitosis daemon each, 198.18.5.0/24, removed at the
// end) for the remote cases of every workload and the remote-fanout
// group; -remote=false leaves the lab and those cases out.
//
// The exit status is 1 if any group failed (an engine error or a wrong
// result from an instance).
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

	"github.com/mitosis-fork/mitosis/suite"
)

func main() {
	quick := flag.Bool("quick", false, "run every case once, small sizes (CI: only checks that numbers are produced)")
	runs := flag.Int("runs", 10, "measured runs per case (plus one discarded warm-up)")
	out := flag.String("out", "results", "results directory")
	only := flag.String("only", "", "comma-separated workloads/groups: "+strings.Join(suite.Names(), ", ")+" (default: all)")
	remote := flag.Bool("remote", true, "build a 3-node netlab lab for the remote cases and the remote-fanout group (needs iproute2)")
	mitosis := flag.String("mitosis", "", "mitosis binary for the lab's daemons, with mitosisd next to it (default: go build both)")
	fanPerNode := flag.Int("remote-fanout-children", 0, "remote fan-out: children per target node (default 40, quick 4)")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "mitosis-suite: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "mitosis-suite: must run as root (ptrace, userfaultfd)")
		os.Exit(2)
	}
	cfg := suite.Config{Quick: *quick, Runs: *runs, Out: *out, Log: os.Stderr, Remote: *remote, Mitosis: *mitosis, RemoteFanOutChildren: *fanPerNode,
		CommandLine: strings.Join(append([]string{filepath.Base(os.Args[0])}, os.Args[1:]...), " ")}
	if *only != "" {
		cfg.Only = strings.Split(*only, ",")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := suite.Run(ctx, cfg)
	code := 0
	if rep != nil {
		fmt.Fprintf(os.Stderr, "wrote %s/README.md, results.json and %d SVG files\n", *out, len(rep.Files))
		if rep.Failed() {
			fmt.Fprintln(os.Stderr, "mitosis-suite: some groups FAILED (see the report)")
			code = 1
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "mitosis-suite: %v\n", err)
		code = 1
	}
	os.Exit(code)
}
