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
    /// Create a backend: NAME and mem:PATH:SIZE, file:PATH[:SIZE] or nvme:PCI_ADDR[:NSID].
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
                ("CAPACITY", "capacity_bytes"),
                ("BLOCK", "block_size"),
                ("USED BY", "used_by"),
                ("DESCRIPTION", "description"),
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
                    ("READ BYTES", "read_bytes"),
                    ("WRITTEN BYTES", "written_bytes"),
                    ("ERRORS", "errors"),
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
        Command::BackendList => ("backend_list", json!({})),
        Command::NvmeAttach { name, address } => (
            "nvme_attach",
            json!({"name": name, "address": address.to_string()}),
        ),
        Command::NvmeDetach { name } => ("nvme_detach", json!({ "name": name })),
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
        Command::Stats => ("stats", json!({})),
        Command::ConfigSave => ("config_save", json!({})),
        Command::BackendRetry => ("backend_retry", json!({})),
        Command::Upgrade { binary } => match binary {
            Some(b) => ("upgrade", json!({ "binary": b })),
            None => ("upgrade", json!({})),
        },
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

/// Rows of `rows` (an array of objects) under `columns` (header, key).
fn print_table(rows: &Value, columns: &[(&str, &str)]) {
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, k)| cell(&r[*k])).collect())
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
