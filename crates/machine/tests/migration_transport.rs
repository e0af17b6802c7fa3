//! Transports: a file, and a Unix socket to a sender in another process.
//!
//! The machine is [`migration::source`]; a destination is
//! [`Machine::incoming`] for the same configuration.

use std::os::unix::net::UnixListener;
use std::process::Command;

use memvisor_dma::mapper::vm_pin_kib;
use memvisor_machine::Machine;
use memvisor_memory::RamBlock;
use memvisor_test_support::machines::migration;
use memvisor_test_support::{KIB, MIB, serial};
use memvisor_vmstate::transport;

/// Set in the child process: the socket to send the source machine to.
const CHILD_SOCKET: &str = "MEMVISOR_VMSTATE_TEST_SOCKET";

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("memvisor-vmstate-{}-{name}", std::process::id()))
}

/// A destination: the source's configuration, nothing attached yet.
fn incoming() -> Machine {
    Machine::incoming(&migration::config()).unwrap()
}

/// Boot RAM's block and the virtio-mem region's.
fn blocks(m: &Machine) -> [&RamBlock; 2] {
    [m.memory().region_at(0).unwrap().block(), m.vmems()[0].region.block()]
}

/// Checks that `dst` holds what [`migration::source`] builds.
fn assert_restored(dst: &Machine, reference: &Machine) {
    assert_eq!(
        dst.vmems()[0].region.save_state(),
        reference.vmems()[0].region.save_state()
    );
    assert_eq!(
        dst.iommu().unwrap().handle.save_state(),
        reference.iommu().unwrap().handle.save_state()
    );
    assert_eq!(dst.pinned_bytes(), reference.pinned_bytes());
    let (mut a, mut b) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    for (x, y) in blocks(reference).into_iter().zip(blocks(dst)) {
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
    let src = migration::source().machine;
    let path = temp_path("file");
    let saved = transport::save_to_file(&mut src.registry().unwrap(), &path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), saved.total_bytes);
    let dst = incoming();
    let loaded = transport::load_from_file(&mut dst.registry().unwrap(), &path).unwrap();
    assert_eq!(loaded, saved);
    assert_restored(&dst, &src);
    std::fs::remove_file(&path).unwrap();
    let err = transport::load_from_file(&mut incoming().registry().unwrap(), &path).unwrap_err();
    assert!(err.to_string().contains("opening"), "{err}");
}

/// Runs only in the child process of [`socket_to_another_process`], which
/// runs it with `--ignored --exact`: builds the source machine and sends
/// it.
#[test]
#[ignore = "subprocess helper, run by socket_to_another_process"]
fn child_sender() {
    let Ok(path) = std::env::var(CHILD_SOCKET) else {
        return;
    };
    let src = migration::source().machine;
    transport::save_to_unix_socket(&mut src.registry().unwrap(), &path).unwrap();
}

#[test]
fn socket_to_another_process() {
    let _serial = serial();
    let path = temp_path("sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_sender",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_SOCKET, &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let before = vm_pin_kib();
    let dst = incoming();
    let summary = transport::load_from_unix_listener(&mut dst.registry().unwrap(), &listener).unwrap();
    assert!(child.wait().unwrap().success(), "the sender failed");
    assert_eq!(summary.sections.len(), 7);
    // The machine is deterministic: compare with one built here.
    let reference = migration::source().machine;
    assert_restored(&dst, &reference);
    assert_eq!(
        (vm_pin_kib() - before) * KIB,
        dst.pinned_bytes() + reference.pinned_bytes()
    );
    std::fs::remove_file(&path).unwrap();
}
