// Package container manages the cgroups that hold a container's resource
// limits (memory, CPU bandwidth, number of processes).
//
// A Group is created under the daemon's own cgroup: on a cgroup v1 (or
// hybrid) host it is one directory in each of the memory, cpu and pids
// hierarchies, each below the path /proc/self/cgroup gives for that
// controller; on a cgroup v2 host it is one directory below the daemon's
// unified path. The work is done by github.com/containerd/cgroups/v3.
package container

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Limits of one container. Zero means "no limit".
type Limits struct {
	// MemoryBytes caps the memory (v1 memory.limit_in_bytes, v2 memory.max).
	MemoryBytes int64
	// CPUs caps CPU bandwidth in CPUs (0.5 = half of one CPU per period).
	CPUs float64
	// Pids caps the number of tasks (pids.max).
	Pids int64
}

// cpuPeriod is the CFS bandwidth period in microseconds.
const cpuPeriod = 100000

// killWait bounds how long Delete waits for killed processes to leave.
const killWait = 3 * time.Second

// ErrNotSupported is returned when the kernel lacks a needed interface.
var ErrNotSupported = errors.New("container: not supported by this kernel")

// ParseMemory parses a memory size: a plain byte count ("1048576") or a
// number with a binary unit suffix k, M, G or T (case-insensitive, an
// optional trailing "B" or "iB" is accepted: "512k", "256M", "1GiB").
func ParseMemory(s string) (int64, error) {
	m := memRE.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return 0, fmt.Errorf("container: bad memory size %q", s)
	}
	mult := int64(1)
	switch strings.ToLower(m[2]) {
	case "k":
		mult = 1 << 10
	case "m":
		mult = 1 << 20
	case "g":
		mult = 1 << 30
	case "t":
		mult = 1 << 40
	}
	if strings.Contains(m[1], ".") {
		f, err := strconv.ParseFloat(m[1], 64)
		if err != nil || f*float64(mult) >= math.MaxInt64 {
			return 0, fmt.Errorf("container: bad memory size %q", s)
		}
		return int64(f * float64(mult)), nil
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("container: bad memory size %q", s)
	}
	return n * mult, nil
}

// memRE is a number, an optional binary unit, and an optional "i"/"B".
var memRE = regexp.MustCompile(`^([0-9]+(?:\.[0-9]+)?)\s*(?:([kKmMgGtT])(?:i?[bB])?|[bB])?$`)

// Group is one container's cgroup: a directory in every v1 hierarchy we
// use (memory, cpu, pids), or one v2 directory.
type Group struct {
	name string
	mu   sync.Mutex
	done bool

	v1    cgroup1.Cgroup
	dirs  []string // v1: the directories, one per controller
	v2    *cgroup2.Manager
	v2dir string
}

// Name returns the group's name relative to the daemon's cgroup.
func (g *Group) Name() string { return g.name }

// Paths returns the group's cgroup directories (one per v1 controller, or
// the single v2 directory).
func (g *Group) Paths() []string {
	if g.v2 != nil {
		return []string{g.v2dir}
	}
	return append([]string(nil), g.dirs...)
}

// v1 hierarchy: only the controllers we set limits in.
const v1Root = "/sys/fs/cgroup"

var v1Controllers = []cgroup1.Name{cgroup1.Memory, cgroup1.Cpu, cgroup1.Pids}

func v1Hierarchy() ([]cgroup1.Subsystem, error) {
	return []cgroup1.Subsystem{
		cgroup1.NewMemory(v1Root),
		cgroup1.NewCpu(v1Root),
		cgroup1.NewPids(v1Root),
	}, nil
}

var (
	baseOnce sync.Once
	baseV1   cgroup1.Path // daemon's own cgroup per controller
	baseV2   string       // daemon's own unified path
	baseErr  error
	unified  bool
	v2Mount  = "/sys/fs/cgroup"
)

