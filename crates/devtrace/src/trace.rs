//! The devtrace v1 format (`shared/traces/FORMAT.md`): a JSON Lines file
//! whose first line describes the machine and whose other lines are the
//! requests a guest driver sent, with the answers the recorded device gave.
//!
//! [`Trace::parse`] is strict where it matters — bad JSON, another format
//! or version, an unknown device type, device id or op, a missing or
//! mistyped field, a value out of range are all refused with the line
//! number — and tolerant where the format allows growth: unknown extra
//! fields are ignored, and so are blank lines.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use memvisor_virtio_iommu::{ReservedKind, ReservedRegion, Status};
use memvisor_virtio_mem::BlockState;
use serde_json::{Map, Value};

/// The `format` value of a devtrace header.
pub const FORMAT: &str = "devtrace";

/// The format version this crate reads.
pub const VERSION: u64 = 1;

/// Why a trace could not be read. Parse errors name the line (1-based).
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("cannot read trace {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A line is not what the format allows.
    #[error("{name}: line {line}: {message}")]
    Parse {
        /// The trace's name (its file name).
        name: String,
        /// The line, 1-based.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
}

impl TraceError {
    /// The line a parse error names (`None` for an I/O error).
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Io { .. } => None,
            Self::Parse { line, .. } => Some(*line),
        }
    }
}

/// A parsed devtrace.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// A name for reports: the file name, or what the caller gave.
    pub name: String,
    /// Line 1.
    pub header: Header,
    /// Every event, in order.
    pub events: Vec<Event>,
}

/// The header: the machine the trace was recorded on.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// `source`: where the recording comes from, if given.
    pub source: Option<String>,
    /// `ram`: boot RAM outside any memory device.
    pub ram: Vec<RamRange>,
    /// `devices`, in header order; [`Event::device`] indexes this.
    pub devices: Vec<Device>,
}

/// A range of boot RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
}

/// A device of the header.
#[derive(Debug, Clone, PartialEq)]
pub enum Device {
    /// `"device":"virtio-mem"`.
    Mem(MemDevice),
    /// `"device":"virtio-iommu"`.
    Iommu(IommuDevice),
}

impl Device {
    /// The device id events name it by.
    pub fn id(&self) -> &str {
        match self {
            Self::Mem(d) => &d.id,
            Self::Iommu(d) => &d.id,
        }
    }

    /// `"virtio-mem"` or `"virtio-iommu"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Mem(_) => "virtio-mem",
            Self::Iommu(_) => "virtio-iommu",
        }
    }
}

/// A virtio-mem device of the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemDevice {
    /// Device id.
    pub id: String,
    /// Guest-physical start of the region.
    pub addr: u64,
    /// Region size.
    pub region_size: u64,
    /// Block size.
    pub block_size: u64,
    /// Requested size at the start of the trace.
    pub requested_size: u64,
    /// `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` offered (default true).
    pub unplugged_inaccessible: bool,
}

/// A virtio-iommu device of the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuDevice {
    /// Device id.
    pub id: String,
    /// `page_size_mask`.
    pub page_size_mask: u64,
    /// First mappable IOVA.
    pub input_start: u64,
    /// Last mappable IOVA (inclusive).
    pub input_end: u64,
    /// First domain id.
    pub domain_start: u32,
    /// Last domain id (inclusive).
    pub domain_end: u32,
    /// `bypass` at the start.
    pub bypass: bool,
    /// The endpoints behind the IOMMU: the header's `endpoints`, or, where
    /// it is absent, every endpoint the trace's events name (ascending).
    pub endpoints: Vec<u32>,
    /// True if `endpoints` came from the header.
    pub endpoints_listed: bool,
    /// `reserved_regions` (none if absent).
    pub reserved_regions: Vec<ReservedRegion>,
}

/// A virtio-mem response type, as the format names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemResp {
    /// `ack`.
    Ack,
    /// `nack`.
    Nack,
    /// `busy`.
    Busy,
    /// `error`.
    Error,
}

