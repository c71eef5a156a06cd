/*
 * The metald test guest: a few kilobytes of freestanding C that a VMM boots
 * through PVH in milliseconds. Kernel command-line tokens choose what it does:
 *
 *   testguest.heartbeat_ms=N   print a heartbeat line every N ms (0: none)
 *   testguest.burn=N           spin N loop iterations after ready, then report
 *   testguest.mem_mib=N        touch every page of N MiB of RAM after ready
 *   testguest.reset            reset the VM right after the ready line
 *   testguest.ignore_shutdown  on Ctrl+Alt+Del, say so and keep running
 *
 * It always prints a ready line carrying its command line. On Ctrl+Alt+Del
 * (keyboard data on the i8042: Firecracker) it prints a shutdown line and
 * resets. On a press of the ACPI power button (Cloud Hypervisor's Generic
 * Event Controller, found in the ACPI tables the VMM hands over) it prints
 * the same line and powers off through the ACPI sleep control register
 * (S5), which ends the VMM where a reset would reboot the VM.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed char s8;

#define SERIAL_PORT 0x3f8
#define I8042_DATA 0x60
#define I8042_STATUS 0x64
#define I8042_RESET 0xfe
#define PIC_MASTER_DATA 0x21
#define PIC_SLAVE_DATA 0xa1

#define LAPIC_BASE 0xfee00000UL
#define LAPIC_TPR 0x80
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LAPIC_MASKED 0x10000
#define LAPIC_PERIODIC 0x20000

#define TIMER_VECTOR 0x20
#define SPURIOUS_VECTOR 0xff
/* KVM's local APIC timer counts at 1 GHz; 10 ms per tick. */
#define TIMER_TICK_NS 10000000UL

#define HVM_START_MAGIC 0x336ec578
#define KVM_CPUID_SIGNATURE 0x40000000
#define KVM_CPUID_FEATURES 0x40000001
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

struct pvclock_time_info {
    volatile u32 version;
    u32 pad0;
    volatile u64 tsc_timestamp;
    volatile u64 system_time;
    volatile u32 tsc_to_system_mul;
    volatile s8 tsc_shift;
    volatile u8 flags;
    u8 pad[2];
} __attribute__((aligned(32)));

struct idt_gate {
    u16 offset_low;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 offset_mid;
    u32 offset_high;
    u32 zero;
} __attribute__((packed));

struct idt_pointer {
    u16 limit;
    u64 base;
} __attribute__((packed));

extern char __image_end[];
extern u64 pml4[512];
extern char exception_stubs[];
extern void timer_interrupt(void);
extern void spurious_interrupt(void);

volatile u64 timer_ticks;
static struct idt_gate idt[256] __attribute__((aligned(16)));
static struct pvclock_time_info kvm_clock;
static int kvm_clock_enabled;

static inline void outb(u16 port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}
static inline void wrmsr(u32 msr, u64 value) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)));
}
static inline u64 rdtsc(void) {
    u32 low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return ((u64)high << 32) | low;
}
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}
static inline void lapic_write(u32 reg, u32 value) { *(volatile u32 *)(LAPIC_BASE + reg) = value; }

static void put_char(char c) { outb(SERIAL_PORT, (u8)c); }
static void put_str(const char *s) {
    while (*s) put_char(*s++);
}
static void put_u64(u64 value) {
    char digits[21];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (n) put_char(digits[--n]);
}

static void reset_vm(void) {
    for (;;) {
        outb(I8042_STATUS, I8042_RESET);
        __asm__ volatile("hlt");
    }
}

void guest_fault(u32 vector) {
    put_str("TESTGUEST FAULT vector=");
    put_u64(vector);
    put_char('\n');
    reset_vm();
}

static void set_gate(int vector, void *handler) {
    u64 address = (u64)handler;
    idt[vector].offset_low = (u16)address;
    idt[vector].selector = 0x08;
    idt[vector].ist = 0;
    idt[vector].type_attr = 0x8e; /* present, interrupt gate */
    idt[vector].offset_mid = (u16)(address >> 16);
    idt[vector].offset_high = (u32)(address >> 32);
    idt[vector].zero = 0;
}

static void install_interrupt_table(void) {
    for (int vector = 0; vector < 256; vector++) set_gate(vector, (void *)spurious_interrupt);
    for (int vector = 0; vector < 32; vector++) set_gate(vector, exception_stubs + 16 * vector);
    set_gate(TIMER_VECTOR, (void *)timer_interrupt);
    struct idt_pointer pointer = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(pointer));
}

