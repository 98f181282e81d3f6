package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"time"

	"github.com/mitosis-fork/mitosis/directory"
	"github.com/mitosis-fork/mitosis/node"
)

// LogMessage is one line of GET /system/logs, the OpenFaaS log provider
// API (faas-cli logs): newline-delimited JSON. Instance is the node whose
// instances wrote the line. A node's log lines carry no time of their
// own: Timestamp is when the log was last written for the lines of a
// tail, and when the gateway read them for the lines of a follow.
type LogMessage struct {
	Name      string    `json:"name"`
	Namespace string    `json:"namespace"`
	Instance  string    `json:"instance"`
	Timestamp time.Time `json:"timestamp"`
	Text      string    `json:"text"`
}

// logPoll is how often a follow asks the nodes for new lines.
const logPoll = 500 * time.Millisecond

// maxFollows bounds the follows streaming at once; more get 429.
const maxFollows = 64

// logs serves GET /system/logs?name=F[&tail=N][&follow=true][&since=T][&instance=NODE]:
// the function's log on every node (or one), its last tail lines per node
// (all, up to node.MaxLogRead bytes a node, when tail <= 0 or absent), then, with
// follow, the lines written since, as they come, until the client goes.
// since (RFC 3339) leaves out the nodes whose log was last written before
// it (lines have no time of their own).
func (g *Gateway) logs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	name := q.Get("name")
	if name == "" {
		httpError(w, http.StatusBadRequest, "logs: the name query parameter (the function) is required")
		return
	}
	if _, ok := g.function(name); !ok {
		httpError(w, http.StatusNotFound, fmt.Sprintf("function %q not found", name))
		return
	}
	tail, follow := 0, false
	var since time.Time
	var err error
	if s := q.Get("tail"); s != "" {
		if tail, err = strconv.Atoi(s); err != nil {
			httpError(w, http.StatusBadRequest, fmt.Sprintf("logs: tail %q is not a number", s))
			return
		}
	}
	if s := q.Get("follow"); s != "" {
		if follow, err = strconv.ParseBool(s); err != nil {
			httpError(w, http.StatusBadRequest, fmt.Sprintf("logs: follow %q is not true or false", s))
			return
		}
	}
	if s := q.Get("since"); s != "" {
		if since, err = time.Parse(time.RFC3339, s); err != nil {
			httpError(w, http.StatusBadRequest, fmt.Sprintf("logs: since %q is not an RFC 3339 time", s))
			return
		}
	}
	if follow {
		select {
		case g.follows <- struct{}{}:
			defer func() { <-g.follows }()
		default:
			w.Header().Set("Retry-After", "5")
			httpError(w, http.StatusTooManyRequests, fmt.Sprintf("logs: %d follows are streaming already; ask without follow, or later", maxFollows))
			return
		}
	}
	instance := q.Get("instance")
	nodes := func() []directory.NodeInfo {
		var out []directory.NodeInfo
		for _, n := range g.view.Nodes() {
			if instance == "" || n.Name == instance {
				out = append(out, n)
			}
		}
		sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
		return out
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	flush := func() {
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
	ctx := r.Context()
	next := map[string]int64{}
	for _, rep := range g.readLogs(ctx, nodes(), node.LogsRequest{Name: name, Tail: tail, From: -1}, nil) {
		next[rep.node] = rep.Next
		if rep.Modified.Before(since) {
			continue
		}
		for _, l := range rep.Lines {
			if enc.Encode(LogMessage{Name: name, Namespace: Namespace, Instance: rep.node, Timestamp: rep.Modified, Text: l}) != nil {
				return
			}
		}
	}
	flush()
	if !follow {
		return
	}
	t := time.NewTicker(logPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.ctx.Done(): // the gateway is shutting down
			return
		case <-t.C:
		}
		if _, ok := g.function(name); !ok {
			return // removed: nothing more will come
		}
		now := time.Now().UTC()
		for _, rep := range g.readLogs(ctx, nodes(), node.LogsRequest{Name: name, Tail: 0, From: 0}, next) {
			next[rep.node] = rep.Next
			for _, l := range rep.Lines {
				if enc.Encode(LogMessage{Name: name, Namespace: Namespace, Instance: rep.node, Timestamp: now, Text: l}) != nil {
					return
				}
			}
		}
		flush()
	}
}

// nodeLog is one node's answer to a logs call.
type nodeLog struct {
	node.LogsReply
	node string
}

// readLogs asks every node in ns for req, each from its own offset in from
// (a node not in from, new to a follow, is asked for its end: nothing of
// what it wrote before joins the stream), and returns the answers of the
// nodes that have the function's log, by node name. A node that cannot be
// reached or has no log is left out.
func (g *Gateway) readLogs(ctx context.Context, ns []directory.NodeInfo, req node.LogsRequest, from map[string]int64) []nodeLog {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	bodies, atEnd := map[string][]byte{}, map[string]bool{}
	for _, n := range ns {
		r := req
		if from != nil {
			off, ok := from[n.Name]
			if !ok {
				// Its end, the reply's Next: one line, dropped.
				off, r.Tail, atEnd[n.Name] = -1, 1, true
			}
			r.From = off
		}
		bodies[n.Name], _ = json.Marshal(r)
	}
	var got []nodeLog
	for _, a := range g.callNodes(ctx, ns, node.CallFnLogs, 5*time.Second, func(n directory.NodeInfo) []byte { return bodies[n.Name] }) {
		var rep node.LogsReply
		if a.err != nil || json.Unmarshal(a.body, &rep) != nil {
			continue
		}
		if atEnd[a.node] {
			rep.Lines = nil
		}
		got = append(got, nodeLog{LogsReply: rep, node: a.node})
	}
	return got
}
