/* Ring 3: platform discovery, bringing up the other CPUs, and the console
 * command loop. Everything here runs natively even where ring 0 is emulated.
 * All memory is mapped user-accessible, so ring 3 reads the start info,
 * the firmware tables and ring 0's counters directly.
 */
#include "guest.h"

#define MIB (1UL << 20)
#define GIB (1UL << 30)
#define FILL_FLOOR (16 * MIB) /* fill/check never go below this address */

u8 user_stacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(16)));

static inline u64 syscall2(u64 number, u64 a, u64 b)
{
    u64 result;
    asm volatile("int $0x80" : "=a"(result) : "a"(number), "D"(a), "S"(b) : "memory");
    return result;
}

static inline void cpu_relax(void)
{
    asm volatile("pause" ::: "memory");
}

/* Print one line; the system call writes it whole, so lines never mix. */
static void say(const char *s)
{
    char line[128];
    u64 len = 0;
    while (s[len] && len < sizeof(line) - 1) {
        line[len] = s[len];
        len++;
    }
    line[len++] = '\n';
    syscall2(SYS_WRITE, (u64)line, len);
}

/* ---- memory map ---- */

struct range {
    u64 start, end;
};

#define MAX_RANGES 128
static struct range ram[MAX_RANGES]; /* type-1 memmap entries, sorted */
static u32 ram_count;
static u64 mem_mib;
static u64 mapped_end; /* identity map covers [0, mapped_end) and GiB 3 */

static void add_ram(u64 start, u64 end)
{
    if (end <= start || ram_count == MAX_RANGES)
        return;
    u32 i = ram_count++;
    for (; i > 0 && ram[i - 1].start > start; i--)
        ram[i] = ram[i - 1];
    ram[i].start = start;
    ram[i].end = end;
}

/* A pointer to a fixed physical address (identity mapped). The empty asm
 * keeps gcc from treating small constant addresses as null-pointer bugs. */
static inline const void *phys(u64 addr)
{
    asm("" : "+r"(addr));
    return (const void *)addr;
}

static const struct hvm_start_info *start_info(void)
{
    return (const struct hvm_start_info *)(u64)start_info_paddr;
}

static void read_memmap(void)
{
    const struct hvm_start_info *si = start_info();
    u64 total = 0;
    if (si->magic == HVM_START_MAGIC && si->version >= 1 && si->memmap_entries) {
        const struct hvm_memmap_entry *e =
            (const struct hvm_memmap_entry *)si->memmap_paddr;
        for (u32 i = 0; i < si->memmap_entries; i++)
            if (e[i].type == 1)
                add_ram(e[i].addr, e[i].addr + e[i].size);
    } else {
        /* No memory map: assume only the minimum a PC must have. */
        say("WARN no memory map in hvm_start_info; assuming 64 MiB");
        add_ram(0, 0x9FC00);
        add_ram(MIB, 64 * MIB);
    }
    for (u32 i = 0; i < ram_count; i++)
        total += ram[i].end - ram[i].start;
    mem_mib = (total + MIB - 1) / MIB;
}

/* Identity-map all RAM with 2 MiB pages: ring 3 writes the page directories
 * (fast here), ring 0 only links them into the PDPT. */
static void map_ram(void)
{
    u64 top = ram_count ? ram[ram_count - 1].end : 0;
    u64 gib = (top + GIB - 1) / GIB;
    if (gib > MAX_RAM_GIB)
        gib = MAX_RAM_GIB;
    for (u64 g = 1; g < gib; g++) {
        if (g == 3)
            continue; /* mapped statically in entry.S */
        for (u64 i = 0; i < 512; i++)
            ram_pd[g][i] = (g * GIB + i * (2 * MIB)) | 0x87; /* P RW US PS */
    }
    if (gib > 1)
        syscall2(SYS_MAP_RAM, gib, 0);
    mapped_end = (gib > 1 ? gib : 1) * GIB;
}

int is_mapped(u64 addr, u64 len)
{
    u64 end = addr + len;
    if (end < addr)
        return 0;
    return end <= mapped_end || (addr >= 3 * GIB && end <= 4 * GIB);
}

/* ---- CPU discovery: ACPI MADT first, Intel MP table second ---- */

static u32 apic_ids[MAX_CPUS];
static u32 cpu_count;

static void add_cpu(u32 apic_id)
{
    for (u32 i = 0; i < cpu_count; i++)
        if (apic_ids[i] == apic_id)
            return;
    if (cpu_count < MAX_CPUS)
        apic_ids[cpu_count++] = apic_id;
}

static int checksum_ok(const u8 *p, u64 len)
{
    u8 sum = 0;
    while (len--)
        sum = (u8)(sum + *p++);
    return sum == 0;
}

static const u8 *scan(u64 start, u64 end, const char *sig, u64 sig_len, u64 sum_len)
{
    for (u64 a = start; a + sum_len <= end; a += 16) {
        const u8 *p = (const u8 *)a;
        if (!memcmp(p, sig, sig_len) && checksum_ok(p, sum_len))
            return p;
    }
    return 0;
}

