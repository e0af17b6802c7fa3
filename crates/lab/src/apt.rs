//! Debian packages without touching the system: a private APT configuration whose sources
//! come from the machine's own, `apt-get download` into a cache keyed by versions, `dpkg -x`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::error::{Error, IoContext, Result};

/// One `deb` source: mirror URIs, suites, components and keyring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Mirror URIs.
    pub uris: Vec<String>,
    /// Suites (`bookworm`, `bookworm-updates`, ...).
    pub suites: Vec<String>,
    /// Components (`main`, ...).
    pub components: Vec<String>,
    /// The `Signed-By` keyring, if any.
    pub signed_by: Option<String>,
}

/// Parses deb822 `.sources` text, keeping the stanzas of type `deb` that are not disabled.
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        let mut last: Option<String> = None;
        for line in stanza.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(k) = &last {
                    let v = fields.entry(k.clone()).or_default();
                    v.push(' ');
                    v.push_str(line.trim());
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                fields.insert(k.clone(), v.trim().to_string());
                last = Some(k);
            }
        }
        let words = |k: &str| -> Vec<String> {
            fields
                .get(k)
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default()
        };
        let enabled = fields.get("enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        if enabled && words("types").iter().any(|t| t == "deb") && !words("uris").is_empty() {
            out.push(Source {
                uris: words("uris"),
                suites: words("suites"),
                components: words("components"),
                signed_by: fields.get("signed-by").cloned(),
            });
        }
    }
    out
}

/// Parses one-line `sources.list` text (`deb [opts] uri suite component...`).
pub fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(String::from);
            rest = after.trim();
        }
        let mut words = rest.split_whitespace().map(String::from);
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(Source {
            uris: vec![uri],
            suites: vec![suite],
            components: words.collect(),
            signed_by,
        });
    }
    out
}

/// The machine's own `deb` sources (`/etc/apt/sources.list.d/*.sources` and `*.list`,
/// `/etc/apt/sources.list`), read only.
pub fn system_sources(etc_apt: &Path) -> Vec<Source> {
    let mut out = Vec::new();
    if let Ok(text) = fs::read_to_string(etc_apt.join("sources.list")) {
        out.extend(parse_one_line(&text));
    }
    let mut files: Vec<_> = fs::read_dir(etc_apt.join("sources.list.d"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else { continue };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => out.extend(parse_deb822(&text)),
            Some("list") => out.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    out
}

/// The release codename: the first suite without a `-` among sources with component `main`.
pub fn codename(sources: &[Source]) -> Option<String> {
    sources
        .iter()
        .flat_map(|s| &s.suites)
        .find(|s| !s.contains('-') && !s.contains('/'))
        .cloned()
}

/// The lab's deb822 sources: the machine's own, with `<codename>-backports` added to every
/// stanza that carries the bare codename.
pub fn lab_sources(system: &[Source], codename: &str) -> String {
    let mut out = String::new();
    for s in system {
        let mut suites = s.suites.clone();
        let backports = format!("{codename}-backports");
        if suites.iter().any(|x| x == codename) && !suites.contains(&backports) {
            suites.push(backports);
        }
        out.push_str("Types: deb\n");
        out.push_str(&format!("URIs: {}\n", s.uris.join(" ")));
        out.push_str(&format!("Suites: {}\n", suites.join(" ")));
        out.push_str(&format!("Components: {}\n", s.components.join(" ")));
        if let Some(k) = &s.signed_by {
            out.push_str(&format!("Signed-By: {k}\n"));
        }
        out.push('\n');
    }
    out
}

/// The `Inst` lines of `apt-get install -s`: package name to version.
pub fn parse_simulation(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?;
            let version = w.next()?.trim_start_matches('(');
            let version = if version.starts_with('[') {
                w.next()?.trim_start_matches('(')
            } else {
                version
            };
            Some((name.to_string(), version.to_string()))
        })
        .collect()
}

/// Picks the newest `linux-image-<series>.N+...-cloud-amd64` from package names.
pub fn newest_cloud_kernel<'a>(names: impl IntoIterator<Item = &'a str>, series: &str) -> Option<String> {
    let prefix = format!("linux-image-{series}.");
    let key = |n: &str| -> Option<Vec<u64>> {
        let rest = n.strip_prefix(&prefix)?.strip_suffix("-cloud-amd64")?;
        if n.ends_with("-dbg") || n.contains("unsigned") {
            return None;
        }
        Some(
            rest.split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect(),
        )
    };
    names
        .into_iter()
        .filter_map(|n| Some((key(n)?, n)))
        .max()
        .map(|(_, n)| n.to_string())
}

