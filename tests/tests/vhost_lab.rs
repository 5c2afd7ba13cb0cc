//! The seed's demonstration, automated: QEMU with `vhost-user-blk-pci` and `reconnect=1`, fio
//! in the guest with crc32c verify, the bridge killed with SIGKILL mid-run and restarted;
//! fio must finish with exit status 0 and no verify error. Once with the mem backend, once
//! with the file backend.

use vfblk_lab::qemu::Qemu;
use vfblk_lab::recovery::{self, DemoBackend, DemoOptions};
use vfblk_lab::scenario::{self, Lab};
use vfblk_tests::lab_lock;

fn demo(backend: DemoBackend, qemu: Qemu) -> f64 {
    let _lock = lab_lock();
    let lab = Lab::new(&format!("test-vhost-{backend:?}")).expect("lab setup");
    let opts = DemoOptions {
        backend,
        kills: 2,
        vfio_probe: false,
        fio_mib: 32,
        hold_completions_ms: 10,
        qemu,
        keeper: false,
        upgrades: 0,
        packed: false,
    };
    let outcome = recovery::run_demo(&lab, &opts).expect("run the demonstration");
    let run = &outcome.run.run;
    run.expect_success("fio with verify across bridge restarts")
        .unwrap();
    assert_eq!(outcome.kills, 2, "both SIGKILLs landed while fio ran");
    assert_eq!(run.record("fio_exit"), Some(&serde_json::json!(0)));
    let fio = run.record("fio").expect("fio record");
    let (writes, reads, pause_ms, errors) = scenario::fio_summary(fio);
    eprintln!(
        "{} on {}: {} kills, fio {writes} writes + {reads} verified reads, {errors} errors, longest pause {pause_ms:.0} ms, {} request(s) run again",
        outcome.backend, opts.qemu.description, outcome.kills, outcome.resubmitted
    );
    assert_eq!(errors, 0);
    assert!(
        outcome.resubmitted > 0,
        "the kills landed on requests the bridge had taken, and they were run again"
    );
    assert_eq!(writes, 32 * 256, "every 4 KiB block of 32 MiB written once");
    assert_eq!(reads, 32 * 256, "and read back for verification");
    // The guest saw the restarts as a pause (QEMU reconnecting), not as errors.
    assert!(
        pause_ms > 0.0,
        "a SIGKILL must show as a pause: {pause_ms} ms"
    );
    pause_ms
}

#[test]
fn fio_verify_survives_sigkill_of_the_bridge_mem_backend() {
    let pause_ms = demo(DemoBackend::Mem, Qemu::system());
    // QEMU 7.2 reconnects once a second.
    assert!(pause_ms > 500.0, "{pause_ms} ms");
}

#[test]
fn fio_verify_survives_sigkill_of_the_bridge_file_backend() {
    demo(DemoBackend::File, Qemu::system());
}

#[test]
fn fio_verify_survives_sigkill_of_the_bridge_on_qemu_10_with_reconnect_ms() {
    let qemu = Qemu::backports(20).expect("QEMU 10 from bookworm-backports");
    let pause_ms = demo(DemoBackend::Mem, qemu);
    // Reconnecting every 20 ms instead of every second: the pause is the restart's, not the
    // reconnect interval's.
    assert!(pause_ms < 900.0, "{pause_ms} ms");
}