static u64 ebda_base(void)
{
    u64 ebda = (u64)*(const u16 *)phys(0x40E) << 4; /* BIOS data area */
    return ebda >= 0x80000 && ebda < 0xA0000 ? ebda : 0;
}

const u8 *find_rsdp(void)
{
    const struct hvm_start_info *si = start_info();
    const u8 *p = 0;
    if (si->magic == HVM_START_MAGIC && si->rsdp_paddr && is_mapped(si->rsdp_paddr, 36))
        return (const u8 *)si->rsdp_paddr;
    if (ebda_base())
        p = scan(ebda_base(), ebda_base() + 1024, "RSD PTR ", 8, 20);
    return p ? p : scan(0xE0000, 0x100000, "RSD PTR ", 8, 20);
}

static void parse_madt(const u8 *madt)
{
    u32 len = *(const u32 *)(madt + 4);
    for (u32 off = 44; off + 2 <= len;) {
        const u8 *e = madt + off;
        if (e[1] < 2)
            break;
        if (e[0] == 0 && (*(const u32 *)(e + 4) & 1)) /* local APIC, enabled */
            add_cpu(e[3]);
        off += e[1];
    }
}

static int cpus_from_acpi(void)
{
    const u8 *rsdp = find_rsdp();
    if (!rsdp || memcmp(rsdp, "RSD PTR ", 8))
        return 0;
    u64 root = *(const u32 *)(rsdp + 16);
    u64 entry_size = 4;
    if (rsdp[15] >= 2 && *(const u64 *)(rsdp + 24)) {
        root = *(const u64 *)(rsdp + 24); /* XSDT */
        entry_size = 8;
    }
    if (!root || !is_mapped(root, 36))
        return 0;
    const u8 *sdt = (const u8 *)root;
    u32 len = *(const u32 *)(sdt + 4);
    if (!is_mapped(root, len))
        return 0;
    for (u32 off = 36; off + entry_size <= len; off += (u32)entry_size) {
        u64 table = entry_size == 8 ? *(const u64 *)(sdt + off) : *(const u32 *)(sdt + off);
        if (!is_mapped(table, 36) || memcmp((const void *)table, "APIC", 4))
            continue;
        if (!is_mapped(table, *(const u32 *)(table + 4)))
            continue;
        parse_madt((const u8 *)table);
        return cpu_count > 0;
    }
    return 0;
}

static int cpus_from_mp_table(void)
{
    const u8 *fp = 0;
    if (ebda_base())
        fp = scan(ebda_base(), ebda_base() + 1024, "_MP_", 4, 16);
    if (!fp)
        fp = scan(0x9FC00, 0xA0000, "_MP_", 4, 16);
    if (!fp)
        fp = scan(0xF0000, 0x100000, "_MP_", 4, 16);
    if (!fp)
        return 0;
    u64 table = *(const u32 *)(fp + 4);
    if (!table || !is_mapped(table, 44) || memcmp((const void *)table, "PCMP", 4))
        return 0;
    const u8 *t = (const u8 *)table;
    /* Walk by the base table length, not the entry count: some firmware
     * (qboot) leaves the count at 0. */
    const u8 *e = t + 44, *end = t + *(const u16 *)(t + 4);
    while (e < end) {
        if (e[0] == 0) { /* processor: APIC id, flags bit 0 = enabled */
            if (e[3] & 1)
                add_cpu(e[1]);
            e += 20;
        } else if (e[0] <= 4) {
            e += 8;
        } else {
            break;
        }
    }
    return cpu_count > 0;
}

/* ---- fill / check ---- */

static u64 fill_start(void)
{
    u64 end = ((u64)image_end + MIB - 1) & ~(MIB - 1);
    return end > FILL_FLOOR ? end : FILL_FLOOR;
}

/* The i-th piece of fillable RAM: RAM above fill_start() and inside the map. */
static int fill_piece(u32 i, u64 *start, u64 *end)
{
    u64 s = ram[i].start > fill_start() ? ram[i].start : fill_start();
    u64 e = ram[i].end < mapped_end ? ram[i].end : mapped_end;
    if (ram[i].start >= 3 * GIB && ram[i].end <= 4 * GIB)
        e = ram[i].end; /* GiB 3 is always mapped */
    s = (s + 7) & ~7UL;
    e &= ~7UL;
    *start = s;
    *end = e;
    return s < e;
}

static u64 fillable_bytes(void)
{
    u64 total = 0, s, e;
    for (u32 i = 0; i < ram_count; i++)
        if (fill_piece(i, &s, &e))
            total += e - s;
    return total;
}

/* Fill (or check) `len` bytes of fillable RAM, starting `offset` bytes into
 * it, in address order. Returns the first mismatching address when
 * checking, else 0. */
