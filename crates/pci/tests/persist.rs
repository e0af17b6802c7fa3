//! Snapshot and restore of the transport: a source driven as Linux drives
//! it, with requests through real split virtqueues; its state through the
//! serialised form; a destination built alike on a copy of guest memory,
//! restored from it; the guest going on there without initialising the
//! device again.

mod common;

use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use memvisor_guest::Buf;
use memvisor_memory::{Backing, RamBlock};
use memvisor_pci::virtio_pci::{
    DEVICE_CFG_OFFSET, ISR_CFG_OFFSET, ISR_CONFIG, ISR_QUEUE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_CFG_OFFSET,
    STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
};
use memvisor_pci::{DeviceAccess, MsiMessage, TransportStateError, VirtioPciOptions, VirtioPciState};
use memvisor_virtio::device::VIRTIO_F_VERSION_1;
use memvisor_virtio::{InterruptKind, QueueIndices, VirtioDevice};
use memvisor_virtio_mem::wire::{RESPONSE_SIZE, VIRTIO_MEM_RESP_ACK};
use memvisor_virtio_mem::{BlockRange, Request, VirtioMem, VirtioMemOptions, VirtioMemRegion};
use proptest::prelude::*;

/// Where the source's guest moves BAR 0.
const MOVED: u64 = MMIO64.start + 0x10_0000;

/// The message of MSI-X vector `v` as [`Rig::enable_msix`] programs it.
fn msg(v: u16) -> MsiMessage {
    MsiMessage {
        addr: 0xfee0_0000,
        data: 0x40 + u32::from(v),
    }
}

/// The state through its serialised form, as a migration stream carries it.
fn through_the_wire(state: &VirtioPciState) -> VirtioPciState {
    let bytes = postcard::to_allocvec(state).unwrap();
    let back: VirtioPciState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(&back, state);
    back
}

/// A live echo device after some traffic: three requests answered on
/// queue 0 and one on queue 1 (whose vector the guest then masked, with
/// its interrupt pending), one more made available on queue 0 but not yet
/// kicked, a configuration interrupt not yet acknowledged (ISR unread),
/// BAR 0 moved and bus mastering on, non-default selects, interrupt line
/// and PCI_CFG window. Returns the rig and the head of the unkicked request.
fn echo_source() -> (Rig, u16) {
    let mut rig = Rig::new();
    let d = Driver::probe(&rig);
    let [(mut q0, n0), (mut q1, n1)] = d.init();
    for word in [&b"abc"[..], b"hello", b"xy"] {
        q0.add(&[Buf::In(word), Buf::Out(8)]).unwrap();
        rig.w16(n0, 0);
        let used = q0.pop_used().unwrap();
        assert_eq!(used.data[..], word.iter().rev().copied().collect::<Vec<_>>()[..]);
    }
    rig.w32(MSIX_TABLE_OFFSET + 2 * 16 + 12, 1);
    q1.add(&[Buf::In(b"queue1"), Buf::Out(8)]).unwrap();
    rig.w16(n1, 1);
    assert_eq!(&q1.pop_used().unwrap().data[..], b"1eueuq");
    let pending = q0.add(&[Buf::In(b"late"), Buf::Out(8)]).unwrap();
    let irq = rig.echo().irq.clone().unwrap();
    irq.trigger(InterruptKind::Config).unwrap();

    let command = rig.cfg16(4);
    rig.cfg_write(4, &(command & !2).to_le_bytes());
    rig.cfg_write(0x10, &(MOVED as u32).to_le_bytes());
    rig.cfg_write(0x14, &((MOVED >> 32) as u32).to_le_bytes());
    rig.cfg_write(4, &(command | 2 | 4).to_le_bytes());
    rig.bar = MOVED;
    rig.cfg_write(0x3c, &[11]);
    let window = rig.virtio_cap(5);
    rig.cfg_write(window + 4, &[0]);
    rig.cfg_write(window + 8, &(STATUS as u32).to_le_bytes());
    rig.cfg_write(window + 12, &1u32.to_le_bytes());
    rig.w32(DFSELECT, 1);
    rig.w32(GFSELECT, 1);
    rig.w16(Q_SELECT, 1);
    rig.msi.take();
    rig.io.take();
    (rig, pending)
}

