//! The unit of `dist/systemd/` under a real systemd: a lab guest boots Debian 12 with systemd
//! as PID 1 (lab/src/systemd.rs), installs the unit as shipped (sandbox and all) and the
//! project's binaries in /usr/local/bin, and starts it. A load generator in the guest drives
//! a RAM disk of the target over vhost-user with verify on while the target is upgraded,
//! SIGKILLed and hung; systemd is the supervisor and the fd store each time.

use serde_json::Value;
use vfblk_lab::systemd::SystemdLab;
use vfblk_lab::vm::{Echo, Limits};
use vfblk_tests::{assert_no_error_nor_reconnect, lab_lock, without_bulk};

/// What every test runs first: the unit started (systemctl returns once `READY=1` came,
/// Type=notify), a RAM disk and a controller made over RPC, a verifying load generator on it.
/// Helpers: `show PROP`, `die TEXT` (fails with the unit's journal), `wait_for CMD...`.
const PRELUDE: &str = r#". /lab/lib.sh
unit=vfblk-bridge
show() { systemctl show -p "$1" --value $unit; }
die() {
    journalctl -u $unit --no-pager -o short-monotonic | tail -n 60 | sed 's/^/journal: /'
    systemctl status $unit --no-pager 2>&1 | sed 's/^/status: /'
    fail "$*"
}
# wait_for SECONDS CMD...: until CMD succeeds.
wait_for() {
    local end=$(( $(date +%s) + $1 )); shift
    until "$@"; do
        [ $(date +%s) -lt $end ] || return 1
        sleep 0.1
    done
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# A JSON string's contents: control characters dropped, lines joined with \n.
json_str() {
    printf '%s' "$1" | tr -d '\000-\011\013-\037' | sed 's/\\/\\\\/g; s/"/\\"/g' \
        | sed ':a;N;$!ba;s/\n/\\n/g'
}
# The unit's journal (systemd's lines and the target's), for the host.
journal_record() {
    record "{\"journal\": \"$(json_str "$(journalctl -u $unit --no-pager -o short-monotonic)")\"}"
}
mkdir -p /etc/systemd/system/$unit.service.d
if [ -n "${EXTRA_ENV:-}" ]; then
    printf '[Service]\nEnvironment=%s\n' "$EXTRA_ENV" > /etc/systemd/system/$unit.service.d/test.conf
    systemctl daemon-reload
fi
step "systemctl start $unit (systemd $(systemctl --version | head -n1 | cut -d' ' -f2))"
t0=$(now_ms)
systemctl start $unit || die "systemctl start $unit failed"
start_ms=$(( $(now_ms) - t0 ))
[ "$(systemctl is-active $unit)" = active ] || die "not active after start"
pid0=$(show MainPID)
record "{\"start_ms\": $start_ms, \"active\": \"$(systemctl is-active $unit)\", \"type\": \"$(show Type)\", \"status_text\": \"$(json_str "$(show StatusText)")\", \"pid0\": $pid0, \"watchdog\": \"$(show WatchdogUSec)\"}"
vfblk-rpc backend-create m mem:/dev/shm/vfblk-m:64M > /dev/null || die "backend-create"
vfblk-rpc vhost-blk-create m --socket /run/vfblk/m.sock --backend m --queues 2 > /dev/null \
    || die "vhost-blk-create"
record "{\"status_text_serving\": \"$(json_str "$(show StatusText)")\"}"
# start_load SOCKET QUEUES NAME: a verifying load generator in the background, its report
# in /tmp/NAME.json, its pid in $started. Requests count as lost after 30 s, Linux's
# block-layer timeout: a hung poller's wait for systemd's watchdog (WatchdogSec=5 after the
# last ping, up to half a period after the hang) and the restart took 9.7-20 s under TCG.
start_load() {
    vfblk-loadgen --socket "$1" --queues "$2" --qd 8 --rw mixed --verify --json \
        --seconds 600 --reconnect-timeout-s 20 --log-gaps-over-ms 100 --io-timeout-s 30 \
        > /tmp/$3.json 2> /tmp/$3.err &
    started=$!
}
start_load /run/vfblk/m.sock 2 load
load=$started
# The load runs: the target counts its requests.
has_io() { vfblk-rpc --json stats 2>/dev/null | grep -q '"reads": [1-9]'; }
wait_for 30 has_io || die "no I/O from the load generator: $(cat /tmp/load.err)"
step "load running on /run/vfblk/m.sock (pid $pid0 serving)"
# finish_load: ends the load generator and hands its report to the host.
finish_load() {
    kill -TERM $load
    wait $load
    record "{\"load\": $(cat /tmp/load.json)}"
}
"#;

/// Boots the systemd guest with `body` after [`PRELUDE`] (and `env` in the unit, a drop-in),
/// then records the unit's journal; asserts the start ([`assert_started`]) and returns the
/// guest's records and the PID systemd started first.
fn run_in_systemd_guest(name: &str, env: Option<&str>, body: &str) -> (Vec<Value>, u64) {
    run_in_systemd_guest_with(name, env, body, None)
}

/// [`run_in_systemd_guest`], with an emulated NVMe controller of `nvme_mib` MiB in the guest
/// (VFIO loaded, not bound: the script does what an operator does).
fn run_in_systemd_guest_with(
    name: &str,
    env: Option<&str>,
    body: &str,
    nvme_mib: Option<u64>,
) -> (Vec<Value>, u64) {
    let _lock = lab_lock();
    let lab = SystemdLab::new(name).expect("systemd lab");
    let script = format!(
        "EXTRA_ENV='{}'\n{PRELUDE}\n{body}journal_record\n",
        env.unwrap_or_default()
    );
    let limits = Limits {
        boot: std::time::Duration::from_secs(240),
        total: std::time::Duration::from_secs(480),
    };
    let retried = lab
        .run_with_nvme(&script, limits, Echo::Steps, nvme_mib)
        .expect("systemd guest");
    let run = &retried.run;
    eprintln!(
        "{name}: systemd {}, boot {:.1} s (tries {}), whole run {:.1} s",
        lab.rootfs.systemd_version,
        run.boot_time.map(|t| t.as_secs_f64()).unwrap_or(0.0),
        retried.tries,
        run.elapsed.as_secs_f64()
    );
    run.expect_success(name).unwrap();
    let records = run.records.clone();
    assert_started(&records);
    let pid0 = field(&records, "pid0").as_u64().unwrap();
    (records, pid0)
}

fn field<'a>(records: &'a [Value], key: &str) -> &'a Value {
    records
        .iter()
        .find_map(|r| r.get(key))
        .unwrap_or_else(|| panic!("no record {key:?} in {records:?}"))
}