// base finds, once, the cgroup mode and the daemon's own cgroup(s).
func base() error {
	baseOnce.Do(func() {
		switch cgroups.Mode() {
		case cgroups.Unified:
			unified = true
			_, p, err := cgroups.ParseCgroupFileUnified("/proc/self/cgroup")
			if err != nil {
				baseErr = err
				return
			}
			baseV2 = p
		case cgroups.Legacy, cgroups.Hybrid:
			baseV1 = cgroup1.NestedPath("")
			for _, c := range v1Controllers {
				p, err := baseV1(c)
				if err != nil {
					baseErr = fmt.Errorf("container: own %s cgroup: %w", c, err)
					return
				}
				if _, err := os.Stat(filepath.Join(v1Root, string(c), p)); err != nil {
					baseErr = fmt.Errorf("container: %s hierarchy: %w", c, err)
					return
				}
			}
		default:
			baseErr = errors.New("container: cgroups are not available")
		}
	})
	return baseErr
}

// Available reports whether cgroups can be used here (and why not).
func Available() error { return base() }

// New creates the cgroup <daemon's cgroup>/<name> with the limits l. name
// may contain slashes; missing intermediate directories are created (and
// left in place by Delete). It is an error if the group already exists.
func New(name string, l Limits) (*Group, error) {
	if err := base(); err != nil {
		return nil, err
	}
	clean := filepath.Clean("/" + name)
	if name == "" || clean == "/" || clean != "/"+strings.Trim(name, "/") {
		return nil, fmt.Errorf("container: bad group name %q", name)
	}
	if l.MemoryBytes < 0 || l.CPUs < 0 || l.Pids < 0 || math.IsNaN(l.CPUs) {
		return nil, fmt.Errorf("container: negative limits %+v", l)
	}
	if unified {
		return newV2(clean, l)
	}
	return newV1(clean, l)
}

func newV1(name string, l Limits) (*Group, error) {
	path := func(c cgroup1.Name) (string, error) {
		p, err := baseV1(c)
		if err != nil {
			return "", err
		}
		return filepath.Join(p, name), nil
	}
	g := &Group{name: strings.TrimPrefix(name, "/")}
	for _, c := range v1Controllers {
		p, _ := path(c)
		d := filepath.Join(v1Root, string(c), p)
		if _, err := os.Stat(d); err == nil {
			return nil, fmt.Errorf("container: cgroup %s already exists", d)
		}
		g.dirs = append(g.dirs, d)
	}
	res := &specs.LinuxResources{}
	if l.MemoryBytes > 0 {
		res.Memory = &specs.LinuxMemory{Limit: &l.MemoryBytes}
	}
	if l.CPUs > 0 {
		q := cpuQuota(l.CPUs)
		period := uint64(cpuPeriod)
		res.CPU = &specs.LinuxCPU{Quota: &q, Period: &period}
	}
	if l.Pids > 0 {
		res.Pids = &specs.LinuxPids{Limit: &l.Pids}
	}
	cg, err := cgroup1.New(path, res, cgroup1.WithHierarchy(v1Hierarchy))
	if err != nil {
		// Undo the directories made so far (they hold no processes).
		for _, d := range g.dirs {
			_ = os.Remove(d)
		}
		return nil, fmt.Errorf("container: create %s: %w", name, err)
	}
	g.v1 = cg
	return g, nil
}

func cpuQuota(cpus float64) int64 {
	q := int64(math.Round(cpus * cpuPeriod))
	if q < 1000 { // kernel minimum is 1ms
		q = 1000
	}
	return q
}

