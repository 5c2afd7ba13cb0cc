//! Serving a device on a unix socket: accept a frontend, handle its messages until it goes
//! away, stop its queues, and accept the next one with fresh state. SIGTERM drains what is in
//! flight (bounded) and makes [`serve`] return, so the binary exits cleanly.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Listener};

use crate::protocol::{Connection, DeviceConfig};
use crate::{Error, Result};

/// What the signal thread shares with the serving loop.
struct Shared {
    /// The connection being served and its socket (taken out before the socket closes).
    current: Mutex<Option<(Arc<Mutex<Connection>>, RawFd)>>,
    /// A signal arrived: finish instead of accepting again.
    stopping: AtomicBool,
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts afterwards.
/// Call it first in `main`, before any thread exists, so that [`serve`]'s signal thread is the
/// only one that receives them.
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

/// Handles SIGTERM and SIGINT on a dedicated thread: drain the current connection (complete
/// and publish what is in flight, bounded), then shut the sockets down so that [`serve`]
/// returns.
fn handle_signals(shared: Arc<Shared>, listener: RawFd) {
    let set = block_signals();
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: waits for one of the blocked signals; both pointers are locals.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!("signal {sig}: completing requests in flight, then exiting");
        shared.stopping.store(true, Ordering::Release);
        // A poisoned lock still holds the connection: draining it is the best left to do.
        let current = shared.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((connection, stream)) = current.as_ref() {
            connection.lock().unwrap_or_else(|e| e.into_inner()).drain();
            // SAFETY: the stream is open while it is in `current` (the serving loop takes it
            // out under this lock before closing it); shutdown only ends its traffic.
            unsafe { libc::shutdown(*stream, libc::SHUT_RDWR) };
        }
        drop(current);
        // SAFETY: the listener lives until `serve` returns, which needs this shutdown first.
        unsafe { libc::shutdown(listener, libc::SHUT_RDWR) };
    });
}

/// Listens on `path` and serves one frontend at a time until SIGTERM or SIGINT, which drain
/// what is in flight and return `Ok`.
pub fn serve(path: &Path, config: Arc<DeviceConfig>, on_ready: impl FnOnce()) -> Result<()> {
    let listener = Listener::new(path, true).map_err(|source| Error::Transport {
        what: format!("listening on {}", path.display()),
        source,
    })?;
    let shared = Arc::new(Shared {
        current: Mutex::new(None),
        stopping: AtomicBool::new(false),
    });
    handle_signals(shared.clone(), listener.as_raw_fd());
    on_ready();
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        let stream = match accepted {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(source) => {
                return Err(Error::Transport {
                    what: format!("accept on {}", path.display()),
                    source,
                })
            }
        };
        let connection = Arc::new(Mutex::new(Connection::new(config.clone())));
        let stream_fd = stream.as_raw_fd();
        *shared
            .current
            .lock()
            .map_err(|_| Error::Poisoned("current connection"))? =
            Some((connection.clone(), stream_fd));
        let mut handler = BackendReqHandler::from_stream(stream, connection.clone());
        loop {
            if let Err(e) = handler.handle_request() {
                match e {
                    _ if shared.stopping.load(Ordering::Acquire) => {}
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage => {
                        tracing::info!("frontend disconnected")
                    }
                    other => tracing::warn!("closing the connection: {other}"),
                }
                break;
            }
        }
        // Out of `current` before the socket closes (the signal thread shuts it down).
        shared
            .current
            .lock()
            .map_err(|_| Error::Poisoned("current connection"))?
            .take();
        {
            let mut connection = connection
                .lock()
                .map_err(|_| Error::Poisoned("connection"))?;
            connection.disconnect();
            // Guest RAM the device mapped for DMA (and pinned) goes with the frontend.
            connection.release_memory();
        }
        drop(handler);
        if shared.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
    }
}
