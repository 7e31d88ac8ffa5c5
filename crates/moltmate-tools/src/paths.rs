//! Confinement of the file tools to the caller's home (or family folder).
//!
//! The model names files by strings it controls; a prompt-injected model will try `..`, absolute
//! paths, and symbolic links planted by its own `exec` calls. String checks cannot see through
//! symlinks, so every open goes through the kernel: the root directory is opened once and every
//! path beneath it is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, which
//! fails with `EXDEV` when resolution would leave the root by any route (`..`, an absolute or a
//! relative symlink, `/proc/self/root`-style magic links). The string checks here exist only to
//! give the model nicer messages; they are never the boundary.
//!
//! Writes never follow a symlink at the final component: the new content goes to a temp file
//! created with `O_EXCL | O_NOFOLLOW` in the (beneath-resolved) parent directory and is renamed
//! over the target, which replaces a symlink rather than writing through it.

use moltmate_core::tool::{ToolContext, ToolError};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

/// Which root a model path lives under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RootKind {
    Home,
    Family,
}

/// A model path split into its root directory and the part to resolve beneath it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub kind: RootKind,
    pub root: PathBuf,
    /// Relative, never empty (`.` for the root itself).
    pub rel: PathBuf,
    /// The path as the model wrote it, for messages.
    pub shown: String,
}

/// Path components a model path may have at most. Resolution beneath the root costs work per
/// component (and creating missing parents resolves each prefix again), so a path is bounded
/// well below the kernel's 4096 bytes.
pub(crate) const MAX_PATH_COMPONENTS: usize = 128;

const OUTSIDE: &str = "paths must stay inside your home (relative paths or /workspace/...) or the family folder (family/...)";

/// Maps a model path to a root and a relative path. Pure string work; the kernel has the final say.
pub(crate) fn target(ctx: &ToolContext, raw: &str) -> Result<Target, ToolError> {
    if raw.contains('\0') {
        return Err(ToolError::InvalidArguments(
            "path contains a NUL byte".into(),
        ));
    }
    let trimmed = raw.trim();
    let (kind, rest) = if let Some(rest) = strip_root(trimmed, "/workspace") {
        (RootKind::Home, rest)
    } else if let Some(rest) =
        strip_root(trimmed, "/family").or_else(|| strip_root(trimmed, "family"))
    {
        (RootKind::Family, rest)
    } else if trimmed.starts_with('/') {
        return Err(ToolError::Refused(format!(
            "`{raw}` is outside your files: {OUTSIDE}"
        )));
    } else {
        (RootKind::Home, trimmed)
    };
    let root = match kind {
        RootKind::Home => ctx.home.root().to_path_buf(),
        RootKind::Family => match &ctx.family {
            Some(family) => family.root.clone(),
            None => {
                return Err(ToolError::Refused(format!(
                    "`{raw}` is in a family folder, but you do not belong to a family"
                )))
            }
        },
    };
    let rest = rest.trim_start_matches('/');
    if Path::new(rest).components().count() > MAX_PATH_COMPONENTS {
        return Err(ToolError::InvalidArguments(format!(
            "`{raw}` is nested too deeply: paths may have at most {MAX_PATH_COMPONENTS} parts"
        )));
    }
    // Lexical pre-check for a clear message; RESOLVE_BENEATH enforces it regardless.
    let mut depth: i64 = 0;
    for component in Path::new(rest).components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
        if depth < 0 {
            return Err(ToolError::Refused(format!(
                "`{raw}` leads outside your files through `..`: {OUTSIDE}"
            )));
        }
    }
    let rel = if rest.is_empty() {
        PathBuf::from(".")
    } else {
        PathBuf::from(rest)
    };
    Ok(Target {
        kind,
        root,
        rel,
        shown: raw.to_string(),
    })
}

/// `prefix` itself or `prefix/...`, but not `prefixfoo`.
fn strip_root<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    if rest.is_empty() || rest.starts_with('/') {
        Some(rest)
    } else {
        None
    }
}

/// Opens the root directory. The tools never create it: the gateway makes a user's home
/// (owned by their sandbox uid) before their turn, and a home that is missing during a turn
/// was wiped because the user was removed or reset — recreating it would hand what the old
/// turn writes to whoever gets the id next.
pub(crate) fn open_root(target: &Target) -> Result<OwnedFd, ToolError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    rustix::fs::open(&target.root, flags, Mode::empty()).map_err(|e| match target.kind {
        RootKind::Home if e == rustix::io::Errno::NOENT => {
            ToolError::Failed("your home directory does not exist (any more)".to_string())
        }
        RootKind::Home => ToolError::Failed(format!("your home directory cannot be opened: {e}")),
        RootKind::Family => ToolError::Failed(format!("the family folder cannot be opened: {e}")),
    })
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// `openat2` beneath `root`, retrying the kernel's `EAGAIN` (a concurrent rename was seen during
/// resolution; retrying is what the man page asks for).
pub(crate) fn open_beneath(
    root: &OwnedFd,
    rel: &Path,
    flags: OFlags,
    shown: &str,
) -> Result<OwnedFd, ToolError> {
    open_beneath_raw(root, rel, flags).map_err(|e| open_error(e, shown))
}

