// Command mitosis is the command line of mitosis, the userspace remote fork
// of Linux processes: it talks to the node daemon (prepare, fork, seeds,
// ps, rm) and starts the server side.
//
// It links only the client, so a verb costs a few milliseconds of start-up
// (a full build with etcd, gRPC and the engine spends ~10 ms in package
// initialization alone). The server verbs (daemon, gateway, workflow, fn,
// invoke) are run by mitosisd, which this binary executes in its place:
// mitosisd next to this executable, else on PATH. Build both with
//
//	go build -o DIR/ ./cmd/mitosis ./cmd/mitosisd
package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/mitosis-fork/mitosis/internal/cli"
)

// serverVerbs are run by mitosisd.
var serverVerbs = []struct{ name, short string }{
	{"daemon", "Run the node daemon (foreground)"},
	{"gateway", "Run the OpenFaaS-compatible gateway (with the cluster directory)"},
	{"workflow", "Run, validate and list workflows (DAGs of Python steps) through the gateway"},
	{"fn", "Deploy, list and remove functions on the local node"},
	{"invoke", "Invoke a function on the local node"},
}

func main() {
	root, _ := cli.NewRoot("mitosis")
	for _, v := range serverVerbs {
		root.AddCommand(&cobra.Command{
			Use:                v.name,
			Short:              v.short + " (runs mitosisd " + v.name + ")",
			DisableFlagParsing: true,
			RunE: func(*cobra.Command, []string) error {
				return execServer(os.Args[1:])
			},
		})
	}
	os.Exit(cli.Execute(root, os.Args[1:]))
}

// execServer replaces this process with mitosisd ARGS, so the server keeps
// this pid, signals and descriptors. Its argv[0] stays "mitosis", so its
// help and errors name the command the user typed.
func execServer(args []string) error {
	path, err := findServer()
	if err != nil {
		return err
	}
	return fmt.Errorf("exec %s: %w", path, syscall.Exec(path, append([]string{"mitosis"}, args...), os.Environ()))
}

// findServer locates mitosisd: beside this executable, else on PATH.
func findServer() (string, error) {
	self, err := os.Executable()
	if err == nil {
		p := filepath.Join(filepath.Dir(self), "mitosisd")
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	if p, err := exec.LookPath("mitosisd"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("mitosisd not found next to %s or on PATH: the server verbs (daemon, gateway, workflow, fn, invoke) are in mitosisd; build both with `go build -o DIR/ ./cmd/mitosis ./cmd/mitosisd`", self)
}