impl MemResp {
    /// The name in the format.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Nack => "nack",
            Self::Busy => "busy",
            Self::Error => "error",
        }
    }

    /// From the wire value (`VIRTIO_MEM_RESP_*`).
    pub fn from_wire(value: u16) -> Option<Self> {
        use memvisor_virtio_mem::wire::*;
        Some(match value {
            VIRTIO_MEM_RESP_ACK => Self::Ack,
            VIRTIO_MEM_RESP_NACK => Self::Nack,
            VIRTIO_MEM_RESP_BUSY => Self::Busy,
            VIRTIO_MEM_RESP_ERROR => Self::Error,
            _ => return None,
        })
    }
}

impl fmt::Display for MemResp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name of a block state in the format.
pub fn state_name(state: BlockState) -> &'static str {
    match state {
        BlockState::Plugged => "plugged",
        BlockState::Unplugged => "unplugged",
        BlockState::Mixed => "mixed",
    }
}

/// One event line.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its line in the file, 1-based.
    pub line: usize,
    /// `t`, if recorded (reporting only).
    pub t: Option<f64>,
    /// Index of its device in [`Header::devices`].
    pub device: usize,
    /// What happened.
    pub op: Op,
}

/// What an event does. `resp` is the recorded answer, `None` where the
/// recording could not see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// virtio-mem: management changed the requested size.
    SetRequestedSize {
        /// New requested size.
        size: u64,
    },
    /// virtio-mem: VIRTIO_MEM_REQ_PLUG.
    Plug {
        /// First block.
        addr: u64,
        /// Blocks.
        nb_blocks: u16,
        /// Recorded answer.
        resp: Option<MemResp>,
    },
    /// virtio-mem: VIRTIO_MEM_REQ_UNPLUG.
    Unplug {
        /// First block.
        addr: u64,
        /// Blocks.
        nb_blocks: u16,
        /// Recorded answer.
        resp: Option<MemResp>,
    },
    /// virtio-mem: VIRTIO_MEM_REQ_UNPLUG_ALL.
    UnplugAll {
        /// Recorded answer.
        resp: Option<MemResp>,
    },
    /// virtio-mem: VIRTIO_MEM_REQ_STATE.
    State {
        /// First block.
        addr: u64,
        /// Blocks.
        nb_blocks: u16,
        /// Recorded answer.
        resp: Option<MemResp>,
        /// Recorded state (only with `ack`).
        state: Option<BlockState>,
    },
    /// Either device: a machine reset.
    SystemReset,
    /// virtio-mem: the device's values at this point.
    Expect {
        /// `plugged_size`.
        plugged_size: Option<u64>,
        /// `usable_region_size`.
        usable_region_size: Option<u64>,
    },
    /// virtio-iommu: VIRTIO_IOMMU_T_ATTACH.
    Attach {
        /// Domain.
        domain: u32,
        /// Endpoint.
        endpoint: u32,
        /// `ATTACH_F_*` (default 0).
        flags: u32,
        /// Recorded answer.
        resp: Option<Status>,
    },
    /// virtio-iommu: VIRTIO_IOMMU_T_DETACH.
    Detach {
        /// Domain.
        domain: u32,
        /// Endpoint.
        endpoint: u32,
        /// Recorded answer.
        resp: Option<Status>,
    },
    /// virtio-iommu: VIRTIO_IOMMU_T_MAP.
    Map {
        /// Domain.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
        /// Guest-physical address of `virt_start`.
        phys_start: u64,
        /// `MAP_F_*`.
        flags: u32,
        /// Recorded answer.
        resp: Option<Status>,
    },
    /// virtio-iommu: VIRTIO_IOMMU_T_UNMAP.
    Unmap {
        /// Domain.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
        /// Recorded answer.
        resp: Option<Status>,
    },
    /// virtio-iommu: VIRTIO_IOMMU_T_PROBE.
    Probe {
        /// Endpoint.
        endpoint: u32,
        /// Recorded answer.
        resp: Option<Status>,
    },
}

