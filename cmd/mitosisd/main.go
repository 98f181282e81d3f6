// Command mitosisd is the server side of mitosis: the node daemon, the
// gateway with its cluster directory, the workflow runner and the local
// function verbs, plus every client verb of mitosis. `mitosis daemon` (and
// gateway, workflow, fn, invoke) run it.
package main

import (
	"os"
	"path/filepath"

	"github.com/mitosis-fork/mitosis/internal/cli"
)

func main() {
	// Run by `mitosis VERB`, argv[0] is "mitosis": help and errors then
	// speak of mitosis, the command the user typed.
	name := "mitosisd"
	if filepath.Base(os.Args[0]) == "mitosis" {
		name = "mitosis"
	}
	root, g := cli.NewRoot(name)
	if name == "mitosisd" {
		root.Short = "mitosis server side: node daemon, gateway, workflow runner (and every mitosis verb)"
	}
	root.AddCommand(
		newDaemonCmd(g),
		newFnCmd(g),
		newInvokeCmd(g),
		newGatewayCmd(),
		newWorkflowCmd(),
	)
	os.Exit(cli.Execute(root, os.Args[1:]))
}
