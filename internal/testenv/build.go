package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// BuildMitosis builds the mitosis command line and mitosisd into dir (so
// that `mitosis daemon` finds mitosisd beside it) with the go tool goBin
// ("" for "go" on PATH), from inside the module, and returns the mitosis
// binary's path. Like the README's install command it builds with
// CGO_ENABLED=0: static binaries, without the dynamic loader's ~0.8 ms at
// every start of the command line.
//
// With MITOSIS_TEST_RACE=1 in the environment it builds them with the race
// detector instead (cgo on): a process that hits a data race exits with
// status 66 when it stops, which the tests that stop daemons and gateways
// report (go test ./test/cluster with it takes about twice as long).
func BuildMitosis(goBin, dir string) (string, error) {
	if goBin == "" {
		goBin = "go"
	}
	args, env := []string{"build"}, "CGO_ENABLED=0"
	if os.Getenv("MITOSIS_TEST_RACE") == "1" {
		args, env = append(args, "-race"), "CGO_ENABLED=1"
	}
	cmd := exec.Command(goBin, append(args, "-o", filepath.Clean(dir)+"/",
		"github.com/mitosis-fork/mitosis/cmd/mitosis", "github.com/mitosis-fork/mitosis/cmd/mitosisd")...)
	cmd.Env = append(os.Environ(), env)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/mitosis ./cmd/mitosisd (from inside the module): %v\n%s", err, strings.TrimSpace(string(out)))
	}
	return filepath.Join(dir, "mitosis"), nil
}
