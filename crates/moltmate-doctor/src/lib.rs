//! `moltmate doctor`: the security checklist of the design documents, checked against the
//! running configuration, the home's files and the machine. Each check is pass / warn / fail
//! with a one-line fix ([`moltmate_core::doctor::Report`]).
//!
//! Used in two places: the CLI (`moltmate doctor [--json] [--fix]`, [`Context::for_cli`]: it
//! loads the config itself and probes the sandbox backend) and the admin page of a serving
//! gateway ([`Context::for_running`]: the config and the backend `serve` already has, so the
//! report describes the serving process — its privileges and its systemd hardening). The web
//! layer cannot depend on this crate (it knows no config or sandbox crate); the binary hands it
//! a [`moltmate_core::doctor::SecurityChecks`] that calls [`run`].
//!
//! Nothing here changes anything except [`fix`], which only tightens permissions and creates
//! missing directories of the home, and says what it did. Reports name paths and key names,
//! never a secret's value. Every file is looked at without following links where a link would
//! be wrong, without opening anything but regular files (no FIFO can block it), and with
//! bounded reads and listings.

mod backup;
mod config_checks;
mod files;
mod process;
mod sandbox;
mod secrets;

pub use backup::{BackupMarker, BACKUP_MARKER, BACKUP_MAX_AGE_DAYS};
pub use files::fix;
pub use process::{PrivilegeMode, ProcessFacts};

