//! The process's termination and reload signals, taken by one thread with `sigwait`
//! instead of handlers: blocked first in `main`, before any thread exists.

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and every thread it starts
/// afterwards. Call it first in `main`, before any thread exists, so that
/// [`wait_for_signal`] is the only place that receives them.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-set manipulation on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        // SIGHUP's default action ends the process: a daemon's SIGHUP means "reload".
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for SIGTERM, SIGINT or SIGHUP (blocked first by [`block_signals`]); returns the
/// signal.
pub fn wait_for_signal() -> i32 {
    let set = block_signals();
    let mut sig: libc::c_int = 0;
    // SAFETY: waits for one of the blocked signals; both pointers are locals.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

/// Waits for SIGTERM or SIGINT; a SIGHUP meanwhile has nothing to reload here and is logged.
pub fn wait_for_termination() -> i32 {
    loop {
        match wait_for_signal() {
            libc::SIGHUP => tracing::info!("SIGHUP: nothing to reload"),
            sig => return sig,
        }
    }
}
