//! JSON-RPC 2.0 on a unix socket (mode 0600): the target's management plane, and the client
//! `vfblk-rpc` uses. Requests are JSON values one after another on the stream (newlines
//! optional), answered in order; batches are arrays. Every change is saved to the config
//! file before it is reported done.

use std::io::{BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use vfblk_vhost::server::wait_or_stop;
use vmm_sys_util::eventfd::EventFd;

use crate::{BackendConfig, ControllerConfig, RbdClusterConfig, Target};
use crate::{Error, Result};

/// Where the target listens for RPCs unless told otherwise (systemd's RuntimeDirectory).
pub const DEFAULT_SOCKET: &str = "/run/vfblk/rpc.sock";

/// A client silent this long is disconnected.
const CLIENT_IDLE: Duration = Duration::from_secs(60);
/// An answer that finds no room in the socket for this long ends the connection.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Clients served at once; more are told to come back later.
const MAX_CLIENTS: usize = 16;
/// Bytes one connection may send in all (a bound on what a client can make us buffer).
const MAX_CONNECTION_BYTES: u64 = 16 << 20;
/// How long a client waits for an answer (deleting a busy controller drains it first).
pub const CALL_DEADLINE: Duration = Duration::from_secs(60);

/// JSON-RPC error codes.
pub mod code {
    /// The bytes are not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// JSON, but not a request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Parameters of the wrong shape.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The target refused or failed the operation.
    pub const FAILED: i64 = -32000;
    /// The change is in effect but could not be saved to the config file.
    pub const NOT_SAVED: i64 = -32001;
    /// Too many clients at once.
    pub const BUSY: i64 = -32002;
}

/// The methods, with what they take.
pub const METHODS: &[(&str, &str)] = &[
    (
        "backend_create",
        "{name, kind: mem|file|nvme, path, size | address, nsid}",
    ),
    ("backend_delete", "{name}"),
    ("backend_resize", "{name, size}"),
    ("nvme_attach", "{name, address}"),
    (
        "rbd_cluster_register",
        "{name, conf, id, keyring, ms_async_op_threads, librados_thread_count, cpus}",
    ),
    ("rbd_cluster_unregister", "{name}"),
    ("rbd_cluster_list", "{}"),
    ("nvme_detach", "{name}"),
    ("backend_list", "{}"),
    (
        "vhost_blk_create",
        "{name, socket, backend, queues, cpus, readonly, serial}",
    ),
    ("vhost_blk_delete", "{name}"),
    (
        "vhost_blk_set_limits",
        "{name, limits: {iops?, bytes_per_second?}}",
    ),
    ("vhost_blk_set_readonly", "{name, readonly}"),
    ("vhost_blk_list", "{}"),
    ("stats", "{}"),
    ("config_save", "{}"),
    ("backend_retry", "{}"),
    ("upgrade", "{binary?}"),
    ("version", "{}"),
    ("log_get_level", "{}"),
    ("log_set_level", "{level}"),
    ("rpc_get_methods", "{}"),
];

struct RpcError {
    code: i64,
    message: String,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for RpcError {
    fn from(e: Error) -> Self {
        RpcError::new(code::FAILED, vfblk_vhost::error_chain(&e))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByName {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Nothing {}

fn params<T: DeserializeOwned>(p: Value) -> std::result::Result<T, RpcError> {
    serde_json::from_value(p)
        .map_err(|e| RpcError::new(code::INVALID_PARAMS, format!("invalid params: {e}")))
}

fn to_value<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).expect("RPC results always serialize")
}

/// Runs one method on the target.
fn dispatch(
    target: &Mutex<Target>,
    method: &str,
    p: Value,
) -> std::result::Result<Value, RpcError> {
    let lock = || target.lock().unwrap_or_else(|e| e.into_inner());
    // Before a change, configured entries not served are tried again (a late mount is
    // there now), so that the change and the file see them served if they can be.
    let lock_for_change = || {
        let mut t = lock();
        if !t.unserved().is_empty() {
            t.retry_unserved();
        }
        t
    };
    // Changes are saved before they are reported done.
    let saved = |t: &mut Target| -> std::result::Result<Value, RpcError> {
        // What `systemctl status` shows follows the change.
        crate::notify(&format!("STATUS={}", t.status_line()));
        t.save().map(|()| Value::Bool(true)).map_err(|e| {
            RpcError::new(
                code::NOT_SAVED,
                format!(
                    "the change is in effect, but saving the config file failed: {}",
                    vfblk_vhost::error_chain(&e)
                ),
            )
        })
    };
    match method {
        "backend_create" => {
            let b: BackendConfig = params(p)?;
            let mut t = lock_for_change();
            t.create_backend(&b.name, b.spec)?;
            saved(&mut t)
        }
        "backend_delete" => {
            let ByName { name } = params(p)?;
            let mut t = lock_for_change();
            t.delete_backend(&name)?;
            saved(&mut t)
        }
        "backend_resize" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Resize {
                name: String,
                size: u64,
            }
            let Resize { name, size } = params(p)?;
            let mut t = lock_for_change();
            let report = t.resize_backend(&name, size)?;
            saved(&mut t)?;
            Ok(to_value(report))
        }
        "nvme_attach" => {
            let a: crate::NvmeAttachConfig = params(p)?;
            let mut t = lock_for_change();
            let backends = t.attach_nvme(&a.name, a.address)?;
            saved(&mut t)?;
            Ok(json!({ "backends": backends }))
        }
        "nvme_detach" => {
            let ByName { name } = params(p)?;
            let mut t = lock_for_change();
            t.detach_nvme(&name)?;
            saved(&mut t)
        }
        "rbd_cluster_register" => {
            let c: RbdClusterConfig = params(p)?;
            let mut t = lock_for_change();
            t.register_rbd_cluster(c)?;
            saved(&mut t)
        }
        "rbd_cluster_unregister" => {
            let ByName { name } = params(p)?;
            let mut t = lock_for_change();
            t.unregister_rbd_cluster(&name)?;
            saved(&mut t)
        }
        "rbd_cluster_list" => {
            let Nothing {} = params(p)?;
            Ok(to_value(lock().rbd_cluster_list()))
        }
        "backend_list" => {
            let Nothing {} = params(p)?;
            Ok(to_value(lock().backend_list()))
        }
        "vhost_blk_create" => {
            let c: ControllerConfig = params(p)?;
            let mut t = lock_for_change();
            t.create_controller(c)?;
            saved(&mut t)
        }
        "vhost_blk_delete" => {
            let ByName { name } = params(p)?;
            let mut t = lock_for_change();
            t.delete_controller(&name)?;
            saved(&mut t)
        }
        "vhost_blk_set_limits" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct SetLimits {
                name: String,
                limits: vfblk_bridge::limits::RateLimits,
            }
            let SetLimits { name, limits } = params(p)?;
            let mut t = lock_for_change();
            t.set_controller_limits(&name, limits)?;
            saved(&mut t)
        }
        "vhost_blk_set_readonly" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct SetReadOnly {
                name: String,
                readonly: bool,
            }
            let SetReadOnly { name, readonly } = params(p)?;
            let mut t = lock_for_change();
            let report = t.set_controller_readonly(&name, readonly)?;
            saved(&mut t)?;
            Ok(to_value(report))
        }
        "vhost_blk_list" => {
            let Nothing {} = params(p)?;
            Ok(to_value(lock().controller_list()))
        }
        "stats" => {
            let Nothing {} = params(p)?;
            Ok(to_value(lock().stats()))
        }
        "config_save" => {
            let Nothing {} = params(p)?;
            let mut t = lock_for_change();
            let Some(path) = t.config_file().map(Path::to_path_buf) else {
                return Err(RpcError::new(
                    code::FAILED,
                    "the target runs without a config file (--config)",
                ));
            };
            t.save()?;
            Ok(json!({"path": path}))
        }
        "backend_retry" => {
            let Nothing {} = params(p)?;
            let mut t = lock();
            let report = t.retry_unserved();
            saved(&mut t)?;
            Ok(to_value(report))
        }
        "upgrade" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Upgrade {
                binary: Option<std::path::PathBuf>,
            }
            let Upgrade { binary } = params(p)?;
            let report = lock().upgrade(binary.as_deref())?;
            Ok(to_value(report))
        }
        "version" => {
            let Nothing {} = params(p)?;
            Ok(json!({
                "program": "vfblk-bridge",
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                // A build with test-only fault injection says so: it is not for production.
                "test_features": cfg!(feature = "test-delay"),
            }))
        }
        "log_get_level" => {
            let Nothing {} = params(p)?;
            Ok(json!({ "level": crate::log_filter() }))
        }
        "log_set_level" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Level {
                level: String,
            }
            let Level { level } = params(p)?;
            crate::set_log_filter(&level)?;
            Ok(json!({ "level": level }))
        }
        "rpc_get_methods" => {
            let Nothing {} = params(p)?;
            Ok(to_value(
                METHODS.iter().map(|(m, _)| *m).collect::<Vec<_>>(),
            ))
        }
        other => Err(RpcError::new(
            code::METHOD_NOT_FOUND,
            format!("no method {other:?} (rpc_get_methods lists them)"),
        )),
    }
}

