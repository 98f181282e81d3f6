package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/container"
	"github.com/mitosis-fork/mitosis/engine"
)

// prepareOpts are the sharing and expiry options of a prepare request.
type prepareOpts struct {
	allow []string
	ttl   time.Duration
	owner uint32    // the caller's uid
	share shareList // who else may fork the seed
}

// parsePrepareOpts validates a request's allow list and ttl.
func parsePrepareOpts(req client.Request) (prepareOpts, error) {
	var o prepareOpts
	for _, a := range req.Allow {
		if err := checkNodeName(a); err != nil {
			return o, fmt.Errorf("%s: allow: %w", req.Op, err)
		}
		if !slices.Contains(o.allow, a) {
			o.allow = append(o.allow, a)
		}
	}
	if req.TTL != "" {
		ttl, err := time.ParseDuration(req.TTL)
		if err != nil || ttl <= 0 {
			return o, fmt.Errorf("%s: ttl %q is not a positive duration (like 90s or 1h)", req.Op, req.TTL)
		}
		o.ttl = ttl
	}
	var err error
	o.share, err = parseShare(req.Op, req.Share)
	return o, err
}

// prepare snapshots pid into a new seed. channelFD >= 0 marks a
// prepare-self seed whose caller waits on that fd.
func (d *Daemon) prepare(pid int, name string, channelFD int, po prepareOpts) (client.SeedInfo, error) {
	if pid == os.Getpid() {
		return client.SeedInfo{}, fmt.Errorf("prepare pid %d: that is the mitosis daemon itself", pid)
	}
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return client.SeedInfo{}, fmt.Errorf("prepare pid %d: no such process", pid)
	}
	if d.isClosing() {
		return client.SeedInfo{}, errors.New("prepare: the daemon is shutting down")
	}
	start := time.Now()
	s, err := d.eng.Prepare(pid, engine.PrepareOptions{Name: name, ChannelFD: channelFD})
	if err != nil {
		d.log.Warn("prepare failed", "pid", pid, "name", name, "self", channelFD >= 0, "took", time.Since(start), "err", err)
		return client.SeedInfo{}, fmt.Errorf("prepare pid %d: %w", pid, err)
	}
	d.mu.Lock()
	rec := &seedRec{id: d.pickID(s.ID, "s-"), name: name, seed: s, self: channelFD >= 0, allow: po.allow,
		owner: po.owner, share: po.share}
	if c := d.containers[pid]; c != nil && c.limits != (container.Limits{}) {
		// Children of a container get containers with its limits.
		n := d.cfg.CgroupPool
		if n <= 0 {
			n = 2
		}
		n = max(n, c.pool)
		rec.pool = container.NewPool(d.cgroupName("seed-"+rec.id), c.limits, n)
	}
	if po.ttl > 0 {
		rec.expires = s.Created.Add(po.ttl)
	}
	d.seeds[rec.id] = rec
	info := d.seedInfoLocked(rec)
	d.mu.Unlock()
	d.recordFrozen()
	if !d.fn.preparedSeed(pid, rec) && isStageName(name) {
		// A stage seed nobody here waits for (its invocation ended, or
		// it asked another node's daemon): it would belong to no
		// function and live until removed by hand.
		if err := d.remove(rec.id, true); err != nil {
			d.log.Warn("remove unclaimed stage seed", "seed", rec.id, "err", err)
		}
		return client.SeedInfo{}, fmt.Errorf("prepare pid %d: no invocation on node %s awaits stage seed %q", pid, d.node, name)
	}
	d.metrics.prepares.Inc()
	if po.ttl > 0 {
		time.AfterFunc(time.Until(rec.expires), func() { d.expire(rec) })
	}
	d.log.Info("prepare", "seed", rec.id, "name", name, "pid", pid, "self", rec.self,
		"vmas", info.VMAs, "present_pages", info.PresentPages, "allow", po.allow, "ttl", po.ttl, "took", time.Since(start))
	return info, nil
}