static u64 fill_or_check(u64 seed, u64 offset, u64 len, int check)
{
    u64 s, e;
    for (u32 i = 0; i < ram_count && len; i++) {
        if (!fill_piece(i, &s, &e))
            continue;
        if (offset >= e - s) {
            offset -= e - s;
            continue;
        }
        s += offset;
        offset = 0;
        if (e - s > len)
            e = s + len;
        len -= e - s;
        volatile u64 *w = (volatile u64 *)s;
        if (check) {
            for (u64 a = s; a < e; a += 8, w++)
                if (*w != mix64(seed ^ a))
                    return a;
        } else {
            for (u64 a = s; a < e; a += 8, w++)
                *w = mix64(seed ^ a);
        }
    }
    return 0;
}

/* ---- jobs run on every CPU: per-CPU counters and a shared job word ---- */

struct cpu_slot {
    volatile u64 counter; /* advanced by the CPU's ring-3 loop */
    volatile u64 online;
    volatile u64 worker; /* this CPU's share of the current job */
    volatile u64 ack_seq; /* last job done */
    volatile u64 result; /* 0 = fine, else a failure (first bad address) */
} __attribute__((aligned(64)));

static struct cpu_slot cpus[MAX_CPUS];
static volatile u64 aps_online;

enum { JOB_FPU_SET = 1, JOB_FPU_CHECK, JOB_FILL, JOB_CHECK };

static struct {
    volatile u64 seq; /* bumped last, after the fields below */
    volatile u64 op;
    volatile u64 seed;
    volatile u64 bytes; /* fill/check: total, split evenly by page */
    volatile u64 workers;
} __attribute__((aligned(64))) job;

static int use_ymm;

static void fpu_values(u64 seed, u64 cpu, u64 out[64])
{
    for (u64 i = 0; i < 64; i++) /* 16 registers x 4 lanes */
        out[i] = mix64(seed ^ mix64(cpu << 32 | i));
}

static void fpu_set(u64 seed, u64 cpu)
{
    u64 values[64];
    fpu_values(seed, cpu, values);
    if (use_ymm)
        vec_load_ymm(values);
    else
        vec_load_xmm(values);
}

static int fpu_matches(u64 seed, u64 cpu)
{
    u64 want[64], got[64];
    if (use_ymm)
        vec_store_ymm(got);
    else
        vec_store_xmm(got);
    fpu_values(seed, cpu, want);
    for (u64 i = 0; i < 64; i++)
        if ((use_ymm || (i & 3) < 2) && got[i] != want[i])
            return 0;
    return 1;
}

static u64 run_job(u64 cpu, u64 worker)
{
    u64 op = job.op, seed = job.seed, pages = job.bytes / 4096;
    u64 first = pages * worker / job.workers, last = pages * (worker + 1) / job.workers;
    switch (op) {
    case JOB_FPU_SET:
        fpu_set(seed, cpu);
        return 0;
    case JOB_FPU_CHECK:
        return !fpu_matches(seed, cpu);
    default:
        return fill_or_check(seed, first * 4096, (last - first) * 4096, op == JOB_CHECK);
    }
}

void __attribute__((noreturn)) user_main_ap(u64 cpu)
{
    struct cpu_slot *me = &cpus[cpu];
    u64 seen = job.seq;
    me->ack_seq = seen;
    me->online = 1;
    __atomic_add_fetch(&aps_online, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        me->counter++;
        u64 seq = __atomic_load_n(&job.seq, __ATOMIC_ACQUIRE);
        if (seq != seen) {
            seen = seq;
            me->result = run_job(cpu, me->worker);
            __atomic_store_n(&me->ack_seq, seq, __ATOMIC_RELEASE);
        }
    }
}

/* Run a job on every online CPU (the BSP takes share 0) and combine the
 * results: 0 if all succeeded, else the lowest failure value. APs that do
 * not answer within `timeout_ticks` count as failed (result 1). */
static u64 run_everywhere(u64 op, u64 seed, u64 bytes, u64 timeout_ticks)
{
    u64 workers = 1;
    for (u32 cpu = 1; cpu < MAX_CPUS; cpu++)
        if (cpus[cpu].online)
            cpus[cpu].worker = workers++;
    job.op = op;
    job.seed = seed;
    job.bytes = bytes;
    job.workers = workers;
    u64 seq = job.seq + 1;
    __atomic_store_n(&job.seq, seq, __ATOMIC_RELEASE);

    u64 combined = run_job(0, 0);
    u64 deadline = fine_ticks + timeout_ticks;
    for (u32 cpu = 1; cpu < MAX_CPUS; cpu++) {
        if (!cpus[cpu].online)
            continue;
        while (__atomic_load_n(&cpus[cpu].ack_seq, __ATOMIC_ACQUIRE) != seq &&
               fine_ticks < deadline)
            cpu_relax();
        u64 r = cpus[cpu].ack_seq == seq ? cpus[cpu].result : 1;
        if (r && (!combined || r < combined))
            combined = r;
    }
    return combined;
}

