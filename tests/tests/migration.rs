//! Live migration in the lab (issue 18, tests 1, 2 and 4): a TCG guest whose disk is served
//! over vhost-user moves between two QEMU processes and back, each QEMU served by a target
//! process of its own on one shared disk file, while fio verifies on one half of the disk
//! and `vfblk-readcheck` checks, on the other half, reads that only the device wrote into
//! guest RAM (see `vfblk_lab::migration`).

use vfblk_lab::migration::{self, MigrationOptions, MigrationOutcome, TargetKind};
use vfblk_lab::qemu::Qemu;
use vfblk_lab::scenario::Lab;
use vfblk_tests::lab_lock;

fn run(name: &str, opts: &MigrationOptions) -> MigrationOutcome {
    let _lock = lab_lock();
    let lab = Lab::new(name).expect("lab setup");
    let out = migration::run_migration(&lab, opts).expect("the migration run");
    eprintln!("{}", out.summary());
    eprintln!("results: {}", lab.dir.join("migration.json").display());
    out
}

fn context(out: &MigrationOutcome) -> String {
    let tail = vfblk_lab::vm::tail(&out.console, 25);
    format!(
        "{}\nconsole tail:\n{tail}",
        serde_json::to_string_pretty(&out.to_json()).unwrap_or_default()
    )
}

/// Both migrations completed while fio and the readcheck ran, and the guest finished on
/// the last QEMU with fio and the readcheck clean.
fn assert_clean(out: &MigrationOutcome) {
    let ctx = context(out);
    assert!(out.problems.is_empty(), "{:?}\n{ctx}", out.problems);
    assert_eq!(out.legs.len(), 2, "there and back\n{ctx}");
    for leg in &out.legs {
        assert_eq!(leg.status, "completed", "{}\n{ctx}", leg.name);
        assert!(leg.destination_running, "{}\n{ctx}", leg.name);
        assert!(
            leg.total_time_ms.is_some() && leg.downtime_ms.is_some(),
            "{ctx}"
        );
    }
    let (readcheck_end, fio_end) = out.workload_ended_s;
    let last = out.legs[1].ended_s;
    assert!(
        readcheck_end.is_some_and(|t| t > last) && fio_end.is_some_and(|t| t > last),
        "the workload outlasted both migrations\n{ctx}"
    );
    assert!(out.qemu_stderr.is_empty(), "QEMU complained\n{ctx}");
    assert_eq!(out.guest_exit, Some(0), "{ctx}");
    assert!(out.failures.is_empty(), "{ctx}");
    assert_eq!(out.record("fio_exit"), Some(&serde_json::json!(0)), "{ctx}");
    let (writes, reads, _, errors) = out.fio_summary().expect("fio's record");
    assert_eq!(errors, 0, "{ctx}");
    assert!(writes > 0 && reads > 0, "{ctx}");
    assert_eq!(
        out.record("readcheck_exit"),
        Some(&serde_json::json!(0)),
        "{ctx}"
    );
    let rc = out.record("readcheck").expect("the readcheck's record");
    assert_eq!(rc["ok"], true, "{ctx}");
    assert!(rc["rounds"].as_u64() > Some(0), "{ctx}");
}

/// The known QEMU 7.2 fault, if that is how the run ended: under TCG it corrupts guest
/// memory across a migration now and then, and the guest's kernel dies on a destination
/// (docs/lab.md: a corrupted kernel stack; a wait queue holding kernel code bytes; seen with
/// qemu-storage-daemon as the target too). With every target's log clean (nothing
/// abandoned at a switch-over, nothing run again, no error) the device had no stale write
/// to make, and a lost write of the device's shows as stale data to fio and the readcheck,
/// which QEMU 10 runs with the same targets strictly.
fn qemu_7_2_broke_the_guest(out: &MigrationOutcome) -> Option<&str> {
    // QEMU may complain of the migration stream a dying source cut short, never of the
    // vhost-user device.
    // The keeper's word that it restarted a target the test killed is no fault.
    let unexpected = out
        .target_warnings
        .iter()
        .any(|w| !w.contains("was killed by signal 9; starting it again"));
    if !out.qemu.starts_with("QEMU 7.2")
        || unexpected
        || out.qemu_stderr.iter().any(|l| l.contains("vhost"))
    {
        return None;
    }
    out.problems
        .iter()
        .find(|p| p.contains("guest kernel panicked"))
        .map(String::as_str)
}

/// Runs of a QEMU 7.2 migration at most while its emulation breaks the guest
/// ([`qemu_7_2_broke_the_guest`]): on 2026-12-08 it did in 3 of 6 runs.
const QEMU_7_2_RUNS: u32 = 3;