impl Op {
    /// True for the ops sent to a device through its queue.
    pub fn is_request(&self) -> bool {
        !matches!(
            self,
            Self::SetRequestedSize { .. } | Self::SystemReset | Self::Expect { .. }
        )
    }
}

impl fmt::Display for Op {
    /// The request as a reader of a mismatch wants it: `PLUG 0x100000000 x64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::SetRequestedSize { size } => write!(f, "set_requested_size {size:#x}"),
            Self::Plug { addr, nb_blocks, .. } => write!(f, "PLUG {addr:#x} x{nb_blocks}"),
            Self::Unplug { addr, nb_blocks, .. } => write!(f, "UNPLUG {addr:#x} x{nb_blocks}"),
            Self::UnplugAll { .. } => write!(f, "UNPLUG_ALL"),
            Self::State { addr, nb_blocks, .. } => write!(f, "STATE {addr:#x} x{nb_blocks}"),
            Self::SystemReset => write!(f, "system_reset"),
            Self::Expect { .. } => write!(f, "expect"),
            Self::Attach {
                domain,
                endpoint,
                flags,
                ..
            } => write!(f, "ATTACH endpoint {endpoint} to domain {domain} (flags {flags:#x})"),
            Self::Detach { domain, endpoint, .. } => write!(f, "DETACH endpoint {endpoint} from domain {domain}"),
            Self::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
                ..
            } => write!(
                f,
                "MAP domain {domain} [{virt_start:#x}, {virt_end:#x}] -> {phys_start:#x} (flags {flags:#x})"
            ),
            Self::Unmap {
                domain,
                virt_start,
                virt_end,
                ..
            } => write!(f, "UNMAP domain {domain} [{virt_start:#x}, {virt_end:#x}]"),
            Self::Probe { endpoint, .. } => write!(f, "PROBE endpoint {endpoint}"),
        }
    }
}

/// The fields of one JSON object, read strictly, with the line for errors.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    what: &'a str,
}

type Res<T> = Result<T, String>;

impl<'a> Fields<'a> {
    fn of(value: &'a Value, what: &'a str) -> Res<Self> {
        value
            .as_object()
            .map(|obj| Self { obj, what })
            .ok_or_else(|| format!("{what} is not a JSON object"))
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name)
    }

    fn missing(&self, name: &str) -> String {
        format!("missing field `{name}` in {}", self.what)
    }

    fn opt_u64(&self, name: &str) -> Res<Option<u64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("field `{name}` of {} must be an unsigned integer, got {v}", self.what)),
        }
    }

    fn u64(&self, name: &str) -> Res<u64> {
        self.opt_u64(name)?.ok_or_else(|| self.missing(name))
    }

    fn u32(&self, name: &str) -> Res<u32> {
        let v = self.u64(name)?;
        u32::try_from(v).map_err(|_| format!("field `{name}` of {} is {v}, above the 32-bit maximum", self.what))
    }

    fn opt_u32(&self, name: &str) -> Res<Option<u32>> {
        match self.get(name) {
            None => Ok(None),
            Some(_) => self.u32(name).map(Some),
        }
    }

    fn u16(&self, name: &str) -> Res<u16> {
        let v = self.u64(name)?;
        u16::try_from(v).map_err(|_| format!("field `{name}` of {} is {v}, above 65535", self.what))
    }

    fn opt_bool(&self, name: &str) -> Res<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| format!("field `{name}` of {} must be true or false, got {v}", self.what)),
        }
    }

    fn opt_str(&self, name: &str) -> Res<Option<&'a str>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| format!("field `{name}` of {} must be a string, got {v}", self.what)),
        }
    }

    fn str(&self, name: &str) -> Res<&'a str> {
        self.opt_str(name)?.ok_or_else(|| self.missing(name))
    }

    fn array(&self, name: &str) -> Res<Option<&'a Vec<Value>>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| format!("field `{name}` of {} must be an array, got {v}", self.what)),
        }
    }

    fn mem_resp(&self) -> Res<Option<MemResp>> {
        Ok(match self.opt_str("resp")? {
            None => None,
            Some("ack") => Some(MemResp::Ack),
            Some("nack") => Some(MemResp::Nack),
            Some("busy") => Some(MemResp::Busy),
            Some("error") => Some(MemResp::Error),
            Some(other) => {
                return Err(format!(
                    "unknown virtio-mem resp `{other}` (expected ack, nack, busy or error)"
                ));
            }
        })
    }

    fn iommu_resp(&self) -> Res<Option<Status>> {
        Ok(match self.opt_str("resp")? {
            None => None,
            Some(name) => Some(
                (0..=8u8)
                    .filter_map(Status::from_u8)
                    .find(|s| s.name() == name)
                    .ok_or_else(|| format!("unknown virtio-iommu resp `{name}`"))?,
            ),
        })
    }
}