/* ---- starting the APs ---- */

static int overlaps(u64 a, u64 a_len, u64 b, u64 b_len)
{
    return a < b + b_len && b < a + a_len;
}

static int is_ram(u64 start, u64 end)
{
    for (u32 i = 0; i < ram_count; i++)
        if (ram[i].start <= start && end <= ram[i].end)
            return 1;
    return 0;
}

/* A page below 1 MiB for the real-mode trampoline that is RAM and holds
 * nothing the loader handed us. */
static u64 trampoline_page(void)
{
    const struct hvm_start_info *si = start_info();
    for (u64 page = 0x1000; page < 0x9F000; page += 0x1000) {
        if (!is_ram(page, page + 0x1000) || overlaps(page, 0x1000, (u64)si, 64))
            continue;
        if (si->version >= 1 &&
            overlaps(page, 0x1000, si->memmap_paddr, si->memmap_entries * 24UL))
            continue;
        if (si->cmdline_paddr &&
            overlaps(page, 0x1000, si->cmdline_paddr,
                     str_len((const char *)si->cmdline_paddr) + 1))
            continue;
        if (si->nr_modules) {
            const u64 *mod = (const u64 *)si->modlist_paddr; /* paddr, size, cmdline, _ */
            int used = overlaps(page, 0x1000, si->modlist_paddr, si->nr_modules * 32UL);
            for (u32 i = 0; i < si->nr_modules && !used; i++)
                used = overlaps(page, 0x1000, mod[4 * i], mod[4 * i + 1]);
            if (used)
                continue;
        }
        return page;
    }
    return 0;
}

static void start_aps(void)
{
    u32 expected = 0;
    u64 page = trampoline_page();
    if (!page) {
        say("WARN no free page below 1 MiB for the AP trampoline");
        return;
    }
    memcpy((void *)page, ap_trampoline_start,
           (u64)(ap_trampoline_end - ap_trampoline_start));
    for (u32 i = 0; i < cpu_count; i++) {
        if (apic_ids[i] == bsp_apic_id)
            continue;
        syscall2(SYS_START_AP, apic_ids[i], page);
        expected++;
    }
    u64 deadline = fine_ticks + 200; /* 2 s */
    while (aps_online < expected && fine_ticks < deadline)
        cpu_relax();
    if (aps_online < expected) {
        char line[96], *p = put_str(line, "WARN only ");
        p = put_dec(p, aps_online);
        p = put_str(p, " of ");
        p = put_dec(p, expected);
        p = put_str(p, " APs started");
        *p = 0;
        say(line);
    }
}

/* ---- command parsing ---- */

