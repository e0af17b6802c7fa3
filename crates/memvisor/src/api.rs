//! `memvisor api`: the management API's client (`docs/api/openapi.json`), one subcommand per
//! endpoint: `vm`, `pause`, `resume`, `reboot`, `power-off [--timeout S]`, `shutdown`,
//! `memory`, `resize ID SIZE`, `dma` and `events [--count N]`. Each sends one request to the
//! VMM's `--api-socket` (HTTP/1.1 with JSON, the lab's small client `memvisor_lab::http`) and
//! prints text, or the API's JSON as it came with `--json` (`events`: each event's JSON line
//! as it arrives).
//! `pipe` relays stdin and stdout to the socket, byte for byte, until either side closes:
//! the guest lab's L1 relays the API to the host with it (busybox `nc` cannot reach a Unix
//! socket).
//!
//! Exit status: 0 done, 1 the API answered with an error (its message is printed), 2 no
//! answer (no socket, a broken connection, not the API).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use memvisor_lab::http::{Client, Response, format_request};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::size::{human, parse_size};

/// The API's paths.
mod path {
    pub const VM: &str = "/api/v1/vm";
    pub const PAUSE: &str = "/api/v1/vm/pause";
    pub const RESUME: &str = "/api/v1/vm/resume";
    pub const REBOOT: &str = "/api/v1/vm/reboot";
    pub const POWER_OFF: &str = "/api/v1/vm/power-off";
    pub const SNAPSHOT: &str = "/api/v1/vm/snapshot";
    pub const MIGRATE: &str = "/api/v1/vm/migrate";
    pub const SHUTDOWN: &str = "/api/v1/vmm/shutdown";
    pub const MEMORY: &str = "/api/v1/memory";
    pub const DMA: &str = "/api/v1/dma";
    pub const EVENTS: &str = "/api/v1/events";

    /// One virtio-mem device.
    pub fn memory_device(id: &str) -> String {
        format!("{MEMORY}/{id}")
    }
}

/// The arguments of `memvisor api`.
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// The VMM's API socket (the path given to `memvisor run --api-socket`).
    #[arg(long)]
    socket: PathBuf,
    /// Print the API's JSON answer as it came instead of text (nothing for the 204 answers
    /// of `pause`, `resume`, `reboot`, `resize` and `shutdown`).
    #[arg(long, global = true)]
    json: bool,
    /// What to ask.
    #[command(subcommand)]
    command: ApiCommand,
}

