//! Poller threads. Each owns some virtqueues (of one or several devices) and runs them without
//! locks: avail ring → chain → request → inflight record → backend → completion → used ring.
//! The protocol thread talks to a worker only through its mailbox, which the worker checks
//! with one atomic load per loop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::BackendQueue;
use crate::blk::{self, status, Limits, Request, Verdict, ID_BYTES};
use crate::chain::Chain;
use crate::inflight::InflightQueue;
use crate::memory::GuestMemory;
use crate::virtq::DeviceQueue;
use vmm_sys_util::eventfd::EventFd;

/// The mapped inflight region, shared by the device and its queues.
pub struct InflightMap {
    /// Start of the mapping.
    pub ptr: *mut u8,
    /// Length.
    pub len: usize,
    /// The fd (kept so the mapping's file stays referenced).
    pub file: File,
}

// SAFETY: shared memory used through raw pointers; each queue touches only its own region.
unsafe impl Send for InflightMap {}
// SAFETY: as above.
unsafe impl Sync for InflightMap {}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Everything a worker needs to run one virtqueue.
pub struct QueueStart {
    /// Device-wide queue index.
    pub index: u16,
    /// Guest memory (kept mapped while the queue runs).
    pub mem: Arc<GuestMemory>,
    /// The ring.
    pub vq: DeviceQueue,
    /// The queue's inflight region, if tracking is on.
    pub inflight: Option<(InflightQueue, Arc<InflightMap>)>,
    /// The backend queue.
    pub backend: Box<dyn BackendQueue>,
    /// Call eventfd (interrupts to the guest).
    pub call: Option<File>,
    /// Kick eventfd (the guest's notifications).
    pub kick: Option<File>,
    /// Request limits.
    pub limits: Limits,
    /// GET_ID answer.
    pub id: [u8; ID_BYTES],
    /// Heads to run again first, oldest first (from inflight recovery).
    pub resubmit: Vec<u16>,
}

/// A stopped queue's final state.
#[derive(Debug, Clone, Copy)]
pub struct QueueStopped {
    /// Queue index.
    pub index: u16,
    /// Next avail index (what GET_VRING_BASE returns).
    pub next_avail: u16,
    /// Requests still in the backend when the drain deadline passed.
    pub abandoned: usize,
}

enum Command {
    Start(Box<QueueStart>),
    /// Stop queues (all when `index` is None), draining the backend first; publish what
    /// completes when `publish` is set.
    Stop {
        index: Option<u16>,
        publish: bool,
        reply: mpsc::Sender<QueueStopped>,
    },
    /// Replace a running queue's call eventfd.
    SetCall {
        index: u16,
        call: Option<File>,
    },
    Exit,
}

struct Mailbox {
    pending: AtomicBool,
    commands: Mutex<Vec<Command>>,
    wake: EventFd,
}

/// Tuning of the poll loop.
#[derive(Debug, Clone, Copy)]
pub struct PollMode {
    /// Empty loops before the worker re-enables kicks and sleeps; `None`: never sleep.
    pub idle_loops_before_sleep: Option<u32>,
}

/// A poller thread.
pub struct Worker {
    mailbox: Arc<Mailbox>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn signal(fd: &File) {
    let one: u64 = 1;
    // SAFETY: 8-byte write to an eventfd.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

fn drain_eventfd(fd: &File) {
    let mut v: u64 = 0;
    // SAFETY: 8-byte read from a non-blocking eventfd (EAGAIN when empty).
    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

impl Worker {
    /// Starts a poller thread, pinned to `cpu` when given.
    pub fn spawn(name: String, cpu: Option<usize>, mode: PollMode) -> Self {
        let mailbox = Arc::new(Mailbox {
            pending: AtomicBool::new(false),
            commands: Mutex::new(Vec::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .expect("eventfd for a poller mailbox"),
        });
        let mb = mailbox.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                        eprintln!("warning: could not pin poller to cpu {cpu}");
                    }
                }
                run(&mb, mode)
            })
            .expect("spawning a poller thread");
        Self {
            mailbox,
            thread: Some(thread),
        }
    }

    fn send(&self, command: Command) {
        self.mailbox
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(command);
        self.mailbox.pending.store(true, Ordering::Release);
        let _ = self.mailbox.wake.write(1);
    }

