//! Migration of a running VM to another memvisor process (issue 20), over
//! a Unix socket or TCP: the source pauses the VM, sends the same vmstate
//! stream a snapshot writes (see [`crate::snapshot`]) and hands over with a
//! three-frame handshake; the destination (`memvisor run ... --incoming
//! EP`) loads it in the declared restore order and runs the guest.
//!
//! This is stop-and-copy: the guest is paused for the whole transfer.
//! Precopy (sending RAM while the guest runs, then the pages it dirtied)
//! builds on it; `docs/live-migration.md` is the plan.
//!
//! ```text
//! source                                   destination (listening on EP)
//! pause vCPUs, save stream ─────────────▶  load, restore platform and vCPUs
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
//! [`MAX_FRAME`]), payload, CRC-32C (u32 LE) of kind, length and payload.

use std::io::{self, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

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
                if std::fs::symlink_metadata(p).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(p)?;
                }
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
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Ready(_) => 1,
            Frame::Go => 2,
            Frame::Running => 3,
            Frame::Failed(_) => 4,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Frame::Ready(_) => "READY",
            Frame::Go => "GO",
            Frame::Running => "RUNNING",
            Frame::Failed(_) => "FAILED",
        }
    }
}

/// Writes `frame` (a FAILED reason longer than [`MAX_FRAME`] is cut).
pub fn write_frame(w: &mut dyn Write, frame: &Frame) -> io::Result<()> {
    let mut payload = match frame {
        Frame::Ready(v) => v.to_string().into_bytes(),
        Frame::Failed(why) => why.as_bytes().to_vec(),
        Frame::Go | Frame::Running => Vec::new(),
    };
    payload.truncate(MAX_FRAME as usize);
    let mut out = vec![b'M', frame.kind()];
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = memvisor_vmstate::format::crc32c_append(0, &out[1..]);
    out.extend_from_slice(&crc.to_le_bytes());
    w.write_all(&out)?;
    w.flush()
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
    if len > MAX_FRAME {
        return Err(MigrationError::Protocol(format!(
            "a control frame of {len} bytes; at most {MAX_FRAME}"
        )));
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
    let expected =
        memvisor_vmstate::format::crc32c_append(memvisor_vmstate::format::crc32c_append(0, &head[1..]), &payload);
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
    /// A disk image lock could not be moved.
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
    /// The vCPUs could not be paused.
    #[error("pausing the vCPUs: {0}")]
    Pause(#[from] crate::vcpu::PauseError),
}

/// The disks whose image locks move with the guest, by id.
pub(crate) type Disks<'a> = &'a [(String, std::sync::Arc<std::sync::Mutex<memvisor_virtio_blk::VirtioBlk>>)];

fn set_locks(disks: Disks<'_>, locked: bool) -> Result<(), MigrationError> {
    for (id, disk) in disks {
        let d = crate::bus::lock(disk);
        let result = if locked { d.lock_image() } else { d.release_image() };
        result.map_err(|e| MigrationError::Disk {
            disk: id.clone(),
            why: e.to_string(),
        })?;
    }
    Ok(())
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

/// Sends the VM over `conn`, connected to `endpoint` (source side; run by
/// the event loop, so no queue is served meanwhile): pauses the vCPUs,
/// streams the state, and hands over. On success the guest runs at the
/// destination and this VMM should exit; on failure the guest runs here
/// again (or stays paused, if it was), with its image locks.
pub(crate) fn send(
    parts: &BootParts<'_>,
    vm: &Vm,
    vcpus: &VcpuControl,
    disks: Disks<'_>,
    endpoint: &Endpoint,
    mut conn: Connection,
) -> Result<Value, MigrationError> {
    snapshot::check_saveable(parts.config)?;
    let started = Instant::now();
    let was_paused = vcpus.is_paused();
    if !was_paused {
        vcpus.pause()?;
    }
    let paused = Instant::now();
    let mut released = false;
    let mut go_sent = false;
    let result: Result<Value, MigrationError> = (|| {
        let summary = {
            let mut out = BufWriter::with_capacity(1 << 20, &mut conn);
            let summary = snapshot::save_stream(parts, vm, vcpus, &mut out)?;
            out.flush().map_err(MigrationError::Control)?;
            summary
        };
        conn.set_read_timeout(Some(SWITCHOVER_TIMEOUT))
            .map_err(MigrationError::Control)?;
        let ready = expect(&mut conn, &Frame::Ready(Value::Null))?;
        released = true;
        set_locks(disks, false)?;
        write_frame(&mut conn, &Frame::Go).map_err(MigrationError::Control)?;
        go_sent = true;
        expect(&mut conn, &Frame::Running)?;
        Ok(json!({
            "destination": endpoint.to_string(),
            "bytes": summary.total_bytes,
            "sections": summary.sections.len(),
            "downtime_ms": paused.elapsed().as_millis() as u64,
            "total_ms": started.elapsed().as_millis() as u64,
            "destination_report": match ready { Frame::Ready(v) => v, _ => Value::Null },
        }))
    })();
    // Over TCP a RUNNING that does not come may still have been sent: the
    // destination may run the guest, so this side must not.
    if let Err(e) = &result
        && go_sent
        && matches!(endpoint, Endpoint::Tcp(_))
    {
        log::error!("migration to {endpoint}: no RUNNING after GO ({e}); the guest stays paused here");
        return Err(MigrationError::OutcomeUnknown(e.to_string()));
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
    fn frames_round_trip() {
        for frame in [
            Frame::Ready(json!({"bytes": 7})),
            Frame::Go,
            Frame::Running,
            Frame::Failed("no".into()),
        ] {
            let mut buf = Vec::new();
            write_frame(&mut buf, &frame).unwrap();
            assert_eq!(read_frame(&mut &buf[..]).unwrap(), frame);
        }
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_of_a_frame_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Frame::Ready(json!({"bytes": 7}))).unwrap();
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
        let mut huge = vec![b'M', 4];
        huge.extend_from_slice(&(MAX_FRAME + 1).to_le_bytes());
        let e = read_frame(&mut &huge[..]).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }
}
