package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/pager"
	"github.com/mitosis-fork/mitosis/transport"
)

// Bounds on peer operations: nothing in the daemon waits on a dead peer
// longer than these.
const (
	// dialTimeout bounds connecting (and authenticating) to a peer.
	dialTimeout = 2 * time.Second
	// peerTimeout bounds one small peer request (descriptor, lease).
	peerTimeout = 3 * time.Second
	// leaseReleaseTimeout bounds dropping a lease when a child tree ends.
	leaseReleaseTimeout = 2 * time.Second
	// forkBaseTimeout + forkPerChild*count bounds a forwarded fork.
	forkBaseTimeout = 10 * time.Second
	forkPerChild    = 200 * time.Millisecond
)

// peerSet holds the configured peers and the transport clients to them,
// dialed lazily on first use and reused.
type peerSet struct {
	cfg   transport.Config
	addrs map[string]string

	mu      sync.Mutex
	entries map[string]*peerEntry
	closed  bool
}

// peerEntry is one peer's client; mu serialises dialing so concurrent
// users share one connection.
type peerEntry struct {
	mu sync.Mutex
	cl *transport.Client
}

func newPeerSet(cfg transport.Config, addrs map[string]string) *peerSet {
	return &peerSet{cfg: cfg, addrs: addrs, entries: map[string]*peerEntry{}}
}

