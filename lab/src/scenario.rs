//! The lab's standard guests: the first-level guest with the NVMe controller behind the
//! virtual IOMMU, and the second-level guest started inside it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::initramfs::Initramfs;
use crate::kernel::{ensure_kernel, GuestKernel};
use crate::vm::{self, Accel, Echo, Limits, NvmeDisk, VmSpec};
use crate::{project_bin_dir, run_dir, LabError, Result};

/// Modules the first-level guest loads: VFIO for the NVMe controller, the kernel's own nvme
/// driver (for independent checks), virtio for disks, KVM for second-level guests.
pub const L2_MODULES: &[&str] = &[
    "vfio_pci",
    "vfio_iommu_type1",
    "nvme",
    "virtio_pci",
    "virtio_blk",
    "kvm_amd",
];

/// Modules the second-level guest loads.
pub const L3_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];

/// The serial number of the lab's emulated NVMe controller.
pub const NVME_SERIAL: &str = "vfblk0001";

/// Hugepages (2 MiB) `/init` reserves in the first-level guest.
pub const L2_HUGEPAGES: u32 = 128;

/// Where the second-level guest's files sit inside the first-level guest.
pub const L3_DIR: &str = "/lab/l3";

/// Programs a guest image can carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Contents {
    /// fio and its libraries.
    pub fio: bool,
    /// QEMU, its firmware and a second-level guest (kernel + initramfs), for nested VMs.
    pub nested: bool,
    /// With `nested`: QEMU 10 from bookworm-backports too, for second-level VMs
    /// ([`crate::qemu::Qemu::backports_in_guest`]).
    pub qemu10: bool,
    /// With `nested`: a disk image a second-level guest boots from ([`Lab::boot_disk`]), at
    /// [`L3_BOOT_DISK`].
    pub boot_disk: bool,
    /// qemu-storage-daemon (its `nvme` and `host_device` drivers), a peer for benchmarks.
    pub qsd: bool,
}

/// Where a lab guest made with [`Contents::boot_disk`] has the boot disk image.
pub const L3_BOOT_DISK: &str = "/lab/l3/boot.img";

/// The test script of the boot disk's initramfs: it runs, so the guest booted from the disk
/// (firmware and boot loader reading through the virtio ring); then the kernel's driver
/// reads the disk too.
pub const L3_BOOTED_SCRIPT: &str = r#". /lab/lib.sh
modprobe virtio_pci || fail "modprobe virtio_pci"
modprobe virtio_blk || fail "modprobe virtio_blk"
for i in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || fail "no /dev/vda"
step "booted from the vhost-user-blk disk; the kernel reads it whole"
bytes=$(dd if=/dev/vda bs=1M 2>/dev/null | wc -c)
label=$(dd if=/dev/vda bs=1 skip=43 count=11 2>/dev/null)
record "{\"booted_from_disk\": true, \"disk_bytes\": $bytes, \"label\": \"$label\"}"
"#;

/// A prepared lab: the guest kernel and the project's binaries.
pub struct Lab {
    /// The guest kernel.
    pub kernel: GuestKernel,
    /// The project's release binaries.
    pub bin_dir: PathBuf,
    /// This run's directory for images and logs.
    pub dir: PathBuf,
}

impl Lab {
    /// Fetches (or finds cached) the guest kernel and builds the project's binaries.
    pub fn new(name: &str) -> Result<Self> {
        let kernel = ensure_kernel()?;
        let bin_dir = project_bin_dir()?;
        let dir = run_dir(name)?;
        Ok(Self {
            kernel,
            bin_dir,
            dir,
        })
    }