/// A rig for `device` on a copy of `source`'s guest memory, BARs placed
/// as the VMM places them at boot.
fn destination_for(source: &Rig, device: Arc<dyn DeviceAccess>, options: VirtioPciOptions) -> Rig {
    let rig = Rig::for_device_on(device, options, copy_memory(&source.map));
    rig.msi.take();
    rig.io.take();
    rig
}

/// An echo destination for `source`.
fn echo_destination(source: &Rig) -> Rig {
    let echo = Arc::new(Mutex::new(Echo::new()));
    let mut rig = destination_for(source, echo.clone(), VirtioPciOptions::default());
    rig.echo = Some(echo);
    rig
}

/// Restores `state` into `rig` as the VMM does: restore, then the root's
/// dispatch map follows the restored BARs.
fn restore(rig: &mut Rig, state: &VirtioPciState) -> Result<(), TransportStateError> {
    let result = rig.pci().restore(state);
    rig.root.refresh_bars();
    let bar = rig.pci().config_space().bar(0);
    if let Some(bar) = bar {
        rig.bar = bar.addr;
    }
    result
}

/// What the driver reads without side effects — configuration space,
/// common configuration (under the current selects, then every queue),
/// device configuration, notification region, MSI-X table and PBA — and
/// what the VMM sees of the BARs. The selects are left as found.
fn observe(rig: &Rig) -> Vec<(String, Vec<u8>)> {
    let mut seen = Vec::new();
    let mut bytes = |what: String, offset: u64, len: usize| {
        let mut b = vec![0u8; len];
        rig.read(offset, &mut b);
        seen.push((what, b));
    };
    bytes("common configuration".into(), 0, 0x40);
    let select = rig.r16(Q_SELECT);
    for queue in 0..rig.r16(NUMQ) {
        rig.w16(Q_SELECT, queue);
        bytes(format!("queue {queue} registers"), 0, 0x40);
    }
    rig.w16(Q_SELECT, select);
    let features = rig.r32(DFSELECT);
    for half in 0..2 {
        rig.w32(DFSELECT, half);
        bytes(format!("device features {half}"), DF, 4);
    }
    rig.w32(DFSELECT, features);
    bytes("device configuration".into(), DEVICE_CFG_OFFSET, 16);
    bytes("notification region".into(), NOTIFY_CFG_OFFSET, 16);
    let vectors = u64::from(rig.pci().msix_vectors());
    bytes("MSI-X table".into(), MSIX_TABLE_OFFSET, 16 * vectors as usize);
    bytes("MSI-X PBA".into(), MSIX_PBA_OFFSET, 8);
    let mut config = vec![0u8; 256];
    for at in (0..256u16).step_by(4) {
        rig.cfg_read(at, &mut config[usize::from(at)..usize::from(at) + 4]);
    }
    seen.push(("configuration space".into(), config));
    let pci = rig.pci();
    seen.push(("BARs".into(), format!("{:?}", pci.config_space().bars()).into_bytes()));
    seen.push((
        "notify address".into(),
        format!("{:?}", pci.notify_address()).into_bytes(),
    ));
    drop(pci);
    seen.push((
        "root's BARs".into(),
        format!("{:?}", rig.root.mapped_bars()).into_bytes(),
    ));
    seen
}

