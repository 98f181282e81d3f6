// Package function is the mitosis function runtime: what a function is (a
// Spec: a directory with handler.py, or an OCI image layout holding one),
// the Python bootstrap that runs it (the OpenFaaS classic python3
// contract: module-level code is the initialization, handle(req) -> str
// serves one request), and the line protocol between a node daemon and a
// function process.
//
// A function runs in one of two modes. As a seed it initializes once and is
// prepared into a mitosis seed; every invocation is then a child forked
// from it, which handles one request and exits. As a server (the
// keep-alive and cold baselines) it initializes and then serves requests
// one at a time over a socket.
package function

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Policy says how a function's invocations get an instance.
type Policy string

// Policies, selectable per function so they compare on one platform.
const (
	// PolicyFork: one seed for the whole cluster; every invocation is a
	// child forked from it on the node that runs it (remote fork, node page
	// cache, working-set prefetch). The MITOSIS way.
	PolicyFork Policy = "fork"
	// PolicyLocalFork: one seed per node; invocations fork from the seed
	// of their node (SOCK/Catalyzer style).
	PolicyLocalFork Policy = "local-fork"
	// PolicyKeepAlive: warm instances kept for a TTL after each use; an
	// invocation with no idle instance on its node cold-starts one.
	PolicyKeepAlive Policy = "keep-alive"
	// PolicyCold: a new process per invocation.
	PolicyCold Policy = "cold"
)

// Policies lists every policy, in the order reports show them.
var Policies = []Policy{PolicyFork, PolicyLocalFork, PolicyKeepAlive, PolicyCold}

// ParsePolicy checks a policy name ("" means PolicyFork).
func ParsePolicy(s string) (Policy, error) {
	if s == "" {
		return PolicyFork, nil
	}
	for _, p := range Policies {
		if string(p) == s {
			return p, nil
		}
	}
	return "", fmt.Errorf("unknown policy %q (want fork, local-fork, keep-alive or cold)", s)
}

// Seeded reports whether the policy runs invocations as forks of a seed.
func (p Policy) Seeded() bool { return p == PolicyFork || p == PolicyLocalFork }

// Defaults.
const (
	// DefaultTimeout bounds one invocation (the OpenFaaS exec_timeout).
	DefaultTimeout = 30 * time.Second
	// DefaultKeepAlive is how long an idle warm instance is kept (10
	// minutes, like common platforms).
	DefaultKeepAlive = 10 * time.Minute
	// DefaultInitTimeout bounds a function's initialization.
	DefaultInitTimeout = 120 * time.Second
	// RuntimePython is the only runtime so far.
	RuntimePython = "python3"
)

// Spec is a deployed function.
type Spec struct {
	// Name is the function's name: lower-case letters, digits and '-',
	// starting with a letter, at most 63 bytes (a DNS label).
	Name string `json:"name"`
	// Image is an absolute path on every node: a function directory with
	// handler.py (or function/handler.py), run with the node's python3;
	// or an OCI image layout whose root filesystem holds python3 and the
	// function at FunctionDir.
	Image string `json:"image"`
	// FunctionDir is the function's directory inside an OCI image
	// (default /home/app, the OpenFaaS python3 template's).
	FunctionDir string `json:"function_dir,omitempty"`
	// Runtime is "python3" (the default).
	Runtime string `json:"runtime,omitempty"`
	// Env is the function process's extra environment.
	Env map[string]string `json:"env,omitempty"`
	// MemoryBytes caps each instance's memory (a cgroup per instance;
	// 0: no limit).
	MemoryBytes int64 `json:"memory_bytes,omitempty"`
	// CPUs caps each instance's CPU bandwidth (0: no limit).
	CPUs float64 `json:"cpus,omitempty"`
	// Policy is how invocations get an instance.
	Policy Policy `json:"policy"`
	// Timeout bounds one invocation.
	Timeout Duration `json:"timeout,omitempty"`
	// KeepAlive is the idle TTL of warm instances (keep-alive policy).
	KeepAlive Duration `json:"keep_alive,omitempty"`
	// Labels and Annotations are the deployer's metadata, kept as given.
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	// Generation increases with every update of the function; instances
	// and seeds of an older generation are replaced.
	Generation int64 `json:"generation"`
}

// Duration is a time.Duration that encodes as a Go duration string.
type Duration time.Duration

// MarshalJSON encodes d as "1m30s".
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON accepts a Go duration string or a number of seconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := ParseDuration(s)
		if err != nil {
			return err
		}
		*d = Duration(v)
		return nil
	}
	var f float64
	if err := json.Unmarshal(b, &f); err != nil {
		return fmt.Errorf("duration: want a string like \"30s\" or a number of seconds, got %s", b)
	}
	*d = Duration(f * float64(time.Second))
	return nil
}

