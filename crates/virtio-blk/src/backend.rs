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

use smallvec::SmallVec;
use vm_memory::VolatileSlice;

use crate::wire::SECTOR_SIZE;

/// Iovecs per `preadv`/`pwritev` call (well below `IOV_MAX`, 1024).
const IOV_BATCH: usize = 64;

/// Where a device's sectors live.
pub(crate) trait Backend: Send {
    /// Size of the image in bytes (a multiple of 512).
    fn size(&self) -> u64;

    /// Fills `bufs`, in order, from the image at `offset`. Fails if the
    /// image ends before they are full.
    fn read_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;

    /// Writes `bufs`, in order, to the image at `offset`.
    fn write_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// The image's descriptor, for I/O the device submits itself (the
    /// zero-copy path's fixed-buffer reads and writes).
    fn raw_fd(&self) -> RawFd;
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
}

impl RawFile {
    /// Opens the image at `path`, for reading only if `read_only`, and
    /// takes an advisory lock on it (shared for a read-only disk, exclusive
    /// otherwise), so that two writers — or a writer and readers — never
    /// share an image by mistake.
    pub(crate) fn open(path: &Path, read_only: bool) -> Result<Self, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let lock = if read_only { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor `file` owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(ImageError::Locked {
                path: path.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
        // Seeking to the end gives the size of block devices too.
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if size % SECTOR_SIZE != 0 {
            return Err(ImageError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Self { file, size })
    }

    /// Transfers `bufs` at `offset` with `preadv` or `pwritev`, batch by
    /// batch, resuming after short transfers and `EINTR`.
    fn transfer(&self, mut offset: u64, bufs: &[VolatileSlice<'_>], write: bool) -> io::Result<()> {
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
                .map(VolatileSlice::ptr_guard_mut)
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

    fn read_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.transfer(offset, bufs, false)
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.transfer(offset, bufs, true)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
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
    fn vectored_transfers_cover_every_buffer() {
        let image: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let path = temp("vectored", &image);
        let file = RawFile::open(&path, false).unwrap();
        assert_eq!(file.size(), 8192);
        // More buffers than one batch, of odd sizes, some empty.
        let mut mem = vec![0u8; 8192];
        let vs = VolatileSlice::from(&mut mem[..]);
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
        file.read_vectored_at(1000, &bufs).unwrap();
        assert_eq!(&mem[..at], &image[1000..1000 + at]);

        let ones = vec![0xeeu8; 4096];
        let mut src = ones.clone();
        let vs = VolatileSlice::from(&mut src[..]);
        let halves = [vs.subslice(0, 1000).unwrap(), vs.subslice(1000, 3096).unwrap()];
        file.write_vectored_at(4096, &halves).unwrap();
        file.flush().unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[..4096], &image[..4096]);
        assert_eq!(&back[4096..], &ones[..]);

        // Reading past the end fails.
        let err = file.read_vectored_at(8192 - 512, &[vs.subslice(0, 1024).unwrap()]);
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        drop(file);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn open_checks_size_and_locks() {
        let path = temp("odd", &[0u8; 513]);
        let err = RawFile::open(&path, false).unwrap_err();
        assert!(matches!(err, ImageError::Size { size: 513, .. }), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        std::fs::write(&path, [0u8; 1024]).unwrap();
        let writer = RawFile::open(&path, false).unwrap();
        assert!(matches!(RawFile::open(&path, true), Err(ImageError::Locked { .. })));
        drop(writer);
        let r1 = RawFile::open(&path, true).unwrap();
        let r2 = RawFile::open(&path, true).unwrap();
        assert!(matches!(RawFile::open(&path, false), Err(ImageError::Locked { .. })));
        drop((r1, r2));
        std::fs::remove_file(&path).unwrap();
        let err = RawFile::open(&path, true).unwrap_err();
        assert!(matches!(err, ImageError::Open { .. }));
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }
}
