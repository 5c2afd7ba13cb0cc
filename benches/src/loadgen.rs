//! A vhost-user-blk frontend that is also the guest driver: it shares memory with the backend
//! like QEMU does (a memfd), negotiates like QEMU (keeping the inflight fd across reconnects,
//! rewinding each ring's avail index to its used index when the backend comes back), and puts
//! virtio-blk requests on the rings itself. In verify mode every write stamps its blocks with
//! (block, generation, seed) and every read checks them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vfblk_bridge::virtio_blk::{req, status};
use vfblk_vhost::driver::{DriverBuffer, DriverQueue};
use vfblk_vhost::packed::{Position, EVENT_BYTES, VIRTIO_F_RING_PACKED};
use vfblk_vhost::packed_driver::{send_packed_vring_base, Interrupts, PackedDriverQueue};

use crate::histogram::Histogram;
use crate::patterns::mix;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Random reads.
    Read,
    /// Random writes.
    Write,
    /// Random reads and writes, this percentage reads.
    Mixed(u8),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The backend's socket.
    pub socket: PathBuf,
    /// Virtqueues.
    pub queues: u16,
    /// Entries per virtqueue.
    pub queue_size: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Bytes per request (a multiple of 512).
    pub block_size: u32,
    /// Access pattern.
    pub workload: Workload,
    /// Stamp writes and check reads.
    pub verify: bool,
    /// Check every read against the bytes of this file at the same offset (read into memory
    /// at the start): a disk whose content is known beforehand, such as a read-only image,
    /// which [`Options::verify`] cannot check as it knows only what it wrote itself.
    pub expect_image: Option<PathBuf>,
    /// Seconds of I/O.
    pub seconds: f64,
    /// Use INFLIGHT_SHMFD when the backend offers it.
    pub inflight: bool,
    /// How long to wait for a vanished backend.
    pub reconnect_timeout: Duration,
    /// A request outstanding this long is reported lost.
    pub io_timeout: Duration,
    /// Pattern seed.
    pub seed: u32,
    /// Back guest memory with 2 MiB hugepages (as QEMU with a hugetlbfs memory backend).
    pub hugepages: bool,
    /// Negotiate EVENT_IDX and sleep on the call eventfd like a guest driver does, counting
    /// every time the device published completions without interrupting (a guest would hang
    /// there until something else woke it).
    pub interrupts: bool,
    /// Wait this long between SET_VRING_KICK and SET_VRING_CALL when (re)connecting: the
    /// window in which a backend re-runs requests with no call fd to signal.
    pub call_after_kick: Duration,
    /// Give each data buffer as two descriptors that start inside a page and split it off a
    /// page boundary: a scatter list NVMe PRPs cannot describe (SGLs or bounce buffers must).
    pub unaligned: bool,
    /// A polling driver: ask the device for no interrupts (VRING_AVAIL_F_NO_INTERRUPT), as
    /// SPDK's and DPDK's virtio drivers do; not with `interrupts`.
    pub polled: bool,
    /// Requests per second over all queues (None: as fast as the queue depth allows). A
    /// paced frontend leaves the machine mostly idle, so its longest request measures how
    /// long the backend held it, not how long the scheduler did.
    pub rate: Option<f64>,
    /// Latencies and completion gaps count only after this long (fio's ramp_time): start-up
    /// (page faults, other frontends connecting) is not what is measured.
    pub ramp_time: Duration,
    /// Blocks in order (wrapping at the end of the disk) instead of at random.
    pub sequential: bool,
    /// Report every gap between completions longer than this, with the time it ended
    /// (CLOCK_MONOTONIC, comparable with other processes' clocks): whoever disturbs the
    /// backend at known times can find the pause each disturbance caused.
    pub log_gaps_over: Option<Duration>,
    /// Act as the source of a live migration: hand the backend a dirty log, turn logging on
    /// (LOG_ALL, used-ring logging), and at the end stop the rings and check that exactly
    /// the pages the device wrote (read data, status bytes, the used rings) are marked.
    pub dirty_log: bool,
    /// Give the backend a backend request channel (BACKEND_REQ, SET_BACKEND_REQ_FD) and take
    /// config changes on it as QEMU does: read the config space again (GET_CONFIG) before
    /// acknowledging, and use a grown disk's new blocks from then on.
    pub config_changes: bool,
    /// Negotiate VIRTIO_F_RING_PACKED and drive packed virtqueues (virtio 1.1 §2.7);
    /// split rings otherwise.
    pub packed: bool,
}