/* Only our local APIC timer may interrupt: legacy PIC lines stay masked. */
static void start_timer(void) {
    outb(PIC_MASTER_DATA, 0xff);
    outb(PIC_SLAVE_DATA, 0xff);
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LAPIC_MASKED);
    lapic_write(LAPIC_LVT_LINT1, LAPIC_MASKED);
    lapic_write(LAPIC_TIMER_DIVIDE, 0xb); /* divide by 1 */
    lapic_write(LAPIC_LVT_TIMER, LAPIC_PERIODIC | TIMER_VECTOR);
    lapic_write(LAPIC_TIMER_INITIAL, (u32)TIMER_TICK_NS);
    __asm__ volatile("sti");
}

static void enable_kvm_clock(void) {
    u32 a, b, c, d;
    cpuid(KVM_CPUID_SIGNATURE, &a, &b, &c, &d);
    if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d) return; /* "KVMKVMKVM\0\0\0" */
    cpuid(KVM_CPUID_FEATURES, &a, &b, &c, &d);
    if (!(a & KVM_FEATURE_CLOCKSOURCE2)) return;
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)&kvm_clock | 1);
    kvm_clock_enabled = 1;
}

/* Nanoseconds since the VM started: kvmclock when offered, else timer ticks. */
static u64 now_ns(void) {
    if (!kvm_clock_enabled) return timer_ticks * TIMER_TICK_NS;
    u32 version;
    u64 ns;
    do {
        version = kvm_clock.version;
        __asm__ volatile("" ::: "memory");
        u64 delta = rdtsc() - kvm_clock.tsc_timestamp;
        s8 shift = kvm_clock.tsc_shift;
        if (shift < 0) delta >>= -shift;
        else delta <<= shift;
        ns = kvm_clock.system_time + (u64)(((unsigned __int128)delta * kvm_clock.tsc_to_system_mul) >> 32);
        __asm__ volatile("" ::: "memory");
    } while ((version & 1) || version != kvm_clock.version);
    return ns;
}

static u64 length(const char *s) {
    u64 n = 0;
    while (s[n]) n++;
    return n;
}

static int starts_with(const char *s, const char *prefix) {
    while (*prefix)
        if (*s++ != *prefix++) return 0;
    return 1;
}

/* Value of "key=N" among space-separated tokens, or fallback when absent. */
static u64 token_number(const char *cmdline, const char *key, u64 fallback) {
    const char *p = cmdline;
    while (p && *p) {
        while (*p == ' ') p++;
        if (starts_with(p, key)) {
            const char *q = p + length(key);
            if (*q == '=') {
                u64 value = 0;
                for (q++; *q >= '0' && *q <= '9'; q++) value = value * 10 + (u64)(*q - '0');
                return value;
            }
        }
        while (*p && *p != ' ') p++;
    }
    return fallback;
}

static int token_present(const char *cmdline, const char *token) {
    const char *p = cmdline;
    while (p && *p) {
        while (*p == ' ') p++;
        if (starts_with(p, token)) {
            char after = p[length(token)];
            if (after == ' ' || after == 0) return 1;
        }
        while (*p && *p != ' ') p++;
    }
    return 0;
}

static void burn(u64 iterations) {
    u64 start = now_ns();
    volatile u64 sink = 0;
    for (u64 i = 0; i < iterations; i++) sink += i ^ (sink >> 3);
    put_str("TESTGUEST BURN DONE iterations=");
    put_u64(iterations);
    put_str(" ms=");
    put_u64((now_ns() - start) / 1000000);
    put_char('\n');
}

/* End of usable RAM above our image, from the PVH memory map when given. */
static u64 ram_end(const struct hvm_start_info *info) {
    if (info->version < 1 || info->memmap_entries == 0) return 0;
    const struct hvm_memmap_entry *map = (const struct hvm_memmap_entry *)info->memmap_paddr;
    u64 image_end = (u64)__image_end;
    for (u32 i = 0; i < info->memmap_entries; i++) {
        if (map[i].type == 1 && map[i].addr <= image_end && map[i].addr + map[i].size > image_end)
            return map[i].addr + map[i].size;
    }
    return 0;
}

