package bench

import (
	"context"
	"math"
	"os"
	"os/exec"
	"slices"
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

func TestPerExtraThread(t *testing.T) {
	for _, c := range []struct {
		medN, med1 time.Duration
		n          int
		want       time.Duration
	}{
		{med1: 1000 * time.Microsecond, medN: 4150 * time.Microsecond, n: 64, want: 50 * time.Microsecond},
		{med1: 2 * time.Millisecond, medN: 2300 * time.Microsecond, n: 4, want: 100 * time.Microsecond},
		{med1: 2 * time.Millisecond, medN: 1700 * time.Microsecond, n: 4, want: -100 * time.Microsecond}, // noise
		{med1: 2 * time.Millisecond, medN: 9 * time.Millisecond, n: 1, want: 0},
	} {
		if got := perExtraThread(c.medN, c.med1, c.n); got != c.want {
			t.Errorf("perExtraThread(%v, %v, %d) = %v, want %v", c.medN, c.med1, c.n, got, c.want)
		}
	}
	if verdict(true) != "met" || verdict(false) != "**missed**" {
		t.Errorf("verdict: %q %q", verdict(true), verdict(false))
	}
}

func TestFitLine(t *testing.T) {
	for _, c := range []struct {
		xs, ys []float64
		a, b   float64
	}{
		{[]float64{1, 4, 16, 64}, []float64{110, 140, 260, 740}, 100, 10}, // exact
		{[]float64{1, 2, 3}, []float64{1, 3, 2}, 1, 0.5},
		{[]float64{5, 5}, []float64{1, 3}, 2, 0}, // vertical: no slope
	} {
		a, b := fitLine(c.xs, c.ys)
		if math.Abs(a-c.a) > 1e-9 || math.Abs(b-c.b) > 1e-9 {
			t.Errorf("fitLine(%v, %v) = %v, %v, want %v, %v", c.xs, c.ys, a, b, c.a, c.b)
		}
	}
}

func TestEnvWithout(t *testing.T) {
	env := []string{"PATH=/bin", "OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "OPENBLAS_NUM_THREADS_X=2", "MKL_NUM_THREADS=1", "HOME=/root"}
	got := envWithout(env, blasThreadVars...)
	if strings.Join(got, " ") != "PATH=/bin OPENBLAS_NUM_THREADS_X=2 HOME=/root" {
		t.Errorf("envWithout: %q", got)
	}
	if len(env) != 6 || env[1] != "OPENBLAS_NUM_THREADS=1" {
		t.Errorf("envWithout changed its argument: %q", env)
	}
}

func TestSelectionThreads(t *testing.T) {
	g, _, err := selection([]string{GroupThreads})
	if err != nil || !g[GroupThreads] || len(g) != 1 {
		t.Errorf("selection(threads): %v %v", g, err)
	}
	g, _, err = selection(nil)
	if err != nil || !g[GroupThreads] || g[GroupRemote] || g[GroupContainer] {
		t.Errorf("default selection: %v %v", g, err)
	}
	if !slices.Contains(Names(), GroupThreads) {
		t.Errorf("Names() lacks %q: %v", GroupThreads, Names())
	}
}

// TestQuickThreads runs the threads group with one measured run and checks
// that every case has its sample and the tables their rows.
func TestQuickThreads(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (ptrace, userfaultfd)")
	}
	if err := exec.Command(Python, "-c", "import numpy").Run(); err != nil {
		t.Skipf("no numpy for %s: %v", Python, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var log strings.Builder
	rep, err := Run(ctx, Config{Runs: 1, Only: []string{GroupThreads}, Log: &log, CommandLine: "go test ./bench"})
	if err != nil {
		t.Fatalf("Run: %v\nlog:\n%s", err, log.String())
	}
	if len(rep.Groups) != 1 || rep.Groups[0].Name != GroupThreads {
		t.Fatalf("groups: %+v", rep.Groups)
	}
	g := rep.Groups[0]
	if g.Error != "" {
		t.Fatalf("%s failed: %s\nlog:\n%s", g.Name, g.Error, log.String())
	}
	if want := 6*len(threadCounts) + 4; len(g.Cases) != want {
		t.Errorf("%d cases, want %d", len(g.Cases), want)
	}
	for _, c := range g.Cases {
		if c.Summary.N != 1 || c.Summary.Median <= 0 {
			t.Errorf("case %q: %d samples, median %v; want 1 sample and a positive median", c.Name, c.Summary.N, c.Summary.Median)
		}
	}
	if len(g.Tables) != 3 || len(g.Tables[0].Rows) != len(threadCounts) || len(g.Tables[1].Rows) != 2 || len(g.Tables[2].Rows) != 2 {
		t.Errorf("tables: %+v", g.Tables)
	}
	if md := rep.Markdown(); !strings.Contains(md, "| N=64 mitosis start | 1 |") {
		t.Errorf("markdown lacks the N=64 row:\n%s", md)
	}
}
