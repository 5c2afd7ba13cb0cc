//! System benchmarks: whole processes side by side (our bridge, qemu-storage-daemon, and in
//! the [`suite`] SPDK and cloud-hypervisor) or the
//! lab guest (our NVMe driver against the kernel's), each run recorded with its command.

pub mod cost;
pub mod nvme;
pub mod nvme_vhost;
pub mod plot;
pub mod suite;
pub mod target;
pub mod vhost;

use crate::{Error, Result};

/// Whether `program --version` runs and succeeds (the tool is installed).
pub(crate) fn tool_runs(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// CPU seconds a process's threads have run, to the nanosecond: the sum of their
/// `/proc/PID/task/TID/schedstat` run times (the tick-based utime and stime of
/// `/proc/PID/stat` cannot tell 0 from 0.2% of a core over a few seconds). Threads that
/// exited are not counted; the processes measured here keep theirs.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let tasks = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&tasks).map_err(|source| Error::Io {
        what: format!("reading {tasks}"),
        source,
    })?;
    let mut ns = 0u64;
    for task in entries.flatten() {
        // A thread may exit between the listing and the read: it no longer counts.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| Error::Run(format!("{}: {stat:?}", task.path().display())))?;
    }
    Ok(ns as f64 / 1e9)
}
