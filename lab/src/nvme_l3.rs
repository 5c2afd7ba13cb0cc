//! The whole stack under restarts: inside the lab guest, `vfblk-bridge` drives the emulated
//! NVMe controller through VFIO (our driver, behind the virtual IOMMU) and serves it over
//! vhost-user-blk to a second-level guest under the lab guest's KVM, where fio writes and
//! verifies; meanwhile the target is upgraded by hand-over and SIGKILLed under `vfblk-keeper`
//! (or, without the keeper, SIGKILLed and started again, QEMU reconnecting). Shared by the
//! NVMe system tests and `vfblk-lab demo --nvme`.

use crate::scenario::{Contents, Lab, L3_LIMITS, L3_TRIES};
use crate::vm::{Echo, RetriedRun, Run};
use crate::Result;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct NvmeL3 {
    /// The second-level guest's QEMU is Debian's QEMU 10 (bookworm-backports) rather than 7.2.
    pub qemu10: bool,
    /// The target runs under `vfblk-keeper` (upgrades and SIGKILLs without a reconnect);
    /// otherwise it is SIGKILLed and started again, QEMU reconnecting (no upgrades).
    pub kept: bool,
    /// Upgrades by hand-over (with `kept`).
    pub upgrades: u32,
    /// SIGKILLs.
    pub kills: u32,
    /// MiB fio writes and verifies in the second-level guest.
    pub fio_mib: u32,
}

/// Runs of [`run`] at most when the nested guest's run ended by an emulator fault: on
/// 2026-11-24 about half the QEMU 10 runs did (docs/lab.md).
pub const RUNS: u32 = 4;

