//! Errors of saving and loading. Every stream error names the section (if
//! any) and the stream offset (in hex) where it was found.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Identifies a section in a stream and in a [`Registry`](crate::Registry):
/// its name and instance number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SectionId {
    /// The section's name, such as `"virtio-mem"`.
    pub name: String,
    /// Which instance of it (several devices of one kind).
    pub instance: u32,
}

impl SectionId {
    /// The id of `name` instance `instance`.
    pub fn new(name: &str, instance: u32) -> Self {
        Self {
            name: name.to_string(),
            instance,
        }
    }
}

impl fmt::Display for SectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' instance {}", self.name, self.instance)
    }
}

/// What a [`Section`](crate::Section) reports when it cannot save or load.
#[derive(Debug, thiserror::Error)]
pub enum SectionError {
    /// The section needs another one restored first, and it is not (an
    /// order mistake in the stream, DESIGN.md rule 4).
    #[error("section {section} needs section {needs} restored first ({reason})")]
    MissingPredecessor {
        /// The section being loaded.
        section: SectionId,
        /// The section it needs.
        needs: SectionId,
        /// Why it needs it.
        reason: String,
    },
    /// The payload does not decode.
    #[error("the payload does not decode: {0}")]
    Decode(#[from] postcard::Error),
    /// The payload decodes but describes something this machine cannot be.
    #[error("{0}")]
    Invalid(String),
    /// The device refused the state.
    #[error("{0}")]
    Device(Box<dyn std::error::Error + Send + Sync>),
    /// Reading or writing the payload failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl SectionError {
    /// A device error carrying `e`.
    pub fn device(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Device(Box::new(e))
    }
}

/// Errors of [`Registry::save`](crate::Registry::save) and
/// [`Registry::load`](crate::Registry::load).
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// Reading or writing the stream failed.
    #[error("I/O error at stream offset {offset:#x}: {source}")]
    Io {
        /// Where.
        offset: u64,
        /// The error.
        source: io::Error,
    },
    /// Opening or connecting a transport failed.
    #[error("{what} {path:?}: {source}")]
    Transport {
        /// What was attempted.
        what: &'static str,
        /// The file or socket.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The stream ended early.
    #[error("stream truncated at offset {offset:#x} while reading {what}")]
    Truncated {
        /// Bytes read before the end.
        offset: u64,
        /// What was being read.
        what: String,
    },
    /// The stream does not start with the magic.
    #[error("not a memvisor migration stream: magic {found:02x?} at offset 0x0")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// A stream format this build cannot read.
    #[error("stream format version {found} at offset 0x8 is not supported (this build reads version {known})")]
    FormatVersion {
        /// The stream's version.
        found: u32,
        /// The one this build reads.
        known: u32,
    },
    /// A record tag that is neither a section nor the end marker.
    #[error("unknown record tag {tag:#04x} at offset {offset:#x}")]
    BadTag {
        /// The tag.
        tag: u8,
        /// Where.
        offset: u64,
    },
    /// A section header that is malformed (bad name) or fails its checksum.
    #[error("corrupt section header at offset {offset:#x}: {reason}")]
    BadHeader {
        /// Where the header starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A payload that fails its checksum.
    #[error(
        "section {section} at offset {offset:#x}: payload checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    PayloadChecksum {
        /// The section.
        section: SectionId,
        /// Where its header starts.
        offset: u64,
        /// The checksum in the stream.
        stored: u32,
        /// The checksum of the bytes read.
        computed: u32,
    },
    /// A section no registered section matches.
    #[error("unknown section {section} at offset {offset:#x}")]
    UnknownSection {
        /// The section.
        section: SectionId,
        /// Where its header starts.
        offset: u64,
    },
    /// A section that appears twice.
    #[error("duplicate section {section} at offset {offset:#x}")]
    DuplicateSection {
        /// The section.
        section: SectionId,
        /// Where the second copy starts.
        offset: u64,
    },
    /// A section version newer than the registered section knows.
    #[error("section {section} at offset {offset:#x} has version {version}, newer than this build knows ({known})")]
    NewerVersion {
        /// The section.
        section: SectionId,
        /// Where its header starts.
        offset: u64,
        /// The stream's version.
        version: u16,
        /// The newest version the section loads.
        known: u16,
    },
    /// A section version older than the registered section still loads.
    #[error(
        "section {section} at offset {offset:#x} has version {version}, older than the oldest this build loads ({oldest})"
    )]
    OlderVersion {
        /// The section.
        section: SectionId,
        /// Where its header starts.
        offset: u64,
        /// The stream's version.
        version: u16,
        /// The oldest version the section loads.
        oldest: u16,
    },
    /// A payload length above what the section can ever need.
    #[error("section {section} at offset {offset:#x}: payload of {len:#x} bytes exceeds its limit of {max:#x}")]
    PayloadTooLarge {
        /// The section.
        section: SectionId,
        /// Where its header starts.
        offset: u64,
        /// The length in the header.
        len: u64,
        /// The section's limit.
        max: u64,
    },
    /// A section's load did not consume its whole payload.
    #[error("section {section} at offset {offset:#x} left {left:#x} bytes of its payload unread")]
    TrailingPayload {
        /// The section.
        section: SectionId,
        /// Where its header starts.
        offset: u64,
        /// Bytes left.
        left: u64,
    },
    /// A required section is absent.
    #[error("required section {section} is missing from the stream (end marker at offset {offset:#x})")]
    MissingSection {
        /// The section.
        section: SectionId,
        /// Where the end marker starts.
        offset: u64,
    },
    /// The end marker counts another number of sections than were read.
    #[error("end marker at offset {offset:#x} counts {counted} sections, but the stream held {found}")]
    SectionCount {
        /// Where the end marker starts.
        offset: u64,
        /// Its count.
        counted: u32,
        /// Sections read.
        found: u32,
    },
    /// The end marker fails its checksum.
    #[error("end marker at offset {offset:#x} fails its checksum (stored {stored:#010x}, computed {computed:#010x})")]
    EndChecksum {
        /// Where it starts.
        offset: u64,
        /// The checksum in the stream.
        stored: u32,
        /// The checksum computed.
        computed: u32,
    },
    /// A section refused its payload.
    #[error("loading section {section} at offset {offset:#x}: {source}")]
    Load {
        /// The section.
        section: SectionId,
        /// Where its header starts.
        offset: u64,
        /// Why.
        source: Box<SectionError>,
    },
    /// A section failed after every section was loaded.
    #[error("post-load of section {section}: {source}")]
    PostLoad {
        /// The section.
        section: SectionId,
        /// Why.
        source: Box<SectionError>,
    },
    /// A section failed to save.
    #[error("saving section {section} at offset {offset:#x}: {source}")]
    Save {
        /// The section.
        section: SectionId,
        /// Where its header starts.
        offset: u64,
        /// Why.
        source: Box<SectionError>,
    },
    /// A streamed section wrote another number of bytes than it announced.
    #[error("section {section} announced {announced:#x} payload bytes but wrote {written:#x}")]
    SaveLength {
        /// The section.
        section: SectionId,
        /// Bytes announced in the header.
        announced: u64,
        /// Bytes written.
        written: u64,
    },
    /// Two sections registered with the same name and instance, or a name
    /// that does not fit the format.
    #[error("cannot register section {section}: {reason}")]
    Registration {
        /// The section.
        section: SectionId,
        /// Why.
        reason: &'static str,
    },
}
