//! Hostile buffers found with the `virtio_iommu_queue` and
//! `virtio_mem_queue` fuzz targets (`fuzz/`), kept as tests: a driver's
//! request, response and event buffers inside discarded memory (an
//! unplugged memory-device block) are refused with NEEDS_RESET and never
//! touched, since touching them would populate memory the host reclaimed.

mod common;

use common::*;
use memvisor_test_support::guest::VIRTQ_DESC_F_WRITE;
use memvisor_virtio::VirtioDevice;
use memvisor_virtio_iommu::request::{Attach, Request};
use memvisor_virtio_iommu::{Access, wire};
use vm_memory::{Bytes, GuestAddress};

const REQ_AT: u64 = 0x30_0000;
const RESP_AT: u64 = 0x30_1000;

fn attach_bytes() -> Vec<u8> {
    Request::Attach(Attach {
        domain: 1,
        endpoint: EP_A,
        flags: 0,
        reserved: [0; 4],
    })
    .to_bytes()
    .to_vec()
}

fn assert_untouched(f: &Fixture) {
    assert!(f.dev.needs_reset(), "the chain is refused");
    assert_eq!(
        f.memory.hot().resident_bytes(0, HOT_SIZE).unwrap(),
        0,
        "discarded memory was populated"
    );
}

#[test]
fn response_buffer_in_discarded_memory_is_not_written() {
    let mut f = Fixture::new(config());
    let attach = attach_bytes();
    f.memory
        .map
        .memory()
        .write_slice(&attach, GuestAddress(REQ_AT))
        .unwrap();
    f.requests
        .add_raw(&[
            (REQ_AT, attach.len() as u32, 0),
            (HOT_BASE + 0x2000, 4, VIRTQ_DESC_F_WRITE),
        ])
        .unwrap();
    f.dev.queue_notify(wire::REQUEST_QUEUE);
    assert!(f.requests.pop_used().is_none());
    assert_untouched(&f);
    assert_eq!(f.handle.endpoint_domain(EP_A), None, "the request was not applied");
}

#[test]
fn request_buffer_in_discarded_memory_is_not_read() {
    let mut f = Fixture::new(config());
    f.requests
        .add_raw(&[(HOT_BASE + 3 * BLOCK, 20, 0), (RESP_AT, 4, VIRTQ_DESC_F_WRITE)])
        .unwrap();
    f.dev.queue_notify(wire::REQUEST_QUEUE);
    assert!(f.requests.pop_used().is_none());
    assert_untouched(&f);
}

#[test]
fn event_buffer_in_discarded_memory_is_not_written() {
    let mut f = Fixture::new(config());
    f.events
        .add_raw(&[(HOT_BASE + BLOCK, wire::FAULT_SIZE as u32, VIRTQ_DESC_F_WRITE)])
        .unwrap();
    f.dev.write_config(wire::CONFIG_BYPASS_OFFSET, &[0]);
    // An access by an unattached endpoint without bypass faults, and the
    // fault is reported on the event queue.
    assert!(f.handle.translate(EP_A, 0, Access::Read).is_err());
    assert!(f.events.pop_used().is_none());
    assert_untouched(&f);
    assert_eq!(f.handle.dropped_faults(), 1);
}

#[test]
fn buffers_in_populated_memory_of_the_region_work() {
    let mut f = Fixture::new(config());
    f.memory.plug(0, BLOCK);
    let attach = attach_bytes();
    let (req, resp) = (HOT_BASE + 0x100, HOT_BASE + 0x200);
    f.memory.map.memory().write_slice(&attach, GuestAddress(req)).unwrap();
    f.requests
        .add_raw(&[(req, attach.len() as u32, 0), (resp, 4, VIRTQ_DESC_F_WRITE)])
        .unwrap();
    f.dev.queue_notify(wire::REQUEST_QUEUE);
    assert_eq!(f.requests.pop_used().unwrap().data[..], [0, 0, 0, 0]);
    assert!(!f.dev.needs_reset());
    assert_eq!(f.handle.endpoint_domain(EP_A), Some(1));
}