/// The lab guest's script.
fn script(o: &NvmeL3) -> String {
    let qemu_flag = if o.qemu10 { "--qemu-10" } else { "" };
    let (upgrades, kills) = (o.upgrades, o.kills);
    let (start, events) = if o.kept {
        (
            "RUST_LOG=info,vfblk_vhost=debug vfblk-keeper --dir /tmp/keep --json -- vfblk-bridge --socket /tmp/k.sock --backend nvme:$bdf --rpc /tmp/rpc.sock >/tmp/keeper.json 2>/tmp/kept.log &\n\
             for i in $(seq 1 200); do [ -S /tmp/rpc.sock ] && break; sleep 0.05; done"
                .to_string(),
            // One upgrade and one kill per round while either is left, as many as asked.
            format!(
                r#"for k in $(seq 1 {rounds}); do
    if [ $k -le {upgrades} ]; then
        vfblk-rpc --socket /tmp/rpc.sock --json upgrade | tr -d ' \n' >> /tmp/upgrades.json || {{ cat /tmp/kept.log; fail "upgrade $k refused"; }}
        echo >> /tmp/upgrades.json
        sleep 0.5
    fi
    if [ $k -le {kills} ]; then
        p=$(vfblk-rpc --socket /tmp/rpc.sock --json stats | tr -d ' \n' | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
        [ -n "$p" ] || {{ cat /tmp/kept.log; fail "no target pid"; }}
        kill -9 $p
        sleep 1.5
    fi
done"#,
                rounds = upgrades.max(kills)
            ),
        )
    } else {
        (
            "start_bridge() { vfblk-bridge --socket /tmp/k.sock --backend nvme:$bdf >/dev/null 2>>/tmp/kept.log & echo $! > /tmp/bridge.pid; }\n\
             start_bridge\n\
             for i in $(seq 1 200); do [ -S /tmp/k.sock ] && break; sleep 0.05; done"
                .to_string(),
            format!(
                r#"for k in $(seq 1 {kills}); do
    sleep 1
    kill -9 $(cat /tmp/bridge.pid)
    start_bridge
    sleep 1.5
done"#
            ),
        )
    };
    let fio_mib = o.fio_mib;
    format!(
        r#". /lab/lib.sh
modprobe vfio_iommu_type1 && modprobe vfio_pci || fail "modprobe"
modprobe kvm_amd || fail "modprobe kvm_amd"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller"
vfblk-nvme bind-vfio $bdf || fail "bind-vfio"
touch /tmp/upgrades.json
{start}
[ -S /tmp/k.sock ] || {{ cat /tmp/kept.log; fail "the target did not start"; }}
step "L3 under KVM with fio verify ({fio_mib} MiB) on the NVMe backend: {upgrades} upgrade(s) and {kills} SIGKILL(s) of the target while fio runs"
vfblk-lab nested --vhost-user /tmp/k.sock --fio-mib {fio_mib} --no-retry-once-started {qemu_flag} > /tmp/nested.out 2>&1 &
np=$!
# Every 20 s while L3 runs, where the target and the guest are: a run that hits its deadline
# shows on the console what it was doing.
( while kill -0 $np 2>/dev/null; do sleep 20; echo "progress: target: $(grep -E 'taken over|handed over|killed by|resetting|ERROR|WARN' /tmp/kept.log | tail -2 | cut -c1-220 | tr '\n' '|') L3: $(tail -1 /tmp/l3/console-vhost-k.log 2>/dev/null | cut -c1-160)"; done ) &
for i in $(seq 1 1200); do grep -q "fio in L3" /tmp/l3/console-vhost-k.log 2>/dev/null && break; kill -0 $np 2>/dev/null || break; sleep 0.25; done
grep -q "fio in L3" /tmp/l3/console-vhost-k.log || {{ cat /tmp/nested.out /tmp/kept.log; fail "fio never started in L3"; }}
sleep 2
{events}
kill -0 $np 2>/dev/null && during=true || during=false
wait $np; nrc=$?
cat /tmp/nested.out
record "{{\"events_during_fio\": $during, \"reports\": [$(paste -sd, /tmp/upgrades.json)], \"resumed\": $(grep -c '1 connection(s) resumed without reconnect' /tmp/kept.log), \"recovered\": $(grep -c 'recovered from the inflight region' /tmp/kept.log), \"guest_ram_taken_over\": $(grep -c 'taken over as the previous process mapped it' /tmp/kept.log), \"call_fds_while_running\": $(grep -c 'new call fd while running' /tmp/kept.log), \"crash_taken_over\": $(grep -c 'taken over as the previous process left it, with no reset' /tmp/kept.log), \"crash_reset\": $(grep -c 'resetting it' /tmp/kept.log)}}"
# On failure, what the console shows last: the target's restarts (ring indices at each),
# then the guest's last lines (its disk counters every 10 s).
[ $nrc = 0 ] || {{ grep -E "recovered from|killed by|handed over|while running|disconnected|ERROR|WARN" /tmp/kept.log | tail -22; tail -15 /tmp/l3/console-vhost-k.log; fail "L3 fio on the NVMe backend"; }}
"#
    )
}

/// One run: a lab guest (name `lab_name`) with the scenario of `o`.
pub fn run(lab_name: &str, o: &NvmeL3) -> Result<RetriedRun> {
    let lab = Lab::new(lab_name)?;
    let contents = Contents {
        fio: false,
        nested: true,
        qemu10: o.qemu10,
        boot_disk: false,
        qsd: false,
    };
    // The namespace holds what fio writes (its whole 256 MiB in the tests).
    let namespace_mib = u64::from(o.fio_mib.max(256));
    lab.run_l2(
        &script(o),
        contents,
        namespace_mib,
        L3_LIMITS.total * L3_TRIES,
        Echo::Steps,
    )
}

/// How the nested guest's run ended, when the emulators ended it (TCG's nested SVM, KVM
/// inside it) rather than the code under test: `Ending::emulator_fault`, at either level.
pub fn emulator_fault(run: &RetriedRun) -> Option<String> {
    if run.run.ending.emulator_fault() {
        return Some(format!("lab guest: {:?}", run.run.ending));
    }
    let l3 = run.run.record("l3_vhost")?;
    (l3["emulator_fault"] == true).then(|| l3["ending"].to_string())
}

/// [`run`], again from a new lab guest (up to [`RUNS`] in all) when the nested guest ended
/// by an emulator fault ([`emulator_fault`]): its run cannot be retried inside, where the
/// restarts are over. Any other failure is returned as it is.
pub fn run_past_emulator_faults(lab_name: &str, o: &NvmeL3) -> Result<RetriedRun> {
    let mut runs = 1;
    loop {
        let run = run(lab_name, o)?;
        match emulator_fault(&run) {
            Some(why) if runs < RUNS => {
                tracing::warn!(
                    "{lab_name}: the nested guest ended by an emulator fault ({why}); run {} of {RUNS}",
                    runs + 1
                );
                runs += 1;
            }
            _ => return Ok(run),
        }
    }
}

/// The upgrade reports a lab guest recorded (`reports`: `vfblk-rpc --json upgrade`'s
/// answers), and the pause each gave.
pub fn upgrade_reports(run: &Run) -> (Vec<serde_json::Value>, Vec<f64>) {
    let reports: Vec<serde_json::Value> = run
        .record("reports")
        .and_then(|r| r.as_array().cloned())
        .unwrap_or_default();
    let pauses = reports
        .iter()
        .filter_map(|r| r["pause_ms"].as_f64())
        .collect();
    (reports, pauses)
}
