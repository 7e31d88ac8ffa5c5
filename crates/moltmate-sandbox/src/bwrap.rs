//! Bubblewrap backend: every `exec` is a fresh `bwrap` process, for hosts without Docker.
//!
//! **Isolation.** `--unshare-all` (user, pid, net, ipc, uts, cgroup namespaces) with
//! `--disable-userns`, running inside as the user's own sandbox uid/gid ([`ExecRequest::ids`],
//! named `agent` in a generated passwd); `--die-with-parent`, `--new-session`,
//! `--clearenv` then only `PATH`, `HOME=/workspace`, `LANG` (plus the proxy variables for
//! `network = proxy`): nothing from the gateway's environment can reach a sandbox. The root
//! filesystem is an empty tmpfs holding read-only `/usr` (with the merged-usr symlinks `/bin`,
//! `/lib`, `/lib64`, `/sbin`), the few `/etc` files programs need (generated `passwd`/`group`/
//! `hosts`/`nsswitch.conf` stubs; the host's `ld.so.cache`, `localtime`, `alternatives` and CA
//! certificates), a fresh `/proc` and minimal `/dev`, a size-capped tmpfs `/tmp`, the user's
//! home at `/workspace` (read-write, read-only, or a scratch directory per
//! [`WorkspaceAccess`]) and the family folder at `/family`. Nothing else of the host exists
//! inside: no `/root`, `/home`, other users' homes, `/etc/shadow`, `/run` or the Docker socket.
//! A seccomp filter ([`seccomp`]) refuses tracing, mounting, keyrings, BPF, perf, userfaultfd,
//! new namespaces, module/kexec loading and io_uring.
//!
//! **Host identity.** Sandboxes never run as host root. A root gateway's child enters a private
//! mount namespace, stages the home/family/scratch/proxy-socket paths on a tmpfs at
//! `/run/moltmate-bwrap` (only that child sees it) and becomes the user's own uid/gid (with
//! the family folder's gid as its only supplementary group) before executing bwrap
//! ([`stage`]); bwrap then maps that uid to itself inside, so what a command creates belongs to
//! the user on the host too, and no two users' sandboxes share a uid (a process of one user
//! cannot signal, trace or enter `/proc/<pid>/root` of another's). A non-root gateway cannot
//! switch uids: it runs bwrap as itself and passes its own ids. Either way bwrap drops every
//! capability and sets `no_new_privs`, and commands run with umask 007 (so what one member
//! writes in the setgid `/family` stays usable by the others; homes are 0700).
//!
//! **Scopes.** There is no long-lived process: state persists only in `/workspace`. `/tmp` is
//! fresh on every call, so `user`, `session` and `task` differ only in the scratch directory
//! that stands in for `/workspace` under [`WorkspaceAccess::None`]: one per user
//! (`scratch/<user>/user`), one per session (`scratch/<user>/session-<hash>`, removed by
//! `end_session`), or one per call (removed after it).
//!
//! **Limits.** Each exec gets its own cgroup ([`cgroup`]: memory incl. swap, pids, CPU quota)
//! where the host allows, joined by the child before it executes bwrap, so every process of the
//! sandbox is inside from the start. Under the aggregate bound ([`BwrapSandbox::with_bounds`])
//! that cgroup is a child of the parent cgroup of all sandboxes ([`crate::total`]), and the
//! command holds one of `sandbox.maxActive` slots while it runs ([`crate::active`]). The child
//! raises its `oom_score_adj` to 1000 (the gateway lowered its own), and an OOM kill (its own
//! limit or the total) is reported at the end of stderr. rlimits are always set too, as a backstop: `RLIMIT_FSIZE`
//! (largest file = the disk cap), `RLIMIT_CPU`, `RLIMIT_CORE = 0`, `RLIMIT_NOFILE`, `RLIMIT_AS`
//! (the memory limit without a memory cgroup; four times it with one, so runtimes that reserve
//! address space still start), and `RLIMIT_NPROC` only without a pids cgroup (it counts every
//! process of the host uid: one user's sandboxes together, or every user's under a gateway
//! that cannot switch uids, so where a pids cgroup exists it is left off). The home's total size is capped by the per-user volume of
//! `disk.rs` (an ext4 image loop-mounted on the home, root gateways only); scratch directories
//! sit on the user's scratch volume when the gateway made one (it does before a turn of a user
//! with `workspaceAccess: none`), else they have only `RLIMIT_FSIZE` per file.
//!
//! **Timeouts and output.** The wall-clock timeout SIGKILLs bwrap's process group and the
//! cgroup; bwrap's init is pid 1 of the sandbox's pid namespace, so when it dies the kernel kills
//! every process inside — nothing survives a call. If the gateway itself dies, bwrap gets
//! SIGKILL (parent-death signal) and the sandbox goes with it. stdout and stderr share one budget of
//! `limits.output_bytes`; output beyond it is read and discarded (so a flooder never blocks on a
//! full pipe) until the command exits or times out, and `truncated` is set.

mod cgroup;
mod seccomp;
mod spawner;
mod stage;

pub use cgroup::CgroupSupport;

