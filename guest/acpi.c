/* Ring 3: finding the VM generation ID and the VMClock page through ACPI.
 *
 * A Linux guest evaluates the DSDT with a full AML interpreter: VGEN's ADDR
 * method for the generation ID's address, VCLK's _CRS for the VMClock page.
 * This guest reads the same two objects, but without an interpreter: it walks
 * RSDP -> XSDT -> FADT -> DSDT, looks for the Device() blocks named VGEN and
 * VCLK, and decodes inside them only the fixed shapes Ember's DSDT uses:
 *
 *   Method (ADDR, 0) { Return (Package (2) { <low 32 bits>, <high 32 bits> }) }
 *   Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, <base>, <len>) })
 *
 * It also routes the first two GSIs listed in the _CRS of the Generic Event
 * Device (GED_, `Interrupt () {...}`) to vectors of their own and counts
 * what arrives there, so a test can see that a restore raised the devices'
 * interrupts.
 *
 * Anything else (another firmware's DSDT, a computed ADDR) reads as "not
 * found"; this is a test guest, not a general ACPI client.
 */
#include "guest.h"

static u32 rd32(const u8 *p)
{
    return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24;
}

static u64 rd64(const u8 *p)
{
    return (u64)rd32(p) | (u64)rd32(p + 4) << 32;
}

/* The table with signature `sig` listed in the XSDT (or RSDT), or 0. */
static const u8 *find_table(const u8 *rsdp, const char *sig)
{
    u64 root = rd32(rsdp + 16), entry_size = 4;
    if (rsdp[15] >= 2 && rd64(rsdp + 24)) {
        root = rd64(rsdp + 24);
        entry_size = 8;
    }
    if (!root || !is_mapped(root, 36) || !is_mapped(root, rd32((const u8 *)root + 4)))
        return 0;
    const u8 *sdt = (const u8 *)root;
    for (u32 off = 36; off + entry_size <= rd32(sdt + 4); off += (u32)entry_size) {
        u64 table = entry_size == 8 ? rd64(sdt + off) : rd32(sdt + off);
        if (is_mapped(table, 36) && !memcmp((const void *)table, sig, 4) &&
            is_mapped(table, rd32((const u8 *)table + 4)))
            return (const u8 *)table;
    }
    return 0;
}

/* The DSDT the FADT points to: X_DSDT (offset 140) if present, else DSDT. */
static const u8 *find_dsdt(const u8 *rsdp)
{
    const u8 *fadt = find_table(rsdp, "FACP");
    if (!fadt)
        return 0;
    u64 dsdt = rd32(fadt + 40);
    if (rd32(fadt + 4) >= 148 && rd64(fadt + 140))
        dsdt = rd64(fadt + 140);
    if (!dsdt || !is_mapped(dsdt, 36) || memcmp((const void *)dsdt, "DSDT", 4) ||
        !is_mapped(dsdt, rd32((const u8 *)dsdt + 4)))
        return 0;
    return (const u8 *)dsdt;
}

/* AML PkgLength at p: the length it encodes (counting itself); *size gets
 * the number of bytes it takes. */
static u32 pkg_length(const u8 *p, u32 *size)
{
    u32 follow = p[0] >> 6;
    *size = follow + 1;
    if (!follow)
        return p[0] & 0x3F;
    u32 len = p[0] & 0x0F;
    for (u32 i = 0; i < follow; i++)
        len |= (u32)p[1 + i] << (4 + 8 * i);
    return len;
}

/* An AML integer constant at p; returns its size in bytes, 0 if none. */
static u32 aml_integer(const u8 *p, const u8 *end, u64 *value)
{
    static const u8 widths[] = {[0x0A] = 1, [0x0B] = 2, [0x0C] = 4, [0x0E] = 8};
    if (p >= end)
        return 0;
    if (p[0] == 0x00 || p[0] == 0x01) { /* ZeroOp, OneOp */
        *value = p[0];
        return 1;
    }
    if (p[0] > 0x0E || !widths[p[0]] || p + 1 + widths[p[0]] > end)
        return 0;
    u64 v = 0;
    for (u32 i = 0; i < widths[p[0]]; i++)
        v |= (u64)p[1 + i] << (8 * i);
    *value = v;
    return 1 + widths[p[0]];
}

/* The body of Device(<name>) (a single NameSeg) somewhere in [p, end). */
static int find_device(const u8 *p, const u8 *end, const char *name, const u8 **body,
                       const u8 **body_end)
{
    for (; p + 7 <= end; p++) {
        if (p[0] != 0x5B || p[1] != 0x82) /* ExtOpPrefix, DeviceOp */
            continue;
        u32 size, len = pkg_length(p + 2, &size);
        const u8 *seg = p + 2 + size;
        if (seg + 4 > end || memcmp(seg, name, 4) || p + 2 + len > end)
            continue;
        *body = seg + 4;
        *body_end = p + 2 + len;
        return 1;
    }
    return 0;
}

/* VGEN's ADDR: Method "ADDR" returning Package(2){low, high}. */
static u64 genid_address(const u8 *p, const u8 *end)
{
    for (; p + 4 <= end; p++) {
        if (p[0] != 0x14) /* MethodOp */
            continue;
        u32 size;
        pkg_length(p + 1, &size);
        const u8 *q = p + 1 + size;
        if (q + 9 > end || memcmp(q, "ADDR", 4))
            continue;
        q += 5; /* name, method flags */
        if (q[0] != 0xA4 || q[1] != 0x12) /* ReturnOp, PackageOp */
            return 0;
        pkg_length(q + 2, &size);
        q += 2 + size;
        if (*q++ != 2)
            return 0;
        u64 low, high;
        u32 n = aml_integer(q, end, &low);
        if (!n || !aml_integer(q + n, end, &high))
            return 0;
        return (low & 0xFFFFFFFF) | high << 32;
    }
    return 0;
}

