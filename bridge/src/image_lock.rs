//! Image locks that QEMU honours: open file description (OFD) locks on the bytes QEMU's
//! `file` driver uses, so that a target and a QEMU (or `qemu-img`, `qemu-io`, another
//! target) never write one image at once, and each refuses the other with a clear error.
//!
//! QEMU's scheme, checked on this machine with QEMU 7.2 (`/proc/locks` of a running VM): a
//! user takes a shared lock on byte 100 + p for each permission p it holds, and on byte
//! 200 + p for each permission it does not let others hold. A writable virtio-blk disk
//! holds 100 (consistent read) and 101 (write) and denies 201 (others' writes); a
//! read-only one holds 100 and denies 201. A user may take permission p only if nobody
//! locks 200 + p, and may deny p only if nobody locks 100 + p. Every lock is shared, so
//! testing for an exclusive lock on one byte finds any other user of it; our own open file
//! description never conflicts with itself.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Permission bits, as QEMU numbers them.
const CONSISTENT_READ: u64 = 0;
const WRITE: u64 = 1;
/// Where a held permission is locked, and where a denied one.
const PERM_BASE: u64 = 100;
const DENY_BASE: u64 = 200;

/// The bytes one user locks: what it holds, and what it denies others.
fn bytes(writable: bool) -> (Vec<u64>, Vec<u64>) {
    let held = if writable {
        vec![CONSISTENT_READ, WRITE]
    } else {
        vec![CONSISTENT_READ]
    };
    // Like QEMU's virtio-blk without share-rw: nobody else writes under us, read-only or not.
    (held, vec![WRITE])
}

