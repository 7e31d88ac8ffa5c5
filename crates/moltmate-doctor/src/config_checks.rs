//! Checks of the loaded configuration alone: exposure of the gateway, TLS, DM policy, who may
//! run what, sandbox mode and network, tool logging.

use crate::{list_some, ConfigState};
use moltmate_config::{Config, DmPolicy, SandboxMode, ToolName, TrustLevel};
use moltmate_core::doctor::Check;
use moltmate_core::sandbox::{ExecSecurity, SandboxNetwork};

/// Shorter operator tokens are reported (a generated `admin.token` has 256 bits).
pub(crate) const MIN_TOKEN_CHARS: usize = 32;

pub(crate) fn config_load(state: &ConfigState) -> Check {
    const ID: &str = "config.load";
    const TITLE: &str = "moltmate.json loads";
    match state {
        ConfigState::Loaded(_) => Check::pass(ID, TITLE, "valid"),
        ConfigState::Placeholders { unset, .. } => Check::warn(
            ID,
            TITLE,
            format!(
                "valid, but {} not set in this environment, so the checks used placeholders",
                list_some(unset, 6)
            ),
            "run doctor with the service's environment (e.g. `sudo -u moltmate env $(cat /etc/moltmate/moltmate.env) moltmate doctor`), or read the list on /admin",
        ),
        ConfigState::Failed(error) => Check::fail(
            ID,
            TITLE,
            format!("{error}; the checks of its settings were skipped"),
            "fix it (`moltmate config check` names the key)",
        ),
    }
}

pub(crate) fn check(config: &Config) -> Vec<Check> {
    vec![
        bind(config),
        tls(config),
        token(config),
        proxies(config),
        dm_policy(config),
        signal_cli(config),
        exec_security(config),
        sandbox_mode(config),
        sandbox_network(config),
        tool_logging(config),
    ]
}

fn address(config: &Config) -> String {
    std::net::SocketAddr::new(config.gateway.bind, config.gateway.port).to_string()
}

fn bind(config: &Config) -> Check {
    const ID: &str = "gateway.bind";
    const TITLE: &str = "Gateway bound to loopback or protected by a token";
    let at = address(config);
    if config.gateway.bind.is_loopback() {
        Check::pass(ID, TITLE, format!("listens on {at} (this machine only)"))
    } else if config.gateway.auth.token.is_some() {
        Check::pass(
            ID,
            TITLE,
            format!("listens on {at}, reachable from other machines; gateway.auth.token is set"),
        )
    } else {
        Check::fail(
            ID,
            TITLE,
            format!("listens on {at} without gateway.auth.token (serve refuses to start)"),
            "bind 127.0.0.1 behind a reverse proxy, or set gateway.auth.token to \"${MOLTMATE_GATEWAY_TOKEN}\"",
        )
    }
}

fn tls(config: &Config) -> Check {
    const ID: &str = "gateway.tls";
    const TITLE: &str = "TLS when reachable from the network";
    let public = config.gateway.public_origin();
    let https = config.gateway.served_over_https();
    let loopback = config.gateway.bind.is_loopback();
    match (public, https, loopback) {
        (Some(origin), true, _) => Check::pass(
            ID,
            TITLE,
            format!("people open {origin} (HTTPS; cookies are Secure)"),
        ),
        (Some(origin), false, true) => Check::warn(
            ID,
            TITLE,
            format!("gateway.publicUrl is {origin}: sign-in links and cookies cross the network unencrypted"),
            "terminate TLS at the reverse proxy and set gateway.publicUrl to its https:// address",
        ),
        (Some(origin), false, false) => Check::fail(
            ID,
            TITLE,
            format!("listens on {} and people open {origin}: tokens and cookies cross the network unencrypted", address(config)),
            "put a TLS reverse proxy in front (deploy/compose) and set gateway.publicUrl to its https:// address",
        ),
        (None, _, true) => Check::pass(ID, TITLE, "loopback only: nothing crosses the network"),
        (None, _, false) => Check::fail(
            ID,
            TITLE,
            format!("listens on {} over plain HTTP and no https:// gateway.publicUrl is set", address(config)),
            "put a TLS reverse proxy in front (deploy/compose) and set gateway.publicUrl to its https:// address",
        ),
    }
}

fn token(config: &Config) -> Check {
    const ID: &str = "gateway.token";
    const TITLE: &str = "Operator token is strong";
    match &config.gateway.auth.token {
        None => Check::pass(
            ID,
            TITLE,
            "gateway.auth.token is unset: serve generates a 256-bit token into admin.token",
        ),
        Some(token) if token.expose().chars().count() < MIN_TOKEN_CHARS => Check::warn(
            ID,
            TITLE,
            format!(
                "gateway.auth.token has {} characters (fewer than {MIN_TOKEN_CHARS})",
                token.expose().chars().count()
            ),
            "use a random token: `openssl rand -hex 32`",
        ),
        Some(_) => Check::pass(
            ID,
            TITLE,
            format!("gateway.auth.token has at least {MIN_TOKEN_CHARS} characters"),
        ),
    }
}

