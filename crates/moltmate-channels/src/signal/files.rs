//! signal-cli's own copies of received files (`<data_dir>/attachments/<id>`).
//!
//! The supervised daemon runs without `--ignore-attachments` (a file ignored on receive cannot
//! be fetched later), so signal-cli stores every file anyone sends. The channel removes a copy
//! once `getAttachment` fetched or refused it, removes those of messages it skips (strangers,
//! groups, files over the per-message count) at once, and sweeps the folder: files older than
//! [`SWEEP_MAX_AGE`] go, then the oldest until the rest fit in [`SWEEP_MAX_TOTAL_BYTES`].
//!
//! Every removal is `unlinkat` relative to a handle of the folder opened with
//! `O_DIRECTORY | O_NOFOLLOW`: a symlinked folder is refused and a symlinked entry is removed
//! as a link, never followed. All of it is blocking file work, run on the blocking pool.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Files older than this are removed by the sweep (a turn waits far less for its files).
pub const SWEEP_MAX_AGE: Duration = Duration::from_secs(48 * 3600);
/// The most signal-cli's attachments folder may hold after a sweep.
pub const SWEEP_MAX_TOTAL_BYTES: u64 = 1024 * 1024 * 1024;
/// How often the sweep runs.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(600);
/// Most entries one sweep looks at (a folder flooded beyond this is swept over several runs).
const SWEEP_MAX_ENTRIES: usize = 100_000;

/// signal-cli's attachments folder of a supervised daemon.
#[derive(Debug, Clone)]
pub struct AttachmentFiles {
    dir: PathBuf,
}

impl AttachmentFiles {
    pub fn new(data_dir: &Path) -> Self {
        AttachmentFiles {
            dir: data_dir.join("attachments"),
        }
    }

    /// Opens the folder without following a link; `None` when it is missing or not a folder.
    fn open_dir(&self) -> Option<OwnedFd> {
        let path = CString::new(self.dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: `path` is a valid NUL-terminated string; the flags open no file for writing.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Removes the copies of `ids` (blocking). Ids are vetted by the caller; one with a `/`
    /// or a leading `.` is skipped here again. Returns how many were removed.
    pub fn remove_blocking(&self, ids: &[String]) -> usize {
        let Some(dir) = self.open_dir() else {
            return 0;
        };
        ids.iter()
            .filter(|id| !id.is_empty() && !id.starts_with('.') && !id.contains('/'))
            .filter(|id| unlink_at(&dir, id.as_bytes()))
            .count()
    }

    /// Removes the copies of `ids` on the blocking pool.
    pub async fn remove(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let files = self.clone();
        if tokio::task::spawn_blocking(move || files.remove_blocking(&ids))
            .await
            .is_err()
        {
            tracing::warn!("signal: removing signal-cli's copy of a file failed");
        }
    }

    /// One sweep (blocking): removes files older than `max_age`, then the oldest until the
    /// rest hold at most `max_total` bytes. Returns how many were removed.
    pub fn sweep_blocking(&self, max_age: Duration, max_total: u64, now: SystemTime) -> usize {
        let Some(dir) = self.open_dir() else {
            return 0;
        };
        let listing = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let Ok(entries) = std::fs::read_dir(&listing) else {
            return 0;
        };
        let mut files: Vec<(SystemTime, u64, Vec<u8>)> = Vec::new();
        for entry in entries.take(SWEEP_MAX_ENTRIES).flatten() {
            let name = entry.file_name().as_bytes().to_vec();
            let Some((modified, size)) = stat_at(&dir, &name) else {
                continue;
            };
            files.push((modified, size, name));
        }
        files.sort_by_key(|(modified, _, _)| *modified);
        let mut total: u64 = files.iter().map(|(_, size, _)| *size).sum();
        let mut removed = 0;
        for (modified, size, name) in files {
            let old = now.duration_since(modified).unwrap_or_default() > max_age;
            if !old && total <= max_total {
                continue;
            }
            if unlink_at(&dir, &name) {
                removed += 1;
                total = total.saturating_sub(size);
            }
        }
        removed
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until shutdown.
    pub async fn sweep_forever(self, shutdown: moltmate_core::Shutdown) {
        loop {
            let files = self.clone();
            match tokio::task::spawn_blocking(move || {
                files.sweep_blocking(SWEEP_MAX_AGE, SWEEP_MAX_TOTAL_BYTES, SystemTime::now())
            })
            .await
            {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::info!(removed, "signal: swept old files from signal-cli's folder")
                }
                Err(_) => tracing::warn!("signal: sweeping signal-cli's attachments failed"),
            }
            if !crate::retry::sleep_or_shutdown(SWEEP_INTERVAL, &shutdown).await {
                return;
            }
        }
    }
}

/// Modification time and size of a regular file (or link, not followed) `name` in `dir`.
fn stat_at(dir: &OwnedFd, name: &[u8]) -> Option<(SystemTime, u64)> {
    let name = CString::new(name).ok()?;
    // SAFETY: zeroed is a valid `stat`; fstatat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is an open directory, `name` NUL-terminated, `st` a valid out-pointer.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 || (st.st_mode & libc::S_IFMT) == libc::S_IFDIR {
        return None;
    }
    let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(st.st_mtime).ok()?);
    Some((modified, u64::try_from(st.st_size).unwrap_or(0)))
}

