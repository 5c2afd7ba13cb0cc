//! `vfblk-bridge`: serve a block backend to VMs as vhost-user-blk on a unix socket, with
//! inflight tracking so a restarted bridge picks up where a killed one stopped.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use vfblk_vhost::backend::{Backend, DelayBackend, FileBackend, MemBackend};
use vfblk_vhost::device::DeviceConfig;
use vfblk_vhost::worker::{PollMode, Worker};

const USAGE: &str = "usage: vfblk-bridge --socket PATH --backend SPEC [options]

backends (SPEC):
  mem:PATH:SIZE      RAM disk in a shared-memory file (e.g. /dev/shm/disk0), SIZE in bytes
                     or with K/M/G; its data outlive the process
  file:PATH[:SIZE]   a file (created/grown to SIZE) or a block device, through io_uring
  nvme:PCI_ADDR[:NSID]  an NVMe controller bound to vfio-pci, through our userspace driver;
                     guest RAM is mapped for DMA at IOVA = guest-physical address

options:
  --queues N         virtqueues offered (default 1)
  --cpus LIST        poller threads pinned to these CPUs, e.g. 0,1 (default: one, unpinned);
                     queue i runs on poller i % count
  --poll             never sleep when idle (default: sleep on kicks after ~1 ms idle)
  --no-inflight      do not offer INFLIGHT_SHMFD (to show what recovery loses without it)
  --serial TEXT      GET_ID answer (default vfblk)
  --test-delay-ms N  hold every completion N ms and release them shuffled (tests only)
";

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("{s:?} is not a size"))
}

fn nvme_backend(addr: &str, nsid: u32, queues: u16) -> Result<Arc<dyn Backend>, String> {
    use vfblk_nvme::controller::{Controller, Options};
    let address = addr.parse().map_err(|e: vfblk_nvme::Error| e.to_string())?;
    let ctrl = Controller::open(
        address,
        &Options {
            io_queues: queues,
            ..Options::default()
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(
        vfblk_bridge::nvme_backend::NvmeBackend::new(ctrl, nsid).map_err(|e| e.to_string())?,
    ))
}

fn backend(spec: &str, queues: u16) -> Result<Arc<dyn Backend>, String> {
    if let Some(rest) = spec.strip_prefix("nvme:") {
        // PCI addresses contain colons: the namespace is an optional last ":N" after "dddd:bb:dd.f".
        let (addr, nsid) = match rest.rsplit_once(':') {
            Some((a, n)) if a.contains('.') && n.parse::<u32>().is_ok() => {
                (a, n.parse().expect("checked"))
            }
            _ => (rest, 1),
        };
        return nvme_backend(addr, nsid, queues);
    }
    let parts: Vec<&str> = spec.splitn(3, ':').collect();
    match parts.as_slice() {
        ["mem", path, size] => Ok(Arc::new(
            MemBackend::open(&PathBuf::from(path), parse_size(size)?).map_err(|e| e.to_string())?,
        )),
        ["file", path] => Ok(Arc::new(
            FileBackend::open(&PathBuf::from(path), None).map_err(|e| e.to_string())?,
        )),
        ["file", path, size] => Ok(Arc::new(
            FileBackend::open(&PathBuf::from(path), Some(parse_size(size)?))
                .map_err(|e| e.to_string())?,
        )),
        _ => Err(format!("bad backend {spec:?}\n{USAGE}")),
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut socket, mut spec, mut queues, mut cpus) = (None, None, 1u16, Vec::new());
    let (mut poll, mut inflight, mut serial, mut delay) = (false, true, "vfblk".to_string(), None);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--backend" => spec = Some(value()?),
            "--queues" => queues = value()?.parse().map_err(|_| "--queues takes a number")?,
            "--cpus" => {
                cpus = value()?
                    .split(',')
                    .map(|c| {
                        c.parse::<usize>()
                            .map_err(|_| format!("--cpus: {c:?} is not a CPU number"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--poll" => poll = true,
            "--no-inflight" => inflight = false,
            "--serial" => serial = value()?,
            "--test-delay-ms" => {
                delay = Some(Duration::from_millis(
                    value()?
                        .parse()
                        .map_err(|_| "--test-delay-ms takes a number")?,
                ))
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    let socket = socket.ok_or(format!("--socket is required\n{USAGE}"))?;
    let mut backend = backend(
        &spec.ok_or(format!("--backend is required\n{USAGE}"))?,
        queues,
    )?;
    if let Some(d) = delay {
        backend = Arc::new(DelayBackend::new(backend, d));
    }
    if queues == 0 {
        return Err("--queues must be at least 1".into());
    }
    let mode = PollMode {
        idle_loops_before_sleep: if poll { None } else { Some(20_000) },
    };
    let pollers: Vec<Option<usize>> = if cpus.is_empty() {
        vec![None]
    } else {
        cpus.iter().map(|&c| Some(c)).collect()
    };
    let workers = pollers
        .iter()
        .enumerate()
        .map(|(i, &cpu)| Worker::spawn(format!("vfblk-poller{i}"), cpu, mode))
        .collect();
    let mut id = [0u8; 20];
    let n = serial.len().min(20);
    id[..n].copy_from_slice(&serial.as_bytes()[..n]);
    let info = backend.info().clone();
    let config = Arc::new(DeviceConfig {
        num_queues: queues,
        inflight,
        serial: id,
        backend,
        workers,
    });
    vfblk_vhost::server::serve(&socket, config, || {
        eprintln!(
            "vfblk-bridge: serving {} on {} ({queues} queue(s), {} poller(s), inflight tracking {})",
            info.description,
            socket.display(),
            pollers.len(),
            if inflight { "on" } else { "OFF" }
        );
    })
    .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    // Before any poller thread exists, so only the server's signal thread sees SIGTERM.
    vfblk_vhost::server::block_signals();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfblk-bridge: {e}");
            ExitCode::FAILURE
        }
    }
}
