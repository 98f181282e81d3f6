package workflow

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParseSpecErrors(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"not json", `{`, "workflow definition"},
		{"unknown field", `{"name":"w","stepz":[]}`, "unknown field"},
		{"bad name", `{"name":"W!","steps":[{"name":"a"}]}`, "workflow name"},
		{"no steps", `{"name":"w"}`, "no steps"},
		{"dup step", `{"name":"w","steps":[{"name":"a"},{"name":"a"}]}`, "two steps named a"},
		{"unknown upstream", `{"name":"w","steps":[{"name":"a","after":["b"]}]}`, `"b", which is not a step`},
		{"self", `{"name":"w","steps":[{"name":"a","after":["a"]}]}`, "after itself"},
		{"cycle", `{"name":"w","steps":[{"name":"s"},{"name":"a","after":["s","b"]},{"name":"b","after":["a"]}]}`, "cycle a -> b -> a"},
		{"pure cycle", `{"name":"w","steps":[{"name":"s"},{"name":"a","after":["b"]},{"name":"b","after":["a"]}]}`, "cycle"},
		{"upstream twice", `{"name":"w","steps":[{"name":"s"},{"name":"a","after":["s"]},{"name":"c","after":["a","s","a"]}]}`, "lists upstream a twice"},
		{"map a non-source", `{"name":"w","steps":[{"name":"s"},{"name":"a","after":["s"]},{"name":"b","after":["s"],"map":"a"}]}`, "neither a source step nor one of its upstream steps"},
		{"map a fan-out", `{"name":"w","steps":[{"name":"s"},{"name":"a","after":["s"],"map":"s"},{"name":"b","after":["a"],"map":"a"}]}`, "itself a fan-out"},
		{"source map", `{"name":"w","steps":[{"name":"s"},{"name":"a","map":"s"}]}`, "cannot fan out"},
		{"private call", `{"name":"w","steps":[{"name":"a","call":"_x"}]}`, "public Python function"},
		{"transfer", `{"name":"w","transfer":"pickle","steps":[{"name":"a"}]}`, "unknown transfer"},
		{"module", `{"name":"w","module":"a.b","steps":[{"name":"a"}]}`, "not a Python identifier"},
		{"env name", `{"name":"w","env":{"A=B":"x"},"steps":[{"name":"a"}]}`, "env name"},
		{"env reserved", `{"name":"w","env":{"MITOSIS_WF_DIR":"/x"},"steps":[{"name":"a"}]}`, "MITOSIS_ prefix"},
		{"env nul", `{"name":"w","env":{"A":"x\u0000y"},"steps":[{"name":"a"}]}`, "NUL"},
		{"max_concurrency without map", `{"name":"w","steps":[{"name":"s"},{"name":"a","after":["s"],"max_concurrency":2}]}`, "has no map"},
		{"negative max_concurrency", `{"name":"w","steps":[{"name":"s"},{"name":"a","after":["s"],"map":"s","max_concurrency":-1}]}`, "negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseSpec([]byte(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestSpecOrderAndDefaults(t *testing.T) {
	s, err := ParseSpec([]byte(`{"name":"finra","steps":[
		{"name":"merge","after":["audit"]},
		{"name":"audit","after":["fetch-portfolio","market"],"map":"rules"},
		{"name":"fetch-portfolio"},{"name":"market","call":"fetch_market"},{"name":"rules"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if s.Transfer != TransferFork || s.Module != "workflow" || s.Memory != "1Gi" {
		t.Errorf("defaults: %+v", s)
	}
	if s.Steps[2].Call != "fetch_portfolio" || s.Steps[3].Call != "fetch_market" {
		t.Errorf("calls: %q %q", s.Steps[2].Call, s.Steps[3].Call)
	}
	order, err := s.order()
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, st := range order {
		pos[st.Name] = i
	}
	if len(order) != 5 || pos["audit"] < pos["fetch-portfolio"] || pos["audit"] < pos["market"] || pos["merge"] < pos["audit"] {
		t.Errorf("order %v", names(order))
	}
	if got := s.sinks(); len(got) != 1 || got[0] != "merge" {
		t.Errorf("sinks %v (a map's list step is not a sink)", got)
	}
}

func TestSpecKept(t *testing.T) {
	s, err := ParseSpec([]byte(`{"name":"p","steps":[
		{"name":"model"},{"name":"samples"},{"name":"shards"},{"name":"unused"},
		{"name":"prep","after":["samples"]},
		{"name":"project","after":["model","prep"]},
		{"name":"batches","after":["project"]},
		{"name":"infer","after":["model","batches"],"map":"batches"},
		{"name":"tally","after":["infer"]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		step string
		kept bool
	}{
		{"model", true}, {"unused", true}, // sources live in the run's seed
		{"prep", true}, {"project", true}, // single instances others run after
		{"batches", true}, // mapped over (and run after)
		{"infer", false},  // a fan-out: its results are the fan-in's JSON inputs
		{"tally", false},  // the sink returns its result
		{"nope", false},
	} {
		if got := s.Kept(tt.step); got != tt.kept {
			t.Errorf("Kept(%s) = %v, want %v", tt.step, got, tt.kept)
		}
	}
	// The instance each step forks from: its single-instance non-source
	// upstream's, else the run's seed ("").
	for step, want := range map[string]string{"prep": "", "project": "prep", "batches": "project",
		"infer": "batches", "tally": "", "model": "", "nope": ""} {
		if got := s.Parent(step); got != want {
			t.Errorf("Parent(%s) = %q, want %q", step, got, want)
		}
	}
}

// A join of two kept branches: under fork the kept steps run in one
// lineage, so the join's instance holds both results; without a join
// each step forks from its own kept upstream.
func TestSpecJoins(t *testing.T) {
	for _, tt := range []struct {
		name, steps string
		joins       bool
		parent      map[string]string
	}{
		{"diamond", `{"name":"s"},{"name":"a","after":["s"]},{"name":"b","after":["s"]},{"name":"c","after":["a","b"]}`,
			true, map[string]string{"s": "", "a": "", "b": "a", "c": "b"}},
		// Two branches of two kept steps meet: all four run in one
		// lineage in the run's order (p, q, a, b), so the join sees all.
		{"two deep branches", `{"name":"s"},{"name":"p","after":["s"]},{"name":"q","after":["s"]},{"name":"a","after":["p"]},{"name":"b","after":["q"]},{"name":"f","after":["a"],"map":"s"},{"name":"c","after":["f","a","b"]}`,
			true, map[string]string{"p": "", "q": "p", "a": "q", "b": "a", "f": "b", "c": "b"}},
		// A fan-out and a kept step meet: one kept upstream, no lineage.
		{"fan-out and kept", `{"name":"s"},{"name":"a","after":["s"]},{"name":"f","after":["s"],"map":"s"},{"name":"g","after":["s"],"map":"s"},{"name":"c","after":["f","a","g"]}`,
			false, map[string]string{"a": "", "f": "", "g": "", "c": "a"}},
		{"branches that do not meet", `{"name":"s"},{"name":"a","after":["s"]},{"name":"b","after":["s"]},{"name":"x","after":["a"]},{"name":"y","after":["b"]}`,
			false, map[string]string{"a": "", "b": "", "x": "a", "y": "b"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := ParseSpec([]byte(`{"name":"w","steps":[` + tt.steps + `]}`))
			if err != nil {
				t.Fatal(err)
			}
			if s.Joins() != tt.joins {
				t.Errorf("Joins() = %v, want %v", s.Joins(), tt.joins)
			}
			for step, want := range tt.parent {
				if got := s.Parent(step); got != want {
					t.Errorf("Parent(%s) = %q, want %q", step, got, want)
				}
			}
		})
	}
}

func TestReadSpecRelativeDir(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "workflow.py"), []byte("def a(x):\n    return x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "w.json")
	if err := os.WriteFile(p, []byte(`{"name":"w","dir":".","steps":[{"name":"a"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := ReadSpec(p)
	if err != nil || s.Dir != dir {
		t.Fatalf("ReadSpec: %v, dir %q", err, s.Dir)
	}
	if err := os.WriteFile(p, []byte(`{"name":"w","dir":".","module":"other","steps":[{"name":"a"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadSpec(p); err == nil || !strings.Contains(err.Error(), "other.py") {
		t.Fatalf("missing module: %v", err)
	}
}

func TestParseTransfer(t *testing.T) {
	for _, s := range []string{"fork", "storage"} {
		if tr, err := ParseTransfer(s); err != nil || string(tr) != s {
			t.Errorf("%s: %v %v", s, tr, err)
		}
	}
	if _, err := ParseTransfer("redis"); err == nil {
		t.Error("no error")
	}
}

// FuzzParseSpec: any input is either refused with an error or gives a spec
// whose every step appears once in the run order, after its upstream steps
// and its map source, and which survives a round trip through JSON.
func FuzzParseSpec(f *testing.F) {
	for _, seed := range []string{
		`{"name":"finra","steps":[{"name":"merge","after":["audit"]},{"name":"audit","after":["p","m"],"map":"r"},{"name":"p"},{"name":"m"},{"name":"r"}]}`,
		`{"name":"wc","steps":[{"name":"c"},{"name":"l"},{"name":"n","after":["c"],"map":"l","max_concurrency":3},{"name":"r","after":["n"]}]}`,
		`{"name":"w","env":{"A":"b"},"memory":"2Gi","transfer":"storage","steps":[{"name":"a"},{"name":"b","after":["a"],"call":"go"}]}`,
		`{"name":"w","steps":[{"name":"s"},{"name":"a","after":["s","b"]},{"name":"b","after":["a"]}]}`,
		`{"name":"w","steps":[]}`, `[]`, `{`,
		`{"name":"p","steps":[{"name":"m"},{"name":"s"},{"name":"pre","after":["s"]},{"name":"b","after":["m","pre"]},{"name":"i","after":["b"],"map":"b"},{"name":"t","after":["i"]}]}`,
		`{"name":"j","steps":[{"name":"s"},{"name":"p","after":["s"]},{"name":"q","after":["s"]},{"name":"a","after":["p"]},{"name":"b","after":["q"]},{"name":"c","after":["a","b"]}]}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseSpec(b)
		if err != nil {
			if s != nil {
				t.Fatalf("error %v with a spec", err)
			}
			return
		}
		order, err := s.order()
		if err != nil {
			t.Fatalf("accepted spec has no order: %v", err)
		}
		if len(order) != len(s.Steps) {
			t.Fatalf("order has %d steps, the spec %d", len(order), len(s.Steps))
		}
		pos := map[string]int{}
		for i, st := range order {
			if _, dup := pos[st.Name]; dup {
				t.Fatalf("step %s twice in the order", st.Name)
			}
			pos[st.Name] = i
		}
		for _, st := range s.Steps {
			for _, a := range st.After {
				if pos[a] >= pos[st.Name] {
					t.Fatalf("step %s ordered before its upstream %s", st.Name, a)
				}
			}
			// What the runner relies on: the seed a step forks from
			// holds every source and every kept upstream it takes in
			// place, and the list it maps over.
			parent := s.Parent(st.Name)
			if st.MaxConcurrency < 0 || (st.MaxConcurrency > 0 && st.Map == "") {
				t.Fatalf("step %s: max_concurrency %d with map %q", st.Name, st.MaxConcurrency, st.Map)
			}
			if st.Map != "" && !s.Kept(st.Map) {
				t.Fatalf("step %s maps over %s, whose result is not kept", st.Name, st.Map)
			}
			if len(st.After) == 0 {
				continue
			}
			held := map[string]bool{}
			for p := parent; p != ""; p = s.Parent(p) {
				up := s.Steps[indexOf(s, p)]
				if held[p] || up.Map != "" || len(up.After) == 0 || !s.Kept(p) || pos[p] >= pos[st.Name] {
					t.Fatalf("step %s forks from %s (lineage %v): %+v", st.Name, parent, held, up)
				}
				held[p] = true
			}
			needs := slices.Clone(st.After)
			if st.Map != "" {
				needs = append(needs, st.Map)
			}
			for _, a := range needs {
				if up := s.Steps[indexOf(s, a)]; len(up.After) > 0 && up.Map == "" && !held[a] {
					t.Fatalf("step %s takes %s in place, but forks from %q, whose lineage %v does not hold it", st.Name, a, parent, held)
				}
			}
		}
		again, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		s2, err := ParseSpec(again)
		if err != nil {
			t.Fatalf("round trip refused: %v (%s)", err, again)
		}
		if third, _ := json.Marshal(s2); !bytes.Equal(again, third) {
			t.Fatalf("round trip changed the spec: %s -> %s", again, third)
		}
	})
}

func indexOf(s *Spec, name string) int {
	for i, st := range s.Steps {
		if st.Name == name {
			return i
		}
	}
	return -1
}
