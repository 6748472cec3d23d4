/* Installs a #BP handler and executes INT3: the handler must run and return after the
 * instruction (KVM here cannot emulate INT3; the VMM completes it). */
#include "common.inc"
main:
    lea rax, [rip + bp_handler]
    lea rdi, [rip + idt + 3 * 16]
    mov word ptr [rdi], ax
    mov word ptr [rdi + 2], 0x8      /* boot GDT code selector */
    mov byte ptr [rdi + 4], 0
    mov byte ptr [rdi + 5], 0x8e     /* present, DPL 0, 64-bit interrupt gate */
    shr rax, 16
    mov word ptr [rdi + 6], ax
    shr rax, 16
    mov dword ptr [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    lidt [rip + idtr]
    int3
    lea rsi, [rip + after]
    call puts
    jmp reset

bp_handler:
    lea rsi, [rip + handled]
    call puts
    iretq

.section .rodata
handled: .asciz "breakpoint handled\n"
after:   .asciz "resumed after int3\n"

.data
.align 16
idtr: .word 4 * 16 - 1
      .quad idt
.align 16
idt:  .fill 4 * 16, 1, 0
