//! The sandbox backend as the machine has it: reachable, the image present and current, no
//! Docker socket (or other host control) mounted into a sandbox, disk caps in force.

use crate::{list_some, Context, SandboxView};
use moltmate_config::{Config, SandboxMode, ToolName};
use moltmate_core::doctor::{Check, CheckStatus};
use moltmate_sandbox::docker::{self, SandboxMounts};
use moltmate_sandbox::image::{self, ImageBuildOptions, ImageState};
use moltmate_sandbox::{BackendChoice, SandboxSettings};
use std::future::Future;
use std::time::Duration;

/// Containers looked at for mounts.
const MAX_CONTAINERS: usize = 1000;

/// Host paths that give whoever has them mounted control of the host or of the engine.
const HOST_CONTROL_PATHS: &[&str] = &[
    "/",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/root",
];

async fn bounded<T>(limit: Duration, work: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, work).await.ok()
}

/// Which backend serves `exec`, and what to say about it.
struct Backend {
    name: &'static str,
    detail: String,
    status: CheckStatus,
}

pub(crate) fn exec_enabled(config: &Config) -> bool {
    config.tools.is_enabled(ToolName::Exec) && config.sandbox.mode != SandboxMode::None
}

async fn probe(ctx: &Context, settings: &SandboxSettings) -> Result<Backend, String> {
    let docker_up = || async {
        bounded(ctx.docker_timeout, docker::docker_available(settings))
            .await
            .unwrap_or(false)
    };
    match settings.backend {
        BackendChoice::Docker => {
            if docker_up().await {
                Ok(Backend {
                    name: "docker",
                    detail: "docker: the Docker daemon answers".to_string(),
                    status: CheckStatus::Pass,
                })
            } else {
                Err("sandbox.backend is docker but the Docker daemon does not answer".to_string())
            }
        }
        BackendChoice::Bwrap => probe_bwrap(settings).await,
        BackendChoice::Auto => {
            if docker_up().await {
                return Ok(Backend {
                    name: "docker",
                    detail: "docker (auto): the Docker daemon answers".to_string(),
                    status: CheckStatus::Pass,
                });
            }
            probe_bwrap(settings)
                .await
                .map_err(|e| format!("the Docker daemon does not answer and {e}"))
        }
    }
}

async fn probe_bwrap(settings: &SandboxSettings) -> Result<Backend, String> {
    // A throwaway state directory: probing must not create anything in the home.
    let scratch = tempfile::tempdir().map_err(|e| format!("no temporary directory: {e}"))?;
    let mut settings = settings.clone();
    settings.state_dir = scratch.path().to_path_buf();
    let sandbox = moltmate_sandbox::bwrap::BwrapSandbox::new(&settings, None)
        .map_err(|e| format!("bubblewrap is unusable: {e}"))?;
    sandbox
        .probe()
        .await
        .map_err(|e| format!("bubblewrap is unusable: {e}"))?;
    let cgroups = sandbox.cgroups();
    if cgroups.limits_memory() && cgroups.limits_pids() {
        Ok(Backend {
            name: "bwrap",
            detail: format!("bwrap: bubblewrap runs; cgroups limit memory and pids ({cgroups:?})"),
            status: CheckStatus::Pass,
        })
    } else {
        Ok(Backend {
            name: "bwrap",
            detail: "bwrap: bubblewrap runs, but no usable cgroups here: memory and processes are limited by rlimits only".to_string(),
            status: CheckStatus::Warn,
        })
    }
}

pub(crate) async fn check(ctx: &Context, config: &Config) -> Vec<Check> {
    const ID: &str = "sandbox.backend";
    const TITLE: &str = "Sandbox backend reachable";
    let mut out = Vec::new();
    if !exec_enabled(config) {
        out.push(Check::pass(ID, TITLE, "exec is off: no sandbox is needed"));
        out.push(disk_caps(ctx, config, None, &[]));
        return out;
    }
    let Some(settings) = &ctx.sandbox_settings else {
        return out;
    };
    let backend = match &ctx.sandbox {
        SandboxView::Running(Some(name)) => Ok(Backend {
            name,
            detail: format!("{name}: selected by this gateway at start"),
            status: CheckStatus::Pass,
        }),
        SandboxView::Running(None) => {
            Err("no backend was usable when this gateway started: exec is disabled".to_string())
        }
        SandboxView::Probe => probe(ctx, settings).await,
    };
    let backend = match backend {
        Ok(backend) => backend,
        Err(reason) => {
            out.push(Check::fail(
                ID,
                TITLE,
                reason,
                "install and start Docker (apt-get install docker.io), or install bubblewrap (apt-get install bubblewrap) with unprivileged user namespaces",
            ));
            out.push(disk_caps(ctx, config, None, &[]));
            return out;
        }
    };
    out.push(Check::new(
        ID,
        TITLE,
        backend.status,
        backend.detail.clone(),
        Some("see README \"Sandboxes\": cgroup v2 with the memory and pids controllers, or run the gateway as root for cgroup v1".to_string()),
    ));
    let mut containers = Vec::new();
    if backend.name == "docker" {
        out.push(image_check(ctx, settings).await);
        let (check, found) = socket_check(ctx, settings).await;
        out.push(check);
        containers = found;
    } else {
        out.push(Check::pass(
            "sandbox.image",
            "Sandbox image present and current",
            "bubblewrap uses the host's /usr read-only: no image",
        ));
        out.push(Check::pass(
            "sandbox.docker_socket",
            "Docker socket never mounted into a sandbox",
            "bubblewrap sandboxes bind only the user's home and family folder",
        ));
    }
    out.push(disk_caps(ctx, config, Some(backend.name), &containers));
    out
}

