//! The bridge: virtio-blk requests translated to block backends. [`virtio_blk`] has the spec
//! types, [`request`] checks a walked chain into a [`request::Request`], [`device`] is the
//! virtio-blk device type the vhost-user plumbing (`vfblk-vhost`) serves, and [`backend`]
//! holds the backends side by side (mem, file, nvme). The control plane that serves them
//! (controllers, config, RPC, the binaries) is `vfblk-control`.

#![deny(missing_docs)]

pub mod backend;
pub mod device;
pub mod image_lock;
pub mod limits;
pub mod request;
pub mod spec;
pub mod stats;
pub mod virtio_blk;

/// Errors of the bridge; each variant is one cause.
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
    /// A disk size a backend cannot serve.
    #[error("{what}: {bytes} bytes is not a positive multiple of 512")]
    BadSize {
        /// Which disk.
        what: String,
        /// Its size.
        bytes: u64,
    },
    /// A backend queue got more requests than it has room for (a logic error: the device
    /// asks `can_submit` first).
    #[error("{0} queue full")]
    QueueFull(&'static str),
    /// The NVMe driver failed.
    #[error("NVMe: {what}")]
    Nvme {
        /// What was being done.
        what: String,
        /// The driver's error.
        #[source]
        source: vfblk_nvme::Error,
    },
    /// A backend spec or command-line value that does not parse.
    #[error("{0}")]
    BadArgument(String),
    /// Another user holds the image (QEMU's image lock): what, and who if known.
    #[error("{0}")]
    ImageInUse(String),
    /// An upgrade by hand-over that did not happen; the old process serves on.
    #[error("upgrade: {0}")]
    Upgrade(String),
    /// The vhost-user plumbing failed.
    #[error("vhost-user")]
    Vhost(#[from] vfblk_vhost::Error),
    /// An object of that name exists already.
    #[error("{what} {name} exists already")]
    Exists {
        /// Its kind.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// No object of that name.
    #[error("no {what} named {name}")]
    NotFound {
        /// Its kind.
        what: &'static str,
        /// The name asked for.
        name: String,
    },
    /// A backend still used by controllers.
    #[error("backend {name} is used by controller(s) {}", users.join(", "))]
    Busy {
        /// The backend.
        name: String,
        /// Controllers using it.
        users: Vec<String>,
    },
    /// The target answered an RPC with an error.
    #[error("{message} (JSON-RPC error {code})")]
    Rpc {
        /// JSON-RPC error code.
        code: i64,
        /// The target's message.
        message: String,
    },
    /// A thread panicked while holding a lock.
    #[error("a lock ({0}) was poisoned by a panicking thread")]
    Poisoned(&'static str),
    /// What was being done when `source` failed (e.g. which RBD cluster was registered).
    #[error("{what}")]
    Context {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// librados or librbd refused.
    #[error("{what}: {reason}")]
    Ceph {
        /// What was being done.
        what: String,
        /// The library's error.
        reason: String,
    },
}

impl From<Error> for vfblk_vhost::Error {
    fn from(e: Error) -> Self {
        match e {
            // The plumbing closes the connection for the frontend to try again later.
            Error::ImageInUse(_) => vfblk_vhost::Error::StorageBusy(Box::new(e)),
            e => vfblk_vhost::Error::Device(Box::new(e)),
        }
    }
}

/// Result of the bridge.
pub type Result<T> = std::result::Result<T, Error>;
