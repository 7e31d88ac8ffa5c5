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
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
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
    /// Something that is not a regular file where one was expected (or not a directory where
    /// one was expected): a FIFO, a socket, a device. Refused after an `O_PATH` look, without
    /// ever being opened for reading or writing, so it cannot block or trigger a driver.
    #[error("{path} is {kind}, not a {expected}; it was not opened")]
    NotAFile {
        path: String,
        kind: &'static str,
        expected: &'static str,
    },
    /// A symbolic link (or a path leading outside the root): never followed in a home.
    #[error("{path} is or goes through a symbolic link; links are not followed in homes")]
    Symlink { path: String },
    /// A directory walk or listing passed its bound (entries, depth or bytes).
    #[error("{path}: {what}")]
    TooBig { path: String, what: String },
    /// The file was replaced between the look and the open.
    #[error("{path} was replaced while it was being opened")]
    Raced { path: String },
}

impl HomeError {
    /// True when the file was refused because of what it *is* (a pipe, a link, a huge tree):
    /// the user's doing, reported to them; false for I/O failures and bad paths from code.
    pub fn is_refusal(&self) -> bool {
        match self {
            HomeError::NotAFile { .. }
            | HomeError::Symlink { .. }
            | HomeError::TooBig { .. }
            | HomeError::Raced { .. } => true,
            HomeError::Io { .. } | HomeError::BadPath(_) => false,
        }
    }

    /// Why the file was skipped, in words for its owner ("is a FIFO (named pipe), not a
    /// regular file"), without the path.
    pub fn user_reason(&self) -> String {
        match self {
            HomeError::NotAFile { kind, expected, .. } => {
                format!("it is {kind}, not a {expected}")
            }
            HomeError::Symlink { .. } => {
                "it is a symbolic link (links are not followed)".to_string()
            }
            HomeError::TooBig { what, .. } => what.clone(),
            HomeError::Raced { .. } => "it was replaced while it was being opened".to_string(),
            HomeError::Io { source, .. } => format!("it could not be read ({source})"),
            HomeError::BadPath(_) => "its name is not a valid path".to_string(),
        }
    }
}

fn io_error(path: &str, source: impl Into<std::io::Error>) -> HomeError {
    HomeError::Io {
        path: path.to_string(),
        source: source.into(),
    }
}

/// Maps an errno from a beneath-resolved open to an error: `ELOOP` (a link under
/// `RESOLVE_NO_SYMLINKS`) and `EXDEV` (an escape) are refusals, the rest I/O.
fn open_failed(path: &str, e: rustix::io::Errno) -> HomeError {
    match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => HomeError::Symlink {
            path: path.to_string(),
        },
        e => io_error(path, e),
    }
}

/// How a file type reads in a message.
pub fn describe_kind(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "an unknown kind of file",
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

    /// The moltmate home these homes live in.
    pub fn base_dir(&self) -> &Path {
        self.users_dir.parent().unwrap_or(Path::new("."))
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
        self.lock_user_with(user, rustix::fs::FlockOperation::LockExclusive)?
            .ok_or_else(|| io_error(user.as_str(), std::io::Error::other("lock not taken")))
    }

    /// Takes the user's lock if it is free; `Ok(None)` when another process holds it. Never
    /// waits, so an async caller can poll it without holding a blocking thread for the whole
    /// time another process answers that user.
    pub fn try_lock_user(&self, user: &UserId) -> Result<Option<UserLock>, HomeError> {
        self.lock_user_with(user, rustix::fs::FlockOperation::NonBlockingLockExclusive)
    }

    fn lock_user_with(
        &self,
        user: &UserId,
        operation: rustix::fs::FlockOperation,
    ) -> Result<Option<UserLock>, HomeError> {
        let dir = self
            .users_dir
            .parent()
            .unwrap_or(Path::new("."))
            .join("locks");
        let path = dir.join(format!("{}.lock", user.as_str()));
        let shown = path.display().to_string();
        // Non-blocking and not through a link: whatever sits at the path, the open returns at
        // once (the gateway takes this lock on the runtime).
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .custom_flags(libc_flags())
                .open(&path)
        };
        let file = match open() {
            Ok(file) => file,
            // The directory is made on first need, not on every poll.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_private_dir(&dir)?;
                open().map_err(|e| io_error(&shown, e))?
            }
            Err(e) => return Err(io_error(&shown, e)),
        };
        match rustix::fs::flock(&file, operation) {
            Ok(()) => Ok(Some(UserLock { _file: file })),
            Err(Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(io_error(&shown, e)),
        }
    }
}

