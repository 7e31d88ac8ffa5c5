//! The sandbox contract: run a command for one user, isolated from the host and other users.
//!
//! Invariant: a sandbox is keyed by its user; nothing a backend creates is ever shared between
//! two users, and nothing the gateway holds (keys, tokens, config) enters it.

use crate::UserId;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The host identity one user's sandboxed commands run as, and that owns their home.
///
/// A root gateway gives every user their own uid (and a primary gid of the same number) from
/// [`UidRange`], stored in the database and never handed to anyone else; a family folder gets
/// a gid of its own from the same range. So an escape from one user's sandbox lands in that
/// user's files only. A gateway that is not root cannot switch uids: then every user runs as
/// the gateway's own uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SandboxIds {
    pub uid: u32,
    pub gid: u32,
}

/// The mode of a new entry in a shared (setgid) family folder, from the mode it was created
/// with: the group gets what the owner has (at least read and write), others nothing,
/// directories keep (get) the setgid bit so what is made inside stays the family's, files never
/// carry setuid/setgid. Every writer into a family folder — the store's `homes` and the file
/// tools — applies it, so what one member's assistant writes, every member's sandbox can change
/// (members run with umask 007 and the family gid as a supplementary group), and nobody else
/// can read.
pub const fn family_shared_mode(st_mode: u32) -> u32 {
    let is_dir = st_mode & 0o170000 == 0o040000;
    let mode = (st_mode & 0o7777 & !0o007) | 0o060;
    if is_dir {
        mode | 0o2070
    } else {
        mode & !0o6000
    }
}

impl SandboxIds {
    /// `uid` with a primary group of the same number.
    pub const fn same(id: u32) -> Self {
        SandboxIds { uid: id, gid: id }
    }

    /// Refuses identities no sandbox may run as: root (0), `nobody`/overflow (65534), the two
    /// "-1" values (65535, 4294967295). Backends check this before starting anything.
    pub fn check(&self) -> Result<(), SandboxError> {
        for (what, id) in [("uid", self.uid), ("gid", self.gid)] {
            check_id(what, id)?;
        }
        Ok(())
    }
}

/// See [`SandboxIds::check`]; also used for supplementary (family) gids.
pub fn check_id(what: &str, id: u32) -> Result<(), SandboxError> {
    if matches!(id, 0 | 65534 | 65535 | u32::MAX) {
        return Err(SandboxError::Unavailable(format!(
            "refusing to run a sandbox with {what} {id} (root, nobody or invalid)"
        )));
    }
    Ok(())
}

/// Where a root gateway takes users' and families' sandbox ids from (`sandbox.uidRange`).
///
/// The default, 2,000,000,000 + 1,000,000, lies in the block systemd documents as unused
/// (1879048192–2147352575, "UIDs and GIDs on systemd systems"): above normal logins
/// (1000–60000), systemd-homed (60001–60513), dynamic users (61184–65519), `nobody` (65534),
/// the 16-bit boundary, the usual `/etc/subuid` ranges (100000 + 65536·n, up to 600100000 by
/// default), systemd's container ranges (524288–1879048191), and below systemd's foreign-uid
/// range (2147352576) and 2^31 (tools that treat uids as signed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UidRange {
    pub start: u32,
    pub count: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange {
            start: 2_000_000_000,
            count: 1_000_000,
        }
    }
}

impl UidRange {
    /// The lowest start accepted: everything below is for logins, system and dynamic users.
    pub const MIN_START: u32 = 65_536;
    /// One past the highest id accepted (2^31: some tools treat uids as signed).
    pub const END_LIMIT: u64 = 1 << 31;

    /// One past the last id of the range.
    pub fn end(&self) -> u64 {
        u64::from(self.start) + u64::from(self.count)
    }

    pub fn contains(&self, id: u32) -> bool {
        id >= self.start && u64::from(id) < self.end()
    }

    /// Why this range is unusable, if it is.
    pub fn problem(&self) -> Option<String> {
        if self.count == 0 {
            return Some("count must be at least 1".to_string());
        }
        if self.start < Self::MIN_START {
            return Some(format!(
                "start must be at least {} (lower ids belong to logins, system and systemd's dynamic users, and nobody)",
                Self::MIN_START
            ));
        }
        if self.end() > Self::END_LIMIT {
            return Some(format!(
                "start + count must not exceed {} (2^31)",
                Self::END_LIMIT
            ));
        }
        None
    }
}

/// Whether `name` may name the parent cgroup of all sandboxes (`sandbox.total.cgroup`): one
/// path component of at most 64 characters — a lowercase letter, then lowercase letters,
/// digits or `_`. No `-` (systemd reads it as nesting in slice names), nothing a path is made
/// of. Shared by config validation and the sandbox layer, which checks again.
pub fn valid_cgroup_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// How much of the user's home the sandbox sees at `/workspace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceAccess {
    #[default]
    Rw,
    Ro,
    /// A scratch directory instead of the home.
    None,
}

/// Network of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxNetwork {
    /// No network at all (loopback only inside the sandbox).
    #[default]
    None,
    /// Egress only through the gateway's filtering HTTP(S) proxy.
    Proxy,
}

