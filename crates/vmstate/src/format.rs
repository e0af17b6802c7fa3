//! The stream format (`FORMAT.md` beside this crate): a header, sections
//! with checksummed headers and payloads, an end marker.
//!
//! [`StreamWriter`] and [`StreamReader`] are the low level; the
//! [`Registry`](crate::Registry) drives them. [`read_raw`] and
//! [`write_raw`] copy whole streams section by section, for tools and for
//! tests that need to build a stream the registry would never write (a
//! reordered or corrupted one).

use std::io::{self, Read, Write};

use crate::error::{SectionId, VmStateError};

/// The first 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"MVSTATE\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the stream header: magic and format version.
pub const STREAM_HEADER_LEN: u64 = 12;
/// Tag of a section record.
pub const TAG_SECTION: u8 = b'S';
/// Tag of the end marker.
pub const TAG_END: u8 = b'E';
/// Longest section name.
pub const MAX_NAME_LEN: usize = 64;
/// Bytes of the end marker: tag, count, checksum.
pub const END_LEN: u64 = 9;
/// Bytes that follow each payload: its checksum.
pub const PAYLOAD_TRAILER_LEN: u64 = 4;

/// Bytes of a section header whose name is `name_len` bytes long.
pub const fn section_header_len(name_len: usize) -> u64 {
    // tag, name length, name, instance, version, payload length, checksum
    (1 + 1 + name_len + 4 + 2 + 8 + 4) as u64
}

/// CRC-32C of `data`, continuing from `crc`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// Bytes checksummed at a time when a payload passes through
/// [`SectionWriter`]: large enough for few system calls, small enough that
/// the bytes are still in cache when they are written.
const CRC_CHUNK: usize = 256 << 10;

/// The header of one section, as read from or written to a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionHeader {
    /// Name and instance.
    pub id: SectionId,
    /// Version of the payload layout.
    pub version: u16,
    /// Payload bytes.
    pub len: u64,
    /// Stream offset of the header's first byte.
    pub offset: u64,
}

impl SectionHeader {
    /// Stream offset of the payload's first byte.
    pub fn payload_offset(&self) -> u64 {
        self.offset + section_header_len(self.id.name.len())
    }

    /// Stream offset one past the section's last byte (after its checksum).
    pub fn end_offset(&self) -> u64 {
        self.payload_offset() + self.len + PAYLOAD_TRAILER_LEN
    }

    fn encode(&self) -> Vec<u8> {
        let name = self.id.name.as_bytes();
        let mut h = Vec::with_capacity(section_header_len(name.len()) as usize);
        h.push(TAG_SECTION);
        h.push(name.len() as u8);
        h.extend_from_slice(name);
        h.extend_from_slice(&self.id.instance.to_le_bytes());
        h.extend_from_slice(&self.version.to_le_bytes());
        h.extend_from_slice(&self.len.to_le_bytes());
        let crc = crc32c::crc32c(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        h
    }
}

/// Checks that `name` can be written as a section name.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err("the name must be 1 to 64 bytes long");
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the name must be printable ASCII without spaces");
    }
    Ok(())
}

/// Writes a stream: [`StreamWriter::new`] writes the header, then sections,
/// then [`StreamWriter::finish`] the end marker.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    out: W,
    offset: u64,
    count: u32,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the stream header to `out`.
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(&MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())?;
        Ok(Self {
            out,
            offset: STREAM_HEADER_LEN,
            count: 0,
        })
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Sections written so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Writes a whole section. Panics if `name` fails [`check_name`].
    pub fn section(&mut self, name: &str, instance: u32, version: u16, payload: &[u8]) -> io::Result<SectionHeader> {
        let mut w = self.begin_section(name, instance, version, payload.len() as u64)?;
        w.write_all(payload)?;
        w.finish()
    }

    /// Writes a section header announcing `len` payload bytes and returns a
    /// writer for exactly that many; [`SectionWriter::finish`] appends the
    /// checksum. Panics if `name` fails [`check_name`].
    pub fn begin_section(
        &mut self,
        name: &str,
        instance: u32,
        version: u16,
        len: u64,
    ) -> io::Result<SectionWriter<'_, W>> {
        if let Err(reason) = check_name(name) {
            panic!("section name {name:?}: {reason}");
        }
        let header = SectionHeader {
            id: SectionId::new(name, instance),
            version,
            len,
            offset: self.offset,
        };
        let bytes = header.encode();
        self.out.write_all(&bytes)?;
        self.offset += bytes.len() as u64;
        Ok(SectionWriter {
            stream: self,
            header,
            written: 0,
            crc: 0,
        })
    }

    /// Writes the end marker and flushes; returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        let mut end = [0u8; END_LEN as usize];
        end[0] = TAG_END;
        end[1..5].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32c::crc32c(&end[..5]);
        end[5..].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&end)?;
        self.offset += END_LEN;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The payload of one section being written; see
