package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/mitosis-fork/mitosis/client"
	"github.com/mitosis-fork/mitosis/internal/procfs"
)

// caller is who sent a request on the local socket, from SO_PEERCRED as of
// connect. An admin (root, or the daemon's own user) may do everything; any
// other local user who can reach the socket (Config.SocketMode and
// SocketGroup decide who can) is confined to its own processes and seeds:
//
//   - prepare: only a process the caller could ptrace itself (see
//     mayPtrace); the seed is the caller's;
//   - fork: only seeds the caller owns or that are shared with it
//     (prepare --share); the children run with the seed's credentials,
//     which the restore sets from the parent's, never the daemon's;
//   - rm: only its own seeds, and children it forked or of seeds it owns;
//   - seeds and ps list only those;
//   - run, fn-deploy and fn-rm, and forks on or from other nodes, are for
//     admins.
type caller struct {
	uid, gid uint32
	pid      int
	admin    bool
}

// callerOf classifies the peer with credentials uid, gid, pid.
func (d *Daemon) callerOf(uid, gid uint32, pid int) caller {
	return caller{uid: uid, gid: gid, pid: pid, admin: uid == 0 || int(uid) == d.uid}
}

// groups returns the caller's primary and supplementary groups. The
// supplementary ones are read from /proc/PID/status of the connecting
// process; if it is gone, only the primary group counts.
func (c caller) groups() []uint32 {
	gs := []uint32{c.gid}
	if st, err := procfs.ReadStatus(c.pid); err == nil {
		for _, g := range st.Groups {
			if !slices.Contains(gs, g) {
				gs = append(gs, g)
			}
		}
	}
	return gs
}

// errAdminOnly is the refusal of an op reserved to admins.
func errAdminOnly(op string, c caller) error {
	return fmt.Errorf("permission denied: %s is reserved to root and the daemon's user; uid %d may prepare its own processes and fork and remove its own seeds", op, c.uid)
}

// mayPtrace reports (as an error naming why not) whether c could ptrace
// pid itself. It applies the rules of the kernel's __ptrace_may_access for
// a caller without CAP_SYS_PTRACE: the caller's uid equals the target's
// real, effective and saved uids, its gid the target's real, effective and
// saved gids, the target is dumpable (a process that is not, e.g. after a
// setuid exec, has its /proc/PID owned by root), and the target's
// permitted capabilities are a subset of the caller's. Admins may prepare
// anything the daemon can.
func mayPtrace(c caller, pid int) error {
	if c.admin {
		return nil
	}
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("prepare pid %d: no such process", pid)
		}
		return fmt.Errorf("prepare pid %d: %w", pid, err)
	}
	deny := func(why string) error {
		return fmt.Errorf("permission denied: uid %d may not prepare pid %d: %s (a user may prepare only processes it could ptrace itself)", c.uid, pid, why)
	}
	for i, u := range st.Uid[:3] {
		if u != c.uid {
			return deny(fmt.Sprintf("its %s uid is %d", [...]string{"real", "effective", "saved"}[i], u))
		}
	}
	for i, g := range st.Gid[:3] {
		if g != c.gid {
			return deny(fmt.Sprintf("its %s gid is %d, not the caller's %d", [...]string{"real", "effective", "saved"}[i], g, c.gid))
		}
	}
	fi, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid)))
	if err != nil {
		return fmt.Errorf("prepare pid %d: %w", pid, err)
	}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok && sys.Uid != c.uid {
		return deny("it is not dumpable (it changed credentials or set PR_SET_DUMPABLE 0)")
	}
	if st.CapPrm != 0 {
		mine, err := procfs.ReadStatus(c.pid)
		if err != nil || st.CapPrm&^mine.CapPrm != 0 {
			return deny(fmt.Sprintf("it holds capabilities (CapPrm %#x) the caller does not", st.CapPrm))
		}
	}
	return nil
}

// shareList is who besides its owner may fork a seed.
type shareList struct {
	all  bool
	uids []uint32
	gids []uint32
}

// parseShare parses prepare's share entries: "uid:N", "gid:N",
// "user:NAME", "group:NAME", or "*" (every user who can reach the socket).
func parseShare(op string, entries []string) (shareList, error) {
	var s shareList
	for _, e := range entries {
		if e == "*" {
			s.all = true
			continue
		}
		kind, val, ok := strings.Cut(e, ":")
		if !ok || val == "" {
			return s, fmt.Errorf("%s: share %q: want uid:N, gid:N, user:NAME, group:NAME or *", op, e)
		}
		var id uint64
		var err error
		switch kind {
		case "uid", "gid":
			id, err = strconv.ParseUint(val, 10, 32)
		case "user":
			var u *user.User
			if u, err = user.Lookup(val); err == nil {
				id, err = strconv.ParseUint(u.Uid, 10, 32)
			}
		case "group":
			var g *user.Group
			if g, err = user.LookupGroup(val); err == nil {
				id, err = strconv.ParseUint(g.Gid, 10, 32)
			}
		default:
			return s, fmt.Errorf("%s: share %q: unknown kind %q; want uid:N, gid:N, user:NAME, group:NAME or *", op, e, kind)
		}
		if err != nil {
			return s, fmt.Errorf("%s: share %q: %w", op, e, err)
		}
		switch kind {
		case "uid", "user":
			if !slices.Contains(s.uids, uint32(id)) {
				s.uids = append(s.uids, uint32(id))
			}
		default:
			if !slices.Contains(s.gids, uint32(id)) {
				s.gids = append(s.gids, uint32(id))
			}
		}
	}
	return s, nil
}

