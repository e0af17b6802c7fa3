//! Transports: any `Read`/`Write` works with [`Registry`]; these helpers
//! add files and Unix sockets (a sender in one process, a receiver in
//! another).

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::error::VmStateError;
use crate::registry::{Registry, Summary};

/// Read buffer of the receiving helpers: small reads (headers) are
/// gathered; large ones (RAM page runs) go straight into guest memory.
const LOAD_BUFFER: usize = 64 << 10;

fn transport<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmStateError + 'a {
    move |source| VmStateError::Transport {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Saves to a new file at `path` (replacing it) and syncs it.
pub fn save_to_file(registry: &mut Registry, path: impl AsRef<Path>) -> Result<Summary, VmStateError> {
    let path = path.as_ref();
    let mut file = File::create(path).map_err(transport("creating", path))?;
    let summary = registry.save(&mut file)?;
    file.sync_all().map_err(transport("syncing", path))?;
    Ok(summary)
}

/// Loads from the file at `path`.
pub fn load_from_file(registry: &mut Registry, path: impl AsRef<Path>) -> Result<Summary, VmStateError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(transport("opening", path))?;
    registry.load(BufReader::with_capacity(LOAD_BUFFER, file))
}

/// Saves to an already connected stream (one end of a socket pair, an
/// accepted connection), then shuts its writing side down.
pub fn save_to_stream(registry: &mut Registry, stream: &mut UnixStream) -> Result<Summary, VmStateError> {
    let summary = registry.save(&mut *stream)?;
    stream.flush().map_err(|source| VmStateError::Io {
        offset: summary.total_bytes,
        source,
    })?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|source| VmStateError::Io {
            offset: summary.total_bytes,
            source,
        })?;
    Ok(summary)
}

/// Connects to the receiver listening at `path` and saves to it.
pub fn save_to_unix_socket(registry: &mut Registry, path: impl AsRef<Path>) -> Result<Summary, VmStateError> {
    let path = path.as_ref();
    let mut stream = UnixStream::connect(path).map_err(transport("connecting to", path))?;
    save_to_stream(registry, &mut stream)
}

/// Loads from a connected stream.
pub fn load_from_stream(registry: &mut Registry, stream: &UnixStream) -> Result<Summary, VmStateError> {
    registry.load(BufReader::with_capacity(LOAD_BUFFER, stream))
}

/// Accepts one sender on `listener` and loads what it sends.
pub fn load_from_unix_listener(registry: &mut Registry, listener: &UnixListener) -> Result<Summary, VmStateError> {
    let (stream, _) = listener
        .accept()
        .map_err(|source| VmStateError::Io { offset: 0, source })?;
    load_from_stream(registry, &stream)
}
