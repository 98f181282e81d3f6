package netlab

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// Ports of a lab gateway.
const (
	GatewayPort = 8080
	EtcdPort    = 2379
	etcdPeer    = 2380
)

// Gateway is a `mitosis gateway` (with its embedded etcd) running on a
// daemon-less host of the lab.
type Gateway struct {
	Host *Node
	// URL is the API's base URL (http://IP:8080), Etcd the embedded etcd's
	// client URL (the daemons' --etcd-endpoints).
	URL, Etcd string
	// Token authenticates to the API ("Authorization: Bearer TOKEN").
	Token string
	// StateDir holds the embedded etcd's data; LogFile the output.
	StateDir, LogFile string

	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// EtcdURL is the client URL of the etcd a gateway on host serves: give it
// to the daemons (--etcd-endpoints) before the lab starts them.
func EtcdURL(host *Node) string { return fmt.Sprintf("http://%s:%d", host.IP, EtcdPort) }

// StartGateway starts a gateway on host (a NodeSpec with NoDaemon), with
// token as its only credential and extra flags, and waits until it serves.
func (l *Lab) StartGateway(host *Node, token string, args ...string) (*Gateway, error) {
	g := &Gateway{Host: host, URL: fmt.Sprintf("http://%s:%d", host.IP, GatewayPort), Etcd: EtcdURL(host), Token: token,
		StateDir: filepath.Join(l.cfg.Dir, host.Name+"-gateway"), LogFile: filepath.Join(l.cfg.Dir, host.Name+"-gateway.log"),
		done: make(chan struct{})}
	tokens := filepath.Join(l.cfg.Dir, host.Name+"-tokens")
	if err := os.WriteFile(tokens, []byte(token+"\n"), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(g.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	argv := append([]string{l.cfg.Bin, "gateway", "--listen", fmt.Sprintf("%s:%d", host.IP, GatewayPort),
		"--state-dir", g.StateDir, "--etcd-listen", g.Etcd, "--etcd-peer-listen", fmt.Sprintf("http://%s:%d", host.IP, etcdPeer),
		"--secret-file", host.SecretFile, "--token-file", tokens}, args...)
	g.cmd = host.Command(argv...)
	g.cmd.Stdout, g.cmd.Stderr = logf, logf
	g.cmd.Dir = l.cfg.Dir
	if err := g.cmd.Start(); err != nil {
		return nil, fmt.Errorf("netlab: start gateway: %w", err)
	}
	go func() {
		g.err = g.cmd.Wait()
		close(g.done)
	}()
	hc := g.Client(2 * time.Second)
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-g.done:
			return nil, fmt.Errorf("netlab: gateway exited at start (%v); log:\n%s", g.err, Tail(g.LogFile, 20))
		default:
		}
		if resp, err := hc.Get(g.URL + "/metrics"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return g, nil
			}
		}
		if time.Now().After(deadline) {
			_ = g.Stop(5 * time.Second)
			return nil, fmt.Errorf("netlab: gateway did not serve within 30 s; log:\n%s", Tail(g.LogFile, 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Client returns an HTTP client whose connections are made inside the
// gateway host's network namespace (so it reaches the gateway from the
// host), with keep-alive and a pool sized for load tests.
func (g *Gateway) Client(timeout time.Duration) *http.Client {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := g.Host.InNetns(func() error {
			var d net.Dialer
			var err error
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
	return &http.Client{Timeout: timeout, Transport: &http.Transport{DialContext: dial, MaxIdleConns: 2048,
		MaxIdleConnsPerHost: 2048, IdleConnTimeout: time.Minute}}
}

// Done is closed when the gateway process has exited.
func (g *Gateway) Done() <-chan struct{} { return g.done }

// Stop sends SIGTERM and expects a clean exit within timeout (then SIGKILL
// and an error), and removes the embedded etcd's data.
func (g *Gateway) Stop(timeout time.Duration) error {
	defer os.RemoveAll(g.StateDir)
	select {
	case <-g.done:
		return nil
	default:
	}
	_ = g.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-g.done:
		if g.err != nil {
			return fmt.Errorf("netlab: gateway: exit on SIGTERM: %v; log:\n%s", g.err, Tail(g.LogFile, 20))
		}
		return nil
	case <-time.After(timeout):
		_ = g.cmd.Process.Signal(syscall.SIGKILL)
		<-g.done
		return fmt.Errorf("netlab: gateway did not exit within %v of SIGTERM (killed); log:\n%s", timeout, Tail(g.LogFile, 20))
	}
}