static int parse_u64(const char *s, u64 *out)
{
    u64 v = 0, base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    if (!*s)
        return 0;
    for (; *s; s++) {
        u64 d;
        if (*s >= '0' && *s <= '9')
            d = (u64)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (u64)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = (u64)(*s - 'A' + 10);
        else
            return 0;
        if (v > (~0UL - d) / base)
            return 0;
        v = v * base + d;
    }
    *out = v;
    return 1;
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

#define MAX_WORDS 5

static u32 split_words(char *line, char *words[MAX_WORDS + 1])
{
    u32 n = 0;
    for (char *p = line; *p;) {
        while (*p == ' ' || *p == '\t')
            *p++ = 0;
        if (!*p)
            break;
        if (n == MAX_WORDS + 1)
            return n; /* too many: callers reject */
        words[n++] = p;
        while (*p && *p != ' ' && *p != '\t')
            p++;
    }
    return n;
}

/* ---- virtio-blk over virtio-mmio (version 2), driven from ring 3 ----
 *
 * Devices come from `virtio_mmio.device=<size>@<base>:<irq>` words on the
 * command line (Linux's format). The registers are ordinary MMIO, which ring 3
 * reaches directly; the driver polls the used ring instead of taking the
 * interrupt, so no ring-0 code is involved. One queue of QSIZE entries; up to
 * SLOTS requests in flight, each a fixed three-descriptor chain (header, data,
 * status) using its own CHUNK-byte slice of blk_data. */

#define VIRTIO_MMIO_MAGIC 0x74726976
#define VREG_MAGIC 0x000
#define VREG_VERSION 0x004
#define VREG_DEVICE_ID 0x008
#define VREG_DEVICE_FEATURES 0x010
#define VREG_DEVICE_FEATURES_SEL 0x014
#define VREG_DRIVER_FEATURES 0x020
#define VREG_DRIVER_FEATURES_SEL 0x024
#define VREG_QUEUE_SEL 0x030
#define VREG_QUEUE_NUM_MAX 0x034
#define VREG_QUEUE_NUM 0x038
#define VREG_QUEUE_READY 0x044
#define VREG_QUEUE_NOTIFY 0x050
#define VREG_STATUS 0x070
#define VREG_QUEUE_DESC 0x080
#define VREG_QUEUE_DRIVER 0x090
#define VREG_QUEUE_DEVICE 0x0a0
#define VREG_CONFIG 0x100

#define VSTATUS_ACK 1
#define VSTATUS_DRIVER 2
#define VSTATUS_DRIVER_OK 4
#define VSTATUS_FEATURES_OK 8
#define VSTATUS_NEEDS_RESET 0x40

#define VF_BLK_RO 5 /* feature bits */
#define VF_EVENT_IDX 29
#define VF_VERSION_1 32

#define VDESC_NEXT 1
#define VDESC_WRITE 2

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_GET_ID 8

#define QSIZE 64
#define SLOTS 16 /* 3 descriptors each: 48 of QSIZE */
#define CHUNK (128 * 1024)
#define SECTOR 512

struct vdesc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct blk_header {
    u32 type;
    u32 reserved;
    u64 sector;
};

static struct {
    struct vdesc desc[QSIZE] __attribute__((aligned(4096)));
    struct {
        u16 flags, idx, ring[QSIZE], used_event;
    } avail __attribute__((aligned(4096)));
    struct {
        u16 flags, idx;
        struct {
            u32 id, len;
        } ring[QSIZE];
        u16 avail_event;
    } used __attribute__((aligned(4096)));
} vq;
static u8 blk_data[SLOTS][CHUNK] __attribute__((aligned(4096)));
static struct blk_header blk_hdr[SLOTS];
static volatile u8 blk_status[SLOTS];
static u8 blk_done[SLOTS];

static u64 blk_base; /* 0: not probed yet */
static int blk_state; /* 0 unprobed, 1 ready, -1 none/failed */
static const char *blk_why = "no disk";
static u64 blk_capacity;
static int blk_ro, blk_event_idx;
static u16 avail_idx, used_seen;

static inline u32 vread(u64 reg)
{
    return *(volatile u32 *)(blk_base + reg);
}

static inline void vwrite(u64 reg, u32 value)
{
    *(volatile u32 *)(blk_base + reg) = value;
}

/* Linux's memparse: a number with an optional K, M or G suffix. */
static const char *parse_size(const char *s, u64 *out)
{
    u64 v = 0, base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++) {
        u64 d;
        if (*s >= '0' && *s <= '9')
            d = (u64)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (u64)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = (u64)(*s - 'A' + 10);
        else
            break;
        v = v * base + d;
    }
    if (*s == 'K' || *s == 'k')
        v <<= 10, s++;
    else if (*s == 'M' || *s == 'm')
        v <<= 20, s++;
    else if (*s == 'G' || *s == 'g')
        v <<= 30, s++;
    *out = v;
    return s;
}

/* The next `virtio_mmio.device=` base on the command line after `from`. */
static const char *next_mmio_device(const char *from, u64 *base)
{
    static const char key[] = "virtio_mmio.device=";
    for (const char *p = from; *p; p++) {
        if ((p != from && p[-1] != ' ') || memcmp(p, key, sizeof(key) - 1))
            continue;
        u64 size;
        const char *q = parse_size(p + sizeof(key) - 1, &size);
        if (*q != '@')
            continue;
        q = parse_size(q + 1, base);
        return q;
    }
    return 0;
}

static u64 blk_feature_bit(u32 bit)
{
    vwrite(VREG_DEVICE_FEATURES_SEL, bit / 32);
    return (vread(VREG_DEVICE_FEATURES) >> (bit % 32)) & 1;
}

static int blk_setup(void)
{
    vwrite(VREG_STATUS, 0);
    vwrite(VREG_STATUS, VSTATUS_ACK);
    vwrite(VREG_STATUS, VSTATUS_ACK | VSTATUS_DRIVER);
    if (!blk_feature_bit(VF_VERSION_1)) {
        blk_why = "device is not virtio 1";
        return 0;
    }
    blk_ro = (int)blk_feature_bit(VF_BLK_RO);
    blk_event_idx = (int)blk_feature_bit(VF_EVENT_IDX);
    vwrite(VREG_DRIVER_FEATURES_SEL, 0);
    vwrite(VREG_DRIVER_FEATURES, (u32)(blk_ro << VF_BLK_RO | blk_event_idx << VF_EVENT_IDX));
    vwrite(VREG_DRIVER_FEATURES_SEL, 1);
    vwrite(VREG_DRIVER_FEATURES, 1); /* VERSION_1 */
    u32 status = VSTATUS_ACK | VSTATUS_DRIVER | VSTATUS_FEATURES_OK;
    vwrite(VREG_STATUS, status);
    if (!(vread(VREG_STATUS) & VSTATUS_FEATURES_OK)) {
        blk_why = "features refused";
        return 0;
    }
    vwrite(VREG_QUEUE_SEL, 0);
    if (vread(VREG_QUEUE_NUM_MAX) < QSIZE) {
        blk_why = "queue too small";
        return 0;
    }
    memset(&vq, 0, sizeof(vq));
    for (u32 s = 0; s < SLOTS; s++) {
        struct vdesc *d = &vq.desc[3 * s];
        d[0] = (struct vdesc){ (u64)&blk_hdr[s], sizeof(struct blk_header), VDESC_NEXT, (u16)(3 * s + 1) };
        d[1] = (struct vdesc){ (u64)blk_data[s], CHUNK, VDESC_NEXT, (u16)(3 * s + 2) };
        d[2] = (struct vdesc){ (u64)&blk_status[s], 1, VDESC_WRITE, 0 };
    }
    avail_idx = used_seen = 0;
    vwrite(VREG_QUEUE_NUM, QSIZE);
    u64 rings[3] = { (u64)vq.desc, (u64)&vq.avail, (u64)&vq.used };
    for (u32 i = 0; i < 3; i++) {
        vwrite(VREG_QUEUE_DESC + 0x10 * i, (u32)rings[i]);
        vwrite(VREG_QUEUE_DESC + 0x10 * i + 4, (u32)(rings[i] >> 32));
    }
    vwrite(VREG_QUEUE_READY, 1);
    vwrite(VREG_STATUS, status | VSTATUS_DRIVER_OK);
    if (vread(VREG_STATUS) & VSTATUS_NEEDS_RESET) {
        blk_why = "device needs reset";
        return 0;
    }
    blk_capacity = vread(VREG_CONFIG) | (u64)vread(VREG_CONFIG + 4) << 32;
    return 1;
}