fn there_and_back(name: &str, qemu: Qemu, target: TargetKind) {
    let opts = MigrationOptions::new(qemu, target);
    assert_clean(&run_past_qemu_7_2_faults(name, &opts));
}

/// [`run`], again while QEMU 7.2's emulation breaks the guest ([`qemu_7_2_broke_the_guest`]),
/// at most [`QEMU_7_2_RUNS`] times.
fn run_past_qemu_7_2_faults(name: &str, opts: &MigrationOptions) -> MigrationOutcome {
    let mut out = run(name, opts);
    for again in 2..=QEMU_7_2_RUNS {
        let Some(why) = qemu_7_2_broke_the_guest(&out) else {
            break;
        };
        eprintln!(
            "{name}: QEMU 7.2's migration broke the guest ({why}), targets clean; run {again} of {QEMU_7_2_RUNS}"
        );
        out = run(&format!("{name}-{again}"), opts);
    }
    out
}

#[test]
fn live_migration_there_and_back_with_fio_verify_on_qemu_7_2() {
    there_and_back("test-migration-7.2", Qemu::system(), TargetKind::Bridge);
}

#[test]
fn live_migration_there_and_back_with_fio_verify_on_qemu_10() {
    let qemu = Qemu::backports(20).expect("QEMU 10 from bookworm-backports");
    there_and_back("test-migration-10", qemu, TargetKind::Bridge);
}

/// The harness against qemu-storage-daemon (libvhost-user, which logs its writes), the
/// reference the bridge is measured against: run by hand.
#[test]
#[ignore]
fn harness_reference_qemu_storage_daemon_there_and_back() {
    there_and_back("test-migration-qsd", Qemu::system(), TargetKind::Qsd);
}

/// The same reference on QEMU 10 (by hand).
#[test]
#[ignore]
fn harness_reference_qemu_storage_daemon_there_and_back_on_qemu_10() {
    let qemu = Qemu::backports(20).expect("QEMU 10 from bookworm-backports");
    there_and_back("test-migration-qsd-10", qemu, TargetKind::Qsd);
}

/// The negative control: the source targets take the dirty log and leave the data they
/// write into guest buffers unmarked (`--test-skip-dirty-log`); those writes during a
/// migration do not reach its destination, and the readcheck finds a region read back
/// wrong there (after the first migration, or else after the second). On QEMU 10: QEMU
/// 7.2's migration under TCG breaks the guest too often for a control (docs/lab.md).
#[test]
fn without_the_dirty_log_the_destination_reads_stale_guest_memory() {
    let qemu = Qemu::backports(20).expect("QEMU 10 from bookworm-backports");
    stale_without_the_log("test-migration-no-log-10", qemu);
}

/// The negative control on QEMU 7.2 (by hand: its guest died of the emulator in 2 of the
/// last 4 fresh-clone runs).
#[test]
#[ignore = "QEMU 7.2's migration under TCG broke the guest in 2 of the last 4 fresh-clone runs; the suite runs the QEMU 10 control"]
fn without_the_dirty_log_the_destination_reads_stale_guest_memory_on_qemu_7_2() {
    stale_without_the_log("test-migration-no-log", Qemu::system());
}

fn stale_without_the_log(name: &str, qemu: Qemu) {
    let mut opts = MigrationOptions::new(qemu, TargetKind::Bridge);
    opts.sources_skip_dirty_log = true;
    let out = run(name, &opts);
    let ctx = context(&out);
    assert!(out.problems.is_empty(), "{:?}\n{ctx}", out.problems);
    assert_eq!(out.legs.len(), 2, "{ctx}");
    assert_eq!(out.legs[0].status, "completed", "{ctx}");
    let rc = out.record("readcheck").expect("the readcheck's record");
    assert_eq!(rc["ok"], false, "no stale read was caught\n{ctx}");
    assert_eq!(
        out.record("readcheck_exit"),
        Some(&serde_json::json!(1)),
        "{ctx}"
    );
    // Caught on a destination: on B after the first migration (before the second began),
    // or on A2 after the second.
    let (at, vm, _) = out.step("readcheck finished").expect("the readcheck ended");
    match vm.as_str() {
        "B" => assert!(
            *at > out.legs[0].started_s && *at < out.legs[1].started_s,
            "{ctx}"
        ),
        "A2" => assert!(*at > out.legs[1].started_s, "{ctx}"),
        other => panic!("caught on {other}, not on a destination\n{ctx}"),
    }
    // What was found is stale device data (another region's stamps, as the device wrote
    // them into the buffer earlier), not corruption of another kind.
    let example = &rc["mismatch"]["examples"][0];
    assert!(
        example["found_region"].is_u64() && example["found_region"] != rc["mismatch"]["region"],
        "{ctx}"
    );
    eprintln!(
        "caught on {vm} {at:.1} s into the workload: {}",
        rc["mismatch"]
    );
}

