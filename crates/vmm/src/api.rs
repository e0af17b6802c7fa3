//! The management API: HTTP/1.1 with JSON bodies on a Unix socket, served
//! by `tiny_http` (sync, small, Unix sockets built in; `micro_http` is not
//! on crates.io and `hyper` would bring an async runtime into a VMM that
//! has none) on a thread of its own. It reads and resizes the virtio-mem
//! devices through their regions and controls the VM through
//! [`VmControl`]; it never takes a lock a vCPU waits on, so a slow client
//! cannot stall the guest. Each event stream is served on a thread of its
//! own. The OpenAPI document is `docs/api/openapi.json`; [`ROUTES`] is
//! what this server answers.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/v1/vm` | state, uptime, boots, configuration |
//! | PUT | `/api/v1/vm/pause`, `/api/v1/vm/resume` | 204; 409 when already in that state |
//! | PUT | `/api/v1/vm/reboot` | 204: the machine resets and boots again |
//! | PUT | `/api/v1/vm/power-off` | 202: the ACPI power button, then a forced stop after `timeout_s` |
//! | PUT | `/api/v1/vm/snapshot` | body `{"path": FILE}` (absolute, new): the paused VM saved there; 200 with its size |
//! | PUT | `/api/v1/vm/migrate` | body `{"destination": "unix:PATH" or "tcp:HOST:PORT", "downtime_ms": 300, "max_passes": 8}` (the last two optional): the guest moves, live, to the VMM listening there (`--incoming`); 200 with the figures, then this VMM exits |
//! | PUT | `/api/v1/vmm/shutdown` | 204, then the VMM stops |
//! | GET | `/api/v1/memory` | boot RAM, each virtio-mem device's sizes and unassigned (unplugged) accesses, the RAM blocks' host addresses, host and DMA figures |
//! | PUT | `/api/v1/memory/{id}` | body `{"requested_size": BYTES or "1G"}`: 204 |
//! | GET | `/api/v1/dma` | the assigned devices, their paths and pinned bytes, the pin budget, IOMMU faults |
//! | GET | `/api/v1/events` | JSON lines (chunked) as things happen; `?count=N` ends after N, `?after=SEQ` resumes, `?timeout_ms=T` long-polls |
//!
//! Errors are 4xx with `{"error": "..."}` naming the bad value.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memvisor_dma::attach::DmaPath;
use memvisor_machine::Machine;
use memvisor_machine::size::parse_size;
use memvisor_virtio_mem::VirtioMemRegion;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::bus::lock;
use crate::control::{ControlError, VmControl};
use crate::unassigned::UnassignedMemory;

/// Largest request body read; larger ones get 413.
const MAX_BODY: usize = 64 << 10;

/// Requests handled at once (each on a thread of its own, so a client that
/// stalls mid-request holds up only itself); more are answered 429.
const MAX_IN_FLIGHT: usize = 64;

/// Default and largest `timeout_s` of a power-off.
const POWER_OFF_TIMEOUT_S: (u64, u64) = (30, 600);

/// Every (method, path template) the server answers.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/vm"),
    ("PUT", "/api/v1/vm/pause"),
    ("PUT", "/api/v1/vm/resume"),
    ("PUT", "/api/v1/vm/reboot"),
    ("PUT", "/api/v1/vm/power-off"),
    ("PUT", "/api/v1/vm/snapshot"),
    ("PUT", "/api/v1/vm/migrate"),
    ("PUT", "/api/v1/vmm/shutdown"),
    ("GET", "/api/v1/memory"),
    ("PUT", "/api/v1/memory/{id}"),
    ("GET", "/api/v1/dma"),
    ("GET", "/api/v1/events"),
];

