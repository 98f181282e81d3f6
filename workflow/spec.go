// Package workflow runs serverless workflows (DAGs of Python step
// functions) on a mitosis gateway, passing state between steps either by
// fork or through storage.
//
// A workflow is deployed once as a gateway function (FunctionName) whose
// seed holds the step runtime with the workflow's module imported. Under
// TransferFork the run's source steps (the ones with no upstream) run in
// one instance of it, which the gateway keeps as the run's stage seed once
// it answers (or, with Runner.SeedPerRun, in the initialization of a
// runtime started for the run, prepared as the run's seed); every later
// step instance is a child forked from that seed on
// whichever node the gateway picks: it reads the upstream results as the
// Python objects they are, in place, paging in only what it touches. A
// later single-instance step whose result other steps need (Spec.Kept)
// is kept the same way: its instance becomes a stage seed once it
// answers, and its downstream steps fork from it, so they see its result
// and everything it inherited, in place, and a pipeline passes any Python
// object (a numpy array, a DataFrame) from step to step without
// serializing it. Under TransferStorage (the baseline platforms use
// today) every step instance is a child of the function's seed: every
// kept result is pickled into Redis and downstream steps GET and unpickle
// it.
//
// A later step takes, in order: the map item (a fan-out step, one instance
// per element of its Map step's list result), every source upstream's
// result, then every non-source upstream's result, each in the order
// After lists them. A single-instance upstream's result is kept (above); a
// fan-out upstream's results arrive as a JSON list in the request, one
// element per instance, under both transfers: they are the small verdicts
// and counts of a fan-in, not the state. A step may join several kept
// steps: under fork the workflow's kept steps then run in one lineage
// (Spec.Joins), so the join's instance holds all their results in place.
package workflow

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// Transfer is how state passes between steps.
type Transfer string

const (
	// TransferFork forks downstream steps from the process that ran the
	// upstream steps.
	TransferFork Transfer = "fork"
	// TransferStorage pickles results into Redis and unpickles them.
	TransferStorage Transfer = "storage"
)

// ParseTransfer parses "fork" or "storage".
func ParseTransfer(s string) (Transfer, error) {
	switch t := Transfer(s); t {
	case TransferFork, TransferStorage:
		return t, nil
	}
	return "", fmt.Errorf("unknown transfer %q: want fork or storage", s)
}

// Spec is a workflow definition (JSON).
type Spec struct {
	// Name names the workflow: lowercase letters, digits and '-'.
	Name string `json:"name"`
	// Dir is the absolute path of the directory holding the step
	// functions' module; every node must see it at that path.
	Dir string `json:"dir"`
	// Module is the Python module in Dir (default "workflow").
	Module string `json:"module,omitempty"`
	// Transfer is the default transfer (default fork).
	Transfer Transfer `json:"transfer,omitempty"`
	// Memory is the memory limit of each step instance (default 1Gi).
	Memory string `json:"memory,omitempty"`
	// Env is added to the step instances' environment.
	Env   map[string]string `json:"env,omitempty"`
	Steps []Step            `json:"steps"`
}

