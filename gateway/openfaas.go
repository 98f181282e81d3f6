package gateway

import (
	"encoding/json"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/mitosis-fork/mitosis/function"
	"github.com/mitosis-fork/mitosis/gateway/gwapi"
)

// The OpenFaaS REST API's types (github.com/openfaas/faas-provider/types),
// written out here: the OpenFaaS Go SDKs are not a dependency.

// FunctionDeployment is the body of POST and PUT /system/functions.
type FunctionDeployment struct {
	Service                string             `json:"service"`
	Image                  string             `json:"image"`
	Namespace              string             `json:"namespace,omitempty"`
	EnvProcess             string             `json:"envProcess,omitempty"`
	EnvVars                map[string]string  `json:"envVars,omitempty"`
	Constraints            []string           `json:"constraints,omitempty"`
	Secrets                []string           `json:"secrets,omitempty"`
	Labels                 *map[string]string `json:"labels,omitempty"`
	Annotations            *map[string]string `json:"annotations,omitempty"`
	Limits                 *FunctionResources `json:"limits,omitempty"`
	Requests               *FunctionResources `json:"requests,omitempty"`
	ReadOnlyRootFilesystem bool               `json:"readOnlyRootFilesystem,omitempty"`
}

// FunctionResources are memory and CPU quantities (Kubernetes notation:
// "128Mi", "1G", "500m").
type FunctionResources struct {
	Memory string `json:"memory,omitempty"`
	CPU    string `json:"cpu,omitempty"`
}

// FunctionStatus is an element of GET /system/functions and the body of
// GET /system/function/NAME.
type FunctionStatus struct {
	Name                   string             `json:"name"`
	Image                  string             `json:"image"`
	Namespace              string             `json:"namespace,omitempty"`
	EnvProcess             string             `json:"envProcess,omitempty"`
	EnvVars                map[string]string  `json:"envVars,omitempty"`
	Constraints            []string           `json:"constraints,omitempty"`
	Secrets                []string           `json:"secrets,omitempty"`
	Labels                 *map[string]string `json:"labels,omitempty"`
	Annotations            *map[string]string `json:"annotations,omitempty"`
	Limits                 *FunctionResources `json:"limits,omitempty"`
	Requests               *FunctionResources `json:"requests,omitempty"`
	ReadOnlyRootFilesystem bool               `json:"readOnlyRootFilesystem,omitempty"`
	InvocationCount        float64            `json:"invocationCount"`
	Replicas               uint64             `json:"replicas"`
	AvailableReplicas      uint64             `json:"availableReplicas"`
	CreatedAt              time.Time          `json:"createdAt,omitempty"`
}

// DeleteFunctionRequest is the body of DELETE /system/functions.
type DeleteFunctionRequest struct {
	FunctionName string `json:"functionName"`
}

// DeleteStageSeedRequest is the body of DELETE /system/stage-seeds (a
// mitosis extension of the OpenFaaS API; gwapi.DeleteStageSeedRequest).
type DeleteStageSeedRequest = gwapi.DeleteStageSeedRequest

// RenewStageSeedRequest is the body of PATCH /system/stage-seeds
// (gwapi.RenewStageSeedRequest).
type RenewStageSeedRequest = gwapi.RenewStageSeedRequest

// Namespace is the only namespace this provider has (OpenFaaS's default).
const Namespace = "openfaas-fn"

// Annotations (or labels) that choose mitosis behaviour per function.
const (
	// AnnotationPolicy: fork (default), local-fork, keep-alive or cold.
	AnnotationPolicy = "com.mitosis.policy"
	// AnnotationKeepAlive: idle TTL of warm instances ("10m").
	AnnotationKeepAlive = "com.mitosis.keep-alive"
	// AnnotationFunctionDir: the function's directory inside an OCI
	// image layout (default /home/app).
	AnnotationFunctionDir = "com.mitosis.function-dir"
	// AnnotationTTL: the function's time to live, renewed by PATCH
	// /system/functions (gwapi.AnnotationTTL).
	AnnotationTTL = gwapi.AnnotationTTL
)

// RenewFunctionRequest is the body of PATCH /system/functions
// (gwapi.RenewFunctionRequest).
type RenewFunctionRequest = gwapi.RenewFunctionRequest

// ttlOf returns a deployment's AnnotationTTL (0: none).
func ttlOf(d *FunctionDeployment) (time.Duration, error) {
	v := meta(d, AnnotationTTL)
	if v == "" {
		return 0, nil
	}
	return parseTTL(AnnotationTTL, v)
}

// stored is what the gateway keeps in the directory for a function: the
// deployment as given (GET returns it) and the spec derived from it.
type stored struct {
	Deployment FunctionDeployment `json:"deployment"`
	Spec       function.Spec      `json:"spec"`
}

