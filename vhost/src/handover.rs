//! Handing running devices over to another process without closing a connection: the
//! state a successor needs to go on serving a frontend where this process stopped
//! ([`ServerState`], [`ConnectionState`]), and the channel that carries it with its file
//! descriptors ([`Channel`]). What a hand-over means for a whole target (which backends,
//! which order, rollback) is the caller's business; this module moves bytes and fds.
//!
//! The channel is a `SOCK_SEQPACKET` unix socket pair: one end stays in the old process,
//! the other is inherited by the new one. A message is one JSON document and any number of
//! fds, cut into packets that each start with an 8-byte prefix (JSON bytes, fds in this
//! packet); the first packet's JSON bytes begin with the totals. Every receive has a
//! deadline, and received fds are close-on-exec.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// JSON bytes in one packet.
const PACKET_DATA: usize = 32 * 1024;
/// Fds in one packet (the kernel allows 253 per message).
const PACKET_FDS: usize = 200;
/// Largest message accepted (a target with every controller connected is far below).
const MAX_MESSAGE: usize = 16 << 20;
/// Most fds in one message.
const MAX_FDS: usize = 16 * 1024;
/// Prefix of every packet: JSON bytes and fds it carries.
const PREFIX: usize = 8;
/// Totals at the start of a message's JSON bytes: JSON length and fd count.
const TOTALS: usize = 8;

/// One memory region of a connection's table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionState {
    /// Guest-physical start.
    pub guest_phys: u64,
    /// Length in bytes.
    pub size: u64,
    /// Frontend virtual address of the start.
    pub frontend_addr: u64,
    /// Offset in its fd.
    pub mmap_offset: u64,
    /// Its fd, an index into the message's fds.
    pub fd: u32,
}

/// One vring as the frontend configured it; `base` is where the next request is taken.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VringState {
    /// Ring size (0: not set).
    pub size: u16,
    /// Descriptor table, frontend address.
    pub desc: u64,
    /// Avail ring, frontend address.
    pub avail: u64,
    /// Used ring, frontend address.
    pub used: u64,
    /// SET_VRING_ADDR arrived.
    pub addresses_set: bool,
    /// SET_VRING_BASE's value: a split ring's next avail index, a packed ring's positions
    /// (wider than the u16 records before packed rings had, which still read).
    pub base: u32,
    /// Kick fd (index), when the frontend gave one.
    pub kick: Option<u32>,
    /// SET_VRING_KICK arrived (with an fd or NOFD).
    pub kick_set: bool,
    /// Call fd (index).
    pub call: Option<u32>,
    /// Paused by SET_VRING_ENABLE(0).
    pub disabled: bool,
    /// The used ring's guest-physical address for dirty logging (VHOST_VRING_F_LOG).
    #[serde(default)]
    pub log_guest_addr: Option<u64>,
}

/// The inflight region a connection uses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InflightState {
    /// Its fd (index).
    pub fd: u32,
    /// Offset of the region in the fd.
    pub offset: u64,
    /// Bytes mapped.
    pub size: u64,
    /// Queue size the region is laid out for.
    pub queue_size: u16,
    /// The target's own region (the frontend gave none): kept only in the fd store and the
    /// hand-over, never seen by the frontend.
    #[serde(default)]
    pub own: bool,
}

/// A migration's dirty log (SET_LOG_BASE).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogState {
    /// Its fd (index).
    pub fd: u32,
    /// Offset of the log in the fd.
    pub offset: u64,
    /// Bytes mapped.
    pub size: u64,
}