fn libc_flags() -> i32 {
    (OFlags::NONBLOCK | OFlags::NOFOLLOW).bits() as i32
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
            let shared = moltmate_core::sandbox::family_shared_mode(own.st_mode);
            if own.st_mode & 0o7777 != shared {
                if let Err(e) = rustix::fs::fchmod(fd, Mode::from_raw_mode(shared)) {
                    tracing::warn!(error = %e, "could not share a new file with the family");
                }
            }
        }
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
    // fchown clears the setgid bit, so the mode is read again after one.
    let stat = if (stat.st_uid, stat.st_gid) != (ids.uid, ids.gid) {
        rustix::fs::fstat(&fd).map_err(|e| io_error(&shown(), e))?
    } else {
        stat
    };
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
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    // Every turn passes here for the users directory and the user's home, which are almost
    // always already private directories: one `lstat` then, instead of `mkdir` (EEXIST),
    // `stat` and `chmod`. Anything else (missing, a link, another mode) takes the full path.
    if std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.file_type().is_dir() && m.mode() & 0o7777 == 0o700)
    {
        return Ok(());
    }
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
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
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

/// `openat2` beneath `dir` with [`BENEATH`], retrying the kernel's `EAGAIN` (a concurrent
/// rename seen during resolution).
fn openat_beneath(dir: &impl AsFd, relative: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
    // `openat2` refuses `O_PATH` with flags other than these three.
    let flags = if flags.contains(OFlags::PATH) {
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW
    } else {
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY
    };
    let mut attempts = 0;
    loop {
        match rustix::fs::openat2(dir, relative, flags, Mode::empty(), BENEATH) {
            Err(Errno::AGAIN) if attempts < 8 => attempts += 1,
            other => return other,
        }
    }
}

/// What [`open_beneath`] should find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    File,
    Directory,
}

/// Opens `relative` beneath `dir` so that it cannot block: first with `O_PATH` (which opens
/// nothing: no FIFO waits for a writer, no device driver runs), `fstat`, and anything but the
/// expected kind is refused; then for real with `O_NONBLOCK`, checking that the same inode was
/// opened (a swap in between is refused too). `Ok(None)` when it does not exist.
pub fn open_beneath(
    dir: &impl AsFd,
    relative: &str,
    expect: Expect,
) -> Result<Option<(OwnedFd, rustix::fs::Stat)>, HomeError> {
    check_relative(relative)?;
    let probe = match openat_beneath(dir, relative, OFlags::PATH) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(open_failed(relative, e)),
    };
    let seen = rustix::fs::fstat(&probe).map_err(|e| io_error(relative, e))?;
    let (wanted, expected, flags) = match expect {
        Expect::File => (FileType::RegularFile, "regular file", OFlags::RDONLY),
        Expect::Directory => (
            FileType::Directory,
            "directory",
            OFlags::RDONLY | OFlags::DIRECTORY,
        ),
    };
    let refuse = |kind: FileType| HomeError::NotAFile {
        path: relative.to_string(),
        kind: describe_kind(kind),
        expected,
    };
    let kind = FileType::from_raw_mode(seen.st_mode);
    if kind == FileType::Symlink {
        // `O_PATH | O_NOFOLLOW` opens a final-component link itself instead of failing.
        return Err(HomeError::Symlink {
            path: relative.to_string(),
        });
    }
    if kind != wanted {
        return Err(refuse(kind));
    }
    let fd = match openat_beneath(dir, relative, flags | OFlags::NONBLOCK) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(open_failed(relative, e)),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| io_error(relative, e))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind != wanted {
        return Err(refuse(kind));
    }
    if (stat.st_dev, stat.st_ino) != (seen.st_dev, seen.st_ino) {
        return Err(HomeError::Raced {
            path: relative.to_string(),
        });
    }
    Ok(Some((fd, stat)))
}

/// Reads a regular file beneath `root`, at most `max_bytes` (the rest is dropped and the result
/// says so). `Ok(None)` when it does not exist. Symlinks anywhere in the path are refused, and
/// so is anything that is not a regular file (a FIFO, a socket, a device), without opening it:
/// nothing in a home can make this block. A sparse file of any apparent size costs at most
/// `max_bytes` of reading.
pub fn read_beneath(
    root: &Path,
    relative: &str,
    max_bytes: u64,
) -> Result<Option<(String, bool)>, HomeError> {
    check_relative(relative)?;
    let dir = open_root(root)?;
    read_beneath_at(&dir, relative, max_bytes)
}

