//! The backend request channel (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`): a socket the frontend
//! hands over with `SET_BACKEND_REQ_FD`, on which the backend sends requests of its own. We
//! send one: `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (the config space changed: a resize),
//! with NEED_REPLY when REPLY_ACK was negotiated.
//!
//! The peer is not trusted: the fd must be a connected unix stream socket, every send and
//! every wait for an acknowledgement has a deadline, the socket is never left blocking
//! (MSG_DONTWAIT; its file description may be shared with the frontend, so its flags are
//! not touched), and whatever the peer sent unasked is thrown away before the next request.
//! A send that fails is the caller's to log: nothing here blocks past its deadline or
//! panics. The vhost crate's own `Backend` blocks without a deadline and cannot give its fd
//! back for a hand-over or the fd store, so the channel is ours.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
pub const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: version 1, a reply, a reply wanted.
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Header bytes; an acknowledgement adds a u64.
const HEADER: usize = 12;
const ACK: usize = HEADER + 8;
/// Bytes the peer may have sent unasked that are thrown away before a request; more means
/// it floods the channel, and the request is refused.
const MAX_STALE: usize = 64 << 10;

/// How long a frontend gets to take a request and acknowledge it. QEMU acknowledges a
/// config change after reading the new config space over the main socket, from its main
/// loop: well under this unless the host is starved.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Why a request on the channel failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    /// The fd the frontend gave is not a unix stream socket.
    #[error("the backend request fd is not a unix stream socket ({0})")]
    NotAStreamSocket(String),
    /// The peer did not take the request, or did not answer, in time.
    #[error("no {waiting_for} within {deadline:?}")]
    Timeout {
        /// What was awaited.
        waiting_for: &'static str,
        /// How long.
        deadline: Duration,
    },
    /// The peer closed its end.
    #[error("the frontend closed the backend request channel")]
    Closed,
    /// A system call failed.
    #[error("{what}: {errno}")]
    Os {
        /// What was done.
        what: &'static str,
        /// The OS error.
        errno: String,
    },
    /// The peer answered with something that is not an acknowledgement of our request.
    #[error("the frontend answered with {0}")]
    BadReply(String),
    /// The frontend acknowledged with a failure.
    #[error("the frontend reported failure ({0})")]
    Refused(u64),
    /// The peer keeps sending what nobody asked for.
    #[error("the frontend sent more than {MAX_STALE} bytes unasked")]
    Flooded,
}

/// How a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Sent, and the frontend acknowledged success (REPLY_ACK).
    Acknowledged,
    /// Sent; without REPLY_ACK the frontend does not answer.
    Sent,
}

/// The header of a backend request with no payload.
pub fn encode_request(request: u32, need_reply: bool) -> [u8; HEADER] {
    let mut m = [0u8; HEADER];
    let flags = FLAG_VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
    m[0..4].copy_from_slice(&request.to_le_bytes());
    m[4..8].copy_from_slice(&flags.to_le_bytes());
    // Size 0: CONFIG_CHANGE_MSG has no payload.
    m
}

/// Checks an acknowledgement of `request`: `Ok` for a success, the reason otherwise.
pub fn decode_ack(request: u32, reply: &[u8; ACK]) -> Result<(), ChannelError> {
    let word = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().expect("4 bytes"));
    let (code, flags, size) = (word(0), word(4), word(8));
    if code != request || flags & 0x3 != FLAG_VERSION || flags & FLAG_REPLY == 0 || size != 8 {
        return Err(ChannelError::BadReply(format!(
            "request {code}, flags {flags:#x}, {size} payload bytes (want a version-1 reply to {request} with 8)"
        )));
    }
    match u64::from_le_bytes(reply[12..20].try_into().expect("8 bytes")) {
        0 => Ok(()),
        n => Err(ChannelError::Refused(n)),
    }
}

/// A unix stream socket, or why not.
pub fn check_stream_socket(fd: BorrowedFd<'_>) -> Result<(), ChannelError> {
    let opt = |name: libc::c_int| -> Result<libc::c_int, ChannelError> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into a local int.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(ChannelError::NotAStreamSocket(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        Ok(value)
    };
    let (domain, kind) = (opt(libc::SO_DOMAIN)?, opt(libc::SO_TYPE)?);
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
        return Err(ChannelError::NotAStreamSocket(format!(
            "domain {domain}, type {kind}"
        )));
    }
    Ok(())
}

/// One frontend's backend request channel.
#[derive(Debug)]
pub struct BackendChannel {
    socket: OwnedFd,
    /// REPLY_ACK was negotiated: requests ask for an acknowledgement.
    reply_ack: bool,
    /// One request at a time (their acknowledgements carry no id).
    busy: Mutex<()>,
}

impl BackendChannel {
    /// The channel on `socket`, refused unless it is a unix stream socket.
    pub fn new(socket: OwnedFd, reply_ack: bool) -> Result<Self, ChannelError> {
        check_stream_socket(socket.as_fd())?;
        Ok(Self {
            socket,
            reply_ack,
            busy: Mutex::new(()),
        })
    }

