/* Never signals the boot timer: idles with HLT forever (a guest stuck in boot). */
#include "common.inc"
main:
6:  hlt
    jmp 6b
