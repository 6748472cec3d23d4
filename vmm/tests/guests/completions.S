/* Instructions that must behave as on the CPU although KVM here cannot emulate some of
 * them (FWAIT and UD1 reach the VMM, which completes them; KVM raises UD2's #UD itself):
 * FWAIT with no pending x87 exception does nothing; UD2 and UD1 raise #UD with RIP on the
 * instruction (the handler steps over it, as Linux's WARN() does); FWAIT with a pending
 * unmasked x87 exception (loaded with FXRSTOR) raises #MF with RIP on the FWAIT. */
#include "common.inc"

/* Sets IDT gate \vec to the handler at \handler (64-bit interrupt gate, DPL 0). */
.macro gate vec, handler
    lea rax, [rip + \handler]
    lea rdi, [rip + idt + \vec * 16]
    mov word ptr [rdi], ax
    mov word ptr [rdi + 2], 0x8      /* boot GDT code selector */
    mov byte ptr [rdi + 4], 0
    mov byte ptr [rdi + 5], 0x8e
    shr rax, 16
    mov word ptr [rdi + 6], ax
    shr rax, 16
    mov dword ptr [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
.endm

main:
    gate 6, ud_handler
    gate 7, nm_handler
    gate 16, mf_handler
    lidt [rip + idtr]
    mov rax, cr0
    or rax, 0x22                     /* CR0.MP and CR0.NE, as Linux runs */
    mov cr0, rax

    fwait
    lea rsi, [rip + after_fwait]
    call puts

    ud2
    lea rsi, [rip + after_ud2]
    call puts

    ud1 eax, dword ptr [rax]         /* 0f b9 00: also #UD, 3 bytes */
    lea rsi, [rip + after_ud1]
    call puts

    fxrstor [rip + fpu_pending]
pending_fwait:
    fwait
    lea rsi, [rip + not_raised]
    call puts
    jmp reset

ud_handler:
    lea rsi, [rip + ud_seen]
    call puts
    mov rax, [rsp]                   /* step over the UD2 or UD1 the frame points at */
    cmp byte ptr [rax + 1], 0x0b
    je 2f
    add qword ptr [rsp], 1
2:  add qword ptr [rsp], 2
    iretq

nm_handler:
    lea rsi, [rip + nm_seen]
    call puts
    jmp reset

mf_handler:
    /* The frame must point at the FWAIT: #MF is a fault. */
    lea rax, [rip + pending_fwait]
    cmp qword ptr [rsp], rax
    jne 1f
    lea rsi, [rip + mf_seen]
    call puts
    jmp reset
1:  lea rsi, [rip + mf_wrong_rip]
    call puts
    jmp reset

.section .rodata
after_fwait:  .asciz "fwait completed\n"
ud_seen:      .asciz "invalid opcode handled\n"
after_ud2:    .asciz "resumed after ud2\n"
after_ud1:    .asciz "resumed after ud1\n"
nm_seen:      .asciz "device not available?!\n"
mf_seen:      .asciz "math fault at the fwait\n"
mf_wrong_rip: .asciz "math fault with a wrong RIP\n"
not_raised:   .asciz "pending x87 exception not raised\n"

.data
.align 16
idtr: .word 17 * 16 - 1
      .quad idt
.align 16
idt:  .fill 17 * 16, 1, 0
/* FXRSTOR image: FCW with the zero-divide exception unmasked, FSW with ZE and ES set. */
.align 16
fpu_pending:
    .word 0x037b                     /* FCW */
    .word 0x0084                     /* FSW: ES | ZE */
    .fill 20, 1, 0
    .long 0x1f80                     /* MXCSR */
    .long 0xffff                     /* MXCSR_MASK */
    .fill 512 - 32, 1, 0
