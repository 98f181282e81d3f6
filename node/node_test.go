package node

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/client"
)

// startDaemon runs an in-process daemon on a temp socket until the test ends.
func startDaemon(t *testing.T) (*Daemon, string) {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "sock")
	d, err := New(Config{Socket: sock, StateDir: filepath.Join(dir, "state"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if _, err := os.Stat(sock); !os.IsNotExist(err) {
			t.Errorf("socket %s still exists after Close (err %v)", sock, err)
		}
	})
	return d, sock
}

// rawConn is a test connection speaking raw lines.
type rawConn struct {
	t *testing.T
	c *net.UnixConn
	r *bufio.Reader
}

func dialRaw(t *testing.T, sock string) *rawConn {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return &rawConn{t: t, c: c, r: bufio.NewReader(c)}
}

func (rc *rawConn) send(b []byte) {
	rc.t.Helper()
	if _, err := rc.c.Write(b); err != nil {
		rc.t.Fatalf("write: %v", err)
	}
}

func (rc *rawConn) recv() map[string]any {
	rc.t.Helper()
	line, err := rc.r.ReadBytes('\n')
	if err != nil {
		rc.t.Fatalf("read response: %v", err)
	}
	var m map[string]any
	if err := json.Unmarshal(line, &m); err != nil {
		rc.t.Fatalf("response %q is not JSON: %v", line, err)
	}
	return m
}

func wantError(t *testing.T, m map[string]any, substr string) {
	t.Helper()
	if m["ok"] != false {
		t.Fatalf("response %v: want ok=false", m)
	}
	msg, _ := m["error"].(string)
	if !strings.Contains(msg, substr) {
		t.Fatalf("error %q does not mention %q", msg, substr)
	}
}

func TestMalformedRequestsKeepServing(t *testing.T) {
	_, sock := startDaemon(t)
	rc := dialRaw(t, sock)

	rc.send([]byte("garbage\n"))
	wantError(t, rc.recv(), "malformed request")

	rc.send([]byte("{\"op\":\"bogus\"}\n"))
	wantError(t, rc.recv(), `unknown op "bogus"`)

	rc.send([]byte("\n"))
	wantError(t, rc.recv(), "empty request")

	rc.send([]byte(`{"op":"fork","seed":"x","count":-3}` + "\n"))
	wantError(t, rc.recv(), "count")

	// A line over 1 MiB: one error, the rest of the line is skipped.
	done := make(chan struct{})
	go func() {
		defer close(done)
		huge := append([]byte(`{"op":"seeds","x":"`), make([]byte, 2*client.MaxLine)...)
		for i := 19; i < len(huge); i++ {
			huge[i] = 'a'
		}
		huge = append(huge, "\"}\n"...)
		_, _ = rc.c.Write(huge)
	}()
	wantError(t, rc.recv(), "longer than")
	<-done

	rc.send([]byte(`{"op":"seeds"}` + "\n"))
	if m := rc.recv(); m["ok"] != true {
		t.Fatalf("seeds after malformed lines: %v", m)
	}
	// Another connection is served too.
	rc2 := dialRaw(t, sock)
	rc2.send([]byte(`{"op":"ps"}` + "\n"))
	if m := rc2.recv(); m["ok"] != true {
		t.Fatalf("ps on a second connection: %v", m)
	}
}

func TestFDsRules(t *testing.T) {
	_, sock := startDaemon(t)
	rc := dialRaw(t, sock)
	sendFDs := func(line string, n int) {
		t.Helper()
		fds := make([]int, n)
		for i := range fds {
			fds[i] = int(os.Stderr.Fd())
		}
		if _, _, err := rc.c.WriteMsgUnix([]byte(line+"\n"), unix.UnixRights(fds...), nil); err != nil {
			t.Fatalf("sendmsg: %v", err)
		}
	}
	sendFDs(`{"op":"ps"}`, 1)
	wantError(t, rc.recv(), "unexpected file descriptors")
	sendFDs(`{"op":"fork","seed":"s-nope","stdio":true}`, 2)
	wantError(t, rc.recv(), "exactly 3 file descriptors")
	sendFDs(`{"op":"fork","seed":"s-nope","stdio":true}`, 3)
	wantError(t, rc.recv(), `no seed "s-nope"`)
	rc.send([]byte(`{"op":"fork","seed":"s-nope","stdio":true}` + "\n"))
	wantError(t, rc.recv(), "got 0")
}

