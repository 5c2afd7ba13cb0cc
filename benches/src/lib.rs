//! Everything that drives the stack from outside and measures or checks it: the vhost-user
//! load generator ([`loadgen`], a frontend: the other end of the protocol from the bridge),
//! a second client on libblkio ([`blkio_load`]),
//! the NVMe driver's tools ([`nvme`]: perf, verify, probe), the system benchmarks that boot
//! backends and the lab side by side ([`system`]), and what they share ([`histogram`],
//! [`patterns`]). The criterion micro-benchmarks are in `benches/`.

#![deny(missing_docs)]

pub mod args;
pub mod blkio_load;
pub mod histogram;
pub mod loadgen;
pub mod nvme;
pub mod patterns;
pub mod system;

/// Errors of the tools; each variant is one cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The NVMe driver failed.
    #[error("NVMe")]
    Nvme(#[from] vfblk_nvme::Error),
    /// The lab failed.
    #[error("lab")]
    Lab(#[from] vfblk_lab::LabError),
    /// An OS call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A benchmark's backend or client did not behave.
    #[error("{0}")]
    Run(String),
}

/// Result of the tools.
pub type Result<T> = std::result::Result<T, Error>;

/// Turns an OS error into [`Error::Io`] saying what was being done (for `map_err`).
pub fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// An error with every cause in its chain, `: `-separated (for one line of output).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    vfblk_vhost::error_chain(e)
}