/// Resource limits of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SandboxLimits {
    /// Memory, including swap.
    pub memory_bytes: u64,
    /// CPU quota in thousandths of a CPU (1000 = one full core).
    pub cpu_millis: u32,
    /// Maximum number of processes/threads.
    pub pids: u32,
    /// Maximum bytes the user can write to their workspace.
    pub disk_bytes: u64,
    /// Size of the tmpfs mounted at /tmp.
    pub tmp_bytes: u64,
    /// Bytes of stdout+stderr returned to the model; the rest is cut with a note.
    pub output_bytes: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            memory_bytes: 512 * 1024 * 1024,
            cpu_millis: 1000,
            pids: 128,
            disk_bytes: 1024 * 1024 * 1024,
            tmp_bytes: 64 * 1024 * 1024,
            output_bytes: 64 * 1024,
        }
    }
}

/// Everything about a user's sandbox that can differ between users (trust levels).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct SandboxProfile {
    pub workspace_access: WorkspaceAccess,
    pub network: SandboxNetwork,
    pub limits: SandboxLimits,
}

/// `tools.exec.security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecSecurity {
    /// No shell; single commands or pipelines of `safe_bins` only.
    #[default]
    Allowlist,
    /// Shell allowed; `blocked_bins` refused.
    Blocklist,
    /// Any shell command (still inside the sandbox).
    Full,
}

/// How `exec` command lines are vetted.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecSettings {
    pub security: ExecSecurity,
    pub safe_bins: Vec<String>,
    /// Programs in `safe_bins` that are not in the project's vetted table
    /// ([`crate::allowlist::VETTED_SAFE_BINS`]) and that the operator vouches for
    /// (`tools.exec.vouchedBins`). Known runners and writers stay refused even here.
    #[serde(default)]
    pub vouched_bins: Vec<String>,
    pub blocked_bins: Vec<String>,
    /// Used when the model gives no `timeout_seconds`.
    pub default_timeout: Duration,
    /// Upper bound for `timeout_seconds`.
    pub max_timeout: Duration,
}

/// What to run. The exec policy has already vetted it; backends run it as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecCommand {
    /// Run this program with these arguments, no shell.
    Argv(Vec<String>),
    /// Run through `/bin/sh -c` inside the sandbox.
    Shell(String),
}

/// One command for one user.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub user: UserId,
    /// Host path of the user's home, mounted at `/workspace` (per `profile.workspace_access`).
    pub home: PathBuf,
    /// Host path of the user's family folder, mounted at `/family`, if any.
    pub family: Option<PathBuf>,
    /// The host identity the command runs as (see [`SandboxIds`]).
    pub ids: SandboxIds,
    /// The family folder's group, given to the command as a supplementary group so it can use
    /// `/family` (group-owned, setgid, 2770); `None` without a family or per-user ids.
    pub family_gid: Option<u32>,
    /// The session the call belongs to (sandbox scope `session`).
    pub session_id: String,
    pub command: ExecCommand,
    pub timeout: Duration,
    pub profile: SandboxProfile,
}

/// The result of a command that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// `None` when killed by a signal or the timeout.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Output beyond `limits.output_bytes` was dropped.
    pub truncated: bool,
    pub timed_out: bool,
    pub duration: Duration,
}

/// A sandbox as listed by `moltmate sandbox list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxInfo {
    pub name: String,
    pub user: String,
    pub backend: &'static str,
    /// `running`, `idle`, `exited`...
    pub state: String,
    pub idle_seconds: Option<u64>,
    pub limits: Option<SandboxLimits>,
}

/// Counters of a backend since the gateway started (for `/metrics` and the admin page).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SandboxStats {
    /// Sandboxes started: Docker containers created, bubblewrap sandboxes spawned.
    pub started: u64,
    /// Sandboxes (or scratch directories) removed by `prune`.
    pub pruned: u64,
}

/// The counters behind [`SandboxStats`], for backends to embed.
#[derive(Debug, Default)]
pub struct SandboxCounters {
    started: std::sync::atomic::AtomicU64,
    pruned: std::sync::atomic::AtomicU64,
}

