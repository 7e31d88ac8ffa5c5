//! `moltmate.json` → the settings structs of each layer, and trust levels → what a user may do.

use moltmate_config::{Config, DmPolicy, SandboxMode, TrustLevel};
use moltmate_core::sandbox::{
    ExecSecurity, ExecSettings, SandboxLimits, SandboxNetwork, SandboxProfile, WorkspaceAccess,
};
use moltmate_core::ChannelKind;
use moltmate_gateway::access::ChannelAccess;
use moltmate_gateway::{GatewaySettings, SandboxIdPolicy, UserSettings};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// The sandbox profile and exec settings the config gives the most trusted user.
fn base_user_settings(config: &Config) -> UserSettings {
    let limits = &config.sandbox.limits;
    let denied: Vec<String> = config
        .tools
        .deny
        .iter()
        .map(|t| t.as_str().to_string())
        .collect();
    let mut tools: Vec<String> = config
        .tools
        .allow
        .iter()
        .map(|t| t.as_str().to_string())
        .filter(|t| !denied.contains(t))
        .collect();
    if !config.tools.web.fetch.enabled {
        tools.retain(|t| t != "web_fetch");
    }
    UserSettings {
        tools,
        exec: ExecSettings {
            security: config.tools.exec.security,
            safe_bins: config.tools.exec.safe_bins.clone(),
            blocked_bins: config.tools.exec.blocked_bins.clone(),
            default_timeout: Duration::from_secs(config.tools.exec.timeout_seconds),
            max_timeout: Duration::from_secs(config.tools.exec.max_timeout_seconds),
        },
        sandbox: SandboxProfile {
            workspace_access: config.sandbox.workspace_access,
            network: config.sandbox.network.clone(),
            limits: SandboxLimits {
                memory_bytes: limits.memory_mb * 1024 * 1024,
                cpu_millis: (limits.cpus * 1000.0).round().max(1.0) as u32,
                pids: limits.pids,
                disk_bytes: limits.disk_mb * 1024 * 1024,
                tmp_bytes: limits.tmp_mb * 1024 * 1024,
                output_bytes: limits.output_kb * 1024,
            },
        },
        read_only: config.sandbox.workspace_access == WorkspaceAccess::Ro,
    }
}

fn stricter_security(a: ExecSecurity, b: ExecSecurity) -> ExecSecurity {
    let rank = |s: ExecSecurity| match s {
        ExecSecurity::Allowlist => 0,
        ExecSecurity::Blocklist => 1,
        ExecSecurity::Full => 2,
    };
    if rank(a) <= rank(b) {
        a
    } else {
        b
    }
}

/// What each trust level may do, starting from what the config allows (seed 001, "Comparison:
/// Trust Levels"). A level only ever takes away; it never grants beyond the config.
///
/// | level      | tools                                   | exec       | network | workspace |
/// |------------|-----------------------------------------|------------|---------|-----------|
/// | owner      | as configured                           | configured | config  | config    |
/// | family     | as configured                           | allowlist  | config  | config    |
/// | friend     | as configured                           | allowlist  | none    | config    |
/// | stranger   | read, write, edit, memory_search        | —          | none    | config    |
/// | restricted | read, memory_search                     | —          | none    | read-only |
pub fn settings_for_trust(trust: TrustLevel, config: &Config) -> UserSettings {
    let mut settings = base_user_settings(config);
    let keep = |settings: &mut UserSettings, allowed: &[&str]| {
        settings.tools.retain(|t| allowed.contains(&t.as_str()))
    };
    match trust {
        TrustLevel::Owner => {}
        TrustLevel::Family => {
            settings.exec.security =
                stricter_security(settings.exec.security, ExecSecurity::Allowlist);
        }
        TrustLevel::Friend => {
            settings.exec.security =
                stricter_security(settings.exec.security, ExecSecurity::Allowlist);
            settings.sandbox.network = SandboxNetwork::None;
        }
        TrustLevel::Stranger => {
            keep(&mut settings, &["read", "write", "edit", "memory_search"]);
            settings.exec.security = ExecSecurity::Allowlist;
            settings.sandbox.network = SandboxNetwork::None;
        }
        TrustLevel::Restricted => {
            keep(&mut settings, &["read", "memory_search"]);
            settings.exec.security = ExecSecurity::Allowlist;
            settings.sandbox.network = SandboxNetwork::None;
            settings.sandbox.workspace_access = WorkspaceAccess::Ro;
            settings.read_only = true;
        }
    }
    settings
}

