package e2e

import (
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/node"
)

// daemonUsage is what a leaking daemon would grow. The counters in the
// first group must come back exactly; threads, mappings and RSS within the
// bounds of soakCompare; records and logs are bounded by node.MaxHistory.
type daemonUsage struct {
	fds        int // entries of /proc/PID/fd
	memfds     int // of which memfds (the stub, one page cache per forked-from seed)
	cgroups    int // directories under the daemon's cgroup tree mitosis-<node>, all hierarchies
	stateFiles int // entries under the state dir (but children/) and the daemon's TMPDIR
	procs      int // processes whose parent is the daemon (running children, stubs, zombies)
	running    int // children `ps` shows running

	threads, maps, rssKB int
	rssAnonKB, rssFileKB int // VmRSS = RssAnon + RssFile + RssShmem

	records int // children `ps` lists (the bounded history)
	logs    int // files in STATE/children
	strays  int // files in STATE/children that are no listed child's log
	shmemKB int // Shmem of /proc/meminfo (system-wide: memfd and tmpfs pages)

	// for the report when a counter does not come back
	fdTargets map[string]int
	state     []string
	strayLogs []string
}

func (u daemonUsage) String() string {
	return fmt.Sprintf("fds %d (memfds %d), cgroups %d, state files %d, daemon child processes %d, running %d, threads %d, mappings %d, RSS %d kB (anon %d, file %d), records %d, logs %d (strays %d), Shmem %d kB",
		u.fds, u.memfds, u.cgroups, u.stateFiles, u.procs, u.running, u.threads, u.maps, u.rssKB, u.rssAnonKB, u.rssFileKB, u.records, u.logs, u.strays, u.shmemKB)
}

// soakMonitor holds the connection usage() lists children on. It is opened
// before the first measurement and kept until after the last, so its own
// descriptor in the daemon is counted the same both times.
type soakMonitor struct {
	c *client.Client
}

