//! Our NVMe driver against the kernel's: `vfblk-nvme perf` and fio with io_uring on the
//! kernel nvme driver, 4 KiB random reads at QD1 and QD32, in the same lab guest on the same
//! emulated controller.

use std::time::Duration;

use vfblk_lab::scenario::{self, Contents, Lab};
use vfblk_lab::vm::Echo;

use crate::Result;

/// fio's figures for one queue depth: IOPS, p50, p99, p99.9 (µs).
type FioFigures = (f64, f64, f64, f64);

/// Options of the NVMe benchmark.
#[derive(Debug, Clone)]
pub struct NvmeBenchOptions {
    /// Seconds per run.
    pub seconds: u32,
    /// Print JSON instead of a table.
    pub json: bool,
}

/// Boots the lab guest, runs our driver's perf and fio (io_uring on the kernel's nvme
/// driver) on the same controller, and prints the table (or JSON).
pub fn bench(o: &NvmeBenchOptions) -> Result<()> {
    let (seconds, json) = (o.seconds, o.json);
    let lab = Lab::new("bench-nvme")?;
    let contents = Contents {
        fio: true,
        nested: false,
        qemu10: false,
        boot_disk: false,
        qsd: false,
    };
    let total = Duration::from_secs(u64::from(seconds) * 6 + 180);
    let retried = lab.run_l2(
        &scenario::nvme_bench_script(seconds),
        contents,
        1024,
        total,
        Echo::Steps,
    )?;
    let run = &retried.run;
    run.expect_success("NVMe benchmark")?;
    let ours = |qd: u32| {
        run.record(&format!("ours_qd{qd}"))
            .cloned()
            .unwrap_or_default()
    };
    let fio = |qd: u32| {
        let job = run
            .record(&format!("fio_qd{qd}"))
            .map(|f| f["jobs"][0]["read"].clone())
            .unwrap_or_default();
        let pct = |p: &str| job["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1000.0;
        (
            job["iops"].as_f64().unwrap_or(f64::NAN),
            pct("50.000000"),
            pct("99.000000"),
            pct("99.900000"),
        )
    };
    let rows: Vec<(u32, serde_json::Value, FioFigures)> =
        [1, 32].iter().map(|&qd| (qd, ours(qd), fio(qd))).collect();
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|(qd, o, f)| serde_json::json!({"qd": qd, "ours": o, "fio_io_uring": {"iops": f.0, "p50_us": f.1, "p99_us": f.2, "p999_us": f.3}}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"seconds": seconds, "rows": out, "fio_command": run.record("fio_command")})
        );
        return Ok(());
    }
    println!("4 KiB random read, {seconds} s each, one thread/job, same TCG guest (2 vCPUs) and emulated controller:");
    println!(
        "  QD  {:<28} {:>9} {:>9} {:>9} {:>9}  ratio",
        "", "IOPS", "p50 us", "p99 us", "p99.9 us"
    );
    for (qd, o, f) in &rows {
        let oi = o["iops"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {qd:>2}  {:<28} {:>9.0} {:>9.1} {:>9.1} {:>9.1}",
            "vfblk-nvme perf (VFIO, polled)",
            oi,
            o["lat_p50_us"].as_f64().unwrap_or(f64::NAN),
            o["lat_p99_us"].as_f64().unwrap_or(f64::NAN),
            o["lat_p999_us"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "  {qd:>2}  {:<28} {:>9.0} {:>9.1} {:>9.1} {:>9.1}  {:.2}x",
            "fio io_uring (kernel nvme)",
            f.0,
            f.1,
            f.2,
            f.3,
            oi / f.0
        );
        println!(
            "      heap allocations while measuring (ours): {}",
            o["allocations"]
        );
    }
    Ok(())
}
