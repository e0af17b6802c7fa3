//! Unit tests against a fake VFIO device holding QEMU's NVMe controller.

mod fake;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use memvisor_pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE};
use memvisor_pci::msix::{MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK};
use memvisor_pci::{BarAllocator, MsiMessage, PciDevice, PciRoot};
use proptest::prelude::*;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use self::fake::{
    BAR0_SIZE, Event, FakeDevice, FakeState, MSI_CAP, MSIX_CAP, NVME_VECTORS, PCIE_CAP, PM_CAP, RecordingSink,
    Timeline, lock,
};
use crate::{CAP_ID_MSI, VfioPciDevice, VfioPciError};

/// A device on the fake NVMe, with everything a test looks at.
struct Harness {
    dev: VfioPciDevice,
    fake: Arc<Mutex<FakeState>>,
    timeline: Timeline,
    /// Clones of the irqfds handed to the device (same eventfds).
    irqfds: Vec<EventFd>,
    /// The fd numbers of the irqfds the device holds.
    irq_raw: Vec<RawFd>,
}

impl Harness {
    fn with(edit: impl FnOnce(&mut FakeState), vectors: usize) -> Result<Self, VfioPciError> {
        let timeline: Timeline = Arc::default();
        let mut state = FakeState::nvme(timeline.clone());
        edit(&mut state);
        let fake = Arc::new(Mutex::new(state));
        let given: Vec<EventFd> = (0..vectors).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        let irqfds = given.iter().map(|fd| fd.try_clone().unwrap()).collect();
        let irq_raw = given.iter().map(|fd| fd.as_raw_fd()).collect();
        let dev = VfioPciDevice::new(
            Box::new(FakeDevice(fake.clone())),
            Arc::new(RecordingSink(timeline.clone())),
            given,
        )?;
        Ok(Self {
            dev,
            fake,
            timeline,
            irqfds,
            irq_raw,
        })
    }