#[test]
fn a_restored_transport_reads_alike_and_goes_on_where_the_source_stopped() {
    let (src, pending) = echo_source();
    let state = through_the_wire(&src.pci().state());
    // What the state says, as the source left it.
    assert_eq!((state.device_type, state.num_queues, state.msix_vectors), (42, 2, 3));
    assert!(state.features_ok && state.driver_ok && state.device_active && !state.failed);
    assert!(!state.device_needs_reset);
    let at = |q: usize| (state.queues[q].next_avail, state.queues[q].next_used);
    assert_eq!((at(0), at(1)), ((3, 3), (1, 1)));
    assert_eq!(state.isr, ISR_QUEUE | ISR_CONFIG);
    assert_eq!(state.config_generation, 1);
    assert_eq!(state.msix.pending, [0b100]);
    assert_eq!(state.config.bars[0].addr, MOVED);
    assert_eq!((state.queue_select, state.device_feature_select), (1, 1));
    assert_eq!(src.pci().state(), state, "taking the state changes nothing");

    let mut dst = echo_destination(&src);
    assert_ne!(dst.bar, MOVED);
    restore(&mut dst, &state).unwrap();

    // The live vectors were routed, and nothing was delivered or processed.
    assert_eq!(
        dst.msi.take(),
        [Msi::Configure(0, msg(0), true), Msi::Configure(1, msg(1), true)]
    );
    assert!(dst.echo().notifies.is_empty());
    assert!(dst.echo().common.is_active());
    assert_eq!(dst.echo().common.queue_indices(), src.echo().common.queue_indices());
    assert_eq!(dst.echo().common.acked_features(), src.echo().common.acked_features());
    // The eventfds moved to the restored BAR 0.
    assert_eq!(dst.pci().notify_address(), Some(MOVED + NOTIFY_CFG_OFFSET));
    assert_eq!(
        dst.io.take(),
        [
            (false, MMIO64.start + NOTIFY_CFG_OFFSET),
            (false, MMIO64.start + NOTIFY_CFG_OFFSET + 4),
            (true, MOVED + NOTIFY_CFG_OFFSET),
            (true, MOVED + NOTIFY_CFG_OFFSET + 4),
        ]
    );

    // Every register reads the same on both sides; the ISR last (a read
    // clears it).
    let (seen_src, seen_dst) = (observe(&src), observe(&dst));
    for ((what, a), (_, b)) in seen_src.iter().zip(&seen_dst) {
        assert_eq!(a, b, "{what} differs");
    }
    assert_eq!(dst.r8(STATUS), LIVE);
    assert_eq!(dst.pci().state(), src.pci().state());
    assert_eq!(src.r8(ISR_CFG_OFFSET), ISR_QUEUE | ISR_CONFIG);
    assert_eq!(dst.r8(ISR_CFG_OFFSET), ISR_QUEUE | ISR_CONFIG);

    // The guest goes on with queue 0 in the destination's memory: the
    // request it made available before the stop, and a new one.
    let ring = RawRing::from_registers(&dst, 0);
    assert_eq!((ring.avail_idx(), ring.used_idx()), (4, 3));
    assert!(pending < 6, "descriptors 6 and 7 are free");
    let answer = ring.add(6, 0x38000, b"after", 8);
    // Kicked through the ioeventfd at the moved address, as KVM and the
    // event loop would.
    assert!(dst.io.kvm_write(MOVED + NOTIFY_CFG_OFFSET));
    let events = dst.pci().queue_events().unwrap();
    assert_eq!(events[0].1.read().unwrap(), 1);
    assert!(dst.pci().notifier().notify(0));
    assert_eq!(ring.used_idx(), 5);
    assert_eq!(ring.used_elem(3), (u32::from(pending), 4));
    assert_eq!(ring.used_elem(4), (6, 5));
    assert_eq!(ring.read(answer, 5), b"retfa");
    assert_eq!(dst.msi.take(), [Msi::Trigger(1)]);
    assert_eq!(dst.r8(ISR_CFG_OFFSET), ISR_QUEUE);

    // Queue 1, through an MMIO notification: its vector is still masked,
    // so the interrupt stays pending until the guest unmasks it.
    let ring = RawRing::from_registers(&dst, 1);
    assert_eq!((ring.avail_idx(), ring.used_idx()), (1, 1));
    let answer = ring.add(4, 0x39000, b"q1", 2);
    dst.w16(NOTIFY_CFG_OFFSET + 4, 1);
    assert_eq!((ring.used_idx(), ring.used_elem(1)), (2, (4, 2)));
    assert_eq!(ring.read(answer, 2), b"1q");
    assert!(dst.msi.take().is_empty());
    dst.w32(MSIX_TABLE_OFFSET + 2 * 16 + 12, 0);
    assert_eq!(dst.msi.take(), [Msi::Configure(2, msg(2), true), Msi::Trigger(2)]);

    // A driver reset and a new initialisation work as on any transport.
    let d = Driver::probe(&dst);
    let [(mut q0, n0), _] = d.init();
    q0.add(&[Buf::In(b"again"), Buf::Out(8)]).unwrap();
    dst.w16(n0, 0);
    assert_eq!(&q0.pop_used().unwrap().data[..], b"niaga");
}

