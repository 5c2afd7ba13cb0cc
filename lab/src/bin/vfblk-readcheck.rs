//! `vfblk-readcheck`: a guest program that shows whether a live migration carried the
//! device's writes into guest RAM (its DMA) to the destination.
//!
//! `write` stamps `--regions` regions of `--region-mib` MiB each on a block device, every
//! 4 KiB block with its region, its block number and a pattern derived from them and
//! `--seed`, through O_DIRECT. `verify` then loops for `--seconds`: it reads region `i`
//! (O_DIRECT) into one buffer, allocated and zeroed once and never written by the CPU
//! again, and checks every word of it; `i` cycles through the regions. Only the device
//! writes that buffer, so when a migration stops the VM between a read and its check, the
//! destination checks what the source's device wrote: correct only if the source's
//! backend logged that DMA in the dirty log (else the destination holds the pages as the
//! migration last sent them: another region's stamps). On the first region read back
//! wrong it prints what it found (`--json`: one object) and exits 1; at the end it prints
//! the rounds done and exits 0.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

/// Bytes per stamped block.
const BLOCK: usize = 4096;
/// Bytes per page.
const PAGE: u64 = 4096;
/// Words (u64) per block.
const WORDS: usize = BLOCK / 8;
/// The first word of every stamped block.
const MAGIC: u64 = u64::from_le_bytes(*b"VFBLKRC1");

/// Stamped regions on a block device, read back through one device-written buffer.
#[derive(Parser, Debug)]
#[command(name = "vfblk-readcheck", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Layout {
    /// The block device (or file).
    #[arg(long)]
    device: PathBuf,
    /// Where the first region starts, in MiB.
    #[arg(long, default_value_t = 0)]
    offset_mib: u64,
    /// Regions.
    #[arg(long, default_value_t = 8)]
    regions: u32,
    /// MiB per region.
    #[arg(long, default_value_t = 8)]
    region_mib: u32,
    /// Mixed into every stamp, so that another run's stamps do not pass.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stamp every block of every region (O_DIRECT), then fsync.
    Write {
        #[command(flatten)]
        layout: Layout,
    },
    /// Read the regions in turn into one buffer and check them, for `--seconds`.
    Verify {
        #[command(flatten)]
        layout: Layout,
        /// How long to go on.
        #[arg(long)]
        seconds: u64,
        /// Milliseconds to wait between a read's completion and its check, the CPU idle and
        /// the buffer holding only what the device wrote: a migration's stop then lands
        /// between the two far more often than between a check and the next read.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Take a buffer whose pages all lie below this guest-physical address (MiB), as
        /// `/proc/self/pagemap` shows them (buffers that do not are kept allocated, so the
        /// next comes from elsewhere; up to 64 tries); 0: wherever it comes. A migration
        /// sends RAM in address order, and what it has not sent when the VM stops goes
        /// with its final contents, logged or not: the top of RAM (where the freed
        /// initramfs leaves free pages) would hide a missing log.
        #[arg(long, default_value_t = 0)]
        below_mib: u64,
        /// One JSON object on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// splitmix64: the pattern word `k` of a block.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The expected word `k` of block `block` of region `region`.
fn word(seed: u64, region: u32, block: u32, k: usize) -> u64 {
    match k {
        0 => MAGIC,
        1 => (u64::from(region) << 32) | u64::from(block),
        2 => seed,
        _ => mix(seed ^ (u64::from(region) << 48) ^ (u64::from(block) << 16) ^ k as u64),
    }
}

/// Fills `out` (one block's words) with block `block` of region `region`.
fn stamp(out: &mut [u64], seed: u64, region: u32, block: u32) {
    for (k, w) in out.iter_mut().enumerate() {
        *w = word(seed, region, block, k);
    }
}

/// What a wrong block held.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wrong {
    /// Its block number in the region read.
    block: u32,
    /// The first word that differs.
    word: usize,
    /// The stamp found in it: (region, block, seed) when it has the magic word.
    found: Option<(u32, u32, u64)>,
    /// Its first word as found.
    first_word: u64,
}

/// Checks a buffer holding region `region`: the wrong blocks (at most `keep` kept) and
/// their count.
fn check(buf: &[u64], seed: u64, region: u32, keep: usize) -> (u64, Vec<Wrong>) {
    let mut count = 0;
    let mut kept = Vec::new();
    for (b, block) in buf.chunks_exact(WORDS).enumerate() {
        let bad = (0..WORDS).find(|&k| block[k] != word(seed, region, b as u32, k));
        if let Some(k) = bad {
            count += 1;
            if kept.len() < keep {
                let found = (block[0] == MAGIC)
                    .then(|| ((block[1] >> 32) as u32, block[1] as u32, block[2]));
                kept.push(Wrong {
                    block: b as u32,
                    word: k,
                    found,
                    first_word: block[0],
                });
            }
        }
    }
    (count, kept)
}

