package platform

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mitosis-fork/mitosis/internal/hostmem"
	"github.com/mitosis-fork/mitosis/internal/plot"
	"github.com/mitosis-fork/mitosis/workflow"
)

// WorkflowConfig is the workflow benchmark: the FINRA audit
// (examples/finra) for each trade count and rule count, under fork and
// storage, Runs times each, in the order of Order.
type WorkflowConfig struct {
	Spec     string // path of finra.json
	Trades   []int
	Rules    []int
	Runs     int
	Window   int // 0: every rule checks every trade; >0: a window of that many
	Mitosis  string
	Log      *os.File
	Command  string
	NodeMem  string // each node's function memory (default 18G: 8 instances of 2Gi and the stage seed's instance)
	NodeConc int    // each node's invocation limit (default 8)
	HugePage bool   // the daemons' page caches of 2 MiB pages (--huge-page-cache)
	// Order is the order of a cell's runs: OrderBalanced (the default),
	// OrderCrossed or OrderBlocked (see schedule).
	Order string
	// RunsOut, if set, receives every run's record (workflow.Run, one
	// JSON object per line) with its steps' and instances' timings.
	RunsOut *os.File
	// ForkSeeds are the fork transfer's ways to make a run's seed, each
	// measured in the same interleaved rounds: "stage" (an instance of the
	// deployed workflow kept as the run's stage seed; the default) and
	// "per-run" (workflow.Runner.SeedPerRun).
	ForkSeeds []string
	// Bound also measures, in the same interleaved rounds, the bound of any
	// fork-based transfer on this host: the workflow in one process whose
	// rules are os.fork()ed children (examples/finra/local_fork.py, next
	// to the spec), with no platform, network or paging.
	Bound bool
	// Host is a line for the results on how the host ran them (its free
	// page reporting: SetPageReporting).
	Host string
}

// TransferBound labels the local os.fork bound's cells.
const TransferBound workflow.Transfer = "local os.fork (bound)"

// WorkflowCell is the medians of one (trades, rules, transfer) cell.
type WorkflowCell struct {
	Trades     int               `json:"trades"`
	StateMB    float64           `json:"state_mb"` // pickled size of the two sources
	Rules      int               `json:"rules"`
	Transfer   workflow.Transfer `json:"transfer"`
	ForkSeed   string            `json:"fork_seed,omitempty"` // fork: "stage" or "per-run"
	Runs       int               `json:"runs"`
	MS         float64           `json:"ms_median"`     // end to end
	SourcesMS  float64           `json:"sources_ms"`    // deploy (fork: sources in init) + storage's source steps
	AuditMS    float64           `json:"audit_ms"`      // the fan-out step's wall time
	TransferMS float64           `json:"transfer_ms"`   // Σ over the run of pickle, SET, GET, unpickle
	RuleXferMS float64           `json:"rule_xfer_ms"`  // per rule instance: GET + unpickle
	RuleMS     float64           `json:"rule_ms"`       // per rule instance: request to reply
	RuleFaults float64           `json:"rule_start_ms"` // per rule instance: the fork (start) as the gateway saw it
	All        []float64         `json:"ms_all"`
	Nodes      int               `json:"nodes_used_max"` // nodes the rules ran on
	// CPUSec is the machine's busy CPU time over the run (every process:
	// the steps, the daemons, the gateway, Redis; /proc/stat), and
	// SystemShare the part of it in the kernel: what bounds a run on a
	// host whose vCPUs it keeps busy.
	CPUSec      float64 `json:"cpu_s"`
	SystemShare float64 `json:"system_share"`
	// ReturnedMB is the memory the guest kernel handed back to its host
	// during the run (free page reporting; hostmem.Params.ReportedKiB), -1
	// where the kernel does not count it.
	ReturnedMB float64 `json:"returned_to_host_mb"`
}

// cpuTimes is the machine's busy and kernel CPU time so far, in seconds
// (the first line of /proc/stat: user nice system idle iowait irq softirq
// steal; busy leaves out idle, iowait and steal).
func cpuTimes() (busy, system float64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, 0
	}
	var v [8]float64
	for i := range v {
		x, _ := strconv.ParseFloat(f[i+1], 64)
		v[i] = x / clockTicks
	}
	return v[0] + v[1] + v[2] + v[5] + v[6], v[2] + v[5] + v[6]
}

// clockTicks is USER_HZ, the unit of /proc/stat (100 on Linux x86-64).
const clockTicks = 100

