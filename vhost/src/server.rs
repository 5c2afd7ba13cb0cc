//! Serving a device on a unix socket. Each [`SocketServer`] owns one listening socket and a
//! thread that serves one frontend at a time: it handles the frontend's messages until it
//! goes away, stops its queues, and accepts the next one with fresh state. Servers are
//! independent: a slow or hostile frontend only ever holds its own server's thread, and then
//! only within the message deadlines below.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::{BackendReqHandler, Listener};
use vmm_sys_util::eventfd::EventFd;

use crate::backend_channel::{BackendChannel, ChannelError, Delivered, REQUEST_DEADLINE};
use crate::fd_store::{ConnectionRecord, DeviceStore};
use crate::framing::{
    answer_backend_req_fd, answer_status, message_ready, NotReady, GET_STATUS, SET_BACKEND_REQ_FD,
    SET_STATUS,
};
use crate::handover::{Fds, ServerState};
use crate::protocol::{Connection, DeviceConfig};
use crate::signals::{block_signals, wait_for_termination};
use crate::stored_connection::StoredConnection;
use crate::{Error, Result};

type Handler = BackendReqHandler<Mutex<Connection>>;

/// A connection being served: its state, its protocol handler and, when the device is kept
/// in an fd store, its record there.
struct Served {
    connection: Arc<Mutex<Connection>>,
    handler: Handler,
    kept: Option<StoredConnection>,
}

/// A frontend must send its first message this soon after connecting; one that connects and
/// stays silent would otherwise lock the socket against the real frontend.
pub const FIRST_MESSAGE_DEADLINE: Duration = Duration::from_secs(5);

/// Once a message has started, the rest of it must arrive, and our replies must be read,
/// within this: a peer that sends half a message or never reads is closed.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(5);

/// How long [`SocketServer::stop`] waits for the serving thread (a drain is bounded by the
/// pollers' own deadlines, which end the process if they pass).
const JOIN_DEADLINE: Duration = Duration::from_secs(30);

/// How long a suspended server waits for its owner's verdict before it resumes serving
/// (the owner's own steps are bounded well below this).
const VERDICT_DEADLINE: Duration = Duration::from_secs(60);

/// What a suspended server is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SuspendOutcome {
    /// The hand-over is off: serve again.
    Resume,
    /// A successor serves now: touch nothing, close nothing, end the thread.
    LetGo,
}

/// A suspend asked of the serving thread.
struct SuspendRequest {
    reply: mpsc::Sender<Result<(ServerState, Fds)>>,
    verdict: mpsc::Receiver<SuspendOutcome>,
}

/// What the serving thread shares with its owner.
struct ServerControl {
    /// A pending suspend (the stop eventfd wakes the thread for it).
    suspend: Mutex<Option<SuspendRequest>>,
    /// Written to stop the serving thread; it polls this beside its sockets.
    stop: EventFd,
    stopping: AtomicBool,
    /// On stop, complete and publish what is in flight first (a planned stop); otherwise
    /// leave it in the inflight region for the next process.
    drain_on_stop: AtomicBool,
    /// Frontends accepted so far.
    accepted: AtomicU64,
    connected: AtomicBool,
    /// The connected frontend's backend request channel, if it gave one: config changes are
    /// told there by whoever changes the device, without the connection's lock.
    channel: Mutex<Option<Arc<BackendChannel>>>,
}

impl ServerControl {
    fn set_channel(&self, channel: Option<Arc<BackendChannel>>) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = channel;
    }
}

/// What became of telling a frontend its device's config space changed
/// ([`SocketServer::config_changed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigChangeTold {
    /// No frontend is connected (the next one reads the config space when it connects).
    NotConnected,
    /// The frontend gave no backend request channel (it did not negotiate BACKEND_REQ): it
    /// sees the change only when it reads the config space again.
    NoChannel,
    /// Sent (and acknowledged, with REPLY_ACK).
    Delivered(Delivered),
    /// The channel failed or the frontend did not answer in time.
    Failed(ChannelError),
}