/* Find and set up the first virtio-blk device, once. */
static int blk_ready(void)
{
    if (blk_state)
        return blk_state > 0;
    blk_state = -1;
    const struct hvm_start_info *si = start_info();
    if (si->magic != HVM_START_MAGIC || !si->cmdline_paddr)
        return 0;
    const char *p = (const char *)si->cmdline_paddr;
    u64 base;
    while ((p = next_mmio_device(p, &base))) {
        if (base < 3 * GIB || base >= 4 * GIB)
            continue; /* the identity map covers MMIO in GiB 3 only */
        blk_base = base;
        if (vread(VREG_MAGIC) != VIRTIO_MMIO_MAGIC || vread(VREG_DEVICE_ID) != 2)
            continue;
        if (vread(VREG_VERSION) != 2) {
            blk_why = "legacy virtio-mmio (version 1) device";
            continue;
        }
        blk_state = blk_setup() ? 1 : -1;
        return blk_state > 0;
    }
    return 0;
}

static void blk_submit(u32 slot, u32 type, u64 sector, u32 bytes)
{
    blk_hdr[slot] = (struct blk_header){ type, 0, sector };
    blk_status[slot] = 0xFF;
    struct vdesc *data = &vq.desc[3 * slot + 1];
    if (bytes) {
        data->len = bytes;
        data->flags = VDESC_NEXT | (type == BLK_T_OUT ? 0 : VDESC_WRITE);
        vq.desc[3 * slot].next = (u16)(3 * slot + 1);
    } else {
        vq.desc[3 * slot].next = (u16)(3 * slot + 2); /* header, status */
    }
    vq.avail.ring[avail_idx % QSIZE] = (u16)(3 * slot);
    asm volatile("" ::: "memory"); /* x86 keeps stores in order */
    avail_idx++;
    *(volatile u16 *)&vq.avail.idx = avail_idx;
}

/* Tell the device about chains added since `old` (EVENT_IDX: only if it asked). */
static void blk_kick(u16 old)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* idx store before avail_event load */
    if (blk_event_idx) {
        u16 event = *(volatile u16 *)&vq.used.avail_event;
        if ((u16)(avail_idx - event - 1) >= (u16)(avail_idx - old))
            return;
    }
    vwrite(VREG_QUEUE_NOTIFY, 0);
}

/* Mark finished slots; returns how many completions were seen. */
static u32 blk_reap(void)
{
    u32 n = 0;
    while (*(volatile u16 *)&vq.used.idx != used_seen) {
        asm volatile("" ::: "memory");
        u32 id = vq.used.ring[used_seen % QSIZE].id;
        if (id / 3 < SLOTS)
            blk_done[id / 3] = 1;
        used_seen++;
        n++;
    }
    return n;
}

static void fill_pattern(u64 *w, u64 seed, u64 disk_offset, u64 bytes)
{
    for (u64 i = 0; i < bytes / 8; i++)
        w[i] = mix64(seed ^ (disk_offset + 8 * i));
}

static u64 fnv_words(u64 h, const u64 *w, u64 bytes)
{
    for (u64 i = 0; i < bytes / 8; i++) {
        h ^= w[i];
        h *= 0x100000001b3UL;
    }
    return h;
}

#define BLK_TIMEOUT_TICKS 1000 /* 10 s without a completion */

/* Stream `count` sectors from `sector` in CHUNK pieces, SLOTS at a time.
 * Writes fill each piece with the pattern first; reads fold each finished
 * piece, in disk order, into *sum. Returns 0, or the first bad status + 1,
 * or -1 on timeout. */
