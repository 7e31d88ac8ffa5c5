//! `moltmate backup FILE` and `moltmate restore FILE --home DIR`.
//!
//! **The archive** is a gzip-compressed tar (`tar` + `flate2`, both maintained, pure Rust) of:
//!
//! | entry | what |
//! |---|---|
//! | `moltmate.db` | the database, copied with SQLite's online backup API while the gateway writes (one consistent moment) |
//! | `moltmate.json` | the config; without `--include-secrets` its inline secrets are `${VAR}` references (see `moltmate_config::redact_secrets`) |
//! | `admin.token` | only with `--include-secrets` |
//! | `users/<id>/…`, `families/<name>/…`, `personas/…`, `archive/…` | homes, family folders, persona templates, archives of reset/removed users |
//! | `MANIFEST.json` | last: every entry with its kind, size, mode, numeric owner, mtime, SHA-256 (files) or target (links); what was skipped and why |
//!
//! Left out: the memory index (`index/`, a cache rebuilt from the notes and transcripts at the
//! first search), sandboxes and their disk images (`sandboxes/`: the *files* of a capped home
//! are backed up, not its image; a restored home gets a fresh image on first use), lock files,
//! the backup marker.
//!
//! **Homes are hostile territory**: they are walked with the store's
//! [`walk_tree`](moltmate_store::homes::walk_tree) — no link followed, FIFOs, sockets and
//! devices skipped, depth, entries and bytes bounded per tree — and what was skipped is listed
//! in the manifest. A symlink is kept only if it points inside its own home (or family folder),
//! so every backup restores.
//!
//! **A restore writes nothing until the whole archive is verified**: a first pass reads every
//! entry, checks its name, kind and checksum against the manifest (and the manifest against
//! the entries), refusing absolute paths, `..`, links that point out of their home, hard
//! links, devices and FIFOs. A second pass extracts into a fresh directory beside the target,
//! checking every entry again as it is written (the file might have changed in between); only
//! then is that directory renamed into place. Owners are restored numerically when running as
//! root (so each home keeps its sandbox uid); setuid and sticky bits are dropped, setgid on
//! files too (folders keep it: family folders are 2770).

use crate::OpsError;
use moltmate_store::homes::{
    open_beneath, walk_tree, CopyLimits, CopyReport, Expect, WalkEntry, Walked,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The manifest's `format`.
pub const FORMAT: &str = "moltmate-backup";
/// The manifest's `version`.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest entry, the last of the archive.
pub const MANIFEST: &str = "MANIFEST.json";
/// The manifest is read into memory: at most this big.
const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Entries of one archive at most.
const MAX_ENTRIES: usize = 5_000_000;
/// Longest entry path or link target. Longer than the kernel's `PATH_MAX`: a home path may
/// itself be up to ~4 KB (the write tool) or deeper (a sandbox), and `archive/<id>-<stamp>/home/`
/// comes in front; the restore opens such paths a few components at a time.
const MAX_PATH_BYTES: usize = 24 * 1024;
/// What one entry costs a restore's memory beyond its path and target (its record in the
/// verify pass and the manifest index); the sum over all entries is bounded by
/// [`MAX_TRACKED_BYTES`], at backup and at restore alike.
const ENTRY_OVERHEAD: usize = 256;
/// Sum of entry costs (path + target + [`ENTRY_OVERHEAD`]) of one archive at most.
const MAX_TRACKED_BYTES: usize = 256 << 20;
/// A backup stops adding entries when its manifest would pass this (the restore refuses a
/// manifest over [`MAX_MANIFEST_BYTES`]; the rest is headroom for the skipped list).
const MANIFEST_BUDGET: usize = 224 << 20;
/// Longest path shown in a skipped line (the rest is elided).
const MAX_SHOWN_PATH: usize = 512;
/// Disk a directory or link costs a restore (an inode and a block), for the free-space check.
const INODE_COST: u64 = 4096;
/// Skipped items listed in the manifest at most (all are counted).
const MAX_SKIPPED_LISTED: usize = 10_000;
/// `moltmate.json` and `admin.token` are read at most this big.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Top-level folders backed up, each subfolder walked as its own bounded tree.
const TREES_PER_ENTRY: [&str; 3] = ["users", "families", "archive"];
/// Top-level folders backed up as one bounded tree.
const TREES_WHOLE: [&str; 1] = ["personas"];

/// One archived item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestEntry {
    pub path: String,
    /// `file`, `dir` or `symlink`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `MANIFEST.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub moltmate_version: String,
    pub schema_version: i64,
    /// Unix millis when the backup finished reading.
    pub created_at: i64,
    pub includes_secrets: bool,
    /// Config secrets left out: `key → variable` to set (`channels.telegram.botToken →
    /// MOLTMATE_TELEGRAM_BOT_TOKEN`).
    #[serde(default)]
    pub secrets_left_out: Vec<String>,
    pub entries: Vec<ManifestEntry>,
    /// What was not backed up and why (at most 10,000 listed).
    #[serde(default)]
    pub skipped: Vec<String>,
    #[serde(default)]
    pub skipped_total: u64,
    /// Files that changed while they were read (stored as read: cut or zero-padded to the
    /// size they had when opened).
    #[serde(default)]
    pub changed: Vec<String>,
}

/// Progress of a long run, for the operator's terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// `database`, `files`, `verifying` or `writing`.
    pub phase: &'static str,
    pub files: u64,
    pub bytes: u64,
}

/// What `moltmate backup` should do.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackupOptions {
    pub include_secrets: bool,
    /// Bounds of each walked tree (a home, a family folder, the personas).
    pub limits: CopyLimits,
}

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    pub file: PathBuf,
    pub entries: u64,
    pub files: u64,
    /// Bytes of file content archived (database included).
    pub bytes: u64,
    /// Size of the compressed archive.
    pub archive_bytes: u64,
    pub skipped_total: u64,
    pub skipped: Vec<String>,
    pub secrets_left_out: Vec<String>,
    pub finished_at: i64,
}

/// What a restore wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub home: PathBuf,
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    pub includes_secrets: bool,
    pub secrets_left_out: Vec<String>,
    /// Owners could not be restored (not running as root): everything belongs to the restorer.
    pub owners_kept: bool,
    /// When the archive was made (unix millis).
    pub created_at: i64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OpsError {
    let what = what.into();
    move |source| OpsError::Io { what, source }
}