/// Opens a home's (or family folder's) root directory for [`read_beneath_at`]: several files
/// read beneath one opened root cost one `open` of it, not one each. A symlink is refused.
pub fn open_dir(root: &Path) -> Result<OwnedFd, HomeError> {
    open_root(root)
}

/// [`read_beneath`] beneath an opened directory (see [`open_dir`]).
pub fn read_beneath_at(
    dir: &impl AsFd,
    relative: &str,
    max_bytes: u64,
) -> Result<Option<(String, bool)>, HomeError> {
    let Some((fd, stat)) = open_beneath(dir, relative, Expect::File)? else {
        return Ok(None);
    };
    // Sized from the file, within the limit: one read and the one that finds the end, not a
    // series of small doubling reads (these files are read on every turn). The size is only a
    // hint — the file may change meanwhile — and `take` bounds what is read whatever it says.
    let hint = u64::try_from(stat.st_size)
        .unwrap_or(0)
        .min(max_bytes)
        .min(MAX_READ_HINT)
        .saturating_add(1);
    let mut bytes = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    let mut file = std::fs::File::from(fd);
    (&mut file)
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(relative, e))?;
    let truncated = bytes.len() as u64 > max_bytes;
    bytes.truncate(usize::try_from(max_bytes).unwrap_or(usize::MAX));
    Ok(Some((
        String::from_utf8_lossy(&bytes).into_owned(),
        truncated,
    )))
}

/// The most [`read_beneath_at`] allocates ahead from a file's size (a larger file grows the
/// buffer as it is read).
const MAX_READ_HINT: u64 = 1 << 20;

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// From the directory entry (`d_type`), not from opening it: for display and filtering.
    pub kind: FileType,
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        self.kind == FileType::Directory
    }
}

/// A bounded directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Entries read, sorted by name, without `.` and `..` and names that are not UTF-8.
    pub entries: Vec<Entry>,
    /// False when the directory has more than the bound allowed reading.
    pub complete: bool,
    /// Entries read whose names are not UTF-8 (left out of `entries`).
    pub non_utf8: usize,
}

/// Lists a directory beneath `root` (`"."` for the root itself), reading at most `max_entries`
/// entries: a directory of millions of entries costs a bounded amount of work, and the result
/// says it is incomplete. `Ok(None)` when it does not exist; refused when it is not a directory
/// or goes through a symlink.
pub fn list_beneath(
    root: &Path,
    relative: &str,
    max_entries: usize,
) -> Result<Option<Listing>, HomeError> {
    let dir = open_root(root)?;
    let fd = if relative == "." {
        dir
    } else {
        match open_beneath(&dir, relative, Expect::Directory)? {
            Some((fd, _)) => fd,
            None => return Ok(None),
        }
    };
    list_fd(fd, relative, max_entries).map(Some)
}

fn list_fd(fd: OwnedFd, shown: &str, max_entries: usize) -> Result<Listing, HomeError> {
    let dir = rustix::fs::Dir::new(fd).map_err(|e| io_error(shown, e))?;
    let mut entries = Vec::new();
    let mut complete = true;
    let mut non_utf8 = 0;
    // Counted as read, not as kept: a million names that are not UTF-8 cost the bound too.
    let mut read = 0usize;
    for entry in dir {
        let entry = entry.map_err(|e| io_error(shown, e))?;
        let bytes = entry.file_name().to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        if read >= max_entries {
            complete = false;
            break;
        }
        read += 1;
        if let Ok(name) = std::str::from_utf8(bytes) {
            entries.push(Entry {
                name: name.to_string(),
                kind: entry.file_type(),
            });
        } else {
            non_utf8 += 1;
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Listing {
        entries,
        complete,
        non_utf8,
    })
}

/// Writes `content` to `relative` beneath `root` atomically: parent directories are created
/// beneath the root, the data goes to a temporary file that is fsynced and renamed over the
/// target, and the directory is fsynced so the rename itself survives a crash.
///
/// The temporary file gets a fresh random name and is created with `O_CREAT | O_EXCL |
/// O_NOFOLLOW`: two writers never share one, and a FIFO or symlink planted at a guessed name
/// is never opened (the name is simply taken and another is drawn). On any failure the
/// temporary file is removed.
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
                Err(Errno::EXIST) => false,
                Err(e) => return Err(io_error(relative, e)),
            };
            let name = name
                .to_str()
                .ok_or_else(|| HomeError::BadPath(relative.to_string()))?;
            let child = match open_beneath(&dir, name, Expect::Directory)? {
                Some((fd, _)) => fd,
                None => {
                    return Err(io_error(
                        relative,
                        std::io::Error::from(std::io::ErrorKind::NotFound),
                    ))
                }
            };
            if created {
                inherit_owner(&dir, &child);
            }
            dir = child;
        }
    }
    let (temp_name, fd) = create_temp(&dir, file_name, relative)?;
    inherit_owner(&dir, &fd);
    let mut file = std::fs::File::from(fd);
    let written = file
        .write_all(content)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error(relative, e))
        .and_then(|()| {
            rustix::fs::renameat(&dir, temp_name.as_str(), &dir, file_name)
                .map_err(|e| io_error(relative, e))
        });
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(&dir, temp_name.as_str(), AtFlags::empty());
        return Err(e);
    }
    rustix::fs::fsync(&dir).map_err(|e| io_error(relative, e))?;
    Ok(())
}

