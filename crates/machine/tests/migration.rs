//! Whole-machine migration: save a running machine, restore it into fresh
//! objects, and refuse every broken stream without pinning anything.
//!
//! The source is [`migration::source`]; a destination is
//! [`Machine::incoming`] for the same configuration, whose registry loads
//! the stream.
//!
//! Every test here pins memory and asserts on the process's `VmPin`, so
//! each holds [`serial`].

use std::io::{self, Write};
use std::sync::mpsc;

use memvisor_dma::attach::DmaDevice;
use memvisor_dma::mapper::vm_pin_kib;
use memvisor_machine::Machine;
use memvisor_memory::RamBlock;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_test_support::machines::migration::{self, BLOCK, BOOT_SIZE, VMEM_BASE, VMEM_SIZE, block_addr};
use memvisor_test_support::{KIB, MIB, range as r, serial};
use memvisor_virtio_iommu::persist::IommuState;
use memvisor_virtio_mem::wire::{VIRTIO_MEM_RESP_ACK as ACK, VIRTIO_MEM_RESP_BUSY as BUSY};
use memvisor_vmstate::format::{self, RawSection};
use memvisor_vmstate::ram::RAM_SECTION;
use memvisor_vmstate::{Summary, VmStateError};

fn save(m: &Machine) -> (Vec<u8>, Summary) {
    let mut bytes = Vec::new();
    let summary = m.registry().unwrap().save(&mut bytes).unwrap();
    assert_eq!(summary.total_bytes, bytes.len() as u64);
    (bytes, summary)
}

/// A destination: the source's configuration, nothing attached yet.
fn incoming() -> Machine {
    Machine::incoming(&migration::config()).unwrap()
}

/// The assigned devices, in the order of their `dma` sections.
fn dma(m: &Machine) -> Vec<&DmaDevice> {
    m.dma_devices().collect()
}

fn iommu_state(m: &Machine) -> IommuState {
    m.iommu().unwrap().handle.save_state()
}

/// Boot RAM's block.
fn boot(m: &Machine) -> &RamBlock {
    m.memory().region_at(0).unwrap().block()
}

/// The virtio-mem region's block.
fn vmem_block(m: &Machine) -> &RamBlock {
    m.vmems()[0].region.block()
}

/// Bytes of boot RAM and of the virtio-mem region that are populated and
/// not zero, per page.
fn nonzero_populated_bytes(m: &Machine) -> (u64, u64) {
    let mut boot_bytes = 0;
    let mut page = vec![0u8; 4096];
    for off in (0..BOOT_SIZE).step_by(4096) {
        boot(m).read(off, &mut page).unwrap();
        if page.iter().any(|&b| b != 0) {
            boot_bytes += 4096;
        }
    }
    let mut vmem = 0;
    let region = &m.vmems()[0].region;
    let view = region.populated();
    for run in view.runs(region.region(), true) {
        for gpa in (run.start()..run.end()).step_by(4096) {
            vmem_block(m).read(gpa - VMEM_BASE, &mut page).unwrap();
            if page.iter().any(|&b| b != 0) {
                vmem += 4096;
            }
        }
    }
    (boot_bytes, vmem)
}

fn raw(bytes: &[u8]) -> Vec<RawSection> {
    format::read_raw(bytes, 1 << 30).unwrap().sections
}

fn write(sections: &[RawSection]) -> Vec<u8> {
    let mut out = Vec::new();
    format::write_raw(&mut out, sections).unwrap();
    out
}

fn position(sections: &[RawSection], name: &str) -> usize {
    sections.iter().position(|s| s.header.id.name == name).unwrap()
}

/// Loads `bytes` into a fresh machine and checks that the failure left
/// nothing pinned, in the pinners and in the kernel's count.
fn load_fails(bytes: &[u8]) -> VmStateError {
    let before = vm_pin_kib();
    let dst = incoming();
    let err = dst
        .registry()
        .unwrap()
        .load(bytes)
        .expect_err("a broken stream was accepted");
    assert_eq!(dst.pinned_bytes(), 0, "a failed load left pins: {err}");
    assert_eq!(vm_pin_kib(), before, "a failed load left VmPin raised: {err}");
    assert!(dst.dma_devices().all(|d| d.path().is_none()), "{err}");
    err
}

