//! A real Ceph cluster for the tests and benchmarks: one monitor and one bluestore OSD on a
//! sparse file, private to this process (its own directory under `$TMPDIR/vfblk-ceph/`, its
//! own mon port, its own keys), started and stopped without systemd and without root.
//!
//! The daemons are real (`ceph-mon`, `ceph-osd` from Debian's packages, see
//! `scripts/setup.sh`); clients reach them through [`Cluster::conf`] (`conf=` for librbd and
//! QEMU, `-c` for the CLIs), which names the keyring and the `client.admin` key (`allow *`,
//! so it may blocklist, as `rbd_blocklist_on_break_lock` does).
//!
//! Nothing outlives the test process:
//! - the daemons are spawned from one thread that lives as long as the process, with
//!   `PR_SET_PDEATHSIG` = SIGKILL, so they die with the process however it ends (a panic that
//!   aborts, a SIGKILL from a timeout);
//! - [`Cluster::stop`] stops them (SIGTERM, then SIGKILL after a deadline) and removes the
//!   directory; dropping a [`Cluster`] kills them (SIGKILL) and removes it too;
//! - [`Cluster::shared`] (one cluster per test binary, for tests that only need an image) is
//!   torn down by an `atexit` hook when the test harness exits;
//! - directories left by a process that was killed (its pid is in the name) are removed, and
//!   any process still running from them killed, when the next cluster starts.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{LabError, Result};

/// The pool every cluster has, initialised for RBD.
pub const POOL: &str = "rbd";
/// The client the keyring holds (`client.admin`, caps `allow *`).
pub const CLIENT_ID: &str = "admin";
/// Placement groups of the pool (one OSD; enough to spread ops over its shards).
const PG_NUM: u32 = 32;
/// Size of the OSD's sparse block file (only what is written is allocated).
const OSD_BLOCK_BYTES: u64 = 10 << 30;
/// Where Debian puts the object classes RBD needs (`cls_rbd`, `cls_lock`).
const RADOS_CLASSES: &str = "/usr/lib/x86_64-linux-gnu/rados-classes";

/// Deadline of one short step (key generation, mkfs, a `ceph` command).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the mon may take to become leader.
const MON_UP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the OSD may take to boot and be marked up.
const OSD_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `rbd`/`ceph` commands run by [`Cluster::rbd`] and [`Cluster::ceph`] may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a daemon may take to exit after SIGTERM before it gets SIGKILL.
const TERM_TIMEOUT: Duration = Duration::from_secs(10);
/// Mon start attempts (a port found free may be taken before the mon binds it).
const MON_ATTEMPTS: u32 = 3;

/// A private single-node Ceph cluster (one mon, one bluestore OSD) with pool [`POOL`].
pub struct Cluster {
    dir: PathBuf,
    port: u16,
    fsid: String,
    osd_uuid: String,
    conf: PathBuf,
    keyring: PathBuf,
    mon: Option<Child>,
    osd: Option<Child>,
    /// Whether the daemons are gone and the directory removed.
    stopped: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("fsid", &self.fsid)
            .field("mon", &self.mon.as_ref().map(Child::id))
            .field("osd", &self.osd.as_ref().map(Child::id))
            .finish()
    }
}

impl Cluster {
    /// Starts a private single-node cluster in its own directory with its own free mon port;
    /// returns once pool [`POOL`] exists and is initialised for RBD (about 10 s on 2 cores).
    /// Every wait has a deadline; on any failure everything started is stopped and the
    /// directory removed, and the error names the step and shows the tail of the log of the
    /// daemon concerned.
    pub fn start(name: &str) -> Result<Cluster> {
        let dir = new_dir(name)?;
        let mut cluster = Cluster {
            conf: dir.join("ceph.conf"),
            keyring: dir.join("keyring"),
            dir,
            port: 0,
            fsid: uuid(),
            osd_uuid: uuid(),
            mon: None,
            osd: None,
            stopped: false,
        };
        // On an error `cluster` is dropped here: its daemons are killed, its directory removed.
        cluster.bootstrap()?;
        Ok(cluster)
    }

