//! The lab's error type.

use std::io;

/// What can go wrong in the lab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The scenario file (or its guest script) is malformed; the message names the line.
    #[error("scenario {origin}: {message}")]
    Scenario {
        /// The file (or `<string>`) the scenario came from.
        origin: String,
        /// What is wrong, with the line where toml could tell.
        message: String,
    },
    /// Fetching or unpacking Debian packages failed.
    #[error("setup: {0}")]
    Setup(String),
    /// Building an image failed.
    #[error("image: {0}")]
    Image(String),
    /// A stage of a run failed or timed out.
    #[error("stage `{stage}` failed: {message}")]
    Stage {
        /// The stage's name (`l1-boot`, `l2-boot`, `scenario`, ...).
        stage: String,
        /// What went wrong.
        message: String,
    },
    /// The VMM's control interface answered with an error.
    #[error("vmm: {0}")]
    Vmm(String),
    /// The chosen VMM cannot run the scenario (found before anything boots).
    #[error("scenario `{scenario}` cannot run under {vmm}: {missing}")]
    Unsupported {
        /// The scenario's name.
        scenario: String,
        /// The VMM (`memvisor`).
        vmm: String,
        /// What the VMM lacks.
        missing: String,
    },
    /// The scenario cannot run in the chosen mode on this host (found before anything boots).
    #[error("scenario `{scenario}` cannot run in {mode} mode here: {missing}")]
    NotHere {
        /// The scenario's name.
        scenario: String,
        /// The mode (`direct`).
        mode: String,
        /// What this host lacks.
        missing: String,
    },
    /// An I/O error with what the lab was doing.
    #[error("{context}: {source}")]
    Io {
        /// What the lab was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// The lab's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a description to I/O errors.
pub(crate) trait IoContext<T> {
    /// Wraps an I/O error into [`Error::Io`] with `context`.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
