/* Ring 0: interrupt handling, system calls and the few privileged set-up steps.
 *
 * Kept deliberately small: on PVM-backed KVM every ring-0 instruction goes
 * through the host's instruction emulator (~1e6 instructions/s), so the
 * work that does not need privilege (parsing tables, building page
 * directories, the command loop) lives in user.c and runs in ring 3.
 * Ring 0 always runs with interrupts disabled (interrupt gates only).
 */
#include "guest.h"

/* ---- state shared with ring 3 ---- */
u32 start_info_paddr;
volatile u64 fine_ticks;
volatile u64 tick_n;
volatile u32 tick_on;
volatile u64 acpi_events;
volatile u8 rx_buf[RX_SIZE];
volatile u32 rx_head;
volatile u32 rx_tail;
u32 bsp_apic_id;
u64 ram_pd[MAX_RAM_GIB][512] __attribute__((aligned(4096)));
u8 kernel_stacks[MAX_CPUS][KSTACK_SIZE] __attribute__((aligned(16)));

/* Saved by isr_common in entry.S, lowest address first. */
struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};

struct idt_gate {
    u16 offset_low;
    u16 selector;
    u8 ist;
    u8 type; /* 0x8E: interrupt gate, DPL 0; 0xEE: DPL 3 */
    u16 offset_mid;
    u32 offset_high;
    u32 reserved;
} __attribute__((packed));