/// [`StreamWriter::begin_section`]. Writes are checksummed and passed
/// through to the stream, large ones in 256 KiB steps.
#[derive(Debug)]
pub struct SectionWriter<'a, W: Write> {
    stream: &'a mut StreamWriter<W>,
    header: SectionHeader,
    written: u64,
    crc: u32,
}

impl<W: Write> SectionWriter<'_, W> {
    /// Payload bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends the checksum. Fails (`InvalidData`) if another number of
    /// bytes than announced was written: the stream is then unusable.
    pub fn finish(self) -> io::Result<SectionHeader> {
        if self.written != self.header.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "section {} announced {:#x} payload bytes but wrote {:#x}",
                    self.header.id, self.header.len, self.written
                ),
            ));
        }
        self.stream.out.write_all(&self.crc.to_le_bytes())?;
        self.stream.offset += PAYLOAD_TRAILER_LEN;
        self.stream.count += 1;
        Ok(self.header)
    }
}

impl<W: Write> Write for SectionWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.header.len - self.written;
        if buf.len() as u64 > room {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "section {} writes past its announced {:#x} payload bytes",
                    self.header.id, self.header.len
                ),
            ));
        }
        let chunk = &buf[..buf.len().min(CRC_CHUNK)];
        self.crc = crc32c::crc32c_append(self.crc, chunk);
        self.stream.out.write_all(chunk)?;
        self.written += chunk.len() as u64;
        self.stream.offset += chunk.len() as u64;
        Ok(chunk.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.out.flush()
    }
}

/// One record of a stream, as [`StreamReader::next_record`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A section header; its payload follows and must be read with
    /// [`StreamReader::payload`] before the next record.
    Section(SectionHeader),
    /// The end marker, with the number of sections it counts.
    End {
        /// Sections counted by the writer.
        count: u32,
        /// Stream offset of the end marker.
        offset: u64,
    },
}