// ParseDuration parses a Go duration ("30s") or a bare number of seconds
// ("30"), as OpenFaaS timeouts are written.
func ParseDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		if f < 0 {
			return 0, fmt.Errorf("duration %q is negative", s)
		}
		return time.Duration(f * float64(time.Second)), nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("duration %q: want e.g. \"30s\", \"10m\" or seconds", s)
	}
	if v < 0 {
		return 0, fmt.Errorf("duration %q is negative", s)
	}
	return v, nil
}

var nameRE = regexp.MustCompile(`^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$`)

// CheckName validates a function name.
func CheckName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("function name %q: use 1-63 lower-case letters, digits and '-', starting with a letter and not ending with '-'", name)
	}
	return nil
}

// ExecTimeout is the invocation bound: Timeout, else DefaultTimeout.
func (s *Spec) ExecTimeout() time.Duration {
	if s.Timeout > 0 {
		return time.Duration(s.Timeout)
	}
	return DefaultTimeout
}

// KeepAliveTTL is the idle TTL of warm instances.
func (s *Spec) KeepAliveTTL() time.Duration {
	if s.KeepAlive > 0 {
		return time.Duration(s.KeepAlive)
	}
	return DefaultKeepAlive
}

// IsOCI reports whether Image is an OCI image layout (it has an
// oci-layout file) rather than a function directory.
func (s *Spec) IsOCI() bool {
	_, err := os.Stat(filepath.Join(s.Image, "oci-layout"))
	return err == nil
}

// Validate checks a spec and fills in defaults. It checks the image on
// this host: call it where the function will run.
func (s *Spec) Validate() error {
	if err := CheckName(s.Name); err != nil {
		return err
	}
	if s.Runtime == "" {
		s.Runtime = RuntimePython
	}
	if s.Runtime != RuntimePython {
		return fmt.Errorf("function %s: runtime %q is not supported (only %q: a handler.py with handle(req))", s.Name, s.Runtime, RuntimePython)
	}
	if s.Policy == "" {
		s.Policy = PolicyFork
	}
	if _, err := ParsePolicy(string(s.Policy)); err != nil {
		return fmt.Errorf("function %s: %w", s.Name, err)
	}
	if !filepath.IsAbs(s.Image) {
		return fmt.Errorf("function %s: image %q must be an absolute path to a function directory or an OCI image layout", s.Name, s.Image)
	}
	st, err := os.Stat(s.Image)
	if err != nil || !st.IsDir() {
		return fmt.Errorf("function %s: image %s: not a directory on this node (%v)", s.Name, s.Image, err)
	}
	if s.IsOCI() {
		if s.FunctionDir == "" {
			s.FunctionDir = "/home/app"
		}
		if !filepath.IsAbs(s.FunctionDir) {
			return fmt.Errorf("function %s: function_dir %q must be absolute inside the image", s.Name, s.FunctionDir)
		}
	} else if HandlerPath(s.Image) == "" {
		return fmt.Errorf("function %s: %s has no handler.py (nor function/handler.py)", s.Name, s.Image)
	}
	if s.MemoryBytes < 0 || s.CPUs < 0 {
		return fmt.Errorf("function %s: negative limits", s.Name)
	}
	for k := range s.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return fmt.Errorf("function %s: bad environment variable name %q", s.Name, k)
		}
	}
	return nil
}

// HandlerPath returns the handler.py of a function directory, or "".
func HandlerPath(dir string) string {
	for _, p := range []string{filepath.Join(dir, "handler.py"), filepath.Join(dir, "function", "handler.py")} {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p
		}
	}
	return ""
}

// Environ is the function process's environment: a minimal base, then
// Spec.Env in a stable order.
func (s *Spec) Environ(extra ...string) []string {
	env := []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/tmp", "LANG=C.UTF-8", "PYTHONDONTWRITEBYTECODE=1",
		// One BLAS/OpenMP thread unless the function asks for more:
		// every extra thread of a seed adds to each child's start
		// (BENCHMARKS.md, multi-threaded parents), and every policy
		// runs the same way.
		"OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"}
	// The function's own values win over the base (getenv takes the
	// first match, so the base entries they override are left out).
	base := env[:0]
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if _, over := s.Env[k]; !over {
			base = append(base, kv)
		}
	}
	env = base
	keys := make([]string, 0, len(s.Env))
	for k := range s.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, k+"="+s.Env[k])
	}
	return append(env, extra...)
}

// ErrInit is wrapped by errors from a function's initialization.
var ErrInit = errors.New("function initialization failed")
