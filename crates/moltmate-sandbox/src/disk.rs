//! Per-user disk cap on the home directory, usable by every backend.
//!
//! Each user's home is backed by a sparse ext4 image, `state_dir/disks/<user>.img`, loop-mounted
//! over the home (`-o loop,nosuid,nodev`) before anything writes there: the gateway calls
//! [`LoopVolumes`] (core's `DiskCaps` hook) before each of the user's turns, and the backends
//! call the same functions before each command. Whatever a sandboxed
//! command writes to `/workspace` therefore lands in a filesystem of exactly `cap_bytes`, and a
//! disk-filling command gets `ENOSPC` instead of filling the host.
//!
//! * **The image is the truth.** On the first call for a user the existing contents of the home
//!   are copied into the fresh image and then removed from the underlying directory (they would
//!   otherwise be hidden under the mount yet still consume host space). After a host reboot the
//!   image is simply mounted again.
//! * **Growth.** When the cap grows, the image file is extended and the mounted filesystem is
//!   grown online (`losetup -c` + `resize2fs`; needs `CAP_SYS_RESOURCE`); when that is refused
//!   the image is grown offline at its next mount instead. A shrinking cap is not applied: shrinking ext4
//!   needs the filesystem offline and could lose data; the old, larger size stays in force and
//!   a warning is logged.
//! * **Ownership.** The filesystem root belongs to the directory's sandbox identity
//!   ([`SandboxIds`]: the user's own uid/gid; for a family folder the family's id, root mode
//!   2770 with the setgid bit) and migrated files are handed to it too, so the sandbox can
//!   write its own home. A volume whose root has another owner (made under an older release,
//!   or before a change of `sandbox.uidRange`) is re-owned entry by entry on mount, without
//!   following symlinks ([`reown_tree`]).
//! * **Needs root.** Loop mounts need `CAP_SYS_ADMIN`. Without root a warning is logged once, the
//!   home is used as is, and [`DiskCap::enforced`] is `false` (backends report this in `list`).
//!
//! The helpers shell out to `mkfs.ext4`, `mount`, `umount`, `losetup`, `resize2fs` and `cp`
//! (e2fsprogs, util-linux, coreutils): they are the supported interfaces for these operations.
//! All calls are blocking; async callers should use `tokio::task::spawn_blocking`.

use moltmate_core::sandbox::{CappedDir, DiskCaps, SandboxError, SandboxIds};
use moltmate_core::UserId;
use rustix::fs::{AtFlags, Mode, OFlags};
use std::collections::BTreeMap;
use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// ext4 needs some room for its own metadata; smaller caps are raised to this.
pub const MIN_CAP_BYTES: u64 = 16 * 1024 * 1024;

/// One lock per directory (by canonical path) serialises its volume set-up in this process:
/// two concurrent first calls for one user must not both migrate and mount. Per directory, not
/// global, because the gateway checks a user's volume before each of their turns: one user's
/// slow first move (a large home) must not hold up everyone else's turns. Entries are a few
/// bytes per directory ever seen (users' homes, scratch dirs, family folders).
static VOLUME_LOCKS: Mutex<BTreeMap<PathBuf, Arc<Mutex<()>>>> = Mutex::new(BTreeMap::new());

fn volume_lock(dir: &Path) -> Arc<Mutex<()>> {
    // A poisoned map only means a panic elsewhere mid-insert; the map itself stays valid.
    let mut locks = VOLUME_LOCKS.lock().unwrap_or_else(|p| p.into_inner());
    locks.entry(dir.to_path_buf()).or_default().clone()
}
static WARNED_NOT_ROOT: AtomicBool = AtomicBool::new(false);

/// `disks` directories (canonical) whose gateway has shut down in this process: their volumes
/// were released by [`release_all`] and nothing may mount them again (a turn still running
/// after the drain, a dropped test gateway's leftover task) until [`open_volumes`] reopens
/// them. Checked under the volume lock, so a set-up in flight either finished before the
/// release (and was unmounted by it) or sees the mark.
static CLOSED: Mutex<std::collections::BTreeSet<PathBuf>> =
    Mutex::new(std::collections::BTreeSet::new());

fn is_closed(disks: &Path) -> bool {
    let canonical = fs::canonicalize(disks).unwrap_or_else(|_| disks.to_path_buf());
    CLOSED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&canonical)
}

/// The prefix of a staging directory and image for a volume's first set-up.
const STAGING: &str = ".migrate-";

/// At most this many mounts stacked on one directory are taken down (a loop bound; more
/// than one only ever comes from a release that crashed or another tool).
const MAX_STACKED: usize = 16;

/// The state of one user's disk cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCap {
    /// `true` when writes to the home are really bounded by `cap_bytes`.
    pub enforced: bool,
    /// Size of the filesystem backing the home (0 when not enforced).
    pub cap_bytes: u64,
    /// The backing image, when enforced.
    pub image: Option<PathBuf>,
    /// Why the cap is not enforced, when it is not.
    pub reason: Option<String>,
}

