//! Starting the processes the lab and the tests run on the host — a vhost-user backend above
//! all — and waiting, with a deadline, until they listen.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{LabError, Result};

/// How long a backend may take to create its socket.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Spawns `command` (after removing a stale `socket`) and waits until `socket` listens. A
/// process that exits first, or does not listen within `timeout`, is an error (and is
/// killed).
pub fn spawn_listening(mut command: Command, socket: &Path, timeout: Duration) -> Result<Child> {
    let _ = std::fs::remove_file(socket);
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .spawn()
        .map_err(|e| LabError::Setup(format!("starting {program}: {e}")))?;
    let deadline = Instant::now() + timeout;
    while !listening(socket) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LabError::Setup(format!(
                "{program} exited with {status} before listening on {}",
                socket.display()
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::Setup(format!(
                "{program} did not create {} within {timeout:?}",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(child)
}

/// Whether a unix socket at `path` listens. The file appears at bind(), a moment before
/// listen(): a client connecting in between is refused, so the file alone does not say.
/// Listening sockets carry __SO_ACCEPTCON (0x10000) in /proc/net/unix's flags.
pub fn listening(path: &Path) -> bool {
    if !path.exists() {
        return false;
    }
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return true;
    };
    let wanted = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == wanted
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// Starts `vfblk-bridge` from `bin_dir` on `socket` with `args`, its log appended to `log`,
/// and waits until it listens.
pub fn start_bridge(bin_dir: &Path, socket: &Path, args: &[&str], log: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = Command::new(bin_dir.join("vfblk-bridge"));
    command
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log);
    spawn_listening(command, socket, LISTEN_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    #[test]
    fn a_socket_listens_only_after_listen_not_when_its_file_appears() {
        let dir = std::env::temp_dir().join(format!("vfblk-listening-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        assert!(!listening(&path), "no file yet");
        // Bound, not listening: the file exists and a client would be refused. Close-on-exec:
        // other tests start processes meanwhile, which must not keep it alive.
        // SAFETY: a plain socket call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_un is valid; the path fits in sun_path.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr
            .sun_path
            .iter_mut()
            .zip(path.as_os_str().as_encoded_bytes())
        {
            *d = *s as libc::c_char;
        }
        // SAFETY: binds our socket to a local address structure of the right size.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        assert!(path.exists());
        assert!(!listening(&path), "bound but not listening");
        // SAFETY: listen on our bound socket.
        assert_eq!(unsafe { libc::listen(sock.as_raw_fd(), 1) }, 0);
        assert!(listening(&path), "listening");
        drop(sock);
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(!listening(&path), "a regular file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A thread of a running process, as `/proc` shows it.
#[derive(Debug, Clone)]
pub struct ProcThread {
    /// Its thread id.
    pub tid: u32,
    /// Its name (`comm`, at most 15 bytes).
    pub name: String,
    /// Its `/proc/PID/task/TID` directory.
    pub dir: std::path::PathBuf,
}

/// The threads of process `pid` now (none if it is gone). A thread that exits while they
/// are listed is left out.
pub fn threads(pid: u32) -> Vec<ProcThread> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            Some(ProcThread {
                tid,
                name: name.trim().to_string(),
                dir: task.path(),
            })
        })
        .collect()
}

/// What the threads of process `pid` are doing now, grouped: "name state wchan syscall" with
/// a count for each group, the fd a thread waits on named (`socket:[...]`, `anon_inode:...`).
/// Taken before a stuck emulator is killed, so a run that ended by its deadline says whether
/// QEMU was waiting in a read on a socket (a vhost-user reply that never came), polling as
/// usual, or blocked on a lock.
pub fn thread_states(pid: u32) -> Vec<String> {
    let mut groups: Vec<(String, u32)> = Vec::new();
    for t in threads(pid) {
        let read = |file: &str| std::fs::read_to_string(t.dir.join(file)).unwrap_or_default();
        // The state is the field after the command name's closing parenthesis.
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let wchan = match read("wchan").trim() {
            "" | "0" => "-".to_string(),
            w => w.to_string(),
        };
        let syscall = read("syscall");
        let mut fields = syscall.split_whitespace();
        let call = match fields.next() {
            // Unreadable, or the thread is gone.
            None => "sys ?".to_string(),
            Some("running") => "running".to_string(),
            Some(nr) => {
                // read, write, recvfrom, sendmsg, recvmsg (x86_64 numbers: the lab's only
                // architecture) name their fd first: say what it is.
                let fd = fields
                    .next()
                    .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
                let target = match (nr, fd) {
                    ("0" | "1" | "45" | "46" | "47", Some(fd)) => {
                        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                            .map(|l| format!(" (fd {fd} {})", l.display()))
                            .unwrap_or_default()
                    }
                    _ => String::new(),
                };
                format!("sys {nr}{target}")
            }
        };
        let line = format!("{} {state} {wchan} {call}", t.name);
        match groups.iter_mut().find(|(l, _)| *l == line) {
            Some((_, n)) => *n += 1,
            None => groups.push((line, 1)),
        }
    }
    groups
        .into_iter()
        .map(|(line, n)| if n > 1 { format!("{line} x{n}") } else { line })
        .collect()
}

#[cfg(test)]
mod thread_tests {
    #[test]
    fn this_process_lists_a_named_thread_of_its_own() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("vfblk-listed".into())
            .spawn(move || {
                // Named by now (the name is set as the thread starts).
                let _ = ready_tx.send(());
                let _ = rx.recv();
            })
            .unwrap();
        ready.recv().unwrap();
        let found = super::threads(std::process::id());
        let _ = tx.send(());
        t.join().unwrap();
        assert!(
            found
                .iter()
                .any(|t| t.name == "vfblk-listed" && t.dir.ends_with(t.tid.to_string())),
            "{found:?}"
        );
        assert!(super::threads(u32::MAX).is_empty());
    }

    /// A thread blocked reading a socket is shown as such, with the socket named (what tells
    /// a QEMU waiting for a vhost-user reply from one that is merely idle).
    #[test]
    fn a_thread_blocked_reading_a_socket_is_shown_waiting_on_it() {
        use std::io::{Read, Write};
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = std::thread::Builder::new()
            .name("vfblk-reading".into())
            .spawn(move || {
                let mut theirs = theirs;
                let mut byte = [0u8; 1];
                let _ = theirs.read(&mut byte);
            })
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let line = loop {
            let states = super::thread_states(std::process::id());
            if let Some(l) = states.iter().find(|l| l.starts_with("vfblk-reading S")) {
                if l.contains("socket:[") {
                    break l.clone();
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the reading thread not seen blocked on its socket within 5 s: {states:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        ours.write_all(&[1]).unwrap();
        t.join().unwrap();
        assert!(line.contains(" sys "), "{line}");
    }
}
