package directory

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Async invocations: a gateway files each async invocation it accepts
// under async/<owner>/<id>, owner its session's lease (RunSession.Owner,
// in hex: unique in the cluster), and deletes it once the invocation ran
// and its callback was posted. The records are not under any lease: when
// the owner's lease is gone (the gateway died, or closed with invocations
// it did not finish), another gateway claims them (ClaimAsync) and runs
// them again. Delivery is at least once.

// Owner names the gateway that holds an async invocation: its session's
// lease (RunSession.Owner); 0 is none.
type Owner int64

func (c *Client) asyncKey(owner Owner, id string) string {
	return c.prefix + "async/" + strconv.FormatInt(int64(owner), 16) + "/" + id
}

// MaxAsyncRecord bounds an async invocation's record: larger ones are not
// filed (the gateway keeps them in memory only).
const MaxAsyncRecord = 768 << 10

// PutAsync files the async invocation id of the gateway whose session
// lease is owner.
func (c *Client) PutAsync(ctx context.Context, owner Owner, id string, rec []byte) error {
	if err := checkName("async invocation", id); err != nil {
		return fmt.Errorf("put async: %w", err)
	}
	if owner == 0 {
		return fmt.Errorf("put async %q: no session", id)
	}
	if len(rec) > MaxAsyncRecord {
		return fmt.Errorf("put async %q: record of %d bytes exceeds %d", id, len(rec), MaxAsyncRecord)
	}
	if _, err := c.cli.Put(ctx, c.asyncKey(owner, id), string(rec)); err != nil {
		return fmt.Errorf("put async %q: %w", id, err)
	}
	return nil
}

// DoneAsync removes the record of async invocation id of owner.
func (c *Client) DoneAsync(ctx context.Context, owner Owner, id string) error {
	if _, err := c.cli.Delete(ctx, c.asyncKey(owner, id)); err != nil {
		return fmt.Errorf("done async %q: %w", id, err)
	}
	return nil
}

// Async is an async invocation claimed from a gateway that is gone.
type Async struct {
	ID  string
	Rec []byte
}

// ClaimAsync moves up to max async invocations of gateways whose session
// lease is gone to owner (each in one transaction, so two gateways never
// claim the same record) and returns them.
func (c *Client) ClaimAsync(ctx context.Context, owner Owner, max int) ([]Async, error) {
	if owner == 0 || max <= 0 {
		return nil, nil
	}
	dir := c.prefix + "async/"
	resp, err := c.cli.Get(ctx, dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("claim async: %w", err)
	}
	dead := map[string]bool{} // owner (hex) -> its lease is gone
	var out []Async
	for _, kv := range resp.Kvs {
		if len(out) >= max {
			break
		}
		rest := string(kv.Key)[len(dir):]
		o, id, ok := strings.Cut(rest, "/")
		if !ok || id == "" {
			continue
		}
		if _, known := dead[o]; !known {
			lease, err := strconv.ParseInt(o, 16, 64)
			if err != nil {
				dead[o] = false
				continue
			}
			if Owner(lease) == owner {
				dead[o] = false
				continue
			}
			ttl, err := c.cli.TimeToLive(ctx, clientv3.LeaseID(lease))
			dead[o] = err == nil && ttl.TTL < 0 // -1: expired or revoked
		}
		if !dead[o] {
			continue
		}
		key := string(kv.Key)
		cur, err := c.cli.Get(ctx, key)
		if err != nil || len(cur.Kvs) == 0 {
			continue
		}
		val := cur.Kvs[0].Value
		// One transaction moves it: two gateways never both claim it,
		// and a claimer that dies leaves it with one owner or the other.
		got, err := c.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", cur.Kvs[0].ModRevision)).
			Then(clientv3.OpDelete(key), clientv3.OpPut(c.asyncKey(owner, id), string(val))).
			Commit()
		if err != nil || !got.Succeeded {
			continue // another gateway took it
		}
		out = append(out, Async{ID: id, Rec: val})
	}
	return out, nil
}
