//! A load generator in the manner of SPDK's `perf`: each thread owns a queue pair and keeps
//! `queue_depth` commands in flight, ringing the doorbell once per batch; latencies go to a
//! fixed-size histogram, so the measured loop allocates nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vfblk_nvme::controller::Controller;
use vfblk_nvme::prp::DmaSegment;
use vfblk_nvme::queue::{IoCompletion, SubmitError};
use vfblk_nvme::{Error, Result};

use crate::histogram::Histogram;
use crate::patterns::mix;

/// Period of the queue pairs' timeout clock.
const TICK: Duration = Duration::from_millis(100);

/// A command in flight for this many ticks (30 s) has timed out.
const TIMEOUT_TICKS: u32 = 300;

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Random reads and writes, `read_percent` of them reads.
    RandRw {
        /// Share of reads, 0..=100.
        read_percent: u8,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct PerfOptions {
    /// Namespace.
    pub nsid: u32,
    /// Access pattern.
    pub workload: Workload,
    /// Bytes per I/O (a multiple of the block size, at most MDTS).
    pub block_size: usize,
    /// Commands in flight per queue pair.
    pub queue_depth: u16,
    /// Queue pairs, one thread each.
    pub queues: u16,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time first (caches, allocations, queue setup effects).
    pub warmup: Duration,
}

/// What [`perf`] measured.
#[derive(Debug, Clone)]
pub struct PerfReport {
    /// I/Os completed in the measured time.
    pub ios: u64,
    /// Of which reads.
    pub reads: u64,
    /// Measured seconds.
    pub seconds: f64,
    /// I/Os per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Mean latency, microseconds.
    pub mean_us: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub p999_us: f64,
    /// Heap allocations during the measured time (by the caller's counter).
    pub allocations: u64,
    /// MMIO doorbell writes that shadow doorbells made unnecessary (whole run).
    pub doorbells_skipped: u64,
}

/// Where the workers are: the main thread samples the allocation counter when all have
/// started measuring and again when all have stopped.
#[derive(Default)]
struct Phase {
    started: AtomicUsize,
    finished: AtomicUsize,
    sampled: AtomicBool,
    failed: AtomicBool,
}

/// Marks the run failed if a worker leaves early (error or panic).
struct FailGuard<'a>(&'a Phase);

impl Drop for FailGuard<'_> {
    fn drop(&mut self) {
        self.0.failed.store(true, Ordering::SeqCst);
    }
}

struct Worker {
    hist: Histogram,
    reads: u64,
    doorbells_skipped: u64,
}