async fn image_check(ctx: &Context, settings: &SandboxSettings) -> Check {
    const ID: &str = "sandbox.image";
    const TITLE: &str = "Sandbox image present and current";
    let build = "run `moltmate sandbox build`";
    let (dockerfile, from_repo) = image::dockerfile_for_build(
        &ctx.repo_dockerfile,
        &ImageBuildOptions::default().base_image,
    );
    let expected = image::dockerfile_digest(&dockerfile);
    let source = if from_repo {
        ctx.repo_dockerfile.display().to_string()
    } else {
        "the Dockerfile embedded in this moltmate".to_string()
    };
    let state = match docker::connect_client(settings) {
        Ok(client) => {
            bounded(
                ctx.docker_timeout,
                image::image_state(&client, &settings.image),
            )
            .await
        }
        Err(e) => Some(Err(e)),
    };
    let short = |digest: &str| digest.chars().take(12).collect::<String>();
    match state {
        None => Check::warn(
            ID,
            TITLE,
            format!(
                "the Docker daemon did not answer within {} s",
                ctx.docker_timeout.as_secs()
            ),
            "check dockerd (`docker info`)",
        ),
        Some(Err(e)) => Check::warn(ID, TITLE, format!("cannot inspect it: {e}"), build),
        Some(Ok(ImageState::Missing)) => Check::fail(
            ID,
            TITLE,
            format!("{} does not exist: every exec fails", settings.image),
            build,
        ),
        Some(Ok(ImageState::Present {
            dockerfile_digest: None,
        })) => Check::warn(
            ID,
            TITLE,
            format!(
                "{} has no {} label (built by hand or by an older moltmate): cannot tell whether it is current",
                settings.image,
                image::DOCKERFILE_LABEL
            ),
            build,
        ),
        Some(Ok(ImageState::Present {
            dockerfile_digest: Some(found),
        })) if found == expected => Check::pass(
            ID,
            TITLE,
            format!(
                "{} was built from {source} (sha256 {})",
                settings.image,
                short(&expected)
            ),
        ),
        Some(Ok(ImageState::Present {
            dockerfile_digest: Some(found),
        })) => Check::warn(
            ID,
            TITLE,
            format!(
                "{} was built from another Dockerfile (sha256 {}) than {source} (sha256 {})",
                settings.image,
                short(&found),
                short(&expected)
            ),
            build,
        ),
    }
}

/// Whether a host path mounted into a sandbox hands it control of the host or the engine.
pub(crate) fn is_host_control(source: &str, docker_host: Option<&str>) -> bool {
    let trimmed = source.trim_end_matches('/');
    let normalized = if trimmed.is_empty() { "/" } else { trimmed };
    let socket_name = [
        "docker.sock",
        "containerd.sock",
        "podman.sock",
        "dockershim.sock",
    ]
    .iter()
    .any(|name| normalized.ends_with(name));
    let configured = docker_host
        .map(|h| h.trim_start_matches("unix://"))
        .is_some_and(|h| !h.is_empty() && h == normalized);
    socket_name || configured || HOST_CONTROL_PATHS.contains(&normalized)
}

