package directory

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// Run records: what a gateway tells every other gateway about the
// workflow runs it ran, so that a run started on one gateway can be looked
// up on any (a load balancer in front of several gateways). A record is
// opaque JSON under runs/<id>, written by the gateway running it, and lives
// under a lease: etcd drops it after the record TTL with no sweeper. A
// record may also be found by a second id (a run's own id when it is
// filed under its caller's id): run-ids/<alias> holds the id it is filed
// under, under the same lease.

func (c *Client) runKey(id string) string   { return c.prefix + "runs/" + id }
func (c *Client) runAlias(id string) string { return c.prefix + "run-ids/" + id }

// MaxRunRecord bounds a run record (etcd refuses requests over 1.5 MiB by
// default).
const MaxRunRecord = 1 << 20

// runLeases shares leases among the run records written within a window,
// so that a busy gateway does not grant a lease per record: a record lives
// between 15/16 of the TTL and the TTL.
type runLeases struct {
	mu      sync.Mutex
	id      clientv3.LeaseID
	ttl     int64
	granted time.Time
}

func (c *Client) runLease(ctx context.Context, ttl time.Duration) (clientv3.LeaseID, error) {
	if ttl <= 0 {
		return 0, fmt.Errorf("a run record's TTL must be positive, not %v", ttl)
	}
	secs := LeaseSeconds(ttl)
	c.runLeases.mu.Lock()
	defer c.runLeases.mu.Unlock()
	l := &c.runLeases
	if l.id != 0 && l.ttl == secs && time.Since(l.granted) < time.Duration(secs)*time.Second/16 {
		return l.id, nil
	}
	resp, err := c.cli.Grant(ctx, secs)
	if err != nil {
		return 0, err
	}
	l.id, l.ttl, l.granted = resp.ID, secs, time.Now()
	return l.id, nil
}

// PutRun files a run record (JSON) under id, and under alias too if it is
// not empty, for ttl (whole seconds, at least one), replacing what either
// held.
func (c *Client) PutRun(ctx context.Context, id, alias string, rec []byte, ttl time.Duration) error {
	if err := checkName("run", id); err != nil {
		return fmt.Errorf("put run: %w", err)
	}
	if alias != "" {
		if err := checkName("run", alias); err != nil {
			return fmt.Errorf("put run %q: alias: %w", id, err)
		}
	}
	if len(rec) > MaxRunRecord {
		return fmt.Errorf("put run %q: record of %d bytes exceeds %d", id, len(rec), MaxRunRecord)
	}
	_, err := c.withRunLease(ctx, ttl, func(lease clientv3.LeaseID) (*clientv3.TxnResponse, error) {
		ops := []clientv3.Op{clientv3.OpPut(c.runKey(id), string(rec), clientv3.WithLease(lease))}
		if alias != "" && alias != id {
			ops = append(ops, clientv3.OpPut(c.runAlias(alias), id, clientv3.WithLease(lease)))
		}
		return c.cli.Txn(ctx).Then(ops...).Commit()
	})
	if err != nil {
		return fmt.Errorf("put run %q: %w", id, err)
	}
	return nil
}

// withRunLease runs txn with the shared run lease, and once more with a
// new one if etcd no longer knows that lease (revoked, or lost with the
// cluster's data).
func (c *Client) withRunLease(ctx context.Context, ttl time.Duration, txn func(clientv3.LeaseID) (*clientv3.TxnResponse, error)) (*clientv3.TxnResponse, error) {
	for attempt := 0; ; attempt++ {
		lease, err := c.runLease(ctx, ttl)
		if err != nil {
			return nil, fmt.Errorf("lease: %w", err)
		}
		resp, err := txn(lease)
		if attempt == 0 && errors.Is(err, rpctypes.ErrLeaseNotFound) {
			c.runLeases.mu.Lock()
			if c.runLeases.id == lease {
				c.runLeases.id = 0
			}
			c.runLeases.mu.Unlock()
			continue
		}
		return resp, err
	}
}

// CreateRun files a run record under id as PutRun does, unless a record is
// filed under id already: then it returns that record and false, and
// writes nothing (one transaction). With a session, the run is marked
// running in it in the same transaction (RunSession.Mark).
func (c *Client) CreateRun(ctx context.Context, id string, rec []byte, ttl time.Duration, sess *RunSession) (existing []byte, created bool, err error) {
	if err := checkName("run", id); err != nil {
		return nil, false, fmt.Errorf("create run: %w", err)
	}
	if len(rec) > MaxRunRecord {
		return nil, false, fmt.Errorf("create run %q: record of %d bytes exceeds %d", id, len(rec), MaxRunRecord)
	}
	key := c.runKey(id)
	var sessLease clientv3.LeaseID
	if sess != nil {
		sess.mu.Lock()
		sessLease = sess.lease
		sess.mu.Unlock()
	}
	resp, err := c.withRunLease(ctx, ttl, func(lease clientv3.LeaseID) (*clientv3.TxnResponse, error) {
		then := []clientv3.Op{clientv3.OpPut(key, string(rec), clientv3.WithLease(lease))}
		if sessLease != 0 {
			then = append(then, clientv3.OpPut(c.runMarkKey(id), sess.name, clientv3.WithLease(sessLease)))
		}
		return c.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(then...).
			Else(clientv3.OpGet(key)).Commit()
	})
	if err != nil {
		return nil, false, fmt.Errorf("create run %q: %w", id, err)
	}
	if resp.Succeeded {
		if sess != nil {
			// Remembered for a new lease; put now if the session had
			// none when the transaction ran.
			sess.mu.Lock()
			sess.ids[id] = true
			late := sess.lease != 0 && sess.lease != sessLease
			lease := sess.lease
			sess.mu.Unlock()
			if late {
				_ = sess.put(id, lease)
			}
		}
		return nil, true, nil
	}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		return kvs[0].Value, false, nil
	}
	return nil, false, nil
}

