package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/client"
)

// freeAddr returns a 127.0.0.1 address with a port free right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// writeSecret writes a cluster secret file.
func writeSecret(t *testing.T, secret string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(path, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startNode starts a daemon named name listening for peers on listen.
func startNode(t *testing.T, name, listen, secretFile string, peers map[string]string, extra ...string) *testDaemon {
	t.Helper()
	args := []string{"--node", name, "--listen", listen, "--secret-file", secretFile}
	for n, a := range peers {
		args = append(args, "--peer", n+"="+a)
	}
	d := startDaemonWith(t, append(args, extra...)...)
	d.cli("ps").wantOK(t) // answered once the daemon (and its peer server) is up
	return d
}

// clusterPy prepares itself on the node of $MITOSIS_SOCKET after building a
// dict and a random blob; children print a digest of both. A child whose
// payload has "wait" prints READY first and waits for that file.
const clusterPy = `
import sys, os, time, hashlib
sys.path.insert(0, sys.argv[1])
import mitosis
data = {i: ("v%d" % i) * 16 for i in range(100000)}
blob = os.urandom(8 << 20)
def digest():
    h = hashlib.sha256()
    for k in sorted(data):
        h.update(("%d=%s;" % (k, data[k])).encode())
    return h.hexdigest() + "/" + hashlib.sha256(blob).hexdigest()[:16]
before = digest()
r = mitosis.prepare(name=sys.argv[2])
if r.is_parent:
    print("PARENT", r.seed, before, flush=True)
    sys.exit(0)
p = r.payload or {}
print("READY", r.child, flush=True)
w = p.get("wait")
if w:
    while not os.path.exists(w):
        time.sleep(0.02)
print("CHILD", r.child, digest(), flush=True)
sys.exit(p.get("code", 0))
`

// prepareClusterPy runs clusterPy against d and returns the seed id and
// the parent's digest.
func prepareClusterPy(t *testing.T, d *testDaemon, name string) (seed, digest string) {
	t.Helper()
	script := filepath.Join(t.TempDir(), "seed.py")
	if err := os.WriteFile(script, []byte(clusterPy), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("python3", script, filepath.Join(clientDir(t), "python"), name)
	cmd.Env = append(os.Environ(), client.SocketEnv+"="+d.sock)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("python seed: %v\n%s", err, out)
	}
	if _, err := fmt.Sscanf(strings.TrimSpace(string(out)), "PARENT %s %s", &seed, &digest); err != nil || !strings.HasPrefix(seed, "s-") {
		t.Fatalf("python parent printed %q", out)
	}
	return seed, digest
}

// child returns the child id of d's ps, or fails.
func findChild(t *testing.T, d *testDaemon, id string) client.ChildInfo {
	t.Helper()
	for _, k := range psJSON(t, d) {
		if k.ID == id {
			return k
		}
	}
	t.Fatalf("child %s not in ps", id)
	return client.ChildInfo{}
}

// waitChild polls d's ps until child id is no longer running.
func waitChild(t *testing.T, d *testDaemon, id string, timeout time.Duration) client.ChildInfo {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		k := findChild(t, d, id)
		if k.State != client.StateRunning {
			return k
		}
		if time.Now().After(deadline) {
			t.Fatalf("child %s still running after %v", id, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitLog polls a child's log until it contains substr.
func waitLog(t *testing.T, path, substr string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), substr) {
			return string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("log %s = %q, no %q after %v", path, b, substr, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func seedsJSON(t *testing.T, d *testDaemon) []client.SeedInfo {
	t.Helper()
	r := d.cli("seeds", "--json")
	r.wantOK(t)
	var seeds []client.SeedInfo
	if err := json.Unmarshal([]byte(r.stdout), &seeds); err != nil {
		t.Fatalf("seeds --json %q: %v", r.stdout, err)
	}
	return seeds
}

// TestClusterFork forks a Python seed of node a onto node b: the child
// sees the parent's memory, pages come from a once per node, leases keep
// the seed on a, and the metrics say so.
func TestClusterFork(t *testing.T) {
	secret := writeSecret(t, "cluster-secret-1")
	pa, pb, metricsB := freeAddr(t), freeAddr(t), freeAddr(t)
	a := startNode(t, "a", pa, secret, map[string]string{"b": pb})
	b := startNode(t, "b", pb, secret, map[string]string{"a": pa}, "--metrics", metricsB)
	seed, want := prepareClusterPy(t, a, "xpy")

	// Sent to a, created on b: forwarded, detached, printed as b/c-...
	r := a.cli("fork", "--node", "b", "a/"+seed, "--payload", `{"code":0}`)
	r.wantOK(t)
	ref := strings.TrimSpace(r.stdout)
	if !strings.HasPrefix(ref, "b/c-") {
		t.Fatalf("fork --node b printed %q, want b/c-...", r.stdout)
	}
	id1 := strings.TrimPrefix(ref, "b/")
	k1 := waitChild(t, b, id1, 20*time.Second)
	if k1.State != client.StateExited || k1.ExitCode != 0 {
		t.Fatalf("first child on b: %+v", k1)
	}
	log1 := waitLog(t, k1.Log, "CHILD "+id1, time.Second)
	if !strings.Contains(log1, want) {
		t.Fatalf("child on b printed %q, want digest %s", log1, want)
	}
	if k1.Source != "a" || k1.PagesFetched == 0 {
		t.Fatalf("first child on b: source %q fetched %d, want a and > 0", k1.Source, k1.PagesFetched)
	}
	r = b.cli("ps")
	r.wantOK(t)
	if !strings.Contains(r.stdout, "SOURCE") || !strings.Contains(r.stdout, "FETCHED") {
		t.Fatalf("ps has no SOURCE/FETCHED columns:\n%s", r.stdout)
	}

	// A second child on b (sent to b, bare NODE/SEED) maps what the first
	// brought into b's page cache.
	r = b.cli("fork", "--detach", "a/xpy")
	r.wantOK(t)
	id2 := strings.TrimSpace(r.stdout)
	k2 := waitChild(t, b, id2, 20*time.Second)
	if k2.State != client.StateExited || k2.ExitCode != 0 {
		t.Fatalf("second child on b: %+v", k2)
	}
	if log2 := waitLog(t, k2.Log, "CHILD "+id2, time.Second); !strings.Contains(log2, want) {
		t.Fatalf("second child printed %q, want digest %s", log2, want)
	}
	t.Logf("pages fetched: first child %d, second child %d (shared %d)", k1.PagesFetched, k2.PagesFetched, k2.PagesShared)
	if k2.PagesFetched*4 > k1.PagesFetched {
		t.Fatalf("second child fetched %d pages, first %d: the node cache was not reused", k2.PagesFetched, k1.PagesFetched)
	}

	// Attached on b (its own node): stdio is ours.
	r = b.cli("fork", "a/"+seed)
	r.wantOK(t)
	if !strings.Contains(r.stdout, want) {
		t.Fatalf("attached child on b printed %q", r.stdout)
	}

	// b lists the imported seed with its origin.
	var imported *client.SeedInfo
	for _, s := range seedsJSON(t, b) {
		if s.Origin == "a" {
			imported = &s
		}
	}
	if imported == nil || imported.Name != "xpy" {
		t.Fatalf("seeds on b: no seed imported from a")
	}
	if r = b.cli("seeds"); !strings.Contains(r.stdout, "imported from a") {
		t.Fatalf("seeds on b:\n%s", r.stdout)
	}

	// A running child on b holds a lease: rm on a fails without --force.
	wait := filepath.Join(t.TempDir(), "go")
	r = b.cli("fork", "--detach", "a/"+seed, "--payload", fmt.Sprintf(`{"wait":%q}`, wait))
	r.wantOK(t)
	id3 := strings.TrimSpace(r.stdout)
	waitLog(t, findChild(t, b, id3).Log, "READY", 10*time.Second)
	a.cli("rm", seed).wantFail(t, "1 child on node b still page from it; use --force")
	if s := seedsJSON(t, a); len(s) != 1 || s[0].Leases != 1 {
		t.Fatalf("seeds on a: %+v, want 1 lease", s)
	}
	if err := os.WriteFile(wait, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if k := waitChild(t, b, id3, 10*time.Second); k.State != client.StateExited {
		t.Fatalf("third child: %+v", k)
	}
	deadline := time.Now().Add(5 * time.Second)
	for seedsJSON(t, a)[0].Leases != 0 {
		if time.Now().After(deadline) {
			t.Fatal("lease not released after the child on b ended")
		}
		time.Sleep(20 * time.Millisecond)
	}

	// --allow: a seed not shared with b.
	sl := startSleep(t)
	r = a.cli("prepare", "--pid", fmt.Sprint(sl.Process.Pid), "--name", "private", "--allow", "c")
	r.wantOK(t)
	b.cli("fork", "--detach", "a/private").wantFail(t, "is not shared with node b")

	// Metrics on b.
	resp, err := http.Get("http://" + metricsB + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, name := range []string{
		`mitosis_forks_total{mode="lazy"} 4`, `mitosis_forks_total{mode="eager"}`, "mitosis_prepares_total",
		"mitosis_children_running", "mitosis_child_failures_total", "mitosis_faults_total",
		`mitosis_pages_total{kind="fetched"}`, `mitosis_pages_total{kind="shared"}`, `mitosis_pages_total{kind="copied"}`,
		`mitosis_pages_total{kind="zero"}`, `mitosis_pages_total{kind="eager"}`, `mitosis_peer_requests_total{type="pages"}`,
		"mitosis_peer_bytes_served_total", "mitosis_peer_bytes_fetched_total", "mitosis_cache_bytes",
		"mitosis_fetch_latency_seconds_bucket", "mitosis_restore_seconds_bucket",
	} {
		if !strings.Contains(string(body), name) {
			t.Errorf("metrics have no %s", name)
		}
	}
	if strings.Contains(string(body), "mitosis_peer_bytes_fetched_total 0\n") {
		t.Errorf("b fetched no bytes from a:\n%s", body)
	}

	// rm --force on a now that nothing pages from it.
	a.cli("rm", seed).wantOK(t)
}

// TestClusterSecurity: no secret, no peer server (unless --insecure); a
// node with another secret cannot fetch; a seed with a TTL goes away.
func TestClusterSecurity(t *testing.T) {
	dir := t.TempDir()
	r := runCLI(t, nil, "daemon", "--socket", filepath.Join(dir, "s1"), "--state-dir", filepath.Join(dir, "st1"),
		"--node", "x", "--listen", freeAddr(t))
	r.wantFail(t, "without a cluster secret")
	if !strings.Contains(r.stderr, "--insecure") {
		t.Fatalf("refusal %q does not mention --insecure", r.stderr)
	}
	ins := startDaemonWith(t, "--node", "x", "--listen", freeAddr(t), "--insecure")
	ins.cli("ps").wantOK(t)

	pa, pc := freeAddr(t), freeAddr(t)
	a := startNode(t, "a", pa, writeSecret(t, "right-secret"), nil)
	c := startNode(t, "c", pc, writeSecret(t, "wrong-secret"), map[string]string{"a": pa})
	sl := startSleep(t)
	r = a.cli("prepare", "--pid", fmt.Sprint(sl.Process.Pid), "--name", "sl", "--ttl", "1s")
	r.wantOK(t)
	start := time.Now()
	r = c.cli("fork", "--detach", "a/sl")
	r.wantFail(t, "authentication")
	if !strings.Contains(r.stderr, "node a") {
		t.Fatalf("auth failure %q does not name node a", r.stderr)
	}
	if time.Since(start) > 3*time.Second {
		t.Fatalf("auth failure took %v", time.Since(start))
	}
	// A forwarded fork to a node nobody runs fails fast, naming it.
	dead := startNode(t, "d", freeAddr(t), writeSecret(t, "s"), map[string]string{"gone": freeAddr(t)})
	start = time.Now()
	dead.cli("fork", "--node", "gone", "whatever").wantFail(t, "node gone")
	if time.Since(start) > 3*time.Second {
		t.Fatalf("fork to a dead node took %v", time.Since(start))
	}

	// The TTL removes the seed.
	deadline := time.Now().Add(5 * time.Second)
	for len(seedsJSON(t, a)) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("seed with --ttl 1s still there after 5s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestClusterOriginDies kills node a while its seed's child on b still
// has pages to fetch: the child fails quickly with an error in ps.
func TestClusterOriginDies(t *testing.T) {
	secret := writeSecret(t, "cluster-secret-2")
	pa, pb := freeAddr(t), freeAddr(t)
	a := startNode(t, "a", pa, secret, map[string]string{"b": pb})
	b := startNode(t, "b", pb, secret, map[string]string{"a": pa})
	seed, _ := prepareClusterPy(t, a, "doomed")
	wait := filepath.Join(t.TempDir(), "go")
	r := b.cli("fork", "--detach", "a/"+seed, "--payload", fmt.Sprintf(`{"wait":%q}`, wait))
	r.wantOK(t)
	id := strings.TrimSpace(r.stdout)
	waitLog(t, findChild(t, b, id).Log, "READY", 10*time.Second)

	if err := syscall.Kill(a.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-a.exited
	if err := os.WriteFile(wait, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	k := waitChild(t, b, id, 5*time.Second)
	took := time.Since(start)
	if k.State != client.StateFailed || k.Error == "" {
		t.Fatalf("child after its origin died: %+v, want state failed with an error", k)
	}
	if took > 2500*time.Millisecond {
		t.Fatalf("child took %v to fail", took)
	}
	t.Logf("child failed after %v: %s", took, k.Error)
	r = b.cli("ps")
	t.Logf("ps on b:\n%s", r.stdout)
	if !strings.Contains(r.stdout, "failed") || !strings.Contains(r.stdout, "paging") {
		t.Fatalf("ps on b:\n%s", r.stdout)
	}
	if !strings.Contains(b.stderr.String(), "child failed") {
		t.Fatalf("b did not log the failure:\n%s", b.stderr.String())
	}
	// Forwarding to the dead node fails fast and names it.
	start = time.Now()
	b.cli("fork", "--node", "a", seed).wantFail(t, "node a")
	if time.Since(start) > 3*time.Second {
		t.Fatalf("fork to dead node a took %v", time.Since(start))
	}
}

// writeTLS writes a CA and one certificate for 127.0.0.1 signed by it
// (every node uses the same one in the test).
func writeTLS(t *testing.T) (cert, key, ca string) {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "mitosis test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	nodeKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	nodeTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "node"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	nodeDER, err := x509.CreateCertificate(rand.Reader, nodeTmpl, caTmpl, &nodeKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(nodeKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	return write("node.pem", "CERTIFICATE", nodeDER), write("node.key", "EC PRIVATE KEY", keyDER), write("ca.pem", "CERTIFICATE", caDER)
}

// TestClusterTLS forks across two nodes whose peer traffic is TLS, with
// peers from a --peers-file.
func TestClusterTLS(t *testing.T) {
	cert, key, ca := writeTLS(t)
	secret := writeSecret(t, "tls-secret")
	pa, pb := freeAddr(t), freeAddr(t)
	peers := filepath.Join(t.TempDir(), "peers")
	if err := os.WriteFile(peers, []byte("# the cluster\na "+pa+"\nb "+pb+"  # node b\n\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tlsFlags := []string{"--peers-file", peers, "--tls-cert", cert, "--tls-key", key, "--tls-ca", ca}
	a := startNode(t, "a", pa, secret, nil, tlsFlags...)
	b := startNode(t, "b", pb, secret, nil, tlsFlags...)
	sl := startSleep(t)
	a.cli("prepare", "--pid", fmt.Sprint(sl.Process.Pid), "--name", "sl").wantOK(t)
	r := a.cli("fork", "--node", "b", "sl")
	r.wantOK(t)
	id := strings.TrimPrefix(strings.TrimSpace(r.stdout), "b/")
	k := findChild(t, b, id)
	if k.State != client.StateRunning || k.Source != "a" {
		t.Fatalf("child on b: %+v, want running with source a", k)
	}
	b.cli("rm", "--force", id).wantOK(t)
	// Its lease on a is released once its tree is gone.
	deadline := time.Now().Add(5 * time.Second)
	for seedsJSON(t, a)[0].Leases != 0 {
		if time.Now().After(deadline) {
			t.Fatal("lease of the killed child on b not released")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