static int blk_stream(u32 type, u64 sector, u64 count, u64 seed, u64 *sum)
{
    u64 chunks = (count * SECTOR + CHUNK - 1) / CHUNK;
    u64 submitted = 0, retired = 0;
    u64 deadline = fine_ticks + BLK_TIMEOUT_TICKS;
    int result = 0;
    while (retired < chunks) {
        u16 old = avail_idx;
        while (submitted < chunks && submitted - retired < SLOTS) {
            u32 slot = (u32)(submitted % SLOTS);
            u64 offset = submitted * CHUNK;
            u64 bytes = count * SECTOR - offset < CHUNK ? count * SECTOR - offset : CHUNK;
            if (type == BLK_T_OUT)
                fill_pattern((u64 *)blk_data[slot], seed, sector * SECTOR + offset, bytes);
            blk_submit(slot, type, sector + offset / SECTOR, (u32)bytes);
            submitted++;
        }
        if (avail_idx != old)
            blk_kick(old);
        if (blk_reap())
            deadline = fine_ticks + BLK_TIMEOUT_TICKS;
        else if (fine_ticks > deadline)
            return -1;
        else
            cpu_relax();
        while (retired < submitted && blk_done[retired % SLOTS]) {
            u32 slot = (u32)(retired % SLOTS);
            u64 offset = retired * CHUNK;
            u64 bytes = count * SECTOR - offset < CHUNK ? count * SECTOR - offset : CHUNK;
            blk_done[slot] = 0;
            if (blk_status[slot] && !result)
                result = blk_status[slot] + 1;
            if (type == BLK_T_IN)
                *sum = fnv_words(*sum, (const u64 *)blk_data[slot], bytes);
            retired++;
        }
    }
    return result;
}

static void say_status(int r)
{
    char line[48], *p;
    if (r < 0) {
        say("ERR timeout");
        return;
    }
    p = put_str(line, "ERR status ");
    p = put_dec(p, (u64)(r - 1));
    *p = 0;
    say(line);
}

static void cmd_blk(char **args, u32 nargs)
{
    u64 sector, count, seed = 0;
    int is_write = nargs == 4 && streq(args[0], "write");
    int is_read = nargs == 3 && streq(args[0], "read");
    if (nargs == 1 && streq(args[0], "info")) {
        if (!blk_ready()) {
            char line[64], *p = put_str(line, "ERR ");
            p = put_str(p, blk_why);
            *p = 0;
            say(line);
            return;
        }
        char id[21] = { 0 }, line[96], *p;
        memset(blk_data[0], 0, 20);
        blk_submit(0, BLK_T_GET_ID, 0, 20);
        blk_kick((u16)(avail_idx - 1));
        u64 deadline = fine_ticks + BLK_TIMEOUT_TICKS;
        while (!blk_reap() && fine_ticks < deadline)
            cpu_relax();
        blk_done[0] = 0;
        memcpy(id, blk_data[0], 20);
        p = put_str(line, "BLK sectors=");
        p = put_dec(p, blk_capacity);
        p = put_str(p, blk_ro ? " ro=1 id=" : " ro=0 id=");
        p = put_str(p, blk_status[0] ? "?" : id);
        *p = 0;
        say(line);
        return;
    }
    if ((!is_write && !is_read) || !parse_u64(args[1], &sector) ||
        !parse_u64(args[2], &count) || (is_write && !parse_u64(args[3], &seed)) ||
        count == 0 || count > (1UL << 40) / SECTOR) {
        say("ERR usage: blk info | blk write <sector> <count> <seed> | blk read <sector> <count>");
        return;
    }
    if (!blk_ready()) {
        char line[64], *p = put_str(line, "ERR ");
        p = put_str(p, blk_why);
        *p = 0;
        say(line);
        return;
    }
    u64 sum = 0xcbf29ce484222325UL; /* FNV-1a 64 offset basis */
    int r = blk_stream(is_write ? BLK_T_OUT : BLK_T_IN, sector, count, seed, &sum);
    if (r) {
        say_status(r);
        return;
    }
    if (is_write) {
        say("OK");
        return;
    }
    char line[48], *p = put_str(line, "SUM ");
    p = put_hex(p, sum);
    *p = 0;
    say(line);
}

/* ---- commands ---- */

static void cmd_fill_check(int check, char **args, u32 nargs)
{
    u64 seed, mib;
    if (nargs != 2 || !parse_u64(args[0], &seed) || !parse_u64(args[1], &mib)) {
        say(check ? "ERR usage: check <seed> <mib>" : "ERR usage: fill <seed> <mib>");
        return;
    }
    u64 usable_mib = fillable_bytes() / MIB;
    if (mib > usable_mib) {
        char line[96], *p = put_str(line, "ERR only ");
        p = put_dec(p, usable_mib);
        p = put_str(p, " MiB fillable");
        *p = 0;
        say(line);
        return;
    }
    u64 bad = run_everywhere(check ? JOB_CHECK : JOB_FILL, seed, mib * MIB, ~0UL / 2);
    if (bad) {
        char line[48], *p = put_str(line, "BAD ");
        p = put_hex(p, bad);
        *p = 0;
        say(line);
    } else {
        say("OK");
    }
}

