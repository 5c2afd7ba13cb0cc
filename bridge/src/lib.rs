//! The host binaries' library: the vhost-user-blk load generator (a frontend that acts like
//! QEMU and a guest driver at once). The bridge binary itself is thin wiring over
//! `vfblk-vhost`.

#![deny(missing_docs)]

pub mod loadgen;
