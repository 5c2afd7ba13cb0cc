//! vhost-user-blk device: protocol handler, guest memory, virtqueues, inflight tracking,
//! virtio-blk requests and pluggable block backends.
//!
//! The data path, top to bottom: [`virtq`] (avail ring) → [`chain`] (descriptors checked
//! against [`memory`]) → [`blk`] (request checked against the device limits) →
//! [`inflight`] (recorded) → a [`backend`] queue → completion → used ring.

#![deny(missing_docs)]

pub mod backend;
pub mod blk;
pub mod chain;
pub mod device;
pub mod inflight;
pub mod memory;
pub mod server;
pub mod virtq;
pub mod worker;

use std::fmt;

/// Errors of the vhost-user device.
#[derive(Debug)]
pub enum Error {
    /// The frontend sent something we cannot accept.
    Protocol(String),
    /// The guest's rings are malformed.
    Guest(String),
    /// An OS call failed.
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A backend failed.
    Backend(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Protocol(m) => write!(f, "vhost-user protocol: {m}"),
            Error::Guest(m) => write!(f, "guest: {m}"),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::Backend(m) => write!(f, "backend: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// Result of the vhost-user device.
pub type Result<T> = std::result::Result<T, Error>;
