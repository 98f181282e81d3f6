package cluster

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/bench/netlab"
)

// stageHandler keeps what "put:X" requests add in a module global: a stage
// seed made of an instance carries it to the instances forked from it.
const stageHandler = `
STATE = []

def handle(req):
    if req.startswith("put:"):
        STATE.append(req[4:])
    if req == "fail":
        raise ValueError("asked to fail")
    return ",".join(STATE)
`

// stageFunctions writes stageHandler into a function directory and returns
// a deploy of it under a name and policy (256Mi).
func stageFunctions(t *testing.T, p *platform) func(name, policy string) {
	t.Helper()
	dir := filepath.Join(p.dir, "stagefn")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "handler.py"), []byte(stageHandler), 0o644); err != nil {
		t.Fatal(err)
	}
	return func(name, policy string) {
		t.Helper()
		b, _ := json.Marshal(map[string]any{"service": name, "image": dir,
			"limits": map[string]string{"memory": "256Mi"}, "annotations": map[string]string{"com.mitosis.policy": policy}})
		if code, _, body := p.request("POST", "/system/functions", string(b), true); code != http.StatusAccepted {
			t.Fatalf("deploy %s: %d %s", name, code, body)
		}
	}
}

// deployTTL deploys (POST) or updates (PUT) stageHandler as function name
// with the com.mitosis.ttl annotation ttl; it returns the answer. Call
// stageFunctions first (it writes the function's directory).
func deployTTL(p *platform, method, name, ttl string) (int, string) {
	b, _ := json.Marshal(map[string]any{"service": name, "image": filepath.Join(p.dir, "stagefn"),
		"limits": map[string]string{"memory": "256Mi"}, "annotations": map[string]string{"com.mitosis.ttl": ttl}})
	code, _, body := p.request(method, "/system/functions", string(b), true)
	return code, body
}

// seedHolders returns the nodes holding a seed named name.
func seedHolders(t *testing.T, p *platform, name string) (out []string) {
	for _, n := range p.lab.Nodes[:3] {
		for _, s := range seeds(t, n) {
			if s.Name == name {
				out = append(out, n.Name)
			}
		}
	}
	return out
}

