//! The zero-copy path without an IOMMU: INs and OUTs are io_uring
//! `READ_FIXED`/`WRITE_FIXED` on the buffers the disk's pinner registered
//! for guest RAM (as the RAM listener registers all populated memory). A
//! buffer the pinner does not hold fails the request with
//! `VIRTIO_BLK_S_IOERR`, touching neither guest memory nor the image — the
//! `preadv` path would have served it, so these tests fail if the device
//! does not go through the pinner.

mod common;

use std::sync::Arc;

use common::*;
use memvisor_dma::mapper::{DmaMapper, Permissions, PinBudget};
use memvisor_dma::uring::UringPinner;
use memvisor_guest::{Buf, DriverQueue};
use memvisor_memory::map::GuestMemoryMap;
use memvisor_virtio::{EventFdInterrupt, VirtioDevice};
use memvisor_virtio_blk::wire::{S_IOERR, S_OK, T_IN, T_OUT};
use memvisor_virtio_blk::{BlockConfig, VirtioBlk};
use vm_memory::GuestAddress;

struct Rig {
    mem: GuestMemoryMap,
    driver: DriverQueue,
    dev: VirtioBlk,
    image: TempImage,
    pinner: Arc<UringPinner>,
}

/// A disk whose pinner has registered all of guest RAM at IOVA = GPA.
fn rig() -> Rig {
    let image = TempImage::new("zero-copy", 256);
    let mem = memory(RAM);
    let pinner = Arc::new(UringPinner::for_io("disk0", Arc::new(PinBudget::unlimited())));
    let host = mem.region_at(0).unwrap().host_address();
    pinner.map(0, host, RAM, Permissions::READ_WRITE).unwrap();
    let config = BlockConfig {
        queue_size: QUEUE_SIZE,
        zero_copy: Some(pinner.clone()),
        ..BlockConfig::new(&image.path)
    };
    let mut dev = VirtioBlk::new(config).unwrap();
    let driver = DriverQueue::new(&mem, GuestAddress(QUEUE_AT), QUEUE_SIZE, MIB).unwrap();
    dev.ack_features(dev.avail_features());
    dev.activate(
        mem.clone(),
        Arc::new(EventFdInterrupt::new(1).unwrap()),
        vec![driver.device_queue()],
    )
    .unwrap();
    Rig {
        mem,
        driver,
        dev,
        image,
        pinner,
    }
}

impl Rig {
    fn submit_raw(&mut self, descs: &[(u64, u32, u16)]) -> Option<u32> {
        self.driver.add_raw(descs).unwrap();
        self.dev.queue_notify(0);
        self.driver.pop_used().map(|u| u.len)
    }
}

const HDR: u64 = BUFS;
const STATUS: u64 = BUFS + 0x100;
/// Two data buffers, the second in another MiB of guest RAM.
const DATA: [u64; 2] = [BUFS + 0x1000, BUFS + MIB + 0x3000];

#[test]
fn requests_move_data_through_the_registered_buffers() {
    let mut r = rig();
    // An OUT of two buffers, then an IN of the same sectors through the
    // driver's own data area.
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 1) as u8).collect();
    put(&r.mem, HDR, &hdr(T_OUT, 10));
    put(&r.mem, DATA[0], &data[..4096]);
    put(&r.mem, DATA[1], &data[4096..]);
    let used = r.submit_raw(&[(HDR, 16, 0), (DATA[0], 4096, 0), (DATA[1], 4096, 0), (STATUS, 1, W)]);
    assert_eq!((used, get(&r.mem, STATUS, 1)[0]), (Some(1), S_OK));
    assert_eq!(&r.image.bytes()[10 * 512..10 * 512 + 8192], &data[..]);
    let h = hdr(T_IN, 10);
    r.driver.add(&[Buf::In(&h), Buf::Out(8192), Buf::Out(1)]).unwrap();
    r.dev.queue_notify(0);
    let used = r.driver.pop_used().unwrap();
    assert_eq!((used.len, used.data[8192]), (8193, S_OK));
    assert_eq!(&used.data[..8192], &data[..]);
    let stats = r.dev.stats();
    assert_eq!((stats.read_bytes, stats.written_bytes, stats.errors), (8192, 8192, 0));
    // The device pinned nothing of its own: the pinner holds what it held.
    assert_eq!((r.pinner.pinned_bytes(), r.pinner.mapping_count()), (RAM, 1));
}

#[test]
fn a_buffer_the_pinner_does_not_hold_fails_untouched() {
    let mut r = rig();
    // The second data buffer's MiB is no longer registered (as after an
    // unplug, or a vIOMMU mapping restored unpinned).
    r.pinner.unmap(0, RAM).unwrap();
    let host = r.mem.region_at(0).unwrap().host_address();
    let hole = BUFS + MIB;
    r.pinner.map(0, host, hole, Permissions::READ_WRITE).unwrap();
    r.pinner
        .map(hole + MIB, host + hole + MIB, RAM - hole - MIB, Permissions::READ_WRITE)
        .unwrap();
    let image = r.image.bytes();
    for (req, flags) in [(T_IN, W), (T_OUT, 0)] {
        put(&r.mem, HDR, &hdr(req, 4));
        put(&r.mem, DATA[0], &[0x3c; 4096]);
        put(&r.mem, DATA[1], &[0x3c; 4096]);
        let used = r.submit_raw(&[
            (HDR, 16, 0),
            (DATA[0], 4096, flags),
            (DATA[1], 4096, flags),
            (STATUS, 1, W),
        ]);
        assert_eq!((used, get(&r.mem, STATUS, 1)[0]), (Some(1), S_IOERR), "request {req}");
        assert_eq!(get(&r.mem, DATA[0], 4096), [0x3c; 4096], "guest memory was written");
        assert_eq!(r.image.bytes(), image, "the image was written");
    }
    // Registered again: served.
    r.pinner.map(hole, host + hole, MIB, Permissions::READ_WRITE).unwrap();
    put(&r.mem, HDR, &hdr(T_IN, 4));
    let used = r.submit_raw(&[(HDR, 16, 0), (DATA[0], 4096, W), (DATA[1], 4096, W), (STATUS, 1, W)]);
    assert_eq!((used, get(&r.mem, STATUS, 1)[0]), (Some(8193), S_OK));
    assert_eq!(get(&r.mem, DATA[1], 4096), pattern(4 * 512 + 4096, 4096));
    assert_eq!(r.dev.stats().errors, 2);
}
