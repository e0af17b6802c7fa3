//! A fake VFIO device with kernel-like semantics, and a recording sink,
//! sharing one timeline of events.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_pci::{MsiMessage, MsiSink};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_NORESIZE, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};

use crate::io::{CONFIG_REGION_INDEX, IrqInfo, MSIX_IRQ_INDEX, RegionInfo, VfioDeviceIo};

/// Something the device or the sink saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    ConfigWrite { offset: u64, data: Vec<u8> },
    BarRead { bar: u32, offset: u64, len: usize },
    BarWrite { bar: u32, offset: u64, data: Vec<u8> },
    SetIrqs { start: u32, fds: Vec<RawFd> },
    DisableIrqs,
    Reset,
    Configure(u16, MsiMessage, bool),
    Trigger(u16),
}

pub(crate) type Timeline = Arc<Mutex<Vec<Event>>>;

/// The fake's state.
pub(crate) struct FakeState {
    /// Configuration region contents.
    pub(crate) config: Vec<u8>,
    /// Region descriptions, by index (0..=8).
    pub(crate) regions: Vec<RegionInfo>,
    /// BAR contents, by index.
    pub(crate) bars: Vec<Vec<u8>>,
    pub(crate) msix_irqs: IrqInfo,
    /// MSI-X enabled: the trigger eventfd of each vector (the number the
    /// device passed, and a dup).
    pub(crate) msix: Option<Vec<Option<(RawFd, OwnedFd)>>>,
    /// Accesses the kernel would refuse: outside a region, SET_IRQS
    /// against the enable state.
    pub(crate) refused: Vec<String>,
    pub(crate) fail_reset: bool,
    pub(crate) fail_set_irqs: bool,
    /// Configuration reads fail from this offset on.
    pub(crate) fail_config_from: Option<u64>,
    pub(crate) timeline: Timeline,
}

/// The [`VfioDeviceIo`] over a shared [`FakeState`].
pub(crate) struct FakeDevice(pub(crate) Arc<Mutex<FakeState>>);

pub(crate) fn lock(state: &Mutex<FakeState>) -> MutexGuard<'_, FakeState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

const RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;

/// Offsets of the NVMe image's capabilities.
pub(crate) const MSIX_CAP: usize = 0x40;
pub(crate) const PM_CAP: usize = 0x60;
pub(crate) const PCIE_CAP: usize = 0x80;
pub(crate) const MSI_CAP: usize = 0xc0;
pub(crate) const NVME_VECTORS: u16 = 65;
pub(crate) const BAR0_SIZE: u64 = 0x4000;

fn put(cfg: &mut [u8], at: usize, bytes: &[u8]) {
    cfg[at..at + bytes.len()].copy_from_slice(bytes);
}