func newV2(name string, l Limits) (*Group, error) {
	group := filepath.Join(baseV2, name)
	dir := filepath.Join(v2Mount, group)
	if _, err := os.Stat(dir); err == nil {
		return nil, fmt.Errorf("container: cgroup %s already exists", dir)
	}
	res := &cgroup2.Resources{}
	if l.MemoryBytes > 0 {
		res.Memory = &cgroup2.Memory{Max: &l.MemoryBytes}
	}
	if l.CPUs > 0 {
		q := cpuQuota(l.CPUs)
		period := uint64(cpuPeriod)
		res.CPU = &cgroup2.CPU{Max: cgroup2.NewCPUMax(&q, &period)}
	}
	if l.Pids > 0 {
		res.Pids = &cgroup2.Pids{Max: l.Pids}
	}
	m, err := cgroup2.NewManager(v2Mount, group, res)
	if err != nil {
		return nil, fmt.Errorf("container: create %s: %w", dir, err)
	}
	return &Group{name: strings.TrimPrefix(name, "/"), v2: m, v2dir: dir}, nil
}

// Add moves the process pid (all its threads) into the group.
func (g *Group) Add(pid int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.done {
		return fmt.Errorf("container: group %s deleted", g.name)
	}
	var err error
	if g.v2 != nil {
		err = g.v2.AddProc(uint64(pid))
	} else {
		err = g.v1.AddProc(uint64(pid))
	}
	if err != nil {
		return fmt.Errorf("container: add %d to %s: %w", pid, g.name, err)
	}
	return nil
}

// OOMKills returns how many processes the kernel's OOM killer has killed
// in the group: v2 memory.events "oom_kill"; v1 memory.oom_control
// "oom_kill" (kernel 4.13 and later, else ErrNotSupported).
func (g *Group) OOMKills() (uint64, error) {
	var file string
	if g.v2 != nil {
		file = filepath.Join(g.v2dir, "memory.events")
	} else {
		file = filepath.Join(g.dirs[0], "memory.oom_control")
	}
	v, ok, err := readKey(file, "oom_kill")
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("%w: no oom_kill in %s", ErrNotSupported, file)
	}
	return v, nil
}

// readKey reads "key value" lines from file and returns key's value.
func readKey(file, key string) (uint64, bool, error) {
	f, err := os.Open(file)
	if err != nil {
		return 0, false, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), " ")
		if ok && k == key {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, false, fmt.Errorf("container: %s: %s: %w", file, key, err)
			}
			return n, true, nil
		}
	}
	return 0, false, s.Err()
}

// Procs returns the processes in the group (the union over the v1
// controllers' cgroup.procs), without duplicates.
func (g *Group) Procs() ([]int, error) {
	var out []int
	seen := map[int]bool{}
	for _, d := range g.Paths() {
		pids, err := readProcs(d)
		if err != nil {
			return nil, err
		}
		for _, p := range pids {
			if !seen[p] {
				seen[p] = true
				out = append(out, p)
			}
		}
	}
	return out, nil
}

// readProcs returns the pids in dir/cgroup.procs and its sub-cgroups.
func readProcs(dir string) ([]int, error) {
	var out []int
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			return nil
		}
		pids, err := readProcsFile(p)
		if err != nil {
			return err
		}
		out = append(out, pids...)
		return nil
	})
	return out, err
}

// Delete SIGKILLs every process left in the group (by pid, from
// cgroup.procs, until none remain or a few seconds pass) and removes the
// group's directories. It is idempotent; a group already removed is not
// an error.
//
// It is on every child's exit path, so it reads each directory's
// cgroup.procs and rmdirs it directly (a cgroup directory's files need no
// removal); only a group that has grown sub-groups (EBUSY) takes the slow
// path that walks the tree.
func (g *Group) Delete() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.done {
		return nil
	}
	dirs := g.Paths()
	deadline := time.Now().Add(killWait)
	if err := g.killAll(deadline, func() ([]int, error) {
		var pids []int
		for _, d := range dirs {
			p, err := readProcsFile(d)
			if err != nil {
				return nil, err
			}
			pids = append(pids, p...)
		}
		return pids, nil
	}); err != nil {
		return err
	}
	nested := false
	for _, d := range dirs {
		switch err := unix.Rmdir(d); {
		case err == nil, errors.Is(err, unix.ENOENT):
		case errors.Is(err, unix.EBUSY):
			nested = true
		default:
			return fmt.Errorf("container: delete %s: rmdir %s: %w", g.name, d, err)
		}
	}
	if nested {
		if err := g.removeNested(deadline); err != nil {
			return err
		}
	}
	g.done = true
	return nil
}

