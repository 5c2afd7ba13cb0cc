//! Guest initramfs images: busybox, kernel modules with their dependencies, programs with the
//! shared libraries `ldd` names, the lab's `/init`, and a test script.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::Archive;
use crate::kernel::{GuestKernel, ModuleIndex};
use crate::{LabError, Result};

/// Prefix of every line the guest writes for the host to read; see [`crate::vm::Console`].
pub const MARK: &str = "@@VFBLK";

/// Everything a guest image holds before it is written out.
pub struct Initramfs {
    archive: Archive,
    release: String,
    libs: BTreeSet<PathBuf>,
}

/// Shell helpers the test scripts source from `/lab/lib.sh`.
const LIB_SH: &str = r#"# Helpers for lab test scripts (busybox sh).
# record JSON: one machine-readable line for the host.
record() { echo "@@VFBLK-RECORD $*"; }
# step TEXT: progress on the console, shown by the host.
step() { echo "@@VFBLK-STEP $*"; }
# kernel_says: what the kernel logged about programs that died (a segfault, a fatal signal,
# the OOM killer), whatever the console's loglevel hid, for the host to record.
kernel_says() {
    dmesg 2>/dev/null \
        | grep -E 'segfault at|traps:|general protection|invalid opcode|fatal signal|Out of memory|Killed process|BUG:|Oops' \
        | tail -n 20 | while read -r line; do echo "@@VFBLK-KERNEL $line"; done
}
fail() { echo "@@VFBLK-FAIL $*"; kernel_says; exit 1; }
# The PCI address of the first device of class $1 (e.g. 0x010802 for NVMe).
pci_by_class() {
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat $d/class)" = "$1" ]; then basename $d; return 0; fi
    done
    return 1
}
"#;

/// The guest's `/init`: mounts, hugepages, then the test script or a shell, then power-off.
fn init_script(hugepages: u32) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/lab/bin:/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/hugepages
mount -t hugetlbfs hugetlbfs /dev/hugepages
echo {hugepages} > /proc/sys/vm/nr_hugepages
# A program killed by a signal that dumps core is logged by the kernel (with its registers).
echo 1 > /proc/sys/kernel/print-fatal-signals
ip link set lo up 2>/dev/null
echo "{MARK}-BOOTED $(cut -d' ' -f1 /proc/uptime)"
if grep -q 'vfblk.shell' /proc/cmdline; then
    echo "lab shell: the test script is /lab/test.sh; 'poweroff -f' leaves"
    setsid cttyhack sh -l
else
    cd /lab && sh /lab/test.sh
    status=$?
    [ $status = 0 ] || {{ . /lab/lib.sh; kernel_says; }}
    echo "{MARK}-EXIT $status"
fi
sync
poweroff -f
"#
    )
}

impl Initramfs {
    /// A bootable base: busybox, `/init`, `/lab/lib.sh`, and the given modules (with their
    /// dependencies) under `/lib/modules/<release>` with a `modules.dep` for `modprobe`.
    pub fn new(kernel: &GuestKernel, modules: &[&str], hugepages: u32) -> Result<Self> {
        let mut archive = Archive::new();
        for dir in ["proc", "sys", "dev", "tmp", "run", "root", "etc", "lab/bin"] {
            archive.dir(dir);
        }
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            return Err(LabError::Setup(
                "/bin/busybox missing: install busybox-static (scripts/setup.sh)".into(),
            ));
        }
        archive.file("bin/busybox", busybox, 0o755);
        archive.bytes("init", init_script(hugepages), 0o755);
        archive.bytes("lab/lib.sh", LIB_SH, 0o644);
        archive.bytes("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644);
        archive.bytes("etc/group", "root:x:0:\n", 0o644);
        let mut image = Self {
            archive,
            release: kernel.release.clone(),
            libs: BTreeSet::new(),
        };
        image.add_modules(kernel, modules)?;
        Ok(image)
    }

