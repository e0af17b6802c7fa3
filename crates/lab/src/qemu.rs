//! QEMU as the L2 VMM: its command line and QMP control (`qom-set` of virtio-mem-pci
//! `requested-size`).

use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::json;

use crate::error::{Error, Result};
use crate::qmp::Qmp;
use crate::scenario::{DiskKind, VmSpec};
use crate::vmm::{Accel, Control, Launch, MigrationFigures, RamBlock, Vmm, VmmKind};

/// The QEMU driver.
#[derive(Default)]
pub struct Qemu {
    qmp: Option<Qmp<UnixStream>>,
}

impl Qemu {
    fn qmp(&mut self) -> Result<&mut Qmp<UnixStream>> {
        self.qmp.as_mut().ok_or_else(|| Error::Vmm("QMP not attached".into()))
    }
}

/// QEMU's L2 command line for `vm`, with the program, firmware, kernel, initramfs, disk
/// files, accelerator and control socket of `launch.placement`.
pub fn command_line(vm: &VmSpec, launch: &Launch) -> Result<Vec<String>> {
    let p = &launch.placement;
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let mib = |b: u64| format!("{}M", b >> 20);
    let plug: u64 = vm.vmem.iter().map(|v| v.size.0).sum();
    let mem = if plug > 0 {
        format!("{},maxmem={}", mib(vm.memory.0), mib(vm.memory.0 + plug))
    } else {
        mib(vm.memory.0)
    };
    let qmp = match &p.control {
        Control::Tcp(port) => format!("tcp:127.0.0.1:{port},server=on,wait=off"),
        Control::Unix(path) => format!("unix:{},server=on,wait=off", path.display()),
    };
    push(&[&p.program]);
    for dir in &p.firmware {
        push(&["-L", dir]);
    }
    match p.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // The CPU model L1 runs under TCG too (la57 off: 4-level paging, as with KVM here).
        Accel::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", "max,la57=off"]),
    }
    push(&["-machine", "q35"]);
    push(&[
        "-smp",
        &vm.cpus.to_string(),
        "-m",
        &mem,
        "-nodefaults",
        "-display",
        "none",
    ]);
    // A guest reboot ends QEMU unless the scenario reboots (a panic reboots: panic=-1).
    if !vm.reboot {
        push(&["-no-reboot"]);
    }
    push(&["-serial", "stdio", "-monitor", "none", "-qmp", &qmp]);
    push(&["-kernel", &p.kernel, "-initrd", &p.initrd, "-append", &launch.cmdline]);
    if vm.iommu {
        push(&["-device", "virtio-iommu-pci,id=viommu"]);
    }
    for v in &vm.vmem {
        let backend = format!("memory-backend-ram,id=mem-{},size={}", v.id, mib(v.size.0));
        let dev = format!(
            "virtio-mem-pci,id={0},memdev=mem-{0},block-size={1},requested-size={2}",
            v.id,
            mib(v.block_size.0),
            mib(v.requested.0)
        );
        let dev = if v.prealloc { format!("{dev},prealloc=on") } else { dev };
        push(&["-object", &backend, "-device", &dev]);
    }
    for d in &vm.disks {
        match d.kind {
            DiskKind::VirtioBlk => {
                let drive = format!("file={},if=none,id={},format=raw", p.disk(&d.id), d.id);
                let mut dev = format!("virtio-blk-pci,drive={0},id={0}-dev,disable-legacy=on", d.id);
                if vm.iommu {
                    dev.push_str(",iommu_platform=on");
                }
                push(&["-drive", &drive, "-device", &dev]);
            }
            DiskKind::VfioNvme => {
                let bdf = launch
                    .vfio
                    .get(&d.id)
                    .ok_or_else(|| Error::Vmm(format!("no assigned device for {}", d.id)))?;
                push(&["-device", &format!("vfio-pci,host={bdf},id={}", d.id)]);
            }
        }
    }
    Ok(a)
}

/// Parses the table of `x-query-ramblock` (`Block Name  PSize  Offset  Used  Total  HVA  RO`)
/// into its writable blocks (guest RAM; ROMs are read-only).
pub fn parse_ramblocks(text: &str) -> Result<Vec<RamBlock>> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let mut blocks = Vec::new();
    for line in text.lines().skip(1).map(str::trim).filter(|l| !l.is_empty()) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let bad = || Error::Vmm(format!("x-query-ramblock: cannot read {line:?}"));
        // Block Name, PSize (`4 KiB`), Offset, Used, Total, HVA, RO: read from the end.
        let [.., used, _total, hva, ro] = w[..] else {
            return Err(bad());
        };
        if ro != "rw" {
            continue;
        }
        blocks.push(RamBlock {
            name: w[0].to_string(),
            hva: hex(hva).ok_or_else(bad)?,
            size: hex(used).ok_or_else(bad)?,
        });
    }
    Ok(blocks)
}

impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn command_line(&self, vm: &VmSpec, launch: &Launch) -> Result<Vec<String>> {
        command_line(vm, launch)
    }

    fn attach(&mut self, control: UnixStream) -> Result<()> {
        let reader = control
            .try_clone()
            .map_err(|e| Error::Vmm(format!("QMP socket: {e}")))?;
        self.qmp = Some(Qmp::connect(reader, control)?);
        Ok(())
    }

    fn request_size(&mut self, id: &str, bytes: u64) -> Result<()> {
        let path = format!("/machine/peripheral/{id}");
        self.qmp()?.execute(
            "qom-set",
            Some(json!({"path": path, "property": "requested-size", "value": bytes})),
        )?;
        Ok(())
    }

    fn plugged_size(&mut self, id: &str) -> Result<u64> {
        let path = format!("/machine/peripheral/{id}");
        let v = self
            .qmp()?
            .execute("qom-get", Some(json!({"path": path, "property": "size"})))?;
        v.as_u64()
            .ok_or_else(|| Error::Vmm(format!("qom-get size of {id}: {v}")))
    }

    fn ram_blocks(&mut self) -> Result<Vec<RamBlock>> {
        let v = self.qmp()?.execute("x-query-ramblock", None)?;
        let text = v
            .get("human-readable-text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| Error::Vmm(format!("x-query-ramblock: {v}")))?;
        parse_ramblocks(text)
    }

    fn save_snapshot(&mut self, file: &str) -> Result<String> {
        let qmp = self.qmp()?;
        let step = |what: &'static str| move |e: Error| Error::Vmm(format!("{what}: {e}"));
        qmp.execute("stop", None).map_err(step("stop"))?;
        qmp.execute("migrate", Some(json!({ "uri": format!("exec:cat > {file}") })))
            .map_err(step("migrate"))?;
        let status = wait_migration(qmp, "saving the VM")?;
        Ok(status.to_string())
    }

    fn restore_args(&self, file: &str) -> Vec<String> {
        vec!["-incoming".into(), format!("exec:cat {file}")]
    }

    fn resume_restored(&mut self) -> Result<String> {
        let qmp = self.qmp()?;
        // The incoming side reports the migration as it loads; the VM is then paused, as
        // it was saved.
        let deadline = std::time::Instant::now() + Duration::from_secs(MIGRATION_TIMEOUT_S);
        loop {
            let status = qmp.execute("query-status", None)?;
            match status.get("status").and_then(|s| s.as_str()) {
                Some("inmigrate") | Some("restore-vm") => {}
                Some("running") => return Ok(status.to_string()),
                Some(_) => {
                    qmp.execute("cont", None)?;
                    return Ok(status.to_string());
                }
                None => return Err(Error::Vmm(format!("query-status: {status}"))),
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Vmm(format!(
                    "the incoming migration did not finish within {MIGRATION_TIMEOUT_S} s: {status}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn incoming_args(&self, socket: &str) -> Vec<String> {
        vec!["-incoming".into(), format!("unix:{socket}")]
    }

    fn migrate(&mut self, socket: &str) -> Result<MigrationFigures> {
        let qmp = self.qmp()?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "downtime-limit": MIGRATION_DOWNTIME_MS })),
        )?;
        qmp.execute("migrate", Some(json!({ "uri": format!("unix:{socket}") })))?;
        let info = wait_migration(qmp, "migrating")?;
        let ms = |key: &str| info[key].as_u64().map(|v| v as f64 / 1000.0);
        let figures = match (ms("total-time"), ms("downtime"), info["ram"]["transferred"].as_u64()) {
            (Some(total_s), Some(downtime_s), Some(bytes)) => MigrationFigures {
                total_s,
                downtime_s,
                bytes,
                passes: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
            },
            _ => return Err(Error::Vmm(format!("query-migrate: no figures in {info}"))),
        };
        // The source stays in `postmigrate`; the guest runs at the destination.
        qmp.send("quit")?;
        Ok(figures)
    }

    fn vm_state(&mut self) -> Result<String> {
        let status = self.qmp()?.execute("query-status", None)?;
        status
            .get("status")
            .and_then(|s| s.as_str())
            .map(str::to_string)
            .ok_or_else(|| Error::Vmm(format!("query-status: {status}")))
    }

    fn shutdown(&mut self) -> Result<()> {
        self.qmp()?.send("quit")
    }
}

/// QEMU's `downtime-limit` for a migration (its default; memvisor's design target too).
const MIGRATION_DOWNTIME_MS: u64 = 300;

/// How long a save or a restore of the VM may take.
const MIGRATION_TIMEOUT_S: u64 = 300;

