//! A hostile guest: random configuration, port and BAR accesses of any
//! width at any offset, mixed with event-loop kicks and device interrupts,
//! never panic, and never change what is read-only.

mod common;

use common::{ECHO_TYPE, Rig};
use memvisor_pci::bus::ECAM_BUS_SIZE;
use memvisor_pci::virtio_pci::BAR0_SIZE;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    EcamRead(u64, usize),
    EcamWrite(u64, Vec<u8>),
    PioRead(u16, usize),
    PioWrite(u16, Vec<u8>),
    /// Offset from BAR 0's assigned address (it may have moved).
    MmioRead(u64, usize),
    MmioWrite(u64, Vec<u8>),
    Notify(u16),
    ConfigInterrupt,
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=9)
}

fn ecam_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        // The device's function 0, mostly its header and capabilities.
        (0u64..0x1010).prop_map(|r| (1 << 15) + r),
        0u64..ECAM_BUS_SIZE + 0x100,
        any::<u64>(),
    ]
}

fn bar_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..0x40,
        2 => 0x1000u64..0x1004,
        2 => 0x2000u64..0x2010,
        2 => 0x3000u64..0x3010,
        2 => 0x4000u64..0x4040,
        1 => 0x5000u64..0x5010,
        2 => 0u64..BAR0_SIZE + 0x100,
        1 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (ecam_offset(), 0usize..=9).prop_map(|(o, n)| Op::EcamRead(o, n)),
        3 => (ecam_offset(), bytes()).prop_map(|(o, d)| Op::EcamWrite(o, d)),
        1 => (0u16..10, 0usize..=9).prop_map(|(p, n)| Op::PioRead(p, n)),
        1 => (prop_oneof![0u16..10, any::<u16>()], bytes()).prop_map(|(p, d)| Op::PioWrite(p, d)),
        4 => (bar_offset(), 0usize..=9).prop_map(|(o, n)| Op::MmioRead(o, n)),
        6 => (bar_offset(), bytes()).prop_map(|(o, d)| Op::MmioWrite(o, d)),
        1 => (0u16..4).prop_map(Op::Notify),
        1 => Just(Op::ConfigInterrupt),
    ]
}

fn run(rig: &Rig, op: &Op) {
    match op {
        Op::EcamRead(offset, n) => rig.root.ecam_read(*offset, &mut vec![0; *n]),
        Op::EcamWrite(offset, data) => rig.root.ecam_write(*offset, data),
        Op::PioRead(port, n) => rig.root.pio_read(*port, &mut vec![0; *n]),
        Op::PioWrite(port, data) => rig.root.pio_write(*port, data),
        Op::MmioRead(offset, n) => {
            let bar = rig.pci().config_space().bar(0).unwrap().addr;
            rig.root.mmio_read(bar.wrapping_add(*offset), &mut vec![0; *n]);
            // Directly too, whatever the decoding state.
            use memvisor_pci::PciDevice;
            rig.pci().read_bar((*offset % 7) as u8, *offset, &mut vec![0; *n]);
        }
        Op::MmioWrite(offset, data) => {
            let bar = rig.pci().config_space().bar(0).unwrap().addr;
            rig.root.mmio_write(bar.wrapping_add(*offset), data);
        }
        Op::Notify(queue) => {
            rig.pci().notify(*queue);
        }
        Op::ConfigInterrupt => rig.echo().common.signal_config(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_accesses_never_panic(ops in prop::collection::vec(op(), 1..80), live in any::<bool>()) {
        let rig = Rig::new();
        if live {
            // Start from a live device with MSI-X on, as after boot.
            rig.enable_msix(3);
            rig.w8(0x14, 1);
            rig.w8(0x14, 3);
            rig.w32(0x08, 0);
            rig.w32(0x0c, 0);
            rig.w32(0x08, 1);
            rig.w32(0x0c, 1);
            rig.w8(0x14, 0xb);
            for (q, base) in [(0u16, 0x10000u64), (1, 0x20000)] {
                rig.w16(0x16, q);
                rig.w64(0x20, base);
                rig.w64(0x28, base + 0x100);
                rig.w64(0x30, base + 0x1000);
                rig.w16(0x1a, q + 1);
                rig.w16(0x1c, 1);
            }
            rig.w8(0x14, 0xf);
        }
        for op in &ops {
            run(&rig, op);
        }
        // What is read-only stayed so.
        let base = rig.bdf.ecam_offset();
        let mut id = [0u8; 4];
        rig.root.ecam_read(base, &mut id);
        prop_assert_eq!(u32::from_le_bytes(id), (0x1040 + ECHO_TYPE) << 16 | 0x1af4);
        rig.root.ecam_read(0, &mut id);
        prop_assert_eq!(u32::from_le_bytes(id), 0x0d57_8086);
        let bar0 = rig.pci().config_space().bar(0).unwrap();
        prop_assert_eq!(bar0.size, BAR0_SIZE);
        prop_assert_eq!(bar0.addr % BAR0_SIZE, 0);
        prop_assert_eq!(rig.pci().num_queues(), 2);
        // The MSI-X table size and capability chain are intact.
        prop_assert_eq!(rig.capabilities().len(), 6);
        prop_assert_eq!(rig.cfg16(rig.msix_cap() + 2) & 0x7ff, 2);
    }
}
