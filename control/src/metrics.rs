//! The Prometheus endpoint: `GET /metrics` over plain HTTP on a TCP address (keep it on
//! 127.0.0.1) or a unix socket, answered in the text exposition format 0.0.4.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vfblk_vhost::server::wait_or_stop;
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};
use crate::{Target, TargetStats};
use vfblk_bridge::stats::{bucket_bound_seconds, LATENCY_BUCKETS};

/// How long a scraper may take, in all, to send its request, and to read the answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(2);
/// Largest request head read.
const MAX_REQUEST: usize = 8192;
/// Scrapes answered at once, each on a thread of its own: a slow client holds only its own.
const MAX_CLIENTS: usize = 8;

/// Where the endpoint listens: `127.0.0.1:9560` or `unix:/run/vfblk/metrics.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddress {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl FromStr for MetricsAddress {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(MetricsAddress::Unix(PathBuf::from(path)));
        }
        let bad = |why: String| {
            Error::BadArgument(format!(
                "metrics address {s:?}: {why} (HOST:PORT, e.g. 127.0.0.1:9560 or localhost:9560, or unix:PATH)"
            ))
        };
        if let Ok(address) = s.parse() {
            return Ok(MetricsAddress::Tcp(address));
        }
        // A host name (localhost, the host's own name): resolved once, at start; the first
        // address the resolver gives is the one listened on.
        use std::net::ToSocketAddrs;
        s.to_socket_addrs()
            .map_err(|e| bad(e.to_string()))?
            .next()
            .map(MetricsAddress::Tcp)
            .ok_or_else(|| bad("the name resolves to no address".into()))
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The process metrics Prometheus's client libraries export, read from /proc (each None
/// when it cannot be read).
#[derive(Debug, Default)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    open_fds: Option<usize>,
    start_time_seconds: Option<f64>,
}

impl ProcessStats {
    fn read() -> Self {
        // SAFETY: sysconf reads a constant.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name (which may hold spaces), from field 3 on.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let per_tick = |t: u64| (ticks > 0).then(|| t as f64 / ticks as f64);
        let cpu_seconds = field(14)
            .zip(field(15))
            .and_then(|(user, system)| per_tick(user + system));
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        let start_time_seconds = field(22)
            .and_then(per_tick)
            .zip(boot_time)
            .map(|(since_boot, boot)| boot as f64 + since_boot);
        let resident_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * page.max(0) as u64);
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count());
        Self {
            cpu_seconds,
            resident_bytes,
            open_fds,
            start_time_seconds,
        }
    }
}

