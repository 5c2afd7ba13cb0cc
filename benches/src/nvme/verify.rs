//! Data-integrity exercise: random writes and read-backs of deterministic patterns at many
//! offsets and sizes, with page-aligned and unaligned buffers, on several queue pairs from
//! several threads at once; then every block of each region is written once more so an
//! independent reader (the kernel's nvme driver) can check the whole region.
//!
//! A block's content is a function of (seed, LBA) only, so overlapping writes agree and the
//! final state is known without a log.

use std::sync::atomic::{AtomicU64, Ordering};

use vfblk_nvme::controller::Controller;
use vfblk_nvme::prp::DmaSegment;
use vfblk_nvme::{Error, Result};

use super::sync_io;
use crate::patterns::{check_pattern, fill_pattern, mix};

/// What to exercise.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Namespace.
    pub nsid: u32,
    /// Pattern seed.
    pub seed: u64,
    /// Threads, each with its own queue pair and region.
    pub queues: u16,
    /// Random write+read-back operations per thread.
    pub ops: u32,
    /// Blocks per thread region.
    pub region_blocks: u64,
    /// Queue entries.
    pub entries: u16,
    /// Reset the controller once this many operations (all threads) have completed.
    pub reset_after_ops: Option<u64>,
}

/// What [`verify`] did.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Random write+read-back operations.
    pub ops: u64,
    /// Bytes written in them.
    pub bytes: u64,
    /// Operations whose buffer did not start on a page boundary.
    pub unaligned_ops: u64,
    /// Operations with a scattered buffer (2-4 pieces splitting pages), which needs SGLs.
    pub scattered_ops: u64,
    /// Commands the queue pairs sent with SGLs.
    pub sgl_commands: u64,
    /// Largest transfer used.
    pub largest: u64,
    /// Threads and queue pairs used.
    pub queues: u16,
    /// First LBA and block count of the whole verified area.
    pub area: (u64, u64),
    /// Block size.
    pub block_size: u32,
    /// Controller resets done in the middle of the exercise.
    pub resets: u64,
    /// Operations completed after the last reset.
    pub ops_after_reset: u64,
}