/// A block of guest memory and where the VMM process maps it.
#[derive(Debug, Clone, Serialize)]
pub struct RamBlockInfo {
    /// The block's name (`boot-ram`, a virtio-mem device's id).
    pub name: String,
    /// Its host virtual address.
    pub hva: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// What the API serves, shared with the VMM for the process's life.
pub struct ApiContext {
    /// The VM: pause, resume, reboot, power off, stop, events.
    pub control: Arc<VmControl>,
    /// The machine, for DMA figures (locked briefly).
    pub machine: Arc<Mutex<Machine>>,
    /// The configuration the VMM runs, as `GET /api/v1/vm` shows it.
    pub config: Value,
    /// When the VMM started.
    pub started: Instant,
    /// Boot RAM in bytes.
    pub boot_ram: u64,
    /// The virtio-mem devices by id.
    pub vmems: Vec<(String, Arc<VirtioMemRegion>)>,
    /// The guest's RAM blocks in the VMM process.
    pub ram_blocks: Vec<RamBlockInfo>,
    /// The guest's accesses to unassigned memory (unplugged blocks among them).
    pub unassigned: Arc<UnassignedMemory>,
}

/// Removes a socket file left at `path` (by a VMM that did not clean up),
/// so that a new listener can bind there; anything else at `path` stays
/// and makes the bind fail, naming it.
pub(crate) fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// A running API server; stopping it (or dropping it) joins its thread
/// and removes the socket.
pub struct ApiServer {
    server: Arc<Server>,
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("path", &self.path).finish()
    }
}

impl ApiServer {
    /// Listens on `path` (a stale socket file there is replaced) and serves
    /// `ctx` on a thread.
    pub fn start(path: &Path, ctx: ApiContext) -> std::io::Result<Self> {
        remove_stale_socket(path)?;
        let server = Arc::new(
            Server::http_unix(path)
                .map_err(|e| std::io::Error::other(format!("API socket {}: {e}", path.display())))?,
        );
        let serving = server.clone();
        let ctx = Arc::new(ctx);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new().name("api".into()).spawn(move || {
            for request in serving.incoming_requests() {
                if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    respond(
                        request,
                        Answer::error(429, format!("{MAX_IN_FLIGHT} requests are already being served")),
                    );
                    continue;
                }
                let (ctx, in_flight) = (ctx.clone(), in_flight.clone());
                let spawned = std::thread::Builder::new().name("api-request".into()).spawn(move || {
                    serve(&ctx, request);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    log::warn!("API: no thread for a request: {e}");
                }
            }
        })?;
        Ok(Self {
            server,
            path: path.to_path_buf(),
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("the API thread panicked");
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An answer: status and optional JSON body.
#[derive(Debug, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The JSON body, if any.
    pub body: Option<Value>,
    /// For a 405: the methods the path allows (the `Allow` header).
    pub allow: Option<String>,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
            allow: None,
        }
    }
    fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
            allow: None,
        }
    }
    fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(json!({ "error": message.into() })),
            allow: None,
        }
    }
}

fn serve(ctx: &ApiContext, mut request: Request) {
    let method = request.method().clone();
    let url = request.url().to_string();
    if method == Method::Get && url.split('?').next() == Some("/api/v1/events") {
        return stream_events(ctx, request);
    }
    let answer = match request.body_length() {
        Some(n) if n > MAX_BODY => Answer::error(413, format!("body of {n} bytes; at most {MAX_BODY}")),
        _ => {
            let mut body = Vec::new();
            match request.as_reader().take(MAX_BODY as u64 + 1).read_to_end(&mut body) {
                Ok(n) if n > MAX_BODY => Answer::error(413, format!("body larger than {MAX_BODY} bytes")),
                Ok(_) => handle(ctx, &method, &url, &body),
                Err(e) => Answer::error(400, format!("reading the body: {e}")),
            }
        }
    };
    log::debug!("API {method} {url} -> {}", answer.status);
    respond(request, answer);
}

