//! DeviceStore connections across a crash: every fd a successor needs is also held outside this
//! process, in a file-descriptor store that speaks systemd's protocol (`FDSTORE=1` on
//! `$NOTIFY_SOCKET`, fds returned at the next start through `LISTEN_FDS`/`LISTEN_FDNAMES`):
//! systemd itself with `FileDescriptorStoreMax=`, or `vfblk-keeper`. Beside the fds, each
//! connection keeps a small shared-memory [`Record`] of its protocol state, rewritten after
//! every vhost-user message ([`crate::kept`]); a record left in the middle of a message tells the successor
//! that this connection's state is unknown, and it closes that connection (the frontend's
//! reconnect then recovers it as before) instead of guessing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::handover::ConnectionState;
use crate::{Error, Result};

/// The first fd of `LISTEN_FDS` (sd_listen_fds' SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;
/// Most fds taken from `LISTEN_FDS`.
const MAX_LISTEN_FDS: usize = 65536;
/// How long a store message may wait for room in the store's socket.
const SEND_DEADLINE: Duration = Duration::from_secs(1);

/// A client of a file-descriptor store.
#[derive(Debug)]
pub struct FdStore {
    sock: UnixDatagram,
}

impl FdStore {
    /// The store at `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
    pub fn from_env() -> Result<Option<FdStore>> {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let io = |what: String| move |source| Error::Io { what, source };
        let sock = UnixDatagram::unbound().map_err(io("a socket for the fd store".into()))?;
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
            None => std::os::unix::net::SocketAddr::from_pathname(std::path::Path::new(&path)),
        }
        .map_err(io(format!("NOTIFY_SOCKET {path:?}")))?;
        sock.connect_addr(&addr)
            .map_err(io(format!("connecting to the fd store at {path:?}")))?;
        sock.set_write_timeout(Some(SEND_DEADLINE))
            .map_err(io("a send deadline for the fd store".into()))?;
        Ok(Some(FdStore { sock }))
    }

    /// Stores a duplicate of `fd` under `name` (printable, no `:`, at most 255 bytes).
    pub fn store(&self, name: &str, fd: &impl AsFd) -> Result<()> {
        check_name(name)?;
        self.send(
            format!("FDSTORE=1\nFDNAME={name}").as_bytes(),
            Some(fd.as_fd().as_raw_fd()),
        )
    }

    /// Drops every fd stored under `name`.
    pub fn remove(&self, name: &str) -> Result<()> {
        check_name(name)?;
        self.send(format!("FDSTOREREMOVE=1\nFDNAME={name}").as_bytes(), None)
    }

    fn send(&self, text: &[u8], fd: Option<RawFd>) -> Result<()> {
        let iov = [IoSlice::new(text)];
        let fds: Vec<RawFd> = fd.into_iter().collect();
        crate::handover::send_with_fds(self.sock.as_raw_fd(), &iov, &fds, 0)
            .map(|_| ())
            .map_err(|source| Error::Io {
                what: format!(
                    "telling the fd store {:?}",
                    String::from_utf8_lossy(text).replace('\n', " ")
                ),
                source,
            })
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 255
        || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
    {
        return Err(Error::HandoverMessage(format!(
            "{name:?} cannot name a stored fd"
        )));
    }
    Ok(())
}

/// The fds a store handed back at this start (`LISTEN_FDS`), by name. Takes them once:
/// the variables are removed so that a process started later does not see them.
#[derive(Debug, Default)]
pub struct StoredFds {
    fds: BTreeMap<String, Vec<OwnedFd>>,
}

