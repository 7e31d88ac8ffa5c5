//! `sandbox.backend = auto | docker | bwrap`: picks the backend once at start-up.
//!
//! Fails closed: when the chosen backend (or, for `auto`, every backend) cannot run commands,
//! the error says exactly what to install. There is never a fallback to running on the host.

use crate::bwrap::{find_bwrap, BwrapSandbox};
use crate::docker::{docker_available, DockerSandbox};
use crate::proxy::EgressProxy;
use crate::settings::{BackendChoice, SandboxSettings};
use crate::total::{ParentCgroup, ParentStyle, SandboxBounds, TotalSettings};
use moltmate_core::sandbox::{Sandbox, SandboxError};
use std::sync::Arc;

const INSTALL_DOCKER: &str = "install Docker (apt-get install docker.io) and start dockerd";
const INSTALL_BWRAP: &str = "install bubblewrap (apt-get install bubblewrap)";

/// Builds the backend `settings.backend` asks for. `proxy` is attached to it so profiles with
/// `network = proxy` work; without it such profiles are refused at exec time. No aggregate
/// bound: see [`select_backend_bounded`], which the gateway uses.
pub async fn select_backend(
    settings: &SandboxSettings,
    proxy: Option<Arc<EgressProxy>>,
) -> Result<Arc<dyn Sandbox>, SandboxError> {
    select_backend_bounded(settings, proxy, None).await
}

/// [`select_backend`], with every sandbox under the aggregate bound `total` (a parent cgroup
/// with the total limits, made for the chosen backend, and the `maxActive` cap).
pub async fn select_backend_bounded(
    settings: &SandboxSettings,
    proxy: Option<Arc<EgressProxy>>,
    total: Option<TotalSettings>,
) -> Result<Arc<dyn Sandbox>, SandboxError> {
    match settings.backend {
        BackendChoice::Docker => docker(settings, proxy, total).await,
        BackendChoice::Bwrap => bwrap(settings, proxy, total).await,
        BackendChoice::Auto => {
            if docker_available(settings).await {
                return docker(settings, proxy, total).await;
            }
            tracing::info!("Docker daemon not reachable; trying bubblewrap");
            match bwrap(settings, proxy, total).await {
                Ok(b) => Ok(b),
                Err(e) => Err(SandboxError::Unavailable(format!(
                    "the Docker daemon does not answer and bubblewrap is unusable ({}); {INSTALL_DOCKER}, or {INSTALL_BWRAP}",
                    unavailable_detail(&e)
                ))),
            }
        }
    }
}

fn unavailable_detail(e: &SandboxError) -> String {
    match e {
        SandboxError::Unavailable(detail) | SandboxError::Busy(detail) => detail.clone(),
        SandboxError::Backend { detail, .. } | SandboxError::Interrupted { detail, .. } => {
            detail.clone()
        }
    }
}

async fn docker(
    settings: &SandboxSettings,
    proxy: Option<Arc<EgressProxy>>,
    total: Option<TotalSettings>,
) -> Result<Arc<dyn Sandbox>, SandboxError> {
    if !docker_available(settings).await {
        return Err(SandboxError::Unavailable(format!(
            "sandbox.backend is \"docker\" but the Docker daemon does not answer; {INSTALL_DOCKER}"
        )));
    }
    let mut sandbox = DockerSandbox::connect(settings)?;
    if let Some(proxy) = proxy {
        sandbox = sandbox.with_proxy(proxy);
    }
    if let Some(total) = total {
        let parent = match docker_parent_style(settings).await {
            Ok(style) => {
                let (name, limits) = (total.cgroup_name.clone(), total.limits);
                tokio::task::spawn_blocking(move || ParentCgroup::create(&name, style, limits))
                    .await
                    .unwrap_or_else(|e| Err(format!("cgroup set-up task failed: {e}")))
            }
            Err(why) => Err(why),
        };
        sandbox = sandbox.with_bounds(SandboxBounds::with_parent(total, parent));
    }
    tracing::info!(backend = "docker", "sandbox backend selected");
    Ok(Arc::new(sandbox))
}

async fn bwrap(
    settings: &SandboxSettings,
    proxy: Option<Arc<EgressProxy>>,
    total: Option<TotalSettings>,
) -> Result<Arc<dyn Sandbox>, SandboxError> {
    if find_bwrap().is_none() {
        return Err(SandboxError::Unavailable(format!(
            "bubblewrap is not installed; {INSTALL_BWRAP}"
        )));
    }
    let mut sandbox = BwrapSandbox::new(settings, proxy)?;
    sandbox.probe().await?;
    if let Some(total) = total {
        let bounds = tokio::task::spawn_blocking(move || {
            let parent = ParentCgroup::create(&total.cgroup_name, ParentStyle::Path, total.limits);
            SandboxBounds::with_parent(total, parent)
        })
        .await
        .map_err(|e| SandboxError::Backend {
            backend: "bwrap",
            detail: format!("cgroup set-up task failed: {e}"),
        })?;
        sandbox = sandbox.with_bounds(bounds);
    }
    tracing::info!(backend = "bwrap", cgroups = ?sandbox.cgroups(), "sandbox backend selected");
    Ok(Arc::new(sandbox))
}

/// How Docker must be told the parent cgroup: a path (`cgroupfs` driver) or a slice
/// (`systemd`). `Err`: the daemon's cgroups are not this host's to limit (a remote daemon),
/// or it would not say.
async fn docker_parent_style(settings: &SandboxSettings) -> Result<ParentStyle, String> {
    let host = settings
        .docker_host
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_default();
    if !(host.is_empty() || host.starts_with("unix://") || host.starts_with('/')) {
        return Err(format!(
            "the Docker daemon ({host}) may not be on this host, so its cgroups cannot be limited from here"
        ));
    }
    let docker = crate::docker::connect_client(settings).map_err(|e| e.to_string())?;
    let info = tokio::time::timeout(std::time::Duration::from_secs(10), docker.info())
        .await
        .map_err(|_| "the Docker daemon did not answer `info` in 10 s".to_string())?
        .map_err(|e| format!("docker info: {e}"))?;
    use bollard::models::SystemInfoCgroupDriverEnum as Driver;
    match info.cgroup_driver {
        Some(Driver::CGROUPFS) => Ok(ParentStyle::Path),
        Some(Driver::SYSTEMD) => Ok(ParentStyle::SystemdSlice),
        other => Err(format!(
            "the Docker daemon reports cgroup driver {other:?}; only cgroupfs and systemd are supported"
        )),
    }
}