// TestStageSeeds: an invocation kept as a stage seed (X-Mitosis-Stage)
// serves forks on every node with the memory it had when it answered;
// wrong seed headers are refused; DELETE /system/stage-seeds and removing
// the function leave no seed, import or process.
func TestStageSeeds(t *testing.T) {
	requireSetup(t)
	p := startPlatform(t)
	deploy := stageFunctions(t, p)
	pythons := func() []string { return pgrepFull(t, "mitosis-bootstrap.py") }
	before := len(pythons())
	deploy("keeper", "fork")
	deploy("other", "fork")
	deploy("warmfn", "keep-alive")

	stage := func(fn, body string) (int, string, string) {
		code, h, out := p.request("POST", "/function/"+fn, body, true, "-H", "X-Mitosis-Stage: true")
		return code, h.Get("X-Mitosis-Seed"), out
	}
	code, ref, out := stage("keeper", "put:x")
	if code != 200 || ref == "" || strings.TrimSpace(out) != "x" {
		t.Fatalf("stage: %d seed %q body %q", code, ref, out)
	}
	_, oref, _ := stage("other", "put:o")
	if oref == "" {
		t.Fatal("no stage seed of other")
	}

	// The stage seed is made of a lazily paged instance; it marks present
	// only what can hold data (the function's seed's pages it inherited
	// and what it wrote), not every page of its memory (which made it 27%
	// larger than the function's seed here, every page of it read across
	// the network by a child on another node).
	stageNode, stageID, _ := strings.Cut(ref, "/")
	var fnPages, stagePages uint64
	for _, n := range p.lab.Nodes[:3] {
		for _, s := range seeds(t, n) {
			switch {
			case s.Name == "fn.keeper" && s.Origin == "":
				fnPages = s.PresentPages
			case n.Name == stageNode && s.ID == stageID:
				stagePages = s.PresentPages
			}
		}
	}
	t.Logf("present pages: function seed %d, stage seed %d", fnPages, stagePages)
	if fnPages == 0 || stagePages == 0 || stagePages > fnPages+fnPages/10 {
		t.Errorf("stage seed has %d present pages, the function's seed %d: want about as many", stagePages, fnPages)
	}

	nodes := map[string]int{}
	for i := 0; i < 9; i++ {
		code, h, out := p.request("POST", "/function/keeper", "put:y", true, "-H", "X-Mitosis-Seed: "+ref)
		if code != 200 || strings.TrimSpace(out) != "x,y" {
			t.Fatalf("fork of the stage seed: %d %q, want x,y", code, out)
		}
		nodes[h.Get("X-Mitosis-Node")]++
	}
	if len(nodes) < 2 {
		t.Errorf("forks of the stage seed ran on %v only; the gateway's nodes: %+v", nodes, p.nodeStatuses())
	}
	if code, _, out := p.request("POST", "/function/keeper", "put:z", true); code != 200 || strings.TrimSpace(out) != "z" {
		t.Errorf("the function's own seed changed: %d %q, want z", code, out)
	}

	for _, c := range []struct {
		name, fn string
		hdr      []string
		code     int
		msg      string
	}{
		{"malformed seed", "keeper", []string{"-H", "X-Mitosis-Seed: nonode"}, 400, "is not NODE/SEED"},
		{"malformed stage", "keeper", []string{"-H", "X-Mitosis-Stage: maybe"}, 400, "is not true or false"},
		{"another function's seed", "keeper", []string{"-H", "X-Mitosis-Seed: " + oref}, 502, "is not a seed of this function"},
		{"unknown seed", "keeper", []string{"-H", "X-Mitosis-Seed: a/s-nosuch"}, 502, "s-nosuch"},
		{"keep-alive function", "warmfn", []string{"-H", "X-Mitosis-Stage: true"}, 400, "policy fork or local-fork"},
		{"ttl without stage", "keeper", []string{"-H", "X-Mitosis-Stage-TTL: 1m"}, 400, "needs X-Mitosis-Stage: true"},
		{"malformed ttl", "keeper", []string{"-H", "X-Mitosis-Stage: true", "-H", "X-Mitosis-Stage-TTL: soon"}, 400, "is not a duration"},
		{"ttl too short", "keeper", []string{"-H", "X-Mitosis-Stage: true", "-H", "X-Mitosis-Stage-TTL: 10ms"}, 400, "is not a duration from 1s"},
	} {
		code, _, out := p.request("POST", "/function/"+c.fn, "put:q", true, c.hdr...)
		if code != c.code || !strings.Contains(out, c.msg) {
			t.Errorf("%s: %d %q, want %d with %q", c.name, code, out, c.code, c.msg)
		}
	}
	if code, _, out := p.request("POST", "/async-function/keeper", "put:q", true, "-H", "X-Mitosis-Stage: true"); code != 400 || !strings.Contains(out, "synchronous") {
		t.Errorf("async stage: %d %q, want 400", code, out)
	}
	// A failing instance is not kept.
	if code, ref, out := stage("keeper", "fail"); code != 500 || ref != "" || !strings.Contains(out, "asked to fail") {
		t.Errorf("failing stage: %d seed %q %q, want 500 and no seed", code, ref, out)
	}

	stageSeeds := func() []string {
		var left []string
		for _, n := range p.lab.Nodes[:3] {
			for _, s := range seeds(t, n) {
				if strings.Contains(s.Name, ".stage.") {
					left = append(left, n.Name+":"+s.Name)
				}
			}
		}
		return left
	}
	rm := func(fn, ref string) (int, string) {
		b, _ := json.Marshal(map[string]string{"functionName": fn, "seed": ref})
		code, _, out := p.request("DELETE", "/system/stage-seeds", string(b), true)
		return code, out
	}
	if code, out := rm("nosuchfn", ref); code != 404 {
		t.Errorf("remove a stage seed of an unknown function: %d %q", code, out)
	}
	if code, out := rm("keeper", "bad"); code != 400 {
		t.Errorf("remove a malformed seed: %d %q", code, out)
	}
	if code, out := rm("keeper", ref); code != http.StatusAccepted {
		t.Fatalf("remove the stage seed: %d %q", code, out)
	}
	// A stage seed with a TTL that nobody removes is removed by the
	// gateway when it runs out, its instance ended and its reservation
	// given back; one removed before its TTL is not touched again.
	_, early, _ := p.request("POST", "/function/keeper", "put:e", true, "-H", "X-Mitosis-Stage: true", "-H", "X-Mitosis-Stage-TTL: 2s")
	if early.Get("X-Mitosis-Seed") == "" {
		t.Fatal("no stage seed with a TTL")
	}
	if code, out := rm("keeper", early.Get("X-Mitosis-Seed")); code != http.StatusAccepted {
		t.Fatalf("remove the stage seed with a TTL: %d %q", code, out)
	}
	// One renewed (PATCH) for a minute outlives the TTL it was made with.
	_, rh, _ := p.request("POST", "/function/keeper", "put:r", true, "-H", "X-Mitosis-Stage: true", "-H", "X-Mitosis-Stage-TTL: 2s")
	rref := rh.Get("X-Mitosis-Seed")
	renew := func(fn, ref, ttl string) (int, string) {
		b, _ := json.Marshal(map[string]string{"functionName": fn, "seed": ref, "ttl": ttl})
		code, _, out := p.request("PATCH", "/system/stage-seeds", string(b), true)
		return code, out
	}
	for _, c := range []struct {
		fn, ref, ttl string
		code         int
	}{{"keeper", rref, "1m", 202}, {"keeper", rref, "forever", 400}, {"keeper", rref, "", 400}, {"keeper", "nonode", "1m", 400},
		{"other", rref, "1m", 404}, {"keeper", early.Get("X-Mitosis-Seed"), "1m", 404}} {
		if code, out := renew(c.fn, c.ref, c.ttl); code != c.code {
			t.Errorf("renew %s %s for %q: %d %q, want %d", c.fn, c.ref, c.ttl, code, out, c.code)
		}
	}
	procsBefore := len(pythons())
	reserved := func() (r int64) {
		for _, n := range p.nodeStatuses() {
			r += n.ReservedBytes
		}
		return r
	}
	keeperStages := func() (left []string) { // but the renewed one
		for _, n := range p.lab.Nodes[:3] {
			for _, s := range seeds(t, n) {
				if strings.Contains(s.Name, "fn.keeper.stage.") && n.Name+"/"+s.ID != rref {
					left = append(left, n.Name+":"+s.Name)
				}
			}
		}
		return left
	}
	resBefore := reserved() // other's stage seed
	code, h, out := p.request("POST", "/function/keeper", "put:t", true, "-H", "X-Mitosis-Stage: true", "-H", "X-Mitosis-Stage-TTL: 4s")
	tref := h.Get("X-Mitosis-Seed")
	if code != 200 || tref == "" {
		t.Fatalf("stage with a TTL: %d seed %q %q", code, tref, out)
	}
	if code, _, out := p.request("POST", "/function/keeper", "put:u", true, "-H", "X-Mitosis-Seed: "+tref); code != 200 || strings.TrimSpace(out) != "t,u" {
		t.Fatalf("fork of the stage seed with a TTL: %d %q, want t,u", code, out)
	}

	if r := reserved(); r <= resBefore {
		t.Errorf("the stage seed with a TTL reserves no memory (%d bytes reserved, %d before)", r, resBefore)
	}
	// /metrics shows it where it is (other's stage seed too).
	tnode, _, _ := strings.Cut(tref, "/")
	metric := func(name string) float64 {
		_, _, body := p.request("GET", "/metrics", "", false)
		for _, l := range strings.Split(body, "\n") {
			if v, ok := strings.CutPrefix(l, name+" "); ok {
				f, _ := strconv.ParseFloat(v, 64)
				return f
			}
		}
		return -1
	}
	if n := metric(`mitosis_gateway_stage_seeds{node="` + tnode + `"}`); n < 1 {
		t.Errorf("mitosis_gateway_stage_seeds on %s: %v, want at least 1", tnode, n)
	}
	if b := metric(`mitosis_node_reserved_bytes{node="` + tnode + `"}`); b < 256<<20 {
		t.Errorf("mitosis_node_reserved_bytes on %s: %v, want at least 256Mi", tnode, b)
	}
	deadline := time.Now().Add(15 * time.Second)
	for (len(keeperStages()) > 0 || reserved() > resBefore || len(pythons()) > procsBefore) && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}
	if left, r := keeperStages(), reserved(); len(left) > 0 || r != resBefore {
		t.Errorf("after its TTL: stage seeds %v, %d bytes reserved (%d before it); want none", left, r, resBefore)
	}
	if n := len(pythons()); n > procsBefore {
		t.Errorf("after its TTL: %d step processes, %d before the stage seed was made", n, procsBefore)
	}
	if code, _, _ := p.request("POST", "/function/keeper", "put:v", true, "-H", "X-Mitosis-Seed: "+tref); code == 200 {
		t.Errorf("an expired stage seed still forks")
	}
	if n := metric("mitosis_gateway_stage_seeds_expired_total"); n != 1 {
		t.Errorf("mitosis_gateway_stage_seeds_expired_total %v, want 1 (the one removed early does not count)", n)
	}
	if code, _, out := p.request("POST", "/function/keeper", "put:s", true, "-H", "X-Mitosis-Seed: "+rref); code != 200 || strings.TrimSpace(out) != "r,s" {
		t.Errorf("the renewed stage seed is gone after its first TTL: %d %q", code, out)
	}
	if code, out := rm("keeper", rref); code != http.StatusAccepted {
		t.Errorf("remove the renewed stage seed: %d %q", code, out)
	}
	if code, _, out := p.request("POST", "/function/keeper", "put:y", true, "-H", "X-Mitosis-Seed: "+ref); code == 200 {
		t.Errorf("a removed stage seed still forks: %q", out)
	}
	// other's stage seed goes with its function.
	if code, _, body := p.request("DELETE", "/system/functions", `{"functionName":"other"}`, true); code != http.StatusAccepted {
		t.Fatalf("delete other: %d %s", code, body)
	}
	deadline = time.Now().Add(10 * time.Second)
	for len(stageSeeds()) > 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if left := stageSeeds(); len(left) > 0 {
		t.Errorf("stage seeds left: %v", left)
	}
	// The stage instances and their frozen copies are gone: what is left
	// is keeper's and warmfn's, less other's seed.
	for _, fn := range []string{"keeper", "warmfn"} {
		if code, _, body := p.request("DELETE", "/system/functions", `{"functionName":"`+fn+`"}`, true); code != http.StatusAccepted {
			t.Fatalf("delete %s: %d %s", fn, code, body)
		}
	}
	assertProcs(t, pythons, before)
}

