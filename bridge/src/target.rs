//! The target the `vfblk-bridge` binary runs: open the backend, start the pollers, and serve
//! the virtio-blk device on a vhost-user socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vfblk_vhost::guest_errors::GuestErrors;
use vfblk_vhost::protocol::DeviceConfig;
use vfblk_vhost::worker::{PollMode, Worker};

use crate::device::BlkDevice;
use crate::spec::BackendSpec;
use crate::{Error, Result};

/// Empty poll loops (about 1 ms) before an idle poller sleeps on kicks.
pub const IDLE_LOOPS_BEFORE_SLEEP: u32 = 20_000;

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// The vhost-user socket to listen on.
    pub socket: PathBuf,
    /// The backend.
    pub backend: BackendSpec,
    /// Virtqueues offered.
    pub queues: u16,
    /// Poller threads pinned to these CPUs (empty: one unpinned poller).
    pub cpus: Vec<usize>,
    /// Never sleep when idle.
    pub poll: bool,
    /// Offer INFLIGHT_SHMFD.
    pub inflight: bool,
    /// GET_ID answer.
    pub serial: String,
    /// Hold completions this long and release them shuffled (tests only; needs the
    /// `test-delay` feature).
    pub test_delay: Option<Duration>,
    /// How the NVMe backend watches its commands.
    pub nvme: crate::backend::NvmeOptions,
}

/// Serves until a signal ends the process.
pub fn run(o: TargetOptions) -> Result<()> {
    if o.queues == 0 {
        return Err(Error::BadArgument("at least one queue is needed".into()));
    }
    #[allow(unused_mut)]
    let mut backend = o.backend.open(o.queues, &o.nvme)?;
    if let Some(delay) = o.test_delay {
        #[cfg(feature = "test-delay")]
        {
            backend = Arc::new(crate::backend::DelayBackend::new(backend, delay));
        }
        #[cfg(not(feature = "test-delay"))]
        return Err(Error::BadArgument(format!(
            "a test delay of {delay:?} needs a build with the test-delay feature"
        )));
    }
    let mode = PollMode {
        idle_loops_before_sleep: if o.poll {
            None
        } else {
            Some(IDLE_LOOPS_BEFORE_SLEEP)
        },
    };
    let pollers: Vec<Option<usize>> = if o.cpus.is_empty() {
        vec![None]
    } else {
        o.cpus.iter().map(|&c| Some(c)).collect()
    };
    let workers = pollers
        .iter()
        .enumerate()
        .map(|(i, &cpu)| Worker::spawn(format!("vfblk-poller{i}"), cpu, mode))
        .collect::<vfblk_vhost::Result<Vec<_>>>()?;
    let description = backend.info().description.clone();
    let config = Arc::new(DeviceConfig {
        num_queues: o.queues,
        inflight: o.inflight,
        device: Arc::new(BlkDevice::new(backend, o.queues, &o.serial)),
        workers,
        errors: Arc::new(GuestErrors::new(o.socket.display().to_string())),
    });
    vfblk_vhost::server::serve(&o.socket, config, || {
        tracing::info!(
            "serving {description} on {} ({} queue(s), {} poller(s), inflight tracking {})",
            o.socket.display(),
            o.queues,
            pollers.len(),
            if o.inflight { "on" } else { "OFF" }
        );
    })?;
    Ok(())
}

/// Log output a binary chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(Error::BadArgument(format!(
                "log format {s:?}: text or json"
            ))),
        }
    }
}

/// Sends `tracing` events to stderr in `format`; `RUST_LOG` filters (default: info).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour only for a person at a terminal: logs go to files and journals too.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
