//! `moltmate.json` → the settings structs of each layer, and trust levels → what a user may do.

use moltmate_config::{
    Allowance, BudgetConfig, Config, DmPolicy, EffectiveLimits, SandboxMode, TrustLevel,
};
use moltmate_core::sandbox::{
    ExecSecurity, ExecSettings, SandboxLimits, SandboxNetwork, SandboxProfile, WorkspaceAccess,
};
use moltmate_core::ChannelKind;
use moltmate_gateway::access::ChannelAccess;
use moltmate_gateway::budget::{Budget, Price, Prices};
use moltmate_gateway::limits::UserLimits;
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
    if !config.tools.web.search.enabled {
        tools.retain(|t| t != "web_search");
    }
    UserSettings {
        tools,
        exec: ExecSettings {
            security: config.tools.exec.security,
            safe_bins: config.tools.exec.safe_bins.clone(),
            vouched_bins: config.tools.exec.vouched_bins.clone(),
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
        limits: UserLimits::default(),
    }
}

/// Dollars to micro-dollars (validation keeps them at most 10^9 dollars).
fn micros(dollars: Allowance<f64>) -> Option<u64> {
    dollars.limit().map(|d| (d * 1_000_000.0).round() as u64)
}

/// A trust level's resolved `limits` in the gateway's terms.
pub fn user_limits(limits: &EffectiveLimits) -> UserLimits {
    let kib = |kb: u64| usize::try_from(kb.saturating_mul(1024)).unwrap_or(usize::MAX);
    UserLimits {
        tool_calls_per_answer: limits.tool_calls_per_answer as usize,
        tool_output_bytes_per_turn: kib(limits.tool_output_kb_per_turn),
        stored_bytes_per_turn: kib(limits.stored_kb_per_turn),
        transcript_bytes: limits.transcript_mb.saturating_mul(1024 * 1024),
        queued_messages: limits.queued_messages as usize,
        reminders: limits.reminders as usize,
        budget: Budget {
            messages_per_day: limits.messages_per_day.limit(),
            tokens_per_day: limits.tokens_per_day.limit(),
            spend_micros_per_month: micros(limits.spend_per_month),
            exec_seconds_per_day: limits.exec_seconds_per_day.limit(),
        },
    }
}

/// A family's `budget` in the gateway's terms.
pub fn family_budget(budget: &BudgetConfig) -> Budget {
    Budget {
        messages_per_day: budget.messages_per_day.limit(),
        tokens_per_day: budget.tokens_per_day.limit(),
        spend_micros_per_month: micros(budget.spend_per_month),
        exec_seconds_per_day: budget.exec_seconds_per_day.limit(),
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
/// | stranger   | read, write, edit, memory_search, schedule, send_file | — | none | config |
/// | restricted | read, memory_search, send_file          | —          | none    | read-only |
///
/// `web_fetch` and `web_search` reach outside on the gateway's side, so they follow the same
/// rule: owners, family and friends get them when configured; strangers and restricted users
/// never do (the lists above are what they keep).
pub fn settings_for_trust(trust: TrustLevel, config: &Config) -> UserSettings {
    let mut settings = base_user_settings(config);
    settings.limits = user_limits(&config.limits.for_trust(trust));
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
            keep(
                &mut settings,
                &[
                    "read",
                    "write",
                    "edit",
                    "memory_search",
                    "schedule",
                    "send_file",
                ],
            );
            settings.exec.security = ExecSecurity::Allowlist;
            settings.sandbox.network = SandboxNetwork::None;
        }
        TrustLevel::Restricted => {
            keep(&mut settings, &["read", "memory_search", "send_file"]);
            settings.exec.security = ExecSecurity::Allowlist;
            settings.sandbox.network = SandboxNetwork::None;
            settings.sandbox.workspace_access = WorkspaceAccess::Ro;
            settings.read_only = true;
        }
    }
    settings
}

