/* Reads the first virtio-mmio slot's magic, version and device ID and prints them. */
#include "common.inc"
main:
    mov rdi, 0xd0001000
    lea rsi, [rip + magic]
    call puts
    mov eax, [rdi]
    call puthex32
    lea rsi, [rip + version]
    call puts
    mov eax, [rdi + 4]
    call puthex32
    lea rsi, [rip + device]
    call puts
    mov eax, [rdi + 8]
    call puthex32
    lea rsi, [rip + newline]
    call puts
    jmp reset

.section .rodata
magic:   .asciz "magic="
version: .asciz " version="
device:  .asciz " device="
newline: .asciz "\n"
