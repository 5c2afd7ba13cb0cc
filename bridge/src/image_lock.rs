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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        match Self::try_acquire(file, path, writable)? {
            Ok(lock) => Ok(lock),
            Err(byte) => Err(in_use(path, byte)),
        }
    }

    /// [`ImageLock::acquire`], tried again for up to `wait` while another user has the
    /// image: a predecessor process that was just killed or stopped its rings lets go of it
    /// within moments (the kernel closes a dead process's files when it exits, an io_uring's
    /// when its last request is done).
    pub fn acquire_within(
        file: &File,
        path: &Path,
        writable: bool,
        wait: Duration,
    ) -> Result<ImageLock> {
        let start = Instant::now();
        loop {
            match Self::try_acquire(file, path, writable)? {
                Ok(lock) => {
                    if start.elapsed() >= RETRY_PERIOD {
                        tracing::info!(
                            "{}: locked after {} ms (another user held it until then)",
                            path.display(),
                            start.elapsed().as_millis()
                        );
                    }
                    return Ok(lock);
                }
                Err(byte) if start.elapsed() >= wait => return Err(in_use(path, byte)),
                Err(_) => std::thread::sleep(RETRY_PERIOD),
            }
        }
    }

    /// The lock, or the byte another user holds that stops it (nothing of ours left locked
    /// then).
    fn try_acquire(
        file: &File,
        path: &Path,
        writable: bool,
    ) -> Result<std::result::Result<ImageLock, u64>> {
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
                return Ok(Err(byte));
            }
        }
        Ok(Ok(lock))
    }

    /// Takes or gives up the permission to write (the device made writable or read-only
    /// while it serves). Refused when another user does not let the image be written; the
    /// lock is then as it was.
    pub fn set_writable(&mut self, path: &Path, writable: bool) -> Result<()> {
        let byte = PERM_BASE + WRITE;
        let fd = self.file.as_raw_fd();
        if self.locked.contains(&byte) == writable {
            return Ok(());
        }
        if !writable {
            flock(fd, libc::F_OFD_SETLK, libc::F_UNLCK, byte)
                .map_err(io(format!("unlocking byte {byte} of {}", path.display())))?;
            self.locked.retain(|&b| b != byte);
            return Ok(());
        }
        flock(fd, libc::F_OFD_SETLK, libc::F_RDLCK, byte)
            .map_err(io(format!("locking byte {byte} of {}", path.display())))?;
        let conflict = DENY_BASE + WRITE;
        match taken_by_another(fd, conflict) {
            Ok(false) => {
                self.locked.push(byte);
                Ok(())
            }
            taken => {
                if let Err(e) = flock(fd, libc::F_OFD_SETLK, libc::F_UNLCK, byte) {
                    tracing::warn!("unlocking byte {byte} of {}: {e}", path.display());
                }
                Err(match taken {
                    Err(e) => io(format!("testing byte {conflict} of {}", path.display()))(e),
                    Ok(_) => in_use(path, conflict),
                })
            }
        }
    }
}