impl DiskCap {
    fn not_enforced(reason: &str) -> Self {
        DiskCap {
            enforced: false,
            cap_bytes: 0,
            image: None,
            reason: Some(reason.to_string()),
        }
    }
}

fn err(detail: impl Into<String>) -> SandboxError {
    SandboxError::Backend {
        backend: "disk",
        detail: detail.into(),
    }
}

/// Whether this process may loop-mount (effective uid 0).
pub fn can_enforce() -> bool {
    rustix::process::geteuid().is_root()
}

/// Makes sure `home` is backed by a capped ext4 image of (at least) `cap_bytes` and mounted.
///
/// Idempotent and cheap when the image is already mounted at `home` (one read of
/// `/proc/self/mountinfo`). `cap_bytes == 0` means "no cap". Without root the call succeeds with
/// `enforced: false` after logging a warning once.
pub fn ensure_user_volume(
    state_dir: &Path,
    home: &Path,
    user: &UserId,
    cap_bytes: u64,
    ids: SandboxIds,
) -> Result<DiskCap, SandboxError> {
    ensure_volume(
        state_dir,
        home,
        user.as_str(),
        cap_bytes,
        Owner::private(ids),
    )
}

/// Who a volume's files belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub ids: SandboxIds,
    /// A family folder: root 2770 (setgid), entries group-writable, nothing for others.
    pub shared: bool,
}

impl Owner {
    pub fn private(ids: SandboxIds) -> Self {
        Owner { ids, shared: false }
    }

    pub fn shared(ids: SandboxIds) -> Self {
        Owner { ids, shared: true }
    }

    fn root_mode(&self) -> u32 {
        if self.shared {
            0o2770
        } else {
            0o700
        }
    }
}

/// Whether preparing `dir`'s capped volume would still have to create it and move the
/// directory's contents onto it (slow, and not safe while anything else writes there).
pub fn needs_first_setup(dir: &Path, cap_bytes: u64) -> bool {
    cap_bytes > 0
        && can_enforce()
        && fs::canonicalize(dir)
            .ok()
            .and_then(|dir| mounted_source(&dir).ok())
            .is_none_or(|source| source.is_none())
}

/// [`ensure_user_volume`] for any directory, with the image `disks/<name>.img`. Names of
/// non-user volumes contain a `.`, which user ids cannot, so they never share an image.
fn ensure_volume(
    state_dir: &Path,
    home: &Path,
    name: &str,
    cap_bytes: u64,
    owner: Owner,
) -> Result<DiskCap, SandboxError> {
    if cap_bytes == 0 {
        return Ok(DiskCap::not_enforced("no disk cap configured"));
    }
    if !can_enforce() {
        if !WARNED_NOT_ROOT.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "sandbox disk caps need root (loop mounts); running without a per-user disk cap"
            );
        }
        return Ok(DiskCap::not_enforced("disk cap needs root"));
    }
    owner.ids.check()?;
    let cap_bytes = cap_bytes.max(MIN_CAP_BYTES);
    fs::create_dir_all(home)
        .map_err(|e| err(format!("cannot create home {}: {e}", home.display())))?;
    let home = fs::canonicalize(home)
        .map_err(|e| err(format!("cannot resolve home {}: {e}", home.display())))?;
    let lock = volume_lock(&home);
    // A poisoned lock only means another set-up panicked; the on-disk state is re-read anyway.
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    let disks = state_dir.join("disks");
    fs::create_dir_all(&disks)
        .map_err(|e| err(format!("cannot create {}: {e}", disks.display())))?;
    set_mode(&disks, 0o700)?;
    if is_closed(&disks) {
        return Err(err(
            "the gateway is shutting down; its disk volumes are released",
        ));
    }
    let image = disks.join(format!("{name}.img"));

    if let Some(source) = mounted_source(&home)? {
        let size = fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
        if cap_bytes > size && size > 0 {
            // Online growth needs kernel support (and CAP_SYS_RESOURCE); when refused, the new
            // size is applied offline at the next mount instead of failing the command.
            if let Err(e) = grow_mounted(&image, &source, &home, cap_bytes) {
                tracing::warn!(volume = %name, error = %e, "cannot grow the disk cap online; it grows at the next mount");
                // Give the file back its old length so that the next mount sees the cap as
                // larger than the image and grows it offline. The filesystem never used the
                // added tail, so this loses nothing.
                if let Ok(file) = fs::OpenOptions::new().write(true).open(&image) {
                    let _ = file.set_len(size);
                }
            }
        } else if cap_bytes < size {
            tracing::warn!(volume = %name, "disk cap lowered; keeping the larger existing image (shrinking needs the filesystem offline)");
        }
        own_root(&home, owner)?;
        let size = fs::metadata(&image).map(|m| m.len()).unwrap_or(cap_bytes);
        return Ok(DiskCap {
            enforced: true,
            cap_bytes: size,
            image: Some(image),
            reason: None,
        });
    }

    if !image.exists() {
        make_and_migrate(&image, &home, &disks, name, cap_bytes, owner)?;
    } else {
        let size = fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
        if cap_bytes > size {
            grow_offline(&image, cap_bytes)?;
        }
    }
    mount_once(&disks, &image, &home)?;
    if let Err(e) = own_root(&home, owner) {
        // Not usable by its sandbox as it is: do not leave it mounted half-owned.
        let _ = unmount_all_at(&home);
        return Err(e);
    }
    let size = fs::metadata(&image).map(|m| m.len()).unwrap_or(cap_bytes);
    tracing::info!(volume = %name, cap_bytes = size, "directory mounted on its capped volume");
    Ok(DiskCap {
        enforced: true,
        cap_bytes: size,
        image: Some(image),
        reason: None,
    })
}

