//! Software cost per I/O without hardware counters (this machine has none): the bridge's
//! null backend driven by a polling client, measured twice.
//!
//! - Instructions and heap allocations per I/O on the request path: the bridge under
//!   valgrind's callgrind, collecting only inside the per-queue processing function (taking
//!   requests, the backend, completing them) over a fixed run; allocations are the calls to
//!   the C allocator counted there.
//! - System calls per I/O of the poller thread, natively: `strace -c` attached to that one
//!   thread while the client runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vfblk_lab::process::spawn_listening;

use crate::system::tool_runs;
use crate::{io_error, Error, Result};

/// Options of the cost measurement.
#[derive(Debug, Clone)]
pub struct CostOptions {
    /// Seconds of client I/O per measurement.
    pub seconds: f64,
    /// Requests in flight.
    pub qd: u16,
    /// Print JSON.
    pub json: bool,
    /// What kind of frontend the client plays.
    pub frontend: CostFrontend,
}

/// The frontend the cost is measured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CostFrontend {
    /// QEMU-like: its own inflight region.
    #[default]
    Region,
    /// Without an inflight region (libblkio-like), the target under `vfblk-keeper` keeping a
    /// region of its own.
    OwnRegion,
    /// A migration's source: the dirty log on (LOG_ALL and used-ring logging).
    DirtyLog,
}

impl std::str::FromStr for CostFrontend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "region" => Ok(Self::Region),
            "own-region" => Ok(Self::OwnRegion),
            "dirty-log" => Ok(Self::DirtyLog),
            _ => Err(format!("{s:?}: region, own-region or dirty-log")),
        }
    }
}

impl CostFrontend {
    fn describe(self) -> &'static str {
        match self {
            Self::Region => "with its own inflight region",
            Self::OwnRegion => "without an inflight region (the target's own, under vfblk-keeper)",
            Self::DirtyLog => "migrating (dirty log on)",
        }
    }
}

/// What one measurement found.
#[derive(Debug, Clone, Default)]
pub struct Cost {
    /// I/Os the client completed under callgrind.
    pub callgrind_ios: u64,
    /// Instructions executed inside the request path.
    pub instructions: u64,
    /// Calls to the C allocator inside the request path.
    pub allocations: u64,
    /// I/Os the client completed under strace.
    pub strace_ios: u64,
    /// System calls of the poller thread meanwhile.
    pub syscalls: u64,
    /// The poller's system calls by name.
    pub syscalls_by_name: Vec<(String, u64)>,
}

impl Cost {
    /// Instructions per I/O.
    pub fn instructions_per_io(&self) -> f64 {
        self.instructions as f64 / self.callgrind_ios.max(1) as f64
    }
    /// Allocations per I/O.
    pub fn allocations_per_io(&self) -> f64 {
        self.allocations as f64 / self.callgrind_ios.max(1) as f64
    }
    /// System calls per I/O.
    pub fn syscalls_per_io(&self) -> f64 {
        self.syscalls as f64 / self.strace_ios.max(1) as f64
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "callgrind_ios": self.callgrind_ios,
            "instructions": self.instructions,
            "instructions_per_io": self.instructions_per_io(),
            "allocations": self.allocations,
            "allocations_per_io": self.allocations_per_io(),
            "strace_ios": self.strace_ios,
            "syscalls": self.syscalls,
            "syscalls_per_io": self.syscalls_per_io(),
            "syscalls_by_name": self.syscalls_by_name.iter().map(|(n, c)| json!({"name": n, "calls": c})).collect::<Vec<_>>(),
        })
    }
}

/// The functions whose inclusive cost is the request path: a queue's round when it has work
/// and the publication of what finished (a poller's look at an empty ring is not a
/// request's cost, and how many it makes per I/O depends on how fast the client is). The
/// ring is generic over its layout (`Ring<L>`), which its symbols carry; callgrind matched
/// only the first of two patterns with a `*` before their last `::`, so none has one.
const REQUEST_PATH: &[&str] = &["*Ring<L>::run_busy*", "*Ring<L>::publish_batch*"];
/// The C allocator's entry points.
const ALLOCATORS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
];