#[test]
fn full_machine_round_trip() {
    let _serial = serial();
    let src = migration::source().machine;
    let src_pinned = src.pinned_bytes();
    // EP_A: 2 MiB + 1 MiB, EP_B: 2 MiB + 64 KiB, path 1: boot RAM and the
    // plugged blocks.
    assert_eq!(dma(&src)[0].pinned_bytes(), 3 * MIB);
    assert_eq!(dma(&src)[1].pinned_bytes(), 2 * MIB + 64 * KIB);
    assert_eq!(dma(&src)[2].pinned_bytes(), BOOT_SIZE + 8 * MIB);
    let pin_before = vm_pin_kib();

    let (bytes, summary) = save(&src);
    let order: Vec<String> = summary
        .sections
        .iter()
        .map(|s| format!("{}/{}", s.id.name, s.id.instance))
        .collect();
    assert_eq!(
        order,
        [
            "virtio-mem/0",
            "ram/0",
            "ram/1",
            "virtio-iommu/0",
            "dma/0",
            "dma/1",
            "dma/2"
        ]
    );
    assert!(
        !src.vmems()[0].region.migration_running(),
        "the flag is cleared after the save"
    );

    let dst = incoming();
    let loaded = dst.registry().unwrap().load(&bytes[..]).unwrap();
    assert_eq!(loaded.sections, summary.sections);

    // Unplugged memory is not resident (checked before anything reads it:
    // reading a memfd hole allocates it).
    let plugged = [0u64, 1, 5, 9];
    for block in 0..VMEM_SIZE / BLOCK {
        let resident = vmem_block(&dst).resident_bytes(block * BLOCK, BLOCK).unwrap();
        if !plugged.contains(&block) {
            assert_eq!(resident, 0, "unplugged block {block} is resident on the destination");
        }
    }

    // Block states, sizes and IOMMU state are identical.
    assert_eq!(dst.vmems()[0].region.save_state(), src.vmems()[0].region.save_state());
    assert_eq!(dst.vmems()[0].region.plugged_size(), 8 * MIB);
    assert_eq!(iommu_state(&dst), iommu_state(&src));

    // Every mapping is pinned again, by the same devices, and the kernel
    // agrees.
    assert_eq!(dma(&dst).len(), dma(&src).len());
    for (i, (s, d)) in dma(&src).into_iter().zip(dma(&dst)).enumerate() {
        assert_eq!(d.pinned_bytes(), s.pinned_bytes(), "pinner {i}");
        assert_eq!(d.mapper().mapping_count(), s.mapper().mapping_count(), "pinner {i}");
        assert_eq!(d.path(), s.path());
        assert_eq!(d.pinned_ranges(), s.pinned_ranges());
    }
    assert_eq!(dst.pinned_bytes(), src_pinned);
    assert_eq!(
        (vm_pin_kib() - pin_before) * KIB,
        dst.pinned_bytes(),
        "VmPin disagrees with the pinners"
    );

    // RAM contents are byte-identical.
    let compare = |a: &RamBlock, b: &RamBlock| {
        let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
        for off in (0..a.size()).step_by(MIB as usize) {
            a.read(off, &mut x).unwrap();
            b.read(off, &mut y).unwrap();
            assert!(x == y, "RAM block '{}' differs in the MiB at {off:#x}", a.name());
        }
    };
    compare(boot(&src), boot(&dst));
    compare(vmem_block(&src), vmem_block(&dst));

    // The stream stays within 1% (plus 64 KiB) of the populated non-zero
    // bytes, region by region.
    let (boot_nonzero, vmem_nonzero) = nonzero_populated_bytes(&src);
    for (instance, nonzero) in [(0u32, boot_nonzero), (1, vmem_nonzero)] {
        let s = summary.named(RAM_SECTION).find(|s| s.id.instance == instance).unwrap();
        let bound = nonzero + nonzero / 100 + 64 * KIB;
        assert!(
            s.stream_len <= bound,
            "RAM region {instance}: {:#x} stream bytes for {nonzero:#x} non-zero bytes",
            s.stream_len
        );
        eprintln!(
            "RAM region {instance}: {} non-zero bytes -> {} stream bytes (+{} bytes, {:.4}%)",
            nonzero,
            s.stream_len,
            s.stream_len - nonzero,
            (s.stream_len - nonzero) as f64 * 100.0 / nonzero as f64
        );
    }
    eprintln!("whole stream: {} bytes", bytes.len());

    // The restored machine works: the guest's mapping keeps the unplug
    // refused (rule 2), and dropping the destination unpins everything.
    let handle = dst.vmems()[0].region.clone();
    assert!(handle.is_populated(r(block_addr(0), BLOCK)));
    drop(dst);
    assert_eq!(vm_pin_kib(), pin_before);
}

