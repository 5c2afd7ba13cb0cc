//! Upgrades by hand-over: a new target process takes over from this one without any
//! vhost-user connection closing. The old process starts the new binary with the same
//! command line and one end of a hand-over channel (`--takeover-fd`); the new one builds its
//! pollers, says which state formats it reads, and waits. Only then does the old one
//! quiesce (each controller's queues stop once their requests are complete and published)
//! and send its state: the configuration, every listening and connected socket, guest
//! memory, vrings, kick/call and inflight fds. The new process maps it all and answers
//! `ready`; the old one lets go of everything and answers `go`, after which only the new
//! process touches the rings. Until `go`, any failure (the new binary does not start, reads
//! another format, cannot map the memory, dies, or is late) resumes the old process as if
//! nothing happened. See docs/recovery.md.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vfblk_vhost::handover::{Channel, Fds, ServerState, STEP_DEADLINE};
use vfblk_vhost::server::SocketServer;

use crate::{Error, Result};
use crate::{Target, TargetConfig, UnservedEntries};

/// The state format this binary writes and reads. Raise it whenever the steps,
/// [`TargetState`] or the vhost plumbing's state change meaning. 2: the configuration goes
/// first and the new process opens the backends before the old one quiesces.
pub const FORMAT: u32 = 2;

/// The option that hands the channel to the new process.
pub const TAKEOVER_OPTION: &str = "--takeover-fd";

/// How long the new binary may take to start and say hello.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// One step of the exchange.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
enum Step {
    /// New to old, once its pollers run: the formats it reads, and the versions of the
    /// NVMe queue record it adopts queues from (none: an older binary, which brings the
    /// controllers up itself).
    Hello {
        formats: Vec<u32>,
        pid: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        nvme_queues: Vec<u32>,
    },
    /// Old to new, still serving: the configuration, so that the backends are opened (files
    /// probed, controllers brought up) before anything pauses.
    Config(Box<TargetConfig>),
    /// New to old: the backends are open.
    Prepared,
    /// Old to new: the connections, after quiescing.
    State(Box<TargetState>),
    /// New to old: mapped and checked, nothing started; how it took each NVMe controller
    /// (the old process keeps the DMA memory of those whose queues were adopted mapped).
    Ready {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        nvme: Vec<vfblk_bridge::backend::TakenController>,
    },
    /// Old to new: let go; the rings are yours.
    Go,
    /// New to old: serving.
    Started,
    /// Either way: the hand-over is off, and why.
    Failed { why: String },
}

/// The whole target's state (its configuration went ahead in [`Step::Config`]).
#[derive(Debug, Serialize, Deserialize)]
struct TargetState {
    format: u32,
    controllers: Vec<ControllerState>,
    /// The RPC and metrics listeners (fd indexes).
    rpc: Option<u32>,
    metrics: Option<u32>,
    /// NVMe controllers lent to the new process (disabled, nothing in flight).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    nvme: Vec<LentNvme>,
    /// Configured entries this process could not serve: the successor keeps them (and
    /// writes them back to the config file) as this one did.
    #[serde(default, skip_serializing_if = "UnservedEntries::is_empty")]
    unserved: UnservedEntries,
    /// Entries whose config file version differs from what runs (the file keeps its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    file_wins: Vec<(crate::Section, String)>,
}

/// An NVMe controller lent to the new process: the VFIO fds it adopts, and what of the
/// shared IOMMU domain the old process still has mapped (the new one maps beside it).
#[derive(Debug, Serialize, Deserialize)]
struct LentNvme {
    #[serde(with = "vfblk_bridge::spec::pci_string")]
    address: vfblk_nvme::pci::PciAddress,
    /// Fd indexes: the VFIO container and device.
    container: u32,
    device: u32,
    layout: vfblk_nvme::vfio::RegionLayout,
    /// The old process's driver IOVAs are the upper half.
    upper_iova_half: bool,
    /// The IOVA windows holding the old process's guest RAM mappings, and what is mapped:
    /// the new process takes them over as they are.
    windows: Vec<vfblk_bridge::backend::LentWindow>,
    /// The controller left enabled with its queues, for the new process to adopt (it said
    /// it reads this record's version); absent: disabled, to be brought up again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queues: Option<vfblk_nvme::controller::ControllerRecord>,
    /// Fd indexes of the DMA arenas' memfds, in the record's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    arenas: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ControllerState {
    name: String,
    /// The config space's writeback field as the driver left it.
    writeback: bool,
    server: ServerState,
}

