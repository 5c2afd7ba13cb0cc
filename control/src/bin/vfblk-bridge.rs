//! `vfblk-bridge`: the vhost-user-blk target. Serves block backends to VMs on unix sockets,
//! with inflight tracking so a restarted target picks up where a killed one stopped. One
//! controller from the command line (`--socket` + `--backend`), or any number from a config
//! file and JSON-RPC (`--config`, `--rpc`; managed with `vfblk-rpc`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vfblk_bridge::spec::BackendSpec;
use vfblk_control::metrics::MetricsAddress;
use vfblk_control::rpc::DEFAULT_SOCKET;
use vfblk_control::{LogFormat, TargetOptions, TargetSettings, MAX_QUEUES};

/// Serve block backends to VMs as vhost-user-blk.
#[derive(Parser, Debug)]
#[command(
    name = "vfblk-bridge",
    version,
    after_help = "\
backends (SPEC):
  mem:PATH:SIZE         RAM disk in a shared-memory file (e.g. /dev/shm/disk0), SIZE in bytes
                        or with K/M/G; its data outlive the process
  file:PATH[:SIZE]      a file (created/grown to SIZE) or a block device, through io_uring
  null:SIZE             stores nothing: every request succeeds at once (benchmarks only)
  nvme:PCI_ADDR[:NSID]  an NVMe controller bound to vfio-pci, through our userspace driver;
                        guest RAM is mapped for DMA at IOVA = guest-physical address

Many controllers: --config FILE (JSON; created if missing, rewritten after every change)
and --rpc [PATH] (default /run/vfblk/rpc.sock), then vfblk-rpc. See docs/operation.md."
)]
struct Args {
    /// vhost-user socket of the one controller to serve.
    #[arg(long, requires = "backend", conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// The one controller's backend (see below).
    #[arg(long, value_name = "SPEC", requires = "socket")]
    backend: Option<BackendSpec>,
    /// The one controller's virtqueues.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    queues: u16,
    /// The one controller's GET_ID answer (at most 20 bytes).
    #[arg(long, default_value = "vfblk", value_parser = serial)]
    serial: String,
    /// Offer the one controller's disk read-only.
    #[arg(long)]
    readonly: bool,
    /// Owner, group and mode of every controller socket that does not set its own.
    #[command(flatten)]
    socket_access: vfblk_control::SocketAccess,
    /// Write the serving process's pid here (kept true across upgrades; removed at a clean
    /// exit), for supervisors other than systemd and vfblk-keeper.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Backends and controllers to serve, saved again after every RPC change.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve JSON-RPC on this unix socket (mode 0600).
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = DEFAULT_SOCKET)]
    rpc: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9560) or on a unix
    /// socket (unix:PATH).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<MetricsAddress>,
    /// Poller threads pinned to these CPUs, e.g. 0,1 (default: unpinned, see --pollers);
    /// each queue runs on the least loaded poller.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Unpinned poller threads, when --cpus is not given.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pollers: u16,
    /// Never sleep when idle (default: sleep on kicks after ~1 ms idle).
    #[arg(long)]
    poll: bool,
    /// Do not offer INFLIGHT_SHMFD (to show what recovery loses without it).
    #[arg(long)]
    no_inflight: bool,
    /// Hold every completion up to N ms and release them shuffled (tests only).
    #[cfg(feature = "test-delay")]
    #[arg(long, value_name = "N")]
    test_delay_ms: Option<u64>,
    /// NVMe backend: a command outstanding this long is lost; the controller is reset and
    /// every command in flight is sent again.
    #[arg(long, value_name = "MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..))]
    nvme_timeout_ms: u64,
    /// NVMe backends: I/O queue pairs asked of the controller (default: --queues with
    /// --socket, else 16); each poller serving it takes one.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    nvme_io_queues: Option<u16>,
    /// NVMe backend: never use SGLs, as on a controller without them (scatter lists PRPs
    /// cannot describe go through bounce buffers).
    #[arg(long)]
    nvme_no_sgl: bool,
    /// NVMe backend fault injection: each queue pair loses the completion that arrives after
    /// N others (tests only).
    #[cfg(feature = "test-delay")]
    #[arg(long, value_name = "N")]
    test_lose_nvme_completion: Option<u64>,
    /// NVMe backend fault injection: each queue pair stops reading completions after N
    /// (its commands stay in flight; tests only).
    #[cfg(feature = "test-delay")]
    #[arg(long, value_name = "N")]
    test_hold_nvme_completions: Option<u64>,
    /// Take a migration's dirty log and never mark the data written into guest buffers in
    /// it (rings and status bytes are marked), to show the corruption that follows (tests
    /// only).
    #[cfg(feature = "test-delay")]
    #[arg(long)]
    test_skip_dirty_log: bool,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// Keep every connection's fds and state in the fd store at $NOTIFY_SOCKET (systemd with
    /// FileDescriptorStoreMax=, or vfblk-keeper), so that after a crash the next process
    /// resumes them without the frontends reconnecting.
    #[arg(long, env = "VFBLK_FD_STORE", value_parser = clap::builder::FalseyValueParser::new())]
    fd_store: bool,
    /// Take over from the process at the other end of this fd (set by an upgrade, not by
    /// hand): its controllers, connections and listeners, without any frontend noticing.
    #[arg(long, value_name = "FD", hide = true)]
    takeover_fd: Option<i32>,
}

