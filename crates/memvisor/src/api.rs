//! `memvisor api`: the management API's client. `vm`, `memory`, `resize ID SIZE` and
//! `shutdown` each send one request to the VMM's `--api-socket` (HTTP/1.1 with JSON, the
//! lab's small client `memvisor_lab::http`) and print text, or the API's JSON with `--json`.
//! `pipe` relays stdin and stdout to the socket, byte for byte, until either side closes:
//! the guest lab's L1 relays the API to the host with it (busybox `nc` cannot reach a Unix
//! socket).
//!
//! Exit status: 0 done, 1 the API answered with an error (its message is printed), 2 no
//! answer (no socket, a broken connection, not the API).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use memvisor_lab::http::{Client, Response};
use memvisor_lab::memvisor::{MemoryInfo, VmInfo, path};
use serde_json::json;

use crate::size::{human, parse_size};

/// The arguments of `memvisor api`.
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// The VMM's API socket (the path given to `memvisor run --api-socket`).
    #[arg(long)]
    socket: PathBuf,
    /// Print the API's JSON answer as it came instead of text (nothing for the 204 answers
    /// of `resize` and `shutdown`).
    #[arg(long, global = true)]
    json: bool,
    /// What to ask.
    #[command(subcommand)]
    command: ApiCommand,
}