/// The unit's journal; asserts that the sandbox refused nothing (its system call filter
/// answers EPERM, its read-only system EROFS, its device list EPERM).
fn journal(records: &[Value]) -> String {
    let journal = field(records, "journal").as_str().unwrap_or("").to_string();
    for refused in ["EPERM", "Operation not permitted", "Read-only file system"] {
        assert!(!journal.contains(refused), "{refused}: {journal}");
    }
    journal
}

/// What every run shows of the start: Type=notify, active once `systemctl start` returned,
/// the target's STATUS= line, the watchdog period of the unit.
fn assert_started(records: &[Value]) {
    assert_eq!(field(records, "active"), "active");
    assert_eq!(field(records, "type"), "notify");
    assert_eq!(field(records, "watchdog"), "5s");
    let status = field(records, "status_text").as_str().unwrap();
    assert!(
        status.starts_with("serving 0 controller(s)"),
        "StatusText {status:?}"
    );
    let serving = field(records, "status_text_serving").as_str().unwrap();
    assert!(
        serving.starts_with("serving 1 controller(s) on 1 backend(s)"),
        "StatusText {serving:?}"
    );
}

/// Type=notify, then `vfblk-rpc upgrade` under load: systemd follows MAINPID= to the new
/// process (no restart, no reload), which keeps the watchdog fed past its period, and the
/// load sees no error and no reconnect. Besides the RAM disk, an NVMe controller the
/// sandboxed target drives through VFIO (bound by `vfblk-setup config --pci` as an operator
/// does, attached over RPC), whose queues the new process adopts.
#[test]
fn under_systemd_the_unit_starts_as_notify_and_an_upgrade_moves_mainpid_without_a_reconnect() {
    let (records, pid0) = run_in_systemd_guest_with(
        "systemd-upgrade",
        None,
        r#"bdf=$(pci_by_class 0x010802) || die "no NVMe controller in the guest"
vfblk-setup config --pci $bdf > /tmp/setup.out 2>&1 || die "vfblk-setup config --pci $bdf: $(cat /tmp/setup.out)"
vfblk-rpc nvme-attach nvme0 $bdf > /tmp/attach.out 2>&1 || die "nvme-attach: $(cat /tmp/attach.out)"
vfblk-rpc vhost-blk-create n --socket /run/vfblk/n.sock --backend nvme0n1 --queues 1 \
    > /dev/null || die "vhost-blk-create n"
start_load /run/vfblk/n.sock 1 load-n
load_n=$started
sleep 2
kill -0 $load_n || die "the NVMe backend's load generator ended: $(cat /tmp/load-n.err)"
step "vfblk-rpc upgrade"
vfblk-rpc --json upgrade > /tmp/upgrade.json || die "upgrade: $(cat /tmp/upgrade.json)"
record "{\"upgrade\": $(tr -d '\n' < /tmp/upgrade.json)}"
pid1=$(show MainPID)
# Past the unit's WatchdogSec=5: the new process pings for the service.
sleep 8
record "{\"after\": {\"pid1\": $pid1, \"pid_later\": $(show MainPID), \"active\": \"$(systemctl is-active $unit)\", \"sub\": \"$(show SubState)\", \"restarts\": $(show NRestarts), \"old_alive\": $(kill -0 $pid0 2>/dev/null && echo true || echo false)}}"
finish_load
kill -TERM $load_n
wait $load_n
record "{\"load_nvme\": $(cat /tmp/load-n.json)}"
# The process an upgrade started is stopped like the one systemd started (SIGTERM, drained).
t0=$(now_ms)
systemctl stop $unit || die "systemctl stop"
record "{\"stopped\": {\"stop_ms\": $(( $(now_ms) - t0 )), \"active\": \"$(systemctl is-active $unit)\", \"result\": \"$(show Result)\", \"pid1_alive\": $(kill -0 $pid1 2>/dev/null && echo true || echo false)}}"
"#,
        Some(256),
    );
    let upgrade = field(&records, "upgrade");
    assert_eq!(upgrade["old_pid"], pid0, "{upgrade}");
    let after = field(&records, "after");
    assert_ne!(
        after["pid1"], pid0,
        "MainPID still the old process: {after}"
    );
    assert_eq!(after["pid1"], after["pid_later"], "{after}");
    assert_eq!(after["active"], "active", "{after}");
    assert_eq!(after["sub"], "running", "{after}");
    assert_eq!(after["restarts"], 0, "systemd restarted the unit: {after}");
    assert_eq!(after["old_alive"], false, "{after}");
    let load = field(&records, "load");
    eprintln!("upgrade: {upgrade}; load: {}", without_bulk(load));
    assert_no_error_nor_reconnect(load);
    let load_nvme = field(&records, "load_nvme");
    eprintln!("the NVMe backend's load: {}", without_bulk(load_nvme));
    assert_no_error_nor_reconnect(load_nvme);
    let journal = journal(&records);
    assert!(
        journal.contains("took over 2 controller(s) from the previous process"),
        "{journal}"
    );
    assert!(
        journal.contains("the new process adopted its queues (controller kept enabled)"),
        "the NVMe controller's queues handed over: {journal}"
    );
    assert!(!journal.contains("Watchdog timeout"), "{journal}");
    let stopped = field(&records, "stopped");
    assert_eq!(stopped["active"], "inactive", "{stopped}");
    assert_eq!(stopped["result"], "success", "{stopped}");
    assert_eq!(stopped["pid1_alive"], false, "{stopped}");
}

