//! Scenarios as data: the VM, the guest script, the host steps it may ask for, expectations.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};
use crate::vmm::VmmKind;

/// A byte count written as `512M`, `1G`, `2M`, `0` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Size(pub u64);

impl Size {
    /// Parses `<n>[K|M|G|T]` (binary multiples, optional `iB`/`B`).
    pub fn parse(s: &str) -> Option<Size> {
        let s = s.trim();
        let s = s.strip_suffix("iB").or_else(|| s.strip_suffix('B')).unwrap_or(s);
        let (digits, shift) = match s.chars().last()? {
            'K' | 'k' => (&s[..s.len() - 1], 10),
            'M' | 'm' => (&s[..s.len() - 1], 20),
            'G' | 'g' => (&s[..s.len() - 1], 30),
            'T' | 't' => (&s[..s.len() - 1], 40),
            _ => (s, 0),
        };
        digits.trim().parse::<u64>().ok()?.checked_mul(1 << shift).map(Size)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
            if b != 0 && b % (1 << shift) == 0 {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}")
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => Size::parse(&s)
                .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a size (like 512M, 1G, 2M)"))),
        }
    }
}

/// A whole scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The scenario's name.
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// The L2 virtual machine.
    pub vm: VmSpec,
    /// The guest script.
    pub guest: GuestSpec,
    /// Host steps the guest may request (`resize`, `stats`, `unassigned`); others are refused.
    #[serde(default)]
    pub host_steps: Vec<String>,
    /// Expectations checked on the collected observations.
    #[serde(default)]
    pub expect: Vec<Expect>,
    /// Per-stage timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// The L2 virtual machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// vCPUs.
    #[serde(default = "one")]
    pub cpus: u32,
    /// Boot memory.
    pub memory: Size,
    /// virtio-mem regions.
    #[serde(default)]
    pub vmem: Vec<VmemSpec>,
    /// Whether a virtio-iommu sits in front of the devices (found through ACPI VIOT).
    #[serde(default)]
    pub iommu: bool,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Extra kernel command line for L2 (appended to the lab's, e.g. `iomem=relaxed`).
    #[serde(default)]
    pub kernel_args: String,
    /// Whether the guest reboots: QEMU then runs without `-no-reboot` (memvisor always resets
    /// the machine and boots again), and the runner takes a second `@@agent ready` as the
    /// next boot. Without it, a second boot fails the run (an unexpected reset, or a kernel
    /// panic: `panic=-1` reboots).
    #[serde(default)]
    pub reboot: bool,
}

fn one() -> u32 {
    1
}

/// A virtio-mem region.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmemSpec {
    /// The device id host steps name it by.
    pub id: String,
    /// The region's size (the most that can be plugged).
    pub size: Size,
    /// The block size.
    #[serde(default = "two_mib")]
    pub block_size: Size,
    /// The size requested at boot.
    #[serde(default)]
    pub requested: Size,
    /// Whether the VMM backs blocks with memory when they are plugged (so that plugged
    /// memory is resident on the host whether or not the guest touched it).
    #[serde(default)]
    pub prealloc: bool,
}

fn two_mib() -> Size {
    Size(2 << 20)
}

/// How a disk reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskKind {
    /// A virtio-blk disk backed by a file in L1.
    VirtioBlk,
    /// An NVMe controller emulated by the host for L1, bound to vfio-pci in L1 and assigned
    /// to L2.
    VfioNvme,
}

/// A disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The disk's id.
    pub id: String,
    /// Its size.
    pub size: Size,
    /// How it is attached.
    pub kind: DiskKind,
    /// A virtio-blk disk does zero-copy I/O on guest memory it pins (memvisor's
    /// `zero-copy=on`; QEMU has no such mode and runs its usual virtio-blk).
    #[serde(default)]
    pub zero_copy: bool,
}

/// The guest script.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    /// The script's text.
    pub script: Option<String>,
    /// A script file, relative to the scenario file (or given on the command line).
    pub script_file: Option<PathBuf>,
}

