//! Permissions of the home: config and credential files 0600, directories 0700 (ARCHITECTURE.md
//! invariant 8), and [`fix`], which repairs exactly what these checks find.
//!
//! Every path is looked at through an `O_PATH` descriptor (opens nothing: a FIFO cannot block,
//! no device driver runs) and `fstat`; entries that must be directories are not followed when
//! they are symlinks. Repairs `chmod` through `/proc/self/fd/N` of that same descriptor after
//! checking it is still the kind of file that was found, so a swapped path is not repaired.

use crate::list_some;
use moltmate_config::Config;
use moltmate_core::doctor::{Check, CheckStatus};
use rustix::fs::{FileType, Mode, OFlags, CWD};
use rustix::io::Errno;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Entries looked at per listed directory (`users/`, `families/`, `index/`).
pub(crate) const MAX_ENTRIES: usize = 10_000;
/// Paths named per check line.
const SHOWN: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Dir,
    File,
    /// A family folder: 0700, or shared with its family's own group — 2770 (setgid) owned by
    /// a group that is neither root's nor the gateway's. Group bits are never stripped there.
    FamilyDir,
}

impl Want {
    fn mode(self) -> u32 {
        match self {
            Want::Dir | Want::FamilyDir => 0o700,
            Want::File => 0o600,
        }
    }

    fn kind(self) -> FileType {
        match self {
            Want::Dir | Want::FamilyDir => FileType::Directory,
            Want::File => FileType::RegularFile,
        }
    }
}

/// A group of its own (a family's gid from the sandbox range): not root's, not the gateway's.
fn own_group(gid: u32) -> bool {
    gid != 0 && gid != rustix::process::getegid().as_raw()
}

/// Whether `mode` (of a `want` owned by group `gid`) gives too much away.
fn too_open(want: Want, mode: u32, gid: u32) -> bool {
    match want {
        Want::Dir | Want::File => mode & 0o077 != 0,
        Want::FamilyDir => mode & 0o007 != 0 || (mode & 0o070 != 0 && !own_group(gid)),
    }
}

/// What [`fix`] makes of `mode`: others' bits always gone; a family folder shared with its own
/// group keeps its group bits and setgid.
fn repaired(want: Want, mode: u32, gid: u32) -> u32 {
    match want {
        Want::FamilyDir if own_group(gid) => mode & 0o2770,
        _ => mode & 0o700,
    }
}

/// One path a check looks at.
#[derive(Debug, Clone)]
struct Item {
    path: PathBuf,
    /// The directory the item is opened in (by its file name), opened once without following
    /// links: a `users/` swapped for a link to `/etc` afterwards changes nothing. `None`: the
    /// item is opened by its path.
    at: Option<Arc<OwnedFd>>,
    want: Want,
    /// Follow a symlink (the config may be a link to /etc/moltmate/...); entries that must be
    /// the gateway's own directories are not followed.
    follow: bool,
    /// Missing is a problem (fixable by creating a directory).
    required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Finding {
    Missing,
    Mode(u32, u32),
    /// A file that is a symlink (looked at through it, never repaired through it).
    Link(u32),
    Kind(&'static str),
    Error(String),
}

struct Group {
    id: &'static str,
    title: &'static str,
    items: Vec<Item>,
    /// Said when nothing of the group exists yet.
    absent: &'static str,
    /// Listing a directory stopped at [`MAX_ENTRIES`].
    truncated: Option<String>,
}

fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown kind",
    }
}