// DeleteRun removes the record filed under id (not its alias, which goes
// with its lease). A record that is not there is no error.
func (c *Client) DeleteRun(ctx context.Context, id string) error {
	if err := checkName("run", id); err != nil {
		return fmt.Errorf("delete run: %w", err)
	}
	if _, err := c.cli.Delete(ctx, c.runKey(id)); err != nil {
		return fmt.Errorf("delete run %q: %w", id, err)
	}
	return nil
}

// GetRun returns the record filed under id, or under the id that alias id
// names, or ErrNotFound.
func (c *Client) GetRun(ctx context.Context, id string) ([]byte, error) {
	if err := checkName("run", id); err != nil {
		return nil, fmt.Errorf("get run: %w", err)
	}
	key := id
	for range 2 { // the id, then the id its alias names
		resp, err := c.cli.Txn(ctx).Then(clientv3.OpGet(c.runKey(key)), clientv3.OpGet(c.runAlias(key))).Commit()
		if err != nil {
			return nil, fmt.Errorf("get run %q: %w", id, err)
		}
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			return kvs[0].Value, nil
		}
		kvs := resp.Responses[1].GetResponseRange().Kvs
		if len(kvs) == 0 {
			break
		}
		key = string(kvs[0].Value)
	}
	return nil, fmt.Errorf("get run %q: %w", id, ErrNotFound)
}

// Runs returns up to limit run records (0: all), the latest filed first
// (by the revision that created each).
func (c *Client) Runs(ctx context.Context, limit int) ([][]byte, error) {
	opts := []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortDescend)}
	if limit > 0 {
		opts = append(opts, clientv3.WithLimit(int64(limit)))
	}
	resp, err := c.cli.Get(ctx, c.prefix+"runs/", opts...)
	if err != nil {
		return nil, fmt.Errorf("list runs: %w", err)
	}
	out := make([][]byte, len(resp.Kvs))
	for i, kv := range resp.Kvs {
		out[i] = kv.Value
	}
	return out, nil
}

func (c *Client) runCancelKey(id string) string { return c.prefix + "run-cancels/" + id }

// CancelRun asks the gateway that runs the run filed under id to cancel
// it: run-cancels/<id>, under the run lease of ttl, which every gateway
// watches (RunCancels) and the one running it deletes (ForgetRunCancel).
func (c *Client) CancelRun(ctx context.Context, id string, ttl time.Duration) error {
	if err := checkName("run", id); err != nil {
		return fmt.Errorf("cancel run: %w", err)
	}
	_, err := c.withRunLease(ctx, ttl, func(lease clientv3.LeaseID) (*clientv3.TxnResponse, error) {
		return c.cli.Txn(ctx).Then(clientv3.OpPut(c.runCancelKey(id), "", clientv3.WithLease(lease))).Commit()
	})
	if err != nil {
		return fmt.Errorf("cancel run %q: %w", id, err)
	}
	return nil
}

// ForgetRunCancel removes the cancel request of run id.
func (c *Client) ForgetRunCancel(ctx context.Context, id string) error {
	if _, err := c.cli.Delete(ctx, c.runCancelKey(id)); err != nil {
		return fmt.Errorf("forget the cancel of run %q: %w", id, err)
	}
	return nil
}

