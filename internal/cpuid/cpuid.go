// Package cpuid reads the x86 CPUID leaves mitosis needs: the layout of
// the XSAVE area (leaf 0xD), to size the XSTATE of a signal frame the way
// the kernel checks it.
package cpuid

import "sync"

// cpuid executes CPUID with EAX=leaf, ECX=sub.
func cpuid(leaf, sub uint32) (a, b, c, d uint32)

// XFeatureTileData is the AMX tile data state component (bit 18): the
// kernel enables it per process (arch_prctl ARCH_REQ_XCOMP_PERM), so a
// process that did not ask has no room for it in its signal frames.
const XFeatureTileData = 18

// XStateUserSize returns the size of the standard-format (non-compacted)
// XSAVE area holding the state components in xfeatures: the end of the
// highest one (CPUID.(EAX=0DH,ECX=i): EAX size, EBX offset), at least the
// 576 bytes of the legacy area and header.
//
// The leaves are read once per process: CPUID traps to the hypervisor in
// a VM (about a microsecond or more per leaf), and a restore sizes one
// frame per thread.
func XStateUserSize(xfeatures uint64) int {
	ends := componentEnds()
	size := 576
	for i := 2; i < 64; i++ {
		if xfeatures&(1<<i) != 0 && ends[i] > size {
			size = ends[i]
		}
	}
	return size
}

// componentEnds is, per state component i >= 2 the CPU supports in user
// state (CPUID.(EAX=0DH,ECX=0): EDX:EAX), the end of its area in the
// standard format (offset + size), else 0.
var componentEnds = sync.OnceValue(func() (ends [64]int) {
	a, _, _, d := cpuid(0xd, 0)
	supported := uint64(d)<<32 | uint64(a)
	for i := uint32(2); i < 64; i++ {
		if supported&(1<<i) == 0 {
			continue
		}
		if sz, off, _, _ := cpuid(0xd, i); sz != 0 && off != 0 {
			ends[i] = int(off) + int(sz)
		}
	}
	return ends
})
