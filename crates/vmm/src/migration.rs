//! Migration of a running VM to another memvisor process (issue 20), over
//! a Unix socket or TCP, with precopy (`docs/live-migration.md`, status):
//! a first vmstate stream (fingerprint, virtio-mem) so the destination has
//! the plugged blocks; RAM as PAGES frames while the guest runs, pass after
//! pass over the pages written meanwhile (KVM's dirty log and the VMM's
//! own writes); then, paused, the pages still dirty, PRECOPY-END, the same
//! vmstate stream a snapshot writes (see [`crate::snapshot`]) with an empty
//! RAM delta, and a three-frame handshake. The destination (`memvisor run
//! ... --incoming EP`) loads it in the declared restore order and runs the
//! guest.
//!
//! ```text
//! source                                   destination (listening on EP)
//! first stream, PAGES... (guest runs) ──▶  restore virtio-mem, write pages
//! pause, last PAGES, PRECOPY-END, stream ▶ load, restore platform and vCPUs
//!                          ◀─────────────  READY {bytes}       (or FAILED reason)
//! release disk image locks, GO ─────────▶  lock images, set the clock
//!                          ◀─────────────  RUNNING, then the vCPUs run
//! exit 0                                   owns the guest
//! ```
//!
//! Until it has RUNNING the source can take the guest back: on any failure
//! (the destination refused or vanished, a timeout) it re-locks its images
//! and resumes the vCPUs it paused. The destination writes RUNNING before
//! its vCPUs run, so a source that never reads it knows the guest did not
//! run there (on a Unix socket; over TCP a lost RUNNING is reported as
//! such). A destination that fails exits non-zero with nothing pinned.
//!
//! Control frames: `M`, kind (u8), payload length (u32 LE, at most
//! [`MAX_FRAME`]), payload, checksum (u32 LE, the low half of XXH64) of
//! kind, length and payload.

