//! The virtio-iommu request queue: arbitrary descriptor chains, ring
//! mischief and well-shaped requests against a live device whose assigned
//! endpoint pins through a `ViommuDmaBridge` on the io_uring backend (DMA
//! path 2), while the guest plugs and unplugs virtio-mem blocks.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use memvisor_fuzz::{IommuAction, MAX_ACTIONS, Path, Rig};

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fuzz_target!(|actions: Vec<IommuAction>| {
    RIG.with(|cell| {
        let mut cell = cell.borrow_mut();
        let rig = cell.get_or_insert_with(|| Rig::new(Path::Viommu));
        for action in actions.iter().take(MAX_ACTIONS) {
            rig.iommu_action(action);
            rig.check();
        }
        rig.restart();
    });
});
