//! IN, OUT, FLUSH and GET_ID through a real split virtqueue in guest
//! memory, on a real image; the specification's refusals; activation.

mod common;

use std::sync::Arc;

use common::*;
use memvisor_guest::{Buf, DriverQueue};
use memvisor_memory::discard::BlockDiscardManager;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::{Backing, GuestRange, RamBlock};
use memvisor_virtio::device::VIRTIO_F_VERSION_1;
use memvisor_virtio::{ActivateError, EventFdInterrupt, VirtioDevice};
use memvisor_virtio_blk::wire::{
    self, BlkConfig, F_RO, ID_BYTES, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT,
};
use memvisor_virtio_blk::{BlockConfig, BlockError, BlockStats, ImageError, MAX_REQUEST_BYTES, VirtioBlk};
use vm_memory::GuestAddress;

#[test]
fn written_sectors_read_back() {
    let mut f = Fixture::new();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    // The data in two descriptors, as Linux does for two pages.
    let h = hdr(T_OUT, 10);
    let used = f
        .submit(&[Buf::In(&h), Buf::In(&data[..1024]), Buf::In(&data[1024..]), Buf::Out(1)])
        .unwrap();
    assert_eq!((used.len, used.data[0]), (1, S_OK));

    let image = f.image.bytes();
    assert_eq!(&image[10 * 512..10 * 512 + 4096], &data[..]);
    assert_eq!(&image[..10 * 512], &pattern(0, 10 * 512)[..], "bytes before untouched");
    assert_eq!(
        &image[18 * 512..],
        &pattern(18 * 512, 238 * 512)[..],
        "bytes after untouched"
    );

    // Read back across three data descriptors, one sector more than written.
    let h = hdr(T_IN, 10);
    let used = f
        .submit(&[Buf::In(&h), Buf::Out(1536), Buf::Out(2560), Buf::Out(512), Buf::Out(1)])
        .unwrap();
    assert_eq!(used.len, 4608 + 1, "data plus the status byte");
    assert_eq!(&used.data[..4096], &data[..]);
    assert_eq!(&used.data[4096..4608], &pattern(18 * 512, 512)[..]);
    assert_eq!(used.data[4608], S_OK);

    // A whole-disk read at the last sector.
    let used = f.read(255, 1);
    assert_eq!(used.len, 513);
    assert_eq!(&used.data[..512], &pattern(255 * 512, 512)[..]);
    assert_eq!(used.data[512], S_OK);

    assert_eq!(
        f.dev.stats(),
        BlockStats {
            requests: 3,
            read_bytes: 4608 + 512,
            written_bytes: 4096,
            ..BlockStats::default()
        }
    );
    assert_eq!(f.queue_interrupts(), 3, "one interrupt per kick");
    assert!(!f.dev.needs_reset());
}

/// The device marks dirty exactly the guest pages it writes: an IN's data
/// buffers (filled by `preadv`, behind `vm-memory`'s back), the status
/// byte and the used ring; an OUT only the status byte and the used ring.
#[test]
fn an_in_marks_its_buffers_the_status_and_the_used_ring_dirty() {
    let mut f = Fixture::new();
    let (hdr_at, status, data) = (BUFS, BUFS + 0x100, BUFS + 0x2800);
    // The used ring of the fixture's queue is in guest page 1.
    let (used_page, bufs_page) = (1, BUFS / 4096);
    put(&f.mem, hdr_at, &hdr(T_IN, 3));
    let (used, dirty) = f.submit_raw_dirty(&[(hdr_at, 16, 0), (data, 4096, W), (status, 1, W)]);
    assert_eq!(used.map(|u| u.len), Some(4097));
    assert_eq!(get(&f.mem, data, 4096), pattern(3 * 512, 4096));
    assert_eq!(dirty, vec![used_page, bufs_page, bufs_page + 2, bufs_page + 3]);
    assert_eq!(dirty_pages(&f.mem), Vec::<u64>::new(), "a second take is empty");

    put(&f.mem, hdr_at, &hdr(T_OUT, 3));
    let (used, dirty) = f.submit_raw_dirty(&[(hdr_at, 16, 0), (data, 4096, 0), (status, 1, W)]);
    assert_eq!(used.map(|u| u.len), Some(1));
    assert_eq!(dirty, vec![used_page, bufs_page]);
}

