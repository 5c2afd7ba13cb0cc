//! `vfblk-rpc`: manage a running `vfblk-bridge` target over its JSON-RPC socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use vfblk_bridge::spec::BackendSpec;
use vfblk_control::rpc::{Client, DEFAULT_SOCKET};

/// Manage a running vfblk-bridge target.
#[derive(Parser, Debug)]
#[command(name = "vfblk-rpc", version)]
struct Args {
    /// The target's RPC socket.
    #[arg(long, short = 's', default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the JSON result instead of a table (before or after the subcommand).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a backend: NAME and mem:PATH:SIZE, file:PATH[:SIZE], nvme:PCI_ADDR[:NSID] or
    /// rbd:POOL/IMAGE[:SIZE] with ,cluster=NAME or ,conf=PATH,id=ID,keyring=PATH.
    BackendCreate {
        /// Its name.
        name: String,
        /// What it is.
        spec: BackendSpec,
    },
    /// Delete a backend no controller uses.
    BackendDelete {
        /// Its name.
        name: String,
    },
    /// Grow a serving backend (mem, file, null, rbd) to SIZE (K/M/G/T): the file or image grows, and each
    /// connected frontend is told the new capacity (no reconnect). Shrinking is refused.
    BackendResize {
        /// Its name.
        name: String,
        /// The new size.
        #[arg(value_parser = parse_size_arg)]
        size: u64,
    },
    /// List the backends.
    BackendList,
    /// Attach an NVMe controller on vfio-pci: each namespace becomes a backend NAMEn<nsid>.
    NvmeAttach {
        /// Its name.
        name: String,
        /// Its PCI address.
        address: vfblk_nvme::pci::PciAddress,
    },
    /// Detach an NVMe controller none of whose namespaces a controller uses.
    NvmeDetach {
        /// Its name.
        name: String,
    },
    /// Register a Ceph cluster under a name: one librados client, shared by the RBD backends
    /// that name it (rbd:POOL/IMAGE,cluster=NAME), its threads bounded and optionally pinned.
    RbdClusterRegister {
        /// Its name.
        name: String,
        /// ceph.conf (default: librados's search, /etc/ceph/ceph.conf).
        #[arg(long)]
        conf: Option<PathBuf>,
        /// Client id without "client." (default admin).
        #[arg(long)]
        id: Option<String>,
        /// Keyring (default: the conf's).
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Messenger worker threads (librados's ms_async_op_threads).
        #[arg(long, value_name = "N")]
        ms_async_op_threads: Option<u32>,
        /// librados's completion and work threads (librados_thread_count).
        #[arg(long, value_name = "N")]
        librados_thread_count: Option<u32>,
        /// Pin the client's threads to these CPUs (e.g. 2,3).
        #[arg(long, value_delimiter = ',')]
        cpus: Vec<usize>,
    },
    /// Unregister a Ceph cluster no backend names.
    RbdClusterUnregister {
        /// Its name.
        name: String,
    },
    /// List the registered Ceph clusters.
    RbdClusterList,
    /// Create a vhost-user-blk controller.
    VhostBlkCreate {
        /// Its name.
        name: String,
        /// The vhost-user socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// The backend to serve.
        #[arg(long)]
        backend: String,
        /// Virtqueues offered.
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Only the pollers pinned to these CPUs (e.g. 0,1).
        #[arg(long, value_delimiter = ',')]
        cpus: Vec<usize>,
        /// Offer the disk read-only.
        #[arg(long)]
        readonly: bool,
        /// GET_ID answer (default: the name).
        #[arg(long)]
        serial: Option<String>,
        /// Requests per second (all queues together).
        #[arg(long)]
        iops: Option<u64>,
        /// Bytes per second (all queues together).
        #[arg(long, value_name = "BYTES")]
        bps: Option<u64>,
        /// The socket's owner, group and mode (default: the target's --socket-* options).
        #[command(flatten)]
        socket_access: vfblk_control::SocketAccess,
    },
    /// Delete a controller (what is in flight completes; the frontend is disconnected).
    VhostBlkDelete {
        /// Its name.
        name: String,
    },
    /// Change a running controller's limits (no reconnect; an option left out is unlimited).
    VhostBlkSetLimits {
        /// Its name.
        name: String,
        /// Requests per second.
        #[arg(long)]
        iops: Option<u64>,
        /// Bytes per second.
        #[arg(long)]
        bps: Option<u64>,
    },
    /// Make a running controller read-only (on) or writable (off). A connected driver is not
    /// told (virtio negotiates read-only once): its writes fail with I/O errors from now on.
    VhostBlkSetReadonly {
        /// Its name.
        name: String,
        /// on or off.
        #[arg(value_parser = parse_on_off, action = clap::ArgAction::Set)]
        readonly: bool,
    },
    /// List the controllers.
    VhostBlkList,
    /// I/O counters per controller and load per poller.
    Stats,
    /// Write the configuration to the target's config file now.
    ConfigSave,
    /// Try again to serve the configured entries that failed (e.g. a backing file on a
    /// mount that came late).
    BackendRetry,
    /// Hand the target over to a new process (default: the same binary path, e.g. after a
    /// package upgrade) without disconnecting any frontend; the old process exits.
    Upgrade {
        /// The binary to run instead.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// The target's program, version and pid.
    Version,
    /// The log filter in effect (RUST_LOG syntax).
    LogGetLevel,
    /// Change the log filter now (RUST_LOG syntax: debug, info,vfblk_vhost=trace, ...); a
    /// new process after an upgrade starts from its own RUST_LOG again.
    LogSetLevel {
        /// The filter.
        level: String,
    },
    /// A live view of each controller (like spdk_top): I/O rates, bandwidth, mean latency,
    /// in flight and recovered requests, and each poller's busy share, every interval.
    Top {
        /// Seconds between samples.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Samples to show (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Call any method with JSON params.
    Call {
        /// The method.
        method: String,
        /// Its params as a JSON object.
        #[arg(default_value = "{}")]
        params: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfblk-rpc: {}", vfblk_vhost::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> vfblk_bridge::Result<()> {
    if let Command::Top { interval, count } = &args.command {
        return top(args, *interval, *count);
    }
    let (method, params) = request(&args.command)?;
    let mut client = Client::connect(&args.socket)?;
    let result = client.call(method, params)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).expect("JSON values print")
        );
        return Ok(());
    }
    match &args.command {
        Command::BackendList => print_table(
            &result,
            &[
                ("NAME", "name"),
                ("STATE", "state"),
                ("KIND", "kind"),
                ("CAPACITY", "capacity_bytes:bytes"),
                ("BLOCK", "block_size"),
                ("USED BY", "used_by"),
                ("DESCRIPTION", "description"),
                ("ERROR", "error"),
            ],
        ),
        Command::RbdClusterList => print_table(
            &result,
            &[
                ("NAME", "name"),
                ("STATE", "state"),
                ("CONF", "conf"),
                ("ID", "id"),
                ("CPUS", "cpus"),
                ("CLIENT", "client_address"),
                ("USED BY", "used_by"),
                ("ERROR", "error"),
            ],
        ),
        Command::VhostBlkList => print_table(
            &result,
            &[
                ("NAME", "name"),
                ("STATE", "state"),
                ("SOCKET", "socket"),
                ("BACKEND", "backend"),
                ("QUEUES", "queues"),
                ("RO", "readonly"),
                ("CONNECTED", "connected"),
                ("CONNECTIONS", "connections"),
                ("ERROR", "error"),
            ],
        ),
        Command::Stats => {
            print_table(
                &result["controllers"],
                &[
                    ("CONTROLLER", "name"),
                    ("CONNECTED", "connected"),
                    ("READS", "reads"),
                    ("WRITES", "writes"),
                    ("OTHERS", "others"),
                    ("READ", "read_bytes:bytes"),
                    ("WRITTEN", "written_bytes:bytes"),
                    ("ERRORS", "errors"),
                    ("IN FLIGHT", "in_flight"),
                    ("RECOVERED", "recovered"),
                ],
            );
            println!();
            print_table(
                &result["pollers"],
                &[
                    ("POLLER", "name"),
                    ("CPU", "cpu"),
                    ("QUEUES", "queues"),
                    ("BUSY S", "busy_seconds"),
                ],
            );
        }
        Command::Call { .. } => println!(
            "{}",
            serde_json::to_string_pretty(&result).expect("JSON values print")
        ),
        Command::ConfigSave => println!("saved to {}", result["path"].as_str().unwrap_or("?")),
        Command::Upgrade { .. } => println!(
            "handed over from pid {} to pid {} ({}): {} controller(s), {} connected, I/O paused {:.2} ms",
            result["old_pid"],
            result["new_pid"],
            result["binary"].as_str().unwrap_or("?"),
            result["controllers"],
            result["connections"],
            result["pause_ms"].as_f64().unwrap_or(f64::NAN)
        ),
        Command::NvmeAttach { .. } => println!("backends: {}", cell(&result["backends"])),
        Command::Version => println!(
            "{} {} (pid {}){}",
            result["program"].as_str().unwrap_or("?"),
            result["version"].as_str().unwrap_or("?"),
            result["pid"],
            if result["test_features"] == true {
                ", built with test-only fault injection"
            } else {
                ""
            }
        ),
        Command::LogGetLevel | Command::LogSetLevel { .. } => {
            println!("log filter: {}", cell(&result["level"]))
        }
        Command::BackendResize { .. } => {
            println!(
                "{}: {} -> {} bytes",
                result["name"].as_str().unwrap_or("?"),
                result["previous"],
                result["size"]
            );
            print_table(
                &result["controllers"],
                &[("CONTROLLER", "name"), ("FRONTEND TOLD", "told")],
            );
        }
        Command::VhostBlkSetReadonly { .. } => {
            println!("{}", result["effect"].as_str().unwrap_or("done"))
        }
        Command::BackendRetry => {
            println!("served now: {}", cell(&result["served"]));
            print_table(&result["failed"], &[("STILL FAILED", "what"), ("ERROR", "error")]);
        }
        _ => println!("done"),
    }
    Ok(())
}

fn absolute(source: std::io::Error) -> vfblk_bridge::Error {
    vfblk_bridge::Error::Io {
        what: "making a path absolute".into(),
        source,
    }
}

fn request(command: &Command) -> vfblk_bridge::Result<(&str, Value)> {
    Ok(match command {
        Command::BackendCreate { name, spec } => {
            // Relative paths are the operator's, from where they type.
            let spec = spec.clone().with_absolute_path().map_err(absolute)?;
            let mut p = serde_json::to_value(spec).expect("a backend spec serializes");
            p["name"] = json!(name);
            ("backend_create", p)
        }
        Command::BackendDelete { name } => ("backend_delete", json!({ "name": name })),
        Command::BackendResize { name, size } => {
            ("backend_resize", json!({ "name": name, "size": size }))
        }
        Command::VhostBlkSetReadonly { name, readonly } => (
            "vhost_blk_set_readonly",
            json!({ "name": name, "readonly": readonly }),
        ),
        Command::BackendList => ("backend_list", json!({})),
        Command::NvmeAttach { name, address } => (
            "nvme_attach",
            json!({"name": name, "address": address.to_string()}),
        ),
        Command::NvmeDetach { name } => ("nvme_detach", json!({ "name": name })),
        Command::RbdClusterRegister {
            name,
            conf,
            id,
            keyring,
            ms_async_op_threads,
            librados_thread_count,
            cpus,
        } => {
            let mut p = json!({ "name": name });
            for (key, path) in [("conf", conf), ("keyring", keyring)] {
                if let Some(path) = path {
                    p[key] = json!(std::path::absolute(path).map_err(absolute)?);
                }
            }
            if let Some(id) = id {
                p["id"] = json!(id);
            }
            if let Some(n) = ms_async_op_threads {
                p["ms_async_op_threads"] = json!(n);
            }
            if let Some(n) = librados_thread_count {
                p["librados_thread_count"] = json!(n);
            }
            if !cpus.is_empty() {
                p["cpus"] = json!(cpus);
            }
            ("rbd_cluster_register", p)
        }
        Command::RbdClusterUnregister { name } => {
            ("rbd_cluster_unregister", json!({ "name": name }))
        }
        Command::RbdClusterList => ("rbd_cluster_list", json!({})),
        Command::VhostBlkCreate {
            name,
            socket,
            backend,
            queues,
            cpus,
            readonly,
            serial,
            iops,
            bps,
            socket_access,
        } => {
            let socket = std::path::absolute(socket).map_err(absolute)?;
            let mut p = json!({
                "name": name, "socket": socket, "backend": backend, "queues": queues,
                "cpus": cpus, "readonly": readonly,
            });
            if let Some(s) = serial {
                p["serial"] = json!(s);
            }
            for (key, value) in [
                ("socket_owner", &socket_access.socket_owner),
                ("socket_group", &socket_access.socket_group),
                ("socket_mode", &socket_access.socket_mode),
            ] {
                if let Some(v) = value {
                    p[key] = json!(v);
                }
            }
            if iops.is_some() || bps.is_some() {
                p["limits"] = json!({});
                if let Some(n) = iops {
                    p["limits"]["iops"] = json!(n);
                }
                if let Some(n) = bps {
                    p["limits"]["bytes_per_second"] = json!(n);
                }
            }
            ("vhost_blk_create", p)
        }
        Command::VhostBlkDelete { name } => ("vhost_blk_delete", json!({ "name": name })),
        Command::VhostBlkList => ("vhost_blk_list", json!({})),
        Command::VhostBlkSetLimits { name, iops, bps } => {
            let mut limits = json!({});
            if let Some(n) = iops {
                limits["iops"] = json!(n);
            }
            if let Some(n) = bps {
                limits["bytes_per_second"] = json!(n);
            }
            (
                "vhost_blk_set_limits",
                json!({ "name": name, "limits": limits }),
            )
        }
        Command::Stats => ("stats", json!({})),
        Command::ConfigSave => ("config_save", json!({})),
        Command::BackendRetry => ("backend_retry", json!({})),
        Command::Upgrade { binary } => match binary {
            Some(b) => ("upgrade", json!({ "binary": b })),
            None => ("upgrade", json!({})),
        },
        Command::Version => ("version", json!({})),
        Command::LogGetLevel => ("log_get_level", json!({})),
        Command::LogSetLevel { level } => ("log_set_level", json!({ "level": level })),
        Command::Top { .. } => ("stats", json!({})),
        Command::Call { method, params } => (
            method.as_str(),
            serde_json::from_str(params).map_err(|e| {
                vfblk_bridge::Error::BadArgument(format!("params {params:?}: not JSON: {e}"))
            })?,
        ),
    })
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Bytes in IEC units: "512 B", "16.0 MiB", "1.50 TiB".
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value < 10.0 { 2 } else { 1 };
    format!("{value:.digits$} {}", UNITS[unit])
}

/// Rows of `rows` (an array of objects) under `columns` (header, key; a key ending in
/// `:bytes` is shown in IEC units).
fn print_table(rows: &Value, columns: &[(&str, &str)]) {
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    let show = |r: &Value, key: &str| match key.strip_suffix(":bytes") {
        Some(key) => r[key]
            .as_u64()
            .map(human_bytes)
            .unwrap_or_else(|| cell(&r[key])),
        None => cell(&r[key]),
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, k)| show(r, k)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |items: Vec<&str>| {
        let text: Vec<String> = items
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(columns.iter().map(|(h, _)| *h).collect());
    for r in &cells {
        line(r.iter().map(String::as_str).collect());
    }
    if cells.is_empty() {
        println!("(none)");
    }
}

/// `top`: samples `stats` every `interval` seconds and shows what changed in between.
fn top(args: &Args, interval: f64, count: Option<u64>) -> vfblk_bridge::Result<()> {
    if !(interval.is_finite() && interval >= 0.05) {
        return Err(vfblk_bridge::Error::BadArgument(format!(
            "--interval {interval}: at least 0.05 seconds"
        )));
    }
    let mut client = Client::connect(&args.socket)?;
    let mut before = client.call("stats", json!({}))?;
    let mut taken = std::time::Instant::now();
    let mut shown = 0u64;
    while count.is_none_or(|c| shown < c) {
        std::thread::sleep(std::time::Duration::from_secs_f64(interval));
        let now = client.call("stats", json!({}))?;
        let seconds = taken.elapsed().as_secs_f64();
        taken = std::time::Instant::now();
        let sample = top_sample(&before, &now, seconds);
        if args.json {
            println!("{sample}");
        } else {
            println!(
                "pid {}, {:.1} s sample",
                now["pid"],
                sample["seconds"].as_f64().unwrap_or(0.0)
            );
            print_table(
                &sample["controllers"],
                &[
                    ("CONTROLLER", "name"),
                    ("CONN", "connected"),
                    ("R IOPS", "read_iops"),
                    ("W IOPS", "write_iops"),
                    ("R MiB/s", "read_mib_s"),
                    ("W MiB/s", "write_mib_s"),
                    ("MEAN LAT us", "mean_latency_us"),
                    ("IN FLIGHT", "in_flight"),
                    ("RECOVERED", "recovered"),
                    ("ERRORS", "errors"),
                ],
            );
            print_table(
                &sample["pollers"],
                &[
                    ("POLLER", "name"),
                    ("QUEUES", "queues"),
                    ("BUSY %", "busy_percent"),
                ],
            );
            println!();
        }
        before = now;
        shown += 1;
    }
    Ok(())
}

/// The rates between two `stats` answers `seconds` apart. A counter that went down (a new
/// process after a restart) counts from zero.
fn top_sample(before: &Value, now: &Value, seconds: f64) -> Value {
    let delta = |b: &Value, n: &Value, key: &str| {
        let (b, n) = (
            b[key].as_f64().unwrap_or(0.0),
            n[key].as_f64().unwrap_or(0.0),
        );
        if n >= b {
            n - b
        } else {
            n
        }
    };
    let by_name = |v: &Value, name: &Value| {
        v.as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == *name).cloned())
            .unwrap_or(Value::Null)
    };
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let controllers: Vec<Value> = now["controllers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let b = by_name(&before["controllers"], &c["name"]);
            let requests = delta(&b, c, "reads") + delta(&b, c, "writes") + delta(&b, c, "others");
            let latency = delta(&b, c, "latency_sum_seconds");
            json!({
                "name": c["name"],
                "connected": c["connected"],
                "read_iops": round(delta(&b, c, "reads") / seconds),
                "write_iops": round(delta(&b, c, "writes") / seconds),
                "read_mib_s": round(delta(&b, c, "read_bytes") / seconds / 1048576.0),
                "write_mib_s": round(delta(&b, c, "written_bytes") / seconds / 1048576.0),
                "mean_latency_us": if requests > 0.0 { Some(round(latency / requests * 1e6)) } else { None },
                "in_flight": c["in_flight"],
                "recovered": c["recovered"],
                "errors": c["errors"],
            })
        })
        .collect();
    let pollers: Vec<Value> = now["pollers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let b = by_name(&before["pollers"], &p["name"]);
            json!({
                "name": p["name"],
                "queues": p["queues"],
                "busy_percent": round(delta(&b, p, "busy_seconds") / seconds * 100.0),
            })
        })
        .collect();
    json!({ "seconds": seconds, "pid": now["pid"], "controllers": controllers, "pollers": pollers })
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    vfblk_bridge::spec::parse_size(s).map_err(|e| e.to_string())
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{s:?}: on or off")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_a_person_would() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
        assert_eq!(human_bytes(100 << 30), "100.0 GiB");
        assert_eq!(human_bytes(3 << 39), "1.50 TiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_bytes(1536), "1.50 KiB");
    }

    #[test]
    fn top_shows_rates_between_samples_and_counts_a_restart_from_zero() {
        let before = json!({"pid": 1, "controllers": [{"name": "a", "connected": true,
            "reads": 100, "writes": 10, "others": 0, "read_bytes": 409600, "written_bytes": 0,
            "latency_sum_seconds": 0.5, "in_flight": 0, "recovered": 0, "errors": 0}],
            "pollers": [{"name": "p0", "queues": 1, "busy_seconds": 1.0}]});
        let now = json!({"pid": 1, "controllers": [{"name": "a", "connected": true,
            "reads": 300, "writes": 10, "others": 0, "read_bytes": 2506752, "written_bytes": 0,
            "latency_sum_seconds": 0.502, "in_flight": 3, "recovered": 0, "errors": 0}],
            "pollers": [{"name": "p0", "queues": 1, "busy_seconds": 1.5}]});
        let s = top_sample(&before, &now, 2.0);
        let c = &s["controllers"][0];
        assert_eq!(c["read_iops"], 100.0);
        assert_eq!(c["write_iops"], 0.0);
        assert_eq!(c["read_mib_s"], 1.0);
        assert_eq!(c["mean_latency_us"], 10.0);
        assert_eq!(s["pollers"][0]["busy_percent"], 25.0);
        // A new process: its counters start again below the old ones.
        let restarted = json!({"pid": 2, "controllers": [{"name": "a", "reads": 50}],
            "pollers": []});
        let s = top_sample(&now, &restarted, 1.0);
        assert_eq!(s["controllers"][0]["read_iops"], 50.0);
        // No request in between: no mean latency to show.
        let s = top_sample(&now, &now, 1.0);
        assert_eq!(s["controllers"][0]["mean_latency_us"], Value::Null);
    }
}
