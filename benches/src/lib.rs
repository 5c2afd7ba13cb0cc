//! Benchmarks live in `benches/` (criterion) and, later, the system suite that compares the
//! bridge with qemu-storage-daemon, the kernel and SPDK. Results and the commands that
//! produced them go to `docs/benchmarks.md`.