/// 64-bit FNV-1a, a hash that stays the same across builds (for cache keys).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The unpacked packages of the lab.
#[derive(Debug, Clone)]
pub struct Packages {
    /// The root all packages were unpacked into.
    pub root: PathBuf,
    /// The kernel's release (`6.12.N+deb12-cloud-amd64`).
    pub kernel_release: String,
    /// Every package's name and version.
    pub versions: BTreeMap<String, String>,
}

impl Packages {
    /// The QEMU binary.
    pub fn qemu(&self) -> PathBuf {
        self.root.join("usr/bin/qemu-system-x86_64")
    }
    /// `LD_LIBRARY_PATH` for programs of the unpacked root.
    pub fn library_path(&self) -> String {
        format!(
            "{0}/usr/lib/x86_64-linux-gnu:{0}/lib/x86_64-linux-gnu",
            self.root.display()
        )
    }
    /// The kernel (bzImage).
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.kernel_release))
    }
    /// The kernel's modules folder.
    pub fn modules(&self) -> PathBuf {
        self.root.join(format!("lib/modules/{}", self.kernel_release))
    }
    /// The static busybox.
    pub fn busybox(&self) -> PathBuf {
        self.root.join("bin/busybox")
    }
    /// Folders where QEMU's firmware lives (for `-L`, searched in order).
    pub fn firmware_dirs(&self) -> Vec<PathBuf> {
        vec![self.root.join("usr/share/seabios"), self.root.join("usr/share/qemu")]
    }
}

/// The private APT configuration under the cache folder.
pub struct Apt {
    dir: PathBuf,
}

/// The packages the lab needs besides QEMU's dependencies.
const EXTRA: &[&str] = &["busybox-static", "seabios", "qemu-system-data"];