/// Callgrind's total of the collected events (`summary:` or `totals:`), and the calls to the
/// allocator in a profile written with uncompressed names.
pub fn parse_callgrind(text: &str) -> (u64, u64) {
    let mut total = 0;
    let mut allocations = 0;
    let mut calling_allocator = false;
    for line in text.lines() {
        if let Some(v) = line
            .strip_prefix("summary:")
            .or_else(|| line.strip_prefix("totals:"))
        {
            total = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(total);
        } else if let Some(name) = line.strip_prefix("cfn=") {
            calling_allocator = ALLOCATORS.contains(&name.trim());
        } else if let Some(calls) = line.strip_prefix("calls=") {
            if calling_allocator {
                allocations += calls
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            calling_allocator = false;
        }
    }
    (total, allocations)
}

/// The first pattern of [`REQUEST_PATH`] no function of the profile matched (callgrind
/// names a function on a `fn=` line once it collected inside it).
pub fn unmatched(text: &str) -> Option<&'static str> {
    REQUEST_PATH.iter().copied().find(|pattern| {
        let core = pattern.trim_matches('*');
        !text.lines().any(|l| {
            l.strip_prefix("fn=")
                .is_some_and(|name| name.contains(core))
        })
    })
}

/// `strace -c`'s table: total calls and calls per system call.
pub fn parse_strace_summary(text: &str) -> (u64, Vec<(String, u64)>) {
    let mut total = 0;
    let mut by_name = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors], syscall
        if fields.len() < 5 || fields[0].parse::<f64>().is_err() {
            continue;
        }
        let Ok(calls) = fields[3].parse::<u64>() else {
            continue;
        };
        let name = fields[fields.len() - 1].to_string();
        if name == "total" {
            total = calls;
        } else {
            by_name.push((name, calls));
        }
    }
    (total, by_name)
}

struct Bridge(Child);

