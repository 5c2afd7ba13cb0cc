//! Userspace NVMe driver over VFIO.
//!
//! Layers, bottom up: [`pci`] (sysfs identity, IOMMU group, driver binding), [`vfio`] (owning
//! the function: container, group, device, config space, BAR0), [`mmio`] (volatile register
//! access), [`regs`] (NVMe registers and fields), [`spec`] (commands, completions, identify
//! structures), [`prp`] and [`sgl`] (data pointers), [`queue`] (polled queue pairs),
//! [`controller`] (bring-up, admin commands, reset). The tools that exercise the driver
//! (perf, verify, probe) live in `vfblk-benches`.

#![deny(missing_docs)]

pub mod controller;
pub mod kept;
pub mod mmio;
pub mod pci;
pub mod prp;
pub mod queue;
pub mod regs;
pub mod sgl;
pub mod spec;
pub mod vfio;

/// NVMe driver errors; each says which device and what was being done, and keeps its cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OS call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The device is not in a usable state.
    #[error("{device}: {what}")]
    Device {
        /// PCI address.
        device: String,
        /// What is wrong.
        what: String,
    },
    /// A VFIO ioctl failed.
    #[error("{device}: VFIO {what}")]
    Vfio {
        /// PCI address.
        device: String,
        /// What was being done.
        what: String,
        /// What vfio-ioctls said.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// DMA memory could not be allocated or mapped.
    #[error("{device}: DMA memory")]
    Dma {
        /// PCI address.
        device: String,
        /// The cause.
        #[source]
        source: vfblk_hugepages::DmaError,
    },
    /// A command completed with an error status.
    #[error("{device}: queue {queue}, cid {cid}, opcode {opcode:#04x} ({what}): {status}")]
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
    #[error("{device}: timed out waiting for {what}")]
    Timeout {
        /// PCI address.
        device: String,
        /// What was awaited.
        what: String,
    },
    /// A thread panicked while holding one of the controller's locks.
    #[error("{device}: the {lock} lock was poisoned by a panicking thread")]
    Poisoned {
        /// PCI address.
        device: String,
        /// Which lock.
        lock: &'static str,
    },
    /// A malformed argument.
    #[error("{0}")]
    BadArgument(String),
}

/// NVMe driver result.
pub type Result<T> = std::result::Result<T, Error>;