// RunCancels delivers the id of every run whose cancel is asked
// (CancelRun), those pending when it starts first, until ctx ends; then
// it closes the channel. A watch that etcd ends (a compaction, a lost
// connection) is started again from where it was.
func (c *Client) RunCancels(ctx context.Context) <-chan string {
	out := make(chan string, 16)
	dir := c.prefix + "run-cancels/"
	go func() {
		defer close(out)
		send := func(key []byte) bool {
			select {
			case out <- string(key)[len(dir):]:
				return true
			case <-ctx.Done():
				return false
			}
		}
		var rev int64
		for ctx.Err() == nil {
			if rev == 0 {
				resp, err := c.cli.Get(ctx, dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
				if err != nil {
					if !sleepCtx(ctx, time.Second) {
						return
					}
					continue
				}
				for _, kv := range resp.Kvs {
					if !send(kv.Key) {
						return
					}
				}
				rev = resp.Header.Revision + 1
			}
			wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
			for wr := range c.cli.Watch(wctx, dir, clientv3.WithPrefix(), clientv3.WithRev(rev)) {
				if wr.CompactRevision != 0 {
					rev = 0 // read what is pending again
					break
				}
				if wr.Err() != nil {
					break
				}
				for _, ev := range wr.Events {
					if ev.Type == clientv3.EventTypePut && !send(ev.Kv.Key) {
						cancel()
						return
					}
					rev = ev.Kv.ModRevision + 1
				}
			}
			cancel()
			if !sleepCtx(ctx, 100*time.Millisecond) {
				return
			}
		}
	}()
	return out
}

// sleepCtx waits d, or less if ctx ends first; it says whether ctx is
// still live.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (c *Client) runMarkKey(id string) string { return c.prefix + "runs-running/" + id }

// RunSession marks the runs a gateway is running, under a lease of that
// gateway kept alive while it lives: runs-running/<id>. A record filed as
// running whose mark is gone was left by a gateway that stopped (crashed,
// or lost the directory for longer than the TTL) before the run ended
// (RunsAlive). A lost lease is replaced, and the marks of the runs still
// running are put again under the new one.
type RunSession struct {
	c      *Client
	name   string
	ttl    int
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu    sync.Mutex
	lease clientv3.LeaseID // 0 while there is none
	ids   map[string]bool  // the runs marked
}

// OpenRunSession starts the session of a gateway named name, its lease of
// ttl (at least one second) kept alive in the background; Close ends it and
// its marks with it.
func (c *Client) OpenRunSession(name string, ttl time.Duration) *RunSession {
	ctx, cancel := context.WithCancel(context.Background())
	s := &RunSession{c: c, name: name, ttl: int(max(1, LeaseSeconds(ttl))), ctx: ctx, cancel: cancel,
		done: make(chan struct{}), ids: map[string]bool{}}
	go s.run()
	return s
}

// run keeps a session up: it makes one, puts the marks again, waits for it
// to end, and starts over until Close.
func (s *RunSession) run() {
	defer close(s.done)
	for s.ctx.Err() == nil {
		sess, err := concurrency.NewSession(s.c.cli, concurrency.WithTTL(s.ttl), concurrency.WithContext(s.ctx))
		if err != nil {
			if !sleepCtx(s.ctx, time.Second) {
				return
			}
			continue
		}
		s.mu.Lock()
		s.lease = sess.Lease()
		ids := make([]string, 0, len(s.ids))
		for id := range s.ids {
			ids = append(ids, id)
		}
		s.mu.Unlock()
		for _, id := range ids {
			_ = s.put(id, sess.Lease())
		}
		select {
		case <-sess.Done():
			s.mu.Lock()
			s.lease = 0
			s.mu.Unlock()
		case <-s.ctx.Done():
			s.mu.Lock()
			s.lease = 0
			s.mu.Unlock()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, _ = s.c.cli.Revoke(ctx, sess.Lease()) // the marks go at once
			cancel()
			return
		}
	}
}

func (s *RunSession) put(id string, lease clientv3.LeaseID) error {
	ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
	defer cancel()
	_, err := s.c.cli.Put(ctx, s.c.runMarkKey(id), s.name, clientv3.WithLease(lease))
	return err
}

// Mark marks run id as running here. Without a session at the moment
// (the directory unreachable), the mark is put once there is one.
func (s *RunSession) Mark(id string) error {
	if err := checkName("run", id); err != nil {
		return fmt.Errorf("mark run: %w", err)
	}
	s.mu.Lock()
	s.ids[id] = true
	lease := s.lease
	s.mu.Unlock()
	if lease == 0 {
		return nil
	}
	if err := s.put(id, lease); err != nil {
		return fmt.Errorf("mark run %q: %w", id, err)
	}
	return nil
}

// Unmark removes the mark of run id, which ended.
func (s *RunSession) Unmark(id string) error {
	s.mu.Lock()
	delete(s.ids, id)
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
	defer cancel()
	if _, err := s.c.cli.Delete(ctx, s.c.runMarkKey(id)); err != nil {
		return fmt.Errorf("unmark run %q: %w", id, err)
	}
	return nil
}

// Owner is the session's lease now (0 while there is none): what names
// this gateway's async invocations (PutAsync).
func (s *RunSession) Owner() Owner {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Owner(s.lease)
}

// Close ends the session: its lease is revoked, so its marks go.
func (s *RunSession) Close() {
	s.cancel()
	<-s.done
}

// RunsAlive returns the ids of the runs marked running by a live session,
// with the name of the gateway of each.
func (c *Client) RunsAlive(ctx context.Context) (map[string]string, error) {
	dir := c.prefix + "runs-running/"
	resp, err := c.cli.Get(ctx, dir, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("running runs: %w", err)
	}
	out := make(map[string]string, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out[string(kv.Key)[len(dir):]] = string(kv.Value)
	}
	return out, nil
}

// RunAlive says whether run id is marked running by a live session.
func (c *Client) RunAlive(ctx context.Context, id string) (bool, error) {
	resp, err := c.cli.Get(ctx, c.runMarkKey(id), clientv3.WithCountOnly())
	if err != nil {
		return false, fmt.Errorf("run %q running: %w", id, err)
	}
	return resp.Count > 0, nil
}