/// The metrics text for `stats`.
pub fn render(stats: &TargetStats) -> String {
    let mut sections: Vec<String> = Vec::new();
    let mut add = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
        let mut s = format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for l in lines {
            s.push_str(&l);
            s.push('\n');
        }
        sections.push(s);
    };
    add(
        "vfblk_build_info",
        "gauge",
        "The running binary: its version (always 1).",
        vec![format!(
            "vfblk_build_info{{version=\"{}\"}} 1",
            label(env!("CARGO_PKG_VERSION"))
        )],
    );
    let process = ProcessStats::read();
    let process_metrics = [
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time of the target process.",
            process.cpu_seconds.map(|v| v.to_string()),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the target process.",
            process.resident_bytes.map(|v| v.to_string()),
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors of the target process.",
            process.open_fds.map(|v| v.to_string()),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "When the target process started, in seconds since the Unix epoch.",
            process.start_time_seconds.map(|v| v.to_string()),
        ),
    ];
    // What /proc does not tell is left out rather than made up.
    for (name, kind, help, value) in process_metrics {
        if let Some(value) = value {
            add(name, kind, help, vec![format!("{name} {value}")]);
        }
    }
    let per_controller = |f: &dyn Fn(&crate::ControllerStats, &str) -> Vec<String>| {
        stats
            .controllers
            .iter()
            .flat_map(|c| f(c, &label(&c.name)))
            .collect::<Vec<_>>()
    };
    add(
        "vfblk_controller_requests_total",
        "counter",
        "Requests answered, by kind (other: flush, discard, write zeroes, get id, refused).",
        per_controller(&|c, n| {
            vec![
                format!(
                    "vfblk_controller_requests_total{{controller=\"{n}\",op=\"read\"}} {}",
                    c.io.reads
                ),
                format!(
                    "vfblk_controller_requests_total{{controller=\"{n}\",op=\"write\"}} {}",
                    c.io.writes
                ),
                format!(
                    "vfblk_controller_requests_total{{controller=\"{n}\",op=\"other\"}} {}",
                    c.io.others
                ),
            ]
        }),
    );
    add(
        "vfblk_controller_bytes_total",
        "counter",
        "Bytes read and written.",
        per_controller(&|c, n| {
            vec![
                format!(
                    "vfblk_controller_bytes_total{{controller=\"{n}\",op=\"read\"}} {}",
                    c.io.read_bytes
                ),
                format!(
                    "vfblk_controller_bytes_total{{controller=\"{n}\",op=\"write\"}} {}",
                    c.io.written_bytes
                ),
            ]
        }),
    );
    add(
        "vfblk_controller_errors_total",
        "counter",
        "Requests answered with an error status.",
        per_controller(&|c, n| {
            vec![format!(
                "vfblk_controller_errors_total{{controller=\"{n}\"}} {}",
                c.io.errors
            )]
        }),
    );
    add(
        "vfblk_controller_in_flight_requests",
        "gauge",
        "Requests in the backend now.",
        per_controller(&|c, n| {
            vec![format!(
                "vfblk_controller_in_flight_requests{{controller=\"{n}\"}} {}",
                c.io.in_flight
            )]
        }),
    );
    add(
        "vfblk_controller_connected",
        "gauge",
        "1 while a frontend is connected.",
        per_controller(&|c, n| {
            vec![format!(
                "vfblk_controller_connected{{controller=\"{n}\"}} {}",
                u8::from(c.connected)
            )]
        }),
    );
    add(
        "vfblk_controller_reconnects_total",
        "counter",
        "Frontend connections after the first.",
        per_controller(&|c, n| {
            vec![format!(
                "vfblk_controller_reconnects_total{{controller=\"{n}\"}} {}",
                c.connections.saturating_sub(1)
            )]
        }),
    );
    add(
        "vfblk_controller_recovered_requests_total",
        "counter",
        "Requests run again from the inflight region after a reconnect or restart.",
        per_controller(&|c, n| {
            vec![format!(
                "vfblk_controller_recovered_requests_total{{controller=\"{n}\"}} {}",
                c.io.recovered
            )]
        }),
    );
    add(
        "vfblk_controller_request_duration_seconds",
        "histogram",
        "Time from taking a request to its completion by the backend.",
        per_controller(&|c, n| {
            let mut lines = Vec::with_capacity(LATENCY_BUCKETS + 3);
            let mut cumulative = 0u64;
            for (i, count) in c.io.latency.iter().enumerate() {
                cumulative += count;
                if i + 1 < LATENCY_BUCKETS {
                    lines.push(format!(
                        "vfblk_controller_request_duration_seconds_bucket{{controller=\"{n}\",le=\"{}\"}} {cumulative}",
                        bucket_bound_seconds(i)
                    ));
                }
            }
            lines.push(format!(
                "vfblk_controller_request_duration_seconds_bucket{{controller=\"{n}\",le=\"+Inf\"}} {cumulative}"
            ));
            lines.push(format!(
                "vfblk_controller_request_duration_seconds_sum{{controller=\"{n}\"}} {}",
                c.io.latency_sum_seconds
            ));
            lines.push(format!(
                "vfblk_controller_request_duration_seconds_count{{controller=\"{n}\"}} {cumulative}"
            ));
            lines
        }),
    );
    let poller = |p: &crate::PollerStats| {
        let cpu = p.cpu.map(|c| c.to_string()).unwrap_or_default();
        format!("poller=\"{}\",cpu=\"{cpu}\"", label(&p.name))
    };
    add(
        "vfblk_poller_busy_seconds_total",
        "counter",
        "Time the poller spent in loops that found work.",
        stats
            .pollers
            .iter()
            .map(|p| {
                format!(
                    "vfblk_poller_busy_seconds_total{{{}}} {}",
                    poller(p),
                    p.busy_seconds
                )
            })
            .collect(),
    );
    add(
        "vfblk_poller_queues",
        "gauge",
        "Virtqueues the poller runs.",
        stats
            .pollers
            .iter()
            .map(|p| format!("vfblk_poller_queues{{{}}} {}", poller(p), p.queues))
            .collect(),
    );
    add(
        "vfblk_poller_longest_commands_seconds",
        "gauge",
        "The longest the poller's queues waited for control-plane commands.",
        stats
            .pollers
            .iter()
            .map(|p| {
                format!(
                    "vfblk_poller_longest_commands_seconds{{{}}} {}",
                    poller(p),
                    p.longest_commands_ms / 1e3
                )
            })
            .collect(),
    );
    sections.concat()
}

/// A scraper's connection: TCP or unix.
trait Scraper: Read + Write + Send + 'static {
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()>;
}

impl Scraper for std::net::TcpStream {
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
}

impl Scraper for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
}