/// Reads a stream record by record. It never reads past the end marker
/// and never allocates more than a section header's name.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    input: R,
    offset: u64,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the stream header.
    pub fn new(input: R) -> Result<Self, VmStateError> {
        let mut this = Self { input, offset: 0 };
        let mut magic = [0u8; 8];
        this.read_exact(&mut magic, || "the stream header".into())?;
        if magic != MAGIC {
            return Err(VmStateError::BadMagic { found: magic });
        }
        let mut version = [0u8; 4];
        this.read_exact(&mut version, || "the stream header".into())?;
        let found = u32::from_le_bytes(version);
        if found != FORMAT_VERSION {
            return Err(VmStateError::FormatVersion {
                found,
                known: FORMAT_VERSION,
            });
        }
        Ok(this)
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn read_exact(&mut self, buf: &mut [u8], what: impl FnOnce() -> String) -> Result<(), VmStateError> {
        let mut done = 0;
        while done < buf.len() {
            match self.input.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(VmStateError::Truncated {
                        offset: self.offset,
                        what: what(),
                    });
                }
                Ok(n) => {
                    done += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(VmStateError::Io {
                        offset: self.offset,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads the next record's header, checking its checksum.
    pub fn next_record(&mut self) -> Result<Record, VmStateError> {
        let start = self.offset;
        let what = || format!("the record header at offset {start:#x}");
        let mut tag = [0u8; 1];
        self.read_exact(&mut tag, what)?;
        match tag[0] {
            TAG_SECTION => {}
            TAG_END => {
                let mut rest = [0u8; 8];
                self.read_exact(&mut rest, what)?;
                let mut whole = [0u8; 5];
                whole[0] = TAG_END;
                whole[1..].copy_from_slice(&rest[..4]);
                let computed = crc32c::crc32c(&whole);
                let stored = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
                if stored != computed {
                    return Err(VmStateError::EndChecksum {
                        offset: start,
                        stored,
                        computed,
                    });
                }
                let count = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
                return Ok(Record::End { count, offset: start });
            }
            tag => return Err(VmStateError::BadTag { tag, offset: start }),
        }
        let mut name_len = [0u8; 1];
        self.read_exact(&mut name_len, what)?;
        let name_len = name_len[0] as usize;
        // At most 255 + 18 bytes: bounded before reading.
        let mut rest = vec![0u8; name_len + 18];
        self.read_exact(&mut rest, what)?;
        let mut crc = crc32c::crc32c(&[TAG_SECTION, name_len as u8]);
        crc = crc32c::crc32c_append(crc, &rest[..name_len + 14]);
        let stored = u32::from_le_bytes(rest[name_len + 14..].try_into().expect("4 bytes"));
        if stored != crc {
            return Err(VmStateError::BadHeader {
                offset: start,
                reason: format!("checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"),
            });
        }
        let name = std::str::from_utf8(&rest[..name_len])
            .ok()
            .filter(|n| check_name(n).is_ok())
            .ok_or_else(|| VmStateError::BadHeader {
                offset: start,
                reason: format!("invalid section name {:?}", String::from_utf8_lossy(&rest[..name_len])),
            })?;
        let field = |at: usize, n: usize| &rest[name_len + at..name_len + at + n];
        let instance = u32::from_le_bytes(field(0, 4).try_into().expect("4 bytes"));
        let version = u16::from_le_bytes(field(4, 2).try_into().expect("2 bytes"));
        let len = u64::from_le_bytes(field(6, 8).try_into().expect("8 bytes"));
        Ok(Record::Section(SectionHeader {
            id: SectionId::new(name, instance),
            version,
            len,
            offset: start,
        }))
    }

    /// A reader of the payload of `header` (just returned by
    /// [`next_record`](Self::next_record)): it yields exactly `header.len`
    /// bytes, then end-of-file; a stream that ends earlier gives
    /// `UnexpectedEof`. Call [`PayloadReader::finish`] to check the
    /// checksum.
    pub fn payload(&mut self, header: &SectionHeader) -> PayloadReader<'_, R> {
        PayloadReader {
            stream: self,
            header: header.clone(),
            left: header.len,
            crc: 0,
        }
    }
}

/// The payload of one section; see [`StreamReader::payload`].
#[derive(Debug)]
pub struct PayloadReader<'a, R: Read> {
    stream: &'a mut StreamReader<R>,
    header: SectionHeader,
    left: u64,
    crc: u32,
}

impl<R: Read> PayloadReader<'_, R> {
    /// Payload bytes not read yet.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Stream offset of the next byte.
    pub fn offset(&self) -> u64 {
        self.stream.offset
    }

    /// Reads the whole (remaining) payload into memory. The buffer grows
    /// with the bytes that really arrive, so a corrupt length cannot make it
    /// allocate more than the stream holds.
    pub fn read_all(&mut self) -> Result<Vec<u8>, VmStateError> {
        let mut buf = Vec::with_capacity(self.left.min(1 << 20) as usize);
        let offset = self.header.offset;
        let id = self.header.id.clone();
        match self.read_to_end(&mut buf) {
            Ok(_) if self.left == 0 => Ok(buf),
            Ok(_) => Err(VmStateError::Truncated {
                offset: self.stream.offset,
                what: format!("the payload of section {id} at offset {offset:#x}"),
            }),
            Err(e) => Err(self.map_error(e)),
        }
    }

    /// Turns an error from reading this payload into a stream error: an
    /// early end into [`VmStateError::Truncated`].
    pub fn map_error(&self, e: io::Error) -> VmStateError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            VmStateError::Truncated {
                offset: self.stream.offset,
                what: format!(
                    "the payload of section {} at offset {:#x}",
                    self.header.id, self.header.offset
                ),
            }
        } else {
            VmStateError::Io {
                offset: self.stream.offset,
                source: e,
            }
        }
    }

    /// Reads the checksum after a fully read payload and compares it.
    pub fn finish(self) -> Result<(), VmStateError> {
        if self.left != 0 {
            return Err(VmStateError::TrailingPayload {
                section: self.header.id.clone(),
                offset: self.header.offset,
                left: self.left,
            });
        }
        let mut stored = [0u8; 4];
        let what = || {
            format!(
                "the checksum of section {} at offset {:#x}",
                self.header.id, self.header.offset
            )
        };
        self.stream.read_exact(&mut stored, what)?;
        let stored = u32::from_le_bytes(stored);
        if stored != self.crc {
            return Err(VmStateError::PayloadChecksum {
                section: self.header.id.clone(),
                offset: self.header.offset,
                stored,
                computed: self.crc,
            });
        }
        Ok(())
    }
}

impl<R: Read> Read for PayloadReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.stream.input.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ends inside a section payload",
            ));
        }
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.left -= n as u64;
        self.stream.offset += n as u64;
        Ok(n)
    }
}