/// Set by SIGINT or SIGTERM once [`stop_on_signals`] is in place.
static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM end a run early with its report (what is in flight completes
/// first), as fio does: a caller that does not know beforehand how long it needs the load
/// stops it when done.
pub fn stop_on_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that only stores to an atomic (async-signal-safe).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = request_stop as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// SIGINT or SIGTERM arrived (after [`stop_on_signals`]).
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Most gaps a report lists.
const MAX_GAPS_LOGGED: usize = 100_000;

/// What happened.
#[derive(Default)]
pub struct Report {
    /// Requests completed.
    pub ios: u64,
    /// Of which reads.
    pub reads: u64,
    /// Reads whose data did not match the last completed write.
    pub verify_errors: u64,
    /// Requests completed with a status other than OK.
    pub failed: u64,
    /// Requests that did not complete within the I/O timeout.
    pub lost: u64,
    /// Used elements for heads not in flight (a request completed twice, or garbage).
    pub not_a_head: u64,
    /// Completions published without an interrupt (with `interrupts`): the load generator
    /// found them only after sleeping a whole interrupt timeout.
    pub missed_interrupts: u64,
    /// Times the backend went away and came back.
    pub reconnects: u64,
    /// Per reconnect: ms from the last completion before the backend vanished to the first
    /// completion after it came back.
    pub pauses_ms: Vec<f64>,
    /// The longest time between two completions while connected (reconnect pauses apart):
    /// how long the backend ever left this frontend waiting.
    pub max_gap_ms: f64,
    /// With [`Options::log_gaps_over`]: (CLOCK_MONOTONIC ns at the gap's end, gap in ms).
    pub gaps: Vec<(u64, f64)>,
    /// Latency histogram.
    pub latency: Histogram,
    /// Measured seconds.
    pub seconds: f64,
    /// Inflight tracking was in use.
    pub inflight: bool,
    /// The rings were packed (VIRTIO_F_RING_PACKED negotiated).
    pub packed: bool,
    /// First error messages (at most 10).
    pub errors: Vec<String>,
    /// With [`Options::dirty_log`]: what the log showed.
    pub dirty_log: Option<DirtyLogCheck>,
    /// With [`Options::config_changes`]: each config change the backend told, as the
    /// capacity (sectors) the config space then held.
    pub config_changes: Vec<u64>,
    /// The device's capacity in sectors at the end.
    pub capacity_sectors: u64,
}

/// A migration's dirty log checked against the pages the device wrote.
#[derive(Debug, Clone, Default)]
pub struct DirtyLogCheck {
    /// Pages the device wrote (4 KiB, guest-physical).
    pub written: u64,
    /// Pages marked in the log.
    pub marked: u64,
    /// Pages written and not marked: a migration would lose their contents.
    pub missing: u64,
    /// Pages marked and never written by the device.
    pub extra: u64,
}

impl Report {
    /// Nothing went wrong: no verify error, failure, loss, stray head or error message.
    pub fn clean(&self) -> bool {
        self.verify_errors == 0
            && self.missed_interrupts == 0
            && self.failed == 0
            && self.lost == 0
            && self.not_a_head == 0
            && self.errors.is_empty()
            && self
                .dirty_log
                .as_ref()
                .is_none_or(|d| d.missing == 0 && d.extra == 0)
    }

    /// Completed requests per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.seconds.max(1e-9)
    }

    /// The report as JSON (what `--json` prints; the benchmarks and tests read it).
    pub fn to_json(&self) -> serde_json::Value {
        let us = |q: f64| (self.latency.quantile_ns(q) as f64 / 100.0).round() / 10.0;
        let max_pause = self.pauses_ms.iter().cloned().fold(0.0, f64::max);
        serde_json::json!({
            "ios": self.ios,
            "reads": self.reads,
            "seconds": self.seconds,
            "iops": self.iops(),
            "lat_p50_us": us(0.5),
            "lat_p99_us": us(0.99),
            "lat_p999_us": us(0.999),
            "lat_max_us": (self.latency.max_ns() as f64 / 100.0).round() / 10.0,
            "lat_cdf_us": self.latency.cdf().iter().map(|&(ns, f)| [ns as f64 / 1000.0, f]).collect::<Vec<_>>(),
            "verify_errors": self.verify_errors,
            "failed": self.failed,
            "lost": self.lost,
            "not_a_head": self.not_a_head,
            "missed_interrupts": self.missed_interrupts,
            "reconnects": self.reconnects,
            "inflight": self.inflight,
            "packed": self.packed,
            "pauses_ms": self.pauses_ms,
            "max_pause_ms": max_pause,
            "max_gap_ms": self.max_gap_ms,
            "gaps": self.gaps,
            "errors": self.errors,
            "config_changes": self.config_changes,
            "capacity_sectors": self.capacity_sectors,
            "dirty_log": self.dirty_log.as_ref().map(|d| serde_json::json!({
                "written_pages": d.written,
                "marked_pages": d.marked,
                "missing_pages": d.missing,
                "extra_pages": d.extra,
            })),
        })
    }

    /// What a load tool's `main` ends with: the report (JSON or text) on stdout and a
    /// failure exit status unless it is clean, or the error that stopped the run.
    pub fn print_and_exit_code(
        program: &str,
        result: crate::Result<Report>,
        json: bool,
    ) -> std::process::ExitCode {
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{program}: {}", crate::error_chain(&e));
                return std::process::ExitCode::FAILURE;
            }
        };
        if json {
            println!("{}", report.to_json());
        } else {
            print!("{}", report.to_text());
        }
        if report.clean() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        }
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let us = |q: f64| self.latency.quantile_ns(q) as f64 / 1000.0;
        let max_pause = self.pauses_ms.iter().cloned().fold(0.0, f64::max);
        let mut out = format!(
            "{} I/Os in {:.1} s: {:.0} IOPS; latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us\n",
            self.ios,
            self.seconds,
            self.iops(),
            us(0.5),
            us(0.99),
            us(0.999),
            self.latency.max_ns() as f64 / 1000.0
        );
        out.push_str(&format!(
            "verify errors {}, failed {}, lost {}, not-a-head {}; {} reconnect(s), {} rings, inflight tracking {}, longest pause {:.1} ms\n",
            self.verify_errors,
            self.failed,
            self.lost,
            self.not_a_head,
            self.reconnects,
            if self.packed { "packed" } else { "split" },
            if self.inflight { "on" } else { "off" },
            max_pause
        ));
        if let Some(d) = &self.dirty_log {
            out.push_str(&format!(
                "dirty log: {} page(s) written by the device, {} marked, {} missing, {} marked but not written\n",
                d.written, d.marked, d.missing, d.extra
            ));
        }
        for e in &self.errors {
            out.push_str(&format!("  error: {e}\n"));
        }
        out
    }
}

struct Outstanding {
    busy: bool,
    write: bool,
    unit: u64,
    generation: u32,
    issued: Instant,
}

/// A queue's rings in the layout negotiated. One match per ring operation: the split path
/// does the work it did before this enum, behind a branch that always goes the same way.
enum Rings {
    Split(DriverQueue),
    Packed(PackedDriverQueue),
}

impl Rings {
    /// Bytes the rings of a `size`-entry queue take in this layout.
    fn bytes(packed: bool, size: u16) -> usize {
        if packed {
            PackedDriverQueue::bytes(size)
        } else {
            DriverQueue::bytes(size)
        }
    }

    /// Guest-physical addresses SET_VRING_ADDR names: descriptors, avail (driver event),
    /// used (device event).
    fn gpas(&self) -> (u64, u64, u64) {
        match self {
            Self::Split(r) => r.gpas,
            Self::Packed(r) => r.gpas,
        }
    }

    /// Where what was made available so far ends: the mark [`Rings::needs_kick`] compares.
    #[inline]
    fn avail_mark(&self) -> u16 {
        match self {
            Self::Split(r) => r.avail_idx(),
            Self::Packed(r) => r.next_avail().to_event(),
        }
    }

    #[inline]
    fn add(&mut self, buffers: &[DriverBuffer]) -> Option<u16> {
        match self {
            Self::Split(r) => r.add(buffers),
            Self::Packed(r) => r.add(buffers),
        }
    }

    #[inline]
    fn pop_used(&mut self) -> vfblk_vhost::Result<Option<(u16, u32)>> {
        match self {
            Self::Split(r) => r.pop_used(),
            Self::Packed(r) => r.pop_used(),
        }
    }

    /// Whether the device wants a kick for what was made available since `old`.
    #[inline]
    fn needs_kick(&self, old: u16, event_idx: bool) -> bool {
        match self {
            Self::Split(r) => r.needs_kick(old, event_idx),
            Self::Packed(r) => r.needs_kick(Position::from_event(old)),
        }
    }

    /// Asks the device for no interrupts at all (a polling driver), or for every one.
    fn suppress_interrupts(&mut self, suppress: bool) {
        match self {
            Self::Split(r) => r.suppress_interrupts(suppress),
            Self::Packed(r) => r.set_interrupts(if suppress {
                Interrupts::Disable
            } else {
                Interrupts::Enable
            }),
        }
    }

    /// Under EVENT_IDX, asks for an interrupt at the next completion; returns whether one
    /// is there already (published before the request was visible, so never signalled).
    fn arm_interrupt(&mut self) -> bool {
        match self {
            Self::Split(r) => {
                let last = r.last_used();
                r.set_used_event(last);
                r.used_idx_in_memory() != last
            }
            Self::Packed(r) => {
                r.set_interrupts(Interrupts::At(r.last_used()));
                r.has_used()
            }
        }
    }