fn error_response(id: Value, e: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
}

/// Answers one request object; None for a notification (no id).
fn handle_one(target: &Mutex<Target>, request: Value) -> Option<Value> {
    let Value::Object(mut o) = request else {
        return Some(error_response(
            Value::Null,
            RpcError::new(code::INVALID_REQUEST, "a request is a JSON object"),
        ));
    };
    let id = o.remove("id");
    let answer_id = id.clone().unwrap_or(Value::Null);
    if !matches!(
        id,
        None | Some(Value::Null | Value::Number(_) | Value::String(_))
    ) {
        return Some(error_response(
            Value::Null,
            RpcError::new(
                code::INVALID_REQUEST,
                "id must be a number, a string or null",
            ),
        ));
    }
    if o.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Some(error_response(
            answer_id,
            RpcError::new(code::INVALID_REQUEST, "\"jsonrpc\": \"2.0\" is required"),
        ));
    }
    let Some(Value::String(method)) = o.remove("method") else {
        return Some(error_response(
            answer_id,
            RpcError::new(code::INVALID_REQUEST, "\"method\" must be a string"),
        ));
    };
    let p = match o.remove("params") {
        None | Some(Value::Null) => json!({}),
        Some(p @ Value::Object(_)) => p,
        Some(_) => {
            return Some(error_response(
                answer_id,
                RpcError::new(code::INVALID_PARAMS, "params must be an object"),
            ))
        }
    };
    let result = dispatch(target, &method, p);
    if let Err(e) = &result {
        tracing::info!("rpc {method}: refused: {}", e.message);
    } else if !method.ends_with("_list") && method != "stats" && method != "rpc_get_methods" {
        tracing::info!("rpc {method}: done");
    }
    let id = id?;
    Some(match result {
        Ok(v) => json!({"jsonrpc": "2.0", "id": id, "result": v}),
        Err(e) => error_response(id, e),
    })
}