// RunWorkflows builds the three-node cluster with a Redis server and runs
// the grid.
func RunWorkflows(ctx context.Context, wc WorkflowConfig) ([]WorkflowCell, error) {
	if wc.Runs <= 0 {
		wc.Runs = 5
	}
	if wc.NodeMem == "" {
		wc.NodeMem = "18G"
	}
	if wc.NodeConc <= 0 {
		wc.NodeConc = 8
	}
	if len(wc.ForkSeeds) == 0 {
		wc.ForkSeeds = []string{"stage"}
	}
	for _, fs := range wc.ForkSeeds {
		if fs != "stage" && fs != "per-run" {
			return nil, fmt.Errorf("fork seed %q: want stage or per-run", fs)
		}
	}
	if _, err := schedule(1, 1, wc.Order); err != nil {
		return nil, err
	}
	c, err := startWorkflowCluster(wc.Spec, Config{Mitosis: wc.Mitosis, Log: wc.Log, NodeConcurrency: wc.NodeConc, NodeMemory: wc.NodeMem, HugePageCache: wc.HugePage})
	if c != nil {
		defer c.close()
	}
	if err != nil {
		return nil, err
	}
	e, spec, rn := c.e, c.spec, c.rn
	pr := hostmem.Params{Dir: hostmem.ParamsDir}
	// The workflow is deployed once, as a platform user would; each run
	// then forks its instances (and, under fork, its stage seed) from the
	// function's seed.
	if _, err := rn.Deploy(ctx, spec); err != nil {
		return nil, err
	}
	var cells []WorkflowCell
	for _, n := range wc.Trades {
		for _, m := range wc.Rules {
			input, _ := json.Marshal(map[string]int{"trades": n, "rules": m, "window": wc.Window})
			type variant struct {
				tr   workflow.Transfer
				seed string
			}
			var vs []variant
			for _, fs := range wc.ForkSeeds {
				vs = append(vs, variant{workflow.TransferFork, fs})
			}
			if wc.Bound {
				vs = append(vs, variant{tr: TransferBound})
			}
			vs = append(vs, variant{tr: workflow.TransferStorage})
			runs := make([][]*workflow.Run, len(vs))
			cpu := make([][][2]float64, len(vs))   // per run: busy s, system s
			returned := make([][]float64, len(vs)) // per run: MiB reported to the host
			order, err := schedule(len(vs), wc.Runs, wc.Order)
			if err != nil {
				return nil, err
			}
			for _, sr := range order {
				k := sr.way
				v := vs[k]
				if ctx.Err() != nil {
					return cells, ctx.Err()
				}
				rn.SeedPerRun = v.seed == "per-run"
				var r *workflow.Run
				var err error
				b0, s0 := cpuTimes()
				rep0, repOK := pr.ReportedKiB()
				if v.tr == TransferBound {
					r, err = runBound(ctx, filepath.Join(filepath.Dir(wc.Spec), "local_fork.py"), input)
				} else {
					r, err = rn.Run(ctx, spec, input, v.tr)
				}
				if err != nil {
					return cells, fmt.Errorf("trades %d rules %d %s %s: %w", n, m, v.tr, v.seed, err)
				}
				b1, s1 := cpuTimes()
				rep1, _ := pr.ReportedKiB()
				if sr.warmup {
					continue
				}
				runs[k] = append(runs[k], r)
				cpu[k] = append(cpu[k], [2]float64{b1 - b0, s1 - s0})
				if repOK {
					returned[k] = append(returned[k], float64(rep1-rep0)/1024)
				}
				if wc.RunsOut != nil {
					b, _ := json.Marshal(r)
					fmt.Fprintf(wc.RunsOut, "%s\n", b)
				}
			}
			first := len(cells)
			for k, v := range vs {
				c := summarizeRuns(runs[k], cpu[k])
				c.ReturnedMB = -1
				if len(returned[k]) > 0 {
					c.ReturnedMB = median(returned[k])
				}
				c.Trades, c.Rules, c.Transfer, c.ForkSeed = n, m, v.tr, v.seed
				cells = append(cells, c)
			}
			st := cells[len(cells)-1]
			var sd struct{ Digest string }
			_ = json.Unmarshal(runs[len(vs)-1][0].Result, &sd)
			for k := range vs[:len(vs)-1] {
				var res struct{ Digest string }
				_ = json.Unmarshal(runs[k][0].Result, &res)
				if res.Digest != sd.Digest || res.Digest == "" {
					return cells, fmt.Errorf("trades %d rules %d: %s (%s) and storage verdicts differ (%q vs %q)", n, m, vs[k].tr, vs[k].seed, res.Digest, sd.Digest)
				}
				f := &cells[first+k]
				f.StateMB = st.StateMB
				if f.Transfer == TransferBound {
					e.logf("workflow trades %d rules %d: local os.fork bound %.0f ms (%.0f%% faster than storage)", n, m, f.MS, 100*(1-f.MS/st.MS))
					continue
				}
				e.logf("workflow trades %d (%.0f MB pickled) rules %d: fork (%s seed) %.0f ms, storage %.0f ms (%.0f%% faster); per rule: fork %.1f ms, storage %.1f ms of which GET+unpickle %.1f ms",
					n, st.StateMB, m, f.ForkSeed, f.MS, st.MS, 100*(1-f.MS/st.MS), f.RuleMS, st.RuleMS, st.RuleXferMS)
			}
		}
	}
	return cells, nil
}