use crate::proxy::{
    EgressProxy, FORWARDER_PATH, FORWARDER_READY_FILE, FORWARDER_SCRIPT, PROXY_SOCKET_PATH,
    PROXY_URL,
};
use crate::settings::{SandboxScope, SandboxSettings};
use crate::total::SandboxBounds;
use async_trait::async_trait;
use moltmate_core::sandbox::{
    ExecCommand, ExecOutput, ExecRequest, Sandbox, SandboxError, SandboxIds, SandboxInfo,
    SandboxLimits, SandboxNetwork, WorkspaceAccess,
};
use moltmate_core::UserId;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

const BACKEND: &str = "bwrap";
const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long output readers may keep going after the sandbox exited (pipes close when the pid
/// namespace is gone; this only bounds a pathological case).
const READER_GRACE: Duration = Duration::from_secs(2);
/// How long starting bwrap may take (fork, cgroup join, staging, exec) before the command is
/// given up: a host whose cgroup or mount calls hang must not hold a turn and a slot forever.
const SPAWN_DEADLINE: Duration = Duration::from_secs(30);

/// The identity the start-up probe drops to (a root gateway): in systemd's unused block just
/// below `nobody`, and only ever running `true` in an empty namespace.
const PROBE_IDS: SandboxIds = SandboxIds::same(65_533);
const HOSTS: &str = "127.0.0.1\tlocalhost moltmate\n::1\tlocalhost ip6-localhost ip6-loopback\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n";

/// A command killed because its user was removed or reset.
fn ended_user() -> SandboxError {
    SandboxError::Interrupted {
        backend: BACKEND,
        detail: "the command was stopped: its user was removed or reset".into(),
    }
}

fn backend_err(detail: impl Into<String>) -> SandboxError {
    SandboxError::Backend {
        backend: BACKEND,
        detail: detail.into(),
    }
}

/// What is running right now, for `list`.
#[derive(Debug, Clone)]
struct Running {
    user: String,
    /// Concurrent execs under this name.
    count: usize,
    limits: SandboxLimits,
}

/// An exec's cgroup, removed on the blocking pool whenever it is dropped — also when the exec's
/// future is dropped mid-command (the turn was aborted because its user was removed): removing
/// a group kills what is left in it and may wait, which must not happen on the runtime.
struct OffRuntime(Option<cgroup::ExecCgroup>);

impl Drop for OffRuntime {
    fn drop(&mut self) {
        if let Some(group) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(group))),
                Err(_) => drop(group),
            }
        }
    }
}

/// The commands of one user running now, and the token that kills them all.
#[derive(Debug)]
struct UserCancel {
    token: CancellationToken,
    running: usize,
    /// Tells this entry from a later one of the same user (after an `end_user`).
    generation: u64,
}

static CANCEL_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Registers one running command of a user (under their current token) until dropped.
struct CancelGuard<'a> {
    map: &'a Mutex<HashMap<String, UserCancel>>,
    user: String,
    token: CancellationToken,
    generation: u64,
}

impl<'a> CancelGuard<'a> {
    fn register(map: &'a Mutex<HashMap<String, UserCancel>>, user: &UserId) -> Self {
        let mut cancels = map.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cancels
            .entry(user.to_string())
            .or_insert_with(|| UserCancel {
                token: CancellationToken::new(),
                running: 0,
                generation: CANCEL_GENERATION.fetch_add(1, Ordering::Relaxed),
            });
        entry.running += 1;
        CancelGuard {
            map,
            user: user.to_string(),
            token: entry.token.clone(),
            generation: entry.generation,
        }
    }
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        let mut cancels = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the entry this command registered in: `end_user` may have replaced it.
        if let Some(entry) = cancels.get_mut(&self.user) {
            if entry.generation == self.generation {
                entry.running = entry.running.saturating_sub(1);
                if entry.running == 0 {
                    cancels.remove(&self.user);
                }
            }
        }
    }
}

/// The bubblewrap sandbox backend. Cheap to share behind an `Arc`.
pub struct BwrapSandbox {
    counters: moltmate_core::sandbox::SandboxCounters,
    bwrap: PathBuf,
    state_dir: PathBuf,
    scope: SandboxScope,
    seccomp: Arc<[u8]>,
    cgroups: CgroupSupport,
    proxy: Option<Arc<EgressProxy>>,
    running: Mutex<HashMap<String, Running>>,
    /// Per user with commands running: what [`Sandbox::end_user`] cancels to kill them all.
    cancels: Mutex<HashMap<String, UserCancel>>,
    /// The gateway is root: drop to the user's uid through a staging mount namespace
    /// ([`stage`]).
    drop_root: bool,
    /// All sandboxes together ([`crate::total`]): per-exec groups live under its parent
    /// cgroup, and each running command holds one of `sandbox.maxActive` slots.
    bounds: Option<Arc<SandboxBounds>>,
    /// Starts bwrap off the async runtime ([`spawner`]).
    spawner: spawner::Spawner,
}

impl std::fmt::Debug for BwrapSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BwrapSandbox")
            .field("bwrap", &self.bwrap)
            .field("state_dir", &self.state_dir)
            .field("scope", &self.scope)
            .field("cgroups", &self.cgroups)
            .finish_non_exhaustive()
    }
}

/// Finds `bwrap` on the gateway's `PATH` (or the Debian location).
pub fn find_bwrap() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("bwrap"))
            .find(|c| c.is_file())
    });
    from_path.or_else(|| {
        let p = PathBuf::from("/usr/bin/bwrap");
        p.is_file().then_some(p)
    })
}

