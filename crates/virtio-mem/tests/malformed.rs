//! Malformed requests put the device into NEEDS_RESET: the driver gets a
//! configuration interrupt, nothing more is processed until a reset, and
//! nothing the malformed request asked for happens.

mod common;

use common::*;
use memvisor_guest::VIRTQ_DESC_F_WRITE;
use memvisor_virtio::VirtioDevice;
use memvisor_virtio::device::DEVICE_NEEDS_RESET;
use memvisor_virtio::interrupt::InterruptKind;
use memvisor_virtio_mem::wire::{VIRTIO_MEM_REQ_PLUG, VirtioMemReq};

fn plug_bytes(nb_blocks: u16) -> [u8; 24] {
    VirtioMemReq {
        req_type: VIRTIO_MEM_REQ_PLUG,
        addr: BASE,
        nb_blocks,
    }
    .to_bytes()
}

/// A 64 MiB region with 16 MiB requested, which the test activated itself:
/// every request goes through its own queue, where it builds malformed
/// chains, and its interrupts are counted.
fn vm() -> Vm {
    let mut g = Vm::with_requested(16 * MIB);
    g.activate().unwrap();
    g
}

/// Sends `bufs`, checks the device entered NEEDS_RESET without answering
/// or plugging, then that it answers nothing until reset, and again after.
fn assert_needs_reset(g: &mut Vm, send: impl FnOnce(&mut Vm)) {
    assert_eq!(g.plug(BASE, 1), ACK, "works before");
    assert_eq!(g.config_irqs(), 0);
    g.irq.take(InterruptKind::Queue(0));
    send(g);
    g.dev_mut().queue_notify(0);
    assert!(g.driver().pop_used().is_none(), "the malformed request is not answered");
    assert!(g.dev().needs_reset());
    assert_eq!(g.dev().device_status(), DEVICE_NEEDS_RESET);
    assert_eq!(g.config_irqs(), 1, "the driver is told");
    assert_eq!(
        g.region().plugged_size(),
        2 * MIB,
        "the malformed request had no effect"
    );

    // A well-formed request is ignored until the reset.
    let ok = plug_bytes(1);
    assert!(g.submit(&[Buf::In(&ok), Buf::Out(10)]).is_none());
    g.dev_mut().queue_notify(0);
    assert!(g.driver().pop_used().is_none());
    assert_eq!(g.irq.take(InterruptKind::Queue(0)), 0);
    assert_eq!(g.config_irqs(), 0, "signalled once");

    g.dev_mut().reset();
    assert!(!g.dev().needs_reset());
    assert_eq!(g.region().plugged_size(), 2 * MIB, "device reset keeps the blocks");
    g.activate().unwrap();
    assert_eq!(g.state(BASE, 1), (ACK, PLUGGED));
    assert_eq!(g.plug(BASE + 2 * MIB, 1), ACK, "works after the reset");
}

#[test]
fn short_request() {
    let mut g = vm();
    assert_needs_reset(&mut g, |g| {
        g.driver().add(&[Buf::In(&plug_bytes(1)[..23]), Buf::Out(10)]).unwrap();
    });
}

#[test]
fn short_response_buffer() {
    let mut g = vm();
    assert_needs_reset(&mut g, |g| {
        // A valid PLUG of block 1 with a 9-byte response buffer: the plug
        // must not happen.
        let req = VirtioMemReq {
            req_type: VIRTIO_MEM_REQ_PLUG,
            addr: BASE + 2 * MIB,
            nb_blocks: 1,
        }
        .to_bytes();
        g.driver().add(&[Buf::In(&req), Buf::Out(9)]).unwrap();
    });
}

#[test]
fn response_split_over_small_buffers_is_fine() {
    let mut g = vm();
    let req = plug_bytes(1);
    let used = g
        .submit(&[Buf::In(&req[..10]), Buf::In(&req[10..]), Buf::Out(4), Buf::Out(6)])
        .unwrap();
    assert_eq!((used.len, used.data[0]), (10, 0));
    assert!(!g.dev().needs_reset());
}

#[test]
fn writable_before_readable() {
    let mut g = vm();
    assert_needs_reset(&mut g, |g| {
        let (data, _) = g.driver().data_area();
        g.driver()
            .add_raw(&[(data.0, 10, VIRTQ_DESC_F_WRITE), (data.0 + 64, 24, 0)])
            .unwrap();
    });
}

#[test]
fn unknown_type() {
    let mut g = vm();
    assert_needs_reset(&mut g, |g| {
        let mut req = plug_bytes(1);
        req[0] = 4;
        g.driver().add(&[Buf::In(&req), Buf::Out(10)]).unwrap();
    });
}

#[test]
fn buffer_outside_guest_memory() {
    let mut g = vm();
    assert_needs_reset(&mut g, |g| {
        let (data, _) = g.driver().data_area();
        // Between boot RAM (2 MiB) and the region (4 GiB): not memory.
        g.driver()
            .add_raw(&[(0x1000_0000, 24, 0), (data.0, 10, VIRTQ_DESC_F_WRITE)])
            .unwrap();
    });
}

#[test]
fn notify_of_a_missing_queue_is_ignored() {
    let mut g = vm();
    g.dev_mut().queue_notify(1);
    assert!(!g.dev().needs_reset());
    assert_eq!(g.plug(BASE, 1), ACK);
}
