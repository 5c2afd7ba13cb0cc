//! The control plane: the target, one process serving many vhost-user-blk controllers over
//! shared poller threads. Backends are named objects created once; each controller has its
//! own socket, serving thread and backend, and its queues run on the pollers (least loaded
//! first, or those pinned to the CPUs it asks for). [`Target`] is what the RPC server and the
//! config file drive; the pollers never touch it. Beside it: the config file ([`config`]),
//! the RPC server and client ([`rpc`]), metrics ([`metrics`]), upgrades by hand-over
//! ([`handover`]), starts after a crash ([`restart`]), reloads ([`reload`]), the keeper
//! ([`keeper`]), host setup ([`setup`]), and the operator's binaries. The device and its
//! backends are `vfblk-bridge`'s.

#![deny(missing_docs)]

pub mod config;
pub mod daemon;
pub mod handover;
pub mod keeper;
pub mod metrics;
pub mod reload;
pub mod restart;
pub mod rpc;
pub mod setup;
pub mod unserved;
pub mod watchdog;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use vfblk_vhost::backend_channel::Delivered;
use vfblk_vhost::guest_errors::GuestErrors;
use vfblk_vhost::poller::{PollMode, Poller};
use vfblk_vhost::protocol::DeviceConfig;
use vfblk_vhost::server::{ConfigChangeTold, SocketServer};

pub use config::{
    check_name, BackendConfig, ControllerConfig, FileEdits, NvmeAttachConfig, RbdClusterConfig,
    Section, SocketAccess, TargetConfig,
};
pub use reload::ReloadReport;
pub use unserved::{RetryReport, Unserved, UnservedEntries};
use vfblk_bridge::backend::{Backend, NvmeControllers, NvmeOptions, RbdCluster};
use vfblk_bridge::device::BlkDevice;
use vfblk_bridge::spec::BackendSpec;
use vfblk_bridge::stats::StatsSnapshot;
/// The control plane's errors are the bridge's (one enum for both, for now).
pub use vfblk_bridge::{Error, Result};
use vfblk_nvme::pci::PciAddress;

/// How long a poller spins without work before it sleeps on kicks.
pub const IDLE_BEFORE_SLEEP: Duration = Duration::from_millis(1);

/// Most virtqueues a controller offers.
pub const MAX_QUEUES: u16 = 64;

/// Queue pairs asked of an NVMe controller unless told otherwise (one per poller serving
/// it).
pub const NVME_IO_QUEUES: u16 = 16;

/// Process-wide settings: the pollers and how backends behave.
#[derive(Debug, Clone, Default)]
pub struct TargetSettings {
    /// Pollers pinned to these CPUs, one each (empty: `pollers` unpinned ones).
    pub cpus: Vec<usize>,
    /// Unpinned pollers when `cpus` is empty (0 counts as 1).
    pub pollers: usize,
    /// Never sleep when idle.
    pub poll: bool,
    /// Offer INFLIGHT_SHMFD.
    pub inflight: bool,
    /// How NVMe backends watch their commands.
    pub nvme: NvmeOptions,
    /// I/O queue pairs asked of each NVMe controller (0: [`NVME_IO_QUEUES`]).
    pub nvme_io_queues: u16,
    /// Hold completions this long and release them shuffled (tests only; needs the
    /// `test-delay` feature).
    pub test_delay: Option<Duration>,
    /// Where every change is saved (None: nothing is saved).
    pub config_file: Option<PathBuf>,
    /// Keep every connection's fds and state in the fd store at `$NOTIFY_SOCKET` (systemd
    /// with FileDescriptorStoreMax=, or vfblk-keeper), so that a successor of a crashed
    /// process resumes them without a reconnect.
    pub fd_store: bool,
    /// Owner, group and mode of controllers' sockets that do not give their own.
    pub socket_access: SocketAccess,
    /// A file that holds the serving process's pid, kept true across upgrades.
    pub pid_file: Option<PathBuf>,
    /// Take a migration's dirty log and never mark it (tests only, to show the corruption
    /// that follows; needs the `test-delay` feature).
    pub test_skip_dirty_log: bool,
}

/// A poller thread and the CPU it was pinned to (if any).
struct PinnedPoller {
    cpu: Option<usize>,
    poller: Arc<Poller>,
}

struct BackendEntry {
    spec: BackendSpec,
    backend: Arc<dyn Backend>,
    /// The NVMe attachment it came from (then it is not a config entry of its own).
    attachment: Option<String>,
    /// The file it lives in (device, inode), for `mem` and `file` backends.
    identity: Option<(u64, u64)>,
}

struct ControllerEntry {
    config: ControllerConfig,
    device: Arc<BlkDevice>,
    server: SocketServer,
}

/// Whether a configured object is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryState {
    /// Open and serving.
    Serving,
    /// In the configuration, but creating it failed (see its error); kept and retried.
    Failed,
}

/// A backend as `backend_list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    /// Its name.
    pub name: String,
    /// What it was created from.
    #[serde(flatten)]
    pub spec: BackendSpec,
    /// Served, or kept in the configuration after a failure.
    pub state: EntryState,
    /// Why it is not served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What it is.
    pub description: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Controllers using it.
    pub used_by: Vec<String>,
    /// The NVMe attachment it is a namespace of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvme: Option<String>,
}

/// A named RBD cluster as `rbd_cluster_list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RbdClusterStatus {
    /// Its configuration.
    #[serde(flatten)]
    pub config: RbdClusterConfig,
    /// Served (its client connected), or kept in the configuration after a failure.
    pub state: EntryState,
    /// Why it is not served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The cluster's fsid (once connected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsid: Option<String>,
    /// The client's address, as image locks name their owner (once connected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
    /// The thread settings the client runs with, as librados reports them (once connected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<vfblk_bridge::backend::rbd::ClientThreads>,
    /// Backends that name it, served or not.
    pub used_by: Vec<String>,
}

/// A controller as `vhost_blk_list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerStatus {
    /// Its configuration.
    #[serde(flatten)]
    pub config: ControllerConfig,
    /// Served, or kept in the configuration after a failure.
    pub state: EntryState,
    /// Why it is not served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A frontend is connected.
    pub connected: bool,
    /// Frontends accepted since the controller was created.
    pub connections: u64,
}

/// What `backend_resize` did.
#[derive(Debug, Clone, Serialize)]
pub struct ResizeReport {
    /// The backend.
    pub name: String,
    /// Its size now, in bytes.
    pub size: u64,
    /// Its size before.
    pub previous: u64,
    /// Each controller using it, and how its frontend was told.
    pub controllers: Vec<ControllerTold>,
}

/// How a controller's frontend was told of a resize.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerTold {
    /// The controller.
    pub name: String,
    /// `acknowledged`, `sent` (no REPLY_ACK), `not connected`, `no backend request
    /// channel`, or `failed: why`.
    pub told: String,
}