async fn socket_check(ctx: &Context, settings: &SandboxSettings) -> (Check, Vec<SandboxMounts>) {
    const ID: &str = "sandbox.docker_socket";
    const TITLE: &str = "Docker socket never mounted into a sandbox";
    let found = match bounded(
        ctx.docker_timeout,
        docker::sandbox_mounts(settings, MAX_CONTAINERS),
    )
    .await
    {
        Some(Ok(found)) => found,
        Some(Err(e)) => {
            return (
                Check::warn(
                    ID,
                    TITLE,
                    format!("cannot list sandboxes: {e}"),
                    "check dockerd (`docker ps`)",
                ),
                Vec::new(),
            )
        }
        None => {
            return (
                Check::warn(
                    ID,
                    TITLE,
                    "the Docker daemon did not answer in time",
                    "check dockerd (`docker ps`)",
                ),
                Vec::new(),
            )
        }
    };
    let docker_host = settings
        .docker_host
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok());
    let mut bad = Vec::new();
    for container in &found {
        for mount in &container.mounts {
            if is_host_control(&mount.source, docker_host.as_deref()) {
                bad.push(format!(
                    "{} mounts {} at {}",
                    container.name, mount.source, mount.destination
                ));
            }
        }
        if container.network_mode.as_deref() == Some("host") {
            bad.push(format!("{} shares the host's network", container.name));
        }
    }
    let check = if bad.is_empty() {
        Check::pass(
            ID,
            TITLE,
            format!(
                "{} sandbox container{} of this installation checked: only homes, family folders and proxy sockets are mounted",
                found.len(),
                if found.len() == 1 { "" } else { "s" }
            ),
        )
    } else {
        Check::fail(
            ID,
            TITLE,
            list_some(&bad, 5),
            "remove these containers now (`docker rm -f NAME`) and find out who created them: moltmate never mounts these",
        )
    };
    (check, found)
}

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

fn disk_caps(
    ctx: &Context,
    config: &Config,
    backend: Option<&str>,
    containers: &[SandboxMounts],
) -> Check {
    const ID: &str = "sandbox.disk_caps";
    const TITLE: &str = "Disk caps active";
    let cap_mb = config.sandbox.limits.disk_mb;
    if backend.is_none() && !exec_enabled(config) {
        return Check::pass(
            ID,
            TITLE,
            "exec is off: nothing writes to homes but the file tools",
        );
    }
    if cap_mb == 0 {
        return Check::warn(
            ID,
            TITLE,
            "sandbox.limits.diskMb is 0: no disk cap",
            "set sandbox.limits.diskMb (default 1024)",
        );
    }
    let facts = &ctx.process;
    if facts.euid != 0 {
        return Check::warn(
            ID,
            TITLE,
            format!(
                "not enforced: the {cap_mb} MiB caps are loop-mounted ext4 images, which need root; one user's commands can fill the disk the home is on"
            ),
            "put the home on its own filesystem (or quota), or run as root (deploy/systemd/moltmate-root.conf; README \"Privilege modes\")",
        );
    }
    let missing: Vec<String> = ["mkfs.ext4", "losetup", "mount"]
        .into_iter()
        .filter(|p| !on_path(p))
        .map(str::to_string)
        .collect();
    if !missing.is_empty() {
        return Check::warn(
            ID,
            TITLE,
            format!("not enforced: {} not found", list_some(&missing, 3)),
            "apt-get install e2fsprogs mount",
        );
    }
    let daemon_sees_our_mounts = facts.docker_daemon_same_mounts.unwrap_or(
        // No pid file to compare with: a daemon outside our container or namespace does not.
        !(facts.own_mount_namespace == Some(true) || facts.in_container),
    );
    if backend == Some("docker") && !daemon_sees_our_mounts {
        return Check::fail(
            ID,
            TITLE,
            "the gateway runs in a mount namespace of its own: the capped volumes it mounts over homes are invisible to the Docker daemon, which binds the uncapped directories underneath",
            "run the Docker mode without mount namespacing (deploy/systemd/moltmate-root-docker.conf), or use sandbox.backend \"bwrap\"",
        );
    }
    let uncapped: Vec<String> = containers
        .iter()
        .filter(|c| c.disk_cap.as_deref() == Some("off"))
        .map(|c| c.name.clone())
        .collect();
    if !uncapped.is_empty() {
        return Check::warn(
            ID,
            TITLE,
            format!(
                "caps are on, but {} sandbox{} were created without one: {}",
                uncapped.len(),
                if uncapped.len() == 1 { "" } else { "es" },
                list_some(&uncapped, 3)
            ),
            "remove them (`docker rm -f NAME`); they are recreated with a cap on next use",
        );
    }
    Check::pass(
        ID,
        TITLE,
        format!("each home and family folder is a loop-mounted ext4 image of {cap_mb} MiB"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_control_paths() {
        for source in [
            "/var/run/docker.sock",
            "/run/docker.sock",
            "/run/containerd/containerd.sock",
            "/",
            "/var/run/",
            "/etc",
            "/srv/custom/engine.sock",
        ] {
            assert!(
                is_host_control(source, Some("unix:///srv/custom/engine.sock")),
                "{source}"
            );
        }
        for source in [
            "/var/lib/moltmate/users/anna",
            "/srv/moltmate/families/x",
            "/var/lib/moltmate/sandboxes/proxy/anna",
        ] {
            assert!(!is_host_control(source, None), "{source}");
        }
    }
}