fn parse_header(value: &Value) -> Res<Header> {
    let h = Fields::of(value, "the header")?;
    let format = h.str("format")?;
    if format != FORMAT {
        return Err(format!("not a devtrace: `format` is `{format}`, expected `{FORMAT}`"));
    }
    let version = h.u64("version")?;
    if version != VERSION {
        return Err(format!(
            "unknown devtrace version {version} (this replayer reads version {VERSION})"
        ));
    }
    let source = h.opt_str("source")?.map(str::to_string);
    let mut ram = Vec::new();
    for (i, r) in h.array("ram")?.into_iter().flatten().enumerate() {
        let what = format!("ram[{i}]");
        let f = Fields::of(r, &what)?;
        ram.push(RamRange {
            addr: f.u64("addr")?,
            size: f.u64("size")?,
        });
    }
    let devices_value = h.array("devices")?.ok_or_else(|| h.missing("devices"))?;
    let mut devices: Vec<Device> = Vec::new();
    for (i, d) in devices_value.iter().enumerate() {
        let what = format!("devices[{i}]");
        let f = Fields::of(d, &what)?;
        let device = match f.str("device")? {
            "virtio-mem" => Device::Mem(MemDevice {
                id: f.str("id")?.to_string(),
                addr: f.u64("addr")?,
                region_size: f.u64("region_size")?,
                block_size: f.u64("block_size")?,
                requested_size: f.u64("requested_size")?,
                unplugged_inaccessible: f.opt_bool("unplugged_inaccessible")?.unwrap_or(true),
            }),
            "virtio-iommu" => {
                let endpoints = f
                    .array("endpoints")?
                    .map(|list| {
                        list.iter()
                            .map(|e| {
                                e.as_u64().and_then(|e| u32::try_from(e).ok()).ok_or_else(|| {
                                    format!("`endpoints` of {what} must hold 32-bit unsigned integers, got {e}")
                                })
                            })
                            .collect::<Res<Vec<u32>>>()
                    })
                    .transpose()?;
                let mut reserved_regions = Vec::new();
                for (j, r) in f.array("reserved_regions")?.into_iter().flatten().enumerate() {
                    let rwhat = format!("{what}.reserved_regions[{j}]");
                    let rf = Fields::of(r, &rwhat)?;
                    let kind = match rf.u64("subtype")? {
                        0 => ReservedKind::Reserved,
                        1 => ReservedKind::Msi,
                        other => return Err(format!("unknown subtype {other} in {rwhat} (0 reserved, 1 MSI)")),
                    };
                    reserved_regions.push(ReservedRegion {
                        start: rf.u64("start")?,
                        end: rf.u64("end")?,
                        kind,
                    });
                }
                Device::Iommu(IommuDevice {
                    id: f.str("id")?.to_string(),
                    page_size_mask: f.u64("page_size_mask")?,
                    input_start: f.u64("input_start")?,
                    input_end: f.u64("input_end")?,
                    domain_start: f.u32("domain_start")?,
                    domain_end: f.u32("domain_end")?,
                    bypass: f.opt_bool("bypass")?.ok_or_else(|| f.missing("bypass"))?,
                    endpoints_listed: endpoints.is_some(),
                    endpoints: endpoints.unwrap_or_default(),
                    reserved_regions,
                })
            }
            other => return Err(format!("unknown device type `{other}` in {what}")),
        };
        if devices.iter().any(|d| d.id() == device.id()) {
            return Err(format!("device id `{}` is used twice", device.id()));
        }
        devices.push(device);
    }
    Ok(Header { source, ram, devices })
}

