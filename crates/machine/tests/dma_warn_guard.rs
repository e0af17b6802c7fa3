//! Unplug guard `warn` (QEMU's behaviour): an unplug of a mapped block is
//! allowed with exactly one warning, and the pin stays until the unmap.
//! Its own test binary, because it installs a counting logger.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use memvisor_dma::mapper::vm_pin_kib;
use memvisor_machine::UnplugGuard;
use memvisor_test_support::machines::dma::{DOMAIN, HOT, behind_viommu, rig};
use memvisor_test_support::{MIB, serial};
use memvisor_virtio_iommu::Status;

static WARNINGS: AtomicUsize = AtomicUsize::new(0);

struct CountingLogger;

impl log::Log for CountingLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        if record.level() == log::Level::Warn && text.contains("unplug guard 'warn'") {
            assert!(text.contains("pin budget"), "the warning names the bound: {text}");
            WARNINGS.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn flush(&self) {}
}

#[test]
fn warn_allows_the_unplug_once_warned_and_keeps_the_pin_until_unmap() {
    let _s = serial();
    log::set_logger(&CountingLogger).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    let mut m = rig(behind_viommu(UnplugGuard::Warn), 64 * MIB, None);
    assert_eq!(m.plug(0, 4), ACK);
    assert_eq!(m.map(DOMAIN, 0x10_0000, HOT, 2 * MIB, RW), Status::Ok);
    assert_eq!(m.map(DOMAIN, 0x40_0000, HOT + 4 * MIB, 2 * MIB, RW), Status::Ok);
    let events = m.machine.dma_events().subscribe();
    assert_eq!(m.unplug(0, 1), ACK);
    assert_eq!(
        events.try_recv(),
        Ok(memvisor_dma::events::DmaEvent::GuardWarning {
            device: memvisor_test_support::machines::dma::DEVICE.into(),
            gpa: HOT,
            size: 2 * MIB,
            iova: 0x10_0000
        })
    );
    assert_eq!(m.unplug(2, 1), ACK);
    assert_eq!(m.unplug_all(), ACK);
    assert_eq!(WARNINGS.load(Ordering::SeqCst), 1, "exactly one log warning");
    // ...but an event and a count each time.
    let device = m.machine.dma_devices().next().unwrap().clone();
    assert_eq!(device.counts().guard_warnings, 1 + events.try_iter().count() as u64);
    assert_eq!(m.machine.plugged_size(), 0);
    // The pins stay: the host holds 4 MiB the guest no longer has.
    assert_eq!(m.machine.pinned_bytes(), 4 * MIB);
    assert_eq!(vm_pin_kib(), 4 * 1024);
    assert_eq!(m.unmap(DOMAIN, 0, 1 << 30), Status::Ok);
    assert_eq!(m.machine.pinned_bytes(), 0);
    assert_eq!(vm_pin_kib(), 0);
    assert_eq!(WARNINGS.load(Ordering::SeqCst), 1);
}
