// Package cpuid reads the x86 CPUID leaves mitosis needs: the layout of
// the XSAVE area (leaf 0xD), to size the XSTATE of a signal frame the way
// the kernel checks it.
package cpuid

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
func XStateUserSize(xfeatures uint64) int {
	size := 576
	for i := uint32(2); i < 64; i++ {
		if xfeatures&(1<<i) == 0 {
			continue
		}
		sz, off, _, _ := cpuid(0xd, i)
		if end := int(off) + int(sz); sz != 0 && off != 0 && end > size {
			size = end
		}
	}
	return size
}