/// Puts a family's shared folder on its own capped volume, `disks/family.<digest of the
/// folder's name>.img`, so no member can fill the host through `/family` either. The cap
/// grows with a larger request, never shrinks. Same semantics as [`ensure_user_volume`].
pub fn ensure_family_volume(
    state_dir: &Path,
    family_dir: &Path,
    cap_bytes: u64,
    ids: SandboxIds,
) -> Result<DiskCap, SandboxError> {
    let family = family_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = volume_name("family", &family);
    ensure_volume(state_dir, family_dir, &name, cap_bytes, Owner::shared(ids))
}

/// A user's scratch directory (`workspaceAccess: none`) on its own capped volume,
/// `disks/scratch.<digest>.img`.
pub fn ensure_scratch_volume(
    state_dir: &Path,
    scratch_dir: &Path,
    user: &UserId,
    cap_bytes: u64,
    ids: SandboxIds,
) -> Result<DiskCap, SandboxError> {
    ensure_volume(
        state_dir,
        scratch_dir,
        &scratch_volume_name(user),
        cap_bytes,
        Owner::private(ids),
    )
}

/// [`DiskCaps`] on loop-mounted images below `state_dir/disks` (what the gateway calls before a
/// user's first write; the sandbox backends call the same functions before each command).
#[derive(Debug, Clone)]
pub struct LoopVolumes {
    state_dir: PathBuf,
}

impl LoopVolumes {
    /// `state_dir` is the sandbox layer's (`<home>/sandboxes`).
    pub fn new(state_dir: &Path) -> Self {
        LoopVolumes {
            state_dir: state_dir.to_path_buf(),
        }
    }
}

impl DiskCaps for LoopVolumes {
    fn ensure_capped(
        &self,
        user: &UserId,
        dir: &Path,
        kind: CappedDir,
        ids: SandboxIds,
        cap_bytes: u64,
    ) -> Result<bool, SandboxError> {
        let cap = match kind {
            CappedDir::Home => ensure_user_volume(&self.state_dir, dir, user, cap_bytes, ids)?,
            CappedDir::Scratch => {
                ensure_scratch_volume(&self.state_dir, dir, user, cap_bytes, ids)?
            }
        };
        Ok(cap.enforced)
    }
}

/// The image stem of `user`'s scratch volume (`disks/<stem>.img`).
pub fn scratch_volume_name(user: &UserId) -> String {
    volume_name("scratch", user.as_str())
}

/// The image stem of the family folder `family`'s volume (`disks/<stem>.img`).
pub fn family_volume_name(family: &str) -> String {
    volume_name("family", family)
}

/// Whether `dir` is the mount point of a capped volume in this process's mount namespace.
pub fn is_mounted_volume(dir: &Path) -> bool {
    fs::canonicalize(dir)
        .ok()
        .and_then(|dir| mounted_source(&dir).ok().flatten())
        .is_some()
}

/// An image mounted read-only for reading its files (a backup of a home whose volume is not
/// mounted here); unmounted when dropped.
pub struct ReadOnlyMount {
    at: PathBuf,
}

impl ReadOnlyMount {
    pub fn path(&self) -> &Path {
        &self.at
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("umount").arg(&self.at)) {
            tracing::warn!(error = %e, "could not unmount a read-only volume");
        }
    }
}

/// Mounts `image` read-only at the existing empty directory `at` (`ro,noload`: no journal
/// replay, nothing written to the image, which may be mounted read-write elsewhere at the
/// same time; `nosuid,nodev,noexec`). Needs root.
pub fn mount_read_only(image: &Path, at: &Path) -> Result<ReadOnlyMount, SandboxError> {
    if !can_enforce() {
        return Err(err("mounting a disk image needs root"));
    }
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,ro,noload,nosuid,nodev,noexec"])
        .arg(image)
        .arg(at))?;
    Ok(ReadOnlyMount {
        at: at.to_path_buf(),
    })
}

/// `<kind>.<digest of key>`: within file-name limits for any key, and never a user id
/// (those cannot contain `.`).
fn volume_name(kind: &str, key: &str) -> String {
    use sha2::Digest;
    let tag = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    format!("{kind}.{}", &tag[..16])
}

