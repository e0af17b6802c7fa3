//! What the command line answers to values it cannot use: an error in the
//! program's own words, naming the value, exit status 2, before any work.

use std::process::{Command, Output};

fn memvisor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(args)
        .output()
        .unwrap()
}

fn refused(args: &[&str]) -> String {
    let o = memvisor(args);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
    assert!(
        o.stdout.is_empty(),
        "{args:?} did work: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stderr).unwrap()
}

#[test]
fn zero_events_between_migrations_is_refused_in_words() {
    let err = refused(&["replay", "--migrate-every", "0"]);
    assert!(err.contains("0 events between migrations"), "{err}");
    assert!(!err.contains("non-zero type"), "{err}");
}

#[test]
fn a_size_too_large_gets_one_message_however_written() {
    let a = refused(&["replay", "--pin-budget", "18446744073709551616"]);
    let b = refused(&["replay", "--pin-budget", "99999999999G"]);
    for err in [&a, &b] {
        assert!(err.contains("larger than the largest size"), "{err}");
    }
}

#[test]
fn demo_refuses_a_block_size_below_a_page_at_parse_time() {
    let err = refused(&["demo", "--block-size", "1K"]);
    assert!(err.contains("'1K'") && err.contains("at least 4K"), "{err}");
}

#[test]
fn demo_names_its_own_options_not_guest_addresses() {
    let err = refused(&["demo", "--size", "3M"]);
    assert!(
        err.contains("--size 3.0 MiB is not a positive multiple of --block-size 2.0 MiB"),
        "{err}"
    );
    assert!(!err.contains("0x"), "{err}");
}

#[test]
fn demo_refuses_more_memory_than_the_host_has_before_populating() {
    let err = refused(&["demo", "--size", "64T"]);
    assert!(err.contains("--size 64.0 TiB is more than this host can hold"), "{err}");
    assert!(err.contains("available"), "{err}");
}

#[test]
fn a_malformed_lab_scenario_fails_before_anything_boots_naming_its_line() {
    let dir = std::env::temp_dir().join(format!("memvisor-cli-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\n\n[vm]\ncpus = 1\nmemory = \"lots\"\n\n[guest]\nscript = \"true\"\n",
    )
    .unwrap();
    // Exit 2 and no stage: it stopped before setup (a run that starts
    // reports its stages and exits 0 or 1).
    let err = refused(&["lab", "run", bad.to_str().unwrap(), "--vmm", "qemu"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(err.contains("bad.toml: line 5"), "{err}");
    assert!(err.contains("`lots` is not a size"), "{err}");
    assert!(!err.contains("stage "), "{err}");
}

#[test]
fn an_unknown_lab_mode_is_refused() {
    let err = refused(&["lab", "run", "boot", "--mode", "bare"]);
    assert!(err.contains("'bare'") && err.contains("direct"), "{err}");
}
