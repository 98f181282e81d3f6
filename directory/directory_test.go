package directory

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// startEtcd runs an embedded etcd on free loopback ports for one test and
// opens a client to it.
func startEtcd(t *testing.T) (*Embedded, *Client) {
	t.Helper()
	ctx := context.Background()
	emb, err := StartEmbedded(ctx, EmbedConfig{Dir: t.TempDir(), ClientURL: "http://127.0.0.1:0", PeerURL: "http://127.0.0.1:0"})
	if err != nil {
		t.Fatalf("StartEmbedded: %v", err)
	}
	t.Cleanup(emb.Close)
	if eps := emb.Endpoints(); len(eps) != 1 || strings.HasSuffix(eps[0], ":0") {
		t.Fatalf("Endpoints = %v, want one URL with the bound port", eps)
	}
	c, err := Open(ctx, emb.Endpoints(), Options{Prefix: "/test"})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return emb, c
}

func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func TestOpenUnreachable(t *testing.T) {
	start := time.Now()
	_, err := Open(context.Background(), []string{"http://127.0.0.1:1"}, Options{DialTimeout: 500 * time.Millisecond})
	if err == nil {
		t.Fatal("Open of a closed port succeeded")
	}
	if !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Errorf("error %q does not name the endpoint", err)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("Open took %s to fail, want about the dial timeout", el)
	}
	if _, err := Open(context.Background(), nil, Options{}); err == nil {
		t.Error("Open with no endpoints succeeded")
	}
}

func TestEmbedBadConfig(t *testing.T) {
	for _, c := range []EmbedConfig{
		{},
		{Dir: t.TempDir(), ClientURL: "127.0.0.1:2379"},
		{Dir: t.TempDir(), ClientURL: "http://127.0.0.1:0", PeerURL: "ftp://x"},
	} {
		if e, err := StartEmbedded(context.Background(), c); err == nil {
			e.Close()
			t.Errorf("StartEmbedded(%+v) succeeded", c)
		}
	}
}