/// One request (or the relay).
#[derive(Debug, clap::Subcommand)]
enum ApiCommand {
    /// The VM's state, uptime, boots and configuration (GET /api/v1/vm).
    Vm,
    /// Pause the vCPUs (PUT /api/v1/vm/pause).
    Pause,
    /// Run paused vCPUs again (PUT /api/v1/vm/resume).
    Resume,
    /// Reset the machine: the guest boots again (PUT /api/v1/vm/reboot).
    Reboot,
    /// Press the ACPI power button; if the guest has not powered off after the timeout, the
    /// VMM stops it (PUT /api/v1/vm/power-off).
    PowerOff {
        /// Seconds the guest has, 1 to 600 (the VMM's default: 30).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
        timeout: Option<u64>,
    },
    /// Save the paused VM to a new file (PUT /api/v1/vm/snapshot); `memvisor run ...
    /// --restore FILE` continues it. Pause it first.
    Snapshot {
        /// The file to create (made absolute against the current folder).
        file: PathBuf,
    },
    /// Move the guest to the VMM listening at DESTINATION (`memvisor run ... --incoming
    /// DESTINATION` with the same machine) (PUT /api/v1/vm/migrate); this VMM then exits.
    Migrate {
        /// `unix:PATH` or `tcp:HOST:PORT`.
        destination: String,
        /// Pause the guest for the rest once it would take about this long (1 to 60000; the
        /// VMM's default: 300).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        downtime_ms: Option<u64>,
        /// At most this many passes over the written pages after the first (0 to 100; the
        /// VMM's default: 8).
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=100))]
        max_passes: Option<u64>,
    },
    /// Stop the VMM (PUT /api/v1/vmm/shutdown).
    Shutdown,
    /// Boot RAM, the virtio-mem devices, the RAM blocks, the VMM's memory and DMA pinning
    /// (GET /api/v1/memory).
    Memory,
    /// Ask the guest to plug or unplug memory of a virtio-mem device until SIZE is plugged
    /// (PUT /api/v1/memory/ID); the guest does it in its own time: watch `memory` or `events`.
    Resize {
        /// The device's id (`--vmem id=...`).
        id: String,
        /// The size to plug (e.g. 0, 256M, 1G).
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// What the VM pins for DMA against its budget, each device, the virtio-iommu's faults
    /// (GET /api/v1/dma).
    Dma,
    /// Print the VMM's events as they happen (GET /api/v1/events), until the VMM stops or
    /// N were printed.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Copy stdin to the socket and the socket to stdout until either side closes, waiting
    /// for the socket to appear first (the relay starts with the VMM).
    Pipe {
        /// How long to wait for the socket, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
}

/// A failure: the exit status and the message.
#[derive(Debug)]
struct Failure(u8, String);

/// The message of a lab error, without the `vmm: ` of its display.
fn message(e: memvisor_lab::Error) -> String {
    match e {
        memvisor_lab::Error::Vmm(m) => m,
        e => e.to_string(),
    }
}

/// Sends one request to the API at `socket`; any status but 2xx is a failure (1) with the
/// API's message, no answer a failure (2).
fn call(socket: &Path, method: &str, uri: &str, body: Option<&Value>) -> Result<Response, Failure> {
    let mut client = Client::connect(socket).map_err(|e| Failure(2, message(e)))?;
    let resp = client.request(method, uri, body).map_err(|e| Failure(2, message(e)))?;
    if resp.is_success() {
        Ok(resp)
    } else {
        Err(api_error(method, uri, &resp))
    }
}

fn api_error(method: &str, uri: &str, resp: &Response) -> Failure {
    Failure(
        1,
        format!("{method} {uri}: {}: {}", resp.status_line(), resp.error_message()),
    )
}

/// Parses a JSON answer of the shape `T`, naming the request on failure.
fn parse<T: serde::de::DeserializeOwned>(uri: &str, resp: &Response) -> Result<T, Failure> {
    serde_json::from_slice(&resp.body)
        .map_err(|e| Failure(2, format!("{uri}: unexpected answer ({e}): {:.300}", resp.text())))
}

/// `GET /api/v1/vm`.
#[derive(Debug, Deserialize)]
struct VmInfo {
    state: String,
    uptime_ms: u64,
    #[serde(default)]
    boots: u64,
    /// The VMM's configuration (`memvisor run --print-config`).
    #[serde(default)]
    config: Value,
}

/// `GET /api/v1/memory`.
#[derive(Debug, Deserialize)]
struct MemoryInfo {
    boot_ram: u64,
    devices: Vec<DeviceInfo>,
    ram_blocks: Vec<RamBlockInfo>,
    host: HostInfo,
    #[serde(default)]
    dma: Option<DmaTotals>,
}

/// One virtio-mem device (sizes in bytes).
#[derive(Debug, Deserialize)]
struct DeviceInfo {
    id: String,
    addr: u64,
    region_size: u64,
    block_size: u64,
    requested_size: u64,
    plugged_size: u64,
    usable_region_size: u64,
    #[serde(default)]
    unassigned_reads: u64,
    #[serde(default)]
    unassigned_writes: u64,
}

/// A mapping of guest RAM in the VMM process.
#[derive(Debug, Deserialize)]
struct RamBlockInfo {
    name: String,
    hva: u64,
    size: u64,
}

/// The VMM process's memory figures.
#[derive(Debug, Deserialize)]
struct HostInfo {
    rss_bytes: u64,
    #[serde(default)]
    locked_bytes: u64,
    pinned_bytes: u64,
}

/// DMA pinning against the budget (`null`: unlimited).
#[derive(Debug, Deserialize)]
struct DmaTotals {
    pinned_bytes: u64,
    /// Absent from a VMM that does not count pages once.
    #[serde(default)]
    distinct_pinned_bytes: Option<u64>,
    pin_budget: Option<u64>,
}

impl DmaTotals {
    /// `DMA: pinned 8.0 KiB (distinct 4.0 KiB), budget unlimited`.
    fn line(&self) -> String {
        let distinct = self
            .distinct_pinned_bytes
            .map_or(String::new(), |d| format!(" (distinct {})", human(d)));
        format!(
            "DMA: pinned {}{distinct}, budget {}\n",
            human(self.pinned_bytes),
            budget(self.pin_budget)
        )
    }
}

/// `GET /api/v1/dma`.
#[derive(Debug, Deserialize)]
struct DmaInfo {
    #[serde(flatten)]
    totals: DmaTotals,
    devices: Vec<DmaDevice>,
    iommu: Option<IommuInfo>,
}

/// One device that does DMA; the counters a VMM does not report are `None`.
#[derive(Debug, Deserialize)]
struct DmaDevice {
    name: String,
    path: String,
    mappings: u64,
    pinned_bytes: u64,
    #[serde(default)]
    refused_maps: Option<u64>,
    #[serde(default)]
    vetoed_unplugs: Option<u64>,
    #[serde(default)]
    guard_warnings: Option<u64>,
    #[serde(default)]
    faults: Option<u64>,
}

/// The virtio-iommu's fault counters.
#[derive(Debug, Deserialize)]
struct IommuInfo {
    #[serde(default)]
    faults: Option<u64>,
    dropped_faults: u64,
}

/// `running, up 1.5 s, boot 1` and a line of the configuration.
fn format_vm(vm: &VmInfo) -> String {
    let mut out = format!(
        "{}, up {:.1} s, boot {}\n",
        vm.state,
        vm.uptime_ms as f64 / 1000.0,
        vm.boots
    );
    let c = &vm.config;
    if let Some(kernel) = c["kernel"].as_str() {
        let cpus = c["cpus"].as_u64().unwrap_or(0);
        let mut parts = vec![
            format!("kernel {kernel}"),
            format!("{cpus} vCPU{}", if cpus == 1 { "" } else { "s" }),
            format!("boot RAM {}", human(c["memory"].as_u64().unwrap_or(0))),
        ];
        for v in c["vmem"].as_array().into_iter().flatten() {
            parts.push(format!(
                "virtio-mem {} ({})",
                v["id"].as_str().unwrap_or("?"),
                human(v["size"].as_u64().unwrap_or(0))
            ));
        }
        if c["viommu"] == true {
            parts.push("virtio-iommu".into());
        }
        for d in c["disks"].as_array().into_iter().flatten() {
            parts.push(format!("disk {}", d["id"].as_str().unwrap_or("?")));
        }
        out.push_str(&parts.join(", "));
        out.push('\n');
    }
    out
}

/// `unlimited` or the budget.
fn budget(b: Option<u64>) -> String {
    b.map_or("unlimited".into(), human)
}

/// The memory answer as text: boot RAM, one line per device, the RAM blocks, the host, DMA.
fn format_memory(m: &MemoryInfo) -> String {
    let mut out = format!("boot RAM: {}\n", human(m.boot_ram));
    for d in &m.devices {
        out.push_str(&format!(
            "{}: plugged {} of {} (requested {}, usable {}, block {}, at {:#x}); \
             unplugged-memory accesses: {} reads, {} writes\n",
            d.id,
            human(d.plugged_size),
            human(d.region_size),
            human(d.requested_size),
            human(d.usable_region_size),
            human(d.block_size),
            d.addr,
            d.unassigned_reads,
            d.unassigned_writes
        ));
    }
    out.push_str("RAM blocks:\n");
    let width = m.ram_blocks.iter().map(|b| b.name.len()).max().unwrap_or(0);
    for b in &m.ram_blocks {
        out.push_str(&format!(
            "  {:<width$}  {:>10} at {:#x}\n",
            b.name,
            human(b.size),
            b.hva
        ));
    }
    out.push_str(&format!(
        "host: RSS {}, locked {}, pinned {}\n",
        human(m.host.rss_bytes),
        human(m.host.locked_bytes),
        human(m.host.pinned_bytes)
    ));
    if let Some(d) = &m.dma {
        out.push_str(&d.line());
    }
    out
}

/// The DMA answer as text: the totals, one line per device, the virtio-iommu.
fn format_dma(d: &DmaInfo) -> String {
    let count = |n: Option<u64>| n.map_or("?".to_string(), |n| n.to_string());
    let mut out = d.totals.line();
    if d.devices.is_empty() {
        out.push_str("devices: none\n");
    }
    for dev in &d.devices {
        out.push_str(&format!(
            "{} ({}): {} mappings, pinned {}, refused maps {}, vetoed unplugs {}, guard warnings {}, faults {}\n",
            dev.name,
            dev.path,
            dev.mappings,
            human(dev.pinned_bytes),
            count(dev.refused_maps),
            count(dev.vetoed_unplugs),
            count(dev.guard_warnings),
            count(dev.faults)
        ));
    }
    match &d.iommu {
        Some(i) => out.push_str(&format!(
            "virtio-iommu: faults {}, dropped faults {}\n",
            count(i.faults),
            i.dropped_faults
        )),
        None => out.push_str("virtio-iommu: none\n"),
    }
    out
}

/// One event as text: `   5.231 s  size-changed id=vmem0 plugged_size=134217728 ...`.
fn format_event(line: &str) -> String {
    let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(line) else {
        return format!("{line}\n");
    };
    let time = fields.remove("time_ms").and_then(|t| t.as_u64()).unwrap_or(0);
    let event = match fields.remove("event") {
        Some(Value::String(e)) => e,
        other => other.map_or("?".into(), |v| v.to_string()),
    };
    let mut out = format!("{:>9.3} s  {event}", time as f64 / 1000.0);
    for (k, v) in fields {
        match v {
            Value::String(s) => out.push_str(&format!(" {k}={s}")),
            v => out.push_str(&format!(" {k}={v}")),
        }
    }
    out.push('\n');
    out
}

/// The body as printed with `--json` (a line; nothing for an empty body).
fn raw(resp: &Response) -> String {
    let text = resp.text();
    match text.trim_end() {
        "" => String::new(),
        t => format!("{t}\n"),
    }
}

/// What one request command prints (all but `events` and `pipe`).
fn request(args: &ApiArgs) -> Result<String, Failure> {
    let s = &args.socket;
    let text = |resp: &Response, human: String| if args.json { raw(resp) } else { human };
    match &args.command {
        ApiCommand::Vm => {
            let resp = call(s, "GET", path::VM, None)?;
            let vm: VmInfo = parse(path::VM, &resp)?;
            Ok(text(&resp, format_vm(&vm)))
        }
        ApiCommand::Pause => {
            let resp = call(s, "PUT", path::PAUSE, None)?;
            Ok(text(&resp, "paused\n".into()))
        }
        ApiCommand::Resume => {
            let resp = call(s, "PUT", path::RESUME, None)?;
            Ok(text(&resp, "running\n".into()))
        }
        ApiCommand::Reboot => {
            let resp = call(s, "PUT", path::REBOOT, None)?;
            Ok(text(&resp, "the machine resets and boots again\n".into()))
        }
        ApiCommand::PowerOff { timeout } => {
            let body = timeout.map(|t| json!({ "timeout_s": t }));
            let resp = call(s, "PUT", path::POWER_OFF, body.as_ref())?;
            let granted = resp.json().ok().and_then(|v| v["timeout_s"].as_u64()).or(*timeout);
            let human = match granted {
                Some(t) => {
                    format!("the power button is pressed: the guest has {t} s to power off, then the VMM stops it\n")
                }
                None => "the power button is pressed\n".into(),
            };
            Ok(text(&resp, human))
        }
        ApiCommand::Snapshot { file } => {
            let file = std::path::absolute(file).map_err(|e| Failure(2, format!("{}: {e}", file.display())))?;
            let resp = call(s, "PUT", path::SNAPSHOT, Some(&json!({ "path": file })))?;
            let summary = resp.json().unwrap_or_default();
            let human = format!(
                "saved to {} ({} in {} sections, {} ms); the VM stays paused\n",
                file.display(),
                human(summary["bytes"].as_u64().unwrap_or(0)),
                summary["sections"].as_u64().unwrap_or(0),
                summary["ms"].as_u64().unwrap_or(0)
            );
            Ok(text(&resp, human))
        }
        ApiCommand::Migrate {
            destination,
            downtime_ms,
            max_passes,
        } => {
            let mut body = json!({ "destination": destination });
            if let Some(ms) = downtime_ms {
                body["downtime_ms"] = json!(ms);
            }
            if let Some(n) = max_passes {
                body["max_passes"] = json!(n);
            }
            let resp = call(s, "PUT", path::MIGRATE, Some(&body))?;
            let m = resp.json().unwrap_or_default();
            let human = format!(
                "migrated to {destination}: {} sent in {} pass{}, guest paused {} ms, {} ms in all; this VMM exits\n",
                human(m["bytes"].as_u64().unwrap_or(0)),
                m["passes"].as_u64().unwrap_or(0),
                if m["passes"].as_u64() == Some(1) { "" } else { "es" },
                m["downtime_ms"].as_u64().unwrap_or(0),
                m["total_ms"].as_u64().unwrap_or(0)
            );
            Ok(text(&resp, human))
        }
        ApiCommand::Shutdown => {
            let resp = call(s, "PUT", path::SHUTDOWN, None)?;
            Ok(text(&resp, "the VMM is shutting down\n".into()))
        }
        ApiCommand::Memory => {
            let resp = call(s, "GET", path::MEMORY, None)?;
            let m: MemoryInfo = parse(path::MEMORY, &resp)?;
            Ok(text(&resp, format_memory(&m)))
        }
        ApiCommand::Resize { id, size } => {
            let resp = call(
                s,
                "PUT",
                &path::memory_device(id),
                Some(&json!({ "requested_size": size })),
            )?;
            Ok(text(
                &resp,
                format!("{id}: requested {} ({size} bytes)\n", human(*size)),
            ))
        }
        ApiCommand::Dma => {
            let resp = call(s, "GET", path::DMA, None)?;
            let d: DmaInfo = parse(path::DMA, &resp)?;
            Ok(text(&resp, format_dma(&d)))
        }
        ApiCommand::Events { .. } | ApiCommand::Pipe { .. } => unreachable!("not a single answer"),
    }
}

/// A chunked body (`Transfer-Encoding: chunked`) as a plain stream: each chunk's bytes as
/// they arrive, the end at the last (empty) chunk or when the connection closes.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                self.done = true;
                return Ok(0);
            }
            let size = line.split(';').next().unwrap_or("").trim();
            self.left = usize::from_str_radix(size, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {line:?}")))?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed inside a chunk"));
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

