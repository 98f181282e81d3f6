package engine

import (
	"errors"
)

// Options configure an Engine.
type Options struct {
	// StateDir is a directory the engine may use for scratch files.
	StateDir string
}

// Engine owns the tracer thread, every seed's frozen copy and every child's
// pager on this host.
type Engine struct {
	opts Options
}

// New starts an engine.
func New(opts Options) (*Engine, error) { return &Engine{opts: opts}, nil }

// Prepare snapshots the single-threaded process pid into a seed. The process
// keeps running (or stays stopped if it was stopped).
func (e *Engine) Prepare(pid int, opts PrepareOptions) (*Seed, error) {
	return nil, errors.New("not implemented")
}

// Fork starts one child of s on this host. The child runs when Fork returns;
// it is reaped by the engine (see Child.Done).
func (e *Engine) Fork(s *Seed, opts ForkOptions) (*Child, error) {
	return nil, errors.New("not implemented")
}

// RemoveSeed kills the seed's frozen copy. Children still paging from it
// must have exited first, otherwise an error is returned.
func (e *Engine) RemoveSeed(s *Seed) error { return errors.New("not implemented") }

// Close kills every child and frozen copy the engine owns and stops its
// tracer thread.
func (e *Engine) Close() error { return nil }