#[test]
fn requests_without_framing_are_understood() {
    let mut f = Fixture::new();
    // Header split over two buffers, the second also holding the data;
    // the status shares the last writable buffer with the read data.
    let h = hdr(T_OUT, 3);
    let mut second = h[10..].to_vec();
    second.extend_from_slice(&[0x5a; 512]);
    let used = f.submit(&[Buf::In(&h[..10]), Buf::In(&second), Buf::Out(1)]).unwrap();
    assert_eq!(used.data[0], S_OK);
    assert_eq!(&f.image.bytes()[3 * 512..4 * 512], &[0x5a; 512][..]);

    let h = hdr(T_IN, 3);
    let used = f.submit(&[Buf::In(&h), Buf::Out(100), Buf::Out(413)]).unwrap();
    assert_eq!(used.len, 513);
    assert_eq!(&used.data[..512], &[0x5a; 512][..]);
    assert_eq!(used.data[512], S_OK);
}

#[test]
fn get_id_returns_the_padded_serial() {
    let mut f = Fixture::new();
    let h = hdr(T_GET_ID, 0);
    let used = f
        .submit(&[Buf::In(&h), Buf::Out(ID_BYTES as u32), Buf::Out(1)])
        .unwrap();
    assert_eq!(used.len, 21);
    let mut expected = [0u8; 20];
    expected[..12].copy_from_slice(b"blk-serial-7");
    assert_eq!(&used.data[..20], &expected);
    assert_eq!(used.data[20], S_OK);
    // A shorter buffer gets the serial truncated; a longer one 20 bytes.
    let used = f.submit(&[Buf::In(&h), Buf::Out(5), Buf::Out(1)]).unwrap();
    assert_eq!((used.len, &used.data[..5], used.data[5]), (6, &b"blk-s"[..], S_OK));
    let used = f.submit(&[Buf::In(&h), Buf::Out(64), Buf::Out(1)]).unwrap();
    assert_eq!(used.len, 21);

    // A 20-byte serial has no NUL.
    let mut f = Fixture::with(8, |c| c.id = "0123456789abcdefghij".into());
    let used = f.submit(&[Buf::In(&h), Buf::Out(20), Buf::Out(1)]).unwrap();
    assert_eq!(&used.data[..20], b"0123456789abcdefghij");
}

#[test]
fn flush_succeeds() {
    let mut f = Fixture::new();
    assert_eq!(f.write(0, &[1; 512]), S_OK);
    let h = hdr(T_FLUSH, 0);
    let used = f.submit(&[Buf::In(&h), Buf::Out(1)]).unwrap();
    assert_eq!((used.len, used.data[0]), (1, S_OK));
    assert_eq!(f.dev.stats().flushes, 1);
    // A read-only disk flushes too (there is nothing to flush).
    let mut f = Fixture::with(8, |c| c.read_only = true);
    let used = f.submit(&[Buf::In(&h), Buf::Out(1)]).unwrap();
    assert_eq!((used.len, used.data[0]), (1, S_OK));
}

/// Publishes a chain whose data buffer at [`BUFS`] holds a canary, and
/// returns (used length, status, whether the canary survived).
fn read_into_canary(f: &mut Fixture, sector: u64, len: u32) -> (u32, u8, bool) {
    let canary = vec![0xa5u8; len as usize];
    put(&f.mem, BUFS, &canary);
    put(&f.mem, BUFS - 0x1000, &hdr(T_IN, sector));
    put(&f.mem, BUFS - 0x10, &[0xff]);
    let used = f
        .submit_raw(&[(BUFS - 0x1000, 16, 0), (BUFS, len, W), (BUFS - 0x10, 1, W)])
        .unwrap();
    let status = get(&f.mem, BUFS - 0x10, 1)[0];
    (used.len, status, get(&f.mem, BUFS, len as usize) == canary)
}

