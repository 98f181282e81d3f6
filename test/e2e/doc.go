// Package e2e holds the end-to-end correctness tests of mitosis: they build
// the mitosis binary and the parent programs in testdata/, start one node
// daemon for the package and drive it through the CLI and the Python client
// exactly as a user would. They need root (ptrace, userfaultfd), gcc with a
// static libc, and /usr/bin/python3 with numpy and pandas.
//
// Run: go test ./test/e2e -v -count=1 -timeout 20m
//
// Set MITOSIS_E2E=0 to skip them, MITOSIS_E2E_BIN=/path/to/mitosis to test a
// prebuilt binary instead of building ./cmd/mitosis.
package e2e