/// What an upgrade did, for the RPC's answer.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeReport {
    /// This (old) process.
    pub old_pid: u32,
    /// The process serving now.
    pub new_pid: u32,
    /// The binary it runs.
    pub binary: PathBuf,
    /// Controllers handed over.
    pub controllers: usize,
    /// Of them, with a frontend connected.
    pub connections: usize,
    /// From the first queue stopping here to the new process serving, in milliseconds.
    pub pause_ms: f64,
    /// From starting the new binary to its hello, in milliseconds.
    pub start_ms: f64,
    /// Of the pause: quiescing the controllers here, in milliseconds.
    pub quiesce_ms: f64,
    /// Of the pause: sending the state until the new process was ready (it opened the
    /// backends and mapped the memory), in milliseconds.
    pub prepare_ms: f64,
    /// How the new process took each NVMe controller: its queues adopted as they were, or
    /// the controller brought up again (and why).
    pub nvme: Vec<vfblk_bridge::backend::TakenController>,
}

/// Listeners the new process got from the old.
#[derive(Debug, Default)]
pub struct InheritedListeners {
    /// The RPC socket.
    pub rpc: Option<OwnedFd>,
    /// The metrics socket.
    pub metrics: Option<OwnedFd>,
}

fn failed(why: impl Into<String>) -> Error {
    Error::Upgrade(why.into())
}

/// The formats a new process reads: [`FORMAT`], or in a test build (feature `test-delay`)
/// the list in `VFBLK_TEST_HANDOVER_FORMATS` (comma-separated), to test the refusal.
fn formats_read() -> Vec<u32> {
    #[cfg(feature = "test-delay")]
    if let Ok(list) = std::env::var("VFBLK_TEST_HANDOVER_FORMATS") {
        return list
            .split(',')
            .filter_map(|f| f.trim().parse().ok())
            .collect();
    }
    vec![FORMAT]
}

/// The NVMe queue record versions a new process adopts: the driver's, or in a test build
/// the list in `VFBLK_TEST_NVME_QUEUE_VERSIONS` (comma-separated; empty: none, as an older
/// binary), to test the fallback.
fn nvme_queue_versions() -> Vec<u32> {
    #[cfg(feature = "test-delay")]
    if let Ok(list) = std::env::var("VFBLK_TEST_NVME_QUEUE_VERSIONS") {
        return list
            .split(',')
            .filter_map(|f| f.trim().parse().ok())
            .collect();
    }
    vec![vfblk_nvme::controller::QUEUE_HANDOVER_VERSION]
}

/// In a test build, `VFBLK_TEST_HANDOVER_FAULT=adopt` makes the new process's adoption of
/// NVMe queues fail after everything was adopted (memory mapped, queue pairs built), so
/// that it falls back to bringing the controller up.
fn injected_adopt_fault() -> vfblk_bridge::Result<()> {
    #[cfg(feature = "test-delay")]
    if std::env::var("VFBLK_TEST_HANDOVER_FAULT").as_deref() == Ok("adopt") {
        return Err(vfblk_bridge::Error::BadArgument(
            "adoption failed by VFBLK_TEST_HANDOVER_FAULT".into(),
        ));
    }
    Ok(())
}

/// In a test build (feature `test-delay`), `VFBLK_TEST_HANDOVER_FAULT` makes the new
/// process fail once the state arrived, after the old one quiesced: `refuse` answers with
/// a failure, `die` aborts without a word. Either must leave the old process serving.
fn injected_fault() -> Result<()> {
    #[cfg(feature = "test-delay")]
    match std::env::var("VFBLK_TEST_HANDOVER_FAULT").as_deref() {
        Ok("refuse") => return Err(failed("refused by VFBLK_TEST_HANDOVER_FAULT")),
        Ok("die") => std::process::abort(),
        _ => {}
    }
    Ok(())
}

