//! The zero-copy path without an IOMMU: INs and OUTs move data straight
//! on the buffers the disk's pinner registered
//! for guest RAM (as the RAM listener registers all populated memory). A
//! buffer the pinner does not hold fails the request with
//! `VIRTIO_BLK_S_IOERR`, touching neither guest memory nor the image — the
//! `preadv` path would have served it, so these tests fail if the device
//! does not go through the pinner.

mod common;

use std::sync::Arc;

use common::*;
use memvisor_dma::attach::AttachLatch;
use memvisor_dma::mapper::{DmaMapper, Permissions, PinBudget};
use memvisor_dma::uring::UringPinner;
use memvisor_virtio_blk::wire::{S_IOERR, S_OK, T_IN, T_OUT};

/// The common fixture's disk with a zero-copy pinner that has registered
/// all of guest RAM at IOVA = GPA (after the fixture made the memory: the
/// device asks its pinner only per request).
fn rig() -> (Fixture, Arc<UringPinner>) {
    let pinner = Arc::new(UringPinner::for_io("disk0", Arc::new(PinBudget::unlimited())));
    let f = Fixture::with(256, |c| c.zero_copy = Some(pinner.clone()));
    pinner.map(0, host(&f), RAM, Permissions::READ_WRITE).unwrap();
    (f, pinner)
}

/// Host address of guest RAM.
fn host(f: &Fixture) -> u64 {
    f.mem.region_at(0).unwrap().host_address()
}

/// Publishes raw descriptors, kicks, returns the used length.
fn submit(f: &mut Fixture, descs: &[(u64, u32, u16)]) -> Option<u32> {
    f.submit_raw(descs).map(|u| u.len)
}

const HDR: u64 = BUFS;
const STATUS: u64 = BUFS + 0x100;
/// Two data buffers, the second in another MiB of guest RAM.
const DATA: [u64; 2] = [BUFS + 0x1000, BUFS + MIB + 0x3000];

#[test]
fn requests_move_data_through_the_registered_buffers() {
    let (mut f, pinner) = rig();
    // An OUT of two buffers, then an IN of the same sectors through the
    // driver's own data area.
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 1) as u8).collect();
    put(&f.mem, HDR, &hdr(T_OUT, 10));
    put(&f.mem, DATA[0], &data[..4096]);
    put(&f.mem, DATA[1], &data[4096..]);
    let used = submit(
        &mut f,
        &[(HDR, 16, 0), (DATA[0], 4096, 0), (DATA[1], 4096, 0), (STATUS, 1, W)],
    );
    assert_eq!((used, get(&f.mem, STATUS, 1)[0]), (Some(1), S_OK));
    assert_eq!(&f.image.bytes()[10 * 512..10 * 512 + 8192], &data[..]);
    let used = f.read(10, 16);
    assert_eq!((used.len, used.data[8192]), (8193, S_OK));
    assert_eq!(&used.data[..8192], &data[..]);
    let stats = f.dev.stats();
    assert_eq!((stats.read_bytes, stats.written_bytes, stats.errors), (8192, 8192, 0));
    // The device pinned nothing of its own: the pinner holds what it held.
    assert_eq!((pinner.pinned_bytes(), pinner.mapping_count()), (RAM, 1));
}

#[test]
fn a_buffer_the_pinner_does_not_hold_fails_untouched() {
    let (mut f, pinner) = rig();
    // The second data buffer's MiB is no longer registered (as after an
    // unplug, or a vIOMMU mapping restored unpinned).
    pinner.unmap(0, RAM).unwrap();
    let host = host(&f);
    let hole = BUFS + MIB;
    pinner.map(0, host, hole, Permissions::READ_WRITE).unwrap();
    pinner
        .map(hole + MIB, host + hole + MIB, RAM - hole - MIB, Permissions::READ_WRITE)
        .unwrap();
    let image = f.image.bytes();
    for (req, flags) in [(T_IN, W), (T_OUT, 0)] {
        put(&f.mem, HDR, &hdr(req, 4));
        put(&f.mem, DATA[0], &[0x3c; 4096]);
        put(&f.mem, DATA[1], &[0x3c; 4096]);
        let used = submit(
            &mut f,
            &[
                (HDR, 16, 0),
                (DATA[0], 4096, flags),
                (DATA[1], 4096, flags),
                (STATUS, 1, W),
            ],
        );
        assert_eq!((used, get(&f.mem, STATUS, 1)[0]), (Some(1), S_IOERR), "request {req}");
        assert_eq!(get(&f.mem, DATA[0], 4096), [0x3c; 4096], "guest memory was written");
        assert_eq!(f.image.bytes(), image, "the image was written");
    }
    // Registered again: served.
    pinner.map(hole, host + hole, MIB, Permissions::READ_WRITE).unwrap();
    put(&f.mem, HDR, &hdr(T_IN, 4));
    let used = submit(
        &mut f,
        &[(HDR, 16, 0), (DATA[0], 4096, W), (DATA[1], 4096, W), (STATUS, 1, W)],
    );
    assert_eq!((used, get(&f.mem, STATUS, 1)[0]), (Some(8193), S_OK));
    assert_eq!(get(&f.mem, DATA[1], 4096), pattern(4 * 512 + 4096, 4096));
    assert_eq!(f.dev.stats().errors, 2);
}

