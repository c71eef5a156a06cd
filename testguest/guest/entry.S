/*
 * PVH entry of the test guest: the VMM starts us in 32-bit protected mode,
 * paging off, %ebx pointing at hvm_start_info. We identity-map the first
 * 4 GiB with 2 MiB pages, enter long mode, and call guest_main in C.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18

    .section .note.Xen, "a"
    .balign 4
    .long 4                        /* name size: "Xen\0" */
    .long 4                        /* descriptor size */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .long pvh_entry
    .balign 4

    .section .text.entry, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    cli
    movl $boot_stack_top, %esp
    movl %ebx, start_info_paddr

    /* Page directories: 2048 entries of 2 MiB pages cover 0..4 GiB. */
    movl $page_directories, %edi
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                /* present | writable | 2 MiB page */
    movl %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 1b

    /* PDPT: four entries, one per page directory; the rest empty. */
    movl $pdpt, %edi
    xorl %ecx, %ecx
2:  xorl %eax, %eax
    cmpl $4, %ecx
    jae 3f
    movl %ecx, %eax
    shll $12, %eax
    addl $page_directories, %eax
    orl $0x3, %eax
3:  movl %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jb 2b

    /* PML4: one entry. */
    movl $pml4, %edi
    xorl %ecx, %ecx
4:  movl $0, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jb 4b
    movl $pdpt, %eax
    orl $0x3, %eax
    movl %eax, (%edi)

    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                /* PAE */
    movl %eax, %cr4
    movl $0xC0000080, %ecx         /* EFER */
    rdmsr
    orl $0x100, %eax               /* long mode enable */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax          /* paging | protected mode */
    movl %eax, %cr0
    lgdt gdt_pointer
    ljmp $0x08, $long_mode_entry

    .code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    movl start_info_paddr(%rip), %edi
    call guest_main
5:  cli
    hlt
    jmp 5b

/* Interrupt entry points. */
    .globl timer_interrupt
timer_interrupt:
    pushq %rax
    lock incq timer_ticks(%rip)
    movl $0xfee000b0, %eax         /* local APIC end-of-interrupt */
    movl $0, (%rax)
    popq %rax
    iretq

    .globl spurious_interrupt
spurious_interrupt:
    iretq

/* One stub per CPU exception, so the fault handler knows which one it was. */
    .globl exception_stubs
    .balign 16
exception_stubs:
    .set vector, 0
    .rept 32
    .balign 16
    movl $vector, %edi
    jmp exception_common
    .set vector, vector + 1
    .endr

exception_common:
    andq $-16, %rsp
    call guest_fault
6:  cli
    hlt
    jmp 6b

    .section .data
    .balign 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF       /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF       /* 0x10: data */
gdt_end:
gdt_pointer:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl start_info_paddr
start_info_paddr:
    .long 0

    .section .bss
    .balign 4096
    .globl pml4
pml4:
    .skip 4096
pdpt:
    .skip 4096
page_directories:
    .skip 4096 * 4
boot_stack:
    .skip 16384
boot_stack_top:

    .section .note.GNU-stack, "", @progbits
