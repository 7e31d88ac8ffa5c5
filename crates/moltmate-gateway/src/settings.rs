//! What the gateway needs from the operator's config, in the gateway's own terms.
//!
//! The binary translates `moltmate.json` into these structs; the gateway never sees the file
//! format, and tests build settings directly.

use crate::access::ChannelAccess;
use moltmate_core::sandbox::{ExecSettings, SandboxIds, SandboxProfile, UidRange};
use moltmate_core::{ChannelKind, UserId};
use std::collections::HashMap;
use std::time::Duration;

/// What one user's assistant may do (tools offered, exec policy, sandbox). Trust levels map to
/// one of these.
#[derive(Debug, Clone, PartialEq)]
pub struct UserSettings {
    /// Tool names offered to the model (and the only ones the call layer accepts).
    pub tools: Vec<String>,
    pub exec: ExecSettings,
    pub sandbox: SandboxProfile,
    /// File tools refuse to write.
    pub read_only: bool,
    /// Caps and budgets (`limits`, by trust level).
    pub limits: crate::limits::UserLimits,
}

impl Default for UserSettings {
    fn default() -> Self {
        UserSettings {
            tools: ["read", "write", "edit", "exec", "web_fetch", "web_search", "schedule"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            exec: ExecSettings {
                default_timeout: Duration::from_secs(30),
                max_timeout: Duration::from_secs(300),
                ..ExecSettings::default()
            },
            sandbox: SandboxProfile::default(),
            read_only: false,
            limits: crate::limits::UserLimits::default(),
        }
    }
}

/// Which host identity users' sandboxes run as (and own their homes with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxIdPolicy {
    /// A root gateway: each user, and each family folder, gets its own id from this range
    /// (`sandbox.uidRange`), allocated on first need and kept in the database; a removed
    /// user's id is never given out again.
    PerUser(UidRange),
    /// A gateway that is not root cannot switch uids: every sandbox runs as these ids (its
    /// own), as do the homes, and family folders have no group of their own.
    Shared(SandboxIds),
}

impl SandboxIdPolicy {
    /// Per-user ids from `range` when this process is root, else this process's own ids.
    pub fn detect(range: UidRange) -> Self {
        if rustix::process::geteuid().is_root() {
            SandboxIdPolicy::PerUser(range)
        } else {
            SandboxIdPolicy::Shared(SandboxIds {
                uid: rustix::process::geteuid().as_raw(),
                gid: rustix::process::getegid().as_raw(),
            })
        }
    }
}

