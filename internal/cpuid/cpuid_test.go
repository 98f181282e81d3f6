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
