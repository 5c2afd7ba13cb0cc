//! The lab's real Ceph cluster (`vfblk_lab::ceph`): it starts in well under 30 s, serves RBD
//! I/O through the `rbd` CLI, survives its OSD being stopped and started under load, runs
//! beside a second cluster, and leaves nothing behind — no daemon, no directory — whether it
//! is stopped, dropped, torn down at the exit of a test process, or its process is SIGKILLed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vfblk_lab::ceph::{self, Cluster};

/// A cluster must be ready (pool initialised) within this.
const START_LIMIT: Duration = Duration::from_secs(30);

fn start(name: &str) -> (Cluster, Duration) {
    let t = Instant::now();
    let cluster = Cluster::start(name).unwrap_or_else(|e| panic!("{e}"));
    let took = t.elapsed();
    eprintln!(
        "ceph {name}: ready in {took:.1?} (mon port {}, {})",
        cluster.mon_port(),
        cluster.dir().display()
    );
    assert!(took < START_LIMIT, "cluster start took {took:?}");
    (cluster, took)
}

/// `ops/sec` from `rbd bench`'s last line.
fn iops(bench: &str) -> f64 {
    bench
        .lines()
        .rev()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            words.position(|w| w == "ops/sec:")?;
            words.next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no ops/sec in rbd bench output:\n{bench}"))
}

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}

/// Nothing of the cluster in `dir` runs, and the directory is gone (waits a little: a
/// SIGKILLed daemon takes a moment to vanish).
fn assert_nothing_left(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = ceph::processes_under(dir);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes of {dir:?} left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dir.exists(), "{dir:?} still exists");
}