func TestFunctionsCRUD(t *testing.T) {
	_, c := startEtcd(t)
	ctx := context.Background()
	spec := []byte(`{"image":"/fn/a","policy":"fork"}`)
	f, err := c.CreateFunction(ctx, "a", spec)
	if err != nil {
		t.Fatalf("CreateFunction: %v", err)
	}
	if f.Name != "a" || f.Revision == 0 || f.Created.IsZero() {
		t.Errorf("created %+v", f)
	}
	if _, err := c.CreateFunction(ctx, "a", spec); !errors.Is(err, ErrExists) {
		t.Errorf("second CreateFunction: %v, want ErrExists", err)
	}
	if _, err := c.UpdateFunction(ctx, "nope", spec); !errors.Is(err, ErrNotFound) {
		t.Errorf("UpdateFunction of a missing function: %v, want ErrNotFound", err)
	}
	u, err := c.UpdateFunction(ctx, "a", []byte(`{"image":"/fn/b"}`))
	if err != nil {
		t.Fatalf("UpdateFunction: %v", err)
	}
	if u.Revision <= f.Revision || !u.Created.Equal(f.Created) {
		t.Errorf("update: revision %d -> %d, created %v -> %v", f.Revision, u.Revision, f.Created, u.Created)
	}
	g, err := c.GetFunction(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]string
	if err := json.Unmarshal(g.Spec, &got); err != nil || got["image"] != "/fn/b" {
		t.Errorf("GetFunction spec %s (%v)", g.Spec, err)
	}
	if _, err := c.CreateFunction(ctx, "b", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	fns, err := c.Functions(ctx)
	if err != nil || len(fns) != 2 || fns[0].Name != "a" || fns[1].Name != "b" {
		t.Errorf("Functions = %+v, %v", fns, err)
	}
	if err := c.DeleteFunction(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteFunction(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("second DeleteFunction: %v, want ErrNotFound", err)
	}
	if _, err := c.GetFunction(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetFunction after delete: %v", err)
	}
	for _, bad := range []struct{ name, spec string }{
		{"", "{}"}, {"a/b", "{}"}, {"a b", "{}"}, {"..", "{}"}, {strings.Repeat("x", MaxNameLen+1), "{}"}, {"ok", "{not json"},
	} {
		if _, err := c.CreateFunction(ctx, bad.name, []byte(bad.spec)); err == nil {
			t.Errorf("CreateFunction(%q, %q) succeeded", bad.name, bad.spec)
		}
	}
}

func TestRegisterLivenessAndSeeds(t *testing.T) {
	emb, c := startEtcd(t)
	ctx := context.Background()
	v, err := c.NewView(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()

	info := NodeInfo{Name: "n1", PeerAddr: "10.0.0.1:7070", Capacity: Capacity{Concurrency: 8, MemoryBytes: 1 << 30}}
	r, err := c.Register(ctx, info, 2*time.Second)
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	waitFor(t, "view lists n1", 2*time.Second, func() bool { _, ok := v.Node("n1"); return ok })

	// A second live process may not take the name.
	c2, err := Open(ctx, emb.Endpoints(), Options{Prefix: "/test"})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, err := c2.Register(ctx, info, 2*time.Second); !errors.Is(err, ErrNodeExists) {
		t.Errorf("Register of a held name: %v, want ErrNodeExists", err)
	}
	for _, bad := range []NodeInfo{{Name: "x/y", PeerAddr: "1.2.3.4:5"}, {Name: "ok", PeerAddr: "nohost"}} {
		if _, err := c2.Register(ctx, bad, 2*time.Second); err == nil {
			t.Errorf("Register(%+v) succeeded", bad)
		}
	}

	if err := r.UpdateLoad(ctx, Load{Running: 3, MemoryBytes: 42}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "view sees load", 2*time.Second, func() bool { n, _ := v.Node("n1"); return n.Load.Running == 3 })

	if err := r.PutSeed(ctx, SeedRecord{Function: "f", SeedID: "fn.f", Generation: 1}); err != nil {
		t.Fatal(err)
	}
	if err := r.PutSeed(ctx, SeedRecord{Function: "f", Node: "other", SeedID: "x"}); err == nil {
		t.Error("PutSeed for another node succeeded")
	}
	waitFor(t, "view sees seed", 2*time.Second, func() bool { return len(v.Seeds("f")) == 1 })
	if s := v.Seeds("f")[0]; s.Node != "n1" || s.SeedID != "fn.f" {
		t.Errorf("seed %+v", s)
	}

	// A node whose process dies (keepalive stops without revoking) leaves
	// the directory, with its seeds, within TTL + etcd's expiry check.
	cDead, err := Open(ctx, emb.Endpoints(), Options{Prefix: "/test"})
	if err != nil {
		t.Fatal(err)
	}
	rd, err := cDead.Register(ctx, NodeInfo{Name: "n2", PeerAddr: "10.0.0.2:7070"}, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := rd.PutSeed(ctx, SeedRecord{Function: "g", SeedID: "fn.g"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "view lists n2", 2*time.Second, func() bool { _, ok := v.Node("n2"); return ok && len(v.Seeds("g")) == 1 })
	cDead.Close()
	gone := waitFor(t, "dead n2 expires", 5*time.Second, func() bool { _, ok := v.Node("n2"); return !ok })
	if len(v.Seeds("g")) != 0 {
		t.Errorf("seed of the dead node still listed: %+v", v.Seeds("g"))
	}
	t.Logf("dead node left the view after %s (ttl %s)", gone, rd.TTL())

	// A clean Close removes the node at once.
	if err := r.DeleteSeed(ctx, "f"); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "closed n1 leaves", time.Second, func() bool { _, ok := v.Node("n1"); return !ok })
	nodes, err := c.Nodes(ctx)
	if err != nil || len(nodes) != 0 {
		t.Errorf("Nodes after close = %+v, %v", nodes, err)
	}
	// The name is free again.
	r3, err := c2.Register(ctx, info, 2*time.Second)
	if err != nil {
		t.Fatalf("Register after the holder closed: %v", err)
	}
	r3.Close(ctx)
}

// startView starts an embedded etcd and returns a client of it and a View
// (closed with the test).
func startView(t *testing.T) (*Client, *View) {
	t.Helper()
	_, c := startEtcd(t)
	v, err := c.NewView(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	return c, v
}

// TestStageLeases: a stage seed's lease record is in every View while it is
// renewed, goes when its lease expires or it is deleted, and a renewal
// with another TTL swaps the lease.
func TestStageLeases(t *testing.T) {
	c, v := startView(t)
	ctx := context.Background()
	has := func(ref string) bool {
		for _, l := range v.StageLeases() {
			if l.Ref == ref && l.Function == "wf" {
				return true
			}
		}
		return false
	}
	for _, bad := range []struct{ fn, ref string }{{"wf", "nonode"}, {"wf", "a/"}, {"", "a/s-1"}, {"wf", "a/s 1"}} {
		if err := c.PutStageLease(ctx, bad.fn, bad.ref, 0, time.Second); err == nil {
			t.Errorf("PutStageLease(%q, %q) accepted", bad.fn, bad.ref)
		}
	}
	if err := c.PutStageLease(ctx, "wf", "a/s-1", 1<<28, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := c.PutStageLease(ctx, "wf", "b/s-2", 0, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "both leases in the view", 5*time.Second, func() bool { return has("a/s-1") && has("b/s-2") })
	refs := func() map[string]string {
		m, err := c.StageLeaseRefs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	if m := refs(); len(m) != 2 || m["a/s-1"] != "wf" || m["b/s-2"] != "wf" {
		t.Errorf("StageLeaseRefs = %v, want a/s-1 and b/s-2 of wf", m)
	}
	for _, l := range v.StageLeases() {
		if l.Ref == "a/s-1" && (l.Memory != 1<<28 || l.TTL != 2) {
			t.Errorf("lease record %+v, want 256 MiB and 2 s", l)
		}
	}
	// Renewed every 0.5 s (same TTL, then a longer one), a/s-1 outlives
	// its first 2 s.
	for i := 0; i < 8; i++ {
		ttl := 2 * time.Second
		if i >= 4 {
			ttl = 3 * time.Second
		}
		if ok, err := c.RenewStageLease(ctx, "wf", "a/s-1", ttl); !ok || err != nil {
			t.Fatalf("renew %d: %v %v", i, ok, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if !has("a/s-1") {
		t.Fatal("a renewed lease expired")
	}
	// Left alone, it expires; the other stays.
	waitFor(t, "the lease to expire", 10*time.Second, func() bool { return !has("a/s-1") })
	if !has("b/s-2") {
		t.Error("the other lease went too")
	}
	if m := refs(); len(m) != 1 || m["b/s-2"] != "wf" {
		t.Errorf("StageLeaseRefs after the expiry = %v, want only b/s-2", m)
	}
	if ok, err := c.RenewStageLease(ctx, "wf", "a/s-1", time.Second); ok || err != nil {
		t.Errorf("renewal of an expired lease: %v %v, want false", ok, err)
	}
	if err := c.DeleteStageLease(ctx, "wf", "b/s-2"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the deleted lease to go", 5*time.Second, func() bool { return !has("b/s-2") })
	if m := refs(); len(m) != 0 {
		t.Errorf("StageLeaseRefs after the delete = %v, want none", m)
	}
	if err := c.DeleteStageLease(ctx, "wf", "b/s-2"); err != nil {
		t.Errorf("deleting a missing lease: %v", err)
	}
}

// TestFunctionTTL: a function created with a TTL lives while renewed,
// keeps its lease through an update, and goes (from every View) when
// nobody renews it; one created without a TTL cannot be renewed.
func TestFunctionTTL(t *testing.T) {
	c, v := startView(t)
	ctx := context.Background()
	has := func(name string) bool {
		for _, f := range v.Functions() {
			if f.Name == name {
				return true
			}
		}
		return false
	}
	if _, err := c.CreateFunctionTTL(ctx, "brief", []byte(`{"v":1}`), 0); err == nil {
		t.Error("a zero TTL was accepted")
	}
	f, err := c.CreateFunctionTTL(ctx, "brief", []byte(`{"v":1}`), 2*time.Second)
	if err != nil || f.TTL != 2 {
		t.Fatalf("create with a TTL: %+v %v", f, err)
	}
	if _, err := c.CreateFunction(ctx, "lasting", []byte(`{"v":1}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateFunctionTTL(ctx, "brief", []byte(`{"v":1}`), time.Hour); !errors.Is(err, ErrExists) {
		t.Errorf("creating it again: %v, want ErrExists", err)
	}
	waitFor(t, "the functions in the view", 5*time.Second, func() bool { return has("brief") && has("lasting") })
	// Renewed every 0.5 s for 4 s, and updated midway.
	for i := 0; i < 8; i++ {
		if err := c.RenewFunction(ctx, "brief"); err != nil {
			t.Fatalf("renew %d: %v", i, err)
		}
		if i == 4 {
			if u, err := c.UpdateFunction(ctx, "brief", []byte(`{"v":2}`)); err != nil || u.TTL != 2 {
				t.Fatalf("update: %+v %v", u, err)
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	if g, err := c.GetFunction(ctx, "brief"); err != nil || g.TTL != 2 || string(g.Spec) != `{"v":2}` {
		t.Fatalf("a renewed function: %+v %v", g, err)
	}
	waitFor(t, "the function to expire", 10*time.Second, func() bool { return !has("brief") })
	if _, err := c.GetFunction(ctx, "brief"); !errors.Is(err, ErrNotFound) {
		t.Errorf("get after the expiry: %v", err)
	}
	if err := c.RenewFunction(ctx, "brief"); !errors.Is(err, ErrNotFound) {
		t.Errorf("renew after the expiry: %v, want ErrNotFound", err)
	}
	if err := c.RenewFunction(ctx, "lasting"); !errors.Is(err, ErrNoTTL) {
		t.Errorf("renew a function without a TTL: %v, want ErrNoTTL", err)
	}
	if !has("lasting") {
		t.Error("the function without a TTL went too")
	}

	// An update changes the TTL: from an hour to none (the function
	// stays, its old lease revoked), from none to 2 s (it goes), from an
	// hour to 2 s (it goes); the same TTL keeps the lease.
	if _, err := c.UpdateFunctionTTL(ctx, "lasting", []byte(`{"v":1}`), -time.Second); err == nil {
		t.Error("a negative TTL was accepted")
	}
	for _, name := range []string{"hour-to-none", "hour-to-brief", "hour-to-hour"} {
		if _, err := c.CreateFunctionTTL(ctx, name, []byte(`{"v":1}`), time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	for _, u := range []struct {
		name string
		ttl  time.Duration
		want int64
	}{{"hour-to-none", 0, 0}, {"hour-to-brief", 2 * time.Second, 2}, {"lasting", 2 * time.Second, 2}, {"hour-to-hour", time.Hour, 3600}} {
		if f, err := c.UpdateFunctionTTL(ctx, u.name, []byte(`{"v":3}`), u.ttl); err != nil || f.TTL != u.want {
			t.Fatalf("UpdateFunctionTTL(%s, %v): %+v %v", u.name, u.ttl, f, err)
		}
		if g, err := c.GetFunction(ctx, u.name); err != nil || g.TTL != u.want || string(g.Spec) != `{"v":3}` {
			t.Errorf("%s after the update: %+v %v", u.name, g, err)
		}
	}
	if err := c.RenewFunction(ctx, "hour-to-none"); !errors.Is(err, ErrNoTTL) {
		t.Errorf("renew a function whose TTL an update took off: %v, want ErrNoTTL", err)
	}
	if err := c.RenewFunction(ctx, "hour-to-hour"); err != nil {
		t.Errorf("renew a function updated with the same TTL: %v", err)
	}
	waitFor(t, "the functions given a 2 s TTL to expire", 10*time.Second, func() bool { return !has("hour-to-brief") && !has("lasting") })
	time.Sleep(time.Second)
	if !has("hour-to-none") || !has("hour-to-hour") {
		t.Error("a function updated to no TTL, or to the same one, went")
	}
}

func TestRuns(t *testing.T) {
	_, c := startEtcd(t)
	ctx := context.Background()
	get := func(id string) string {
		t.Helper()
		b, err := c.GetRun(ctx, id)
		if err != nil {
			t.Fatalf("GetRun(%s): %v", id, err)
		}
		return string(b)
	}
	if err := c.PutRun(ctx, "r1", "", []byte(`{"sync":1}`), time.Hour); err != nil {
		t.Fatal(err)
	}
	if got := get("r1"); got != `{"sync":1}` {
		t.Errorf("r1 = %s", got)
	}
	// A call id is taken once while its record is there.
	if _, created, err := c.CreateRun(ctx, "c1", []byte(`{"running":1}`), time.Hour, nil); err != nil || !created {
		t.Fatalf("CreateRun(c1) = %v, %v", created, err)
	}
	old, created, err := c.CreateRun(ctx, "c1", []byte(`{"again":1}`), time.Hour, nil)
	if err != nil || created || string(old) != `{"running":1}` {
		t.Fatalf("CreateRun(c1) again = %s, %v, %v; want the first record, not created", old, created, err)
	}
	// The ended run filed under its call id, found by its run id too.
	if err := c.PutRun(ctx, "c1", "r2", []byte(`{"ended":1}`), time.Hour); err != nil {
		t.Fatal(err)
	}
	if a, b := get("c1"), get("r2"); a != `{"ended":1}` || b != a {
		t.Errorf("c1 = %s, r2 = %s, want the ended record for both", a, b)
	}
	recs, err := c.Runs(ctx, 0)
	if err != nil || len(recs) != 2 || string(recs[0]) != `{"ended":1}` || string(recs[1]) != `{"sync":1}` {
		t.Errorf("Runs(0) = %q, %v; want c1's record, then r1's (latest created first), and no alias", recs, err)
	}
	if recs, err := c.Runs(ctx, 1); err != nil || len(recs) != 1 || string(recs[0]) != `{"ended":1}` {
		t.Errorf("Runs(1) = %q, %v", recs, err)
	}
	// Bad input names the problem and changes nothing.
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"slash", c.PutRun(ctx, "a/b", "", []byte(`{}`), time.Hour)},
		{"bad alias", c.PutRun(ctx, "r3", "x y", []byte(`{}`), time.Hour)},
		{"too big", c.PutRun(ctx, "r3", "", make([]byte, MaxRunRecord+1), time.Hour)},
		{"no ttl", c.PutRun(ctx, "r3", "", []byte(`{}`), 0)},
	} {
		if tc.err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
	if _, err := c.GetRun(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetRun(nope) = %v, want ErrNotFound", err)
	}
	if _, err := c.GetRun(ctx, "r3"); !errors.Is(err, ErrNotFound) {
		t.Errorf("r3 filed by a refused PutRun: %v", err)
	}
	if err := c.DeleteRun(ctx, "r1"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetRun(ctx, "r1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("r1 after DeleteRun: %v", err)
	}
	if err := c.DeleteRun(ctx, "r1"); err != nil {
		t.Errorf("DeleteRun of a record not there: %v", err)
	}
	// Cancel requests: one pending when the watch starts, one after.
	if err := c.CancelRun(ctx, "c1", time.Hour); err != nil {
		t.Fatal(err)
	}
	wctx, stop := context.WithCancel(ctx)
	cancels := c.RunCancels(wctx)
	next := func() string {
		t.Helper()
		select {
		case id := <-cancels:
			return id
		case <-time.After(10 * time.Second):
			t.Fatal("no cancel request within 10 s")
			return ""
		}
	}
	if id := next(); id != "c1" {
		t.Errorf("pending cancel = %q, want c1", id)
	}
	if err := c.ForgetRunCancel(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if err := c.CancelRun(ctx, "c2", time.Hour); err != nil {
		t.Fatal(err)
	}
	if id := next(); id != "c2" {
		t.Errorf("new cancel = %q, want c2", id)
	}
	if err := c.CancelRun(ctx, "a/b", time.Hour); err == nil {
		t.Error("a cancel of a bad id was accepted")
	}
	stop()
	for range cancels { // closed once its context ends
	}
	// Records go with their TTL, the alias too.
	if err := c.PutRun(ctx, "brief", "brief-run", []byte(`{}`), 2*time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the brief run record to expire", 15*time.Second, func() bool {
		_, e1 := c.GetRun(ctx, "brief")
		_, e2 := c.GetRun(ctx, "brief-run")
		return errors.Is(e1, ErrNotFound) && errors.Is(e2, ErrNotFound)
	})
	if get("c1") != `{"ended":1}` {
		t.Error("c1 went with the brief record")
	}
}

// TestRunSession: a gateway's session marks the runs it runs; the marks go
// with Unmark, and all of them when the session closes.
func TestRunSession(t *testing.T) {
	_, c := startEtcd(t)
	ctx := context.Background()
	s := c.OpenRunSession("gw-a", 5*time.Second)
	alive := func(id string) bool {
		t.Helper()
		ok, err := c.RunAlive(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	waitFor(t, "the session's lease", 10*time.Second, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.lease != 0
	})
	if err := s.Mark("r1"); err != nil || !alive("r1") {
		t.Fatalf("Mark(r1): %v, alive %v", err, alive("r1"))
	}
	if _, created, err := c.CreateRun(ctx, "r2", []byte(`{}`), time.Hour, s); err != nil || !created || !alive("r2") {
		t.Fatalf("CreateRun(r2) with the session: created %v, %v, alive %v", created, err, alive("r2"))
	}
	if runs, err := c.RunsAlive(ctx); err != nil || len(runs) != 2 || runs["r1"] != "gw-a" || runs["r2"] != "gw-a" {
		t.Errorf("RunsAlive = %v, %v", runs, err)
	}
	if err := s.Unmark("r1"); err != nil || alive("r1") {
		t.Errorf("Unmark(r1): %v, alive %v", err, alive("r1"))
	}
	if err := s.Mark("a/b"); err == nil {
		t.Error("a bad id was marked")
	}
	s.Close()
	if alive("r2") {
		t.Error("r2 still marked after the session closed")
	}
	if _, err := c.GetRun(ctx, "r2"); err != nil {
		t.Errorf("the record went with the session: %v", err)
	}
}

// TestAsyncClaim: the async invocations of a gateway whose session is gone
// are claimed by another, each by one claimer only, and done ones are not.
func TestAsyncClaim(t *testing.T) {
	_, c := startEtcd(t)
	ctx := context.Background()
	owner := func(s *RunSession) Owner {
		t.Helper()
		var o Owner
		waitFor(t, "a session lease", 10*time.Second, func() bool { o = s.Owner(); return o != 0 })
		return o
	}
	a, b1, b2 := c.OpenRunSession("a", 5*time.Second), c.OpenRunSession("b1", 5*time.Second), c.OpenRunSession("b2", 5*time.Second)
	defer b1.Close()
	defer b2.Close()
	oa, o1, o2 := owner(a), owner(b1), owner(b2)
	const n = 40
	for i := 0; i < n; i++ {
		if err := c.PutAsync(ctx, oa, fmt.Sprintf("call-%d", i), []byte(fmt.Sprintf(`{"i":%d}`, i))); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.DoneAsync(ctx, oa, "call-0"); err != nil {
		t.Fatal(err)
	}
	if got, err := c.ClaimAsync(ctx, o1, 100); err != nil || len(got) != 0 {
		t.Fatalf("claimed %d of a live gateway's invocations (%v)", len(got), err)
	}
	a.Close() // its lease is revoked: the gateway is gone
	var mu sync.Mutex
	seen := map[string]int{}
	var wg sync.WaitGroup
	for _, o := range []Owner{o1, o2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				got, err := c.ClaimAsync(ctx, o, 7)
				if err != nil {
					t.Error(err)
					return
				}
				if len(got) == 0 {
					return
				}
				mu.Lock()
				for _, g := range got {
					seen[g.ID]++
					if want := `{"i":` + strings.TrimPrefix(g.ID, "call-") + `}`; string(g.Rec) != want {
						t.Errorf("claimed %s = %s, want %s", g.ID, g.Rec, want)
					}
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(seen) != n-1 || seen["call-0"] != 0 {
		t.Errorf("claimed %d distinct invocations, want %d (all but the done one): %v", len(seen), n-1, seen)
	}
	for id, k := range seen {
		if k != 1 {
			t.Errorf("%s claimed %d times", id, k)
		}
	}
	// Claimed ones belong to their claimer now: not claimable again.
	if got, err := c.ClaimAsync(ctx, o1, 100); err != nil || len(got) != 0 {
		t.Errorf("claimed %d again (%v)", len(got), err)
	}
	if err := c.PutAsync(ctx, o1, "x/y", []byte(`{}`)); err == nil {
		t.Error("a bad id was filed")
	}
	if err := c.PutAsync(ctx, o1, "big", make([]byte, MaxAsyncRecord+1)); err == nil {
		t.Error("an oversized record was filed")
	}
}
