//! memvisor's own VMM as the L2 VMM: its command line (`memvisor run ...`) and its
//! management API (HTTP/1.1 with JSON, [`crate::http`]) for virtio-mem resizes, plugged
//! sizes, RAM blocks and shutdown.
//!
//! The contract with `memvisor run` (sizes take K/M/G units):
//!
//! ```text
//! memvisor run --kernel F [--initrd F] [--cmdline S] [--cpus N] [--memory 512M]
//!   [--vmem id=vmem0,size=1G,block=2M,requested=0[,prealloc=on]]...
//!   [--viommu] [--disk id=disk0,path=P[,readonly=on][,iommu=off][,zero-copy=on]]...
//!   [--serial stdio|file:F|socket:P] [--api-socket P]
//! ```
//!
//! and on the API socket: `GET /api/v1/vm` ([`VmInfo`]), `GET /api/v1/memory`
//! ([`MemoryInfo`]; its devices' counts of accesses to unplugged memory read apart as
//! [`UnassignedInfo`]), `PUT /api/v1/memory/{id}` with `{"requested_size":BYTES}` (204; 400/404
//! with `{"error":"message"}`), `PUT /api/v1/vmm/shutdown` (204, then the VMM exits).
//!
//! The program is the binary running the lab ([`binary`]): in L1 the image carries a copy
//! ([`crate::image::add_memvisor`]); in direct mode it runs from where it is.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Error, Result};
use crate::http::Client;
use crate::scenario::{DiskKind, VmSpec};
use crate::vmm::{Accel, AccessCounts, Control, Launch, MigrationFigures, RamBlock, SizeWatch, Vmm, VmmKind};

/// The API's paths.
pub mod path {
    /// The VM's state (`GET`).
    pub const VM: &str = "/api/v1/vm";
    /// Memory: boot RAM, virtio-mem devices, RAM blocks, host counters (`GET`).
    pub const MEMORY: &str = "/api/v1/memory";
    /// Stops the VMM (`PUT`).
    pub const SHUTDOWN: &str = "/api/v1/vmm/shutdown";
    /// Pauses the vCPUs (`PUT`).
    pub const PAUSE: &str = "/api/v1/vm/pause";
    /// Saves the paused VM (`PUT` `{"path": FILE}`).
    pub const SNAPSHOT: &str = "/api/v1/vm/snapshot";
    /// Moves the guest to another VMM (`PUT` `{"destination": "unix:PATH"}`).
    pub const MIGRATE: &str = "/api/v1/vm/migrate";

    /// One virtio-mem device (`PUT` `{"requested_size":BYTES}`).
    pub fn memory_device(id: &str) -> String {
        format!("{MEMORY}/{id}")
    }

    /// A long poll of the events after `after`, ending after `timeout_ms` (`GET`).
    pub fn events_after(after: u64, timeout_ms: u64) -> String {
        format!("/api/v1/events?after={after}&timeout_ms={timeout_ms}")
    }
}

/// The environment variable that names the memvisor binary the lab runs (and copies into
/// L1), instead of the program running the lab.
pub const BINARY_ENV: &str = "MEMVISOR_LAB_BINARY";

/// The memvisor binary to run: `$MEMVISOR_LAB_BINARY` if set, else the running program
/// (`memvisor lab run` is memvisor itself; if its file was replaced meanwhile, e.g. by a
/// rebuild, the running one through `/proc/<pid>/exe`).
pub fn binary() -> Result<PathBuf> {
    let path = match std::env::var_os(BINARY_ENV) {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().map_err(|e| Error::Vmm(format!("finding the memvisor binary: {e}")))?;
            running_binary(exe, std::process::id())
        }
    };
    if !path.is_file() {
        return Err(Error::Vmm(format!(
            "the memvisor binary {} is not a file (set {BINARY_ENV} to one)",
            path.display()
        )));
    }
    Ok(path)
}

/// `exe`, the running program's path, or `/proc/<pid>/exe` when the file was deleted
/// (Linux names it `PATH (deleted)`): that link still reaches the running binary, for
/// reading, `ldd` and running it.
pub fn running_binary(exe: PathBuf, pid: u32) -> PathBuf {
    if exe.to_string_lossy().ends_with(" (deleted)") {
        PathBuf::from(format!("/proc/{pid}/exe"))
    } else {
        exe
    }
}