impl StoredFds {
    /// Takes the fds of `LISTEN_FDS`/`LISTEN_FDNAMES` (when `LISTEN_PID` is set it must be
    /// this process). They become close-on-exec.
    pub fn from_env() -> StoredFds {
        // Bounded: fds are numbered from 3, and no store holds more than this.
        let count: Option<usize> = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .map(|n: usize| n.min(MAX_LISTEN_FDS));
        let for_us = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|n| n.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            // SAFETY: called at start, before this process starts any thread.
            unsafe { std::env::remove_var(var) };
        }
        let mut stored = StoredFds::default();
        let (Some(count), true) = (count, for_us) else {
            return stored;
        };
        for i in 0..count {
            let fd = LISTEN_FDS_START + i as RawFd;
            // SAFETY: F_SETFD on an fd number; fails harmlessly if it is not open.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                continue;
            }
            let name = names.get(i).cloned().unwrap_or_else(|| "unknown".into());
            // SAFETY: the store passed this fd to this process to own.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            stored.fds.entry(name).or_default().push(owned);
        }
        stored
    }

    /// Takes the fd stored under `name` (the last one, if several).
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let list = self.fds.get_mut(name)?;
        let fd = list.pop();
        if list.is_empty() {
            self.fds.remove(name);
        }
        fd
    }

    /// Names not taken yet.
    pub fn names(&self) -> Vec<String> {
        self.fds.keys().cloned().collect()
    }
}

/// Bytes of a record's memfd: a header and the JSON of one connection's state.
const RECORD_BYTES: usize = 256 * 1024;
/// Header: sequence (u64), JSON length (u64).
const RECORD_HEADER: usize = 16;

/// What a record says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedState {
    /// Store names of the fds `state` refers to, by index.
    pub names: Vec<String>,
    /// Version of the names (each set of fds is stored under fresh names).
    pub version: u64,
    /// The protocol state.
    pub state: ConnectionState,
}

/// One connection's protocol state in shared memory the store holds. A sequence number is
/// odd while a message is being handled and even once the state after it is written.
pub struct ConnectionRecord {
    file: File,
    map: memmap2::MmapRaw,
}

impl std::fmt::Debug for ConnectionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionRecord").finish_non_exhaustive()
    }
}

/// How a record was found.
#[derive(Debug)]
pub enum Found {
    /// Between two messages: the state is whole.
    Whole(Box<RecordedState>),
    /// The process died while handling a message (or writing the record).
    MidMessage,
    /// Never written.
    Empty,
}

impl ConnectionRecord {
    /// A new record.
    pub fn create() -> Result<ConnectionRecord> {
        let file = crate::memory::memfd("vfblk-record", RECORD_BYTES as u64).map_err(|source| {
            Error::Io {
                what: "a memfd for a connection record".into(),
                source,
            }
        })?;
        Self::map(file)
    }

    /// The record in `fd` (from the store). Its size is checked and sealed first.
    pub fn open(fd: OwnedFd) -> Result<ConnectionRecord> {
        let file = File::from(fd);
        crate::sigbus::seal_against_shrinking(&file);
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < RECORD_BYTES as u64 {
            return Err(Error::HandoverMessage(format!(
                "a connection record of {len} bytes"
            )));
        }
        Self::map(file)
    }

    fn map(file: File) -> Result<ConnectionRecord> {
        let map = crate::memory::map_shared(&file, RECORD_BYTES, 0, false).map_err(|source| {
            Error::Io {
                what: "mapping a connection record".into(),
                source,
            }
        })?;
        Ok(ConnectionRecord { file, map })
    }

    /// The memfd, for the store.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn seq(&self) -> &AtomicU64 {
        // SAFETY: the mapping is page-aligned, RECORD_BYTES long and lives as long as self;
        // the first 8 bytes are only accessed as this atomic.
        unsafe { &*self.map.as_mut_ptr().cast::<AtomicU64>() }
    }

    /// A message is being handled: until [`ConnectionRecord::commit`], a successor must not trust
    /// the state.
    pub fn begin(&self) {
        let s = self.seq().load(Ordering::Relaxed);
        if s % 2 == 0 {
            self.seq().store(s + 1, Ordering::Release);
        }
    }

    /// Writes the state after a message and marks it whole.
    pub fn commit(&self, kept: &RecordedState) -> Result<()> {
        self.begin();
        let json = serde_json::to_vec(kept)
            .map_err(|e| Error::HandoverMessage(format!("encoding a record: {e}")))?;
        if json.len() > RECORD_BYTES - RECORD_HEADER {
            return Err(Error::HandoverMessage(format!(
                "a connection record of {} bytes",
                json.len()
            )));
        }
        // SAFETY: header and JSON lie inside the mapping; only this process writes it while
        // it lives, and the odd sequence tells a reader the bytes are in flux.
        unsafe {
            let base = self.map.as_mut_ptr();
            std::ptr::copy_nonoverlapping(json.as_ptr(), base.add(RECORD_HEADER), json.len());
            std::ptr::write_volatile(base.add(8).cast::<u64>(), json.len() as u64);
        }
        let s = self.seq().load(Ordering::Relaxed);
        self.seq().store(s + 1, Ordering::Release);
        Ok(())
    }

    /// Reads what the record says.
    pub fn read(&self) -> Found {
        let s = self.seq().load(Ordering::Acquire);
        if s == 0 {
            return Found::Empty;
        }
        if s % 2 == 1 {
            return Found::MidMessage;
        }
        // SAFETY: inside the mapping; the writer is dead (this is read at a restart).
        let bytes = unsafe {
            let base = self.map.as_mut_ptr();
            let len = std::ptr::read_volatile(base.add(8).cast::<u64>()) as usize;
            if len > RECORD_BYTES - RECORD_HEADER {
                return Found::MidMessage;
            }
            std::slice::from_raw_parts(base.add(RECORD_HEADER), len).to_vec()
        };
        match serde_json::from_slice(&bytes) {
            Ok(k) => Found::Whole(Box::new(k)),
            Err(_) => Found::MidMessage,
        }
    }
}