fn open_path(item: &Item) -> Result<Option<(OwnedFd, rustix::fs::Stat)>, Errno> {
    let mut flags = OFlags::PATH | OFlags::CLOEXEC;
    if !item.follow {
        flags |= OFlags::NOFOLLOW;
    }
    let opened = match (&item.at, item.path.file_name()) {
        (Some(dir), Some(name)) => rustix::fs::openat(dir, name, flags, Mode::empty()),
        _ => rustix::fs::openat(CWD, &item.path, flags, Mode::empty()),
    };
    match opened {
        Ok(fd) => {
            let stat = rustix::fs::fstat(&fd)?;
            Ok(Some((fd, stat)))
        }
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn inspect(item: &Item) -> Option<Finding> {
    match open_path(item) {
        Ok(None) => item.required.then_some(Finding::Missing),
        Ok(Some((_, stat))) => {
            let kind = FileType::from_raw_mode(stat.st_mode);
            if kind != item.want.kind() {
                return Some(Finding::Kind(kind_name(kind)));
            }
            let mode = stat.st_mode & 0o7777;
            if !too_open(item.want, mode, stat.st_gid) {
                return None;
            }
            if item.want == Want::File && item.follow && is_link(&item.path) {
                return Some(Finding::Link(mode));
            }
            Some(Finding::Mode(mode, stat.st_gid))
        }
        Err(e) => Some(Finding::Error(e.to_string())),
    }
}

fn is_link(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// One entry of a listed directory: its path, and whether it is a directory (not followed).
struct Entry {
    path: PathBuf,
    is_dir: bool,
}

/// Entries of `dir` — opened once, without following a link (a link there lists nothing; its
/// own item reports it) — at most [`MAX_ENTRIES`]; with the directory's handle, which the
/// entries' items are opened in. The last value says whether there were more.
fn entries(dir: &Path) -> (Option<Arc<OwnedFd>>, Vec<Entry>, bool) {
    let mut out = Vec::new();
    let Ok(fd) = rustix::fs::openat(
        CWD,
        dir,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) else {
        return (None, out, false);
    };
    let Ok(listing) = rustix::fs::Dir::read_from(&fd) else {
        return (None, out, false);
    };
    let mut more = false;
    for entry in listing.flatten() {
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if out.len() >= MAX_ENTRIES {
            more = true;
            break;
        }
        let is_dir = match entry.file_type() {
            FileType::Unknown => rustix::fs::statat(
                &fd,
                entry.file_name(),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory),
            kind => kind == FileType::Directory,
        };
        use std::os::unix::ffi::OsStrExt;
        out.push(Entry {
            path: dir.join(std::ffi::OsStr::from_bytes(name)),
            is_dir,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    (Some(Arc::new(fd)), out, more)
}

fn dir_item(path: PathBuf, required: bool) -> Item {
    Item {
        path,
        at: None,
        want: Want::Dir,
        follow: false,
        required,
    }
}

/// A file of the gateway's own at the home's top level: a link there is reported, never
/// followed or repaired through.
fn file_item(path: PathBuf) -> Item {
    Item {
        path,
        at: None,
        want: Want::File,
        follow: false,
        required: false,
    }
}

fn groups(home: &Path, config: Option<&Config>) -> Vec<Group> {
    let database_exists = home.join("moltmate.db").exists();
    let mut out = vec![
        Group {
            id: "perm.home",
            title: "Home directory is private (0700)",
            items: vec![Item {
                path: home.to_path_buf(),
                at: None,
                want: Want::Dir,
                // `--home` may well be a symlink to the real place; what counts is the target.
                follow: true,
                required: true,
            }],
            absent: "",
            truncated: None,
        },
        Group {
            id: "perm.config",
            title: "moltmate.json is private (0600)",
            // The config may be a link to /etc/moltmate/...: looked at through it, but a mode
            // wrong there is for the operator to repair, never `--fix` through the link.
            items: vec![Item {
                follow: true,
                ..file_item(home.join("moltmate.json"))
            }],
            absent: "no moltmate.json (the gateway runs on defaults)",
            truncated: None,
        },
        Group {
            id: "perm.database",
            title: "Database is private (0600)",
            items: ["moltmate.db", "moltmate.db-wal", "moltmate.db-shm"]
                .iter()
                .map(|name| file_item(home.join(name)))
                .collect(),
            absent: "no database yet",
            truncated: None,
        },
        Group {
            id: "perm.admin_token",
            title: "admin.token is private (0600)",
            items: vec![file_item(home.join("admin.token"))],
            absent: "no admin.token (gateway.auth.token is used, or serve has not run yet)",
            truncated: None,
        },
    ];

    // index/: the directory and every per-user index file in it.
    let index = home.join("index");
    let (index_fd, index_entries, index_more) = entries(&index);
    let mut index_items = vec![dir_item(index.clone(), database_exists)];
    for entry in index_entries {
        index_items.push(Item {
            at: index_fd.clone(),
            ..if entry.is_dir {
                dir_item(entry.path, false)
            } else {
                file_item(entry.path)
            }
        });
    }
    out.push(Group {
        id: "perm.index",
        title: "Memory index is private (0700 / 0600)",
        items: index_items,
        absent: "no memory index yet",
        truncated: index_more.then(|| index.display().to_string()),
    });

    // users/ and every home in it.
    let users = home.join("users");
    let (users_fd, user_entries, users_more) = entries(&users);
    let mut user_items = vec![dir_item(users.clone(), database_exists)];
    user_items.extend(user_entries.into_iter().map(|e| Item {
        at: users_fd.clone(),
        ..dir_item(e.path, false)
    }));
    out.push(Group {
        id: "perm.users",
        title: "Users' homes are private (0700)",
        items: user_items,
        absent: "no users' homes yet",
        truncated: users_more.then(|| users.display().to_string()),
    });

    // families/ and every family folder.
    let families = home.join("families");
    let (families_fd, family_entries, families_more) = entries(&families);
    let families_configured = config.is_some_and(|c| !c.families.is_empty());
    let mut family_items = vec![dir_item(
        families.clone(),
        database_exists && families_configured,
    )];
    family_items.extend(family_entries.into_iter().map(|e| Item {
        at: families_fd.clone(),
        want: Want::FamilyDir,
        ..dir_item(e.path, false)
    }));
    out.push(Group {
        id: "perm.families",
        title: "Family folders are private (0700, or 2770 shared with the family's own group)",
        items: family_items,
        absent: "no family folders",
        truncated: families_more.then(|| families.display().to_string()),
    });

    out.push(Group {
        id: "perm.state",
        title: "State directories are private (0700)",
        items: ["sandboxes", "locks", "archive", "personas", "backups"]
            .iter()
            .map(|name| dir_item(home.join(name), false))
            .collect(),
        absent: "none of sandboxes/, locks/, archive/, personas/, backups/ exists yet",
        truncated: None,
    });
    out
}

fn describe(path: &Path, finding: &Finding, want: Want) -> String {
    let shown = path.display();
    match finding {
        Finding::Missing => format!("{shown} is missing"),
        Finding::Mode(mode, _) if want == Want::FamilyDir => {
            format!("{shown} is {mode:04o} (want 0700, or 2770 owned by the family's own group)")
        }
        Finding::Mode(mode, _) => format!("{shown} is {mode:04o} (want {:04o})", want.mode()),
        Finding::Link(mode) => format!(
            "{shown} is a symlink to a file of mode {mode:04o} (want {:04o}); repair the target by hand",
            want.mode()
        ),
        Finding::Kind(kind) => format!(
            "{shown} is {kind}, not {}",
            match want {
                Want::Dir | Want::FamilyDir => "a directory",
                Want::File => "a regular file",
            }
        ),
        Finding::Error(e) => format!("{shown}: cannot look at it ({e})"),
    }
}

/// The permission checks.
pub(crate) fn check(home: &Path, config: Option<&Config>) -> Vec<Check> {
    groups(home, config)
        .into_iter()
        .map(|group| {
            let mut fixable = Vec::new();
            let mut manual = Vec::new();
            let mut present = 0usize;
            for item in &group.items {
                if !matches!(open_path(item), Ok(None)) {
                    present += 1;
                }
                if let Some(finding) = inspect(item) {
                    let text = describe(&item.path, &finding, item.want);
                    match finding {
                        Finding::Missing | Finding::Mode(..) => fixable.push(text),
                        Finding::Kind(_) | Finding::Link(_) | Finding::Error(_) => {
                            manual.push(text)
                        }
                    }
                }
            }
            let mut detail = match (fixable.is_empty(), manual.is_empty()) {
                (true, true) if present == 0 => group.absent.to_string(),
                (true, true) => format!(
                    "{present} path{} checked, all private",
                    if present == 1 { "" } else { "s" }
                ),
                _ => {
                    let mut all = manual.clone();
                    all.extend(fixable.iter().cloned());
                    list_some(&all, SHOWN)
                }
            };
            if let Some(dir) = &group.truncated {
                detail.push_str(&format!(
                    "; only the first {MAX_ENTRIES} entries of {dir} were checked"
                ));
            }
            let status = if fixable.is_empty() && manual.is_empty() {
                CheckStatus::Pass
            } else {
                CheckStatus::Fail
            };
            let fix = if !manual.is_empty() {
                "replace what is not a regular file or directory by hand (the gateway made these as files and directories; something else put that there), then run `moltmate doctor --fix`".to_string()
            } else {
                "run `moltmate doctor --fix` (chmod 0600 files, 0700 directories, creates missing directories)".to_string()
            };
            Check::new(group.id, group.title, status, detail, Some(fix))
        })
        .collect()
}

/// Repairs what [`check`] finds fixable: group and other permission bits removed (files end
/// up 0600, directories 0700), missing required directories created 0700. Touches nothing
/// else; returns one line per change, and one per change it could not make.
pub fn fix(home: &Path, config: Option<&Config>) -> Vec<String> {
    let mut done = Vec::new();
    for group in groups(home, config) {
        for item in &group.items {
            match inspect(item) {
                Some(Finding::Missing) => {
                    use std::os::unix::fs::DirBuilderExt;
                    match std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(&item.path)
                    {
                        Ok(()) => done.push(format!("created {} (0700)", item.path.display())),
                        Err(e) => {
                            done.push(format!("could not create {}: {e}", item.path.display()))
                        }
                    }
                }
                Some(Finding::Mode(old, gid)) => done.push(repair_mode(item, old, gid)),
                _ => {}
            }
        }
    }
    done
}

fn repair_mode(item: &Item, old: u32, gid: u32) -> String {
    let shown = item.path.display();
    let new = repaired(item.want, old, gid);
    let result = (|| -> Result<(), String> {
        let (fd, stat) = open_path(item)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "it is gone".to_string())?;
        if FileType::from_raw_mode(stat.st_mode) != item.want.kind() {
            return Err("it changed kind since it was looked at".to_string());
        }
        if item.want == Want::File && is_link(&item.path) {
            return Err("it is a symlink; never repaired through a link".to_string());
        }
        // chmod on the descriptor's magic link changes exactly the inode that was checked.
        let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        rustix::fs::chmod(proc_path.as_str(), Mode::from_raw_mode(new)).map_err(|e| e.to_string())
    })();
    match result {
        Ok(()) => format!("chmod {new:04o} {shown} (was {old:04o})"),
        Err(e) => format!("could not chmod {shown}: {e}"),
    }
}