/// Everything the gateway reads from config.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Access rules per channel. A channel without an entry refuses everyone, except
    /// [`ChannelKind::Local`] (the operator's own terminal), which is always allowed.
    pub access: HashMap<ChannelKind, ChannelAccess>,
    /// How long a pairing code stays valid.
    pub pairing_ttl: Duration,
    /// Pending pairing codes at most, over all channels (`channels.maxPendingPairings`).
    pub max_pending_pairings: usize,
    /// Pending pairing codes at most per channel (`channels.<ch>.maxPendingPairings`); a
    /// channel without an entry is bounded by `max_pending_pairings` alone.
    pub max_pending_pairings_per_channel: HashMap<ChannelKind, usize>,
    /// Model calls per turn at most (each tool round trip is one).
    pub max_tool_iterations: usize,
    /// Each prompt file (SOUL.md, MEMORY.md, ...) is cut at this size.
    pub prompt_file_max_bytes: u64,
    /// Persona written into a new home (`cami`, `molty`) before (or instead of) onboarding.
    pub default_persona: String,
    /// Ask a new user to choose a persona on their first message.
    pub onboarding_enabled: bool,
    /// `<MOLTMATE_HOME>/personas`: operator persona templates (`<key>/SOUL.md`, `IDENTITY.md`).
    pub personas_dir: Option<std::path::PathBuf>,
    /// Language of built-in texts when the channel does not tell (`en`, `de`).
    pub default_language: String,
    /// Settings for users without an override.
    pub default_user: UserSettings,
    /// Per-user overrides (explicit `users.<id>.trust`).
    pub users: HashMap<UserId, UserSettings>,
    /// Per-channel defaults (`channels.<ch>.defaultTrust`) for users without an override.
    pub channel_defaults: HashMap<ChannelKind, UserSettings>,
    /// Names of the trust levels behind `users` and `channel_defaults` (`owner`, `stranger`...),
    /// for the operator's eyes only (admin page); decisions use the settings themselves.
    pub trust_names: HashMap<UserId, String>,
    pub channel_trust_names: HashMap<ChannelKind, String>,
    /// Identities linked to users by the config (`users.<id>.identities`).
    pub configured_identities: HashMap<moltmate_core::Identity, UserId>,
    /// A user's worker task exits after this long without messages (it is restarted on the
    /// next one), so memory tracks active users, not known ones.
    pub worker_idle: Duration,
    /// Turns running at once across all users; the rest wait. Bounds memory and provider load.
    pub max_concurrent_turns: usize,
    /// A session idle this long is ended before the next message (`session.idleResetMinutes`).
    pub session_idle_reset: Option<Duration>,
    /// The model's context window, in tokens (`model.contextWindowTokens`).
    pub context_window_tokens: usize,
    /// Compact when the estimated context passes this share of the window.
    pub compact_at_ratio: f64,
    /// Family of each member (`families.<name>.members`); one family per user.
    pub families: HashMap<UserId, String>,
    /// `sandbox.mode: "all"`: file tools see exactly what the sandbox sees. For a user whose
    /// `workspaceAccess` is `none`, that is their scratch directory under this root
    /// (`<home>/sandboxes/scratch`), not their home.
    pub sandbox_scratch_dir: Option<std::path::PathBuf>,
    /// Log every tool call (name, user, outcome, duration; never arguments).
    pub log_tool_calls: bool,
    /// When a turn of a user who may use `exec` begins, start their sandbox in the background
    /// (`sandbox.prewarm`), so the first command does not wait for it.
    pub prewarm_sandboxes: bool,
    /// Which host ids users' sandboxes run as and their homes belong to.
    pub sandbox_ids: SandboxIdPolicy,
    /// Model prices for spend budgets (`model.prices`).
    pub prices: crate::budget::Prices,
    /// Shared budgets of families (`families.<name>.budget`), by family name.
    pub family_budgets: HashMap<String, crate::budget::Budget>,
    /// `<MOLTMATE_HOME>/index`: the users' memory search indexes (`/forget` deletes one).
    pub memory_index_dir: Option<std::path::PathBuf>,
    /// Users' time zones for reminders (`users.<id>.timezone`).
    pub timezones: HashMap<UserId, chrono_tz::Tz>,
    /// The zone of users without one: the server's.
    pub server_timezone: chrono_tz::Tz,
    /// Where users' reminders go (`users.<id>.preferredChannel`); default the last used.
    pub preferred_channels: HashMap<UserId, ChannelKind>,
    /// Shortest repeat of a recurring reminder (`limits.reminderMinIntervalMinutes`).
    pub reminder_min_interval_minutes: u32,
    /// What the scheduler and the `schedule` tool take as "now".
    pub clock: crate::schedule::Clock,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            access: HashMap::new(),
            pairing_ttl: Duration::from_secs(3600),
            max_pending_pairings: 100,
            max_pending_pairings_per_channel: HashMap::new(),
            max_tool_iterations: 8,
            prompt_file_max_bytes: 32 * 1024,
            default_persona: "cami".to_string(),
            onboarding_enabled: true,
            personas_dir: None,
            default_language: "en".to_string(),
            default_user: UserSettings::default(),
            users: HashMap::new(),
            channel_defaults: HashMap::new(),
            trust_names: HashMap::new(),
            channel_trust_names: HashMap::new(),
            configured_identities: HashMap::new(),
            worker_idle: Duration::from_secs(120),
            max_concurrent_turns: 256,
            log_tool_calls: false,
            prewarm_sandboxes: false,
            sandbox_scratch_dir: None,
            session_idle_reset: None,
            context_window_tokens: 200_000,
            compact_at_ratio: 0.8,
            families: HashMap::new(),
            sandbox_ids: SandboxIdPolicy::detect(UidRange::default()),
            prices: crate::budget::Prices::default(),
            family_budgets: HashMap::new(),
            memory_index_dir: None,
            timezones: HashMap::new(),
            server_timezone: chrono_tz::Tz::UTC,
            preferred_channels: HashMap::new(),
            reminder_min_interval_minutes: 15,
            clock: crate::schedule::Clock::default(),
        }
    }
}

