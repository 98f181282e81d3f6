package directory

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// StageLease is the lease of a stage seed with a TTL: the value of
// stages/<function>/<node>/<seed>, attached to an etcd lease of its own.
// While the key exists the seed is wanted; when the lease expires (nobody
// renewed it within TTL) etcd deletes the key, and every gateway's View
// sees the seed go and removes it. Any gateway on the directory can renew
// it, so a client behind a load balancer may reach any of them.
type StageLease struct {
	Function string `json:"function"`
	// Ref is the stage seed as NODE/SEED.
	Ref string `json:"ref"`
	// TTL is the lease's time to live, in whole seconds.
	TTL int64 `json:"ttl_s"`
	// Memory is what the seed's instance holds reserved on its node, in
	// bytes: every gateway counts it in placement while the lease lives.
	Memory  int64     `json:"memory,omitempty"`
	Created time.Time `json:"created"`
}

func (c *Client) stageKey(fn, ref string) string { return c.prefix + "stages/" + fn + "/" + ref }

// LeaseSeconds is ttl in etcd's whole seconds, rounded up, at least one.
func LeaseSeconds(ttl time.Duration) int64 { return max(int64(math.Ceil(ttl.Seconds())), 1) }

// checkStage validates a stage lease's function and NODE/SEED reference.
func checkStage(fn, ref string) error {
	if err := checkName("function", fn); err != nil {
		return err
	}
	node, seed, ok := strings.Cut(ref, "/")
	if !ok || checkName("node", node) != nil || seed == "" || strings.ContainsAny(seed, "/ \t\r\n") {
		return fmt.Errorf("stage seed %q: want NODE/SEED", ref)
	}
	return nil
}

// PutStageLease records stage seed ref of function fn, whose instance
// holds memory bytes reserved, under a new lease of ttl (whole seconds, at
// least etcd's minimum).
func (c *Client) PutStageLease(ctx context.Context, fn, ref string, memory int64, ttl time.Duration) error {
	if err := checkStage(fn, ref); err != nil {
		return fmt.Errorf("put stage lease: %w", err)
	}
	rec := StageLease{Function: fn, Ref: ref, TTL: LeaseSeconds(ttl), Memory: memory, Created: time.Now().UTC()}
	lease, err := c.cli.Grant(ctx, rec.TTL)
	if err != nil {
		return fmt.Errorf("put stage lease %s: grant: %w", ref, err)
	}
	val, _ := json.Marshal(rec)
	if _, err := c.cli.Put(ctx, c.stageKey(fn, ref), string(val), clientv3.WithLease(lease.ID)); err != nil {
		_, _ = c.cli.Revoke(context.WithoutCancel(ctx), lease.ID)
		return fmt.Errorf("put stage lease %s: %w", ref, err)
	}
	return nil
}

// RenewStageLease renews the lease of stage seed ref of function fn for
// ttl from now; false if there is none (expired, removed, never made).
func (c *Client) RenewStageLease(ctx context.Context, fn, ref string, ttl time.Duration) (bool, error) {
	if err := checkStage(fn, ref); err != nil {
		return false, fmt.Errorf("renew stage lease: %w", err)
	}
	key := c.stageKey(fn, ref)
	resp, err := c.cli.Get(ctx, key)
	if err != nil {
		return false, fmt.Errorf("renew stage lease %s: %w", ref, err)
	}
	if len(resp.Kvs) == 0 {
		return false, nil
	}
	kv := resp.Kvs[0]
	var rec StageLease
	if err := json.Unmarshal(kv.Value, &rec); err != nil {
		return false, fmt.Errorf("renew stage lease %s: malformed record: %w", ref, err)
	}
	secs := LeaseSeconds(ttl)
	if rec.TTL == secs && kv.Lease != 0 {
		// The same TTL: keep the lease alive.
		if _, err := c.cli.KeepAliveOnce(ctx, clientv3.LeaseID(kv.Lease)); err != nil {
			if errors.Is(err, rpctypes.ErrLeaseNotFound) {
				return false, nil
			}
			return false, fmt.Errorf("renew stage lease %s: %w", ref, err)
		}
		return true, nil
	}
	// Another TTL: a new lease, swapped in if the record did not change
	// meanwhile, and the old one revoked.
	lease, err := c.cli.Grant(ctx, secs)
	if err != nil {
		return false, fmt.Errorf("renew stage lease %s: grant: %w", ref, err)
	}
	rec.TTL = secs
	val, _ := json.Marshal(rec)
	tx, err := c.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).
		Then(clientv3.OpPut(key, string(val), clientv3.WithLease(lease.ID))).Commit()
	if err != nil || !tx.Succeeded {
		_, _ = c.cli.Revoke(context.WithoutCancel(ctx), lease.ID)
		if err != nil {
			return false, fmt.Errorf("renew stage lease %s: %w", ref, err)
		}
		return false, nil // expired or replaced meanwhile
	}
	if kv.Lease != 0 {
		_, _ = c.cli.Revoke(ctx, clientv3.LeaseID(kv.Lease))
	}
	return true, nil
}

// DeleteStageLease removes the lease record of stage seed ref of function
// fn (none is not an error).
func (c *Client) DeleteStageLease(ctx context.Context, fn, ref string) error {
	if err := checkStage(fn, ref); err != nil {
		return fmt.Errorf("delete stage lease: %w", err)
	}
	key := c.stageKey(fn, ref)
	resp, err := c.cli.Get(ctx, key)
	if err != nil {
		return fmt.Errorf("delete stage lease %s: %w", ref, err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	if l := resp.Kvs[0].Lease; l != 0 {
		if _, err := c.cli.Revoke(ctx, clientv3.LeaseID(l)); err == nil {
			return nil
		}
	}
	if _, err := c.cli.Delete(ctx, key); err != nil {
		return fmt.Errorf("delete stage lease %s: %w", ref, err)
	}
	return nil
}

// StageLeaseRefs returns the stage seeds that have a lease in the
// directory now, as NODE/SEED mapped to the function: one read of the
// keys, linearizable, so a seed missing from a successful answer has no
// lease (it expired or was deleted). A node holding stage seeds asks this
// every second and removes the leased ones whose lease went, so a seed
// does not outlive its lease when no gateway can remove it.
func (c *Client) StageLeaseRefs(ctx context.Context) (map[string]string, error) {
	pre := c.prefix + "stages/"
	resp, err := c.cli.Get(ctx, pre, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("list stage leases: %w", err)
	}
	out := make(map[string]string, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		// stages/<function>/<node>/<seed>: names hold no '/' (checkStage).
		fn, ref, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), pre), "/")
		if ok && checkStage(fn, ref) == nil {
			out[ref] = fn
		}
	}
	return out, nil
}