/// Mounts `user`'s existing image over their home when it is not mounted (after a reboot, or
/// after the gateway stopped), so what reads the home from outside a turn (`users show`,
/// `export`, the archive before `reset`/`remove`) sees the files, which live in the image.
/// Changes nothing else: no image is made, nothing moved or re-owned. `Ok(false)` when there
/// is no image (or no root to mount it).
pub fn mount_existing_user_volume(
    state_dir: &Path,
    home: &Path,
    user: &UserId,
) -> Result<bool, SandboxError> {
    if !can_enforce() {
        return Ok(false);
    }
    let image = state_dir
        .join("disks")
        .join(format!("{}.img", user.as_str()));
    if !image.is_file() || !home.is_dir() {
        return Ok(false);
    }
    let home = fs::canonicalize(home)
        .map_err(|e| err(format!("cannot resolve home {}: {e}", home.display())))?;
    let lock = volume_lock(&home);
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    let disks = state_dir.join("disks");
    if is_closed(&disks) {
        return Err(err(
            "the gateway is shutting down; its disk volumes are released",
        ));
    }
    mount_once(&disks, &image, &home)?;
    Ok(true)
}

/// Unmounts the capped volume at `home`, every mount stacked there (for tests and backups).
/// The image stays.
pub fn release_user_volume(home: &Path) -> Result<(), SandboxError> {
    let home = fs::canonicalize(home)
        .map_err(|e| err(format!("cannot resolve home {}: {e}", home.display())))?;
    let lock = volume_lock(&home);
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    unmount_all_at(&home)
}

/// Ends a volume for good (`users remove` / `reset`): unmounts `dir` and every mount, wherever
/// in this mount namespace, whose loop device is backed by `disks/<name>.img` (a stale
/// staging mount, a second mount left by a crash), then deletes the image and any staging
/// leftovers. Nothing of the volume stays mounted or on disk.
pub fn remove_volume(state_dir: &Path, dir: &Path, name: &str) -> Result<(), SandboxError> {
    let disks = state_dir.join("disks");
    let image = disks.join(format!("{name}.img"));
    let lock = fs::canonicalize(dir).ok().map(|dir| volume_lock(&dir));
    let _guard = lock
        .as_ref()
        .map(|lock| lock.lock().unwrap_or_else(|p| p.into_inner()));
    // Against other processes too: a gateway's `mount_once` must not mount the image again
    // between the unmounts below and its deletion (a mount of a deleted image would outlive
    // the user). No `disks` directory: nothing was ever mounted from it.
    let _disks = match lock_disks(&disks) {
        Ok(fd) => Some(fd),
        Err(_) if !disks.exists() => None,
        Err(e) => return Err(e),
    };
    if let Ok(dir) = fs::canonicalize(dir) {
        unmount_all_at(&dir)?;
    }
    for mount in mounts_backed_by(&disks, |file| file == format!("{name}.img"))? {
        unmount_all_at(&mount)?;
    }
    clean_staging(&disks, name)?;
    match fs::remove_file(&image) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(format!("cannot remove {}: {e}", image.display()))),
    }
}

/// A gateway process's hold on the volumes below one state directory: a shared `flock` on
/// `disks/.gateways`, so a gateway that stops can tell whether another process (`moltmate
/// chat` next to `moltmate serve`) still uses the volumes it would take down.
#[derive(Debug)]
pub struct VolumeHold {
    state_dir: PathBuf,
    lock: fs::File,
}

impl VolumeHold {
    /// For a gateway that stops: when no other gateway process holds these volumes, unmounts
    /// them all ([`release_all`]); otherwise only closes them to this process. Returns how
    /// many mounts were taken down. Blocking.
    pub fn release(self) -> Result<usize, SandboxError> {
        use rustix::fs::{flock, FlockOperation};
        if flock(&self.lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            close(&self.state_dir.join("disks"));
            tracing::info!("another gateway process uses the disk volumes; they stay mounted");
            return Ok(0);
        }
        release_all(&self.state_dir)
    }
}

/// Opens the volumes below `state_dir` for a starting gateway (also after a restart in the same
/// process) and, when no other gateway process holds them, clears what an earlier one left
/// half-done: a first set-up interrupted by a crash or `kill -9` leaves a staging mount and
/// image (`disks/.migrate-*`), which are unmounted and deleted (the home's files were never
/// removed before the staging image became the volume). Homes still mounted by a killed
/// gateway stay mounted and are reused: set-up never mounts a directory twice. Blocking.
pub fn open_volumes(state_dir: &Path) -> Result<VolumeHold, SandboxError> {
    use rustix::fs::{flock, FlockOperation};
    let disks = state_dir.join("disks");
    fs::create_dir_all(&disks)
        .map_err(|e| err(format!("cannot create {}: {e}", disks.display())))?;
    set_mode(&disks, 0o700)?;
    if let Ok(canonical) = fs::canonicalize(&disks) {
        CLOSED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&canonical);
    }
    let holders = disks.join(".gateways");
    let lock = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc_nofollow())
            .open(&holders)
            .map_err(|e| err(format!("cannot open {}: {e}", holders.display())))?
    };
    let alone = flock(&lock, FlockOperation::NonBlockingLockExclusive).is_ok();
    if alone && can_enforce() {
        clear_staging_leftovers(&disks)?;
    }
    flock(&lock, FlockOperation::LockShared)
        .map_err(|e| err(format!("cannot lock {}: {e}", holders.display())))?;
    Ok(VolumeHold {
        state_dir: state_dir.to_path_buf(),
        lock,
    })
}

