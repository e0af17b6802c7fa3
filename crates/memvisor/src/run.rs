//! `memvisor run`: boot a guest under memvisor's KVM VMM.
//!
//! Every flag has its place in [`VmmConfig`]; `--config FILE` takes the
//! same structure as JSON, and `--print-config` shows the flags as that
//! JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use memvisor_vmm::config::{DiskConfig, SerialConfig, VfioConfig, VmemConfig, VmmConfig};
use memvisor_vmm::migration::Endpoint;
use memvisor_vmm::runner::{self, RunEnd, Start};

use crate::size::{parse_block_size, parse_size};

/// The arguments of `memvisor run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The kernel: an ELF vmlinux with a PVH note, or a bzImage.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// An initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=acpi panic=-1")]
    cmdline: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Boot RAM (e.g. 512M, 2G).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    memory: u64,
    /// A virtio-mem device: `id=vmem0,size=4G,block=2M,requested=1G[,prealloc=on]` (repeatable).
    #[arg(long, value_parser = parse_vmem)]
    vmem: Vec<VmemConfig>,
    /// A virtio-iommu; disks are behind it unless `iommu=off`.
    #[arg(long)]
    viommu: bool,
    /// A virtio-blk disk: `id=disk0,path=IMAGE[,readonly=on][,iommu=off][,zero-copy=on]`
    /// (repeatable). `zero-copy=on` pins guest memory for the disk as for an
    /// assigned device and does its I/O with io_uring on those pinned buffers.
    #[arg(long, value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// A host PCI function bound to vfio-pci, assigned to the guest:
    /// `vfio=<BDF or /sys/bus/pci/devices/... path>[,iommu=off]` (repeatable).
    #[arg(long, value_parser = parse_device)]
    device: Vec<VfioConfig>,
    /// The serial console: `stdio`, `file:PATH` or `off`.
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    serial: SerialConfig,
    /// The management API's Unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// The most guest memory DMA may pin (e.g. 1G), each page counted once however many
    /// devices pin it; no limit without it.
    #[arg(long, value_parser = parse_size)]
    pin_budget: Option<u64>,
    /// The whole configuration as JSON (the form `--print-config` prints); no other flag with it.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "vmem", "viommu", "disk", "device", "api_socket", "pin_budget"])]
    config: Option<PathBuf>,
    /// Print the configuration as JSON and exit.
    #[arg(long)]
    print_config: bool,
    /// Continue the VM saved in this snapshot (`memvisor api snapshot PATH` of a paused
    /// VMM) instead of booting the kernel. The machine's shape (vCPUs, memory, virtio-mem
    /// devices, vIOMMU, disks, serial) must be the snapshot's; the kernel is loaded only
    /// when the restored guest reboots. Disk images are used as they are now.
    #[arg(long, conflicts_with = "incoming")]
    restore: Option<PathBuf>,
    /// Wait for a VM migrated from another memvisor (`memvisor api migrate unix:PATH` there)
    /// on `unix:PATH` or `tcp:HOST:PORT` instead of booting the kernel. The flags must give
    /// the same machine shape as the source's; disk images are the same files (the source
    /// hands their locks over).
    #[arg(long, value_parser = parse_endpoint)]
    incoming: Option<Endpoint>,
}

fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    s.parse()
}

/// `key=value,...` pairs, each key at most once and from `allowed`.
fn pairs<'a>(text: &'a str, what: &str, allowed: &[&str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{what}: `{part}` is not key=value"))?;
        if !allowed.contains(&k) {
            return Err(format!("{what}: unknown key `{k}` (known: {})", allowed.join(", ")));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("{what}: `{k}` given twice"));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn on_off(what: &str, key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{what}: {key}={v}: expected on or off")),
    }
}

fn parse_vmem(text: &str) -> Result<VmemConfig, String> {
    let what = "--vmem";
    let kv = pairs(text, what, &["id", "size", "block", "requested", "prealloc"])?;
    let get = |k: &str| kv.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    Ok(VmemConfig {
        id: get("id").unwrap_or("vmem0").to_string(),
        size: parse_size(get("size").ok_or(format!("{what}: size= is required"))?)?,
        block_size: parse_block_size(get("block").unwrap_or("2M"))?,
        requested: get("requested").map(parse_size).transpose()?.unwrap_or(0),
        prealloc: get("prealloc")
            .map(|v| on_off(what, "prealloc", v))
            .transpose()?
            .unwrap_or(false),
    })
}

fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let what = "--disk";
    let kv = pairs(text, what, &["id", "path", "readonly", "iommu", "zero-copy"])?;
    let get = |k: &str| kv.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let flag = |k: &str, default: bool| {
        get(k)
            .map(|v| on_off(what, k, v))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    Ok(DiskConfig {
        id: get("id").unwrap_or("disk0").to_string(),
        path: get("path").ok_or(format!("{what}: path= is required"))?.into(),
        read_only: flag("readonly", false)?,
        iommu: flag("iommu", true)?,
        zero_copy: flag("zero-copy", false)?,
    })
}

fn parse_device(text: &str) -> Result<VfioConfig, String> {
    let what = "--device";
    let kv = pairs(text, what, &["vfio", "iommu"])?;
    let get = |k: &str| kv.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let host = get("vfio").ok_or(format!("{what} {text}: expected vfio=<BDF or sysfs path>"))?;
    let host = std::path::Path::new(host)
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .ok_or(format!("{what} vfio={host}: not a PCI address"))?;
    Ok(VfioConfig {
        host: host.to_string(),
        iommu: get("iommu")
            .map(|v| on_off(what, "iommu", v))
            .transpose()?
            .unwrap_or(true),
    })
}

fn parse_serial(text: &str) -> Result<SerialConfig, String> {
    match text {
        "stdio" => Ok(SerialConfig::Stdio),
        "off" | "none" => Ok(SerialConfig::Off),
        _ => match text.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(path.into())),
            _ => Err(format!("--serial {text}: expected stdio, file:PATH or off")),
        },
    }
}

impl RunArgs {
    fn config(&self) -> Result<VmmConfig, String> {
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
            return serde_json::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()));
        }
        Ok(VmmConfig {
            kernel: self.kernel.clone().ok_or("--kernel is required")?,
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: self.memory,
            vmem: self.vmem.clone(),
            viommu: self.viommu,
            disks: self.disk.clone(),
            vfio: self.device.clone(),
            serial: self.serial.clone(),
            api_socket: self.api_socket.clone(),
            pin_budget: self.pin_budget,
        })
    }
}

/// Runs the VMM until the guest powers off (exit 0) or fails (exit 1).
pub fn run(args: &RunArgs) -> ExitCode {
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("memvisor run: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        println!(
            "{}",
            serde_json::to_string_pretty(&config).expect("a config serializes")
        );
        return ExitCode::SUCCESS;
    }
    let start = match (&args.restore, &args.incoming) {
        (Some(path), _) => Start::Restore(path.clone()),
        (None, Some(endpoint)) => Start::Incoming(endpoint.clone()),
        (None, None) => Start::Boot,
    };
    match runner::run(config, start) {
        Ok(RunEnd::PowerOff) => {
            log::info!("the guest powered off");
            ExitCode::SUCCESS
        }
        Ok(RunEnd::Shutdown) => {
            log::info!("the VMM was asked to stop");
            ExitCode::SUCCESS
        }
        Ok(RunEnd::Migrated) => {
            log::info!("the guest migrated to another VMM, which runs it now");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("memvisor run: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_flags_parse_and_name_bad_values() {
        let v = parse_vmem("id=vmem0,size=1G,block=2M,requested=0,prealloc=on").unwrap();
        assert_eq!(
            (v.size, v.block_size, v.requested, v.prealloc),
            (1 << 30, 2 << 20, 0, true)
        );
        assert!(parse_vmem("id=a").unwrap_err().contains("size= is required"));
        assert!(
            parse_vmem("size=1G,colour=red")
                .unwrap_err()
                .contains("unknown key `colour`")
        );
        assert!(parse_vmem("size=1G,block=3M").unwrap_err().contains("power of two"));
        assert!(parse_vmem("size=1G,size=2G").unwrap_err().contains("twice"));
        let d = parse_disk("id=disk0,path=/tmp/d.img,iommu=off").unwrap();
        assert_eq!(
            (d.path.to_str(), d.iommu, d.read_only, d.zero_copy),
            (Some("/tmp/d.img"), false, false, false)
        );
        assert!(parse_disk("path=x,zero-copy=on").unwrap().zero_copy);
        assert!(parse_disk("path=x,zero-copy=1").unwrap_err().contains("zero-copy=1"));
        assert!(
            parse_disk("id=d,readonly=maybe,path=x")
                .unwrap_err()
                .contains("readonly=maybe")
        );
        assert_eq!(parse_serial("file:/tmp/c"), Ok(SerialConfig::File("/tmp/c".into())));
        let v = parse_device("vfio=/sys/bus/pci/devices/0000:00:04.0,iommu=off").unwrap();
        assert_eq!((v.host.as_str(), v.iommu), ("0000:00:04.0", false));
        assert!(parse_device("nvme=1").unwrap_err().contains("unknown key"));
        assert!(parse_serial("tcp:1").is_err());
    }
}
