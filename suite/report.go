package suite

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/mitosis-fork/mitosis/internal/plot"
	"github.com/mitosis-fork/mitosis/internal/testenv"
)

// Memory approaches.
const (
	MemMitosis = "mitosis lazy children"
	MemWarm    = "warm local-fork instances"
	MemCold    = "cold-started processes"
)

// Report is the outcome of one suite run.
type Report struct {
	Machine     Machine       `json:"machine"`
	Date        time.Time     `json:"date"`
	CommandLine string        `json:"command_line"`
	Runs        int           `json:"runs"`
	Quick       bool          `json:"quick"`
	Wall        time.Duration `json:"wall_ns"`
	Start       []*StartGroup `json:"start"`
	Prepare     *PrepareGroup `json:"prepare,omitempty"`
	FanOut      *FanOutGroup  `json:"fanout,omitempty"`
	// RemoteFanOut is set with Config.Remote.
	RemoteFanOut *RemoteFanOutGroup `json:"remote_fanout,omitempty"`
	Memory       []*MemoryGroup     `json:"memory,omitempty"`
	Notes        []string           `json:"notes,omitempty"`
	Files        []string           `json:"files,omitempty"`
}

// Machine describes the host.
type Machine struct {
	testenv.Machine
	Python string `json:"python"`
}

func (m Machine) String() string {
	return fmt.Sprintf("%d vCPUs, %s, kernel %s, %s RAM", m.NProc, m.Model, m.Kernel, m.MemTotal)
}

// Case is one measured case: start latency, start+execution and the
// handler's own time, one sample per run.
type Case struct {
	Name    string          `json:"name"`
	Start   []time.Duration `json:"start_ns"`
	Total   []time.Duration `json:"total_ns,omitempty"`
	Handler []time.Duration `json:"handler_ns,omitempty"`
	S, T, H Summary
}

// Summary are order statistics.
type Summary struct {
	N                     int
	Median, P99, Min, Max time.Duration
}