func TestClientAgainstDaemon(t *testing.T) {
	_, sock := startDaemon(t)
	c, err := client.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if seeds, err := c.Seeds(); err != nil || len(seeds) != 0 {
		t.Fatalf("Seeds = %v, %v; want empty", seeds, err)
	}
	if kids, err := c.PS(); err != nil || len(kids) != 0 {
		t.Fatalf("PS = %v, %v; want empty", kids, err)
	}
	if pid, _, err := c.Ping(); err != nil || pid != os.Getpid() {
		t.Fatalf("Ping = %d, %v", pid, err)
	}
	if _, err := c.Prepare(999999999, ""); err == nil || !strings.Contains(err.Error(), "999999999") {
		t.Fatalf("Prepare(999999999) error %v does not name the pid", err)
	}
	if _, err := c.Fork(client.ForkRequest{Seed: "s-nonexistent"}); err == nil || !strings.Contains(err.Error(), "s-nonexistent") {
		t.Fatalf("Fork error %v does not name the seed", err)
	}
	if _, _, err := c.ForkAttached("s-nonexistent", false, os.Stdin, os.Stdout, os.Stderr, nil); err == nil || !strings.Contains(err.Error(), "s-nonexistent") {
		t.Fatalf("ForkAttached error %v does not name the seed", err)
	}
	if err := c.Remove("c-00000000", false); err == nil || !strings.Contains(err.Error(), "c-00000000") {
		t.Fatalf("Remove error %v does not name the id", err)
	}
}