/// SIGKILL of the main process, twice: the process systemd started, then one an upgrade
/// started (systemd warns it is "not our child" and may not notice its exit; as PID 1 it
/// inherits it when the old process exits, and does). Each time systemd starts the unit again
/// (Restart=always), the new process takes the connections from systemd's fd store
/// (`LISTEN_FDS`), and the loads continue with no error and no reconnect. Besides the RAM
/// disk, a file image in the unit's state directory served through io_uring, which the
/// sandbox's system call filter must let through (`@aio` in `@system-service`).
#[test]
fn under_systemd_a_sigkilled_target_comes_back_from_the_fd_store_without_a_reconnect() {
    let (records, pid0) = run_in_systemd_guest(
        "systemd-sigkill",
        None,
        r#"vfblk-rpc backend-create f file:/var/lib/vfblk/f.img:64M > /dev/null || die "backend-create file"
vfblk-rpc vhost-blk-create f --socket /run/vfblk/f.sock --backend f --queues 2 > /dev/null \
    || die "vhost-blk-create f"
record "{\"file_backend\": $(vfblk-rpc --json backend-list | tr -d '\n')}"
start_load /run/vfblk/f.sock 2 load-f
load_f=$started
sleep 2
kill -0 $load_f || die "the file backend's load generator ended: $(cat /tmp/load-f.err)"
back() {
    [ "$(show NRestarts)" = "$1" ] && [ "$(systemctl is-active $unit)" = active ] \
        && [ "$(show MainPID)" != "$2" ] && [ "$(show MainPID)" != 0 ]
}
disk_inode=$(stat -c %i /dev/shm/vfblk-m)
kills=""
for round in 1 2; do
    if [ $round = 2 ]; then
        old=$(show MainPID)
        vfblk-rpc upgrade > /dev/null || die "upgrade"
        moved() { [ "$(show MainPID)" != "$old" ] && ! kill -0 $old 2>/dev/null; }
        wait_for 10 moved || die "MainPID did not move from $old, or $old did not exit"
        sleep 1
    fi
    victim=$(show MainPID)
    step "SIGKILL of the main process $victim (round $round)"
    t0=$(now_ms)
    systemctl kill --signal=SIGKILL --kill-who=main $unit || die "systemctl kill"
    wait_for 30 back $round $victim || die "not active again after SIGKILL $round"
    kills="$kills{\"victim\": $victim, \"back_ms\": $(( $(now_ms) - t0 )), \"pid\": $(show MainPID)},"
    sleep 2
done
# The RAM disk is the file it was (RemoveIPC= would have deleted it at each restart).
record "{\"after\": {\"kills\": [${kills%,}], \"restarts\": $(show NRestarts), \"active\": \"$(systemctl is-active $unit)\", \"disk_inode\": [$disk_inode, $(stat -c %i /dev/shm/vfblk-m 2>/dev/null || echo 0)]}}"
# The last restart's process serves the file image too (its counters start at its start).
sleep 2
record "{\"stats_after_kills\": $(vfblk-rpc --json stats | tr -d '\n')}"
finish_load
kill -TERM $load_f
wait $load_f
record "{\"load_file\": $(cat /tmp/load-f.json)}"
"#,
    );
    let after = field(&records, "after");
    let kills = after["kills"].as_array().unwrap();
    assert_eq!(kills.len(), 2, "{after}");
    assert_eq!(kills[0]["victim"], pid0, "{after}");
    assert_ne!(
        kills[1]["victim"], kills[0]["pid"],
        "an upgraded process: {after}"
    );
    assert_eq!(after["restarts"], 2, "{after}");
    assert_eq!(after["active"], "active", "{after}");
    let inode = &after["disk_inode"];
    assert_eq!(inode[0], inode[1], "the RAM disk was replaced: {after}");
    let load = field(&records, "load");
    eprintln!("SIGKILL: {after}; load: {}", without_bulk(load));
    assert_no_error_nor_reconnect(load);
    let backends = field(&records, "file_backend");
    let file = backends
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "f"))
        .unwrap_or_else(|| panic!("no backend f: {backends}"));
    assert!(
        file["description"]
            .as_str()
            .unwrap_or("")
            .contains("io_uring"),
        "{file}"
    );
    let stats = field(&records, "stats_after_kills");
    let served = stats["controllers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "f"))
        .unwrap_or_else(|| panic!("no controller f: {stats}"));
    assert!(
        served["reads"].as_u64().unwrap_or(0) > 0 && served["writes"].as_u64().unwrap_or(0) > 0,
        "the file image served after the last restart: {served}"
    );
    let load_file = field(&records, "load_file");
    eprintln!("the file backend's load: {}", without_bulk(load_file));
    assert_no_error_nor_reconnect(load_file);
    let journal = journal(&records);
    let resumed = "started again from the fd store: 2 connection(s) resumed without reconnect";
    assert_eq!(journal.matches(resumed).count(), 2, "{journal}");
}