fn bad(text: impl Into<String>) -> OpsError {
    OpsError::BadArchive(text.into())
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

// ---- names ----------------------------------------------------------------------------------

/// Checks an archive path: UTF-8, relative, normal components only, under a known top-level
/// name, bounded. Returns its components.
fn check_path(path: &str) -> Result<Vec<&str>, OpsError> {
    if path.is_empty() || path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(bad(format!("entry {path:?}: not a valid name")));
    }
    if path.starts_with('/') {
        return Err(bad(format!("entry {path:?}: absolute paths are refused")));
    }
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts {
        match *part {
            "" | "." => return Err(bad(format!("entry {path:?}: empty or `.` path component"))),
            ".." => return Err(bad(format!("entry {path:?}: `..` is refused"))),
            _ => {}
        }
    }
    let top = parts[0];
    let known = match parts.len() {
        1 => matches!(
            top,
            "moltmate.db"
                | "moltmate.json"
                | "admin.token"
                | MANIFEST
                | "users"
                | "families"
                | "personas"
                | "archive"
        ),
        _ => matches!(top, "users" | "families" | "personas" | "archive"),
    };
    if !known {
        return Err(bad(format!("entry {path:?}: not part of a moltmate home")));
    }
    Ok(parts)
}

/// The folder a symlink at `path` must stay inside: its home, family folder, archived user or
/// the personas folder. `None` when a link is not allowed there at all.
fn confinement(parts: &[&str]) -> Option<usize> {
    let depth = match parts.first()? {
        &"personas" => 1,
        &"users" | &"families" | &"archive" => 2,
        _ => return None,
    };
    // The link must be inside the folder, not the folder itself.
    (parts.len() > depth).then_some(depth)
}

/// Whether a symlink at `path` (components `parts`) pointing to `target` resolves inside its
/// confinement folder. Absolute targets never do. The target must be of the form
/// `(../)*name(/name)*`: every `..` comes before the first name, so it climbs only the link's
/// own folders (real directories of the archive) and never the target of another link — a
/// `..` after a name that is itself a link (`a/b -> ..`, `escape -> a/b/a/b/../../../..`)
/// would climb from wherever that link points. Descending by names from inside stays inside,
/// whatever links the names are, since every link is held to this rule.
fn link_stays_inside(parts: &[&str], target: &str) -> bool {
    let Some(root) = confinement(parts) else {
        return false;
    };
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    let mut at: Vec<&str> = parts[..parts.len() - 1].to_vec();
    let mut named = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if named || at.len() <= root {
                    return false;
                }
                at.pop();
            }
            name => {
                named = true;
                at.push(name)
            }
        }
    }
    at.len() >= root && at[..root] == parts[..root]
}

// ---- backup ---------------------------------------------------------------------------------

/// A reader that yields exactly `size` bytes of `inner` (cut, or padded with zeros when the
/// file shrank), hashing what it yields.
struct Exact<R> {
    inner: R,
    remaining: u64,
    hasher: Sha256,
    short: bool,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = usize::try_from(self.remaining.min(buf.len() as u64)).unwrap_or(buf.len());
        let got = if self.short {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if got == 0 {
            self.short = true;
            buf[..want].fill(0);
            want
        } else {
            got
        };
        self.hasher.update(&buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

struct Writer<'a, W: Write> {
    tar: tar::Builder<W>,
    manifest: Manifest,
    files: u64,
    bytes: u64,
    progress: &'a mut dyn FnMut(&Progress),
    reported_at: std::time::Instant,
    /// Sum of entry costs so far (see [`MAX_TRACKED_BYTES`]).
    tracked: usize,
    /// Estimated size of the manifest so far (see [`MANIFEST_BUDGET`]).
    manifest_bytes: usize,
    /// The last directory left out: everything beneath it is left out too (the walk is
    /// depth-first, so its contents follow it directly).
    refused_dir: Option<String>,
}

/// `path`, cut to [`MAX_SHOWN_PATH`] bytes for a skipped line.
fn shown(path: &str) -> String {
    if path.len() <= MAX_SHOWN_PATH {
        return path.to_string();
    }
    let mut end = MAX_SHOWN_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &path[..end], path.len())
}

/// Whether `path` lies beneath the folder `dir`.
fn beneath(path: &str, dir: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

impl<W: Write> Writer<'_, W> {
    fn skip(&mut self, path: &str, why: &str) {
        self.manifest.skipped_total += 1;
        if self.manifest.skipped.len() < MAX_SKIPPED_LISTED {
            self.manifest
                .skipped
                .push(format!("{}: {why}", shown(path)));
        }
    }

    /// Applies the restore's own rules to an entry before it is written: a name the restore
    /// accepts, not beneath a folder left out, within the entry count, the restore's memory
    /// bound and the manifest size. What does not pass is skipped and listed, so every backup
    /// restores.
    fn admit(&mut self, path: &str, target: Option<&str>, dir: bool) -> bool {
        if self
            .refused_dir
            .as_deref()
            .is_some_and(|refused| beneath(path, refused))
        {
            self.skip(path, "its folder was left out");
            return false;
        }
        let cost = path.len() + target.map_or(0, str::len) + ENTRY_OVERHEAD;
        let listed = serde_json::to_string(path).map_or(path.len() * 6, |t| t.len())
            + target.map_or(0, |t| {
                serde_json::to_string(t).map_or(t.len() * 6, |t| t.len())
            })
            + 400;
        let why = if check_path(path).is_err() {
            Some(format!(
                "a name the restore refuses (longer than {MAX_PATH_BYTES} bytes)"
            ))
        } else if self.manifest.entries.len() >= MAX_ENTRIES {
            Some(format!("more than {MAX_ENTRIES} entries in one backup"))
        } else if self.tracked + cost > MAX_TRACKED_BYTES
            || self.manifest_bytes + listed > MANIFEST_BUDGET
        {
            Some("the backup's manifest is full (too many or too long names)".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            self.skip(path, &why);
            if dir {
                self.refused_dir = Some(path.to_string());
            }
            return false;
        }
        self.tracked += cost;
        self.manifest_bytes += listed;
        true
    }

    fn tick(&mut self, phase: &'static str) {
        if self.reported_at.elapsed() >= std::time::Duration::from_millis(500) {
            self.reported_at = std::time::Instant::now();
            (self.progress)(&Progress {
                phase,
                files: self.files,
                bytes: self.bytes,
            });
        }
    }

    fn header(kind: tar::EntryType, stat: &Stat) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(stat.mode & 0o7777);
        header.set_uid(stat.uid);
        header.set_gid(stat.gid);
        header.set_mtime(stat.mtime);
        header.set_size(0);
        header
    }

    fn add_dir(&mut self, path: &str, stat: &Stat) -> Result<(), OpsError> {
        if !self.admit(path, None, true) {
            return Ok(());
        }
        let mut header = Self::header(tar::EntryType::Directory, stat);
        self.tar
            .append_data(&mut header, path, std::io::empty())
            .map_err(io(format!("writing {path} to the archive")))?;
        self.manifest
            .entries
            .push(stat.entry(path, "dir", 0, None, None));
        Ok(())
    }

    fn add_file(
        &mut self,
        path: &str,
        stat: &Stat,
        size: u64,
        content: impl Read,
    ) -> Result<(), OpsError> {
        if !self.admit(path, None, false) {
            return Ok(());
        }
        let mut header = Self::header(tar::EntryType::Regular, stat);
        header.set_size(size);
        let mut reader = Exact {
            inner: content,
            remaining: size,
            hasher: Sha256::new(),
            short: false,
        };
        self.tar
            .append_data(&mut header, path, &mut reader)
            .map_err(io(format!("writing {path} to the archive")))?;
        if reader.short {
            self.manifest_bytes += path.len() * 6 + 16;
            self.manifest.changed.push(path.to_string());
        }
        let digest = hex::encode(reader.hasher.finalize());
        self.manifest
            .entries
            .push(stat.entry(path, "file", size, Some(digest), None));
        self.files += 1;
        self.bytes += size;
        self.tick("files");
        Ok(())
    }

    fn add_symlink(&mut self, path: &str, stat: &Stat, target: &str) -> Result<(), OpsError> {
        if !self.admit(path, Some(target), false) {
            return Ok(());
        }
        let mut header = Self::header(tar::EntryType::Symlink, stat);
        self.tar
            .append_link(&mut header, path, target)
            .map_err(io(format!("writing {path} to the archive")))?;
        self.manifest
            .entries
            .push(stat.entry(path, "symlink", 0, None, Some(target.to_string())));
        Ok(())
    }

    /// Walks the tree at `dir` (bounded, never blocking) into the archive under `prefix`.
    fn add_tree(
        &mut self,
        dir: Tree<'_>,
        prefix: &str,
        limits: CopyLimits,
    ) -> Result<(), OpsError> {
        let mut failure: Option<OpsError> = None;
        let mut skipped_links: Vec<(String, String)> = Vec::new();
        let report: CopyReport = {
            let mut visit = |item: Walked<'_>| -> Result<(), moltmate_store::HomeError> {
                let path = if item.path == "." {
                    prefix.to_string()
                } else {
                    format!("{prefix}/{}", item.path)
                };
                let stat = Stat::of(item.stat);
                let done = match item.entry {
                    WalkEntry::Directory => self.add_dir(&path, &stat),
                    WalkEntry::File(file) => {
                        let size = u64::try_from(item.stat.st_size).unwrap_or(0);
                        self.add_file(&path, &stat, size, file)
                    }
                    WalkEntry::Symlink(target) => {
                        let parts: Vec<&str> = path.split('/').collect();
                        match target.to_str() {
                            Some(text) if link_stays_inside(&parts, text) => {
                                self.add_symlink(&path, &stat, text)
                            }
                            _ => {
                                skipped_links.push((
                                    path.clone(),
                                    "a symbolic link pointing outside its folder".to_string(),
                                ));
                                Ok(())
                            }
                        }
                    }
                };
                done.map_err(|e| {
                    failure = Some(e);
                    moltmate_store::HomeError::BadPath("archive write failed".to_string())
                })
            };
            let walked = match dir {
                Tree::Path(path) => walk_tree(path, limits, &mut visit),
                Tree::Open(fd) => moltmate_store::homes::walk_tree_at(fd, limits, &mut visit),
            };
            match walked {
                Ok(report) => report,
                Err(e) => return Err(failure.unwrap_or(OpsError::Home(e))),
            }
        };
        for (path, why) in skipped_links {
            self.skip(&path, &why);
        }
        for line in &report.skipped {
            self.manifest.skipped_total += 1;
            if self.manifest.skipped.len() < MAX_SKIPPED_LISTED {
                self.manifest
                    .skipped
                    .push(shown(&format!("{prefix}/{line}")));
            }
        }
        // Counted beyond the listed ones.
        let unlisted = report
            .skipped_total
            .saturating_sub(report.skipped.len() as u64);
        self.manifest.skipped_total += unlisted;
        Ok(())
    }
}

