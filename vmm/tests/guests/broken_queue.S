/* Brings up the virtio-rng device in the first virtio-mmio slot like a driver, then breaks
 * its queue: avail.idx claims 17 new chains on a 16-entry queue. Notifies the queue, waits
 * for the device to set DEVICE_NEEDS_RESET (0x40) in its status, prints the status and
 * halts (the test then talks to the VMM's API and stops it with SIGTERM). */
#include "common.inc"
#define MMIO   0xd0001000
#define DESC   0x200000
#define AVAIL  0x201000
#define USED   0x202000
main:
    mov rdi, MMIO
    mov dword ptr [rdi + 0x70], 1        /* STATUS = ACKNOWLEDGE */
    mov dword ptr [rdi + 0x70], 3        /* | DRIVER */
    mov dword ptr [rdi + 0x24], 1        /* DRIVER_FEATURES_SEL = 1 */
    mov dword ptr [rdi + 0x20], 1        /* VIRTIO_F_VERSION_1 (bit 32) */
    mov dword ptr [rdi + 0x70], 0xb      /* | FEATURES_OK */
    mov dword ptr [rdi + 0x30], 0        /* QUEUE_SEL = 0 */
    mov dword ptr [rdi + 0x38], 16       /* QUEUE_NUM = 16 */
    mov dword ptr [rdi + 0x80], DESC     /* QUEUE_DESC */
    mov dword ptr [rdi + 0x84], 0
    mov dword ptr [rdi + 0x90], AVAIL    /* QUEUE_DRIVER */
    mov dword ptr [rdi + 0x94], 0
    mov dword ptr [rdi + 0xa0], USED     /* QUEUE_DEVICE */
    mov dword ptr [rdi + 0xa4], 0
    mov dword ptr [rdi + 0x44], 1        /* QUEUE_READY */
    mov dword ptr [rdi + 0x70], 0xf      /* | DRIVER_OK */
    mov eax, [rdi + 0x70]
    cmp eax, 0xf
    jne not_live

    mov rax, AVAIL
    mov word ptr [rax + 2], 17           /* avail.idx: 17 ahead on a 16-entry queue */
    mov dword ptr [rdi + 0x50], 0        /* QUEUE_NOTIFY queue 0 */
    lea rsi, [rip + notified]
    call puts

1:  mov eax, [rdi + 0x70]
    test eax, 0x40
    jz 1b
    lea rsi, [rip + status]
    call puts
    mov eax, [rdi + 0x70]
    call puthex32
    lea rsi, [rip + isr]
    call puts
    mov eax, [rdi + 0x60]                /* INTERRUPT_STATUS */
    call puthex32
    lea rsi, [rip + newline]
    call puts
2:  cli
    hlt
    jmp 2b

not_live:
    mov r8d, eax
    lea rsi, [rip + failed]
    call puts
    mov eax, r8d
    call puthex32
    lea rsi, [rip + newline]
    call puts
    jmp reset

.section .rodata
notified: .asciz "queue broken and notified\n"
status:   .asciz "status="
isr:      .asciz " interrupt_status="
failed:   .asciz "device not live, status="
newline:  .asciz "\n"