/// A poller that hangs (the test fault `VFBLK_TEST_HANG_POLLER`, set in a drop-in) stops the
/// target's WATCHDOG=1; systemd aborts it after WatchdogSec= and starts it again, and the
/// successor takes the connection from the fd store and runs the stuck requests again: the
/// load sees a pause, no error and no reconnect. Healthy pollers keep the watchdog fed for
/// longer than its period first.
#[test]
fn under_systemd_a_hung_poller_stops_the_watchdog_and_systemd_restarts_the_target() {
    let (records, pid0) = run_in_systemd_guest(
        "systemd-watchdog",
        Some("VFBLK_TEST_HANG_POLLER=/run/vfblk/hang-poller"),
        r#"sleep 7
[ "$(show NRestarts)" = 0 ] || die "restarted while its pollers were healthy"
step "a poller hangs"
t0=$(now_ms)
touch /run/vfblk/hang-poller
back() { [ "$(show NRestarts)" = 1 ] && [ "$(systemctl is-active $unit)" = active ]; }
wait_for 60 back || die "not restarted after the poller hung"
back_ms=$(( $(now_ms) - t0 ))
pid1=$(show MainPID)
sleep 3
record "{\"after\": {\"back_ms\": $back_ms, \"pid1\": $pid1, \"restarts\": $(show NRestarts), \"active\": \"$(systemctl is-active $unit)\", \"marker_left\": $([ -e /run/vfblk/hang-poller ] && echo true || echo false)}}"
finish_load
"#,
    );
    let after = field(&records, "after");
    assert_ne!(after["pid1"], pid0, "{after}");
    assert_eq!(after["restarts"], 1, "{after}");
    assert_eq!(
        after["marker_left"], false,
        "the fault never fired: {after}"
    );
    // systemd waits WatchdogSec=5 from the last ping, which came at most half a period
    // after the hang; then the restart: 9.7-20 s seen under TCG (the longer with the host's
    // two cores busy with other work), within the 30 s a guest's block layer waits.
    let back_ms = after["back_ms"].as_u64().unwrap();
    assert!((4000..30_000).contains(&back_ms), "{after}");
    let load = field(&records, "load");
    eprintln!("watchdog: {after}; load: {}", without_bulk(load));
    assert_no_error_nor_reconnect(load);
    let journal = journal(&records);
    for line in [
        "VFBLK_TEST_HANG_POLLER: this poller hangs now",
        "made no progress",
        "Watchdog timeout",
        "started again from the fd store: 1 connection(s) resumed without reconnect",
    ] {
        assert!(
            journal.contains(line),
            "no {line:?} in the journal: {journal}"
        );
    }
}
