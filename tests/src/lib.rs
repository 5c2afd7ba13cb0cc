//! System tests; the test files are in `tests/tests/`. The helpers they share live here, once:
//! the project's binaries, starting a bridge and waiting for it, serialising lab runs, and
//! showing the lab's progress.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, MutexGuard, Once};

/// Lab VMs and kill-and-restart runs are serialised: on a 2-core machine they only slow each
/// other down, blur the timings the tests print, and stretch the windows the recovery tests
/// depend on. Also turns the lab's progress log on.
pub fn lab_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    init_logging();
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shows the lab's progress (`tracing` events) on the test's output, once per test binary.
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .try_init();
    });
}

/// A release binary of the project, built on first use.
pub fn bin(name: &str) -> PathBuf {
    vfblk_lab::project_bin_dir()
        .expect("building the project's binaries")
        .join(name)
}

/// Starts `vfblk-bridge` on `socket` with `args` (its stderr appended to `log`) and waits
/// until it listens.
pub fn start_bridge(socket: &Path, args: &[&str], log: &Path) -> Child {
    let bin_dir = vfblk_lab::project_bin_dir().expect("building the project's binaries");
    vfblk_lab::process::start_bridge(&bin_dir, socket, args, log)
        .unwrap_or_else(|e| panic!("starting vfblk-bridge: {e}"))
}
