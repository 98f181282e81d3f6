package cluster

// Workflows on the platform: the FINRA-style audit (examples/finra) on three
// network-namespace nodes, with state passed by fork and through a real
// Redis server, checked against a single-process reference run.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/mitosis-fork/mitosis/workflow"
)

// startRedis starts redis-server on a unix socket under dir (no TCP, no
// persistence) and stops it when the test ends.
func startRedis(t *testing.T, dir string) (string, *redis.Client) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatal("redis-server not installed (.ci/deps installs it)")
	}
	sock := filepath.Join(dir, "redis.sock")
	cmd := exec.Command(bin, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "777",
		"--save", "", "--appendonly", "no", "--dir", dir, "--proto-max-bulk-len", "1gb")
	cmd.Stdout, cmd.Stderr = nil, nil
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		if _, err := os.Stat(sock); err == nil {
			_ = os.Remove(sock)
		}
	})
	rdb := redis.NewClient(&redis.Options{Network: "unix", Addr: sock})
	t.Cleanup(func() { rdb.Close() })
	deadline := time.Now().Add(10 * time.Second)
	for rdb.Ping(context.Background()).Err() != nil {
		if time.Now().After(deadline) {
			t.Fatal("redis-server did not answer on its socket within 10 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return sock, rdb
}

func reference(t *testing.T, spec, input string) map[string]any {
	t.Helper()
	cmd := exec.Command(pyExe, filepath.Join(repoRoot, "examples", "reference.py"), spec, input)
	cmd.Env = append(os.Environ(), "OPENBLAS_NUM_THREADS=1")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("reference run: %v", err)
	}
	var v map[string]any
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("reference output %q: %v", out, err)
	}
	return v
}

