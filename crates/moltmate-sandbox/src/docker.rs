//! Docker backend: hardened, warm, per-user containers driven through the Engine API (bollard).
//!
//! # Containers and keys
//! A container belongs to exactly one sandbox key: the user (`sandbox.scope = user`), the user
//! and session (`session`), or a single call (`task`, removed right after). It is named
//! `moltmate-sbx-<user>-<hash>`, where the hash covers the scope key, the operator's config
//! digest, the image, the request's [`SandboxProfile`] and the mounted host paths. Any change to
//! those yields another name, so a container is only ever reused under exactly the set-up it was
//! made with; the stale sibling (same user, scope and session labels) is removed when the new one
//! is created. Labels: `moltmate.managed=true`, `moltmate.user`, `moltmate.scope`,
//! `moltmate.session`, `moltmate.config-digest`, plus `moltmate.instance` (digest of the state
//! directory: several installations may share one engine and never touch each other's
//! containers), `moltmate.network`, `moltmate.limits` (JSON, for `list`) and `moltmate.disk-cap`
//! (`on`/`off`).
//!
//! After a gateway restart the first call lists containers by label: running ones made under the
//! current config digest are adopted, everything else (other digest, stopped, leftovers of `task`
//! scope, proxied ones) is removed. Last-use times survive restarts in
//! `state_dir/docker-last-used/<name>` (written after every command), so `prune` stays right.
//!
//! # Hardening (set on create, fixed for the container's life)
//! * The idle entrypoint (`sleep infinity` under Docker's init, which reaps zombies) runs as
//!   `nobody` (65534); commands run as the user's own sandbox uid/gid ([`ExecRequest::ids`],
//!   `--user uid:gid`, plus the family folder's gid as a supplementary group via `GroupAdd`),
//!   through the container's warm runner (itself that uid) or one exec each, with umask 007
//!   (so what a member writes in the setgid `/family` stays usable by the group). The split is
//!   what makes timeouts reliable: on expiry the runner (or, on the per-exec path, a helper
//!   exec running as the same uid) does `kill -9 -1` (every process of that uid in the
//!   container's PID namespace but the caller) until none are left, which cannot touch the
//!   entrypoint or init, so the container survives and no orphan does.
//! * When a command returns, the processes it left behind (background jobs, fork-bomb
//!   remnants) are reaped the same way before the reply: nothing outlives its call.
//!   Because both kills reach every sandbox-user process, commands for one container run one
//!   at a time (calls queue; different users and sessions never wait for each other). The
//!   timeout of a queued call starts when its command starts.
//! * Read-only root filesystem; `/tmp` is a tmpfs of `limits.tmp_bytes` with
//!   `noexec,nosuid,nodev`.
//! * `CapDrop: ALL`, `no-new-privileges`; Docker's default seccomp profile stays on.
//! * `NetworkMode: none` (loopback only), also for [`SandboxNetwork::Proxy`]: then the user's
//!   egress-proxy socket directory ([`crate::proxy::EgressProxy::user_socket`]; it holds only
//!   that user's socket) is bind-mounted at [`PROXY_SOCKET_DIR`] (so the socket is at
//!   [`crate::proxy::PROXY_SOCKET_PATH`]), the forwarder script read-only at
//!   [`FORWARDER_PATH`], the forwarder is started (as `nobody`, so the timeout kill spares it)
//!   and `HTTP(S)_PROXY` point at it.
//!   Without an attached proxy ([`DockerSandbox::with_proxy`]) such requests get
//!   [`SandboxError::Unavailable`]. Mounting the directory (label `moltmate.network=proxy-dir`)
//!   is what lets a proxied container be adopted after a restart: the restarted proxy binds a
//!   new socket in the same directory, which the container sees; every proxied `exec` makes
//!   sure that socket is served. Containers of the older file-bind layout are recreated.
//! * `PidsLimit`, `Memory` = `MemorySwap` (no swap beyond memory), `NanoCpus` from the profile's
//!   [`SandboxLimits`] (the CPU clamped to the total). With the aggregate bound
//!   ([`DockerSandbox::with_bounds`]) `CgroupParent` puts the container under the gateway's
//!   parent cgroup for all sandboxes ([`crate::total`]; label `moltmate.cgroup-parent`), and a
//!   running container holds one of `sandbox.maxActive` slots ([`crate::active`]) from before
//!   its creation until its removal.
//! * Mounts: only the user's home at `/workspace` (read-only for [`WorkspaceAccess::Ro`]; a
//!   per-user scratch directory `state_dir/scratch/<user>` for [`WorkspaceAccess::None`]) and the
//!   family folder at `/family` (read-write with `Rw`, read-only with `Ro`, absent with `None`),
//!   plus a generated `/etc/passwd` and `/etc/group` (read-only; `agent` under the user's own
//!   ids, `family` for the family gid: `state_dir/identity/`).
//!   Never the Docker socket, never anything else of the host.
//! * Environment: exactly `PATH`, `HOME=/workspace`, `LANG` (plus `HOSTNAME=sandbox`, which the
//!   engine always adds, and the `HTTP(S)_PROXY` variables for proxied profiles). Nothing of the
//!   gateway's environment (API keys, tokens) is passed through.
//! * `/dev/shm` no larger than `/tmp` (at most 64 MiB), `OomScoreAdj: 500` so the host kernel
//!   picks sandboxes before the gateway under memory pressure.
//! * The home (or scratch dir) is first put on its capped volume ([`crate::disk`]) when running as
//!   root; otherwise the container is labelled `moltmate.disk-cap=off` and `list` says so.
//!
//! # Hot path
//! Once a container exists for a key, a command is one request line to the container's warm
//! command runner ([`crate::docker_agent`]: `python3` started once per container with
//! `docker exec -i`, as the sandbox user) and one reply line back; no exec is created and the
//! container is never started on the hot path. The runner applies the same rules as the
//! per-exec path: output beyond `limits.output_bytes` is read and dropped (the process never
//! blocks on a full pipe), the timeout counts from the command's start, and when the command
//! returns or times out every other sandbox-user process is killed until none is left. If the
//! runner cannot start (an image without `python3`) the container falls back to one Engine API
//! exec per command (create + attached start + inspect, ~65 ms here); if a command kills its
//! runner, that command's output is lost, the container is reaped from a separate exec and the
//! next command starts a fresh runner. `task` scope always uses one exec (the container lives
//! for one command). A command killed by the memory limit is detected through the container's
//! cgroup OOM-kill counter and reported as `exit_code: None` with a note at the end of
//! `stderr`; commands run with `oom_score_adj` 1000 so the kernel picks them, not the runner.
//!
//! # No shared warm pool; per-user prewarming instead
//! Bind mounts are fixed at creation, so a pre-started container could not be handed a user's
//! home later without mounting homes it should not see (or a shared parent). Instead
//! [`Sandbox::prewarm`] (with `sandbox.prewarm`, when a turn of a user who may use `exec`
//! begins) creates that user's own container and starts its runner in the background, while
//! the model is still thinking, so the first command finds it warm.

mod creations;

use crate::active::Lease;
use crate::disk::{self, DiskCap};
use crate::docker_agent::{AgentError, ExecAgent};
use crate::proxy::{
    forwarder_command, EgressProxy, FORWARDER_PATH, FORWARDER_READY_FILE, FORWARDER_SCRIPT,
    PROXY_SOCKET_DIR, PROXY_URL,
};
use crate::settings::{SandboxScope, SandboxSettings};
use crate::total::{ParentStyle, SandboxBounds};
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker};
use futures::StreamExt;
use moltmate_core::sandbox::{
    ExecCommand, ExecOutput, ExecRequest, Sandbox, SandboxError, SandboxIds, SandboxInfo,
    SandboxLimits, SandboxNetwork, WorkspaceAccess,
};
use moltmate_core::UserId;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Name of this backend in [`SandboxInfo::backend`] and errors.
pub const BACKEND: &str = "docker";
/// Prefix of every container this backend creates.
pub const NAME_PREFIX: &str = "moltmate-sbx-";

pub const LABEL_MANAGED: &str = "moltmate.managed";
pub const LABEL_USER: &str = "moltmate.user";
pub const LABEL_SCOPE: &str = "moltmate.scope";
pub const LABEL_SESSION: &str = "moltmate.session";
pub const LABEL_CONFIG_DIGEST: &str = "moltmate.config-digest";
pub const LABEL_LIMITS: &str = "moltmate.limits";
pub const LABEL_DISK_CAP: &str = "moltmate.disk-cap";
pub const LABEL_NETWORK: &str = "moltmate.network";
/// Which installation (state directory) made the container: gateways sharing one engine never
/// adopt, prune or remove each other's sandboxes.
pub const LABEL_INSTANCE: &str = "moltmate.instance";
/// The parent cgroup the container was created under (`/moltmate`, `moltmate.slice`, or
/// `none`): a container made under another one (or none) is outside today's total and is
/// replaced on recovery.
pub const LABEL_CGROUP_PARENT: &str = "moltmate.cgroup-parent";

/// The user of the idle entrypoint: distinct from every sandbox uid ([`SandboxIds::check`]
/// refuses 65534), so `kill -9 -1` spares it.
const IDLE_USER: &str = "65534:65534";

/// `uid:gid` for Docker's `User` of the request's commands.
fn exec_user(ids: SandboxIds) -> String {
    format!("{}:{}", ids.uid, ids.gid)
}

