use super::*;

const BASE: u64 = 0xe_0000;
const MAX: u64 = 0x2_0000;

fn config() -> AcpiConfig {
    AcpiConfig {
        cpus: 4,
        lapic_addr: 0xfee0_0000,
        ioapic: IoApicConfig {
            id: 0,
            addr: 0xfec0_0000,
            gsi_base: 0,
        },
        pci: PciHostConfig {
            segment: 0,
            ecam_base: 0xb000_0000,
            bus_start: 0,
            bus_end: 0xff,
            mmio32: (0xc000_0000, 0x3000_0000),
            mmio64: (0x100_0000_0000, 0x10_0000_0000),
        },
        pm: PmConfig {
            sleep_control_port: 0x3c0,
            sleep_status_port: 0x3c1,
            reset_port: 0xcf9,
            reset_value: 0x06,
            s5_sleep_type: 5,
        },
        serial: Some(SerialConfig { port: 0x3f8, irq: 4 }),
        power_button: Some(GedConfig { gsi: 9 }),
        viot: Some(ViotConfig {
            iommu_bdf: 0x0008,                                   // 00:01.0
            endpoints: vec![(0x0010, 0x00ff), (0x0100, 0x01ff)], // 00:02.0-00:1f.7, bus 1
        }),
        oem_id: DEFAULT_OEM_ID,
        oem_table_id: DEFAULT_OEM_TABLE_ID,
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

/// The table at exactly `addr`, cut to the length its header declares.
fn table_at(t: &AcpiTables, addr: u64) -> &[u8] {
    let (_, blob) = t
        .blobs
        .iter()
        .find(|(a, _)| *a == addr)
        .unwrap_or_else(|| panic!("no blob at {addr:#x}"));
    let len = u32_at(blob, 4) as usize;
    assert_eq!(len, blob.len(), "declared length == blob length");
    blob
}

fn xsdt_entries(t: &AcpiTables) -> Vec<u64> {
    let rsdp = table_at_rsdp(t);
    let xsdt = table_at(t, u64_at(rsdp, 24));
    (36..xsdt.len()).step_by(8).map(|o| u64_at(xsdt, o)).collect()
}

fn table_at_rsdp(t: &AcpiTables) -> &[u8] {
    &t.blobs[0].1
}

/// Follows RSDP -> XSDT -> `sig` (or FADT -> DSDT for "DSDT").
fn find(t: &AcpiTables, sig: &[u8; 4]) -> Option<Vec<u8>> {
    if sig == b"DSDT" {
        let fadt = find(t, b"FACP")?;
        return Some(table_at(t, u64_at(&fadt, 140)).to_vec());
    }
    xsdt_entries(t)
        .into_iter()
        .map(|a| table_at(t, a))
        .find(|tbl| &tbl[..4] == sig)
        .map(<[u8]>::to_vec)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn checksums_and_layout() {
    let t = build(&config(), BASE, MAX).unwrap();
    assert_eq!(t.rsdp_addr, BASE);
    assert_eq!(t.blobs[0].0, BASE);
    assert_eq!(t.blobs.len(), 7);

    let rsdp = &t.blobs[0].1;
    assert_eq!(rsdp.len(), 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(sum(rsdp), 0, "extended checksum");
    assert_eq!(&rsdp[9..15], b"MEMVSR");
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
    assert_eq!(u32_at(rsdp, 20), 36, "length");

    let mut end = BASE;
    for (addr, blob) in &t.blobs {
        assert!(*addr >= end, "tables in increasing, non-overlapping order");
        assert_eq!(addr % TABLE_ALIGN, 0);
        end = addr + blob.len() as u64;
        if *addr != BASE {
            assert_eq!(sum(blob), 0, "checksum of {:?}", &blob[..4]);
            assert_eq!(u32_at(blob, 4) as usize, blob.len());
            assert_eq!(&blob[10..16], b"MEMVSR");
            assert_eq!(&blob[16..24], b"MEMVISOR");
        }
    }
    assert!(end <= BASE + MAX);
}

#[test]
fn pointers_resolve() {
    let t = build(&config(), BASE, MAX).unwrap();
    let rsdp = &t.blobs[0].1;
    let xsdt = table_at(&t, u64_at(rsdp, 24));
    assert_eq!(&xsdt[..4], b"XSDT");
    let sigs: Vec<[u8; 4]> = xsdt_entries(&t)
        .into_iter()
        .map(|a| table_at(&t, a)[..4].try_into().unwrap())
        .collect();
    assert_eq!(sigs, [*b"FACP", *b"APIC", *b"MCFG", *b"VIOT"]);

    let fadt = find(&t, b"FACP").unwrap();
    assert_eq!(u32_at(&fadt, 40), 0, "32-bit DSDT pointer unused");
    assert_eq!(&table_at(&t, u64_at(&fadt, 140))[..4], b"DSDT");
    // No FACS on a HW-reduced platform.
    assert_eq!(u32_at(&fadt, 36), 0);
    assert_eq!(u64_at(&fadt, 132), 0);
}

#[test]
fn fadt_fields() {
    let t = build(&config(), BASE, MAX).unwrap();
    let fadt = find(&t, b"FACP").unwrap();
    assert_eq!(fadt.len(), 276);
    assert_eq!(fadt[8], 6, "major revision");
    assert_eq!(fadt[131], 5, "minor revision");
    let flags = u32_at(&fadt, 112);
    assert_eq!(
        flags,
        (1 << 20) | (1 << 10) | (1 << 4) | (1 << 5),
        "HW_REDUCED_ACPI | RESET_REG_SUP | PWR_BUTTON | SLP_BUTTON"
    );
    assert_eq!(u16_at(&fadt, 109), (1 << 2) | (1 << 5), "no VGA, no CMOS RTC");

    // GAS: space id 1 (System I/O), 8 bits wide, offset 0, byte access.
    let io8 = |port: u16| {
        let mut g = vec![1u8, 8, 0, 1];
        g.extend_from_slice(&u64::from(port).to_le_bytes());
        g
    };
    assert_eq!(fadt[116..128], io8(0xcf9)[..], "RESET_REG");
    assert_eq!(fadt[128], 0x06, "RESET_VALUE");
    assert_eq!(fadt[244..256], io8(0x3c0)[..], "SLEEP_CONTROL_REG");
    assert_eq!(fadt[256..268], io8(0x3c1)[..], "SLEEP_STATUS_REG");
    assert_eq!(&fadt[268..276], b"MEMVISOR", "hypervisor vendor identity");
    // Legacy PM blocks unused.
    assert_eq!(u32_at(&fadt, 56), 0);
    assert_eq!(u32_at(&fadt, 64), 0);
}

#[test]
fn madt_entries() {
    let t = build(&config(), BASE, MAX).unwrap();
    let madt = find(&t, b"APIC").unwrap();
    assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
    assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");

    let mut entries = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let len = madt[off + 1] as usize;
        assert!(len >= 2);
        entries.push(&madt[off..off + len]);
        off += len;
    }
    assert_eq!(off, madt.len());
    assert_eq!(entries.len(), 4 + 3);
    for (cpu, e) in entries[..4].iter().enumerate() {
        // type 0, len 8, uid, apic id, flags = enabled
        assert_eq!(**e, [0, 8, cpu as u8, cpu as u8, 1, 0, 0, 0]);
    }
    let ioapic = entries[4];
    assert_eq!(ioapic[..4], [1, 12, 0, 0]);
    assert_eq!(u32_at(ioapic, 4), 0xfec0_0000);
    assert_eq!(u32_at(ioapic, 8), 0);
    // ISO: bus ISA, IRQ0 -> GSI 2, conforming (ISA edge/high)
    assert_eq!(*entries[5], [2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    // LAPIC NMI: all processors, conforming flags, LINT1
    assert_eq!(*entries[6], [4, 6, 0xff, 0, 0, 1]);
}

#[test]
fn madt_cpu_count_follows_config() {
    let mut c = config();
    c.cpus = 255;
    let t = build(&c, BASE, MAX).unwrap();
    let madt = find(&t, b"APIC").unwrap();
    assert_eq!(madt.len(), 44 + 255 * 8 + 12 + 10 + 6);
    let last = 44 + 254 * 8;
    assert_eq!(madt[last..last + 4], [0, 8, 254, 254]);
}

#[test]
fn mcfg_values() {
    let mut c = config();
    c.pci.segment = 0;
    c.pci.bus_start = 0;
    c.pci.bus_end = 0x3f;
    let t = build(&c, BASE, MAX).unwrap();
    let mcfg = find(&t, b"MCFG").unwrap();
    assert_eq!(mcfg.len(), 36 + 8 + 16);
    assert_eq!(u64_at(&mcfg, 36), 0, "reserved");
    assert_eq!(u64_at(&mcfg, 44), 0xb000_0000);
    assert_eq!(u16_at(&mcfg, 52), 0, "segment");
    assert_eq!(mcfg[54], 0, "start bus");
    assert_eq!(mcfg[55], 0x3f, "end bus");
}

/// EISA-compressed IDs as they appear after a DWordPrefix (0x0c).
const PNP0A08: [u8; 5] = [0x0c, 0x41, 0xd0, 0x0a, 0x08];
const PNP0A03: [u8; 5] = [0x0c, 0x41, 0xd0, 0x0a, 0x03];
const PNP0C02: [u8; 5] = [0x0c, 0x41, 0xd0, 0x0c, 0x02];
const PNP0501: [u8; 5] = [0x0c, 0x41, 0xd0, 0x05, 0x01];
const PNP0C0C: [u8; 5] = [0x0c, 0x41, 0xd0, 0x0c, 0x0c];

fn name(n: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(n);
    v.extend_from_slice(value);
    v
}

#[test]
fn dsdt_contents() {
    let t = build(&config(), BASE, MAX).unwrap();
    let dsdt = find(&t, b"DSDT").unwrap();
    assert_eq!(dsdt[8], 2, "revision 2: 64-bit integers");
    let aml = &dsdt[36..];

    // \_SB scope and devices.
    assert_eq!(aml[0], 0x10, "ScopeOp");
    assert!(contains(aml, b"\\_SB_"));
    for dev in [b"PCI0", b"MRES", b"COM1", b"GED_", b"PWRB"] {
        assert!(contains(aml, dev), "{}", String::from_utf8_lossy(dev));
    }
    assert!(contains(aml, &name(b"_HID", &PNP0A08)));
    assert!(contains(aml, &name(b"_CID", &PNP0A03)));
    assert!(contains(aml, &name(b"_SEG", &[0x00])));
    assert!(contains(aml, &name(b"_BBN", &[0x00])));
    assert!(contains(aml, &name(b"_HID", &PNP0C02)));
    assert!(contains(aml, &name(b"_HID", &PNP0501)));
    assert!(contains(aml, &name(b"_HID", &PNP0C0C)));
    assert!(contains(aml, &name(b"_HID", b"\x0dACPI0013\0")));

    // PCI0 _CRS descriptors.
    let bus = [
        0x88, 13, 0, 2, 0x0c, 0, /* gran */ 0, 0, /* min */ 0, 0, /* max */ 0xff, 0, /* tra */ 0,
        0, /* len */ 0, 1,
    ];
    assert!(contains(aml, &bus), "WordBusNumber 0..=255");
    assert!(contains(aml, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]), "IO cf8");
    let mut dword = vec![0x87, 23, 0, 0, 0x0c, 0x01 /* RW, non-cacheable */];
    for v in [0u32, 0xc000_0000, 0xefff_ffff, 0, 0x3000_0000] {
        dword.extend_from_slice(&v.to_le_bytes());
    }
    assert!(contains(aml, &dword), "DWordMemory mmio32");
    let mut qword = vec![0x8a, 43, 0, 0, 0x0c, 0x01];
    for v in [0u64, 0x100_0000_0000, 0x10f_ffff_ffff, 0, 0x10_0000_0000] {
        qword.extend_from_slice(&v.to_le_bytes());
    }
    assert!(contains(aml, &qword), "QWordMemory mmio64");

    // ECAM reservation: 256 buses from 0xb000_0000.
    let mut m32 = vec![0x86, 9, 0, 1];
    m32.extend_from_slice(&0xb000_0000u32.to_le_bytes());
    m32.extend_from_slice(&0x1000_0000u32.to_le_bytes());
    assert!(contains(aml, &m32), "Memory32Fixed ECAM");

    // COM1: IO(0x3f8, 0x3f8, 1, 8), IRQNoFlags {4}
    assert!(contains(aml, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8, 0x22, 0x10, 0x00]));

    // GED: Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {9}
    assert!(contains(aml, &[0x89, 6, 0, 0x03, 1, 9, 0, 0, 0]));
    // _EVT: Method(_EVT, 1) { If (LEqual(Arg0, 9)) { Notify(\_SB.PWRB, 0x80) } }
    let evt_body = [
        b'_', b'E', b'V', b'T', 0x01, // name, 1 arg, not serialized
        0xa0, 0x12, // IfOp, PkgLength 18
        0x93, 0x68, 0x0a, 0x09, // LEqual(Arg0, 9)
        0x86, 0x5c, 0x2e, b'_', b'S', b'B', b'_', b'P', b'W', b'R', b'B', 0x0a, 0x80,
    ];
    assert!(contains(aml, &evt_body));

    // Name(_S5_, Package(4) {5, 0, 0, 0}) at the root, after \_SB.
    let s5 = [0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0, 0, 0];
    assert!(aml.ends_with(&s5));
}

#[test]
fn dsdt_optional_devices_absent() {
    let mut c = config();
    c.serial = None;
    c.power_button = None;
    c.viot = None;
    c.pci.mmio64 = (0, 0);
    c.pm.s5_sleep_type = 0;
    let t = build(&c, BASE, MAX).unwrap();
    assert_eq!(t.blobs.len(), 6);
    assert!(find(&t, b"VIOT").is_none());
    assert_eq!(xsdt_entries(&t).len(), 3);
    let dsdt = find(&t, b"DSDT").unwrap();
    let aml = &dsdt[36..];
    assert!(!contains(aml, &PNP0501));
    assert!(!contains(aml, b"ACPI0013"));
    assert!(!contains(aml, &PNP0C0C));
    assert!(!contains(aml, &[0x8a, 43]), "no QWordMemory without mmio64");
    assert!(aml.ends_with(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0, 0, 0, 0]));
}

#[test]
fn ecam_reservation_honours_bus_start_and_high_base() {
    let mut c = config();
    c.pci.ecam_base = 0x40_0000_0000;
    c.pci.bus_start = 2;
    c.pci.bus_end = 3;
    let t = build(&c, BASE, MAX).unwrap();
    let dsdt = find(&t, b"DSDT").unwrap();
    let mut qword = vec![0x8a, 43, 0, 0, 0x0c, 0x01];
    for v in [0u64, 0x40_0020_0000, 0x40_003f_ffff, 0, 0x20_0000] {
        qword.extend_from_slice(&v.to_le_bytes());
    }
    assert!(contains(&dsdt, &qword), "QWordMemory ECAM above 4 GiB");
    assert!(contains(&dsdt, &name(b"_BBN", &[0x0a, 2])));
    let mcfg = find(&t, b"MCFG").unwrap();
    assert_eq!(u64_at(&mcfg, 44), 0x40_0000_0000, "MCFG base is bus 0's");
    assert_eq!(mcfg[54..56], [2, 3]);
}

#[test]
fn viot_layout() {
    let t = build(&config(), BASE, MAX).unwrap();
    let viot = find(&t, b"VIOT").unwrap();
    assert_eq!(viot[8], 1, "revision");
    assert_eq!(viot.len(), 48 + 16 + 2 * 24);
    assert_eq!(u16_at(&viot, 36), 3, "node count");
    assert_eq!(u16_at(&viot, 38), 48, "node offset");
    assert_eq!(u64_at(&viot, 40), 0, "reserved");

    // virtio-iommu-pci node
    let iommu = &viot[48..64];
    assert_eq!(iommu[0], 3, "type: virtio-iommu-pci");
    assert_eq!(u16_at(iommu, 2), 16, "length");
    assert_eq!(u16_at(iommu, 4), 0, "segment");
    assert_eq!(u16_at(iommu, 6), 0x0008, "BDF");
    assert_eq!(u64_at(iommu, 8), 0, "reserved");

    for (i, (first, last)) in [(0x0010u16, 0x00ffu16), (0x0100, 0x01ff)].into_iter().enumerate() {
        let off = 64 + i * 24;
        let r = &viot[off..off + 24];
        assert_eq!(r[0], 1, "type: PCI range");
        assert_eq!(u16_at(r, 2), 24, "length");
        assert_eq!(u32_at(r, 4), u32::from(first), "endpoint start == first BDF");
        assert_eq!(u16_at(r, 8), 0, "segment start");
        assert_eq!(u16_at(r, 10), 0, "segment end");
        assert_eq!(u16_at(r, 12), first, "BDF start");
        assert_eq!(u16_at(r, 14), last, "BDF end");
        assert_eq!(u16_at(r, 16), 48, "output node = IOMMU node offset");
        assert_eq!(r[18..24], [0; 6], "reserved");
    }
}

#[test]
fn viot_many_ranges_checksum() {
    // More than 255 nodes: acpi_tables' incremental checksum alone is wrong there.
    let mut c = config();
    c.viot = Some(ViotConfig {
        iommu_bdf: 0x0008,
        endpoints: (0..300u16).map(|i| (i * 8, i * 8 + 7)).collect(),
    });
    let t = build(&c, BASE, MAX).unwrap();
    let viot = find(&t, b"VIOT").unwrap();
    assert_eq!(u16_at(&viot, 36), 301);
    assert_eq!(sum(&viot), 0);

    // The largest allowed VIOT: the last node's offset still fits in 16 bits.
    c.viot = Some(ViotConfig {
        iommu_bdf: 0x0008,
        endpoints: vec![(0x10, 0x10); MAX_VIOT_RANGES],
    });
    let t = build(&c, BASE, 1 << 20).unwrap();
    let viot = find(&t, b"VIOT").unwrap();
    assert_eq!(viot.len(), 64 + 24 * MAX_VIOT_RANGES);
    assert!(viot.len() - 24 <= usize::from(u16::MAX));
    assert_eq!(u16_at(&viot, viot.len() - 24 + 16), 48, "last node's output node");
    assert_eq!(sum(&viot), 0);
}

#[test]
fn refuses_too_small_area() {
    let t = build(&config(), BASE, MAX).unwrap();
    let (addr, last) = t.blobs.last().unwrap();
    let needed = addr + last.len() as u64 - BASE;
    assert!(build(&config(), BASE, needed).is_ok());
    let err = build(&config(), BASE, needed - 1).unwrap_err();
    assert_eq!(
        err,
        AcpiError::TooLarge {
            needed,
            max_size: needed - 1
        }
    );
    assert!(err.to_string().contains(&format!("{:#x}", needed - 1)));
    assert_eq!(
        build(&config(), u64::MAX - 15, MAX),
        Err(AcpiError::AddressOverflow(u64::MAX - 15))
    );
}

#[test]
fn refuses_invalid_config() {
    let check = |f: &dyn Fn(&mut AcpiConfig), want: AcpiError, text: &str| {
        let mut c = config();
        f(&mut c);
        let err = build(&c, BASE, MAX).unwrap_err();
        assert_eq!(err, want);
        assert!(err.to_string().contains(text), "{err} should name {text}");
    };
    check(&|c| c.cpus = 0, AcpiError::InvalidCpuCount(0), "0");
    check(
        &|c| {
            c.pci.bus_start = 5;
            c.pci.bus_end = 4;
        },
        AcpiError::InvalidBusRange { start: 5, end: 4 },
        "5..=4",
    );
    check(
        &|c| c.pci.ecam_base = 0xb000_1000,
        AcpiError::InvalidEcamBase(0xb000_1000),
        "0xb0001000",
    );
    check(
        &|c| c.pci.mmio32 = (0xf000_0000, 0x2000_0000),
        AcpiError::InvalidMmio32Window {
            start: 0xf000_0000,
            size: 0x2000_0000,
        },
        "0x20000000",
    );
    check(
        &|c| c.pci.mmio32 = (0xc000_0000, 0),
        AcpiError::InvalidMmio32Window {
            start: 0xc000_0000,
            size: 0,
        },
        "0xc0000000",
    );
    check(
        &|c| c.pci.mmio64 = (u64::MAX, 2),
        AcpiError::InvalidMmio64Window {
            start: u64::MAX,
            size: 2,
        },
        "0xffffffffffffffff",
    );
    check(
        &|c| c.pm.sleep_status_port = 0,
        AcpiError::InvalidPort {
            register: "sleep status",
            port: 0,
        },
        "sleep status port 0x0",
    );
    check(&|c| c.pm.s5_sleep_type = 8, AcpiError::InvalidSleepType(8), "8");
    check(
        &|c| c.serial = Some(SerialConfig { port: 0x3f8, irq: 16 }),
        AcpiError::InvalidSerialIrq(16),
        "16",
    );
    check(
        &|c| c.power_button = Some(GedConfig { gsi: 24 }),
        AcpiError::InvalidGedGsi(24),
        "24",
    );
    check(
        &|c| {
            c.viot = Some(ViotConfig {
                iommu_bdf: 8,
                endpoints: vec![(0x20, 0x10)],
            })
        },
        AcpiError::InvalidViotRange {
            first: 0x20,
            last: 0x10,
        },
        "0x0020..=0x0010",
    );
    check(
        &|c| {
            c.viot = Some(ViotConfig {
                iommu_bdf: 8,
                endpoints: vec![(0x10, 0x10); MAX_VIOT_RANGES + 1],
            })
        },
        AcpiError::TooManyViotRanges(MAX_VIOT_RANGES + 1),
        "2728",
    );
    let err = build(&config(), BASE + 4, MAX).unwrap_err();
    assert_eq!(err, AcpiError::UnalignedBase(BASE + 4));
    assert!(err.to_string().contains("0xe0004"));
}