/// Empty exec cgroups older than this are leftovers of a crashed gateway (a live exec's group
/// holds its processes within milliseconds of being made).
const STALE_CGROUP_AGE: Duration = Duration::from_secs(60);

impl BwrapSandbox {
    /// Prepares the backend: locates bwrap, compiles the seccomp filter, probes cgroups and
    /// creates `state_dir/scratch`. Does not run anything; see [`BwrapSandbox::probe`].
    pub fn new(
        settings: &SandboxSettings,
        proxy: Option<Arc<EgressProxy>>,
    ) -> Result<Self, SandboxError> {
        let bwrap = find_bwrap().ok_or_else(|| {
            SandboxError::Unavailable(
                "bubblewrap is not installed (apt-get install bubblewrap)".into(),
            )
        })?;
        let seccomp = seccomp::compile().map_err(|e| backend_err(e.to_string()))?;
        let scratch = settings.state_dir.join("scratch");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&scratch)
            .map_err(|e| backend_err(format!("cannot create {}: {e}", scratch.display())))?;
        let drop_root = stage::running_as_root();
        if drop_root {
            stage::ensure_stage_dir()
                .map_err(|e| backend_err(format!("cannot prepare {}: {e}", stage::STAGE_DIR)))?;
        }
        let cgroups = CgroupSupport::detect();
        if cgroups == CgroupSupport::None {
            tracing::warn!("no usable cgroups: bubblewrap sandboxes are limited by rlimits only");
        }
        let swept = cgroups.sweep_stale(STALE_CGROUP_AGE);
        if swept > 0 {
            tracing::info!(
                groups = swept,
                "removed sandbox cgroups left by an earlier run"
            );
        }
        Ok(BwrapSandbox {
            counters: Default::default(),
            bwrap,
            state_dir: settings.state_dir.clone(),
            scope: settings.scope,
            seccomp: seccomp.into(),
            cgroups,
            proxy,
            running: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            drop_root,
            bounds: None,
            spawner: spawner::Spawner::new()
                .map_err(|e| backend_err(format!("cannot start the spawner threads: {e}")))?,
        })
    }

    /// Puts every command under `bounds`: its per-exec cgroup becomes a child of the parent
    /// cgroup for all sandboxes (when the host gave one), and it runs only with one of the
    /// `sandbox.maxActive` slots (a running command is an alive sandbox here).
    pub fn with_bounds(mut self, bounds: Arc<SandboxBounds>) -> Self {
        if let Some(parent) = bounds.parent() {
            let cgroups = CgroupSupport::under(parent);
            if cgroups == CgroupSupport::None {
                tracing::warn!(cgroup = %parent.display(), "cannot create per-exec cgroups under the sandboxes' parent cgroup; using the standalone ones");
            } else {
                cgroups.sweep_stale(STALE_CGROUP_AGE);
                self.cgroups = cgroups;
            }
        }
        self.bounds = Some(bounds);
        self
    }

    /// Which cgroup hierarchy limits this backend's sandboxes.
    pub fn cgroups(&self) -> &CgroupSupport {
        &self.cgroups
    }

    /// Runs `true` in a minimal sandbox with every namespace and the seccomp filter: proves
    /// that this host lets bwrap create namespaces. The error says what failed.
    pub async fn probe(&self) -> Result<(), SandboxError> {
        let seccomp_fd = data_fd(&self.seccomp).map_err(|e| backend_err(format!("pipe: {e}")))?;
        let mut args: Vec<String> = base_namespace_args(PROBE_IDS);
        args.extend(root_fs_args());
        args.extend([
            "--seccomp".into(),
            seccomp_fd.as_raw_fd().to_string(),
            "--".into(),
            "true".into(),
        ]);
        let mut cmd = tokio::process::Command::new(&self.bwrap);
        cmd.args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let keep = [seccomp_fd.as_raw_fd()];
        let plan = match self.drop_root {
            true => Some(
                stage::StagePlan::new(PROBE_IDS, Vec::new())
                    .map_err(|e| backend_err(e.to_string()))?,
            ),
            false => None,
        };
        // SAFETY: the hook only makes async-signal-safe system calls (fcntl, and for a root
        // gateway unshare/mount/setres[ug]id) on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                clear_cloexec(&keep)?;
                match &plan {
                    Some(plan) => plan.apply_in_child(),
                    None => Ok(()),
                }
            });
        }
        let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
            .await
            .map_err(|_| {
                SandboxError::Unavailable(
                    "bubblewrap did not finish a trivial command in 10 s".into(),
                )
            })?
            .map_err(|e| {
                SandboxError::Unavailable(format!("cannot run {}: {e}", self.bwrap.display()))
            })?;
        drop(seccomp_fd);
        if out.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(SandboxError::Unavailable(format!(
                "bubblewrap cannot create namespaces here ({}): {}; enable unprivileged user namespaces or install Docker",
                out.status,
                stderr.trim()
            )))
        }
    }

    fn scratch_dir(&self, user: &UserId, session_id: &str) -> (PathBuf, bool) {
        let base = self.state_dir.join("scratch").join(user.as_str());
        match self.scope {
            SandboxScope::User => (base.join("user"), false),
            SandboxScope::Session => (
                base.join(format!("session-{}", short_hash(session_id))),
                false,
            ),
            SandboxScope::Task => (
                base.join(format!("task-{:016x}", rand::random::<u64>())),
                true,
            ),
        }
    }

    fn sandbox_name(&self, user: &UserId, session_id: &str) -> String {
        match self.scope {
            SandboxScope::User => format!("moltmate-bwrap-{user}"),
            SandboxScope::Session => format!("moltmate-bwrap-{user}-{}", short_hash(session_id)),
            SandboxScope::Task => format!("moltmate-bwrap-{user}-task"),
        }
    }
}

