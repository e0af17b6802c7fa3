//! The management API: HTTP/1.1 with JSON bodies on a Unix socket, served
//! by `tiny_http` on a thread of its own. It reads and resizes the
//! virtio-mem devices through their regions and asks the VMM to stop
//! through the [`ExitSignal`]; it never takes a lock a vCPU waits on for
//! long, so a slow client cannot stall the guest.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/v1/vm` | `{"state":"running","uptime_ms":N}` |
//! | GET | `/api/v1/memory` | boot RAM, each virtio-mem device's sizes and unassigned (unplugged) accesses, the RAM blocks' host addresses, host figures |
//! | PUT | `/api/v1/memory/{id}` | body `{"requested_size": BYTES or "1G"}`: 204 |
//! | PUT | `/api/v1/vmm/shutdown` | 204, then the VMM stops |
//!
//! Errors are 4xx with `{"error": "..."}` naming the bad value.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use memvisor_machine::size::parse_size;
use memvisor_virtio_mem::VirtioMemRegion;
use serde::Serialize;
use serde_json::{Value, json};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::exit::{ExitReason, ExitSignal};
use crate::unassigned::UnassignedMemory;

/// Largest request body read; larger ones get 413.
const MAX_BODY: usize = 64 << 10;

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
    /// Where stop requests go.
    pub exit: Arc<ExitSignal>,
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
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(path)?;
        }
        let server = Arc::new(
            Server::http_unix(path)
                .map_err(|e| std::io::Error::other(format!("API socket {}: {e}", path.display())))?,
        );
        let serving = server.clone();
        let thread = std::thread::Builder::new().name("api".into()).spawn(move || {
            for request in serving.incoming_requests() {
                serve(&ctx, request);
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
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }
    fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }
    fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(json!({ "error": message.into() })),
        }
    }
}

fn serve(ctx: &ApiContext, mut request: Request) {
    let method = request.method().clone();
    let url = request.url().to_string();
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
    let result = match answer.body {
        Some(body) => {
            let json = Header::from_bytes("Content-Type", "application/json").expect("a valid header");
            request.respond(
                Response::from_string(body.to_string())
                    .with_status_code(answer.status)
                    .with_header(json),
            )
        }
        None => request.respond(Response::empty(answer.status)),
    };
    if let Err(e) = result {
        log::debug!("API client went away: {e}");
    }
}

/// Answers one request (no I/O: the server does that).
pub fn handle(ctx: &ApiContext, method: &Method, url: &str, body: &[u8]) -> Answer {
    let path = url.split('?').next().unwrap_or(url);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::Get, ["api", "v1", "vm"]) => Answer::ok(json!({
            "state": "running",
            "uptime_ms": ctx.started.elapsed().as_millis() as u64,
        })),
        (Method::Get, ["api", "v1", "memory"]) => Answer::ok(memory(ctx)),
        (Method::Put, ["api", "v1", "memory", id]) => resize(ctx, id, body),
        (Method::Put, ["api", "v1", "vmm", "shutdown"]) => {
            ctx.exit.raise(ExitReason::Shutdown);
            Answer::no_content()
        }
        (
            _,
            ["api", "v1", "vm"]
            | ["api", "v1", "memory"]
            | ["api", "v1", "memory", _]
            | ["api", "v1", "vmm", "shutdown"],
        ) => Answer::error(405, format!("{method} is not allowed on {path}")),
        _ => Answer::error(404, format!("no endpoint {path}")),
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
    json!({
        "boot_ram": ctx.boot_ram,
        "devices": devices,
        "ram_blocks": ctx.ram_blocks,
        "host": {
            "rss_bytes": status.rss,
            "locked_bytes": status.locked,
            "pinned_bytes": status.pinned,
        },
    })
}