#[test]
fn a_device_that_needs_reset_is_restored_needing_reset() {
    let rig = Rig::new();
    let d = Driver::probe(&rig);
    let [(mut q0, n0), _] = d.init();
    q0.add(&[Buf::In(&[]), Buf::Out(4)]).unwrap();
    rig.w16(n0, 0);
    assert_eq!(d.status(), LIVE | STATUS_DEVICE_NEEDS_RESET);

    let state = through_the_wire(&rig.pci().state());
    assert!(state.device_active && state.device_needs_reset && !state.failed);

    let mut dst = echo_destination(&rig);
    restore(&mut dst, &state).unwrap();
    assert_eq!(dst.r8(STATUS), LIVE | STATUS_DEVICE_NEEDS_RESET);
    assert!(!dst.echo().common.is_active(), "left needing reset, not activated");
    assert!(!dst.pci().notify(0), "nothing is processed");
    // The driver's reset brings it back.
    let d = Driver::probe(&dst);
    let [(mut q0, n0), _] = d.init();
    q0.add(&[Buf::In(b"ok"), Buf::Out(4)]).unwrap();
    dst.w16(n0, 0);
    assert_eq!(&q0.pop_used().unwrap().data[..], b"ko");
}

/// Stopped in the middle of initialisation (features negotiated, one
/// queue set up): the device gets the features, and the driver finishes
/// on the destination.
#[test]
fn a_transport_stopped_during_initialisation_is_finished_on_the_destination() {
    let rig = Rig::new();
    let d = Driver::probe(&rig);
    assert_eq!(d.negotiate(VIRTIO_F_VERSION_1 | F_ECHO), FEATURES_DONE);
    rig.enable_msix(3);
    rig.w16(MSIX, 0);
    let (_q0, n0) = d.setup_queue(0, 8, 0x10000, 1);

    let state = through_the_wire(&rig.pci().state());
    assert!(state.features_ok && !state.driver_ok && !state.device_active);
    assert_eq!(state.queues[0].next_avail, 0);

    let mut dst = echo_destination(&rig);
    restore(&mut dst, &state).unwrap();
    assert_eq!(
        dst.echo().common.acked_features(),
        VIRTIO_F_VERSION_1 | F_ECHO,
        "the device has the negotiated features"
    );
    assert!(!dst.echo().common.is_active());
    assert_eq!(dst.msi.take().len(), 3, "the three vectors routed");
    let d = Driver::probe(&dst);
    assert_eq!(d.status(), FEATURES_DONE);
    let (_q1, _) = d.setup_queue(1, 8, 0x20000, 2);
    d.set_status(LIVE);
    assert_eq!(d.status(), LIVE);
    assert!(dst.echo().common.is_active());
    // The queue the source's driver laid out works (in the copy).
    let ring = RawRing::from_registers(&dst, 0);
    let answer = ring.add(0, 0x38000, b"mid", 4);
    dst.w16(n0, 0);
    assert_eq!((ring.used_idx(), ring.read(answer, 3)), (1, b"dim".to_vec()));
}