fn proxies(config: &Config) -> Check {
    const ID: &str = "gateway.proxy";
    const TITLE: &str = "Reverse proxy named for per-IP rate limits";
    if config.gateway.public_url.is_none() {
        return Check::pass(ID, TITLE, "no gateway.publicUrl: no reverse proxy in front");
    }
    if config.gateway.trusted_proxies.is_empty() {
        Check::warn(
            ID,
            TITLE,
            "gateway.publicUrl is set but gateway.trustedProxies is empty: every client behind the proxy shares one per-IP bucket",
            "set gateway.trustedProxies to the proxy's IP address",
        )
    } else {
        Check::pass(
            ID,
            TITLE,
            format!(
                "X-Forwarded-For counts from {}",
                list_some(
                    &config
                        .gateway
                        .trusted_proxies
                        .iter()
                        .map(|ip| ip.to_string())
                        .collect::<Vec<_>>(),
                    4
                )
            ),
        )
    }
}

fn dm_policy(config: &Config) -> Check {
    const ID: &str = "channels.dm_policy";
    const TITLE: &str = "No open DM policy without intent";
    let c = &config.channels;
    let channels = [
        (
            "Telegram",
            c.telegram.is_enabled(),
            c.telegram.dm_policy,
            &c.telegram.allow_from,
        ),
        (
            "Discord",
            c.discord.is_enabled(),
            c.discord.dm_policy,
            &c.discord.allow_from,
        ),
        (
            "Slack",
            c.slack.is_enabled(),
            c.slack.dm_policy,
            &c.slack.allow_from,
        ),
        (
            "Signal",
            c.signal.is_enabled(),
            c.signal.dm_policy,
            &c.signal.allow_from,
        ),
        (
            "WhatsApp",
            c.whatsapp.is_enabled(),
            c.whatsapp.dm_policy,
            &c.whatsapp.allow_from,
        ),
    ];
    let enabled: Vec<_> = channels.iter().filter(|(_, on, _, _)| *on).collect();
    if enabled.is_empty() {
        return Check::pass(ID, TITLE, "Telegram is off");
    }
    let mut details = Vec::new();
    let mut open = Vec::new();
    let mut broken = Vec::new();
    for (name, _, policy, allow_from) in enabled {
        let star = allow_from.iter().any(|e| e == "*");
        details.push(match policy {
            DmPolicy::Pairing => format!("{name}: pairing (unknown senders need the operator's approval)"),
            DmPolicy::Allowlist => format!("{name}: allowlist"),
            DmPolicy::Disabled => format!("{name}: disabled"),
            DmPolicy::Open if star => {
                open.push(*name);
                format!("{name}: open, confirmed with allowFrom [\"*\"]: anyone on {name} reaches your assistant and your model budget")
            }
            DmPolicy::Open => {
                broken.push(*name);
                format!("{name}: open without \"*\" in allowFrom")
            }
        });
    }
    let detail = details.join("; ");
    if !broken.is_empty() {
        Check::fail(
            ID,
            TITLE,
            detail,
            "use dmPolicy \"pairing\" (or confirm with allowFrom: [\"*\"])",
        )
    } else if !open.is_empty() {
        Check::warn(
            ID,
            TITLE,
            detail,
            "use dmPolicy \"pairing\" unless this bot is meant to be public",
        )
    } else {
        Check::pass(ID, TITLE, detail)
    }
}

/// Signal needs signal-cli (and Java for its JVM build) when the gateway supervises it.
fn signal_cli(config: &Config) -> Check {
    const ID: &str = "channels.signal_cli";
    const TITLE: &str = "signal-cli (and Java) installed for the Signal channel";
    let signal = &config.channels.signal;
    if !signal.is_enabled() {
        return Check::pass(ID, TITLE, "Signal is off");
    }
    if let Some(daemon) = &signal.daemon {
        return Check::pass(
            ID,
            TITLE,
            format!("the gateway connects to a running signal-cli daemon at {daemon}"),
        );
    }
    match moltmate_channels::signal::check_signal_cli(&signal.cli_path) {
        Ok(program) => Check::pass(ID, TITLE, format!("{} found", program.display())),
        Err(e) => Check::fail(
            ID,
            TITLE,
            e.to_string(),
            "install signal-cli (and Java 21+ for its JVM build), set channels.signal.cliPath, or set channels.signal.daemon",
        ),
    }
}

fn exec_enabled(config: &Config) -> bool {
    config.tools.is_enabled(ToolName::Exec) && config.sandbox.mode != SandboxMode::None
}

