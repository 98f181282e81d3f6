package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/directory"
)

// Membership in the cluster directory: a daemon started with etcd
// endpoints registers its node (transport address, capacity) under a lease,
// refreshes its load every second, and records the seeds of the functions
// it holds under the same lease, so a node that dies vanishes from
// placement with its seeds within the lease's TTL.

const (
	// dirTTL is the lease TTL of a node's registration.
	dirTTL = 2 * time.Second
	// loadEvery is how often the node's load is written.
	loadEvery = time.Second
)

// dirMember is the node's membership in the cluster directory.
type dirMember struct {
	d    *Daemon
	cl   *directory.Client
	info directory.NodeInfo

	mu    sync.Mutex
	reg   *directory.Registration
	seeds map[string]directory.SeedRecord // by function: re-put after a re-registration

	stages stageSweep // the stage seed leases seen (loop only)

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// joinDirectory starts the node's membership in the directory at
// cfg.Etcd. A directory that cannot be reached yet is not fatal (etcd may
// come up after the nodes): the node keeps trying, and logs why.
func (d *Daemon) joinDirectory() error {
	addr := d.cfg.Advertise
	if addr == "" {
		addr = d.peerAddr
	}
	if addr == "" {
		return errors.New("--etcd-endpoints needs --listen: the gateway reaches this node through its peer transport")
	}
	if host, _, err := net.SplitHostPort(addr); err != nil || net.ParseIP(host) == nil || net.ParseIP(host).IsUnspecified() {
		return fmt.Errorf("the directory needs an address other nodes can reach, not %q: give --advertise IP:PORT", addr)
	}
	m := &dirMember{d: d, seeds: map[string]directory.SeedRecord{}, stop: make(chan struct{}), done: make(chan struct{}),
		info: directory.NodeInfo{Name: d.node, PeerAddr: addr, Started: time.Now(), Version: Version,
			Capacity: directory.Capacity{Concurrency: d.maxConcurrency(), MemoryBytes: uint64(d.maxMemory())}}}
	d.dir = m
	if err := m.reregister(); err != nil {
		d.log.Warn("cluster directory not reachable yet; retrying every second", "etcd", d.cfg.Etcd, "err", err)
	} else {
		d.log.Info("joined the cluster directory", "etcd", d.cfg.Etcd, "advertise", addr, "ttl", dirTTL)
	}
	go m.loop()
	return nil
}

// loop refreshes the load and re-registers a lost registration.
func (m *dirMember) loop() {
	defer close(m.done)
	t := time.NewTicker(loadEvery)
	defer t.Stop()
	for {
		m.mu.Lock()
		reg := m.reg
		m.mu.Unlock()
		var lost <-chan struct{}
		if reg != nil {
			lost = reg.Lost()
		}
		select {
		case <-m.stop:
			return
		case <-lost:
			m.d.log.Warn("directory registration lost; registering again")
			if err := m.reregister(); err != nil {
				m.d.log.Warn("register in the directory", "err", err)
			}
		case <-t.C:
			if reg == nil {
				if err := m.reregister(); err == nil {
					m.d.log.Info("joined the cluster directory", "etcd", m.d.cfg.Etcd, "advertise", m.info.PeerAddr)
				}
				continue
			}
			running, warm := m.d.fn.load()
			ctx, cancel := context.WithTimeout(context.Background(), loadEvery)
			_ = reg.UpdateLoad(ctx, directory.Load{Running: running, Warm: warm, Updated: time.Now()})
			cancel()
			m.sweepFunctions(m.cl)
			m.sweepStages(m.cl)
		}
	}
}

// reregister (re)connects and registers the node, and records its seeds
// again.
func (m *dirMember) reregister() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cl == nil {
		cl, err := directory.Open(ctx, m.d.cfg.Etcd, directory.Options{Prefix: m.d.cfg.EtcdPrefix, Logger: m.d.log.With("component", "directory")})
		if err != nil {
			return err
		}
		m.cl = cl
	}
	reg, err := m.cl.Register(ctx, m.info, dirTTL)
	if err != nil {
		m.reg = nil
		return fmt.Errorf("register node %s: %w", m.d.node, err)
	}
	m.reg = reg
	for _, s := range m.seeds {
		if err := reg.PutSeed(ctx, s); err != nil {
			m.d.log.Warn("record seed in the directory", "function", s.Function, "err", err)
		}
	}
	return nil
}

// putSeed records that this node holds a seed of a function.
func (m *dirMember) putSeed(fn string, s *seedRec, generation int64, took time.Duration) {
	rec := directory.SeedRecord{Function: fn, Node: m.d.node, SeedID: s.id, Created: time.Now(),
		PrepareMS: float64(took.Microseconds()) / 1000, Generation: generation}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.seeds[fn] = rec
	if m.reg == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := m.reg.PutSeed(ctx, rec); err != nil {
		m.d.log.Warn("record seed in the directory", "function", fn, "err", err)
	}
}

// deleteSeed removes this node's seed record of a function.
func (m *dirMember) deleteSeed(fn string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.seeds[fn]; !ok {
		return
	}
	delete(m.seeds, fn)
	if m.reg == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := m.reg.DeleteSeed(ctx, fn); err != nil && !errors.Is(err, directory.ErrNotFound) {
		m.d.log.Warn("remove seed record", "function", fn, "err", err)
	}
}

// close leaves the directory at once (the lease is revoked: the node and
// its seeds disappear from placement now, not after the TTL).
func (m *dirMember) close() { m.closeOnce.Do(m.leave) }

func (m *dirMember) leave() {
	close(m.stop)
	<-m.done
	m.mu.Lock()
	reg := m.reg
	m.reg = nil
	m.mu.Unlock()
	if reg != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		_ = reg.Close(ctx)
		cancel()
	}
	if m.cl != nil {
		_ = m.cl.Close()
	}
}

// leaveDirectory ends the node's membership, if any.
func (d *Daemon) leaveDirectory() {
	if d.dir != nil {
		d.dir.close()
	}
}
