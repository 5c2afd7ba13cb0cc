//! Serving a device on a unix socket. Each [`SocketServer`] owns one listening socket and a
//! thread that serves one frontend at a time: it handles the frontend's messages until it
//! goes away, stops its queues, and accepts the next one with fresh state. Servers are
//! independent: a slow or hostile frontend only ever holds its own server's thread, and then
//! only within the message deadlines below.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::{BackendReqHandler, Listener};
use vmm_sys_util::eventfd::EventFd;

use crate::protocol::{Connection, DeviceConfig};
use crate::{Error, Result};

/// A frontend must send its first message this soon after connecting; one that connects and
/// stays silent would otherwise lock the socket against the real frontend.
pub const FIRST_MESSAGE_DEADLINE: Duration = Duration::from_secs(5);

/// Once a message has started, the rest of it must arrive, and our replies must be read,
/// within this: a peer that sends half a message or never reads is closed.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(5);

/// How long [`SocketServer::stop`] waits for the serving thread (a drain is bounded by the
/// pollers' own deadlines, which end the process if they pass).
const JOIN_DEADLINE: Duration = Duration::from_secs(30);

/// What the serving thread shares with its owner.
struct Shared {
    /// Written to stop the serving thread; it polls this beside its sockets.
    stop: EventFd,
    stopping: AtomicBool,
    /// On stop, complete and publish what is in flight first (a planned stop); otherwise
    /// leave it in the inflight region for the next process.
    drain_on_stop: AtomicBool,
    /// Frontends accepted so far.
    accepted: AtomicU64,
    connected: AtomicBool,
}