/// The real virtio-mem device: plugged blocks (restored by its own section
/// before the transport) survive activation, and requests go on.
#[test]
fn virtio_mem_is_restored_with_its_blocks_and_queue() {
    let region = |requested| {
        let block = Arc::new(RamBlock::new("vmem0", 64 << 20, Backing::Memfd).unwrap());
        let options = VirtioMemOptions {
            requested_size: requested,
            ..VirtioMemOptions::new(1 << 32)
        };
        VirtioMemRegion::new(block, options).unwrap()
    };
    let source_region = region(8 << 20);
    let device = Arc::new(Mutex::new(VirtioMem::new(source_region.clone())));
    let src = Rig::for_device(device.clone(), VirtioPciOptions::default());
    let d = Driver::probe(&src);
    let mut queues = d.init_queues(&[(32, 0x10000)]);
    let (queue, notify) = &mut queues[0];
    for request in [
        Request::Plug(BlockRange {
            addr: 1 << 32,
            nb_blocks: 2,
        }),
        Request::State(BlockRange {
            addr: 1 << 32,
            nb_blocks: 2,
        }),
    ] {
        queue
            .add(&[Buf::In(&request.to_bytes()), Buf::Out(RESPONSE_SIZE as u32)])
            .unwrap();
        src.w16(*notify, 0);
        let used = queue.pop_used().unwrap();
        assert_eq!(u16::from_le_bytes([used.data[0], used.data[1]]), VIRTIO_MEM_RESP_ACK);
    }
    assert_eq!(source_region.plugged_size(), 4 << 20);

    let state = through_the_wire(&src.pci().state());
    assert_eq!((state.queues[0].next_avail, state.queues[0].next_used), (2, 2));
    assert_eq!(
        device.lock().unwrap().queue_indices(),
        [QueueIndices {
            next_avail: 2,
            next_used: 2,
            event_idx: false
        }]
    );

    // The destination: the region first (its section), then the transport.
    let dest_region = region(0);
    dest_region.load_state(&source_region.save_state()).unwrap();
    let dest_device = Arc::new(Mutex::new(VirtioMem::new(dest_region.clone())));
    let mut dst = destination_for(&src, dest_device.clone(), VirtioPciOptions::default());
    restore(&mut dst, &state).unwrap();
    assert!(dest_device.lock().unwrap().is_active());
    assert_eq!(dest_region.plugged_size(), 4 << 20, "activation kept the blocks");
    assert_eq!(
        dst.msi.take(),
        [Msi::Configure(0, msg(0), true), Msi::Configure(1, msg(1), true)],
        "routed, and no interrupt"
    );
    let (seen_src, seen_dst) = (observe(&src), observe(&dst));
    for ((what, a), (_, b)) in seen_src.iter().zip(&seen_dst) {
        assert_eq!(a, b, "{what} differs");
    }

    assert_eq!(
        dest_device.lock().unwrap().queue_indices(),
        device.lock().unwrap().queue_indices()
    );

    // UNPLUG one block: answered at used index 2, interrupt on vector 1;
    // the used elements of the source's requests are never written again
    // (poisoned here to see it).
    let ring = RawRing::from_registers(&dst, 0);
    ring.write(ring.used + 4, &[0xff; 16]);
    let unplug = Request::Unplug(BlockRange {
        addr: (1 << 32) + (2 << 20),
        nb_blocks: 1,
    });
    let answer = ring.add(10, 0x38000, &unplug.to_bytes(), RESPONSE_SIZE as u32);
    dst.w16(NOTIFY_CFG_OFFSET, 0);
    assert_eq!(ring.used_idx(), 3);
    assert_eq!(ring.used_elem(2), (10, RESPONSE_SIZE as u32));
    let response = ring.read(answer, 2);
    assert_eq!(u16::from_le_bytes([response[0], response[1]]), VIRTIO_MEM_RESP_ACK);
    assert_eq!(dest_region.plugged_size(), 2 << 20);
    assert_eq!(ring.read(ring.used + 4, 16), [0xff; 16]);
    assert_eq!(dst.msi.take(), [Msi::Trigger(1)]);
}

/// A destination that differs from the source is refused, naming the
/// field and both values, and is left as it was.
#[test]
fn a_different_destination_is_refused() {
    let (src, _) = echo_source();
    let state = src.pci().state();
    let cases: [(Echo, VirtioPciOptions, &str, u64, u64); 5] = [
        (
            Echo::custom(43, vec![16, 8]),
            VirtioPciOptions::default(),
            "device type",
            42,
            43,
        ),
        (
            Echo::custom(42, vec![16]),
            VirtioPciOptions::default(),
            "number of queues",
            2,
            1,
        ),
        (
            Echo::new(),
            VirtioPciOptions {
                msix_vectors: Some(4),
                ..Default::default()
            },
            "MSI-X vector count",
            3,
            4,
        ),
        (
            Echo::custom(42, vec![16, 16]),
            VirtioPciOptions::default(),
            "queue 1 maximum size",
            8,
            16,
        ),
        (
            Echo::new(),
            VirtioPciOptions {
                class_code: Some(0x02_0000),
                ..Default::default()
            },
            "read-only configuration byte 0xb",
            0xff,
            0x02,
        ),
    ];
    for (echo, options, field, saved, local) in cases {
        let echo = Arc::new(Mutex::new(echo));
        let mut dst = destination_for(&src, echo.clone(), options);
        let before = dst.pci().state();
        let err = restore(&mut dst, &state).unwrap_err();
        assert_eq!(
            err,
            TransportStateError::Mismatch {
                field: field.into(),
                saved,
                local
            }
        );
        let text = err.to_string();
        assert!(
            text.contains(field) && text.contains(&format!("{saved:#x}")) && text.contains(&format!("{local:#x}")),
            "{text}"
        );
        assert_eq!(dst.pci().state(), before, "{field}: the destination changed");
        assert!(!echo.lock().unwrap().common.is_active());
        assert!(dst.msi.take().is_empty() && dst.io.take().is_empty());
    }

    // A transport a driver already used.
    let mut dst = echo_destination(&src);
    dst.w8(STATUS, 1);
    assert_eq!(restore(&mut dst, &state), Err(TransportStateError::InUse { status: 1 }));
}

