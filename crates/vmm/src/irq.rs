//! Interrupt delivery through the in-kernel irqchip: the GSI routing
//! table (the legacy PIC and IOAPIC lines plus one MSI route per MSI-X
//! vector), irqfds, and ioeventfds for the PCI devices' notifications.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`GsiRouter`] keeps
//! it and writes all of it on every change. The legacy part follows QEMU's
//! PC routing: GSI 0..16 also reach the 8259s, and ISA IRQ 0 (the PIT)
//! arrives at IOAPIC pin 2, as the MADT's interrupt source override says.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch};
use memvisor_pci::{IoEventSink, MsiMessage, MsiSink};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::lock;
use crate::vm::VmHandle;
use crate::x86::layout::{IOAPIC_PINS, MSI_GSI_START};

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.addr as u32;
    e.u.msi.address_hi = (msg.addr >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// The legacy routes: 8259 pins for GSI 0..16 (but 2, the cascade) and
/// IOAPIC pins for all 24 GSIs, GSI 0 on pin 2.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..16 {
        if gsi == 2 {
            continue;
        }
        let (chip, pin) = if gsi < 8 {
            (KVM_IRQCHIP_PIC_MASTER, gsi)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
        };
        routes.push(irqchip_route(gsi, chip, pin));
    }
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            0 => routes.push(irqchip_route(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    routes
}

struct Routes {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

/// The VM's GSI routing table; see the [module documentation](self).
pub struct GsiRouter {
    vm: Arc<VmHandle>,
    routes: Mutex<Routes>,
}

impl std::fmt::Debug for GsiRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsiRouter")
            .field("msi_routes", &lock(&self.routes).msi.len())
            .finish()
    }
}

impl GsiRouter {
    /// A router with the legacy routes installed.
    pub(crate) fn new(vm: Arc<VmHandle>) -> io::Result<Arc<Self>> {
        let router = Arc::new(Self {
            vm,
            routes: Mutex::new(Routes {
                msi: BTreeMap::new(),
                next_gsi: MSI_GSI_START,
            }),
        });
        router.commit(&lock(&router.routes))?;
        Ok(router)
    }

    fn commit(&self, routes: &Routes) -> io::Result<()> {
        let mut entries = legacy_routes();
        entries.extend(routes.msi.iter().map(|(&gsi, &msg)| msi_route(gsi, msg)));
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.vm.fd.set_gsi_routing(&table).map_err(io::Error::from)
    }

    /// Allocates `count` GSIs for MSI routes (not routed yet).
    pub fn allocate(&self, count: u32) -> Vec<u32> {
        let mut routes = lock(&self.routes);
        let first = routes.next_gsi;
        routes.next_gsi += count;
        (first..first + count).collect()
    }

    /// Routes `gsi` to the MSI `msg`, or removes its route (`None`).
    pub fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut routes = lock(&self.routes);
        let changed = match msg {
            Some(msg) => routes.msi.insert(gsi, msg) != Some(msg),
            None => routes.msi.remove(&gsi).is_some(),
        };
        if changed { self.commit(&routes) } else { Ok(()) }
    }

    /// Registers `fd` as the irqfd of `gsi`: a write to it raises the GSI.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.fd.register_irqfd(fd, gsi).map_err(io::Error::from)
    }
}

/// The MSI-X vectors of one PCI device: a GSI and an irqfd per vector.
pub struct KvmMsiVectors {
    router: Arc<GsiRouter>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
}

impl std::fmt::Debug for KvmMsiVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmMsiVectors").field("gsis", &self.gsis).finish()
    }
}

impl KvmMsiVectors {
    /// `count` vectors, their irqfds registered, none routed yet.
    pub fn new(router: Arc<GsiRouter>, count: u16) -> io::Result<Self> {
        let gsis = router.allocate(u32::from(count));
        let irqfds = gsis
            .iter()
            .map(|&gsi| {
                let fd = EventFd::new(EFD_NONBLOCK)?;
                router.register_irqfd(&fd, gsi)?;
                Ok(fd)
            })
            .collect::<io::Result<_>>()?;
        Ok(Self { router, gsis, irqfds })
    }

    /// Copies of the irqfds, one per vector: a device that signals its
    /// vectors itself (VFIO) writes them directly.
    pub fn irqfds(&self) -> io::Result<Vec<EventFd>> {
        self.irqfds.iter().map(EventFd::try_clone).collect()
    }

    fn gsi(&self, vector: u16) -> io::Result<u32> {
        self.gsis
            .get(usize::from(vector))
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no MSI-X vector {vector}")))
    }
}

impl MsiSink for KvmMsiVectors {
    fn configure(&self, vector: u16, msg: MsiMessage, enabled: bool) -> io::Result<()> {
        self.router.set_msi(self.gsi(vector)?, enabled.then_some(msg))
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.gsi(vector)?;
        self.irqfds[usize::from(vector)].write(1)
    }
}

/// KVM ioeventfds on MMIO addresses (any access length, no data match).
pub struct KvmIoEvents {
    vm: Arc<VmHandle>,
}

impl KvmIoEvents {
    /// Ioeventfds of `vm`.
    pub(crate) fn new(vm: Arc<VmHandle>) -> Self {
        Self { vm }
    }
}

impl IoEventSink for KvmIoEvents {
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()> {
        self.vm
            .fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }

    fn unregister(&self, addr: u64, fd: &EventFd) -> io::Result<()> {
        self.vm
            .fd
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_follow_the_pc() {
        let r = legacy_routes();
        // 15 PIC routes (no cascade) + 23 IOAPIC routes (no GSI 2).
        assert_eq!(r.len(), 15 + 23);
        let ioapic = |gsi| {
            r.iter()
                // SAFETY: every entry built by legacy_routes is of the irqchip type.
                .find(|e| e.gsi == gsi && unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_IOAPIC)
                // SAFETY: as above.
                .map(|e| unsafe { e.u.irqchip.pin })
        };
        assert_eq!(ioapic(0), Some(2), "the PIT arrives at pin 2");
        assert_eq!(ioapic(4), Some(4), "COM1");
        assert_eq!(ioapic(2), None);
        assert_eq!(ioapic(23), Some(23));
    }

    #[test]
    fn msi_route_splits_the_address() {
        let e = msi_route(
            30,
            MsiMessage {
                addr: 0x1_fee0_0000,
                data: 0x4041,
            },
        );
        assert_eq!((e.gsi, e.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: built as an MSI entry just above.
        let msi = unsafe { e.u.msi };
        assert_eq!((msi.address_lo, msi.address_hi, msi.data), (0xfee0_0000, 1, 0x4041));
    }
}