/// One listening socket and its serving thread.
pub struct SocketServer {
    path: PathBuf,
    /// Where the device's fds are kept, if anywhere.
    device_store: Option<DeviceStore>,
    shared: Arc<ServerControl>,
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
        if let Some(k) = &config.fd_store {
            if let Err(e) = k.store.store(&k.listener_name(), &listener_fd(&listener)) {
                tracing::error!("{}: {}", path.display(), crate::error_chain(&e));
            }
        }
        spawn(path, listener, None, config)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells the connected frontend that the device's config space changed (a resize), on
    /// its backend request channel, within [`REQUEST_DEADLINE`]. Never holds the connection:
    /// the frontend may read the config space over the main socket before it acknowledges
    /// (QEMU does). A failure is returned for the caller to report.
    pub fn config_changed(&self) -> ConfigChangeTold {
        if !self.shared.connected.load(Ordering::Relaxed) {
            return ConfigChangeTold::NotConnected;
        }
        let channel = self
            .shared
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(channel) = channel else {
            return ConfigChangeTold::NoChannel;
        };
        match channel.config_changed(REQUEST_DEADLINE) {
            Ok(d) => ConfigChangeTold::Delivered(d),
            Err(e) => ConfigChangeTold::Failed(e),
        }
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
        if let Some(k) = &self.device_store {
            // Stopped on purpose: nothing of it is to outlive this process.
            if let Err(e) = k.store.remove(&k.listener_name()) {
                tracing::warn!("{}: {}", self.path.display(), crate::error_chain(&e));
            }
        }
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

    /// Quiesces the server for a hand-over: between two messages, the connected frontend's
    /// queues stop once their requests are complete and published, and the state a
    /// successor needs comes back with duplicates of its fds. Nothing is served until the
    /// returned [`Suspended`] is resumed or let go.
    pub fn suspend(&self) -> Result<Suspended> {
        let (reply_tx, reply_rx) = mpsc::channel();
        let (verdict_tx, verdict_rx) = mpsc::channel();
        *self
            .shared
            .suspend
            .lock()
            .map_err(|_| Error::Poisoned("server control"))? = Some(SuspendRequest {
            reply: reply_tx,
            verdict: verdict_rx,
        });
        let _ = self.shared.stop.write(1);
        // A message half-read waits out its own deadline first; a drain is bounded by the
        // pollers'.
        let waited = MESSAGE_DEADLINE + JOIN_DEADLINE;
        match reply_rx.recv_timeout(waited) {
            Ok(Ok((state, fds))) => Ok(Suspended {
                state,
                fds,
                verdict: verdict_tx,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // Too late: the thread must not suspend after we gave up.
                self.shared.suspend.lock().ok().and_then(|mut s| s.take());
                Err(Error::HandoverTimeout {
                    waiting_for: "the server to suspend",
                })
            }
        }
    }

    /// After [`Suspended::let_go`]: forgets the serving thread, which ends without closing
    /// anything or removing the socket file (they are the successor's now).
    pub fn forget(mut self) {
        self.thread = None;
    }

    /// A server taken over from a predecessor process: its listening socket and connected
    /// frontend from `state`, the connection's memory mapped and its negotiation restored,
    /// no queue started and no message read until [`TakenOver::serve`].
    pub fn take_over(
        path: &Path,
        config: Arc<DeviceConfig>,
        state: &ServerState,
        fds: &mut Fds,
    ) -> Result<TakenOver> {
        let listener = std::os::unix::net::UnixListener::from(fds.take(state.listener)?);
        let connection = match &state.connection {
            Some(c) => {
                let stream = UnixStream::from(fds.take(c.socket)?);
                let resumed = Connection::resume(config.clone(), c, fds)?;
                let kept = match (&config.fd_store, &state.kept) {
                    (Some(device_store), Some(k)) => Some(StoredConnection::resume(
                        device_store,
                        ConnectionRecord::open(fds.take(k.record)?)?,
                        k.version,
                        k.names.clone(),
                        &resumed,
                        &stream,
                    )),
                    // Not kept by the predecessor: stored only once this process serves (in
                    // `serve`), so a called-off hand-over finds the store as its owner left it.
                    _ => None,
                };
                let connection = Arc::new(Mutex::new(resumed));
                let handler = resumed_handler(stream, connection.clone(), c.features, c.protocol)?;
                Some(Served {
                    connection,
                    handler,
                    kept,
                })
            }
            None => None,
        };
        Ok(TakenOver {
            path: path.to_path_buf(),
            config,
            listener: Listener::from(listener),
            connection,
        })
    }

    /// Waits until the serving thread ends (it only does on stop or a listener error).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A suspended server ([`SocketServer::suspend`]).
pub struct Suspended {
    /// What a successor needs.
    pub state: ServerState,
    /// The fds `state` refers to.
    pub fds: Fds,
    verdict: mpsc::Sender<SuspendOutcome>,
}

impl Suspended {
    /// The hand-over is off: the server serves again, its queues restart.
    pub fn resume(self) {
        let _ = self.verdict.send(SuspendOutcome::Resume);
    }

    /// A successor serves now: the thread ends touching nothing (then
    /// [`SocketServer::forget`] the server).
    pub fn let_go(self) {
        let _ = self.verdict.send(SuspendOutcome::LetGo);
    }
}

/// A server taken over from a predecessor, ready to serve ([`SocketServer::take_over`]).
pub struct TakenOver {
    path: PathBuf,
    config: Arc<DeviceConfig>,
    listener: Listener,
    connection: Option<Served>,
}

impl TakenOver {
    /// Starts the connection's queues and serves. The socket file stays where the
    /// predecessor bound it and is removed when this server stops.
    pub fn serve(self) -> Result<SocketServer> {
        let TakenOver {
            path,
            config,
            listener,
            mut connection,
        } = self;
        if let Some(served) = &mut connection {
            if let (Some(device_store), None) = (&config.fd_store, &served.kept) {
                match served
                    .handler
                    .try_clone_connection()
                    .map_err(|source| Error::Io {
                        what: "the connection's socket".into(),
                        source,
                    })
                    .and_then(|s| StoredConnection::start(device_store, &s))
                {
                    Ok(k) => served.kept = Some(k),
                    Err(e) => tracing::error!(
                        "{}: this connection will not outlive a crash: {}",
                        path.display(),
                        crate::error_chain(&e)
                    ),
                }
            }
            served
                .connection
                .lock()
                .map_err(|_| Error::Poisoned("connection"))?
                .start_queues();
        }
        spawn(&path, listener, connection, config)
    }
}

/// Starts the serving thread of `listener`, first serving `resumed` if given.
fn spawn(
    path: &Path,
    listener: Listener,
    resumed: Option<Served>,
    config: Arc<DeviceConfig>,
) -> Result<SocketServer> {
    let stop =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| Error::Io {
            what: format!("eventfd to stop the server of {}", path.display()),
            source,
        })?;
    let shared = Arc::new(ServerControl {
        suspend: Mutex::new(None),
        stop,
        stopping: AtomicBool::new(false),
        drain_on_stop: AtomicBool::new(true),
        accepted: AtomicU64::new(u64::from(resumed.is_some())),
        connected: AtomicBool::new(resumed.is_some()),
        channel: Mutex::new(None),
    });
    let device_store = config.fd_store.clone();
    let name = path.display().to_string();
    let thread_shared = shared.clone();
    let socket_file = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name(format!(
            "vhost-{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ))
        .spawn(move || {
            if serve_loop(&name, listener, resumed, &config, &thread_shared) == Ended::Stopped {
                // A listener taken over from a predecessor does not remove its file itself.
                let _ = std::fs::remove_file(&socket_file);
            }
        })
        .map_err(|source| Error::Io {
            what: format!("spawning the server thread of {}", path.display()),
            source,
        })?;
    Ok(SocketServer {
        path: path.to_path_buf(),
        device_store,
        shared,
        thread: Some(thread),
    })
}

/// A handler for a connection negotiated by a predecessor process. The vhost crate keeps the
/// negotiated features inside its handler, out of reach, and takes them only from messages:
/// the negotiation is replayed over a socket pair, and the handler's end of the pair is then
/// replaced, under the same fd number, by the frontend's connection.
fn resumed_handler(
    stream: UnixStream,
    connection: Arc<Mutex<Connection>>,
    features: u64,
    protocol: u64,
) -> Result<Handler> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| Error::Io { what, source }
    };
    let (ours, mut theirs) = UnixStream::pair().map_err(io("socket pair for the replay"))?;
    let ours_fd = ours.as_raw_fd();
    let mut handler = BackendReqHandler::from_stream(ours, connection.clone());
    let message = |code: u32, payload: Option<u64>| {
        let mut m = Vec::with_capacity(20);
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes()); // version 1, no reply asked
        m.extend_from_slice(&(if payload.is_some() { 8u32 } else { 0 }).to_le_bytes());
        if let Some(p) = payload {
            m.extend_from_slice(&p.to_le_bytes());
        }
        m
    };
    use vhost::vhost_user::message::{FrontendReq, VhostUserVirtioFeatures};
    let mut replay = vec![
        message(FrontendReq::GET_FEATURES.into(), None),
        message(FrontendReq::SET_FEATURES.into(), Some(features)),
    ];
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        replay.push(message(FrontendReq::GET_PROTOCOL_FEATURES.into(), None));
        replay.push(message(
            FrontendReq::SET_PROTOCOL_FEATURES.into(),
            Some(protocol),
        ));
    }
    for m in replay {
        use std::io::Write;
        theirs
            .write_all(&m)
            .map_err(io("writing the negotiation replay"))?;
        handler
            .handle_request()
            .map_err(|source| Error::Transport {
                what: "replaying the negotiation".into(),
                source,
            })?;
    }
    {
        let c = connection
            .lock()
            .map_err(|_| Error::Poisoned("connection"))?;
        if c.negotiated() != (features, protocol) {
            return Err(Error::HandoverIncompatible(format!(
                "negotiation replay gave features {:#x}/{:#x}, not {features:#x}/{protocol:#x}",
                c.negotiated().0,
                c.negotiated().1
            )));
        }
    }
    // SAFETY: both fds are open; dup3 atomically makes `ours_fd` (owned by the handler)
    // refer to the frontend's connection, closing the replay end.
    if unsafe { libc::dup3(stream.as_raw_fd(), ours_fd, libc::O_CLOEXEC) } < 0 {
        return Err(Error::Io {
            what: "moving the connection under the handler".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    drop(stream);
    Ok(handler)
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

/// How a serving thread ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Stopped or failed: everything closed.
    Stopped,
    /// Let go to a successor: nothing closed.
    LetGo,
}

/// The vhost crate's listener as a borrowed fd.
fn listener_fd(listener: &Listener) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the listener owns the fd and outlives the borrow.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) }
}