// names lists the configured peers, sorted.
func (p *peerSet) names() []string {
	out := make([]string, 0, len(p.addrs))
	for n := range p.addrs {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// client returns the transport client to node, dialing it if needed. The
// dial is bounded by dialTimeout whatever ctx allows.
func (p *peerSet) client(ctx context.Context, node string) (*transport.Client, error) {
	addr, ok := p.addrs[node]
	if !ok {
		known := "none configured"
		if names := p.names(); len(names) > 0 {
			known = "known: " + strings.Join(names, ", ")
		}
		return nil, fmt.Errorf("unknown node %q (%s); add --peer %s=IP:PORT or a line to --peers-file", node, known, node)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, errors.New("the daemon is shutting down")
	}
	e := p.entries[node]
	if e == nil {
		e = &peerEntry{}
		p.entries[node] = e
	}
	p.mu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cl != nil {
		return e.cl, nil
	}
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	cl, err := transport.Dial(dctx, addr, p.cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to node %s at %s: %w", node, addr, err)
	}
	if peer := cl.Peer(); peer != "" && peer != node {
		_ = cl.Close()
		return nil, fmt.Errorf("connect to node %s at %s: the daemon there calls itself %q; fix --peer/--peers-file", node, addr, peer)
	}
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		_ = cl.Close()
		return nil, errors.New("the daemon is shutting down")
	}
	e.cl = cl
	return cl, nil
}

// close closes every client.
func (p *peerSet) close() {
	p.mu.Lock()
	p.closed = true
	entries := p.entries
	p.entries = map[string]*peerEntry{}
	p.mu.Unlock()
	for _, e := range entries {
		e.mu.Lock()
		if e.cl != nil {
			_ = e.cl.Close()
			e.cl = nil
		}
		e.mu.Unlock()
	}
}

// splitSeedRef splits "NODE/SEED" into its parts; a bare SEED has node "".
func splitSeedRef(ref string) (node, seed string) {
	if i := strings.IndexByte(ref, '/'); i >= 0 {
		return ref[:i], ref[i+1:]
	}
	return "", ref
}

// checkNodeName validates a node name: not empty, no '/', no spaces.
func checkNodeName(name string) error {
	if name == "" {
		return errors.New("node name is empty")
	}
	if len(name) > transport.MaxNodeName {
		return fmt.Errorf("node name %q is longer than %d bytes", name, transport.MaxNodeName)
	}
	if strings.ContainsAny(name, "/= \t\r\n") {
		return fmt.Errorf("node name %q may not contain '/', '=' or white space", name)
	}
	return nil
}

// countingSource wraps an imported seed's page source to feed the fetch
// metrics.
type countingSource struct {
	src interface {
		ReadPages(addr uint64, buf []byte) error
	}
	m    *metrics
	cl   *transport.Client
	seed string
}

// ReadPages implements pager.Source.
func (c countingSource) ReadPages(addr uint64, buf []byte) error {
	start := time.Now()
	err := c.src.ReadPages(addr, buf)
	c.m.fetchLatency.Observe(time.Since(start).Seconds())
	if err == nil {
		c.m.bytesFetched.Add(float64(len(buf)))
	}
	return err
}

// ReadRuns implements pager.RunReader: a working set in batched requests.
func (c countingSource) ReadRuns(runs []descriptor.Run, buf []byte) error {
	ranges := make([]transport.Range, len(runs))
	for i, r := range runs {
		ranges[i] = transport.Range{Addr: r.Start, Len: r.End - r.Start}
	}
	start := time.Now()
	err := c.cl.ReadRanges(context.Background(), c.seed, ranges, buf)
	c.m.fetchLatency.Observe(time.Since(start).Seconds())
	if err == nil {
		c.m.bytesFetched.Add(float64(len(buf)))
	}
	return err
}

// ReadRunsTo implements pager.FileSource: the pages go from the peer's
// socket into the page cache's file without a copy through a buffer.
func (c countingSource) ReadRunsTo(runs []descriptor.Run, fd int, offs []int64) error {
	ranges := make([]transport.Range, len(runs))
	var n uint64
	for i, r := range runs {
		ranges[i] = transport.Range{Addr: r.Start, Len: r.End - r.Start}
		n += r.End - r.Start
	}
	start := time.Now()
	spliced, err := c.cl.ReadRangesTo(context.Background(), c.seed, ranges, fd, offs)
	c.m.fetchLatency.Observe(time.Since(start).Seconds())
	c.m.zeroCopyReceived.Add(float64(spliced))
	if err == nil {
		c.m.bytesFetched.Add(float64(n))
	}
	return err
}

// resolveSeed finds the seed a fork names: "NODE/SEED" with NODE another
// node imports it from there (once), anything else is a seed held here.
func (d *Daemon) resolveSeed(ctx context.Context, ref string) (*seedRec, error) {
	return d.resolveSeedFor(ctx, ref, nil)
}

// resolveSeedFor is resolveSeed with accept (if not nil) asked about the
// seed's name first: a seed it refuses is not imported (a request must not
// leave an import behind, nor remove one a concurrent request made).
func (d *Daemon) resolveSeedFor(ctx context.Context, ref string, accept func(name string) error) (*seedRec, error) {
	node, key := splitSeedRef(ref)
	if key == "" {
		return nil, fmt.Errorf("seed reference %q names no seed (use SEED or NODE/SEED)", ref)
	}
	if node == "" || node == d.node {
		d.mu.Lock()
		defer d.mu.Unlock()
		s, err := d.lookupSeedLocked(key)
		if err != nil {
			return nil, err
		}
		if s.removing {
			return nil, fmt.Errorf("seed %s is being removed", s.id)
		}
		if accept != nil {
			if err := accept(s.name); err != nil {
				return nil, err
			}
		}
		return s, nil
	}
	return d.importSeed(ctx, node, key, accept)
}

// importedLocked finds a seed imported from node by its origin id.
// d.mu must be held.
func (d *Daemon) importedLocked(node, originID string) *seedRec {
	for _, s := range d.seeds {
		if s.origin == node && s.originID == originID && !s.removing {
			return s
		}
	}
	return nil
}

// importSeed returns the seed key (id or name) of node, importing its
// descriptor the first time: later children on this node share its page
// cache, so each page crosses the network once.
func (d *Daemon) importSeed(ctx context.Context, node, key string, accept func(name string) error) (*seedRec, error) {
	d.mu.Lock()
	if s := d.importedLocked(node, key); s != nil {
		d.mu.Unlock()
		if accept != nil {
			if err := accept(s.name); err != nil {
				return nil, err
			}
		}
		return s, nil
	}
	d.mu.Unlock()
	if d.peers == nil {
		return nil, fmt.Errorf("seed %s/%s is on another node and this daemon has no peers (start it with --peer or --peers-file)", node, key)
	}
	cl, err := d.peers.client(ctx, node)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	rctx, cancel := context.WithTimeout(ctx, peerTimeout)
	defer cancel()
	raw, ws, err := cl.Descriptor(rctx, key)
	if err != nil {
		return nil, fmt.Errorf("fetch seed %s from node %s: %w", key, node, err)
	}
	desc, err := descriptor.Decode(raw)
	if err != nil {
		return nil, fmt.Errorf("seed %s from node %s: bad descriptor: %w", key, node, err)
	}
	if accept != nil {
		if err := accept(desc.Name); err != nil {
			return nil, err
		}
	}
	runs := make([]descriptor.Run, 0, len(ws))
	for _, r := range ws {
		if r.Len == 0 {
			continue
		}
		runs = append(runs, descriptor.Run{Start: r.Addr, End: r.Addr + r.Len})
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closing {
		return nil, errors.New("the daemon is shutting down")
	}
	if s := d.importedLocked(node, desc.SeedID); s != nil {
		return s, nil
	}
	src := countingSource{src: cl.SeedSource(desc.SeedID), m: d.metrics, cl: cl, seed: desc.SeedID}
	es, err := d.eng.ImportSeed(desc, src, node, runs)
	if err != nil {
		return nil, fmt.Errorf("import seed %s from node %s: %w", desc.SeedID, node, err)
	}
	for _, s := range d.seeds {
		if s.seed == es {
			return s, nil
		}
	}
	rec := &seedRec{
		id:       d.pickID(es.ID, "s-"),
		name:     desc.Name,
		seed:     es,
		self:     hasChannel(desc),
		origin:   node,
		originID: desc.SeedID,
	}
	d.seeds[rec.id] = rec
	d.log.Info("import", "seed", rec.id, "name", rec.name, "origin", node, "vmas", len(desc.VMAs),
		"present_pages", desc.PresentPages(), "working_set_runs", len(runs), "took", time.Since(start))
	return rec, nil
}

// hasChannel reports whether a seed was made by prepare-self (its children
// get a channel connection).
func hasChannel(d *descriptor.Descriptor) bool {
	for _, f := range d.FDs {
		if f.Kind == descriptor.FDChannel {
			return true
		}
	}
	return false
}

// takeLease takes a lease on an imported seed's origin for one child tree.
func (d *Daemon) takeLease(ctx context.Context, s *seedRec) error {
	cl, err := d.peers.client(ctx, s.origin)
	if err != nil {
		return fmt.Errorf("lease seed %s on node %s: %w", s.originID, s.origin, err)
	}
	lctx, cancel := context.WithTimeout(ctx, peerTimeout)
	defer cancel()
	if err := cl.Lease(lctx, s.originID, +1); err != nil {
		return fmt.Errorf("lease seed %s on node %s: %w", s.originID, s.origin, err)
	}
	return nil
}

// releaseLease drops one lease on an imported seed's origin (bounded; a
// dead origin only costs a log line). The caller did d.leaseWG.Add(1).
func (d *Daemon) releaseLease(s *seedRec, child string) {
	defer d.leaseWG.Done()
	ctx, cancel := context.WithTimeout(context.Background(), leaseReleaseTimeout)
	defer cancel()
	cl, err := d.peers.client(ctx, s.origin)
	if err == nil {
		err = cl.Lease(ctx, s.originID, -1)
	}
	if err != nil {
		d.log.Warn("release lease", "seed", s.originID, "origin", s.origin, "child", child, "err", err)
	}
}

// forwardFork asks node target to fork req.Count children there. A bare
// seed in req means a seed on this node.
func (d *Daemon) forwardFork(ctx context.Context, target string, req client.Request) ([]remoteChild, error) {
	if d.peers == nil {
		return nil, fmt.Errorf("fork on node %s: this daemon has no peers (start it with --peer or --peers-file)", target)
	}
	ref := req.Seed
	if node, _ := splitSeedRef(ref); node == "" {
		ref = d.node + "/" + ref
	}
	cl, err := d.peers.client(ctx, target)
	if err != nil {
		return nil, fmt.Errorf("fork on node %s: %w", target, err)
	}
	fctx, cancel := context.WithTimeout(ctx, forkBaseTimeout+time.Duration(req.Count)*forkPerChild)
	defer cancel()
	start := time.Now()
	kids, err := cl.Fork(fctx, transport.ForkRequest{Seed: ref, Count: req.Count, Eager: req.Eager, Payload: req.Payload})
	out := make([]remoteChild, 0, len(kids))
	for _, k := range kids {
		out = append(out, remoteChild{id: k.ID, pid: k.PID, startMS: float64(k.StartUS) / 1000})
	}
	if err != nil {
		d.log.Warn("forwarded fork failed", "node", target, "seed", ref, "count", req.Count, "started", len(kids), "err", err)
		return out, fmt.Errorf("fork on node %s: %w", target, err)
	}
	d.log.Info("forwarded fork", "node", target, "seed", ref, "count", req.Count, "took", time.Since(start))
	return out, nil
}

// remoteChild is a child created on another node by a forwarded fork.
type remoteChild struct {
	id      string
	pid     int
	startMS float64
}

// listenPeers starts the peer server on cfg.Listen.
func (d *Daemon) listenPeers(tcfg transport.Config) error {
	srv, err := transport.NewServer(tcfg, provider{d})
	if err != nil {
		return fmt.Errorf("peer server: %w", err)
	}
	ln, err := net.Listen("tcp", d.cfg.Listen)
	if err != nil {
		_ = srv.Close()
		return fmt.Errorf("peer server: listen on %s: %w", d.cfg.Listen, err)
	}
	d.peerSrv = srv
	d.peerAddr = ln.Addr().String()
	d.peerDone = make(chan struct{})
	go func() {
		defer close(d.peerDone)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, transport.ErrClosed) {
			d.log.Warn("peer server stopped", "err", err)
		}
	}()
	return nil
}

// PeerAddr is the address the peer server listens on ("" without
// Config.Listen); useful with a ":0" port.
func (d *Daemon) PeerAddr() string { return d.peerAddr }

// Node is the daemon's node name.
func (d *Daemon) Node() string { return d.node }

var _ pager.FileSource = countingSource{}
