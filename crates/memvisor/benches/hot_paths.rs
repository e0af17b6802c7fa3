//! Criterion benchmarks of the hot paths of `memvisor bench`, each beside
//! its floor — the bare kernel work it cannot avoid — so that both show in
//! one run. They time the very scenarios of [`memvisor::bench`]; `memvisor
//! bench` reports the same figures as ratios.

use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use memvisor::bench::{Migration, PopulatedCheck, PopulatedReplay, Scenario, ViommuMapUnmap, VmemPlugUnplug};
use memvisor_machine::DmaBackend;

const MIB: u64 = 1 << 20;

/// Benchmarks `scenario`'s path and floor as `name/ours` and `name/floor`.
fn pair(c: &mut Criterion, name: &str, scenario: &mut dyn Scenario) {
    let scenario = std::cell::RefCell::new(scenario);
    let mut group = c.benchmark_group(name);
    group.bench_function("ours", |b| b.iter(|| scenario.borrow_mut().ours()));
    group.bench_function("floor", |b| b.iter(|| scenario.borrow_mut().floor()));
    group.finish();
}

fn viommu_map_unmap(c: &mut Criterion) {
    for (name, len) in [("viommu_map_unmap_4k", 4096), ("viommu_map_unmap_2m", 2 * MIB)] {
        pair(c, name, &mut ViommuMapUnmap::new(len, Some(DmaBackend::Uring)));
        let mut bare = ViommuMapUnmap::new(len, None);
        c.bench_function(&format!("{name}/no_dma"), |b| b.iter(|| bare.ours()));
        c.bench_function(&format!("{name}/no_dma_with_floor"), |b| {
            b.iter(|| bare.requests_with_floor())
        });
    }
}

fn vmem_plug_unplug(c: &mut Criterion) {
    pair(c, "vmem_plug_unplug", &mut VmemPlugUnplug::new());
}

fn populated(c: &mut Criterion) {
    pair(c, "populated_check", &mut PopulatedCheck::new());
    pair(c, "populated_replay", &mut PopulatedReplay::new());
}

fn migration(c: &mut Criterion) {
    // 4 GiB with 512 MiB plugged, as `memvisor bench`: about a second per
    // sample pair, so the fewest samples criterion takes.
    let scenario = Migration::new(4 << 30, 512 * MIB);
    let mut group = c.benchmark_group("migration");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("ours", |b| {
        b.iter_batched_ref(
            || scenario.destination(),
            |dst| scenario.save_load(dst),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("floor", |b| {
        b.iter_batched_ref(
            || scenario.floor_destination(),
            |dst| scenario.copy(dst),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, viommu_map_unmap, vmem_plug_unplug, populated, migration);
criterion_main!(benches);
