//! The framing checks the server makes around the vhost crate's protocol handler, which
//! retries reads and writes that would block and so must never be handed a socket where
//! they would: a message is read only once it is whole and a reply would not block
//! ([`message_ready`]), within a deadline. The STATUS requests, which the crate does not
//! dispatch, are answered here ([`answer_status`]), and so is SET_BACKEND_REQ_FD
//! ([`answer_backend_req_fd`]), whose channel the crate would keep out of our reach.

use std::os::fd::RawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::protocol::Connection;
use crate::server::MESSAGE_DEADLINE;

/// Header bytes of a vhost-user message, and the offset of its payload size.
pub(crate) const HEADER_BYTES: usize = 12;
/// Largest payload the protocol library accepts; a larger claim fails once read.
const MAX_PAYLOAD: usize = 0x1000;

/// Why a message cannot be handled without blocking.
pub(crate) enum NotReady {
    /// Part of a message, and the rest did not come within the deadline.
    Partial(usize),
    /// Our replies are piling up unread.
    NotReading,
}

/// Waits (bounded by [`MESSAGE_DEADLINE`]) until a whole message is in the socket and a reply
/// would not block, so that the protocol library, which retries reads and writes that would
/// block forever, never waits on the peer. A hang-up returns at once: the library then reads
/// what is there and reports the end.
pub(crate) fn message_ready(
    fd: RawFd,
) -> std::result::Result<Option<[u8; HEADER_BYTES]>, NotReady> {
    let deadline = Instant::now() + MESSAGE_DEADLINE;
    let mut available = 0usize;
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd; zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) };
        if p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Ok(None);
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int: the bytes waiting in the receive queue.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) } == 0 {
            available = queued.max(0) as usize;
        }
        let mut header = [0u8; HEADER_BYTES];
        let peeked = if available >= HEADER_BYTES {
            // SAFETY: reads at most 12 bytes into a local, leaving them in the socket.
            unsafe {
                libc::recv(
                    fd,
                    header.as_mut_ptr().cast(),
                    HEADER_BYTES,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            }
        } else {
            0
        };
        let whole = peeked == HEADER_BYTES as isize && {
            let size = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
            available >= HEADER_BYTES + size.min(MAX_PAYLOAD)
        };
        let writable = p.revents & libc::POLLOUT != 0;
        if whole && writable {
            return Ok(Some(header));
        }
        if Instant::now() > deadline {
            return Err(if whole {
                NotReady::NotReading
            } else {
                NotReady::Partial(available)
            });
        }
        // Rare (a peer that splits its messages or lags in reading): a short nap, not a
        // poll, since the socket stays readable while the message is incomplete.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// vhost-user STATUS requests, which the vhost crate does not dispatch: the server answers
/// them itself ([`answer_status`]).
pub(crate) const SET_STATUS: u32 = 39;
pub(crate) const GET_STATUS: u32 = 40;
/// SET_BACKEND_REQ_FD, answered by the server itself ([`answer_backend_req_fd`]).
pub(crate) const SET_BACKEND_REQ_FD: u32 = 21;
/// Fds accepted with one message (more are closed at once).
const MAX_FDS: usize = 8;
/// Header flags: the protocol version (1), a reply, a reply wanted.
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Reads a whole SET_STATUS or GET_STATUS message (its header peeked as `header`, the rest
/// known to be there) and answers it: the status goes to or comes from the connection. Any
/// fds sent along are dropped (plain `recv` takes no ancillary data). An error closes the
/// connection.
pub(crate) fn answer_status(
    fd: RawFd,
    header: &[u8; HEADER_BYTES],
    connection: &Mutex<Connection>,
) -> std::result::Result<(), String> {
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    let wanted = if request == SET_STATUS { 8 } else { 0 };
    if flags & 0x3 != FLAG_VERSION || size != wanted {
        return Err(format!(
            "request {request} with flags {flags:#x} and {size} payload bytes (want version 1, {wanted} bytes)"
        ));
    }
    let mut message = [0u8; HEADER_BYTES + 8];
    let len = HEADER_BYTES + size;
    let mut got = 0;
    while got < len {
        // SAFETY: reads at most len - got bytes into our buffer.
        let n = unsafe {
            libc::recv(
                fd,
                message[got..].as_mut_ptr().cast(),
                len - got,
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            return Err(format!(
                "request {request}: read {got} of {len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        got += n as usize;
    }
    let mut connection = connection.lock().unwrap_or_else(|e| e.into_inner());
    let value = if request == SET_STATUS {
        let status = u64::from_le_bytes(message[12..20].try_into().expect("8 bytes"));
        connection
            .set_status(status)
            .map_err(|e| crate::error_chain(&e))?;
        if flags & FLAG_NEED_REPLY == 0 {
            return Ok(());
        }
        0
    } else {
        u64::from(connection.status())
    };
    drop(connection);
    send_u64_reply(fd, request, value)
}

/// Reads a whole SET_BACKEND_REQ_FD message (its header peeked as `header`, the rest known to
/// be there) with its fd, and gives the fd to the connection, which refuses anything but a
/// unix stream socket. A refusal is answered (with REPLY_ACK) and logged; the connection
/// stays open, as a frontend that cannot have config changes can still do I/O. Only a
/// malformed message or a failed read or reply closes it.
pub(crate) fn answer_backend_req_fd(
    fd: RawFd,
    header: &[u8; HEADER_BYTES],
    connection: &Mutex<Connection>,
) -> std::result::Result<(), String> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    // No payload is defined; a few bytes of one are read and ignored.
    if flags & 0x3 != FLAG_VERSION || size > 64 {
        return Err(format!(
            "request {request} with flags {flags:#x} and {size} payload bytes (want version 1, no payload)"
        ));
    }
    let len = HEADER_BYTES + size;
    let mut message = [0u8; HEADER_BYTES + 64];
    // Room for MAX_FDS fds in one control message.
    let mut control = [0u64; 1 + (MAX_FDS * 4).div_ceil(8) + 2];
    let mut iov = libc::iovec {
        iov_base: message.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are set to our buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg writes at most `len` bytes and the control buffer's length, both ours;
    // received fds are close-on-exec.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: walks the control messages recvmsg wrote, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    // Each received fd is ours to close.
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n != len as isize {
        return Err(format!(
            "request {request}: read {n} of {len} bytes: {}",
            std::io::Error::last_os_error()
        ));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(format!(
            "request {request}: more fds than {MAX_FDS} (the rest were dropped)"
        ));
    }
    let mut c = connection.lock().unwrap_or_else(|e| e.into_inner());
    let result = match (fds.len(), fds.pop()) {
        (1, Some(channel)) => c.set_backend_channel(channel).map_err(|e| e.to_string()),
        (n, _) => Err(format!("{n} fds, not one")),
    };
    if let Err(why) = &result {
        tracing::warn!(
            "SET_BACKEND_REQ_FD refused ({why}): config changes (a resize) will not be told to this frontend"
        );
    }
    let reply_ack = c.negotiated().1
        & vhost::vhost_user::message::VhostUserProtocolFeatures::REPLY_ACK.bits()
        != 0;
    drop(c);
    if flags & FLAG_NEED_REPLY == 0 || !reply_ack {
        return Ok(());
    }
    send_u64_reply(fd, request, u64::from(result.is_err()))
}

/// Sends a reply of one u64 payload to `request` without blocking (the socket was writable:
/// message_ready).
fn send_u64_reply(fd: RawFd, request: u32, value: u64) -> Result<(), String> {
    let mut reply = [0u8; HEADER_BYTES + 8];
    reply[0..4].copy_from_slice(&request.to_le_bytes());
    reply[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    reply[8..12].copy_from_slice(&8u32.to_le_bytes());
    reply[12..20].copy_from_slice(&value.to_le_bytes());
    // SAFETY: sends our 20-byte buffer; the socket was writable (message_ready).
    let sent = unsafe {
        libc::send(
            fd,
            reply.as_ptr().cast(),
            reply.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent != reply.len() as isize {
        return Err(format!(
            "request {request}: reply not sent ({sent}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
