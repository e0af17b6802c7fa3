//! A guest's drivers for a [`Machine`]'s devices: what a booting Linux does
//! with its virtio-mem and virtio-iommu devices, through real split
//! virtqueues in guest RAM.
//!
//! A [`Guest`] owns a *driver area* of guest RAM ([`DRIVER_AREA_SIZE`]
//! bytes at an address the caller chooses, inside boot RAM) and lays each
//! device's rings and buffers out there. A device is activated — features
//! accepted, fresh queues laid out — before its first request, and again
//! after a reset or a restore, as a (re)booting guest's driver does. A
//! device that does not answer (it entered NEEDS_RESET, or wrote a
//! response the driver cannot read) is reset, as a driver does.

use std::sync::Arc;

use memvisor_machine::Machine;
use memvisor_virtio::{ActivateError, EventFdInterrupt, VirtioDevice};
use memvisor_virtio_iommu::{Request as IommuRequest, Status, wire as iommu_wire};
use memvisor_virtio_mem::wire::{CONFIG_SIZE, RESPONSE_SIZE, VirtioMemConfig, VirtioMemResp};
use memvisor_virtio_mem::{BlockState, Request as MemRequest};
use vm_memory::GuestAddress;

use crate::queue::{Buf, DriverError, DriverQueue};

/// Bytes of guest RAM a [`Guest`] lays its queues out in.
pub const DRIVER_AREA_SIZE: u64 = 1 << 20;

/// Where each queue lives inside the driver area.
const VMEM_QUEUES_AT: u64 = 0;
const VMEM_QUEUE_STRIDE: u64 = 64 << 10;
const IOMMU_REQUESTS_AT: u64 = 256 << 10;
const IOMMU_EVENTS_AT: u64 = 512 << 10;
/// Buffer space of each queue (one request is in flight at a time).
const QUEUE_DATA: u64 = 16 << 10;
/// Event buffers the driver gives the virtio-iommu (Linux fills the queue).
const IOMMU_EVENT_BUFFERS: usize = 64;

/// Most virtio-mem devices one driver area has room for.
pub const MAX_VMEM_DEVICES: usize = ((IOMMU_REQUESTS_AT - VMEM_QUEUES_AT) / VMEM_QUEUE_STRIDE) as usize;

/// Why the guest could not drive a device.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The machine has no such device.
    #[error("the machine has no {0}")]
    NoDevice(String),
    /// The queues could not be laid out.
    #[error("driver queue: {0}")]
    Queue(#[from] DriverError),
    /// The device refused activation.
    #[error("activation: {0}")]
    Activate(#[from] ActivateError),
    /// An interrupt eventfd could not be created.
    #[error("interrupt eventfd: {0}")]
    Interrupt(std::io::Error),
}

/// What a device answered, as the driver read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<T> {
    /// The device used the buffers and wrote this.
    Answered(T),
    /// The device did not answer; the driver reset it and sets it up again
    /// before the next request.
    NoAnswer,
}

/// A virtio-mem answer as read from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemAnswer {
    /// The `VIRTIO_MEM_RESP_*` value.
    pub resp_type: u16,
    /// The state field (meaningful for an ACKed STATE); `None` if it is
    /// not a `VIRTIO_MEM_STATE_*` value.
    pub state: Option<BlockState>,
}

/// The guest's drivers; see the [module documentation](self).
#[derive(Debug)]
pub struct Guest {
    base: u64,
    vmem: Vec<Option<DriverQueue>>,
    iommu: Option<(DriverQueue, DriverQueue)>,
}

impl Guest {
    /// A guest whose driver area starts at guest-physical `base`.
    pub fn new(base: u64) -> Self {
        Self {
            base,
            vmem: Vec::new(),
            iommu: None,
        }
    }

    /// Guest-physical start of the driver area.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Forgets every queue (after the machine was replaced by a restore, or
    /// reset): each device is activated anew before its next request.
    pub fn forget(&mut self) {
        self.vmem.clear();
        self.iommu = None;
    }

    fn vmem_queue(&mut self, machine: &mut Machine, index: usize) -> Result<&mut DriverQueue, GuestError> {
        if index >= MAX_VMEM_DEVICES {
            return Err(GuestError::NoDevice(format!(
                "virtio-mem device {index} (one driver area holds {MAX_VMEM_DEVICES})"
            )));
        }
        if self.vmem.len() <= index {
            self.vmem.resize_with(index + 1, || None);
        }
        let active = machine
            .vmems()
            .get(index)
            .ok_or_else(|| GuestError::NoDevice(format!("virtio-mem device {index}")))?
            .device
            .is_active();
        let slot = &mut self.vmem[index];
        if slot.is_none() || !active {
            // Only activation needs the memory map: no clone per request.
            let map = machine.memory().clone();
            let dev = &mut machine.vmems_mut()[index].device;
            let at = self.base + VMEM_QUEUES_AT + index as u64 * VMEM_QUEUE_STRIDE;
            let queue = DriverQueue::new(&map, GuestAddress(at), dev.queue_max_sizes()[0], QUEUE_DATA)?;
            let irq = Arc::new(EventFdInterrupt::new(1).map_err(GuestError::Interrupt)?);
            dev.ack_features(dev.avail_features());
            dev.activate(map, irq, vec![queue.device_queue()])?;
            *slot = Some(queue);
        }
        Ok(slot.as_mut().expect("set above"))
    }