/// Runs the workload; `allocations` reads a process-wide allocation counter (the binary's
/// global allocator), sampled when measurement starts and ends.
pub fn perf(
    ctrl: &Controller,
    opts: &PerfOptions,
    allocations: &(dyn Fn() -> u64 + Sync),
) -> Result<PerfReport> {
    let ns = ctrl.namespace(opts.nsid)?.clone();
    let block = ns.info.block_size() as usize;
    if opts.block_size == 0 || opts.block_size % block != 0 || opts.block_size > ctrl.max_transfer()
    {
        return Err(Error::BadArgument(format!(
            "{}: I/O size {} must be a multiple of {block} and at most {}",
            ctrl.name(),
            opts.block_size,
            ctrl.max_transfer()
        )));
    }
    let blocks_per_io = (opts.block_size / block) as u32;
    let slots = ns.info.nsze / u64::from(blocks_per_io);
    let entries = (opts.queue_depth + 1).max(2);
    let phase = Phase::default();
    let (start_allocs, end_allocs, workers) =
        std::thread::scope(|scope| -> Result<(u64, u64, Vec<Worker>)> {
            let mut handles = Vec::new();
            for q in 0..opts.queues {
                let (phase, ns) = (&phase, &ns);
                handles.push(scope.spawn(move || -> Result<Worker> {
                    // Whatever way this worker ends, the others and the main thread stop waiting.
                    let _guard = FailGuard(phase);
                    let mut qp = ctrl.create_io_queue_pair(entries)?;
                    let depth = usize::from(opts.queue_depth).min(qp.capacity());
                    let buffers = ctrl.dma_buffer(depth * opts.block_size)?;
                    let mut issued_at = vec![Instant::now(); depth];
                    let mut slot_is_read = vec![false; depth];
                    let mut rng = mix(0x9e37 ^ u64::from(q));
                    let mut worker = Worker {
                        hist: Histogram::default(),
                        reads: 0,
                        doorbells_skipped: 0,
                    };
                    let submit = |qp: &mut vfblk_nvme::queue::QueuePair,
                                  slot: usize,
                                  rng: &mut u64,
                                  issued_at: &mut [Instant]|
                     -> std::result::Result<bool, SubmitError> {
                        *rng = mix(*rng);
                        let lba = (*rng % slots) * u64::from(blocks_per_io);
                        let is_read = match opts.workload {
                            Workload::RandRead => true,
                            Workload::RandWrite => false,
                            Workload::RandRw { read_percent } => {
                                (*rng >> 56) % 100 < u64::from(read_percent)
                            }
                        };
                        let seg = [DmaSegment {
                            iova: buffers.iova() + (slot * opts.block_size) as u64,
                            len: opts.block_size as u32,
                        }];
                        issued_at[slot] = Instant::now();
                        let shift = ns.info.lba_shift;
                        if is_read {
                            qp.read(ns.nsid, lba, blocks_per_io, shift, &seg, slot as u64)?;
                        } else {
                            qp.write(ns.nsid, lba, blocks_per_io, shift, &seg, slot as u64)?;
                        }
                        Ok(is_read)
                    };
                    let fail = |e: SubmitError, qid: u16| Error::Device {
                        device: ctrl.name().to_string(),
                        what: format!("queue {qid}: submit: {e}"),
                    };
                    for (slot, is_read) in slot_is_read.iter_mut().enumerate() {
                        *is_read = submit(&mut qp, slot, &mut rng, &mut issued_at)
                            .map_err(|e| fail(e, qp.qid()))?;
                    }
                    qp.ring();
                    let warm_until = Instant::now() + opts.warmup;
                    let mut measuring = false;
                    let mut end = warm_until + opts.duration;
                    let mut error: Option<IoCompletion> = None;
                    let mut resubmit = [0usize; 1024];
                    let mut next_tick = Instant::now() + TICK;
                    loop {
                        let now = Instant::now();
                        if now >= next_tick {
                            next_tick = now + TICK;
                            if let Some(stuck) = qp.tick(TIMEOUT_TICKS) {
                                return Err(Error::Timeout {
                                    device: ctrl.name().to_string(),
                                    what: format!(
                                        "queue {}: cid {} (opcode {:#04x}) in flight for {} ms",
                                        qp.qid(),
                                        stuck.cid,
                                        stuck.opcode,
                                        u128::from(stuck.age) * TICK.as_millis()
                                    ),
                                });
                            }
                        }
                        if !measuring && now >= warm_until {
                            phase.started.fetch_add(1, Ordering::SeqCst);
                            measuring = true;
                            worker.hist = Histogram::default();
                            worker.reads = 0;
                            end = Instant::now() + opts.duration;
                        }
                        if measuring && now >= end {
                            break;
                        }
                        let mut n = 0;
                        qp.poll(resubmit.len(), |c| {
                            if !c.status.is_success() && error.is_none() {
                                error = Some(c);
                            }
                            let slot = c.token as usize;
                            worker
                                .hist
                                .record(issued_at[slot].elapsed().as_nanos() as u64);
                            worker.reads += u64::from(slot_is_read[slot]);
                            resubmit[n] = slot;
                            n += 1;
                        });
                        if let Some(c) = error {
                            return Err(Error::Device {
                                device: ctrl.name().to_string(),
                                what: format!("queue {}: cid {}: {}", qp.qid(), c.cid, c.status),
                            });
                        }
                        for &slot in &resubmit[..n] {
                            slot_is_read[slot] = submit(&mut qp, slot, &mut rng, &mut issued_at)
                                .map_err(|e| fail(e, qp.qid()))?;
                        }
                        qp.ring();
                    }
                    phase.finished.fetch_add(1, Ordering::SeqCst);
                    // Stay out of the allocator until the main thread has read the counter.
                    while !phase.sampled.load(Ordering::SeqCst)
                        && !phase.failed.load(Ordering::SeqCst)
                    {
                        std::thread::yield_now();
                    }
                    // Drain so the queue pair is deleted idle.
                    let drain_deadline = Instant::now() + Duration::from_secs(10);
                    while qp.in_flight() > 0 && Instant::now() < drain_deadline {
                        qp.poll(usize::MAX, |_| {});
                    }
                    std::mem::forget(_guard);
                    Ok(worker)
                }));
            }
            let all = u32::from(opts.queues) as usize;
            let wait_for = |counter: &AtomicUsize| {
                while counter.load(Ordering::SeqCst) < all && !phase.failed.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_micros(200));
                }
            };
            wait_for(&phase.started);
            let start = allocations();
            wait_for(&phase.finished);
            let end = allocations();
            phase.sampled.store(true, Ordering::SeqCst);
            let mut workers = Vec::new();
            for h in handles {
                workers.push(
                    h.join()
                        .map_err(|_| Error::BadArgument("perf worker panicked".into()))??,
                );
            }
            Ok((start, end, workers))
        })?;
    let mut hist = Histogram::default();
    let mut reads = 0;
    let mut doorbells_skipped = 0;
    for w in &workers {
        hist.merge(&w.hist);
        reads += w.reads;
        doorbells_skipped += w.doorbells_skipped;
    }
    let seconds = opts.duration.as_secs_f64();
    let ios = hist.count();
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(PerfReport {
        ios,
        reads,
        seconds,
        iops: ios as f64 / seconds,
        mb_per_s: (ios as f64 * opts.block_size as f64) / seconds / 1e6,
        mean_us: hist.mean_ns() / 1000.0,
        p50_us: us(hist.quantile_ns(0.5)),
        p99_us: us(hist.quantile_ns(0.99)),
        p999_us: us(hist.quantile_ns(0.999)),
        allocations: end_allocs - start_allocs,
        doorbells_skipped,
    })
}
