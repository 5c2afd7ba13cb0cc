//! A Ceph RBD image as a backend, through librbd's asynchronous calls.
//!
//! The data path: scatter lists straight from guest RAM (`rbd_aio_readv`/`writev`, no bounce
//! copy), flush, discard and write-zeroes. One image handle serves every queue of the
//! backend (a handle per poller would make them contend for the image's exclusive lock).
//! librbd completes requests on its own threads; its per-image event queue
//! (`rbd_set_image_notification` + `rbd_poll_io_events`) would hand one poller the
//! completions of another's requests, so each request's callback instead marks its own
//! ticket in the submitting queue's board (an atomic flag and a counter, nothing shared
//! between pollers), and the poller that submitted collects it: one atomic load per poll
//! while nothing is done, no lock, no system call.
//!
//! Allocation per request: none on our side (slots, tickets and iovecs are allocated when the
//! queue opens); librbd allocates its completion (`rbd_aio_create_completion`) and its
//! internal request objects for each call.
//!
//! Clusters: a librados client ([`RbdCluster`]) serves many images. A named cluster
//! ([`RbdCluster::register`], like SPDK's `bdev_rbd_register_cluster`) is one client the
//! images that name it share, with its threads bounded (`ms_async_op_threads`,
//! `librados_thread_count`; see [`ClusterOptions`]) and optionally pinned to a CPU list: the
//! thread that connects the client, and later opens its images, is pinned for the time of
//! the call, and every thread librados or librbd starts meanwhile inherits that mask. Images
//! that give the cluster's settings themselves (conf file, client id, keyring) share one
//! implicit client per distinct settings, with librados's defaults.

pub mod ffi;

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use std::os::fd::{AsRawFd, FromRawFd};

use crate::backend::{check_grow, Backend, BackendInfo, BackendQueue, LiveCapacity, Queue};
use crate::request::{Operation, Request, MAX_DISCARD_SEGMENTS, MAX_SEGMENTS};
use crate::virtio_blk::{status, SECTOR};
use crate::{Error, Result};
use vfblk_vhost::device::Wakeup;

/// Requests one queue has out at once.
const DEPTH: usize = 128;
/// librbd completions one queue has out at once (a discard or write-zeroes request takes one
/// per range).
const TICKETS: usize = DEPTH + MAX_DISCARD_SEGMENTS;
/// Errors of one queue logged in full; later ones are counted.
const ERRORS_LOGGED: u64 = 10;

/// Which cluster, as librados is told (also the key clients are shared by).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ClusterSettings {
    /// ceph.conf (default: librados's search: $CEPH_CONF, /etc/ceph/ceph.conf, ...).
    pub conf: Option<PathBuf>,
    /// Client id, without `client.` (default `admin`).
    pub id: Option<String>,
    /// Keyring (default: what the conf names).
    pub keyring: Option<PathBuf>,
}

/// Who a librados client is, as an image's lock names its owner: the cluster's fsid and
/// the client's address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientIdentity {
    /// The cluster.
    pub fsid: String,
    /// The client's address (what `rbd_lock_get_owners` reports for it).
    pub address: String,
}

/// Clients of this process's dead predecessor (a crash the keeper or systemd restarted us
/// from): their exclusive locks on the images we open are broken at once instead of waiting
/// out Ceph's 30 s watch timeout. Only these: a lock held by anyone else is left alone.
static DEAD_PREDECESSORS: Mutex<Vec<ClientIdentity>> = Mutex::new(Vec::new());

/// Says which clients belonged to this process's predecessor, now dead (read from the fd
/// store's record after a crash). Never call it for a predecessor that may be alive.
pub fn predecessor_is_dead(clients: Vec<ClientIdentity>) {
    if let Ok(mut dead) = DEAD_PREDECESSORS.lock() {
        *dead = clients;
    }
}

/// The clients this process has connected (for the fd store's record): the shared clients
/// of images given their cluster's settings and the named clusters'.
pub fn clients_in_use() -> Vec<ClientIdentity> {
    let Ok(clients) = ALL_CLIENTS.lock() else {
        return Vec::new();
    };
    clients
        .iter()
        .filter_map(Weak::upgrade)
        .map(|c| c.identity.clone())
        .collect()
}

/// Open images (handle address, its description), for [`close_for_successor`].
static OPEN_IMAGES: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());

/// Closes every open image of this process, releasing their exclusive locks and watches,
/// for a successor that took everything over (an upgrade by hand-over). Call it only right
/// before the process exits, with every queue stopped: the backends keep their (now closed)
/// handles. An image left open would keep its lock until Ceph's watch timeout (30 s) after
/// the exit, and the successor's writes would wait that long.
pub fn close_for_successor() {
    let Ok(api) = ffi::api() else {
        return;
    };
    let images = OPEN_IMAGES
        .lock()
        .map(|mut i| std::mem::take(&mut *i))
        .unwrap_or_default();
    for (handle, description) in images {
        let started = std::time::Instant::now();
        // SAFETY: an image this process opened and has not closed (Drop removes it from the
        // list before closing); no queue submits any more.
        let rc = unsafe { (api.rbd_close)(handle as ffi::Image) };
        if rc < 0 {
            tracing::warn!(
                "{description}: closing for the successor: {}",
                ffi::errno_text(rc.into())
            );
        } else {
            tracing::info!(
                "{description}: closed for the successor (its lock released) in {:?}",
                started.elapsed()
            );
        }
    }
}

/// Clients shared implicitly by images given the same settings, by those settings.
static CLIENTS: Mutex<Option<HashMap<ClusterSettings, Weak<RbdCluster>>>> = Mutex::new(None);

/// Every connected client, named or not (their identities go into the fd store's record).
static ALL_CLIENTS: Mutex<Vec<Weak<RbdCluster>>> = Mutex::new(Vec::new());

