package snapshot

import (
	"encoding/binary"
	"reflect"
	"testing"

	"github.com/mitosis-fork/mitosis/descriptor"
)

func TestHeldMutexes(t *testing.T) {
	le := binary.LittleEndian
	mutex := func(b []byte, off int, lock, count uint32, owner int32, kind uint32) {
		le.PutUint32(b[off:], lock)
		le.PutUint32(b[off+4:], count)
		le.PutUint32(b[off+8:], uint32(owner))
		le.PutUint32(b[off+16:], kind)
	}
	tids := map[int32]int32{100: -1, 101: 0, 7101: 0, 102: 1}
	b := make([]byte, 512)
	mutex(b, 0, 2, 1, 101, 1)    // recursive, held by thread 0 (contended): found
	mutex(b, 40, 1, 3, 100, 1)   // recursive, held 3 deep by the main thread: found
	mutex(b, 80, 0, 0, 0, 1)     // free
	mutex(b, 120, 1, 1, 999, 1)  // held by no thread of ours
	mutex(b, 160, 1, 0, 102, 0)  // normal mutex: its unlock does not check
	mutex(b, 200, 1, 0, 102, 2)  // error-checking, held by thread 1: found
	mutex(b, 244, 1, 1, 7101, 1) // 4-aligned, thread 0 by its namespace tid: found
	mutex(b, 288, 1, 1, 102, 17) // robust: the kernel's business, not ours
	want := []descriptor.TIDRef{
		{Addr: 0x1000 + 8, Thread: 0},
		{Addr: 0x1000 + 48, Thread: -1},
		{Addr: 0x1000 + 208, Thread: 1},
		{Addr: 0x1000 + 252, Thread: 0},
	}
	if got := heldMutexes(b, 0x1000, tids); !reflect.DeepEqual(got, want) {
		t.Errorf("heldMutexes = %+v, want %+v", got, want)
	}
	for path, want := range map[string]bool{
		"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": true, "/lib/ld-2.31.so": true,
		"/usr/lib/x86_64-linux-gnu/libc.so.6": false, "/usr/bin/ld-wrapper": false, "": false,
	} {
		if isLoader(path) != want {
			t.Errorf("isLoader(%q) = %v", path, !want)
		}
	}
}
