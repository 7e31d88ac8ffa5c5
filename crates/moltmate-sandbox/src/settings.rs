//! Settings of the sandbox layer, translated from `moltmate.json` by the gateway.

use std::path::PathBuf;
use std::time::Duration;

/// `sandbox.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Docker when the daemon answers, else bubblewrap when installed, else refuse.
    #[default]
    Auto,
    Docker,
    Bwrap,
}

/// `sandbox.scope`: how long one sandbox lives. Never shared between users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxScope {
    /// One per user session (ends with `/reset`).
    #[default]
    Session,
    /// One long-lived sandbox per user.
    User,
    /// A fresh sandbox per tool call, destroyed after.
    Task,
}

/// Everything the sandbox layer needs from the operator's config.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    pub backend: BackendChoice,
    pub scope: SandboxScope,
    /// Docker image for sandboxes.
    pub image: String,
    /// Docker daemon address; `None` = the local default socket (`DOCKER_HOST` honoured).
    pub docker_host: Option<String>,
    /// Remove sandboxes idle longer than this.
    pub prune_idle: Duration,
    /// `<MOLTMATE_HOME>/sandboxes`: backend state (disk images, scratch dirs). 0700.
    pub state_dir: PathBuf,
    /// Domains reachable through the egress proxy when a profile's network is `proxy`.
    pub allowed_domains: Vec<String>,
    /// A digest of the sandbox-relevant config; containers made under another digest are
    /// recreated.
    pub config_digest: String,
}
