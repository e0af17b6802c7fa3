//! The [`Registry`]: every section of a machine, saved and loaded in the
//! declared order.

use std::fmt;
use std::io::{BufWriter, Read, Write};

use memvisor_memory::map::GuestMemoryMap;

use crate::context::LoadContext;
use crate::error::{SectionError, SectionId, VmStateError};
use crate::format::{self, Record, SectionHeader, StreamReader, StreamWriter};
use crate::section::{Phase, Priority, Section};

/// Output buffer of [`Registry::save`]: small writes (headers, RAM record
/// headers) are gathered, large ones (RAM page runs) pass straight through.
const SAVE_BUFFER: usize = 64 << 10;

/// One section of a saved or loaded stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionSummary {
    /// Name and instance.
    pub id: SectionId,
    /// Payload version.
    pub version: u16,
    /// Stream offset of its header.
    pub offset: u64,
    /// Payload bytes.
    pub payload_len: u64,
    /// Bytes in the stream, header and checksum included.
    pub stream_len: u64,
}

/// What a save or load did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// The sections, in stream order.
    pub sections: Vec<SectionSummary>,
    /// Bytes of the whole stream.
    pub total_bytes: u64,
}

impl Summary {
    /// The sections named `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a SectionSummary> + 'a {
        self.sections.iter().filter(move |s| s.id.name == name)
    }
}

fn summary_of(header: &SectionHeader) -> SectionSummary {
    SectionSummary {
        id: header.id.clone(),
        version: header.version,
        offset: header.offset,
        payload_len: header.len,
        stream_len: header.end_offset() - header.offset,
    }
}

/// The sections of one machine. See the [crate documentation](crate).
#[derive(Default)]
pub struct Registry {
    sections: Vec<Box<dyn Section>>,
    memory: Option<GuestMemoryMap>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("order", &self.order()).finish()
    }
}

impl Registry {
    /// An empty registry without a memory map.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry for a machine with `memory`: the
    /// [`LoadContext`] answers region questions from it.
    pub fn with_memory(memory: GuestMemoryMap) -> Self {
        Self {
            sections: Vec::new(),
            memory: Some(memory),
        }
    }

    /// Adds a section. Fails if its name does not fit the format or its
    /// name and instance are registered already.
    pub fn register(&mut self, section: impl Section + 'static) -> Result<&mut Self, VmStateError> {
        self.register_boxed(Box::new(section))
    }

    /// [`register`](Self::register) for a boxed section.
    pub fn register_boxed(&mut self, section: Box<dyn Section>) -> Result<&mut Self, VmStateError> {
        let id = section.id();
        if let Err(reason) = format::check_name(&id.name) {
            return Err(VmStateError::Registration { section: id, reason });
        }
        if self.sections.iter().any(|s| s.id() == id) {
            return Err(VmStateError::Registration {
                section: id,
                reason: "a section with this name and instance is registered already",
            });
        }
        self.sections.push(section);
        Ok(self)
    }

    /// Number of registered sections.
    pub fn len(&self) -> usize {
        self.sections.len()
    }

    /// True if nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }

