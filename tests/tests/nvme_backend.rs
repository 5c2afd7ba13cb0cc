//! The bridge's NVMe backend in the lab guest: vfblk-bridge serves the emulated NVMe
//! controller (through our VFIO driver, guest memory mapped at IOVA = GPA) and vfblk-loadgen
//! verifies data through it while the bridge is killed with SIGKILL and restarted (each new
//! bridge brings the controller up again and re-runs what was in flight). Requests larger than
//! the controller's MDTS are split.

use std::time::Duration;

use serde_json::Value;

use vfblk_lab::scenario::{Contents, Lab};
use vfblk_lab::vm::Echo;
use vfblk_tests::lab_lock;

const SCRIPT: &str = r#". /lab/lib.sh
modprobe vfio_iommu_type1 && modprobe vfio_pci || fail "modprobe"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller"
vfblk-nvme bind-vfio $bdf || fail "bind-vfio"
start_bridge() {
    rm -f /tmp/b.sock
    vfblk-bridge --socket /tmp/b.sock --backend nvme:$bdf >/dev/null 2>>/tmp/bridge.log &
    echo $! > /tmp/bridge.pid
    for i in $(seq 1 200); do [ -S /tmp/b.sock ] && return 0; sleep 0.05; done
    cat /tmp/bridge.log; fail "bridge did not start"
}
start_bridge
step "1 MiB requests (twice the MDTS) with verify"
vfblk-loadgen --socket /tmp/b.sock --rw mixed --verify --bs 1048576 --qd 4 --seconds 3 --json > /tmp/big.json || { cat /tmp/big.json /tmp/bridge.log; fail "large requests"; }
record "{\"split\": $(cat /tmp/big.json)}"
step "a migrating frontend: the controller's DMA into guest memory is marked in its dirty log"
vfblk-loadgen --socket /tmp/b.sock --rw read --bs 65536 --qd 8 --seconds 2 --dirty-log --json > /tmp/dirty.json || { cat /tmp/dirty.json /tmp/bridge.log; fail "dirty log of reads"; }
record "{\"dirty_reads\": $(cat /tmp/dirty.json)}"
step "4 KiB mixed verify, bridge killed with SIGKILL 3 times"
vfblk-loadgen --socket /tmp/b.sock --rw mixed --verify --bs 4096 --qd 16 --seconds 12 --json > /tmp/lg.json &
lg=$!
for k in 1 2 3; do sleep 2.5; kill -9 $(cat /tmp/bridge.pid); start_bridge; done
wait $lg; rc=$?
record "{\"kills\": $(cat /tmp/lg.json)}"
grep -c "recovered from the inflight region" /tmp/bridge.log > /tmp/recovered
record "{\"recovered\": $(cat /tmp/recovered), \"backend\": \"$(grep -m1 'serving' /tmp/bridge.log | tr -d '\"')\"}"
[ $rc = 0 ] || { cat /tmp/bridge.log; fail "loadgen reported errors"; }
step "a lost completion: timeout, controller reset, every command in flight sent again"
kill -9 $(cat /tmp/bridge.pid)
rm -f /tmp/b.sock
vfblk-bridge --socket /tmp/b.sock --backend nvme:$bdf --nvme-timeout-ms 1000 --test-lose-nvme-completion 3000 >/dev/null 2>/tmp/lost.log &
echo $! > /tmp/bridge.pid
for i in $(seq 1 200); do [ -S /tmp/b.sock ] && break; sleep 0.05; done
vfblk-loadgen --socket /tmp/b.sock --rw mixed --verify --bs 4096 --qd 16 --seconds 8 --json > /tmp/lost.json
rc=$?
record "{\"lost_completion\": $(cat /tmp/lost.json), \"resets\": $(grep -c 'resetting the controller' /tmp/lost.log), \"resent\": $(grep -c 'commands in flight are sent again' /tmp/lost.log)}"
[ $rc = 0 ] || { cat /tmp/lost.log; fail "loadgen reported errors across the reset"; }
step "scatter lists PRPs cannot describe: through SGLs, then with SGLs ignored through bounce buffers"
vfblk-loadgen --socket /tmp/b.sock --rw mixed --verify --unaligned --bs 65536 --qd 8 --seconds 2 --dirty-log --json > /tmp/sgl.json || { cat /tmp/sgl.json /tmp/lost.log; fail "unaligned buffers with SGLs"; }
kill -9 $(cat /tmp/bridge.pid)
rm -f /tmp/b.sock
vfblk-bridge --socket /tmp/b.sock --backend nvme:$bdf --nvme-no-sgl >/dev/null 2>/tmp/nosgl.log &
echo $! > /tmp/bridge.pid
for i in $(seq 1 200); do [ -S /tmp/b.sock ] && break; sleep 0.05; done
vfblk-loadgen --socket /tmp/b.sock --rw mixed --verify --unaligned --bs 65536 --qd 8 --seconds 3 --dirty-log --json > /tmp/bounce.json || { cat /tmp/bounce.json /tmp/nosgl.log; fail "unaligned buffers without SGLs"; }
vfblk-loadgen --socket /tmp/b.sock --rw mixed --verify --bs 1048576 --qd 2 --seconds 2 --json > /tmp/aligned.json || { cat /tmp/aligned.json /tmp/nosgl.log; fail "aligned buffers without SGLs"; }
record "{\"unaligned_sgl\": $(cat /tmp/sgl.json), \"unaligned_bounce\": $(cat /tmp/bounce.json), \"aligned_no_sgl\": $(cat /tmp/aligned.json)}"
"#;

/// Runs `script` in a lab guest with the emulated controller (one 256 MiB namespace).
fn run_script(lab_name: &str, script: &str) -> vfblk_lab::vm::RetriedRun {
    let lab = Lab::new(lab_name).expect("lab setup");
    lab.run_l2(
        script,
        Contents::default(),
        256,
        Duration::from_secs(300),
        Echo::Steps,
    )
    .expect("run the lab guest")
}

#[test]
fn nvme_backend_verifies_across_sigkills() {
    let _lock = lab_lock();
    let retried = run_script("test-nvme-backend", SCRIPT);
    let run = &retried.run;
    let split = run.record("split").cloned();
    let kills = run.record("kills").cloned();
    eprintln!(
        "1 MiB requests: {split:?}\nkills: {kills:?}\n{:?}",
        run.record("backend")
    );
    run.expect_success("NVMe backend").unwrap();
    let clean = |r: &serde_json::Value| {
        for key in ["verify_errors", "failed", "lost", "not_a_head"] {
            assert_eq!(r[key], 0, "{key}: {r}");
        }
    };
    let split = split.unwrap();
    clean(&split);
    assert!(split["reads"].as_u64().unwrap() > 0, "{split}");
    // Acting as a migration's source, the load generator found exactly the pages the
    // controller's DMA (and our status bytes and used rings) wrote marked in the log: through
    // PRPs, through SGLs, and through bounce buffers copied into guest memory.
    for key in ["dirty_reads", "unaligned_sgl", "unaligned_bounce"] {
        let r = run
            .record(key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} record"));
        let log = &r["dirty_log"];
        assert_eq!(log["missing_pages"], 0, "{key}: {log}");
        assert_eq!(log["extra_pages"], 0, "{key}: {log}");
        assert!(
            log["written_pages"].as_u64().unwrap_or(0) > 100,
            "{key}: {log}"
        );
    }
    let kills = kills.unwrap();
    clean(&kills);
    assert_eq!(kills["reconnects"], 3, "{kills}");
    assert_eq!(run.record("recovered"), Some(&serde_json::json!(3)));
    // A completion the controller lost: found by the command timeout, answered with a reset,
    // and the guest (the load generator) saw nothing but a pause.
    let lost = run
        .record("lost_completion")
        .cloned()
        .expect("lost-completion record");
    clean(&lost);
    assert!(lost["ios"].as_u64().unwrap() > 3000, "{lost}");
    assert_eq!(
        run.record("resets"),
        Some(&serde_json::json!(1)),
        "one reset"
    );
    assert_eq!(run.record("resent"), Some(&serde_json::json!(1)));
    // Scatter lists PRPs cannot describe: SGLs where the controller has them, bounce buffers
    // where it has none (or they are ignored); the data verifies either way.
    for key in ["unaligned_sgl", "unaligned_bounce", "aligned_no_sgl"] {
        let r = run
            .record(key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} record"));
        clean(&r);
        assert!(r["reads"].as_u64().unwrap() > 0, "{key}: {r}");
    }
}