fn libc_nofollow() -> i32 {
    OFlags::NOFOLLOW.bits() as i32
}

fn clear_staging_leftovers(disks: &Path) -> Result<(), SandboxError> {
    let mut names = std::collections::BTreeSet::new();
    let entries =
        fs::read_dir(disks).map_err(|e| err(format!("cannot read {}: {e}", disks.display())))?;
    for entry in entries.flatten().take(100_000) {
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(rest) = file.strip_prefix(STAGING) {
            names.insert(rest.strip_suffix(".img").unwrap_or(rest).to_string());
        }
    }
    for mount in mounts_backed_by(disks, |file| file.starts_with(STAGING))? {
        unmount_all_at(&mount)?;
    }
    for name in names {
        tracing::warn!(volume = %name, "clearing an interrupted disk volume set-up");
        clean_staging(disks, &name)?;
    }
    Ok(())
}

fn close(disks: &Path) -> Option<PathBuf> {
    let canonical = fs::canonicalize(disks).ok()?;
    CLOSED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(canonical.clone());
    Some(canonical)
}

/// Unmounts every volume whose image lies in `state_dir/disks` (homes, family folders, scratch
/// directories, staging and read-only mounts), whoever else uses them (tests; a gateway that
/// stops goes through [`VolumeHold::release`]): nothing mounted there outlives it. Set-ups still running finish first; later ones are refused until
/// [`open_volumes`]. Returns how many mounts were taken down. Blocking.
pub fn release_all(state_dir: &Path) -> Result<usize, SandboxError> {
    let disks = state_dir.join("disks");
    let Some(canonical) = close(&disks) else {
        return Ok(0);
    };
    if !can_enforce() {
        return Ok(0);
    }
    // Wait for set-ups in flight below this gateway's home (they hold their directory's lock).
    let home = canonical
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| canonical.clone());
    let locks: Vec<Arc<Mutex<()>>> = VOLUME_LOCKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(dir, _)| dir.starts_with(&home))
        .map(|(_, lock)| lock.clone())
        .collect();
    for lock in locks {
        drop(lock.lock().unwrap_or_else(|p| p.into_inner()));
    }
    let mounts = mounts_backed_by(&disks, |_| true)?;
    let mut first_error = None;
    for mount in &mounts {
        if let Err(e) = unmount_all_at(mount) {
            tracing::warn!(dir = %mount.display(), error = %e, "cannot release a disk volume");
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(mounts.len()),
    }
}

/// Mounts `image` at `home` unless something is mounted there already, with the `disks`
/// directory locked against other processes (`flock`: the gateway and a `users` command must
/// not both see it unmounted and both mount it, stacking two mounts).
fn mount_once(disks: &Path, image: &Path, home: &Path) -> Result<(), SandboxError> {
    let _disks = lock_disks(disks)?;
    if mounted_source(home)?.is_none() {
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,nosuid,nodev"])
            .arg(image)
            .arg(home))?;
    }
    Ok(())
}

/// The `disks` directory locked against other processes (exclusive `flock`, released when the
/// returned descriptor is dropped): mounting a volume and removing one never interleave.
fn lock_disks(disks: &Path) -> Result<std::os::fd::OwnedFd, SandboxError> {
    let fd = open_dir(disks)?;
    rustix::fs::flock(&fd, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| err(format!("cannot lock {}: {e}", disks.display())))?;
    Ok(fd)
}

/// Unmounts every ext4 mount stacked at `dir` (canonical). A mount still busy (a file open
/// in it) is detached lazily: it leaves the namespace now and its loop device is freed when
/// the last user closes it.
fn unmount_all_at(dir: &Path) -> Result<(), SandboxError> {
    for _ in 0..MAX_STACKED {
        if mounted_source(dir)?.is_none() {
            return Ok(());
        }
        if run(Command::new("umount").arg(dir)).is_err() {
            run(Command::new("umount").arg("-l").arg(dir))?;
        }
    }
    match mounted_source(dir)? {
        None => Ok(()),
        Some(_) => Err(err(format!(
            "{} has more than {MAX_STACKED} mounts stacked",
            dir.display()
        ))),
    }
}