/// What `vhost_blk_set_readonly` did.
#[derive(Debug, Clone, Serialize)]
pub struct ReadOnlyReport {
    /// The setting now.
    pub readonly: bool,
    /// The setting before.
    pub previous: bool,
    /// A frontend is connected.
    pub connected: bool,
    /// What it means for the connected driver and the next one.
    pub effect: String,
}

/// One controller's counters, for `stats` and the metrics endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerStats {
    /// Its name.
    pub name: String,
    /// A frontend is connected.
    pub connected: bool,
    /// Frontends accepted since the controller was created.
    pub connections: u64,
    /// I/O counters.
    #[serde(flatten)]
    pub io: StatsSnapshot,
}

/// One poller's load.
#[derive(Debug, Clone, Serialize)]
pub struct PollerStats {
    /// Thread name.
    pub name: String,
    /// CPU it is pinned to.
    pub cpu: Option<usize>,
    /// Queues it runs.
    pub queues: usize,
    /// Seconds spent in loops that found work.
    pub busy_seconds: f64,
    /// The longest its queues waited for control-plane commands, in milliseconds.
    pub longest_commands_ms: f64,
}

/// Everything `stats` reports.
#[derive(Debug, Clone, Serialize)]
pub struct TargetStats {
    /// The serving process (it changes with an upgrade or a restart).
    pub pid: u32,
    /// Per controller.
    pub controllers: Vec<ControllerStats>,
    /// Per poller.
    pub pollers: Vec<PollerStats>,
}

/// The control plane's state: pollers, backends, controllers.
pub struct Target {
    settings: TargetSettings,
    pollers: Vec<PinnedPoller>,
    backends: BTreeMap<String, BackendEntry>,
    controllers: BTreeMap<String, ControllerEntry>,
    nvme: NvmeControllers,
    /// NVMe attachments by name: the controller and the backends made of its namespaces.
    attachments: BTreeMap<String, (PciAddress, Vec<String>)>,
    /// Named RBD clusters: their configuration and connected client.
    rbd_clusters: BTreeMap<String, (RbdClusterConfig, Arc<RbdCluster>)>,
    /// Listeners an upgrade hands over besides the controllers'.
    rpc_listener: Option<std::os::fd::OwnedFd>,
    metrics_listener: Option<std::os::fd::OwnedFd>,
    /// Everything went to a successor process; this one only waits to exit.
    handed_over: bool,
    /// The fd store connections are kept in.
    store: Option<Arc<vfblk_vhost::fd_store::FdStore>>,
    /// Configured entries that could not be served.
    unserved: UnservedEntries,
    /// While [`Target::retry_unserved`] runs: the entries being tried, as they were.
    retrying: UnservedEntries,
    /// Deletions the config file has yet to see, and entries whose file version wins.
    file_edits: FileEdits,
}

