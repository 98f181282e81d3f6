package directory

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// SeedRecord says that a node holds a seed of a function; it is the value
// of seeds/<function>/<node>, attached to that node's lease.
type SeedRecord struct {
	// Function is the function the seed was initialized for.
	Function string `json:"function"`
	// Node is the node holding the seed (its page source).
	Node string `json:"node"`
	// SeedID is the seed's id on that node (fork it as NODE/SEEDID).
	SeedID string `json:"seed_id"`
	// Created is when the seed was prepared.
	Created time.Time `json:"created"`
	// PrepareMS is how long initializing and preparing it took.
	PrepareMS float64 `json:"prepare_ms"`
	// Generation counts the seeds made for the function (a re-initialized
	// seed has a higher one).
	Generation int64 `json:"generation"`
}

// PutSeed records that this node holds seed s, under the node's lease: the
// record is gone when the node dies. s.Node must be empty (it is set) or the
// registration's node; a zero s.Created is set to now.
func (r *Registration) PutSeed(ctx context.Context, s SeedRecord) error {
	node := r.info.Name
	if s.Node == "" {
		s.Node = node
	}
	if s.Node != node {
		return fmt.Errorf("put seed of function %q: record names node %q, but this registration is node %q", s.Function, s.Node, node)
	}
	if err := checkName("function", s.Function); err != nil {
		return fmt.Errorf("put seed: %w", err)
	}
	if s.SeedID == "" {
		return fmt.Errorf("put seed of function %q: empty seed id", s.Function)
	}
	if s.Created.IsZero() {
		s.Created = time.Now().UTC()
	}
	val, err := json.Marshal(s)
	if err != nil {
		return fmt.Errorf("put seed of function %q: %w", s.Function, err)
	}
	if err := r.put(ctx, r.c.seedKey(s.Function, node), string(val)); err != nil {
		return fmt.Errorf("put seed of function %q on node %q: %w", s.Function, node, err)
	}
	return nil
}

// DeleteSeed removes this node's seed record of function, or fails with
// ErrNotFound.
func (r *Registration) DeleteSeed(ctx context.Context, function string) error {
	if err := checkName("function", function); err != nil {
		return fmt.Errorf("delete seed: %w", err)
	}
	resp, err := r.c.cli.Delete(ctx, r.c.seedKey(function, r.info.Name))
	if err != nil {
		return fmt.Errorf("delete seed of function %q on node %q: %w", function, r.info.Name, err)
	}
	if resp.Deleted == 0 {
		return fmt.Errorf("delete seed of function %q on node %q: %w", function, r.info.Name, ErrNotFound)
	}
	return nil
}

// Seeds lists the seeds of function, sorted by node. A record that does not
// decode is left out and logged.
func (c *Client) Seeds(ctx context.Context, function string) ([]SeedRecord, error) {
	if err := checkName("function", function); err != nil {
		return nil, fmt.Errorf("list seeds: %w", err)
	}
	dir := c.prefix + "seeds/" + function + "/"
	resp, err := c.cli.Get(ctx, dir, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list seeds of function %q: %w", function, err)
	}
	seeds := make([]SeedRecord, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		s, err := decodeSeed(function, string(kv.Key)[len(dir):], kv.Value)
		if err != nil {
			c.log.Warn("directory: skipping a malformed seed record", "key", string(kv.Key), "err", err)
			continue
		}
		seeds = append(seeds, s)
	}
	return seeds, nil
}

// decodeSeed decodes the record at seeds/<function>/<node>; the key's names
// win over the value's.
func decodeSeed(function, node string, val []byte) (SeedRecord, error) {
	var s SeedRecord
	if strings.Contains(node, "/") {
		return s, fmt.Errorf("seed key of function %q has extra segments %q", function, node)
	}
	if err := checkName("node", node); err != nil {
		return s, err
	}
	if err := json.Unmarshal(val, &s); err != nil {
		return s, fmt.Errorf("seed of function %q on node %q: %w", function, node, err)
	}
	s.Function, s.Node = function, node
	return s, nil
}
