//! Live recovery: the bridge is killed with SIGKILL at random moments while the load
//! generator runs in verify mode, and started again on the same socket. With inflight
//! tracking nothing may be lost, failed or corrupted; without it (and completions forced out
//! of order) requests are lost or run twice.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};
use vfblk_tests::{bin, start_bridge};

/// The load generator in verify mode (mixed reads and writes, JSON report on stdout).
fn spawn_loadgen(socket: &Path, seconds: u32, extra: &[&str]) -> Child {
    Command::new(bin("vfblk-loadgen"))
        .arg("--socket")
        .arg(socket)
        .args([
            "--rw",
            "mixed",
            "--verify",
            "--json",
            "--seconds",
            &seconds.to_string(),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting vfblk-loadgen")
}

struct Outcome {
    report: serde_json::Value,
    kills: u32,
}

/// Runs the load generator for `seconds` while killing and restarting the bridge `kills`
/// times at random intervals.
fn chaos(
    name: &str,
    bridge_args: &[&str],
    loadgen_args: &[&str],
    kills: u32,
    seconds: u32,
) -> Outcome {
    let dir = std::env::temp_dir().join(format!("vfblk-recovery-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("blk.sock");
    let log = dir.join("bridge.log");
    let mut bridge = start_bridge(&socket, bridge_args, &log);
    let loadgen = spawn_loadgen(&socket, seconds, loadgen_args);
    let mut rng: u64 = 0x9e37_79b9 ^ u64::from(std::process::id());
    std::thread::sleep(Duration::from_millis(300));
    let mut done = 0;
    let inflight = !bridge_args.contains(&"--no-inflight");
    for _ in 0..kills {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(40 + rng % 160));
        bridge.kill().expect("SIGKILL the bridge");
        bridge.wait().unwrap();
        bridge = start_bridge(&socket, bridge_args, &log);
        done += 1;
        if inflight {
            // Each kill must hit a connected frontend: wait until the new bridge has
            // recovered the load generator's rings before the next interval starts.
            let deadline = Instant::now() + Duration::from_secs(20);
            while recoveries(&log) < done {
                assert!(
                    Instant::now() < deadline,
                    "load generator did not reconnect after kill {done}"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    let out = loadgen.wait_with_output().expect("load generator");
    let _ = bridge.kill();
    let _ = bridge.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "load generator printed {text:?}: {e}; bridge log {}",
            log.display()
        )
    });
    let _ = std::fs::remove_file(&socket);
    Outcome {
        report,
        kills: done,
    }
}

/// No verify error, failure, loss or double completion.
fn assert_clean(r: &serde_json::Value) {
    for key in ["verify_errors", "failed", "lost", "not_a_head"] {
        assert_eq!(r[key], 0, "{key}: {r}");
    }
}

/// Connections the bridges in `log` recovered from the inflight region.
fn recoveries(log: &Path) -> u32 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("recovered from the inflight region")
        .count() as u32
}

fn remove_shm(name: &str) {
    let _ = std::fs::remove_file(format!("/dev/shm/vfblk-test-{name}-{}", std::process::id()));
}

fn shm(name: &str) -> String {
    format!("mem:/dev/shm/vfblk-test-{name}-{}:64M", std::process::id())
}

#[test]
fn fifty_sigkills_with_out_of_order_completions_lose_nothing() {
    let _lock = vfblk_tests::lab_lock();
    let backend = shm("inflight");
    let o = chaos(
        "inflight",
        &["--backend", &backend, "--test-delay-ms", "10"],
        &["--qd", "32", "--reconnect-timeout-s", "20"],
        50,
        14,
    );
    let r = &o.report;
    eprintln!("with inflight tracking, {} kills: {r}", o.kills);
    let pauses = r["pauses_ms"].as_array().unwrap();
    eprintln!(
        "longest I/O pause per restart (ms): {}",
        pauses
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(r["inflight"], true, "{r}");
    assert_eq!(r["reconnects"], o.kills, "{r}");
    assert_eq!(
        pauses.len() as u32,
        o.kills,
        "a pause measured for every restart: {r}"
    );
    assert_clean(r);
    assert!(r["reads"].as_u64().unwrap() > 1000, "{r}");
    remove_shm("inflight");
}

/// Packed rings through the reconnect path (no keeper: each SIGKILL closes the connection
/// and the load generator reconnects as QEMU does, sending the packed base it started from;
/// the bridge resumes each ring from the frontend's inflight region), completions held up
/// to 10 ms and released out of order. `VFBLK_TEST_PACKED_RECONNECT_KILLS` sets the count.
#[test]
fn packed_rings_survive_sigkills_through_the_reconnect_path() {
    let _lock = vfblk_tests::lab_lock();
    let kills: u32 = std::env::var("VFBLK_TEST_PACKED_RECONNECT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let backend = shm("packed");
    let o = chaos(
        "packed",
        &["--backend", &backend, "--test-delay-ms", "10"],
        &["--packed", "--qd", "32", "--reconnect-timeout-s", "20"],
        kills,
        // The kills come 40-200 ms apart, each waiting for the reconnect.
        3 + kills * 3 / 10,
    );
    let r = &o.report;
    let log = std::env::temp_dir()
        .join(format!("vfblk-recovery-packed-{}", std::process::id()))
        .join("bridge.log");
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let again = vfblk_lab::recovery::requests_run_again(&log);
    eprintln!(
        "packed rings, {} kills through the reconnect path: {again} request(s) run again; {}",
        o.kills,
        vfblk_tests::without_bulk(r)
    );
    assert_eq!(r["packed"], true, "{r}");
    assert_eq!(r["inflight"], true, "{r}");
    assert_eq!(r["reconnects"], o.kills, "{r}");
    assert_clean(r);
    assert!(r["reads"].as_u64().unwrap() > 1000, "{r}");
    assert!(
        log.matches("packed ring recovered from the inflight region")
            .count() as u32
            >= o.kills,
        "every reconnect resumed its packed ring from the region: {log}"
    );
    assert!(again > 0, "kills landed on requests in flight");
    assert!(
        !log.contains("queue stopped") && !log.contains("the queue stops"),
        "{log}"
    );
    remove_shm("packed");
}

#[test]
fn file_backend_survives_sigkills() {
    let _lock = vfblk_tests::lab_lock();
    let dir = std::env::temp_dir().join(format!("vfblk-filebackend-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let backend = format!("file:{}:64M", dir.join("disk.img").display());
    let o = chaos(
        "file",
        &["--backend", &backend, "--test-delay-ms", "5"],
        &["--qd", "16"],
        10,
        6,
    );
    let r = &o.report;
    eprintln!("file backend, {} kills: {r}", o.kills);
    assert_eq!(r["reconnects"], o.kills, "{r}");
    assert_clean(r);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_inflight_tracking_requests_are_lost_or_run_twice() {
    let _lock = vfblk_tests::lab_lock();
    let backend = shm("noinflight");
    let o = chaos(
        "noinflight",
        &[
            "--backend",
            &backend,
            "--test-delay-ms",
            "20",
            "--no-inflight",
        ],
        &["--qd", "32", "--io-timeout-s", "3"],
        3,
        5,
    );
    let r = &o.report;
    eprintln!("without inflight tracking, {} kills: {r}", o.kills);
    assert_eq!(r["inflight"], false, "{r}");
    let damage = r["not_a_head"].as_u64().unwrap()
        + r["lost"].as_u64().unwrap()
        + r["verify_errors"].as_u64().unwrap();
    assert!(
        damage > 0,
        "out-of-order completions plus a QEMU-style rewind must show damage: {r}"
    );
    remove_shm("noinflight");
}

/// Without an inflight region a packed ring cannot be resumed: used descriptors have
/// overwritten the slots of chains in flight (completions out of order), so nothing says
/// which to run again. A target without inflight tracking therefore does not offer packed
/// rings: a frontend asking for them is told so, and one that does not ask is served split
/// rings.
#[test]
fn without_inflight_tracking_packed_rings_are_not_offered() {
    let _lock = vfblk_tests::lab_lock();
    let backend = shm("packed-noinflight");
    let dir = std::env::temp_dir().join(format!(
        "vfblk-recovery-packed-noinflight-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("blk.sock");
    let mut bridge = start_bridge(
        &socket,
        &["--backend", &backend, "--no-inflight"],
        &dir.join("bridge.log"),
    );
    let packed = Command::new(bin("vfblk-loadgen"))
        .arg("--socket")
        .arg(&socket)
        .args(["--packed", "--rw", "read", "--seconds", "1"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&packed.stderr).into_owned()
        + &String::from_utf8_lossy(&packed.stdout);
    assert!(
        !packed.status.success() && said.contains("does not offer VIRTIO_F_RING_PACKED"),
        "--packed against --no-inflight: {} {said}",
        packed.status
    );
    let split = spawn_loadgen(&socket, 1, &[]);
    let out = split.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["packed"], false, "{}", vfblk_tests::without_bulk(&r));
    for key in ["verify_errors", "failed", "lost", "not_a_head"] {
        assert_eq!(r[key], 0, "{key}: {}", vfblk_tests::without_bulk(&r));
    }
    let _ = bridge.kill();
    let _ = bridge.wait();
    let _ = std::fs::remove_dir_all(&dir);
    remove_shm("packed-noinflight");
}

#[test]
fn sigterm_drains_and_exits_cleanly_then_a_new_bridge_takes_over() {
    let _lock = vfblk_tests::lab_lock();
    let dir = std::env::temp_dir().join(format!("vfblk-sigterm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("blk.sock");
    let log = dir.join("bridge.log");
    let backend = shm("sigterm");
    // Two queues on two pollers: the queues of one device spread over several pollers.
    let args = [
        "--backend",
        backend.as_str(),
        "--test-delay-ms",
        "10",
        "--queues",
        "2",
        "--cpus",
        "0,1",
    ];
    let bridge = start_bridge(&socket, &args, &log);
    let loadgen = spawn_loadgen(&socket, 4, &["--queues", "2", "--qd", "16"]);
    std::thread::sleep(Duration::from_millis(1500));
    let pid = bridge.id() as i32;
    // SAFETY: signalling the child we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let started = Instant::now();
    let status = wait_with_deadline(bridge, Duration::from_secs(15));
    eprintln!(
        "bridge exited {:?} {:.0} ms after SIGTERM",
        status,
        started.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(status, Some(0), "SIGTERM: drain, then exit 0");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("completing requests in flight"),
        "{log_text}"
    );
    let mut next = start_bridge(&socket, &args, &log);
    let out = loadgen.wait_with_output().unwrap();
    let _ = next.kill();
    let _ = next.wait();
    let r: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    eprintln!("across a SIGTERM restart with 2 queues: {r}");
    assert_eq!(r["reconnects"], 1, "{r}");
    assert_clean(&r);
    remove_shm("sigterm");
}

fn wait_with_deadline(mut child: Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A guest-like client at QD1 under EVENT_IDX sleeps on its call fd (a reconnect does not
/// wake it; only an interrupt or a 2 s timeout does, and a timeout that finds completions
/// counts as a missed interrupt). Across 12 restarts — alternately of a bridge that holds
/// completions (so kills find the request taken and the successor re-runs it at the kick,
/// with SET_VRING_CALL 20 ms behind) and one that completes at once — no interrupt may be
/// missed. (The specific windows, a kill between publishing and signalling and a re-run
/// before SET_VRING_CALL, are closed by signalling at every start and every new call fd;
/// the poller's unit tests check those signals directly, as the mailbox's batching makes
/// the second window too narrow to hit reliably from outside.)
#[test]
fn qd1_under_event_idx_is_interrupted_after_every_restart() {
    let _lock = vfblk_tests::lab_lock();
    let dir = std::env::temp_dir().join(format!("vfblk-recovery-irq-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (socket, log) = (dir.join("blk.sock"), dir.join("bridge.log"));
    let backend = shm("irq");
    // Bridges that hold completions (so a kill finds the request taken) alternate with
    // bridges that complete at once (so the re-run finishes before SET_VRING_CALL).
    let slow = ["--backend", backend.as_str(), "--test-delay-ms", "200"];
    let fast = ["--backend", backend.as_str()];
    let mut bridge = start_bridge(&socket, &slow, &log);
    // SET_VRING_CALL comes 20 ms after the kick, as from a frontend that waits for replies.
    let loadgen = spawn_loadgen(
        &socket,
        8,
        &["--qd", "1", "--interrupts", "--call-after-kick-ms", "20"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let kills = 12;
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(if k % 2 == 0 { 150 } else { 350 }));
        bridge.kill().unwrap();
        bridge.wait().unwrap();
        bridge = start_bridge(&socket, if k % 2 == 0 { &fast } else { &slow }, &log);
        let deadline = Instant::now() + Duration::from_secs(20);
        while recoveries(&log) < k + 1 {
            assert!(
                Instant::now() < deadline,
                "no reconnect after kill {}",
                k + 1
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let out = loadgen.wait_with_output().unwrap();
    let _ = bridge.kill();
    let _ = bridge.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("load generator printed {text:?}: {e}"));
    eprintln!("QD1 under EVENT_IDX, {kills} kills: {r}");
    assert_clean(&r);
    assert_eq!(r["missed_interrupts"], 0, "{r}");
    assert_eq!(r["reconnects"], kills, "{r}");
    let rerun =
        vfblk_lab::recovery::requests_run_again(&std::fs::read_to_string(&log).unwrap_or_default());
    assert!(
        rerun > 0,
        "some kills found the request taken: {rerun} re-run"
    );
    remove_shm("irq");
    let _ = std::fs::remove_dir_all(&dir);
}
