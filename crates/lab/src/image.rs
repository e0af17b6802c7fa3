//! The per-run images: L2's initramfs (busybox, virtio modules, agent, guest script) and
//! L1's (busybox, kvm modules, QEMU with its libraries and firmware, the memvisor binary
//! with the libraries QEMU's do not cover when memvisor runs L2, the L2 kernel and
//! initramfs).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::Packages;
use crate::cpio::{Archive, Node};
use crate::error::{Error, IoContext, Result};
use crate::scenario::{DiskKind, Scenario};
use crate::vmm::l1;

/// L1's init (mounts, modules, the control loop on the `lab.ctl` port).
pub const L1_INIT: &str = include_str!("../assets/l1-init.sh");
/// L2's init: the guest agent that runs the guest script.
pub const L2_INIT: &str = include_str!("../assets/l2-agent.sh");
/// Shell helpers the guest script can use (`host`, `obs`, `memtotal_kb`, ...).
pub const L2_LIB: &str = include_str!("../assets/l2-lib.sh");

/// The kernel modules of one kernel, by name (`-` and `_` are the same).
pub struct Modules {
    files: BTreeMap<String, PathBuf>,
}

/// A module's name as the kernel knows it.
fn module_name(s: &str) -> String {
    s.trim_end_matches(".xz").trim_end_matches(".ko").replace('-', "_")
}

/// The `depends=` list in a module's `.modinfo`.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(at) = ko
        .windows(key.len())
        .enumerate()
        .find_map(|(i, w)| (w == key && (i == 0 || ko[i - 1] == 0)).then_some(i + key.len()))
    else {
        return Vec::new();
    };
    let end = ko[at..].iter().position(|b| *b == 0).map_or(ko.len(), |n| at + n);
    String::from_utf8_lossy(&ko[at..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(module_name)
        .collect()
}

impl Modules {
    /// Indexes the `.ko` and `.ko.xz` files under `dir`.
    pub fn index(dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).ctx(|| format!("reading {}", d.display()))?.flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if p.is_dir() {
                    stack.push(p);
                } else if name.ends_with(".ko") || name.ends_with(".ko.xz") {
                    files.insert(module_name(&name), p);
                }
            }
        }
        Ok(Self { files })
    }

    /// A module's bytes, decompressed.
    pub fn load(&self, name: &str) -> Result<Vec<u8>> {
        let path = self
            .files
            .get(&module_name(name))
            .ok_or_else(|| Error::Image(format!("no module {name}")))?;
        let raw = fs::read(path).ctx(|| format!("reading {}", path.display()))?;
        if !path.to_string_lossy().ends_with(".xz") {
            return Ok(raw);
        }
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut &raw[..], &mut out)
            .map_err(|e| Error::Image(format!("decompressing {}: {e}", path.display())))?;
        Ok(out)
    }

    /// `names` with their dependencies, in load order (dependencies first), decompressed.
    pub fn closure(&self, names: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
        fn visit(m: &Modules, name: &str, seen: &mut BTreeSet<String>, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
            if !seen.insert(name.to_string()) {
                return Ok(());
            }
            let bytes = m.load(name)?;
            for dep in module_depends(&bytes) {
                visit(m, &dep, seen, out)?;
            }
            out.push((name.to_string(), bytes));
            Ok(())
        }
        let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
        for n in names {
            visit(self, &module_name(n), &mut seen, &mut out)?;
        }
        Ok(out)
    }
}

/// The shared libraries `binary` needs (soname, file) and its interpreter, found with `ldd`
/// using `library_path` before the host's own libraries.
pub fn shared_libraries(binary: &Path, library_path: &str) -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("ldd")
        .arg(binary)
        .env("LD_LIBRARY_PATH", library_path)
        .output()
        .ctx(|| format!("ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(Error::Image(format!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    parse_ldd(&text).map_err(|e| Error::Image(format!("ldd {}: {e}", binary.display())))
}

/// Parses `ldd` output into (path in the image, file on the host).
pub fn parse_ldd(text: &str) -> std::result::Result<Vec<(String, PathBuf)>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some((name, rest)) = line.split_once(" => ") {
            if rest.starts_with("not found") {
                return Err(format!("{name} not found"));
            }
            let path = rest.split(" (").next().unwrap_or(rest).trim();
            libs.push((format!("lib/x86_64-linux-gnu/{name}"), PathBuf::from(path)));
        } else if line.starts_with('/') {
            let path = line.split(" (").next().unwrap_or(line).trim();
            libs.push((path.trim_start_matches('/').to_string(), PathBuf::from(path)));
        }
    }
    Ok(libs)
}