func TestWorkflowFINRA(t *testing.T) {
	p := startPlatform(t)
	sock, rdb := startRedis(t, p.dir)
	specPath := filepath.Join(repoRoot, "examples", "finra", "finra.json")
	spec, err := workflow.ReadSpec(specPath)
	if err != nil {
		t.Fatal(err)
	}
	const input = `{"trades": 200000, "rules": 8}`
	want := reference(t, specPath, input)
	rn := &workflow.Runner{Gateway: p.url, Token: platformToken, HTTP: p.gwy.Client(5 * time.Minute),
		RedisSocket: sock, WorkDir: p.dir, Timeout: 2 * time.Minute}
	ctx := context.Background()
	pythons := func() []string { return pgrepFull(t, "mitosis-bootstrap.py") }
	before := len(pythons())
	// The workflow's function is deployed once; its seed and its parent
	// are what stays between runs.
	if deployed, err := rn.Deploy(ctx, spec); err != nil || !deployed {
		t.Fatalf("deploy: %v (deployed %v)", err, deployed)
	}
	if deployed, err := rn.Deploy(ctx, spec); err != nil || deployed {
		t.Fatalf("deploy of an unchanged workflow deployed again: %v (deployed %v)", err, deployed)
	}
	deployedProcs := len(pythons())

	for _, v := range []struct {
		name   string
		tr     workflow.Transfer
		perRun bool
	}{{"fork", workflow.TransferFork, false}, {"fork-seed-per-run", workflow.TransferFork, true}, {"storage", workflow.TransferStorage, false}} {
		tr := v.tr
		t.Run(v.name, func(t *testing.T) {
			rn.SeedPerRun = v.perRun
			defer func() { rn.SeedPerRun = false }()
			run, err := rn.Run(ctx, spec, json.RawMessage(input), tr)
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			var got map[string]any
			if err := json.Unmarshal(run.Result, &got); err != nil {
				t.Fatalf("result %s: %v", run.Result, err)
			}
			if got["digest"] != want["digest"] || got["flagged"] != want["flagged"] {
				t.Fatalf("verdicts differ from the reference: got digest %v flagged %v, want %v %v",
					got["digest"], got["flagged"], want["digest"], want["flagged"])
			}
			audit, ok := run.Step("audit")
			if !ok || len(audit.Instances) != 8 {
				t.Fatalf("audit step: %+v", audit)
			}
			if len(audit.Nodes) < 2 {
				t.Errorf("the 8 rules ran on %v only; want more than one node", audit.Nodes)
			}
			// The timeline: every step starts after its upstream steps
			// ended (at_ms + ms; 1 ms of rounding) and within the run.
			for _, st := range spec.Steps {
				r, _ := run.Step(st.Name)
				if r.AtMS < 0 || r.AtMS > run.MS {
					t.Errorf("step %s starts at %.1f ms, outside the run's %.1f ms", st.Name, r.AtMS, run.MS)
				}
				for _, a := range st.After {
					if up, _ := run.Step(a); r.AtMS+1 < up.AtMS+up.MS {
						t.Errorf("step %s starts at %.1f ms, before %s ended (%.1f + %.1f ms)", st.Name, r.AtMS, a, up.AtMS, up.MS)
					}
				}
			}
			var transfer float64
			for _, in := range audit.Instances {
				transfer += in.LoadMS + in.DeserMS
			}
			switch tr {
			case workflow.TransferFork:
				if transfer != 0 {
					t.Errorf("fork run spent %.1f ms loading state from storage", transfer)
				}
				if st, _ := run.Step("fetch-portfolio"); !st.InInit || (!v.perRun && len(st.Instances) != 1) {
					t.Errorf("fork: fetch-portfolio did not run in the run's seed: %+v", st)
				}
			case workflow.TransferStorage:
				for _, in := range audit.Instances {
					if in.BytesIn < 5<<20 {
						t.Errorf("storage: a rule loaded only %d bytes of state", in.BytesIn)
					}
				}
			}
			t.Logf("%s: %.0f ms end to end (deploy %.0f ms), audit on %v, %.1f ms in GET+unpickle",
				tr, run.MS, run.DeployMS, audit.Nodes, transfer)
			assertRunGone(t, p, rdb, run)
			assertProcs(t, pythons, deployedProcs)
		})
	}

	t.Run("wordcount", func(t *testing.T) {
		wcPath := filepath.Join(repoRoot, "examples", "wordcount", "wordcount.json")
		wc, err := workflow.ReadSpec(wcPath)
		if err != nil {
			t.Fatal(err)
		}
		const in = `{"docs": 20000, "shards": 6}`
		want := reference(t, wcPath, in)
		for _, tr := range []workflow.Transfer{workflow.TransferFork, workflow.TransferStorage, workflow.TransferFork} {
			run, err := rn.Run(ctx, wc, json.RawMessage(in), tr)
			if tr == workflow.TransferFork {
				rn.SeedPerRun = !rn.SeedPerRun // the second fork run starts a runtime of its own
			}
			if err != nil {
				t.Fatalf("%s: %v", tr, err)
			}
			var got map[string]any
			_ = json.Unmarshal(run.Result, &got)
			if g, w := mustJSON(got), mustJSON(want); g != w {
				t.Fatalf("%s: word counts differ from the reference:\n got %s\nwant %s", tr, g, w)
			}
			assertRunGone(t, p, rdb, run)
		}
		if err := rn.Remove(ctx, wc); err != nil {
			t.Fatal(err)
		}
		assertProcs(t, pythons, deployedProcs)
	})

	// A chain of steps that hand numpy arrays on (no JSON could carry
	// them): under fork preprocess and project are kept as stage seeds,
	// project forked from preprocess's instance and every infer instance
	// from project's; under storage each array goes through Redis.
	t.Run("pipeline", func(t *testing.T) {
		plPath := filepath.Join(repoRoot, "examples", "pipeline", "pipeline.json")
		pl, err := workflow.ReadSpec(plPath)
		if err != nil {
			t.Fatal(err)
		}
		const in = `{"samples": 60000, "features": 32, "shards": 6}`
		want := reference(t, plPath, in)
		for _, v := range []struct {
			tr     workflow.Transfer
			perRun bool
		}{{workflow.TransferFork, false}, {workflow.TransferStorage, false}, {workflow.TransferFork, true}} {
			rn.SeedPerRun = v.perRun
			run, err := rn.Run(ctx, pl, json.RawMessage(in), v.tr)
			rn.SeedPerRun = false
			if err != nil {
				t.Fatalf("%s (seed per run %v): %v", v.tr, v.perRun, err)
			}
			var got map[string]any
			_ = json.Unmarshal(run.Result, &got)
			if g, w := mustJSON(got), mustJSON(want); g != w {
				t.Fatalf("%s: predictions differ from the reference:\n got %s\nwant %s", v.tr, g, w)
			}
			infer, _ := run.Step("infer")
			if len(infer.Instances) != 6 || len(infer.Nodes) < 2 {
				t.Errorf("%s: infer ran %d instances on %v; want 6 on more than one node", v.tr, len(infer.Instances), infer.Nodes)
			}
			for _, name := range []string{"preprocess", "project"} {
				st, _ := run.Step(name)
				if !st.Kept || len(st.Instances) != 1 {
					t.Errorf("%s: step %s was not kept: %+v", v.tr, name, st)
				}
			}
			// project's 60000 x 16 float64 matrix: 7.7 MB.
			for _, ins := range infer.Instances {
				switch v.tr {
				case workflow.TransferFork:
					if ins.BytesIn != 0 || ins.LoadMS+ins.DeserMS != 0 {
						t.Errorf("fork: an infer instance loaded %d bytes from storage", ins.BytesIn)
					}
				case workflow.TransferStorage:
					if ins.BytesIn < 7<<20 {
						t.Errorf("storage: an infer instance loaded only %d bytes", ins.BytesIn)
					}
				}
			}
			t.Logf("%s (seed per run %v): %.0f ms; preprocess %v, project %v, infer on %v",
				v.tr, v.perRun, run.MS, stepNodes(run, "preprocess"), stepNodes(run, "project"), infer.Nodes)
			assertRunGone(t, p, rdb, run)
		}
		// A kept step that raises fails the run with its message, and
		// the stage seeds made before it go with the run.
		for _, tr := range []workflow.Transfer{workflow.TransferFork, workflow.TransferStorage} {
			run, err := rn.Run(ctx, pl, json.RawMessage(`{"samples": 6000, "shards": 3, "fail": "project"}`), tr)
			var se *workflow.StepError
			if !errors.As(err, &se) || se.Step != "project" || !strings.Contains(err.Error(), "ValueError: pipeline step project: failing as the input asked") {
				t.Fatalf("%s: a raising project step gave %v", tr, err)
			}
			assertRunGone(t, p, rdb, run)
		}
		if err := rn.Remove(ctx, pl); err != nil {
			t.Fatal(err)
		}
		assertProcs(t, pythons, deployedProcs)
	})

	// A fan-out over a kept step's list, and module state: under fork a
	// step forked from a kept step sees what that step left in module
	// globals, as a child of a process does; under storage only results
	// travel.
	t.Run("kept map", func(t *testing.T) {
		mod := `SEEN = {}

def base(inp):
    return list(range(inp["n"]))

def plan(base):
    SEEN["plan"] = len(base)
    return [{"lo": i, "hi": i + 3} for i in range(0, len(base), 3)]

def work(part, base, plan):
    return {"sum": sum(base[part["lo"]:part["hi"]]), "plans": len(plan), "seen": SEEN.get("plan")}

def total(parts):
    return {"sum": sum(p["sum"] for p in parts), "plans": parts[0]["plans"], "seen": sorted({str(p["seen"]) for p in parts})}
`
		dir := writeModule(t, filepath.Join(p.dir, "keptmap"), mod)
		km, err := workflow.ParseSpec([]byte(`{"name":"keptmap","dir":"` + dir + `","steps":[
			{"name":"base"},{"name":"plan","after":["base"]},
			{"name":"work","after":["base","plan"],"map":"plan"},{"name":"total","after":["work"]}]}`))
		if err != nil {
			t.Fatal(err)
		}
		for _, tr := range []workflow.Transfer{workflow.TransferFork, workflow.TransferStorage} {
			run, err := rn.Run(ctx, km, json.RawMessage(`{"n": 30}`), tr)
			if err != nil {
				t.Fatalf("%s: %v", tr, err)
			}
			seen := `["30"]` // plan's module global, inherited
			if tr == workflow.TransferStorage {
				seen = `["None"]`
			}
			if want := `{"plans":10,"seen":` + seen + `,"sum":435}`; mustJSON(jsonMap(t, run.Result)) != want {
				t.Errorf("%s: result %s, want %s", tr, run.Result, want)
			}
			if w, _ := run.Step("work"); len(w.Instances) != 10 {
				t.Errorf("%s: work ran %d instances, want one per element of plan's list (10)", tr, len(w.Instances))
			}
			assertRunGone(t, p, rdb, run)
		}
		if err := rn.Remove(ctx, km); err != nil {
			t.Fatal(err)
		}
		assertProcs(t, pythons, deployedProcs)
	})

	// A join of two kept branches (left and right, both after base) with a
	// fan-out (part): under fork the kept steps run in one lineage (right
	// forked from left's instance), so join's instance holds a frozenset
	// and a dict with int keys (no JSON could carry either) in place and
	// sees both steps' module state; under storage it loads both.
	t.Run("join", func(t *testing.T) {
		mod := `SEEN = {}

def base(inp):
    return list(range(inp["n"]))

def chunks(inp):
    return [[i, i + 10] for i in range(0, inp["n"], 10)]

def left(base):
    SEEN["left"] = True
    return frozenset(x for x in base if x % 2 == 0)

def right(base):
    SEEN["right"] = True
    return {x: x * x for x in base}

def part(chunk, base, left):
    return sum(x for x in base[chunk[0]:chunk[1]] if x in left)

def join(base, parts, left, right):
    return {"n": len(base), "evens": len(left), "squares": sum(right[x] for x in left),
            "parts": sum(parts), "seen": sorted(SEEN)}
`
		dir := writeModule(t, filepath.Join(p.dir, "join"), mod)
		def := []byte(`{"name":"join","dir":"` + dir + `","steps":[
			{"name":"base"},{"name":"chunks"},{"name":"left","after":["base"]},{"name":"right","after":["base"]},
			{"name":"part","after":["base","left"],"map":"chunks"},
			{"name":"join","after":["part","left","right","base"]}]}`)
		js, err := workflow.ParseSpec(def)
		if err != nil {
			t.Fatal(err)
		}
		// validate tells the user how the join runs.
		defPath := filepath.Join(dir, "join.json")
		if err := os.WriteFile(defPath, def, 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := p.gw.Command(mitosisBin, "workflow", "validate", defPath).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "the kept steps run in one lineage") || !regexp.MustCompile(`(?m)^right\s+right\s+base\s+-\s+left\s`).Match(out) {
			t.Errorf("workflow validate of a join: %v\n%s", err, out)
		}
		if !js.Joins() || js.Parent("right") != "left" || js.Parent("join") != "right" {
			t.Fatalf("lineage: Joins %v, right forks from %q, join from %q", js.Joins(), js.Parent("right"), js.Parent("join"))
		}
		for _, v := range []struct {
			tr     workflow.Transfer
			perRun bool
		}{{workflow.TransferFork, false}, {workflow.TransferStorage, false}, {workflow.TransferFork, true}} {
			rn.SeedPerRun = v.perRun
			run, err := rn.Run(ctx, js, json.RawMessage(`{"n": 40}`), v.tr)
			rn.SeedPerRun = false
			if err != nil {
				t.Fatalf("%s (seed per run %v): %v", v.tr, v.perRun, err)
			}
			seen := `["left","right"]` // both kept steps' module globals, inherited
			if v.tr == workflow.TransferStorage {
				seen = `[]`
			}
			if want := `{"evens":20,"n":40,"parts":380,"seen":` + seen + `,"squares":9880}`; mustJSON(jsonMap(t, run.Result)) != want {
				t.Errorf("%s (seed per run %v): result %s, want %s", v.tr, v.perRun, run.Result, want)
			}
			if pt, _ := run.Step("part"); len(pt.Instances) != 4 {
				t.Errorf("%s: part ran %d instances, want 4", v.tr, len(pt.Instances))
			}
			for _, name := range []string{"left", "right"} {
				if st, _ := run.Step(name); !st.Kept {
					t.Errorf("%s: step %s was not kept", v.tr, name)
				}
			}
			j, _ := run.Step("join")
			switch in := j.Instances[0]; {
			case v.tr == workflow.TransferFork && in.BytesIn != 0:
				t.Errorf("fork: join loaded %d bytes from storage", in.BytesIn)
			case v.tr == workflow.TransferStorage && in.BytesIn == 0:
				t.Errorf("storage: join loaded nothing")
			}
			assertRunGone(t, p, rdb, run)
		}
		// A join whose second branch raises fails the run with its
		// message, and the first branch's stage seed goes with the run.
		failing := strings.Replace(mod, `SEEN["right"] = True`, `raise ValueError("right refuses")`, 1)
		writeModule(t, dir, failing)
		for _, tr := range []workflow.Transfer{workflow.TransferFork, workflow.TransferStorage} {
			run, err := rn.Run(ctx, js, json.RawMessage(`{"n": 40}`), tr)
			var se *workflow.StepError
			if !errors.As(err, &se) || se.Step != "right" || !strings.Contains(err.Error(), "ValueError: right refuses") {
				t.Fatalf("%s: a raising right step gave %v", tr, err)
			}
			assertRunGone(t, p, rdb, run)
		}
		if err := rn.Remove(ctx, js); err != nil {
			t.Fatal(err)
		}
		assertProcs(t, pythons, deployedProcs)
	})

	// Independent branches run at the same time (a and b both sleep), and
	// a branch that fails stops the run from starting more steps: the
	// other branch's running step ends, the run fails with the failing
	// step's message and leaves nothing behind.
	t.Run("parallel branches", func(t *testing.T) {
		mod := `import time

def s(inp):
    return inp

def a(s):
    time.sleep(s["sleep"])
    return "a"

def b(s):
    if s.get("fail"):
        raise ValueError("b fails as asked")
    time.sleep(s["sleep"])
    return "b"

def x(a):
    return a + "x"

def y(b):
    return b + "y"
`
		dir := writeModule(t, filepath.Join(p.dir, "branches"), mod)
		bs, err := workflow.ParseSpec([]byte(`{"name":"branches","dir":"` + dir + `","steps":[
			{"name":"s"},{"name":"a","after":["s"]},{"name":"b","after":["s"]},
			{"name":"x","after":["a"]},{"name":"y","after":["b"]}]}`))
		if err != nil {
			t.Fatal(err)
		}
		for _, tr := range []workflow.Transfer{workflow.TransferFork, workflow.TransferStorage} {
			run, err := rn.Run(ctx, bs, json.RawMessage(`{"sleep": 1.5}`), tr)
			if err != nil {
				t.Fatalf("%s: %v", tr, err)
			}
			sa, _ := run.Step("a")
			sb, _ := run.Step("b")
			if sa.AtMS >= sb.AtMS+sb.MS || sb.AtMS >= sa.AtMS+sa.MS {
				t.Errorf("%s: a ran at %.0f ms for %.0f ms, b at %.0f ms for %.0f ms: one after the other", tr, sa.AtMS, sa.MS, sb.AtMS, sb.MS)
			}
			for _, name := range []string{"x", "y"} {
				if st, ok := run.Step(name); !ok || st.Error != "" || len(st.Instances) != 1 {
					t.Errorf("%s: step %s: %+v", tr, name, st)
				}
			}
			t.Logf("%s: %.0f ms; a at %.0f for %.0f ms, b at %.0f for %.0f ms", tr, run.MS, sa.AtMS, sa.MS, sb.AtMS, sb.MS)
			assertRunGone(t, p, rdb, run)

			run, err = rn.Run(ctx, bs, json.RawMessage(`{"sleep": 1.5, "fail": true}`), tr)
			var se *workflow.StepError
			if !errors.As(err, &se) || se.Step != "b" || !strings.Contains(err.Error(), "ValueError: b fails as asked") {
				t.Fatalf("%s: a failing b gave %v", tr, err)
			}
			if st, ok := run.Step("a"); !ok || st.Error != "" {
				t.Errorf("%s: a, running when b failed, did not end: %+v", tr, st)
			}
			if st, ok := run.Step("x"); ok {
				t.Errorf("%s: x started after b failed: %+v", tr, st)
			}
			assertRunGone(t, p, rdb, run)
		}
		if err := rn.Remove(ctx, bs); err != nil {
			t.Fatal(err)
		}
		assertProcs(t, pythons, deployedProcs)
	})

	// Stage seeds and keys live by a lease the runner renews: a run longer
	// than their TTL keeps them, and a runner killed midway (SIGKILL: no
	// cleanup) leaves them only until the TTL runs out.
	t.Run("stage ttl", func(t *testing.T) {
		mod := "import time\n\ndef base(inp):\n    return {'v': 1, 'sleep': inp['sleep']}\n\n" +
			"def hold(base):\n    time.sleep(base['sleep'])\n    return 2\n\ndef fin(base, hold):\n    return base['v'] + hold\n"
		dir := writeModule(t, filepath.Join(p.dir, "slow"), mod)
		specPath := filepath.Join(dir, "slow.json")
		if err := os.WriteFile(specPath, []byte(`{"name":"slow","dir":".","steps":[{"name":"base"},{"name":"hold","after":["base"]},{"name":"fin","after":["base","hold"]}]}`), 0o644); err != nil {
			t.Fatal(err)
		}
		tok := filepath.Join(p.dir, "killed-token")
		if err := os.WriteFile(tok, []byte(platformToken+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		stageSeeds := func() (left []string) {
			for _, n := range p.lab.Nodes[:3] {
				for _, s := range seeds(t, n) {
					if strings.Contains(s.Name, "fn.wf-slow.stage.") {
						left = append(left, n.Name+":"+s.Name)
					}
				}
			}
			return left
		}
		keys := func() []string {
			k, _ := rdb.Keys(ctx, "*").Result()
			return k
		}
		spec, err := workflow.ReadSpec(specPath)
		if err != nil {
			t.Fatal(err)
		}
		// hold takes 8 s, twice the TTL: the runner's renewals (every
		// 1.3 s; only a stall of 2.7 s could miss the TTL) keep the run's
		// seed (which hold's and fin's instances page from) and base's
		// key (which fin loads after hold) alive.
		short := *rn
		short.StageTTL = 4 * time.Second
		for _, tr := range []workflow.Transfer{workflow.TransferFork, workflow.TransferStorage} {
			run, err := short.Run(ctx, spec, json.RawMessage(`{"sleep": 8}`), tr)
			if err != nil || string(run.Result) != "3" {
				t.Fatalf("%s: a run twice as long as its stage TTL: %v, result %s", tr, err, run.Result)
			}
			assertRunGone(t, p, rdb, run)
		}
		// The run's own function (--seed-per-run) and its seed and
		// instances on the nodes.
		runFunctions := func() (left []string) {
			code, _, body := p.request("GET", "/system/functions", "", true)
			var fns []struct {
				Name string `json:"name"`
			}
			if code != 200 || json.Unmarshal([]byte(body), &fns) != nil {
				return []string{"GET /system/functions: " + strconv.Itoa(code)}
			}
			for _, f := range fns {
				if strings.HasPrefix(f.Name, "wf-slow-") {
					left = append(left, "function "+f.Name)
				}
			}
			for _, n := range p.lab.Nodes[:3] {
				for _, s := range seeds(t, n) {
					if strings.HasPrefix(s.Name, "fn.wf-slow-") {
						left = append(left, n.Name+":"+s.Name)
					}
				}
			}
			return left
		}
		for _, v := range []struct {
			transfer string
			left     func() []string
			extra    []string
		}{{"fork", stageSeeds, nil}, {"storage", keys, nil}, {"fork", runFunctions, []string{"--seed-per-run"}}} {
			args := append([]string{mitosisBin, "workflow", "--gateway", p.url, "--token-file", tok, "--runs-dir", filepath.Join(p.dir, "killed-runs"), "--work-dir", p.dir,
				"run", specPath, "--input", `{"sleep": 60}`, "--step-timeout", "8s", "--stage-ttl", "3s", "--transfer", v.transfer, "--redis-socket", sock}, v.extra...)
			cmd := p.gw.Command(args...)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(60 * time.Second)
			for len(v.left()) == 0 && time.Now().Before(deadline) {
				time.Sleep(100 * time.Millisecond)
			}
			if len(v.left()) == 0 {
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				t.Fatalf("%s %v: the run made no stage seed, key or function within 60 s", v.transfer, v.extra)
			}
			time.Sleep(300 * time.Millisecond) // hold is running
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			t0 := time.Now()
			for len(v.left()) > 0 && time.Since(t0) < 15*time.Second {
				time.Sleep(200 * time.Millisecond)
			}
			if left := v.left(); len(left) > 0 {
				t.Fatalf("%s %v: the killed run's stage seed, keys or function are still there %v after the kill: %v", v.transfer, v.extra, time.Since(t0).Round(time.Second), left)
			}
			t.Logf("%s %v: the killed run's stage seed, keys or function were gone %v after the kill", v.transfer, v.extra, time.Since(t0).Round(100*time.Millisecond))
		}
		// The killed --seed-per-run run left its function directory
		// (its function expired); the next such run removes it once it
		// is a minute old, and keeps a live run's.
		stale, _ := filepath.Glob(filepath.Join(p.dir, "mitosis-wf-slow-slow-*"))
		if len(stale) != 1 {
			t.Fatalf("the killed --seed-per-run run's directories: %v, want one", stale)
		}
		live := filepath.Join(p.dir, "mitosis-wf-slow-slow-0badc0de") // no such function: but new
		if err := os.Mkdir(live, 0o755); err != nil {
			t.Fatal(err)
		}
		old := time.Now().Add(-2 * time.Minute)
		if err := os.Chtimes(stale[0], old, old); err != nil {
			t.Fatal(err)
		}
		perRun := short
		perRun.SeedPerRun = true
		if run, err := perRun.Run(ctx, spec, json.RawMessage(`{"sleep": 0}`), workflow.TransferFork); err != nil || string(run.Result) != "3" {
			t.Fatalf("a --seed-per-run run: %v, result %s", err, run.Result)
		}
		if left, _ := filepath.Glob(filepath.Join(p.dir, "mitosis-wf-slow-slow-*")); len(left) != 1 || left[0] != live {
			t.Errorf("run directories after the next --seed-per-run run: %v, want only the young %s", left, live)
		}
		os.Remove(live)
		// hold ends at its step timeout; then only the workflow's
		// function is left, which rm removes.
		if err := rn.Remove(ctx, spec); err != nil {
			t.Fatal(err)
		}
		assertProcs(t, pythons, deployedProcs)
		if k := keys(); len(k) != 0 {
			ttl, _ := rdb.TTL(ctx, k[0]).Result()
			t.Errorf("redis holds keys %v (the first expires in %v)", k, ttl)
		}
	})

	// max_concurrency bounds how many instances of a fan-out run at once;
	// the result is the same.
	t.Run("max concurrency", func(t *testing.T) {
		spec, err := workflow.ReadSpec(filepath.Join(repoRoot, "examples", "wordcount", "wordcount.json"))
		if err != nil {
			t.Fatal(err)
		}
		count := &spec.Steps[slices.IndexFunc(spec.Steps, func(s workflow.Step) bool { return s.Name == "count" })]
		// overlap is the most instances of count that ran at once.
		overlap := func(run *workflow.Run) int {
			type ev struct {
				at float64
				d  int
			}
			var evs []ev
			st, _ := run.Step("count")
			for _, in := range st.Instances {
				evs = append(evs, ev{in.AtMS, 1}, ev{in.AtMS + in.MS, -1})
			}
			sort.Slice(evs, func(i, j int) bool { return evs[i].at < evs[j].at || (evs[i].at == evs[j].at && evs[i].d < evs[j].d) })
			most, now := 0, 0
			for _, e := range evs {
				now += e.d
				most = max(most, now)
			}
			return most
		}
		input := json.RawMessage(`{"docs": 3000, "shards": 6}`)
		var want string
		for _, limit := range []int{0, 1, 2} {
			count.MaxConcurrency = limit
			run, err := rn.Run(ctx, spec, input, workflow.TransferFork)
			if err != nil {
				t.Fatalf("max_concurrency %d: %v", limit, err)
			}
			assertRunGone(t, p, rdb, run)
			o := overlap(run)
			t.Logf("max_concurrency %d: %d instances at once at most, count step %.0f ms", limit, o, func() float64 { st, _ := run.Step("count"); return st.MS }())
			switch {
			case limit == 0 && o < 2:
				t.Errorf("without a bound, at most %d of 6 instances ran at once", o)
			case limit > 0 && o > limit:
				t.Errorf("max_concurrency %d: %d instances ran at once", limit, o)
			}
			if limit == 0 {
				want = string(run.Result)
			} else if string(run.Result) != want {
				t.Errorf("max_concurrency %d: result %s, want %s", limit, run.Result, want)
			}
		}
		if err := rn.Remove(ctx, spec); err != nil {
			t.Fatal(err)
		}
	})

	// The CLI a user runs: mitosis workflow run, ls and rm against the
	// gateway, from a client next to it.
	t.Run("cli", func(t *testing.T) {
		tok := filepath.Join(p.dir, "cli-token")
		if err := os.WriteFile(tok, []byte(platformToken+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		runsDir := filepath.Join(p.dir, "cli-runs")
		cli := func(args ...string) (string, error) {
			argv := append([]string{mitosisBin, "workflow", "--gateway", p.url, "--token-file", tok, "--runs-dir", runsDir}, args...)
			out, err := p.gw.Command(argv...).CombinedOutput()
			return string(out), err
		}
		wcPath := filepath.Join(repoRoot, "examples", "wordcount", "wordcount.json")
		out, err := cli("run", wcPath, "--input", `{"docs": 2000, "shards": 3}`)
		if err != nil {
			t.Fatalf("workflow run: %v\n%s", err, out)
		}
		for _, want := range []string{"(fork)", "AT MS", "load-corpus", "count", "reduce-counts", "result: "} {
			if !strings.Contains(out, want) {
				t.Errorf("workflow run printed no %q:\n%s", want, out)
			}
		}
		t.Logf("mitosis workflow run:\n%s", out)
		ents, _ := os.ReadDir(runsDir)
		if len(ents) != 1 {
			t.Fatalf("%d run records in %s, want 1", len(ents), runsDir)
		}
		var run workflow.Run
		if b, err := os.ReadFile(filepath.Join(runsDir, ents[0].Name())); err != nil || json.Unmarshal(b, &run) != nil || run.Error != "" {
			t.Fatalf("run record %s: %v %+v", ents[0].Name(), err, run)
		}
		assertRunGone(t, p, rdb, &run)
		if out, err := cli("ls"); err != nil || !strings.Contains(out, run.ID) || !strings.Contains(out, "reduce-counts=") || !strings.Contains(out, "@") {
			t.Errorf("workflow ls: %v\n%s", err, out)
		}
		if out, err := cli("ls", run.ID); err != nil || !strings.Contains(out, "STEP") || !strings.Contains(out, "reduce-counts") || !strings.Contains(out, "result: ") {
			t.Errorf("workflow ls %s: %v\n%s", run.ID, err, out)
		}
		if out, err := cli("ls", "nosuch-run"); err == nil || !strings.Contains(out, `no run "nosuch-run"`) {
			t.Errorf("workflow ls of an unknown run: %v\n%s", err, out)
		}
		// A definition that sets the step runtime's own variables is
		// refused, by validate and by run alike.
		bad := filepath.Join(p.dir, "bad-wordcount.json")
		if err := os.WriteFile(bad, []byte(`{"name":"wordcount","dir":"`+filepath.Dir(wcPath)+`","env":{"MITOSIS_WF_DIR":"/tmp"},"steps":[{"name":"load-corpus"}]}`), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, verb := range []string{"validate", "run"} {
			if out, err := cli(verb, bad); err == nil || !strings.Contains(out, "MITOSIS_ prefix") {
				t.Errorf("workflow %s of a definition setting MITOSIS_WF_DIR: %v\n%s", verb, err, out)
			}
		}
		if out, err := cli("validate", wcPath); err != nil || !strings.Contains(out, "workflow wordcount: 4 steps") {
			t.Errorf("workflow validate: %v\n%s", err, out)
		}
		// A bad input is refused before anything runs.
		if out, err := cli("run", wcPath, "--input", "{nope"); err == nil || !strings.Contains(out, "is not JSON") {
			t.Errorf("run with a bad input: %v\n%s", err, out)
		}
		if out, err := cli("rm", wcPath); err != nil {
			t.Fatalf("workflow rm: %v\n%s", err, out)
		}
		assertProcs(t, pythons, deployedProcs)
	})

	// Workflows through the gateway alone, with curl: deploy a definition,
	// run it under both transfers (the body is the input, the answer the
	// run record), list and remove it; bad requests get errors that say
	// what is wrong, and a failing step fails the run with its message.
	t.Run("gateway", func(t *testing.T) {
		wcPath := filepath.Join(repoRoot, "examples", "wordcount", "wordcount.json")
		wc, err := workflow.ReadSpec(wcPath)
		if err != nil {
			t.Fatal(err)
		}
		def := mustJSON(wc) // its dir made absolute
		if code, _, body := p.request("POST", "/system/workflows", def, true); code != 202 || !strings.Contains(body, `"deployed":true`) {
			t.Fatalf("deploy: %d %s", code, body)
		}
		if code, _, body := p.request("POST", "/system/workflows", def, true); code != 200 || !strings.Contains(body, `"deployed":false`) {
			t.Errorf("deploy of the same definition: %d %s", code, body)
		}
		if code, _, body := p.request("GET", "/system/workflows", "", true); code != 200 || !strings.Contains(body, `"name":"wordcount","function":"wf-wordcount"`) || !strings.Contains(body, `"steps":["load-corpus","list-shards","count","reduce-counts"]`) {
			t.Errorf("list: %d %s", code, body)
		}
		const in = `{"docs": 3000, "shards": 3}`
		want := mustJSON(reference(t, wcPath, in))
		for _, q := range []string{"", "?transfer=storage", "?seed_per_run=true"} {
			code, h, body := p.request("POST", "/workflow/wordcount"+q, in, true)
			var run workflow.Run
			if err := json.Unmarshal([]byte(body), &run); code != 200 || err != nil || run.ID == "" || h.Get("X-Mitosis-Run") != run.ID {
				t.Fatalf("run%s: %d %v %s", q, code, err, body)
			}
			if got := mustJSON(jsonMap(t, run.Result)); got != want {
				t.Errorf("run%s: counts differ from the reference:\n got %s\nwant %s", q, got, want)
			}
			if cnt, _ := run.Step("count"); len(cnt.Instances) != 3 || len(cnt.Nodes) < 2 {
				t.Errorf("run%s: count ran %d instances on %v", q, len(cnt.Instances), cnt.Nodes)
			}
			wantTr := workflow.TransferFork // the definition's
			if q == "?transfer=storage" {
				wantTr = workflow.TransferStorage
			}
			if run.Transfer != wantTr {
				t.Errorf("run%s: transfer %s, want %s", q, run.Transfer, wantTr)
			}
			assertRunGone(t, p, rdb, &run)
		}
		// In the background: 202 at once, the record to the callback.
		url, got := p.callbackServer()
		code, h, body := p.request("POST", "/async-workflow/wordcount?transfer=storage", in, true, "-H", "X-Callback-Url: "+url)
		if code != 202 || h.Get("X-Call-Id") == "" {
			t.Fatalf("async run: %d %v %s", code, h, body)
		}
		select {
		case cb := <-got:
			var run workflow.Run
			if err := json.Unmarshal([]byte(cb.body), &run); err != nil || cb.h.Get("X-Call-Id") != h.Get("X-Call-Id") || cb.h.Get("X-Workflow-Status") != "200" ||
				cb.h.Get("X-Workflow-Name") != "wordcount" || cb.h.Get("X-Mitosis-Run") != run.ID || run.Transfer != workflow.TransferStorage {
				t.Errorf("callback: %v %v %s", err, cb.h, cb.body)
			} else if got := mustJSON(jsonMap(t, run.Result)); got != want {
				t.Errorf("async run: counts differ from the reference:\n got %s\nwant %s", got, want)
			}
			assertRunGone(t, p, rdb, &run)
			// The gateway keeps the records: by call id or run id.
			for _, id := range []string{h.Get("X-Call-Id"), run.ID} {
				code, _, body := p.request("GET", "/system/workflow-runs/"+id, "", true)
				var wr struct {
					Status string       `json:"status"`
					Run    workflow.Run `json:"run"`
				}
				if err := json.Unmarshal([]byte(body), &wr); code != 200 || err != nil || wr.Status != "succeeded" || wr.Run.ID != run.ID || len(wr.Run.Steps) != 4 {
					t.Errorf("GET /system/workflow-runs/%s: %d %v %s", id, code, err, body)
				}
			}
		case <-time.After(60 * time.Second):
			t.Fatal("no callback within 60 s")
		}
		// And counts them: 2 runs under fork (one with a per-run seed) and
		// 2 under storage (one in the background), all of them succeeded.
		if code, _, body := p.request("GET", "/metrics", "", false); code != 200 ||
			!strings.Contains(body, `mitosis_gateway_workflow_runs_total{status="succeeded",transfer="fork",workflow="wordcount"} 2`) ||
			!strings.Contains(body, `mitosis_gateway_workflow_runs_total{status="succeeded",transfer="storage",workflow="wordcount"} 2`) ||
			!strings.Contains(body, `mitosis_gateway_workflow_run_seconds_count{transfer="fork",workflow="wordcount"} 2`) ||
			!strings.Contains(body, "mitosis_gateway_workflow_runs_running 0") {
			t.Errorf("workflow metrics: %d\n%s", code, grepLines(body, "workflow"))
		}
		code, _, body = p.request("GET", "/system/workflow-runs?workflow=wordcount", "", true)
		var runs []struct {
			Status string `json:"status"`
			Run    struct {
				Transfer string `json:"transfer"`
				Steps    []any  `json:"steps"`
			} `json:"run"`
		}
		if err := json.Unmarshal([]byte(body), &runs); code != 200 || err != nil || len(runs) != 4 || runs[0].Run.Transfer != "storage" || runs[0].Run.Steps != nil {
			t.Errorf("GET /system/workflow-runs?workflow=wordcount: %d %v %s (want the 4 runs, the async one first, without their steps)", code, err, body)
		}
		// Any gateway of the cluster serves the records (the directory
		// holds them): a second gateway, which ran none of them.
		url2, killGateway2 := p.secondGateway()
		do2 := func(method, path, body string, extra ...string) (int, string) {
			args := append([]string{"-X", method, "-H", "Authorization: Bearer " + platformToken, "-w", "\n%{http_code}"}, extra...)
			if body != "" {
				args = append(args, "--data-binary", body)
			}
			var out string
			var err error
			for i := 0; i < 100; i++ { // until the second gateway listens
				if out, err = p.curl(10*time.Second, append(args, url2+path)...); err == nil {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				t.Fatalf("%s %s on the second gateway: %v", method, path, err)
			}
			i := strings.LastIndexByte(out, '\n')
			code, _ := strconv.Atoi(out[i+1:])
			return code, out[:i]
		}
		get2 := func(path string) (int, string) { return do2("GET", path, "") }
		code2, body2 := get2("/system/workflow-runs/" + h.Get("X-Call-Id"))
		var wr2 struct {
			Status  string       `json:"status"`
			Gateway string       `json:"gateway"`
			Run     workflow.Run `json:"run"`
		}
		if err := json.Unmarshal([]byte(body2), &wr2); code2 != 200 || err != nil || wr2.Status != "succeeded" || len(wr2.Run.Steps) != 4 || wr2.Gateway == "" {
			t.Errorf("the async run's record on the second gateway: %d %v %s", code2, err, body2)
		}
		code2, body2 = get2("/system/workflow-runs?workflow=wordcount")
		var runs2 []json.RawMessage
		if err := json.Unmarshal([]byte(body2), &runs2); code2 != 200 || err != nil || len(runs2) != 4 {
			t.Errorf("the runs on the second gateway: %d %v %s (want the 4 runs)", code2, err, body2)
		}
		if code, _, body := p.request("POST", "/async-workflow/wordcount", in, true, "-H", "X-Call-Id: a/b"); code != 400 || !strings.Contains(body, "no '/' or white space") {
			t.Errorf("X-Call-Id a/b: %d %s", code, body)
		}
		// An X-Call-Id is the cluster's: one running on the first gateway
		// is refused on the second, which lists it as running; once the
		// run ended, the id may run again.
		slowDir := writeModule(t, filepath.Join(p.dir, "gwslow"), "import os, time\n\ndef s(inp):\n    if inp.get('pidfile'):\n        with open(inp['pidfile'], 'w') as f:\n            f.write(str(os.getpid()))\n    time.sleep(inp['sleep'])\n    return inp\n\ndef t(s):\n    return s\n")
		if code, _, body := p.request("POST", "/system/workflows", `{"name":"gwslow","dir":"`+slowDir+`","steps":[{"name":"s"},{"name":"t","after":["s"]}]}`, true); code != 202 {
			t.Fatalf("deploy gwslow: %d %s", code, body)
		}
		callID := "dup-" + strconv.FormatInt(time.Now().UnixNano(), 10)
		if code, _, body := p.request("POST", "/async-workflow/gwslow", `{"sleep": 3}`, true, "-H", "X-Call-Id: "+callID); code != 202 {
			t.Fatalf("async gwslow: %d %s", code, body)
		}
		if code, body := do2("POST", "/async-workflow/gwslow", `{"sleep": 0}`, "-H", "X-Call-Id: "+callID); code != 409 || !strings.Contains(body, "still running (on gateway "+p.gw.IP+":8080") {
			t.Errorf("the same X-Call-Id on the second gateway while it runs: %d %s, want 409 naming the first gateway", code, body)
		}
		if code, body := get2("/system/workflow-runs/" + callID); code != 200 || !strings.Contains(body, `"status":"running"`) {
			t.Errorf("the running run on the second gateway: %d %s", code, body)
		}
		ended := func() bool {
			code, body := get2("/system/workflow-runs/" + callID)
			return code == 200 && strings.Contains(body, `"status":"succeeded"`)
		}
		deadline := time.Now().Add(60 * time.Second)
		for !ended() && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
		}
		if !ended() {
			t.Fatalf("the gwslow run did not end within 60 s")
		}
		if code, _, body := p.request("POST", "/async-workflow/gwslow", `{"sleep": 0}`, true, "-H", "X-Call-Id: "+callID); code != 202 {
			t.Errorf("the X-Call-Id of an ended run again: %d %s, want 202", code, body)
		}
		deadline = time.Now().Add(60 * time.Second)
		for time.Now().Before(deadline) {
			if code, body := get2("/system/workflow-runs/" + callID); code == 200 && strings.Contains(body, `"status":"succeeded"`) && strings.Contains(body, `"sleep":0`) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		// DELETE /system/workflow-runs/ID cancels a run in the background,
		// on the gateway running it or on another: the step instance ends
		// on its node, and the record ends failed, saying why.
		for _, where := range []string{"the first gateway", "the second gateway"} {
			id := "cancel-" + strconv.FormatInt(time.Now().UnixNano(), 10)
			pidFile := filepath.Join(p.dir, id+".pid")
			if code, _, body := p.request("POST", "/async-workflow/gwslow", `{"sleep": 120, "pidfile": "`+pidFile+`"}`, true, "-H", "X-Call-Id: "+id); code != 202 {
				t.Fatalf("async gwslow: %d %s", code, body)
			}
			var pid int
			for deadline := time.Now().Add(30 * time.Second); pid == 0 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				b, _ := os.ReadFile(pidFile)
				pid, _ = strconv.Atoi(string(b))
			}
			if pid == 0 {
				t.Fatalf("%s: the step did not start within 30 s", where)
			}
			start := time.Now()
			var code int
			var body string
			if where == "the first gateway" {
				code, _, body = p.request("DELETE", "/system/workflow-runs/"+id, "", true)
			} else {
				code, body = do2("DELETE", "/system/workflow-runs/"+id, "")
			}
			if code != 202 || !strings.Contains(body, `"gateway":"`+p.gw.IP+`:8080"`) {
				t.Fatalf("DELETE on %s: %d %s", where, code, body)
			}
			var rec string
			for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
				if c, b := get2("/system/workflow-runs/" + id); c == 200 && strings.Contains(b, `"status":"cancelled"`) {
					rec = b
					break
				}
			}
			if !strings.Contains(rec, "cancelled by DELETE /system/workflow-runs") {
				t.Fatalf("cancelled on %s: the record %q, want cancelled and saying why", where, rec)
			}
			gone := false
			for deadline := time.Now().Add(15 * time.Second); !gone && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
				gone = err != nil || strings.Contains(string(st), ") Z ")
			}
			if !gone {
				t.Errorf("cancelled on %s: the step instance %d still runs", where, pid)
			}
			t.Logf("cancelled on %s: the run ended %v after the DELETE", where, time.Since(start).Round(time.Millisecond))
			if code, body := do2("DELETE", "/system/workflow-runs/"+id, ""); code != 409 || !strings.Contains(body, "ended (cancelled)") {
				t.Errorf("DELETE of the ended run: %d %s", code, body)
			}
		}
		if code, body := do2("DELETE", "/system/workflow-runs/nosuch", ""); code != 404 || !strings.Contains(body, "X-Call-Id") {
			t.Errorf("DELETE of no run: %d %s", code, body)
		}
		// A gateway that dies mid-run: the others see the run lost once
		// its session lapses (10 s), and its X-Call-Id is free again.
		lostID := "lost-" + strconv.FormatInt(time.Now().UnixNano(), 10)
		if code, body := do2("POST", "/async-workflow/gwslow", `{"sleep": 120}`, "-H", "X-Call-Id: "+lostID); code != 202 {
			t.Fatalf("async gwslow on the second gateway: %d %s", code, body)
		}
		if code, _, body := p.request("GET", "/system/workflow-runs/"+lostID, "", true); code != 200 || !strings.Contains(body, `"status":"running"`) {
			t.Errorf("the second gateway's run, on the first: %d %s", code, body)
		}
		killGateway2()
		killed := time.Now()
		var lost string
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			if code, _, body := p.request("GET", "/system/workflow-runs/"+lostID, "", true); code == 200 && strings.Contains(body, `"status":"lost"`) {
				lost = body
				break
			}
		}
		if !strings.Contains(lost, "stopped before it ended") {
			t.Fatalf("the killed gateway's run: %q, want lost within 30 s", lost)
		}
		t.Logf("the killed gateway's run was lost %v after the kill", time.Since(killed).Round(100*time.Millisecond))
		if code, _, body := p.request("GET", "/system/workflow-runs?workflow=gwslow", "", true); code != 200 || !strings.Contains(body, `"status":"lost"`) {
			t.Errorf("the list does not say the run is lost: %d %s", code, body)
		}
		if code, _, body := p.request("DELETE", "/system/workflow-runs/"+lostID, "", true); code != 409 || !strings.Contains(body, "ended (lost)") {
			t.Errorf("DELETE of a lost run: %d %s", code, body)
		}
		if code, _, body := p.request("POST", "/async-workflow/gwslow", `{"sleep": 0}`, true, "-H", "X-Call-Id: "+lostID); code != 202 {
			t.Errorf("the X-Call-Id of a lost run again: %d %s, want 202", code, body)
		}
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			if code, _, body := p.request("GET", "/system/workflow-runs/"+lostID, "", true); code == 200 && strings.Contains(body, `"status":"succeeded"`) {
				break
			}
		}
		for _, c := range []struct {
			method, path, body string
			auth               bool
			code               int
			want               string
		}{
			{"POST", "/async-workflow/wordcount", in, false, 401, "unauthorized"},
			{"POST", "/async-workflow/nosuch", in, true, 404, `workflow "nosuch" not found`},
			{"GET", "/system/workflow-runs/nosuch", "", true, 404, `workflow run "nosuch" not found`},
			{"POST", "/workflow/wordcount", in, false, 401, "unauthorized"},
			{"POST", "/workflow/nosuch", in, true, 404, `workflow "nosuch" not found`},
			{"POST", "/workflow/wordcount", "{nope", true, 400, "the input is not JSON"},
			{"POST", "/workflow/wordcount?transfer=pickle", in, true, 400, `unknown transfer "pickle"`},
			{"POST", "/workflow/wordcount?seed_per_run=maybe", in, true, 400, "want true or false"},
			{"POST", "/system/workflows", `{"name":"x","dir":"rel","steps":[{"name":"a"}]}`, true, 400, "absolute"},
			{"POST", "/system/workflows", `{"name":"x","steps":[{"name":"a","after":["b"]}]}`, true, 400, "not a step"},
			{"DELETE", "/system/workflows", `{}`, true, 400, `want {"name": WORKFLOW}`},
		} {
			if code, _, body := p.request(c.method, c.path, c.body, c.auth); code != c.code || !strings.Contains(body, c.want) {
				t.Errorf("%s %s %s: %d %s, want %d and %q", c.method, c.path, c.body, code, strings.TrimSpace(body), c.code, c.want)
			}
		}
		// A step that raises: 500, with the run's record and its error.
		dir := writeModule(t, filepath.Join(p.dir, "gwfail"), "def s(inp):\n    return inp\n\ndef t(s):\n    if s.get('fail'):\n        raise ValueError('t fails as asked')\n    return s\n")
		failDef := `{"name":"gwfail","dir":"` + dir + `","steps":[{"name":"s"},{"name":"t","after":["s"]}]}`
		if code, _, body := p.request("POST", "/system/workflows", failDef, true); code != 202 {
			t.Fatalf("deploy gwfail: %d %s", code, body)
		}
		code, _, body = p.request("POST", "/workflow/gwfail", `{"fail": true}`, true)
		var run workflow.Run
		if err := json.Unmarshal([]byte(body), &run); code != 500 || err != nil || !strings.Contains(run.Error, "ValueError: t fails as asked") {
			t.Errorf("failing run: %d %v %s", code, err, body)
		}
		if code, _, body := p.request("GET", "/system/workflow-runs/"+run.ID, "", true); code != 200 || !strings.Contains(body, `"status":"failed"`) {
			t.Errorf("the failed run's record: %d %s", code, body)
		}
		assertRunGone(t, p, rdb, &run)
		for _, name := range []string{"wordcount", "gwfail", "gwslow"} {
			if code, _, body := p.request("DELETE", "/system/workflows", `{"name":"`+name+`"}`, true); code != 202 {
				t.Errorf("delete %s: %d %s", name, code, body)
			}
		}
		// What is left: finra, which this test deployed with a Runner (as
		// `mitosis workflow deploy` does): the gateway runs it too.
		if code, _, body := p.request("GET", "/system/workflows", "", true); code != 200 || strings.Contains(body, "wordcount") || strings.Contains(body, "gwfail") || !strings.Contains(body, `"name":"finra"`) {
			t.Errorf("list after delete: %d %s", code, body)
		}
		if code, _, _ := p.request("POST", "/workflow/wordcount", in, true); code != 404 {
			t.Errorf("run after delete: %d, want 404", code)
		}
		assertProcs(t, pythons, deployedProcs)
	})

	t.Run("failing rule", func(t *testing.T) {
		for _, tr := range []workflow.Transfer{workflow.TransferFork, workflow.TransferStorage, workflow.TransferFork} {
			run, err := rn.Run(ctx, spec, json.RawMessage(`{"trades": 20000, "rules": 4, "fail_rule": 2}`), tr)
			if tr == workflow.TransferFork {
				rn.SeedPerRun = !rn.SeedPerRun
			}
			if err == nil {
				t.Fatalf("%s: the run succeeded with a raising rule", tr)
			}
			var se *workflow.StepError
			if !errors.As(err, &se) || se.Step != "audit" {
				t.Fatalf("%s: error %v is not the audit step's", tr, err)
			}
			if !strings.Contains(err.Error(), "ValueError: audit rule 2: market data for symbol 2 is inconsistent") {
				t.Fatalf("%s: error does not carry the rule's message: %v", tr, err)
			}
			assertRunGone(t, p, rdb, run)
			assertProcs(t, pythons, deployedProcs)
		}
		// With max_concurrency 1, no rule starts after the first failed.
		bounded := *spec
		bounded.Steps = slices.Clone(spec.Steps)
		bounded.Steps[slices.IndexFunc(bounded.Steps, func(s workflow.Step) bool { return s.Name == "audit" })].MaxConcurrency = 1
		run, err := rn.Run(ctx, &bounded, json.RawMessage(`{"trades": 20000, "rules": 4, "fail_rule": 0}`), workflow.TransferFork)
		if err == nil || !strings.Contains(err.Error(), "audit rule 0: market data for symbol 0 is inconsistent") {
			t.Fatalf("bounded fan-out with a raising first rule: %v", err)
		}
		started := 0
		audit, _ := run.Step("audit")
		for _, in := range audit.Instances {
			if in.Node != "" {
				started++
			}
		}
		if started != 1 {
			t.Errorf("%d rules started, want only the failing first one", started)
		}
		assertRunGone(t, p, rdb, run)
	})
	// Removing the workflow removes its function's seed and processes.
	if err := rn.Remove(ctx, spec); err != nil {
		t.Fatal(err)
	}
	assertProcs(t, pythons, before)
	for _, n := range p.lab.Nodes[:3] {
		if left := seeds(t, n); len(left) > 0 {
			t.Errorf("node %s holds seeds %v after the workflows were removed", n.Name, left)
		}
	}
	if _, err := os.Stat(filepath.Join(p.dir, "mitosis-"+workflow.FunctionName(spec))); !os.IsNotExist(err) {
		t.Errorf("the workflow's function directory is left: %v", err)
	}
}

// assertProcs waits for the step runtime's processes to number want: a
// run's stage seed, its parent instance and its children are gone.
func assertProcs(t *testing.T, pythons func() []string, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(pythons()) > want && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if n := len(pythons()); n > want {
		t.Errorf("%d step processes left: %v", n-want, pythons())
	}
}

// assertRunGone checks that a finished run left no seed of its own on any
// node (its stage seed or its function's; the workflow's function seed and
// its imports stay), no function and no Redis key.
func assertRunGone(t *testing.T, p *platform, rdb *redis.Client, run *workflow.Run) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var left []string
		for _, n := range p.lab.Nodes[:3] {
			for _, s := range seeds(t, n) {
				if strings.Contains(s.Name, ".stage.") || strings.Contains(s.Name, run.ID) {
					left = append(left, n.Name+":"+s.Name)
				}
			}
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("run %s left seeds %v", run.ID, left)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if code, _, body := p.request("GET", "/system/functions", "", true); code != 200 || strings.Contains(body, run.ID) {
		t.Errorf("the run's function is still listed: %d %s", code, body)
	}
	if n, err := rdb.DBSize(context.Background()).Result(); err != nil || n != 0 {
		t.Errorf("redis holds %d keys after run %s (%v)", n, run.ID, err)
	}
	if run.Cleanup != "" {
		t.Errorf("cleanup: %s", run.Cleanup)
	}
}

func jsonMap(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var v map[string]any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("result %s: %v", b, err)
	}
	return v
}

