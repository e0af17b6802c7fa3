//! The `DmaMapper` abstraction: what a DMA-capable device's IOMMU context
//! (a VFIO container, a userspace backend's pinned buffer table) offers.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::distinct::RangeCounts;

/// What a device may do with a mapping: read it, write it, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Permissions {
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

impl Permissions {
    /// Read and write.
    pub const READ_WRITE: Permissions = Permissions {
        read: true,
        write: true,
    };
    /// Read only.
    pub const READ: Permissions = Permissions {
        read: true,
        write: false,
    };
}

/// An inclusive range of usable IOVAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaRange {
    /// First usable IOVA.
    pub start: u64,
    /// Last usable IOVA (inclusive).
    pub end: u64,
}

/// What a mapper can take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaLimits {
    /// Most mappings that may exist at once (VFIO type1's `dma_entry_limit`
    /// defaults to 65535).
    pub max_mappings: u64,
    /// Supported page sizes as a bit mask (bit n set: 2^n-byte pages);
    /// mappings must be aligned to the smallest.
    pub page_sizes: u64,
    /// The IOVA ranges mappings may use.
    pub iova_ranges: Vec<IovaRange>,
}

impl DmaLimits {
    /// The smallest supported page size.
    pub fn min_page_size(&self) -> u64 {
        1 << self.page_sizes.trailing_zeros().min(63)
    }
}

/// Errors of a [`DmaMapper`].
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The mapping would take pinned memory past the VM's budget.
    #[error(
        "pin budget exceeded: mapping {len:#x} bytes at iova {iova:#x} would pin {would:#x} bytes, budget {budget:#x}"
    )]
    BudgetExceeded {
        /// IOVA of the refused mapping.
        iova: u64,
        /// Its length.
        len: u64,
        /// Pinned bytes it would have led to.
        would: u64,
        /// The budget.
        budget: u64,
    },
    /// Address, length or host address not aligned to the page size, or empty.
    #[error("mapping iova {iova:#x} host {host:#x} len {len:#x} is empty or not aligned to {page_size:#x}")]
    Unaligned {
        /// IOVA.
        iova: u64,
        /// Host address.
        host: u64,
        /// Length.
        len: u64,
        /// Required alignment.
        page_size: u64,
    },
    /// The IOVA range overlaps an existing mapping.
    #[error("iova range [{iova:#x}, +{len:#x}) overlaps the mapping at {existing:#x}")]
    Overlap {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// Start of the mapping it overlaps.
        existing: u64,
    },
    /// An unmap would split a mapping.
    #[error("unmap of [{iova:#x}, +{len:#x}) would split the mapping [{start:#x}, +{mapping_len:#x})")]
    Split {
        /// IOVA of the unmap.
        iova: u64,
        /// Length of the unmap.
        len: u64,
        /// Start of the mapping it would split.
        start: u64,
        /// Length of that mapping.
        mapping_len: u64,
    },
    /// The mapper has no room for more mappings.
    #[error("mapping limit reached: {limit} mappings")]
    TooManyMappings {
        /// The limit.
        limit: u64,
    },
    /// The IOVA range is outside the usable ranges.
    #[error("iova range [{iova:#x}, +{len:#x}) is outside the usable IOVA ranges")]
    IovaOutOfRange {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// The kernel refused.
    #[error("{op} of iova {iova:#x} len {len:#x} failed: {source}")]
    Os {
        /// What was attempted.
        op: &'static str,
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// The error.
        source: std::io::Error,
    },
}

/// Names a mapping made by [`PinSession::pin`] for [`PinSession::unpin`];
/// its meaning is the session's own (a slot of its table, say), so that
/// undoing the mapping needs no search. Valid until that unpin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PinKey(pub u64);

