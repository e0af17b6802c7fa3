//! Guest accesses that land outside every KVM memory slot, answered as
//! unassigned memory (rule 7 of `docs/design.md`).
//!
//! Only plugged virtio-mem blocks have memory slots, so a guest that
//! touches an unplugged block exits to the VMM with `KVM_EXIT_MMIO`, as it
//! does for any address no slot and no device claims. [`UnassignedMemory`]
//! answers such an access the way a bus with nothing behind it does:
//!
//! * a read returns all ones (`0xff` in every byte);
//! * a write is dropped: nothing is stored, and above all nothing
//!   re-populates the discarded memory behind the address;
//! * each access is counted, per virtio-mem region (reads and writes) and
//!   for everything outside guest RAM;
//! * each access may be logged, but a guest can provoke these at will, so
//!   at most one warning is written per second, and it says how many
//!   accesses went unlogged since the previous one.
//!
//! ```
//! use memvisor_memory::GuestRange;
//! use memvisor_vmm::unassigned::{AccessCounts, UnassignedMemory};
//!
//! let mut unassigned = UnassignedMemory::new();
//! unassigned.add_region("vmem0", GuestRange::new(1 << 32, 1 << 30).unwrap());
//! let mut data = [0u8; 8];
//! unassigned.read((1 << 32) + 0x1000, &mut data);
//! assert_eq!(data, [0xff; 8]);
//! unassigned.write((1 << 32) + 0x1000, &[1, 2, 3, 4]);
//! unassigned.write(0xfee0_0000, &[0; 4]);
//! assert_eq!(unassigned.counts_at(1 << 32), AccessCounts { reads: 1, writes: 1 });
//! assert_eq!(unassigned.outside_counts(), AccessCounts { reads: 0, writes: 1 });
//! ```

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memvisor_memory::GuestRange;
use memvisor_memory::map::GuestMemoryMap;

/// What a guest read of unassigned memory returns in every byte.
pub const UNASSIGNED_BYTE: u8 = 0xff;

/// The shortest time between two warnings.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(1);

/// Reads and writes counted for one part of the address space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessCounts {
    /// Guest reads answered with all ones.
    pub reads: u64,
    /// Guest writes dropped.
    pub writes: u64,
}

impl fmt::Display for AccessCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} reads, {} writes", self.reads, self.writes)
    }
}

/// The counters of one part of the address space.
#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
}

impl Counters {
    fn get(&self) -> AccessCounts {
        AccessCounts {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
        }
    }
}

/// A region whose unassigned accesses are counted on their own.
#[derive(Debug)]
struct Bucket {
    name: String,
    range: GuestRange,
    counters: Counters,
}

/// Lets one warning through per interval and counts the ones it holds back.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    state: Mutex<LimiterState>,
}

#[derive(Debug, Default)]
struct LimiterState {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimiter {
    /// A limiter that lets one warning through per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(LimiterState::default()),
        }
    }

    /// May a warning be written at `now`? `Some(n)` if so, where `n`
    /// warnings were held back since the last one let through; `None` (and
    /// one more held back) if not. Time going backwards (an `Instant` from
    /// another thread that read the clock earlier) holds the warning back.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let due = match state.last {
            None => true,
            Some(last) => now.checked_duration_since(last).is_some_and(|d| d >= self.interval),
        };
        if due {
            state.last = Some(now);
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

/// A guest access to unassigned memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read, answered with all ones.
    Read,
    /// A write, dropped.
    Write,
}

/// Answers, counts and logs guest accesses outside every memory slot; see
/// the [module documentation](self). Shared by every vCPU of a VM.
#[derive(Debug)]
pub struct UnassignedMemory {
    regions: Vec<Bucket>,
    outside: Counters,
    limiter: RateLimiter,
    warnings: AtomicU64,
}

impl Default for UnassignedMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl UnassignedMemory {
    /// A handler with no region of its own: every access counts as outside
    /// guest RAM.
    pub fn new() -> Self {
        Self {
            regions: Vec::new(),
            outside: Counters::default(),
            limiter: RateLimiter::new(WARNING_INTERVAL),
            warnings: AtomicU64::new(0),
        }
    }

    /// A handler that counts each managed (virtio-mem) region of `map` on
    /// its own, under the name of its RAM block.
    pub fn for_map(map: &GuestMemoryMap) -> Self {
        let mut this = Self::new();
        for region in map.regions().iter().filter(|r| r.manager().is_some()) {
            this.add_region(region.block().name(), region.range());
        }
        this
    }