/// Per-stage timeouts in seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// L1 from start to its control loop.
    pub l1_boot: u64,
    /// L2 from VMM start to the agent.
    pub l2_boot: u64,
    /// The guest script, host steps included.
    pub scenario: u64,
    /// One host step.
    pub host_step: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            l1_boot: 240,
            l2_boot: 300,
            scenario: 900,
            host_step: 180,
        }
    }
}

/// An expectation and the VMM it applies to: `[[expect]]` is an [`Expectation`] (by its
/// `kind`) with an optional `vmm = "memvisor"` (or `"qemu"`).
#[derive(Debug, Clone, Deserialize)]
pub struct Expect {
    /// Checked only when this VMM runs L2; under every VMM when absent.
    #[serde(default)]
    pub vmm: Option<VmmKind>,
    /// What is expected.
    #[serde(flatten)]
    pub check: Expectation,
}

impl Expect {
    /// Whether it is checked when `vmm` runs L2.
    pub fn applies_to(&self, vmm: VmmKind) -> bool {
        self.vmm.is_none_or(|v| v == vmm)
    }
}

impl From<Expectation> for Expect {
    fn from(check: Expectation) -> Expect {
        Expect { vmm: None, check }
    }
}

/// An expectation checked after the run.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Expectation {
    /// The guest script exits with `status` (always checked with 0 unless stated).
    GuestExit {
        /// The expected exit status.
        status: i32,
    },
    /// The guest printed a line containing `text`.
    OutputContains {
        /// The text.
        text: String,
    },
    /// An observation (`obs key value`) has a numeric value within bounds, every time.
    Observation {
        /// The observation's key.
        key: String,
        /// Smallest allowed value.
        min: Option<f64>,
        /// Largest allowed value.
        max: Option<f64>,
        /// Exact value (compared as text).
        equals: Option<String>,
    },
    /// Every resize that shrinks a region lowers the VMM's RSS by at least `min_fraction`
    /// of the unplugged bytes.
    RssDropOnUnplug {
        /// The fraction (0.99 in the shipped scenario).
        min_fraction: f64,
    },
    /// After every resize the VMM's locked memory (VmLck + VmPin) is at least boot memory
    /// plus plugged memory (pinned without a vIOMMU).
    LockedFollowsPlugged,
    /// Every resize that changes the plugged size was followed through the VMM's own
    /// size-change reports (memvisor's event stream over its API), not by polling: at least
    /// one long poll of each brought a change of the device.
    ResizesSeenInEvents,
    /// After every resize the VMM's locked memory (VmLck + VmPin) stays below `max_kb`
    /// (pinned on demand with a vIOMMU).
    LockedBelow {
        /// The bound in KiB.
        max_kb: u64,
    },
    /// After the guest's `@@exit` (the agent then powers off), the VMM process exits by
    /// itself with `status` within `within_s` seconds. The runner waits for it (and then
    /// does not ask the VMM to quit).
    VmmExit {
        /// The VMM's expected exit status.
        status: i32,
        /// Seconds from `@@exit` to the VMM's exit.
        within_s: f64,
    },
    /// The guest agent started `count` times (`@@agent ready`): 1 plus the reboots (more
    /// than 1 needs `[vm] reboot = true`).
    Boots {
        /// The number of boots.
        count: u32,
    },
    /// The last `host unassigned ID` step counted at least `min_reads` reads and
    /// `min_writes` writes of the guest to unplugged memory of the virtio-mem device `id`
    /// (a VMM that does not count them, QEMU, fails it: give it `vmm = "memvisor"`).
    UnassignedAccesses {
        /// The virtio-mem device.
        id: String,
        /// The fewest reads.
        min_reads: u64,
        /// The fewest writes.
        min_writes: u64,
    },
    /// Between the first and the last host step `step` (the request as the guest writes it,
    /// e.g. `unassigned vmem0`), the VMM's RSS (its guest RAM's under TCG) grew by at most
    /// `max_kb`.
    RssGrowthBelow {
        /// The host step's request.
        step: String,
        /// The most growth in KiB.
        max_kb: u64,
    },
}