/// A named cluster's definition (SPDK's `bdev_rbd_register_cluster`): who connects, how many
/// threads its client runs, and on which CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterOptions {
    /// The conf file, client id and keyring.
    pub settings: ClusterSettings,
    /// `ms_async_op_threads`: the messenger's worker threads (`msgr-worker-N`; Ceph's
    /// default 3, at most 24). None: what the conf file says.
    pub ms_async_op_threads: Option<u32>,
    /// `librados_thread_count`: the threads that run librados's and librbd's completions and
    /// work (`io_context_pool`; Ceph's default 2). `rbd_op_threads` is set to the same so
    /// that librbd does not raise it. None: what the conf file says.
    pub librados_thread_count: Option<u32>,
    /// Pin every thread of the client to these CPUs (empty: wherever the process runs).
    pub cpus: Vec<usize>,
}

/// Most messenger threads librados takes (its own limit for `ms_async_op_threads`).
pub const MAX_MESSENGER_THREADS: u32 = 24;
/// Most librados threads a named cluster may ask for.
pub const MAX_LIBRADOS_THREADS: u32 = 64;

impl ClusterOptions {
    /// The options for the client of images that give their cluster's settings themselves:
    /// librados's defaults, no pinning.
    pub fn implicit(settings: &ClusterSettings) -> Self {
        Self {
            settings: settings.clone(),
            ..Self::default()
        }
    }

    /// Refuses what librados would refuse late or not at all.
    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::BadArgument(why));
        if let Some(n) = self.ms_async_op_threads {
            if n == 0 || n > MAX_MESSENGER_THREADS {
                return bad(format!(
                    "ms_async_op_threads {n}: 1 to {MAX_MESSENGER_THREADS}"
                ));
            }
        }
        if let Some(n) = self.librados_thread_count {
            if n == 0 || n > MAX_LIBRADOS_THREADS {
                return bad(format!(
                    "librados_thread_count {n}: 1 to {MAX_LIBRADOS_THREADS}"
                ));
            }
        }
        if let Some(id) = &self.settings.id {
            if id.is_empty() || id.starts_with("client.") {
                return bad(format!("id {id:?}: the client id without \"client.\""));
            }
        }
        if !self.cpus.is_empty() {
            let allowed = allowed_cpus()?;
            if let Some(c) = self.cpus.iter().find(|c| !allowed.contains(c)) {
                return bad(format!(
                    "cpus {:?}: CPU {c} is not one this process may run on ({allowed:?})",
                    self.cpus
                ));
            }
        }
        Ok(())
    }
}

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the calling thread's mask into a set of the size given.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(Error::Io {
            what: "reading this thread's CPU affinity".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: CPU_ISSET reads the set with an index below CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// The calling thread pinned to some CPUs until dropped, then given its mask back: the
/// threads librados and librbd start meanwhile inherit the pinning (how SPDK applies a
/// cluster's core mask).
struct Pinned(Option<libc::cpu_set_t>);

impl Pinned {
    /// Pins the calling thread to `cpus` (nothing for none).
    fn to(cpus: &[usize]) -> Result<Self> {
        if cpus.is_empty() {
            return Ok(Self(None));
        }
        let io = |what: &str| Error::Io {
            what: format!("{what} (cpus {cpus:?})"),
            source: std::io::Error::last_os_error(),
        };
        // SAFETY: zeroed cpu_set_t values are valid empty sets.
        let (mut saved, mut set): (libc::cpu_set_t, libc::cpu_set_t) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // SAFETY: the calling thread's mask into a set of the size given.
        if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&saved), &mut saved) } != 0 {
            return Err(io("reading this thread's CPU affinity"));
        }
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            // SAFETY: an index below CPU_SETSIZE into our set.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        // SAFETY: a set of the size given, for the calling thread.
        if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
            return Err(io("pinning the thread that starts the Ceph client"));
        }
        Ok(Self(Some(saved)))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: the calling thread's own mask, as read before.
            let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(saved), saved) };
            if rc != 0 {
                tracing::warn!(
                    "restoring a thread's CPU affinity: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// The thread settings a client runs with, as librados reports them after connecting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientThreads {
    /// `ms_async_op_threads`.
    pub ms_async_op_threads: u32,
    /// `librados_thread_count`.
    pub librados_thread_count: u32,
}

/// A connected librados client: shared by the images given the same settings, or a named
/// cluster's, shared by the images that name it.
pub struct RbdCluster {
    api: &'static ffi::Api,
    rados: ffi::Rados,
    /// For logs: "cluster NAME" or the settings.
    label: String,
    identity: ClientIdentity,
    threads: ClientThreads,
    cpus: Vec<usize>,
}

// SAFETY: a rados_t is thread-safe (librados's documented contract for a connected client).
unsafe impl Send for RbdCluster {}
// SAFETY: as above.
unsafe impl Sync for RbdCluster {}

impl Drop for RbdCluster {
    fn drop(&mut self) {
        let started = std::time::Instant::now();
        // SAFETY: our client; every image and ioctx of it is gone (they hold an Arc).
        unsafe { (self.api.rados_shutdown)(self.rados) };
        tracing::info!(
            "Ceph client of {} shut down in {:?}",
            self.label,
            started.elapsed()
        );
    }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::BadArgument(format!("{what} {s:?} contains a NUL byte")))
}

fn ceph_error(what: String, rc: i64) -> Error {
    Error::Ceph {
        what,
        reason: ffi::errno_text(rc),
    }
}

impl RbdCluster {
    /// The client for `settings`: the running one if an image uses it, else a new one.
    fn shared(settings: &ClusterSettings) -> Result<Arc<RbdCluster>> {
        let mut clients = CLIENTS
            .lock()
            .map_err(|_| Error::Poisoned("Ceph clients"))?;
        let clients = clients.get_or_insert_with(HashMap::new);
        if let Some(c) = clients.get(settings).and_then(Weak::upgrade) {
            return Ok(c);
        }
        let c = RbdCluster::connect(&ClusterOptions::implicit(settings), format!("{settings:?}"))?;
        clients.retain(|_, w| w.strong_count() > 0);
        clients.insert(settings.clone(), Arc::downgrade(&c));
        Ok(c)
    }

    /// A named cluster's client, connected with its thread bounds and pinning. On failure
    /// nothing of it is left: the client is shut down (its threads joined).
    pub fn register(name: &str, options: &ClusterOptions) -> Result<Arc<RbdCluster>> {
        options
            .check()
            .and_then(|()| RbdCluster::connect(options, format!("cluster {name}")))
            .map_err(|e| Error::Context {
                what: format!("registering RBD cluster {name}"),
                source: Box::new(e),
            })
    }

