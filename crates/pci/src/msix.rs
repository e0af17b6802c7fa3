//! MSI-X: the vector table, the pending bit array and the capability's
//! message control, delivering through an [`MsiSink`] (the VMM's KVM GSI
//! routes and irqfds).
//!
//! A vector is *live* when MSI-X is enabled, the function is not masked
//! and the vector's own mask bit is clear. The sink hears when a vector
//! goes live, changes its message while live, or stops being live
//! ([`MsiSink::configure`]), so that it can route the vector before it
//! fires. Triggering a live vector delivers
//! it ([`MsiSink::trigger`]); triggering a masked one sets its pending bit,
//! and the vector is delivered (and the bit cleared) when it becomes live.
//! With MSI-X disabled an interrupt has nowhere to go (memvisor offers no
//! INTx) and is dropped.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::PciError;
use crate::access::overlap;
use crate::error::TransportStateError;

/// Capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes of an MSI-X capability (ID, next, control, table, PBA).
pub const MSIX_CAP_SIZE: usize = 12;
/// Bytes of one table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// The most vectors a table may have (an 11-bit table size field).
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: the vector is masked.
const VECTOR_MASKED: u32 = 1;

/// An MSI message: the address and data a vector writes to deliver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
}

/// Where MSI-X interrupts go: implemented by the VMM with KVM GSI routes
/// and irqfds. Called with the MSI-X state's lock held, so an
/// implementation must not call back into the device.
pub trait MsiSink: Send + Sync {
    /// `vector`'s route changed: it became live (`enabled`: MSI-X enabled
    /// and neither the function nor the vector masked), its message changed
    /// while live, or it stopped being live (`enabled` false: the route may
    /// be torn down). A live vector must be deliverable by
    /// [`trigger`](Self::trigger) once this returns.
    fn configure(&self, vector: u16, msg: MsiMessage, enabled: bool) -> io::Result<()>;

    /// Delivers `vector` now (it is live).
    fn trigger(&self, vector: u16) -> io::Result<()>;
}

/// What became of a triggered vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixDelivery {
    /// Delivered through the sink.
    Delivered,
    /// Masked: its pending bit is set; it is delivered when unmasked.
    Pending,
    /// MSI-X is disabled: the interrupt was dropped.
    Disabled,
}

/// One table entry, as its four dwords.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    /// The state after reset: masked.
    const RESET: Self = Self {
        addr_lo: 0,
        addr_hi: 0,
        data: 0,
        control: VECTOR_MASKED,
    };

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, dword) in [self.addr_lo, self.addr_hi, self.data, self.control]
            .into_iter()
            .enumerate()
        {
            b[4 * i..4 * i + 4].copy_from_slice(&dword.to_le_bytes());
        }
        b
    }

    fn from_bytes(b: [u8; 16]) -> Self {
        let dword = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        Self {
            addr_lo: dword(0),
            addr_hi: dword(1),
            data: dword(2),
            // Only the mask bit of vector control is implemented.
            control: dword(3) & VECTOR_MASKED,
        }
    }

    fn message(self) -> MsiMessage {
        MsiMessage {
            addr: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }

    fn masked(self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// One table entry of an [`MsixState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntryState {
    /// Message address (both dwords).
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// The vector's mask bit.
    pub masked: bool,
}

/// The saved state of an [`MsixConfig`]: what the guest programmed and
/// what is pending. Taken by [`MsixConfig::state`], restored by
/// [`MsixConfig::restore`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The table, one entry per vector.
    pub entries: Vec<MsixEntryState>,
    /// The pending bit array, 64 vectors a word, vector 0 in bit 0.
    pub pending: Vec<u64>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
}

/// The MSI-X state of one function: table, pending bits, enable and
/// function mask; see the [module documentation](self).
pub struct MsixConfig {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// What the sink last heard of each vector.
    routes: Vec<(MsiMessage, bool)>,
    sink: Arc<dyn MsiSink>,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl MsixConfig {
    /// A table of `vectors` entries (1..=2048), all masked, MSI-X disabled.
    pub fn new(vectors: u16, sink: Arc<dyn MsiSink>) -> Result<Self, PciError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(PciError::InvalidVectorCount {
                got: vectors,
                max: MSIX_MAX_VECTORS,
            });
        }
        let n = usize::from(vectors);
        Ok(Self {
            entries: vec![Entry::RESET; n],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routes: vec![(MsiMessage::default(), false); n],
            sink,
        })
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Bytes of the table.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes of the pending bit array (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// True if MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// True if the whole function is masked.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// True if `vector`'s own mask bit is set (or it does not exist).
    pub fn is_masked(&self, vector: u16) -> bool {
        self.entries.get(usize::from(vector)).is_none_or(|e| e.masked())
    }

    /// True if `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pending.get(v / 64).is_some_and(|w| w >> (v % 64) & 1 != 0)
    }

