//! The benchmark suite: vhost-user-blk backends side by side (ours, qemu-storage-daemon,
//! and SPDK's vhost target and cloud-hypervisor's `vhost_user_block` when their binaries are
//! given), each alone on CPU 1, driven from CPU 0 by two clients (our load generator and
//! libblkio), over a set of workloads; written as JSON, a markdown table and plots.
//!
//! Like with like: every backend gets the same socket, queue count, ring size and a disk of
//! the same size; `null` kinds move no data, `ram` kinds keep it in memory, `file` kinds go
//! through the kernel to a file on /dev/shm, `rbd` kinds go through librbd to a private
//! single-node Ceph cluster (one mon, one OSD) that the suite starts for them, after every
//! other backend has been measured, and stops again: its daemons share the machine's cores
//! and are never running while the other kinds are measured. The `rbd` kinds run only when
//! named (`--backends vfblk-rbd,qsd-rbd`), and then by default only the QD1 and QD32 4 KiB
//! random reads and writes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vfblk_lab::process::{spawn_listening, LISTEN_TIMEOUT};

use crate::system::suite_results::{
    pauses_ms, Backend, Client, Measurement, RestartRun, SuiteResult, Workload, RBD_WORKLOADS,
    WORKLOADS,
};
use crate::system::{cpu_seconds, plot, thousands, tool_runs, without_cdf};
use crate::{io_error, Error, Result};

/// Disk size every backend serves.
const DISK_MIB: u64 = 256;
/// Ring entries per virtqueue (QD128 needs 3 descriptors per request).
pub(crate) const QUEUE_SIZE: u16 = 512;
/// The backend's core and the client's.
pub(crate) const BACKEND_CPU: u32 = 1;
pub(crate) const CLIENT_CPU: u32 = 0;
/// A figure within this fraction of the client's ceiling may be the client's limit.
const CLIENT_BOUND: f64 = 0.9;
/// Requests in flight per controller in the many-controller rows.
const SCALE_QD: u32 = 8;

/// What to run (also `vfblk-bench suite`'s arguments).
#[derive(clap::Args, Debug, Clone)]
pub struct SuiteOptions {
    /// Seconds of I/O per measurement.
    #[arg(long, default_value_t = 5.0, value_parser = crate::args::seconds)]
    pub seconds: f64,
    /// Directory for suite.json, suite.md and the plots.
    #[arg(long, default_value = "docs/bench")]
    pub out: PathBuf,
    /// Only these backends (comma-separated ids; default: every one whose binary is there
    /// but the RBD ones): vfblk-null, spdk-null, qsd-null, vfblk-mem, vfblk-mem-huge,
    /// spdk-malloc, vfblk-file, qsd-file, ch-file; vfblk-rbd, vfblk-rbd-sleep (without
    /// --poll), vfblk-rbd-cpus (only the poller pinned) and qsd-rbd only when named (they
    /// start a private Ceph cluster, one mon and one OSD, after the others' rows, and run the
    /// QD1 and QD32 4 KiB random reads and writes unless --workloads says otherwise).
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Only these workloads (comma-separated ids; default: all): randread-4k-qd1,
    /// randread-4k-qd32, randread-4k-qd128, randwrite-4k-qd1, randwrite-4k-qd32,
    /// randwrite-4k-qd128, randread-4k-qd32-4queues, seqread-128k-qd32.
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Only these clients (comma-separated: loadgen, libblkio, loadgen-irq, loadgen-packed;
    /// default loadgen and libblkio, and the first three for the RBD backends).
    #[arg(long, value_delimiter = ',')]
    pub clients: Vec<String>,
    /// SPDK's built source tree (build/bin/vhost; see ../shared/tools/peers).
    #[arg(long)]
    pub spdk: Option<PathBuf>,
    /// cloud-hypervisor's vhost_user_block binary.
    #[arg(long)]
    pub cloud_hypervisor: Option<PathBuf>,
    /// An older build's directory (its `vfblk-bridge`): each of our rows is measured three
    /// times with each binary, alternating, with the same client, and the best of each
    /// compared (a drop of more than 5% is flagged).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// SIGKILLs of each of our persistent backends (vfblk-mem, vfblk-file) under a verifying
    /// client, each started again 50 ms later: the pause the client sees per restart.
    #[arg(long, default_value_t = 10)]
    pub restarts: u32,
    /// Requests per second of the fixed-rate rows: ours and SPDK's null and RAM backends held
    /// at this rate (4 KiB reads, QD32) and compared by their pollers' busy time per I/O
    /// (0: no fixed-rate rows).
    #[arg(long, default_value_t = 300_000.0, value_parser = crate::args::rate_or_zero)]
    pub fixed_rate: f64,
    /// Rounds of the fixed-rate rows, each running both targets of a pair (alternating which
    /// goes first).
    #[arg(long, default_value_t = 8)]
    pub fixed_rate_rounds: u32,
    /// The fixed-rate client drives packed virtqueues (`vfblk-loadgen --packed`; SPDK's
    /// controllers are created with `packed_ring`).
    #[arg(long)]
    pub fixed_rate_packed: bool,
    /// Leave out the many-controller rows (1, 4 and 16 controllers of one target on one
    /// poller, and 16 idle ones).
    #[arg(long)]
    pub no_scale: bool,
    /// Also measure the lab's NVMe path: one lab guest, its emulated NVMe controller served
    /// over vhost-user by our NVMe backend, qemu-storage-daemon's nvme driver and the guest
    /// kernel's driver (TCG-bound figures; a few minutes).
    #[arg(long)]
    pub nvme_lab: bool,
    /// Print the JSON instead of the markdown.
    #[arg(long)]
    pub json: bool,
}

/// Time between restarts, and from a kill to the next start.
const RESTART_EVERY: Duration = Duration::from_secs(1);
const RESTART_AFTER: Duration = Duration::from_millis(50);

/// A started backend; killed (with its process group) when dropped.
pub(crate) struct Running {
    child: Child,
    command: String,
    /// Asked to end with SIGTERM first, given this long before the SIGKILL: an RBD backend
    /// that closes its image releases its exclusive lock, where a killed one leaves it to
    /// Ceph's 30 s watch timeout and the next backend's first write would wait that long.
    term_first: Option<Duration>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(grace) = self.term_first {
            // SAFETY: signalling the backend process we started.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                match self.child.try_wait() {
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                    Ok(Some(_)) | Err(_) => break,
                }
            }
        }
        // SAFETY: signalling the process group we created for the backend.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long an RBD backend may take to close its image and exit after SIGTERM.
const RBD_STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// The Ceph client both RBD backends connect as (the cluster's `client.admin`).
const RBD_USER: &str = vfblk_lab::ceph::CLIENT_ID;

/// The Ceph cluster of the `rbd` kinds and their images: one per backend, DISK_MIB each,
/// every byte written before the first measurement (reads of objects never written would be
/// answered by librbd's object map without asking the OSD).
struct Rbd {
    cluster: vfblk_lab::ceph::Cluster,
    /// What the result says about it.
    info: Value,
}

impl Rbd {
    /// The image `b` serves.
    fn image(b: Backend) -> String {
        format!("suite-{}", b.id())
    }
}

pub(crate) struct Suite {
    pub(crate) bin_dir: PathBuf,
    dir: PathBuf,
    pub(crate) socket: PathBuf,
    data: PathBuf,
    pub(crate) options: SuiteOptions,
    /// The Ceph cluster, while the `rbd` kinds are measured.
    rbd: Option<Rbd>,
}

fn shell_words(args: &[String]) -> String {
    args.join(" ")
}

impl Suite {
    fn available(&self, b: Backend) -> Option<String> {
        match b {
            Backend::SpdkNull | Backend::SpdkMalloc => match &self.options.spdk {
                None => Some("no --spdk given".into()),
                Some(dir) if !dir.join("build/bin/vhost").exists() => {
                    Some(format!("{}/build/bin/vhost missing", dir.display()))
                }
                Some(_) => None,
            },
            Backend::ChFile => match &self.options.cloud_hypervisor {
                None => Some("no --cloud-hypervisor given".into()),
                Some(bin) if !bin.exists() => Some(format!("{} missing", bin.display())),
                Some(_) => None,
            },
            Backend::QsdNull | Backend::QsdFile => (!tool_runs("qemu-storage-daemon"))
                .then(|| "qemu-storage-daemon not on PATH".into()),
            Backend::OursRbd | Backend::QsdRbd => {
                if b == Backend::QsdRbd && !tool_runs("qemu-storage-daemon") {
                    return Some("qemu-storage-daemon not on PATH".into());
                }
                ["ceph-mon", "ceph-osd", "rbd"]
                    .into_iter()
                    .find(|tool| !tool_runs(tool))
                    .map(|tool| format!("{tool} not on PATH (scripts/setup.sh installs Ceph)"))
            }
            _ => None,
        }
    }

