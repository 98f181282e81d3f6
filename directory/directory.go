// Package directory is the cluster directory of the mitosis serverless
// platform: which nodes exist (with their transport address, capacity and
// load), which functions are deployed, and where their seeds live. It is
// kept in etcd, the control plane only: pages and descriptors still travel
// over the daemons' own transport.
//
// Keys, under Options.Prefix (default "/mitosis/"):
//
//	nodes/<node>             NodeInfo JSON, attached to the node's lease
//	functions/<name>         {"name","created","spec"} JSON; spec is opaque here
//	seeds/<function>/<node>  SeedRecord JSON, attached to the holding node's lease
//	stages/<function>/<node>/<seed>  StageLease JSON, attached to a lease of its own
//
// Liveness is by lease: a node registers under a lease of a few seconds
// (Register) and keeps it alive in the background; when its process dies,
// etcd expires the lease and deletes the node's key and its seeds with it,
// so every View drops the node within the TTL plus etcd's expiry check
// (about half a second).
//
// Two clocks bound that: etcd refuses lease TTLs below
// ceil(1.5 x election timeout), which is 2 s with etcd's defaults
// (100 ms heartbeat, 1 s election) and 1 s for the embedded server started
// by StartEmbedded (50 ms heartbeat, 500 ms election); an etcd that raises
// a requested TTL is logged by Register. The client side gives up on a
// lease (Registration.Lost) when no keepalive answer came for one TTL.
package directory

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
	"unicode"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultPrefix is the key prefix used when Options.Prefix is empty.
const DefaultPrefix = "/mitosis/"

// DefaultDialTimeout bounds Open when Options.DialTimeout is zero.
const DefaultDialTimeout = 2 * time.Second

// MaxNameLen is the longest node or function name accepted, in bytes
// (the same bound as the transport's node names).
const MaxNameLen = 64

// Errors returned (wrapped, with the name concerned) by the directory.
var (
	// ErrNotFound: the function, or the node's seed, does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists: a function of that name already exists.
	ErrExists = errors.New("already exists")
	// ErrNoTTL is returned when renewing a function created without a TTL.
	ErrNoTTL = errors.New("has no TTL")
	// ErrNodeExists: another live process holds the node name.
	ErrNodeExists = errors.New("node name held by another live process")
	// ErrLost: the registration's lease is gone (expired or revoked);
	// Register again.
	ErrLost = errors.New("registration lost")
)

// Options configures Open. The zero value is usable.
type Options struct {
	// Prefix is the key prefix of the directory (default "/mitosis/"); a
	// missing trailing '/' is added.
	Prefix string
	// DialTimeout bounds connecting to etcd, in Open and in every reload
	// attempt of a View (default 2s).
	DialTimeout time.Duration
	// Logger receives the package's and etcd client's warnings and errors
	// (nil: discarded).
	Logger *slog.Logger
	// TLS, if set, is used for the connections to etcd.
	TLS *tls.Config
	// Username and Password, if set, authenticate to etcd.
	Username, Password string
}

// Client is a connection to the directory. It is safe for concurrent use.
type Client struct {
	cli       *clientv3.Client
	prefix    string
	endpoints []string
	timeout   time.Duration
	log       *slog.Logger

	mu     sync.Mutex
	closed bool
	regs   map[*Registration]struct{}
	views  map[*View]struct{}
	// lost holds, per node name, the leases of this client's registrations
	// that were lost on the client side: etcd may still keep them alive
	// for up to a TTL, and Register takes such a name over instead of
	// failing with ErrNodeExists.
	lost map[string]clientv3.LeaseID

	// runLeases is the lease new run records share (PutRun).
	runLeases runLeases
}

// Open connects to the etcd cluster at endpoints (host:port or URLs) and
// checks that it answers, within opts.DialTimeout: an unreachable cluster
// fails fast with an error naming the endpoints.
func Open(ctx context.Context, endpoints []string, opts Options) (*Client, error) {
	if len(endpoints) == 0 {
		return nil, errors.New("open directory: no etcd endpoints given (--etcd-endpoints, or start the embedded etcd)")
	}
	prefix := opts.Prefix
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	timeout := opts.DialTimeout
	if timeout <= 0 {
		timeout = DefaultDialTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(discardHandler{})
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: timeout,
		TLS:         opts.TLS,
		Username:    opts.Username,
		Password:    opts.Password,
		Logger:      zapLogger(log.With("component", "etcd-client")),
	})
	if err != nil {
		return nil, fmt.Errorf("open directory at %s: %w", strings.Join(endpoints, ","), err)
	}
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := cli.Get(pctx, prefix+"nodes/", clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil {
		cli.Close()
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			return nil, fmt.Errorf("open directory: etcd at %s did not answer within %s (is it running and reachable? see --etcd-endpoints): %w",
				strings.Join(endpoints, ","), timeout, err)
		}
		return nil, fmt.Errorf("open directory: etcd at %s: %w", strings.Join(endpoints, ","), err)
	}
	return &Client{
		cli:       cli,
		prefix:    prefix,
		endpoints: append([]string(nil), endpoints...),
		timeout:   timeout,
		log:       log,
		regs:      make(map[*Registration]struct{}),
		views:     make(map[*View]struct{}),
		lost:      make(map[string]clientv3.LeaseID),
	}, nil
}

// Close closes the client's views, stops the keepalives of its
// registrations WITHOUT revoking their leases (the nodes expire after their
// TTL, as if the process had died: call Registration.Close first for a clean
// exit) and closes the connection.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	regs := make([]*Registration, 0, len(c.regs))
	for r := range c.regs {
		regs = append(regs, r)
	}
	views := make([]*View, 0, len(c.views))
	for v := range c.views {
		views = append(views, v)
	}
	c.mu.Unlock()
	for _, v := range views {
		v.Close()
	}
	for _, r := range regs {
		r.stop()
	}
	if err := c.cli.Close(); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("close directory client: %w", err)
	}
	return nil
}

// track registers a view or registration with the client, refusing when
// the client is closed.
func (c *Client) track(r *Registration, v *View) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("directory client is closed")
	}
	if r != nil {
		c.regs[r] = struct{}{}
	}
	if v != nil {
		c.views[v] = struct{}{}
	}
	return nil
}

func (c *Client) untrack(r *Registration, v *View) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.regs, r)
	delete(c.views, v)
}

func (c *Client) nodeKey(name string) string     { return c.prefix + "nodes/" + name }
func (c *Client) functionKey(name string) string { return c.prefix + "functions/" + name }
func (c *Client) seedKey(fn, node string) string { return c.prefix + "seeds/" + fn + "/" + node }

// checkName validates a node or function name: it becomes one key
// segment, so it may not be empty, contain '/' or white space or control
// characters, or exceed MaxNameLen bytes.
func checkName(kind, name string) error {
	if name == "" {
		return fmt.Errorf("%s name is empty", kind)
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("%s name %q is longer than %d bytes", kind, name, MaxNameLen)
	}
	if name == "." || name == ".." {
		return fmt.Errorf("%s name %q is not allowed", kind, name)
	}
	for _, r := range name {
		if r == '/' || unicode.IsSpace(r) || unicode.IsControl(r) || r == unicode.ReplacementChar {
			return fmt.Errorf("%s name %q may not contain '/', white space or control characters", kind, name)
		}
	}
	return nil
}
