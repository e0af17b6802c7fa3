//! The device behind virtio-iommu: every address — rings and buffers — is
//! an IOVA of its endpoint. Mapped IOVAs work, however they are split; an
//! unmapped one fails the request before anything is read or written, and
//! the IOMMU reports the fault.

mod common;

use std::sync::Arc;

use common::*;
use memvisor_dma::mapper::{DmaMapper, Permissions, PinBudget};
use memvisor_dma::uring::UringPinner;
use memvisor_guest::DriverQueue;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_virtio::{ActivateError, EventFdInterrupt, VirtioDevice};
use memvisor_virtio_blk::wire::{F_ACCESS_PLATFORM, S_IOERR, S_OK, T_IN, T_OUT};
use memvisor_virtio_blk::{BlockConfig, VirtioBlk};
use memvisor_virtio_iommu::wire::{
    FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_MAPPING, MAP_F_READ, MAP_F_WRITE,
};
use vm_memory::GuestAddress;

const EP: u32 = 5;
const DOMAIN: u32 = 1;
const RW: u32 = MAP_F_READ | MAP_F_WRITE;

/// The device's queue (rings and the driver's own data area) in guest RAM...
const QUEUE_GPA: u64 = MIB;
const QUEUE_LEN: u64 = DriverQueue::footprint(16, 64 << 10);
/// ...and where the driver mapped it.
const QUEUE_IOVA: u64 = 0x1_0000_0000;
/// A buffer area, mapped read-write.
const BUF_GPA: u64 = 4 * MIB;
const BUF_IOVA: u64 = 0x2_0000_0000;
const BUF_LEN: u64 = 256 << 10;
/// A buffer area mapped read-only.
const RO_GPA: u64 = 5 * MIB;
const RO_IOVA: u64 = 0x3_0000_0000;
/// Two IOVA pages mapped onto two guest pages in reverse order.
const SCATTER_IOVA: u64 = 0x4_0000_0000;
const SCATTER_GPA: [u64; 2] = [6 * MIB + 0x3000, 6 * MIB + 0x1000];
/// Mapped nowhere.
const UNMAPPED_IOVA: u64 = 0x5_0000_0000;

/// The IOVA of the buffer-area byte at `gpa`.
fn iova(gpa: u64) -> u64 {
    gpa - BUF_GPA + BUF_IOVA
}

struct Rig {
    mem: GuestMemoryMap,
    iommu: Iommu,
    driver: DriverQueue,
    dev: VirtioBlk,
    image: TempImage,
}

impl Rig {
    /// A device on endpoint [`EP`], attached to [`DOMAIN`] with the
    /// mappings above, activated.
    fn new() -> Self {
        let mut rig = Self::unactivated();
        rig.activate().unwrap();
        rig
    }

    fn unactivated() -> Self {
        Self::build(None)
    }

    /// [`Rig::new`] with a zero-copy pinner holding what the vIOMMU
    /// bridge would have pinned for `pinned`, a list of `(iova, gpa, len)`.
    fn zero_copy(pinned: &[(u64, u64, u64)]) -> (Self, Arc<UringPinner>) {
        let pinner = Arc::new(UringPinner::for_io("disk0", Arc::new(PinBudget::unlimited())));
        let mut rig = Self::build(Some(pinner.clone()));
        let host = rig.mem.region_at(0).unwrap().host_address();
        for &(iova, gpa, len) in pinned {
            pinner.map(iova, host + gpa, len, Permissions::READ_WRITE).unwrap();
        }
        rig.activate().unwrap();
        (rig, pinner)
    }