/// Answers a request or a batch; None when nothing is to be sent back.
fn handle(target: &Mutex<Target>, request: Value) -> Option<Value> {
    match request {
        Value::Array(batch) if batch.is_empty() => Some(error_response(
            Value::Null,
            RpcError::new(code::INVALID_REQUEST, "an empty batch"),
        )),
        Value::Array(batch) => {
            let answers: Vec<Value> = batch
                .into_iter()
                .filter_map(|r| handle_one(target, r))
                .collect();
            (!answers.is_empty()).then_some(Value::Array(answers))
        }
        single => handle_one(target, single),
    }
}

fn send(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut text = v.to_string();
    text.push('\n');
    stream.write_all(text.as_bytes())
}

fn serve_client(target: &Mutex<Target>, mut stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(CLIENT_IDLE));
    let _ = stream.set_write_timeout(Some(WRITE_DEADLINE));
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(std::io::Read::take(reader, MAX_CONNECTION_BYTES));
    for item in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
        match item {
            Ok(request) => {
                if let Some(answer) = handle(target, request) {
                    if send(&mut stream, &answer).is_err() {
                        return;
                    }
                }
                if target
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .handed_over()
                {
                    // A successor serves everything now. Its answer given, this process is
                    // asked to end as an operator would; the binary sees the hand-over and
                    // exits without closing what the successor holds.
                    // SAFETY: sends SIGTERM to this process (blocked in every thread but the
                    // one that waits for it).
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                    return;
                }
            }
            Err(e) if e.is_eof() || e.is_io() => return,
            Err(e) => {
                // The stream cannot be resynchronised after bad JSON: answer and close.
                let _ = send(
                    &mut stream,
                    &error_response(
                        Value::Null,
                        RpcError::new(code::PARSE_ERROR, format!("not JSON: {e}")),
                    ),
                );
                return;
            }
        }
    }
}