/// Mappings of one consumer that keeps its own record of each of them, and
/// orders its own calls: the vIOMMU bridge, whose IOMMU refuses overlapping
/// mappings and names each one in its unmap, and which pins and unpins
/// under its own lock. Made by [`DmaMapper::session`].
///
/// # Contract
///
/// * `pin` maps and pins `[host, host + len)` at `iova` all or nothing,
///   charging the mapper's budget and mapping limit exactly as
///   [`DmaMapper::map`] does, and counted in its `pinned_bytes` and
///   `mapping_count`; it returns a [`PinKey`].
/// * `unpin` with that key and the same `iova` and `len` unmaps and unpins
///   exactly that mapping before returning, and refunds it; it returns the
///   bytes unpinned (0, with nothing changed, for a key that names no live
///   mapping of that `iova` and `len`).
/// * A session may keep its mappings out of the IOVA index of the mapper's
///   `map` and `unmap`, and take no lock of the mapper's (its `&mut self`
///   says the caller orders the calls): then `map` does not check them for
///   overlaps and `unmap` does not remove them.
/// * Dropping a session unpins whatever it still holds.
pub trait PinSession: Send {
    /// Maps and pins; see the trait documentation.
    fn pin(&mut self, iova: u64, host: u64, len: u64, access: Permissions) -> Result<PinKey, DmaError>;

    /// Undoes the `pin` that returned `key` for `iova` and `len`.
    fn unpin(&mut self, key: PinKey, iova: u64, len: u64) -> Result<u64, DmaError>;
}

/// The default [`DmaMapper::session`]: `pin` and `unpin` are the mapper's
/// `map` and `unmap` (under whatever lock the mapper takes), and the
/// session remembers its mappings only to unmap them when dropped.
pub(crate) fn mapper_session<M: DmaMapper + ?Sized + 'static>(mapper: Arc<M>) -> Box<dyn PinSession> {
    Box::new(MapperSession {
        mapper,
        live: Vec::new(),
        vacant: Vec::new(),
    })
}

/// The session [`mapper_session`] makes.
struct MapperSession<M: DmaMapper + ?Sized> {
    mapper: Arc<M>,
    /// The live mappings (`iova`, `len`), by key.
    live: Vec<Option<(u64, u64)>>,
    vacant: Vec<usize>,
}

impl<M: DmaMapper + ?Sized> PinSession for MapperSession<M> {
    fn pin(&mut self, iova: u64, host: u64, len: u64, access: Permissions) -> Result<PinKey, DmaError> {
        self.mapper.map(iova, host, len, access)?;
        let key = match self.vacant.pop() {
            Some(key) => {
                self.live[key] = Some((iova, len));
                key
            }
            None => {
                self.live.push(Some((iova, len)));
                self.live.len() - 1
            }
        };
        Ok(PinKey(key as u64))
    }

    fn unpin(&mut self, key: PinKey, iova: u64, len: u64) -> Result<u64, DmaError> {
        let Some(entry) = usize::try_from(key.0).ok().and_then(|k| self.live.get_mut(k)) else {
            return Ok(0);
        };
        if *entry != Some((iova, len)) {
            return Ok(0);
        }
        let unmapped = self.mapper.unmap(iova, len)?;
        *entry = None;
        self.vacant.push(key.0 as usize);
        Ok(unmapped)
    }
}

impl<M: DmaMapper + ?Sized> Drop for MapperSession<M> {
    fn drop(&mut self) {
        for (iova, len) in self.live.drain(..).flatten() {
            if let Err(e) = self.mapper.unmap(iova, len) {
                log::error!(
                    "{}: unmapping iova {iova:#x} (+{len:#x}) failed: {e}",
                    self.mapper.name()
                );
            }
        }
    }
}

/// A DMA address space that pins what it maps.
///
/// # Contract
///
/// * `map` makes `[host, host + len)` reachable by the device at
///   `[iova, iova + len)` and pins it. It is all or nothing: on error
///   nothing stays mapped or pinned. The caller guarantees the host range
///   is mapped memory that stays mapped until `unmap` (memvisor guarantees
///   that it is populated guest RAM — DESIGN.md rule 1).
/// * `unmap` removes every mapping lying wholly inside `[iova, iova + len)`
///   and unpins it before returning; holes are fine; a range that would
///   split a mapping fails with [`DmaError::Split`] and changes nothing.
/// * `pinned_bytes` is exact at every moment no call is in progress; it
///   and `mapping_count` include the mappings of the mapper's sessions.
/// * `session` makes a [`PinSession`]: see its contract.
pub trait DmaMapper: Send + Sync + 'static {
    /// Short name for errors and logs.
    fn name(&self) -> &str;

    /// Maps and pins; see the trait documentation.
    fn map(&self, iova: u64, host: u64, len: u64, access: Permissions) -> Result<(), DmaError>;

    /// Unmaps and unpins; returns the bytes unmapped.
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError>;

    /// A [`PinSession`] for one consumer that orders its own calls. The
    /// default pins through [`map`](Self::map) and
    /// [`unmap`](Self::unmap); a mapper may give a session state of its
    /// own, so that its pins take no lock of the mapper's and no search.
    fn session(self: Arc<Self>) -> Box<dyn PinSession> {
        mapper_session(self)
    }

    /// What the mapper can take.
    fn limits(&self) -> DmaLimits;

    /// Bytes currently pinned by this mapper.
    fn pinned_bytes(&self) -> u64;

    /// Mappings currently live.
    fn mapping_count(&self) -> u64;
}

