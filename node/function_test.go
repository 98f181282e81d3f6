package node

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/function"
	"github.com/mitosis-fork/mitosis/transport"
)

const fnSource = `
import hashlib, os
# initialization: state every instance must inherit
DATA = [i * i for i in range(200000)]
DIGEST = hashlib.sha256(repr(DATA).encode()).hexdigest()[:16]
INIT_PID = os.getpid()

def handle(req):
    if req == "raise":
        raise KeyError("no such key: " + req)
    if req == "sleep":
        import time
        time.sleep(30)
    if req == "crash":
        os._exit(7)
    return "%s %s %d" % (req, DIGEST, len(DATA))
`

func needPython(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root (ptrace, userfaultfd)")
	}
	if _, err := os.Stat("/usr/bin/python3"); err != nil {
		t.Skip("no /usr/bin/python3")
	}
}

// pythonDaemon starts a daemon for function tests and dials it (both
// closed when the test ends); it skips the test without root or Python.
func pythonDaemon(t *testing.T) (*Daemon, *client.Client) {
	t.Helper()
	needPython(t)
	d, sock := startDaemon(t)
	cl, err := client.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return d, cl
}

func fnDir(t *testing.T, src string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "handler.py"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestFunctionPolicies(t *testing.T) {
	d, cl := pythonDaemon(t)
	dir := fnDir(t, fnSource)
	// The digest the handler must report: what the initialization computed.
	want := ""
	for _, pol := range function.Policies {
		name := "fn-" + string(pol)
		var info FunctionInfo
		spec := function.Spec{Name: name, Image: dir, Policy: pol, Timeout: function.Duration(2 * time.Second)}
		if err := cl.Call(client.OpFnDeploy, DeployRequest{Spec: spec, Seed: pol.Seeded()}, &info); err != nil {
			t.Fatalf("%s: deploy: %v", pol, err)
		}
		if info.InitError != "" || (pol.Seeded() && info.Seed == "") {
			t.Fatalf("%s: deploy: %+v", pol, info)
		}
		kinds := map[string]int{}
		for i := 0; i < 4; i++ {
			r, err := cl.Invoke(client.InvokeArgs{Function: name, Body: []byte("req")})
			if err != nil {
				t.Fatalf("%s: invoke: %v", pol, err)
			}
			f := strings.Fields(string(r.Body))
			if r.Status != 200 || len(f) != 3 || f[0] != "req" || f[2] != "200000" {
				t.Fatalf("%s: invoke: %+v (%q)", pol, r, r.Body)
			}
			if want == "" {
				want = f[1]
			}
			if f[1] != want {
				t.Fatalf("%s: digest %s, want %s", pol, f[1], want)
			}
			kinds[r.Kind]++
		}
		wantKinds := map[function.Policy]map[string]int{
			function.PolicyFork: {"fork": 4}, function.PolicyLocalFork: {"fork": 4},
			function.PolicyKeepAlive: {"cold": 1, "warm": 3}, function.PolicyCold: {"cold": 4},
		}[pol]
		if !equalCounts(kinds, wantKinds) {
			t.Errorf("%s: instance kinds %v, want %v", pol, kinds, wantKinds)
		}
		// The handler's error reaches the caller as a 500 with the
		// traceback's last line.
		r, err := cl.Invoke(client.InvokeArgs{Function: name, Body: []byte("raise")})
		if err != nil || r.Status != 500 || r.Error != `KeyError: 'no such key: raise'` {
			t.Errorf("%s: raising handler: %+v %v", pol, r, err)
		}
		start := time.Now()
		r, err = cl.Invoke(client.InvokeArgs{Function: name, Body: []byte("sleep"), Timeout: "300ms"})
		if err != nil || r.Status != 504 || time.Since(start) > 10*time.Second {
			t.Errorf("%s: slow handler: %+v %v after %v", pol, r, err, time.Since(start))
		}
		r, err = cl.Invoke(client.InvokeArgs{Function: name, Body: []byte("crash")})
		if err != nil || r.Status != 500 || !strings.Contains(r.Error, "exit code 7") {
			t.Errorf("%s: crashing handler: %+v %v", pol, r, err)
		}
		// Still serving after all that.
		if r, err := cl.Invoke(client.InvokeArgs{Function: name, Body: []byte("again")}); err != nil || r.Status != 200 {
			t.Errorf("%s: after failures: %+v %v", pol, r, err)
		}
	}
	var st NodeStats
	if err := cl.Call(client.OpNodeStats, nil, &st); err != nil {
		t.Fatal(err)
	}
	if len(st.Functions) != 4 || st.Running != 0 || st.MemoryBytes == 0 {
		t.Errorf("stats: %+v", st)
	}
	for _, in := range st.Functions {
		if in.Invocations != 8 || in.Errors != 3 {
			t.Errorf("%s: %d invocations, %d errors; want 8, 3", in.Name, in.Invocations, in.Errors)
		}
	}
	// Unknown function: an error naming it, classed as not deployed.
	_, err := d.fn.invoke(context.Background(), transport.InvokeRequest{Function: "nope"})
	if err == nil || !strings.Contains(err.Error(), `"nope" is not deployed`) {
		t.Errorf("unknown function: %v", err)
	}
	for _, pol := range function.Policies {
		if err := cl.Call(client.OpFnRm, RemoveRequest{Name: "fn-" + string(pol)}, nil); err != nil {
			t.Errorf("rm %s: %v", pol, err)
		}
	}
	// Nothing left: no seed, no function process, no invocation child.
	seeds, _ := cl.Seeds()
	ps, _ := cl.PS()
	if len(seeds) != 0 || len(ps) != 0 {
		t.Errorf("after rm: %d seeds, %d children listed", len(seeds), len(ps))
	}
	var left []FunctionInfo
	if err := cl.Call(client.OpFnList, nil, &left); err != nil || len(left) != 0 {
		t.Errorf("after rm: functions %v %v", left, err)
	}
	d.fn.mu.Lock()
	if d.fn.running != 0 || d.fn.reserved != 0 {
		t.Errorf("after rm: running %d reserved %d", d.fn.running, d.fn.reserved)
	}
	d.fn.mu.Unlock()
}

func equalCounts(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestFunctionInitError(t *testing.T) {
	_, cl := pythonDaemon(t)
	dir := fnDir(t, "import json\nCONFIG = json.loads('{bad')\ndef handle(req):\n    return req\n")
	for _, pol := range []function.Policy{function.PolicyFork, function.PolicyKeepAlive} {
		name := "bad-" + string(pol)
		var info FunctionInfo
		if err := cl.Call(client.OpFnDeploy, DeployRequest{Spec: function.Spec{Name: name, Image: dir, Policy: pol}, Seed: pol.Seeded()}, &info); err != nil {
			t.Fatalf("deploy: %v", err)
		}
		if pol.Seeded() && (!strings.Contains(info.InitError, "json.decoder.JSONDecodeError: Expecting property name enclosed in double quotes") ||
			strings.Contains(info.InitError, function.ErrInit.Error())) {
			t.Errorf("%s: init error %q: want the cause alone", pol, info.InitError)
		}
		r, err := cl.Invoke(client.InvokeArgs{Function: name, Body: []byte("x")})
		if err != nil || r.Status != 500 || !strings.Contains(r.Error, "JSONDecodeError") {
			t.Errorf("%s: invoke of a function whose init fails: %+v %v", pol, r, err)
		}
	}
	b, _ := json.Marshal(DeployRequest{Spec: function.Spec{Name: "x", Image: "/nonexistent"}})
	if err := cl.Call(client.OpFnDeploy, json.RawMessage(b), nil); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("deploy of a missing image: %v", err)
	}
}

// TestStageReservation: an instance kept as a stage seed keeps its memory
// reserved on the node after its invocation returns, until the stage seed is
// removed (by name, or with its function).
func TestStageReservation(t *testing.T) {
	d, cl := pythonDaemon(t)
	const mem = 64 << 20
	spec := function.Spec{Name: "stager", Image: fnDir(t, fnSource), Policy: function.PolicyFork,
		MemoryBytes: mem, Timeout: function.Duration(10 * time.Second)}
	if err := cl.Call(client.OpFnDeploy, DeployRequest{Spec: spec, Seed: true}, &FunctionInfo{}); err != nil {
		t.Fatal(err)
	}
	meta, _ := json.Marshal(function.Request{Stage: true})
	reserved := func() int64 {
		d.fn.mu.Lock()
		defer d.fn.mu.Unlock()
		return d.fn.reserved
	}
	stage := func() string {
		t.Helper()
		r, err := d.fn.invoke(context.Background(), transport.InvokeRequest{Function: "stager", Body: []byte("s"), Meta: meta})
		if err != nil || r.Status != 200 || r.Seed == "" {
			t.Fatalf("stage: %+v %v", r, err)
		}
		return r.Seed
	}
	first := stage()
	if got := reserved(); got != mem {
		t.Errorf("one stage seed kept: %d bytes reserved, want %d", got, mem)
	}
	stage()
	if got := reserved(); got != 2*mem {
		t.Errorf("two stage seeds kept: %d bytes reserved, want %d", got, 2*mem)
	}
	if err := d.fn.removeStage("stager", first); err != nil {
		t.Fatal(err)
	}
	if got := reserved(); got != mem {
		t.Errorf("after removing one: %d bytes reserved, want %d", got, mem)
	}
	if err := cl.Call(client.OpFnRm, RemoveRequest{Name: "stager"}, nil); err != nil {
		t.Fatal(err)
	}
	if got := reserved(); got != 0 {
		t.Errorf("after removing the function: %d bytes reserved, want 0", got)
	}
}
