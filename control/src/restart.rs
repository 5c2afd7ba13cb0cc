//! Starting again after a crash from what the fd store kept (`LISTEN_FDS`): each controller
//! gets its listening socket back, and a connection whose record is whole is resumed as it
//! was, its queues recovered from the inflight region; the frontend sees no disconnect. A
//! connection whose record was left in the middle of a message, or that ran without an
//! inflight region, is closed instead, so the frontend reconnects as it would have without
//! the store. Whatever the store held that no controller claims is dropped from it.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use vfblk_vhost::fd_store::{ConnectionRecord, DeviceStore, Found, StoredFds};
use vfblk_vhost::handover::{Fds, ServerState, StoredConnectionState};
use vfblk_vhost::server::SocketServer;

use crate::{Error, Result};
use crate::{Target, TargetConfig};

impl Target {
    /// Serves `config`, taking back what `stored` holds. Like [`Target::apply`], returns
    /// what could not be served.
    pub fn apply_after_crash(
        &mut self,
        config: TargetConfig,
        mut stored: StoredFds,
    ) -> Vec<(String, Error)> {
        let mut failures = Vec::new();
        let started_from_store = !stored.names().is_empty();
        // Before anything opens them: NVMe controllers the dead process drove are taken over
        // as it left them.
        self.nvme.take_stored(&mut stored);
        let TargetConfig {
            nvme,
            rbd_clusters,
            backends,
            controllers,
        } = config;
        let rest = TargetConfig {
            nvme,
            rbd_clusters,
            backends,
            controllers: Vec::new(),
        };
        failures.extend(self.apply(rest));
        let mut resumed = 0;
        for c in controllers {
            let name = c.name.clone();
            let configured = c.clone();
            match self.restart_controller(c, &mut stored) {
                Ok(true) => resumed += 1,
                Ok(false) => {}
                Err(e) => {
                    self.unserved_controller(configured, &e);
                    failures.push((
                        crate::unserved::label(crate::Section::Controllers, &name),
                        e,
                    ));
                }
            }
        }
        self.nvme.drop_unclaimed();
        // The resumed connections took their guest RAM mappings over; the rest goes.
        self.nvme.lender_gone();
        // Left over: fds of connections that ended while their successor's names were
        // being stored, or of controllers gone from the configuration.
        let leftover = stored.names();
        if let Some(store) = &self.store {
            for name in &leftover {
                if let Err(e) = store.remove(name) {
                    tracing::warn!("fd store: {}", vfblk_vhost::error_chain(&e));
                }
            }
        }
        // A first start (no store, or nothing in it) is no start again.
        if started_from_store {
            tracing::info!(
                "started again from the fd store: {resumed} connection(s) resumed without reconnect, {} stale fd(s) dropped",
                leftover.len()
            );
        }
        failures
    }

    /// One controller: its stored listener and connection if there are any, else a fresh
    /// socket. Returns whether a connection was resumed.
    fn restart_controller(
        &mut self,
        config: crate::ControllerConfig,
        stored: &mut StoredFds,
    ) -> Result<bool> {
        let (device, device_config) = self.controller_device(&config)?;
        let kept = device_config
            .fd_store
            .clone()
            .and_then(|k| stored.take(&k.listener_name()).map(|l| (k, l)));
        let Some((keeping, listener)) = kept else {
            // Nothing stored for it: a fresh socket.
            let server = SocketServer::start(&config.socket, device_config)?;
            let server = self.give_socket_access(&config, server)?;
            self.add_controller(config, device, server);
            return Ok(false);
        };
        let mut fds = Fds::default();
        let listener = fds.push(listener);
        let (connection, kept) = match resumable(&keeping, stored, &mut fds) {
            Ok(Some((connection, kept))) => (Some(connection), Some(kept)),
            Ok(None) => (None, None),
            Err(why) => {
                tracing::warn!(
                    controller = %config.name,
                    "the connection of {} cannot be resumed ({why}); closing it, the frontend will reconnect",
                    config.name
                );
                close_stored(&keeping, stored);
                (None, None)
            }
        };
        let resumed = connection.is_some();
        let state = ServerState {
            listener,
            connection,
            kept,
        };
        let server =
            SocketServer::take_over(&config.socket, device_config, &state, &mut fds)?.serve()?;
        self.add_controller(config, device, server);
        Ok(resumed)
    }
}

/// The stored connection of `keeping`'s device, if there is one that can be resumed; its
/// fds are moved into `fds`. `Err` says why one that exists cannot be.
fn resumable(
    keeping: &DeviceStore,
    stored: &mut StoredFds,
    fds: &mut Fds,
) -> std::result::Result<
    Option<(
        vfblk_vhost::handover::ConnectionState,
        StoredConnectionState,
    )>,
    String,
> {
    let Some(record_fd) = stored.take(&keeping.record_name()) else {
        return Ok(None);
    };
    let record = ConnectionRecord::open(record_fd.try_clone().map_err(|e| e.to_string())?)
        .map_err(|e| vfblk_vhost::error_chain(&e))?;
    let kept = match record.read() {
        Found::Whole(k) => k,
        Found::MidMessage => return Err("the process died while handling a message".into()),
        Found::Empty => return Err("its record was never written".into()),
    };
    if kept.state.runs_without_inflight() {
        return Err("its rings ran without an inflight region".into());
    }
    let present = stored.names();
    if let Some(missing) = kept.names.iter().find(|n| !present.contains(n)) {
        return Err(format!("fd {missing} is not in the store"));
    }
    let base = fds.len() as u32;
    // A name may stand for several fds (one open file description, stored once).
    let mut taken: BTreeMap<&str, OwnedFd> = BTreeMap::new();
    for name in &kept.names {
        let fd = match taken.get(name.as_str()) {
            Some(fd) => fd
                .try_clone()
                .map_err(|e| format!("duplicating {name}: {e}"))?,
            None => {
                let fd = stored
                    .take(name)
                    .ok_or_else(|| format!("fd {name} is not in the store"))?;
                let copy = fd
                    .try_clone()
                    .map_err(|e| format!("duplicating {name}: {e}"))?;
                taken.insert(name, copy);
                fd
            }
        };
        fds.push(fd);
    }
    let record_index = fds.push(record_fd);
    let mut state = kept.state.clone();
    state.offset_fds(base);
    Ok(Some((
        state,
        StoredConnectionState {
            record: record_index,
            version: kept.version,
            names: kept.names.clone(),
        },
    )))
}

/// Closes a stored connection for good: our copies go with `stored`, the store's here.
fn close_stored(keeping: &DeviceStore, stored: &mut StoredFds) {
    for name in [keeping.socket_name(), keeping.record_name()] {
        drop(stored.take(&name));
        if let Err(e) = keeping.store.remove(&name) {
            tracing::warn!("fd store: {}", vfblk_vhost::error_chain(&e));
        }
    }
}