fn short_hash(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..8])
}

fn base_namespace_args(ids: SandboxIds) -> Vec<String> {
    let uid = ids.uid.to_string();
    let gid = ids.gid.to_string();
    [
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--uid",
        uid.as_str(),
        "--gid",
        gid.as_str(),
        "--hostname",
        "moltmate",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn root_fs_args() -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["--ro-bind", "/usr", "/usr"]);
    // Merged-usr layout: recreate the top-level symlinks, or bind the real directories on
    // hosts that still have them.
    for dir in ["bin", "lib", "lib64", "lib32", "libx32", "sbin"] {
        let host = Path::new("/").join(dir);
        match std::fs::read_link(&host) {
            Ok(target) => {
                let target = target.to_string_lossy().into_owned();
                a.extend(["--symlink".to_string(), target, format!("/{dir}")]);
            }
            Err(_) if host.is_dir() => {
                a.extend([
                    "--ro-bind".to_string(),
                    host.to_string_lossy().into_owned(),
                    format!("/{dir}"),
                ]);
            }
            Err(_) => {}
        }
    }
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["--proc", "/proc", "--dev", "/dev"]);
    for etc in [
        "/etc/ld.so.cache",
        "/etc/localtime",
        "/etc/alternatives",
        "/etc/ssl",
        "/etc/ca-certificates",
    ] {
        push(&["--ro-bind-try", etc, etc]);
    }
    a
}

/// A read end of a pipe already holding `data` (which must fit the pipe buffer, 64 KiB on
/// Linux — every blob here is a few KiB), for bwrap's `--*-data FD` and `--seccomp FD`.
fn data_fd(data: &[u8]) -> std::io::Result<OwnedFd> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut file = std::fs::File::from(write);
    file.write_all(data)?;
    drop(file);
    Ok(read)
}

/// In the forked child: let bwrap inherit exactly these descriptors.
fn clear_cloexec(fds: &[i32]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: fcntl on an fd we own; async-signal-safe.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Rlimits {
    fsize: u64,
    cpu_secs: u64,
    address_space: u64,
    nproc: Option<u64>,
}

/// In the forked child: join the exec's cgroups, then set the rlimits. Only async-signal-safe
/// calls (write, setrlimit, fcntl).
fn child_setup(cgroup_procs: &[i32], keep: &[i32], limits: Rlimits) -> std::io::Result<()> {
    clear_cloexec(keep)?;
    // The gateway lowered its own OOM score; its sandboxes are the kernel's first choice
    // instead (raising one's own score needs no privilege).
    // SAFETY: open/write/close of a static path with a static buffer; async-signal-safe.
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::write(fd, b"1000".as_ptr().cast(), 4);
            libc::close(fd);
        }
    }
    // Inherited by bwrap and the command: group members share the setgid `/family`.
    // SAFETY: umask(2) cannot fail and is async-signal-safe.
    unsafe { libc::umask(0o007) };
    for &fd in cgroup_procs {
        // Writing "0" to cgroup.procs moves the writing process itself.
        // SAFETY: writing a 1-byte static buffer to an fd we own.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let set = |res: libc::__rlimit_resource_t, v: u64| -> std::io::Result<()> {
        let lim = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: setrlimit with a valid struct.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    set(libc::RLIMIT_CORE, 0)?;
    set(libc::RLIMIT_FSIZE, limits.fsize)?;
    set(libc::RLIMIT_CPU, limits.cpu_secs)?;
    set(libc::RLIMIT_AS, limits.address_space)?;
    set(libc::RLIMIT_NOFILE, 4096)?;
    if let Some(n) = limits.nproc {
        set(libc::RLIMIT_NPROC, n)?;
    }
    Ok(())
}

/// In the forked child, last (a credential change clears the setting): if the gateway dies,
/// bwrap gets SIGKILL, and its `--die-with-parent` takes the sandbox down with it. The signal
/// follows the forking *thread*; execs are spawned from the backend's own spawner threads
/// ([`spawner`]), which live as long as the backend.
fn die_with_gateway(gateway_pid: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl/getppid are async-signal-safe system calls.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The gateway may have died between fork and prctl.
        if libc::getppid() != gateway_pid {
            return Err(std::io::Error::other("the gateway exited"));
        }
    }
    Ok(())
}

/// Reads `stream` to its end, keeping bytes while the shared budget lasts.
async fn capture<R: AsyncRead + Unpin>(mut stream: R, budget: Arc<AtomicU64>) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut take = 0u64;
        let _ = budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
            take = left.min(n as u64);
            Some(left - take)
        });
        kept.extend_from_slice(&buf[..take as usize]);
        if (take as usize) < n {
            truncated = true;
        }
    }
    (kept, truncated)
}

