package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mitosis-fork/mitosis/workflow"
)

type workflowFlags struct {
	gateway, tokenFile, user, passwordFile, redis, input, transfer, runsDir, workDir string
	timeout, stageTTL                                                                time.Duration
	jsonOut, perRun                                                                  bool
}

func newWorkflowCmd() *cobra.Command {
	f := &workflowFlags{}
	wf := &cobra.Command{
		Use:   "workflow",
		Short: "Run workflows (DAGs of Python steps) on a gateway, state passed by fork or storage",
		Long: `A workflow is a JSON definition naming a directory with workflow.py and its
steps:

  {"name": "finra", "dir": "/srv/wf/finra", "steps": [
     {"name": "fetch-portfolio"}, {"name": "fetch-market-data"}, {"name": "list-rules"},
     {"name": "audit", "after": ["fetch-portfolio", "fetch-market-data"], "map": "list-rules"},
     {"name": "merge", "after": ["audit"]}]}

Steps without "after" are sources and get the run's input; "map" runs a step
once per element of a list result (a source's, or its single-instance
upstream's), concurrently, over the cluster's nodes ("max_concurrency": N
runs at most N of them at once). A step takes the map item, its sources'
results, then its other upstreams' results, in the order "after" lists
them. A step starts once its upstream steps have ended, so independent
branches run at the same time.

The workflow is deployed once as the function wf-NAME (the step runtime with
the module imported: its seed); run deploys it when it is missing or its
definition or module changed, and rm removes it. Under --transfer fork (the
default) the run's sources run in one instance of wf-NAME, kept as the run's
stage seed (or, with --seed-per-run, in the initialization of a runtime
started for the run), and every later step is a child forked from that seed,
on any node, that reads their results in place. A later single-instance step
that others run after (a pipeline's preprocess) is kept the same way: its
instance becomes a stage seed and its downstream steps fork from it, taking
its result (a numpy array, a DataFrame: any Python object) in place. A
fan-out's results reach its downstream step as a JSON list. Branches that
meet (a step after two kept steps) run in one lineage under fork, each
kept step forked from the one kept before it, so the joining step holds
every upstream result in place (validate says so). Under --transfer
storage each kept result is pickled into Redis (--redis-socket) and each
later step loads and unpickles it. The run's stage seeds and keys are
removed when it ends, also when a step fails (the step's error is the
run's); those of a run killed midway expire after --stage-ttl.`,
	}
	pf := wf.PersistentFlags()
	pf.StringVar(&f.gateway, "gateway", "http://127.0.0.1:8080", "the gateway's URL")
	pf.StringVar(&f.tokenFile, "token-file", "", "file whose first line is a bearer token of the gateway")
	pf.StringVar(&f.user, "user", "admin", "basic auth user (with --password-file)")
	pf.StringVar(&f.passwordFile, "password-file", "", "basic auth password file (e.g. /var/lib/mitosis/gateway/basic-auth-password)")
	pf.StringVar(&f.runsDir, "runs-dir", "/var/lib/mitosis/workflow-runs", "where run records are written (and listed from)")
	pf.StringVar(&f.workDir, "work-dir", os.TempDir(), "where the workflow's function directory (the step runtime) is written; every node must see it at the same path, as the module's directory")

	run := &cobra.Command{
		Use:   "run SPEC.json",
		Short: "Run a workflow and print its steps' timings",
		Example: `  mitosis workflow run examples/finra/finra.json --input '{"trades": 1000000, "rules": 8}' \
      --password-file /var/lib/mitosis/gateway/basic-auth-password
  mitosis workflow run finra.json --transfer storage --redis-socket /run/redis/redis.sock`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec, err := workflow.ReadSpec(args[0])
			if err != nil {
				return err
			}
			var tr workflow.Transfer
			if f.transfer != "" {
				if tr, err = workflow.ParseTransfer(f.transfer); err != nil {
					return fmt.Errorf("--transfer: %w", err)
				}
			}
			if f.input != "" && !json.Valid([]byte(f.input)) {
				return fmt.Errorf("--input %q is not JSON", f.input)
			}
			rn, err := f.runner()
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			r, runErr := rn.Run(ctx, spec, json.RawMessage(f.input), tr)
			if r == nil {
				return runErr
			}
			if err := saveRun(f.runsDir, r); err != nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "mitosis: record run: %v\n", err)
			}
			showRun(cmd, r, f.jsonOut)
			return runErr
		},
	}
	run.Flags().StringVar(&f.input, "input", "", "the run's input (JSON), given to the source steps")
	run.Flags().StringVar(&f.transfer, "transfer", "", "fork or storage (default: the definition's, else fork)")
	run.Flags().StringVar(&f.redis, "redis-socket", "", "unix socket of the Redis server for --transfer storage (every node must reach it)")
	run.Flags().DurationVar(&f.timeout, "step-timeout", 5*time.Minute, "bound on one step instance")
	run.Flags().DurationVar(&f.stageTTL, "stage-ttl", 0, "how long the run's stage seeds (fork), own function (--seed-per-run) and Redis keys (storage) outlive this command if it is killed midway: it renews them every third of it while it runs (default 2m)")
	run.Flags().BoolVar(&f.jsonOut, "json", false, "print the run record as JSON")
	run.Flags().BoolVar(&f.perRun, "seed-per-run", false, "fork: start a runtime for the run whose initialization runs the sources, instead of keeping an instance of the workflow's function as the run's stage seed (see BENCHMARKS.md)")

	validate := &cobra.Command{
		Use:   "validate SPEC.json",
		Short: "Check a workflow definition",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := workflow.ReadSpec(args[0])
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "workflow %s: %d steps, module %s/%s.py, transfer %s\n", s.Name, len(s.Steps), s.Dir, s.Module, s.Transfer)
			if s.Joins() {
				fmt.Fprintln(w, "a step joins two kept steps: under fork the kept steps run in one lineage, each forked from the one kept before it")
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "STEP\tCALL\tAFTER\tMAP OVER\tFORKS FROM (fork)\tRESULT")
			for _, st := range s.Steps {
				from, result := "-", "JSON"
				if len(st.After) > 0 {
					if from = s.Parent(st.Name); from == "" {
						from = "the run's seed"
					}
				}
				switch {
				case len(st.After) == 0:
					result = "in the run's seed (storage: Redis)"
				case s.Kept(st.Name):
					result = "kept: a stage seed (storage: Redis)"
				case st.Map != "":
					result = "JSON list, one per item"
				}
				mapOver := orDash(st.Map)
				if st.MaxConcurrency > 0 {
					mapOver += fmt.Sprintf(" (%d at once)", st.MaxConcurrency)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", st.Name, st.Call, orDash(strings.Join(st.After, ",")), mapOver, from, result)
			}
			return tw.Flush()
		},
	}
	ls := &cobra.Command{
		Use:   "ls [RUN]",
		Short: "List recorded runs, newest first, or show one run's steps",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			runs, err := loadRuns(f.runsDir)
			if err != nil {
				return err
			}
			if len(args) == 1 {
				for _, r := range runs {
					if r.ID == args[0] {
						showRun(cmd, r, f.jsonOut)
						return nil
					}
				}
				return fmt.Errorf("no run %q recorded in %s (mitosis workflow ls lists them)", args[0], f.runsDir)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "RUN\tTRANSFER\tSTARTED\tMS\tSTEPS (NAME=MS@START MS)\tERROR")
			for _, r := range runs {
				var st []string
				for _, s := range r.Steps {
					st = append(st, fmt.Sprintf("%s=%.0f@%.0f", s.Name, s.MS, s.AtMS))
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%.0f\t%s\t%s\n", r.ID, r.Transfer, r.Started.Format(time.RFC3339), r.MS, strings.Join(st, " "), r.Error)
			}
			return tw.Flush()
		},
	}
	deploy := &cobra.Command{
		Use:   "deploy SPEC.json",
		Short: "Deploy a workflow's function now (run does it when needed)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec, rn, err := f.specRunner(args[0])
			if err != nil {
				return err
			}
			deployed, err := rn.Deploy(cmd.Context(), spec)
			if err != nil {
				return err
			}
			what := "deployed"
			if !deployed {
				what = "already deployed, unchanged"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "workflow %s: function %s %s\n", spec.Name, workflow.FunctionName(spec), what)
			return nil
		},
	}
	deploy.Flags().StringVar(&f.redis, "redis-socket", "", "unix socket of the Redis server for --transfer storage (every node must reach it)")
	deploy.Flags().DurationVar(&f.timeout, "step-timeout", 5*time.Minute, "bound on one step instance")
	rm := &cobra.Command{
		Use:   "rm SPEC.json",
		Short: "Remove a workflow's function (its seed and instances on every node)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec, rn, err := f.specRunner(args[0])
			if err != nil {
				return err
			}
			return rn.Remove(cmd.Context(), spec)
		},
	}
	ls.Flags().BoolVar(&f.jsonOut, "json", false, "with RUN: print its record as JSON")
	wf.AddCommand(run, deploy, rm, validate, ls)
	return wf
}

