// Package stub builds the two pieces of machine code a restore runs inside a
// fresh process: the stub executable (a static ELF without libc whose entry
// point is `syscall; int3`) and the batch runner that executes a table of
// system calls in one ptrace round trip.
//
// Both are generated here as bytes, so building mitosis needs nothing beyond
// `go build`. The x86-64 encodings are listed next to each byte sequence.
package stub

import (
	"encoding/binary"
)

// Base is the load address of the stub executable. It is above the default
// vm.mmap_min_addr (64 KiB) and below where executables and libraries are
// placed, and it is unmapped before any parent mapping is recreated.
const Base = 0x10000

// EntryOffset is the offset of the entry point in the stub's image.
const EntryOffset = 64 + 56

// ELF returns the stub executable image: one PT_LOAD R+X segment holding the
// headers and the code `syscall; int3; jmp .-3`. A tracer that starts it with
// PTRACE_TRACEME gets the exec stop with rip at the entry, i.e. on a syscall
// instruction it can single-step.
func ELF() []byte {
	code := []byte{
		0x0f, 0x05, // syscall
		0xcc,       // int3
		0xeb, 0xfb, // jmp entry
	}
	size := EntryOffset + len(code)
	b := make([]byte, size)
	le := binary.LittleEndian
	// ELF header (Elf64_Ehdr).
	copy(b[0:], []byte{0x7f, 'E', 'L', 'F', 2 /*64-bit*/, 1 /*LE*/, 1 /*version*/, 0 /*SysV*/})
	le.PutUint16(b[16:], 2)                // e_type ET_EXEC
	le.PutUint16(b[18:], 0x3e)             // e_machine EM_X86_64
	le.PutUint32(b[20:], 1)                // e_version
	le.PutUint64(b[24:], Base+EntryOffset) // e_entry
	le.PutUint64(b[32:], 64)               // e_phoff
	le.PutUint64(b[40:], 0)                // e_shoff
	le.PutUint32(b[48:], 0)                // e_flags
	le.PutUint16(b[52:], 64)               // e_ehsize
	le.PutUint16(b[54:], 56)               // e_phentsize
	le.PutUint16(b[56:], 1)                // e_phnum
	le.PutUint16(b[58:], 64)               // e_shentsize
	le.PutUint16(b[60:], 0)                // e_shnum
	le.PutUint16(b[62:], 0)                // e_shstrndx
	// Program header (Elf64_Phdr) PT_LOAD.
	p := b[64:]
	le.PutUint32(p[0:], 1)             // p_type PT_LOAD
	le.PutUint32(p[4:], 5)             // p_flags PF_R|PF_X
	le.PutUint64(p[8:], 0)             // p_offset
	le.PutUint64(p[16:], Base)         // p_vaddr
	le.PutUint64(p[24:], Base)         // p_paddr
	le.PutUint64(p[32:], uint64(size)) // p_filesz
	le.PutUint64(p[40:], uint64(size)) // p_memsz
	le.PutUint64(p[48:], 0x1000)       // p_align
	copy(b[EntryOffset:], code)
	return b
}

// Runner is position-independent code that executes a table of system
// calls. On entry rbx points at the table and r12 holds the entry count.
// Each 64-byte entry is {nr, a1, a2, a3, a4, a5, a6, result}; the runner
// stores rax in result and stops (int3) after the last entry or at the first
// call that returns an error (-4095..-1), so the tracer sees exactly which
// call failed. It uses no stack.
var Runner = code(
	[]byte{
		0x4d, 0x85, 0xe4, // loop: test r12, r12
		0x74, 0x32, //       jz done
	},
	callEntry, //             +29
	[]byte{
		0x48, 0x89, 0x43, 0x38, // mov [rbx+56], rax
		0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, // cmp rax, -4095
		0x73, 0x09, //             jae done
		0x48, 0x83, 0xc3, 0x40, // add rbx, 64
		0x49, 0xff, 0xcc, //       dec r12
		0xeb, 0xc9, //             jmp loop
		0xcc, //                   done: int3
	},
)

