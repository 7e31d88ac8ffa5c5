//! Per-user home directories and the gateway's own reads and writes inside them.
//!
//! A user's home is writable by that user's sandbox, so anything in it may be hostile: a
//! `SOUL.md` may have been replaced by a symlink to `/etc/shadow` or to another user's
//! `MEMORY.md`. The gateway therefore never opens a home file by joining paths: it opens the
//! home directory and resolves the relative path beneath it with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, so the kernel refuses any escape. Writes go to a temporary file in the
//! same directory, are fsynced, and are renamed over the target, so a crash never leaves a
//! half-written memory file.

use moltmate_core::sandbox::SandboxIds;
use moltmate_core::tool::UserHome;
use moltmate_core::UserId;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Errors touching a home directory.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0:?} is not a relative path inside the home")]
    BadPath(String),
}

fn io_error(path: &str, source: impl Into<std::io::Error>) -> HomeError {
    HomeError::Io {
        path: path.to_string(),
        source: source.into(),
    }
}

/// The files every home has, created empty-but-present on first use.
pub const STANDARD_DIRECTORIES: [&str; 2] = ["memory", "workspace"];

/// `<MOLTMATE_HOME>/users` and `<MOLTMATE_HOME>/families`.
#[derive(Debug, Clone)]
pub struct Homes {
    users_dir: PathBuf,
    families_dir: PathBuf,
}

impl Homes {
    pub fn new(moltmate_home: &Path) -> Self {
        Homes {
            users_dir: moltmate_home.join("users"),
            families_dir: moltmate_home.join("families"),
        }
    }

    pub fn users_dir(&self) -> &Path {
        &self.users_dir
    }

    pub fn families_dir(&self) -> &Path {
        &self.families_dir
    }

    pub fn home(&self, user: &UserId) -> UserHome {
        UserHome::new(&self.users_dir, user)
    }

    /// Creates the user's home (0700) with its standard subdirectories, if missing. A root
    /// gateway hands it to `ids`, the user's own sandbox identity.
    pub fn ensure(&self, user: &UserId, ids: SandboxIds) -> Result<UserHome, HomeError> {
        let home = self.home(user);
        create_private_dir(&self.users_dir)?;
        create_private_dir(home.root())?;
        hand_to_sandbox_user(home.root(), ids, Sharing::Private)?;
        let root = open_root(home.root())?;
        for dir in STANDARD_DIRECTORIES {
            match rustix::fs::mkdirat(&root, dir, Mode::from_raw_mode(0o700)) {
                Ok(()) => {
                    let created = rustix::fs::openat2(
                        &root,
                        dir,
                        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                        Mode::empty(),
                        BENEATH,
                    )
                    .map_err(|e| io_error(dir, e))?;
                    inherit_owner(&root, &created);
                }
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io_error(dir, e)),
            }
        }
        Ok(home)
    }

    /// Creates a family folder, if missing. A root gateway hands it to `ids` (the family's own
    /// id from the sandbox range) as a shared folder: group-owned, setgid, 2770, so members
    /// (who get the gid as a supplementary group) all read and write it and nobody else does.
    /// Otherwise it is 0700, like a home.
    pub fn ensure_family(&self, family: &str, ids: SandboxIds) -> Result<PathBuf, HomeError> {
        if family.is_empty()
            || !family
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(HomeError::BadPath(family.to_string()));
        }
        create_private_dir(&self.families_dir)?;
        let dir = self.families_dir.join(family);
        if rustix::process::geteuid().is_root() {
            // Created private, then opened up to the group in one step (no 0700 moment for a
            // folder members already use).
            create_dir_if_missing(&dir)?;
            hand_to_sandbox_user(&dir, ids, Sharing::Group)?;
        } else {
            create_private_dir(&dir)?;
        }
        Ok(dir)
    }
}

/// An exclusive advisory lock on one user, held while a turn runs. In one process there is
/// one worker per user anyway; the lock keeps a second process on the same home (the
/// operator's `moltmate chat` next to `moltmate serve`) from answering the same message.
pub struct UserLock {
    _file: std::fs::File,
}

impl Homes {
    /// Blocks until the user's lock is held. Call from a blocking context.
    pub fn lock_user(&self, user: &UserId) -> Result<UserLock, HomeError> {
        let dir = self
            .users_dir
            .parent()
            .unwrap_or(Path::new("."))
            .join("locks");
        create_private_dir(&dir)?;
        let path = dir.join(format!("{}.lock", user.as_str()));
        let shown = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(&shown, e))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_error(&shown, e))?;
        Ok(UserLock { _file: file })
    }
}