impl SandboxCounters {
    pub fn count_started(&self) {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn count_pruned(&self, how_many: usize) {
        self.pruned
            .fetch_add(how_many as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> SandboxStats {
        SandboxStats {
            started: self.started.load(std::sync::atomic::Ordering::Relaxed),
            pruned: self.pruned.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// All sandboxes of a gateway together (`sandbox.total`, `sandbox.maxActive`), for `/metrics`
/// and the admin page. Usage figures are read from the parent cgroup every sandbox lives
/// under; `None` where the host gives no parent cgroup (a gateway that is not root).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SandboxAggregate {
    /// Sandboxes alive now: running commands (bubblewrap), running containers (Docker,
    /// prewarmed ones included).
    pub alive: u64,
    /// `sandbox.maxActive`.
    pub max_active: u64,
    /// Commands waiting for a sandbox slot.
    pub queued: u64,
    /// Idle sandboxes stopped to make room, since start.
    pub evicted: u64,
    /// Commands that waited past the deadline and did not run, since start.
    pub queue_timeouts: u64,
    pub memory_limit_bytes: u64,
    pub memory_used_bytes: Option<u64>,
    /// Highest memory use the kernel recorded for the parent cgroup (since it was made).
    pub memory_peak_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU.
    pub cpu_limit_millis: u64,
    /// CPU time used by all sandboxes, in microseconds, since the parent cgroup was made.
    pub cpu_used_micros: Option<u64>,
    /// CPU in use lately (thousandths of a CPU), between the last two reads.
    pub cpu_recent_millis: Option<u64>,
    pub pids_limit: u64,
    pub pids_used: Option<u64>,
    /// Where the parent cgroup is (`/moltmate`, `moltmate.slice`), if there is one.
    pub cgroup: Option<String>,
    /// Why there is no parent cgroup (then the totals are not enforced, only `maxActive`).
    pub cgroup_problem: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No backend can run commands here. The message says what to install.
    #[error("no sandbox is available: {0}")]
    Unavailable(String),
    /// The backend failed (daemon error, spawn failure). Not the command's fault.
    #[error("sandbox backend {backend} failed: {detail}")]
    Backend {
        backend: &'static str,
        detail: String,
    },
    /// The command started but its sandbox went away under it (removed, stopped): it may have
    /// had effects, so it must not be presented as safe to run again.
    #[error("sandbox backend {backend}: {detail}")]
    Interrupted {
        backend: &'static str,
        detail: String,
    },
    /// Every sandbox slot (`sandbox.maxActive`) stayed taken by other commands until the
    /// deadline: the command did not start. The message says so in words for the model.
    #[error("{0}")]
    Busy(String),
}

impl SandboxError {
    /// Whether running the same command again is safe: true only when it cannot have started.
    pub fn is_retryable(&self) -> bool {
        match self {
            SandboxError::Unavailable(_) | SandboxError::Interrupted { .. } => false,
            SandboxError::Backend { .. } | SandboxError::Busy(_) => true,
        }
    }
}

/// A sandbox backend (Docker, bubblewrap; later Kubernetes or remote Docker).
#[async_trait]
pub trait Sandbox: Send + Sync {
    fn backend(&self) -> &'static str;
    async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, SandboxError>;
    /// Sandboxes this backend holds (for the CLI and the admin page).
    async fn list(&self) -> Result<Vec<SandboxInfo>, SandboxError>;
    /// Remove sandboxes idle for longer than `idle`; returns the names removed.
    async fn prune(&self, idle: Duration) -> Result<Vec<String>, SandboxError>;
    /// The session ended (`/reset`): drop sandboxes scoped to it.
    async fn end_session(&self, user: &UserId, session_id: &str) -> Result<(), SandboxError>;
    /// The user was removed or reset: end everything this backend runs or keeps for them —
    /// running commands are killed, containers removed — so nothing of theirs outlives them
    /// and a new user of the same id starts from nothing. Idempotent; a user with nothing
    /// running is a no-op.
    async fn end_user(&self, user: &UserId) -> Result<(), SandboxError>;
    /// Counters since start; backends that keep none report zeros.
    fn stats(&self) -> SandboxStats {
        SandboxStats::default()
    }
    /// Gets the sandbox `request` would run in ready (created, started) without running its
    /// command, so that a later `exec` of the same request is warm. Backends with nothing to
    /// start ahead (bubblewrap makes a namespace per command) do nothing.
    async fn prewarm(&self, request: &ExecRequest) -> Result<(), SandboxError> {
        let _ = request;
        Ok(())
    }
    /// All sandboxes together: alive, queued, and memory/CPU/pids in use against the total
    /// limits. `None`: this backend keeps no aggregate bound.
    async fn aggregate(&self) -> Option<SandboxAggregate> {
        None
    }
}

/// Which of a user's writable directories [`DiskCaps::ensure_capped`] is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CappedDir {
    /// The user's home (`workspaceAccess` `rw` or `ro`).
    Home,
    /// The user's scratch directory (`workspaceAccess: none` with `sandbox.mode: all`).
    Scratch,
}

/// Puts a user's writable directory on its disk-capped volume before the gateway writes there,
/// so the cap holds from the user's first write, not from their first `exec`. Implemented by the
/// sandbox layer (loop-mounted ext4 images; root only) and wired in by the binary, so the store
/// and the gateway need not know how. Blocking: call it off the async runtime.
pub trait DiskCaps: Send + Sync {
    /// Makes sure `dir` is on its capped volume of at least `cap_bytes`, its root owned by
    /// `ids`. The first call for a directory may move its existing files onto the volume (copy,
    /// then delete underneath), so it must only run where nothing else writes to `dir`: the
    /// user's own ordered worker, before a turn. Returns whether the cap is enforced.
    fn ensure_capped(
        &self,
        user: &UserId,
        dir: &std::path::Path,
        kind: CappedDir,
        ids: SandboxIds,
        cap_bytes: u64,
    ) -> Result<bool, SandboxError>;
}