impl Apt {
    /// Writes the private configuration into `<cache>/apt` from the machine's sources.
    pub fn new(cache: &Path, etc_apt: &Path) -> Result<(Self, String)> {
        let system = system_sources(etc_apt);
        let codename =
            codename(&system).ok_or_else(|| Error::Setup(format!("no Debian suite found in {}", etc_apt.display())))?;
        let dir = cache.join("apt");
        for sub in [
            "etc/sources.list.d",
            "etc/preferences.d",
            "lists/partial",
            "cache/archives/partial",
        ] {
            fs::create_dir_all(dir.join(sub)).ctx(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let d = dir.display();
        let conf = format!(
            "Dir::Etc::SourceList \"{d}/etc/sources.list\";\nDir::Etc::SourceParts \"{d}/etc/sources.list.d\";\n\
             Dir::Etc::Preferences \"{d}/etc/preferences\";\nDir::Etc::PreferencesParts \"{d}/etc/preferences.d\";\n\
             Dir::State::Lists \"{d}/lists\";\nDir::Cache \"{d}/cache\";\nAPT::Sandbox::User \"root\";\n"
        );
        write_if_changed(&dir.join("apt.conf"), &conf)?;
        write_if_changed(&dir.join("etc/sources.list"), "")?;
        let sources = lab_sources(&system, &codename);
        let changed = write_if_changed(&dir.join("etc/sources.list.d/lab.sources"), &sources)?;
        if changed {
            let _ = fs::remove_file(dir.join("lists/.lab-updated"));
        }
        Ok((Self { dir }, codename))
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", self.dir.join("apt.conf")).env("LC_ALL", "C");
        c
    }

    fn run(&self, mut c: Command, what: &str) -> Result<String> {
        let out = c.output().ctx(|| format!("running {what}"))?;
        if !out.status.success() {
            return Err(Error::Setup(format!(
                "{what}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `apt-get update` with the private configuration, at most once a day.
    pub fn update(&self) -> Result<()> {
        let stamp = self.dir.join("lists/.lab-updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() < Duration::from_secs(86400));
        if fresh {
            return Ok(());
        }
        let mut c = self.cmd("apt-get");
        c.args(["-q", "update"]);
        self.run(c, "apt-get update")?;
        fs::write(&stamp, b"").ctx(|| "writing update stamp".into())
    }

    /// What a resolution depends on, as one line: the suite, when the lists were last updated
    /// and when `dpkg_status` (the machine's installed packages, whose candidates the
    /// resolution takes) last changed.
    pub fn resolution_key(&self, codename: &str, dpkg_status: &Path) -> String {
        let mtime = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or_else(|| "none".to_string(), |d| d.as_nanos().to_string())
        };
        format!(
            "{codename} lists {} dpkg {}",
            mtime(&self.dir.join("lists/.lab-updated")),
            mtime(dpkg_status)
        )
    }

    /// Resolves the lab's package set: QEMU from backports with what it needs that is not
    /// installed, firmware and busybox (same simulation), and the newest 6.12 cloud kernel
    /// (alone: the lab needs its image and modules, not the tools it depends on).
    pub fn resolve(&self, codename: &str) -> Result<BTreeMap<String, String>> {
        let mut c = self.cmd("apt-cache");
        c.args(["pkgnames", "linux-image-6.12."]);
        let names = self.run(c, "apt-cache pkgnames")?;
        let kernel = newest_cloud_kernel(names.lines(), "6.12")
            .ok_or_else(|| Error::Setup("no linux-image-6.12.*-cloud-amd64 in the sources".into()))?;
        let mut c = self.cmd("apt-get");
        c.args([
            "install",
            "-s",
            "--no-install-recommends",
            "-t",
            &format!("{codename}-backports"),
        ]);
        c.arg("qemu-system-x86").args(EXTRA);
        let sim = self.run(c, "apt-get install -s")?;
        let mut versions = parse_simulation(&sim);
        // Packages installed on this machine are not listed: take their candidates.
        for name in EXTRA.iter().copied().chain([kernel.as_str(), "qemu-system-x86"]) {
            if !versions.contains_key(name) {
                versions.insert(name.to_string(), self.candidate(name)?);
            }
        }
        Ok(versions)
    }

    /// The candidate version of `name`.
    fn candidate(&self, name: &str) -> Result<String> {
        let mut c = self.cmd("apt-cache");
        c.args(["policy", name]);
        let policy = self.run(c, "apt-cache policy")?;
        policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate: "))
            .filter(|v| *v != "(none)")
            .map(String::from)
            .ok_or_else(|| Error::Setup(format!("no candidate for {name}")))
    }

    /// Downloads and unpacks `versions` into `<cache>/pkgs/<key>`, reusing a complete one.
    pub fn fetch(&self, cache: &Path, versions: &BTreeMap<String, String>) -> Result<Packages> {
        let list: String = versions.iter().map(|(n, v)| format!("{n}={v}\n")).collect();
        let key = format!("{:016x}", fnv1a(list.as_bytes()));
        let base = cache.join("pkgs").join(&key);
        let root = base.join("root");
        let kernel_release = versions
            .keys()
            .find_map(|n| n.strip_prefix("linux-image-").filter(|r| r.ends_with("-cloud-amd64")))
            .ok_or_else(|| Error::Setup("no kernel in the package set".into()))?
            .to_string();
        let packages = Packages {
            root: root.clone(),
            kernel_release,
            versions: versions.clone(),
        };
        if base.join("complete").exists() {
            return Ok(packages);
        }
        let debs = base.join("debs");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&debs).ctx(|| format!("creating {}", debs.display()))?;
        let mut c = self.cmd("apt-get");
        c.current_dir(&debs).args(["-q", "download"]);
        c.args(versions.iter().map(|(n, v)| format!("{n}={v}")));
        self.run(c, "apt-get download")?;
        let mut files: Vec<_> = fs::read_dir(&debs)
            .ctx(|| "listing debs".into())?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for deb in files.iter().filter(|p| p.extension().is_some_and(|e| e == "deb")) {
            let mut c = Command::new("dpkg");
            c.arg("-x").arg(deb).arg(&root);
            self.run(c, &format!("dpkg -x {}", deb.display()))?;
        }
        fs::write(base.join("versions.txt"), list).ctx(|| "writing versions.txt".into())?;
        fs::write(base.join("complete"), b"").ctx(|| "writing complete".into())?;
        Ok(packages)
    }
}

/// Writes `text` to `path` unless it already holds it; says whether it wrote.
fn write_if_changed(path: &Path, text: &str) -> Result<bool> {
    if fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(false);
    }
    fs::write(path, text).ctx(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// The lab's cache folder: `$XDG_CACHE_HOME/memvisor-lab` or `~/.cache/memvisor-lab`.
pub fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("memvisor-lab");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/memvisor-lab")
}

/// Sets up the lab's packages: private APT configuration, update, resolve, fetch.
pub fn setup(cache: &Path) -> Result<Packages> {
    let (apt, codename) = Apt::new(cache, Path::new("/etc/apt"))?;
    apt.update()?;
    let key = apt.resolution_key(&codename, Path::new("/var/lib/dpkg/status"));
    let versions = cached_resolution(&apt.dir.join("resolved"), &key, || apt.resolve(&codename))?;
    apt.fetch(cache, &versions)
}

/// The versions in `file` if it was written for `key`; otherwise `resolve()`'s, written there
/// for the next run. Resolving takes several `apt-cache` runs (seconds here), and every
/// `lab run` sets up; the key names everything the answer depends on, so a stale file is
/// never used. A file that cannot be written only costs the next run the same work.
pub fn cached_resolution(
    file: &Path,
    key: &str,
    resolve: impl FnOnce() -> Result<BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>> {
    let header = format!("# {key}\n");
    if let Some(body) = fs::read_to_string(file)
        .ok()
        .and_then(|t| t.strip_prefix(&header).map(String::from))
    {
        let versions: BTreeMap<String, String> = body
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        if !versions.is_empty() {
            return Ok(versions);
        }
    }
    let versions = resolve()?;
    let text: String = std::iter::once(header)
        .chain(versions.iter().map(|(n, v)| format!("{n}={v}\n")))
        .collect();
    // Written aside and renamed over, so that a run setting up meanwhile reads the old file
    // or the new one, never half of one.
    let aside = file.with_extension(format!("{}.new", std::process::id()));
    if let Err(e) = fs::write(&aside, text).and_then(|()| fs::rename(&aside, file)) {
        let _ = fs::remove_file(&aside);
        eprintln!(
            "memvisor lab: cannot keep the package resolution in {}: {e}",
            file.display()
        );
    }
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n\
        Suites: bookworm bookworm-updates\nComponents: main\n\
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
        Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\
        Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
        Types: deb-src\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main\n\n\
        Enabled: no\nTypes: deb\nURIs: http://other.example\nSuites: x\nComponents: main\n";

    #[test]
    fn a_resolution_is_reused_only_under_its_key() {
        let dir = std::env::temp_dir().join(format!("memvisor-lab-resolved-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("resolved");
        let answer = |v: &str| BTreeMap::from([("qemu-system-x86".to_string(), v.to_string())]);
        let runs = std::cell::Cell::new(0);
        let resolve = |key: &str, v: &str| {
            cached_resolution(&file, key, || {
                runs.set(runs.get() + 1);
                Ok(answer(v))
            })
            .unwrap()
        };
        assert_eq!(resolve("k1", "1:10.0.2+ds-2"), answer("1:10.0.2+ds-2"));
        // Same key: the kept answer, without resolving.
        assert_eq!(resolve("k1", "other"), answer("1:10.0.2+ds-2"));
        // A new key (lists updated, packages installed): resolved again, and kept.
        assert_eq!(resolve("k2", "1:10.0.3"), answer("1:10.0.3"));
        assert_eq!(resolve("k2", "other"), answer("1:10.0.3"));
        assert_eq!(runs.get(), 2);
        // A key that only starts like the kept one is another key.
        let mut again = 0;
        cached_resolution(&file, "k", || {
            again += 1;
            Ok(answer("x"))
        })
        .unwrap();
        assert_eq!(again, 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn deb822_sources_parse_and_gain_backports() {
        let s = parse_deb822(SAMPLE);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].uris, ["http://mirror.example/debian"]);
        assert_eq!(s[1].suites, ["bookworm-security"]);
        assert_eq!(codename(&s).as_deref(), Some("bookworm"));
        let out = lab_sources(&s, "bookworm");
        assert_eq!(
            out,
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates bookworm-backports\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        );
        // The generated text parses back to the same mirrors.
        assert_eq!(parse_deb822(&out)[0].suites.len(), 3);
    }

    #[test]
    fn one_line_sources_parse() {
        let s = parse_one_line(
            "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\n\
             deb-src http://m.example/debian bookworm main\ndeb http://m.example/debian-security bookworm-security main\n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(s[0].components, ["main", "contrib"]);
        assert_eq!(s[1].suites, ["bookworm-security"]);
    }

    #[test]
    fn simulation_lines_give_versions() {
        let v = parse_simulation(
            "NOTE: x\nInst libfdt1 (1.6.1-4+b1 Debian:12.15/oldstable [amd64])\n\
             Inst qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])\n\
             Inst libc6 [2.36-9] (2.36-9+deb12u10 Debian:12.15/oldstable [amd64])\nConf libfdt1 (1.6.1-4+b1)\n",
        );
        assert_eq!(v["libfdt1"], "1.6.1-4+b1");
        assert_eq!(v["qemu-system-x86"], "1:10.0.2+ds-2+deb13u1~bpo12+1");
        assert_eq!(v["libc6"], "2.36-9+deb12u10");
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn newest_kernel_compares_numerically() {
        let names = [
            "linux-image-6.12.95+deb12-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
            "linux-image-6.12.90+deb12.1-cloud-amd64",
            "linux-image-6.12-cloud-amd64",
            "linux-image-6.12.117+deb12-amd64",
        ];
        assert_eq!(
            newest_cloud_kernel(names, "6.12").as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
    }
}
