//! What the `vfblk-bridge` binary runs once its command line is read: a target taken over
//! from a predecessor, started again from the fd store, or started from its config file or
//! the one controller of the command line; then the RPC and metrics servers, the readiness
//! notice, and signals (SIGHUP reloads, SIGTERM and SIGINT drain and end) until the end.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::handover::{InheritedListeners, ListenerKind};
use crate::metrics::{MetricsAddress, MetricsServer};
use crate::rpc::RpcServer;
use crate::{Result, Target, TargetConfig, TargetOptions, TargetSettings};

/// What to run.
pub struct RunOptions {
    /// Process-wide settings.
    pub settings: TargetSettings,
    /// The one controller of the command line (then no config file).
    pub one: Option<TargetOptions>,
    /// The config file.
    pub config: Option<PathBuf>,
    /// The RPC socket.
    pub rpc: Option<PathBuf>,
    /// The metrics endpoint.
    pub metrics: Option<MetricsAddress>,
    /// The hand-over channel from a predecessor (an upgrade).
    pub takeover_fd: Option<i32>,
    /// What the fd store gave back (a start after a crash).
    pub stored: vfblk_vhost::fd_store::StoredFds,
}

/// Runs the target until a termination signal (or a hand-over to a successor).
pub fn run(options: RunOptions) -> Result<()> {
    let RunOptions {
        settings,
        one,
        config,
        rpc,
        metrics,
        takeover_fd,
        mut stored,
    } = options;
    let pid_file = settings.pid_file.clone();
    let mut target = Target::new(settings)?;
    let inherited = match takeover_fd {
        // Everything comes from the predecessor, whatever the command line says.
        Some(fd) => Some(crate::handover::take_over(&mut target, fd)?),
        None => None,
    };
    // Listeners a crashed predecessor left in the fd store.
    let from_store = InheritedListeners {
        rpc: stored.take(ListenerKind::Rpc.stored_name()),
        metrics: stored.take(ListenerKind::Metrics.stored_name()),
    };
    if inherited.is_none() {
        // Started again after a crash: the predecessor that recorded these is dead.
        crate::dead_predecessor_rbd_clients(&mut stored);
        if let Some(one) = &one {
            // The one controller of the command line: failing to serve it is failing.
            if let Some((what, e)) = target
                .apply_after_crash(one.config()?, stored)
                .into_iter()
                .next()
            {
                return Err(crate::Error::BadArgument(format!(
                    "{what}: {}",
                    vfblk_vhost::error_chain(&e)
                )));
            }
        } else {
            let loaded = match &config {
                Some(path) => {
                    // Its directory must exist for the first change to be saved (e.g.
                    // /etc/vfblk).
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).map_err(|source| crate::Error::Io {
                            what: format!("creating {}", dir.display()),
                            source,
                        })?;
                    }
                    let loaded = TargetConfig::load(path)?;
                    tracing::info!(
                        "{}: {} backend(s), {} controller(s)",
                        path.display(),
                        loaded.backends.len(),
                        loaded.controllers.len()
                    );
                    loaded
                }
                None => TargetConfig::default(),
            };
            // Everything that can be served is; what cannot is logged and stays in the file.
            // Stored connections of controllers no longer configured are closed.
            // Each failure was logged with its cause where it happened.
            let failures = target.apply_after_crash(loaded, stored);
            if !failures.is_empty() {
                let what: Vec<String> = failures.into_iter().map(|(what, _)| what).collect();
                tracing::error!(
                    "not served: {} (kept in the configuration and listed as failed; backend_retry tries again)",
                    what.join(", ")
                );
            }
            // A missing file is created now, as the operator's starting point; one that
            // says what is configured already is left as it is.
            if let Err(e) = target.save() {
                tracing::warn!("{}", vfblk_vhost::error_chain(&e));
            }
        }
    }
    let target = Arc::new(Mutex::new(target));
    let mut inherited = inherited.unwrap_or(from_store);
    // Before the RPC socket answers: whoever reaches this process over it finds the pid
    // file naming it (a supervisor reading it after `vfblk-rpc`, a test).
    if let Some(path) = &pid_file {
        crate::write_pid_file(path)?;
    }
    let servers = (|| {
        let rpc_server = rpc
            .map(|path| match inherited.rpc.take() {
                Some(fd) => RpcServer::start_inherited(&path, fd, target.clone()),
                None => RpcServer::start(&path, target.clone()),
            })
            .transpose()?;
        let metrics_server = metrics
            .map(|address| match inherited.metrics.take() {
                Some(fd) => MetricsServer::start_inherited(&address, target.clone(), fd),
                None => MetricsServer::start(&address, target.clone()),
            })
            .transpose()?;
        Ok::<_, crate::Error>((rpc_server, metrics_server))
    })();
    let (rpc_server, metrics_server) = match servers {
        Ok(servers) => servers,
        Err(e) => {
            // Not started: the pid file must not name a process about to exit.
            if let Some(path) = &pid_file {
                crate::remove_pid_file(path);
            }
            return Err(e);
        }
    };
    crate::notify_ready();
    let status = |target: &Arc<Mutex<Target>>| {
        let line = target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status_line();
        crate::notify(&format!("STATUS={line}"));
    };
    status(&target);
    if let Some(period) = crate::watchdog::period() {
        let pollers = target.lock().unwrap_or_else(|e| e.into_inner()).pollers();
        crate::watchdog::start(period, pollers);
    }
    let sig = loop {
        match vfblk_vhost::signals::wait_for_signal() {
            libc::SIGHUP => {
                // Reload: what the config file adds is served, what failed is tried again.
                let reloaded = target.lock().unwrap_or_else(|e| e.into_inner()).reload();
                if let Err(e) = reloaded {
                    tracing::error!("SIGHUP: {}", vfblk_vhost::error_chain(&e));
                }
                status(&target);
            }
            sig => break sig,
        }
    };
    if target
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .handed_over()
    {
        // Sockets, socket files and memory belong to the successor: leave without
        // closing or removing anything, but for the RBD images, whose exclusive locks the
        // successor needs now rather than after Ceph's watch timeout.
        vfblk_bridge::backend::rbd::close_for_successor();
        std::process::exit(0);
    }
    tracing::info!("signal {sig}: completing requests in flight, then exiting");
    crate::notify("STOPPING=1\nSTATUS=completing requests in flight, then exiting");
    drop(rpc_server);
    drop(metrics_server);
    target
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .shutdown(true);
    if let Some(path) = &pid_file {
        crate::remove_pid_file(path);
    }
    Ok(())
}