fn resize(ctx: &ApiContext, id: &str, body: &[u8]) -> Answer {
    let Some((_, region)) = ctx.vmems.iter().find(|(name, _)| name == id) else {
        let known: Vec<&str> = ctx.vmems.iter().map(|(n, _)| n.as_str()).collect();
        return Answer::error(404, format!("no virtio-mem device `{id}` (devices: {known:?})"));
    };
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Answer::error(400, format!("body is not JSON: {e}")),
    };
    let Some(obj) = value.as_object() else {
        return Answer::error(400, "body must be an object {\"requested_size\": ...}");
    };
    if let Some(unknown) = obj.keys().find(|k| *k != "requested_size") {
        return Answer::error(400, format!("unknown field `{unknown}` (expected requested_size)"));
    }
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
        Ok(()) => Answer::no_content(),
        Err(e) => Answer::error(400, format!("virtio-mem `{id}`: {e}")),
    }
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
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        Self {
            rss: field("VmRSS:"),
            locked: field("VmLck:"),
            pinned: field("VmPin:"),
        }
    }
}

#[cfg(test)]
mod tests {
    use memvisor_machine::{Machine, MachineConfig, RamSpec, VirtioMemSpec};

    use super::*;

    fn ctx() -> (Machine, ApiContext) {
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
        let ctx = ApiContext {
            exit: Arc::new(ExitSignal::new().unwrap()),
            started: Instant::now(),
            boot_ram: 2 << 20,
            vmems,
            ram_blocks: vec![],
            unassigned: Arc::new(UnassignedMemory::for_map(machine.memory())),
        };
        (machine, ctx)
    }

    #[test]
    fn resize_accepts_units_and_names_bad_values() {
        let (machine, ctx) = ctx();
        let put = |body: &str| handle(&ctx, &Method::Put, "/api/v1/memory/vmem0", body.as_bytes());
        assert_eq!(put(r#"{"requested_size":"8M"}"#).status, 204);
        assert_eq!(machine.vmems()[0].region.requested_size(), 8 << 20);
        assert_eq!(put(r#"{"requested_size":4194304}"#).status, 204);
        assert_eq!(machine.vmems()[0].region.requested_size(), 4 << 20);
        let unaligned = put(r#"{"requested_size":"3K"}"#);
        assert_eq!(unaligned.status, 400);
        assert!(
            unaligned.body.unwrap()["error"].as_str().unwrap().contains("0xc00"),
            "names the bad value"
        );
        assert_eq!(put(r#"{"requested_size":"1G"}"#).status, 400, "beyond the region");
        assert_eq!(put("{").status, 400);
        assert_eq!(put(r#"{"requested_size":1,"x":2}"#).status, 400);
        assert_eq!(put(r#"{"requested_size":-1}"#).status, 400);
        assert_eq!(handle(&ctx, &Method::Put, "/api/v1/memory/nope", b"{}").status, 404);
        assert_eq!(
            machine.vmems()[0].region.requested_size(),
            4 << 20,
            "no failed request changed it"
        );
    }

    #[test]
    fn memory_and_vm_and_shutdown() {
        let (_machine, ctx) = ctx();
        let m = handle(&ctx, &Method::Get, "/api/v1/memory", b"");
        let body = m.body.unwrap();
        assert_eq!(body["devices"][0]["region_size"], 64 << 20);
        assert_eq!(body["devices"][0]["plugged_size"], 0);
        ctx.unassigned.read(1 << 32, &mut [0; 4]);
        let body = handle(&ctx, &Method::Get, "/api/v1/memory", b"").body.unwrap();
        assert_eq!(
            body["devices"][0]["unassigned_reads"], 1,
            "an access to an unplugged block is counted"
        );
        assert!(body["host"]["rss_bytes"].as_u64().unwrap() > 0);
        assert_eq!(
            handle(&ctx, &Method::Get, "/api/v1/vm", b"").body.unwrap()["state"],
            "running"
        );
        assert_eq!(handle(&ctx, &Method::Delete, "/api/v1/vm", b"").status, 405);
        assert_eq!(handle(&ctx, &Method::Get, "/nope", b"").status, 404);
        assert_eq!(handle(&ctx, &Method::Put, "/api/v1/vmm/shutdown", b"").status, 204);
        assert_eq!(ctx.exit.take(), Some(ExitReason::Shutdown));
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