fn parse_event(value: &Value, header: &Header, line: usize) -> Res<Event> {
    let f = Fields::of(value, "the event")?;
    let t = match f.get("t") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| format!("field `t` of the event must be a number, got {v}"))?,
        ),
    };
    let dev = f.str("dev")?;
    let device = header
        .devices
        .iter()
        .position(|d| d.id() == dev)
        .ok_or_else(|| format!("unknown device id `{dev}` (the header has no such device)"))?;
    let op_name = f.str("op")?;
    let op = match (&header.devices[device], op_name) {
        (_, "system_reset") => Op::SystemReset,
        (Device::Mem(_), "set_requested_size") => Op::SetRequestedSize { size: f.u64("size")? },
        (Device::Mem(_), "plug") => Op::Plug {
            addr: f.u64("addr")?,
            nb_blocks: f.u16("nb_blocks")?,
            resp: f.mem_resp()?,
        },
        (Device::Mem(_), "unplug") => Op::Unplug {
            addr: f.u64("addr")?,
            nb_blocks: f.u16("nb_blocks")?,
            resp: f.mem_resp()?,
        },
        (Device::Mem(_), "unplug_all") => Op::UnplugAll { resp: f.mem_resp()? },
        (Device::Mem(_), "state") => Op::State {
            addr: f.u64("addr")?,
            nb_blocks: f.u16("nb_blocks")?,
            resp: f.mem_resp()?,
            state: match f.opt_str("state")? {
                None => None,
                Some("plugged") => Some(BlockState::Plugged),
                Some("unplugged") => Some(BlockState::Unplugged),
                Some("mixed") => Some(BlockState::Mixed),
                Some(other) => {
                    return Err(format!(
                        "unknown state `{other}` (expected plugged, unplugged or mixed)"
                    ));
                }
            },
        },
        (Device::Mem(_), "expect") => Op::Expect {
            plugged_size: f.opt_u64("plugged_size")?,
            usable_region_size: f.opt_u64("usable_region_size")?,
        },
        (Device::Iommu(_), "attach") => Op::Attach {
            domain: f.u32("domain")?,
            endpoint: f.u32("endpoint")?,
            flags: f.opt_u32("flags")?.unwrap_or(0),
            resp: f.iommu_resp()?,
        },
        (Device::Iommu(_), "detach") => Op::Detach {
            domain: f.u32("domain")?,
            endpoint: f.u32("endpoint")?,
            resp: f.iommu_resp()?,
        },
        (Device::Iommu(_), "map") => Op::Map {
            domain: f.u32("domain")?,
            virt_start: f.u64("virt_start")?,
            virt_end: f.u64("virt_end")?,
            phys_start: f.u64("phys_start")?,
            flags: f.u32("flags")?,
            resp: f.iommu_resp()?,
        },
        (Device::Iommu(_), "unmap") => Op::Unmap {
            domain: f.u32("domain")?,
            virt_start: f.u64("virt_start")?,
            virt_end: f.u64("virt_end")?,
            resp: f.iommu_resp()?,
        },
        (Device::Iommu(_), "probe") => Op::Probe {
            endpoint: f.u32("endpoint")?,
            resp: f.iommu_resp()?,
        },
        (d, other) => return Err(format!("unknown {} op `{other}` for device `{dev}`", d.kind())),
    };
    Ok(Event { line, t, device, op })
}