struct RunningGuard<'a> {
    map: &'a Mutex<HashMap<String, Running>>,
    name: String,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        // A poisoned map only means a panic elsewhere; the data is still consistent enough
        // for bookkeeping.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get_mut(&self.name) {
            r.count -= 1;
            if r.count == 0 {
                map.remove(&self.name);
            }
        }
    }
}

#[async_trait]
impl Sandbox for BwrapSandbox {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, SandboxError> {
        request.ids.check()?;
        if let Some(gid) = request.family_gid {
            moltmate_core::sandbox::check_id("family gid", gid)?;
        }
        let mut limits = request.profile.limits.clone();
        let name = self.sandbox_name(&request.user, &request.session_id);
        // A running command is an alive sandbox: it holds a slot until it ends (waiting in the
        // fair queue while all are taken; nothing to evict, bubblewrap keeps nothing idle).
        let _slot = match &self.bounds {
            Some(bounds) => {
                let key = format!("{name}#{:016x}", rand::random::<u64>());
                let slot = bounds
                    .active
                    .acquire(&key, request.user.as_str(), true)
                    .await?;
                limits.cpu_millis = bounds.clamp_cpu(limits.cpu_millis);
                Some(slot)
            }
            None => None,
        };
        // Time spent waiting for a slot is not the command's (nor the user's exec budget).
        let started = Instant::now();

        // Where /workspace comes from.
        let (scratch, scratch_is_temporary) = self.scratch_dir(&request.user, &request.session_id);
        let (workspace, workspace_ro) = match request.profile.workspace_access {
            WorkspaceAccess::Rw => (request.home.clone(), false),
            WorkspaceAccess::Ro => (request.home.clone(), true),
            WorkspaceAccess::None => (scratch.clone(), false),
        };
        {
            let state_dir = self.state_dir.clone();
            let user = request.user.clone();
            let access = request.profile.workspace_access;
            let dir = workspace.clone();
            let disk_bytes = limits.disk_bytes;
            let drop_root = self.drop_root;
            let ids = request.ids;
            let family = request
                .family
                .clone()
                .filter(|_| access != WorkspaceAccess::None);
            let family_gid = request.family_gid;
            tokio::task::spawn_blocking(move || {
                // The family's volume belongs to the family's own id; without one (a gateway
                // that cannot switch uids) the folder is used as it is.
                if let (Some(family), Some(gid)) = (family.filter(|f| f.is_dir()), family_gid) {
                    crate::disk::ensure_family_volume(
                        &state_dir,
                        &family,
                        disk_bytes,
                        SandboxIds::same(gid),
                    )?;
                }
                prepare_workspace(&state_dir, &user, &dir, access, disk_bytes, drop_root, ids)
            })
            .await
            .map_err(|e| backend_err(format!("workspace set-up task failed: {e}")))??;
        }
        if !workspace.is_dir() {
            return Err(backend_err(format!(
                "workspace {} is not a directory",
                workspace.display()
            )));
        }

        // Data handed to bwrap through pipes, so nothing is written to shared paths.
        let pipe = |d: &[u8]| data_fd(d).map_err(|e| backend_err(format!("pipe: {e}")));
        let seccomp_fd = pipe(&self.seccomp)?;
        let passwd_fd = pipe(crate::identity::passwd(request.ids).as_bytes())?;
        let group_fd = pipe(crate::identity::group(request.ids, None).as_bytes())?;
        let hosts_fd = pipe(HOSTS.as_bytes())?;
        let nss_fd = pipe(NSSWITCH.as_bytes())?;
        let mut keep = vec![
            seccomp_fd.as_raw_fd(),
            passwd_fd.as_raw_fd(),
            group_fd.as_raw_fd(),
            hosts_fd.as_raw_fd(),
            nss_fd.as_raw_fd(),
        ];

        let mut args = base_namespace_args(request.ids);
        let mut env = vec![
            ("PATH", SANDBOX_PATH.to_string()),
            ("HOME", "/workspace".to_string()),
            ("LANG", "C.UTF-8".to_string()),
        ];
        args.extend(root_fs_args());
        for (fd, dest) in [
            (&passwd_fd, "/etc/passwd"),
            (&group_fd, "/etc/group"),
            (&hosts_fd, "/etc/hosts"),
            (&nss_fd, "/etc/nsswitch.conf"),
        ] {
            args.extend([
                "--ro-bind-data".into(),
                fd.as_raw_fd().to_string(),
                dest.into(),
            ]);
        }
        args.extend([
            "--size".into(),
            limits.tmp_bytes.max(1024 * 1024).to_string(),
            "--tmpfs".into(),
            "/tmp".into(),
        ]);
        // For a root gateway every host path goes through the staging namespace (see [`stage`]).
        // The family folder (2770, group-owned) is reached through its gid, the command's
        // only supplementary group; without `/family` it gets none.
        let groups: Vec<u32> = request
            .family_gid
            .filter(|_| {
                request.family.is_some()
                    && !matches!(request.profile.workspace_access, WorkspaceAccess::None)
            })
            .into_iter()
            .collect();
        let mut plan = match self.drop_root {
            true => Some(
                stage::StagePlan::new(request.ids, groups)
                    .map_err(|e| backend_err(e.to_string()))?,
            ),
            false => None,
        };
        let mut source = |path: &Path, name: &str| -> Result<String, SandboxError> {
            match plan.as_mut() {
                Some(plan) => plan
                    .add(path, name)
                    .map_err(|e| backend_err(format!("cannot stage {}: {e}", path.display()))),
                None => Ok(path.to_string_lossy().into_owned()),
            }
        };
        let ws = source(&workspace, "workspace")?;
        args.extend([
            if workspace_ro { "--ro-bind" } else { "--bind" }.into(),
            ws,
            "/workspace".into(),
        ]);
        if let Some(family) = &request.family {
            match request.profile.workspace_access {
                WorkspaceAccess::Rw | WorkspaceAccess::Ro if family.is_dir() => {
                    let flag = if workspace_ro { "--ro-bind" } else { "--bind" };
                    let staged = source(family, "family")?;
                    args.extend([flag.into(), staged, "/family".into()]);
                }
                _ => {}
            }
        }

