// Package cli holds the client verbs of the mitosis command line (prepare,
// run, image, fork, seeds, ps, rm, version) and what the two binaries
// share. It links only the client package, so the `mitosis` binary starts
// in a few milliseconds; the server verbs (daemon, gateway, workflow, fn,
// invoke) live in cmd/mitosisd, which links etcd, gRPC and the engine.
package cli

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// ExitError ends the CLI with a given status and no message (the child's
// exit status of an attached fork).
type ExitError struct{ Code int }

func (e ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

// Execute runs root with args and returns the process exit status: 0, the
// code of an ExitError, or 1 after printing the error as "NAME: error".
func Execute(root *cobra.Command, args []string) int {
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return 0
	}
	var ee ExitError
	if errors.As(err, &ee) {
		return ee.Code
	}
	fmt.Fprintf(os.Stderr, "%s: %v\n", root.Name(), err)
	return 1
}
