/* Prints a line, shows that an unclaimed port reads as 0xff, resets through the i8042. */
#include "common.inc"
main:
    lea rsi, [rip + hello]
    call puts
    lea rsi, [rip + unclaimed]
    call puts
    mov dx, 0x2f8           /* COM2: nothing there */
    in al, dx
    movzx eax, al
    call puthex32
    lea rsi, [rip + newline]
    call puts
    jmp reset

.section .rodata
hello:     .asciz "Hello from the tiny guest\n"
unclaimed: .asciz "unclaimed port reads "
newline:   .asciz "\n"
