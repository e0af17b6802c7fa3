//! QEMU as the L2 VMM: its command line and QMP control (`qom-set` of virtio-mem-pci
//! `requested-size`).

use std::os::unix::net::UnixStream;

use serde_json::json;

use crate::error::{Error, Result};
use crate::qmp::Qmp;
use crate::scenario::{DiskKind, VmSpec};
use crate::vmm::{Launch, Vmm, VmmKind, l1};

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

/// QEMU's L2 command line for `vm`.
pub fn command_line(vm: &VmSpec, launch: &Launch) -> Result<Vec<String>> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let mib = |b: u64| format!("{}M", b >> 20);
    let plug: u64 = vm.vmem.iter().map(|v| v.size.0).sum();
    let mem = if plug > 0 {
        format!("{},maxmem={}", mib(vm.memory.0), mib(vm.memory.0 + plug))
    } else {
        mib(vm.memory.0)
    };
    let qmp = format!("tcp:127.0.0.1:{},server=on,wait=off", l1::CONTROL_PORT);
    push(&[
        l1::QEMU,
        "-L",
        l1::FIRMWARE,
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-machine",
        "q35",
    ]);
    push(&[
        "-smp",
        &vm.cpus.to_string(),
        "-m",
        &mem,
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-serial", "stdio", "-monitor", "none", "-qmp", &qmp]);
    push(&["-kernel", l1::KERNEL, "-initrd", l1::INITRD, "-append", &launch.cmdline]);
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
                let drive = format!("file={},if=none,id={},format=raw", l1::disk(&d.id), d.id);
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

    fn shutdown(&mut self) -> Result<()> {
        self.qmp()?.execute("quit", None).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{DiskSpec, Size, VmemSpec};

    #[test]
    fn command_line_has_virtio_mem_iommu_and_disks() {
        let vm = VmSpec {
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
                },
                DiskSpec {
                    id: "n0".into(),
                    size: Size(64 << 20),
                    kind: DiskKind::VfioNvme,
                },
            ],
            kernel_args: String::new(),
        };
        let mut launch = Launch {
            cmdline: "console=ttyS0".into(),
            ..Default::default()
        };
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
    }
}
