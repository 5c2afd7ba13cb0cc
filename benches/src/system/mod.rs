//! System benchmarks: whole processes side by side (our bridge, qemu-storage-daemon, and in
//! the [`suite`] SPDK and cloud-hypervisor) or the
//! lab guest (our NVMe driver against the kernel's), each run recorded with its command.

pub mod cost;
pub mod fixed_rate;
pub mod nvme;
pub mod nvme_vhost;
pub mod plot;
pub mod suite;
pub mod suite_results;
pub mod target;
pub mod vhost;

use serde_json::Value;

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

/// CPU seconds (user + system) a process has used, threads that exited included (io_uring's
/// workers come and go), in 10 ms clock ticks: for CPU per I/O over seconds of work.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|source| Error::Io {
            what: format!("reading /proc/{pid}/stat"),
            source,
        })?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the ')'.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| Error::Run(format!("/proc/{pid}/stat: no CPU time in {stat:?}")))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// CPU seconds the live threads of a process have run, to the nanosecond: the sum of their
/// `/proc/PID/task/TID/schedstat` run times ([`cpu_seconds`]' ticks cannot tell an idle
/// process from 0.2% of a core over a few seconds). Threads that exited are not counted:
/// for processes that keep theirs.
pub(crate) fn thread_run_seconds(pid: u32) -> Result<f64> {
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

/// A client report without its latency distribution (drawn in the plots; the JSON keeps
/// the quantiles, the CDFs would make it a megabyte).
pub(crate) fn without_cdf(report: &Value) -> Value {
    let mut r = report.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("lat_cdf_us");
    }
    r
}

/// 1234567.8 as "1,234,568".
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