    /// The OSD's ops so far and the seconds they took (its `op_latency` counter), for the
    /// `rbd` kinds.
    fn osd_op_latency(&self, b: Backend) -> Option<(u64, f64)> {
        let rbd = self.rbd.as_ref().filter(|_| b.kind() == "rbd")?;
        let dump = rbd
            .cluster
            .ceph(&["daemon", "osd.0", "perf", "dump"])
            .ok()?;
        let dump: Value = serde_json::from_str(&dump).ok()?;
        let op = &dump["osd"]["op_latency"];
        Some((op["avgcount"].as_u64()?, op["sum"].as_f64()?))
    }

    /// Starts the Ceph cluster of the `rbd` kinds and writes one image per backend.
    fn start_rbd(&self, backends: &[Backend]) -> Result<Rbd> {
        let started = Instant::now();
        let cluster = vfblk_lab::ceph::Cluster::start("bench-suite")
            .map_err(|e| Error::Run(format!("starting the Ceph cluster: {e}")))?;
        let cluster_seconds = started.elapsed().as_secs_f64();
        tracing::info!("  Ceph cluster ready in {cluster_seconds:.1} s");
        let mut images = Vec::new();
        for b in backends {
            let image = Rbd::image(*b);
            let spec = format!("{}/{image}", cluster.pool());
            let started = Instant::now();
            // The suite's data file, every byte: the image exists with librbd's default
            // features (exclusive-lock, object-map among them) and every object is written.
            let data = self.data.display().to_string();
            cluster
                .rbd(&["import", "--no-progress", &data, &spec])
                .map_err(|e| Error::Run(format!("writing image {spec}: {e}")))?;
            let seconds = started.elapsed().as_secs_f64();
            tracing::info!("  image {spec}: {DISK_MIB} MiB written in {seconds:.1} s");
            images.push(json!({"backend": b.id(), "image": spec, "write_seconds": seconds}));
        }
        let info = json!({
            "ceph": command_output("ceph-osd", &["--version"]),
            "daemons": "one mon and one bluestore OSD (block on a sparse file), unpinned",
            "dir": cluster.dir().display().to_string(),
            "conf": cluster.conf().display().to_string(),
            "start_seconds": cluster_seconds,
            "images": images,
            "image_mib": DISK_MIB,
        });
        Ok(Rbd { cluster, info })
    }

    /// The data file of the `file` kinds: DISK_MIB, written once so every page exists.
    fn prepare_data(&self) -> Result<()> {
        let file = std::fs::File::create(&self.data)
            .map_err(io_error(format!("creating {}", self.data.display())))?;
        let chunk = vec![0x5au8; 1 << 20];
        let mut w = std::io::BufWriter::new(file);
        for _ in 0..DISK_MIB {
            std::io::Write::write_all(&mut w, &chunk)
                .map_err(io_error(format!("writing {}", self.data.display())))?;
        }
        Ok(())
    }

    fn spawn(&self, args: Vec<String>, env: &[(&str, String)]) -> Result<Running> {
        let pinned = ["taskset".to_string(), "-c".into(), BACKEND_CPU.to_string()];
        self.spawn_unpinned(pinned.into_iter().chain(args).collect(), env)
    }

    /// [`Suite::spawn`] without the `taskset` in front: the backend pins what it pins.
    fn spawn_unpinned(&self, args: Vec<String>, env: &[(&str, String)]) -> Result<Running> {
        let mut command = Command::new(&args[0]);
        command
            .args(&args[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.join("backend.log"))
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            );
        // Its own process group: helper threads and children go with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let command_line = shell_words(&args);
        let child = spawn_listening(command, &self.socket, LISTEN_TIMEOUT)?;
        Ok(Running {
            child,
            command: command_line,
            term_first: None,
        })
    }

    /// The JSON-RPC socket of the running backend `b` (ours and SPDK's have one).
    pub(crate) fn rpc_socket(&self, b: Backend) -> PathBuf {
        match b {
            Backend::SpdkNull | Backend::SpdkMalloc => self.dir.join("spdk.rpc"),
            _ => self.dir.join("bridge.rpc"),
        }
    }

    pub(crate) fn start(&self, b: Backend, queues: u16) -> Result<Running> {
        self.start_with(b, queues, &self.bin_dir)
    }

    /// [`Suite::start`] with our backends run from `bridge_dir`'s `vfblk-bridge`.
    fn start_with(&self, b: Backend, queues: u16, bridge_dir: &Path) -> Result<Running> {
        let s = |x: &str| x.to_string();
        let socket = self.socket.display().to_string();
        let q = queues.to_string();
        let bridge = |backend: String| {
            vec![
                bridge_dir.join("vfblk-bridge").display().to_string(),
                s("--socket"),
                socket.clone(),
                s("--backend"),
                backend,
                s("--queues"),
                q.clone(),
                s("--poll"),
                // For its poller busy time (the fixed-rate rows); an idle thread otherwise.
                s("--rpc"),
                self.rpc_socket(b).display().to_string(),
            ]
        };
        let qsd = |blockdev: String| {
            vec![
                s("qemu-storage-daemon"),
                s("--blockdev"),
                blockdev,
                s("--export"),
                format!("type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={socket},writable=on,num-queues={q}"),
            ]
        };
        match b {
            Backend::OursNull => self.spawn(bridge(format!("null:{DISK_MIB}M")), &[]),
            Backend::OursMem => {
                // Kept between starts: a restarted backend serves the same data.
                let shm = format!("{}.ram", self.data.display());
                self.spawn(bridge(format!("mem:{shm}:{DISK_MIB}M")), &[])
            }
            Backend::OursMemHuge => {
                let dir = hugetlbfs(DISK_MIB / 2)?;
                let path = dir.join(format!("vfblk-bench-suite-{}", std::process::id()));
                let _ = std::fs::remove_file(&path);
                let running =
                    self.spawn(bridge(format!("mem:{}:{DISK_MIB}M", path.display())), &[]);
                // The pages stay reserved to the file until it goes; the open mapping keeps
                // them for the backend meanwhile.
                let _ = std::fs::remove_file(&path);
                running
            }
            Backend::OursFile => self.spawn(bridge(format!("file:{}", self.data.display())), &[]),
            Backend::QsdNull => self.spawn(
                qsd(format!(
                    "driver=null-co,node-name=d0,size={}",
                    DISK_MIB << 20
                )),
                &[],
            ),
            Backend::QsdFile => self.spawn(
                qsd(format!(
                    "driver=file,filename={},node-name=d0,aio=io_uring",
                    self.data.display()
                )),
                &[],
            ),
            Backend::ChFile => {
                let bin = self.options.cloud_hypervisor.clone().unwrap_or_default();
                self.spawn(
                    vec![
                        bin.display().to_string(),
                        s("--block-backend"),
                        format!("path={},socket={socket},num_queues={q},queue_size={QUEUE_SIZE},direct=false,poll_queue=true", self.data.display()),
                    ],
                    &[],
                )
            }
            Backend::SpdkNull | Backend::SpdkMalloc => self.start_spdk(b),
            Backend::OursRbd | Backend::OursRbdSleep | Backend::OursRbdCpus | Backend::QsdRbd => {
                let rbd = self
                    .rbd
                    .as_ref()
                    .ok_or_else(|| Error::Run("no Ceph cluster".into()))?;
                let (pool, image) = (rbd.cluster.pool(), Rbd::image(b));
                let conf = rbd.cluster.conf().display().to_string();
                let ours = bridge(format!(
                    "rbd:{pool}/{image},conf={conf},id={RBD_USER},keyring={}",
                    rbd.cluster.keyring().display()
                ));
                let mut running = if b == Backend::OursRbd {
                    self.spawn(ours, &[])?
                } else if b == Backend::OursRbdSleep {
                    self.spawn(ours.into_iter().filter(|a| a != "--poll").collect(), &[])?
                } else if b == Backend::OursRbdCpus {
                    let cpus = [s("--cpus"), BACKEND_CPU.to_string()];
                    self.spawn_unpinned(ours.into_iter().chain(cpus).collect(), &[])?
                } else {
                    // cache.direct=on: QEMU turns librbd's cache on otherwise (writeback,
                    // writethrough until the first flush); ours runs with it off (the
                    // cluster's conf says so), so the writes of both wait for the OSD.
                    // The keyring is the one the conf names.
                    self.spawn(
                        qsd(format!(
                            "driver=rbd,node-name=d0,pool={pool},image={image},conf={conf},user={RBD_USER},cache.direct=on"
                        )),
                        &[],
                    )?
                };
                running.term_first = Some(RBD_STOP_TIMEOUT);
                Ok(running)
            }
        }
    }