#[test]
fn reads_outside_the_disk_fail_without_touching_memory() {
    let mut f = Fixture::new();
    assert_eq!(
        read_into_canary(&mut f, 255, 512),
        (513, S_OK, false),
        "the last sector reads"
    );
    assert_eq!(read_into_canary(&mut f, 255, 1024), (1, S_IOERR, true), "past the end");
    assert_eq!(read_into_canary(&mut f, 256, 512), (1, S_IOERR, true));
    assert_eq!(read_into_canary(&mut f, u64::MAX, 512), (1, S_IOERR, true), "overflow");
    assert_eq!(read_into_canary(&mut f, u64::MAX >> 9, 1024), (1, S_IOERR, true));
    assert_eq!(
        read_into_canary(&mut f, 0, 100),
        (1, S_IOERR, true),
        "not whole sectors"
    );
    // Writes past the end leave the image alone.
    let before = f.image.bytes();
    assert_eq!(f.write(255, &[0u8; 1024]), S_IOERR);
    assert_eq!(f.write(u64::MAX - 1, &[0u8; 1024]), S_IOERR);
    assert_eq!(f.write(1, &[0u8; 500]), S_IOERR);
    assert_eq!(f.image.bytes(), before);
    let stats = f.dev.stats();
    assert_eq!((stats.requests, stats.errors, stats.read_bytes), (9, 8, 512));
}

#[test]
fn oversized_requests_fail_before_any_buffer_is_resolved() {
    let mut f = Fixture::new();
    // 256 MiB of "data" at an address that is not even RAM: refused on its
    // length, so the buffer is never looked at.
    let big = u32::try_from(2 * MAX_REQUEST_BYTES).unwrap();
    put(&f.mem, BUFS, &hdr(T_IN, 0));
    let used = f
        .submit_raw(&[(BUFS, 16, 0), (0x10_0000_0000, big, W), (BUFS + 0x100, 1, W)])
        .unwrap();
    assert_eq!((used.len, get(&f.mem, BUFS + 0x100, 1)[0]), (1, S_IOERR));
    assert!(!f.dev.needs_reset());
}

#[test]
fn writes_to_a_read_only_disk_fail_and_change_nothing() {
    let mut f = Fixture::with(64, |c| c.read_only = true);
    assert_ne!(f.dev.avail_features() & F_RO, 0);
    let before = f.image.bytes();
    assert_eq!(f.write(0, &[0x11; 4096]), S_IOERR);
    assert_eq!(f.write(63, &[0x11; 512]), S_IOERR);
    assert_eq!(f.image.bytes(), before);
    // Reads work.
    let used = f.read(2, 2);
    assert_eq!((used.len, &used.data[..1024]), (1025, &pattern(1024, 1024)[..]));
    assert_eq!(used.data[1024], S_OK);
    let stats = f.dev.stats();
    assert_eq!((stats.errors, stats.written_bytes), (2, 0));
}

#[test]
fn unknown_types_are_unsupported() {
    let mut f = Fixture::new();
    // GET_LIFETIME, DISCARD, WRITE_ZEROES, SECURE_ERASE, ZONE_REPORT, junk.
    for t in [10, 11, 13, 14, 16, 0xdead_beef] {
        let h = hdr(t, 0);
        let used = f.submit(&[Buf::In(&h), Buf::In(&[0; 16]), Buf::Out(1)]).unwrap();
        assert_eq!((used.len, used.data[0]), (1, S_UNSUPP), "type {t}");
    }
    let stats = f.dev.stats();
    assert_eq!((stats.unsupported, stats.errors), (6, 0));
    assert_eq!(f.image.bytes(), pattern(0, 256 * 512));
}

