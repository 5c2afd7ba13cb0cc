//! The many-VM target's scale: one poller (pinned to CPU 1) serving 1, 4 and 16 controllers,
//! each driven by its own load generator (pinned to CPU 0) at the same depth; the poller's
//! cost per I/O is its busy time over the I/Os it served. Then 16 controllers with
//! connected but idle frontends: the target's CPU use.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vfblk_control::rpc::Client;
use vfblk_lab::process::{spawn_listening, LISTEN_TIMEOUT};

use crate::system::{cpu_seconds, thread_run_seconds};
use crate::{Error, Result};

/// Options of the scale benchmark.
#[derive(Debug, Clone)]
pub struct TargetBenchOptions {
    /// Seconds per measurement.
    pub seconds: u32,
    /// Requests in flight per controller.
    pub qd: u32,
    /// Print JSON.
    pub json: bool,
}

/// One measured controller count.
#[derive(Debug, Clone)]
pub struct ScaleRow {
    /// The frontends asked for no interrupts (polling drivers).
    pub polled: bool,
    /// Controllers served.
    pub controllers: usize,
    /// I/Os completed per second, over all controllers.
    pub iops: f64,
    /// Poller busy time per I/O, in nanoseconds.
    pub busy_ns_per_io: f64,
    /// Target CPU time (user + system) per I/O, in nanoseconds.
    pub cpu_ns_per_io: f64,
}

/// RAM-disk data over all controllers of a row.
const DATA_MIB: u64 = 64;

struct Bench {
    dir: PathBuf,
    bin_dir: PathBuf,
    target: Child,
}

impl Bench {
    fn call(&self, method: &str, params: Value) -> Result<Value> {
        Client::connect(&self.dir.join("rpc.sock"))
            .and_then(|mut c| c.call(method, params))
            .map_err(|e| Error::Run(format!("{method}: {}", crate::error_chain(&e))))
    }

    fn shm(&self, name: &str) -> String {
        format!("/dev/shm/vfblk-bench-target-{}-{name}", std::process::id())
    }

    /// `names` controllers on RAM disks of `total_mib / names.len()` MiB each (the same data
    /// in all, so that rows differ in controllers, not in memory touched).
    fn create(&self, names: &[String], total_mib: u64) -> Result<()> {
        let each = (total_mib / names.len().max(1) as u64).max(1) << 20;
        for n in names {
            self.call(
                "backend_create",
                json!({"name": n, "kind": "mem", "path": self.shm(n), "size": each}),
            )?;
            self.call(
                "vhost_blk_create",
                json!({"name": n, "socket": self.dir.join(format!("{n}.sock")), "backend": n}),
            )?;
        }
        Ok(())
    }

    fn delete(&self, names: &[String]) -> Result<()> {
        for n in names {
            self.call("vhost_blk_delete", json!({ "name": n }))?;
            self.call("backend_delete", json!({ "name": n }))?;
            let _ = std::fs::remove_file(self.shm(n));
        }
        Ok(())
    }

