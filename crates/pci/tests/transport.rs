//! The virtio-pci transport driven as Linux's virtio_pci_modern driver
//! drives it, through a `PciRoot` (ECAM and MMIO dispatch), with real
//! split virtqueues in memfd guest memory.

mod common;

use std::sync::Arc;
use std::sync::Mutex;

use common::*;
use memvisor_guest::Buf;
use memvisor_pci::virtio_pci::{
    BAR0_SIZE, DEVICE_CFG_OFFSET, ISR_CFG_OFFSET, ISR_CONFIG, ISR_QUEUE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET,
    NOTIFY_CFG_OFFSET, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_MSI_NO_VECTOR,
};
use memvisor_pci::{MsiMessage, PciError, VirtioPciDevice, VirtioPciOptions};
use memvisor_virtio::device::VIRTIO_F_VERSION_1;
use memvisor_virtio::{InterruptKind, VirtioDevice};

#[test]
fn identification() {
    let rig = Rig::new();
    assert_eq!(rig.cfg32(0), 0x106a_1af4);
    assert_eq!(rig.cfg8(8), 1, "revision 1: non-transitional");
    assert_eq!(rig.cfg32(8) >> 8, 0xff_0000);
    assert_eq!(rig.cfg32(0x2c), u32::from(ECHO_TYPE as u16) << 16 | 0x1af4);
    assert_eq!(rig.cfg8(0x0e), 0, "type-0 header");
    assert_eq!(rig.cfg8(0x3d), 0, "no INTx pin");
    assert_ne!(rig.cfg16(6) & 0x10, 0, "capability list");

    // virtio-blk gets QEMU's class; options override IDs.
    let blk = VirtioPciDevice::new(
        Arc::new(Mutex::new(Echo::custom(2, vec![128]))),
        guest_memory(),
        Arc::new(RecordingMsi::default()),
        Arc::new(RecordingIo::default()),
        VirtioPciOptions {
            subsystem_id: Some(0x1100),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(blk.config_space().read_u32(0), 0x1042_1af4);
    assert_eq!(blk.config_space().read_u32(8) >> 8, 0x01_0000);
    assert_eq!(blk.config_space().read_u16(0x2e), 0x1100);
    assert_eq!(blk.msix_vectors(), 2);
}

#[test]
fn capability_chain_and_bar() {
    let rig = Rig::new();
    let caps = rig.capabilities();
    assert_eq!(
        caps,
        [
            (0x40, 0x09, 1),
            (0x50, 0x09, 3),
            (0x60, 0x09, 4),
            (0x70, 0x09, 2),
            (0x84, 0x09, 5),
            (0x98, 0x11, 0)
        ]
    );
    // (cap_len, bar, offset, length) of each virtio structure.
    let fields = |cap: u16| {
        (
            rig.cfg8(cap + 2),
            rig.cfg8(cap + 4),
            rig.cfg32(cap + 8),
            rig.cfg32(cap + 12),
        )
    };
    assert_eq!(fields(0x40), (16, 0, 0x0000, 0x40));
    assert_eq!(fields(0x50), (16, 0, 0x1000, 1));
    assert_eq!(fields(0x60), (16, 0, 0x2000, 0x1000));
    assert_eq!(fields(0x70), (20, 0, 0x3000, 8));
    assert_eq!(rig.cfg32(0x70 + 16), 4, "notify_off_multiplier");
    assert_eq!(fields(0x84), (20, 0, 0, 0));
    // MSI-X: 3 vectors (2 queues + config), table and PBA in BAR 0.
    assert_eq!(rig.cfg16(0x98 + 2), 2);
    assert_eq!(rig.cfg32(0x98 + 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(rig.cfg32(0x98 + 8), MSIX_PBA_OFFSET as u32);
    // Capabilities are read-only (but the PCI_CFG window and MSI-X control).
    rig.cfg_write(0x40, &[0xff; 4]);
    rig.cfg_write(0x60 + 8, &[0xff; 4]);
    rig.cfg_write(0x98 + 4, &[0xff; 4]);
    rig.cfg_write(0x98 + 2, &0x07ffu16.to_le_bytes());
    assert_eq!(rig.capabilities(), caps);
    assert_eq!(rig.cfg32(0x60 + 8), 0x2000);
    assert_eq!(rig.cfg32(0x98 + 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(rig.cfg16(0x98 + 2), 2, "the table size is read-only");

    // BAR 0: 64-bit, not prefetchable, 32 KiB; sized as Linux does.
    assert_eq!(rig.bar, common::MMIO64.start);
    assert_eq!(rig.cfg32(0x10), rig.bar as u32 | 0b100);
    assert_eq!(rig.cfg32(0x14), (rig.bar >> 32) as u32);
    let command = rig.cfg16(4);
    assert_eq!(command & 2, 2, "the VMM enabled memory decoding");
    rig.cfg_write(4, &(command & !2).to_le_bytes());
    rig.cfg_write(0x10, &[0xff; 4]);
    assert_eq!(rig.cfg32(0x10), 0xffff_8004);
    rig.cfg_write(0x14, &[0xff; 4]);
    assert_eq!(rig.cfg32(0x14), 0xffff_ffff);
    rig.cfg_write(0x10, &(rig.bar as u32).to_le_bytes());
    rig.cfg_write(0x14, &((rig.bar >> 32) as u32).to_le_bytes());
    rig.cfg_write(4, &command.to_le_bytes());
    assert_eq!(rig.r16(NUMQ), 2);
    // BARs 1..=5 and the ROM BAR do not exist.
    for reg in [0x18u16, 0x1c, 0x20, 0x24, 0x30] {
        rig.cfg_write(reg, &[0xff; 4]);
        assert_eq!(rig.cfg32(reg), 0, "register {reg:#x}");
    }
}

#[test]
fn linux_driver_end_to_end() {
    let rig = Rig::new();
    let d = Driver::probe(&rig);
    assert_eq!(d.features(), VIRTIO_F_VERSION_1 | F_ECHO);
    let [(mut q0, n0), (mut q1, n1)] = d.init();
    assert_eq!((n0, n1), (NOTIFY_CFG_OFFSET, NOTIFY_CFG_OFFSET + 4));
    assert!(rig.echo().common.is_active());
    assert_eq!(rig.echo().acked_features(), VIRTIO_F_VERSION_1 | F_ECHO);
    // The vectors were routed as they went live.
    let routed = rig.msi.take();
    for v in 0..3u16 {
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x40 + u32::from(v),
        };
        assert!(routed.contains(&Msi::Configure(v, msg, true)), "vector {v}: {routed:?}");
    }

    // A request on queue 0, kicked through the notification region.
    q0.add(&[Buf::In(b"ping"), Buf::Out(4)]).unwrap();
    rig.w16(n0, 0);
    assert_eq!(&q0.pop_used().unwrap().data[..], b"gnip");
    assert_eq!(rig.msi.triggers(), [1]);
    assert_eq!(rig.r8(d.isr), ISR_QUEUE);
    assert_eq!(rig.r8(d.isr), 0, "reading the ISR clears it");

    // A request on queue 1, kicked through the ioeventfd and the event loop.
    q1.add(&[Buf::In(b"hello"), Buf::Out(8)]).unwrap();
    assert!(
        rig.io.kvm_write(rig.bar + n1),
        "queue 1's eventfd is registered at its address"
    );
    let events = rig.pci().queue_events().unwrap();
    assert_eq!(events.iter().map(|(q, _)| *q).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(events[1].1.read().unwrap(), 1, "the VMM's clone sees the kick");
    let notifier = rig.pci().notifier();
    assert!(notifier.notify(1));
    assert_eq!(&q1.pop_used().unwrap().data[..], b"olleh");
    assert_eq!(rig.msi.triggers(), [2]);
    // Nothing new: no interrupt. Unknown queues are not forwarded.
    assert!(rig.pci().notify(1));
    assert!(rig.msi.triggers().is_empty());
    assert!(!rig.pci().notify(2));
    assert!(!notifier.notify(u16::MAX));
    rig.w16(NOTIFY_CFG_OFFSET + 8, 2);
    rig.w16(NOTIFY_CFG_OFFSET + 2, 0);
    assert_eq!(
        rig.echo().notifies,
        [0, 1, 1],
        "misaligned and out-of-range kicks are dropped"
    );

    // A configuration change from another thread.
    let generation = rig.r8(CFGGENERATION);
    let echo = rig.echo_handle();
    std::thread::spawn(move || echo.lock().unwrap().common.signal_config())
        .join()
        .unwrap();
    assert_eq!(rig.r8(CFGGENERATION), generation.wrapping_add(1));
    assert_eq!(rig.msi.triggers(), [0]);
    // Queue 1's interrupt above left its bit too (the ISR is kept with MSI-X).
    assert_eq!(rig.r8(d.isr), ISR_CONFIG | ISR_QUEUE);

    // A masked vector: pending, delivered on unmask.
    let control = MSIX_TABLE_OFFSET + 16 + 12;
    rig.w32(control, 1);
    q0.add(&[Buf::In(b"ab"), Buf::Out(2)]).unwrap();
    rig.w16(n0, 0);
    assert_eq!(&q0.pop_used().unwrap().data[..], b"ba");
    assert!(rig.msi.triggers().is_empty());
    assert_eq!(rig.r64(MSIX_PBA_OFFSET), 0b10);
    rig.w32(control, 0);
    assert_eq!(rig.msi.triggers(), [1]);
    assert_eq!(rig.r64(MSIX_PBA_OFFSET), 0);

    // Device configuration, any width.
    assert_eq!(rig.r32(d.device + 2), u32::from_le_bytes([3, 4, 5, 6]));
    assert_eq!(rig.r64(d.device), u64::from_le_bytes(ECHO_CONFIG));
    assert_eq!(rig.r8(d.device + 0xfff), 0);
    rig.w16(d.device + 4, 0xbeef);
    assert_eq!(rig.echo().config_writes, [(4, vec![0xef, 0xbe])]);

    // Queue registers are frozen after DRIVER_OK.
    rig.w16(d.common + Q_SELECT, 0);
    rig.w16(d.common + Q_SIZE, 4);
    rig.w32(d.common + Q_DESCLO, 0x9000);
    rig.w16(d.common + Q_MSIX, 2);
    assert_eq!(rig.r16(d.common + Q_SIZE), 8);
    assert_eq!(rig.r64(d.common + Q_DESCLO), 0x10000);
    assert_eq!(rig.r16(d.common + Q_MSIX), 1);

    // Reset: everything back to defaults.
    let stale = rig.echo().irq.clone().unwrap();
    d.set_status(0);
    assert_eq!(d.status(), 0);
    assert!(!rig.echo().common.is_active());
    assert_eq!(rig.echo().acked_features(), 0);
    assert_eq!(rig.r16(d.common + MSIX), VIRTIO_MSI_NO_VECTOR);
    for (queue, max) in [(0u16, 16u16), (1, 8)] {
        rig.w16(d.common + Q_SELECT, queue);
        assert_eq!(rig.r16(d.common + Q_SIZE), max);
        assert_eq!(rig.r16(d.common + Q_ENABLE), 0);
        assert_eq!(rig.r16(d.common + Q_MSIX), VIRTIO_MSI_NO_VECTOR);
        for reg in [Q_DESCLO, Q_AVAILLO, Q_USEDLO] {
            assert_eq!(rig.r64(d.common + reg), 0);
        }
    }
    for select in [0, 1] {
        rig.w32(d.common + GFSELECT, select);
        assert_eq!(rig.r32(d.common + GF), 0);
    }
    assert_eq!(rig.r8(d.isr), 0);
    // The handle from before the reset no longer interrupts; kicks are dropped.
    stale.trigger(InterruptKind::Queue(0)).unwrap();
    stale.trigger(InterruptKind::Config).unwrap();
    assert!(rig.msi.triggers().is_empty());
    assert_eq!(rig.r8(d.isr), 0);
    assert!(!rig.pci().notify(0));
    // The MSI-X table is PCI state: it survives a device reset.
    assert_eq!(rig.r32(MSIX_TABLE_OFFSET + 8), 0x40);

    // The driver comes back (a reboot, a module reload).
    let [(mut q0, n0), _] = d.init();
    q0.add(&[Buf::In(b"again"), Buf::Out(5)]).unwrap();
    rig.w16(n0, 0);
    assert_eq!(&q0.pop_used().unwrap().data[..], b"niaga");
    assert_eq!(rig.msi.triggers(), [1]);
}

#[test]
fn feature_negotiation() {
    let rig = Rig::new();
    let d = Driver::probe(&rig);
    // A feature the device did not offer.
    assert_eq!(
        d.negotiate(VIRTIO_F_VERSION_1 | 1 << 5),
        ACK_DRIVER,
        "FEATURES_OK refused"
    );
    // Without VIRTIO_F_VERSION_1.
    assert_eq!(d.negotiate(F_ECHO), ACK_DRIVER);
    // ACCESS_PLATFORM is not offered without the option.
    assert_eq!(d.features() & VIRTIO_F_ACCESS_PLATFORM, 0);
    assert_eq!(d.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM), ACK_DRIVER);
    // A subset of the offered features is fine.
    assert_eq!(d.negotiate(VIRTIO_F_VERSION_1), FEATURES_DONE);
    assert_eq!(rig.echo().acked_features(), VIRTIO_F_VERSION_1);
    // driver_feature is frozen after FEATURES_OK; reads show what was written.
    rig.w32(d.common + GFSELECT, 0);
    rig.w32(d.common + GF, 1);
    assert_eq!(rig.r32(d.common + GF), 0);
    rig.w32(d.common + GFSELECT, 1);
    assert_eq!(rig.r32(d.common + GF), 1);
    // Feature windows past bit 63 read zero.
    rig.w32(d.common + DFSELECT, 2);
    assert_eq!(rig.r32(d.common + DF), 0);
    // DRIVER_OK without FEATURES_OK: the device needs a reset.
    d.negotiate(1 << 7);
    d.set_status(ACK_DRIVER | STATUS_DRIVER_OK);
    assert_eq!(d.status(), ACK_DRIVER | STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET);
    assert!(!rig.echo().common.is_active());
    d.set_status(0);
    assert_eq!(d.status(), 0);
}

#[test]
fn access_platform_is_offered_by_the_transport() {
    let rig = Rig::with_options(VirtioPciOptions {
        access_platform: true,
        ..Default::default()
    });
    let d = Driver::probe(&rig);
    let offered = d.features();
    assert_eq!(offered, VIRTIO_F_VERSION_1 | F_ECHO | VIRTIO_F_ACCESS_PLATFORM);
    assert_eq!(rig.pci().offered_features(), offered);
    assert_eq!(d.negotiate(offered), FEATURES_DONE);
    // The bit is the transport's: the device never sees it.
    assert_eq!(rig.echo().acked_features(), VIRTIO_F_VERSION_1 | F_ECHO);
    // Not accepting it is allowed too.
    assert_eq!(d.negotiate(VIRTIO_F_VERSION_1), FEATURES_DONE);
}

#[test]
fn queue_register_rules() {
    let rig = Rig::new();
    let d = Driver::probe(&rig);
    d.negotiate(VIRTIO_F_VERSION_1);
    let c = d.common;
    rig.w16(c + Q_SELECT, 0);
    assert_eq!(rig.r16(c + Q_SIZE), 16);
    for bad in [12u16, 32, 0, 0xffff] {
        rig.w16(c + Q_SIZE, bad);
        assert_eq!(rig.r16(c + Q_SIZE), 16, "size {bad} is refused");
    }
    rig.w16(c + Q_SIZE, 4);
    assert_eq!(rig.r16(c + Q_SIZE), 4);
    rig.w8(c + Q_SIZE, 2);
    assert_eq!(rig.r16(c + Q_SIZE), 2, "a 1-byte write to the low byte");
    rig.w16(c + Q_SIZE, 1);
    assert_eq!(rig.r16(c + Q_SIZE), 1);
    // Vectors outside the table (3 vectors) read back NO_VECTOR.
    rig.w16(c + Q_MSIX, 2);
    assert_eq!(rig.r16(c + Q_MSIX), 2);
    rig.w16(c + Q_MSIX, 3);
    assert_eq!(rig.r16(c + Q_MSIX), VIRTIO_MSI_NO_VECTOR);
    rig.w16(c + MSIX, 0x7ff);
    assert_eq!(rig.r16(c + MSIX), VIRTIO_MSI_NO_VECTOR);
    // Addresses: two halves, or one 8-byte access.
    rig.w32(c + Q_DESCLO, 0x1000);
    rig.w32(c + Q_DESCHI, 0x2);
    assert_eq!(rig.r64(c + Q_DESCLO), 0x2_0000_1000);
    rig.w64(c + Q_AVAILLO, 0x3_0000_2000);
    assert_eq!(rig.r32(c + Q_AVAILLO), 0x2000);
    assert_eq!(rig.r32(c + Q_AVAILHI), 3);
    rig.w32(c + Q_USEDHI, 4);
    assert_eq!(rig.r64(c + Q_USEDLO), 0x4_0000_0000);
    assert_eq!(rig.r16(c + Q_NOFF), 0);
    // Writing 0 to queue_enable is ignored; once enabled, setup is frozen.
    rig.w16(c + Q_ENABLE, 0);
    assert_eq!(rig.r16(c + Q_ENABLE), 0);
    rig.w16(c + Q_ENABLE, 1);
    assert_eq!(rig.r16(c + Q_ENABLE), 1);
    rig.w16(c + Q_SIZE, 8);
    rig.w32(c + Q_DESCLO, 0);
    assert_eq!(rig.r16(c + Q_SIZE), 1);
    assert_eq!(rig.r64(c + Q_DESCLO), 0x2_0000_1000);
    // Queue 1 is independent.
    rig.w16(c + Q_SELECT, 1);
    assert_eq!(rig.r16(c + Q_SIZE), 8);
    assert_eq!(rig.r16(c + Q_NOFF), 1);
    assert_eq!(rig.r16(c + Q_ENABLE), 0);
    // A queue that does not exist: size 0, writes ignored.
    rig.w16(c + Q_SELECT, 2);
    assert_eq!(rig.r16(c + Q_SELECT), 2);
    rig.w16(c + Q_SIZE, 4);
    rig.w16(c + Q_ENABLE, 1);
    rig.w16(c + Q_MSIX, 0);
    assert_eq!(rig.r16(c + Q_SIZE), 0);
    assert_eq!(rig.r16(c + Q_ENABLE), 0);
    assert_eq!(rig.r16(c + Q_MSIX), VIRTIO_MSI_NO_VECTOR);
    assert_eq!(rig.r64(c + Q_DESCLO), 0);
    // Read-only fields ignore writes.
    rig.w16(c + NUMQ, 9);
    rig.w8(c + CFGGENERATION, 9);
    assert_eq!(rig.r16(c + NUMQ), 2);
    assert_eq!(rig.r8(c + CFGGENERATION), 0);
    // Past the structure, and the reserved fields, read zero.
    assert_eq!(rig.r64(c + 0x38), 0);
    assert_eq!(rig.r64(c + 0x40), 0);
    // A wide access across fields: status, generation, queue_select, queue_size.
    rig.w16(c + Q_SELECT, 1);
    assert_eq!(
        rig.r64(c + STATUS),
        u64::from(FEATURES_DONE) | 1 << 16 | 8 << 32 | u64::from(VIRTIO_MSI_NO_VECTOR) << 48
    );
}

#[test]
fn activation_failure_needs_reset() {
    let rig = Rig::new();
    let d = Driver::probe(&rig);
    assert_eq!(d.negotiate(VIRTIO_F_VERSION_1), FEATURES_DONE);
    rig.enable_msix(3);
    rig.w16(d.common + MSIX, 0);
    rig.msi.take();
    // Only queue 0 is set up: the device refuses activation.
    let _q0 = d.setup_queue(0, 8, 0x10000, 1);
    d.set_status(LIVE);
    assert_eq!(d.status(), LIVE | STATUS_DEVICE_NEEDS_RESET);
    assert!(!rig.echo().common.is_active());
    assert_eq!(rig.msi.triggers(), [0], "the driver hears of it");
    assert_eq!(rig.r8(d.isr), ISR_CONFIG);
    // A misaligned ring fails too.
    d.negotiate(VIRTIO_F_VERSION_1);
    let _q0 = d.setup_queue(0, 8, 0x10000, 1);
    rig.w16(d.common + Q_SELECT, 1);
    rig.w32(d.common + Q_DESCLO, 0x30008);
    rig.w32(d.common + Q_AVAILLO, 0x31000);
    rig.w32(d.common + Q_USEDLO, 0x32000);
    rig.w16(d.common + Q_ENABLE, 1);
    d.set_status(LIVE);
    assert_eq!(d.status() & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
    d.set_status(0);
    assert_eq!(d.status(), 0);

    // The device's own NEEDS_RESET shows in the status too.
    let [(mut q0, n0), _] = d.init();
    q0.add(&[Buf::In(&[]), Buf::Out(4)]).unwrap();
    rig.msi.take();
    rig.w16(n0, 0);
    assert_eq!(d.status(), LIVE | STATUS_DEVICE_NEEDS_RESET);
    assert_eq!(rig.msi.triggers(), [0]);
}

#[test]
fn msix_enable_gates_interrupts() {
    let rig = Rig::new();
    let d = Driver::probe(&rig);
    let [(mut q0, n0), _] = d.init();
    // MSI-X disabled: nothing is delivered (no INTx), the ISR still says why.
    let control = rig.msix_cap() + 2;
    rig.msi.take();
    rig.cfg_write(control, &0u16.to_le_bytes());
    assert_eq!(rig.msi.take().len(), 3, "the three vectors' routes are torn down");
    q0.add(&[Buf::In(b"x"), Buf::Out(1)]).unwrap();
    rig.w16(n0, 0);
    assert!(q0.pop_used().is_some());
    assert!(rig.msi.triggers().is_empty());
    assert_eq!(rig.r8(d.isr), ISR_QUEUE);
    // Function mask: pending, delivered when the function is unmasked.
    rig.cfg_write(control, &0xc000u16.to_le_bytes());
    assert_eq!(rig.cfg16(control), 0xc002);
    q0.add(&[Buf::In(b"y"), Buf::Out(1)]).unwrap();
    rig.w16(n0, 0);
    assert!(rig.msi.triggers().is_empty());
    assert_eq!(rig.r8(MSIX_PBA_OFFSET), 0b10);
    rig.cfg_write(control + 1, &[0x80]);
    assert_eq!(rig.msi.triggers(), [1]);
    // 8-byte table accesses.
    rig.w64(MSIX_TABLE_OFFSET + 32, 0x1_fee0_1000);
    assert_eq!(rig.r64(MSIX_TABLE_OFFSET + 32), 0x1_fee0_1000);
    let moved = MsiMessage {
        addr: 0x1_fee0_1000,
        data: 0x42,
    };
    assert!(rig.msi.take().contains(&Msi::Configure(2, moved, true)));
    rig.w64(MSIX_TABLE_OFFSET + 40, 0xffff_ffff_0000_0043);
    assert_eq!(
        rig.r64(MSIX_TABLE_OFFSET + 40),
        0x1_0000_0043,
        "reserved control bits read 0; masked"
    );
}

#[test]
fn pci_cfg_capability_window() {
    let rig = Rig::new();
    let cap = rig.virtio_cap(5);
    let window = |bar: u8, offset: u64, length: u32| {
        rig.cfg_write(cap + 4, &[bar]);
        rig.cfg_write(cap + 8, &(offset as u32).to_le_bytes());
        rig.cfg_write(cap + 12, &length.to_le_bytes());
    };
    // num_queues read through the window.
    window(0, NUMQ, 2);
    assert_eq!(rig.cfg32(cap + 16), 2);
    assert_eq!(rig.cfg8(cap + 4), 0);
    assert_eq!(rig.cfg32(cap + 8), NUMQ as u32);
    assert_eq!(rig.cfg32(cap + 12), 2);
    // Status written through the window: the first cap.length bytes.
    window(0, STATUS, 1);
    rig.cfg_write(cap + 16, &[STATUS_ACKNOWLEDGE, 0xff, 0xff, 0xff]);
    assert_eq!(rig.r8(STATUS), STATUS_ACKNOWLEDGE);
    assert_eq!(rig.cfg8(cap + 16), STATUS_ACKNOWLEDGE);
    // Device configuration, 4 bytes.
    window(0, DEVICE_CFG_OFFSET + 4, 4);
    assert_eq!(rig.cfg32(cap + 16), u32::from_le_bytes([5, 6, 7, 8]));
    // Invalid windows read zero and write nothing: a bad length, a
    // misaligned offset, past the BAR, another BAR.
    for (bar, offset, length) in [(0u8, STATUS, 3u32), (0, 0x12, 4), (0, BAR0_SIZE, 1), (1, STATUS, 1)] {
        window(bar, offset, length);
        assert_eq!(rig.cfg32(cap + 16), 0, "bar {bar} offset {offset:#x} length {length}");
        rig.cfg_write(cap + 16, &[0; 4]);
    }
    assert_eq!(rig.r8(STATUS), STATUS_ACKNOWLEDGE);

    // With the device live: the ISR read through the window clears it,
    // and a write to a notification address kicks the queue.
    let d = Driver::probe(&rig);
    let [(mut q0, n0), _] = d.init();
    rig.echo().common.signal_config();
    window(0, ISR_CFG_OFFSET, 1);
    assert_eq!(rig.cfg8(cap + 16), ISR_CONFIG);
    assert_eq!(rig.cfg8(cap + 16), 0);
    q0.add(&[Buf::In(b"cfg"), Buf::Out(3)]).unwrap();
    window(0, n0, 2);
    rig.cfg_write(cap + 16, &0u16.to_le_bytes());
    assert_eq!(&q0.pop_used().unwrap().data[..], b"gfc");
}

#[test]
fn ioeventfds_follow_bar0() {
    let rig = Rig::new();
    let n = NOTIFY_CFG_OFFSET;
    assert_eq!(rig.io.take(), [(true, rig.bar + n), (true, rig.bar + n + 4)]);
    assert_eq!(rig.pci().notify_address(), Some(rig.bar + n));
    // Linux sizing the BAR: decoding off, all-ones, restore, decoding on.
    let command = rig.cfg16(4);
    rig.cfg_write(4, &(command & !2).to_le_bytes());
    assert_eq!(rig.io.take(), [(false, rig.bar + n), (false, rig.bar + n + 4)]);
    assert_eq!(rig.pci().notify_address(), None);
    assert!(!rig.root.mmio_read(rig.bar, &mut [0; 4]), "not decoded");
    rig.cfg_write(0x10, &[0xff; 4]);
    rig.cfg_write(0x14, &[0xff; 4]);
    rig.cfg_write(0x10, &(rig.bar as u32).to_le_bytes());
    rig.cfg_write(0x14, &((rig.bar >> 32) as u32).to_le_bytes());
    assert!(rig.io.take().is_empty(), "nothing registers while decoding is off");
    rig.cfg_write(4, &command.to_le_bytes());
    assert_eq!(rig.io.take(), [(true, rig.bar + n), (true, rig.bar + n + 4)]);

    // The guest moves BAR 0 (low dword only, decoding on).
    let moved = rig.bar + 0x10_0000;
    rig.cfg_write(0x10, &(moved as u32).to_le_bytes());
    assert_eq!(
        rig.io.take(),
        [
            (false, rig.bar + n),
            (false, rig.bar + n + 4),
            (true, moved + n),
            (true, moved + n + 4)
        ]
    );
    assert!(!rig.root.mmio_read(rig.bar + NUMQ, &mut [0; 2]));
    let mut num = [0u8; 2];
    assert!(rig.root.mmio_read(moved + NUMQ, &mut num));
    assert_eq!(u16::from_le_bytes(num), 2);
    assert!(rig.io.kvm_write(moved + n + 4));
    assert!(!rig.io.kvm_write(rig.bar + n + 4));

    // Registration refused: notifications still work through MMIO.
    rig.io.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    rig.cfg_write(0x10, &(rig.bar as u32).to_le_bytes());
    assert_eq!(rig.io.take(), [(false, moved + n), (false, moved + n + 4)]);
    assert_eq!(rig.pci().notify_address(), None);
    let d = Driver::probe(&rig);
    rig.io.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let [(mut q0, n0), _] = d.init();
    q0.add(&[Buf::In(b"mmio"), Buf::Out(4)]).unwrap();
    rig.w16(n0, 0);
    assert_eq!(&q0.pop_used().unwrap().data[..], b"oimm");

    // Dropping the transport unregisters what is registered.
    rig.cfg_write(0x10, &(moved as u32).to_le_bytes());
    rig.io.take();
    let Rig { root, pci, io, .. } = rig;
    drop(root);
    drop(pci);
    assert_eq!(io.take(), [(false, moved + n), (false, moved + n + 4)]);
}

#[test]
fn construction_errors() {
    let new = |echo: Echo, options: VirtioPciOptions| {
        VirtioPciDevice::new(
            Arc::new(Mutex::new(echo)),
            guest_memory(),
            Arc::new(RecordingMsi::default()),
            Arc::new(RecordingIo::default()),
            options,
        )
    };
    let default = VirtioPciOptions::default();
    assert!(matches!(
        new(Echo::custom(0x40, vec![8]), default),
        Err(PciError::DeviceType(0x40))
    ));
    assert!(matches!(
        new(Echo::custom(1, vec![]), default),
        Err(PciError::QueueCount { got: 0, .. })
    ));
    assert!(matches!(
        new(Echo::custom(1, vec![8; 1025]), default),
        Err(PciError::QueueCount { got: 1025, .. })
    ));
    assert!(matches!(
        new(Echo::custom(1, vec![8, 24]), default),
        Err(PciError::QueueMaxSize { index: 1, size: 24 })
    ));
    for vectors in [0u16, 257] {
        let options = VirtioPciOptions {
            msix_vectors: Some(vectors),
            ..default
        };
        assert!(matches!(
            new(Echo::new(), options),
            Err(PciError::InvalidVectorCount { got, max: 256 }) if got == vectors
        ));
    }
    // Many queues: the default table is capped at 256 vectors.
    let many = new(Echo::custom(1, vec![8; 300]), default).unwrap();
    assert_eq!(many.msix_vectors(), 256);
    assert_eq!(many.num_queues(), 300);
    assert_eq!(many.config_space().read_u32(0x70 + 12), 1200, "notify length");
}