fn serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!("{} bytes; a serial holds at most 20", s.len()));
    }
    Ok(s.to_string())
}

fn main() -> ExitCode {
    // Before any thread exists, so that only the main thread's wait sees SIGTERM.
    vfblk_vhost::signals::block_signals();
    let args = Args::parse();
    // Before any thread exists: taking them clears LISTEN_FDS from the environment.
    let stored = if args.fd_store {
        vfblk_vhost::fd_store::StoredFds::from_env()
    } else {
        Default::default()
    };
    vfblk_control::init_logging(args.log_format);
    #[cfg(feature = "test-delay")]
    let test_delay = args.test_delay_ms.map(Duration::from_millis);
    #[cfg(not(feature = "test-delay"))]
    let test_delay: Option<Duration> = None;
    #[cfg(feature = "test-delay")]
    let lose_completion_after = args.test_lose_nvme_completion;
    #[cfg(not(feature = "test-delay"))]
    let lose_completion_after = None;
    #[cfg(feature = "test-delay")]
    let hold_completions_after = args.test_hold_nvme_completions;
    #[cfg(not(feature = "test-delay"))]
    let hold_completions_after = None;
    let settings = TargetSettings {
        cpus: args.cpus,
        pollers: usize::from(args.pollers),
        poll: args.poll,
        inflight: !args.no_inflight,
        nvme: vfblk_bridge::backend::NvmeOptions {
            command_timeout: Duration::from_millis(args.nvme_timeout_ms),
            lose_completion_after,
            hold_completions_after,
            use_sgl: !args.nvme_no_sgl,
        },
        test_delay,
        #[cfg(feature = "test-delay")]
        test_skip_dirty_log: args.test_skip_dirty_log,
        #[cfg(not(feature = "test-delay"))]
        test_skip_dirty_log: false,
        config_file: args.config.clone(),
        fd_store: args.fd_store,
        pid_file: args.pid_file.map(|p| std::path::absolute(&p).unwrap_or(p)),
        socket_access: args.socket_access,
        nvme_io_queues: args.nvme_io_queues.unwrap_or(if args.socket.is_some() {
            args.queues
        } else {
            vfblk_control::NVME_IO_QUEUES
        }),
    };
    let one = match (args.socket, args.backend) {
        (Some(socket), Some(backend)) => Some(TargetOptions {
            socket,
            backend,
            queues: args.queues,
            serial: args.serial,
            readonly: args.readonly,
        }),
        _ => None,
    };
    if one.is_none() && args.config.is_none() && args.rpc.is_none() && args.takeover_fd.is_none() {
        tracing::error!("nothing to serve: give --socket and --backend, --config, or --rpc");
        return ExitCode::from(2);
    }
    match vfblk_control::daemon::run(vfblk_control::daemon::RunOptions {
        settings,
        one,
        config: args.config,
        rpc: args.rpc,
        metrics: args.metrics,
        takeover_fd: args.takeover_fd,
        stored,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", vfblk_vhost::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