func summarize(samples []time.Duration) Summary {
	n := len(samples)
	if n == 0 {
		return Summary{}
	}
	s := append([]time.Duration(nil), samples...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	rank := int(math.Ceil(0.99*float64(n))) - 1
	return Summary{N: n, Median: med, P99: s[rank], Min: s[0], Max: s[n-1]}
}

func (c *Case) finish() { c.S, c.T, c.H = summarize(c.Start), summarize(c.Total), summarize(c.Handler) }

// StartGroup is one workload's start cases.
type StartGroup struct {
	Workload    string   `json:"workload"`
	Description string   `json:"description"`
	Cases       []*Case  `json:"cases"`
	Hash        string   `json:"result_sha256"`
	Verified    int      `json:"results_verified"`
	ParentRSS   uint64   `json:"parent_rss"`
	CacheBytes  uint64   `json:"cache_bytes"`
	Notes       []string `json:"notes,omitempty"`
	Error       string   `json:"error,omitempty"`
}

func (g *StartGroup) caseByName(n string) *Case {
	for _, c := range g.Cases {
		if c.Name == n {
			return c
		}
	}
	return nil
}

// med returns the case's summary by f, zero for a missing case.
func (g *StartGroup) med(n string, f func(*Case) time.Duration) time.Duration {
	if c := g.caseByName(n); c != nil {
		return f(c)
	}
	return 0
}

func startMed(c *Case) time.Duration { return c.S.Median }
func totalMed(c *Case) time.Duration { return c.T.Median }

// PrepareGroup is Prepare time vs parent size.
type PrepareGroup struct {
	Rows  []*PrepareRow `json:"rows"`
	Error string        `json:"error,omitempty"`
}

// PrepareRow is one parent size.
type PrepareRow struct {
	MB        int    `json:"mib"`
	Pages     uint64 `json:"present_pages"`
	VMAs      int    `json:"vmas"`
	ParentRSS uint64 `json:"parent_rss"`
	Wall      *Case  `json:"wall"`
	Took      *Case  `json:"seed_took"`
}

// FanOutGroup is children per second from one seed.
type FanOutGroup struct {
	Workload string       `json:"workload"`
	Children int          `json:"children"`
	Rows     []*FanOutRow `json:"rows"`
	Verified int          `json:"results_verified"`
	Error    string       `json:"error,omitempty"`
}

// FanOutRow is one in-flight level.
type FanOutRow struct {
	Conc int           `json:"in_flight"`
	Wall time.Duration `json:"wall_ns"`
	Lat  *Case         `json:"latency"`
}

func (r *FanOutRow) rate() float64 {
	if r.Wall <= 0 {
		return 0
	}
	return float64(len(r.Lat.Total)) / r.Wall.Seconds()
}

// MemoryGroup is the memory of N instances of one workload.
type MemoryGroup struct {
	Workload     string       `json:"workload"`
	ParentBefore Smaps        `json:"parent_before_prepare"`
	ParentAfter  Smaps        `json:"parent_after_prepare"`
	Frozen       Smaps        `json:"frozen_copy"`
	Rows         []*MemoryRow `json:"rows"`
	Verified     int          `json:"results_verified"`
	Error        string       `json:"error,omitempty"`
}

// MemoryRow is N instances of one approach, each after serving one request.
type MemoryRow struct {
	Approach  string `json:"approach"`
	N         int    `json:"n"`
	Instances int    `json:"instances"` // measured (cold may be capped)
	Median    Smaps  `json:"per_instance_median"`
	Sum       Smaps  `json:"sum"`
	Overhead  uint64 `json:"overhead_pss"` // parent (+ frozen copy) Pss
	Cache     uint64 `json:"cache_bytes"`
}

// Total is Σ Pss of the instances scaled to N, plus overhead and cache.
func (r *MemoryRow) Total() uint64 {
	sum := r.Sum.Pss
	if r.Instances > 0 && r.Instances < r.N {
		sum = sum / uint64(r.Instances) * uint64(r.N)
	}
	return sum + r.Overhead + r.Cache
}

func (r *Report) finish() {
	for _, g := range r.Start {
		for _, c := range g.Cases {
			c.finish()
		}
	}
	if r.Prepare != nil {
		for _, row := range r.Prepare.Rows {
			row.Wall.finish()
			row.Took.finish()
		}
	}
	if r.FanOut != nil {
		for _, row := range r.FanOut.Rows {
			row.Lat.finish()
		}
	}
	if r.RemoteFanOut != nil {
		r.RemoteFanOut.finish()
	}
}

// startCases are the start cases in the report: StartCases, then the
// remote cases any group has.
func (r *Report) startCases() []string {
	names := slices.Clone(StartCases)
	for _, n := range RemoteCases {
		for _, g := range r.Start {
			if g.caseByName(n) != nil {
				names = append(names, n)
				break
			}
		}
	}
	return names
}

// Failed reports whether any group failed.
func (r *Report) Failed() bool {
	for _, g := range r.Start {
		if g.Error != "" {
			return true
		}
	}
	for _, g := range r.Memory {
		if g.Error != "" {
			return true
		}
	}
	return r.Prepare != nil && r.Prepare.Error != "" || r.FanOut != nil && r.FanOut.Error != "" ||
		r.RemoteFanOut != nil && r.RemoteFanOut.Error != ""
}

func fmtBytes(b uint64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	default:
		return fmt.Sprintf("%.0f KiB", float64(b)/(1<<10))
	}
}