    /// Builds the first-level guest image with `script` as its test.
    pub fn l2_image(&self, script: &str, contents: Contents) -> Result<PathBuf> {
        let mut image = Initramfs::new(&self.kernel, L2_MODULES, L2_HUGEPAGES)?;
        for bin in [
            "vfblk-nvme",
            "vfblk-lab",
            "vfblk-bridge",
            "vfblk-loadgen",
            "vfblk-setup",
            "vfblk-rpc",
            "vfblk-keeper",
        ] {
            image.add_program(&self.bin_dir.join(bin), &format!("lab/bin/{bin}"))?;
        }
        if contents.fio {
            image.add_program(Path::new("/usr/bin/fio"), "usr/bin/fio")?;
        }
        if contents.qsd {
            image.add_program(
                Path::new("/usr/bin/qemu-storage-daemon"),
                "usr/bin/qemu-storage-daemon",
            )?;
        }
        if contents.nested {
            self.add_nested(&mut image)?;
            if contents.boot_disk {
                let disk = self.boot_disk()?;
                image.add_file(L3_BOOT_DISK.trim_start_matches('/'), &disk, 0o644);
            }
            if contents.qemu10 {
                for (host, dest) in crate::qemu::Qemu::backports_guest_files()? {
                    if dest.ends_with("qemu-system-x86_64") {
                        image.add_program(&host, dest.trim_start_matches('/'))?;
                    } else {
                        image.add_file(dest.trim_start_matches('/'), &host, 0o644);
                    }
                }
            }
        }
        image.set_test_script(script);
        let path = self.dir.join("l2.cpio");
        image.write(&path)?;
        Ok(path)
    }

    fn add_nested(&self, image: &mut Initramfs) -> Result<()> {
        self.add_nested_qemu(image)?;
        let mut l3 = Initramfs::new(&self.kernel, L3_MODULES, 0)?;
        l3.set_test_script(L3_DISK_SCRIPT);
        let l3_path = self.dir.join("l3.cpio");
        l3.write(&l3_path)?;
        image.add_file(&format!("{L3_DIR}/initrd.cpio"), &l3_path, 0o644);
        // A second image for guests whose disk is vhost-user-blk: fio with verify.
        let mut l3_fio = Initramfs::new(&self.kernel, L3_MODULES, 0)?;
        l3_fio.add_program(Path::new("/usr/bin/fio"), "usr/bin/fio")?;
        l3_fio.add_program(&self.bin_dir.join("vfblk-lab"), "usr/bin/vfblk-lab")?;
        l3_fio.set_test_script(L3_FIO_SCRIPT);
        let l3_fio_path = self.dir.join("l3-fio.cpio");
        l3_fio.write(&l3_fio_path)?;
        image.add_file(&format!("{L3_DIR}/initrd-fio.cpio"), &l3_fio_path, 0o644);
        Ok(())
    }

    /// What a first-level guest needs to run second-level guests, without their
    /// initramfs images: QEMU 7.2, its firmware, and the guest kernel at
    /// `L3_DIR/vmlinux`.
    pub fn add_nested_qemu(&self, image: &mut Initramfs) -> Result<()> {
        image.add_program(
            Path::new("/usr/bin/qemu-system-x86_64"),
            "usr/bin/qemu-system-x86_64",
        )?;
        // Firmware a q35 guest booted with -kernel needs (SeaBIOS, the PVH/linuxboot ROMs).
        for rom in [
            "bios-256k.bin",
            "linuxboot.bin",
            "linuxboot_dma.bin",
            "pvh.bin",
            "kvmvapic.bin",
        ] {
            // Debian's QEMU searches /usr/share/qemu, then /usr/share/seabios.
            let host = ["/usr/share/qemu", "/usr/share/seabios"]
                .iter()
                .map(|dir| Path::new(dir).join(rom))
                .find(|p| p.exists())
                .ok_or_else(|| {
                    LabError::Setup(format!(
                        "QEMU firmware {rom} missing: install qemu-system-x86 (scripts/setup.sh)"
                    ))
                })?;
            image.add_file(&format!("usr/share/qemu/{rom}"), &host, 0o644);
        }
        image.add_file(&format!("{L3_DIR}/vmlinux"), &self.kernel.vmlinux, 0o644);
        Ok(())
    }