/// The kernel fills a zero-copy IN's buffers through the pins, behind
/// `vm-memory`'s back: the device marks exactly their pages dirty (with
/// the status byte's and the used ring's), and a second take is empty.
#[test]
fn a_zero_copy_in_marks_its_buffers_dirty() {
    let (mut f, _pinner) = rig();
    put(&f.mem, HDR, &hdr(T_IN, 6));
    let (used, dirty) = f.submit_raw_dirty(&[
        (HDR, 16, 0),
        (DATA[0], 4096, W),
        (DATA[1] + 0x800, 4096, W),
        (STATUS, 1, W),
    ]);
    assert_eq!((used.map(|u| u.len), get(&f.mem, STATUS, 1)[0]), (Some(8193), S_OK));
    assert_eq!(get(&f.mem, DATA[1] + 0x800, 4096), pattern(6 * 512 + 4096, 4096));
    let page = |gpa: u64| gpa / 4096;
    // Used ring (page 1), header and status, the first buffer, the two
    // pages the second one straddles.
    assert_eq!(
        dirty,
        vec![1, page(HDR), page(DATA[0]), page(DATA[1]), page(DATA[1]) + 1]
    );
    assert!(dirty_pages(&f.mem).is_empty());
}

/// The common fixture's disk with a zero-copy pinner that has registered
/// nothing yet, and the latch its transfers wait for, still closed.
fn attaching_rig() -> (Fixture, Arc<UringPinner>, AttachLatch) {
    let pinner = Arc::new(UringPinner::for_io("disk0", Arc::new(PinBudget::unlimited())));
    let ready = AttachLatch::pending();
    let f = Fixture::with(256, |c| {
        c.zero_copy = Some(pinner.clone());
        c.zero_copy_ready = ready.clone();
    });
    (f, pinner, ready)
}

/// A VMM may still be pinning guest RAM for the disk when the guest's first
/// request comes (`Machine::new_attaching`): the request waits for the
/// latch and is then served, not refused for memory not pinned yet.
#[test]
fn a_request_before_the_attachment_waits_for_it() {
    let (mut f, pinner, ready) = attaching_rig();
    let host = host(&f);
    let attach = std::thread::spawn(move || {
        // Long enough that the request below is already waiting.
        std::thread::sleep(std::time::Duration::from_millis(100));
        pinner.map(0, host, RAM, Permissions::READ_WRITE).unwrap();
        ready.finish(Ok(()));
    });
    put(&f.mem, HDR, &hdr(T_IN, 4));
    let used = submit(&mut f, &[(HDR, 16, 0), (DATA[0], 4096, W), (STATUS, 1, W)]);
    assert_eq!((used, get(&f.mem, STATUS, 1)[0]), (Some(4097), S_OK));
    assert_eq!(get(&f.mem, DATA[0], 4096), pattern(4 * 512, 4096));
    attach.join().unwrap();
}

/// If the attachment failed, zero-copy requests fail with
/// `VIRTIO_BLK_S_IOERR`, touching neither guest memory nor the image.
#[test]
fn a_failed_attachment_fails_requests_untouched() {
    let (mut f, pinner, ready) = attaching_rig();
    // Everything is registered: only the latch's outcome refuses.
    pinner.map(0, host(&f), RAM, Permissions::READ_WRITE).unwrap();
    ready.finish(Err("pin budget of 1 MiB exceeded".into()));
    let image = f.image.bytes();
    for (req, flags) in [(T_IN, W), (T_OUT, 0)] {
        put(&f.mem, HDR, &hdr(req, 4));
        put(&f.mem, DATA[0], &[0x3c; 4096]);
        let used = submit(&mut f, &[(HDR, 16, 0), (DATA[0], 4096, flags), (STATUS, 1, W)]);
        assert_eq!((used, get(&f.mem, STATUS, 1)[0]), (Some(1), S_IOERR), "request {req}");
        assert_eq!(get(&f.mem, DATA[0], 4096), [0x3c; 4096], "guest memory was written");
        assert_eq!(f.image.bytes(), image, "the image was written");
    }
}
