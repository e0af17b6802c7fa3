//! The machine that runs the L2 VMM, behind one trait: L1 under TCG (nested, [`crate::nested`])
//! or this host itself (direct, [`crate::direct`]); and the choice between them: direct iff
//! this host's `/dev/kvm` can boot Linux, unless `--mode` says otherwise.

use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::console::Lines;
use crate::error::Result;
use crate::vmm::{Accel, Placement};

/// A fault the lab puts on a migration on purpose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamFault {
    /// Kills the destination (SIGKILL) once its RSS grew by this many kB: mid-stream.
    KillDestinationAfterKb(u64),
    /// The stream goes through `memvisor lab proxy` listening at `listen` (the source
    /// migrates there), which flips one bit of the byte at `offset`.
    FlipByte {
        /// The proxy's Unix socket.
        listen: String,
        /// The destination's Unix socket.
        target: String,
        /// The byte's offset in the source's stream.
        offset: u64,
    },
}

/// What the runner needs from the machine that runs the L2 VMM. Every process it starts is
/// killed and reaped when it is dropped, on every path.
pub trait Host {
    /// Where the VMM's program, firmware, L2 kernel and initramfs and disk files are there,
    /// its accelerator and where its control interface listens.
    fn placement(&self) -> Placement;
    /// Creates a sparse disk image file of `bytes` at `path` (a [`Placement::disk`]).
    fn create_disk(&mut self, path: &str, bytes: u64) -> Result<()>;
    /// Makes `count` NVMe controllers available to vfio-pci; their PCI addresses.
    fn bind_vfio(&mut self, count: usize) -> Result<Vec<String>>;
    /// Starts the VMM with `argv` (program first), its serial console on [`Host::console`];
    /// returns a stream on its control interface.
    fn start_vmm(&mut self, argv: &[String]) -> Result<UnixStream>;
    /// Starts a second VMM with `argv` beside the running one (a migration's destination),
    /// its serial console on the same [`Host::console`], its control interface not relayed
    /// yet; returns once it listens on the Unix socket `listens`.
    fn start_second_vmm(&mut self, argv: &[String], listens: &str) -> Result<()>;
    /// Once the first VMM has exited: the second becomes the VMM (the one
    /// [`Host::vmm_running`] and the others ask about), its control interface at `control`
    /// relayed; returns a stream on it.
    fn adopt_second_vmm(&mut self, control: &crate::vmm::Control) -> Result<UnixStream>;
    /// Arms `fault` on the migration to the second VMM (started, listening), before it
    /// starts.
    fn break_migration(&mut self, fault: &StreamFault) -> Result<()>;
    /// Once the second VMM has exited: its exit status (128 + the signal if a signal ended
    /// it) and the end of its log with what a [`StreamFault`] saw; `None` while it runs.
    fn second_vmm_exit(&mut self) -> Result<Option<(i32, String)>>;
    /// L2's serial console (lines from the guest).
    fn console(&mut self) -> Result<&Lines>;
    /// Writes `text` to L2's serial console (answers to the guest).
    fn answer(&mut self, text: &str) -> Result<()>;
    /// Whether the VMM still runs.
    fn vmm_running(&mut self) -> Result<bool>;
    /// The VMM's exit status once it has exited (128 + the signal if a signal ended it),
    /// `None` while it runs.
    fn vmm_exit_status(&mut self) -> Result<Option<i32>>;
    /// The VMM's `/proc/<pid>/status` lines (at least `VmRSS`, `VmHWM`, `VmLck`, `VmPin`).
    fn vmm_status(&mut self) -> Result<String>;
    /// The VMM's `/proc/<pid>/smaps` (sampled under TCG, see [`crate::report::HostSample`]).
    fn vmm_smaps(&mut self) -> Result<String>;
    /// The end of the VMM's stderr and whether it runs, for failure messages.
    fn vmm_log(&mut self) -> String;
    /// The last lines of every console and control stream, for failure messages.
    fn tails(&self) -> Vec<String>;
    /// Stops what the host runs once the VMM was asked to quit (powers L1 off, waits for
    /// the VMM); what does not stop in time is killed, and that is an error.
    fn shutdown(&mut self) -> Result<()>;
}