/// Name prefix of the gateway's temporary files (`.<name>.<random>.moltmate-tmp`).
pub const TEMP_SUFFIX: &str = ".moltmate-tmp";

/// Creates a fresh temporary file next to `file_name`: random name, `O_EXCL`, never a link.
fn create_temp(
    dir: &OwnedFd,
    file_name: &str,
    shown: &str,
) -> Result<(String, OwnedFd), HomeError> {
    let stem: String = file_name.chars().take(64).collect();
    for _ in 0..16 {
        let temp = format!(".{stem}.{:016x}{TEMP_SUFFIX}", rand::random::<u64>());
        match rustix::fs::openat(
            dir,
            temp.as_str(),
            OFlags::WRONLY
                | OFlags::CREATE
                | OFlags::EXCL
                | OFlags::NOFOLLOW
                | OFlags::CLOEXEC
                | OFlags::NONBLOCK,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => return Ok((temp, fd)),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(io_error(shown, e)),
        }
    }
    Err(io_error(
        shown,
        std::io::Error::other("no free temporary file name after 16 attempts"),
    ))
}

/// Bounds of [`copy_tree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyLimits {
    /// Directories nested deeper than this are not copied.
    pub max_depth: usize,
    /// Entries (files, links, directories) copied at most, and per directory read at most.
    pub max_entries: usize,
    /// Bytes of file content copied at most; a file that does not fit is skipped.
    pub max_bytes: u64,
}

impl Default for CopyLimits {
    fn default() -> Self {
        CopyLimits {
            max_depth: 64,
            max_entries: 200_000,
            max_bytes: 8 << 30,
        }
    }
}

/// What [`copy_tree`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub files: u64,
    pub bytes: u64,
    /// Paths not copied and why (at most 1000 listed; `skipped_total` counts all).
    pub skipped: Vec<String>,
    pub skipped_total: u64,
}

impl CopyReport {
    fn skip(&mut self, path: &str, why: &str) {
        self.skipped_total += 1;
        if self.skipped.len() < 1000 {
            self.skipped.push(format!("{path}: {why}"));
        }
    }
}

/// What [`walk_tree`] found at one path, with the file already opened (never blocking).
pub enum WalkEntry {
    Directory,
    /// A regular file, opened read-only with `O_NONBLOCK` (the inode the walk checked).
    File(std::fs::File),
    /// A symbolic link and its target, never followed.
    Symlink(std::ffi::OsString),
}

/// One item of a walk: its path relative to the walked root (`"."` for the root itself,
/// then `a`, `a/b`, ... — parents always before their children), its `lstat`, and the entry.
pub struct Walked<'a> {
    pub path: &'a str,
    pub stat: &'a rustix::fs::Stat,
    pub entry: WalkEntry,
}