    /// A disk image a second-level guest boots from through its firmware: a FAT file system
    /// with syslinux in its boot sector, the guest kernel (bzImage) and an initramfs running
    /// [`L3_BOOTED_SCRIPT`]. Made with mkfs.fat, mtools and syslinux, no root needed.
    pub fn boot_disk(&self) -> Result<PathBuf> {
        use crate::kernel::run_capture;
        let mut initrd = Initramfs::new(&self.kernel, L3_MODULES, 0)?;
        initrd.set_test_script(L3_BOOTED_SCRIPT);
        let initrd_path = self.dir.join("l3-boot.cpio");
        initrd.write(&initrd_path)?;
        let img = self.dir.join("l3-boot.img");
        let _ = std::fs::remove_file(&img);
        let kib = (std::fs::metadata(&self.kernel.bzimage)?.len()
            + std::fs::metadata(&initrd_path)?.len())
            / 1024
            + 4096;
        run_capture(
            Command::new("mkfs.fat")
                .args(["-C", "-n", "VFBLKBOOT"])
                .arg(&img)
                .arg(kib.to_string()),
            "mkfs.fat (package dosfstools)",
        )?;
        let cfg = self.dir.join("syslinux.cfg");
        // edd=off: no BIOS disk probing in the kernel's real-mode setup.
        std::fs::write(
            &cfg,
            "DEFAULT l3\nPROMPT 0\nTIMEOUT 0\nLABEL l3\n  KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND console=ttyS0 panic=-1 loglevel=4 edd=off\n",
        )?;
        for (host, name) in [
            (self.kernel.bzimage.as_path(), "vmlinuz"),
            (initrd_path.as_path(), "initrd.img"),
            (cfg.as_path(), "syslinux.cfg"),
        ] {
            run_capture(
                Command::new("mcopy")
                    .arg("-i")
                    .arg(&img)
                    .arg(host)
                    .arg(format!("::{name}")),
                "mcopy (package mtools)",
            )?;
        }
        run_capture(
            Command::new("syslinux").arg("--install").arg(&img),
            "syslinux --install (package syslinux)",
        )?;
        Ok(img)
    }

    /// Boots the first-level guest with `script` (an NVMe image of `nvme_mib` MiB attached),
    /// retrying a run the emulator broke ([`L2_TRIES`] in all), each within `total`.
    pub fn run_l2(
        &self,
        script: &str,
        contents: Contents,
        nvme_mib: u64,
        total: Duration,
        echo: Echo,
    ) -> Result<vm::RetriedRun> {
        self.run_l2_namespaces(script, contents, &[nvme_mib], total, echo)
    }

    /// Like [`Lab::run_l2`], the emulated NVMe controller with one namespace per entry of
    /// `namespaces_mib` (their sizes in MiB).
    pub fn run_l2_namespaces(
        &self,
        script: &str,
        contents: Contents,
        namespaces_mib: &[u64],
        total: Duration,
        echo: Echo,
    ) -> Result<vm::RetriedRun> {
        let initrd = self.l2_image(script, contents)?;
        let (first, more) = namespaces_mib
            .split_first()
            .ok_or_else(|| LabError::Setup("an NVMe controller needs a namespace".into()))?;
        let disk = self.disk("nvme.img", *first)?;
        let mut spec = self.l2_spec(&initrd, &disk);
        for (i, mib) in more.iter().enumerate() {
            let image = self.disk(&format!("nvme-ns{}.img", i + 2), *mib)?;
            spec.nvme[0].more_namespaces.push(image);
        }
        let limits = Limits {
            boot: Duration::from_secs(90),
            total,
        };
        vm::run_retrying_stalls(&spec, limits, L2_TRIES, &self.dir.join("console.log"), echo)
    }

    /// A raw disk image of `size_mib` MiB in this run's directory.
    pub fn disk(&self, name: &str, size_mib: u64) -> Result<PathBuf> {
        let path = self.dir.join(name);
        let file = std::fs::File::create(&path)?;
        file.set_len(size_mib << 20)?;
        Ok(path)
    }

    /// The first-level guest: TCG, virtual IOMMU, one emulated NVMe controller on `nvme_image`.
    pub fn l2_spec(&self, initrd: &Path, nvme_image: &Path) -> VmSpec {
        let mut spec = VmSpec::new("L2", Accel::Tcg, &self.kernel.vmlinux, initrd);
        if std::env::var_os("VFBLK_EXP_L2_QEMU10").is_some() {
            spec.qemu = crate::qemu::Qemu::backports(20).expect("qemu 10");
        }
        spec.memory_mib = 3072;
        spec.iommu = true;
        spec.nvme.push(NvmeDisk {
            image: nvme_image.to_path_buf(),
            serial: NVME_SERIAL.to_string(),
            more_namespaces: Vec::new(),
            controllers: 1,
        });
        spec
    }
}