use moltmate_config::Config;
use moltmate_core::doctor::{Check, Report};
use moltmate_sandbox::SandboxSettings;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The version reported (the workspace's version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How the config was loaded for the checks.
#[derive(Debug, Clone)]
pub enum ConfigState {
    /// Loaded with the process environment.
    Loaded(Config),
    /// Loaded only with placeholder values for variables the environment does not have (the
    /// operator's shell lacks the service's `EnvironmentFile`): checks that need values are
    /// still right about which keys are set.
    Placeholders { config: Config, unset: Vec<String> },
    /// Does not load: the error (key path and problem, no values).
    Failed(String),
}

impl ConfigState {
    pub fn config(&self) -> Option<&Config> {
        match self {
            ConfigState::Loaded(config) | ConfigState::Placeholders { config, .. } => Some(config),
            ConfigState::Failed(_) => None,
        }
    }
}

/// Where the sandbox backend comes from.
#[derive(Debug, Clone)]
pub enum SandboxView {
    /// Probe the machine as `serve` would (the CLI).
    Probe,
    /// The backend the serving gateway selected at start (`None`: exec is disabled because
    /// none was usable).
    Running(Option<&'static str>),
}

/// Everything the checks look at.
#[derive(Debug, Clone)]
pub struct Context {
    pub home: PathBuf,
    pub config: ConfigState,
    pub sandbox: SandboxView,
    /// The sandbox layer's settings from the config (the binary's wiring makes them); `None`
    /// when the config does not load.
    pub sandbox_settings: Option<SandboxSettings>,
    /// The `Dockerfile.sandbox` a `moltmate sandbox build` run here would prefer (relative to
    /// the current directory, as that command uses it); the embedded one otherwise.
    pub repo_dockerfile: PathBuf,
    pub process: ProcessFacts,
    pub now: SystemTime,
    /// The Docker daemon is asked at most this long per call.
    pub docker_timeout: Duration,
}

impl Context {
    /// For `moltmate doctor`: loads `<home>/moltmate.json` with `env`; when a referenced
    /// variable is unset, loads again with placeholders so the other checks still run.
    /// `sandbox_settings` turns a config into the sandbox layer's settings (the binary's
    /// wiring, so there is one translation).
    pub fn for_cli(
        home: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        sandbox_settings: &dyn Fn(&Config) -> SandboxSettings,
    ) -> Context {
        let config = match Config::load(home, env) {
            Ok(config) => ConfigState::Loaded(config),
            Err(first) => {
                let unset = secrets::referenced_vars(home)
                    .into_iter()
                    .filter(|name| env(name).is_none())
                    .collect::<Vec<_>>();
                let placeholder = |name: &str| {
                    env(name).or_else(|| Some(format!("doctor-placeholder-{}", name.len())))
                };
                match Config::load(home, &placeholder) {
                    Ok(config) if !unset.is_empty() => ConfigState::Placeholders { config, unset },
                    _ => ConfigState::Failed(first.to_string()),
                }
            }
        };
        Context {
            home: home.to_path_buf(),
            sandbox_settings: config.config().map(sandbox_settings),
            config,
            sandbox: SandboxView::Probe,
            repo_dockerfile: PathBuf::from("Dockerfile.sandbox"),
            process: ProcessFacts::current(home),
            now: SystemTime::now(),
            docker_timeout: Duration::from_secs(5),
        }
    }

    /// For a serving gateway's admin page: its own config, sandbox settings and backend.
    pub fn for_running(
        home: &Path,
        config: Config,
        sandbox_settings: SandboxSettings,
        backend: Option<&'static str>,
    ) -> Context {
        Context {
            home: home.to_path_buf(),
            config: ConfigState::Loaded(config),
            sandbox_settings: Some(sandbox_settings),
            sandbox: SandboxView::Running(backend),
            repo_dockerfile: PathBuf::from("Dockerfile.sandbox"),
            process: ProcessFacts::current(home),
            now: SystemTime::now(),
            docker_timeout: Duration::from_secs(5),
        }
    }
}

/// How long the file checks may take in all (a hung filesystem must not hang the admin page).
const FILE_CHECKS_DEADLINE: Duration = Duration::from_secs(20);

/// Runs every check. Never fails: what cannot be checked is a `warn` or `fail` line saying so.
pub async fn run(ctx: &Context) -> Report {
    let mut checks = vec![Check::pass(
        "version",
        "Version",
        format!("moltmate {VERSION}"),
    )];
    checks.push(config_checks::config_load(&ctx.config));

    let file_checks = {
        let home = ctx.home.clone();
        let config = ctx.config.config().cloned();
        moltmate_core::blocking::run("doctor file checks", FILE_CHECKS_DEADLINE, move || {
            let mut out = files::check(&home, config.as_ref());
            out.push(secrets::check(&home));
            out
        })
        .await
    };
    match file_checks {
        Ok(found) => checks.extend(found),
        Err(e) => checks.push(Check::fail(
            "perm.home",
            "Files of the home",
            format!("the file checks did not finish: {e}"),
            "check the filesystem of the home (a hung mount?)",
        )),
    }

    if let Some(config) = ctx.config.config() {
        checks.extend(config_checks::check(config));
        checks.extend(sandbox::check(ctx, config).await);
    }
    let docker_access = docker_access(ctx).await;
    checks.extend(process::check(ctx, docker_access).await);
    let backup = {
        let home = ctx.home.clone();
        let now = ctx.now;
        moltmate_core::blocking::run("doctor backup check", FILE_CHECKS_DEADLINE, move || {
            backup::check(&home, now)
        })
        .await
    };
    checks.push(backup.unwrap_or_else(|e| {
        Check::warn(
            "backup.age",
            "Last backup",
            format!("could not read the backup marker: {e}"),
            "check the filesystem of the home",
        )
    }));
    Report {
        version: VERSION.to_string(),
        checks,
    }
}

/// Whether the Docker daemon answers this process (whatever the configured backend: access
/// to the socket is what counts for the privilege mode).
async fn docker_access(ctx: &Context) -> bool {
    match &ctx.sandbox_settings {
        Some(settings) => tokio::time::timeout(
            ctx.docker_timeout,
            moltmate_sandbox::docker::docker_available(settings),
        )
        .await
        .unwrap_or(false),
        None => std::os::unix::net::UnixStream::connect("/var/run/docker.sock").is_ok(),
    }
}

/// Joins at most `max` items for a detail line, saying how many more there were.
pub(crate) fn list_some(items: &[String], max: usize) -> String {
    let mut text = items
        .iter()
        .take(max)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > max {
        text.push_str(&format!(" and {} more", items.len() - max));
    }
    text
}
