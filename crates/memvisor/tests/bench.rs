//! `memvisor bench --quick --json` runs every figure and prints one
//! well-formed JSON object. No time is asserted: the quick run only checks
//! the command and the shape (and the stream-size bound, which is bytes).

use std::process::Command;

#[test]
fn quick_bench_prints_every_figure_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["bench", "--quick", "--json"])
        .output()
        .expect("memvisor runs");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("a line of output");
    let v: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");
    for key in [
        "viommu_map_unmap_4k",
        "viommu_map_unmap_2m",
        "vmem_plug_unplug",
        "populated_check",
        "populated_replay",
        "migration",
    ] {
        let f = &v[key];
        for field in ["ours_ns", "floor_ns", "ratio"] {
            let x = f[field].as_f64().unwrap_or_else(|| panic!("{key}.{field} in {f}"));
            assert!(x > 0.0 && x.is_finite(), "{key}.{field} = {x}");
        }
    }
    // The vIOMMU figures carry the bound they are judged against (README).
    for key in ["viommu_map_unmap_4k", "viommu_map_unmap_2m"] {
        for field in ["no_dma_ns", "no_dma_with_floor_ns"] {
            let x = v[key][field].as_u64().unwrap_or_else(|| panic!("{key}.{field}"));
            assert!(x > 0, "{key}.{field} = {x}");
        }
        // And the ratio of the DMA layer's path to that bound, judged on its own.
        let ours = v[key]["ours_ns"].as_f64().unwrap();
        let bound = v[key]["no_dma_with_floor_ns"].as_f64().unwrap();
        let ratio = v[key]["dma_layer_ratio"]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}.dma_layer_ratio"));
        assert!(
            (ratio - ours / bound).abs() < 0.01,
            "{key}: {ratio} for {ours} / {bound}"
        );
        assert_eq!(v[key]["dma_layer_target"].as_f64(), Some(1.10));
        assert_eq!(v[key]["dma_layer_met"].as_bool(), Some(ratio <= 1.10));
    }
    assert!(v["populated_replay"]["runs"].as_u64().unwrap() > 1000);
    let stream = v["migration"]["stream_bytes"].as_u64().unwrap();
    let populated = v["migration"]["populated_bytes"].as_u64().unwrap();
    assert!(populated > 0);
    assert!(
        stream as f64 <= 1.01 * populated as f64 + 65536.0,
        "stream {stream} bytes for {populated} populated bytes"
    );
}

#[test]
fn an_unknown_figure_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["bench", "--only", "nosuch"])
        .output()
        .expect("memvisor runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("viommu_map_unmap_4k"));
}

/// `memvisor bench --instructions --quick --json` counts with callgrind:
/// the figures are instructions, which repeat, so their relations are
/// asserted (the targets themselves are reported, not asserted).
#[test]
fn instruction_counts_are_reported_and_consistent() {
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["bench", "--instructions", "--quick", "--json"])
        .output()
        .expect("memvisor runs");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let n = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    // The device side is part of the pair; pinning adds to the device side.
    assert!(
        n("device_no_dma") > 1000.0 && n("device_no_dma") < n("pair_no_dma"),
        "{v}"
    );
    assert!(n("device_full") < n("pair_full"), "{v}");
    assert_eq!(n("dma_layer"), n("device_full") - n("device_no_dma"), "{v}");
    assert!(n("dma_layer") > 0.0, "{v}");
    assert!(n("device_full_100_live") > 0.0 && n("scaling_ratio") > 0.5, "{v}");
    assert_eq!(
        (n("dma_layer_target"), n("device_full_target"), n("scaling_target")),
        (700.0, 4000.0, 1.2)
    );
}