/// Walks the tree at `from` (a home, a family folder: anything a user may have filled)
/// depth-first and hands each directory, regular file and symlink to `visit`, bounded by
/// `limits`: never follows a symlink, never opens anything that is not a regular file or
/// directory (FIFOs, sockets and devices are skipped and reported), stops descending at
/// `max_depth`, reads at most `max_entries` entries, and skips files that do not fit the
/// remaining `max_bytes` (so a sparse file of huge apparent size is skipped, not read). Names
/// that are not UTF-8 are skipped and reported. What it skips is in the report, so a hostile
/// tree can neither block nor fail the walk; an error from `visit` ends it.
pub fn walk_tree(
    from: &Path,
    limits: CopyLimits,
    visit: &mut dyn FnMut(Walked<'_>) -> Result<(), HomeError>,
) -> Result<CopyReport, HomeError> {
    walk_tree_at(open_root(from)?, limits, visit)
}

/// [`walk_tree`] of a directory already opened (with `O_NOFOLLOW`, e.g. by [`open_beneath`]
/// from a handle of its parent), so no path is resolved again.
pub fn walk_tree_at(
    source: OwnedFd,
    limits: CopyLimits,
    visit: &mut dyn FnMut(Walked<'_>) -> Result<(), HomeError>,
) -> Result<CopyReport, HomeError> {
    let stat = rustix::fs::fstat(&source).map_err(|e| io_error(".", e))?;
    visit(Walked {
        path: ".",
        stat: &stat,
        entry: WalkEntry::Directory,
    })?;
    let mut report = CopyReport::default();
    let mut budget = Budget {
        entries: limits.max_entries,
        bytes: limits.max_bytes,
    };
    walk_dir(&source, "", 0, &limits, &mut budget, &mut report, visit)?;
    Ok(report)
}

/// Copies the tree at `from` (a home) into the new directory `to` with [`walk_tree`]'s rules
/// and bounds: links are copied as links, files as 0600 and directories as 0700 (owned by the
/// gateway). What was skipped is in the report, so a hostile home cannot block or fail the
/// copy (which precedes `users reset` and `users remove`), nor fill the disk with a sparse file
/// of huge apparent size.
pub fn copy_tree(from: &Path, to: &Path, limits: CopyLimits) -> Result<CopyReport, HomeError> {
    create_private_dir(to)?;
    // Target directories of the current walk path, innermost last: the walk is depth-first
    // with parents first, so a new item's parent is always on the stack.
    let mut stack: Vec<(String, OwnedFd)> = vec![(String::new(), open_root(to)?)];
    let mut copy = |item: Walked<'_>| -> Result<(), HomeError> {
        if item.path == "." {
            return Ok(());
        }
        let (parent, name) = match item.path.rsplit_once('/') {
            Some((parent, name)) => (parent, name),
            None => ("", item.path),
        };
        while stack.len() > 1 && stack.last().is_some_and(|(p, _)| p != parent) {
            stack.pop();
        }
        // The parent was not made in the target (it could not be): its subtree is not copied.
        let Some((_, target)) = stack.last().filter(|(p, _)| p == parent) else {
            return Ok(());
        };
        match item.entry {
            WalkEntry::Directory => {
                match rustix::fs::mkdirat(target, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_error(item.path, e)),
                }
                if let Some((fd, _)) = open_beneath(target, name, Expect::Directory)? {
                    stack.push((item.path.to_string(), fd));
                }
            }
            WalkEntry::Symlink(link) => match rustix::fs::symlinkat(link.as_os_str(), target, name)
            {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(io_error(item.path, e)),
            },
            WalkEntry::File(file) => {
                let size = u64::try_from(item.stat.st_size).unwrap_or(0);
                let out = rustix::fs::openat(
                    target,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io_error(item.path, e))?;
                // At most the size the walk budgeted for: a file that grows meanwhile is cut.
                // Holes stay holes.
                copy_keeping_holes(file, &mut std::fs::File::from(out), size)
                    .map_err(|e| io_error(item.path, e))?;
            }
        }
        Ok(())
    };
    walk_tree(from, limits, &mut copy)
}

struct Budget {
    entries: usize,
    bytes: u64,
}

/// A file larger than this whose apparent size is more than [`SPARSE_RATIO`] times what it
/// occupies is skipped by [`walk_tree`] (and listed): a hostile sparse file is not read.
pub const SPARSE_MIN_BYTES: u64 = 64 << 20;
/// See [`SPARSE_MIN_BYTES`].
pub const SPARSE_RATIO: u64 = 8;

/// Copies at most `size` bytes of `from` into the new file `to`, leaving holes where whole
/// blocks of zeros are (a file with holes stays one; runs of zeros become holes), and gives
/// `to` the length copied. Returns the bytes copied.
pub fn copy_keeping_holes(
    mut from: impl Read,
    to: &mut std::fs::File,
    size: u64,
) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while total < size {
        let want = usize::try_from((size - total).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = from.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        write_keeping_holes(to, &buf[..n])?;
        total += n as u64;
    }
    to.seek(SeekFrom::Start(total))?;
    to.set_len(total)?;
    Ok(total)
}

