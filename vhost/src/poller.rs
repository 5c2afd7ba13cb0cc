//! Poller threads. Each owns some virtqueues (of one or several devices) and runs them without
//! locks: avail ring → chain → inflight record → the device's queue handler → completion →
//! used ring.
//! The protocol thread talks to a poller only through its mailbox, which the poller checks
//! with one atomic load per loop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::device::{QueueHandler, Wakeup};
use crate::guest_errors::GuestErrors;
use crate::inflight::InflightMap;
use crate::memory::GuestMemory;
use crate::ring::{QueueRing, RingInflight, RingLog, RingQueue};
use vmm_sys_util::eventfd::EventFd;

/// Everything a poller needs to run one virtqueue.
pub struct QueueStart {
    /// The connection the queue belongs to (pollers are shared by many).
    pub owner: u64,
    /// Device-wide queue index.
    pub index: u16,
    /// Guest memory (kept mapped while the queue runs).
    pub mem: Arc<GuestMemory>,
    /// The ring.
    pub vq: RingQueue,
    /// The queue's inflight region, if tracking is on.
    pub inflight: Option<(RingInflight, Arc<InflightMap>)>,
    /// The device's handler for this queue.
    pub handler: Box<dyn QueueHandler>,
    /// Call eventfd (interrupts to the guest).
    pub call: Option<File>,
    /// Kick eventfd (the guest's notifications).
    pub kick: Option<File>,
    /// Where guest errors are reported.
    pub errors: Arc<GuestErrors>,
    /// Heads to run again first, oldest first (from inflight recovery).
    pub resubmit: Vec<u16>,
    /// The dirty log, while a migration logs.
    pub log: Option<RingLog>,
}

/// A stopped queue's final state.
#[derive(Debug, Clone, Copy)]
pub struct QueueStopped {
    /// Queue index.
    pub index: u16,
    /// What GET_VRING_BASE returns: a split ring's next avail index, a packed ring's
    /// positions ([`crate::packed::PackedQueue::base`]).
    pub base: u32,
    /// Chains still in the handler when the drain deadline passed.
    pub abandoned: usize,
}

enum Command {
    Start(Box<QueueStart>),
    /// Stop queues (all when `index` is None), draining the backend first; publish what
    /// completes when `publish` is set.
    Stop {
        owner: u64,
        index: Option<u16>,
        publish: bool,
        reply: mpsc::Sender<QueueStopped>,
    },
    /// Replace a running queue's call eventfd.
    SetCall {
        owner: u64,
        index: u16,
        call: Option<File>,
    },
    /// Replace a running queue's kick eventfd.
    SetKick {
        owner: u64,
        index: u16,
        kick: Option<File>,
    },
    /// Start, move or stop a running queue's dirty logging; answered once it applies.
    SetLog {
        owner: u64,
        index: u16,
        log: Option<RingLog>,
        reply: mpsc::Sender<()>,
    },
    Exit,
}

struct Mailbox {
    pending: AtomicBool,
    commands: Mutex<Vec<Command>>,
    wake: EventFd,
    /// Nanoseconds spent in loops that found work (written by the poller only).
    busy_ns: AtomicU64,
    /// The longest time one batch of mailbox commands held the loop (control-plane work
    /// every other queue on the poller waits for).
    longest_commands_ns: AtomicU64,
    /// Loops run, published every [`HEARTBEAT_EVERY`] loops and after every sleep: a poller
    /// stuck anywhere (a backend call that never returns, a loop) stops it.
    heartbeat: AtomicU64,
}

/// Loops between publications of a poller's heartbeat.
const HEARTBEAT_EVERY: u64 = 256;

/// Tuning of the poll loop.
#[derive(Debug, Clone, Copy)]
pub struct PollMode {
    /// Empty loops before the poller re-enables kicks and sleeps; `None`: never sleep.
    pub idle_before_sleep: Option<Duration>,
}

/// A poller thread, shared by the queues of any number of connections.
pub struct Poller {
    /// Unique in the process.
    id: u64,
    name: String,
    mailbox: Arc<Mailbox>,
    /// Queues handed to it and not yet stopped (for least-loaded placement).
    load: AtomicUsize,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A call fd as the frontend gave it: an eventfd, usually non-blocking (QEMU) but maybe
/// blocking (libblkio), or anything else a hostile peer sends. The poller must never block
/// on it: a blocking fd is polled for room first, and a signal that finds no room is
/// dropped, which loses nothing: a full eventfd counter or pipe already wakes its reader.
struct CallFd {
    file: File,
    blocking: bool,
}

impl CallFd {
    fn new(file: File) -> Self {
        // SAFETY: F_GETFL on an fd we own; no pointers.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        Self {
            file,
            blocking: flags < 0 || flags & libc::O_NONBLOCK == 0,
        }
    }

    /// Interrupts the driver, without ever blocking.
    fn signal(&mut self) {
        let fd = self.file.as_raw_fd();
        if self.blocking {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd; zero timeout.
            let ready = unsafe { libc::poll(&mut p, 1, 0) };
            if ready != 1 || p.revents & libc::POLLOUT == 0 {
                return;
            }
        }
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a local; the fd is non-blocking or has room (above).
        // EAGAIN means the counter is full (the driver has an interrupt pending anyway);
        // other errors (a pipe's read end, a non-eventfd) are the frontend's problem, not a
        // reason to stall the queue.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Reads what a kick fd holds, if `revents` says it is readable (so even a blocking fd does
/// not block). Returns false when the fd is dead (hung up, error, invalid) and should be
/// dropped: polling it again would return at once, forever.
fn drain_kick(fd: &File, revents: libc::c_short) -> bool {
    if revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        return false;
    }
    if revents & libc::POLLIN != 0 {
        let mut v: u64 = 0;
        // SAFETY: an 8-byte read into a local; poll said the fd is readable.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if n == 0 {
            return false; // end of file: a pipe whose writer is gone
        }
    } else if revents & libc::POLLHUP != 0 {
        return false;
    }
    true
}

/// How long a protocol thread waits for a poller to answer a stop before it declares the
/// poller stuck (the poller's own drain deadline plus a margin).
const STOP_DEADLINE: Duration = Duration::from_secs(15);

