package restore

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"github.com/mitosis-fork/mitosis/internal/cpuid"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/mitosis-fork/mitosis/descriptor"
	"github.com/mitosis-fork/mitosis/internal/ptrace"
	"github.com/mitosis-fork/mitosis/snapshot"
)

// A thread that restores itself ends its setup with rt_sigreturn(2) from
// a signal frame the tracer wrote below its stack pointer: one system call
// loads its general registers, XSTATE (through the frame's fpstate), signal
// mask and alternate signal stack, with no ptrace request per thread. The
// kernel contract relied on (arch/x86/kernel/signal_64.c, fpu/signal.c):
//
//   - rt_sigreturn reads struct rt_sigframe at rsp-8 (where a handler's
//     `ret` popped pretcode): {pretcode, struct ucontext, siginfo};
//   - with UC_FP_XSTATE the XSAVE image at uc_mcontext.fpstate (64-byte
//     aligned) is restored in full when its sw_reserved carries
//     FP_XSTATE_MAGIC1, extended_size = xstate_size + 4 and xstate_size,
//     and FP_XSTATE_MAGIC2 follows the image; otherwise only the legacy
//     FXSAVE part is (silently), so every field is checked here;
//   - orig_ax is set to -1: no syscall restart on the way out (a thread
//     stopped inside a system call gets rip rewound to re-issue it, as
//     for the ptrace path).

// Offsets in struct rt_sigframe (x86-64).
const (
	frameUCFlags   = 8
	frameUCStack   = 24
	frameSigctx    = 48
	frameEflags    = frameSigctx + 17*8
	frameCS        = frameEflags + 8
	frameSS        = frameCS + 6
	frameFPState   = frameSigctx + 184
	frameSigmask   = frameSigctx + 256
	frameSize      = frameSigmask + 8 + 128 // + siginfo
	ucFPXState     = 0x1
	ucSigcontextSS = 0x2
	ucStrictSS     = 0x4
	userCS         = 0x33
	userDS         = 0x2b
	fpXStateMagic1 = 0x46505853
	fpXStateMagic2 = 0x46505845
	// swReserved is the offset of sw_reserved in the XSAVE legacy area;
	// PTRACE_GETREGSET(NT_X86_XSTATE) leaves XCR0 in its first word.
	swReserved = 464
)

// threadFrame builds the signal frame that restores thread th: it returns
// the frame's address in the child (the rsp to rt_sigreturn with, less 8)
// and its bytes, which end with the XSAVE image and FP_XSTATE_MAGIC2.
// restorer is pretcode: the address of `mov $15, %rax; syscall` in the
// child.
func threadFrame(th *descriptor.Thread, restorer uint64) (uint64, []byte, error) {
	xs := th.XState
	if len(xs) < 576 || len(xs)%64 != 0 {
		return 0, nil, fmt.Errorf("XSTATE of %d bytes", len(xs))
	}
	// The ptrace regset holds every component the CPU has (with AMX,
	// 8 KiB of tile data), but rt_sigreturn takes the extended state only
	// if its xstate_size fits the task's own signal-frame size, which
	// leaves out dynamically enabled components (AMX tile data, unless the
	// process asked for it); otherwise it silently restores x87/SSE only
	// and the upper halves of the vector registers are lost. So the frame
	// carries the components up to the last static one.
	le := binary.LittleEndian
	xcr0 := le.Uint64(xs[swReserved:]) // the ptrace regset keeps XCR0 here
	features := xcr0 &^ (1 << cpuid.XFeatureTileData)
	if n := cpuid.XStateUserSize(features); n < len(xs) {
		xs = xs[:n]
	}
	regs := snapshot.RegsFromArray(th.Regs)
	fixRestart(&regs)
	// Below the red zone, and below anything a signal handler of the
	// parent would have written there.
	top := regs.Rsp - 128 - 64
	fp := (top - uint64(len(xs)) - 4) &^ 63
	frame := (fp - frameSize) &^ 15
	b := make([]byte, fp+uint64(len(xs))+4-frame)
	le.PutUint64(b[0:], restorer)
	le.PutUint64(b[frameUCFlags:], ucFPXState|ucSigcontextSS|ucStrictSS)
	if th.AltStackFlags&ssDisable == 0 && th.AltStackSize != 0 {
		le.PutUint64(b[frameUCStack:], th.AltStackSP)
		le.PutUint32(b[frameUCStack+8:], th.AltStackFlags&^ssOnStack)
		le.PutUint64(b[frameUCStack+16:], th.AltStackSize)
	} else {
		le.PutUint32(b[frameUCStack+8:], ssDisable)
	}
	for i, v := range []uint64{regs.R8, regs.R9, regs.R10, regs.R11, regs.R12, regs.R13, regs.R14, regs.R15,
		regs.Rdi, regs.Rsi, regs.Rbp, regs.Rbx, regs.Rdx, regs.Rax, regs.Rcx, regs.Rsp, regs.Rip} {
		le.PutUint64(b[frameSigctx+8*i:], v)
	}
	le.PutUint64(b[frameEflags:], regs.Eflags&^0x100)
	le.PutUint16(b[frameCS:], userCS)
	le.PutUint16(b[frameSS:], userDS)
	le.PutUint64(b[frameFPState:], fp)
	le.PutUint64(b[frameSigmask:], th.SigMask)
	img := b[fp-frame:]
	copy(img, xs)
	for i := swReserved; i < 512; i++ {
		img[i] = 0
	}
	// XSTATE_BV may name only components the frame holds.
	le.PutUint64(img[512:], le.Uint64(img[512:])&features)
	le.PutUint32(img[swReserved:], fpXStateMagic1)
	le.PutUint32(img[swReserved+4:], uint32(len(xs))+4) // extended_size
	le.PutUint64(img[swReserved+8:], features)          // xfeatures
	le.PutUint32(img[swReserved+16:], uint32(len(xs)))  // xstate_size
	le.PutUint32(img[len(xs):], fpXStateMagic2)
	return frame, b, nil
}