impl Trace {
    /// Parses the text of a devtrace; `name` is used in errors and reports.
    pub fn parse(name: &str, text: &str) -> Result<Self, TraceError> {
        let err = |line: usize, message: String| TraceError::Parse {
            name: name.to_string(),
            line,
            message,
        };
        // serde_json counts lines within the one line it is given: keep
        // its column, drop its line, so that an error names one line only.
        let json = |line: usize, text: &str| -> Result<Value, TraceError> {
            serde_json::from_str(text).map_err(|e| {
                let message = e.to_string();
                let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
                err(line, format!("bad JSON at column {}: {message}", e.column()))
            })
        };
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
        let (_, first) = lines
            .next()
            .ok_or_else(|| err(1, "empty trace: expected a devtrace header".into()))?;
        let mut header = parse_header(&json(1, first)?).map_err(|m| err(1, m))?;
        let mut events = Vec::new();
        for (line, text) in lines {
            if text.trim().is_empty() {
                continue;
            }
            let event = parse_event(&json(line, text)?, &header, line).map_err(|m| err(line, m))?;
            events.push(event);
        }
        // Where the header lists no endpoints, every endpoint the trace
        // names exists.
        for (index, device) in header.devices.iter_mut().enumerate() {
            if let Device::Iommu(d) = device
                && !d.endpoints_listed
            {
                let named: BTreeSet<u32> = events
                    .iter()
                    .filter(|e| e.device == index)
                    .filter_map(|e| match e.op {
                        Op::Attach { endpoint, .. } | Op::Detach { endpoint, .. } | Op::Probe { endpoint, .. } => {
                            Some(endpoint)
                        }
                        _ => None,
                    })
                    .collect();
                d.endpoints = named.into_iter().collect();
            }
        }
        Ok(Self {
            name: name.to_string(),
            header,
            events,
        })
    }