#[test]
fn iommu_before_virtio_mem_fails_naming_the_predecessor() {
    let _serial = serial();
    let src = migration::source().machine;
    let (bytes, _) = save(&src);
    let sections = raw(&bytes);

    // The IOMMU first: its mappings target memory whose manager is not
    // restored yet.
    let mut s = sections.clone();
    let iommu = s.remove(position(&s, "virtio-iommu"));
    s.insert(0, iommu);
    let err = load_fails(&write(&s)).to_string();
    assert!(
        err.contains("section 'virtio-iommu' instance 0 needs section 'virtio-mem' instance 0 restored first"),
        "{err}"
    );
    assert!(err.contains("discard manager of the RAM region holding"), "{err}");

    // The IOMMU after virtio-mem but before RAM: it names the RAM section.
    let mut s = sections.clone();
    let iommu = s.remove(position(&s, "virtio-iommu"));
    s.insert(1, iommu);
    let err = load_fails(&write(&s)).to_string();
    assert!(err.contains("needs section 'ram' instance"), "{err}");

    // The managed region's RAM before virtio-mem (boot RAM, unmanaged, may
    // come first).
    let mut s = sections.clone();
    let vmem = s.remove(0);
    s.insert(2, vmem); // ram/0, ram/1, virtio-mem: ram/1 is managed
    let err = load_fails(&write(&s)).to_string();
    assert!(
        err.contains("section 'ram' instance 1 needs section 'virtio-mem' instance 0 restored first"),
        "{err}"
    );

    // A DMA device before the IOMMU it is behind.
    let mut s = sections.clone();
    let dma = s.remove(position(&s, "dma"));
    let at = position(&s, "virtio-iommu");
    s.insert(at, dma);
    let err = load_fails(&write(&s)).to_string();
    assert!(
        err.contains("section 'dma' instance 0 needs section 'virtio-iommu' instance 0 restored first"),
        "{err}"
    );

    // The right order loads.
    let dst = Machine::restore(&migration::config(), &mut &write(&sections)[..]).unwrap();
    assert_eq!(dst.pinned_bytes(), src.pinned_bytes());
}