/// Refuses identities no sandbox may run as (root, nobody), before anything is created.
fn check_ids(request: &ExecRequest) -> Result<(), SandboxError> {
    request.ids.check()?;
    if let Some(gid) = request.family_gid {
        moltmate_core::sandbox::check_id("family gid", gid)?;
    }
    Ok(())
}
/// Engine API version spoken: supported by Docker 20.10 and every later engine.
const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};
/// How long [`DockerSandbox::remove_user`] waits for removals in progress. A busy Docker host
/// (ten memory bombs being OOM-killed next door) took more than 15 s to finish removing a
/// container whose processes were still running, so the bound is 30 s, the same as the CLI's
/// wait for a running turn.
const REMOVAL_WAIT: Duration = Duration::from_secs(30);
/// How often [`DockerSandbox::remove_user`] asks again for containers still there.
const REMOVAL_RETRY: Duration = Duration::from_secs(2);
/// Per-request timeout for control calls (streams are bounded by the exec timeout instead).
const CLIENT_TIMEOUT_SECS: u64 = 60;
const PING_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";
const SANDBOX_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Kills every process of the caller's uid in the container except the running shell, until
/// none is left.
/// Builtins only (dash), except the short sleeps, so a fork bomb cannot outrun it for long;
/// zombies disappear once init reaps them, hence the rounds. Leaves `left=1` if any survived.
const REAP_SNIPPET: &str = r#"r=0; left=1
while [ $r -lt 60 ]; do
  kill -9 -1 2>/dev/null
  left=0
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = "$$" ] && continue
    [ -O "$p" ] && left=1 && break
  done
  [ $left = 0 ] && break
  r=$((r+1))
  sleep 0.05
done"#;

/// Every command runs as `sh -c WRAPPER sh argv...`: the argv is run unchanged (`"$@"`), then
/// whatever it left behind (background jobs, fork-bomb remnants) is reaped in the same exec, at
/// no extra round trip, and the command's own exit status is returned.
fn wrap(argv: Vec<String>) -> Vec<String> {
    let mut cmd = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        format!("umask 007\n\"$@\"\nrc=$?\n{REAP_SNIPPET}\nexit $rc"),
        "sh".to_string(),
    ];
    cmd.extend(argv);
    cmd
}

fn kill_all_script() -> String {
    format!("{REAP_SNIPPET}\nexit $left")
}

/// Reads the container's OOM-kill counter (cgroup v1, else v2).
const OOM_COUNTER_SCRIPT: &str = "cat /sys/fs/cgroup/memory/memory.oom_control 2>/dev/null \
    || cat /sys/fs/cgroup/memory.events 2>/dev/null";

fn backend_err(detail: impl Into<String>) -> SandboxError {
    SandboxError::Backend {
        backend: BACKEND,
        detail: detail.into(),
    }
}

/// The command may have run: not safe to present as retryable.
fn interrupted(detail: impl Into<String>) -> SandboxError {
    SandboxError::Interrupted {
        backend: BACKEND,
        detail: detail.into(),
    }
}

fn docker_err(context: &str, e: BollardError) -> SandboxError {
    backend_err(format!("{context}: {e}"))
}

/// Whether the engine said "no such container" / "container not running".
fn is_gone(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }
    )
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A client for `settings.docker_host`, else `DOCKER_HOST`, else the local socket.
pub fn connect_client(settings: &SandboxSettings) -> Result<Docker, SandboxError> {
    let host = settings
        .docker_host
        .clone()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| DEFAULT_HOST.to_string());
    let connected = if host.starts_with("unix://") || host.starts_with('/') {
        Docker::connect_with_unix(&host, CLIENT_TIMEOUT_SECS, &API_VERSION)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(&host, CLIENT_TIMEOUT_SECS, &API_VERSION)
    } else {
        return Err(SandboxError::Unavailable(format!(
            "unsupported docker_host {host:?} (expected unix://, tcp:// or http://)"
        )));
    };
    connected.map_err(|e| {
        SandboxError::Unavailable(format!(
            "cannot reach the Docker daemon at {host}: {e} (install docker.io and start dockerd)"
        ))
    })
}

/// Cheap check used by backend auto-selection: does the daemon answer a ping within 2 s?
pub async fn docker_available(settings: &SandboxSettings) -> bool {
    let Ok(docker) = connect_client(settings) else {
        return false;
    };
    matches!(
        tokio::time::timeout(PING_TIMEOUT, docker.ping()).await,
        Ok(Ok(_))
    )
}

/// The value of [`LABEL_INSTANCE`] for an installation whose state directory is `state_dir`.
pub fn instance_label(state_dir: &Path) -> String {
    hex::encode(Sha256::digest(state_dir.to_string_lossy().as_bytes()))[..12].to_string()
}

/// One host path mounted into a sandbox container, as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedPath {
    pub source: String,
    pub destination: String,
    pub read_write: bool,
}

/// A sandbox container of this installation and what the engine says is mounted into it
/// (for `moltmate doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxMounts {
    pub name: String,
    pub running: bool,
    pub mounts: Vec<MountedPath>,
    pub network_mode: Option<String>,
    /// The `moltmate.disk-cap` label (`on`/`off`), if any.
    pub disk_cap: Option<String>,
}

/// Containers named `moltmate-sbx-*` of the installation at `settings.state_dir` (at most
/// `max`), with their mounts: one list call, no inspect per container.
pub async fn sandbox_mounts(
    settings: &SandboxSettings,
    max: usize,
) -> Result<Vec<SandboxMounts>, SandboxError> {
    let docker = connect_client(settings)?;
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_INSTANCE}={}", instance_label(&settings.state_dir)),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let found = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| docker_err("listing sandboxes", e))?;
    Ok(found
        .into_iter()
        .filter_map(|c| {
            let name = c
                .names
                .as_ref()?
                .first()?
                .trim_start_matches('/')
                .to_string();
            if !name.starts_with(NAME_PREFIX) {
                return None;
            }
            Some(SandboxMounts {
                name,
                running: c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING),
                mounts: c
                    .mounts
                    .unwrap_or_default()
                    .into_iter()
                    .map(|m| MountedPath {
                        source: m.source.unwrap_or_default(),
                        destination: m.destination.unwrap_or_default(),
                        read_write: m.rw.unwrap_or(true),
                    })
                    .collect(),
                network_mode: c.host_config.and_then(|h| h.network_mode),
                disk_cap: c.labels.and_then(|l| l.get(LABEL_DISK_CAP).cloned()),
            })
        })
        .take(max)
        .collect())
}

/// A container this process knows to be running.
#[derive(Debug, Clone)]
struct Live {
    id: String,
    user: String,
    limits: Option<SandboxLimits>,
    last_used: Instant,
    busy: u32,
    /// The container's OOM-kill counter after the last command; `None` until read for a
    /// container adopted from an earlier run.
    oom_kills: Option<u64>,
}

/// What a creation's own task needs to make a container and, when it must not be handed out,
/// to remove it again (see [`DockerSandbox::create_container`]).
struct Creator {
    docker: Docker,
    bounds: Option<Arc<SandboxBounds>>,
    name: String,
}

impl Creator {
    /// Creates and starts the container; returns its id. Removes it again when starting fails
    /// or an ending of its user (or session) came meanwhile (`ticket` is doomed), and keeps
    /// the ticket until then, so that ending waits for the removal too.
    async fn create_and_start(
        &self,
        body: ContainerCreateBody,
        image: &str,
        mut ticket: creations::Ticket,
    ) -> Result<String, SandboxError> {
        let options = CreateContainerOptionsBuilder::default()
            .name(&self.name)
            .build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| match e {
                BollardError::DockerResponseServerError {
                    status_code: 404, ..
                } => SandboxError::Unavailable(format!(
                    "sandbox image {image} is missing (run `moltmate sandbox build`)"
                )),
                e => docker_err("creating sandbox", e),
            })?;
        // No use starting a container whose user is being removed.
        if ticket.doomed() {
            self.discard().await;
            return Err(ended());
        }
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            self.discard().await;
            return Err(docker_err("starting sandbox", e));
        }
        if !ticket.finish() {
            self.discard().await;
            return Err(ended());
        }
        Ok(created.id)
    }

    /// Removes the container this creation made (it was never handed out: nothing else of it
    /// is registered but its slot).
    async fn discard(&self) {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self
            .docker
            .remove_container(&self.name, Some(options))
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            // Another removal (the ending's own sweep) is under way.
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => {}
            Err(e) => {
                tracing::warn!(container = %self.name, error = %e, "could not remove a sandbox whose creation was cut short");
            }
        }
        if let Some(bounds) = &self.bounds {
            bounds.active.forget(&self.name);
        }
    }
}

/// A creation found its user (or session) ended while it was under way.
fn ended() -> SandboxError {
    backend_err("the sandbox was removed while it was being created (its user or session ended)")
}

/// Why running a command failed.
enum RunError {
    /// The container vanished or stopped under us: recreate and retry once.
    Gone,
    Failed(SandboxError),
}

/// The Docker sandbox backend. Cheap to share behind an `Arc`.
pub struct DockerSandbox {
    docker: Docker,
    settings: SandboxSettings,
    live: Mutex<HashMap<String, Live>>,
    create_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Container creations under way, which ending a user or session waits for
    /// ([`creations`]).
    creations: Arc<creations::Creations>,
    recovered: tokio::sync::OnceCell<()>,
    proxy: Option<Arc<EgressProxy>>,
    /// Digest of `state_dir`: the value of [`LABEL_INSTANCE`].
    instance: String,
    counters: moltmate_core::sandbox::SandboxCounters,
    /// Each warm container's command runner, by container name (see [`crate::docker_agent`]).
    agents: Mutex<HashMap<String, AgentSlot>>,
    /// This instance's busy markers' file name, `<pid>-<random>` ([`Self::busy_dir`]).
    marker_name: String,
    /// All sandboxes together ([`crate::total`]): containers are created under its parent
    /// cgroup, and each running container holds one of `sandbox.maxActive` slots.
    bounds: Option<Arc<SandboxBounds>>,
}

/// The command runner of one container, tied to the container id it was started in (a
/// recreated container under the same name never inherits a stale agent).
#[derive(Debug)]
struct AgentSlot {
    container_id: String,
    /// `None`: the image cannot run the agent; this container uses one exec per command.
    agent: Option<ExecAgent>,
}

/// What a command produced, before the OOM check shared by both ways of running it.
struct RawRun {
    exit_code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    truncated: bool,
    timed_out: bool,
}

impl std::fmt::Debug for DockerSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerSandbox")
            .field("image", &self.settings.image)
            .field("scope", &self.settings.scope)
            .finish_non_exhaustive()
    }
}

