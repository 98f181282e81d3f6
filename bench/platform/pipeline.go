package platform

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/mitosis-fork/mitosis/workflow"
)

// PipelineConfig is the pipeline benchmark: the ML inference pipeline
// (examples/pipeline: load, preprocess, project, S inference shards,
// tally), whose kept steps hand numpy matrices on, for each sample count,
// under fork (each kept step's instance a stage seed its downstream steps
// fork from) and storage (each matrix pickled through Redis), Runs times
// each, in the order of Order.
type PipelineConfig struct {
	Spec      string // path of pipeline.json
	Samples   []int
	Features  int // raw features per sample (float64)
	Shards    int // inference instances
	Runs      int
	ForkSeeds []string // "stage", "per-run" (as WorkflowConfig.ForkSeeds)
	Mitosis   string
	Log       *os.File
	Command   string
	NodeMem   string
	NodeConc  int
	RunsOut   *os.File
	// Order is the order of a sample count's runs: OrderBalanced (the
	// default), OrderCrossed or OrderBlocked (see schedule).
	Order string
	// Host is a line for the results on how the host ran them (as
	// WorkflowConfig.Host).
	Host string
}

// PipelineCell is the medians of one (samples, transfer) cell.
type PipelineCell struct {
	Samples    int                `json:"samples"`
	StateMB    float64            `json:"state_mb"` // the raw samples matrix
	Transfer   workflow.Transfer  `json:"transfer"`
	ForkSeed   string             `json:"fork_seed,omitempty"`
	Runs       int                `json:"runs"`
	MS         float64            `json:"ms_median"`
	StepMS     map[string]float64 `json:"step_ms"`     // each later step's wall time
	TransferMS float64            `json:"transfer_ms"` // Σ pickle, SET, GET, unpickle over the run
	InferIn    float64            `json:"infer_bytes_in"`
	CPUSec     float64            `json:"cpu_s"`
	All        []float64          `json:"ms_all"`
}

// pipelineSteps are the steps after the sources, in order.
var pipelineSteps = []string{"preprocess", "project", "infer", "tally"}