/// What `--mode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModeChoice {
    /// Direct if this host's `/dev/kvm` can boot Linux, nested otherwise.
    #[default]
    Auto,
    /// Always through L1 under TCG.
    Nested,
    /// Always on this host; under TCG if its `/dev/kvm` cannot boot Linux.
    Direct,
}

impl std::str::FromStr for ModeChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(ModeChoice::Auto),
            "nested" => Ok(ModeChoice::Nested),
            "direct" => Ok(ModeChoice::Direct),
            _ => Err(format!("unknown mode `{s}` (auto, nested, direct)")),
        }
    }
}

/// Where the L2 VMM ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Inside L1, a Linux under TCG whose own KVM runs L2.
    Nested,
    /// On this host, without L1.
    Direct,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Nested => "nested",
            Mode::Direct => "direct",
        })
    }
}

/// What this host's KVM is, as `/dev` and `/sys/module` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmProbe {
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// A PVM module (`/sys/module/kvm_pvm`, or any `kvm*pvm*`): KVM for paravirtualized
    /// guests only; it cannot boot an unmodified Linux.
    pub pvm: Option<String>,
    /// The hardware-virtualization module loaded (`kvm_intel` or `kvm_amd`).
    pub hardware: Option<String>,
}

impl KvmProbe {
    /// Looks at `<root>/dev/kvm` and `<root>/sys/module` (`root` is `/` but in tests).
    /// Built-in modules with parameters appear in `/sys/module` as loaded ones do.
    pub fn read(root: &Path) -> KvmProbe {
        let modules: Vec<String> = std::fs::read_dir(root.join("sys/module"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let pvm = modules
            .iter()
            .find(|m| m.starts_with("kvm") && m.contains("pvm"))
            .cloned();
        let hardware = ["kvm_intel", "kvm_amd"]
            .into_iter()
            .find(|m| modules.iter().any(|n| n == m))
            .map(String::from);
        KvmProbe {
            dev_kvm: root.join("dev/kvm").exists(),
            pvm,
            hardware,
        }
    }

    /// `Ok` with the module if `/dev/kvm` can boot an unmodified Linux, else why not.
    pub fn boots_linux(&self) -> std::result::Result<&str, String> {
        if !self.dev_kvm {
            return Err("there is no /dev/kvm".into());
        }
        if let Some(m) = &self.pvm {
            return Err(format!("/dev/kvm is a PVM hypervisor: /sys/module/{m}"));
        }
        self.hardware
            .as_deref()
            .ok_or_else(|| "neither kvm_intel nor kvm_amd is loaded".into())
    }
}

/// The resolved topology of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Where the VMM runs.
    pub mode: Mode,
    /// How L2's vCPUs run.
    pub accel: Accel,
    /// Why this mode (the flag, or what detection found).
    pub reason: String,
    /// Set when direct mode runs L2 under TCG: why KVM could not be used.
    pub tcg_fallback: Option<String>,
}

impl Topology {
    /// Resolves `choice` against what `probe` found.
    pub fn resolve(choice: ModeChoice, probe: &KvmProbe) -> Topology {
        let kvm = probe.boots_linux();
        let (mode, reason) = match (choice, &kvm) {
            (ModeChoice::Nested, _) => (Mode::Nested, "--mode nested".to_string()),
            (ModeChoice::Direct, _) => (Mode::Direct, "--mode direct".to_string()),
            (ModeChoice::Auto, Ok(m)) => (Mode::Direct, format!("auto: /dev/kvm boots Linux ({m})")),
            (ModeChoice::Auto, Err(why)) => (Mode::Nested, format!("auto: {why}")),
        };
        let tcg_fallback = match (mode, kvm) {
            (Mode::Direct, Err(why)) => Some(format!(
                "direct mode on a host whose /dev/kvm cannot boot Linux ({why}): L2 runs under TCG"
            )),
            _ => None,
        };
        Topology {
            mode,
            accel: if tcg_fallback.is_some() { Accel::Tcg } else { Accel::Kvm },
            reason,
            tcg_fallback,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh temporary folder, removed when dropped.
    pub(crate) struct TempTree(pub PathBuf);

    impl TempTree {
        pub(crate) fn new(tag: &str) -> TempTree {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("memvisor-lab-test-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempTree(p)
        }

        /// Creates `rel` (and its parents) as an empty file.
        pub(crate) fn file(&self, rel: &str) -> &Self {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "").unwrap();
            self
        }

        /// Creates `rel` (and its parents) as a folder.
        pub(crate) fn dir(&self, rel: &str) -> &Self {
            std::fs::create_dir_all(self.0.join(rel)).unwrap();
            self
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_pvm_host_like_this_one_runs_nested() {
        let t = TempTree::new("pvm");
        t.file("dev/kvm")
            .dir("sys/module/kvm/parameters")
            .dir("sys/module/kvm_pvm/parameters");
        let p = KvmProbe::read(&t.0);
        assert_eq!(p.pvm.as_deref(), Some("kvm_pvm"));
        assert_eq!(p.hardware, None);
        let topo = Topology::resolve(ModeChoice::Auto, &p);
        assert_eq!((topo.mode, topo.accel), (Mode::Nested, Accel::Kvm));
        assert!(
            topo.reason.contains("PVM") && topo.reason.contains("kvm_pvm"),
            "{}",
            topo.reason
        );
        assert_eq!(topo.tcg_fallback, None);
        // Even with a hardware module beside it, PVM's /dev/kvm is not taken for direct.
        t.dir("sys/module/kvm_intel");
        assert_eq!(
            Topology::resolve(ModeChoice::Auto, &KvmProbe::read(&t.0)).mode,
            Mode::Nested
        );
    }

    #[test]
    fn a_hardware_kvm_host_runs_direct_with_kvm() {
        for module in ["kvm_amd", "kvm_intel"] {
            let t = TempTree::new("hw");
            t.file("dev/kvm")
                .dir("sys/module/kvm")
                .dir(&format!("sys/module/{module}"));
            let p = KvmProbe::read(&t.0);
            assert_eq!(p.boots_linux(), Ok(module));
            let topo = Topology::resolve(ModeChoice::Auto, &p);
            assert_eq!((topo.mode, topo.accel), (Mode::Direct, Accel::Kvm));
            assert!(topo.reason.contains(module), "{}", topo.reason);
            assert_eq!(topo.tcg_fallback, None);
            // --mode nested overrides detection.
            let topo = Topology::resolve(ModeChoice::Nested, &p);
            assert_eq!((topo.mode, topo.reason.as_str()), (Mode::Nested, "--mode nested"));
        }
    }

    #[test]
    fn no_dev_kvm_or_no_hardware_module_runs_nested() {
        let t = TempTree::new("nokvm");
        t.dir("sys/module/kvm_amd");
        let p = KvmProbe::read(&t.0);
        assert!(p.boots_linux().unwrap_err().contains("no /dev/kvm"));
        assert_eq!(Topology::resolve(ModeChoice::Auto, &p).mode, Mode::Nested);
        let t = TempTree::new("nohw");
        t.file("dev/kvm").dir("sys/module/kvm");
        let p = KvmProbe::read(&t.0);
        assert!(p.boots_linux().unwrap_err().contains("kvm_intel nor kvm_amd"));
        assert_eq!(Topology::resolve(ModeChoice::Auto, &p).mode, Mode::Nested);
    }

    #[test]
    fn direct_without_a_usable_kvm_falls_back_to_tcg_and_says_why() {
        let t = TempTree::new("fallback");
        t.file("dev/kvm").dir("sys/module/kvm_pvm");
        let topo = Topology::resolve(ModeChoice::Direct, &KvmProbe::read(&t.0));
        assert_eq!((topo.mode, topo.accel), (Mode::Direct, Accel::Tcg));
        let why = topo.tcg_fallback.unwrap();
        assert!(why.contains("PVM") && why.contains("TCG"), "{why}");
    }

    #[test]
    fn modes_parse() {
        assert_eq!("auto".parse::<ModeChoice>(), Ok(ModeChoice::Auto));
        assert_eq!("direct".parse::<ModeChoice>(), Ok(ModeChoice::Direct));
        assert_eq!("nested".parse::<ModeChoice>(), Ok(ModeChoice::Nested));
        assert!("bare".parse::<ModeChoice>().is_err());
    }
}