fn respond(request: Request, answer: Answer) {
    let allow = answer
        .allow
        .map(|methods| Header::from_bytes("Allow", methods).expect("a valid header"));
    let result = match answer.body {
        Some(body) => {
            let json = Header::from_bytes("Content-Type", "application/json").expect("a valid header");
            let mut response = Response::from_string(body.to_string())
                .with_status_code(answer.status)
                .with_header(json);
            if let Some(allow) = allow {
                response.add_header(allow);
            }
            request.respond(response)
        }
        None => request.respond(Response::empty(answer.status)),
    };
    if let Err(e) = result {
        log::debug!("API client went away: {e}");
    }
}

/// Longest `timeout_ms` of an event long poll.
const MAX_EVENTS_TIMEOUT_MS: u64 = 600_000;

/// Serves `GET /api/v1/events` on a thread of its own: the stream lasts
/// until the client goes away, `?count=N` events were sent, `?timeout_ms=T`
/// passed, or the VMM stops. `?after=SEQ` first sends the kept events
/// numbered after SEQ. A stream with `timeout_ms` is a long poll: an
/// ordinary response, after which the connection serves further requests;
/// any other stream closes the connection when it ends.
fn stream_events(ctx: &ApiContext, request: Request) {
    let query = request.url().split_once('?').map_or("", |(_, q)| q).to_string();
    let number = |key: &str| -> Result<Option<u64>, Answer> {
        let prefix = format!("{key}=");
        match query.split('&').find_map(|kv| kv.strip_prefix(prefix.as_str())) {
            Some(n) => n
                .parse::<u64>()
                .map(Some)
                .map_err(|_| Answer::error(400, format!("{key}={n} is not a number"))),
            None => Ok(None),
        }
    };
    let (count, after, timeout_ms) = match (number("count"), number("after"), number("timeout_ms")) {
        (Ok(c), Ok(a), Ok(t)) => (c, a, t),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => return respond(request, e),
    };
    if let Some(t) = timeout_ms.filter(|&t| t > MAX_EVENTS_TIMEOUT_MS) {
        return respond(
            request,
            Answer::error(400, format!("timeout_ms={t} is more than {MAX_EVENTS_TIMEOUT_MS}")),
        );
    }
    let events = ctx.control.events();
    let subscribed = match after {
        Some(after) => events.subscribe_after(after),
        None => events.subscribe(),
    };
    let Some(mut reader) = subscribed else {
        return respond(request, Answer::error(429, "too many event streams are open"));
    };
    if let Some(n) = count {
        reader = reader.with_limit(n);
    }
    if let Some(t) = timeout_ms {
        let reader = reader.with_timeout(Duration::from_millis(t));
        let header = Header::from_bytes("Content-Type", "application/x-ndjson").expect("valid header");
        let response = Response::new(tiny_http::StatusCode(200), vec![header], reader, None, None);
        if let Err(e) = request.respond(response) {
            log::debug!("event long poll ended: {e}");
        }
        return;
    }
    // Written by hand, a chunk per line, flushed at once: tiny_http's own
    // chunked encoder holds small chunks back, and a stream must not wait.
    let mut out = request.into_writer();
    let mut stream = || -> std::io::Result<()> {
        out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")?;
        out.flush()?;
        while let Some(line) = reader.next_line() {
            write!(out, "{:x}\r\n", line.len())?;
            out.write_all(&line)?;
            out.write_all(b"\r\n")?;
            out.flush()?;
        }
        out.write_all(b"0\r\n\r\n")?;
        out.flush()
    };
    if let Err(e) = stream() {
        log::debug!("event stream ended: {e}");
    }
}

