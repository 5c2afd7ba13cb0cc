//! The vhost-user-blk benchmark: the load generator against our bridge (mem backend) and
//! against qemu-storage-daemon's vhost-user-blk export, on the same data file, one backend
//! core each, in one run.

use std::path::Path;
use std::process::{Command, Stdio};

use vfblk_lab::process::{spawn_listening, LISTEN_TIMEOUT};

use crate::{Error, Result};

const NULL_OURS: &str = "vfblk-bridge (null backend, polled)";
const NULL_QSD: &str = "qemu-storage-daemon (null-co)";
const FILE_OURS: &str = "vfblk-bridge (file backend, io_uring, polled)";
const FILE_QSD: &str = "qemu-storage-daemon (file, aio=io_uring)";

/// One measured backend.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// What ran.
    pub name: String,
    /// The backend's command line.
    pub backend_command: String,
    /// The load generator's report.
    pub report: serde_json::Value,
}

/// Runs the load generator (pinned to CPU 0) against `backend` (pinned to CPU 1).
fn measure(
    bin_dir: &Path,
    socket: &Path,
    backend: &[String],
    loadgen: &[&str],
) -> Result<serde_json::Value> {
    let mut command = Command::new("taskset");
    command
        .args(["-c", "1"])
        .args(backend)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = spawn_listening(command, socket, LISTEN_TIMEOUT)?;
    let result = (|| {
        let out = Command::new("taskset")
            .args(["-c", "0"])
            .arg(bin_dir.join("vfblk-loadgen"))
            .arg("--socket")
            .arg(socket)
            .args(loadgen)
            .arg("--json")
            .output()
            .map_err(|source| Error::Io {
                what: "running vfblk-loadgen".into(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        serde_json::from_str(text.trim())
            .map_err(|e| Error::Run(format!("load generator printed {text:?}: {e}")))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Runs both backends on `data` (a file of `size_mib` MiB, created if missing).
pub fn run(
    bin_dir: &Path,
    dir: &Path,
    data: &Path,
    size_mib: u64,
    loadgen: &[&str],
) -> Result<Vec<BenchRow>> {
    let io = |source| Error::Io {
        what: format!("creating {}", data.display()),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data)
        .map_err(io)?;
    file.set_len(size_mib << 20).map_err(io)?;
    drop(file);
    let socket = dir.join("bench.sock");
    let s = |x: &str| x.to_string();
    let ours = vec![
        bin_dir.join("vfblk-bridge").display().to_string(),
        s("--socket"),
        socket.display().to_string(),
        s("--backend"),
        format!("mem:{}:{}M", data.display(), size_mib),
        s("--poll"),
    ];
    let ours_file = vec![
        bin_dir.join("vfblk-bridge").display().to_string(),
        s("--socket"),
        socket.display().to_string(),
        s("--backend"),
        format!("file:{}", data.display()),
        s("--poll"),
    ];
    let qsd = vec![
        s("qemu-storage-daemon"),
        s("--blockdev"),
        format!("driver=file,filename={},node-name=d0,aio=io_uring", data.display()),
        s("--export"),
        format!("type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues=1", socket.display()),
    ];
    let ours_null = vec![
        bin_dir.join("vfblk-bridge").display().to_string(),
        s("--socket"),
        socket.display().to_string(),
        s("--backend"),
        format!("null:{size_mib}M"),
        s("--poll"),
    ];
    let qsd_null = vec![
        s("qemu-storage-daemon"),
        s("--blockdev"),
        format!("driver=null-co,node-name=d0,size={}", size_mib << 20),
        s("--export"),
        format!("type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues=1", socket.display()),
    ];
    let mut rows = Vec::new();
    // Like with like: the null backends (no data moved), then a file on /dev/shm through
    // io_uring; the RAM disk last (qemu-storage-daemon has no RAM disk to set beside it).
    for (name, cmd) in [
        (NULL_OURS, ours_null),
        (NULL_QSD, qsd_null),
        (FILE_OURS, ours_file),
        (FILE_QSD, qsd),
        ("vfblk-bridge (mem backend, polled)", ours),
    ] {
        tracing::info!("bench: {name}");
        let report = measure(bin_dir, &socket, &cmd, loadgen)?;
        rows.push(BenchRow {
            name: name.to_string(),
            backend_command: format!("taskset -c 1 {}", cmd.join(" ")),
            report,
        });
    }
    Ok(rows)
}

/// Options of the vhost-user-blk benchmark.
#[derive(Debug, Clone)]
pub struct VhostBenchOptions {
    /// Seconds per backend.
    pub seconds: u32,
    /// Requests in flight.
    pub qd: u32,
    /// Print JSON instead of a table.
    pub json: bool,
}

/// Runs the benchmark and prints its table (or JSON).
pub fn bench(o: &VhostBenchOptions) -> Result<()> {
    let bin_dir = vfblk_lab::sibling_bin_dir()?;
    let dir = vfblk_lab::run_dir("bench-vhost")?;
    let data = std::path::PathBuf::from(format!("/dev/shm/vfblk-bench-{}", std::process::id()));
    let (secs, depth) = (o.seconds.to_string(), o.qd.to_string());
    let loadgen = [
        "--rw",
        "read",
        "--bs",
        "4096",
        "--qd",
        depth.as_str(),
        "--queues",
        "1",
        "--seconds",
        secs.as_str(),
    ];
    let rows = run(&bin_dir, &dir, &data, 256, &loadgen);
    let _ = std::fs::remove_file(&data);
    let rows = rows?;
    let loadgen_cmd = format!(
        "taskset -c 0 vfblk-loadgen --socket SOCKET {} --json",
        loadgen.join(" ")
    );
    if o.json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::json!({"name": r.name, "backend_command": r.backend_command, "report": r.report}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"loadgen_command": loadgen_cmd, "rows": out})
        );
        return Ok(());
    }
    let (seconds, qd) = (o.seconds, o.qd);
    println!("4 KiB random read, QD{qd}, 1 queue, {seconds} s, on a 256 MiB file in /dev/shm; backend pinned to CPU 1, load generator to CPU 0:");
    println!(
        "  {:<44} {:>10} {:>9} {:>9} {:>9}",
        "backend", "IOPS", "p50 us", "p99 us", "p99.9 us"
    );
    for r in &rows {
        let f = |k: &str| r.report[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:<44} {:>10.0} {:>9.1} {:>9.1} {:>9.1}",
            r.name,
            f("iops"),
            f("lat_p50_us"),
            f("lat_p99_us"),
            f("lat_p999_us")
        );
    }
    let iops = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .and_then(|r| r.report["iops"].as_f64())
            .unwrap_or(f64::NAN)
    };
    println!(
        "  null backend / qemu-storage-daemon null-co: {:.2}x",
        iops(NULL_OURS) / iops(NULL_QSD)
    );
    println!(
        "  file backend / qemu-storage-daemon file (both io_uring on /dev/shm): {:.2}x",
        iops(FILE_OURS) / iops(FILE_QSD)
    );
    println!("  load generator: {loadgen_cmd}");
    for r in &rows {
        println!("  backend: {}", r.backend_command);
    }
    Ok(())
}