/// Reads a response's status line and header fields.
fn read_head(r: &mut impl BufRead, uri: &str) -> Result<Response, Failure> {
    let broken = |e: String| Failure(2, format!("GET {uri}: {e}"));
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return Err(broken("connection closed before the answer's head".into())),
            Ok(_) => {}
            Err(e) => return Err(broken(format!("read: {e}"))),
        }
        let line = line.trim_end().to_string();
        if line.is_empty() && !lines.is_empty() {
            break;
        }
        if !line.is_empty() {
            lines.push(line);
        }
    }
    let status_line = &lines[0];
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
        return Err(broken(format!("not an HTTP/1.x status line: {status_line:?}")));
    };
    let headers = lines[1..]
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        reason: parts.next().unwrap_or("").to_string(),
        headers,
        body: Vec::new(),
    })
}

/// `events`: prints each event (a line of text, or its JSON with `json`) to `out` as it
/// arrives, until the stream ends or `count` were printed; empty keep-alive lines are skipped.
fn events(socket: &Path, count: Option<u64>, json: bool, out: &mut dyn Write) -> Result<(), Failure> {
    let uri = match count {
        Some(n) => format!("{}?count={n}", path::EVENTS),
        None => path::EVENTS.to_string(),
    };
    let stream =
        UnixStream::connect(socket).map_err(|e| Failure(2, format!("connecting {}: {e}", socket.display())))?;
    (&stream)
        .write_all(&format_request("GET", &uri, None))
        .map_err(|e| Failure(2, format!("GET {uri}: write: {e}")))?;
    let mut reader = BufReader::new(&stream);
    let mut head = read_head(&mut reader, &uri)?;
    let chunked = head
        .header("Transfer-Encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if !head.is_success() {
        if let Some(len) = head.header("Content-Length").and_then(|l| l.parse::<usize>().ok()) {
            head.body = vec![0; len];
            let _ = reader.read_exact(&mut head.body);
        }
        return Err(api_error("GET", &uri, &head));
    }
    let mut body: Box<dyn BufRead> = if chunked {
        Box::new(BufReader::new(Chunked {
            inner: reader,
            left: 0,
            done: false,
        }))
    } else {
        Box::new(reader)
    };
    let mut printed = 0;
    while count.is_none_or(|n| printed < n) {
        let mut line = String::new();
        match body.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(Failure(2, format!("GET {uri}: the stream broke: {e}"))),
        }
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let text = if json { format!("{line}\n") } else { format_event(line) };
        out.write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| Failure(2, format!("writing the events: {e}")))?;
        printed += 1;
    }
    Ok(())
}

