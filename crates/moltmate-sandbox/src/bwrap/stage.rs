//! Dropping a root gateway to the unprivileged sandbox uid before bwrap starts.
//!
//! When the gateway runs as root, bwrap must not: a root-started bwrap maps the sandbox user to
//! host uid 0, so a kernel bug in the namespace layer would hand out real root, and files in the
//! home would be owned by root (homes belong to their user's own sandbox uid). So the forked
//! child becomes the user's uid/gid (plus the family folder's gid as its one supplementary
//! group) before executing bwrap. An unprivileged bwrap can only bind paths that uid can
//! reach, while homes and `state_dir` sit below 0700 root directories;
//! so first, still as root, the child moves into a private mount namespace (invisible to the
//! host), mounts a small tmpfs on [`STAGE_DIR`] and bind-mounts each source (home, family
//! folder, scratch dir, proxy socket) there. bwrap then binds the staged paths.
//!
//! Everything the child does is a plain system call on data prepared before the fork, as
//! required between `fork` and `exec` in a multi-threaded process.

use moltmate_core::sandbox::SandboxIds;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

/// Mount point of the per-exec staging tmpfs (an empty root-owned directory on the host).
pub const STAGE_DIR: &str = "/run/moltmate-bwrap";

/// True when this process is root and must drop privileges for bwrap.
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Creates [`STAGE_DIR`] (root, 0755) and refuses anything else already there (a symlink or a
/// directory someone else owns could redirect the staging mounts).
pub fn ensure_stage_dir() -> io::Result<()> {
    let path = Path::new(STAGE_DIR);
    match std::fs::DirBuilder::new().mode(0o755).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{STAGE_DIR} must be a directory owned by root"),
        ));
    }
    Ok(())
}

struct StagedBind {
    source: CString,
    target: CString,
    is_file: bool,
}

/// The staging mounts of one exec, prepared in the parent and applied in the child.
pub struct StagePlan {
    ids: SandboxIds,
    /// Supplementary groups (the family folder's gid), allocated before the fork.
    groups: Vec<libc::gid_t>,
    stage: CString,
    tmpfs: CString,
    tmpfs_options: CString,
    binds: Vec<StagedBind>,
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

impl StagePlan {
    /// A plan that ends as `ids` with `groups` as the only supplementary groups.
    pub fn new(ids: SandboxIds, groups: Vec<u32>) -> io::Result<Self> {
        let bad_group = groups
            .iter()
            .any(|&g| moltmate_core::sandbox::check_id("gid", g).is_err());
        if ids.check().is_err() || bad_group {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "refusing to run a sandbox as root or nobody",
            ));
        }
        Ok(StagePlan {
            ids,
            groups,
            stage: cstring(Path::new(STAGE_DIR))?,
            tmpfs: cstring(Path::new("tmpfs"))?,
            tmpfs_options: cstring(Path::new("mode=0755,size=64k,nr_inodes=64"))?,
            binds: Vec::new(),
        })
    }

    /// Stages `source` as `name` and returns the path bwrap should bind from.
    pub fn add(&mut self, source: &Path, name: &str) -> io::Result<String> {
        let staged = Path::new(STAGE_DIR).join(name);
        let is_file = !std::fs::metadata(source)?.is_dir();
        self.binds.push(StagedBind {
            source: cstring(source)?,
            target: cstring(&staged)?,
            is_file,
        });
        Ok(staged.to_string_lossy().into_owned())
    }

    /// In the forked child, before exec: private mount namespace, staging tmpfs, bind mounts,
    /// then the plan's gid, supplementary groups and uid (in that order: each step needs the
    /// privilege the next one drops).
    pub fn apply_in_child(&self) -> io::Result<()> {
        fn check(rc: libc::c_int) -> io::Result<()> {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }
        // SAFETY (whole block): plain system calls on NUL-terminated strings owned by `self`,
        // which outlives the call; no allocation, no locks.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing done here may propagate back to the host's mounts.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                self.tmpfs.as_ptr(),
                self.stage.as_ptr(),
                self.tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                self.tmpfs_options.as_ptr().cast(),
            ))?;
            for bind in &self.binds {
                if bind.is_file {
                    let fd = libc::open(
                        bind.target.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o600,
                    );
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(fd);
                } else {
                    check(libc::mkdir(bind.target.as_ptr(), 0o755))?;
                }
                check(libc::mount(
                    bind.source.as_ptr(),
                    bind.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
            }
            let groups = if self.groups.is_empty() {
                std::ptr::null()
            } else {
                self.groups.as_ptr()
            };
            check(libc::setgroups(self.groups.len(), groups))?;
            let (uid, gid) = (self.ids.uid, self.ids.gid);
            check(libc::setresgid(gid, gid, gid))?;
            check(libc::setresuid(uid, uid, uid))?;
        }
        Ok(())
    }
}
