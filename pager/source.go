package pager

import (
	"fmt"

	"github.com/mitosis-fork/mitosis/internal/ptrace"
)

// LocalSource reads pages from a frozen copy on this host with
// process_vm_readv. The frozen copy is stopped, so reads never race with
// writes.
type LocalSource struct {
	PID int
}

// ReadPages implements Source.
func (l LocalSource) ReadPages(addr uint64, buf []byte) error {
	if err := ptrace.ReadMem(l.PID, addr, buf); err != nil {
		return fmt.Errorf("frozen copy %d: %w", l.PID, err)
	}
	return nil
}