    fn connect(options: &ClusterOptions, label: String) -> Result<Arc<RbdCluster>> {
        let settings = &options.settings;
        let api = ffi::api().map_err(|e| Error::BadArgument(format!("RBD: {e}")))?;
        let name = format!("client.{}", settings.id.as_deref().unwrap_or("admin"));
        let cname = cstring("client id", &name)?;
        // Every thread the client starts, from here to the end of the connect, inherits it.
        let _pinned = Pinned::to(&options.cpus)?;
        let mut rados: ffi::Rados = std::ptr::null_mut();
        // SAFETY: valid out pointer and NUL-terminated strings; flags 0.
        let rc = unsafe { (api.rados_create2)(&mut rados, c"ceph".as_ptr(), cname.as_ptr(), 0) };
        if rc < 0 {
            return Err(ceph_error(
                format!("creating a Ceph client {name}"),
                rc.into(),
            ));
        }
        // From here the client is shut down on every failure.
        let mut cluster = RbdCluster {
            api,
            rados,
            label,
            identity: ClientIdentity {
                fsid: String::new(),
                address: String::new(),
            },
            threads: ClientThreads::default(),
            cpus: options.cpus.clone(),
        };
        let conf = settings
            .conf
            .as_ref()
            .map(|p| cstring("conf", &p.to_string_lossy()))
            .transpose()?;
        // SAFETY: our client; a path or null for librados's default search.
        let rc = unsafe {
            (api.rados_conf_read_file)(
                rados,
                conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        if rc < 0 {
            return Err(ceph_error(
                match &settings.conf {
                    Some(conf) => format!("reading Ceph configuration {}", conf.display()),
                    None => "reading Ceph configuration ($CEPH_CONF, /etc/ceph/ceph.conf)".into(),
                },
                rc.into(),
            ));
        }
        if let Some(keyring) = &settings.keyring {
            cluster.set("keyring", &keyring.to_string_lossy())?;
        }
        // A cluster that does not answer fails the create in bounded time (librados's default
        // waits five minutes) instead of holding the RPC that asked.
        cluster.set("client_mount_timeout", "15")?;
        if let Some(n) = options.ms_async_op_threads {
            cluster.set("ms_async_op_threads", &n.to_string())?;
        }
        if let Some(n) = options.librados_thread_count {
            cluster.set("librados_thread_count", &n.to_string())?;
            // librbd raises librados's count to its own if that is higher.
            cluster.set("rbd_op_threads", &n.to_string())?;
        }
        // SAFETY: our configured client.
        let rc = unsafe { (api.rados_connect)(rados) };
        if rc < 0 {
            return Err(ceph_error(
                format!("connecting to the Ceph cluster as {name}"),
                rc.into(),
            ));
        }
        cluster.identity = cluster.identity()?;
        cluster.threads = ClientThreads {
            ms_async_op_threads: cluster.get_number("ms_async_op_threads")?,
            librados_thread_count: cluster.get_number("librados_thread_count")?,
        };
        tracing::info!(
            "Ceph client {name} of {} connected to cluster {} as {} ({:?}; {} messenger and {} librados threads{})",
            cluster.label,
            cluster.identity.fsid,
            cluster.identity.address,
            settings.conf,
            cluster.threads.ms_async_op_threads,
            cluster.threads.librados_thread_count,
            if options.cpus.is_empty() {
                String::new()
            } else {
                format!(", on CPUs {:?}", options.cpus)
            }
        );
        let cluster = Arc::new(cluster);
        if let Ok(mut all) = ALL_CLIENTS.lock() {
            all.retain(|w| w.strong_count() > 0);
            all.push(Arc::downgrade(&cluster));
        }
        Ok(cluster)
    }

    /// Sets a librados option of the client (before it connects).
    fn set(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (cstring("option", key)?, cstring("value", value)?);
        // SAFETY: our client and NUL-terminated strings.
        let rc = unsafe { (self.api.rados_conf_set)(self.rados, k.as_ptr(), v.as_ptr()) };
        if rc < 0 {
            return Err(ceph_error(format!("setting {key}={value}"), rc.into()));
        }
        Ok(())
    }

    /// A numeric librados option as the client has it.
    fn get_number(&self, key: &str) -> Result<u32> {
        let k = cstring("option", key)?;
        let mut buf = [0u8; 64];
        // SAFETY: our client, a NUL-terminated key, a buffer of the length given.
        let rc = unsafe {
            (self.api.rados_conf_get)(self.rados, k.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        if rc < 0 {
            return Err(ceph_error(format!("reading option {key}"), rc.into()));
        }
        let text = CStr::from_bytes_until_nul(&buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        text.trim().parse().map_err(|_| {
            Error::BadArgument(format!("librados option {key} is {text:?}, not a number"))
        })
    }

    /// Who the client is, as image locks name their owners.
    pub fn client(&self) -> &ClientIdentity {
        &self.identity
    }

    /// Its thread settings, as librados has them.
    pub fn threads(&self) -> ClientThreads {
        self.threads
    }

    /// The CPUs its threads are pinned to (empty: not pinned).
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// The connected client's fsid and address.
    fn identity(&self) -> Result<ClientIdentity> {
        let api = self.api;
        let mut fsid = [0u8; 64];
        // SAFETY: our connected client and a buffer of the length given.
        let rc =
            unsafe { (api.rados_cluster_fsid)(self.rados, fsid.as_mut_ptr().cast(), fsid.len()) };
        if rc < 0 {
            return Err(ceph_error("reading the cluster's fsid".into(), rc.into()));
        }
        let fsid = CStr::from_bytes_until_nul(&fsid)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut addrs: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: our connected client and a valid out pointer; the buffer is freed below.
        let rc = unsafe { (api.rados_getaddrs)(self.rados, &mut addrs) };
        if rc < 0 || addrs.is_null() {
            return Err(ceph_error("reading the client's address".into(), rc.into()));
        }
        // SAFETY: librados returned a NUL-terminated string it allocated.
        let address = unsafe {
            let text = CStr::from_ptr(addrs).to_string_lossy().into_owned();
            (api.rados_buffer_free)(addrs);
            text
        };
        Ok(ClientIdentity { fsid, address })
    }
}

/// An RBD image, open.
pub struct RbdBackend {
    api: &'static ffi::Api,
    image: ffi::Image,
    ioctx: ffi::IoCtx,
    info: BackendInfo,
    /// The image's size as the target grows it (`backend_resize`).
    capacity: LiveCapacity,
    /// One resize at a time.
    resizing: Mutex<()>,
    /// Keeps the client up while the image is open.
    _cluster: Arc<RbdCluster>,
}

// SAFETY: librbd image handles are thread-safe for asynchronous I/O (QEMU and SPDK submit
// from several threads to one handle); open/close happen on one thread.
unsafe impl Send for RbdBackend {}
// SAFETY: as above.
unsafe impl Sync for RbdBackend {}

impl Drop for RbdBackend {
    fn drop(&mut self) {
        let handle = self.image as usize;
        let closed_already = OPEN_IMAGES.lock().is_ok_and(|mut images| {
            let before = images.len();
            images.retain(|(h, _)| *h != handle);
            images.len() == before
        });
        if closed_already {
            // By close_for_successor: only the ioctx is left.
            // SAFETY: our ioctx.
            unsafe { (self.api.rados_ioctx_destroy)(self.ioctx) };
            return;
        }
        // SAFETY: our image and ioctx; no queue of it is left (queues hold an Arc of us).
        unsafe {
            let rc = (self.api.rbd_close)(self.image);
            if rc < 0 {
                tracing::warn!(
                    "closing {}: {}",
                    self.info.description,
                    ffi::errno_text(rc.into())
                );
            }
            (self.api.rados_ioctx_destroy)(self.ioctx);
        }
    }
}

/// Test builds: `VFBLK_TEST_NO_RBD_LOCK_BREAK` leaves a dead predecessor's lock alone, to
/// show the stall it costs.
fn break_disabled_for_tests() -> bool {
    cfg!(feature = "test-delay") && std::env::var_os("VFBLK_TEST_NO_RBD_LOCK_BREAK").is_some()
}

/// What a new image gets: layering, exclusive-lock, object-map, fast-diff, deep-flatten
/// (librbd's defaults).
const NEW_IMAGE_FEATURES: u64 = 1 | 4 | 8 | 16 | 32;

impl RbdBackend {
    /// Opens `pool/image` of the cluster `settings` name, through the client shared by the
    /// images given the same settings. With `size`, an image that does not exist is created
    /// with it (and removed again if opening it then fails); an existing image must have
    /// that size.
    pub fn open(
        settings: &ClusterSettings,
        pool: &str,
        image: &str,
        size: Option<u64>,
    ) -> Result<Self> {
        Self::open_on(RbdCluster::shared(settings)?, pool, image, size)
    }

    /// [`RbdBackend::open`] through a named cluster's client. Threads librbd starts for the
    /// image are pinned as the cluster's.
    pub fn open_on(
        cluster: Arc<RbdCluster>,
        pool: &str,
        image: &str,
        size: Option<u64>,
    ) -> Result<Self> {
        Self::open_image(cluster, pool, image, size, false)
    }

    /// Opens the existing image `pool/image` for reading only (`rbd_open_read_only`), through
    /// the client shared by the images given the same settings: librbd then never takes the
    /// image's exclusive lock nor watches its header for writers, so the image's writer (a
    /// VM elsewhere, `rbd import`) is never asked to hand the lock over. The disk refuses
    /// writes, discards and write zeroes and is never resized; the image is never created.
    pub fn open_read_only(settings: &ClusterSettings, pool: &str, image: &str) -> Result<Self> {
        Self::open_on_read_only(RbdCluster::shared(settings)?, pool, image)
    }

    /// [`RbdBackend::open_read_only`] through a named cluster's client.
    pub fn open_on_read_only(cluster: Arc<RbdCluster>, pool: &str, image: &str) -> Result<Self> {
        Self::open_image(cluster, pool, image, None, true)
    }

    /// Opens the image, creating it with `size` if it is missing (the read-only callers give
    /// none).
    fn open_image(
        cluster: Arc<RbdCluster>,
        pool: &str,
        image: &str,
        size: Option<u64>,
        read_only: bool,
    ) -> Result<Self> {
        let _pinned = Pinned::to(&cluster.cpus)?;
        let api = cluster.api;
        let (cpool, cimage) = (cstring("pool", pool)?, cstring("image", image)?);
        let mut ioctx: ffi::IoCtx = std::ptr::null_mut();
        // SAFETY: our connected client, a NUL-terminated pool name, a valid out pointer.
        let rc = unsafe { (api.rados_ioctx_create)(cluster.rados, cpool.as_ptr(), &mut ioctx) };
        if rc < 0 {
            return Err(ceph_error(format!("opening pool {pool}"), rc.into()));
        }
        let destroy_ioctx = |ioctx| {
            // SAFETY: the ioctx we created, used by nothing else.
            unsafe { (api.rados_ioctx_destroy)(ioctx) }
        };
        let mut handle: ffi::Image = std::ptr::null_mut();
        let open = |handle: &mut ffi::Image| {
            // SAFETY: our ioctx, a NUL-terminated name, a valid out pointer, no snapshot
            // (both calls have the same contract).
            unsafe {
                if read_only {
                    (api.rbd_open_read_only)(ioctx, cimage.as_ptr(), handle, std::ptr::null())
                } else {
                    (api.rbd_open)(ioctx, cimage.as_ptr(), handle, std::ptr::null())
                }
            }
        };
        let mut rc = open(&mut handle);
        let mut created = false;
        if rc == -libc::ENOENT {
            if let Some(size) = size {
                let mut order: c_int = 0;
                // SAFETY: our ioctx, a NUL-terminated name, a valid order pointer (0: default).
                let crc = unsafe {
                    (api.rbd_create2)(ioctx, cimage.as_ptr(), size, NEW_IMAGE_FEATURES, &mut order)
                };
                if crc < 0 {
                    destroy_ioctx(ioctx);
                    return Err(ceph_error(
                        format!("creating image {pool}/{image} of {size} bytes"),
                        crc.into(),
                    ));
                }
                created = true;
                tracing::info!("created RBD image {pool}/{image} of {size} bytes");
                rc = open(&mut handle);
            }
        }
        let fail = |e: Error, handle: ffi::Image| {
            // SAFETY: our handle (if open) and ioctx; undoing what this call made.
            unsafe {
                if !handle.is_null() {
                    (api.rbd_close)(handle);
                }
                if created {
                    (api.rbd_remove)(ioctx, cimage.as_ptr());
                }
            }
            destroy_ioctx(ioctx);
            e
        };
        if rc < 0 {
            let what = if read_only {
                format!("opening image {pool}/{image} (read-only)")
            } else {
                format!("opening image {pool}/{image}")
            };
            return Err(fail(ceph_error(what, rc.into()), std::ptr::null_mut()));
        }
        let mut bytes = 0u64;
        // SAFETY: our open image and a valid out pointer.
        let rc = unsafe { (api.rbd_get_size)(handle, &mut bytes) };
        if rc < 0 {
            return Err(fail(
                ceph_error(format!("size of image {pool}/{image}"), rc.into()),
                handle,
            ));
        }
        if let Some(size) = size.filter(|&s| s != bytes) {
            return Err(fail(
                Error::BadArgument(format!(
                    "image {pool}/{image} has {bytes} bytes, not the {size} asked for (resize it with rbd resize)"
                )),
                handle,
            ));
        }
        if bytes == 0 || bytes % SECTOR != 0 {
            return Err(fail(
                Error::BadSize {
                    what: format!("image {pool}/{image}"),
                    bytes,
                },
                handle,
            ));
        }
        let info = BackendInfo {
            description: format!(
                "RBD image {pool}/{image} ({} MiB{})",
                bytes >> 20,
                if read_only { ", read-only" } else { "" }
            ),
            capacity_sectors: bytes / SECTOR,
            block_size: 512,
            // RADOS objects are written whole below 4 KiB granularity anyway.
            physical_block_size: 4096,
            optimal_io_size: 4 << 20,
            // Nothing is written through a read-only image: nothing to flush, discard or
            // zero (librbd would refuse the last two with EROFS anyway).
            flush: !read_only,
            discard: !read_only,
            write_zeroes: !read_only,
            read_only,
        };
        let backend = Self {
            api,
            image: handle,
            ioctx,
            capacity: LiveCapacity::new(info.capacity_sectors),
            resizing: Mutex::new(()),
            info,
            _cluster: cluster,
        };
        // A reader takes no lock, so it has none to take over: a dead predecessor's lock is
        // left to its writable successor (or to Ceph's timeout).
        if !read_only {
            backend.take_lock_from_dead_predecessor();
        }
        if let Ok(mut images) = OPEN_IMAGES.lock() {
            images.push((backend.image as usize, backend.info.description.clone()));
        }
        Ok(backend)
    }
}

impl RbdBackend {
    /// The client this image is open through.
    pub fn client(&self) -> &ClientIdentity {
        &self._cluster.identity
    }

    /// If the image's exclusive lock is held by a client of our dead predecessor, breaks it
    /// (librbd blocklists that client, so none of its writes still in flight can land after
    /// we run them again). A lock anyone else holds is left alone: librbd asks a live owner
    /// to hand it over at our first write.
    fn take_lock_from_dead_predecessor(&self) {
        let owners = match self.lock_owners() {
            Ok(owners) => owners,
            Err(e) => {
                tracing::warn!("{}", vfblk_vhost::error_chain(&e));
                return;
            }
        };
        let dead = DEAD_PREDECESSORS
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        let ours = &self._cluster.identity;
        for owner in owners {
            let predecessor = dead
                .iter()
                .any(|c| c.fsid == ours.fsid && c.address == owner);
            if !predecessor {
                tracing::info!(
                    "{}: exclusive lock held by {owner}, not a client of a dead predecessor of ours: left to librbd's hand-over",
                    self.info.description
                );
                continue;
            }
            if break_disabled_for_tests() {
                tracing::warn!(
                    "{}: VFBLK_TEST_NO_RBD_LOCK_BREAK: the dead predecessor's lock ({owner}) is left to time out",
                    self.info.description
                );
                continue;
            }
            let started = std::time::Instant::now();
            let Ok(cowner) = CString::new(owner.as_str()) else {
                continue;
            };
            // SAFETY: our open image and a NUL-terminated owner string librbd gave us.
            let rc = unsafe {
                (self.api.rbd_lock_break)(self.image, ffi::LOCK_MODE_EXCLUSIVE, cowner.as_ptr())
            };
            if rc < 0 {
                tracing::error!(
                    "{}: breaking the dead predecessor's lock ({owner}): {}; the first write waits for Ceph to time it out",
                    self.info.description,
                    ffi::errno_text(rc.into())
                );
            } else {
                tracing::info!(
                    "{}: broke the exclusive lock of our dead predecessor {owner} (blocklisted) in {:?}",
                    self.info.description,
                    started.elapsed()
                );
            }
        }
    }

    /// The exclusive lock's owners (their addresses), if anyone holds it.
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        let mut owners: [*mut std::ffi::c_char; 8] = [std::ptr::null_mut(); 8];
        let mut count = owners.len();
        let mut mode: c_int = 0;
        // SAFETY: our open image; room for `count` owner pointers, freed below.
        let rc = unsafe {
            (self.api.rbd_lock_get_owners)(self.image, &mut mode, owners.as_mut_ptr(), &mut count)
        };
        if rc == -libc::ENOENT {
            return Ok(Vec::new());
        }
        if rc < 0 {
            return Err(ceph_error(
                format!("lock owners of {}", self.info.description),
                rc.into(),
            ));
        }
        let list = owners[..count.min(owners.len())]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: librbd filled these with NUL-terminated strings.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: the strings librbd allocated for this call.
        unsafe { (self.api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), count) };
        Ok(list)
    }
}

impl Backend for RbdBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn open_queue(&self, _poller: u64) -> Result<Queue> {
        Ok(Queue::from(RbdQueue::new(
            self.api,
            self.image,
            &self.info.description,
        )?))
    }

    fn live_capacity(&self) -> Option<LiveCapacity> {
        Some(self.capacity.clone())
    }

    /// Grows the image in the cluster (`rbd_resize`; librbd takes the exclusive lock for it
    /// and tells the image's other clients); the new sectors are served only once the
    /// cluster has them. A failed resize leaves the image's size as it was.
    fn grow(&self, bytes: u64) -> Result<()> {
        let _one = self.resizing.lock().unwrap_or_else(|e| e.into_inner());
        let what = &self.info.description;
        if self.info.read_only {
            return Err(Error::BadArgument(format!(
                "{what}: opened read-only; a read-only image is not resized"
            )));
        }
        let Some(sectors) = check_grow(what, self.capacity.sectors(), bytes)? else {
            return Ok(());
        };
        // SAFETY: our open image; librbd serialises the resize with the I/O in flight.
        let rc = unsafe { (self.api.rbd_resize)(self.image, bytes) };
        if rc < 0 {
            return Err(ceph_error(
                format!("resizing {what} to {bytes} bytes"),
                rc.into(),
            ));
        }
        self.capacity.set(sectors);
        tracing::info!("{what}: resized to {bytes} bytes");
        Ok(())
    }
}

/// Where librbd's threads report completions to one queue: a flag per ticket and a count,
/// and the eventfd that wakes the queue's poller when it sleeps.
struct Board {
    done: Box<[AtomicBool]>,
    ready: AtomicUsize,
    /// Set by the poller before it sleeps with requests out; the callback that takes it back
    /// writes `wake`. Only then: a polling poller costs librbd's threads no system call.
    armed: AtomicBool,
    /// Non-blocking eventfd the sleeping poller waits on.
    wake: std::os::fd::OwnedFd,
    /// Each ticket's callback argument (stable addresses: the board never moves).
    args: Box<[TicketArg]>,
}

/// The callback's argument: which ticket of which board.
struct TicketArg {
    board: *const Board,
    ticket: usize,
}

/// librbd's completion callback (on a librbd thread): marks the ticket done. The board
/// holds a reference for every ticket out, so it outlives a queue dropped with requests
/// still in librbd.
unsafe extern "C" fn on_complete(_c: ffi::Completion, arg: *mut c_void) {
    // SAFETY: `arg` is a TicketArg of a board kept alive by the reference taken at submit.
    let arg = unsafe { &*(arg as *const TicketArg) };
    // SAFETY: as above.
    let board = unsafe { &*arg.board };
    board.done[arg.ticket].store(true, Ordering::Release);
    // SeqCst with the poller's arming (store `armed`, then load `ready`): either the poller
    // sees this completion and does not sleep, or this callback sees it armed and wakes it.
    // (The poller may take `done` before this add and read `ready` low, even wrapped, for
    // a moment: every such shortfall is an add still to come, which checks `armed` after.)
    board.ready.fetch_add(1, Ordering::SeqCst);
    if board.armed.load(Ordering::SeqCst) && board.armed.swap(false, Ordering::SeqCst) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to the board's eventfd (alive: the board
        // is). A full counter (EAGAIN) already wakes the poller.
        let _ = unsafe { libc::write(board.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
    // SAFETY: the reference taken for this ticket at submit.
    unsafe { Arc::decrement_strong_count(arg.board) };
}

#[derive(Clone, Copy)]
struct RbdIo {
    token: u16,
    /// librbd completions still out.
    pending: u32,
    status: u8,
}

#[derive(Clone, Copy)]
struct Ticket {
    slot: usize,
    completion: ffi::Completion,
    /// Bytes a read must return.
    expected: i64,
    op: &'static str,
}

/// One virtqueue's path to the image.
pub struct RbdQueue {
    api: &'static ffi::Api,
    image: ffi::Image,
    board: Arc<Board>,
    slots: Box<[RbdIo]>,
    free_slots: Vec<usize>,
    tickets: Box<[Ticket]>,
    free_tickets: Vec<usize>,
    /// Tickets out, in no order.
    out: Vec<usize>,
    iovecs: Box<[[libc::iovec; MAX_SEGMENTS]]>,
    /// Slots whose request never reached librbd (refused at once): reported at the next poll.
    finished_now: Vec<usize>,
    in_flight: usize,
    errors: u64,
    stall: StallWatch,
}

/// Requests out in librbd and nothing answered for this long: the cluster is not answering,
/// and the log says so (then again every [`STALL_REPEAT_NS`], and once it answers again).
const STALL_WARN_NS: u64 = 5_000_000_000;
const STALL_REPEAT_NS: u64 = 30_000_000_000;
/// Empty polls between two looks at the clock while requests are out.
const STALL_CHECK_EVERY: u32 = 1024;

/// Watches one queue's requests in librbd for a cluster that stops answering (an OSD down,
/// the network cut). The requests keep waiting, as QEMU's do on librbd (a guest's own
/// timeout decides what a long wait means), but never silently.
struct StallWatch {
    /// The image, for the log.
    what: String,
    /// When the queue last saw progress: a completion, or a request out with none before.
    since_ns: u64,
    /// When the stall was last logged (None: not stalled).
    warned_ns: Option<u64>,
    empty_polls: u32,
}

impl StallWatch {
    fn new(what: &str) -> Self {
        Self {
            what: what.to_string(),
            since_ns: 0,
            warned_ns: None,
            empty_polls: 0,
        }
    }

    /// Something finished, or the first request went out: the clock starts again.
    fn progress(&mut self, now_ns: u64) {
        if self.warned_ns.take().is_some() {
            tracing::warn!(
                "{}: the cluster answers again after {:.1} s without an answer",
                self.what,
                now_ns.saturating_sub(self.since_ns) as f64 / 1e9
            );
        }
        self.since_ns = now_ns;
        self.empty_polls = 0;
    }

    /// A poll found nothing finished with `in_flight` requests out: logs a stall once it is
    /// long enough. Looks at the clock once every [`STALL_CHECK_EVERY`] such polls (a
    /// spinning poller's; a sleeping one checks before each sleep).
    fn idle_poll(&mut self, in_flight: usize) {
        self.empty_polls += 1;
        if self.empty_polls < STALL_CHECK_EVERY {
            return;
        }
        self.empty_polls = 0;
        self.check(vfblk_vhost::poller::loop_now(), in_flight);
    }

    /// Logs the stall if it is due at `now_ns`; returns whether it did.
    fn check(&mut self, now_ns: u64, in_flight: usize) -> bool {
        let waited = now_ns.saturating_sub(self.since_ns);
        let due = match self.warned_ns {
            None => waited >= STALL_WARN_NS,
            Some(at) => now_ns.saturating_sub(at) >= STALL_REPEAT_NS,
        };
        if due {
            self.warned_ns = Some(now_ns);
            tracing::warn!(
                "{}: {in_flight} request(s) out and none answered for {:.1} s: the cluster is not answering (an OSD down or unreachable?); they wait in librbd",
                self.what,
                waited as f64 / 1e9
            );
        }
        due
    }
}

// SAFETY: the raw pointers are librbd handles (thread-safe) and guest memory that stays
// mapped while requests are in flight; one poller uses the queue.
unsafe impl Send for RbdQueue {}

impl RbdQueue {
    fn new(api: &'static ffi::Api, image: ffi::Image, what: &str) -> Result<Self> {
        // SAFETY: eventfd(2) with no pointers; the result is checked before it is owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Io {
                what: "eventfd for an RBD queue's completions".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a new fd of ours, owned once.
        let wake = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let board = Arc::new_cyclic(|weak: &Weak<Board>| Board {
            done: (0..TICKETS).map(|_| AtomicBool::new(false)).collect(),
            ready: AtomicUsize::new(0),
            armed: AtomicBool::new(false),
            wake,
            args: (0..TICKETS)
                .map(|ticket| TicketArg {
                    board: weak.as_ptr(),
                    ticket,
                })
                .collect(),
        });
        Ok(Self {
            api,
            image,
            board,
            slots: vec![
                RbdIo {
                    token: 0,
                    pending: 0,
                    status: status::OK
                };
                DEPTH
            ]
            .into_boxed_slice(),
            free_slots: (0..DEPTH).rev().collect(),
            tickets: vec![
                Ticket {
                    slot: 0,
                    completion: std::ptr::null_mut(),
                    expected: 0,
                    op: "",
                };
                TICKETS
            ]
            .into_boxed_slice(),
            free_tickets: (0..TICKETS).rev().collect(),
            out: Vec::with_capacity(TICKETS),
            iovecs: vec![
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_SEGMENTS];
                DEPTH
            ]
            .into_boxed_slice(),
            finished_now: Vec::with_capacity(DEPTH),
            in_flight: 0,
            errors: 0,
            stall: StallWatch::new(what),
        })
    }

    /// After a librbd call for `slot` with ticket `t`: out, or refused at once.
    fn launched(&mut self, slot: usize, t: usize, rc: c_int) {
        if rc < 0 {
            self.refused(t, rc);
        } else {
            self.slots[slot].pending += 1;
            self.out.push(t);
        }
    }

    /// A ticket for `slot`, or the slot failed (no completion could be made).
    fn try_ticket(&mut self, slot: usize, expected: i64, op: &'static str) -> Option<usize> {
        match self.ticket(slot, expected, op) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!("RBD {op}: {}", vfblk_vhost::error_chain(&e));
                self.slots[slot].status = status::IOERR;
                None
            }
        }
    }

    /// Takes a ticket for one librbd call of `slot`: the completion, with the board's
    /// reference for its callback.
    fn ticket(&mut self, slot: usize, expected: i64, op: &'static str) -> Result<usize> {
        let t = self.free_tickets.pop().ok_or(Error::QueueFull("rbd"))?;
        let arg = &self.board.args[t] as *const TicketArg as *mut c_void;
        let mut completion: ffi::Completion = std::ptr::null_mut();
        // SAFETY: a valid out pointer; the argument outlives the completion (the board is
        // kept by the reference taken below until the callback drops it).
        let rc = unsafe { (self.api.rbd_aio_create_completion)(arg, on_complete, &mut completion) };
        if rc < 0 {
            self.free_tickets.push(t);
            return Err(ceph_error("creating an RBD completion".into(), rc.into()));
        }
        // The callback's reference to the board.
        // SAFETY: `board` is a live Arc.
        unsafe { Arc::increment_strong_count(Arc::as_ptr(&self.board)) };
        self.tickets[t] = Ticket {
            slot,
            completion,
            expected,
            op,
        };
        Ok(t)
    }

    /// A call librbd refused at once: no callback will come; the ticket is undone here.
    fn refused(&mut self, t: usize, rc: c_int) {
        let ticket = self.tickets[t];
        // SAFETY: the completion we created, never handed to librbd.
        unsafe { (self.api.rbd_aio_release)(ticket.completion) };
        // SAFETY: the callback's reference, which no callback will drop.
        unsafe { Arc::decrement_strong_count(Arc::as_ptr(&self.board)) };
        self.free_tickets.push(t);
        self.fail(ticket.slot, ticket.op, rc.into());
    }

    fn fail(&mut self, slot: usize, op: &str, rc: i64) {
        self.slots[slot].status = status::IOERR;
        self.errors += 1;
        if self.errors <= ERRORS_LOGGED {
            tracing::error!("RBD {op}: {}", ffi::errno_text(rc));
        } else if self.errors.is_power_of_two() {
            tracing::error!("RBD: {} errors on this queue so far", self.errors);
        }
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        if !self.out.is_empty() {
            // Their callbacks still come and find the board (it is kept for them); their
            // completions are librbd's to free with the image.
            tracing::warn!(
                "RBD queue closed with {} call(s) still in librbd",
                self.out.len()
            );
        }
    }
}

impl BackendQueue for RbdQueue {
    fn can_submit(&self) -> bool {
        !self.free_slots.is_empty() && self.free_tickets.len() >= MAX_DISCARD_SEGMENTS
    }

