package function

import (
	"encoding/json"
	"errors"
	"fmt"
)

// Status is the line a function process sends when its initialization
// ends.
type Status struct {
	Ready  bool    `json:"ready"`
	InitMS float64 `json:"init_ms,omitempty"`
	// Error is the last line of the Python traceback when Ready is false.
	Error     string `json:"error,omitempty"`
	Traceback string `json:"traceback,omitempty"`
}

// Request is one invocation as the function process sees it. Body is the
// raw request body (base64 on the wire).
type Request struct {
	Body    []byte            `json:"body,omitempty"`
	Method  string            `json:"method,omitempty"`
	Path    string            `json:"path,omitempty"`
	Query   string            `json:"query,omitempty"`
	Headers map[string]string `json:"headers,omitempty"`
	// Stage asks the node to keep the instance as a seed of the function
	// once its handler has answered with status 200: a stage seed, which
	// later invocations name to fork from (a workflow step's downstream
	// steps inherit its memory). The node names the seed in SeedName; the
	// instance replies first, then prepares itself under that name.
	Stage    bool   `json:"stage,omitempty"`
	SeedName string `json:"seed_name,omitempty"`
	// StageLease says the gateway records the stage seed under a lease in
	// the cluster directory (a stage with a TTL): the node holding the
	// seed removes it when the lease goes, or when none appears soon after
	// the seed is made (the gateway failed in between).
	StageLease bool `json:"stage_lease,omitempty"`
	// Socket is the API socket of the node running the instance, where a
	// stage prepares itself (the environment it inherited names the seed
	// node's, which may be another).
	Socket string `json:"socket,omitempty"`
}

// Reply is a function process's answer to one Request. Status 200 carries
// Body; status 500 carries Error, the last line of the handler's
// traceback.
type Reply struct {
	Status      int    `json:"status"`
	Body        []byte `json:"body,omitempty"`
	ContentType string `json:"content_type,omitempty"`
	Error       string `json:"error,omitempty"`
	Traceback   string `json:"traceback,omitempty"`
}

// MaxLine bounds one line of the protocol (a request or reply with its
// base64 body).
const MaxLine = 64 << 20

// DecodeStatus parses a status line.
func DecodeStatus(line []byte) (Status, error) {
	var s Status
	if err := json.Unmarshal(line, &s); err != nil {
		return Status{}, fmt.Errorf("malformed status line from the function process: %w", err)
	}
	if !s.Ready && s.Error == "" {
		return Status{}, errors.New("function process reported failure without an error")
	}
	return s, nil
}

// DecodeReply parses a reply line and checks it.
func DecodeReply(line []byte) (Reply, error) {
	var r Reply
	if err := json.Unmarshal(line, &r); err != nil {
		return Reply{}, fmt.Errorf("malformed reply from the function process: %w", err)
	}
	if r.Status < 100 || r.Status > 599 {
		return Reply{}, fmt.Errorf("malformed reply from the function process: status %d", r.Status)
	}
	return r, nil
}
