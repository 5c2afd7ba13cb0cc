//! The NVMe driver against QEMU's emulated controller in the lab guest: Identify, random
//! pattern writes and read-backs on several queue pairs and threads, Flush, Write Zeroes,
//! deallocate, error statuses, and an independent read-back by the guest kernel's nvme driver.

use std::time::Duration;

use vfblk_lab::scenario::{self, Contents, Lab};
use vfblk_lab::vm::Echo;
use vfblk_tests::lab_lock;

const IMAGE_MIB: u64 = 256;
const SEED: u64 = 4242;
const QUEUES: u64 = 3;
const REGION_BLOCKS: u64 = 8192;

fn driver_script() -> String {
    let nsze = (IMAGE_MIB << 20) / 512;
    let area = QUEUES * REGION_BLOCKS;
    format!(
        r#". /lab/lib.sh
modprobe vfio_iommu_type1 && modprobe vfio_pci && modprobe nvme || fail "modprobe"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller"
vfblk-nvme bind-vfio $bdf || fail "bind-vfio"
vfblk-nvme identify $bdf --json > /tmp/id.json || fail "identify"
record "{{\"identify\": $(cat /tmp/id.json)}}"
step "steady-state I/O: 2 s of 4 KiB random reads and writes at QD16 (before the patterns, which it would overwrite), counting heap allocations"
vfblk-nvme perf $bdf --rw randrw --read-percent 50 --bs 4096 --qd 16 --seconds 2 --warmup-ms 500 --json > /tmp/perf.json || fail "perf"
record "{{\"perf\": $(cat /tmp/perf.json)}}"
step "random patterns on {QUEUES} queue pairs / threads, with a controller reset in the middle"
vfblk-nvme verify $bdf --queues {QUEUES} --ops 300 --region-blocks {REGION_BLOCKS} --seed {SEED} --reset-after-ops 400 --json > /tmp/v.json || fail "verify"
record "{{\"verify\": $(cat /tmp/v.json)}}"
step "flush, write zeroes, deallocate"
vfblk-nvme flush $bdf || fail "flush"
dd if=/dev/zero of=/tmp/zero bs=512 count=64 2>/dev/null
vfblk-nvme write-zeroes $bdf --lba 100 --blocks 8 || fail "write-zeroes"
vfblk-nvme read $bdf --lba 96 --blocks 16 --out /tmp/wz || fail "read after write-zeroes"
dd if=/tmp/wz of=/tmp/wz.mid bs=512 skip=4 count=8 2>/dev/null
dd if=/tmp/zero of=/tmp/zero.8 bs=512 count=8 2>/dev/null
wz=false; cmp -s /tmp/wz.mid /tmp/zero.8 && wz=true
# The blocks on either side of the zeroed range keep their patterns.
vfblk-nvme check-pattern /tmp/wz --seed {SEED} --first-lba 96 --skip 0 --blocks 4 --block-size 512 || fail "blocks before the zeroed range changed"
vfblk-nvme check-pattern /tmp/wz --seed {SEED} --first-lba 108 --skip 12 --blocks 4 --block-size 512 || fail "blocks after the zeroed range changed"
vfblk-nvme deallocate $bdf --lba 200 --blocks 64 || fail "deallocate"
vfblk-nvme read $bdf --lba 200 --blocks 64 --out /tmp/dsm || fail "read after deallocate"
dsm=false; cmp -s /tmp/dsm /tmp/zero && dsm=true
record "{{\"zeroes\": {{\"write_zeroes\": $wz, \"deallocate\": $dsm}}}}"
step "buffers in separately mapped memory at chosen IOVAs (as guest RAM will be)"
dd if=/dev/urandom of=/tmp/ext bs=4096 count=16 2>/dev/null
vfblk-nvme write $bdf --lba 40000 --in /tmp/ext --external-iova 0x40000000 || fail "write from external memory"
vfblk-nvme read $bdf --lba 40000 --blocks 128 --out /tmp/ext.back --external-iova 0x7fff0000 || fail "read into external memory"
ext=false; cmp -s /tmp/ext /tmp/ext.back && ext=true
record "{{\"external\": $ext}}"
step "error statuses"
vfblk-nvme read $bdf --lba {nsze} --blocks 1 --out /tmp/x 2>/tmp/oor.err && fail "read past the end succeeded"
vfblk-nvme read $bdf --lba 0 --blocks 1 --nsid 0 --out /tmp/x 2>/tmp/ns.err && fail "read of namespace 0 succeeded"
vfblk-nvme identify $bdf >/dev/null || fail "controller unusable after errors"
record "{{\"errors\": {{\"out_of_range\": \"$(tr -d '"\\' < /tmp/oor.err)\", \"bad_namespace\": \"$(tr -d '"\\' < /tmp/ns.err)\"}}}}"
step "independent check through the kernel's nvme driver"
vfblk-nvme bind-kernel $bdf || fail "bind-kernel"
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do [ -b /dev/nvme0n1 ] && break; sleep 0.25; done
[ -b /dev/nvme0n1 ] || fail "no /dev/nvme0n1 after rebinding"
k1=false; vfblk-nvme check-pattern /dev/nvme0n1 --seed {SEED} --blocks 100 --block-size 512 && k1=true
k2=false; vfblk-nvme check-pattern /dev/nvme0n1 --seed {SEED} --first-lba 108 --blocks 92 --block-size 512 && k2=true
k3=false; vfblk-nvme check-pattern /dev/nvme0n1 --seed {SEED} --first-lba 264 --blocks {rest} --block-size 512 && k3=true
dd if=/dev/nvme0n1 of=/tmp/kz bs=512 skip=100 count=8 2>/dev/null
kz=false; cmp -s /tmp/kz /tmp/zero.8 && kz=true
record "{{\"kernel\": {{\"patterns\": [$k1, $k2, $k3], \"zeroes\": $kz, \"device_bytes\": $(cat /sys/block/nvme0n1/size)}}}}"
"#,
        rest = area - 264
    )
}

