//! DMA memory for userspace drivers: hugetlb memfd allocation, IOVA assignment and mapping
//! through an IOMMU ([`DmaMapper`], implemented over a VFIO container by [`VfioDmaMapper`]).
//!
//! Memory comes from `memfd_create(MFD_HUGETLB | MFD_HUGE_2MB)`, mapped shared, so the fd can
//! be kept across a restart or handed to another process. When no hugepages are reserved, it
//! falls back to 4 KiB memfd pages locked with `mlock`, with a warning: the IOMMU pins them
//! either way, but TLB reach and IOMMU mapping counts are worse.
//!
//! IOVAs are assigned by an [`IovaAllocator`] below 2^39 (an emulated Intel IOMMU may offer
//! no more), never host virtual addresses.

#![deny(missing_docs)]

mod iova;
mod mapper;
mod memory;
mod pool;
pub mod reserve;

pub use iova::IovaAllocator;
pub use mapper::{DmaBuffer, DmaMapper, ExternalMapping, VfioDmaMapper};
pub use memory::{memfd, DmaMemory, PageKind};
pub use pool::{file_identity, ArenaHook, DmaChunk, DmaPool};

use std::fmt;

/// Size of the huge pages we allocate.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;
/// Size of a base page.
pub const SMALL_PAGE_SIZE: usize = 4096;

/// DMA memory errors.
#[derive(Debug)]
pub enum DmaError {
    /// Creating, sizing, mapping or locking memory failed.
    Alloc {
        /// What was being done.
        what: String,
        /// Bytes requested.
        len: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// The IOVA space is exhausted or the request is malformed.
    Iova(String),
    /// The IOMMU refused a mapping or unmapping.
    Map {
        /// IOVA of the range.
        iova: u64,
        /// Length of the range.
        len: usize,
        /// What the mapper said.
        reason: String,
    },
    /// Reading or changing the kernel's hugepage pools failed.
    Sys {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaError::Alloc { what, len, .. } => write!(f, "DMA memory: {what} ({len} bytes)"),
            DmaError::Iova(m) => write!(f, "IOVA allocation: {m}"),
            DmaError::Map { iova, len, reason } => {
                write!(f, "IOMMU mapping of IOVA {iova:#x}+{len:#x}: {reason}")
            }
            DmaError::Sys { what, .. } => write!(f, "hugepages: {what}"),
        }
    }
}

impl std::error::Error for DmaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DmaError::Alloc { source, .. } | DmaError::Sys { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// DMA memory result.
pub type Result<T> = std::result::Result<T, DmaError>;