    fn build(zero_copy: Option<Arc<UringPinner>>) -> Self {
        let mem = memory(16 * MIB);
        let mut iommu = Iommu::new(&mem, 12 * MIB, EP, false);
        iommu.attach(DOMAIN, EP);
        iommu.map(DOMAIN, QUEUE_IOVA, QUEUE_LEN.next_multiple_of(4096), QUEUE_GPA, RW);
        iommu.map(DOMAIN, BUF_IOVA, BUF_LEN, BUF_GPA, RW);
        iommu.map(DOMAIN, RO_IOVA, 0x1_0000, RO_GPA, MAP_F_READ);
        iommu.map(DOMAIN, SCATTER_IOVA, 0x1000, SCATTER_GPA[0], RW);
        iommu.map(DOMAIN, SCATTER_IOVA + 0x1000, 0x1000, SCATTER_GPA[1], RW);
        let image = TempImage::new("iommu", 128);
        let config = BlockConfig {
            iommu: Some((iommu.handle.clone(), EP)),
            zero_copy,
            ..BlockConfig::new(&image.path)
        };
        let dev = VirtioBlk::new(config).unwrap();
        let driver = DriverQueue::new(&mem, GuestAddress(QUEUE_GPA), 16, 64 << 10).unwrap();
        Self {
            mem,
            iommu,
            driver,
            dev,
            image,
        }
    }

    /// The driver's queue with its ring addresses as IOVAs, as Linux
    /// programs them with `VIRTIO_F_ACCESS_PLATFORM`.
    fn iova_queue(&self) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut q = self.driver.device_queue();
        let to_iova = |gpa: u64| gpa - QUEUE_GPA + QUEUE_IOVA;
        let (d, a, u) = (to_iova(q.desc_table()), to_iova(q.avail_ring()), to_iova(q.used_ring()));
        q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
        q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
        q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
        q
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        self.dev.ack_features(self.dev.avail_features());
        let q = self.iova_queue();
        self.dev
            .activate(self.mem.clone(), Arc::new(EventFdInterrupt::new(1).unwrap()), vec![q])
    }

    /// Publishes raw descriptors (IOVAs), kicks, returns the used length.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) -> Option<u32> {
        self.driver.add_raw(descs).unwrap();
        self.dev.queue_notify(0);
        self.driver.pop_used().map(|u| u.len)
    }
}

const HDR_GPA: u64 = BUF_GPA;
const STATUS_GPA: u64 = BUF_GPA + 0x100;
const DATA_GPA: u64 = BUF_GPA + 0x1_0000;

#[test]
fn mapped_iovas_carry_requests() {
    mapped_iovas_carry_requests_on(Rig::new());
}

/// Zero-copy behind the IOMMU: every buffer mapping pinned (as the bridge
/// pins what the guest maps), the same requests work.
#[test]
fn mapped_and_pinned_iovas_carry_zero_copy_requests() {
    let (r, pinner) = Rig::zero_copy(&[
        (BUF_IOVA, BUF_GPA, BUF_LEN),
        (RO_IOVA, RO_GPA, 0x1_0000),
        (SCATTER_IOVA, SCATTER_GPA[0], 0x1000),
        (SCATTER_IOVA + 0x1000, SCATTER_GPA[1], 0x1000),
    ]);
    mapped_iovas_carry_requests_on(r);
    assert_eq!(pinner.mapping_count(), 4);
}

/// A mapping the IOMMU has but the pinner does not (the bridge restores a
/// mapping over unplugged memory unpinned, or failed to pin it): the
/// translation succeeds, so there is no fault, but the request fails with
/// IOERR before anything is read or written.
#[test]
fn a_mapped_but_unpinned_iova_fails_zero_copy_requests_untouched() {
    let (mut r, _pinner) = Rig::zero_copy(&[(BUF_IOVA, BUF_GPA, 0x1_0000)]);
    for req in [T_IN, T_OUT] {
        canary(&r, req);
        let flags = if req == T_IN { W } else { 0 };
        let used = r.submit(&[
            (iova(HDR_GPA), 16, 0),
            (iova(DATA_GPA), 4096, flags),
            (iova(STATUS_GPA), 1, W),
        ]);
        assert_eq!(
            (used, get(&r.mem, STATUS_GPA, 1)[0]),
            (Some(1), S_IOERR),
            "request {req}"
        );
        untouched(&r);
    }
    assert!(r.iommu.faults().is_empty());
    // The pinned part of the mapping is served.
    put(&r.mem, HDR_GPA, &hdr(T_IN, 0));
    let used = r.submit(&[
        (iova(HDR_GPA), 16, 0),
        (iova(HDR_GPA) + 0x1000, 512, W),
        (iova(STATUS_GPA), 1, W),
    ]);
    assert_eq!((used, get(&r.mem, STATUS_GPA, 1)[0]), (Some(513), S_OK));
    assert_eq!(get(&r.mem, HDR_GPA + 0x1000, 512), pattern(0, 512));
}