    /// Reads and parses the devtrace at `path`, named by its file name.
    pub fn read(path: &Path) -> Result<Self, TraceError> {
        let bytes = std::fs::read(path).map_err(|source| TraceError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let valid = &bytes[..e.valid_up_to()];
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = valid.len() - valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
            TraceError::Parse {
                name: name.clone(),
                line,
                message: format!("not UTF-8 text (byte {column} of the line): a devtrace is JSON Lines"),
            }
        })?;
        Self::parse(&name, text)
    }

    /// Events that are requests to a device.
    pub fn request_count(&self) -> usize {
        self.events.iter().filter(|e| e.op.is_request()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"{"format":"devtrace","version":1,"ram":[{"addr":0,"size":16777216}],"devices":[{"device":"virtio-mem","id":"vmem0","addr":4294967296,"region_size":67108864,"block_size":2097152,"requested_size":0},{"device":"virtio-iommu","id":"viommu0","page_size_mask":18446744073709547520,"input_start":0,"input_end":18446744073709551615,"domain_start":0,"domain_end":4294967295,"bypass":false}]}"#;

    fn parse(events: &[&str]) -> Result<Trace, TraceError> {
        let mut text = HEADER.to_string();
        for e in events {
            text.push('\n');
            text.push_str(e);
        }
        Trace::parse("t.jsonl", &text)
    }

    fn message(events: &[&str]) -> String {
        parse(events).unwrap_err().to_string()
    }

    #[test]
    fn parses_both_devices_and_tolerates_extra_fields() {
        let t = parse(&[
            r#"{"t":1.5,"dev":"vmem0","op":"plug","addr":4294967296,"nb_blocks":2,"resp":"ack","note":"extra"}"#,
            "",
            r#"{"dev":"viommu0","op":"attach","domain":1,"endpoint":16}"#,
            r#"{"dev":"viommu0","op":"map","domain":1,"virt_start":0,"virt_end":4095,"phys_start":4096,"flags":3,"resp":"inval"}"#,
            r#"{"dev":"vmem0","op":"state","addr":4294967296,"nb_blocks":1,"resp":"ack","state":"mixed"}"#,
        ])
        .unwrap();
        assert_eq!(t.events.len(), 4);
        assert_eq!(t.events[1].line, 4, "blank lines still count");
        assert_eq!(t.events[0].t, Some(1.5));
        assert_eq!(
            t.events[2].op,
            Op::Map {
                domain: 1,
                virt_start: 0,
                virt_end: 4095,
                phys_start: 4096,
                flags: 3,
                resp: Some(Status::Inval)
            }
        );
        let Device::Iommu(iommu) = &t.header.devices[1] else {
            panic!()
        };
        assert_eq!(iommu.endpoints, vec![16], "derived from the events");
        assert!(!iommu.endpoints_listed);
        assert_eq!(t.request_count(), 4);
    }

    #[test]
    fn refuses_unreadable_lines_naming_them() {
        assert_eq!(
            message(&[r#"{"dev":"vmem0","op":"plug","nb_blocks":1}"#]),
            "t.jsonl: line 2: missing field `addr` in the event"
        );
        assert!(message(&["{", ""]).starts_with("t.jsonl: line 2: bad JSON"));
        // One line number only, even where serde_json counts its own.
        let nul = message(&["{\"dev\":\u{0}}"]);
        assert_eq!(nul.matches("line").count(), 1, "{nul}");
        assert!(nul.starts_with("t.jsonl: line 2: bad JSON at column 8: "), "{nul}");
        assert_eq!(
            message(&["{}", r#"{"dev":"vmem1","op":"plug"}"#]),
            "t.jsonl: line 2: missing field `dev` in the event"
        );
        assert_eq!(
            message(&[r#"{"dev":"vmem0","op":"map"}"#]),
            "t.jsonl: line 2: unknown virtio-mem op `map` for device `vmem0`"
        );
        assert_eq!(
            message(&[r#"{"dev":"vmem1","op":"plug"}"#]),
            "t.jsonl: line 2: unknown device id `vmem1` (the header has no such device)"
        );
        assert_eq!(
            message(&[r#"{"dev":"vmem0","op":"plug","addr":"0x1","nb_blocks":1}"#]),
            "t.jsonl: line 2: field `addr` of the event must be an unsigned integer, got \"0x1\""
        );
        assert_eq!(
            message(&[r#"{"dev":"vmem0","op":"plug","addr":0,"nb_blocks":65536}"#]),
            "t.jsonl: line 2: field `nb_blocks` of the event is 65536, above 65535"
        );
        assert_eq!(
            message(&[r#"{"dev":"vmem0","op":"unplug_all","resp":"ok"}"#]),
            "t.jsonl: line 2: unknown virtio-mem resp `ok` (expected ack, nack, busy or error)"
        );
        let v2 = HEADER.replace(r#""version":1"#, r#""version":2"#);
        assert_eq!(
            Trace::parse("x", &v2).unwrap_err().to_string(),
            "x: line 1: unknown devtrace version 2 (this replayer reads version 1)"
        );
        assert_eq!(
            Trace::parse("x", "").unwrap_err().to_string(),
            "x: line 1: empty trace: expected a devtrace header"
        );
        let unknown = HEADER.replace(r#""device":"virtio-mem""#, r#""device":"virtio-blk""#);
        assert_eq!(
            Trace::parse("x", &unknown).unwrap_err().to_string(),
            "x: line 1: unknown device type `virtio-blk` in devices[0]"
        );
        let err = Trace::parse("x", "{}\n").unwrap_err();
        assert_eq!(err.line(), Some(1));
        assert_eq!(err.to_string(), "x: line 1: missing field `format` in the header");
    }

    #[test]
    fn a_file_that_is_not_text_names_its_line() {
        let dir = std::env::temp_dir().join(format!("devtrace-binary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("binary.jsonl");
        let mut bytes = HEADER.as_bytes().to_vec();
        bytes.extend_from_slice(b"\n{\"dev\":\xff}\n");
        std::fs::write(&path, &bytes).unwrap();
        let err = Trace::read(&path).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(err.line(), Some(2));
        assert_eq!(
            err.to_string(),
            "binary.jsonl: line 2: not UTF-8 text (byte 8 of the line): a devtrace is JSON Lines"
        );
    }
}
