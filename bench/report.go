package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	"github.com/mitosis-fork/mitosis/internal/testenv"
)

// Report is the outcome of one benchmark run.
type Report struct {
	// Title is the report's heading (default "mitosis engine benchmarks").
	Title       string        `json:"title,omitempty"`
	Machine     Machine       `json:"machine"`
	Date        time.Time     `json:"date"`
	CommandLine string        `json:"command_line"`
	Runs        int           `json:"runs"`
	Wall        time.Duration `json:"wall_ns"`
	Groups      []*Group      `json:"groups"`
	// Notes are observations about the engine made during the run.
	Notes []string `json:"notes,omitempty"`
}

// Machine describes the host the benchmark ran on.
type Machine struct {
	testenv.Machine
	GCC    string `json:"gcc"`
	Python string `json:"python"`
}

// Group is a set of cases measured together (interleaved round-robin) and
// compared against one baseline case.
type Group struct {
	Name        string  `json:"name"`
	Title       string  `json:"title"`
	Description string  `json:"description"`
	Baseline    string  `json:"baseline"`
	Cases       []*Case `json:"cases"`
	// Tables are further results that are not durations (rates, bytes),
	// rendered after the cases.
	Tables []Table  `json:"tables,omitempty"`
	Notes  []string `json:"notes,omitempty"`
	// Error is set when the group was aborted (a failed run, an engine
	// error, a wrong result); its cases then hold what was measured before.
	Error string `json:"error,omitempty"`
}

// Table is a markdown table of a group.
type Table struct {
	Header []string   `json:"header"`
	Rows   [][]string `json:"rows"`
}

// Case is one measured quantity of a group.
type Case struct {
	Name    string          `json:"name"`
	Warmup  time.Duration   `json:"warmup_ns"`
	Samples []time.Duration `json:"samples_ns"`
	Summary Summary         `json:"summary"`
}

// Summary are order statistics of a case's samples.
type Summary struct {
	N      int           `json:"n"`
	Median time.Duration `json:"median_ns"`
	P99    time.Duration `json:"p99_ns"`
	Min    time.Duration `json:"min_ns"`
	Max    time.Duration `json:"max_ns"`
}

// add records one sample; warm-up samples are kept apart.
func (c *Case) add(d time.Duration, warmup bool) {
	if warmup {
		c.Warmup = d
		return
	}
	c.Samples = append(c.Samples, d)
}

// summarize computes the order statistics: the median (mean of the middle
// two for an even count) and the nearest-rank p99.
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

func (r *Report) finish() {
	for _, g := range r.Groups {
		for _, c := range g.Cases {
			c.Summary = summarize(c.Samples)
		}
	}
}

// Markdown renders the report: a header describing the machine and the
// method, one table per group, and the raw samples.
func (r *Report) Markdown() string {
	var b strings.Builder
	m := r.Machine
	title := r.Title
	if title == "" {
		title = "mitosis engine benchmarks"
	}
	fmt.Fprintf(&b, "# %s\n\n", title)
	fmt.Fprintf(&b, "- machine: %d vCPUs (nproc), %s, kernel %s, %s RAM; load average at start %s\n", m.NProc, m.Model, m.Kernel, m.MemTotal, m.LoadAvg)
	fmt.Fprintf(&b, "- date: %s\n", r.Date.UTC().Format("2006-01-02 15:04:05 MST"))
	fmt.Fprintf(&b, "- command: `%s`\n", r.CommandLine)
	fmt.Fprintf(&b, "- toolchain: %s; %s; %s\n", m.GoVersion, m.GCC, m.Python)
	fmt.Fprintf(&b, "- method: %d measured runs per case after one discarded warm-up run; within a group the cases are interleaved round-robin in every iteration (the starting case rotates) so they share the host's noise. p99 is nearest-rank, so with fewer than 100 runs it is the max. Wall time of the whole run: %s.\n",
		r.Runs, fmtDur(r.Wall))
	for _, g := range r.Groups {
		fmt.Fprintf(&b, "\n## %s — %s\n\n", g.Name, g.Title)
		if g.Description != "" {
			fmt.Fprintf(&b, "%s\n\n", g.Description)
		}
		if g.Error != "" {
			fmt.Fprintf(&b, "**FAILED:** `%s`\n\n", strings.ReplaceAll(g.Error, "\n", " "))
		}
		if len(g.Cases) > 0 {
			var base time.Duration
			for _, c := range g.Cases {
				if c.Name == g.Baseline {
					base = c.Summary.Median
				}
			}
			fmt.Fprintf(&b, "| case | runs | median | p99 | min | max | ratio to %s |\n", g.Baseline)
			fmt.Fprintf(&b, "|---|---:|---:|---:|---:|---:|---:|\n")
			for _, c := range g.Cases {
				s := c.Summary
				ratio := "-"
				if base > 0 && s.N > 0 {
					ratio = fmt.Sprintf("%.2f×", float64(s.Median)/float64(base))
				}
				fmt.Fprintf(&b, "| %s | %d | %s | %s | %s | %s | %s |\n", c.Name, s.N,
					fmtDur(s.Median), fmtDur(s.P99), fmtDur(s.Min), fmtDur(s.Max), ratio)
			}
		}
		for _, tb := range g.Tables {
			fmt.Fprintf(&b, "\n| %s |\n|", strings.Join(tb.Header, " | "))
			for i := range tb.Header {
				if i == 0 {
					b.WriteString("---|")
				} else {
					b.WriteString("---:|")
				}
			}
			b.WriteString("\n")
			for _, row := range tb.Rows {
				fmt.Fprintf(&b, "| %s |\n", strings.Join(row, " | "))
			}
		}
		if len(g.Notes) > 0 {
			b.WriteString("\n")
			for _, n := range g.Notes {
				fmt.Fprintf(&b, "- %s\n", n)
			}
		}
	}
	if len(r.Notes) > 0 {
		b.WriteString("\n## Observations\n\n")
		for _, n := range r.Notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	b.WriteString("\n## Raw samples (µs, warm-up excluded)\n\n<details>\n\n```\n")
	for _, g := range r.Groups {
		for _, c := range g.Cases {
			us := make([]string, len(c.Samples))
			for i, d := range c.Samples {
				us[i] = fmt.Sprintf("%.0f", float64(d)/1e3)
			}
			fmt.Fprintf(&b, "%s / %s: [%s]\n", g.Name, c.Name, strings.Join(us, " "))
		}
	}
	b.WriteString("```\n\n</details>\n")
	return b.String()
}

// JSON returns the report, raw samples included (durations in ns).
func (r *Report) JSON() ([]byte, error) {
	return json.MarshalIndent(r, "", "  ")
}

// Failed reports whether any group was aborted.
func (r *Report) Failed() bool {
	for _, g := range r.Groups {
		if g.Error != "" {
			return true
		}
	}
	return false
}

func machineInfo() Machine { return Machine{Machine: testenv.ReadMachine()} }

func fmtDur(d time.Duration) string { return testenv.FmtDur(d) }