/// Answers one request (no I/O: the server does that).
pub fn handle(ctx: &ApiContext, method: &Method, url: &str, body: &[u8]) -> Answer {
    let path = url.split('?').next().unwrap_or(url);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::Get, ["api", "v1", "vm"]) => Answer::ok(json!({
            "state": ctx.control.state().name(),
            "uptime_ms": ctx.started.elapsed().as_millis() as u64,
            "boots": ctx.control.boots(),
            "config": ctx.config,
        })),
        (Method::Put, ["api", "v1", "vm", "pause"]) => control(ctx.control.pause()),
        (Method::Put, ["api", "v1", "vm", "resume"]) => control(ctx.control.resume()),
        (Method::Put, ["api", "v1", "vm", "reboot"]) => {
            ctx.control.reboot();
            Answer::no_content()
        }
        (Method::Put, ["api", "v1", "vm", "power-off"]) => power_off(ctx, body),
        (Method::Put, ["api", "v1", "vm", "snapshot"]) => snapshot(ctx, body),
        (Method::Put, ["api", "v1", "vm", "migrate"]) => migrate(ctx, body),
        (Method::Put, ["api", "v1", "vmm", "shutdown"]) => {
            ctx.control.shutdown();
            Answer::no_content()
        }
        (Method::Get, ["api", "v1", "memory"]) => Answer::ok(memory(ctx)),
        (Method::Put, ["api", "v1", "memory", id]) => resize(ctx, id, body),
        (Method::Get, ["api", "v1", "dma"]) => Answer::ok(dma(ctx)),
        _ => match allowed_methods(&segments) {
            Some(allow) => Answer {
                allow: Some(allow),
                ..Answer::error(405, format!("{method} is not allowed on {path}"))
            },
            None => Answer::error(404, format!("no endpoint {path}")),
        },
    }
}

/// The methods the routes allow on this path, comma-separated; `None` if
/// no route has it.
fn allowed_methods(segments: &[&str]) -> Option<String> {
    let methods: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, template)| {
            let t: Vec<&str> = template.trim_matches('/').split('/').collect();
            t.len() == segments.len() && t.iter().zip(segments).all(|(t, s)| t.starts_with('{') || t == s)
        })
        .map(|(method, _)| *method)
        .collect();
    (!methods.is_empty()).then(|| methods.join(", "))
}

fn control(result: Result<(), ControlError>) -> Answer {
    match result {
        Ok(()) => Answer::no_content(),
        Err(e) => Answer::error(409, e.to_string()),
    }
}

/// A JSON object body with only `allowed` fields. An absent (zero-length) body is `{}`;
/// anything else, whitespace alone included, must be a JSON object.
fn object(body: &[u8], allowed: &[&str]) -> Result<Map<String, Value>, Answer> {
    if body.is_empty() {
        return Ok(Map::new());
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Answer::error(400, format!("body is not JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(Answer::error(
            400,
            format!("body must be a JSON object with {allowed:?}"),
        ));
    };
    if let Some(unknown) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(Answer::error(
            400,
            format!("unknown field `{unknown}` (expected {allowed:?})"),
        ));
    }
    Ok(obj)
}

fn power_off(ctx: &ApiContext, body: &[u8]) -> Answer {
    let obj = match object(body, &["timeout_s"]) {
        Ok(o) => o,
        Err(answer) => return answer,
    };
    let (default, max) = POWER_OFF_TIMEOUT_S;
    let timeout = match obj.get("timeout_s") {
        None => default,
        Some(v) => match v.as_u64() {
            Some(t) if (1..=max).contains(&t) => t,
            _ => return Answer::error(400, format!("timeout_s {v}: a whole number of seconds from 1 to {max}")),
        },
    };
    match ctx.control.power_off(Duration::from_secs(timeout)) {
        Ok(()) => Answer {
            status: 202,
            ..Answer::ok(json!({ "timeout_s": timeout }))
        },
        Err(e) => Answer::error(409, e.to_string()),
    }
}

