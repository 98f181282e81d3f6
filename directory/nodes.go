package directory

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"strconv"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// MinTTL and DefaultTTL bound the lease of a Registration.
const (
	MinTTL     = 2 * time.Second
	DefaultTTL = 3 * time.Second
)

// Capacity is what a node offers to functions.
type Capacity struct {
	// Concurrency is the most function instances it runs at once.
	Concurrency int `json:"concurrency"`
	// MemoryBytes is the memory it gives to functions.
	MemoryBytes uint64 `json:"memory_bytes"`
}

// Load is what a node uses now.
type Load struct {
	// Running is the number of instances serving a request.
	Running int `json:"running"`
	// Warm is the number of idle instances kept for reuse.
	Warm int `json:"warm"`
	// MemoryBytes is the memory its function processes, seeds and caches use.
	MemoryBytes uint64 `json:"memory_bytes"`
	// Updated is when the node measured it.
	Updated time.Time `json:"updated"`
}

// NodeInfo describes a member node; it is the value of nodes/<name>.
type NodeInfo struct {
	// Name is the node's name (the key segment, also the transport's node name).
	Name string `json:"name"`
	// PeerAddr is the IP:PORT of the node's transport (the data path).
	PeerAddr string `json:"peer_addr"`
	// Capacity is what the node offers.
	Capacity Capacity `json:"capacity"`
	// Load is the node's last reported load.
	Load Load `json:"load"`
	// Started is when the node's daemon started.
	Started time.Time `json:"started"`
	// Version is the daemon's version.
	Version string `json:"version"`
}

// Registration is a node's membership: its key and seeds, attached to a
// lease kept alive in the background. It is safe for concurrent use.
type Registration struct {
	c     *Client
	lease clientv3.LeaseID
	ttl   time.Duration
	key   string

	mu   sync.Mutex
	info NodeInfo

	cancel   context.CancelFunc // stops the keepalive
	done     chan struct{}      // closed when the keepalive goroutine ended
	lost     chan struct{}
	lostOnce sync.Once
}

// Register makes info.Name a member: it puts nodes/<name> under a fresh
// lease of ttl (at least MinTTL; zero means DefaultTTL; rounded up to whole
// seconds) and keeps the lease alive in the background until Close, the
// client's Close, or the lease is lost (see Lost). When another live process
// holds the name (its key exists under another lease), Register fails with
// ErrNodeExists naming it; a name whose key this client lost and etcd still
// keeps is taken over. A zero info.Started or info.Load.Updated is set to now.
func (c *Client) Register(ctx context.Context, info NodeInfo, ttl time.Duration) (*Registration, error) {
	if err := checkName("node", info.Name); err != nil {
		return nil, fmt.Errorf("register: %w", err)
	}
	if err := checkPeerAddr(info.PeerAddr); err != nil {
		return nil, fmt.Errorf("register node %q: %w", info.Name, err)
	}
	if ttl == 0 {
		ttl = DefaultTTL
	}
	if ttl < MinTTL {
		return nil, fmt.Errorf("register node %q: lease ttl %s is below the minimum %s", info.Name, ttl, MinTTL)
	}
	secs := int64(math.Ceil(ttl.Seconds()))
	now := time.Now()
	if info.Started.IsZero() {
		info.Started = now
	}
	if info.Load.Updated.IsZero() {
		info.Load.Updated = now
	}
	val, err := json.Marshal(info)
	if err != nil {
		return nil, fmt.Errorf("register node %q: %w", info.Name, err)
	}

	grant, err := c.cli.Grant(ctx, secs)
	if err != nil {
		return nil, fmt.Errorf("register node %q: grant lease of %ds: %w", info.Name, secs, err)
	}
	if grant.TTL > secs {
		c.log.Warn("etcd raised the lease TTL to its minimum (derived from its election timeout): a dead node stays listed that long",
			"node", info.Name, "requested", secs, "granted", grant.TTL)
	}
	r := &Registration{
		c:     c,
		lease: grant.ID,
		ttl:   time.Duration(grant.TTL) * time.Second,
		key:   c.nodeKey(info.Name),
		info:  info,
		done:  make(chan struct{}),
		lost:  make(chan struct{}),
	}
	if err := r.claim(ctx, string(val)); err != nil {
		rctx, cancel := context.WithTimeout(context.Background(), c.timeout)
		c.cli.Revoke(rctx, grant.ID)
		cancel()
		return nil, err
	}
	kctx, cancel := context.WithCancel(context.Background())
	ka, err := c.cli.KeepAlive(kctx, grant.ID)
	if err == nil {
		err = c.track(r, nil)
	}
	if err != nil {
		cancel()
		rctx, rcancel := context.WithTimeout(context.Background(), c.timeout)
		c.cli.Revoke(rctx, grant.ID)
		rcancel()
		return nil, fmt.Errorf("register node %q: keep lease alive: %w", info.Name, err)
	}
	r.cancel = cancel
	go r.keepAlive(kctx, ka)
	return r, nil
}