// RunPipelines builds the three-node cluster with a Redis server and runs
// the pipeline for every sample count.
func RunPipelines(ctx context.Context, pc PipelineConfig) ([]PipelineCell, error) {
	if pc.Runs <= 0 {
		pc.Runs = 5
	}
	if pc.Features <= 0 {
		pc.Features = 32
	}
	if pc.Shards <= 0 {
		pc.Shards = 8
	}
	if len(pc.ForkSeeds) == 0 {
		pc.ForkSeeds = []string{"stage"}
	}
	if _, err := schedule(1, 1, pc.Order); err != nil {
		return nil, err
	}
	c, err := startWorkflowCluster(pc.Spec, Config{Mitosis: pc.Mitosis, Log: pc.Log, NodeConcurrency: pc.NodeConc, NodeMemory: pc.NodeMem})
	if c != nil {
		defer c.close()
	}
	if err != nil {
		return nil, err
	}
	rn, spec := c.rn, c.spec
	if _, err := rn.Deploy(ctx, spec); err != nil {
		return nil, err
	}
	type variant struct {
		tr   workflow.Transfer
		seed string
	}
	var vs []variant
	for _, fs := range pc.ForkSeeds {
		if fs != "stage" && fs != "per-run" {
			return nil, fmt.Errorf("fork seed %q: want stage or per-run", fs)
		}
		vs = append(vs, variant{workflow.TransferFork, fs})
	}
	vs = append(vs, variant{tr: workflow.TransferStorage})
	var cells []PipelineCell
	for _, n := range pc.Samples {
		input, _ := json.Marshal(map[string]int{"samples": n, "features": pc.Features, "shards": pc.Shards})
		runs := make([][]*workflow.Run, len(vs))
		cpu := make([][]float64, len(vs))
		order, err := schedule(len(vs), pc.Runs, pc.Order)
		if err != nil {
			return nil, err
		}
		for _, sr := range order {
			k := sr.way
			if ctx.Err() != nil {
				return cells, ctx.Err()
			}
			rn.SeedPerRun = vs[k].seed == "per-run"
			b0, _ := cpuTimes()
			r, err := rn.Run(ctx, spec, input, vs[k].tr)
			if err != nil {
				return cells, fmt.Errorf("samples %d %s %s: %w", n, vs[k].tr, vs[k].seed, err)
			}
			b1, _ := cpuTimes()
			if sr.warmup {
				continue
			}
			runs[k] = append(runs[k], r)
			cpu[k] = append(cpu[k], b1-b0)
			if pc.RunsOut != nil {
				b, _ := json.Marshal(r)
				fmt.Fprintf(pc.RunsOut, "%s\n", b)
			}
		}
		first := len(cells)
		for k, v := range vs {
			cell := PipelineCell{Samples: n, StateMB: float64(n*pc.Features*8) / 1e6, Transfer: v.tr, ForkSeed: v.seed,
				Runs: len(runs[k]), StepMS: map[string]float64{}, CPUSec: median(cpu[k])}
			steps := map[string][]float64{}
			var xfer, inferIn []float64
			for _, r := range runs[k] {
				cell.All = append(cell.All, r.MS)
				t := 0.0
				for _, st := range r.Steps {
					t += st.TransferMS()
					steps[st.Name] = append(steps[st.Name], st.MS)
					if st.Name == "infer" {
						for _, in := range st.Instances {
							inferIn = append(inferIn, float64(in.BytesIn))
						}
					}
				}
				xfer = append(xfer, t)
			}
			cell.MS, cell.TransferMS, cell.InferIn = median(cell.All), median(xfer), median(inferIn)
			for _, name := range pipelineSteps {
				cell.StepMS[name] = median(steps[name])
			}
			cells = append(cells, cell)
		}
		// Every way must predict the same labels.
		want := string(runs[len(vs)-1][0].Result)
		for k := range vs {
			for _, r := range runs[k] {
				if string(r.Result) != want {
					return cells, fmt.Errorf("samples %d: %s (%s) predicted %s, storage %s", n, vs[k].tr, vs[k].seed, r.Result, want)
				}
			}
		}
		st := cells[len(cells)-1]
		for _, f := range cells[first : len(cells)-1] {
			c.e.logf("pipeline samples %d (%.0f MB): fork (%s seed) %.0f ms, storage %.0f ms (%.0f%% faster)",
				n, f.StateMB, f.ForkSeed, f.MS, st.MS, 100*(1-f.MS/st.MS))
		}
	}
	return cells, nil
}

// PipelineMarkdown renders the pipeline cells as a markdown table.
func PipelineMarkdown(pc PipelineConfig, cells []PipelineCell) string {
	var b strings.Builder
	fmt.Fprintf(&b, "```sh\n%s\n```\n\nMedians of %d runs, %s.", pc.Command, pc.Runs, orderText(pc.Order))
	if pc.Host != "" {
		fmt.Fprintf(&b, " Host: %s.", pc.Host)
	}
	b.WriteString("\n\n")
	fmt.Fprintf(&b, "| samples | raw MB | transfer | end to end ms |")
	for _, s := range pipelineSteps {
		fmt.Fprintf(&b, " %s ms |", s)
	}
	fmt.Fprintf(&b, " Σ (de)serialization + storage ms | per infer instance MB loaded | machine CPU s | fork faster by |\n")
	b.WriteString("|---|---|---|---|" + strings.Repeat("---|", len(pipelineSteps)) + "---|---|---|---|\n")
	for i, c := range cells {
		tr := string(c.Transfer)
		if c.ForkSeed != "" {
			tr += " (" + c.ForkSeed + " seed)"
		}
		fmt.Fprintf(&b, "| %d | %.0f | %s | %.0f |", c.Samples, c.StateMB, tr, c.MS)
		for _, s := range pipelineSteps {
			fmt.Fprintf(&b, " %.0f |", c.StepMS[s])
		}
		faster := ""
		// The storage cell closes each sample count's group.
		for j := i + 1; j < len(cells) && cells[j].Samples == c.Samples; j++ {
			if cells[j].Transfer == workflow.TransferStorage {
				faster = fmt.Sprintf("%.0f%%", 100*(1-c.MS/cells[j].MS))
			}
		}
		fmt.Fprintf(&b, " %.0f | %.1f | %.2f | %s |\n", c.TransferMS, c.InferIn/1e6, c.CPUSec, faster)
	}
	return b.String()
}
