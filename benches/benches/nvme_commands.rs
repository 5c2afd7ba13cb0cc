//! Cost of building what every I/O needs: the 64-byte command and its PRPs. These run once per
//! I/O on the poller thread, so they bound the IOPS one core can reach.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use vfblk_nvme::prp::{self, DmaSegment};
use vfblk_nvme::spec::{nvm, Command};

fn commands(c: &mut Criterion) {
    c.bench_function("command: 4 KiB read", |b| {
        b.iter(|| Command::rw(black_box(nvm::READ), 1, black_box(123_456), black_box(8)))
    });
}

fn prps(c: &mut Criterion) {
    let mut list = vec![0u64; 2 * 512];
    let mut group = c.benchmark_group("prp build");
    for (name, segs) in [
        (
            "4 KiB aligned",
            vec![DmaSegment {
                iova: 0x1_0000_0000,
                len: 4096,
            }],
        ),
        (
            "4 KiB unaligned (2 pages)",
            vec![DmaSegment {
                iova: 0x1_0000_0200,
                len: 4096,
            }],
        ),
        (
            "128 KiB (list of 31)",
            vec![DmaSegment {
                iova: 0x1_0000_0000,
                len: 128 << 10,
            }],
        ),
        (
            "512 KiB (list of 127)",
            vec![DmaSegment {
                iova: 0x1_0000_0000,
                len: 512 << 10,
            }],
        ),
        (
            "4 segments of 16 KiB",
            (0..4u64)
                .map(|i| DmaSegment {
                    iova: 0x1_0000_0000 + i * 0x10_0000,
                    len: 16 << 10,
                })
                .collect(),
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                // SAFETY: `list` holds 2 pages of entries and lives for the benchmark.
                unsafe { prp::build(black_box(&segs), 4096, list.as_mut_ptr(), 0x2_0000_0000, 2) }
                    .expect("valid PRPs")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, commands, prps);
criterion_main!(benches);