/// Reads a request head within [`CLIENT_DEADLINE`] in all (a client that sends a byte a
/// second is cut off there, not after each byte). None: nothing whole came in time.
fn read_head<S: Scraper>(stream: &mut S) -> Option<Vec<u8>> {
    let deadline = std::time::Instant::now() + CLIENT_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || head.len() > MAX_REQUEST {
            return None;
        }
        stream
            .set_timeouts(Some(left), Some(CLIENT_DEADLINE))
            .ok()?;
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// Answers one scrape on `stream`: `GET` or `HEAD` of `/metrics` (a query string is
/// ignored).
fn answer<S: Scraper>(stream: &mut S, target: &Mutex<Target>) {
    let Some(head) = read_head(stream) else {
        return;
    };
    let text = String::from_utf8_lossy(&head);
    let mut first = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target_path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target_path.split_once('?').map_or(target_path, |(p, _)| p);
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let stats = target.lock().unwrap_or_else(|e| e.into_inner()).stats();
            ("200 OK", render(&stats))
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "the metrics are at /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "GET /metrics\n".to_string()),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        let _ = stream.write_all(body.as_bytes());
    }
}

/// Answers `stream` on a thread of its own, unless [`MAX_CLIENTS`] are being answered: then
/// a 503 at once.
fn answer_apart<S: Scraper>(
    mut stream: S,
    target: &Arc<Mutex<Target>>,
    clients: &Arc<AtomicUsize>,
) {
    if clients.load(Ordering::Acquire) >= MAX_CLIENTS {
        let _ = stream.set_timeouts(None, Some(Duration::from_millis(100)));
        let _ = stream.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    }
    clients.fetch_add(1, Ordering::AcqRel);
    let (target, clients) = (target.clone(), clients.clone());
    let spawned = std::thread::Builder::new()
        .name("vfblk-scrape".into())
        .spawn(move || {
            answer(&mut stream, &target);
            clients.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        tracing::warn!("could not start a thread for a metrics client");
    }
}

enum Listening {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listening {
    fn fd(&self) -> RawFd {
        match self {
            Listening::Tcp(l) => l.as_raw_fd(),
            Listening::Unix(l, _) => l.as_raw_fd(),
        }
    }

    fn serve_one(&self, target: &Arc<Mutex<Target>>, clients: &Arc<AtomicUsize>) {
        match self {
            Listening::Tcp(l) => {
                if let Ok((s, _)) = l.accept() {
                    answer_apart(s, target, clients);
                }
            }
            Listening::Unix(l, _) => {
                if let Ok((s, _)) = l.accept() {
                    answer_apart(s, target, clients);
                }
            }
        }
    }
}

/// The metrics listener and its thread.
pub struct MetricsServer {
    stop: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

impl MetricsServer {
    /// Listens on `address` and answers scrapes from `target`'s counters.
    pub fn start(address: &MetricsAddress, target: Arc<Mutex<Target>>) -> Result<Self> {
        Self::start_with(address, target, None)
    }

    /// Answers scrapes on a listener inherited from a predecessor process (an upgrade).
    pub fn start_inherited(
        address: &MetricsAddress,
        target: Arc<Mutex<Target>>,
        listener: std::os::fd::OwnedFd,
    ) -> Result<Self> {
        Self::start_with(address, target, Some(listener))
    }

    fn start_with(
        address: &MetricsAddress,
        target: Arc<Mutex<Target>>,
        inherited: Option<std::os::fd::OwnedFd>,
    ) -> Result<Self> {
        let io = |what: String| move |source| Error::Io { what, source };
        let listening = match (address, inherited) {
            (MetricsAddress::Tcp(_), Some(fd)) => Listening::Tcp(TcpListener::from(fd)),
            (MetricsAddress::Unix(p), Some(fd)) => {
                Listening::Unix(UnixListener::from(fd), p.clone())
            }
            (address, None) => Self::bind(address)?,
        };
        let handed = match &listening {
            Listening::Tcp(l) => l.try_clone().map(std::os::fd::OwnedFd::from),
            Listening::Unix(l, _) => l.try_clone().map(std::os::fd::OwnedFd::from),
        }
        .map_err(io("duplicating the metrics listener".into()))?;
        target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_listener(crate::handover::ListenerKind::Metrics, handed);
        Self::serve(address, listening, target)
    }

    fn bind(address: &MetricsAddress) -> Result<Listening> {
        let io = |what: String| move |source| Error::Io { what, source };
        Ok(match address {
            MetricsAddress::Tcp(a) => Listening::Tcp(
                TcpListener::bind(a).map_err(io(format!("metrics: listening on {a}")))?,
            ),
            MetricsAddress::Unix(p) => {
                if std::fs::symlink_metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(p);
                }
                Listening::Unix(
                    UnixListener::bind(p)
                        .map_err(io(format!("metrics: listening on {}", p.display())))?,
                    p.clone(),
                )
            }
        })
    }

    fn serve(
        address: &MetricsAddress,
        listening: Listening,
        target: Arc<Mutex<Target>>,
    ) -> Result<Self> {
        let io = |what: String| move |source| Error::Io { what, source };
        let shown = match (&listening, address) {
            (Listening::Tcp(l), _) => l
                .local_addr()
                .map(|a| format!("http://{a}/metrics"))
                .unwrap_or_default(),
            (_, MetricsAddress::Unix(p)) => format!("unix:{} /metrics", p.display()),
            (_, MetricsAddress::Tcp(a)) => a.to_string(),
        };
        let unix_path = match &listening {
            Listening::Unix(_, p) => Some(p.clone()),
            Listening::Tcp(_) => None,
        };
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(io("eventfd for the metrics server".into()))?,
        );
        let stopping = Arc::new(AtomicBool::new(false));
        let (s, st) = (stop.clone(), stopping.clone());
        let clients = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("vfblk-metrics".into())
            .spawn(move || loop {
                let (readable, _) = wait_or_stop(listening.fd(), &s, None);
                if st.load(Ordering::Acquire) {
                    return;
                }
                if readable {
                    // Blocks while an upgrade runs; afterwards the listener is the
                    // successor's.
                    if target
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .handed_over()
                    {
                        return;
                    }
                    listening.serve_one(&target, &clients);
                }
            })
            .map_err(io("spawning the metrics thread".into()))?;
        tracing::info!("metrics on {shown}");
        Ok(Self {
            stop,
            stopping,
            thread: Some(thread),
            unix_path,
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfblk_bridge::stats::StatsSnapshot;

    #[test]
    fn the_process_metrics_are_read_from_proc() {
        let p = ProcessStats::read();
        assert!(p.cpu_seconds.is_some_and(|s| s >= 0.0), "{p:?}");
        assert!(p.resident_bytes.is_some_and(|b| b > 0), "{p:?}");
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started before now and after the machine (within an hour for a test).
        assert!(
            p.start_time_seconds
                .is_some_and(|t| t <= now + 1.0 && t > now - 3600.0),
            "{p:?}"
        );
    }

    #[test]
    fn addresses_are_ips_host_names_or_unix_paths() {
        let tcp = |s: &str| match s.parse::<MetricsAddress>() {
            Ok(MetricsAddress::Tcp(a)) => a,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(tcp("127.0.0.1:9560").to_string(), "127.0.0.1:9560");
        let named = tcp("localhost:9560");
        assert!(named.ip().is_loopback(), "{named}");
        assert_eq!(named.port(), 9560);
        assert!(matches!(
            "unix:/run/vfblk/metrics.sock".parse::<MetricsAddress>(),
            Ok(MetricsAddress::Unix(_))
        ));
        for bad in [
            "9560",
            "localhost",
            "no-such-host.invalid:9560",
            "127.0.0.1:99999",
        ] {
            assert!(bad.parse::<MetricsAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_text_has_one_help_and_type_per_family_and_cumulative_buckets() {
        let mut io = StatsSnapshot {
            reads: 2,
            writes: 1,
            read_bytes: 8192,
            written_bytes: 4096,
            in_flight: 1,
            recovered: 5,
            latency: vec![0; LATENCY_BUCKETS],
            ..Default::default()
        };
        io.latency[3] = 2;
        io.latency[LATENCY_BUCKETS - 1] = 1;
        io.latency_sum_seconds = 40.0;
        let stats = TargetStats {
            pid: 1,
            controllers: vec![crate::ControllerStats {
                name: "vm\"1".into(),
                connected: true,
                connections: 3,
                io,
            }],
            pollers: vec![crate::PollerStats {
                name: "vfblk-poller0".into(),
                cpu: Some(1),
                queues: 1,
                busy_seconds: 0.5,
                longest_commands_ms: 0.25,
            }],
        };
        let text = render(&stats);
        assert!(
            text.contains("vfblk_controller_requests_total{controller=\"vm\\\"1\",op=\"read\"} 2")
        );
        assert!(text.contains("vfblk_controller_reconnects_total{controller=\"vm\\\"1\"} 2"));
        assert!(
            text.contains("le=\"8e-6\"} 2") || text.contains("le=\"0.000008\"} 2"),
            "{text}"
        );
        assert!(text.contains("le=\"+Inf\"} 3"));
        assert!(text
            .contains("vfblk_poller_busy_seconds_total{poller=\"vfblk-poller0\",cpu=\"1\"} 0.5"));
        for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split(' ').next().unwrap();
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
        }
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "127.0.0.1:9560".parse::<MetricsAddress>().unwrap(),
            MetricsAddress::Tcp("127.0.0.1:9560".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsAddress>().unwrap(),
            MetricsAddress::Unix("/run/m.sock".into())
        );
        assert!("localhost".parse::<MetricsAddress>().is_err());
    }
}
