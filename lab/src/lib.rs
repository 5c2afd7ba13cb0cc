//! The VM lab: boots a Debian guest kernel under QEMU with an emulated NVMe controller behind
//! a virtual Intel IOMMU, so the project's VFIO driver runs against a controller on machines
//! that have none, and starts second-level VMs inside that guest under its (emulated-SVM) KVM.
//!
//! Inputs come only from Debian's packages (see `scripts/setup.sh`); what is downloaded and
//! built is cached by version under [`cache_dir`].

#![deny(missing_docs)]

pub mod ceph;
pub mod cli;
pub mod cpio;
pub mod initramfs;
pub mod iovec;
pub mod kernel;
pub mod migration;
pub mod nvme_l3;
pub mod process;
pub mod qemu;
pub mod recovery;
pub mod scenario;
pub mod systemd;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Lab errors.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A missing or failing input: package, kernel, program, file.
    #[error("lab setup: {0}")]
    Setup(String),
    /// The guest did not do what the test asked.
    #[error("lab guest: {0}")]
    Guest(String),
    /// An I/O error on the host.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Lab result.
pub type Result<T> = std::result::Result<T, LabError>;

/// Where downloads, unpacked kernels and run directories live: `$VFBLK_LAB_CACHE`, else
/// `$HOME/.cache/vfblk-lab` (outside the git tree).
pub fn cache_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("VFBLK_LAB_CACHE") {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/vfblk-lab")
        }
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lab crate sits in the workspace")
        .to_path_buf()
}

/// Directory of the binaries the tests and the lab run: release code built with the
/// test-only fault injection (`--test-delay-ms`, the `VFBLK_TEST_*` faults) in its own
/// profile, `target/test-bins`, so that `target/release` never carries test flags. Built on
/// first use (once per process) so a guest never runs a stale binary.
pub fn project_bin_dir() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_bins("test-bins", &["--features", "vfblk-control/test-delay"]))
        .clone()
        .map_err(LabError::Setup)
}

/// Directory of the release binaries as an operator builds them (`cargo build --release`,
/// no test features). Built on first use.
pub fn release_bin_dir() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_bins("release", &[]))
        .clone()
        .map_err(LabError::Setup)
}

/// The binaries beside the running program, if they are all there (a benchmark measures the
/// build it belongs to: `target/release/vfblk-bench` the release binaries, the tests'
/// `target/test-bins/vfblk-bench` theirs, with no second build); else [`release_bin_dir`].
pub fn sibling_bin_dir() -> Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .filter(|dir| {
            ["vfblk-bridge", "vfblk-loadgen", "vfblk-keeper", "vfblk-rpc"]
                .iter()
                .all(|b| dir.join(b).is_file())
        });
    match beside {
        Some(dir) => Ok(dir),
        None => release_bin_dir(),
    }
}

/// The arguments of `cargo build` for the project's binaries in `profile`.
fn build_args<'a>(profile: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["build", "--quiet", "--profile", profile, "--bins"];
    args.extend([
        "-p",
        "vfblk-benches",
        "-p",
        "vfblk-lab",
        "-p",
        "vfblk-control",
    ]);
    args.extend(extra);
    args
}

/// `cargo build` of the project's binaries in `profile`; their directory.
fn build_bins(profile: &str, extra: &[&str]) -> std::result::Result<PathBuf, String> {
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(build_args(profile, extra))
        .current_dir(&root)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "cargo build --profile {profile} of the project's binaries: {status}"
        ));
    }
    Ok(target.join(profile))
}

/// A fresh directory for one run's images and logs, under the cache.
pub fn run_dir(name: &str) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let runs = cache_dir()?.join("runs");
    prune_runs(&runs, 12);
    let dir = runs.join(format!("{name}-{stamp}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Keeps the `keep` newest run directories (their logs help debugging; the images are large).
fn prune_runs(runs: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for (_, dir) in dirs.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod bin_dir_tests {
    use super::*;

    #[test]
    fn only_the_tests_own_profile_is_built_with_test_features() {
        let release = build_args("release", &[]);
        assert!(
            release.iter().all(|a| !a.contains("feature")),
            "{release:?}"
        );
        // What project_bin_dir asks for.
        let tests = build_args("test-bins", &["--features", "vfblk-control/test-delay"]);
        assert!(tests.contains(&"test-bins") && tests.contains(&"vfblk-control/test-delay"));
    }
}
