/* Prints "tick" forever with a busy delay between lines, for pause/resume tests. */
#include "common.inc"
main:
    lea rsi, [rip + tick]
    call puts
    mov rcx, 2000
7:  dec rcx
    jnz 7b
    jmp main

.section .rodata
tick: .asciz "tick\n"