func newSoakMonitor(t *testing.T) *soakMonitor {
	t.Helper()
	c, err := client.Dial(sockPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &soakMonitor{c: c}
}

func (m *soakMonitor) usage(t *testing.T) daemonUsage {
	t.Helper()
	u, err := m.measure()
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func (m *soakMonitor) measure() (daemonUsage, error) {
	var u daemonUsage
	pid := strconv.Itoa(daemonPID)
	fdDir := filepath.Join("/proc", pid, "fd")
	ents, err := os.ReadDir(fdDir)
	if err != nil {
		return u, err
	}
	u.fdTargets = map[string]int{}
	for _, e := range ents {
		l, err := os.Readlink(filepath.Join(fdDir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		u.fds++
		// Page caches: memfds, or files of the huge-page tmpfs.
		if strings.HasPrefix(l, "/memfd:") || strings.HasPrefix(l, "/"+descriptor.CacheMemfdPrefix) {
			u.memfds++
		}
		u.fdTargets[fdKind(l)]++
	}
	if u.threads, err = procInt(daemonPID, "Threads"); err != nil {
		return u, err
	}
	rss, err := procStatus(daemonPID, "VmRSS")
	if err != nil {
		return u, err
	}
	if u.rssKB, err = strconv.Atoi(strings.Fields(rss)[0]); err != nil {
		return u, fmt.Errorf("VmRSS %q: %v", rss, err)
	}
	for name, dst := range map[string]*int{"RssAnon": &u.rssAnonKB, "RssFile": &u.rssFileKB} {
		if v, err := procStatus(daemonPID, name); err == nil {
			*dst, _ = strconv.Atoi(strings.Fields(v)[0])
		}
	}
	b, err := os.ReadFile(filepath.Join("/proc", pid, "maps"))
	if err != nil {
		return u, err
	}
	u.maps = strings.Count(string(b), "\n")
	u.cgroups = daemonCgroups()
	u.state = stateEntries()
	u.stateFiles = len(u.state)
	u.procs = len(childrenOf(daemonPID))
	u.shmemKB = meminfoKB("Shmem")

	kids, err := m.c.PS()
	if err != nil {
		return u, err
	}
	u.records = len(kids)
	listed := map[string]bool{}
	for _, k := range kids {
		if k.State == client.StateRunning {
			u.running++
		}
		if k.Log != "" {
			listed[filepath.Base(k.Log)] = true
		}
	}
	// After ps: a log is created before its child is listed.
	logs, _ := os.ReadDir(filepath.Join(stateDir, "children"))
	u.logs = len(logs)
	for _, l := range logs {
		if !listed[l.Name()] {
			u.strays++
			u.strayLogs = append(u.strayLogs, l.Name())
		}
	}
	return u, nil
}

// fdKind groups descriptor targets for the report: "socket:[123]" ->
// "socket", "/memfd:mitosis-cache-s-1 (deleted)" -> "/memfd:mitosis-cache".
func fdKind(l string) string {
	if i := strings.Index(l, ":["); i > 0 {
		return l[:i]
	}
	if strings.HasPrefix(l, "anon_inode:") {
		return l
	}
	if strings.HasPrefix(l, "/"+descriptor.CacheMemfdPrefix) { // the huge-page cache's files
		return "/" + descriptor.CacheMemfdPrefix + "*"
	}
	if strings.HasPrefix(l, "/memfd:") {
		l = strings.TrimSuffix(l, " (deleted)")
		if i := strings.LastIndex(l, "-s-"); i > 0 {
			return l[:i] + "-s-*"
		}
		return l
	}
	return filepath.Dir(l) + "/*"
}

// stateEntries lists what the daemon keeps on disk besides child logs:
// everything under the state dir but children/, and its TMPDIR.
func stateEntries() []string {
	var out []string
	for _, root := range []string{stateDir, daemonTmp} {
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil || p == root {
				return nil
			}
			rel, _ := filepath.Rel(tmpRoot, p)
			if p == filepath.Join(stateDir, "children") {
				return filepath.SkipDir
			}
			out = append(out, rel)
			return nil
		})
	}
	sort.Strings(out)
	return out
}

// daemonCgroups counts the directories of the daemon's cgroup tree
// (node.cgroupRoot: mitosis-<node name> below the daemon's own cgroup, in
// every v1 hierarchy container uses and in the unified one). The test
// daemon runs without --node, so its node name is the hostname.
func daemonCgroups() int {
	host, err := os.Hostname()
	if err != nil {
		return -1
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", daemonPID))
	if err != nil {
		return -1
	}
	var roots []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(l, ":", 3)
		if len(f) != 3 {
			continue
		}
		if f[1] == "" { // unified
			for _, m := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
				var st syscall.Statfs_t
				if syscall.Statfs(m, &st) == nil && st.Type == 0x63677270 { // CGROUP2_SUPER_MAGIC
					roots = append(roots, filepath.Join(m, f[2], node.CgroupRoot(host, stateDir)))
				}
			}
			continue
		}
		for _, c := range strings.Split(f[1], ",") {
			if c == "memory" || c == "cpu" || c == "pids" {
				roots = append(roots, filepath.Join("/sys/fs/cgroup", c, f[2], node.CgroupRoot(host, stateDir)))
			}
		}
	}
	n := 0
	for _, r := range roots {
		filepath.WalkDir(r, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				n++
			}
			return nil
		})
	}
	return n
}

// childrenOf lists the processes whose parent is pid.
func childrenOf(pid int) []int {
	var out []int
	for _, p := range allPIDs() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			out = append(out, p)
		}
	}
	return out
}

