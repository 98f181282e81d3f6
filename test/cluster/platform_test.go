package cluster

// The serverless platform end to end: a gateway with its embedded etcd in a
// network namespace of its own, three node daemons registered in it, a
// Python function whose initialization loads a 1e6-row pandas frame, and
// real HTTP clients (curl) against the OpenFaaS API.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/bench/netlab"
	"github.com/mitosis-fork/mitosis/gateway"
)

const platformToken = "test-token-0123456789abcdef"

// platform is a running gateway and its nodes.
type platform struct {
	t       *testing.T
	lab     *netlab.Lab
	gw      *netlab.Node // the gateway's host
	gwy     *netlab.Gateway
	url     string // http://IP:8080
	dir     string
	fnDir   string
	initLog string
}

// startPlatform builds a lab of nodes a, b, c and host gw, starts the
// gateway (embedded etcd, with gatewayArgs too) on gw and the daemons,
// registered in it.
func startPlatform(t *testing.T, gatewayArgs ...string) *platform {
	t.Helper()
	dir, err := os.MkdirTemp(tmpRoot, "platform-")
	if err != nil {
		t.Fatal(err)
	}
	// Node i of the lab gets 198.18.0.(i+1): gw is the fourth.
	gwIP := "198.18.0.4"
	args := []string{"--etcd-endpoints", "http://" + gwIP + ":2379", "--max-concurrency", "8", "--function-log-max", "4K"}
	specs := []netlab.NodeSpec{{Name: "a", Args: args}, {Name: "b", Args: args}, {Name: "c", Args: args}, {Name: "gw", NoDaemon: true}}
	lab, err := netlab.New(netlab.Config{Bin: mitosisBin, Dir: dir, Nodes: specs})
	if err != nil {
		t.Fatalf("building the lab: %v", err)
	}
	prefixMu.Lock()
	prefixes = append(prefixes, lab.Prefix)
	prefixMu.Unlock()
	p := &platform{t: t, lab: lab, gw: lab.Node("gw"), dir: dir}
	if netlab.EtcdURL(p.gw) != args[1] {
		t.Fatalf("gateway host got %s, want %s", p.gw.IP, gwIP)
	}
	t.Cleanup(func() { p.close() })
	p.gwy, err = lab.StartGateway(p.gw, platformToken, append([]string{"--max-body", "1M", "--max-queue", "4", "--queue-timeout", "5s",
		// Workflows run by the gateway: storage through the Redis server
		// a test may start in dir (startRedis).
		"--workflow-redis-socket", filepath.Join(dir, "redis.sock"), "--workflow-work-dir", dir}, gatewayArgs...)...)
	if err != nil {
		t.Fatal(err)
	}
	p.url = p.gwy.URL
	for _, n := range lab.Nodes[:3] {
		if err := n.Start(); err != nil {
			t.Fatal(err)
		}
	}
	p.waitNodes(3, 20*time.Second)
	// The function: testdata/frame, with a log of its initializations.
	p.fnDir = filepath.Join(dir, "frame")
	if err := os.MkdirAll(p.fnDir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile(filepath.Join(repoRoot, "test", "cluster", "testdata", "frame", "handler.py"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(p.fnDir, "handler.py"), src, 0o644); err != nil {
		t.Fatal(err)
	}
	p.initLog = filepath.Join(dir, "init.log")
	return p
}

// callback is a request an async invocation or workflow run made to its
// X-Callback-Url.
type callback struct {
	h    http.Header
	body string
}

// callbackServer serves an X-Callback-Url on the gateway's host until the
// test ends, and returns it with the callbacks it receives.
func (p *platform) callbackServer() (string, <-chan callback) {
	t := p.t
	t.Helper()
	var ln net.Listener
	if err := p.gw.InNetns(func() error {
		var err error
		ln, err = net.Listen("tcp", p.gw.IP+":0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	got := make(chan callback, 4)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- callback{r.Header.Clone(), string(b)}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String() + "/done", got
}

// callbackTally serves an X-Callback-Url (callbackServer) and counts the
// callbacks it receives by key (those keyed "" are not counted); tally
// returns a copy of the counts so far.
func (p *platform) callbackTally(key func(callback) string) (url string, tally func() map[string]int) {
	url, got := p.callbackServer()
	var mu sync.Mutex
	counts := map[string]int{}
	go func() {
		for cb := range got {
			if k := key(cb); k != "" {
				mu.Lock()
				counts[k]++
				mu.Unlock()
			}
		}
	}()
	return url, func() map[string]int {
		mu.Lock()
		defer mu.Unlock()
		return maps.Clone(counts)
	}
}

func (p *platform) close() {
	t := p.t
	if t.Failed() && p.gwy != nil {
		t.Logf("gateway log (last lines):\n%s", netlab.Tail(p.gwy.LogFile, 40))
		for _, n := range p.lab.Nodes[:3] {
			t.Logf("daemon %s log (last lines):\n%s", n.Name, netlab.Tail(n.LogFile, 30))
		}
	}
	// Nodes first (they leave the directory), then the gateway and its
	// etcd: SIGTERM, a clean exit; its data goes with it.
	for _, n := range p.lab.Nodes[:3] {
		if err := n.Stop(30 * time.Second); err != nil {
			t.Errorf("stop %s: %v", n.Name, err)
		}
	}
	if p.gwy != nil {
		if err := p.gwy.Stop(20 * time.Second); err != nil {
			t.Errorf("stop the gateway: %v", err)
		}
		if _, err := os.Stat(p.gwy.StateDir); !os.IsNotExist(err) {
			t.Errorf("the embedded etcd's data %s is still there", p.gwy.StateDir)
		}
	}
	if err := p.lab.Close(); err != nil {
		t.Errorf("closing the lab: %v", err)
	}
	for _, n := range p.lab.Nodes[:3] {
		for _, l := range stateLeftovers(n.StateDir) {
			t.Errorf("node %s: %s", n.Name, l)
		}
	}
	for _, g := range cgroupLeftovers("mitosis-a", "mitosis-b", "mitosis-c") {
		t.Errorf("leftover cgroup %s", g)
	}
}

// cgroupLeftovers lists cgroup directories named with one of the prefixes
// (functions' instance and seed cgroups) in any hierarchy.
func cgroupLeftovers(prefixes ...string) []string {
	var out []string
	_ = filepath.Walk("/sys/fs/cgroup", func(path string, info os.FileInfo, err error) error {
		if err != nil || !info.IsDir() {
			return nil
		}
		base := filepath.Base(path)
		for _, p := range prefixes {
			if strings.HasPrefix(base, p) {
				out = append(out, path)
				return filepath.SkipDir
			}
		}
		if strings.Count(path, "/") > 8 {
			return filepath.SkipDir
		}
		return nil
	})
	return out
}

// curl runs curl in the gateway's namespace (as a client next to it) and
// returns its stdout.
func (p *platform) curl(timeout time.Duration, args ...string) (string, error) {
	cmd := p.gw.Command(append([]string{"curl", "-sS", "--max-time", strconv.Itoa(int(timeout.Seconds()))}, args...)...)
	out, err := cmd.Output()
	if ee, ok := err.(*exec.ExitError); ok {
		err = fmt.Errorf("%v: %s", err, ee.Stderr)
	}
	return string(out), err
}

// secondGateway starts another gateway on the gateway's host (port 8082)
// with the first one's etcd, credentials and workflow settings, stopped at
// the test's end, and returns its URL and what kills it (SIGKILL: a
// crash).
func (p *platform) secondGateway() (string, func()) {
	t := p.t
	t.Helper()
	tokens := filepath.Join(p.dir, "gw2-tokens")
	if err := os.WriteFile(tokens, []byte(platformToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	url2 := "http://" + p.gw.IP + ":8082"
	gw2 := p.gw.Command(mitosisBin, "gateway", "--listen", p.gw.IP+":8082", "--state-dir", filepath.Join(p.dir, "gw2-state"),
		"--etcd-endpoints", p.gwy.Etcd, "--secret-file", p.gw.SecretFile, "--token-file", tokens,
		"--workflow-redis-socket", filepath.Join(p.dir, "redis.sock"), "--workflow-work-dir", p.dir)
	logf, err := os.Create(filepath.Join(p.dir, "gw2.log"))
	if err != nil {
		t.Fatal(err)
	}
	gw2.Stdout, gw2.Stderr = logf, logf
	if err := gw2.Start(); err != nil {
		logf.Close()
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = gw2.Wait(); close(done) }()
	t.Cleanup(func() {
		defer logf.Close()
		_ = gw2.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = gw2.Process.Kill()
			<-done
		}
	})
	return url2, func() {
		_ = gw2.Process.Kill()
		<-done
	}
}

// status runs one request and returns its HTTP status, headers and body.
func (p *platform) request(method, path, body string, auth bool, extra ...string) (int, http.Header, string) {
	p.t.Helper()
	hf := filepath.Join(p.dir, fmt.Sprintf("hdr-%d", time.Now().UnixNano()))
	defer os.Remove(hf)
	args := []string{"-X", method, "-D", hf, "-o", "-", "-w", "\n%{http_code}"}
	if auth {
		args = append(args, "-H", "Authorization: Bearer "+platformToken)
	}
	if body != "" {
		args = append(args, "--data-binary", body)
	}
	args = append(args, extra...)
	out, err := p.curl(60*time.Second, append(args, p.url+path)...)
	if err != nil {
		p.t.Fatalf("%s %s: %v", method, path, err)
	}
	i := strings.LastIndexByte(out, '\n')
	code, _ := strconv.Atoi(strings.TrimSpace(out[i+1:]))
	h := http.Header{}
	if raw, err := os.ReadFile(hf); err == nil {
		tp := bufio.NewScanner(strings.NewReader(string(raw)))
		for tp.Scan() {
			if k, v, ok := strings.Cut(tp.Text(), ":"); ok {
				h.Add(strings.TrimSpace(k), strings.TrimSpace(v))
			}
		}
	}
	return code, h, out[:i]
}

type nodeStatus struct {
	Name     string `json:"name"`
	Down     bool   `json:"down"`
	Inflight int    `json:"inflight"`
	Capacity struct {
		MemoryBytes int64 `json:"memory_bytes"`
	} `json:"capacity"`
	ReservedBytes int64 `json:"reserved_bytes"`
}

// nodeStatuses is GET /system/nodes.
func (p *platform) nodeStatuses() []nodeStatus {
	p.t.Helper()
	code, _, body := p.request("GET", "/system/nodes", "", true)
	if code != 200 {
		p.t.Fatalf("GET /system/nodes: %d %s", code, body)
	}
	var ns []nodeStatus
	if err := json.Unmarshal([]byte(body), &ns); err != nil {
		p.t.Fatalf("GET /system/nodes: %v: %s", err, body)
	}
	return ns
}

func (p *platform) nodes() []string {
	p.t.Helper()
	var out []string
	for _, n := range p.nodeStatuses() {
		if !n.Down {
			out = append(out, n.Name)
		}
	}
	sort.Strings(out)
	return out
}

func (p *platform) waitNodes(n int, timeout time.Duration) []string {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := p.nodes()
		if len(got) == n {
			return got
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("gateway lists nodes %v, want %d within %v", got, n, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// deploy deploys the frame function under name with a policy.
func (p *platform) deploy(name, policy string, env map[string]string) {
	p.t.Helper()
	p.deployMem(name, policy, "1Gi", env)
}

// deployMem deploys the frame function with a memory limit.
func (p *platform) deployMem(name, policy, memory string, env map[string]string) {
	p.t.Helper()
	if env == nil {
		env = map[string]string{}
	}
	if _, ok := env["INIT_LOG"]; !ok {
		env["INIT_LOG"] = p.initLog
	}
	d := map[string]any{"service": name, "image": p.fnDir, "envProcess": "python3 index.py", "envVars": env,
		"limits": map[string]string{"memory": memory}, "annotations": map[string]string{"com.mitosis.policy": policy}}
	b, _ := json.Marshal(d)
	start := time.Now()
	code, _, body := p.request("POST", "/system/functions", string(b), true)
	if code != http.StatusAccepted {
		p.t.Fatalf("deploy %s: %d %s", name, code, body)
	}
	p.t.Logf("deployed %s (%s) in %v", name, policy, time.Since(start).Round(time.Millisecond))
}

// burst runs n invocations, c at a time, with curl --parallel, and returns
// every response's status, node and body.
type result struct {
	code       int
	node       string
	kind       string
	retryAfter string
	body       string
	seconds    float64
}

func (p *platform) burst(fn, body string, n, c int, maxTime time.Duration) []result {
	p.t.Helper()
	dir, err := os.MkdirTemp(p.dir, "burst-")
	if err != nil {
		p.t.Fatal(err)
	}
	var cfg strings.Builder
	for i := 0; i < n; i++ {
		fmt.Fprintf(&cfg, "url = \"%s/function/%s\"\noutput = \"%s/%d\"\n", p.url, fn, dir, i)
	}
	cfgFile := filepath.Join(dir, "curl.cfg")
	if err := os.WriteFile(cfgFile, []byte(cfg.String()), 0o644); err != nil {
		p.t.Fatal(err)
	}
	out, err := p.curl(maxTime, "--parallel", "--parallel-immediate", "--parallel-max", strconv.Itoa(c),
		"-H", "Authorization: Bearer "+platformToken, "--data-binary", body,
		"-w", "%{http_code}|%header{x-mitosis-node}|%header{x-mitosis-instance}|%header{retry-after}|%{time_total}|%{filename_effective}\n",
		"--config", cfgFile)
	if err != nil && out == "" {
		p.t.Fatalf("curl burst of %d: %v", n, err)
	}
	var res []result
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Split(line, "|")
		if len(f) != 6 {
			continue
		}
		var r result
		r.code, _ = strconv.Atoi(f[0])
		r.node, r.kind, r.retryAfter = f[1], f[2], f[3]
		r.seconds, _ = strconv.ParseFloat(f[4], 64)
		b, _ := os.ReadFile(f[5])
		r.body = strings.TrimSpace(string(b))
		res = append(res, r)
	}
	if len(res) != n {
		p.t.Fatalf("curl burst: %d results for %d requests:\n%s", len(res), n, out)
	}
	return res
}

// localSeeds counts, per node, the seeds prepared there for fn (imports
// excluded).
func (p *platform) localSeeds(fn string) map[string]int {
	out := map[string]int{}
	for _, n := range p.lab.Nodes[:3] {
		if !n.Running() {
			continue
		}
		for _, s := range seeds(p.t, n) {
			if s.Name == "fn."+fn && s.Origin == "" {
				out[n.Name]++
			}
		}
	}
	return out
}

func (p *platform) inits() int {
	b, _ := os.ReadFile(p.initLog)
	return len(strings.Fields(string(b)))
}

func referenceDigest(t *testing.T, dir string) string {
	t.Helper()
	cmd := exec.Command(pyExe, filepath.Join(dir, "handler.py"))
	cmd.Env = append(os.Environ(), "OPENBLAS_NUM_THREADS=1")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("reference digest: %v", err)
	}
	d := strings.TrimSpace(string(out))
	if len(d) != 64 {
		t.Fatalf("reference digest %q", d)
	}
	return d
}

func TestPlatform(t *testing.T) {
	requireSetup(t)
	p := startPlatform(t)
	want := referenceDigest(t, p.fnDir)

	p.deploy("frame", "fork", nil)
	if n := p.inits(); n != 1 {
		t.Fatalf("after deploy: %d initializations, want 1", n)
	}

	t.Run("burst", func(t *testing.T) {
		start := time.Now()
		res := p.burst("frame", "x", 200, 20, 120*time.Second)
		perNode := map[string]int{}
		for _, r := range res {
			if r.code != 200 || r.body != want || r.kind != "fork" {
				t.Fatalf("response %d %q (%s, %s), want 200 with digest %s", r.code, r.body, r.node, r.kind, want[:16])
			}
			perNode[r.node]++
		}
		t.Logf("200 invocations, 20 at a time, in %v: per node %v", time.Since(start).Round(time.Millisecond), perNode)
		for _, n := range []string{"a", "b", "c"} {
			if perNode[n] == 0 {
				t.Errorf("no child ran on node %s: %v", n, perNode)
			}
		}
		seeds := p.localSeeds("frame")
		if total := seeds["a"] + seeds["b"] + seeds["c"]; total != 1 {
			t.Errorf("seeds of the function per node %v, want exactly one in the cluster", seeds)
		}
		if n := p.inits(); n != 1 {
			t.Errorf("%d initializations for 200 invocations, want 1", n)
		}
		// The OpenFaaS view of it.
		code, _, body := p.request("GET", "/system/function/frame", "", true)
		var st struct {
			Name              string  `json:"name"`
			InvocationCount   float64 `json:"invocationCount"`
			AvailableReplicas int     `json:"availableReplicas"`
		}
		if code != 200 || json.Unmarshal([]byte(body), &st) != nil || st.Name != "frame" || st.InvocationCount < 200 || st.AvailableReplicas != 1 {
			t.Errorf("GET /system/function/frame: %d %s", code, body)
		}
		code, _, body = p.request("GET", "/metrics", "", false)
		if code != 200 || !strings.Contains(body, `gateway_function_invocation_total{code="200",function_name="frame"} 200`) {
			t.Errorf("metrics lack 200 invocations of frame: %d", code)
		}
	})

	// Instances too big for a third on any node: the gateway queues the
	// burst's extra invocations until memory frees instead of sending
	// them to nodes that refuse them busy (429s after its retries).
	t.Run("memory", func(t *testing.T) {
		ns := p.nodeStatuses()
		least := ns[0].Capacity.MemoryBytes
		for _, n := range ns {
			least = min(least, n.Capacity.MemoryBytes)
		}
		if least <= 0 {
			t.Fatalf("nodes register no memory capacity: %+v", ns)
		}
		mem := least/2/(1<<20) - 1 // MiB: two fit on every node, three on none
		// Not in the initialization log the other subtests count.
		p.deployMem("big", "fork", fmt.Sprintf("%dMi", mem), map[string]string{"INIT_LOG": ""})
		res := p.burst("big", "sleep 1", 8, 8, 60*time.Second)
		perNode := map[string]int{}
		for _, r := range res {
			if r.code != 200 || r.body != want {
				t.Errorf("response %d %q (node %s), want 200 with the digest", r.code, r.body, r.node)
			}
			perNode[r.node]++
		}
		// 6 run at once, 2 wait for the first to end: two waves.
		slowest := 0.0
		for _, r := range res {
			slowest = max(slowest, r.seconds)
		}
		if slowest < 1.9 {
			t.Errorf("8 one-second invocations of %d MiB on 3 nodes with room for 2 each ended within %.1fs: they did not wait", mem, slowest)
		}
		for _, n := range p.nodeStatuses() {
			if n.ReservedBytes != 0 {
				t.Errorf("node %s: %d bytes still reserved after the burst", n.Name, n.ReservedBytes)
			}
		}
		t.Logf("8 invocations of %d MiB: per node %v, slowest %.1fs", mem, perNode, slowest)
		code, _, body := p.request("DELETE", "/system/functions", `{"functionName":"big"}`, true)
		if code != http.StatusAccepted {
			t.Errorf("delete big: %d %s", code, body)
		}
	})

	t.Run("errors", func(t *testing.T) {
		cases := []struct {
			name, method, path, body string
			auth                     bool
			want                     int
			extra                    []string
		}{
			{"unknown function", "POST", "/function/nope", "x", true, 404, nil},
			{"no credentials", "POST", "/function/frame", "x", false, 401, nil},
			{"wrong token", "POST", "/function/frame", "x", false, 401, []string{"-H", "Authorization: Bearer wrong"}},
			{"no credentials on /system", "GET", "/system/functions", "", false, 401, nil},
			{"oversized body", "POST", "/function/frame", "@" + bigFile(t, p.dir, 2<<20), true, 413, nil},
			{"handler raises", "POST", "/function/frame", "raise", true, 500, nil},
			{"malformed deploy", "POST", "/system/functions", "{not json", true, 400, nil},
			{"deploy twice", "POST", "/system/functions", `{"service":"frame","image":"` + p.fnDir + `"}`, true, 409, nil},
			{"scale", "POST", "/system/scale-function/frame", `{"serviceName":"frame","replicas":3}`, true, 400, nil},
			{"scale an unknown function", "POST", "/system/scale-function/nope", `{"serviceName":"nope","replicas":3}`, true, 404, nil},
		}
		for _, c := range cases {
			code, _, body := p.request(c.method, c.path, c.body, c.auth, c.extra...)
			if code != c.want {
				t.Errorf("%s: status %d (%s), want %d", c.name, code, strings.TrimSpace(body), c.want)
			}
			if c.name == "handler raises" && !strings.Contains(body, "ValueError: bad trade raise") {
				t.Errorf("handler raises: body %q lacks the traceback's last line", body)
			}
			if c.name == "scale" && !strings.Contains(body, "no replicas to scale") {
				t.Errorf("scale: body %q does not say why", body)
			}
		}
		// A full cluster: 3 nodes x 8 slots + 4 queued; more get 429 with
		// Retry-After.
		res := p.burst("frame", "sleep 2", 40, 40, 60*time.Second)
		got := map[int]int{}
		for _, r := range res {
			got[r.code]++
			if r.code == 429 && r.retryAfter == "" {
				t.Errorf("429 without Retry-After")
			}
		}
		if got[429] == 0 || got[200] < 24 || got[200]+got[429] != 40 {
			t.Errorf("40 concurrent slow invocations on 24 slots + 4 queue: statuses %v, want 200s and 429s only", got)
		}
	})

	// A client that hangs up ends its invocation on the node: the
	// gateway's request context reaches the node through the transport's
	// cancel, and the node kills the instance instead of letting it run
	// to the function's timeout.
	t.Run("client hangs up", func(t *testing.T) {
		p.deploy("frame-warm", "keep-alive", map[string]string{"INIT_LOG": ""})
		for _, fn := range []string{"frame", "frame-warm"} {
			pidFile := filepath.Join(p.dir, fn+".pid")
			start := time.Now()
			_, err := p.curl(60*time.Second, "-H", "Authorization: Bearer "+platformToken, "--max-time", "3",
				"--data-binary", "sleep 120 "+pidFile, p.url+"/function/"+fn)
			if err == nil || !strings.Contains(err.Error(), "exit status 28") {
				t.Fatalf("%s: curl --max-time 3 of a 120 s invocation: %v, want its timeout (exit status 28)", fn, err)
			}
			b, err := os.ReadFile(pidFile)
			pid, _ := strconv.Atoi(string(b))
			if err != nil || pid <= 0 {
				t.Fatalf("%s: the invocation did not start: pid file %q, %v", fn, b, err)
			}
			gone := false
			for time.Since(start) < 15*time.Second {
				st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
				if err != nil || strings.Contains(string(st), ") Z ") {
					gone = true
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if !gone {
				t.Fatalf("%s: instance %d still runs %v after its client hung up", fn, pid, time.Since(start).Round(time.Millisecond))
			}
			t.Logf("%s: instance %d ended %v after the request began (the client gave up at 3 s)", fn, pid, time.Since(start).Round(time.Millisecond))
			// The function still serves.
			if code, _, body := p.request("POST", "/function/"+fn, "x", true); code != 200 || strings.TrimSpace(body) != want {
				t.Errorf("%s after a hang-up: %d %q", fn, code, body)
			}
		}
		p.request("DELETE", "/system/functions", `{"functionName":"frame-warm"}`, true)
	})

	t.Run("async", func(t *testing.T) {
		url, got := p.callbackServer()
		code, h, body := p.request("POST", "/async-function/frame", "x", true, "-H", "X-Callback-Url: "+url)
		if code != 202 || h.Get("X-Call-Id") == "" {
			t.Fatalf("async invocation: %d %v %s", code, h, body)
		}
		select {
		case cb := <-got:
			if cb.h.Get("X-Call-Id") != h.Get("X-Call-Id") || cb.h.Get("X-Function-Status") != "200" || strings.TrimSpace(cb.body) != want {
				t.Errorf("callback: headers %v body %q", cb.h, cb.body)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("no callback within 30 s")
		}
	})

	t.Run("info", func(t *testing.T) {
		code, _, body := p.request("GET", "/system/info", "", true)
		var info struct {
			Provider struct{ Orchestration string } `json:"provider"`
		}
		if code != 200 || json.Unmarshal([]byte(body), &info) != nil || info.Provider.Orchestration != "mitosis" {
			t.Errorf("GET /system/info: %d %s", code, body)
		}
		if code, _, body := p.request("GET", "/system/namespaces", "", true); code != 200 || strings.TrimSpace(body) != `["openfaas-fn"]` {
			t.Errorf("GET /system/namespaces: %d %s", code, body)
		}
	})

	// GET /system/logs (faas-cli logs): what the instances wrote to stderr
	// (stdout is the response, as in the OpenFaaS classic template), by
	// node, as a tail and as a follow that streams new lines.
	t.Run("logs", func(t *testing.T) {
		dir := filepath.Join(p.dir, "logger")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "handler.py"), []byte("import sys\nprint('INIT logger', file=sys.stderr, flush=True)\n\ndef handle(req):\n    print('LOG ' + req, file=sys.stderr, flush=True)\n    return 'ok'\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(map[string]any{"service": "logger", "image": dir, "annotations": map[string]string{"com.mitosis.policy": "fork"}})
		if code, _, body := p.request("POST", "/system/functions", string(b), true); code != http.StatusAccepted {
			t.Fatalf("deploy logger: %d %s", code, body)
		}
		defer p.request("DELETE", "/system/functions", `{"functionName":"logger"}`, true)
		ran := map[string]string{} // marker -> node
		for i := 0; i < 6; i++ {
			m := fmt.Sprintf("m%d-%d", i, time.Now().UnixNano())
			code, h, out := p.request("POST", "/function/logger", m, true)
			if code != 200 || strings.TrimSpace(out) != "ok" {
				t.Fatalf("invoke logger: %d %q", code, out)
			}
			ran[m] = h.Get("X-Mitosis-Node")
		}
		parse := func(body string) []gateway.LogMessage {
			var out []gateway.LogMessage
			for _, l := range strings.Split(strings.TrimSpace(body), "\n") {
				if l == "" {
					continue
				}
				var m gateway.LogMessage
				if err := json.Unmarshal([]byte(l), &m); err != nil {
					t.Fatalf("log line %q: %v", l, err)
				}
				if m.Name != "logger" || m.Namespace != "openfaas-fn" || m.Instance == "" || m.Timestamp.IsZero() {
					t.Errorf("log message %+v", m)
				}
				out = append(out, m)
			}
			return out
		}
		code, _, body := p.request("GET", "/system/logs?name=logger", "", true)
		if code != 200 {
			t.Fatalf("logs: %d %s", code, body)
		}
		seen := map[string]string{}
		for _, m := range parse(body) {
			if mk, ok := strings.CutPrefix(m.Text, "LOG "); ok {
				seen[mk] = m.Instance
			}
		}
		for mk, n := range ran {
			if seen[mk] != n {
				t.Errorf("request %s ran on %s; its line came from %q", mk, n, seen[mk])
			}
		}
		if code, _, body := p.request("GET", "/system/logs?name=logger&tail=1", "", true); code == 200 {
			per := map[string]int{}
			for _, m := range parse(body) {
				per[m.Instance]++
			}
			for n, c := range per {
				if c > 1 {
					t.Errorf("tail=1 gave %d lines of node %s", c, n)
				}
			}
		} else {
			t.Errorf("logs tail=1: %d %s", code, body)
		}
		for _, n := range []string{"a", "b", "c"} {
			code, _, body := p.request("GET", "/system/logs?name=logger&instance="+n, "", true)
			if code != 200 {
				t.Fatalf("logs of instance %s: %d %s", n, code, body)
			}
			for _, m := range parse(body) {
				if m.Instance != n {
					t.Errorf("instance=%s gave a line of %s: %q", n, m.Instance, m.Text)
				}
			}
		}
		for _, c := range []struct {
			path string
			auth bool
			want int
		}{
			{"/system/logs", true, 400},
			{"/system/logs?name=nope", true, 404},
			{"/system/logs?name=logger&tail=x", true, 400},
			{"/system/logs?name=logger&follow=maybe", true, 400},
			{"/system/logs?name=logger&since=yesterday", true, 400},
			{"/system/logs?name=logger", false, 401},
		} {
			if code, _, body := p.request("GET", c.path, "", c.auth); code != c.want {
				t.Errorf("GET %s: %d %s, want %d", c.path, code, strings.TrimSpace(body), c.want)
			}
		}
		// Past --function-log-max (4K here) a node rotates the log: the
		// next invocation there writes to a new one, which /system/logs
		// serves; the old lines are in logger.log.1.
		big := strings.Repeat("z", 5000)
		code, h, _ := p.request("POST", "/function/logger", big, true)
		if code != 200 {
			t.Fatalf("invoke logger: %d", code)
		}
		x := h.Get("X-Mitosis-Node")
		after := ""
		for i := 0; i < 30 && after == ""; i++ {
			m := fmt.Sprintf("after-%d-%d", i, time.Now().UnixNano())
			if _, h, _ := p.request("POST", "/function/logger", m, true); h.Get("X-Mitosis-Node") == x {
				after = m
			}
		}
		if after == "" {
			t.Fatalf("30 invocations, none on node %s", x)
		}
		_, _, body = p.request("GET", "/system/logs?name=logger&instance="+x, "", true)
		if !strings.Contains(body, "LOG "+after) || strings.Contains(body, big) {
			t.Errorf("node %s after its log passed 4K: /system/logs has the new line %v, the old one %v", x, strings.Contains(body, "LOG "+after), strings.Contains(body, big))
		}
		if b, err := os.ReadFile(filepath.Join(p.lab.Node(x).StateDir, "functions", "logger.log.1")); err != nil || !strings.Contains(string(b), "LOG "+big) {
			t.Errorf("node %s: logger.log.1 lacks the line that filled the log (%v)", x, err)
		}

		// A follow streams lines written after it began.
		cmd := p.gw.Command("curl", "-sS", "-N", "--max-time", "8", "-H", "Authorization: Bearer "+platformToken,
			p.url+"/system/logs?name=logger&tail=1&follow=true")
		var out strings.Builder
		cmd.Stdout = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(1500 * time.Millisecond)
		late := fmt.Sprintf("late-%d", time.Now().UnixNano())
		if code, _, _ := p.request("POST", "/function/logger", late, true); code != 200 {
			t.Errorf("invoke logger: %d", code)
		}
		_ = cmd.Wait() // curl ends at its --max-time (exit 28)
		found := false
		for _, m := range parse(out.String()) {
			found = found || m.Text == "LOG "+late
		}
		if !found {
			t.Errorf("the follow did not stream the line written after it began:\n%s", out.String())
		}
	})

	t.Run("seed node dies", func(t *testing.T) {
		seeds := p.localSeeds("frame")
		var victim *netlab.Node
		for _, n := range p.lab.Nodes[:3] {
			if seeds[n.Name] == 1 {
				victim = n
			}
		}
		if victim == nil {
			t.Fatalf("no seed node: %v", seeds)
		}
		// Invocations in flight while the seed's node is killed: each one
		// ends (a response or an error), none hangs.
		var wg sync.WaitGroup
		var res []result
		wg.Add(1)
		go func() {
			defer wg.Done()
			res = p.burst("frame", "sleep 0.3", 40, 8, 90*time.Second)
		}()
		time.Sleep(time.Second)
		killed := time.Now()
		if err := victim.Kill(); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		codes := map[int]int{}
		for _, r := range res {
			codes[r.code]++
			if r.code == 0 || r.seconds > 60 {
				t.Errorf("invocation hung: %+v", r)
			}
		}
		t.Logf("invocations across the kill of %s: statuses %v", victim.Name, codes)
		// Placement drops the node within 5 s.
		for {
			live := p.nodes()
			if !contains(live, victim.Name) {
				t.Logf("node %s out of placement %v after the kill", victim.Name, time.Since(killed).Round(time.Millisecond))
				break
			}
			if time.Since(killed) > 5*time.Second {
				t.Fatalf("node %s still in placement 5 s after it was killed: %v", victim.Name, live)
			}
			time.Sleep(100 * time.Millisecond)
		}
		// The function is re-initialized on another node; invocations
		// work again and never go to the dead node.
		deadline := time.Now().Add(60 * time.Second)
		for {
			r := p.burst("frame", "x", 1, 1, 60*time.Second)[0]
			if r.code == 200 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no successful invocation within 60 s of the kill; last %+v", r)
			}
			time.Sleep(200 * time.Millisecond)
		}
		res = p.burst("frame", "x", 30, 6, 60*time.Second)
		for _, r := range res {
			if r.code != 200 || r.body != want || r.node == victim.Name {
				t.Errorf("after re-initialization: %+v", r)
			}
		}
		after := p.localSeeds("frame")
		if after[victim.Name] != 0 || after["a"]+after["b"]+after["c"] != 1 {
			t.Errorf("seeds after re-initialization: %v", after)
		}
		if n := p.inits(); n != 2 {
			t.Errorf("%d initializations, want 2 (deploy and re-initialization)", n)
		}
		// The node comes back: its new daemon clears what the killed one
		// left (cgroups, pid file: the close checks) and rejoins placement.
		if err := victim.Start(); err != nil {
			t.Fatalf("restart %s: %v", victim.Name, err)
		}
		back := time.Now()
		for !contains(p.nodes(), victim.Name) {
			if time.Since(back) > 10*time.Second {
				t.Fatalf("restarted node %s not in placement after 10 s: %v", victim.Name, p.nodes())
			}
			time.Sleep(100 * time.Millisecond)
		}
		if got := p.localSeeds("frame"); got["a"]+got["b"]+got["c"] != 1 {
			t.Errorf("seeds after the node came back: %v (want still exactly one)", got)
		}
	})

	code, _, body := p.request("DELETE", "/system/functions", `{"functionName":"frame"}`, true)
	if code != 202 {
		t.Errorf("delete: %d %s", code, body)
	}
	// The delete is accepted (202) before every node has removed its seed.
	for deadline := time.Now().Add(10 * time.Second); ; {
		s := p.localSeeds("frame")
		if len(s) == 0 || s["a"]+s["b"]+s["c"] == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("seeds 10 s after delete: %v", s)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func bigFile(t *testing.T, dir string, n int) string {
	t.Helper()
	path := filepath.Join(dir, "big")
	if err := os.WriteFile(path, make([]byte, n), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
