//! `Machine::new_attaching`: the zero-copy devices (backend `UringIo`)
//! attach on a thread of their own, the others before it returns; the
//! latch opens when the thread is done, whatever reads or resets the DMA
//! state waits for it, and a failure reaches `on_failure` with nothing left
//! pinned.

use std::sync::mpsc;
use std::time::Duration;

use memvisor_machine::{
    AssignedDeviceSpec, AssignedPath, DmaBackend, DmaSpec, Machine, MachineConfig, MachineError, RamSpec, VirtioMemSpec,
};
use memvisor_test_support::{MIB, serial};

/// 8 MiB of boot RAM, a 16 MiB virtio-mem region, and one
/// device on path 1 per backend given.
fn config(backends: &[DmaBackend], pin_budget: Option<u64>) -> MachineConfig {
    MachineConfig {
        ram: vec![RamSpec { addr: 0, size: 8 * MIB }],
        virtio_mem: vec![VirtioMemSpec::new("vmem0", 1 << 32, 16 * MIB, 2 * MIB)],
        virtio_iommu: None,
        dma: DmaSpec {
            devices: backends
                .iter()
                .enumerate()
                .map(|(i, &backend)| AssignedDeviceSpec {
                    name: format!("dev{i}"),
                    backend,
                    path: AssignedPath::Ram,
                })
                .collect(),
            pin_budget,
        },
    }
}

#[test]
fn a_zero_copy_device_attaches_on_its_thread_and_the_latch_opens_when_it_is_pinned() {
    let _serial = serial();
    let (tx, rx) = mpsc::channel();
    let machine = Machine::new_attaching(&config(&[DmaBackend::UringIo], None), move |e| {
        tx.send(e).unwrap();
    })
    .unwrap();
    assert_eq!(machine.dma_latch().wait(), Ok(()));
    // All of boot RAM, pinned once the latch is open.
    assert_eq!(machine.pinned_bytes(), 8 * MIB);
    // Whatever reads the DMA state sees it attached.
    let registry = machine.registry().unwrap();
    drop(registry);
    drop(machine);
    assert!(rx.try_recv().is_err(), "no failure reported");
}

#[test]
fn other_devices_attach_before_it_returns() {
    let _serial = serial();
    let machine = Machine::new_attaching(&config(&[DmaBackend::Uring], None), |e| panic!("{e}")).unwrap();
    // Nothing attaches later: the latch is open, and the pins are there.
    assert_eq!(machine.dma_latch().outcome(), Some(Ok(())));
    assert_eq!(machine.pinned_bytes(), 8 * MIB);
}

#[test]
fn a_failure_on_the_thread_reaches_on_failure_with_nothing_pinned() {
    let _serial = serial();
    let (tx, rx) = mpsc::channel();
    // 4 MiB cannot hold 8 MiB of boot RAM.
    let mut machine = Machine::new_attaching(&config(&[DmaBackend::UringIo], Some(4 * MIB)), move |e| {
        tx.send(e).unwrap();
    })
    .unwrap();
    let why = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the failure is reported");
    assert!(why.contains("dev0"), "{why}");
    let latch = machine.dma_latch().wait().unwrap_err();
    assert_eq!(latch, why);
    assert_eq!(machine.pinned_bytes(), 0);
    // What needs the DMA state settled reports the failure.
    let err = machine.system_reset().unwrap_err();
    assert!(matches!(&err, MachineError::Attaching(e) if *e == why), "{err:?}");
    assert!(machine.registry().is_err());
}
