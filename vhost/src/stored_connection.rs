//! One connection kept in an fd store ([`crate::keep`]) while this process serves it: the
//! record of its protocol state rewritten after every message, its fds stored whenever they
//! change. Apart from `keep`, which the protocol's settings use, because it reads the
//! protocol's [`Connection`].

use std::os::fd::AsFd;

use crate::fd_store::{ConnectionRecord, DeviceStore, RecordedState};
use crate::handover::{Fds, StoredConnectionState};
use crate::protocol::Connection;
use crate::Result;

/// One connection kept in a store: its record rewritten after every message, its fds
/// stored under fresh names whenever they change.
pub struct StoredConnection {
    device_store: DeviceStore,
    record: ConnectionRecord,
    version: u64,
    names: Vec<String>,
    signature: Vec<i32>,
    /// A store operation failed: the record says "unknown" and nothing more is done.
    broken: bool,
}

impl StoredConnection {
    /// A new connection: its record and socket go to the store.
    pub fn start(device_store: &DeviceStore, socket: &impl AsFd) -> Result<StoredConnection> {
        let record = ConnectionRecord::create()?;
        let store = &device_store.store;
        // Left over from a connection of a process that died uncleanly, if any.
        store.remove(&device_store.socket_name())?;
        store.remove(&device_store.record_name())?;
        store.store(&device_store.record_name(), record.file())?;
        store.store(&device_store.socket_name(), socket)?;
        Ok(StoredConnection {
            device_store: device_store.clone(),
            record,
            version: 0,
            names: Vec::new(),
            signature: Vec::new(),
            broken: false,
        })
    }

    /// A connection taken over or resumed: its record and stored names go on being used.
    /// `connection` is the state as this process holds it now.
    pub fn resume(
        device_store: &DeviceStore,
        record: ConnectionRecord,
        version: u64,
        names: Vec<String>,
        connection: &Connection,
    ) -> StoredConnection {
        StoredConnection {
            device_store: device_store.clone(),
            record,
            version,
            names,
            signature: connection.fd_signature(),
            broken: false,
        }
    }

    /// A message is about to be handled.
    pub fn begin(&self) {
        if !self.broken {
            self.record.begin();
        }
    }

    /// The message was handled: the state after it goes to the record (and new fds to the
    /// store). A failure leaves the record marked unusable and storing stops.
    pub fn commit(&mut self, connection: &Connection, socket: &impl AsFd) {
        if self.broken {
            return;
        }
        if let Err(e) = self.try_commit(connection, socket) {
            tracing::error!(
                "{}: the connection can no longer be kept for a restart without reconnect: {}",
                self.device_store.name,
                crate::error_chain(&e)
            );
            self.record.begin();
            self.broken = true;
        }
    }

    fn try_commit(&mut self, connection: &Connection, socket: &impl AsFd) -> Result<()> {
        let mut fds = Fds::default();
        let state = connection.snapshot(socket, &mut fds)?;
        let signature = connection.fd_signature();
        let store = &self.device_store.store;
        let changed = signature != self.signature || self.names.len() != fds.len();
        let names: Vec<String> = if changed {
            let version = self.version + 1;
            let names: Vec<String> = (0..fds.len() as u32)
                .map(|i| {
                    if i == state.socket {
                        self.device_store.socket_name()
                    } else {
                        format!("{}/{version}/{i}", self.device_store.name)
                    }
                })
                .collect();
            for (i, name) in names.iter().enumerate() {
                if i as u32 != state.socket {
                    store.store(name, &fds.take(i as u32)?)?;
                }
            }
            self.version = version;
            names
        } else {
            self.names.clone()
        };
        self.record.commit(&RecordedState {
            names: names.clone(),
            version: self.version,
            state,
        })?;
        if changed {
            for old in self.names.iter().filter(|n| !names.contains(n)) {
                store.remove(old)?;
            }
        }
        self.names = names;
        self.signature = signature;
        Ok(())
    }

    /// The connection ended cleanly: nothing of it stays in the store.
    pub fn end(self) {
        let store = &self.device_store.store;
        let mut gone = self.names.clone();
        gone.push(self.device_store.socket_name());
        gone.push(self.device_store.record_name());
        gone.sort();
        gone.dedup();
        for name in gone {
            if let Err(e) = store.remove(&name) {
                tracing::warn!("{}: {}", self.device_store.name, crate::error_chain(&e));
            }
        }
    }

    /// Its place in the store, for a successor (hand-over); the record's fd goes into `fds`.
    pub fn state(&self, fds: &mut Fds) -> Result<StoredConnectionState> {
        Ok(StoredConnectionState {
            record: fds.add(self.record.file())?,
            version: self.version,
            names: self.names.clone(),
        })
    }
}
