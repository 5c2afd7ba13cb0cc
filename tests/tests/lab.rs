//! Lab tests: the emulated NVMe controller reached through VFIO from a project binary inside
//! the first-level guest, and a second-level guest under the first guest's KVM.
//!
//! These need QEMU, busybox and the guest kernel (scripts/setup.sh installs them). They fail,
//! never skip, when something is missing.

use std::time::Duration;

use vfblk_lab::scenario::{self, Contents, Lab};
use vfblk_lab::vm::Echo;
use vfblk_tests::lab_lock;

#[test]
fn vfblk_setup_binds_the_emulated_nvme_to_vfio_and_back() {
    let _lock = lab_lock();
    let lab = Lab::new("test-setup").expect("lab setup");
    let retried = lab
        .run_l2(
            scenario::SETUP_SCRIPT,
            Contents::default(),
            64,
            Duration::from_secs(240),
            Echo::Steps,
        )
        .expect("run the lab guest");
    let run = &retried.run;
    run.expect_success("vfblk-setup").unwrap();
    let before = run.record("before").expect("status before");
    let dev = &before["devices"][0];
    assert_eq!(dev["driver"], "nvme", "{before}");
    assert_eq!(dev["block_devices"][0], "nvme0n1", "{before}");
    assert!(dev["iommu_group"].is_u64(), "{before}");
    let busy = run.record("busy").expect("config with swap");
    let outcome = busy["devices"][0]["outcome"].as_str().unwrap();
    assert!(
        outcome.starts_with("skipped: in use: /dev/nvme0n1 on swap"),
        "{busy}"
    );
    assert_eq!(busy["devices"][0]["after"], "nvme", "{busy}");
    let config = run.record("config").expect("config");
    let want_pages = run.record("want_mib").unwrap().as_u64().unwrap() / 2;
    assert_eq!(config["hugepages_2m"]["after"], want_pages, "{config}");
    assert!(
        config["hugepages_2m"]["before"].as_u64().unwrap() < want_pages,
        "{config}"
    );
    assert_eq!(config["devices"][0]["outcome"], "bound", "{config}");
    assert_eq!(config["devices"][0]["after"], "vfio-pci", "{config}");
    let again = run.record("again").expect("config again");
    assert_eq!(again["devices"][0]["outcome"], "already", "{again}");
    assert_eq!(
        again["hugepages_2m"]["before"], again["hugepages_2m"]["after"],
        "{again}"
    );
    let reset = run.record("reset").expect("reset");
    assert_eq!(reset["devices"][0]["outcome"], "bound", "{reset}");
    assert_eq!(reset["devices"][0]["after"], "nvme", "{reset}");
    let after = run.record("after").expect("status after");
    assert_eq!(after["devices"][0]["driver"], "nvme", "{after}");
    assert_eq!(
        after["devices"][0]["block_devices"][0], "nvme0n1",
        "{after}"
    );
}

