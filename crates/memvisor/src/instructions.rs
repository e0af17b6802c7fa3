//! `memvisor bench --instructions`: instructions per MAP + UNMAP pair of
//! 4 KiB through the virtio-iommu, counted by callgrind, which repeats to
//! the instruction on this noisy machine where time does not.
//!
//! Each count runs this program again under
//! `valgrind --tool=callgrind --toggle-collect=*bench::map_unmap*` (a
//! hidden `bench-pairs` command: set up the machine, then `pairs` pairs
//! through [`map_unmap`](crate::bench)) and reads two figures from the
//! profile with `callgrind_annotate --inclusive=yes`:
//!
//! * **pair**: everything inside the measured pairs, the guest's side
//!   (building chains, reading answers) included;
//! * **device**: the inclusive cost of the device's `queue_notify`, the
//!   device side alone: popping, parsing, the request's effects, the DMA
//!   layer's notifications and pins, the used ring.
//!
//! On the pinning machine minus the one without a DMA backend, the device
//! figures give what memvisor's DMA layer (bridge, pinner, budget) adds per
//! pair. The scaling runs repeat the pinning count with 1,000 and 100,000
//! other live, pinned mappings in the same domain.

use std::path::Path;
use std::process::Command;

/// How many pairs each run counts.
const PAIRS: u64 = 200;

/// One callgrind count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Count {
    /// Instructions per pair, the guest's side included.
    pub pair: f64,
    /// Instructions per pair in the device's `queue_notify`.
    pub device: f64,
}

/// The figures of `memvisor bench --instructions`.
#[derive(Debug, Clone, PartialEq)]
pub struct Instructions {
    /// Pairs per count.
    pub pairs: u64,
    /// No DMA backend: the virtqueue and the device.
    pub no_dma: Count,
    /// io_uring pinning behind the bridge.
    pub full: Count,
    /// The full path's device side with this many other live mappings.
    pub scaling: Vec<(u64, Count)>,
}

impl Instructions {
    /// What the DMA layer adds to the device side per pair.
    pub fn dma_layer(&self) -> f64 {
        self.full.device - self.no_dma.device
    }

    /// The device side with the most live mappings over the one with none.
    pub fn scaling_ratio(&self) -> f64 {
        self.scaling.last().map_or(1.0, |(_, c)| c.device / self.full.device)
    }

    /// The figures as one JSON object, with their targets.
    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::json!({
            "pairs": self.pairs,
            "pair_no_dma": self.no_dma.pair.round(),
            "pair_full": self.full.pair.round(),
            "device_no_dma": self.no_dma.device.round(),
            "device_full": self.full.device.round(),
            // The difference of the rounded figures above, so that the
            // three agree exactly.
            "dma_layer": self.full.device.round() - self.no_dma.device.round(),
            "dma_layer_target": 700,
            "device_full_target": 4000,
            "scaling_ratio": (self.scaling_ratio() * 1000.0).round() / 1000.0,
            "scaling_target": 1.2,
        });
        for (live, c) in &self.scaling {
            o[format!("device_full_{live}_live")] = c.device.round().into();
        }
        o
    }
}

/// Counts every figure; `quick` uses 100 live mappings instead of 1,000
/// and 100,000.
pub fn count(quick: bool) -> Result<Instructions, String> {
    let this = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let no_dma = count_one(&this, "none", 0)?;
    let full = count_one(&this, "uring", 0)?;
    let lives: &[u64] = if quick { &[100] } else { &[1_000, 100_000] };
    let mut scaling = Vec::new();
    for &live in lives {
        scaling.push((live, count_one(&this, "uring", live)?));
    }
    Ok(Instructions {
        pairs: PAIRS,
        no_dma,
        full,
        scaling,
    })
}

/// One count: `dma` is `uring` or `none`.
fn count_one(this: &Path, dma: &str, live: u64) -> Result<Count, String> {
    let dir = std::env::temp_dir().join(format!("memvisor-callgrind-{}-{dma}-{live}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let out = dir.join("callgrind.out");
    let result = (|| {
        let run = Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg("--toggle-collect=*bench::map_unmap*")
            .arg(this)
            .args(["bench-pairs", dma, &live.to_string(), &PAIRS.to_string()])
            .output()
            .map_err(|e| format!("cannot run valgrind (is it installed?): {e}"))?;
        if !run.status.success() {
            return Err(format!(
                "the counted run ({dma}, {live} live mappings) failed: {}",
                String::from_utf8_lossy(&run.stderr)
            ));
        }
        let annotated = Command::new("callgrind_annotate")
            .args(["--inclusive=yes", "--threshold=100"])
            .arg(&out)
            .output()
            .map_err(|e| format!("cannot run callgrind_annotate: {e}"))?;
        parse(&String::from_utf8_lossy(&annotated.stdout), PAIRS)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Reads the total and the device's `queue_notify` from
/// `callgrind_annotate --inclusive=yes` output, per pair.
pub fn parse(annotated: &str, pairs: u64) -> Result<Count, String> {
    let number = |line: &str| -> Option<f64> {
        line.split_whitespace()
            .next()
            .and_then(|n| n.replace(',', "").parse::<f64>().ok())
    };
    let total = annotated
        .lines()
        .find(|l| l.contains("PROGRAM TOTALS"))
        .and_then(number)
        .ok_or("no PROGRAM TOTALS in callgrind_annotate's output")?;
    let device = annotated
        .lines()
        .find(|l| l.contains("VirtioIommu as") && l.contains("queue_notify"))
        .and_then(number)
        .ok_or("no VirtioIommu::queue_notify in callgrind_annotate's output")?;
    Ok(Count {
        pair: total / pairs as f64,
        device: device / pairs as f64,
    })
}

/// The hidden `bench-pairs DMA LIVE PAIRS` command the counts run.
pub fn pairs(dma: &str, live: u64, pairs: u64) -> Result<(), String> {
    let backend = match dma {
        "uring" => Some(memvisor_machine::DmaBackend::Uring),
        "none" => None,
        other => return Err(format!("bench-pairs: unknown DMA backend {other:?} (uring, none)")),
    };
    let mut scenario = crate::bench::ViommuMapUnmap::with_live_mappings(4096, backend, live);
    scenario.counted_pairs(pairs);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_total_and_the_device_side() {
        let annotated = "\
--------------------------------------------------------------------------------
Profile data file 'callgrind.out' (creator: callgrind-3.19.0)
--------------------------------------------------------------------------------
1,641,400 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                  file:function
--------------------------------------------------------------------------------
1,641,400 (100.0%)  ???:memvisor::bench::map_unmap [/x/memvisor]
  853,200 (51.98%)  ???:<memvisor_virtio_iommu::device::VirtioIommu as memvisor_virtio::device::VirtioDevice>::queue_notify [/x/memvisor]
";
        let c = parse(annotated, 200).unwrap();
        assert_eq!(c.pair, 8207.0);
        assert_eq!(c.device, 4266.0);
        assert!(parse("nothing", 200).unwrap_err().contains("PROGRAM TOTALS"));
    }
}