    /// SPDK's vhost target: one reactor on the backend core, the bdev and controller created
    /// over its JSON-RPC socket (the socket path's directory and name are SPDK's vhost
    /// directory and controller name).
    fn start_spdk(&self, b: Backend) -> Result<Running> {
        let spdk = self.options.spdk.clone().unwrap_or_default();
        spdk_hugepages()?;
        let rpc = self.dir.join("spdk.rpc");
        let _ = std::fs::remove_file(&rpc);
        let mask = format!("{:#x}", 1u64 << BACKEND_CPU);
        let vhost_dir = self.socket.parent().unwrap_or(Path::new("/")).to_path_buf();
        let ctrlr = self
            .socket
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let args = vec![
            spdk.join("build/bin/vhost").display().to_string(),
            "-m".into(),
            mask.clone(),
            "-u".into(),
            "-S".into(),
            vhost_dir.display().to_string(),
            "-r".into(),
            rpc.display().to_string(),
        ];
        let mut command = Command::new(&args[0]);
        command
            .args(&args[1..])
            .env("LD_LIBRARY_PATH", spdk.join("build/lib"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = spawn_listening(command, &rpc, Duration::from_secs(30))?;
        let mut running = Running {
            child,
            command: shell_words(&args),
            term_first: None,
        };
        let mut client = vfblk_control::rpc::Client::connect(&rpc)
            .map_err(|e| Error::Run(format!("SPDK RPC: {}", crate::error_chain(&e))))?;
        let mut call = |method: &str, params: Value| {
            client
                .call(method, params)
                .map_err(|e| Error::Run(format!("SPDK {method}: {}", crate::error_chain(&e))))
        };
        call("framework_wait_init", json!({}))?;
        let blocks = (DISK_MIB << 20) / 512;
        let (create, bdev) = if b == Backend::SpdkNull {
            ("bdev_null_create", "Null0")
        } else {
            ("bdev_malloc_create", "Malloc0")
        };
        call(
            create,
            json!({"name": bdev, "num_blocks": blocks, "block_size": 512}),
        )?;
        let _ = std::fs::remove_file(&self.socket);
        // Offered whenever a packed client is in the run (a split client's driver still
        // negotiates split rings on it); otherwise SPDK's controller as it is by default.
        let packed = self.packed_wanted();
        call(
            "vhost_create_blk_controller",
            json!({"ctrlr": ctrlr, "dev_name": bdev, "cpumask": mask, "packed_ring": packed}),
        )?;
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !vfblk_lab::process::listening(&self.socket) {
            if Instant::now() > deadline {
                return Err(Error::Run(format!(
                    "SPDK did not create {}",
                    self.socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        running.command = format!(
            "{} (then RPC {create} {bdev} {blocks}x512, vhost_create_blk_controller {ctrlr} {bdev} --cpumask {mask}{})",
            running.command,
            if packed { " --packed-ring" } else { "" }
        );
        Ok(running)
    }

    /// Whether a client of this run drives packed virtqueues.
    fn packed_wanted(&self) -> bool {
        self.options.fixed_rate_packed
            || self
                .options
                .clients
                .iter()
                .any(|c| c == Client::Packed.id())
    }

    fn client_args(&self, client: Client, w: &Workload) -> Vec<String> {
        let (bin, poll) = match client {
            Client::Loadgen => ("vfblk-loadgen", "--polled"),
            Client::Blkio => ("vfblk-blkio-load", "--poll"),
            Client::Interrupts => ("vfblk-loadgen", "--interrupts"),
            Client::Packed => ("vfblk-loadgen", "--polled"),
        };
        let mut args = vec![
            self.bin_dir.join(bin).display().to_string(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--rw".into(),
            if w.write { "write" } else { "read" }.into(),
            "--bs".into(),
            w.block_size.to_string(),
            "--qd".into(),
            w.qd.to_string(),
            "--queues".into(),
            w.queues.to_string(),
            "--seconds".into(),
            self.options.seconds.to_string(),
            poll.into(),
            "--json".into(),
        ];
        if client != Client::Blkio {
            args.extend(["--queue-size".into(), QUEUE_SIZE.to_string()]);
        }
        if w.sequential {
            args.push("--sequential".into());
        }
        if client == Client::Packed {
            args.push("--packed".into());
        }
        args
    }

    fn measure(&self, b: Backend, client: Client, w: &Workload) -> Measurement {
        self.measure_with(b, client, w, &self.bin_dir)
    }

    /// [`Suite::measure`] with our backends run from `bridge_dir`.
    fn measure_with(
        &self,
        b: Backend,
        client: Client,
        w: &Workload,
        bridge_dir: &Path,
    ) -> Measurement {
        let args = self.client_args(client, w);
        let client_command = format!("taskset -c {CLIENT_CPU} {}", shell_words(&args));
        let mut m = Measurement {
            backend: b,
            client,
            workload: *w,
            report: Err(String::new()),
            backend_cpu_ns_per_io: None,
            cluster_cpu_ns_per_io: None,
            outside_cores: None,
            osd_op_ms: None,
            backend_command: String::new(),
            client_command,
        };
        let running = match self.start_with(b, w.queues, bridge_dir) {
            Ok(r) => r,
            Err(e) => {
                m.report = Err(format!("backend: {}", crate::error_chain(&e)));
                return m;
            }
        };
        m.backend_command = running.command.clone();
        let pid = running.child.id();
        // The Ceph daemons' CPU, for the rbd kinds: what each I/O costs the cluster.
        let daemons = match (&self.rbd, b.kind()) {
            (Some(rbd), "rbd") => rbd.cluster.daemon_pids(),
            _ => Vec::new(),
        };
        let daemons_cpu = || -> Option<f64> {
            (!daemons.is_empty())
                .then(|| daemons.iter().map(|&p| cpu_seconds(p).ok()).sum())
                .flatten()
        };
        // The OSD's own time per op (queueing in it included), outside the CPU window: the
        // `ceph` CLI is a Python program.
        let osd_before = self.osd_op_latency(b);
        let cluster_before = daemons_cpu();
        let cpu_before = cpu_seconds(pid).ok();
        let (machine_before, children_before) = (machine_busy_seconds(), children_cpu_seconds());
        let started = Instant::now();
        let out = Command::new("taskset")
            .args(["-c", &CLIENT_CPU.to_string()])
            .args(&args)
            .stdin(Stdio::null())
            .output();
        let wall = started.elapsed().as_secs_f64();
        // The client, reaped by now, is the only child that ended in between.
        let (machine_after, client) = (
            machine_busy_seconds(),
            children_cpu_seconds() - children_before,
        );
        let cpu_after = cpu_seconds(pid).ok();
        let cluster_after = daemons_cpu();
        let osd_after = self.osd_op_latency(b);
        drop(running);
        if let (Some((n0, s0)), Some((n1, s1))) = (osd_before, osd_after) {
            if n1 > n0 {
                m.osd_op_ms = Some((s1 - s0) * 1e3 / (n1 - n0) as f64);
            }
        }
        if let (Some(m0), Some(m1), Some(a), Some(b)) =
            (machine_before, machine_after, cpu_before, cpu_after)
        {
            let cluster = match (cluster_before, cluster_after) {
                (Some(c0), Some(c1)) => c1 - c0,
                _ => 0.0,
            };
            let outside = (m1 - m0) - (b - a) - client - cluster;
            m.outside_cores = Some((outside / wall.max(1e-3)).max(0.0));
        }
        m.report = match out {
            Err(e) => Err(format!("starting {}: {e}", args[0])),
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                match serde_json::from_str::<Value>(text.trim()) {
                    Ok(r) if r["ios"].as_u64().unwrap_or(0) > 0 && r["failed"] == 0 => Ok(r),
                    Ok(r) => Err(format!("no clean I/O: {r}")),
                    Err(_) => {
                        // Its last line, without the program's name in front.
                        let stderr = String::from_utf8_lossy(&out.stderr);
                        let last = stderr.trim().lines().last().unwrap_or("").to_string();
                        let reason = last
                            .split_once(": ")
                            .filter(|(program, _)| program.starts_with("vfblk-"))
                            .map(|(_, rest)| rest.to_string())
                            .unwrap_or(last);
                        Err(format!("{reason} ({})", out.status))
                    }
                }
            }
        };
        if let (Ok(r), Some(a), Some(b)) = (&m.report, cpu_before, cpu_after) {
            let ios = r["ios"].as_f64().unwrap_or(0.0);
            if ios > 0.0 {
                m.backend_cpu_ns_per_io = Some((b - a) * 1e9 / ios);
                if let (Some(a), Some(b)) = (cluster_before, cluster_after) {
                    m.cluster_cpu_ns_per_io = Some((b - a) * 1e9 / ios);
                }
            }
        }
        m
    }
}

impl Suite {
    /// Kills `b` with SIGKILL `n` times under a verifying `vfblk-loadgen`, starting it again
    /// [`RESTART_AFTER`] later each time.
    fn restarts(&self, b: Backend, n: u32) -> RestartRun {
        let seconds = n as f64 * RESTART_EVERY.as_secs_f64() + 1.5;
        let args = vec![
            self.bin_dir.join("vfblk-loadgen").display().to_string(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--rw".into(),
            "mixed".into(),
            "--verify".into(),
            "--qd".into(),
            "32".into(),
            "--seconds".into(),
            seconds.to_string(),
            "--reconnect-timeout-s".into(),
            "20".into(),
            "--json".into(),
        ];
        let mut run = RestartRun {
            backend: b,
            restarts: 0,
            report: Err(String::new()),
            client_command: format!("taskset -c {CLIENT_CPU} {}", shell_words(&args)),
        };
        let mut backend = match self.start(b, 1) {
            Ok(r) => r,
            Err(e) => {
                run.report = Err(format!("backend: {}", crate::error_chain(&e)));
                return run;
            }
        };
        let client = Command::new("taskset")
            .args(["-c", &CLIENT_CPU.to_string()])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut client = match client {
            Ok(c) => c,
            Err(e) => {
                run.report = Err(format!("starting vfblk-loadgen: {e}"));
                return run;
            }
        };
        for _ in 0..n {
            std::thread::sleep(RESTART_EVERY);
            // SIGKILL of its process group (Running's drop), then a new one.
            drop(backend);
            std::thread::sleep(RESTART_AFTER);
            backend = match self.start(b, 1) {
                Ok(r) => r,
                Err(e) => {
                    let _ = client.kill();
                    let _ = client.wait();
                    run.report = Err(format!("restarting: {}", crate::error_chain(&e)));
                    return run;
                }
            };
            run.restarts += 1;
        }
        run.report = match client.wait_with_output() {
            Err(e) => Err(format!("vfblk-loadgen: {e}")),
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                serde_json::from_str::<Value>(text.trim())
                    .map_err(|_| format!("the client printed no report ({})", out.status))
            }
        };
        drop(backend);
        run
    }
}

/// At least `pages` free 2 MiB hugepages and a hugetlbfs mount (made at /dev/hugepages if
/// there is none); returns the mount's directory.
fn hugetlbfs(pages: u64) -> Result<PathBuf> {
    let number = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let free = number("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages");
    let total = number("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages");
    if free < pages {
        vfblk_hugepages::reserve::reserve_2m(total + pages - free).map_err(|e| {
            Error::Run(format!(
                "reserving {pages} hugepages: {}",
                crate::error_chain(&e)
            ))
        })?;
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"hugetlbfs") && !l.contains("pagesize=1G")).then(|| PathBuf::from(f[1]))
    });
    if let Some(dir) = mounted {
        return Ok(dir);
    }
    std::fs::create_dir_all("/dev/hugepages").map_err(io_error("creating /dev/hugepages"))?;
    let status = Command::new("mount")
        .args(["-t", "hugetlbfs", "nodev", "/dev/hugepages"])
        .status()
        .map_err(io_error("running mount"))?;
    if !status.success() {
        return Err(Error::Run(format!("mount -t hugetlbfs: {status}")));
    }
    Ok(PathBuf::from("/dev/hugepages"))
}

/// The hugepages SPDK's DPDK takes (about 310 with a 256 MiB malloc bdev) and hugetlbfs.
fn spdk_hugepages() -> Result<()> {
    hugetlbfs(400).map(|_| ())
}

fn pick<T: Copy>(
    names: &[String],
    all: &[T],
    id: impl Fn(T) -> &'static str,
    from: impl Fn(&str) -> Option<T>,
    what: &str,
) -> Result<Vec<T>> {
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    names
        .iter()
        .map(|n| {
            from(n).ok_or_else(|| {
                let known: Vec<&str> = all.iter().map(|x| id(*x)).collect();
                Error::Run(format!(
                    "unknown {what} {n:?} (known: {})",
                    known.join(", ")
                ))
            })
        })
        .collect()
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Share of all CPUs busy over `over` (from /proc/stat): a suite run beside other work
/// measures the scheduler, not the backends.
fn machine_busy(over: Duration) -> Option<f64> {
    let (t0, i0) = cpu_ticks()?;
    std::thread::sleep(over);
    let (t1, i1) = cpu_ticks()?;
    let total = t1.checked_sub(t0)?.max(1);
    Some(1.0 - (i1.saturating_sub(i0)) as f64 / total as f64)
}

/// All CPUs' clock ticks since boot, and the idle ones among them (from /proc/stat).
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = cpu.get(3)? + cpu.get(4).copied().unwrap_or(0);
    Some((cpu.iter().take(8).sum(), idle))
}

/// CPU seconds all CPUs have been busy since boot (stolen time included).
fn machine_busy_seconds() -> Option<f64> {
    let (total, idle) = cpu_ticks()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(total.saturating_sub(idle) as f64 / hz)
}

/// CPU seconds (user + system) of this process's reaped children.
fn children_cpu_seconds() -> f64 {
    // SAFETY: a zeroed rusage is a valid out value for getrusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn environment(o: &SuiteOptions) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    let spdk_rev = o
        .spdk
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join(".peers-rev")).ok())
        .map(|s| s.trim().to_string());
    json!({
        "date": command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "kernel": command_output("uname", &["-r"]),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "vfblk": env!("CARGO_PKG_VERSION"),
        "qemu_storage_daemon": command_output("qemu-storage-daemon", &["--version"]),
        "spdk": o.spdk.as_ref().map(|d| d.display().to_string()),
        "spdk_commit": spdk_rev,
        "cloud_hypervisor": o.cloud_hypervisor.as_ref().map(|d| d.display().to_string()),
        "seconds_per_measurement": o.seconds,
        "disk_mib": DISK_MIB,
        "queue_size": QUEUE_SIZE,
        "backend_cpu": BACKEND_CPU,
        "client_cpu": CLIENT_CPU,
        "busy_before_run": machine_busy(Duration::from_secs(1)),
    })
}

/// Runs the suite.
pub fn run(o: &SuiteOptions) -> Result<SuiteResult> {
    let default_backends: Vec<Backend> = Backend::ALL
        .into_iter()
        .filter(|b| b.in_default())
        .collect();
    let backends = pick(
        &o.backends,
        &default_backends,
        Backend::id,
        Backend::from_id,
        "backend",
    )?;
    let workloads = pick(
        &o.workloads,
        &WORKLOADS,
        |w| w.id,
        |n| WORKLOADS.iter().copied().find(|w| w.id == n),
        "workload",
    )?;
    let default_clients: Vec<Client> = Client::ALL.into_iter().filter(|c| c.in_default()).collect();
    let clients = pick(
        &o.clients,
        &default_clients,
        Client::id,
        Client::from_id,
        "client",
    )?;
    let rbd_clients = pick(
        &o.clients,
        &Client::ALL,
        Client::id,
        Client::from_id,
        "client",
    )?;
    let bin_dir = vfblk_lab::sibling_bin_dir()?;
    let dir = vfblk_lab::run_dir("bench-suite")?;
    let mut suite = Suite {
        socket: dir.join("suite.sock"),
        data: PathBuf::from(format!("/dev/shm/vfblk-bench-suite-{}", std::process::id())),
        bin_dir,
        dir,
        options: o.clone(),
        rbd: None,
    };
    let mut skipped = Vec::new();
    let mut runnable = Vec::new();
    for b in backends {
        match suite.available(b) {
            Some(why) => skipped.push((b, why)),
            None => runnable.push(b),
        }
    }
    for (b, why) in &skipped {
        tracing::warn!("skipping {}: {why}", b.id());
    }
    let environment = environment(o);
    if let Some(busy) = environment["busy_before_run"].as_f64() {
        if busy > 0.1 {
            tracing::warn!(
                "the machine was {:.0}% busy before the run: figures will show the contention",
                busy * 100.0
            );
        }
    }
    suite.prepare_data()?;
    // The rbd kinds run last, on a cluster started for them: its daemons are never running
    // while the others are measured.
    let (rbd_backends, local): (Vec<Backend>, Vec<Backend>) =
        runnable.iter().partition(|b| b.kind() == "rbd");
    let rbd_workloads: Vec<Workload> = workloads
        .iter()
        .copied()
        .filter(|w| !o.workloads.is_empty() || RBD_WORKLOADS.contains(&w.id))
        .collect();
    let total = local.len() * workloads.len() * clients.len()
        + rbd_backends.len() * rbd_workloads.len() * rbd_clients.len();
    let mut measurements = Vec::new();
    let mut baseline = Vec::new();
    let baseline_dir = o.baseline.clone();
    let mut measure_all = |suite: &Suite,
                           backends: &[Backend],
                           workloads: &[Workload],
                           clients: &[Client]| {
        for w in workloads {
            for client in clients {
                for b in backends {
                    tracing::info!(
                        "[{}/{total}] {} with {} on {}",
                        measurements.len() + 1,
                        w.id,
                        client.id(),
                        b.id()
                    );
                    let m = suite.measure(*b, *client, w);
                    match (&m.report, m.iops()) {
                        (Ok(_), Some(iops)) => tracing::info!("  {iops:.0} IOPS"),
                        (Err(e), _) => tracing::warn!("  failed: {e}"),
                        _ => {}
                    }
                    if let (Some(dir), true) = (&baseline_dir, b.ours()) {
                        // Alternating, each binary's best of BASELINE_ROUNDS: on a machine
                        // whose cores now and then sit far apart (docs/benchmarks.md), one
                        // run each compares the machine's states, not the binaries.
                        let mut new = m;
                        let mut old = suite.measure_with(*b, *client, w, dir);
                        for _ in 1..BASELINE_ROUNDS {
                            new = better(new, suite.measure(*b, *client, w));
                            old = better(old, suite.measure_with(*b, *client, w, dir));
                        }
                        if let (Some(n), Some(o)) = (new.iops(), old.iops()) {
                            tracing::info!(
                                    "  best of {BASELINE_ROUNDS}: {n:.0} IOPS, baseline {o:.0} IOPS ({:+.1}%)",
                                    (n / o - 1.0) * 100.0
                                );
                        }
                        measurements.push(new);
                        baseline.push(old);
                    } else {
                        measurements.push(m);
                    }
                }
            }
        }
    };
    measure_all(&suite, &local, &workloads, &clients);
    let mut rbd = None;
    if !rbd_backends.is_empty() {
        tracing::info!(
            "a private Ceph cluster (one mon, one OSD) for {}",
            rbd_backends
                .iter()
                .map(|b| b.id())
                .collect::<Vec<_>>()
                .join(", ")
        );
        match suite.start_rbd(&rbd_backends) {
            Ok(cluster) => {
                suite.rbd = Some(cluster);
                measure_all(&suite, &rbd_backends, &rbd_workloads, &rbd_clients);
                if let Some(cluster) = suite.rbd.take() {
                    let info = cluster.info.clone();
                    if let Err(e) = cluster.cluster.stop() {
                        tracing::warn!("stopping the Ceph cluster: {e}");
                    }
                    rbd = Some(Ok(info));
                }
            }
            Err(e) => {
                let e = crate::error_chain(&e);
                tracing::warn!("  failed: {e}");
                rbd = Some(Err(e));
            }
        }
    }
    let mut restarts = Vec::new();
    if o.restarts > 0 {
        for b in [Backend::OursMem, Backend::OursFile] {
            if !runnable.contains(&b) {
                continue;
            }
            tracing::info!(
                "{} SIGKILLs of {} under a verifying client",
                o.restarts,
                b.id()
            );
            let r = suite.restarts(b, o.restarts);
            match &r.report {
                Ok(report) => tracing::info!(
                    "  {} reconnects, {} verify errors, pauses {} ms",
                    report["reconnects"],
                    report["verify_errors"],
                    report["pauses_ms"]
                ),
                Err(e) => tracing::warn!("  failed: {e}"),
            }
            restarts.push(r);
        }
    }
    let fixed_rate = (o.fixed_rate > 0.0 && o.fixed_rate_rounds > 0).then(|| {
        let spdk_missing = suite.available(Backend::SpdkNull);
        suite.fixed_rate(o.fixed_rate, o.seconds, o.fixed_rate_rounds, spdk_missing)
    });
    let _ = std::fs::remove_file(&suite.data);
    let _ = std::fs::remove_file(format!("{}.ram", suite.data.display()));
    // The scale rows and the lab take whole seconds; at least one, so short suite runs
    // still measure something.
    let whole_seconds = o.seconds.ceil().max(1.0) as u32;
    let scale = (!o.no_scale).then(|| {
        tracing::info!(
            "many controllers on one poller: 1, 4, 16, then 16 idle; {whole_seconds} s each"
        );
        crate::system::target::run(&crate::system::target::TargetBenchOptions {
            seconds: whole_seconds,
            qd: SCALE_QD,
            json: false,
        })
        .map_err(|e| crate::error_chain(&e))
    });
    if let Some(Err(e)) = &scale {
        tracing::warn!("  failed: {e}");
    }
    let nvme_lab = o.nvme_lab.then(|| {
        tracing::info!("the lab's NVMe path over vhost-user, {whole_seconds} s per measurement");
        crate::system::nvme_vhost::run(whole_seconds).map_err(|e| crate::error_chain(&e))
    });
    if let Some(Err(e)) = &nvme_lab {
        tracing::warn!("  failed: {e}");
    }
    Ok(SuiteResult {
        measurements,
        baseline,
        fixed_rate,
        restarts,
        skipped,
        environment,
        scale,
        nvme_lab,
        rbd,
    })
}

/// Runs the suite and writes its JSON, markdown and plots into `o.out`; prints the
/// markdown (or the JSON).
pub fn bench(o: &SuiteOptions) -> Result<()> {
    std::fs::create_dir_all(&o.out).map_err(io_error(format!("creating {}", o.out.display())))?;
    let result = run(o)?;
    let command = std::env::args()
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
        .collect::<Vec<_>>()
        .join(" ");
    let json = result.to_json();
    let mut markdown = result.to_markdown(&command);
    let plots = plot::plots(&result, &o.out)?;
    if !plots.is_empty() {
        markdown.push_str("\n## Plots\n\n");
        for p in &plots {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            markdown.push_str(&format!("![{name}]({name})\n\n"));
        }
    }
    let json_path = o.out.join("suite.json");
    let md_path = o.out.join("suite.md");
    std::fs::write(&json_path, format!("{json:#}\n"))
        .map_err(io_error(format!("writing {}", json_path.display())))?;
    std::fs::write(&md_path, &markdown)
        .map_err(io_error(format!("writing {}", md_path.display())))?;
    if o.json {
        println!("{json}");
    } else {
        print!("{markdown}");
        eprintln!(
            "wrote {}, {} and {} plot(s)",
            json_path.display(),
            md_path.display(),
            plots.len()
        );
    }
    Ok(())
}

// The text is written here, not beside the type: it names the suite's setup (cores, disk,
// rings, restart delay).
impl SuiteResult {
    /// The client's ceiling for a workload: its best IOPS against any `null` backend.
    pub fn ceiling(&self, client: Client, w: &Workload) -> Option<f64> {
        self.measurements
            .iter()
            .filter(|m| m.client == client && m.workload == *w && m.backend.kind() == "null")
            .filter_map(|m| m.iops())
            .fold(None, |best, x| Some(best.map_or(x, |b: f64| b.max(x))))
    }

    /// The result as JSON.
    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .measurements
            .iter()
            .map(|m| {
                let ceiling = self.ceiling(m.client, &m.workload);
                json!({
                    "backend": m.backend.id(),
                    "backend_kind": m.backend.kind(),
                    "client": m.client.id(),
                    "workload": m.workload.id,
                    "iops": m.iops(),
                    "client_ceiling_iops": ceiling,
                    "client_bound": match (m.iops(), ceiling) {
                        (Some(x), Some(c)) => x >= CLIENT_BOUND * c,
                        _ => false,
                    },
                    "backend_cpu_ns_per_io": m.backend_cpu_ns_per_io,
                    "cluster_cpu_ns_per_io": m.cluster_cpu_ns_per_io,
                    "outside_cores": m.outside_cores,
                    "osd_op_ms": m.osd_op_ms,
                    // The latency distributions are drawn in the plots; the file keeps
                    // the quantiles (the CDFs would make it a megabyte).
                    "report": m.report.as_ref().ok().map(without_cdf),
                    "error": m.report.as_ref().err(),
                    "backend_command": m.backend_command,
                    "client_command": m.client_command,
                })
            })
            .collect();
        json!({
            "environment": self.environment,
            "skipped": self.skipped.iter().map(|(b, why)| json!({"backend": b.id(), "why": why})).collect::<Vec<_>>(),
            "measurements": rows,
            "baseline": self.baseline_json(),
            "fixed_rate": self.fixed_rate.as_ref().map(|f| f.to_json()),
            "restarts": self.restarts.iter().map(|r| json!({
                "backend": r.backend.id(),
                "restarts": r.restarts,
                "report": r.report.as_ref().ok().map(without_cdf),
                "error": r.report.as_ref().err(),
                "client_command": r.client_command,
            })).collect::<Vec<_>>(),
            "scale": self.scale.as_ref().map(|r| match r {
                Ok(scale) => scale.to_json(),
                Err(e) => json!({"error": e}),
            }),
            "nvme_lab": self.nvme_lab.as_ref().map(|r| match r {
                Ok(lab) => lab.to_json(),
                Err(e) => json!({"error": e}),
            }),
            "rbd": self.rbd.as_ref().map(|r| match r {
                Ok(info) => info.clone(),
                Err(e) => json!({"error": e}),
            }),
        })
    }

    /// The result as markdown: one table per client, a row per workload, a column per
    /// backend; IOPS with p50/p99 latency; client-bound figures marked.
    pub fn to_markdown(&self, command: &str) -> String {
        let mut out = String::new();
        let env = &self.environment;
        let _ = writeln!(out, "# Benchmark suite results\n");
        let _ = writeln!(out, "    {command}\n");
        let _ = writeln!(
            out,
            "{} on {} ({} CPUs, kernel {}); each backend alone on CPU {BACKEND_CPU}, the client on CPU {CLIENT_CPU}; {} s per measurement, a {DISK_MIB} MiB disk, {QUEUE_SIZE}-entry rings. qemu-storage-daemon: {}.\n",
            env["date"].as_str().unwrap_or(""),
            env["cpu"].as_str().unwrap_or(""),
            env["cpus"],
            env["kernel"].as_str().unwrap_or(""),
            env["seconds_per_measurement"],
            env["qemu_storage_daemon"].as_str().unwrap_or(""),
        );
        if let Some(busy) = env["busy_before_run"].as_f64() {
            let _ = writeln!(
                out,
                "The machine was {:.0}% busy in the second before the run{}.\n",
                busy * 100.0,
                if busy > 0.1 {
                    ": **the figures include that contention**"
                } else {
                    ""
                }
            );
        }
        for (b, why) in &self.skipped {
            let _ = writeln!(out, "- skipped {}: {why}", b.describe());
        }
        if !self.skipped.is_empty() {
            out.push('\n');
        }
        let _ = writeln!(out, "Cells: IOPS (p50 / p99 latency in µs; backend CPU ns per I/O). **†**: within {:.0}% of the client's own ceiling (its best against a null backend), so possibly the client's limit rather than the backend's.\n", CLIENT_BOUND * 100.0);
        // The rbd kinds have a section of their own.
        let mut backends: Vec<Backend> = Vec::new();
        for m in &self.measurements {
            if !backends.contains(&m.backend) && m.backend.kind() != "rbd" {
                backends.push(m.backend);
            }
        }
        for client in Client::ALL {
            let mine: Vec<&Measurement> = self
                .measurements
                .iter()
                .filter(|m| m.client == client && m.backend.kind() != "rbd")
                .collect();
            if mine.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "## Client: {}\n",
                match client {
                    Client::Loadgen => "vfblk-loadgen (polling driver, no interrupts)",
                    Client::Blkio => "libblkio (poll queues)",
                    Client::Interrupts => "vfblk-loadgen (sleeping on interrupts)",
                    Client::Packed => "vfblk-loadgen on packed virtqueues (polling driver)",
                }
            );
            let _ = write!(out, "| workload |");
            for b in &backends {
                let _ = write!(out, " {} |", b.describe());
            }
            let _ = write!(out, "\n|---|");
            for _ in &backends {
                let _ = write!(out, "---|");
            }
            out.push('\n');
            // Failures are numbered notes under the table, each distinct reason once.
            let mut failures: Vec<&str> = Vec::new();
            let mut seen: Vec<&str> = Vec::new();
            for m in &mine {
                if seen.contains(&m.workload.id) {
                    continue;
                }
                seen.push(m.workload.id);
                let w = m.workload;
                let ceiling = self.ceiling(client, &w);
                let _ = write!(out, "| {} |", w.describe());
                for b in &backends {
                    let cell = mine
                        .iter()
                        .find(|x| x.backend == *b && x.workload == w)
                        .map(|x| match &x.report {
                            Ok(r) => {
                                let iops = r["iops"].as_f64().unwrap_or(0.0);
                                let bound = ceiling.is_some_and(|c| iops >= CLIENT_BOUND * c);
                                format!(
                                    "{}{} ({:.1} / {:.1}; {})",
                                    thousands(iops),
                                    if bound { " †" } else { "" },
                                    r["lat_p50_us"].as_f64().unwrap_or(0.0),
                                    r["lat_p99_us"].as_f64().unwrap_or(0.0),
                                    x.backend_cpu_ns_per_io
                                        .map(|n| format!("{n:.0}"))
                                        .unwrap_or_else(|| "?".into())
                                )
                            }
                            Err(e) => {
                                let n = match failures.iter().position(|f| *f == e.as_str()) {
                                    Some(i) => i + 1,
                                    None => {
                                        failures.push(e.as_str());
                                        failures.len()
                                    }
                                };
                                format!("failed ({n})")
                            }
                        })
                        .unwrap_or_else(|| "—".into());
                    let _ = write!(out, " {cell} |");
                }
                out.push('\n');
            }
            out.push('\n');
            for (i, f) in failures.iter().enumerate() {
                let _ = writeln!(out, "({}) {f}\n", i + 1);
            }
        }
        if !self.restarts.is_empty() {
            let _ = writeln!(
                out,
                "## Restarts: SIGKILL, started again {} ms later, under a verifying client (`vfblk-loadgen --rw mixed --verify`, QD32) that reconnects like QEMU\n",
                RESTART_AFTER.as_millis()
            );
            let _ = writeln!(
                out,
                "| backend | kills | reconnects | I/Os | verify errors | lost | pause p50 / max (ms) |\n|---|---|---|---|---|---|---|"
            );
            for r in &self.restarts {
                match &r.report {
                    Ok(v) => {
                        let mut pauses = pauses_ms(v);
                        pauses.sort_by(f64::total_cmp);
                        let p50 = pauses.get(pauses.len() / 2).copied().unwrap_or(0.0);
                        let max = pauses.last().copied().unwrap_or(0.0);
                        let _ = writeln!(
                            out,
                            "| {} | {} | {} | {} | {} | {} | {p50:.1} / {max:.1} |",
                            r.backend.describe(),
                            r.restarts,
                            v["reconnects"],
                            thousands(v["ios"].as_f64().unwrap_or(0.0)),
                            v["verify_errors"],
                            v["lost"]
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(
                            out,
                            "| {} | {} | failed: {e} | | | | |",
                            r.backend.describe(),
                            r.restarts
                        );
                    }
                }
            }
            out.push('\n');
        }
        out.push_str(&self.baseline_markdown());
        if let Some(f) = &self.fixed_rate {
            out.push_str(&f.to_markdown());
        }
        out.push_str(&self.rbd_markdown());
        match &self.scale {
            Some(Ok(scale)) => out.push_str(&scale.to_markdown()),
            Some(Err(e)) => {
                let _ = writeln!(out, "## Many controllers on one poller\n\nfailed: {e}\n");
            }
            None => {}
        }
        match &self.nvme_lab {
            Some(Ok(lab)) => out.push_str(&lab.to_markdown()),
            Some(Err(e)) => {
                let _ = writeln!(out, "## The lab's NVMe path (TCG-bound)\n\nfailed: {e}\n");
            }
            None => {}
        }
        let _ = writeln!(out, "## Commands\n");
        let mut commands: Vec<&str> = Vec::new();
        for m in &self.measurements {
            for c in [m.backend_command.as_str(), m.client_command.as_str()] {
                if !c.is_empty() && !commands.contains(&c) {
                    commands.push(c);
                }
            }
        }
        for r in &self.restarts {
            commands.push(r.client_command.as_str());
        }
        if let Some(f) = &self.fixed_rate {
            commands.push(f.client_command.as_str());
        }
        for c in commands {
            let _ = writeln!(out, "    {c}");
        }
        out
    }
}

/// A figure of ours may be this much worse than the baseline binary's before it is flagged.
pub const BASELINE_TOLERANCE: f64 = 0.05;
/// Runs of each binary per row with `--baseline`, alternating; the best of each is compared.
pub const BASELINE_ROUNDS: usize = 3;

/// The measurement with more IOPS (a failed one loses).
fn better(a: Measurement, b: Measurement) -> Measurement {
    if b.iops().unwrap_or(-1.0) > a.iops().unwrap_or(-1.0) {
        b
    } else {
        a
    }
}

impl SuiteResult {
    /// Each of our rows beside the baseline binary's: (ours, baseline, IOPS change, p50
    /// latency change), changes as fractions (IOPS up and latency down are better).
    fn baseline_pairs(&self) -> Vec<(&Measurement, &Measurement, f64, f64)> {
        self.baseline
            .iter()
            .filter_map(|old| {
                let new = self.measurements.iter().find(|m| {
                    m.backend == old.backend && m.client == old.client && m.workload == old.workload
                })?;
                let (n, o) = (new.report.as_ref().ok()?, old.report.as_ref().ok()?);
                let iops = new.iops()? / old.iops()? - 1.0;
                let p50 = n["lat_p50_us"].as_f64()? / o["lat_p50_us"].as_f64()? - 1.0;
                Some((new, old, iops, p50))
            })
            .collect()
    }