/// The common base of both images: busybox, `/init`, `/dev/console`, modules.
fn base(pkgs: &Packages, init: &str, modules: &[(String, Vec<u8>)]) -> Archive {
    let mut a = Archive::new();
    a.host_file("bin/busybox", 0o755, pkgs.busybox());
    a.add("bin/sh", Node::Symlink("busybox".into()));
    a.add("dev/console", Node::CharDev(0o600, 5, 1));
    a.add("dev/null", Node::CharDev(0o666, 1, 3));
    for d in ["proc", "sys", "tmp", "run", "mnt"] {
        a.add(d, Node::Dir(0o755));
    }
    a.file("init", 0o755, init.as_bytes().to_vec());
    let mut list = String::new();
    for (name, bytes) in modules {
        a.file(&format!("lab/modules/{name}.ko"), 0o644, bytes.clone());
        list.push_str(name);
        list.push('\n');
    }
    a.file("lab/modules.list", 0o644, list.into_bytes());
    a
}

fn write(a: &Archive, path: &Path) -> Result<u64> {
    let f = fs::File::create(path).ctx(|| format!("creating {}", path.display()))?;
    a.write_to(BufWriter::new(f))
        .ctx(|| format!("writing {}", path.display()))
}

/// Builds L2's initramfs at `out` for `scenario` running `guest_script`.
pub fn build_l2(pkgs: &Packages, mods: &Modules, scenario: &Scenario, guest_script: &str, out: &Path) -> Result<u64> {
    let mut wanted = Vec::new();
    if scenario.vm.iommu {
        wanted.push("virtio_iommu");
    }
    if !scenario.vm.vmem.is_empty() {
        wanted.push("virtio_mem");
    }
    if scenario.vm.disks.iter().any(|d| d.kind == DiskKind::VirtioBlk) {
        wanted.push("virtio_blk");
    }
    let mut a = base(pkgs, L2_INIT, &mods.closure(&wanted)?);
    a.file("lab/lib.sh", 0o644, L2_LIB.as_bytes().to_vec());
    a.file("lab/guest.sh", 0o755, guest_script.as_bytes().to_vec());
    write(&a, out)
}

/// Firmware files QEMU needs for q35/pc with `-kernel`.
const FIRMWARE: &[&str] = &[
    "bios-256k.bin",
    "bios.bin",
    "linuxboot_dma.bin",
    "linuxboot.bin",
    "kvmvapic.bin",
    "pvh.bin",
];

/// Adds the memvisor binary at `binary` to `a` as [`l1::MEMVISOR`], with the shared libraries
/// `ldd` finds for it (`library_path` first, as for QEMU) that `a` does not hold yet; returns
/// the libraries added (paths in the image).
pub fn add_memvisor(a: &mut Archive, binary: &Path, library_path: &str) -> Result<Vec<String>> {
    a.host_file(l1::MEMVISOR, 0o755, binary);
    let mut added = Vec::new();
    for (path, host) in shared_libraries(binary, library_path)? {
        if !a.contains(&path) {
            a.host_file(&path, 0o755, host);
            added.push(path);
        }
    }
    Ok(added)
}