/// The start of a script with the target on the NVMe backend under `vfblk-keeper`, its RPC
/// socket at /tmp/rpc.sock, its vhost-user socket /tmp/k.sock, `target_pid` to ask it its pid.
/// `$TARGET` may name a wrapper of vfblk-bridge.
const KEPT_NVME_TARGET: &str = r#". /lab/lib.sh
modprobe vfio_iommu_type1 && modprobe vfio_pci || fail "modprobe"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller"
vfblk-nvme bind-vfio $bdf || fail "bind-vfio"
vfblk-keeper --dir /tmp/keep --json -- ${TARGET:-vfblk-bridge} --socket /tmp/k.sock --backend nvme:$bdf --rpc /tmp/rpc.sock >/tmp/keeper.json 2>/tmp/kept.log &
kp=$!
for i in $(seq 1 200); do [ -S /tmp/rpc.sock ] && break; sleep 0.05; done
[ -S /tmp/rpc.sock ] || { cat /tmp/kept.log; fail "the kept target did not start"; }
target_pid() { vfblk-rpc --socket /tmp/rpc.sock --json stats | tr -d ' \n' | sed -n 's/.*"pid":\([0-9]*\).*/\1/p'; }
"#;

/// The NVMe backend under `vfblk-keeper` in the lab guest. The keeper holds the
/// controller's VFIO fds, DMA memory and record, so each target started after a SIGKILL takes
/// the controller over as the dead one left it: no vfio-pci function reset, no controller
/// reset, guest RAM still mapped; the dead process's I/O queues are deleted (every command
/// on them completed or aborted) before what it had in flight is re-run. First the target's
/// driver holds every completion it gets (16 requests out, their completions unread in the
/// CQ) and is killed so; then 3 SIGKILLs under a verifying load generator, the first of
/// whose successors fails its take-over and resets the controller instead.
const KEPT_SCRIPT: &str = r#"step "completions held by the driver across a SIGKILL: the successor deletes the dead process's queues before it re-runs anything"
vfblk-loadgen --socket /tmp/k.sock --rw mixed --verify --bs 4096 --qd 16 --seconds 8 --json > /tmp/held.json &
lg=$!
for i in $(seq 1 200); do grep -q "holds every completion" /tmp/kept.log && break; sleep 0.1; done
grep -q "holds every completion" /tmp/kept.log || { cat /tmp/kept.log; fail "the driver never held its completions"; }
sleep 1
kill -9 $(target_pid)
wait $lg; rc=$?
record "{\"held\": $(cat /tmp/held.json), \"held_rerun\": \"$(grep -o '[0-9]* request(s) to run again' /tmp/kept.log | head -1)\", \"held_takeover\": \"$(grep -m1 'taken over as the previous process left it' /tmp/kept.log | grep -o '[0-9]* of its I/O queue pair(s) deleted')\", \"held_order\": [$(grep -n -m1 'taken over as the previous process left it' /tmp/kept.log | cut -d: -f1), $(grep -n -m1 'request(s) to run again' /tmp/kept.log | cut -d: -f1)]}"
[ $rc = 0 ] || { cat /tmp/kept.log; fail "loadgen reported errors across the held completions"; }
step "4 KiB mixed verify, the target under vfblk-keeper killed with SIGKILL 3 times"
vfblk-loadgen --socket /tmp/k.sock --rw mixed --verify --bs 4096 --qd 16 --seconds 12 --json > /tmp/lg.json &
lg=$!
for k in 1 2 3; do
    sleep 2.5
    p=$(target_pid)
    [ -n "$p" ] || { cat /tmp/kept.log; fail "no target pid"; }
    kill -9 $p
done
wait $lg; rc=$?
record "{\"kept_kills\": $(cat /tmp/lg.json)}"
grep -c "1 connection(s) resumed without reconnect" /tmp/kept.log > /tmp/resumed
kill $kp; wait $kp
record "{\"resumed\": $(cat /tmp/resumed), \"keeper\": $(cat /tmp/keeper.json), \"taken_over\": $(grep -c 'taken over as the previous process left it, with no reset' /tmp/kept.log), \"reset\": $(grep -c 'resetting it' /tmp/kept.log)}"
[ $rc = 0 ] || { cat /tmp/kept.log; fail "loadgen reported errors"; }
"#;

/// A wrapper of vfblk-bridge whose first start holds its NVMe completions after 2,000, and
/// whose third start fails to take the controller over (`VFBLK_TEST_RECOVER_FAULT`: the
/// fallback, a reset while the keeper still holds the device's fds).
const HOLD_ONCE: &str = r#"cat > /tmp/hold-once <<'WRAPPER'
#!/bin/sh
n=$(cat /tmp/starts 2>/dev/null || echo 0); n=$((n + 1)); echo $n > /tmp/starts
case $n in
1) exec vfblk-bridge --test-hold-nvme-completions 2000 "$@" ;;
3) VFBLK_TEST_RECOVER_FAULT=1 exec vfblk-bridge "$@" ;;
*) exec vfblk-bridge "$@" ;;
esac
WRAPPER
chmod +x /tmp/hold-once
TARGET=/tmp/hold-once
"#;

#[test]
fn nvme_backend_verifies_across_sigkills_under_the_keeper_without_reconnecting() {
    let _lock = lab_lock();
    let retried = run_script(
        "test-nvme-kept",
        &format!("{HOLD_ONCE}{KEPT_NVME_TARGET}{KEPT_SCRIPT}"),
    );
    let run = &retried.run;
    let kills = run.record("kept_kills").cloned();
    let held = run.record("held").cloned();
    eprintln!(
        "NVMe backend under the keeper, 3 SIGKILLs: {} I/Os, {} verify errors, {} reconnects, longest gap {} ms; connections resumed {:?}; taken over {:?}, reset {:?}; keeper {:?}; completions held, then a SIGKILL: {} I/Os, {} verify errors, {} reconnects, {:?}, {:?}",
        kills.as_ref().map_or(Value::Null, |k| k["ios"].clone()),
        kills.as_ref().map_or(Value::Null, |k| k["verify_errors"].clone()),
        kills.as_ref().map_or(Value::Null, |k| k["reconnects"].clone()),
        kills.as_ref().map_or(Value::Null, |k| k["max_gap_ms"].clone()),
        run.record("resumed"),
        run.record("taken_over"),
        run.record("reset"),
        run.record("keeper"),
        held.as_ref().map_or(Value::Null, |k| k["ios"].clone()),
        held.as_ref().map_or(Value::Null, |k| k["verify_errors"].clone()),
        held.as_ref().map_or(Value::Null, |k| k["reconnects"].clone()),
        run.record("held_rerun"),
        run.record("held_takeover"),
    );
    run.expect_success("NVMe backend under the keeper").unwrap();
    vfblk_tests::assert_no_error_nor_reconnect(&held.expect("held record"));
    // The 16 held requests (the load generator's queue depth) were re-run, after the dead
    // process's queue pair was deleted (the take-over's line comes first in the log).
    assert_eq!(
        run.record("held_rerun").and_then(Value::as_str),
        Some("16 request(s) to run again")
    );
    let order = run.record("held_order").cloned().unwrap_or(Value::Null);
    assert!(
        order[0].as_u64().is_some() && order[0].as_u64() < order[1].as_u64(),
        "the take-over (log line {}) before the re-run (line {})",
        order[0],
        order[1]
    );
    assert_eq!(
        run.record("held_takeover").and_then(Value::as_str),
        Some("1 of its I/O queue pair(s) deleted")
    );
    vfblk_tests::assert_no_error_nor_reconnect(&kills.expect("kept_kills record"));
    assert_eq!(run.record("resumed"), Some(&serde_json::json!(4)));
    // Every successor took the controller as it was but the one made to fail, which reset
    // it (the stored fds dropped first) and served on: no error, no reconnect.
    assert_eq!(run.record("taken_over"), Some(&serde_json::json!(3)));
    assert_eq!(run.record("reset"), Some(&serde_json::json!(1)));
}