/// `GET /api/v1/vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// `running`.
    pub state: String,
    /// Milliseconds since the VMM started the VM.
    pub uptime_ms: u64,
}

/// `GET /api/v1/memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Boot RAM (`--memory`) in bytes.
    pub boot_ram: u64,
    /// The virtio-mem devices.
    pub devices: Vec<DeviceInfo>,
    /// The guest RAM's mappings in the VMM process.
    pub ram_blocks: Vec<RamBlockInfo>,
    /// The VMM process's own counters.
    pub host: HostInfo,
}

/// The virtio-mem device `id` among `devices`, or an error naming it and
/// the devices there are.
fn find_device<'a, T>(devices: &'a [T], id: &str, id_of: impl Fn(&T) -> &str) -> Result<&'a T> {
    devices.iter().find(|d| id_of(d) == id).ok_or_else(|| {
        let ids: Vec<&str> = devices.iter().map(&id_of).collect();
        Error::Vmm(format!(
            "memvisor has no virtio-mem device `{id}` (it has: {})",
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.join(", ")
            }
        ))
    })
}

impl MemoryInfo {
    /// The device `id`, or an error naming it and the devices there are.
    pub fn device(&self, id: &str) -> Result<&DeviceInfo> {
        find_device(&self.devices, id, |d| &d.id)
    }
}

/// One virtio-mem device (all sizes in bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Its id (`--vmem id=...`).
    pub id: String,
    /// The guest physical address of its region.
    pub addr: u64,
    /// The region's size.
    pub region_size: u64,
    /// The block size.
    pub block_size: u64,
    /// What the host asked the guest to plug.
    pub requested_size: u64,
    /// What the guest has plugged.
    pub plugged_size: u64,
    /// The part of the region the guest may plug into.
    pub usable_region_size: u64,
}

/// `GET /api/v1/memory` read for the devices' counts of accesses to unplugged memory alone
/// (the rest of the answer is [`MemoryInfo`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UnassignedInfo {
    /// The virtio-mem devices.
    pub devices: Vec<DeviceUnassigned>,
}

/// One virtio-mem device's accesses to its unplugged blocks (guest accesses outside every
/// memory slot inside its region, answered as unassigned memory: reads all ones, writes
/// dropped).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DeviceUnassigned {
    /// Its id.
    pub id: String,
    /// Reads of unplugged memory.
    pub unassigned_reads: u64,
    /// Writes to unplugged memory.
    pub unassigned_writes: u64,
}

impl UnassignedInfo {
    /// The counts of the device `id`, or an error naming it and the devices there are.
    pub fn counts(&self, id: &str) -> Result<AccessCounts> {
        let d = find_device(&self.devices, id, |d| &d.id)?;
        Ok(AccessCounts {
            reads: d.unassigned_reads,
            writes: d.unassigned_writes,
        })
    }
}

/// One RAM block: a mapping of guest RAM in the VMM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamBlockInfo {
    /// `boot-ram`, or a virtio-mem device's id.
    pub name: String,
    /// Its host virtual address.
    pub hva: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// The VMM process's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Resident set in bytes.
    pub rss_bytes: u64,
    /// Pinned (locked for DMA) bytes.
    pub pinned_bytes: u64,
}

/// Why memvisor cannot run a VM with `accel` (`None` if it can): it runs every
/// scenario's devices, but only under KVM.
pub fn unsupported(accel: Accel) -> Option<String> {
    if accel != Accel::Kvm {
        return Some(
            "memvisor runs L2 under KVM only and this host's /dev/kvm cannot boot Linux (QEMU falls back to \
             TCG here, memvisor has no emulator): use --mode nested"
                .into(),
        );
    }
    None
}