func TestSecondDaemonRefused(t *testing.T) {
	d, sock := startDaemon(t)
	_, err := New(Config{Socket: sock, StateDir: filepath.Join(t.TempDir(), "state"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err == nil || !strings.Contains(err.Error(), "already listening") {
		t.Fatalf("second New: %v; want already listening", err)
	}
	_ = d
}

func TestStaleSocketRemoved(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // leaves a socket file nobody answers on
	d, err := New(Config{Socket: sock, StateDir: filepath.Join(dir, "state"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatalf("New over a stale socket: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	// Not a socket: refused.
	if err := os.WriteFile(sock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{Socket: sock, StateDir: filepath.Join(dir, "state")}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("New over a regular file: %v", err)
	}
}

// TestLineReaderFDs checks fds are handed out with the line they were sent
// with, not an earlier one.
func TestLineReaderFDs(t *testing.T) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a := os.NewFile(uintptr(pair[0]), "a")
	b := os.NewFile(uintptr(pair[1]), "b")
	defer a.Close()
	defer b.Close()
	fc, err := net.FileConn(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	uc := fc.(*net.UnixConn)
	if _, err := a.Write([]byte(`{"op":"ps"}` + "\n" + `{"op":"fo`)); err != nil {
		t.Fatal(err)
	}
	rights := unix.UnixRights(0, 1, 2)
	if err := unix.Sendmsg(int(a.Fd()), []byte(`rk"}`+"\n"+`{"op":"seeds"}`+"\n"), rights, nil, 0); err != nil {
		t.Fatal(err)
	}
	r := newLineReader(uc)
	defer r.close()
	want := []struct {
		line string
		fds  int
	}{{`{"op":"ps"}`, 0}, {`{"op":"fork"}`, 0}, {`{"op":"seeds"}`, 3}}
	// The fds arrived with the recvmsg ending in the third line's bytes.
	for i, w := range want {
		line, fds, err := r.next()
		if err != nil {
			t.Fatalf("line %d: %v", i, err)
		}
		closeFDs(fds)
		if string(line) != w.line {
			t.Fatalf("line %d = %q, want %q", i, line, w.line)
		}
		if i == 0 && len(fds) != 0 {
			t.Fatalf("line 0 got %d fds", len(fds))
		}
		if i > 0 && len(fds) != 0 && len(fds) != 3 {
			t.Fatalf("line %d got %d fds", i, len(fds))
		}
	}
}

func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{
		`{"op":"seeds"}`, `{"op":"ps"}`, `{"op":"prepare","pid":1,"name":"x"}`,
		`{"op":"prepare-self","fd":3}`, `{"op":"fork","seed":"s-1","count":3,"eager":true,"payload":{"a":[1,2]}}`,
		`{"op":"fork","seed":"w","stdio":true}`, `{"op":"rm","id":"s-1","force":true}`,
		`garbage`, ``, `{}`, `[]`, `{"op":1}`, `{"op":"fork","count":1e99}`, "{\"op\":\"ps\"}\x00",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		req, err := decodeRequest(line)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		switch req.Op {
		case client.OpPrepare:
			if req.PID <= 0 {
				t.Fatalf("accepted prepare with pid %d", req.PID)
			}
		case client.OpPrepareSelf:
			if req.FD == nil || *req.FD < 0 {
				t.Fatal("accepted prepare-self without fd")
			}
		case client.OpFork:
			if req.Seed == "" || req.Count < 1 || req.Count > maxCount || (req.Stdio && req.Count != 1) {
				t.Fatalf("accepted bad fork %+v", req)
			}
			if len(req.Payload) > 0 && !json.Valid(req.Payload) {
				t.Fatal("accepted invalid payload")
			}
		case client.OpRm:
			if req.ID == "" {
				t.Fatal("accepted rm without id")
			}
		case client.OpSeeds, client.OpPS, client.OpPing:
		default:
			t.Fatalf("accepted unknown op %q", req.Op)
		}
		if _, err := json.Marshal(req); err != nil {
			t.Fatalf("re-encode: %v", err)
		}
	})
}

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestHostileClients: requests of the wrong types, a client that stalls
// mid-line, one that floods requests and never reads the answers, and one
// that attaches descriptors to every line neither crash the daemon nor hold
// it up for others, and every descriptor they cost is released.
func TestHostileClients(t *testing.T) {
	defer func(d time.Duration) { replyTimeout = d }(replyTimeout)
	replyTimeout = 300 * time.Millisecond
	_, sock := startDaemon(t)
	base := openFDs(t)

	rc := dialRaw(t, sock)
	for _, tc := range []struct{ line, want string }{
		{`{"op":"prepare","pid":"12"}`, "malformed request"},
		{`{"op":["seeds"]}`, "malformed request"},
		{`{"op":"fork","seed":7}`, "malformed request"},
		{`{"op":"fork","seed":"x","count":"3"}`, "malformed request"},
		{`{"op":"rm","id":null}`, "rm"},
		{`{"op":"prepare","pid":-1}`, "pid"},
		{`{"op":"prepare","pid":99999999}`, "99999999"},
		{`{"op":"fork","seed":"no-such-seed"}`, "no-such-seed"},
		{`{"op":"prepare","pid":1,"share":["root"]}`, `share "root"`},
		{`{"op":"prepare","pid":1,"ttl":"soon"}`, "ttl"},
		{"{\"op\":\"seeds\"}\x00{", "malformed request"},
	} {
		rc.send([]byte(tc.line + "\n"))
		wantError(t, rc.recv(), tc.want)
	}

	// A client stalled in the middle of a line holds only itself.
	slow := dialRaw(t, sock)
	slow.send([]byte(`{"op":"se`))
	other := dialRaw(t, sock)
	start := time.Now()
	other.send([]byte(`{"op":"ping"}` + "\n"))
	if m := other.recv(); m["ok"] != true || time.Since(start) > 2*time.Second {
		t.Fatalf("ping beside a stalled client: %v after %v", m, time.Since(start))
	}
	slow.send([]byte("eds\"}\n"))
	if m := slow.recv(); m["ok"] != true {
		t.Fatalf("the stalled client's request, once finished: %v", m)
	}

	// A flood of requests whose answers are never read: the daemon gives
	// up on the connection after replyTimeout instead of blocking on it.
	flood := dialRaw(t, sock)
	_ = flood.c.SetWriteBuffer(4096)
	_ = flood.c.SetReadBuffer(4096)
	_ = flood.c.SetDeadline(time.Time{})
	flooded := make(chan error, 1)
	go func() {
		line := []byte(`{"op":"ps"}` + "\n")
		for {
			if _, err := flood.c.Write(line); err != nil {
				flooded <- err
				return
			}
		}
	}()
	select {
	case err := <-flooded:
		// The daemon closed the connection: our write failed.
		if !errors.Is(err, unix.EPIPE) && !errors.Is(err, unix.ECONNRESET) {
			t.Fatalf("flood ended with %v; want the daemon to close the connection (EPIPE)", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the daemon still holds a connection whose replies are not read, 10 s on")
	}
	flood.c.Close()

	// Descriptors attached to requests that take none are closed.
	fdc := dialRaw(t, sock)
	f, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50; i++ {
		rights := unix.UnixRights(int(f.Fd()), int(f.Fd()), int(f.Fd()))
		if _, _, err := fdc.c.WriteMsgUnix([]byte(`{"op":"seeds"}`+"\n"), rights, nil); err != nil {
			t.Fatal(err)
		}
		wantError(t, fdc.recv(), "unexpected file descriptors")
	}
	f.Close()

	// Still serving, and back to the descriptors it started with once the
	// clients are gone.
	for _, c := range []*rawConn{rc, slow, other, fdc} {
		c.c.Close()
	}
	check := dialRaw(t, sock)
	check.send([]byte(`{"op":"ping"}` + "\n"))
	if m := check.recv(); m["ok"] != true {
		t.Fatalf("ping after the hostile clients: %v", m)
	}
	check.c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for openFDs(t) > base {
		if time.Now().After(deadline) {
			t.Fatalf("open descriptors %d after the hostile clients left; %d before", openFDs(t), base)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
