//! System tests; the test files are in `tests/tests/`. The helpers they share live here, once:
//! the project's binaries, starting a bridge and waiting for it, serialising lab runs, and
//! showing the lab's progress.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Lab VMs and kill-and-restart runs are serialised: on a 2-core machine they only slow each
/// other down, blur the timings the tests print, and stretch the windows the recovery tests
/// depend on. Also turns the lab's progress log on.
pub fn lab_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    init_logging();
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shows the lab's progress (`tracing` events) on the test's output, once per test binary.
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .try_init();
    });
}

/// A release binary of the project, built on first use.
pub fn bin(name: &str) -> PathBuf {
    vfblk_lab::project_bin_dir()
        .expect("building the project's binaries")
        .join(name)
}

/// Starts `vfblk-bridge` on `socket` with `args` (its stderr appended to `log`) and waits
/// until it listens.
pub fn start_bridge(socket: &Path, args: &[&str], log: &Path) -> Child {
    let bin_dir = vfblk_lab::project_bin_dir().expect("building the project's binaries");
    vfblk_lab::process::start_bridge(&bin_dir, socket, args, log)
        .unwrap_or_else(|e| panic!("starting vfblk-bridge: {e}"))
}

/// Waits (up to 10 s) until process `pid` is gone or a zombie.
pub fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('Z')) =>
            {
                return
            }
            Ok(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    panic!("process {pid} did not end within 10 s");
}

/// A load generator running until [`finish`]; killed if a test ends without it.
pub struct Load(Option<Child>);