fn channel_access(policy: DmPolicy, allow_from: &[String]) -> ChannelAccess {
    ChannelAccess {
        policy,
        allow_from: allow_from.to_vec(),
    }
}

/// The gateway's settings from the config.
pub fn gateway_settings(config: &Config, home: &Path) -> GatewaySettings {
    let mut settings = GatewaySettings::default();
    settings.access.insert(
        ChannelKind::Telegram,
        channel_access(
            config.channels.telegram.dm_policy,
            &config.channels.telegram.allow_from,
        ),
    );
    settings.max_pending_pairings = config.channels.max_pending_pairings as usize;
    settings.max_pending_pairings_per_channel.insert(
        ChannelKind::Telegram,
        config.channels.telegram.max_pending_pairings as usize,
    );
    settings.max_tool_iterations = config.model.max_tool_iterations.max(1) as usize;
    settings.default_persona = config.onboarding.default_persona.clone();
    settings.default_language = config.onboarding.language.clone();
    settings.onboarding_enabled = config.onboarding.enabled;
    settings.personas_dir = Some(home.join("personas"));
    settings.log_tool_calls = config.logging.tools;
    settings.prewarm_sandboxes = config.sandbox.prewarm;
    settings.sandbox_ids = SandboxIdPolicy::detect(config.sandbox.uid_range.to_core());
    settings.session_idle_reset = config
        .session
        .idle_reset_minutes
        .map(|m| Duration::from_secs(m * 60));
    settings.context_window_tokens = config.model.context_window_tokens as usize;
    settings.compact_at_ratio = config.session.compact_at_ratio;
    if config.sandbox.mode == SandboxMode::All {
        settings.sandbox_scratch_dir = Some(home.join("sandboxes").join("scratch"));
    }
    settings.default_user = settings_for_trust(TrustLevel::Owner, config);
    settings.channel_defaults = HashMap::from([
        (
            ChannelKind::Telegram,
            settings_for_trust(config.channels.telegram.default_trust, config),
        ),
        (
            ChannelKind::Web,
            settings_for_trust(config.channels.web.default_trust, config),
        ),
        (
            ChannelKind::Local,
            settings_for_trust(config.channels.local.default_trust, config),
        ),
    ]);
    for (user, user_config) in &config.users {
        if let Some(trust) = user_config.trust {
            settings
                .users
                .insert(user.clone(), settings_for_trust(trust, config));
        }
        for identity in &user_config.identities {
            settings
                .configured_identities
                .insert(identity.clone(), user.clone());
        }
    }
    for (family, family_config) in &config.families {
        for member in &family_config.members {
            settings.families.insert(member.clone(), family.clone());
        }
    }
    settings
}

/// Whether `exec` may run at all under this config (mode `none` runs nothing on the host here:
/// it is refused at startup unless explicitly allowed, and even then this gateway has no host
/// backend — see ARCHITECTURE.md).
pub fn sandbox_required(config: &Config) -> bool {
    config.sandbox.mode != SandboxMode::None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_levels_only_take_away() {
        let config = Config::default();
        let owner = settings_for_trust(TrustLevel::Owner, &config);
        let stranger = settings_for_trust(TrustLevel::Stranger, &config);
        let restricted = settings_for_trust(TrustLevel::Restricted, &config);
        assert!(owner.tools.contains(&"exec".to_string()));
        assert!(!stranger.tools.contains(&"exec".to_string()));
        assert!(!stranger.tools.contains(&"web_fetch".to_string()));
        assert_eq!(
            restricted.tools,
            vec!["read".to_string(), "memory_search".to_string()]
        );
        assert!(restricted.read_only);
        assert_eq!(restricted.sandbox.workspace_access, WorkspaceAccess::Ro);
    }
}