/// Takes a pending suspend request, if any.
fn suspend_request(shared: &ServerControl) -> Option<SuspendRequest> {
    shared.suspend.lock().ok().and_then(|mut s| s.take())
}

/// Waits for the owner's verdict on a suspend (resume when it never comes).
fn await_verdict(name: &str, request: &SuspendRequest) -> SuspendOutcome {
    match request.verdict.recv_timeout(VERDICT_DEADLINE) {
        Ok(v) => v,
        Err(_) => {
            tracing::warn!(
                "{name}: no word on the hand-over within {VERDICT_DEADLINE:?}; serving again"
            );
            SuspendOutcome::Resume
        }
    }
}

fn serve_loop(
    name: &str,
    listener: Listener,
    resumed: Option<Served>,
    config: &Arc<DeviceConfig>,
    shared: &ServerControl,
) -> Ended {
    // The connection to serve next, and whether it has spoken already (taken over: no
    // first-message deadline).
    let mut next: Option<(Served, bool)> = resumed.map(|s| (s, true));
    loop {
        if let Some((served, spoke)) = next.take() {
            shared.connected.store(true, Ordering::Relaxed);
            let ended = serve_connection(name, served, spoke, &listener, shared);
            shared.connected.store(false, Ordering::Relaxed);
            if ended == Ended::LetGo {
                // The socket file and the listening socket are the successor's.
                std::mem::forget(listener);
                return Ended::LetGo;
            }
            if shared.stopping.load(Ordering::Acquire) {
                return Ended::Stopped;
            }
        }
        let (readable, stop) = wait_or_stop(listener.as_raw_fd(), &shared.stop, None);
        if shared.stopping.load(Ordering::Acquire) {
            return Ended::Stopped;
        }
        if stop {
            let _ = shared.stop.read();
            if let Some(request) = suspend_request(shared) {
                let reply = {
                    let mut fds = Fds::default();
                    fds.add(&listener_fd(&listener)).map(|index| {
                        (
                            ServerState {
                                listener: index,
                                connection: None,
                                kept: None,
                            },
                            fds,
                        )
                    })
                };
                let _ = request.reply.send(reply);
                if await_verdict(name, &request) == SuspendOutcome::LetGo {
                    std::mem::forget(listener);
                    return Ended::LetGo;
                }
            }
            continue;
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
        let kept = match &config.fd_store {
            Some(device_store) => match StoredConnection::start(device_store, &stream) {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::error!(
                        "{name}: this connection will not outlive a crash: {}",
                        crate::error_chain(&e)
                    );
                    None
                }
            },
            None => None,
        };
        let connection = Arc::new(Mutex::new(Connection::new(config.clone())));
        let handler = BackendReqHandler::from_stream(stream, connection.clone());
        next = Some((
            Served {
                connection,
                handler,
                kept,
            },
            false,
        ));
    }
}