/// The first source target runs under `vfblk-keeper` and is upgraded by hand-over, then
/// killed with SIGKILL, while the first migration runs: the log travels with the
/// connection, the migration completes both ways, QEMU never reconnects, nothing is lost.
/// On QEMU 10 (`VFBLK_TEST_MIGRATION_QEMU=7.2` for the system QEMU, by hand): QEMU 7.2's
/// migration under TCG broke the guest in all three runs of one fresh-clone run, with every
/// target clean (docs/lab.md); its there-and-back test keeps QEMU 7.2 in the suite.
#[test]
fn live_migration_across_an_upgrade_and_a_sigkill_of_the_source_target() {
    let qemu = if std::env::var("VFBLK_TEST_MIGRATION_QEMU").as_deref() == Ok("7.2") {
        Qemu::system()
    } else {
        Qemu::backports(20).expect("QEMU 10 from bookworm-backports")
    };
    let mut opts = MigrationOptions::new(qemu, TargetKind::Bridge);
    opts.keeper_events = true;
    let out = run_past_qemu_7_2_faults("test-migration-kept", &opts);
    assert_clean(&out);
    let ctx = context(&out);
    let events = &out.legs[0].events;
    assert_eq!(events.len(), 2, "{ctx}");
    assert_eq!(events[0]["event"], "upgrade", "{ctx}");
    assert_eq!(events[1]["event"], "SIGKILL", "{ctx}");
    for e in events {
        assert_ne!(e["old_pid"], e["new_pid"], "{ctx}");
        assert_eq!(e["migration_status_before"], "active", "{ctx}");
        assert_eq!(e["migration_status_after"], "active", "{ctx}");
    }
    assert_eq!(
        out.kept_connections,
        Some(1),
        "QEMU never reconnected\n{ctx}"
    );
}

/// The disk on Ceph (issue 19): every side's target opens one RBD image of the tests'
/// cluster, and the image's exclusive lock follows the writes from the live source to the
/// destination (librbd's hand-over, never a broken lock); fio and the readcheck stay clean
/// both ways.
#[test]
fn live_migration_there_and_back_on_an_rbd_image() {
    let cluster = vfblk_lab::ceph::Cluster::shared().expect("a Ceph cluster");
    let image = format!("{}/migration", cluster.pool());
    let _ = cluster.rbd(&["rm", "--no-progress", &image]);
    cluster
        .rbd(&[
            "create",
            "--size",
            &format!("{}M", migration::DISK_MIB),
            &image,
        ])
        .expect("rbd create");
    let mut opts = MigrationOptions::new(Qemu::system(), TargetKind::Bridge);
    opts.rbd = Some(format!(
        "rbd:{image},conf={},keyring={}",
        cluster.conf().display(),
        cluster.keyring().display()
    ));
    let out = run("test-migration-rbd", &opts);
    assert_clean(&out);
    let ctx = context(&out);
    let mut handed_over = 0;
    for log in &out.target_logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            !text.contains("broke the exclusive lock"),
            "a live owner's lock was broken: {}\n{ctx}",
            log.display()
        );
        handed_over += text.matches("left to librbd's hand-over").count();
    }
    // The destination opened the image while the live source held its lock.
    assert!(
        handed_over >= 1,
        "no destination found the lock held\n{ctx}"
    );
    let _ = cluster.rbd(&["rm", "--no-progress", &image]);
}

