//! A KVM VM over a guest memory map, and a minimal vCPU runner.
//!
//! [`Vm`] opens `/dev/kvm`, creates a VM, gives it memory slots through
//! [`Memslots`] (plain RAM always, managed regions as their blocks are
//! plugged) and answers MMIO exits through [`UnassignedMemory`]. [`Vcpu`]
//! enters 64-bit long mode at a given state and runs until the guest
//! halts, recording what it writes to I/O ports. No device claims MMIO or
//! port I/O yet: every MMIO exit is unassigned memory, every port read
//! returns all ones.
//!
//! # Memory safety of the slots
//!
//! A KVM slot holds a host virtual address, and the kernel uses it for as
//! long as the VM exists, which is as long as its VM fd *or any of its
//! vCPU fds* is open. Every holder of a VM or vCPU fd therefore also holds
//! the guest memory map the addresses come from, and drops the fd first:
//! the mappings outlive every slot that points into them.

use std::io;
use std::sync::Arc;

use kvm_bindings::{
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, kvm_clock_data, kvm_irqchip, kvm_pit_state2, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memvisor_machine::Machine;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::{GuestRange, PageSet};

use crate::memslots::{MemslotError, Memslots, SlotBackend, SlotIoError};
use crate::unassigned::UnassignedMemory;
use crate::x86::state::{PlatformState, StateError, VcpuState, from_bytes, to_bytes};

/// The KVM API version this crate speaks.
const KVM_API_VERSION: i32 = 12;

/// Why a VM could not be built or a vCPU could not run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("opening /dev/kvm: {0}")]
    Open(io::Error),
    /// The kernel speaks another KVM API.
    #[error("KVM API version {0}, but memvisor speaks version 12")]
    ApiVersion(i32),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The call, with its arguments.
        what: String,
        /// The error KVM returned.
        source: io::Error,
    },
    /// The memory slots could not be set up.
    #[error(transparent)]
    Memslots(#[from] MemslotError),
    /// Saved platform state could not be decoded.
    #[error(transparent)]
    State(#[from] StateError),
    /// `KVM_RUN` failed.
    #[error("KVM_RUN of vCPU {vcpu} failed (rip {rip:#x}): {source}")]
    Run {
        /// The vCPU.
        vcpu: u64,
        /// The guest's instruction pointer, if it could be read.
        rip: u64,
        /// The error KVM returned.
        source: io::Error,
    },
    /// The vCPU stopped for a reason the runner does not handle.
    #[error("vCPU {vcpu} stopped with {exit} at rip {rip:#x}")]
    Stopped {
        /// The vCPU.
        vcpu: u64,
        /// The exit, as KVM reported it.
        exit: String,
        /// The guest's instruction pointer.
        rip: u64,
    },
    /// The guest did not halt within the allowed number of exits.
    #[error("vCPU {vcpu} did not halt within {limit} exits (rip {rip:#x})")]
    TooManyExits {
        /// The vCPU.
        vcpu: u64,
        /// The limit.
        limit: u64,
        /// The guest's instruction pointer.
        rip: u64,
    },
}

fn kvm_error(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |e| VmError::Kvm { what, source: e.into() }
}

/// The VM fd and the memory its slots point into, dropped in that order.
pub(crate) struct VmHandle {
    pub(crate) fd: VmFd,
    memory: GuestMemoryMap,
}

impl VmHandle {
    /// Installs memory slot `slot` at `gpa`, `size` bytes backed by `host`
    /// — memory outside the guest memory map, such as a device's BAR mapped
    /// from its VFIO file — or, with `size` 0, removes it.
    ///
    /// # Safety
    ///
    /// `[host, host + size)` must stay mapped until the slot is removed
    /// (or the VM is gone).
    pub(crate) unsafe fn set_foreign_slot(&self, slot: u32, gpa: u64, size: u64, host: u64) -> std::io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the caller keeps `[host, host + size)` mapped while the
        // slot exists; KVM refuses overlaps with other slots itself.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(std::io::Error::from)
    }
}

