//! [`Rig`]: a machine and the guest that drives it, for tests.

use memvisor_guest::{Answer, Guest};
use memvisor_machine::{Machine, MachineConfig};
use memvisor_virtio_iommu::request::{Attach, Detach, Map, Unmap};
use memvisor_virtio_iommu::{Request as IommuRequest, Status};
use memvisor_virtio_mem::{BlockRange, Request as MemRequest};

/// A [`Machine`] and a [`Guest`] whose driver area is at a given address
/// (inside boot RAM). Every request helper panics if the device did not
/// answer: use [`Guest`] directly to test a device that does not.
#[derive(Debug)]
pub struct Rig {
    /// The machine.
    pub machine: Machine,
    /// The guest driving it.
    pub guest: Guest,
}

impl Rig {
    /// Builds the machine `config` describes (attaching its assigned
    /// devices) with a guest whose driver area starts at `driver_area`.
    pub fn new(config: &MachineConfig, driver_area: u64) -> Self {
        Self {
            machine: Machine::new(config).unwrap_or_else(|e| panic!("building the machine: {e}")),
            guest: Guest::new(driver_area),
        }
    }

    /// Sends `request` to virtio-mem device 0; returns the response type.
    pub fn vmem(&mut self, request: MemRequest) -> u16 {
        match self.guest.vmem_request(&mut self.machine, 0, request) {
            Ok(Answer::Answered(a)) => a.resp_type,
            other => panic!("virtio-mem did not answer {request:?}: {other:?}"),
        }
    }

    /// The address of block `block` of virtio-mem device 0.
    pub fn block_addr(&self, block: u64) -> u64 {
        let region = &self.machine.vmems()[0].region;
        region.addr() + block * region.block_size()
    }

    /// PLUG of `n` blocks from block `block`; returns the response type.
    pub fn plug(&mut self, block: u64, n: u16) -> u16 {
        let addr = self.block_addr(block);
        self.vmem(MemRequest::Plug(BlockRange { addr, nb_blocks: n }))
    }

    /// UNPLUG of `n` blocks from block `block`; returns the response type.
    pub fn unplug(&mut self, block: u64, n: u16) -> u16 {
        let addr = self.block_addr(block);
        self.vmem(MemRequest::Unplug(BlockRange { addr, nb_blocks: n }))
    }

    /// UNPLUG_ALL; returns the response type.
    pub fn unplug_all(&mut self) -> u16 {
        self.vmem(MemRequest::UnplugAll)
    }

    /// Sends `request` to the virtio-iommu; returns the status.
    pub fn iommu(&mut self, request: IommuRequest) -> Status {
        match self.guest.iommu_request(&mut self.machine, request) {
            Ok(Answer::Answered(status)) => status,
            other => panic!("virtio-iommu did not answer {request:?}: {other:?}"),
        }
    }

    /// ATTACH `endpoint` to `domain`.
    pub fn attach(&mut self, domain: u32, endpoint: u32) -> Status {
        self.iommu(IommuRequest::Attach(Attach {
            domain,
            endpoint,
            flags: 0,
            reserved: [0; 4],
        }))
    }

    /// DETACH `endpoint` from `domain`.
    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Status {
        self.iommu(IommuRequest::Detach(Detach { domain, endpoint }))
    }

    /// MAP `[iova, iova + len)` of `domain` onto `phys` with `flags`.
    pub fn map(&mut self, domain: u32, iova: u64, phys: u64, len: u64, flags: u32) -> Status {
        self.iommu(IommuRequest::Map(Map {
            domain,
            virt_start: iova,
            virt_end: iova + (len - 1),
            phys_start: phys,
            flags,
        }))
    }

    /// UNMAP `[iova, iova + len)` of `domain`.
    pub fn unmap(&mut self, domain: u32, iova: u64, len: u64) -> Status {
        self.iommu(IommuRequest::Unmap(Unmap {
            domain,
            virt_start: iova,
            virt_end: iova + (len - 1),
        }))
    }
}
