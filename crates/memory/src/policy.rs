//! `DiscardPolicy`: who disables or requires coordinated and uncoordinated discard.
//!
//! Some users of guest RAM cannot tolerate memory being discarded behind
//! their back; others only work if discarding is possible. *Uncoordinated*
//! discard (a balloon freeing pages without telling anyone) breaks DMA
//! mappers, which pin pages; *coordinated* discard (virtio-mem, which
//! notifies `RamDiscardListener`s first) does not. A [`DiscardPolicy`] counts
//! the holders of each [`HolderKind`] and refuses a request that conflicts
//! with a holder already present, naming both. Each granted request is an
//! RAII [`DiscardGuard`]: dropping it withdraws the request.
//!
//! This mirrors QEMU's `ram_block_discard_disable`,
//! `ram_block_uncoordinated_discard_disable`, `ram_block_discard_require` and
//! `ram_block_coordinated_discard_require` (`system/physmem.c`).
//!
//! | existing holder \ request | disable all | disable uncoord. | require uncoord. | require coord. |
//! |---|---|---|---|---|
//! | disable all               | ok | ok | conflict | conflict |
//! | disable uncoordinated     | ok | ok | conflict | ok |
//! | require uncoordinated     | conflict | conflict | ok | ok |
//! | require coordinated       | conflict | ok | ok | ok |
//!
//! ```
//! use memvisor_memory::policy::DiscardPolicy;
//!
//! let policy = DiscardPolicy::new();
//! let vfio = policy.disable_uncoordinated("vfio0").unwrap();
//! let _mem = policy.require_coordinated("virtio-mem0").unwrap();
//! let err = policy.require_uncoordinated("balloon0").unwrap_err();
//! assert!(err.to_string().contains("vfio0"));
//! drop(vfio);
//! let _balloon = policy.require_uncoordinated("balloon0").unwrap();
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// What a holder of a [`DiscardGuard`] disables or requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HolderKind {
    /// No discard at all, coordinated or not: a device that cannot tolerate
    /// any (QEMU's `ram_block_discard_disable`).
    DisableAll,
    /// No uncoordinated discard; coordinated discard stays allowed: DMA
    /// mappers (QEMU's `ram_block_uncoordinated_discard_disable`).
    DisableUncoordinated,
    /// Uncoordinated discard must be possible: a balloon (QEMU's
    /// `ram_block_discard_require`, which requires any discard).
    RequireUncoordinated,
    /// Coordinated discard must be possible: virtio-mem (QEMU's
    /// `ram_block_coordinated_discard_require`).
    RequireCoordinated,
}

impl HolderKind {
    /// All kinds, in declaration order.
    pub const ALL: [HolderKind; 4] = [
        HolderKind::DisableAll,
        HolderKind::DisableUncoordinated,
        HolderKind::RequireUncoordinated,
        HolderKind::RequireCoordinated,
    ];

    /// Whether a holder of kind `self` and one of kind `other` cannot coexist.
    /// The relation is symmetric; holders of the same kind never conflict.
    pub const fn conflicts_with(self, other: HolderKind) -> bool {
        use HolderKind::*;
        matches!(
            (self, other),
            (DisableAll, RequireUncoordinated)
                | (DisableAll, RequireCoordinated)
                | (DisableUncoordinated, RequireUncoordinated)
                | (RequireUncoordinated, DisableAll)
                | (RequireCoordinated, DisableAll)
                | (RequireUncoordinated, DisableUncoordinated)
        )
    }

    const fn index(self) -> usize {
        match self {
            HolderKind::DisableAll => 0,
            HolderKind::DisableUncoordinated => 1,
            HolderKind::RequireUncoordinated => 2,
            HolderKind::RequireCoordinated => 3,
        }
    }
}

impl fmt::Display for HolderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HolderKind::DisableAll => "disable all discard",
            HolderKind::DisableUncoordinated => "disable uncoordinated discard",
            HolderKind::RequireUncoordinated => "require uncoordinated discard",
            HolderKind::RequireCoordinated => "require coordinated discard",
        })
    }
}

/// The holders of one kind that stand in the way of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Their kind.
    pub kind: HolderKind,
    /// Their names, oldest first (one entry per holder; names may repeat).
    pub holders: Vec<String>,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} holder(s) that {}: ", self.holders.len(), self.kind)?;
        for (i, name) in self.holders.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "'{name}'")?;
        }
        Ok(())
    }
}

/// Formats a non-empty list of conflicts for [`PolicyError`].
fn conflict_list(conflicts: &[Conflict]) -> String {
    conflicts.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Errors of [`DiscardPolicy`] requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The request conflicts with holders already present. Nothing changed.
    #[error("'{holder}' cannot {request}: it conflicts with {}", conflict_list(.conflicts))]
    Conflict {
        /// What was requested.
        request: HolderKind,
        /// Who requested it.
        holder: String,
        /// The conflicting holders, one entry per conflicting kind (never
        /// empty).
        conflicts: Vec<Conflict>,
    },
}

