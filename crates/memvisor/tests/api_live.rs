//! The management API of a live VMM, misused and used: `memvisor run` with the idle guest
//! (`crates/vmm/tests/data/idle-pvh.elf`: it writes a line on COM1 at each boot, then halts)
//! and an API socket, then malformed and oversized requests, a client that vanishes
//! mid-request, 50 clients at once, resizes that overtake each other, pause, resume, reboot,
//! power-off and shutdown, and the `memvisor api` client on each endpoint. Nothing may get a
//! 5xx or crash the VMM, which must answer afterwards and exit 0 when told to stop.
//!
//! These tests need `/dev/kvm` (a PVM one does: the guest is tiny) and fail without it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use memvisor_lab::http::{Response, format_request, read_response};
use memvisor_lab::proxy::{Fault, Proxy};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
/// What the idle guest writes on COM1 at each boot.
const BANNER: &str = "memvisor idle guest";

fn memvisor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_memvisor"))
}

fn idle_guest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../vmm/tests/data/idle-pvh.elf")
}

/// `memvisor run` of the idle guest with 64 MiB, no serial and `extra`, expected to refuse
/// to start: its stderr, once it exited 1.
fn refused_run(extra: &[&str]) -> String {
    let out = memvisor()
        .arg("run")
        .arg("--kernel")
        .arg(idle_guest())
        .args(["--memory", "64M", "--serial", "off"])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// A `memvisor run` of the idle guest with 64 MiB of boot RAM and `vmem0` (256 MiB of 2 MiB
/// blocks), its serial console in a file and its API on a socket, in a folder of its own.
struct Vmm {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    serial: PathBuf,
}

impl Vmm {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`Vmm::start`] with more `memvisor run` arguments.
    fn start_with(extra: &[&str]) -> Self {
        let mut vmm = Self::spawn(extra);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The API answers before the first boot has started its vCPUs
            // (state "stopped"); the tests start from a running guest.
            let running = vmm
                .try_call("GET", "/api/v1/vm", None)
                .is_ok_and(|r| r.status == 200 && r.json().is_ok_and(|vm| vm["state"] == "running"));
            if running {
                break;
            }
            if let Some(status) = vmm.child.try_wait().unwrap() {
                panic!("the VMM ended with {status} before answering: {}", vmm.log());
            }
            assert!(
                Instant::now() < deadline,
                "the VMM did not answer within 10 s: {}",
                vmm.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        vmm
    }

    /// Starts `memvisor run` with more arguments, without waiting for anything.
    fn spawn(extra: &[&str]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "memvisor-api-live-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (sock, serial) = (dir.join("api.sock"), dir.join("serial.log"));
        let child = memvisor()
            .arg("run")
            .arg("--kernel")
            .arg(idle_guest())
            .args(["--memory", "64M", "--vmem", "id=vmem0,size=256M,block=2M"])
            .arg("--api-socket")
            .arg(&sock)
            .arg(format!("--serial=file:{}", serial.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("vmm.log")).unwrap())
            .spawn()
            .unwrap();
        Vmm {
            child,
            dir,
            sock,
            serial,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default()
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// One request on a connection of its own; `body` is sent as it is.
    fn try_call(&self, method: &str, path: &str, body: Option<&str>) -> Result<Response, String> {
        let s = UnixStream::connect(&self.sock).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&s).write_all(&format_request(method, path, body.map(str::as_bytes)))
            .map_err(|e| e.to_string())?;
        read_response(&mut BufReader::new(&s), method).map_err(|e| e.to_string())
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.try_call(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; the VMM's log: {}", self.log()))
    }

    fn get(&self, path: &str) -> Value {
        let r = self.call("GET", path, None);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json().unwrap()
    }

    /// Asserts `status` and, for an error, that the message contains `naming`.
    fn expect(&self, method: &str, path: &str, body: Option<&str>, status: u16, naming: &str) {
        let r = self.call(method, path, body);
        assert_eq!(r.status, status, "{method} {path} {body:?}: {}", r.text());
        if status >= 400 {
            assert_eq!(r.header("Content-Type"), Some("application/json"));
            let message = r.json().unwrap()["error"].as_str().unwrap().to_string();
            assert!(
                message.contains(naming),
                "{method} {path} {body:?}: {message:?} names {naming:?}"
            );
        }
    }

    fn requested(&self) -> u64 {
        self.get("/api/v1/memory")["devices"][0]["requested_size"]
            .as_u64()
            .unwrap()
    }

    /// The VMM runs and answers.
    fn assert_alive(&self) -> Value {
        let vm = self.get("/api/v1/vm");
        assert!(["running", "paused"].contains(&vm["state"].as_str().unwrap()), "{vm}");
        vm
    }

    /// Waits up to `limit` for the VMM to end.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the VMM still runs after {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn banners(&self) -> usize {
        std::fs::read_to_string(&self.serial)
            .unwrap_or_default()
            .matches(BANNER)
            .count()
    }

    /// Shuts the VMM down through the API: 204, exit status 0, the socket removed.
    fn shutdown(mut self) {
        self.expect("PUT", "/api/v1/vmm/shutdown", None, 204, "");
        let status = self.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{}", self.log());
        assert!(!self.sock.exists(), "the VMM removes its socket");
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_idle_guest_runs_and_the_vmm_stops_when_told() {
    let vmm = Vmm::start();
    let deadline = Instant::now() + Duration::from_secs(5);
    while vmm.banners() == 0 {
        assert!(Instant::now() < deadline, "the guest wrote nothing on COM1");
        std::thread::sleep(Duration::from_millis(20));
    }
    let vm = vmm.assert_alive();
    assert_eq!((vm["state"].as_str(), vm["boots"].as_u64()), (Some("running"), Some(1)));
    assert_eq!(vm["config"]["memory"], 64 * MIB);
    assert_eq!(vm["config"]["vmem"][0]["id"], "vmem0");
    vmm.shutdown();
}

#[test]
fn malformed_unknown_and_mistyped_requests_get_4xx_naming_the_value() {
    let vmm = Vmm::start();
    let put = |body: &str, status: u16, naming: &str| {
        vmm.expect("PUT", "/api/v1/memory/vmem0", Some(body), status, naming);
    };
    put("{", 400, "not JSON");
    put("{\"requested_size\": 1", 400, "not JSON");
    put("[1,2]", 400, "object");
    put("\"64M\"", 400, "object");
    put("", 400, "requested_size");
    put("{}", 400, "requested_size");
    put(r#"{"requested_size":"64M","colour":"red"}"#, 400, "colour");
    put(r#"{"requested_size":true}"#, 400, "true");
    put(r#"{"requested_size":null}"#, 400, "null");
    put(r#"{"requested_size":[64]}"#, 400, "[64]");
    put(r#"{"requested_size":-2097152}"#, 400, "-2097152");
    put(r#"{"requested_size":1.5}"#, 400, "1.5");
    put(r#"{"requested_size":"lots"}"#, 400, "lots");
    put(r#"{"requested_size":"3K"}"#, 400, "0xc00");
    put(r#"{"requested_size":"1G"}"#, 400, "vmem0");
    put(r#"{"requested_size":18446744073709551616}"#, 400, "not a byte count");
    let off = |body: &str, naming: &str| {
        vmm.expect("PUT", "/api/v1/vm/power-off", Some(body), 400, naming);
    };
    off("{", "not JSON");
    off(r#"{"timeout_s":0}"#, "timeout_s 0");
    off(r#"{"timeout_s":601}"#, "timeout_s 601");
    off(r#"{"timeout_s":"30"}"#, "\"30\"");
    off(r#"{"timeout_s":2.5}"#, "2.5");
    off(r#"{"timeout":5}"#, "timeout");
    vmm.expect(
        "PUT",
        "/api/v1/memory/vmem9",
        Some(r#"{"requested_size":0}"#),
        404,
        "vmem9",
    );
    vmm.expect("GET", "/api/v1/nothing", None, 404, "/api/v1/nothing");
    vmm.expect("GET", "/api/v2/vm", None, 404, "/api/v2/vm");
    vmm.expect("DELETE", "/api/v1/vm", None, 405, "DELETE");
    vmm.expect("GET", "/api/v1/vmm/shutdown", None, 405, "GET");
    vmm.expect("POST", "/api/v1/memory/vmem0", Some("{}"), 405, "POST");
    assert_eq!(vmm.requested(), 0, "no refused request changed anything");
    assert_eq!(
        vmm.assert_alive()["state"],
        "running",
        "no refused power-off pressed the button"
    );
    vmm.shutdown();
}

#[test]
fn a_10_mib_body_is_refused_or_dropped_and_the_vmm_answers_on() {
    let vmm = Vmm::start();
    let body = vec![b' '; 10 << 20];
    // With its length announced, then sent in chunked encoding without one.
    for chunked in [false, true] {
        let s = vmm.connect();
        let head = if chunked {
            "PUT /api/v1/memory/vmem0 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
        } else {
            format!(
                "PUT /api/v1/memory/vmem0 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
        };
        let writer = {
            let mut s = s.try_clone().unwrap();
            let body = body.clone();
            std::thread::spawn(move || {
                s.write_all(head.as_bytes())?;
                for piece in body.chunks(1 << 20) {
                    if chunked {
                        write!(s, "{:x}\r\n", piece.len())?;
                    }
                    s.write_all(piece)?;
                    if chunked {
                        s.write_all(b"\r\n")?;
                    }
                }
                if chunked {
                    s.write_all(b"0\r\n\r\n")?;
                }
                Ok::<_, std::io::Error>(())
            })
        };
        match read_response(&mut BufReader::new(&s), "PUT") {
            Ok(r) => {
                assert_eq!(r.status, 413, "chunked {chunked}: {}", r.text());
                assert!(r.error_message().contains("65536"), "{}", r.error_message());
            }
            Err(e) => eprintln!("chunked {chunked}: the connection was dropped: {e}"),
        }
        // The writer ends, whether the VMM read everything or closed the connection.
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = writer.join().unwrap();
        vmm.assert_alive();
    }
    assert_eq!(vmm.requested(), 0);
    vmm.shutdown();
}

/// Requests cut short: in the request line, in the body (by length and chunked), in the
/// header, and not HTTP at all.
const HALVES: [&[u8]; 6] = [
    b"GET /api/v1/v",
    b"PUT /api/v1/memory/vmem0 HTTP/1.1\r\nContent-Length: 60000\r\n\r\n{\"requested_",
    b"PUT /api/v1/memory/vmem0 HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"requested_",
    b"PUT /api/v1/memory/vmem0 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"requ",
    b"GET /api/v1/vm HTTP/1.1\r\nHost: x\r\nX-Unfinished: ",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
];

#[test]
fn clients_that_vanish_mid_request_do_no_harm() {
    let vmm = Vmm::start();
    for half in HALVES {
        let mut s = vmm.connect();
        s.write_all(half).unwrap();
        drop(s);
        vmm.assert_alive();
    }
    // A request sent a byte at a time is answered.
    let mut s = vmm.connect();
    for b in format_request("GET", "/api/v1/memory", None) {
        s.write_all(&[b]).unwrap();
    }
    let r = read_response(&mut BufReader::new(&s), "GET").unwrap();
    assert_eq!(r.json().unwrap()["devices"][0]["requested_size"], 0);
    assert_eq!(vmm.requested(), 0);
    vmm.shutdown();
}

#[test]
fn a_client_stalled_mid_request_does_not_hold_up_the_others() {
    let vmm = Vmm::start();
    let mut stalls = Vec::new();
    for half in HALVES {
        let mut stalled = vmm.connect();
        stalled.write_all(half).unwrap();
        // Another client, while this one holds its half request.
        let t = Instant::now();
        let s = vmm.connect();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        (&s).write_all(&format_request("GET", "/api/v1/vm", None)).unwrap();
        match read_response(&mut BufReader::new(&s), "GET") {
            Ok(r) if r.status == 200 => {}
            other => stalls.push(format!(
                "{:?}: {:?} after {:?}",
                String::from_utf8_lossy(half),
                other.map(|r| r.status),
                t.elapsed()
            )),
        }
        drop(stalled);
        // The API recovers once the stalled client is gone.
        vmm.assert_alive();
    }
    assert!(stalls.is_empty(), "a stalled client held up the API: {stalls:#?}");
    vmm.shutdown();
}

#[test]
fn fifty_clients_at_once_are_all_answered() {
    let vmm = Vmm::start();
    let statuses: Vec<Vec<(String, u16)>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..50u64)
            .map(|i| {
                let vmm = &vmm;
                scope.spawn(move || {
                    let size = format!(r#"{{"requested_size":{}}}"#, (i % 8) * 2 * MIB);
                    let requests = [
                        ("GET", "/api/v1/vm", None),
                        ("GET", "/api/v1/memory", None),
                        ("PUT", "/api/v1/memory/vmem0", Some(size.as_str())),
                        ("GET", "/api/v1/dma", None),
                        ("PUT", "/api/v1/memory/vmem0", Some("{")),
                    ];
                    requests
                        .iter()
                        .map(|(m, p, b)| (format!("{m} {p}"), vmm.call(m, p, *b).status))
                        .collect()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for answers in statuses {
        let got: Vec<u16> = answers.iter().map(|(_, s)| *s).collect();
        assert_eq!(got, [200, 200, 204, 200, 400], "{answers:?}");
    }
    assert!(vmm.requested() < 16 * MIB);
    assert_eq!(vmm.requested() % (2 * MIB), 0);
    vmm.shutdown();
}

#[test]
fn a_resize_overtaking_one_in_progress_wins() {
    let vmm = Vmm::start();
    // The idle guest has no virtio-mem driver: a resize stays in progress (nothing plugged).
    vmm.expect(
        "PUT",
        "/api/v1/memory/vmem0",
        Some(r#"{"requested_size":"128M"}"#),
        204,
        "",
    );
    let device = &vmm.get("/api/v1/memory")["devices"][0];
    assert_eq!(
        (device["requested_size"].as_u64(), device["plugged_size"].as_u64()),
        (Some(128 * MIB), Some(0))
    );
    vmm.expect(
        "PUT",
        "/api/v1/memory/vmem0",
        Some(r#"{"requested_size":33554432}"#),
        204,
        "",
    );
    assert_eq!(vmm.requested(), 32 * MIB, "the later request wins");
    // Racing: each thread's last word is recorded; the value read is one of them, and a
    // request sent after all of them wins.
    std::thread::scope(|scope| {
        for i in 1..=8u64 {
            let vmm = &vmm;
            scope.spawn(move || {
                for _ in 0..10 {
                    let body = format!(r#"{{"requested_size":"{}M"}}"#, i * 16);
                    assert_eq!(vmm.call("PUT", "/api/v1/memory/vmem0", Some(&body)).status, 204);
                }
            });
        }
    });
    let raced = vmm.requested();
    assert!(
        raced % (16 * MIB) == 0 && (16 * MIB..=128 * MIB).contains(&raced),
        "{raced}"
    );
    vmm.expect(
        "PUT",
        "/api/v1/memory/vmem0",
        Some(r#"{"requested_size":"2M"}"#),
        204,
        "",
    );
    assert_eq!(vmm.requested(), 2 * MIB);
    vmm.shutdown();
}

#[test]
fn pause_resume_and_reboot() {
    let vmm = Vmm::start();
    vmm.expect("PUT", "/api/v1/vm/pause", None, 204, "");
    assert_eq!(vmm.get("/api/v1/vm")["state"], "paused");
    vmm.expect("PUT", "/api/v1/vm/pause", None, 409, "paused");
    // A paused VM is still resized and answered.
    vmm.expect(
        "PUT",
        "/api/v1/memory/vmem0",
        Some(r#"{"requested_size":"8M"}"#),
        204,
        "",
    );
    vmm.expect("PUT", "/api/v1/vm/resume", None, 204, "");
    assert_eq!(vmm.get("/api/v1/vm")["state"], "running");
    vmm.expect("PUT", "/api/v1/vm/resume", None, 409, "not paused");
    vmm.expect("PUT", "/api/v1/vm/reboot", None, 204, "");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(vmm.get("/api/v1/vm")["boots"] == 2 && vmm.banners() == 2) {
        assert!(Instant::now() < deadline, "no second boot: {}", vmm.get("/api/v1/vm"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(vmm.get("/api/v1/vm")["state"], "running");
    assert_eq!(vmm.requested(), 8 * MIB, "a reset keeps the requested size");
    vmm.shutdown();
}

#[test]
fn power_off_stops_a_guest_that_ignores_the_button_after_the_timeout() {
    let mut vmm = Vmm::start();
    let t = Instant::now();
    let r = vmm.call("PUT", "/api/v1/vm/power-off", Some(r#"{"timeout_s":1}"#));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json().unwrap(), json!({"timeout_s": 1}));
    let status = vmm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", vmm.log());
    assert!(t.elapsed() >= Duration::from_secs(1), "stopped after {:?}", t.elapsed());
}

/// Reads the event stream's head, then up to `n` events or `limit`.
fn events(s: &UnixStream, n: usize, limit: Duration) -> (Response, Vec<Value>) {
    events_until(s, n, None, limit)
}

/// [`events`], ending early after an event of kind `last`.
fn events_until(s: &UnixStream, n: usize, last: Option<&str>, limit: Duration) -> (Response, Vec<Value>) {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)
            .unwrap_or_else(|e| panic!("no answer head within {limit:?}: {e}"));
        if line == "\r\n" {
            break;
        }
        if head.is_empty() {
            head = line.trim_end().to_string();
        } else if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    let resp = Response {
        status,
        reason: String::new(),
        headers,
        body: Vec::new(),
    };
    let mut seen = Vec::new();
    let mut pending = Vec::new();
    while seen.len() < n {
        let mut size = String::new();
        if r.read_line(&mut size).is_err() || size.is_empty() {
            break;
        }
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        let mut chunk = vec![0; size + 2];
        r.read_exact(&mut chunk).unwrap();
        pending.extend_from_slice(&chunk[..size]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if line.len() > 1 {
                seen.push(serde_json::from_slice::<Value>(&line).unwrap());
            }
        }
        if last.is_some_and(|kind| seen.iter().any(|e| e["event"] == kind)) {
            break;
        }
    }
    (resp, seen)
}

#[test]
fn events_come_as_they_happen() {
    let vmm = Vmm::start();
    let s = vmm.connect();
    // From the first event kept, so that none is missed however late the subscription lands.
    (&s).write_all(&format_request("GET", "/api/v1/events?after=0", None))
        .unwrap();
    vmm.expect(
        "PUT",
        "/api/v1/memory/vmem0",
        Some(r#"{"requested_size":"64M"}"#),
        204,
        "",
    );
    vmm.expect("PUT", "/api/v1/vm/pause", None, 204, "");
    vmm.expect("PUT", "/api/v1/vm/resume", None, 204, "");
    let (head, seen) = events_until(&s, 64, Some("resumed"), Duration::from_secs(5));
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Content-Type"), Some("application/x-ndjson"));
    assert_eq!(head.header("Transfer-Encoding"), Some("chunked"));
    let kinds: Vec<&str> = seen.iter().map(|e| e["event"].as_str().unwrap()).collect();
    let requested = seen.iter().find(|e| e["event"] == "size-requested").unwrap();
    assert_eq!(
        (&requested["id"], &requested["requested_size"]),
        (&json!("vmem0"), &json!(64 * MIB))
    );
    assert!(kinds.ends_with(&["paused", "resumed"]), "{kinds:?}");
    assert!(seen.iter().all(|e| e["time_ms"].is_u64()));
    drop(s);
    vmm.assert_alive();
    vmm.shutdown();
}

#[test]
fn an_event_stream_with_a_count_ends_after_it() {
    let vmm = Vmm::start();
    let s = vmm.connect();
    (&s).write_all(&format_request("GET", "/api/v1/events?count=2", None))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    vmm.expect("PUT", "/api/v1/vm/pause", None, 204, "");
    vmm.expect("PUT", "/api/v1/vm/resume", None, 204, "");
    vmm.expect("PUT", "/api/v1/vm/pause", None, 204, "");
    let (head, seen) = events(&s, 3, Duration::from_secs(5));
    assert_eq!(head.status, 200);
    let kinds: Vec<&str> = seen.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["paused", "resumed"]);
    vmm.expect("GET", "/api/v1/events?count=many", None, 400, "many");
    vmm.shutdown();
}

fn api(vmm: &Vmm, args: &[&str]) -> Output {
    let out = memvisor()
        .arg("api")
        .arg("--socket")
        .arg(&vmm.sock)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "memvisor api {args:?}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn the_client_drives_every_endpoint() {
    let mut vmm = Vmm::start();
    let vm = stdout(&api(&vmm, &["vm"]));
    assert!(vm.starts_with("running, up "), "{vm}");
    assert!(
        vm.contains(", boot 1\nkernel ") && vm.contains("virtio-mem vmem0 (256.0 MiB)"),
        "{vm}"
    );
    let json: Value = serde_json::from_slice(&api(&vmm, &["--json", "vm"]).stdout).unwrap();
    assert_eq!(json["boots"], 1);
    assert_eq!(
        stdout(&api(&vmm, &["resize", "vmem0", "64M"])),
        "vmem0: requested 64.0 MiB (67108864 bytes)\n"
    );
    let memory = stdout(&api(&vmm, &["memory"]));
    assert!(
        memory.starts_with("boot RAM: 64.0 MiB\nvmem0: plugged 0 B of 256.0 MiB (requested 64.0 MiB"),
        "{memory}"
    );
    let dma = stdout(&api(&vmm, &["dma"]));
    assert!(
        dma.starts_with("DMA: pinned 0 B (distinct 0 B), budget unlimited\n"),
        "{dma}"
    );
    assert_eq!(stdout(&api(&vmm, &["pause"])), "paused\n");
    let again = memvisor()
        .arg("api")
        .arg("--socket")
        .arg(&vmm.sock)
        .arg("pause")
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1), "a 409 is exit status 1");
    assert!(String::from_utf8_lossy(&again.stderr).contains("409 Conflict"));
    assert_eq!(stdout(&api(&vmm, &["resume"])), "running\n");
    // Events: a client waiting for two, then two things happen.
    let waiting = memvisor()
        .arg("api")
        .arg("--socket")
        .arg(&vmm.sock)
        .args(["--json", "events", "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    api(&vmm, &["pause"]);
    api(&vmm, &["resume"]);
    let out = waiting.wait_with_output().unwrap();
    let kinds: Vec<String> = stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["paused", "resumed"]);
    assert_eq!(stdout(&api(&vmm, &["reboot"])), "the machine resets and boots again\n");
    assert_eq!(stdout(&api(&vmm, &["shutdown"])), "the VMM is shutting down\n");
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let gone = memvisor()
        .arg("api")
        .arg("--socket")
        .arg(&vmm.sock)
        .arg("vm")
        .output()
        .unwrap();
    assert_eq!(gone.status.code(), Some(2), "no VMM: exit status 2");
}

/// A zero-copy disk is an assigned device of the DMA layer: without a
/// vIOMMU its pinner holds all boot RAM (64 MiB), really pinned (`VmPin`);
/// behind one it holds what the guest maps (the idle guest maps nothing).
#[test]
fn a_zero_copy_disk_pins_like_an_assigned_device() {
    let image = std::env::temp_dir().join(format!("memvisor-api-live-zc-{}.img", std::process::id()));
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("id=disk0,path={},zero-copy=on", image.display());
    for (extra, pinned, path) in [(vec![], 64 * MIB, "ram"), (vec!["--viommu"], 0, "viommu")] {
        let mut args = vec!["--disk", disk.as_str()];
        args.extend(extra);
        let vmm = Vmm::start_with(&args);
        let dma = vmm.call("GET", "/api/v1/dma", None).json().unwrap();
        assert_eq!(dma["pinned_bytes"], pinned, "{dma}");
        assert_eq!(
            (&dma["devices"][0]["name"], &dma["devices"][0]["path"]),
            (&json!("disk0"), &json!(path)),
            "{dma}"
        );
        let memory = vmm.call("GET", "/api/v1/memory", None).json().unwrap();
        assert!(memory["host"]["pinned_bytes"].as_u64().unwrap() >= pinned, "{memory}");
        vmm.shutdown();
    }
    // A pin budget: the zero-copy disk's 64 MiB of boot RAM fits in 128M...
    let vmm = Vmm::start_with(&["--disk", disk.as_str(), "--pin-budget", "128M"]);
    let dma = vmm.call("GET", "/api/v1/dma", None).json().unwrap();
    assert_eq!(
        (&dma["pin_budget"], &dma["distinct_pinned_bytes"]),
        (&json!(128 * MIB), &json!(64 * MIB)),
        "{dma}"
    );
    vmm.shutdown();
    // ...but not in 32M: the VMM refuses to start, naming the budget.
    let stderr = refused_run(&["--disk", disk.as_str(), "--pin-budget", "32M"]);
    assert!(stderr.contains("pin budget exceeded"), "{stderr}");
    std::fs::remove_file(&image).unwrap();
}

/// A long poll (`?after=SEQ&timeout_ms=T`) is an ordinary response: it gives every event
/// after SEQ, kept or new, ends after T, and the connection then serves the next request —
/// what a client with one connection (the lab's relay) needs to follow events.
#[test]
fn a_long_poll_resumes_after_a_sequence_number_and_keeps_the_connection() {
    let vmm = Vmm::start();
    vmm.expect("PUT", "/api/v1/vm/pause", None, 204, "");
    vmm.expect("PUT", "/api/v1/vm/resume", None, 204, "");
    let s = vmm.connect();
    let mut r = BufReader::new(&s);
    let mut poll = |after: u64| -> Vec<Value> {
        let path = format!("/api/v1/events?after={after}&timeout_ms=300");
        (&s).write_all(&format_request("GET", &path, None)).unwrap();
        let resp = read_response(&mut r, "GET").unwrap();
        assert_eq!(resp.status, 200);
        resp.text()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let all = poll(0);
    let kinds: Vec<&str> = all.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert!(kinds.ends_with(&["paused", "resumed"]), "{kinds:?}");
    let last = all.last().unwrap()["seq"].as_u64().unwrap();
    assert!(poll(last).is_empty(), "nothing new");
    vmm.expect("PUT", "/api/v1/vm/pause", None, 204, "");
    let next = poll(last);
    assert_eq!((next.len(), &next[0]["event"]), (1, &json!("paused")));
    assert_eq!(next[0]["seq"].as_u64(), Some(last + 1));
    // The same connection still answers.
    (&s).write_all(&format_request("GET", "/api/v1/vm", None)).unwrap();
    assert_eq!(read_response(&mut r, "GET").unwrap().status, 200);
    vmm.expect("GET", "/api/v1/events?timeout_ms=600001", None, 400, "600000");
    vmm.expect("GET", "/api/v1/events?after=x", None, 400, "after=x");
    vmm.shutdown();
}

#[test]
fn a_snapshot_of_the_paused_guest_continues_in_a_new_vmm_without_booting_again() {
    let vmm = Vmm::start();
    let deadline = Instant::now() + Duration::from_secs(5);
    while vmm.banners() == 0 {
        assert!(Instant::now() < deadline, "the guest wrote nothing on COM1");
        std::thread::sleep(Duration::from_millis(20));
    }
    let file = std::env::temp_dir().join(format!("memvisor-snapshot-{}.vmstate", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let body = json!({ "path": file }).to_string();
    vmm.expect("PUT", "/api/v1/vm/snapshot", Some(&body), 409, "paused");
    vmm.expect(
        "PUT",
        "/api/v1/vm/snapshot",
        Some(r#"{"path":"relative.snap"}"#),
        400,
        "absolute",
    );
    vmm.expect(
        "PUT",
        "/api/v1/vm/snapshot",
        Some(r#"{"path":"/nonexistent-folder/x"}"#),
        400,
        "folder",
    );
    vmm.expect("PUT", "/api/v1/vm/pause", None, 204, "");
    let r = vmm.call("PUT", "/api/v1/vm/snapshot", Some(&body));
    assert_eq!(r.status, 200, "{}: {}", r.text(), vmm.log());
    let summary = r.json().unwrap();
    let bytes = std::fs::metadata(&file).unwrap().len();
    assert_eq!(summary["bytes"].as_u64(), Some(bytes), "{summary}");
    // 64 MiB of boot RAM that the guest never touched but for its code: zero pages are
    // not written out.
    assert!(bytes < MIB, "{bytes} bytes");
    vmm.expect("PUT", "/api/v1/vm/snapshot", Some(&body), 409, "exists");
    assert_eq!(vmm.get("/api/v1/vm")["state"], "paused");
    vmm.shutdown();

    // Another shape is refused, naming the difference, before anything runs.
    let err = refused_run(&[
        "--vmem",
        "id=vmem0,size=256M,block=2M",
        "--cpus",
        "2",
        "--restore",
        file.to_str().unwrap(),
    ]);
    assert!(err.contains("vCPU count is 1 but this VM's is 2"), "{err}");

    // The same shape continues the guest: it runs, halted where it was, and does not
    // boot again (a boot writes the banner).
    let restored = Vmm::start_with(&["--restore", file.to_str().unwrap()]);
    let vm = restored.assert_alive();
    assert_eq!((vm["state"].as_str(), vm["boots"].as_u64()), (Some("running"), Some(1)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(restored.banners(), 0, "the restored guest booted again");
    // It still reboots into the kernel when asked.
    restored.expect("PUT", "/api/v1/vm/reboot", None, 204, "");
    let deadline = Instant::now() + Duration::from_secs(5);
    while restored.banners() == 0 {
        assert!(Instant::now() < deadline, "no boot after the restored guest's reboot");
        std::thread::sleep(Duration::from_millis(20));
    }
    restored.shutdown();
    let _ = std::fs::remove_file(&file);
}

/// A destination VMM: the same machine as [`Vmm::start`] (plus `extra`), waiting for a
/// migration on a socket in its folder; returns it and the endpoint.
fn destination(extra: &[&str]) -> (Vmm, String) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let listen = std::env::temp_dir().join(format!(
        "memvisor-migrate-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let endpoint = format!("unix:{}", listen.display());
    let mut args = vec!["--incoming", endpoint.as_str()];
    args.extend_from_slice(extra);
    let vmm = Vmm::spawn(&args);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listen.exists() || !vmm.sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the destination does not listen: {}",
            vmm.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (vmm, endpoint)
}

fn wait_banner(vmm: &Vmm) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while vmm.banners() == 0 {
        assert!(Instant::now() < deadline, "the guest wrote nothing on COM1");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_running_guest_migrates_to_another_vmm_and_the_source_exits() {
    let mut source = Vmm::start();
    wait_banner(&source);
    let (dst, endpoint) = destination(&[]);
    assert_eq!(dst.get("/api/v1/vm")["state"], "stopped", "waiting for the source");
    source.expect(
        "PUT",
        "/api/v1/vm/migrate",
        Some(r#"{"destination":"ftp:x"}"#),
        400,
        "unix:PATH",
    );
    let bad = json!({ "destination": endpoint, "downtime_ms": 0 }).to_string();
    source.expect("PUT", "/api/v1/vm/migrate", Some(&bad), 400, "downtime_ms 0");
    let bad = json!({ "destination": endpoint, "max_passes": 101 }).to_string();
    source.expect("PUT", "/api/v1/vm/migrate", Some(&bad), 400, "max_passes 101");
    // Every pass is an event: read them from the source while it migrates.
    let stream = source.connect();
    (&stream)
        .write_all(&format_request("GET", "/api/v1/events?after=0", None))
        .unwrap();
    let body = json!({ "destination": endpoint, "downtime_ms": 50, "max_passes": 2 });
    let r = source.call("PUT", "/api/v1/vm/migrate", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}: {}", r.text(), dst.log());
    let m = r.json().unwrap();
    assert!(m["bytes"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["destination_report"]["bytes"], m["last_stream_bytes"], "{m}");
    // The first pass sends what is populated and not zero: of 64 MiB, the guest's code.
    assert!(m["precopy_bytes"].as_u64().unwrap() < MIB, "{m}");
    assert_eq!(m["populated_bytes"].as_u64(), Some(64 * MIB), "{m}");
    let (_, seen) = events_until(&stream, 64, Some("migration-completed"), Duration::from_secs(5));
    let pass = seen.iter().find(|e| e["event"] == "migration-pass").unwrap();
    assert_eq!(pass["pass"], 0, "{pass}");
    assert_eq!(pass["bytes"], m["precopy_bytes"], "{pass}");
    assert!(
        m["downtime_ms"].as_u64().unwrap() <= m["total_ms"].as_u64().unwrap(),
        "{m}"
    );
    let status = source.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", source.log());
    // The guest runs at the destination, where it did not boot (a boot writes the banner).
    let vm = dst.assert_alive();
    assert_eq!((vm["state"].as_str(), vm["boots"].as_u64()), (Some("running"), Some(1)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dst.banners(), 0, "the migrated guest booted again");
    dst.shutdown();
}

#[test]
fn a_failed_migration_leaves_the_guest_running_at_the_source() {
    let source = Vmm::start();
    wait_banner(&source);
    // Nobody listens.
    let nowhere = format!("unix:{}/nobody.sock", source.dir.display());
    source.expect(
        "PUT",
        "/api/v1/vm/migrate",
        Some(&json!({ "destination": nowhere }).to_string()),
        409,
        "connecting",
    );
    assert_eq!(source.get("/api/v1/vm")["state"], "running");

    // A destination of another shape refuses before anything runs there, naming why.
    let (mut dst, endpoint) = destination(&["--cpus", "2"]);
    source.expect(
        "PUT",
        "/api/v1/vm/migrate",
        Some(&json!({ "destination": endpoint }).to_string()),
        409,
        "vCPU count is 1 but this VM's is 2",
    );
    assert_eq!(dst.wait_exit(Duration::from_secs(10)).code(), Some(1));
    assert!(dst.log().contains("vCPU count"), "{}", dst.log());
    assert_eq!(source.get("/api/v1/vm")["state"], "running");

    // A byte flipped on the way: the destination finds it, refuses, and pins nothing.
    for (what, fault) in [("flipped", Fault::Flip(20_000)), ("cut", Fault::Cut(20_000))] {
        let (mut dst, endpoint) = destination(&[]);
        let link = faulty_link(&endpoint, fault);
        let r = source.call(
            "PUT",
            "/api/v1/vm/migrate",
            Some(&json!({ "destination": link }).to_string()),
        );
        assert_eq!(r.status, 409, "{what}: {}", r.text());
        assert_eq!(dst.wait_exit(Duration::from_secs(10)).code(), Some(1), "{what}");
        if what == "flipped" {
            assert!(dst.log().contains("checksum"), "{what}: {}", dst.log());
        }
        // The source took its guest back: it runs, and a second try works.
        assert_eq!(source.get("/api/v1/vm")["state"], "running", "{what}");
    }
    let (dst, endpoint) = destination(&[]);
    let r = source.call(
        "PUT",
        "/api/v1/vm/migrate",
        Some(&json!({ "destination": endpoint }).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    dst.shutdown();
}

/// Starts a relay to the migration endpoint `destination` (`unix:PATH`) that breaks the
/// source's stream as `fault` says; returns the endpoint the source migrates to.
fn faulty_link(destination: &str, fault: Fault) -> String {
    let target = PathBuf::from(destination.trim_start_matches("unix:"));
    let listen = PathBuf::from(format!("{}.proxy", target.display()));
    let proxy = Proxy::bind(&listen, &target, fault).unwrap();
    std::thread::spawn(move || proxy.relay_one());
    format!("unix:{}", listen.display())
}

#[test]
fn a_source_killed_after_it_sent_go_leaves_the_guest_running_at_the_destination() {
    use memvisor_vmm::migration::{Frame, read_frame, write_frame};
    let mut source = Vmm::start();
    wait_banner(&source);
    let (dst, endpoint) = destination(&[]);
    // A relay that passes the source's stream and the destination's READY, but keeps its
    // RUNNING: the source has sent GO and never learns how it ended.
    let target = PathBuf::from(endpoint.trim_start_matches("unix:"));
    let listen = PathBuf::from(format!("{}.relay", target.display()));
    let listener = std::os::unix::net::UnixListener::bind(&listen).unwrap();
    let (ran_tx, ran_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (from_source, _) = listener.accept().unwrap();
        let to_destination = UnixStream::connect(&target).unwrap();
        let (mut up_in, mut up_out) = (from_source.try_clone().unwrap(), to_destination.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut up_in, &mut up_out));
        let (mut back_in, mut back_out) = (to_destination, from_source);
        while let Ok(frame) = read_frame(&mut back_in) {
            if frame == Frame::Running {
                let _ = ran_tx.send(());
                // Held open, silent: the source waits for RUNNING until it is killed.
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
            write_frame(&mut back_out, &frame).unwrap();
        }
    });
    let link = format!("unix:{}", listen.display());
    let call = {
        let sock = source.sock.clone();
        let body = json!({ "destination": link }).to_string();
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(sock).unwrap();
            s.write_all(&format_request("PUT", "/api/v1/vm/migrate", Some(body.as_bytes())))
                .unwrap();
            read_response(&mut BufReader::new(s), "PUT")
        })
    };
    ran_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the destination never ran the guest: {}", dst.log()));
    // The source sent GO and waits: kill it there.
    source.child.kill().unwrap();
    let status = source.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), None, "killed by a signal: {status:?}");
    assert!(call.join().unwrap().is_err(), "the killed source answered");
    // The destination owns the guest: it runs, did not boot again, and obeys.
    for _ in 0..3 {
        let vm = dst.assert_alive();
        assert_eq!((vm["state"].as_str(), vm["boots"].as_u64()), (Some("running"), Some(1)));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dst.banners(), 0, "the migrated guest booted again");
    dst.expect("PUT", "/api/v1/vm/pause", None, 204, "");
    assert_eq!(dst.get("/api/v1/vm")["state"], "paused");
    dst.expect("PUT", "/api/v1/vm/resume", None, 204, "");
    assert_eq!(dst.get("/api/v1/vm")["state"], "running");
    dst.shutdown();
    let _ = std::fs::remove_file(&listen);
}

#[test]
fn a_guest_migrates_over_tcp_too() {
    let mut source = Vmm::start();
    wait_banner(&source);
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let endpoint = format!("tcp:127.0.0.1:{port}");
    let dst = Vmm::spawn(&["--incoming", endpoint.as_str()]);
    // Until the destination listens, a migration is refused (connection refused) and the
    // guest keeps running here.
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = source.call(
            "PUT",
            "/api/v1/vm/migrate",
            Some(&json!({ "destination": endpoint }).to_string()),
        );
        if r.status == 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(r.status, 200, "{}: {}", r.text(), dst.log());
    assert_eq!(source.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let vm = dst.assert_alive();
    assert_eq!(vm["state"], "running");
    assert_eq!(dst.banners(), 0, "the migrated guest booted again");
    dst.shutdown();
}

#[test]
fn a_zero_copy_disk_migrates_its_image_lock_and_pins() {
    let image = std::env::temp_dir().join(format!("memvisor-api-live-zc-mig-{}.img", std::process::id()));
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("id=disk0,path={},zero-copy=on", image.display());
    let mut source = Vmm::start_with(&["--disk", disk.as_str()]);
    wait_banner(&source);
    assert_eq!(source.get("/api/v1/dma")["pinned_bytes"], 64 * MIB);
    // The destination opens the image the source holds locked: it waits for the handover.
    let (dst, endpoint) = destination(&["--disk", disk.as_str()]);
    let r = source.call(
        "PUT",
        "/api/v1/vm/migrate",
        Some(&json!({ "destination": endpoint }).to_string()),
    );
    assert_eq!(r.status, 200, "{}: {}", r.text(), dst.log());
    assert_eq!(source.wait_exit(Duration::from_secs(10)).code(), Some(0));
    // The destination re-pinned what the restored state allows (all boot RAM, the disk
    // being outside any vIOMMU), from its own state: pins never travel.
    let dma = dst.get("/api/v1/dma");
    assert_eq!(
        (&dma["pinned_bytes"], &dma["devices"][0]["path"]),
        (&json!(64 * MIB), &json!("ram")),
        "{dma}"
    );
    // It holds the image now: a third user is refused.
    let err = refused_run(&["--disk", disk.as_str()]);
    assert!(err.contains("locked by another user"), "{err}");
    dst.shutdown();
    std::fs::remove_file(&image).unwrap();
}

#[test]
fn a_disk_whose_writes_cannot_be_synced_fails_the_migration_and_the_guest_runs_on() {
    // /dev/null takes writes but cannot sync them (fdatasync: EINVAL): the source syncs every
    // disk before the switch-over, so the migration fails there, before GO.
    let disk = "id=disk0,path=/dev/null";
    let source = Vmm::start_with(&["--disk", disk]);
    wait_banner(&source);
    let (mut dst, endpoint) = destination(&["--disk", disk]);
    source.expect(
        "PUT",
        "/api/v1/vm/migrate",
        Some(&json!({ "destination": endpoint }).to_string()),
        409,
        "disk `disk0`: virtio-blk image /dev/null: fdatasync",
    );
    // The destination never got GO: it gives up, and the guest runs on at the source.
    assert_eq!(dst.wait_exit(Duration::from_secs(10)).code(), Some(1), "{}", dst.log());
    assert_eq!(source.get("/api/v1/vm")["state"], "running");
    source.shutdown();
}
