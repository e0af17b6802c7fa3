//! The virtio-mem request queue: arbitrary descriptor chains, ring
//! mischief and well-shaped requests against a live device whose region
//! an io_uring-pinning `RamDmaListener` follows (DMA path 1).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use memvisor_fuzz::{MAX_ACTIONS, MemAction, Path, Rig};

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fuzz_target!(|actions: Vec<MemAction>| {
    RIG.with(|cell| {
        let mut cell = cell.borrow_mut();
        let rig = cell.get_or_insert_with(|| Rig::new(Path::Plain));
        for action in actions.iter().take(MAX_ACTIONS) {
            rig.mem_action(action);
            rig.check();
        }
        rig.restart();
    });
});
