package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestFnLogRotate: past its maximum the log moves to .1 (replacing the one
// before) and new starts get a new file; a file a start still holds stays
// open until it is released; close retires the log the same way.
func TestFnLogRotate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fn.log")
	l, err := openFnLog(path, 100)
	if err != nil {
		t.Fatal(err)
	}
	write := func(f *os.File, s string) error { _, err := f.WriteString(s); return err }
	read := func(p string) string { b, _ := os.ReadFile(p); return string(b) }

	f1, rel1 := l.acquire()
	if err := write(f1, strings.Repeat("a", 150)+"\n"); err != nil {
		t.Fatal(err)
	}
	// f1 is held while the next start rotates the log.
	f2, rel2 := l.acquire()
	if f2 == f1 {
		t.Fatal("no rotation past the maximum")
	}
	if got := read(path + ".1"); len(got) != 151 {
		t.Errorf(".1 holds %d bytes, want the 151 written", len(got))
	}
	if err := write(f1, "late\n"); err != nil {
		t.Errorf("a held file was closed by the rotation: %v", err)
	}
	if err := write(f2, "new\n"); err != nil {
		t.Fatal(err)
	}
	if got := read(path); got != "new\n" {
		t.Errorf("the new log holds %q", got)
	}
	rel1()
	if err := write(f1, "x"); err == nil {
		t.Error("a retired file stayed open after its last release")
	}
	rel2()
	// Below the limit: no rotation.
	f3, rel3 := l.acquire()
	if f3 != f2 {
		t.Error("rotated a log below the maximum")
	}
	rel3()
	// A second rotation replaces .1.
	if err := write(f2, strings.Repeat("b", 120)+"\n"); err != nil {
		t.Fatal(err)
	}
	f4, rel4 := l.acquire()
	if f4 == f2 || !strings.HasPrefix(read(path+".1"), "new\nbbb") {
		t.Errorf("second rotation: .1 holds %q", read(path+".1"))
	}
	l.close()
	if err := write(f4, "still\n"); err != nil {
		t.Errorf("close closed a file a start still held: %v", err)
	}
	rel4()
	if err := write(f4, "x"); err == nil {
		t.Error("the log stayed open after close and the last release")
	}
}
