//! The host binaries' library: the NVMe backend of the bridge (our VFIO driver behind the
//! vhost-user-blk device) and the load generator (a frontend that acts like QEMU and a guest
//! driver at once). The binaries themselves are thin wiring.

#![deny(missing_docs)]

pub mod loadgen;
pub mod nvme_backend;