/// How many holders of each kind a [`DiscardPolicy`] has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscardCounts {
    /// Holders of [`HolderKind::DisableAll`].
    pub disable_all: usize,
    /// Holders of [`HolderKind::DisableUncoordinated`].
    pub disable_uncoordinated: usize,
    /// Holders of [`HolderKind::RequireUncoordinated`].
    pub require_uncoordinated: usize,
    /// Holders of [`HolderKind::RequireCoordinated`].
    pub require_coordinated: usize,
}

impl DiscardCounts {
    /// The number of holders of `kind`.
    pub fn get(&self, kind: HolderKind) -> usize {
        match kind {
            HolderKind::DisableAll => self.disable_all,
            HolderKind::DisableUncoordinated => self.disable_uncoordinated,
            HolderKind::RequireUncoordinated => self.require_uncoordinated,
            HolderKind::RequireCoordinated => self.require_coordinated,
        }
    }
}

/// The holders, per kind, as `(id, name)` in the order they arrived.
#[derive(Debug, Default)]
struct Holders {
    next_id: u64,
    by_kind: [Vec<(u64, String)>; 4],
}

/// The shared discard policy of one VM.
///
/// A cheap handle: clones share the same counters (`Arc<Mutex<_>>`), so every
/// device can hold one. All methods are thread-safe; a request and the
/// check for conflicts happen atomically under one lock.
#[derive(Debug, Clone, Default)]
pub struct DiscardPolicy {
    inner: Arc<Mutex<Holders>>,
}

impl DiscardPolicy {
    /// A policy with no holders: everything is allowed.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Holders> {
        // The holder lists are consistent at every point a panic could
        // occur, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `holder` as a holder of `kind`, unless that conflicts with
    /// a present holder (see [`HolderKind::conflicts_with`]). Holders of the
    /// same kind add up.
    ///
    /// The caller keeps the returned guard for as long as it needs the
    /// request; dropping it withdraws the request.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Conflict`], naming the request, `holder`, and every
    /// conflicting holder with its kind and count. The policy is unchanged.
    pub fn acquire(&self, kind: HolderKind, holder: &str) -> Result<DiscardGuard, PolicyError> {
        let mut holders = self.lock();
        let conflicts: Vec<Conflict> = HolderKind::ALL
            .into_iter()
            .filter(|&other| kind.conflicts_with(other))
            .filter_map(|other| {
                let present = &holders.by_kind[other.index()];
                (!present.is_empty()).then(|| Conflict {
                    kind: other,
                    holders: present.iter().map(|(_, name)| name.clone()).collect(),
                })
            })
            .collect();
        if !conflicts.is_empty() {
            return Err(PolicyError::Conflict {
                request: kind,
                holder: holder.to_string(),
                conflicts,
            });
        }
        let id = holders.next_id;
        holders.next_id += 1;
        holders.by_kind[kind.index()].push((id, holder.to_string()));
        Ok(DiscardGuard {
            policy: Arc::clone(&self.inner),
            kind,
            id,
            holder: holder.to_string(),
        })
    }

    /// Disables all discard, coordinated or not, for a device that cannot
    /// tolerate any.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Conflict`] if a holder requires uncoordinated or
    /// coordinated discard. See [`Self::acquire`].
    pub fn disable_all(&self, holder: &str) -> Result<DiscardGuard, PolicyError> {
        self.acquire(HolderKind::DisableAll, holder)
    }

    /// Disables uncoordinated discard, leaving coordinated discard allowed:
    /// what a DMA mapper needs.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Conflict`] if a holder requires uncoordinated discard.
    /// See [`Self::acquire`].
    pub fn disable_uncoordinated(&self, holder: &str) -> Result<DiscardGuard, PolicyError> {
        self.acquire(HolderKind::DisableUncoordinated, holder)
    }

    /// Requires uncoordinated discard to be possible: what a balloon needs.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Conflict`] if a holder disables all discard or
    /// uncoordinated discard. See [`Self::acquire`].
    pub fn require_uncoordinated(&self, holder: &str) -> Result<DiscardGuard, PolicyError> {
        self.acquire(HolderKind::RequireUncoordinated, holder)
    }

    /// Requires coordinated discard to be possible: what virtio-mem needs.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Conflict`] if a holder disables all discard. See
    /// [`Self::acquire`].
    pub fn require_coordinated(&self, holder: &str) -> Result<DiscardGuard, PolicyError> {
        self.acquire(HolderKind::RequireCoordinated, holder)
    }