    fn nvme() -> Self {
        let h = Self::with(|_| {}, usize::from(NVME_VECTORS)).unwrap();
        h.take();
        h
    }

    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut self.timeline.lock().unwrap())
    }

    fn cfg(&mut self, offset: u16, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_config(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn cfg8(&mut self, offset: u16) -> u8 {
        self.cfg(offset, 1) as u8
    }

    fn cfg16(&mut self, offset: u16) -> u16 {
        self.cfg(offset, 2) as u16
    }

    fn cfg32(&mut self, offset: u16) -> u32 {
        self.cfg(offset, 4) as u32
    }

    fn set_cfg(&mut self, offset: u16, bytes: &[u8]) {
        self.dev.write_config(offset, bytes);
    }

    fn device_cfg16(&self, offset: usize) -> u16 {
        let state = lock(&self.fake);
        u16::from_le_bytes([state.config[offset], state.config[offset + 1]])
    }

    fn msix_control(&mut self, control: u16) {
        self.set_cfg(MSIX_CAP as u16 + 2, &control.to_le_bytes());
    }

    /// Programs table entry `vector` (still masked).
    fn program(&mut self, vector: u16, msg: MsiMessage) {
        let base = 0x2000 + u64::from(vector) * 16;
        self.dev.write_bar(0, base, &msg.addr.to_le_bytes());
        self.dev.write_bar(0, base + 8, &msg.data.to_le_bytes());
    }

    fn mask(&mut self, vector: u16, masked: bool) {
        let at = 0x2000 + u64::from(vector) * 16 + 12;
        self.dev.write_bar(0, at, &u32::from(masked).to_le_bytes());
    }

    fn fire(&self, vector: u16) -> bool {
        lock(&self.fake).fire(vector)
    }

    fn triggers(&self) -> Option<Vec<RawFd>> {
        lock(&self.fake).trigger_fds()
    }

    fn refused(&self) -> Vec<String> {
        lock(&self.fake).refused.clone()
    }
}

fn msg(vector: u16) -> MsiMessage {
    MsiMessage {
        addr: 0xfee0_0000 | u64::from(vector) << 12,
        data: 0x4020 + u32::from(vector),
    }
}

#[test]
fn identification_and_info() {
    let mut h = Harness::nvme();
    assert_eq!(h.cfg32(0), 0x0010_1b36);
    assert_eq!(h.cfg32(0x08), 0x0108_0202, "class 010802, revision 2");
    assert_eq!(h.cfg32(0x2c), 0x1100_1af4);
    assert_eq!(h.cfg8(0x0e), 0, "single-function type-0 header");
    assert_eq!(h.cfg8(0x0f), 0, "no BIST");
    assert_eq!(h.cfg8(0x3d), 0, "no INTx pin");
    assert_eq!(h.cfg8(0x0c), 0, "cache line size is the VMM's");
    let info = h.dev.info().clone();
    assert_eq!(
        (info.vendor_id, info.device_id, info.class_code),
        (0x1b36, 0x0010, 0x01_0802)
    );
    assert_eq!(info.msix_vectors, NVME_VECTORS);
    assert_eq!(info.bars.len(), 1);
    let bar = info.bars[0];
    assert_eq!(
        (bar.index, bar.size, bar.is_64bit, bar.prefetchable),
        (0, BAR0_SIZE, true, false)
    );
    assert!(bar.mappable);
    let line = info.to_string();
    assert!(line.starts_with("1b36:0010 rev 02 class 010802"), "{line}");
    assert!(
        line.contains("BAR0 16 KiB mem64") && line.contains("MSI-X 65 vectors"),
        "{line}"
    );
    assert!(line.contains("MSI@0xc0 (hidden)"), "{line}");
    // Identification is read-only.
    h.set_cfg(0, &[0; 4]);
    h.set_cfg(0x08, &[0; 4]);
    assert_eq!(h.cfg32(0), 0x0010_1b36);
    assert_eq!(h.cfg32(0x08), 0x0108_0202);
    assert!(h.take().is_empty(), "nothing reached the device");
    assert_eq!(VfioPciDevice::msix_vectors_of(&FakeDevice(h.fake.clone())).unwrap(), 65);
}

#[test]
fn bar_sizing_and_relocation() {
    let mut h = Harness::nvme();
    assert_eq!(
        h.cfg32(0x10),
        0x4,
        "64-bit memory BAR, unassigned: not the host address"
    );
    assert_eq!(h.cfg32(0x14), 0);
    h.set_cfg(0x10, &[0xff; 4]);
    h.set_cfg(0x14, &[0xff; 4]);
    assert_eq!(h.cfg32(0x10), 0xffff_c004, "16 KiB");
    assert_eq!(h.cfg32(0x14), 0xffff_ffff);
    h.set_cfg(0x10, &0xc000_4000u32.to_le_bytes());
    h.set_cfg(0x14, &0x1u32.to_le_bytes());
    let bars = h.dev.bars();
    assert_eq!(bars.len(), 1);
    assert_eq!(
        (bars[0].addr, bars[0].size, bars[0].is_64bit),
        (0x1_c000_4000, BAR0_SIZE, true)
    );
    // An unaligned address keeps only the bits above the size.
    h.set_cfg(0x10, &0xd000_1234u32.to_le_bytes());
    assert_eq!(h.dev.bars()[0].addr, 0x1_d000_0000);
    // The other BARs and the ROM read zero and stay zero.
    for reg in [0x18u16, 0x1c, 0x20, 0x24, 0x30] {
        h.set_cfg(reg, &[0xff; 4]);
        assert_eq!(h.cfg32(reg), 0, "register {reg:#x}");
    }
    assert!(h.take().is_empty(), "BAR registers never reach the device");
}

#[test]
fn command_register() {
    let timeline: Timeline = Arc::default();
    let mut state = FakeState::nvme(timeline.clone());
    // The device comes with bus mastering and I/O decoding on.
    state.config[0x04] = 0x05;
    let fake = Arc::new(Mutex::new(state));
    let mut dev = VfioPciDevice::new(
        Box::new(FakeDevice(fake.clone())),
        Arc::new(RecordingSink(timeline.clone())),
        (0..NVME_VECTORS).map(|_| EventFd::new(0).unwrap()).collect(),
    )
    .unwrap();
    // At open: memory decoding on (for the VMM's accesses), bus mastering
    // and I/O off.
    assert_eq!(
        std::mem::take(&mut *timeline.lock().unwrap()),
        [Event::ConfigWrite {
            offset: 4,
            data: vec![0x02, 0]
        }]
    );
    let mut cmd = [0u8; 2];
    dev.read_config(COMMAND, &mut cmd);
    assert_eq!(u16::from_le_bytes(cmd), 0, "the guest sees a quiet device");
    drop(dev);

    let mut h = Harness::nvme();
    h.set_cfg(
        COMMAND,
        &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_IO_SPACE).to_le_bytes(),
    );
    assert_eq!(
        h.cfg16(COMMAND),
        COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_IO_SPACE
    );
    assert_eq!(
        h.take(),
        [Event::ConfigWrite {
            offset: 4,
            data: vec![0x06, 0]
        }],
        "bus mastering forwarded, memory decoding kept on, I/O not forwarded"
    );
    // Memory decoding off: emulated only; the device keeps decoding.
    h.set_cfg(COMMAND, &COMMAND_BUS_MASTER.to_le_bytes());
    assert_eq!(h.cfg16(COMMAND), COMMAND_BUS_MASTER);
    assert_eq!(h.device_cfg16(4), COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER);
    // INTx disable (bit 10) is emulated; SERR# enable (bit 8) is forwarded.
    h.take();
    h.set_cfg(COMMAND + 1, &[0x04]);
    assert_eq!(h.cfg16(COMMAND), COMMAND_BUS_MASTER | 1 << 10);
    assert_eq!(h.device_cfg16(4), COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER);
    h.set_cfg(COMMAND + 1, &[0x05]);
    assert_eq!(h.device_cfg16(4), COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | 1 << 8);
    // Bus mastering off.
    h.set_cfg(COMMAND, &0u16.to_le_bytes());
    assert_eq!(h.device_cfg16(4) & COMMAND_BUS_MASTER, 0);
}