/// QEMU's NVMe controller (1b36:0010) as a host shows it under vfio-pci:
/// BAR0 64-bit 16 KiB (host address in the register), MSI-X with 65
/// vectors (table at BAR0 0x2000, PBA at 0x3000), and — in list order —
/// MSI-X at 0x40, MSI at 0xc0 (added for the test: QEMU's NVMe has none),
/// PCIe v2 endpoint at 0x80, PM at 0x60.
pub(crate) fn nvme_config() -> Vec<u8> {
    let mut c = vec![0u8; 4096];
    put(&mut c, 0x00, &0x1b36u16.to_le_bytes());
    put(&mut c, 0x02, &0x0010u16.to_le_bytes());
    put(&mut c, 0x04, &0x0000u16.to_le_bytes()); // command
    put(&mut c, 0x06, &0x0010u16.to_le_bytes()); // status: capability list
    put(&mut c, 0x08, &[0x02, 0x02, 0x08, 0x01]); // rev 2, class 010802
    put(&mut c, 0x0c, &[0x10, 0x00, 0x80, 0x00]); // cache line, latency, multi-function bit, BIST
    put(&mut c, 0x10, &0xfebf_0004u32.to_le_bytes()); // 64-bit memory BAR
    put(&mut c, 0x14, &0u32.to_le_bytes());
    put(&mut c, 0x2c, &0x1af4u16.to_le_bytes());
    put(&mut c, 0x2e, &0x1100u16.to_le_bytes());
    put(&mut c, 0x30, &0xfeb8_0000u32.to_le_bytes()); // a ROM BAR
    put(&mut c, 0x34, &[MSIX_CAP as u8]);
    put(&mut c, 0x3c, &[0x0b, 0x01, 0, 0]); // INTx line 11, pin A
    // MSI-X: 65 vectors, table BAR0 + 0x2000, PBA BAR0 + 0x3000.
    put(&mut c, MSIX_CAP, &[0x11, MSI_CAP as u8]);
    put(&mut c, MSIX_CAP + 2, &(NVME_VECTORS - 1).to_le_bytes());
    put(&mut c, MSIX_CAP + 4, &0x2000u32.to_le_bytes());
    put(&mut c, MSIX_CAP + 8, &0x3000u32.to_le_bytes());
    // MSI: 64-bit, per-vector masking, 32 vectors capable.
    put(&mut c, MSI_CAP, &[0x05, PCIE_CAP as u8]);
    put(&mut c, MSI_CAP + 2, &0x018au16.to_le_bytes());
    put(&mut c, MSI_CAP + 4, &0xfee0_0000u32.to_le_bytes());
    // PCIe v2 endpoint.
    put(&mut c, PCIE_CAP, &[0x10, PM_CAP as u8]);
    put(&mut c, PCIE_CAP + 0x02, &0x0002u16.to_le_bytes());
    put(&mut c, PCIE_CAP + 0x04, &0x1000_8000u32.to_le_bytes()); // DevCap: FLR, role-based errors
    put(&mut c, PCIE_CAP + 0x08, &0x2810u16.to_le_bytes()); // DevCtl
    put(&mut c, PCIE_CAP + 0x0c, &0x0041_1c12u32.to_le_bytes()); // LnkCap
    put(&mut c, PCIE_CAP + 0x12, &0x1011u16.to_le_bytes()); // LnkSta
    put(&mut c, PCIE_CAP + 0x24, &0x0000_0010u32.to_le_bytes()); // DevCap2
    put(&mut c, PCIE_CAP + 0x2c, &0x0000_001eu32.to_le_bytes()); // LnkCap2
    put(&mut c, PCIE_CAP + 0x32, &0x0001u16.to_le_bytes()); // LnkSta2
    // PM: version 3, No_Soft_Reset.
    put(&mut c, PM_CAP, &[0x01, 0x00]);
    put(&mut c, PM_CAP + 2, &0x0003u16.to_le_bytes());
    put(&mut c, PM_CAP + 4, &0x0008u16.to_le_bytes());
    // Bytes outside any capability.
    put(&mut c, 0xf0, &[0xde, 0xad, 0xbe, 0xef]);
    // Extended space: an AER capability the guest must not see.
    put(&mut c, 0x100, &0x0001_0001u32.to_le_bytes());
    c
}

impl FakeState {
    /// The NVMe controller.
    pub(crate) fn nvme(timeline: Timeline) -> Self {
        let mut regions = vec![RegionInfo::default(); 9];
        regions[0] = RegionInfo {
            size: BAR0_SIZE,
            offset: 0,
            flags: RW | VFIO_REGION_INFO_FLAG_MMAP,
        };
        regions[CONFIG_REGION_INDEX as usize] = RegionInfo {
            size: 4096,
            offset: 7 << 40,
            flags: RW,
        };
        let mut bar0: Vec<u8> = (0..BAR0_SIZE).map(|i| i as u8).collect();
        // The device's own table would read like this; the guest must not
        // see it.
        bar0[0x2000..0x2410].fill(0xee);
        Self {
            config: nvme_config(),
            regions,
            bars: vec![bar0],
            msix_irqs: IrqInfo {
                count: u32::from(NVME_VECTORS),
                flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            },
            msix: None,
            refused: Vec::new(),
            fail_reset: false,
            fail_set_irqs: false,
            fail_config_from: None,
            timeline,
        }
    }

    fn record(&self, event: Event) {
        self.timeline.lock().unwrap().push(event);
    }

    fn refuse(&mut self, why: String) -> io::Error {
        self.refused.push(why.clone());
        io::Error::new(io::ErrorKind::InvalidInput, why)
    }

    /// The device raises MSI-X `vector`: signals its current trigger, as
    /// the host's interrupt handler would. False if none is set.
    pub(crate) fn fire(&self, vector: u16) -> bool {
        let Some(Some((_, fd))) = self.msix.as_ref().and_then(|t| t.get(usize::from(vector))) else {
            return false;
        };
        let mut file = File::from(fd.try_clone().unwrap());
        file.write_all(&1u64.to_ne_bytes()).unwrap();
        true
    }

    /// The raw fd numbers of the current triggers (-1: none).
    pub(crate) fn trigger_fds(&self) -> Option<Vec<RawFd>> {
        self.msix
            .as_ref()
            .map(|t| t.iter().map(|fd| fd.as_ref().map_or(-1, |(raw, _)| *raw)).collect())
    }
}

