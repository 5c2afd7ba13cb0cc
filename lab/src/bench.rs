//! The vhost-user-blk benchmark: the load generator against our bridge (mem backend) and
//! against qemu-storage-daemon's vhost-user-blk export, on the same data file, one backend
//! core each, in one run.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{LabError, Result};

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

fn wait_for(socket: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LabError::Setup(format!(
                "backend exited with {status} before listening"
            )));
        }
        if Instant::now() > deadline {
            return Err(LabError::Setup(format!(
                "no socket at {}",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Runs the load generator (pinned to CPU 0) against `backend` (pinned to CPU 1).
fn measure(
    bin_dir: &Path,
    socket: &Path,
    backend: &[String],
    loadgen: &[&str],
) -> Result<serde_json::Value> {
    let _ = std::fs::remove_file(socket);
    let mut child = Command::new("taskset")
        .args(["-c", "1"])
        .args(backend)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| LabError::Setup(format!("starting {}: {e}", backend[0])))?;
    let result = (|| {
        wait_for(socket, &mut child)?;
        let out = Command::new("taskset")
            .args(["-c", "0"])
            .arg(bin_dir.join("vfblk-loadgen"))
            .arg("--socket")
            .arg(socket)
            .args(loadgen)
            .arg("--json")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        serde_json::from_str(text.trim())
            .map_err(|e| LabError::Guest(format!("load generator printed {text:?}: {e}")))
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
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data)?;
    file.set_len(size_mib << 20)?;
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
    let mut rows = Vec::new();
    for (name, cmd) in [
        ("vfblk-bridge (mem backend, polled)", ours),
        ("qemu-storage-daemon (file, aio=io_uring)", qsd),
        ("vfblk-bridge (file backend, io_uring, polled)", ours_file),
    ] {
        eprintln!("bench: {name}");
        let report = measure(bin_dir, &socket, &cmd, loadgen)?;
        rows.push(BenchRow {
            name: name.to_string(),
            backend_command: format!("taskset -c 1 {}", cmd.join(" ")),
            report,
        });
    }
    Ok(rows)
}