/// The first write that sets bus mastering waits for the gate (the DMA
/// mappings being in place); a failed gate keeps bus mastering off and
/// forwards the rest of the write.
#[test]
fn bus_mastering_waits_for_the_gate() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut h = Harness::nvme();
    let outcomes = Arc::new(Mutex::new(vec![Ok(()), Err("pinning guest RAM failed".to_string())]));
    let (c, o) = (calls.clone(), outcomes.clone());
    h.dev.gate_bus_master(Box::new(move || {
        c.lock().unwrap().push("gate");
        o.lock().unwrap().pop().unwrap()
    }));
    // Memory decoding alone does not ask.
    h.set_cfg(COMMAND, &COMMAND_MEMORY_SPACE.to_le_bytes());
    assert!(calls.lock().unwrap().is_empty());
    h.take();
    // The gate fails: bus mastering stays off, memory decoding goes through.
    h.set_cfg(COMMAND, &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes());
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert_eq!(h.cfg16(COMMAND), COMMAND_MEMORY_SPACE);
    assert_eq!(
        h.take(),
        [Event::ConfigWrite {
            offset: 4,
            data: vec![0x02, 0]
        }]
    );
    // Asked again at the next such write; now it passes, and then never again.
    h.set_cfg(COMMAND, &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes());
    assert_eq!(h.cfg16(COMMAND), COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER);
    assert_eq!(
        h.take(),
        [Event::ConfigWrite {
            offset: 4,
            data: vec![0x06, 0]
        }]
    );
    h.set_cfg(COMMAND, &COMMAND_MEMORY_SPACE.to_le_bytes());
    h.set_cfg(COMMAND, &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes());
    assert_eq!(calls.lock().unwrap().len(), 2);
    assert_eq!(h.cfg16(COMMAND), COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER);
}

#[test]
fn status_and_forwarded_capability_registers() {
    let mut h = Harness::nvme();
    lock(&h.fake).config[0x07] = 0x20; // received master abort
    assert_eq!(h.cfg16(0x06), 0x2010);
    // A dword write of command + status: the error bit is cleared by
    // writing it back as one; nothing else of status is written.
    h.set_cfg(0x04, &(0x2000_0000u32 | u32::from(COMMAND_MEMORY_SPACE)).to_le_bytes());
    let writes = h.take();
    assert!(writes.contains(&Event::ConfigWrite {
        offset: 6,
        data: 0x2000u16.to_le_bytes().to_vec()
    }));
    // PMCSR: power state forwarded (the kernel moves the device).
    h.set_cfg((PM_CAP + 4) as u16, &0x0003u16.to_le_bytes());
    assert_eq!(
        h.take(),
        [Event::ConfigWrite {
            offset: PM_CAP as u64 + 4,
            data: vec![0x03, 0]
        }]
    );
    // PCIe device control: FLR (bit 15) never reaches the device.
    h.set_cfg((PCIE_CAP + 8) as u16, &0xa810u16.to_le_bytes());
    assert_eq!(
        h.take(),
        [Event::ConfigWrite {
            offset: PCIE_CAP as u64 + 8,
            data: 0x2810u16.to_le_bytes().to_vec()
        }]
    );
    // Read-only or VMM-owned: nothing is forwarded.
    for (offset, len) in [
        (0x00u16, 4usize),
        (0x08, 4),
        (0x0c, 4),
        (0x10, 8),
        (0x2c, 4),
        (0x30, 4),
        (0x3c, 4),
        (MSIX_CAP as u16 + 4, 8),
        (MSI_CAP as u16, 8),
        (PCIE_CAP as u16 + 0x10, 4), // link control
        (PM_CAP as u16, 4),
        (0xf0, 4),
        (0x100, 4),
        (0xffc, 4),
    ] {
        h.set_cfg(offset, &vec![0xff; len]);
        assert!(h.take().is_empty(), "write at {offset:#x}");
    }
    assert!(h.refused().is_empty());
}

#[test]
fn capability_chain_hides_msi() {
    let mut h = Harness::nvme();
    assert_ne!(h.cfg16(0x06) & 0x10, 0, "capability list");
    let mut chain = vec![];
    let mut at = h.cfg8(0x34);
    while at != 0 && chain.len() < 48 {
        chain.push((at, h.cfg8(u16::from(at))));
        at = h.cfg8(u16::from(at) + 1);
    }
    assert_eq!(
        chain,
        [(MSIX_CAP as u8, 0x11), (PCIE_CAP as u8, 0x10), (PM_CAP as u8, 0x01)],
        "MSI unlinked from between MSI-X and PCIe"
    );
    // The hidden capability reads zero.
    for off in (MSI_CAP..MSI_CAP + 0x18).step_by(4) {
        assert_eq!(h.cfg32(off as u16), 0, "{off:#x}");
    }
    let msi = h.dev.info().capabilities.iter().find(|c| c.id == CAP_ID_MSI).unwrap();
    assert!(!msi.exposed);
    assert_eq!(msi.len, 0x18);
    // MSI-X: emulated message control (65 vectors, disabled), the
    // device's table and PBA locations.
    assert_eq!(h.cfg16(MSIX_CAP as u16 + 2), NVME_VECTORS - 1);
    assert_eq!(h.cfg32(MSIX_CAP as u16 + 4), 0x2000);
    assert_eq!(h.cfg32(MSIX_CAP as u16 + 8), 0x3000);
    // PCIe: a root complex integrated endpoint without link or FLR.
    assert_eq!(h.cfg16(PCIE_CAP as u16 + 2), 0x0092);
    assert_eq!(h.cfg32(PCIE_CAP as u16 + 4), 0x0000_8000);
    assert_eq!(h.cfg16(PCIE_CAP as u16 + 8), 0x2810, "device control from the device");
    for off in [0x0cu16, 0x10, 0x2c, 0x30] {
        assert_eq!(h.cfg32(PCIE_CAP as u16 + off), 0, "link register {off:#x}");
    }
    assert_eq!(h.cfg32(PCIE_CAP as u16 + 0x24), 0x10, "device capabilities 2");
    // PM as the device has it.
    assert_eq!(h.cfg32(PM_CAP as u16), 0x0003_0001);
    assert_eq!(h.cfg16(PM_CAP as u16 + 4), 0x0008);
    // Bytes outside capabilities are the device's; extended space is empty.
    assert_eq!(h.cfg32(0xf0), 0xefbe_adde);
    assert_eq!(h.cfg32(0x100), 0);
    assert_eq!(h.cfg32(0xffc), 0);
    // Reads across the end of ECAM's window.
    assert_eq!(h.cfg(0xffe, 4), 0xffff_0000);
    assert_eq!(h.cfg(u16::MAX, 2), 0xffff);
    // A dword read spanning header and capability bytes.
    assert_eq!(
        h.cfg32(0x3e),
        0x8011_0000,
        "min grant/max latency zero, MSI-X, next PCIe"
    );
}