// claim puts the node's key under r's lease if it is free, or held by no
// lease, or by a lease this client lost.
func (r *Registration) claim(ctx context.Context, val string) error {
	name := r.info.Name
	put := clientv3.OpPut(r.key, val, clientv3.WithLease(r.lease))
	for attempt := 0; ; attempt++ {
		resp, err := r.c.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(r.key), "=", 0)).
			Then(put).
			Else(clientv3.OpGet(r.key)).
			Commit()
		if err != nil {
			return fmt.Errorf("register node %q: %w", name, err)
		}
		if resp.Succeeded {
			return nil
		}
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 {
			continue // deleted in between: try again
		}
		kv := kvs[0]
		held := clientv3.LeaseID(kv.Lease)
		r.c.mu.Lock()
		mine := held != 0 && r.c.lost[name] == held
		r.c.mu.Unlock()
		if held != 0 && !mine {
			var other NodeInfo
			_ = json.Unmarshal(kv.Value, &other)
			return fmt.Errorf("register node %q: %w: held by lease %x (peer %s, started %s); if that process died, the name is free within its lease TTL",
				name, ErrNodeExists, int64(held), other.PeerAddr, other.Started.Format(time.RFC3339))
		}
		if attempt >= 3 {
			return fmt.Errorf("register node %q: the key keeps changing under us", name)
		}
		if mine {
			// etcd still keeps the lease this client gave up on.
			if _, err := r.c.cli.Revoke(ctx, held); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
				return fmt.Errorf("register node %q: revoke the lost lease %x: %w", name, int64(held), err)
			}
		}
		resp, err = r.c.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(r.key), "=", kv.ModRevision)).
			Then(put).
			Commit()
		if err != nil {
			return fmt.Errorf("register node %q: %w", name, err)
		}
		if resp.Succeeded {
			return nil
		}
	}
}

// keepAlive drains the keepalive responses until the channel closes (the
// lease expired, no answer came within its TTL, or ctx was cancelled).
func (r *Registration) keepAlive(ctx context.Context, ka <-chan *clientv3.LeaseKeepAliveResponse) {
	defer close(r.done)
	for range ka {
	}
	if ctx.Err() == nil {
		r.c.log.Warn("directory registration lost: the lease expired or etcd did not answer within its TTL; register again",
			"node", r.info.Name, "lease", fmt.Sprintf("%x", int64(r.lease)), "ttl", r.ttl)
		r.c.mu.Lock()
		r.c.lost[r.info.Name] = r.lease
		r.c.mu.Unlock()
	}
	r.markLost()
}

func (r *Registration) markLost() { r.lostOnce.Do(func() { close(r.lost) }) }

// Lost returns a channel closed when the registration is gone: its lease
// expired or was revoked, etcd did not answer a keepalive within the TTL,
// or Close or the client's Close ended it. The caller may Register again.
func (r *Registration) Lost() <-chan struct{} { return r.lost }

// TTL is the lease TTL etcd granted (it may raise the one requested).
func (r *Registration) TTL() time.Duration { return r.ttl }

func (r *Registration) isLost() bool {
	select {
	case <-r.lost:
		return true
	default:
		return false
	}
}

// UpdateLoad rewrites nodes/<name> with l, under the same lease. A zero
// l.Updated is set to now.
func (r *Registration) UpdateLoad(ctx context.Context, l Load) error {
	if l.Updated.IsZero() {
		l.Updated = time.Now()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	info := r.info
	info.Load = l
	val, err := json.Marshal(info)
	if err != nil {
		return fmt.Errorf("update load of node %q: %w", info.Name, err)
	}
	if err := r.put(ctx, r.key, string(val)); err != nil {
		return fmt.Errorf("update load of node %q: %w", info.Name, err)
	}
	r.info = info
	return nil
}

// put writes key under the lease, mapping a gone lease to ErrLost.
func (r *Registration) put(ctx context.Context, key, val string) error {
	if r.isLost() {
		return ErrLost
	}
	_, err := r.c.cli.Put(ctx, key, val, clientv3.WithLease(r.lease))
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("%w: lease %x expired: %v", ErrLost, int64(r.lease), err)
	}
	return err
}

// Close stops the keepalive and revokes the lease: the node and its seeds
// disappear at once. If etcd cannot be reached, it returns the error and the
// node expires after its TTL.
func (r *Registration) Close(ctx context.Context) error {
	r.stop()
	r.c.untrack(r, nil)
	_, err := r.c.cli.Revoke(ctx, r.lease)
	if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("close registration of node %q: revoke lease %x (it expires within %s): %w",
			r.info.Name, int64(r.lease), r.ttl, err)
	}
	return nil
}

// stop ends the keepalive without revoking, and waits for its goroutine.
func (r *Registration) stop() {
	r.cancel()
	<-r.done
	r.markLost()
}

// Nodes lists the member nodes, sorted by name. A record that does not
// decode is left out and logged.
func (c *Client) Nodes(ctx context.Context) ([]NodeInfo, error) {
	resp, err := c.cli.Get(ctx, c.prefix+"nodes/", clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	nodes := make([]NodeInfo, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		n, err := decodeNode(string(kv.Key)[len(c.prefix+"nodes/"):], kv.Value)
		if err != nil {
			c.log.Warn("directory: skipping a malformed node record", "key", string(kv.Key), "err", err)
			continue
		}
		nodes = append(nodes, n)
	}
	return nodes, nil // etcd returns keys in byte order: by name
}

// decodeNode decodes a node record; the key's name wins over the value's.
func decodeNode(name string, val []byte) (NodeInfo, error) {
	var n NodeInfo
	if err := checkName("node", name); err != nil {
		return n, err
	}
	if err := json.Unmarshal(val, &n); err != nil {
		return n, fmt.Errorf("node %q: %w", name, err)
	}
	n.Name = name
	return n, nil
}

// checkPeerAddr validates a transport address: HOST:PORT with a port.
func checkPeerAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("peer address %q is not HOST:PORT of the node's transport: %w", addr, err)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 || host == "" {
		return fmt.Errorf("peer address %q is not HOST:PORT with a port in 1-65535", addr)
	}
	return nil
}