/// `PUT /api/v1/vm/snapshot`: the file must be a new one (an existing
/// file is never overwritten) at an absolute path in an existing folder.
fn snapshot(ctx: &ApiContext, body: &[u8]) -> Answer {
    let obj = match object(body, &["path"]) {
        Ok(o) => o,
        Err(answer) => return answer,
    };
    let path = match obj.get("path") {
        Some(Value::String(p)) => PathBuf::from(p),
        Some(other) => return Answer::error(400, format!("path {other}: a file name (string)")),
        None => return Answer::error(400, "missing field path"),
    };
    if !path.is_absolute() || path.file_name().is_none() {
        return Answer::error(400, format!("path {}: an absolute file path", path.display()));
    }
    if path.parent().is_some_and(|d| !d.is_dir()) {
        return Answer::error(400, format!("path {}: its folder does not exist", path.display()));
    }
    if std::fs::symlink_metadata(&path).is_ok() {
        return Answer::error(
            409,
            format!("path {}: exists; a snapshot never overwrites a file", path.display()),
        );
    }
    match ctx.control.snapshot(path) {
        Ok(summary) => Answer::ok(summary),
        Err(e) => Answer::error(409, e.to_string()),
    }
}

/// `PUT /api/v1/vm/migrate`.
/// Bounds of `downtime_ms` and `max_passes` in a migration request.
const MIGRATE_DOWNTIME_MS: std::ops::RangeInclusive<u64> = 1..=60_000;
const MIGRATE_MAX_PASSES: std::ops::RangeInclusive<u64> = 0..=100;

fn migrate(ctx: &ApiContext, body: &[u8]) -> Answer {
    let obj = match object(body, &["destination", "downtime_ms", "max_passes"]) {
        Ok(o) => o,
        Err(answer) => return answer,
    };
    let destination = match obj.get("destination") {
        Some(Value::String(d)) => match d.parse::<crate::migration::Endpoint>() {
            Ok(e) => e,
            Err(e) => return Answer::error(400, format!("destination {e}")),
        },
        Some(other) => return Answer::error(400, format!("destination {other}: unix:PATH or tcp:HOST:PORT")),
        None => return Answer::error(400, "missing field destination"),
    };
    let mut limits = crate::migration::Limits::default();
    let bounded = |key: &str, range: &std::ops::RangeInclusive<u64>| match obj.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(Answer::error(
                400,
                format!("{key} {v}: a whole number from {} to {}", range.start(), range.end()),
            )),
        },
    };
    match bounded("downtime_ms", &MIGRATE_DOWNTIME_MS) {
        Ok(Some(ms)) => limits.downtime = Duration::from_millis(ms),
        Ok(None) => {}
        Err(answer) => return answer,
    }
    match bounded("max_passes", &MIGRATE_MAX_PASSES) {
        Ok(Some(n)) => limits.max_passes = n as u32,
        Ok(None) => {}
        Err(answer) => return answer,
    }
    match ctx.control.migrate(destination, limits) {
        Ok(summary) => Answer::ok(summary),
        Err(e) => Answer::error(409, e.to_string()),
    }
}

fn memory(ctx: &ApiContext) -> Value {
    let devices: Vec<Value> = ctx
        .vmems
        .iter()
        .map(|(id, r)| {
            let c = r.config();
            let unplugged = ctx.unassigned.counts_at(r.addr());
            json!({
                "id": id,
                "addr": r.addr(),
                "region_size": r.region_size(),
                "block_size": r.block_size(),
                "requested_size": c.requested_size,
                "plugged_size": c.plugged_size,
                "usable_region_size": c.usable_region_size,
                "unassigned_reads": unplugged.reads,
                "unassigned_writes": unplugged.writes,
            })
        })
        .collect();
    let status = ProcStatus::read();
    let (dma_pinned, dma_distinct, pin_budget) = {
        let machine = attached_machine(ctx);
        (
            machine.pinned_bytes(),
            machine.distinct_pinned_bytes(),
            machine.budget().limit(),
        )
    };
    json!({
        "boot_ram": ctx.boot_ram,
        "devices": devices,
        "ram_blocks": ctx.ram_blocks,
        "host": {
            "rss_bytes": status.rss,
            "locked_bytes": status.locked,
            "pinned_bytes": status.pinned,
        },
        "dma": {
            "pinned_bytes": dma_pinned,
            "distinct_pinned_bytes": dma_distinct,
            "pin_budget": pin_budget,
        },
    })
}