/// A tree to walk: by its path (a private mount point of the backup's own), or a directory
/// already opened beneath the home without following links.
enum Tree<'p> {
    Path(&'p Path),
    Open(rustix::fd::OwnedFd),
}

/// `lstat` fields the archive keeps.
struct Stat {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

impl Stat {
    fn of(stat: &rustix::fs::Stat) -> Stat {
        Stat {
            mode: stat.st_mode & 0o7777,
            uid: u64::from(stat.st_uid),
            gid: u64::from(stat.st_gid),
            mtime: u64::try_from(stat.st_mtime).unwrap_or(0),
        }
    }

    fn private_file() -> Stat {
        Stat {
            mode: 0o600,
            uid: u64::from(rustix::process::geteuid().as_raw()),
            gid: u64::from(rustix::process::getegid().as_raw()),
            mtime: u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0),
        }
    }

    fn entry(
        &self,
        path: &str,
        kind: &str,
        size: u64,
        sha256: Option<String>,
        target: Option<String>,
    ) -> ManifestEntry {
        ManifestEntry {
            path: path.to_string(),
            kind: kind.to_string(),
            size,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            sha256,
            target,
        }
    }
}

/// Reads a top-level file of the home (`moltmate.json`, `admin.token`): never through a link,
/// never anything but a regular file (a FIFO would block). A refusal is `Some(Err(why))`, for
/// the manifest's skipped list.
fn read_small(path: &Path) -> Result<Option<Result<Vec<u8>, &'static str>>, OpsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Ok(Some(Err("a symbolic link; not followed")))
        }
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    let meta = file
        .metadata()
        .map_err(io(format!("reading {}", path.display())))?;
    if !meta.is_file() {
        return Ok(Some(Err("not a regular file")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io(format!("reading {}", path.display())))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(OpsError::Failed(format!(
            "{} is larger than {MAX_CONFIG_BYTES} bytes",
            path.display()
        )));
    }
    Ok(Some(Ok(bytes)))
}

/// `O_NOFOLLOW | O_NONBLOCK` for [`read_small`].
fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32
}