/// memvisor's L2 command line for `vm`, with the program, kernel, initramfs, disk files and
/// API socket of `launch.placement`: `--kernel --initrd --cmdline --cpus --memory`, one
/// `--vmem` per virtio-mem region, `--viommu`, one `--disk` per virtio-blk disk,
/// `--serial stdio --api-socket`.
pub fn command_line(vm: &VmSpec, launch: &Launch) -> Result<Vec<String>> {
    let p = &launch.placement;
    if let Some(why) = unsupported(p.accel) {
        return Err(Error::Vmm(why));
    }
    let Control::Unix(socket) = &p.control else {
        return Err(Error::Vmm(format!(
            "memvisor's API listens on a Unix socket, not {:?}",
            p.control
        )));
    };
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[&p.program, "run", "--kernel", &p.kernel, "--initrd", &p.initrd]);
    push(&["--cmdline", &launch.cmdline]);
    push(&["--cpus", &vm.cpus.to_string(), "--memory", &vm.memory.to_string()]);
    for v in &vm.vmem {
        let mut spec = format!(
            "id={},size={},block={},requested={}",
            v.id, v.size, v.block_size, v.requested
        );
        if v.prealloc {
            spec.push_str(",prealloc=on");
        }
        push(&["--vmem", &spec]);
    }
    if vm.iommu {
        push(&["--viommu"]);
    }
    for d in &vm.disks {
        match d.kind {
            DiskKind::VirtioBlk => {
                let zero_copy = if d.zero_copy { ",zero-copy=on" } else { "" };
                push(&["--disk", &format!("id={},path={}{zero_copy}", d.id, p.disk(&d.id))]);
            }
            DiskKind::VfioNvme => {
                let bdf = launch
                    .vfio
                    .get(&d.id)
                    .ok_or_else(|| Error::Vmm(format!("no assigned device for {}", d.id)))?;
                push(&["--device", &format!("vfio={bdf}")]);
            }
        }
    }
    push(&["--serial", "stdio", "--api-socket", &socket.display().to_string()]);
    Ok(a)
}

/// Reads a long poll's event lines: the last `seq` in them (0 if none) and the plugged size
/// of the last `size-changed` event of the device `id`.
fn size_changes(text: &str, id: &str) -> std::result::Result<(u64, Option<u64>), String> {
    let (mut seq, mut plugged) = (0, None);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let e: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line:.200}"))?;
        seq = seq.max(e["seq"].as_u64().unwrap_or(0));
        if e["event"] == "size-changed" && e["id"] == id {
            let n = e["plugged_size"]
                .as_u64()
                .ok_or_else(|| format!("no plugged_size in {line:.200}"))?;
            plugged = Some(n);
        }
    }
    Ok((seq, plugged))
}

/// The memvisor driver: the API client over the control stream (the relay when nested).
#[derive(Default)]
pub struct Memvisor {
    api: Option<Client<UnixStream>>,
    /// What `GET /api/v1/vm` said when the driver attached.
    pub attached: Option<VmInfo>,
    /// The sequence number of the last event read (0: none yet).
    event_seq: u64,
}

impl Memvisor {
    fn api(&mut self) -> Result<&mut Client<UnixStream>> {
        self.api
            .as_mut()
            .ok_or_else(|| Error::Vmm("memvisor's API not attached".into()))
    }

    /// `GET /api/v1/vm`.
    fn vm(&mut self) -> Result<VmInfo> {
        let r = self.api()?.call("GET", path::VM, None)?;
        serde_json::from_slice(&r.body)
            .map_err(|e| Error::Vmm(format!("GET {}: unexpected answer ({e}): {:.300}", path::VM, r.text())))
    }

    /// `GET /api/v1/memory` (the body as received).
    fn memory_body(&mut self) -> Result<crate::http::Response> {
        self.api()?.call("GET", path::MEMORY, None)
    }

    /// `GET /api/v1/memory`.
    pub fn memory(&mut self) -> Result<MemoryInfo> {
        let r = self.memory_body()?;
        serde_json::from_slice(&r.body).map_err(|e| {
            Error::Vmm(format!(
                "GET {}: unexpected answer ({e}): {:.300}",
                path::MEMORY,
                r.text()
            ))
        })
    }
}

impl Vmm for Memvisor {
    fn kind(&self) -> VmmKind {
        VmmKind::Memvisor
    }

    fn supports(&self, _vm: &VmSpec, accel: Accel) -> std::result::Result<(), String> {
        unsupported(accel).map_or(Ok(()), Err)
    }