static void touch_memory(const struct hvm_start_info *info, u64 mib) {
    u64 start = ((u64)__image_end + 0x1fffff) & ~0x1fffffUL;
    u64 end = start + (mib << 20);
    u64 limit = ram_end(info);
    if (limit && end > limit) {
        put_str("TESTGUEST MEM TOO LARGE mib=");
        put_u64(mib);
        put_str(" available_mib=");
        put_u64(limit > start ? (limit - start) >> 20 : 0);
        put_char('\n');
        return;
    }
    u64 touched = 0;
    for (u64 page = start; page < end; page += 4096) {
        *(volatile u64 *)page = page ^ 0x6d6574616c64UL;
        if (((page - start) & 0xfffff) == 0) touched++;
    }
    put_str("TESTGUEST MEM DONE mib=");
    put_u64(touched);
    put_char('\n');
}

static int shutdown_requested(void) {
    int seen = 0;
    while (inb(I8042_STATUS) & 1) {
        (void)inb(I8042_DATA);
        seen = 1;
    }
    return seen;
}

/*
 * ACPI, as much as a power button needs. The VMM hands over the RSDP's
 * address in hvm_start_info (version 1 and later); from it the XSDT, the
 * FADT ("FACP": its X_DSDT and its sleep control register) and the DSDT,
 * in which Cloud Hypervisor declares its Generic Event Controller's
 * register as an operation region:
 *   OpRegion (GDST, SystemMemory, <address>, 1)
 * encoded as 5B 80 'G' 'D' 'S' 'T' 00 <integer> <integer>. Reading that
 * byte tells what changed since the last read; bit 3 is the power button.
 */
#define ACPI_GED_POWER_BUTTON 0x08
/* SLP_TYPa = 5 (S5, as the VMM's DSDT says) and SLP_EN. */
#define ACPI_S5_SLEEP (5 << 2 | 1 << 5)

struct acpi_gas {
    u8 space_id; /* 0: system memory, 1: system I/O */
    u8 bit_width;
    u8 bit_offset;
    u8 access_size;
    u64 address;
} __attribute__((packed));

static volatile u8 *ged_register;
static struct acpi_gas sleep_control;

static u32 read_u32(const u8 *p) { return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24; }
static u64 read_u64(const u8 *p) { return (u64)read_u32(p) | (u64)read_u32(p + 4) << 32; }

static int same(const u8 *p, const char *text, u64 n) {
    for (u64 i = 0; i < n; i++)
        if (p[i] != (u8)text[i]) return 0;
    return 1;
}

/* Page tables for one 2 MiB page above the 4 GiB that entry.S maps. */
static u64 high_pdpt[512] __attribute__((aligned(4096)));
static u64 high_pd[512] __attribute__((aligned(4096)));

/* Maps the 2 MiB page holding `address`, uncached, at the same address. */
static int map_device_page(u64 address) {
    if (address < (4UL << 30)) return 1;
    if (address >> 48) return 0;
    u64 page = address & ~0x1fffffUL;
    u32 i4 = (u32)(page >> 39) & 511, i3 = (u32)(page >> 30) & 511, i2 = (u32)(page >> 21) & 511;
    if (i4 == 0) return 0; /* shares the low PDPT; never the case for a device at the top */
    pml4[i4] = (u64)high_pdpt | 0x3;
    high_pdpt[i3] = (u64)high_pd | 0x3;
    high_pd[i2] = page | 0x83 | 0x10; /* present, writable, 2 MiB, cache disabled */
    __asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
    return 1;
}

/* An AML integer (ZeroOp, OneOp, BytePrefix, WordPrefix, DWordPrefix, QWordPrefix). */
static int aml_integer(const u8 *p, u64 *value) {
    switch (p[0]) {
    case 0x00: *value = 0; return 1;
    case 0x01: *value = 1; return 1;
    case 0x0a: *value = p[1]; return 1;
    case 0x0b: *value = (u64)p[1] | (u64)p[2] << 8; return 1;
    case 0x0c: *value = read_u32(p + 1); return 1;
    case 0x0e: *value = read_u64(p + 1); return 1;
    default: return 0;
    }
}