/// Script of the VFIO probe: binds the emulated NVMe to vfio-pci and has the project's driver
/// open it through VFIO, read its registers and map a hugepage buffer for DMA.
pub const VFIO_PROBE_SCRIPT: &str = r#". /lab/lib.sh
step "loading vfio_iommu_type1 and vfio_pci"
modprobe vfio_iommu_type1 || fail "modprobe vfio_iommu_type1"
modprobe vfio_pci || fail "modprobe vfio_pci"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller (class 0x010802) in the guest"
step "binding $bdf to vfio-pci"
vfblk-nvme bind-vfio "$bdf" || fail "vfblk-nvme bind-vfio $bdf"
step "probing $bdf through VFIO"
vfblk-nvme probe "$bdf" --json > /tmp/probe.json || fail "vfblk-nvme probe $bdf"
record "{\"probe\": $(cat /tmp/probe.json)}"
svm=false; grep -qw svm /proc/cpuinfo && svm=true
record "{\"guest\": {\"kernel\": \"$(uname -r)\", \"cpus\": $(grep -c ^processor /proc/cpuinfo), \"svm\": $svm, \"hugepages\": $(cat /proc/sys/vm/nr_hugepages)}}"
"#;

/// Script of the host-setup test: `vfblk-setup` reserves hugepages and binds the emulated
/// NVMe to vfio-pci (twice: the second run changes nothing), refuses a controller in use by
/// the host (swap on it), and gives it back to the kernel's nvme driver.
pub const SETUP_SCRIPT: &str = r#". /lab/lib.sh
modprobe nvme || fail "modprobe nvme"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller (class 0x010802) in the guest"
for i in $(seq 1 40); do [ -b /dev/nvme0n1 ] && break; sleep 0.25; done
[ -b /dev/nvme0n1 ] || fail "no /dev/nvme0n1 from the kernel's nvme driver"
step "vfblk-setup status: $bdf on the kernel's driver"
vfblk-setup --json status > /tmp/s0.json || fail "status"
record "{\"before\": $(tr -d '\n' < /tmp/s0.json)}"
step "a controller the host uses is left alone (swap on /dev/nvme0n1)"
mkswap /dev/nvme0n1 >/dev/null && swapon /dev/nvme0n1 || fail "swapon"
vfblk-setup --json config --no-hugepages > /tmp/busy.json || fail "config with swap on it"
swapoff /dev/nvme0n1 || fail "swapoff"
record "{\"busy\": $(tr -d '\n' < /tmp/busy.json)}"
want=$(( $(cat /proc/sys/vm/nr_hugepages) * 2 + 64 ))
step "vfblk-setup config --hugemem $want (MiB), twice"
vfblk-setup --json config --hugemem $want > /tmp/c1.json || fail "config"
vfblk-setup --json config --hugemem $want > /tmp/c2.json || fail "config again"
record "{\"config\": $(tr -d '\n' < /tmp/c1.json), \"again\": $(tr -d '\n' < /tmp/c2.json), \"want_mib\": $want}"
step "the project's driver opens $bdf through VFIO"
vfblk-nvme probe "$bdf" --json > /tmp/probe.json || fail "probe after vfblk-setup"
step "vfblk-setup reset"
vfblk-setup --json reset > /tmp/r.json || fail "reset"
for i in $(seq 1 40); do [ -b /dev/nvme0n1 ] && break; sleep 0.25; done
[ -b /dev/nvme0n1 ] || fail "no /dev/nvme0n1 after reset"
vfblk-setup --json status > /tmp/s1.json || fail "status after reset"
record "{\"reset\": $(tr -d '\n' < /tmp/r.json), \"after\": $(tr -d '\n' < /tmp/s1.json)}"
"#;

/// The second-level guest's test: reads a marker the first-level guest wrote to its virtio
/// disk, writes a random MiB, reads it back after dropping caches, and reports its checksum
/// so the first-level guest can check the bytes reached the disk image.
pub const L3_DISK_SCRIPT: &str = r#". /lab/lib.sh
modprobe virtio_pci || fail "modprobe virtio_pci"
modprobe virtio_blk || fail "modprobe virtio_blk"
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
[ -b /dev/vda ] || fail "no /dev/vda"
marker=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000')
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null || fail "write to /dev/vda"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/readback bs=4096 skip=256 count=256 2>/dev/null || fail "read from /dev/vda"
cmp -s /tmp/pattern /tmp/readback || fail "read-back differs from what was written"
sum=$(md5sum < /tmp/pattern | cut -d' ' -f1)
record "{\"l3\": {\"marker\": \"$marker\", \"md5\": \"$sum\", \"offset\": 1048576, \"len\": 1048576}}"
"#;