    /// Whether the device published completions not taken yet.
    fn unseen(&self) -> bool {
        match self {
            Self::Split(r) => r.used_idx_in_memory() != r.last_used(),
            Self::Packed(r) => r.has_used(),
        }
    }

    /// SET_VRING_BASE's value when (re)connecting. A split ring is rewound to its used
    /// index, as QEMU does (the device takes again what it had not returned). For a packed
    /// ring with an inflight region, the positions it started from, as QEMU sends them (it
    /// keeps none of its own after a backend dies): the region says where the ring stands.
    /// Without a region, the driver's own positions, right only when nothing is in flight.
    fn base(&self, inflight: bool) -> Base {
        match self {
            Self::Split(r) => Base::Split(r.used_idx_in_memory()),
            Self::Packed(_) if inflight => {
                Base::Packed(u32::from(Position::START.to_event()) * 0x1_0001)
            }
            Self::Packed(r) => Base::Packed(
                u32::from(r.next_avail().to_event()) | u32::from(r.last_used().to_event()) << 16,
            ),
        }
    }

    /// Marks in `bitmap` the pages the device writes whenever it publishes (logged in a
    /// migration): a split ring's used ring; a packed ring's descriptors (used ones
    /// overwrite them) and its device event area.
    fn mark_device_written(&self, size: u16, bitmap: &mut [u8]) {
        match self {
            Self::Split(r) => {
                let used_len = vfblk_vhost::virtq::ring_sizes(size).2 as u64;
                set_pages(bitmap, r.gpas.2, used_len);
            }
            Self::Packed(r) => {
                set_pages(bitmap, r.gpas.0, 16 * u64::from(size));
                set_pages(bitmap, r.gpas.2, EVENT_BYTES as u64);
            }
        }
    }
}

/// SET_VRING_BASE's value in a ring's layout.
enum Base {
    /// The next avail index.
    Split(u16),
    /// Avail position in bits 0-15, used position in bits 16-31 (each with its wrap
    /// counter in the top bit).
    Packed(u32),
}

struct Queue {
    ring: Rings,
    kick: EventFd,
    call: EventFd,
    slots: Vec<Outstanding>,
    head_to_slot: Vec<Option<usize>>,
    /// GPA of each slot's control area (header at +0, status at +16) and data buffer.
    control_gpa: u64,
    data_gpa: u64,
}

/// Guest memory: a memfd shared with the backend, mapped here.
struct Memory {
    file: File,
    base: *mut u8,
    len: usize,
    _map: memmap2::MmapRaw,
}

/// The running load generator.
pub struct LoadGen {
    opts: Options,
    mem: Memory,
    queues: Vec<Queue>,
    frontend: Option<(Frontend, UnixStream)>,
    /// Our end of the backend request channel (with [`Options::config_changes`]).
    backend_channel: Option<UnixStream>,
    inflight_file: Option<(VhostUserInflight, File)>,
    capacity_sectors: u64,
    units: u64,
    expected: Vec<u32>,
    busy_units: Vec<bool>,
    next_generation: u32,
    /// The last unit a sequential workload used.
    next_unit: u64,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    event_idx: bool,
    rng: u64,
    report: Report,
    /// The expected contents of a verified read (reused: no allocation per I/O).
    scratch: Vec<u8>,
    /// With [`Options::expect_image`]: the file's bytes.
    expect_image: Option<Vec<u8>>,
    /// Requests issued before this are not in the latency histogram.
    measure_from: Instant,
    /// With [`Options::dirty_log`]: the log and what was seen written.
    dirty_log: Option<LogWatch>,
}

/// Bytes of guest memory one dirty-log bit stands for.
const LOG_PAGE: u64 = 4096;
/// How often the log is synced (read and cleared), as QEMU does while it migrates.
const LOG_SYNC_EVERY: Duration = Duration::from_millis(50);

/// A migration's dirty log as the frontend watches it. It is synced every
/// [`LOG_SYNC_EVERY`]: read and cleared word by word, as QEMU does between passes. Between
/// two syncs (an epoch) the pages of every completion seen are noted; the device marks a
/// page before it publishes the completion, so each noted page must be marked in this
/// epoch's or the previous one's snapshot, and each marked page must be noted in its epoch
/// or the next (or be a used ring's). A device that stops marking after any event (an
/// upgrade, a restart) shows in the next epoch with completions.
struct LogWatch {
    log: Memory,
    /// The pages the device writes at every publication (used rings; a packed ring's
    /// descriptors and device event area): marked whenever logging starts, and noted as
    /// written with each completion of their queue.
    used: Vec<u8>,
    /// Pages of completions seen in this epoch and the previous one.
    seen: Vec<u8>,
    seen_before: Vec<u8>,
    /// The previous sync's snapshot of the log.
    marked_before: Vec<u8>,
    next_sync: Instant,
    check: DirtyLogCheck,
}

impl LogWatch {
    fn new(log: Memory, used: Vec<u8>) -> Self {
        let n = used.len();
        Self {
            log,
            used,
            seen: vec![0; n],
            seen_before: vec![0; n],
            marked_before: vec![0; n],
            next_sync: Instant::now() + LOG_SYNC_EVERY,
            check: DirtyLogCheck::default(),
        }
    }

    /// Reads and clears the log (an atomic swap per 64-bit word, as QEMU does) and checks
    /// the epoch that ends, describing the first pages found wrong in `errors`.
    fn sync(&mut self, errors: &mut Vec<String>) {
        let mut marked = vec![0u8; self.used.len()];
        for (w, chunk) in marked.chunks_mut(8).enumerate() {
            // SAFETY: word `w` lies in our mapping of the log (its length is a multiple of
            // 8, the mapping page-aligned); the backend only ORs bits into it.
            let word =
                unsafe { &*(self.log.base.add(8 * w) as *const std::sync::atomic::AtomicU64) };
            let bits = word.swap(0, std::sync::atomic::Ordering::AcqRel);
            chunk.copy_from_slice(&bits.to_le_bytes()[..chunk.len()]);
        }
        for (byte, &now) in marked.iter().enumerate() {
            let before = self.marked_before[byte];
            let missing = self.seen[byte] & !(now | before);
            let allowed = self.seen_before[byte] | self.seen[byte] | self.used[byte];
            let extra = before & !allowed;
            self.check.written += u64::from(self.seen[byte].count_ones());
            self.check.marked += u64::from(now.count_ones());
            self.check.missing += u64::from(missing.count_ones());
            self.check.extra += u64::from(extra.count_ones());
            for (bits, what) in [
                (missing, "written by the device and not marked"),
                (extra, "marked and not written by the device"),
            ] {
                for bit in 0..8 {
                    if bits & (1 << bit) != 0 && errors.len() < 10 {
                        let page = byte as u64 * 8 + bit;
                        errors.push(format!("dirty log: page at {:#x} {what}", page * LOG_PAGE));
                    }
                }
            }
        }
        self.marked_before = marked;
        std::mem::swap(&mut self.seen_before, &mut self.seen);
        self.seen.iter_mut().for_each(|b| *b = 0);
        self.next_sync = Instant::now() + LOG_SYNC_EVERY;
    }
}

