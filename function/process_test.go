package function

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeFn(t *testing.T, src string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "handler.py"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func startServe(t *testing.T, dir string) (*Process, Status, error) {
	t.Helper()
	if _, err := os.Stat("/usr/bin/python3"); err != nil {
		t.Skip("no /usr/bin/python3")
	}
	bs, err := InstallBootstrap(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	spec := &Spec{Name: "t", Image: dir, Policy: PolicyKeepAlive}
	if err := spec.Validate(); err != nil {
		t.Fatal(err)
	}
	p, err := Start(StartOptions{Spec: spec, Mode: ModeServe, Bootstrap: bs, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		select {
		case <-p.Done():
		case <-time.After(10 * time.Second):
			t.Errorf("pid %d not reaped", p.PID)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := p.WaitReady(ctx)
	return p, st, err
}

func TestServe(t *testing.T) {
	dir := writeFn(t, `
import os
STATE = {"n": 0}
def handle(req):
    STATE["n"] += 1
    if req == "boom":
        raise ValueError("bad request: " + req)
    if req == "env":
        return os.environ.get("Http_Method", "") + " " + os.environ.get("Http_Path", "")
    print("printed")
    return "%s:%d" % (req, STATE["n"])
`)
	p, st, err := startServe(t, dir)
	if err != nil || !st.Ready {
		t.Fatalf("ready: %+v %v", st, err)
	}
	ctx := context.Background()
	cases := []struct {
		req    Request
		status int
		body   string
		err    string
	}{
		{Request{Body: []byte("a")}, 200, "printed\na:1\n", ""},
		{Request{Body: []byte("b")}, 200, "printed\nb:2\n", ""},
		{Request{Body: []byte("boom")}, 500, "", "ValueError: bad request: boom"},
		{Request{Body: []byte("env"), Method: "PUT", Path: "/x"}, 200, "PUT /x\n", ""},
		{Request{Body: []byte("\xff\x00")}, 200, "printed\n\xc3\xbf\x00:5\n", ""},
	}
	for _, c := range cases {
		r, err := p.Invoke(ctx, c.req)
		if err != nil {
			t.Fatalf("%q: %v", c.req.Body, err)
		}
		if r.Status != c.status || string(r.Body) != c.body || r.Error != c.err {
			t.Errorf("%q: got %d %q %q, want %d %q %q", c.req.Body, r.Status, r.Body, r.Error, c.status, c.body, c.err)
		}
	}
}

func TestInitError(t *testing.T) {
	dir := writeFn(t, "import json\nx = 1 / 0\ndef handle(req):\n    return req\n")
	_, _, err := startServe(t, dir)
	if !errors.Is(err, ErrInit) || !strings.Contains(err.Error(), "ZeroDivisionError: division by zero") {
		t.Fatalf("err = %v, want ErrInit with the traceback's last line", err)
	}
	dir = writeFn(t, "def handler(req):\n    return req\n")
	_, _, err = startServe(t, dir)
	if !errors.Is(err, ErrInit) || !strings.Contains(err.Error(), "no handle(req)") {
		t.Fatalf("err = %v, want missing handle", err)
	}
}

func TestTimeoutAndCrash(t *testing.T) {
	dir := writeFn(t, "import os, time\ndef handle(req):\n    if req == 'die':\n        os._exit(3)\n    time.sleep(60)\n")
	p, _, err := startServe(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := p.Invoke(ctx, Request{Body: []byte("slow")}); !errors.Is(err, ErrTimeout) {
		t.Fatalf("slow handler: err = %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("timeout took %v", d)
	}
	p.Kill()
	<-p.Done()

	p, _, err = startServe(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	_, err = p.Invoke(context.Background(), Request{Body: []byte("die")})
	if err == nil || !strings.Contains(err.Error(), "exit code 3") {
		t.Fatalf("crashing handler: err = %v, want exit code 3", err)
	}
}

func TestSpecValidate(t *testing.T) {
	dir := writeFn(t, "def handle(r): return r\n")
	cases := []struct {
		spec Spec
		want string
	}{
		{Spec{Name: "ok", Image: dir}, ""},
		{Spec{Name: "Bad", Image: dir}, "lower-case"},
		{Spec{Name: "x", Image: "rel/path"}, "absolute"},
		{Spec{Name: "x", Image: "/nonexistent-dir"}, "not a directory"},
		{Spec{Name: "x", Image: t.TempDir()}, "no handler.py"},
		{Spec{Name: "x", Image: dir, Policy: "warm"}, "unknown policy"},
		{Spec{Name: "x", Image: dir, Runtime: "node"}, "not supported"},
		{Spec{Name: "x", Image: dir, Env: map[string]string{"A=B": "c"}}, "environment"},
	}
	for _, c := range cases {
		err := c.spec.Validate()
		if c.want == "" && err != nil || c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)) {
			t.Errorf("%+v: err = %v, want %q", c.spec, err, c.want)
		}
	}
}