#[test]
fn stream_errors_name_section_and_offset() {
    let _serial = serial();
    let src = migration::source().machine;
    let (bytes, _) = save(&src);
    let sections = raw(&bytes);

    let without_dma: Vec<_> = sections.iter().filter(|s| s.header.id.name != "dma").cloned().collect();
    let err = load_fails(&write(&without_dma));
    assert!(
        matches!(err, VmStateError::MissingSection { ref section, .. } if section.name == "dma"),
        "{err}"
    );

    let mut dup = sections.clone();
    dup.push(sections[0].clone());
    let err = load_fails(&write(&dup));
    assert!(matches!(err, VmStateError::DuplicateSection { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("duplicate section 'virtio-mem' instance 0 at offset 0x")
    );

    let mut unknown = sections.clone();
    unknown[4].header.id.name = "virtio-gpu".into();
    let err = load_fails(&write(&unknown));
    assert!(
        err.to_string()
            .starts_with("unknown section 'virtio-gpu' instance 0 at offset 0x"),
        "{err}"
    );

    let mut newer = sections.clone();
    newer[0].header.version += 1;
    let err = load_fails(&write(&newer));
    assert!(matches!(err, VmStateError::NewerVersion { .. }), "{err}");

    // A corrupt length in the header of the IOMMU section: refused by the
    // header checksum, and with a fixed checksum by the size limit — before
    // anything is allocated.
    let at = position(&sections, "virtio-iommu");
    let offset = sections[at].header.offset;
    let mut w = format::StreamWriter::new(Vec::new()).unwrap();
    for s in &sections[..at] {
        w.section(&s.header.id.name, s.header.id.instance, s.header.version, &s.payload)
            .unwrap();
    }
    drop(w.begin_section("virtio-iommu", 0, 1, 1 << 40).unwrap());
    let forged = w.finish().unwrap();
    let err = load_fails(&forged);
    assert!(
        matches!(err, VmStateError::PayloadTooLarge { offset: o, len, .. } if o == offset && len == 1 << 40),
        "{err}"
    );
}

#[test]
fn truncation_is_refused_everywhere() {
    let _serial = serial();
    let src = migration::source().machine;
    let (bytes, _) = save(&src);
    let stream = format::read_raw(&bytes[..], 1 << 30).unwrap();
    let mut cuts: Vec<usize> = Vec::new();
    for s in &stream.sections {
        for at in [s.header.offset, s.header.payload_offset(), s.header.end_offset() - 4] {
            cuts.extend([at as usize - 1, at as usize, at as usize + 1]);
        }
    }
    cuts.extend([0, 1, 11, 12, stream.end_offset as usize, bytes.len() - 1]);
    let mut rng = Lcg(0x5eed);
    cuts.extend((0..100).map(|_| (rng.next() % bytes.len() as u64) as usize));
    for cut in cuts {
        let err = load_fails(&bytes[..cut]);
        let text = err.to_string();
        assert!(
            matches!(err, VmStateError::Truncated { offset, .. } if offset == cut as u64)
                || text.contains("failed to fill whole buffer"),
            "cut at {cut:#x}: {text}"
        );
    }
}

#[test]
fn a_thousand_bit_flips_are_refused() {
    let _serial = serial();
    let src = migration::source().machine;
    let (bytes, _) = save(&src);
    let stream = format::read_raw(&bytes[..], 1 << 30).unwrap();
    let mut rng = Lcg(0xb17f11b5);
    let mut flips: Vec<u64> = (0..1000).map(|_| rng.next() % (bytes.len() as u64 * 8)).collect();
    // And every bit of the stream outside RAM data (headers, device
    // state, checksums, the end marker), a few of each.
    for s in stream.sections.iter().filter(|s| s.header.id.name != RAM_SECTION) {
        for byte in s.header.offset..s.header.end_offset() {
            flips.push(byte * 8 + rng.next() % 8);
        }
    }
    for byte in stream.end_offset..bytes.len() as u64 {
        flips.push(byte * 8 + rng.next() % 8);
    }
    let dst = incoming();
    let mut reg = dst.registry().unwrap();
    let before = vm_pin_kib();
    let mut corrupt = bytes.clone();
    for bit in flips {
        let (byte, mask) = ((bit / 8) as usize, 1u8 << (bit % 8));
        corrupt[byte] ^= mask;
        let result = reg.load(&corrupt[..]);
        corrupt[byte] ^= mask;
        assert!(result.is_err(), "flip of bit {bit} at offset {byte:#x} was accepted");
        assert_eq!(dst.pinned_bytes(), 0, "bit {bit}: {:?}", result);
        assert_eq!(vm_pin_kib(), before, "bit {bit}");
    }
    // The same destination still takes the intact stream.
    reg.load(&bytes[..]).unwrap();
    assert_eq!(dst.pinned_bytes(), src.pinned_bytes());
}

/// An output that, after taking each write, lets the guest thread send
/// requests and waits for its answers.
struct GateWriter<'a> {
    out: Vec<u8>,
    go: &'a mpsc::Sender<bool>,
    answers: &'a mpsc::Receiver<Vec<u16>>,
    seen: Vec<u16>,
    gates: usize,
}

impl Write for GateWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        self.go.send(true).unwrap();
        self.seen.extend(self.answers.recv().unwrap());
        self.gates += 1;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn guest_requests_during_a_save_are_answered_busy() {
    let _serial = serial();
    let mut m = migration::source();
    let registry_src = m.machine.registry().unwrap();
    let region = m.machine.vmems()[0].region.clone();
    let before = region.save_state();
    let (go_tx, go_rx) = mpsc::channel::<bool>();
    let (ans_tx, ans_rx) = mpsc::channel::<Vec<u16>>();
    let guest = &mut m;
    let (gates, seen) = std::thread::scope(|s| {
        // The guest: on every gate, a valid PLUG (room under the requested
        // size) and a valid UNPLUG (block 9 is plugged and not mapped).
        let region = region.clone();
        s.spawn(move || {
            while go_rx.recv() == Ok(true) {
                assert!(region.migration_running());
                let plug = guest.plug(12, 1);
                let unplug = guest.unplug(9, 1);
                ans_tx.send(vec![plug, unplug]).unwrap();
            }
        });
        let mut registry = registry_src;
        let mut w = GateWriter {
            out: Vec::new(),
            go: &go_tx,
            answers: &ans_rx,
            seen: Vec::new(),
            gates: 0,
        };
        registry.save(&mut w).unwrap();
        go_tx.send(false).unwrap();
        (w.gates, w.seen)
    });
    assert!(gates >= 3, "only {gates} writes");
    assert_eq!(seen.len(), gates * 2);
    assert!(seen.iter().all(|&r| r == BUSY), "{seen:?}");
    // Nothing changed under the save; afterwards the guest is served again.
    assert_eq!(region.save_state(), before);
    assert!(!region.migration_running());
    assert_eq!(m.plug(12, 1), ACK);
    assert_eq!(m.unplug(9, 1), ACK);
}

/// A small deterministic generator (no dependency needed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
}