/// Upgrades by hand-over of a target on the NVMe backend, under `vfblk-keeper`, mixed with
/// SIGKILLs: the old process quiesces and hands the controller over enabled with its queues
/// (its VFIO fds, the memfds of its DMA memory with their IOVAs, the queue pairs' positions);
/// the new one maps the same memory at the same IOVAs, adopts the queues where they stand
/// and takes the guest RAM mappings over as they are. Six upgrades first, two of them whose
/// new process fails after it adopted everything (refuses, or dies): the old one takes the
/// controller back (reset) and serves on. Then the fallbacks, each followed by an upgrade
/// that adopts again: a new binary that does not read the queue record (an older one: the
/// controller is lent disabled, brought up in the other half of the driver's IOVAs, and the
/// old process unmaps its memory), and one whose adoption fails after everything was
/// adopted (it brings the controller up instead; nothing it adopted may be unmapped or
/// leak). A leaked mapping would make a later process's mapping fail (EEXIST).
const UPGRADE_SCRIPT: &str = r#"hugepages() { awk '/HugePages_Free/ {print $2}' /proc/meminfo; }
upgrade() {
    vfblk-rpc --socket /tmp/rpc.sock --json upgrade $2 | tr -d ' \n' >> /tmp/upgrades.json || { cat /tmp/kept.log; fail "upgrade $1 refused"; }
    echo >> /tmp/upgrades.json
}
step "4 KiB mixed verify through 20 upgrades by hand-over (2 of them fallbacks), 2 failed ones and 10 SIGKILLs of the target under vfblk-keeper"
vfblk-loadgen --socket /tmp/k.sock --rw mixed --verify --bs 4096 --qd 16 --seconds 600 --json > /tmp/lg.json &
lg=$!
sleep 2
free_before=$(hugepages)
for u in 1 2 3 4 5; do upgrade $u; sleep 1; done
for fault in refuse die; do
    printf '#!/bin/sh\nVFBLK_TEST_HANDOVER_FAULT=%s exec vfblk-bridge "$@"\n' $fault > /tmp/$fault
    chmod +x /tmp/$fault
    if vfblk-rpc --socket /tmp/rpc.sock upgrade --binary /tmp/$fault > /tmp/$fault.out 2>&1; then
        cat /tmp/$fault.out; fail "an upgrade to a binary that fails ($fault) went through"
    fi
    sleep 1
done
upgrade 6
sleep 1
printf '#!/bin/sh\nVFBLK_TEST_NVME_QUEUE_VERSIONS= exec vfblk-bridge "$@"\n' > /tmp/older
printf '#!/bin/sh\nVFBLK_TEST_HANDOVER_FAULT=adopt exec vfblk-bridge "$@"\n' > /tmp/adoptfail
printf '#!/bin/sh\nunset VFBLK_TEST_NVME_QUEUE_VERSIONS VFBLK_TEST_HANDOVER_FAULT\nexec vfblk-bridge "$@"\n' > /tmp/clean
chmod +x /tmp/older /tmp/adoptfail /tmp/clean
for b in older clean adoptfail clean; do upgrade $b "--binary /tmp/$b"; sleep 1; done
for k in 1 2 3 4 5 6 7 8 9 10; do
    p=$(target_pid)
    [ -n "$p" ] || { cat /tmp/kept.log; fail "no target pid"; }
    kill -9 $p
    sleep 1.5
    upgrade $((k + 10))
    sleep 1
done
free_after=$(hugepages)
kill -INT $lg; wait $lg; rc=$?
record "{\"nvme_upgrades\": $(cat /tmp/lg.json)}"
record "{\"reports\": [$(paste -sd, /tmp/upgrades.json)], \"hugepages_free\": [$free_before, $free_after], \"resumed\": $(grep -c '1 connection(s) resumed without reconnect' /tmp/kept.log), \"released\": $(grep -c 'DMA mappings released' /tmp/kept.log), \"taken_back\": $(grep -c 'taken back after the hand-over failed' /tmp/kept.log), \"borrower_unmapped\": $(grep -c 'the borrower had mapped' /tmp/kept.log), \"guest_ram_taken_over\": $(grep -c 'taken over as the previous process mapped it' /tmp/kept.log), \"queues_adopted\": $(grep -c 'queues adopted as the previous process left them' /tmp/kept.log), \"crash_taken_over\": $(grep -c 'taken over as the previous process left it, with no reset' /tmp/kept.log), \"crash_reset\": $(grep -c 'resetting it' /tmp/kept.log)}"
record "{\"arenas\": \"$(grep -o 'DMA arena(s) of [0-9]* KiB' /tmp/kept.log | sort -u | paste -sd, -)\", \"windows\": \"$(grep 'taken over as the previous process mapped it' /tmp/kept.log | grep -o 'at IOVA 0x[0-9a-f]*' | sort -u | paste -sd, -)\"}"
kill $kp; wait $kp
[ $rc = 0 ] || { cat /tmp/kept.log; fail "loadgen reported errors"; }
"#;