/// The binary to start when none is named: the one this process runs, by the path it was
/// started from (after a package upgrade the link names the replaced file, "(deleted)").
fn this_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        what: "finding this process's binary".into(),
        source,
    })?;
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(p) => PathBuf::from(p),
        None => exe,
    })
}

/// This process's arguments without a previous take-over fd.
fn arguments() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    while let Some(i) = args.iter().position(|a| a == TAKEOVER_OPTION) {
        args.drain(i..(i + 2).min(args.len()));
    }
    args
}

impl Target {
    /// Registers a listener the process serves besides the controllers (RPC, metrics), so
    /// that an upgrade hands it over.
    pub fn register_listener(&mut self, kind: ListenerKind, fd: OwnedFd) {
        if let Some(store) = &self.store {
            // Kept across a crash too: clients queue while the successor starts. Removed
            // first: a successor that got it from the store registers it again.
            let name = kind.stored_name();
            if let Err(e) = store.remove(name).and_then(|()| store.store(name, &fd)) {
                tracing::warn!("fd store: {}", vfblk_vhost::error_chain(&e));
            }
        }
        match kind {
            ListenerKind::Rpc => self.rpc_listener = Some(fd),
            ListenerKind::Metrics => self.metrics_listener = Some(fd),
        }
    }

    /// Whether this process has handed everything over and only waits to exit.
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }

    /// Hands this target over to a new process running `binary` (default: this binary)
    /// with this process's command line. On success this process serves nothing any more
    /// and should exit; on failure it serves on as before.
    pub fn upgrade(&mut self, binary: Option<&Path>) -> Result<UpgradeReport> {
        let result = self.hand_over(binary);
        if let Err(e) = &result {
            tracing::warn!(
                "upgrade called off, serving on: {}",
                vfblk_vhost::error_chain(e)
            );
        }
        result
    }

    fn hand_over(&mut self, binary: Option<&Path>) -> Result<UpgradeReport> {
        if self.handed_over {
            return Err(failed("this process has handed over already"));
        }
        // What is served goes ahead; entries kept unserved come with the state.
        let config = self.served_config();
        let binary = match binary {
            Some(b) => b.to_path_buf(),
            None => this_binary()?,
        };
        let (ours, theirs) = Channel::pair()?;
        let started = Instant::now();
        let mut child = spawn(&binary, &theirs)?;
        drop(theirs);
        let kill = |child: &mut std::process::Child| {
            let _ = child.kill();
            let _ = child.wait();
        };
        let hello = ours.recv::<Step>(started + START_DEADLINE, "hello from the new process");
        let (formats, new_pid, nvme_queues) = match hello {
            Ok((
                Step::Hello {
                    formats,
                    pid,
                    nvme_queues,
                },
                _,
            )) => (formats, pid, nvme_queues),
            Ok((other, _)) => {
                kill(&mut child);
                return Err(failed(format!("the new process began with {other:?}")));
            }
            Err(e) => {
                let status = match child.try_wait() {
                    Ok(Some(s)) => format!(" (it exited: {s})"),
                    _ => String::new(),
                };
                kill(&mut child);
                return Err(failed(format!(
                    "{} did not start{status}: {}",
                    binary.display(),
                    vfblk_vhost::error_chain(&e)
                )));
            }
        };
        let start_ms = started.elapsed().as_secs_f64() * 1e3;
        if !formats.contains(&FORMAT) {
            let why = format!(
                "{} reads hand-over formats {formats:?}, this process writes {FORMAT}",
                binary.display()
            );
            let _ = ours.send(
                &Step::Failed { why: why.clone() },
                &Fds::default(),
                Instant::now() + STEP_DEADLINE,
            );
            kill(&mut child);
            return Err(failed(why));
        }
        // The new process opens the backends while this one still serves.
        let prepared = exchange(
            &ours,
            Step::Config(Box::new(config)),
            &Fds::default(),
            START_DEADLINE,
            "the backends opened",
            |s| matches!(s, Step::Prepared),
        )
        .map(drop);
        if let Err(why) = prepared {
            kill(&mut child);
            return Err(failed(why));
        }
        // Quiesce, and collect what the new process needs.
        let quiesced = Instant::now();
        let mut message_fds = Fds::default();
        let mut suspended = Vec::new();
        let mut controllers = Vec::new();
        let mut trouble = None;
        for (name, c) in &self.controllers {
            match c.server.suspend() {
                Ok(mut s) => {
                    let mut server = s.state.clone();
                    server.offset_fds(message_fds.append(std::mem::take(&mut s.fds)));
                    controllers.push(ControllerState {
                        name: name.clone(),
                        writeback: c.device.writeback(),
                        server,
                    });
                    suspended.push(s);
                }
                Err(e) => {
                    trouble = Some(format!(
                        "controller {name} could not be quiesced: {}",
                        vfblk_vhost::error_chain(&e)
                    ));
                    break;
                }
            }
        }
        // Failing here must still resume the servers suspended above: no early return.
        let listener = |f: &Option<OwnedFd>, fds: &mut Fds| {
            f.as_ref()
                .map(|f| fds.add(f))
                .transpose()
                .map_err(|e| vfblk_vhost::error_chain(&e))
        };
        let rpc = listener(&self.rpc_listener, &mut message_fds);
        let metrics = listener(&self.metrics_listener, &mut message_fds);
        // NVMe controllers last: with every queue quiesced nothing is in flight on them.
        let nvme = match &trouble {
            Some(_) => Ok(Vec::new()),
            None => self
                .nvme
                .lend_all(nvme_queues.contains(&vfblk_nvme::controller::QUEUE_HANDOVER_VERSION))
                .map(|lent| {
                    lent.into_iter()
                        .map(|l| {
                            let (queues, arenas) = match l.queues {
                                Some((record, memfds)) => (
                                    Some(record),
                                    memfds.into_iter().map(|fd| message_fds.push(fd)).collect(),
                                ),
                                None => (None, Vec::new()),
                            };
                            LentNvme {
                                address: l.address,
                                container: message_fds.push(l.lending.vfio.container),
                                device: message_fds.push(l.lending.vfio.device),
                                layout: l.lending.vfio.layout,
                                upper_iova_half: l.lending.upper_iova_half,
                                windows: l.windows,
                                queues,
                                arenas,
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .map_err(|e| vfblk_vhost::error_chain(&e)),
        };
        let quiesce_ms = quiesced.elapsed().as_secs_f64() * 1e3;
        let handed = controllers.len();
        let connections = controllers
            .iter()
            .filter(|c| c.server.connection.is_some())
            .count();
        let outcome = match (trouble, rpc, metrics, nvme) {
            (Some(why), ..) | (None, Err(why), ..) | (None, _, Err(why), _) => Err(why),
            (None, _, _, Err(why)) => Err(why),
            (None, Ok(rpc), Ok(metrics), Ok(nvme)) => exchange(
                &ours,
                Step::State(Box::new(TargetState {
                    format: FORMAT,
                    controllers,
                    rpc,
                    metrics,
                    nvme,
                    unserved: self.unserved.clone(),
                    file_wins: self.file_edits.file_wins.iter().cloned().collect(),
                })),
                &message_fds,
                STEP_DEADLINE,
                "ready from the new process",
                |s| matches!(s, Step::Ready { .. }),
            )
            .map(|answer| match answer {
                Step::Ready { nvme } => nvme,
                _ => Vec::new(),
            }),
        };
        drop(message_fds);
        let prepare_ms = quiesced.elapsed().as_secs_f64() * 1e3 - quiesce_ms;
        let taken = match outcome {
            Ok(taken) => taken,
            Err(why) => {
                // The new process is gone before the controllers it may have touched are
                // taken back, and those before the queues run again.
                kill(&mut child);
                self.nvme.reclaim_all();
                for s in suspended {
                    s.resume();
                }
                return Err(failed(why));
            }
        };
        // The point of no return: the servers end without touching anything, then the new
        // process may start the rings.
        for s in suspended {
            s.let_go();
        }
        for (_, c) in std::mem::take(&mut self.controllers) {
            c.server.forget();
        }
        self.handed_over = true;
        let go = ours.send(&Step::Go, &Fds::default(), Instant::now() + STEP_DEADLINE);
        let serving = go.and_then(|_| {
            ours.recv::<Step>(Instant::now() + STEP_DEADLINE, "the new process serving")
        });
        let pause_ms = quiesced.elapsed().as_secs_f64() * 1e3;
        match serving {
            Ok((Step::Started, _)) => {}
            Ok((other, _)) => tracing::warn!("the new process answered go with {other:?}"),
            Err(e) => tracing::error!(
                "the new process did not confirm it serves: {}; its connections are its own now",
                vfblk_vhost::error_chain(&e)
            ),
        }
        // The new process outlives this one; nobody here waits for it.
        std::mem::forget(child);
        // The memory of controllers whose queues the new process adopted is its own now.
        let adopted: Vec<_> = taken
            .iter()
            .filter(|t| t.queues_adopted)
            .map(|t| t.address)
            .collect();
        let released = self.nvme.release_all(&adopted);
        for t in &taken {
            match &t.why_not {
                None => tracing::info!(
                    "{}: the new process adopted its queues (controller kept enabled)",
                    t.address
                ),
                Some(why) => tracing::info!(
                    "{}: the new process brought the controller up again: {why}",
                    t.address
                ),
            }
        }
        if released > 0 {
            tracing::info!(
                "{} MiB of NVMe DMA mappings released to the new process's container",
                released >> 20
            );
        }
        tracing::info!(
            "handed over to {} (pid {new_pid}): {handed} controller(s), {connections} connected, paused {pause_ms:.2} ms",
            binary.display(),
        );
        Ok(UpgradeReport {
            old_pid: std::process::id(),
            new_pid,
            binary,
            controllers: handed,
            connections,
            pause_ms,
            start_ms,
            quiesce_ms,
            prepare_ms,
            nvme: taken,
        })
    }
}

/// Sends `step` and waits (up to `within`) for the answer `wanted` accepts; a refusal, any
/// other answer or silence is the reason the hand-over is off.
fn exchange(
    channel: &Channel,
    step: Step,
    fds: &Fds,
    within: Duration,
    what: &'static str,
    wanted: fn(&Step) -> bool,
) -> std::result::Result<Step, String> {
    let chain = |e: vfblk_vhost::Error| vfblk_vhost::error_chain(&e);
    channel
        .send(&step, fds, Instant::now() + STEP_DEADLINE)
        .map_err(chain)?;
    match channel.recv::<Step>(Instant::now() + within, what) {
        Ok((answer, _)) if wanted(&answer) => Ok(answer),
        Ok((Step::Failed { why }, _)) => Err(format!("the new process refused: {why}")),
        Ok((other, _)) => Err(format!("the new process answered {other:?}")),
        Err(e) => Err(chain(e)),
    }
}

/// The new process's next step from the old one (a refusal is an error).
fn receive(channel: &Channel, within: Duration, what: &'static str) -> Result<(Step, Fds)> {
    match channel.recv::<Step>(Instant::now() + within, what)? {
        (Step::Failed { why }, _) => Err(failed(format!("the old process called it off: {why}"))),
        other => Ok(other),
    }
}

/// Starts `binary` with this process's arguments and the channel's other end.
fn spawn(binary: &Path, theirs: &Channel) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let fd = theirs.as_raw_fd();
    let mut command = std::process::Command::new(binary);
    command
        .args(arguments())
        .arg(TAKEOVER_OPTION)
        .arg(fd.to_string())
        // systemd's WATCHDOG_PID names the process it started; the successor pings for the
        // service with its own pid (it says MAINPID=), so the old pid must not turn its
        // watchdog off.
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec only fcntl runs (async-signal-safe): the channel's end
    // must survive the exec in the child.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().map_err(|source| Error::Io {
        what: format!("starting {}", binary.display()),
        source,
    })
}

/// Which extra listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// The JSON-RPC socket.
    Rpc,
    /// The metrics endpoint.
    Metrics,
}