/// Mount points (this namespace, mountinfo order) of ext4 loop mounts whose backing file lies
/// in `disks` and whose file name passes `wanted` (a deleted image still counts).
fn mounts_backed_by(
    disks: &Path,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<PathBuf>, SandboxError> {
    let Ok(disks) = fs::canonicalize(disks) else {
        return Ok(Vec::new());
    };
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| err(format!("cannot read /proc/self/mountinfo: {e}")))?;
    let mut found = Vec::new();
    for (mountpoint, source) in ext4_mounts(&info) {
        let Some(device) = source.strip_prefix("/dev/") else {
            continue;
        };
        if !device.starts_with("loop") || device.contains('/') {
            continue;
        }
        let Ok(backing) = fs::read_to_string(format!("/sys/block/{device}/loop/backing_file"))
        else {
            continue;
        };
        let backing = backing.trim_end_matches('\n');
        let backing = Path::new(backing.strip_suffix(" (deleted)").unwrap_or(backing));
        let in_disks = backing.parent() == Some(disks.as_path());
        let name = backing
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if in_disks && wanted(&name) && !found.contains(&mountpoint) {
            found.push(mountpoint);
        }
    }
    Ok(found)
}

/// Every ext4 mount in mountinfo text: (mount point, source).
fn ext4_mounts(mountinfo: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some(mountpoint) = line.split(' ').nth(4) else {
            continue;
        };
        let mut rest = line.split(" - ").nth(1).unwrap_or("").split(' ');
        if let (Some("ext4"), Some(source)) = (rest.next(), rest.next()) {
            out.push((
                PathBuf::from(unescape_mountinfo(mountpoint)),
                source.to_string(),
            ));
        }
    }
    out
}

fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Unmounts and deletes a volume's staging directory and image (`disks/.migrate-<name>`).
fn clean_staging(disks: &Path, name: &str) -> Result<(), SandboxError> {
    let staging = disks.join(format!("{STAGING}{name}"));
    if let Ok(dir) = fs::canonicalize(&staging) {
        unmount_all_at(&dir)?;
    }
    match fs::remove_dir(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(format!("cannot remove {}: {e}", staging.display()))),
    }
    let image = disks.join(format!("{STAGING}{name}.img"));
    match fs::remove_file(&image) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(format!("cannot remove {}: {e}", image.display()))),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), SandboxError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| err(format!("cannot chmod {}: {e}", path.display())))
}

fn create_image(image: &Path, cap_bytes: u64, owner: Owner) -> Result<(), SandboxError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|e| err(format!("cannot create {}: {e}", image.display())))?;
    // Sparse: only blocks actually written use host space.
    file.set_len(cap_bytes)
        .map_err(|e| err(format!("cannot size {}: {e}", image.display())))?;
    drop(file);
    set_mode(image, 0o600)?;
    let owner = format!("root_owner={}:{}", owner.ids.uid, owner.ids.gid);
    // -m 0: no blocks reserved for root (nobody is root in the sandbox).
    let made = run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E", &owner])
        .arg(image));
    if made.is_err() {
        // Do not leave a half-made image that would be mounted as "the truth" next time.
        let _ = fs::remove_file(image);
    }
    made
}

/// Makes the volume `image` for `home`: the image is built under a staging name
/// (`disks/.migrate-<name>.img`), the home's current files are copied in through a staging
/// mount (`disks/.migrate-<name>`), the staging mount is taken down, and only then is the image
/// renamed into place and the copied files cleared from the underlying directory. So a crash
/// or a failed copy at any step leaves the originals and no `<name>.img` (a half-filled image
/// must never become the truth), and its staging leftovers are cleared on the next try or
/// the next start ([`open_volumes`]).
fn make_and_migrate(
    image: &Path,
    home: &Path,
    disks: &Path,
    name: &str,
    cap_bytes: u64,
    owner: Owner,
) -> Result<(), SandboxError> {
    clean_staging(disks, name)?;
    let staged = disks.join(format!("{STAGING}{name}.img"));
    let made = create_image(&staged, cap_bytes, owner)
        .and_then(|()| migrate_into(&staged, home, disks, name, owner))
        .and_then(|has_content| {
            // Durable before it becomes the truth.
            fs::File::open(&staged)
                .and_then(|f| f.sync_all())
                .map_err(|e| err(format!("cannot sync {}: {e}", staged.display())))?;
            fs::rename(&staged, image)
                .map_err(|e| err(format!("cannot rename {}: {e}", staged.display())))?;
            if let Ok(dir) = fs::File::open(disks) {
                let _ = dir.sync_all();
            }
            Ok(has_content)
        });
    let has_content = match made {
        Ok(has_content) => has_content,
        Err(e) => {
            if let Err(cleanup) = clean_staging(disks, name) {
                tracing::warn!(volume = %name, error = %cleanup, "cannot clear a failed volume set-up");
            }
            return Err(e);
        }
    };
    if has_content {
        clear_dir(home)?;
    }
    Ok(())
}