#[test]
fn nvme_backend_verifies_across_upgrades_and_sigkills_under_the_keeper_without_reconnecting() {
    let _lock = lab_lock();
    let retried = run_script(
        "test-nvme-upgrade",
        &format!("{KEPT_NVME_TARGET}{UPGRADE_SCRIPT}"),
    );
    let run = &retried.run;
    let load = run.record("nvme_upgrades").cloned();
    let (reports, pauses) = vfblk_lab::nvme_l3::upgrade_reports(run);
    eprintln!(
        "NVMe backend under the keeper, 20 upgrades (+2 failed) + 10 SIGKILLs: {} I/Os, {} verify errors, {} reconnects, longest gap {} ms; upgrade pauses (target side) {pauses:.1?} ms; hugepages free {:?}; connections resumed {:?}; old processes that released their mappings {:?}",
        load.as_ref().map_or(Value::Null, |k| k["ios"].clone()),
        load.as_ref().map_or(Value::Null, |k| k["verify_errors"].clone()),
        load.as_ref().map_or(Value::Null, |k| k["reconnects"].clone()),
        load.as_ref().map_or(Value::Null, |k| k["max_gap_ms"].clone()),
        run.record("hugepages_free"),
        run.record("resumed"),
        run.record("released"),
    );
    run.expect_success("NVMe backend: upgrades and SIGKILLs under the keeper")
        .unwrap();
    vfblk_tests::assert_no_error_nor_reconnect(&load.expect("nvme_upgrades record"));
    assert_eq!(pauses.len(), 20, "every upgrade reported: {reports:?}");
    assert!(
        reports.iter().all(|r| r["connections"] == 1),
        "the connection went along every time: {reports:?}"
    );
    // Which path each upgrade took, as its report says: all adopted the queues but the
    // older binary's (7th) and the one whose adoption failed (9th).
    let adopted: Vec<bool> = reports
        .iter()
        .map(|r| r["nvme"][0]["queues_adopted"] == true)
        .collect();
    let expected: Vec<bool> = (0..20).map(|i| i != 6 && i != 8).collect();
    assert_eq!(adopted, expected, "{reports:?}");
    // (The script strips the reports' spaces.)
    let why = |i: usize| {
        reports[i]["nvme"][0]["why_not"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(why(6).contains("lentitdisabled"), "{}", why(6));
    assert!(why(8).contains("VFBLK_TEST_HANDOVER_FAULT"), "{}", why(8));
    assert_eq!(run.record("resumed"), Some(&serde_json::json!(10)));
    // Only the old processes of the two fallbacks unmap their memory; after an adoption it
    // stays mapped for the new process.
    assert_eq!(run.record("released"), Some(&serde_json::json!(2)));
    // The two failed ones and the one whose adoption failed took it over too, and so did
    // each process started after a SIGKILL: the keeper held the controller, its memory and
    // its mappings, so the successor took it over as the dead one left it, never reset.
    assert_eq!(
        run.record("guest_ram_taken_over"),
        Some(&serde_json::json!(32)),
        "no upgrade or restart mapped the guest RAM again"
    );
    assert_eq!(run.record("crash_taken_over"), Some(&serde_json::json!(10)));
    assert_eq!(run.record("crash_reset"), Some(&serde_json::json!(0)));
    // 18 successful adoptions and the two upgrades that failed after adopting.
    assert_eq!(run.record("queues_adopted"), Some(&serde_json::json!(20)));
    assert_eq!(
        run.record("taken_back"),
        Some(&serde_json::json!(2)),
        "the refused and the died upgrade"
    );
    // Flat: the adopted DMA memory never grew, the guest RAM stayed in one IOVA window.
    let one = |key: &str| {
        let v = run
            .record(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        assert!(!v.is_empty() && !v.contains(','), "{key}: {v}");
    };
    one("arenas");
    one("windows");
    let free = run
        .record("hugepages_free")
        .cloned()
        .expect("hugepages record");
    assert_eq!(free[0], free[1], "hugepages leaked: {free}");
}

/// Upgrades of the lab guest's NVMe target measured beside a RAM disk target's, one after
/// the other in the same guest, each under its own verifying load generator (QD16), and
/// for comparison the NVMe target's upgrades by the path before queues were handed over
/// (every new process says it reads no queue record, so the controller is lent disabled
/// and brought up again): the
/// pause the old process reports per upgrade (`pause_ms`) and the longest gap the load
/// generator saw. `VFBLK_TEST_NVME_UPGRADES` upgrades of each (default 30: the suite's time
/// budget; docs/recovery.md records a run of 100).
const PAUSE_SCRIPT: &str = r#". /lab/lib.sh
modprobe vfio_iommu_type1 && modprobe vfio_pci || fail "modprobe"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller"
vfblk-nvme bind-vfio $bdf || fail "bind-vfio"
hugepages() { awk '/HugePages_Free/ {print $2}' /proc/meminfo; }
measure() {
    name=$1; backend=$2
    rm -f /tmp/$name.sock /tmp/$name.rpc
    env $3 vfblk-bridge --socket /tmp/$name.sock --backend $backend --rpc /tmp/$name.rpc >/dev/null 2>/tmp/$name.log &
    for i in $(seq 1 200); do [ -S /tmp/$name.rpc ] && break; sleep 0.05; done
    [ -S /tmp/$name.rpc ] || { cat /tmp/$name.log; fail "the $name target did not start"; }
    vfblk-loadgen --socket /tmp/$name.sock --rw mixed --verify --bs 4096 --qd 16 --seconds 3600 --json > /tmp/$name-lg.json &
    lg=$!
    sleep 2
    free_before=$(hugepages)
    : > /tmp/$name-up.json
    for u in $(seq 1 UPGRADES); do
        vfblk-rpc --socket /tmp/$name.rpc --json upgrade | tr -d ' \n' >> /tmp/$name-up.json || { cat /tmp/$name.log; fail "$name upgrade $u refused"; }
        echo >> /tmp/$name-up.json
        sleep 0.3
    done
    free_after=$(hugepages)
    kill -INT $lg; wait $lg; rc=$?
    record "{\"$name\": {\"load\": $(cat /tmp/$name-lg.json), \"reports\": [$(paste -sd, /tmp/$name-up.json)], \"hugepages_free\": [$free_before, $free_after], \"handed_ms\": [$(grep -o 'DMA arena(s)) in [0-9.]* ms' /tmp/$name.log | sed 's/.* in \([0-9.]*\) ms/\1/' | paste -sd, -)], \"adopted_ms\": [$(grep -o 'same IOVAs) in [0-9.]* ms' /tmp/$name.log | sed 's/.* in \([0-9.]*\) ms/\1/' | paste -sd, -)]}}"
    [ $rc = 0 ] || { cat /tmp/$name.log; fail "$name: loadgen reported errors"; }
    kill $(vfblk-rpc --socket /tmp/$name.rpc --json stats | tr -d ' \n' | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
    sleep 1
}
step "UPGRADES upgrades of an NVMe target, of one that brings the controller up at each (the path before queues were handed over), then of a RAM disk target, each under a verifying load generator"
measure nvme nvme:$bdf
measure lent nvme:$bdf VFBLK_TEST_NVME_QUEUE_VERSIONS=
measure mem mem:/tmp/mem.img:256M
"#;

/// Runs a measurement `script` in a lab guest with `placeholder` replaced by how many
/// events to make: `$variable`, else `default`; the guest gets 5 min plus `seconds_each`
/// per event. Returns that count and the run.
fn measure_in_the_lab(
    lab_name: &str,
    script: &str,
    placeholder: &str,
    variable: &str,
    default: usize,
    seconds_each: u64,
) -> (usize, vfblk_lab::vm::RetriedRun) {
    let count: usize = std::env::var(variable)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let lab = Lab::new(lab_name).expect("lab setup");
    let retried = lab
        .run_l2(
            &script.replace(placeholder, &count.to_string()),
            Contents::default(),
            256,
            Duration::from_secs(300 + seconds_each * count as u64),
            Echo::Steps,
        )
        .expect("run the lab guest");
    (count, retried)
}

#[test]
#[ignore = "a measurement for docs/recovery.md: the 3x-the-RAM-disk target is not met in every run (3.1x in a quiet CI run by hand); the adoption path and its fallbacks are checked by nvme_backend_verifies_across_upgrades_and_sigkills_under_the_keeper_without_reconnecting"]
fn nvme_upgrade_pauses_beside_the_ram_disk() {
    let _lock = lab_lock();
    let (upgrades, retried) = measure_in_the_lab(
        "test-nvme-pauses",
        PAUSE_SCRIPT,
        "UPGRADES",
        "VFBLK_TEST_NVME_UPGRADES",
        30,
        9,
    );
    let run = &retried.run;
    let mut p99 = Vec::new();
    for name in ["nvme", "lent", "mem"] {
        let r = run.record(name).cloned().unwrap_or(Value::Null);
        let reports = r["reports"].as_array().cloned().unwrap_or_default();
        let pauses: Vec<f64> = reports
            .iter()
            .filter_map(|r| r["pause_ms"].as_f64())
            .collect();
        let gap = r["load"]["max_gap_ms"].clone();
        eprintln!(
            "{name}: {} upgrades, pause (target side) {}; longest gap the load generator saw {gap} ms; {} I/Os, {} verify errors, {} reconnects; hugepages free {}",
            pauses.len(),
            if pauses.is_empty() { "-".into() } else { vfblk_tests::percentiles(pauses.clone()) },
            r["load"]["ios"],
            r["load"]["verify_errors"],
            r["load"]["reconnects"],
            r["hugepages_free"],
        );
        if name == "nvme" {
            let ms = |key: &str| -> Vec<f64> {
                r[key]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default()
            };
            for key in ["handed_ms", "adopted_ms"] {
                let v = ms(key);
                if !v.is_empty() {
                    eprintln!("nvme: {key} {}", vfblk_tests::percentiles(v));
                }
            }
            let adopted = reports
                .iter()
                .filter(|r| r["nvme"][0]["queues_adopted"] == true)
                .count();
            eprintln!(
                "nvme: {adopted} of {} upgrades adopted the queues",
                reports.len()
            );
            assert_eq!(adopted, reports.len(), "{reports:?}");
        }
        if name == "lent" {
            assert!(
                reports
                    .iter()
                    .all(|r| r["nvme"][0]["queues_adopted"] == false),
                "{reports:?}"
            );
        }
        let mut sorted = pauses.clone();
        sorted.sort_by(f64::total_cmp);
        p99.push(
            sorted
                .get(((sorted.len() as f64 * 0.99) as usize).min(sorted.len().saturating_sub(1)))
                .copied(),
        );
        run.expect_success("NVMe and RAM disk upgrades").unwrap();
        vfblk_tests::assert_no_error_nor_reconnect(&r["load"]);
        assert_eq!(pauses.len(), upgrades, "every upgrade reported");
        assert_eq!(
            r["hugepages_free"][0], r["hugepages_free"][1],
            "hugepages leaked"
        );
    }
    let (nvme, mem) = (p99[0].unwrap(), p99[2].unwrap());
    // Within 3x the RAM disk's pause at p99 (the issue's target). Its other target, 5 ms
    // at p99, is out of reach in this lab whatever the backend: the TCG-emulated guest makes
    // the RAM disk's own upgrade pause some 30-75 ms (docs/recovery.md).
    assert!(
        nvme <= 3.0 * mem,
        "NVMe upgrade pause p99 {nvme:.2} ms against the RAM disk's {mem:.2} ms"
    );
}

/// What the nested guest's fio writes and verifies while the target restarts 20 times: it
/// must outlast the restarts. 128 MiB once ended before the last restart (2026-12-07, a CI
/// run by hand, after the request path got cheaper: fio took about 22 s on an idle machine
/// against some 30-40 s of restarts). Now the whole disk (256 MiB: 44-75 s measured) and
/// half a second, not one, from an upgrade to the next kill (about 25 s of restarts; a kill
/// keeps its 1.5 s, the time a restart takes here), so fio outlasts them.
const RESTART_FIO_MIB: u32 = 256;

/// SIGKILLs of the lab guest's NVMe target under `vfblk-keeper` measured beside a RAM disk
/// target's, one after the other in the same guest, each under its own verifying load
/// generator (QD16): the longest gap the load generator saw and how long each successor
/// took to take the controller over. `VFBLK_TEST_NVME_KILLS` kills of each (default 100).
const KILL_GAP_SCRIPT: &str = r#". /lab/lib.sh
modprobe vfio_iommu_type1 && modprobe vfio_pci || fail "modprobe"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller"
vfblk-nvme bind-vfio $bdf || fail "bind-vfio"
hugepages() { awk '/HugePages_Free/ {print $2}' /proc/meminfo; }
measure() {
    name=$1; backend=$2
    rm -rf /tmp/$name.sock /tmp/$name.rpc /tmp/keep-$name
    vfblk-keeper --dir /tmp/keep-$name --json -- vfblk-bridge --socket /tmp/$name.sock --backend $backend --rpc /tmp/$name.rpc >/tmp/$name-keeper.json 2>/tmp/$name.log &
    kp=$!
    for i in $(seq 1 200); do [ -S /tmp/$name.rpc ] && break; sleep 0.05; done
    [ -S /tmp/$name.rpc ] || { cat /tmp/$name.log; fail "the $name target did not start"; }
    pid() { vfblk-rpc --socket /tmp/$name.rpc --json stats 2>/dev/null | tr -d ' \n' | sed -n 's/.*"pid":\([0-9]*\).*/\1/p'; }
    vfblk-loadgen --socket /tmp/$name.sock --rw mixed --verify --bs 4096 --qd 16 --seconds 3600 --json > /tmp/$name-lg.json &
    lg=$!
    sleep 2
    free_before=$(hugepages)
    for k in $(seq 1 KILLS); do
        p=$(pid)
        [ -n "$p" ] || { cat /tmp/$name.log; fail "$name: no target pid before kill $k"; }
        kill -9 $p
        for i in $(seq 1 200); do q=$(pid); [ -n "$q" ] && [ "$q" != "$p" ] && break; sleep 0.05; done
        sleep 0.3
    done
    free_after=$(hugepages)
    kill -INT $lg; wait $lg; rc=$?
    record "{\"$name\": {\"load\": $(cat /tmp/$name-lg.json), \"hugepages_free\": [$free_before, $free_after], \"resumed\": $(grep -c '1 connection(s) resumed without reconnect' /tmp/$name.log), \"taken_over_ms\": [$(grep -o 'window(s) of guest RAM kept mapped, in [0-9.]* ms' /tmp/$name.log | sed 's/.* in \([0-9.]*\) ms/\1/' | paste -sd, -)], \"reset\": $(grep -c 'resetting it' /tmp/$name.log)}}"
    kill $kp; wait $kp
    [ $rc = 0 ] || { cat /tmp/$name.log; fail "$name: loadgen reported errors"; }
}
step "KILLS SIGKILLs of an NVMe target under vfblk-keeper, then of a RAM disk target, each under a verifying load generator"
measure nvme nvme:$bdf
measure mem mem:/tmp/mem.img:256M
"#;

#[test]
#[ignore = "a measurement for docs/recovery.md (about 3 min per 100 kills of each); the take-over path is checked by nvme_backend_verifies_across_sigkills_under_the_keeper_without_reconnecting"]
fn nvme_sigkill_gaps_beside_the_ram_disk() {
    let _lock = lab_lock();
    let (kills, retried) = measure_in_the_lab(
        "test-nvme-kill-gaps",
        KILL_GAP_SCRIPT,
        "KILLS",
        "VFBLK_TEST_NVME_KILLS",
        100,
        4,
    );
    let run = &retried.run;
    let mut gaps = Vec::new();
    for name in ["nvme", "mem"] {
        let r = run.record(name).cloned().unwrap_or(Value::Null);
        let taken: Vec<f64> = r["taken_over_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        eprintln!(
            "{name}: {kills} SIGKILLs, longest gap the load generator saw {} ms; {} I/Os, {} verify errors, {} reconnects; connections resumed {}; controller taken over {} time(s) ({}), reset {}; hugepages free {}",
            r["load"]["max_gap_ms"],
            r["load"]["ios"],
            r["load"]["verify_errors"],
            r["load"]["reconnects"],
            r["resumed"],
            taken.len(),
            if taken.is_empty() { "-".into() } else { vfblk_tests::percentiles(taken.clone()) },
            r["reset"],
            r["hugepages_free"],
        );
        gaps.push(r["load"]["max_gap_ms"].as_f64());
        run.expect_success("NVMe and RAM disk SIGKILLs").unwrap();
        vfblk_tests::assert_no_error_nor_reconnect(&r["load"]);
        assert_eq!(r["resumed"], kills, "every kill resumed its connection");
        assert_eq!(
            r["hugepages_free"][0], r["hugepages_free"][1],
            "hugepages leaked"
        );
        if name == "nvme" {
            assert_eq!(
                taken.len(),
                kills,
                "every successor took the controller over"
            );
            assert_eq!(r["reset"], 0, "no successor reset the controller");
        }
    }
    eprintln!(
        "longest gaps: NVMe {:?} ms, RAM disk {:?} ms",
        gaps[0], gaps[1]
    );
}

/// A QEMU guest (L3, under KVM in the lab guest) running fio with verify on a disk served
/// by the NVMe backend ([`vfblk_lab::nvme_l3`]), while the target is upgraded by hand-over
/// 10 times and killed with SIGKILL 10 times under `vfblk-keeper` (`kept`), or, today's
/// reconnect path, killed and started again 10 times with QEMU reconnecting; past emulator
/// faults. Its `l3_vhost` record has fio's figures and QEMU's complaints about the
/// connection.
fn l3_fio_across_restarts_past_emulator_faults(
    lab_name: &str,
    qemu10: bool,
    kept: bool,
) -> vfblk_lab::vm::RetriedRun {
    let o = vfblk_lab::nvme_l3::NvmeL3 {
        qemu10,
        kept,
        upgrades: if kept { 10 } else { 0 },
        kills: 10,
        fio_mib: RESTART_FIO_MIB,
    };
    vfblk_lab::nvme_l3::run_past_emulator_faults(lab_name, &o).expect("run the lab guest")
}

/// Checks and prints a [`vfblk_lab::nvme_l3`] run; returns fio's longest completion.
fn check_l3_run(retried: &vfblk_lab::vm::RetriedRun, what: &str, kept: bool) -> f64 {
    let run = &retried.run;
    let l3 = run.record("l3_vhost").cloned().unwrap_or_default();
    let (reports, pauses) = vfblk_lab::nvme_l3::upgrade_reports(run);
    let max_ms = l3["max_latency_ms"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "{what}: {}; fio exit {}, {} writes + {} verified reads in {} ms, longest completion {max_ms:.0} ms; upgrade pauses (target side) {pauses:.1?} ms; connections resumed {:?}, requests recovered {:?}, call fds replaced while running {:?}; QEMU about the connection: {}; L3 tries {}",
        l3["qemu"],
        l3["fio_exit"],
        l3["writes"],
        l3["verified_reads"],
        l3["fio_runtime_ms"],
        run.record("resumed"),
        run.record("recovered"),
        run.record("call_fds_while_running"),
        l3["qemu_vhost_lines"],
        l3["tries"],
    );
    if l3.get("qemu_threads").is_some() {
        // The nested QEMU outlived its run (a deadline): where its threads were waiting.
        eprintln!(
            "{what}: L3 ended {}; QEMU's threads then: {}",
            l3["ending"], l3["qemu_threads"]
        );
    }
    run.expect_success(what).unwrap();
    assert_eq!(l3["fio_exit"], 0, "{l3}");
    assert_eq!(
        run.record("events_during_fio"),
        Some(&serde_json::json!(true)),
        "fio ran until the last restart (fio ran {} ms)",
        l3["fio_runtime_ms"]
    );
    if kept {
        assert_eq!(pauses.len(), 10, "{reports:?}");
        assert!(reports.iter().all(|r| r["connections"] == 1), "{reports:?}");
        assert_eq!(run.record("resumed"), Some(&serde_json::json!(10)));
        // Each upgrade's new process and each process started after a SIGKILL took the
        // guest RAM mappings over; every restart took the controller as it was.
        assert_eq!(
            run.record("guest_ram_taken_over"),
            Some(&serde_json::json!(20)),
            "no upgrade or restart mapped the guest RAM again"
        );
        assert_eq!(run.record("crash_taken_over"), Some(&serde_json::json!(10)));
        assert_eq!(run.record("crash_reset"), Some(&serde_json::json!(0)));
        assert_eq!(
            l3["qemu_vhost_lines"],
            serde_json::json!([]),
            "QEMU never saw the connection drop"
        );
    }
    max_ms
}

#[test]
fn qemu_guest_fio_on_nvme_across_upgrades_and_sigkills_without_reconnect() {
    let _lock = lab_lock();
    let run = l3_fio_across_restarts_past_emulator_faults("test-nvme-l3-kept", false, true);
    check_l3_run(
        &run,
        "QEMU 7.2 guest on the NVMe backend, 10 upgrades + 10 SIGKILLs under the keeper",
        true,
    );
}

#[test]
#[ignore = "out of the test command for its time (about 5 min; the QEMU 7.2 twin runs, and QEMU 10 under the keeper runs in the packed-ring and migration tests). Its L3 freeze in CI matches by its symptoms the one classified by hand (docs/lab.md): the lab guest's kernel oopsed in the nested vCPU's thread, an emulator fault now ended at once and retried"]
fn qemu_10_guest_fio_on_nvme_across_upgrades_and_sigkills_without_reconnect() {
    let _lock = lab_lock();
    let run = l3_fio_across_restarts_past_emulator_faults("test-nvme-l3-kept-q10", true, true);
    check_l3_run(
        &run,
        "QEMU 10 guest on the NVMe backend, 10 upgrades + 10 SIGKILLs under the keeper",
        true,
    );
}

/// Today's reconnect path for comparison (docs/recovery.md), on demand: `cargo test -p
/// vfblk-tests --test nvme_backend reconnect_path -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement for docs/recovery.md (two more nested runs), not a check"]
fn qemu_guest_fio_on_nvme_across_sigkills_reconnect_path() {
    let _lock = lab_lock();
    for qemu10 in [false, true] {
        let run =
            l3_fio_across_restarts_past_emulator_faults("test-nvme-l3-reconnect", qemu10, false);
        check_l3_run(&run, "NVMe backend, 10 SIGKILLs, QEMU reconnecting", false);
    }
}

/// The whole stack: a second-level VM under the lab guest's KVM whose virtio-blk disk is a
/// vhost-user-blk device served by vfblk-bridge in the lab guest, through the NVMe backend
/// and our VFIO driver (SGLs ignored), to the emulated NVMe controller behind the virtual
/// IOMMU. In the second-level VM, O_DIRECT writes and reads through 512-byte iovecs at
/// sub-page offsets (`vfblk-lab iovec-verify`: scatter lists PRPs cannot describe, bounced)
/// verify every byte; then fio writes and verifies while the driver loses one completion:
/// the command timeout resets the controller mid-run and the bridge re-sends what the reset
/// aborted; the guest sees a pause, fio no error.
const STACK_SCRIPT: &str = r#". /lab/lib.sh
modprobe vfio_iommu_type1 && modprobe vfio_pci || fail "modprobe"
modprobe kvm_amd || fail "modprobe kvm_amd"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller"
vfblk-nvme bind-vfio $bdf || fail "bind-vfio"
vfblk-bridge --socket /tmp/b.sock --backend nvme:$bdf --nvme-no-sgl --nvme-timeout-ms 1000 --test-lose-nvme-completion 4000 >/dev/null 2>/tmp/bridge.log &
for i in $(seq 1 200); do [ -S /tmp/b.sock ] && break; sleep 0.05; done
[ -S /tmp/b.sock ] || { cat /tmp/bridge.log; fail "bridge did not start"; }
step "L3 VM under KVM (queue-size=1024), its disk on the bridge's NVMe backend without SGLs: O_DIRECT through sub-page iovecs, then fio with verify, a completion lost mid-run"
vfblk-lab nested --vhost-user /tmp/b.sock --queue-size 1024 --iovec-check || { cat /tmp/bridge.log; fail "L3 on the NVMe backend"; }
record "{\"stack_resets\": $(grep -c 'resetting the controller' /tmp/bridge.log), \"stack_resent\": $(grep -c 'commands in flight are sent again' /tmp/bridge.log), \"rings_256\": $(grep -c 'started with 256 entries' /tmp/bridge.log), \"rings_1024\": $(grep -c 'started with 1024 entries' /tmp/bridge.log), \"bounced\": $(grep -c 'go through bounce buffers' /tmp/bridge.log)}"
"#;

#[test]
fn nested_vm_on_the_nvme_backend() {
    let _lock = lab_lock();
    let lab = Lab::new("test-nvme-stack").expect("lab setup");
    let nested = Contents {
        fio: false,
        nested: true,
        qemu10: false,
        boot_disk: false,
        qsd: false,
    };
    let budget = vfblk_lab::scenario::L3_LIMITS.total * vfblk_lab::scenario::L3_TRIES;
    let retried = lab
        .run_l2(
            STACK_SCRIPT,
            nested,
            256,
            budget + Duration::from_secs(120),
            Echo::Steps,
        )
        .expect("run the lab guest");
    let run = &retried.run;
    let l3 = run.record("l3_vhost").cloned();
    eprintln!("L3 on the NVMe backend: {l3:?}");
    run.expect_success("nested VM on the NVMe backend").unwrap();
    let l3 = l3.expect("L3 record");
    assert_eq!(l3["fio_exit"], 0, "{l3}");
    assert_eq!(l3["fio_error"], 0, "{l3}");
    assert_eq!(l3["writes"], 16 * 256, "{l3}");
    assert_eq!(l3["verified_reads"], 16 * 256, "{l3}");
    // Sub-page iovecs from O_DIRECT in the guest: scatter lists PRPs cannot describe, on a
    // controller driven without SGLs: bounced, every byte verified.
    assert_eq!(l3["iovec"]["mismatches"], 0, "{l3}");
    assert!(l3["iovec"]["requests"].as_u64() > Some(1000), "{l3}");
    assert!(
        run.record("bounced").and_then(Value::as_u64) >= Some(1),
        "the bounce path served them: {:?}",
        run.record("bounced")
    );
    // The lost completion (the 4000th command: after the iovec check, inside fio) was found
    // by the 1 s timeout and answered with one controller reset; fio waited, nothing failed.
    assert!(l3["max_latency_ms"].as_f64() > Some(900.0), "{l3}");
    // One lost completion per queue pair, and a nested guest tried again (an emulator
    // fault) connects again, so gets a queue pair of its own: each try that got past its
    // 4000th command met one (a fresh-clone run saw 2 resets over 2 tries).
    let tries = l3["tries"].as_u64().unwrap_or(1);
    let resets = run
        .record("stack_resets")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert!(
        (1..=tries).contains(&resets),
        "{resets} reset(s) over {tries} nested guest run(s)"
    );
    let resent = run
        .record("stack_resent")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert!(
        resent >= resets,
        "the lost command re-sent at each reset: {resent} re-sent, {resets} reset(s)"
    );
    // queue-size=1024: the firmware drove the ring with 256 entries first (inside the
    // 1024-entry inflight region), then the guest kernel with 1024.
    let rings = |key: &str| run.record(key).and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(
        rings("rings_256") >= 1,
        "firmware's 256-entry ring was served"
    );
    assert!(
        rings("rings_1024") >= 1,
        "the kernel's 1024-entry ring was served"
    );
}

/// Boot deadline of each of two L3 VMs sharing one L2 vCPU: they boot at half speed
/// (72-120 s seen, against 15-37 s for one alone).
const TWO_VM_BOOT_S: u64 = 240;
/// Longest wait of the first booted of them for the other at the start gate.
const TWO_VM_GATE_WAIT_S: u64 = 420;

/// Who drives the two namespaces of the shared-controller test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Frontends {
    /// Two load generators verifying at once (what CI runs).
    TwoLoadgens,
    /// An L3 VM with fio verify, the load generator beside it.
    VmAndLoadgen,
    /// Two L3 VMs with fio verify.
    TwoVms,
}

/// One target, one emulated NVMe controller with two namespaces attached by RPC, two
/// frontends at once, each with its own vhost-user-blk controller on one namespace. Every
/// frontend's RAM starts at guest-physical 0, so their mappings can only coexist in
/// separate IOVA windows.
fn shared_script(frontends: Frontends) -> String {
    // The load generator verifies in light rounds while the first frontend runs (a heavy
    // load beside a booting nested VM makes the emulated KVM fail more boots).
    let loadgen_rounds = "rounds=0; rb=0\nwhile kill -0 $a 2>/dev/null; do\n    vfblk-loadgen --socket /tmp/b.sock --rw mixed --verify --qd 2 --seconds 2 --seed 5 --json > /tmp/lgb.json || rb=1\n    rounds=$((rounds+1))\n    sleep 1\ndone\nrecord \"{\\\"loadgen_rounds\\\": $rounds, \\\"loadgen_last\\\": $(cat /tmp/lgb.json)}\"";
    let (what, first, second) = match frontends {
        // The rounds end 8 s before the first frontend's 20 s do: one that started as the
        // first disconnected (kill -0 still saw the process writing its report) opened a
        // queue pair of its own, and the count of queue pairs no longer showed sharing.
        Frontends::TwoLoadgens => (
            "two load generators",
            "vfblk-loadgen --socket /tmp/a.sock --rw mixed --verify --qd 8 --seconds 20 --json > /tmp/lga.json &",
            &*loadgen_rounds.replace(
                "while kill -0 $a 2>/dev/null; do",
                "end=$(( $(date +%s) + 12 ))\nwhile kill -0 $a 2>/dev/null && [ $(date +%s) -lt $end ]; do",
            ),
        ),
        Frontends::VmAndLoadgen => (
            "an L3 VM and the load generator",
            "vfblk-lab nested --vhost-user /tmp/a.sock > /tmp/l3a.out 2>&1 &",
            loadgen_rounds,
        ),
        Frontends::TwoVms => (
            "two L3 VMs",
            "taskset -c 1 vfblk-lab nested --vhost-user /tmp/a.sock --boot-deadline {TWO_VM_BOOT_S} --start-gate /tmp/gate --gate-wait {TWO_VM_GATE_WAIT_S} > /tmp/l3a.out 2>&1 &",
            "taskset -c 1 vfblk-lab nested --vhost-user /tmp/b.sock --boot-deadline {TWO_VM_BOOT_S} --start-gate /tmp/gate --gate-wait {TWO_VM_GATE_WAIT_S} > /tmp/l3b.out 2>&1 &\nb=$!\nwait $b; rb=$?",
        ),
    };
    SHARED_SCRIPT
        .replace("{WHAT}", what)
        .replace("{FIRST}", first)
        .replace("{SECOND}", second)
        .replace("{TWO_VM_BOOT_S}", &TWO_VM_BOOT_S.to_string())
        .replace("{TWO_VM_GATE_WAIT_S}", &TWO_VM_GATE_WAIT_S.to_string())
}

const SHARED_SCRIPT: &str = r#". /lab/lib.sh
modprobe vfio_iommu_type1 && modprobe vfio_pci || fail "modprobe"
modprobe kvm_amd || fail "modprobe kvm_amd"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller"
vfblk-nvme bind-vfio $bdf || fail "bind-vfio"
vfblk-bridge --config /tmp/target.json --rpc /tmp/rpc.sock >/dev/null 2>/tmp/bridge.log &
for i in $(seq 1 200); do [ -S /tmp/rpc.sock ] && break; sleep 0.05; done
[ -S /tmp/rpc.sock ] || { cat /tmp/bridge.log; fail "target did not start"; }
vfblk-rpc -s /tmp/rpc.sock --json nvme-attach nvme0 $bdf > /tmp/attach.json || { cat /tmp/bridge.log; fail "nvme_attach"; }
record "{\"attach\": $(tr -d '\n' < /tmp/attach.json)}"
vfblk-rpc -s /tmp/rpc.sock vhost-blk-create vm-a --socket /tmp/a.sock --backend nvme0n1 || fail "create vm-a"
vfblk-rpc -s /tmp/rpc.sock vhost-blk-create vm-a2 --socket /tmp/a2.sock --backend nvme0n1 2>/tmp/second.err && fail "a second controller on one NVMe backend was accepted (its DMA maps one frontend's memory)"
grep -q "serves one frontend" /tmp/second.err || { cat /tmp/second.err; fail "the second controller's refusal does not say why"; }
vfblk-rpc -s /tmp/rpc.sock vhost-blk-create vm-b --socket /tmp/b.sock --backend nvme0n2 || fail "create vm-b"
step "{WHAT} at once, one namespace each, verifying"
{FIRST}
a=$!
{SECOND}
wait $a; ra=$?
cat /tmp/l3a.out /tmp/l3b.out 2>/dev/null
[ -f /tmp/lga.json ] && record "{\"loadgen_first\": $(cat /tmp/lga.json)}"
record "{\"queue_pairs\": $(grep -c 'I/O queue pair' /tmp/bridge.log)}"
grep "mapped at IOVA" /tmp/bridge.log | sed 's/.*namespace/namespace/' > /tmp/maps
record "{\"maps\": \"$(tr '\n' ';' < /tmp/maps | tr -d '\"')\"}"
vfblk-rpc -s /tmp/rpc.sock --json stats > /tmp/stats.json
record "{\"stats\": $(tr -d '\n' < /tmp/stats.json)}"
record "{\"saved\": $(tr -d '\n' < /tmp/target.json)}"
[ $ra = 0 ] && [ $rb = 0 ] || { tail -20 /tmp/bridge.log; fail "a frontend failed ($ra, $rb)"; }
step "one namespace split in two for two frontends at once, both verifying"
rpc() { vfblk-rpc -s /tmp/rpc.sock "$@" || { tail -5 /tmp/bridge.log; fail "vfblk-rpc $*"; }; }
rpc vhost-blk-delete vm-a
rpc vhost-blk-delete vm-b
rpc nvme-detach nvme0
rpc backend-create low "nvme:$bdf:1@0+64M"
rpc backend-create high "nvme:$bdf:1@64M+64M"
vfblk-rpc -s /tmp/rpc.sock backend-create overlap "nvme:$bdf:1@32M+64M" 2>/tmp/overlap.err && fail "an overlapping part was accepted"
rpc vhost-blk-create low --socket /tmp/low.sock --backend low
rpc vhost-blk-create high --socket /tmp/high.sock --backend high
vfblk-loadgen --socket /tmp/low.sock --rw mixed --verify --qd 8 --seconds 3 --json > /tmp/low.json &
l=$!
vfblk-loadgen --socket /tmp/high.sock --rw mixed --verify --qd 8 --seconds 3 --seed 7 --json > /tmp/high.json
rh=$?
wait $l; rl=$?
record "{\"parts\": {\"low\": $(cat /tmp/low.json), \"high\": $(cat /tmp/high.json), \"overlap_refused\": \"$(tr -d '\"\n' < /tmp/overlap.err)\"}}"
[ $rl = 0 ] && [ $rh = 0 ] || { tail -20 /tmp/bridge.log; fail "verify on the namespace parts"; }
"#;

/// `namespace N: guest RAM 0xA..0xB mapped at IOVA 0xC..0xD` lines: (nsid, gpa start, iova
/// start, iova end).
fn mappings(text: &str) -> Vec<(u32, u64, u64, u64)> {
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap();
    text.split(';')
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let nsid = l
                .trim()
                .strip_prefix("namespace ")
                .and_then(|r| r.split(':').next())
                .unwrap()
                .parse()
                .unwrap();
            let (ram, iova) = l.split_once(" mapped at IOVA ").unwrap();
            let gpa = hex(ram.rsplit(' ').next().unwrap().split("..").next().unwrap());
            let (lo, hi) = iova.split_once("..").unwrap();
            (nsid, gpa, hex(lo), hex(hi))
        })
        .collect()
}

fn shared_controller(frontends: Frontends) {
    let _lock = lab_lock();
    let lab = Lab::new("test-nvme-shared").expect("lab setup");
    let nested = Contents {
        fio: false,
        nested: frontends != Frontends::TwoLoadgens,
        qemu10: false,
        boot_disk: false,
        qsd: false,
    };
    let l3_limits = match frontends {
        Frontends::TwoVms => vfblk_lab::scenario::l3_limits_with_boot(TWO_VM_BOOT_S),
        _ => vfblk_lab::scenario::L3_LIMITS,
    };
    // The start gate's wait comes on top of each try's limit.
    let budget = l3_limits.total * vfblk_lab::scenario::L3_TRIES
        + if frontends == Frontends::TwoVms {
            Duration::from_secs(TWO_VM_GATE_WAIT_S)
        } else {
            Duration::ZERO
        };
    let retried = lab
        .run_l2_namespaces(
            &shared_script(frontends),
            nested,
            &[128, 128],
            budget + Duration::from_secs(120),
            Echo::Steps,
        )
        .expect("run the lab guest");
    let run = &retried.run;
    let vms: Vec<serde_json::Value> = run
        .records
        .iter()
        .filter_map(|r| r.get("l3_vhost").cloned())
        .collect();
    eprintln!(
        "L3 VMs on one NVMe controller: {vms:?}; load generator beside: {:?}",
        run.record("loadgen_rounds")
    );
    run.expect_success("two frontends on one NVMe controller")
        .unwrap();
    let attach = run.record("attach").expect("attach record");
    assert_eq!(
        attach["backends"],
        serde_json::json!(["nvme0n1", "nvme0n2"])
    );
    let want_vms = match frontends {
        Frontends::TwoLoadgens => 0,
        Frontends::VmAndLoadgen => 1,
        Frontends::TwoVms => 2,
    };
    assert_eq!(vms.len(), want_vms, "{vms:?}");
    if let Some(first) = run.record("loadgen_first") {
        for key in ["verify_errors", "failed", "lost"] {
            assert_eq!(first[key], 0, "{first}");
        }
    }
    if frontends != Frontends::TwoVms {
        // The load generator verified round after round while the VM booted and ran fio.
        let rounds = run
            .record("loadgen_rounds")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        assert!(rounds >= 3, "{rounds} load generator rounds");
        let last = run.record("loadgen_last").unwrap();
        assert_eq!(last["verify_errors"], 0, "{last}");
    }
    for vm in &vms {
        if frontends == Frontends::TwoVms {
            // Both booted, then both started fio at the same moment.
            assert_eq!(vm["gate"], "go", "{vm}");
        }
        assert_eq!(vm["fio_exit"], 0, "{vm}");
        assert_eq!(vm["fio_error"], 0, "{vm}");
        assert_eq!(vm["verified_reads"], 16 * 256, "{vm}");
    }
    // Both guests' RAM starts at guest-physical 0; namespace 1's VM is DMA'd in the first
    // 32 GiB window (IOVA = GPA), namespace 2's in the second, and nothing of either leaves
    // its window.
    let maps = mappings(run.record("maps").unwrap().as_str().unwrap());
    const WINDOW: u64 = 32 << 30;
    for nsid in [1u32, 2] {
        let mine: Vec<_> = maps.iter().filter(|m| m.0 == nsid).collect();
        assert!(
            !mine.is_empty(),
            "no mapping for namespace {nsid}: {maps:?}"
        );
        let base = u64::from(nsid - 1) * WINDOW;
        assert!(mine.iter().any(|m| m.1 == 0), "{maps:?}");
        for &&(_, gpa, lo, hi) in &mine {
            assert_eq!(lo, base + gpa, "{maps:?}");
            assert!(lo >= base && hi <= base + WINDOW, "{maps:?}");
        }
    }
    // Both namespaces' queues ran on the target's one poller, through one queue pair.
    if frontends == Frontends::TwoLoadgens {
        assert_eq!(run.record("queue_pairs"), Some(&serde_json::json!(1)));
    }
    let stats = run.record("stats").expect("stats");
    for c in stats["controllers"].as_array().unwrap() {
        assert_eq!(c["errors"], 0, "{c}");
        // Real I/O on each: the light load generator rounds beside the first frontend do
        // as much as the emulator's speed allows (473 writes with two other lab runs on the
        // machine, 2,711 in a CI run, 4,096 or more in others); what each frontend wrote is
        // verified by its own record above.
        assert!(c["writes"].as_u64().unwrap() >= 100, "{c}");
    }
    // The attachment is saved as such, its namespaces are not separate backends.
    let saved = run.record("saved").expect("saved config");
    assert_eq!(saved["nvme"][0]["name"], "nvme0", "{saved}");
    assert_eq!(saved["backends"], serde_json::json!([]), "{saved}");
    // Two halves of one namespace, verified at once by two frontends: had the offset been
    // lost, both would write the same blocks and each would read the other's data.
    let parts = run.record("parts").expect("parts record");
    for half in ["low", "high"] {
        let r = &parts[half];
        for key in ["verify_errors", "failed", "lost"] {
            assert_eq!(r[key], 0, "{half}: {r}");
        }
        assert!(r["reads"].as_u64().unwrap() > 0, "{half}: {r}");
    }
    let refused = parts["overlap_refused"].as_str().unwrap();
    assert!(refused.contains("already serves"), "{refused}");
}

#[test]
fn two_frontends_share_one_nvme_controller_each_in_its_own_iova_window() {
    shared_controller(Frontends::TwoLoadgens);
}

/// The same with an L3 VM (fio verify) beside the load generator. Not run by default: with
/// load beside it, the nested VM under KVM-in-TCG crashes the first-level guest's kernel
/// (stack guard hits, double faults in KVM's vCPU loop) in about one run of three on this
/// 2-core machine. Run with `cargo test -p vfblk-tests --test nvme_backend -- --ignored`.
#[test]
#[ignore = "a nested VM beside other load breaks the TCG first-level guest about one run in three"]
fn a_vm_and_another_frontend_share_one_nvme_controller_each_in_its_own_iova_window() {
    shared_controller(Frontends::VmAndLoadgen);
}

/// The same with two L3 VMs at once, each running fio verify on its own namespace. Both are
/// pinned to L2's vCPU 1: with nested guests running on both of the TCG guest's vCPUs, its
/// kernel hit stack guard pages and double faults in KVM's vCPU loop in about half the runs
/// (also when each VM was pinned to a vCPU of its own); on one vCPU, 5 runs of 5 were clean.
#[test]
fn two_vms_share_one_nvme_controller_each_in_its_own_iova_window() {
    shared_controller(Frontends::TwoVms);
}