/// Copies `from` to `to` until `from` ends, flushing every piece at once (a relay must not
/// hold bytes back); the bytes copied.
fn relay(mut from: impl Read, mut to: impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
        total += n as u64;
    }
}

/// Connects to `socket`, retrying while it does not exist or does not listen yet, for at
/// most `wait`.
fn connect_waiting(socket: &Path, wait: Duration) -> Result<UnixStream, Failure> {
    let deadline = Instant::now() + wait;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(Failure(
                    2,
                    format!(
                        "connecting {} (waited up to {} s): {e}",
                        socket.display(),
                        wait.as_secs()
                    ),
                ));
            }
        }
    }
}

/// `pipe`: stdin to the socket and the socket to stdout until either side closes.
fn pipe(socket: &Path, wait: Duration) -> Result<(), Failure> {
    let stream = connect_waiting(socket, wait)?;
    let clone = || {
        stream
            .try_clone()
            .map_err(|e| Failure(2, format!("cloning the socket: {e}")))
    };
    let (from_socket, to_socket) = (clone()?, clone()?);
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    thread::spawn(move || {
        let r = relay(from_socket, io::stdout().lock());
        let _ = tx.send(("the socket to stdout", r));
    });
    thread::spawn(move || {
        let r = relay(io::stdin().lock(), &to_socket);
        let _ = to_socket.shutdown(std::net::Shutdown::Write);
        let _ = tx2.send(("stdin to the socket", r));
    });
    // Whichever side closes first ends the relay (the other thread is left blocked).
    match rx.recv() {
        Ok((_, Ok(_))) => Ok(()),
        Ok((what, Err(e))) => Err(Failure(2, format!("relaying {what}: {e}"))),
        Err(_) => Err(Failure(2, "the relay threads ended without a word".into())),
    }
}