    fn command_line(&self, vm: &VmSpec, launch: &Launch) -> Result<Vec<String>> {
        command_line(vm, launch)
    }

    fn attach(&mut self, control: UnixStream) -> Result<()> {
        // A new VMM process (a restore) numbers its events from the start again.
        self.event_seq = 0;
        self.api = Some(Client::over(control)?);
        self.attached = Some(self.vm()?);
        Ok(())
    }

    fn request_size(&mut self, id: &str, bytes: u64) -> Result<()> {
        let body = json!({ "requested_size": bytes });
        self.api()?.call("PUT", &path::memory_device(id), Some(&body)).map(drop)
    }

    fn plugged_size(&mut self, id: &str) -> Result<u64> {
        Ok(self.memory()?.device(id)?.plugged_size)
    }

    fn watch_size(&mut self, id: &str, wait: Duration) -> Result<SizeWatch> {
        let poll = path::events_after(self.event_seq, wait.as_millis() as u64);
        let r = self.api()?.call("GET", &poll, None)?;
        let (seq, plugged) = size_changes(&r.text(), id).map_err(|e| Error::Vmm(format!("GET {poll}: {e}")))?;
        self.event_seq = self.event_seq.max(seq);
        Ok(plugged.map_or(SizeWatch::Quiet, SizeWatch::Plugged))
    }

    fn ram_blocks(&mut self) -> Result<Vec<RamBlock>> {
        Ok(self
            .memory()?
            .ram_blocks
            .into_iter()
            .map(|b| RamBlock {
                name: b.name,
                hva: b.hva,
                size: b.size,
            })
            .collect())
    }

    fn unassigned_accesses(&mut self, id: &str) -> Result<Option<AccessCounts>> {
        let r = self.memory_body()?;
        let info: UnassignedInfo = serde_json::from_slice(&r.body).map_err(|e| {
            Error::Vmm(format!(
                "GET {}: no unplugged-access counts ({e}): {:.300}",
                path::MEMORY,
                r.text()
            ))
        })?;
        info.counts(id).map(Some)
    }

    fn save_snapshot(&mut self, file: &str) -> Result<String> {
        let api = self.api()?;
        api.call("PUT", path::PAUSE, None)?;
        let r = api.call("PUT", path::SNAPSHOT, Some(&json!({ "path": file })))?;
        Ok(r.text())
    }

    fn restore_args(&self, file: &str) -> Vec<String> {
        vec!["--restore".into(), file.into()]
    }