    /// Hands a queue to this worker.
    pub fn start(&self, queue: QueueStart) {
        self.send(Command::Start(Box::new(queue)));
    }

    /// Gives a running queue a new call eventfd.
    pub fn set_call(&self, index: u16, call: Option<File>) {
        self.send(Command::SetCall { index, call });
    }

    /// Stops one queue (or all), draining in-flight requests; returns their final states.
    pub fn stop(&self, index: Option<u16>, publish: bool) -> Vec<QueueStopped> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::Stop {
            index,
            publish,
            reply,
        });
        rx.iter().collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.send(Command::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a stop waits for the backend to finish what it has.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Requests taken from one ring per loop before the others get a turn.
const BUDGET: usize = 64;

fn run(mailbox: &Mailbox, mode: PollMode) {
    let mut queues: Vec<QueueRuntime> = Vec::new();
    let mut idle = 0u32;
    loop {
        if mailbox.pending.load(Ordering::Acquire) {
            mailbox.pending.store(false, Ordering::Release);
            let commands: Vec<Command> =
                std::mem::take(&mut *mailbox.commands.lock().unwrap_or_else(|e| e.into_inner()));
            for c in commands {
                match c {
                    Command::Start(q) => queues.push(QueueRuntime::new(*q)),
                    Command::Stop {
                        index,
                        publish,
                        reply,
                    } => {
                        let mut kept = Vec::new();
                        for mut q in queues.drain(..) {
                            if index.is_none_or(|i| i == q.index) {
                                let _ = reply.send(q.stop(publish));
                            } else {
                                kept.push(q);
                            }
                        }
                        queues = kept;
                    }
                    Command::SetCall { index, call } => {
                        if let Some(q) = queues.iter_mut().find(|q| q.index == index) {
                            q.call = call;
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
        }
        let mut work = 0;
        for q in queues.iter_mut() {
            work += q.process(true);
        }
        if work > 0 {
            idle = 0;
            continue;
        }
        idle += 1;
        match mode.idle_loops_before_sleep {
            Some(limit) if idle >= limit => {
                sleep_until_kicked(mailbox, &mut queues);
                idle = 0;
            }
            _ => std::hint::spin_loop(),
        }
    }
}

/// Re-enables kicks, checks once more, and sleeps on the kick eventfds and the mailbox.
fn sleep_until_kicked(mailbox: &Mailbox, queues: &mut [QueueRuntime]) {
    for q in queues.iter_mut() {
        q.vq.set_kicks(true);
    }
    let busy = queues
        .iter()
        .any(|q| q.vq.has_avail() || q.backend.in_flight() > 0 || !q.resubmit.is_empty());
    if !busy {
        let mut fds: Vec<libc::pollfd> = queues
            .iter()
            .filter_map(|q| q.kick.as_ref())
            .map(|k| libc::pollfd {
                fd: k.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        fds.push(libc::pollfd {
            fd: mailbox.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: a valid pollfd array.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        let _ = mailbox.wake.read();
        for q in queues.iter() {
            if let Some(k) = &q.kick {
                drain_eventfd(k);
            }
        }
    }
    for q in queues.iter_mut() {
        q.vq.set_kicks(false);
    }
}

#[derive(Clone, Copy)]
struct Slot {
    status: *mut u8,
    written: u32,
}

/// Writes a request's status byte and queues its head for the used ring.
fn finish(slots: &[Slot], completed: &mut Vec<u16>, head: u16, st: u8) {
    let Some(slot) = slots.get(usize::from(head)) else {
        return;
    };
    if !slot.status.is_null() {
        // SAFETY: the status byte was translated inside guest memory when the chain was
        // walked; the guest owns the buffer until we publish it.
        unsafe { slot.status.write_volatile(st) };
    }
    completed.push(head);
}

struct QueueRuntime {
    index: u16,
    mem: Arc<GuestMemory>,
    vq: DeviceQueue,
    inflight: Option<(InflightQueue, Arc<InflightMap>)>,
    backend: Box<dyn BackendQueue>,
    call: Option<File>,
    kick: Option<File>,
    limits: Limits,
    id: [u8; ID_BYTES],
    resubmit: Vec<u16>,
    chain: Chain,
    request: Box<Request>,
    slots: Vec<Slot>,
    completed: Vec<u16>,
    broken: bool,
    reported: u32,
}

// SAFETY: the raw pointers it holds (status bytes, request buffers) point into guest memory
// that `mem` keeps mapped; one thread runs the queue at a time.
unsafe impl Send for QueueRuntime {}

impl QueueRuntime {
    fn new(q: QueueStart) -> Self {
        let size = usize::from(q.vq.size());
        let mut resubmit = q.resubmit;
        resubmit.reverse(); // popped from the end: oldest first
        let mut runtime = Self {
            index: q.index,
            mem: q.mem,
            vq: q.vq,
            inflight: q.inflight,
            backend: q.backend,
            call: q.call,
            kick: q.kick,
            limits: q.limits,
            id: q.id,
            resubmit,
            chain: Chain::default(),
            request: Box::default(),
            slots: vec![
                Slot {
                    status: std::ptr::null_mut(),
                    written: 0
                };
                size
            ],
            completed: Vec::with_capacity(size),
            broken: false,
            reported: 0,
        };
        runtime.vq.set_kicks(false);
        // Whatever the guest queued while no one was serving the ring is picked up by polling.
        runtime
    }

    fn complain(&mut self, what: std::fmt::Arguments) {
        // Hostile guests must not flood the log: the first few, then silence.
        if self.reported < 10 {
            eprintln!("queue {}: {what}", self.index);
            self.reported += 1;
        }
    }

    /// Walks, checks and submits the chain at `head`.
    fn start(&mut self, head: u16) {
        if let Err(e) = self.chain.walk(&self.vq, &self.mem, head) {
            self.complain(format_args!("head {head}: {e}; returned without status"));
            self.slots[usize::from(head)] = Slot {
                status: std::ptr::null_mut(),
                written: 0,
            };
            self.completed.push(head);
            return;
        }
        let verdict = blk::parse(
            self.chain.segments(),
            &self.limits,
            &self.id,
            &mut self.request,
        );
        let written = match self.request.op {
            blk::Operation::Read => self.request.data_len as u32 + 1,
            _ => 1,
        };
        match verdict {
            Verdict::Submit => {
                self.slots[usize::from(head)] = Slot {
                    status: self.request.status,
                    written,
                };
                if let Err(e) = self.backend.submit(&self.request, head) {
                    self.complain(format_args!("head {head}: {e}"));
                    self.finish(head, status::IOERR);
                }
            }
            Verdict::Complete(st) => {
                let written = if st == status::OK
                    && written == 1
                    && self.request.data_len > 0
                    && self.request.data[0].write
                {
                    // GET_ID wrote the id into the data buffers.
                    self.request.data_len.min(ID_BYTES as u64) as u32 + 1
                } else {
                    1
                };
                if st != status::OK {
                    self.complain(format_args!(
                        "head {head}: request refused with status {st}"
                    ));
                }
                self.slots[usize::from(head)] = Slot {
                    status: self.request.status,
                    written,
                };
                self.finish(head, st);
            }
            Verdict::Drop => {
                self.complain(format_args!(
                    "head {head}: no status byte; returned without status"
                ));
                self.slots[usize::from(head)] = Slot {
                    status: std::ptr::null_mut(),
                    written: 0,
                };
                self.completed.push(head);
            }
        }
    }

    fn finish(&mut self, head: u16, st: u8) {
        finish(&self.slots, &mut self.completed, head, st);
    }

    /// One round: resubmissions, new requests, completions, publication. Returns work done.
    fn process(&mut self, take_new: bool) -> usize {
        if self.broken {
            return 0;
        }
        let mut work = 0;
        while self.backend.can_submit() {
            let Some(head) = self.resubmit.pop() else {
                break;
            };
            self.start(head);
            work += 1;
        }
        while take_new && self.resubmit.is_empty() && work < BUDGET && self.backend.can_submit() {
            match self.vq.pop() {
                Ok(Some(head)) => {
                    if let Some((inflight, _)) = &mut self.inflight {
                        inflight.begin(head);
                    }
                    self.start(head);
                    work += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    self.complain(format_args!("{e}; queue stopped until the device is reset"));
                    self.broken = true;
                    break;
                }
            }
        }
        self.backend.flush_submissions();
        // Finish every completion the backend reports, however many: the borrows are split
        // so the callback can write status bytes and queue used elements directly.
        let (slots, completed) = (&self.slots, &mut self.completed);
        work += self
            .backend
            .poll(&mut |head, st| finish(slots, completed, head, st));
        self.publish();
        work
    }

    fn publish(&mut self) {
        if self.completed.is_empty() {
            return;
        }
        if let Some((inflight, _)) = &mut self.inflight {
            inflight.prepare_batch(&self.completed);
        }
        for &head in &self.completed {
            let written = self.slots[usize::from(head)].written;
            self.vq.push_used(head, written);
        }
        self.vq.publish_used();
        if let Some((inflight, _)) = &mut self.inflight {
            inflight.finish_batch(&self.completed, self.vq.next_used);
        }
        self.completed.clear();
        if self.vq.needs_notification() {
            if let Some(call) = &self.call {
                signal(call);
            }
        }
    }

    fn stop(&mut self, publish: bool) -> QueueStopped {
        let deadline = Instant::now() + DRAIN_DEADLINE;
        while self.backend.in_flight() > 0 && Instant::now() < deadline {
            if publish {
                self.process(false);
            } else {
                // The connection is gone: let the backend finish, publish nothing; the
                // inflight region still lists these, so the next connection runs them again.
                self.backend.poll(&mut |_, _| {});
            }
            std::thread::yield_now();
        }
        QueueStopped {
            index: self.index,
            next_avail: self.vq.next_avail,
            abandoned: self.backend.in_flight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::req;
    use crate::virtq::{DriverBuffer, DriverQueue};

    /// Holds every request until `burst` have arrived, then completes them all in one poll.
    struct BurstBackend {
        held: Vec<u16>,
        burst: usize,
    }

    impl BackendQueue for BurstBackend {
        fn can_submit(&self) -> bool {
            true
        }
        fn submit(&mut self, _r: &Request, token: u16) -> crate::Result<()> {
            self.held.push(token);
            Ok(())
        }
        fn poll(&mut self, done: &mut dyn FnMut(u16, u8)) -> usize {
            if self.held.len() < self.burst {
                return 0;
            }
            let n = self.held.len();
            for t in self.held.drain(..) {
                done(t, status::OK);
            }
            n
        }
        fn in_flight(&self) -> usize {
            self.held.len()
        }
    }

    #[test]
    fn a_burst_of_completions_larger_than_a_round_is_all_published() {
        let size = 256u16;
        let file = crate::memory::tests::memfd(4 << 20);
        let mem = Arc::new(GuestMemory::from_table(&[(0, 4 << 20, 0, 0)], vec![file]).unwrap());
        let host = mem.translate(0, 4 << 20).unwrap();
        // SAFETY: the rings fit the first MiB of the 4 MiB region.
        let mut drv = unsafe { DriverQueue::new(host, 0, size) };
        let vq = DeviceQueue::new(&mem, size, drv.gpas.0, drv.gpas.1, drv.gpas.2, false).unwrap();
        let limits = Limits {
            capacity: 1 << 20,
            flush: true,
            discard: false,
            write_zeroes: false,
            max_range_sectors: 0,
            seg_max: 126,
        };
        let burst = 120; // more than a poll round (64), 240 of the 256 descriptors
        let mut q = QueueRuntime::new(QueueStart {
            index: 0,
            mem: mem.clone(),
            vq,
            inflight: None,
            backend: Box::new(BurstBackend {
                held: Vec::new(),
                burst,
            }),
            call: None,
            kick: None,
            limits,
            id: [0; ID_BYTES],
            resubmit: Vec::new(),
        });
        for i in 0..burst as u64 {
            let hdr = (1 << 20) + 32 * i;
            // SAFETY: inside the region; a FLUSH header (type 4).
            unsafe { (host.add(hdr as usize) as *mut u32).write(req::FLUSH) };
            drv.add(&[
                DriverBuffer {
                    gpa: hdr,
                    len: 16,
                    write: false,
                },
                DriverBuffer {
                    gpa: hdr + 16,
                    len: 1,
                    write: true,
                },
            ])
            .unwrap();
        }
        for _ in 0..10 {
            q.process(true);
        }
        let mut used = 0;
        while drv.pop_used().unwrap().is_some() {
            used += 1;
        }
        assert_eq!(
            used, burst,
            "every completion of the burst reached the used ring"
        );
    }
}