fn exec_security(config: &Config) -> Check {
    const ID: &str = "exec.security";
    const TITLE: &str = "No full exec for anyone but owners";
    if !exec_enabled(config) {
        return Check::pass(ID, TITLE, "exec is off");
    }
    let security = config.tools.exec.security;
    let owner_channels: Vec<String> = [
        ("telegram", config.channels.telegram.default_trust),
        ("signal", config.channels.signal.default_trust),
        ("discord", config.channels.discord.default_trust),
        ("slack", config.channels.slack.default_trust),
        ("web", config.channels.web.default_trust),
    ]
    .into_iter()
    .filter(|(_, trust)| *trust == TrustLevel::Owner)
    .map(|(name, _)| format!("channels.{name}.defaultTrust"))
    .collect();
    let owners: Vec<String> = config
        .users
        .iter()
        .filter(|(_, u)| u.trust == Some(TrustLevel::Owner))
        .map(|(id, _)| id.to_string())
        .collect();
    let owners_text = if owners.is_empty() {
        "the local terminal".to_string()
    } else {
        format!("owners {} and the local terminal", list_some(&owners, 6))
    };
    match (security, owner_channels.is_empty()) {
        (ExecSecurity::Allowlist, true) => Check::pass(
            ID,
            TITLE,
            "tools.exec.security is allowlist for everyone",
        ),
        (ExecSecurity::Allowlist, false) => Check::warn(
            ID,
            TITLE,
            format!(
                "allowlist, but {} is owner: everyone let in on that channel gets owner settings (network, workspace)",
                owner_channels.join(" and ")
            ),
            "set the channel's defaultTrust to friend or lower and raise people one by one with users.<id>.trust",
        ),
        (ExecSecurity::Full | ExecSecurity::Blocklist, true) => Check::pass(
            ID,
            TITLE,
            format!(
                "tools.exec.security is {} for {owners_text}; family and friends get allowlist",
                security_name(security)
            ),
        ),
        (ExecSecurity::Full, false) => Check::fail(
            ID,
            TITLE,
            format!(
                "tools.exec.security is full and {} is owner: everyone let in on that channel runs any command",
                owner_channels.join(" and ")
            ),
            "set the channel's defaultTrust to friend or lower and raise people one by one with users.<id>.trust",
        ),
        (ExecSecurity::Blocklist, false) => Check::warn(
            ID,
            TITLE,
            format!(
                "tools.exec.security is blocklist and {} is owner: everyone let in on that channel gets a shell",
                owner_channels.join(" and ")
            ),
            "set the channel's defaultTrust to friend or lower and raise people one by one with users.<id>.trust",
        ),
    }
}

fn security_name(security: ExecSecurity) -> &'static str {
    match security {
        ExecSecurity::Allowlist => "allowlist",
        ExecSecurity::Blocklist => "blocklist",
        ExecSecurity::Full => "full",
    }
}

fn sandbox_mode(config: &Config) -> Check {
    const ID: &str = "sandbox.mode";
    const TITLE: &str = "Sandbox mode all";
    match config.sandbox.mode {
        SandboxMode::All => Check::pass(ID, TITLE, "sandbox.mode is all"),
        SandboxMode::Tools => Check::warn(
            ID,
            TITLE,
            "sandbox.mode is tools",
            "set sandbox.mode to \"all\"",
        ),
        SandboxMode::None => Check::pass(
            ID,
            TITLE,
            "sandbox.mode is none: exec is disabled (this gateway never runs commands on the host)",
        ),
    }
}

fn sandbox_network(config: &Config) -> Check {
    const ID: &str = "sandbox.network";
    const TITLE: &str = "Sandbox network none or proxy";
    match config.sandbox.network {
        SandboxNetwork::None => Check::pass(ID, TITLE, "none: sandboxes have no network"),
        SandboxNetwork::Proxy => Check::pass(
            ID,
            TITLE,
            format!(
                "proxy: egress only through the gateway's filtering proxy, to {} (ports {})",
                if config.sandbox.allowed_domains.is_empty() {
                    "no domain".to_string()
                } else {
                    list_some(&config.sandbox.allowed_domains, 5)
                },
                list_some(
                    &config
                        .sandbox
                        .allowed_ports
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>(),
                    5
                )
            ),
        ),
    }
}

fn tool_logging(config: &Config) -> Check {
    const ID: &str = "logging.tools";
    const TITLE: &str = "Tool calls are logged";
    if config.logging.tools {
        Check::pass(
            ID,
            TITLE,
            "every tool call is logged (user, tool, outcome, duration; never arguments)",
        )
    } else {
        Check::warn(
            ID,
            TITLE,
            "logging.tools is off: the operator's log does not show what assistants ran",
            "set logging.tools: true",
        )
    }
}