fn mapped_iovas_carry_requests_on(mut r: Rig) {
    assert_ne!(r.dev.avail_features() & F_ACCESS_PLATFORM, 0);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
    // OUT: the data in the read-write area and in the read-only one (the
    // device only reads it).
    put(&r.mem, HDR_GPA, &hdr(T_OUT, 4));
    put(&r.mem, DATA_GPA, &data[..4096]);
    put(&r.mem, RO_GPA, &data[4096..]);
    let used = r.submit(&[
        (iova(HDR_GPA), 16, 0),
        (iova(DATA_GPA), 4096, 0),
        (RO_IOVA, 4096, 0),
        (iova(STATUS_GPA), 1, W),
    ]);
    assert_eq!((used, get(&r.mem, STATUS_GPA, 1)[0]), (Some(1), S_OK));
    assert_eq!(&r.image.bytes()[4 * 512..4 * 512 + 8192], &data[..]);

    // IN: into one 8 KiB IOVA buffer whose two pages are scattered in
    // guest memory, in reverse order.
    put(&r.mem, HDR_GPA, &hdr(T_IN, 4));
    let used = r.submit(&[
        (iova(HDR_GPA), 16, 0),
        (SCATTER_IOVA, 8192, W),
        (iova(STATUS_GPA), 1, W),
    ]);
    assert_eq!((used, get(&r.mem, STATUS_GPA, 1)[0]), (Some(8193), S_OK));
    assert_eq!(get(&r.mem, SCATTER_GPA[0], 4096), &data[..4096]);
    assert_eq!(get(&r.mem, SCATTER_GPA[1], 4096), &data[4096..]);
    assert!(r.iommu.faults().is_empty());
    assert_eq!(r.dev.stats().iommu_faults, 0);
}

/// Fills the data area with a canary and the status with 0xff.
fn canary(r: &Rig, req_type: u32) {
    put(&r.mem, HDR_GPA, &hdr(req_type, 8));
    put(&r.mem, DATA_GPA, &[0x3c; 8192]);
    put(&r.mem, STATUS_GPA, &[0xff]);
}

fn untouched(r: &Rig) {
    assert_eq!(get(&r.mem, DATA_GPA, 8192), [0x3c; 8192], "guest memory was written");
    assert_eq!(r.image.bytes(), pattern(0, 128 * 512), "the image was written");
}

