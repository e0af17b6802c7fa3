//! A writer (and, for checks, a reader) of `newc` cpio archives, the format of Linux initramfs.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Where a file's bytes come from.
#[derive(Debug, Clone)]
pub enum Data {
    /// Bytes held in memory.
    Bytes(Vec<u8>),
    /// A file on the host, read when the archive is written.
    Host(PathBuf),
}

/// One member of an archive.
#[derive(Debug, Clone)]
pub enum Node {
    /// A directory with its permission bits.
    Dir(u32),
    /// A regular file with its permission bits.
    File(u32, Data),
    /// A symbolic link to the target.
    Symlink(String),
    /// A character device (permission bits, major, minor).
    CharDev(u32, u32, u32),
}

/// An archive being assembled: paths (without a leading `/`) to nodes; parent directories
/// are added on the way.
#[derive(Debug, Default)]
pub struct Archive {
    nodes: BTreeMap<String, Node>,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `node` at `path`, creating missing parent directories (0755).
    pub fn add(&mut self, path: &str, node: Node) {
        let path = path.trim_matches('/');
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, p)| p)
            .unwrap_or(&[])
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.nodes.entry(parent.clone()).or_insert(Node::Dir(0o755));
        }
        self.nodes.insert(path.to_string(), node);
    }

    /// Adds a regular file with bytes in memory.
    pub fn file(&mut self, path: &str, mode: u32, bytes: Vec<u8>) {
        self.add(path, Node::File(mode, Data::Bytes(bytes)));
    }

    /// Adds a regular file whose bytes are read from `host` when the archive is written.
    pub fn host_file(&mut self, path: &str, mode: u32, host: impl Into<PathBuf>) {
        self.add(path, Node::File(mode, Data::Host(host.into())));
    }

    /// Whether the archive has a member at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path.trim_matches('/'))
    }

    /// Writes the archive in `newc` format (parents before children) and returns the bytes
    /// written.
    pub fn write_to(&self, out: impl Write) -> io::Result<u64> {
        let mut w = NewcWriter::new(out);
        for (path, node) in &self.nodes {
            match node {
                Node::Dir(mode) => w.entry(path, S_IFDIR | mode, 0, 0, &[])?,
                Node::File(mode, Data::Bytes(b)) => w.entry(path, S_IFREG | mode, 0, 0, b)?,
                Node::File(mode, Data::Host(p)) => {
                    let bytes =
                        std::fs::read(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                    w.entry(path, S_IFREG | mode, 0, 0, &bytes)?
                }
                Node::Symlink(target) => w.entry(path, S_IFLNK | 0o777, 0, 0, target.as_bytes())?,
                Node::CharDev(mode, major, minor) => w.entry(path, S_IFCHR | mode, *major, *minor, &[])?,
            }
        }
        w.finish()
    }
}

/// A streaming `newc` writer.
struct NewcWriter<W: Write> {
    out: W,
    ino: u32,
    offset: u64,
}

impl<W: Write> NewcWriter<W> {
    fn new(out: W) -> Self {
        Self { out, ino: 1, offset: 0 }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self, align: u64) -> io::Result<()> {
        let n = (align - self.offset % align) % align;
        self.put(&vec![0; n as usize])
    }

    fn entry(&mut self, name: &str, mode: u32, rmajor: u32, rminor: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| io::Error::other(format!("{name}: over 4 GiB")))?;
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rmajor,
            rminor,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        let mut header = MAGIC.to_vec();
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.put(&header)?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad(4)?;
        self.put(data)?;
        self.pad(4)
    }

    fn finish(mut self) -> io::Result<u64> {
        self.entry(TRAILER, 0, 0, 0, &[])?;
        self.pad(512)?;
        self.out.flush()?;
        Ok(self.offset)
    }
}

/// A member read back from a `newc` archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The member's path.
    pub name: String,
    /// File type and permission bits.
    pub mode: u32,
    /// Device numbers for device nodes (major, minor).
    pub rdev: (u32, u32),
    /// The member's data (a symlink's target for links).
    pub data: Vec<u8>,
}

/// Parses a `newc` archive up to its trailer.
pub fn parse(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let mut pos = 0usize;
    let mut entries = Vec::new();
    let align = |p: usize| p.div_ceil(4) * 4;
    loop {
        let header = bytes.get(pos..pos + 110).ok_or("truncated header")?;
        if &header[..6] != MAGIC {
            return Err(format!("bad magic at {pos}"));
        }
        let field = |i: usize| {
            let s = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i]).map_err(|e| e.to_string())?;
            u32::from_str_radix(s, 16).map_err(|e| format!("field {i} at {pos}: {e}"))
        };
        let (mode, size, rmajor, rminor, namesize) = (field(1)?, field(6)?, field(9)?, field(10)?, field(11)?);
        let name_start = pos + 110;
        let name = bytes
            .get(name_start..name_start + namesize as usize - 1)
            .ok_or("truncated name")?;
        let name = String::from_utf8(name.to_vec()).map_err(|e| e.to_string())?;
        let data_start = align(name_start + namesize as usize);
        let data = bytes
            .get(data_start..data_start + size as usize)
            .ok_or("truncated data")?
            .to_vec();
        pos = align(data_start + size as usize);
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(Entry {
            name,
            mode,
            rdev: (rmajor, rminor),
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_archive_parses_back() {
        let mut a = Archive::new();
        a.file("bin/busybox", 0o755, b"ELF...".to_vec());
        a.add("bin/sh", Node::Symlink("busybox".into()));
        a.add("dev/console", Node::CharDev(0o600, 5, 1));
        a.file("init", 0o755, b"#!/bin/sh\n".to_vec());
        let mut out = Vec::new();
        let n = a.write_to(&mut out).unwrap();
        assert_eq!(n as usize, out.len());
        assert_eq!(out.len() % 512, 0);
        let entries = parse(&out).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init"]);
        assert_eq!(entries[0].mode, S_IFDIR | 0o755);
        assert_eq!(entries[1].data, b"ELF...");
        assert_eq!(entries[1].mode, S_IFREG | 0o755);
        assert_eq!(entries[2].data, b"busybox");
        assert_eq!(entries[4].rdev, (5, 1));
        assert_eq!(entries[4].mode, S_IFCHR | 0o600);
    }

    #[test]
    fn odd_name_and_data_lengths_are_padded() {
        let mut a = Archive::new();
        a.file("a", 0o644, vec![1, 2, 3]);
        a.file("bcdefgh", 0o644, vec![9; 5]);
        let mut out = Vec::new();
        a.write_to(&mut out).unwrap();
        let e = parse(&out).unwrap();
        assert_eq!(e[0].data, [1, 2, 3]);
        assert_eq!(e[1].data, [9; 5]);
    }
}
