//! DMA mapping for memvisor. PLACEHOLDER docs.
#![deny(missing_docs)]

pub mod mapper;
pub mod ram_listener;
pub mod uring;
pub mod vfio;
pub mod viommu_bridge;

#[cfg(test)]
mod test_util {
    use std::sync::{Mutex, MutexGuard};

    static SERIAL: Mutex<()> = Mutex::new(());

    /// `VmPin` is per process and unit tests run on parallel threads: every
    /// test that pins holds this, so those that assert on `VmPin` see only
    /// their own pins.
    pub fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }
}