fn channel_access(policy: DmPolicy, allow_from: &[String], groups: bool) -> ChannelAccess {
    ChannelAccess {
        policy,
        allow_from: allow_from.to_vec(),
        groups,
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
            false,
        ),
    );
    settings.access.insert(
        ChannelKind::Signal,
        channel_access(
            config.channels.signal.dm_policy,
            &config.channels.signal.allow_from,
            false,
        ),
    );
    settings.max_pending_pairings_per_channel.insert(
        ChannelKind::Signal,
        config.channels.signal.max_pending_pairings as usize,
    );
    settings.access.insert(
        ChannelKind::Whatsapp,
        channel_access(
            config.channels.whatsapp.dm_policy,
            &config.channels.whatsapp.allow_from,
            false,
        ),
    );
    settings.max_pending_pairings_per_channel.insert(
        ChannelKind::Whatsapp,
        config.channels.whatsapp.max_pending_pairings as usize,
    );
    let discord = &config.channels.discord;
    settings.access.insert(
        ChannelKind::Discord,
        channel_access(
            discord.dm_policy,
            &discord.allow_from,
            discord.groups.enabled,
        ),
    );
    settings
        .max_pending_pairings_per_channel
        .insert(ChannelKind::Discord, discord.max_pending_pairings as usize);
    let slack = &config.channels.slack;
    settings.access.insert(
        ChannelKind::Slack,
        channel_access(slack.dm_policy, &slack.allow_from, slack.groups.enabled),
    );
    settings
        .max_pending_pairings_per_channel
        .insert(ChannelKind::Slack, slack.max_pending_pairings as usize);
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
            ChannelKind::Signal,
            settings_for_trust(config.channels.signal.default_trust, config),
        ),
        (
            ChannelKind::Whatsapp,
            settings_for_trust(config.channels.whatsapp.default_trust, config),
        ),
        (
            ChannelKind::Discord,
            settings_for_trust(discord.default_trust, config),
        ),
        (
            ChannelKind::Slack,
            settings_for_trust(slack.default_trust, config),
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
    // The names behind those settings, for the operator's eyes (admin page, `users show`).
    settings.channel_trust_names = HashMap::from([
        (
            ChannelKind::Telegram,
            config.channels.telegram.default_trust.to_string(),
        ),
        (ChannelKind::Discord, discord.default_trust.to_string()),
        (ChannelKind::Slack, slack.default_trust.to_string()),
        (
            ChannelKind::Signal,
            config.channels.signal.default_trust.to_string(),
        ),
        (
            ChannelKind::Whatsapp,
            config.channels.whatsapp.default_trust.to_string(),
        ),
        (
            ChannelKind::Web,
            config.channels.web.default_trust.to_string(),
        ),
        (
            ChannelKind::Local,
            config.channels.local.default_trust.to_string(),
        ),
    ]);
    for (user, user_config) in &config.users {
        if let Some(trust) = user_config.trust {
            settings
                .users
                .insert(user.clone(), settings_for_trust(trust, config));
            settings.trust_names.insert(user.clone(), trust.to_string());
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
        let budget = family_budget(&family_config.budget);
        if !budget.is_unlimited() {
            settings.family_budgets.insert(family.clone(), budget);
        }
    }
    settings.prices = gateway_prices(config);
    settings.memory_index_dir = Some(home.join("index"));
    settings.server_timezone = server_timezone();
    settings.reminder_min_interval_minutes =
        u32::try_from(config.limits.reminder_min_interval_minutes).unwrap_or(u32::MAX);
    for (user, user_config) in &config.users {
        // Validation refused names that are not zones.
        if let Some(zone) = user_config
            .timezone
            .as_deref()
            .and_then(|z| z.parse::<chrono_tz::Tz>().ok())
        {
            settings.timezones.insert(user.clone(), zone);
        }
        if let Some(channel) = user_config.preferred_channel {
            settings.preferred_channels.insert(user.clone(), channel);
        }
    }
    settings.attachments = attachment_settings(config);
    settings
}

/// The server's time zone: `TZ` when it names one, else the system's (`/etc/localtime`),
/// else UTC.
pub fn server_timezone() -> chrono_tz::Tz {
    let from_env = std::env::var("TZ")
        .ok()
        .and_then(|tz| tz.trim_start_matches(':').parse::<chrono_tz::Tz>().ok());
    from_env
        .or_else(|| {
            iana_time_zone::get_timezone()
                .ok()
                .and_then(|tz| tz.parse::<chrono_tz::Tz>().ok())
        })
        .unwrap_or(chrono_tz::Tz::UTC)
}

/// `attachments`, `speech` and `model.vision` → what the gateway does with files users send.
pub fn attachment_settings(config: &Config) -> moltmate_gateway::AttachmentSettings {
    let a = &config.attachments;
    let speech = config.speech.as_ref().and_then(|speech| {
        let timeout = std::time::Duration::from_secs(speech.timeout_seconds);
        let key = speech
            .api_key
            .as_ref()
            .map(|k| moltmate_providers::ApiKey::new(k.expose()));
        match moltmate_providers::OpenAiTranscriber::new(
            &speech.base_url,
            key,
            &speech.model,
            timeout,
        ) {
            Ok(transcriber) => Some(moltmate_gateway::SpeechSettings {
                transcriber: std::sync::Arc::new(transcriber),
                max_bytes: speech.max_mb << 20,
                max_seconds: speech.max_seconds,
                echo: speech.echo,
                timeout,
            }),
            Err(e) => {
                tracing::error!(error = %e, "speech: the transcription client could not be built; voice notes are disabled");
                None
            }
        }
    });
    moltmate_gateway::AttachmentSettings {
        max_bytes: a.max_mb << 20,
        max_per_message: a.max_per_message as usize,
        download_timeout: std::time::Duration::from_secs(a.timeout_seconds),
        vision: config.model.supports_vision(&config.model.primary),
        speech,
    }
}

/// Models whose use no spend budget can see (no `model.prices` entry), when the operator set
/// a budget in dollars: they are warned at startup. (The built-in spend defaults of the lower
/// trust levels alone do not warn: without prices they simply never bind.)
pub fn unpriced_models(config: &Config) -> Vec<String> {
    let spend_set = config.limits.spend_per_month != Allowance::Unlimited
        || TrustLevel::ALL
            .iter()
            .any(|t| config.limits.trust.level(*t).spend_per_month.is_some())
        || config
            .families
            .values()
            .any(|f| f.budget.spend_per_month != Allowance::Unlimited);
    if !spend_set {
        return Vec::new();
    }
    let prices = gateway_prices(config);
    std::iter::once(&config.model.primary)
        .chain(config.model.fallbacks.iter())
        .filter(|m| prices.get(&m.provider, &m.model).is_none())
        .map(|m| m.to_string())
        .collect()
}

fn gateway_prices(config: &Config) -> Prices {
    Prices::new(
        config
            .model
            .prices
            .iter()
            .map(|(model, price)| {
                (
                    model.clone(),
                    Price {
                        input_micros_per_token: price.input_per_m_tok,
                        output_micros_per_token: price.output_per_m_tok,
                    },
                )
            })
            .collect(),
    )
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
    fn trust_levels_map_to_their_limits_and_budgets() {
        let config = Config::default();
        let owner = settings_for_trust(TrustLevel::Owner, &config).limits;
        let stranger = settings_for_trust(TrustLevel::Stranger, &config).limits;
        assert_eq!(owner, UserLimits::default());
        assert_eq!(stranger.tool_calls_per_answer, 8);
        assert_eq!(stranger.tool_output_bytes_per_turn, 256 * 1024);
        assert_eq!(stranger.queued_messages, 10);
        assert_eq!(stranger.budget.messages_per_day, Some(100));
        assert_eq!(stranger.budget.spend_micros_per_month, Some(2_000_000));
        assert!(unpriced_models(&config).is_empty(), "no warning by default");
        let mut priced = Config::default();
        priced.limits.spend_per_month = Allowance::Limited(10.0);
        assert_eq!(
            unpriced_models(&priced),
            vec!["anthropic/claude-sonnet-4-5"]
        );
    }

    #[test]
    fn trust_levels_only_take_away() {
        let config = Config::default();
        let owner = settings_for_trust(TrustLevel::Owner, &config);
        let stranger = settings_for_trust(TrustLevel::Stranger, &config);
        let restricted = settings_for_trust(TrustLevel::Restricted, &config);
        assert!(owner.tools.contains(&"exec".to_string()));
        assert!(!stranger.tools.contains(&"exec".to_string()));
        assert!(!stranger.tools.contains(&"web_fetch".to_string()));
        assert!(
            !owner.tools.contains(&"web_search".to_string()),
            "off until tools.web.search is enabled"
        );
        assert!(stranger.tools.contains(&"schedule".to_string()));
        assert_eq!(stranger.limits.reminders, 10);
        assert_eq!(owner.limits.reminders, 50);
        assert_eq!(
            restricted.tools,
            vec![
                "read".to_string(),
                "memory_search".to_string(),
                "send_file".to_string()
            ]
        );
        assert!(restricted.read_only);
        assert_eq!(restricted.sandbox.workspace_access, WorkspaceAccess::Ro);
    }

    #[test]
    fn web_search_is_gated_by_trust_like_web_fetch() {
        let mut config = Config::default();
        config.tools.web.search.enabled = true;
        for (trust, offered) in [
            (TrustLevel::Owner, true),
            (TrustLevel::Family, true),
            (TrustLevel::Friend, true),
            (TrustLevel::Stranger, false),
            (TrustLevel::Restricted, false),
        ] {
            let tools = settings_for_trust(trust, &config).tools;
            assert_eq!(
                tools.contains(&"web_search".to_string()),
                offered,
                "{trust:?}: {tools:?}"
            );
            assert_eq!(
                tools.contains(&"web_fetch".to_string()),
                offered,
                "{trust:?}: {tools:?}"
            );
        }
        config.tools.deny = vec![moltmate_config::ToolName::WebSearch];
        assert!(!settings_for_trust(TrustLevel::Owner, &config)
            .tools
            .contains(&"web_search".to_string()));
    }
}