    /// Counts accesses inside `range` on their own, as `name`. A range
    /// that overlaps one already added only gets the accesses the earlier
    /// one does not.
    pub fn add_region(&mut self, name: &str, range: GuestRange) {
        self.regions.push(Bucket {
            name: name.to_string(),
            range,
            counters: Counters::default(),
        });
    }

    fn bucket(&self, addr: u64) -> Option<&Bucket> {
        self.regions
            .iter()
            .find(|b| b.range.start() <= addr && addr < b.range.end())
    }

    /// A guest read of `data.len()` bytes at `addr`: fills `data` with all
    /// ones and counts it.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        data.fill(UNASSIGNED_BYTE);
        self.record(Access::Read, addr, data.len(), Instant::now());
    }

    /// A guest write of `data` at `addr`: drops it and counts it.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.record(Access::Write, addr, data.len(), Instant::now());
    }

    /// Counts one access and logs it if the rate limit allows at `now`.
    fn record(&self, access: Access, addr: u64, len: usize, now: Instant) {
        let bucket = self.bucket(addr);
        let counters = bucket.map_or(&self.outside, |b| &b.counters);
        match access {
            Access::Read => counters.reads.fetch_add(1, Ordering::Relaxed),
            Access::Write => counters.writes.fetch_add(1, Ordering::Relaxed),
        };
        if let Some(suppressed) = self.limiter.check(now) {
            self.warnings.fetch_add(1, Ordering::Relaxed);
            log::warn!("{}", Self::message(access, addr, len, bucket, suppressed));
        }
    }

    /// The warning for one access.
    fn message(access: Access, addr: u64, len: usize, bucket: Option<&Bucket>, suppressed: u64) -> String {
        let what = match access {
            Access::Read => "read",
            Access::Write => "write",
        };
        let answer = match access {
            Access::Read => "answered with all ones",
            Access::Write => "dropped",
        };
        let place = match bucket {
            Some(b) => format!("unplugged memory of '{}' {}", b.name, b.range),
            None => "no RAM and no device".to_string(),
        };
        let mut message = format!("guest {what} of {len} bytes at {addr:#x} hits {place}: {answer}");
        if suppressed > 0 {
            message.push_str(&format!(
                " ({suppressed} more unassigned accesses since the last warning were not logged)"
            ));
        }
        message
    }

    /// Accesses counted for the region holding `addr`, or outside guest
    /// RAM if no region of this handler holds it.
    pub fn counts_at(&self, addr: u64) -> AccessCounts {
        self.bucket(addr).map_or(&self.outside, |b| &b.counters).get()
    }

    /// Accesses counted for the region named `name`, if there is one.
    pub fn counts_of(&self, name: &str) -> Option<AccessCounts> {
        self.regions.iter().find(|b| b.name == name).map(|b| b.counters.get())
    }

    /// Accesses outside every region of this handler.
    pub fn outside_counts(&self) -> AccessCounts {
        self.outside.get()
    }

    /// Every region with its name and counts, in the order they were added.
    pub fn region_counts(&self) -> Vec<(String, GuestRange, AccessCounts)> {
        self.regions
            .iter()
            .map(|b| (b.name.clone(), b.range, b.counters.get()))
            .collect()
    }

    /// All accesses counted.
    pub fn total(&self) -> AccessCounts {
        let mut total = self.outside.get();
        for b in &self.regions {
            let c = b.counters.get();
            total.reads += c.reads;
            total.writes += c.writes;
        }
        total
    }

    /// Warnings written so far (at most one per [`WARNING_INTERVAL`]).
    pub fn warnings(&self) -> u64 {
        self.warnings.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMEM: u64 = 1 << 32;
    const MIB: u64 = 1 << 20;

    fn handler() -> UnassignedMemory {
        let mut h = UnassignedMemory::new();
        h.add_region("vmem0", GuestRange::new(VMEM, 64 * MIB).unwrap());
        h.add_region("vmem1", GuestRange::new(VMEM + 64 * MIB, 64 * MIB).unwrap());
        h
    }

    #[test]
    fn reads_are_all_ones_of_any_length() {
        let h = handler();
        for len in [0usize, 1, 2, 3, 4, 8, 16, 4096] {
            let mut data = vec![0x5a; len];
            h.read(VMEM + 8, &mut data);
            assert!(data.iter().all(|&b| b == UNASSIGNED_BYTE), "length {len}");
        }
        assert_eq!(h.counts_of("vmem0"), Some(AccessCounts { reads: 8, writes: 0 }));
    }

    #[test]
    fn accesses_are_counted_where_they_land() {
        let h = handler();
        h.write(VMEM, &[1]);
        h.write(VMEM + 64 * MIB - 1, &[1]);
        h.read(VMEM + 64 * MIB, &mut [0; 4]);
        h.write(VMEM + 128 * MIB, &[0; 8]); // just past vmem1
        h.read(0, &mut [0; 1]);
        h.read(u64::MAX, &mut [0; 8]); // an address at the very top is no trouble
        assert_eq!(h.counts_of("vmem0"), Some(AccessCounts { reads: 0, writes: 2 }));
        assert_eq!(h.counts_of("vmem1"), Some(AccessCounts { reads: 1, writes: 0 }));
        assert_eq!(h.counts_of("vmem2"), None);
        assert_eq!(h.outside_counts(), AccessCounts { reads: 2, writes: 1 });
        assert_eq!(h.counts_at(VMEM + 70 * MIB), AccessCounts { reads: 1, writes: 0 });
        assert_eq!(h.counts_at(5), h.outside_counts());
        assert_eq!(h.total(), AccessCounts { reads: 3, writes: 3 });
        let names: Vec<String> = h.region_counts().into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(names, ["vmem0", "vmem1"]);
    }

    #[test]
    fn the_limiter_lets_one_through_per_interval_and_counts_the_rest() {
        let limiter = RateLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(limiter.check(at(0)), Some(0));
        assert_eq!(limiter.check(at(1)), None);
        assert_eq!(limiter.check(at(999)), None);
        assert_eq!(limiter.check(at(1000)), Some(2));
        assert_eq!(limiter.check(at(1500)), None);
        // An instant from before the last warning is held back, not a panic.
        assert_eq!(limiter.check(at(10)), None);
        assert_eq!(limiter.check(at(5000)), Some(2));
        assert_eq!(limiter.check(at(6000)), Some(0));
    }

    #[test]
    fn a_flood_writes_one_warning_per_second() {
        let h = handler();
        let t0 = Instant::now();
        // 10_000 accesses in the first 2.5 simulated seconds: 3 warnings.
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(i * 250);
            h.record(Access::Write, VMEM + i, 8, now);
        }
        assert_eq!(h.warnings(), 3);
        assert_eq!(
            h.counts_of("vmem0"),
            Some(AccessCounts {
                reads: 0,
                writes: 10_000
            })
        );
    }

    #[test]
    fn warnings_name_the_access_the_region_and_what_was_suppressed() {
        let h = handler();
        let vmem0 = h.bucket(VMEM);
        assert_eq!(
            UnassignedMemory::message(Access::Read, VMEM + 0x1000, 8, vmem0, 0),
            "guest read of 8 bytes at 0x100001000 hits unplugged memory of 'vmem0' [0x100000000, 0x104000000): \
             answered with all ones"
        );
        assert_eq!(
            UnassignedMemory::message(Access::Write, 0xfee0_0000, 4, None, 41),
            "guest write of 4 bytes at 0xfee00000 hits no RAM and no device: dropped \
             (41 more unassigned accesses since the last warning were not logged)"
        );
    }

    #[test]
    fn for_map_counts_managed_regions_only() {
        use memvisor_memory::discard::BlockDiscardManager;
        use memvisor_memory::{Backing, RamBlock};
        use std::sync::Arc;
        let boot = Arc::new(RamBlock::new("boot", 2 * MIB, Backing::Memfd).unwrap());
        let hot = Arc::new(RamBlock::new("hot0", 8 * MIB, Backing::Memfd).unwrap());
        let range = GuestRange::new(VMEM, 8 * MIB).unwrap();
        let manager = Arc::new(BlockDiscardManager::new(range, 2 * MIB).unwrap());
        let map = GuestMemoryMap::builder()
            .ram(0, boot)
            .unwrap()
            .managed_ram(VMEM, hot, manager)
            .unwrap()
            .build()
            .unwrap();
        let h = UnassignedMemory::for_map(&map);
        assert_eq!(
            h.region_counts(),
            vec![("hot0".to_string(), range, AccessCounts::default())]
        );
    }
}
