//! memvisor's real virtio-mem device behind the virtio-pci transport,
//! driven as Linux's virtio_mem driver over virtio_pci_modern.

mod common;

use std::sync::{Arc, Mutex};

use common::{Driver, FEATURES_DONE, Rig};
use memvisor_guest::Buf;
use memvisor_memory::{Backing, RamBlock};
use memvisor_pci::VirtioPciOptions;
use memvisor_pci::virtio_pci::ISR_CONFIG;
use memvisor_virtio::device::VIRTIO_F_VERSION_1;
use memvisor_virtio_mem::wire::{F_UNPLUGGED_INACCESSIBLE, RESPONSE_SIZE, VIRTIO_MEM_RESP_ACK, config_offset};
use memvisor_virtio_mem::{BlockRange, Request, VirtioMem, VirtioMemOptions, VirtioMemRegion};

#[test]
fn virtio_mem_plugs_through_pci() {
    // 64 MiB at 4 GiB, 2 MiB blocks, 8 MiB requested.
    let block = Arc::new(RamBlock::new("vmem0", 64 << 20, Backing::Memfd).unwrap());
    let options = VirtioMemOptions {
        requested_size: 8 << 20,
        ..VirtioMemOptions::new(1 << 32)
    };
    let region = VirtioMemRegion::new(block, options).unwrap();
    let device = Arc::new(Mutex::new(VirtioMem::new(region.clone())));
    let rig = Rig::for_device(device.clone(), VirtioPciOptions::default());

    // virtio-mem is type 24: device 0x1058, class "other", 2 MSI-X vectors.
    assert_eq!(rig.cfg32(0), 0x1058_1af4);
    assert_eq!(rig.cfg32(8) >> 8, 0xff_0000);
    assert_eq!(rig.cfg16(rig.msix_cap() + 2) & 0x7ff, 1);

    let d = Driver::probe(&rig);
    assert_eq!(d.features(), VIRTIO_F_VERSION_1 | F_UNPLUGGED_INACCESSIBLE);
    // Refusing UNPLUGGED_INACCESSIBLE passes FEATURES_OK (virtio-mem
    // refuses such a driver only at activation).
    assert_eq!(d.negotiate(VIRTIO_F_VERSION_1), FEATURES_DONE);

    let mut queues = d.init_queues(&[(32, 0x10000)]);
    let (queue, notify) = &mut queues[0];
    assert!(device.lock().unwrap().is_active());

    // The configuration, as the driver reads it at probe.
    let cfg = |offset: u64| rig.r64(d.device + offset);
    assert_eq!(cfg(config_offset::BLOCK_SIZE), 2 << 20);
    assert_eq!(cfg(config_offset::ADDR), 1 << 32);
    assert_eq!(cfg(config_offset::REQUESTED_SIZE), 8 << 20);
    assert_eq!(cfg(config_offset::PLUGGED_SIZE), 0);

    // PLUG two blocks.
    let plug = Request::Plug(BlockRange {
        addr: 1 << 32,
        nb_blocks: 2,
    });
    queue
        .add(&[Buf::In(&plug.to_bytes()), Buf::Out(RESPONSE_SIZE as u32)])
        .unwrap();
    rig.w16(*notify, 0);
    let used = queue.pop_used().unwrap();
    assert_eq!(u16::from_le_bytes([used.data[0], used.data[1]]), VIRTIO_MEM_RESP_ACK);
    assert_eq!(region.plugged_size(), 4 << 20);
    assert_eq!(cfg(config_offset::PLUGGED_SIZE), 4 << 20);
    assert_eq!(rig.msi.triggers(), [1]);

    // The host asks for more, from the API thread: a configuration
    // interrupt on vector 0, a new generation, the new size.
    let generation = rig.r8(0x15);
    rig.r8(d.isr);
    let api = region.clone();
    std::thread::spawn(move || api.set_requested_size(16 << 20).unwrap())
        .join()
        .unwrap();
    assert_eq!(rig.msi.triggers(), [0]);
    assert_eq!(rig.r8(0x15), generation.wrapping_add(1));
    assert_eq!(rig.r8(d.isr), ISR_CONFIG);
    assert_eq!(cfg(config_offset::REQUESTED_SIZE), 16 << 20);

    // A driver reset leaves the plugged memory (the specification says a
    // device reset changes no block state) and detaches the interrupt.
    d.set_status(0);
    assert!(!device.lock().unwrap().is_active());
    assert_eq!(region.plugged_size(), 4 << 20);
    region.set_requested_size(8 << 20).unwrap();
    assert!(rig.msi.triggers().is_empty());
}
