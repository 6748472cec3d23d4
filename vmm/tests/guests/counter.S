/* Counts in memory for ever and prints each value on COM1 as 8 hex digits and a newline:
 * the snapshot tests' guest (a restored copy must go on from the value it was paused at). */
#include "common.inc"
main:
1:  inc qword ptr [rip + counter]
    mov eax, dword ptr [rip + counter]
    call puthex32
    lea rsi, [rip + newline]
    call puts
    jmp 1b

.section .rodata
newline: .asciz "\n"

.data
counter: .quad 0
