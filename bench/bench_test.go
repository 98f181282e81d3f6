package bench

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

// TestQuickHello runs the cheapest group, start-python-hello, with 2 runs
// and checks that every case produced a positive median.
func TestQuickHello(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (ptrace, userfaultfd)")
	}
	if _, err := os.Stat(Python); err != nil {
		t.Skipf("no %s: %v", Python, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var log strings.Builder
	rep, err := Run(ctx, Config{Runs: 2, Only: []string{GroupHello}, Log: &log, CommandLine: "go test ./bench"})
	if err != nil {
		t.Fatalf("Run: %v\nlog:\n%s", err, log.String())
	}
	if len(rep.Groups) != 1 || rep.Groups[0].Name != GroupHello {
		t.Fatalf("groups: %+v", rep.Groups)
	}
	g := rep.Groups[0]
	if g.Error != "" {
		t.Fatalf("%s failed: %s\nlog:\n%s", g.Name, g.Error, log.String())
	}
	for _, c := range g.Cases {
		if c.Summary.N != 2 || c.Summary.Median <= 0 {
			t.Errorf("case %q: %d samples, median %v; want 2 samples and a positive median", c.Name, c.Summary.N, c.Summary.Median)
		}
	}
	md := rep.Markdown()
	if !strings.Contains(md, "| local fork | 2 |") {
		t.Errorf("markdown lacks the local fork row:\n%s", md)
	}
	if _, err := rep.JSON(); err != nil {
		t.Errorf("JSON: %v", err)
	}
}

func TestSummarize(t *testing.T) {
	s := summarize([]time.Duration{5, 1, 4, 2, 3, 6})
	if s.N != 6 || s.Median != 3 || s.P99 != 6 || s.Min != 1 || s.Max != 6 {
		t.Errorf("summarize: %+v", s)
	}
	if s := summarize([]time.Duration{3, 1, 2}); s.Median != 2 {
		t.Errorf("odd median: %+v", s)
	}
}

func TestSelection(t *testing.T) {
	g, subj, err := selection([]string{"prepare-256mb", "prepare-16mb"})
	if err != nil || !g[GroupPrepare] || len(g) != 1 || strings.Join(subj, ",") != "prepare-16mb,prepare-256mb" {
		t.Errorf("selection: %v %v %v", g, subj, err)
	}
	if _, _, err := selection([]string{"nope"}); err == nil {
		t.Error("unknown name accepted")
	}
}
