package snapshot

import (
	"encoding/binary"
	"path/filepath"
	"strings"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/procfs"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
)

// glibc's x86-64 pthread_mutex_t: int __lock, unsigned __count, int
// __owner, unsigned __nusers, int __kind, ... (40 bytes in all).
const (
	mutexSize     = 40
	mutexOwnerOff = 8
	mutexKindOff  = 16
	// The mutex kinds whose unlock checks the owner: PTHREAD_MUTEX_RECURSIVE_NP
	// and PTHREAD_MUTEX_ERRORCHECK_NP (PTHREAD_MUTEX_KIND_MASK_NP bits), with
	// no robust, priority or pshared flag.
	mutexRecursive  = 1
	mutexErrorcheck = 2
)

// loaderLockOwners finds the dynamic loader's mutexes that a thread of the
// parent held at the prepare point and whose unlock checks the owner's tid:
// the recursive locks in ld.so's _rtld_global (dl_load_lock,
// dl_load_write_lock, dl_load_tls_lock: held across dlopen, TLS setup of a
// new thread, thread exit). A child's threads have new tids, so each such
// owner field must be rewritten at restore (descriptor.TIDRef); otherwise
// the holder's unlock fails with EPERM and the lock is never released
// (TestSoakSeeds with MITOSIS_SOAK_SEEDS_CHURN=1 caught a child of a
// thread-creating parent hanging in pthread_create, about one in 1,300).
//
// tids maps every tid the process sees for a thread (its host tid and its
// tid in the parent's own PID namespace) to the thread's index in
// Descriptor.Threads, -1 for the main thread. It reads ld.so's writable
// file mappings from the frozen copy src. A mutex of the application itself
// (a recursive pthread mutex in its heap) held at the prepare point is not
// found: that hazard remains (docs: README "what is carried").
func loaderLockOwners(src int, maps []procfs.Mapping, tids map[int32]int32) []descriptor.TIDRef {
	var refs []descriptor.TIDRef
	for _, m := range maps {
		if m.Shared || m.Prot&2 == 0 || !isLoader(m.Path) || m.Len() > 1<<20 {
			continue
		}
		b := make([]byte, m.Len())
		if err := ptrace.ReadMem(src, m.Start, b); err != nil {
			continue
		}
		refs = append(refs, heldMutexes(b, m.Start, tids)...)
	}
	return refs
}

// heldMutexes scans b (memory at base) for locked owner-checking mutexes
// whose owner is one of tids.
func heldMutexes(b []byte, base uint64, tids map[int32]int32) []descriptor.TIDRef {
	le := binary.LittleEndian
	var refs []descriptor.TIDRef
	for off := 0; off+mutexSize <= len(b); off += 4 {
		lock, count := le.Uint32(b[off:]), le.Uint32(b[off+4:])
		owner, kind := int32(le.Uint32(b[off+mutexOwnerOff:])), le.Uint32(b[off+mutexKindOff:])
		// A held recursive mutex counts its depth; an error-checking one
		// keeps no count.
		if lock == 0 || !(kind == mutexRecursive && count > 0 || kind == mutexErrorcheck && count == 0) {
			continue
		}
		if th, ok := tids[owner]; ok && owner > 0 {
			refs = append(refs, descriptor.TIDRef{Addr: base + uint64(off+mutexOwnerOff), Thread: th})
			off += mutexSize - 4
		}
	}
	return refs
}

// isLoader reports whether path is the dynamic loader (ld-linux-x86-64.so.2,
// ld-2.31.so, ld-musl-x86_64.so.1 has no such locks but is harmless).
func isLoader(path string) bool {
	base := filepath.Base(path)
	return strings.HasPrefix(base, "ld-") && strings.Contains(base, ".so")
}
