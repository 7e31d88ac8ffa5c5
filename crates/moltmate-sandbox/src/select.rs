//! `sandbox.backend = auto | docker | bwrap`: picks the backend once at start-up.
//!
//! Fails closed: when the chosen backend (or, for `auto`, every backend) cannot run commands,
//! the error says exactly what to install. There is never a fallback to running on the host.

use crate::bwrap::{find_bwrap, BwrapSandbox};
use crate::docker::{docker_available, DockerSandbox};
use crate::proxy::EgressProxy;
use crate::settings::{BackendChoice, SandboxSettings};
use moltmate_core::sandbox::{Sandbox, SandboxError};
use std::sync::Arc;

const INSTALL_DOCKER: &str = "install Docker (apt-get install docker.io) and start dockerd";
const INSTALL_BWRAP: &str = "install bubblewrap (apt-get install bubblewrap)";

/// Builds the backend `settings.backend` asks for. `proxy` is attached to it so profiles with
/// `network = proxy` work; without it such profiles are refused at exec time.
pub async fn select_backend(
    settings: &SandboxSettings,
    proxy: Option<Arc<EgressProxy>>,
) -> Result<Arc<dyn Sandbox>, SandboxError> {
    match settings.backend {
        BackendChoice::Docker => docker(settings, proxy).await,
        BackendChoice::Bwrap => bwrap(settings, proxy).await,
        BackendChoice::Auto => {
            if docker_available(settings).await {
                return docker(settings, proxy).await;
            }
            tracing::info!("Docker daemon not reachable; trying bubblewrap");
            match bwrap(settings, proxy).await {
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
    tracing::info!(backend = "docker", "sandbox backend selected");
    Ok(Arc::new(sandbox))
}

async fn bwrap(
    settings: &SandboxSettings,
    proxy: Option<Arc<EgressProxy>>,
) -> Result<Arc<dyn Sandbox>, SandboxError> {
    if find_bwrap().is_none() {
        return Err(SandboxError::Unavailable(format!(
            "bubblewrap is not installed; {INSTALL_BWRAP}"
        )));
    }
    let sandbox = BwrapSandbox::new(settings, proxy)?;
    sandbox.probe().await?;
    tracing::info!(backend = "bwrap", cgroups = ?sandbox.cgroups(), "sandbox backend selected");
    Ok(Arc::new(sandbox))
}