impl ListenerKind {
    /// Its name in an fd store (no controller name can start with `@`).
    pub fn stored_name(self) -> &'static str {
        match self {
            ListenerKind::Rpc => "@rpc",
            ListenerKind::Metrics => "@metrics",
        }
    }
}

/// The new process's side: takes over from the process at the other end of `fd`. `target`
/// has its pollers and nothing else. Returns the listeners to serve RPC and metrics on.
pub fn take_over(target: &mut Target, fd: i32) -> Result<InheritedListeners> {
    let channel = Channel::inherited(fd)?;
    channel.send(
        &Step::Hello {
            formats: formats_read(),
            pid: std::process::id(),
            nvme_queues: nvme_queue_versions(),
        },
        &Fds::default(),
        Instant::now() + STEP_DEADLINE,
    )?;
    let config = match receive(&channel, STEP_DEADLINE * 3, "the configuration")? {
        (Step::Config(c), _) => c,
        (other, _) => return Err(failed(format!("expected the configuration, got {other:?}"))),
    };
    let refuse = |e: Error| {
        let why = vfblk_vhost::error_chain(&e);
        let _ = channel.send(
            &Step::Failed { why: why.clone() },
            &Fds::default(),
            Instant::now() + STEP_DEADLINE,
        );
        failed(why)
    };
    open_backends(target, &config).map_err(refuse)?;
    channel.send(
        &Step::Prepared,
        &Fds::default(),
        Instant::now() + STEP_DEADLINE,
    )?;
    let (state, mut fds) = match receive(&channel, STEP_DEADLINE * 3, "the state")? {
        (Step::State(s), fds) => (s, fds),
        (other, _) => return Err(failed(format!("expected the state, got {other:?}"))),
    };
    let (servers, listeners, nvme) = prepare(target, &config, &state, &mut fds)
        .and_then(|p| injected_fault().map(|()| p))
        .map_err(refuse)?;
    channel.send(
        &Step::Ready { nvme },
        &Fds::default(),
        Instant::now() + STEP_DEADLINE,
    )?;
    match receive(&channel, STEP_DEADLINE * 2, "go")? {
        (Step::Go, _) => {}
        (other, _) => return Err(failed(format!("expected go, got {other:?}"))),
    }
    target.nvme.lender_gone();
    target.adopt_unserved(state.unserved.clone());
    target
        .file_edits
        .file_wins
        .extend(state.file_wins.iter().cloned());
    for (config, device, taken) in servers {
        let server = taken.serve()?;
        target.add_controller(config, device, server);
    }
    // The service manager (systemd, vfblk-keeper) must know the new main process before the
    // old one exits, which it does once it reads `started`.
    let late_mainpid = injected_late_mainpid();
    if !late_mainpid {
        crate::notify(&format!("MAINPID={}", std::process::id()));
    }
    // And a supervisor that follows the pid file: it names this process before the old one
    // is gone.
    if let Some(path) = &target.settings.pid_file {
        if let Err(e) = crate::write_pid_file(path) {
            tracing::warn!("{}", vfblk_vhost::error_chain(&e));
        }
    }
    channel.send(
        &Step::Started,
        &Fds::default(),
        Instant::now() + STEP_DEADLINE,
    )?;
    tracing::info!(
        "took over {} controller(s) from the previous process",
        target.controllers.len()
    );
    if late_mainpid {
        send_mainpid_after_the_old_process_exited();
    }
    Ok(listeners)
}