/// A connected frontend, quiesced: no request of it is in this process any more.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionState {
    /// The connected vhost-user socket (index).
    pub socket: u32,
    /// Negotiated virtio features.
    pub features: u64,
    /// Negotiated protocol features.
    pub protocol: u64,
    /// The memory table (empty before SET_MEM_TABLE).
    pub memory: Vec<RegionState>,
    /// Every vring the device offers.
    pub vrings: Vec<VringState>,
    /// The inflight region, when the frontend set one up.
    pub inflight: Option<InflightState>,
    /// The virtio device status the frontend last set (SET_STATUS).
    #[serde(default)]
    pub status: u8,
    /// The dirty log of a migration in progress, if the frontend gave one (whether it is
    /// written is LOG_ALL in `features`).
    #[serde(default)]
    pub log: Option<LogState>,
    /// The backend request channel (SET_BACKEND_REQ_FD), if the frontend gave one (index).
    #[serde(default)]
    pub backend_channel: Option<u32>,
}

/// One socket server: its listening socket and the frontend connected to it, if any.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerState {
    /// The listening socket (index).
    pub listener: u32,
    /// The connected frontend.
    pub connection: Option<ConnectionState>,
    /// How the connection is kept in an fd store (see [`crate::keep`]), if it is.
    #[serde(default)]
    pub kept: Option<StoredConnectionState>,
}

/// A connection's place in an fd store: its record and the names its fds are stored under.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredConnectionState {
    /// The record's memfd (index).
    pub record: u32,
    /// Version of the stored names.
    pub version: u64,
    /// The stored names, by the connection state's fd index.
    pub names: Vec<String>,
}

impl ServerState {
    /// Renumbers every fd index by `by` (when its fds are appended to a larger set).
    pub fn offset_fds(&mut self, by: u32) {
        self.listener += by;
        if let Some(k) = &mut self.kept {
            k.record += by;
        }
        if let Some(c) = &mut self.connection {
            c.offset_fds(by);
        }
    }
}

impl ConnectionState {
    /// Renumbers every fd index by `by`.
    pub fn offset_fds(&mut self, by: u32) {
        self.socket += by;
        for r in &mut self.memory {
            r.fd += by;
        }
        for v in &mut self.vrings {
            v.kick = v.kick.map(|i| i + by);
            v.call = v.call.map(|i| i + by);
        }
        if let Some(i) = &mut self.inflight {
            i.fd += by;
        }
        if let Some(l) = &mut self.log {
            l.fd += by;
        }
        if let Some(c) = &mut self.backend_channel {
            *c += by;
        }
    }

    /// Whether resuming it after a crash would start a ring with no inflight region to say
    /// which of its requests the dead process had taken: then it must not be resumed.
    pub fn runs_without_inflight(&self) -> bool {
        self.inflight.is_none()
            && self
                .vrings
                .iter()
                .any(|v| v.kick_set && v.addresses_set && v.size > 0 && !v.disabled)
    }
}

/// File descriptors travelling with a message, referred to by index.
#[derive(Debug, Default)]
pub struct Fds {
    fds: Vec<Option<OwnedFd>>,
}

impl Fds {
    /// Adds a duplicate of `fd`; returns its index.
    pub fn add(&mut self, fd: &impl AsFd) -> Result<u32> {
        let dup = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| Error::Io {
                what: "duplicating an fd for the hand-over".into(),
                source,
            })?;
        self.fds.push(Some(dup));
        Ok((self.fds.len() - 1) as u32)
    }

    /// Adds `fd` itself; returns its index.
    pub fn push(&mut self, fd: OwnedFd) -> u32 {
        self.fds.push(Some(fd));
        (self.fds.len() - 1) as u32
    }

    /// Moves `other`'s fds to the end of these; returns the index the first one got.
    pub fn append(&mut self, other: Fds) -> u32 {
        let first = self.fds.len() as u32;
        self.fds.extend(other.fds);
        first
    }

    /// Takes fd `index` out (each once).
    pub fn take(&mut self, index: u32) -> Result<OwnedFd> {
        self.fds
            .get_mut(index as usize)
            .and_then(Option::take)
            .ok_or(Error::HandoverMessage(format!(
                "fd {index} is missing or named twice"
            )))
    }

    /// Takes fd `index` out as a file.
    pub fn take_file(&mut self, index: u32) -> Result<File> {
        self.take(index).map(File::from)
    }

    /// How many fds there are (taken ones included).
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// No fd at all.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The fds to send; indexes are positions, so a set with one taken out cannot be sent.
    fn raw(&self) -> Result<Vec<RawFd>> {
        self.fds
            .iter()
            .map(|f| {
                f.as_ref().map(|f| f.as_raw_fd()).ok_or_else(|| {
                    Error::HandoverMessage("an fd was taken from a set being sent".into())
                })
            })
            .collect()
    }
}