/// Backs the home at `home` up into the new file `file` (0600), while a gateway may serve
/// from it. Refuses to overwrite an existing file. On success writes the marker
/// `<home>/backups/last.json`. Blocking; reports progress to `progress` at most twice a
/// second.
pub fn backup(
    home: &Path,
    file: &Path,
    options: &BackupOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BackupReport, OpsError> {
    let database = home.join("moltmate.db");
    if !database.is_file() {
        return Err(OpsError::Failed(format!(
            "{} has no database (moltmate.db); is it a moltmate home?",
            home.display()
        )));
    }
    if std::fs::symlink_metadata(file).is_ok() {
        return Err(OpsError::Failed(format!(
            "{} exists; a backup never overwrites a file",
            file.display()
        )));
    }
    let file = std::path::absolute(file).map_err(io(format!("resolving {}", file.display())))?;
    let parent = file
        .parent()
        .filter(|p| p.is_dir())
        .ok_or_else(|| {
            OpsError::Failed(format!("the folder of {} does not exist", file.display()))
        })?
        .to_path_buf();
    // Everything in progress lives in a private folder beside the archive, removed on any
    // failure; the archive appears under its name only when complete.
    let work = tempfile::Builder::new()
        .prefix(".moltmate-backup-")
        .tempdir_in(&parent)
        .map_err(io(format!(
            "creating a work folder in {}",
            parent.display()
        )))?;
    let partial = work.path().join("archive.tar.gz");

    (progress)(&Progress {
        phase: "database",
        files: 0,
        bytes: 0,
    });
    let db_copy = work.path().join("moltmate.db");
    let db_bytes = moltmate_store::db::backup_database(&database, &db_copy)?;
    let schema_version = moltmate_store::db::check_database(&db_copy)?;

    let out = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(io(format!("creating {}", partial.display())))?
    };
    let gzip = flate2::write::GzEncoder::new(
        std::io::BufWriter::with_capacity(1 << 20, out),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gzip);
    tar.mode(tar::HeaderMode::Complete);
    let mut writer = Writer {
        tar,
        manifest: Manifest {
            format: FORMAT.to_string(),
            version: FORMAT_VERSION,
            moltmate_version: env!("CARGO_PKG_VERSION").to_string(),
            schema_version,
            created_at: 0,
            includes_secrets: options.include_secrets,
            secrets_left_out: Vec::new(),
            entries: Vec::new(),
            skipped: Vec::new(),
            skipped_total: 0,
            changed: Vec::new(),
        },
        files: 0,
        bytes: 0,
        progress,
        reported_at: std::time::Instant::now(),
        tracked: 0,
        manifest_bytes: 0,
        refused_dir: None,
    };

    let db_file = std::fs::File::open(&db_copy).map_err(io("reading the database copy"))?;
    writer.add_file("moltmate.db", &Stat::private_file(), db_bytes, db_file)?;

    let config = match read_small(&home.join("moltmate.json"))? {
        Some(Err(why)) => {
            writer.skip("moltmate.json", why);
            None
        }
        Some(Ok(config)) => Some(config),
        None => None,
    };
    if let Some(config) = config {
        let text = if options.include_secrets {
            Some(config)
        } else {
            match std::str::from_utf8(&config)
                .ok()
                .map(moltmate_config::redact_secrets)
            {
                Some(Ok(redacted)) => {
                    writer.manifest.secrets_left_out = redacted
                        .replaced
                        .iter()
                        .map(|(key, variable)| format!("{key} → {variable}"))
                        .collect();
                    Some(redacted.text.into_bytes())
                }
                _ => {
                    writer.skip(
                        "moltmate.json",
                        "it does not parse, so its secrets cannot be told apart; fix it or back up with --include-secrets",
                    );
                    None
                }
            }
        };
        if let Some(text) = text {
            let size = text.len() as u64;
            writer.add_file("moltmate.json", &Stat::private_file(), size, &text[..])?;
        }
    }
    if options.include_secrets {
        match read_small(&home.join("admin.token"))? {
            Some(Ok(token)) => {
                let size = token.len() as u64;
                writer.add_file("admin.token", &Stat::private_file(), size, &token[..])?;
            }
            Some(Err(why)) => writer.skip("admin.token", why),
            None => {}
        }
    }

    let mounts = work.path().join("mnt");
    // The trees are opened from handles, each beneath the one before without following a
    // link: a folder swapped for a link meanwhile is refused, not followed.
    let home_fd = rustix::fs::open(
        home,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io(format!("opening {}", home.display()))(e.into()))?;
    let open_area = |writer: &mut Writer<'_, _>, area: &str| match open_beneath(
        &home_fd,
        area,
        Expect::Directory,
    ) {
        Ok(opened) => opened,
        Err(e) => {
            writer.skip(area, &e.user_reason());
            None
        }
    };
    for area in TREES_PER_ENTRY {
        let dir = home.join(area);
        let Some((area_fd, area_stat)) = open_area(&mut writer, area) else {
            continue;
        };
        let Some(listing) = moltmate_store::homes::list_beneath(home, area, 1_000_000)? else {
            continue;
        };
        writer.add_dir(area, &Stat::of(&area_stat))?;
        if !listing.complete {
            writer.skip(
                area,
                "more than 1,000,000 entries; only the first were backed up",
            );
        }
        for entry in listing.entries {
            let path = format!("{area}/{}", entry.name);
            if !entry.is_dir() {
                writer.skip(&path, "not a directory");
                continue;
            }
            let image = volume_image(home, area, &entry.name);
            let tree = dir.join(&entry.name);
            match image {
                Some(image) if !moltmate_sandbox::disk::is_mounted_volume(&tree) => {
                    // A capped folder whose volume is not mounted here: its files are in the
                    // image. Read them from a read-only mount of it.
                    std::fs::create_dir_all(&mounts).map_err(io("creating a mount point"))?;
                    let at = mounts.join(&entry.name);
                    std::fs::create_dir(&at).map_err(io("creating a mount point"))?;
                    match moltmate_sandbox::disk::mount_read_only(&image, &at) {
                        Ok(mount) => {
                            let stat = rustix::fs::lstat(&tree).map_err(|e| io(path.clone())(e.into()))?;
                            let added =
                                writer.add_tree(Tree::Path(mount.path()), &path, options.limits);
                            drop(mount);
                            added?;
                            // The root of the mounted image has the image's owner; the folder's
                            // own entry keeps the folder's.
                            fix_root_entry(&mut writer.manifest, &path, &Stat::of(&stat));
                        }
                        Err(e) => writer.skip(
                            &path,
                            &format!(
                                "its files are on the disk image {} which is not mounted here and could not be mounted ({e}); run the backup as root",
                                image.display()
                            ),
                        ),
                    }
                }
                _ => match open_beneath(&area_fd, entry.name.as_str(), Expect::Directory) {
                    Ok(Some((fd, _))) => writer.add_tree(Tree::Open(fd), &path, options.limits)?,
                    Ok(None) => {}
                    Err(e) => writer.skip(&path, &e.user_reason()),
                },
            }
        }
    }
    for area in TREES_WHOLE {
        if let Some((fd, _)) = open_area(&mut writer, area) {
            writer.add_tree(Tree::Open(fd), area, options.limits)?;
        }
    }

    // The manifest, last.
    let finished_at = now_millis();
    writer.manifest.created_at = finished_at;
    let manifest = serde_json::to_vec_pretty(&writer.manifest)
        .map_err(|e| OpsError::Failed(format!("encoding the manifest: {e}")))?;
    let mut header = Writer::<Vec<u8>>::header(tar::EntryType::Regular, &Stat::private_file());
    header.set_size(manifest.len() as u64);
    writer
        .tar
        .append_data(&mut header, MANIFEST, &manifest[..])
        .map_err(io("writing the manifest"))?;
    let Writer {
        tar,
        manifest,
        files,
        bytes,
        progress,
        ..
    } = writer;
    let gzip = tar.into_inner().map_err(io("finishing the archive"))?;
    let buffered = gzip.finish().map_err(io("finishing the archive"))?;
    let out = buffered
        .into_inner()
        .map_err(|e| OpsError::Failed(format!("finishing the archive: {}", e.error())))?;
    out.sync_all().map_err(io("syncing the archive"))?;
    let archive_bytes = out.metadata().map(|m| m.len()).unwrap_or(0);
    drop(out);
    // The restore's own verify pass over the finished archive: a backup that would not restore
    // is a failure, not a file and a fresh `backups/last.json` that `doctor` counts as good.
    (progress)(&Progress {
        phase: "verifying",
        files,
        bytes,
    });
    verify(&partial, None, &mut |_| {}).map_err(|e| {
        OpsError::Failed(format!(
            "the finished archive would not restore ({e}); nothing was written"
        ))
    })?;
    // `link` refuses an existing name, so a file that appeared meanwhile is not overwritten.
    std::fs::hard_link(&partial, &file).map_err(io(format!("creating {}", file.display())))?;
    if let Ok(dir) = std::fs::File::open(&parent) {
        let _ = dir.sync_all();
    }
    drop(work);
    (progress)(&Progress {
        phase: "done",
        files,
        bytes,
    });
    write_marker(home, finished_at, &file)?;
    Ok(BackupReport {
        file,
        entries: manifest.entries.len() as u64,
        files,
        bytes,
        archive_bytes,
        skipped_total: manifest.skipped_total,
        skipped: manifest.skipped,
        secrets_left_out: manifest.secrets_left_out,
        finished_at,
    })
}