/// Issue 18, test 3's nested half: the NVMe backend's DMA reaches the destination of a
/// migration between two controllers on one namespace. The lab guest's emulated NVMe is an
/// NVM subsystem whose two controllers share namespace 1 (a dual-ported SSD: two hosts
/// reaching one namespace); a `vfblk-bridge` owns each controller through VFIO, and a
/// second-level guest under the lab guest's KVM runs `vfblk-readcheck` (test 2's check:
/// O_DIRECT reads into a buffer only the device writes, each checked after a pause) while
/// it moves from a QEMU on the first bridge to one on the second, then back to a new QEMU
/// on the first. The first bridge logs: after the first switch-over the readcheck goes on
/// clean on the destination. The second bridge runs with `--test-skip-dirty-log` (the
/// negative control, in the same run to stay within the lab's time budget): after the
/// second switch-over the readcheck finds a region read back wrong — stale device data.
#[test]
fn live_migration_between_two_controllers_on_one_nvme_namespace_in_nested_guests() {
    let _lock = lab_lock();
    let lab = Lab::new("test-migration-nvme").expect("lab setup");
    let opts = MigrationOptions::nested();
    let retried =
        migration::run_nvme_migration(&lab, &opts, true, Some('b')).expect("run the lab guest");
    let run = &retried.run;
    let nested = run
        .record(migration::NESTED_RECORD)
        .cloned()
        .unwrap_or_default();
    let ctx = format!(
        "{}\nbridges: {:?} {:?}\nlab guest: {:?}, {} tries, {:.0} s\nconsole tail:\n{}",
        serde_json::to_string_pretty(&nested).unwrap_or_default(),
        run.record("bridge_a"),
        run.record("bridge_b"),
        run.ending,
        retried.tries,
        run.elapsed.as_secs_f64(),
        vfblk_lab::vm::tail(&run.log, 30)
    );
    eprintln!("{ctx}");
    run.expect_success("the lab guest").unwrap();
    assert_eq!(nested["problems"], serde_json::json!([]), "{ctx}");
    assert_eq!(nested["qemu_stderr"], serde_json::json!([]), "{ctx}");
    let legs = nested["legs"].as_array().expect("the migrations");
    assert_eq!(legs.len(), 2, "there and back\n{ctx}");
    for leg in legs {
        assert_eq!(leg["status"], "completed", "{ctx}");
        assert_eq!(leg["destination_running"], true, "{ctx}");
    }
    // Both sources took QEMU's dirty log (the second marks nothing in it); neither bridge
    // logged an error.
    for side in ["bridge_a", "bridge_b"] {
        let bridge = run.record(side).expect("the bridge's summary");
        assert!(bridge["dirty_log_set"].as_u64() >= Some(1), "{side}\n{ctx}");
        assert_eq!(bridge["errors"], 0, "{side}\n{ctx}");
    }
    let rc = &nested["readcheck"];
    // The buffer lies where the migration's first pass sends it before the VM stops.
    assert_eq!(rc["buffer"]["below_asked"], true, "{ctx}");
    let secs_per_round =
        rc["seconds"].as_f64().unwrap_or(f64::NAN) / rc["rounds"].as_f64().unwrap_or(f64::NAN);
    let (first_end, second_start) = (
        legs[0]["ended_s"].as_f64().unwrap_or(f64::NAN),
        legs[1]["started_s"].as_f64().unwrap_or(f64::NAN),
    );
    // The first migration (source logging): the readcheck went on clean on the destination
    // for rounds after the switch-over, until the second migration began.
    assert!(
        second_start - first_end >= 2.0 * secs_per_round,
        "{second_start} - {first_end} s leave no round on the destination ({secs_per_round} s each)\n{ctx}"
    );
    // The second (source not logging): caught on its destination.
    assert_eq!(rc["ok"], false, "no stale read was caught\n{ctx}");
    assert_eq!(nested["readcheck_exit"], 1, "{ctx}");
    let caught = nested["steps"]
        .as_array()
        .and_then(|steps| {
            steps.iter().find(|s| {
                s[2].as_str()
                    .is_some_and(|t| t.starts_with("readcheck finished"))
            })
        })
        .cloned()
        .expect("the readcheck ended");
    assert_eq!(
        caught[1], "A2",
        "caught after the second switch-over\n{ctx}"
    );
    assert!(
        caught[0].as_f64() > Some(second_start),
        "caught after the second switch-over\n{ctx}"
    );
    // What was found is stale device data: every wrong block holds stamps (a block the
    // migration sent while the device wrote it holds the region read in part), and some
    // hold another region's, as the device wrote them into the buffer earlier.
    let examples = rc["mismatch"]["examples"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !examples.is_empty() && examples.iter().all(|e| e["found_region"].is_u64()),
        "stale device data, not corruption of another kind\n{ctx}"
    );
    assert!(
        examples
            .iter()
            .any(|e| e["found_region"] != rc["mismatch"]["region"]),
        "another region's stamps\n{ctx}"
    );
    eprintln!(
        "NVMe subsystem, two controllers on namespace 1: {} (total {} ms, downtime {} ms), then {} without the log (total {} ms, downtime {} ms): caught {:.1} s into the workload: {}",
        legs[0]["name"],
        legs[0]["total_time_ms"],
        legs[0]["downtime_ms"],
        legs[1]["name"],
        legs[1]["total_time_ms"],
        legs[1]["downtime_ms"],
        caught[0].as_f64().unwrap_or(f64::NAN),
        rc["mismatch"]
    );
}
