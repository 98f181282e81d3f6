package directory

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Function is a deployed function: its spec (JSON, opaque to this package)
// and bookkeeping.
type Function struct {
	// Name is the function's name (the key segment).
	Name string `json:"name"`
	// Spec is the deployer's description of the function.
	Spec json.RawMessage `json:"spec"`
	// Revision is the etcd mod revision of the record: it grows with every
	// create or update.
	Revision int64 `json:"revision"`
	// Created is when the function was first created.
	Created time.Time `json:"created"`
	// TTL is the function's time to live in whole seconds when it was
	// created with one (CreateFunctionTTL): the record lives under an etcd
	// lease of that TTL, renewed by RenewFunction, and goes with it. 0:
	// the function lives until deleted.
	TTL int64 `json:"ttl_s,omitempty"`
}

// functionRecord is the value of functions/<name>.
type functionRecord struct {
	Name    string          `json:"name"`
	Created time.Time       `json:"created"`
	TTL     int64           `json:"ttl_s,omitempty"`
	Spec    json.RawMessage `json:"spec"`
}

func checkSpec(name string, spec []byte) error {
	if !json.Valid(spec) {
		return fmt.Errorf("spec of function %q is not valid JSON", name)
	}
	return nil
}

// CreateFunction creates functions/<name> with spec (valid JSON), or fails
// with ErrExists if the function exists (one transaction).
func (c *Client) CreateFunction(ctx context.Context, name string, spec []byte) (Function, error) {
	return c.createFunction(ctx, name, spec, 0)
}

// CreateFunctionTTL creates a function as CreateFunction does, under a
// lease of ttl (whole seconds, at least one): unless renewed
// (RenewFunction) within ttl, etcd deletes the record, and every View sees
// the function go as if it had been deleted. For functions a client
// makes for a while (a workflow run's own function), so that a client
// that dies leaves none behind for good.
func (c *Client) CreateFunctionTTL(ctx context.Context, name string, spec []byte, ttl time.Duration) (Function, error) {
	if ttl <= 0 {
		return Function{}, fmt.Errorf("create function %q: TTL %v is not positive", name, ttl)
	}
	return c.createFunction(ctx, name, spec, LeaseSeconds(ttl))
}

func (c *Client) createFunction(ctx context.Context, name string, spec []byte, ttl int64) (Function, error) {
	if err := checkName("function", name); err != nil {
		return Function{}, fmt.Errorf("create function: %w", err)
	}
	if err := checkSpec(name, spec); err != nil {
		return Function{}, fmt.Errorf("create function: %w", err)
	}
	rec := functionRecord{Name: name, Created: time.Now().UTC(), Spec: spec, TTL: ttl}
	val, err := json.Marshal(rec)
	if err != nil {
		return Function{}, fmt.Errorf("create function %q: %w", name, err)
	}
	var opts []clientv3.OpOption
	var lease clientv3.LeaseID
	if ttl > 0 {
		l, err := c.cli.Grant(ctx, ttl)
		if err != nil {
			return Function{}, fmt.Errorf("create function %q: grant its lease: %w", name, err)
		}
		lease = l.ID
		opts = append(opts, clientv3.WithLease(lease))
	}
	revoke := func() { c.revokeLease(ctx, lease) }
	key := c.functionKey(name)
	resp, err := c.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(val), opts...)).
		Commit()
	if err != nil {
		revoke()
		return Function{}, fmt.Errorf("create function %q: %w", name, err)
	}
	if !resp.Succeeded {
		revoke()
		return Function{}, fmt.Errorf("create function %q: %w (update it or delete it first)", name, ErrExists)
	}
	return Function{Name: name, Spec: append(json.RawMessage(nil), spec...), Revision: resp.Header.Revision, Created: rec.Created, TTL: ttl}, nil
}

// revokeLease revokes lease id (none for 0), even after ctx ends: a lease
// granted for a record that was not written, or that a record left.
func (c *Client) revokeLease(ctx context.Context, id clientv3.LeaseID) {
	if id != 0 {
		_, _ = c.cli.Revoke(context.WithoutCancel(ctx), id)
	}
}

