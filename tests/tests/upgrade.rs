//! Upgrades by hand-over: `upgrade` RPCs replace the target process under load generators
//! in verify mode, and no frontend may see an error, a lost request or a reconnect. Upgrades
//! that cannot happen (a binary that does not start, one that reads another state format,
//! one that fails or dies after the old process quiesced) leave the old process serving.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vfblk_bridge::target::rpc::Client;
use vfblk_tests::bin;

/// A target with an RPC socket, and the pid serving it now (it changes with each upgrade).
struct Target {
    dir: PathBuf,
    /// The process the test started (it ends at the first upgrade; reaped at the end).
    first: Child,
    pid: u32,
}

impl Target {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vfblk-upgrade-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("target.log")).unwrap();
        let mut command = Command::new(bin("vfblk-bridge"));
        command
            .arg("--rpc")
            .arg(dir.join("rpc.sock"))
            .args(["--pollers", "2"])
            .stdout(Stdio::null())
            .stderr(log);
        let first = vfblk_lab::process::spawn_listening(
            command,
            &dir.join("rpc.sock"),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("starting the target: {e}"));
        let pid = first.id();
        Self { dir, first, pid }
    }

    fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        Client::connect(&self.dir.join("rpc.sock"))
            .and_then(|mut c| c.call(method, params))
            .map_err(|e| vfblk_vhost::error_chain(&e))
    }

    /// A controller with two queues on backend `kind` ("mem" or "file").
    fn add_disk(&self, name: &str, kind: &str) -> PathBuf {
        let path = match kind {
            "mem" => PathBuf::from(format!(
                "/dev/shm/vfblk-upgrade-{name}-{}",
                std::process::id()
            )),
            _ => self.dir.join(format!("{name}.img")),
        };
        self.call(
            "backend_create",
            json!({"name": name, "kind": kind, "path": path, "size": 32 << 20}),
        )
        .unwrap();
        let socket = self.dir.join(format!("{name}.sock"));
        self.call(
            "vhost_blk_create",
            json!({"name": name, "socket": socket, "backend": name, "queues": 2}),
        )
        .unwrap();
        socket
    }

    /// Upgrades to `binary` (default: the same); the report, or the refusal.
    fn upgrade(&mut self, binary: Option<&Path>) -> Result<Value, String> {
        let params = match binary {
            Some(b) => json!({ "binary": b }),
            None => json!({}),
        };
        let report = self.call("upgrade", params)?;
        assert_eq!(report["old_pid"], self.pid, "{report}");
        let new_pid = report["new_pid"].as_u64().expect("new_pid") as u32;
        assert_ne!(new_pid, self.pid);
        // The old process exits once it answered.
        wait_gone(self.pid);
        self.pid = new_pid;
        Ok(report)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("target.log")).unwrap_or_default()
    }

    /// Open fds and resident private KiB of the serving process (the mem backend's disk is
    /// shared memory and grows the full RSS as the frontends touch it).
    fn footprint(&self) -> (usize, u64) {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0);
        let rss = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        (fds, rss)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the target process this test runs.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        wait_gone(self.pid);
        let _ = self.first.kill();
        let _ = self.first.wait();
        for entry in std::fs::read_dir("/dev/shm")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("vfblk-upgrade-")
                && name.ends_with(&format!("-{}", std::process::id()))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (up to 10 s) until process `pid` is gone or a zombie.
fn wait_gone(pid: u32) {
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
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    panic!("process {pid} did not end within 10 s");
}

/// A load generator in verify mode on `socket` (2 queues), until SIGTERM.
/// A load generator, killed if the test ends without [`finish`].
struct Load(Option<Child>);

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn loadgen(socket: &Path) -> Load {
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
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting vfblk-loadgen"),
    ))
}

/// Ends a load generator and returns its report.
fn finish(mut lg: Load) -> Value {
    let lg = lg.0.take().expect("a running load generator");
    // SAFETY: SIGTERM to the load generator this test started.
    unsafe { libc::kill(lg.id() as i32, libc::SIGTERM) };
    let out = lg.wait_with_output().expect("load generator");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("load generator printed {text:?}: {e}"))
}

fn assert_clean(r: &Value) {
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

fn without_bulk(r: &Value) -> Value {
    let mut r = r.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("lat_cdf_us");
        o.remove("gaps");
    }
    r
}

