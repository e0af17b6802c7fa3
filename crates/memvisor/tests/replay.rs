//! `memvisor replay`, run as a program: exit statuses, the JSON report,
//! and the messages for unreadable traces.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn memvisor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .arg("replay")
        .args(args)
        .env_remove("MEMVISOR_VFIO_GROUP")
        .output()
        .expect("memvisor runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The JSON object on the last line of stdout.
fn json(o: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

fn trace_path(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../devtrace/traces")
        .join(name)
        .display()
        .to_string()
}

/// Writes `text` to a fresh file and returns its path.
fn write_trace(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memvisor-replay-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn replays_clean(name: &str, dma: &str) -> Value {
    let o = memvisor(&[&trace_path(name), "--dma", dma, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{name} --dma {dma}: {}", stderr(&o));
    let report = json(&o);
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["trace"], name);
    report
}

#[test]
fn every_trace_replays_clean_with_uring_and_none() {
    for name in ["vmem-resize.jsonl", "vmem-kexec.jsonl", "viommu-dma-strict.jsonl"] {
        let uring = replays_clean(name, "uring");
        let none = replays_clean(name, "none");
        for field in ["events", "requests", "refused_maps", "busy_unplugs", "plugged_size"] {
            assert_eq!(uring[field], none[field], "{name}: {field}");
        }
        assert_eq!(none["pinned_bytes"], 0);
        for field in [
            "trace",
            "events",
            "requests",
            "mismatches",
            "refused_maps",
            "busy_unplugs",
            "plugged_size",
            "pinned_bytes",
            "vm_pin_kib",
            "migrations",
            "migration_bytes",
            "elapsed_s",
        ] {
            assert!(uring.get(field).is_some(), "{name}: no `{field}` in {uring}");
        }
    }
}

#[test]
fn without_a_trace_the_built_in_one_replays() {
    let o = memvisor(&["--dma", "none", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report = json(&o);
    assert_eq!(report["trace"], "vmem-resize.jsonl");
    assert_eq!(report["events"], 35);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("(built in)"), "{stdout}");
    assert!(stdout.contains("result:       OK"), "{stdout}");
}

const HEADER: &str = r#"{"format":"devtrace","version":1,"ram":[{"addr":0,"size":16777216}],"devices":[{"device":"virtio-mem","id":"vmem0","addr":4294967296,"region_size":67108864,"block_size":2097152,"requested_size":8388608}]}"#;
const PLUG: &str = r#"{"dev":"vmem0","op":"plug","addr":4294967296,"nb_blocks":1,"resp":"ack"}"#;

#[test]
fn unreadable_traces_exit_2_naming_the_line() {
    let cases = [
        (
            "bad-json",
            format!("{HEADER}\n{PLUG}\n{{\"dev\":\"vmem0\",\n"),
            "line 3: bad JSON",
        ),
        (
            "version",
            HEADER.replace(r#""version":1"#, r#""version":7"#),
            "line 1: unknown devtrace version 7",
        ),
        (
            "device-id",
            format!("{HEADER}\n{}\n", PLUG.replace("vmem0", "vmem9")),
            "line 2: unknown device id `vmem9`",
        ),
        (
            "missing-field",
            format!(
                "{HEADER}\n{PLUG}\n{PLUG}\n{}\n",
                PLUG.replace(r#""addr":4294967296,"#, "")
            ),
            "line 4: missing field `addr`",
        ),
        (
            "header-field",
            HEADER.replace(r#""block_size":2097152,"#, ""),
            "line 1: missing field `block_size`",
        ),
    ];
    for (name, text, message) in cases {
        let path = write_trace(&format!("{name}.jsonl"), &text);
        let o = memvisor(&[path.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains(message), "{name}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{name}: nothing is replayed");
    }
    let o = memvisor(&["/nonexistent/trace.jsonl"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot read trace /nonexistent/trace.jsonl"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_mismatch_exits_1_with_line_expected_and_actual() {
    // The second PLUG of the same block is an ERROR, not the recorded ACK.
    let path = write_trace("mismatch.jsonl", &format!("{HEADER}\n{PLUG}\n{PLUG}\n"));
    let o = memvisor(&[path.to_str().unwrap(), "--dma", "none", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("line 3: PLUG 0x100000000 x1: expected resp ack, got error"),
        "{}",
        stderr(&o)
    );
    let report = json(&o);
    assert_eq!(report["mismatches"], 1);
    assert_eq!(report["mismatch_list"][0]["line"], 3);
}

#[test]
fn a_hostile_guest_gets_busy_under_reject_and_ack_under_warn() {
    let text = [
        r#"{"format":"devtrace","version":1,"ram":[{"addr":0,"size":16777216}],"devices":[{"device":"virtio-mem","id":"vmem0","addr":4294967296,"region_size":67108864,"block_size":2097152,"requested_size":8388608},{"device":"virtio-iommu","id":"viommu0","page_size_mask":18446744073709547520,"input_start":0,"input_end":18446744073709551615,"domain_start":0,"domain_end":1023,"bypass":false,"endpoints":[8]}]}"#,
        PLUG,
        r#"{"dev":"viommu0","op":"attach","domain":1,"endpoint":8}"#,
        r#"{"dev":"viommu0","op":"map","domain":1,"virt_start":0,"virt_end":2097151,"phys_start":4294967296,"flags":3,"resp":"ok"}"#,
        r#"{"dev":"viommu0","op":"map","domain":1,"virt_start":4194304,"virt_end":4198399,"phys_start":4299161600,"flags":3,"resp":"inval"}"#,
        r#"{"dev":"vmem0","op":"unplug","addr":4294967296,"nb_blocks":1}"#,
        r#"{"dev":"vmem0","op":"unplug_all"}"#,
        r#"{"dev":"viommu0","op":"unmap","domain":1,"virt_start":0,"virt_end":2097151}"#,
    ]
    .join("\n");
    let path = write_trace("hostile.jsonl", &text);
    let o = memvisor(&[path.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report = json(&o);
    assert_eq!(report["refused_maps"], 1);
    assert_eq!(report["busy_unplugs"], 2);
    assert_eq!(report["plugged_size"], 2 << 20);
    assert_eq!(report["pinned_bytes"], 0);
    let o = memvisor(&[path.to_str().unwrap(), "--viommu-guard", "warn", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report = json(&o);
    assert_eq!(report["busy_unplugs"], 0);
    assert_eq!(report["plugged_size"], 0);
    assert_eq!(report["pinned_bytes"], 0);
}

#[test]
fn vfio_without_a_group_fails_cleanly() {
    let o = memvisor(&["--dma", "vfio"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("MEMVISOR_VFIO_GROUP"), "{}", stderr(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["replay", "--dma", "vfio"])
        .env("MEMVISOR_VFIO_GROUP", "4242")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--dma vfio: "), "{}", stderr(&o));
}

#[test]
fn the_pin_budget_is_enforced() {
    // 1 GiB of boot RAM does not fit in 64 MiB: the assigned device cannot attach.
    let o = memvisor(&["--pin-budget", "64M"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pin budget exceeded"), "{}", stderr(&o));
}

#[test]
fn migrating_every_7_events_changes_no_result() {
    // The command line's plumbing of --migrate-every, on one trace of each
    // device; the engine's own tests replay every trace migrating
    // (crates/devtrace/tests).
    let cases = [
        ("vmem-resize.jsonl", "none"),
        ("vmem-resize.jsonl", "uring"),
        ("viommu-dma-strict.jsonl", "uring"),
    ];
    for (name, dma) in cases {
        let plain = replays_clean(name, dma);
        let o = memvisor(&[&trace_path(name), "--dma", dma, "--migrate-every", "7", "--json"]);
        assert_eq!(o.status.code(), Some(0), "{name} --dma {dma}: {}", stderr(&o));
        let migrated = json(&o);
        assert_eq!(migrated["mismatches"], 0, "{migrated}");
        for field in [
            "events",
            "requests",
            "checked",
            "refused_maps",
            "busy_unplugs",
            "plugged_size",
            "pinned_bytes",
        ] {
            assert_eq!(migrated[field], plain[field], "{name} --dma {dma}: {field}");
        }
        let events = plain["events"].as_u64().unwrap();
        assert_eq!(migrated["migrations"], (events - 1) / 7, "{name}");
        assert!(migrated["migration_bytes"].as_u64().unwrap() > 0);
    }
    let o = memvisor(&["--migrate-every", "0"]);
    assert_eq!(o.status.code(), Some(2), "0 is refused");
}
