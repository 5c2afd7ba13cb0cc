//! Which QEMU runs a guest: Debian 12's own (7.2, on PATH) or QEMU 10 from
//! bookworm-backports, unpacked beside it in the cache (not installed: 7.2 stays the
//! system's). They differ where recovery is concerned: 7.2 reconnects to a vanished
//! vhost-user backend at most once a second (`reconnect=1`) and can lose a reconnect that a
//! kill interrupts; 10 takes `reconnect-ms`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::kernel::run_capture;
use crate::{cache_dir, LabError, Result};

/// Packages that make up QEMU 10 for x86 guests, from bookworm-backports.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
];

/// A QEMU to run guests with.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The binary.
    pub binary: PathBuf,
    /// Environment it needs (its module directory).
    pub env: Vec<(String, String)>,
    /// Arguments before the guest's (firmware and data directories).
    pub args: Vec<String>,
    /// Milliseconds between reconnects to a vanished vhost-user backend (`reconnect-ms`);
    /// `None`: once a second (`reconnect=1`, all QEMU 7.2 has).
    pub reconnect_ms: Option<u32>,
    /// What it is, for reports.
    pub description: String,
}

impl Qemu {
    /// Debian 12's QEMU 7.2 on PATH.
    pub fn system() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            env: Vec::new(),
            args: Vec::new(),
            reconnect_ms: None,
            description: "QEMU 7.2 (Debian 12), reconnect=1".into(),
        }
    }

    /// Where [`Qemu::backports`] sits inside a lab guest that carries it
    /// ([`crate::scenario::Contents::qemu10`]).
    pub const IN_GUEST_DIR: &'static str = "/opt/qemu10";

    /// QEMU 10 from bookworm-backports as a lab guest carries it (inside that guest), for
    /// second-level VMs; it reconnects every `reconnect_ms`.
    pub fn backports_in_guest(reconnect_ms: u32) -> Self {
        let dir = Path::new(Self::IN_GUEST_DIR);
        Self {
            binary: dir.join("qemu-system-x86_64"),
            env: Vec::new(),
            args: vec!["-L".into(), dir.join("share").display().to_string()],
            reconnect_ms: Some(reconnect_ms),
            description: format!("QEMU 10 (bookworm-backports), reconnect-ms={reconnect_ms}"),
        }
    }

    /// The files [`Qemu::backports_in_guest`] needs: (host path, path in the guest). The
    /// firmware a q35 guest booted with -kernel uses goes into one `-L` directory.
    pub fn backports_guest_files() -> Result<Vec<(PathBuf, String)>> {
        let q = Self::backports(20)?;
        let root = q
            .binary
            .ancestors()
            .nth(3)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut files = vec![(
            q.binary.clone(),
            format!("{}/qemu-system-x86_64", Self::IN_GUEST_DIR),
        )];
        for (dir, rom) in [
            ("usr/share/seabios", "bios-256k.bin"),
            ("usr/share/qemu", "linuxboot.bin"),
            ("usr/share/qemu", "linuxboot_dma.bin"),
            ("usr/share/qemu", "pvh.bin"),
            ("usr/share/qemu", "kvmvapic.bin"),
        ] {
            files.push((
                root.join(dir).join(rom),
                format!("{}/share/{rom}", Self::IN_GUEST_DIR),
            ));
        }
        Ok(files)
    }

    /// QEMU 10 from bookworm-backports, fetched with apt and unpacked into the cache on first
    /// use; it reconnects every `reconnect_ms`.
    pub fn backports(reconnect_ms: u32) -> Result<Self> {
        let dir = cache_dir()?.join("qemu-backports");
        let stamp = dir.join("version");
        if !stamp.exists() {
            fetch(&dir)?;
        }
        let version = fs::read_to_string(&stamp)?.trim().to_string();
        let root = dir.join("root");
        Ok(Self {
            binary: root.join("usr/bin/qemu-system-x86_64"),
            env: vec![(
                "QEMU_MODULE_DIR".into(),
                root.join("usr/lib/x86_64-linux-gnu/qemu")
                    .display()
                    .to_string(),
            )],
            args: vec![
                "-L".into(),
                root.join("usr/share/seabios").display().to_string(),
                "-L".into(),
                root.join("usr/share/qemu").display().to_string(),
            ],
            reconnect_ms: Some(reconnect_ms),
            description: format!(
                "QEMU {version} (bookworm-backports), reconnect-ms={reconnect_ms}"
            ),
        })
    }
}

fn fetch(dir: &std::path::Path) -> Result<()> {
    tracing::info!(
        "fetching QEMU from bookworm-backports (cached in {})",
        dir.display()
    );
    let _ = fs::remove_dir_all(dir);
    let download = dir.join("download");
    let root = dir.join("root");
    fs::create_dir_all(&download)?;
    fs::create_dir_all(&root)?;
    // apt's sandbox user must be able to write here, or apt warns and falls back to root.
    let _ = Command::new("chmod").arg("777").arg(&download).status();
    let fetch = || {
        run_capture(
            Command::new("apt-get")
                .args(["download", "-t", "bookworm-backports"])
                .args(PACKAGES)
                .current_dir(&download),
            "apt-get download of QEMU from bookworm-backports (scripts/setup.sh adds the source)",
        )
    };
    if fetch().is_err() {
        run_capture(Command::new("apt-get").arg("update"), "apt-get update")?;
        fetch()?;
    }
    let mut version = None;
    for entry in fs::read_dir(&download)?.flatten() {
        let deb = entry.path();
        if deb.extension().is_none_or(|x| x != "deb") {
            continue;
        }
        let name = deb
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if name.starts_with("qemu-system-x86_") {
            // qemu-system-x86_1%3a10.0.2+ds-2+deb13u1~bpo12+1_amd64.deb
            version = name
                .split('_')
                .nth(1)
                .map(|v| v.replace("%3a", ":").trim_start_matches("1:").to_string());
        }
        run_capture(
            Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
            "dpkg -x of a QEMU package",
        )?;
    }
    let version = version
        .ok_or_else(|| LabError::Setup("apt-get download left no qemu-system-x86".into()))?;
    fs::remove_dir_all(&download)?;
    fs::write(dir.join("version"), version)?;
    Ok(())
}