/// Runs one client command.
pub fn run(args: &ApiArgs) -> ExitCode {
    let result = match &args.command {
        ApiCommand::Pipe { wait } => pipe(&args.socket, Duration::from_secs(*wait)),
        ApiCommand::Events { count } => events(&args.socket, *count, args.json, &mut io::stdout().lock()),
        _ => request(args).map(|text| print!("{text}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("memvisor api: {msg}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn memory() -> MemoryInfo {
        MemoryInfo {
            boot_ram: 512 << 20,
            devices: vec![DeviceInfo {
                id: "vmem0".into(),
                addr: 0x1_0000_0000,
                region_size: 1 << 30,
                block_size: 2 << 20,
                requested_size: 256 << 20,
                plugged_size: 128 << 20,
                usable_region_size: 1 << 30,
                unassigned_reads: 3,
                unassigned_writes: 0,
            }],
            ram_blocks: vec![
                RamBlockInfo {
                    name: "boot-ram".into(),
                    hva: 0x7f00_0000_0000,
                    size: 512 << 20,
                },
                RamBlockInfo {
                    name: "vmem0".into(),
                    hva: 0x7eff_c000_0000,
                    size: 1 << 30,
                },
            ],
            host: HostInfo {
                rss_bytes: 700 << 20,
                locked_bytes: 0,
                pinned_bytes: 0,
            },
            dma: Some(DmaTotals {
                pinned_bytes: 8 << 10,
                distinct_pinned_bytes: Some(4 << 10),
                pin_budget: Some(64 << 20),
            }),
        }
    }

    #[test]
    fn answers_print_as_text() {
        let vm: VmInfo = serde_json::from_value(json!({
            "state": "running", "uptime_ms": 1500, "boots": 2,
            "config": {"kernel": "idle.elf", "cpus": 1, "memory": 64 << 20, "viommu": true,
                       "vmem": [{"id": "vmem0", "size": 256 << 20}], "disks": [{"id": "disk0"}]}
        }))
        .unwrap();
        assert_eq!(
            format_vm(&vm),
            "running, up 1.5 s, boot 2\n\
             kernel idle.elf, 1 vCPU, boot RAM 64.0 MiB, virtio-mem vmem0 (256.0 MiB), virtio-iommu, disk disk0\n"
        );
        let bare: VmInfo = serde_json::from_str(r#"{"state":"paused","uptime_ms":250}"#).unwrap();
        assert_eq!(format_vm(&bare), "paused, up 0.2 s, boot 0\n");
        assert_eq!(
            format_memory(&memory()),
            "boot RAM: 512.0 MiB\n\
             vmem0: plugged 128.0 MiB of 1.0 GiB (requested 256.0 MiB, usable 1.0 GiB, block 2.0 MiB, at 0x100000000); \
             unplugged-memory accesses: 3 reads, 0 writes\n\
             RAM blocks:\n  \
             boot-ram   512.0 MiB at 0x7f0000000000\n  \
             vmem0        1.0 GiB at 0x7effc0000000\n\
             host: RSS 700.0 MiB, locked 0 B, pinned 0 B\n\
             DMA: pinned 8.0 KiB (distinct 4.0 KiB), budget 64.0 MiB\n"
        );
        let dma: DmaInfo = serde_json::from_value(json!({
            "pinned_bytes": 8192, "pin_budget": null,
            "devices": [
                {"name": "disk0", "path": "viommu", "mappings": 2, "pinned_bytes": 8192,
                 "refused_maps": 1, "vetoed_unplugs": 0, "guard_warnings": 2, "faults": 4},
                {"name": "nvme0", "path": "ram", "mappings": 1, "pinned_bytes": 0}
            ],
            "iommu": {"faults": 4, "dropped_faults": 0}
        }))
        .unwrap();
        assert_eq!(
            format_dma(&dma),
            "DMA: pinned 8.0 KiB, budget unlimited\n\
             disk0 (viommu): 2 mappings, pinned 8.0 KiB, refused maps 1, vetoed unplugs 0, guard warnings 2, faults 4\n\
             nvme0 (ram): 1 mappings, pinned 0 B, refused maps ?, vetoed unplugs ?, guard warnings ?, faults ?\n\
             virtio-iommu: faults 4, dropped faults 0\n"
        );
        let none: DmaInfo =
            serde_json::from_str(r#"{"pinned_bytes":0,"pin_budget":null,"devices":[],"iommu":null}"#).unwrap();
        assert_eq!(
            format_dma(&none),
            "DMA: pinned 0 B, budget unlimited\ndevices: none\nvirtio-iommu: none\n"
        );
        assert_eq!(
            format_event(r#"{"event":"size-changed","id":"vmem0","plugged_size":2097152,"time_ms":51069}"#),
            "   51.069 s  size-changed id=vmem0 plugged_size=2097152\n"
        );
        assert_eq!(format_event("not json"), "not json\n");
    }

    #[test]
    fn the_relay_flushes_every_piece() {
        /// A writer that records what was flushed.
        #[derive(Default)]
        struct Flushed {
            pending: Vec<u8>,
            flushed: Vec<u8>,
        }
        impl Write for Flushed {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.pending.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                self.flushed.append(&mut self.pending);
                Ok(())
            }
        }
        let mut out = Flushed::default();
        let body = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(relay(&body[..], &mut out).unwrap(), body.len() as u64);
        assert_eq!(out.flushed, body);
        assert!(out.pending.is_empty());
    }

    /// An API server on a socket in a fresh folder: one connection per canned answer, each
    /// answer sent in `pieces` writes with a pause between them; returns the socket and the
    /// requests (first line and body).
    fn server(answers: Vec<String>, pieces: usize) -> (PathBuf, thread::JoinHandle<Vec<String>>) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "memvisor-api-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let handle = thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in answers {
                let (conn, _) = listener.accept().unwrap();
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if let Some(n) = line.strip_prefix("Content-Length: ") {
                        len = n.trim().parse().unwrap();
                    }
                    if first.is_empty() {
                        first = line.trim_end().to_string();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                seen.push(format!("{first} {}", String::from_utf8(body).unwrap()));
                let mut w = conn;
                let step = answer.len().div_ceil(pieces).max(1);
                for piece in answer.as_bytes().chunks(step) {
                    if w.write_all(piece).and_then(|_| w.flush()).is_err() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            seen
        });
        (sock, handle)
    }

    fn args(socket: &Path, json: bool, command: ApiCommand) -> ApiArgs {
        ApiArgs {
            socket: socket.to_path_buf(),
            json,
            command,
        }
    }

    fn answer(status: &str, body: &str) -> String {
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    }

    #[test]
    fn commands_send_their_request_and_print_the_answer() {
        let vm = r#"{"state":"running","uptime_ms":2500,"boots":1,"config":null}"#;
        let no_content = "HTTP/1.1 204 No Content\r\n\r\n".to_string();
        let (sock, server) = server(
            vec![
                answer("200 OK", vm),
                answer("200 OK", vm),
                no_content.clone(),
                answer("409 Conflict", r#"{"error":"the VM is already paused"}"#),
                answer("202 Accepted", r#"{"timeout_s":5}"#),
                answer("202 Accepted", r#"{"timeout_s":30}"#),
                no_content.clone(),
                no_content,
                answer("404 Not Found", r#"{"error":"no vmem vmem9"}"#),
            ],
            2,
        );
        let ask = |json, command| request(&args(&sock, json, command));
        assert_eq!(ask(false, ApiCommand::Vm).unwrap(), "running, up 2.5 s, boot 1\n");
        assert_eq!(ask(true, ApiCommand::Vm).unwrap(), format!("{vm}\n"));
        assert_eq!(ask(false, ApiCommand::Pause).unwrap(), "paused\n");
        let Err(Failure(code, msg)) = ask(false, ApiCommand::Pause) else {
            panic!("a 409 is a failure")
        };
        assert_eq!(
            (code, msg.as_str()),
            (1, "PUT /api/v1/vm/pause: 409 Conflict: the VM is already paused")
        );
        assert_eq!(
            ask(false, ApiCommand::PowerOff { timeout: Some(5) }).unwrap(),
            "the power button is pressed: the guest has 5 s to power off, then the VMM stops it\n"
        );
        assert_eq!(
            ask(true, ApiCommand::PowerOff { timeout: None }).unwrap(),
            "{\"timeout_s\":30}\n"
        );
        assert_eq!(
            ask(false, ApiCommand::Reboot).unwrap(),
            "the machine resets and boots again\n"
        );
        let resize = |id: &str| ApiCommand::Resize {
            id: id.into(),
            size: 256 << 20,
        };
        assert_eq!(
            ask(false, resize("vmem0")).unwrap(),
            "vmem0: requested 256.0 MiB (268435456 bytes)\n"
        );
        let Err(Failure(code, msg)) = ask(false, resize("vmem9")) else {
            panic!("a 404 is a failure")
        };
        assert_eq!(
            (code, msg.as_str()),
            (1, "PUT /api/v1/memory/vmem9: 404 Not Found: no vmem vmem9")
        );
        assert_eq!(
            server.join().unwrap(),
            [
                "GET /api/v1/vm HTTP/1.1 ",
                "GET /api/v1/vm HTTP/1.1 ",
                "PUT /api/v1/vm/pause HTTP/1.1 ",
                "PUT /api/v1/vm/pause HTTP/1.1 ",
                "PUT /api/v1/vm/power-off HTTP/1.1 {\"timeout_s\":5}",
                "PUT /api/v1/vm/power-off HTTP/1.1 ",
                "PUT /api/v1/vm/reboot HTTP/1.1 ",
                "PUT /api/v1/memory/vmem0 HTTP/1.1 {\"requested_size\":268435456}",
                "PUT /api/v1/memory/vmem9 HTTP/1.1 {\"requested_size\":268435456}",
            ]
        );
        // No socket: exit status 2, naming the path.
        let Err(Failure(code, msg)) = ask(false, ApiCommand::Shutdown) else {
            panic!("no socket is a failure")
        };
        assert_eq!(code, 2);
        assert!(msg.contains(&sock.display().to_string()), "{msg}");
    }

    #[test]
    fn events_print_as_they_come_and_stop_at_the_count() {
        let lines = [
            r#"{"event":"boot","boot":1,"time_ms":3}"#,
            "",
            r#"{"event":"size-requested","id":"vmem0","requested_size":4194304,"time_ms":1250}"#,
            r#"{"event":"paused","time_ms":2000}"#,
        ];
        // Two lines in the first chunk, one split across two chunks, the keep-alive alone.
        let stream: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let (a, rest) = stream.split_at(lines[0].len() + 2 + 10);
        let (b, c) = rest.split_at(rest.len() - 5);
        let mut chunked =
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n".to_string();
        for piece in [a, b, c] {
            chunked.push_str(&format!("{:x}\r\n{piece}\r\n", piece.len()));
        }
        let ended = format!("{chunked}0\r\n\r\n");
        let (sock, server) = server(
            vec![
                chunked,
                ended,
                answer(
                    "429 Too Many Requests",
                    r#"{"error":"too many event streams are open"}"#,
                ),
            ],
            7,
        );
        let mut out = Vec::new();
        events(&sock, Some(2), false, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "    0.003 s  boot boot=1\n    1.250 s  size-requested id=vmem0 requested_size=4194304\n"
        );
        let mut out = Vec::new();
        events(&sock, None, true, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3]),
            "every event up to the end of the stream, keep-alive lines skipped"
        );
        let Err(Failure(code, msg)) = events(&sock, None, false, &mut Vec::new()) else {
            panic!("a 429 is a failure")
        };
        assert_eq!(
            (code, msg.as_str()),
            (
                1,
                "GET /api/v1/events: 429 Too Many Requests: too many event streams are open"
            )
        );
        assert_eq!(
            server.join().unwrap(),
            [
                "GET /api/v1/events?count=2 HTTP/1.1 ",
                "GET /api/v1/events HTTP/1.1 ",
                "GET /api/v1/events HTTP/1.1 "
            ]
        );
    }

    #[test]
    fn the_pipe_waits_for_the_socket_then_gives_up_naming_it() {
        let sock = Path::new("/nonexistent/memvisor.sock");
        let t = Instant::now();
        let Err(Failure(code, msg)) = connect_waiting(sock, Duration::from_millis(300)) else {
            panic!("no socket")
        };
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert_eq!(code, 2);
        assert!(
            msg.starts_with("connecting /nonexistent/memvisor.sock (waited up to 0 s):"),
            "{msg}"
        );
    }
}