impl DockerSandbox {
    /// Connects to the daemon (no request is made; see [`docker_available`] for a ping).
    pub fn connect(settings: &SandboxSettings) -> Result<Self, SandboxError> {
        Ok(DockerSandbox {
            docker: connect_client(settings)?,
            settings: settings.clone(),
            live: Mutex::new(HashMap::new()),
            create_locks: Mutex::new(HashMap::new()),
            creations: Arc::default(),
            recovered: tokio::sync::OnceCell::new(),
            proxy: None,
            instance: instance_label(&settings.state_dir),
            counters: Default::default(),
            agents: Mutex::new(HashMap::new()),
            marker_name: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
            bounds: None,
        })
    }

    /// Creates containers under `bounds`' parent cgroup (when the host gave one) and keeps at
    /// most `sandbox.maxActive` running: a command that needs a new one takes a free slot,
    /// stops the least recently used idle container, or waits in the fair queue
    /// ([`crate::active`]).
    pub fn with_bounds(mut self, bounds: Arc<SandboxBounds>) -> Self {
        self.bounds = Some(bounds);
        self
    }

    /// The value of [`LABEL_CGROUP_PARENT`] for containers made now.
    fn cgroup_parent_label(&self) -> String {
        self.bounds
            .as_ref()
            .and_then(|b| b.parent())
            .map(|p| p.docker_parent())
            .unwrap_or_else(|| "none".to_string())
    }

    /// A slot for a command (or, `ephemeral`, a `task` container) in container `name`; an idle
    /// container chosen to make room is removed first. `None` without bounds.
    async fn admit(
        &self,
        name: &str,
        request: &ExecRequest,
        ephemeral: bool,
    ) -> Result<Option<Lease>, SandboxError> {
        let Some(bounds) = &self.bounds else {
            return Ok(None);
        };
        let mut lease = bounds
            .active
            .acquire(name, request.user.as_str(), ephemeral)
            .await?;
        if let Err(e) = self.carry_out_eviction(&mut lease).await {
            drop(lease);
            self.forget_if_absent(name);
            return Err(e);
        }
        Ok(Some(lease))
    }

    /// Stops the idle container `lease` chose to make room — unless another process of this
    /// installation (a terminal `moltmate chat`) is running a command in it right now: then
    /// nothing is stopped, the container counts as just used, and the command does not start
    /// ([`SandboxError::Busy`]).
    async fn carry_out_eviction(&self, lease: &mut Lease) -> Result<(), SandboxError> {
        if let Some(eviction) = lease.take_eviction() {
            if self.busy_elsewhere(eviction.victim()).await {
                tracing::info!(container = %eviction.victim(), "not stopping a sandbox another process runs a command in");
                if let Some(bounds) = &self.bounds {
                    bounds.active.touch(eviction.victim());
                }
                // Dropped unfinished: the container stays, usable again.
                drop(eviction);
                let max = self.bounds.as_ref().map_or(0, |b| b.active.max());
                return Err(SandboxError::Busy(format!(
                    "all {max} sandboxes of this server are in use (one by a terminal session on the server), so this command did not start"
                )));
            }
            tracing::info!(
                container = %eviction.victim(),
                "stopping the least recently used idle sandbox: sandbox.maxActive are running"
            );
            if let Err(e) = self.remove_container(eviction.victim()).await {
                tracing::warn!(container = %eviction.victim(), error = %e, "could not stop an idle sandbox to make room");
            }
            eviction.done();
        }
        Ok(())
    }

    /// Where a process running a command in container `name` says so: one file per backend
    /// instance, `<pid>-<random>`, holding the command's deadline (seconds since the epoch).
    fn busy_dir(&self, name: &str) -> PathBuf {
        self.settings.state_dir.join("docker-busy").join(name)
    }

    /// Marks `name` busy in this process for another process to see (best effort: without the
    /// marker, only a terminal session's eviction could miss it). Returns the marker's path.
    async fn write_busy_marker(&self, name: &str, timeout: Duration) -> Option<PathBuf> {
        let dir = self.busy_dir(name);
        tokio::fs::create_dir_all(&dir).await.ok()?;
        let path = dir.join(&self.marker_name);
        // The command's own timeout, plus what stopping it may take.
        let deadline = epoch_now()
            .saturating_add(timeout.as_secs())
            .saturating_add(30);
        tokio::fs::write(&path, deadline.to_string()).await.ok()?;
        Some(path)
    }

    /// Whether another process runs a command in `name` now: a marker of a live process whose
    /// deadline has not passed (a crashed process's marker stops counting at its deadline).
    async fn busy_elsewhere(&self, name: &str) -> bool {
        let Ok(mut entries) = tokio::fs::read_dir(self.busy_dir(name)).await else {
            return false;
        };
        // One marker per process: a handful at most.
        for _ in 0..64 {
            let Ok(Some(entry)) = entries.next_entry().await else {
                return false;
            };
            let file = entry.file_name();
            let Some(file) = file.to_str().filter(|f| *f != self.marker_name) else {
                continue;
            };
            let Some(pid) = file
                .split_once('-')
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            let deadline = tokio::fs::read_to_string(entry.path())
                .await
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if epoch_now() < deadline && tokio::fs::metadata(format!("/proc/{pid}")).await.is_ok() {
                return true;
            }
        }
        false
    }

    /// After a failed create: a container that never came to be holds no slot.
    fn forget_if_absent(&self, name: &str) {
        if let Some(bounds) = &self.bounds {
            if !self.lock_live().contains_key(name) {
                bounds.active.forget(name);
            }
        }
    }

    /// Enables [`SandboxNetwork::Proxy`] profiles through `proxy`.
    pub fn with_proxy(mut self, proxy: Arc<EgressProxy>) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// The settings this backend runs with.
    pub fn settings(&self) -> &SandboxSettings {
        &self.settings
    }

    /// Creates (or adopts) the container `request` would run in and starts its command runner,
    /// without running a command. Returns how long that took. For `task` scope there is
    /// nothing to warm.
    pub async fn prewarm(&self, request: &ExecRequest) -> Result<Duration, SandboxError> {
        let started = Instant::now();
        check_ids(request)?;
        self.recover().await?;
        if self.settings.scope != SandboxScope::Task {
            self.check_network(request)?;
            // A directory's first move onto its capped volume copies its files and then deletes
            // them underneath; the gateway's file tools may be writing there during this very
            // turn. That move stays with the first `exec` (tool calls of a turn run one at a
            // time); prewarming starts only once it is done.
            let (dir, family) = self.mounted_dirs(request);
            let cap_bytes = request.profile.limits.disk_bytes;
            let first_setup = tokio::task::spawn_blocking(move || {
                disk::needs_first_setup(&dir, cap_bytes)
                    || family.is_some_and(|f| f.is_dir() && disk::needs_first_setup(&f, cap_bytes))
            })
            .await
            .unwrap_or(true);
            if first_setup {
                return Ok(started.elapsed());
            }
            let name = self.container_name(request, None);
            // A prewarm takes a free slot or replaces an idle container of the same user;
            // it never stops anybody else's and never waits (see `crate::active`).
            let _lease = match &self.bounds {
                Some(bounds) => match bounds.active.try_prewarm(&name, request.user.as_str()) {
                    Some(mut lease) => {
                        if self.carry_out_eviction(&mut lease).await.is_err() {
                            drop(lease);
                            self.forget_if_absent(&name);
                            return Ok(started.elapsed());
                        }
                        Some(lease)
                    }
                    None => return Ok(started.elapsed()),
                },
                None => None,
            };
            let id = match self.ensure_container(request, &name).await {
                Ok(id) => id,
                Err(e) => {
                    self.forget_if_absent(&name);
                    return Err(e);
                }
            };
            // Under the run lock: a second runner's start-up reap would kill a running command.
            let lock = self.create_lock(&name);
            let _running = lock.lock().await;
            let user = exec_user(request.ids);
            if let Ok(Some(agent)) = self.take_runner(&name, &id, &user).await {
                self.put_runner(&name, &id, agent);
            }
        }
        Ok(started.elapsed())
    }