impl Drop for Bridge {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return; // reaped already: its pid may be another process's by now
        }
        // SIGTERM first: under vfblk-keeper the child is the keeper, and a SIGKILLed keeper
        // leaves its target serving (by design), which here would spin on a core for good.
        if terminate(&mut self.0, Duration::from_secs(10)).is_err() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn client(bin_dir: &Path, socket: &Path, o: &CostOptions) -> Result<u64> {
    let out = Command::new("taskset")
        .args(["-c", "0"])
        .arg(bin_dir.join("vfblk-loadgen"))
        .arg("--socket")
        .arg(socket)
        .args(["--rw", "read", "--bs", "4096", "--polled", "--json"])
        .args(match o.frontend {
            CostFrontend::Region => &[][..],
            CostFrontend::OwnRegion => &["--no-inflight"][..],
            CostFrontend::DirtyLog => &["--dirty-log"][..],
        })
        .args([
            "--qd",
            &o.qd.to_string(),
            "--seconds",
            &o.seconds.to_string(),
        ])
        .output()
        .map_err(io_error("running vfblk-loadgen"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(text.trim())
        .map_err(|e| Error::Run(format!("load generator printed {text:?}: {e}")))?;
    report["ios"]
        .as_u64()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::Run(format!("no I/O: {report}")))
}

/// The command before the bridge's: the keeper, for a frontend without a region (the target
/// keeps its own only with an fd store).
fn keeper_prefix(bin_dir: &Path, dir: &Path, o: &CostOptions) -> Vec<String> {
    if o.frontend != CostFrontend::OwnRegion {
        return Vec::new();
    }
    vec![
        bin_dir.join("vfblk-keeper").display().to_string(),
        "--dir".into(),
        dir.join("keep").display().to_string(),
        "--".into(),
    ]
}

/// The process that runs the bridge's code: `pid` itself, or its child when `pid` is the
/// keeper.
fn bridge_process(pid: u32, o: &CostOptions) -> u32 {
    if o.frontend != CostFrontend::OwnRegion {
        return pid;
    }
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(pid)
}

fn bridge_args(bin_dir: &Path, socket: &Path) -> Vec<String> {
    vec![
        bin_dir.join("vfblk-bridge").display().to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--backend".into(),
        "null:256M".into(),
        "--poll".into(),
    ]
}

/// Waits (bounded) for a process to exit after SIGTERM.
fn terminate(child: &mut Child, within: Duration) -> Result<()> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + within;
    loop {
        if child
            .try_wait()
            .map_err(io_error("waiting for the bridge"))?
            .is_some()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Run(format!(
                "the bridge did not exit within {within:?} of SIGTERM"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn callgrind(bin_dir: &Path, dir: &Path, o: &CostOptions, cost: &mut Cost) -> Result<()> {
    let socket = dir.join("cg.sock");
    let out = dir.join("callgrind.out");
    let mut command = Command::new("taskset");
    command
        .args(["-c", "1"])
        .args(keeper_prefix(bin_dir, dir, o))
        .args(["valgrind", "--tool=callgrind", "--compress-strings=no"])
        .args(["--compress-pos=no", "--collect-atstart=no"])
        .args(REQUEST_PATH.iter().map(|f| format!("--toggle-collect={f}")))
        .arg(format!("--callgrind-out-file={}", out.display()))
        .args(bridge_args(bin_dir, &socket))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = spawn_listening(command, &socket, Duration::from_secs(120))?;
    let mut bridge = Bridge(child);
    cost.callgrind_ios = client(bin_dir, &socket, o)?;
    // Callgrind writes its profile when the program exits.
    terminate(&mut bridge.0, Duration::from_secs(120))?;
    let text =
        std::fs::read_to_string(&out).map_err(io_error(format!("reading {}", out.display())))?;
    let (instructions, allocations) = parse_callgrind(&text);
    // Every pattern must have matched: one that stops matching (a renamed function or
    // type parameter) would silently leave its share out of the figure.
    if let Some(missing) = unmatched(&text) {
        return Err(Error::Run(format!(
            "callgrind collected nothing in {missing} of {REQUEST_PATH:?} (profile {})",
            out.display()
        )));
    }
    cost.instructions = instructions;
    cost.allocations = allocations;
    Ok(())
}

fn poller_thread(pid: u32) -> Option<u32> {
    vfblk_lab::process::threads(pid)
        .into_iter()
        .find(|t| t.name.starts_with("vfblk-poller"))
        .map(|t| t.tid)
}

fn strace(bin_dir: &Path, dir: &Path, o: &CostOptions, cost: &mut Cost) -> Result<()> {
    let socket = dir.join("st.sock");
    let args = bridge_args(bin_dir, &socket);
    let mut command = Command::new("taskset");
    command
        .args(["-c", "1"])
        .args(keeper_prefix(bin_dir, dir, o))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let bridge = Bridge(spawn_listening(
        command,
        &socket,
        vfblk_lab::process::LISTEN_TIMEOUT,
    )?);
    let tid = poller_thread(bridge_process(bridge.0.id(), o))
        .ok_or_else(|| Error::Run("the bridge has no vfblk-poller thread".into()))?;
    let summary = dir.join("strace.txt");
    // One thread only (-p TID without -f): the poller, not the socket and signal threads.
    let mut tracer = Command::new("strace")
        .args(["-c", "-o"])
        .arg(&summary)
        .args(["-p", &tid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io_error("starting strace"))?;
    // strace attaches within a moment; give it one before the client starts.
    std::thread::sleep(Duration::from_millis(300));
    let ios = client(bin_dir, &socket, o);
    // SAFETY: signalling our own child; strace detaches and writes its table on SIGINT.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while tracer.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = tracer.kill();
    let _ = tracer.wait();
    cost.strace_ios = ios?;
    let text = std::fs::read_to_string(&summary)
        .map_err(io_error(format!("reading {}", summary.display())))?;
    let (total, by_name) = parse_strace_summary(&text);
    cost.syscalls = total;
    cost.syscalls_by_name = by_name;
    drop(bridge);
    Ok(())
}

/// Runs both measurements.
pub fn measure(o: &CostOptions) -> Result<Cost> {
    for tool in ["valgrind", "strace"] {
        if !tool_runs(tool) {
            return Err(Error::Run(format!(
                "{tool} not found (scripts/setup.sh installs it)"
            )));
        }
    }
    let bin_dir = vfblk_lab::sibling_bin_dir()?;
    let dir: PathBuf = vfblk_lab::run_dir("bench-cost")?;
    let mut cost = Cost::default();
    tracing::info!("cost: the bridge under callgrind, {} s of I/O", o.seconds);
    callgrind(&bin_dir, &dir, o, &mut cost)?;
    tracing::info!("cost: the poller under strace, {} s of I/O", o.seconds);
    strace(&bin_dir, &dir, o, &mut cost)?;
    Ok(cost)
}

/// Runs and prints.
pub fn bench(o: &CostOptions) -> Result<()> {
    let cost = measure(o)?;
    if o.json {
        println!("{}", cost.to_json());
        return Ok(());
    }
    println!(
        "null backend, 4 KiB random reads at QD{} from a polling vfblk-loadgen {}, {} s per run:",
        o.qd,
        o.frontend.describe(),
        o.seconds
    );
    println!(
        "  request path ({}, under callgrind): {:.0} instructions and {:.3} allocations per I/O ({} I/Os)",
        REQUEST_PATH.join(" + "),
        cost.instructions_per_io(),
        cost.allocations_per_io(),
        cost.callgrind_ios
    );
    println!(
        "  poller thread (natively, strace -c): {:.5} system calls per I/O ({} calls, {} I/Os)",
        cost.syscalls_per_io(),
        cost.syscalls,
        cost.strace_ios
    );
    for (name, calls) in &cost.syscalls_by_name {
        println!("    {name}: {calls}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callgrind_totals_and_allocator_calls_are_read() {
        let profile = "version: 1\nevents: Ir\nfn=vfblk_vhost::ring::Ring<L>::run_busy\n\
            10 500\ncfn=malloc\ncalls=3 0x0\n10 90\ncfn=memcpy\ncalls=7 0x0\n10 40\n\
            cfn=realloc\ncalls=2 0x0\n10 9\nsummary: 12345\n";
        assert_eq!(parse_callgrind(profile), (12345, 5));
        assert_eq!(parse_callgrind("totals: 77\n"), (77, 0));
        // The round was collected, the publication not: refused, not under-counted.
        assert_eq!(unmatched(profile), Some(REQUEST_PATH[1]));
        let both = format!("{profile}fn=vfblk_vhost::ring::Ring<L>::publish_batch\n10 40\n");
        assert_eq!(unmatched(&both), None);
    }

    #[test]
    fn strace_tables_are_read_with_and_without_errors_column() {
        let table = "% time     seconds  usecs/call     calls    errors syscall\n\
            ------ ----------- ----------- --------- --------- ----------------\n \
            60.00    0.000060          12         5           write\n \
            40.00    0.000040          10         4         1 futex\n\
            ------ ----------- ----------- --------- --------- ----------------\n\
            100.00    0.000100          11         9         1 total\n";
        let (total, by_name) = parse_strace_summary(table);
        assert_eq!(total, 9);
        assert_eq!(
            by_name,
            vec![("write".to_string(), 5), ("futex".to_string(), 4)]
        );
        assert_eq!(parse_strace_summary("").0, 0);
    }
}
