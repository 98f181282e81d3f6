package node

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/transport"
)

// provider serves this node's seeds and forks to peer nodes
// (transport.Provider).
type provider struct{ d *Daemon }

var _ transport.FileProvider = provider{}

// servedSeed finds a seed prepared on this node that peer may fetch.
func (d *Daemon) servedSeed(peer, key string) (*seedRec, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s, ok := d.seeds[key]
	if !ok {
		var err error
		if s, err = d.lookupSeedLocked(key); err != nil {
			return nil, fmt.Errorf("node %s: %w: %v", d.node, transport.ErrUnknownSeed, err)
		}
	}
	if s.origin != "" {
		return nil, fmt.Errorf("node %s: %w: seed %s was imported from node %s; fetch it from there", d.node, transport.ErrUnknownSeed, s.id, s.origin)
	}
	if s.removing {
		return nil, fmt.Errorf("node %s: %w: seed %s is being removed", d.node, transport.ErrUnknownSeed, s.id)
	}
	if len(s.allow) > 0 && !slices.Contains(s.allow, peer) {
		return nil, fmt.Errorf("seed %s is not shared with node %s", s.id, peer)
	}
	return s, nil
}

// Descriptor implements transport.Provider.
func (p provider) Descriptor(_ context.Context, peer, seed string) ([]byte, []transport.Range, error) {
	d := p.d
	d.metrics.peerDescriptor.Inc()
	s, err := d.servedSeed(peer, seed)
	if err != nil {
		d.log.Warn("peer descriptor refused", "peer", peer, "seed", seed, "err", err)
		return nil, nil, err
	}
	desc := *s.seed.Desc // the peer addresses the seed by the registry id
	desc.SeedID, desc.Name = s.id, s.name
	raw := descriptor.Encode(nil, &desc)
	var ws []transport.Range
	for _, r := range s.seed.WorkingSet() {
		if r.End > r.Start {
			ws = append(ws, transport.Range{Addr: r.Start, Len: r.End - r.Start})
		}
	}
	d.metrics.bytesServed.Add(float64(len(raw)))
	d.log.Info("peer descriptor", "peer", peer, "seed", s.id, "bytes", len(raw), "working_set_runs", len(ws))
	return raw, ws, nil
}

// ReadPages implements transport.Provider.
func (p provider) ReadPages(_ context.Context, peer, seed string, addr uint64, buf []byte) error {
	d := p.d
	d.metrics.peerPages.Inc()
	s, err := d.servedSeed(peer, seed)
	if err != nil {
		return err
	}
	if err := d.eng.ReadPages(s.seed, addr, buf); err != nil {
		return fmt.Errorf("node %s: read seed %s: %w", d.node, s.id, err)
	}
	d.metrics.bytesServed.Add(float64(len(buf)))
	return nil
}

// PageFile implements transport.FileProvider: a local seed's pages from its
// page cache on this node, sent with sendfile.
func (p provider) PageFile(_ context.Context, peer, seed string, ranges []transport.Range) (int, []int64, func(), bool, error) {
	d := p.d
	s, err := d.servedSeed(peer, seed)
	fd, ok := -1, false
	var offs []int64
	var n uint64
	if err == nil {
		runs := make([]descriptor.Run, len(ranges))
		for i, g := range ranges {
			runs[i] = descriptor.Run{Start: g.Addr, End: g.Addr + g.Len}
			n += g.Len
		}
		if fd, offs, ok, err = d.eng.PageFile(s.seed, runs); err != nil {
			err = fmt.Errorf("node %s: read seed %s: %w", d.node, s.id, err)
		}
	}
	if err == nil && !ok {
		return -1, nil, nil, false, nil // ReadPages serves, and counts, the request
	}
	d.metrics.peerPages.Inc()
	if err != nil {
		return -1, nil, nil, false, err
	}
	d.metrics.bytesServed.Add(float64(n))
	d.metrics.zeroCopySent.Add(float64(n))
	return fd, offs, func() { unix.Close(fd) }, true, nil
}