/* The resource descriptors of the first `Name (_CRS, Buffer)` in
 * [p, end): 1 with [*res, *res_end) set, else 0. */
static int find_crs(const u8 *p, const u8 *end, const u8 **res, const u8 **res_end)
{
    for (; p + 6 <= end; p++) {
        if (p[0] != 0x08 || memcmp(p + 1, "_CRS", 4) || p[5] != 0x11) /* Name, Buffer */
            continue;
        u32 size, len = pkg_length(p + 6, &size);
        const u8 *q = p + 6 + size;
        u64 buf_size;
        u32 n = aml_integer(q, end, &buf_size);
        if (!n || p + 6 + len > end)
            return 0;
        *res = q + n;
        *res_end = p + 6 + len;
        return 1;
    }
    return 0;
}

/* The next large resource descriptor of type `tag` in [*q, end), or 0;
 * stops at the end tag. */
static const u8 *find_descriptor(const u8 *q, const u8 *end, u8 tag)
{
    while (q < end) {
        if (!(q[0] & 0x80)) { /* small item: length in bits 2..0 */
            if ((q[0] >> 3) == 0x0F) /* end tag */
                return 0;
            q += 1 + (q[0] & 7);
            continue;
        }
        if (q + 3 > end)
            return 0;
        u32 item_len = (u32)q[1] | (u32)q[2] << 8;
        if (q[0] == tag && q + 3 + item_len <= end)
            return q;
        q += 3 + item_len;
    }
    return 0;
}

/* VCLK's _CRS: the base of its Memory32Fixed descriptor. */
static u64 vmclock_address(const u8 *p, const u8 *end)
{
    const u8 *res, *res_end, *d;
    if (!find_crs(p, end, &res, &res_end))
        return 0;
    d = find_descriptor(res, res_end, 0x86); /* Memory32Fixed */
    return d && d[1] == 9 ? rd32(d + 4) : 0;
}

#define VMCLOCK_MAGIC 0x4b4c4356

static const u8 *the_dsdt(void)
{
    const u8 *rsdp = find_rsdp();
    return (rsdp && !memcmp(rsdp, "RSD PTR ", 8)) ? find_dsdt(rsdp) : 0;
}

/* Route every GSI of GED_'s Interrupt descriptor to ACPI_EVENT_VECTOR;
 * returns how many were routed. */
u32 route_acpi_events(void)
{
    const u8 *dsdt = the_dsdt(), *body, *body_end, *res, *res_end, *d;
    if (!dsdt || !find_device(dsdt + 36, dsdt + rd32(dsdt + 4), "GED_", &body, &body_end) ||
        !find_crs(body, body_end, &res, &res_end))
        return 0;
    d = find_descriptor(res, res_end, 0x89); /* Extended Interrupt */
    if (!d || 5 + 4UL * d[4] > 3UL + ((u32)d[1] | (u32)d[2] << 8))
        return 0;
    u32 routed = 0;
    for (u32 i = 0; i < d[4] && i < ACPI_EVENT_VECTORS; i++) {
        u64 result, gsi = rd32(d + 5 + 4 * i);
        asm volatile("int $0x80"
                     : "=a"(result)
                     : "a"((u64)SYS_ROUTE_EVENT), "D"(gsi), "S"((u64)i)
                     : "memory");
        routed += result == 0;
    }
    return routed;
}

/* "GENID <32 hex digits> <VMClock vm_generation_counter>" into out. */
void genid_line(char *out)
{
    const u8 *dsdt = the_dsdt();
    if (!dsdt) {
        *put_str(out, "ERR no ACPI DSDT") = 0;
        return;
    }
    const u8 *end = dsdt + rd32(dsdt + 4), *body, *body_end;
    u64 genid = 0, clock = 0;
    if (find_device(dsdt + 36, end, "VGEN", &body, &body_end))
        genid = genid_address(body, body_end);
    if (find_device(dsdt + 36, end, "VCLK", &body, &body_end))
        clock = vmclock_address(body, body_end);
    if (!genid || !is_mapped(genid, 16)) {
        *put_str(out, "ERR no VMGenID in the DSDT") = 0;
        return;
    }
    if (!clock || !is_mapped(clock, 112) || rd32((const u8 *)clock) != VMCLOCK_MAGIC) {
        *put_str(out, "ERR no VMClock in the DSDT") = 0;
        return;
    }

    /* The ID: 16 bytes in memory order, as hex. */
    static const char digits[] = "0123456789abcdef";
    const volatile u8 *id = (const volatile u8 *)genid;
    char *p = put_str(out, "GENID ");
    for (u32 i = 0; i < 16; i++) {
        u8 b = id[i];
        *p++ = digits[b >> 4];
        *p++ = digits[b & 15];
    }
    /* The generation counter under VMClock's sequence count: retry while an
     * update is in progress (odd) or happened during the read. */
    const volatile u32 *seq = (const volatile u32 *)(clock + 12);
    const volatile u64 *generation = (const volatile u64 *)(clock + 104);
    u32 before;
    u64 value;
    do {
        before = *seq;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        value = *generation;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
    } while ((before & 1) || before != *seq);
    *p++ = ' ';
    p = put_dec(p, value);
    *p = 0;
}