    fn resume_restored(&mut self) -> Result<String> {
        // The API answers while the state loads (state `stopped`); the guest runs once the
        // load is done.
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        loop {
            let vm = self.vm()?;
            if vm.state == "running" {
                return Ok(vm.state);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Vmm(format!(
                    "the restored VM is still `{}` after 300 s",
                    vm.state
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn incoming_args(&self, socket: &str) -> Vec<String> {
        vec!["--incoming".into(), format!("unix:{socket}")]
    }

    fn migrate(&mut self, socket: &str) -> Result<MigrationFigures> {
        let body = json!({ "destination": format!("unix:{socket}") });
        let r = self.api()?.call("PUT", path::MIGRATE, Some(&body))?;
        let m: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| {
            Error::Vmm(format!(
                "PUT {}: unexpected answer ({e}): {:.300}",
                path::MIGRATE,
                r.text()
            ))
        })?;
        let ms = |key: &str| m[key].as_u64().map(|v| v as f64 / 1000.0);
        match (ms("total_ms"), ms("downtime_ms"), m["bytes"].as_u64()) {
            (Some(total_s), Some(downtime_s), Some(bytes)) => Ok(MigrationFigures {
                total_s,
                downtime_s,
                bytes,
                passes: m["passes"].as_u64().unwrap_or(0),
            }),
            _ => Err(Error::Vmm(format!("PUT {}: no figures in {m}", path::MIGRATE))),
        }
    }

    fn vm_state(&mut self) -> Result<String> {
        Ok(self.vm()?.state)
    }

    fn shutdown(&mut self) -> Result<()> {
        self.api()?.call("PUT", path::SHUTDOWN, None).map(drop)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_long_poll_gives_the_last_seq_and_the_device_s_last_plugged_size() {
        let text = "{\"seq\":7,\"event\":\"size-changed\",\"id\":\"vmem0\",\"plugged_size\":2097152}\n\n\
                    {\"seq\":8,\"event\":\"size-changed\",\"id\":\"vmem1\",\"plugged_size\":4}\n\
                    {\"seq\":9,\"event\":\"size-changed\",\"id\":\"vmem0\",\"plugged_size\":4194304}\n\
                    {\"seq\":10,\"event\":\"paused\"}\n";
        assert_eq!(size_changes(text, "vmem0"), Ok((10, Some(4 << 20))));
        assert_eq!(
            size_changes("{\"seq\":3,\"event\":\"resumed\"}\n", "vmem0"),
            Ok((3, None))
        );
        assert_eq!(size_changes("", "vmem0"), Ok((0, None)));
        assert!(size_changes("{\"event\":\"size-changed\",\"id\":\"vmem0\"}", "vmem0").is_err());
        assert!(size_changes("not json", "vmem0").is_err());
    }

    use super::*;
    use crate::scenario::Scenario;
    use crate::vmm::{Placement, VmmKind};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::path::Path;

    fn scenario(name: &str) -> Scenario {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("scenarios/{name}.toml"));
        Scenario::load(&path).unwrap()
    }

    const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

    fn line_in_l1(name: &str) -> Result<String> {
        let launch = Launch::new(CMDLINE.into(), Placement::in_l1_for(VmmKind::Memvisor));
        command_line(&scenario(name).vm, &launch).map(|a| a.join(" "))
    }

    const PREFIX: &str = "/lab/memvisor/memvisor run --kernel /lab/l2/vmlinuz --initrd /lab/l2/initrd.cpio \
                          --cmdline console=ttyS0 panic=-1 quiet";
    const SUFFIX: &str = "--serial stdio --api-socket /run/memvisor.sock";

    #[test]
    fn the_command_line_of_every_shipped_scenario_in_l1() {
        assert_eq!(
            line_in_l1("boot").unwrap(),
            format!("{PREFIX} --cpus 1 --memory 512M {SUFFIX}")
        );
        assert_eq!(
            line_in_l1("vmem-resize").unwrap(),
            format!(
                "{PREFIX} --cpus 1 --memory 512M --vmem id=vmem0,size=1G,block=2M,requested=0,prealloc=on {SUFFIX}"
            )
        );
        assert_eq!(
            line_in_l1("viommu").unwrap(),
            format!("{PREFIX} --cpus 1 --memory 512M --viommu --disk id=disk0,path=/tmp/disk-disk0.img {SUFFIX}")
        );
        assert_eq!(
            line_in_l1("poweroff").unwrap(),
            format!("{PREFIX} --cpus 1 --memory 512M --vmem id=vmem0,size=1G,block=2M,requested=128M {SUFFIX}")
        );
        assert_eq!(
            line_in_l1("reboot").unwrap(),
            format!(
                "{PREFIX} --cpus 1 --memory 512M --vmem id=vmem0,size=1G,block=2M,requested=0 \
                 --disk id=disk0,path=/tmp/disk-disk0.img {SUFFIX}"
            )
        );
        assert_eq!(
            line_in_l1("unplugged-access").unwrap(),
            format!("{PREFIX} --cpus 1 --memory 512M --vmem id=vmem0,size=1G,block=2M,requested=128M {SUFFIX}")
        );
        let mut launch = Launch::new(CMDLINE.into(), Placement::in_l1_for(VmmKind::Memvisor));
        launch.vfio.insert("nvme0".into(), "0000:00:04.0".into());
        let argv = command_line(&scenario("vfio-nvme").vm, &launch).unwrap().join(" ");
        assert!(argv.contains("--device vfio=0000:00:04.0"), "{argv}");
        assert!(
            command_line(
                &scenario("vfio-nvme").vm,
                &Launch::new(CMDLINE.into(), Placement::in_l1_for(VmmKind::Memvisor))
            )
            .is_err(),
            "an NVMe disk without its assigned device is an error"
        );
        // The kernel command line is one argument (the control loop quotes it).
        let launch = Launch::new(CMDLINE.into(), Placement::in_l1_for(VmmKind::Memvisor));
        let argv = command_line(&scenario("boot").vm, &launch).unwrap();
        assert_eq!(argv[6..8], ["--cmdline", CMDLINE]);
    }

    #[test]
    fn what_memvisor_cannot_run_is_refused_before_anything_boots() {
        let m = Memvisor::default();
        assert_eq!(m.supports(&scenario("vmem-resize").vm, Accel::Kvm), Ok(()));
        assert_eq!(m.supports(&scenario("vfio-nvme").vm, Accel::Kvm), Ok(()));
        let e = m.supports(&scenario("boot").vm, Accel::Tcg).unwrap_err();
        assert!(e.contains("KVM only") && e.contains("--mode nested"), "{e}");
        let mut p = Placement::in_l1_for(VmmKind::Memvisor);
        p.accel = Accel::Tcg;
        assert!(command_line(&scenario("boot").vm, &Launch::new(String::new(), p)).is_err());
        // QEMU's TCP control port is not memvisor's.
        let e = command_line(&scenario("boot").vm, &Launch::new(String::new(), Placement::in_l1()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Unix socket, not Tcp(4444)"), "{e}");
    }

    const MEMORY: &str = r#"{"boot_ram":536870912,"devices":[{"id":"vmem0","addr":4294967296,"region_size":1073741824,"block_size":2097152,"requested_size":268435456,"plugged_size":134217728,"usable_region_size":1073741824}],"ram_blocks":[{"name":"boot-ram","hva":139637976727552,"size":536870912},{"name":"vmem0","hva":139636902985728,"size":1073741824}],"host":{"rss_bytes":700000000,"pinned_bytes":0}}"#;

    fn ok(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn memory_answers_parse_and_name_missing_devices() {
        let m: MemoryInfo = serde_json::from_str(MEMORY).unwrap();
        assert_eq!(m.boot_ram, 512 << 20);
        let d = m.device("vmem0").unwrap();
        assert_eq!((d.addr, d.block_size, d.plugged_size), (4 << 30, 2 << 20, 128 << 20));
        assert_eq!(m.ram_blocks[1].name, "vmem0");
        assert_eq!(m.host.rss_bytes, 700_000_000);
        assert_eq!(
            m.device("vmem1").unwrap_err().to_string(),
            "vmm: memvisor has no virtio-mem device `vmem1` (it has: vmem0)"
        );
        // A missing field is named.
        let e = serde_json::from_str::<MemoryInfo>(&MEMORY.replace("\"plugged_size\"", "\"plugged\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `plugged_size`"), "{e}");
    }

    /// The driver over a Unix socket pair, the other end played by a thread with canned
    /// answers that returns the requests it got.
    #[test]
    fn the_driver_speaks_the_api_over_one_connection() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let answers: Vec<Vec<u8>> = vec![
            ok(r#"{"state":"running","uptime_ms":1500}"#),
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            ok(MEMORY),
            ok(MEMORY),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 28\r\n\r\n{\"error\":\"no device vmem7\"}\n".to_vec(),
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        ];
        let server = std::thread::spawn(move || {
            let mut r = BufReader::new(theirs.try_clone().unwrap());
            let mut w = theirs;
            let mut requests = Vec::new();
            for answer in answers {
                let mut head = String::new();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if let Some(n) = line.strip_prefix("Content-Length: ") {
                        len = n.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if head.is_empty() {
                        head = line.trim_end().to_string();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                requests.push(format!("{head} {}", String::from_utf8(body).unwrap()));
                w.write_all(&answer).unwrap();
            }
            requests
        });
        let mut m = Memvisor::default();
        m.attach(ours).unwrap();
        assert_eq!(
            m.attached,
            Some(VmInfo {
                state: "running".into(),
                uptime_ms: 1500
            })
        );
        m.request_size("vmem0", 256 << 20).unwrap();
        assert_eq!(m.plugged_size("vmem0").unwrap(), 128 << 20);
        assert_eq!(
            m.ram_blocks().unwrap(),
            [
                RamBlock {
                    name: "boot-ram".into(),
                    hva: 0x7f00_0000_0000,
                    size: 512 << 20
                },
                RamBlock {
                    name: "vmem0".into(),
                    hva: 0x7eff_c000_0000,
                    size: 1 << 30
                }
            ]
        );
        let e = m.request_size("vmem7", 0).unwrap_err().to_string();
        assert_eq!(e, "vmm: PUT /api/v1/memory/vmem7: 404 Not Found: no device vmem7");
        m.shutdown().unwrap();
        assert_eq!(
            server.join().unwrap(),
            [
                "GET /api/v1/vm HTTP/1.1 ",
                "PUT /api/v1/memory/vmem0 HTTP/1.1 {\"requested_size\":268435456}",
                "GET /api/v1/memory HTTP/1.1 ",
                "GET /api/v1/memory HTTP/1.1 ",
                "PUT /api/v1/memory/vmem7 HTTP/1.1 {\"requested_size\":0}",
                "PUT /api/v1/vmm/shutdown HTTP/1.1 ",
            ]
        );
    }

    #[test]
    fn unplugged_access_counts_parse_and_name_what_is_missing() {
        let with = MEMORY.replace(
            "\"usable_region_size\":1073741824",
            "\"usable_region_size\":1073741824,\"unassigned_reads\":3,\"unassigned_writes\":1",
        );
        // The rest of the answer reads as before.
        let m: MemoryInfo = serde_json::from_str(&with).unwrap();
        assert_eq!(m.device("vmem0").unwrap().plugged_size, 128 << 20);
        let u: UnassignedInfo = serde_json::from_str(&with).unwrap();
        assert_eq!(u.counts("vmem0").unwrap(), AccessCounts { reads: 3, writes: 1 });
        assert_eq!(
            u.counts("vmem1").unwrap_err().to_string(),
            "vmm: memvisor has no virtio-mem device `vmem1` (it has: vmem0)"
        );
        // A memvisor without the counts is named by the field it lacks.
        let e = serde_json::from_str::<UnassignedInfo>(MEMORY).unwrap_err().to_string();
        assert!(e.contains("missing field `unassigned_reads`"), "{e}");
    }

    #[test]
    fn the_driver_asks_the_memory_answer_for_the_counts() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let with = MEMORY.replace(
            "\"usable_region_size\":1073741824",
            "\"usable_region_size\":1073741824,\"unassigned_reads\":2,\"unassigned_writes\":5",
        );
        let answers = [ok(r#"{"state":"running","uptime_ms":1}"#), ok(&with), ok(MEMORY)];
        let server = std::thread::spawn(move || {
            let mut r = BufReader::new(theirs.try_clone().unwrap());
            let mut w = theirs;
            for answer in answers {
                let mut line = String::new();
                while line != "\r\n" {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                }
                w.write_all(&answer).unwrap();
            }
        });
        let mut m = Memvisor::default();
        m.attach(ours).unwrap();
        assert_eq!(
            m.unassigned_accesses("vmem0").unwrap(),
            Some(AccessCounts { reads: 2, writes: 5 })
        );
        let e = m.unassigned_accesses("vmem0").unwrap_err().to_string();
        assert!(
            e.starts_with("vmm: GET /api/v1/memory: no unplugged-access counts (missing field `unassigned_reads`"),
            "{e}"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_rebuilt_binary_is_reached_through_proc() {
        let exe = PathBuf::from("/w/target/release/memvisor");
        assert_eq!(running_binary(exe.clone(), 42), exe);
        assert_eq!(
            running_binary(PathBuf::from("/w/target/release/memvisor (deleted)"), 42),
            PathBuf::from("/proc/42/exe")
        );
        // This test's own binary is reachable that way.
        let me = running_binary(PathBuf::from("x (deleted)"), std::process::id());
        assert!(me.is_file(), "{}", me.display());
    }

    #[test]
    fn an_unattached_driver_says_so() {
        let mut m = Memvisor::default();
        assert_eq!(
            m.plugged_size("vmem0").unwrap_err().to_string(),
            "vmm: memvisor's API not attached"
        );
    }
}
