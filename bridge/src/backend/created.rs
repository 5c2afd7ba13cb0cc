//! A backend's file while the backend opens: if the open fails, a file it created is removed
//! and a file it grew is cut back, so a failed create leaves the filesystem as it was.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// An opened backend file whose creation or growth is undone on drop unless [`Self::commit`]ted.
pub(super) struct Creating {
    /// `None` only once committed.
    file: Option<File>,
    path: PathBuf,
    /// This open made the file (O_CREAT|O_EXCL): a file the operator had is never removed.
    new: bool,
    /// The length the file had before [`Self::grow_to`] lengthened it.
    grown_from: Option<u64>,
}

impl Creating {
    /// Opens `path` read-write; with `create`, makes it if it is missing.
    pub(super) fn open(path: &Path, create: bool) -> io::Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        let (file, new) = if create {
            // O_EXCL first: only a file this call made may be removed on failure.
            // A disk holds a guest's data: its owner's only, as QEMU's images are.
            match options.clone().create_new(true).mode(0o600).open(path) {
                Ok(file) => (file, true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (options.open(path)?, false),
                Err(e) => return Err(e),
            }
        } else {
            (options.open(path)?, false)
        };
        Ok(Self {
            file: Some(file),
            path: path.to_owned(),
            new,
            grown_from: None,
        })
    }

    /// The open file.
    pub(super) fn file(&self) -> &File {
        self.file
            .as_ref()
            .expect("taken only by commit, which consumes self")
    }

    /// Lengthens the file to `size` bytes if it is shorter; never shortens it.
    pub(super) fn grow_to(&mut self, size: u64) -> io::Result<()> {
        let file = self.file();
        let len = file.metadata()?.len();
        if len < size {
            file.set_len(size)?;
            // The first length is the operator's: that is what a failure restores.
            self.grown_from.get_or_insert(len);
        }
        Ok(())
    }

    /// The open completed: the file stays as it is now.
    pub(super) fn commit(mut self) -> File {
        self.file
            .take()
            .expect("taken only by commit, which consumes self")
    }
}

impl Drop for Creating {
    fn drop(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        if self.new {
            // Only if the path still names our file: one put there since is someone else's.
            let ours = match (file.metadata(), std::fs::symlink_metadata(&self.path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if ours {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("removing {} after a failed open: {e}", self.path.display());
                }
            }
        } else if let Some(len) = self.grown_from {
            if let Err(e) = file.set_len(len) {
                tracing::warn!(
                    "cutting {} back to {len} bytes after a failed open: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// A unique path for a test's file (on tmpfs where there is one, as /dev/shm backends are),
/// removed when dropped.
#[cfg(test)]
pub(super) struct Scratch(pub PathBuf);

#[cfg(test)]
impl Scratch {
    pub(super) fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "vfblk-backend-test-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    /// The file is there with exactly `content`: its length is compared first, so a file left
    /// huge is reported, not read.
    pub(super) fn assert_holds(&self, content: &[u8], case: &str) {
        let len = std::fs::metadata(&self.0).map(|m| m.len());
        assert_eq!(len.ok(), Some(content.len() as u64), "{case}: length");
        assert!(
            std::fs::read(&self.0).unwrap() == content,
            "{case}: content"
        );
    }
}

#[cfg(test)]
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
