//! [`LoadContext`]: what has been restored so far, for sections to check
//! their predecessors against (DESIGN.md rule 4) — shared by one load,
//! never global.

use std::collections::BTreeSet;
use std::fmt;

use memvisor_memory::GuestRange;
use memvisor_memory::map::GuestMemoryMap;

use crate::error::{SectionError, SectionId};

/// Something a section restores that other sections may depend on; see
/// [`LoadContext`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restores {
    /// The populated state of the discard manager of the RAM region that
    /// covers exactly this range.
    DiscardManager(GuestRange),
    /// The contents of the RAM region that covers exactly this range.
    RamContents(GuestRange),
}

/// The state of one load: which sections were loaded, which section
/// restores which region's discard manager and contents, and the
/// destination's memory map.
#[derive(Clone)]
pub struct LoadContext {
    memory: Option<GuestMemoryMap>,
    loaded: BTreeSet<SectionId>,
    restorers: Vec<(Restores, SectionId)>,
}

impl fmt::Debug for LoadContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadContext")
            .field("loaded", &self.loaded)
            .field("restorers", &self.restorers)
            .finish()
    }
}

/// Which of a region's two restorable parts is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Manager,
    Contents,
}

impl LoadContext {
    /// A context for a load into `memory`, where `restorers` says which
    /// section restores what.
    pub fn new(memory: Option<GuestMemoryMap>, restorers: Vec<(Restores, SectionId)>) -> Self {
        Self {
            memory,
            loaded: BTreeSet::new(),
            restorers,
        }
    }

    /// The destination's guest memory map, if the registry has one.
    pub fn memory(&self) -> Option<&GuestMemoryMap> {
        self.memory.as_ref()
    }

    /// True if `id` was loaded.
    pub fn is_loaded(&self, id: &SectionId) -> bool {
        self.loaded.contains(id)
    }

    /// The sections loaded so far.
    pub fn loaded(&self) -> impl Iterator<Item = &SectionId> + '_ {
        self.loaded.iter()
    }

    pub(crate) fn mark_loaded(&mut self, id: SectionId) {
        self.loaded.insert(id);
    }

    /// Fails with [`SectionError::MissingPredecessor`] unless `needs` was
    /// loaded; `reason` says why `section` needs it.
    pub fn require(
        &self,
        section: &SectionId,
        needs: &SectionId,
        reason: impl fmt::Display,
    ) -> Result<(), SectionError> {
        if self.is_loaded(needs) {
            Ok(())
        } else {
            Err(SectionError::MissingPredecessor {
                section: section.clone(),
                needs: needs.clone(),
                reason: reason.to_string(),
            })
        }
    }

    /// The section that restores the discard manager of the managed region
    /// holding `range`: `Ok(None)` if `range` is not in a managed region.
    /// Fails if the region is managed but no registered section restores
    /// its manager.
    pub fn manager_restorer(&self, range: GuestRange) -> Result<Option<&SectionId>, SectionError> {
        self.restorer(range, Part::Manager)
    }

    /// True if `range` needs no discard manager, or the section restoring
    /// it was loaded.
    pub fn manager_restored(&self, range: GuestRange) -> bool {
        matches!(self.restorer(range, Part::Manager), Ok(None))
            || matches!(self.restorer(range, Part::Manager), Ok(Some(id)) if self.is_loaded(id))
    }

    /// Fails with [`SectionError::MissingPredecessor`], naming the section
    /// that restores it, unless the discard manager of the region holding
    /// `range` (if it has one) was restored.
    pub fn require_manager(
        &self,
        section: &SectionId,
        range: GuestRange,
        reason: impl fmt::Display,
    ) -> Result<(), SectionError> {
        self.require_part(section, range, Part::Manager, reason)
    }

    /// Fails with [`SectionError::MissingPredecessor`], naming the RAM
    /// section, unless the contents of the region holding `range` were
    /// restored. A range outside the registered RAM passes.
    pub fn require_ram(
        &self,
        section: &SectionId,
        range: GuestRange,
        reason: impl fmt::Display,
    ) -> Result<(), SectionError> {
        self.require_part(section, range, Part::Contents, reason)
    }

    fn require_part(
        &self,
        section: &SectionId,
        range: GuestRange,
        part: Part,
        reason: impl fmt::Display,
    ) -> Result<(), SectionError> {
        match self.restorer(range, part)? {
            None => Ok(()),
            Some(needs) => {
                let what = match part {
                    Part::Manager => "discard manager",
                    Part::Contents => "contents",
                };
                self.require(
                    section,
                    needs,
                    format_args!("it restores the {what} of the RAM region holding {range}, which {reason}"),
                )
            }
        }
    }

    fn restorer(&self, range: GuestRange, part: Part) -> Result<Option<&SectionId>, SectionError> {
        let matches = |r: &Restores| match (r, part) {
            (Restores::DiscardManager(x), Part::Manager) | (Restores::RamContents(x), Part::Contents) => {
                x.contains(&range) || x.overlaps(&range)
            }
            _ => false,
        };
        // With a memory map, ask it which region holds the range and
        // whether that region has a manager at all.
        if let Some(map) = &self.memory {
            let Some(region) = map.region_at(range.start()) else {
                return Ok(None);
            };
            if part == Part::Manager && region.manager().is_none() {
                return Ok(None);
            }
            let exact = |r: &Restores| match (r, part) {
                (Restores::DiscardManager(x), Part::Manager) | (Restores::RamContents(x), Part::Contents) => {
                    *x == region.range()
                }
                _ => false,
            };
            return match self.restorers.iter().find(|(r, _)| exact(r)) {
                Some((_, id)) => Ok(Some(id)),
                None if part == Part::Manager => Err(SectionError::Invalid(format!(
                    "no registered section restores the discard manager of RAM region {}",
                    region.range()
                ))),
                None => Ok(None),
            };
        }
        Ok(self.restorers.iter().find(|(r, _)| matches(r)).map(|(_, id)| id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, len: u64) -> GuestRange {
        GuestRange::new(start, len).unwrap()
    }

    #[test]
    fn requirements_name_the_missing_section() {
        let mem = SectionId::new("virtio-mem", 0);
        let ram = SectionId::new("ram", 1);
        let mut ctx = LoadContext::new(
            None,
            vec![
                (Restores::DiscardManager(r(0x1000_0000, 0x400_0000)), mem.clone()),
                (Restores::RamContents(r(0x1000_0000, 0x400_0000)), ram.clone()),
            ],
        );
        let me = SectionId::new("virtio-iommu", 0);
        let err = ctx
            .require_manager(&me, r(0x1020_0000, 0x1000), "a mapping targets")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'virtio-iommu' instance 0 needs section 'virtio-mem' instance 0"),
            "{err}"
        );
        assert!(ctx.require_manager(&me, r(0, 0x1000), "x").is_ok());
        assert!(!ctx.manager_restored(r(0x1000_0000, 1)));
        ctx.mark_loaded(mem);
        assert!(ctx.manager_restored(r(0x1000_0000, 1)));
        assert!(ctx.require_manager(&me, r(0x1020_0000, 0x1000), "x").is_ok());
        assert!(ctx.require_ram(&me, r(0x1020_0000, 0x1000), "x").is_err());
        ctx.mark_loaded(ram);
        assert!(ctx.require_ram(&me, r(0x1020_0000, 0x1000), "x").is_ok());
    }
}