/// Sets the bits of the pages of `len` bytes at `gpa` in a page bitmap.
fn set_pages(bitmap: &mut [u8], gpa: u64, len: u64) {
    for page in gpa / LOG_PAGE..=(gpa + len.max(1) - 1) / LOG_PAGE {
        if let Some(b) = bitmap.get_mut((page / 8) as usize) {
            *b |= 1 << (page % 8);
        }
    }
}

fn memfd(len: usize, hugepages: bool) -> std::io::Result<Memory> {
    let (flags, len) = if hugepages {
        (
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            len.div_ceil(2 << 20) * (2 << 20),
        )
    } else {
        (libc::MFD_CLOEXEC, len)
    };
    let file = vfblk_hugepages::memfd("vfblk-loadgen-guest", flags, len as u64)?;
    let map = memmap2::MmapOptions::new().len(len).map_raw(&file)?;
    Ok(Memory {
        file,
        base: map.as_mut_ptr(),
        len,
        _map: map,
    })
}

/// Bytes between slots' data buffers (an extra page leaves room for unaligned starts).
fn data_stride(opts: &Options) -> usize {
    opts.block_size as usize + if opts.unaligned { 4096 } else { 0 }
}

/// Where an unaligned data buffer starts within its page.
const UNALIGNED_START: u64 = 0x100;

/// How often the running load generator checks that the backend's socket is still open.
const LIVENESS_EVERY: Duration = Duration::from_millis(1);
/// How often it looks for requests outstanding longer than the I/O timeout.
const STUCK_CHECK_EVERY: Duration = Duration::from_millis(100);

/// How long a load generator that waits on interrupts sleeps before looking anyway.
const INTERRUPT_WAIT_MS: i32 = 2000;

/// Fills `out` with the verify pattern of block `unit` at write `generation`: the block and
/// generation in the first words of every 512 bytes, the rest derived from them.
pub(crate) fn stamp(unit: u64, generation: u32, seed: u32, out: &mut [u8]) {
    for (w, word) in out.chunks_exact_mut(8).enumerate() {
        let v = match w % 64 {
            0 => unit,
            1 => u64::from(generation) | (u64::from(seed) << 32),
            _ => mix(unit ^ (u64::from(generation) << 40) ^ (w as u64)),
        };
        word.copy_from_slice(&v.to_le_bytes());
    }
}

impl LoadGen {
    /// Sets up guest memory and rings, and connects.
    pub fn new(opts: Options) -> crate::Result<Self> {
        Self::setup(opts).map_err(crate::Error::Run)
    }

