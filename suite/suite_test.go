package suite

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/bench/netlab"
)

// TestQuick runs the quick mode for two cheap workloads (hello, json) and
// every other same-node group (no lab: Config.Remote is off), and checks that every case produced a positive number
// and that the report and the SVG charts were written.
func TestQuick(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (ptrace, userfaultfd)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out := t.TempDir()
	rep, err := Run(ctx, Config{Quick: true, Out: out, Log: testWriter{t}, CommandLine: "go test ./suite",
		Only:            []string{"hello", "json", GroupPrepare, GroupFanOut, GroupMemory},
		MemoryWorkloads: []string{"hello", "json"}})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Failed() {
		md, _ := os.ReadFile(filepath.Join(out, "README.md"))
		t.Fatalf("a group failed:\n%s", md)
	}
	if len(rep.Start) != 2 {
		t.Fatalf("%d start groups, want 2", len(rep.Start))
	}
	for _, g := range rep.Start {
		for _, c := range g.Cases {
			if c.S.Median <= 0 || c.T.Median <= 0 {
				t.Errorf("%s / %s: start %v, start+exec %v", g.Workload, c.Name, c.S.Median, c.T.Median)
			}
		}
		if g.Hash == "" || g.Verified < len(g.Cases) {
			t.Errorf("%s: %d results verified (hash %q)", g.Workload, g.Verified, g.Hash)
		}
	}
	if rep.Prepare == nil || len(rep.Prepare.Rows) == 0 {
		t.Fatal("no prepare results")
	}
	for _, row := range rep.Prepare.Rows {
		if row.Wall.S.Median <= 0 || row.Took.S.Median <= 0 {
			t.Errorf("prepare %d MiB: %v", row.MB, row.Wall.S.Median)
		}
	}
	if rep.FanOut == nil || len(rep.FanOut.Rows) == 0 {
		t.Fatal("no fan-out results")
	}
	for _, row := range rep.FanOut.Rows {
		if row.rate() <= 0 || row.Lat.T.Median <= 0 {
			t.Errorf("fan-out %d in flight: rate %v, latency %v", row.Conc, row.rate(), row.Lat.T.Median)
		}
	}
	if len(rep.Memory) != 2 {
		t.Fatalf("%d memory groups, want 2", len(rep.Memory))
	}
	for _, g := range rep.Memory {
		if len(g.Rows) == 0 {
			t.Errorf("memory %s: no rows", g.Workload)
		}
		for _, row := range g.Rows {
			if row.Median.Rss == 0 || row.Total() == 0 {
				t.Errorf("memory %s, %d × %s: %+v", g.Workload, row.N, row.Approach, row)
			}
		}
	}
	want := []string{"README.md", "results.json", "overview-ratio.svg", "overview-start.svg", "start-hello.svg", "start-json.svg",
		"prepare.svg", "fanout.svg", "fanout-latency.svg", "memory-hello.svg", "memory-json.svg"}
	for _, f := range want {
		b, err := os.ReadFile(filepath.Join(out, f))
		if err != nil {
			t.Errorf("missing %s: %v", f, err)
		} else if len(b) == 0 {
			t.Errorf("%s is empty", f)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// TestQuickRemote runs hello with the remote cases and the remote fan-out
// on a 3-node bench/netlab lab (skipped where a lab cannot be built), and
// checks every case produced a number and the lab left nothing behind.
func TestQuickRemote(t *testing.T) {
	if why := netlab.Available(); why != "" {
		t.Skip(why)
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("needs the go tool to build the daemons' mitosis binary")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out := t.TempDir()
	rep, err := Run(ctx, Config{Quick: true, Remote: true, Out: out, Log: testWriter{t}, CommandLine: "go test ./suite",
		Only: []string{"hello", GroupRemoteFanOut}})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Failed() {
		md, _ := os.ReadFile(filepath.Join(out, "README.md"))
		t.Fatalf("a group failed:\n%s", md)
	}
	if len(rep.Start) != 1 {
		t.Fatalf("%d start groups, want 1", len(rep.Start))
	}
	g := rep.Start[0]
	for _, n := range append(slices.Clone(StartCases), RemoteCases...) {
		c := g.caseByName(n)
		if c == nil || c.S.Median <= 0 || c.T.Median <= 0 {
			t.Errorf("hello / %s: missing or no numbers: %+v", n, c)
		}
	}
	if g.Verified < len(StartCases)+len(RemoteCases) {
		t.Errorf("hello: %d results verified", g.Verified)
	}
	f := rep.RemoteFanOut
	if f == nil || len(f.Rows) != 3 {
		t.Fatalf("remote fan-out: %+v", f)
	}
	for _, row := range f.Rows {
		if row.rate() <= 0 || len(row.Lat.Total) != f.PerNode*len(row.Nodes) {
			t.Errorf("remote fan-out onto %v: rate %v, %d children", row.Nodes, row.rate(), len(row.Lat.Total))
		}
	}
	for _, f := range []string{"remote-fanout.svg", "remote-fanout-latency.svg"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Error(err)
		}
	}
	if left := netlab.Leftovers("mt"); len(left) > 0 {
		t.Logf("namespaces with the netlab prefix after the run (maybe other labs): %v", left)
	}
}