/// Copies the current home into the (staging) image; `Ok(true)` when there was anything to
/// copy. The staging mount is always taken down again, lazily when busy.
fn migrate_into(
    image: &Path,
    home: &Path,
    disks: &Path,
    name: &str,
    owner: Owner,
) -> Result<bool, SandboxError> {
    let has_content = fs::read_dir(home)
        .map_err(|e| err(format!("cannot read {}: {e}", home.display())))?
        .next()
        .is_some();
    if !has_content {
        return Ok(false);
    }
    let staging = disks.join(format!("{STAGING}{name}"));
    fs::create_dir_all(&staging)
        .map_err(|e| err(format!("cannot create {}: {e}", staging.display())))?;
    let staging = fs::canonicalize(&staging)
        .map_err(|e| err(format!("cannot resolve {}: {e}", staging.display())))?;
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev"])
        .arg(image)
        .arg(&staging))?;
    let mut src = home.as_os_str().to_owned();
    src.push("/.");
    let copied = run(Command::new("cp").arg("-a").arg(&src).arg(&staging))
        .and_then(|()| reown_tree(&staging, owner));
    let unmounted = unmount_all_at(&staging);
    let _ = fs::remove_dir(&staging);
    copied?;
    unmounted?;
    Ok(true)
}

/// Removes everything in `dir` (the copied originals under a fresh volume's mount point).
fn clear_dir(dir: &Path) -> Result<(), SandboxError> {
    for entry in
        fs::read_dir(dir).map_err(|e| err(format!("cannot read {}: {e}", dir.display())))?
    {
        let entry = entry.map_err(|e| err(format!("cannot read {}: {e}", dir.display())))?;
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let removed = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| err(format!("cannot clear migrated {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Gives a mounted volume's root its owner and mode; re-owns the whole tree first when the
/// root belongs to someone else (an image made under an older release, or before a change of
/// `sandbox.uidRange`). One `fstat` when all is in order.
fn own_root(root: &Path, owner: Owner) -> Result<(), SandboxError> {
    let fd = open_dir(root)?;
    let stat =
        rustix::fs::fstat(&fd).map_err(|e| err(format!("cannot stat {}: {e}", root.display())))?;
    if (stat.st_uid, stat.st_gid) != (owner.ids.uid, owner.ids.gid) {
        tracing::info!(dir = %root.display(), "volume made for another sandbox id; re-owning its files");
        reown_tree(root, owner)?;
    }
    let stat =
        rustix::fs::fstat(&fd).map_err(|e| err(format!("cannot stat {}: {e}", root.display())))?;
    if stat.st_mode & 0o7777 != owner.root_mode() {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(owner.root_mode()))
            .map_err(|e| err(format!("cannot chmod {}: {e}", root.display())))?;
    }
    Ok(())
}

/// Deepest directory nesting [`reown_tree`] descends into; deeper entries keep their owner
/// (and stay unusable to the new one) rather than exhausting descriptors.
const REOWN_MAX_DEPTH: usize = 256;

/// Hands `root` and everything below it to `owner`, as root, over a tree its previous owner
/// may still be changing: no path is followed (every step is `openat` with `O_NOFOLLOW`
/// relative to its already-open parent), ownership changes use `AT_SYMLINK_NOFOLLOW`, and
/// modes are changed through a descriptor of the entry itself, never by name — so a symlink
/// swapped in anywhere cannot redirect a change outside the tree. Shared (family) trees also
/// get group access: `g+rw`, `o-rwx`, setgid on directories. Hand-written: `chown -R` and
/// `chmod -R` change modes by path and cannot express the family rule in one pass.
pub fn reown_tree(root: &Path, owner: Owner) -> Result<(), SandboxError> {
    let fd = open_dir(root)?;
    reown_entries(&fd, owner, 0)?;
    reown_fd(&fd, owner, true)
        .map_err(|e| err(format!("cannot hand {} to its owner: {e}", root.display())))
}

fn open_dir(path: &Path) -> Result<OwnedFd, SandboxError> {
    rustix::fs::open(
        path,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err(format!("cannot open {}: {e}", path.display())))
}

fn reown_entries(dir: &OwnedFd, owner: Owner, depth: usize) -> Result<(), SandboxError> {
    if depth >= REOWN_MAX_DEPTH {
        tracing::warn!(
            "a directory tree is nested too deeply to re-own below depth {REOWN_MAX_DEPTH}"
        );
        return Ok(());
    }
    let mut entries = rustix::fs::Dir::read_from(dir)
        .map_err(|e| err(format!("cannot list a directory: {e}")))?;
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(|e| err(format!("cannot list a directory: {e}")))?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        // The owner first, never following a symlink at the name.
        let owned = rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(owner.ids.uid)),
            Some(rustix::fs::Gid::from_raw(owner.ids.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        );
        match owned {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(err(format!("cannot hand {name:?} to its owner: {e}"))),
        }
        // Then the mode, and the descent, through the entry's own descriptor. Symlinks
        // (ELOOP), sockets (ENXIO) and vanished entries have nothing more to do.
        let opened = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        );
        let fd = match opened {
            Ok(fd) => fd,
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NXIO | rustix::io::Errno::NOENT) => {
                continue
            }
            Err(e) => return Err(err(format!("cannot open {name:?}: {e}"))),
        };
        let is_dir = rustix::fs::fstat(&fd)
            .map(|s| s.st_mode & 0o170000 == 0o040000)
            .map_err(|e| err(format!("cannot stat {name:?}: {e}")))?;
        if is_dir {
            reown_entries(&fd, owner, depth + 1)?;
        }
        reown_fd(&fd, owner, false).map_err(|e| err(format!("cannot re-own {name:?}: {e}")))?;
    }
    Ok(())
}

