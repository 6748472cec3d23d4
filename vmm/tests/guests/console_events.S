/* Prints the line a kernel prints when it panics (PANIC defined) or halts, then resets
 * (panic=-1 behaviour) or halts for good. */
#include "common.inc"
main:
#ifdef PANIC
    lea rsi, [rip + panic]
    call puts
    jmp reset
#else
    lea rsi, [rip + halted]
    call puts
    cli
6:  hlt
    jmp 6b
#endif

.section .rodata
panic:  .asciz "[    1.234567] Kernel panic - not syncing: tiny guest\n"
halted: .asciz "[    2.345678] reboot: System halted\n"