/// Serves one frontend until it goes away, breaks a deadline, or the server stops or lets
/// it go to a successor. `spoke`: the frontend has sent messages already (a connection taken
/// over), so the first-message deadline does not apply.
fn serve_connection(
    name: &str,
    served: Served,
    mut spoke: bool,
    listener: &Listener,
    shared: &ServerControl,
) -> Ended {
    let Served {
        connection,
        mut handler,
        mut kept,
    } = served;
    let stream = match handler.try_clone_connection() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("{name}: the connection's socket: {e}; closing it");
            return Ended::Stopped;
        }
    };
    let fd = stream.as_raw_fd();
    {
        let c = connection.lock().unwrap_or_else(|e| e.into_inner());
        // A connection taken over may have a channel already.
        shared.set_channel(c.backend_channel());
        if let Some(k) = &mut kept {
            k.commit(&c, &stream);
        }
    }
    let connected_at = Instant::now();
    let mut stopped = false;
    loop {
        // A queue found its storage held by another user (at the last message, or when a
        // resumed connection's queues started): closed, so that the frontend comes back.
        let busy = connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_storage_busy();
        if let Some(why) = busy {
            tracing::warn!("{name}: closing the connection: a queue cannot start: {why}");
            break;
        }
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
        if shared.stopping.load(Ordering::Acquire) {
            stopped = true;
            break;
        }
        if stop {
            let _ = shared.stop.read();
            if let Some(request) = suspend_request(shared) {
                if suspend_connection(
                    name,
                    &connection,
                    &stream,
                    listener,
                    kept.as_ref(),
                    &request,
                ) == SuspendOutcome::LetGo
                {
                    // Config changes are the successor's to tell now.
                    shared.set_channel(None);
                    // The successor holds the connection, its memory, its queues and its
                    // place in the fd store now.
                    std::mem::forget(handler);
                    std::mem::forget(connection);
                    std::mem::forget(kept);
                    return Ended::LetGo;
                }
            }
            continue;
        }
        if !readable {
            continue;
        }
        spoke = true;
        let header = match message_ready(fd) {
            Ok(header) => header,
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
        };
        if let Some(k) = &kept {
            k.begin();
        }
        #[cfg(feature = "test-faults")]
        crate::faults::die_in_message_for_tests();
        // Requests the vhost crate does not dispatch, or would keep out of our reach.
        let ours = header
            .map(|h| (u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")), h))
            .filter(|(r, _)| [SET_STATUS, GET_STATUS, SET_BACKEND_REQ_FD].contains(r));
        if let Some((request, header)) = ours {
            let answered = if request == SET_BACKEND_REQ_FD {
                answer_backend_req_fd(fd, &header, &connection).inspect(|()| {
                    shared.set_channel(
                        connection
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .backend_channel(),
                    )
                })
            } else {
                answer_status(fd, &header, &connection)
            };
            if let Err(why) = answered {
                tracing::warn!("{name}: closing the connection: {why}");
                break;
            }
        } else if let Err(e) = handler.handle_request() {
            match e {
                vhost::vhost_user::Error::Disconnected => {
                    tracing::info!("{name}: frontend disconnected")
                }
                other => tracing::warn!("{name}: closing the connection: {other}"),
            }
            break;
        }
        if let Some(k) = &mut kept {
            k.commit(
                &connection.lock().unwrap_or_else(|e| e.into_inner()),
                &stream,
            );
        }
    }
    shared.set_channel(None);
    if let Some(k) = kept {
        // Closed on purpose or by the frontend: nothing of it is to be resumed.
        k.end();
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
    Ended::Stopped
}

/// Suspends a connection for its owner's hand-over and waits for the verdict; a suspend that
/// fails, or a hand-over called off, restarts the queues.
fn suspend_connection(
    name: &str,
    connection: &Mutex<Connection>,
    stream: &UnixStream,
    listener: &Listener,
    kept: Option<&StoredConnection>,
    request: &SuspendRequest,
) -> SuspendOutcome {
    let mut c = connection.lock().unwrap_or_else(|e| e.into_inner());
    let mut fds = Fds::default();
    let state = c.suspend(stream, &mut fds).and_then(|connection| {
        Ok(ServerState {
            listener: fds.add(&listener_fd(listener))?,
            connection: Some(connection),
            kept: kept.map(|k| k.state(&mut fds)).transpose()?,
        })
    });
    let failed = state.is_err();
    let _ = request.reply.send(state.map(|s| (s, fds)));
    let verdict = if failed {
        SuspendOutcome::Resume
    } else {
        await_verdict(name, request)
    };
    if verdict == SuspendOutcome::Resume {
        c.start_queues();
    }
    verdict
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