fn resize(ctx: &ApiContext, id: &str, body: &[u8]) -> Answer {
    let Some((_, region)) = ctx.vmems.iter().find(|(name, _)| name == id) else {
        let known: Vec<&str> = ctx.vmems.iter().map(|(n, _)| n.as_str()).collect();
        return Answer::error(404, format!("no virtio-mem device `{id}` (devices: {known:?})"));
    };
    let obj = match object(body, &["requested_size"]) {
        Ok(o) => o,
        Err(answer) => return answer,
    };
    let bytes = match obj.get("requested_size") {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(b) => b,
            None => return Answer::error(400, format!("requested_size {n} is not a byte count")),
        },
        Some(Value::String(s)) => match parse_size(s) {
            Ok(b) => b,
            Err(e) => return Answer::error(400, format!("requested_size: {e}")),
        },
        Some(other) => {
            return Answer::error(
                400,
                format!("requested_size {other} is neither a number nor a size string"),
            );
        }
        None => return Answer::error(400, "missing field requested_size"),
    };
    match region.set_requested_size(bytes) {
        Ok(()) => {
            ctx.control
                .events()
                .publish("size-requested", json!({ "id": id, "requested_size": bytes }));
            Answer::no_content()
        }
        Err(e @ memvisor_virtio_mem::VirtioMemError::ResizeWhileMigrating { .. }) => {
            Answer::error(409, format!("virtio-mem `{id}`: {e}"))
        }
        Err(e) => Answer::error(400, format!("virtio-mem `{id}`: {e}")),
    }
}

/// The machine, locked once its assigned devices are done attaching
/// (`Machine::new_attaching`): their figures are read under their own
/// locks, which the attaching thread holds while it pins. The wait is
/// outside the machine's lock, so the guest's devices go on meanwhile.
fn attached_machine(ctx: &ApiContext) -> MutexGuard<'_, Machine> {
    let latch = lock(&ctx.machine).dma_latch();
    // A failure stops the VM; the figures below then show what is left.
    let _ = latch.wait();
    lock(&ctx.machine)
}

fn dma(ctx: &ApiContext) -> Value {
    let machine = attached_machine(ctx);
    let devices: Vec<Value> = machine
        .dma_devices()
        .map(|d| {
            let path = match d.path() {
                None => "detached",
                Some(DmaPath::Ram) => "ram",
                Some(DmaPath::Viommu { .. }) if d.in_bypass() => "bypass",
                Some(DmaPath::Viommu { .. }) => "viommu",
            };
            let counts = d.counts();
            // Faults the IOMMU met for the device's endpoint (path 2).
            let faults = match (d.path(), machine.iommu()) {
                (Some(DmaPath::Viommu { endpoint, .. }), Some(iommu)) => iommu.handle.endpoint_faults(endpoint),
                _ => Some(0),
            };
            json!({
                "name": d.name(),
                "path": path,
                // The backend's: one per pinned range, on every path.
                "mappings": d.mapper().mapping_count(),
                "pinned_bytes": d.pinned_bytes(),
                "refused_maps": counts.refused_maps,
                "vetoed_unplugs": counts.vetoed_unplugs,
                "guard_warnings": counts.guard_warnings,
                "faults": faults,
            })
        })
        .collect();
    let iommu = machine.iommu().map(|i| {
        json!({
            "faults": i.handle.faults(),
            "dropped_faults": i.handle.dropped_faults(),
        })
    });
    json!({
        "pinned_bytes": machine.pinned_bytes(),
        "distinct_pinned_bytes": machine.distinct_pinned_bytes(),
        "pin_budget": machine.budget().limit(),
        "devices": devices,
        "iommu": iommu,
    })
}