/// Pause between tries while another user holds the image.
const RETRY_PERIOD: Duration = Duration::from_millis(10);

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// The refusal when another user holds `byte` of the image at `path`.
fn in_use(path: &Path, byte: u64) -> Error {
    let holder = holder_of(path, byte)
        .map(|h| format!(" by {h}"))
        .unwrap_or_default();
    // We deny others only WRITE: a held byte found taken is another writer.
    let why = if byte >= DENY_BASE {
        "another user does not let it be written (it is open read-only or for writing elsewhere)"
    } else {
        "another user writes it"
    };
    Error::ImageInUse(format!(
        "{} is in use{holder}: {why} (QEMU's image lock, byte {byte}); stop that user, or open the image read-only on both sides",
        path.display()
    ))
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

/// How long a queue starting waits for another user to let go of its image: long enough for
/// a killed predecessor's files to be closed, short enough that a refusal reaches the
/// frontend while it waits for the reply.
pub const START_WAIT: Duration = Duration::from_secs(2);

/// A backend's image lock, held while any queue of any controller on it runs. QEMU takes an
/// image's locks when it activates the disk and gives them up when a migration hands the
/// disk over to the destination; a controller's rings start and stop at the same moments
/// (a migration's switch-over stops the source's rings before the destination starts its
/// own; a hand-over's old process stops its rings before the new one starts them). A target
/// that serves no frontend holds nothing, like a QEMU waiting with `-incoming`. Writable
/// while any running controller is.
#[derive(Debug)]
pub struct BackendImageLock {
    file: File,
    path: PathBuf,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    /// The controllers with running queues.
    users: Vec<User>,
    lock: Option<ImageLock>,
}

#[derive(Debug)]
struct User {
    device: u64,
    queues: usize,
    writable: bool,
}

/// One running queue's share of its backend's image lock; the last one dropped unlocks.
#[derive(Debug)]
pub struct ImageInUse {
    lock: Arc<BackendImageLock>,
    device: u64,
}

impl BackendImageLock {
    /// The lock of the image `file` (opened at `path`), not yet taken.
    pub fn new(file: &File, path: &Path) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            file: file
                .try_clone()
                .map_err(io(format!("duplicating the fd of {}", path.display())))?,
            path: path.to_path_buf(),
            held: Mutex::new(Held::default()),
        }))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the lock what the running controllers need: none, read, or read and write.
    /// Taking it waits up to [`START_WAIT`] for another user to let go. Refused, the lock
    /// is as it was.
    fn follow(&self, held: &mut Held) -> Result<()> {
        let writable = held.users.iter().any(|u| u.writable);
        match (&mut held.lock, held.users.is_empty()) {
            (None, true) => Ok(()),
            (Some(_), true) => {
                held.lock = None;
                Ok(())
            }
            (None, false) => {
                held.lock = Some(ImageLock::acquire_within(
                    &self.file, &self.path, writable, START_WAIT,
                )?);
                Ok(())
            }
            (Some(lock), false) => lock.set_writable(&self.path, writable),
        }
    }

    /// A queue of controller `device` starts: the lock is taken (or made writable) as the
    /// controller needs, `writable()` asked under the lock so that a concurrent
    /// [`BackendImageLock::set_writable`] is seen by one or the other. Refused, nothing
    /// changed.
    pub fn enter(
        self: &Arc<Self>,
        device: u64,
        writable: impl FnOnce() -> bool,
    ) -> Result<ImageInUse> {
        let mut held = self.held();
        let index = match held.users.iter().position(|u| u.device == device) {
            Some(i) => i,
            None => {
                let writable = writable();
                held.users.push(User {
                    device,
                    queues: 0,
                    writable,
                });
                held.users.len() - 1
            }
        };
        held.users[index].queues += 1;
        if let Err(e) = self.follow(&mut held) {
            Self::leave(&mut held, device);
            return Err(e);
        }
        Ok(ImageInUse {
            lock: self.clone(),
            device,
        })
    }

    fn leave(held: &mut Held, device: u64) {
        if let Some(i) = held.users.iter().position(|u| u.device == device) {
            held.users[i].queues -= 1;
            if held.users[i].queues == 0 {
                held.users.swap_remove(i);
            }
        }
    }

    /// Controller `device` becomes writable or read-only: `apply` makes the change once
    /// the lock (if its queues hold it) allows it; refused, nothing changes.
    pub fn set_writable(&self, device: u64, writable: bool, apply: impl FnOnce()) -> Result<()> {
        let mut held = self.held();
        if let Some(i) = held.users.iter().position(|u| u.device == device) {
            let before = std::mem::replace(&mut held.users[i].writable, writable);
            if let Err(e) = self.follow(&mut held) {
                held.users[i].writable = before;
                return Err(e);
            }
        }
        apply();
        Ok(())
    }

    /// Whether running queues hold the lock now.
    #[cfg(test)]
    fn is_held(&self) -> bool {
        self.held().lock.is_some()
    }

    /// Who stops the lock from being taken now, if anyone: for a warning when a controller
    /// is created (its queues will be refused until that user lets go). Tries the lock and
    /// lets go at once; `None` while queues of ours hold it.
    pub fn conflict(&self, writable: bool) -> Option<Error> {
        // Held through the try: the try's locks are on the same open file description as
        // the queues', and letting go of them would unlock the queues' too.
        let held = self.held();
        if held.lock.is_some() {
            return None;
        }
        ImageLock::acquire(&self.file, &self.path, writable).err()
    }
}

