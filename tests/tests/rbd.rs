//! The RBD backend on a real Ceph cluster (a private single-node cluster this test binary
//! starts: `vfblk_lab::ceph`): verifying load generators with one and four queues, the stock
//! libblkio client, image creation with a size, and refusals that leave nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use serde_json::Value;
use vfblk_lab::ceph::Cluster;
use vfblk_tests::{
    assert_no_error_nor_reconnect, bin, finish, rpc_call, start_bridge, verifying_load_with,
    wait_gone, without_bulk,
};

/// The backend spec of `image` on `cluster`.
fn spec(cluster: &Cluster, image: &str, size: Option<&str>) -> String {
    format!(
        "rbd:{}/{image}{},conf={},keyring={}",
        cluster.pool(),
        size.map(|s| format!(":{s}")).unwrap_or_default(),
        cluster.conf().display(),
        cluster.keyring().display()
    )
}

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vfblk-rbd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_json(program: &str, args: &[&str]) -> (bool, Value) {
    let out = Command::new(bin(program))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "{program} printed {text:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

fn stop(mut bridge: Child) {
    // SAFETY: SIGTERM to the bridge this test started.
    unsafe { libc::kill(bridge.id() as i32, libc::SIGTERM) };
    let _ = bridge.wait();
}

fn serve(dir: &Path, backend: &str, queues: &str) -> Child {
    start_bridge(
        &dir.join("blk.sock"),
        &["--backend", backend, "--queues", queues, "--pollers", "2"],
        &dir.join("bridge.log"),
    )
}

#[test]
fn load_generators_and_libblkio_verify_through_an_rbd_image() {
    let _lock = vfblk_tests::lab_lock();
    let cluster = Cluster::shared().expect("a Ceph cluster");
    let dir = test_dir("verify");
    // Created by the target, with the size asked for.
    let bridge = serve(&dir, &spec(cluster, "verify", Some("256M")), "4");
    let info = cluster
        .rbd(&["info", "--format", "json", "rbd/verify"])
        .unwrap();
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["size"], 256u64 << 20, "{info}");
    let socket = dir.join("blk.sock").display().to_string();
    // A fresh image on a fresh cluster: its first writes wait for the OSD to create the
    // objects and for the exclusive lock (6.5 s once in a CI run); not what is measured.
    let _ = run_json(
        "vfblk-loadgen",
        &[
            "--socket",
            &socket,
            "--rw",
            "write",
            "--seconds",
            "2",
            "--json",
        ],
    );
    for queues in ["1", "4"] {
        let (ok, r) = run_json(
            "vfblk-loadgen",
            &[
                "--socket",
                &socket,
                "--queues",
                queues,
                "--qd",
                "8",
                "--rw",
                "mixed",
                "--verify",
                "--seconds",
                "3",
                "--json",
            ],
        );
        assert!(ok, "{queues} queue(s): {}", without_bulk(&r));
        assert!(
            r["reads"].as_u64().unwrap_or(0) > 50,
            "{}",
            without_bulk(&r)
        );
        eprintln!(
            "RBD, {queues} queue(s), QD8 mixed verify: {:.0} IOPS, p99 {} us",
            r["iops"].as_f64().unwrap_or(0.0),
            r["lat_p99_us"]
        );
    }
    // Scatter lists off page boundaries go to librbd as they are.
    let (ok, r) = run_json(
        "vfblk-loadgen",
        &[
            "--socket",
            &socket,
            "--qd",
            "4",
            "--rw",
            "mixed",
            "--verify",
            "--unaligned",
            "--bs",
            "65536",
            "--seconds",
            "2",
            "--json",
        ],
    );
    assert!(ok, "unaligned: {}", without_bulk(&r));
    // A frontend that is not ours.
    let (ok, r) = run_json(
        "vfblk-blkio-load",
        &[
            "--socket",
            &socket,
            "--queues",
            "2",
            "--qd",
            "8",
            "--rw",
            "mixed",
            "--seconds",
            "2",
            "--json",
        ],
    );
    assert!(ok, "libblkio: {}", without_bulk(&r));
    assert!(r["ios"].as_u64().unwrap_or(0) > 50, "{}", without_bulk(&r));
    stop(bridge);
    // Opened again without a size: the image as it is.
    let bridge = serve(&dir, &spec(cluster, "verify", None), "1");
    let (ok, r) = run_json(
        "vfblk-loadgen",
        &[
            "--socket",
            &socket,
            "--rw",
            "read",
            "--seconds",
            "1",
            "--json",
        ],
    );
    assert!(ok, "{}", without_bulk(&r));
    stop(bridge);
    cluster.remove_image("verify").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refused_rbd_backends_say_why_and_leave_no_image() {
    let _lock = vfblk_tests::lab_lock();
    let cluster = Cluster::shared().expect("a Ceph cluster");
    let dir = test_dir("refused");
    let refused = |backend: String| -> String {
        let out = Command::new(bin("vfblk-bridge"))
            .arg("--socket")
            .arg(dir.join("blk.sock"))
            .args(["--backend", &backend])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{backend} was served");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // No such image, and no size to create it with.
    let e = refused(spec(cluster, "absent", None));
    assert!(e.contains("opening image rbd/absent"), "{e}");
    // No such pool: nothing created.
    let e = refused(spec(cluster, "x", Some("64M")).replacen("rbd:rbd/", "rbd:nopool/", 1));
    assert!(e.contains("opening pool nopool"), "{e}");
    // An existing image of another size is not resized behind the operator's back.
    cluster.create_image("sized", 64).unwrap();
    let e = refused(spec(cluster, "sized", Some("128M")));
    assert!(e.contains("not the 134217728 asked for"), "{e}");
    let info: Value = serde_json::from_str(
        &cluster
            .rbd(&["info", "--format", "json", "rbd/sized"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(info["size"], 64u64 << 20);
    // A cluster that is not there: a bounded wait, then a clear error.
    let e = refused(spec(cluster, "x", None).replace(
        &cluster.conf().display().to_string(),
        "/nonexistent/ceph.conf",
    ));
    assert!(e.contains("reading Ceph configuration"), "{e}");
    let images = cluster.rbd(&["ls", "rbd"]).unwrap();
    assert!(
        !images.contains("absent") && !images.lines().any(|l| l == "x"),
        "{images}"
    );
    cluster.remove_image("sized").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The target under `vfblk-keeper` on one RBD image, its RPC socket at `dir/rpc.sock`.
struct UnderKeeper {
    keeper: Child,
    rpc: PathBuf,
    /// The target process last seen serving (killed with the keeper if a test fails).
    last_pid: std::cell::Cell<u32>,
}

impl UnderKeeper {
    fn start(dir: &Path, backend: &str, env: &[(&str, &str)]) -> Self {
        let socket = dir.join("blk.sock");
        let bridge_args: Vec<&std::ffi::OsStr> = vec![
            "--socket".as_ref(),
            socket.as_os_str(),
            "--backend".as_ref(),
            backend.as_ref(),
            "--queues".as_ref(),
            "2".as_ref(),
            "--pollers".as_ref(),
            "2".as_ref(),
        ];
        let keeper = vfblk_tests::start_keeper(dir, &[], &bridge_args, env);
        let rpc = dir.join("rpc.sock");
        Self {
            keeper,
            rpc,
            last_pid: std::cell::Cell::new(0),
        }
    }

    /// The serving process's pid (not `not`) once it answers, and with `connected` once
    /// its frontend is connected to it.
    fn serving_pid(&self, not: u32, connected: bool) -> u32 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Ok(stats) = rpc_call(&self.rpc, "stats", serde_json::json!({})) {
                let pid = stats["pid"].as_u64().unwrap_or(0) as u32;
                let all_connected = stats["controllers"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(|c| c["connected"] == true));
                if pid != not && (all_connected || !connected) {
                    self.last_pid.set(pid);
                    return pid;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the target did not serve again"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    fn stop(mut self) {
        // SAFETY: SIGTERM to the keeper this test started.
        unsafe { libc::kill(self.keeper.id() as i32, libc::SIGTERM) };
        let _ = self.keeper.wait();
        self.last_pid.set(0);
    }
}

impl Drop for UnderKeeper {
    /// A test that failed half-way leaves neither the keeper nor its target running.
    fn drop(&mut self) {
        let _ = self.keeper.kill();
        let _ = self.keeper.wait();
        let pid = self.last_pid.get();
        if pid != 0 {
            // SAFETY: SIGKILL to the target this test ran (an orphan once the keeper died).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// SIGKILLs of a target on an RBD image, under the keeper, with a verifying load generator:
/// each successor breaks the dead predecessor's exclusive lock at once (only the lock of a
/// client the predecessor recorded as its own), so no request waits out Ceph's 30 s watch
/// timeout. The negative control, with lock breaking off, shows that stall.
#[test]
fn sigkills_under_the_keeper_take_the_dead_predecessors_image_lock_at_once() {
    let _lock = vfblk_tests::lab_lock();
    let cluster = Cluster::shared().expect("a Ceph cluster");
    let kills = 20;
    for (name, env, kills) in [
        ("kills", &[][..], kills),
        ("nobreak", &[("VFBLK_TEST_NO_RBD_LOCK_BREAK", "1")][..], 1),
    ] {
        let dir = test_dir(name);
        let image = format!("kept-{name}");
        let kept = UnderKeeper::start(&dir, &spec(cluster, &image, Some("128M")), env);
        let socket = dir.join("blk.sock");
        kept.serving_pid(0, false);
        let load = verifying_load_with(&socket, &["--io-timeout-s", "60"]);
        let mut pid = kept.serving_pid(0, true);
        std::thread::sleep(std::time::Duration::from_millis(1000));
        for _ in 0..kills {
            // SAFETY: SIGKILL to the target this test runs.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            wait_gone(pid);
            pid = kept.serving_pid(pid, true);
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let r = finish(load);
        let log = std::fs::read_to_string(dir.join("target.log")).unwrap_or_default();
        kept.stop();
        assert_no_error_nor_reconnect(&r);
        let gap = r["max_gap_ms"].as_f64().unwrap_or(f64::MAX);
        let broke = log
            .matches("broke the exclusive lock of our dead predecessor")
            .count();
        eprintln!(
            "RBD under the keeper ({name}): {kills} SIGKILL(s), {broke} lock(s) broken, longest gap {gap:.0} ms, {} I/Os",
            r["ios"]
        );
        if env.is_empty() {
            assert_eq!(
                broke, kills,
                "every successor broke its predecessor's lock: {log}"
            );
            // Ceph's watch timeout is 30 s; the OSD alone, on a sparse file sharing two
            // cores with the test, answers some requests only after a second or two.
            assert!(gap < 5000.0, "longest gap {gap} ms: {}", without_bulk(&r));
        } else {
            assert_eq!(broke, 0, "{log}");
            assert!(
                gap > 20_000.0,
                "without the break, Ceph's watch timeout: {gap} ms"
            );
        }
        cluster.remove_image(&image).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// After a SIGKILL the successor finds the image's lock held by a live client that is not
/// its predecessor's (`rbd bench` writing): it must leave that lock alone, and the other
/// client finishes its writes unharmed (a broken lock would have blocklisted it).
#[test]
fn a_live_owners_image_lock_is_never_broken() {
    let _lock = vfblk_tests::lab_lock();
    let cluster = Cluster::shared().expect("a Ceph cluster");
    let dir = test_dir("live-owner");
    let kept = UnderKeeper::start(&dir, &spec(cluster, "live-owner", Some("128M")), &[]);
    let pid = kept.serving_pid(0, false);
    let bench = Command::new("rbd")
        .arg("--conf")
        .arg(cluster.conf())
        .args([
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4096",
            "--io-threads",
            "4",
            "--io-total",
            "48M",
            "--io-pattern",
            "rand",
            "rbd/live-owner",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("rbd bench");
    // The bench holds the lock once it writes.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: SIGKILL to the target this test runs.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(pid);
    kept.serving_pid(pid, false);
    let out = bench.wait_with_output().unwrap();
    let log = std::fs::read_to_string(dir.join("target.log")).unwrap_or_default();
    kept.stop();
    assert!(
        out.status.success(),
        "the live client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        log.contains("not a client of a dead predecessor of ours: left to librbd's hand-over"),
        "{log}"
    );
    assert!(!log.contains("broke the exclusive lock"), "{log}");
    // The killed target's watch lingers for Ceph's timeout (nobody broke it): the image
    // goes with the test cluster.
    let _ = std::fs::remove_dir_all(&dir);
}

/// Upgrades by hand-over of a target on an RBD image under verifying load: the new process
/// opens the image while the old one, alive and quiesced, still holds its lock; librbd hands
/// the lock over at the new process's first write. No error, no reconnect, no stall.
#[test]
fn upgrades_hand_the_image_lock_over_without_a_stall() {
    let _lock = vfblk_tests::lab_lock();
    let cluster = Cluster::shared().expect("a Ceph cluster");
    let dir = test_dir("upgrades");
    let kept = UnderKeeper::start(&dir, &spec(cluster, "upgrades", Some("128M")), &[]);
    kept.serving_pid(0, false);
    let load = verifying_load_with(&dir.join("blk.sock"), &["--io-timeout-s", "60"]);
    let mut pid = kept.serving_pid(0, true);
    let upgrades = 10;
    let mut pauses = Vec::new();
    for _ in 0..upgrades {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let report = rpc_call(&kept.rpc, "upgrade", serde_json::json!({})).unwrap();
        assert_eq!(report["old_pid"], pid, "{report}");
        pauses.push(report["pause_ms"].as_f64().unwrap_or(0.0));
        wait_gone(pid);
        pid = kept.serving_pid(pid, true);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let r = finish(load);
    let log = std::fs::read_to_string(dir.join("target.log")).unwrap_or_default();
    kept.stop();
    assert_no_error_nor_reconnect(&r);
    let gap = r["max_gap_ms"].as_f64().unwrap_or(f64::MAX);
    eprintln!(
        "RBD upgrades: {upgrades}, target pauses {pauses:?} ms, longest gap {gap:.0} ms, {} I/Os",
        r["ios"]
    );
    assert!(!log.contains("broke the exclusive lock"), "{log}");
    // Not Ceph's 30 s watch timeout; the OSD alone sometimes takes a second or two here.
    assert!(gap < 5000.0, "longest gap {gap} ms: {}", without_bulk(&r));
    let _ = cluster.remove_image("upgrades");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The OSD stopped and started again under verifying load: requests wait for it (none fails,
/// none is lost, no reconnect), and the target stays responsive meanwhile.
#[test]
fn requests_wait_for_a_stopped_osd_and_complete_when_it_returns() {
    let _lock = vfblk_tests::lab_lock();
    // Its own cluster: the shared one's OSD must keep serving the other tests.
    let mut cluster = Cluster::start("osd-restart").expect("a Ceph cluster");
    let dir = test_dir("osd");
    let bridge = start_bridge(
        &dir.join("blk.sock"),
        &[
            "--backend",
            &spec(&cluster, "osd", Some("64M")),
            "--queues",
            "2",
            "--rpc",
            &dir.join("rpc.sock").display().to_string(),
        ],
        &dir.join("bridge.log"),
    );
    let load = verifying_load_with(&dir.join("blk.sock"), &["--io-timeout-s", "120"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    cluster.stop_osd().unwrap();
    let stopped = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(3));
    // Requests are waiting in librbd; the control plane still answers.
    let stats = rpc_call(&dir.join("rpc.sock"), "stats", serde_json::json!({})).unwrap();
    let in_flight = stats["controllers"][0]["in_flight"].as_u64().unwrap_or(0);
    cluster.start_osd().unwrap();
    let down = stopped.elapsed();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let r = finish(load);
    stop(bridge);
    eprintln!(
        "OSD down {down:?}: {in_flight} request(s) waited; longest gap {:.0} ms; {} I/Os",
        r["max_gap_ms"].as_f64().unwrap_or(0.0),
        r["ios"]
    );
    assert_no_error_nor_reconnect(&r);
    assert!(in_flight > 0, "requests were waiting for the OSD: {stats}");
    let gap = r["max_gap_ms"].as_f64().unwrap_or(0.0);
    assert!(gap >= 2500.0, "the load waited for the OSD: {gap} ms");
    cluster.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A QEMU guest (Debian 12's QEMU 7.2, TCG) on a vhost-user-blk disk served from an RBD
/// image: fio writes 32 MiB at random with crc32c and verifies it.
#[test]
fn a_qemu_guest_verifies_fio_on_an_rbd_image() {
    use vfblk_lab::scenario::{Contents, Lab};
    use vfblk_lab::vm::{Echo, Limits, VhostUserBlk};
    let _lock = vfblk_tests::lab_lock();
    let cluster = Cluster::shared().expect("a Ceph cluster");
    let lab = Lab::new("test-rbd-guest").expect("lab setup");
    let socket = lab.dir.join("blk.sock");
    let bridge = start_bridge(
        &socket,
        &["--backend", &spec(cluster, "guest", Some("256M"))],
        &lab.dir.join("bridge.log"),
    );
    let contents = Contents {
        fio: true,
        ..Default::default()
    };
    let initrd = lab
        .l2_image(&vfblk_lab::recovery::guest_script(false, 32), contents)
        .expect("guest image");
    let disk = lab.disk("nvme.img", 64).expect("a disk image");
    let mut vm = lab.l2_spec(&initrd, &disk);
    vm.vhost_user_blk.push(VhostUserBlk {
        socket: socket.clone(),
        num_queues: 1,
        queue_size: None,
    });
    let limits = Limits {
        boot: std::time::Duration::from_secs(90),
        total: std::time::Duration::from_secs(600),
    };
    let retried = vfblk_lab::vm::run_retrying_stalls(
        &vm,
        limits,
        2,
        &lab.dir.join("console.log"),
        Echo::Steps,
    )
    .expect("the guest ran");
    stop(bridge);
    let run = &retried.run;
    run.expect_success("fio with verify on an RBD image")
        .unwrap();
    let fio = run.record("fio").expect("fio record");
    let (writes, reads, pause_ms, errors) = vfblk_lab::scenario::fio_summary(fio);
    eprintln!(
        "QEMU guest on RBD: fio {writes} writes + {reads} verified reads, {errors} errors, longest completion {pause_ms:.0} ms"
    );
    assert_eq!(errors, 0);
    assert_eq!(writes, 32 * 256);
    assert_eq!(reads, 32 * 256);
    let _ = cluster.remove_image("guest");
}
