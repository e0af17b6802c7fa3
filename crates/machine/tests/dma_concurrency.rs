//! Rule 3 under fire: one thread maps and unmaps through the IOMMU's
//! request queue while another unplugs and re-plugs the same blocks through
//! virtio-mem's, and an observer checks, at every observation, that no
//! pinned byte lies in a discarded block.
//!
//! Each device is driven by a guest driver of its own (one request queue
//! each, in boot RAM), on its own thread: [`Machine::devices_mut`] hands
//! out both devices at once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use memvisor_machine::{Machine, UnplugGuard};
use memvisor_memory::discard::RamDiscardManager;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_test_support::machines::dma::{BLOCK, DOMAIN, ENDPOINT, HOT, behind_viommu, config};
use memvisor_test_support::{Buf, DriverQueue, MIB, range};
use memvisor_virtio::{EventFdInterrupt, VirtioDevice};
use memvisor_virtio_iommu::request::{Attach, Map, Unmap};
use memvisor_virtio_iommu::{Request as IommuRequest, Status, VirtioIommu};
use memvisor_virtio_mem::{BlockRange, Request as MemRequest, VirtioMem};
use vm_memory::GuestAddress;

const ROUNDS: u64 = 3000;
const BLOCKS: u64 = 4;

/// Where the two drivers lay out their queues in boot RAM.
const VMEM_QUEUE: u64 = 0;
const IOMMU_REQUESTS: u64 = 0x10_0000;
const IOMMU_EVENTS: u64 = 0x20_0000;

/// Acknowledges every feature of `dev` and activates it with `queues`.
fn activate(dev: &mut dyn VirtioDevice, mem: &GuestMemoryMap, queues: &[&DriverQueue]) {
    dev.ack_features(dev.avail_features());
    let irq = Arc::new(EventFdInterrupt::new(queues.len() as u16).unwrap());
    dev.activate(mem.clone(), irq, queues.iter().map(|q| q.device_queue()).collect())
        .unwrap();
}

/// A guest's virtio-mem driver: one device, one request queue.
struct MemDriver<'a> {
    dev: &'a mut VirtioMem,
    queue: DriverQueue,
}

impl<'a> MemDriver<'a> {
    fn activate(dev: &'a mut VirtioMem, mem: &GuestMemoryMap) -> Self {
        let queue = DriverQueue::new(mem, GuestAddress(VMEM_QUEUE), 16, 4096).unwrap();
        activate(dev, mem, &[&queue]);
        Self { dev, queue }
    }

    fn send(&mut self, request: MemRequest) -> u16 {
        self.queue.add(&[Buf::In(&request.to_bytes()), Buf::Out(10)]).unwrap();
        self.dev.queue_notify(0);
        let used = self.queue.pop_used().expect("virtio-mem answered");
        u16::from_le_bytes([used.data[0], used.data[1]])
    }

    fn plug(&mut self, block: u64, nb_blocks: u16) -> u16 {
        self.send(MemRequest::Plug(BlockRange {
            addr: HOT + block * BLOCK,
            nb_blocks,
        }))
    }

    fn unplug(&mut self, block: u64) -> u16 {
        self.send(MemRequest::Unplug(BlockRange {
            addr: HOT + block * BLOCK,
            nb_blocks: 1,
        }))
    }
}

/// A guest's virtio-iommu driver: one device, one request queue (and an
/// event queue it gives no buffers).
struct IommuDriver<'a> {
    dev: &'a mut VirtioIommu,
    queue: DriverQueue,
    _events: DriverQueue,
}

impl<'a> IommuDriver<'a> {
    fn activate(dev: &'a mut VirtioIommu, mem: &GuestMemoryMap) -> Self {
        let queue = DriverQueue::new(mem, GuestAddress(IOMMU_REQUESTS), 16, 4096).unwrap();
        let events = DriverQueue::new(mem, GuestAddress(IOMMU_EVENTS), 4, 4096).unwrap();
        activate(dev, mem, &[&queue, &events]);
        Self {
            dev,
            queue,
            _events: events,
        }
    }

    fn send(&mut self, request: IommuRequest) -> Status {
        self.queue.add(&[Buf::In(&request.to_bytes()), Buf::Out(4)]).unwrap();
        self.dev.queue_notify(0);
        let used = self.queue.pop_used().expect("virtio-iommu answered");
        Status::from_u8(used.data[0]).expect("a valid status")
    }

