package gateway

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/mitosis-fork/mitosis/transport"
)

// dialTimeout bounds connecting to a node.
const dialTimeout = 2 * time.Second

// peers are the gateway's transport clients to the nodes, dialed on first
// use and reused; a client whose node changed address or failed is
// replaced.
type peers struct {
	cfg transport.Config

	mu      sync.Mutex
	clients map[string]*peerClient
	closed  bool
}

type peerClient struct {
	mu   sync.Mutex
	addr string
	cl   *transport.Client
}

func newPeers(cfg transport.Config) *peers {
	return &peers{cfg: cfg, clients: map[string]*peerClient{}}
}

// client returns the client to node at addr.
func (p *peers) client(ctx context.Context, node, addr string) (*transport.Client, error) {
	if addr == "" {
		return nil, fmt.Errorf("node %s registered no transport address", node)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, errors.New("gateway is shutting down")
	}
	pc := p.clients[node]
	if pc == nil {
		pc = &peerClient{}
		p.clients[node] = pc
	}
	p.mu.Unlock()
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.cl != nil && pc.addr == addr {
		return pc.cl, nil
	}
	if pc.cl != nil {
		_ = pc.cl.Close()
		pc.cl = nil
	}
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	cl, err := transport.Dial(dctx, addr, p.cfg)
	if err != nil {
		return nil, fmt.Errorf("node %s at %s: %w", node, addr, err)
	}
	pc.cl, pc.addr = cl, addr
	return cl, nil
}

// drop forgets node's client (after a connection failure).
func (p *peers) drop(node string) {
	p.mu.Lock()
	pc := p.clients[node]
	delete(p.clients, node)
	p.mu.Unlock()
	if pc != nil {
		pc.mu.Lock()
		if pc.cl != nil {
			_ = pc.cl.Close()
		}
		pc.mu.Unlock()
	}
}

func (p *peers) close() {
	p.mu.Lock()
	p.closed = true
	cs := p.clients
	p.clients = map[string]*peerClient{}
	p.mu.Unlock()
	for _, pc := range cs {
		pc.mu.Lock()
		if pc.cl != nil {
			_ = pc.cl.Close()
		}
		pc.mu.Unlock()
	}
}