/// Builds L1's initramfs at `out`, carrying QEMU, its libraries and firmware, the memvisor
/// binary `memvisor` (when memvisor runs L2) and L2's kernel and initramfs.
pub fn build_l1(
    pkgs: &Packages,
    mods: &Modules,
    scenario: &Scenario,
    l2_initrd: &Path,
    memvisor: Option<&Path>,
    out: &Path,
) -> Result<u64> {
    let mut wanted = vec!["irqbypass", "kvm", "kvm_amd"];
    if scenario.needs_vfio() {
        wanted.extend(["vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci"]);
    }
    let mut a = base(pkgs, L1_INIT, &mods.closure(&wanted)?);
    a.host_file(l1::QEMU, 0o755, pkgs.qemu());
    for (path, host) in shared_libraries(&pkgs.qemu(), &pkgs.library_path())? {
        a.host_file(&path, 0o755, host);
    }
    for f in FIRMWARE {
        let found = pkgs.firmware_dirs().into_iter().map(|d| d.join(f)).find(|p| p.exists());
        let host = found.ok_or_else(|| Error::Image(format!("firmware {f} not found")))?;
        a.host_file(&format!("{}/{f}", l1::FIRMWARE), 0o644, host);
    }
    if let Some(binary) = memvisor {
        add_memvisor(&mut a, binary, &pkgs.library_path())?;
    }
    a.host_file(l1::KERNEL, 0o644, pkgs.vmlinuz());
    a.host_file(l1::INITRD, 0o644, l2_initrd);
    write(&a, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parses() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \tlibfdt.so.1 => /c/root/usr/lib/x86_64-linux-gnu/libfdt.so.1 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            [
                (
                    "lib/x86_64-linux-gnu/libz.so.1".to_string(),
                    PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1")
                ),
                (
                    "lib/x86_64-linux-gnu/libfdt.so.1".to_string(),
                    PathBuf::from("/c/root/usr/lib/x86_64-linux-gnu/libfdt.so.1")
                ),
                (
                    "lib64/ld-linux-x86-64.so.2".to_string(),
                    PathBuf::from("/lib64/ld-linux-x86-64.so.2")
                ),
            ]
        );
        assert!(parse_ldd("\tlibx.so => not found\n").is_err());
    }

    #[test]
    fn the_image_carries_the_memvisor_binary_and_the_libraries_l1_lacks() {
        // The test binary stands in for memvisor: the same toolchain, the same libraries.
        let exe = std::env::current_exe().unwrap();
        let libs = shared_libraries(&exe, "").unwrap();
        assert!(
            libs.iter().any(|(p, _)| p == "lib/x86_64-linux-gnu/libc.so.6"),
            "{libs:?}"
        );
        let loader = libs
            .iter()
            .find(|(p, _)| p.starts_with("lib64/ld-linux"))
            .unwrap()
            .0
            .clone();
        let mut a = Archive::new();
        // As if QEMU had brought libc already.
        a.host_file("lib/x86_64-linux-gnu/libc.so.6", 0o755, "/qemu/libc.so.6");
        let added = add_memvisor(&mut a, &exe, "").unwrap();
        assert!(a.contains("lab/memvisor/memvisor"));
        assert!(!added.iter().any(|p| p.ends_with("libc.so.6")), "{added:?}");
        assert!(added.contains(&loader), "{added:?}");
        assert_eq!(added.len(), libs.len() - 1, "{added:?}");
        for (p, _) in &libs {
            assert!(a.contains(p), "{p}");
        }
        // The binary and its libraries are in the written archive, byte for byte.
        let mut bytes = Vec::new();
        let libc = libs.iter().find(|(p, _)| p.ends_with("libc.so.6")).unwrap();
        a.host_file(&libc.0, 0o755, libc.1.clone());
        a.write_to(&mut bytes).unwrap();
        let entries = crate::cpio::parse(&bytes).unwrap();
        let binary = entries.iter().find(|e| e.name == "lab/memvisor/memvisor").unwrap();
        assert_eq!(binary.data, fs::read(&exe).unwrap());
        assert_eq!(binary.mode & 0o777, 0o755);
        assert!(entries.iter().any(|e| e.name == loader));
        // A binary ldd cannot read is an error naming it.
        let e = add_memvisor(&mut Archive::new(), Path::new("/nonexistent/memvisor"), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/memvisor"), "{e}");
    }

    #[test]
    fn modinfo_depends_are_found() {
        let ko = b"\x7fELF....\0license=GPL\0depends=kvm,irqbypass,ccp\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["kvm", "irqbypass", "ccp"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
        assert_eq!(module_name("vfio-pci-core.ko.xz"), "vfio_pci_core");
    }
}