static void find_ged(const u8 *dsdt) {
    static const u8 pattern[] = {0x5b, 0x80, 'G', 'D', 'S', 'T', 0x00};
    u32 length = read_u32(dsdt + 4);
    for (u32 at = 36; at + sizeof(pattern) + 9 <= length; at++) {
        u32 i = 0;
        while (i < sizeof(pattern) && dsdt[at + i] == pattern[i]) i++;
        if (i < sizeof(pattern)) continue;
        u64 address;
        if (aml_integer(dsdt + at + sizeof(pattern), &address) && map_device_page(address)) {
            ged_register = (volatile u8 *)address;
        }
        return;
    }
}

static void acpi_init(const struct hvm_start_info *info) {
    if (!info || info->magic != HVM_START_MAGIC || info->version < 1 || !info->rsdp_paddr) return;
    const u8 *rsdp = (const u8 *)info->rsdp_paddr;
    if (!same(rsdp, "RSD PTR ", 8) || rsdp[15] < 2) return;
    const u8 *xsdt = (const u8 *)read_u64(rsdp + 24);
    if (!xsdt || !same(xsdt, "XSDT", 4)) return;
    u32 entries = (read_u32(xsdt + 4) - 36) / 8;
    for (u32 i = 0; i < entries; i++) {
        const u8 *table = (const u8 *)read_u64(xsdt + 36 + 8 * i);
        if (!table || !same(table, "FACP", 4)) continue;
        u32 length = read_u32(table + 4);
        if (length >= 256) {
            const u8 *gas = table + 244;
            sleep_control.space_id = gas[0];
            sleep_control.address = read_u64(gas + 4);
        }
        const u8 *dsdt = length >= 148 ? (const u8 *)read_u64(table + 140) : 0;
        if (!dsdt) dsdt = (const u8 *)(u64)read_u32(table + 40);
        if (dsdt && same(dsdt, "DSDT", 4)) find_ged(dsdt);
        return;
    }
}

static int power_button_pressed(void) {
    return ged_register && (*ged_register & ACPI_GED_POWER_BUTTON);
}

/* S5 through the sleep control register; a reset when there is none. */
static void power_off(void) {
    if (sleep_control.address && sleep_control.space_id == 1) {
        outb((u16)sleep_control.address, ACPI_S5_SLEEP);
    } else if (sleep_control.address && sleep_control.space_id == 0 && map_device_page(sleep_control.address)) {
        *(volatile u8 *)sleep_control.address = ACPI_S5_SLEEP;
    }
    reset_vm();
}

void guest_main(u32 start_info_paddr) {
    const struct hvm_start_info *info = (const struct hvm_start_info *)(u64)start_info_paddr;
    const char *cmdline = "";
    if (info && info->magic == HVM_START_MAGIC && info->cmdline_paddr) cmdline = (const char *)info->cmdline_paddr;

    install_interrupt_table();
    enable_kvm_clock();
    acpi_init(info);
    start_timer();

    put_str("TESTGUEST READY cmdline=\"");
    put_str(cmdline);
    put_str("\"\n");

    if (token_present(cmdline, "testguest.reset")) reset_vm();
    u64 burn_iterations = token_number(cmdline, "testguest.burn", 0);
    if (burn_iterations) burn(burn_iterations);
    u64 mem_mib = token_number(cmdline, "testguest.mem_mib", 0);
    if (mem_mib) touch_memory(info, mem_mib);

    int ignore_shutdown = token_present(cmdline, "testguest.ignore_shutdown");
    u64 heartbeat_ns = token_number(cmdline, "testguest.heartbeat_ms", 0) * 1000000;
    u64 next_heartbeat = now_ns() + heartbeat_ns;
    u64 heartbeats = 0;
    for (;;) {
        __asm__ volatile("hlt");
        int key = shutdown_requested();
        int button = power_button_pressed();
        if (key || button) {
            if (ignore_shutdown) {
                put_str("TESTGUEST IGNORED SHUTDOWN\n");
            } else {
                put_str("TESTGUEST SHUTDOWN\n");
                if (button) power_off();
                reset_vm();
            }
        }
        if (!heartbeat_ns) continue;
        u64 now = now_ns();
        if (now < next_heartbeat) continue;
        heartbeats++;
        put_str("TESTGUEST HEARTBEAT n=");
        put_u64(heartbeats);
        put_str(" t_ms=");
        put_u64(now / 1000000);
        put_char('\n');
        /* Keep the schedule: skip beats that a pause swallowed, never drift. */
        while (next_heartbeat <= now) next_heartbeat += heartbeat_ns;
    }
}