/// Unlinks `name` in `dir` (a link is removed itself, never followed; folders are left).
fn unlink_at(dir: &OwnedFd, name: &[u8]) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // SAFETY: `dir` is an open directory and `name` a NUL-terminated single path component.
    unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: usize, age: Duration) {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn signal_attachment_files_do_not_outlive_their_turn_or_a_stranger() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("attachments");
        std::fs::create_dir(&dir).unwrap();
        write(&dir, "fetched.jpg", 10, Duration::ZERO);
        write(&dir, "stranger.pdf", 10, Duration::ZERO);
        write(&dir, "kept.png", 10, Duration::ZERO);
        let files = AttachmentFiles::new(data.path());
        let removed = files.remove_blocking(&["fetched.jpg".into(), "stranger.pdf".into()]);
        assert_eq!(removed, 2);
        assert!(!dir.join("fetched.jpg").exists());
        assert!(!dir.join("stranger.pdf").exists());
        assert!(dir.join("kept.png").exists());
        // A missing copy is no error.
        assert_eq!(files.remove_blocking(&["fetched.jpg".into()]), 0);
    }

    #[test]
    fn signal_attachment_removal_never_follows_a_link() {
        let data = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), b"keep").unwrap();
        // A symlinked folder is refused.
        std::os::unix::fs::symlink(outside.path(), data.path().join("attachments")).unwrap();
        let files = AttachmentFiles::new(data.path());
        assert_eq!(files.remove_blocking(&["victim".into()]), 0);
        assert_eq!(
            files.sweep_blocking(Duration::ZERO, 0, SystemTime::now()),
            0
        );
        assert!(outside.path().join("victim").exists());
        // A symlinked entry is removed as a link; its target stays.
        std::fs::remove_file(data.path().join("attachments")).unwrap();
        std::fs::create_dir(data.path().join("attachments")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("victim"),
            data.path().join("attachments/link.jpg"),
        )
        .unwrap();
        assert_eq!(
            files.remove_blocking(&["link.jpg".into(), "../x".into()]),
            1
        );
        assert!(outside.path().join("victim").exists());
    }

    #[test]
    fn signal_attachment_sweep_removes_old_files_then_the_oldest_over_the_cap() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("attachments");
        std::fs::create_dir(&dir).unwrap();
        write(&dir, "ancient.bin", 1, Duration::from_secs(49 * 3600));
        write(&dir, "older.bin", 100, Duration::from_secs(3 * 3600));
        write(&dir, "old.bin", 100, Duration::from_secs(2 * 3600));
        write(&dir, "new.bin", 100, Duration::from_secs(60));
        std::fs::create_dir(dir.join("sub")).unwrap();
        let files = AttachmentFiles::new(data.path());
        let removed = files.sweep_blocking(SWEEP_MAX_AGE, 200, SystemTime::now());
        assert_eq!(removed, 2);
        assert!(!dir.join("ancient.bin").exists());
        assert!(!dir.join("older.bin").exists());
        assert!(dir.join("old.bin").exists());
        assert!(dir.join("new.bin").exists());
        assert!(dir.join("sub").exists());
    }
}