impl From<Child> for Load {
    /// Any load tool with `--json` and its stdout piped (ended by [`finish`]).
    fn from(child: Child) -> Self {
        Self(Some(child))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A load generator in verify mode on `socket` (2 queues, QD 16, mixed), listing every gap
/// between completions over 0.2 ms with its time, until [`finish`].
pub fn verifying_load(socket: &Path) -> Load {
    verifying_load_with(socket, &[])
}

/// [`verifying_load`] with more arguments for the load generator.
pub fn verifying_load_with(socket: &Path, extra: &[&str]) -> Load {
    Load(Some(
        Command::new(bin("vfblk-loadgen"))
            .arg("--socket")
            .arg(socket)
            .args([
                "--queues",
                "2",
                "--qd",
                "16",
                "--rw",
                "mixed",
                "--verify",
                "--json",
                "--seconds",
                "600",
                "--log-gaps-over-ms",
                "0.2",
                "--reconnect-timeout-s",
                "20",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting vfblk-loadgen"),
    ))
}

/// Ends a load generator (SIGTERM) and returns its report.
pub fn finish(mut load: Load) -> Value {
    let child = load.0.take().expect("a running load generator");
    // SAFETY: SIGTERM to the load generator this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().expect("load generator");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("load generator printed {text:?}: {e}"))
}

/// A load generator's report without its bulky lists, for messages.
pub fn without_bulk(r: &Value) -> Value {
    let mut r = r.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("lat_cdf_us");
        o.remove("gaps");
    }
    r
}

/// Asserts a report has I/O and no error, loss, double completion or reconnect.
pub fn assert_no_error_nor_reconnect(r: &Value) {
    for key in [
        "verify_errors",
        "failed",
        "lost",
        "not_a_head",
        "reconnects",
    ] {
        assert_eq!(r[key], 0, "{key}: {}", without_bulk(r));
    }
    assert!(r["ios"].as_u64().unwrap_or(0) > 0, "{}", without_bulk(r));
}

pub use vfblk_vhost::poller::monotonic_ns;

/// Per window (CLOCK_MONOTONIC ns), the longest gap any of the reports saw that overlaps it.
pub fn pauses_seen(reports: &[Value], windows: &[(u64, u64)]) -> Vec<f64> {
    let gaps: Vec<(u64, f64)> = reports
        .iter()
        .flat_map(|r| r["gaps"].as_array().cloned().unwrap_or_default())
        .filter_map(|g| Some((g[0].as_u64()?, g[1].as_f64()?)))
        .collect();
    windows
        .iter()
        .map(|&(start, end)| {
            gaps.iter()
                .filter(|&&(gap_end, ms)| {
                    gap_end >= start && gap_end.saturating_sub((ms * 1e6) as u64) <= end
                })
                .map(|&(_, ms)| ms)
                .fold(0.0, f64::max)
        })
        .collect()
}

/// "p50 / p99 / max" of milliseconds.
pub fn percentiles(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    format!(
        "p50 {:.2} / p99 {:.2} / max {:.2} ms",
        at(0.5),
        at(0.99),
        v[v.len() - 1]
    )
}

/// Calls `method` on a target's RPC socket.
pub fn rpc_call(socket: &Path, method: &str, params: Value) -> Result<Value, String> {
    vfblk_control::rpc::Client::connect(socket)
        .and_then(|mut c| c.call(method, params))
        .map_err(|e| e.to_string())
}

/// Creates a 32 MiB backend `name` — `mem` in /dev/shm, or a `file` in `dir` — and a
/// controller of the same name with 2 queues on it, through the RPC socket `rpc`; returns
/// the controller's socket (in `dir`).
pub fn add_disk(rpc: &Path, dir: &Path, name: &str, kind: &str) -> PathBuf {
    let path = match kind {
        "mem" => shm_disk(dir, name),
        _ => dir.join(format!("{name}.img")),
    };
    add_disk_at(rpc, dir, name, kind, &path)
}

/// [`add_disk`] with the backend's file at `path`.
pub fn add_disk_at(rpc: &Path, dir: &Path, name: &str, kind: &str, path: &Path) -> PathBuf {
    rpc_call(
        rpc,
        "backend_create",
        serde_json::json!({"name": name, "kind": kind, "path": path, "size": 32 << 20}),
    )
    .unwrap_or_else(|e| panic!("backend_create {name}: {e}"));
    let socket = dir.join(format!("{name}.sock"));
    rpc_call(
        rpc,
        "vhost_blk_create",
        serde_json::json!({"name": name, "socket": socket, "backend": name, "queues": 2}),
    )
    .unwrap_or_else(|e| panic!("vhost_blk_create {name}: {e}"));
    socket
}

/// Where [`add_disk`] puts a RAM disk for a test running in `dir` (removed with it by
/// [`remove_test_dir`]).
pub fn shm_disk(dir: &Path, name: &str) -> PathBuf {
    let test = dir
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    PathBuf::from(format!("/dev/shm/{test}-{name}"))
}

/// Removes `dir` and the RAM disks [`add_disk`] made for it.
pub fn remove_test_dir(dir: &Path) {
    let test = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for entry in std::fs::read_dir("/dev/shm")
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{test}-"))
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts `vfblk-keeper` (its own `keeper_args`, then `--`) keeping `vfblk-bridge` with
/// `bridge_args` and `--rpc DIR/rpc.sock`, both logging to `DIR/target.log`, with `env` for
/// both; returns once the target's RPC socket listens. The keeper's stdout (its JSON
/// summary) is piped.
pub fn start_keeper(
    dir: &Path,
    keeper_args: &[&str],
    bridge_args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> Child {
    let log = std::fs::File::create(dir.join("target.log")).unwrap();
    let rpc = dir.join("rpc.sock");
    let mut command = Command::new(bin("vfblk-keeper"));
    command
        .arg("--dir")
        .arg(dir.join("keep"))
        .arg("--json")
        .args(keeper_args)
        .arg("--")
        .arg(bin("vfblk-bridge"))
        .args(bridge_args)
        .arg("--rpc")
        .arg(&rpc)
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdout(Stdio::piped())
        .stderr(log);
    vfblk_lab::process::spawn_listening(command, &rpc, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("starting the keeper: {e}"))
}
