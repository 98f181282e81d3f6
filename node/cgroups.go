package node

import (
	"github.com/mitosis-fork/mitosis/container"
)

// cgroupRoot is the cgroup (relative to the daemon's own) under which the
// daemon makes every group: seeds' pools, function instances, containers.
// It carries the node name, so daemons of several nodes on one host (the
// test labs) keep apart, and a daemon knows what an earlier instance of
// itself left: everything under it.
func (d *Daemon) cgroupRoot() string { return "mitosis-" + d.node }

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