impl VfioDeviceIo for FakeDevice {
    /// Device memory of its own (a memfd of the region's size), for the
    /// mapping checks: not the memory `region_read` sees.
    fn map_region(&self, index: u32, offset: u64, len: u64) -> io::Result<crate::io::RegionMapping> {
        use std::os::fd::{AsFd, FromRawFd};
        let size = lock(&self.0).regions.get(index as usize).map_or(0, |r| r.size);
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: memfd_create with a valid name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fake-bar".as_ptr(), 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        crate::io::RegionMapping::map(file.as_fd(), offset, len)
    }

    fn region_info(&self, index: u32) -> io::Result<RegionInfo> {
        let state = lock(&self.0);
        state
            .regions
            .get(index as usize)
            .copied()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let mut state = lock(&self.0);
        let size = state.regions.get(index as usize).map_or(0, |r| r.size);
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > size) || data.is_empty() {
            return Err(state.refuse(format!("read of {} at {offset:#x} of region {index}", data.len())));
        }
        let at = offset as usize;
        if index == CONFIG_REGION_INDEX {
            if state.fail_config_from.is_some_and(|from| end.unwrap() > from) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            data.copy_from_slice(&state.config[at..at + data.len()]);
        } else {
            data.copy_from_slice(&state.bars[index as usize][at..at + data.len()]);
            state.record(Event::BarRead {
                bar: index,
                offset,
                len: data.len(),
            });
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = lock(&self.0);
        let size = state.regions.get(index as usize).map_or(0, |r| r.size);
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > size) || data.is_empty() {
            return Err(state.refuse(format!("write of {} at {offset:#x} of region {index}", data.len())));
        }
        let at = offset as usize;
        if index == CONFIG_REGION_INDEX {
            state.config[at..at + data.len()].copy_from_slice(data);
            state.record(Event::ConfigWrite {
                offset,
                data: data.to_vec(),
            });
        } else {
            state.bars[index as usize][at..at + data.len()].copy_from_slice(data);
            state.record(Event::BarWrite {
                bar: index,
                offset,
                data: data.to_vec(),
            });
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> io::Result<IrqInfo> {
        let state = lock(&self.0);
        if index == MSIX_IRQ_INDEX {
            Ok(state.msix_irqs)
        } else {
            Ok(IrqInfo::default())
        }
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<BorrowedFd<'_>>]) -> io::Result<()> {
        let mut state = lock(&self.0);
        if index != MSIX_IRQ_INDEX {
            return Err(state.refuse(format!("SET_IRQS on index {index}")));
        }
        if state.fail_set_irqs {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.map_or(-1, |fd| fd.as_raw_fd())).collect();
        let dups: Vec<Option<(RawFd, OwnedFd)>> = fds
            .iter()
            .map(|fd| fd.map(|fd| (fd.as_raw_fd(), fd.try_clone_to_owned().unwrap())))
            .collect();
        let count = state.msix_irqs.count as usize;
        match &mut state.msix {
            None => {
                if start != 0 || fds.is_empty() || fds.len() > count {
                    return Err(state.refuse(format!("enabling MSI-X at {start} with {} fds", fds.len())));
                }
                state.msix = Some(dups);
            }
            Some(triggers) => {
                let start = start as usize;
                if start + fds.len() > triggers.len() {
                    let n = triggers.len();
                    return Err(state.refuse(format!("SET_IRQS {start}+{} past {n} enabled", fds.len())));
                }
                for (slot, fd) in triggers[start..].iter_mut().zip(dups) {
                    *slot = fd;
                }
            }
        }
        state.record(Event::SetIrqs { start, fds: raw });
        Ok(())
    }

    fn disable_irqs(&self, index: u32) -> io::Result<()> {
        let mut state = lock(&self.0);
        if index != MSIX_IRQ_INDEX || state.msix.is_none() {
            return Err(state.refuse(format!("disabling index {index} while it is off")));
        }
        state.msix = None;
        state.record(Event::DisableIrqs);
        Ok(())
    }

    fn reset(&self) -> io::Result<()> {
        let mut state = lock(&self.0);
        if state.fail_reset {
            return Err(io::Error::from_raw_os_error(libc::ENOTTY));
        }
        state.msix = None;
        state.record(Event::Reset);
        Ok(())
    }
}

/// An [`MsiSink`] recording into the timeline.
pub(crate) struct RecordingSink(pub(crate) Timeline);

impl MsiSink for RecordingSink {
    fn configure(&self, vector: u16, msg: MsiMessage, enabled: bool) -> io::Result<()> {
        self.0.lock().unwrap().push(Event::Configure(vector, msg, enabled));
        Ok(())
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.0.lock().unwrap().push(Event::Trigger(vector));
        Ok(())
    }
}