/// The owner (again, for the root) and, for shared trees, the group-access mode of an open
/// entry. `chown` clears setuid/setgid bits, so the mode comes after it.
fn reown_fd(fd: &OwnedFd, owner: Owner, is_root: bool) -> rustix::io::Result<()> {
    if is_root {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(owner.ids.uid)),
            Some(rustix::fs::Gid::from_raw(owner.ids.gid)),
        )?;
    }
    if !owner.shared || is_root {
        return Ok(());
    }
    let stat = rustix::fs::fstat(fd)?;
    let is_dir = stat.st_mode & 0o170000 == 0o040000;
    let mut mode = (stat.st_mode & 0o7777 & !0o007) | 0o060;
    mode = if is_dir {
        mode | 0o2070
    } else {
        mode & !0o6000
    };
    if mode != stat.st_mode & 0o7777 {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?;
    }
    Ok(())
}

fn grow_offline(image: &Path, cap_bytes: u64) -> Result<(), SandboxError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|e| err(format!("cannot open {}: {e}", image.display())))?;
    file.set_len(cap_bytes)
        .map_err(|e| err(format!("cannot grow {}: {e}", image.display())))?;
    drop(file);
    run(Command::new("e2fsck").args(["-f", "-p"]).arg(image))?;
    run(Command::new("resize2fs").arg(image))
}

fn grow_mounted(
    image: &Path,
    loopdev: &str,
    home: &Path,
    cap_bytes: u64,
) -> Result<(), SandboxError> {
    if !loopdev.starts_with("/dev/loop") {
        return Err(err(format!(
            "{} is not mounted from a loop device",
            home.display()
        )));
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|e| err(format!("cannot open {}: {e}", image.display())))?;
    file.set_len(cap_bytes)
        .map_err(|e| err(format!("cannot grow {}: {e}", image.display())))?;
    drop(file);
    run(Command::new("losetup").arg("-c").arg(loopdev))?;
    run(Command::new("resize2fs").arg(loopdev))
}

/// The source device of the ext4 mount at exactly `path`, if any.
fn mounted_source(path: &Path) -> Result<Option<String>, SandboxError> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| err(format!("cannot read /proc/self/mountinfo: {e}")))?;
    Ok(find_mount(&info, path))
}

/// Parses mountinfo: `id parent maj:min root mountpoint opts [optional...] - fstype source super`.
/// The last matching line wins (it is the top of the mount stack).
fn find_mount(mountinfo: &str, path: &Path) -> Option<String> {
    let wanted = escape_mountinfo(&path.to_string_lossy());
    let mut found = None;
    for line in mountinfo.lines() {
        let mut fields = line.split(' ');
        let mountpoint = fields.nth(4);
        if mountpoint != Some(wanted.as_str()) {
            continue;
        }
        let mut rest = line.split(" - ").nth(1).unwrap_or("").split(' ');
        let fstype = rest.next();
        let source = rest.next();
        found = match (fstype, source) {
            (Some("ext4"), Some(source)) => Some(source.to_string()),
            _ => None,
        };
    }
    found
}

fn escape_mountinfo(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

fn run(cmd: &mut Command) -> Result<(), SandboxError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| err(format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(err(format!(
            "{program} failed ({}): {}",
            out.status,
            stderr.trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_top_ext4_mount() {
        let info = "36 35 98:0 / /mnt/home\\040x rw - ext4 /dev/loop3 rw\n\
                    40 35 98:0 / /other rw shared:1 - ext4 /dev/sda1 rw\n";
        assert_eq!(
            find_mount(info, Path::new("/mnt/home x")),
            Some("/dev/loop3".into())
        );
        assert_eq!(find_mount(info, Path::new("/mnt/home")), None);
        let stacked = "1 0 1:1 / /h rw - ext4 /dev/loop1 rw\n2 1 1:2 / /h rw - tmpfs tmpfs rw\n";
        assert_eq!(find_mount(stacked, Path::new("/h")), None);
    }

    #[test]
    fn zero_cap_is_not_enforced() {
        let dir = std::env::temp_dir();
        let user = UserId::new("nobody-zero").unwrap();
        let cap =
            ensure_user_volume(&dir, &dir, &user, 0, SandboxIds::same(2_000_000_000)).unwrap();
        assert!(!cap.enforced);
    }
}