/// A per-VM limit on pinned bytes, shared by every mapper of the VM and
/// enforced by memvisor itself (the process has `CAP_IPC_LOCK`, so the
/// kernel's `RLIMIT_MEMLOCK` does not bound it).
///
/// Two figures: [`used`](Self::used), every pin's bytes summed — what the
/// kernel accounts (`VmLck`, `VmPin`), counting a page as often as devices
/// map it — and, for a limited budget, [`distinct`](Self::distinct), the
/// bytes of guest memory pinned at least once. The limit applies to the
/// distinct bytes: a second device mapping pages the first pins costs
/// nothing (where libvirt must allow N × guest memory for N devices). An
/// unlimited budget only sums, which keeps the pinning path at one atomic
/// add.
pub struct PinBudget {
    used: AtomicU64,
    /// For a limited budget: the limit, and the pins by host address.
    limited: Option<(u64, Mutex<RangeCounts>)>,
}

impl fmt::Debug for PinBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinBudget")
            .field("limit", &self.limit())
            .field("used", &self.used())
            .field("distinct", &self.distinct())
            .finish()
    }
}

impl PinBudget {
    /// A budget of `limit` distinct bytes.
    pub fn limited(limit: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            limited: Some((limit, Mutex::new(RangeCounts::default()))),
        }
    }

    /// No limit (VFIO's behaviour with `CAP_IPC_LOCK`): a real guest's
    /// whole RAM may be pinned.
    pub fn unlimited() -> Self {
        Self {
            used: AtomicU64::new(0),
            limited: None,
        }
    }

    /// The limit, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limited.as_ref().map(|(limit, _)| *limit)
    }

    /// Bytes charged now, every pin counted (what the kernel accounts).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Bytes of memory pinned at least once, for a limited budget (`None`
    /// for an unlimited one, which does not track them).
    pub fn distinct(&self) -> Option<u64> {
        self.limited.as_ref().map(|(_, d)| lock(d).covered())
    }

    /// Charges `bytes` of host memory at `host` for the mapping at `iova`,
    /// or fails without charging anything if the distinct bytes would
    /// exceed the limit.
    #[inline]
    pub fn charge(&self, iova: u64, host: u64, bytes: u64) -> Result<(), DmaError> {
        let Some((budget, distinct)) = &self.limited else {
            // Nothing to refuse: one atomic add.
            self.used.fetch_add(bytes, Ordering::AcqRel);
            return Ok(());
        };
        let budget = *budget;
        let mut distinct = lock(distinct);
        let would = distinct.covered() + distinct.uncovered_in(host, bytes);
        if would > budget {
            return Err(DmaError::BudgetExceeded {
                iova,
                len: bytes,
                would,
                budget,
            });
        }
        distinct.add(host, bytes);
        self.used.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    /// Returns the `bytes` at `host` of one earlier charge to the budget.
    #[inline]
    pub fn release(&self, host: u64, bytes: u64) {
        if let Some((_, distinct)) = &self.limited {
            lock(distinct).remove(host, bytes);
        }
        let previous = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(previous >= bytes, "pin budget released more than charged");
    }
}

fn lock(counts: &Mutex<RangeCounts>) -> std::sync::MutexGuard<'_, RangeCounts> {
    counts.lock().unwrap_or_else(|p| p.into_inner())
}

/// `VmPin` of this process in KiB, from `/proc/self/status`: what the
/// kernel counts as long-term pinned.
pub fn vm_pin_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| proc_kib(&s, "VmPin"))
        .unwrap_or(0)
}