impl Target {
    /// Starts the pollers; no backend or controller yet.
    pub fn new(settings: TargetSettings) -> Result<Self> {
        let mode = PollMode {
            idle_before_sleep: if settings.poll {
                None
            } else {
                Some(IDLE_BEFORE_SLEEP)
            },
        };
        let cpus: Vec<Option<usize>> = if settings.cpus.is_empty() {
            vec![None; settings.pollers.max(1)]
        } else {
            settings.cpus.iter().map(|&c| Some(c)).collect()
        };
        let pollers = cpus
            .into_iter()
            .enumerate()
            .map(|(i, cpu)| {
                Ok(PinnedPoller {
                    cpu,
                    poller: Arc::new(Poller::spawn(format!("vfblk-poller{i}"), cpu, mode)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let store = if settings.fd_store {
            Some(Arc::new(vfblk_vhost::fd_store::FdStore::from_env()?.ok_or_else(|| {
                Error::BadArgument(
                    "--fd-store: no NOTIFY_SOCKET (run under systemd with FileDescriptorStoreMax=, or under vfblk-keeper)".into(),
                )
            })?))
        } else {
            None
        };
        let mut nvme = NvmeControllers::default();
        if let Some(store) = &store {
            nvme.keep_in(store.clone());
        }
        Ok(Self {
            store,
            settings,
            pollers,
            backends: BTreeMap::new(),
            controllers: BTreeMap::new(),
            nvme,
            attachments: BTreeMap::new(),
            rbd_clusters: BTreeMap::new(),
            rpc_listener: None,
            metrics_listener: None,
            handed_over: false,
            unserved: UnservedEntries::default(),
            retrying: UnservedEntries::default(),
            file_edits: FileEdits::default(),
        })
    }

    fn nvme_io_queues(&self) -> u16 {
        match self.settings.nvme_io_queues {
            0 => NVME_IO_QUEUES,
            n => n,
        }
    }

    /// Attaches the NVMe controller at `address` under `name`: each of its namespaces
    /// becomes a backend `<name>n<nsid>`. Returns their names.
    pub fn attach_nvme(&mut self, name: &str, address: PciAddress) -> Result<Vec<String>> {
        check_name("NVMe controller", name)?;
        self.check_not_unserved(Section::Nvme, name)?;
        if self.attachments.contains_key(name) {
            return Err(Error::Exists {
                what: "NVMe controller",
                name: name.to_string(),
            });
        }
        if let Some((other, _)) = self.attachments.iter().find(|(_, (a, _))| *a == address) {
            return Err(Error::BadArgument(format!(
                "{address} is attached already, as {other}"
            )));
        }
        let io_queues = self.nvme_io_queues();
        let nsids: Vec<u32> = self
            .nvme
            .get_or_open(address, io_queues, &self.settings.nvme)?
            .controller()
            .namespaces()
            .iter()
            .map(|ns| ns.nsid)
            .collect();
        let mut made = Vec::new();
        for nsid in nsids {
            let backend = format!("{name}n{nsid}");
            let whole = BackendSpec::Nvme {
                address,
                nsid,
                offset: 0,
                size: None,
            };
            match self.create_backend(&backend, whole) {
                Ok(()) => {
                    if let Some(b) = self.backends.get_mut(&backend) {
                        b.attachment = Some(name.to_string());
                    }
                    made.push(backend);
                }
                Err(e) => {
                    // All or nothing: no half-attached controller.
                    for b in &made {
                        self.backends.remove(b);
                    }
                    self.nvme.close_unused();
                    return Err(e);
                }
            }
        }
        self.nvme.close_unused();
        tracing::info!("{address} attached as {name}: backends {}", made.join(", "));
        self.attachments
            .insert(name.to_string(), (address, made.clone()));
        Ok(made)
    }

    /// Detaches an NVMe controller; refused while a controller uses one of its namespaces.
    pub fn detach_nvme(&mut self, name: &str) -> Result<()> {
        if self.delete_unserved(Section::Nvme, name)? {
            return Ok(());
        }
        let (address, backends) =
            self.attachments
                .get(name)
                .cloned()
                .ok_or_else(|| Error::NotFound {
                    what: "NVMe controller",
                    name: name.to_string(),
                })?;
        for b in &backends {
            let users = self.users_of(b);
            if !users.is_empty() {
                return Err(Error::Busy {
                    name: b.clone(),
                    users,
                });
            }
        }
        for b in &backends {
            self.backends.remove(b);
        }
        self.attachments.remove(name);
        self.forget_in_file(Section::Nvme, name);
        self.nvme.close_unused();
        tracing::info!("{name} ({address}) detached");
        Ok(())
    }

    /// Opens a backend under `name`.
    pub fn create_backend(&mut self, name: &str, spec: BackendSpec) -> Result<()> {
        check_name("backend", name)?;
        self.check_not_unserved(Section::Backends, name)?;
        if let Some(path) = spec.path().filter(|p| p.is_relative()) {
            return Err(Error::BadArgument(format!(
                "backend {name}: {} is a relative path; the target takes absolute paths only (its working directory is not yours)",
                path.display()
            )));
        }
        // One image, one backend: the same file under another path or another kind would be
        // two caches of one disk.
        if let Some(identity) = spec.path().and_then(file_identity) {
            if let Some((other, _)) = self
                .backends
                .iter()
                .find(|(_, b)| b.identity == Some(identity))
            {
                return Err(Error::BadArgument(format!(
                    "backend {name}: {} is the file backend {other} serves already",
                    describe(&spec)
                )));
            }
        }
        if self.backends.contains_key(name) {
            return Err(Error::Exists {
                what: "backend",
                name: name.to_string(),
            });
        }
        let comparable = self.comparable(&spec);
        if let Some(same) = self
            .backends
            .iter()
            .find(|(_, b)| same_target(&self.comparable(&b.spec), &comparable))
        {
            return Err(Error::BadArgument(format!(
                "backend {name}: backend {} already serves the same {}",
                same.0,
                describe(&spec)
            )));
        }
        let io_queues = self.nvme_io_queues();
        let clusters = &self.rbd_clusters;
        let unserved = &self.unserved;
        let rbd_cluster = |cluster: &str| -> Result<Arc<RbdCluster>> {
            if let Some((_, c)) = clusters.get(cluster) {
                return Ok(c.clone());
            }
            Err(match unserved.error_of(Section::RbdClusters, cluster) {
                Some(error) => Error::BadArgument(format!(
                    "RBD cluster {cluster} is in the configuration but not served ({error})"
                )),
                None => Error::NotFound {
                    what: "RBD cluster",
                    name: cluster.to_string(),
                },
            })
        };
        #[allow(unused_mut)]
        let mut backend =
            spec.open(&mut self.nvme, io_queues, &self.settings.nvme, &rbd_cluster)?;
        if let Some(delay) = self.settings.test_delay {
            #[cfg(feature = "test-delay")]
            {
                backend = Arc::new(vfblk_bridge::backend::DelayBackend::new(backend, delay));
            }
            #[cfg(not(feature = "test-delay"))]
            return Err(Error::BadArgument(format!(
                "a test delay of {delay:?} needs a build with the test-delay feature"
            )));
        }
        tracing::info!("backend {name}: {}", backend.info().description);
        if matches!(spec, BackendSpec::Rbd { .. }) {
            self.record_rbd_clients();
        }
        let identity = spec.path().and_then(file_identity);
        self.backends.insert(
            name.to_string(),
            BackendEntry {
                spec,
                backend,
                attachment: None,
                identity,
            },
        );
        Ok(())
    }

    /// Registers a named RBD cluster: connects its client (threads bounded and pinned as
    /// configured), which the backends that name it share. A failure leaves nothing: the
    /// client is shut down and its threads joined.
    pub fn register_rbd_cluster(&mut self, config: RbdClusterConfig) -> Result<()> {
        let name = config.name.clone();
        check_name("RBD cluster", &name)?;
        self.check_not_unserved(Section::RbdClusters, &name)?;
        if self.rbd_clusters.contains_key(&name) {
            return Err(Error::Exists {
                what: "RBD cluster",
                name,
            });
        }
        for path in [&config.conf, &config.keyring].into_iter().flatten() {
            if path.is_relative() {
                return Err(Error::BadArgument(format!(
                    "RBD cluster {name}: {} is a relative path; the target takes absolute paths only (its working directory is not yours)",
                    path.display()
                )));
            }
        }
        let cluster = RbdCluster::register(&name, &config.options())?;
        self.rbd_clusters.insert(name, (config, cluster));
        self.record_rbd_clients();
        Ok(())
    }

    /// Unregisters a named RBD cluster (its client shut down); refused while a backend
    /// names it.
    pub fn unregister_rbd_cluster(&mut self, name: &str) -> Result<()> {
        if self.delete_unserved(Section::RbdClusters, name)? {
            return Ok(());
        }
        if !self.rbd_clusters.contains_key(name) {
            return Err(Error::NotFound {
                what: "RBD cluster",
                name: name.to_string(),
            });
        }
        self.check_rbd_cluster_unused(name)?;
        self.rbd_clusters.remove(name);
        self.forget_in_file(Section::RbdClusters, name);
        self.record_rbd_clients();
        tracing::info!("RBD cluster {name} unregistered");
        Ok(())
    }

    /// Refuses while a backend, served or not, names RBD cluster `name`.
    pub(crate) fn check_rbd_cluster_unused(&self, name: &str) -> Result<()> {
        let users = self.rbd_cluster_users(name);
        if users.is_empty() {
            return Ok(());
        }
        Err(Error::BadArgument(format!(
            "RBD cluster {name} is used by backend(s) {}: delete them first",
            users.join(", ")
        )))
    }

    /// Backends, served or not, that name RBD cluster `name`.
    fn rbd_cluster_users(&self, name: &str) -> Vec<String> {
        let names = |spec: &BackendSpec| matches!(spec, BackendSpec::Rbd { cluster: Some(c), .. } if c == name);
        let served = self
            .backends
            .iter()
            .filter(|(_, b)| names(&b.spec))
            .map(|(n, _)| n.clone());
        let unserved = self
            .unserved
            .backends()
            .filter(|u| names(&u.entry.spec))
            .map(|u| u.entry.name.clone());
        served.chain(unserved).collect()
    }

    /// The named RBD clusters, served or not.
    pub fn rbd_cluster_list(&self) -> Vec<RbdClusterStatus> {
        let served = self
            .rbd_clusters
            .iter()
            .map(|(name, (config, c))| RbdClusterStatus {
                config: config.clone(),
                state: EntryState::Serving,
                error: None,
                fsid: Some(c.client().fsid.clone()),
                client_address: Some(c.client().address.clone()),
                threads: Some(c.threads()),
                used_by: self.rbd_cluster_users(name),
            });
        let unserved = self.unserved.rbd_clusters().map(|u| RbdClusterStatus {
            config: u.entry.clone(),
            state: EntryState::Failed,
            error: Some(u.error.clone()),
            fsid: None,
            client_address: None,
            threads: None,
            used_by: self.rbd_cluster_users(&u.entry.name),
        });
        served.chain(unserved).collect()
    }

    /// A spec as [`same_target`] compares it: an RBD image that names a cluster with the
    /// cluster's conf file.
    fn comparable(&self, spec: &BackendSpec) -> BackendSpec {
        let mut spec = spec.clone();
        if let BackendSpec::Rbd {
            cluster: Some(name),
            conf,
            ..
        } = &mut spec
        {
            let named = self
                .rbd_clusters
                .get(name.as_str())
                .map(|(c, _)| &c.conf)
                .or(self
                    .unserved
                    .rbd_clusters()
                    .find(|u| u.entry.name == *name)
                    .map(|u| &u.entry.conf));
            if let Some(c) = named {
                *conf = c.clone();
            }
        }
        spec
    }

    /// Closes backend `name`; refused while a controller uses it.
    pub fn delete_backend(&mut self, name: &str) -> Result<()> {
        if self.delete_unserved(Section::Backends, name)? {
            return Ok(());
        }
        if !self.backends.contains_key(name) {
            return Err(Error::NotFound {
                what: "backend",
                name: name.to_string(),
            });
        }
        let users = self.users_of(name);
        if !users.is_empty() {
            return Err(Error::Busy {
                name: name.to_string(),
                users,
            });
        }
        if let Some(owner) = self.backends.get(name).and_then(|b| b.attachment.clone()) {
            return Err(Error::BadArgument(format!(
                "backend {name} is a namespace of NVMe controller {owner}: nvme_detach it"
            )));
        }
        self.backends.remove(name);
        self.forget_in_file(Section::Backends, name);
        self.nvme.close_unused();
        tracing::info!("backend {name} deleted");
        Ok(())
    }

    /// Controllers that use `backend`, served or not.
    fn users_of(&self, backend: &str) -> Vec<String> {
        let served = self.controllers.values().map(|c| &c.config);
        let unserved = self.unserved.controllers().map(|u| &u.entry);
        served
            .chain(unserved)
            .filter(|c| c.backend == backend)
            .map(|c| c.name.clone())
            .collect()
    }

    /// Creates a controller and starts listening on its socket.
    pub fn create_controller(&mut self, config: ControllerConfig) -> Result<()> {
        let (device, device_config) = self.controller_device(&config)?;
        if let Some(e) = device.image_conflict() {
            // Not refused: a migration's destination is created while the source still
            // serves the image (QEMU's `-incoming` waits the same way); its queues take the
            // lock when the frontend starts them.
            tracing::warn!(
                controller = %config.name,
                "controller {}: {e}; its queues will be refused until that user lets go",
                config.name
            );
        }
        let server = SocketServer::start(&config.socket, device_config)?;
        let server = self.give_socket_access(&config, server)?;
        self.add_controller(config, device, server);
        Ok(())
    }

    /// Gives a new socket the owner, group and mode configured for it; a socket that cannot
    /// have them is closed and removed (nothing half-made).
    fn give_socket_access(
        &self,
        config: &ControllerConfig,
        server: SocketServer,
    ) -> Result<SocketServer> {
        let access = config.socket_access().or(&self.settings.socket_access);
        match access.apply(&config.socket) {
            Ok(()) => Ok(server),
            Err(e) => {
                server.stop(false);
                Err(e)
            }
        }
    }

    /// Checks a controller's configuration against what exists and builds its device.
    fn controller_device(
        &self,
        config: &ControllerConfig,
    ) -> Result<(Arc<BlkDevice>, Arc<DeviceConfig>)> {
        let name = config.name.clone();
        check_name("controller", &name)?;
        if self.controllers.contains_key(&name) {
            return Err(Error::Exists {
                what: "controller",
                name,
            });
        }
        self.check_not_unserved(Section::Controllers, &name)?;
        let bad = |why: String| Error::BadArgument(format!("controller {name}: {why}"));
        if config.queues == 0 || config.queues > MAX_QUEUES {
            return Err(bad(format!(
                "{} queues: 1 to {} are possible",
                config.queues, MAX_QUEUES
            )));
        }
        let serial = config.serial.clone().unwrap_or_else(|| name.clone());
        if serial.len() > vfblk_bridge::virtio_blk::ID_BYTES {
            return Err(bad(format!("serial {serial:?} is longer than 20 bytes")));
        }
        let served = self.controllers.values().map(|c| &c.config);
        let unserved = self.unserved.controllers().map(|u| &u.entry);
        if let Some(other) = served.chain(unserved).find(|c| c.socket == config.socket) {
            return Err(bad(format!(
                "{} is the socket of controller {}",
                config.socket.display(),
                other.name
            )));
        }
        if config.socket.is_relative() {
            return Err(bad(format!(
                "{} is a relative path; the target takes absolute paths only (its working directory is not yours)",
                config.socket.display()
            )));
        }
        check_socket_path(&config.socket).map_err(bad)?;
        // Checked before anything is made: an unknown user is refused, not half-applied.
        config
            .socket_access()
            .or(&self.settings.socket_access)
            .resolve()
            .map_err(|e| bad(e.to_string()))?;
        let entry = self
            .backends
            .get(&config.backend)
            .ok_or_else(|| Error::NotFound {
                what: "backend",
                name: config.backend.clone(),
            })?;
        if entry.backend.serves_one_frontend() {
            let served = self.controllers.values().map(|c| &c.config);
            let unserved = self.unserved.controllers().map(|u| &u.entry);
            let users: Vec<&str> = served
                .chain(unserved)
                .filter(|c| c.backend == config.backend)
                .map(|c| c.name.as_str())
                .collect();
            check_one_frontend(&config.backend, &users).map_err(bad)?;
        }
        let pollers = self.pollers_for(&config.cpus).map_err(bad)?;
        let mut device = BlkDevice::new(entry.backend.clone(), config.queues, &serial);
        if config.readonly {
            device = device.read_only();
        }
        if config.limits.iops == Some(0) || config.limits.bytes_per_second == Some(0) {
            return Err(bad(
                "a limit of 0 would stop the disk; leave it out for none".into(),
            ));
        }
        device = device.rate_limited(config.limits);
        let device = Arc::new(device);
        let device_config = Arc::new(DeviceConfig {
            num_queues: config.queues,
            inflight: self.settings.inflight,
            device: device.clone(),
            pollers,
            errors: Arc::new(GuestErrors::new(name.clone())),
            fd_store: self
                .store
                .as_ref()
                .map(|store| vfblk_vhost::fd_store::DeviceStore {
                    store: store.clone(),
                    name: name.clone(),
                }),
            dirty_log_marks: !(cfg!(feature = "test-delay") && self.settings.test_skip_dirty_log),
        });
        Ok((device, device_config))
    }

    /// Records a controller whose server runs.
    fn add_controller(
        &mut self,
        config: ControllerConfig,
        device: Arc<BlkDevice>,
        server: SocketServer,
    ) {
        let name = config.name.clone();
        let description = self
            .backends
            .get(&config.backend)
            .map(|b| b.backend.info().description.clone())
            .unwrap_or_default();
        tracing::info!(
            controller = %name,
            "serving {description} on {} ({} queue(s), {} poller(s), inflight tracking {}{})",
            config.socket.display(),
            config.queues,
            self.pollers.len(),
            if self.settings.inflight { "on" } else { "OFF" },
            if config.readonly { ", read-only" } else { "" }
        );
        self.controllers.insert(
            name,
            ControllerEntry {
                config,
                device,
                server,
            },
        );
    }

    /// The pollers a controller asking for `cpus` may use.
    /// One line for the service manager's `STATUS=`: what is served and what is not.
    pub fn status_line(&self) -> String {
        let mut line = format!(
            "serving {} controller(s) on {} backend(s) with {} poller(s)",
            self.controllers.len(),
            self.backends.len(),
            self.pollers.len()
        );
        if !self.unserved.is_empty() {
            line.push_str(&format!(
                "; {} configured entr{} failed (vfblk-rpc vhost-blk-list)",
                self.unserved.len(),
                if self.unserved.len() == 1 { "y" } else { "ies" }
            ));
        }
        line
    }

    /// Keeps the Ceph clients this process connects in the fd store (a memfd named
    /// [`RBD_CLIENTS`]), so that a successor started after a crash knows which image locks
    /// are its dead predecessor's to break.
    fn record_rbd_clients(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let clients = vfblk_bridge::backend::rbd::clients_in_use();
        let recorded = (|| -> Result<()> {
            let text =
                serde_json::to_vec(&clients).map_err(|e| Error::BadArgument(e.to_string()))?;
            let file = vfblk_vhost::memory::memfd("vfblk-rbd-clients", text.len() as u64).map_err(
                |source| Error::Io {
                    what: "a memfd for the RBD clients record".into(),
                    source,
                },
            )?;
            use std::os::unix::fs::FileExt;
            file.write_all_at(&text, 0).map_err(|source| Error::Io {
                what: "writing the RBD clients record".into(),
                source,
            })?;
            store.remove(RBD_CLIENTS)?;
            store.store(RBD_CLIENTS, &file)?;
            Ok(())
        })();
        if let Err(e) = recorded {
            tracing::warn!(
                "fd store: {}; after a crash the successor waits out the image locks",
                vfblk_vhost::error_chain(&e)
            );
        }
    }

    /// Every poller of the process (fixed for its life).
    pub fn pollers(&self) -> Vec<Arc<Poller>> {
        self.pollers.iter().map(|p| p.poller.clone()).collect()
    }

    fn pollers_for(&self, cpus: &[usize]) -> std::result::Result<Vec<Arc<Poller>>, String> {
        if cpus.is_empty() {
            return Ok(self.pollers.iter().map(|p| p.poller.clone()).collect());
        }
        let chosen: Vec<Arc<Poller>> = self
            .pollers
            .iter()
            .filter(|p| p.cpu.is_some_and(|c| cpus.contains(&c)))
            .map(|p| p.poller.clone())
            .collect();
        if chosen.len() != cpus.len() {
            let pinned: Vec<usize> = self.pollers.iter().filter_map(|p| p.cpu).collect();
            return Err(format!(
                "cpus {cpus:?}: the pollers run on cpus {pinned:?} (start the target with --cpus)"
            ));
        }
        Ok(chosen)
    }

    /// Deletes a controller: what is in flight completes, the frontend is disconnected and
    /// the socket removed.
    pub fn delete_controller(&mut self, name: &str) -> Result<()> {
        if self.delete_unserved(Section::Controllers, name)? {
            return Ok(());
        }
        let entry = self
            .controllers
            .remove(name)
            .ok_or_else(|| Error::NotFound {
                what: "controller",
                name: name.to_string(),
            })?;
        self.forget_in_file(Section::Controllers, name);
        let started = std::time::Instant::now();
        entry.server.stop(true);
        tracing::info!(
            "controller {name} deleted in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// The served controller `name`, or NotFound.
    fn served_controller_mut(&mut self, name: &str) -> Result<&mut ControllerEntry> {
        self.controllers
            .get_mut(name)
            .ok_or_else(|| Error::NotFound {
                what: "controller",
                name: name.to_string(),
            })
    }

    /// Changes a serving controller's IOPS and bandwidth limits (`None` fields: unlimited)
    /// with no reconnect: each queue takes its share at its next round. Returns the limits
    /// it had.
    pub fn set_controller_limits(
        &mut self,
        name: &str,
        limits: vfblk_bridge::limits::RateLimits,
    ) -> Result<vfblk_bridge::limits::RateLimits> {
        if limits.iops == Some(0) || limits.bytes_per_second == Some(0) {
            return Err(Error::BadArgument(format!(
                "controller {name}: a limit of 0 would stop the disk; leave it out for none"
            )));
        }
        let entry = self.served_controller_mut(name)?;
        let old = entry.device.rate_limits();
        entry.device.set_rate_limits(limits);
        entry.config.limits = limits;
        tracing::info!(controller = %name, "limits of {name} now {limits:?} (were {old:?})");
        Ok(old)
    }

    /// Grows backend `name` to `size` bytes while it serves: the backend grows (a failure
    /// leaves it and its file as they were), every controller using it takes the new
    /// capacity, and each connected frontend that gave a backend request channel is told
    /// (BACKEND_CONFIG_CHANGE_MSG, all at once, each within its deadline). The size goes into
    /// the backend's spec, so the config file and a successor open it at the new size. A
    /// frontend that could not be told is reported (and logged), not an error: the disk has
    /// grown, and that frontend sees it when it reads the config space again (its next
    /// connection).
    pub fn resize_backend(&mut self, name: &str, size: u64) -> Result<ResizeReport> {
        if let Some(error) = self.unserved.error_of(Section::Backends, name) {
            return Err(Error::BadArgument(format!(
                "backend {name} is in the configuration but not served ({error})"
            )));
        }
        let entry = self.backends.get_mut(name).ok_or_else(|| Error::NotFound {
            what: "backend",
            name: name.to_string(),
        })?;
        let previous = entry.backend.capacity_sectors() * 512;
        let new_spec = match &entry.spec {
            BackendSpec::Mem {
                readonly: true,
                path,
                ..
            }
            | BackendSpec::File {
                readonly: true,
                path,
                ..
            } => {
                return Err(Error::BadArgument(format!(
                    "backend {name}: {} is opened read-only; a read-only image is not resized",
                    path.display()
                )))
            }
            BackendSpec::Mem { path, .. } => BackendSpec::Mem {
                path: path.clone(),
                size: Some(size),
                readonly: false,
            },
            BackendSpec::File { path, .. } => BackendSpec::File {
                path: path.clone(),
                size: Some(size),
                readonly: false,
            },
            BackendSpec::Null { .. } => BackendSpec::Null { size },
            BackendSpec::Nvme { .. } => {
                return Err(Error::BadArgument(format!(
                    "backend {name}: an NVMe namespace (or a part of one) is not resized by the target: its size is the controller's (namespace management is not supported)"
                )))
            }
            BackendSpec::Rbd { readonly: true, .. } => {
                return Err(Error::BadArgument(format!(
                    "backend {name}: {} is opened read-only; a read-only image is not resized",
                    describe(&entry.spec)
                )))
            }
            // A spec that names a size (the image's at open) names the new one; without one
            // the image is opened at whatever size it has.
            BackendSpec::Rbd { .. } => {
                let mut spec = entry.spec.clone();
                if let BackendSpec::Rbd { size: Some(s), .. } = &mut spec {
                    *s = size;
                }
                spec
            }
        };
        entry.backend.grow(size).map_err(|e| Error::Context {
            what: format!("backend {name}: resize to {size} bytes"),
            source: Box::new(e),
        })?;
        if size == previous {
            return Ok(ResizeReport {
                name: name.to_string(),
                size,
                previous,
                controllers: Vec::new(),
            });
        }
        entry.spec = new_spec;
        tracing::info!(backend = %name, "backend {name} grown from {previous} to {size} bytes");
        let users: Vec<(&String, &ControllerEntry)> = self
            .controllers
            .iter()
            .filter(|(_, c)| c.config.backend == name)
            .collect();
        for (_, c) in &users {
            c.device.capacity_changed();
        }
        let controllers = std::thread::scope(|scope| {
            let telling: Vec<_> = users
                .iter()
                .map(|(controller, c)| {
                    (
                        controller.to_string(),
                        scope.spawn(move || c.server.config_changed()),
                    )
                })
                .collect();
            telling
                .into_iter()
                .map(|(controller, told)| {
                    let told = told.join().unwrap_or(ConfigChangeTold::Failed(
                        vfblk_vhost::backend_channel::ChannelError::Closed,
                    ));
                    let told = match told {
                        ConfigChangeTold::NotConnected => "not connected".to_string(),
                        ConfigChangeTold::NoChannel => {
                            tracing::warn!(
                                controller = %controller,
                                "{controller}: its frontend gave no backend request channel (no BACKEND_REQ): it sees the new size only when it reads the config space again"
                            );
                            "no backend request channel".to_string()
                        }
                        ConfigChangeTold::Delivered(Delivered::Acknowledged) => {
                            "acknowledged".to_string()
                        }
                        ConfigChangeTold::Delivered(Delivered::Sent) => "sent".to_string(),
                        ConfigChangeTold::Failed(e) => {
                            tracing::warn!(
                                controller = %controller,
                                "{controller}: telling the frontend of the new size failed: {e}"
                            );
                            format!("failed: {e}")
                        }
                    };
                    ControllerTold {
                        name: controller,
                        told,
                    }
                })
                .collect()
        });
        Ok(ResizeReport {
            name: name.to_string(),
            size,
            previous,
            controllers,
        })
    }

    /// Makes a serving controller read-only or writable while it serves. From its queues'
    /// next request on, writes, discards and write zeroes fail with IOERR (or are served
    /// again). A connected driver is not told: virtio-blk has read-only only as a feature bit
    /// (VIRTIO_BLK_F_RO) negotiated once when the driver starts, no config field, and no way
    /// to add a feature to a running driver; frontends that connect from now on are offered
    /// it. Saved like every change.
    pub fn set_controller_readonly(
        &mut self,
        name: &str,
        readonly: bool,
    ) -> Result<ReadOnlyReport> {
        if let Some(error) = self.unserved.error_of(Section::Controllers, name) {
            return Err(Error::BadArgument(format!(
                "controller {name} is in the configuration but not served ({error})"
            )));
        }
        let entry = self.served_controller_mut(name)?;
        let previous = entry.device.is_read_only();
        entry
            .device
            .set_read_only(readonly)
            .map_err(|e| Error::BadArgument(format!("controller {name}: {e}")))?;
        entry.config.readonly = readonly;
        let connected = entry.server.stats().connected;
        let effect = match (readonly, connected) {
            (true, true) => "writes, discards and write zeroes now fail with an I/O error; the connected driver was not told the disk is read-only (VIRTIO_BLK_F_RO is negotiated once, when it starts): it is offered from the next connection on",
            (true, false) => "read-only: the next frontend is offered VIRTIO_BLK_F_RO, and writes fail with an I/O error",
            (false, true) => "writable again: writes are served; a driver that negotiated VIRTIO_BLK_F_RO keeps treating the disk as read-only until it reconnects",
            (false, false) => "writable: the next frontend is offered a writable disk",
        };
        tracing::info!(controller = %name, "controller {name}: {effect}");
        Ok(ReadOnlyReport {
            readonly,
            previous,
            connected,
            effect: effect.to_string(),
        })
    }

    /// The configuration as the config file holds it: what is served and what is kept
    /// unserved.
    pub fn config(&self) -> TargetConfig {
        let mut config = self.served_config();
        let unserved = self.unserved.config();
        config.nvme.extend(unserved.nvme);
        config.rbd_clusters.extend(unserved.rbd_clusters);
        config.backends.extend(unserved.backends);
        config.controllers.extend(unserved.controllers);
        config
    }

    /// What is being served, as a config file holds it.
    pub fn served_config(&self) -> TargetConfig {
        TargetConfig {
            nvme: self
                .attachments
                .iter()
                .map(|(name, (address, _))| NvmeAttachConfig {
                    name: name.clone(),
                    address: *address,
                })
                .collect(),
            rbd_clusters: self.rbd_clusters.values().map(|(c, _)| c.clone()).collect(),
            backends: self
                .backends
                .iter()
                .filter(|(_, b)| b.attachment.is_none())
                .map(|(name, b)| BackendConfig {
                    name: name.clone(),
                    spec: b.spec.clone(),
                })
                .collect(),
            controllers: self
                .controllers
                .values()
                .map(|c| c.config.clone())
                .collect(),
        }
    }

    /// The config file, if the target has one.
    pub fn config_file(&self) -> Option<&Path> {
        self.settings.config_file.as_deref()
    }

    /// Writes the configuration into the config file (a no-op without one), changing only
    /// what changed (see [`TargetConfig::save_into`]).
    pub fn save(&mut self) -> Result<()> {
        let Some(path) = &self.settings.config_file else {
            // No file to tell: the deletions need not be remembered.
            self.file_edits.removed.clear();
            return Ok(());
        };
        let started = std::time::Instant::now();
        if self.config().save_into(path, &self.file_edits)? {
            let took = started.elapsed();
            // The fsyncs wait for the disk's journal: a slow RPC is told why.
            if took > std::time::Duration::from_secs(1) {
                tracing::warn!("{} written in {took:.1?} (fsync)", path.display());
            } else {
                tracing::debug!("{} written in {took:.1?}", path.display());
            }
        }
        self.file_edits.removed.clear();
        Ok(())
    }

    /// The backends.
    pub fn backend_list(&self) -> Vec<BackendStatus> {
        let served = self.backends.iter().map(|(name, b)| {
            let info = b.backend.info();
            BackendStatus {
                name: name.clone(),
                spec: b.spec.clone(),
                state: EntryState::Serving,
                error: None,
                description: info.description.clone(),
                capacity_bytes: b.backend.capacity_sectors() * 512,
                block_size: info.block_size,
                used_by: self.users_of(name),
                nvme: b.attachment.clone(),
            }
        });
        let unserved = self.unserved.backends().map(|u| BackendStatus {
            name: u.entry.name.clone(),
            spec: u.entry.spec.clone(),
            state: EntryState::Failed,
            error: Some(u.error.clone()),
            description: describe(&u.entry.spec),
            capacity_bytes: 0,
            block_size: 0,
            used_by: self.users_of(&u.entry.name),
            nvme: None,
        });
        served.chain(unserved).collect()
    }

    /// The controllers.
    pub fn controller_list(&self) -> Vec<ControllerStatus> {
        self.controllers
            .values()
            .map(|c| {
                let s = c.server.stats();
                ControllerStatus {
                    config: c.config.clone(),
                    state: EntryState::Serving,
                    error: None,
                    connected: s.connected,
                    connections: s.accepted,
                }
            })
            .chain(self.unserved.controllers().map(|u| ControllerStatus {
                config: u.entry.clone(),
                state: EntryState::Failed,
                error: Some(u.error.clone()),
                connected: false,
                connections: 0,
            }))
            .collect()
    }

    /// Counters of every controller and poller.
    pub fn stats(&self) -> TargetStats {
        TargetStats {
            pid: std::process::id(),
            controllers: self
                .controllers
                .values()
                .map(|c| {
                    let s = c.server.stats();
                    let io = c.device.stats().snapshot();
                    ControllerStats {
                        name: c.config.name.clone(),
                        connected: s.connected,
                        connections: s.accepted,
                        io,
                    }
                })
                .collect(),
            pollers: self
                .pollers
                .iter()
                .map(|p| PollerStats {
                    name: p.poller.name().to_string(),
                    cpu: p.cpu,
                    queues: p.poller.load(),
                    busy_seconds: p.poller.busy().as_secs_f64(),
                    longest_commands_ms: p.poller.longest_commands().as_secs_f64() * 1e3,
                })
                .collect(),
        }
    }

    /// Stops every controller (draining what is in flight when `drain`).
    pub fn shutdown(&mut self, drain: bool) {
        for (_, c) in std::mem::take(&mut self.controllers) {
            c.server.stop(drain);
        }
    }
}

/// Two specs that open the same storage (a second opener would corrupt it or fail late).
fn same_target(a: &BackendSpec, b: &BackendSpec) -> bool {
    match (a, b) {
        (BackendSpec::Mem { path: x, .. }, BackendSpec::Mem { path: y, .. })
        | (BackendSpec::File { path: x, .. }, BackendSpec::File { path: y, .. }) => x == y,
        (
            BackendSpec::Nvme {
                address: x,
                nsid: m,
                offset: o1,
                size: s1,
            },
            BackendSpec::Nvme {
                address: y,
                nsid: n,
                offset: o2,
                size: s2,
            },
        ) => {
            // Parts of one namespace may sit side by side, never overlap.
            let end = |o: &u64, s: &Option<u64>| s.map_or(u64::MAX, |s| o.saturating_add(s));
            x == y && m == n && o1 < &end(o2, s2) && o2 < &end(o1, s1)
        }
        // One image of one cluster (the conf names the cluster; a client id differs only
        // in who asks).
        (
            BackendSpec::Rbd {
                pool: p1,
                image: i1,
                conf: c1,
                ..
            },
            BackendSpec::Rbd {
                pool: p2,
                image: i2,
                conf: c2,
                ..
            },
        ) => p1 == p2 && i1 == i2 && c1 == c2,
        _ => false,
    }
}

/// A file's (device, inode), following symlinks; None if it cannot be read.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn describe(spec: &BackendSpec) -> String {
    match spec {
        BackendSpec::Mem { path, .. } | BackendSpec::File { path, .. } => {
            path.display().to_string()
        }
        BackendSpec::Null { size } => format!("null disk of {size} bytes"),
        BackendSpec::Nvme {
            address,
            nsid,
            offset,
            size,
        } => match size {
            Some(size) => format!("bytes {offset}+{size} of namespace {nsid} of {address}"),
            None if *offset > 0 => format!("bytes {offset}.. of namespace {nsid} of {address}"),
            None => format!("namespace {nsid} of {address}"),
        },
        BackendSpec::Rbd {
            pool,
            image,
            cluster,
            conf,
            ..
        } => match (cluster, conf) {
            (Some(cluster), _) => format!("RBD image {pool}/{image} of cluster {cluster}"),
            (None, Some(conf)) => format!("RBD image {pool}/{image} of {}", conf.display()),
            (None, None) => format!("RBD image {pool}/{image}"),
        },
    }
}

/// A controller's socket path must be free or a stale socket: binding replaces what is
/// there, and an RPC must never remove a file that is not a socket.
fn check_socket_path(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str().len() >= 108 {
        return Err(format!(
            "{}: longer than a unix socket path may be (107 bytes)",
            path.display()
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; it is left alone",
                path.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            Err(format!("directory {} does not exist", dir.display()))
        }
        _ => Ok(()),
    }
}

/// What to serve and how, for the one-controller command line.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// The vhost-user socket to listen on.
    pub socket: PathBuf,
    /// The backend.
    pub backend: BackendSpec,
    /// Virtqueues offered.
    pub queues: u16,
    /// GET_ID answer.
    pub serial: String,
    /// Offer the disk read-only.
    pub readonly: bool,
}

impl TargetOptions {
    /// The configuration of one backend ("disk") and one controller ("vhost0"), with
    /// relative paths taken as the command line's: from the working directory.
    pub fn config(&self) -> Result<TargetConfig> {
        let absolute = |e: std::io::Error| Error::Io {
            what: "making a path absolute".into(),
            source: e,
        };
        Ok(TargetConfig {
            nvme: Vec::new(),
            rbd_clusters: Vec::new(),
            backends: vec![BackendConfig {
                name: "disk".into(),
                spec: self
                    .backend
                    .clone()
                    .with_absolute_path()
                    .map_err(absolute)?,
            }],
            controllers: vec![ControllerConfig {
                name: "vhost0".into(),
                socket: std::path::absolute(&self.socket).map_err(absolute)?,
                backend: "disk".into(),
                queues: self.queues,
                cpus: Vec::new(),
                readonly: self.readonly,
                serial: Some(self.serial.clone()),
                limits: Default::default(),
                socket_owner: None,
                socket_group: None,
                socket_mode: None,
            }],
        })
    }
}

/// Writes this process's pid into `path` (atomically: a temporary file renamed over it),
/// for a supervisor that follows the target by its pid file.
pub fn write_pid_file(path: &Path) -> Result<()> {
    let io = |what: String| move |source| Error::Io { what, source };
    let temp = path.with_extension("pid-new");
    std::fs::write(&temp, format!("{}\n", std::process::id()))
        .map_err(io(format!("writing {}", temp.display())))?;
    std::fs::rename(&temp, path).map_err(io(format!(
        "renaming {} to {}",
        temp.display(),
        path.display()
    )))
}

/// Removes the pid file at `path` if it still names this process (after a hand-over it
/// names the successor, and stays).
pub fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// The fd store's name for the record of this process's Ceph clients.
pub const RBD_CLIENTS: &str = "rbd.clients";

/// After a crash: the Ceph clients the dead predecessor recorded, whose image locks may be
/// broken at once.
pub fn dead_predecessor_rbd_clients(stored: &mut vfblk_vhost::fd_store::StoredFds) {
    let Some(fd) = stored.take(RBD_CLIENTS) else {
        return;
    };
    let mut text = Vec::new();
    // From the start, wherever an earlier reader left the shared file offset.
    let mut file = std::fs::File::from(fd);
    let read = std::io::Seek::rewind(&mut file)
        .and_then(|()| std::io::Read::read_to_end(&mut file, &mut text));
    match read.map_err(|e| e.to_string()).and_then(|_| {
        serde_json::from_slice::<Vec<vfblk_bridge::backend::rbd::ClientIdentity>>(&text)
            .map_err(|e| e.to_string())
    }) {
        Ok(clients) => {
            tracing::info!(
                "the dead predecessor's Ceph clients: {}",
                clients
                    .iter()
                    .map(|c| c.address.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            vfblk_bridge::backend::rbd::predecessor_is_dead(clients);
        }
        Err(e) => tracing::warn!("the RBD clients record in the fd store: {e}"),
    }
}

/// Tells systemd (Type=notify) that the target serves: `MAINPID=` and `READY=1` on
/// `$NOTIFY_SOCKET`, if set. MAINPID: after an upgrade by hand-over the serving process is
/// the old one's child.
pub fn notify_ready() {
    notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
}

/// Sends `message` to systemd (or vfblk-keeper) at `$NOTIFY_SOCKET`, if set.
pub fn notify(message: &str) {
    // In a test build (feature `test-delay`), `VFBLK_TEST_HANDOVER_FAULT=lost-mainpid` drops
    // every MAINPID= (a datagram lost): the keeper must still follow an upgrade.
    #[cfg(feature = "test-delay")]
    if std::env::var("VFBLK_TEST_HANDOVER_FAULT").as_deref() == Ok("lost-mainpid")
        && message.contains("MAINPID=")
    {
        let rest: Vec<&str> = message
            .lines()
            .filter(|l| !l.starts_with("MAINPID="))
            .collect();
        if !rest.is_empty() {
            notify(&rest.join("\n"));
        }
        return;
    }
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(Path::new(&path))?,
        };
        UnixDatagram::unbound()?.send_to_addr(message.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!("could not notify the service manager: {e}");
    }
}

/// Log output a binary chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(Error::BadArgument(format!(
                "log format {s:?}: text or json"
            ))),
        }
    }
}

/// Sends `tracing` events to stderr in `format`; `RUST_LOG` filters (default: info).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| "info".to_string());
    use std::io::IsTerminal;
    // Colour only for a person at a terminal: logs go to files and journals too. The filter
    // can be changed at run time (`log_set_level`): the reload handle's type depends on the
    // format, so each format keeps its own behind one setter.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder
                .with_env_filter(EnvFilter::new(&spec))
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map(|()| {
                Box::new(move |f: EnvFilter| handle.reload(f).map_err(|e| e.to_string()))
                    as LogFilterSetter
            })
        }};
    }
    let installed = match format {
        LogFormat::Text => install!(tracing_subscriber::fmt()),
        LogFormat::Json => install!(tracing_subscriber::fmt().json()),
    };
    if let Ok(setter) = installed {
        let _ = LOG_FILTER.set(LogFilter {
            setter,
            current: Mutex::new(spec),
        });
    }
}