fn flock(
    fd: RawFd,
    cmd: libc::c_int,
    kind: libc::c_int,
    byte: u64,
) -> std::io::Result<libc::flock> {
    // SAFETY: a zeroed flock is a valid value; its fields are set below.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = byte as libc::off_t;
    l.l_len = 1;
    // SAFETY: an fd of ours and a valid flock (OFD commands need l_pid 0, as zeroed).
    if unsafe { libc::fcntl(fd, cmd, &mut l) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(l)
}

/// Whether an open file description other than `fd`'s holds a lock on `byte`.
fn taken_by_another(fd: RawFd, byte: u64) -> std::io::Result<bool> {
    let l = flock(fd, libc::F_OFD_GETLK, libc::F_WRLCK, byte)?;
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

/// An image locked for one user; unlocked when dropped.
#[derive(Debug)]
pub struct ImageLock {
    /// The image's open file description (a duplicate of the backend's fd: the locks belong
    /// to the description, not the fd).
    file: File,
    locked: Vec<u64>,
}

impl ImageLock {
    /// Locks `file` (the open image at `path`) for reading, and writing when `writable`.
    /// Refused when another user writes it (or holds it read-only and `writable` is asked),
    /// naming that user when it can be found; nothing stays locked then.
    pub fn acquire(file: &File, path: &Path, writable: bool) -> Result<ImageLock> {
        let io = |what: String| move |source| Error::Io { what, source };
        let file = file
            .try_clone()
            .map_err(io(format!("duplicating the fd of {}", path.display())))?;
        let fd = file.as_raw_fd();
        let (held, denied) = bytes(writable);
        let mut lock = ImageLock {
            file,
            locked: Vec::new(),
        };
        // Ours first, then the look at others': two users starting at once both see the
        // other (QEMU does the same).
        let wanted = held
            .iter()
            .map(|p| PERM_BASE + p)
            .chain(denied.iter().map(|p| DENY_BASE + p));
        for byte in wanted {
            flock(fd, libc::F_OFD_SETLK, libc::F_RDLCK, byte)
                .map_err(io(format!("locking byte {byte} of {}", path.display())))?;
            lock.locked.push(byte);
        }
        let conflicts = held
            .iter()
            .map(|p| DENY_BASE + p)
            .chain(denied.iter().map(|p| PERM_BASE + p));
        for byte in conflicts {
            let taken = taken_by_another(fd, byte)
                .map_err(io(format!("testing byte {byte} of {}", path.display())))?;
            if taken {
                let holder = holder_of(path, byte)
                    .map(|h| format!(" by {h}"))
                    .unwrap_or_default();
                // We deny others only WRITE: a held byte found taken is another writer.
                let why = if byte >= DENY_BASE {
                    "another user does not let it be written (it is open read-only or for writing elsewhere)"
                } else {
                    "another user writes it"
                };
                return Err(Error::BadArgument(format!(
                    "{} is in use{holder}: {why} (QEMU's image lock, byte {byte}); stop that user, or open the image read-only on both sides",
                    path.display()
                )));
            }
        }
        Ok(lock)
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        let fd = self.file.as_raw_fd();
        for &byte in &self.locked {
            if let Err(e) = flock(fd, libc::F_OFD_SETLK, libc::F_UNLCK, byte) {
                tracing::warn!("unlocking byte {byte} of an image: {e}");
            }
        }
    }
}

/// Who holds a lock on `byte` of the file at `path`: a process with the file open whose
/// fdinfo lists an OFD lock covering it ("qemu-system-x86 (pid 1234)"). Best effort: other
/// users' processes may not be readable.
fn holder_of(path: &Path, byte: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let target = std::fs::metadata(path).ok()?;
    let me = std::process::id();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let fds: PathBuf = proc_entry.path().join("fd");
        let Ok(entries) = std::fs::read_dir(&fds) else {
            continue;
        };
        for fd in entries.flatten() {
            let same = std::fs::metadata(fd.path())
                .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino());
            if !same {
                continue;
            }
            let info = proc_entry.path().join("fdinfo").join(fd.file_name());
            let text = std::fs::read_to_string(info).unwrap_or_default();
            if text.lines().any(|l| covers(l, byte)) {
                let comm = std::fs::read_to_string(proc_entry.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_else(|_| "?".into());
                return Some(format!("{comm} (pid {pid})"));
            }
        }
    }
    None
}

/// Whether an fdinfo line ("lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:123 100 101") is an
/// OFD lock covering `byte`.
fn covers(line: &str, byte: u64) -> bool {
    let Some(rest) = line.strip_prefix("lock:") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if !fields.contains(&"OFDLCK") || fields.len() < 2 {
        return false;
    }
    let end = fields[fields.len() - 1];
    let start = fields[fields.len() - 2];
    match (start.parse::<u64>(), end) {
        (Ok(s), "EOF") => byte >= s,
        (Ok(s), e) => e.parse::<u64>().is_ok_and(|e| (s..=e).contains(&byte)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("vfblk-image-lock-{name}-{}", std::process::id()));
            let f = File::create(&path).unwrap();
            f.set_len(1 << 20).unwrap();
            Scratch(path)
        }

        fn open(&self) -> File {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.0)
                .unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn one_writer_or_many_readers_and_a_dropped_lock_frees_the_image() {
        let img = Scratch::new("users");
        let (a, b) = (img.open(), img.open());
        let first = ImageLock::acquire(&a, &img.0, true).unwrap();
        let e = ImageLock::acquire(&b, &img.0, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is in use"), "{e}");
        assert!(
            ImageLock::acquire(&b, &img.0, false).is_err(),
            "a reader beside a writer"
        );
        drop(first);
        let reader = ImageLock::acquire(&a, &img.0, false).unwrap();
        // A refused acquire left nothing locked: a second reader is fine.
        let second = ImageLock::acquire(&b, &img.0, false).unwrap();
        let c = img.open();
        assert!(
            ImageLock::acquire(&c, &img.0, true).is_err(),
            "a writer beside readers"
        );
        drop(reader);
        drop(second);
        let _writer = ImageLock::acquire(&c, &img.0, true).unwrap();
    }

    #[test]
    fn fdinfo_lock_lines_are_read_by_their_range() {
        let line = "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010737 100 101";
        assert!(covers(line, 100) && covers(line, 101));
        assert!(!covers(line, 201) && !covers(line, 99));
        assert!(covers(
            "lock:\t2: OFDLCK ADVISORY  WRITE -1 00:1f:7 0 EOF",
            201
        ));
        assert!(!covers(
            "lock:\t1: POSIX  ADVISORY  READ 12 fe:00:1 100 101",
            100
        ));
        assert!(!covers("flags:\t02", 100));
    }

    /// With `qemu-io` (QEMU's own locking) holding the image open for writing, we are
    /// refused and told who holds it; with us holding it, a writing QEMU is refused.
    #[test]
    fn qemu_and_we_refuse_each_other() {
        let img = Scratch::new("qemu");
        let mut qemu = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(&img.0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io (scripts/setup.sh installs qemu-utils)");
        // Until it has the image open and locked.
        let ours = img.open();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let e = loop {
            match ImageLock::acquire(&ours, &img.0, true) {
                Err(e) => break e.to_string(),
                Ok(lock) => drop(lock),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io never locked the image"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(e.contains("qemu-io (pid"), "{e}");
        let _ = qemu.stdin.take().map(|mut s| s.write_all(b"quit\n"));
        let _ = qemu.wait();
        let _lock = ImageLock::acquire(&ours, &img.0, true).unwrap();
        let refused = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512"])
            .arg(&img.0)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains("lock"),
            "qemu-io writing beside our writer: {} {stderr}",
            refused.status
        );
    }
}