#[test]
fn unmapped_data_fails_the_request_and_is_reported() {
    let mut r = Rig::new();
    // An IN whose second data buffer is not mapped: nothing is read into
    // the first one either.
    canary(&r, T_IN);
    let used = r.submit(&[
        (iova(HDR_GPA), 16, 0),
        (iova(DATA_GPA), 4096, W),
        (UNMAPPED_IOVA + 0x200, 4096, W),
        (iova(STATUS_GPA), 1, W),
    ]);
    assert_eq!((used, get(&r.mem, STATUS_GPA, 1)[0]), (Some(1), S_IOERR));
    untouched(&r);
    let faults = r.iommu.faults();
    assert_eq!(faults.len(), 1);
    assert_eq!(
        (faults[0].endpoint, faults[0].address, faults[0].reason, faults[0].flags),
        (
            EP,
            UNMAPPED_IOVA + 0x200,
            FAULT_R_MAPPING,
            FAULT_F_WRITE | FAULT_F_ADDRESS
        )
    );

    // An OUT whose data runs off the end of its mapping.
    canary(&r, T_OUT);
    let end = iova(BUF_GPA + BUF_LEN);
    let used = r.submit(&[(iova(HDR_GPA), 16, 0), (end - 512, 1024, 0), (iova(STATUS_GPA), 1, W)]);
    assert_eq!((used, get(&r.mem, STATUS_GPA, 1)[0]), (Some(1), S_IOERR));
    untouched(&r);
    let faults = r.iommu.faults();
    assert_eq!(faults.len(), 1);
    assert_eq!(
        (faults[0].address, faults[0].flags),
        (end, FAULT_F_READ | FAULT_F_ADDRESS)
    );

    // An IN into a read-only mapping: a permission fault.
    canary(&r, T_IN);
    let used = r.submit(&[(iova(HDR_GPA), 16, 0), (RO_IOVA, 512, W), (iova(STATUS_GPA), 1, W)]);
    assert_eq!((used, get(&r.mem, STATUS_GPA, 1)[0]), (Some(1), S_IOERR));
    untouched(&r);
    assert_eq!(get(&r.mem, RO_GPA, 512), [0; 512]);
    assert_eq!(r.iommu.faults()[0].flags, FAULT_F_WRITE | FAULT_F_ADDRESS);

    // An unmapped header.
    canary(&r, T_OUT);
    let used = r.submit(&[
        (UNMAPPED_IOVA, 16, 0),
        (iova(DATA_GPA), 512, 0),
        (iova(STATUS_GPA), 1, W),
    ]);
    assert_eq!((used, get(&r.mem, STATUS_GPA, 1)[0]), (Some(1), S_IOERR));
    untouched(&r);
    assert_eq!(r.iommu.faults()[0].flags, FAULT_F_READ | FAULT_F_ADDRESS);

    let stats = r.dev.stats();
    assert_eq!((stats.iommu_faults, stats.errors, stats.requests), (4, 4, 4));
    assert!(!r.dev.needs_reset());
}

#[test]
fn an_unmapped_status_byte_completes_without_status() {
    let mut r = Rig::new();
    canary(&r, T_OUT);
    let used = r.submit(&[
        (iova(HDR_GPA), 16, 0),
        (iova(DATA_GPA), 512, 0),
        (UNMAPPED_IOVA + 7, 1, W),
    ]);
    assert_eq!(used, Some(0));
    untouched(&r);
    // A read-only status byte is not writable either.
    canary(&r, T_IN);
    let used = r.submit(&[
        (iova(HDR_GPA), 16, 0),
        (iova(DATA_GPA), 512, W),
        (RO_IOVA + 0x100, 1, W),
    ]);
    assert_eq!(used, Some(0));
    untouched(&r);
    let faults = r.iommu.faults();
    assert_eq!(
        faults.iter().map(|f| (f.address, f.flags)).collect::<Vec<_>>(),
        [
            (UNMAPPED_IOVA + 7, FAULT_F_WRITE | FAULT_F_ADDRESS),
            (RO_IOVA + 0x100, FAULT_F_WRITE | FAULT_F_ADDRESS)
        ]
    );
    assert_eq!(r.dev.stats().iommu_faults, 2);
}

#[test]
fn guest_physical_addresses_are_not_accepted_as_iovas() {
    let mut r = Rig::new();
    // The buffers' guest-physical addresses are not mapped as IOVAs.
    canary(&r, T_IN);
    let used = r.submit(&[(HDR_GPA, 16, 0), (DATA_GPA, 512, W), (iova(STATUS_GPA), 1, W)]);
    assert_eq!((used, get(&r.mem, STATUS_GPA, 1)[0]), (Some(1), S_IOERR));
    untouched(&r);
    assert_eq!(r.iommu.faults()[0].address, HDR_GPA);
}

