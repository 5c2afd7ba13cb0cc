//! A second benchmark client built on libblkio (the `blkio` crate, driver
//! `virtio-blk-vhost-user`): an independent vhost-user-blk frontend, so that no figure of the
//! suite depends only on our own load generator. One thread per queue, each keeping `depth`
//! requests in flight; the report has the load generator's shape.

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use crate::histogram::Histogram;
use crate::loadgen::{Report, Workload};
use crate::patterns::mix;
use crate::{Error, Result};

/// What to run.
#[derive(Debug, Clone)]
pub struct BlkioOptions {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Queues, one client thread each.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Bytes per request (a multiple of 512).
    pub block_size: u32,
    /// Access pattern.
    pub workload: Workload,
    /// Blocks in order instead of at random.
    pub sequential: bool,
    /// Seconds of I/O.
    pub seconds: f64,
    /// Busy-poll libblkio poll queues instead of sleeping on completion fds.
    pub poll: bool,
    /// Latencies count only after this long.
    pub ramp_time: Duration,
    /// Stamp every write and check every read against the last completed write of its
    /// block (each queue keeps to its own slice of the disk, one request per block at a
    /// time).
    pub verify: bool,
}

fn blkio_error(what: &str) -> impl Fn(blkio::Error) -> Error + '_ {
    move |e| Error::Run(format!("libblkio {what}: {}", e.message()))
}

/// What one queue's thread saw.
#[derive(Default)]
struct QueueReport {
    ios: u64,
    reads: u64,
    failed: u64,
    verify_errors: u64,
    latency: Histogram,
    error: Option<String>,
}

struct QueueJob {
    queue: Blkioq,
    /// Start of this queue's buffers (`depth` of `block_size` bytes) in libblkio's region.
    buffers: usize,
    first_block: u64,
    blocks: u64,
    seed: u64,
}

/// Connects, runs the workload and reports.
pub fn run(o: &BlkioOptions) -> Result<Report> {
    if o.block_size == 0 || o.block_size % 512 != 0 || o.depth == 0 || o.queues == 0 {
        return Err(Error::Run(
            "block size must be a multiple of 512; depth and queues at least 1".into(),
        ));
    }
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blkio_error("new"))?;
    let path = o
        .socket
        .to_str()
        .ok_or_else(|| Error::Run(format!("{}: not UTF-8", o.socket.display())))?;
    b.set_str("path", path).map_err(blkio_error("path"))?;
    b.connect().map_err(blkio_error("connect"))?;
    let capacity = b.get_u64("capacity").map_err(blkio_error("capacity"))?;
    let (regular, polled) = if o.poll {
        (0, i32::from(o.queues))
    } else {
        (i32::from(o.queues), 0)
    };
    b.set_i32("num-queues", regular)
        .map_err(blkio_error("num-queues"))?;
    b.set_i32("num-poll-queues", polled)
        .map_err(blkio_error("num-poll-queues"))?;
    let started = b.start().map_err(blkio_error("start"))?;
    let queues = if o.poll {
        started.poll_queues
    } else {
        started.queues
    };
    let bs = o.block_size as usize;
    let per_queue = bs * usize::from(o.depth);
    let region = b
        .alloc_mem_region(per_queue * queues.len())
        .map_err(blkio_error("alloc_mem_region"))?;
    b.map_mem_region(&region)
        .map_err(blkio_error("map_mem_region"))?;
    let blocks = capacity / u64::from(o.block_size);
    if blocks < u64::from(o.queues) * u64::from(o.depth) {
        return Err(Error::Run(format!(
            "a disk of {capacity} bytes is too small for {} requests of {bs} bytes",
            u64::from(o.queues) * u64::from(o.depth)
        )));
    }
    // Each queue works on its own slice of the disk (a queue's requests may meet in a block:
    // nothing is verified).
    let slice = blocks / u64::from(o.queues);
    let jobs: Vec<QueueJob> = queues
        .into_iter()
        .enumerate()
        .map(|(i, queue)| QueueJob {
            queue,
            buffers: region.addr + i * per_queue,
            first_block: i as u64 * slice,
            blocks: slice,
            seed: mix(i as u64 + 1),
        })
        .collect();
    // SAFETY: the region is `per_queue * queues` bytes, mapped until `b` is dropped below;
    // filled once so writes carry data that is not all zeroes.
    unsafe {
        std::ptr::write_bytes(region.addr as *mut u8, 0x5a, per_queue * jobs.len());
    }
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(o.seconds);
    let measure_from = started + o.ramp_time;
    let reports: Vec<QueueReport> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|job| scope.spawn(move || drive(job, o, end, measure_from)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| QueueReport {
                    error: Some("a client thread panicked".into()),
                    ..QueueReport::default()
                })
            })
            .collect()
    });
    let mut report = Report {
        seconds: started.elapsed().as_secs_f64(),
        ..Report::default()
    };
    for r in reports {
        report.ios += r.ios;
        report.reads += r.reads;
        report.failed += r.failed;
        report.verify_errors += r.verify_errors;
        report.latency.merge(&r.latency);
        report.errors.extend(r.error);
    }
    drop(b);
    Ok(report)
}