        let mut fwd_fd = None;
        let argv: Vec<String> = match &request.command {
            ExecCommand::Argv(v) if v.is_empty() => return Err(backend_err("empty argv")),
            ExecCommand::Argv(v) => v.clone(),
            ExecCommand::Shell(line) => vec!["/bin/sh".into(), "-c".into(), line.clone()],
        };
        let argv = if request.profile.network == SandboxNetwork::Proxy {
            let proxy = self.proxy.as_ref().ok_or_else(|| {
                backend_err(
                    "this profile needs the egress proxy (network = proxy) but none is running",
                )
            })?;
            let socket = proxy
                .user_socket(&request.user)
                .map_err(|e| backend_err(e.to_string()))?;
            let socket = source(&socket, "proxy.sock")?;
            let fd = pipe(FORWARDER_SCRIPT.as_bytes())?;
            keep.push(fd.as_raw_fd());
            args.extend([
                "--ro-bind-data".into(),
                fd.as_raw_fd().to_string(),
                FORWARDER_PATH.into(),
            ]);
            args.extend(["--bind".into(), socket, PROXY_SOCKET_PATH.into()]);
            fwd_fd = Some(fd);
            for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                env.push((var, PROXY_URL.to_string()));
            }
            env.push(("NO_PROXY", "localhost,127.0.0.1".to_string()));
            // Start the forwarder, wait (bounded) until it listens, then become the command.
            let wrapper = format!(
                "python3 {FORWARDER_PATH} & i=0; while [ ! -e {FORWARDER_READY_FILE} ] && [ $i -lt 300 ]; do sleep 0.01; i=$((i+1)); done; exec \"$@\""
            );
            let mut w = vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                wrapper,
                "sh".to_string(),
            ];
            w.extend(argv);
            w
        } else {
            argv
        };
        for (k, v) in &env {
            args.extend(["--setenv".into(), (*k).into(), v.clone()]);
        }
        args.extend(["--chdir".into(), "/workspace".into()]);
        args.extend([
            "--seccomp".into(),
            seccomp_fd.as_raw_fd().to_string(),
            "--".into(),
        ]);
        args.extend(argv);

        // Limits.
        let cg_name = format!("{name}-{:016x}", rand::random::<u64>());
        let cgroup = {
            let cgroups = self.cgroups.clone();
            let limits = limits.clone();
            tokio::task::spawn_blocking(move || cgroups.create(&cg_name, &limits))
                .await
                .map_err(|e| backend_err(format!("cgroup task: {e}")))?
                .map_err(|e| backend_err(format!("cannot create the sandbox cgroup: {e}")))?
        };
        let cgroup = OffRuntime(Some(cgroup));
        let rlimits = Rlimits {
            // 0 = no disk cap configured.
            fsize: if limits.disk_bytes == 0 {
                libc::RLIM_INFINITY
            } else {
                limits.disk_bytes
            },
            cpu_secs: request.timeout.as_secs().saturating_add(5),
            address_space: if self.cgroups.limits_memory() {
                limits.memory_bytes.saturating_mul(4)
            } else {
                limits.memory_bytes
            },
            nproc: (!self.cgroups.limits_pids()).then_some(limits.pids as u64),
        };
        let cg_fds = cgroup.0.as_ref().map(|c| c.procs_fds()).unwrap_or_default();
        let gateway_pid = std::process::id() as libc::pid_t;

        let mut cmd = tokio::process::Command::new(&self.bwrap);
        cmd.args(&args)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let keep_fds = keep.clone();
        // SAFETY: child_setup and apply_in_child only make async-signal-safe system calls
        // (write, fcntl, setrlimit, unshare, mount, mkdir, setres[ug]id) on data prepared
        // before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // Cgroup and rlimits first, while still root; the privilege drop comes last.
                child_setup(&cg_fds, &keep_fds, rlimits)?;
                if let Some(plan) = &plan {
                    plan.apply_in_child()?;
                }
                die_with_gateway(gateway_pid)
            });
        }

        {
            let mut map = self.running.lock().unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(name.clone()).or_insert(Running {
                user: request.user.to_string(),
                count: 0,
                limits: limits.clone(),
            });
            entry.count += 1;
        }
        let _running = RunningGuard {
            map: &self.running,
            name: name.clone(),
        };
        let cancel = CancelGuard::register(&self.cancels, &request.user);
        if cancel.token.is_cancelled() {
            return Err(ended_user());
        }

        // Off the async runtime, from threads that outlive the sandbox ([`spawner`]).
        // A child that starts after the deadline is dropped unseen, and killed (`kill_on_drop`).
        let mut child = tokio::time::timeout(SPAWN_DEADLINE, self.spawner.spawn(cmd))
            .await
            .map_err(|_| {
                backend_err(format!(
                    "{} did not start within {} s",
                    self.bwrap.display(),
                    SPAWN_DEADLINE.as_secs()
                ))
            })?
            .map_err(|e| backend_err(format!("cannot start {}: {e}", self.bwrap.display())))?;
        self.counters.count_started();
        drop((seccomp_fd, passwd_fd, group_fd, hosts_fd, nss_fd, fwd_fd));
        let pgid = child.id().map(|p| p as i32);

        let budget = Arc::new(AtomicU64::new(limits.output_bytes));
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| backend_err("stdout not captured"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| backend_err("stderr not captured"))?;
        let mut out_task = tokio::spawn(capture(stdout, budget.clone()));
        let mut err_task = tokio::spawn(capture(stderr, budget));

        let waited = tokio::select! {
            waited = tokio::time::timeout(request.timeout, child.wait()) => Some(waited),
            _ = cancel.token.cancelled() => None,
        };
        let Some(waited) = waited else {
            // The user was ended: the command dies like one past its timeout (bwrap's process
            // group, then its pid namespace with it), and nothing of it is reported back.
            if let Some(pgid) = pgid {
                // SAFETY: kill(2) on our own child's process group.
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
            // Dropping the group kills what is left in it (off the runtime: it may wait).
            drop(cgroup);
            out_task.abort();
            err_task.abort();
            if scratch_is_temporary {
                let _ = tokio::fs::remove_dir_all(&scratch).await;
            }
            return Err(ended_user());
        };
        let (status, timed_out) = match waited {
            Ok(status) => (
                status.map_err(|e| backend_err(format!("wait: {e}")))?,
                false,
            ),
            Err(_) => {
                if let Some(pgid) = pgid {
                    // SAFETY: kill(2) on our own child's process group.
                    unsafe { libc::killpg(pgid, libc::SIGKILL) };
                }
                let _ = child.start_kill();
                let status = child
                    .wait()
                    .await
                    .map_err(|e| backend_err(format!("wait: {e}")))?;
                (status, true)
            }
        };
        // Whatever is left in the cgroup dies with it; run the blocking cleanup off the runtime.
        // It is not awaited: bwrap's init was pid 1 of the sandbox's pid namespace, so every
        // process in it is already dead or dying, and removing the (v1) memory cgroup can take
        // several milliseconds of reclaim that the caller need not wait for.
        // The OOM-kill counter is read first (the group is fresh, so any kill is this
        // command's: its own limit or the total of all sandboxes).
        let mut cgroup = cgroup;
        let group = cgroup.0.take();
        let (oom_tx, oom_rx) = tokio::sync::oneshot::channel();
        drop(tokio::task::spawn_blocking(move || {
            let _ = oom_tx.send(group.as_ref().and_then(|g| g.oom_kills()));
            drop(group)
        }));
        let oom_killed = oom_rx.await.ok().flatten().is_some_and(|kills| kills > 0);

        let collect = |r: Result<(Vec<u8>, bool), tokio::task::JoinError>| r.unwrap_or_default();
        let (stdout, t1) = match tokio::time::timeout(READER_GRACE, &mut out_task).await {
            Ok(r) => collect(r),
            Err(_) => {
                out_task.abort();
                (Vec::new(), true)
            }
        };
        let (stderr, t2) = match tokio::time::timeout(READER_GRACE, &mut err_task).await {
            Ok(r) => collect(r),
            Err(_) => {
                err_task.abort();
                (Vec::new(), true)
            }
        };
        if scratch_is_temporary {
            let _ = tokio::fs::remove_dir_all(&scratch).await;
        }

        let mut exit_code = if timed_out { None } else { status.code() };
        let mut stderr = String::from_utf8_lossy(&stderr).into_owned();
        if oom_killed {
            // bwrap reports a SIGKILLed command as 137.
            if exit_code == Some(137) {
                exit_code = None;
            }
            stderr.push_str(&crate::total::oom_note(
                limits.memory_bytes,
                self.bounds.as_ref().map(|b| b.settings.limits.memory_bytes),
            ));
        }
        tracing::debug!(user = %request.user, sandbox = %name, ?exit_code, timed_out, oom_killed, "bwrap exec finished");
        Ok(ExecOutput {
            exit_code,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr,
            truncated: t1 || t2,
            timed_out,
            duration: started.elapsed(),
        })
    }

    async fn list(&self) -> Result<Vec<SandboxInfo>, SandboxError> {
        let mut out: Vec<SandboxInfo> = Vec::new();
        {
            let map = self.running.lock().unwrap_or_else(|p| p.into_inner());
            for (name, r) in map.iter() {
                out.push(SandboxInfo {
                    name: name.clone(),
                    user: r.user.clone(),
                    backend: BACKEND,
                    state: if r.count > 1 {
                        format!("running ({} commands)", r.count)
                    } else {
                        "running".into()
                    },
                    idle_seconds: Some(0),
                    limits: Some(r.limits.clone()),
                });
            }
        }
        // Scratch directories are the only state kept between calls.
        let scratch = self.state_dir.join("scratch");
        for (user, dir, idle) in scratch_dirs(&scratch) {
            let name = format!(
                "moltmate-bwrap-{user}-{}",
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
            out.push(SandboxInfo {
                name,
                user,
                backend: BACKEND,
                state: "idle".into(),
                idle_seconds: Some(idle.as_secs()),
                limits: None,
            });
        }
        Ok(out)
    }

    async fn prune(&self, idle: Duration) -> Result<Vec<String>, SandboxError> {
        let scratch = self.state_dir.join("scratch");
        let mut removed = Vec::new();
        for (user, dir, age) in scratch_dirs(&scratch) {
            if age > idle {
                match tokio::fs::remove_dir_all(&dir).await {
                    Ok(()) => removed.push(format!(
                        "{user}/{}",
                        dir.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    )),
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot prune scratch dir")
                    }
                }
            }
        }
        self.counters.count_pruned(removed.len());
        Ok(removed)
    }

    fn stats(&self) -> moltmate_core::sandbox::SandboxStats {
        self.counters.snapshot()
    }

    /// Kills every command of the user running now (each in its own cgroup, under the user's
    /// own uid: its process group, its pid namespace and the cgroup go). Commands of the user
    /// that start afterwards are not affected: the gateway starts none for an ended user.
    async fn end_user(&self, user: &UserId) -> Result<(), SandboxError> {
        let entry = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user.as_str());
        if let Some(entry) = entry {
            tracing::info!(user = %user, commands = entry.running, "killing the running commands of an ended user");
            entry.token.cancel();
        }
        Ok(())
    }

    async fn aggregate(&self) -> Option<moltmate_core::sandbox::SandboxAggregate> {
        match &self.bounds {
            Some(bounds) => Some(bounds.aggregate().await),
            None => None,
        }
    }

    async fn end_session(&self, user: &UserId, session_id: &str) -> Result<(), SandboxError> {
        let dir = self
            .state_dir
            .join("scratch")
            .join(user.as_str())
            .join(format!("session-{}", short_hash(session_id)));
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(backend_err(format!("cannot remove {}: {e}", dir.display()))),
        }
    }
}

