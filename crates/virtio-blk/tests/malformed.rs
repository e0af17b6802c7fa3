//! Hostile chains and rings: a chain that cannot carry a request is
//! answered (or completed without status) and the device goes on; a broken
//! ring puts the device into NEEDS_RESET. Nothing panics, and nothing is
//! written where it should not be.

mod common;

use common::*;
use memvisor_guest::{Buf, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};
use memvisor_virtio::VirtioDevice;
use memvisor_virtio::device::DEVICE_NEEDS_RESET;
use memvisor_virtio_blk::wire::{F_INDIRECT_DESC, S_IOERR, S_OK, T_GET_ID, T_IN, T_OUT};
use virtio_queue::desc::split::Descriptor;

const HDR: u64 = BUFS;
const DATA: u64 = BUFS + 0x1000;
const STATUS: u64 = BUFS + 0x800;

/// Puts an OUT header at [`HDR`], a canary at [`DATA`] and 0xff at [`STATUS`].
fn prepare(f: &Fixture, req_type: u32) {
    put(&f.mem, HDR, &hdr(req_type, 1));
    put(&f.mem, DATA, &[0xc3; 4096]);
    put(&f.mem, STATUS, &[0xff]);
}

/// The device still answers a plain request, and is not in NEEDS_RESET.
fn still_works(f: &mut Fixture) {
    assert!(!f.dev.needs_reset());
    let used = f.read(0, 1);
    assert_eq!((used.len, used.data[512]), (513, S_OK));
}

#[test]
fn chains_without_a_status_byte_complete_with_nothing_written() {
    let mut f = Fixture::new();
    let image = f.image.bytes();
    for chain in [
        // Only device-readable buffers.
        &[(HDR, 16, 0), (DATA, 512, 0)][..],
        // The last buffer is readable.
        &[(HDR, 16, 0), (STATUS, 1, W), (DATA, 512, 0)],
        // An empty status buffer.
        &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 0, W)],
        // The status byte outside guest RAM.
        &[(HDR, 16, 0), (DATA, 512, 0), (1 << 40, 1, W)],
        &[(HDR, 16, 0), (DATA, 512, 0), (RAM, 1, W)],
        // A status buffer that wraps around the address space.
        &[(HDR, 16, 0), (DATA, 512, 0), (u64::MAX - 2, 8, W)],
    ] {
        prepare(&f, T_OUT);
        let used = f.submit_raw(chain).unwrap();
        assert_eq!(used.len, 0, "{chain:x?}");
        assert_eq!(get(&f.mem, STATUS, 1)[0], 0xff, "{chain:x?}");
        assert_eq!(get(&f.mem, DATA, 4096), [0xc3; 4096], "{chain:x?}");
    }
    assert_eq!(f.image.bytes(), image, "no OUT was carried out");
    assert_eq!(f.dev.stats().errors, 6);
    still_works(&mut f);
}

#[test]
fn chains_with_a_status_byte_get_ioerr() {
    let mut f = Fixture::new();
    let image = f.image.bytes();
    for (why, req_type, chain) in [
        ("header too short", T_OUT, &[(HDR, 15, 0), (STATUS, 1, W)][..]),
        ("no header", T_IN, &[(DATA, 512, W), (STATUS, 1, W)]),
        (
            "readable after writable",
            T_OUT,
            &[(HDR, 16, 0), (DATA, 8, W), (DATA + 8, 512, 0), (STATUS, 1, W)],
        ),
        ("header outside RAM", T_OUT, &[(1 << 40, 16, 0), (STATUS, 1, W)]),
        (
            "header across the end of RAM",
            T_OUT,
            &[(RAM - 8, 16, 0), (STATUS, 1, W)],
        ),
        (
            "OUT data outside RAM",
            T_OUT,
            &[(HDR, 16, 0), (RAM - 512, 1024, 0), (STATUS, 1, W)],
        ),
        (
            "IN data outside RAM",
            T_IN,
            &[(HDR, 16, 0), (DATA, 512, W), (1 << 40, 512, W), (STATUS, 1, W)],
        ),
        (
            "data buffer wraps",
            T_IN,
            &[(HDR, 16, 0), (u64::MAX - 100, 512, W), (STATUS, 1, W)],
        ),
        ("header wraps", T_IN, &[(u64::MAX - 7, 16, 0), (STATUS, 1, W)]),
        (
            "IN data not whole sectors",
            T_IN,
            &[(HDR, 16, 0), (DATA, 511, W), (STATUS, 1, W)],
        ),
    ] {
        prepare(&f, req_type);
        let used = f.submit_raw(chain).unwrap();
        assert_eq!((used.len, get(&f.mem, STATUS, 1)[0]), (1, S_IOERR), "{why}");
        assert_eq!(get(&f.mem, DATA, 4096), [0xc3; 4096], "{why}: data buffer touched");
    }
    assert_eq!(f.image.bytes(), image);
    assert_eq!(f.dev.stats().errors, 10);
    assert_eq!(f.config_interrupts(), 0);
    still_works(&mut f);
}