/// One listening socket and its serving thread.
pub struct SocketServer {
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Counters of a [`SocketServer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerStats {
    /// Frontends accepted since the server started.
    pub accepted: u64,
    /// A frontend is connected now.
    pub connected: bool,
}

impl SocketServer {
    /// Binds `path` (replacing a stale socket file) and starts serving `config` on it.
    pub fn start(path: &Path, config: Arc<DeviceConfig>) -> Result<Self> {
        let listener = Listener::new(path, true).map_err(|source| Error::Transport {
            what: format!("listening on {}", path.display()),
            source,
        })?;
        let stop =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| Error::Io {
                what: format!("eventfd to stop the server of {}", path.display()),
                source,
            })?;
        let shared = Arc::new(Shared {
            stop,
            stopping: AtomicBool::new(false),
            drain_on_stop: AtomicBool::new(true),
            accepted: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        });
        let name = path.display().to_string();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!(
                "vhost-{}",
                path.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ))
            .spawn(move || serve_loop(&name, &listener, &config, &thread_shared))
            .map_err(|source| Error::Io {
                what: format!("spawning the server thread of {}", path.display()),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            connected: self.shared.connected.load(Ordering::Relaxed),
        }
    }

    /// Stops serving: with `drain`, completes and publishes what is in flight first
    /// (bounded); without, leaves it in the inflight region for whoever serves the guest
    /// next. The connection is closed and the socket file removed.
    pub fn stop(mut self, drain: bool) {
        self.halt(drain);
    }

    fn halt(&mut self, drain: bool) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.drain_on_stop.store(drain, Ordering::Release);
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.shared.stop.write(1);
        let deadline = Instant::now() + JOIN_DEADLINE;
        while !thread.is_finished() {
            if Instant::now() > deadline {
                tracing::error!(
                    "the server of {} did not stop within {JOIN_DEADLINE:?}; leaving it",
                    self.path.display()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = thread.join();
    }

    /// Waits until the serving thread ends (it only does on stop or a listener error).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        self.halt(true);
    }
}

/// Waits on `fd` (a socket or listener) and a `stop` eventfd; `timeout` None waits without
/// end. Returns (fd readable or hung up, stop requested). The wait of every accept loop
/// that must also end on request.
pub fn wait_or_stop(fd: RawFd, stop: &EventFd, timeout: Option<Duration>) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: a valid array of two pollfds.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    if n <= 0 {
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

/// Header bytes of a vhost-user message, and the offset of its payload size.
const HEADER_BYTES: usize = 12;
/// Largest payload the protocol library accepts; a larger claim fails once read.
const MAX_PAYLOAD: usize = 0x1000;

/// Why a message cannot be handled without blocking.
enum NotReady {
    /// Part of a message, and the rest did not come within the deadline.
    Partial(usize),
    /// Our replies are piling up unread.
    NotReading,
}

/// Waits (bounded by [`MESSAGE_DEADLINE`]) until a whole message is in the socket and a reply
/// would not block, so that the protocol library, which retries reads and writes that would
/// block forever, never waits on the peer. A hang-up returns at once: the library then reads
/// what is there and reports the end.
fn message_ready(fd: RawFd) -> std::result::Result<(), NotReady> {
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
            return Ok(());
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
            return Ok(());
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

fn serve_loop(name: &str, listener: &Listener, config: &Arc<DeviceConfig>, shared: &Shared) {
    loop {
        let (readable, stop) = wait_or_stop(listener.as_raw_fd(), &shared.stop, None);
        if stop || shared.stopping.load(Ordering::Acquire) {
            return;
        }
        if !readable {
            continue;
        }
        let stream = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("{name}: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        shared.connected.store(true, Ordering::Relaxed);
        serve_connection(name, stream, config, shared);
        shared.connected.store(false, Ordering::Relaxed);
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Serves one frontend until it goes away, breaks a deadline, or the server stops.
fn serve_connection(name: &str, stream: UnixStream, config: &Arc<DeviceConfig>, shared: &Shared) {
    let fd = stream.as_raw_fd();
    let connection = Arc::new(Mutex::new(Connection::new(config.clone())));
    let mut handler = BackendReqHandler::from_stream(stream, connection.clone());
    let connected_at = Instant::now();
    let mut spoke = false;
    let mut stopped = false;
    loop {
        let timeout = if spoke {
            None
        } else {
            match FIRST_MESSAGE_DEADLINE.checked_sub(connected_at.elapsed()) {
                Some(left) => Some(left),
                None => {
                    tracing::warn!(
                        "{name}: frontend sent nothing within {FIRST_MESSAGE_DEADLINE:?}; closing it"
                    );
                    break;
                }
            }
        };
        let (readable, stop) = wait_or_stop(fd, &shared.stop, timeout);
        if stop || shared.stopping.load(Ordering::Acquire) {
            stopped = true;
            break;
        }
        if !readable {
            continue;
        }
        spoke = true;
        match message_ready(fd) {
            Ok(()) => {}
            Err(NotReady::Partial(bytes)) => {
                tracing::warn!(
                    "{name}: {bytes} byte(s) of a message and no more within {MESSAGE_DEADLINE:?}; closing the connection"
                );
                break;
            }
            Err(NotReady::NotReading) => {
                tracing::warn!(
                    "{name}: the frontend has not read our replies within {MESSAGE_DEADLINE:?}; closing the connection"
                );
                break;
            }
        }
        if let Err(e) = handler.handle_request() {
            match e {
                vhost::vhost_user::Error::Disconnected => {
                    tracing::info!("{name}: frontend disconnected")
                }
                other => tracing::warn!("{name}: closing the connection: {other}"),
            }
            break;
        }
    }
    // A poisoned lock still holds the connection's state: stopping its queues is the best
    // left to do with it.
    let mut connection = connection.lock().unwrap_or_else(|e| e.into_inner());
    if stopped && shared.drain_on_stop.load(Ordering::Acquire) {
        connection.drain();
    }
    connection.disconnect();
    // Guest RAM the device mapped for DMA (and pinned) goes with the frontend.
    connection.release_memory();
    drop(connection);
    drop(handler);
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts afterwards.
/// Call it first in `main`, before any thread exists, so that [`wait_for_termination`] is the
/// only place that receives them.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-set manipulation on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for SIGTERM or SIGINT (blocked first by [`block_signals`]); returns the signal.
pub fn wait_for_termination() -> i32 {
    let set = block_signals();
    let mut sig: libc::c_int = 0;
    // SAFETY: waits for one of the blocked signals; both pointers are locals.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

/// Serves `config` on `path` until SIGTERM or SIGINT, which drain what is in flight and
/// return `Ok`.
pub fn serve(path: &Path, config: Arc<DeviceConfig>, on_ready: impl FnOnce()) -> Result<()> {
    block_signals();
    let server = SocketServer::start(path, config)?;
    on_ready();
    let sig = wait_for_termination();
    tracing::info!("signal {sig}: completing requests in flight, then exiting");
    server.stop(true);
    Ok(())
}
