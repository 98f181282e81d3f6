package node

import (
	"fmt"
	"hash/fnv"
	"path/filepath"

	"github.com/mitosis-fork/mitosis/container"
)

// cgroupRoot is the cgroup (relative to the daemon's own) under which the
// daemon makes every group: seeds' pools, function instances, containers.
func (d *Daemon) cgroupRoot() string { return CgroupRoot(d.node, d.cfg.StateDir) }

// CgroupRoot names the cgroup (relative to the daemon's own) under which a
// daemon of node `node` with state directory stateDir makes its groups. It
// carries the node name and a hash of the state directory's absolute path:
// a daemon knows what an earlier instance of itself (same state directory:
// a restart, a successor) left, everything under it, and removes it at
// start; two daemons that share a node name on one host (test labs run in
// parallel, a second daemon started by mistake) keep apart instead of
// killing each other's children.
func CgroupRoot(node, stateDir string) string {
	if abs, err := filepath.Abs(stateDir); err == nil {
		stateDir = abs
	}
	h := fnv.New32a()
	h.Write([]byte(stateDir))
	return fmt.Sprintf("mitosis-%s-%08x", node, h.Sum32())
}

// cgroupName is the full name of the daemon's group name.
func (d *Daemon) cgroupName(name string) string { return d.cgroupRoot() + "/" + name }

// sweepCgroups removes the daemon's cgroup tree, killing what runs there.
// Precondition: no group of this daemon instance is in use (at start,
// before serving; at the end of Close). At start it clears what a daemon of
// the same node that was SIGKILLed left behind: the processes in those
// groups were its children (instances, containers) and have no owner now.
func (d *Daemon) sweepCgroups(at string) {
	if container.Available() != nil {
		return
	}
	killed, err := container.RemoveTree(d.cgroupRoot())
	if len(killed) > 0 {
		d.log.Warn("killed processes left in this node's cgroups", "when", at, "pids", killed, "cgroup", d.cgroupRoot())
	}
	if err != nil {
		d.log.Warn("could not remove this node's cgroups", "when", at, "err", err)
	}
}