    /// `vector`'s message, if it exists.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.entries.get(usize::from(vector)).map(|e| e.message())
    }

    /// The message control register: table size - 1, function mask, enable.
    pub fn message_control(&self) -> u16 {
        let mut control = self.vectors() - 1;
        if self.function_masked {
            control |= MSIX_CONTROL_FUNCTION_MASK;
        }
        if self.enabled {
            control |= MSIX_CONTROL_ENABLE;
        }
        control
    }

    /// The guest wrote the message control register: only enable and
    /// function mask are writable. Vectors that become live are routed,
    /// and delivered if pending.
    pub fn set_message_control(&mut self, control: u16) {
        let enabled = control & MSIX_CONTROL_ENABLE != 0;
        let masked = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        if (enabled, masked) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for vector in 0..self.vectors() {
            self.update(vector);
        }
    }

    /// The capability's bytes after the ID and next pointer: message
    /// control, then table and PBA offset/BIR (offsets 8-byte aligned).
    pub fn capability_body(&self, table_bar: u8, table_offset: u32, pba_bar: u8, pba_offset: u32) -> [u8; 10] {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&self.message_control().to_le_bytes());
        body[2..6].copy_from_slice(&((table_offset & !7) | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&((pba_offset & !7) | u32::from(pba_bar & 7)).to_le_bytes());
        body
    }

    /// The state to save: see [`MsixState`].
    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| MsixEntryState {
                    addr: e.message().addr,
                    data: e.data,
                    masked: e.masked(),
                })
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Restores `state`: table, pending bits, enable and function mask.
    /// Then every vector is brought up to date as a guest write to its
    /// table entry would: the sink hears of each vector that is live now
    /// ([`MsiSink::configure`]: a restored, unmasked vector of an enabled,
    /// unmasked function is routed before this returns) and of each that
    /// stopped being live; a live vector with its pending bit set — which
    /// a saved state never has, since a vector going live delivers its
    /// pending interrupt — is delivered. Masked vectors keep their pending
    /// bits, delivered when the guest unmasks them.
    ///
    /// # Errors
    ///
    /// Refuses, changing nothing, a table of another size, a pending bit
    /// array of another length, or a pending bit past the last vector.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), TransportStateError> {
        self.check_state(state)?;
        for (entry, saved) in self.entries.iter_mut().zip(&state.entries) {
            *entry = Entry {
                addr_lo: saved.addr as u32,
                addr_hi: (saved.addr >> 32) as u32,
                data: saved.data,
                control: if saved.masked { VECTOR_MASKED } else { 0 },
            };
        }
        self.pending.copy_from_slice(&state.pending);
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        for vector in 0..self.vectors() {
            self.update(vector);
        }
        Ok(())
    }

    /// The checks of [`restore`](Self::restore), without restoring.
    pub(crate) fn check_state(&self, state: &MsixState) -> Result<(), TransportStateError> {
        let vectors = self.entries.len();
        if state.entries.len() != vectors {
            return Err(TransportStateError::Mismatch {
                field: "MSI-X table size".into(),
                saved: state.entries.len() as u64,
                local: vectors as u64,
            });
        }
        if state.pending.len() != self.pending.len() {
            return Err(TransportStateError::Mismatch {
                field: "MSI-X pending bit array length (words)".into(),
                saved: state.pending.len() as u64,
                local: self.pending.len() as u64,
            });
        }
        // Bits past the last vector of the last word.
        let used = vectors % 64;
        if let Some(&last) = state.pending.last()
            && used != 0
            && last >> used != 0
        {
            return Err(TransportStateError::Invalid {
                field: format!("MSI-X pending word {}", state.pending.len() - 1),
                value: last,
                reason: format!("bits set past the last of {vectors} vectors"),
            });
        }
        Ok(())
    }

    /// Reads the table at `offset` (any width; past its end reads zero).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((at, start, len)) = overlap(offset, data.len(), 0, self.table_size()) else {
            return;
        };
        for (i, byte) in data[at..at + len].iter_mut().enumerate() {
            let pos = start + i as u64;
            *byte = self.entries[(pos / MSIX_ENTRY_SIZE) as usize].to_bytes()[(pos % MSIX_ENTRY_SIZE) as usize];
        }
    }

    /// Writes the table at `offset` (any width; past its end is ignored).
    /// Every entry whose message or mask changed is re-routed; one that
    /// became live while pending is delivered.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((at, start, len)) = overlap(offset, data.len(), 0, self.table_size()) else {
            return;
        };
        let first = (start / MSIX_ENTRY_SIZE) as usize;
        let last = ((start + len as u64 - 1) / MSIX_ENTRY_SIZE) as usize;
        for index in first..=last {
            let entry_start = index as u64 * MSIX_ENTRY_SIZE;
            let mut bytes = self.entries[index].to_bytes();
            if let Some((src, dst, n)) = overlap(start, len, entry_start, MSIX_ENTRY_SIZE) {
                let dst = dst as usize;
                bytes[dst..dst + n].copy_from_slice(&data[at + src..at + src + n]);
            }
            self.entries[index] = Entry::from_bytes(bytes);
            self.update(index as u16);
        }
    }

    /// Reads the pending bit array at `offset` (any width; past its end
    /// reads zero). The PBA is read-only.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((at, start, len)) = overlap(offset, data.len(), 0, self.pba_size()) else {
            return;
        };
        for (i, byte) in data[at..at + len].iter_mut().enumerate() {
            let pos = start as usize + i;
            *byte = (self.pending[pos / 8] >> (8 * (pos % 8))) as u8;
        }
    }

    /// Signals `vector`: delivered if live, pending if masked, dropped if
    /// MSI-X is disabled. Fails for a vector outside the table, or if the
    /// sink fails to deliver.
    pub fn trigger(&mut self, vector: u16) -> io::Result<MsixDelivery> {
        let Some(entry) = self.entries.get(usize::from(vector)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI-X vector {vector} is outside the table of {}", self.entries.len()),
            ));
        };
        if !self.enabled {
            return Ok(MsixDelivery::Disabled);
        }
        if self.function_masked || entry.masked() {
            self.set_pending(vector, true);
            return Ok(MsixDelivery::Pending);
        }
        self.sink.trigger(vector)?;
        Ok(MsixDelivery::Delivered)
    }

    fn live(&self, vector: u16) -> bool {
        self.enabled && !self.function_masked && !self.is_masked(vector)
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let v = usize::from(vector);
        if let Some(word) = self.pending.get_mut(v / 64) {
            if pending {
                *word |= 1 << (v % 64);
            } else {
                *word &= !(1 << (v % 64));
            }
        }
    }

    /// Tells the sink of a change of `vector`'s route, and delivers it if
    /// it is live and pending.
    fn update(&mut self, vector: u16) {
        let Some(msg) = self.message(vector) else {
            return;
        };
        let live = self.live(vector);
        let v = usize::from(vector);
        // A vector that is not live needs no route: the sink hears of it
        // only when it goes live, changes while live, or stops being live.
        let (old_msg, was_live) = self.routes[v];
        if live && (!was_live || old_msg != msg) || !live && was_live {
            self.routes[v] = (msg, live);
            if let Err(e) = self.sink.configure(vector, msg, live) {
                log::warn!("MSI-X vector {vector}: routing {msg:x?} (live: {live}) failed: {e}");
            }
        }
        if live && self.is_pending(vector) {
            self.set_pending(vector, false);
            if let Err(e) = self.sink.trigger(vector) {
                log::warn!("MSI-X vector {vector}: delivering the pending interrupt failed: {e}");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What a [`RecordingSink`] saw.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Event {
        Configure(u16, MsiMessage, bool),
        Trigger(u16),
    }

    /// An [`MsiSink`] that records every call.
    #[derive(Default)]
    pub(crate) struct RecordingSink(pub Mutex<Vec<Event>>);

    impl RecordingSink {
        pub(crate) fn take(&self) -> Vec<Event> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

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

    fn msix(vectors: u16) -> (MsixConfig, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (MsixConfig::new(vectors, sink.clone()).unwrap(), sink)
    }

    fn program(m: &mut MsixConfig, vector: u16, addr: u64, data: u32) {
        let base = u64::from(vector) * 16;
        m.write_table(base, &addr.to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
    }

    fn unmask(m: &mut MsixConfig, vector: u16) {
        m.write_table(u64::from(vector) * 16 + 12, &0u32.to_le_bytes());
    }

    fn mask(m: &mut MsixConfig, vector: u16) {
        m.write_table(u64::from(vector) * 16 + 12, &1u32.to_le_bytes());
    }

    const MSG: MsiMessage = MsiMessage {
        addr: 0xfee0_1000,
        data: 0x4021,
    };

    #[test]
    fn vector_counts() {
        let sink: Arc<dyn MsiSink> = Arc::new(RecordingSink::default());
        assert!(matches!(
            MsixConfig::new(0, sink.clone()),
            Err(PciError::InvalidVectorCount { got: 0, .. })
        ));
        assert!(MsixConfig::new(2049, sink.clone()).is_err());
        let m = MsixConfig::new(2048, sink).unwrap();
        assert_eq!(m.message_control(), 0x7ff);
        assert_eq!((m.table_size(), m.pba_size()), (2048 * 16, 256));
        let (m, _) = msix(3);
        assert_eq!(m.message_control(), 2);
        assert_eq!(m.pba_size(), 8);
        assert_eq!(
            m.capability_body(0, 0x4000, 0, 0x5000),
            [2, 0, 0x00, 0x40, 0, 0, 0x00, 0x50, 0, 0]
        );
    }

    #[test]
    fn table_reads_and_writes_of_4_and_8_bytes() {
        let (mut m, _) = msix(4);
        // Reset state: all masked, zero message.
        let mut e = [0u8; 16];
        m.read_table(16, &mut e);
        assert_eq!(e, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        // 4-byte writes.
        m.write_table(16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(20, &0x1u32.to_le_bytes());
        m.write_table(24, &0x31u32.to_le_bytes());
        assert_eq!(
            m.message(1),
            Some(MsiMessage {
                addr: 0x1_fee0_0000,
                data: 0x31
            })
        );
        // 8-byte write of data + vector control; reserved control bits read 0.
        m.write_table(24, &(0xffff_fffe_0000_0042u64).to_le_bytes());
        let mut q = [0u8; 8];
        m.read_table(24, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x42);
        assert!(!m.is_masked(1));
        // 8-byte read of the address.
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_0000);
        // 4-byte read of the upper address dword.
        let mut d = [0u8; 4];
        m.read_table(20, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        // Unaligned across entries, and past the end.
        m.write_table(30, &[0xaa; 4]);
        assert_eq!(m.message(2).unwrap().addr, 0xaaaa);
        assert!(!m.is_masked(1), "reserved vector control bytes do not touch the mask");
        m.write_table(4 * 16 - 2, &[0xff; 8]);
        m.write_table(u64::MAX - 3, &[0xff; 8]);
        m.read_table(4 * 16 - 4, &mut q);
        assert_eq!(&q[4..], [0; 4]);
        m.read_table(u64::MAX, &mut q);
        assert_eq!(q, [0; 8]);
    }

    #[test]
    fn mask_pending_unmask_delivers() {
        let (mut m, sink) = msix(2);
        program(&mut m, 1, MSG.addr, MSG.data);
        m.set_message_control(MSIX_CONTROL_ENABLE);
        // A masked vector is not routed; a trigger only sets its pending bit.
        assert!(sink.take().is_empty());
        assert_eq!(m.trigger(1).unwrap(), MsixDelivery::Pending);
        assert!(m.is_pending(1));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        assert!(sink.take().is_empty());
        // Unmask: routed live, then the pending interrupt is delivered.
        unmask(&mut m, 1);
        assert_eq!(sink.take(), [Event::Configure(1, MSG, true), Event::Trigger(1)]);
        assert!(!m.is_pending(1));
        assert_eq!(m.trigger(1).unwrap(), MsixDelivery::Delivered);
        assert_eq!(sink.take(), [Event::Trigger(1)]);
        // Mask again: not live.
        mask(&mut m, 1);
        assert_eq!(sink.take(), [Event::Configure(1, MSG, false)]);
        assert_eq!(m.trigger(1).unwrap(), MsixDelivery::Pending);
        assert!(sink.take().is_empty());
        // Vector outside the table.
        assert!(m.trigger(2).is_err());
    }

    #[test]
    fn function_mask() {
        let (mut m, sink) = msix(2);
        program(&mut m, 0, MSG.addr, MSG.data);
        unmask(&mut m, 0);
        m.set_message_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        assert!(m.function_masked());
        assert_eq!(m.message_control(), 0xc001);
        assert!(sink.take().is_empty());
        assert_eq!(m.trigger(0).unwrap(), MsixDelivery::Pending);
        m.set_message_control(MSIX_CONTROL_ENABLE);
        assert_eq!(sink.take(), [Event::Configure(0, MSG, true), Event::Trigger(0)]);
        assert!(!m.is_pending(0));
    }

    #[test]
    fn enable_gates_delivery() {
        let (mut m, sink) = msix(1);
        program(&mut m, 0, MSG.addr, MSG.data);
        unmask(&mut m, 0);
        // Nothing is routed while MSI-X is disabled.
        assert!(sink.take().is_empty());
        assert_eq!(m.trigger(0).unwrap(), MsixDelivery::Disabled);
        assert!(!m.is_pending(0), "nothing is pending while MSI-X is disabled");
        m.set_message_control(MSIX_CONTROL_ENABLE);
        assert_eq!(sink.take(), [Event::Configure(0, MSG, true)]);
        assert_eq!(m.trigger(0).unwrap(), MsixDelivery::Delivered);
        m.set_message_control(0);
        assert_eq!(sink.take(), [Event::Trigger(0), Event::Configure(0, MSG, false)]);
        // A message change of a live vector re-routes it.
        m.set_message_control(MSIX_CONTROL_ENABLE);
        sink.take();
        m.write_table(8, &7u32.to_le_bytes());
        let moved = MsiMessage { data: 7, ..MSG };
        assert_eq!(sink.take(), [Event::Configure(0, moved, true)]);
    }

    #[test]
    fn state_restore_routes_live_vectors() {
        let (mut src, _) = msix(70);
        for v in [0, 1, 65] {
            program(&mut src, v, MSG.addr, MSG.data + u32::from(v));
        }
        unmask(&mut src, 0);
        unmask(&mut src, 65);
        src.set_message_control(MSIX_CONTROL_ENABLE);
        // Vector 1 stays masked with an interrupt pending.
        assert_eq!(src.trigger(1).unwrap(), MsixDelivery::Pending);
        let state = src.state();
        assert_eq!(state.pending, [0b10, 0]);

        let (mut dst, sink) = msix(70);
        dst.restore(&state).unwrap();
        assert_eq!(dst.state(), state);
        let msg = |v: u32| MsiMessage {
            data: MSG.data + v,
            ..MSG
        };
        assert_eq!(
            sink.take(),
            [Event::Configure(0, msg(0), true), Event::Configure(65, msg(65), true)],
            "the live vectors routed, nothing delivered"
        );
        let mut table = [0u8; 32];
        let mut expected = [0u8; 32];
        dst.read_table(0, &mut table);
        src.read_table(0, &mut expected);
        assert_eq!(table, expected);
        // The pending interrupt is delivered when the guest unmasks it.
        unmask(&mut dst, 1);
        assert_eq!(sink.take(), [Event::Configure(1, msg(1), true), Event::Trigger(1)]);

        // Refusals change nothing.
        let (mut dst, sink) = msix(70);
        let fresh = dst.state();
        let mut bad = state.clone();
        bad.pending[1] = 1 << 6;
        assert!(
            matches!(dst.restore(&bad), Err(TransportStateError::Invalid { field, .. })
            if field == "MSI-X pending word 1")
        );
        bad = state.clone();
        bad.entries.pop();
        assert!(matches!(
            dst.restore(&bad),
            Err(TransportStateError::Mismatch {
                saved: 69,
                local: 70,
                ..
            })
        ));
        bad = state;
        bad.pending.pop();
        assert!(matches!(
            dst.restore(&bad),
            Err(TransportStateError::Mismatch { saved: 1, local: 2, .. })
        ));
        assert_eq!(dst.state(), fresh);
        assert!(sink.take().is_empty());
    }
}