    /// Indices of the sections in the declared order: setup, RAM, device
    /// phase; inside a phase by priority, highest first; ties in
    /// registration order.
    fn order_indices(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.sections.len()).collect();
        order.sort_by_key(|&i| {
            let s = &self.sections[i];
            (s.phase(), std::cmp::Reverse(s.priority()), i)
        });
        order
    }

    /// The declared order: `(id, phase, priority)` per section, as they
    /// are saved.
    pub fn order(&self) -> Vec<(SectionId, Phase, Priority)> {
        self.order_indices()
            .into_iter()
            .map(|i| {
                let s = &self.sections[i];
                (s.id(), s.phase(), s.priority())
            })
            .collect()
    }

    /// Saves every section to `out`, in the declared order. `out` may be
    /// unbuffered: small writes are buffered here and flushed at the end.
    pub fn save<W: Write>(&mut self, out: W) -> Result<Summary, VmStateError> {
        let mut prepared = 0;
        let mut result = Ok(Summary::default());
        for s in self.sections.iter_mut() {
            if let Err(source) = s.pre_save() {
                result = Err(VmStateError::Save {
                    section: s.id(),
                    offset: 0,
                    source: Box::new(source),
                });
                break;
            }
            prepared += 1;
        }
        if result.is_ok() {
            result = self.save_sections(out);
        }
        let ok = result.is_ok();
        for s in self.sections.iter_mut().take(prepared) {
            s.post_save(ok);
        }
        result
    }

    fn save_sections<W: Write>(&mut self, out: W) -> Result<Summary, VmStateError> {
        let io = |offset: u64| move |source| VmStateError::Io { offset, source };
        let mut writer = StreamWriter::new(BufWriter::with_capacity(SAVE_BUFFER, out)).map_err(io(0))?;
        let mut summary = Summary::default();
        for i in self.order_indices() {
            let section = &mut self.sections[i];
            let id = section.id();
            let offset = writer.offset();
            let save_err = |source| VmStateError::Save {
                section: id.clone(),
                offset,
                source: Box::new(source),
            };
            let start = std::time::Instant::now();
            let header = if section.streaming() {
                let len = section.save_len().map_err(save_err)?;
                let mut w = writer
                    .begin_section(&id.name, id.instance, section.version(), len)
                    .map_err(io(offset))?;
                section.save(&mut w).map_err(save_err)?;
                if w.written() != len {
                    return Err(VmStateError::SaveLength {
                        section: id.clone(),
                        announced: len,
                        written: w.written(),
                    });
                }
                w.finish().map_err(io(offset))?
            } else {
                let mut payload = Vec::new();
                section.save(&mut payload).map_err(save_err)?;
                writer
                    .section(&id.name, id.instance, section.version(), &payload)
                    .map_err(io(offset))?
            };
            log::debug!("section {id}: {} bytes saved in {:?}", header.len, start.elapsed());
            summary.sections.push(summary_of(&header));
        }
        let end = writer.offset();
        writer.finish().map_err(io(end))?;
        summary.total_bytes = end + format::END_LEN;
        Ok(summary)
    }

    /// Loads a stream from `input` into the registered sections.
    ///
    /// Sections are loaded in stream order; each checks that its
    /// predecessors were restored. The stream is refused — with an error
    /// naming the section and offset — if it is truncated, fails a
    /// checksum, holds an unknown or duplicate section or one of a version
    /// this build does not load, lacks a required section, or if a section
    /// refuses its payload. Then every section that had started loading is
    /// told to [`abort_load`](Section::abort_load), so nothing stays pinned.
    ///
    /// Reads nothing past the end marker. `input` should be buffered (the
    /// [`transport`](crate::transport) helpers are).
    pub fn load<R: Read>(&mut self, input: R) -> Result<Summary, VmStateError> {
        let restorers = self
            .sections
            .iter()
            .flat_map(|s| {
                let id = s.id();
                s.restores().into_iter().map(move |r| (r, id.clone()))
            })
            .collect();
        let mut ctx = LoadContext::new(self.memory.clone(), restorers);
        for s in self.sections.iter_mut() {
            s.pre_load();
        }
        let mut started = Vec::new();
        let result = self.load_sections(input, &mut ctx, &mut started);
        if result.is_err() {
            for &i in started.iter().rev() {
                self.sections[i].abort_load();
            }
        }
        result
    }

    fn load_sections<R: Read>(
        &mut self,
        input: R,
        ctx: &mut LoadContext,
        started: &mut Vec<usize>,
    ) -> Result<Summary, VmStateError> {
        let mut reader = StreamReader::new(input)?;
        let mut summary = Summary::default();
        loop {
            let header = match reader.next_record()? {
                Record::Section(header) => header,
                Record::End { count, offset } => {
                    if count as usize != started.len() {
                        return Err(VmStateError::SectionCount {
                            offset,
                            counted: count,
                            found: started.len() as u32,
                        });
                    }
                    summary.total_bytes = offset + format::END_LEN;
                    if let Some(missing) = self.sections.iter().find(|s| s.required() && !ctx.is_loaded(&s.id())) {
                        return Err(VmStateError::MissingSection {
                            section: missing.id(),
                            offset,
                        });
                    }
                    break;
                }
            };
            let id = header.id.clone();
            let offset = header.offset;
            let Some(index) = self.sections.iter().position(|s| s.id() == id) else {
                return Err(VmStateError::UnknownSection { section: id, offset });
            };
            if ctx.is_loaded(&id) || started.contains(&index) {
                return Err(VmStateError::DuplicateSection { section: id, offset });
            }
            let section = &mut self.sections[index];
            if header.version > section.version() {
                return Err(VmStateError::NewerVersion {
                    section: id,
                    offset,
                    version: header.version,
                    known: section.version(),
                });
            }
            if header.version < section.min_version() {
                return Err(VmStateError::OlderVersion {
                    section: id,
                    offset,
                    version: header.version,
                    oldest: section.min_version(),
                });
            }
            if header.len > section.max_payload() {
                return Err(VmStateError::PayloadTooLarge {
                    section: id,
                    offset,
                    len: header.len,
                    max: section.max_payload(),
                });
            }
            started.push(index);
            let load_err = |source| VmStateError::Load {
                section: id.clone(),
                offset,
                source: Box::new(source),
            };
            let mut payload = reader.payload(&header);
            let start = std::time::Instant::now();
            if section.streaming() {
                if let Err(e) = section.load(ctx, header.version, &mut payload) {
                    return Err(match e {
                        SectionError::Io(io) if payload.left() > 0 => payload.map_error(io),
                        other => load_err(other),
                    });
                }
                payload.finish()?;
            } else {
                let bytes = payload.read_all()?;
                payload.finish()?;
                let mut rest = &bytes[..];
                section.load(ctx, header.version, &mut rest).map_err(load_err)?;
                if !rest.is_empty() {
                    return Err(VmStateError::TrailingPayload {
                        section: id,
                        offset,
                        left: rest.len() as u64,
                    });
                }
            }
            log::debug!("section {id}: {} bytes loaded in {:?}", header.len, start.elapsed());
            ctx.mark_loaded(header.id.clone());
            summary.sections.push(summary_of(&header));
        }
        for i in self.order_indices() {
            let section = &mut self.sections[i];
            if !ctx.is_loaded(&section.id()) {
                continue;
            }
            let start = std::time::Instant::now();
            section.post_load(ctx).map_err(|source| VmStateError::PostLoad {
                section: section.id(),
                source: Box::new(source),
            })?;
            log::debug!("section {}: post-load in {:?}", section.id(), start.elapsed());
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A section holding a string, logging what happens to it.
    struct Note {
        name: &'static str,
        phase: Phase,
        priority: Priority,
        value: String,
        needs: Option<SectionId>,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Note {
        fn new(name: &'static str, phase: Phase, priority: i32, log: &Arc<Mutex<Vec<String>>>) -> Self {
            Self {
                name,
                phase,
                priority: Priority(priority),
                value: format!("{name}-value"),
                needs: None,
                log: log.clone(),
            }
        }
    }

    impl Section for Note {
        fn name(&self) -> &str {
            self.name
        }
        fn version(&self) -> u16 {
            2
        }
        fn priority(&self) -> Priority {
            self.priority
        }
        fn phase(&self) -> Phase {
            self.phase
        }
        fn save(&mut self, out: &mut dyn Write) -> Result<(), SectionError> {
            self.log.lock().unwrap().push(format!("save {}", self.name));
            out.write_all(&postcard::to_allocvec(&self.value)?)?;
            Ok(())
        }
        fn load(&mut self, ctx: &LoadContext, _version: u16, payload: &mut dyn Read) -> Result<(), SectionError> {
            if let Some(needs) = &self.needs {
                ctx.require(&self.id(), needs, "test")?;
            }
            let mut bytes = Vec::new();
            payload.read_to_end(&mut bytes)?;
            self.value = postcard::from_bytes(&bytes)?;
            self.log.lock().unwrap().push(format!("load {}", self.name));
            Ok(())
        }
        fn post_load(&mut self, _ctx: &LoadContext) -> Result<(), SectionError> {
            self.log.lock().unwrap().push(format!("post {}", self.name));
            Ok(())
        }
        fn abort_load(&mut self) {
            self.log.lock().unwrap().push(format!("abort {}", self.name));
        }
    }

    fn registry(log: &Arc<Mutex<Vec<String>>>) -> Registry {
        let mut r = Registry::new();
        r.register(Note::new("dev-low", Phase::Device, 100, log)).unwrap();
        r.register(Note::new("dev-high", Phase::Device, 200, log)).unwrap();
        r.register(Note::new("setup", Phase::Setup, 0, log)).unwrap();
        r.register(Note::new("dev-low-2", Phase::Device, 100, log)).unwrap();
        r
    }

    #[test]
    fn save_and_load_follow_the_declared_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut src = registry(&log);
        let mut bytes = Vec::new();
        let summary = src.save(&mut bytes).unwrap();
        assert_eq!(summary.total_bytes, bytes.len() as u64);
        let names: Vec<&str> = summary.sections.iter().map(|s| s.id.name.as_str()).collect();
        assert_eq!(names, ["setup", "dev-high", "dev-low", "dev-low-2"]);
        log.lock().unwrap().clear();
        let mut dst = registry(&log);
        dst.load(&bytes[..]).unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "load setup",
                "load dev-high",
                "load dev-low",
                "load dev-low-2",
                "post setup",
                "post dev-high",
                "post dev-low",
                "post dev-low-2"
            ]
        );
    }

    #[test]
    fn duplicate_unknown_missing_and_versions_are_refused() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut src = registry(&log);
        let mut bytes = Vec::new();
        src.save(&mut bytes).unwrap();
        let raw = format::read_raw(&bytes[..], 1 << 20).unwrap();
        let write = |sections: Vec<format::RawSection>| {
            let mut out = Vec::new();
            format::write_raw(&mut out, &sections).unwrap();
            out
        };
        let load = |bytes: &[u8]| registry(&log).load(bytes).unwrap_err();

        let mut dup = raw.sections.clone();
        dup.insert(1, raw.sections[0].clone());
        assert!(matches!(load(&write(dup)), VmStateError::DuplicateSection { .. }));

        let mut unknown = raw.sections.clone();
        unknown[2].header.id.name = "mystery".into();
        let err = load(&write(unknown));
        assert!(
            err.to_string().contains("unknown section 'mystery' instance 0"),
            "{err}"
        );

        let missing: Vec<_> = raw.sections[1..].to_vec();
        let err = load(&write(missing));
        assert!(
            matches!(err, VmStateError::MissingSection { ref section, .. } if section.name == "setup"),
            "{err}"
        );

        let mut newer = raw.sections.clone();
        newer[0].header.version = 3;
        let err = load(&write(newer));
        assert!(
            matches!(
                err,
                VmStateError::NewerVersion {
                    version: 3,
                    known: 2,
                    ..
                }
            ),
            "{err}"
        );
        let mut older = raw.sections.clone();
        older[0].header.version = 1;
        assert!(matches!(load(&write(older)), VmStateError::OlderVersion { .. }));
    }

    #[test]
    fn a_missing_predecessor_aborts_what_started() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut src = registry(&log);
        let mut bytes = Vec::new();
        src.save(&mut bytes).unwrap();
        let raw = format::read_raw(&bytes[..], 1 << 20).unwrap();
        let mut swapped = raw.sections.clone();
        swapped.swap(1, 2); // dev-low before dev-high
        let mut out = Vec::new();
        format::write_raw(&mut out, &swapped).unwrap();
        log.lock().unwrap().clear();
        let mut dst = Registry::new();
        dst.register(Note::new("setup", Phase::Setup, 0, &log)).unwrap();
        dst.register(Note::new("dev-high", Phase::Device, 200, &log)).unwrap();
        let mut low = Note::new("dev-low", Phase::Device, 100, &log);
        low.needs = Some(SectionId::new("dev-high", 0));
        dst.register(low).unwrap();
        dst.register(Note::new("dev-low-2", Phase::Device, 100, &log)).unwrap();
        let err = dst.load(&out[..]).unwrap_err();
        assert!(
            err.to_string()
                .contains("section 'dev-low' instance 0 needs section 'dev-high' instance 0 restored first"),
            "{err}"
        );
        assert_eq!(*log.lock().unwrap(), ["load setup", "abort dev-low", "abort setup"]);
    }

    #[test]
    fn registration_is_checked() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut r = registry(&log);
        assert!(r.register(Note::new("setup", Phase::Setup, 0, &log)).is_err());
        assert!(r.register(Note::new("with space", Phase::Setup, 0, &log)).is_err());
        assert_eq!(r.len(), 4);
    }
}