/// When the gateway runs as root, gives `fd` the owner of the directory it was created in, so
/// files and directories the gateway makes in a home stay usable by the sandbox user who owns
/// that home. In a shared (setgid) family folder the new entry is also opened to the group and
/// closed to others (`g+rw`, `o-rwx`; directories `g+rwxs`), so every member can use what the
/// gateway wrote for one of them. A non-root gateway creates everything as itself already.
pub fn inherit_owner(parent: &OwnedFd, fd: &OwnedFd) {
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let Ok(stat) = rustix::fs::fstat(parent) else {
        return;
    };
    let owner = rustix::fs::Uid::from_raw(stat.st_uid);
    let group = rustix::fs::Gid::from_raw(stat.st_gid);
    if let Err(e) = rustix::fs::fchown(fd, Some(owner), Some(group)) {
        tracing::warn!(error = %e, "could not hand a new file to the home's owner");
        return;
    }
    if stat.st_mode & 0o2000 != 0 {
        if let Ok(own) = rustix::fs::fstat(fd) {
            let shared = shared_mode(own.st_mode);
            if own.st_mode & 0o7777 != shared {
                if let Err(e) = rustix::fs::fchmod(fd, Mode::from_raw_mode(shared)) {
                    tracing::warn!(error = %e, "could not share a new file with the family");
                }
            }
        }
    }
}

/// The mode of an entry in a shared family folder: group gets what the owner has (at least
/// read and write), others nothing, directories keep the setgid bit.
fn shared_mode(st_mode: u32) -> u32 {
    let is_dir = st_mode & 0o170000 == 0o040000;
    let mode = (st_mode & 0o7777 & !0o007) | 0o060;
    if is_dir {
        mode | 0o2070
    } else {
        mode & !0o6000
    }
}

/// Whether a directory is one user's (0700) or shared by a family's group (2770).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sharing {
    Private,
    Group,
}

/// Hands a home (or family folder) to its sandbox identity when the gateway runs as root.
/// Only the directory itself: what is inside was created owned by it (see [`inherit_owner`];
/// the disk-cap volumes re-own a tree whose owner changed).
fn hand_to_sandbox_user(path: &Path, ids: SandboxIds, sharing: Sharing) -> Result<(), HomeError> {
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let shown = || path.display().to_string();
    let fd = open_root(path)?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| io_error(&shown(), e))?;
    if (stat.st_uid, stat.st_gid) != (ids.uid, ids.gid) {
        let owner = rustix::fs::Uid::from_raw(ids.uid);
        let group = rustix::fs::Gid::from_raw(ids.gid);
        rustix::fs::fchown(&fd, Some(owner), Some(group)).map_err(|e| io_error(&shown(), e))?;
    }
    let mode = match sharing {
        Sharing::Private => 0o700,
        Sharing::Group => 0o2770,
    };
    // fchown clears the setgid bit, so the mode is set after it.
    let stat = rustix::fs::fstat(&fd).map_err(|e| io_error(&shown(), e))?;
    if stat.st_mode & 0o7777 != mode {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| io_error(&shown(), e))?;
    }
    Ok(())
}

fn create_dir_if_missing(path: &Path) -> Result<(), HomeError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| io_error(&path.display().to_string(), e))
}

fn create_private_dir(path: &Path) -> Result<(), HomeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let shown = path.display().to_string();
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => {}
        Err(e) => return Err(io_error(&shown, e)),
    }
    // `recursive` leaves existing directories alone; tighten in case an operator made it 0755.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io_error(&shown, e))
}

fn open_root(root: &Path) -> Result<OwnedFd, HomeError> {
    rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| io_error(&root.display().to_string(), e))
}

fn check_relative(relative: &str) -> Result<(), HomeError> {
    let path = Path::new(relative);
    if relative.is_empty() || path.is_absolute() || relative.contains('\0') {
        return Err(HomeError::BadPath(relative.to_string()));
    }
    Ok(())
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Reads a regular file beneath `root`, at most `max_bytes` (the rest is dropped and the result
/// says so). `Ok(None)` when it does not exist. Symlinks anywhere in the path are refused.
pub fn read_beneath(
    root: &Path,
    relative: &str,
    max_bytes: u64,
) -> Result<Option<(String, bool)>, HomeError> {
    check_relative(relative)?;
    let dir = open_root(root)?;
    let fd = match rustix::fs::openat2(
        &dir,
        relative,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        BENEATH,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(io_error(relative, e)),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| io_error(relative, e))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io_error(
            relative,
            std::io::Error::other("not a regular file"),
        ));
    }
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::new();
    (&mut file)
        .take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(relative, e))?;
    let truncated = bytes.len() as u64 > max_bytes;
    bytes.truncate(max_bytes as usize);
    Ok(Some((
        String::from_utf8_lossy(&bytes).into_owned(),
        truncated,
    )))
}

