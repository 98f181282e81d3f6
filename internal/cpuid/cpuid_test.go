package cpuid

import "testing"

// TestXStateUserSize checks the sizes against the architectural offsets of
// the components every x86-64 CPU with AVX has.
func TestXStateUserSize(t *testing.T) {
	if got := XStateUserSize(0x3); got != 576 {
		t.Fatalf("x87+SSE: %d, want 576", got)
	}
	a, _, _, _ := cpuid(0xd, 0)
	if a&(1<<2) == 0 {
		t.Skip("no AVX")
	}
	if got := XStateUserSize(0x7); got != 832 {
		t.Fatalf("x87+SSE+AVX: %d, want 832 (AVX at 576, 256 bytes)", got)
	}
	if a&(1<<9) != 0 {
		if got := XStateUserSize(0x7 | 1<<9); got != 2696 {
			t.Fatalf("with PKRU: %d, want 2696 (PKRU at 2688, 8 bytes)", got)
		}
	}
}

// TestXStateUserSizeCached checks the table read once against CPUID read
// now, component by component and for everything the CPU supports.
func TestXStateUserSizeCached(t *testing.T) {
	a, _, _, d := cpuid(0xd, 0)
	supported := uint64(d)<<32 | uint64(a)
	want := func(xf uint64) int {
		size := 576
		for i := uint32(2); i < 64; i++ {
			if xf&(1<<i) == 0 {
				continue
			}
			sz, off, _, _ := cpuid(0xd, i)
			if end := int(off) + int(sz); sz != 0 && off != 0 && end > size {
				size = end
			}
		}
		return size
	}
	for i := 0; i < 64; i++ {
		xf := uint64(3) | 1<<i
		if got, w := XStateUserSize(xf), want(xf&(supported|3)); got != w {
			t.Errorf("component %d: %d, want %d", i, got, w)
		}
	}
	if got, w := XStateUserSize(supported), want(supported); got != w {
		t.Errorf("all supported (%#x): %d, want %d", supported, got, w)
	}
}