#[test]
fn configuration_space() {
    let f = Fixture::with(1000, |_| {});
    let mut bytes = [0u8; wire::CONFIG_SIZE];
    // As a driver reads it, four bytes at a time.
    for (i, chunk) in bytes.chunks_mut(4).enumerate() {
        f.dev.read_config(i as u64 * 4, chunk);
    }
    assert_eq!(
        BlkConfig::from_bytes(&bytes),
        Some(BlkConfig {
            capacity: 1000,
            size_max: 1 << 20,
            seg_max: u32::from(QUEUE_SIZE) - 2,
            blk_size: 512,
        })
    );
    let mut past = [0xffu8; 4];
    f.dev.read_config(wire::CONFIG_SIZE as u64, &mut past);
    assert_eq!(past, [0; 4]);
    assert_eq!(f.dev.device_type(), 2);
}

#[test]
fn activation_requires_version_1_and_one_queue() {
    let image = TempImage::new("activate", 8);
    let mem = memory(4 * MIB);
    let irq = Arc::new(EventFdInterrupt::new(1).unwrap());
    let q = || {
        DriverQueue::new(&mem, GuestAddress(0), 16, 4096)
            .unwrap()
            .device_queue()
    };
    let mut dev = VirtioBlk::new(BlockConfig::new(&image.path)).unwrap();
    dev.ack_features(dev.avail_features() & !VIRTIO_F_VERSION_1);
    assert!(matches!(
        dev.activate(mem.clone(), irq.clone(), vec![q()]),
        Err(ActivateError::MissingFeature { bit: 32, .. })
    ));
    dev.ack_features(VIRTIO_F_VERSION_1);
    assert!(matches!(
        dev.activate(mem.clone(), irq.clone(), vec![q(), q()]),
        Err(ActivateError::QueueCount {
            expected: 1,
            got: 2,
            ..
        })
    ));
    assert!(!dev.is_active());
    dev.activate(mem.clone(), irq.clone(), vec![q()]).unwrap();
    assert!(matches!(
        dev.activate(mem.clone(), irq.clone(), vec![q()]),
        Err(ActivateError::AlreadyActive { .. })
    ));
    // Reset forgets the queue and the features.
    dev.reset();
    assert!(!dev.is_active());
    assert_eq!(dev.acked_features(), 0);
    assert!(matches!(
        dev.activate(mem.clone(), irq, vec![q()]),
        Err(ActivateError::MissingFeature { .. })
    ));
}

#[test]
fn a_reset_device_works_again_with_new_queues() {
    let mut f = Fixture::new();
    assert_eq!(f.write(5, &[9; 512]), S_OK);
    f.dev.reset();
    // A kick after the reset does nothing.
    f.driver
        .add(&[Buf::In(&hdr(T_IN, 5)), Buf::Out(512), Buf::Out(1)])
        .unwrap();
    f.dev.queue_notify(0);
    assert!(f.driver.pop_used().is_none());
    // The driver sets the device up again, elsewhere.
    let mut driver = DriverQueue::new(&f.mem, GuestAddress(2 * MIB), QUEUE_SIZE, 64 << 10).unwrap();
    f.dev.ack_features(f.dev.avail_features());
    f.dev
        .activate(f.mem.clone(), f.irq.clone(), vec![driver.device_queue()])
        .unwrap();
    driver
        .add(&[Buf::In(&hdr(T_IN, 5)), Buf::Out(512), Buf::Out(1)])
        .unwrap();
    f.dev.queue_notify(0);
    let used = driver.pop_used().unwrap();
    assert_eq!((&used.data[..512], used.data[512]), (&[9u8; 512][..], S_OK));
    assert_eq!(f.dev.stats().requests, 2, "counters survive a reset");
}