/// The disk image of a capped folder, when one exists.
fn volume_image(home: &Path, area: &str, name: &str) -> Option<PathBuf> {
    let stem = match area {
        "users" => name.to_string(),
        "families" => moltmate_sandbox::disk::family_volume_name(name),
        _ => return None,
    };
    let image = home
        .join("sandboxes")
        .join("disks")
        .join(format!("{stem}.img"));
    image.is_file().then_some(image)
}

fn fix_root_entry(manifest: &mut Manifest, path: &str, stat: &Stat) {
    if let Some(entry) = manifest
        .entries
        .iter_mut()
        .rev()
        .find(|e| e.path == path && e.kind == "dir")
    {
        entry.uid = stat.uid;
        entry.gid = stat.gid;
    }
}

/// The marker `moltmate doctor` reads the age of the last backup from:
/// `<home>/backups/last.json`, `{ "finishedAt": <unix millis>, "file": "<absolute path>" }`
/// (directory 0700, file 0600), replaced atomically.
pub fn write_marker(home: &Path, finished_at: i64, file: &Path) -> Result<(), OpsError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = home.join("backups");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("securing {}", dir.display())))?;
    let body = serde_json::to_vec_pretty(&serde_json::json!({
        "finishedAt": finished_at,
        "file": file.display().to_string(),
    }))
    .map_err(|e| OpsError::Failed(format!("encoding the marker: {e}")))?;
    let temp = dir.join(format!(".last.json.{:016x}", rand::random::<u64>()));
    crate::users::write_private(&temp, &body)?;
    std::fs::rename(&temp, dir.join("last.json")).map_err(io("writing backups/last.json"))
}

// ---- restore --------------------------------------------------------------------------------

/// One entry as read from the archive (before it is written anywhere).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    size: u64,
    mode: u32,
    uid: u64,
    gid: u64,
    sha256: Option<String>,
    target: Option<String>,
}

/// Reads one entry's header and checks what can be checked without the manifest.
fn read_header<R: Read>(entry: &tar::Entry<'_, R>) -> Result<(String, Seen), OpsError> {
    let raw = entry.path_bytes();
    let path = std::str::from_utf8(&raw)
        .map_err(|_| bad("an entry name is not UTF-8"))?
        .to_string();
    let header = entry.header();
    let kind = match header.entry_type() {
        tar::EntryType::Regular => "file",
        tar::EntryType::Directory => "dir",
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => return Err(bad(format!("entry {path:?}: hard links are refused"))),
        tar::EntryType::Char | tar::EntryType::Block => {
            return Err(bad(format!("entry {path:?}: device nodes are refused")))
        }
        tar::EntryType::Fifo => return Err(bad(format!("entry {path:?}: FIFOs are refused"))),
        other => {
            return Err(bad(format!(
                "entry {path:?}: entries of type {other:?} are refused"
            )))
        }
    };
    // Directories may be written with a trailing slash.
    let path = if kind == "dir" {
        path.strip_suffix('/').map(str::to_string).unwrap_or(path)
    } else {
        path
    };
    let parts = check_path(&path)?;
    let target = if kind == "symlink" {
        let raw = entry
            .link_name_bytes()
            .ok_or_else(|| bad(format!("entry {path:?}: a link without a target")))?;
        let target = std::str::from_utf8(&raw)
            .map_err(|_| bad(format!("entry {path:?}: link target is not UTF-8")))?
            .to_string();
        if target.len() > MAX_PATH_BYTES || !link_stays_inside(&parts, &target) {
            return Err(bad(format!(
                "entry {path:?}: a symbolic link pointing outside its folder is refused"
            )));
        }
        Some(target)
    } else {
        None
    };
    let size = header
        .size()
        .map_err(|_| bad(format!("entry {path:?}: unreadable size")))?;
    if kind != "file" && size != 0 {
        return Err(bad(format!("entry {path:?}: a {kind} with content")));
    }
    let read_number = |value: std::io::Result<u64>, what: &str| {
        value.map_err(|_| bad(format!("entry {path:?}: unreadable {what}")))
    };
    let mode =
        u32::try_from(read_number(header.mode().map(u64::from), "mode")? & 0o7777).unwrap_or(0);
    let uid = read_number(header.uid(), "owner")?;
    let gid = read_number(header.gid(), "group")?;
    if uid > u64::from(u32::MAX - 1) || gid > u64::from(u32::MAX - 1) {
        return Err(bad(format!("entry {path:?}: owner out of range")));
    }
    Ok((
        path,
        Seen {
            kind,
            size,
            mode,
            uid,
            gid,
            sha256: None,
            target,
        },
    ))
}

fn seen_of(entry: &ManifestEntry) -> Seen {
    Seen {
        kind: match entry.kind.as_str() {
            "file" => "file",
            "dir" => "dir",
            "symlink" => "symlink",
            _ => "?",
        },
        size: entry.size,
        mode: entry.mode & 0o7777,
        uid: entry.uid,
        gid: entry.gid,
        sha256: entry.sha256.clone(),
        target: entry.target.clone(),
    }
}