    fn loadgen(&self, name: &str, args: &[String]) -> Result<Child> {
        Command::new("taskset")
            .args(["-c", "0"])
            .arg(self.bin_dir.join("vfblk-loadgen"))
            .arg("--socket")
            .arg(self.dir.join(format!("{name}.sock")))
            .args(args)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Io {
                what: "starting vfblk-loadgen".into(),
                source,
            })
    }

    fn busy_seconds(&self) -> Result<f64> {
        let stats = self.call("stats", json!({}))?;
        Ok(stats["pollers"][0]["busy_seconds"].as_f64().unwrap_or(0.0))
    }

    fn scale(&self, controllers: usize, polled: bool, o: &TargetBenchOptions) -> Result<ScaleRow> {
        let names: Vec<String> = (0..controllers).map(|i| format!("c{i:02}")).collect();
        self.create(&names, DATA_MIB)?;
        let qd = o.qd.to_string();
        let mut args: Vec<String> = ["--rw", "read", "--bs", "4096", "--qd", &qd, "--seconds"]
            .iter()
            .map(|s| s.to_string())
            .chain([o.seconds.to_string()])
            .collect();
        if polled {
            args.push("--polled".into());
        }
        let (busy0, cpu0) = (self.busy_seconds()?, cpu_seconds(self.target.id())?);
        let loads = names
            .iter()
            .map(|n| self.loadgen(n, &args))
            .collect::<Result<Vec<_>>>()?;
        let mut ios = 0u64;
        let mut seconds = 0f64;
        for load in loads {
            let out = load.wait_with_output().map_err(|source| Error::Io {
                what: "waiting for vfblk-loadgen".into(),
                source,
            })?;
            let text = String::from_utf8_lossy(&out.stdout);
            let r: Value = serde_json::from_str(text.trim())
                .map_err(|e| Error::Run(format!("load generator printed {text:?}: {e}")))?;
            ios += r["ios"].as_u64().unwrap_or(0);
            seconds = seconds.max(r["seconds"].as_f64().unwrap_or(0.0));
        }
        let (busy1, cpu1) = (self.busy_seconds()?, cpu_seconds(self.target.id())?);
        self.delete(&names)?;
        let per_io = |s: f64| s * 1e9 / ios.max(1) as f64;
        Ok(ScaleRow {
            polled,
            controllers,
            iops: ios as f64 / seconds.max(1e-9),
            busy_ns_per_io: per_io(busy1 - busy0),
            cpu_ns_per_io: per_io(cpu1 - cpu0),
        })
    }

    /// Target CPU use (percent of one core) with `controllers` idle frontends connected.
    fn idle(&self, controllers: usize, seconds: u32) -> Result<f64> {
        let names: Vec<String> = (0..controllers).map(|i| format!("idle{i:02}")).collect();
        self.create(&names, DATA_MIB)?;
        let args: Vec<String> = vec![
            "--idle".into(),
            "--seconds".into(),
            (seconds + 2).to_string(),
        ];
        let mut loads = names
            .iter()
            .map(|n| self.loadgen(n, &args))
            .collect::<Result<Vec<_>>>()?;
        // Connected and set up first; then the measurement.
        std::thread::sleep(Duration::from_millis(1500));
        let connected = self.call("vhost_blk_list", json!({}))?;
        let all = connected
            .as_array()
            .map(|a| a.iter().filter(|c| c["connected"] == true).count())
            .unwrap_or(0);
        if all != controllers {
            return Err(Error::Run(format!(
                "{all} of {controllers} idle frontends connected"
            )));
        }
        // An idle target's threads (pollers, the RPC thread) live throughout.
        let (cpu0, t0) = (thread_run_seconds(self.target.id())?, Instant::now());
        std::thread::sleep(Duration::from_secs(u64::from(seconds)));
        let cpu = thread_run_seconds(self.target.id())? - cpu0;
        let percent = 100.0 * cpu / t0.elapsed().as_secs_f64();
        for l in &mut loads {
            let _ = l.wait();
        }
        self.delete(&names)?;
        Ok(percent)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.target.kill();
        let _ = self.target.wait();
    }
}

/// The scale benchmark's result.
#[derive(Debug, Clone)]
pub struct ScaleResult {
    /// Polling rows (1, 4, 16 controllers), then interrupt-driven ones.
    pub rows: Vec<ScaleRow>,
    /// Target CPU use (percent of one core) with 16 idle frontends connected.
    pub idle_16_cpu_percent: f64,
    /// The target's and the clients' commands.
    pub command: String,
    /// Requests in flight per controller.
    pub qd: u32,
    /// Seconds per row.
    pub seconds: u32,
}