// selfRestore is what the child's threads need to restore themselves: the
// child's addresses of a vDSO `syscall` that returns (after clearing
// registers only) with `ret`, and of the parent's signal restorer.
type selfRestore struct {
	vdsoRet  uint64
	restorer uint64
}

// selfRestorer returns c's selfRestore, or ok false when the threads must
// be restored by the tracer: the vDSO has no such sequence, the parent
// installed no signal handler with a restorer (glibc always sets one), or
// the restorer is not `mov $15, %rax; syscall`.
func (c *child) selfRestorer() (selfRestore, bool) {
	if os.Getenv("MITOSIS_PTRACE_THREADS") != "" {
		return selfRestore{}, false // the tracer's path, for comparison
	}
	off, ok := vdsoRetSyscall()
	if !ok {
		return selfRestore{}, false
	}
	var base uint64
	for _, v := range c.d.VMAs {
		if v.Kind == descriptor.KindVDSO {
			base = v.Start
		}
	}
	var restorer uint64
	for _, sa := range c.d.SigActions {
		if sa.Flags&saRestorer != 0 && sa.Restorer != 0 {
			restorer = sa.Restorer
			break
		}
	}
	code := make([]byte, len(restoreRT))
	if restorer != 0 {
		if err := ptrace.ReadMem(c.pid, restorer, code); err != nil || !bytes.Equal(code, restoreRT) {
			restorer = 0
		}
	}
	if restorer == 0 {
		// No handler installed: libc's __restore_rt is still mapped.
		restorer = c.findRestorer()
	}
	if base == 0 || restorer == 0 {
		return selfRestore{}, false
	}
	return selfRestore{vdsoRet: base + off, restorer: restorer}, true
}

// restorers caches findRestorer per seed (every child of a seed has its
// layout): seed id -> address, 0 for none.
var restorers sync.Map

// findRestorer looks for restoreRT in the child's executable file
// mappings (libc's __restore_rt), read from the child, once per seed.
func (c *child) findRestorer() uint64 {
	if v, ok := restorers.Load(c.d.SeedID); ok && c.d.SeedID != "" {
		return v.(uint64)
	}
	var found uint64
	for _, v := range c.d.VMAs {
		if v.Kind != descriptor.KindFile || v.Prot&4 == 0 || v.End-v.Start > 64<<20 {
			continue // PROT_EXEC file mappings only
		}
		text := make([]byte, v.End-v.Start)
		if err := ptrace.ReadMem(c.pid, v.Start, text); err != nil {
			continue
		}
		if i := bytes.Index(text, restoreRT); i >= 0 {
			found = v.Start + uint64(i)
			break
		}
	}
	if c.d.SeedID != "" {
		restorers.Store(c.d.SeedID, found)
	}
	return found
}

// saRestorer is SA_RESTORER.
const saRestorer = 0x04000000

// restoreRT is glibc's __restore_rt: mov $15, %rax; syscall.
var restoreRT = []byte{0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05}

var vdsoRet struct {
	once sync.Once
	off  uint64
	ok   bool
}

// vdsoRetSyscall finds, in this process's vDSO (the same kernel build as
// the child's), a `syscall` followed only by xor-clears of registers other
// than rsp and then `ret`, and returns its offset.
func vdsoRetSyscall() (uint64, bool) {
	vdsoRet.once.Do(func() {
		maps, err := os.ReadFile("/proc/self/maps")
		if err != nil {
			return
		}
		for _, l := range strings.Split(string(maps), "\n") {
			if !strings.HasSuffix(l, "[vdso]") {
				continue
			}
			r := strings.Fields(l)[0]
			s, e, _ := strings.Cut(r, "-")
			start, err1 := strconv.ParseUint(s, 16, 64)
			end, err2 := strconv.ParseUint(e, 16, 64)
			if err1 != nil || err2 != nil || end <= start {
				return
			}
			mem, err := os.Open("/proc/self/mem")
			if err != nil {
				return
			}
			defer mem.Close()
			img := make([]byte, end-start)
			if _, err := mem.ReadAt(img, int64(start)); err != nil {
				return
			}
			vdsoRet.off, vdsoRet.ok = findRetSyscall(img)
			return
		}
	})
	return vdsoRet.off, vdsoRet.ok
}

// findRetSyscall returns the offset in code of a `syscall` (0f 05) whose
// next instructions are at most 8 `xor r32, r32` (same register, not esp)
// and then `ret`.
func findRetSyscall(code []byte) (uint64, bool) {
	for i := 0; i+2 < len(code); i++ {
		if code[i] != 0x0f || code[i+1] != 0x05 {
			continue
		}
		j := i + 2
		for n := 0; n <= 8 && j < len(code); n++ {
			if code[j] == 0xc3 {
				return uint64(i), true
			}
			rex := byte(0)
			if code[j] >= 0x40 && code[j] <= 0x4f {
				rex = code[j]
				j++
			}
			if j+1 >= len(code) || code[j] != 0x31 || code[j+1] < 0xc0 {
				break
			}
			m := code[j+1]
			reg := int((m>>3)&7) | int((rex>>2)&1)<<3
			rm := int(m&7) | int(rex&1)<<3
			if reg != rm || rm == 4 {
				break
			}
			j += 2
		}
	}
	return 0, false
}

// Futex operations (linux/futex.h) for the release of self-restoring
// threads.
const (
	futexWakePrivate       = 1 | 128
	futexCmpRequeuePrivate = 4 | 128
)