fn open_beneath_raw(root: &OwnedFd, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    // `openat2` refuses `O_PATH` with anything but `O_CLOEXEC`, `O_DIRECTORY`, `O_NOFOLLOW`.
    let flags = if flags.contains(OFlags::PATH) {
        flags | OFlags::CLOEXEC
    } else {
        flags | OFlags::CLOEXEC | OFlags::NOCTTY
    };
    let mut attempts = 0;
    loop {
        match rustix::fs::openat2(root, rel, flags, Mode::empty(), BENEATH) {
            Ok(fd) => return Ok(fd),
            Err(Errno::AGAIN) if attempts < 8 => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

/// What [`open_checked`] found.
pub(crate) enum Opened {
    /// A regular file, open for reading (`O_NONBLOCK`).
    File(OwnedFd, rustix::fs::Stat),
    /// A directory, open for listing.
    Directory(OwnedFd),
}

/// Opens `rel` beneath `root` so that nothing the user planted can block or trigger a driver:
/// an `O_PATH` open first (which opens nothing), `fstat`, and only a regular file or a
/// directory is then opened for real (`O_NONBLOCK`), checked to be the same inode. A FIFO, a
/// socket or a device is refused with a message naming what it is.
pub(crate) fn open_checked(root: &OwnedFd, rel: &Path, shown: &str) -> Result<Opened, ToolError> {
    let probe = open_beneath(root, rel, OFlags::PATH, shown)?;
    let seen = rustix::fs::fstat(&probe).map_err(|e| open_error(e, shown))?;
    let kind = FileType::from_raw_mode(seen.st_mode);
    let flags = match kind {
        FileType::RegularFile => OFlags::RDONLY | OFlags::NONBLOCK,
        FileType::Directory => OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK,
        other => return Err(not_a_file(shown, other)),
    };
    let fd = open_beneath(root, rel, flags, shown)?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| open_error(e, shown))?;
    if (stat.st_dev, stat.st_ino) != (seen.st_dev, seen.st_ino) {
        return Err(ToolError::Failed(format!(
            "`{shown}` was replaced while it was being opened; try again"
        )));
    }
    Ok(match kind {
        FileType::Directory => Opened::Directory(fd),
        _ => Opened::File(fd, stat),
    })
}

/// The refusal for something that is neither a regular file nor a directory.
pub(crate) fn not_a_file(shown: &str, kind: FileType) -> ToolError {
    let what = match kind {
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Symlink => "a symbolic link",
        _ => "not a regular file",
    };
    ToolError::Refused(format!(
        "`{shown}` is {what}; file tools only read regular files and directories (use exec to work with it)"
    ))
}

/// Maps an errno from resolving a model path to an answer the model can act on.
pub(crate) fn open_error(e: Errno, shown: &str) -> ToolError {
    match e {
        Errno::XDEV => ToolError::Refused(format!(
            "`{shown}` leads outside your files (through `..` or a symbolic link): {OUTSIDE}"
        )),
        Errno::LOOP => ToolError::Refused(format!(
            "`{shown}` goes through a symbolic link that cannot be followed (a loop, or a /proc magic link)"
        )),
        Errno::NOENT => ToolError::Failed(format!("`{shown}` does not exist")),
        Errno::NOTDIR => ToolError::Failed(format!("a parent of `{shown}` is not a directory")),
        Errno::ISDIR => ToolError::Failed(format!("`{shown}` is a directory")),
        Errno::ACCESS | Errno::PERM => ToolError::Failed(format!("permission denied for `{shown}`")),
        Errno::NAMETOOLONG => ToolError::InvalidArguments(format!("`{shown}` is too long")),
        Errno::NOSYS => ToolError::Refused(
            "file tools need openat2 (Linux 5.6 or newer); this server's kernel lacks it, ask the operator".into(),
        ),
        Errno::NOSPC | Errno::DQUOT => ToolError::Failed("no space left for your files".into()),
        Errno::ROFS => ToolError::Failed("your files are on a read-only filesystem".into()),
        other => ToolError::Failed(format!("`{shown}`: {other}")),
    }
}

/// Opens the directory that will contain `rel`'s last component, creating missing directories
/// one at a time when `create` is set: each parent is opened beneath the root and the new directory is made with
/// `mkdirat` on that fd, which never follows a symlink at the name it creates.
/// Returns the parent fd and the file name.
pub(crate) fn open_parent(
    root: &OwnedFd,
    target: &Target,
    create: bool,
) -> Result<(OwnedFd, String), ToolError> {
    let shown = target.shown.as_str();
    let components: Vec<Component<'_>> = target.rel.components().collect();
    let (last, parents) = match components.split_last() {
        Some((Component::Normal(name), parents)) => (name, parents),
        _ => {
            return Err(ToolError::InvalidArguments(format!(
                "`{shown}` does not name a file (it must end in a file name)"
            )))
        }
    };
    let name = last
        .to_str()
        .ok_or_else(|| ToolError::InvalidArguments(format!("`{shown}` is not valid UTF-8")))?
        .to_string();
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY;
    // The common case, an existing parent: one resolution, not one per component.
    let whole: PathBuf = std::iter::once(Component::CurDir)
        .chain(parents.iter().copied())
        .collect();
    match open_beneath_raw(root, &whole, dir_flags) {
        Ok(fd) => return Ok((fd, name)),
        Err(Errno::NOENT) if create => {}
        Err(e) => return Err(open_error(e, shown)),
    }
    let mut prefix = PathBuf::from(".");
    let mut parent = open_beneath(root, &prefix, dir_flags, shown)?;
    for component in parents {
        let next = prefix.join(component.as_os_str());
        let fd = match open_beneath_raw(root, &next, dir_flags) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create && matches!(component, Component::Normal(_)) => {
                let created = match rustix::fs::mkdirat(
                    &parent,
                    component.as_os_str(),
                    Mode::from_raw_mode(0o755),
                ) {
                    Ok(()) => true,
                    Err(Errno::EXIST) => false,
                    Err(e) => return Err(open_error(e, shown)),
                };
                let fd = open_beneath(root, &next, dir_flags, shown)?;
                if created {
                    inherit_owner(&parent, &fd);
                }
                fd
            }
            Err(e) => return Err(open_error(e, shown)),
        };
        parent = fd;
        prefix = next;
    }
    Ok((parent, name))
}

/// When the gateway runs as root, gives a new file or directory the owner of the directory it
/// was created in: homes belong to the sandbox user, and what the file tools write must stay
/// usable by the user's sandboxed commands. In a shared (setgid) family folder the new entry
/// also gets the family mode (`family_shared_mode`: `g+rw`, directories `g+rwxs`, nothing for
/// others), so other members' sandboxes can change it. The same rule as the store's home
/// writes (`moltmate_store::homes::inherit_owner`).
fn inherit_owner(parent: &OwnedFd, fd: &OwnedFd) {
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
        // fchown cleared any setgid bit; the mode is set after it.
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

/// Atomically replaces `name` in `parent` with `content`: temp file (O_EXCL, O_NOFOLLOW) in the
/// same directory, write, fsync, renameat, fsync the directory. On failure the temp file is
/// removed, so neither a half-written target nor a stray temp file remains.
pub(crate) fn atomic_write(
    parent: &OwnedFd,
    name: &str,
    content: &[u8],
    mode: u32,
    shown: &str,
) -> Result<(), ToolError> {
    let (temp_name, file) = create_temp(parent, name, mode, shown)?;
    let result = (|| -> Result<(), Errno> {
        let mut file = std::fs::File::from(file);
        file.write_all(content)
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        rustix::fs::fsync(&file)?;
        rustix::fs::renameat(parent, temp_name.as_str(), parent, name)?;
        rustix::fs::fsync(parent)
    })();
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            // Best effort: the rename may already have consumed the temp name.
            let _ = rustix::fs::unlinkat(parent, temp_name.as_str(), AtFlags::empty());
            Err(open_error(e, shown))
        }
    }
}