func meta(d *FunctionDeployment, key string) string {
	if d.Annotations != nil {
		if v, ok := (*d.Annotations)[key]; ok {
			return v
		}
	}
	if d.Labels != nil {
		if v, ok := (*d.Labels)[key]; ok {
			return v
		}
	}
	return ""
}

// specOf validates a deployment and derives the function's spec.
func specOf(d *FunctionDeployment, defaultPolicy function.Policy) (function.Spec, error) {
	s := function.Spec{Name: d.Service, Image: d.Image, Env: d.EnvVars}
	if err := function.CheckName(d.Service); err != nil {
		return s, fmt.Errorf("service: %w", err)
	}
	if d.Image == "" || !strings.HasPrefix(d.Image, "/") {
		return s, fmt.Errorf("image %q: give the absolute path of a function directory (with handler.py) or of an OCI image layout, present on every node", d.Image)
	}
	if p := strings.TrimSpace(d.EnvProcess); p != "" && !strings.HasPrefix(p, "python") {
		return s, fmt.Errorf("envProcess %q: only the python3 runtime is supported (handler.py with handle(req), the classic python3 template)", p)
	}
	if len(d.Secrets) > 0 {
		return s, fmt.Errorf("secrets are not supported by this provider; pass configuration in envVars")
	}
	pol := meta(d, AnnotationPolicy)
	if pol == "" {
		pol = string(defaultPolicy)
	}
	p, err := function.ParsePolicy(pol)
	if err != nil {
		return s, fmt.Errorf("%s: %w", AnnotationPolicy, err)
	}
	s.Policy = p
	if v := meta(d, AnnotationKeepAlive); v != "" {
		t, err := function.ParseDuration(v)
		if err != nil {
			return s, fmt.Errorf("%s: %w", AnnotationKeepAlive, err)
		}
		s.KeepAlive = function.Duration(t)
	}
	s.FunctionDir = meta(d, AnnotationFunctionDir)
	if _, err := ttlOf(d); err != nil {
		return s, err
	}
	// The classic watchdog's exec_timeout bounds one invocation.
	if v := d.EnvVars["exec_timeout"]; v != "" {
		t, err := function.ParseDuration(v)
		if err != nil || t <= 0 {
			return s, fmt.Errorf("envVars.exec_timeout %q: want a duration like 30s", v)
		}
		s.Timeout = function.Duration(t)
	}
	if d.Limits != nil {
		if d.Limits.Memory != "" {
			m, err := ParseMemory(d.Limits.Memory)
			if err != nil {
				return s, fmt.Errorf("limits.memory: %w", err)
			}
			if m < 4<<20 {
				return s, fmt.Errorf("limits.memory %q: below 4Mi, too small for any function", d.Limits.Memory)
			}
			s.MemoryBytes = m
		}
		if d.Limits.CPU != "" {
			c, err := ParseCPU(d.Limits.CPU)
			if err != nil {
				return s, fmt.Errorf("limits.cpu: %w", err)
			}
			s.CPUs = c
		}
	}
	if d.Labels != nil {
		s.Labels = *d.Labels
	}
	if d.Annotations != nil {
		s.Annotations = *d.Annotations
	}
	return s, nil
}

var quantityRE = regexp.MustCompile(`^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)$`)

// ParseMemory parses a Kubernetes memory quantity: bytes, or a number with
// a binary (Ki, Mi, Gi, Ti) or decimal (k, M, G, T) suffix.
func ParseMemory(s string) (int64, error) {
	m := quantityRE.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return 0, fmt.Errorf("bad memory quantity %q (e.g. 128Mi, 1G)", s)
	}
	mult := map[string]float64{"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
		"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}[m[2]]
	if mult == 0 {
		return 0, fmt.Errorf("bad memory quantity %q: unknown suffix %q (use Ki, Mi, Gi, Ti, k, M, G or T)", s, m[2])
	}
	f, err := strconv.ParseFloat(m[1], 64)
	if err != nil || f*mult >= math.MaxInt64 || f*mult < 1 {
		return 0, fmt.Errorf("bad memory quantity %q: want at least 1 byte", s)
	}
	return int64(f * mult), nil
}

// ParseCPU parses a Kubernetes CPU quantity ("500m", "1", "0.5").
func ParseCPU(s string) (float64, error) {
	s = strings.TrimSpace(s)
	div := 1.0
	if v, ok := strings.CutSuffix(s, "m"); ok {
		s, div = v, 1000
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f <= 0 {
		return 0, fmt.Errorf("bad cpu quantity %q (e.g. 500m or 0.5)", s)
	}
	return f / div, nil
}

func decodeJSON(b []byte, v any) error {
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing data after the JSON object")
	}
	return nil
}