impl Scenario {
    /// Parses a scenario; `origin` names the source in errors, which give the line.
    pub fn parse(text: &str, origin: &str) -> Result<Scenario> {
        let err = |message: String| Error::Scenario {
            origin: origin.to_string(),
            message,
        };
        let s: Scenario = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|sp| text[..sp.start.min(text.len())].matches('\n').count() + 1);
            let msg = e.message().trim().to_string();
            err(match line {
                Some(l) => format!("line {l}: {msg}"),
                None => msg,
            })
        })?;
        let line_of = |needle: &str| {
            text.lines()
                .position(|l| l.contains(needle))
                .map(|i| i + 1)
                .unwrap_or(0)
        };
        if s.guest.script.is_some() == s.guest.script_file.is_some() {
            return Err(err(format!(
                "line {}: [guest] needs exactly one of `script` and `script_file`",
                line_of("[guest]")
            )));
        }
        let mut ids: Vec<&str> = s.vm.vmem.iter().map(|v| v.id.as_str()).collect();
        ids.extend(s.vm.disks.iter().map(|d| d.id.as_str()));
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(err(format!(
                    "line {}: device id `{id}` used twice",
                    line_of(&format!("\"{id}\""))
                )));
            }
        }
        for v in &s.vm.vmem {
            let bs = v.block_size.0;
            if !bs.is_power_of_two() || bs < (2 << 20) || v.size.0 % bs != 0 || v.requested > v.size {
                return Err(err(format!(
                    "line {}: vmem `{}`: block_size must be a power of two >= 2M dividing size, requested <= size",
                    line_of(&format!("\"{}\"", v.id)),
                    v.id
                )));
            }
        }
        for (i, e) in s.expect.iter().enumerate() {
            // The line of the `i`th `[[expect]]`.
            let line = text
                .lines()
                .enumerate()
                .filter(|(_, l)| l.trim() == "[[expect]]")
                .nth(i)
                .map_or(0, |(n, _)| n + 1);
            let bad = |m: String| Err(err(format!("line {line}: {m}")));
            match &e.check {
                Expectation::Boots { count } if *count == 0 => return bad("boots: count must be at least 1".into()),
                Expectation::Boots { count } if *count > 1 && !s.vm.reboot => {
                    return bad(format!("boots: {count} boots need `reboot = true` in [vm]"));
                }
                Expectation::VmmExit { within_s, .. } if within_s.is_nan() || *within_s <= 0.0 => {
                    return bad(format!("vmm-exit: within_s must be more than 0, not {within_s}"));
                }
                Expectation::UnassignedAccesses { id, .. } if !s.vm.vmem.iter().any(|v| &v.id == id) => {
                    return bad(format!("unassigned-accesses: no virtio-mem device `{id}` in [vm]"));
                }
                Expectation::UnassignedAccesses { .. } if !s.host_steps.iter().any(|h| h == "unassigned") => {
                    return bad("unassigned-accesses needs the host step `unassigned` in host_steps".into());
                }
                Expectation::RssGrowthBelow { step, .. }
                    if !step
                        .split_whitespace()
                        .next()
                        .is_some_and(|w| s.host_steps.iter().any(|h| h == w)) =>
                {
                    return bad(format!("rss-growth-below: `{step}` is not a declared host step"));
                }
                _ => {}
            }
        }
        for step in &s.host_steps {
            if !HOST_STEPS.contains(&step.as_str()) {
                return Err(err(format!(
                    "line {}: unknown host step `{step}` (known: {})",
                    line_of(&format!("\"{step}\"")),
                    HOST_STEPS.join(", ")
                )));
            }
        }
        Ok(s)
    }

    /// Reads and parses a scenario file.
    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Scenario {
            origin: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The guest script's text: `override_file` if given, else the scenario's `script` or
    /// `script_file` (relative to `base`).
    pub fn guest_script(&self, base: &Path, override_file: Option<&Path>) -> Result<String> {
        let file = override_file
            .map(Path::to_path_buf)
            .or_else(|| self.guest.script_file.as_ref().map(|f| base.join(f)));
        match (file, &self.guest.script) {
            (Some(f), _) => std::fs::read_to_string(&f).map_err(|e| Error::Scenario {
                origin: f.display().to_string(),
                message: e.to_string(),
            }),
            (None, Some(s)) => Ok(s.clone()),
            (None, None) => unreachable!("checked by parse"),
        }
    }

    /// Whether any disk is an assigned NVMe.
    pub fn needs_vfio(&self) -> bool {
        self.vm.disks.iter().any(|d| d.kind == DiskKind::VfioNvme)
    }
}