/// Where a device's connections are kept: the store, and the name that prefixes every fd
/// of the device stored there (the controller's name; `/` separates it from the rest, so
/// names of different devices cannot collide).
#[derive(Debug, Clone)]
pub struct DeviceStore {
    /// The store.
    pub store: std::sync::Arc<FdStore>,
    /// The device's name in it.
    pub name: String,
}

impl DeviceStore {
    /// Store name of the device's listening socket.
    pub fn listener_name(&self) -> String {
        format!("{}/listen", self.name)
    }
    /// Store name of the connected socket.
    pub fn socket_name(&self) -> String {
        format!("{}/sock", self.name)
    }
    /// Store name of the connection's record.
    pub fn record_name(&self) -> String {
        format!("{}/record", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::VringState;

    fn state() -> ConnectionState {
        ConnectionState {
            socket: 0,
            features: 1 << 32,
            protocol: 0,
            memory: Vec::new(),
            vrings: vec![VringState::default(); 2],
            inflight: None,
            status: 0x0f,
            log: None,
            backend_channel: None,
        }
    }

    #[test]
    fn a_record_is_whole_only_between_messages() {
        let r = ConnectionRecord::create().unwrap();
        assert!(matches!(r.read(), Found::Empty));
        let kept = RecordedState {
            names: vec!["c.sock".into()],
            version: 3,
            state: state(),
        };
        r.commit(&kept).unwrap();
        let again = ConnectionRecord::open(r.file().try_clone().unwrap().into()).unwrap();
        match again.read() {
            Found::Whole(k) => {
                assert_eq!(k.version, 3);
                assert_eq!(k.state, state());
            }
            other => panic!("{other:?}"),
        }
        r.begin();
        assert!(matches!(again.read(), Found::MidMessage));
        r.commit(&kept).unwrap();
        assert!(matches!(again.read(), Found::Whole(_)));
    }

    #[test]
    fn names_the_store_would_refuse_are_refused_here() {
        assert!(check_name("vm1/3/0").is_ok());
        for bad in ["", "a:b", "a b", &"x".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stored_fds_are_sent_with_their_names() {
        let dir = std::env::temp_dir().join(format!("vfblk-keep-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let store_side = UnixDatagram::bind(&path).unwrap();
        let sock = UnixDatagram::unbound().unwrap();
        sock.connect(&path).unwrap();
        let store = FdStore { sock };
        let f = crate::memory::memfd("vfblk-keep-test", 4096).unwrap();
        store.store("vm1.sock", &f).unwrap();
        store.remove("vm1.sock").unwrap();
        let mut buf = [0u8; 256];
        let (n, fds) = crate::handover::recv_with_fds(store_side.as_raw_fd(), &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"FDSTORE=1\nFDNAME=vm1.sock");
        assert_eq!(fds.len(), 1);
        let (n, fds) = crate::handover::recv_with_fds(store_side.as_raw_fd(), &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"FDSTOREREMOVE=1\nFDNAME=vm1.sock");
        assert!(fds.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