#[test]
fn msix_enable_and_disable_call_set_irqs() {
    let mut h = Harness::nvme();
    // Linux: enable with the function masked, program, unmask.
    h.msix_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    assert!(h.dev.msix_enabled());
    let events = h.take();
    let [Event::SetIrqs { start: 0, fds }] = events.as_slice() else {
        panic!("expected one SET_IRQS of the whole table: {events:?}");
    };
    assert_eq!(fds.len(), usize::from(NVME_VECTORS));
    let parking = fds.clone();
    assert!(
        parking.iter().all(|fd| *fd >= 0 && !h.irq_raw.contains(fd)),
        "all parked"
    );
    let mut sorted = parking.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), parking.len(), "one parking eventfd per vector");
    assert_eq!(h.cfg16(MSIX_CAP as u16 + 2), 0xc000 | (NVME_VECTORS - 1));

    for v in [0u16, 1, 64] {
        h.program(v, msg(v));
        h.mask(v, false);
    }
    assert!(h.take().is_empty(), "function masked: nothing live");
    h.msix_control(MSIX_CONTROL_ENABLE);
    let events = h.take();
    for v in [0u16, 1, 64] {
        let configure = events
            .iter()
            .position(|e| *e == Event::Configure(v, msg(v), true))
            .unwrap();
        let set = events
            .iter()
            .position(|e| {
                *e == Event::SetIrqs {
                    start: u32::from(v),
                    fds: vec![h.irq_raw[usize::from(v)]],
                }
            })
            .unwrap();
        assert!(
            configure < set,
            "vector {v}: route before VFIO signals the irqfd: {events:?}"
        );
        assert!(h.dev.msix_vector_direct(v));
    }
    assert_eq!(events.len(), 6, "{events:?}");
    let triggers = h.triggers().unwrap();
    assert_eq!(triggers[1], h.irq_raw[1]);
    assert_eq!(triggers[2], parking[2]);

    // A live vector fires straight into its irqfd; no VMM involvement.
    assert!(h.fire(1));
    assert_eq!(h.irqfds[1].read().unwrap(), 1);
    assert!(h.take().is_empty());

    // Disable: VFIO first, then the routes.
    h.msix_control(0);
    let events = h.take();
    assert_eq!(events[0], Event::DisableIrqs, "{events:?}");
    assert_eq!(
        events[1..],
        [
            Event::Configure(0, msg(0), false),
            Event::Configure(1, msg(1), false),
            Event::Configure(64, msg(64), false)
        ]
    );
    assert_eq!(h.triggers(), None);
    assert!(!h.dev.msix_vector_direct(1));
    // Re-enable without the function mask: live vectors are routed again.
    h.msix_control(MSIX_CONTROL_ENABLE);
    let events = h.take();
    assert!(matches!(&events[0], Event::SetIrqs { start: 0, fds } if *fds == parking));
    assert_eq!(events.len(), 1 + 3 * 2, "{events:?}");
    assert!(h.refused().is_empty());
}

#[test]
fn masking_parks_and_unmasking_delivers_pending() {
    let mut h = Harness::nvme();
    h.msix_control(MSIX_CONTROL_ENABLE);
    h.program(3, msg(3));
    h.mask(3, false);
    assert!(h.dev.msix_vector_direct(3));
    h.take();

    // Mask: VFIO is pointed at the parking eventfd before the route goes.
    h.mask(3, true);
    let events = h.take();
    assert!(matches!(&events[0], Event::SetIrqs { start: 3, fds } if fds.len() == 1 && fds[0] != h.irq_raw[3]));
    assert_eq!(events[1], Event::Configure(3, msg(3), false));
    assert_eq!(events.len(), 2);
    // The device fires while masked: nothing reaches the guest...
    assert!(h.fire(3));
    assert!(h.irqfds[3].read().is_err());
    assert!(h.take().is_empty());
    // ...but the PBA shows it pending.
    let mut pba = [0u8; 8];
    h.dev.read_bar(0, 0x3000, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 1 << 3);
    // Unmask: routed, pointed at the irqfd, the pending one delivered.
    h.mask(3, false);
    let events = h.take();
    assert_eq!(events[0], Event::Configure(3, msg(3), true));
    assert!(matches!(&events[1], Event::SetIrqs { start: 3, fds } if *fds == [h.irq_raw[3]]));
    assert_eq!(events[2], Event::Trigger(3));
    assert_eq!(events.len(), 3);
    h.dev.read_bar(0, 0x3000, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0);

    // Without a PBA read in between, the parked interrupt is still
    // delivered on unmask (drained after the switch).
    h.mask(3, true);
    assert!(h.fire(3));
    h.take();
    h.mask(3, false);
    assert_eq!(h.take().last(), Some(&Event::Trigger(3)));
    // Nothing pending: unmasking delivers nothing.
    h.mask(3, true);
    h.mask(3, false);
    assert!(!h.take().contains(&Event::Trigger(3)));

    // Function mask parks every live vector, unmasking delivers.
    h.msix_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    assert!(!h.dev.msix_vector_direct(3));
    assert!(h.fire(3));
    h.take();
    h.msix_control(MSIX_CONTROL_ENABLE);
    assert_eq!(h.take().last(), Some(&Event::Trigger(3)));
    assert!(h.refused().is_empty());
}