/// Checks the manifest itself and indexes it by path.
fn index_manifest(manifest: &Manifest) -> Result<HashMap<String, ManifestEntry>, OpsError> {
    if manifest.format != FORMAT {
        return Err(bad("not a moltmate backup (wrong format in the manifest)"));
    }
    if manifest.version != FORMAT_VERSION {
        return Err(bad(format!(
            "backup format version {} is not supported (this moltmate reads version {FORMAT_VERSION})",
            manifest.version
        )));
    }
    if manifest.schema_version > moltmate_store::SCHEMA_VERSION {
        return Err(bad(format!(
            "the backup's database has schema {}, newer than this moltmate (schema {}); restore it with a newer moltmate",
            manifest.schema_version,
            moltmate_store::SCHEMA_VERSION
        )));
    }
    if manifest.entries.len() > MAX_ENTRIES {
        return Err(bad("the manifest lists too many entries"));
    }
    let mut index = HashMap::with_capacity(manifest.entries.len());
    for entry in &manifest.entries {
        let parts = check_path(&entry.path)?;
        if entry.path == MANIFEST {
            return Err(bad("the manifest lists itself"));
        }
        match entry.kind.as_str() {
            "file" => {
                let valid = entry
                    .sha256
                    .as_deref()
                    .is_some_and(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()));
                if !valid {
                    return Err(bad(format!("manifest: {:?} has no checksum", entry.path)));
                }
            }
            "dir" => {}
            "symlink" => {
                let inside = entry
                    .target
                    .as_deref()
                    .is_some_and(|t| link_stays_inside(&parts, t));
                if !inside {
                    return Err(bad(format!(
                        "manifest: {:?} is a link pointing outside its folder",
                        entry.path
                    )));
                }
            }
            other => {
                return Err(bad(format!(
                    "manifest: {:?} has the unknown kind {other:?}",
                    entry.path
                )))
            }
        }
        if index.insert(entry.path.clone(), entry.clone()).is_some() {
            return Err(bad(format!("manifest: {:?} is listed twice", entry.path)));
        }
    }
    if !index.contains_key("moltmate.db") {
        return Err(bad("the archive holds no database"));
    }
    Ok(index)
}

/// Hashes (and, in the writing pass, copies) one file entry's content, at most `size` bytes.
fn hash_content<R: Read>(
    mut content: R,
    size: u64,
    mut sink: Option<&mut std::fs::File>,
    path: &str,
) -> Result<String, OpsError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = content.read(&mut buf).map_err(|e| {
            bad(format!(
                "entry {path:?} cannot be read ({e}); the archive is damaged or truncated"
            ))
        })?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
        if let Some(out) = sink.as_mut() {
            // Blocks of zeros become holes (the length is set below).
            moltmate_store::homes::write_keeping_holes(out, &buf[..n])
                .map_err(io(format!("writing {path}")))?;
        }
    }
    if let Some(out) = sink.as_mut() {
        out.set_len(total).map_err(io(format!("writing {path}")))?;
    }
    if total != size {
        return Err(bad(format!(
            "entry {path:?} is cut short; the archive is truncated"
        )));
    }
    Ok(hex::encode(hasher.finalize()))
}

fn open_archive(
    file: &Path,
) -> Result<tar::Archive<flate2::read::GzDecoder<std::io::BufReader<std::fs::File>>>, OpsError> {
    let handle = std::fs::File::open(file).map_err(io(format!("opening {}", file.display())))?;
    let meta = handle
        .metadata()
        .map_err(io(format!("reading {}", file.display())))?;
    if !meta.is_file() {
        return Err(bad(format!("{} is not a regular file", file.display())));
    }
    Ok(tar::Archive::new(flate2::read::GzDecoder::new(
        std::io::BufReader::with_capacity(1 << 20, handle),
    )))
}

/// Reads what is left of the compressed stream, so a damaged gzip trailer (CRC, length) is
/// found too.
fn drain<R: Read>(archive: tar::Archive<R>) -> Result<(), OpsError> {
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink())
        .map(|_| ())
        .map_err(|e| bad(format!("the compressed stream is damaged ({e})")))
}

/// First pass: every entry checked against the manifest, nothing written.
fn verify(
    file: &Path,
    room: Option<u64>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Manifest, OpsError> {
    let mut archive = open_archive(file)?;
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut manifest: Option<Manifest> = None;
    let (mut files, mut bytes, mut needed, mut tracked) = (0u64, 0u64, 0u64, 0usize);
    let mut reported_at = std::time::Instant::now();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive ({e})")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("damaged or truncated ({e})")))?;
        if manifest.is_some() {
            return Err(bad("entries after the manifest"));
        }
        let (path, mut item) = read_header(&entry)?;
        if path == MANIFEST {
            if item.kind != "file" || item.size > MAX_MANIFEST_BYTES {
                return Err(bad("the manifest is not a file of a sane size"));
            }
            let mut text = Vec::new();
            (&mut entry)
                .take(MAX_MANIFEST_BYTES)
                .read_to_end(&mut text)
                .map_err(|e| bad(format!("the manifest cannot be read ({e})")))?;
            if text.len() as u64 != item.size {
                return Err(bad("the manifest is cut short; the archive is truncated"));
            }
            manifest = Some(
                serde_json::from_slice(&text)
                    .map_err(|e| bad(format!("the manifest is damaged ({e})")))?,
            );
            continue;
        }
        if seen.len() >= MAX_ENTRIES {
            return Err(bad("too many entries"));
        }
        // What the names cost this pass's memory is bounded, not only their count.
        tracked += path.len() + item.target.as_deref().map_or(0, str::len) + ENTRY_OVERHEAD;
        if tracked > MAX_TRACKED_BYTES {
            return Err(bad(format!(
                "the entries' names take more than {} MiB",
                MAX_TRACKED_BYTES >> 20
            )));
        }
        check_parent(&seen, &path)?;
        // A directory or link costs an inode and a block, whatever its size says.
        needed = needed.saturating_add(if item.kind == "file" {
            item.size
        } else {
            INODE_COST
        });
        if room.is_some_and(|room| needed > room) {
            // Said before the content is even read: a small archive claiming terabytes (a
            // compression bomb) costs nothing.
            return Err(OpsError::Failed(format!(
                "the archive holds more than the {} MiB free beside the target",
                room.unwrap_or(0) >> 20
            )));
        }
        if item.kind == "file" {
            item.sha256 = Some(hash_content(&mut entry, item.size, None, &path)?);
            files += 1;
            bytes += item.size;
            if reported_at.elapsed() >= std::time::Duration::from_millis(500) {
                reported_at = std::time::Instant::now();
                progress(&Progress {
                    phase: "verifying",
                    files,
                    bytes,
                });
            }
        }
        if seen.insert(path.clone(), item).is_some() {
            return Err(bad(format!("entry {path:?} appears twice")));
        }
    }
    drain(archive)?;
    let manifest = manifest
        .ok_or_else(|| bad("no manifest; the archive is truncated or not a moltmate backup"))?;
    let index = index_manifest(&manifest)?;
    if index.len() != seen.len() {
        return Err(bad(format!(
            "the manifest lists {} entries, the archive holds {}",
            index.len(),
            seen.len()
        )));
    }
    for (path, item) in &seen {
        let listed = index
            .get(path)
            .ok_or_else(|| bad(format!("entry {path:?} is not in the manifest")))?;
        if seen_of(listed) != *item {
            return Err(bad(format!(
                "entry {path:?} does not match the manifest (checksum, size, kind, mode or owner); the archive is damaged"
            )));
        }
    }
    Ok(manifest)
}

