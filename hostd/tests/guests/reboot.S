/* Reboots at once without signalling the boot timer: a guest that never becomes ready. */
#include "common.inc"
main:
    jmp reset
