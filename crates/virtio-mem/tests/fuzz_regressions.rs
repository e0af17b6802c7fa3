//! Inputs the `virtio_mem_queue` fuzz target (`fuzz/`) found, kept as
//! tests: a guest's descriptors may point anywhere, including into its own
//! unplugged blocks, and the device must never touch discarded memory
//! there (reading or writing it would populate what the host reclaimed).

mod common;

use common::*;
use memvisor_guest::VIRTQ_DESC_F_WRITE;
use memvisor_virtio::VirtioDevice;
use memvisor_virtio::device::DEVICE_NEEDS_RESET;
use memvisor_virtio_mem::wire::{VIRTIO_MEM_REQ_STATE, VIRTIO_MEM_REQ_UNPLUG, VirtioMemReq, VirtioMemResp};
use vm_memory::{Bytes, GuestAddress};

/// Where the test's request bytes go in boot RAM (past its own queue,
/// before the guest driver's area).
const REQ_AT: u64 = 0x8_0000;
const RESP_AT: u64 = 0x8_1000;

/// An 8 MiB-requested region the test activated itself: its chains go
/// through its own queue, with descriptors pointing anywhere.
fn vm() -> Vm {
    let mut g = Vm::with_requested(8 * MIB);
    g.activate().unwrap();
    g
}

fn put(g: &Vm, at: u64, bytes: &[u8]) {
    g.memory().memory().write_slice(bytes, GuestAddress(at)).unwrap();
}

fn state_request(addr: u64) -> [u8; 24] {
    VirtioMemReq {
        req_type: VIRTIO_MEM_REQ_STATE,
        addr,
        nb_blocks: 1,
    }
    .to_bytes()
}

/// Kicks, and checks the chain was refused as malformed: no answer,
/// NEEDS_RESET, and not one page of the region populated behind the
/// plugged blocks.
fn assert_refused(g: &mut Vm, plugged: u64) {
    g.dev_mut().queue_notify(0);
    assert!(g.driver().pop_used().is_none(), "the chain is not answered");
    assert!(g.dev().needs_reset());
    assert_eq!(g.dev().device_status(), DEVICE_NEEDS_RESET);
    assert_eq!(g.region().plugged_size(), plugged);
    assert_eq!(g.resident(), plugged, "discarded memory was populated");
}

/// The fuzzer's first crash: a response buffer inside an unplugged block
/// was written, populating a page of it (`0x1000 bytes resident in
/// discarded [0x100000000, 0x102000000)`).
#[test]
fn response_buffer_in_an_unplugged_block_is_not_written() {
    let mut g = vm();
    assert_eq!(g.resident(), 0);
    put(&g, REQ_AT, &state_request(BASE));
    g.driver()
        .add_raw(&[(REQ_AT, 24, 0), (BASE + 0x1000, 10, VIRTQ_DESC_F_WRITE)])
        .unwrap();
    assert_refused(&mut g, 0);
}

#[test]
fn request_buffer_in_an_unplugged_block_is_not_read() {
    let mut g = vm();
    g.driver()
        .add_raw(&[(BASE + 2 * MIB, 24, 0), (RESP_AT, 10, VIRTQ_DESC_F_WRITE)])
        .unwrap();
    assert_refused(&mut g, 0);
}

#[test]
fn buffer_straddling_a_plugged_and_an_unplugged_block_is_refused() {
    let mut g = vm();
    assert_eq!(g.plug(BASE, 1), ACK);
    g.touch(BASE, 2 * MIB);
    put(&g, REQ_AT, &state_request(BASE));
    g.driver()
        .add_raw(&[(REQ_AT, 24, 0), (BASE + 2 * MIB - 4, 10, VIRTQ_DESC_F_WRITE)])
        .unwrap();
    assert_refused(&mut g, 2 * MIB);
}

/// An UNPLUG whose response buffer lies in the very block it unplugs: the
/// unplug happens, and then the answer cannot be delivered without
/// populating the block again, so it is not (NEEDS_RESET).
#[test]
fn unplug_of_the_block_holding_its_own_response_buffer() {
    let mut g = vm();
    assert_eq!(g.plug(BASE, 1), ACK);
    g.touch(BASE, 2 * MIB);
    let unplug = VirtioMemReq {
        req_type: VIRTIO_MEM_REQ_UNPLUG,
        addr: BASE,
        nb_blocks: 1,
    }
    .to_bytes();
    put(&g, REQ_AT, &unplug);
    g.driver()
        .add_raw(&[(REQ_AT, 24, 0), (BASE + 0x10, 10, VIRTQ_DESC_F_WRITE)])
        .unwrap();
    assert_refused(&mut g, 0);
}

/// Plugged memory is ordinary guest RAM: buffers there work.
#[test]
fn buffers_in_plugged_blocks_work() {
    let mut g = vm();
    assert_eq!(g.plug(BASE + 2 * MIB, 1), ACK);
    let req = BASE + 2 * MIB + 0x100;
    let resp = BASE + 2 * MIB + 0x200;
    put(&g, req, &state_request(BASE + 2 * MIB));
    g.driver()
        .add_raw(&[(req, 24, 0), (resp, 10, VIRTQ_DESC_F_WRITE)])
        .unwrap();
    g.dev_mut().queue_notify(0);
    let used = g.driver().pop_used().expect("answered");
    assert_eq!(used.len, 10);
    let r = VirtioMemResp::from_bytes(&used.data).unwrap();
    assert_eq!((r.resp_type, r.state), (ACK, PLUGGED));
    assert!(!g.dev().needs_reset());
}