// Step is one node of the DAG.
type Step struct {
	// Name is unique in the workflow.
	Name string `json:"name"`
	// Call is the Python function in the module (default Name).
	Call string `json:"call,omitempty"`
	// After lists the upstream steps; a step without any is a source and
	// gets the workflow's input.
	After []string `json:"after,omitempty"`
	// Map names a source step whose result is a list: the step runs once
	// per element, concurrently, spread over the nodes.
	Map string `json:"map,omitempty"`
	// MaxConcurrency, with Map, bounds how many of the step's instances
	// run at once (0: all of them); the others wait for one to end, in
	// the list's order. A fan-out of thousands then takes its share of
	// the cluster instead of queueing every instance at the gateway.
	MaxConcurrency int `json:"max_concurrency,omitempty"`
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$`)
var identRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// ReadSpec reads and validates a workflow definition file.
func ReadSpec(path string) (*Spec, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	s, err := ParseSpec(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if s.Dir != "" && !filepath.IsAbs(s.Dir) {
		// Relative to the definition file.
		if s.Dir, err = filepath.Abs(filepath.Join(filepath.Dir(path), s.Dir)); err != nil {
			return nil, err
		}
	}
	return s, s.Validate()
}

// ParseSpec decodes a workflow definition (unknown fields are errors) and
// validates it, except that a relative Dir is left to the caller.
func ParseSpec(b []byte) (*Spec, error) {
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	var s Spec
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("workflow definition: %w", err)
	}
	if s.Module == "" {
		s.Module = "workflow"
	}
	if s.Transfer == "" {
		s.Transfer = TransferFork
	}
	if s.Memory == "" {
		s.Memory = "1Gi"
	}
	for i := range s.Steps {
		if s.Steps[i].Call == "" {
			s.Steps[i].Call = strings.ReplaceAll(s.Steps[i].Name, "-", "_")
		}
	}
	if err := s.validateGraph(); err != nil {
		return nil, err
	}
	return &s, nil
}

// Validate checks the definition: names, the module directory, and the
// graph (see ParseSpec).
func (s *Spec) Validate() error {
	if !filepath.IsAbs(s.Dir) {
		return fmt.Errorf("workflow %s: dir %q must be an absolute path", s.Name, s.Dir)
	}
	if _, err := os.Stat(filepath.Join(s.Dir, s.Module+".py")); err != nil {
		return fmt.Errorf("workflow %s: module %s.py: %w", s.Name, s.Module, err)
	}
	return s.validateGraph()
}

func (s *Spec) validateGraph() error {
	if !nameRE.MatchString(s.Name) {
		return fmt.Errorf("workflow name %q: want 1-40 lowercase letters, digits and '-'", s.Name)
	}
	if !identRE.MatchString(s.Module) {
		return fmt.Errorf("workflow %s: module %q is not a Python identifier", s.Name, s.Module)
	}
	if _, err := ParseTransfer(string(s.Transfer)); err != nil {
		return fmt.Errorf("workflow %s: %w", s.Name, err)
	}
	for k, v := range s.Env {
		switch {
		case !identRE.MatchString(k):
			return fmt.Errorf("workflow %s: env name %q: want letters, digits and '_', not starting with a digit", s.Name, k)
		case strings.HasPrefix(k, "MITOSIS_"):
			return fmt.Errorf("workflow %s: env name %s: the MITOSIS_ prefix is the step runtime's own", s.Name, k)
		case strings.IndexByte(v, 0) >= 0:
			return fmt.Errorf("workflow %s: env %s holds a NUL byte", s.Name, k)
		}
	}
	if len(s.Steps) == 0 {
		return fmt.Errorf("workflow %s: no steps", s.Name)
	}
	byName := map[string]*Step{}
	for i := range s.Steps {
		st := &s.Steps[i]
		if !nameRE.MatchString(st.Name) {
			return fmt.Errorf("workflow %s: step name %q: want lowercase letters, digits and '-'", s.Name, st.Name)
		}
		if byName[st.Name] != nil {
			return fmt.Errorf("workflow %s: two steps named %s", s.Name, st.Name)
		}
		if !identRE.MatchString(st.Call) || strings.HasPrefix(st.Call, "_") {
			return fmt.Errorf("workflow %s: step %s calls %q: want a public Python function name", s.Name, st.Name, st.Call)
		}
		byName[st.Name] = st
	}
	for i := range s.Steps {
		st := &s.Steps[i]
		for j, a := range st.After {
			up := byName[a]
			if up == nil {
				return fmt.Errorf("workflow %s: step %s runs after %q, which is not a step", s.Name, st.Name, a)
			}
			if a == st.Name {
				return fmt.Errorf("workflow %s: step %s runs after itself", s.Name, st.Name)
			}
			if slices.Contains(st.After[:j], a) {
				return fmt.Errorf("workflow %s: step %s lists upstream %s twice in \"after\"", s.Name, st.Name, a)
			}
		}
		switch {
		case st.MaxConcurrency < 0:
			return fmt.Errorf("workflow %s: step %s: max_concurrency %d is negative (0: no bound)", s.Name, st.Name, st.MaxConcurrency)
		case st.MaxConcurrency > 0 && st.Map == "":
			return fmt.Errorf("workflow %s: step %s: max_concurrency bounds a fan-out; the step has no map", s.Name, st.Name)
		}
		if st.Map != "" {
			m := byName[st.Map]
			switch {
			case len(st.After) == 0:
				return fmt.Errorf("workflow %s: step %s maps over %s but has no upstream: a source step cannot fan out", s.Name, st.Name, st.Map)
			case m == nil:
				return fmt.Errorf("workflow %s: step %s maps over %q, which is not a step", s.Name, st.Name, st.Map)
			case m.Map != "":
				return fmt.Errorf("workflow %s: step %s maps over %s, which is itself a fan-out: map over a source step or a single-instance upstream step", s.Name, st.Name, st.Map)
			case len(m.After) > 0 && !slices.Contains(st.After, st.Map):
				return fmt.Errorf("workflow %s: step %s maps over %s, which is neither a source step nor one of its upstream steps (add it to \"after\")", s.Name, st.Name, st.Map)
			}
		}
	}
	if _, err := s.order(); err != nil {
		return err
	}
	return nil
}

// order returns the steps in a topological order (sources first, in
// definition order), or an error naming a cycle.
func (s *Spec) order() ([]*Step, error) {
	state := map[string]int{} // 0 new, 1 visiting, 2 done
	byName := map[string]*Step{}
	for i := range s.Steps {
		byName[s.Steps[i].Name] = &s.Steps[i]
	}
	var out []*Step
	var visit func(st *Step, path []string) error
	visit = func(st *Step, path []string) error {
		switch state[st.Name] {
		case 1:
			return fmt.Errorf("workflow %s: cycle %s", s.Name, strings.Join(append(path, st.Name), " -> "))
		case 2:
			return nil
		}
		state[st.Name] = 1
		for _, a := range st.After {
			if err := visit(byName[a], append(path, st.Name)); err != nil {
				return err
			}
		}
		state[st.Name] = 2
		out = append(out, st)
		return nil
	}
	for i := range s.Steps {
		if len(s.Steps[i].After) == 0 {
			if err := visit(&s.Steps[i], nil); err != nil {
				return nil, err
			}
		}
	}
	for i := range s.Steps {
		if err := visit(&s.Steps[i], nil); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Kept reports whether step name's result is kept for downstream steps
// instead of returned as JSON: it is a single-instance (not "map") step
// other steps run after or map over. Under fork its instance is kept as a
// stage seed that those steps fork from; under storage the result is
// pickled into the store. Source steps are always kept (in the run's
// seed, or in storage).
func (s *Spec) Kept(name string) bool {
	var st *Step
	used := false
	for i := range s.Steps {
		if s.Steps[i].Name == name {
			st = &s.Steps[i]
		}
		if s.Steps[i].Map == name || slices.Contains(s.Steps[i].After, name) {
			used = true
		}
	}
	return st != nil && st.Map == "" && (used || len(st.After) == 0)
}

// Parent returns the step whose kept instance step name's instances fork
// from under the fork transfer, or "" for the run's seed (which holds
// every source step's result). It is the step's single-instance
// non-source upstream if it has one; in a workflow with a join
// (Spec.Joins), the kept step that ran last before it (see Joins).
func (s *Spec) Parent(name string) string {
	if s.Joins() {
		return s.lineageParent(name)
	}
	st := s.step(name)
	if st == nil {
		return ""
	}
	for _, a := range st.After {
		if up := s.step(a); up != nil && len(up.After) > 0 && up.Map == "" {
			return a
		}
	}
	return ""
}

// Joins reports whether a step runs after two or more kept non-source
// steps (a join of two branches' states). A process is forked from one
// parent, so under the fork transfer such a workflow's kept non-source
// steps run in one lineage, in the run's order: each one's instance is
// forked from the one kept before it, and every other step's from the
// last one kept before it. A join's instance then holds every upstream
// result in place, with nothing serialized; the price is that the kept
// branches run one after the other, not at the same time, and that each
// step also sees the module state that the kept steps before it in the
// run left, as a child sees its parent's. Under storage a join loads each
// kept upstream's result from the store.
func (s *Spec) Joins() bool {
	for _, st := range s.Steps {
		kept := 0
		for _, a := range st.After {
			if up := s.step(a); up != nil && len(up.After) > 0 && up.Map == "" {
				kept++
			}
		}
		if kept > 1 {
			return true
		}
	}
	return false
}

// lineageParent is Parent in a workflow with a join: the last kept
// non-source step before name in the run's order.
func (s *Spec) lineageParent(name string) string {
	order, err := s.order()
	if err != nil {
		return ""
	}
	last := ""
	for _, st := range order {
		if st.Name == name {
			if len(st.After) == 0 {
				return ""
			}
			return last
		}
		if len(st.After) > 0 && s.Kept(st.Name) {
			last = st.Name
		}
	}
	return ""
}

// step returns the step named name, or nil.
func (s *Spec) step(name string) *Step {
	for i := range s.Steps {
		if s.Steps[i].Name == name {
			return &s.Steps[i]
		}
	}
	return nil
}

// sinks returns the steps no other step runs after.
func (s *Spec) sinks() []string {
	used := map[string]bool{}
	for _, st := range s.Steps {
		for _, a := range st.After {
			used[a] = true
		}
		if st.Map != "" {
			used[st.Map] = true
		}
	}
	var out []string
	for _, st := range s.Steps {
		if !used[st.Name] {
			out = append(out, st.Name)
		}
	}
	return out
}
