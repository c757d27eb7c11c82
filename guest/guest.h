/* Shared definitions of the Ember test guest.
 *
 * The guest is one image: ring-0 code (kernel.c, entry.S) and ring-3 code
 * (user.c) share memory directly, because every page is mapped user-accessible.
 * Ring 0 only does what needs privilege; everything else runs in ring 3,
 * where it is fast on hosts that emulate ring 0.
 */
#ifndef GUEST_H
#define GUEST_H

#define MAX_CPUS 64
#define KSTACK_SIZE 8192 /* per-CPU ring-0 stack (interrupts, system calls) */
#define USTACK_SIZE 16384 /* per-CPU ring-3 stack */
#define MAX_RAM_GIB 64 /* identity map covers at most this much address space */
#define RX_SIZE 4096 /* serial receive ring, a power of two */

#define TIMER_VECTOR 0x20
#define SERIAL_VECTOR 0x24
/* GSIs of the ACPI Generic Event Device, each on its own vector (0x25, 0x26)
 * so two edges raised together are not merged in the LAPIC's IRR. */
#define ACPI_EVENT_VECTOR 0x25
#define ACPI_EVENT_VECTOR_2 0x26
#define ACPI_EVENT_VECTORS 2
#define SYSCALL_VECTOR 0x80
#define SPURIOUS_VECTOR 0xFF

#define LAPIC_BASE 0xFEE00000
#define IOAPIC_BASE 0xFEC00000
#define COM1 0x3F8
#define SERIAL_IRQ 4

/* GDT selectors (entry.S lays the GDT out in this order). */
#define SEL_CODE32 0x08
#define SEL_DATA 0x10
#define SEL_CODE64 0x18
#define SEL_USER_DATA 0x23
#define SEL_USER_CODE 0x2B
#define SEL_TSS0 0x30 /* TSS of CPU i is at SEL_TSS0 + 16 * i */
#define GDT_ENTRIES (6 + 2 * MAX_CPUS)

#ifndef __ASSEMBLER__

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

/* System calls: `int $0x80`, number in rax, arguments in rdi, rsi, rdx. */
enum {
    SYS_WRITE = 1, /* (buf, len): one line, never interleaved with others */
    SYS_MAP_RAM = 2, /* (gib): link ram_pd[1..gib) into the PDPT */
    SYS_START_AP = 3, /* (apic_id, trampoline page): INIT, SIPI, SIPI */
    SYS_RESET = 4, /* (): i8042 reset, then triple fault */
    SYS_ROUTE_EVENT = 5, /* (gsi, i): IOAPIC pin gsi -> ACPI_EVENT_VECTOR + i */
};

struct hvm_start_info {
    u32 magic; /* 0x336ec578 */
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr; /* version >= 1 */
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type; /* 1 = RAM */
    u32 reserved;
};

#define HVM_START_MAGIC 0x336ec578

/* --- state shared by ring 0 and ring 3 (kernel.c owns it) --- */
extern u32 start_info_paddr; /* EBX at the PVH entry, stored by entry.S */
extern volatile u64 fine_ticks; /* timer interrupts (10 ms) since boot */
extern volatile u64 tick_n; /* 100 ms ticks since boot, never reset */
extern volatile u32 tick_on; /* print TICK lines from the timer */
extern volatile u64 acpi_events; /* interrupts on ACPI_EVENT_VECTOR */
extern volatile u8 rx_buf[RX_SIZE]; /* serial input, filled by ring 0 */
extern volatile u32 rx_head; /* written by ring 0 only */
extern volatile u32 rx_tail; /* written by ring 3 only */
extern u32 bsp_apic_id;
extern u64 ram_pd[MAX_RAM_GIB][512]; /* page directories above 1 GiB */

/* --- entry.S --- */
extern u64 boot_pml4[512], boot_pdpt[512];
extern char ap_trampoline_start[], ap_trampoline_end[];
extern char image_end[];
void enter_user(u64 rip, u64 rsp, u64 arg) __attribute__((noreturn));
void vec_load_ymm(const void *buf); /* 16 x 32 bytes into ymm0..15 */
void vec_store_ymm(void *buf);
void vec_load_xmm(const void *buf); /* 16 x 32 bytes, low 16 of each into xmm */
void vec_store_xmm(void *buf);

/* --- user.c --- */
void user_main_bsp(void) __attribute__((noreturn));
void user_main_ap(u64 cpu) __attribute__((noreturn));
extern u8 user_stacks[MAX_CPUS][USTACK_SIZE];

/* --- user.c, for acpi.c --- */
int is_mapped(u64 addr, u64 len); /* inside the identity map */
const u8 *find_rsdp(void); /* start info, EBDA or 0xE0000-0xFFFFF; 0 if none */

/* --- acpi.c --- */
void genid_line(char *out); /* "GENID <hex> <n>" or "ERR ..."; 96 bytes */
u32 route_acpi_events(void); /* route the event device's GSIs; how many */

/* --- lib.c --- */
void *memcpy(void *dst, const void *src, u64 n);
void *memset(void *dst, int c, u64 n);
int memcmp(const void *a, const void *b, u64 n);
u64 str_len(const char *s);
char *put_str(char *p, const char *s);
char *put_dec(char *p, u64 v);
char *put_hex(char *p, u64 v); /* "0x" followed by lowercase hex digits */

static inline u64 mix64(u64 z)
{
    /* splitmix64's output function: a cheap, well-spread 64-bit hash */
    z += 0x9e3779b97f4a7c15UL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
    return z ^ (z >> 31);
}

#endif /* __ASSEMBLER__ */
#endif /* GUEST_H */