#[test]
fn failing_set_irqs_loses_no_route() {
    let mut h = Harness::nvme();
    h.msix_control(MSIX_CONTROL_ENABLE);
    h.program(2, msg(2));
    h.mask(2, false);
    h.take();
    // VFIO cannot park the vector: its route stays (delivered while
    // masked rather than lost).
    lock(&h.fake).fail_set_irqs = true;
    h.mask(2, true);
    assert!(h.take().is_empty());
    assert!(h.dev.msix_vector_direct(2));
    assert!(h.fire(2));
    assert_eq!(h.irqfds[2].read().unwrap(), 1);
    lock(&h.fake).fail_set_irqs = false;
    h.mask(2, false);
    assert_eq!(h.take(), [Event::Configure(2, msg(2), true)]);
    // Enabling fails: the guest sees MSI-X enabled, the vectors get
    // routes, VFIO signals nothing.
    h.msix_control(0);
    h.take();
    lock(&h.fake).fail_set_irqs = true;
    h.msix_control(MSIX_CONTROL_ENABLE);
    assert!(h.dev.msix_enabled());
    assert_eq!(h.take(), [Event::Configure(2, msg(2), true)]);
    assert_eq!(h.triggers(), None);
    assert!(!h.dev.msix_vector_direct(2));
    // Disabling then needs no VFIO call.
    h.msix_control(0);
    assert_eq!(h.take(), [Event::Configure(2, msg(2), false)]);
    assert!(h.refused().is_empty());
}

#[test]
fn table_writes_configure_the_sink() {
    let mut h = Harness::nvme();
    h.msix_control(MSIX_CONTROL_ENABLE);
    h.take();
    // 4-byte writes of address, upper address, data, then unmask.
    let base = 0x2000 + 5 * 16;
    h.dev.write_bar(0, base, &0xfee0_2000u32.to_le_bytes());
    h.dev.write_bar(0, base + 4, &0u32.to_le_bytes());
    h.dev.write_bar(0, base + 8, &0x41u32.to_le_bytes());
    assert!(h.take().is_empty());
    h.dev.write_bar(0, base + 12, &0u32.to_le_bytes());
    let m = MsiMessage {
        addr: 0xfee0_2000,
        data: 0x41,
    };
    assert_eq!(h.take()[0], Event::Configure(5, m, true));
    // Retargeting a live vector re-routes it; VFIO stays on the irqfd.
    h.dev.write_bar(0, base + 8, &0x42u32.to_le_bytes());
    assert_eq!(h.take(), [Event::Configure(5, MsiMessage { data: 0x42, ..m }, true)]);
    // The table reads back the guest's values, not the device's table.
    let mut entry = [0u8; 16];
    h.dev.read_bar(0, base, &mut entry);
    assert_eq!(&entry[..4], &0xfee0_2000u32.to_le_bytes());
    assert_eq!(&entry[8..], &[0x42, 0, 0, 0, 0, 0, 0, 0]);
    let mut other = [0u8; 16];
    h.dev.read_bar(0, 0x2000, &mut other);
    assert_eq!(
        other,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        "reset state: masked"
    );
}