/// A garbled state is refused, naming the value, with nothing changed.
#[test]
fn garbled_states_are_refused() {
    let (src, _) = echo_source();
    let good = src.pci().state();
    type Garble = fn(&mut VirtioPciState);
    let cases: &[(&str, Garble)] = &[
        ("queue 0 size", |s| s.queues[0].size = 0),
        ("queue 0 size", |s| s.queues[0].size = 32),
        ("queue 1 size", |s| s.queues[1].size = 6),
        ("queue 0 maximum size", |s| s.queues[0].max_size = 32),
        ("number of saved queues", |s| {
            s.queues.pop();
        }),
        ("queue 1 MSI-X vector", |s| s.queues[1].msix_vector = 3),
        ("config MSI-X vector", |s| s.config_msix_vector = 0x7fff),
        ("ISR", |s| s.isr = 0x84),
        ("MSI-X pending word 0", |s| s.msix.pending[0] = 1 << 3),
        ("MSI-X table size", |s| {
            s.msix.entries.pop();
        }),
        ("MSI-X pending bit array length (words)", |s| s.msix.pending.push(0)),
        ("MSI-X message control in the configuration space", |s| {
            s.msix.enabled = false
        }),
        ("configuration space length", |s| s.config.regs.truncate(255)),
        ("read-only configuration byte 0x0", |s| s.config.regs[0] ^= 1),
        ("BAR 0 address", |s| s.config.bars[0].addr += 0x1000),
        ("BAR 0 size", |s| s.config.bars[0].size = 0x1000),
        ("number of BARs", |s| {
            s.config.bars.clear();
        }),
        ("status flags", |s| s.device_active = false),
        ("status flags", |s| s.failed = true),
        ("status flags", |s| {
            s.device_active = false;
            s.device_needs_reset = true;
        }),
        ("accepted features (offered features here)", |s| {
            s.driver_features |= 1 << 40
        }),
        ("accepted features", |s| s.driver_features &= !VIRTIO_F_VERSION_1),
        ("queue 0 next_avail - next_used", |s| {
            s.queues[0].next_used = s.queues[0].next_avail.wrapping_sub(9)
        }),
        ("queue 0 event_idx", |s| s.queues[0].event_idx = true),
        ("queue 0 next_avail", |s| {
            s.device_active = false;
            s.failed = true;
        }),
    ];
    for &(field, garble) in cases {
        let mut state = good.clone();
        garble(&mut state);
        let mut dst = echo_destination(&src);
        let before = dst.pci().state();
        let err = restore(&mut dst, &state).unwrap_err();
        let named = match &err {
            TransportStateError::Mismatch { field, .. } | TransportStateError::Invalid { field, .. } => field,
            other => panic!("{field}: {other}"),
        };
        assert!(named.starts_with(field), "expected {field:?}, got {err}");
        assert_eq!(dst.pci().state(), before, "{field}: the destination changed");
        assert!(!dst.echo().common.is_active());
        assert!(dst.msi.take().is_empty() && dst.io.take().is_empty());
    }
}

