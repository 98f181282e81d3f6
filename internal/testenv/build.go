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
func BuildMitosis(goBin, dir string) (string, error) {
	if goBin == "" {
		goBin = "go"
	}
	cmd := exec.Command(goBin, "build", "-o", filepath.Clean(dir)+"/",
		"github.com/mitosis-fork/mitosis/cmd/mitosis", "github.com/mitosis-fork/mitosis/cmd/mitosisd")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/mitosis ./cmd/mitosisd (from inside the module): %v\n%s", err, strings.TrimSpace(string(out)))
	}
	return filepath.Join(dir, "mitosis"), nil
}
