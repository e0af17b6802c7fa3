//! Every shipped scenario reads, with its guest script, before anything
//! boots.

use std::path::Path;

use memvisor_lab::Scenario;

#[test]
fn every_shipped_scenario_parses_with_its_script() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            scenario
                .guest_script(&dir, None)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            names.push(scenario.name.clone());
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "blk-zero-copy",
            "blk-zero-copy-viommu",
            "boot",
            "bypass",
            "live-migrate",
            "live-migrate-corrupt",
            "live-migrate-kill-dest",
            "live-migrate-repeat",
            "poweroff",
            "reboot",
            "snapshot-restore",
            "unplugged-access",
            "vfio-nvme",
            "vfio-nvme-viommu",
            "vfio-nvme-viommu-strict",
            "viommu",
            "vmem-resize"
        ],
        "the scenarios the README lists"
    );
}
