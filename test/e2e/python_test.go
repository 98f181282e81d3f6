package e2e

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// pyChecks are the in-process checks parent.py runs after prepare.
var pyChecks = []string{"pid", "fork", "subprocess", "monotonic", "signal", "thread"}

// TestPython: a Python parent holding a dict, a numpy array and a pandas
// frame prepares itself through the client library (client/python); 20
// children forked from it (4 at a time) see exactly its state.
func TestPython(t *testing.T) {
	requireSetup(t)
	name := "pytest-" + strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
	p := startProc(t, "parent.py", pyExe, parentPy, name, "stdin")

	l, err := p.waitLine("ROLE ", pyReadyTimeout)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(l)
	if len(f) < 3 || f[1] != "parent" {
		t.Fatalf("parent.py printed %q after mitosis.prepare, want ROLE parent <seed>\n%s", l, p.output())
	}
	seed := f[2]
	if !seedIDRe.MatchString(seed) {
		t.Errorf("mitosis.prepare in the parent: seed %q is not a seed id (s-<8 hex>); forking by name", seed)
		seed = name
	}
	adoptSeed(t, seed)
	dl, err := p.waitLine("DIGEST ", lineTimeout)
	if err != nil {
		t.Fatal(err)
	}
	want := strings.TrimSpace(strings.TrimPrefix(dl, "DIGEST "))
	t.Logf("parent pid %d prepared itself into %s; digest %s", p.pid, seed, want)

	start := time.Now()
	res := forkMany(t, seed, 20, 4, func(r *forkResult) []string {
		probs := r.out.problems("child", pyChecks)
		if r.out.digest() != want {
			probs = append(probs, fmt.Sprintf("DIGEST %s, parent's %s", r.out.digest(), want))
		}
		if !childIDRe.MatchString(r.out.roleArg) {
			probs = append(probs, fmt.Sprintf("mitosis.prepare in the child: child id %q, want c-<8 hex>", r.out.roleArg))
		}
		return probs
	})
	t.Logf("20 Python children (4 at a time) in %v", time.Since(start).Round(time.Millisecond))
	ids := map[string]int{}
	for _, r := range res {
		if r == nil || r.out.roleArg == "" {
			continue
		}
		if j, dup := ids[r.out.roleArg]; dup {
			t.Errorf("children %d and %d both got child id %s", j, r.idx, r.out.roleArg)
		}
		ids[r.out.roleArg] = r.idx
	}

	// The payload of `fork --payload` reaches the child's prepare() return.
	const payload = `{"name":"e2e","x":[1,2.5,"three"]}`
	forkMany(t, seed, 2, 1, func(r *forkResult) []string {
		probs := r.out.problems("child", pyChecks)
		if r.out.payload != payload {
			probs = append(probs, fmt.Sprintf("PAYLOAD %s, want %s", r.out.payload, payload))
		}
		return probs
	}, "--payload", payload)
	for _, r := range res {
		if r != nil && r.out.payload != "null" {
			t.Errorf("child %d forked without --payload got PAYLOAD %q, want null", r.idx, r.out.payload)
			break
		}
	}

	// Release the parent: its checks pass and its state is unchanged.
	from := p.lineCount()
	if _, err := p.stdin.WriteString("go\n"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.waitLine("DONE", lineTimeout); err != nil {
		t.Fatal(err)
	}
	po := parseOut(p.linesFrom(from))
	po.role, po.digests = "parent", []string{want} // printed before, see above
	if probs := po.problems("parent", pyChecks); len(probs) > 0 {
		t.Errorf("the parent after the children: %s\n%s", strings.Join(probs, "; "), p.output())
	}
	if po.final != want {
		t.Errorf("parent digest after the children %s, before %s", po.final, want)
	}
	if code, err := p.waitExit(30 * time.Second); err != nil || code != 0 {
		t.Errorf("parent.py exit %d (%v), want 0\n%s", code, err, p.output())
	}
}
