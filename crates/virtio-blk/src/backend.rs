//! The disk image behind the device.
//!
//! [`Backend`] is the small interface the request path needs — vectored
//! reads and writes at an offset straight into and out of guest memory, and
//! a flush — so that the synchronous [`RawFile`] here can be replaced (by
//! an io_uring path) without touching request handling.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use memvisor_memory::GuestSlice;
use smallvec::SmallVec;
use vm_memory::bitmap::Bitmap;

use crate::wire::SECTOR_SIZE;

/// Iovecs per `preadv`/`pwritev` call (well below `IOV_MAX`, 1024).
const IOV_BATCH: usize = 64;

/// Where a device's sectors live.
pub(crate) trait Backend: Send {
    /// Size of the image in bytes (a multiple of 512).
    fn size(&self) -> u64;

    /// Fills `bufs`, in order, from the image at `offset`, and marks them
    /// dirty (also on failure, which may have filled part of them). Fails
    /// if the image ends before they are full.
    fn read_vectored_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()>;

    /// Writes `bufs`, in order, to the image at `offset`.
    fn write_vectored_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// [`flush`](Self::flush), its failure naming the image.
    fn sync(&self) -> Result<(), ImageError>;

    /// The image's descriptor, for I/O the device submits itself (the
    /// zero-copy path's fixed-buffer reads and writes).
    fn raw_fd(&self) -> RawFd;

    /// Takes (`true`) or drops the image's advisory lock; see
    /// [`RawFile::open`]. Backends without a lock do nothing.
    fn set_lock(&self, _locked: bool) -> Result<(), ImageError> {
        Ok(())
    }
}

