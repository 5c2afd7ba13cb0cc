//! Userspace NVMe driver over VFIO.
//!
//! Layers, bottom up: [`pci`] (sysfs identity, IOMMU group, driver binding), [`vfio`] (owning
//! the function: container, group, device, config space, BAR0), [`mmio`] (volatile register
//! access), [`regs`] (NVMe registers and fields), [`probe`] (what the lab and the CLI report).

#![deny(missing_docs)]

pub mod controller;
pub mod mmio;
pub mod pci;
pub mod perf;
pub mod probe;
pub mod prp;
pub mod queue;
pub mod regs;
pub mod sgl;
pub mod spec;
pub mod sync_io;
pub mod verify;
pub mod vfio;

use std::fmt;

/// NVMe driver errors; each says which device and what was being done.
#[derive(Debug)]
pub enum Error {
    /// An OS call failed.
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The device is not in a usable state.
    Device {
        /// PCI address.
        device: String,
        /// What is wrong.
        what: String,
    },
    /// A VFIO ioctl failed.
    Vfio {
        /// PCI address.
        device: String,
        /// What was being done.
        what: String,
        /// What vfio-ioctls said.
        reason: String,
    },
    /// DMA memory could not be allocated or mapped.
    Dma {
        /// PCI address.
        device: String,
        /// The cause.
        source: vfblk_hugepages::DmaError,
    },
    /// A command completed with an error status.
    Command {
        /// PCI address.
        device: String,
        /// Queue id (0 = admin).
        queue: u16,
        /// Command id.
        cid: u16,
        /// Opcode.
        opcode: u8,
        /// What the command was for.
        what: String,
        /// The NVMe status.
        status: spec::Status,
    },
    /// The controller did not respond in time.
    Timeout {
        /// PCI address.
        device: String,
        /// What was awaited.
        what: String,
    },
    /// A malformed argument.
    BadArgument(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::Device { device, what } => write!(f, "{device}: {what}"),
            Error::Vfio {
                device,
                what,
                reason,
            } => write!(f, "{device}: VFIO {what}: {reason}"),
            Error::Dma { device, source } => write!(f, "{device}: {source}"),
            Error::Command {
                device,
                queue,
                cid,
                opcode,
                what,
                status,
            } => write!(
                f,
                "{device}: queue {queue}, cid {cid}, opcode {opcode:#04x} ({what}): {status}"
            ),
            Error::Timeout { device, what } => write!(f, "{device}: timed out waiting for {what}"),
            Error::BadArgument(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// NVMe driver result.
pub type Result<T> = std::result::Result<T, Error>;
