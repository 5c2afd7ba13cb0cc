//! `vfblk-keeper`: what systemd's file-descriptor store does, for hosts without systemd (or
//! with a unit that cannot use it). It starts the target with `$NOTIFY_SOCKET` pointing at
//! itself, holds every fd the target stores there (`FDSTORE=1`, `FDNAME=`), and when the
//! target dies without being asked to, starts it again at once with those fds
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`), so that no vhost-user connection ever closes.
//!
//! Its contract, so that it cannot become the weak point: it never reads or writes a
//! vhost-user socket, never maps guest memory or a record, never interprets a stored fd; it
//! only holds fds, names them, hands them back, follows `MAINPID=` (an upgraded target is
//! its grandchild, adopted as a subreaper), forwards SIGTERM/SIGINT/SIGHUP, and ends when the
//! target ends cleanly (and left no successor running: see `await_successor`). It has no state a restart of its own would need: if the keeper dies, the target lives on and the frontends
//! keep their connections; only the next crash then costs a reconnect.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How long a target asked to stop may take before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
/// Deaths before READY=1 within this window count as a crash loop (a target killed after it
/// served is started again at once, however often: that is what the keeper is for).
const LOOP_WINDOW: Duration = Duration::from_secs(10);
/// Deaths before READY=1 in the window after which restarts wait [`LOOP_BACKOFF`].
const LOOP_CRASHES: usize = 5;
/// Delay between restarts of a target that keeps crashing.
const LOOP_BACKOFF: Duration = Duration::from_millis(500);
/// First fd number of `LISTEN_FDS`.
const LISTEN_FDS_START: RawFd = 3;
/// Most fds held (systemd's FileDescriptorStoreMax= has the same role).
const MAX_STORED: usize = 8192;
/// How long a target aborted by the watchdog may take to die before it is killed.
const ABORT_DEADLINE: Duration = Duration::from_secs(5);
/// How long a clean exit of the main process that left a process running (an upgrade's new
/// process, adopted) waits for it to say `MAINPID=` before the keeper ends.
const SUCCESSOR_DEADLINE: Duration = Duration::from_secs(5);

/// What to keep.
#[derive(Debug, Clone)]
pub struct KeeperOptions {
    /// The target's command line.
    pub command: Vec<OsString>,
    /// A private directory for the notify socket (created, mode 0700).
    pub dir: PathBuf,
    /// systemd's `WatchdogSec=`: the target is told (`WATCHDOG_USEC`) and, once ready, must
    /// send `WATCHDOG=1` within every period, or it is aborted (SIGABRT, then SIGKILL) and
    /// started again.
    pub watchdog: Option<Duration>,
}

/// The keeper's summary when it ends.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KeeperReport {
    /// Times the target was started again after dying.
    pub restarts: u64,
    /// Exit code the target last ended with (None: killed by a signal).
    pub exit_code: Option<i32>,
    /// Of the restarts, those after the watchdog aborted a target that stopped pinging.
    pub watchdog_aborts: u64,
}

struct Keeper {
    notify: UnixDatagram,
    path: PathBuf,
    command: Vec<OsString>,
    /// Stored fds in the order they came, by name.
    stored: Vec<(String, OwnedFd)>,
    main_pid: Option<i32>,
    /// The main process said READY=1 since it was started.
    ready: bool,
    /// Deaths before READY=1, for the crash-loop backoff.
    crashes: Vec<Instant>,
    report: KeeperReport,
    watchdog: Option<Duration>,
    /// When the main process must next say WATCHDOG=1 (from READY=1 on).
    watchdog_due: Option<Instant>,
    /// A main process the watchdog aborted, and when.
    aborted: Option<(i32, Instant)>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Runs `options.command` under the keeper until it ends cleanly (or the keeper is told
/// to stop). Call before any other thread exists: SIGCHLD, SIGTERM, SIGINT and SIGHUP are
/// taken.
pub fn run(options: &KeeperOptions) -> Result<KeeperReport> {
    if options.command.is_empty() {
        return Err(Error::BadArgument("no command to keep".into()));
    }
    // SAFETY: PR_SET_CHILD_SUBREAPER only changes who adopts orphaned descendants: an
    // upgraded target is the old target's child and becomes ours when the old one exits.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io("becoming a subreaper")(std::io::Error::last_os_error()));
    }
    std::fs::create_dir_all(&options.dir)
        .map_err(io(format!("creating {}", options.dir.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&options.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("making {} private", options.dir.display())))?;
    let path = options.dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let notify = UnixDatagram::bind(&path).map_err(io(format!("binding {}", path.display())))?;
    notify
        .set_nonblocking(true)
        .map_err(io("a non-blocking notify socket"))?;
    let signals = SignalFd::new()?;
    let mut keeper = Keeper {
        notify,
        path,
        command: options.command.clone(),
        stored: Vec::new(),
        main_pid: None,
        ready: false,
        crashes: Vec::new(),
        report: KeeperReport::default(),
        watchdog: options.watchdog,
        watchdog_due: None,
        aborted: None,
    };
    keeper.start()?;
    let result = keeper.serve(&signals);
    let _ = std::fs::remove_file(&keeper.path);
    result
}

impl Keeper {
    /// Starts the target with the stored fds.
    fn start(&mut self) -> Result<()> {
        let count = self.stored.len();
        // Duplicates above the range they will be moved to in the child, so that moving
        // one never overwrites another.
        let floor = LISTEN_FDS_START + count as RawFd;
        let mut high = Vec::with_capacity(count);
        for (_, fd) in &self.stored {
            // SAFETY: F_DUPFD_CLOEXEC duplicates an fd we own to the lowest free number
            // at or above `floor`; the result is owned below.
            let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
            if dup < 0 {
                return Err(io("duplicating a stored fd")(
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: a fresh fd nobody else owns.
            high.push(unsafe { OwnedFd::from_raw_fd(dup) });
        }
        let names: Vec<&str> = self.stored.iter().map(|(n, _)| n.as_str()).collect();
        let mut command = Command::new(&self.command[0]);
        command
            .args(&self.command[1..])
            .env("NOTIFY_SOCKET", &self.path)
            .env("VFBLK_FD_STORE", "1")
            .env_remove("LISTEN_PID")
            .env_remove("WATCHDOG_PID");
        match self.watchdog {
            Some(period) => command.env("WATCHDOG_USEC", period.as_micros().to_string()),
            None => command.env_remove("WATCHDOG_USEC"),
        };
        if count > 0 {
            command
                .env("LISTEN_FDS", count.to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        } else {
            command
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_FDNAMES");
        }
        let raw: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only dup2 runs (async-signal-safe); dup2 clears
        // close-on-exec on the copies at 3, 4, ...
        unsafe {
            command.pre_exec(move || {
                for (i, &fd) in raw.iter().enumerate() {
                    if libc::dup2(fd, LISTEN_FDS_START + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(io(format!("starting {:?}", self.command[0])))?;
        tracing::info!(
            "started {:?} (pid {}) with {count} stored fd(s)",
            self.command[0],
            child.id()
        );
        // Reaped through waitpid like any adopted descendant; dropping the handle neither
        // waits nor kills.
        self.main_pid = Some(child.id() as i32);
        self.ready = false;
        self.watchdog_due = None;
        drop(child);
        Ok(())
    }

    fn serve(&mut self, signals: &SignalFd) -> Result<KeeperReport> {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.notify.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: signals.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // Every event the keeper acts on is a message or a signal, but for the watchdog's
            // deadlines.
            let timeout = self.next_deadline().map_or(-1, |t| {
                t.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(60_000) as i32
            });
            // SAFETY: two valid pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if n < 0 {
                continue;
            }
            self.enforce_watchdog();
            // Messages first: a new MAINPID must be known before the old main process's
            // exit is looked at.
            self.read_messages();
            if fds[1].revents != 0 {
                for signal in signals.read() {
                    match signal {
                        libc::SIGCHLD => {
                            self.read_messages();
                            if let Some(report) = self.reap()? {
                                return Ok(report);
                            }
                        }
                        libc::SIGTERM | libc::SIGINT => return Ok(self.stop(signal)),
                        // A reload is the target's to do (systemd sends it to the main
                        // process the same way).
                        libc::SIGHUP => {
                            if let Some(pid) = self.main_pid {
                                // SAFETY: forwards a signal to the process we run.
                                unsafe { libc::kill(pid, libc::SIGHUP) };
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn read_messages(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            let received =
                vfblk_vhost::handover::recv_with_fds(self.notify.as_raw_fd(), &mut buf, 253);
            let (n, fds) = match received {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("notify socket: {e}");
                    return;
                }
            };
            self.message(&String::from_utf8_lossy(&buf[..n]), fds);
        }
    }

    /// One notify message (systemd's format: `KEY=VALUE` lines).
    fn message(&mut self, text: &str, fds: Vec<OwnedFd>) {
        tracing::debug!("notify: {text:?} with {} fd(s)", fds.len());
        let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let name = fields.get("FDNAME").copied().unwrap_or("stored");
        if fields.get("FDSTOREREMOVE") == Some(&"1") {
            self.stored.retain(|(n, _)| n != name);
        }
        if fields.get("FDSTORE") == Some(&"1") {
            for fd in fds {
                if self.stored.len() >= MAX_STORED {
                    tracing::warn!("{MAX_STORED} fds stored already; {name} dropped");
                    break;
                }
                // As systemd does: an open file description is kept once, under the name it
                // was first stored with.
                if let Some((first, _)) = self.stored.iter().find(|(_, held)| {
                    vfblk_vhost::stored_connection::same_description(held.as_fd(), fd.as_fd())
                }) {
                    tracing::debug!("{name}: the same fd as {first}, not stored again");
                    continue;
                }
                self.stored.push((name.to_string(), fd));
            }
        }
        if let Some(pid) = fields.get("MAINPID").and_then(|p| p.parse::<i32>().ok()) {
            if Some(pid) != self.main_pid {
                tracing::info!("main process is now pid {pid}");
                self.main_pid = Some(pid);
            }
        }
        let ping = fields.get("WATCHDOG") == Some(&"1");
        if fields.get("READY") == Some(&"1") {
            self.ready = true;
        }
        if let (Some(period), true) = (self.watchdog, ping || fields.get("READY") == Some(&"1")) {
            self.watchdog_due = Some(Instant::now() + period);
        }
        if let Some(status) = fields.get("STATUS") {
            tracing::info!("target status: {status}");
        }
    }

    /// The next time the keeper must act without a message or signal.
    fn next_deadline(&self) -> Option<Instant> {
        match self.aborted {
            Some((_, at)) => Some(at + ABORT_DEADLINE),
            None => self.watchdog_due,
        }
    }

    /// A ready target that let its watchdog period pass without WATCHDOG=1 is aborted
    /// (SIGABRT, as systemd does); one that does not die of it within [`ABORT_DEADLINE`] is
    /// killed. Its death then restarts it like any other.
    fn enforce_watchdog(&mut self) {
        let now = Instant::now();
        if let Some((pid, at)) = self.aborted {
            if now >= at + ABORT_DEADLINE {
                tracing::error!(
                    "watchdog: pid {pid} still alive {ABORT_DEADLINE:?} after SIGABRT; killing it"
                );
                // SAFETY: a signal to the process we run.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                self.aborted = Some((pid, now));
            }
            return;
        }
        let (Some(due), Some(pid)) = (self.watchdog_due, self.main_pid) else {
            return;
        };
        if now < due {
            return;
        }
        tracing::error!(
            "watchdog: no WATCHDOG=1 from pid {pid} within {:?}; aborting it (SIGABRT) to start it again",
            self.watchdog.unwrap_or_default()
        );
        // SAFETY: a signal to the process we run.
        unsafe { libc::kill(pid, libc::SIGABRT) };
        self.aborted = Some((pid, now));
        self.watchdog_due = None;
        self.report.watchdog_aborts += 1;
    }

    /// Reaps every ended descendant; restarts the target if the main one died uncleanly.
    /// Some(report) when the keeper is done.
    fn reap(&mut self) -> Result<Option<KeeperReport>> {
        loop {
            let mut status = 0;
            // SAFETY: waitpid on any child, not blocking.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return Ok(None);
            }
            if Some(pid) != self.main_pid {
                continue;
            }
            // The messages read before waitpid may predate a MAINPID= the successor sent
            // before this pid exited (the hand-over's order): read them again now.
            self.read_messages();
            if Some(pid) != self.main_pid {
                continue;
            }
            self.aborted = None;
            let exited = libc::WIFEXITED(status);
            let code = exited.then(|| libc::WEXITSTATUS(status));
            self.report.exit_code = code;
            if code == Some(0) {
                if self.await_successor(pid) {
                    continue;
                }
                tracing::info!("the target (pid {pid}) ended cleanly; so does the keeper");
                return Ok(Some(self.report.clone()));
            }
            let how = match code {
                Some(c) => format!("exited with {c}"),
                None => format!("was killed by signal {}", libc::WTERMSIG(status)),
            };
            let now = Instant::now();
            self.crashes
                .retain(|t| now.duration_since(*t) < LOOP_WINDOW);
            if !self.ready {
                self.crashes.push(now);
            }
            if self.crashes.len() > LOOP_CRASHES {
                tracing::warn!(
                    "the target (pid {pid}) {how}: {} failed starts within {LOOP_WINDOW:?}, waiting {LOOP_BACKOFF:?}",
                    self.crashes.len()
                );
                std::thread::sleep(LOOP_BACKOFF);
            } else {
                tracing::warn!(
                    "the target (pid {pid}) {how}; starting it again with {} stored fd(s)",
                    self.stored.len()
                );
            }
            self.report.restarts += 1;
            self.start()?;
        }
    }

    /// After main process `pid` exited 0: a target it left running (now the keeper's, as
    /// subreaper) is its successor whose MAINPID= is late or was lost, and must not be left
    /// unsupervised by ending. Waits up to [`SUCCESSOR_DEADLINE`] for it to name itself,
    /// then follows the only one left if none did; true when the keeper follows one. With
    /// none left running (a real stop) it returns false at once.
    fn await_successor(&mut self, pid: i32) -> bool {
        let targets = |path: &std::path::Path| -> Vec<i32> {
            live_children()
                .into_iter()
                .filter(|&p| notifies(p, path))
                .collect()
        };
        let mut running = targets(&self.path);
        if running.is_empty() {
            return false;
        }
        tracing::warn!(
            "the target (pid {pid}) ended cleanly leaving target pid(s) {running:?} running; waiting up to {SUCCESSOR_DEADLINE:?} for MAINPID="
        );
        let deadline = Instant::now() + SUCCESSOR_DEADLINE;
        loop {
            if let Some(new) = self.main_pid.filter(|&m| m != pid && is_alive(m)) {
                tracing::info!("pid {new} named itself after pid {pid} exited; following it");
                return true;
            }
            running = targets(&self.path);
            let left = deadline.saturating_duration_since(Instant::now());
            if running.is_empty() {
                tracing::info!("what pid {pid} left running ended too");
                return false;
            }
            if left.is_zero() {
                if let [only] = running[..] {
                    tracing::warn!(
                        "main process is now pid {only}: no MAINPID= within {SUCCESSOR_DEADLINE:?}, but it is the only target pid {pid} left running"
                    );
                    self.main_pid = Some(only);
                    return true;
                }
                tracing::error!(
                    "no MAINPID= within {SUCCESSOR_DEADLINE:?} of pid {pid}'s exit and several targets running ({running:?}); ending, leaving them unsupervised"
                );
                return false;
            }
            let mut fd = libc::pollfd {
                fd: self.notify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut fd, 1, left.as_millis().clamp(1, 50) as i32) };
            self.read_messages();
        }
    }

    /// Forwards `signal` to the target and waits (bounded) for it to end.
    fn stop(&mut self, signal: i32) -> KeeperReport {
        if let Some(pid) = self.main_pid {
            // SAFETY: forwards a signal to the process we run.
            unsafe { libc::kill(pid, signal) };
            let deadline = Instant::now() + STOP_DEADLINE;
            loop {
                // A target that stops tells the store what to drop, one datagram per fd: left
                // unread, the socket's queue fills and each of its sends waits out its
                // deadline, until the stop itself runs past ours.
                self.read_messages();
                let mut status = 0;
                // SAFETY: waitpid on any child, not blocking.
                let reaped = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if reaped == pid {
                    self.report.exit_code =
                        libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
                    break;
                }
                if reaped < 0 {
                    break;
                }
                if Instant::now() > deadline {
                    tracing::error!("the target did not stop within {STOP_DEADLINE:?}; killing it");
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.report.clone()
    }
}

/// SIGCHLD, SIGTERM, SIGINT and SIGHUP as readable events.
struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    fn new() -> Result<SignalFd> {
        // SAFETY: signal-set manipulation on a local set; the signals are blocked in this
        // (only) thread first so that they queue for the signalfd.
        let fd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(io("signalfd")(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd { fd })
    }

    /// The signals that arrived.
    fn read(&self) -> Vec<i32> {
        let mut out = Vec::new();
        loop {
            // SAFETY: an all-zero siginfo is valid to read into.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads one siginfo into a local of that size.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if n != size as isize {
                return out;
            }
            out.push(info.ssi_signo as i32);
        }
    }
}

/// The keeper's children that are running (not zombies): those it started and the
/// descendants it adopted as subreaper.
fn live_children() -> Vec<i32> {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&pid| {
            stat(pid).is_some_and(|(state, ppid)| ppid == me && !matches!(state, 'Z' | 'X'))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether `pid`'s environment points `NOTIFY_SOCKET` at `path`: a target meant to be kept
/// by this keeper (an upgrade's new process inherits it from the old one).
fn notifies(pid: i32, path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = [b"NOTIFY_SOCKET=", path.as_os_str().as_bytes()].concat();
    environ.split(|&b| b == 0).any(|v| v == wanted.as_slice())
}

/// Whether `pid` runs (exists and is not a zombie).
fn is_alive(pid: i32) -> bool {
    stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

/// A process's state letter and parent, from /proc/PID/stat.
fn stat(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields follow the last ')'.
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The default private directory for the notify socket.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("RUNTIME_DIRECTORY")
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR"))
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("vfblk-keeper-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_file_description_is_stored_once_as_systemd_stores_it() {
        let (notify, _peer) = UnixDatagram::pair().unwrap();
        let mut keeper = Keeper {
            notify,
            path: PathBuf::new(),
            command: Vec::new(),
            stored: Vec::new(),
            main_pid: None,
            ready: false,
            crashes: Vec::new(),
            report: KeeperReport::default(),
            watchdog: None,
            watchdog_due: None,
            aborted: None,
        };
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        keeper.message("FDSTORE=1\nFDNAME=first", vec![fd.try_clone().unwrap()]);
        keeper.message("FDSTORE=1\nFDNAME=again", vec![fd.try_clone().unwrap()]);
        // Another open of the same file is another description, stored.
        let other: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        keeper.message("FDSTORE=1\nFDNAME=other", vec![other]);
        let names: Vec<&str> = keeper.stored.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["first", "other"]);
    }
}