// runner is the workflow runner the flags describe, with its credentials.
func (f *workflowFlags) runner() (*workflow.Runner, error) {
	if f.timeout < 0 || f.stageTTL < 0 {
		return nil, fmt.Errorf("--step-timeout %v, --stage-ttl %v: want positive durations", f.timeout, f.stageTTL)
	}
	if !filepath.IsAbs(f.workDir) {
		return nil, fmt.Errorf("--work-dir %q: want an absolute path (every node must see it at that path)", f.workDir)
	}
	rn := &workflow.Runner{Gateway: strings.TrimRight(f.gateway, "/"), RedisSocket: f.redis, WorkDir: f.workDir, Timeout: f.timeout, StageTTL: f.stageTTL, SeedPerRun: f.perRun}
	if err := f.auth(rn); err != nil {
		return nil, err
	}
	return rn, nil
}

// specRunner reads the definition at path and makes the runner.
func (f *workflowFlags) specRunner(path string) (*workflow.Spec, *workflow.Runner, error) {
	spec, err := workflow.ReadSpec(path)
	if err != nil {
		return nil, nil, err
	}
	rn, err := f.runner()
	if err != nil {
		return nil, nil, err
	}
	return spec, rn, nil
}

func (f *workflowFlags) auth(rn *workflow.Runner) error {
	if f.tokenFile != "" {
		b, err := os.ReadFile(f.tokenFile)
		if err != nil {
			return fmt.Errorf("--token-file: %w", err)
		}
		rn.Token = strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0])
		if rn.Token == "" {
			return fmt.Errorf("--token-file %s is empty", f.tokenFile)
		}
		return nil
	}
	if f.passwordFile != "" {
		b, err := os.ReadFile(f.passwordFile)
		if err != nil {
			return fmt.Errorf("--password-file: %w", err)
		}
		rn.User, rn.Password = f.user, strings.TrimSpace(string(b))
	}
	return nil
}