impl Poller {
    /// Starts a poller thread, pinned to `cpu` when given.
    pub fn spawn(name: String, cpu: Option<usize>, mode: PollMode) -> crate::Result<Self> {
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
            crate::Error::Io {
                what: format!("eventfd for poller {name}'s mailbox"),
                source,
            }
        })?;
        let mailbox = Arc::new(Mailbox {
            pending: AtomicBool::new(false),
            commands: Mutex::new(Vec::new()),
            wake,
            busy_ns: AtomicU64::new(0),
            longest_commands_ns: AtomicU64::new(0),
            heartbeat: AtomicU64::new(0),
        });
        let mb = mailbox.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                        tracing::warn!("could not pin poller to cpu {cpu}");
                    }
                }
                // A poller that panics must take the process down (so supervision restarts it
                // and inflight recovery runs), not leave its queues silently dead.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mb, mode)))
                    .is_err()
                {
                    tracing::error!("a poller thread panicked; aborting the process");
                    std::process::abort();
                }
            })
            .map_err(|source| crate::Error::Io {
                what: format!("spawning poller thread {name}"),
                source,
            })?;
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name,
            mailbox,
            load: AtomicUsize::new(0),
            thread: Some(thread),
        })
    }

    /// Unique in the process: what devices key per-poller resources by.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues running on it.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    /// Time its loop spent on work since it started.
    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.mailbox.busy_ns.load(Ordering::Relaxed))
    }

    /// The poller's heartbeat: it changes at least every 100 ms while the poller runs its
    /// loop, busy or idle (see [`Poller::spawn`]'s modes), and never while it is stuck.
    pub fn heartbeat(&self) -> u64 {
        self.mailbox.heartbeat.load(Ordering::Relaxed)
    }

    /// The longest its queues waited for control-plane commands (starting, stopping and
    /// draining queues, new fds) since it started.
    pub fn longest_commands(&self) -> Duration {
        Duration::from_nanos(self.mailbox.longest_commands_ns.load(Ordering::Relaxed))
    }

    fn send(&self, command: Command) {
        // A poisoned mailbox only means a sender panicked between push and unlock: the
        // vector itself is intact, so later commands still get through.
        self.mailbox
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(command);
        self.mailbox.pending.store(true, Ordering::Release);
        let _ = self.mailbox.wake.write(1);
    }

    /// Takes a place for one more queue on the least loaded of `pollers` (the first of
    /// equals, so that a device's queues spread over its pollers in order) and returns it:
    /// [`Poller::start`] the queue there, or [`Poller::unclaim`] the place. The count is
    /// taken by compare-and-swap so that connections starting queues at once on their own
    /// threads do not all pick the same poller from one stale view.
    pub fn claim_least_loaded(pollers: &[Arc<Poller>]) -> Option<Arc<Poller>> {
        loop {
            let (poller, seen) = pollers
                .iter()
                .map(|p| (p, p.load()))
                .min_by_key(|&(_, load)| load)?;
            if poller
                .load
                .compare_exchange(seen, seen + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Some(poller.clone());
            }
        }
    }

    /// Gives back a place taken by [`Poller::claim_least_loaded`] for a queue that did not
    /// start.
    pub fn unclaim(&self) {
        self.load.fetch_sub(1, Ordering::Relaxed);
    }

    /// Hands a queue to this poller, on a place taken by [`Poller::claim_least_loaded`].
    pub fn start(&self, queue: QueueStart) {
        self.send(Command::Start(Box::new(queue)));
    }

    /// Gives a running queue of `owner` a new call eventfd.
    pub fn set_call(&self, owner: u64, index: u16, call: Option<File>) {
        self.send(Command::SetCall { owner, index, call });
    }

    /// Gives a running queue of `owner` a new kick eventfd.
    pub fn set_kick(&self, owner: u64, index: u16, kick: Option<File>) {
        self.send(Command::SetKick { owner, index, kick });
    }

    /// Starts, moves or stops the dirty logging of a running queue of `owner`; returns once
    /// the poller logs as asked (the frontend reads the log after our reply). `Err` when the
    /// poller does not answer within [`STOP_DEADLINE`].
    pub fn set_log(&self, owner: u64, index: u16, log: Option<RingLog>) -> crate::Result<()> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::SetLog {
            owner,
            index,
            log,
            reply,
        });
        match rx.recv_timeout(STOP_DEADLINE) {
            // Disconnected: the queue was not there (stopped meanwhile); nothing to log.
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(crate::Error::PollerStuck {
                waited: STOP_DEADLINE,
            }),
        }
    }

    /// Stops one queue of `owner` (or all of them), draining in-flight requests; returns
    /// their final states. `Err` when the poller does not answer within [`STOP_DEADLINE`]: it
    /// is stuck, and its queues' state is unknown.
    pub fn stop(
        &self,
        owner: u64,
        index: Option<u16>,
        publish: bool,
    ) -> crate::Result<Vec<QueueStopped>> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::Stop {
            owner,
            index,
            publish,
            reply,
        });
        let deadline = Instant::now() + STOP_DEADLINE;
        let mut stopped = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(s) => {
                    self.load.fetch_sub(1, Ordering::Relaxed);
                    stopped.push(s)
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(stopped),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(crate::Error::PollerStuck {
                        waited: STOP_DEADLINE,
                    })
                }
            }
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.send(Command::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a stop waits for the handler to finish what it has.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Empty loops between looks at the clock while idle.
const IDLE_CLOCK_EVERY: u32 = 64;

thread_local! {
    /// The time of the poller's current loop (monotonic nanoseconds), read at most once per
    /// loop (on first use).
    static LOOP_CLOCK: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The monotonic clock (the one `Instant` reads) in nanoseconds: plain integers, so a
/// request's latency is one subtraction; one clock for several processes too (a load
/// generator's gaps, the times a test disturbed the backend).
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The time for work done in this poller loop: read from the clock once per loop and shared
/// by every request the loop takes (a clock read per request cost a third of the poller's
/// time at 3 M requests a second), in [`monotonic_ns`]. Off a poller thread, the current
/// time.
#[inline]
pub fn loop_now() -> u64 {
    LOOP_CLOCK.with(|c| match c.get() {
        Some(t) => t,
        None => {
            let t = monotonic_ns();
            c.set(Some(t));
            t
        }
    })
}

/// Starts a new loop: the next [`loop_now`] reads the clock again.
fn new_loop() {
    LOOP_CLOCK.with(|c| c.set(None));
}

fn run(mailbox: &Mailbox, mode: PollMode) {
    let mut queues: Vec<QueueRuntime> = Vec::new();
    // The sleep's fd list and its armed handlers, kept from one sleep to the next: a poller
    // waiting on a network store sleeps once per request.
    let mut sleep_fds: Vec<libc::pollfd> = Vec::with_capacity(64);
    let mut armed: Vec<(usize, std::os::fd::RawFd)> = Vec::with_capacity(64);
    // Empty loops in a row, and when the first of them ran.
    let mut idle = 0u32;
    let mut idle_since: Option<Instant> = None;
    let mut loops: u64 = 0;
    loop {
        loops = loops.wrapping_add(1);
        if loops % HEARTBEAT_EVERY == 0 {
            mailbox.heartbeat.store(loops, Ordering::Relaxed);
            #[cfg(feature = "test-faults")]
            crate::faults::hang_poller_for_tests();
        }
        if mailbox.pending.load(Ordering::Acquire) {
            let commands_start = Instant::now();
            mailbox.pending.store(false, Ordering::Release);
            let commands: Vec<Command> =
                std::mem::take(&mut *mailbox.commands.lock().unwrap_or_else(|e| e.into_inner()));
            for c in commands {
                match c {
                    Command::Start(q) => queues.push(QueueRuntime::new(*q)),
                    Command::Stop {
                        owner,
                        index,
                        publish,
                        reply,
                    } => {
                        let mut kept = Vec::new();
                        for mut q in queues.drain(..) {
                            if q.owner == owner && index.is_none_or(|i| i == q.index()) {
                                let _ = reply.send(q.stop(publish));
                            } else {
                                kept.push(q);
                            }
                        }
                        queues = kept;
                    }
                    Command::SetCall { owner, index, call } => {
                        if let Some(q) = queues
                            .iter_mut()
                            .find(|q| q.owner == owner && q.index() == index)
                        {
                            q.call = call.map(CallFd::new);
                            // Completions published before the new fd arrived may have had
                            // no one to tell: tell the driver once now.
                            q.signal();
                        }
                    }
                    Command::SetKick { owner, index, kick } => {
                        if let Some(q) = queues
                            .iter_mut()
                            .find(|q| q.owner == owner && q.index() == index)
                        {
                            q.kick = kick;
                        }
                    }
                    Command::SetLog {
                        owner,
                        index,
                        log,
                        reply,
                    } => {
                        if let Some(q) = queues
                            .iter_mut()
                            .find(|q| q.owner == owner && q.index() == index)
                        {
                            q.ring.set_log(log);
                            let _ = reply.send(());
                        }
                    }
                    Command::Exit => {
                        for mut q in queues.drain(..) {
                            q.stop(true);
                        }
                        return;
                    }
                }
            }
            let spent = commands_start.elapsed().as_nanos() as u64;
            if spent > mailbox.longest_commands_ns.load(Ordering::Relaxed) {
                mailbox.longest_commands_ns.store(spent, Ordering::Relaxed);
            }
        }
        new_loop();
        let mut work = 0;
        for q in queues.iter_mut() {
            work += q.process(true);
        }
        if work > 0 {
            idle = 0;
            idle_since = None;
            // From the first queue with work in this loop to now: two clock reads per busy
            // loop, however many requests.
            let spent = monotonic_ns().saturating_sub(loop_now());
            // Only this thread writes it: a plain add through a relaxed load and store.
            let busy = mailbox.busy_ns.load(Ordering::Relaxed);
            mailbox.busy_ns.store(busy + spent, Ordering::Relaxed);
            continue;
        }
        idle += 1;
        let Some(limit) = mode.idle_before_sleep else {
            std::hint::spin_loop();
            continue;
        };
        // Spinning is for the moment after work (the next request is likely close); a
        // poller woken by its sleep's timeout with nothing to do sleeps again at once.
        if idle % IDLE_CLOCK_EVERY == 0 {
            let since = *idle_since.get_or_insert_with(Instant::now);
            let waited = since.elapsed();
            if waited >= limit
                || (waited >= WAKEABLE_SPIN.min(limit) && only_wakeable_waits(&queues))
            {
                sleep_until_kicked(mailbox, &mut queues, &mut sleep_fds, &mut armed);
                mailbox.heartbeat.store(loops, Ordering::Relaxed);
                idle = 0;
                idle_since = Instant::now().checked_sub(limit);
            } else {
                // A poller that may sleep shares its core: while it only waits, a thread
                // woken on the same core (a guest's vCPU, a frontend) runs first instead of
                // waiting for the spin to end.
                std::thread::yield_now();
            }
        } else {
            std::hint::spin_loop();
        }
    }
}

/// How long a poller whose only work is waiting for requests its handlers can wake it for
/// ([`crate::device::RequestHandler::can_wake`]) spins before it sleeps: long enough for a
/// guest's next request after a completion, short beside a network store's request.
const WAKEABLE_SPIN: Duration = Duration::from_micros(50);

/// Whether the poller's queues have requests in flight and the poller may sleep early for
/// them: every queue's handler can wake it when a request finishes, and every queue has a
/// kick fd (a queue without one is only seen by polling). A queue of another kind on the
/// same poller keeps the old rule (spin [`PollMode::idle_before_sleep`]): its guest's next
/// request must not pay a kick and a wake-up because an RBD request is out beside it.
fn only_wakeable_waits(queues: &[QueueRuntime]) -> bool {
    let mut waiting = false;
    for q in queues {
        if !q.handler.can_wake() || q.kick.is_none() {
            return false;
        }
        waiting |= q.handler.in_flight() > 0;
    }
    waiting
}

/// Re-enables kicks, checks once more, and sleeps on the kick eventfds, the mailbox and the
/// wake-ups of handlers with requests in flight (when every such handler has one).
/// `fds` and `armed` are the caller's, reused so that a sleep allocates nothing.
fn sleep_until_kicked(
    mailbox: &Mailbox,
    queues: &mut [QueueRuntime],
    fds: &mut Vec<libc::pollfd>,
    armed: &mut Vec<(usize, std::os::fd::RawFd)>,
) {
    for q in queues.iter_mut() {
        q.ring.set_kicks(true);
        q.ring.errors().flush();
    }
    fds.clear();
    armed.clear();
    let mut busy = queues.iter().any(|q| q.ring.has_work());
    if !busy {
        for (i, q) in queues.iter_mut().enumerate() {
            if q.handler.in_flight() == 0 {
                continue;
            }
            match q.handler.arm_wakeup() {
                Wakeup::Fd(fd) => armed.push((i, fd)),
                Wakeup::Poll => {
                    busy = true;
                    break;
                }
            }
        }
    }
    if !busy {
        let pollfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        fds.extend(
            queues
                .iter()
                .filter_map(|q| q.kick.as_ref())
                .map(|k| pollfd(k.as_raw_fd())),
        );
        fds.push(pollfd(mailbox.wake.as_raw_fd()));
        fds.extend(armed.iter().map(|&(_, fd)| pollfd(fd)));
        // SAFETY: a valid pollfd array of the given length.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if ready > 0 {
            // The kick fds come first in `fds`, in the order of the queues that have one,
            // then the mailbox's.
            let kicks = queues.iter().filter(|q| q.kick.is_some()).count();
            if fds
                .get(kicks)
                .is_some_and(|p| p.revents & libc::POLLIN != 0)
            {
                let _ = mailbox.wake.read();
            }
            let mut revents = fds.iter().map(|p| p.revents);
            for q in queues.iter_mut() {
                let Some(k) = &q.kick else { continue };
                let alive = drain_kick(k, revents.next().unwrap_or(0));
                if !alive {
                    q.ring.errors().report(
                        q.ring.index(),
                        format_args!("kick fd hung up or invalid; polling the ring instead"),
                    );
                    q.kick = None;
                }
            }
        }
    }
    // The armed fds come last in `fds` (when the poller slept).
    let first_armed = fds.len() - fds.len().min(armed.len());
    for (n, &(i, _)) in armed.iter().enumerate() {
        let readable = fds
            .get(first_armed + n)
            .is_some_and(|p| p.revents & libc::POLLIN != 0);
        queues[i].handler.disarm_wakeup(readable);
    }
    for q in queues.iter_mut() {
        q.ring.set_kicks(false);
    }
}

/// A queue as its poller runs it: the ring, the device's handler, and the eventfds.
struct QueueRuntime {
    owner: u64,
    ring: QueueRing,
    handler: Box<dyn QueueHandler>,
    call: Option<CallFd>,
    kick: Option<File>,
}

impl QueueRuntime {
    fn new(q: QueueStart) -> Self {
        let mut runtime = Self {
            owner: q.owner,
            ring: QueueRing::new(
                q.index, q.mem, q.vq, q.inflight, q.errors, q.resubmit, q.log,
            ),
            handler: q.handler,
            call: q.call.map(CallFd::new),
            kick: q.kick,
        };
        runtime.ring.set_kicks(false);
        // Whatever the guest queued while no one was serving the ring is picked up by polling.
        // A predecessor may have died between publishing used entries and signalling, and
        // under EVENT_IDX the driver then waits forever: signal once at every start (as
        // libvhost-user and SPDK do). A spurious interrupt costs the driver one look.
        runtime.signal();
        runtime
    }

    fn index(&self) -> u16 {
        self.ring.index()
    }

    /// One round: resubmissions, new chains, completions (one dynamic call into the
    /// device), then publication. Returns work done.
    fn process(&mut self, take_new: bool) -> usize {
        let (work, notify) = self.ring.round(&mut *self.handler, take_new);
        if notify {
            self.signal();
        }
        work
    }

    fn signal(&mut self) {
        if let Some(call) = &mut self.call {
            call.signal();
        }
    }

    fn stop(&mut self, publish: bool) -> QueueStopped {
        let deadline = Instant::now() + DRAIN_DEADLINE;
        while self.handler.in_flight() > 0 && Instant::now() < deadline {
            if publish {
                self.process(false);
            } else {
                // The connection is gone: let the handler finish, publish nothing; the
                // inflight region still lists these, so the next connection runs them again.
                let finished = self.ring.finished();
                self.handler.finish_unpublished(finished);
                finished.clear();
            }
            std::thread::yield_now();
        }
        self.ring.errors().flush();
        // Before the stop is reported: a successor may want the image lock at once.
        self.handler.stopped();
        QueueStopped {
            index: self.ring.index(),
            base: self.ring.base(),
            abandoned: self.handler.in_flight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{ChainCursor, ChainSource, Segment};
    use crate::device::{Finished, RequestHandler, Taken};
    use crate::mock::MockGuest;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::sync::Mutex;

    #[test]
    fn queues_claimed_at_once_spread_evenly_over_the_pollers() {
        let mode = PollMode {
            idle_before_sleep: Some(Duration::from_millis(1)),
        };
        let pollers: Vec<Arc<Poller>> = (0..2)
            .map(|i| Arc::new(Poller::spawn(format!("claim-{i}"), None, mode).unwrap()))
            .collect();
        // Rounds of 16 connections' threads claiming together, as a target's serving
        // threads do when 16 frontends start their queues at once.
        for round in 0..50 {
            let barrier = std::sync::Barrier::new(16);
            let claimed: Vec<Arc<Poller>> = std::thread::scope(|s| {
                let threads: Vec<_> = (0..16)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            Poller::claim_least_loaded(&pollers).unwrap()
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let loads: Vec<usize> = pollers.iter().map(|p| p.load()).collect();
            assert_eq!(loads, vec![8, 8], "round {round}");
            for p in claimed {
                p.unclaim();
            }
        }
        assert_eq!(Poller::claim_least_loaded(&[]).map(|p| p.id()), None);
    }

    /// When a test handler lets its chains go.
    enum Release {
        /// All at once, when this many are held.
        Burst(usize),
        /// The heads the test puts in the list.
        Chosen(Arc<Mutex<Vec<u16>>>),
    }

    /// Holds every chain it takes until its release rule lets it go.
    struct HoldHandler {
        held: Vec<u16>,
        release: Release,
    }

    impl HoldHandler {
        fn boxed(release: Release) -> Box<dyn QueueHandler> {
            Box::new(Self {
                held: Vec::new(),
                release,
            })
        }
    }

    impl RequestHandler for HoldHandler {
        fn can_take(&self) -> bool {
            true
        }
        fn take<S: ChainSource>(&mut self, chain: ChainCursor<'_, S>) -> Taken {
            let mut buffers = [Segment::default(); 8];
            if let Err(e) = chain.walk_into(&mut buffers) {
                return Taken::Unwalkable(e);
            }
            self.held.push(chain.head());
            Taken::Pending
        }
        fn refuse(&mut self, _head: u16, last: Option<crate::chain::Segment>) -> Option<u32> {
            last.filter(|s| s.write).map(|_| 1)
        }
        fn poll(&mut self, finished: &mut Finished) -> usize {
            let released: Vec<u16> = match &self.release {
                Release::Burst(n) if self.held.len() >= *n => std::mem::take(&mut self.held),
                Release::Burst(_) => Vec::new(),
                Release::Chosen(list) => std::mem::take(&mut *list.lock().unwrap()),
            };
            for h in &released {
                self.held.retain(|x| x != h);
                finished.push(*h, 1);
            }
            released.len()
        }
        fn in_flight(&self) -> usize {
            self.held.len()
        }
    }

    fn runtime(guest: &MockGuest, handler: Box<dyn QueueHandler>) -> QueueRuntime {
        runtime_with(guest, handler, false, None)
    }

    fn runtime_with(
        guest: &MockGuest,
        handler: Box<dyn QueueHandler>,
        event_idx: bool,
        call: Option<File>,
    ) -> QueueRuntime {
        QueueRuntime::new(QueueStart {
            owner: 0,
            index: 0,
            mem: guest.memory(),
            vq: guest.device_queue(event_idx).into(),
            inflight: None,
            handler,
            call,
            kick: None,
            errors: Arc::new(GuestErrors::new("test")),
            resubmit: Vec::new(),
            log: None,
        })
    }

    /// Guest pages (4 KiB numbers) of `len` bytes at `gpa`.
    fn pages(gpa: u64, len: u64) -> std::collections::BTreeSet<u64> {
        (gpa / 4096..=(gpa + len - 1) / 4096).collect()
    }

    /// The pages marked in a dirty log's file, as the frontend reads them.
    fn marked(file: &File) -> std::collections::BTreeSet<u64> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        let mut out = std::collections::BTreeSet::new();
        for (byte, b) in buf.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    out.insert(byte as u64 * 8 + bit);
                }
            }
        }
        out
    }

    /// Clears a dirty log as its frontend does.
    fn clear(file: &File) {
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; file.metadata().unwrap().len() as usize];
        file.write_all_at(&zeros, 0).unwrap();
    }

    /// A dirty log of guest memory up to `end`: the frontend's file and the device's map.
    fn dirty_log(end: u64) -> (File, Arc<crate::dirty_log::DirtyLog>) {
        let bytes = crate::dirty_log::log_bytes_for(end);
        let file = crate::memory::memfd("log-test", bytes).unwrap();
        let log = crate::dirty_log::DirtyLog::map(file.try_clone().unwrap(), 0, bytes, true);
        (file, Arc::new(log.unwrap()))
    }

    /// An inflight region for one packed queue of `size` descriptors, in a memfd `name`.
    fn packed_region_map(name: &str, size: u16) -> Arc<InflightMap> {
        let bytes = crate::inflight_packed::region_size(size) as u64;
        let file = crate::memory::memfd(name, bytes).unwrap();
        Arc::new(InflightMap::map(file, 0, bytes, size).unwrap())
    }

    /// A packed ring's runtime with `region` of `map`, releasing the chains the test puts in
    /// `release`, running `resubmit` again first.
    fn runtime_packed_inflight(
        mem: &Arc<GuestMemory>,
        vq: crate::packed::PackedQueue,
        region: crate::inflight_packed::InflightPackedQueue,
        map: &Arc<InflightMap>,
        resubmit: Vec<u16>,
        release: Arc<Mutex<Vec<u16>>>,
    ) -> QueueRuntime {
        QueueRuntime::new(QueueStart {
            owner: 0,
            index: 0,
            mem: mem.clone(),
            vq: vq.into(),
            inflight: Some((region.into(), map.clone())),
            handler: HoldHandler::boxed(Release::Chosen(release)),
            call: None,
            kick: None,
            errors: Arc::new(GuestErrors::new("test")),
            resubmit,
            log: None,
        })
    }

    #[test]
    fn while_a_migration_logs_every_write_into_guest_memory_is_marked_and_nothing_else() {
        use crate::ring::RingLog;
        let mut guest = MockGuest::new(4 << 20, 16);
        let (log_file, log) = dirty_log(guest.len());
        let used_gpa = guest.driver().gpas.2;
        let ring_log = RingLog {
            log: log.clone(),
            used_gpa,
            desc_gpa: 0,
        };
        let mut q = QueueRuntime::new(QueueStart {
            owner: 0,
            index: 0,
            mem: guest.memory(),
            vq: guest.device_queue(false).into(),
            inflight: None,
            handler: HoldHandler::boxed(Release::Burst(3)),
            call: None,
            kick: None,
            errors: Arc::new(GuestErrors::new("test")),
            resubmit: Vec::new(),
            log: Some(ring_log.clone()),
        });
        // Starting marks the used ring's words (the flags word written to stop kicks).
        let used_len = crate::virtq::ring_sizes(16).2 as u64;
        assert_eq!(marked(&log_file), pages(used_gpa, used_len));
        // Cleared as the frontend does when it syncs.
        clear(&log_file);
        // Page-aligned buffers, one page apart, so that a wrong mark shows.
        let mut page = || guest.alloc(3 * 4096).div_ceil(4096) * 4096;
        let (hdr1, data1, status1) = (page(), page(), page());
        let (hdr2, data2, status2) = (page(), page(), page());
        let (hdr3, data3, status3) = (page(), page(), page());
        // A read (data written by the device, across a page boundary), a write (only the
        // status byte written), and an indirect read.
        guest.add_chain(&[
            (hdr1, 16, false),
            (data1 + 2048, 4096, true),
            (status1, 1, true),
        ]);
        guest.add_chain(&[
            (hdr2, 16, false),
            (data2, 4096, false),
            (status2 + 100, 1, true),
        ]);
        guest.add_indirect(&[(hdr3, 16, false), (data3, 512, true), (status3, 1, true)]);
        assert_eq!(q.process(true), 6, "three taken, three finished");
        let mut expected = std::collections::BTreeSet::new();
        expected.extend(pages(data1 + 2048, 4096));
        expected.extend(pages(status1, 1));
        expected.extend(pages(status2 + 100, 1));
        expected.extend(pages(data3, 512));
        expected.extend(pages(status3, 1));
        expected.extend(pages(used_gpa + 2, 2 + 3 * 8));
        assert_eq!(marked(&log_file), expected);
        for gpa in [hdr1, hdr2, data2, hdr3] {
            assert!(!log.is_marked(gpa), "{gpa:#x}: only read by the device");
        }
        // Logging off (the migration ended): nothing more is marked.
        q.ring.set_log(None);
        clear(&log_file);
        for _ in 0..3 {
            guest.add_chain(&[(hdr1, 16, false), (data1, 4096, true), (status1, 1, true)]);
        }
        assert_eq!(q.process(true), 6);
        assert!(marked(&log_file).is_empty());
        // On again: the whole used ring is marked at once (its words the driver reads on
        // the destination may have been written while logging was off).
        q.ring.set_log(Some(ring_log));
        assert_eq!(marked(&log_file), pages(used_gpa, used_len));
    }

    #[test]
    fn a_dirty_log_shrunk_under_the_device_stops_the_queue_before_anything_is_reported_done() {
        use crate::dirty_log::{log_bytes_for, DirtyLog};
        use crate::ring::RingLog;
        let mut guest = MockGuest::new(1 << 20, 16);
        let bytes = log_bytes_for(guest.len()).div_ceil(4096) * 4096;
        // No MFD_ALLOW_SEALING: the file can be shrunk under the mapping.
        let file = vfblk_hugepages::memfd("log-shrunk", libc::MFD_CLOEXEC, bytes).unwrap();
        let log = Arc::new(DirtyLog::map(file.try_clone().unwrap(), 0, bytes, true).unwrap());
        let used_gpa = guest.driver().gpas.2;
        let mut q = runtime(&guest, HoldHandler::boxed(Release::Burst(1)));
        q.ring.set_log(Some(RingLog {
            log,
            used_gpa,
            desc_gpa: 0,
        }));
        file.set_len(0).unwrap();
        let buf = guest.alloc(4096);
        guest.add_chain(&[(buf, 16, false), (buf + 16, 1, true)]);
        q.process(true);
        assert_eq!(guest.pop_used(), None, "reported done with its marks lost");
        assert!(q.ring.broken(), "the queue stops");
    }

    #[test]
    fn a_burst_of_completions_larger_than_a_round_is_all_published() {
        let mut guest = MockGuest::new(4 << 20, 256);
        let burst = 120; // more than a poll round (64), 240 of the 256 descriptors
        let mut q = runtime(&guest, HoldHandler::boxed(Release::Burst(burst)));
        for _ in 0..burst {
            let hdr = guest.alloc(16);
            let status = guest.alloc(1);
            guest.add_chain(&[(hdr, 16, false), (status, 1, true)]);
        }
        for _ in 0..10 {
            q.process(true);
        }
        let mut used = 0;
        while guest.pop_used().is_some() {
            used += 1;
        }
        assert_eq!(
            used, burst,
            "every completion of the burst reached the used ring"
        );
    }

    #[test]
    fn a_malformed_chain_with_a_status_byte_is_refused_there_and_the_queue_goes_on() {
        use crate::virtq::{Descriptor, DESC_F_NEXT, DESC_F_WRITE};
        let mut guest = MockGuest::new(1 << 20, 16);
        let mut q = runtime(&guest, HoldHandler::boxed(Release::Burst(1)));
        let errors = q.ring.errors().clone();
        let (hdr, st) = (guest.alloc(16), guest.alloc(1));
        // A data buffer outside guest memory; the status byte is in place.
        guest.add_raw(
            &[
                (0, Descriptor::new(hdr, 16, DESC_F_NEXT, 1)),
                (
                    1,
                    Descriptor::new(1 << 30, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
                ),
                (2, Descriptor::new(st, 1, DESC_F_WRITE, 0)),
            ],
            0,
        );
        q.process(true);
        assert_eq!(
            guest.pop_used_raw(),
            Some((0, 1)),
            "answered, not returned empty"
        );
        assert_eq!(errors.total(), 1);
        let hdr = guest.alloc(16);
        let head = guest.add_chain(&[(hdr, 16, false)]);
        q.process(true);
        assert_eq!(guest.pop_used(), Some((head, 1)), "the queue goes on");
    }

    #[test]
    fn a_chain_that_cannot_be_answered_stops_the_queue_instead_of_returning_it_empty() {
        use crate::virtq::{Descriptor, DESC_F_NEXT};
        let mut guest = MockGuest::new(1 << 20, 16);
        let mut q = runtime(&guest, HoldHandler::boxed(Release::Burst(1)));
        // A descriptor whose next index is outside the table: no end, no status.
        guest.add_raw(&[(0, Descriptor::new(0x8000, 16, DESC_F_NEXT, 99))], 0);
        q.process(true);
        assert!(q.ring.broken());
        assert_eq!(guest.pop_used_raw(), None, "nothing returned as if done");
        let hdr = guest.alloc(16);
        guest.add_chain(&[(hdr, 16, false)]);
        assert_eq!(q.process(true), 0, "a stopped queue takes nothing more");
    }

    #[test]
    fn a_ring_claiming_more_than_it_holds_stops_the_queue() {
        let mut guest = MockGuest::new(1 << 20, 8);
        let mut q = runtime(&guest, HoldHandler::boxed(Release::Burst(1)));
        guest.set_avail_idx(100);
        q.process(true);
        assert!(q.ring.broken());
        assert_eq!(q.process(true), 0, "a broken queue takes nothing more");
    }

    #[test]
    fn a_queue_that_dies_mid_flight_leaves_exactly_its_unfinished_heads_to_run_again() {
        use crate::inflight::region_size;
        let size = 16u16;
        let mut guest = MockGuest::new(1 << 20, size);
        let file = crate::memory::memfd("inflight-test", region_size(size) as u64).unwrap();
        let map = Arc::new(InflightMap::map(file, 0, region_size(size) as u64, size).unwrap());
        // SAFETY: the only queue of this region; `map` outlives it.
        let mut region = unsafe { map.queue(0) }.unwrap();
        assert!(region.recover(0).fresh);
        let release = Arc::new(Mutex::new(Vec::new()));
        let mut q = QueueRuntime::new(QueueStart {
            owner: 0,
            index: 0,
            mem: guest.memory(),
            vq: guest.device_queue(true).into(),
            inflight: Some((region.into(), map.clone())),
            handler: HoldHandler::boxed(Release::Chosen(release.clone())),
            call: None,
            kick: None,
            errors: Arc::new(GuestErrors::new("test")),
            resubmit: Vec::new(),
            log: None,
        });
        let heads: Vec<u16> = (0..3)
            .map(|_| {
                let b = guest.alloc(16);
                guest.add_chain(&[(b, 16, false), (b, 1, true)])
            })
            .collect();
        q.process(true);
        // The middle one finishes; the process dies before the others do.
        release.lock().unwrap().push(heads[1]);
        q.process(true);
        assert_eq!(guest.pop_used(), Some((heads[1], 1)));
        drop(q);
        // The successor maps the same region and finds the two unfinished heads, oldest first.
        // SAFETY: the previous queue is gone; `map` outlives this one.
        let mut successor = unsafe { map.queue(0) }.unwrap();
        let used_idx = guest.device_queue(true).used_idx();
        let recovery = successor.recover(used_idx);
        assert!(!recovery.fresh);
        assert_eq!(recovery.resubmit, vec![heads[0], heads[2]]);
    }

    #[test]
    fn a_packed_queue_that_dies_mid_flight_runs_its_unfinished_chains_again_from_the_region() {
        use crate::chain::ChainCursor;
        use crate::packed::tests::{buf, guest, BUFS};
        use crate::packed::Position;
        let size = 8u16;
        let mut g = guest(size, false);
        let map = packed_region_map("inflight-packed-test", size);
        // A queue of the region: one at a time (the previous one is dropped first), and
        // `map` outlives it.
        let open = || {
            // SAFETY: as said above.
            unsafe { map.packed_queue(0) }.unwrap()
        };
        // The ring runs with the region it was recovered from.
        let start = |vq, region, resubmit, release| {
            runtime_packed_inflight(&g.mem, vq, region, &map, resubmit, release)
        };
        let dev = g.device_queue(false);
        let mut region = open();
        assert!(region.recover(&dev, dev.next_used()).fresh);
        let release = Arc::new(Mutex::new(Vec::new()));
        let mut q = start(dev, region, Vec::new(), release.clone());
        let (hdr, status) = (buf(BUFS, 16, false), buf(BUFS + 16, 1, true));
        let a = g.drv.add(&[hdr, status]).unwrap();
        let b = g.drv.add(&[status]).unwrap();
        let c = g
            .drv
            .add(&[hdr, buf(BUFS + 64, 512, true), status])
            .unwrap();
        assert_eq!(q.process(true), 3);
        // c and b finish, their used descriptors written over a's (ring slots 0 and 3);
        // another chain takes a freed slot; the process dies before a and d finish.
        release.lock().unwrap().extend([c, b]);
        q.process(true);
        assert_eq!(g.drv.pop_used().unwrap(), Some((c, 1)));
        assert_eq!(g.drv.pop_used().unwrap(), Some((b, 1)));
        let d = g.drv.add(&[status]).unwrap();
        q.process(true);
        drop(q);

        // The successor finds a and d, oldest first, with a's descriptors as they were.
        let mut dev = g.device_queue(false);
        let mut region = open();
        let recovery = region.recover(&dev, Position::START);
        let ids: Vec<u16> = recovery.resubmit.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![a, d]);
        let mut segments = [crate::chain::Segment::default(); 4];
        let n = ChainCursor::recovered(&region, &g.mem, recovery.resubmit[0])
            .walk_into(&mut segments)
            .unwrap();
        let shape: Vec<(u64, u32, bool)> = segments[..n]
            .iter()
            .map(|s| (s.gpa, s.len, s.write))
            .collect();
        assert_eq!(shape, vec![(BUFS, 16, false), (BUFS + 16, 1, true)]);
        // The ring resumes where the region says it was used to, after what was taken.
        let used = recovery.used.unwrap();
        let base = u32::from(g.drv.next_avail().to_event()) | u32::from(used.to_event()) << 16;
        dev.set_base(base).unwrap();
        let release = Arc::new(Mutex::new(Vec::new()));
        let mut q = start(dev, region, ids, release.clone());
        assert_eq!(q.process(true), 2, "both run again");
        assert!(!q.ring.broken());
        release.lock().unwrap().extend([d, a]);
        q.process(true);
        assert_eq!(g.drv.pop_used().unwrap(), Some((d, 1)));
        assert_eq!(g.drv.pop_used().unwrap(), Some((a, 1)));
        assert_eq!(g.drv.free_slots(), size);
        drop(q);
        // Nothing is left for a third process.
        let dev = g.device_queue(false);
        assert!(open().recover(&dev, Position::START).resubmit.is_empty());
    }

    /// An eventfd as the frontend's end (a File, as the protocol hands it over) and ours.
    fn eventfd(flags: i32) -> (File, EventFd) {
        let efd = EventFd::new(flags).unwrap();
        // SAFETY: into_raw_fd hands over the only owner of a valid, fresh fd.
        let file = unsafe { File::from_raw_fd(efd.try_clone().unwrap().into_raw_fd()) };
        (file, efd)
    }

    /// One request out, finished by another thread (a network store's callback): the
    /// handler wakes its poller through an eventfd when armed, or cannot.
    struct WakeHandler {
        wakes: bool,
        wake: Arc<EventFd>,
        /// Readability the poller reported at each disarm.
        disarmed: Arc<Mutex<Vec<bool>>>,
    }

    impl RequestHandler for WakeHandler {
        fn can_take(&self) -> bool {
            false
        }
        fn take<S: ChainSource>(&mut self, _chain: ChainCursor<'_, S>) -> Taken {
            Taken::Pending
        }
        fn refuse(&mut self, _head: u16, _last: Option<Segment>) -> Option<u32> {
            None
        }
        fn poll(&mut self, _finished: &mut Finished) -> usize {
            0
        }
        fn in_flight(&self) -> usize {
            1
        }
        fn can_wake(&self) -> bool {
            self.wakes
        }
        fn arm_wakeup(&mut self) -> Wakeup {
            if self.wakes {
                Wakeup::Fd(self.wake.as_raw_fd())
            } else {
                Wakeup::Poll
            }
        }
        fn disarm_wakeup(&mut self, readable: bool) {
            if readable {
                let _ = self.wake.read();
            }
            self.disarmed.lock().unwrap().push(readable);
        }
    }

    fn idle_mailbox() -> Mailbox {
        Mailbox {
            pending: AtomicBool::new(false),
            commands: Mutex::new(Vec::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            busy_ns: AtomicU64::new(0),
            longest_commands_ns: AtomicU64::new(0),
            heartbeat: AtomicU64::new(0),
        }
    }

    #[test]
    fn a_poller_waiting_only_for_requests_that_can_wake_it_sleeps_until_one_finishes() {
        let guest = MockGuest::new(1 << 20, 8);
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let disarmed = Arc::new(Mutex::new(Vec::new()));
        let handler = |wakes| {
            Box::new(WakeHandler {
                wakes,
                wake: wake.clone(),
                disarmed: disarmed.clone(),
            }) as Box<dyn QueueHandler>
        };
        let mailbox = idle_mailbox();
        let (mut fds, mut armed) = (Vec::new(), Vec::new());

        let kicked = |h| {
            let mut q = runtime(&guest, h);
            q.kick = Some(eventfd(libc::EFD_NONBLOCK).0);
            q
        };
        // Without a kick fd the queue's ring is only seen by polling: no early sleep.
        assert!(!only_wakeable_waits(&[runtime(&guest, handler(true))]));
        let mut queues = vec![kicked(handler(true))];
        assert!(only_wakeable_waits(&queues));
        // The request finishes on another thread while the poller sleeps: the poll returns
        // on the handler's fd, reported readable, and the fd is drained.
        let finisher = {
            let wake = wake.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                wake.write(1).unwrap();
            })
        };
        sleep_until_kicked(&mailbox, &mut queues, &mut fds, &mut armed);
        finisher.join().unwrap();
        assert_eq!(*disarmed.lock().unwrap(), vec![true]);
        assert!(wake.read().is_err(), "drained at disarm");

        // A handler that cannot wake the poller keeps it polling: no sleep, no arming left.
        disarmed.lock().unwrap().clear();
        let mut queues = vec![kicked(handler(false))];
        assert!(!only_wakeable_waits(&queues));
        let asked = Instant::now();
        sleep_until_kicked(&mailbox, &mut queues, &mut fds, &mut armed);
        assert!(
            asked.elapsed() < Duration::from_millis(90),
            "returned without the 100 ms sleep"
        );
        assert!(disarmed.lock().unwrap().is_empty());
        // Beside it, one that can: no early sleep, and at a sleep the poller does not sleep
        // either, the armed one disarmed (not readable).
        let mut queues = vec![kicked(handler(true)), kicked(handler(false))];
        assert!(!only_wakeable_waits(&queues));
        sleep_until_kicked(&mailbox, &mut queues, &mut fds, &mut armed);
        assert_eq!(*disarmed.lock().unwrap(), vec![false]);
    }

    #[test]
    fn every_start_and_every_new_call_fd_signal_the_driver_once() {
        let guest = MockGuest::new(1 << 20, 8);
        let (call, observer) = eventfd(libc::EFD_NONBLOCK);
        let mut q = runtime_with(
            &guest,
            HoldHandler::boxed(Release::Burst(1)),
            true,
            Some(call),
        );
        // A predecessor may have published without signalling: the start signals.
        assert_eq!(observer.read().unwrap(), 1, "signalled at start");
        // A new call fd (requests re-run before SET_VRING_CALL) is signalled too.
        let (call2, observer2) = eventfd(libc::EFD_NONBLOCK);
        q.call = Some(CallFd::new(call2));
        q.signal();
        assert_eq!(observer2.read().unwrap(), 1);
    }

    #[test]
    fn a_blocking_call_fd_with_no_room_is_never_waited_on() {
        // A blocking eventfd whose counter is at its maximum: a write would block forever.
        let (call, observer) = eventfd(0);
        observer.write(u64::MAX - 1).unwrap();
        let mut fd = CallFd::new(call);
        assert!(fd.blocking);
        fd.signal(); // returns: the reader already has a wakeup pending
        assert_eq!(observer.read().unwrap(), u64::MAX - 1);
        fd.signal();
        assert_eq!(observer.read().unwrap(), 1, "delivered once there is room");
    }

    #[test]
    fn kick_fds_are_read_only_when_readable_and_dropped_when_dead() {
        let (kick, observer) = eventfd(0); // blocking, like libblkio's
        assert!(
            drain_kick(&kick, 0),
            "not readable: not read (a read would block)"
        );
        observer.write(3).unwrap();
        assert!(drain_kick(&kick, libc::POLLIN));
        assert!(!drain_kick(&kick, libc::POLLHUP), "hung up: dropped");
        assert!(!drain_kick(&kick, libc::POLLNVAL), "invalid: dropped");
    }

    #[test]
    fn under_event_idx_the_driver_is_interrupted_when_it_asks() {
        let mut guest = MockGuest::new(1 << 20, 8);
        let (call, observer) = eventfd(libc::EFD_NONBLOCK);
        let mut q = runtime_with(
            &guest,
            HoldHandler::boxed(Release::Burst(1)),
            true,
            Some(call),
        );
        let _ = observer.read(); // the start's signal
        for round in 1..=3u16 {
            let b = guest.alloc(16);
            guest.add_chain(&[(b, 16, false)]);
            guest.driver().set_used_event(round - 1);
            q.process(true);
            q.process(true);
            assert_eq!(guest.pop_used().map(|(_, n)| n), Some(1), "round {round}");
            assert_eq!(
                observer.read().ok(),
                Some(1),
                "interrupted in round {round}"
            );
        }
    }

    #[test]
    fn a_packed_ring_runs_chains_returned_out_of_order_and_stops_when_the_ring_lies() {
        use crate::packed::tests::{buf, guest, BUFS};
        use crate::packed::PackedDescriptor;
        let mut g = guest(4, false);
        let chosen = Arc::new(Mutex::new(Vec::new()));
        let mut q = runtime_packed(&g, HoldHandler::boxed(Release::Chosen(chosen.clone())));
        let (hdr, status) = (buf(BUFS, 16, false), buf(BUFS + 16, 1, true));
        for lap in 0..5 {
            // 1 + 2 + 1 descriptors fill the ring; returned last first.
            let ids = [
                g.drv.add(&[status]).unwrap(),
                g.drv.add(&[hdr, status]).unwrap(),
                g.drv.add(&[status]).unwrap(),
            ];
            assert_eq!(q.process(true), 3, "lap {lap}");
            assert_eq!(g.drv.pop_used().unwrap(), None);
            chosen.lock().unwrap().extend(ids.iter().rev());
            q.process(true);
            for &id in ids.iter().rev() {
                assert_eq!(g.drv.pop_used().unwrap(), Some((id, 1)), "lap {lap}");
            }
        }
        // 20 descriptors: five laps, both wrap counters flipped to 0, indexes back at 0.
        assert_eq!(q.ring.base(), 0);
        // A buffer id outside the ring: the queue stops and takes nothing more.
        g.drv.add_raw(&[PackedDescriptor::new(
            BUFS,
            1,
            9,
            crate::virtq::DESC_F_WRITE,
        )]);
        q.process(true);
        assert!(q.ring.broken());
        g.drv.add(&[status]).unwrap();
        assert_eq!(q.process(true), 0);
        assert_eq!(g.drv.pop_used().unwrap(), None);
    }

    #[test]
    fn a_split_ring_given_a_packed_inflight_region_starts_stopped_and_takes_nothing() {
        let size = 8u16;
        let map = packed_region_map("inflight-mismatch-test", size);
        // SAFETY: `map` outlives the region's queue (the runtime holds both).
        let region = unsafe { map.packed_queue(0) }.unwrap();
        let mut guest = MockGuest::new(1 << 20, size);
        let mut q = QueueRuntime::new(QueueStart {
            owner: 0,
            index: 0,
            mem: guest.memory(),
            vq: guest.device_queue(false).into(),
            inflight: Some((region.into(), map.clone())),
            handler: HoldHandler::boxed(Release::Burst(1)),
            call: None,
            kick: None,
            errors: Arc::new(GuestErrors::new("test")),
            resubmit: vec![0],
            log: None,
        });
        assert!(q.ring.broken());
        let (hdr, status) = (guest.alloc(16), guest.alloc(1));
        guest.add_chain(&[(hdr, 16, false), (status, 1, true)]);
        assert_eq!(
            q.process(true),
            0,
            "neither the resubmission nor the new chain runs"
        );
    }

    #[test]
    fn a_packed_ring_without_an_inflight_region_asked_to_log_stops_rather_than_miss_a_write() {
        let g = crate::packed::tests::guest(4, false);
        let log_file = crate::memory::memfd("log-test", 4096).unwrap();
        let log = Arc::new(crate::dirty_log::DirtyLog::map(log_file, 0, 4096, true).unwrap());
        let mut q = runtime_packed(&g, HoldHandler::boxed(Release::Burst(1)));
        assert!(!q.ring.broken());
        q.ring.set_log(Some(RingLog {
            log,
            used_gpa: 0,
            desc_gpa: 0,
        }));
        assert!(q.ring.broken());
    }

    /// A packed ring logs through its inflight region: what the device wrote for each chain
    /// it finishes is marked from the region's copy, even for a chain taken before logging
    /// started whose first ring slot a used descriptor has overwritten since; the used
    /// descriptors' slots are marked; nothing the device only read is.
    #[test]
    fn a_packed_ring_logs_every_write_from_its_inflight_region() {
        use crate::packed::tests::{buf, guest, BUFS};
        let size = 8u16;
        let mut g = guest(size, false);
        let map = packed_region_map("inflight-packed-log", size);
        // SAFETY: the only queue of the region; `map` outlives it.
        let mut region = unsafe { map.packed_queue(0) }.unwrap();
        let dev = g.device_queue(false);
        assert!(region.recover(&dev, dev.next_used()).fresh);
        let release = Arc::new(Mutex::new(Vec::new()));
        let mut q = runtime_packed_inflight(&g.mem, dev, region, &map, Vec::new(), release.clone());
        let (log_file, log) = dirty_log(2 << 20);
        // Each buffer on a page of its own, so that a wrong mark shows.
        let page = |n: u64| BUFS + 0x1000 * n;
        // a: a read (data and status written by the device); b: a status only.
        let a = g
            .drv
            .add(&[
                buf(page(0), 16, false),
                buf(page(1) + 2048, 4096, true),
                buf(page(3), 1, true),
            ])
            .unwrap();
        let b = g
            .drv
            .add(&[buf(page(4), 16, false), buf(page(5) + 100, 1, true)])
            .unwrap();
        assert_eq!(q.process(true), 2);
        // b finishes first: its used descriptor goes to slot 0, a's first descriptor.
        release.lock().unwrap().push(b);
        q.process(true);
        assert_eq!(g.drv.pop_used().unwrap(), Some((b, 1)));
        assert_eq!(
            g.device_queue(false).descriptor(0).id,
            b,
            "a's slot 0 overwritten"
        );
        // The migration starts: the ring's descriptors and device event area are marked.
        let (desc_gpa, _, used_gpa) = g.drv.gpas;
        q.ring.set_log(Some(RingLog {
            log: log.clone(),
            used_gpa,
            desc_gpa,
        }));
        assert!(!q.ring.broken());
        let mut ring_pages = pages(desc_gpa, 16 * u64::from(size));
        ring_pages.extend(pages(used_gpa, crate::packed::EVENT_BYTES as u64));
        assert_eq!(marked(&log_file), ring_pages);
        clear(&log_file);
        // c: a write (data only read by the device), indirect.
        let table = page(9);
        // SAFETY: the table's page lies in the guest's memory, 16-aligned, unused otherwise.
        let c = unsafe {
            g.drv.add_indirect(
                g.mem.translate(table, 48).unwrap(),
                table,
                &[
                    buf(page(6), 16, false),
                    buf(page(7), 512, false),
                    buf(page(8), 1, true),
                ],
            )
        }
        .unwrap();
        assert_eq!(q.process(true), 1);
        release.lock().unwrap().extend([c, a]);
        q.process(true);
        assert_eq!(g.drv.pop_used().unwrap(), Some((c, 1)));
        assert_eq!(g.drv.pop_used().unwrap(), Some((a, 1)));
        let mut expected = ring_pages.clone();
        expected.extend(pages(page(1) + 2048, 4096));
        expected.extend(pages(page(3), 1));
        expected.extend(pages(page(8), 1));
        assert_eq!(marked(&log_file), expected);
        // Logging off: nothing more is marked.
        q.ring.set_log(None);
        clear(&log_file);
        let d = g.drv.add(&[buf(page(1), 4096, true)]).unwrap();
        assert_eq!(q.process(true), 1);
        release.lock().unwrap().push(d);
        q.process(true);
        assert_eq!(g.drv.pop_used().unwrap(), Some((d, 1)));
        assert!(marked(&log_file).is_empty());
    }

    fn runtime_packed(
        g: &crate::packed::tests::Guest,
        handler: Box<dyn QueueHandler>,
    ) -> QueueRuntime {
        QueueRuntime::new(QueueStart {
            owner: 0,
            index: 0,
            mem: g.mem.clone(),
            vq: g.device_queue(false).into(),
            inflight: None,
            handler,
            call: None,
            kick: None,
            errors: Arc::new(GuestErrors::new("test")),
            resubmit: Vec::new(),
            log: None,
        })
    }
}