/// Writes `content` to `relative` beneath `root` atomically: parent directories are created
/// beneath the root, the data goes to a temporary file that is fsynced and renamed over the
/// target, and the directory is fsynced so the rename itself survives a crash.
pub fn write_beneath(root: &Path, relative: &str, content: &[u8]) -> Result<(), HomeError> {
    check_relative(relative)?;
    let path = Path::new(relative);
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| HomeError::BadPath(relative.to_string()))?;
    let mut dir = open_root(root)?;
    if let Some(parent) = path.parent() {
        for component in parent.components() {
            let name = match component {
                std::path::Component::Normal(name) => name,
                std::path::Component::CurDir => continue,
                _ => return Err(HomeError::BadPath(relative.to_string())),
            };
            let created = match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => true,
                Err(rustix::io::Errno::EXIST) => false,
                Err(e) => return Err(io_error(relative, e)),
            };
            let child = rustix::fs::openat2(
                &dir,
                name,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
                BENEATH,
            )
            .map_err(|e| io_error(relative, e))?;
            if created {
                inherit_owner(&dir, &child);
            }
            dir = child;
        }
    }
    let temp_name = format!(".{file_name}.tmp-{}", std::process::id());
    let fd = rustix::fs::openat(
        &dir,
        temp_name.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| io_error(relative, e))?;
    inherit_owner(&dir, &fd);
    let mut file = std::fs::File::from(fd);
    let written = file.write_all(content).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(&dir, temp_name.as_str(), rustix::fs::AtFlags::empty());
        return Err(io_error(relative, e));
    }
    rustix::fs::renameat(&dir, temp_name.as_str(), &dir, file_name)
        .map_err(|e| io_error(relative, e))?;
    rustix::fs::fsync(&dir).map_err(|e| io_error(relative, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_IDS: SandboxIds = SandboxIds::same(2_000_000_000);

    #[test]
    fn reads_refuse_symlinks_out_of_the_home() {
        let base = tempfile::tempdir().unwrap();
        let homes = Homes::new(base.path());
        let alice = homes
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        let bob = homes
            .ensure(&UserId::new("bob").unwrap(), TEST_IDS)
            .unwrap();
        write_beneath(bob.root(), "MEMORY.md", b"bob's secret").unwrap();
        std::os::unix::fs::symlink(bob.root().join("MEMORY.md"), alice.root().join("MEMORY.md"))
            .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", alice.root().join("SOUL.md")).unwrap();
        assert!(read_beneath(alice.root(), "MEMORY.md", 1024).is_err());
        assert!(read_beneath(alice.root(), "SOUL.md", 1024).is_err());
        assert!(read_beneath(alice.root(), "../bob/MEMORY.md", 1024).is_err());
        assert!(read_beneath(alice.root(), "/etc/passwd", 1024).is_err());
        assert_eq!(read_beneath(alice.root(), "USER.md", 1024).unwrap(), None);
    }

    #[test]
    fn atomic_write_creates_parents_and_leaves_no_temp_files() {
        let base = tempfile::tempdir().unwrap();
        let homes = Homes::new(base.path());
        let home = homes
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        write_beneath(home.root(), "memory/2026-11-22.md", b"first").unwrap();
        write_beneath(home.root(), "memory/2026-11-22.md", b"second").unwrap();
        let (text, truncated) = read_beneath(home.root(), "memory/2026-11-22.md", 3)
            .unwrap()
            .unwrap();
        assert_eq!((text.as_str(), truncated), ("sec", true));
        let names: Vec<_> = std::fs::read_dir(home.root().join("memory"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(home.root()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn writes_refuse_symlinked_parent_directories() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let homes = Homes::new(base.path());
        let home = homes
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), home.root().join("memory2")).unwrap();
        assert!(write_beneath(home.root(), "memory2/x.md", b"x").is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
    #[test]
    fn homes_and_family_folders_belong_to_their_sandbox_ids() {
        use std::os::unix::fs::MetadataExt;
        if !rustix::process::geteuid().is_root() {
            println!("SKIP: ownership needs a root gateway");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let homes = Homes::new(base.path());
        let anna = SandboxIds::same(2_000_000_010);
        let home = homes.ensure(&UserId::new("anna").unwrap(), anna).unwrap();
        let meta = std::fs::metadata(home.root()).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (anna.uid, anna.gid, 0o700)
        );
        write_beneath(home.root(), "memory/note.md", b"x").unwrap();
        let note = std::fs::metadata(home.root().join("memory/note.md")).unwrap();
        assert_eq!((note.uid(), note.mode() & 0o777), (anna.uid, 0o600));

        let family = SandboxIds::same(2_000_000_011);
        let dir = homes.ensure_family("smiths", family).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (family.uid, family.gid, 0o2770)
        );
        // What the gateway writes there is the group's: members can read and change it.
        write_beneath(&dir, "plans/FAMILY.md", b"picnic").unwrap();
        let sub = std::fs::metadata(dir.join("plans")).unwrap();
        assert_eq!((sub.gid(), sub.mode() & 0o7777), (family.gid, 0o2770));
        let file = std::fs::metadata(dir.join("plans/FAMILY.md")).unwrap();
        assert_eq!((file.gid(), file.mode() & 0o7777), (family.gid, 0o660));
        // Idempotent, and a new id (a changed range) is applied to the folder itself.
        let moved = SandboxIds::same(2_000_000_012);
        homes.ensure_family("smiths", moved).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!((meta.gid(), meta.mode() & 0o7777), (moved.gid, 0o2770));
    }
}
