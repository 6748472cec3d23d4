/* POPCNT with an MMIO operand: KVM must emulate the access and cannot, so the VMM has to
 * stop the VM naming RIP and the instruction bytes (f3 48 0f b8 ...). */
#include "common.inc"
main:
    lea rsi, [rip + before]
    call puts
    mov rax, 0xe0000000
    popcnt rbx, qword ptr [rax]
    lea rsi, [rip + after]
    call puts
    jmp reset

.section .rodata
before: .asciz "about to fail\n"
after:  .asciz "emulated?!\n"
