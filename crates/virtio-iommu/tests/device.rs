//! The virtio-iommu device driven through real split virtqueues in real
//! guest memory.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_virtio::VirtioDevice;
use memvisor_virtio::device::{DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1};
use memvisor_virtio::interrupt::InterruptKind;
use memvisor_virtio_iommu::options::X86_MSI_WINDOW;
use memvisor_virtio_iommu::request::Attach;
use memvisor_virtio_iommu::wire::{self, FaultEvent};
use memvisor_virtio_iommu::{
    Access, FaultKind, IommuNotifier, IommuOptions, IommuState, Limits, LoadError, MapCause, MapEvent, MapFlags,
    MapRefusal, NotifierRefusal, Request, ReservedKind, ReservedRegion, Status, Translation, UnmapCause, UnmapEvent,
    VirtioIommu,
};
use memvisor_virtio_mem::VirtioMemRegion;

const READ: u32 = wire::MAP_F_READ;
const WRITE: u32 = wire::MAP_F_WRITE;
const MMIO: u32 = wire::MAP_F_MMIO;

fn ranges(f: &Fixture, domain: u32) -> Vec<(u64, u64)> {
    f.handle
        .mappings(domain)
        .unwrap_or_default()
        .iter()
        .map(|m| (m.virt_start, m.virt_end))
        .collect()
}

fn map_seen(seen: &[Seen]) -> Vec<(u32, u64, MapCause)> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Map {
                endpoint, iova, cause, ..
            } => Some((*endpoint, *iova, *cause)),
            _ => None,
        })
        .collect()
}

fn unmap_seen(seen: &[Seen]) -> Vec<(u32, u64, UnmapCause)> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Unmap {
                endpoint, iova, cause, ..
            } => Some((*endpoint, *iova, *cause)),
            _ => None,
        })
        .collect()
}

#[test]
fn config_space_and_features() {
    let mut f = Fixture::new(IommuOptions {
        input_start: 0x1000,
        input_end: 0xffff_ffff,
        ..config()
    });
    assert_eq!(f.dev.device_type(), 23);
    let features = f.dev.avail_features();
    for bit in [
        wire::F_INPUT_RANGE,
        wire::F_DOMAIN_RANGE,
        wire::F_MAP_UNMAP,
        wire::F_BYPASS_CONFIG,
        wire::F_MMIO,
        wire::F_PROBE,
        VIRTIO_F_VERSION_1,
    ] {
        assert_ne!(features & bit, 0, "feature {bit:#x}");
    }
    assert_eq!(
        features & wire::F_BYPASS,
        0,
        "legacy BYPASS is superseded by BYPASS_CONFIG"
    );
    assert_eq!(f.dev.queue_max_sizes().len(), 2);

    let mut cfg = [0u8; wire::CONFIG_SIZE];
    f.dev.read_config(0, &mut cfg);
    let u64_at = |o: usize| u64::from_le_bytes(cfg[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!(u64_at(0), !0xfff);
    assert_eq!((u64_at(8), u64_at(16)), (0x1000, 0xffff_ffff));
    assert_eq!((u32_at(24), u32_at(28)), (1, 1000));
    assert_eq!(u32_at(32), 512);
    assert_eq!(cfg[36], 1);
    let mut tail = [0xffu8; 8];
    f.dev.read_config(36, &mut tail);
    assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0], "reads past the end are zero");

    // The driver may write `bypass` once BYPASS_CONFIG is negotiated.
    f.dev.write_config(wire::CONFIG_BYPASS_OFFSET, &[0]);
    assert!(!f.handle.bypass());
    f.dev.write_config(wire::CONFIG_BYPASS_OFFSET, &[0xff]);
    assert!(f.handle.bypass(), "bits 1-7 ignored");
    f.dev.write_config(0, &[0; 8]);
    let mut mask = [0u8; 8];
    f.dev.read_config(0, &mut mask);
    assert_eq!(u64::from_le_bytes(mask), !0xfff, "page_size_mask is read-only");

    let mut g = Fixture::with_features(config(), Some(wire::F_MAP_UNMAP));
    g.dev.write_config(wire::CONFIG_BYPASS_OFFSET, &[0]);
    assert!(g.handle.bypass(), "without BYPASS_CONFIG the write is ignored");
    assert_eq!(g.attach(1, EP_A), Status::Ok);
}

#[test]
fn attach_and_detach_statuses() {
    let mut f = Fixture::new(config());
    assert_eq!(f.attach(1, 99), Status::NoEnt);
    assert_eq!(f.attach(0, EP_A), Status::Range);
    assert_eq!(f.attach(1001, EP_A), Status::Range);
    let reserved = Request::Attach(Attach {
        domain: 1,
        endpoint: EP_A,
        flags: 0,
        reserved: [0, 1, 0, 0],
    });
    assert_eq!(f.send(reserved), Status::Inval);
    assert_eq!(f.attach_flags(1, EP_A, 2), Status::Inval, "unknown flag bit");
    assert!(f.handle.domains().is_empty(), "failed attaches create nothing");

    assert_eq!(f.attach(1, EP_A), Status::Ok);
    assert_eq!(f.handle.endpoint_domain(EP_A), Some(1));
    assert_eq!(f.attach(1, EP_A), Status::Ok, "attaching again is harmless");
    assert_eq!(
        f.attach_flags(1, EP_B, wire::ATTACH_F_BYPASS),
        Status::Inval,
        "bypass flag inconsistent with the domain"
    );
    assert_eq!(f.attach(1, EP_B), Status::Ok);
    assert_eq!(f.handle.domains(), vec![1]);

    // Re-attach moves the endpoint.
    assert_eq!(f.attach(2, EP_A), Status::Ok);
    assert_eq!(f.handle.endpoint_domain(EP_A), Some(2));
    assert_eq!(f.handle.domains(), vec![1, 2]);

    assert_eq!(f.detach(1, 99), Status::NoEnt, "unknown endpoint");
    assert_eq!(f.detach(3, EP_A), Status::NoEnt, "unknown domain");
    assert_eq!(f.detach(1, EP_A), Status::Inval, "not attached to that domain");
    assert_eq!(f.detach(0, EP_A), Status::Range);
    assert_eq!(f.detach(2, EP_A), Status::Ok);
    assert_eq!(f.handle.endpoint_domain(EP_A), None);
    // The domain ceased to exist with its last endpoint.
    assert_eq!(f.handle.domains(), vec![1]);
    assert_eq!(f.map(2, 0x10000, 0x10fff, 0x300000, READ), Status::NoEnt);
    assert_eq!(f.detach(1, EP_B), Status::Ok);
    assert!(f.handle.domains().is_empty());
    assert_eq!(f.detach(1, EP_B), Status::NoEnt);
    assert!(!f.dev.needs_reset());
}

