//! The benchmark suite on a machine without the peers: it runs our backends and
//! qemu-storage-daemon under both clients, says which peers it skipped and why, and writes
//! the JSON, the markdown table and the plots.

use std::process::Command;

use serde_json::Value;
use vfblk_tests::{bin, lab_lock};

/// Runs `vfblk-bench suite` with `args` (the machine held: backends and clients are pinned
/// to the two cores) into a fresh directory named after `name`; its JSON, its markdown and
/// the directory (removed by the caller).
fn suite(name: &str, args: &[&str]) -> (Value, String, std::path::PathBuf) {
    let out = std::env::temp_dir().join(format!("vfblk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(bin("vfblk-bench"))
        .arg("suite")
        .arg("--out")
        .arg(&out)
        .args(args)
        .output()
        .expect("running vfblk-bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "vfblk-bench suite failed: {stderr}");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("suite.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(out.join("suite.md")).unwrap();
    (json, md, out)
}

#[test]
fn the_suite_runs_without_peers_and_writes_table_json_and_plots() {
    let _lock = lab_lock();
    let (json, md, out) = suite(
        "bench-suite",
        &[
            "--seconds",
            "0.5",
            "--backends",
            "vfblk-null,qsd-null,vfblk-mem,spdk-null,ch-file",
            "--workloads",
            "randread-4k-qd1,randread-4k-qd32",
            "--restarts",
            "2",
            "--fixed-rate",
            "50000",
            "--fixed-rate-rounds",
            "2",
        ],
    );
    let skipped: Vec<&str> = json["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["backend"].as_str().unwrap())
        .collect();
    assert_eq!(skipped, ["spdk-null", "ch-file"], "{}", json["skipped"]);
    let rows = json["measurements"].as_array().unwrap();
    // 3 backends x 2 clients x 2 workloads, each with a clean report and its commands.
    assert_eq!(rows.len(), 12, "{json:#}");
    for r in rows {
        assert!(r["error"].is_null(), "{r}");
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["backend_cpu_ns_per_io"].as_f64().unwrap() > 0.0, "{r}");
        assert!(
            r["backend_command"]
                .as_str()
                .unwrap()
                .starts_with("taskset -c 1 "),
            "{r}"
        );
        assert!(r["report"]["lat_p99_us"].as_f64().unwrap() > 0.0, "{r}");
    }
    // The client's ceiling is its best figure on a null backend, which is marked bound.
    for client in ["loadgen", "libblkio"] {
        let best = rows
            .iter()
            .filter(|r| r["client"] == client && r["workload"] == "randread-4k-qd32")
            .filter(|r| r["backend_kind"] == "null")
            .max_by(|a, b| {
                a["iops"]
                    .as_f64()
                    .unwrap()
                    .total_cmp(&b["iops"].as_f64().unwrap())
            })
            .unwrap();
        assert_eq!(best["client_bound"], true, "{best}");
        assert_eq!(best["client_ceiling_iops"], best["iops"], "{best}");
    }
    // Two SIGKILLs of the mem backend under a verifying client: two reconnects, each pause
    // measured, nothing lost or wrong.
    let restarts = json["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 1, "{}", json["restarts"]);
    let r = &restarts[0]["report"];
    assert_eq!(restarts[0]["backend"], "vfblk-mem", "{r}");
    assert_eq!(r["reconnects"], 2, "{r}");
    assert_eq!(r["pauses_ms"].as_array().unwrap().len(), 2, "{r}");
    for key in ["verify_errors", "lost", "failed", "not_a_head"] {
        assert_eq!(r[key], 0, "{key}: {r}");
    }
    // 1, 4 and 16 controllers of one target on one poller, polling and interrupt-driven,
    // then 16 idle frontends: the target must not spin for them.
    let scale = &json["scale"];
    let scale_rows = scale["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{scale}"));
    let counts: Vec<u64> = scale_rows
        .iter()
        .map(|r| r["controllers"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [1, 4, 16, 1, 4, 16], "{scale}");
    for r in scale_rows {
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["busy_ns_per_io"].as_f64().unwrap() > 0.0, "{r}");
    }
    let idle = scale["idle_16_cpu_percent"].as_f64().unwrap();
    assert!(idle < 10.0, "16 idle controllers cost {idle}% of a core");
    // Ours held at a fixed rate, by its poller's busy time per I/O; SPDK's side says why
    // it is missing.
    let fixed = &json["fixed_rate"];
    assert_eq!(fixed["spdk_missing"], "no --spdk given", "{fixed}");
    let pairs = fixed["pairs"]
        .as_array()
        .unwrap_or_else(|| panic!("{fixed}"));
    let ours: Vec<&str> = pairs.iter().map(|p| p["ours"].as_str().unwrap()).collect();
    assert_eq!(ours, ["vfblk-null", "vfblk-mem-huge"], "{fixed}");
    for p in pairs {
        let rounds = p["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 2, "{p}");
        for r in rounds {
            let ours = &r["ours"];
            assert!(ours["ns_per_io"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
            // The machine's state around it: a cache line's round trip between the cores.
            let trips = ours["core_round_trip_ns"].as_array().unwrap();
            assert!(trips.iter().all(|t| t.as_f64().unwrap() > 0.0), "{r}");
            // Paced, not at the client's ceiling: within a tenth of the rate asked.
            let iops = ours["iops"].as_f64().unwrap_or(0.0);
            assert!((45_000.0..=55_000.0).contains(&iops), "{r}");
            assert!(r["spdk"].is_null(), "{r}");
        }
        assert_eq!(p["every_round_within_target"], false, "{p}");
    }
    for want in [
        "skipped SPDK vhost null bdev: no --spdk given",
        "skipped cloud-hypervisor vhost_user_block (/dev/shm): no --cloud-hypervisor given",
        "## Client: vfblk-loadgen",
        "## Client: libblkio",
        "| random 4 KiB read, QD32 |",
        "![iops-by-depth-randread-loadgen.png](iops-by-depth-randread-loadgen.png)",
        "## Restarts: SIGKILL",
        "## Many controllers on one poller",
        "## Cost per I/O at a fixed rate",
        "SPDK not measured: no --spdk given.",
    ] {
        assert!(md.contains(want), "suite.md lacks {want:?}:\n{md}");
    }
    for plot in [
        "iops-by-depth-randread-loadgen.png",
        "iops-by-depth-randread-libblkio.png",
        "latency-randread-4k-qd1-loadgen.png",
        "latency-randread-4k-qd32-libblkio.png",
        "restart-pauses.png",
    ] {
        let bytes = std::fs::read(out.join(plot)).unwrap_or_else(|e| panic!("{plot}: {e}"));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
            "{plot}: not a drawn PNG ({} bytes)",
            bytes.len()
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// The hot-path rules, measured: while a polling client drives the null backend, the request
/// path allocates nothing per I/O and the poller makes no system call per I/O.
#[test]
fn the_null_path_makes_no_allocation_or_system_call_per_io() {
    let _lock = lab_lock();
    let run = Command::new(bin("vfblk-bench"))
        .args(["cost", "--seconds", "2", "--json"])
        .output()
        .expect("running vfblk-bench cost");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "vfblk-bench cost failed: {stderr}");
    let cost: Value = serde_json::from_slice(&run.stdout).unwrap();
    eprintln!("cost per I/O: {cost}");
    assert!(cost["callgrind_ios"].as_u64().unwrap() > 1000, "{cost}");
    assert!(cost["strace_ios"].as_u64().unwrap() > 10_000, "{cost}");
    let per_io = |k: &str| cost[k].as_f64().unwrap();
    // Warm-up growth of a buffer may allocate a few times in a run; per I/O it must not.
    assert!(per_io("allocations_per_io") < 0.001, "{cost}");
    assert!(per_io("syscalls_per_io") < 0.001, "{cost}");
    let instructions = per_io("instructions_per_io");
    assert!(
        (50.0..20_000.0).contains(&instructions),
        "callgrind measured {instructions} instructions per I/O: {cost}"
    );
}

/// The lab's NVMe path in the suite: one lab guest, its emulated controller served over
/// vhost-user by our NVMe backend, by qemu-storage-daemon's own VFIO driver and through the
/// guest kernel's driver (qemu-storage-daemon and our file backend), every workload clean.
#[test]
fn the_suite_measures_the_lab_nvme_path_four_ways() {
    let _lock = lab_lock();
    let (json, md, out) = suite(
        "bench-nvme-lab",
        &[
            "--seconds",
            "1",
            "--backends",
            "vfblk-null",
            "--workloads",
            "randread-4k-qd1",
            "--clients",
            "loadgen",
            "--restarts",
            "0",
            "--no-scale",
            "--fixed-rate",
            "0",
            "--nvme-lab",
        ],
    );
    assert!(json["scale"].is_null(), "--no-scale: {}", json["scale"]);
    assert!(json["fixed_rate"].is_null(), "{}", json["fixed_rate"]);
    let lab = &json["nvme_lab"];
    eprintln!("{lab:#}");
    let rows = lab["rows"].as_array().unwrap_or_else(|| panic!("{lab}"));
    assert_eq!(rows.len(), 12, "4 backends x 3 workloads: {lab}");
    for backend in [
        "vfblk-nvme",
        "qsd-nvme",
        "qsd-kernel-nvme",
        "vfblk-file-kernel-nvme",
    ] {
        let mine: Vec<&Value> = rows.iter().filter(|r| r["backend"] == backend).collect();
        assert_eq!(mine.len(), 3, "{backend}: {lab}");
        for r in mine {
            assert!(r["error"].is_null(), "{r}");
            assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
            assert_eq!(r["report"]["failed"], 0, "{r}");
            assert!(r["backend_cpu_ns_per_io"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    for want in [
        "## The lab's NVMe path (TCG-bound)",
        "| randwrite-4k-qd32 |",
        "driver=nvme,node-name=d0,device=$bdf",
    ] {
        assert!(md.contains(want), "suite.md lacks {want:?}:\n{md}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