// TestStageLeaseAcrossGateways: a stage seed's TTL is a lease in the
// cluster directory, so a second gateway on the same directory (another
// replica behind a load balancer) renews a seed the first made, and the
// seed goes when nobody renews it.
func TestStageLeaseAcrossGateways(t *testing.T) {
	requireSetup(t)
	p := startPlatform(t)
	stageFunctions(t, p)("keeper", "fork")
	url2, _ := p.secondGateway()
	hc := p.gwy.Client(10 * time.Second)
	renew := func(ref, ttl string) int {
		body, _ := json.Marshal(map[string]string{"functionName": "keeper", "seed": ref, "ttl": ttl})
		req, _ := http.NewRequest("PATCH", url2+"/system/stage-seeds", strings.NewReader(string(body)))
		req.Header.Set("Authorization", "Bearer "+platformToken)
		resp, err := hc.Do(req)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	deadline := time.Now().Add(30 * time.Second)
	for renew("a/s-none", "5s") != http.StatusNotFound {
		if time.Now().After(deadline) {
			t.Fatalf("the second gateway did not serve within 30 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	code, h, out := p.request("POST", "/function/keeper", "put:x", true, "-H", "X-Mitosis-Stage: true", "-H", "X-Mitosis-Stage-TTL: 3s")
	ref := h.Get("X-Mitosis-Seed")
	if code != 200 || ref == "" {
		t.Fatalf("stage with a TTL: %d %q %q", code, ref, out)
	}
	// The second gateway counts the memory the seed holds (from its lease)
	// though the first placed it.
	reserved2 := func() (r int64) {
		req, _ := http.NewRequest("GET", url2+"/system/nodes", nil)
		req.Header.Set("Authorization", "Bearer "+platformToken)
		resp, err := hc.Do(req)
		if err != nil {
			return -1
		}
		defer resp.Body.Close()
		var ns []nodeStatus
		if json.NewDecoder(resp.Body).Decode(&ns) != nil {
			return -1
		}
		for _, n := range ns {
			r += n.ReservedBytes
		}
		return r
	}
	deadline = time.Now().Add(5 * time.Second)
	for reserved2() < 256<<20 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if r := reserved2(); r < 256<<20 {
		t.Errorf("the second gateway reserves %d bytes for the first's stage seed, want 256Mi", r)
	}
	// Renewed through the second gateway only, for twice its TTL.
	for end := time.Now().Add(6 * time.Second); time.Now().Before(end); time.Sleep(time.Second) {
		if c := renew(ref, "3s"); c != http.StatusAccepted {
			t.Fatalf("renewal through the second gateway: %d", c)
		}
	}
	if code, _, out := p.request("POST", "/function/keeper", "put:y", true, "-H", "X-Mitosis-Seed: "+ref); code != 200 || strings.TrimSpace(out) != "x,y" {
		t.Fatalf("the stage seed renewed through the other gateway is gone: %d %q", code, out)
	}
	// Nobody renews it now: it goes within its TTL and the view's delay.
	deadline = time.Now().Add(15 * time.Second)
	for {
		code, _, _ := p.request("POST", "/function/keeper", "put:z", true, "-H", "X-Mitosis-Seed: "+ref)
		if code != 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stage seed outlived its lease by 15 s")
		}
		time.Sleep(500 * time.Millisecond)
	}
	if c := renew(ref, "3s"); c != http.StatusNotFound {
		t.Errorf("renewal of the expired seed: %d, want 404", c)
	}
	deadline = time.Now().Add(5 * time.Second)
	for reserved2() != 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if r := reserved2(); r != 0 {
		t.Errorf("the second gateway still reserves %d bytes after the seed expired", r)
	}
	// A stage seed's lease goes with its function.
	_, h, _ = p.request("POST", "/function/keeper", "put:w", true, "-H", "X-Mitosis-Stage: true", "-H", "X-Mitosis-Stage-TTL: 1h")
	long := h.Get("X-Mitosis-Seed")
	if c := renew(long, "1h"); c != http.StatusAccepted {
		t.Fatalf("renewal of a fresh stage seed: %d", c)
	}
	if code, _, body := p.request("DELETE", "/system/functions", `{"functionName":"keeper"}`, true); code != http.StatusAccepted {
		t.Fatalf("delete keeper: %d %s", code, body)
	}
	if c := renew(long, "1h"); c != http.StatusNotFound {
		t.Errorf("the lease of a removed function's stage seed: renewal %d, want 404", c)
	}
}

// TestDirectoryPartition: a stage seed does not outlive its lease, nor a
// function its TTL, when no gateway can remove them. The gateway is cut
// off from the nodes' peer port (an nftables rule in its namespace) while
// the seed's 6 s lease and the function's 8 s TTL run out: the node that
// made the seed removes it and its instance, the nodes that imported it
// their imports, and the node holding the function's seed the function,
// on their own (node/dirsweep.go). Once the gateway reaches the nodes
// again, its retried removal releases the memory it reserved for the seed.
func TestDirectoryPartition(t *testing.T) {
	requireSetup(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatal("nft (Debian nftables) is missing: run .ci/deps")
	}
	// Long enough for the forks and the partition to be in place before
	// the lease runs out, on a loaded machine too.
	const stageTTL, fnTTL = 6 * time.Second, 8 * time.Second
	p := startPlatform(t)
	stageFunctions(t, p)("keeper", "fork")
	if code, body := deployTTL(p, "POST", "brief", fnTTL.String()); code != http.StatusAccepted {
		t.Fatalf("deploy brief: %d %s", code, body)
	}
	briefHolders := func() []string { return seedHolders(t, p, "fn.brief") }
	if len(briefHolders()) == 0 {
		t.Fatal("no node holds the seed of brief")
	}
	pythons := func() int { return len(pgrepFull(t, "mitosis-bootstrap.py")) }
	if code, _, out := p.request("POST", "/function/keeper", "put:w", true); code != 200 {
		t.Fatalf("warm-up invocation: %d %q", code, out)
	}
	before := pythons()
	code, h, out := p.request("POST", "/function/keeper", "put:x", true, "-H", "X-Mitosis-Stage: true", "-H", "X-Mitosis-Stage-TTL: "+stageTTL.String())
	ref := h.Get("X-Mitosis-Seed")
	if code != 200 || ref == "" {
		t.Fatalf("stage with a TTL: %d %q %q", code, ref, out)
	}
	staged := time.Now()
	owner, id, _ := strings.Cut(ref, "/")
	// Forks of it until one ran on another node, which imported it.
	importers := map[string]bool{}
	for i := 0; i < 12 && len(importers) == 0; i++ {
		code, h, out := p.request("POST", "/function/keeper", "put:y", true, "-H", "X-Mitosis-Seed: "+ref)
		if code != 200 || strings.TrimSpace(out) != "x,y" {
			t.Fatalf("fork of the stage seed: %d %q", code, out)
		}
		if n := h.Get("X-Mitosis-Node"); n != owner {
			importers[n] = true
		}
	}
	if len(importers) == 0 {
		t.Fatalf("12 forks of the stage seed all ran on its node %s", owner)
	}
	// holders lists the nodes holding the seed or an import of it.
	holders := func() (out []string) {
		for _, n := range p.lab.Nodes[:3] {
			for _, s := range seeds(t, n) {
				if (n.Name == owner && s.ID == id) || (s.Origin == owner && strings.Contains(s.Name, ".stage.")) {
					out = append(out, n.Name)
				}
			}
		}
		return out
	}
	if hs := holders(); len(hs) < 2 {
		t.Fatalf("the stage seed is held by %v, want its node and an importer", hs)
	}
	if time.Since(staged) > 3*time.Second {
		t.Logf("the forks took %v of the %v lease", time.Since(staged), stageTTL)
	}

	// Cut the gateway off from every node's peer port.
	nft := func(args ...string) error {
		cmd := p.gw.Command(append([]string{"nft"}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("nft %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	for _, rule := range [][]string{
		{"add", "table", "inet", "mtpartition"},
		{"add", "chain", "inet", "mtpartition", "out", "{ type filter hook output priority 0 ; policy accept ; }"},
		{"add", "rule", "inet", "mtpartition", "out", "tcp", "dport", strconv.Itoa(netlab.Port), "reject", "with", "tcp", "reset"},
	} {
		if err := nft(rule...); err != nil {
			t.Fatal(err)
		}
	}
	healed := false
	heal := func() {
		if !healed {
			healed = true
			if err := nft("delete", "table", "inet", "mtpartition"); err != nil {
				t.Error(err)
			}
		}
	}
	defer heal()
	if d := time.Since(staged); d > stageTTL-time.Second {
		t.Fatalf("the partition took %v of the stage seed's %v lease to set up: too late to show the nodes remove it", d, stageTTL)
	}
	if code, _, _ := p.request("POST", "/function/keeper", "put:z", true, "-H", "X-Mitosis-Seed: "+ref); code == 200 {
		t.Fatal("the gateway still reaches the nodes through the partition")
	}

	// The lease runs out; the nodes remove what they hold of the seed.
	deadline := staged.Add(stageTTL + 8*time.Second)
	for len(holders()) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%v after its lease ran out the stage seed is still held by %v", time.Since(staged.Add(stageTTL)).Round(100*time.Millisecond), holders())
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("stage seed gone from every node %v after it was made (%v lease)", time.Since(staged).Round(100*time.Millisecond), stageTTL)
	for deadline := staged.Add(fnTTL + 8*time.Second); len(briefHolders()) > 0; time.Sleep(250 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%v after its TTL ran out the function's seed is still on %v", time.Since(staged.Add(fnTTL)).Round(100*time.Millisecond), briefHolders())
		}
	}
	t.Logf("the function with a %v TTL gone from every node %v after the stage seed was made", fnTTL, time.Since(staged).Round(100*time.Millisecond))
	waitFor := func(what string, timeout time.Duration, ok func() bool) {
		t.Helper()
		for end := time.Now().Add(timeout); !ok(); time.Sleep(100 * time.Millisecond) {
			if time.Now().After(end) {
				t.Fatalf("%s: not within %v", what, timeout)
			}
		}
	}
	waitFor("the stage instance to end", 5*time.Second, func() bool { return pythons() <= before })
	fnRemoved := 0
	for _, n := range p.lab.Nodes[:3] {
		log, _ := os.ReadFile(n.LogFile)
		removed := strings.Contains(string(log), "stage seed removed: its lease in the directory is gone")
		if want := n.Name == owner || importers[n.Name]; removed != want {
			t.Errorf("node %s logged removing the seed itself: %v, want %v", n.Name, removed, want)
		}
		if strings.Contains(string(log), "function removed: the cluster directory no longer has it") {
			fnRemoved++
		}
	}
	if fnRemoved == 0 {
		t.Error("no node logged removing the expired function itself")
	}

	// Reconnected, the gateway's retry releases its reservation.
	heal()
	reserved := func() (r int64) {
		for _, n := range p.nodeStatuses() {
			r += n.ReservedBytes
		}
		return r
	}
	waitFor("the gateway to release the seed's reservation", 10*time.Second, func() bool { return reserved() == 0 })
	log, _ := os.ReadFile(p.gwy.LogFile)
	if !strings.Contains(string(log), "removing it failed, retrying every second") {
		t.Error("the gateway did not log its failed removal")
	}
	if code, _, out := p.request("POST", "/function/keeper", "put:v", true); code != 200 || strings.TrimSpace(out) != "v" {
		t.Errorf("after the partition: %d %q", code, out)
	}
	if code, _, _ := p.request("POST", "/function/brief", "put:v", true); code != http.StatusNotFound {
		t.Errorf("the expired function after the partition: %d, want 404", code)
	}
}

// TestFunctionTTL: a function deployed with com.mitosis.ttl lives while
// PATCH /system/functions renews it (through the API, 202) and is removed
// from the directory and every node when nobody does; an update sets its
// TTL anew (or takes it off); bad annotations and renewals get 400, 404 or
// 409.
func TestFunctionTTL(t *testing.T) {
	requireSetup(t)
	p := startPlatform(t)
	stageFunctions(t, p)("lasting", "fork")
	deploy := func(method, name, ttl string) (int, string) { return deployTTL(p, method, name, ttl) }
	renew := func(name string) (int, string) {
		code, _, body := p.request("PATCH", "/system/functions", `{"functionName":"`+name+`"}`, true)
		return code, body
	}
	for _, c := range []struct {
		what   string
		code   int
		msg    string
		result func() (int, string)
	}{
		{"a TTL that is no duration", 400, "is not a duration", func() (int, string) { return deploy("POST", "bad", "soon") }},
		{"a TTL below 1s", 400, "is not a duration", func() (int, string) { return deploy("POST", "bad", "10ms") }},
		{"renewing an unknown function", 404, "not found", func() (int, string) { return renew("nosuch") }},
		{"renewing a function without a TTL", 409, "without a TTL", func() (int, string) { return renew("lasting") }},
		{"a malformed renewal", 400, "malformed request", func() (int, string) {
			code, _, body := p.request("PATCH", "/system/functions", `{}`, true)
			return code, body
		}},
	} {
		if code, body := c.result(); code != c.code || !strings.Contains(body, c.msg) {
			t.Errorf("%s: %d %q, want %d and %q", c.what, code, body, c.code, c.msg)
		}
	}
	if code, body := deploy("POST", "brief", "4s"); code != http.StatusAccepted {
		t.Fatalf("deploy with a TTL: %d %s", code, body)
	}
	holders := func() []string { return seedHolders(t, p, "fn.brief") }
	if len(holders()) == 0 {
		t.Fatal("no node holds the seed of the function with a TTL")
	}
	// Renewed for twice its TTL, it serves and keeps its seed.
	for end := time.Now().Add(6 * time.Second); time.Now().Before(end); time.Sleep(time.Second) {
		if code, body := renew("brief"); code != http.StatusAccepted {
			t.Fatalf("renew: %d %s", code, body)
		}
	}
	if code, _, out := p.request("POST", "/function/brief", "put:a", true); code != 200 || strings.TrimSpace(out) != "a" {
		t.Fatalf("the renewed function: %d %q", code, out)
	}
	// An update sets the TTL from now: an hour, then 4 s again.
	if code, body := deploy("PUT", "brief", "1h"); code != http.StatusAccepted {
		t.Errorf("an update to an hour's TTL: %d %q", code, body)
	}
	if code, body := deploy("PUT", "brief", "4s"); code != http.StatusAccepted {
		t.Errorf("an update back to 4 s: %d %q", code, body)
	}
	// An update without a TTL keeps a function for good.
	if code, body := deploy("POST", "kept", "4s"); code != http.StatusAccepted {
		t.Fatalf("deploy kept: %d %s", code, body)
	}
	if code, body := deploy("PUT", "kept", ""); code != http.StatusAccepted {
		t.Errorf("an update taking the TTL off: %d %q", code, body)
	}
	if code, body := renew("kept"); code != http.StatusConflict {
		t.Errorf("renewing a function whose TTL an update took off: %d %q, want 409", code, body)
	}
	// Left alone, it goes from the directory and the nodes.
	t0 := time.Now()
	for {
		code, _, _ := p.request("GET", "/system/function/brief", "", true)
		if code == http.StatusNotFound && len(holders()) == 0 {
			break
		}
		if time.Since(t0) > 15*time.Second {
			t.Fatalf("15 s after its last renewal: GET %d, seed on %v", code, holders())
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("the function went %v after its last renewal (4 s TTL)", time.Since(t0).Round(100*time.Millisecond))
	if code, _ := renew("brief"); code != http.StatusNotFound {
		t.Errorf("renewing the expired function: %d, want 404", code)
	}
	if code, _, out := p.request("POST", "/function/lasting", "put:b", true); code != 200 || strings.TrimSpace(out) != "b" {
		t.Errorf("the function without a TTL: %d %q", code, out)
	}
	// kept outlives its first 4 s TTL by far, unrenewed.
	time.Sleep(2 * time.Second)
	if code, _, out := p.request("POST", "/function/kept", "put:c", true); code != 200 || strings.TrimSpace(out) != "c" {
		t.Errorf("the function updated without a TTL: %d %q", code, out)
	}
}