#[test]
fn get_id_into_an_unreachable_buffer_fails_cleanly() {
    let mut f = Fixture::new();
    prepare(&f, T_GET_ID);
    let used = f.submit_raw(&[(HDR, 16, 0), (RAM - 4, 20, W), (STATUS, 1, W)]).unwrap();
    assert_eq!((used.len, get(&f.mem, STATUS, 1)[0]), (1, S_IOERR));
    assert_eq!(get(&f.mem, RAM - 4, 4), [0; 4]);
    still_works(&mut f);
}

/// Kicks the device with a ring the driver broke; the device must enter
/// NEEDS_RESET, tell the driver, and process nothing more until a reset.
fn assert_needs_reset(f: &mut Fixture) {
    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = told.clone();
    f.dev.observe_needs_reset(std::sync::Arc::new(move |reason: &str| {
        sink.lock().unwrap().push(reason.into())
    }));
    f.dev.queue_notify(0);
    assert!(f.dev.needs_reset());
    let reasons = told.lock().unwrap().clone();
    assert!(
        reasons.len() == 1 && !reasons[0].is_empty(),
        "the VMM is told once, with the reason: {reasons:?}"
    );
    assert_eq!(f.dev.device_status(), DEVICE_NEEDS_RESET);
    assert_eq!(f.config_interrupts(), 1);
    // Nothing is processed any more.
    f.driver
        .add(&[Buf::In(&hdr(T_IN, 0)), Buf::Out(512), Buf::Out(1)])
        .unwrap();
    f.dev.queue_notify(0);
    assert_eq!(f.config_interrupts(), 0, "NEEDS_RESET is signalled once");
    assert_eq!(told.lock().unwrap().len(), 1, "and observed once");
    f.dev.reset();
    assert!(!f.dev.needs_reset());
}

#[test]
fn broken_rings_need_a_reset() {
    // A descriptor that links to itself.
    let mut f = Fixture::new();
    let head = f.driver.add(&[Buf::In(&hdr(T_IN, 0)), Buf::Out(1)]).unwrap();
    f.driver
        .write_descriptor(head, Descriptor::new(DATA, 16, VIRTQ_DESC_F_NEXT, head));
    assert_needs_reset(&mut f);

    // A link past the queue size.
    let mut f = Fixture::new();
    let head = f.driver.add(&[Buf::In(&hdr(T_IN, 0)), Buf::Out(1)]).unwrap();
    f.driver
        .write_descriptor(head, Descriptor::new(DATA, 16, VIRTQ_DESC_F_NEXT, 999));
    assert_needs_reset(&mut f);

    // An indirect descriptor the driver did not negotiate.
    let mut f = Fixture::acking(256, |_| {}, |offered| offered & !F_INDIRECT_DESC);
    f.driver.add_raw(&[(DATA, 16, VIRTQ_DESC_F_INDIRECT)]).unwrap();
    assert_needs_reset(&mut f);

    // An avail index far ahead of what was published.
    let mut f = Fixture::new();
    f.driver.set_avail_idx(1000);
    assert_needs_reset(&mut f);
}

#[test]
fn requests_before_a_broken_chain_are_answered() {
    let mut f = Fixture::new();
    f.driver
        .add(&[Buf::In(&hdr(T_IN, 1)), Buf::Out(512), Buf::Out(1)])
        .unwrap();
    let bad = f.driver.add(&[Buf::In(&hdr(T_IN, 0)), Buf::Out(1)]).unwrap();
    f.driver
        .write_descriptor(bad, Descriptor::new(DATA, 16, VIRTQ_DESC_F_NEXT, bad));
    f.dev.queue_notify(0);
    let used = f.driver.pop_used().unwrap();
    assert_eq!((used.len, &used.data[..512]), (513, &pattern(512, 512)[..]));
    assert!(f.driver.pop_used().is_none());
    assert!(f.dev.needs_reset());
    assert_eq!(f.queue_interrupts(), 1, "the answered request is signalled");
}

#[test]
fn notifies_of_other_queues_and_before_activation_are_ignored() {
    let mut f = Fixture::new();
    f.driver
        .add(&[Buf::In(&hdr(T_IN, 0)), Buf::Out(512), Buf::Out(1)])
        .unwrap();
    f.dev.queue_notify(1);
    f.dev.queue_notify(u16::MAX);
    assert!(f.driver.pop_used().is_none());
    f.dev.queue_notify(0);
    assert!(f.driver.pop_used().is_some());
    f.dev.reset();
    f.dev.queue_notify(0);
    assert!(!f.dev.needs_reset());
}