/// One request (or the relay).
#[derive(Debug, clap::Subcommand)]
enum ApiCommand {
    /// The VM's state and uptime (GET /api/v1/vm).
    Vm,
    /// Boot RAM, the virtio-mem devices, the RAM blocks and the VMM's RSS and pinned memory
    /// (GET /api/v1/memory).
    Memory,
    /// Ask the guest to plug or unplug memory of a virtio-mem device until SIZE is plugged
    /// (PUT /api/v1/memory/ID); the guest does it in its own time: watch `memory`.
    Resize {
        /// The device's id (`--vmem id=...`).
        id: String,
        /// The size to plug (e.g. 0, 256M, 1G).
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Stop the VMM (PUT /api/v1/vmm/shutdown).
    Shutdown,
    /// Copy stdin to the socket and the socket to stdout until either side closes, waiting
    /// for the socket to appear first (the relay starts with the VMM).
    Pipe {
        /// How long to wait for the socket, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
}

/// A failure: the exit status and the message.
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
fn call(socket: &Path, method: &str, uri: &str, body: Option<&serde_json::Value>) -> Result<Response, Failure> {
    let mut client = Client::connect(socket).map_err(|e| Failure(2, message(e)))?;
    let resp = client.request(method, uri, body).map_err(|e| Failure(2, message(e)))?;
    if resp.is_success() {
        Ok(resp)
    } else {
        Err(Failure(
            1,
            format!("{method} {uri}: {}: {}", resp.status_line(), resp.error_message()),
        ))
    }
}

/// Parses a JSON answer of the contract's shape `T`, naming the request on failure.
fn parse<T: serde::de::DeserializeOwned>(uri: &str, resp: &Response) -> Result<T, Failure> {
    serde_json::from_slice(&resp.body)
        .map_err(|e| Failure(2, format!("GET {uri}: unexpected answer ({e}): {:.300}", resp.text())))
}

/// `running, up 1.5 s`.
fn format_vm(vm: &VmInfo) -> String {
    format!("{}, up {:.1} s", vm.state, vm.uptime_ms as f64 / 1000.0)
}

/// The memory answer as text: boot RAM, one line per device, the RAM blocks, the host.
fn format_memory(m: &MemoryInfo) -> String {
    let mut out = format!("boot RAM: {}\n", human(m.boot_ram));
    for d in &m.devices {
        out.push_str(&format!(
            "{}: plugged {} of {} (requested {}, usable {}, block {}, at {:#x})\n",
            d.id,
            human(d.plugged_size),
            human(d.region_size),
            human(d.requested_size),
            human(d.usable_region_size),
            human(d.block_size),
            d.addr
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
        "host: RSS {}, pinned {}\n",
        human(m.host.rss_bytes),
        human(m.host.pinned_bytes)
    ));
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

/// What one request command prints.
fn request(args: &ApiArgs) -> Result<String, Failure> {
    let s = &args.socket;
    match &args.command {
        ApiCommand::Vm => {
            let resp = call(s, "GET", path::VM, None)?;
            let vm: VmInfo = parse(path::VM, &resp)?;
            Ok(if args.json { raw(&resp) } else { format_vm(&vm) + "\n" })
        }
        ApiCommand::Memory => {
            let resp = call(s, "GET", path::MEMORY, None)?;
            let m: MemoryInfo = parse(path::MEMORY, &resp)?;
            Ok(if args.json { raw(&resp) } else { format_memory(&m) })
        }
        ApiCommand::Resize { id, size } => {
            let resp = call(
                s,
                "PUT",
                &path::memory_device(id),
                Some(&json!({ "requested_size": size })),
            )?;
            Ok(if args.json {
                raw(&resp)
            } else {
                format!("{id}: requested {} ({size} bytes)\n", human(*size))
            })
        }
        ApiCommand::Shutdown => {
            let resp = call(s, "PUT", path::SHUTDOWN, None)?;
            Ok(if args.json {
                raw(&resp)
            } else {
                "the VMM is shutting down\n".into()
            })
        }
        ApiCommand::Pipe { .. } => unreachable!("pipe is not a request"),
    }
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
    use memvisor_lab::memvisor::{DeviceInfo, HostInfo, RamBlockInfo};
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

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
                pinned_bytes: 0,
            },
        }
    }

    #[test]
    fn answers_print_as_text() {
        let vm = VmInfo {
            state: "running".into(),
            uptime_ms: 1500,
        };
        assert_eq!(format_vm(&vm), "running, up 1.5 s");
        assert_eq!(
            format_memory(&memory()),
            "boot RAM: 512.0 MiB\n\
             vmem0: plugged 128.0 MiB of 1.0 GiB (requested 256.0 MiB, usable 1.0 GiB, block 2.0 MiB, at 0x100000000)\n\
             RAM blocks:\n  \
             boot-ram   512.0 MiB at 0x7f0000000000\n  \
             vmem0        1.0 GiB at 0x7effc0000000\n\
             host: RSS 700.0 MiB, pinned 0 B\n"
        );
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

    /// A one-connection API server on a socket in a fresh folder, answering each request
    /// with the next canned answer; returns the socket and the requests' first lines.
    fn server(answers: Vec<String>) -> (PathBuf, thread::JoinHandle<Vec<String>>) {
        let dir = std::env::temp_dir().join(format!("memvisor-api-test-{}-{}", std::process::id(), answers.len()));
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
                // The answer in two writes.
                let (a, b) = answer.split_at(answer.len() / 2);
                let mut w = conn;
                w.write_all(a.as_bytes()).unwrap();
                w.flush().unwrap();
                thread::sleep(Duration::from_millis(20));
                w.write_all(b.as_bytes()).unwrap();
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

    #[test]
    fn commands_send_their_request_and_print_the_answer() {
        let vm = r#"{"state":"running","uptime_ms":2500}"#;
        let ok = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{vm}", vm.len());
        let (sock, server) = server(vec![
            ok.clone(),
            ok,
            "HTTP/1.1 204 No Content\r\n\r\n".into(),
            "HTTP/1.1 404 Not Found\r\nContent-Length: 25\r\n\r\n{\"error\":\"no vmem vmem9\"}".into(),
        ]);
        assert_eq!(
            request(&args(&sock, false, ApiCommand::Vm)).ok().unwrap(),
            "running, up 2.5 s\n"
        );
        assert_eq!(
            request(&args(&sock, true, ApiCommand::Vm)).ok().unwrap(),
            format!("{vm}\n")
        );
        let resize = |id: &str| ApiCommand::Resize {
            id: id.into(),
            size: 256 << 20,
        };
        assert_eq!(
            request(&args(&sock, false, resize("vmem0"))).ok().unwrap(),
            "vmem0: requested 256.0 MiB (268435456 bytes)\n"
        );
        let Err(Failure(code, msg)) = request(&args(&sock, false, resize("vmem9"))) else {
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
                "PUT /api/v1/memory/vmem0 HTTP/1.1 {\"requested_size\":268435456}",
                "PUT /api/v1/memory/vmem9 HTTP/1.1 {\"requested_size\":268435456}",
            ]
        );
        // No socket: exit status 2, naming the path.
        let Err(Failure(code, msg)) = request(&args(&sock, false, ApiCommand::Shutdown)) else {
            panic!("no socket is a failure")
        };
        assert_eq!(code, 2);
        assert!(msg.contains(&sock.display().to_string()), "{msg}");
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