// workflowCluster is a workflow benchmark's platform: three node daemons
// in network namespaces behind a gateway, a Redis server on a unix socket,
// and a runner for one workflow definition (its step instances 2Gi).
type workflowCluster struct {
	e     *env
	spec  *workflow.Spec
	rn    *workflow.Runner
	dir   string
	redis *exec.Cmd
}

// startWorkflowCluster starts the cluster of cfg (its Dir is made here) for
// the workflow defined at specPath. On error the returned cluster, if not
// nil, must still be closed.
func startWorkflowCluster(specPath string, cfg Config) (*workflowCluster, error) {
	dir, err := os.MkdirTemp("", "mitosis-wfbench-")
	if err != nil {
		return nil, err
	}
	c := &workflowCluster{dir: dir}
	cfg.Dir = dir
	cfg.defaults()
	if c.e, err = setup(cfg); err != nil {
		return c, fmt.Errorf("platform setup: %w", err)
	}
	sock := filepath.Join(dir, "redis.sock")
	c.redis = exec.Command("redis-server", "--port", "0", "--unixsocket", sock, "--unixsocketperm", "777",
		"--save", "", "--appendonly", "no", "--dir", dir, "--proto-max-bulk-len", "2gb")
	if err := c.redis.Start(); err != nil {
		c.redis = nil
		return c, fmt.Errorf("redis-server: %w", err)
	}
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	if c.spec, err = workflow.ReadSpec(specPath); err != nil {
		return c, err
	}
	c.spec.Memory = "2Gi"
	c.rn = &workflow.Runner{Gateway: c.e.gw.URL, Token: token, HTTP: c.e.http, RedisSocket: sock, WorkDir: dir, Timeout: 10 * time.Minute}
	return c, nil
}

// close removes the workflow (if it was deployed) and stops everything
// startWorkflowCluster started.
func (c *workflowCluster) close() {
	if c.rn != nil {
		if err := c.rn.Remove(context.Background(), c.spec); err != nil {
			c.e.logf("remove the workflow: %v", err)
		}
	}
	if c.redis != nil {
		_ = c.redis.Process.Kill()
		_, _ = c.redis.Process.Wait()
	}
	if c.e != nil {
		c.e.close()
	}
	os.RemoveAll(c.dir)
}