/// Runs the exercise; the area used is `[0, queues * region_blocks)` of the namespace.
pub fn verify(ctrl: &Controller, opts: &VerifyOptions) -> Result<VerifyReport> {
    let ns = ctrl.namespace(opts.nsid)?.clone();
    let block = ns.info.block_size() as usize;
    let shift = ns.info.lba_shift;
    let total = opts.region_blocks * u64::from(opts.queues);
    if total > ns.info.nsze {
        return Err(Error::BadArgument(format!(
            "{}: {} blocks needed, namespace {} has {}",
            ctrl.name(),
            total,
            opts.nsid,
            ns.info.nsze
        )));
    }
    let max_blocks = (ctrl.max_transfer() / block).clamp(1, 65536) as u64;
    // ops, bytes, unaligned ops, largest transfer, scattered ops, commands sent with SGLs
    let counters: [AtomicU64; 6] = Default::default();
    let resets_before = ctrl.resets();
    let ops_at_reset = AtomicU64::new(0);
    let workers_done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| -> Result<()> {
        let mut workers = Vec::new();
        let resetter = opts.reset_after_ops.map(|threshold| {
            let (counters, ops_at_reset, workers_done) = (&counters, &ops_at_reset, &workers_done);
            scope.spawn(move || -> Result<()> {
                while counters[0].load(Ordering::Relaxed) < threshold {
                    if workers_done.load(Ordering::Relaxed) == usize::from(opts.queues) {
                        return Err(Error::BadArgument(format!(
                            "the workload ended before {threshold} operations; no reset was done"
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                ctrl.reset()?;
                ops_at_reset.store(counters[0].load(Ordering::Relaxed), Ordering::Relaxed);
                Ok(())
            })
        });
        for q in 0..opts.queues {
            let counters = &counters;
            let ns = &ns;
            let workers_done = &workers_done;
            workers.push(scope.spawn(move || -> Result<()> {
                struct Done<'a>(&'a std::sync::atomic::AtomicUsize);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _done = Done(workers_done);
                let name = ctrl.name().to_string();
                let mut qp = ctrl.create_io_queue_pair(opts.entries)?;
                // Room for a start offset of up to 4 KiB and the gaps between scattered pieces.
                let buf_len = ctrl.max_transfer() + 3 * 4096;
                let wbuf = ctrl.dma_buffer(buf_len)?;
                let rbuf = ctrl.dma_buffer(buf_len)?;
                let first = u64::from(q) * opts.region_blocks;
                let mut rng = opts.seed ^ (u64::from(q) << 32) ^ 0x5eed;
                let mut host = vec![0u8; buf_len];
                let mut back = vec![0u8; buf_len];
                let sgl = ctrl.identify().supports_sgl();
                let io = |qp: &mut vfblk_nvme::queue::QueuePair, write: bool, lba: u64, blocks: u64, segs: &[DmaSegment]| {
                    let what = format!("{} of {blocks} blocks at LBA {lba}", if write { "write" } else { "read" });
                    sync_io::run(&name, qp, &what, |qp| {
                        if write {
                            qp.write(ns.nsid, lba, blocks as u32, shift, segs, 0)
                        } else {
                            qp.read(ns.nsid, lba, blocks as u32, shift, segs, 0)
                        }
                    })
                };
                for _ in 0..opts.ops {
                    rng = mix(rng);
                    // Sizes: mostly small, sometimes up to MDTS.
                    let blocks = match rng % 4 {
                        0 => max_blocks,
                        1 => 1 + (rng >> 8) % max_blocks,
                        _ => 1 + (rng >> 8) % 16.min(max_blocks),
                    }
                    .min(opts.region_blocks);
                    let lba = first + (rng >> 24) % (opts.region_blocks - blocks + 1);
                    // Buffer start: page aligned, or a dword-aligned offset into the page.
                    let offset = if (rng >> 40) % 2 == 0 { 0 } else { (((rng >> 44) % 1023) + 1) as usize * 4 };
                    let len = blocks as usize * block;
                    // Pieces of the buffer as (offset in the DMA buffer, length): one, or (when
                    // the controller takes SGLs) 2-4 pieces cut at dword points and spread out
                    // with gaps, which PRPs cannot describe.
                    let mut pieces = [(0usize, 0usize); 4];
                    let mut count = 1;
                    pieces[0] = (offset, len);
                    let scatter = sgl && len >= 64 && (rng >> 50) % 3 == 0;
                    if scatter {
                        count = 2 + ((rng >> 52) % 3) as usize;
                        let mut cuts = [0usize; 5];
                        cuts[count] = len;
                        let mut r = rng;
                        for cut in cuts.iter_mut().take(count).skip(1) {
                            r = mix(r);
                            *cut = 4 * (1 + (r as usize) % (len / 4 - 1));
                        }
                        cuts[..=count].sort_unstable();
                        let mut cursor = offset;
                        for j in 0..count {
                            r = mix(r);
                            let piece = cuts[j + 1] - cuts[j];
                            pieces[j] = (cursor, piece);
                            cursor += piece + 4 * (1 + (r as usize) % 200);
                        }
                        // Empty pieces (equal cuts) are merged away.
                        let mut kept = 0;
                        for j in 0..count {
                            if pieces[j].1 > 0 {
                                pieces[kept] = pieces[j];
                                kept += 1;
                            }
                        }
                        count = kept;
                    }
                    fill_pattern(opts.seed, lba, block, &mut host[..len]);
                    let mut wsegs = [DmaSegment { iova: 0, len: 0 }; 4];
                    let mut rsegs = wsegs;
                    let mut done = 0;
                    for j in 0..count {
                        let (at, n) = pieces[j];
                        wbuf.write_bytes(at, &host[done..done + n]);
                        rbuf.write_bytes(at, &vec![0xa5; n]);
                        wsegs[j] = DmaSegment { iova: wbuf.iova() + at as u64, len: n as u32 };
                        rsegs[j] = DmaSegment { iova: rbuf.iova() + at as u64, len: n as u32 };
                        done += n;
                    }
                    io(&mut qp, true, lba, blocks, &wsegs[..count])?;
                    io(&mut qp, false, lba, blocks, &rsegs[..count])?;
                    let mut done = 0;
                    for &(at, n) in &pieces[..count] {
                        rbuf.read_bytes(at, &mut back[done..done + n]);
                        done += n;
                    }
                    if let Some(bad) = check_pattern(opts.seed, lba, block, &back[..len]) {
                        return Err(Error::Device {
                            device: name,
                            what: format!(
                                "queue {}: read-back of LBA {bad} differs (op: {blocks} blocks at LBA {lba}, buffer offset {offset}, {count} pieces)",
                                qp.qid()
                            ),
                        });
                    }
                    counters[0].fetch_add(1, Ordering::Relaxed);
                    counters[1].fetch_add(len as u64, Ordering::Relaxed);
                    counters[2].fetch_add(u64::from(offset != 0), Ordering::Relaxed);
                    counters[3].fetch_max(len as u64, Ordering::Relaxed);
                    counters[4].fetch_add(u64::from(count > 1), Ordering::Relaxed);
                }
                // Write the whole region once more so every block holds its pattern.
                let mut lba = first;
                while lba < first + opts.region_blocks {
                    let blocks = max_blocks.min(first + opts.region_blocks - lba);
                    let len = blocks as usize * block;
                    fill_pattern(opts.seed, lba, block, &mut host[..len]);
                    wbuf.write_bytes(0, &host[..len]);
                    io(&mut qp, true, lba, blocks, &[DmaSegment { iova: wbuf.iova(), len: len as u32 }])?;
                    lba += blocks;
                }
                sync_io::run(&name, &mut qp, "flush", |qp| qp.flush(ns.nsid, 0))?;
                counters[5].fetch_add(qp.sgl_commands(), Ordering::Relaxed);
                Ok(())
            }));
        }
        for w in workers {
            w.join()
                .map_err(|_| Error::BadArgument("verify worker panicked".into()))??;
        }
        if let Some(r) = resetter {
            r.join()
                .map_err(|_| Error::BadArgument("reset thread panicked".into()))??;
        }
        Ok(())
    })?;
    let ops = counters[0].load(Ordering::Relaxed);
    Ok(VerifyReport {
        resets: ctrl.resets() - resets_before,
        ops_after_reset: if opts.reset_after_ops.is_some() {
            ops - ops_at_reset.load(Ordering::Relaxed)
        } else {
            0
        },
        ops,
        bytes: counters[1].load(Ordering::Relaxed),
        unaligned_ops: counters[2].load(Ordering::Relaxed),
        scattered_ops: counters[4].load(Ordering::Relaxed),
        sgl_commands: counters[5].load(Ordering::Relaxed),
        largest: counters[3].load(Ordering::Relaxed),
        queues: opts.queues,
        area: (0, total),
        block_size: block as u32,
    })
}