impl GatewaySettings {
    /// How a user's trust reads on the admin page: their explicit level, else the default of
    /// each channel they use (`stranger (telegram default)`), else `—`.
    pub fn trust_label(&self, user: &UserId, channels: &[ChannelKind]) -> String {
        if let Some(name) = self.trust_names.get(user) {
            return name.clone();
        }
        let mut labels: Vec<String> = channels
            .iter()
            .filter_map(|c| {
                self.channel_trust_names
                    .get(c)
                    .map(|name| format!("{name} ({c} default)"))
            })
            .collect();
        labels.dedup();
        if labels.is_empty() {
            "—".to_string()
        } else {
            labels.join(", ")
        }
    }

    /// The bounds on pairing codes for a sender on `channel`.
    pub fn pairing_limits(&self, channel: ChannelKind) -> moltmate_store::PairingLimits {
        moltmate_store::PairingLimits {
            ttl: self.pairing_ttl,
            max_pending: self.max_pending_pairings,
            max_pending_per_channel: self
                .max_pending_pairings_per_channel
                .get(&channel)
                .copied()
                .unwrap_or(self.max_pending_pairings),
        }
    }

    /// The family budget `user` counts towards, with every member, if their family has one.
    pub fn family_budget(&self, user: &UserId) -> Option<crate::budget::FamilyBudget> {
        let family = self.families.get(user)?;
        let budget = *self.family_budgets.get(family)?;
        let mut members: Vec<UserId> = self
            .families
            .iter()
            .filter(|(_, name)| *name == family)
            .map(|(member, _)| member.clone())
            .collect();
        members.sort();
        Some(crate::budget::FamilyBudget { members, budget })
    }

    /// The settings the operator sees for `user`: their explicit trust level's, else those of
    /// the first of their channels with a default, else the global default.
    pub fn settings_for_display(&self, user: &UserId, channels: &[ChannelKind]) -> &UserSettings {
        self.users
            .get(user)
            .or_else(|| channels.iter().find_map(|c| self.channel_defaults.get(c)))
            .unwrap_or(&self.default_user)
    }

    /// The zone `user`'s reminders are meant in: their own, else the server's.
    pub fn timezone(&self, user: &UserId) -> chrono_tz::Tz {
        self.timezones
            .get(user)
            .copied()
            .unwrap_or(self.server_timezone)
    }

    /// What `user` may do in a message that arrived on `channel`: the user's explicit
    /// override, else the channel's default, else the global default.
    pub fn user_settings(&self, user: &UserId, channel: ChannelKind) -> &UserSettings {
        self.users
            .get(user)
            .or_else(|| self.channel_defaults.get(&channel))
            .unwrap_or(&self.default_user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_label_prefers_the_explicit_level_then_channel_defaults() {
        let mut settings = GatewaySettings::default();
        let anna = UserId::new("anna").unwrap();
        let bob = UserId::new("telegram_2").unwrap();
        settings.trust_names.insert(anna.clone(), "owner".into());
        settings
            .channel_trust_names
            .insert(ChannelKind::Telegram, "stranger".into());
        assert_eq!(
            settings.trust_label(&anna, &[ChannelKind::Telegram]),
            "owner"
        );
        assert_eq!(
            settings.trust_label(&bob, &[ChannelKind::Telegram]),
            "stranger (telegram default)"
        );
        assert_eq!(settings.trust_label(&bob, &[]), "—");
    }
}