type LogFilterSetter =
    Box<dyn Fn(tracing_subscriber::EnvFilter) -> std::result::Result<(), String> + Send + Sync>;

/// The process's log filter, changeable at run time.
struct LogFilter {
    setter: LogFilterSetter,
    current: Mutex<String>,
}

static LOG_FILTER: std::sync::OnceLock<LogFilter> = std::sync::OnceLock::new();

/// The log filter in effect (`RUST_LOG` syntax), if [`init_logging`] installed the logger.
pub fn log_filter() -> Option<String> {
    LOG_FILTER
        .get()
        .map(|f| f.current.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Replaces the log filter (`RUST_LOG` syntax: `debug`, `info,vfblk_vhost=trace`, ...).
pub fn set_log_filter(spec: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(spec)
        .map_err(|e| Error::BadArgument(format!("log filter {spec:?}: {e}")))?;
    let installed = LOG_FILTER.get().ok_or_else(|| {
        Error::BadArgument("this process's logger cannot change its filter".into())
    })?;
    (installed.setter)(filter)
        .map_err(|e| Error::BadArgument(format!("log filter {spec:?}: {e}")))?;
    *installed.current.lock().unwrap_or_else(|e| e.into_inner()) = spec.to_string();
    tracing::info!("log filter now {spec:?}");
    Ok(())
}

/// A backend that serves one frontend only (an NVMe namespace: its DMA mappings are one
/// frontend's guest memory) refuses a second controller.
fn check_one_frontend(backend: &str, users: &[&str]) -> std::result::Result<(), String> {
    match users.first() {
        None => Ok(()),
        Some(other) => Err(format!(
            "backend {backend} is served by controller {other}, and an NVMe backend serves one frontend (its DMA maps one guest's memory); give each VM its own backend, a part of the namespace (offset and size) or another namespace"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_for_one_frontend_refuses_a_second_controller() {
        assert!(check_one_frontend("nvme0n1", &[]).is_ok());
        let e = check_one_frontend("nvme0n1", &["vm1"]).unwrap_err();
        assert!(
            e.contains("controller vm1") && e.contains("one frontend"),
            "{e}"
        );
    }

    #[test]
    fn parts_of_a_namespace_sit_side_by_side_and_never_overlap() {
        let part = |nsid, offset, size| BackendSpec::Nvme {
            address: "0000:00:04.0".parse().unwrap(),
            nsid,
            offset,
            size,
        };
        const G: u64 = 1 << 30;
        assert!(!same_target(&part(1, 0, Some(G)), &part(1, G, Some(G))));
        assert!(same_target(
            &part(1, 0, Some(G)),
            &part(1, G - 512, Some(G))
        ));
        assert!(same_target(&part(1, G, None), &part(1, 5 * G, Some(512))));
        assert!(same_target(&part(1, 0, None), &part(1, 0, None)));
        assert!(!same_target(&part(1, 0, None), &part(2, 0, None)));
    }
}
