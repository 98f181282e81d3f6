package directory

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
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
}

// functionRecord is the value of functions/<name>.
type functionRecord struct {
	Name    string          `json:"name"`
	Created time.Time       `json:"created"`
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
	if err := checkName("function", name); err != nil {
		return Function{}, fmt.Errorf("create function: %w", err)
	}
	if err := checkSpec(name, spec); err != nil {
		return Function{}, fmt.Errorf("create function: %w", err)
	}
	rec := functionRecord{Name: name, Created: time.Now().UTC(), Spec: spec}
	val, err := json.Marshal(rec)
	if err != nil {
		return Function{}, fmt.Errorf("create function %q: %w", name, err)
	}
	key := c.functionKey(name)
	resp, err := c.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(val))).
		Commit()
	if err != nil {
		return Function{}, fmt.Errorf("create function %q: %w", name, err)
	}
	if !resp.Succeeded {
		return Function{}, fmt.Errorf("create function %q: %w (update it or delete it first)", name, ErrExists)
	}
	return Function{Name: name, Spec: append(json.RawMessage(nil), spec...), Revision: resp.Header.Revision, Created: rec.Created}, nil
}

// UpdateFunction replaces the spec of an existing function, keeping its
// Created time, or fails with ErrNotFound.
func (c *Client) UpdateFunction(ctx context.Context, name string, spec []byte) (Function, error) {
	if err := checkName("function", name); err != nil {
		return Function{}, fmt.Errorf("update function: %w", err)
	}
	if err := checkSpec(name, spec); err != nil {
		return Function{}, fmt.Errorf("update function: %w", err)
	}
	key := c.functionKey(name)
	for {
		old, err := c.cli.Get(ctx, key)
		if err != nil {
			return Function{}, fmt.Errorf("update function %q: %w", name, err)
		}
		if len(old.Kvs) == 0 {
			return Function{}, fmt.Errorf("update function %q: %w", name, ErrNotFound)
		}
		created := time.Now().UTC()
		if f, err := decodeFunction(name, old.Kvs[0]); err == nil {
			created = f.Created
		}
		val, err := json.Marshal(functionRecord{Name: name, Created: created, Spec: spec})
		if err != nil {
			return Function{}, fmt.Errorf("update function %q: %w", name, err)
		}
		resp, err := c.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", old.Kvs[0].ModRevision)).
			Then(clientv3.OpPut(key, string(val))).
			Commit()
		if err != nil {
			return Function{}, fmt.Errorf("update function %q: %w", name, err)
		}
		if resp.Succeeded {
			return Function{Name: name, Spec: append(json.RawMessage(nil), spec...), Revision: resp.Header.Revision, Created: created}, nil
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
	return Function{Name: name, Spec: rec.Spec, Revision: kv.ModRevision, Created: rec.Created}, nil
}