/// [`SlotBackend`] of a KVM VM: `KVM_SET_USER_MEMORY_REGION` and
/// `KVM_GET_DIRTY_LOG`, with host addresses resolved through the VM's own
/// memory map.
struct KvmSlots {
    vm: Arc<VmHandle>,
}

impl KvmSlots {
    fn host_address(&self, slot: u32, range: GuestRange) -> Result<u64, SlotIoError> {
        self.vm
            .memory
            .lookup(range)
            .map(|host| host.host_address)
            .map_err(|e| SlotIoError::NotRam {
                slot,
                range,
                reason: e.to_string(),
            })
    }

    fn set(
        &self,
        what: &'static str,
        slot: u32,
        range: GuestRange,
        size: u64,
        log_dirty: bool,
    ) -> Result<(), SlotIoError> {
        let host = self.host_address(slot, range)?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: range.start(),
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host` is the host address of `range` in `self.vm.memory`,
        // a live mapping of `range.len()` bytes (the map resolved the whole
        // range inside one region). The mapping stays alive as long as the
        // kernel VM can use the slot: `VmHandle` drops its fd before its
        // memory, and every vCPU holds the `VmHandle` (see the module
        // documentation). Overlaps are refused by KVM itself (EEXIST), and
        // the slot tables never ask for one. Removing a slot (size 0) makes
        // no memory reachable; issuing a live slot again with other flags
        // (dirty logging) maps the same memory.
        unsafe { self.vm.fd.set_user_memory_region(region) }.map_err(|e| SlotIoError::Ioctl {
            what,
            slot,
            range,
            host,
            source: e.into(),
        })
    }
}

impl SlotBackend for KvmSlots {
    fn add(&self, slot: u32, range: GuestRange, log_dirty: bool) -> Result<(), SlotIoError> {
        self.set("adding", slot, range, range.len(), log_dirty)
    }

    fn remove(&self, slot: u32, range: GuestRange) -> Result<(), SlotIoError> {
        self.set("removing", slot, range, 0, false)
    }

    fn set_dirty_logging(&self, slot: u32, range: GuestRange, on: bool) -> Result<(), SlotIoError> {
        let what = if on {
            "switching dirty logging on for"
        } else {
            "switching dirty logging off for"
        };
        self.set(what, slot, range, range.len(), on)
    }

    fn take_dirty_log(&self, slot: u32, range: GuestRange) -> Result<PageSet, SlotIoError> {
        let error = |source: io::Error| SlotIoError::DirtyLog { slot, range, source };
        let size = usize::try_from(range.len()).map_err(|_| error(io::Error::from_raw_os_error(libc::EINVAL)))?;
        let words = self.vm.fd.get_dirty_log(slot, size).map_err(|e| error(e.into()))?;
        Ok(PageSet::from_words(&words, range.len() / crate::memslots::PAGE_SIZE))
    }
}

/// Asks KVM to zap only a deleted slot's mappings, not the whole VM's
/// (`KVM_X86_QUIRK_SLOT_ZAP_ALL` off, where the kernel has the quirk): an
/// unplug removes one slot per block, and zapping everything each time
/// would make the guest fault all its memory in again.
fn zap_only_deleted_slots(fd: &VmFd) -> Result<(), VmError> {
    use kvm_bindings::{KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_SLOT_ZAP_ALL, kvm_enable_cap};
    let quirks = fd.check_extension_raw(u64::from(KVM_CAP_DISABLE_QUIRKS2));
    if quirks < 0 || quirks as u32 & KVM_X86_QUIRK_SLOT_ZAP_ALL == 0 {
        log::debug!("KVM cannot zap only a deleted slot (quirks {quirks:#x}); each unplug zaps all mappings");
        return Ok(());
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DISABLE_QUIRKS2,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_X86_QUIRK_SLOT_ZAP_ALL);
    fd.enable_cap(&cap)
        .map_err(kvm_error("KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2, SLOT_ZAP_ALL)"))
}

/// A KVM VM over a guest memory map; see the [module documentation](self).
pub struct Vm {
    // Dropped first: unregisters the listeners and removes every slot.
    memslots: Arc<Memslots>,
    unassigned: Arc<UnassignedMemory>,
    handle: Arc<VmHandle>,
    kvm: Kvm,
    nr_memslots: usize,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("nr_memslots", &self.nr_memslots)
            .field("memslots", &self.memslots)
            .finish()
    }
}

impl Vm {
    /// A VM for `machine`'s memory: boot RAM and every virtio-mem region,
    /// the latter followed block by block as they are plugged.
    pub fn new(machine: &Machine) -> Result<Self, VmError> {
        Self::with_memory(machine.memory())
    }

    /// A VM for `memory`: a slot for every plain region, and a
    /// [`MemslotListener`](crate::memslots::MemslotListener) on every
    /// managed one.
    ///
    /// # Errors
    ///
    /// `/dev/kvm` missing or unusable, a KVM call failing, or a map that
    /// may need more slots than `KVM_CAP_NR_MEMSLOTS`.
    pub fn with_memory(memory: &GuestMemoryMap) -> Result<Self, VmError> {
        Self::with_unassigned(memory, Arc::new(UnassignedMemory::for_map(memory)))
    }

    /// A VM for `memory` whose accesses outside every slot go to
    /// `unassigned` (which may outlive the VM, e.g. to count across
    /// reboots).
    pub fn with_unassigned(memory: &GuestMemoryMap, unassigned: Arc<UnassignedMemory>) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(|e| VmError::Open(e.into()))?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        let nr_memslots = kvm.get_nr_memslots();
        let fd = kvm.create_vm().map_err(kvm_error("KVM_CREATE_VM"))?;
        zap_only_deleted_slots(&fd)?;
        let handle = Arc::new(VmHandle {
            fd,
            memory: memory.clone(),
        });
        let backend = Arc::new(KvmSlots { vm: handle.clone() });
        let memslots = Memslots::attach(memory, backend, nr_memslots)?;
        Ok(Self {
            memslots: Arc::new(memslots),
            unassigned,
            handle,
            kvm,
            nr_memslots,
        })
    }

    /// `KVM_CAP_NR_MEMSLOTS`: how many memory slots this host's KVM gives
    /// a VM.
    pub fn nr_memslots(&self) -> usize {
        self.nr_memslots
    }

    /// The VM's memory slots.
    pub fn memslots(&self) -> &Memslots {
        &self.memslots
    }

    /// The memory slots, shared (a migration's precopy reads their dirty
    /// log from a thread of its own).
    pub fn memslots_shared(&self) -> Arc<Memslots> {
        self.memslots.clone()
    }

    /// The handler of accesses outside every slot, with its counters.
    pub fn unassigned(&self) -> &Arc<UnassignedMemory> {
        &self.unassigned
    }

    /// The guest memory map.
    pub fn memory(&self) -> &GuestMemoryMap {
        &self.handle.memory
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd and its memory, for the interrupt and ioeventfd plumbing.
    pub(crate) fn handle(&self) -> &Arc<VmHandle> {
        &self.handle
    }

    /// The PC platform in the kernel: the TSS and identity-map pages KVM
    /// needs on Intel (placed just below the IOAPIC-free top of 4 GiB), the
    /// dual 8259 and IOAPIC (`KVM_CREATE_IRQCHIP`) and the PIT
    /// (`KVM_CREATE_PIT2`). Call once, before creating vCPUs.
    pub fn create_platform(&self) -> Result<(), VmError> {
        let fd = &self.handle.fd;
        fd.set_identity_map_address(0xfffb_c000)
            .map_err(kvm_error("KVM_SET_IDENTITY_MAP_ADDR(0xfffbc000)"))?;
        fd.set_tss_address(0xfffb_d000)
            .map_err(kvm_error("KVM_SET_TSS_ADDR(0xfffbd000)"))?;
        fd.create_irq_chip().map_err(kvm_error("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_bindings::kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_error("KVM_CREATE_PIT2"))
    }

    /// Saves the in-kernel platform's state: `KVM_GET_PIT2`,
    /// `KVM_GET_IRQCHIP` of the master and slave 8259 and the IOAPIC, and
    /// `KVM_GET_CLOCK`. The vCPUs should be paused.
    ///
    /// # Errors
    ///
    /// A KVM call failing (no [`create_platform`](Self::create_platform)).
    pub fn save_platform(&self) -> Result<PlatformState, VmError> {
        let fd = &self.handle.fd;
        let pit = fd.get_pit2().map_err(kvm_error("KVM_GET_PIT2"))?;
        let chip = |chip_id: u32, name: &str| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            fd.get_irqchip(&mut chip)
                .map_err(kvm_error(format!("KVM_GET_IRQCHIP({name})")))?;
            Ok::<_, VmError>(to_bytes(&chip))
        };
        let pic_master = chip(KVM_IRQCHIP_PIC_MASTER, "PIC master")?;
        let pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE, "PIC slave")?;
        let ioapic = chip(KVM_IRQCHIP_IOAPIC, "IOAPIC")?;
        let clock = fd.get_clock().map_err(kvm_error("KVM_GET_CLOCK"))?;
        Ok(PlatformState {
            pit: to_bytes(&pit),
            pic_master,
            pic_slave,
            ioapic,
            clock: to_bytes(&clock),
        })
    }

    /// Restores the PIT (`KVM_SET_PIT2`), then the master and slave 8259
    /// and the IOAPIC (`KVM_SET_IRQCHIP`), after
    /// [`create_platform`](Self::create_platform) and before the vCPUs
    /// are restored. Not the clock: [`set_clock`](Self::set_clock) sets
    /// it just before the vCPUs run again, so the time the restore takes
    /// does not show in the guest's clock.
    ///
    /// # Errors
    ///
    /// A field of the wrong size or holding another chip (nothing is set
    /// then), a KVM call
    /// failing.
    pub fn restore_platform(&self, state: &PlatformState) -> Result<(), VmError> {
        let pit: kvm_pit_state2 = from_bytes("pit", &state.pit)?;
        let chips: [(&'static str, &[u8], u32); 3] = [
            ("pic_master", &state.pic_master, KVM_IRQCHIP_PIC_MASTER),
            ("pic_slave", &state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            ("ioapic", &state.ioapic, KVM_IRQCHIP_IOAPIC),
        ];
        let mut decoded = Vec::with_capacity(chips.len());
        for (field, bytes, chip_id) in chips {
            let chip: kvm_irqchip = from_bytes(field, bytes)?;
            if chip.chip_id != chip_id {
                return Err(StateError::Invalid {
                    field,
                    why: format!("it is the state of irqchip {}, not {chip_id}", chip.chip_id),
                }
                .into());
            }
            decoded.push((field, chip));
        }
        let fd = &self.handle.fd;
        fd.set_pit2(&pit).map_err(kvm_error("KVM_SET_PIT2"))?;
        for (field, chip) in &decoded {
            fd.set_irqchip(chip)
                .map_err(kvm_error(format!("KVM_SET_IRQCHIP({field})")))?;
        }
        Ok(())
    }

    /// Sets kvmclock to the saved `state.clock` (`KVM_SET_CLOCK`). Where
    /// the saved clock has `KVM_CLOCK_REALTIME`, it goes with its
    /// `realtime` stamp and KVM adds the wall-clock time since the save;
    /// otherwise the clock resumes at the saved value (flags 0).
    ///
    /// # Errors
    ///
    /// A clock of the wrong size, the KVM call failing.
    pub fn set_clock(&self, state: &PlatformState) -> Result<(), VmError> {
        let saved: kvm_clock_data = from_bytes("clock", &state.clock)?;
        let realtime = saved.flags & KVM_CLOCK_REALTIME != 0;
        let clock = kvm_clock_data {
            clock: saved.clock,
            flags: if realtime { KVM_CLOCK_REALTIME } else { 0 },
            realtime: if realtime { saved.realtime } else { 0 },
            ..Default::default()
        };
        self.handle.fd.set_clock(&clock).map_err(kvm_error(format!(
            "KVM_SET_CLOCK({:#x}, flags {:#x})",
            clock.clock, clock.flags
        )))
    }

    /// Creates vCPU `id` as KVM makes it, for the caller to configure
    /// (CPUID, MSRs, registers): see [`crate::x86::cpu`].
    pub fn create_bare_vcpu(&self, id: u64) -> Result<Vcpu, VmError> {
        let fd = self
            .handle
            .fd
            .create_vcpu(id)
            .map_err(kvm_error(format!("KVM_CREATE_VCPU({id})")))?;
        Ok(Vcpu {
            fd,
            id,
            unassigned: self.unassigned.clone(),
            msrs: None,
            _vm: self.handle.clone(),
        })
    }

    /// Creates vCPU `id` with the CPUID KVM supports (which 64-bit mode
    /// needs). Each id can be created once per VM.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, VmError> {
        let fd = self
            .handle
            .fd
            .create_vcpu(id)
            .map_err(kvm_error(format!("KVM_CREATE_VCPU({id})")))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("KVM_GET_SUPPORTED_CPUID"))?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_error(format!("KVM_SET_CPUID2 of vCPU {id}")))?;
        Ok(Vcpu {
            fd,
            id,
            unassigned: self.unassigned.clone(),
            msrs: None,
            _vm: self.handle.clone(),
        })
    }
}

/// Where a vCPU starts in 64-bit mode: paging on with the tables at `cr3`
/// (which must map `rip` and everything the guest touches), flat 64-bit
/// code and data segments, interrupts off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongModeEntry {
    /// Guest-physical address of the PML4 table.
    pub cr3: u64,
    /// First instruction.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
}

/// A guest write to an I/O port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortWrite {
    /// The port.
    pub port: u16,
    /// The bytes written (1, 2 or 4).
    pub data: Vec<u8>,
}

/// What a vCPU did until it halted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Port writes, in order.
    pub port_writes: Vec<PortWrite>,
    /// Port reads (answered with all ones).
    pub port_reads: u64,
    /// MMIO reads (answered as unassigned memory).
    pub mmio_reads: u64,
    /// MMIO writes (dropped as unassigned memory).
    pub mmio_writes: u64,
    /// Exits to the VMM, the final `hlt` included.
    pub exits: u64,
}

/// One vCPU of a [`Vm`].
pub struct Vcpu {
    // Dropped before the memory the VM's slots point into.
    fd: VcpuFd,
    id: u64,
    unassigned: Arc<UnassignedMemory>,
    /// See [`migratable_msrs`](Vcpu::migratable_msrs).
    msrs: Option<Vec<u32>>,
    _vm: Arc<VmHandle>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

/// A flat segment: base 0, 4 GiB limit, present, ring 0.
fn flat_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

impl Vcpu {
    /// The vCPU's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The vCPU fd, to configure it.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU fd, to run it.
    pub(crate) fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// The MSRs this vCPU's state saves
    /// ([`migratable_msrs`](crate::x86::state::migratable_msrs)), found
    /// at the first call: that takes a `KVM_GET_MSRS` per candidate MSR,
    /// which a save while the guest is paused should not wait for (the
    /// vCPU threads ask before the guest runs).
    ///
    /// # Errors
    ///
    /// `/dev/kvm` cannot be opened.
    pub fn migratable_msrs(&mut self) -> Result<&[u32], String> {
        if self.msrs.is_none() {
            let started = std::time::Instant::now();
            let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
            let msrs = crate::x86::state::migratable_msrs(&kvm, &self.fd);
            log::debug!(
                "vCPU {}: {} migratable MSRs, found in {:?}",
                self.id,
                msrs.len(),
                started.elapsed()
            );
            self.msrs = Some(msrs);
        }
        Ok(self.msrs.as_deref().unwrap_or_default())
    }

    /// Saves this vCPU's state ([`save_vcpu`](crate::x86::state::save_vcpu)
    /// with the MSRs `msrs`), its id included. The vCPU must not be
    /// running.
    pub fn save_state(&self, msrs: &[u32]) -> Result<VcpuState, StateError> {
        let mut state = crate::x86::state::save_vcpu(&self.fd, msrs)?;
        state.id = self.id;
        Ok(state)
    }

    /// Restores `state`, which must be this vCPU id's
    /// ([`restore_vcpu`](crate::x86::state::restore_vcpu)).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), StateError> {
        if state.id != self.id {
            return Err(StateError::WrongVcpu {
                state: state.id,
                vcpu: self.id,
            });
        }
        crate::x86::state::restore_vcpu(&self.fd, state)
    }

    /// The guest's instruction pointer now (0 if it cannot be read).
    pub fn rip(&self) -> u64 {
        self.fd.get_regs().map_or(0, |r| r.rip)
    }

    /// Where the vCPU is, for a log line: RIP, RSP, CR0, CR2, CR3, CR4, EFER
    /// and the IDT's base (or why they cannot be read).
    pub fn describe(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip {:#x} rsp {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}+{:#x}",
                r.rip, r.rsp, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
        }
    }

    /// Puts the vCPU in 64-bit mode at `entry`, all general registers 0.
    pub fn enter_long_mode(&mut self, entry: LongModeEntry) -> Result<(), VmError> {
        let id = self.id;
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(kvm_error(format!("KVM_GET_SREGS of vCPU {id}")))?;
        sregs.cs = flat_segment(0x08, 0xb, true);
        let data = flat_segment(0x10, 0x3, false);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: 0,
            limit: 0x67,
            selector: 0x18,
            type_: 0xb, // 64-bit busy TSS
            present: 1,
            s: 0,
            ..data
        };
        sregs.cr3 = entry.cr3;
        sregs.cr4 = CR4_PAE;
        sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
        sregs.efer = EFER_LME | EFER_LMA;
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_error(format!("KVM_SET_SREGS of vCPU {id}")))?;
        let regs = kvm_bindings::kvm_regs {
            rip: entry.rip,
            rsp: entry.rsp,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(kvm_error(format!("KVM_SET_REGS of vCPU {id}")))
    }

    /// Runs the vCPU until the guest executes `hlt`, for at most
    /// `max_exits` exits. MMIO goes to [`UnassignedMemory`]; port writes
    /// are recorded, port reads answered with all ones.
    ///
    /// # Errors
    ///
    /// `KVM_RUN` failing (other than by a signal), an exit the runner does
    /// not handle (a triple fault is `Shutdown`, a failed VM entry
    /// `FailEntry`), or too many exits.
    pub fn run(&mut self, max_exits: u64) -> Result<RunReport, VmError> {
        let mut report = RunReport::default();
        while report.exits < max_exits {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return Err(VmError::Run {
                        vcpu: self.id,
                        rip: self.rip(),
                        source: e.into(),
                    });
                }
            };
            report.exits += 1;
            let stopped = match exit {
                VcpuExit::Hlt => return Ok(report),
                VcpuExit::IoOut(port, data) => {
                    report.port_writes.push(PortWrite {
                        port,
                        data: data.to_vec(),
                    });
                    None
                }
                VcpuExit::IoIn(_, data) => {
                    data.fill(0xff);
                    report.port_reads += 1;
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.unassigned.read(addr, data);
                    report.mmio_reads += 1;
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.unassigned.write(addr, data);
                    report.mmio_writes += 1;
                    None
                }
                VcpuExit::Intr => None,
                other => Some(format!("{other:?}")),
            };
            if let Some(exit) = stopped {
                return Err(VmError::Stopped {
                    vcpu: self.id,
                    exit,
                    rip: self.rip(),
                });
            }
        }
        Err(VmError::TooManyExits {
            vcpu: self.id,
            limit: max_exits,
            rip: self.rip(),
        })
    }
}