/// A non-top-level entry's parent must be a directory entry already read: nothing is ever
/// written through a link or into a folder the archive did not create.
fn check_parent(seen: &BTreeMap<String, Seen>, path: &str) -> Result<(), OpsError> {
    if let Some((parent, _)) = path.rsplit_once('/') {
        match seen.get(parent) {
            Some(item) if item.kind == "dir" => Ok(()),
            Some(_) => Err(bad(format!(
                "entry {path:?} lies beneath something that is not a directory"
            ))),
            None => Err(bad(format!("entry {path:?} comes before its folder"))),
        }
    } else {
        Ok(())
    }
}

/// Whether `target` may be restored into: missing, or an empty directory (not a link).
fn check_target(target: &Path) -> Result<(), OpsError> {
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("checking {}", target.display()))(e)),
        Ok(meta) if !meta.is_dir() => Err(OpsError::TargetNotEmpty(format!(
            "{} exists and is not a directory; restore into a new or empty directory",
            target.display()
        ))),
        Ok(_) => {
            let mut entries =
                std::fs::read_dir(target).map_err(io(format!("reading {}", target.display())))?;
            if entries.next().is_some() {
                Err(OpsError::TargetNotEmpty(format!(
                    "{} is not empty; restore only into a new or empty directory (nothing was written)",
                    target.display()
                )))
            } else {
                Ok(())
            }
        }
    }
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Restores the archive `file` into `target`, which must not exist or be an empty directory.
/// Verifies the whole archive first; writes into a fresh directory beside `target` and renames
/// it into place only when every entry was written and checked. On any failure nothing is left
/// behind. Blocking.
pub fn restore(
    file: &Path,
    target: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RestoreReport, OpsError> {
    check_target(target)?;
    let target =
        std::path::absolute(target).map_err(io(format!("resolving {}", target.display())))?;
    let parent = target
        .parent()
        .filter(|p| p.is_dir())
        .ok_or_else(|| {
            OpsError::Failed(format!("the folder of {} does not exist", target.display()))
        })?
        .to_path_buf();

    let room = free_bytes(&parent).map(|free| free.saturating_sub(64 << 20));
    let manifest = verify(file, room, progress)?;
    let index = index_manifest(&manifest)?;
    let needed: u64 = manifest
        .entries
        .iter()
        .map(|e| if e.kind == "file" { e.size } else { INODE_COST })
        .fold(0u64, u64::saturating_add);
    if let Some(free) = free_bytes(&parent) {
        if free < needed.saturating_add(64 << 20) {
            return Err(OpsError::Failed(format!(
                "{} has {} MiB free; the restore needs {} MiB",
                parent.display(),
                free >> 20,
                (needed >> 20) + 64
            )));
        }
    }

    let work = tempfile::Builder::new()
        .prefix(".moltmate-restore-")
        .tempdir_in(&parent)
        .map_err(io(format!(
            "creating a work folder in {}",
            parent.display()
        )))?;
    let root = work.path().to_path_buf();
    let as_root = rustix::process::geteuid().is_root();
    let written = extract(file, &root, &index, as_root, progress)?;
    check_target(&target)?;
    std::fs::rename(&root, &target).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::NOTEMPTY.raw_os_error()) {
            OpsError::TargetNotEmpty(format!(
                "{} was filled while the restore ran; nothing was written",
                target.display()
            ))
        } else {
            io(format!("moving the restored home to {}", target.display()))(e)
        }
    })?;
    // Renamed: nothing left for the work folder to clean up.
    let _ = work.keep();
    if let Ok(dir) = std::fs::File::open(&target) {
        let _ = rustix::fs::syncfs(&dir);
    }
    Ok(RestoreReport {
        home: target,
        entries: manifest.entries.len() as u64,
        files: written.0,
        bytes: written.1,
        includes_secrets: manifest.includes_secrets,
        secrets_left_out: manifest.secrets_left_out,
        owners_kept: !as_root,
        created_at: manifest.created_at,
    })
}

/// Opens the directory `path` beneath `root` (never through a link, never out of it) a few
/// components at a time: an archive path may be longer than the kernel's `PATH_MAX`.
fn open_deep(
    root: &rustix::fd::OwnedFd,
    path: &str,
) -> Result<Option<rustix::fd::OwnedFd>, OpsError> {
    use moltmate_store::homes::{open_beneath, Expect};
    const STEP: usize = 2048;
    let mut current: Option<rustix::fd::OwnedFd> = None;
    let mut rest = path;
    while !rest.is_empty() {
        // The longest prefix of whole components within STEP bytes (a component is at most
        // 255 bytes, so there always is one).
        let cut = if rest.len() <= STEP {
            rest.len()
        } else {
            rest.as_bytes()[..=STEP]
                .iter()
                .rposition(|b| *b == b'/')
                .filter(|at| *at > 0)
                .unwrap_or(rest.len())
        };
        let (chunk, tail) = rest.split_at(cut);
        let opened = match &current {
            None => open_beneath(root, chunk, Expect::Directory)?,
            Some(dir) => open_beneath(dir, chunk, Expect::Directory)?,
        };
        let Some((fd, _)) = opened else {
            return Ok(None);
        };
        current = Some(fd);
        rest = tail.strip_prefix('/').unwrap_or(tail);
    }
    Ok(current)
}