#[test]
fn bar_accesses_reach_the_region_except_msix() {
    let mut h = Harness::nvme();
    // Registers: one access each, at the same offset and width.
    h.dev.write_bar(0, 0x14, &0x0046_0001u32.to_le_bytes());
    h.dev.write_bar(0, 0x1008, &7u32.to_le_bytes());
    let mut d = [0u8; 8];
    h.dev.read_bar(0, 0x0, &mut d);
    assert_eq!(
        h.take(),
        [
            Event::BarWrite {
                bar: 0,
                offset: 0x14,
                data: 0x0046_0001u32.to_le_bytes().to_vec()
            },
            Event::BarWrite {
                bar: 0,
                offset: 0x1008,
                data: vec![7, 0, 0, 0]
            },
            Event::BarRead {
                bar: 0,
                offset: 0,
                len: 8
            },
        ]
    );
    assert_eq!(d, [0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(&lock(&h.fake).bars[0][0x14..0x18], &0x0046_0001u32.to_le_bytes());
    // The table and the PBA never reach the device.
    h.dev.write_bar(0, 0x2000, &[0xff; 16]);
    h.dev.write_bar(0, 0x2400, &[0xff; 16]);
    h.dev.write_bar(0, 0x3000, &[0xff; 8]);
    h.dev.read_bar(0, 0x2408, &mut d);
    h.dev.read_bar(0, 0x3008, &mut d);
    assert!(h.take().is_empty());
    assert!(lock(&h.fake).bars[0][0x2000..0x2410].iter().all(|&b| b == 0xee));
    // Right after the table and the PBA: the device again.
    h.dev.read_bar(0, 0x2410, &mut d[..4]);
    h.dev.read_bar(0, 0x3010, &mut d[..4]);
    assert_eq!(
        h.take(),
        [
            Event::BarRead {
                bar: 0,
                offset: 0x2410,
                len: 4
            },
            Event::BarRead {
                bar: 0,
                offset: 0x3010,
                len: 4
            }
        ]
    );
    // Accesses straddling the table's ends are split.
    let mut s = [0u8; 8];
    h.dev.read_bar(0, 0x1ffc, &mut s);
    h.dev.read_bar(0, 0x240c, &mut d);
    assert_eq!(
        h.take(),
        [
            Event::BarRead {
                bar: 0,
                offset: 0x1ffc,
                len: 4
            },
            Event::BarRead {
                bar: 0,
                offset: 0x2410,
                len: 4
            }
        ]
    );
    assert_eq!(
        s,
        [0xfc, 0xfd, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff],
        "device, then entry 0 as written"
    );
    assert_eq!(
        d,
        [1, 0, 0, 0, 0x10, 0x11, 0x12, 0x13],
        "entry 64's control, then the device"
    );
    // Past the BAR: all-ones, nothing reaches the device; other BARs
    // do not exist.
    h.dev.read_bar(0, BAR0_SIZE - 2, &mut s[..4]);
    assert_eq!(&s[2..4], [0xff, 0xff]);
    h.dev.read_bar(0, BAR0_SIZE, &mut s);
    h.dev.read_bar(1, 0, &mut s);
    h.dev.write_bar(2, 0, &s);
    assert_eq!(s, [0xff; 8]);
    assert_eq!(
        h.take(),
        [Event::BarRead {
            bar: 0,
            offset: BAR0_SIZE - 2,
            len: 2
        }]
    );
    assert!(h.refused().is_empty());
}

#[test]
fn on_the_root_bus() {
    let h = Harness::nvme();
    let Harness {
        dev, fake, timeline, ..
    } = h;
    let dev = Arc::new(Mutex::new(dev));
    let mut root = PciRoot::new();
    let bdf = root.add_device(dev.clone()).unwrap();
    let mut alloc = BarAllocator::new(0xc000_0000..0xc100_0000, 0x40_0000_0000..0x41_0000_0000).unwrap();
    let placed = root.assign_bars(&mut alloc).unwrap();
    assert_eq!(placed.len(), 1);
    let base = placed[0].1.addr;
    assert_eq!(base, 0x40_0000_0000);
    let mut id = [0u8; 4];
    root.ecam_read(bdf.ecam_offset(), &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x0010_1b36);
    timeline.lock().unwrap().clear();
    // An NVMe doorbell write through the bus.
    assert!(root.mmio_write(base + 0x1000, &1u32.to_le_bytes()));
    assert_eq!(
        timeline.lock().unwrap().as_slice(),
        [Event::BarWrite {
            bar: 0,
            offset: 0x1000,
            data: vec![1, 0, 0, 0]
        }]
    );
    assert!(lock(&fake).refused.is_empty());
    // The mmap hook: everything but the MSI-X pages.
    let d = dev.lock().unwrap();
    assert_eq!(d.mappable_ranges(0, 0x1000), vec![(0..0x2000)]);
    assert_eq!(d.mappable_ranges(0, 0x10000), []);
    assert_eq!(d.mappable_ranges(1, 0x1000), []);
    assert_eq!(d.bar_region(0).unwrap().size, BAR0_SIZE);
    // ...and mapped: one range, the MSI-X pages left to trap.
    let mapped = d.map_bars(0x1000);
    assert_eq!(
        mapped
            .iter()
            .map(|m| (m.bar, m.offset, m.mapping.len()))
            .collect::<Vec<_>>(),
        [(0, 0, 0x2000)]
    );
    let host = mapped[0].mapping.host_address() as *mut u32;
    // SAFETY: the first word of the live 8 KiB mapping.
    unsafe {
        host.add(0x400).write_volatile(7);
        assert_eq!(host.add(0x400).read_volatile(), 7);
    }
}

#[test]
fn reset_and_drop() {
    let mut h = Harness::nvme();
    h.set_cfg(COMMAND, &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes());
    h.set_cfg(0x10, &0xc000_0000u32.to_le_bytes());
    h.msix_control(MSIX_CONTROL_ENABLE);
    h.program(0, msg(0));
    h.mask(0, false);
    h.take();
    h.dev.reset().unwrap();
    let events = h.take();
    assert_eq!(
        events,
        [
            Event::DisableIrqs,
            Event::Configure(0, msg(0), false),
            Event::Reset,
            Event::ConfigWrite {
                offset: 4,
                data: vec![0x02, 0]
            }
        ]
    );
    assert!(!h.dev.msix_enabled());
    assert_eq!(h.cfg16(COMMAND), 0);
    assert_eq!(h.dev.bars()[0].addr, 0xc000_0000, "placement kept");
    let mut entry = [0u8; 16];
    h.dev.read_bar(0, 0x2000, &mut entry);
    assert_eq!(entry[12], 1, "vectors masked again");
    // A failing reset is reported.
    lock(&h.fake).fail_reset = true;
    assert!(matches!(h.dev.reset(), Err(VfioPciError::Reset { .. })));
    lock(&h.fake).fail_reset = false;

    // Drop: MSI-X off, bus mastering off.
    h.set_cfg(COMMAND, &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes());
    h.msix_control(MSIX_CONTROL_ENABLE);
    h.take();
    let Harness {
        dev, timeline, fake, ..
    } = h;
    drop(dev);
    let events = std::mem::take(&mut *timeline.lock().unwrap());
    assert_eq!(
        events,
        [
            Event::DisableIrqs,
            Event::ConfigWrite {
                offset: 4,
                data: vec![0x02, 0]
            }
        ]
    );
    assert!(lock(&fake).msix.is_none());
    assert!(lock(&fake).refused.is_empty());
}

#[test]
fn construction_errors() {
    let vectors = usize::from(NVME_VECTORS);
    // No configuration region.
    let err = Harness::with(|s| s.regions.truncate(7), vectors).err().unwrap();
    assert!(matches!(err, VfioPciError::RegionInfo { index: 7, .. }), "{err}");
    let err = Harness::with(|s| s.regions[7].size = 0, vectors).err().unwrap();
    assert!(matches!(err, VfioPciError::ConfigRegionTooSmall { size: 0 }), "{err}");
    // Unreadable configuration space.
    let err = Harness::with(|s| s.fail_config_from = Some(0), vectors).err().unwrap();
    assert!(matches!(err, VfioPciError::ConfigRead { offset: 0, .. }), "{err}");
    // No function.
    let err = Harness::with(|s| s.config[..2].fill(0xff), vectors).err().unwrap();
    assert!(matches!(err, VfioPciError::DeviceAbsent { vendor_id: 0xffff }), "{err}");
    // A bridge.
    let err = Harness::with(|s| s.config[0x0e] = 0x01, vectors).err().unwrap();
    assert!(
        matches!(err, VfioPciError::UnsupportedHeaderType { header_type: 1 }),
        "{err}"
    );
    // BAR size VFIO reports that a BAR cannot have.
    let err = Harness::with(|s| s.regions[0].size = 0x3000, vectors).err().unwrap();
    assert!(
        matches!(
            err,
            VfioPciError::BarSize {
                index: 0,
                size: 0x3000,
                ..
            }
        ),
        "{err}"
    );
    // Reserved memory type.
    let err = Harness::with(|s| s.config[0x10] = 0x06, vectors).err().unwrap();
    assert!(matches!(err, VfioPciError::InvalidBarType { index: 0, .. }), "{err}");
    // MSI-X table outside its BAR, or in a BAR that is not there.
    let err = Harness::with(|s| s.config[MSIX_CAP + 5] = 0x3f, vectors).err().unwrap();
    assert!(
        matches!(
            err,
            VfioPciError::MsixOutsideBar {
                what: "table",
                bar: 0,
                offset: 0x3f00,
                ..
            }
        ),
        "{err}"
    );
    let err = Harness::with(|s| s.config[MSIX_CAP + 8] = 0x02, vectors).err().unwrap();
    assert!(matches!(err, VfioPciError::MsixBar { what: "PBA", bir: 2 }), "{err}");
    // VFIO offers fewer MSI-X interrupts than the table has.
    let err = Harness::with(|s| s.msix_irqs.count = 1, vectors).err().unwrap();
    assert!(
        matches!(
            err,
            VfioPciError::MsixIrqs {
                vectors: 65,
                count: 1,
                ..
            }
        ),
        "{err}"
    );
    // Not one irqfd per vector.
    let err = Harness::with(|_| {}, 64).err().unwrap();
    assert!(
        matches!(
            err,
            VfioPciError::VectorCountMismatch {
                vectors: 65,
                irqfds: 64
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("65") && err.to_string().contains("64"));
    // Without MSI-X, no irqfds.
    let no_msix = |s: &mut FakeState| s.config[0x34] = PCIE_CAP as u8;
    let err = Harness::with(no_msix, 1).err().unwrap();
    assert!(
        matches!(err, VfioPciError::VectorCountMismatch { vectors: 0, irqfds: 1 }),
        "{err}"
    );
    let mut h = Harness::with(no_msix, 0).unwrap();
    assert_eq!(h.dev.msix_vectors(), 0);
    assert_eq!(h.cfg8(0x34), PCIE_CAP as u8);
    h.set_cfg(MSIX_CAP as u16 + 2, &0xc000u16.to_le_bytes());
    assert!(!h.dev.msix_enabled());
}

#[test]
fn io_bars_are_absent() {
    let mut h = Harness::with(
        |s| {
            // BAR2: a 256-byte I/O BAR.
            s.config[0x18..0x1c].copy_from_slice(&0xc001u32.to_le_bytes());
            s.regions[2].size = 0x100;
            s.regions[2].flags = 3;
            s.bars.push(vec![]);
            s.bars.push(vec![0; 0x100]);
        },
        usize::from(NVME_VECTORS),
    )
    .unwrap();
    assert_eq!(h.dev.info().hidden_io_bars, [(2, 0x100)]);
    assert_eq!(h.dev.bars().len(), 1);
    h.set_cfg(0x18, &[0xff; 4]);
    assert_eq!(h.cfg32(0x18), 0, "sizing finds nothing");
    let mut d = [0u8; 4];
    h.dev.read_bar(2, 0, &mut d);
    assert_eq!(d, [0xff; 4]);
    assert!(h.dev.info().to_string().contains("BAR2 0x100 bytes I/O (hidden)"));
}

#[test]
fn failing_device_accesses_read_all_ones() {
    let mut h = Harness::nvme();
    lock(&h.fake).fail_config_from = Some(0x40);
    // Header bytes are the VMM's; the status and capabilities need the
    // device.
    assert_eq!(h.cfg32(0), 0x0010_1b36);
    assert_eq!(h.cfg16(PM_CAP as u16 + 4), 0xffff);
    assert_eq!(h.cfg16(MSIX_CAP as u16), 0x8011, "fixed bytes need no device");
    h.set_cfg((PM_CAP + 4) as u16, &3u16.to_le_bytes());
    assert!(h.take().is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    ReadConfig(u16, usize),
    WriteConfig(u16, Vec<u8>),
    ReadBar(u8, u64, usize),
    WriteBar(u8, u64, Vec<u8>),
    Fire(u16),
    Reset,
    /// A well-formed MSI-X message control write.
    Control(u16),
    /// A well-formed write of dword `.1` of table entry `.0`.
    Entry(u16, u8, u32),
}

fn config_offset() -> impl Strategy<Value = u16> {
    prop_oneof![any::<u16>(), 0u16..0x110, (0x40u16..0x50), (0x0u16..0x40)]
}

fn bar_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0u64..0x4010,
        0x1ff0u64..0x2420,
        0x2ff0u64..0x3020,
        u64::MAX - 16..=u64::MAX
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (config_offset(), 0usize..=16).prop_map(|(o, n)| Op::ReadConfig(o, n)),
        2 => (config_offset(), prop::collection::vec(any::<u8>(), 0..=16)).prop_map(|(o, d)| Op::WriteConfig(o, d)),
        2 => (0u8..8, bar_offset(), 0usize..=16).prop_map(|(b, o, n)| Op::ReadBar(b, o, n)),
        2 => (0u8..8, bar_offset(), prop::collection::vec(any::<u8>(), 0..=16)).prop_map(|(b, o, d)| Op::WriteBar(b, o, d)),
        2 => prop_oneof![0u16..4, 0u16..80].prop_map(Op::Fire),
        1 => Just(Op::Reset),
        2 => prop_oneof![Just(0u16), Just(0x8000), Just(0xc000), Just(0x4000)].prop_map(Op::Control),
        4 => (
            prop_oneof![0u16..4, 0u16..NVME_VECTORS],
            prop_oneof![Just(3u8), 0u8..4],
            prop_oneof![Just(0u32), Just(1), any::<u32>()]
        )
            .prop_map(|(v, d, x)| Op::Entry(v, d, x)),
    ]
}

/// Configuration registers a guest write may reach, as 16-bit writes.
const FORWARDED: [u64; 6] = [
    0x04,
    0x06,
    PM_CAP as u64 + 4,
    PCIE_CAP as u64 + 8,
    PCIE_CAP as u64 + 0x0a,
    PCIE_CAP as u64 + 0x28,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn hostile_accesses_never_panic(ops in prop::collection::vec(op(), 1..64)) {
        let mut h = Harness::nvme();
        for op in ops {
            match op {
                Op::ReadConfig(o, n) => {
                    let mut d = vec![0u8; n];
                    h.dev.read_config(o, &mut d);
                }
                Op::WriteConfig(o, d) => h.dev.write_config(o, &d),
                Op::ReadBar(b, o, n) => {
                    let mut d = vec![0u8; n];
                    h.dev.read_bar(b, o, &mut d);
                }
                Op::WriteBar(b, o, d) => h.dev.write_bar(b, o, &d),
                Op::Fire(v) => {
                    h.fire(v);
                }
                Op::Reset => h.dev.reset().unwrap(),
                Op::Control(c) => h.msix_control(c),
                Op::Entry(v, d, x) => {
                    h.dev.write_bar(0, 0x2000 + u64::from(v) * 16 + u64::from(d) * 4, &x.to_le_bytes())
                }
            }
            prop_assert_eq!(h.cfg32(0), 0x0010_1b36);
        }
        // The device never saw an access the kernel would refuse (outside
        // a region, SET_IRQS against its state), and only forwardable
        // registers were written.
        prop_assert!(h.refused().is_empty(), "{:?}", h.refused());
        // Ordering: VFIO signals a vector's irqfd only while its route is
        // up, and a route goes only after VFIO stopped signalling it.
        let n = usize::from(NVME_VECTORS);
        let (mut routed, mut direct) = (vec![false; n], vec![false; n]);
        let events = h.take();
        for event in &events {
            match event {
                Event::Configure(v, _, up) => {
                    let v = usize::from(*v);
                    prop_assert!(*up || !direct[v], "route of {} torn down while VFIO signals it", v);
                    routed[v] = *up;
                }
                Event::SetIrqs { start, fds } => {
                    for (i, fd) in fds.iter().enumerate() {
                        let v = *start as usize + i;
                        direct[v] = *fd == h.irq_raw[v];
                        prop_assert!(!direct[v] || routed[v], "vector {} signalled without a route", v);
                    }
                }
                Event::DisableIrqs | Event::Reset => direct.fill(false),
                _ => {}
            }
        }
        for event in events {
            if let Event::ConfigWrite { offset, data } = &event {
                let offset = *offset;
                prop_assert!(FORWARDED.contains(&offset) && data.len() == 2, "{offset:#x} {data:?}");
            }
            if let Event::BarWrite { offset, data, .. } = &event {
                let offset = *offset;
                let end = offset + data.len() as u64;
                prop_assert!(end <= 0x2000 || (offset >= 0x2410 && end <= 0x3000) || offset >= 0x3010);
            }
        }
        // The MSI-X state VFIO has matches the guest's.
        let enabled = h.dev.msix_enabled();
        prop_assert_eq!(h.triggers().is_some(), enabled);
        if let Some(triggers) = h.triggers() {
            for v in 0..NVME_VECTORS {
                let direct = triggers[usize::from(v)] == h.irq_raw[usize::from(v)];
                prop_assert_eq!(direct, h.dev.msix_vector_direct(v), "vector {}", v);
            }
        }
    }
}
