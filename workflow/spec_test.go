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
		{"two non-sources", `{"name":"w","steps":[{"name":"s"},{"name":"a","after":["s"]},{"name":"b","after":["s"]},{"name":"c","after":["a","b"]}]}`, "at most one"},
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
			// What the runner relies on: a step maps over a source or
			// over the upstream it forks from, whose result is kept; it
			// forks from a kept single-instance upstream or the run's seed.
			parent := s.Parent(st.Name)
			if st.MaxConcurrency < 0 || (st.MaxConcurrency > 0 && st.Map == "") {
				t.Fatalf("step %s: max_concurrency %d with map %q", st.Name, st.MaxConcurrency, st.Map)
			}
			if st.Map != "" {
				if m := s.Steps[indexOf(s, st.Map)]; len(m.After) != 0 && st.Map != parent {
					t.Fatalf("step %s maps over %s, neither a source nor the step it forks from (%q)", st.Name, st.Map, parent)
				}
				if !s.Kept(st.Map) {
					t.Fatalf("step %s maps over %s, whose result is not kept", st.Name, st.Map)
				}
			}
			if parent != "" {
				up := s.Steps[indexOf(s, parent)]
				if !slices.Contains(st.After, parent) || up.Map != "" || len(up.After) == 0 || !s.Kept(parent) {
					t.Fatalf("step %s forks from %s: %+v", st.Name, parent, up)
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