// runBound runs the workflow as one local process with os.fork()ed rule
// children (script: examples/finra/local_fork.py) and returns its timings
// as a run record: the sources as the deploy, the fan-out as the audit step.
func runBound(ctx context.Context, script string, input []byte) (*workflow.Run, error) {
	out, err := exec.CommandContext(ctx, "/usr/bin/python3", script, string(input)).Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return nil, fmt.Errorf("%s: %w: %s", script, err, ee.Stderr)
		}
		return nil, fmt.Errorf("%s: %w", script, err)
	}
	var res struct {
		MS        float64 `json:"ms"`
		SourcesMS float64 `json:"sources_ms"`
		AuditMS   float64 `json:"audit_ms"`
		Digest    string  `json:"digest"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return nil, fmt.Errorf("%s printed %q: %w", script, out, err)
	}
	result, _ := json.Marshal(map[string]string{"digest": res.Digest})
	return &workflow.Run{Transfer: TransferBound, MS: res.MS, DeployMS: res.SourcesMS, Result: result,
		Steps: []workflow.StepResult{{Name: "audit", MS: res.AuditMS}}}, nil
}

func summarizeRuns(runs []*workflow.Run, cpu [][2]float64) WorkflowCell {
	c := WorkflowCell{Runs: len(runs)}
	var busy, sys []float64
	for _, u := range cpu {
		busy = append(busy, u[0])
		if u[0] > 0 {
			sys = append(sys, u[1]/u[0])
		}
	}
	c.CPUSec, c.SystemShare = median(busy), median(sys)
	var src, audit, xfer, rx, rms, rst []float64
	for _, r := range runs {
		c.All = append(c.All, r.MS)
		s := r.DeployMS
		var bytes int64
		t := 0.0
		for _, st := range r.Steps {
			t += st.TransferMS()
			if st.Name == "fetch-portfolio" || st.Name == "fetch-market-data" {
				if !st.InInit {
					s += st.MS
				}
				for _, in := range st.Instances {
					if st.InInit { // the stage instance, with its prepare
						s += in.MS
					}
				}
				for _, in := range st.Instances {
					bytes += in.BytesOut
				}
			}
			if st.Name == "audit" {
				audit = append(audit, st.MS)
				c.Nodes = max(c.Nodes, len(st.Nodes))
				for _, in := range st.Instances {
					rx = append(rx, in.LoadMS+in.DeserMS)
					rms = append(rms, in.MS)
					rst = append(rst, in.StartMS)
				}
			}
		}
		if bytes > 0 {
			c.StateMB = float64(bytes) / 1e6
		}
		src = append(src, s)
		xfer = append(xfer, t)
	}
	c.MS = median(c.All)
	c.SourcesMS, c.AuditMS, c.TransferMS = median(src), median(audit), median(xfer)
	c.RuleXferMS, c.RuleMS, c.RuleFaults = median(rx), median(rms), median(rst)
	return c
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// WorkflowMarkdown renders the cells as a table with the target check.
func WorkflowMarkdown(wc WorkflowConfig, cells []WorkflowCell) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Command: `%s`. Medians of %d runs per cell, %s.", wc.Command, wc.Runs, orderText(wc.Order))
	if wc.Host != "" {
		fmt.Fprintf(&b, " Host: %s.", wc.Host)
	}
	b.WriteString("\n\n| trades | state (pickled MB) | rules | transfer | end to end ms | sources ms | audit step ms | per rule ms | per rule GET+unpickle ms | Σ (de)serialization + storage ms | machine CPU s (kernel) | returned to host MB | fork faster by |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for i, c := range cells {
		faster := ""
		if c.Transfer != workflow.TransferStorage {
			// Against the storage cell of the same grid point, after the
			// fork variants.
			for _, s := range cells[i+1:] {
				if s.Transfer == workflow.TransferStorage {
					faster = fmt.Sprintf("%.0f%%", 100*(1-c.MS/s.MS))
					break
				}
			}
		}
		tr := string(c.Transfer)
		if c.ForkSeed != "" {
			tr += " (" + c.ForkSeed + " seed)"
		}
		returned := "n/a"
		if c.ReturnedMB >= 0 {
			returned = fmt.Sprintf("%.0f", c.ReturnedMB)
		}
		fmt.Fprintf(&b, "| %d | %.0f | %d | %s | %.0f | %.0f | %.0f | %.1f | %.1f | %.0f | %.2f (%.0f%%) | %s | %s |\n",
			c.Trades, c.StateMB, c.Rules, tr, c.MS, c.SourcesMS, c.AuditMS, c.RuleMS, c.RuleXferMS, c.TransferMS, c.CPUSec, 100*c.SystemShare, returned, faster)
	}
	return b.String()
}

// WorkflowChart renders end-to-end time per cell, fork vs storage.
func WorkflowChart(cells []WorkflowCell) string {
	var cats []string
	var series []plot.Series
	idx := map[string]int{}
	for _, c := range cells {
		name := string(c.Transfer)
		if c.ForkSeed != "" {
			name += " (" + c.ForkSeed + " seed)"
		}
		k, ok := idx[name]
		if !ok {
			k = len(series)
			idx[name] = k
			series = append(series, plot.Series{Name: name})
		}
		if k == 0 {
			cats = append(cats, fmt.Sprintf("%dk trades, M=%d", c.Trades/1000, c.Rules))
		}
		series[k].Values = append(series[k].Values, c.MS)
	}
	return plot.BarChart(plot.Chart{Title: "FINRA workflow end to end: fork-based state transfer vs pickle through Redis", YLabel: "ms (log)", LogY: true,
		Footer: "3 network-namespace nodes; medians; examples/finra"}, cats, series)
}