#[test]
fn vfio_probe_of_emulated_nvme_in_guest() {
    let _lock = lab_lock();
    let lab = Lab::new("test-vfio-probe").expect("lab setup");
    let retried = lab
        .run_l2(
            scenario::VFIO_PROBE_SCRIPT,
            Contents::default(),
            256,
            Duration::from_secs(240),
            Echo::Steps,
        )
        .expect("run the lab guest");
    let run = &retried.run;
    eprintln!(
        "L2 booted in {:.1} s (try {}), run took {:.1} s",
        run.boot_time.unwrap_or_default().as_secs_f64(),
        retried.tries,
        run.elapsed.as_secs_f64()
    );
    run.expect_success("VFIO probe").unwrap();

    let probe = run.record("probe").expect("probe record");
    assert_eq!(probe["driver"], "vfio-pci", "{probe}");
    assert_eq!(probe["class"], "0x010802", "{probe}");
    // QEMU's emulated controller (PCI 1b36:0010) reports NVMe 1.4.
    assert_eq!(probe["vendor_device"], "1b36:0010", "{probe}");
    assert!(
        probe["version"].as_str().unwrap().starts_with("1.4."),
        "{probe}"
    );
    assert!(probe["iommu_group"].as_u64().is_some(), "{probe}");
    assert!(probe["bar0_size"].as_u64().unwrap() >= 0x2000, "{probe}");
    let cap = &probe["cap"];
    assert_ne!(cap["raw"], "0xffffffffffffffff", "{probe}");
    assert!(cap["max_queue_entries"].as_u64().unwrap() >= 2, "{probe}");
    assert_eq!(cap["nvm_command_set"], true, "{probe}");
    assert_eq!(cap["page_size_min"], 4096, "{probe}");
    let dma = &probe["dma"];
    assert_eq!(dma["size"], 2 << 20, "{probe}");
    assert_eq!(dma["page_kind"], "2 MiB hugetlb", "{probe}");
    let iova =
        u64::from_str_radix(dma["iova"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    assert!((4 << 30..1 << 39).contains(&iova), "{probe}");

    let guest = run.record("guest").expect("guest record");
    assert_eq!(
        guest["svm"], true,
        "TCG -cpu max should expose SVM: {guest}"
    );
    assert_eq!(guest["hugepages"], scenario::L2_HUGEPAGES, "{guest}");
}

#[test]
fn nested_guest_reads_and_writes_virtio_disk() {
    let _lock = lab_lock();
    let lab = Lab::new("test-nested").expect("lab setup");
    let l3_budget = scenario::L3_LIMITS.total.as_secs() * u64::from(scenario::L3_TRIES);
    let nested = Contents {
        fio: false,
        nested: true,
        qemu10: false,
        boot_disk: false,
        qsd: false,
    };
    let retried = lab
        .run_l2(
            &scenario::nested_script(1),
            nested,
            64,
            Duration::from_secs(l3_budget + 120),
            Echo::Steps,
        )
        .expect("run the lab guest");
    let run = &retried.run;
    let nested = run.record("nested").cloned();
    if let Some(n) = &nested {
        eprintln!(
            "L3 boot {}: {} tries, booted in {} s, run {} s",
            n["boot"], n["tries"], n["boot_s"], n["total_s"]
        );
    }
    run.expect_success("nested guest").unwrap();
    let n = nested.expect("nested record");
    assert_eq!(n["ok"], true, "{n}");
    assert!(n["boot_s"].as_f64().unwrap() > 0.0, "{n}");
    assert!(
        n["tries"].as_u64().unwrap() <= u64::from(scenario::L3_TRIES),
        "{n}"
    );
}

/// A second-level guest boots FROM a vhost-user-blk disk served by the bridge, with
/// `queue-size=1024`: SeaBIOS and syslinux read the kernel and initramfs through the ring
/// at 256 entries (SeaBIOS's size whatever the device offers), inside an inflight region laid
/// out for 1024; then the guest's kernel drives the same disk at 1024 entries and reads it
/// whole. One frontend connection throughout: the ring size change is no reconnect.
const BOOT_SCRIPT: &str = r#". /lab/lib.sh
modprobe kvm_amd || fail "modprobe kvm_amd"
cp /lab/l3/boot.img /tmp/boot.img || fail "no boot disk image"
vfblk-bridge --socket /tmp/boot.sock --backend file:/tmp/boot.img --rpc /tmp/rpc.sock >/dev/null 2>/tmp/bridge.log &
for i in $(seq 1 200); do [ -S /tmp/rpc.sock ] && break; sleep 0.05; done
[ -S /tmp/boot.sock ] || { cat /tmp/bridge.log; fail "bridge did not start"; }
step "L3 boots from its vhost-user-blk disk (queue-size=1024): firmware and boot loader first, then the kernel"
vfblk-lab nested --vhost-user /tmp/boot.sock --queue-size 1024 --boot-from-disk || { tail -30 /tmp/bridge.log; fail "L3 did not boot from the vhost-user disk"; }
connections=$(vfblk-rpc --socket /tmp/rpc.sock --json stats | tr -d ' \n' | sed -n 's/.*"connections":\([0-9]*\).*/\1/p')
record "{\"rings_256\": $(grep -c 'started with 256 entries' /tmp/bridge.log), \"rings_1024\": $(grep -c 'started with 1024 entries' /tmp/bridge.log), \"connections\": ${connections:-null}, \"disk_bytes\": $(stat -c %s /tmp/boot.img)}"
"#;

#[test]
fn nested_guest_boots_from_a_vhost_user_disk_with_1024_entry_queues() {
    let _lock = lab_lock();
    let lab = Lab::new("test-boot-disk").expect("lab setup");
    let l3_budget = scenario::L3_LIMITS.total.as_secs() * u64::from(scenario::L3_TRIES);
    let contents = Contents {
        fio: false,
        nested: true,
        qemu10: false,
        boot_disk: true,
        qsd: false,
    };
    let retried = lab
        .run_l2(
            BOOT_SCRIPT,
            contents,
            64,
            Duration::from_secs(l3_budget + 120),
            Echo::Steps,
        )
        .expect("run the lab guest");
    let run = &retried.run;
    let boot = run.record("l3_boot").cloned().unwrap_or_default();
    eprintln!(
        "L3 booted from vhost-user-blk: {boot}; rings at 256 entries {:?}, at 1024 {:?}; connections accepted {:?}",
        run.record("rings_256"),
        run.record("rings_1024"),
        run.record("connections")
    );
    run.expect_success("L3 boots from a vhost-user disk")
        .unwrap();
    assert_eq!(boot["booted_from_disk"], true, "{boot}");
    assert_eq!(
        boot["disk_bytes"],
        run.record("disk_bytes").cloned().unwrap_or_default(),
        "the kernel read the whole disk: {boot}"
    );
    let rings = |key: &str| run.record(key).and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(rings("rings_256") >= 1, "the firmware's 256-entry ring");
    assert!(rings("rings_1024") >= 1, "the kernel's 1024-entry ring");
    assert_eq!(
        run.record("connections"),
        Some(&serde_json::json!(1)),
        "one connection: the ring size change cost no reconnect"
    );
}

#[test]
fn a_guest_program_that_dies_of_a_signal_is_named_in_the_failure() {
    let _lock = lab_lock();
    let lab = Lab::new("test-died").expect("lab setup");
    // A program that dies of SIGSEGV, as a crashing fio or bridge would; the script then
    // fails like the tests' scripts do.
    let script = ". /lab/lib.sh\n\
        step \"a program that crashes\"\n\
        sh -c 'kill -SEGV $$'\n\
        rc=$?\n\
        fail \"the program exited with $rc\"\n";
    let retried = lab
        .run_l2(
            script,
            Contents::default(),
            64,
            Duration::from_secs(240),
            Echo::Steps,
        )
        .expect("run the lab guest");
    let run = &retried.run;
    assert_eq!(
        run.failures,
        vec!["the program exited with 139".to_string()]
    );
    assert!(
        run.kernel.iter().any(|l| l.contains("fatal signal 11")),
        "the kernel's line about the signal: {:?}",
        run.kernel
    );
    let e = run.expect_success("t").unwrap_err().to_string();
    assert!(e.contains("fatal signal 11"), "{e}");
}