    /// Removes every container of `user` (account deletion, tests), and returns once they are
    /// gone: a removal another caller started (the engine answers 409 "in progress") is waited
    /// for, at most [`REMOVAL_WAIT`]. So is a creation of their container under way in this
    /// backend, which removes what it made ([`Self::settle_creations`]).
    pub async fn remove_user(&self, user: &UserId) -> Result<Vec<String>, SandboxError> {
        self.settle_creations(user, None).await;
        let filters = vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_USER}={}", user.as_str()),
        ];
        let mut removed = Vec::new();
        for (name, _) in self.list_managed(filters.clone()).await? {
            self.remove_container(&name).await?;
            removed.push(name);
        }
        let deadline = Instant::now() + REMOVAL_WAIT;
        let mut next_retry = Instant::now() + REMOVAL_RETRY;
        loop {
            let left = self.list_managed(filters.clone()).await?;
            if left.is_empty() {
                return Ok(removed);
            }
            // A 409 "removal in progress" counted as done, but that other removal may fail
            // (its kill raced an exec being torn down) and leave the container running with
            // nobody removing it: ask again now and then instead of only waiting.
            if Instant::now() >= next_retry {
                next_retry = Instant::now() + REMOVAL_RETRY;
                for (name, _) in &left {
                    let options = RemoveContainerOptionsBuilder::default()
                        .force(true)
                        .v(true)
                        .build();
                    let _ = self.docker.remove_container(name, Some(options)).await;
                }
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = left.into_iter().map(|(name, _)| name).collect();
                return Err(backend_err(format!(
                    "containers of {user} are still there after {} s: {}",
                    REMOVAL_WAIT.as_secs(),
                    names.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Before an ending's sweep: dooms the creations under way of `user` (of session label
    /// `session`, when given) and waits for them, at most [`REMOVAL_WAIT`]. The task of a
    /// creation whose caller was aborted (the turn or prewarm of a user being removed) may
    /// still have its create request at the engine; without this, the sweep could list the
    /// user's containers before the engine made that one, which then stayed behind, `Created`
    /// and unknown to everybody. A creation still under way after the wait removes its
    /// container itself when it completes.
    async fn settle_creations(&self, user: &UserId, session: Option<&str>) {
        if self.creations.doom(user.as_str(), session) == 0 {
            return;
        }
        if !self
            .creations
            .wait(user.as_str(), session, REMOVAL_WAIT)
            .await
        {
            tracing::warn!(user = %user, "a sandbox creation of an ended user is still under way; it removes its container when it completes");
        }
    }

    /// Finds containers of earlier runs: adopts running ones under the current config digest,
    /// removes the rest. Runs once per instance (later calls return at once).
    pub async fn recover(&self) -> Result<(), SandboxError> {
        self.recovered
            .get_or_try_init(|| async {
                let filters = vec![format!("{LABEL_MANAGED}=true")];
                for (name, summary) in self.list_managed(filters).await? {
                    let labels = summary.labels.clone().unwrap_or_default();
                    let digest_ok = labels.get(LABEL_CONFIG_DIGEST).map(String::as_str)
                        == Some(self.settings.config_digest.as_str());
                    let running = summary.state
                        == Some(bollard::models::ContainerSummaryStateEnum::RUNNING);
                    let task = labels.get(LABEL_SCOPE).map(String::as_str) == Some("task");
                    // Proxied containers are adopted when they mount the socket's directory (made
                    // since `proxy-dir`) and a proxy is attached to serve it again.
                    let network_ok = match labels.get(LABEL_NETWORK).map(String::as_str) {
                        Some("proxy-dir") => self.proxy.is_some(),
                        Some("proxy") => false,
                        _ => true,
                    };
                    // Made under another parent cgroup (or none, before there was one): outside
                    // today's total.
                    // (Without bounds — the `sandbox list/prune` commands — any is kept: those
                    // must not remove what a running gateway made.)
                    let parent_ok = self.bounds.is_none()
                        || labels.get(LABEL_CGROUP_PARENT) == Some(&self.cgroup_parent_label());
                    if digest_ok && running && !task && network_ok && parent_ok {
                        let used_at = self
                            .read_last_used(&name)
                            .await
                            .or_else(|| summary.created.and_then(|c| u64::try_from(c).ok()))
                            .unwrap_or_else(epoch_now);
                        let idle = Duration::from_secs(epoch_now().saturating_sub(used_at));
                        let live = Live {
                            id: summary.id.clone().unwrap_or_else(|| name.clone()),
                            user: labels.get(LABEL_USER).cloned().unwrap_or_default(),
                            limits: parse_limits(&labels),
                            last_used: Instant::now().checked_sub(idle).unwrap_or_else(Instant::now),
                            busy: 0,
                            oom_kills: None,
                        };
                        // More than `maxActive` left running (a lowered cap): the rest go.
                        // A process that does not own what it finds (`moltmate chat` beside a
                        // gateway) keeps it without counting it, so never stops it.
                        let admitted = self.bounds.as_ref().is_none_or(|b| {
                            !b.settings.adopt_found
                                || b.active.adopt(&name, &live.user, live.last_used)
                        });
                        if admitted {
                            self.lock_live().entry(name).or_insert(live);
                        } else {
                            tracing::info!(container = %name, "removing a sandbox from an earlier run: sandbox.maxActive are already adopted");
                            self.remove_container(&name).await?;
                        }
                    } else {
                        tracing::info!(container = %name, "removing stale sandbox from an earlier run");
                        self.remove_container(&name).await?;
                    }
                }
                Ok::<(), SandboxError>(())
            })
            .await
            .map(|_| ())
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        // A poisoned map only means a panic elsewhere mid-update; entries stay self-consistent
        // (each is replaced whole), so keep going.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentSlot>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn create_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.create_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    fn scope_label(&self) -> &'static str {
        match self.settings.scope {
            SandboxScope::User => "user",
            SandboxScope::Session => "session",
            SandboxScope::Task => "task",
        }
    }

    fn session_label(&self, request: &ExecRequest) -> String {
        match self.settings.scope {
            SandboxScope::Session => request.session_id.clone(),
            SandboxScope::User | SandboxScope::Task => String::new(),
        }
    }

    /// `moltmate-sbx-<user>-<12 hex>`; `nonce` makes task-scope names unique.
    fn container_name(&self, request: &ExecRequest, nonce: Option<&str>) -> String {
        let mut h = Sha256::new();
        for part in [
            self.instance.as_str(),
            request.user.as_str(),
            self.scope_label(),
            &self.session_label(request),
            nonce.unwrap_or(""),
            &self.settings.config_digest,
            &self.settings.image,
            &request.home.to_string_lossy(),
            &request
                .family
                .as_deref()
                .map(|f| f.to_string_lossy())
                .unwrap_or_default(),
            // Another uid (a new user under a reused name, a changed range) or family group
            // is another container: a container's user and groups are fixed at creation.
            &exec_user(request.ids),
            &request
                .family_gid
                .map(|g| g.to_string())
                .unwrap_or_default(),
        ] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        // Serialising a plain data struct cannot fail; an empty digest part would still differ
        // from any real profile's, so the fallback is harmless.
        h.update(serde_json::to_vec(&request.profile).unwrap_or_default());
        let digest = hex::encode(h.finalize());
        format!("{NAME_PREFIX}{}-{}", request.user.as_str(), &digest[..12])
    }

    async fn list_managed(
        &self,
        filters: Vec<String>,
    ) -> Result<Vec<(String, bollard::models::ContainerSummary)>, SandboxError> {
        let mut filters = filters;
        filters.push(format!("{LABEL_INSTANCE}={}", self.instance));
        let mut map = HashMap::new();
        map.insert("label".to_string(), filters);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&map)
            .build();
        let found = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| docker_err("listing sandboxes", e))?;
        Ok(found
            .into_iter()
            .filter_map(|c| {
                let name = c
                    .names
                    .as_ref()?
                    .first()?
                    .trim_start_matches('/')
                    .to_string();
                name.starts_with(NAME_PREFIX).then_some((name, c))
            })
            .collect())
    }

    async fn remove_container(&self, name: &str) -> Result<(), SandboxError> {
        self.lock_live().remove(name);
        self.lock_agents().remove(name);
        if let Some(bounds) = &self.bounds {
            bounds.active.forget(name);
        }
        let _ = tokio::fs::remove_file(self.last_used_file(name)).await;
        // Empty unless another process runs a command in it (then it stays theirs to remove).
        let _ = tokio::fs::remove_dir(self.busy_dir(name)).await;
        {
            let mut locks = self.create_locks.lock().unwrap_or_else(|p| p.into_inner());
            // Only drop the lock entry when nobody holds or awaits it (map + this = 2 refs
            // would mean someone else has a clone).
            if locks.get(name).is_some_and(|l| Arc::strong_count(l) == 1) {
                locks.remove(name);
            }
        }
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 409 "removal already in progress" is as good as done.
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(docker_err("removing sandbox", e)),
        }
    }

    /// Returns the id of a running container named `name`, creating it if needed.
    async fn ensure_container(
        &self,
        request: &ExecRequest,
        name: &str,
    ) -> Result<String, SandboxError> {
        if let Some(live) = self.lock_live().get(name) {
            return Ok(live.id.clone());
        }
        let lock = self.create_lock(name);
        // Owned: it goes with the creation's own task (see `create_container`).
        let guard = lock.lock_owned().await;
        if let Some(live) = self.lock_live().get(name) {
            return Ok(live.id.clone());
        }
        match self.docker.inspect_container(name, None).await {
            Ok(info) => {
                let running = info.state.as_ref().and_then(|s| s.running).unwrap_or(false);
                if running {
                    let labels = info
                        .config
                        .as_ref()
                        .and_then(|c| c.labels.clone())
                        .unwrap_or_default();
                    let id = info.id.clone().unwrap_or_else(|| name.to_string());
                    self.lock_live().insert(
                        name.to_string(),
                        Live {
                            id: id.clone(),
                            user: request.user.to_string(),
                            limits: parse_limits(&labels),
                            last_used: Instant::now(),
                            busy: 0,
                            oom_kills: None,
                        },
                    );
                    return Ok(id);
                }
                self.remove_container(name).await?;
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(docker_err("inspecting sandbox", e)),
        }
        if self.settings.scope != SandboxScope::Task {
            self.remove_siblings(request, name).await?;
        }
        self.create_container(request, name, guard).await
    }

    /// Removes containers of the same key made under another set-up.
    async fn remove_siblings(&self, request: &ExecRequest, keep: &str) -> Result<(), SandboxError> {
        let filters = vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_USER}={}", request.user.as_str()),
            format!("{LABEL_SCOPE}={}", self.scope_label()),
            format!("{LABEL_SESSION}={}", self.session_label(request)),
        ];
        for (name, _) in self.list_managed(filters).await? {
            if name != keep {
                tracing::info!(container = %name, "replacing sandbox made under another configuration");
                self.remove_container(&name).await?;
            }
        }
        Ok(())
    }

    /// Prepares the host side of `/workspace`: the home or scratch dir, on its capped volume.
    /// The host directories a request's container mounts: the workspace (home, or the
    /// user's scratch dir for `workspaceAccess: none`), and the family folder if mounted.
    fn mounted_dirs(&self, request: &ExecRequest) -> (PathBuf, Option<PathBuf>) {
        match request.profile.workspace_access {
            WorkspaceAccess::Rw | WorkspaceAccess::Ro => {
                (request.home.clone(), request.family.clone())
            }
            WorkspaceAccess::None => (
                self.settings
                    .state_dir
                    .join("scratch")
                    .join(request.user.as_str()),
                None,
            ),
        }
    }

    /// Prepares the host side of `/workspace` (and `/family`): each on its capped volume.
    async fn prepare_workspace(
        &self,
        request: &ExecRequest,
    ) -> Result<(PathBuf, DiskCap), SandboxError> {
        let (dir, family) = self.mounted_dirs(request);
        let scratch = request.profile.workspace_access == WorkspaceAccess::None;
        let user = request.user.clone();
        let state_dir = self.settings.state_dir.clone();
        let cap_bytes = request.profile.limits.disk_bytes;
        let ids = request.ids;
        let family_gid = request.family_gid;
        let target = dir.clone();
        let cap = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&target)
                .map_err(|e| backend_err(format!("cannot create {}: {e}", target.display())))?;
            // The family folder's volume belongs to the family's own id (shared by its group);
            // without one (a gateway that cannot switch uids) the folder is used as it is.
            if let (Some(family), Some(gid)) = (family.filter(|f| f.is_dir()), family_gid) {
                disk::ensure_family_volume(&state_dir, &family, cap_bytes, SandboxIds::same(gid))?;
            }
            let cap = if scratch {
                disk::ensure_scratch_volume(&state_dir, &target, &user, cap_bytes, ids)?
            } else {
                disk::ensure_user_volume(&state_dir, &target, &user, cap_bytes, ids)?
            };
            if !cap.enforced && disk::can_enforce() {
                // Root without a cap (cap 0): still let the sandbox user write its own dir.
                chown_dir(&target, ids)?;
            }
            Ok::<_, SandboxError>(cap)
        })
        .await
        .map_err(|e| backend_err(format!("workspace set-up task failed: {e}")))??;
        Ok((dir, cap))
    }

    /// Creates and starts container `name` for `request`; `guard` is its create lock, held
    /// until the container is ready (or gone).
    async fn create_container(
        &self,
        request: &ExecRequest,
        name: &str,
        guard: tokio::sync::OwnedMutexGuard<()>,
    ) -> Result<String, SandboxError> {
        let started = Instant::now();
        let (workspace, cap) = self.prepare_workspace(request).await?;
        let limits = &request.profile.limits;
        let access = request.profile.workspace_access;

        let mut mounts = vec![bind(
            &workspace,
            "/workspace",
            access == WorkspaceAccess::Ro,
        )];
        if let Some(family) = &request.family {
            match access {
                WorkspaceAccess::Rw => mounts.push(bind(family, "/family", false)),
                WorkspaceAccess::Ro => mounts.push(bind(family, "/family", true)),
                WorkspaceAccess::None => {}
            }
        }

        let mut tmpfs = HashMap::new();
        tmpfs.insert(
            "/tmp".to_string(),
            format!(
                "rw,noexec,nosuid,nodev,mode=1777,size={}",
                limits.tmp_bytes.max(1024 * 1024)
            ),
        );

        let mut labels = HashMap::new();
        labels.insert(LABEL_MANAGED.to_string(), "true".to_string());
        labels.insert(LABEL_INSTANCE.to_string(), self.instance.clone());
        labels.insert(LABEL_USER.to_string(), request.user.to_string());
        labels.insert(LABEL_SCOPE.to_string(), self.scope_label().to_string());
        labels.insert(LABEL_SESSION.to_string(), self.session_label(request));
        labels.insert(
            LABEL_CONFIG_DIGEST.to_string(),
            self.settings.config_digest.clone(),
        );
        labels.insert(
            LABEL_LIMITS.to_string(),
            serde_json::to_string(limits).map_err(|e| backend_err(format!("limits: {e}")))?,
        );
        labels.insert(
            LABEL_DISK_CAP.to_string(),
            if cap.enforced {
                "on".to_string()
            } else {
                "off".to_string()
            },
        );

        let mut env = vec![
            SANDBOX_PATH.to_string(),
            "HOME=/workspace".to_string(),
            "LANG=C.UTF-8".to_string(),
        ];
        // The user database: `agent` under the user's own ids (the image's says 1000).
        let (passwd, group) = self.identity_files(request).await?;
        mounts.push(bind(&passwd, "/etc/passwd", true));
        mounts.push(bind(&group, "/etc/group", true));
        let proxied = self.proxy_setup(request, &mut mounts, &mut env).await?;
        labels.insert(
            LABEL_NETWORK.to_string(),
            if proxied {
                "proxy-dir".to_string()
            } else {
                "none".to_string()
            },
        );

        labels.insert(LABEL_CGROUP_PARENT.to_string(), self.cgroup_parent_label());
        let parent = self.bounds.as_ref().and_then(|b| b.parent());
        let cpu_millis = match &self.bounds {
            Some(bounds) => bounds.clamp_cpu(limits.cpu_millis),
            None => limits.cpu_millis,
        };
        let memory = i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX);
        let host_config = HostConfig {
            // Every container below the one parent whose limits bound them all.
            cgroup_parent: parent.map(|p| p.docker_parent()),
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some(i64::from(cpu_millis) * 1_000_000),
            pids_limit: Some(i64::from(limits.pids.max(1))),
            cap_drop: Some(vec!["ALL".to_string()]),
            security_opt: Some(vec!["no-new-privileges".to_string()]),
            readonly_rootfs: Some(true),
            network_mode: Some("none".to_string()),
            ipc_mode: Some("private".to_string()),
            // /dev/shm is a tmpfs charged to the memory limit; keep it as small as /tmp.
            shm_size: Some(
                i64::try_from(limits.tmp_bytes.clamp(1 << 20, 64 << 20)).unwrap_or(64 << 20),
            ),
            // Under host memory pressure the kernel picks sandboxes before the gateway.
            oom_score_adj: Some(500),
            // The family folder is group-owned (2770): members reach it through this group.
            group_add: request
                .family_gid
                .filter(|_| request.family.is_some() && access != WorkspaceAccess::None)
                .map(|gid| vec![gid.to_string()]),
            init: Some(true),
            tmpfs: Some(tmpfs),
            mounts: Some(mounts),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(self.settings.image.clone()),
            user: Some(IDLE_USER.to_string()),
            hostname: Some("sandbox".to_string()),
            env: Some(env),
            entrypoint: Some(vec!["sleep".to_string(), "infinity".to_string()]),
            cmd: Some(Vec::new()),
            working_dir: Some("/workspace".to_string()),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        // Create and start run in a task of their own that this caller only awaits: dropping
        // the caller (its turn aborted by a removal, a prewarm cancelled) cannot split them and
        // leave a container `Created`, nor leave the engine finishing a create nobody will use.
        // The task holds the create lock, so a later caller of the same name waits for it
        // instead of colliding with the container it is making ([`creations`]).
        let ticket = self
            .creations
            .begin(request.user.as_str(), &self.session_label(request));
        let creator = Creator {
            docker: self.docker.clone(),
            bounds: self.bounds.clone(),
            name: name.to_string(),
        };
        let image = self.settings.image.clone();
        let (id, _guard) = tokio::spawn(async move {
            let id = creator.create_and_start(body, &image, ticket).await?;
            Ok::<_, SandboxError>((id, guard))
        })
        .await
        .map_err(|e| backend_err(format!("sandbox creation task failed: {e}")))??;
        self.counters.count_started();
        if let Some(parent) = parent.filter(|p| p.style() == ParentStyle::SystemdSlice) {
            // systemd may have realised the slice with its own (no) limits just now.
            let parent = parent.clone();
            let applied = tokio::task::spawn_blocking(move || parent.apply_limits()).await;
            if let Ok(Err(e)) = applied {
                tracing::warn!(error = %e, "could not re-apply the sandboxes' total limits to their slice");
            }
        }
        if proxied {
            if let Err(e) = self.start_forwarder(&id, &exec_user(request.ids)).await {
                let _ = self.remove_container(name).await;
                return Err(e);
            }
        }
        tracing::debug!(container = %name, elapsed_ms = started.elapsed().as_millis() as u64, "sandbox created");
        self.lock_live().insert(
            name.to_string(),
            Live {
                id: id.clone(),
                user: request.user.to_string(),
                limits: Some(limits.clone()),
                last_used: Instant::now(),
                busy: 0,
                oom_kills: Some(0),
            },
        );
        Ok(id)
    }

    /// Writes (once per set of ids) the `/etc/passwd` and `/etc/group` a container of
    /// `request` mounts read-only: `state_dir/identity/<uid>-<gid>-<family gid>.{passwd,group}`,
    /// mode 0644, replaced atomically when their content changes.
    async fn identity_files(
        &self,
        request: &ExecRequest,
    ) -> Result<(PathBuf, PathBuf), SandboxError> {
        let dir = self.settings.state_dir.join("identity");
        let family_gid = request.family_gid.filter(|_| {
            request.family.is_some() && request.profile.workspace_access != WorkspaceAccess::None
        });
        let stem = format!(
            "{}-{}-{}",
            request.ids.uid,
            request.ids.gid,
            family_gid.map(|g| g.to_string()).unwrap_or_default()
        );
        let files = [
            (
                dir.join(format!("{stem}.passwd")),
                crate::identity::passwd(request.ids),
            ),
            (
                dir.join(format!("{stem}.group")),
                crate::identity::group(request.ids, family_gid),
            ),
        ];
        let written = files.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            for (path, content) in &written {
                if std::fs::read_to_string(path).ok().as_deref() == Some(content.as_str()) {
                    continue;
                }
                let temp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&temp)?;
                file.write_all(content.as_bytes())?;
                file.sync_all()?;
                std::fs::rename(&temp, path)?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|e| backend_err(format!("identity files task failed: {e}")))?
        .map_err(|e| backend_err(format!("cannot write the sandbox's /etc/passwd: {e}")))?;
        let [(passwd, _), (group, _)] = files;
        Ok((passwd, group))
    }

    fn check_network(&self, request: &ExecRequest) -> Result<(), SandboxError> {
        match (&request.profile.network, &self.proxy) {
            (SandboxNetwork::None, _) | (SandboxNetwork::Proxy, Some(_)) => Ok(()),
            (SandboxNetwork::Proxy, None) => Err(SandboxError::Unavailable(
                "proxy networking not available (no egress proxy attached to the Docker sandbox)"
                    .to_string(),
            )),
        }
    }

    /// Mounts, environment and label for the egress proxy, when the profile asks for it.
    async fn proxy_setup(
        &self,
        request: &ExecRequest,
        mounts: &mut Vec<Mount>,
        env: &mut Vec<String>,
    ) -> Result<bool, SandboxError> {
        if request.profile.network != SandboxNetwork::Proxy {
            return Ok(false);
        }
        let proxy = self.proxy.as_ref().ok_or_else(|| {
            SandboxError::Unavailable("proxy networking not available".to_string())
        })?;
        let socket = proxy
            .user_socket(&request.user)
            .map_err(|e| backend_err(format!("egress proxy socket: {e}")))?;
        let script = self.settings.state_dir.join("proxy-forwarder.py");
        let needs_write =
            tokio::fs::read_to_string(&script).await.ok().as_deref() != Some(FORWARDER_SCRIPT);
        if needs_write {
            let tmp = script.with_extension(format!("py.{:x}", rand::random::<u32>()));
            tokio::fs::create_dir_all(&self.settings.state_dir)
                .await
                .map_err(|e| backend_err(format!("cannot create state dir: {e}")))?;
            tokio::fs::write(&tmp, FORWARDER_SCRIPT)
                .await
                .map_err(|e| backend_err(format!("cannot write the forwarder script: {e}")))?;
            tokio::fs::rename(&tmp, &script)
                .await
                .map_err(|e| backend_err(format!("cannot place the forwarder script: {e}")))?;
        }
        // The socket's directory, not the socket: a restarted gateway binds a new socket there,
        // and an adopted container must see it (a file bind would keep the dead inode).
        let socket_dir = socket
            .parent()
            .ok_or_else(|| backend_err("egress proxy socket has no directory"))?;
        mounts.push(bind(socket_dir, PROXY_SOCKET_DIR, false));
        mounts.push(bind(&script, FORWARDER_PATH, true));
        for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.push(format!("{var}={PROXY_URL}"));
        }
        env.push("NO_PROXY=localhost,127.0.0.1".to_string());
        Ok(true)
    }

    /// Starts the forwarder (as `nobody`, detached) and waits until it listens.
    async fn start_forwarder(&self, id: &str, user: &str) -> Result<(), SandboxError> {
        let options = CreateExecOptions {
            cmd: Some(forwarder_command()),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            user: Some(IDLE_USER.to_string()),
            working_dir: Some("/".to_string()),
            ..Default::default()
        };
        let exec = self
            .docker
            .create_exec(id, options)
            .await
            .map_err(|e| docker_err("starting the proxy forwarder", e))?;
        let detached = bollard::exec::StartExecOptions {
            detach: true,
            ..Default::default()
        };
        self.docker
            .start_exec(&exec.id, Some(detached))
            .await
            .map_err(|e| docker_err("starting the proxy forwarder", e))?;
        let check = format!("test -e {FORWARDER_READY_FILE}");
        for _ in 0..100 {
            if let Ok((Some(0), _)) = self.helper(id, &check, user).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        Err(backend_err("the proxy forwarder did not start"))
    }

    fn mark(&self, name: &str, busy: bool) {
        if let Some(live) = self.lock_live().get_mut(name) {
            if busy {
                live.busy += 1;
            } else {
                live.busy = live.busy.saturating_sub(1);
            }
            live.last_used = Instant::now();
        }
    }

    /// Where the last-use time of `name` survives a gateway restart (for `prune` after it).
    fn last_used_file(&self, name: &str) -> PathBuf {
        self.settings.state_dir.join("docker-last-used").join(name)
    }

    async fn write_last_used(&self, name: &str) {
        let path = self.last_used_file(name);
        if let Some(dir) = path.parent() {
            let _ = tokio::fs::create_dir_all(dir).await;
        }
        // Best effort: losing it only makes a restarted gateway see the container as idle
        // since its creation.
        let _ = tokio::fs::write(&path, epoch_now().to_string()).await;
    }

    async fn read_last_used(&self, name: &str) -> Option<u64> {
        let text = tokio::fs::read_to_string(self.last_used_file(name))
            .await
            .ok()?;
        text.trim().parse().ok()
    }

    /// Runs a helper command as the sandbox user (`uid:gid`) and returns its stdout (small,
    /// bounded).
    async fn helper(
        &self,
        id: &str,
        script: &str,
        user: &str,
    ) -> Result<(Option<i64>, String), RunError> {
        let options = CreateExecOptions {
            cmd: Some(vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                script.to_string(),
            ]),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            user: Some(user.to_string()),
            working_dir: Some("/".to_string()),
            ..Default::default()
        };
        let exec = self
            .docker
            .create_exec(id, options)
            .await
            .map_err(map_run_err)?;
        let mut out = Vec::new();
        if let StartExecResults::Attached { mut output, .. } = self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(map_run_err)?
        {
            let read = async {
                while let Some(Ok(chunk)) = output.next().await {
                    if let LogOutput::StdOut { message } = chunk {
                        if out.len() < 64 * 1024 {
                            out.extend_from_slice(&message);
                        }
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .is_err()
            {
                return Err(RunError::Failed(backend_err("sandbox helper command hung")));
            }
        }
        let inspected = self
            .docker
            .inspect_exec(&exec.id)
            .await
            .map_err(map_run_err)?;
        Ok((
            inspected.exit_code,
            String::from_utf8_lossy(&out).into_owned(),
        ))
    }

    /// Whether the container exists and runs (a failed inspect counts as "no").
    async fn container_running(&self, id: &str) -> bool {
        match self.docker.inspect_container(id, None).await {
            Ok(info) => info.state.and_then(|s| s.running).unwrap_or(false),
            Err(_) => false,
        }
    }

    /// The container's OOM-kill counter, if readable.
    async fn oom_kills(&self, id: &str, user: &str) -> Option<u64> {
        let (_, text) = self.helper(id, OOM_COUNTER_SCRIPT, user).await.ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
    }

    async fn run_in(
        &self,
        name: &str,
        id: &str,
        request: &ExecRequest,
        started: Instant,
    ) -> Result<ExecOutput, RunError> {
        let argv = match &request.command {
            ExecCommand::Argv(argv) => argv.clone(),
            ExecCommand::Shell(script) => {
                vec!["/bin/sh".to_string(), "-c".to_string(), script.clone()]
            }
        };
        if argv.is_empty() || argv[0].is_empty() {
            return Ok(ExecOutput {
                exit_code: Some(127),
                stdout: String::new(),
                stderr: "empty command".to_string(),
                truncated: false,
                timed_out: false,
                duration: started.elapsed(),
            });
        }
        let baseline_unknown = self
            .lock_live()
            .get(name)
            .is_some_and(|l| l.oom_kills.is_none());
        if baseline_unknown {
            let kills = self.oom_kills(id, &exec_user(request.ids)).await;
            if let Some(live) = self.lock_live().get_mut(name) {
                live.oom_kills = Some(kills.unwrap_or(0));
            }
        }

        // `task` containers live for one command: starting a runner there would only add to it.
        let via_agent = if self.settings.scope == SandboxScope::Task {
            None
        } else {
            self.run_with_agent(name, id, &argv, request).await?
        };
        let raw = match via_agent {
            Some(raw) => raw,
            None => self.run_with_exec(name, id, argv, request).await?,
        };

        // A SIGKILL'd command (137) may be the memory limit: compare the OOM counter.
        let RawRun {
            mut exit_code,
            stdout,
            stderr,
            truncated,
            timed_out,
        } = raw;
        let mut stderr = String::from_utf8_lossy(&stderr).into_owned();
        if exit_code == Some(137) || timed_out {
            if !self.container_running(id).await {
                // Removed or stopped under the command (prune, another gateway's recovery):
                // not retried, the command may have had effects already.
                return Err(RunError::Failed(interrupted(
                    "the sandbox was removed while the command ran",
                )));
            }
            if let Some(kills) = self.oom_kills(id, &exec_user(request.ids)).await {
                let before = self
                    .lock_live()
                    .get_mut(name)
                    .and_then(|l| l.oom_kills.replace(kills))
                    .unwrap_or(0);
                if kills > before {
                    exit_code = None;
                    stderr.push_str(&crate::total::oom_note(
                        request.profile.limits.memory_bytes,
                        self.bounds.as_ref().map(|b| b.settings.limits.memory_bytes),
                    ));
                }
            }
        }
        Ok(ExecOutput {
            exit_code,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr,
            truncated,
            timed_out,
            duration: started.elapsed(),
        })
    }

    /// Runs the command through the container's warm runner, starting one if needed. `None`:
    /// this container cannot host a runner; use [`Self::run_with_exec`].
    async fn run_with_agent(
        &self,
        name: &str,
        id: &str,
        argv: &[String],
        request: &ExecRequest,
    ) -> Result<Option<RawRun>, RunError> {
        let user = exec_user(request.ids);
        let Some(mut agent) = self.take_runner(name, id, &user).await? else {
            return Ok(None);
        };
        let cap = request.profile.limits.output_bytes;
        match agent.run(argv, request.timeout, cap).await {
            Ok(out) => {
                if out.clean {
                    self.put_runner(name, id, agent);
                } else {
                    drop(agent);
                    tracing::warn!(container = %name, "processes survived the command; reaping the sandbox");
                    self.reap_all(name, id, &user).await;
                }
                Ok(Some(RawRun {
                    exit_code: out.exit_code,
                    stdout: out.stdout,
                    stderr: out.stderr,
                    truncated: out.truncated,
                    timed_out: out.timed_out,
                }))
            }
            Err(AgentError::ContainerGone) => Err(RunError::Failed(interrupted(
                "the sandbox was removed while the command ran",
            ))),
            Err(
                AgentError::Unsupported(why)
                | AgentError::StartFailed(why)
                | AgentError::Broken(why),
            ) => {
                // Most often the command killed its own runner (`kill -9 -1`). Whatever ran
                // may have had effects, so it is not run again; the next command gets a
                // fresh runner.
                drop(agent);
                if !self.container_running(id).await {
                    return Err(RunError::Failed(interrupted(
                        "the sandbox was removed while the command ran",
                    )));
                }
                tracing::info!(container = %name, reason = %why, "sandbox command runner lost; reaping");
                self.reap_all(name, id, &user).await;
                Ok(Some(RawRun {
                    exit_code: None,
                    stdout: Vec::new(),
                    stderr: b"[moltmate: the command ended the sandbox's command runner; its output is lost]"
                        .to_vec(),
                    truncated: false,
                    timed_out: false,
                }))
            }
        }
    }

    /// Takes the container's live runner out of its slot, or starts one. Must be called under
    /// the container's run lock. `None`: this command runs with its own exec (the image cannot
    /// host a runner, or one did not start this time).
    async fn take_runner(
        &self,
        name: &str,
        id: &str,
        user: &str,
    ) -> Result<Option<ExecAgent>, RunError> {
        let slot = self
            .lock_agents()
            .remove(name)
            .filter(|slot| slot.container_id == id);
        match slot {
            Some(AgentSlot {
                agent: Some(mut agent),
                ..
            }) => {
                if agent.is_alive() {
                    return Ok(Some(agent));
                }
                // It died while idle: replace it before a command is sent to it.
                tracing::info!(container = %name, "sandbox command runner ended while idle; starting a new one");
                drop(agent);
                self.reap_all(name, id, user).await;
            }
            Some(unsupported @ AgentSlot { agent: None, .. }) => {
                self.lock_agents().insert(name.to_string(), unsupported);
                return Ok(None);
            }
            None => {}
        }
        self.start_runner(name, id, user).await
    }

    /// Puts a runner back for the container's next command.
    fn put_runner(&self, name: &str, id: &str, agent: ExecAgent) {
        self.lock_agents().insert(
            name.to_string(),
            AgentSlot {
                container_id: id.to_string(),
                agent: Some(agent),
            },
        );
    }

    /// Starts the container's command runner. Must be called under the container's run lock
    /// (a runner's start-up reap would kill a running command). `None`: run this command with
    /// one exec; when the image cannot run the runner at all, that is remembered for the
    /// container. A failed start is reaped, so no stray runner is left to interfere later.
    async fn start_runner(
        &self,
        name: &str,
        id: &str,
        user: &str,
    ) -> Result<Option<ExecAgent>, RunError> {
        match ExecAgent::start(&self.docker, id, user).await {
            Ok(agent) => Ok(Some(agent)),
            Err(AgentError::ContainerGone) => Err(RunError::Gone),
            Err(AgentError::Unsupported(why)) => {
                tracing::warn!(container = %name, reason = %why, "no warm command runner in this sandbox; using one exec per command");
                self.lock_agents().insert(
                    name.to_string(),
                    AgentSlot {
                        container_id: id.to_string(),
                        agent: None,
                    },
                );
                Ok(None)
            }
            Err(AgentError::StartFailed(why) | AgentError::Broken(why)) => {
                tracing::warn!(container = %name, reason = %why, "the sandbox's command runner did not start; this command uses its own exec");
                self.reap_all(name, id, user).await;
                Ok(None)
            }
        }
    }

    /// Kills every sandbox-user process in the container from a separate exec.
    async fn reap_all(&self, name: &str, id: &str, user: &str) {
        match self.helper(id, &kill_all_script(), user).await {
            Ok((Some(0), _)) => {}
            Ok(_) => {
                tracing::warn!(container = %name, "processes survived the kill")
            }
            Err(_) => {
                tracing::warn!(container = %name, "killing the sandbox's processes failed")
            }
        }
    }

    /// Runs the command as one Engine API exec (create + attached start + inspect).
    async fn run_with_exec(
        &self,
        name: &str,
        id: &str,
        argv: Vec<String>,
        request: &ExecRequest,
    ) -> Result<RawRun, RunError> {
        let options = CreateExecOptions {
            cmd: Some(wrap(argv)),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            user: Some(exec_user(request.ids)),
            working_dir: Some("/workspace".to_string()),
            ..Default::default()
        };
        let exec = match self.docker.create_exec(id, options).await {
            Ok(exec) => exec,
            Err(e) if is_gone(&e) || !self.container_running(id).await => {
                return Err(RunError::Gone)
            }
            Err(e) => return Err(RunError::Failed(docker_err("running command", e))),
        };
        // The timeout covers the command itself, not a cold container creation before it.
        let deadline = tokio::time::Instant::now() + request.timeout;
        let cap = usize::try_from(request.profile.limits.output_bytes).unwrap_or(usize::MAX);
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut truncated = false;
        let mut timed_out = false;

        match self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(map_run_err)?
        {
            StartExecResults::Attached { mut output, .. } => loop {
                match tokio::time::timeout_at(deadline, output.next()).await {
                    Err(_) => {
                        timed_out = true;
                        break;
                    }
                    Ok(None) => break,
                    // The command has started: whatever fails now, it may have had effects.
                    Ok(Some(Err(e))) => {
                        return Err(RunError::Failed(interrupted(format!(
                            "reading command output: {e}"
                        ))))
                    }
                    Ok(Some(Ok(chunk))) => {
                        let room = cap.saturating_sub(stdout.len() + stderr.len());
                        let (buf, message) = match chunk {
                            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                                (&mut stdout, message)
                            }
                            LogOutput::StdErr { message } => (&mut stderr, message),
                            LogOutput::StdIn { .. } => continue,
                        };
                        if message.len() > room {
                            truncated = true;
                        }
                        buf.extend_from_slice(&message[..message.len().min(room)]);
                    }
                }
            },
            StartExecResults::Detached => {
                return Err(RunError::Failed(backend_err("exec started detached")));
            }
        }

        let mut exit_code = None;
        if timed_out {
            self.reap_all(name, id, &exec_user(request.ids)).await;
        } else {
            // The stream ends when the process closes its output; the exit code follows shortly.
            for _ in 0..50 {
                // Never `Gone` here: the command ran, so it must not be run again.
                let inspected = self.docker.inspect_exec(&exec.id).await.map_err(|e| {
                    RunError::Failed(interrupted(format!("reading the exit code: {e}")))
                })?;
                if inspected.running != Some(true) {
                    exit_code = inspected.exit_code.and_then(|c| i32::try_from(c).ok());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(RawRun {
            exit_code,
            stdout,
            stderr,
            truncated,
            timed_out,
        })
    }

    async fn exec_task(&self, request: &ExecRequest) -> Result<ExecOutput, SandboxError> {
        let nonce = format!("{:016x}", rand::random::<u64>());
        let name = self.container_name(request, Some(&nonce));
        // The container lives for this one command: its slot goes with it.
        let _lease = self.admit(&name, request, true).await?;
        let started = Instant::now();
        let result = async {
            let id = self.ensure_container(request, &name).await?;
            match self.run_in(&name, &id, request, started).await {
                Ok(out) => Ok(out),
                Err(RunError::Gone) => Err(backend_err(
                    "the sandbox vanished before the command started",
                )),
                Err(RunError::Failed(e)) => Err(e),
            }
        }
        .await;
        self.remove_container(&name).await?;
        let mut locks = self.create_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.remove(&name);
        result
    }
}

fn epoch_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn map_run_err(e: BollardError) -> RunError {
    if is_gone(&e) {
        RunError::Gone
    } else {
        RunError::Failed(docker_err("running command", e))
    }
}

fn bind(source: &Path, target: &str, read_only: bool) -> Mount {
    Mount {
        target: Some(target.to_string()),
        source: Some(source.to_string_lossy().into_owned()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Default::default()
    }
}

/// Hands a directory without a volume to its user: their ids, mode 0700.
fn chown_dir(dir: &Path, ids: SandboxIds) -> Result<(), SandboxError> {
    let uid = rustix::process::Uid::from_raw(ids.uid);
    let gid = rustix::process::Gid::from_raw(ids.gid);
    rustix::fs::chown(dir, Some(uid), Some(gid))
        .map_err(|e| backend_err(format!("cannot chown {}: {e}", dir.display())))?;
    rustix::fs::chmod(dir, rustix::fs::Mode::from_raw_mode(0o700))
        .map_err(|e| backend_err(format!("cannot chmod {}: {e}", dir.display())))
}

fn parse_limits(labels: &HashMap<String, String>) -> Option<SandboxLimits> {
    labels
        .get(LABEL_LIMITS)
        .and_then(|l| serde_json::from_str(l).ok())
}

#[async_trait::async_trait]
impl Sandbox for DockerSandbox {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, SandboxError> {
        check_ids(&request)?;
        self.check_network(&request)?;
        if request.profile.network == SandboxNetwork::Proxy {
            // An adopted container's socket directory needs this gateway's listener in it.
            if let Some(proxy) = &self.proxy {
                proxy
                    .user_socket(&request.user)
                    .map_err(|e| backend_err(format!("egress proxy socket: {e}")))?;
            }
        }
        self.recover().await?;
        if self.settings.scope == SandboxScope::Task {
            return self.exec_task(&request).await;
        }
        let name = self.container_name(&request, None);
        // A slot among `sandbox.maxActive` (waiting for one if all run commands); the time spent
        // waiting is not the command's, nor the user's exec budget.
        let _lease = self.admit(&name, &request, false).await?;
        let started = Instant::now();
        for attempt in 0..2 {
            let id = match self.ensure_container(&request, &name).await {
                Ok(id) => id,
                Err(e) => {
                    self.forget_if_absent(&name);
                    return Err(e);
                }
            };
            // One command at a time per container: the reaping after a command (and the kill
            // on a timeout) ends every sandbox-user process, so a concurrent command of the
            // same key would be killed with it. Calls for one key queue here instead.
            let lock = self.create_lock(&name);
            let _running = lock.lock().await;
            self.mark(&name, true);
            let marker = self.write_busy_marker(&name, request.timeout).await;
            let result = self.run_in(&name, &id, &request, started).await;
            if let Some(marker) = marker {
                let _ = tokio::fs::remove_file(marker).await;
            }
            self.mark(&name, false);
            self.write_last_used(&name).await;
            match result {
                Ok(out) => return Ok(out),
                Err(RunError::Gone) if attempt == 0 => {
                    tracing::info!(container = %name, "sandbox disappeared; recreating");
                    self.lock_live().remove(&name);
                }
                Err(RunError::Gone) => {
                    return Err(backend_err("sandbox disappeared twice in a row"))
                }
                Err(RunError::Failed(e)) => return Err(e),
            }
        }
        Err(backend_err("sandbox disappeared"))
    }

    async fn list(&self) -> Result<Vec<SandboxInfo>, SandboxError> {
        let filters = vec![format!("{LABEL_MANAGED}=true")];
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let live = self.lock_live().clone();
        let mut out = Vec::new();
        for (name, summary) in self.list_managed(filters).await? {
            let labels = summary.labels.clone().unwrap_or_default();
            let running =
                summary.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING);
            let known = live.get(&name);
            let mut state = match (running, known) {
                (true, Some(l)) if l.busy > 0 => "running".to_string(),
                (true, _) => "idle".to_string(),
                (false, _) => summary.state.map(|s| s.to_string()).unwrap_or_default(),
            };
            if labels.get(LABEL_DISK_CAP).map(String::as_str) == Some("off") {
                state.push_str(" (no disk cap)");
            }
            let idle_seconds = match known {
                Some(l) if l.busy > 0 => Some(0),
                Some(l) => Some(l.last_used.elapsed().as_secs()),
                None => self
                    .read_last_used(&name)
                    .await
                    .or_else(|| summary.created.and_then(|c| u64::try_from(c).ok()))
                    .map(|t| now.saturating_sub(t)),
            };
            out.push(SandboxInfo {
                user: labels
                    .get(LABEL_USER)
                    .cloned()
                    .or_else(|| known.map(|l| l.user.clone()))
                    .unwrap_or_default(),
                limits: known
                    .and_then(|l| l.limits.clone())
                    .or_else(|| parse_limits(&labels)),
                name,
                backend: BACKEND,
                state,
                idle_seconds,
            });
        }
        Ok(out)
    }

    async fn prune(&self, idle: Duration) -> Result<Vec<String>, SandboxError> {
        self.recover().await?;
        // A creation whose caller is gone (a prewarm dropped when its quick turn ended) may
        // still have its create request at the engine. Its container is listed only once made:
        // a prune that does not wait would miss it — at shutdown (tests, `sandbox prune` after
        // a drain) for good, since the creation's task dies with the runtime and leaves it
        // `Created`. Those begun later are not waited for (a busy gateway always has some).
        if !self.creations.wait_for_current(REMOVAL_WAIT).await {
            tracing::warn!("a sandbox creation is still under way; pruning without it");
        }
        let mut removed = Vec::new();
        let infos = self.list().await?;
        let filters = vec![format!("{LABEL_MANAGED}=true")];
        let digests: HashMap<String, Option<String>> = self
            .list_managed(filters)
            .await?
            .into_iter()
            .map(|(n, s)| (n, s.labels.and_then(|mut l| l.remove(LABEL_CONFIG_DIGEST))))
            .collect();
        for info in infos {
            let busy = self.lock_live().get(&info.name).is_some_and(|l| l.busy > 0)
                || self
                    .bounds
                    .as_ref()
                    .is_some_and(|b| b.active.is_busy(&info.name));
            // Nor one another process (a terminal `moltmate chat`) runs a command in.
            if busy || self.busy_elsewhere(&info.name).await {
                continue;
            }
            let stale = digests.get(&info.name).and_then(|d| d.as_deref())
                != Some(self.settings.config_digest.as_str());
            let idle_long = info.idle_seconds.is_none_or(|s| s >= idle.as_secs());
            if stale || idle_long {
                self.remove_container(&info.name).await?;
                removed.push(info.name);
            }
        }
        self.counters.count_pruned(removed.len());
        Ok(removed)
    }

    async fn prewarm(&self, request: &ExecRequest) -> Result<(), SandboxError> {
        // The inherent method (which also reports how long it took).
        DockerSandbox::prewarm(self, request).await.map(|_| ())
    }

    async fn aggregate(&self) -> Option<moltmate_core::sandbox::SandboxAggregate> {
        match &self.bounds {
            Some(bounds) => Some(bounds.aggregate().await),
            None => None,
        }
    }

    fn stats(&self) -> moltmate_core::sandbox::SandboxStats {
        self.counters.snapshot()
    }

    async fn end_session(&self, user: &UserId, session_id: &str) -> Result<(), SandboxError> {
        if self.settings.scope == SandboxScope::Session {
            self.settle_creations(user, Some(session_id)).await;
        }
        let filters = vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_USER}={}", user.as_str()),
            format!("{LABEL_SCOPE}=session"),
            format!("{LABEL_SESSION}={session_id}"),
        ];
        for (name, _) in self.list_managed(filters).await? {
            self.remove_container(&name).await?;
        }
        Ok(())
    }

    /// Removes every container of the user (running or not, any scope or session; the
    /// command runner and the running command go with it).
    async fn end_user(&self, user: &UserId) -> Result<(), SandboxError> {
        let removed = self.remove_user(user).await?;
        if !removed.is_empty() {
            tracing::info!(user = %user, containers = removed.len(), "removed the sandboxes of an ended user");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltmate_core::sandbox::SandboxProfile;

    fn sandbox(scope: SandboxScope, digest: &str) -> DockerSandbox {
        let settings = SandboxSettings {
            backend: crate::BackendChoice::Docker,
            scope,
            image: "img".into(),
            // Never contacted: these tests only use pure helpers.
            docker_host: Some("tcp://127.0.0.1:9".into()),
            prune_idle: Duration::from_secs(60),
            state_dir: PathBuf::from("/nonexistent/state"),
            allowed_domains: Vec::new(),
            config_digest: digest.into(),
        };
        DockerSandbox::connect(&settings).unwrap()
    }

    fn request(user: &str, session: &str) -> ExecRequest {
        ExecRequest {
            user: UserId::new(user).unwrap(),
            home: PathBuf::from(format!("/homes/{user}")),
            family: None,
            ids: SandboxIds::same(2_000_000_000),
            family_gid: None,
            session_id: session.into(),
            command: ExecCommand::Shell("true".into()),
            timeout: Duration::from_secs(1),
            profile: SandboxProfile::default(),
        }
    }

    #[tokio::test]
    async fn names_separate_users_sessions_and_setups() {
        let sb = sandbox(SandboxScope::Session, "d1");
        let a1 = sb.container_name(&request("anna", "s1"), None);
        assert!(a1.starts_with("moltmate-sbx-anna-"));
        assert_eq!(a1.len(), "moltmate-sbx-anna-".len() + 12);
        assert_eq!(a1, sb.container_name(&request("anna", "s1"), None));
        assert_ne!(a1, sb.container_name(&request("anna", "s2"), None));
        assert_ne!(a1, sb.container_name(&request("bob", "s1"), None));
        let mut ro = request("anna", "s1");
        ro.profile.workspace_access = WorkspaceAccess::Ro;
        assert_ne!(a1, sb.container_name(&ro, None));
        // A container's uid and groups are fixed at creation: another id is another container
        // (a new user under a removed user's name never gets the old one's container).
        let mut renumbered = request("anna", "s1");
        renumbered.ids = SandboxIds::same(2_000_000_001);
        assert_ne!(a1, sb.container_name(&renumbered, None));
        let mut family = request("anna", "s1");
        family.family_gid = Some(2_000_000_002);
        assert_ne!(a1, sb.container_name(&family, None));
        let other_digest = sandbox(SandboxScope::Session, "d2");
        assert_ne!(
            a1,
            other_digest.container_name(&request("anna", "s1"), None)
        );
        // User scope ignores the session.
        let user_scope = sandbox(SandboxScope::User, "d1");
        assert_eq!(
            user_scope.container_name(&request("anna", "s1"), None),
            user_scope.container_name(&request("anna", "s2"), None)
        );
        // Task scope names are unique per call.
        let task = sandbox(SandboxScope::Task, "d1");
        assert_ne!(
            task.container_name(&request("anna", "s1"), Some("1")),
            task.container_name(&request("anna", "s1"), Some("2"))
        );
    }

    #[test]
    fn wrapper_passes_argv_unchanged() {
        let argv = vec![
            "printf".to_string(),
            "%s".to_string(),
            "a; rm -rf /".to_string(),
        ];
        let wrapped = wrap(argv.clone());
        assert_eq!(&wrapped[..2], ["/bin/sh", "-c"]);
        assert!(wrapped[2].starts_with("umask 007\n\"$@\"\nrc=$?\n"));
        assert!(wrapped[2].ends_with("exit $rc"));
        assert_eq!(wrapped[3], "sh");
        assert_eq!(&wrapped[4..], &argv[..]);
    }

    #[tokio::test]
    async fn root_and_nobody_are_refused_as_sandbox_ids() {
        for ids in [
            SandboxIds::same(0),
            SandboxIds {
                uid: 2_000_000_000,
                gid: 0,
            },
            SandboxIds::same(65534),
        ] {
            let mut r = request("anna", "s1");
            r.ids = ids;
            assert!(
                matches!(check_ids(&r), Err(SandboxError::Unavailable(_))),
                "{ids:?}"
            );
        }
        let mut r = request("anna", "s1");
        r.family_gid = Some(0);
        assert!(check_ids(&r).is_err());
        assert!(check_ids(&request("anna", "s1")).is_ok());
    }

    #[tokio::test]
    async fn proxy_profiles_need_an_attached_proxy() {
        let sb = sandbox(SandboxScope::User, "d1");
        let mut r = request("anna", "s1");
        r.profile.network = SandboxNetwork::Proxy;
        assert!(matches!(
            sb.check_network(&r),
            Err(SandboxError::Unavailable(_))
        ));
        r.profile.network = SandboxNetwork::None;
        assert!(sb.check_network(&r).is_ok());
    }

    #[test]
    fn unsupported_hosts_are_refused() {
        let mut settings = sandbox(SandboxScope::User, "d").settings().clone();
        settings.docker_host = Some("ssh://somewhere".into());
        assert!(matches!(
            connect_client(&settings),
            Err(SandboxError::Unavailable(_))
        ));
    }
}
