//! The guest kernel: Debian's `linux-image-<version>-amd64`, downloaded with apt and unpacked
//! into the lab cache, with a PVH-bootable `vmlinux` extracted from its bzImage.
//!
//! A PVH `vmlinux` boots in a few seconds under TCG, skipping the real-mode setup and the
//! in-guest decompression of a bzImage.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{cache_dir, LabError, Result};

/// A guest kernel unpacked in the cache.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// The kernel release, as `uname -r` prints it in the guest (e.g. `6.1.0-56-amd64`).
    pub release: String,
    /// The PVH-bootable, uncompressed ELF kernel.
    pub vmlinux: PathBuf,
    /// The compressed bzImage as packaged.
    pub bzimage: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    pub modules_dir: PathBuf,
}

pub(crate) fn run_capture(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| LabError::Setup(format!("{what}: cannot run: {e}")))?;
    if !out.status.success() {
        return Err(LabError::Setup(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel package to use: `$VFBLK_GUEST_KERNEL` (a release such as `6.1.0-56-amd64`),
/// else what Debian's `linux-image-amd64` depends on now, else the newest one already cached.
fn wanted_release(kernels: &Path) -> Result<String> {
    if let Ok(release) = std::env::var("VFBLK_GUEST_KERNEL") {
        return Ok(release);
    }
    let deps = run_capture(
        Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
        "apt-cache depends linux-image-amd64",
    );
    if let Ok(deps) = deps {
        for line in deps.lines() {
            if let Some(pkg) = line.trim().strip_prefix("Depends: linux-image-") {
                return Ok(pkg.trim().to_string());
            }
        }
    }
    let mut cached: Vec<String> = fs::read_dir(kernels)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("vmlinux").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    cached.sort();
    cached.pop().ok_or_else(|| {
        LabError::Setup(
            "no guest kernel: apt-cache does not name one (run `apt-get update`) and none is cached"
                .into(),
        )
    })
}

/// Returns the cached guest kernel, downloading and unpacking it first if needed.
pub fn ensure_kernel() -> Result<GuestKernel> {
    let kernels = cache_dir()?.join("kernel");
    fs::create_dir_all(&kernels)?;
    let release = wanted_release(&kernels)?;
    let dir = kernels.join(&release);
    let root = dir.join("root");
    let vmlinux = dir.join("vmlinux");
    let kernel = GuestKernel {
        bzimage: root.join(format!("boot/vmlinuz-{release}")),
        modules_dir: root.join(format!("lib/modules/{release}")),
        vmlinux: vmlinux.clone(),
        release: release.clone(),
    };
    if vmlinux.exists() && kernel.modules_dir.exists() {
        return Ok(kernel);
    }
    tracing::info!(
        "fetching guest kernel linux-image-{release} (cached in {})",
        dir.display()
    );
    let _ = fs::remove_dir_all(&dir);
    let download = dir.join("download");
    fs::create_dir_all(&download)?;
    // apt's sandbox user must be able to write here, or apt warns and falls back to root.
    let _ = Command::new("chmod").arg("777").arg(&download).status();
    let fetch = || {
        run_capture(
            Command::new("apt-get")
                .args(["download", &format!("linux-image-{release}")])
                .current_dir(&download),
            "apt-get download of the guest kernel",
        )
    };
    if fetch().is_err() {
        // Stale package lists name a version the mirror no longer has: refresh once.
        tracing::warn!("apt-get download failed; running apt-get update and trying again");
        run_capture(Command::new("apt-get").arg("update"), "apt-get update")?;
        fetch()?;
    }
    let deb = fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| LabError::Setup("apt-get download left no .deb".into()))?;
    run_capture(
        Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
        "dpkg -x of the guest kernel",
    )?;
    fs::remove_file(&deb)?;
    let image = extract_vmlinux(&kernel.bzimage)?;
    let tmp = dir.join("vmlinux.tmp");
    fs::write(&tmp, image)?;
    fs::rename(&tmp, &vmlinux)?;
    Ok(kernel)
}

/// Finds the compressed payload inside a bzImage and decompresses it to the ELF `vmlinux`.
pub fn extract_vmlinux(bzimage: &Path) -> Result<Vec<u8>> {
    let data = fs::read(bzimage)?;
    let formats: [(&[u8], &str, &[&str]); 3] = [
        (b"\xfd7zXZ\x00", "xz", &["-dc"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dc"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    ];
    for (magic, tool, args) in formats {
        let mut start = 0;
        while let Some(pos) = find(&data[start..], magic) {
            let offset = start + pos;
            start = offset + 1;
            let mut child = Command::new(tool)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| LabError::Setup(format!("{tool}: {e}")))?;
            let mut stdin = child.stdin.take().expect("piped stdin");
            let payload = data[offset..].to_vec();
            let feeder = std::thread::spawn(move || {
                use std::io::Write;
                // Trailing bytes after the stream make the tool complain; that is expected.
                let _ = stdin.write_all(&payload);
            });
            let out = child.wait_with_output()?;
            let _ = feeder.join();
            if out.stdout.starts_with(b"\x7fELF") {
                return Ok(out.stdout);
            }
        }
    }
    Err(LabError::Setup(format!(
        "no ELF kernel found inside {}",
        bzimage.display()
    )))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Kernel modules of a guest kernel, with their dependencies read from each module's
/// `.modinfo` (`depends=`), so no `depmod` is needed on the host.
pub struct ModuleIndex {
    modules_dir: PathBuf,
    /// Module name (underscores) to path relative to `modules_dir`.
    by_name: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

fn module_name(file_name: &str) -> Option<String> {
    let stem = file_name
        .strip_suffix(".ko.xz")
        .or_else(|| file_name.strip_suffix(".ko.zst"))
        .or_else(|| file_name.strip_suffix(".ko"))?;
    Some(stem.replace('-', "_"))
}

impl ModuleIndex {
    /// Indexes every module below the kernel's module directory.
    pub fn new(kernel: &GuestKernel) -> Result<Self> {
        let mut by_name = BTreeMap::new();
        let mut stack = vec![kernel.modules_dir.join("kernel")];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(module_name)
                {
                    let rel = path
                        .strip_prefix(&kernel.modules_dir)
                        .expect("walked below modules_dir")
                        .to_path_buf();
                    by_name.insert(name, rel);
                }
            }
        }
        let builtin = fs::read_to_string(kernel.modules_dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next().and_then(module_name))
            .collect();
        Ok(Self {
            modules_dir: kernel.modules_dir.clone(),
            by_name,
            builtin,
        })
    }

    /// Reads a module's bytes, decompressing `.ko.xz`/`.ko.zst`.
    pub fn read(&self, rel: &Path) -> Result<Vec<u8>> {
        let path = self.modules_dir.join(rel);
        let name = rel.to_string_lossy();
        let tool = if name.ends_with(".xz") {
            "xz"
        } else if name.ends_with(".zst") {
            "zstd"
        } else {
            return Ok(fs::read(&path)?);
        };
        let out = Command::new(tool).arg("-dc").arg(&path).output()?;
        if !out.status.success() {
            return Err(LabError::Setup(format!(
                "{tool} -dc {} failed",
                path.display()
            )));
        }
        Ok(out.stdout)
    }

    fn depends(&self, rel: &Path) -> Result<Vec<String>> {
        let data = self.read(rel)?;
        let Some(pos) = find(&data, b"depends=") else {
            return Ok(Vec::new());
        };
        let rest = &data[pos + b"depends=".len()..];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Ok(String::from_utf8_lossy(&rest[..end])
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.replace('-', "_"))
            .collect())
    }

    /// The named modules and everything they depend on, dependencies first, as
    /// `(name, path relative to lib/modules/<release>, dependency names)`. Built-in modules
    /// are left out; an unknown name is an error.
    pub fn closure(&self, names: &[&str]) -> Result<Vec<(String, PathBuf, Vec<String>)>> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in names {
            self.visit(&name.replace('-', "_"), &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf, Vec<String>)>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) || self.builtin.contains(name) {
            return Ok(());
        }
        let rel = self
            .by_name
            .get(name)
            .ok_or_else(|| LabError::Setup(format!("guest kernel has no module {name}")))?;
        let deps = self.depends(rel)?;
        for dep in &deps {
            self.visit(dep, seen, order)?;
        }
        order.push((name.to_string(), rel.clone(), deps));
        Ok(())
    }
}
