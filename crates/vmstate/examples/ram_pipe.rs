//! Measures the RAM path against copying the same bytes through a pipe.
//!
//! `cargo run --release -p memvisor-vmstate --example ram_pipe [MiB]`
//!
//! Both runs move a populated, non-zero memfd region from one thread to
//! another over a pipe and into a fresh destination mapping: the baseline
//! with plain `write`/`read` calls straight from and into the mappings, the
//! other with `Registry::save` and `Registry::load` of the region's RAM
//! section (checksums, zero detection and records included).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::{Backing, RamBlock};
use memvisor_vmstate::{Registry, ram};

const MIB: u64 = 1 << 20;

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(ret, 0, "pipe2: {}", std::io::Error::last_os_error());
    for fd in fds {
        // SAFETY: fcntl on a descriptor we own; a failure only keeps the
        // default pipe size.
        unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, MIB as libc::c_int) };
    }
    // SAFETY: fresh descriptors that nothing else owns.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

fn machine(size: u64) -> (GuestMemoryMap, Arc<RamBlock>) {
    let block = Arc::new(RamBlock::new("ram", size, Backing::Memfd).unwrap());
    let map = GuestMemoryMap::builder()
        .ram(0, block.clone())
        .unwrap()
        .build()
        .unwrap();
    (map, block)
}

fn baseline(src: &RamBlock, dst: &RamBlock) -> Duration {
    let (mut rx, mut tx) = pipe();
    let size = src.size() as usize;
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: the whole mapping of `src`, alive for the scope.
            let bytes = unsafe { std::slice::from_raw_parts(src.host_address() as *const u8, size) };
            tx.write_all(bytes).unwrap();
        });
        // SAFETY: the whole mapping of `dst`, alive and otherwise unused.
        let bytes = unsafe { std::slice::from_raw_parts_mut(dst.host_address() as *mut u8, size) };
        rx.read_exact(bytes).unwrap();
    });
    start.elapsed()
}

fn vmstate(src: &GuestMemoryMap, dst: &GuestMemoryMap) -> (Duration, u64) {
    let (rx, mut tx) = pipe();
    let mut sender = Registry::with_memory(src.clone());
    ram::register_ram(&mut sender, src).unwrap();
    let mut receiver = Registry::with_memory(dst.clone());
    ram::register_ram(&mut receiver, dst).unwrap();
    let start = Instant::now();
    let bytes = std::thread::scope(|s| {
        s.spawn(move || sender.save(&mut tx).unwrap());
        receiver
            .load(BufReader::with_capacity(64 << 10, rx))
            .unwrap()
            .total_bytes
    });
    (start.elapsed(), bytes)
}

fn main() {
    let mib: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(512);
    let size = mib * MIB;
    let (src_map, src) = machine(size);
    src.populate(0, size).unwrap();
    let pattern: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    for off in (0..size).step_by(MIB as usize) {
        src.write(off, &pattern).unwrap();
    }
    let mut best = (Duration::MAX, Duration::MAX);
    let mut stream = 0;
    for _ in 0..5 {
        let (dst_map, dst) = machine(size);
        best.0 = best.0.min(baseline(&src, &dst));
        drop((dst_map, dst));
        let (dst_map, _dst) = machine(size);
        let (t, n) = vmstate(&src_map, &dst_map);
        best.1 = best.1.min(t);
        stream = n;
    }
    let gbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e9;
    println!("{mib} MiB populated non-zero RAM, best of 5:");
    println!(
        "  pipe copy: {:>8.1} ms  {:.2} GB/s",
        best.0.as_secs_f64() * 1e3,
        gbps(best.0)
    );
    println!(
        "  vmstate:   {:>8.1} ms  {:.2} GB/s",
        best.1.as_secs_f64() * 1e3,
        gbps(best.1)
    );
    println!(
        "  ratio {:.3}x; stream {} bytes for {} bytes (+{:.4}%)",
        best.1.as_secs_f64() / best.0.as_secs_f64(),
        stream,
        size,
        (stream - size) as f64 * 100.0 / size as f64
    );
}