func stepNodes(run *workflow.Run, name string) []string {
	st, _ := run.Step(name)
	return st.Nodes
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// writeModule writes src as dir/workflow.py (making dir) and returns dir.
func writeModule(t *testing.T, dir, src string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "workflow.py"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func pgrepFull(t *testing.T, pattern string) []string {
	out, _ := exec.Command("pgrep", "-f", pattern).Output()
	return strings.Fields(string(out))
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestWorkflowGatewayShutdown: a gateway that is told to stop (SIGTERM)
// while it runs workflows cancels them first and removes what they made
// (their stage seeds on the nodes) before it stops serving, and exits
// cleanly, without waiting for the step that sleeps.
func TestWorkflowGatewayShutdown(t *testing.T) {
	requireSetup(t)
	p := startPlatform(t)
	mod := "import time\n\ndef s(inp):\n    return inp\n\ndef k(s):\n    return list(range(s['n']))\n\ndef y(k):\n    time.sleep(6)\n    return len(k)\n"
	dir := writeModule(t, filepath.Join(p.dir, "sleepy"), mod)
	def := `{"name":"sleepy","dir":"` + dir + `","steps":[{"name":"s"},{"name":"k","after":["s"]},{"name":"y","after":["k"]}]}`
	if code, _, body := p.request("POST", "/system/workflows", def, true); code != 202 {
		t.Fatalf("deploy: %d %s", code, body)
	}
	stages := func() (out []string) {
		for _, n := range p.lab.Nodes[:3] {
			for _, s := range seeds(t, n) {
				if strings.Contains(s.Name, ".stage.") {
					out = append(out, n.Name+":"+s.Name)
				}
			}
		}
		return out
	}
	// One run in the background, one answered synchronously (its client
	// gives up when the gateway goes).
	if code, _, body := p.request("POST", "/async-workflow/sleepy", `{"n": 1000}`, true); code != 202 {
		t.Fatalf("async run: %d %s", code, body)
	}
	syncDone := make(chan struct{})
	go func() {
		defer close(syncDone)
		_, _ = p.curl(60*time.Second, "-s", "-H", "Authorization: Bearer "+platformToken, "--data-binary", `{"n": 1000}`, p.url+"/workflow/sleepy")
	}()
	// Both runs' sources and k: four stage seeds, while y sleeps.
	deadline := time.Now().Add(30 * time.Second)
	for len(stages()) < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("stage seeds %v 30 s after the runs began, want 4", stages())
		}
		time.Sleep(200 * time.Millisecond)
	}
	t0 := time.Now()
	if err := p.gwy.Stop(15 * time.Second); err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	t.Logf("the gateway stopped %v after SIGTERM", took.Round(10*time.Millisecond))
	// Its HTTP server waits up to 10 s for requests in flight: the
	// synchronous run must have ended, not been waited out.
	if took >= 10*time.Second {
		t.Errorf("the gateway took %v to stop: it waited out the synchronous run", took)
	}
	if left := stages(); len(left) != 0 {
		t.Errorf("stage seeds left when the gateway had stopped: %v", left)
	}
	select {
	case <-syncDone:
	case <-time.After(10 * time.Second):
		t.Error("the synchronous run's client still waits 10 s after the gateway stopped")
	}
}