/// One queue's loop: keep `depth` requests in flight until `end`, then drain.
fn drive(mut job: QueueJob, o: &BlkioOptions, end: Instant, measure_from: Instant) -> QueueReport {
    let depth = usize::from(o.depth);
    let bs = o.block_size as usize;
    let mut out = QueueReport::default();
    let mut issued = vec![Instant::now(); depth];
    let mut is_read = vec![false; depth];
    let mut free: Vec<usize> = (0..depth).collect();
    let mut done: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut rng = job.seed;
    let mut next_block = 0u64;
    // With verify: each block's last completed write (0: none yet), the blocks in flight,
    // each slot's block and generation.
    let blocks = if o.verify { job.blocks as usize } else { 0 };
    let mut expected = vec![0u32; blocks];
    let mut busy = vec![false; blocks];
    let mut slot_block = vec![0u64; depth];
    let mut slot_generation = vec![0u32; depth];
    let mut generation = 0u32;
    let seed = job.seed as u32;
    // What a verified read must hold (reused: no allocation per request).
    let mut model = vec![0u8; if o.verify { bs } else { 0 }];
    loop {
        let now = Instant::now();
        let stopping = now >= end || crate::loadgen::stop_requested();
        if !stopping {
            while let Some(slot) = free.pop() {
                let mut block = if o.sequential {
                    next_block = (next_block + 1) % job.blocks;
                    next_block
                } else {
                    rng = mix(rng);
                    rng % job.blocks
                };
                if o.verify {
                    // One request per block at a time: the next free one.
                    while busy[block as usize] {
                        block = (block + 1) % job.blocks;
                    }
                    busy[block as usize] = true;
                    slot_block[slot] = block;
                }
                rng = mix(rng);
                let read = match o.workload {
                    Workload::Read => true,
                    Workload::Write => false,
                    Workload::Mixed(p) => ((rng >> 8) % 100) < u64::from(p),
                };
                let offset = (job.first_block + block) * bs as u64;
                let buf = (job.buffers + slot * bs) as *mut u8;
                issued[slot] = Instant::now();
                is_read[slot] = read;
                if o.verify && !read {
                    generation = generation.wrapping_add(1).max(1);
                    slot_generation[slot] = generation;
                    // SAFETY: the slot's buffer, `bs` bytes of libblkio's mapped region, not
                    // in use by a request (the slot is free).
                    let data = unsafe { std::slice::from_raw_parts_mut(buf, bs) };
                    crate::loadgen::stamp(job.first_block + block, generation, seed, data);
                }
                if read {
                    job.queue.read(offset, buf, bs, slot, ReqFlags::empty());
                } else {
                    job.queue.write(offset, buf, bs, slot, ReqFlags::empty());
                }
            }
        } else if free.len() == depth {
            return out;
        }
        let mut timeout = Duration::from_secs(10);
        let n = match job.queue.do_io(&mut done, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) => {
                out.error = Some(format!("do_io: {}", e.message()));
                return out;
            }
        };
        if n == 0 {
            out.error = Some("no completion within 10 s".into());
            return out;
        }
        let now = Instant::now();
        for c in &done[..n] {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            if slot >= depth {
                out.error = Some(format!("completion for unknown request {slot}"));
                return out;
            }
            out.ios += 1;
            if is_read[slot] {
                out.reads += 1;
            }
            if c.ret != 0 {
                out.failed += 1;
                if out.error.is_none() {
                    out.error = Some(format!("a request failed: {}", c.ret));
                }
            } else if o.verify {
                let block = slot_block[slot];
                if is_read[slot] {
                    let want = expected[block as usize];
                    if want != 0 {
                        let buf = (job.buffers + slot * bs) as *const u8;
                        // SAFETY: the slot's buffer, written by the completed read.
                        let got = unsafe { std::slice::from_raw_parts(buf, bs) };
                        crate::loadgen::stamp(job.first_block + block, want, seed, &mut model);
                        if got != model.as_slice() {
                            out.verify_errors += 1;
                            if out.error.is_none() {
                                out.error = Some(format!(
                                    "block {}: read data differs from write {want}",
                                    job.first_block + block
                                ));
                            }
                        }
                    }
                } else {
                    expected[block as usize] = slot_generation[slot];
                }
            }
            if o.verify {
                busy[slot_block[slot] as usize] = false;
            }
            if issued[slot] >= measure_from {
                out.latency
                    .record(now.duration_since(issued[slot]).as_nanos() as u64);
            }
            free.push(slot);
        }
    }
}