    /// A drop of more than [`BASELINE_TOLERANCE`] in IOPS or p50 latency.
    fn dropped(iops: f64, p50: f64) -> bool {
        iops < -BASELINE_TOLERANCE || p50 > BASELINE_TOLERANCE
    }

    fn baseline_json(&self) -> Value {
        let rows: Vec<Value> = self
            .baseline_pairs()
            .into_iter()
            .map(|(new, old, iops, p50)| {
                json!({
                    "backend": new.backend.id(),
                    "client": new.client.id(),
                    "workload": new.workload.id,
                    "iops": new.iops(),
                    "baseline_iops": old.iops(),
                    "iops_change": iops,
                    "p50_change": p50,
                    "dropped": Self::dropped(iops, p50),
                    "baseline_command": old.backend_command,
                })
            })
            .collect();
        let failed: Vec<Value> = self
            .baseline
            .iter()
            .filter_map(|m| {
                m.report.as_ref().err().map(
                    |e| json!({"backend": m.backend.id(), "workload": m.workload.id, "error": e}),
                )
            })
            .collect();
        json!({"rows": rows, "failed": failed, "tolerance": BASELINE_TOLERANCE})
    }

    /// Our rows against the baseline binary's, measured right after each with the same
    /// client.
    fn baseline_markdown(&self) -> String {
        let mut out = String::new();
        if self.baseline.is_empty() {
            return out;
        }
        let pairs = self.baseline_pairs();
        let dropped = pairs.iter().filter(|p| Self::dropped(p.2, p.3)).count();
        let _ = writeln!(
            out,
            "## Against the baseline binary\n\nEach of our rows measured {BASELINE_ROUNDS} times with this build's `vfblk-bridge` and {BASELINE_ROUNDS} times with the baseline build's, alternating (same client, same workload), the best run of each compared (with `--baseline` the tables above show this build's best too). {} of {} figures dropped more than {:.0}% (IOPS down or p50 latency up){}.\n\n| backend | client | workload | IOPS | baseline IOPS | change | p50 change |\n|---|---|---|---|---|---|---|",
            dropped,
            pairs.len(),
            BASELINE_TOLERANCE * 100.0,
            if dropped > 0 { ": **flagged below**" } else { "" }
        );
        for (new, old, iops, p50) in &pairs {
            let flag = if Self::dropped(*iops, *p50) {
                " **↓**"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:+.1}% | {:+.1}%{flag} |",
                new.backend.id(),
                new.client.id(),
                new.workload.describe(),
                thousands(new.iops().unwrap_or(0.0)),
                thousands(old.iops().unwrap_or(0.0)),
                iops * 100.0,
                p50 * 100.0
            );
        }
        for m in &self.baseline {
            if let Err(e) = &m.report {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | baseline failed: {e} | | | |",
                    m.backend.id(),
                    m.client.id(),
                    m.workload.describe()
                );
            }
        }
        out.push('\n');
        out
    }

    /// The `rbd` kinds' section: a row per client and workload, IOPS with p50 / p99 latency,
    /// and the CPU per I/O of the target process and of the Ceph daemons.
    fn rbd_markdown(&self) -> String {
        let mut out = String::new();
        let info = match &self.rbd {
            None => return out,
            Some(Err(e)) => {
                let _ = writeln!(out, "## Ceph RBD\n\nfailed: {e}\n");
                return out;
            }
            Some(Ok(info)) => info,
        };
        let rows: Vec<&Measurement> = self
            .measurements
            .iter()
            .filter(|m| m.backend.kind() == "rbd")
            .collect();
        let backends: Vec<Backend> = Backend::ALL
            .into_iter()
            .filter(|b| rows.iter().any(|m| m.backend == *b))
            .collect();
        let cpus = self.environment["cpus"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "## Ceph RBD: {}\n",
            backends
                .iter()
                .map(|b| b.describe())
                .collect::<Vec<_>>()
                .join("; ")
        );
        let _ = writeln!(
            out,
            "One private Ceph cluster started by the suite for these rows ({}; {}), each target on an image of its own ({DISK_MIB} MiB, every byte written before the first measurement, librbd's default features), librbd's cache off for all (qemu-storage-daemon with `cache.direct=on`). Each target runs pinned to CPU {BACKEND_CPU} with all its threads (librbd's too; `vfblk-rbd-cpus` pins only its poller there), the client on CPU {CLIENT_CPU}. The mon and the OSD are not pinned: {}\n",
            info["ceph"].as_str().unwrap_or("Ceph"),
            info["daemons"].as_str().unwrap_or(""),
            if cpus <= 2 {
                format!("on this {cpus}-CPU machine they cannot be kept off the target's and the client's cores, so **the OSD on the same two cores is the limit** of every figure here (the daemons' CPU per I/O is in the last columns).")
            } else {
                "they share the machine's cores with the target and the client.".to_string()
            }
        );
        let _ = writeln!(
            out,
            "Clients: `loadgen` polls (`vfblk-loadgen --polled`) and `libblkio` too (poll queues), each spinning on CPU {CLIENT_CPU}; `loadgen-irq` sleeps on interrupts like a guest's driver (`vfblk-loadgen --interrupts`), leaving that core to the cluster between completions. Cells: IOPS (p50 / p99 latency in µs). CPU: µs per I/O of the target process (all its threads) and of the mon and OSD together. OSD ms per op: the OSD's own time per op, from its arrival to the reply, per target. Other processes: the cores the rest of the machine kept busy meanwhile (its busy time less the target's, the client's and the daemons'), per target: where it is not near 0, the scheduler moved that row.\n"
        );
        // Each of ours against qemu-storage-daemon, when it ran.
        let ratios: Vec<Backend> = if backends.contains(&Backend::QsdRbd) {
            backends
                .iter()
                .copied()
                .filter(|b| *b != Backend::QsdRbd)
                .collect()
        } else {
            Vec::new()
        };
        let _ = write!(out, "| client | workload |");
        for b in &backends {
            let _ = write!(out, " {} |", b.describe());
        }
        for b in &ratios {
            let _ = write!(
                out,
                " {} |",
                if ratios.len() == 1 {
                    "ratio".to_string()
                } else {
                    format!("ratio, {}", b.id())
                }
            );
        }
        for b in &backends {
            let _ = write!(out, " target CPU, {} |", b.id());
        }
        for b in &backends {
            let _ = write!(out, " cluster CPU, {} |", b.id());
        }
        let _ = write!(out, " OSD ms per op | other processes (cores) |");
        let _ = write!(out, "\n|---|---|");
        for _ in 0..backends.len() * 3 + ratios.len() + 2 {
            let _ = write!(out, "---|");
        }
        out.push('\n');
        // A row per client and workload: the clients in table order, then the workloads
        // in the order they ran.
        let mut firsts: Vec<&Measurement> = Vec::new();
        for m in &rows {
            if !firsts
                .iter()
                .any(|f| f.client == m.client && f.workload == m.workload)
            {
                firsts.push(m);
            }
        }
        firsts.sort_by_key(|m| Client::ALL.iter().position(|c| *c == m.client));
        for m in firsts {
            let of = |b: &Backend| {
                rows.iter()
                    .find(|x| x.backend == *b && x.client == m.client && x.workload == m.workload)
            };
            let _ = write!(out, "| {} | {} |", m.client.id(), m.workload.describe());
            for b in &backends {
                let cell = match of(b).map(|x| &x.report) {
                    Some(Ok(r)) => format!(
                        "{} ({} / {})",
                        thousands(r["iops"].as_f64().unwrap_or(0.0)),
                        thousands(r["lat_p50_us"].as_f64().unwrap_or(0.0)),
                        thousands(r["lat_p99_us"].as_f64().unwrap_or(0.0))
                    ),
                    Some(Err(e)) => format!("failed: {e}"),
                    None => "—".into(),
                };
                let _ = write!(out, " {cell} |");
            }
            let iops = |b| of(&b).and_then(|x| x.iops());
            for b in &ratios {
                let ratio = match (iops(*b), iops(Backend::QsdRbd)) {
                    (Some(a), Some(q)) if q > 0.0 => format!("{:.2}×", a / q),
                    _ => "—".into(),
                };
                let _ = write!(out, " {ratio} |");
            }
            let micro = |n: Option<f64>| n.map_or("?".into(), |n| format!("{:.1}", n / 1e3));
            for b in &backends {
                let _ = write!(
                    out,
                    " {} |",
                    micro(of(b).and_then(|x| x.backend_cpu_ns_per_io))
                );
            }
            for b in &backends {
                let _ = write!(
                    out,
                    " {} |",
                    micro(of(b).and_then(|x| x.cluster_cpu_ns_per_io))
                );
            }
            let osd: Vec<String> = backends
                .iter()
                .map(|b| {
                    of(b)
                        .and_then(|x| x.osd_op_ms)
                        .map_or("?".into(), |ms| format!("{ms:.2}"))
                })
                .collect();
            let _ = write!(out, " {} |", osd.join(" / "));
            let outside: Vec<String> = backends
                .iter()
                .map(|b| {
                    of(b)
                        .and_then(|x| x.outside_cores)
                        .map_or("?".into(), |c| format!("{c:.2}"))
                })
                .collect();
            let _ = write!(out, " {} |", outside.join(" / "));
            out.push('\n');
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for b in Backend::ALL {
            assert_eq!(Backend::from_id(b.id()), Some(b));
        }
        let got = pick(
            &["vfblk-null".to_string(), "spdk-malloc".to_string()],
            &Backend::ALL,
            Backend::id,
            Backend::from_id,
            "backend",
        )
        .unwrap();
        assert_eq!(got, vec![Backend::OursNull, Backend::SpdkMalloc]);
        let err = pick(
            &["spdk".to_string()],
            &Backend::ALL,
            Backend::id,
            Backend::from_id,
            "backend",
        )
        .unwrap_err();
        assert!(err.to_string().contains("known: vfblk-null"), "{err}");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(
            WORKLOADS[6].describe(),
            "random 4 KiB read, QD32 x 4 queues"
        );
        // QD128 must fit the ring: 3 descriptors per request.
        assert!(WORKLOADS
            .iter()
            .all(|w| 3 * u32::from(w.qd) < u32::from(QUEUE_SIZE)));
    }

    #[test]
    fn ceiling_is_the_clients_best_on_a_null_backend_and_marks_bound_figures() {
        let w = WORKLOADS[1];
        let m = |backend, iops: f64| Measurement {
            backend,
            client: Client::Loadgen,
            workload: w,
            report: Ok(json!({"iops": iops, "lat_p50_us": 1.0, "lat_p99_us": 2.0})),
            backend_cpu_ns_per_io: Some(500.0),
            cluster_cpu_ns_per_io: None,
            outside_cores: None,
            osd_op_ms: None,
            backend_command: "b".into(),
            client_command: "c".into(),
        };
        let r = SuiteResult {
            fixed_rate: None,
            baseline: vec![],
            measurements: vec![
                m(Backend::OursNull, 1_000_000.0),
                m(Backend::QsdNull, 800_000.0),
                m(Backend::OursMem, 950_000.0),
                m(Backend::OursFile, 300_000.0),
                Measurement {
                    report: Err("libblkio connect: refused".into()),
                    ..m(Backend::SpdkMalloc, 0.0)
                },
            ],
            restarts: vec![RestartRun {
                backend: Backend::OursMem,
                restarts: 3,
                report: Ok(
                    json!({"reconnects": 3, "ios": 12345, "verify_errors": 0, "lost": 0, "pauses_ms": [60.0, 52.5, 71.0]}),
                ),
                client_command: "loadgen".into(),
            }],
            skipped: vec![(Backend::SpdkNull, "no --spdk given".into())],
            environment: json!({}),
            scale: Some(Ok(crate::system::target::ScaleResult {
                rows: [(1, 600.0), (4, 630.0), (16, 690.0)]
                    .into_iter()
                    .map(|(controllers, busy)| crate::system::target::ScaleRow {
                        polled: true,
                        controllers,
                        iops: 1e6,
                        busy_ns_per_io: busy,
                        cpu_ns_per_io: 800.0,
                    })
                    .collect(),
                idle_16_cpu_percent: 0.25,
                command: "target".into(),
                qd: 8,
                seconds: 5,
            })),
            nvme_lab: Some(Err("the lab guest did not boot".into())),
            rbd: None,
        };
        assert_eq!(r.ceiling(Client::Loadgen, &w), Some(1_000_000.0));
        assert_eq!(r.ceiling(Client::Blkio, &w), None);
        let j = r.to_json();
        let bound: Vec<bool> = j["measurements"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["client_bound"].as_bool().unwrap())
            .collect();
        assert_eq!(bound, vec![true, false, true, false, false]);
        let md = r.to_markdown("vfblk-bench suite");
        assert!(
            md.contains("skipped SPDK vhost null bdev: no --spdk given"),
            "{md}"
        );
        assert!(md.contains("| random 4 KiB read, QD32 | 1,000,000 † (1.0 / 2.0; 500) | 800,000 (1.0 / 2.0; 500) | 950,000 † (1.0 / 2.0; 500) | 300,000 (1.0 / 2.0; 500) | failed (1) |"), "{md}");
        assert!(md.contains("(1) libblkio connect: refused"), "{md}");
        assert!(
            md.contains(
                "| vfblk-bridge mem (RAM, 4 KiB pages) | 3 | 3 | 12,345 | 0 | 0 | 60.0 / 71.0 |"
            ),
            "{md}"
        );
        // Busy time per I/O against the one-controller row.
        assert!(
            md.contains("|  | 16 | 1,000,000 | 690 | 800 | +15.0% |"),
            "{md}"
        );
        assert!(
            md.contains("the target used **0.25 %** of one core"),
            "{md}"
        );
        assert!(
            md.contains("## The lab's NVMe path (TCG-bound)\n\nfailed: the lab guest did not boot"),
            "{md}"
        );
        let growth = j["scale"]["rows"][2]["busy_vs_one_percent"]
            .as_f64()
            .unwrap();
        assert!((growth - 15.0).abs() < 1e-9, "{j}");
        assert_eq!(j["nvme_lab"]["error"], "the lab guest did not boot", "{j}");
    }

    #[test]
    fn figures_are_compared_with_the_baseline_binarys_and_drops_flagged() {
        let m = |backend, w: Workload, iops: f64, p50: f64, command: &str| Measurement {
            backend,
            client: Client::Loadgen,
            workload: w,
            report: Ok(json!({"iops": iops, "lat_p50_us": p50, "lat_p99_us": 9.0})),
            backend_cpu_ns_per_io: None,
            cluster_cpu_ns_per_io: None,
            outside_cores: None,
            osd_op_ms: None,
            backend_command: command.into(),
            client_command: "c".into(),
        };
        let (qd1, qd32) = (WORKLOADS[0], WORKLOADS[1]);
        assert!(Backend::OursMemHuge.ours() && !Backend::SpdkNull.ours());
        let r = SuiteResult {
            measurements: vec![
                m(Backend::OursNull, qd1, 1_000_000.0, 1.00, "new"),
                m(Backend::OursNull, qd32, 9_000_000.0, 3.0, "new"),
                m(Backend::SpdkNull, qd1, 1_100_000.0, 0.9, "spdk"),
            ],
            // 2% fewer IOPS is within the tolerance; 10% more latency is not.
            baseline: vec![
                m(Backend::OursNull, qd1, 1_020_000.0, 1.00, "old"),
                m(Backend::OursNull, qd32, 9_000_000.0, 2.7, "old"),
            ],
            fixed_rate: None,
            restarts: vec![],
            skipped: vec![],
            environment: json!({}),
            scale: None,
            nvme_lab: None,
            rbd: None,
        };
        let j = r.to_json();
        let rows = j["baseline"]["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "{j}");
        assert_eq!(rows[0]["dropped"], false, "{j}");
        assert_eq!(rows[1]["dropped"], true, "{j}");
        assert_eq!(rows[1]["baseline_command"], "old", "{j}");
        let md = r.to_markdown("vfblk-bench suite --baseline old");
        assert!(
            md.contains("1 of 2 figures dropped more than 5% (IOPS down or p50 latency up): **flagged below**"),
            "{md}"
        );
        assert!(
            md.contains("| vfblk-null | loadgen | random 4 KiB read, QD1 | 1,000,000 | 1,020,000 | -2.0% | +0.0% |"),
            "{md}"
        );
        assert!(md.contains("| +0.0% | +11.1% **↓** |"), "{md}");
        // Without --baseline the section is not there.
        let r = SuiteResult {
            baseline: vec![],
            ..r
        };
        assert!(!r.to_markdown("x").contains("Against the baseline"));
    }

    #[test]
    fn rbd_rows_are_named_only_and_get_a_section_of_their_own() {
        assert!(Backend::ALL
            .iter()
            .all(|b| b.in_default() == (b.kind() != "rbd")));
        assert!(RBD_WORKLOADS
            .iter()
            .all(|id| WORKLOADS.iter().any(|w| w.id == *id)));
        let w = WORKLOADS[3]; // randwrite-4k-qd1
        let m = |backend, iops: f64, cpu: f64| Measurement {
            backend,
            client: Client::Loadgen,
            workload: w,
            report: Ok(json!({"iops": iops, "lat_p50_us": 400.0, "lat_p99_us": 900.0})),
            backend_cpu_ns_per_io: Some(cpu),
            cluster_cpu_ns_per_io: Some(150_000.0),
            outside_cores: Some(0.02),
            osd_op_ms: Some(1.5),
            backend_command: "b".into(),
            client_command: "c".into(),
        };
        let r = SuiteResult {
            fixed_rate: None,
            baseline: vec![],
            measurements: vec![
                m(Backend::OursNull, 1_000_000.0, 500.0),
                m(Backend::OursRbd, 2_000.0, 40_000.0),
                m(Backend::QsdRbd, 1_600.0, 60_000.0),
            ],
            restarts: vec![],
            skipped: vec![],
            environment: json!({"cpus": 2}),
            scale: None,
            nvme_lab: None,
            rbd: Some(Ok(
                json!({"ceph": "ceph version 16.2.15", "daemons": "one mon"}),
            )),
        };
        let md = r.to_markdown("vfblk-bench suite");
        // Not in the client's table, which keeps its own backends.
        assert!(
            md.contains("| random 4 KiB write, QD1 | 1,000,000 † (400.0 / 900.0; 500) |\n"),
            "{md}"
        );
        assert!(
            md.contains("## Ceph RBD: vfblk-bridge rbd (librbd); qemu-storage-daemon rbd (librbd)"),
            "{md}"
        );
        assert!(
            md.contains("the OSD on the same two cores is the limit"),
            "{md}"
        );
        assert!(
            md.contains("| loadgen | random 4 KiB write, QD1 | 2,000 (400 / 900) | 1,600 (400 / 900) | 1.25× | 40.0 | 60.0 | 150.0 | 150.0 | 1.50 / 1.50 | 0.02 / 0.02 |"),
            "{md}"
        );
        let j = r.to_json();
        assert_eq!(j["measurements"][1]["backend_kind"], "rbd", "{j}");
        assert_eq!(
            j["measurements"][1]["cluster_cpu_ns_per_io"], 150_000.0,
            "{j}"
        );
        assert_eq!(j["rbd"]["ceph"], "ceph version 16.2.15", "{j}");
        // With the variant that pins only its poller: a ratio for each of ours.
        let mut r = r;
        r.measurements
            .push(m(Backend::OursRbdCpus, 2_400.0, 40_000.0));
        let md = r.to_markdown("vfblk-bench suite");
        assert!(
            md.contains("| 2,000 (400 / 900) | 2,400 (400 / 900) | 1,600 (400 / 900) | 1.25× | 1.50× | 40.0 | 40.0 | 60.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| ratio, vfblk-rbd | ratio, vfblk-rbd-cpus |"),
            "{md}"
        );
    }
}