/// The second-level guest's fio test on its (vhost-user-blk) disk.
pub const L3_FIO_SCRIPT: &str = r#". /lab/lib.sh
modprobe virtio_pci || fail "modprobe virtio_pci"
modprobe virtio_blk || fail "modprobe virtio_blk"
for i in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || fail "no /dev/vda"
if grep -q vfblk.iovec /proc/cmdline; then
    step "O_DIRECT through 512-byte iovecs at sub-page offsets, every byte verified"
    vfblk-lab iovec-verify --device /dev/vda --mib 4 --json > /tmp/iovec.json 2>/tmp/iovec.err
    rc=$?
    record "{\"iovec\": $(cat /tmp/iovec.json)}"
    [ $rc = 0 ] || { cat /tmp/iovec.err; fail "iovec-verify exited with $rc"; }
fi
if grep -q vfblk.gate /proc/cmdline; then
    step "waiting at the start gate"
    read -t 900 gate < /dev/ttyS0
    record "{\"gate\": \"$gate\"}"
fi
mib=$(sed -n 's/.*vfblk.fio_mib=\([0-9]*\).*/\1/p' /proc/cmdline)
step "fio in L3: ${mib:=16} MiB random writes with crc32c verify"
# The disk's counters on the console every 10 s: a run that stops shows whether this kernel
# still runs and what it waits for.
( while sleep 10; do set -- $(cat /sys/block/vda/stat); echo "vda: $1 reads, $5 writes done, $9 in flight"; done ) &
heartbeat=$!
fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=${mib}M --verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=json > /tmp/fio.json 2>/tmp/fio.err
rc=$?
kill $heartbeat
record "{\"fio_exit\": $rc}"
# Only the figures the host reads, in fio's own shape (about 200 bytes, not fio's 10 KB):
# this console is slow under nested emulation, and a record cut off by the run's deadline
# failed a run whose fio had passed.
summary=$(awk '
function num(l) { sub(/^[^:]*: */, "", l); sub(/,.*$/, "", l); return l }
/^ *"error" :/ && err == "" { err = num($0) }
/^ *"job_runtime" :/ { rt = num($0) }
/^ *"(read|write|trim|sync)" : \{/ { d = $1; gsub(/"/, "", d) }
/^ *"[a-z_]+" : \{/ { s = $1; gsub(/"/, "", s) }
/^ *"total_ios" :/ { ios[d] = num($0) }
/^ *"max" :/ && s == "clat_ns" { mx[d] = num($0) }
END {
    if (err == "") err = "null"; if (rt == "") rt = "null"
    r = ios["read"] == "" ? 0 : ios["read"]; w = ios["write"] == "" ? 0 : ios["write"]
    rm = mx["read"] == "" ? 0 : mx["read"]; wm = mx["write"] == "" ? 0 : mx["write"]
    printf "{\"jobs\": [{\"error\": %s, \"job_runtime\": %s, \"read\": {\"total_ios\": %s, \"clat_ns\": {\"max\": %s}}, \"write\": {\"total_ios\": %s, \"clat_ns\": {\"max\": %s}}}]}", err, rt, r, rm, w, wm
}' /tmp/fio.json)
record "{\"fio\": $summary}"
[ $rc = 0 ] || { cat /tmp/fio.err; fail "fio exited with $rc"; }
"#;

/// What the nested guest of [`run_nested_vhost`] runs on its disk.
#[derive(Debug, Clone)]
pub struct NestedFio {
    /// MiB fio writes and verifies.
    pub mib: u32,
    /// `vfblk-lab iovec-verify` first.
    pub iovec_check: bool,
    /// Boot deadline and overall limit of each try (the wait at the gate comes on top).
    pub limits: Limits,
    /// Start fio together with other nested guests.
    pub gate: Option<vm::StartGate>,
    /// Run the guest again if it wedges after fio began (not while a target is restarted
    /// under it: the second fio would miss the restarts).
    pub retry_started: bool,
}

/// fio's figures from its JSON: (writes, reads, longest completion latency in ms, errors).
pub fn fio_summary(fio: &serde_json::Value) -> (u64, u64, f64, u64) {
    let job = &fio["jobs"][0];
    let ios = |dir: &str| job[dir]["total_ios"].as_u64().unwrap_or(0);
    let max_ms = |dir: &str| job[dir]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6;
    (
        ios("write"),
        ios("read"),
        max_ms("write").max(max_ms("read")),
        job["error"].as_u64().unwrap_or(0),
    )
}

/// Runs inside the first-level guest: boots a second-level guest under KVM whose disk is the
/// vhost-user-blk device served on `socket`, runs fio with verify in it, and prints one
/// record with fio's figures.
pub fn run_nested_vhost(
    socket: &Path,
    queue_size: Option<u16>,
    fio: NestedFio,
    qemu: crate::qemu::Qemu,
    echo: Echo,
) -> Result<()> {
    let mut spec = l3_on_vhost_user(socket, queue_size, "initrd-fio.cpio");
    spec.qemu = qemu;
    spec.retry_started = fio.retry_started;
    spec.cmdline
        .push_str(&format!(" vfblk.fio_mib={}", fio.mib));
    if fio.iovec_check {
        spec.cmdline.push_str(" vfblk.iovec");
    }
    let mut limits = fio.limits;
    if let Some(gate) = fio.gate {
        spec.cmdline.push_str(" vfblk.gate");
        limits.total += gate.wait;
        spec.start_gate = Some(gate);
    }
    // Debian's fio brings ~85 MB of libraries (rbd, gluster...) into the initramfs.
    spec.memory_mib = 768;
    // Several may run at once (one per socket): each has its own console log.
    let stem = socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    run_l3(
        &spec,
        limits,
        &format!("console-vhost-{stem}.log"),
        "l3_vhost",
        echo,
        |run| {
            let fio = run.record("fio").cloned().unwrap_or_default();
            let job = &fio["jobs"][0];
            let (_, _, max_latency_ms, _) = fio_summary(&fio);
            serde_json::json!({
                "socket": socket,
                "qemu": spec.qemu.description,
                "max_latency_ms": max_latency_ms,
                "qemu_vhost_lines": vm::qemu_vhost_lines(&run.log),
                "iovec": run.record("iovec"),
                "gate": run.record("gate"),
                "fio_exit": run.record("fio_exit"),
                "fio_runtime_ms": job["job_runtime"],
                "writes": job["write"]["total_ios"],
                "verified_reads": job["read"]["total_ios"],
                "write_iops": job["write"]["iops"],
                "fio_error": job["error"],
            })
        },
    )
}

/// Runs inside a first-level guest made with [`Contents::boot_disk`]: boots a second-level
/// guest under KVM from its vhost-user-blk disk served on `socket` (the boot disk image,
/// [`L3_BOOT_DISK`]) through its firmware, and prints one record (`l3_boot`).
pub fn run_nested_boot(socket: &Path, queue_size: Option<u16>, echo: Echo) -> Result<()> {
    let mut spec = l3_on_vhost_user(socket, queue_size, "initrd.cpio");
    spec.memory_mib = 256;
    spec.boot_from_disk = true;
    run_l3(
        &spec,
        L3_LIMITS,
        "console-boot.log",
        "l3_boot",
        echo,
        |run| {
            serde_json::json!({
                "booted_from_disk": run.record("booted_from_disk"),
                "disk_bytes": run.record("disk_bytes"),
                "label": run.record("label"),
            })
        },
    )
}

/// A one-vCPU second-level guest under KVM whose disk is the vhost-user-blk socket.
fn l3_on_vhost_user(socket: &Path, queue_size: Option<u16>, initrd: &str) -> VmSpec {
    let mut spec = VmSpec::new(
        "L3",
        Accel::Kvm,
        &Path::new(L3_DIR).join("vmlinux"),
        &Path::new(L3_DIR).join(initrd),
    );
    spec.cpus = 1;
    spec.vhost_user_blk.push(vm::VhostUserBlk {
        socket: socket.to_path_buf(),
        num_queues: 1,
        queue_size,
        packed: false,
    });
    spec
}

/// Runs `spec` (console log `log_name` in /tmp/l3, stalled boots retried) and prints one
/// record under `key`: the run's tries, times and ending, and what `fields` takes from it.
fn run_l3(
    spec: &VmSpec,
    limits: Limits,
    log_name: &str,
    key: &str,
    echo: Echo,
    fields: impl FnOnce(&vm::Run) -> serde_json::Value,
) -> Result<()> {
    let dir = Path::new("/tmp/l3");
    std::fs::create_dir_all(dir)?;
    let log = dir.join(log_name);
    let retried = vm::run_retrying_stalls(spec, limits, L3_TRIES, &log, echo)?;
    let run = &retried.run;
    let mut record = fields(run);
    record["tries"] = retried.tries.into();
    record["boot_s"] = run.boot_time.map(|d| d.as_secs_f64()).into();
    record["total_s"] = run.elapsed.as_secs_f64().into();
    record["failures"] = serde_json::json!(run.failures);
    record["ending"] = format!("{:?}", run.ending).into();
    record["emulator_fault"] = run.ending.emulator_fault().into();
    if !run.qemu_threads.is_empty() {
        record["qemu_threads"] = serde_json::json!(run.qemu_threads);
    }
    println!(
        "{}-RECORD {}",
        crate::initramfs::MARK,
        serde_json::json!({ key: record })
    );
    if run.ending != vm::Ending::Finished(0) {
        tracing::warn!("{}", vm::tail(&log, 30));
        return Err(LabError::Guest(format!(
            "L3 ({key}): {:?}, {:?}",
            run.ending, run.failures
        )));
    }
    Ok(())
}

/// Script of the nested test: KVM inside the first-level guest, then a second-level guest.
pub fn nested_script(boots: u32) -> String {
    format!(
        r#". /lab/lib.sh
step "loading kvm_amd"
modprobe kvm_amd || fail "modprobe kvm_amd"
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd"
step "starting {boots} second-level guest(s) under KVM"
vfblk-lab nested --boots {boots} || fail "nested guest"
"#
    )
}

/// Limits for a second-level guest boot under KVM-in-TCG. Most boot in 18-30 s; stalls of
/// 10 minutes have been seen, hence a boot deadline and retries.
pub const L3_LIMITS: Limits = Limits {
    boot: Duration::from_secs(120),
    total: Duration::from_secs(240),
};

/// [`L3_LIMITS`] with a boot deadline of `boot_s` seconds (for second-level guests that
/// share a vCPU and boot at half speed), the overall limit moved by as much.
pub fn l3_limits_with_boot(boot_s: u64) -> Limits {
    let boot = Duration::from_secs(boot_s);
    Limits {
        boot,
        total: L3_LIMITS.total.saturating_sub(L3_LIMITS.boot) + boot,
    }
}

/// Tries of a first-level run (each retry only after a stalled boot, a death before the test
/// script began, or a wedged or panicked guest kernel).
pub const L2_TRIES: u32 = 3;

/// Tries per second-level boot.
pub const L3_TRIES: u32 = 3;

/// Runs inside the first-level guest: boots the second-level guest `boots` times, checks
/// each run's disk writes against the disk image, and prints one record per boot.
pub fn run_nested(boots: u32, echo: Echo) -> Result<()> {
    let dir = Path::new("/tmp/l3");
    std::fs::create_dir_all(dir)?;
    let mut failures = 0;
    for boot in 1..=boots {
        let disk = dir.join("disk.img");
        let marker = format!("vfblk-l3-marker-{boot}");
        let mut data = marker.clone().into_bytes();
        data.resize(4 << 20, 0);
        std::fs::write(&disk, &data)?;
        let mut spec = VmSpec::new(
            "L3",
            Accel::Kvm,
            &Path::new(L3_DIR).join("vmlinux"),
            &Path::new(L3_DIR).join("initrd.cpio"),
        );
        spec.cpus = 1;
        spec.memory_mib = 256;
        spec.virtio_disks.push(disk.clone());
        let log = dir.join(format!("console-{boot}.log"));
        let retried = vm::run_retrying_stalls(&spec, L3_LIMITS, L3_TRIES, &log, echo)?;
        let run = &retried.run;
        let mut problems: Vec<String> = run.failures.clone();
        match &run.ending {
            vm::Ending::Finished(0) => {}
            other => problems.push(format!("{other:?}")),
        }
        if let Some(l3) = run.record("l3") {
            if l3["marker"] != marker.as_str() {
                problems.push(format!(
                    "marker read in L3 was {}, expected {marker}",
                    l3["marker"]
                ));
            }
            let image = std::fs::read(&disk)?;
            let written = &image[1 << 20..2 << 20];
            let sum = md5_hex(written);
            if l3["md5"] != sum.as_str() {
                problems.push(format!(
                    "disk image holds md5 {sum}, L3 wrote {}",
                    l3["md5"]
                ));
            }
        } else {
            problems.push("L3 reported no result".into());
        }
        if !problems.is_empty() {
            failures += 1;
            tracing::warn!("{}", vm::tail(&log, 30));
        }
        let record = serde_json::json!({"nested": {
            "boot": boot,
            "tries": retried.tries,
            "stalled_s": retried.stalled.iter().map(|d| d.as_secs_f64()).collect::<Vec<_>>(),
            "boot_s": run.boot_time.map(|d| d.as_secs_f64()),
            "total_s": run.elapsed.as_secs_f64(),
            "ok": problems.is_empty(),
            "problems": problems,
        }});
        println!("{}-RECORD {record}", crate::initramfs::MARK);
    }
    if failures > 0 {
        return Err(LabError::Guest(format!(
            "{failures} of {boots} nested runs failed"
        )));
    }
    Ok(())
}

/// md5 of a buffer as hex, by busybox's `md5sum` (the guest has no other hashing tool, and
/// the second-level guest computes its side the same way).
fn md5_hex(data: &[u8]) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        return "md5sum-unavailable".into();
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(data);
    }
    child
        .wait_with_output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

/// The start of the lab's NVMe benchmark scripts: modules loaded, the controller (`$bdf`)
/// bound to vfio-pci, 2 s of large random writes so that reads hit written blocks.
pub const NVME_BENCH_START: &str = r#". /lab/lib.sh
modprobe vfio_iommu_type1 && modprobe vfio_pci && modprobe nvme || fail "modprobe"
bdf=$(pci_by_class 0x010802) || fail "no NVMe controller"
vfblk-nvme bind-vfio $bdf || fail "bind-vfio"
step "warm-up: 2 s of 512 KiB random writes"
vfblk-nvme perf $bdf --rw randwrite --bs 524288 --qd 4 --seconds 2 --warmup-ms 0 >/dev/null || fail "fill"
"#;

/// Script of the NVMe benchmark: our driver's `perf` at QD1 and QD32, then fio with io_uring
/// on the guest kernel's nvme driver at the same depths, on the same controller and vCPUs.
pub fn nvme_bench_script(seconds: u32) -> String {
    let fio = |qd: u32| {
        format!(
            "fio --name=qd{qd} --filename=/dev/nvme0n1 --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth={qd} --numjobs=1 --runtime={seconds} --time_based --ramp_time=1 --norandommap --randrepeat=0 --output-format=json"
        )
    };
    format!(
        r#"{NVME_BENCH_START}for qd in 1 32; do
    step "vfblk-nvme perf randread 4 KiB QD$qd, {seconds} s"
    vfblk-nvme perf $bdf --rw randread --bs 4096 --qd $qd --seconds {seconds} --json > /tmp/perf.json || fail "perf QD$qd"
    record "{{\"ours_qd$qd\": $(cat /tmp/perf.json)}}"
done
vfblk-nvme bind-kernel $bdf || fail "bind-kernel"
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do [ -b /dev/nvme0n1 ] && break; sleep 0.25; done
step "fio io_uring randread 4 KiB QD1, {seconds} s"
{fio1} > /tmp/fio.json || fail "fio QD1"
record "{{\"fio_qd1\": $(tr -d '\n' < /tmp/fio.json)}}"
step "fio io_uring randread 4 KiB QD32, {seconds} s"
{fio32} > /tmp/fio.json || fail "fio QD32"
record "{{\"fio_qd32\": $(tr -d '\n' < /tmp/fio.json)}}"
record "{{\"fio_command\": \"{fio_cmd}\"}}"
"#,
        fio1 = fio(1),
        fio32 = fio(32),
        fio_cmd = fio(0)
            .replace("--iodepth=0", "--iodepth=QD")
            .replace("--name=qd0", "--name=qdQD"),
    )
}
