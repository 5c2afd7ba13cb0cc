//! A lab guest with systemd as PID 1, for the unit in `dist/systemd/`: a Debian 12 root file
//! system made by `mmdebstrap` from Debian's packages, cached as an ext4 image (built once per
//! cache), booted through a small busybox initramfs that mounts it and switches to
//! `/lib/systemd/systemd`. The run's files (the project's binaries in `/usr/local/bin`, the
//! unit as shipped, a test script and the service that runs it) travel in that initramfs and
//! are copied into the root before systemd starts; the cached image itself is never written
//! (the root disk is `snapshot=on`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::initramfs::{Initramfs, MARK};
use crate::kernel::{ensure_kernel, run_capture, GuestKernel};
use crate::vm::{self, Accel, Echo, Limits, RetriedRun, VmSpec};
use crate::{cache_dir, project_bin_dir, run_dir, workspace_root, LabError, Result};

/// Debian suite of the root file system.
const SUITE: &str = "bookworm";

/// Packages on top of Debian's essential set: systemd as init, and udev (device units).
const PACKAGES: &[&str] = &["systemd", "systemd-sysv", "udev"];

/// The cache entry's name; a change of [`SUITE`], [`PACKAGES`] or of how the image is made
/// takes a new one.
const ROOTFS_NAME: &str = "bookworm-systemd-1";

/// Size of the ext4 image (sparse; the system takes about 160 MiB of it).
const IMAGE_MIB: u64 = 768;

/// The cached root file system.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// The ext4 image.
    pub image: PathBuf,
    /// The systemd package's version in it (e.g. `252.39-1~deb12u1`).
    pub systemd_version: String,
}

/// Returns the cached root file system, building it first if needed (`mmdebstrap`, root
/// needed, about 35 s with the Debian mirror at hand).
pub fn ensure_rootfs() -> Result<Rootfs> {
    let dir = cache_dir()?.join("rootfs").join(ROOTFS_NAME);
    let image = dir.join("root.ext4");
    let version_file = dir.join("systemd-version");
    if let (true, Ok(version)) = (image.exists(), std::fs::read_to_string(&version_file)) {
        return Ok(Rootfs {
            image,
            systemd_version: version.trim().to_string(),
        });
    }
    tracing::info!(
        "building the systemd guest's root file system with mmdebstrap (cached in {})",
        dir.display()
    );
    std::fs::create_dir_all(&dir)?;
    // Built beside the cache entry under this process's name and renamed into place, so a
    // half-built tree is never taken for a cached one.
    let tree = dir.join(format!("tree.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tree);
    let include = format!("--include={}", PACKAGES.join(","));
    let built = run_capture(
        Command::new("mmdebstrap")
            .args(["--mode=root", "--variant=essential", "--quiet", &include])
            // The host's apt takes old Release files (a snapshot mirror); so must this one.
            .arg("--aptopt=Acquire::Check-Valid-Until \"false\"")
            .args([
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                SUITE,
            ])
            .arg(&tree),
        "mmdebstrap (package mmdebstrap; scripts/setup.sh installs it)",
    );
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tree);
        return Err(e);
    }
    let version = run_capture(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                tree.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f=${Version}", "systemd"]),
        "dpkg-query of the guest's systemd",
    )?;
    let tmp_image = dir.join(format!("root.ext4.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp_image);
    let made = run_capture(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "vfblkroot", "-d"])
            .arg(&tree)
            .arg(&tmp_image)
            .arg(format!("{IMAGE_MIB}M")),
        "mkfs.ext4 -d of the guest's root file system",
    );
    let _ = std::fs::remove_dir_all(&tree);
    made?;
    std::fs::rename(&tmp_image, &image)?;
    std::fs::write(&version_file, &version)?;
    Ok(Rootfs {
        image,
        systemd_version: version.trim().to_string(),
    })
}

/// The initramfs's `/init`: mounts the root disk, copies the run's files into it, and hands
/// the machine to systemd. A failure here is the run's failure (said on the console).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
die() {
    echo "@@VFBLK-BOOTED 0"
    echo "@@VFBLK-FAIL before systemd: $*"
    echo "@@VFBLK-EXIT 1"
    poweroff -f
}
# ext4 needs crc32c (a soft dependency, which modules.dep does not list).
for m in virtio_pci virtio_blk crc32c_generic ext4; do modprobe $m || die "modprobe $m"; done
# A guest with an emulated NVMe controller: VFIO loaded here (the root file system has no
# modules for this kernel), the binding left to vfblk-setup as on a host.
if [ -e /lab/vfio ]; then
    for m in vfio_iommu_type1 vfio_pci; do modprobe $m || die "modprobe $m"; done