use std::io::{self, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use memvisor_machine::Machine;
use memvisor_memory::map::{GuestMemoryMap, Region};
use memvisor_memory::{GuestRange, PageSet};
use memvisor_vmstate::ram::RamMode;
use serde_json::{Value, json};

use crate::bus::lock;
use crate::config::VmmConfig;
use crate::memslots::Memslots;
use crate::snapshot::{self, BootParts, SnapshotError};
use crate::vcpu::VcpuControl;
use crate::vm::Vm;

/// The longest control frame payload.
pub const MAX_FRAME: u32 = 64 << 10;

/// How long connecting to one address of the destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long either side waits for the other's next frame.
pub const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a migration goes (`unix:PATH` or `tcp:HOST:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket's path.
    Unix(PathBuf),
    /// A TCP address, `HOST:PORT`.
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("`{s}`: unix: needs a socket path"));
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            return match addr.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Endpoint::Tcp(addr.into())),
                _ => Err(format!("`{s}`: tcp: needs HOST:PORT")),
            };
        }
        Err(format!("`{s}`: a migration endpoint is unix:PATH or tcp:HOST:PORT"))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// One connection, either kind.
#[derive(Debug)]
pub enum Connection {
    /// A Unix socket.
    Unix(UnixStream),
    /// A TCP connection (`TCP_NODELAY`).
    Tcp(TcpStream),
}

impl Connection {
    /// Connects to `endpoint`, trying each address of a TCP host for at
    /// most [`CONNECT_TIMEOUT`].
    pub fn connect(endpoint: &Endpoint) -> io::Result<Self> {
        match endpoint {
            Endpoint::Unix(p) => UnixStream::connect(p).map(Connection::Unix),
            Endpoint::Tcp(a) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{a}: no address"));
                for addr in std::net::ToSocketAddrs::to_socket_addrs(a.as_str())? {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Connection::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Connection::Unix(s) => Connection::Unix(s.try_clone()?),
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.set_read_timeout(t),
            Connection::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.read(buf),
            Connection::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.write(buf),
            Connection::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.flush(),
            Connection::Tcp(s) => s.flush(),
        }
    }
}

/// The destination's listening socket, bound when the VMM starts so that
/// a source may connect as soon as the process exists.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket (a stale socket file at the path is replaced; the file
    /// is removed when the listener is dropped).
    Unix(UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(std::net::TcpListener),
}

impl Listener {
    /// Listens on `endpoint`.
    pub fn bind(endpoint: &Endpoint) -> io::Result<Self> {
        match endpoint {
            Endpoint::Unix(p) => {
                crate::api::remove_stale_socket(p)?;
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
            Endpoint::Tcp(a) => Ok(Listener::Tcp(std::net::TcpListener::bind(a)?)),
        }
    }

    /// Waits for the source.
    pub fn accept(&self) -> io::Result<Connection> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Connection::Unix(s)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Connection::Tcp(s))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A control frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Destination: the stream is loaded and the guest can run here.
    Ready(Value),
    /// Source: the images are released; run the guest.
    Go,
    /// Destination: the guest runs here now.
    Running,
    /// Either side: the migration failed, and why.
    Failed(String),
    /// Source, precopy: guest memory of region `region` (its index in the
    /// memory map) at `offset`, at most [`MAX_PAGES`] bytes.
    Pages {
        /// The region's index.
        region: u32,
        /// Offset into the region (page-aligned).
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Source: the precopy ended after this many passes; the last stream
    /// follows.
    PrecopyEnd(u32),
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Ready(_) => 1,
            Frame::Go => 2,
            Frame::Running => 3,
            Frame::Failed(_) => 4,
            Frame::Pages { .. } => 5,
            Frame::PrecopyEnd(_) => 6,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Frame::Ready(_) => "READY",
            Frame::Go => "GO",
            Frame::Running => "RUNNING",
            Frame::Failed(_) => "FAILED",
            Frame::Pages { .. } => "PAGES",
            Frame::PrecopyEnd(_) => "PRECOPY-END",
        }
    }
}

/// The rest of a PAGES frame after its 6-byte head: the region and offset,
/// then the bytes read straight into the frame's buffer.
fn read_pages_frame(r: &mut dyn Read, head: &[u8; 6], len: u32) -> Result<Frame, MigrationError> {
    if len <= 12 {
        return Err(MigrationError::Protocol(format!("a PAGES frame of {len} bytes")));
    }
    let mut sub = [0u8; 12];
    r.read_exact(&mut sub).map_err(MigrationError::Control)?;
    let mut data = vec![0u8; len as usize - 12];
    r.read_exact(&mut data).map_err(MigrationError::Control)?;
    let mut crc = [0u8; 4];
    r.read_exact(&mut crc).map_err(MigrationError::Control)?;
    let crc = u32::from_le_bytes(crc);
    let expected = checksum(&[&head[1..], &sub[..], &data[..]]);
    if crc != expected {
        return Err(MigrationError::Protocol(format!(
            "a PAGES frame's checksum is {crc:#010x}, its bytes give {expected:#010x}"
        )));
    }
    Ok(Frame::Pages {
        region: u32::from_le_bytes(sub[..4].try_into().expect("4 bytes")),
        offset: u64::from_le_bytes(sub[4..].try_into().expect("8 bytes")),
        data,
    })
}

/// The most guest memory one PAGES frame carries.
pub const MAX_PAGES: u32 = 1 << 20;

/// The longest payload of a frame of `kind`.
fn frame_limit(kind: u8) -> u32 {
    if kind == 5 { MAX_PAGES + 12 } else { MAX_FRAME }
}

/// Writes `frame` (a FAILED reason longer than [`MAX_FRAME`] is cut).
pub fn write_frame(w: &mut dyn Write, frame: &Frame) -> io::Result<()> {
    let owned;
    let payload: &[u8] = match frame {
        Frame::Ready(v) => {
            owned = v.to_string().into_bytes();
            &owned
        }
        Frame::Failed(why) => why.as_bytes(),
        Frame::Go | Frame::Running => &[],
        Frame::Pages { region, offset, data } => return write_pages_frame(w, *region, *offset, data),
        Frame::PrecopyEnd(passes) => {
            owned = passes.to_le_bytes().to_vec();
            &owned
        }
    };
    let payload = &payload[..payload.len().min(MAX_FRAME as usize)];
    write_parts(w, frame.kind(), &[payload])?;
    w.flush()
}

/// Writes a PAGES frame straight from `data` (no copy, no flush: the
/// precopy's writer is buffered and flushed after each pass).
fn write_pages_frame(w: &mut dyn Write, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut sub = [0u8; 12];
    sub[..4].copy_from_slice(&region.to_le_bytes());
    sub[4..].copy_from_slice(&offset.to_le_bytes());
    write_parts(w, 5, &[&sub, &data[..data.len().min(MAX_PAGES as usize)]])
}

/// A frame's checksum: the low 32 bits of the XXH64 (seed 0) of `parts`
/// in order. Not CRC-32C as the vmstate format's: a frame carries guest
/// memory, all of it passes through this on both sides, and XXH64 is plain
/// 64-bit arithmetic — fast on any CPU, and under an emulated one too, where
/// the `crc32` instruction is emulated a bit at a time.
fn checksum(parts: &[&[u8]]) -> u32 {
    let mut h = xxhash_rust::xxh64::Xxh64::new(0);
    for p in parts {
        h.update(p);
    }
    h.digest() as u32
}

/// `M`, `kind`, the parts' length, the parts, and the [`checksum`] of all
/// but the marker.
fn write_parts(w: &mut dyn Write, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [b'M', kind, 0, 0, 0, 0];
    head[2..].copy_from_slice(&(len as u32).to_le_bytes());
    let mut all = Vec::with_capacity(parts.len() + 1);
    all.push(&head[1..]);
    all.extend_from_slice(parts);
    let crc = checksum(&all);
    w.write_all(&head)?;
    for p in parts {
        w.write_all(p)?;
    }
    w.write_all(&crc.to_le_bytes())
}

/// Reads one frame; a bad marker, kind, length or checksum is an error.
pub fn read_frame(r: &mut dyn Read) -> Result<Frame, MigrationError> {
    let mut head = [0u8; 6];
    r.read_exact(&mut head).map_err(MigrationError::Control)?;
    if head[0] != b'M' {
        return Err(MigrationError::Protocol(format!(
            "a control frame starts with {:#04x}, not 'M'",
            head[0]
        )));
    }
    let len = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
    let limit = frame_limit(head[1]);
    if len > limit {
        return Err(MigrationError::Protocol(format!(
            "a control frame of kind {} and {len} bytes; at most {limit}",
            head[1]
        )));
    }
    if head[1] == 5 {
        return read_pages_frame(r, &head, len);
    }
    let mut payload = vec![0u8; len as usize + 4];
    r.read_exact(&mut payload).map_err(MigrationError::Control)?;
    let crc_at = len as usize;
    let crc = u32::from_le_bytes([
        payload[crc_at],
        payload[crc_at + 1],
        payload[crc_at + 2],
        payload[crc_at + 3],
    ]);
    payload.truncate(crc_at);
    let expected = checksum(&[&head[1..], &payload]);
    if crc != expected {
        return Err(MigrationError::Protocol(format!(
            "a control frame's checksum is {crc:#010x}, its bytes give {expected:#010x}"
        )));
    }
    let text = || String::from_utf8_lossy(&payload).into_owned();
    match head[1] {
        1 => serde_json::from_slice(&payload)
            .map(Frame::Ready)
            .map_err(|e| MigrationError::Protocol(format!("READY: {e}"))),
        2 if len == 0 => Ok(Frame::Go),
        3 if len == 0 => Ok(Frame::Running),
        4 => Ok(Frame::Failed(text())),
        6 if len == 4 => Ok(Frame::PrecopyEnd(u32::from_le_bytes(
            payload[..4].try_into().expect("4 bytes"),
        ))),
        kind => Err(MigrationError::Protocol(format!(
            "a control frame of kind {kind} and {len} bytes"
        ))),
    }
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Saving or loading the state failed.
    #[error(transparent)]
    State(#[from] SnapshotError),
    /// The connection failed during the handshake.
    #[error("the other side: {0}")]
    Control(io::Error),
    /// A frame that does not belong here.
    #[error("the other side: {0}")]
    Protocol(String),
    /// The other side said it failed.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// A disk image could not be synced before the switch-over, or its lock
    /// could not be moved.
    #[error("disk `{disk}`: {why}")]
    Disk {
        /// The disk's id.
        disk: String,
        /// Why.
        why: String,
    },
    /// GO went out over TCP but RUNNING never came: the destination may run
    /// the guest, so it stays paused here, its image locks released.
    #[error(
        "no RUNNING after GO ({0}): the destination may run the guest, so it stays paused here; resume it only if the destination does not"
    )]
    OutcomeUnknown(String),
    /// Dirty logging could not be switched or read.
    #[error("dirty logging: {0}")]
    DirtyLog(String),
    /// The vCPUs could not be paused.
    #[error("pausing the vCPUs: {0}")]
    Pause(#[from] crate::vcpu::PauseError),
}

/// The disks whose image locks move with the guest, by id.
pub(crate) type Disks<'a> = &'a [(String, std::sync::Arc<std::sync::Mutex<memvisor_virtio_blk::VirtioBlk>>)];

/// Runs `op` on every disk; the first that fails fails the migration,
/// naming the disk.
fn each_disk(
    disks: Disks<'_>,
    op: impl Fn(&memvisor_virtio_blk::VirtioBlk) -> Result<(), memvisor_virtio_blk::BlockError>,
) -> Result<(), MigrationError> {
    for (id, disk) in disks {
        op(&crate::bus::lock(disk)).map_err(|e| MigrationError::Disk {
            disk: id.clone(),
            why: e.to_string(),
        })?;
    }
    Ok(())
}

fn set_locks(disks: Disks<'_>, locked: bool) -> Result<(), MigrationError> {
    each_disk(disks, |d| if locked { d.lock_image() } else { d.release_image() })
}

/// [`VirtioBlk::sync_image`](memvisor_virtio_blk::VirtioBlk::sync_image)
/// of every disk (the guest runs on here if one fails).
fn sync_images(disks: Disks<'_>) -> Result<(), MigrationError> {
    each_disk(disks, memvisor_virtio_blk::VirtioBlk::sync_image)
}

fn expect(conn: &mut Connection, want: &Frame) -> Result<Frame, MigrationError> {
    let frame = read_frame(conn)?;
    match frame {
        Frame::Failed(why) => Err(MigrationError::Refused(why)),
        f if f.kind() == want.kind() => Ok(f),
        f => Err(MigrationError::Protocol(format!(
            "expected {}, got {}",
            want.name(),
            f.name()
        ))),
    }
}

/// What a precopy works on, owned by the migration's thread: the running
/// boot's memory and slots, and the machine and configuration for the
/// first stream.
#[derive(Debug)]
pub struct Live {
    /// The configuration (its fingerprint goes first).
    pub(crate) config: VmmConfig,
    /// The machine (its virtio-mem devices go first).
    pub(crate) machine: Arc<Mutex<Machine>>,
    /// Guest memory.
    pub(crate) memory: GuestMemoryMap,
    /// The boot's memory slots, whose dirty log KVM keeps.
    pub(crate) memslots: Arc<Memslots>,
    /// Where each pass is told.
    pub(crate) events: Arc<crate::events::EventBus>,
}

/// Where a precopy left off.
#[derive(Debug)]
pub struct Precopy {
    /// Per region, the pages written since their last pass: the stop-and-copy
    /// sends them (and whatever is written until the pause).
    pub(crate) pending: Vec<PageSet>,
    /// Passes sent (pass 0: every populated page).
    pub(crate) passes: u32,
    /// Bytes sent so far (the first stream and the PAGES frames).
    pub(crate) bytes: u64,
    /// Guest memory bytes in those frames.
    pub(crate) page_bytes: u64,
    /// Populated guest memory when the precopy began (boot RAM and plugged
    /// blocks).
    pub(crate) populated_bytes: u64,
    /// When the migration began.
    pub(crate) started: Instant,
}

/// When a precopy stops and the guest is paused for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Stop once the pages left would take at most this long to send at
    /// the bandwidth of the last pass (default 300 ms), and a further pass
    /// would not halve them (see `stop_precopy`).
    pub downtime: Duration,
    /// Stop after this many passes over the written pages, after the first
    /// over all populated memory (default 8; 0: only the first).
    pub max_passes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            downtime: Duration::from_millis(300),
            max_passes: 8,
        }
    }
}

const PAGE: u64 = memvisor_memory::dirty::DIRTY_PAGE_SIZE;

/// The populated pages of `region` that may hold data (memfd holes are
/// never read: reading would allocate them), and how many bytes are
/// populated.
fn pages_with_data(region: &Region) -> Result<(PageSet, u64), MigrationError> {
    let runs = memvisor_vmstate::ram::populated_runs(region).map_err(|e| MigrationError::Protocol(e.to_string()))?;
    let mut data = PageSet::for_bytes(region.range().len());
    for &(start, end) in &runs {
        memvisor_vmstate::ram::data_extents(region, start, end, &mut |s, e| data.insert_bytes(s, e - s));
    }
    Ok((data, runs.iter().map(|(s, e)| e - s).sum()))
}

/// The pages of region `i` written since the last call, by the guest (the
/// KVM dirty log of its slots) or by the VMM (the memory's own bitmap).
fn take_dirty(live: &Live, i: usize) -> Result<PageSet, MigrationError> {
    let region = &live.memory.regions()[i];
    let mut dirty = live
        .memslots
        .take_dirty(region.range())
        .map_err(|e| MigrationError::DirtyLog(e.to_string()))?;
    dirty.union(&region.take_dirty());
    Ok(dirty)
}

/// Sends `pages` of region `i` as PAGES frames, copying guest memory
/// (which the guest may be writing) through a bounce buffer: a page that
/// changes after it is copied is dirty again and goes in a later pass.
/// With `skip_zero` (the first pass: the destination's memory starts
/// zeroed) pages that read as zero are not sent.
fn send_pages(
    out: &mut dyn Write,
    live: &Live,
    i: usize,
    pages: &PageSet,
    skip_zero: bool,
) -> Result<u64, MigrationError> {
    let region = &live.memory.regions()[i];
    let mut sent = 0;
    let mut bounce = vec![0u8; MAX_PAGES as usize];
    for (first, count) in pages.runs() {
        let (mut offset, end) = (first * PAGE, ((first + count) * PAGE).min(region.range().len()));
        while offset < end {
            let len = (end - offset).min(u64::from(MAX_PAGES));
            let slice = region
                .slice(offset, len)
                .ok_or_else(|| MigrationError::Protocol(format!("region {i} has no [{offset:#x}, +{len:#x})")))?;
            let data = &mut bounce[..len as usize];
            slice.copy_to(&mut data[..]);
            for (from, to) in non_zero_runs(data, skip_zero) {
                write_pages_frame(out, i as u32, offset + from as u64, &data[from..to])
                    .map_err(MigrationError::Control)?;
                sent += (to - from) as u64;
            }
            offset += len;
        }
    }
    Ok(sent)
}

/// Sends the written pages `dirty` (one set per region, in the memory
/// map's order), zero pages included; returns the guest bytes sent.
fn send_dirty(out: &mut dyn Write, live: &Live, dirty: &[PageSet]) -> Result<u64, MigrationError> {
    let mut sent = 0;
    for (i, pages) in dirty.iter().enumerate() {
        sent += send_pages(out, live, i, pages, false)?;
    }
    Ok(sent)
}

/// The runs of `data` to send, as byte ranges: all of it, or with
/// `skip_zero` its runs of pages that are not all zero.
fn non_zero_runs(data: &[u8], skip_zero: bool) -> Vec<(usize, usize)> {
    if !skip_zero {
        return vec![(0, data.len())];
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (n, page) in data.chunks(PAGE as usize).enumerate() {
        if is_zero(page) {
            continue;
        }
        let (from, to) = (n * PAGE as usize, n * PAGE as usize + page.len());
        match runs.last_mut() {
            Some((_, end)) if *end == from => *end = to,
            _ => runs.push((from, to)),
        }
    }
    runs
}

/// True if every byte of `bytes` is zero, 16 at a time.
fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

fn set_frozen(live: &Live, frozen: bool) {
    for v in lock(&live.machine).vmems() {
        v.region.set_migration_running(frozen);
    }
}

/// Undoes a precopy that will not finish: dirty logging off, virtio-mem
/// answering PLUG and UNPLUG again.
pub(crate) fn abandon(live: &Live) {
    if let Err(e) = live.memslots.set_dirty_logging(false) {
        log::error!("turning dirty logging off after the migration: {e}");
    }
    set_frozen(live, false);
}

/// Whether the precopy stops with `left` bytes still to send (taking about
/// `estimate` paused) after `passes` passes, the last of which sent
/// `last_sent`: when nothing is left, after [`Limits::max_passes`], or once
/// the estimate is within [`Limits::downtime`] — unless the last pass still
/// halved what is left (the guest writes slower than the passes send, so
/// another pass shortens the pause) and the estimate is above a tenth of
/// the limit (a pass that small is not worth its round).
fn stop_precopy(left: u64, last_sent: u64, estimate: Duration, passes: u32, limits: Limits) -> bool {
    let converging = left.saturating_mul(2) <= last_sent;
    left == 0
        || passes > limits.max_passes
        || estimate <= limits.downtime / 10
        || (estimate <= limits.downtime && !converging)
}

/// The source's precopy, on the migration's own thread while the guest
/// runs and the event loop serves its devices: the first stream (the
/// fingerprint and virtio-mem: the destination then knows the plugged
/// blocks), then every populated page, then the pages written meanwhile,
/// pass after pass, until what is left would take [`Limits::downtime`] at
/// the last pass's bandwidth, nothing is left, or [`Limits::max_passes`]
/// passes went; each pass is published as a `migration-pass` event. virtio-mem answers PLUG and UNPLUG BUSY from here on.
/// On failure it [`abandon`]s.
pub(crate) fn precopy(live: &Live, conn: &mut Connection, limits: Limits) -> Result<Precopy, MigrationError> {
    let started = Instant::now();
    let result = precopy_passes(live, conn, limits, started);
    if result.is_err() {
        abandon(live);
    }
    result
}

fn precopy_passes(
    live: &Live,
    conn: &mut Connection,
    limits: Limits,
    started: Instant,
) -> Result<Precopy, MigrationError> {
    let mut out = Counting::new(BufWriter::with_capacity(1 << 20, conn));
    let mut setup = snapshot::setup_registry(&live.config, &lock(&live.machine))?;
    setup.save(&mut out).map_err(SnapshotError::from)?;
    // The virtio-mem sections let go of the freeze when saved: keep it.
    set_frozen(live, true);
    live.memslots
        .set_dirty_logging(true)
        .map_err(|e| MigrationError::DirtyLog(e.to_string()))?;
    let regions = live.memory.regions().len();
    for region in live.memory.regions() {
        // What the VMM wrote before counts as sent by pass 0.
        let _ = region.take_dirty();
    }
    let mut page_bytes = 0;
    let mut populated_bytes = 0;
    let t = Instant::now();
    for i in 0..regions {
        let (pages, populated) = pages_with_data(&live.memory.regions()[i])?;
        populated_bytes += populated;
        page_bytes += send_pages(&mut out, live, i, &pages, true)?;
    }
    out.flush().map_err(MigrationError::Control)?;
    let mut last = (page_bytes, t.elapsed());
    let mut passes = 1;
    let pending = loop {
        let dirty = (0..regions)
            .map(|i| take_dirty(live, i))
            .collect::<Result<Vec<_>, _>>()?;
        let left: u64 = dirty.iter().map(|d| d.len() * PAGE).sum();
        let bandwidth = last.0 as f64 / last.1.as_secs_f64().max(1e-6);
        let estimate = Duration::from_secs_f64(left as f64 / bandwidth.max(1.0));
        log::info!(
            "migration pass {passes}: {} bytes left, {:.0} MB/s, about {estimate:?} to send paused",
            left,
            bandwidth / 1e6
        );
        live.events.publish(
            "migration-pass",
            json!({
                "pass": passes - 1,
                "bytes": last.0,
                "ms": last.1.as_millis() as u64,
                "bandwidth_bps": bandwidth as u64,
                "dirty_bytes": left,
                "estimated_downtime_ms": estimate.as_millis() as u64,
            }),
        );
        if stop_precopy(left, last.0, estimate, passes, limits) {
            break dirty;
        }
        let t = Instant::now();
        let sent = send_dirty(&mut out, live, &dirty)?;
        out.flush().map_err(MigrationError::Control)?;
        page_bytes += sent;
        last = (sent, t.elapsed());
        passes += 1;
    };
    // PRECOPY-END comes from the stop-and-copy, after the last pages.
    out.flush().map_err(MigrationError::Control)?;
    Ok(Precopy {
        pending,
        passes,
        bytes: out.count,
        page_bytes,
        populated_bytes,
        started,
    })
}

/// The migration thread: runs the [`precopy`], then hands the connection
/// back to the event loop (`back`: its request channel and wake-up
/// eventfd) for the stop-and-copy, which answers `reply`. A failed precopy
/// answers `reply` itself; the guest never stopped.
pub(crate) fn precopy_then_return(
    live: Live,
    destination: Endpoint,
    limits: Limits,
    mut connection: Connection,
    reply: std::sync::mpsc::Sender<Result<Value, String>>,
    back: (
        std::sync::mpsc::Sender<crate::control::LoopRequest>,
        io::Result<vmm_sys_util::eventfd::EventFd>,
    ),
) {
    let precopy = match precopy(&live, &mut connection, limits) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("migration to {destination}: precopy failed, the guest runs on here: {e}");
            let _ = reply.send(Err(with_reason(e, &mut connection).to_string()));
            return;
        }
    };
    let (tx, wake) = back;
    let request = crate::control::LoopRequest::StopAndCopy {
        destination,
        connection,
        live: Box::new(live),
        precopy: Box::new(precopy),
        reply,
    };
    match (tx.send(request), wake) {
        (Ok(()), Ok(wake)) => {
            if let Err(e) = wake.write(1) {
                log::error!("waking the event loop for the stop-and-copy: {e}");
            }
        }
        (Err(std::sync::mpsc::SendError(request)), _) => {
            // The boot ended meanwhile (a reset, a stop).
            if let crate::control::LoopRequest::StopAndCopy { live, reply, .. } = request {
                abandon(&live);
                let _ = reply.send(Err("the VM stopped or reset during the migration".into()));
            }
        }
        (Ok(()), Err(e)) => log::error!("no eventfd to wake the event loop for the stop-and-copy: {e}"),
    }
}

/// `e`, or the reason the destination gave if it refused and closed the
/// connection (a write then fails with a broken pipe, its FAILED frame
/// still waiting to be read). Waits at most a second for it.
fn with_reason(e: MigrationError, conn: &mut Connection) -> MigrationError {
    if matches!(e, MigrationError::Refused(_)) {
        return e;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    // Whatever else the destination sent comes first: skip to a FAILED.
    for _ in 0..4 {
        match read_frame(conn) {
            Ok(Frame::Failed(why)) => return MigrationError::Refused(why),
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    e
}

/// A writer that counts what goes through.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W> Counting<W> {
    fn new(inner: W) -> Self {
        Self { inner, count: 0 }
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The destination's precopy: loads the first stream (fingerprint and
/// virtio-mem: the plugged blocks get their slots), then writes each PAGES
/// frame into guest memory — only where the restored state says memory is
/// populated — until PRECOPY-END. `input` goes on with the last stream.
pub(crate) fn receive_precopy(
    config: &VmmConfig,
    machine: &Arc<Mutex<Machine>>,
    input: &mut dyn Read,
) -> Result<u64, MigrationError> {
    let mut setup = snapshot::setup_registry(config, &lock(machine))?;
    setup.load(&mut *input).map_err(SnapshotError::from)?;
    let memory = lock(machine).memory().clone();
    let mut received = 0;
    loop {
        match read_frame(input)? {
            Frame::Pages { region, offset, data } => {
                write_pages(&memory, region, offset, &data)?;
                received += data.len() as u64;
            }
            Frame::PrecopyEnd(_) => return Ok(received),
            Frame::Failed(why) => return Err(MigrationError::Refused(why)),
            other => {
                return Err(MigrationError::Protocol(format!("{} during the precopy", other.name())));
            }
        }
    }
}

/// Writes a PAGES frame's bytes, refusing anything outside the region,
/// unaligned, or on memory that is not populated (an unplugged block).
fn write_pages(memory: &GuestMemoryMap, region: u32, offset: u64, data: &[u8]) -> Result<(), MigrationError> {
    let bad = |why: String| MigrationError::Protocol(format!("PAGES of region {region} at {offset:#x}: {why}"));
    let r = memory
        .regions()
        .get(region as usize)
        .ok_or_else(|| bad(format!("there are {} regions", memory.regions().len())))?;
    let len = data.len() as u64;
    let range = r.range();
    let fits = offset % PAGE == 0
        && offset
            .checked_add(len)
            .is_some_and(|end| end <= range.len() && (len % PAGE == 0 || end == range.len()));
    if !fits {
        return Err(bad(format!(
            "{len} bytes do not fit the region's {:#x} in whole pages",
            range.len()
        )));
    }
    let guest = GuestRange::new(range.start() + offset, len).ok_or_else(|| bad("an empty or wrapping range".into()))?;
    if let Some(m) = r.manager()
        && !m.is_populated(guest)
    {
        return Err(bad(format!("{guest} is not populated (an unplugged block)")));
    }
    r.slice(offset, len)
        .ok_or_else(|| bad("not mapped".into()))?
        .copy_from(data);
    Ok(())
}

/// Sends the VM over `conn`, connected to `endpoint` (source side; run by
/// the event loop, so no queue is served meanwhile): pauses the vCPUs,
/// streams the state, and hands over. On success the guest runs at the
/// destination and this VMM should exit; on failure the guest runs here
/// again (or stays paused, if it was), with its image locks. A VM that
/// cannot migrate (a VFIO device) never gets here: `VmControl::migrate`
/// refuses before connecting, and `snapshot::start_capture` checks again.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send(
    parts: &BootParts<'_>,
    vm: &Vm,
    vcpus: &VcpuControl,
    disks: Disks<'_>,
    endpoint: &Endpoint,
    mut conn: Connection,
    live: &Live,
    precopy: Precopy,
) -> Result<Value, MigrationError> {
    let started = precopy.started;
    // The pause counts from its request: the first vCPU stops then.
    let paused = Instant::now();
    let was_paused = vcpus.is_paused();
    if !was_paused {
        vcpus.pause()?;
    }
    let vcpus_parked = paused.elapsed();
    let mut released = false;
    let mut go_sent = false;
    let result: Result<Value, MigrationError> = (|| {
        // The vCPU threads save their state while this thread takes and
        // sends the last dirty pages.
        let capture = snapshot::start_capture(parts, vm, vcpus)?;
        let mut last = precopy.pending;
        for (i, pages) in last.iter_mut().enumerate() {
            pages.union(&take_dirty(live, i)?);
        }
        let dirtied: u64 = last.iter().map(|p| p.len() * PAGE).sum();
        let dirty_taken = paused.elapsed();
        // The pages still dirty go as PAGES frames, like the passes' (their
        // checksum is the cheap one), and the last stream's RAM sections
        // carry an empty delta.
        let mut out = Counting::new(BufWriter::with_capacity(1 << 20, &mut conn));
        send_dirty(&mut out, live, &last)?;
        write_frame(&mut out, &Frame::PrecopyEnd(precopy.passes)).map_err(MigrationError::Control)?;
        let pages_sent = paused.elapsed();
        let nothing: Vec<PageSet> = live
            .memory
            .regions()
            .iter()
            .map(|r| PageSet::for_bytes(r.range().len()))
            .collect();
        let ram = |i: usize| RamMode::SendDelta(nothing[i].clone());
        let summary = snapshot::save_captured(parts, capture, &ram, &mut out)?;
        out.flush().map_err(MigrationError::Control)?;
        let last_bytes = out.count;
        drop(out);
        let stream_sent = paused.elapsed();
        // While the destination loads: every write the guest was told is
        // done reaches the image's storage, for a destination on another
        // host that shares it.
        sync_images(disks)?;
        conn.set_read_timeout(Some(SWITCHOVER_TIMEOUT))
            .map_err(MigrationError::Control)?;
        let ready = expect(&mut conn, &Frame::Ready(Value::Null))?;
        let ready_at = paused.elapsed();
        released = true;
        set_locks(disks, false)?;
        write_frame(&mut conn, &Frame::Go).map_err(MigrationError::Control)?;
        go_sent = true;
        expect(&mut conn, &Frame::Running)?;
        log::info!(
            "stop-and-copy to {endpoint}: vCPUs parked after {vcpus_parked:?}, {dirtied} dirty bytes taken after \
             {dirty_taken:?} and sent after {pages_sent:?}, the last stream ({} bytes) sent after {stream_sent:?}, \
             READY after {ready_at:?}, RUNNING after {:?}",
            summary.total_bytes,
            paused.elapsed()
        );
        Ok(json!({
            "destination": endpoint.to_string(),
            "bytes": precopy.bytes + last_bytes,
            "passes": precopy.passes,
            "precopy_bytes": precopy.page_bytes,
            "last_stream_bytes": summary.total_bytes,
            "dirtied_bytes": dirtied,
            "populated_bytes": precopy.populated_bytes,
            "sections": summary.sections.len(),
            "downtime_ms": paused.elapsed().as_millis() as u64,
            "total_ms": started.elapsed().as_millis() as u64,
            "destination_report": match ready { Frame::Ready(v) => v, _ => Value::Null },
        }))
    })();
    let result = result.map_err(|e| with_reason(e, &mut conn));
    // Over TCP a RUNNING that does not come may still have been sent: the
    // destination may run the guest, so this side must not.
    if let Err(e) = &result
        && go_sent
        && matches!(endpoint, Endpoint::Tcp(_))
    {
        log::error!("migration to {endpoint}: no RUNNING after GO ({e}); the guest stays paused here");
        return Err(MigrationError::OutcomeUnknown(e.to_string()));
    }
    if result.is_err() {
        abandon(live);
    }
    if let Err(e) = &result {
        log::warn!("migration to {endpoint} failed, the guest stays here: {e}");
        let _ = write_frame(&mut conn, &Frame::Failed(e.to_string()));
        if released && let Err(e) = set_locks(disks, true) {
            log::error!("after the failed migration: {e}");
        }
        if !was_paused && let Err(e) = vcpus.resume() {
            log::error!("resuming after the failed migration: {e}");
        }
    }
    result
}

/// The destination's side, once the stream is loaded and the platform and
/// vCPUs restored: READY, wait for GO, lock the images. The caller then
/// sets the clock, sends RUNNING ([`running`]) and starts the vCPUs.
pub(crate) fn switch_over(conn: &mut Connection, disks: Disks<'_>, loaded_bytes: u64) -> Result<(), MigrationError> {
    write_frame(conn, &Frame::Ready(json!({ "bytes": loaded_bytes }))).map_err(MigrationError::Control)?;
    conn.set_read_timeout(Some(SWITCHOVER_TIMEOUT))
        .map_err(MigrationError::Control)?;
    expect(conn, &Frame::Go)?;
    set_locks(disks, true)
}

/// Tells the source the guest runs here. The source released the guest
/// with GO, so a source that is gone by now changes nothing: the guest runs
/// here anyway.
pub(crate) fn running(conn: &mut Connection) {
    if let Err(e) = write_frame(conn, &Frame::Running) {
        log::warn!("telling the source the guest runs here: {e} (it sent GO, so the guest runs here)");
    }
}

/// Tells the source why the destination gives up (best effort).
pub(crate) fn refuse(conn: &mut Connection, why: &str) {
    let _ = write_frame(conn, &Frame::Failed(why.to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_precopy_goes_on_while_a_pass_still_halves_what_is_left() {
        let limits = Limits::default();
        let ms = Duration::from_millis;
        // After the first pass (245 MB), 4 MB left would take 130 ms: under the limit, but
        // another pass of 4 MB leaves less to send paused.
        assert!(!stop_precopy(4 << 20, 245 << 20, ms(130), 1, limits));
        // That pass left 3 MB: the guest writes as fast as it is sent; stop.
        assert!(stop_precopy(3 << 20, 4 << 20, ms(100), 2, limits));
        // Above the limit: go on, unless the passes are used up.
        assert!(!stop_precopy(64 << 20, 128 << 20, ms(2000), 2, limits));
        assert!(stop_precopy(64 << 20, 128 << 20, ms(2000), 9, limits));
        // A tenth of the limit or less, or nothing left: stop.
        assert!(stop_precopy(1 << 20, 64 << 20, ms(30), 1, limits));
        assert!(stop_precopy(0, 64 << 20, ms(0), 1, limits));
    }

    #[test]
    fn endpoints_parse_and_bad_ones_are_named() {
        assert_eq!("unix:/run/m.sock".parse(), Ok(Endpoint::Unix("/run/m.sock".into())));
        assert_eq!("tcp:10.0.0.2:4444".parse(), Ok(Endpoint::Tcp("10.0.0.2:4444".into())));
        assert_eq!("tcp:[::1]:4444".parse(), Ok(Endpoint::Tcp("[::1]:4444".into())));
        for bad in ["unix:", "tcp:host", "tcp::1", "tcp:h:99999", "/run/m.sock", ""] {
            let e = bad.parse::<Endpoint>().unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
        assert_eq!(Endpoint::Unix("/a".into()).to_string(), "unix:/a");
    }

    #[test]
    fn only_pages_that_are_not_zero_are_sent_in_the_first_pass() {
        let page = PAGE as usize;
        let mut data = vec![0u8; 5 * page];
        data[page + 7] = 1;
        data[2 * page] = 2;
        data[4 * page + page - 1] = 3;
        assert_eq!(non_zero_runs(&data, true), [(page, 3 * page), (4 * page, 5 * page)]);
        assert_eq!(non_zero_runs(&data, false), [(0, 5 * page)]);
        assert!(non_zero_runs(&vec![0u8; 3 * page], true).is_empty());
    }

    #[test]
    fn frames_round_trip() {
        for frame in [
            Frame::Ready(json!({"bytes": 7})),
            Frame::Go,
            Frame::Running,
            Frame::Failed("no".into()),
            Frame::Pages {
                region: 1,
                offset: 0x2000,
                data: vec![7; 4096],
            },
            Frame::PrecopyEnd(3),
        ] {
            let mut buf = Vec::new();
            write_frame(&mut buf, &frame).unwrap();
            assert_eq!(read_frame(&mut &buf[..]).unwrap(), frame);
        }
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_of_a_frame_is_refused() {
        let pages = Frame::Pages {
            region: 0,
            offset: 0x1000,
            data: vec![0x5a; 16],
        };
        for frame in [Frame::Ready(json!({"bytes": 7})), pages] {
            let mut buf = Vec::new();
            write_frame(&mut buf, &frame).unwrap();
            for cut in 0..buf.len() {
                assert!(read_frame(&mut &buf[..cut]).is_err(), "cut at {cut}");
            }
            for byte in 0..buf.len() {
                for bit in 0..8 {
                    let mut bad = buf.clone();
                    bad[byte] ^= 1 << bit;
                    assert!(read_frame(&mut &bad[..]).is_err(), "bit {bit} of byte {byte}");
                }
            }
        }
        let mut huge = vec![b'M', 4];
        huge.extend_from_slice(&(MAX_FRAME + 1).to_le_bytes());
        let e = read_frame(&mut &huge[..]).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }
}
