//! What the DMA tests share beyond their machine
//! ([`memvisor_test_support::machines::dma`]): the wire values they assert
//! on, and the invariants of DESIGN.md rules 1 and 2 checked on a machine
//! with one assigned device.
#![allow(dead_code)]

use memvisor_dma::attach::DmaPath;
use memvisor_dma::mapper::vm_pin_kib;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_test_support::machines::dma::{BOOT, DOMAIN};
use memvisor_test_support::{Machine, range};
use memvisor_virtio_iommu::wire::{MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE};
use memvisor_virtio_mem::wire::{
    VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_RESP_BUSY, VIRTIO_MEM_RESP_ERROR, VIRTIO_MEM_RESP_NACK,
};

pub const RW: u32 = MAP_F_READ | MAP_F_WRITE;
pub const MMIO: u32 = MAP_F_MMIO;

pub const ACK: u16 = VIRTIO_MEM_RESP_ACK;
pub const NACK: u16 = VIRTIO_MEM_RESP_NACK;
pub const BUSY: u16 = VIRTIO_MEM_RESP_BUSY;
pub const ERROR: u16 = VIRTIO_MEM_RESP_ERROR;

/// Bytes of the live non-MMIO IOMMU mappings of [`DOMAIN`].
pub fn mapped_bytes(m: &Machine) -> u64 {
    m.iommu()
        .expect("the DMA-test machine has a virtio-iommu")
        .handle
        .mappings(DOMAIN)
        .unwrap_or_default()
        .iter()
        .filter(|m| !m.flags.mmio())
        .map(|m| m.size())
        .sum()
}

/// Checks DESIGN.md rules 1 and 2 and the accounting, at one instant:
/// no pinned byte lies in a discarded block; the backend's pinned bytes
/// equal the live mappings (path 2) or boot RAM and the plugged blocks
/// (path 1); `VmPin` agrees with the backend (valid while this is the only
/// pinning machine in the process).
pub fn check_invariants(m: &Machine) {
    let region = &m.vmems()[0].region;
    let device = m
        .dma_devices()
        .next()
        .expect("the DMA-test machine has an assigned device");
    let view = region.populated();
    let pinned = device.pinned_bytes();
    match device.path() {
        Some(DmaPath::Viommu { .. }) if device.in_bypass() => {
            assert_eq!(
                pinned,
                BOOT + view.populated_bytes(),
                "bypass: backend vs boot RAM + plugged"
            );
        }
        Some(DmaPath::Viommu { .. }) => {
            let ranges = device.pinned_ranges().expect("a bridge on path 2");
            let hot = range(region.addr(), region.region_size());
            for r in &ranges {
                if r.overlaps(&hot) {
                    assert!(view.is_populated(*r), "pinned {r} is not populated");
                }
            }
            assert_eq!(pinned, ranges.iter().map(|r| r.len()).sum::<u64>(), "backend vs bridge");
            assert_eq!(pinned, mapped_bytes(m), "backend vs live IOMMU mappings");
        }
        Some(DmaPath::Ram) => {
            assert_eq!(pinned, BOOT + view.populated_bytes(), "backend vs boot RAM + plugged");
        }
        None => panic!("the assigned device is detached"),
    }
    drop(view);
    assert_eq!(vm_pin_kib() * 1024, pinned, "VmPin vs backend");
}