// showRun prints a run record: as JSON, or as printRun's table.
func showRun(cmd *cobra.Command, r *workflow.Run, asJSON bool) {
	if asJSON {
		b, _ := json.MarshalIndent(r, "", "  ")
		fmt.Fprintln(cmd.OutOrStdout(), string(b))
		return
	}
	printRun(cmd, r)
}

func printRun(cmd *cobra.Command, r *workflow.Run) {
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "run %s (%s): %.1f ms end to end, deploy %.1f ms\n", r.ID, r.Transfer, r.MS, r.DeployMS)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STEP\tINSTANCES\tNODES\tAT MS\tMS\tTRANSFER MS\tERROR")
	for _, s := range r.Steps {
		n := len(s.Instances)
		where := strings.Join(s.Nodes, ",")
		switch {
		case s.InInit:
			n, where = 1, "(stage seed) "+where
		case s.Kept && r.Transfer == workflow.TransferFork:
			where = "(stage seed) " + where
		case s.Kept:
			where = "(stored) " + where
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%.1f\t%.1f\t%.1f\t%s\n", s.Name, n, where, s.AtMS, s.MS, s.TransferMS(), s.Error)
	}
	tw.Flush()
	if len(r.Result) > 0 {
		res := string(r.Result)
		if len(res) > 400 {
			res = res[:400] + "…"
		}
		fmt.Fprintf(w, "result: %s\n", res)
	}
	if r.Error != "" {
		fmt.Fprintf(w, "error: %s\n", r.Error)
	}
}

func saveRun(dir string, r *workflow.Run) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, r.ID+".json"), b, 0o600)
}

func loadRuns(dir string) ([]*workflow.Run, error) {
	ents, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var runs []*workflow.Run
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, err
		}
		var r workflow.Run
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("%s: %w", e.Name(), err)
		}
		runs = append(runs, &r)
	}
	sort.Slice(runs, func(i, j int) bool { return runs[i].Started.After(runs[j].Started) })
	return runs, nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
