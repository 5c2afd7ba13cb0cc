//! IOVA allocation cost: it runs when queues and buffers are set up, and later for every guest
//! memory region, so it must stay cheap as the free list grows.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use vfblk_hugepages::IovaAllocator;

fn alloc_free_cycle(c: &mut Criterion) {
    c.bench_function("iova alloc+free 4 KiB (256 live ranges)", |b| {
        let mut iovas = IovaAllocator::default();
        // Fragment the space so the allocator walks a realistic free list.
        let live: Vec<u64> = (0..512).map(|_| iovas.alloc(4096, 4096).unwrap()).collect();
        for chunk in live.chunks(2) {
            iovas.free(chunk[0], 4096).unwrap();
        }
        b.iter(|| {
            let iova = iovas.alloc(black_box(4096), 4096).unwrap();
            iovas.free(iova, 4096).unwrap();
        })
    });
}

criterion_group!(benches, alloc_free_cycle);
criterion_main!(benches);
