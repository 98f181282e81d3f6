// Command mitosis is the CLI of mitosis, the userspace remote fork of Linux
// processes: it runs the node daemon and talks to it (prepare, fork, seeds,
// ps, rm).
package main

import (
	"errors"
	"fmt"
	"os"
)

// exitError ends the CLI with a given status and no message (the child's
// exit status of an attached fork).
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func main() {
	os.Exit(run(os.Args[1:]))
}

// run executes the CLI with args and returns the process exit status.
func run(args []string) int {
	root := newRoot()
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return 0
	}
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	fmt.Fprintf(os.Stderr, "mitosis: %v\n", err)
	return 1
}
