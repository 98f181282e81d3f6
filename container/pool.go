package container

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
)

// Pool keeps up to n pre-created groups with the same limits so that a
// fork does not pay for cgroup creation. Groups taken by Get are refilled
// in the background. Pool groups are named <prefix>-<daemon pid>-<seq>.
type Pool struct {
	prefix string
	limits Limits
	n      int
	seq    atomic.Uint64

	mu      sync.Mutex
	ready   []*Group
	closed  bool
	filling bool
	lastErr error
	wg      sync.WaitGroup
}

// NewPool starts a pool of n groups with limits l and begins filling it
// in the background. n <= 0 makes a pool that always creates on demand.
func NewPool(prefix string, l Limits, n int) *Pool {
	p := &Pool{prefix: prefix, limits: l, n: n}
	p.mu.Lock()
	p.refillLocked()
	p.mu.Unlock()
	return p
}

func (p *Pool) newGroup() (*Group, error) {
	return New(fmt.Sprintf("%s-%d-%d", p.prefix, os.Getpid(), p.seq.Add(1)), p.limits)
}

// refillLocked starts the background filler if the pool is short and no
// filler runs. p.mu must be held.
func (p *Pool) refillLocked() {
	if p.closed || p.filling || len(p.ready) >= p.n {
		return
	}
	p.filling = true
	p.wg.Add(1)
	go p.fill()
}

// fill creates groups until the pool is full, closed, or creation fails
// (the error is kept and reported by Close; the next Get retries).
func (p *Pool) fill() {
	defer p.wg.Done()
	for {
		p.mu.Lock()
		if p.closed || len(p.ready) >= p.n {
			p.filling = false
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
		g, err := p.newGroup()
		p.mu.Lock()
		if err != nil {
			p.lastErr = err
			p.filling = false
			p.mu.Unlock()
			return
		}
		if p.closed {
			p.mu.Unlock()
			_ = g.Delete()
			return
		}
		p.lastErr = nil
		p.ready = append(p.ready, g)
		p.mu.Unlock()
	}
}

// Ready returns how many groups are waiting in the pool.
func (p *Pool) Ready() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready)
}

// Get returns a ready group, or creates one synchronously if the pool is
// empty, and triggers a background refill. The caller owns the group and
// must Delete it.
func (p *Pool) Get() (*Group, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, errors.New("container: pool closed")
	}
	var g *Group
	if k := len(p.ready); k > 0 {
		g = p.ready[k-1]
		p.ready = p.ready[:k-1]
	}
	p.refillLocked()
	p.mu.Unlock()
	if g != nil {
		return g, nil
	}
	return p.newGroup()
}

// Close stops refilling, waits for a running refill, and deletes the
// groups never handed out. It returns the first deletion error, or else
// the last background creation error.
func (p *Pool) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.wg.Wait()
	p.mu.Lock()
	ready := p.ready
	p.ready = nil
	lastErr := p.lastErr
	p.mu.Unlock()
	var errs []error
	for _, g := range ready {
		if err := g.Delete(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	return lastErr
}
