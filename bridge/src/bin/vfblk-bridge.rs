//! `vfblk-bridge`: serve a block backend to VMs as vhost-user-blk on a unix socket, with
//! inflight tracking so a restarted bridge picks up where a killed one stopped.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vfblk_bridge::spec::BackendSpec;
use vfblk_bridge::target::{self, LogFormat, TargetOptions};

/// Serve a block backend to VMs as vhost-user-blk.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "\
backends (SPEC):
  mem:PATH:SIZE         RAM disk in a shared-memory file (e.g. /dev/shm/disk0), SIZE in bytes
                        or with K/M/G; its data outlive the process
  file:PATH[:SIZE]      a file (created/grown to SIZE) or a block device, through io_uring
  nvme:PCI_ADDR[:NSID]  an NVMe controller bound to vfio-pci, through our userspace driver;
                        guest RAM is mapped for DMA at IOVA = guest-physical address"
)]
struct Args {
    /// vhost-user socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// The backend (see below).
    #[arg(long, value_name = "SPEC")]
    backend: BackendSpec,
    /// Virtqueues offered.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    queues: u16,
    /// Poller threads pinned to these CPUs, e.g. 0,1 (default: one, unpinned); queue i runs
    /// on poller i % count.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Never sleep when idle (default: sleep on kicks after ~1 ms idle).
    #[arg(long)]
    poll: bool,
    /// Do not offer INFLIGHT_SHMFD (to show what recovery loses without it).
    #[arg(long)]
    no_inflight: bool,
    /// GET_ID answer (at most 20 bytes).
    #[arg(long, default_value = "vfblk", value_parser = serial)]
    serial: String,
    /// Hold every completion up to N ms and release them shuffled (tests only).
    #[cfg(feature = "test-delay")]
    #[arg(long, value_name = "N")]
    test_delay_ms: Option<u64>,
    /// NVMe backend: a command outstanding this long is lost; the controller is reset and
    /// every command in flight is sent again.
    #[arg(long, value_name = "MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..))]
    nvme_timeout_ms: u64,
    /// NVMe backend: never use SGLs, as on a controller without them (scatter lists PRPs
    /// cannot describe go through bounce buffers).
    #[arg(long)]
    nvme_no_sgl: bool,
    /// NVMe backend fault injection: each queue pair loses the completion that arrives after
    /// N others (tests only).
    #[cfg(feature = "test-delay")]
    #[arg(long, value_name = "N")]
    test_lose_nvme_completion: Option<u64>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

fn serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!("{} bytes; a serial holds at most 20", s.len()));
    }
    Ok(s.to_string())
}

fn main() -> ExitCode {
    // Before any poller thread exists, so only the server's signal thread sees SIGTERM.
    vfblk_vhost::server::block_signals();
    let args = Args::parse();
    target::init_logging(args.log_format);
    #[cfg(feature = "test-delay")]
    let test_delay = args.test_delay_ms.map(Duration::from_millis);
    #[cfg(not(feature = "test-delay"))]
    let test_delay: Option<Duration> = None;
    #[cfg(feature = "test-delay")]
    let lose_completion_after = args.test_lose_nvme_completion;
    #[cfg(not(feature = "test-delay"))]
    let lose_completion_after = None;
    let options = TargetOptions {
        socket: args.socket,
        backend: args.backend,
        queues: args.queues,
        cpus: args.cpus,
        poll: args.poll,
        inflight: !args.no_inflight,
        serial: args.serial,
        test_delay,
        nvme: vfblk_bridge::backend::NvmeOptions {
            command_timeout: Duration::from_millis(args.nvme_timeout_ms),
            lose_completion_after,
            use_sgl: !args.nvme_no_sgl,
        },
    };
    match target::run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", vfblk_vhost::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
