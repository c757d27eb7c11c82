/* Entry points, boot page tables, GDT, interrupt stubs and the few routines
 * that must be assembly. Ring-0 instruction count matters (hosts backed by
 * PVM emulate ring 0 at ~1e6 instructions/s), so everything that can be built
 * at link time is: page tables, GDT, the PVH note.
 */
#include "guest.h"

#define PTE_P 0x1
#define PTE_RW 0x2
#define PTE_US 0x4
#define PTE_PWT 0x8
#define PTE_PCD 0x10
#define PTE_PS 0x80
#define PDE_RAM (PTE_P | PTE_RW | PTE_US | PTE_PS)
#define PDE_MMIO (PDE_RAM | PTE_PWT | PTE_PCD)
#define PT_LINK (PTE_P | PTE_RW | PTE_US)

/* ---- PVH ELF note: Xen's XEN_ELFNOTE_PHYS32_ENTRY (18), 32-bit address ---- */
    .section .note.pvh, "a"
    .p2align 2
    .long 4, 4, 18
    .asciz "Xen"
    .long pvh_entry32

/* ---- 32-bit entry, BSP: protected mode, paging off, EBX = start info ---- */
    .section .text.entry, "ax"
    .code32
    .globl pvh_entry32
pvh_entry32:
    cli
    lgdt gdt_desc
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %ebx, start_info_paddr
    xorl %esi, %esi /* esi = 0: bootstrap CPU */
    jmp enter_long_mode

/* APs arrive here from the real-mode trampoline, already in protected mode. */
ap_entry32:
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $1, %esi /* esi = 1: application processor */

enter_long_mode:
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0x620, %eax /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $0xC0000080, %ecx /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80010033, %eax /* CR0: PG | WP | NE | ET | MP | PE */
    movl %eax, %cr0
    ljmp $SEL_CODE64, $entry64

    .code64
entry64:
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    testl %esi, %esi
    jnz 1f
    movq $kernel_stacks + KSTACK_SIZE, %rsp
    call kernel_main_bsp
    jmp halt_forever
1:  movl $1, %eax
    lock xaddl %eax, ap_next_index /* each AP takes the next CPU index */
    cmpl $MAX_CPUS, %eax
    jae halt_forever
    movl %eax, %edi
    incl %eax
    imull $KSTACK_SIZE, %eax
    movq $kernel_stacks, %rsp
    addq %rax, %rsp
    call kernel_main_ap
halt_forever:
    cli
    hlt
    jmp halt_forever

