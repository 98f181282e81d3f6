// Package procfs parses the parts of /proc/PID that mitosis needs to
// snapshot a process: its memory map, its page table state (through the
// PAGEMAP_SCAN ioctl), its stat and status files, its auxiliary vector and
// its open file descriptors.
//
// Every function takes a pid and reads /proc/PID directly; the Parse*
// functions work on already read file contents so they can be tested and
// fuzzed without a live process.
package procfs

import "strconv"

// procPath returns /proc/PID/name.
func procPath(pid int, name string) string {
	return "/proc/" + strconv.Itoa(pid) + "/" + name
}