/// One section of a stream, whole: see [`read_raw`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSection {
    /// Its header (offset as found in the stream read).
    pub header: SectionHeader,
    /// Its payload (checksum verified).
    pub payload: Vec<u8>,
}

/// A whole stream, section by section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawStream {
    /// The sections, in stream order.
    pub sections: Vec<RawSection>,
    /// Offset of the end marker.
    pub end_offset: u64,
}

/// Reads a whole stream, checking every checksum; payloads above
/// `max_payload` bytes are refused before anything is allocated for them.
pub fn read_raw(input: impl Read, max_payload: u64) -> Result<RawStream, VmStateError> {
    let mut reader = StreamReader::new(input)?;
    let mut sections = Vec::new();
    loop {
        match reader.next_record()? {
            Record::Section(header) => {
                if header.len > max_payload {
                    return Err(VmStateError::PayloadTooLarge {
                        section: header.id.clone(),
                        offset: header.offset,
                        len: header.len,
                        max: max_payload,
                    });
                }
                let mut payload = reader.payload(&header);
                let bytes = payload.read_all()?;
                payload.finish()?;
                sections.push(RawSection { header, payload: bytes });
            }
            Record::End { count, offset } => {
                if count as usize != sections.len() {
                    return Err(VmStateError::SectionCount {
                        offset,
                        counted: count,
                        found: sections.len() as u32,
                    });
                }
                return Ok(RawStream {
                    sections,
                    end_offset: offset,
                });
            }
        }
    }
}

/// Writes `sections` as a complete stream, in the order given, with fresh
/// checksums and a matching end marker.
pub fn write_raw<'a>(out: impl Write, sections: impl IntoIterator<Item = &'a RawSection>) -> io::Result<()> {
    let mut writer = StreamWriter::new(out)?;
    for s in sections {
        writer.section(&s.header.id.name, s.header.id.instance, s.header.version, &s.payload)?;
    }
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.section("alpha", 0, 1, b"hello").unwrap();
        w.section("beta", 3, 2, &[]).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_and_offsets() {
        let bytes = sample();
        let raw = read_raw(&bytes[..], 1 << 20).unwrap();
        assert_eq!(raw.sections.len(), 2);
        let a = &raw.sections[0];
        assert_eq!(a.header.id, SectionId::new("alpha", 0));
        assert_eq!(a.header.offset, STREAM_HEADER_LEN);
        assert_eq!(a.payload, b"hello");
        assert_eq!(raw.sections[1].header.offset, a.header.end_offset());
        assert_eq!(raw.end_offset, raw.sections[1].header.end_offset());
        assert_eq!(raw.end_offset + END_LEN, bytes.len() as u64);
        let mut again = Vec::new();
        write_raw(&mut again, &raw.sections).unwrap();
        assert_eq!(again, bytes);
    }

    #[test]
    fn every_single_bit_flip_is_an_error() {
        let bytes = sample();
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(read_raw(&b[..], 1 << 20).is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let err = read_raw(&bytes[..len], 1 << 20).unwrap_err();
            assert!(
                matches!(err, VmStateError::Truncated { offset, .. } if offset == len as u64),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn huge_lengths_are_refused_before_allocating() {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        // Announce 1 TiB but write nothing: a reader must not allocate it.
        let s = w.begin_section("big", 0, 1, 1 << 40).unwrap();
        drop(s);
        let bytes = w.finish().unwrap();
        let err = read_raw(&bytes[..], 1 << 20).unwrap_err();
        assert!(
            matches!(err, VmStateError::PayloadTooLarge { len, .. } if len == 1 << 40),
            "{err}"
        );
        let err = read_raw(&bytes[..], u64::MAX).unwrap_err();
        assert!(matches!(err, VmStateError::Truncated { .. }), "{err}");
    }

    #[test]
    fn errors_name_section_and_offset() {
        let mut bytes = sample();
        let n = bytes.len();
        bytes[STREAM_HEADER_LEN as usize + section_header_len(5) as usize] ^= 1; // payload of alpha
        let err = read_raw(&bytes[..], 1 << 20).unwrap_err().to_string();
        assert!(
            err.contains("'alpha' instance 0") && err.contains("offset 0xc"),
            "{err}"
        );
        let mut bad = sample();
        bad[0] = b'X';
        assert!(matches!(
            read_raw(&bad[..], 1).unwrap_err(),
            VmStateError::BadMagic { .. }
        ));
        let mut bad = sample();
        bad[8] = 2;
        let err = read_raw(&bad[..], 1 << 20).unwrap_err();
        assert!(matches!(err, VmStateError::FormatVersion { found: 2, .. }), "{err}");
        assert!(n > 0);
    }
}