/// Creates the directory mounted at /workspace and makes it usable by the sandbox user: the
/// home gets its disk cap (`disk.rs`: an ext4 image of `disk_bytes`, owned by the user's ids)
/// when the host allows; otherwise a root gateway hands the directory itself to the user's ids
/// (as the Docker backend does). Scratch directories have no image of their own here (the
/// gateway puts the user's whole scratch root on one before their first turn); `RLIMIT_FSIZE`
/// bounds each file there.
fn prepare_workspace(
    state_dir: &Path,
    user: &UserId,
    dir: &Path,
    access: WorkspaceAccess,
    disk_bytes: u64,
    drop_root: bool,
    ids: SandboxIds,
) -> Result<(), SandboxError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| backend_err(format!("cannot create {}: {e}", dir.display())))?;
    let enforced = match access {
        WorkspaceAccess::Rw | WorkspaceAccess::Ro => {
            crate::disk::ensure_user_volume(state_dir, dir, user, disk_bytes, ids)?.enforced
        }
        WorkspaceAccess::None => false,
    };
    if drop_root && !enforced {
        let meta = std::fs::metadata(dir)
            .map_err(|e| backend_err(format!("cannot stat {}: {e}", dir.display())))?;
        use std::os::unix::fs::MetadataExt;
        if (meta.uid(), meta.gid()) != (ids.uid, ids.gid) {
            let id = rustix::process::Uid::from_raw(ids.uid);
            let gid = rustix::process::Gid::from_raw(ids.gid);
            rustix::fs::chown(dir, Some(id), Some(gid))
                .map_err(|e| backend_err(format!("cannot chown {}: {e}", dir.display())))?;
        }
        // One user's: no other sandbox uid may look in (homes are made 0700 anyway).
        if meta.mode() & 0o077 != 0 {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| backend_err(format!("cannot chmod {}: {e}", dir.display())))?;
        }
    }
    Ok(())
}

/// `(user, dir, idle)` for every scratch directory; idle is measured from the last change.
fn scratch_dirs(scratch: &Path) -> Vec<(String, PathBuf, Duration)> {
    let mut out = Vec::new();
    let Ok(users) = std::fs::read_dir(scratch) else {
        return out;
    };
    for user in users.flatten() {
        let Ok(dirs) = std::fs::read_dir(user.path()) else {
            continue;
        };
        for dir in dirs.flatten() {
            let idle = dir
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .unwrap_or_default();
            out.push((
                user.file_name().to_string_lossy().into_owned(),
                dir.path(),
                idle,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_fd_holds_the_bytes() {
        use std::io::Read;
        let fd = data_fd(b"hello").unwrap();
        let mut s = String::new();
        std::fs::File::from(fd).read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn root_fs_never_binds_host_secrets() {
        let args = root_fs_args().join(" ");
        for p in [
            "/etc/shadow",
            "/root",
            "/home",
            "/var/run/docker.sock",
            "/run",
        ] {
            assert!(!args.split(' ').any(|a| a == p), "{p} must not be bound");
        }
    }
}