/// Runs the benchmark: 1, 4 and 16 controllers, polling and interrupt-driven frontends,
/// then 16 idle ones.
pub fn run(o: &TargetBenchOptions) -> Result<ScaleResult> {
    let bin_dir = vfblk_lab::sibling_bin_dir()?;
    let dir = vfblk_lab::run_dir("bench-target")?;
    let rpc = dir.join("rpc.sock");
    let target_args = [
        "taskset".to_string(),
        "-c".into(),
        "1".into(),
        bin_dir.join("vfblk-bridge").display().to_string(),
        "--config".into(),
        dir.join("target.json").display().to_string(),
        "--rpc".into(),
        rpc.display().to_string(),
        "--cpus".into(),
        "1".into(),
    ];
    let mut command = Command::new(&target_args[0]);
    command
        .args(&target_args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let target = spawn_listening(command, &rpc, LISTEN_TIMEOUT)?;
    let bench = Bench {
        dir: dir.clone(),
        bin_dir,
        target,
    };
    let mut rows = Vec::new();
    for polled in [true, false] {
        for n in [1, 4, 16] {
            tracing::info!(
                "{n} controller(s) on one poller, {} frontends, {} s",
                if polled {
                    "polling"
                } else {
                    "interrupt-driven"
                },
                o.seconds
            );
            rows.push(bench.scale(n, polled, o)?);
        }
    }
    tracing::info!("16 controllers with idle frontends, {} s", o.seconds);
    let idle = bench.idle(16, o.seconds)?;
    let command = format!(
        "{} ; per controller: taskset -c 0 vfblk-loadgen --rw read --bs 4096 --qd {} --seconds {} [--polled]",
        target_args.join(" "),
        o.qd,
        o.seconds
    );
    Ok(ScaleResult {
        rows,
        idle_16_cpu_percent: idle,
        command,
        qd: o.qd,
        seconds: o.seconds,
    })
}

impl ScaleResult {
    fn polled_label(polled: bool) -> &'static str {
        if polled {
            "polling (no interrupts asked, `--polled`)"
        } else {
            "asking for an interrupt per completion batch"
        }
    }

    /// Busy time per I/O of a row against the one-controller row of its kind, in percent.
    pub fn growth_percent(&self, row: &ScaleRow) -> f64 {
        let base = self
            .rows
            .iter()
            .find(|r| r.polled == row.polled && r.controllers == 1)
            .map(|r| r.busy_ns_per_io)
            .unwrap_or(f64::NAN);
        100.0 * (row.busy_ns_per_io / base - 1.0)
    }

    /// The result as JSON.
    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({"polled": r.polled, "controllers": r.controllers, "iops": r.iops,
                       "busy_ns_per_io": r.busy_ns_per_io, "cpu_ns_per_io": r.cpu_ns_per_io,
                       "busy_vs_one_percent": self.growth_percent(r)})
            })
            .collect();
        json!({"rows": rows, "idle_16_cpu_percent": self.idle_16_cpu_percent,
               "command": self.command, "qd": self.qd, "seconds": self.seconds})
    }

    /// The result as a markdown section.
    pub fn to_markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## Many controllers on one poller\n\nOne target process, one poller on CPU 1, mem backends (64 MiB of data over all controllers of a row), one `vfblk-loadgen` per controller on CPU 0, 4 KiB random reads at QD {} each, {} s per row. *Busy ns per I/O*: the poller's time in loops that found work over the I/Os; *CPU ns per I/O*: the process's user + system time over the same I/Os; the idle figure adds up its threads' run times (nanoseconds).\n",
            self.qd, self.seconds
        );
        let _ = writeln!(
            out,
            "| frontends | controllers | IOPS | busy ns per I/O | CPU ns per I/O | busy vs 1 |\n|---|---|---|---|---|---|"
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {:.0} | {} |",
                if r.controllers == 1 {
                    Self::polled_label(r.polled)
                } else {
                    ""
                },
                r.controllers,
                crate::system::thousands(r.iops),
                r.busy_ns_per_io,
                r.cpu_ns_per_io,
                if r.controllers == 1 {
                    "—".to_string()
                } else {
                    format!("{:+.1}%", self.growth_percent(r))
                }
            );
        }
        let _ = writeln!(
            out,
            "\n16 controllers with connected, idle frontends: the target used **{:.2} %** of one core.\n\n    {}\n",
            self.idle_16_cpu_percent, self.command
        );
        out
    }
}

/// Runs the benchmark and prints its table (or JSON).
pub fn bench(o: &TargetBenchOptions) -> Result<()> {
    let result = run(o)?;
    if o.json {
        println!("{}", result.to_json());
    } else {
        print!("{}", result.to_markdown());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_time_of_this_process_is_read_and_grows_with_work() {
        let me = std::process::id();
        let (before, run_before) = (
            super::cpu_seconds(me).unwrap(),
            super::thread_run_seconds(me).unwrap(),
        );
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let (after, run_after) = (
            super::cpu_seconds(me).unwrap(),
            super::thread_run_seconds(me).unwrap(),
        );
        assert!(
            after - before >= 0.1,
            "{before} -> {after} after 200 ms of spinning"
        );
        assert!(
            run_after - run_before >= 0.1,
            "{run_before} -> {run_after} after 200 ms of spinning"
        );
        assert!(super::cpu_seconds(u32::MAX).is_err(), "no such process");
        assert!(
            super::thread_run_seconds(u32::MAX).is_err(),
            "no such process"
        );
    }
}