/* ---- real-mode AP trampoline: copied to a free page below 1 MiB ----
 * A SIPI starts the AP at CS = page >> 4, IP = 0, so addresses inside are
 * offsets from the start; everything else is absolute. */
    .code16
    .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
    cli
    lgdtl %cs:(ap_gdt_desc - ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_CODE32, $ap_entry32
    .p2align 2
ap_gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:
    .code64

/* ---- ring 0 -> ring 3: enter_user(rip, rsp, arg), interrupts enabled ---- */
    .globl enter_user
enter_user:
    pushq $SEL_USER_DATA
    pushq %rsi
    pushq $0x202
    pushq $SEL_USER_CODE
    pushq %rdi
    movq %rdx, %rdi
    iretq

/* ---- interrupt stubs: push (error code, vector), save registers, call C ---- */
.macro ISR vector, has_error
isr_\vector:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vector
    jmp isr_common
.endm

.macro ISR_ENTRY vector
    .quad \vector, isr_\vector
.endm

    .p2align 4
isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    call interrupt_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

/* Exceptions 8, 10-14, 17, 21, 29 and 30 push an error code. */
    ISR 0, 0
    ISR 1, 0
    ISR 2, 0
    ISR 3, 0
    ISR 4, 0
    ISR 5, 0
    ISR 6, 0
    ISR 7, 0
    ISR 8, 1
    ISR 9, 0
    ISR 10, 1
    ISR 11, 1
    ISR 12, 1
    ISR 13, 1
    ISR 14, 1
    ISR 15, 0
    ISR 16, 0
    ISR 17, 1
    ISR 18, 0
    ISR 19, 0
    ISR 20, 0
    ISR 21, 1
    ISR 22, 0
    ISR 23, 0
    ISR 24, 0
    ISR 25, 0
    ISR 26, 0
    ISR 27, 0
    ISR 28, 0
    ISR 29, 1
    ISR 30, 1
    ISR 31, 0
    ISR TIMER_VECTOR, 0
    ISR SERIAL_VECTOR, 0
    ISR ACPI_EVENT_VECTOR, 0
    ISR ACPI_EVENT_VECTOR_2, 0
    ISR SYSCALL_VECTOR, 0
    ISR SPURIOUS_VECTOR, 0

    .section .rodata
    .p2align 3
    .globl isr_table, isr_table_end
isr_table: /* pairs of (vector, stub address) for kernel.c to install */
    ISR_ENTRY 0
    ISR_ENTRY 1
    ISR_ENTRY 2
    ISR_ENTRY 3
    ISR_ENTRY 4
    ISR_ENTRY 5
    ISR_ENTRY 6
    ISR_ENTRY 7
    ISR_ENTRY 8
    ISR_ENTRY 9
    ISR_ENTRY 10
    ISR_ENTRY 11
    ISR_ENTRY 12
    ISR_ENTRY 13
    ISR_ENTRY 14
    ISR_ENTRY 15
    ISR_ENTRY 16
    ISR_ENTRY 17
    ISR_ENTRY 18
    ISR_ENTRY 19
    ISR_ENTRY 20
    ISR_ENTRY 21
    ISR_ENTRY 22
    ISR_ENTRY 23
    ISR_ENTRY 24
    ISR_ENTRY 25
    ISR_ENTRY 26
    ISR_ENTRY 27
    ISR_ENTRY 28
    ISR_ENTRY 29
    ISR_ENTRY 30
    ISR_ENTRY 31
    ISR_ENTRY TIMER_VECTOR
    ISR_ENTRY SERIAL_VECTOR
    ISR_ENTRY ACPI_EVENT_VECTOR
    ISR_ENTRY ACPI_EVENT_VECTOR_2
    ISR_ENTRY SYSCALL_VECTOR
    ISR_ENTRY SPURIOUS_VECTOR
isr_table_end:

/* ---- vector register load/store for `fpu set` / `fpu check` (ring 3) ---- */
    .text
    .globl vec_load_ymm, vec_store_ymm, vec_load_xmm, vec_store_xmm
.macro FOR_EACH_VREG op
    \op 0
    \op 1
    \op 2
    \op 3
    \op 4
    \op 5
    \op 6
    \op 7
    \op 8
    \op 9
    \op 10
    \op 11
    \op 12
    \op 13
    \op 14
    \op 15
.endm
.macro LOAD_YMM r
    vmovdqu \r*32(%rdi), %ymm\r
.endm
.macro STORE_YMM r
    vmovdqu %ymm\r, \r*32(%rdi)
.endm
.macro LOAD_XMM r
    movdqu \r*32(%rdi), %xmm\r
.endm
.macro STORE_XMM r
    movdqu %xmm\r, \r*32(%rdi)
.endm
vec_load_ymm:
    FOR_EACH_VREG LOAD_YMM
    ret
vec_store_ymm:
    FOR_EACH_VREG STORE_YMM
    ret
vec_load_xmm:
    FOR_EACH_VREG LOAD_XMM
    ret
vec_store_xmm:
    FOR_EACH_VREG STORE_XMM
    ret

/* ---- GDT: 32-bit code, data, 64-bit code, user data, user code, TSSs ---- */
    .data
    .p2align 4
    .globl gdt
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF /* SEL_CODE32 */
    .quad 0x00CF92000000FFFF /* SEL_DATA */
    .quad 0x00AF9A000000FFFF /* SEL_CODE64 */
    .quad 0x00CFF2000000FFFF /* SEL_USER_DATA (DPL 3) */
    .quad 0x00AFFA000000FFFF /* SEL_USER_CODE (DPL 3) */
    .fill 2 * MAX_CPUS, 8, 0 /* TSS descriptors, written by kernel.c */
gdt_end:
    .p2align 3
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .p2align 2
    .globl ap_next_index
ap_next_index:
    .long 1 /* CPU index handed to the next AP; the BSP is 0 */

/* ---- boot page tables, built at link time ----
 * GiB 0 and GiB 3 (with the IOAPIC and LAPIC pages uncached) are mapped
 * here; ring 3 fills ram_pd for the rest of RAM and SYS_MAP_RAM links it. */
    .section .data.pagetables, "aw"
    .p2align 12
    .globl boot_pml4, boot_pdpt
boot_pml4:
    .quad boot_pdpt + PT_LINK
    .fill 511, 8, 0
boot_pdpt:
    .quad pd_gib0 + PT_LINK
    .quad 0, 0
    .quad pd_gib3 + PT_LINK
    .fill 508, 8, 0
pd_gib0:
    .set .Laddr, 0
    .rept 512
    .quad .Laddr | PDE_RAM
    .set .Laddr, .Laddr + 0x200000
    .endr
pd_gib3:
    .set .Laddr, 0xC0000000
    .rept 512
    .if .Laddr == IOAPIC_BASE || .Laddr == LAPIC_BASE
    .quad .Laddr | PDE_MMIO
    .else
    .quad .Laddr | PDE_RAM
    .endif
    .set .Laddr, .Laddr + 0x200000
    .endr

    .section .note.GNU-stack, "", @progbits