/// The value of the `field:   N kB` line of a `/proc` file's text
/// (`/proc/<pid>/status`, `/proc/meminfo`), in KiB.
pub fn proc_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_kib_reads_one_field() {
        let text = "MemTotal:       24576000 kB\nVmPinned:   9 kB\nVmPin:\t   8 kB\n";
        assert_eq!(proc_kib(text, "MemTotal"), Some(24_576_000));
        assert_eq!(proc_kib(text, "VmPin"), Some(8), "not the VmPinned line");
        assert_eq!(proc_kib(text, "VmLck"), None);
    }

    #[test]
    fn budget_charges_and_refuses() {
        let b = PinBudget::limited(8192);
        b.charge(0, 0x10_0000, 4096).unwrap();
        b.charge(0x1000, 0x10_1000, 4096).unwrap();
        let err = b.charge(0x2000, 0x10_2000, 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pin budget exceeded: mapping 0x1 bytes at iova 0x2000 would pin 0x2001 bytes, budget 0x2000"
        );
        assert_eq!((b.used(), b.distinct()), (8192, Some(8192)));
        b.release(0x10_0000, 4096);
        b.charge(0x2000, 0x10_2000, 4096).unwrap();
        let u = PinBudget::unlimited();
        u.charge(0, 0, u64::MAX / 2).unwrap();
        assert_eq!((u.limit(), u.distinct()), (None, None));
    }

    /// Devices mapping the same guest pages (at their own IOVAs) pin them
    /// again in the kernel, but the budget counts them once.
    #[test]
    fn the_budget_counts_each_host_page_once() {
        let b = PinBudget::limited(8192);
        b.charge(0x1000, 0x10_0000, 8192).unwrap();
        // A second device maps both pages, a third the second page: free.
        b.charge(0x5000, 0x10_0000, 8192).unwrap();
        b.charge(0x9000, 0x10_1000, 4096).unwrap();
        assert_eq!((b.used(), b.distinct()), (5 * 4096, Some(8192)));
        // A new page is over the limit.
        assert!(b.charge(0xa000, 0x10_2000, 4096).is_err());
        // The pages stay counted until their last pin goes.
        b.release(0x10_0000, 8192);
        b.release(0x10_0000, 8192);
        assert_eq!((b.used(), b.distinct()), (4096, Some(4096)));
        b.charge(0xa000, 0x10_2000, 4096).unwrap();
        b.release(0x10_1000, 4096);
        b.release(0x10_2000, 4096);
        assert_eq!((b.used(), b.distinct()), (0, Some(0)));
    }

    /// A mapper that only records its mappings, to test the default
    /// session.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<(u64, u64)>>);

    impl DmaMapper for Recorder {
        fn name(&self) -> &str {
            "recorder"
        }

        fn map(&self, iova: u64, _host: u64, len: u64, _access: Permissions) -> Result<(), DmaError> {
            self.0.lock().unwrap().push((iova, len));
            Ok(())
        }

        fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
            let mut live = self.0.lock().unwrap();
            let before = live.len();
            live.retain(|&m| m != (iova, len));
            Ok(if live.len() < before { len } else { 0 })
        }

        fn limits(&self) -> DmaLimits {
            DmaLimits {
                max_mappings: u64::MAX,
                page_sizes: 4096,
                iova_ranges: Vec::new(),
            }
        }

        fn pinned_bytes(&self) -> u64 {
            self.0.lock().unwrap().iter().map(|&(_, len)| len).sum()
        }

        fn mapping_count(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
    }

    #[test]
    fn the_default_session_maps_and_unmaps() {
        let mapper = Arc::new(Recorder::default());
        let mut session = mapper.clone().session();
        let a = session.pin(0x1000, 0, 0x1000, Permissions::READ).unwrap();
        let b = session.pin(0x4000, 0, 0x2000, Permissions::READ).unwrap();
        assert_ne!(a, b);
        assert_eq!(mapper.pinned_bytes(), 0x3000);
        // Only the key's own mapping, with its addresses, and only once.
        assert_eq!(session.unpin(a, 0x4000, 0x2000).unwrap(), 0);
        assert_eq!(session.unpin(a, 0x1000, 0x1000).unwrap(), 0x1000);
        assert_eq!(session.unpin(a, 0x1000, 0x1000).unwrap(), 0);
        // A freed key is reused; dropping the session unmaps the rest.
        let c = session.pin(0x8000, 0, 0x1000, Permissions::READ).unwrap();
        assert_eq!(c, a);
        drop(session);
        assert_eq!((mapper.pinned_bytes(), mapper.mapping_count()), (0, 0));
        let _ = b;
    }
}