fn create_temp(
    parent: &OwnedFd,
    name: &str,
    mode: u32,
    shown: &str,
) -> Result<(String, OwnedFd), ToolError> {
    let flags = OFlags::WRONLY
        | OFlags::CREATE
        | OFlags::EXCL
        | OFlags::NOFOLLOW
        | OFlags::CLOEXEC
        | OFlags::NONBLOCK;
    let stem: String = name.chars().take(64).collect();
    for _ in 0..16 {
        // A fresh random name each time: nobody can plant something at it in advance, and two
        // writers never share one (O_EXCL makes a collision a retry, never a shared file).
        let temp = format!(".{stem}.{:016x}.moltmate-tmp", rand::random::<u64>());
        match rustix::fs::openat(parent, temp.as_str(), flags, Mode::from_raw_mode(mode)) {
            Ok(fd) => {
                inherit_owner(parent, &fd);
                return Ok((temp, fd));
            }
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(open_error(e, shown)),
        }
    }
    Err(ToolError::Failed(format!(
        "could not create a temporary file next to `{shown}`"
    )))
}

/// The permission bits of an existing regular file named `name` in `parent`, without following
/// a symlink there (never setuid/setgid/sticky: a rewrite does not carry those over); `None`
/// when absent or not a regular file.
pub(crate) fn existing_mode(parent: &OwnedFd, name: &str) -> Option<u32> {
    let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
    if FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile {
        Some(stat.st_mode & 0o777)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::strip_root;

    #[test]
    fn strip_root_needs_a_separator() {
        assert_eq!(strip_root("/workspace/a", "/workspace"), Some("/a"));
        assert_eq!(strip_root("/workspace", "/workspace"), Some(""));
        assert_eq!(strip_root("/workspacex/a", "/workspace"), None);
        assert_eq!(strip_root("familyx", "family"), None);
    }
}