func ratio(a, b time.Duration) string {
	if a <= 0 || b <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f×", float64(a)/float64(b))
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// footer labels every chart.
func (r *Report) footer() string {
	return fmt.Sprintf("machine: %s\ndate: %s   command: %s", r.Machine, r.Date.UTC().Format("2006-01-02 15:04 MST"), r.CommandLine)
}

// Markdown renders the report.
func (r *Report) Markdown() string {
	var b strings.Builder
	m := r.Machine
	fmt.Fprintf(&b, "# mitosis benchmark suite (FunctionBench-style workloads)\n\n")
	fmt.Fprintf(&b, "- machine: %s; load average at start %s\n", m, m.LoadAvg)
	fmt.Fprintf(&b, "- date: %s\n", r.Date.UTC().Format("2006-01-02 15:04:05 MST"))
	fmt.Fprintf(&b, "- command: `%s`\n", r.CommandLine)
	fmt.Fprintf(&b, "- toolchain: %s; %s\n", m.GoVersion, m.Python)
	warm := "after one discarded warm-up run"
	if r.Quick {
		warm = "QUICK MODE: no warm-up, numbers are not meaningful"
	}
	fmt.Fprintf(&b, "- method: %d measured runs per case %s; within a workload the cases are interleaved round-robin (rotating start) so they share the host's noise. p99 is nearest-rank (= max below 100 runs). Wall time of the whole run: %s.\n", r.Runs, warm, fmtDur(r.Wall))
	b.WriteString("- start latency = from the request (exec / SIGCONT / `engine.Fork` call) until the instance wrote `S` (its first act when the request reaches the handler); start+exec = until it wrote `R <sha256 of the handler output> <handler ns>`. Every result hash is checked against every other instance of the workload (cold starts included).\n")
	b.WriteString("- cases: **cold start** = exec `/usr/bin/python3 runner.py WL cold` (interpreter start, imports, init, handler); **warm start** = SIGCONT to a stopped instance forked (untimed) from the initialised parent; **local fork** = SIGCONT to the stopped parent, which os.fork()s a child that runs the handler; **mitosis eager** = `Fork(seed, {Eager})`, every page copied before the child runs; **mitosis lazy, cold cache** = first child of a seed prepared just before (untimed), every touched page goes frozen copy → node cache; **mitosis lazy** = `Fork(seed, {})` with the node page cache warm from earlier children; **mitosis lazy + prefetch** = `Fork(seed, {Prefetch})`, the recorded working set mapped before the child runs. All same node.\n")

	cases := r.startCases()
	if len(cases) > len(StartCases) {
		b.WriteString("- remote cases (node b of a 3-node bench/netlab lab; seed prepared by node a's daemon, children forked attached by b's daemon, their stdout a pipe to the suite): **remote lazy, cold cache** = b's first child of a seed a prepared just before (untimed): the request includes the import (descriptor fetch, lease) and every touched page crosses the network into b's node cache; **remote lazy** = child on b of the workload's remote seed with b's node cache warm from earlier children; **remote lazy + prefetch** = same with `Prefetch` (the working set b's children touched mapped before the child runs); **remote prefetch, cold cache** = a fresh seed, one untimed child on a records the working set, then b's first child with `Prefetch`: b fetches the working set in bulk at import, in the background while the child starts.\n")
	}
	if len(r.Start) > 0 {
		b.WriteString("\n## Summary: start + execution, median (ratio to local fork)\n\n")
		b.WriteString("| workload |")
		for _, c := range cases {
			fmt.Fprintf(&b, " %s |", c)
		}
		b.WriteString("\n|---|")
		for range cases {
			b.WriteString("---:|")
		}
		b.WriteString("\n")
		for _, g := range r.Start {
			fmt.Fprintf(&b, "| %s |", g.Workload)
			base := g.med(CaseLocal, totalMed)
			for _, n := range cases {
				v := g.med(n, totalMed)
				fmt.Fprintf(&b, " %s (%s) |", fmtDur(v), ratio(v, base))
			}
			b.WriteString("\n")
		}
		b.WriteString("\n## Summary: start latency, median (ratio to local fork)\n\n| workload |")
		for _, c := range cases {
			fmt.Fprintf(&b, " %s |", c)
		}
		b.WriteString("\n|---|")
		for range cases {
			b.WriteString("---:|")
		}
		b.WriteString("\n")
		for _, g := range r.Start {
			fmt.Fprintf(&b, "| %s |", g.Workload)
			base := g.med(CaseLocal, startMed)
			for _, n := range cases {
				v := g.med(n, startMed)
				fmt.Fprintf(&b, " %s (%s) |", fmtDur(v), ratio(v, base))
			}
			b.WriteString("\n")
		}
		b.WriteString("\n![start+exec ratio to local fork](overview-ratio.svg)\n\n![start latency](overview-start.svg)\n")
	}
	for _, g := range r.Start {
		fmt.Fprintf(&b, "\n## %s\n\n%s. Result sha256 `%.16s…`, %d results verified equal.\n\n", g.Workload, g.Description, g.Hash, g.Verified)
		if g.Error != "" {
			fmt.Fprintf(&b, "**FAILED:** `%s`\n\n", strings.ReplaceAll(g.Error, "\n", " "))
		}
		lc := g.caseByName(CaseLocal)
		if lc == nil {
			lc = &Case{}
		}
		b.WriteString("| case | runs | start median | start p99 | start+exec median | start+exec p99 | handler median | start ratio to local fork | start+exec ratio to local fork |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, c := range g.Cases {
			fmt.Fprintf(&b, "| %s | %d | %s | %s | %s | %s | %s | %s | %s |\n", c.Name, c.S.N, fmtDur(c.S.Median), fmtDur(c.S.P99),
				fmtDur(c.T.Median), fmtDur(c.T.P99), fmtDur(c.H.Median), ratio(c.S.Median, lc.S.Median), ratio(c.T.Median, lc.T.Median))
		}
		b.WriteString("\n")
		for _, n := range g.Notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
		fmt.Fprintf(&b, "\n![%s](start-%s.svg)\n", g.Workload, g.Workload)
	}
	if p := r.Prepare; p != nil {
		b.WriteString("\n## prepare — Prepare time vs parent memory size\n\n`engine.Prepare(pid)` wall time on a stopped /usr/bin/python3 parent holding N MiB of written bytes (`b\"\\xa5\" * N<<20`) on top of the interpreter; the seed is removed after each run (untimed).\n\n")
		if p.Error != "" {
			fmt.Fprintf(&b, "**FAILED:** `%s`\n\n", p.Error)
		}
		b.WriteString("| parent data | parent RSS | present pages | VMAs | runs | median | p99 | Seed.Took median | µs per MiB of RSS |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, row := range p.Rows {
			per := "-"
			if row.ParentRSS > 0 {
				per = fmt.Sprintf("%.1f", float64(row.Wall.S.Median)/1e3/mib(row.ParentRSS))
			}
			fmt.Fprintf(&b, "| %d MiB | %s | %d | %d | %d | %s | %s | %s | %s |\n", row.MB, fmtBytes(row.ParentRSS), row.Pages, row.VMAs,
				row.Wall.S.N, fmtDur(row.Wall.S.Median), fmtDur(row.Wall.S.P99), fmtDur(row.Took.S.Median), per)
		}
		b.WriteString("\n![prepare](prepare.svg)\n")
	}
	if f := r.FanOut; f != nil {
		fmt.Fprintf(&b, "\n## fanout — children per second from one seed (one node)\n\n%d children of one %s seed (`Fork(seed, {Prefetch})`, warm node cache), issued by 1..k goroutines of one engine (k requests in flight); each child's stdout is read and its exit awaited before that goroutine forks the next. Latency = request → result line. %d results verified.\n\n", f.Children, f.Workload, f.Verified)
		if f.Error != "" {
			fmt.Fprintf(&b, "**FAILED:** `%s`\n\n", f.Error)
		}
		b.WriteString("| in flight | children | wall | children/s | start median | start p99 | start+exec median | p90 | p99 | max |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, row := range f.Rows {
			fmt.Fprintf(&b, "| %d | %d | %s | %.0f | %s | %s | %s | %s | %s | %s |\n", row.Conc, len(row.Lat.Total), fmtDur(row.Wall), row.rate(),
				fmtDur(row.Lat.S.Median), fmtDur(row.Lat.S.P99), fmtDur(row.Lat.T.Median), fmtDur(pct(row.Lat.Total, 0.9)), fmtDur(row.Lat.T.P99), fmtDur(row.Lat.T.Max))
		}
		b.WriteString("\n![fanout rate](fanout.svg)\n\n![fanout latency](fanout-latency.svg)\n")
	}
	if f := r.RemoteFanOut; f != nil {
		fmt.Fprintf(&b, "\n## remote-fanout — children per second from one parent onto 1, 2, 3 nodes\n\nOne %s parent prepared by node a's daemon; %d children on each target node, %d attached fork requests in flight per node (each a fresh connection to that node's daemon; a worker sends its next request as soon as the previous child's result line arrived, that child's exit report is awaited and checked (status 0) in the background), all target nodes at once. Targets: 1 node = b; 2 = b, c; 3 = b, c and a itself (a 3-node lab: the origin is the third node; its children page locally). Seed `a/ID` on b and c, `ID` on a; `Prefetch`, node caches warm (two untimed children per node first). Latency = request → the child's `S` (start) / `R` (result) line on its stdout pipe, under the load of the whole batch. wall = first request → last result line; children/s = children / wall. %d results verified.\n\n", f.Workload, f.PerNode, f.InFlight, f.Verified)
		if f.Error != "" {
			fmt.Fprintf(&b, "**FAILED:** `%s`\n\n", strings.ReplaceAll(f.Error, "\n", " "))
		}
		b.WriteString("| target nodes | children | wall | children/s | start median | start p99 | start+exec median | p90 | p99 | max | start+exec median per node |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
		for _, row := range f.Rows {
			var per []string
			for _, n := range row.Nodes {
				if c := row.PerNode[n]; c != nil {
					per = append(per, fmt.Sprintf("%s %s", n, fmtDur(c.T.Median)))
				}
			}
			fmt.Fprintf(&b, "| %s | %d | %s | %.0f | %s | %s | %s | %s | %s | %s | %s |\n", strings.Join(row.Nodes, ", "), len(row.Lat.Total), fmtDur(row.Wall), row.rate(),
				fmtDur(row.Lat.S.Median), fmtDur(row.Lat.S.P99), fmtDur(row.Lat.T.Median), fmtDur(pct(row.Lat.Total, 0.9)), fmtDur(row.Lat.T.P99), fmtDur(row.Lat.T.Max), strings.Join(per, "; "))
		}
		b.WriteString("\n![remote fanout rate](remote-fanout.svg)\n\n![remote fanout latency](remote-fanout-latency.svg)\n")
	}
	if len(r.Memory) > 0 {
		b.WriteString("\n## memory — N instances: mitosis children vs warm and cold instances\n\nEach instance serves one request, then stops itself (SIGSTOP) and is measured from `/proc/PID/smaps_rollup`. **mitosis lazy children**: `Fork(seed, {})` from one seed; overhead = Pss of the parent + the seed's frozen copy, plus the node page cache (`Seed.CacheBytes`). **warm local-fork instances**: N children os.fork()ed by the initialised parent (kept stopped, then continued once); overhead = the parent's Pss. **cold-started processes**: N independent `runner.py WL cold` processes (slow-to-start workloads are capped at the number shown in *measured*; their Σ Pss is scaled to N in the total). Total = Σ Pss(instances) + overhead Pss + cache; the cache pages that children map are also in their Pss, so the mitosis total is an upper bound. smaps counts a page as Private or Shared by how many processes map it, not by how it was created: a node-cache page mapped by one child only (N=1) shows as Private_Clean.\n")
		for _, g := range r.Memory {
			fmt.Fprintf(&b, "\n### %s\n\n", g.Workload)
			if g.Error != "" {
				fmt.Fprintf(&b, "**FAILED:** `%s`\n\n", g.Error)
			}
			fmt.Fprintf(&b, "Parent before prepare: Rss %s, Pss %s, Private %s. After prepare: parent Pss %s; seed frozen copy Rss %s, Pss %s, Private %s, Shared %s (the seed's overhead is its page tables plus what the parent writes later). %d results verified.\n\n",
				fmtBytes(g.ParentBefore.Rss), fmtBytes(g.ParentBefore.Pss), fmtBytes(g.ParentBefore.Private()), fmtBytes(g.ParentAfter.Pss),
				fmtBytes(g.Frozen.Rss), fmtBytes(g.Frozen.Pss), fmtBytes(g.Frozen.Private()), fmtBytes(g.Frozen.Shared()), g.Verified)
			b.WriteString("| N | approach | measured | per-instance Rss | Pss | Private | Shared | Σ Pss | overhead Pss | node cache | total |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
			for _, row := range g.Rows {
				fmt.Fprintf(&b, "| %d | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s |\n", row.N, row.Approach, row.Instances,
					fmtBytes(row.Median.Rss), fmtBytes(row.Median.Pss), fmtBytes(row.Median.Private()), fmtBytes(row.Median.Shared()),
					fmtBytes(row.Sum.Pss), fmtBytes(row.Overhead), fmtBytes(row.Cache), fmtBytes(row.Total()))
			}
			fmt.Fprintf(&b, "\n![memory %s](memory-%s.svg)\n", g.Workload, g.Workload)
		}
	}
	if len(r.Notes) > 0 {
		b.WriteString("\n## Observations\n\n")
		for _, n := range r.Notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	b.WriteString("\n## Raw samples (µs: start / start+exec)\n\n<details>\n\n```\n")
	for _, g := range r.Start {
		for _, c := range g.Cases {
			fmt.Fprintf(&b, "%s / %s: start %s; total %s\n", g.Workload, c.Name, usList(c.Start), usList(c.Total))
		}
	}
	if r.Prepare != nil {
		for _, row := range r.Prepare.Rows {
			fmt.Fprintf(&b, "prepare / %d MiB: %s\n", row.MB, usList(row.Wall.Start))
		}
	}
	b.WriteString("```\n\n</details>\n")
	return b.String()
}

func usList(d []time.Duration) string {
	s := make([]string, len(d))
	for i, v := range d {
		s[i] = fmt.Sprintf("%.0f", float64(v)/1e3)
	}
	return "[" + strings.Join(s, " ") + "]"
}

func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[int(math.Ceil(p*float64(len(s))))-1]
}

// Write writes README.md, results.json and the SVG charts into dir.
func (r *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	files := map[string]string{}
	ft := r.footer()
	if len(r.Start) > 0 {
		var wls []string
		cases := r.startCases()
		ratios := make([]plot.Series, len(cases))
		starts := make([]plot.Series, len(cases))
		for i, n := range cases {
			ratios[i].Name, starts[i].Name = n, n
		}
		for _, g := range r.Start {
			wls = append(wls, g.Workload)
			base := g.med(CaseLocal, totalMed)
			for i, n := range cases {
				v := 0.0
				if base > 0 {
					v = float64(g.med(n, totalMed)) / float64(base)
				}
				ratios[i].Values = append(ratios[i].Values, v)
				starts[i].Values = append(starts[i].Values, ms(g.med(n, startMed)))
			}
			var names []string
			for _, c := range g.Cases {
				names = append(names, c.Name)
			}
			files["start-"+g.Workload+".svg"] = plot.BarChart(plot.Chart{Title: g.Workload + ": start latency and start+exec (median, ms, log scale)", YLabel: "ms", Footer: ft, LogY: true},
				names, []plot.Series{{Name: "start latency", Values: caseVals(g, func(c *Case) float64 { return ms(c.S.Median) })},
					{Name: "start + exec", Values: caseVals(g, func(c *Case) float64 { return ms(c.T.Median) })},
					{Name: "start + exec p99", Values: caseVals(g, func(c *Case) float64 { return ms(c.T.P99) })}})
		}
		files["overview-ratio.svg"] = plot.BarChart(plot.Chart{Title: "start + exec, median, ratio to local fork (log scale)", YLabel: "× local fork", Footer: ft, LogY: true}, wls, ratios)
		files["overview-start.svg"] = plot.BarChart(plot.Chart{Title: "start latency, median (ms, log scale)", YLabel: "ms", Footer: ft, LogY: true}, wls, starts)
	}
	if p := r.Prepare; p != nil && len(p.Rows) > 0 {
		med, p99, took := plot.Series{Name: "Prepare median"}, plot.Series{Name: "Prepare p99"}, plot.Series{Name: "Seed.Took median"}
		for _, row := range p.Rows {
			x := mib(row.ParentRSS)
			med.X, med.Values = append(med.X, x), append(med.Values, ms(row.Wall.S.Median))
			p99.X, p99.Values = append(p99.X, x), append(p99.Values, ms(row.Wall.S.P99))
			took.X, took.Values = append(took.X, x), append(took.Values, ms(row.Took.S.Median))
		}
		files["prepare.svg"] = plot.LineChart(plot.Chart{Title: "Prepare time vs parent RSS (Python parent, log-log)", XLabel: "parent RSS (MiB)", YLabel: "ms", Footer: ft, LogX: true, LogY: true}, []plot.Series{med, p99, took})
	}
	if f := r.FanOut; f != nil && len(f.Rows) > 0 {
		var cats []string
		rate := plot.Series{Name: "children/s"}
		var cdf []plot.Series
		for _, row := range f.Rows {
			cats = append(cats, fmt.Sprintf("%d in flight", row.Conc))
			rate.Values = append(rate.Values, row.rate())
			s := plot.Series{Name: fmt.Sprintf("%d in flight", row.Conc)}
			lat := append([]time.Duration(nil), row.Lat.Total...)
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			for i, d := range lat {
				s.X = append(s.X, ms(d))
				s.Values = append(s.Values, float64(i+1)/float64(len(lat)))
			}
			cdf = append(cdf, s)
		}
		files["fanout.svg"] = plot.BarChart(plot.Chart{Title: fmt.Sprintf("fan-out: %s children per second from one seed", f.Workload), YLabel: "children / s", Footer: ft}, cats, []plot.Series{rate})
		files["fanout-latency.svg"] = plot.LineChart(plot.Chart{Title: "fan-out: CDF of request → result latency", XLabel: "ms", YLabel: "fraction of children", Footer: ft}, cdf)
	}
	if f := r.RemoteFanOut; f != nil && len(f.Rows) > 0 {
		var cats []string
		rate := plot.Series{Name: "children/s"}
		var cdf []plot.Series
		for _, row := range f.Rows {
			name := strings.Join(row.Nodes, ", ")
			cats = append(cats, name)
			rate.Values = append(rate.Values, row.rate())
			s := plot.Series{Name: name}
			lat := append([]time.Duration(nil), row.Lat.Total...)
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			for i, d := range lat {
				s.X = append(s.X, ms(d))
				s.Values = append(s.Values, float64(i+1)/float64(len(lat)))
			}
			cdf = append(cdf, s)
		}
		files["remote-fanout.svg"] = plot.BarChart(plot.Chart{Title: fmt.Sprintf("remote fan-out: %s children per second from one parent onto 1..3 nodes", f.Workload), YLabel: "children / s", Footer: ft}, cats, []plot.Series{rate})
		files["remote-fanout-latency.svg"] = plot.LineChart(plot.Chart{Title: "remote fan-out: CDF of request → result latency under load", XLabel: "ms", YLabel: "fraction of children", Footer: ft}, cdf)
	}
	for _, g := range r.Memory {
		var cats []string
		seen := map[int]bool{}
		for _, row := range g.Rows {
			if !seen[row.N] {
				seen[row.N] = true
				cats = append(cats, fmt.Sprintf("N=%d", row.N))
			}
		}
		var ss []plot.Series
		for _, ap := range []string{MemMitosis, MemWarm, MemCold} {
			s := plot.Series{Name: ap}
			for _, row := range g.Rows {
				if row.Approach == ap {
					s.Values = append(s.Values, mib(row.Total()))
				}
			}
			ss = append(ss, s)
		}
		files["memory-"+g.Workload+".svg"] = plot.BarChart(plot.Chart{Title: g.Workload + ": total memory of N instances (MiB, log scale)", YLabel: "MiB", Footer: ft, LogY: true}, cats, ss)
	}
	r.Files = nil
	for name, svg := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(svg), 0o644); err != nil {
			return err
		}
		r.Files = append(r.Files, name)
	}
	sort.Strings(r.Files)
	if err := os.WriteFile(filepath.Join(dir, "README.md"), []byte(r.Markdown()), 0o644); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "results.json"), js, 0o644)
}

func caseVals(g *StartGroup, f func(*Case) float64) []float64 {
	v := make([]float64, len(g.Cases))
	for i, c := range g.Cases {
		v[i] = f(c)
	}
	return v
}

func machineInfo() Machine { return Machine{Machine: testenv.ReadMachine()} }

func fmtDur(d time.Duration) string { return testenv.FmtDur(d) }