#[test]
fn bypass_domains_and_the_bypass_config_field() {
    let mut f = Fixture::new(config());
    // Unattached with bypass = 1: identity.
    assert_eq!(
        f.handle.translate(EP_A, 0x5000, Access::Write),
        Ok(Translation {
            gpa: 0x5000,
            len: BOOT_SIZE - 0x5000,
            mmio: false
        })
    );
    f.dev.write_config(wire::CONFIG_BYPASS_OFFSET, &[0]);
    assert_eq!(
        f.handle.translate(EP_A, 0x5000, Access::Write).unwrap_err().kind,
        FaultKind::NotAttached
    );

    assert_eq!(f.attach_flags(5, EP_A, wire::ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(f.handle.translate(EP_A, 0x5000, Access::Read).unwrap().gpa, 0x5000);
    assert_eq!(f.map(5, 0x10000, 0x10fff, 0x300000, READ), Status::Inval);
    assert_eq!(f.unmap(5, 0, 0xfff), Status::Inval);
    assert_eq!(f.attach(5, EP_B), Status::Inval, "a bypass domain needs the flag");
    assert_eq!(f.attach_flags(5, EP_B, wire::ATTACH_F_BYPASS), Status::Ok);

    // Without BYPASS_CONFIG the flag is an unknown bit.
    let mut g = Fixture::with_features(config(), Some(wire::F_MAP_UNMAP));
    assert_eq!(g.attach_flags(5, EP_A, wire::ATTACH_F_BYPASS), Status::Inval);
}

#[test]
fn map_statuses() {
    let cfg = IommuOptions {
        input_start: 0x1000,
        input_end: 0xffff_ffff,
        reserved_regions: vec![
            X86_MSI_WINDOW,
            ReservedRegion {
                start: 0x8000_0000,
                end: 0x8000_ffff,
                kind: ReservedKind::Reserved,
            },
        ],
        ..config()
    };
    let mut f = Fixture::new(cfg.clone());
    assert_eq!(f.map(1, 0x10000, 0x10fff, 0x300000, RW), Status::NoEnt);
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    assert_eq!(f.map(0, 0x10000, 0x10fff, 0x300000, RW), Status::Range);
    assert_eq!(f.map(1001, 0x10000, 0x10fff, 0x300000, RW), Status::Range);
    assert_eq!(f.map(1, 0x10000, 0x10fff, 0x300000, RW), Status::Ok);
    // Overlaps.
    assert_eq!(f.map(1, 0x10000, 0x10fff, 0x400000, RW), Status::Inval);
    assert_eq!(f.map(1, 0xf000, 0x10fff, 0x400000, RW), Status::Inval);
    assert_eq!(f.map(1, 0x10000, 0x11fff, 0x400000, RW), Status::Inval);
    assert_eq!(f.map(1, 0xe000, 0x12fff, 0x400000, RW), Status::Inval);
    // Flags.
    assert_eq!(f.map(1, 0x20000, 0x20fff, 0x400000, 8), Status::Inval);
    assert_eq!(f.map(1, 0x20000, 0x20fff, 0x400000, 1 << 31), Status::Inval);
    // virt_end < virt_start.
    assert_eq!(f.map(1, 0x20000, 0x1ffff, 0x400000, RW), Status::Inval);
    // Outside input_range.
    assert_eq!(f.map(1, 0x0, 0xfff, 0x400000, RW), Status::Range);
    assert_eq!(f.map(1, 0xffff_f000, 0x1_0000_0fff, 0x400000, RW), Status::Range);
    // Unaligned start, end + 1, phys_start.
    assert_eq!(f.map(1, 0x20800, 0x20fff, 0x400000, RW), Status::Range);
    assert_eq!(f.map(1, 0x20000, 0x20ffe, 0x400000, RW), Status::Range);
    assert_eq!(f.map(1, 0x20000, 0x20fff, 0x400800, RW), Status::Range);
    // Reserved IOVA regions.
    assert_eq!(f.map(1, 0xfee0_0000, 0xfee0_0fff, 0x400000, RW), Status::Inval);
    assert_eq!(f.map(1, 0x7fff_f000, 0x8000_0fff, 0x400000, RW), Status::Inval);
    // MMIO is accepted with F_MMIO.
    assert_eq!(f.map(1, 0x30000, 0x30fff, 0xfed0_0000, RW | MMIO), Status::Ok);
    assert_eq!(ranges(&f, 1), vec![(0x10000, 0x10fff), (0x30000, 0x30fff)]);

    // MMIO flag without F_MMIO negotiated: an unknown flag.
    let mut g = Fixture::with_features(cfg.clone(), Some(wire::F_MAP_UNMAP | wire::F_BYPASS_CONFIG));
    assert_eq!(g.attach(1, EP_A), Status::Ok);
    assert_eq!(g.map(1, 0x30000, 0x30fff, 0xfed0_0000, RW | MMIO), Status::Inval);
    // MAP/UNMAP without F_MAP_UNMAP negotiated.
    let mut h = Fixture::with_features(cfg, Some(wire::F_PROBE));
    assert_eq!(h.attach(1, EP_A), Status::Ok);
    assert_eq!(h.map(1, 0x10000, 0x10fff, 0x300000, RW), Status::Unsupp);
    assert_eq!(h.unmap(1, 0x10000, 0x10fff), Status::Unsupp);
}

#[test]
fn unmap_follows_the_seven_examples_of_the_specification() {
    // Byte granularity, as in the specification's examples.
    let cfg = IommuOptions {
        page_size_mask: 1,
        ..config()
    };
    let setup = || {
        let mut f = Fixture::new(cfg.clone());
        assert_eq!(f.attach(1, EP_A), Status::Ok);
        f
    };
    let map = |f: &mut Fixture, s: u64, e: u64| assert_eq!(f.map(1, s, e, 0x100000 + s, RW), Status::Ok);

    // (1) unmap(0, 4) on a blank space succeeds, unmaps nothing.
    let mut f = setup();
    assert_eq!(f.unmap(1, 0, 4), Status::Ok);
    assert!(ranges(&f, 1).is_empty());
    // (2) a = map(0, 9); unmap(0, 9) unmaps a.
    let mut f = setup();
    map(&mut f, 0, 9);
    assert_eq!(f.unmap(1, 0, 9), Status::Ok);
    assert!(ranges(&f, 1).is_empty());
    // (3) a = map(0, 4); b = map(5, 9); unmap(0, 9) unmaps a and b.
    let mut f = setup();
    map(&mut f, 0, 4);
    map(&mut f, 5, 9);
    assert_eq!(f.unmap(1, 0, 9), Status::Ok);
    assert!(ranges(&f, 1).is_empty());
    // (4) a = map(0, 9); unmap(0, 4) fails, unmaps nothing.
    let mut f = setup();
    map(&mut f, 0, 9);
    assert_eq!(f.unmap(1, 0, 4), Status::Range);
    assert_eq!(ranges(&f, 1), vec![(0, 9)]);
    // (5) a = map(0, 4); b = map(5, 9); unmap(0, 4) unmaps a.
    let mut f = setup();
    map(&mut f, 0, 4);
    map(&mut f, 5, 9);
    assert_eq!(f.unmap(1, 0, 4), Status::Ok);
    assert_eq!(ranges(&f, 1), vec![(5, 9)]);
    // (6) a = map(0, 4); unmap(0, 9) unmaps a.
    let mut f = setup();
    map(&mut f, 0, 4);
    assert_eq!(f.unmap(1, 0, 9), Status::Ok);
    assert!(ranges(&f, 1).is_empty());
    // (7) a = map(0, 4); b = map(10, 14); unmap(0, 14) unmaps a and b.
    let mut f = setup();
    map(&mut f, 0, 4);
    map(&mut f, 10, 14);
    assert_eq!(f.unmap(1, 0, 14), Status::Ok);
    assert!(ranges(&f, 1).is_empty());

    // A split at the end of the range is refused too, and changes nothing.
    let mut f = setup();
    map(&mut f, 0, 4);
    map(&mut f, 5, 9);
    assert_eq!(f.unmap(1, 0, 7), Status::Range);
    assert_eq!(ranges(&f, 1), vec![(0, 4), (5, 9)]);
    // The other statuses.
    assert_eq!(f.unmap(2, 0, 4), Status::NoEnt);
    assert_eq!(f.unmap(0, 0, 4), Status::Range);
    assert_eq!(f.unmap(1, 9, 5), Status::Inval);
    assert_eq!(ranges(&f, 1), vec![(0, 4), (5, 9)]);
}

#[test]
fn map_targets_must_be_populated_guest_ram() {
    let mut f = Fixture::new(config());
    let rec = RecordingNotifier::new("rec");
    f.handle.register_notifier(EP_A, rec.clone()).unwrap();
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    f.memory.plug(0, BLOCK);

    // An unplugged block.
    assert_eq!(f.map(1, 0x100000, 0x2fffff, HOT_BASE + 2 * BLOCK, RW), Status::Inval);
    // Half plugged: the second half of block 0 and the first of block 1.
    assert_eq!(f.map(1, 0x100000, 0x2fffff, HOT_BASE + MIB, RW), Status::Inval);
    // A guest-physical hole.
    assert_eq!(f.map(1, 0x100000, 0x100fff, 0x4000_0000, RW), Status::Inval);
    // Crossing the end of boot RAM into the hole.
    assert_eq!(f.map(1, 0x100000, 0x101fff, BOOT_SIZE - 0x1000, RW), Status::Inval);
    // Crossing the end of the managed region.
    f.memory.plug(HOT_SIZE - BLOCK, BLOCK);
    assert_eq!(
        f.map(1, 0x100000, 0x101fff, HOT_BASE + HOT_SIZE - 0x1000, RW),
        Status::Inval
    );
    // MMIO onto RAM: RAM must be mapped as RAM.
    assert_eq!(f.map(1, 0x100000, 0x100fff, 0x300000, READ | MMIO), Status::Inval);
    // None of them left a trace.
    assert!(ranges(&f, 1).is_empty());
    assert!(rec.take().is_empty());

    // Plugged memory: the notifier gets the host range and the manager's view.
    assert_eq!(f.map(1, 0x100000, 0x2fffff, HOT_BASE, RW), Status::Ok);
    // Boot RAM: a host range, no manager.
    assert_eq!(f.map(1, 0x400000, 0x400fff, 0x300000, READ), Status::Ok);
    // MMIO onto a hole: neither (never pinned).
    assert_eq!(f.map(1, 0x500000, 0x500fff, 0xfed0_0000, RW | MMIO), Status::Ok);
    let seen = rec.take();
    assert_eq!(
        seen,
        vec![
            Seen::Map {
                endpoint: EP_A,
                domain: 1,
                iova: 0x100000,
                size: BLOCK,
                phys: HOT_BASE,
                flags: MapFlags::READ | MapFlags::WRITE,
                cause: MapCause::Map,
                host: true,
                view: true
            },
            Seen::Map {
                endpoint: EP_A,
                domain: 1,
                iova: 0x400000,
                size: 0x1000,
                phys: 0x300000,
                flags: MapFlags::READ,
                cause: MapCause::Map,
                host: true,
                view: false
            },
            Seen::Map {
                endpoint: EP_A,
                domain: 1,
                iova: 0x500000,
                size: 0x1000,
                phys: 0xfed0_0000,
                flags: MapFlags::READ | MapFlags::WRITE | MapFlags::MMIO,
                cause: MapCause::Map,
                host: false,
                view: false
            },
        ]
    );

    // Once the rest is plugged, the half-plugged range maps.
    f.memory.plug(BLOCK, BLOCK);
    assert_eq!(f.map(1, 0x800000, 0x9fffff, HOT_BASE + MIB, RW), Status::Ok);
    // The check holds for an endpoint without any notifier too.
    assert_eq!(f.attach(2, EP_B), Status::Ok);
    assert_eq!(f.map(2, 0x100000, 0x2fffff, HOT_BASE + 4 * BLOCK, RW), Status::Inval);
    assert_eq!(f.map(2, 0x100000, 0x2fffff, HOT_BASE + BLOCK, RW), Status::Ok);
}

#[test]
fn hostile_limits_answer_nomem_and_the_device_keeps_working() {
    let mut f = Fixture::new(IommuOptions {
        limits: Limits {
            max_domains: 2,
            max_mappings_per_domain: 3,
        },
        ..config()
    });
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    assert_eq!(f.attach(2, EP_B), Status::Ok);
    assert_eq!(f.attach(3, EP_C), Status::NoMem);
    assert_eq!(f.handle.endpoint_domain(EP_C), None);
    assert_eq!(f.handle.domains(), vec![1, 2]);
    // Moving the last endpoint of a domain to a new one frees its slot.
    assert_eq!(f.attach(3, EP_B), Status::Ok);
    assert_eq!(f.handle.domains(), vec![1, 3]);
    // Attaching to an existing domain needs no slot.
    assert_eq!(f.attach(1, EP_C), Status::Ok);

    for i in 0..3 {
        let iova = 0x10000 + i * 0x1000;
        assert_eq!(f.map(1, iova, iova + 0xfff, 0x300000 + i * 0x1000, RW), Status::Ok);
    }
    assert_eq!(f.map(1, 0x20000, 0x20fff, 0x400000, RW), Status::NoMem);
    assert_eq!(ranges(&f, 1).len(), 3);
    // Other domains have their own budget.
    assert_eq!(f.map(3, 0x20000, 0x20fff, 0x400000, RW), Status::Ok);
    // Freeing one makes room again.
    assert_eq!(f.unmap(1, 0x10000, 0x10fff), Status::Ok);
    assert_eq!(f.map(1, 0x20000, 0x20fff, 0x400000, RW), Status::Ok);
    assert_eq!(f.handle.translate(EP_A, 0x20010, Access::Read).unwrap().gpa, 0x400010);
    assert!(!f.dev.needs_reset());
}

#[test]
fn probe_reports_reserved_regions_and_zero_fills() {
    let mut f = Fixture::new(IommuOptions {
        reserved_regions: vec![
            X86_MSI_WINDOW,
            ReservedRegion {
                start: 0x1000_0000,
                end: 0x1000_ffff,
                kind: ReservedKind::Reserved,
            },
        ],
        ..config()
    });
    let (status, props) = f.probe(EP_A, 512);
    assert_eq!(status, Status::Ok);
    assert_eq!(props.len(), 512);
    fn property(p: &[u8]) -> (u16, u16, u8, &[u8], u64, u64) {
        (
            u16::from_le_bytes([p[0], p[1]]),
            u16::from_le_bytes([p[2], p[3]]),
            p[4],
            &p[5..8],
            u64::from_le_bytes(p[8..16].try_into().unwrap()),
            u64::from_le_bytes(p[16..24].try_into().unwrap()),
        )
    }
    assert_eq!(
        property(&props[0..24]),
        (
            wire::PROBE_T_RESV_MEM,
            20,
            wire::RESV_MEM_T_MSI,
            &[0u8; 3][..],
            0xfee0_0000,
            0xfeef_ffff
        )
    );
    assert_eq!(
        property(&props[24..48]),
        (
            wire::PROBE_T_RESV_MEM,
            20,
            wire::RESV_MEM_T_RESERVED,
            &[0u8; 3][..],
            0x1000_0000,
            0x1000_ffff
        )
    );
    assert!(props[48..].iter().all(|&b| b == 0), "the rest is zero-filled");

    let (status, props) = f.probe(99, 512);
    assert_eq!(status, Status::NoEnt);
    assert!(props.iter().all(|&b| b == 0));
    // A properties buffer shorter than probe_size: S_INVAL, no property.
    let (status, props) = f.probe(EP_A, 100);
    assert_eq!(status, Status::Inval);
    assert_eq!(props.len(), 100);
    assert!(props.iter().all(|&b| b == 0));
    assert!(!f.dev.needs_reset());
}

#[test]
fn notifiers_see_maps_attach_replays_unmaps_and_detaches() {
    let mut f = Fixture::new(config());
    let a = RecordingNotifier::new("a");
    let b = RecordingNotifier::new("b");
    let id_a = f.handle.register_notifier(EP_A, a.clone()).unwrap();
    f.handle.register_notifier(EP_B, b.clone()).unwrap();
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    assert_eq!(f.map(1, 0x20000, 0x21fff, 0x400000, READ), Status::Ok);
    assert_eq!(f.map(1, 0x10000, 0x10fff, 0x300000, RW), Status::Ok);
    assert_eq!(
        map_seen(&a.take()),
        vec![(EP_A, 0x20000, MapCause::Map), (EP_A, 0x10000, MapCause::Map)]
    );
    assert!(b.take().is_empty());

    // Attaching B to a domain with mappings replays them, in IOVA order.
    assert_eq!(f.attach(1, EP_B), Status::Ok);
    assert_eq!(
        map_seen(&b.take()),
        vec![(EP_B, 0x10000, MapCause::Attach), (EP_B, 0x20000, MapCause::Attach)]
    );
    assert!(a.take().is_empty());

    // Now every MAP and UNMAP reaches both.
    assert_eq!(f.map(1, 0x30000, 0x30fff, 0x500000, WRITE), Status::Ok);
    assert_eq!(map_seen(&a.take()), vec![(EP_A, 0x30000, MapCause::Map)]);
    assert_eq!(map_seen(&b.take()), vec![(EP_B, 0x30000, MapCause::Map)]);
    assert_eq!(f.unmap(1, 0x30000, 0x3ffff), Status::Ok);
    assert_eq!(
        a.take(),
        vec![Seen::Unmap {
            endpoint: EP_A,
            domain: 1,
            iova: 0x30000,
            size: 0x1000,
            cause: UnmapCause::Unmap
        }]
    );
    assert_eq!(unmap_seen(&b.take()), vec![(EP_B, 0x30000, UnmapCause::Unmap)]);

    // DETACH unmaps the domain's mappings from that endpoint only.
    assert_eq!(f.detach(1, EP_B), Status::Ok);
    assert_eq!(
        unmap_seen(&b.take()),
        vec![(EP_B, 0x20000, UnmapCause::Detach), (EP_B, 0x10000, UnmapCause::Detach)]
    );
    assert!(a.take().is_empty());

    // A re-attach elsewhere is a detach (the old domain, now empty, ceases
    // to exist with its mappings) followed by an attach.
    assert_eq!(f.attach(2, EP_A), Status::Ok);
    assert_eq!(unmap_seen(&a.take()).len(), 2);
    assert_eq!(f.handle.domains(), vec![2]);

    // Unregistering unmaps; registering replays.
    assert_eq!(f.map(2, 0x40000, 0x40fff, 0x600000, RW), Status::Ok);
    a.take();
    assert!(f.handle.unregister_notifier(id_a));
    assert!(!f.handle.unregister_notifier(id_a));
    assert_eq!(unmap_seen(&a.take()), vec![(EP_A, 0x40000, UnmapCause::Unregister)]);
    let c = RecordingNotifier::new("c");
    f.handle.register_notifier(EP_A, c.clone()).unwrap();
    assert_eq!(map_seen(&c.take()), vec![(EP_A, 0x40000, MapCause::Register)]);
    assert!(f.handle.register_notifier(99, c.clone()).is_err());
}

#[test]
fn a_refusing_notifier_fails_the_map_and_nothing_is_recorded() {
    let mut f = Fixture::new(config());
    let a = RecordingNotifier::new("a");
    let b = RecordingNotifier::new("b");
    f.handle.register_notifier(EP_A, a.clone()).unwrap();
    f.handle.register_notifier(EP_B, b.clone()).unwrap();
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    assert_eq!(f.attach(1, EP_B), Status::Ok);
    b.refuse_at(0x20000, NotifierRefusal::NoResources);
    assert_eq!(f.map(1, 0x20000, 0x20fff, 0x400000, RW), Status::NoMem);
    assert!(ranges(&f, 1).is_empty());
    // A accepted first and was rolled back; B has nothing.
    assert_eq!(
        a.take(),
        vec![
            Seen::Map {
                endpoint: EP_A,
                domain: 1,
                iova: 0x20000,
                size: 0x1000,
                phys: 0x400000,
                flags: MapFlags::READ | MapFlags::WRITE,
                cause: MapCause::Map,
                host: true,
                view: false
            },
            Seen::Unmap {
                endpoint: EP_A,
                domain: 1,
                iova: 0x20000,
                size: 0x1000,
                cause: UnmapCause::Rollback
            }
        ]
    );
    assert!(b.take().is_empty());
    // Each refusal has its status: a failed consumer is a device error,
    // an address it cannot map is out of range.
    b.refuse_at(0x30000, NotifierRefusal::Failed);
    assert_eq!(f.map(1, 0x30000, 0x30fff, 0x400000, RW), Status::DevErr);
    b.refuse_at(0x30000, NotifierRefusal::OutOfRange);
    assert_eq!(f.map(1, 0x30000, 0x30fff, 0x400000, RW), Status::Range);
    // Other maps go through.
    assert_eq!(f.map(1, 0x10000, 0x10fff, 0x400000, RW), Status::Ok);
    assert_eq!(ranges(&f, 1), vec![(0x10000, 0x10fff)]);
}

#[test]
fn a_refusing_notifier_rolls_an_attach_back() {
    let mut f = Fixture::new(config());
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    for (i, iova) in [0x10000u64, 0x20000, 0x30000].into_iter().enumerate() {
        assert_eq!(
            f.map(1, iova, iova + 0xfff, 0x300000 + i as u64 * 0x1000, RW),
            Status::Ok
        );
    }
    let b = RecordingNotifier::new("b");
    f.handle.register_notifier(EP_B, b.clone()).unwrap();
    b.refuse_at(0x30000, NotifierRefusal::Invalid);
    assert_eq!(f.attach(1, EP_B), Status::Inval);
    assert_eq!(
        b.take().iter().map(|s| (s.is_map(), s.iova())).collect::<Vec<_>>(),
        vec![(true, 0x10000), (true, 0x20000), (false, 0x20000), (false, 0x10000)]
    );
    assert_eq!(f.handle.endpoint_domain(EP_B), None);
    assert_eq!(f.handle.domains(), vec![1]);
    assert_eq!(ranges(&f, 1).len(), 3);

    // A failed re-attach leaves the endpoint detached (DETACH, then the
    // failed ATTACH) and its old domain, now empty, gone.
    assert_eq!(f.attach(2, EP_B), Status::Ok);
    assert_eq!(f.attach(1, EP_B), Status::Inval);
    b.take();
    assert_eq!(f.handle.endpoint_domain(EP_B), None);
    assert_eq!(f.handle.domains(), vec![1]);

    // Once the notifier accepts, the attach replays everything.
    // (It refuses only mappings at an IOVA the domain does not use.)
    b.refuse_at(0xdead_0000, NotifierRefusal::Invalid);
    assert_eq!(f.attach(1, EP_B), Status::Ok);
    assert_eq!(map_seen(&b.take()).len(), 3);

    // A replay onto memory unplugged since the MAP fails too (rule 1).
    let mut g = Fixture::new(config());
    g.memory.plug(0, BLOCK);
    assert_eq!(g.attach(1, EP_A), Status::Ok);
    assert_eq!(g.map(1, 0x100000, 0x2fffff, HOT_BASE, RW), Status::Ok);
    g.memory.unplug(0, BLOCK); // nobody pins it: no veto
    let c = RecordingNotifier::new("c");
    g.handle.register_notifier(EP_B, c.clone()).unwrap();
    assert_eq!(g.attach(1, EP_B), Status::Inval);
    assert!(c.take().is_empty());
    let err = g.handle.register_notifier(EP_A, c.clone()).unwrap_err();
    assert!(err.to_string().contains("not entirely populated"), "{err}");
}

#[test]
fn translate_and_fault_reports_on_the_event_queue() {
    let mut f = Fixture::new(config());
    f.memory.plug(0, 2 * BLOCK);
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    assert_eq!(f.map(1, 0x10000, 0x1ffff, 0x300000, READ), Status::Ok);
    assert_eq!(f.map(1, 0x100000, 0x4fffff, HOT_BASE, RW), Status::Ok);
    assert_eq!(f.map(1, 0x600000, 0x600fff, 0xfed0_0000, RW | MMIO), Status::Ok);

    assert_eq!(
        f.handle.translate(EP_A, 0x10010, Access::Read),
        Ok(Translation {
            gpa: 0x300010,
            len: 0xfff0,
            mmio: false
        })
    );
    assert_eq!(
        f.handle.translate(EP_A, 0x101000, Access::Write),
        Ok(Translation {
            gpa: HOT_BASE + 0x1000,
            len: 2 * BLOCK - 0x1000,
            mmio: false
        })
    );
    assert_eq!(
        f.handle.translate(EP_A, 0x600008, Access::Write),
        Ok(Translation {
            gpa: 0xfed0_0008,
            len: 0xff8,
            mmio: true
        })
    );

    f.add_event_buffers(4);
    let fault_at = |f: &mut Fixture, ep, iova, access| f.handle.translate(ep, iova, access).unwrap_err().kind;
    // Unmapped.
    assert_eq!(fault_at(&mut f, EP_A, 0x50000, Access::Read), FaultKind::Unmapped);
    assert_eq!(
        f.pop_event(),
        Some(FaultEvent {
            reason: wire::FAULT_R_MAPPING,
            flags: wire::FAULT_F_READ | wire::FAULT_F_ADDRESS,
            endpoint: EP_A,
            address: 0x50000
        })
    );
    assert!(f.irq.take(InterruptKind::Queue(wire::EVENT_QUEUE)) >= 1);
    // Permission.
    assert_eq!(fault_at(&mut f, EP_A, 0x10000, Access::Write), FaultKind::Permission);
    assert_eq!(
        f.pop_event().unwrap().flags,
        wire::FAULT_F_WRITE | wire::FAULT_F_ADDRESS
    );
    // The target got unplugged after the map.
    f.memory.unplug(BLOCK, BLOCK);
    assert_eq!(
        fault_at(&mut f, EP_A, 0x100000 + BLOCK + 0x10, Access::Read),
        FaultKind::NotPopulated
    );
    let event = f.pop_event().unwrap();
    assert_eq!(
        (event.reason, event.address),
        (wire::FAULT_R_MAPPING, 0x100000 + BLOCK + 0x10)
    );
    // The part still plugged translates, clipped to the populated run.
    assert_eq!(f.handle.translate(EP_A, 0x100000, Access::Read).unwrap().len, BLOCK);
    // Not attached, bypass off.
    f.dev.write_config(wire::CONFIG_BYPASS_OFFSET, &[0]);
    assert_eq!(fault_at(&mut f, EP_B, 0x1000, Access::Read), FaultKind::NotAttached);
    let event = f.pop_event().unwrap();
    assert_eq!((event.reason, event.endpoint), (wire::FAULT_R_DOMAIN, EP_B));

    // No buffer left: the fault is counted and dropped, and still sent to
    // the VMM's subscribers.
    let faults = f.handle.subscribe_faults();
    let before = f.handle.faults();
    assert_eq!(f.handle.dropped_faults(), 0);
    assert_eq!(fault_at(&mut f, EP_A, 0x50000, Access::Read), FaultKind::Unmapped);
    assert_eq!(f.handle.dropped_faults(), 1);
    assert_eq!(f.handle.faults(), before + 1);
    assert!(f.handle.endpoint_faults(EP_A).is_some_and(|n| n >= 1));
    assert_eq!(f.handle.endpoint_faults(99), None);
    let sent = faults.try_recv().unwrap();
    assert_eq!(
        (sent.endpoint, sent.iova, sent.kind),
        (EP_A, 0x50000, FaultKind::Unmapped)
    );
    assert!(f.pop_event().is_none());
    // An unknown endpoint is not reported (no valid endpoint ID to report).
    assert_eq!(fault_at(&mut f, 99, 0x50000, Access::Read), FaultKind::UnknownEndpoint);
    assert_eq!(f.handle.dropped_faults(), 1);
    assert!(faults.try_recv().is_err());
    // A new buffer gets the next one.
    f.add_event_buffers(1);
    assert_eq!(fault_at(&mut f, EP_A, 0x60000, Access::Read), FaultKind::Unmapped);
    assert_eq!(f.pop_event().unwrap().address, 0x60000);
    assert!(!f.dev.needs_reset());
}

fn assert_needs_reset(f: &mut Fixture) {
    assert!(f.dev.needs_reset());
    assert_eq!(f.dev.device_status(), DEVICE_NEEDS_RESET);
    assert_eq!(f.config_interrupts(), 1);
    // Nothing is processed until the driver resets the device.
    let attach = Request::Attach(Attach {
        domain: 1,
        endpoint: EP_C,
        flags: 0,
        reserved: [0; 4],
    });
    assert!(f.send_raw(&[Buf::In(&attach.to_bytes()), Buf::Out(4)]).is_none());
    assert_eq!(f.handle.endpoint_domain(EP_C), None);
}

#[test]
fn malformed_requests_put_the_device_in_needs_reset() {
    let attach = Request::Attach(Attach {
        domain: 1,
        endpoint: EP_A,
        flags: 0,
        reserved: [0; 4],
    })
    .to_bytes();

    // A request shorter than its type.
    let mut f = Fixture::new(config());
    assert!(f.send_raw(&[Buf::In(&attach[..10]), Buf::Out(4)]).is_none());
    assert_needs_reset(&mut f);
    // An empty request.
    let mut f = Fixture::new(config());
    assert!(f.send_raw(&[Buf::In(&[]), Buf::Out(4)]).is_none());
    assert_needs_reset(&mut f);

    // A response buffer shorter than the tail: the request is not applied.
    let mut f = Fixture::new(config());
    assert!(f.send_raw(&[Buf::In(&attach), Buf::Out(2)]).is_none());
    assert_eq!(f.handle.endpoint_domain(EP_A), None);
    assert_needs_reset(&mut f);
    // No response buffer at all.
    let mut f = Fixture::new(config());
    assert!(f.send_raw(&[Buf::In(&attach)]).is_none());
    assert_needs_reset(&mut f);

    // A device-writable descriptor before a readable one.
    let mut f = Fixture::new(config());
    let (data, _) = f.requests.data_area();
    f.requests
        .add_raw(&[
            (data.0, 4, 2 /* VIRTQ_DESC_F_WRITE */),
            (data.0 + 64, attach.len() as u32, 0),
        ])
        .unwrap();
    f.dev.queue_notify(wire::REQUEST_QUEUE);
    assert!(f.requests.pop_used().is_none());
    assert_needs_reset(&mut f);

    // An unknown request type.
    let mut f = Fixture::new(config());
    let mut unknown = attach.clone();
    unknown[0] = 9;
    assert!(f.send_raw(&[Buf::In(&unknown), Buf::Out(4)]).is_none());
    assert_needs_reset(&mut f);

    // Requests before the malformed one were answered.
    let mut f = Fixture::new(config());
    f.requests.add(&[Buf::In(&attach), Buf::Out(4)]).unwrap();
    f.requests.add(&[Buf::In(&unknown), Buf::Out(4)]).unwrap();
    f.dev.queue_notify(wire::REQUEST_QUEUE);
    assert_eq!(f.requests.pop_used().unwrap().data[..], [0, 0, 0, 0]);
    assert!(f.requests.pop_used().is_none());
    assert_needs_reset(&mut f);

    // A device-readable event buffer.
    let mut f = Fixture::new(config());
    f.events.add(&[Buf::In(&[0; 24])]).unwrap();
    f.dev.write_config(wire::CONFIG_BYPASS_OFFSET, &[0]);
    assert!(f.handle.translate(EP_A, 0, Access::Read).is_err());
    assert_needs_reset(&mut f);
    // A reset device is inactive until the driver sets it up again.
    f.dev.reset();
    assert!(!f.dev.needs_reset());
}

#[test]
fn device_reset_detaches_everything_and_keeps_bypass() {
    let mut f = Fixture::new(config());
    let a = RecordingNotifier::new("a");
    f.handle.register_notifier(EP_A, a.clone()).unwrap();
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    assert_eq!(f.map(1, 0x10000, 0x10fff, 0x300000, RW), Status::Ok);
    f.dev.write_config(wire::CONFIG_BYPASS_OFFSET, &[0]);
    a.take();
    f.dev.reset();
    assert_eq!(unmap_seen(&a.take()), vec![(EP_A, 0x10000, UnmapCause::Reset)]);
    assert!(f.handle.domains().is_empty());
    assert_eq!(f.handle.endpoint_domain(EP_A), None);
    assert!(!f.handle.bypass(), "bypass survives a device reset");
    f.handle.system_reset();
    assert!(f.handle.bypass(), "and returns to its initial value on system reset");
}

#[test]
fn state_save_and_load_replays_mappings_in_order() {
    let mut f = Fixture::new(config());
    f.memory.plug(0, 2 * BLOCK);
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    assert_eq!(f.attach(1, EP_B), Status::Ok);
    assert_eq!(f.attach_flags(2, EP_C, wire::ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(f.map(1, 0x300000, 0x300fff, 0x300000, READ), Status::Ok);
    assert_eq!(f.map(1, 0x100000, 0x2fffff, HOT_BASE, RW), Status::Ok);
    assert_eq!(
        f.map(1, 0x20_0000_0000, 0x20_0000_0fff, 0xfed0_0000, RW | MMIO),
        Status::Ok
    );
    f.dev.write_config(wire::CONFIG_BYPASS_OFFSET, &[0]);

    assert_eq!(IommuState::VERSION, 1);
    let state = f.handle.save_state();
    let json = serde_json::to_string(&state).unwrap();
    let state: IommuState = serde_json::from_str(&json).unwrap();

    // A fresh device, given the memory map before activation.
    let fresh = || VirtioIommu::new(config(), Some(f.memory.map.clone())).unwrap();
    let dev = fresh();
    let h = dev.handle();
    let a = RecordingNotifier::new("a");
    let b = RecordingNotifier::new("b");
    h.register_notifier(EP_A, a.clone()).unwrap();
    h.register_notifier(EP_B, b.clone()).unwrap();
    h.load_state(&state).unwrap();
    let seen = a.take();
    assert_eq!(
        seen.iter()
            .map(|s| match s {
                Seen::Map {
                    iova,
                    cause,
                    host,
                    view,
                    ..
                } => (*iova, *cause, *host, *view),
                other => panic!("unexpected {other:?}"),
            })
            .collect::<Vec<_>>(),
        vec![
            (0x100000, MapCause::Restore, true, true),
            (0x300000, MapCause::Restore, true, false),
            (0x20_0000_0000, MapCause::Restore, false, false),
        ]
    );
    assert_eq!(map_seen(&b.take()).len(), 3);
    assert_eq!(h.save_state(), state);
    assert!(!h.bypass());
    assert_eq!(h.endpoint_domain(EP_C), Some(2));
    assert_eq!(h.translate(EP_A, 0x100010, Access::Write).unwrap().gpa, HOT_BASE + 0x10);

    // A mapping refused on load fails the load with a clear error and
    // leaves nothing behind.
    let dev = fresh();
    let h = dev.handle();
    let picky = RecordingNotifier::new("picky");
    picky.refuse_at(0x300000, NotifierRefusal::NoResources);
    h.register_notifier(EP_A, picky.clone()).unwrap();
    let err = h.load_state(&state).unwrap_err();
    assert!(
        matches!(
            &err,
            LoadError::Refused {
                domain: 1,
                virt_start: 0x300000,
                refusal: MapRefusal::Notifier {
                    refusal: NotifierRefusal::NoResources,
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("picky") && message.contains("0x300000"), "{message}");
    assert_eq!(
        picky.take().iter().map(|s| (s.is_map(), s.iova())).collect::<Vec<_>>(),
        vec![(true, 0x100000), (false, 0x100000)]
    );
    assert!(h.domains().is_empty());
    assert_eq!(h.endpoint_domain(EP_A), None);

    // A state naming an endpoint this topology lacks.
    let dev = VirtioIommu::new(
        IommuOptions {
            endpoints: vec![EP_A, EP_C],
            ..config()
        },
        None,
    )
    .unwrap();
    assert_eq!(dev.handle().load_state(&state), Err(LoadError::UnknownEndpoint(EP_B)));
    // An invalid mapping.
    let mut bad = state.clone();
    bad.domains[0].mappings[0].virt_start += 1;
    assert!(matches!(
        fresh().handle().load_state(&bad),
        Err(LoadError::BadMapping { .. })
    ));

    // A mapping whose memory is discarded on the destination (the source
    // ran the `warn` guard) is restored as the guest sees it, but no
    // notifier is told of it: nothing re-populates and pins that memory.
    f.memory.unplug(0, BLOCK);
    let dev = fresh();
    let h = dev.handle();
    let late = RecordingNotifier::new("late");
    h.register_notifier(EP_A, late.clone()).unwrap();
    h.load_state(&state).unwrap();
    assert_eq!(
        late.take().iter().map(|s| (s.is_map(), s.iova())).collect::<Vec<_>>(),
        vec![(true, 0x300000), (true, 0x20_0000_0000)],
        "the mapping over the unplugged block is not notified"
    );
    assert_eq!(h.unnotified_mappings(), 1);
    assert_eq!(h.save_state(), state, "the guest's view is whole");
    let restored = h.mappings(1).unwrap();
    assert!(restored.iter().any(|m| m.virt_start == 0x100000 && !m.notified));
    // An access through it faults, and a later registration is not told
    // of it either.
    assert_eq!(
        h.translate(EP_A, 0x100000, Access::Read).unwrap_err().kind,
        FaultKind::NotPopulated
    );
    let later = RecordingNotifier::new("later");
    h.register_notifier(EP_B, later.clone()).unwrap();
    assert_eq!(map_seen(&later.take()).len(), 2);
    // Without a notifier the load succeeds the same way.
    let dev = fresh();
    dev.handle().load_state(&state).unwrap();
    assert_eq!(dev.handle().unnotified_mappings(), 1);
    assert_eq!(
        dev.handle().translate(EP_A, 0x100000, Access::Read).unwrap_err().kind,
        FaultKind::NotPopulated
    );
}

/// A notifier that, while it is being told of a map, has another thread
/// try to unplug the memory: the unplug must wait until the notification
/// is over (DESIGN.md rule 3: check and pin are one step).
struct UnplugRacer {
    region: Arc<VirtioMemRegion>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    still_populated: Mutex<Option<bool>>,
}

impl IommuNotifier for UnplugRacer {
    fn name(&self) -> &str {
        "racer"
    }
    fn notify_map(&self, ev: &MapEvent<'_>) -> Result<(), NotifierRefusal> {
        let region = self.region.clone();
        let target = range(ev.phys, ev.size);
        *self.thread.lock().unwrap() = Some(std::thread::spawn(move || {
            unplug(&region, target.start() - HOT_BASE, target.len());
        }));
        // Give the unplug every chance to run; it cannot while the device
        // holds the manager's read guard for this notification.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let view = ev.populated.expect("managed memory comes with the view");
        *self.still_populated.lock().unwrap() = Some(view.is_populated(target));
        Ok(())
    }
    fn notify_unmap(&self, _: &UnmapEvent) {}
}

#[test]
fn an_unplug_waits_for_the_map_notification_that_checked_the_memory() {
    let mut f = Fixture::new(config());
    f.memory.plug(0, BLOCK);
    let racer = Arc::new(UnplugRacer {
        region: f.memory.region().clone(),
        thread: Mutex::new(None),
        still_populated: Mutex::new(None),
    });
    f.handle.register_notifier(EP_A, racer.clone()).unwrap();
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    assert_eq!(f.map(1, 0x100000, 0x2fffff, HOT_BASE, RW), Status::Ok);
    assert_eq!(*racer.still_populated.lock().unwrap(), Some(true));
    racer.thread.lock().unwrap().take().unwrap().join().unwrap();
    // The unplug happened after the notification.
    assert!(!f.memory.region().is_populated(range(HOT_BASE, BLOCK)));
}

/// A migrated device: its model restored first (domains, mappings), then
/// activated by the transport with queues at the source's indices. The
/// activation keeps the model, processes nothing, interrupts no one, and
/// the next request is answered at the next used index.
#[test]
fn a_restored_device_activates_at_the_saved_indices_keeping_its_domains() {
    use memvisor_virtio::QueueIndices;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    let mut f = Fixture::new(config());
    assert_eq!(f.attach(1, EP_A), Status::Ok);
    assert_eq!(f.map(1, 0x300000, 0x300fff, 0x300000, READ), Status::Ok);
    f.add_event_buffers(2);
    let indices = f.dev.queue_indices();
    assert_eq!(
        indices,
        [
            QueueIndices {
                next_avail: 2,
                next_used: 2,
                event_idx: false
            },
            QueueIndices::default()
        ]
    );
    let state = f.handle.save_state();

    let mut dev = VirtioIommu::new(config(), Some(f.memory.map.clone())).unwrap();
    dev.handle().load_state(&state).unwrap();
    dev.ack_features(f.dev.acked_features());
    let mut queues = vec![f.requests.device_queue(), f.events.device_queue()];
    for (queue, at) in queues.iter_mut().zip(&indices) {
        at.apply(queue);
    }
    let irq = Arc::new(memvisor_virtio::EventFdInterrupt::new(2).unwrap());
    dev.activate(f.memory.map.clone(), irq.clone(), queues).unwrap();
    assert_eq!(dev.queue_indices(), indices);
    assert_eq!(dev.handle().save_state(), state, "activation kept the domains");
    assert_eq!(dev.handle().endpoint_domain(EP_A), Some(1));
    assert_eq!(irq.take(InterruptKind::Config), 0);
    assert_eq!(irq.take(InterruptKind::Queue(0)), 0);

    // The used elements of the source's requests are never written again
    // (poisoned here to see it); the next one lands at used index 2.
    let used = f.requests.device_queue().used_ring();
    let mem = f.memory.map.memory();
    mem.write_slice(&[0xff; 16], GuestAddress(used + 4)).unwrap();
    let request = Request::Map(memvisor_virtio_iommu::request::Map {
        domain: 1,
        virt_start: 0x400000,
        virt_end: 0x400fff,
        phys_start: 0x400000,
        flags: READ,
    });
    f.requests.add(&[Buf::In(&request.to_bytes()), Buf::Out(4)]).unwrap();
    dev.queue_notify(wire::REQUEST_QUEUE);
    let answer = f.requests.pop_used().unwrap();
    assert_eq!(Status::from_u8(answer.data[0]), Some(Status::Ok));
    let mut poisoned = [0u8; 16];
    mem.read_slice(&mut poisoned, GuestAddress(used + 4)).unwrap();
    assert_eq!(poisoned, [0xff; 16]);
    assert_eq!(dev.queue_indices()[0].next_used, 3);
    assert_eq!(irq.take(InterruptKind::Queue(0)), 1);
    assert_eq!(ranges_of(&dev, 1), [(0x300000, 0x300fff), (0x400000, 0x400fff)]);
}

fn ranges_of(dev: &VirtioIommu, domain: u32) -> Vec<(u64, u64)> {
    let mut ranges: Vec<_> = dev
        .handle()
        .mappings(domain)
        .unwrap_or_default()
        .iter()
        .map(|m| (m.virt_start, m.virt_end))
        .collect();
    ranges.sort_unstable();
    ranges
}