/// In a test build (feature `test-delay`), `VFBLK_TEST_HANDOVER_FAULT=late-mainpid` keeps
/// the new process's `MAINPID=` from reaching the service manager before the old process
/// exits, as a datagram lost or late would: the keeper must not take the old process's exit
/// for the end of the service.
fn injected_late_mainpid() -> bool {
    #[cfg(feature = "test-delay")]
    if std::env::var("VFBLK_TEST_HANDOVER_FAULT").as_deref() == Ok("late-mainpid") {
        return true;
    }
    false
}

/// The late `MAINPID=` of [`injected_late_mainpid`]: 300 ms after the old process (the
/// parent) is gone, bounded by 10 s.
fn send_mainpid_after_the_old_process_exited() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: as above.
    while unsafe { libc::getppid() } == parent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(300));
    tracing::info!("test fault: MAINPID= only now, after the old process exited");
    crate::notify(&format!("MAINPID={}", std::process::id()));
}

type Prepared = (
    Vec<(
        crate::ControllerConfig,
        std::sync::Arc<vfblk_bridge::device::BlkDevice>,
        vfblk_vhost::server::TakenOver,
    )>,
    InheritedListeners,
    Vec<vfblk_bridge::backend::TakenController>,
);

fn is_nvme(b: &crate::BackendConfig) -> bool {
    matches!(b.spec, vfblk_bridge::spec::BackendSpec::Nvme { .. })
}

