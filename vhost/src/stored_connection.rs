//! One connection kept in an fd store ([`crate::keep`]) while this process serves it: the
//! record of its protocol state rewritten after every message, its fds stored whenever they
//! change. Apart from `keep`, which the protocol's settings use, because it reads the
//! protocol's [`Connection`].

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

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
    /// Per name, a duplicate of the fd stored under it (none for the socket): what a new
    /// fd is compared with, as systemd's store keeps one copy of an open file description.
    held: Vec<Option<OwnedFd>>,
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
            held: Vec::new(),
            signature: Vec::new(),
            broken: false,
        })
    }

    /// A connection taken over or resumed: its record and stored names go on being used.
    /// `connection` is the state as this process holds it now, on `socket`.
    pub fn resume(
        device_store: &DeviceStore,
        record: ConnectionRecord,
        version: u64,
        names: Vec<String>,
        connection: &Connection,
        socket: &impl AsFd,
    ) -> StoredConnection {
        // The fds stored under `names`, in the same order (the snapshot's).
        let mut fds = Fds::default();
        let held = match connection.snapshot(socket, &mut fds) {
            Ok(state) if fds.len() == names.len() => (0..fds.len() as u32)
                .map(|i| (i != state.socket).then(|| fds.take(i).ok()).flatten())
                .collect(),
            _ => {
                tracing::warn!(
                    "{}: the stored fds cannot be matched with the connection's; an fd that does not change may be lost from a systemd fd store at the next change",
                    device_store.name
                );
                Vec::new()
            }
        };
        StoredConnection {
            device_store: device_store.clone(),
            record,
            version,
            names,
            held,
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
        let (names, held) = if changed {
            let version = self.version + 1;
            let mut names: Vec<String> = Vec::with_capacity(fds.len());
            let mut held: Vec<Option<OwnedFd>> = Vec::with_capacity(fds.len());
            for i in 0..fds.len() as u32 {
                if i == state.socket {
                    names.push(self.device_store.socket_name());
                    held.push(None);
                    continue;
                }
                let fd = fds.take(i)?;
                // systemd keeps one copy of an open file description whatever names it is
                // stored under ("Suppressing duplicate fd"): a description stored already
                // (unchanged since the last version, or twice in this one, as two memory
                // regions in one memfd) keeps the name it has.
                let stored_as = self
                    .held
                    .iter()
                    .zip(&self.names)
                    .chain(held.iter().zip(&names))
                    .find(|(h, _)| {
                        h.as_ref()
                            .is_some_and(|h| same_description(h.as_fd(), fd.as_fd()))
                    })
                    .map(|(_, name)| name.clone());
                let name = match stored_as {
                    Some(name) => name,
                    None => {
                        let name = format!("{}/{version}/{i}", self.device_store.name);
                        store.store(&name, &fd)?;
                        name
                    }
                };
                names.push(name);
                held.push(Some(fd));
            }
            self.version = version;
            (names, Some(held))
        } else {
            (self.names.clone(), None)
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
        if let Some(held) = held {
            self.held = held;
        }
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

/// Whether two fds of this process are one open file description (kcmp's KCMP_FILE, what
/// systemd's fd store compares). Unknown (kcmp refused) counts as different.
pub fn same_description(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    /// KCMP_FILE of linux/kcmp.h.
    const KCMP_FILE: libc::c_long = 0;
    let pid = libc::c_long::from(std::process::id() as i32);
    // SAFETY: kcmp only compares two fds of this process; both are open for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a.as_raw_fd()),
            libc::c_long::from(b.as_raw_fd()),
        )
    };
    r == 0
}