// Fork implements transport.Provider: it forks detached children on this
// node (importing the seed from its origin if needed).
func (p provider) Fork(ctx context.Context, peer string, req transport.ForkRequest) ([]transport.ForkedChild, error) {
	d := p.d
	d.metrics.peerFork.Inc()
	if req.Count <= 0 {
		req.Count = 1
	}
	if req.Count > maxCount {
		return nil, fmt.Errorf("node %s: fork count must be between 1 and %d, got %d", d.node, maxCount, req.Count)
	}
	creq := client.Request{Op: client.OpFork, Seed: req.Seed, Count: req.Count, Eager: req.Eager, Payload: req.Payload}
	d.log.Info("peer fork", "peer", peer, "seed", req.Seed, "count", req.Count, "eager", req.Eager)
	kids, err := d.fork(ctx, creq, [3]*os.File{}, false)
	out := make([]transport.ForkedChild, 0, len(kids))
	for _, k := range kids {
		out = append(out, transport.ForkedChild{ID: k.id, PID: k.child.PID, StartUS: k.child.Took.Microseconds()})
	}
	if err != nil {
		return out, fmt.Errorf("node %s: %w", d.node, err)
	}
	return out, nil
}

// Invoke implements transport.Invoker: one invocation of a function
// deployed on this node.
func (p provider) Invoke(ctx context.Context, peer string, req transport.InvokeRequest) (transport.InvokeResponse, error) {
	resp, err := p.d.fn.invoke(ctx, req)
	if err != nil {
		return resp, fmt.Errorf("node %s: %w", p.d.node, err)
	}
	return resp, nil
}

// Call implements transport.Caller: the function runtime's control calls
// (deploy, remove, list, stats) with JSON bodies.
func (p provider) Call(ctx context.Context, peer, op string, body []byte) ([]byte, error) {
	v, err := p.d.fn.call(ctx, op, body)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", p.d.node, err)
	}
	return json.Marshal(v)
}

// Lease implements transport.Provider.
func (p provider) Lease(_ context.Context, peer, seed string, delta int) error {
	d := p.d
	d.metrics.peerLease.Inc()
	if delta < 0 {
		// Releases always succeed: the seed may have been removed with
		// --force meanwhile.
		d.mu.Lock()
		defer d.mu.Unlock()
		s, ok := d.seeds[seed]
		if !ok || s.leases[peer] == 0 {
			return nil
		}
		s.leases[peer] = max(0, s.leases[peer]+delta)
		if s.leases[peer] == 0 {
			delete(s.leases, peer)
		}
		return nil
	}
	s, err := d.servedSeed(peer, seed)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if s.removing || d.seeds[s.id] != s {
		return fmt.Errorf("node %s: %w: seed %s is being removed", d.node, transport.ErrUnknownSeed, s.id)
	}
	if s.leases == nil {
		s.leases = map[string]int{}
	}
	s.leases[peer] += delta
	return nil
}

// leasesLocked returns a seed's outstanding leases and the nodes holding
// them, sorted. d.mu must be held.
func (s *seedRec) leasesLocked() (int, []string) {
	n := 0
	var nodes []string
	for node, c := range s.leases {
		if c > 0 {
			n += c
			nodes = append(nodes, node)
		}
	}
	slices.Sort(nodes)
	return n, nodes
}

// expire removes a seed whose TTL ran out: at once if nothing pages from
// it, else when its children and leases are gone, but no later than 10 s
// after the TTL (then by force).
func (d *Daemon) expire(s *seedRec) {
	deadline := s.expires.Add(ttlGrace)
	for {
		if d.isClosing() {
			return
		}
		d.mu.Lock()
		gone := d.seeds[s.id] != s
		busy := len(d.runningLocked(s))
		n, _ := s.leasesLocked()
		removing := s.removing
		d.mu.Unlock()
		if gone {
			return
		}
		if !removing {
			force := time.Now().After(deadline)
			if busy+n == 0 || force {
				err := d.remove(s.id, force)
				if err == nil {
					d.log.Info("seed expired", "seed", s.id, "name", s.name, "forced", force, "children", busy, "leases", n)
					return
				}
				if force {
					d.log.Warn("seed expired but could not be removed", "seed", s.id, "err", err)
					return
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ttlGrace is how long an expired seed waits for its children and leases
// before it is removed by force.
const ttlGrace = 10 * time.Second