    /// One cluster for the whole test binary, started on first use and torn down (daemons
    /// killed, directory removed) when the process exits. For tests that create their own
    /// images and leave the daemons alone; a test that stops the OSD starts its own cluster.
    /// A failed start is reported to every caller (it is not retried).
    pub fn shared() -> Result<&'static Cluster> {
        static SHARED: OnceLock<std::result::Result<Cluster, String>> = OnceLock::new();
        extern "C" fn tear_down() {
            if let Some(Ok(cluster)) = SHARED.get() {
                cluster.kill_by_pid();
            }
        }
        SHARED
            .get_or_init(|| {
                let cluster = Cluster::start("shared").map_err(|e| e.to_string())?;
                // SAFETY: registers a plain function without arguments; it only reads a
                // static that is initialised by then (the OnceLock has its value before any
                // exit can run the hook, as this closure returns it).
                if unsafe { libc::atexit(tear_down) } != 0 {
                    tracing::warn!("ceph: atexit failed; the shared cluster's directory stays");
                }
                Ok(cluster)
            })
            .as_ref()
            .map_err(|e| LabError::Setup(format!("the shared ceph cluster: {e}")))
    }

    /// The cluster's `ceph.conf` (`conf=` for librbd and QEMU, `-c` for the CLIs). It names
    /// the mon, the keyring and a per-process admin socket for clients.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The keyring holding `client.admin` (also named in [`Cluster::conf`]).
    pub fn keyring(&self) -> &Path {
        &self.keyring
    }

    /// The client id to connect as: `admin`.
    pub fn client_id(&self) -> &str {
        CLIENT_ID
    }

    /// The RBD pool: `rbd`.
    pub fn pool(&self) -> &str {
        POOL
    }

    /// The cluster's directory (configuration, keys, mon store, OSD block file, logs in
    /// `log/`, admin sockets in `run/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The mon's port on 127.0.0.1 (messenger v2 only).
    pub fn mon_port(&self) -> u16 {
        self.port
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> &str {
        &self.fsid
    }

    /// Pids of the running daemons (mon first, then the OSD if it runs).
    pub fn daemon_pids(&self) -> Vec<u32> {
        self.mon
            .iter()
            .chain(self.osd.iter())
            .map(Child::id)
            .collect()
    }

    /// Creates image `name` of `size_mib` MiB in [`POOL`] (default features, exclusive lock
    /// among them).
    pub fn create_image(&self, name: &str, size_mib: u64) -> Result<()> {
        self.rbd(&[
            "create",
            &self.spec(name),
            "--size",
            &format!("{size_mib}M"),
        ])
        .map(drop)
    }

    /// Removes image `name` from [`POOL`].
    pub fn remove_image(&self, name: &str) -> Result<()> {
        self.rbd(&["rm", "--no-progress", &self.spec(name)])
            .map(drop)
    }

    /// Runs the `rbd` CLI against this cluster (deadline [`CLI_TIMEOUT`]); its stdout.
    pub fn rbd(&self, args: &[&str]) -> Result<String> {
        self.rbd_timeout(args, CLI_TIMEOUT)
    }

    /// [`Cluster::rbd`] with a deadline of its own.
    pub fn rbd_timeout(&self, args: &[&str], timeout: Duration) -> Result<String> {
        self.cli("rbd", args, timeout)
    }

    /// Runs the `ceph` CLI against this cluster (deadline [`CLI_TIMEOUT`]); its stdout.
    pub fn ceph(&self, args: &[&str]) -> Result<String> {
        self.cli("ceph", args, CLI_TIMEOUT)
    }

    /// Stops the OSD (SIGTERM: it asks the mon to mark it down, so clients wait for it
    /// instead of timing out; SIGKILL after a deadline). Client I/O waits until
    /// [`Cluster::start_osd`].
    pub fn stop_osd(&mut self) -> Result<()> {
        if let Some(osd) = self.osd.take() {
            terminate("the OSD", osd, TERM_TIMEOUT)?;
        }
        Ok(())
    }

    /// Starts the OSD again (after [`Cluster::stop_osd`]) and waits until it is up.
    pub fn start_osd(&mut self) -> Result<()> {
        if self.osd.is_some() {
            return Ok(());
        }
        self.run_osd()
    }

    /// Stops the cluster: SIGTERM to the OSD then the mon, SIGKILL after a deadline, then
    /// removes the directory.
    pub fn stop(mut self) -> Result<()> {
        let osd = self
            .osd
            .take()
            .map(|osd| terminate("the OSD", osd, TERM_TIMEOUT));
        let mon = self
            .mon
            .take()
            .map(|mon| terminate("the mon", mon, TERM_TIMEOUT));
        self.stopped = true;
        let removed = std::fs::remove_dir_all(&self.dir);
        osd.transpose()?;
        mon.transpose()?;
        removed.map_err(|e| LabError::Setup(format!("removing {}: {e}", self.dir.display())))
    }

    /// `POOL/name`.
    fn spec(&self, name: &str) -> String {
        format!("{POOL}/{name}")
    }

    fn cli(&self, program: &str, args: &[&str], timeout: Duration) -> Result<String> {
        self.cli_raw(program, args, timeout)
            .map_err(LabError::Setup)
    }

    fn cli_raw(
        &self,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> std::result::Result<String, String> {
        let mut command = Command::new(program);
        command.arg("--conf").arg(&self.conf).args(args);
        run(command, timeout)
    }

    fn log(&self, daemon: &str) -> PathBuf {
        self.dir.join("log").join(format!("{daemon}.log"))
    }

    fn asok(&self, daemon: &str) -> PathBuf {
        self.dir.join("run").join(format!("{daemon}.asok"))
    }

    /// What the log of `daemon` (`mon.a`, `osd.0`) and its stderr ended with.
    fn tails(&self, daemon: &str) -> String {
        let log = self.log(daemon);
        let out = self.dir.join("log").join(format!("{daemon}.out"));
        // Without RocksDB's statistics dumps (untimestamped lines), which bury the rest.
        let log_tail = match std::fs::read(&log) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let stamped: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
                    .collect();
                last_lines(&stamped.join("\n"), 20)
            }
            Err(_) => "(missing)".into(),
        };
        format!(
            "\n--- {} (tail) ---\n{}\n--- {} (tail) ---\n{}",
            log.display(),
            log_tail,
            out.display(),
            tail(&out, 10)
        )
    }

    fn bootstrap(&mut self) -> Result<()> {
        for dir in ["run", "log", "crash", "mon.a", "osd.0"] {
            std::fs::create_dir_all(self.dir.join(dir))?;
        }
        let step = |what: &str, e: String| LabError::Setup(format!("ceph: {what}: {e}"));
        self.make_keyring().map_err(|e| step("keyring", e))?;
        self.port = free_port().map_err(|e| step("mon port", e))?;
        self.write_conf().map_err(|e| step("ceph.conf", e))?;
        // The OSD's mkfs needs no mon (--no-mon-config): run it while the mon comes up.
        let mut osd_mkfs = {
            let mut command = Command::new("ceph-osd");
            command
                .arg("--conf")
                .arg(&self.conf)
                .args(["-i", "0", "--mkfs", "--no-mon-config", "--osd-uuid"])
                .arg(&self.osd_uuid);
            start_captured(command)
        };
        // Then the mon: registering the OSD and creating the pool need no OSD either.
        let mon = self.run_mon().and_then(|()| {
            let ceph = |args: &[&str]| {
                self.cli_raw("ceph", args, STEP_TIMEOUT)
                    .map_err(|e| step(&format!("ceph {}", args.join(" ")), e))
            };
            ceph(&["osd", "new", &self.osd_uuid, "0"])?;
            let pgs = PG_NUM.to_string();
            ceph(&["osd", "pool", "create", POOL, &pgs, &pgs]).map(drop)
        });
        // Whatever happened to the mon, the mkfs must not outlive this function.
        let osd_mkfs = osd_mkfs
            .as_mut()
            .map_err(|e| e.clone())
            .and_then(|child| finish_captured(child, STEP_TIMEOUT));
        mon?;
        osd_mkfs.map_err(|e| step("OSD mkfs", format!("{e}{}", self.tails("osd.0"))))?;
        self.run_osd()?;
        self.cli_raw("rbd", &["pool", "init", POOL], STEP_TIMEOUT)
            .map_err(|e| step("rbd pool init", format!("{e}{}", self.tails("osd.0"))))?;
        Ok(())
    }

    fn make_keyring(&self) -> std::result::Result<(), String> {
        let keyring = self.keyring.as_os_str();
        let entities: [(&str, &[&str]); 3] = [
            ("mon.", &["mon", "allow *"]),
            (
                "client.admin",
                &[
                    "mon", "allow *", "osd", "allow *", "mgr", "allow *", "mds", "allow *",
                ],
            ),
            (
                "osd.0",
                &[
                    "mon",
                    "allow profile osd",
                    "osd",
                    "allow *",
                    "mgr",
                    "allow profile osd",
                ],
            ),
        ];
        for (i, (entity, caps)) in entities.into_iter().enumerate() {
            let mut command = Command::new("ceph-authtool");
            if i == 0 {
                command.arg("--create-keyring");
            }
            command.arg(keyring).args(["--gen-key", "-n", entity]);
            for cap in caps.chunks(2) {
                command.args(["--cap", cap[0], cap[1]]);
            }
            run(command, STEP_TIMEOUT)?;
        }
        Ok(())
    }

    /// Writes `ceph.conf` (atomically: the OSD's mkfs may be reading it) for `self.port`.
    fn write_conf(&self) -> std::result::Result<(), String> {
        let d = self.dir.display();
        let port = self.port;
        let conf = format!(
            "\
# A private single-node test cluster (vfblk-lab, lab/src/ceph.rs).
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {d}/keyring
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
crash dir = {d}/crash
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon data avail warn = 1
mon data avail crit = 0
mon osd down out interval = 0
mon warn on osd down out interval zero = false
auth allow insecure global id reclaim = false
# Each map change (osd new, pool create, the OSD's boot and CRUSH placement) waits this
# long for more changes to batch: 1 s by default, most of a start's time on one node.
paxos propose interval = 0.05
rbd cache = false

[mon]
mon data = {d}/mon.a
# Fail at once on a port taken since it was found free (the start picks another).
ms bind retry count = 1
ms bind retry delay = 1

[osd]
osd data = {d}/osd.0
osd objectstore = bluestore
bluestore block create = true
bluestore fsck on mkfs = false
bluestore block size = {block}
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 1073741824
# Bounded memory (OSD RSS after 1 GiB of 4 KiB writes: 1.6 GB with the defaults, 0.5 GB with
# these): RocksDB keeps up to 4 memtables of 256 MiB (small writes are deferred through it on
# a rotational disk, which a virtual disk claims to be), and each PG keeps ~9,000 log entries
# (150 MB at 32 PGs).
bluestore rocksdb options = compression=kNoCompression,max_write_buffer_number=4,min_write_buffer_number_to_merge=1,recycle_log_file_num=4,write_buffer_size=33554432,writable_file_max_buffer_size=0,compaction_readahead_size=2097152,max_background_compactions=2,max_total_wal_size=268435456
osd min pg log entries = 250
osd max pg log entries = 1000
osd class dir = {RADOS_CLASSES}

[client]
# One socket per client context: a second client (process or cluster handle) must not find
# the first one's socket (\"File exists\").
admin socket = {d}/run/$name.$pid.$cctid.asok
",
            fsid = self.fsid,
            block = OSD_BLOCK_BYTES,
        );
        let new = self.dir.join("ceph.conf.new");
        std::fs::write(&new, conf)
            .and_then(|()| std::fs::rename(&new, &self.conf))
            .map_err(|e| format!("writing ceph.conf: {e}"))
    }

    /// Makes the mon's store and starts it, waiting until it is leader; on another port if
    /// `self.port` was taken meanwhile.
    fn run_mon(&mut self) -> Result<()> {
        let step = |what: &str, e: String| LabError::Setup(format!("ceph: {what}: {e}"));
        let mut last = String::new();
        for attempt in 1..=MON_ATTEMPTS {
            if attempt > 1 {
                self.port = free_port().map_err(|e| step("mon port", e))?;
                self.write_conf().map_err(|e| step("ceph.conf", e))?;
            }
            let port = self.port;
            let monmap = self.dir.join("monmap");
            let mon_data = self.dir.join("mon.a");
            let _ = std::fs::remove_dir_all(&mon_data);
            let _ = std::fs::remove_file(&monmap);
            let mut command = Command::new("monmaptool");
            command
                .args(["--create", "--fsid", &self.fsid, "--enable-all-features"])
                .args(["--set-min-mon-release", "16", "--addv", "a"])
                .arg(format!("[v2:127.0.0.1:{port}]"))
                .arg(&monmap);
            run(command, STEP_TIMEOUT).map_err(|e| step("monmaptool", e))?;
            let mut command = Command::new("ceph-mon");
            command
                .arg("--conf")
                .arg(&self.conf)
                .args(["--mkfs", "-i", "a", "--monmap"])
                .arg(&monmap)
                .arg("--keyring")
                .arg(&self.keyring);
            run(command, STEP_TIMEOUT)
                .map_err(|e| step("mon mkfs", format!("{e}{}", self.tails("mon.a"))))?;
            let mut command = Command::new("ceph-mon");
            command
                .arg("--conf")
                .arg(&self.conf)
                .args(["-f", "-i", "a"]);
            let mon = self.spawn_daemon("mon.a", command)?;
            self.mon = Some(mon);
            let asok = self.asok("mon.a");
            match self.wait_daemon("mon.a", &asok, "mon_status", MON_UP_TIMEOUT, |v| {
                v["state"] == "leader"
            }) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let bind_failed = tail(&self.log("mon.a"), 50).contains("unable to bind");
                    if let Some(mon) = self.mon.take() {
                        kill(mon);
                    }
                    last = e;
                    if !bind_failed {
                        break;
                    }
                    tracing::info!("ceph: mon port {port} taken (attempt {attempt}), another");
                }
            }
        }
        Err(step("mon start", format!("{last}{}", self.tails("mon.a"))))
    }

    /// Starts the OSD and waits until it is up (`status` on its admin socket says active).
    fn run_osd(&mut self) -> Result<()> {
        let mut command = Command::new("ceph-osd");
        command
            .arg("--conf")
            .arg(&self.conf)
            .args(["-f", "-i", "0"]);
        let osd = self.spawn_daemon("osd.0", command)?;
        self.osd = Some(osd);
        let asok = self.asok("osd.0");
        self.wait_daemon("osd.0", &asok, "status", OSD_UP_TIMEOUT, |v| {
            v["state"] == "active"
        })
        .map_err(|e| LabError::Setup(format!("ceph: OSD start: {e}{}", self.tails("osd.0"))))
    }

    /// Spawns a daemon (stdout and stderr to `log/NAME.out`) that dies with this process.
    fn spawn_daemon(&self, name: &str, mut command: Command) -> Result<Child> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log").join(format!("{name}.out")))?;
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        spawn_with_parent_death(command)
            .map_err(|e| LabError::Setup(format!("ceph: starting {name}: {e}")))
    }

    /// Polls `command` on the daemon's admin socket until `ready` holds, the daemon exits, or
    /// `timeout` passes.
    fn wait_daemon(
        &mut self,
        name: &str,
        asok: &Path,
        command: &str,
        timeout: Duration,
        ready: impl Fn(&Value) -> bool,
    ) -> std::result::Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no admin socket yet");
        loop {
            let child = if name.starts_with("mon") {
                self.mon.as_mut()
            } else {
                self.osd.as_mut()
            };
            if let Some(child) = child {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("{name} exited with {status}"));
                }
            }
            if asok.exists() {
                match admin_socket(asok, command) {
                    Ok(v) if ready(&v) => return Ok(()),
                    Ok(v) => last = v.to_string(),
                    Err(e) => last = e,
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name} not ready within {timeout:?} (last: {last})"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the daemons by pid and removes the directory, through `&self` (the shared
    /// cluster's exit hook). Waits for them so nothing writes into the directory after.
    fn kill_by_pid(&self) {
        for pid in self.daemon_pids() {
            let pid = pid as libc::pid_t;
            // SAFETY: signals and reaps our own child; no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        for child in [self.osd.take(), self.mon.take()].into_iter().flatten() {
            kill(child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Pids of the processes whose command line names something under `dir` (a cluster's
/// daemons and clients pass `--conf DIR/ceph.conf`).
pub fn processes_under(dir: &Path) -> Vec<u32> {
    let wanted = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                cmdline
                    .split(|&b| b == 0)
                    .any(|arg| arg.starts_with(wanted))
            })
        })
        .collect()
}

/// Where clusters live: `$TMPDIR/vfblk-ceph` (short, for the admin sockets' path limit).
fn base_dir() -> PathBuf {
    std::env::temp_dir().join("vfblk-ceph")
}

/// A fresh directory `NAME-PID-SEQ`; first removes those of processes that are gone (and
/// kills what still runs from them).
fn new_dir(name: &str) -> Result<PathBuf> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let base = base_dir();
    std::fs::create_dir_all(&base)?;
    remove_stale();
    let name: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(16)
        .collect();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = base.join(format!("{name}-{}-{seq}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Removes the cluster directories of processes that are gone, first killing whatever still
/// runs from them (their daemons die with their process, so normally nothing). Every
/// [`Cluster::start`] does this.
pub fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(base_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.rsplit('-').nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        for stray in processes_under(&dir) {
            tracing::warn!("ceph: killing pid {stray}, left from {}", dir.display());
            // SAFETY: a signal to a process that runs from a dead test's cluster directory.
            unsafe { libc::kill(stray as libc::pid_t, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A port on 127.0.0.1 that binds now, below the ephemeral range (so no outgoing connection
/// takes it before the mon binds it), from a start that differs per process and call.
fn free_port() -> std::result::Result<u16, String> {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let low = 10_000u32;
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|&h| h > low + 1000)
        .unwrap_or(32_768);
    let span = high - low;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919))
        .wrapping_add(nanos);
    for i in 0..span {
        let port = (low + (seed.wrapping_add(i * 97)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(format!("no free port in {low}..{high}"))
}

/// A random UUID (version 4).
fn uuid() -> String {
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (nanos ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Sends `command` to a Ceph admin socket: the JSON request ends with a NUL; the answer is a
/// 4-byte big-endian length and that many bytes.
fn admin_socket(path: &Path, command: &str) -> std::result::Result<Value, String> {
    let io = |e: std::io::Error| format!("admin socket {}: {e}", path.display());
    let mut stream = UnixStream::connect(path).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(io)?;
    stream
        .write_all(format!("{{\"prefix\": \"{command}\"}}\0").as_bytes())
        .map_err(io)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(io)?;
    let mut answer = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut answer).map_err(io)?;
    serde_json::from_slice(&answer).map_err(|e| format!("{command}: {e}"))
}

/// A request to the spawner thread.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `command` so that it gets SIGKILL when this process ends. The parent-death signal
/// fires when the *thread* that forked exits, so every daemon is forked by one thread that
/// lives as long as the process (a test's thread ends with its test; a shared cluster must
/// outlive it).
fn spawn_with_parent_death(mut command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec only prctl and getppid run (async-signal-safe). If this
    // process died before the prctl, the parent is already another one: give up.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent gone"));
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("ceph-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawning the ceph spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((command, tx))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// SIGTERM, then SIGKILL if `child` has not exited within `timeout`.
fn terminate(what: &str, mut child: Child, timeout: Duration) -> Result<()> {
    // SAFETY: a signal to our own child, not reaped yet (we hold its Child).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait()? {
            Some(_) => return Ok(()),
            None if Instant::now() > deadline => {
                tracing::warn!("ceph: {what} ignored SIGTERM for {timeout:?}: SIGKILL");
                kill(child);
                return Ok(());
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A child whose stdout and stderr are collected by two threads.
struct Captured {
    child: Child,
    line: String,
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
}

fn start_captured(mut command: Command) -> std::result::Result<Captured, String> {
    let line = command_line(&command);
    // SAFETY: only prctl between fork and exec (async-signal-safe): a CLI dies with the
    // thread that waits for it.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{line}: {e}"))?;
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped")));
    let err = reader(Box::new(child.stderr.take().expect("piped")));
    Ok(Captured {
        child,
        line,
        out,
        err,
    })
}

/// Waits for a [`Captured`] child until `timeout` (then kills it); its stdout if it exited 0.
fn finish_captured(c: &mut Captured, timeout: Duration) -> std::result::Result<String, String> {
    let deadline = Instant::now() + timeout;
    let status = loop {
        match c.child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() > deadline => {
                let _ = c.child.kill();
                let _ = c.child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("{}: {e}", c.line)),
        }
    };
    let take = |h: &mut std::thread::JoinHandle<Vec<u8>>| {
        let h = std::mem::replace(h, std::thread::spawn(Vec::new));
        String::from_utf8_lossy(&h.join().unwrap_or_default()).into_owned()
    };
    let out = take(&mut c.out);
    let err = take(&mut c.err);
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(format!(
            "{} exited with {s}: {}",
            c.line,
            last_lines(&err, 15)
        )),
        None => Err(format!(
            "{} did not finish within {timeout:?}: {}",
            c.line,
            last_lines(&err, 15)
        )),
    }
}

/// Runs `command` with a deadline; its stdout, or an error with the command line, the status
/// and the end of its stderr.
fn run(command: Command, timeout: Duration) -> std::result::Result<String, String> {
    let mut captured = start_captured(command)?;
    finish_captured(&mut captured, timeout)
}

fn command_line(command: &Command) -> String {
    let mut parts: Vec<OsString> = vec![command.get_program().to_owned()];
    parts.extend(command.get_args().map(|a| a.to_owned()));
    parts
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `n` lines of a file ("(missing)" if it cannot be read).
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => last_lines(&String::from_utf8_lossy(&bytes), n),
        Err(_) => "(missing)".into(),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let mut lines: VecDeque<&str> = VecDeque::with_capacity(n + 1);
    for line in text.lines() {
        if lines.len() == n {
            lines.pop_front();
        }
        lines.push_back(line);
    }
    lines.into_iter().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4() {
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, uuid());
    }

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
    }

    #[test]
    fn free_ports_bind_and_stay_below_the_ephemeral_range() {
        let port = free_port().unwrap();
        assert!(port >= 10_000, "{port}");
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