/// One end of a hand-over channel.
#[derive(Debug)]
pub struct Channel {
    sock: OwnedFd,
}

impl Channel {
    /// A connected pair, both ends close-on-exec.
    pub fn pair() -> Result<(Channel, Channel)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: socketpair writes two fds into the local array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(Error::Io {
                what: "socketpair for the hand-over".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: both fds were just created and are owned by nothing else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Channel { sock: a }, Channel { sock: b }))
    }

    /// The end inherited from the old process, by number; it must be a seqpacket socket.
    pub fn inherited(fd: RawFd) -> Result<Channel> {
        let mut kind: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_TYPE writes one int into a local.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut kind as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 || kind != libc::SOCK_SEQPACKET {
            return Err(Error::HandoverMessage(format!(
                "fd {fd} is not a hand-over channel (a seqpacket socket)"
            )));
        }
        // SAFETY: the fd was handed to this process for this purpose and nothing else owns
        // it; close-on-exec keeps it from a process this one starts later.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: as above.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Channel { sock })
    }

    /// The socket, to be inherited by a child (whose copy must lose close-on-exec).
    pub fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends `message` with `fds`, within `deadline`.
    pub fn send<T: Serialize>(&self, message: &T, fds: &Fds, deadline: Instant) -> Result<()> {
        let json = serde_json::to_vec(message)
            .map_err(|e| Error::HandoverMessage(format!("encoding a message: {e}")))?;
        let raw = fds.raw()?;
        let mut data = Vec::with_capacity(TOTALS + json.len());
        data.extend_from_slice(&(json.len() as u32).to_le_bytes());
        data.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        data.extend_from_slice(&json);
        let (mut d, mut f) = (0usize, 0usize);
        while d < data.len() || f < raw.len() {
            let dn = (data.len() - d).min(PACKET_DATA);
            let fd_n = (raw.len() - f).min(PACKET_FDS);
            self.wait(libc::POLLOUT, deadline, "room to send")?;
            self.send_packet(&data[d..d + dn], &raw[f..f + fd_n])?;
            d += dn;
            f += fd_n;
        }
        Ok(())
    }

    fn send_packet(&self, data: &[u8], fds: &[RawFd]) -> Result<()> {
        let prefix = [
            (data.len() as u32).to_le_bytes(),
            (fds.len() as u32).to_le_bytes(),
        ]
        .concat();
        let iov = [IoSlice::new(&prefix), IoSlice::new(data)];
        let sent = send_with_fds(self.sock.as_raw_fd(), &iov, fds, libc::MSG_DONTWAIT);
        match sent {
            Ok(n) if n == PREFIX + data.len() => Ok(()),
            Ok(n) => Err(Error::HandoverMessage(format!(
                "sent {n} of {} bytes of a packet",
                PREFIX + data.len()
            ))),
            Err(source) => Err(Error::Io {
                what: "sending on the hand-over channel".into(),
                source,
            }),
        }
    }

    /// Waits for `events` until `deadline`.
    fn wait(&self, events: libc::c_short, deadline: Instant, what: &'static str) -> Result<()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut p = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n > 0 {
                return Ok(());
            }
            if n == 0 {
                return Err(Error::HandoverTimeout { waiting_for: what });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Io {
                    what: format!("waiting for {what}"),
                    source: e,
                });
            }
        }
    }

    /// Receives one message, or fails at `deadline`, at a closed peer, or at a malformed
    /// message. `what` names the message in errors.
    pub fn recv<T: DeserializeOwned>(
        &self,
        deadline: Instant,
        what: &'static str,
    ) -> Result<(T, Fds)> {
        let mut data: Vec<u8> = Vec::new();
        let mut fds = Fds::default();
        let mut totals: Option<(usize, usize)> = None;
        let mut buf = vec![0u8; PREFIX + PACKET_DATA];
        loop {
            if let Some((json_len, fd_count)) = totals {
                if data.len() >= TOTALS + json_len && fds.len() >= fd_count {
                    break;
                }
            }
            self.wait(libc::POLLIN, deadline, what)?;
            let (n, got) = self.recv_packet(&mut buf)?;
            if n == 0 {
                return Err(Error::HandoverClosed { waiting_for: what });
            }
            let got_fds = got.len();
            fds.fds.extend(got.into_iter().map(Some));
            if n < PREFIX {
                return Err(Error::HandoverMessage(format!("a packet of {n} bytes")));
            }
            let dn = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
            let fd_n = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
            if dn != n - PREFIX || fd_n != got_fds {
                return Err(Error::HandoverMessage(format!(
                    "a packet says {dn} bytes and {fd_n} fds, and has {} bytes and {got_fds} fds",
                    n - PREFIX
                )));
            }
            data.extend_from_slice(&buf[PREFIX..n]);
            if totals.is_none() && data.len() >= TOTALS {
                let json_len = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
                let fd_count = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes")) as usize;
                if json_len > MAX_MESSAGE || fd_count > MAX_FDS {
                    return Err(Error::HandoverMessage(format!(
                        "a message of {json_len} bytes and {fd_count} fds"
                    )));
                }
                totals = Some((json_len, fd_count));
            }
            if let Some((json_len, fd_count)) = totals {
                if data.len() > TOTALS + json_len || fds.len() > fd_count {
                    return Err(Error::HandoverMessage(format!(
                        "more than the {json_len} bytes and {fd_count} fds announced"
                    )));
                }
            }
        }
        let message = serde_json::from_slice(&data[TOTALS..])
            .map_err(|e| Error::HandoverMessage(format!("{what}: {e}")))?;
        Ok((message, fds))
    }

    /// One packet into `buf`; its fds, close-on-exec.
    fn recv_packet(&self, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>)> {
        recv_with_fds(self.sock.as_raw_fd(), buf, PACKET_FDS).map_err(|source| Error::Io {
            what: "receiving on the hand-over channel".into(),
            source,
        })
    }
}