func meminfoKB(field string) int {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == field {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	return -1
}

// settle measures until the counters that must come back exactly are back
// at before's (reaping, log renames and connection teardown are
// asynchronous) and RSS is within its bound, for at most 15 s, and returns
// the last measurement.
func (m *soakMonitor) settle(t *testing.T, before daemonUsage) daemonUsage {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		u := m.usage(t)
		// RSS too: the Go runtime returns a burst's heap to the system
		// over seconds (its background scavenger), and a leak does not
		// come back within the deadline.
		settled := exactDiffs(before, u) == nil && u.rssKB*100 <= before.rssKB*(100+soakRSSPercent)
		if settled || time.Now().After(deadline) {
			return u
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// exactDiffs lists the counters of after that are not exactly before's.
func exactDiffs(before, after daemonUsage) []string {
	var d []string
	cmp := func(name string, b, a int) {
		if a != b {
			d = append(d, fmt.Sprintf("%s %d -> %d", name, b, a))
		}
	}
	cmp("descriptors", before.fds, after.fds)
	cmp("memfds", before.memfds, after.memfds)
	cmp("cgroups", before.cgroups, after.cgroups)
	cmp("state files", before.stateFiles, after.stateFiles)
	cmp("daemon child processes", before.procs, after.procs)
	cmp("stray logs", before.strays, after.strays)
	if after.running != 0 {
		d = append(d, fmt.Sprintf("%d children still running", after.running))
	}
	return d
}

// Bounds for what the Go runtime moves on its own: threads it parks in
// its pool (at most GOMAXPROCS-ish more), mappings of its heap arenas and
// stacks, and RSS (10%: the target).
//
// RSS is VmRSS of the daemon, about 31 MB at rest here: ~24 MB of it are
// pages of the mitosisd binary (RssFile, which grows as code runs for the
// first time) and ~8 MB anonymous, mostly the Go heap up to its GC goal
// (the 4 MB minimum goal while the live heap is ~1.5 MB). Both settle
// after a warm-up of the same operations; with the warm-ups below, 1,000
// prepare/remove cycles that leave nothing behind (MITOSIS_METRICS shows
// the live heap flat) moved RSS by +0.7% to +1.9% (+5.9% with
// MITOSIS_METRICS, whose forced GC lowers the first measurement), so 10%
// is above the noise and a leak of ~3 MB shows.
const (
	soakThreadSlack = 4
	soakMapSlack    = 16
	soakRSSPercent  = 10
)

// soakCompare reports every difference between before and after beyond
// the bounds above; wantRecords < 0 skips the history check.
func soakCompare(t *testing.T, what string, before, after daemonUsage, wantRecords int) {
	t.Helper()
	for _, d := range exactDiffs(before, after) {
		t.Errorf("%s: daemon %s", what, d)
	}
	if after.fds != before.fds {
		t.Errorf("%s: descriptors by target before %v after %v", what, before.fdTargets, after.fdTargets)
	}
	if after.stateFiles != before.stateFiles {
		t.Errorf("%s: state files before %v\nafter %v", what, before.state, after.state)
	}
	if after.strays != before.strays {
		t.Errorf("%s: logs of no listed child before %v after %v", what, before.strayLogs, after.strayLogs)
	}
	if after.threads > before.threads+soakThreadSlack {
		t.Errorf("%s: daemon threads %d -> %d (more than %d new)", what, before.threads, after.threads, soakThreadSlack)
	}
	if after.maps > before.maps+soakMapSlack {
		t.Errorf("%s: daemon mappings %d -> %d (more than %d new)", what, before.maps, after.maps, soakMapSlack)
	}
	if after.rssKB*100 > before.rssKB*(100+soakRSSPercent) {
		t.Errorf("%s: daemon RSS %d kB -> %d kB (+%.1f%%, bound %d%%)", what, before.rssKB, after.rssKB,
			100*float64(after.rssKB-before.rssKB)/float64(before.rssKB), soakRSSPercent)
	}
	if wantRecords >= 0 && after.records != wantRecords {
		t.Errorf("%s: ps lists %d children, want %d (history bounded at %d)", what, after.records, wantRecords, node.MaxHistory)
	}
	if after.records > node.MaxHistory || after.logs > node.MaxHistory+after.strays {
		t.Errorf("%s: ps lists %d children with %d logs; the history is bounded at %d", what, after.records, after.logs, node.MaxHistory)
	}
}

// soakN reads a positive count from env, else def.
func soakN(env string, def int) int {
	if v := os.Getenv(env); v != "" {
		if k, err := strconv.Atoi(v); err == nil && k > 0 {
			return k
		}
	}
	return def
}

// soakForker forks attached children through the client API, one
// connection per worker: the child's stdout and stderr are a file of the
// worker's (truncated before each child), its stdin /dev/null, and the
// daemon answers with its exit status on the same connection. That is the
// cheapest path that still sees every child's exit code and output: no CLI
// process per child, no polling of ps.
type soakForker struct {
	seed      string
	parentPID int
	redial    int // a worker opens a new connection every redial children

	digests sync.Map // DIGEST -> *atomic.Int64
	failed  atomic.Int64
	done    atomic.Int64
	startMS struct {
		sync.Mutex
		v []float64
	}
}

// run forks n children, par at a time, and reports every bad one (up to
// the first few in full); after the first failure no new child starts.
func (f *soakForker) run(t *testing.T, n, par int) {
	t.Helper()
	var next atomic.Int64
	var reported atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < par; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			if err := f.worker(w, n, &next, func(i int, msg string) {
				f.failed.Add(1)
				if reported.Add(1) <= 5 {
					t.Errorf("child %d of %s: %s", i, f.seed, msg)
				}
			}); err != nil {
				f.failed.Add(1)
				t.Errorf("fork worker %d: %v", w, err)
			}
		}(w)
	}
	wg.Wait()
	if k := f.failed.Load(); k > 0 {
		t.Errorf("%d problems; %d of %d children ran", k, f.done.Load(), n)
	}
}

func (f *soakForker) worker(w, n int, next *atomic.Int64, bad func(int, string)) error {
	out, err := os.CreateTemp(tmpRoot, fmt.Sprintf("soak-out-%d-*", w))
	if err != nil {
		return err
	}
	defer os.Remove(out.Name())
	defer out.Close()
	in, err := os.Open(os.DevNull)
	if err != nil {
		return err
	}
	defer in.Close()
	var c *client.Client
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	for k := 0; f.failed.Load() == 0; k++ {
		i := int(next.Add(1) - 1)
		if i >= n {
			return nil
		}
		if c == nil || (f.redial > 0 && k%f.redial == 0) {
			if c != nil {
				c.Close()
			}
			if c, err = client.Dial(sockPath); err != nil {
				return err
			}
		}
		r, err := forkAttachedFile(c, f.seed, in, out, nil)
		if err != nil {
			return err
		}
		if r.timedOut {
			bad(i, fmt.Sprintf("did not end within %v; output:\n%s", forkTimeout, r.out))
			return nil
		}
		if r.err != nil {
			bad(i, r.err.Error())
			return nil
		}
		o, probs := r.problems(cChecks, f.parentPID)
		b := r.out
		if len(probs) > 0 {
			bad(i, fmt.Sprintf("%s: %s\n%s", r.info.ID, strings.Join(probs, "; "), b))
			continue
		}
		v, _ := f.digests.LoadOrStore(o.digest(), new(atomic.Int64))
		v.(*atomic.Int64).Add(1)
		f.startMS.Lock()
		f.startMS.v = append(f.startMS.v, r.info.StartMS)
		f.startMS.Unlock()
		f.done.Add(1)
	}
	return nil
}

// attachedRun is how an attached child of a soak ended.
type attachedRun struct {
	info     client.ChildInfo
	exit     client.ExitInfo
	out      []byte // its stdout and stderr
	err      error  // the fork request's
	timedOut bool   // it did not end within forkTimeout (c is closed then)
}

// forkAttachedFile forks an attached child of seed over c, with stdin in
// and stdout and stderr into out (emptied first), and waits for it up to
// forkTimeout. A child still running then is reported to onTimeout (if
// set) with its output so far; c is closed, which makes the daemon kill
// the child. The error is the test's own (the output file).
func forkAttachedFile(c *client.Client, seed string, in, out *os.File, onTimeout func(sofar []byte)) (attachedRun, error) {
	if err := out.Truncate(0); err != nil {
		return attachedRun{}, err
	}
	if _, err := out.Seek(0, 0); err != nil {
		return attachedRun{}, err
	}
	ch := make(chan attachedRun, 1)
	go func() {
		info, exit, err := c.ForkAttachedWith(client.ForkRequest{Seed: seed}, in, out, out)
		ch <- attachedRun{info: info, exit: exit, err: err}
	}()
	var r attachedRun
	select {
	case r = <-ch:
	case <-time.After(forkTimeout):
		sofar, _ := os.ReadFile(out.Name())
		if onTimeout != nil {
			onTimeout(sofar)
		}
		c.Close() // the daemon kills an attached child whose client is gone
		<-ch
		return attachedRun{out: sofar, timedOut: true}, nil
	}
	var err error
	r.out, err = os.ReadFile(out.Name())
	return r, err
}

// problems parses the child's output and lists what is wrong with it: an
// exit other than 0, a failed or missing check, a ROLE line that is not its
// own pid (or is the parent's).
func (r attachedRun) problems(checks []string, parentPID int) (progOut, []string) {
	o := parseOut(string(r.out))
	var probs []string
	if r.exit.Signal != 0 || r.exit.Code != 0 || r.exit.Error != "" {
		probs = append(probs, fmt.Sprintf("%s (%+v)", exitText(r.exit.ShellCode()), r.exit))
	}
	probs = append(probs, o.problems("child", checks)...)
	if o.roleArg != strconv.Itoa(r.info.PID) || o.roleArg == strconv.Itoa(parentPID) {
		probs = append(probs, fmt.Sprintf("child %s (pid %d) printed ROLE %s %s", r.info.ID, r.info.PID, o.role, o.roleArg))
	}
	return o, probs
}

// checkDigests reports children whose DIGEST is not the parent's.
func (f *soakForker) checkDigests(t *testing.T, want string) {
	t.Helper()
	f.digests.Range(func(k, v any) bool {
		if k.(string) != want {
			t.Errorf("%d children printed DIGEST %s, the parent's is %s", v.(*atomic.Int64).Load(), k, want)
		}
		return true
	})
}

func (f *soakForker) startMedian() time.Duration {
	f.startMS.Lock()
	defer f.startMS.Unlock()
	if len(f.startMS.v) == 0 {
		return 0
	}
	v := append([]float64(nil), f.startMS.v...)
	sort.Float64s(v)
	return time.Duration(v[len(v)/2] * float64(time.Millisecond))
}

// soakFiller is a second, tiny seed: /bin/sh blocked in `read` on its stdin
// (a pipe). Its detached children get /dev/null as stdin, read EOF, print
// "FILLER ok" into their log and exit 0 in a few milliseconds. They take the
// detached path (a log file per child, ps polled for the exit) and fill the
// bounded history cheaply, so that even the short soak runs past
// node.MaxHistory and the daemon forgets children and removes their logs.
type soakFiller struct {
	seed   string
	parent *proc
	done   atomic.Int64
	took   atomic.Int64 // ns spent in fill
}

func startFiller(t *testing.T) *soakFiller {
	t.Helper()
	p := startProc(t, "filler", "/bin/sh", "-c", "read line; echo FILLER ok")
	if err := waitState(p.pid, "S", 10*time.Second); err != nil {
		t.Fatalf("filler: %v", err)
	}
	time.Sleep(20 * time.Millisecond) // in read(2), not still starting
	return &soakFiller{seed: prepareSeed(t, p.pid, "soak-filler"), parent: p}
}

const fillerBatch = 50

// fill forks n detached children in batches of fillerBatch on a connection
// of its own and checks every one: exited 0, log "FILLER ok".
func (fl *soakFiller) fill(t *testing.T, n int) {
	t.Helper()
	start := time.Now()
	defer func() { fl.took.Add(int64(time.Since(start))) }()
	c, err := client.Dial(sockPath)
	if err != nil {
		t.Error(err)
		return
	}
	defer c.Close()
	reported := 0
	bad := func(format string, a ...any) {
		if reported++; reported <= 5 {
			t.Errorf("filler: "+format, a...)
		}
	}
	for done := 0; done < n && reported == 0; {
		k := min(fillerBatch, n-done)
		kids, err := c.Fork(client.ForkRequest{Seed: fl.seed, Count: k})
		if err != nil {
			bad("fork --count %d after %d: %v", k, done, err)
			return
		}
		if len(kids) != k {
			bad("fork --count %d returned %d children", k, len(kids))
			return
		}
		want := map[string]client.ChildInfo{}
		for _, kid := range kids {
			want[kid.ID] = kid
		}
		deadline := time.Now().Add(forkTimeout)
		for len(want) > 0 {
			time.Sleep(20 * time.Millisecond)
			all, err := c.PS()
			if err != nil {
				bad("ps: %v", err)
				return
			}
			for _, kid := range all {
				if _, ok := want[kid.ID]; !ok || kid.State == client.StateRunning {
					continue
				}
				delete(want, kid.ID)
				b, err := os.ReadFile(kid.Log)
				switch {
				case kid.State != client.StateExited || kid.ExitCode != 0 || kid.Signal != 0 || kid.Error != "":
					bad("child %s: %s, exit %d, signal %d %s; log:\n%s", kid.ID, kid.State, kid.ExitCode, kid.Signal, kid.Error, b)
				case err != nil:
					bad("child %s: %v", kid.ID, err)
				case string(b) != "FILLER ok\n":
					bad("child %s: log %q, want \"FILLER ok\\n\"", kid.ID, b)
				default:
					fl.done.Add(1)
				}
			}
			if len(want) > 0 && time.Now().After(deadline) {
				bad("%d of %d children still running after %v: %v", len(want), k, forkTimeout, want)
				return
			}
		}
		done += k
	}
}

// finish lets the filler parent read its line and checks it ends well.
func (fl *soakFiller) finish(t *testing.T) {
	t.Helper()
	if _, err := fl.parent.stdin.Write([]byte("bye\n")); err != nil {
		t.Errorf("filler parent: %v", err)
	}
	if _, err := fl.parent.waitLine("FILLER ok", lineTimeout); err != nil {
		t.Error(err)
	}
	if code, err := fl.parent.waitExit(30 * time.Second); err != nil || code != 0 {
		t.Errorf("filler parent exit %d (%v)", code, err)
	}
}

// TestSoakShort: 250 children of one seed (parent.c: 64 MiB of state, all
// of it read by every child, which also reallocs, forks, spawns, signals and
// starts a thread), 4 in flight through the daemon's API (attached forks);
// every child must exit 0 with all its checks passed and the parent's
// digest. At the same time 1,100 detached children of a tiny second seed
// (soakFiller) run past the bounded history. Before measuring, a warm-up
// fills the history to node.MaxHistory, so the daemon is in its steady
// state. Afterwards the daemon holds exactly the descriptors, memfds,
// cgroups, state files and child processes it held before, no child runs,
// ps lists exactly MaxHistory children, every log belongs to one of them,
// and threads, mappings and RSS are within soakCompare's bounds.
//
// The long version (BENCHMARKS.md, "Soak"): MITOSIS_SOAK=10000 (children of
// parent.c; the detached ones default to as many, MITOSIS_SOAK_DETACHED).
func TestSoakShort(t *testing.T) {
	requireSetup(t)
	n := soakN("MITOSIS_SOAK", 250)
	nd := soakN("MITOSIS_SOAK_DETACHED", max(n, node.MaxHistory+100))
	p := startCParent(t, parentStatic)
	seed := prepareSeed(t, p.pid, "soak-c")
	fl := startFiller(t)
	mon := newSoakMonitor(t)
	f := &soakForker{seed: seed, parentPID: p.pid, redial: 100}

	// Warm-up: the seed's page cache, the daemon's pools, caches and
	// runtime threads, and a full history.
	wstart := time.Now()
	f.run(t, 40, 4)
	fl.fill(t, node.MaxHistory)
	if t.Failed() {
		t.FailNow()
	}
	f.done.Store(0)
	fl.done.Store(0)
	fl.took.Store(0)
	t.Logf("warm-up (40 children, %d detached) in %v", node.MaxHistory, time.Since(wstart).Round(time.Millisecond))
	probeHeap(t) // the probe's own code and buffers, once before measuring
	time.Sleep(200 * time.Millisecond)
	before := mon.usage(t)
	hb := probeHeap(t)

	start := time.Now()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		fl.fill(t, nd)
	}()
	f.run(t, n, 4)
	took := time.Since(start)
	wg.Wait()
	tookAll := time.Since(start)
	after := mon.settle(t, before)
	ha := probeHeap(t)
	fillTook := time.Duration(fl.took.Load())
	t.Logf("%d children of %s in %v (%.1f/s, median start %v); %d detached children of %s in %v (%.0f/s), alongside; all done in %v\n  before: %v\n          %v\n  after:  %v\n          %v",
		f.done.Load(), seed, took.Round(time.Millisecond), float64(f.done.Load())/took.Seconds(), f.startMedian(),
		fl.done.Load(), fl.seed, fillTook.Round(time.Millisecond), float64(fl.done.Load())/fillTook.Seconds(),
		tookAll.Round(time.Millisecond), before, hb, after, ha)
	soakCompare(t, fmt.Sprintf("after %d + %d children", n, nd), before, after, min(before.records+n+nd, node.MaxHistory))
	po := continueParent(t, p)
	f.checkDigests(t, po.digest())
	if code, err := p.waitExit(30 * time.Second); err != nil || code != 0 {
		t.Errorf("parent exit %d (%v)", code, err)
	}
	fl.finish(t)
}

