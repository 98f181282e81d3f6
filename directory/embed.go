package directory

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// Timing of the embedded etcd: a 50 ms heartbeat and a 500 ms election
// timeout (etcd's defaults are 100 ms and 1 s). The election timeout
// bounds the shortest lease TTL etcd grants (ceil(1.5 x election) = 1 s),
// and so how fast a dead node leaves placement.
const (
	embedTickMs     = 50
	embedElectionMs = 500
)

// DefaultEmbedStartTimeout bounds StartEmbedded when
// EmbedConfig.StartTimeout is zero.
const DefaultEmbedStartTimeout = 30 * time.Second

// EmbedConfig configures StartEmbedded.
type EmbedConfig struct {
	// Dir is the data directory (created if missing, mode 0700). A
	// directory left by an earlier run is reused: the functions deployed
	// survive a restart of the process holding the embedded etcd.
	Dir string
	// Name is the member name (default "mitosis").
	Name string
	// ClientURL is where clients connect (default http://127.0.0.1:2379);
	// port 0 picks a free port (see Embedded.Endpoints).
	ClientURL string
	// PeerURL is the peer (raft) listener (default http://127.0.0.1:2380,
	// port 0 for a free one). A one-member cluster sends nothing there,
	// but etcd always listens.
	PeerURL string
	// Logger receives etcd's warnings and errors (nil: discarded).
	Logger *slog.Logger
	// StartTimeout bounds the start (default 30 s).
	StartTimeout time.Duration
}

// Embedded is a one-member etcd cluster running inside this process: the
// default directory of a one-machine platform.
type Embedded struct {
	etcd      *embed.Etcd
	endpoints []string
	once      sync.Once
}

// StartEmbedded starts a one-member etcd server in this process and waits
// until it serves clients. Close stops it.
func StartEmbedded(ctx context.Context, c EmbedConfig) (*Embedded, error) {
	if c.Dir == "" {
		return nil, errors.New("embedded etcd: no data directory given")
	}
	if c.Name == "" {
		c.Name = "mitosis"
	}
	if c.ClientURL == "" {
		c.ClientURL = "http://127.0.0.1:2379"
	}
	if c.PeerURL == "" {
		c.PeerURL = "http://127.0.0.1:2380"
	}
	if c.StartTimeout <= 0 {
		c.StartTimeout = DefaultEmbedStartTimeout
	}
	curl, err := parseHTTPURL("client", c.ClientURL)
	if err != nil {
		return nil, err
	}
	purl, err := parseHTTPURL("peer", c.PeerURL)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("embedded etcd: data directory: %w", err)
	}
	log := c.Logger
	if log == nil {
		log = slog.New(discardHandler{})
	}
	cfg := embed.NewConfig()
	cfg.Name = c.Name
	cfg.Dir = c.Dir
	cfg.TickMs = embedTickMs
	cfg.ElectionMs = embedElectionMs
	cfg.ListenClientUrls = []url.URL{*curl}
	cfg.AdvertiseClientUrls = []url.URL{*curl}
	cfg.ListenPeerUrls = []url.URL{*purl}
	cfg.AdvertisePeerUrls = []url.URL{*purl}
	cfg.InitialCluster = cfg.InitialClusterFromName(c.Name)
	// The directory is small and rewritten often (load updates every
	// second per node): keep one hour of history at most.
	cfg.AutoCompactionMode = embed.CompactorModePeriodic
	cfg.AutoCompactionRetention = "1h"
	cfg.Logger = "zap"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zapLogger(log))
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("embedded etcd at %s (data %s): %w (is another etcd or gateway using the port or the directory?)", c.ClientURL, c.Dir, err)
	}
	t := time.NewTimer(c.StartTimeout)
	defer t.Stop()
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: %w", err)
	case <-t.C:
		e.Close()
		return nil, fmt.Errorf("embedded etcd did not become ready within %s (data %s)", c.StartTimeout, c.Dir)
	case <-ctx.Done():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: %w", ctx.Err())
	}
	m := &Embedded{etcd: e}
	for _, l := range e.Clients {
		u := *curl
		u.Host = l.Addr().String()
		m.endpoints = append(m.endpoints, u.String())
	}
	return m, nil
}

// Endpoints returns the client URLs the server listens on, with the ports
// actually bound.
func (m *Embedded) Endpoints() []string { return append([]string(nil), m.endpoints...) }

// Err reports a fatal server error after the start.
func (m *Embedded) Err() <-chan error { return m.etcd.Err() }

// Close stops the server and releases its listeners and data directory
// lock. It is safe to call more than once.
func (m *Embedded) Close() {
	m.once.Do(m.etcd.Close)
}

func parseHTTPURL(kind, s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") || strings.Trim(u.Path, "/") != "" {
		return nil, fmt.Errorf("embedded etcd: %s URL %q: want http://HOST:PORT", kind, s)
	}
	return u, nil
}