// lookupSeed finds a seed by id, else by name. d.mu must be held.
func (d *Daemon) lookupSeedLocked(key string) (*seedRec, error) {
	if s, ok := d.seeds[key]; ok {
		return s, nil
	}
	var found []*seedRec
	for _, s := range d.seeds {
		if s.name != "" && s.name == key {
			found = append(found, s)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("no seed %q (see `mitosis seeds`)", key)
	case 1:
		return found[0], nil
	}
	ids := make([]string, len(found))
	for i, s := range found {
		ids[i] = s.id
	}
	sort.Strings(ids)
	return nil, fmt.Errorf("name %q matches %d seeds (%s); use a seed id", key, len(found), strings.Join(ids, ", "))
}

// lookupRefLocked finds a seed held here by SEED or NODE/SEED (NODE this
// node, or the origin of an imported seed). d.mu must be held.
func (d *Daemon) lookupRefLocked(ref string) (*seedRec, error) {
	node, key := splitSeedRef(ref)
	if node == "" || node == d.node {
		return d.lookupSeedLocked(key)
	}
	var found *seedRec
	for _, s := range d.seeds {
		if s.origin == node && (s.originID == key || s.id == key) {
			return s, nil
		}
		if s.origin == node && s.name == key && key != "" {
			if found != nil {
				return nil, fmt.Errorf("name %q matches several seeds imported from node %s; use a seed id", key, node)
			}
			found = s
		}
	}
	if found == nil {
		return nil, fmt.Errorf("no seed %q imported from node %s (see `mitosis seeds`)", key, node)
	}
	return found, nil
}

// fork starts req.Count children of req.Seed. With attached, stdio are the
// child's stdin/stdout/stderr (count is 1); otherwise each child gets
// /dev/null and its own log file. Children started before an error are
// returned with it.
//
// req.Seed is SEED (a seed held here) or NODE/SEED; a seed of another node
// is imported from it first, and every child takes a lease on it there.
func (d *Daemon) fork(ctx context.Context, req client.Request, stdio [3]*os.File, attached bool) ([]*childRec, error) {
	if d.isClosing() {
		return nil, errors.New("fork: the daemon is shutting down")
	}
	s, err := d.resolveSeed(ctx, req.Seed)
	if err != nil {
		return nil, fmt.Errorf("fork: %w", err)
	}
	if req.Count <= 1 {
		k, err := d.forkOne(ctx, s, req, stdio, attached, nil)
		if err != nil {
			return nil, err
		}
		return []*childRec{k}, nil
	}
	// Several workers: the engine overlaps restores on its tracer threads.
	const workers = 2
	var (
		mu    sync.Mutex
		kids  []*childRec
		first error
		next  int
		wg    sync.WaitGroup
	)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				if first != nil || next >= req.Count {
					mu.Unlock()
					return
				}
				next++
				mu.Unlock()
				if err := ctx.Err(); err != nil {
					mu.Lock()
					if first == nil {
						first = fmt.Errorf("fork: stopped after %d of %d children: %w", len(kids), req.Count, err)
					}
					mu.Unlock()
					return
				}
				k, err := d.forkOne(ctx, s, req, stdio, attached, nil)
				mu.Lock()
				if err != nil {
					if first == nil {
						first = err
					}
				} else {
					kids = append(kids, k)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return kids, first
}

// forkOne forks one child of s. With inv (a function invocation), the
// child's stdout and stderr go to inv.log, its payload is inv.payload, and
// the daemon's end of its channel is handed over in inv.channel instead of
// being closed.
func (d *Daemon) forkOne(ctx context.Context, s *seedRec, req client.Request, stdio [3]*os.File, attached bool, inv *invocation) (*childRec, error) {
	k := &childRec{seed: s, attached: attached, exited: make(chan struct{}), invoke: inv != nil, owner: ownerOf(ctx)}
	opts := engine.ForkOptions{Stdio: stdio, Eager: req.Eager, Prefetch: req.Prefetch}
	var closers []*os.File
	defer func() {
		for _, f := range closers {
			_ = f.Close()
		}
	}()
	if inv != nil {
		if !s.self {
			return nil, fmt.Errorf("fork seed %s: an invocation needs a seed made by prepare-self", s.id)
		}
		opts.Stdio = [3]*os.File{nil, inv.log, inv.log}
		req.Payload = inv.payload
	} else if !attached {
		null, err := os.Open(os.DevNull)
		if err != nil {
			return nil, fmt.Errorf("fork: open %s: %w", os.DevNull, err)
		}
		closers = append(closers, null)
		// Named after the child once it has an id.
		logf, err := os.CreateTemp(filepath.Join(d.cfg.StateDir, "children"), "pending-*.log")
		if err != nil {
			return nil, fmt.Errorf("fork: create child log: %w", err)
		}
		k.logPath = logf.Name()
		closers = append(closers, logf)
		opts.Stdio = [3]*os.File{null, logf, logf}
	}
	var mine *os.File
	if inv != nil {
		defer func() {
			if inv.channel == nil && mine != nil { // the fork failed
				_ = mine.Close()
			}
		}()
	}
	if s.self {
		pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			d.dropLog(k)
			return nil, fmt.Errorf("fork: channel socketpair: %w", err)
		}
		// Our end is non-blocking, so reads of an invocation's reply
		// honour deadlines; the child's stays blocking for plain read().
		_ = unix.SetNonblock(pair[0], true)
		mine = os.NewFile(uintptr(pair[0]), "channel-daemon")
		theirs := os.NewFile(uintptr(pair[1]), "channel-child")
		closers = append(closers, theirs)
		if inv == nil {
			closers = append(closers, mine)
		}
		opts.Channel = theirs
	}
	if g, onSpawn, err := d.childGroup(s); err != nil {
		d.dropLog(k)
		return nil, fmt.Errorf("fork seed %s: %w", s.id, err)
	} else if g != nil {
		k.group, opts.OnSpawn = g, onSpawn
	}
	start := time.Now()
	if s.origin != "" {
		// The origin keeps the seed while this child tree pages from it.
		if err := d.takeLease(ctx, s); err != nil {
			d.dropLog(k)
			d.log.Warn("fork failed", "seed", s.id, "origin", s.origin, "err", err)
			return nil, fmt.Errorf("fork seed %s: %w", s.id, err)
		}
	}
	child, err := d.eng.Fork(s.seed, opts)
	if err != nil {
		if k.group != nil {
			_ = k.group.Delete()
		}
		d.dropLog(k)
		if s.origin != "" {
			d.leaseWG.Add(1)
			go d.releaseLease(s, "")
		}
		d.log.Warn("fork failed", "seed", s.id, "took", time.Since(start), "err", err)
		return nil, fmt.Errorf("fork seed %s: %w", s.id, err)
	}
	k.child = child
	mode := "lazy"
	if req.Eager {
		mode = "eager"
	}
	d.metrics.forks.WithLabelValues(mode).Inc()
	d.metrics.restore.Observe(child.Took.Seconds())
	d.mu.Lock()
	id := d.pickID(child.ID, "c-")
	k.id = id
	d.children[id] = k
	d.order = append(d.order, id)
	closing := d.closing
	d.mu.Unlock()
	if k.logPath != "" { // k is in d.children now: logPath changes under d.mu
		named := filepath.Join(d.cfg.StateDir, "children", id+".log")
		if err := os.Rename(k.logPath, named); err != nil {
			d.log.Warn("name child log", "child", id, "err", err)
		} else {
			d.mu.Lock()
			k.logPath = named
			d.mu.Unlock()
		}
	}
	go d.reap(k)
	if s.origin != "" {
		d.leaseWG.Add(1)
		go func() {
			<-child.TreeDone()
			d.releaseLease(s, id)
		}()
	}
	if closing {
		d.killChild(k)
	}
	if mine != nil {
		reply := roleReply{OK: true, Role: client.RoleChild, Seed: s.id, Child: id, Payload: req.Payload}
		if len(reply.Payload) == 0 {
			reply.Payload = []byte("null")
		}
		if !writeLine(mine, reply) {
			d.log.Warn("could not write the child's reply on its channel", "child", id)
		}
		if inv != nil {
			inv.channel = mine
		}
	}
	lvl := slog.LevelInfo
	if inv != nil {
		lvl = slog.LevelDebug // one per invocation
	}
	d.log.Log(ctx, lvl, "fork", "seed", s.id, "child", id, "pid", child.PID, "source", sourceOf(s), "eager", req.Eager,
		"prefetch", req.Prefetch, "attached", attached, "took", time.Since(start), "restore", child.Took)
	return k, nil
}

// dropLog removes the log file of a child that could not be forked.
func (d *Daemon) dropLog(k *childRec) {
	if k.logPath != "" {
		_ = os.Remove(k.logPath)
	}
}

// reap waits for a child to end and records how.
func (d *Daemon) reap(k *childRec) {
	<-k.child.Done()
	ws := k.child.Status()
	exit := client.ExitInfo{Code: ws.ExitStatus()}
	if ws.Signaled() {
		exit = client.ExitInfo{Code: -1, Signal: int(ws.Signal())}
	}
	stats := k.child.Stats()
	cerr := k.child.Err()
	oom := false
	if k.group != nil {
		if n, err := k.group.OOMKills(); err == nil && n > 0 && ws.Signaled() {
			oom = true
			cerr = fmt.Errorf("killed by the OOM killer: the container's memory limit was exceeded")
		}
		go func(g *container.Group) {
			<-k.child.TreeDone()
			_ = g.Delete()
		}(k.group)
	}
	if cerr != nil {
		exit.Error = cerr.Error()
	}
	d.mu.Lock()
	k.oom = oom
	k.exit = exit
	k.stats = stats
	k.err = cerr
	k.ended = time.Now()
	seed := k.seed // rm may swap it for a tombstone once the child has exited
	d.mu.Unlock()
	close(k.exited)
	d.reportExit(k)
	m := d.metrics
	m.faults.Add(float64(stats.Faults))
	m.pagesShared.Add(float64(stats.PagesShared))
	m.pagesCopied.Add(float64(stats.PagesCopied))
	m.pagesZero.Add(float64(stats.PagesZero))
	m.pagesFetched.Add(float64(stats.PagesFetched))
	m.pagesEager.Add(float64(stats.Eager))
	ran := k.ended.Sub(k.child.Started).Round(time.Millisecond)
	defer d.trimHistory()
	if cerr != nil {
		m.childFailures.Inc()
		d.log.Error("child failed", "child", k.id, "seed", seed.id, "source", sourceOf(seed), "pid", k.child.PID,
			"ran", ran, "faults", stats.Faults, "pages_fetched", stats.PagesFetched, "err", cerr)
		return
	}
	if k.invoke {
		// Invocation children leave no history: the invocation's
		// outcome went to its caller.
		d.mu.Lock()
		d.dropChildLocked(k.id)
		d.mu.Unlock()
		return
	}
	d.log.Info("exit", "child", k.id, "seed", seed.id, "pid", k.child.PID, "code", exit.Code,
		"signal", exit.Signal, "ran", ran, "faults", stats.Faults, "pages_copied", stats.PagesCopied,
		"pages_shared", stats.PagesShared, "pages_fetched", stats.PagesFetched)
}

// sourceOf names where a seed's pages come from: its origin node, or
// "local".
func sourceOf(s *seedRec) string {
	if s.origin != "" {
		return s.origin
	}
	return client.SourceLocal
}

// killChild sends SIGKILL to a running child.
func (d *Daemon) killChild(k *childRec) {
	if k.hasExited() {
		return
	}
	if k.child == nil {
		if k.prev != nil {
			// The predecessor reaps it and reports the exit.
			_ = unix.Kill(k.prev.pid, unix.SIGKILL)
		}
		return
	}
	k.child.Kill(unix.SIGKILL)
}

// pid is the child's process id.
func (k *childRec) pid() int {
	if k.child != nil {
		return k.child.PID
	}
	if k.prev != nil {
		return k.prev.pid
	}
	return 0
}

// remove removes a seed (by id or name) or a child (by id).
func (d *Daemon) remove(key string, force bool) error {
	start := time.Now()
	d.mu.Lock()
	if k, ok := d.children[key]; ok && k != nil {
		d.mu.Unlock()
		if !k.hasExited() {
			if !force {
				return fmt.Errorf("rm: child %s is running (pid %d); use `mitosis rm --force %s` to kill it", k.id, k.pid(), k.id)
			}
			d.killChild(k)
			<-k.exited
		}
		d.mu.Lock()
		d.dropChildLocked(k.id)
		d.mu.Unlock()
		d.log.Info("rm", "child", k.id, "force", force, "took", time.Since(start))
		return nil
	}
	s, err := d.lookupRefLocked(key)
	if err != nil {
		d.mu.Unlock()
		if strings.HasPrefix(err.Error(), "no seed") {
			return fmt.Errorf("rm: no seed or child %q (see `mitosis seeds` and `mitosis ps`)", key)
		}
		return fmt.Errorf("rm: %w", err)
	}
	if s.removing {
		d.mu.Unlock()
		return fmt.Errorf("rm: seed %s is already being removed", s.id)
	}
	running := d.runningLocked(s)
	if len(running) > 0 && !force {
		d.mu.Unlock()
		return fmt.Errorf("rm: seed %s has %d running %s; stop them or use `mitosis rm --force %s` to kill them",
			s.id, len(running), plural(len(running), "child", "children"), s.id)
	}
	leases, leaseNodes := s.leasesLocked()
	if leases > 0 && !force {
		d.mu.Unlock()
		return fmt.Errorf("rm: seed %s: %d %s on %s %s still page from it; use --force to remove it anyway (they will fail with a paging error): `mitosis rm --force %s`",
			s.id, leases, plural(leases, "child", "children"), plural(len(leaseNodes), "node", "nodes"), strings.Join(leaseNodes, ", "), s.id)
	}
	s.removing = true
	d.mu.Unlock()
	for _, k := range running {
		d.killChild(k)
	}
	for _, k := range running {
		<-k.exited
	}
	if err := d.eng.RemoveSeed(s.seed); err != nil {
		d.mu.Lock()
		s.removing = false
		d.mu.Unlock()
		return fmt.Errorf("rm seed %s: %w", s.id, err)
	}
	d.mu.Lock()
	delete(d.seeds, s.id)
	// The ps history keeps only what it shows of a removed seed, not the
	// seed (its descriptor, cgroup pool, ...).
	var tomb *seedRec
	for _, k := range d.children {
		if k != nil && k.seed == s {
			if tomb == nil {
				tomb = tombstone(s)
			}
			k.seed = tomb
		}
	}
	d.mu.Unlock()
	d.recordFrozen()
	if s.pool != nil {
		_ = s.pool.Close()
	}
	d.log.Info("rm", "seed", s.id, "name", s.name, "origin", s.origin, "killed", len(running),
		"remote_children", leases, "remote_nodes", leaseNodes, "took", time.Since(start))
	return nil
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// tombstone is what a child's record keeps of a seed that is gone: what ps
// and the access checks read (id, name, origin, owner), not the seed's
// descriptor, cache or cgroup pool.
func tombstone(s *seedRec) *seedRec {
	return &seedRec{id: s.id, name: s.name, origin: s.origin, originID: s.originID, owner: s.owner,
		seed: &engine.Seed{ID: s.id, Name: s.name, Origin: s.origin}, removing: true}
}

// runningLocked lists a seed's running children. d.mu must be held.
func (d *Daemon) runningLocked(s *seedRec) []*childRec {
	var out []*childRec
	for _, k := range d.children {
		if k != nil && k.seed == s && !k.hasExited() {
			out = append(out, k)
		}
	}
	return out
}

// MaxHistory is how many ended children `ps` keeps (with their logs);
// older ones are forgotten and their logs removed, so a daemon that forks
// millions of children holds a bounded record of them.
const MaxHistory = 1000

// trimHistory forgets the oldest ended children beyond MaxHistory.
func (d *Daemon) trimHistory() {
	var logs []string
	d.mu.Lock()
	if len(d.order) <= MaxHistory { // the common case on every exit: nothing to count
		d.mu.Unlock()
		return
	}
	ended := 0
	for _, id := range d.order {
		if k := d.children[id]; k != nil && k.hasExited() {
			ended++
		}
	}
	for i := 0; ended > MaxHistory && i < len(d.order); {
		k := d.children[d.order[i]]
		if k == nil || !k.hasExited() {
			i++
			continue
		}
		if k.logPath != "" {
			logs = append(logs, k.logPath)
		}
		delete(d.children, k.id)
		d.order = append(d.order[:i], d.order[i+1:]...)
		ended--
	}
	d.mu.Unlock()
	for _, l := range logs {
		_ = os.Remove(l)
	}
}

func (d *Daemon) dropChildLocked(id string) {
	delete(d.children, id)
	for i, o := range d.order {
		if o == id {
			d.order = append(d.order[:i], d.order[i+1:]...)
			break
		}
	}
}

func (d *Daemon) seedInfoLocked(s *seedRec) client.SeedInfo {
	info := client.SeedInfo{
		ID:        s.id,
		Name:      s.name,
		ParentPID: s.seed.ParentPID,
		SourcePID: s.seed.SourcePID,
		PrepareMS: ms(s.seed.Took),
		Created:   s.seed.Created,
		Self:      s.self,
		Children:  len(d.runningLocked(s)),
		Origin:    s.origin,
		Allow:     s.allow,
		Owner:     int(s.owner),
		Share:     s.share.strings(),
	}
	info.Leases, info.LeaseNodes = s.leasesLocked()
	if !s.expires.IsZero() {
		exp := s.expires
		info.Expires = &exp
	}
	if s.seed.Desc != nil {
		info.VMAs = len(s.seed.Desc.VMAs)
		info.PresentPages = s.seed.Desc.PresentPages()
		info.Threads = 1 + len(s.seed.Desc.Threads)
	}
	return info
}

// seedInfos lists the seeds c may fork.
func (d *Daemon) seedInfos(c caller) []client.SeedInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]client.SeedInfo, 0, len(d.seeds))
	for _, s := range d.seeds {
		if s.mayFork(c) {
			out = append(out, d.seedInfoLocked(s))
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.Before(out[j].Created)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

func (d *Daemon) childInfo(k *childRec) client.ChildInfo {
	d.mu.Lock()
	seed := k.seed // rm may swap it for a tombstone once the child has exited
	logPath := k.logPath
	d.mu.Unlock()
	info := client.ChildInfo{
		ID:     k.id,
		Seed:   seed.id,
		State:  client.StateRunning,
		Log:    logPath,
		Source: sourceOf(seed),
		Node:   d.node,
	}
	if k.child != nil {
		info.PID, info.StartMS, info.Created = k.child.PID, ms(k.child.Took), k.child.Started
	} else if k.prev != nil {
		info.PID, info.StartMS, info.Created = k.prev.pid, ms(k.prev.took), k.prev.started
	}
	var st engine.ChildStats
	if k.hasExited() {
		d.mu.Lock()
		st, info.ExitCode, info.Signal = k.stats, k.exit.Code, k.exit.Signal
		cerr := k.err
		d.mu.Unlock()
		info.State = client.StateExited
		if !k.ended.IsZero() {
			ended := k.ended
			info.Ended = &ended
		}
		if info.Signal > 0 {
			info.State = client.StateKilled
		}
		if cerr != nil {
			info.State, info.Error = client.StateFailed, cerr.Error()
		}
		if k.oom {
			info.State = client.StateOOM
		}
	} else if k.child != nil {
		st = k.child.Stats()
	}
	info.Faults, info.PagesCopied, info.PagesZero, info.PagesEager = st.Faults, st.PagesCopied, st.PagesZero, st.Eager
	info.PagesShared, info.PagesFetched = st.PagesShared, st.PagesFetched
	return info
}

// childInfos lists the children c may see (and remove).
func (d *Daemon) childInfos(c caller) []client.ChildInfo {
	d.mu.Lock()
	kids := make([]*childRec, 0, len(d.order))
	for _, id := range d.order {
		if k := d.children[id]; k != nil && k.mayRemove(c) {
			kids = append(kids, k)
		}
	}
	d.mu.Unlock()
	out := make([]client.ChildInfo, 0, len(kids))
	for _, k := range kids {
		out = append(out, d.childInfo(k))
	}
	return out
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// childByPID finds a running child by its process id.
func (d *Daemon) childByPID(pid int) *childRec {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, k := range d.children {
		if k.pid() == pid && !k.hasExited() {
			return k
		}
	}
	return nil
}