fn bench(cluster: &Cluster, image: &str, io_type: &str, pattern: &str, total: &str) -> f64 {
    let spec = format!("{}/{image}", cluster.pool());
    let out = cluster
        .rbd(&[
            "bench",
            "--io-type",
            io_type,
            "--io-size",
            "4K",
            "--io-threads",
            "16",
            "--io-total",
            total,
            "--io-pattern",
            pattern,
            &spec,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    iops(&out)
}

#[test]
fn a_cluster_serves_rbd_io_survives_an_osd_restart_and_stops_leaving_nothing() {
    let (mut cluster, _) = start("io");
    assert_eq!(cluster.pool(), "rbd");
    assert_eq!(cluster.client_id(), "admin");
    assert!(cluster.conf().exists() && cluster.keyring().exists());
    let pids = cluster.daemon_pids();
    assert_eq!(pids.len(), 2, "a mon and an OSD");

    cluster.create_image("disk", 256).unwrap();
    let info = cluster
        .rbd(&["info", "rbd/disk", "--format", "json"])
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["size"], 256u64 << 20);
    assert!(
        info["features"].to_string().contains("exclusive-lock"),
        "{info}"
    );
    let write = bench(&cluster, "disk", "write", "seq", "4M");
    let read = bench(&cluster, "disk", "read", "seq", "4M");
    let rand_write = bench(&cluster, "disk", "write", "rand", "32M");
    let rand_read = bench(&cluster, "disk", "read", "rand", "32M");
    let rss: Vec<u64> = pids.iter().map(|&p| rss_mib(p)).collect();
    eprintln!(
        "ceph io: 4K QD16 seq write {write:.0}, seq read {read:.0}, rand write {rand_write:.0}, \
         rand read {rand_read:.0} IOPS; RSS mon {} MiB, OSD {} MiB",
        rss[0], rss[1]
    );
    let status = cluster.ceph(&["osd", "stat", "--format", "json"]).unwrap();
    assert!(status.contains("\"num_up_osds\":1"), "{status}");

    // client.admin may blocklist: a writer holding the exclusive lock is SIGKILLed, its lock
    // is broken (rbd_blocklist_on_break_lock blocklists it) and the next writer goes on at
    // once instead of after the 30 s watch timeout.
    let mut holder = Command::new("rbd")
        .arg("--conf")
        .arg(cluster.conf())
        .args([
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4K",
            "--io-total",
            "1G",
        ])
        .arg("rbd/disk")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let lock = loop {
        let locks = cluster
            .rbd(&["lock", "ls", "--format", "json", "rbd/disk"])
            .unwrap();
        let locks: serde_json::Value = serde_json::from_str(&locks).unwrap();
        if let Some(lock) = locks.get(0) {
            break lock.clone();
        }
        assert!(Instant::now() < deadline, "no exclusive lock owner seen");
        std::thread::sleep(Duration::from_millis(100));
    };
    holder.kill().unwrap();
    holder.wait().unwrap();
    let t = Instant::now();
    let (id, locker) = (
        lock["id"].as_str().unwrap(),
        lock["locker"].as_str().unwrap(),
    );
    cluster
        .rbd(&["lock", "rm", "rbd/disk", id, locker])
        .unwrap();
    let broken = t.elapsed();
    let blocklist = cluster.ceph(&["osd", "blocklist", "ls"]).unwrap();
    let address = lock["address"].as_str().unwrap();
    assert!(blocklist.contains(address), "{address} not in {blocklist}");
    let t = Instant::now();
    bench(&cluster, "disk", "write", "rand", "1M");
    let next = t.elapsed();
    eprintln!("ceph io: dead owner's lock broken in {broken:.1?}, next writer done in {next:.1?}");
    assert!(
        next < Duration::from_secs(20),
        "the next writer waited {next:?}"
    );

    // The OSD stopped and started under load: the writes wait, then complete.
    let conf = cluster.conf().to_path_buf();
    let load = std::thread::spawn(move || {
        Command::new("rbd")
            .arg("--conf")
            .arg(&conf)
            .args([
                "bench",
                "--io-type",
                "write",
                "--io-size",
                "4K",
                "--io-threads",
                "4",
            ])
            .args(["--io-total", "24M", "--io-pattern", "rand", "rbd/disk"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    cluster.stop_osd().unwrap();
    let stopped = t.elapsed();
    assert!(!load.is_finished(), "the load ended before the OSD stopped");
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    cluster.start_osd().unwrap();
    let restarted = t.elapsed();
    let out = load.join().unwrap();
    assert!(
        out.status.success(),
        "rbd bench across the OSD restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "ceph io: OSD stopped in {stopped:.1?}, up again in {restarted:.1?}; the load finished"
    );
    bench(&cluster, "disk", "read", "rand", "4M");
    cluster.remove_image("disk").unwrap();

    let dir = cluster.dir().to_path_buf();
    let t = Instant::now();
    cluster.stop().unwrap();
    eprintln!("ceph io: stopped in {:.1?}", t.elapsed());
    assert_nothing_left(&dir);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} lives"
        );
    }
}

#[test]
fn two_clusters_run_at_once() {
    let other = std::thread::spawn(|| start("second"));
    let (a, _) = start("first");
    let (b, _) = other.join().unwrap();
    assert_ne!(a.mon_port(), b.mon_port());
    assert_ne!(a.dir(), b.dir());
    assert_ne!(a.fsid(), b.fsid());
    for (cluster, image) in [(&a, "a"), (&b, "b")] {
        cluster.create_image(image, 64).unwrap();
        bench(cluster, image, "write", "seq", "4M");
        bench(cluster, image, "read", "seq", "4M");
    }
    // Each sees only its own image.
    assert_eq!(a.rbd(&["ls"]).unwrap().trim(), "a");
    assert_eq!(b.rbd(&["ls"]).unwrap().trim(), "b");
    // Dropped without stop(): killed, directory removed; the other one goes on.
    let a_dir = a.dir().to_path_buf();
    drop(a);
    assert_nothing_left(&a_dir);
    bench(&b, "b", "read", "seq", "4M");
    let b_dir = b.dir().to_path_buf();
    b.stop().unwrap();
    assert_nothing_left(&b_dir);
}

/// Runs in a child process of the test below (does nothing in a plain `cargo test`): uses
/// the shared cluster, prints its directory, and exits normally or waits to be killed.
#[test]
fn shared_cluster_child() {
    let Ok(mode) = std::env::var("VFBLK_CEPH_CHILD") else {
        return;
    };
    let cluster = Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
    assert!(std::ptr::eq(cluster, Cluster::shared().unwrap()));
    cluster.create_image("shared", 16).unwrap();
    println!("@@DIR {}", cluster.dir().display());
    if mode == "hang" {
        std::thread::sleep(Duration::from_secs(600));
    } else {
        // Exits once the parent has seen the daemons run (it closes our stdin): exiting at
        // once raced its count of them (a CI run counted 1 of 2).
        std::io::copy(&mut std::io::stdin(), &mut std::io::sink()).unwrap();
    }
}

/// Starts a child test process that uses [`Cluster::shared`]; its cluster directory.
fn shared_child(mode: &str) -> (std::process::Child, PathBuf) {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "shared_cluster_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("VFBLK_CEPH_CHILD", mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let dir = lines
        .by_ref()
        .map_while(|l| l.ok())
        // The harness prints "test NAME ... " before the test's own output.
        .find_map(|l| l.split_once("@@DIR ").map(|(_, dir)| PathBuf::from(dir)))
        .expect("the child printed its cluster directory");
    // Drains the rest, so the child's harness can print its result.
    std::thread::spawn(move || lines.for_each(drop));
    assert!(dir.exists());
    assert_eq!(ceph::processes_under(&dir).len(), 2, "mon and OSD run");
    // Lets an "exit" child go on to exit.
    drop(child.stdin.take());
    (child, dir)
}

#[test]
fn the_shared_cluster_goes_with_its_process_at_exit_and_when_killed() {
    // A normal exit: the atexit hook kills the daemons and removes the directory.
    let (mut child, dir) = shared_child("exit");
    assert!(child.wait().unwrap().success());
    assert_nothing_left(&dir);

    // SIGKILL: the daemons die with it (parent-death signal); the directory is removed by the
    // next start (or remove_stale).
    let (mut child, dir) = shared_child("hang");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ceph::processes_under(&dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "daemons outlived their SIGKILLed process"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ceph::remove_stale();
    assert_nothing_left(&dir);
}