/// The configuration's RBD clusters connected and backends opened (before the old process
/// quiesces), except backends on NVMe controllers: the old process still drives them, they
/// come with the state.
fn open_backends(target: &mut Target, config: &TargetConfig) -> Result<()> {
    for c in &config.rbd_clusters {
        target.register_rbd_cluster(c.clone())?;
    }
    for b in config.backends.iter().filter(|b| !is_nvme(b)) {
        target.create_backend(&b.name, b.spec.clone())?;
    }
    Ok(())
}

/// The NVMe controllers the old process lent taken over — their queues adopted when they
/// came along and adoption works, else brought up — and the backends on them opened.
fn adopt_nvme(
    target: &mut Target,
    config: &TargetConfig,
    state: &TargetState,
    fds: &mut Fds,
) -> Result<Vec<vfblk_bridge::backend::TakenController>> {
    let io_queues = target.nvme_io_queues();
    let mut taken = Vec::new();
    for lent in &state.nvme {
        let vfio = vfblk_nvme::vfio::SharedVfio {
            container: fds.take(lent.container)?,
            device: fds.take(lent.device)?,
            layout: lent.layout,
        };
        let queues = match &lent.queues {
            Some(record) => Some((
                record,
                lent.arenas
                    .iter()
                    .map(|&i| fds.take(i))
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            )),
            None => None,
        };
        let options = target.settings.nvme.clone();
        taken.push(target.nvme.take_over(
            lent.address,
            vfio,
            lent.upper_iova_half,
            &lent.windows,
            queues,
            io_queues,
            &options,
            Some(&injected_adopt_fault),
        )?);
    }
    for n in &config.nvme {
        target.attach_nvme(&n.name, n.address)?;
    }
    for b in config.backends.iter().filter(|b| is_nvme(b)) {
        target.create_backend(&b.name, b.spec.clone())?;
    }
    Ok(taken)
}

