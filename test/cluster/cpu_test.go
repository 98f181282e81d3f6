package cluster

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// machineCPU is the machine's busy CPU time so far in seconds (/proc/stat:
// user, nice, system, irq, softirq).
func machineCPU(t *testing.T) float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
	var v [8]float64
	for i := range v {
		v[i], _ = strconv.ParseFloat(f[i+1], 64)
	}
	return (v[0] + v[1] + v[2] + v[5] + v[6]) / 100
}

// TestInvocationCPU is a measurement, not a check (run it with
// MITOSIS_MEASURE=1): the machine's CPU per invocation of a fork function
// through the gateway on three nodes, 100 invocations 4 at a time after 20
// to warm up, for a function with no state, one with 128 MiB it does not
// read, and the same reading all of it; two rounds.
func TestInvocationCPU(t *testing.T) {
	if os.Getenv("MITOSIS_MEASURE") != "1" {
		t.Skip("a measurement: MITOSIS_MEASURE=1 runs it")
	}
	p := startPlatform(t)
	for _, c := range []struct{ name, mb string }{{"hello", "0"}, {"big", "128"}} {
		d := map[string]any{"service": c.name, "image": filepath.Join(repoRoot, "test", "cluster", "testdata", "state"),
			"envVars": map[string]string{"STATE_MB": c.mb}, "limits": map[string]string{"memory": "1Gi"},
			"annotations": map[string]string{"com.mitosis.policy": "fork"}}
		b, _ := json.Marshal(d)
		if code, _, body := p.request("POST", "/system/functions", string(b), true); code != http.StatusAccepted {
			t.Fatalf("deploy %s: %d %s", c.name, code, body)
		}
	}
	for round := 1; round <= 2; round++ {
		for _, c := range []struct{ fn, body string }{{"hello", "x"}, {"big", "x"}, {"big", "touch"}} {
			p.burst(c.fn, c.body, 20, 4, time.Minute)
			const n = 100
			c0, t0 := machineCPU(t), time.Now()
			res := p.burst(c.fn, c.body, n, 4, 2*time.Minute)
			wall, cpu := time.Since(t0), machineCPU(t)-c0
			for _, r := range res {
				if r.code != 200 {
					t.Fatalf("%s %s: %d %s", c.fn, c.body, r.code, r.body)
				}
			}
			t.Logf("round %d, %s %q: %.1f ms of machine CPU and %.1f ms of wall time per invocation",
				round, c.fn, c.body, cpu*1000/n, float64(wall.Microseconds())/1000/n)
		}
	}
	for _, fn := range []string{"hello", "big"} {
		if code, _, body := p.request("DELETE", "/system/functions", `{"functionName":"`+fn+`"}`, true); code != http.StatusAccepted {
			t.Errorf("delete %s: %d %s", fn, code, body)
		}
	}
}
