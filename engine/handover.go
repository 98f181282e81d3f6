package engine

import (
	"errors"
	"fmt"
	"time"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/pager"
	"github.com/mitosis-fork/mitosis/snapshot"
)

// Release hands s over to another engine (a daemon's successor): its
// frozen copy stops being this engine's tracee and is left in a
// group-stop (see snapshot.Hand), and the engine forgets the seed, so
// neither RemoveSeed nor Close kills it. Children already forked from s
// keep paging from the frozen copy (reads need no tracing); its page cache
// is closed when the engine closes. Fork refuses s afterwards.
//
// If the successor cannot take it, KillReleased ends it.
func (e *Engine) Release(s *Seed) error {
	if s.SourcePID == 0 || s.Origin != "" {
		return fmt.Errorf("seed %s has no local frozen copy to hand over", s.ID)
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return errors.New("engine closed")
	}
	if e.seeds[s.ID] != s {
		e.mu.Unlock()
		return fmt.Errorf("seed %s is not known", s.ID)
	}
	delete(e.seeds, s.ID)
	e.released = append(e.released, s)
	e.mu.Unlock()
	if err := e.tracer.Do(func() error { return snapshot.Hand(s.SourcePID) }); err != nil {
		// Still ours (the detach failed) or gone: keep it so Close
		// releases it as before.
		e.mu.Lock()
		e.seeds[s.ID] = s
		e.released = e.released[:len(e.released)-1]
		e.mu.Unlock()
		return fmt.Errorf("hand over seed %s: %w", s.ID, err)
	}
	return nil
}

// KillReleased ends the frozen copy of a seed Release handed over that no
// successor took: it is killed and reaped in its parent.
func (e *Engine) KillReleased(s *Seed) error { return e.endFrozen(s) }

// Adopted describes a seed another engine released (Release), for Adopt.
type Adopted struct {
	ID, Name   string
	Desc       *descriptor.Descriptor
	SourcePID  int
	ParentPID  int
	Created    time.Time
	Took       time.Duration
	WorkingSet []descriptor.Run // what its children had touched, for Prefetch
}

// Adopt takes over a seed another engine released: this engine's tracer
// seizes the stopped frozen copy (it dies with this engine from now on)
// and the seed is forkable here under its old id. Its page cache starts
// empty; the working set handed with it is what Prefetch maps.
func (e *Engine) Adopt(a Adopted) (*Seed, error) {
	if a.Desc == nil || a.SourcePID <= 0 || a.ParentPID <= 0 {
		return nil, fmt.Errorf("adopt seed %s: incomplete record", a.ID)
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil, errors.New("engine closed")
	}
	if _, dup := e.seeds[a.ID]; dup {
		e.mu.Unlock()
		return nil, fmt.Errorf("adopt seed %s: the id is taken", a.ID)
	}
	e.mu.Unlock()
	if err := e.tracer.Do(func() error { return snapshot.Adopt(a.SourcePID, a.ParentPID) }); err != nil {
		return nil, fmt.Errorf("adopt seed %s: %w", a.ID, err)
	}
	s := &Seed{
		ID: a.ID, Name: a.Name, Desc: a.Desc, SourcePID: a.SourcePID, ParentPID: a.ParentPID,
		Created: a.Created, Took: a.Took, imported: clipRuns(a.WorkingSet, a.Desc),
	}
	s.src = pager.LocalSource{PID: s.SourcePID}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		// Close did not see it; its tracer's exit kills it
		// (PTRACE_O_EXITKILL).
		return nil, errors.New("engine closed")
	}
	e.seeds[s.ID] = s
	return s, nil
}

// EndOrphan ends a frozen copy (src, cloned from parent) that a killed
// daemon left: a zombie is reaped in its parent; a stopped process nobody
// traces is killed first. A process in any other state (running, or
// traced by a live daemon) is left alone: the pid is not a frozen copy, or
// not an orphan.
func (e *Engine) EndOrphan(src, parent int, vdsoSyscall uint64) error {
	return e.tracer.Do(func() error { return snapshot.EndOrphan(src, parent, vdsoSyscall) })
}