/// Writes `chunk` at the current position of `to`, or seeks over it when it is all zeros (the
/// caller sets the final length with `set_len`).
pub fn write_keeping_holes(to: &mut std::fs::File, chunk: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    if chunk.iter().all(|b| *b == 0) {
        to.seek(SeekFrom::Current(
            i64::try_from(chunk.len()).unwrap_or(i64::MAX),
        ))?;
        Ok(())
    } else {
        to.write_all(chunk)
    }
}

fn walk_dir(
    source: &OwnedFd,
    prefix: &str,
    depth: usize,
    limits: &CopyLimits,
    budget: &mut Budget,
    report: &mut CopyReport,
    visit: &mut dyn FnMut(Walked<'_>) -> Result<(), HomeError>,
) -> Result<(), HomeError> {
    let shown = if prefix.is_empty() { "." } else { prefix };
    let reopened = rustix::fs::openat(
        source,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| io_error(shown, e))?;
    let listing = list_fd(reopened, shown, budget.entries.min(limits.max_entries))?;
    if !listing.complete {
        report.skip(shown, "too many entries; only the first were copied");
    }
    if listing.non_utf8 > 0 {
        report.skip(
            shown,
            &format!(
                "{} name(s) that are not UTF-8 were left out",
                listing.non_utf8
            ),
        );
    }
    for entry in listing.entries {
        let path = format!("{prefix}{}", entry.name);
        if budget.entries == 0 {
            report.skip(&path, "entry limit reached");
            continue;
        }
        budget.entries -= 1;
        let name = entry.name.as_str();
        let kind = match entry.kind {
            // Some filesystems do not fill `d_type`; a no-follow stat opens nothing.
            FileType::Unknown => {
                match rustix::fs::statat(source, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(stat) => FileType::from_raw_mode(stat.st_mode),
                    Err(_) => continue,
                }
            }
            kind => kind,
        };
        match kind {
            FileType::Directory => {
                if depth + 1 >= limits.max_depth {
                    report.skip(&path, "nested too deep");
                    continue;
                }
                let (child, stat) = match open_beneath(source, name, Expect::Directory) {
                    Ok(Some(opened)) => opened,
                    Ok(None) => continue,
                    Err(e) => {
                        report.skip(&path, &e.user_reason());
                        continue;
                    }
                };
                visit(Walked {
                    path: &path,
                    stat: &stat,
                    entry: WalkEntry::Directory,
                })?;
                walk_dir(
                    &child,
                    &format!("{path}/"),
                    depth + 1,
                    limits,
                    budget,
                    report,
                    visit,
                )?;
            }
            FileType::Symlink => {
                let stat = match rustix::fs::statat(source, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(stat) => stat,
                    Err(_) => continue,
                };
                let link = match rustix::fs::readlinkat(source, name, Vec::new()) {
                    Ok(link) => link,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(io_error(&path, e)),
                };
                use std::os::unix::ffi::OsStringExt;
                visit(Walked {
                    path: &path,
                    stat: &stat,
                    entry: WalkEntry::Symlink(std::ffi::OsString::from_vec(link.into_bytes())),
                })?;
            }
            FileType::RegularFile => {
                let (fd, stat) = match open_beneath(source, name, Expect::File) {
                    Ok(Some(opened)) => opened,
                    Ok(None) => continue,
                    Err(e) => {
                        report.skip(&path, &e.user_reason());
                        continue;
                    }
                };
                let size = u64::try_from(stat.st_size).unwrap_or(0);
                if size > budget.bytes {
                    report.skip(&path, &format!("{size} bytes is over the copy limit"));
                    continue;
                }
                let allocated = u64::try_from(stat.st_blocks)
                    .unwrap_or(0)
                    .saturating_mul(512);
                if size > SPARSE_MIN_BYTES && size / SPARSE_RATIO > allocated {
                    // Costs no disk where it is; read, it is `size` bytes of zeros to every
                    // copy, backup and restore.
                    report.skip(
                        &path,
                        &format!("a sparse file ({size} bytes, {allocated} allocated)"),
                    );
                    continue;
                }
                budget.bytes -= size;
                report.files += 1;
                report.bytes += size;
                visit(Walked {
                    path: &path,
                    stat: &stat,
                    entry: WalkEntry::File(std::fs::File::from(fd)),
                })?;
            }
            other => report.skip(&path, &format!("it is {}", describe_kind(other))),
        }
    }
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

    /// `ensure` checks with one `lstat` when the directories are already private; one an
    /// operator opened up (or a file where a directory belongs) still takes the full path.
    #[test]
    fn ensure_tightens_an_opened_up_users_directory_and_home_on_every_call() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let homes = Homes::new(base.path());
        let user = UserId::new("anna").unwrap();
        let ids = TEST_IDS;
        let home = homes.ensure(&user, ids).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let users = home.root().parent().unwrap().to_path_buf();
        for round in 0..2 {
            std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(home.root(), std::fs::Permissions::from_mode(0o750)).unwrap();
            homes.ensure(&user, ids).unwrap();
            assert_eq!(
                (mode(&users), mode(home.root())),
                (0o700, 0o700),
                "round {round}"
            );
        }
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

    /// Makes a FIFO at `path` (what a sandboxed `mkfifo` does).
    fn mkfifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }

    /// Runs `f` on a thread and fails the test (rather than hanging it) if it does not return
    /// within 20 s: the old code blocked forever on these inputs.
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = send.send(f());
        });
        receive
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the call blocked (a hostile file must never block a read or write)")
    }

    #[test]
    fn fifo_as_soul_md_is_refused_without_blocking() {
        let base = tempfile::tempdir().unwrap();
        let home = Homes::new(base.path())
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        mkfifo(&home.root().join("SOUL.md"));
        let root = home.root().to_path_buf();
        let error = within(move || read_beneath(&root, "SOUL.md", 1024)).unwrap_err();
        assert!(error.is_refusal(), "{error}");
        assert!(
            matches!(error, HomeError::NotAFile { kind, .. } if kind.contains("FIFO")),
            "{error}"
        );
        assert!(
            error.user_reason().contains("FIFO"),
            "{}",
            error.user_reason()
        );
        // A write replaces the FIFO rather than opening it.
        let root = home.root().to_path_buf();
        within(move || write_beneath(&root, "SOUL.md", b"be kind")).unwrap();
        assert_eq!(
            read_beneath(home.root(), "SOUL.md", 1024).unwrap(),
            Some(("be kind".to_string(), false))
        );
    }

    #[test]
    fn socket_and_device_nodes_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let home = Homes::new(base.path())
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        let _listener =
            std::os::unix::net::UnixListener::bind(home.root().join("USER.md")).unwrap();
        let error = read_beneath(home.root(), "USER.md", 1024).unwrap_err();
        assert!(
            matches!(
                error,
                HomeError::NotAFile {
                    kind: "a socket",
                    ..
                }
            ),
            "{error}"
        );
        // A /dev node reached through a symlink is refused at the link, never opened.
        for device in ["/dev/zero", "/dev/tty", "/dev/random"] {
            let name = format!("dev-{}.md", device.rsplit('/').next().unwrap());
            std::os::unix::fs::symlink(device, home.root().join(&name)).unwrap();
            let error = read_beneath(home.root(), &name, 1024).unwrap_err();
            assert!(matches!(error, HomeError::Symlink { .. }), "{error}");
        }
        // A device node itself (only root can make one; the test runs as root in CI).
        if rustix::process::geteuid().is_root() {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                home.root().join("MEMORY.md"),
                FileType::CharacterDevice,
                Mode::from_raw_mode(0o600),
                rustix::fs::makedev(1, 5), // /dev/zero
            )
            .unwrap();
            let error = read_beneath(home.root(), "MEMORY.md", 1024).unwrap_err();
            assert!(
                matches!(
                    error,
                    HomeError::NotAFile {
                        kind: "a character device",
                        ..
                    }
                ),
                "{error}"
            );
        }
    }

    #[test]
    fn symlink_loops_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let home = Homes::new(base.path())
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        std::os::unix::fs::symlink("b.md", home.root().join("a.md")).unwrap();
        std::os::unix::fs::symlink("a.md", home.root().join("b.md")).unwrap();
        std::os::unix::fs::symlink(".", home.root().join("memory/loop")).unwrap();
        for path in ["a.md", "memory/loop/loop/loop/x.md"] {
            let error = read_beneath(home.root(), path, 1024).unwrap_err();
            assert!(
                matches!(error, HomeError::Symlink { .. }),
                "{path}: {error}"
            );
        }
        assert!(matches!(
            list_beneath(home.root(), "memory/loop", 10).unwrap_err(),
            HomeError::Symlink { .. }
        ));
    }

    #[test]
    fn sparse_100_gb_file_read_is_capped() {
        let base = tempfile::tempdir().unwrap();
        let home = Homes::new(base.path())
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        let file = std::fs::File::create(home.root().join("MEMORY.md")).unwrap();
        file.set_len(100 << 30).unwrap();
        let (text, truncated) = read_beneath(home.root(), "MEMORY.md", 4096)
            .unwrap()
            .unwrap();
        assert_eq!((text.len(), truncated), (4096, true));
    }

    #[test]
    fn listing_a_directory_of_100k_entries_is_bounded() {
        let base = tempfile::tempdir().unwrap();
        let home = Homes::new(base.path())
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        let memory = home.root().join("memory");
        for i in 0..100_000 {
            std::fs::File::create(memory.join(format!("{i:06}.md"))).unwrap();
        }
        let listing = list_beneath(home.root(), "memory", 5_000).unwrap().unwrap();
        assert_eq!(listing.entries.len(), 5_000);
        assert!(!listing.complete);
        let small = list_beneath(home.root(), ".", 5_000).unwrap().unwrap();
        assert!(small.complete);
        assert_eq!(small.entries.len(), STANDARD_DIRECTORIES.len());
    }

    #[test]
    fn concurrent_writers_of_one_file_never_collide_or_leave_temp_files() {
        let base = tempfile::tempdir().unwrap();
        let home = Homes::new(base.path())
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        let writers: Vec<_> = (0..8)
            .map(|writer| {
                let root = home.root().to_path_buf();
                std::thread::spawn(move || {
                    for round in 0..50 {
                        let content = format!("writer {writer} round {round}\n").repeat(100);
                        write_beneath(&root, "memory/today.md", content.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let (text, _) = read_beneath(home.root(), "memory/today.md", 1 << 20)
            .unwrap()
            .unwrap();
        let first = text.lines().next().unwrap().to_string();
        assert!(
            text.lines().all(|line| line == first),
            "one writer's whole content, never a mix"
        );
        let names: Vec<_> = std::fs::read_dir(home.root().join("memory"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["today.md".to_string()], "no temp file left");
    }

    #[test]
    fn planted_files_at_temp_names_are_never_opened() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let home = Homes::new(base.path())
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        // The old temp name was `.<name>.tmp-<pid>`: a FIFO there blocked the write, a symlink
        // there redirected it.
        mkfifo(
            &home
                .root()
                .join(format!(".SOUL.md.tmp-{}", std::process::id())),
        );
        std::os::unix::fs::symlink(
            outside.path().join("stolen"),
            home.root()
                .join(format!(".USER.md.tmp-{}", std::process::id())),
        )
        .unwrap();
        let root = home.root().to_path_buf();
        within(move || {
            write_beneath(&root, "SOUL.md", b"soul").unwrap();
            write_beneath(&root, "USER.md", b"user").unwrap();
        });
        assert!(!outside.path().join("stolen").exists());
        assert_eq!(
            read_beneath(home.root(), "USER.md", 64).unwrap(),
            Some(("user".to_string(), false))
        );
    }

    #[test]
    fn copying_a_hostile_home_is_bounded_and_skips_what_it_cannot_copy() {
        let base = tempfile::tempdir().unwrap();
        let home = Homes::new(base.path())
            .ensure(&UserId::new("alice").unwrap(), TEST_IDS)
            .unwrap();
        write_beneath(home.root(), "MEMORY.md", b"keep me").unwrap();
        mkfifo(&home.root().join("SOUL.md"));
        let _listener = std::os::unix::net::UnixListener::bind(home.root().join("sock")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", home.root().join("link")).unwrap();
        std::fs::File::create(home.root().join("sparse"))
            .unwrap()
            .set_len(100 << 30)
            .unwrap();
        // 1000 nested directories.
        let mut deep = home.root().join("workspace");
        for _ in 0..1000 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();

        let to = base.path().join("archive");
        let root = home.root().to_path_buf();
        let target = to.clone();
        let report = within(move || {
            copy_tree(
                &root,
                &target,
                CopyLimits {
                    max_depth: 32,
                    max_entries: 10_000,
                    max_bytes: 1 << 20,
                },
            )
        })
        .unwrap();
        assert_eq!(std::fs::read(to.join("MEMORY.md")).unwrap(), b"keep me");
        assert_eq!(
            std::fs::read_link(to.join("link")).unwrap(),
            Path::new("/etc/passwd"),
            "links are copied as links, never followed"
        );
        assert!(!to.join("SOUL.md").exists() && !to.join("sock").exists());
        assert!(!to.join("sparse").exists());
        let skipped = report.skipped.join("\n");
        for expected in [
            "SOUL.md: it is a FIFO",
            "sock: it is a socket",
            "sparse:",
            "nested too deep",
        ] {
            assert!(
                skipped.contains(expected),
                "{expected} missing in {skipped}"
            );
        }
        assert_eq!(report.bytes, 7);
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
