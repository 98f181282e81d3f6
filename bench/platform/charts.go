package platform

import (
	"fmt"

	"github.com/mitosis-fork/mitosis/internal/plot"
)

// charts renders the report's SVG charts, by file name.
func (r *Report) charts() map[string]string {
	out := map[string]string{}
	if len(r.Policies) == 0 {
		return out
	}
	var cats []string
	p50 := plot.Series{Name: "p50"}
	p99 := plot.Series{Name: "p99"}
	pmax := plot.Series{Name: "max"}
	mem := plot.Series{Name: "memory × time (GiB·s)"}
	var inst, memT []plot.Series
	for _, p := range r.Policies {
		cats = append(cats, string(p.Policy))
		p50.Values = append(p50.Values, p.Latency.P50)
		p99.Values = append(p99.Values, p.Latency.P99)
		pmax.Values = append(pmax.Values, p.Latency.Max)
		mem.Values = append(mem.Values, p.MemorySeconds)
		in := plot.Series{Name: string(p.Policy)}
		m := plot.Series{Name: string(p.Policy)}
		for _, s := range p.Samples {
			in.X = append(in.X, s.T)
			in.Values = append(in.Values, float64(s.Instances))
			m.X = append(m.X, s.T)
			m.Values = append(m.Values, float64(s.Memory)/(1<<20))
		}
		inst = append(inst, in)
		memT = append(memT, m)
	}
	foot := fmt.Sprintf("%s; %d invocations, peak %d/minute; 3 nodes", r.Trace.Source, r.Trace.Invocations, r.Trace.PeakCount)
	if len(foot) > 140 {
		foot = fmt.Sprintf("%d invocations, peak %d/minute; 3 nodes; see report.md", r.Trace.Invocations, r.Trace.PeakCount)
	}
	out["platform-latency.svg"] = plot.BarChart(plot.Chart{Title: "Request latency through the gateway, load-spike replay", YLabel: "ms (log)", LogY: true, Footer: foot},
		cats, []plot.Series{p50, p99, pmax})
	out["platform-memory-time.svg"] = plot.BarChart(plot.Chart{Title: "Memory × time of all function processes, seeds and node caches", YLabel: "GiB·s (log)", LogY: true, Footer: foot},
		cats, []plot.Series{mem})
	out["platform-instances.svg"] = plot.LineChart(plot.Chart{Title: "Function instances alive (running + warm)", YLabel: "instances", XLabel: "seconds into the replay", Footer: foot}, inst)
	out["platform-memory.svg"] = plot.LineChart(plot.Chart{Title: "Total function memory (Σ Pss of instances and seeds + node caches)", YLabel: "MiB", XLabel: "seconds into the replay", Footer: foot}, memT)
	return out
}