    /// Whether all discard (coordinated too) is currently disabled: some
    /// [`HolderKind::DisableAll`] holder exists.
    ///
    /// Unlike QEMU's `ram_block_discard_is_disabled`, a mere
    /// [`HolderKind::DisableUncoordinated`] holder does not count here; ask
    /// [`Self::is_uncoordinated_discard_disabled`] for that.
    pub fn is_discard_disabled(&self) -> bool {
        !self.lock().by_kind[HolderKind::DisableAll.index()].is_empty()
    }

    /// Whether uncoordinated discard is currently disabled: some
    /// [`HolderKind::DisableAll`] or [`HolderKind::DisableUncoordinated`]
    /// holder exists.
    pub fn is_uncoordinated_discard_disabled(&self) -> bool {
        let holders = self.lock();
        !holders.by_kind[HolderKind::DisableAll.index()].is_empty()
            || !holders.by_kind[HolderKind::DisableUncoordinated.index()].is_empty()
    }

    /// Whether some holder requires discard (coordinated or uncoordinated).
    pub fn is_discard_required(&self) -> bool {
        let holders = self.lock();
        !holders.by_kind[HolderKind::RequireUncoordinated.index()].is_empty()
            || !holders.by_kind[HolderKind::RequireCoordinated.index()].is_empty()
    }

    /// A snapshot of the number of holders of each kind.
    pub fn counts(&self) -> DiscardCounts {
        let holders = self.lock();
        let n = |kind: HolderKind| holders.by_kind[kind.index()].len();
        DiscardCounts {
            disable_all: n(HolderKind::DisableAll),
            disable_uncoordinated: n(HolderKind::DisableUncoordinated),
            require_uncoordinated: n(HolderKind::RequireUncoordinated),
            require_coordinated: n(HolderKind::RequireCoordinated),
        }
    }

    /// A snapshot of the names of the holders of `kind`, oldest first.
    pub fn holders(&self, kind: HolderKind) -> Vec<String> {
        self.lock().by_kind[kind.index()]
            .iter()
            .map(|(_, name)| name.clone())
            .collect()
    }
}

/// A granted [`DiscardPolicy`] request. Dropping it withdraws the request
/// (exactly once), whichever thread drops it; it keeps the policy alive.
#[must_use = "dropping the guard withdraws the request at once"]
#[derive(Debug)]
pub struct DiscardGuard {
    policy: Arc<Mutex<Holders>>,
    kind: HolderKind,
    id: u64,
    holder: String,
}

impl DiscardGuard {
    /// What this guard disables or requires.
    pub fn kind(&self) -> HolderKind {
        self.kind
    }

    /// The holder named in the request.
    pub fn holder(&self) -> &str {
        &self.holder
    }
}

