//! Serving the device on a unix socket: accept a frontend, handle its messages until it goes
//! away, stop its queues, and accept the next one with fresh state. SIGTERM drains what is in
//! flight (bounded) and exits cleanly.

use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Listener};

use crate::device::{BlkDevice, DeviceConfig};
use crate::{Error, Result};

type Current = Arc<Mutex<Option<Arc<Mutex<BlkDevice>>>>>;

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

/// Handles SIGTERM and SIGINT on a dedicated thread: drain the current device (complete and
/// publish what is in flight, bounded), then exit 0.
fn handle_signals(current: Current) {
    let set = block_signals();
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: waits for one of the blocked signals.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("vfblk-bridge: signal {sig}: completing requests in flight, then exiting");
        let device = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(device) = device {
            device.lock().unwrap_or_else(|e| e.into_inner()).drain();
        }
        std::process::exit(0);
    });
}

/// Listens on `path` and serves one frontend at a time, forever (until a signal).
pub fn serve(path: &Path, config: Arc<DeviceConfig>, on_ready: impl FnOnce()) -> Result<()> {
    let current: Current = Arc::new(Mutex::new(None));
    handle_signals(current.clone());
    let listener = Listener::new(path, true)
        .map_err(|e| Error::Protocol(format!("listening on {}: {e}", path.display())))?;
    on_ready();
    loop {
        let stream = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                return Err(Error::Protocol(format!(
                    "accept on {}: {e}",
                    path.display()
                )))
            }
        };
        let device = Arc::new(Mutex::new(BlkDevice::new(config.clone())));
        *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(device.clone());
        let mut handler = BackendReqHandler::from_stream(stream, device.clone());
        loop {
            if let Err(e) = handler.handle_request() {
                match e {
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage => {
                        eprintln!("vfblk-bridge: frontend disconnected")
                    }
                    other => eprintln!("vfblk-bridge: closing the connection: {other}"),
                }
                break;
            }
        }
        device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .disconnect();
        *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
