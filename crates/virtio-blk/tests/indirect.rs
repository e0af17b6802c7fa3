//! Indirect descriptors (`VIRTIO_RING_F_INDIRECT_DESC`, virtio §2.7.5.3):
//! a request whose chain is in a table the ring's one descriptor points
//! to, as Linux makes every request of more than one buffer, is served like
//! a chain in the ring; a table the specification forbids puts the device
//! into NEEDS_RESET without touching the image or guest memory.

mod common;

use common::*;
use memvisor_guest::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};
use memvisor_virtio::VirtioDevice;
use memvisor_virtio_blk::wire::{F_INDIRECT_DESC, S_OK, T_IN, T_OUT};

const TABLE: u64 = BUFS;
const HDR: u64 = BUFS + 0x1000;
const STATUS: u64 = BUFS + 0x1800;
const DATA: u64 = BUFS + 0x2000;
const I: u16 = VIRTQ_DESC_F_INDIRECT;
const N: u16 = VIRTQ_DESC_F_NEXT;

/// Writes `entries` `(addr, len, flags, next)` as a descriptor table at
/// `at`.
fn table(f: &Fixture, at: u64, entries: &[(u64, u32, u16, u16)]) -> u32 {
    let mut bytes = Vec::new();
    for &(addr, len, flags, next) in entries {
        bytes.extend_from_slice(&addr.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&next.to_le_bytes());
    }
    put(&f.mem, at, &bytes);
    bytes.len() as u32
}

#[test]
fn the_device_offers_indirect_descriptors() {
    let f = Fixture::new();
    assert_ne!(f.dev.avail_features() & F_INDIRECT_DESC, 0);
}

#[test]
fn reads_and_writes_through_an_indirect_table() {
    let mut f = Fixture::new();
    // A write of two sectors in two buffers, the chain out of order in the
    // table: 0 → 2 → 1.
    let data = pattern(0, 1024);
    put(&f.mem, HDR, &hdr(T_OUT, 3));
    put(&f.mem, DATA, &data[..512]);
    put(&f.mem, DATA + 0x1000, &data[512..]);
    put(&f.mem, STATUS, &[0xff]);
    let len = table(
        &f,
        TABLE,
        &[
            (HDR, 16, N, 2),
            (STATUS, 1, W, 0),
            (DATA, 512, N, 3),
            (DATA + 0x1000, 512, N, 1),
        ],
    );
    // The WRITE flag of the descriptor that points to the table is
    // ignored (§2.7.5.3.2).
    let used = f.submit_raw(&[(TABLE, len, I | W)]).expect("answered");
    assert_eq!((used.len, get(&f.mem, STATUS, 1)[0]), (1, S_OK));
    assert_eq!(f.image.bytes()[3 * 512..5 * 512], data[..]);

    // Read them back into one buffer, the header in the ring and the rest
    // in the table (a chain may end in an indirect descriptor).
    put(&f.mem, HDR, &hdr(T_IN, 3));
    put(&f.mem, DATA, &[0; 1024]);
    put(&f.mem, STATUS, &[0xff]);
    let len = table(&f, TABLE, &[(DATA, 1024, W | N, 1), (STATUS, 1, W, 0)]);
    let used = f.submit_raw(&[(HDR, 16, 0), (TABLE, len, I)]).expect("answered");
    assert_eq!((used.len, get(&f.mem, STATUS, 1)[0]), (1025, S_OK));
    assert_eq!(get(&f.mem, DATA, 1024), data);
    assert!(!f.dev.needs_reset());
}

#[test]
fn tables_the_specification_forbids_need_a_reset_and_touch_nothing() {
    let good = |f: &Fixture| {
        put(&f.mem, HDR, &hdr(T_IN, 0));
        put(&f.mem, DATA, &[0xc3; 512]);
        put(&f.mem, STATUS, &[0xff]);
    };
    /// Lays out a chain's memory and gives its ring descriptors.
    type Chain = Box<dyn Fn(&Fixture) -> Vec<(u64, u32, u16)>>;
    let cases: Vec<(&str, Chain)> = vec![
        (
            "indirect with NEXT",
            Box::new(|f| {
                let len = table(f, TABLE, &[(HDR, 16, N, 1), (DATA, 512, W | N, 2), (STATUS, 1, W, 0)]);
                vec![(TABLE, len, I | N), (STATUS, 1, W)]
            }),
        ),
        (
            "not a whole number of descriptors",
            Box::new(|f| {
                let len = table(f, TABLE, &[(HDR, 16, N, 1), (DATA, 512, W | N, 2), (STATUS, 1, W, 0)]);
                vec![(TABLE, len - 8, I)]
            }),
        ),
        ("empty", Box::new(|_| vec![(TABLE, 0, I)])),
        (
            "an indirect descriptor inside the table",
            Box::new(|f| {
                let inner = table(f, TABLE + 0x400, &[(HDR, 16, 0, 0)]);
                let len = table(f, TABLE, &[(TABLE + 0x400, inner, I | N, 1), (STATUS, 1, W, 0)]);
                vec![(TABLE, len, I)]
            }),
        ),
        (
            "next past the table",
            Box::new(|f| {
                let len = table(f, TABLE, &[(HDR, 16, N, 5), (STATUS, 1, W, 0)]);
                vec![(TABLE, len, I)]
            }),
        ),
        (
            "a loop inside the table",
            Box::new(|f| {
                let len = table(f, TABLE, &[(HDR, 16, N, 1), (DATA, 512, W | N, 0)]);
                vec![(TABLE, len, I)]
            }),
        ),
        (
            "longer than the queue",
            Box::new(|f| {
                let mut entries: Vec<(u64, u32, u16, u16)> = (0..QUEUE_SIZE).map(|i| (DATA, 1, W | N, i + 1)).collect();
                entries.insert(0, (HDR, 16, N, 1));
                let len = table(f, TABLE, &entries);
                vec![(TABLE, len, I)]
            }),
        ),
        ("outside guest memory", Box::new(|_| vec![(RAM + 0x1000, 48, I)])),
    ];
    for (what, chain) in cases {
        let mut f = Fixture::new();
        good(&f);
        let image = f.image.bytes();
        let descs = chain(&f);
        f.driver.add_raw(&descs).unwrap();
        f.dev.queue_notify(0);
        assert!(f.dev.needs_reset(), "{what}: NEEDS_RESET");
        assert!(f.driver.pop_used().is_none(), "{what}: not completed");
        assert_eq!(get(&f.mem, STATUS, 1), [0xff], "{what}: no status written");
        assert_eq!(get(&f.mem, DATA, 512), [0xc3; 512], "{what}: no data written");
        assert!(f.image.bytes() == image, "{what}: the image is untouched");
    }
}