/// `sendmsg` of `iov` with `fds` as SCM_RIGHTS; `flags` as for sendmsg (MSG_NOSIGNAL is
/// always added). Ours rather than vmm-sys-util's `ScmSocket`: the receiving side needs
/// MSG_CMSG_CLOEXEC and must refuse truncated messages, which that one does not do.
pub fn send_with_fds(
    sock: RawFd,
    iov: &[IoSlice<'_>],
    fds: &[RawFd],
    flags: libc::c_int,
) -> std::io::Result<usize> {
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    let space = if fds.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE only computes a size.
        unsafe { libc::CMSG_SPACE(fd_bytes) as usize }
    };
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; its pointers are set below to buffers that
    // outlive the sendmsg call (IoSlice is ABI-compatible with iovec).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header and `fds` (CMSG_SPACE).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    loop {
        // SAFETY: msg points at valid buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock, &msg, flags | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `recvmsg` into `buf` (without waiting) taking up to `max_fds` fds, close-on-exec; a
/// truncated message or control part is an error (its fds are closed).
pub fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    max_fds: usize,
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((max_fds.max(1) * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u8; space as usize];
    // SAFETY: an all-zero msghdr is valid; its pointers are set to locals below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    // SAFETY: msg points at valid buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walks the control messages the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    // Each fd the kernel installed is ours to own (and close).
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a message larger than the buffer, or with too many fds",
        ));
    }
    Ok((n as usize, fds))
}