impl Drop for ImageInUse {
    fn drop(&mut self) {
        let mut held = self.lock.held();
        BackendImageLock::leave(&mut held, self.device);
        // Letting go, or giving up write, is never refused by another user.
        if let Err(e) = self.lock.follow(&mut held) {
            tracing::warn!("{}: {e}", self.lock.path.display());
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

    /// The lock is taken by the first queue, kept while any runs, let go with the last; a
    /// switch to writable is refused (and changes nothing) while another user reads the
    /// image, and allowed once it is gone; two controllers on one backend share it, writable
    /// while either is.
    #[test]
    fn a_backend_lock_follows_its_queues_and_their_read_only_settings() {
        let img = Scratch::new("device");
        let backend = BackendImageLock::new(&img.open(), &img.0).unwrap();
        let other = img.open();
        assert!(backend.conflict(true).is_none(), "nobody else uses it yet");
        let first = backend.enter(1, || false).unwrap();
        let second = backend
            .enter(1, || unreachable!("asked only by the first"))
            .unwrap();
        assert!(backend.is_held());
        // Read-only beside another reader.
        let reader = ImageLock::acquire(&other, &img.0, false).unwrap();
        let mut applied = false;
        let e = backend
            .set_writable(1, true, || applied = true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is in use") && !applied, "{e}");
        let e = backend.enter(2, || true).unwrap_err().to_string();
        assert!(
            e.contains("is in use"),
            "a writable controller beside the reader: {e}"
        );
        drop(reader);
        backend.set_writable(1, true, || applied = true).unwrap();
        assert!(applied);
        assert!(
            ImageLock::acquire(&other, &img.0, false).is_err(),
            "a reader beside the controller now writing"
        );
        // A read-only controller on the same backend; the writable one goes: read-only left.
        backend.set_writable(1, false, || ()).unwrap();
        let writer_queue = backend.enter(3, || true).unwrap();
        drop(first);
        drop(second);
        assert!(ImageLock::acquire(&other, &img.0, false).is_err());
        drop(writer_queue);
        assert!(!backend.is_held());
        let _writer = ImageLock::acquire(&other, &img.0, true).unwrap();
        let e = backend.conflict(true).expect("another writer").to_string();
        assert!(e.contains("is in use"), "{e}");
    }

    /// Two controllers on one backend, one read-only: while only the read-only one runs the
    /// image is shared with other readers; the lock is one (letting go of one controller's
    /// queues does not unlock the other's).
    #[test]
    fn controllers_sharing_a_backend_share_its_lock() {
        let img = Scratch::new("shared");
        let backend = BackendImageLock::new(&img.open(), &img.0).unwrap();
        let other = img.open();
        let reading = backend.enter(1, || false).unwrap();
        let writing = backend.enter(2, || true).unwrap();
        assert!(ImageLock::acquire(&other, &img.0, false).is_err());
        drop(writing);
        let reader = ImageLock::acquire(&other, &img.0, false).expect("read-only left");
        drop(reader);
        assert!(
            ImageLock::acquire(&other, &img.0, true).is_err(),
            "the read-only controller still holds its part"
        );
        drop(reading);
        let _writer = ImageLock::acquire(&other, &img.0, true).unwrap();
    }

    /// A queue starting while a predecessor still holds the image waits for it to let go
    /// (within [`START_WAIT`]) instead of failing the frontend.
    #[test]
    fn a_starting_queue_waits_for_a_predecessor_to_let_go() {
        let img = Scratch::new("wait");
        let predecessor = ImageLock::acquire(&img.open(), &img.0, true).unwrap();
        let backend = BackendImageLock::new(&img.open(), &img.0).unwrap();
        let letting_go = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(predecessor);
        });
        let start = Instant::now();
        let _queue = backend.enter(1, || true).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(250));
        letting_go.join().unwrap();
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