    /// Whether requests ask for an acknowledgement.
    pub fn reply_ack(&self) -> bool {
        self.reply_ack
    }

    /// Tells the frontend the config space changed, within `deadline` (sending and, with
    /// REPLY_ACK, its acknowledgement).
    pub fn config_changed(&self, deadline: Duration) -> Result<Delivered, ChannelError> {
        self.request(CONFIG_CHANGE_MSG, deadline)
    }

    fn request(&self, request: u32, deadline: Duration) -> Result<Delivered, ChannelError> {
        let until = Instant::now() + deadline;
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let fd = self.socket.as_raw_fd();
        // A late acknowledgement of a request that timed out, or anything else unasked,
        // would be taken for this request's.
        drain(fd)?;
        let message = encode_request(request, self.reply_ack);
        let mut sent = 0;
        while sent < message.len() {
            wait(
                fd,
                libc::POLLOUT,
                until,
                "room to send the request",
                deadline,
            )?;
            // SAFETY: sends from our buffer; never blocks, never raises SIGPIPE.
            let n = unsafe {
                libc::send(
                    fd,
                    message[sent..].as_ptr().cast(),
                    message.len() - sent,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::EINTR) => continue,
                    Some(libc::EPIPE | libc::ECONNRESET) => return Err(ChannelError::Closed),
                    _ => {
                        return Err(ChannelError::Os {
                            what: "send",
                            errno: e.to_string(),
                        })
                    }
                }
            }
            sent += n as usize;
        }
        if !self.reply_ack {
            return Ok(Delivered::Sent);
        }
        let mut reply = [0u8; ACK];
        let mut got = 0;
        while got < reply.len() {
            wait(fd, libc::POLLIN, until, "acknowledgement", deadline)?;
            // SAFETY: reads at most the rest of our buffer; never blocks. Any fds sent along
            // are not accepted (no control buffer): the kernel closes them.
            let n = unsafe {
                libc::recv(
                    fd,
                    reply[got..].as_mut_ptr().cast(),
                    reply.len() - got,
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return Err(ChannelError::Closed),
                n if n < 0 => {
                    let e = std::io::Error::last_os_error();
                    if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                        return Err(ChannelError::Os {
                            what: "recv",
                            errno: e.to_string(),
                        });
                    }
                }
                n => got += n as usize,
            }
        }
        decode_ack(request, &reply).map(|()| Delivered::Acknowledged)
    }
}

impl AsFd for BackendChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// Waits until `fd` has `events` (or hangs up), at most until `until`.
fn wait(
    fd: RawFd,
    events: libc::c_short,
    until: Instant,
    waiting_for: &'static str,
    deadline: Duration,
) -> Result<(), ChannelError> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ChannelError::Timeout {
                waiting_for,
                deadline,
            });
        }
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            if p.revents & libc::POLLNVAL != 0 {
                return Err(ChannelError::Os {
                    what: "poll",
                    errno: "invalid fd".into(),
                });
            }
            // A hang-up or error is returned to the send or recv, which says what it is.
            return Ok(());
        }
        if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(ChannelError::Os {
                what: "poll",
                errno: std::io::Error::last_os_error().to_string(),
            });
        }
    }
}

