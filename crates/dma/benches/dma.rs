//! Criterion benchmarks of the DMA hot paths, each beside its floor — the
//! bare kernel work it cannot avoid — so the ratio is visible in one run.
//! `memvisor bench` reports the same figures as ratios.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use common::*;
use criterion::{Criterion, criterion_group, criterion_main};
use memvisor_dma::mapper::{Access, DmaMapper, PinBudget};
use memvisor_dma::uring::UringPinner;
use memvisor_dma::viommu_bridge::UnplugGuard;
use memvisor_memory::GuestRange;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_virtio_iommu::Status;

/// The io_uring buffer-table updates that pin and unpin one host range.
struct Floor {
    ring: io_uring::IoUring,
}

impl Floor {
    fn new() -> Self {
        let ring = io_uring::IoUring::new(1).unwrap();
        ring.submitter().register_buffers_sparse(1).unwrap();
        Self { ring }
    }

    fn pin_unpin(&self, host: u64, len: u64) {
        let buf = [libc::iovec {
            iov_base: host as *mut libc::c_void,
            iov_len: len as usize,
        }];
        let empty = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        // SAFETY: `host` is mapped guest RAM that outlives the call; the
        // slot is cleared again right away and never used for I/O.
        unsafe {
            self.ring.submitter().register_buffers_update(0, &buf, None).unwrap();
            self.ring.submitter().register_buffers_update(0, &empty, None).unwrap();
        }
    }
}

fn viommu_map_unmap(c: &mut Criterion) {
    let mut m = Machine::new(Path::Viommu(UnplugGuard::Reject), 64 * MIB, None);
    assert_eq!(m.plug(0, 4), ACK);
    let floor = Floor::new();
    let pinner = UringPinner::new("bench", std::sync::Arc::new(PinBudget::unlimited()));
    let host = m.hot.host_address();
    for (name, len) in [("4k", 4096u64), ("2m", 2 * MIB)] {
        let mut group = c.benchmark_group(format!("viommu_map_unmap_{name}"));
        group.bench_function("floor: io_uring pin+unpin", |b| b.iter(|| floor.pin_unpin(host, len)));
        group.bench_function("UringPinner map+unmap", |b| {
            b.iter(|| {
                pinner.map(0x1000_0000, host, len, Access::READ_WRITE).unwrap();
                pinner.unmap(0x1000_0000, len).unwrap();
            })
        });
        group.bench_function("MAP+UNMAP through the virtqueue", |b| {
            b.iter(|| {
                assert_eq!(m.map(0x1000_0000, HOT, len, RW), Status::Ok);
                assert_eq!(m.unmap(0x1000_0000, len), Status::Ok);
            })
        });
        group.finish();
    }
}

fn vmem_plug_unplug(c: &mut Criterion) {
    let mut m = Machine::new(Path::Plain, 64 * MIB, None);
    let floor = Floor::new();
    let host = m.hot.host_address();
    let mut group = c.benchmark_group("vmem_plug_unplug");
    group.bench_function("floor: punch hole + pin+unpin", |b| {
        b.iter(|| {
            m.hot.discard(0, 2 * MIB).unwrap();
            floor.pin_unpin(host, 2 * MIB);
        })
    });
    group.bench_function("PLUG+UNPLUG through the virtqueue", |b| {
        b.iter(|| {
            assert_eq!(m.plug(0, 1), ACK);
            assert_eq!(m.unplug(0, 1), ACK);
        })
    });
    group.finish();
}

fn populated(c: &mut Criterion) {
    use memvisor_memory::discard::BlockDiscardManager;
    const TIB: u64 = 1 << 40;
    let region = GuestRange::new(TIB, TIB).unwrap();
    let manager = BlockDiscardManager::new(region, 2 * MIB).unwrap();
    manager.write().plug(region, || Ok::<_, ()>(()), |_| {}).unwrap();
    let dynamic: &dyn RamDiscardManager = &manager;
    let mut group = c.benchmark_group("populated");
    group.bench_function("is_populated over 1 TiB of 2 MiB blocks", |b| {
        b.iter(|| assert!(dynamic.is_populated(black_box(region))))
    });
    group.bench_function("replay_populated over 1 TiB (one run)", |b| {
        b.iter(|| {
            let mut sum = 0;
            dynamic
                .replay_populated(region, &mut |r| {
                    sum += r.len();
                    Ok(())
                })
                .unwrap();
            black_box(sum)
        })
    });
    group.finish();
}

criterion_group!(benches, viommu_map_unmap, vmem_plug_unplug, populated);
criterion_main!(benches);