/// Rings the destination cannot use: the registers are restored, the
/// activation fails last, and the status says the device needs a reset.
#[test]
fn a_failed_activation_is_reported_and_needs_reset() {
    let (src, _) = echo_source();
    let mut state = src.pci().state();
    state.queues[1].desc = 0x4000_0000;
    let mut dst = echo_destination(&src);
    let err = restore(&mut dst, &state).unwrap_err();
    assert!(
        matches!(&err, TransportStateError::Activation(why) if why.contains("queue 1")),
        "{err}"
    );
    assert_eq!(dst.r8(STATUS), LIVE | STATUS_DEVICE_NEEDS_RESET);
    assert!(!dst.echo().common.is_active());
    assert!(dst.msi.triggers().is_empty(), "no interrupt");
}

/// The valid state of a live echo source, taken once.
fn base_state() -> &'static VirtioPciState {
    static STATE: OnceLock<VirtioPciState> = OnceLock::new();
    STATE.get_or_init(|| echo_source().0.pci().state())
}

/// One change of a state field to an arbitrary value.
fn garble(state: &mut VirtioPciState, field: u8, value: u64) {
    let q = (value >> 32) as usize % (state.queues.len() + 1);
    let v16 = value as u16;
    let flag = value & 1 != 0;
    match field % 24 {
        0 => state.device_type = value as u32,
        1 => state.num_queues = v16,
        2 => state.msix_vectors = v16,
        3 => state.driver_features = value,
        4 => state.status = value as u8,
        5 => state.features_ok = flag,
        6 => state.driver_ok = flag,
        7 => state.failed = flag,
        8 => state.device_active = flag,
        9 => state.device_needs_reset = flag,
        10 => state.config_msix_vector = v16,
        11 => state.isr = value as u8,
        12 => state.queue_select = v16,
        13 => {
            if let Some(queue) = state.queues.get_mut(q) {
                queue.size = v16;
            }
        }
        14 => {
            if let Some(queue) = state.queues.get_mut(q) {
                queue.msix_vector = v16;
            }
        }
        15 => {
            if let Some(queue) = state.queues.get_mut(q) {
                queue.next_avail = v16;
            }
        }
        16 => {
            if let Some(queue) = state.queues.get_mut(q) {
                queue.next_used = v16;
            }
        }
        17 => {
            if let Some(queue) = state.queues.get_mut(q) {
                queue.desc = value;
                queue.enabled = flag;
            }
        }
        18 => state.queues.truncate(q),
        19 => {
            let at = value as usize % 300;
            if let Some(byte) = state.config.regs.get_mut(at) {
                *byte = (value >> 16) as u8;
            } else {
                state.config.regs.truncate(value as usize % 256);
            }
        }
        20 => {
            if let Some(bar) = state.config.bars.first_mut() {
                bar.addr = value;
            }
        }
        21 => {
            let at = q % (state.msix.entries.len() + 1);
            if let Some(entry) = state.msix.entries.get_mut(at) {
                entry.masked = flag;
                entry.addr = value;
            } else {
                state.msix.entries.truncate(at.saturating_sub(1));
            }
        }
        22 => {
            if let Some(word) = state.msix.pending.first_mut() {
                *word = value;
            }
        }
        _ => {
            state.msix.enabled = flag;
            state.msix.function_masked = value & 2 != 0;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any state, garbled at random: restore never panics; a refusal other
    /// than the last step's leaves the destination as it was; a restored
    /// device is active exactly when the state says so, and its queues
    /// can be kicked.
    #[test]
    fn random_states_never_panic(changes in prop::collection::vec((any::<u8>(), any::<u64>()), 1..5)) {
        let mut state = base_state().clone();
        for &(field, value) in &changes {
            garble(&mut state, field, value);
        }
        let echo = Arc::new(Mutex::new(Echo::new()));
        let mut rig = Rig::for_device(echo.clone(), VirtioPciOptions::default());
        rig.echo = Some(echo);
        let before = rig.pci().state();
        match restore(&mut rig, &state) {
            Ok(()) => {
                let active = state.device_active && !state.device_needs_reset;
                prop_assert_eq!(rig.echo().common.is_active(), active);
                prop_assert_eq!(rig.r8(STATUS) & STATUS_DRIVER_OK, state.status & STATUS_DRIVER_OK);
                for queue in 0..2 {
                    rig.pci().notify(queue);
                }
            }
            Err(TransportStateError::Activation(_)) => {
                prop_assert_eq!(rig.r8(STATUS) & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
            }
            Err(_) => prop_assert_eq!(rig.pci().state(), before),
        }
    }
}
