package cluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/bench/netlab"
)

// TestAsyncDrain: a gateway told to stop first lets the async invocations
// it accepted (202) finish and post their callbacks; with a drain timeout
// that runs out, it leaves the rest to another gateway, says so, and their
// instances end on the nodes.
func TestAsyncDrain(t *testing.T) {
	requireSetup(t)
	const n = 12 // under the cluster's 24 slots: all run at once
	for _, tc := range []struct {
		name  string
		drain string // --async-drain-timeout ("": the default, 30s)
		sleep int    // seconds each invocation sleeps
	}{
		{"drained", "", 2},
		{"timeout", "500ms", 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var args []string
			if tc.drain != "" {
				args = []string{"--async-drain-timeout", tc.drain}
			}
			p := startPlatform(t, args...)
			p.deploy("frame", "fork", nil)
			url, tally := p.callbackTally(func(cb callback) string { return cb.h.Get("X-Function-Status") })
			var pidFiles []string
			for i := 0; i < n; i++ {
				pf := filepath.Join(p.dir, fmt.Sprintf("async-%d.pid", i))
				pidFiles = append(pidFiles, pf)
				body := fmt.Sprintf("sleep %d %s", tc.sleep, pf)
				if code, _, out := p.request("POST", "/async-function/frame", body, true, "-H", "X-Callback-Url: "+url); code != 202 {
					t.Fatalf("async invocation %d: %d %s", i, code, out)
				}
			}
			// Every invocation runs before the gateway is told to stop.
			pids := waitPids(t, pidFiles)
			start := time.Now()
			if err := p.gwy.Stop(60 * time.Second); err != nil {
				t.Fatalf("stop the gateway: %v", err)
			}
			took := time.Since(start)
			log, _ := os.ReadFile(p.gwy.LogFile)
			statuses := tally()
			ok := statuses["200"]
			t.Logf("the gateway stopped %v after SIGTERM; callbacks %v", took.Round(10*time.Millisecond), statuses)
			if tc.drain == "" {
				if ok != n {
					t.Errorf("%d of %d callbacks with 200 by the time the gateway stopped: %v", ok, n, statuses)
				}
				if !strings.Contains(string(log), "async invocations finished before stopping") {
					t.Errorf("the gateway log does not say it finished the async invocations:\n%s", netlab.Tail(p.gwy.LogFile, 10))
				}
				return
			}
			if ok != 0 || took > 10*time.Second {
				t.Errorf("with a %s drain: %d callbacks with 200, stopped after %v; want none, in seconds", tc.drain, ok, took)
			}
			// Filed in the directory for another gateway (none here: the
			// directory stops with this gateway's embedded etcd).
			if !strings.Contains(string(log), "async invocations not finished at shutdown") || !strings.Contains(string(log), "handed_over="+strconv.Itoa(n)) {
				t.Errorf("the gateway log does not count %d invocations handed over:\n%s", n, netlab.Tail(p.gwy.LogFile, 10))
			}
			// The unfinished invocations' instances end on their nodes.
			for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
				var alive []int
				for _, pid := range pids {
					if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); pid > 0 && err == nil && !strings.Contains(string(st), ") Z ") {
						alive = append(alive, pid)
					}
				}
				if len(alive) == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("instances %v of dropped invocations still run 15 s after the gateway stopped", alive)
				}
			}
		})
	}
}

// TestAsyncFailover: the async invocations a gateway accepted and did not
// finish before it was killed are run by another gateway, callbacks and
// all (at least once).
func TestAsyncFailover(t *testing.T) {
	requireSetup(t)
	const n = 12
	p := startPlatform(t)
	p.deploy("frame", "fork", nil)
	url2, kill2 := p.secondGateway()
	// Call id -> callbacks with 200.
	url, tally := p.callbackTally(func(cb callback) string {
		if cb.h.Get("X-Function-Status") != "200" {
			return ""
		}
		return cb.h.Get("X-Call-Id")
	})
	var pidFiles []string
	for i := 0; i < n; i++ {
		pf := filepath.Join(p.dir, fmt.Sprintf("failover-%d.pid", i))
		pidFiles = append(pidFiles, pf)
		var out string
		var err error
		for try := 0; try < 100; try++ { // until the second gateway listens
			out, err = p.curl(10*time.Second, "-H", "Authorization: Bearer "+platformToken, "-H", "X-Callback-Url: "+url,
				"-H", fmt.Sprintf("X-Call-Id: failover-%d", i), "-w", "\n%{http_code}", "--data-binary", "sleep 3 "+pf, url2+"/async-function/frame")
			if err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil || !strings.HasSuffix(out, "202") {
			t.Fatalf("async invocation %d on the second gateway: %q %v", i, out, err)
		}
	}
	// Every invocation runs on a node before its gateway dies.
	first := waitPids(t, pidFiles)
	kill2()
	killed := time.Now()
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if len(tally()) == n {
			break
		}
	}
	ok := tally()
	t.Logf("%d of %d invocations called back with 200 %v after their gateway was killed: %v", len(ok), n, time.Since(killed).Round(100*time.Millisecond), ok)
	if len(ok) != n {
		t.Fatalf("%d of %d async invocations of the killed gateway ran to a callback", len(ok), n)
	}
	if code, _, body := p.request("GET", "/metrics", "", false); code != 200 || !strings.Contains(body, "mitosis_gateway_async_claimed_total "+strconv.Itoa(n)) {
		t.Errorf("the first gateway's metrics do not count %d claimed invocations:\n%s", n, grepLines(body, "async"))
	}
	// The killed gateway's own runs of them ended with its connections.
	for _, pid := range first {
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && !strings.Contains(string(st), ") Z ") {
			if strings.Contains(string(st), "python") {
				t.Errorf("instance %d of the killed gateway still runs", pid)
			}
		}
	}
}

// waitPids waits until every pid file names a process (the "sleep SECONDS
// PIDFILE" requests of testdata/frame started) and returns their pids.
func waitPids(t *testing.T, pidFiles []string) []int {
	t.Helper()
	pids := make([]int, len(pidFiles))
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		started := 0
		for i, pf := range pidFiles {
			b, _ := os.ReadFile(pf)
			if pids[i], _ = strconv.Atoi(string(b)); pids[i] > 0 {
				started++
			}
		}
		if started == len(pidFiles) {
			return pids
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d invocations started within 30 s", started, len(pidFiles))
		}
	}
}