static void cmd_fpu(char **args, u32 nargs)
{
    u64 seed, op = 0;
    if (nargs == 2 && streq(args[0], "set"))
        op = JOB_FPU_SET;
    else if (nargs == 2 && streq(args[0], "check"))
        op = JOB_FPU_CHECK;
    if (!op || !parse_u64(args[1], &seed)) {
        say("ERR usage: fpu set|check <seed>");
        return;
    }
    say(run_everywhere(op, seed, 0, 200) ? "BAD" : "OK"); /* 2 s timeout */
}

static void cmd_cpus(void)
{
    u64 before[MAX_CPUS];
    u32 total = 1 + (u32)aps_online, alive = 0;
    u64 t = fine_ticks;
    while (fine_ticks == t) /* start on a tick edge */
        cpus[0].counter++;
    t = fine_ticks;
    for (u32 i = 0; i < MAX_CPUS; i++)
        before[i] = cpus[i].counter;
    while (fine_ticks - t < 10) /* 100 ms */
        cpus[0].counter++;
    for (u32 i = 0; i < MAX_CPUS; i++)
        if ((i == 0 || cpus[i].online) && cpus[i].counter != before[i])
            alive++;
    char line[64], *p = put_str(line, "CPUS ");
    p = put_dec(p, total);
    p = put_str(p, " alive ");
    p = put_dec(p, alive);
    *p = 0;
    say(line);
}

static void run_command(char *line)
{
    char *words[MAX_WORDS + 1];
    u32 n = split_words(line, words);
    if (n == 0) {
        say("ERR empty command");
        return;
    }
    if (n > MAX_WORDS) {
        say("ERR too many arguments");
        return;
    }
    const char *cmd = words[0];
    if (streq(cmd, "tick") && n == 2 && streq(words[1], "on")) {
        say("OK");
        tick_on = 1;
    } else if (streq(cmd, "tick") && n == 2 && streq(words[1], "off")) {
        tick_on = 0;
        say("OK");
    } else if (streq(cmd, "tick")) {
        say("ERR usage: tick on|off");
    } else if (streq(cmd, "fill") || streq(cmd, "check")) {
        cmd_fill_check(streq(cmd, "check"), words + 1, n - 1);
    } else if (streq(cmd, "fpu")) {
        cmd_fpu(words + 1, n - 1);
    } else if (streq(cmd, "blk") && n >= 2) {
        cmd_blk(words + 1, n - 1);
    } else if (streq(cmd, "cpus") && n == 1) {
        cmd_cpus();
    } else if (streq(cmd, "genid") && n == 1) {
        char out[96];
        genid_line(out);
        say(out);
    } else if (streq(cmd, "events") && n == 1) {
        char out[48], *p = put_str(out, "EVENTS ");
        p = put_dec(p, acpi_events);
        *p = 0;
        say(out);
    } else if (streq(cmd, "reset") && n == 1) {
        syscall2(SYS_RESET, 0, 0);
        say("ERR reset failed");
    } else {
        say("ERR unknown command");
    }
}

/* Next input line without its "\n" or "\r\n"; 0 if it was too long. */
static int read_line(char *out, u32 cap)
{
    u32 len = 0;
    int too_long = 0;
    for (;;) {
        while (rx_tail == rx_head) {
            cpus[0].counter++;
            cpu_relax();
        }
        char c = (char)rx_buf[rx_tail & (RX_SIZE - 1)];
        __atomic_store_n(&rx_tail, rx_tail + 1, __ATOMIC_RELEASE);
        if (c == '\n')
            break;
        if (len + 1 < cap)
            out[len++] = c;
        else
            too_long = 1;
    }
    if (len && out[len - 1] == '\r')
        len--;
    out[len] = 0;
    return !too_long;
}

static int cpu_has_avx(void)
{
    u32 a, b, c, d;
    asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (!(c & (1u << 27)) || !(c & (1u << 28))) /* OSXSAVE, AVX */
        return 0;
    asm volatile("xgetbv" : "=a"(a), "=d"(d) : "c"(0));
    return (a & 6) == 6;
}

void __attribute__((noreturn)) user_main_bsp(void)
{
    use_ymm = cpu_has_avx();
    read_memmap();
    map_ram();
    if (!cpus_from_acpi())
        cpus_from_mp_table();
    route_acpi_events();
    start_aps();

    char line[256], *p = put_str(line, "READY vcpus=");
    p = put_dec(p, 1 + aps_online);
    p = put_str(p, " mem_mib=");
    p = put_dec(p, mem_mib);
    *p = 0;
    say(line);

    for (;;) {
        if (read_line(line, sizeof(line)))
            run_command(line);
        else
            say("ERR line too long");
    }
}
