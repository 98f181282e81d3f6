// Command mitosis-trace generates, inspects and replays invocation traces
// in the Azure Functions 2019 format (invocations_per_function_md.anon.dNN.csv).
//
//	mitosis-trace gen --spikes 3 --spike-size 100 > spiky.csv
//	mitosis-trace stats invocations_per_function_md.anon.d01.csv
//	mitosis-trace replay --url http://127.0.0.1:8080/function/hello --user admin:secret spiky.csv
package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mitosis-fork/mitosis/trace"
)

func main() {
	root := &cobra.Command{
		Use:           "mitosis-trace",
		Short:         "Generate, inspect and replay Azure Functions 2019 invocation traces",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(genCmd(), statsCmd(), replayCmd())
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "mitosis-trace:", err)
		os.Exit(1)
	}
}

func genCmd() *cobra.Command {
	var c trace.SpikeConfig
	var out string
	cmd := &cobra.Command{
		Use:   "gen",
		Short: "Write a synthetic spiky function in the trace format",
		Long: `gen writes one HTTP-triggered function: Poisson invocations at --base-rate per
minute, and --spikes minutes of --spike-size invocations, --gap minutes apart
from --first-spike (the shape the MITOSIS paper replays). The same flags
always write the same trace.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			w := cmd.OutOrStdout()
			if out != "" {
				f, err := os.Create(out)
				if err != nil {
					return err
				}
				defer f.Close()
				w = f
			}
			if err := trace.Write(w, []trace.Function{trace.GenerateSpiky(c)}); err != nil {
				return err
			}
			if f, ok := w.(*os.File); ok && out != "" {
				return f.Close()
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&c.Minutes, "minutes", 45, "trace length in minutes")
	f.Float64Var(&c.BaseRate, "base-rate", 6, "mean invocations per minute outside spikes")
	f.IntVar(&c.Spikes, "spikes", 3, "number of spike minutes")
	f.IntVar(&c.SpikeSize, "spike-size", 100, "invocations in a spike minute")
	f.IntVar(&c.FirstSpike, "first-spike", 3, "minute (from 0) of the first spike")
	f.IntVar(&c.Gap, "gap", 15, "minutes between spikes")
	f.Int64Var(&c.Seed, "seed", 0, "random seed")
	f.StringVarP(&out, "output", "o", "", "write to this file instead of stdout")
	return cmd
}

func statsCmd() *cobra.Command {
	var top int
	cmd := &cobra.Command{
		Use:   "stats FILE",
		Short: "Summarize the functions of a trace file",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			fns, err := trace.ReadFile(args[0])
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ROW\tFUNCTION\tTRIGGER\tMINUTES\tTOTAL\tPEAK/MIN\tPEAK AT")
			for i, fn := range fns {
				if top > 0 && i >= top {
					fmt.Fprintf(tw, "…\t%d more\t\t\t\t\t\n", len(fns)-top)
					break
				}
				m, c := fn.Peak()
				fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%d\t%d\t%d\n", i, short(fn.Function), fn.Trigger, len(fn.Counts), fn.Total(), c, m)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().IntVar(&top, "top", 50, "show only the first N rows (0: all)")
	return cmd
}

func short(h string) string {
	if len(h) > 16 {
		return h[:16]
	}
	return h
}

func replayCmd() *cobra.Command {
	var (
		url, user, token, body, spreadName, fnKey string
		row, maxInFlight, minutes                 int
		compression, burstSec                     float64
		seed                                      int64
		timeout                                   time.Duration
	)
	cmd := &cobra.Command{
		Use:   "replay FILE",
		Short: "POST a trace's invocations to an HTTP endpoint and report latencies",
		Long: `replay fires one function's invocations (--row, or --function HASH) at --url,
each trace minute lasting 60s/--compression, and prints latency percentiles.
The endpoint is any HTTP function endpoint: a mitosis or OpenFaaS gateway's
/function/NAME.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if url == "" {
				return fmt.Errorf("--url is required (e.g. http://127.0.0.1:8080/function/NAME)")
			}
			if compression <= 0 {
				return fmt.Errorf("--compression %g: must be > 0", compression)
			}
			spread, err := trace.ParseSpread(spreadName)
			if err != nil {
				return err
			}
			fns, err := trace.ReadFile(args[0])
			if err != nil {
				return err
			}
			var fn trace.Function
			if fnKey != "" {
				if fn, err = trace.Find(fns, fnKey); err != nil {
					return err
				}
			} else {
				if row < 0 || row >= len(fns) {
					return fmt.Errorf("--row %d: the trace has %d functions (rows 0..%d)", row, len(fns), len(fns)-1)
				}
				fn = fns[row]
			}
			if minutes > 0 && minutes < len(fn.Counts) {
				fn.Counts = fn.Counts[:minutes]
			}
			minute := time.Duration(float64(time.Minute) / compression)
			burst := time.Duration(burstSec * float64(time.Second) / compression)
			arrivals := trace.Schedule(fn.Counts, minute, spread, burst, seed)
			fmt.Fprintf(cmd.ErrOrStderr(), "replaying %d invocations of %s over %s\n", len(arrivals), short(fn.Function), time.Duration(len(fn.Counts))*minute)
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			client := &http.Client{Timeout: timeout, Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
			codes := make([]int, len(arrivals))
			rs := trace.Replay(ctx, arrivals, maxInFlight, func(ctx context.Context, i int) error {
				code, err := post(ctx, client, url, user, token, body)
				codes[i] = code
				if err == nil && code/100 != 2 {
					err = fmt.Errorf("HTTP %d", code)
				}
				return err
			})
			s := trace.Summarize(rs)
			byCode := map[int]int{}
			for _, c := range codes {
				byCode[c]++
			}
			fmt.Fprintf(cmd.OutOrStdout(), "invocations %d  errors %d  p50 %s  p99 %s  max %s  max lateness %s  status %v\n",
				s.N, s.Errors, s.P50.Round(time.Microsecond), s.P99.Round(time.Microsecond), s.Max.Round(time.Microsecond),
				s.MaxLateness.Round(time.Microsecond), byCode)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&url, "url", "", "POST each invocation here (required)")
	f.StringVar(&user, "user", "", "basic auth USER:PASSWORD")
	f.StringVar(&token, "token", "", "bearer token")
	f.StringVar(&body, "body", "", "request body")
	f.IntVar(&row, "row", 0, "the function to replay: its row, from 0")
	f.StringVar(&fnKey, "function", "", "the function to replay: its HashFunction or a unique prefix")
	f.IntVar(&minutes, "minutes", 0, "replay only the first N minutes (0: all)")
	f.Float64Var(&compression, "compression", 60, "time compression: a trace minute lasts 60s/N")
	f.StringVar(&spreadName, "spread", "uniform", "placement inside a minute: uniform, poisson, burst, or spiky (burst the spike minutes only)")
	f.Float64Var(&burstSec, "burst", 5, "with --spread burst or spiky: fire each (spike) minute's invocations within its first N trace-seconds")
	f.IntVar(&maxInFlight, "max-in-flight", 0, "at most N requests at once (0: no limit)")
	f.Int64Var(&seed, "seed", 0, "random seed of the arrival times")
	f.DurationVar(&timeout, "timeout", time.Minute, "per-request timeout")
	return cmd
}

func post(ctx context.Context, c *http.Client, url, user, token, body string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewBufferString(body))
	if err != nil {
		return 0, err
	}
	if u, p, ok := strings.Cut(user, ":"); ok {
		req.SetBasicAuth(u, p)
	} else if user != "" {
		return 0, fmt.Errorf("--user %q: want USER:PASSWORD", user)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}
