package node

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mitosis-fork/mitosis/transport"
)

func TestReadLog(t *testing.T) {
	long := strings.Repeat("x", MaxLogRead)
	tests := []struct {
		name      string
		content   string
		tail      int
		from      int64
		want      []string
		wantNext  int64
		wantFirst int // with want nil: the length of the only line
	}{
		{"all", "a\nb\nc\n", 0, -1, []string{"a", "b", "c"}, 6, 0},
		{"tail 2", "a\nb\nc\n", 2, -1, []string{"b", "c"}, 6, 0},
		{"tail more than there is", "a\nb\n", 10, -1, []string{"a", "b"}, 4, 0},
		{"line being written", "a\nb\nc", 0, -1, []string{"a", "b"}, 4, 0},
		{"empty", "", 0, -1, []string{}, 0, 0},
		{"from an offset", "a\nb\nc\n", 0, 2, []string{"b", "c"}, 6, 0},
		{"from the end", "a\nb\nc\n", 0, 6, []string{}, 6, 0},
		{"from past the end: replaced", "a\nb\n", 0, 100, []string{"a", "b"}, 4, 0},
		{"follow a line being written", "a\nb", 0, 2, []string{}, 2, 0},
		{"tail starts inside a long line", long + "\nlast\n", 0, -1, []string{"last"}, int64(len(long)) + 6, 0},
		{"a line longer than a read", long + "yz", 0, 0, nil, int64(len(long)), len(long)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "f.log")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			rep, err := readLog(path, tc.tail, tc.from)
			if err != nil {
				t.Fatal(err)
			}
			if tc.want != nil && !slices.Equal(rep.Lines, tc.want) {
				t.Errorf("lines %q, want %q", rep.Lines, tc.want)
			}
			if tc.want == nil && (len(rep.Lines) != 1 || len(rep.Lines[0]) != tc.wantFirst) {
				t.Errorf("%d lines, want one of %d bytes", len(rep.Lines), tc.wantFirst)
			}
			if rep.Next != tc.wantNext {
				t.Errorf("next %d, want %d", rep.Next, tc.wantNext)
			}
			if rep.Modified.IsZero() {
				t.Error("no modification time")
			}
		})
	}
	// The worst log for its answer's size: every byte escaped in JSON.
	path := filepath.Join(t.TempDir(), "ctl.log")
	if err := os.WriteFile(path, []byte(strings.Repeat(strings.Repeat("\x01", 99)+"\n", 2*MaxLogRead/100)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, from := range []int64{-1, 0} {
		rep, err := readLog(path, 0, from)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(rep)
		if len(rep.Lines) == 0 || len(b) > transport.MaxCallBody {
			t.Errorf("from %d: %d lines, a %d-byte answer (a call carries %d)", from, len(rep.Lines), len(b), transport.MaxCallBody)
		}
	}
	if _, err := readLog(filepath.Join(t.TempDir(), "none.log"), 0, -1); err == nil {
		t.Error("no error for a missing log")
	}
}

// TestLogsFollowRotation: a follow whose offset is past the end of the
// log gets the rest of the rotated log first, then the new log from its
// beginning; lines written to the old log after the last call are not lost.
func TestLogsFollowRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.log")
	f := &fnRegistry{fns: map[string]*fnRec{"x": {logPath: path}}}
	appendTo := func(p, s string) {
		fl, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		defer fl.Close()
		if _, err := fl.WriteString(s); err != nil {
			t.Fatal(err)
		}
	}
	appendTo(path, "a\nb\n")
	rep, err := f.logs(LogsRequest{Name: "x", From: -1})
	if err != nil || rep.Next != 4 {
		t.Fatalf("tail: %+v %v", rep, err)
	}
	appendTo(path, "c\n") // written after the last call, then rotated
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	appendTo(path, "d\n")
	rep, err = f.logs(LogsRequest{Name: "x", From: rep.Next})
	if err != nil || !slices.Equal(rep.Lines, []string{"c"}) || rep.Next != 0 {
		t.Fatalf("after the rotation: %q next %d %v, want [c] next 0", rep.Lines, rep.Next, err)
	}
	rep, err = f.logs(LogsRequest{Name: "x", From: rep.Next})
	if err != nil || !slices.Equal(rep.Lines, []string{"d"}) || rep.Next != 2 {
		t.Fatalf("the new log: %q next %d %v, want [d] next 2", rep.Lines, rep.Next, err)
	}
	if _, err := f.logs(LogsRequest{Name: "nope", From: -1}); err == nil {
		t.Error("no error for a function without a log here")
	}
}