/// CLOCK_MONOTONIC in ns, as the load generator stamps its gaps.
fn now_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Per upgrade window, the longest gap a frontend saw that overlaps it.
fn pauses_seen(report: &Value, windows: &[(u64, u64)]) -> Vec<f64> {
    let gaps: Vec<(u64, f64)> = report["gaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|g| Some((g[0].as_u64()?, g[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
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

fn percentiles(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    format!(
        "p50 {:.2} / p99 {:.2} / max {:.2} ms",
        at(0.5),
        at(0.99),
        v[v.len() - 1]
    )
}

const UPGRADES: usize = 1000;

#[test]
fn a_thousand_upgrades_under_verifying_load_lose_nothing_and_reconnect_nothing() {
    let _lock = vfblk_tests::lab_lock();
    let mut target = Target::start("thousand");
    let sockets = [target.add_disk("m", "mem"), target.add_disk("f", "file")];
    let loads: Vec<Load> = sockets.iter().map(|s| loadgen(s)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut windows = Vec::with_capacity(UPGRADES);
    let mut target_pauses = Vec::with_capacity(UPGRADES);
    let mut early = None;
    let started = Instant::now();
    for i in 0..UPGRADES {
        let t0 = now_ns();
        let report = target
            .upgrade(None)
            .unwrap_or_else(|e| panic!("upgrade {}: {e}\n{}", i + 1, target.log()));
        windows.push((t0, now_ns()));
        assert_eq!(report["controllers"], 2, "{report}");
        assert_eq!(report["connections"], 2, "{report}");
        target_pauses.push(report["pause_ms"].as_f64().unwrap());
        if i == 19 {
            early = Some(target.footprint());
        }
    }
    let took = started.elapsed();
    // The frontends are still served by the last process.
    std::thread::sleep(Duration::from_millis(300));
    let (fds_early, rss_early) = early.unwrap();
    let (fds, rss) = target.footprint();
    let reports: Vec<Value> = loads.into_iter().map(finish).collect();
    for r in &reports {
        assert_clean(r);
    }
    let seen: Vec<f64> = reports
        .iter()
        .map(|r| pauses_seen(r, &windows))
        .fold(vec![0.0; windows.len()], |acc, p| {
            acc.iter().zip(p).map(|(a, b)| a.max(b)).collect()
        });
    eprintln!(
        "{UPGRADES} upgrades in {:.1} s: pause in the target {}; longest gap a frontend saw per upgrade {}; \
         fds {fds_early} -> {fds}, private RSS {rss_early} -> {rss} KiB; frontends: {} / {} I/Os",
        took.as_secs_f64(),
        percentiles(target_pauses),
        percentiles(seen.clone()),
        reports[0]["ios"],
        reports[1]["ios"],
    );
    assert_eq!(
        fds, fds_early,
        "open fds of the serving process after 20 and {UPGRADES} upgrades"
    );
    assert!(
        rss < rss_early + 8 * 1024,
        "private RSS {rss_early} -> {rss} KiB"
    );
    // A reconnect would have been counted above; a pause this long would be one in all but name.
    let worst = seen.iter().cloned().fold(0.0, f64::max);
    assert!(
        worst < 500.0,
        "a frontend waited {worst:.1} ms during an upgrade"
    );
}

/// A script that runs the bridge with `env` set: a "new binary" that behaves differently.
fn wrapper(dir: &Path, name: &str, env: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n{env} exec {} \"$@\"\n",
            bin("vfblk-bridge").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn refused_upgrades_leave_the_old_process_serving() {
    let _lock = vfblk_tests::lab_lock();
    let mut target = Target::start("refused");
    let socket = target.add_disk("m", "mem");
    let load = loadgen(&socket);
    std::thread::sleep(Duration::from_millis(300));
    let first_pid = target.pid;
    let cases = [
        (PathBuf::from("/bin/false"), "did not start"),
        (
            wrapper(
                &target.dir,
                "other-format",
                "VFBLK_TEST_HANDOVER_FORMATS=99",
            ),
            "reads hand-over formats [99]",
        ),
        (
            wrapper(&target.dir, "refuses", "VFBLK_TEST_HANDOVER_FAULT=refuse"),
            "refused by VFBLK_TEST_HANDOVER_FAULT",
        ),
        (
            wrapper(&target.dir, "dies", "VFBLK_TEST_HANDOVER_FAULT=die"),
            "closed the channel",
        ),
    ];
    for (binary, why) in &cases {
        let e = target
            .upgrade(Some(binary))
            .expect_err("the upgrade must be refused");
        assert!(e.contains(why), "{}: {e}", binary.display());
        // The same process serves on: its queues run again and RPCs are answered.
        let stats = target.call("stats", json!({})).unwrap();
        assert_eq!(stats["controllers"][0]["connected"], true, "{stats}");
        assert_eq!(target.pid, first_pid);
        std::thread::sleep(Duration::from_millis(200));
    }
    // And a good binary still takes over.
    target.upgrade(None).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let r = finish(load);
    assert_clean(&r);
    let log = target.log();
    assert_eq!(
        log.matches("upgrade called off, serving on").count(),
        cases.len(),
        "each refusal is logged: {log}"
    );
}