/// How long a step of a hand-over may take before the side waiting gives up.
pub const STEP_DEADLINE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn a_vring_base_reads_from_a_16_bit_record_and_keeps_a_packed_value() {
        // As a process before packed rings wrote it.
        let old = r#"{"size":256,"desc":4096,"avail":8192,"used":12288,"addresses_set":true,
            "base":65535,"kick":null,"kick_set":true,"call":null,"disabled":false}"#;
        let v: VringState = serde_json::from_str(old).unwrap();
        assert_eq!((v.size, v.base), (256, 65535));
        let packed = VringState {
            base: 0x8004_8004,
            ..VringState::default()
        };
        let back: VringState =
            serde_json::from_slice(&serde_json::to_vec(&packed).unwrap()).unwrap();
        assert_eq!(back.base, 0x8004_8004);
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Message {
        text: String,
        files: Vec<u32>,
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn a_large_message_with_many_fds_arrives_whole_and_the_fds_work() {
        let (a, b) = Channel::pair().unwrap();
        let mut fds = Fds::default();
        let mut files = Vec::new();
        // More fds and bytes than one packet carries.
        for i in 0..450u32 {
            let mut f = crate::memory::memfd("vfblk-handover-test", 4096).unwrap();
            f.write_all(&i.to_le_bytes()).unwrap();
            files.push(fds.add(&f).unwrap());
        }
        let message = Message {
            text: "x".repeat(100_000),
            files,
        };
        let sender = std::thread::spawn(move || {
            a.send(&message, &fds, later()).unwrap();
            message
        });
        let (got, mut fds): (Message, Fds) = b.recv(later(), "the test message").unwrap();
        let sent = sender.join().unwrap();
        assert_eq!(got, sent);
        assert_eq!(fds.len(), 450);
        for (i, &index) in got.files.iter().enumerate() {
            let mut f = fds.take_file(index).unwrap();
            f.rewind().unwrap();
            let mut word = [0u8; 4];
            f.read_exact(&mut word).unwrap();
            assert_eq!(u32::from_le_bytes(word), i as u32);
            // SAFETY: F_GETFD reads the descriptor flags of an fd we own.
            let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
        assert!(fds.take(0).is_err(), "an fd is taken only once");
    }

    #[test]
    fn a_silent_or_closed_peer_and_garbage_are_errors_not_hangs() {
        let (a, b) = Channel::pair().unwrap();
        let started = Instant::now();
        let r: Result<(Message, Fds)> = b.recv(started + Duration::from_millis(100), "nothing");
        assert!(matches!(r, Err(Error::HandoverTimeout { .. })), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A packet whose prefix lies about its size.
        let mut packet = 100u32.to_le_bytes().to_vec();
        packet.extend_from_slice(&0u32.to_le_bytes());
        packet.extend_from_slice(b"short");
        // SAFETY: sends a local buffer on a socket we own.
        unsafe { libc::send(a.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0) };
        let r: Result<(Message, Fds)> = b.recv(later(), "garbage");
        assert!(matches!(r, Err(Error::HandoverMessage(_))), "{r:?}");
        // Totals beyond the limits.
        let mut packet = 8u32.to_le_bytes().to_vec();
        packet.extend_from_slice(&0u32.to_le_bytes());
        packet.extend_from_slice(&u32::MAX.to_le_bytes());
        packet.extend_from_slice(&0u32.to_le_bytes());
        // SAFETY: as above.
        unsafe { libc::send(a.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0) };
        let r: Result<(Message, Fds)> = b.recv(later(), "a huge message");
        assert!(matches!(r, Err(Error::HandoverMessage(_))), "{r:?}");
        drop(a);
        let r: Result<(Message, Fds)> = b.recv(later(), "the state");
        assert!(matches!(r, Err(Error::HandoverClosed { .. })), "{r:?}");
    }

    #[test]
    fn only_a_seqpacket_socket_is_taken_as_a_channel() {
        let f = crate::memory::memfd("vfblk-handover-test", 4096).unwrap();
        let fd = OwnedFd::from(f);
        assert!(Channel::inherited(fd.as_raw_fd()).is_err());
    }
}
