//! Transports: a file, and a Unix socket to a sender in another process.

mod common;

use std::os::unix::net::UnixListener;
use std::process::Command;

use common::*;
use memvisor_dma::mapper::vm_pin_kib;
use memvisor_vmstate::transport;

/// Set in the child process: the socket to send the source machine to.
const CHILD_SOCKET: &str = "MEMVISOR_VMSTATE_TEST_SOCKET";

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("memvisor-vmstate-{}-{name}", std::process::id()))
}

/// Checks that `dst` holds what [`Machine::source`] builds.
fn assert_restored(dst: &Machine, reference: &Machine) {
    assert_eq!(dst.region.save_state(), reference.region.save_state());
    assert_eq!(dst.iommu_handle().save_state(), reference.iommu_handle().save_state());
    assert_eq!(dst.pinned(), reference.pinned());
    let (mut a, mut b) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    for (x, y) in [(&reference.boot, &dst.boot), (&reference.vmem_block, &dst.vmem_block)] {
        for off in (0..x.size()).step_by(MIB as usize) {
            x.read(off, &mut a).unwrap();
            y.read(off, &mut b).unwrap();
            assert!(a == b, "'{}' differs at {off:#x}", x.name());
        }
    }
}

#[test]
fn file_round_trip() {
    let _serial = serial();
    let src = Machine::source();
    let path = temp_path("file");
    let saved = transport::save_to_file(&mut src.registry(), &path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), saved.total_bytes);
    let dst = Machine::new();
    let loaded = transport::load_from_file(&mut dst.registry(), &path).unwrap();
    assert_eq!(loaded, saved);
    assert_restored(&dst, &src);
    std::fs::remove_file(&path).unwrap();
    let err = transport::load_from_file(&mut Machine::new().registry(), &path).unwrap_err();
    assert!(err.to_string().contains("opening"), "{err}");
}

/// Runs only in the child process of [`socket_to_another_process`]:
/// builds the source machine and sends it.
#[test]
fn child_sender() {
    let Ok(path) = std::env::var(CHILD_SOCKET) else {
        return;
    };
    let src = Machine::source();
    transport::save_to_unix_socket(&mut src.registry(), &path).unwrap();
}

#[test]
fn socket_to_another_process() {
    let _serial = serial();
    let path = temp_path("sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_sender", "--nocapture", "--test-threads=1"])
        .env(CHILD_SOCKET, &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let before = vm_pin_kib();
    let dst = Machine::new();
    let summary = transport::load_from_unix_listener(&mut dst.registry(), &listener).unwrap();
    assert!(child.wait().unwrap().success(), "the sender failed");
    assert_eq!(summary.sections.len(), 7);
    // The machine is deterministic: compare with one built here.
    let reference = Machine::source();
    assert_restored(&dst, &reference);
    assert_eq!((vm_pin_kib() - before) * KIB, dst.pinned() + reference.pinned());
    std::fs::remove_file(&path).unwrap();
}