/// The VMM process's memory figures from `/proc/self/status`, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcStatus {
    /// `VmRSS`.
    pub rss: u64,
    /// `VmLck` (VFIO type1 accounts its pins here).
    pub locked: u64,
    /// `VmPin` (io_uring and iommufd pins).
    pub pinned: u64,
}

impl ProcStatus {
    /// Reads the figures (zeros where unreadable).
    pub fn read() -> Self {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| Self::parse(&s))
            .unwrap_or_default()
    }

    /// Parses `/proc/<pid>/status` text.
    pub fn parse(text: &str) -> Self {
        let field = |name| memvisor_dma::mapper::proc_kib(text, name).map_or(0, |kb| kb * 1024);
        Self {
            rss: field("VmRSS"),
            locked: field("VmLck"),
            pinned: field("VmPin"),
        }
    }
}

#[cfg(test)]
mod tests {
    use memvisor_machine::{MachineConfig, RamSpec, VirtioMemSpec};

    use super::*;
    use crate::events::EventBus;
    use crate::exit::{ExitReason, ExitSignal};

    fn ctx() -> (Arc<ExitSignal>, ApiContext) {
        let machine = Machine::new(&MachineConfig {
            ram: vec![RamSpec { addr: 0, size: 2 << 20 }],
            virtio_mem: vec![VirtioMemSpec::new("vmem0", 1 << 32, 64 << 20, 2 << 20)],
            ..Default::default()
        })
        .unwrap();
        let vmems = machine
            .vmems()
            .iter()
            .map(|v| (v.id.clone(), v.region.clone()))
            .collect();
        let unassigned = Arc::new(UnassignedMemory::for_map(machine.memory()));
        let exit = Arc::new(ExitSignal::new().unwrap());
        let ctx = ApiContext {
            control: VmControl::new(exit.clone(), EventBus::new()),
            machine: Arc::new(Mutex::new(machine)),
            config: json!({"memory": 2 << 20}),
            started: Instant::now(),
            boot_ram: 2 << 20,
            vmems,
            ram_blocks: vec![],
            unassigned,
        };
        (exit, ctx)
    }

    fn requested(ctx: &ApiContext) -> u64 {
        ctx.vmems[0].1.requested_size()
    }

