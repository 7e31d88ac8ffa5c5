//! Wiring: config → the parts of every layer → a running gateway. The only place that knows
//! both the config file's shape and every library's constructor.

mod model;
pub mod runtime;
pub mod settings;

pub use runtime::{build, sandbox_backend, spawn_pruner, start_web, Built, Purpose};

use anyhow::Result;
use moltmate_config::{Config, SandboxMode};
use moltmate_sandbox::{BackendChoice, SandboxScope, SandboxSettings};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Loads `<home>/moltmate.json` (all defaults when absent), with `${VAR}` from the environment.
pub fn load_config(home: &Path) -> Result<Config> {
    Config::load(home, &|name| std::env::var(name).ok()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Rules that decide whether the gateway may start at all with this config (on top of the
/// config crate's own validation, which already refused unknown keys and wrong types).
pub fn check_startup_rules(config: &Config) -> Result<()> {
    if config.sandbox.mode == SandboxMode::None {
        // The config crate refuses `none` without the dangerous flag. Even with it, this gateway
        // has no host backend: `exec` stays refused. See ARCHITECTURE.md, "No host exec".
        tracing::warn!("sandbox.mode is \"none\": exec is disabled (this gateway never runs commands on the host)");
    }
    let unpriced = settings::unpriced_models(config);
    if !unpriced.is_empty() {
        tracing::warn!(
            models = %unpriced.join(", "),
            "a spend budget (limits.spendPerMonth) is set but model.prices has no price for these models: their use counts as free for spend budgets (token budgets still apply)"
        );
    }
    if config.sandbox.warm_pool.is_some() {
        tracing::warn!("sandbox.warmPool is deprecated and ignored (a shared pool cannot be given a user's mounts later); sandbox.prewarm starts each user's sandbox ahead of their first command instead");
    }
    // The seed: "Never expose gateway publicly" — not without a token, at least.
    moltmate_web::check_bind(&web_address(config), config.gateway.auth.token.is_some())
        .map_err(|reason| anyhow::anyhow!("gateway.bind: {reason}"))
}

/// Where the web UI and API listen.
pub fn web_address(config: &Config) -> SocketAddr {
    SocketAddr::new(config.gateway.bind, config.gateway.port)
}

/// The base URL people open: `gateway.publicUrl` when set (behind a reverse proxy), else the
/// listening address, with a wildcard bind (`0.0.0.0`, `::`) shown as loopback — a browser
/// cannot open a wildcard address.
pub fn public_base_url(config: &Config) -> String {
    if let Some(origin) = config.gateway.public_origin() {
        return origin;
    }
    let mut address = web_address(config);
    if address.ip().is_unspecified() {
        address.set_ip(match address.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{address}")
}

/// Logging to stderr at `logging.level` (`RUST_LOG` overrides), text or JSON. Log lines never
/// carry message contents, arguments or secrets; see ARCHITECTURE.md.
pub fn init_logging(config: &Config, quiet: bool) {
    let default_level = if quiet {
        "warn"
    } else {
        config.logging.level.as_str()
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.logging.format {
        moltmate_config::LogFormat::Json => builder.json().try_init(),
        moltmate_config::LogFormat::Text => builder.try_init(),
    };
    if result.is_err() {
        // Already initialised (tests start several gateways in one process).
    }
}

/// The aggregate bound over all sandboxes (`sandbox.total`, `maxActive`,
/// `queueTimeoutSeconds`), with what the config leaves out derived from this host.
/// `adopt_found`: the gateway (`serve`) owns the sandboxes it finds alive; a terminal
/// `moltmate chat` does not (see [`moltmate_sandbox::total::TotalSettings::adopt_found`]).
pub fn total_settings(
    config: &Config,
    adopt_found: bool,
) -> moltmate_sandbox::total::TotalSettings {
    use moltmate_sandbox::total::{HostResources, TotalLimits, TotalSettings, DEFAULT_TOTAL_PIDS};
    let s = &config.sandbox;
    let limits = TotalLimits::resolve(
        HostResources::detect(),
        s.total.memory_mb.map(|mb| mb.saturating_mul(1024 * 1024)),
        // Validation keeps cpus in [0.01, 1024].
        s.total.cpus.map(|c| (c * 1000.0).round() as u64),
        Some(
            s.total
                .pids
                .unwrap_or(DEFAULT_TOTAL_PIDS.max(u64::from(s.limits.pids))),
        ),
    );
    TotalSettings {
        limits,
        cgroup_name: s.total.cgroup.clone(),
        max_active: s.max_active as usize,
        queue_timeout: Duration::from_secs(s.queue_timeout_seconds),
        adopt_found,
    }
}

/// The gateway's own OOM score: lower than anything (-500), so under memory pressure the
/// kernel ends sandboxes (`oom_score_adj` 500 to 1000) first. Needs `CAP_SYS_RESOURCE`;
/// without it the score stays (0, still below every sandbox's) and a warning says so. What the gateway starts inherits it, so
/// both backends raise their sandboxes' own score again.
pub fn protect_gateway_from_oom() {
    const GATEWAY_OOM_SCORE_ADJ: &str = "-500";
    let path = "/proc/self/oom_score_adj";
    let current = std::fs::read_to_string(path).unwrap_or_default();
    if current.trim() == GATEWAY_OOM_SCORE_ADJ {
        return;
    }
    if let Err(e) = std::fs::write(path, GATEWAY_OOM_SCORE_ADJ) {
        tracing::warn!(error = %e, "cannot lower the gateway's OOM score (needs CAP_SYS_RESOURCE); it stays below its sandboxes', which the kernel picks first under memory pressure");
    }
}

/// The sandbox layer's settings from the config.
pub fn sandbox_settings(home: &Path, config: &Config) -> SandboxSettings {
    SandboxSettings {
        backend: match config.sandbox.backend {
            moltmate_config::SandboxBackend::Auto => BackendChoice::Auto,
            moltmate_config::SandboxBackend::Docker => BackendChoice::Docker,
            moltmate_config::SandboxBackend::Bwrap => BackendChoice::Bwrap,
        },
        scope: match config.sandbox.scope {
            moltmate_config::SandboxScope::Session => SandboxScope::Session,
            moltmate_config::SandboxScope::User => SandboxScope::User,
            moltmate_config::SandboxScope::Task => SandboxScope::Task,
        },
        image: config.sandbox.image.clone(),
        docker_host: config.sandbox.docker_host.clone(),
        prune_idle: Duration::from_secs(config.sandbox.prune.idle_minutes * 60),
        state_dir: home.join("sandboxes"),
        allowed_domains: config.sandbox.allowed_domains.clone(),
        config_digest: config.digest_of_sandbox_section(),
    }
}