struct tss {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct descriptor_pointer {
    u16 limit;
    u64 base;
} __attribute__((packed));

extern u64 gdt[];
extern const u64 isr_table[], isr_table_end[];

static struct idt_gate idt[256] __attribute__((aligned(16)));
static struct tss tss[MAX_CPUS] __attribute__((aligned(16)));

/* ---- port and MMIO access ---- */

static inline void outb(u16 port, u8 value)
{
    asm volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 value;
    asm volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

enum {
    LAPIC_ID = 0x20,
    LAPIC_EOI = 0xB0,
    LAPIC_SVR = 0xF0,
    LAPIC_ICR_LOW = 0x300,
    LAPIC_ICR_HIGH = 0x310,
    LAPIC_LVT_TIMER = 0x320,
    LAPIC_LVT_LINT0 = 0x350,
    LAPIC_TIMER_INIT = 0x380,
    LAPIC_TIMER_DIVIDE = 0x3E0,
};

static inline void lapic_write(u32 reg, u32 value)
{
    *(volatile u32 *)(u64)(LAPIC_BASE + reg) = value;
}

static inline u32 lapic_read(u32 reg)
{
    return *(volatile u32 *)(u64)(LAPIC_BASE + reg);
}

static void ioapic_write(u32 index, u32 value)
{
    *(volatile u32 *)(u64)IOAPIC_BASE = index;
    *(volatile u32 *)(u64)(IOAPIC_BASE + 0x10) = value;
}

/* ---- console ---- */

/* Interrupts are off in ring 0, so a line is never split on this CPU; the
 * lock only matters when an AP panics while the BSP prints. */
static volatile u32 console_lock;

static void console_write(const char *s, u64 len)
{
    while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
        ;
    for (u64 i = 0; i < len; i++) {
        while (!(inb(COM1 + 5) & 0x20)) /* LSR.THRE */
            ;
        outb(COM1, (u8)s[i]);
    }
    __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

static void serial_drain(void)
{
    u32 head = rx_head;
    while (inb(COM1 + 5) & 0x01) { /* LSR.DR */
        u8 c = inb(COM1);
        if (head - rx_tail < RX_SIZE) /* full: drop rather than overwrite */
            rx_buf[head++ & (RX_SIZE - 1)] = c;
    }
    rx_head = head;
}

static void __attribute__((noreturn)) panic(const struct frame *f)
{
    char line[160], *p = line;
    u64 cr2;
    asm volatile("mov %%cr2, %0" : "=r"(cr2));
    p = put_str(p, "PANIC vector=");
    p = put_dec(p, f->vector);
    p = put_str(p, " rip=");
    p = put_hex(p, f->rip);
    p = put_str(p, " error=");
    p = put_hex(p, f->error);
    p = put_str(p, " cr2=");
    p = put_hex(p, cr2);
    p = put_str(p, " cs=");
    p = put_hex(p, f->cs);
    p = put_str(p, " rsp=");
    p = put_hex(p, f->rsp);
    *p++ = '\n';
    console_write(line, (u64)(p - line));
    for (;;)
        asm volatile("cli; hlt");
}

/* ---- time ---- */

/* KVM's paravirtual clock (pvclock ABI): nanoseconds since the host set it up.
 * TICK numbers follow it rather than counting timer interrupts, because
 * interrupts of a periodic LAPIC timer coalesce while the vCPU thread waits
 * for a host CPU, which would make n fall behind. */
struct pvclock {
    volatile u32 version; /* odd while the host updates the rest */
    u32 pad0;
    volatile u64 tsc_timestamp;
    volatile u64 system_time;
    volatile u32 tsc_to_system_mul;
    volatile signed char tsc_shift;
    u8 flags;
    u8 pad[2];
} __attribute__((packed, aligned(32)));

static struct pvclock bsp_clock;
static int have_clock;
static u64 boot_ns;

#define NS_PER_TICK 100000000UL /* 100 ms */

static inline u64 rdtsc(void)
{
    u32 low, high;
    asm volatile("rdtsc" : "=a"(low), "=d"(high));
    return (u64)high << 32 | low;
}

static u64 clock_ns(void)
{
    u32 version;
    u64 ns;
    do {
        version = bsp_clock.version;
        asm volatile("" ::: "memory");
        u64 delta = rdtsc() - bsp_clock.tsc_timestamp;
        signed char shift = bsp_clock.tsc_shift;
        delta = shift >= 0 ? delta << shift : delta >> -shift;
        ns = bsp_clock.system_time +
             (u64)(((unsigned __int128)delta * bsp_clock.tsc_to_system_mul) >> 32);
        asm volatile("" ::: "memory");
    } while ((version & 1) || version != bsp_clock.version);
    return ns;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    asm volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static void start_clock(void)
{
    for (u32 base = 0x40000000; base < 0x40001000; base += 0x100) {
        u32 a, b, c, d;
        cpuid(base, &a, &b, &c, &d);
        if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d) /* "KVMKVMKVM" */
            continue;
        cpuid(base + 1, &a, &b, &c, &d);
        u32 msr = (a & (1u << 3)) ? 0x4b564d01 : (a & 1) ? 0x12 : 0;
        if (!msr)
            return;
        u64 value = (u64)&bsp_clock | 1; /* enable */
        asm volatile("wrmsr" : : "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)));
        have_clock = 1;
        boot_ns = clock_ns();
        return;
    }
}

/* ---- interrupts ---- */

static void timer_interrupt(void)
{
    fine_ticks++;
    u64 due = fine_ticks / 10;
    if (have_clock) {
        i64 since_boot = (i64)(clock_ns() - boot_ns);
        due = since_boot > 0 ? (u64)since_boot / NS_PER_TICK : tick_n;
    }
    if (due > tick_n + 50)
        tick_n = due - 1; /* after a long stop, do not flood the console */
    while (tick_n < due) {
        tick_n++;
        if (tick_on) {
            char line[32], *p = put_str(line, "TICK ");
            p = put_dec(p, tick_n);
            *p++ = '\n';
            console_write(line, (u64)(p - line));
        }
    }
    serial_drain(); /* safety net in case an edge of IRQ 4 was missed */
}

static void __attribute__((noreturn)) reset(void)
{
    static const struct descriptor_pointer no_idt = { 0, 0 };
    outb(0x64, 0xFE); /* i8042 pulse reset line */
    /* No i8042 (QEMU microvm): an exception with an empty IDT triple-faults. */
    asm volatile("lidt %0; ud2" : : "m"(no_idt));
    __builtin_unreachable();
}

static void system_call(struct frame *f)
{
    u64 result = 0;
    switch (f->rax) {
    case SYS_WRITE:
        console_write((const char *)f->rdi, f->rsi);
        break;
    case SYS_MAP_RAM: {
        u64 gib = f->rdi < MAX_RAM_GIB ? f->rdi : MAX_RAM_GIB;
        for (u64 g = 1; g < gib; g++)
            if (g != 3) /* GiB 3 is mapped statically (APIC pages) */
                boot_pdpt[g] = (u64)ram_pd[g] | 0x7;
        u64 cr3;
        asm volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
        break;
    }
    case SYS_START_AP: {
        u32 sipi = 0x4600 | (u32)(f->rsi >> 12); /* start-up, vector = page */
        lapic_write(LAPIC_ICR_HIGH, (u32)f->rdi << 24);
        lapic_write(LAPIC_ICR_LOW, 0x4500); /* INIT, assert */
        lapic_write(LAPIC_ICR_HIGH, (u32)f->rdi << 24);
        lapic_write(LAPIC_ICR_LOW, sipi);
        lapic_write(LAPIC_ICR_HIGH, (u32)f->rdi << 24);
        lapic_write(LAPIC_ICR_LOW, sipi); /* ignored if the first one worked */
        break;
    }
    case SYS_ROUTE_EVENT: /* edge, active high, fixed, to the BSP */
        if (f->rdi < 24 && f->rsi < ACPI_EVENT_VECTORS) {
            ioapic_write(0x10 + 2 * (u32)f->rdi + 1, bsp_apic_id << 24);
            ioapic_write(0x10 + 2 * (u32)f->rdi, ACPI_EVENT_VECTOR + (u32)f->rsi);
        } else {
            result = (u64)-1;
        }
        break;
    case SYS_RESET:
        reset();
    default:
        result = (u64)-1;
    }
    f->rax = result;
}

void interrupt_dispatch(struct frame *f)
{
    switch (f->vector) {
    case TIMER_VECTOR:
        timer_interrupt();
        lapic_write(LAPIC_EOI, 0);
        return;
    case SERIAL_VECTOR:
        serial_drain();
        lapic_write(LAPIC_EOI, 0);
        return;
    case ACPI_EVENT_VECTOR:
    case ACPI_EVENT_VECTOR_2:
        acpi_events++;
        lapic_write(LAPIC_EOI, 0);
        return;
    case SYSCALL_VECTOR: /* real hardware: int 0x80 arrives here */
        system_call(f);
        return;
    case SPURIOUS_VECTOR: /* no EOI for spurious interrupts */
        return;
    case 6:
        /* PVM delivers `int n` from ring 3 as #UD at the instruction. */
        if ((f->cs & 3) == 3 && *(const u16 *)f->rip == 0x80CD) {
            f->rip += 2;
            system_call(f);
            return;
        }
    }
    panic(f);
}

/* ---- CPU set-up ---- */

static void install_idt(void)
{
    for (const u64 *e = isr_table; e < isr_table_end; e += 2) {
        struct idt_gate *g = &idt[e[0]];
        g->offset_low = (u16)e[1];
        g->selector = SEL_CODE64;
        g->type = e[0] == SYSCALL_VECTOR ? 0xEE : 0x8E;
        g->offset_mid = (u16)(e[1] >> 16);
        g->offset_high = (u32)(e[1] >> 32);
    }
}

static void init_cpu(u32 cpu)
{
    struct descriptor_pointer idtr = { sizeof(idt) - 1, (u64)idt };
    asm volatile("lidt %0" : : "m"(idtr));

    /* TSS: RSP0 is where interrupts from ring 3 switch stacks. */
    struct tss *t = &tss[cpu];
    u64 base = (u64)t, limit = sizeof(*t) - 1;
    t->rsp0 = (u64)kernel_stacks[cpu] + KSTACK_SIZE;
    t->iomap_base = sizeof(*t);
    gdt[6 + 2 * cpu] = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x89UL << 40 |
                       ((base >> 24) & 0xFF) << 56;
    gdt[7 + 2 * cpu] = base >> 32;
    asm volatile("ltr %w0" : : "r"(SEL_TSS0 + 16 * cpu));

    /* SSE is already on (CR4.OSFXSR); add AVX state if the CPU has it. */
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (c & (1u << 26)) { /* XSAVE */
        u64 cr4;
        asm volatile("mov %%cr4, %0" : "=r"(cr4));
        asm volatile("mov %0, %%cr4" : : "r"(cr4 | (1UL << 18))); /* OSXSAVE */
        u32 xcr0 = (c & (1u << 28)) ? 7 : 3; /* x87 | SSE | AVX */
        asm volatile("xsetbv" : : "c"(0), "a"(xcr0), "d"(0));
    }
}

static void init_platform(void)
{
    /* Mask both 8259s: every interrupt goes through the APICs. */
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);

    bsp_apic_id = lapic_read(LAPIC_ID) >> 24;
    start_clock();
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR); /* software-enable */
    lapic_write(LAPIC_LVT_LINT0, 0x10000); /* masked: no ExtINT from the PIC */
    /* KVM's LAPIC timer counts at 1 GHz: divide by 1, 1e7 counts = 10 ms. */
    lapic_write(LAPIC_TIMER_DIVIDE, 0xB);
    lapic_write(LAPIC_LVT_TIMER, 0x20000 | TIMER_VECTOR); /* periodic */
    lapic_write(LAPIC_TIMER_INIT, 10000000);

    /* Serial IRQ 4: IOAPIC pin 4, edge, active high, fixed, to the BSP. */
    ioapic_write(0x10 + 2 * SERIAL_IRQ + 1, bsp_apic_id << 24);
    ioapic_write(0x10 + 2 * SERIAL_IRQ, SERIAL_VECTOR);

    outb(COM1 + 3, 0x03); /* LCR: 8N1, DLAB off */
    outb(COM1 + 2, 0x07); /* FCR: FIFOs on and cleared, trigger at 1 byte */
    outb(COM1 + 4, 0x0B); /* MCR: OUT2 (IRQ enable) | RTS | DTR */
    outb(COM1 + 1, 0x01); /* IER: received data available */
}

void __attribute__((noreturn)) kernel_main_bsp(void)
{
    install_idt();
    init_cpu(0);
    init_platform();
    enter_user((u64)user_main_bsp, (u64)user_stacks[0] + USTACK_SIZE, 0);
}

void __attribute__((noreturn)) kernel_main_ap(u32 cpu)
{
    init_cpu(cpu);
    enter_user((u64)user_main_ap, (u64)user_stacks[cpu] + USTACK_SIZE, cpu);
}
