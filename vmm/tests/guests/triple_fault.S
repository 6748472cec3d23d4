/* Loads an empty IDT and raises #UD: no handler, no #DF handler, triple fault. */
#include "common.inc"
main:
    lidt [rip + idtr]
    ud2

.data
.align 16
idtr: .word 0
      .quad 0
