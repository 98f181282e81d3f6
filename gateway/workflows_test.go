package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/workflow"
)

// TestInProcess checks the transport of the workflows the gateway runs: a
// request reaches the handler as a server request would (a body, even
// none; the path's values; the caller's headers and context), and the
// handler's status, headers and body come back.
func TestInProcess(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /echo/{name}", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Name", r.PathValue("name"))
		w.WriteHeader(http.StatusAccepted)
		_, _ = io.WriteString(w, r.Header.Get("Authorization")+"|"+string(b))
	})
	mux.HandleFunc("GET /plain", func(w http.ResponseWriter, r *http.Request) {
		if r.Body == nil {
			panic("nil body") // a server request always has one
		}
		_, _ = io.WriteString(w, "ok "+r.RequestURI)
	})
	mux.HandleFunc("GET /wait", func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done()
		httpError(w, http.StatusServiceUnavailable, "canceled")
	})
	c := &http.Client{Transport: inProcess{mux}}
	for _, tt := range []struct {
		method, path, body, auth string
		code                     int
		header, want             string
	}{
		{"POST", "/echo/wf", "input", "Bearer t", 202, "wf", "Bearer t|input"},
		{"GET", "/plain?x=1", "", "", 200, "", "ok /plain?x=1"},
		{"GET", "/nosuch", "", "", 404, "", "404 page not found\n"},
		{"DELETE", "/echo/wf", "", "", 405, "", "Method Not Allowed\n"},
	} {
		var body io.Reader
		if tt.body != "" {
			body = strings.NewReader(tt.body)
		}
		req, err := http.NewRequest(tt.method, "http://gateway.in-process"+tt.path, body)
		if err != nil {
			t.Fatal(err)
		}
		if tt.auth != "" {
			req.Header.Set("Authorization", tt.auth)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", tt.method, tt.path, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.code || resp.Header.Get("X-Name") != tt.header || string(b) != tt.want {
			t.Errorf("%s %s: %d %q %q, want %d %q %q", tt.method, tt.path, resp.StatusCode, resp.Header.Get("X-Name"), b, tt.code, tt.header, tt.want)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://gateway.in-process/wait", nil)
	if resp, err := c.Do(req); err == nil {
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("a canceled request: %d %s", resp.StatusCode, b)
		}
	} else if !errors.Is(err, context.Canceled) {
		t.Errorf("a canceled request: %v", err)
	}
}

// TestWorkflowRuns checks the records a gateway keeps: runs in the
// background first, then ended ones newest first, at most keptRuns of them,
// a failed run marked so.
func TestWorkflowRuns(t *testing.T) {
	var w wfRuns
	if !w.start("bg", "wf", nil) || w.start("bg", "wf", nil) {
		t.Fatal("a call id running twice")
	}
	if !w.start("gone", "wf", nil) {
		t.Fatal("start gone")
	}
	w.forget("gone")
	// A run in the background is cancelled by its call id, with
	// errRunCancelled, until it ends.
	ctx, cancel := context.WithCancelCause(context.Background())
	if !w.start("cx", "wf", cancel) || w.cancel("nope") || !w.cancel("cx") || !errors.Is(context.Cause(ctx), errRunCancelled) {
		t.Fatalf("cancel of a run in the background: cause %v", context.Cause(ctx))
	}
	w.forget("cx")
	if w.cancel("cx") {
		t.Error("a forgotten run cancelled")
	}
	for i := 0; i < keptRuns+10; i++ {
		run := &workflow.Run{ID: fmt.Sprintf("wf-%d", i), Started: time.Unix(int64(i), 0)}
		if i%2 == 1 {
			run.Error = "step s: ValueError"
		}
		w.end("", "wf", run, false)
	}
	w.end("lost", "wf", nil, false) // a run that never started
	got := w.list()
	if len(got) != 1+keptRuns {
		t.Fatalf("%d records, want %d", len(got), 1+keptRuns)
	}
	if got[0].CallID != "bg" || got[0].Status != "running" || got[0].Run != nil {
		t.Errorf("first record %+v, want the run in the background", got[0])
	}
	if got[1].CallID != "lost" || got[1].Status != "failed" {
		t.Errorf("second record %+v, want the run that never started, failed", got[1])
	}
	for i, r := range got[2:] {
		n := keptRuns + 10 - 1 - i
		want := "succeeded"
		if n%2 == 1 {
			want = "failed"
		}
		if r.Run == nil || r.Run.ID != fmt.Sprintf("wf-%d", n) || r.Status != want {
			t.Fatalf("record %d: %+v, want run wf-%d %s", i+2, r, n, want)
		}
	}
	w.end("bg", "wf", &workflow.Run{ID: "wf-bg"}, false)
	if got := w.list(); got[0].CallID != "bg" || got[0].Status != "succeeded" || len(got) != keptRuns {
		t.Errorf("after the background run ended: %d records, first %+v", len(got), got[0])
	}
}
