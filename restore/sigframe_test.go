package restore

import (
	"encoding/binary"
	"testing"

	"github.com/mitosis-fork/mitosis/descriptor"
)

func TestFindRetSyscall(t *testing.T) {
	tests := []struct {
		name string
		code []byte
		want int // -1: none
	}{
		{"clears then ret", []byte{0x90, 0x0f, 0x05, 0x31, 0xd2, 0x31, 0xc9, 0x31, 0xf6, 0x31, 0xff, 0x45, 0x31, 0xdb, 0xc3}, 1},
		{"ret at once", []byte{0x0f, 0x05, 0xc3}, 0},
		{"clears rsp", []byte{0x0f, 0x05, 0x31, 0xe4, 0xc3}, -1},
		{"xor of two registers", []byte{0x0f, 0x05, 0x31, 0xc2, 0xc3}, -1},
		{"stack move", []byte{0x0f, 0x05, 0x48, 0x8d, 0x65, 0xf0, 0xc3}, -1},
		{"second one", []byte{0x0f, 0x05, 0xc9, 0x0f, 0x05, 0x4d, 0x31, 0xe4, 0xc3}, 3}, // xor r12, r12 is fine
		{"none", []byte{0xc3, 0x90}, -1},
	}
	for _, tc := range tests {
		off, ok := findRetSyscall(tc.code)
		got := -1
		if ok {
			got = int(off)
		}
		if got != tc.want {
			t.Errorf("%s: findRetSyscall = %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestThreadFrame(t *testing.T) {
	le := binary.LittleEndian
	xs := make([]byte, 2432)
	for i := range xs {
		xs[i] = byte(i)
	}
	le.PutUint64(xs[swReserved:], 0xe7) // XCR0, as PTRACE_GETREGSET leaves it
	th := &descriptor.Thread{XState: xs, SigMask: 1<<9 | 1, AltStackFlags: ssDisable}
	const rsp, rip = 0x7f0000012345 &^ 7, 0x401000
	// In futex(2), interrupted: rax -ERESTARTSYS (the order of
	// snapshot.RegsFromArray: rax 10, orig_rax 15, rip 16, rsp 19).
	th.Regs[19], th.Regs[16], th.Regs[10], th.Regs[15] = rsp, rip, ^uint64(512-1), 202
	frame, b, err := threadFrame(th, 0x7f00deadbee0)
	if err != nil {
		t.Fatal(err)
	}
	if frame >= rsp-128 || frame < rsp-4096 {
		t.Errorf("frame at %#x, rsp %#x: want below the red zone and within 4 KiB (the preloaded pages)", frame, uint64(rsp))
	}
	if got := le.Uint64(b[0:]); got != 0x7f00deadbee0 {
		t.Errorf("pretcode %#x", got)
	}
	if got := le.Uint64(b[frameUCFlags:]); got != ucFPXState|ucSigcontextSS|ucStrictSS {
		t.Errorf("uc_flags %#x", got)
	}
	if got := le.Uint32(b[frameUCStack+8:]); got != ssDisable {
		t.Errorf("uc_stack.ss_flags %d, want SS_DISABLE", got)
	}
	// The restart fix: rip back onto the syscall, rax = the syscall.
	if got := le.Uint64(b[frameSigctx+16*8:]); got != rip-2 {
		t.Errorf("rip %#x, want %#x", got, rip-2)
	}
	if got := le.Uint64(b[frameSigctx+13*8:]); got != 202 {
		t.Errorf("rax %d, want 202 (restart futex)", got)
	}
	if got := le.Uint64(b[frameSigctx+15*8:]); got != rsp {
		t.Errorf("rsp %#x", got)
	}
	if le.Uint16(b[frameCS:]) != userCS || le.Uint16(b[frameSS:]) != userDS {
		t.Errorf("cs/ss %#x/%#x", le.Uint16(b[frameCS:]), le.Uint16(b[frameSS:]))
	}
	if got := le.Uint64(b[frameSigmask:]); got != th.SigMask {
		t.Errorf("sigmask %#x", got)
	}
	fp := le.Uint64(b[frameFPState:])
	if fp%64 != 0 || fp < frame+frameSize {
		t.Fatalf("fpstate at %#x (frame %#x): want 64-byte aligned, after the frame", fp, frame)
	}
	img := b[fp-frame:]
	if le.Uint32(img[swReserved:]) != fpXStateMagic1 || le.Uint32(img[swReserved+4:]) != 2436 ||
		le.Uint64(img[swReserved+8:]) != 0xe7 || le.Uint32(img[swReserved+16:]) != 2432 {
		t.Errorf("sw_reserved % x", img[swReserved:swReserved+20])
	}
	if le.Uint32(img[2432:]) != fpXStateMagic2 || len(img) != 2436 {
		t.Errorf("magic2 %#x, image %d bytes", le.Uint32(img[2432:]), len(img))
	}
	if img[100] != xs[100] || img[600] != xs[600] {
		t.Errorf("XSAVE image not copied")
	}
	th.XState = xs[:100]
	if _, _, err := threadFrame(th, 1); err == nil {
		t.Errorf("a 100-byte XSTATE: want an error")
	}
}