// heapProbe is the daemon's Go heap after a forced GC, read from its
// /debug/pprof endpoints; only when the daemon serves them
// (MITOSIS_METRICS=IP:PORT in the environment of `go test`, which the
// daemon inherits). It tells a leak from garbage not collected yet.
type heapProbe struct {
	ok                              bool
	heapAllocKB, heapInuseKB, sysKB int
	goroutines, rssKB, numGC        int
}

func (h heapProbe) String() string {
	if !h.ok {
		return "(no MITOSIS_METRICS)"
	}
	return fmt.Sprintf("after a forced GC: HeapAlloc %d kB, HeapInuse %d kB, Sys %d kB, RSS %d kB, goroutines %d, GCs %d",
		h.heapAllocKB, h.heapInuseKB, h.sysKB, h.rssKB, h.goroutines, h.numGC)
}

func probeHeap(t *testing.T) heapProbe {
	t.Helper()
	addr := os.Getenv("MITOSIS_METRICS")
	if addr == "" {
		return heapProbe{}
	}
	hc := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	get := func(path string) string {
		resp, err := hc.Get("http://" + addr + path)
		if err != nil {
			t.Logf("heap probe: %v", err)
			return ""
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	h := heapProbe{ok: true}
	heap := get("/debug/pprof/heap?gc=1&debug=1")
	for _, l := range strings.Split(heap, "\n") {
		var v int
		for name, dst := range map[string]*int{"# HeapAlloc = ": &h.heapAllocKB, "# HeapInuse = ": &h.heapInuseKB, "# Sys = ": &h.sysKB, "# NumGC = ": &h.numGC} {
			if rest, ok := strings.CutPrefix(l, name); ok {
				v, _ = strconv.Atoi(strings.Fields(rest)[0])
				if name == "# NumGC = " {
					*dst = v
				} else {
					*dst = v >> 10
				}
			}
		}
	}
	if dir := os.Getenv("MITOSIS_SOAK_PROFILE"); dir != "" {
		// for `go tool pprof`: the daemon's heap, right after the GC above
		name := filepath.Join(dir, fmt.Sprintf("%s-%d.heap.pb.gz", strings.ReplaceAll(t.Name(), "/", "-"), time.Now().UnixNano()))
		if err := os.WriteFile(name, []byte(get("/debug/pprof/heap")), 0o644); err == nil {
			t.Logf("heap profile: %s", name)
		}
	}
	g := get("/debug/pprof/goroutine?debug=1")
	if rest, ok := strings.CutPrefix(g, "goroutine profile: total "); ok {
		h.goroutines, _ = strconv.Atoi(strings.Fields(rest)[0])
	}
	if rss, err := procStatus(daemonPID, "VmRSS"); err == nil {
		h.rssKB, _ = strconv.Atoi(strings.Fields(rss)[0])
	}
	return h
}