// callEntry loads the system call number and the six arguments of the
// 64-byte table entry at rbx and makes the call (29 bytes).
var callEntry = []byte{
	0x48, 0x8b, 0x03, //       mov rax, [rbx]
	0x48, 0x8b, 0x7b, 0x08, // mov rdi, [rbx+8]
	0x48, 0x8b, 0x73, 0x10, // mov rsi, [rbx+16]
	0x48, 0x8b, 0x53, 0x18, // mov rdx, [rbx+24]
	0x4c, 0x8b, 0x53, 0x20, // mov r10, [rbx+32]
	0x4c, 0x8b, 0x43, 0x28, // mov r8, [rbx+40]
	0x4c, 0x8b, 0x4b, 0x30, // mov r9, [rbx+48]
	0x0f, 0x05, //             syscall
}

// code concatenates pieces of machine code.
func code(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// Cloner is Runner for a table whose clone(2) calls create threads
// (CLONE_VM|CLONE_THREAD...): the caller continues down the table, storing
// each call's result (a clone's: the new thread's id), and stops (int3)
// after the last entry or at the first error. Entries other than clone(2)
// run as in Runner, so one run can set the process's state and then make
// its threads. Each entry's sixth argument (r9, unused by clone) is the
// address of the new thread's own slot (see ThreadSlotHeader): a header,
// then Runner entries. The new thread (rax 0 after the syscall) runs its
// entries, storing each result, and then, with a futex word in its header,
// waits on it (FUTEX_WAIT_PRIVATE, value 0) from the `syscall` of the
// header's vDSO address with rsp at the header's frame: when the wait ends
// the code there returns through the frame's first word (a restorer: the
// thread rt_sigreturns into the state its frame holds). Without a futex
// word it parks in a pause(2) loop instead, where the tracer seizes it.
// The thread uses no stack until then. One run of the caller creates and
// initializes any number of threads.
var Cloner = code(
	[]byte{
		0x4d, 0x85, 0xe4, // loop: test r12, r12
		0x74, 0x3d, //       jz done
	},
	callEntry, //             +29
	[]byte{
		0x48, 0x83, 0x3b, 0x38, // cmp qword [rbx], 56 (clone)
		0x75, 0x05, //             jne store
		0x48, 0x85, 0xc0, //       test rax, rax
		0x74, 0x16, //             jz child
		0x48, 0x89, 0x43, 0x38, // store: mov [rbx+56], rax
		0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, // cmp rax, -4095
		0x73, 0x09, //             jae done
		0x48, 0x83, 0xc3, 0x40, // add rbx, 64
		0x49, 0xff, 0xcc, //       dec r12
		0xeb, 0xbe, //             jmp loop
		0xcc,             //                   done: int3
		0x4c, 0x89, 0xcb, //       child: mov rbx, r9
		0x49, 0x89, 0xdd, //       mov r13, rbx
		0x4c, 0x8b, 0x23, //       mov r12, [rbx]
		0x48, 0x83, 0xc3, 0x20, // add rbx, 32
		0x4d, 0x85, 0xe4, //       cloop: test r12, r12
		0x74, 0x2a, //             jz park
	},
	callEntry, //             +29
	[]byte{
		0x48, 0x89, 0x43, 0x38, // mov [rbx+56], rax
		0x48, 0x83, 0xc3, 0x40, // add rbx, 64
		0x49, 0xff, 0xcc, //       dec r12
		0xeb, 0xd1, //             jmp cloop
		0x49, 0x8b, 0x7d, 0x08, // park: mov rdi, [r13+8] (futex word)
		0x48, 0x85, 0xff, //       test rdi, rdi
		0x74, 0x17, //             jz pause
		0x49, 0x8b, 0x65, 0x18, // mov rsp, [r13+24] (frame)
		0xbe, 0x80, 0x00, 0x00, 0x00, // mov esi, FUTEX_WAIT_PRIVATE
		0x31, 0xd2, //             xor edx, edx
		0x45, 0x31, 0xd2, //       xor r10d, r10d
		0xb8, 0xca, 0x00, 0x00, 0x00, // mov eax, 202 (futex)
		0x41, 0xff, 0x65, 0x10, // jmp [r13+16] (vDSO syscall; ...; ret)
		0xb8, 0x22, 0x00, 0x00, 0x00, // pause: mov eax, 34 (pause)
		0x0f, 0x05, //             syscall
		0xeb, 0xf7, //             jmp pause
	},
)

// ThreadSlotHeader is the size of the header of a thread's slot for
// Cloner: {entry count, futex word address or 0, vDSO return-syscall
// address, frame address}, each a u64; the entries follow.
const ThreadSlotHeader = 32

// SyscallOffset is the offset in the gadget code page of a lone
// `syscall; int3` used for single injections.
const SyscallOffset = 0x40

// ClonerOffset is the offset of Cloner in the gadget code page.
const ClonerOffset = 0x80

// Code returns the gadget code page content: Runner at offset 0,
// `syscall; int3` at SyscallOffset and Cloner at ClonerOffset.
func Code() []byte {
	b := make([]byte, ClonerOffset+len(Cloner))
	copy(b, Runner)
	copy(b[SyscallOffset:], []byte{0x0f, 0x05, 0xcc})
	copy(b[ClonerOffset:], Cloner)
	return b
}

// EntrySize is the size of one Runner table entry.
const EntrySize = 64

// NotRun is the value pre-stored in each entry's result slot; a result still
// equal to it after the run means the runner stopped before that entry.
const NotRun = 0x8000000000000000

// Call is one system call in a batch.
type Call struct {
	NR   uint64
	Args [6]uint64
	What string // for error messages, e.g. "mmap 0x7f..-0x7f.. libc.so.6"
}

// Batch lays out a table of calls plus an arena of argument data (strings,
// structs) at a fixed address in the target.
type Batch struct {
	Addr  uint64 // where the table starts in the target
	Calls []Call
	arena []byte
	// ArenaOff is where the arena starts relative to Addr; set by Reserve.
	arenaAddr uint64
}

// NewBatch starts a batch whose table will live at addr and whose arena
// starts arenaOff bytes after it (room for arenaOff/EntrySize entries).
func NewBatch(addr uint64, arenaOff uint64) *Batch {
	return &Batch{Addr: addr, arenaAddr: addr + arenaOff}
}

// Add appends a call and returns its index.
func (b *Batch) Add(what string, nr uint64, args ...uint64) int {
	c := Call{NR: nr, What: what}
	copy(c.Args[:], args)
	b.Calls = append(b.Calls, c)
	return len(b.Calls) - 1
}

// Data copies data into the arena (8-byte aligned) and returns its address
// in the target.
func (b *Batch) Data(data []byte) uint64 {
	for len(b.arena)%8 != 0 {
		b.arena = append(b.arena, 0)
	}
	a := b.arenaAddr + uint64(len(b.arena))
	b.arena = append(b.arena, data...)
	return a
}

// Put overwrites arena bytes at addr with data.
//
// Precondition: [addr, addr+len(data)) was returned (in part) by Data.
func (b *Batch) Put(addr uint64, data []byte) {
	copy(b.arena[addr-b.arenaAddr:], data)
}

// String copies a NUL-terminated string into the arena.
func (b *Batch) String(s string) uint64 {
	return b.Data(append([]byte(s), 0))
}

// TableBytes encodes the table.
func (b *Batch) TableBytes() []byte {
	t := make([]byte, len(b.Calls)*EntrySize)
	le := binary.LittleEndian
	for i, c := range b.Calls {
		e := t[i*EntrySize:]
		le.PutUint64(e[0:], c.NR)
		for j, a := range c.Args {
			le.PutUint64(e[8+8*j:], a)
		}
		le.PutUint64(e[56:], NotRun)
	}
	return t
}

// Arena returns the arena bytes and their target address.
func (b *Batch) Arena() (uint64, []byte) { return b.arenaAddr, b.arena }

// Results decodes the result slots from a table read back from the target.
func Results(table []byte) []uint64 {
	n := len(table) / EntrySize
	r := make([]uint64, n)
	for i := range r {
		r[i] = binary.LittleEndian.Uint64(table[i*EntrySize+56:])
	}
	return r
}