/// One step of [`check_request_types`] and what came of it.
#[derive(Debug, Clone)]
pub struct TypeStep {
    /// What the step did.
    pub what: String,
    /// Whether the device answered as a disk must.
    pub ok: bool,
    /// The completion's result (0, or a negative errno: `-5` is the device's IOERR, `-95`
    /// its UNSUPP) and, for reads, what the data showed.
    pub detail: String,
}

/// Every virtio-blk request type once, through libblkio, on one queue of the device at
/// `socket`, in the first 64 KiB of the disk (which it overwrites): a write, a flush, a
/// read of it back, write-zeroes (with unmap allowed and not) read back as zeros beside
/// the data, and a discard (its contents after are not checked: virtio-blk makes no
/// promise, and RBD skips partial objects). Stops at the first step that fails. (libblkio
/// answers a flush itself when the device does not offer VIRTIO_BLK_F_FLUSH: its step then
/// says nothing of the device.)
pub fn check_request_types(socket: &std::path::Path) -> Result<Vec<TypeStep>> {
    const AREA: usize = 64 << 10;
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blkio_error("new"))?;
    let path = socket
        .to_str()
        .ok_or_else(|| Error::Run(format!("{}: not UTF-8", socket.display())))?;
    b.set_str("path", path).map_err(blkio_error("path"))?;
    b.connect().map_err(blkio_error("connect"))?;
    let capacity = b.get_u64("capacity").map_err(blkio_error("capacity"))?;
    if capacity < AREA as u64 {
        return Err(Error::Run(format!(
            "a disk of {capacity} bytes is smaller than the {AREA} bytes checked"
        )));
    }
    b.set_i32("num-queues", 1)
        .map_err(blkio_error("num-queues"))?;
    let mut started = b.start().map_err(blkio_error("start"))?;
    let mut q = started
        .queues
        .pop()
        .ok_or_else(|| Error::Run("libblkio started no queue".into()))?;
    let region = b
        .alloc_mem_region(AREA)
        .map_err(blkio_error("alloc_mem_region"))?;
    b.map_mem_region(&region)
        .map_err(blkio_error("map_mem_region"))?;
    let buf = region.addr as *mut u8;
    let pattern: Vec<u8> = (0..AREA).map(|i| (i * 7 + i / 4096) as u8 | 1).collect();
    let mut steps = Vec::new();
    // One request, waited for (30 s: a cluster may be slow, never silent for that long).
    let run = |what: &str, q: &mut Blkioq, submit: &dyn Fn(&mut Blkioq)| -> Result<i32> {
        submit(q);
        let mut done = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = Duration::from_secs(30);
        match q.do_io(&mut done, 1, Some(&mut timeout), None) {
            // SAFETY: do_io initialised the one entry it reported.
            Ok(1) => Ok(unsafe { done[0].assume_init_ref() }.ret),
            Ok(_) => Err(Error::Run(format!("{what}: no completion within 30 s"))),
            Err(e) => Err(Error::Run(format!("{what}: do_io: {}", e.message()))),
        }
    };
    let mut record = |what: &str, ret: i32, data_ok: Option<std::result::Result<(), String>>| {
        let (ok, detail) = match (ret, data_ok) {
            (0, None) => (true, "0".to_string()),
            (0, Some(Ok(()))) => (true, "0, data as expected".to_string()),
            (0, Some(Err(why))) => (false, format!("0, but {why}")),
            (r, _) => (
                false,
                format!("{r} ({})", std::io::Error::from_raw_os_error(-r)),
            ),
        };
        steps.push(TypeStep {
            what: what.to_string(),
            ok,
            detail,
        });
        ok
    };
    let fill = |bytes: &[u8]| {
        let len = bytes.len().min(AREA);
        // SAFETY: `buf` is libblkio's region of AREA bytes, mapped until `b` is dropped at
        // the end; no request is in flight while the caller fills it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, len) }
    };
    let read_back = || {
        // SAFETY: as for `fill`: mapped, AREA bytes, no request in flight.
        unsafe { std::slice::from_raw_parts(buf, AREA) }.to_vec()
    };
    let compare = |got: &[u8], want: &[u8]| match got.iter().zip(want).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(at) => Err(format!(
            "byte {at} reads {:#04x}, not {:#04x}",
            got[at], want[at]
        )),
    };
    let read = |q: &mut Blkioq| q.read(0, buf, AREA, 0, ReqFlags::empty());
    let mut want = pattern.clone();

    fill(&pattern);
    let ret = run("write", &mut q, &|q| {
        q.write(0, buf, AREA, 0, ReqFlags::empty())
    })?;
    if !record("write 64 KiB", ret, None) {
        return Ok(steps);
    }
    let ret = run("flush", &mut q, &|q| q.flush(0, ReqFlags::empty()))?;
    if !record("flush", ret, None) {
        return Ok(steps);
    }
    fill(&vec![0u8; AREA]);
    let ret = run("read", &mut q, &read)?;
    if !record("read it back", ret, Some(compare(&read_back(), &want))) {
        return Ok(steps);
    }
    for (what, start, len, flags) in [
        (
            "write zeroes, unmap allowed, 8-24 KiB",
            8 << 10,
            16 << 10,
            ReqFlags::empty(),
        ),
        (
            "write zeroes, no unmap, 40-48 KiB",
            40 << 10,
            8 << 10,
            ReqFlags::NO_UNMAP,
        ),
    ] {
        let ret = run(what, &mut q, &|q| q.write_zeroes(start, len, 0, flags))?;
        if !record(what, ret, None) {
            return Ok(steps);
        }
        want[start as usize..(start + len) as usize].fill(0);
        let ret = run("read", &mut q, &read)?;
        if !record(
            "read: zeros there, the data around",
            ret,
            Some(compare(&read_back(), &want)),
        ) {
            return Ok(steps);
        }
    }
    let ret = run("discard", &mut q, &|q| {
        q.discard(56 << 10, 8 << 10, 0, ReqFlags::empty())
    })?;
    record("discard 56-64 KiB", ret, None);
    drop(q);
    drop(started);
    drop(b);
    Ok(steps)
}