/// The bridge under `vfblk-keeper`: an upgrade by hand-over and a SIGKILL while fio
/// verifies; QEMU must never reconnect nor log anything about its vhost-user connection.
/// `packed`: QEMU offers packed virtqueues, and the guest's driver must have taken them.
fn without_reconnect(qemu: Qemu, packed: bool) -> f64 {
    let _lock = lab_lock();
    let lab = Lab::new(if packed {
        "test-vhost-kept-packed"
    } else {
        "test-vhost-kept"
    })
    .expect("lab setup");
    let opts = DemoOptions {
        backend: DemoBackend::Mem,
        kills: 1,
        vfio_probe: false,
        fio_mib: 32,
        hold_completions_ms: 10,
        qemu,
        keeper: true,
        upgrades: 1,
        packed,
    };
    let outcome = recovery::run_demo(&lab, &opts).expect("run the demonstration");
    let run = &outcome.run.run;
    run.expect_success("fio with verify across an upgrade and a SIGKILL")
        .unwrap();
    let fio = run.record("fio").expect("fio record");
    let (writes, reads, pause_ms, errors) = scenario::fio_summary(fio);
    assert_eq!(
        recovery::packed_negotiated(run),
        Some(packed),
        "the guest's virtio features: {:?}",
        run.record("virtio_features")
    );
    eprintln!(
        "{} ({} ring) on {}, under vfblk-keeper: {} upgrade(s) (target pauses {:?} ms), {} kill(s), {} request(s) run again, {:?} connection(s); fio {writes} writes + {reads} verified reads, {errors} errors, longest completion {pause_ms:.1} ms",
        outcome.backend,
        if packed { "packed" } else { "split" },
        opts.qemu.description,
        outcome.upgrade_pauses_ms.len(),
        outcome.upgrade_pauses_ms,
        outcome.kills,
        outcome.resubmitted,
        outcome.connections
    );
    assert_eq!(
        outcome.upgrade_pauses_ms.len(),
        1,
        "the upgrade happened while fio ran"
    );
    assert_eq!(outcome.kills, 1, "the SIGKILL happened while fio ran");
    assert_eq!(outcome.connections, Some(1), "QEMU never reconnected");
    assert!(
        outcome.qemu_vhost_lines.is_empty(),
        "QEMU logged {:?}",
        outcome.qemu_vhost_lines
    );
    assert!(
        outcome.resubmitted > 0,
        "the kill landed on requests in flight"
    );
    assert_eq!(errors, 0);
    assert_eq!(writes, 32 * 256);
    assert_eq!(reads, 32 * 256);
    pause_ms
}

#[test]
fn fio_verify_survives_an_upgrade_and_a_sigkill_without_qemu_reconnecting() {
    let pause_ms = without_reconnect(Qemu::system(), false);
    // QEMU 7.2's reconnect alone would take a second.
    assert!(pause_ms < 500.0, "{pause_ms} ms");
}

#[test]
fn fio_verify_on_packed_rings_survives_an_upgrade_and_a_sigkill_without_qemu_reconnecting() {
    let pause_ms = without_reconnect(Qemu::system(), true);
    assert!(pause_ms < 500.0, "{pause_ms} ms");
}

/// QEMU 10 with packed rings (its split rings under the keeper: the NVMe backend's nested
/// guest test and the migration tests).
#[test]
fn fio_verify_on_packed_rings_survives_an_upgrade_and_a_sigkill_without_reconnecting_on_qemu_10() {
    let qemu = Qemu::backports(20).expect("QEMU 10 from bookworm-backports");
    let pause_ms = without_reconnect(qemu, true);
    assert!(pause_ms < 500.0, "{pause_ms} ms");
}

/// A backend grown by RPC while the guest runs: the guest's `/sys/block/vda/size` changes
/// with no reconnect, and the new last block is written and read back.
fn resize(qemu: Qemu) {
    let _lock = lab_lock();
    let lab = Lab::new("test-vhost-resize").expect("lab setup");
    let description = qemu.description.clone();
    let outcome = recovery::run_resize(&lab, qemu).expect("run the resize");
    let run = &outcome.run.run;
    run.expect_success("the guest saw the new size").unwrap();
    let (before, after) = (run.record("size_before"), run.record("size_after"));
    eprintln!(
        "{description}: /sys/block/vda/size {before:?} -> {after:?}; guest kernel: {:?}; target: {}; {:?} connection(s)",
        run.record("dmesg"),
        outcome.report,
        outcome.connections
    );
    assert_eq!(before, Some(&serde_json::json!(64 * 2048)));
    assert_eq!(after, Some(&serde_json::json!(128 * 2048)));
    assert_eq!(run.record("tail_ok"), Some(&serde_json::json!(1)));
    assert_eq!(
        outcome.report["controllers"],
        serde_json::json!([{"name": "vhost0", "told": "acknowledged"}])
    );
    assert_eq!(outcome.connections, Some(1), "QEMU never reconnected");
    assert!(
        outcome.qemu_vhost_lines.is_empty(),
        "QEMU logged {:?}",
        outcome.qemu_vhost_lines
    );
}

#[test]
fn a_guest_sees_its_disk_grow_without_a_reconnect_on_qemu_7_2() {
    resize(Qemu::system());
}

#[test]
fn a_guest_sees_its_disk_grow_without_a_reconnect_on_qemu_10() {
    resize(Qemu::backports(20).expect("QEMU 10 from bookworm-backports"));
}