/// Polls `query-migrate` until the migration completed (its answer) or failed (an error
/// naming `what`).
fn wait_migration(qmp: &mut Qmp<UnixStream>, what: &str) -> Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(MIGRATION_TIMEOUT_S);
    loop {
        let info = qmp
            .execute("query-migrate", None)
            .map_err(|e| Error::Vmm(format!("{what}: query-migrate: {e}")))?;
        match info.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(info),
            Some("failed") | Some("cancelled") => return Err(Error::Vmm(format!("{what}: {info}"))),
            _ => {}
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Vmm(format!(
                "{what}: not done within {MIGRATION_TIMEOUT_S} s: {info}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{DiskSpec, Size, VmemSpec};
    use crate::vmm::Placement;

    fn vm() -> VmSpec {
        VmSpec {
            cpus: 2,
            memory: Size(512 << 20),
            vmem: vec![VmemSpec {
                id: "vmem0".into(),
                size: Size(1 << 30),
                block_size: Size(2 << 20),
                requested: Size(0),
                prealloc: true,
            }],
            iommu: true,
            disks: vec![
                DiskSpec {
                    id: "d0".into(),
                    size: Size(64 << 20),
                    kind: DiskKind::VirtioBlk,
                    zero_copy: false,
                },
                DiskSpec {
                    id: "n0".into(),
                    size: Size(64 << 20),
                    kind: DiskKind::VfioNvme,
                    zero_copy: false,
                },
            ],
            kernel_args: String::new(),
            reboot: false,
        }
    }

    #[test]
    fn ram_blocks_parse() {
        // QEMU 10's table (x-query-ramblock) for 512M of boot memory and a 1G virtio-mem.
        let text = "              Block Name    PSize              Offset               Used              Total                HVA  RO\n  \
                    0000:00:01.0/mem-vmem0    4 KiB  0x0000000000000000 0x0000000040000000 0x0000000040000000 0x00007f0f1be00000  rw\n  \
                    pc.ram    4 KiB  0x0000000040000000 0x0000000020000000 0x0000000020000000 0x00007f0ef3e00000  rw\n  \
                    /rom@etc/acpi/tables    4 KiB  0x0000000060080000 0x0000000000020000 0x0000000000200000 0x00007f0fa0800000  ro\n";
        let b = parse_ramblocks(text).unwrap();
        assert_eq!(
            b,
            [
                RamBlock {
                    name: "0000:00:01.0/mem-vmem0".into(),
                    hva: 0x7f0f1be00000,
                    size: 1 << 30
                },
                RamBlock {
                    name: "pc.ram".into(),
                    hva: 0x7f0ef3e00000,
                    size: 512 << 20
                },
            ]
        );
        assert!(parse_ramblocks("header\npc.ram 4 KiB 0x0 zz 0x1 0x2 rw\n").is_err());
        assert!(parse_ramblocks("header\nrw\n").is_err());
    }

    #[test]
    fn command_line_has_virtio_mem_iommu_and_disks() {
        let vm = vm();
        let mut launch = Launch::new("console=ttyS0".into(), Placement::in_l1());
        assert!(
            command_line(&vm, &launch).is_err(),
            "an assigned disk needs its address"
        );
        launch.vfio.insert("n0".into(), "0000:00:04.0".into());
        let a = command_line(&vm, &launch).unwrap().join(" ");
        assert!(
            a.starts_with("/lab/qemu/qemu-system-x86_64 -L /lab/fw -accel kvm"),
            "{a}"
        );
        assert!(a.contains("-m 512M,maxmem=1536M"), "{a}");
        assert!(
            a.contains("-device virtio-mem-pci,id=vmem0,memdev=mem-vmem0,block-size=2M,requested-size=0M,prealloc=on"),
            "{a}"
        );
        assert!(a.contains("-device virtio-iommu-pci"), "{a}");
        assert!(
            a.contains("virtio-blk-pci,drive=d0,id=d0-dev,disable-legacy=on,iommu_platform=on"),
            "{a}"
        );
        assert!(a.contains("-device vfio-pci,host=0000:00:04.0,id=n0"), "{a}");
        assert!(a.contains("-cpu host -machine q35"), "{a}");
        assert!(a.contains("-qmp tcp:127.0.0.1:4444,server=on,wait=off"), "{a}");
        assert!(a.contains("-kernel /lab/l2/vmlinuz -initrd /lab/l2/initrd.cpio"), "{a}");
        assert!(a.contains("file=/tmp/disk-d0.img,if=none"), "{a}");
        assert!(a.contains("-display none -no-reboot -serial stdio"), "{a}");
    }

    #[test]
    fn a_scenario_that_reboots_lets_qemu_reboot() {
        let mut vm = vm();
        vm.disks.truncate(1);
        vm.reboot = true;
        let launch = Launch::new("console=ttyS0".into(), Placement::in_l1());
        let a = command_line(&vm, &launch).unwrap();
        assert!(!a.iter().any(|w| w == "-no-reboot"), "{a:?}");
        vm.reboot = false;
        let a = command_line(&vm, &launch).unwrap();
        assert_eq!(a.iter().filter(|w| *w == "-no-reboot").count(), 1, "{a:?}");
    }
}