#[test]
fn driver_against_emulated_controller() {
    let _lock = lab_lock();
    let lab = Lab::new("test-nvme-driver").expect("lab setup");
    let retried = lab
        .run_l2(
            &driver_script(),
            Contents::default(),
            IMAGE_MIB,
            Duration::from_secs(300),
            Echo::Steps,
        )
        .expect("run the lab guest");
    let run = &retried.run;
    run.expect_success("NVMe driver test").unwrap();

    // 1. Identify matches the emulated device.
    let id = run.record("identify").expect("identify record");
    assert_eq!(id["serial"], scenario::NVME_SERIAL, "{id}");
    assert_eq!(id["model"], "QEMU NVMe Ctrl", "{id}");
    assert_eq!(id["namespaces"][0]["nsid"], 1, "{id}");
    assert_eq!(id["namespaces"][0]["size_bytes"], IMAGE_MIB << 20, "{id}");
    let max_transfer = id["max_transfer"].as_u64().unwrap();
    // QEMU offers Doorbell Buffer Config; everything below runs with shadow doorbells.
    assert_eq!(id["doorbell_buffer"], true, "{id}");
    assert_eq!(id["shadow_doorbells_in_use"], true, "{id}");

    // 2. Patterns at many offsets and sizes, aligned and not, on several queues.
    let v = run.record("verify").expect("verify record");
    assert_eq!(v["ops"], QUEUES * 300, "{v}");
    assert_eq!(v["queues"], QUEUES, "{v}");
    assert_eq!(
        v["largest"], max_transfer,
        "one-MDTS transfers were exercised: {v}"
    );
    assert!(v["unaligned_ops"].as_u64().unwrap() > 0, "{v}");
    // Scattered buffers that break PRP rules went out as SGLs (QEMU's controller has them).
    assert_eq!(id["sgl"], true, "{id}");
    assert!(v["scattered_ops"].as_u64().unwrap() > 0, "{v}");
    assert!(
        v["sgl_commands"].as_u64().unwrap() >= v["scattered_ops"].as_u64().unwrap(),
        "{v}"
    );

    // 4. A reset in the middle of the workload: the controller comes back, the queue pairs
    //    recreate their queues, aborted commands are resubmitted, and the workload goes on
    //    (every read-back still matched, and the kernel reads the same bytes below).
    assert_eq!(v["resets"], 1, "{v}");
    assert!(v["ops_after_reset"].as_u64().unwrap() >= 100, "{v}");
    let k = run.record("kernel").expect("kernel record");
    assert_eq!(
        k["patterns"],
        serde_json::json!([true, true, true]),
        "kernel nvme driver disagrees: {k}"
    );
    assert_eq!(k["zeroes"], true, "{k}");
    assert_eq!(k["device_bytes"], (IMAGE_MIB << 20) / 512, "{k}");

    // 5. No heap allocation per I/O in steady state (the tool's counting global allocator).
    let p = run.record("perf").expect("perf record");
    assert!(p["ios"].as_u64().unwrap() > 1000, "{p}");
    assert!(
        p["reads"].as_u64().unwrap() > 0 && p["reads"] != p["ios"],
        "mixed reads and writes: {p}"
    );
    assert_eq!(p["allocations"], 0, "heap allocations in the I/O loop: {p}");

    // 3. Write Zeroes and deallocate read back as zeros (the device reports DLFEAT = 1);
    //    bad LBAs and namespaces come back as their NVMe statuses.
    assert_eq!(
        id["namespaces"][0]["deallocated_reads_zeroes"], true,
        "{id}"
    );
    let z = run.record("zeroes").expect("zeroes record");
    assert_eq!(z["write_zeroes"], true, "{z}");
    assert_eq!(z["deallocate"], true, "{z}");
    assert_eq!(run.record("external"), Some(&serde_json::json!(true)));
    let e = run.record("errors").expect("errors record");
    let oor = e["out_of_range"].as_str().unwrap();
    assert!(oor.contains("LBA Out of Range (SCT 0x0, SC 0x80"), "{oor}");
    assert!(
        oor.contains("opcode 0x02"),
        "the error names the command: {oor}"
    );
    let ns = e["bad_namespace"].as_str().unwrap();
    assert!(
        ns.contains("Invalid Namespace or Format (SCT 0x0, SC 0x0b"),
        "{ns}"
    );
}
