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

static int is_mapped(u64 addr, u64 len)
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

static const u8 *find_rsdp(void)
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

#define MAX_WORDS 4

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
    } else if (streq(cmd, "cpus") && n == 1) {
        cmd_cpus();
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