    /// Sends `request` to virtio-mem device `index`, activating it first if
    /// needed, and reads the answer back.
    pub fn vmem_request(
        &mut self,
        machine: &mut Machine,
        index: usize,
        request: MemRequest,
    ) -> Result<Answer<MemAnswer>, GuestError> {
        let queue = self.vmem_queue(machine, index)?;
        queue.add(&[Buf::In(&request.to_bytes()), Buf::Out(RESPONSE_SIZE as u32)])?;
        let dev = &mut machine.vmems_mut()[index].device;
        dev.queue_notify(0);
        let used = self.vmem[index].as_mut().expect("activated").pop_used();
        let answer = used
            .filter(|u| u.len as usize == RESPONSE_SIZE)
            .and_then(|u| VirtioMemResp::from_bytes(&u.data));
        Ok(match answer {
            Some(r) => Answer::Answered(MemAnswer {
                resp_type: r.resp_type,
                state: BlockState::from_wire(r.state),
            }),
            None => {
                dev.reset();
                self.vmem[index] = None;
                Answer::NoAnswer
            }
        })
    }

    /// The configuration space of virtio-mem device `index`, read as a
    /// driver reads it (four bytes at a time).
    pub fn vmem_config(&self, machine: &Machine, index: usize) -> Result<VirtioMemConfig, GuestError> {
        let dev = &machine
            .vmems()
            .get(index)
            .ok_or_else(|| GuestError::NoDevice(format!("virtio-mem device {index}")))?
            .device;
        let mut bytes = [0u8; CONFIG_SIZE];
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            dev.read_config(i as u64 * 4, chunk);
        }
        Ok(VirtioMemConfig::from_bytes(&bytes).expect("CONFIG_SIZE bytes"))
    }

    fn iommu_queues(&mut self, machine: &mut Machine) -> Result<&mut (DriverQueue, DriverQueue), GuestError> {
        if machine.iommu().is_none() {
            return Err(GuestError::NoDevice("virtio-iommu".into()));
        }
        if self.iommu.is_none() {
            // Only activation needs the memory map: no clone per request.
            let map = machine.memory().clone();
            let dev = &mut machine.iommu_mut().expect("checked above").device;
            let sizes = dev.queue_max_sizes().to_vec();
            let requests = DriverQueue::new(&map, GuestAddress(self.base + IOMMU_REQUESTS_AT), sizes[0], QUEUE_DATA)?;
            // Linux's virtio-iommu driver polls its request queue (it has
            // no callback), so it asks for no interrupts there.
            requests.suppress_interrupts(true);
            let mut events = DriverQueue::new(&map, GuestAddress(self.base + IOMMU_EVENTS_AT), sizes[1], QUEUE_DATA)?;
            let irq = Arc::new(EventFdInterrupt::new(2).map_err(GuestError::Interrupt)?);
            dev.ack_features(dev.avail_features());
            dev.activate(map, irq, vec![requests.device_queue(), events.device_queue()])?;
            for _ in 0..IOMMU_EVENT_BUFFERS.min(usize::from(sizes[1])) {
                events.add(&[Buf::Out(iommu_wire::FAULT_SIZE as u32)])?;
            }
            dev.queue_notify(iommu_wire::EVENT_QUEUE);
            self.iommu = Some((requests, events));
        }
        Ok(self.iommu.as_mut().expect("set above"))
    }

    /// Sends `request` to the virtio-iommu's request queue, activating it
    /// first if needed, and reads the status back.
    pub fn iommu_request(
        &mut self,
        machine: &mut Machine,
        request: IommuRequest,
    ) -> Result<Answer<Status>, GuestError> {
        let (requests, _) = self.iommu_queues(machine)?;
        let iommu = machine.iommu_mut().expect("checked by iommu_queues");
        let out = match request {
            IommuRequest::Probe(_) => iommu.probe_size + iommu_wire::TAIL_SIZE as u32,
            _ => iommu_wire::TAIL_SIZE as u32,
        };
        requests.add(&[Buf::In(&request.to_bytes()), Buf::Out(out)])?;
        iommu.device.queue_notify(iommu_wire::REQUEST_QUEUE);
        let used = requests.pop_used();
        let status = used
            .filter(|u| u.len as usize >= iommu_wire::TAIL_SIZE && u.data.len() == u.len as usize)
            .and_then(|u| Status::from_u8(u.data[u.data.len() - iommu_wire::TAIL_SIZE]));
        Ok(match status {
            Some(status) => Answer::Answered(status),
            None => {
                iommu.device.reset();
                self.iommu = None;
                Answer::NoAnswer
            }
        })
    }
}