// RenewFunction keeps a function created with a TTL alive for its TTL
// from now. ErrNotFound: no such function (deleted, or its lease ran
// out); ErrNoTTL: it was created without one.
func (c *Client) RenewFunction(ctx context.Context, name string) error {
	if err := checkName("function", name); err != nil {
		return fmt.Errorf("renew function: %w", err)
	}
	resp, err := c.cli.Get(ctx, c.functionKey(name))
	if err != nil {
		return fmt.Errorf("renew function %q: %w", name, err)
	}
	if len(resp.Kvs) == 0 {
		return fmt.Errorf("renew function %q: %w", name, ErrNotFound)
	}
	if resp.Kvs[0].Lease == 0 {
		return fmt.Errorf("renew function %q: %w", name, ErrNoTTL)
	}
	if _, err := c.cli.KeepAliveOnce(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			return fmt.Errorf("renew function %q: %w (its TTL ran out)", name, ErrNotFound)
		}
		return fmt.Errorf("renew function %q: %w", name, err)
	}
	return nil
}

// UpdateFunction replaces the spec of an existing function, keeping its
// Created time and its TTL, or fails with ErrNotFound.
func (c *Client) UpdateFunction(ctx context.Context, name string, spec []byte) (Function, error) {
	return c.updateFunction(ctx, name, spec, -1)
}

// UpdateFunctionTTL replaces the spec of an existing function as
// UpdateFunction does and sets its TTL: ttl from now under a new lease
// (whole seconds, at least one), or none for 0 (the function then lives
// until deleted). The old lease, if any, is revoked once the function is
// off it.
func (c *Client) UpdateFunctionTTL(ctx context.Context, name string, spec []byte, ttl time.Duration) (Function, error) {
	if ttl < 0 {
		return Function{}, fmt.Errorf("update function %q: TTL %v is negative", name, ttl)
	}
	return c.updateFunction(ctx, name, spec, leaseSeconds(ttl))
}

// leaseSeconds is ttl in whole lease seconds, 0 for none.
func leaseSeconds(ttl time.Duration) int64 {
	if ttl <= 0 {
		return 0
	}
	return LeaseSeconds(ttl)
}

// updateFunction is UpdateFunction (newTTL < 0: keep the TTL) and
// UpdateFunctionTTL (newTTL lease seconds, 0 for none).
func (c *Client) updateFunction(ctx context.Context, name string, spec []byte, newTTL int64) (Function, error) {
	if err := checkName("function", name); err != nil {
		return Function{}, fmt.Errorf("update function: %w", err)
	}
	if err := checkSpec(name, spec); err != nil {
		return Function{}, fmt.Errorf("update function: %w", err)
	}
	key := c.functionKey(name)
	var lease clientv3.LeaseID // granted for newTTL > 0, once
	revoke := func(id clientv3.LeaseID) { c.revokeLease(ctx, id) }
	for {
		old, err := c.cli.Get(ctx, key)
		if err != nil {
			revoke(lease)
			return Function{}, fmt.Errorf("update function %q: %w", name, err)
		}
		if len(old.Kvs) == 0 {
			revoke(lease)
			return Function{}, fmt.Errorf("update function %q: %w", name, ErrNotFound)
		}
		created, ttl := time.Now().UTC(), int64(0)
		if f, err := decodeFunction(name, old.Kvs[0]); err == nil {
			created, ttl = f.Created, f.TTL
		}
		oldLease := clientv3.LeaseID(old.Kvs[0].Lease)
		var opts []clientv3.OpOption
		usedNew, leftOld := false, false // the put is on lease; it takes the function off oldLease
		switch {
		case newTTL < 0 || (newTTL == ttl && oldLease != 0) || (newTTL == 0 && oldLease == 0):
			// The TTL stays: on its lease, or on none.
			if oldLease != 0 {
				opts = append(opts, clientv3.WithIgnoreLease())
			}
		case newTTL > 0:
			if lease == 0 {
				l, err := c.cli.Grant(ctx, newTTL)
				if err != nil {
					return Function{}, fmt.Errorf("update function %q: grant its lease: %w", name, err)
				}
				lease = l.ID
			}
			ttl, usedNew, leftOld = newTTL, true, oldLease != 0
			opts = append(opts, clientv3.WithLease(lease))
		default: // off its lease: it lives until deleted
			ttl, leftOld = 0, true
		}
		val, err := json.Marshal(functionRecord{Name: name, Created: created, Spec: spec, TTL: ttl})
		if err != nil {
			revoke(lease)
			return Function{}, fmt.Errorf("update function %q: %w", name, err)
		}
		resp, err := c.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", old.Kvs[0].ModRevision)).
			Then(clientv3.OpPut(key, string(val), opts...)).
			Commit()
		if err != nil {
			revoke(lease)
			return Function{}, fmt.Errorf("update function %q: %w", name, err)
		}
		if resp.Succeeded {
			if !usedNew {
				revoke(lease) // granted in an earlier round, not used
			}
			if leftOld {
				revoke(oldLease) // nothing else is on a function's lease
			}
			return Function{Name: name, Spec: append(json.RawMessage(nil), spec...), Revision: resp.Header.Revision, Created: created, TTL: ttl}, nil
		}
		// Changed in between: read it again.
	}
}