// removeNested kills the processes of the group's sub-groups and removes
// the group with everything below it through the cgroup library (the
// slow, walking path).
func (g *Group) removeNested(deadline time.Time) error {
	if err := g.killAll(deadline, func() ([]int, error) {
		pids, err := g.Procs()
		if errors.Is(err, os.ErrNotExist) {
			err = nil
		}
		return pids, err
	}); err != nil {
		return err
	}
	var err error
	if g.v2 != nil {
		err = g.v2.Delete()
		if errors.Is(err, os.ErrNotExist) {
			err = nil
		}
	} else {
		err = g.v1.Delete()
		if errors.Is(err, cgroup1.ErrCgroupDeleted) {
			err = nil
		}
	}
	if err != nil {
		return fmt.Errorf("container: delete %s: %w", g.name, err)
	}
	return nil
}

// killAll SIGKILLs the pids list returns until it returns none, or fails
// once deadline has passed.
func (g *Group) killAll(deadline time.Time, list func() ([]int, error)) error {
	for {
		pids, err := list()
		if err != nil {
			return fmt.Errorf("container: delete %s: %w", g.name, err)
		}
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("container: delete %s: processes %v did not exit", g.name, pids)
		}
		for _, p := range pids {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		time.Sleep(time.Millisecond)
	}
}

// readProcsFile returns the pids in dir/cgroup.procs (none if dir is gone).
func readProcsFile(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		n, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("%s/cgroup.procs: %w", dir, err)
		}
		out = append(out, n)
	}
	return out, nil
}

// RemoveTree removes the group name (relative to the daemon's cgroup, as
// in New) and every group below it, deepest first, SIGKILLing the
// processes found in them. It is how a daemon clears what an earlier
// instance of itself left after a crash: name must be a directory only
// that daemon creates groups under. It returns the pids killed; a missing
// group is not an error.
func RemoveTree(name string) ([]int, error) {
	if err := base(); err != nil {
		return nil, err
	}
	clean := filepath.Clean("/" + name)
	if name == "" || clean == "/" || clean != "/"+strings.Trim(name, "/") {
		return nil, fmt.Errorf("container: bad group name %q", name)
	}
	var roots []string
	if unified {
		roots = []string{filepath.Join(v2Mount, baseV2, clean)}
	} else {
		for _, c := range v1Controllers {
			p, err := baseV1(c)
			if err != nil {
				return nil, fmt.Errorf("container: own %s cgroup: %w", c, err)
			}
			roots = append(roots, filepath.Join(v1Root, string(c), p, clean))
		}
	}
	var killed []int
	seen := map[int]bool{}
	var errs []error
	for _, root := range roots {
		var dirs []string
		err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("container: remove %s: %w", root, err))
			continue
		}
		// Deepest first: a cgroup can only be removed once its children are.
		for i := len(dirs) - 1; i >= 0; i-- {
			d := dirs[i]
			deadline := time.Now().Add(killWait)
			for {
				pids, err := readProcs(d)
				if err != nil || len(pids) == 0 {
					break
				}
				if time.Now().After(deadline) {
					errs = append(errs, fmt.Errorf("container: remove %s: processes %v did not exit", d, pids))
					break
				}
				for _, p := range pids {
					if !seen[p] {
						seen[p] = true
						killed = append(killed, p)
					}
					_ = syscall.Kill(p, syscall.SIGKILL)
				}
				time.Sleep(time.Millisecond)
			}
			if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("container: remove %s: %w", d, err))
			}
		}
	}
	return killed, errors.Join(errs...)
}
