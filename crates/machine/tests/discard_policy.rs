//! The discard policy as the machine wires it: every virtio-mem device
//! requires coordinated discard for as long as it exists, every assigned
//! device disables uncoordinated discard while it is attached, and a
//! conflicting request names both parties.

use memvisor_machine::{
    AssignedDeviceSpec, AssignedPath, DmaBackend, DmaSpec, Machine, MachineConfig, MachineError, RamSpec, VirtioMemSpec,
};
use memvisor_memory::policy::HolderKind;
use memvisor_test_support::{MIB, serial};

fn config(assigned: bool) -> MachineConfig {
    MachineConfig {
        ram: vec![RamSpec { addr: 0, size: 2 * MIB }],
        virtio_mem: vec![VirtioMemSpec::new("vmem0", 1 << 32, 16 * MIB, 2 * MIB)],
        virtio_iommu: None,
        dma: DmaSpec {
            devices: assigned
                .then(|| AssignedDeviceSpec {
                    name: "nic0".into(),
                    backend: DmaBackend::Uring,
                    path: AssignedPath::Ram,
                })
                .into_iter()
                .collect(),
            pin_budget: None,
        },
    }
}

#[test]
fn virtio_mem_holds_a_coordinated_discard_guard() {
    let _serial = serial();
    let machine = Machine::new(&config(false)).unwrap();
    assert_eq!(machine.policy().holders(HolderKind::RequireCoordinated), vec!["vmem0"]);
    // A device that cannot tolerate any discard conflicts with virtio-mem.
    let err = machine.policy().disable_all("scsi0").unwrap_err().to_string();
    assert!(err.contains("'scsi0'") && err.contains("'vmem0'"), "{err}");
    drop(machine);
}

#[test]
fn an_uncoordinated_discarder_is_refused_while_dma_is_set_up_naming_both() {
    let _serial = serial();
    let machine = Machine::new(&config(true)).unwrap();
    assert_eq!(machine.policy().holders(HolderKind::DisableUncoordinated), vec!["nic0"]);
    let err = machine.require_uncoordinated_discard("balloon0").unwrap_err();
    assert!(matches!(err, MachineError::Policy(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("'balloon0'"), "{message}");
    assert!(message.contains("'nic0'"), "{message}");
    // Once the device is detached, the balloon may come.
    for device in machine.dma_devices() {
        device.detach();
    }
    let balloon = machine.require_uncoordinated_discard("balloon0").unwrap();
    assert_eq!(balloon.holder(), "balloon0");
    // ...and a DMA device cannot attach while it is there.
    let device = machine.dma_devices().next().unwrap();
    let err = device
        .attach(memvisor_dma::attach::DmaPath::Ram)
        .unwrap_err()
        .to_string();
    assert!(err.contains("'nic0'") && err.contains("'balloon0'"), "{err}");
}

#[test]
fn without_dma_an_uncoordinated_discarder_is_allowed() {
    let machine = Machine::new(&config(false)).unwrap();
    assert!(machine.require_uncoordinated_discard("balloon0").is_ok());
}
