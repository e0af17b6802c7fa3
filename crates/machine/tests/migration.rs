//! Whole-machine migration: save a running machine, restore it into fresh
//! objects, and refuse every broken stream without pinning anything.
//!
//! Every test here pins memory and asserts on the process's `VmPin`, so
//! each holds [`common::serial`].

mod common;

use std::io::{self, Write};
use std::sync::mpsc;

use common::*;
use memvisor_dma::mapper::{DmaMapper, vm_pin_kib};
use memvisor_memory::discard::RamDiscardManager;
use memvisor_virtio_mem::wire::{VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG};
use memvisor_vmstate::format::{self, RawSection};
use memvisor_vmstate::ram::RAM_SECTION;
use memvisor_vmstate::{Summary, VmStateError};

fn save(m: &Machine) -> (Vec<u8>, Summary) {
    let mut bytes = Vec::new();
    let summary = m.registry().save(&mut bytes).unwrap();
    assert_eq!(summary.total_bytes, bytes.len() as u64);
    (bytes, summary)
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
    let dst = Machine::new();
    let err = dst.registry().load(bytes).expect_err("a broken stream was accepted");
    assert_eq!(dst.pinned(), 0, "a failed load left pins: {err}");
    assert_eq!(vm_pin_kib(), before, "a failed load left VmPin raised: {err}");
    assert!(dst.dma.iter().all(|d| d.path().is_none()), "{err}");
    err
}

#[test]
fn full_machine_round_trip() {
    let _serial = serial();
    let src = Machine::source();
    let src_pinned = src.pinned();
    // EP_A: 2 MiB + 1 MiB, EP_B: 2 MiB + 64 KiB, path 1: boot RAM and the
    // plugged blocks.
    assert_eq!(src.pinners[0].pinned_bytes(), 3 * MIB);
    assert_eq!(src.pinners[1].pinned_bytes(), 2 * MIB + 64 * KIB);
    assert_eq!(src.pinners[2].pinned_bytes(), BOOT_SIZE + 8 * MIB);
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
    assert!(!src.region.migration_running(), "the flag is cleared after the save");

    let dst = Machine::new();
    let loaded = dst.registry().load(&bytes[..]).unwrap();
    assert_eq!(loaded.sections, summary.sections);

    // Unplugged memory is not resident (checked before anything reads it:
    // reading a memfd hole allocates it).
    let plugged = [0u64, 1, 5, 9];
    for block in 0..VMEM_SIZE / BLOCK {
        let resident = dst.vmem_block.resident_bytes(block * BLOCK, BLOCK).unwrap();
        if !plugged.contains(&block) {
            assert_eq!(resident, 0, "unplugged block {block} is resident on the destination");
        }
    }

    // Block states, sizes and IOMMU state are identical.
    assert_eq!(dst.region.save_state(), src.region.save_state());
    assert_eq!(dst.region.plugged_size(), 8 * MIB);
    assert_eq!(dst.iommu_handle().save_state(), src.iommu_handle().save_state());

    // Every mapping is pinned again, by the same devices, and the kernel
    // agrees.
    for (i, (s, d)) in src.pinners.iter().zip(&dst.pinners).enumerate() {
        assert_eq!(d.pinned_bytes(), s.pinned_bytes(), "pinner {i}");
        assert_eq!(d.mapping_count(), s.mapping_count(), "pinner {i}");
    }
    for (s, d) in src.dma.iter().zip(&dst.dma) {
        assert_eq!(d.path(), s.path());
        assert_eq!(d.pinned_ranges(), s.pinned_ranges());
    }
    assert_eq!(dst.pinned(), src_pinned);
    assert_eq!(
        (vm_pin_kib() - pin_before) * KIB,
        dst.pinned(),
        "VmPin disagrees with the pinners"
    );

    // RAM contents are byte-identical.
    let compare = |a: &memvisor_memory::RamBlock, b: &memvisor_memory::RamBlock| {
        let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
        for off in (0..a.size()).step_by(MIB as usize) {
            a.read(off, &mut x).unwrap();
            b.read(off, &mut y).unwrap();
            assert!(x == y, "RAM block '{}' differs in the MiB at {off:#x}", a.name());
        }
    };
    compare(&src.boot, &dst.boot);
    compare(&src.vmem_block, &dst.vmem_block);

    // The stream stays within 1% (plus 64 KiB) of the populated non-zero
    // bytes, region by region.
    let (boot_nonzero, vmem_nonzero) = src.nonzero_populated_bytes();
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
    let handle = dst.region.clone();
    assert!(handle.is_populated(r(block_addr(0), BLOCK)));
    drop(dst);
    assert_eq!(vm_pin_kib(), pin_before);
}

#[test]
fn iommu_before_virtio_mem_fails_naming_the_predecessor() {
    let _serial = serial();
    let src = Machine::source();
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
    let dst = Machine::new();
    dst.registry().load(&write(&sections)[..]).unwrap();
    assert_eq!(dst.pinned(), src.pinned());
}

#[test]
fn stream_errors_name_section_and_offset() {
    let _serial = serial();
    let src = Machine::source();
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
    let src = Machine::source();
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
    let src = Machine::source();
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
    let dst = Machine::new();
    let mut reg = dst.registry();
    let before = vm_pin_kib();
    let mut corrupt = bytes.clone();
    for bit in flips {
        let (byte, mask) = ((bit / 8) as usize, 1u8 << (bit % 8));
        corrupt[byte] ^= mask;
        let result = reg.load(&corrupt[..]);
        corrupt[byte] ^= mask;
        assert!(result.is_err(), "flip of bit {bit} at offset {byte:#x} was accepted");
        assert_eq!(dst.pinned(), 0, "bit {bit}: {:?}", result);
        assert_eq!(vm_pin_kib(), before, "bit {bit}");
    }
    // The same destination still takes the intact stream.
    reg.load(&bytes[..]).unwrap();
    assert_eq!(dst.pinned(), src.pinned());
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
    let mut m = Machine::source();
    let registry_src = m.registry();
    let before = m.region.save_state();
    let (go_tx, go_rx) = mpsc::channel::<bool>();
    let (ans_tx, ans_rx) = mpsc::channel::<Vec<u16>>();
    let region = m.region.clone();
    let Machine { vmem, vmem_queue, .. } = &mut m;
    let queue = vmem_queue.as_mut().unwrap();
    let (gates, seen) = std::thread::scope(|s| {
        // The guest: on every gate, a valid PLUG (room under the requested
        // size) and a valid UNPLUG (block 9 is plugged and not mapped).
        s.spawn(move || {
            while go_rx.recv() == Ok(true) {
                assert!(region.migration_running());
                let plug = vmem_request(vmem, queue, VIRTIO_MEM_REQ_PLUG, block_addr(12), 1);
                let unplug = vmem_request(vmem, queue, VIRTIO_MEM_REQ_UNPLUG, block_addr(9), 1);
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
    assert_eq!(m.region.save_state(), before);
    assert!(!m.region.migration_running());
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