    fn submit(&mut self, r: &Request, token: u16) -> Result<()> {
        let slot = self.free_slots.pop().ok_or(Error::QueueFull("rbd"))?;
        self.slots[slot] = RbdIo {
            token,
            pending: 0,
            status: status::OK,
        };
        if self.in_flight == 0 {
            self.stall.progress(vfblk_vhost::poller::loop_now());
        }
        self.in_flight += 1;
        let (api, image) = (self.api, self.image);
        match r.op {
            Operation::Read | Operation::Write => {
                for (i, s) in r.data().iter().enumerate() {
                    self.iovecs[slot][i] = libc::iovec {
                        iov_base: s.host.cast(),
                        iov_len: s.len as usize,
                    };
                }
                let read = r.op == Operation::Read;
                let Some(t) = self.try_ticket(
                    slot,
                    if read { r.data_len as i64 } else { 0 },
                    if read { "read" } else { "write" },
                ) else {
                    self.finished_now.push(slot);
                    return Ok(());
                };
                let (iov, count, offset) = (
                    self.iovecs[slot].as_ptr(),
                    r.data_count as c_int,
                    r.sector * SECTOR,
                );
                let c = self.tickets[t].completion;
                // SAFETY: the iovecs live in the queue and the buffers in guest memory until
                // the completion is collected.
                let rc = unsafe {
                    if read {
                        (api.rbd_aio_readv)(image, iov, count, offset, c)
                    } else {
                        (api.rbd_aio_writev)(image, iov, count, offset, c)
                    }
                };
                self.launched(slot, t, rc);
            }
            Operation::Flush => {
                let Some(t) = self.try_ticket(slot, 0, "flush") else {
                    self.finished_now.push(slot);
                    return Ok(());
                };
                // SAFETY: our image and completion.
                let rc = unsafe { (api.rbd_aio_flush)(image, self.tickets[t].completion) };
                self.launched(slot, t, rc);
            }
            Operation::Discard | Operation::WriteZeroes { .. } => {
                let zeroes = matches!(r.op, Operation::WriteZeroes { .. });
                for &(sector, count) in &r.ranges[..r.range_count] {
                    let (offset, bytes) = (sector * SECTOR, u64::from(count) * SECTOR);
                    let Some(t) =
                        self.try_ticket(slot, 0, if zeroes { "write zeroes" } else { "discard" })
                    else {
                        break;
                    };
                    let c = self.tickets[t].completion;
                    // SAFETY: our image and completion.
                    let rc = unsafe {
                        if zeroes {
                            (api.rbd_aio_write_zeroes)(image, offset, bytes as usize, c, 0, 0)
                        } else {
                            (api.rbd_aio_discard)(image, offset, bytes, c)
                        }
                    };
                    self.launched(slot, t, rc);
                }
            }
        }
        if self.slots[slot].pending == 0 {
            // Nothing reached librbd (refused at once): done now, reported at the next poll.
            self.finished_now.push(slot);
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<(u16, u8)>) -> usize {
        let mut n = 0;
        for slot in self.finished_now.drain(..) {
            done.push((self.slots[slot].token, self.slots[slot].status));
            self.free_slots.push(slot);
            self.in_flight -= 1;
            n += 1;
        }
        if self.board.ready.load(Ordering::Acquire) == 0 {
            if n == 0 && self.in_flight > 0 {
                self.stall.idle_poll(self.in_flight);
            }
            return n;
        }
        let mut i = 0;
        while i < self.out.len() {
            let t = self.out[i];
            if !self.board.done[t].swap(false, Ordering::Acquire) {
                i += 1;
                continue;
            }
            self.out.swap_remove(i);
            self.board.ready.fetch_sub(1, Ordering::Relaxed);
            let ticket = self.tickets[t];
            // SAFETY: a completion whose callback ran; released once, here.
            let rc = unsafe {
                let rc = (self.api.rbd_aio_get_return_value)(ticket.completion);
                (self.api.rbd_aio_release)(ticket.completion);
                rc as i64
            };
            self.free_tickets.push(t);
            if rc < 0 {
                self.fail(ticket.slot, ticket.op, rc);
            } else if rc != ticket.expected && ticket.expected != 0 {
                // A short read: beyond the image's end cannot happen (the request was
                // checked against the capacity), so it is an error.
                self.fail(ticket.slot, ticket.op, -i64::from(libc::EIO));
            }
            let s = &mut self.slots[ticket.slot];
            s.pending -= 1;
            if s.pending == 0 {
                done.push((s.token, s.status));
                self.free_slots.push(ticket.slot);
                self.in_flight -= 1;
                n += 1;
            }
        }
        if n > 0 {
            self.stall.progress(vfblk_vhost::poller::loop_now());
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn can_wake(&self) -> bool {
        true
    }

    fn arm_wakeup(&mut self) -> Wakeup {
        // A poller that sleeps polls seldom (its sleeps last up to 100 ms): the stall
        // check goes with each sleep instead.
        self.stall
            .check(vfblk_vhost::poller::loop_now(), self.in_flight);
        self.board.armed.store(true, Ordering::SeqCst);
        if self.board.ready.load(Ordering::SeqCst) > 0 || !self.finished_now.is_empty() {
            self.disarm_wakeup(false);
            return Wakeup::Poll;
        }
        Wakeup::Fd(self.board.wake.as_raw_fd())
    }

    fn disarm_wakeup(&mut self, readable: bool) {
        // Still armed and not readable: no callback took it, nothing to drain. Taken back:
        // a callback wrote the eventfd, or is about to (then the next sleep finds it
        // readable at once and drains it here).
        let taken = !self.board.armed.swap(false, Ordering::SeqCst);
        if taken || readable {
            let mut count = [0u8; 8];
            // SAFETY: reads 8 bytes into a local array from the board's non-blocking eventfd.
            let _ = unsafe {
                libc::read(
                    self.board.wake.as_raw_fd(),
                    count.as_mut_ptr().cast(),
                    count.len(),
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_that_stops_answering_is_logged_after_five_seconds_then_every_thirty() {
        let s = 1_000_000_000u64;
        let mut w = StallWatch::new("RBD image rbd/x");
        w.progress(100 * s);
        assert!(!w.check(104 * s, 3), "4 s: not yet");
        assert!(w.check(105 * s, 3), "5 s without an answer");
        assert!(!w.check(110 * s, 3), "logged once");
        assert!(!w.check(134 * s, 3));
        assert!(w.check(135 * s, 3), "again 30 s later");
        // An answer ends the stall; the next one is timed from it.
        w.progress(140 * s);
        assert_eq!(w.warned_ns, None);
        assert!(!w.check(144 * s, 1));
        assert!(w.check(145 * s, 1));
    }
}