    #[test]
    fn resize_accepts_units_and_names_bad_values() {
        let (_exit, ctx) = ctx();
        let mut events = ctx.control.events().subscribe().unwrap().with_limit(1);
        let put = |body: &str| handle(&ctx, &Method::Put, "/api/v1/memory/vmem0", body.as_bytes());
        assert_eq!(put(r#"{"requested_size":"8M"}"#).status, 204);
        assert_eq!(requested(&ctx), 8 << 20);
        let mut line = String::new();
        events.read_to_string(&mut line).unwrap();
        assert!(
            line.contains(r#""event":"size-requested""#) && line.contains("8388608"),
            "{line}"
        );
        assert_eq!(put(r#"{"requested_size":4194304}"#).status, 204);
        assert_eq!(requested(&ctx), 4 << 20, "the later request wins");
        let unaligned = put(r#"{"requested_size":"3K"}"#);
        assert_eq!(unaligned.status, 400);
        assert!(
            unaligned.body.unwrap()["error"].as_str().unwrap().contains("0xc00"),
            "names the bad value"
        );
        assert_eq!(put(r#"{"requested_size":"1G"}"#).status, 400, "beyond the region");
        assert_eq!(put("{").status, 400);
        assert_eq!(put("[1]").status, 400);
        assert_eq!(put(r#"{"requested_size":1,"x":2}"#).status, 400);
        assert_eq!(put(r#"{"requested_size":-1}"#).status, 400);
        assert_eq!(put(r#"{"requested_size":true}"#).status, 400);
        assert_eq!(put("").status, 400, "the size is required");
        assert_eq!(put("\n").status, 400, "whitespace is not JSON");
        assert_eq!(handle(&ctx, &Method::Put, "/api/v1/memory/nope", b"{}").status, 404);
        assert_eq!(requested(&ctx), 4 << 20, "no failed request changed it");
    }

    #[test]
    fn memory_vm_dma_and_control() {
        let (exit, ctx) = ctx();
        let body = handle(&ctx, &Method::Get, "/api/v1/memory", b"").body.unwrap();
        assert_eq!(body["devices"][0]["region_size"], 64 << 20);
        assert_eq!(body["devices"][0]["plugged_size"], 0);
        assert_eq!(body["dma"]["pin_budget"], Value::Null);
        ctx.unassigned.read(1 << 32, &mut [0; 4]);
        let body = handle(&ctx, &Method::Get, "/api/v1/memory", b"").body.unwrap();
        assert_eq!(
            body["devices"][0]["unassigned_reads"], 1,
            "an access to an unplugged block is counted"
        );
        assert!(body["host"]["rss_bytes"].as_u64().unwrap() > 0);
        let vm = handle(&ctx, &Method::Get, "/api/v1/vm", b"").body.unwrap();
        assert_eq!((vm["state"].as_str(), vm["boots"].as_u64()), (Some("stopped"), Some(0)));
        assert_eq!(vm["config"]["memory"], 2 << 20);
        let dma = handle(&ctx, &Method::Get, "/api/v1/dma", b"").body.unwrap();
        assert_eq!(
            (dma["pinned_bytes"].as_u64(), dma["devices"].as_array().map(Vec::len)),
            (Some(0), Some(0))
        );
        // No boot runs: pausing and pressing the power button are conflicts.
        assert_eq!(handle(&ctx, &Method::Put, "/api/v1/vm/pause", b"").status, 409);
        assert_eq!(handle(&ctx, &Method::Put, "/api/v1/vm/power-off", b"").status, 409);
        assert_eq!(
            handle(&ctx, &Method::Put, "/api/v1/vm/power-off", br#"{"timeout_s":0}"#).status,
            400
        );
        assert_eq!(
            handle(&ctx, &Method::Put, "/api/v1/vm/power-off", b"\n").status,
            400,
            "only an absent body means the default timeout"
        );
        let not_allowed = handle(&ctx, &Method::Delete, "/api/v1/vm", b"");
        assert_eq!((not_allowed.status, not_allowed.allow.as_deref()), (405, Some("GET")));
        assert_eq!(handle(&ctx, &Method::Get, "/api/v1/memory/vmem0", b"").status, 405);
        assert_eq!(handle(&ctx, &Method::Get, "/nope", b"").status, 404);
        assert_eq!(handle(&ctx, &Method::Put, "/api/v1/vm/reboot", b"").status, 204);
        assert_eq!(exit.take(), Some(ExitReason::Reset));
        assert_eq!(handle(&ctx, &Method::Put, "/api/v1/vmm/shutdown", b"").status, 204);
        assert_eq!(exit.take(), Some(ExitReason::Shutdown));
    }

    #[test]
    fn every_route_is_answered() {
        let (_exit, ctx) = ctx();
        for (method, template) in ROUTES {
            if template.ends_with("/events") {
                continue; // streamed by `serve`, not `handle`
            }
            let url = template.replace("{id}", "vmem0");
            let method: Method = method.parse().unwrap();
            let status = handle(&ctx, &method, &url, br#"{"requested_size":0}"#).status;
            assert_ne!(status, 404, "{method} {url}");
            assert_ne!(status, 405, "{method} {url}");
        }
    }

    #[test]
    fn proc_status_parses_kilobytes() {
        let s = ProcStatus::parse("VmLck:\t    8 kB\nVmPin:\t 0 kB\nVmRSS:\t  1024 kB\n");
        assert_eq!(
            s,
            ProcStatus {
                rss: 1 << 20,
                locked: 8192,
                pinned: 0
            }
        );
    }
}