// strings lists the share in parseShare's syntax, numerically.
func (s shareList) strings() []string {
	var out []string
	if s.all {
		out = append(out, "*")
	}
	for _, u := range s.uids {
		out = append(out, "uid:"+strconv.FormatUint(uint64(u), 10))
	}
	for _, g := range s.gids {
		out = append(out, "gid:"+strconv.FormatUint(uint64(g), 10))
	}
	return out
}

// mayFork reports whether c may fork seed s.
func (s *seedRec) mayFork(c caller) bool {
	if c.admin || s.owner == c.uid {
		return true
	}
	if s.origin != "" {
		return false // imported: its owner lives on another node
	}
	if s.share.all || slices.Contains(s.share.uids, c.uid) {
		return true
	}
	if len(s.share.gids) > 0 {
		for _, g := range c.groups() {
			if slices.Contains(s.share.gids, g) {
				return true
			}
		}
	}
	return false
}

// mayRemove reports whether c may remove seed s.
func (s *seedRec) mayRemove(c caller) bool {
	return c.admin || (s.origin == "" && s.owner == c.uid)
}

// mayRemove reports whether c may remove child k (and see it in ps).
func (k *childRec) mayRemove(c caller) bool {
	return c.admin || k.owner == c.uid || (k.seed.origin == "" && k.seed.owner == c.uid)
}

// authorizeFork checks that c may fork req.Seed and pins the request to
// the seed's id, so a seed removed and re-prepared under the same name in
// between is not forked in its place.
func (d *Daemon) authorizeFork(c caller, req *client.Request) error {
	if c.admin {
		return nil
	}
	if req.Node != "" && req.Node != d.node {
		return errAdminOnly("a fork on another node", c)
	}
	if node, _ := splitSeedRef(req.Seed); node != "" && node != d.node {
		return errAdminOnly("a fork of another node's seed", c)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	s, err := d.lookupRefLocked(req.Seed)
	if err == nil && !s.mayFork(c) {
		// Not theirs: answer as if it did not exist, so seed names
		// of other users do not leak.
		err = fmt.Errorf("no seed %q you may fork (see `mitosis seeds`; a seed is forkable by its owner and by the users it is shared with, prepare --share)", req.Seed)
	}
	if err != nil {
		return fmt.Errorf("fork: %w", err)
	}
	req.Seed = s.id
	return nil
}

// authorizeRemove checks that c may remove key (a seed or a child).
func (d *Daemon) authorizeRemove(c caller, key string) error {
	if c.admin {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if k, ok := d.children[key]; ok && k != nil {
		if !k.mayRemove(c) {
			return fmt.Errorf("permission denied: child %s belongs to uid %d; uid %d may remove only children it forked or of its own seeds", key, k.owner, c.uid)
		}
		return nil
	}
	s, err := d.lookupRefLocked(key)
	if err != nil {
		return nil // remove names the missing id itself
	}
	if !s.mayRemove(c) {
		return fmt.Errorf("permission denied: seed %s belongs to uid %d; uid %d may remove only its own seeds", s.id, s.owner, c.uid)
	}
	return nil
}

// callerKey keys the forking caller's uid in a fork's context.
type callerKey struct{}

// withOwner returns ctx carrying uid as the owner of the children forked
// under it.
func withOwner(ctx context.Context, uid uint32) context.Context {
	return context.WithValue(ctx, callerKey{}, uid)
}

// ownerOf is the uid withOwner put in ctx, else 0 (the daemon's own forks:
// function invocations, peers' forks).
func ownerOf(ctx context.Context) uint32 {
	uid, _ := ctx.Value(callerKey{}).(uint32)
	return uid
}

// setSocketAccess applies Config.SocketMode and SocketGroup to the socket
// file sock (the socket bound under a temporary name, see New).
// When they grant access beyond the daemon's user, the socket's directory,
// if the daemon's own and not sticky (not /tmp), gets the matching search
// bits so those users can reach the socket; it stays unlistable.
func (d *Daemon) setSocketAccess(sock string) error {
	mode := d.cfg.SocketMode
	if mode == 0 {
		mode = 0o600
	}
	if mode&^0o777 != 0 {
		return fmt.Errorf("socket mode %#o: only permission bits (like 0600, 0660, 0666) are allowed", mode)
	}
	if g := d.cfg.SocketGroup; g != "" {
		gid, err := strconv.Atoi(g)
		if err != nil {
			grp, lerr := user.LookupGroup(g)
			if lerr != nil {
				return fmt.Errorf("socket group %q: %w", g, lerr)
			}
			gid, _ = strconv.Atoi(grp.Gid)
		}
		if err := os.Lchown(sock, -1, gid); err != nil {
			return fmt.Errorf("chown socket %s to group %s: %w", sock, g, err)
		}
	}
	if err := os.Chmod(sock, mode); err != nil {
		return fmt.Errorf("chmod socket %s: %w", sock, err)
	}
	search := os.FileMode(0)
	if mode&0o060 != 0 {
		search |= 0o010
	}
	if mode&0o006 != 0 {
		search |= 0o001
	}
	if search == 0 {
		return nil
	}
	dir := filepath.Dir(d.cfg.Socket)
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("socket dir %s: %w", dir, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || int(st.Uid) != d.uid || fi.Mode()&os.ModeSticky != 0 || fi.Mode().Perm()&search == search {
		return nil
	}
	if err := os.Chmod(dir, fi.Mode().Perm()|search); err != nil {
		return fmt.Errorf("let users reach socket dir %s: %w", dir, err)
	}
	return nil
}