/// Second pass: writes every entry beneath `root` (opened without following links), checking
/// each against the verified manifest again. Returns (files, bytes).
fn extract(
    file: &Path,
    root: &Path,
    index: &HashMap<String, ManifestEntry>,
    as_root: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(u64, u64), OpsError> {
    use rustix::fd::AsFd;
    use rustix::fs::{AtFlags, Mode, OFlags};
    let root_fd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| io(format!("opening {}", root.display()))(e.into()))?;
    let mut archive = open_archive(file)?;
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut directories: Vec<(String, u32, u64, u64)> = Vec::new();
    let mut links: Vec<(String, String, u64, u64)> = Vec::new();
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut reported_at = std::time::Instant::now();
    let changed = |path: &str| {
        bad(format!(
            "entry {path:?} changed since it was verified; nothing was written"
        ))
    };
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive ({e})")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("damaged or truncated ({e})")))?;
        let (path, mut item) = read_header(&entry)?;
        if path == MANIFEST {
            break;
        }
        let listed = index.get(&path).ok_or_else(|| changed(&path))?;
        check_parent(&seen, &path)?;
        let (parent, name) = match path.rsplit_once('/') {
            Some((parent, name)) => (Some(parent), name),
            None => (None, path.as_str()),
        };
        let dir = match parent {
            None => None,
            Some(parent) => Some(open_deep(&root_fd, parent)?.ok_or_else(|| changed(&path))?),
        };
        let dir_fd = match &dir {
            Some(fd) => fd.as_fd(),
            None => root_fd.as_fd(),
        };
        match item.kind {
            "dir" => {
                rustix::fs::mkdirat(dir_fd, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| io(format!("creating {path}"))(e.into()))?;
                directories.push((path.clone(), item.mode, item.uid, item.gid));
            }
            "symlink" => {
                // Made last, so nothing is ever written through one.
                if let Some(target) = &item.target {
                    links.push((path.clone(), target.clone(), item.uid, item.gid));
                }
            }
            _ => {
                let out = rustix::fs::openat(
                    dir_fd,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io(format!("creating {path}"))(e.into()))?;
                let mut out = std::fs::File::from(out);
                item.sha256 = Some(hash_content(&mut entry, item.size, Some(&mut out), &path)?);
                // Private files stay private whatever the archive says.
                let mode = if parent.is_none() {
                    0o600
                } else {
                    item.mode & 0o777
                };
                let mtime = rustix::fs::Timestamps {
                    last_access: rustix::fs::Timespec {
                        tv_sec: i64::try_from(listed.mtime).unwrap_or(0),
                        tv_nsec: 0,
                    },
                    last_modification: rustix::fs::Timespec {
                        tv_sec: i64::try_from(listed.mtime).unwrap_or(0),
                        tv_nsec: 0,
                    },
                };
                let _ = rustix::fs::futimens(&out, &mtime);
                if as_root {
                    rustix::fs::fchown(
                        &out,
                        Some(rustix::fs::Uid::from_raw(item.uid as u32)),
                        Some(rustix::fs::Gid::from_raw(item.gid as u32)),
                    )
                    .map_err(|e| io(format!("setting the owner of {path}"))(e.into()))?;
                }
                rustix::fs::fchmod(&out, Mode::from_raw_mode(mode))
                    .map_err(|e| io(format!("setting the mode of {path}"))(e.into()))?;
                files += 1;
                bytes += item.size;
                if reported_at.elapsed() >= std::time::Duration::from_millis(500) {
                    reported_at = std::time::Instant::now();
                    progress(&Progress {
                        phase: "writing",
                        files,
                        bytes,
                    });
                }
            }
        }
        if seen_of(listed) != item {
            return Err(changed(&path));
        }
        if seen.insert(path.clone(), item).is_some() {
            return Err(changed(&path));
        }
    }
    if seen.len() != index.len() {
        return Err(bad(
            "the archive changed since it was verified; nothing was written",
        ));
    }
    for (path, target, uid, gid) in links {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
        let dir = open_deep(&root_fd, parent)?.ok_or_else(|| changed(&path))?;
        rustix::fs::symlinkat(target.as_str(), &dir, name)
            .map_err(|e| io(format!("creating {path}"))(e.into()))?;
        if as_root {
            rustix::fs::chownat(
                &dir,
                name,
                Some(rustix::fs::Uid::from_raw(uid as u32)),
                Some(rustix::fs::Gid::from_raw(gid as u32)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io(format!("setting the owner of {path}"))(e.into()))?;
        }
    }
    // Folder modes and owners last, deepest first (a 0500 folder must not stop its own
    // contents from being written).
    for (path, mode, uid, gid) in directories.iter().rev() {
        let fd = open_deep(&root_fd, path)?.ok_or_else(|| changed(path))?;
        if as_root {
            rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(*uid as u32)),
                Some(rustix::fs::Gid::from_raw(*gid as u32)),
            )
            .map_err(|e| io(format!("setting the owner of {path}"))(e.into()))?;
        }
        // The top-level folders stay private whatever the archive says. Setgid stays on
        // folders (a family folder and its subfolders are 2770: new files get the family's
        // group); setuid and sticky go.
        let mode = if path.contains('/') {
            mode & 0o2777
        } else {
            0o700
        };
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
            .map_err(|e| io(format!("setting the mode of {path}"))(e.into()))?;
    }
    rustix::fs::fchmod(&root_fd, Mode::from_raw_mode(0o700))
        .map_err(|e| io("securing the restored home")(e.into()))?;
    let db = root.join("moltmate.db");
    moltmate_store::db::check_database(&db)
        .map_err(|e| bad(format!("the restored database is not usable: {e}")))?;
    progress(&Progress {
        phase: "done",
        files,
        bytes,
    });
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_a_home_are_refused() {
        for path in [
            "/etc/passwd",
            "../x",
            "users/../../x",
            "users/a/../../b",
            "users//a",
            "./users",
            "etc/passwd",
            "users/a\0b",
            "",
        ] {
            assert!(check_path(path).is_err(), "{path:?}");
        }
        for path in [
            "moltmate.db",
            "users/anna/MEMORY.md",
            "personas/x/SOUL.md",
            "families/f",
        ] {
            assert!(check_path(path).is_ok(), "{path:?}");
        }
    }

    #[test]
    fn links_must_stay_inside_their_folder() {
        let parts = |p: &'static str| p.split('/').collect::<Vec<_>>();
        assert!(link_stays_inside(&parts("users/anna/a"), "MEMORY.md"));
        assert!(link_stays_inside(
            &parts("users/anna/memory/x"),
            "../MEMORY.md"
        ));
        // `..` after a name: that name may be a link itself.
        assert!(!link_stays_inside(
            &parts("users/anna/a"),
            "./memory/../USER.md"
        ));
        assert!(!link_stays_inside(
            &parts("users/anna/escape"),
            "a/b/a/b/../../../../etc/shadow"
        ));
        assert!(link_stays_inside(&parts("users/anna/a/b"), ".."));
        assert!(link_stays_inside(&parts("users/anna/x/y"), "../a/b/a/b/x"));
        assert!(!link_stays_inside(&parts("users/anna/a"), "/etc/passwd"));
        assert!(!link_stays_inside(
            &parts("users/anna/a"),
            "../bob/MEMORY.md"
        ));
        assert!(!link_stays_inside(
            &parts("users/anna/memory/x"),
            "../../bob"
        ));
        assert!(!link_stays_inside(&parts("users/anna"), "anna2"));
        assert!(!link_stays_inside(&parts("moltmate.db"), "x"));
        assert!(link_stays_inside(
            &parts("personas/p/SOUL.md"),
            "../q/SOUL.md"
        ));
        assert!(!link_stays_inside(
            &parts("personas/p/SOUL.md"),
            "../../moltmate.json"
        ));
    }
}