/// Everything of the state mapped, nothing started.
fn prepare(
    target: &mut Target,
    config: &TargetConfig,
    state: &TargetState,
    fds: &mut Fds,
) -> Result<Prepared> {
    if state.format != FORMAT {
        return Err(failed(format!(
            "state format {}, this binary reads {FORMAT}",
            state.format
        )));
    }
    let nvme = adopt_nvme(target, config, state, fds)?;
    let mut servers = Vec::new();
    for c in &config.controllers {
        let handed = state
            .controllers
            .iter()
            .find(|h| h.name == c.name)
            .ok_or_else(|| failed(format!("controller {} came without its state", c.name)))?;
        let (device, device_config) = target.controller_device(c)?;
        device.set_writeback(handed.writeback);
        let taken = SocketServer::take_over(&c.socket, device_config, &handed.server, fds)?;
        servers.push((c.clone(), device, taken));
    }
    let listeners = InheritedListeners {
        rpc: state.rpc.map(|i| fds.take(i)).transpose()?,
        metrics: state.metrics.map(|i| fds.take(i)).transpose()?,
    };
    Ok((servers, listeners, nvme))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_of_a_binary_without_nvme_queue_hand_over_still_read() {
        // What an older binary sends, and what this one sends when no queues travel.
        let ready: Step = serde_json::from_str(r#"{"step":"ready"}"#).unwrap();
        assert!(matches!(ready, Step::Ready { ref nvme } if nvme.is_empty()));
        assert_eq!(
            serde_json::to_string(&Step::Ready { nvme: Vec::new() }).unwrap(),
            r#"{"step":"ready"}"#
        );
        let hello: Step =
            serde_json::from_str(r#"{"step":"hello","formats":[2],"pid":7}"#).unwrap();
        assert!(matches!(hello, Step::Hello { ref nvme_queues, .. } if nvme_queues.is_empty()));
        let hello = serde_json::to_string(&Step::Hello {
            formats: vec![2],
            pid: 7,
            nvme_queues: vec![1],
        })
        .unwrap();
        assert_eq!(
            hello,
            r#"{"step":"hello","formats":[2],"pid":7,"nvme_queues":[1]}"#
        );
    }
}
