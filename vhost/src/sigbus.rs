//! Containing a peer that shrinks a shared file under our mapping.
//!
//! Guest memory and the inflight region are files a frontend hands over; if it truncates one
//! after we mapped it, our next touch of the lost pages raises SIGBUS, which by default kills
//! the whole process and every other frontend's service with it. Where the file is a memfd
//! that allows sealing we seal it against shrinking ([`seal_against_shrinking`]) and this
//! cannot happen. Where it cannot be sealed (a memfd made without MFD_ALLOW_SEALING, a shm or
//! hugetlbfs file), the mapping is registered here: a SIGBUS inside it is answered by mapping
//! anonymous memory over the lost page (the faulting access then completes on garbage), and
//! the mapping is marked poisoned so its queues stop before anything done on that memory is
//! reported to the guest. A SIGBUS anywhere else keeps its default action.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings that can be registered at once (guest regions and inflight regions of every
/// connection); beyond that a mapping is served uncontained, with a warning.
const SLOTS: usize = 1024;
/// A slot being filled or emptied.
const BUSY: usize = usize::MAX;

static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static ENDS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static POISONED: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
static INSTALL: Once = Once::new();

/// A registered mapping; unregistered on drop (before the mapping goes).
#[derive(Debug)]
pub struct Contained {
    slot: usize,
}

impl Contained {
    /// Whether a page of the mapping was lost (the peer shrank the file).
    #[inline]
    pub fn poisoned(&self) -> bool {
        POISONED[self.slot].load(Ordering::Acquire)
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        STARTS[self.slot].store(BUSY, Ordering::Release);
        ENDS[self.slot].store(0, Ordering::Release);
        POISONED[self.slot].store(false, Ordering::Release);
        STARTS[self.slot].store(0, Ordering::Release);
    }
}

/// Registers `len` bytes at `start` for containment. `None` when the registry is full.
pub fn register(start: *mut u8, len: usize) -> Option<Contained> {
    INSTALL.call_once(install_handler);
    for slot in 0..SLOTS {
        if STARTS[slot]
            .compare_exchange(0, BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            POISONED[slot].store(false, Ordering::Release);
            ENDS[slot].store(start as usize + len, Ordering::Release);
            STARTS[slot].store(start as usize, Ordering::Release);
            return Some(Contained { slot });
        }
    }
    tracing::warn!("SIGBUS containment registry full: a mapping is served uncontained");
    None
}

/// Adds F_SEAL_SHRINK to a memfd that allows sealing, so the peer can no longer shrink it.
/// Returns whether the file is now sealed against shrinking.
pub fn seal_against_shrinking(file: &File) -> bool {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on our fd with integer arguments only.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
        return true;
    }
    // SAFETY: as above; fails harmlessly (EPERM, EINVAL) where sealing is not allowed.
    unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) == 0 }
}

fn install_handler() {
    // SAFETY: a zeroed sigaction is a valid starting value; the handler is an extern "C" fn
    // of the SA_SIGINFO shape; the mask is emptied before use.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            tracing::warn!(
                "installing the SIGBUS handler failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Maps anonymous memory over the page holding `addr`: 4 KiB, or 2 MiB inside a hugetlb
/// mapping (where a smaller fixed mapping is refused).
fn replace_page(addr: usize) -> bool {
    for page in [4096usize, 2 << 20] {
        let start = addr & !(page - 1);
        // SAFETY: MAP_FIXED over a page of a mapping we own (registered); the kernel swaps
        // the lost page for zeroed anonymous memory. mmap is a plain system call here.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return true;
        }
    }
    false
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only atomics and system calls here: this runs in a signal handler.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in 0..SLOTS {
        let start = STARTS[slot].load(Ordering::Acquire);
        if start == 0 || start == BUSY {
            continue;
        }
        let end = ENDS[slot].load(Ordering::Acquire);
        if (start..end).contains(&addr) && replace_page(addr) {
            POISONED[slot].store(true, Ordering::Release);
            return;
        }
    }
    // Not ours: the default action, at the same instruction once we return.
    // SAFETY: resetting a signal disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}