impl Drop for DiscardGuard {
    fn drop(&mut self) {
        let mut holders = self.policy.lock().unwrap_or_else(PoisonError::into_inner);
        let list = &mut holders.by_kind[self.kind.index()];
        if let Some(pos) = list.iter().position(|(id, _)| *id == self.id) {
            list.remove(pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HolderKind::*;

    /// The expected conflict matrix, written out independently of
    /// `conflicts_with`: `EXPECTED[existing][request]` is true for a conflict.
    const EXPECTED: [[bool; 4]; 4] = [
        // request: DisableAll, DisableUncoordinated, RequireUncoordinated, RequireCoordinated
        [false, false, true, true],  // existing DisableAll
        [false, false, true, false], // existing DisableUncoordinated
        [true, true, false, false],  // existing RequireUncoordinated
        [true, false, false, false], // existing RequireCoordinated
    ];

    fn request(policy: &DiscardPolicy, kind: HolderKind, holder: &str) -> Result<DiscardGuard, PolicyError> {
        match kind {
            DisableAll => policy.disable_all(holder),
            DisableUncoordinated => policy.disable_uncoordinated(holder),
            RequireUncoordinated => policy.require_uncoordinated(holder),
            RequireCoordinated => policy.require_coordinated(holder),
        }
    }

    #[test]
    fn policy_conflict_matrix_every_cell() {
        for (e, existing) in HolderKind::ALL.into_iter().enumerate() {
            for (r, requested) in HolderKind::ALL.into_iter().enumerate() {
                let policy = DiscardPolicy::new();
                let _held = request(&policy, existing, "first").unwrap();
                let result = request(&policy, requested, "second");
                let cell = format!("existing {existing:?}, request {requested:?}");
                if EXPECTED[e][r] {
                    let err = result.expect_err(&cell);
                    assert_eq!(
                        err,
                        PolicyError::Conflict {
                            request: requested,
                            holder: "second".into(),
                            conflicts: vec![Conflict {
                                kind: existing,
                                holders: vec!["first".into()],
                            }],
                        },
                        "{cell}"
                    );
                    let text = err.to_string();
                    assert!(
                        text.contains("'second'")
                            && text.contains("'first'")
                            && text.contains(&requested.to_string())
                            && text.contains(&existing.to_string())
                            && text.contains("1 holder(s)"),
                        "{cell}: {text}"
                    );
                    assert_eq!(
                        policy.counts().get(requested),
                        usize::from(requested == existing),
                        "{cell}"
                    );
                } else {
                    let guard = result.expect(&cell);
                    assert_eq!(guard.kind(), requested);
                    assert_eq!(guard.holder(), "second");
                    let counts = policy.counts();
                    if existing == requested {
                        assert_eq!(counts.get(existing), 2, "{cell}");
                    } else {
                        assert_eq!((counts.get(existing), counts.get(requested)), (1, 1), "{cell}");
                    }
                }
                assert_eq!(existing.conflicts_with(requested), EXPECTED[e][r], "{cell}");
            }
        }
    }

    #[test]
    fn policy_guard_drop_releases() {
        for (e, existing) in HolderKind::ALL.into_iter().enumerate() {
            for (r, requested) in HolderKind::ALL.into_iter().enumerate() {
                if !EXPECTED[e][r] {
                    continue;
                }
                let policy = DiscardPolicy::new();
                let held = request(&policy, existing, "first").unwrap();
                request(&policy, requested, "second").unwrap_err();
                drop(held);
                assert_eq!(policy.counts(), DiscardCounts::default());
                let granted = request(&policy, requested, "second").unwrap();
                // And now the roles are reversed.
                request(&policy, existing, "first").unwrap_err();
                drop(granted);
                assert_eq!(policy.counts(), DiscardCounts::default());
            }
        }
    }

    #[test]
    fn policy_counts_several_holders_and_names_them_all() {
        let policy = DiscardPolicy::new();
        let clone = policy.clone();
        let vfio0 = policy.disable_uncoordinated("vfio0").unwrap();
        let vfio1 = clone.disable_uncoordinated("vfio1").unwrap();
        let vfio2 = policy.disable_uncoordinated("vfio2").unwrap();
        let mem = policy.require_coordinated("virtio-mem0").unwrap();
        assert_eq!(
            policy.counts(),
            DiscardCounts {
                disable_uncoordinated: 3,
                require_coordinated: 1,
                ..DiscardCounts::default()
            }
        );
        assert_eq!(clone.holders(DisableUncoordinated), ["vfio0", "vfio1", "vfio2"]);
        assert!(policy.is_uncoordinated_discard_disabled());
        assert!(!policy.is_discard_disabled());
        assert!(policy.is_discard_required());

        let err = policy.require_uncoordinated("balloon0").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("3 holder(s)"), "{text}");
        assert!(text.contains("'vfio0', 'vfio1', 'vfio2'"), "{text}");

        // Dropping out of order removes the right holder.
        drop(vfio1);
        assert_eq!(policy.holders(DisableUncoordinated), ["vfio0", "vfio2"]);
        drop(vfio0);
        policy.require_uncoordinated("balloon0").unwrap_err();
        drop(vfio2);
        assert!(!policy.is_uncoordinated_discard_disabled());

        // A request for all discard names both conflicting kinds.
        let balloon = policy.require_uncoordinated("balloon0").unwrap();
        let err = policy.disable_all("dev").unwrap_err();
        let PolicyError::Conflict { conflicts, .. } = &err;
        assert_eq!(conflicts.len(), 2, "{err}");
        let text = err.to_string();
        assert!(text.contains("'balloon0'") && text.contains("'virtio-mem0'"), "{text}");
        drop(balloon);
        drop(mem);
        assert_eq!(policy.counts(), DiscardCounts::default());
        assert!(!policy.is_discard_required());

        let all0 = policy.disable_all("dev0").unwrap();
        let _all1 = policy.disable_all("dev1").unwrap();
        assert!(policy.is_discard_disabled() && policy.is_uncoordinated_discard_disabled());
        drop(all0);
        assert!(policy.is_discard_disabled());
        assert_eq!(policy.counts().disable_all, 1);
    }

    #[test]
    fn policy_is_shared_across_threads() {
        fn check<T: Send + Sync>() {}
        check::<DiscardPolicy>();
        check::<DiscardGuard>();
        let policy = DiscardPolicy::new();
        std::thread::scope(|s| {
            for i in 0..8 {
                let policy = policy.clone();
                s.spawn(move || {
                    for _ in 0..100 {
                        let guard = policy.disable_uncoordinated(&format!("vfio{i}")).unwrap();
                        assert!(policy.is_uncoordinated_discard_disabled());
                        drop(guard);
                    }
                });
            }
        });
        assert_eq!(policy.counts(), DiscardCounts::default());
    }
}