/// Host steps a guest may ask for.
pub const HOST_STEPS: &[&str] = &["resize", "stats", "unassigned", "restore", "migrate"];

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
host_steps = ["resize"]
[vm]
cpus = 2
memory = "512M"
iommu = true
[[vm.vmem]]
id = "vmem0"
size = "1G"
requested = "128M"
[[vm.disks]]
id = "d0"
size = "64M"
kind = "virtio-blk"
[guest]
script = "echo hi"
[[expect]]
kind = "rss-drop-on-unplug"
min_fraction = 0.99
"#;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(Size::parse("512M"), Some(Size(512 << 20)));
        assert_eq!(Size::parse("1GiB"), Some(Size(1 << 30)));
        assert_eq!(Size::parse("0"), Some(Size(0)));
        assert_eq!(Size::parse("x"), None);
        assert_eq!(Size(256 << 20).to_string(), "256M");
        assert_eq!(Size(0).to_string(), "0");
    }

    #[test]
    fn a_good_scenario_parses() {
        let s = Scenario::parse(GOOD, "good.toml").unwrap();
        assert_eq!(s.vm.cpus, 2);
        assert_eq!(s.vm.vmem[0].block_size, Size(2 << 20));
        assert_eq!(s.vm.vmem[0].requested, Size(128 << 20));
        assert_eq!(s.vm.disks[0].kind, DiskKind::VirtioBlk);
        assert!(matches!(s.expect[0].check, Expectation::RssDropOnUnplug { min_fraction } if min_fraction == 0.99));
        assert_eq!(s.expect[0].vmm, None);
        assert!(!s.vm.reboot);
        assert_eq!(s.timeouts.l1_boot, 240);
    }

    fn error_of(text: &str) -> String {
        Scenario::parse(text, "bad.toml").unwrap_err().to_string()
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let bad = GOOD.replace("cpus = 2", "cpus = = 2");
        let e = error_of(&bad);
        assert!(e.starts_with("scenario bad.toml: line 5:"), "{e}");
    }

    #[test]
    fn type_and_unknown_field_errors_name_the_line() {
        let e = error_of(&GOOD.replace("size = \"1G\"", "size = \"lots\""));
        assert!(e.contains("line 10:") && e.contains("not a size"), "{e}");
        let e = error_of(&GOOD.replace("iommu = true", "iommu = true\ncolour = 3"));
        assert!(e.contains("line 8:") && e.contains("colour"), "{e}");
        let e = error_of(&GOOD.replace("virtio-blk", "floppy"));
        assert!(e.contains("line 15:"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_line() {
        let e = error_of(&GOOD.replace("script = \"echo hi\"", ""));
        assert!(e.contains("line 16:") && e.contains("exactly one"), "{e}");
        let e = error_of(&GOOD.replace("\"d0\"", "\"vmem0\""));
        assert!(e.contains("used twice"), "{e}");
        let e = error_of(&GOOD.replace("[\"resize\"]", "[\"reboot\"]"));
        assert!(e.contains("line 3:") && e.contains("reboot"), "{e}");
    }

    const NEW_KINDS: &str = r#"
name = "t"
host_steps = ["resize", "unassigned"]
[vm]
memory = "512M"
reboot = true
kernel_args = "iomem=relaxed"
[[vm.vmem]]
id = "vmem0"
size = "1G"
[guest]
script = "true"
[[expect]]
kind = "vmm-exit"
status = 0
within_s = 60
[[expect]]
kind = "boots"
count = 2
[[expect]]
kind = "unassigned-accesses"
vmm = "memvisor"
id = "vmem0"
min_reads = 1
min_writes = 1
[[expect]]
kind = "rss-growth-below"
vmm = "memvisor"
step = "unassigned vmem0"
max_kb = 1024
[[expect]]
kind = "observation"
vmm = "qemu"
key = "k"
equals = "0x0"
"#;

    #[test]
    fn the_new_kinds_and_the_vmm_filter_parse() {
        let s = Scenario::parse(NEW_KINDS, "new.toml").unwrap();
        assert!(s.vm.reboot);
        assert_eq!(s.vm.kernel_args, "iomem=relaxed");
        assert!(matches!(s.expect[0].check, Expectation::VmmExit { status: 0, within_s } if within_s == 60.0));
        assert!(matches!(s.expect[1].check, Expectation::Boots { count: 2 }));
        assert!(matches!(
            &s.expect[2].check,
            Expectation::UnassignedAccesses { id, min_reads: 1, min_writes: 1 } if id == "vmem0"
        ));
        assert!(matches!(
            &s.expect[3].check,
            Expectation::RssGrowthBelow { step, max_kb: 1024 } if step == "unassigned vmem0"
        ));
        let vmms: Vec<_> = s.expect.iter().map(|e| e.vmm).collect();
        assert_eq!(
            vmms,
            [
                None,
                None,
                Some(VmmKind::Memvisor),
                Some(VmmKind::Memvisor),
                Some(VmmKind::Qemu)
            ]
        );
        assert!(s.expect[2].applies_to(VmmKind::Memvisor) && !s.expect[2].applies_to(VmmKind::Qemu));
        assert!(s.expect[0].applies_to(VmmKind::Memvisor) && s.expect[0].applies_to(VmmKind::Qemu));
    }

    #[test]
    fn bad_new_kinds_name_the_line_and_the_value() {
        let new = |from: &str, to: &str| error_of(&NEW_KINDS.replacen(from, to, 1));
        let e = new("vmm = \"memvisor\"", "vmm = \"xen\"");
        assert!(e.contains("line 22:") && e.contains("unknown variant `xen`"), "{e}");
        let e = new("reboot = true", "reboot = false");
        assert!(
            e.contains("line 17:") && e.contains("2 boots need `reboot = true`"),
            "{e}"
        );
        let e = new("count = 2", "count = 0");
        assert!(e.contains("line 17:") && e.contains("at least 1"), "{e}");
        let e = new("within_s = 60", "within_s = 0");
        assert!(e.contains("line 13:") && e.contains("not 0"), "{e}");
        let e = new("id = \"vmem0\"\nmin_reads", "id = \"vmem9\"\nmin_reads");
        assert!(
            e.contains("line 20:") && e.contains("no virtio-mem device `vmem9`"),
            "{e}"
        );
        let e = new("[\"resize\", \"unassigned\"]", "[\"resize\"]");
        assert!(
            e.contains("line 20:") && e.contains("needs the host step `unassigned`"),
            "{e}"
        );
        let e = new("step = \"unassigned vmem0\"", "step = \"stats\"");
        assert!(
            e.contains("line 26:") && e.contains("`stats` is not a declared host step"),
            "{e}"
        );
        let e = new("min_writes = 1", "min_writes = 1\ncolour = 1");
        assert!(e.contains("line 20:") && e.contains("unknown field `colour`"), "{e}");
        let e = new("kind = \"boots\"", "kind = \"reboots\"");
        assert!(e.contains("line 17:") && e.contains("unknown variant `reboots`"), "{e}");
    }
}
