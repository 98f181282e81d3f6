package node

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/transport"
)

func TestMain(m *testing.M) {
	// Processes the tests prepare must not inherit stray fds (say a pipe
	// from whatever runs go test): mitosis refuses to prepare them.
	_ = unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	os.Exit(m.Run())
}

func TestNewRefusesPeersWithoutSecret(t *testing.T) {
	dir := t.TempDir()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	_, err := New(Config{Socket: filepath.Join(dir, "sock"), StateDir: dir, Logger: quiet, Node: "a", Listen: "127.0.0.1:0"})
	if err == nil || !strings.Contains(err.Error(), "without a cluster secret") || !strings.Contains(err.Error(), "--insecure") {
		t.Fatalf("New with --listen and no secret: %v", err)
	}
	_, err = New(Config{Socket: filepath.Join(dir, "sock"), StateDir: dir, Logger: quiet, Node: "a/b"})
	if err == nil || !strings.Contains(err.Error(), "may not contain") {
		t.Fatalf("New with node a/b: %v", err)
	}
	_, err = New(Config{Socket: filepath.Join(dir, "sock"), StateDir: dir, Logger: quiet, Node: "a",
		Peers: map[string]string{"b": "nowhere"}, Insecure: true})
	if err == nil || !strings.Contains(err.Error(), "IP:PORT") {
		t.Fatalf("New with a bad peer address: %v", err)
	}
}

// TestProviderAllowAndLeases serves a prepared `sleep` to peers over the
// real transport: --allow is enforced, leases block rm.
func TestProviderAllowAndLeases(t *testing.T) {
	dir := t.TempDir()
	secret := []byte("s3cret")
	d, err := New(Config{Socket: filepath.Join(dir, "sock"), StateDir: filepath.Join(dir, "state"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Node: "a", Listen: "127.0.0.1:0", Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx) }()
	defer func() {
		cancel()
		<-served
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}()
	sl := exec.Command("sleep", "1000")
	if err := sl.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sl.Process.Kill(); _ = sl.Wait() }()
	c, err := client.Dial(d.cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info, err := c.PrepareWith(client.PrepareRequest{PID: sl.Process.Pid, Name: "sl", Allow: []string{"b"}})
	if err != nil {
		t.Fatalf("prepare: %v", err)
	}

	dial := func(node string) *transport.Client {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		cl, err := transport.Dial(ctx, d.PeerAddr(), transport.Config{Node: node, Secret: secret})
		if err != nil {
			t.Fatalf("dial as %s: %v", node, err)
		}
		t.Cleanup(func() { cl.Close() })
		if cl.Peer() != "a" {
			t.Fatalf("peer = %q, want a", cl.Peer())
		}
		return cl
	}
	tctx := context.Background()
	cc := dial("c")
	if _, _, err := cc.Descriptor(tctx, info.ID); err == nil || !strings.Contains(err.Error(), "is not shared with node c") {
		t.Fatalf("descriptor as c: %v", err)
	}
	cb := dial("b")
	if _, _, err := cb.Descriptor(tctx, "s-00000000"); !errors.Is(err, transport.ErrUnknownSeed) {
		t.Fatalf("descriptor of an unknown seed: %v, want ErrUnknownSeed", err)
	}
	raw, _, err := cb.Descriptor(tctx, "sl")
	if err != nil {
		t.Fatalf("descriptor as b: %v", err)
	}
	desc, err := descriptor.Decode(raw)
	if err != nil || desc.SeedID != info.ID || desc.Name != "sl" {
		t.Fatalf("descriptor: %v, seed %q name %q, want %s sl", err, desc.SeedID, desc.Name, info.ID)
	}
	if err := cb.Lease(tctx, info.ID, +1); err != nil {
		t.Fatalf("lease: %v", err)
	}
	seeds, err := c.Seeds()
	if err != nil || len(seeds) != 1 || seeds[0].Leases != 1 || strings.Join(seeds[0].LeaseNodes, ",") != "b" {
		t.Fatalf("seeds = %+v, %v; want one lease of b", seeds, err)
	}
	if err := c.Remove(info.ID, false); err == nil || !strings.Contains(err.Error(), "1 child on node b still page from it; use --force") {
		t.Fatalf("rm with a lease: %v", err)
	}
	if err := cb.Lease(tctx, info.ID, -1); err != nil {
		t.Fatalf("release: %v", err)
	}
	if err := c.Remove(info.ID, false); err != nil {
		t.Fatalf("rm after the release: %v", err)
	}
	// Releasing a lease on a removed seed is not an error.
	if err := cb.Lease(tctx, info.ID, -1); err != nil {
		t.Fatalf("release after rm: %v", err)
	}
}

func TestSplitSeedRef(t *testing.T) {
	for _, c := range []struct{ in, node, seed string }{
		{"s-1", "", "s-1"}, {"a/s-1", "a", "s-1"}, {"a/web", "a", "web"}, {"/x", "", "x"},
	} {
		if n, s := splitSeedRef(c.in); n != c.node || s != c.seed {
			t.Errorf("splitSeedRef(%q) = %q, %q", c.in, n, s)
		}
	}
	for _, line := range []string{`{"op":"fork","seed":"/x"}`, `{"op":"fork","seed":"a/"}`, `{"op":"fork","seed":"a/b/c"}`, `{"op":"fork","seed":"x","node":"a b"}`} {
		if _, err := decodeRequest([]byte(line)); err == nil {
			t.Errorf("decodeRequest(%s) accepted", line)
		}
	}
}
