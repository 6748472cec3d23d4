/* Signals "boot finished" on the boot timer, then idles with HLT until stopped:
 * an environment that boots and stays ready. Built with vmm/tests/guests/common.inc. */
#include "common.inc"
main:
    mov rax, 0xd0000000
    mov byte ptr [rax], 123
    lea rsi, [rip + msg]
    call puts
6:  hlt
    jmp 6b

.section .rodata
msg: .asciz "ready\n"