fi
for i in $(seq 1 100); do [ -b /dev/vda ] && break; sleep 0.1; done
mkdir -p /newroot
mount -t ext4 /dev/vda /newroot || die "no root file system on /dev/vda"
cp /lab/bin/* /newroot/usr/local/bin/ || die "copying the binaries"
rm -r /lab/bin
cp -r /lab /newroot/lab || die "copying /lab"
sys=/newroot/etc/systemd/system
cp /lab/units/* $sys/ || die "copying the units"
ln -s ../vfblk-lab.service $sys/multi-user.target.wants/vfblk-lab.service
# Not a first boot (systemd-firstboot would prompt on the console), no login prompt there.
echo 0123456789abcdef0123456789abcdef > /newroot/etc/machine-id
for unit in systemd-firstboot.service serial-getty@ttyS0.service getty@tty1.service \
    getty-static.service; do
    ln -sf /dev/null $sys/$unit
done
umount /proc /sys /dev
exec switch_root /newroot /lib/systemd/systemd
"#;

/// The service that runs the test script once the system is up, on the serial console.
const LAB_SERVICE: &str = r#"[Unit]
Description=vfblk lab test script

[Service]
Type=oneshot
ExecStart=/bin/bash /lab/run.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
"#;

/// What that service runs: the test script between the lab's console markers, then off.
fn run_sh() -> String {
    format!(
        r#"echo 1 > /proc/sys/kernel/print-fatal-signals
echo "{MARK}-BOOTED $(cut -d' ' -f1 /proc/uptime)"
cd /lab && bash /lab/test.sh
status=$?
[ $status = 0 ] || {{ . /lab/lib.sh; kernel_says; }}
echo "{MARK}-EXIT $status"
systemctl poweroff --force --force
"#
    )
}

/// The project's binaries a systemd guest carries, in `/usr/local/bin` as the unit names
/// them.
const BINARIES: &[&str] = &["vfblk-bridge", "vfblk-rpc", "vfblk-setup", "vfblk-loadgen"];

/// 2 MiB hugepages reserved at boot: what the unit's `ExecStartPre=` (`vfblk-setup config
/// --hugemem 4096`) wants, which it cannot get later from a fragmented guest.
pub const HUGEPAGES: u32 = 2048;

/// A prepared systemd guest.
pub struct SystemdLab {
    /// The guest kernel.
    pub kernel: GuestKernel,
    /// The root file system.
    pub rootfs: Rootfs,
    /// The project's binaries.
    pub bin_dir: PathBuf,
    /// This run's directory.
    pub dir: PathBuf,
}

impl SystemdLab {
    /// Fetches (or finds cached) the kernel and the root file system, builds the binaries.
    pub fn new(name: &str) -> Result<Self> {
        Ok(Self {
            kernel: ensure_kernel()?,
            rootfs: ensure_rootfs()?,
            bin_dir: project_bin_dir()?,
            dir: run_dir(name)?,
        })
    }

    /// The initramfs of a run of `script`: busybox, the modules the root disk needs (and
    /// VFIO's, with `vfio`), the binaries (without debug info: the guest copies them), the
    /// unit of `dist/` as shipped and the lab's service.
    fn initramfs(&self, script: &str, vfio: bool) -> Result<PathBuf> {
        let mut modules = vec!["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];
        if vfio {
            modules.extend(["vfio_iommu_type1", "vfio_pci"]);
        }
        let mut image = Initramfs::new(&self.kernel, &modules, 0)?;
        image.set_init(INIT);
        if vfio {
            image.add_bytes("lab/vfio", "", 0o644);
        }
        let stripped = self.dir.join("bin");
        std::fs::create_dir_all(&stripped)?;
        for bin in BINARIES {
            let out = stripped.join(bin);
            run_capture(
                Command::new("strip")
                    .arg("--strip-debug")
                    .arg(self.bin_dir.join(bin))
                    .arg("-o")
                    .arg(&out),
                "strip (binutils)",
            )?;
            image.add_file(&format!("lab/bin/{bin}"), &out, 0o755);
        }
        image.add_file(
            "lab/units/vfblk-bridge.service",
            &workspace_root().join("dist/systemd/vfblk-bridge.service"),
            0o644,
        );
        image.add_bytes("lab/units/vfblk-lab.service", LAB_SERVICE, 0o644);
        image.add_bytes("lab/run.sh", run_sh(), 0o755);
        image.set_test_script(script);
        let path = self.dir.join("initrd.cpio");
        image.write(&path)?;
        Ok(path)
    }

    /// The guest: TCG, 2 vCPUs, RAM for the hugepage pool and the test's processes.
    pub fn spec(&self, initrd: &Path) -> VmSpec {
        let mut spec = VmSpec::new("systemd", Accel::Tcg, &self.kernel.vmlinux, initrd);
        spec.memory_mib = 6144;
        spec.root_disk = Some(self.rootfs.image.clone());
        // init_on_alloc=0: the boot-time pool is not zeroed page by page under TCG (the
        // pages are zeroed when first mapped anyway).
        spec.cmdline = format!("hugepages={HUGEPAGES} init_on_alloc=0");
        spec
    }

    /// Boots the guest and runs `script` (bash, with `/lab/lib.sh`) as a systemd service.
    pub fn run(&self, script: &str, limits: Limits, echo: Echo) -> Result<RetriedRun> {
        self.run_with_nvme(script, limits, echo, None)
    }

    /// [`SystemdLab::run`]; with `Some(mib)`, the guest also has an emulated NVMe controller
    /// with one namespace of `mib` MiB behind a virtual IOMMU, and VFIO loaded, for the
    /// unit's sandbox to meet a controller as on a host (the script binds it with
    /// `vfblk-setup config --pci`).
    pub fn run_with_nvme(
        &self,
        script: &str,
        limits: Limits,
        echo: Echo,
        nvme_mib: Option<u64>,
    ) -> Result<RetriedRun> {
        let initrd = self.initramfs(script, nvme_mib.is_some())?;
        let mut spec = self.spec(&initrd);
        if let Some(mib) = nvme_mib {
            let image = self.dir.join("nvme.img");
            std::fs::File::create(&image)?.set_len(mib << 20)?;
            spec.iommu = true;
            spec.nvme.push(vm::NvmeDisk {
                image,
                serial: crate::scenario::NVME_SERIAL.to_string(),
                more_namespaces: Vec::new(),
                controllers: 1,
            });
        }
        let log = self.dir.join("console.log");
        let run = vm::run_retrying_stalls(&spec, limits, 3, &log, echo)?;
        if run.run.boot_time.is_none() {
            return Err(LabError::Guest(format!(
                "the systemd guest did not boot ({:?}); console log: {}\n{}",
                run.run.ending,
                log.display(),
                vm::tail(&log, 40)
            )));
        }
        Ok(run)
    }
}
