//! A migration's dirty log, checked by `vfblk-loadgen --dirty-log` acting as the migrating
//! frontend: it hands the target a log, turns logging on, syncs the log every 50 ms as QEMU
//! does, and at the switch-over (GET_VRING_BASE) checks that exactly the pages the device
//! wrote (read data, status bytes, used rings) were marked: none missing, none extra. On the
//! RAM and file backends, with a scatter list off page boundaries and two queues on two
//! pollers, split and packed rings (a packed ring's used descriptors are written into its
//! descriptor ring, and its buffers marked from the inflight region's copies of its chains);
//! and, as the negative control, a target that takes the log and marks nothing.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use vfblk_tests::{bin, start_bridge, without_bulk};

fn loadgen(socket: &Path, rw: &str, extra: &[&str]) -> (bool, Value) {
    let out = Command::new(bin("vfblk-loadgen"))
        .arg("--socket")
        .arg(socket)
        .args([
            "--queues",
            "2",
            "--qd",
            "16",
            "--rw",
            rw,
            "--seconds",
            "0.6",
            "--json",
            "--dirty-log",
        ])
        .args(extra)
        .output()
        .expect("vfblk-loadgen");
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("vfblk-loadgen printed {text:?}: {e}"));
    (out.status.success(), report)
}

fn serve(name: &str, backend: &str, extra: &[&str]) -> (std::process::Child, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("vfblk-dirty-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("blk.sock");
    let backend = backend.replace("DIR", &dir.display().to_string());
    let mut args = vec![
        "--backend",
        backend.as_str(),
        "--queues",
        "2",
        "--pollers",
        "2",
    ];
    args.extend(extra);
    let child = start_bridge(&socket, &args, &dir.join("bridge.log"));
    (child, dir)
}

#[test]
fn a_migrating_frontend_finds_exactly_the_pages_the_device_wrote_marked() {
    let shm = format!("/dev/shm/vfblk-dirty-{}", std::process::id());
    for (name, backend) in [
        ("mem", format!("mem:{shm}:64M")),
        ("file", "file:DIR/disk.img:64M".to_string()),
    ] {
        let (mut bridge, dir) = serve(name, &backend, &[]);
        let socket = dir.join("blk.sock");
        for (rw, extra) in [
            ("read", &[][..]),
            ("write", &["--verify"][..]),
            ("mixed", &["--verify"][..]),
            ("read", &["--unaligned"][..]),
            ("read", &["--packed"][..]),
            ("mixed", &["--packed", "--verify"][..]),
            ("read", &["--packed", "--unaligned"][..]),
        ] {
            let (ok, r) = loadgen(&socket, rw, extra);
            let what = format!("{name} backend, {rw} {extra:?}");
            assert!(ok, "{what}: {}", without_bulk(&r));
            assert_eq!(
                r["packed"],
                extra.contains(&"--packed"),
                "{what}: {}",
                without_bulk(&r)
            );
            let log = &r["dirty_log"];
            assert_eq!(log["missing_pages"], 0, "{what}: {}", without_bulk(&r));
            assert_eq!(log["extra_pages"], 0, "{what}: {}", without_bulk(&r));
            // Writes only have their status bytes written (and the used rings): a few pages
            // each epoch; reads their data too.
            let written = log["written_pages"].as_u64().unwrap_or(0);
            assert!(written > 10, "{what}: {}", without_bulk(&r));
        }
        // At each switch-over the target synced the data for the destination.
        let log = std::fs::read_to_string(dir.join("bridge.log")).unwrap_or_default();
        assert!(
            log.contains("migration switch-over: queue 1 stopped")
                && log.contains("data synced in"),
            "{name}: {log}"
        );
        let _ = bridge.kill();
        let _ = bridge.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_file(&shm);
}

#[test]
fn without_marks_the_migrating_frontend_sees_the_pages_it_would_lose() {
    let shm = format!("/dev/shm/vfblk-dirty-off-{}", std::process::id());
    let (mut bridge, dir) = serve("off", &format!("mem:{shm}:64M"), &["--test-skip-dirty-log"]);
    for extra in [&[][..], &["--packed"][..]] {
        let (ok, r) = loadgen(&dir.join("blk.sock"), "read", extra);
        assert!(
            !ok,
            "{extra:?}: a log with nothing marked must fail the check"
        );
        assert!(
            r["dirty_log"]["missing_pages"].as_u64().unwrap_or(0) > 10,
            "{extra:?}: {}",
            without_bulk(&r)
        );
    }
    let _ = bridge.kill();
    let _ = bridge.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&shm);
}