// GetFunction returns the function, or ErrNotFound.
func (c *Client) GetFunction(ctx context.Context, name string) (Function, error) {
	if err := checkName("function", name); err != nil {
		return Function{}, fmt.Errorf("get function: %w", err)
	}
	resp, err := c.cli.Get(ctx, c.functionKey(name))
	if err != nil {
		return Function{}, fmt.Errorf("get function %q: %w", name, err)
	}
	if len(resp.Kvs) == 0 {
		return Function{}, fmt.Errorf("get function %q: %w", name, ErrNotFound)
	}
	f, err := decodeFunction(name, resp.Kvs[0])
	if err != nil {
		return Function{}, fmt.Errorf("get function: %w", err)
	}
	return f, nil
}

// DeleteFunction deletes the function, or fails with ErrNotFound. Its
// seeds belong to the nodes holding them and stay until those delete them.
func (c *Client) DeleteFunction(ctx context.Context, name string) error {
	if err := checkName("function", name); err != nil {
		return fmt.Errorf("delete function: %w", err)
	}
	resp, err := c.cli.Delete(ctx, c.functionKey(name))
	if err != nil {
		return fmt.Errorf("delete function %q: %w", name, err)
	}
	if resp.Deleted == 0 {
		return fmt.Errorf("delete function %q: %w", name, ErrNotFound)
	}
	return nil
}

// Functions lists the functions, sorted by name. A record that does not
// decode is left out and logged.
func (c *Client) Functions(ctx context.Context) ([]Function, error) {
	dir := c.prefix + "functions/"
	resp, err := c.cli.Get(ctx, dir, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list functions: %w", err)
	}
	fns := make([]Function, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		f, err := decodeFunction(string(kv.Key)[len(dir):], kv)
		if err != nil {
			c.log.Warn("directory: skipping a malformed function record", "key", string(kv.Key), "err", err)
			continue
		}
		fns = append(fns, f)
	}
	return fns, nil
}

// FunctionNames returns the names of the functions in the directory and
// the revision of the store it read them at (one linearizable read of the
// keys): a function absent from the answer whose record had a revision at
// most that one was deleted, or its TTL ran out.
func (c *Client) FunctionNames(ctx context.Context) (map[string]bool, int64, error) {
	dir := c.prefix + "functions/"
	resp, err := c.cli.Get(ctx, dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, 0, fmt.Errorf("list functions: %w", err)
	}
	names := make(map[string]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		names[string(kv.Key)[len(dir):]] = true
	}
	return names, resp.Header.Revision, nil
}

// decodeFunction decodes the record of function name.
func decodeFunction(name string, kv *mvccpb.KeyValue) (Function, error) {
	if err := checkName("function", name); err != nil {
		return Function{}, err
	}
	var rec functionRecord
	if err := json.Unmarshal(kv.Value, &rec); err != nil {
		return Function{}, fmt.Errorf("function %q: malformed record: %w", name, err)
	}
	if len(rec.Spec) == 0 {
		return Function{}, fmt.Errorf("function %q: record has no spec", name)
	}
	return Function{Name: name, Spec: rec.Spec, Revision: kv.ModRevision, Created: rec.Created, TTL: rec.TTL}, nil
}