    fn attach(&mut self) -> Status {
        self.send(IommuRequest::Attach(Attach {
            domain: DOMAIN,
            endpoint: ENDPOINT,
            flags: 0,
            reserved: [0; 4],
        }))
    }

    fn map(&mut self, iova: u64, phys: u64, len: u64, flags: u32) -> Status {
        self.send(IommuRequest::Map(Map {
            domain: DOMAIN,
            virt_start: iova,
            virt_end: iova + len - 1,
            phys_start: phys,
            flags,
        }))
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Status {
        self.send(IommuRequest::Unmap(Unmap {
            domain: DOMAIN,
            virt_start: iova,
            virt_end: iova + len - 1,
        }))
    }
}

#[test]
fn maps_racing_unplugs_never_pin_discarded_memory() {
    let _s = memvisor_test_support::serial();
    let mut m = Machine::new(&config(behind_viommu(UnplugGuard::Reject), 16 * MIB, None)).unwrap();
    let done = AtomicBool::new(false);
    let (maps_ok, maps_refused, unplugs_ok, unplugs_busy) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let observations = AtomicU64::new(0);

    // What the observer reads: the region and the device's bridge.
    let mem = m.memory().clone();
    let device = m.dma_devices().next().unwrap().clone();
    let region = m.vmems()[0].region.clone();
    let hot = range(HOT, 16 * MIB);

    // Split the machine into what each driver thread drives.
    let (vmems, iommu) = m.devices_mut();
    let mut vmem = MemDriver::activate(&mut vmems[0].device, &mem);
    let mut iommu = IommuDriver::activate(&mut iommu.unwrap().device, &mem);
    assert_eq!(vmem.plug(0, BLOCKS as u16), ACK);
    assert_eq!(iommu.attach(), Status::Ok);

    std::thread::scope(|s| {
        // The guest's IOMMU driver: map a page in a block, unmap it.
        s.spawn(|| {
            for i in 0..ROUNDS {
                let block = i % BLOCKS;
                let phys = HOT + block * BLOCK + (i % 7) * 4096;
                match iommu.map(0x100_0000, phys, 4096, RW) {
                    Status::Ok => {
                        maps_ok.fetch_add(1, Ordering::Relaxed);
                        assert_eq!(iommu.unmap(0x100_0000, 4096), Status::Ok);
                    }
                    Status::Inval => {
                        maps_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("map answered {other:?}"),
                }
            }
        });
        // The guest's virtio-mem driver: unplug a block and plug it again.
        s.spawn(|| {
            let mut i = 0;
            while !done.load(Ordering::Relaxed) && i < 4 * ROUNDS {
                let block = i % BLOCKS;
                match vmem.unplug(block) {
                    ACK => {
                        unplugs_ok.fetch_add(1, Ordering::Relaxed);
                        assert_eq!(vmem.plug(block, 1), ACK);
                    }
                    BUSY => {
                        unplugs_busy.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("unplug answered {other}"),
                }
                i += 1;
            }
        });
        // The observer: under the manager's read guard, every pinned range
        // in the virtio-mem region must be populated.
        s.spawn(|| {
            while maps_ok.load(Ordering::Relaxed) + maps_refused.load(Ordering::Relaxed) < ROUNDS {
                let view = region.populated();
                for r in device.pinned_ranges().expect("a bridge on path 2") {
                    if r.overlaps(&hot) {
                        assert!(view.is_populated(r), "pinned {r} while it is discarded");
                    }
                }
                drop(view);
                observations.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
            }
            done.store(true, Ordering::Relaxed);
        });
    });
    drop((vmem, iommu));

    let (ok, refused) = (maps_ok.into_inner(), maps_refused.into_inner());
    let (unplugged, busy) = (unplugs_ok.into_inner(), unplugs_busy.into_inner());
    eprintln!(
        "maps ok {ok}, refused {refused}; unplugs ok {unplugged}, busy {busy}; observations {}",
        observations.into_inner()
    );
    assert_eq!(ok + refused, ROUNDS);
    // The race was really run: both outcomes happened on both sides.
    assert!(ok > 0 && refused > 0, "maps: {ok} ok, {refused} refused");
    assert!(unplugged > 0, "no unplug succeeded");
    assert_eq!(m.pinned_bytes(), 0);
    drop(m);
}
