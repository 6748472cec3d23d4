/* The benchmark's tiny guest: one console line, then a reset through the i8042. */
#include "common.inc"
main:
    lea rsi, [rip + line]
    call puts
    jmp reset

.section .rodata
line: .asciz "Hello from the tiny guest\n"
