//! System benchmarks: whole processes side by side (our bridge, qemu-storage-daemon) or the
//! lab guest (our NVMe driver against the kernel's), each run recorded with its command.

pub mod nvme;
pub mod target;
pub mod vhost;