/// Throws away what the peer sent unasked (bounded).
fn drain(fd: RawFd) -> Result<(), ChannelError> {
    let mut scratch = [0u8; 4096];
    let mut total = 0;
    loop {
        // SAFETY: reads into a local buffer; never blocks.
        let n = unsafe {
            libc::recv(
                fd,
                scratch.as_mut_ptr().cast(),
                scratch.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(()),
                Some(libc::ECONNRESET) => Err(ChannelError::Closed),
                _ => Err(ChannelError::Os {
                    what: "recv",
                    errno: e.to_string(),
                }),
            };
        }
        total += n as usize;
        if total > MAX_STALE {
            return Err(ChannelError::Flooded);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn pair(reply_ack: bool) -> (BackendChannel, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (
            BackendChannel::new(OwnedFd::from(ours), reply_ack).unwrap(),
            theirs,
        )
    }

    fn ack(request: u32, value: u64) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&value.to_le_bytes());
        m
    }

    #[test]
    fn a_config_change_is_a_bare_header_with_need_reply_only_under_reply_ack() {
        // As QEMU's docs/interop/vhost-user.rst and the vhost crate's BackendReq number it.
        let code: u32 = vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG.into();
        assert_eq!(code, CONFIG_CHANGE_MSG);
        assert_eq!(
            encode_request(CONFIG_CHANGE_MSG, true),
            [2, 0, 0, 0, 0x9, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            encode_request(CONFIG_CHANGE_MSG, false),
            [2, 0, 0, 0, 0x1, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn acknowledgements_are_checked_field_by_field() {
        let good: [u8; ACK] = ack(2, 0).try_into().unwrap();
        assert_eq!(decode_ack(2, &good), Ok(()));
        let failed: [u8; ACK] = ack(2, 1).try_into().unwrap();
        assert_eq!(decode_ack(2, &failed), Err(ChannelError::Refused(1)));
        let other: [u8; ACK] = ack(3, 0).try_into().unwrap();
        assert!(matches!(
            decode_ack(2, &other),
            Err(ChannelError::BadReply(_))
        ));
        let mut not_reply = good;
        not_reply[4] = 0x1;
        assert!(matches!(
            decode_ack(2, &not_reply),
            Err(ChannelError::BadReply(_))
        ));
        let mut version_2 = good;
        version_2[4] = 0x6;
        assert!(decode_ack(2, &version_2).is_err());
        let mut size_4 = good;
        size_4[8] = 4;
        assert!(decode_ack(2, &size_4).is_err());
    }

    #[test]
    fn only_a_unix_stream_socket_is_taken() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            BackendChannel::new(OwnedFd::from(file), true),
            Err(ChannelError::NotAStreamSocket(_))
        ));
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(matches!(
            BackendChannel::new(OwnedFd::from(a), true),
            Err(ChannelError::NotAStreamSocket(_))
        ));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(BackendChannel::new(OwnedFd::from(udp), true).is_err());
    }

    #[test]
    fn an_acknowledged_change_after_stale_bytes_and_in_pieces() {
        let (channel, mut peer) = pair(true);
        // Left over from an earlier request that timed out: thrown away before the next.
        peer.write_all(&ack(2, 0)[..7]).unwrap();
        let frontend = std::thread::spawn(move || {
            let mut header = [0u8; HEADER];
            peer.read_exact(&mut header).unwrap();
            assert_eq!(header, encode_request(CONFIG_CHANGE_MSG, true));
            let reply = ack(2, 0);
            peer.write_all(&reply[..5]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            peer.write_all(&reply[5..]).unwrap();
            peer
        });
        assert_eq!(
            channel.config_changed(REQUEST_DEADLINE),
            Ok(Delivered::Acknowledged)
        );
        drop(frontend.join().unwrap());
    }

    #[test]
    fn without_reply_ack_the_request_is_only_sent() {
        let (channel, mut peer) = pair(false);
        assert_eq!(
            channel.config_changed(REQUEST_DEADLINE),
            Ok(Delivered::Sent)
        );
        let mut header = [0u8; HEADER];
        peer.read_exact(&mut header).unwrap();
        assert_eq!(header, encode_request(CONFIG_CHANGE_MSG, false));
    }

    #[test]
    fn a_silent_peer_costs_the_deadline_and_no_more() {
        let (channel, _peer) = pair(true);
        let started = Instant::now();
        let deadline = Duration::from_millis(200);
        assert!(matches!(
            channel.config_changed(deadline),
            Err(ChannelError::Timeout {
                waiting_for: "acknowledgement",
                ..
            })
        ));
        assert!(started.elapsed() < deadline + Duration::from_secs(5));
    }

    #[test]
    fn a_peer_that_never_reads_costs_the_deadline_and_no_more() {
        let (channel, _peer) = pair(false);
        // Fill its receive queue: at some point the request no longer fits.
        let mut timed_out = false;
        for _ in 0..1_000_000 {
            match channel.config_changed(Duration::from_millis(50)) {
                Ok(_) => continue,
                Err(ChannelError::Timeout { waiting_for, .. }) => {
                    assert_eq!(waiting_for, "room to send the request");
                    timed_out = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(timed_out, "a full socket times out");
    }

    #[test]
    fn a_closed_peer_a_refusal_and_garbage_are_errors() {
        let (channel, peer) = pair(true);
        drop(peer);
        assert_eq!(
            channel.config_changed(REQUEST_DEADLINE),
            Err(ChannelError::Closed)
        );

        let (channel, mut peer) = pair(true);
        let frontend = std::thread::spawn(move || {
            let mut header = [0u8; HEADER];
            peer.read_exact(&mut header).unwrap();
            peer.write_all(&ack(2, 1)).unwrap();
            peer.read_exact(&mut header).unwrap();
            peer.write_all(&[0xff; ACK]).unwrap();
            peer.read_exact(&mut header).unwrap();
            // Closes after half an answer.
            peer.write_all(&ack(2, 0)[..10]).unwrap();
        });
        assert_eq!(
            channel.config_changed(REQUEST_DEADLINE),
            Err(ChannelError::Refused(1))
        );
        assert!(matches!(
            channel.config_changed(REQUEST_DEADLINE),
            Err(ChannelError::BadReply(_))
        ));
        assert_eq!(
            channel.config_changed(REQUEST_DEADLINE),
            Err(ChannelError::Closed)
        );
        frontend.join().unwrap();
    }

    #[test]
    fn a_flooding_peer_is_refused() {
        let (channel, mut peer) = pair(true);
        peer.set_nonblocking(true).unwrap();
        let junk = vec![0u8; MAX_STALE * 2];
        let _ = peer.write(&junk);
        let _ = peer.write(&junk);
        assert_eq!(
            channel.config_changed(REQUEST_DEADLINE),
            Err(ChannelError::Flooded)
        );
    }
}