/// The RPC listener and its thread.
pub struct RpcServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RpcServer {
    /// Listens on `path` (mode 0600, replacing a stale socket) and serves RPCs on `target`.
    pub fn start(path: &Path, target: Arc<Mutex<Target>>) -> Result<Self> {
        let io = |what: String| move |source| Error::Io { what, source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(io(format!("creating directory {}", dir.display())))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                let _ = std::fs::remove_file(path);
            }
            Ok(_) => {
                return Err(Error::BadArgument(format!(
                    "{} exists and is not a socket",
                    path.display()
                )))
            }
            Err(_) => {}
        }
        // The socket is created with mode 0600 (no window in which others could connect):
        // only its owner manages the target.
        // SAFETY: umask only changes the process's file-creation mask; restored below.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(io(format!("listening on {}", path.display())))?;
        Self::serve(path, listener, target)
    }

    /// Serves RPCs on a listener inherited from a predecessor process (an upgrade).
    pub fn start_inherited(
        path: &Path,
        listener: std::os::fd::OwnedFd,
        target: Arc<Mutex<Target>>,
    ) -> Result<Self> {
        Self::serve(path, UnixListener::from(listener), target)
    }

    fn serve(path: &Path, listener: UnixListener, target: Arc<Mutex<Target>>) -> Result<Self> {
        let io = |what: String| move |source| Error::Io { what, source };
        let handed = listener
            .try_clone()
            .map_err(io("duplicating the RPC listener".into()))?;
        target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_listener(crate::handover::ListenerKind::Rpc, handed.into());
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(io("eventfd for the RPC server".into()))?,
        );
        let stopping = Arc::new(AtomicBool::new(false));
        let (s, st) = (stop.clone(), stopping.clone());
        let thread = std::thread::Builder::new()
            .name("vfblk-rpc".into())
            .spawn(move || accept_loop(&listener, &target, &s, &st))
            .map_err(io("spawning the RPC thread".into()))?;
        tracing::info!("RPC on {}", path.display());
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            stopping,
            thread: Some(thread),
        })
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: &UnixListener,
    target: &Arc<Mutex<Target>>,
    stop: &EventFd,
    stopping: &AtomicBool,
) {
    let clients = Arc::new(AtomicUsize::new(0));
    loop {
        let (readable, _) = wait_or_stop(listener.as_raw_fd(), stop, None);
        if stopping.load(Ordering::Acquire) {
            return;
        }
        if !readable {
            continue;
        }
        // Blocks while an upgrade runs; afterwards the listener is the successor's.
        if target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handed_over()
        {
            return;
        }
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        if clients.load(Ordering::Acquire) >= MAX_CLIENTS {
            let _ = stream.set_write_timeout(Some(WRITE_DEADLINE));
            let _ = send(
                &mut stream,
                &error_response(
                    Value::Null,
                    RpcError::new(code::BUSY, "too many RPC clients at once; try again"),
                ),
            );
            continue;
        }
        clients.fetch_add(1, Ordering::AcqRel);
        let (target, clients) = (target.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("vfblk-rpc-client".into())
            .spawn(move || {
                serve_client(&target, stream);
                clients.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            tracing::warn!("could not start a thread for an RPC client");
        }
    }
}

/// A connection to a target's RPC socket.
pub struct Client {
    stream: UnixStream,
    reader: serde_json::StreamDeserializer<
        'static,
        serde_json::de::IoRead<BufReader<UnixStream>>,
        Value,
    >,
    next_id: u64,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self> {
        let io = |what: String| move |source| Error::Io { what, source };
        let stream = UnixStream::connect(path).map_err(io(format!(
            "connecting to {} (is the target running?)",
            path.display()
        )))?;
        stream
            .set_read_timeout(Some(CALL_DEADLINE))
            .and_then(|()| stream.set_write_timeout(Some(WRITE_DEADLINE)))
            .map_err(io("setting socket timeouts".into()))?;
        let reader = stream
            .try_clone()
            .map_err(io("cloning the socket".into()))?;
        Ok(Self {
            stream,
            reader: serde_json::Deserializer::from_reader(BufReader::new(reader))
                .into_iter::<Value>(),
            next_id: 1,
        })
    }

    /// Sends raw bytes and reads one answer (tests of malformed input use this).
    pub fn raw(&mut self, bytes: &[u8]) -> Result<Value> {
        self.stream.write_all(bytes).map_err(|source| Error::Io {
            what: "sending to the target".into(),
            source,
        })?;
        self.read()
    }

    fn read(&mut self) -> Result<Value> {
        match self.reader.next() {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(Error::BadArgument(format!(
                "the target's answer is not JSON: {e}"
            ))),
            None => Err(Error::BadArgument(
                "the target closed the connection without an answer".into(),
            )),
        }
    }

    /// Calls `method` with `params` (`Value::Null`: none sent, for servers such as SPDK's
    /// that refuse params on methods that take none): its result, or its error as
    /// [`Error::Rpc`].
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            request["params"] = params;
        }
        let mut answer = self.raw(format!("{request}\n").as_bytes())?;
        if answer.get("id") != Some(&json!(id)) {
            return Err(Error::BadArgument(format!(
                "an answer to another request: {answer}"
            )));
        }
        if let Some(e) = answer.get("error") {
            return Err(Error::Rpc {
                code: e["code"].as_i64().unwrap_or(0),
                message: e["message"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(answer
            .get_mut("result")
            .map(Value::take)
            .unwrap_or(Value::Null))
    }
}
