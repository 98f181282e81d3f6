// Package transport moves seed descriptors and pages between node daemons.
//
// The TCP implementation speaks a lean binary protocol (see protocol.go):
// every connection starts with mutual authentication against a shared
// cluster secret (HMAC-SHA256 challenge/response; optional TLS underneath),
// then carries pipelined requests: descriptor fetch, batched page reads
// (many ranges per request), forwarded fork requests and seed leases. The
// server answers from a Provider (the node daemon) without stopping
// anything. The pager only sees the Source interface, so a shared-memory or
// RDMA transport can be added without touching it.
package transport

import (
	"context"
	"crypto/tls"
	"time"
)

// Range is a run of pages of a seed: [Addr, Addr+Len), page aligned.
type Range struct {
	Addr, Len uint64
}

// ForkRequest asks a node to fork children of a seed on itself.
type ForkRequest struct {
	Seed    string // "NODE/SEED" (NODE is the seed's origin node)
	Count   int
	Eager   bool
	Payload []byte // JSON, may be nil
}

// ForkedChild is one child created by a forwarded fork.
type ForkedChild struct {
	ID      string
	PID     int
	StartUS int64 // restore time in µs
}

// Provider is what a node serves to its peers. peer is the authenticated
// name of the requesting node. Implementations must be safe for concurrent
// use and must return errors (never panic) for unknown seeds or bad ranges.
type Provider interface {
	// Descriptor returns the encoded descriptor (descriptor.Encode) of a
	// local seed, plus its recorded working set (ranges its children
	// touched so far; may be empty).
	Descriptor(ctx context.Context, peer, seed string) (desc []byte, workingSet []Range, err error)
	// ReadPages fills buf with the seed's memory at addr.
	ReadPages(ctx context.Context, peer, seed string, addr uint64, buf []byte) error
	// Fork forks children of req.Seed on this node.
	Fork(ctx context.Context, peer string, req ForkRequest) ([]ForkedChild, error)
	// Lease adds (delta=+1) or drops (delta=-1) a reference a peer's
	// children hold on a local seed; the seed's removal waits for or fails
	// on outstanding leases.
	Lease(ctx context.Context, peer, seed string, delta int) error
}

// FileProvider is a Provider that can answer a pages request from a file
// holding the pages (the owner node's page cache for the seed): the server
// then sends them with sendfile(2), from the file's pages to the socket
// without a copy through a buffer. Only plain TCP connections use it (TLS
// encrypts in user space).
type FileProvider interface {
	Provider
	// PageFile returns a file descriptor holding the seed's memory of
	// ranges, range i at offset offs[i], and release, which the server
	// calls once the pages are sent (it closes the descriptor). ok false
	// (and no error) means the pages are not in such a file: the server
	// then reads them with ReadPages.
	PageFile(ctx context.Context, peer, seed string, ranges []Range) (fd int, offs []int64, release func(), ok bool, err error)
}

// Config configures both ends.
type Config struct {
	// Node is this node's name (sent to peers, checked by them).
	Node string
	// Secret is the shared cluster secret. Empty only with Insecure.
	Secret []byte
	// Insecure allows an empty secret (no authentication).
	Insecure bool
	// TLS, if set, wraps every connection (server side: certificates;
	// client side: roots and server name).
	TLS *tls.Config
	// Conns is the number of connections a Client keeps per peer (default 4).
	Conns int
	// Timeout bounds every request (default 1 s); a peer that does not
	// answer in time fails the request, so a child never waits forever.
	Timeout time.Duration
	// ForkTimeout bounds a forwarded fork request instead of Timeout
	// (default 30 s): restoring many children takes longer than a page
	// read.
	ForkTimeout time.Duration
}