/// Why an image cannot back a device.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image cannot be opened or its size read.
    #[error("virtio-blk image {}: {source}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// Another process (or device) holds a conflicting lock on the image.
    #[error(
        "virtio-blk image {}: locked by another user ({source}); a disk is opened by one writer or by readers only",
        path.display()
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The image's completed writes could not be made durable.
    #[error("virtio-blk image {}: fdatasync: {source}", path.display())]
    Sync {
        /// The image.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The image's size is not a whole number of sectors.
    #[error("virtio-blk image {}: size {size} bytes is not a multiple of 512", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// A raw image file (or block device), read and written with positional
/// vectored system calls.
#[derive(Debug)]
pub(crate) struct RawFile {
    file: File,
    size: u64,
    path: PathBuf,
    read_only: bool,
}

impl RawFile {
    /// Opens the image at `path`, for reading only if `read_only`, and
    /// takes an advisory lock on it (shared for a read-only disk, exclusive
    /// otherwise), so that two writers — or a writer and readers — never
    /// share an image by mistake. Without `lock` the lock is left for
    /// [`Backend::set_lock`] (a migration's destination, while the source
    /// still holds it).
    pub(crate) fn open(path: &Path, read_only: bool, lock: bool) -> Result<Self, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        // Seeking to the end gives the size of block devices too.
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if size % SECTOR_SIZE != 0 {
            return Err(ImageError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        let this = Self {
            file,
            size,
            path: path.to_path_buf(),
            read_only,
        };
        if lock {
            this.set_lock(true)?;
        }
        Ok(this)
    }

    /// Transfers `bufs` at `offset` with `preadv` or `pwritev`. The kernel
    /// writes a read's buffers through raw pointers, which `vm-memory`
    /// does not see (`ptr_guard_mut` marks nothing), so every buffer of a
    /// read is marked dirty once it returns — also after a failure, which
    /// may have filled part of them.
    fn transfer(&self, offset: u64, bufs: &[GuestSlice<'_>], write: bool) -> io::Result<()> {
        let result = self.transfer_unmarked(offset, bufs, write);
        if !write {
            for buf in bufs {
                buf.bitmap().mark_dirty(0, buf.len());
            }
        }
        result
    }

    /// [`transfer`](Self::transfer) without the marking: batch by batch,
    /// resuming after short transfers and `EINTR`.
    fn transfer_unmarked(&self, mut offset: u64, bufs: &[GuestSlice<'_>], write: bool) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // The next byte to transfer: buffer `index`, `skip` bytes in.
        let (mut index, mut skip) = (0usize, 0usize);
        loop {
            while index < bufs.len() && skip >= bufs[index].len() {
                index += 1;
                skip = 0;
            }
            if index == bufs.len() {
                return Ok(());
            }
            // The guards keep the pointers valid for the call.
            let guards: SmallVec<[_; IOV_BATCH]> = bufs[index..]
                .iter()
                .take(IOV_BATCH)
                .map(GuestSlice::ptr_guard_mut)
                .collect();
            let mut iov: SmallVec<[libc::iovec; IOV_BATCH]> = SmallVec::new();
            for (i, guard) in guards.iter().enumerate() {
                let from = if i == 0 { skip } else { 0 };
                iov.push(libc::iovec {
                    // `from` is below the slice's length (checked above for
                    // the first one, 0 for the others).
                    iov_base: guard.as_ptr().wrapping_add(from).cast(),
                    iov_len: guard.len() - from,
                });
            }
            let pos = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("offset {offset:#x}")))?;
            let count = iov.len() as libc::c_int;
            let done = if write {
                // SAFETY: every iovec describes guest memory that the guard
                // next to it keeps mapped for the call; the kernel only
                // reads it. The driver may change it concurrently, which
                // is the driver's race and harmless to the host.
                unsafe { libc::pwritev(fd, iov.as_ptr(), count, pos) }
            } else {
                // SAFETY: as above; the kernel writes guest memory, which
                // nothing on the host borrows as a Rust reference.
                unsafe { libc::preadv(fd, iov.as_ptr(), count, pos) }
            };
            drop(guards);
            let mut done = match usize::try_from(done) {
                Ok(0) => {
                    return Err(io::Error::new(
                        if write {
                            io::ErrorKind::WriteZero
                        } else {
                            io::ErrorKind::UnexpectedEof
                        },
                        format!("image ended at {offset:#x}"),
                    ));
                }
                Ok(n) => n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            offset += done as u64;
            while done > 0 {
                let left = bufs[index].len() - skip;
                if done < left {
                    skip += done;
                    done = 0;
                } else {
                    done -= left;
                    index += 1;
                    skip = 0;
                }
            }
        }
    }
}

impl Backend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_vectored_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.transfer(offset, bufs, false)
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.transfer(offset, bufs, true)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync(&self) -> Result<(), ImageError> {
        self.flush().map_err(|source| ImageError::Sync {
            path: self.path.clone(),
            source,
        })
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn set_lock(&self, locked: bool) -> Result<(), ImageError> {
        let op = match (locked, self.read_only) {
            (false, _) => libc::LOCK_UN,
            (true, true) => libc::LOCK_SH | libc::LOCK_NB,
            (true, false) => libc::LOCK_EX | libc::LOCK_NB,
        };
        // SAFETY: flock on a descriptor `self.file` owns; no memory is involved.
        if unsafe { libc::flock(self.file.as_raw_fd(), op) } != 0 {
            return Err(ImageError::Locked {
                path: self.path.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, data: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("memvisor-blk-backend-{}-{name}", std::process::id()));
        std::fs::write(&path, data).unwrap();
        path
    }

    #[test]
    fn vectored_transfers_cover_every_buffer_and_reads_mark_them_dirty() {
        use memvisor_memory::{Backing, RamBlock};
        use vm_memory::VolatileMemory;

        let image: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let path = temp("vectored", &image);
        let file = RawFile::open(&path, false, true).unwrap();
        assert_eq!(file.size(), 8192);
        // Guest memory, whose dirty bitmap the reads must mark.
        let mem = RamBlock::new("mem", 1 << 20, Backing::Memfd).unwrap();
        let dirty = || mem.mmap().bitmap().get_and_reset()[0];
        // More buffers than one batch, of odd sizes, some empty, from byte
        // 4000 on (pages 0 and 1).
        let vs = mem.mmap().get_slice(4000, 8192).unwrap();
        let sizes = (0..100).map(|i| [0usize, 1, 7, 64, 3][i % 5]).collect::<Vec<_>>();
        let mut at = 0;
        let bufs: Vec<_> = sizes
            .iter()
            .map(|&n| {
                let s = vs.subslice(at, n).unwrap();
                at += n;
                s
            })
            .collect();
        assert_eq!(dirty(), 0);
        file.read_vectored_at(1000, &bufs).unwrap();
        assert_eq!(dirty(), 0b11, "the read marks exactly the pages of its buffers");
        let mut got = vec![0u8; at];
        mem.read(4000, &mut got).unwrap();
        assert_eq!(got, &image[1000..1000 + at]);

        let ones = vec![0xeeu8; 4096];
        mem.write(8 * 4096, &ones).unwrap();
        assert_eq!(dirty(), 1 << 8);
        let vs = mem.mmap().get_slice(8 * 4096, 4096).unwrap();
        let halves = [vs.subslice(0, 1000).unwrap(), vs.subslice(1000, 3096).unwrap()];
        file.write_vectored_at(4096, &halves).unwrap();
        assert_eq!(dirty(), 0, "a write only reads guest memory");
        file.flush().unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[..4096], &image[..4096]);
        assert_eq!(&back[4096..], &ones[..]);

        // Reading past the end fails, and marks the buffer all the same
        // (part of it was filled).
        let err = file.read_vectored_at(8192 - 512, &[vs.subslice(0, 1024).unwrap()]);
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(dirty(), 1 << 8);
        drop(file);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn open_checks_size_and_locks() {
        let path = temp("odd", &[0u8; 513]);
        let err = RawFile::open(&path, false, true).unwrap_err();
        assert!(matches!(err, ImageError::Size { size: 513, .. }), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        std::fs::write(&path, [0u8; 1024]).unwrap();
        let writer = RawFile::open(&path, false, true).unwrap();
        assert!(matches!(
            RawFile::open(&path, true, true),
            Err(ImageError::Locked { .. })
        ));
        drop(writer);
        let r1 = RawFile::open(&path, true, true).unwrap();
        let r2 = RawFile::open(&path, true, true).unwrap();
        assert!(matches!(
            RawFile::open(&path, false, true),
            Err(ImageError::Locked { .. })
        ));
        drop((r1, r2));
        std::fs::remove_file(&path).unwrap();
        let err = RawFile::open(&path, true, true).unwrap_err();
        assert!(matches!(err, ImageError::Open { .. }));
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }

    #[test]
    fn a_deferred_lock_is_handed_over_between_two_writers() {
        let path = temp("handover", &[0u8; 1024]);
        let source = RawFile::open(&path, false, true).unwrap();
        // A migration's destination opens the image while the source holds it.
        let destination = RawFile::open(&path, false, false).unwrap();
        assert!(matches!(destination.set_lock(true), Err(ImageError::Locked { .. })));
        source.set_lock(false).unwrap();
        destination.set_lock(true).unwrap();
        // The source cannot take it back while the destination runs.
        assert!(matches!(source.set_lock(true), Err(ImageError::Locked { .. })));
        destination.set_lock(false).unwrap();
        source.set_lock(true).unwrap();
        drop((source, destination));
        std::fs::remove_file(&path).unwrap();
    }
}