/// A page-aligned buffer, zeroed and locked at allocation and never written by the CPU
/// again (only by the device, through O_DIRECT reads).
struct DeviceBuffer {
    ptr: *mut u8,
    len: usize,
}

impl DeviceBuffer {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping of `len` bytes; checked below, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = ptr.cast::<u8>();
        // SAFETY: the mapping is `len` bytes, writable, and ours alone. Written once here so
        // every page is a page of its own (not the shared zero page) before it is locked.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        // SAFETY: locks our own mapping in memory (the guest kernel moves no page of it);
        // failure (a low RLIMIT_MEMLOCK) only loses that.
        unsafe { libc::mlock(ptr.cast(), len) };
        Ok(Self { ptr, len })
    }

    /// Reads `self.len` bytes at `offset` of `file` into the buffer.
    fn read_at(&self, file: &File, offset: u64) -> std::io::Result<()> {
        let mut done = 0;
        while done < self.len {
            // SAFETY: the range [done, len) of our mapping is valid for writes; the kernel
            // fills it (the device DMAs into it).
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    self.ptr.add(done).cast(),
                    self.len - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("end of device at {}", offset + done as u64),
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// The guest-physical address range its pages lie in (lowest and highest page start),
    /// from `/proc/self/pagemap` (needs CAP_SYS_ADMIN for the frame numbers).
    fn physical_range(&self) -> std::io::Result<(u64, u64)> {
        use std::os::unix::fs::FileExt;
        let pagemap = File::open("/proc/self/pagemap")?;
        let first = self.ptr as u64 / PAGE;
        let pages = self.len as u64 / PAGE;
        let mut entries = vec![0u8; pages as usize * 8];
        pagemap.read_exact_at(&mut entries, first * 8)?;
        let (mut low, mut high) = (u64::MAX, 0);
        for entry in entries.chunks_exact(8) {
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            let pfn = entry & ((1 << 55) - 1);
            if entry & (1 << 63) == 0 || pfn == 0 {
                return Err(std::io::Error::other(
                    "a buffer page is not present or its frame is hidden",
                ));
            }
            low = low.min(pfn * PAGE);
            high = high.max(pfn * PAGE);
        }
        Ok((low, high))
    }

    fn words(&self) -> &[u64] {
        // SAFETY: the mapping is page-aligned, `len` bytes (a multiple of 8) and stays mapped
        // while `self` lives; only the device writes it, between our reads.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u64>(), self.len / 8) }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in new().
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn open(device: &PathBuf, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(device)
}

fn region_bytes(layout: &Layout) -> usize {
    layout.region_mib as usize * (1 << 20)
}

fn region_offset(layout: &Layout, region: u32) -> u64 {
    (layout.offset_mib << 20) + u64::from(region) * region_bytes(layout) as u64
}

fn write(layout: &Layout) -> std::io::Result<()> {
    let file = open(&layout.device, true)?;
    let bytes = region_bytes(layout);
    let buf = DeviceBuffer::new(bytes)?;
    for region in 0..layout.regions {
        // SAFETY: our own mapping, written by the CPU here (this buffer is the writer's).
        let words = unsafe { std::slice::from_raw_parts_mut(buf.ptr.cast::<u64>(), bytes / 8) };
        for (b, block) in words.chunks_exact_mut(WORDS).enumerate() {
            stamp(block, layout.seed, region, b as u32);
        }
        let offset = region_offset(layout, region);
        let mut done = 0;
        while done < bytes {
            // SAFETY: [done, bytes) of our mapping is valid for reads.
            let n = unsafe {
                libc::pwrite(
                    file.as_raw_fd(),
                    buf.ptr.add(done).cast(),
                    bytes - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n <= 0 {
                return Err(std::io::Error::last_os_error());
            }
            done += n as usize;
        }
    }
    file.sync_all()
}

/// What a `verify` run saw.
struct Report {
    rounds: u64,
    bytes: u64,
    longest_round: Duration,
    elapsed: Duration,
    hold: Duration,
    placement: Placement,
    /// The first region read back wrong: (round, region, wrong blocks, examples).
    mismatch: Option<(u64, u32, u64, Vec<Wrong>)>,
}

impl Report {
    fn json(&self, layout: &Layout) -> serde_json::Value {
        let mismatch = self.mismatch.as_ref().map(|(round, region, count, wrong)| {
            serde_json::json!({
                "round": round,
                "region": region,
                "wrong_blocks": count,
                "blocks_per_region": region_bytes(layout) / BLOCK,
                "examples": wrong.iter().map(|w| serde_json::json!({
                    "block": w.block,
                    "first_wrong_word": w.word,
                    "found_region": w.found.map(|f| f.0),
                    "found_block": w.found.map(|f| f.1),
                    "found_seed": w.found.map(|f| f.2),
                    "first_word": format!("{:#018x}", w.first_word),
                })).collect::<Vec<_>>(),
            })
        });
        serde_json::json!({
            "ok": self.mismatch.is_none(),
            "rounds": self.rounds,
            "bytes_read": self.bytes,
            "regions": layout.regions,
            "region_mib": layout.region_mib,
            "seconds": self.elapsed.as_secs_f64(),
            "longest_round_ms": self.longest_round.as_secs_f64() * 1e3,
            "hold_ms": self.hold.as_secs_f64() * 1e3,
            "buffer": {
                "lowest_mib": self.placement.range.map(|r| r.0 as f64 / (1 << 20) as f64),
                "highest_mib": self.placement.range.map(|r| r.1 as f64 / (1 << 20) as f64),
                "tries": self.placement.tries,
                "below_asked": self.placement.below,
            },
            "mismatch": mismatch,
        })
    }
}

/// Where the buffer lies: its lowest and highest page (guest-physical bytes) and the
/// buffers tried for it.
#[derive(Debug, Clone, Copy, Default)]
struct Placement {
    range: Option<(u64, u64)>,
    tries: u32,
    below: bool,
}

/// A buffer of `len` bytes whose pages lie below `below` bytes if one can be had in 64
/// tries (0: the first).
fn placed_buffer(len: usize, below: u64) -> std::io::Result<(DeviceBuffer, Placement)> {
    let mut rejected = Vec::new();
    loop {
        let buf = DeviceBuffer::new(len)?;
        let range = buf.physical_range().ok();
        let tries = rejected.len() as u32 + 1;
        let fits = range.is_some_and(|(_, high)| high + PAGE <= below);
        if below == 0 || fits || range.is_none() || tries >= 64 {
            let placement = Placement {
                range,
                tries,
                below: fits,
            };
            return Ok((buf, placement));
        }
        rejected.push(buf);
    }
}

fn verify(
    layout: &Layout,
    seconds: u64,
    hold: Duration,
    below_mib: u64,
) -> std::io::Result<Report> {
    let file = open(&layout.device, false)?;
    let (buf, placement) = placed_buffer(region_bytes(layout), below_mib << 20)?;
    let started = Instant::now();
    let mut report = Report {
        rounds: 0,
        bytes: 0,
        longest_round: Duration::ZERO,
        elapsed: Duration::ZERO,
        hold,
        placement,
        mismatch: None,
    };
    while started.elapsed() < Duration::from_secs(seconds) {
        let region = (report.rounds % u64::from(layout.regions)) as u32;
        let round_start = Instant::now();
        buf.read_at(&file, region_offset(layout, region))?;
        if !hold.is_zero() {
            std::thread::sleep(hold);
        }
        let (count, wrong) = check(buf.words(), layout.seed, region, 4);
        report.longest_round = report.longest_round.max(round_start.elapsed());
        report.bytes += buf.len as u64;
        if count > 0 {
            report.mismatch = Some((report.rounds, region, count, wrong));
            break;
        }
        report.rounds += 1;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Write { layout } => match write(&layout) {
            Ok(()) => {
                println!(
                    "stamped {} region(s) of {} MiB from {} MiB on {}",
                    layout.regions,
                    layout.region_mib,
                    layout.offset_mib,
                    layout.device.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vfblk-readcheck write: {e}");
                ExitCode::from(2)
            }
        },
        Command::Verify {
            layout,
            seconds,
            hold_ms,
            below_mib,
            json,
        } => {
            let hold = Duration::from_millis(hold_ms);
            let report = match verify(&layout, seconds, hold, below_mib) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("vfblk-readcheck verify: {e}");
                    return ExitCode::from(2);
                }
            };
            if json {
                println!("{}", report.json(&layout));
            } else if let Some((round, region, count, wrong)) = &report.mismatch {
                println!(
                    "MISMATCH in round {round}: region {region} read back with {count} wrong block(s) of {}",
                    region_bytes(&layout) / BLOCK
                );
                for w in wrong {
                    match w.found {
                        Some((r, b, s)) => println!(
                            "  block {}: word {} differs; the block holds the stamp of region {r} block {b} (seed {s})",
                            w.block, w.word
                        ),
                        None => println!(
                            "  block {}: word {} differs; no stamp (first word {:#018x})",
                            w.block, w.word, w.first_word
                        ),
                    }
                }
            } else {
                println!(
                    "{} round(s), {} MiB read and checked in {:.1} s, longest round {:.1} ms: every block as written",
                    report.rounds,
                    report.bytes >> 20,
                    report.elapsed.as_secs_f64(),
                    report.longest_round.as_secs_f64() * 1e3
                );
            }
            if report.mismatch.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(seed: u64, region: u32, blocks: u32) -> Vec<u64> {
        let mut buf = vec![0u64; blocks as usize * WORDS];
        for (b, block) in buf.chunks_exact_mut(WORDS).enumerate() {
            stamp(block, seed, region, b as u32);
        }
        buf
    }

    #[test]
    fn a_region_checks_against_itself_and_not_against_another_or_another_seed() {
        let r3 = region(7, 3, 16);
        assert_eq!(check(&r3, 7, 3, 4), (0, vec![]));
        let (count, wrong) = check(&r3, 7, 4, 2);
        assert_eq!(count, 16);
        assert_eq!(wrong.len(), 2);
        assert_eq!(wrong[0].block, 0);
        assert_eq!(wrong[0].word, 1, "the magic matches, the stamp does not");
        assert_eq!(wrong[0].found, Some((3, 0, 7)));
        let (count, wrong) = check(&r3, 8, 3, 1);
        assert_eq!(count, 16);
        assert_eq!(wrong[0].word, 2);
    }

    #[test]
    fn one_stale_page_or_one_changed_word_is_found_and_described() {
        let mut buf = region(1, 0, 8);
        // Block 5 still holds region 6's block 5 (a page the migration sent earlier).
        let stale = region(1, 6, 8);
        buf[5 * WORDS..6 * WORDS].copy_from_slice(&stale[5 * WORDS..6 * WORDS]);
        // Block 2 has one word wrong deep inside.
        buf[2 * WORDS + 300] ^= 1;
        let (count, wrong) = check(&buf, 1, 0, 4);
        assert_eq!(count, 2);
        assert_eq!(wrong[0].block, 2);
        assert_eq!(wrong[0].word, 300);
        assert_eq!(wrong[1].block, 5);
        assert_eq!(wrong[1].found, Some((6, 5, 1)));
        // Zeros (a page never written): no stamp.
        let zeros = vec![0u64; WORDS];
        let (_, wrong) = check(&zeros, 1, 0, 1);
        assert_eq!(wrong[0].found, None);
        assert_eq!(wrong[0].first_word, 0);
    }

    #[test]
    fn a_buffer_knows_where_its_pages_lie_when_pagemap_tells() {
        let (buf, placement) = placed_buffer(1 << 20, 0).unwrap();
        assert_eq!(placement.tries, 1, "no bound: the first buffer");
        // Frame numbers need CAP_SYS_ADMIN: without it there is no range, and no retry.
        if let Some((low, high)) = placement.range {
            assert!(
                low <= high && high - low >= 255 * PAGE,
                "{low:#x}..{high:#x}"
            );
            assert_eq!(buf.physical_range().unwrap(), (low, high));
        }
        // A bound nothing fits under: 64 tries, then the last, flagged as not below.
        let (_, placement) = placed_buffer(64 << 10, PAGE).unwrap();
        if placement.range.is_some() {
            assert_eq!(placement.tries, 64);
            assert!(!placement.below);
        }
    }

    #[test]
    fn write_then_verify_on_a_file_passes_and_a_stale_block_fails() {
        let dir = std::env::temp_dir().join(format!("vfblk-readcheck-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(6 << 20)
            .unwrap();
        let layout = Layout {
            device: path.clone(),
            offset_mib: 1,
            regions: 2,
            region_mib: 2,
            seed: 42,
        };
        // O_DIRECT may be refused where the temporary directory is tmpfs.
        if open(&path, true).is_err() {
            eprintln!("no O_DIRECT on {}: skipped", dir.display());
            return;
        }
        write(&layout).unwrap();
        let report = verify(&layout, 1, Duration::ZERO, 0).unwrap();
        assert!(report.mismatch.is_none());
        assert!(report.rounds >= 2, "{}", report.rounds);
        // Region 1's block 3 overwritten with region 0's block 3.
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut block = vec![0u8; BLOCK];
        file.read_exact_at(&mut block, (1 << 20) + 3 * BLOCK as u64)
            .unwrap();
        file.write_all_at(&block, (3 << 20) + 3 * BLOCK as u64)
            .unwrap();
        file.sync_all().unwrap();
        let report = verify(&layout, 5, Duration::from_millis(1), 0).unwrap();
        let (round, region, count, wrong) =
            report.mismatch.as_ref().expect("the stale block is found");
        assert_eq!((*round, *region, *count), (1, 1, 1));
        assert_eq!(wrong[0].found, Some((0, 3, 42)));
        assert!(report.json(&layout)["mismatch"]["examples"][0]["found_region"] == 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