#[test]
fn construction_errors_name_the_image() {
    let missing = std::env::temp_dir().join(format!("memvisor-blk-missing-{}", std::process::id()));
    let err = VirtioBlk::new(BlockConfig::new(&missing)).unwrap_err();
    assert!(matches!(err, BlockError::Image(ImageError::Open { .. })), "{err}");
    assert!(err.to_string().contains(&*missing.to_string_lossy()), "{err}");

    let odd = TempImage::with_len("odd", 1000);
    let err = VirtioBlk::new(BlockConfig::new(&odd.path)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "virtio-blk image {}: size 1000 bytes is not a multiple of 512",
            odd.path.display()
        )
    );

    // Two writers on one image are refused.
    let image = TempImage::new("locked", 8);
    let first = VirtioBlk::new(BlockConfig::new(&image.path)).unwrap();
    let err = VirtioBlk::new(BlockConfig::new(&image.path)).unwrap_err();
    assert!(matches!(err, BlockError::Image(ImageError::Locked { .. })), "{err}");
    drop(first);
    VirtioBlk::new(BlockConfig::new(&image.path)).unwrap();
}

#[test]
fn buffers_in_unplugged_memory_are_never_touched() {
    let hot = Arc::new(RamBlock::new("hot", 4 * MIB, Backing::Memfd).unwrap());
    let region = GuestRange::new(1 << 32, 4 * MIB).unwrap();
    let manager = Arc::new(BlockDiscardManager::new(region, 2 * MIB).unwrap());
    let mem = GuestMemoryMap::builder()
        .ram(0, Arc::new(RamBlock::new("boot", 4 * MIB, Backing::Memfd).unwrap()))
        .unwrap()
        .managed_ram(region.start(), hot.clone(), manager.clone())
        .unwrap()
        .build()
        .unwrap();
    let image = TempImage::new("unplugged", 64);
    let mut dev = VirtioBlk::new(BlockConfig::new(&image.path)).unwrap();
    let mut driver = DriverQueue::new(&mem, GuestAddress(0), 16, 64 << 10).unwrap();
    dev.ack_features(dev.avail_features());
    dev.activate(
        mem.clone(),
        Arc::new(EventFdInterrupt::new(1).unwrap()),
        vec![driver.device_queue()],
    )
    .unwrap();
    put(&mem, 0x10_0000, &hdr(T_IN, 0));
    put(&mem, 0x10_1000, &hdr(T_OUT, 0));
    let hot_buf = region.start() + 0x1000;
    // An IN into, and an OUT from, a block that was never plugged. (The
    // IN's first data buffer is plain RAM: the test's driver reads back
    // `used.len` bytes from the first writable buffer.)
    for chain in [
        &[
            (0x10_0000, 16, 0),
            (0x10_4000, 512, W),
            (hot_buf, 4096, W),
            (0x10_2000, 1, W),
        ][..],
        &[(0x10_1000, 16, 0), (hot_buf, 4096, 0), (0x10_2000, 1, W)],
    ] {
        driver.add_raw(chain).unwrap();
        dev.queue_notify(0);
        let used = driver.pop_used().unwrap();
        assert_eq!((used.len, get(&mem, 0x10_2000, 1)[0]), (1, S_IOERR));
    }
    assert_eq!(
        hot.resident_bytes(0, 4 * MIB).unwrap(),
        0,
        "the device populated discarded memory"
    );
    assert_eq!(image.bytes(), pattern(0, 64 * 512));
    // A status byte there: completed without status, nothing done.
    driver
        .add_raw(&[(0x10_1000, 16, 0), (0x10_3000, 512, 0), (hot_buf, 1, W)])
        .unwrap();
    dev.queue_notify(0);
    assert_eq!(driver.pop_used().unwrap().len, 0);
    assert_eq!(image.bytes(), pattern(0, 64 * 512), "validated before the write");
    assert_eq!(hot.resident_bytes(0, 4 * MIB).unwrap(), 0);
    // Once plugged, the same buffers work.
    let first = GuestRange::new(region.start(), 2 * MIB).unwrap();
    manager.write().plug(first, || Ok::<_, ()>(()), |_| {}).unwrap();
    driver
        .add_raw(&[(0x10_0000, 16, 0), (hot_buf, 4096, W), (0x10_2000, 1, W)])
        .unwrap();
    dev.queue_notify(0);
    assert_eq!(driver.pop_used().unwrap().len, 4097);
    assert_eq!(get(&mem, hot_buf, 4096), pattern(0, 4096));
    assert!(!dev.needs_reset());
}