    fn setup(opts: Options) -> Result<Self, String> {
        if opts.block_size == 0
            || opts.block_size % 512 != 0
            || opts.depth == 0
            || opts.depth >= opts.queue_size / 2
        {
            return Err(
                "block size must be a multiple of 512 and depth below half the queue size".into(),
            );
        }
        let ring_bytes = Rings::bytes(opts.packed, opts.queue_size).div_ceil(4096) * 4096;
        let control_bytes = (usize::from(opts.depth) * 32).div_ceil(4096) * 4096;
        let data_bytes = usize::from(opts.depth) * data_stride(&opts);
        let per_queue = ring_bytes + control_bytes + data_bytes.div_ceil(4096) * 4096;
        let total = per_queue * usize::from(opts.queues);
        let mem = memfd(total, opts.hugepages).map_err(|e| {
            format!(
                "guest memory ({}): {e}",
                if opts.hugepages {
                    "2 MiB hugepages"
                } else {
                    "memfd"
                }
            )
        })?;
        let mut queues = Vec::new();
        for q in 0..usize::from(opts.queues) {
            let off = q * per_queue;
            // Without verify, writes carry whatever their buffer holds: a pattern set once
            // here (not zeroes, which a backend could detect), so no write pays for a stamp.
            if !opts.verify {
                let data_off = off + ring_bytes + control_bytes;
                // SAFETY: the data area lies inside our mapping, before any ring uses it.
                unsafe { std::ptr::write_bytes(mem.base.add(data_off), 0x5a, data_bytes) };
            }
            // SAFETY: the ring area lies inside our zeroed mapping, page-aligned.
            let mut ring = unsafe {
                let host = mem.base.add(off);
                if opts.packed {
                    Rings::Packed(PackedDriverQueue::new(host, off as u64, opts.queue_size))
                } else {
                    Rings::Split(DriverQueue::new(host, off as u64, opts.queue_size))
                }
            };
            ring.suppress_interrupts(opts.polled && !opts.interrupts);
            let new_fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"));
            queues.push(Queue {
                ring,
                kick: new_fd()?,
                call: new_fd()?,
                slots: (0..opts.depth)
                    .map(|_| Outstanding {
                        busy: false,
                        write: false,
                        unit: 0,
                        generation: 0,
                        issued: Instant::now(),
                    })
                    .collect(),
                head_to_slot: vec![None; usize::from(opts.queue_size)],
                control_gpa: (off + ring_bytes) as u64,
                data_gpa: (off + ring_bytes + control_bytes) as u64,
            });
        }
        let mut lg = Self {
            rng: mix(u64::from(opts.seed) | 1),
            opts,
            mem,
            queues,
            frontend: None,
            backend_channel: None,
            inflight_file: None,
            capacity_sectors: 0,
            units: 0,
            expected: Vec::new(),
            busy_units: Vec::new(),
            next_generation: 1,
            next_unit: u64::MAX,
            event_idx: false,
            report: Report::default(),
            scratch: Vec::new(),
            expect_image: None,
            measure_from: Instant::now(),
            dirty_log: None,
        };
        if lg.opts.dirty_log {
            let bytes = (lg.mem.len as u64).div_ceil(LOG_PAGE).div_ceil(64) * 8;
            let log = memfd(bytes as usize, false).map_err(|e| format!("dirty log: {e}"))?;
            let mut used = vec![0u8; bytes as usize];
            for q in &lg.queues {
                q.ring.mark_device_written(lg.opts.queue_size, &mut used);
            }
            lg.dirty_log = Some(LogWatch::new(log, used));
        }
        // Like a frontend configured to reconnect, a handshake cut short (the backend died
        // while answering) is tried again until the reconnect deadline.
        let deadline = Instant::now() + lg.opts.reconnect_timeout;
        loop {
            match lg.connect(deadline) {
                Ok(()) => break,
                Err((true, e)) if Instant::now() < deadline => {
                    tracing::debug!("first connection lost ({e}); trying again");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((_, e)) => return Err(e),
            }
        }
        lg.units = lg.capacity_sectors * 512 / u64::from(lg.opts.block_size);
        if lg.units < u64::from(lg.opts.depth) * u64::from(lg.opts.queues) * 2 {
            return Err(format!(
                "the device ({} sectors) is too small for this depth",
                lg.capacity_sectors
            ));
        }
        lg.expected = vec![0; lg.units as usize];
        lg.busy_units = vec![false; lg.units as usize];
        if let Some(path) = &lg.opts.expect_image {
            let image = std::fs::read(path)
                .map_err(|e| format!("reading the expected image {}: {e}", path.display()))?;
            let disk = lg.units * u64::from(lg.opts.block_size);
            if (image.len() as u64) < disk {
                return Err(format!(
                    "the expected image {} has {} bytes, fewer than the {disk} the reads cover",
                    path.display(),
                    image.len()
                ));
            }
            lg.expect_image = Some(image);
        }
        Ok(lg)
    }

    /// Guest-physical address of slot `si`'s data buffer on queue `qi`.
    fn data_gpa(&self, qi: usize, si: usize) -> u64 {
        let start = if self.opts.unaligned {
            UNALIGNED_START
        } else {
            0
        };
        self.queues[qi].data_gpa + (si * data_stride(&self.opts)) as u64 + start
    }

    fn host(&self, gpa: u64) -> *mut u8 {
        debug_assert!((gpa as usize) < self.mem.len);
        // SAFETY: every GPA we use lies in our mapping (GPA = offset).
        unsafe { self.mem.base.add(gpa as usize) }
    }

    /// Connects (retrying until `deadline`) and negotiates like QEMU's vhost-user-blk. The
    /// error says whether the connection was lost during the handshake (the backend died)
    /// rather than refused.
    fn connect(&mut self, deadline: Instant) -> Result<(), (bool, String)> {
        let lost = std::cell::Cell::new(false);
        self.negotiate(deadline, &lost).map_err(|m| (lost.get(), m))
    }

    fn negotiate(&mut self, deadline: Instant, lost: &std::cell::Cell<bool>) -> Result<(), String> {
        let stream = loop {
            match UnixStream::connect(&self.opts.socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("connecting to {}: {e}", self.opts.socket.display())),
            }
        };
        let watch = stream.try_clone().map_err(|e| e.to_string())?;
        let mut fe = Frontend::from_stream(stream, u64::from(self.opts.queues));
        let e = |what: &str| {
            let what = what.to_string();
            move |err: vhost::Error| {
                if let vhost::Error::VhostUserProtocol(p) = &err {
                    if p.should_reconnect() || matches!(p, vhost::vhost_user::Error::Disconnected) {
                        lost.set(true);
                    }
                }
                format!("{what}: {err}")
            }
        };
        fe.set_owner().map_err(e("SET_OWNER"))?;
        let offered = fe.get_features().map_err(e("GET_FEATURES"))?;
        let wanted = (1u64 << 32)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (1 << 2)
            | (1 << 6)
            | (1 << 9)
            | (1 << 12)
            | if self.opts.interrupts { 1 << 29 } else { 0 }
            | if self.opts.packed {
                1 << VIRTIO_F_RING_PACKED
            } else {
                0
            };
        // The rings are laid out for one layout: a backend without the other cannot serve
        // them.
        if self.opts.packed && offered & (1 << VIRTIO_F_RING_PACKED) == 0 {
            return Err("the backend does not offer VIRTIO_F_RING_PACKED: no packed rings".into());
        }
        fe.set_features(offered & wanted)
            .map_err(e("SET_FEATURES"))?;
        self.report.packed = self.opts.packed;
        self.event_idx = offered & wanted & (1 << 29) != 0;
        let pf = fe
            .get_protocol_features()
            .map_err(e("GET_PROTOCOL_FEATURES"))?;
        let mut want_pf = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
        if self.opts.inflight {
            want_pf |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        if self.opts.dirty_log {
            want_pf |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        if self.opts.config_changes {
            want_pf |= VhostUserProtocolFeatures::BACKEND_REQ;
        }
        let pf = pf & want_pf;
        fe.set_protocol_features(pf)
            .map_err(e("SET_PROTOCOL_FEATURES"))?;
        self.backend_channel = None;
        if self.opts.config_changes {
            if !pf.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
                return Err("the backend does not offer BACKEND_REQ: no config changes".into());
            }
            // As QEMU: a socket pair, the other end to the backend.
            let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            fe.set_backend_request_fd(&theirs)
                .map_err(e("SET_BACKEND_REQ_FD"))?;
            ours.set_nonblocking(true)
                .map_err(|e| format!("backend channel: {e}"))?;
            self.backend_channel = Some(ours);
        }
        let (_, payload) = fe
            .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .map_err(e("GET_CONFIG"))?;
        if payload.len() < 8 {
            return Err("config space too short".into());
        }
        self.capacity_sectors = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
        self.report.capacity_sectors = self.capacity_sectors;
        self.report.inflight = pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let in_flight = self.queues.iter().any(|q| q.slots.iter().any(|s| s.busy));
        if self.opts.packed && !self.report.inflight && in_flight {
            // Used descriptors overwrite the chains in flight, out of order: without an
            // inflight region nothing tells the backend which to run again.
            return Err(
                "a packed ring with requests in flight cannot be resumed without an inflight region"
                    .into(),
            );
        }
        if self.report.inflight {
            if self.inflight_file.is_none() {
                let ask = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: self.opts.queues,
                    queue_size: self.opts.queue_size,
                };
                self.inflight_file = Some(fe.get_inflight_fd(&ask).map_err(e("GET_INFLIGHT_FD"))?);
            }
            let (info, file) = self.inflight_file.as_ref().expect("just set");
            fe.set_inflight_fd(info, file.as_raw_fd())
                .map_err(e("SET_INFLIGHT_FD"))?;
        }
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.mem.len as u64,
            userspace_addr: self.mem.base as u64,
            mmap_offset: 0,
            mmap_handle: self.mem.file.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).map_err(e("SET_MEM_TABLE"))?;
        // As QEMU starts a migration: the log, then LOG_ALL, then each ring's used-ring
        // logging.
        let mut vring_flags = 0;
        if let Some(LogWatch { log, .. }) = &self.dirty_log {
            if !pf.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
                return Err("the backend does not offer LOG_SHMFD: no live migration".into());
            }
            if offered & VhostUserVirtioFeatures::LOG_ALL.bits() == 0 {
                return Err("the backend does not offer LOG_ALL: no live migration".into());
            }
            fe.set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: log.len as u64,
                    mmap_offset: 0,
                    mmap_handle: log.file.as_raw_fd(),
                }),
            )
            .map_err(e("SET_LOG_BASE"))?;
            fe.set_features((offered & wanted) | VhostUserVirtioFeatures::LOG_ALL.bits())
                .map_err(e("SET_FEATURES (LOG_ALL)"))?;
            vring_flags = VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits();
        }
        let va = |gpa: u64| self.mem.base as u64 + gpa;
        for (i, q) in self.queues.iter().enumerate() {
            fe.set_vring_num(i, self.opts.queue_size)
                .map_err(e("SET_VRING_NUM"))?;
            match q.ring.base(self.report.inflight) {
                Base::Split(base) => fe.set_vring_base(i, base).map_err(e("SET_VRING_BASE"))?,
                Base::Packed(base) => send_packed_vring_base(&watch, i as u32, base)
                    .map_err(|err| format!("SET_VRING_BASE: {err}"))?,
            }
            let (d, a, u) = q.ring.gpas();
            let cfg = VringConfigData {
                queue_max_size: self.opts.queue_size,
                queue_size: self.opts.queue_size,
                flags: vring_flags,
                desc_table_addr: va(d),
                used_ring_addr: va(u),
                avail_ring_addr: va(a),
                log_addr: (vring_flags != 0).then_some(u),
            };
            fe.set_vring_addr(i, &cfg).map_err(e("SET_VRING_ADDR"))?;
            fe.set_vring_kick(i, &q.kick).map_err(e("SET_VRING_KICK"))?;
            if !self.opts.call_after_kick.is_zero() {
                std::thread::sleep(self.opts.call_after_kick);
            }
            fe.set_vring_call(i, &q.call).map_err(e("SET_VRING_CALL"))?;
            fe.set_vring_enable(i, true)
                .map_err(e("SET_VRING_ENABLE"))?;
            let _ = q.kick.write(1);
        }
        self.frontend = Some((fe, watch));
        Ok(())
    }

    /// Takes a config change the backend told, if one is waiting: reads the config space
    /// again over the main socket, then acknowledges (QEMU's order). A grown disk's new
    /// blocks are used from then on (never written yet: a read of them is not verified).
    fn take_config_change(&mut self) {
        use std::io::{Read, Write};
        let Some(channel) = &mut self.backend_channel else {
            return;
        };
        let mut header = [0u8; 12];
        match channel.read(&mut header[..1]) {
            Ok(1) => {}
            Ok(_) => {
                self.backend_channel = None;
                return;
            }
            Err(_) => return,
        }
        let _ = channel.set_nonblocking(false);
        let _ = channel.set_read_timeout(Some(Duration::from_secs(5)));
        if let Err(e) = channel.read_exact(&mut header[1..]) {
            self.error(format!("backend channel: half a message: {e}"));
            self.backend_channel = None;
            return;
        }
        let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
        let (request, flags, size) = (word(0), word(4), word(8));
        if request != 2 || size != 0 {
            self.error(format!(
                "backend channel: request {request} with {size} payload bytes, not CONFIG_CHANGE_MSG"
            ));
            self.backend_channel = None;
            return;
        }
        let config = self.frontend.as_mut().map(|(fe, _)| {
            fe.get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
                .map(|(_, payload)| payload)
        });
        let status: u64 = match config {
            Some(Ok(payload)) if payload.len() >= 8 => {
                let sectors = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
                self.report.config_changes.push(sectors);
                self.grow_to(sectors);
                0
            }
            Some(Ok(_)) => 1,
            Some(Err(e)) => {
                self.error(format!("GET_CONFIG after a config change: {e}"));
                1
            }
            None => 1,
        };
        let Some(channel) = &mut self.backend_channel else {
            return;
        };
        if flags & 0x8 != 0 {
            let mut ack = [0u8; 20];
            ack[0..4].copy_from_slice(&2u32.to_le_bytes());
            ack[4..8].copy_from_slice(&5u32.to_le_bytes());
            ack[8..12].copy_from_slice(&8u32.to_le_bytes());
            ack[12..20].copy_from_slice(&status.to_le_bytes());
            if let Err(e) = channel.write_all(&ack) {
                self.error(format!("backend channel: acknowledging: {e}"));
                self.backend_channel = None;
                return;
            }
        }
        let _ = channel.set_nonblocking(true);
    }

    /// The disk is `sectors` long now: a larger one's new blocks join the workload.
    fn grow_to(&mut self, sectors: u64) {
        self.capacity_sectors = sectors;
        self.report.capacity_sectors = sectors;
        let units = sectors * 512 / u64::from(self.opts.block_size);
        if units > self.units {
            self.units = units;
            self.expected.resize(units as usize, 0);
            self.busy_units.resize(units as usize, false);
        }
    }

    fn backend_gone(&self) -> bool {
        let Some((_, watch)) = &self.frontend else {
            return true;
        };
        let mut pfd = libc::pollfd {
            fd: watch.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLIN) != 0
    }

    fn error(&mut self, msg: String) {
        if self.report.errors.len() < 10 {
            self.report.errors.push(msg);
        }
    }

    /// Puts a request in slot `si` of queue `qi`, issued at `now` (the loop's time: one clock
    /// read per batch, not per request).
    fn submit(&mut self, qi: usize, si: usize, now: Instant) {
        // Pick a unit no request in flight touches.
        let unit = loop {
            let u = if self.opts.sequential {
                self.next_unit = self.next_unit.wrapping_add(1) % self.units;
                self.next_unit
            } else {
                self.rng = mix(self.rng);
                self.rng % self.units
            };
            if !self.busy_units[u as usize] {
                break u;
            }
        };
        self.rng = mix(self.rng);
        let write = match self.opts.workload {
            Workload::Read => false,
            Workload::Write => true,
            Workload::Mixed(p) => (self.rng % 100) as u8 >= p,
        };
        let bs = self.opts.block_size as usize;
        let q = &self.queues[qi];
        let control = q.control_gpa + 32 * si as u64;
        let data = self.data_gpa(qi, si);
        let generation = if write {
            let g = self.next_generation;
            self.next_generation = self.next_generation.wrapping_add(1).max(1);
            g
        } else {
            0
        };
        let sector = unit * (bs as u64 / 512);
        // SAFETY: control and data areas lie in our mapping; the device does not own them
        // until the chain is made available below.
        unsafe {
            let hdr = self.host(control);
            let kind = if write { req::OUT } else { req::IN };
            std::ptr::copy_nonoverlapping(kind.to_le_bytes().as_ptr(), hdr, 4);
            std::ptr::write_bytes(hdr.add(4), 0, 4);
            std::ptr::copy_nonoverlapping(sector.to_le_bytes().as_ptr(), hdr.add(8), 8);
            self.host(control + 16).write_volatile(0xff);
            // Only verify needs each write stamped, and each read buffer poisoned (so is it
            // for a read checked against an expected image).
            let checked_read = !write && (self.opts.verify || self.expect_image.is_some());
            if (self.opts.verify && write) || checked_read {
                let buf = std::slice::from_raw_parts_mut(self.host(data), bs);
                if write {
                    stamp(unit, generation, self.opts.seed, buf);
                } else {
                    buf.fill(0xa5);
                }
            }
        }
        let q = &mut self.queues[qi];
        let header = DriverBuffer {
            gpa: control,
            len: 16,
            write: false,
        };
        let status = DriverBuffer {
            gpa: control + 16,
            len: 1,
            write: true,
        };
        let data_buffer = |gpa: u64, len: usize| DriverBuffer {
            gpa,
            len: len as u32,
            write: !write,
        };
        let added = if self.opts.unaligned {
            let half = bs / 2;
            q.ring.add(&[
                header,
                data_buffer(data, half),
                data_buffer(data + half as u64, bs - half),
                status,
            ])
        } else {
            q.ring.add(&[header, data_buffer(data, bs), status])
        };
        let Some(head) = added else {
            return;
        };
        q.head_to_slot[usize::from(head)] = Some(si);
        q.slots[si] = Outstanding {
            busy: true,
            write,
            unit,
            generation,
            issued: now,
        };
        self.busy_units[unit as usize] = true;
    }

    /// Finishes the request at `head`, completed by `now` (read once per batch).
    fn complete(&mut self, qi: usize, head: u16, now: Instant) {
        let Some(si) = self.queues[qi].head_to_slot[usize::from(head)].take() else {
            self.report.not_a_head += 1;
            self.error(format!(
                "queue {qi}: used id {head} is not a request in flight"
            ));
            return;
        };
        let slot = &mut self.queues[qi].slots[si];
        slot.busy = false;
        let (write, unit, generation, issued) =
            (slot.write, slot.unit, slot.generation, slot.issued);
        self.busy_units[unit as usize] = false;
        let control = self.queues[qi].control_gpa + 32 * si as u64;
        let data = self.data_gpa(qi, si);
        // SAFETY: the status byte lies in our mapping and the device has published it.
        let st = unsafe { self.host(control + 16).read_volatile() };
        self.report.ios += 1;
        if issued >= self.measure_from {
            self.report
                .latency
                .record(now.saturating_duration_since(issued).as_nanos() as u64);
        }

        if let Some(watch) = &mut self.dirty_log {
            // This queue's ring was written to publish it (not every queue's: one whose
            // backend stalled for an epoch published nothing in it).
            self.queues[qi]
                .ring
                .mark_device_written(self.opts.queue_size, &mut watch.seen);
            set_pages(&mut watch.seen, control + 16, 1);
            if !write {
                set_pages(&mut watch.seen, data, u64::from(self.opts.block_size));
            }
        }
        if st != status::OK {
            self.report.failed += 1;
            self.error(format!(
                "queue {qi}: {} of unit {unit} completed with status {st}",
                if write { "write" } else { "read" }
            ));
            return;
        }
        if write {
            self.expected[unit as usize] = generation;
            return;
        }
        self.report.reads += 1;
        if let Some(image) = &self.expect_image {
            let bs = self.opts.block_size as usize;
            let at = unit as usize * bs;
            // SAFETY: the data buffer lies in our mapping; the device is done with it.
            let got = unsafe { std::slice::from_raw_parts(self.host(data), bs) };
            // A disk grown past the image (config changes) has no expected bytes there.
            if image.get(at..at + bs) != Some(got) {
                self.report.verify_errors += 1;
                self.error(format!(
                    "queue {qi}: unit {unit} (byte {at}) differs from the expected image"
                ));
            }
            return;
        }
        let want = self.expected[unit as usize];
        if self.opts.verify && want != 0 {
            let bs = self.opts.block_size as usize;
            let mut expect = std::mem::take(&mut self.scratch);
            expect.resize(bs, 0);
            stamp(unit, want, self.opts.seed, &mut expect);
            // SAFETY: the data buffer lies in our mapping; the device is done with it.
            let got = unsafe { std::slice::from_raw_parts(self.host(data), bs) };
            let mismatch = got != expect.as_slice();
            self.scratch = expect;
            if mismatch {
                self.report.verify_errors += 1;
                let seen = u64::from_le_bytes(got[8..16].try_into().expect("8 bytes")) as u32;
                self.error(format!(
                    "queue {qi}: unit {unit} read generation {seen}, expected {want}"
                ));
            }
        }
    }

    /// Stays connected, rings set up, and does no I/O for the run's seconds: an idle guest.
    pub fn idle(mut self) -> Report {
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(self.opts.seconds));
        if self.backend_gone() {
            self.error("the backend went away while the frontend was idle".into());
        }
        self.report.seconds = started.elapsed().as_secs_f64();
        self.report
    }

    /// Runs the workload; reconnects whenever the backend vanishes.
    pub fn run(mut self) -> Report {
        let started = Instant::now();
        self.measure_from = started + self.opts.ramp_time;
        let end = started + Duration::from_secs_f64(self.opts.seconds);
        let mut last_completion = Instant::now();
        // Gaps count from the first completion on: start-up is not a stall.
        let mut completed_any = false;
        let mut gone_since: Option<Instant> = None;
        let mut last_connect_error: Option<String> = None;
        let mut awaiting_first = false;
        let mut stopping = false;
        // With `interrupts`, the guest's side sleeps until an interrupt (or its timeout): a
        // reconnect is QEMU's business and does not wake it, so it does not look at the
        // rings until then.
        let mut asleep = false;
        let mut submitted: u64 = 0;
        // Looks that need a clock or a system call are made on a schedule, not every loop:
        // at millions of requests a second they were most of the load generator's time.
        let mut next_liveness_check = started;
        let mut next_stuck_check = started;
        // Paced frontends started together would all submit at the same instants and queue
        // behind each other; each starts its schedule at its own phase of the interval.
        let phase = match self.opts.rate {
            Some(rate) => {
                let clock = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos();
                let spread = mix(u64::from(std::process::id()) << 32 | u64::from(clock));
                (spread % 1_000_000) as f64 / 1e6 / rate
            }
            None => 0.0,
        };
        loop {
            let now = Instant::now();
            if now >= end || stop_requested() {
                stopping = true;
            }
            if let Some(watch) = &mut self.dirty_log {
                if now >= watch.next_sync {
                    watch.sync(&mut self.report.errors);
                }
            }
            if gone_since.is_none() && now >= next_liveness_check {
                next_liveness_check = now + LIVENESS_EVERY;
                if self.backend_gone() {
                    gone_since = Some(now);
                    self.frontend = None;
                } else {
                    self.take_config_change();
                }
            }
            if let Some(t) = gone_since {
                if now.duration_since(t) > self.opts.reconnect_timeout {
                    self.error(format!(
                        "backend did not come back within {:?}{}",
                        self.opts.reconnect_timeout,
                        last_connect_error
                            .take()
                            .map(|e| format!(" (last attempt: {e})"))
                            .unwrap_or_default()
                    ));
                    break;
                }
                match self.connect(now) {
                    Ok(()) => {
                        gone_since = None;
                        awaiting_first = true;
                        self.report.reconnects += 1;
                        last_connect_error = None;
                    }
                    Err((_, e)) => {
                        // Kept for the report: a backend that answers and refuses (a
                        // packed ring it cannot resume, say) is not one that is gone.
                        last_connect_error = Some(e);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            let mut progress = 0;
            // With a rate, as many requests as the schedule allows by now.
            let mut allowed = match self.opts.rate {
                Some(rate) => {
                    let due =
                        ((now.duration_since(started).as_secs_f64() + phase) * rate) as u64 + 1;
                    due.saturating_sub(submitted)
                }
                None => u64::MAX,
            };
            for qi in 0..self.queues.len() {
                if !stopping {
                    let mut queued = 0;
                    let old_avail = self.queues[qi].ring.avail_mark();
                    for si in 0..self.queues[qi].slots.len() {
                        if allowed > 0 && !self.queues[qi].slots[si].busy {
                            self.submit(qi, si, now);
                            queued += 1;
                            allowed -= 1;
                            submitted += 1;
                        }
                    }
                    progress += queued;
                    let ring = &self.queues[qi].ring;
                    if queued > 0 && ring.needs_kick(old_avail, self.event_idx) {
                        let _ = self.queues[qi].kick.write(1);
                    }
                }
                // Asleep, the guest's side does not look at the rings at all.
                if asleep {
                    continue;
                }
                // The time of this batch of completions, read at its first.
                let mut batch_time: Option<Instant> = None;
                loop {
                    match self.queues[qi].ring.pop_used() {
                        Ok(Some((head, _len))) => {
                            let now = *batch_time.get_or_insert_with(Instant::now);
                            self.complete(qi, head, now);
                            progress += 1;
                            let gap = now.duration_since(last_completion).as_secs_f64() * 1000.0;
                            if awaiting_first {
                                self.report.pauses_ms.push(gap);
                                awaiting_first = false;
                            } else if completed_any && now >= self.measure_from {
                                if gap > self.report.max_gap_ms {
                                    self.report.max_gap_ms = gap;
                                }
                                if self.opts.log_gaps_over.is_some_and(|t| {
                                    gap > t.as_secs_f64() * 1e3
                                        && self.report.gaps.len() < MAX_GAPS_LOGGED
                                }) {
                                    self.report
                                        .gaps
                                        .push((vfblk_vhost::poller::monotonic_ns(), gap));
                                }
                            }
                            completed_any = true;
                            last_completion = now;
                        }
                        Ok(None) => {
                            if self.opts.interrupts {
                                // Ask for an interrupt at the next completion, then look
                                // once more: one published before the request was visible
                                // would otherwise go unsignalled (virtio's enable-callbacks
                                // rule).
                                if self.queues[qi].ring.arm_interrupt() {
                                    continue;
                                }
                            }
                            break;
                        }
                        Err(e) => {
                            self.report.not_a_head += 1;
                            self.error(format!("queue {qi}: {e}"));
                        }
                    }
                }
                if now < next_stuck_check {
                    continue;
                }
                if qi + 1 == self.queues.len() {
                    next_stuck_check = now + STUCK_CHECK_EVERY;
                }
                let stuck = self.queues[qi]
                    .slots
                    .iter()
                    .filter(|s| {
                        s.busy && now.saturating_duration_since(s.issued) > self.opts.io_timeout
                    })
                    .count();
                if stuck > 0 && gone_since.is_none() {
                    self.report.lost += stuck as u64;
                    let msg = format!(
                        "queue {qi}: requests outstanding for more than {:?}",
                        self.opts.io_timeout
                    );
                    self.error(msg);
                    self.report.seconds = started.elapsed().as_secs_f64();
                    return self.report;
                }
            }
            let outstanding = self
                .queues
                .iter()
                .flat_map(|q| q.slots.iter())
                .any(|s| s.busy);
            if stopping && !outstanding {
                break;
            }
            if progress == 0 && self.opts.polled && gone_since.is_none() {
                // A polling driver never sleeps: it looks again (letting other threads of
                // its core run first).
                std::thread::yield_now();
            } else if progress == 0 {
                let mut fds: Vec<libc::pollfd> = self
                    .queues
                    .iter()
                    .map(|q| libc::pollfd {
                        fd: q.call.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // The backend's socket too: its hang-up must wake a sleeper at once, as it
                // wakes QEMU.
                if let Some((_, watch)) = &self.frontend {
                    fds.push(libc::pollfd {
                        fd: watch.as_raw_fd(),
                        events: libc::POLLRDHUP,
                        revents: 0,
                    });
                }
                // A guest driver sleeps until interrupted; the plain load generator only
                // naps, so it never depends on interrupts.
                let timeout_ms = if self.opts.interrupts && gone_since.is_none() {
                    INTERRUPT_WAIT_MS
                } else {
                    1
                };
                // A paced frontend also wakes when its next request is due.
                let timeout_ms = match self.opts.rate {
                    Some(rate) if !stopping && gone_since.is_none() => {
                        let next =
                            Duration::from_secs_f64((submitted as f64 / rate - phase).max(0.0));
                        let wait = next.saturating_sub(started.elapsed());
                        timeout_ms.min(wait.as_micros().div_ceil(1000).min(1000) as i32)
                    }
                    _ => timeout_ms,
                };
                asleep = self.opts.interrupts;
                // SAFETY: a valid pollfd array of the given length.
                let woken =
                    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
                let interrupted = fds[..self.queues.len()]
                    .iter()
                    .any(|p| p.revents & libc::POLLIN != 0);
                for q in &self.queues {
                    let _ = q.call.read();
                }
                // Awake on an interrupt or the timeout; a hang-up of the backend's socket
                // alone leaves the guest asleep.
                if interrupted || woken == 0 {
                    asleep = false;
                }
                // Only a full interrupt wait tells a missed interrupt; a paced wake-up may
                // land between the device publishing and signalling.
                if self.opts.interrupts
                    && woken == 0
                    && timeout_ms == INTERRUPT_WAIT_MS
                    && gone_since.is_none()
                    && !self.backend_gone()
                {
                    let unseen = self.queues.iter().any(|q| q.ring.unseen());
                    if unseen {
                        self.report.missed_interrupts += 1;
                        self.error(format!(
                            "completions published without an interrupt (found after {INTERRUPT_WAIT_MS} ms)"
                        ));
                    }
                }
            }
        }
        self.report.seconds = started.elapsed().as_secs_f64();
        self.check_dirty_log();
        self.report
    }

    /// With [`Options::dirty_log`], after the run: stops the rings as a migration's
    /// switch-over does (GET_VRING_BASE: the backend finishes what it took and logs it), then
    /// syncs the log twice more, closing the last epochs.
    fn check_dirty_log(&mut self) {
        let Some(mut watch) = self.dirty_log.take() else {
            return;
        };
        if let Some((fe, _)) = &mut self.frontend {
            for i in 0..self.queues.len() {
                if let Err(e) = fe.get_vring_base(i) {
                    self.report
                        .errors
                        .push(format!("GET_VRING_BASE of queue {i}: {e}"));
                }
            }
        }
        watch.sync(&mut self.report.errors);
        watch.sync(&mut self.report.errors);
        self.report.dirty_log = Some(watch.check);
    }
}