#[test]
fn unmapped_rings_refuse_activation() {
    let mut r = Rig::unactivated();
    r.iommu.unmap(DOMAIN, QUEUE_IOVA, QUEUE_LEN.next_multiple_of(4096));
    let err = r.activate().unwrap_err();
    let ActivateError::InvalidQueue { index: 0, reason, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(
        reason.contains("descriptor table") && reason.contains(&format!("{QUEUE_IOVA:#x}")),
        "{reason}"
    );
    assert!(!r.dev.is_active());
    assert_eq!(r.iommu.faults()[0].address, QUEUE_IOVA);

    // Mapped again (somewhere else in guest memory would do as well), the
    // activation succeeds.
    r.iommu
        .map(DOMAIN, QUEUE_IOVA, QUEUE_LEN.next_multiple_of(4096), QUEUE_GPA, RW);
    r.activate().unwrap();
}

#[test]
fn activation_requires_access_platform() {
    let mut r = Rig::unactivated();
    r.dev.ack_features(r.dev.avail_features() & !F_ACCESS_PLATFORM);
    let q = r.iova_queue();
    let err = r
        .dev
        .activate(r.mem.clone(), Arc::new(EventFdInterrupt::new(1).unwrap()), vec![q])
        .unwrap_err();
    assert!(matches!(err, ActivateError::MissingFeature { bit: 33, .. }), "{err:?}");
}

#[test]
fn rings_unmapped_after_activation_need_a_reset() {
    let mut r = Rig::new();
    put(&r.mem, HDR_GPA, &hdr(T_IN, 0));
    assert_eq!(
        r.submit(&[
            (iova(HDR_GPA), 16, 0),
            (iova(DATA_GPA), 512, W),
            (iova(STATUS_GPA), 1, W)
        ]),
        Some(513)
    );
    r.iommu.unmap(DOMAIN, QUEUE_IOVA, QUEUE_LEN.next_multiple_of(4096));
    canary(&r, T_OUT);
    let used = r.submit(&[
        (iova(HDR_GPA), 16, 0),
        (iova(DATA_GPA), 512, 0),
        (iova(STATUS_GPA), 1, W),
    ]);
    assert_eq!(used, None, "nothing may be used through an unmapped ring");
    assert!(r.dev.needs_reset());
    untouched(&r);
    assert_eq!(r.iommu.faults().len(), 1);
}

#[test]
fn a_bypassing_endpoint_uses_guest_physical_addresses() {
    let mem = memory(16 * MIB);
    // Not attached, in bypass mode: IOVA = guest-physical address.
    let iommu = Iommu::new(&mem, 12 * MIB, EP, true);
    let image = TempImage::new("bypass", 16);
    let config = BlockConfig {
        iommu: Some((iommu.handle.clone(), EP)),
        ..BlockConfig::new(&image.path)
    };
    let mut dev = VirtioBlk::new(config).unwrap();
    let mut driver = DriverQueue::new(&mem, GuestAddress(QUEUE_GPA), 16, 64 << 10).unwrap();
    dev.ack_features(dev.avail_features());
    dev.activate(
        mem.clone(),
        Arc::new(EventFdInterrupt::new(1).unwrap()),
        vec![driver.device_queue()],
    )
    .unwrap();
    put(&mem, HDR_GPA, &hdr(T_IN, 1));
    driver
        .add_raw(&[(HDR_GPA, 16, 0), (DATA_GPA, 512, W), (STATUS_GPA, 1, W)])
        .unwrap();
    dev.queue_notify(0);
    assert_eq!(driver.pop_used().unwrap().len, 513);
    assert_eq!(get(&mem, DATA_GPA, 512), pattern(512, 512));
}

/// A migrated device behind the IOMMU: the transport activates a new
/// device (on the destination's image) with the driver's IOVA rings at the
/// source's indices. It translates the rings again, processes nothing,
/// interrupts no one, and the next request lands at the next used index.
#[test]
fn a_restored_device_translates_its_rings_at_the_saved_indices() {
    use memvisor_virtio::{InterruptKind, QueueIndices};
    use virtio_queue::QueueT;

    let mut r = Rig::new();
    put(&r.mem, HDR_GPA, &hdr(T_IN, 0));
    for _ in 0..2 {
        let read = [
            (iova(HDR_GPA), 16, 0),
            (iova(DATA_GPA), 512, W),
            (iova(STATUS_GPA), 1, W),
        ];
        assert_eq!(r.submit(&read), Some(513));
    }
    let indices = r.dev.queue_indices();
    assert_eq!(
        indices,
        [QueueIndices {
            next_avail: 2,
            next_used: 2,
            event_idx: false
        }]
    );

    let image = TempImage::new("iommu-restored", 128);
    let config = BlockConfig {
        iommu: Some((r.iommu.handle.clone(), EP)),
        ..BlockConfig::new(&image.path)
    };
    let mut dev = VirtioBlk::new(config).unwrap();
    dev.ack_features(r.dev.acked_features());
    let mut queue = r.iova_queue();
    indices[0].apply(&mut queue);
    let irq = Arc::new(EventFdInterrupt::new(1).unwrap());
    dev.activate(r.mem.clone(), irq.clone(), vec![queue]).unwrap();
    assert_eq!(dev.queue_indices(), indices);
    assert_eq!(
        (irq.take(InterruptKind::Queue(0)), irq.take(InterruptKind::Config)),
        (0, 0)
    );
    assert!(r.iommu.faults().is_empty());
    assert_eq!(dev.stats().requests, 0, "nothing processed");

    // The source's used elements are never written again (poisoned here
    // to see it); the next request is answered at used index 2.
    let used = r.driver.device_queue().used_ring();
    put(&r.mem, used + 4, &[0xff; 16]);
    put(&r.mem, HDR_GPA, &hdr(T_IN, 1));
    r.driver
        .add_raw(&[
            (iova(HDR_GPA), 16, 0),
            (iova(DATA_GPA), 512, W),
            (iova(STATUS_GPA), 1, W),
        ])
        .unwrap();
    dev.queue_notify(0);
    assert_eq!(r.driver.pop_used().map(|u| u.len), Some(513));
    assert_eq!(get(&r.mem, used + 4, 16), [0xff; 16]);
    assert_eq!(get(&r.mem, DATA_GPA, 512), pattern(512, 512));
    assert_eq!(dev.queue_indices()[0].next_used, 3);
    assert_eq!(irq.take(InterruptKind::Queue(0)), 1);
}

/// An indirect table's address is an IOVA too: translated like a buffer
/// (the table's entries then name IOVAs as well); at an unmapped IOVA it is
/// a fault, and a broken ring.
#[test]
fn indirect_tables_are_read_through_the_iommu() {
    use memvisor_guest::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};
    let table_gpa = BUF_GPA + 0x2000;
    let entries: [(u64, u32, u16); 3] = [
        (iova(HDR_GPA), 16, VIRTQ_DESC_F_NEXT),
        (iova(DATA_GPA), 512, W | VIRTQ_DESC_F_NEXT),
        (iova(STATUS_GPA), 1, W),
    ];
    let mut bytes = Vec::new();
    for (i, &(addr, len, flags)) in entries.iter().enumerate() {
        bytes.extend_from_slice(&addr.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(i as u16 + 1).to_le_bytes());
    }
    let mut r = Rig::new();
    put(&r.mem, table_gpa, &bytes);
    put(&r.mem, HDR_GPA, &hdr(T_IN, 0));
    put(&r.mem, STATUS_GPA, &[0xff]);
    let used = r.submit(&[(iova(table_gpa), bytes.len() as u32, VIRTQ_DESC_F_INDIRECT)]);
    assert_eq!((used, get(&r.mem, STATUS_GPA, 1)[0]), (Some(513), S_OK));
    assert_eq!(get(&r.mem, DATA_GPA, 512), pattern(0, 512));
    assert!(r.iommu.faults().is_empty());

    // The same table at an IOVA nothing maps: the IOMMU reports the fault.
    canary(&r, T_IN);
    let used = r.submit(&[(UNMAPPED_IOVA, bytes.len() as u32, VIRTQ_DESC_F_INDIRECT)]);
    assert_eq!(used, None);
    assert!(r.dev.needs_reset());
    assert!(!r.iommu.faults().is_empty());
    untouched(&r);
}