    fn add_modules(&mut self, kernel: &GuestKernel, names: &[&str]) -> Result<()> {
        let index = ModuleIndex::new(kernel)?;
        let closure = index.closure(names)?;
        let base = format!("lib/modules/{}", self.release);
        let strip = |rel: &Path| -> String {
            let s = rel.to_string_lossy();
            s.trim_end_matches(".xz")
                .trim_end_matches(".zst")
                .to_string()
        };
        let mut dep_lines = String::new();
        for (name, rel, _) in &closure {
            self.archive
                .bytes(&format!("{base}/{}", strip(rel)), index.read(rel)?, 0o644);
            // modules.dep lists every transitive dependency, the one to load first last.
            let mut transitive = Vec::new();
            self.transitive(&closure, name, &mut transitive);
            let deps: Vec<String> = transitive
                .iter()
                .rev()
                .filter(|d| *d != name)
                .filter_map(|d| closure.iter().find(|(n, _, _)| n == d))
                .map(|(_, r, _)| strip(r))
                .collect();
            dep_lines.push_str(&format!("{}: {}\n", strip(rel), deps.join(" ")));
        }
        self.archive
            .bytes(&format!("{base}/modules.dep"), dep_lines, 0o644);
        self.archive
            .bytes(&format!("{base}/modules.builtin"), "", 0o644);
        Ok(())
    }

    fn transitive(
        &self,
        closure: &[(String, PathBuf, Vec<String>)],
        name: &str,
        out: &mut Vec<String>,
    ) {
        if out.iter().any(|n| n == name) {
            return;
        }
        if let Some((_, _, deps)) = closure.iter().find(|(n, _, _)| n == name) {
            for dep in deps {
                self.transitive(closure, dep, out);
            }
            out.push(name.to_string());
        }
    }

    /// Adds a program and the shared libraries it loads, at the same paths as on the host.
    pub fn add_program(&mut self, host: &Path, dest: &str) -> Result<()> {
        if !host.exists() {
            return Err(LabError::Setup(format!(
                "{} does not exist",
                host.display()
            )));
        }
        self.archive.file(dest, host, 0o755);
        self.add_libs_of(host)
    }

    /// Adds the shared libraries a program or library loads.
    pub fn add_libs_of(&mut self, host: &Path) -> Result<()> {
        for lib in ldd(host)? {
            if self.libs.insert(lib.clone()) {
                let dest = lib.to_string_lossy().into_owned();
                self.archive.file(&dest, &lib, 0o755);
            }
        }
        Ok(())
    }

    /// Adds a file.
    pub fn add_file(&mut self, dest: &str, host: &Path, mode: u32) {
        self.archive.file(dest, host, mode);
    }

    /// Adds a file with the given contents.
    pub fn add_bytes(&mut self, dest: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.archive.bytes(dest, data, mode);
    }

    /// Adds a host directory tree.
    pub fn add_tree(&mut self, dest: &str, host: &Path) -> Result<()> {
        Ok(self.archive.tree(dest, host)?)
    }

    /// Replaces `/init` (the lab's own runs the test script; a guest that boots another init
    /// from a disk brings its own).
    pub fn set_init(&mut self, script: &str) {
        self.archive.bytes("init", script, 0o755);
    }

    /// Sets the script `/init` runs (with `/lab/lib.sh` available to source).
    pub fn set_test_script(&mut self, script: &str) {
        self.archive.bytes("lab/test.sh", script, 0o755);
    }

    /// Writes the image.
    pub fn write(&self, path: &Path) -> Result<u64> {
        Ok(self.archive.write_file(path)?)
    }
}

/// The shared libraries (and the ELF interpreter) `ldd` reports for a binary; empty for a
/// static one.
pub fn ldd(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| LabError::Setup(format!("ldd {}: {e}", binary.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libx.so.1 => /lib/x/libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let candidate = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = candidate.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}
