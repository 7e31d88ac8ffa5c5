//! The typed shape of `moltmate.json`: one struct per section, camelCase keys, unknown keys
//! refused, every key optional with the default documented on its field.
//!
//! Types from `moltmate-core` are used directly where they fit (`ExecSecurity`,
//! `WorkspaceAccess`, `SandboxNetwork`, `UserId`, `Identity`); conversions to the settings
//! structs other crates take live next to the section they convert.

use crate::secret::Secret;
use moltmate_core::sandbox::{
    ExecSecurity, ExecSettings, SandboxLimits, SandboxNetwork, SandboxProfile, UidRange,
    WorkspaceAccess,
};
use moltmate_core::{Identity, UserId};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// The whole configuration. Every field is public; `Debug` is safe to log (secrets redacted).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    pub gateway: GatewayConfig,
    pub model: ModelConfig,
    /// Configured providers by name; the builtins `anthropic` and `openai` exist even if absent.
    pub providers: BTreeMap<String, ProviderConfig>,
    pub channels: ChannelsConfig,
    pub sandbox: SandboxConfig,
    pub tools: ToolsConfig,
    pub logging: LoggingConfig,
    pub onboarding: OnboardingConfig,
    pub session: SessionConfig,
    /// Caps and budgets per user (see `limits.rs`).
    pub limits: crate::limits::LimitsConfig,
    /// Photos, voice notes and documents users send.
    pub attachments: AttachmentsConfig,
    /// Speech to text for voice notes and audio (an OpenAI-compatible transcription endpoint).
    /// Absent: users are told voice notes are not enabled.
    pub speech: Option<SpeechConfig>,
    /// Families by name. A user belongs to at most one family.
    pub families: BTreeMap<String, FamilyConfig>,
    /// Known users by id.
    pub users: BTreeMap<UserId, UserConfig>,
    /// API keys found in the environment at load time (`ANTHROPIC_API_KEY`, `OPENAI_API_KEY`),
    /// used by providers without an `apiKey`. Not a file key.
    #[serde(skip)]
    pub(crate) env_keys: EnvKeys,
}

/// Provider API keys taken from the environment, by API kind.
#[derive(Debug, Clone, Default)]
pub(crate) struct EnvKeys {
    pub(crate) anthropic: Option<Secret>,
    pub(crate) openai: Option<Secret>,
    /// `BRAVE_API_KEY`, for `tools.web.search` with provider `brave` and no `apiKey`.
    pub(crate) brave: Option<Secret>,
}

// ---------------------------------------------------------------------------------------------
// gateway

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayConfig {
    /// Address to listen on. Default `127.0.0.1`; anything else requires `auth.token`.
    #[serde(deserialize_with = "de_ip")]
    pub bind: IpAddr,
    /// Default 18790.
    #[serde(deserialize_with = "de_port")]
    pub port: u16,
    pub auth: GatewayAuthConfig,
    pub rate_limit: RateLimitConfig,
    /// Where people reach the web UI, when that is not `http://bind:port`: e.g.
    /// `https://moltbot.example.com` behind a reverse proxy (the seed's Traefik set-up). Login
    /// links printed by the CLI use it, and an `https` URL marks cookies `Secure`. An origin
    /// only (no path: the UI does not run under a path prefix).
    pub public_url: Option<String>,
    /// Reverse proxies (IP addresses) whose `X-Forwarded-For` names the client for per-IP
    /// rate limits. Empty: every request counts for its TCP peer.
    #[serde(deserialize_with = "de_ip_list")]
    pub trusted_proxies: Vec<IpAddr>,
}

impl GatewayConfig {
    fn public_url_parsed(&self) -> Option<url::Url> {
        self.public_url
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
    }

    /// The public origin as browsers see it (`scheme://host[:port]`, normalised: lower-case,
    /// default port dropped), if `publicUrl` is set.
    pub fn public_origin(&self) -> Option<String> {
        self.public_url_parsed()
            .map(|u| u.origin().ascii_serialization())
    }

    /// Whether browsers reach the gateway over HTTPS (so cookies must be `Secure`).
    pub fn served_over_https(&self) -> bool {
        self.public_url_parsed()
            .is_some_and(|u| u.scheme() == "https")
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 18790,
            auth: GatewayAuthConfig::default(),
            rate_limit: RateLimitConfig::default(),
            public_url: None,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayAuthConfig {
    /// Bearer token for the gateway's admin/API surface.
    pub token: Option<Secret>,
}

/// Request rate limits of the web UI and API (token buckets).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitConfig {
    /// Requests per minute of one signed-in user (all their tokens and browser sessions
    /// together; the operator's admin session has its own). Default 100.
    pub per_minute: u32,
    /// Requests a signed-in user may make at once before `perMinute` applies. Default 50.
    pub burst: u32,
    /// Requests per minute per client IP without a verified credential: no credential, a
    /// wrong one, a credential not seen recently (its first check), and every sign-in.
    /// Default 60.
    pub unauthenticated_per_minute: u32,
    /// Burst of the per-IP bucket. Default 30.
    pub unauthenticated_burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_minute: 100,
            burst: 50,
            unauthenticated_per_minute: 60,
            unauthenticated_burst: 30,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// model and providers

/// A `provider/model` reference, e.g. `anthropic/claude-sonnet-4-5`. The model part may itself
/// contain `/` (`openrouter/meta-llama/llama-3`); the provider is everything before the first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub provider: String,
    pub model: String,
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

impl ModelRef {
    /// Parses `provider/model`; both parts non-empty, no whitespace.
    pub fn parse(raw: &str) -> Option<ModelRef> {
        let (provider, model) = raw.split_once('/')?;
        let ok = !provider.is_empty() && !model.is_empty() && !raw.chars().any(char::is_whitespace);
        ok.then(|| ModelRef {
            provider: provider.to_string(),
            model: model.to_string(),
        })
    }
}

impl<'de> Deserialize<'de> for ModelRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ModelRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"provider/model\", e.g. \"anthropic/claude-sonnet-4-5\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ModelRef, E> {
                ModelRef::parse(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelConfig {
    /// Default `anthropic/claude-sonnet-4-5`.
    pub primary: ModelRef,
    /// Tried in order when the primary fails with a fall-back-worthy error. Default empty.
    pub fallbacks: Vec<ModelRef>,
    /// Model/tool round trips per message. Default 8.
    pub max_tool_iterations: u32,
    /// Default 4096.
    pub max_output_tokens: u32,
    /// Default 120.
    pub request_timeout_seconds: u64,
    /// Retries of a retryable provider error before falling back. Default 2; 0 allowed.
    pub max_retries: u32,
    /// Default 200000.
    pub context_window_tokens: u32,
    /// US dollars per million tokens by `"provider/model"` (or `"provider/*"`), for spend
    /// budgets. Default empty: a model without a price counts as free for `spendPerMonth`
    /// (token budgets still apply).
    pub prices: BTreeMap<String, crate::limits::PriceConfig>,
    /// Models that accept images, as `"provider/model"` or `"provider/*"`. When the primary
    /// model is listed, photos are shown to it; otherwise they are saved and described. Default
    /// empty.
    pub vision: Vec<String>,
}

impl ModelConfig {
    /// Whether `model` is listed in `vision` (exactly or by `provider/*`).
    pub fn supports_vision(&self, model: &ModelRef) -> bool {
        let full = model.to_string();
        let any = format!("{}/*", model.provider);
        self.vision.iter().any(|v| *v == full || *v == any)
    }
}

/// `attachments`: files users send.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct AttachmentsConfig {
    /// Largest file taken, in MB (1–50). Default 20 (what Telegram lets bots download).
    pub max_mb: u64,
    /// Files handled per message (1–10). Default 4.
    pub max_per_message: u32,
    /// Time for one download, in seconds (1–600). Default 60.
    pub timeout_seconds: u64,
    /// Files `send_file` keeps for download on the web chat and the API.
    pub downloads: DownloadsConfig,
}

impl Default for AttachmentsConfig {
    fn default() -> Self {
        AttachmentsConfig {
            max_mb: 20,
            max_per_message: 4,
            timeout_seconds: 60,
            downloads: DownloadsConfig::default(),
        }
    }
}

/// `attachments.downloads`: links to files `send_file` made for web and API users.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct DownloadsConfig {
    /// Days a link opens (1–90). Default 7.
    pub expire_days: u64,
    /// Links a user may have at once (1–1000). Default 50.
    pub max_files_per_user: u64,
    /// MB a user's waiting files may take (1–10000). Default 200.
    pub max_mb_per_user: u64,
    /// MB all users' waiting files may take together (1–1000000). Default 2048: the files sit
    /// next to the database, so the sum is bounded, not only each user's share.
    pub max_mb_total: u64,
}

impl Default for DownloadsConfig {
    fn default() -> Self {
        DownloadsConfig {
            expire_days: 7,
            max_files_per_user: 50,
            max_mb_per_user: 200,
            max_mb_total: 2048,
        }
    }
}

/// `speech`: an OpenAI-compatible `POST {baseUrl}/audio/transcriptions` endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SpeechConfig {
    /// Default `https://api.openai.com/v1`; a self-hosted Whisper server's URL works too.
    pub base_url: String,
    /// The key, usually `"${OPENAI_API_KEY}"`; absent for a server without authentication.
    pub api_key: Option<Secret>,
    /// Default `whisper-1`.
    pub model: String,
    /// Longest recording transcribed, in seconds (by the channel's claim). Default 300.
    pub max_seconds: u64,
    /// Largest audio sent, in MB (1–25). Default 20.
    pub max_mb: u64,
    /// Start the answer with "heard: <transcript>". Default true.
    pub echo: bool,
    /// Time for one transcription, in seconds. Default 120.
    pub timeout_seconds: u64,
}

impl Default for SpeechConfig {
    fn default() -> Self {
        SpeechConfig {
            base_url: "https://api.openai.com/v1".to_string(),
            api_key: None,
            model: "whisper-1".to_string(),
            max_seconds: 300,
            max_mb: 20,
            echo: true,
            timeout_seconds: 120,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            primary: ModelRef {
                provider: "anthropic".to_string(),
                model: "claude-sonnet-4-5".to_string(),
            },
            fallbacks: Vec::new(),
            max_tool_iterations: 8,
            max_output_tokens: 4096,
            request_timeout_seconds: 120,
            max_retries: 2,
            context_window_tokens: 200_000,
            prices: BTreeMap::new(),
            vision: Vec::new(),
        }
    }
}

impl ModelConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds)
    }
}

/// The wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderApi {
    /// Anthropic Messages API.
    Anthropic,
    /// OpenAI Chat Completions (and compatible servers: Ollama, vLLM, OpenRouter...).
    Openai,
}

impl ProviderApi {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderApi::Anthropic => "anthropic",
            ProviderApi::Openai => "openai",
        }
    }

    /// Where the provider lives when no `baseUrl` is configured.
    pub fn default_base_url(self) -> &'static str {
        match self {
            ProviderApi::Anthropic => "https://api.anthropic.com",
            ProviderApi::Openai => "https://api.openai.com/v1",
        }
    }

    /// The environment variable whose value is the key when no `apiKey` is configured.
    pub fn key_env_var(self) -> &'static str {
        match self {
            ProviderApi::Anthropic => "ANTHROPIC_API_KEY",
            ProviderApi::Openai => "OPENAI_API_KEY",
        }
    }

    /// The builtin provider of this name, if any.
    pub fn builtin(name: &str) -> Option<ProviderApi> {
        match name {
            "anthropic" => Some(ProviderApi::Anthropic),
            "openai" => Some(ProviderApi::Openai),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ProviderConfig {
    /// Required unless the provider is named like a builtin (`anthropic`, `openai`).
    pub api: Option<ProviderApi>,
    /// Default: the API's public endpoint.
    pub base_url: Option<String>,
    /// Default: `ANTHROPIC_API_KEY` / `OPENAI_API_KEY` from the environment, by `api`.
    pub api_key: Option<Secret>,
}

/// A provider with everything defaulted: what the providers crate needs to build a client.
#[derive(Debug, Clone)]
pub struct ResolvedProvider {
    pub name: String,
    pub api: ProviderApi,
    pub base_url: String,
    /// `None` when neither the file nor the environment gives a key (a local server may not
    /// need one).
    pub api_key: Option<Secret>,
}

// ---------------------------------------------------------------------------------------------
// channels

/// How much a user is trusted; decides tools, sandbox profile and what the assistant may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustLevel {
    /// The operator.
    Owner,
    Family,
    Friend,
    /// Someone let in without being known (open DMs, fresh pairing).
    Stranger,
    /// Explicitly limited.
    Restricted,
}

impl TrustLevel {
    pub const ALL: [TrustLevel; 5] = [
        TrustLevel::Owner,
        TrustLevel::Family,
        TrustLevel::Friend,
        TrustLevel::Stranger,
        TrustLevel::Restricted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TrustLevel::Owner => "owner",
            TrustLevel::Family => "family",
            TrustLevel::Friend => "friend",
            TrustLevel::Stranger => "stranger",
            TrustLevel::Restricted => "restricted",
        }
    }
}

impl fmt::Display for TrustLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ChannelsConfig {
    pub telegram: TelegramConfig,
    pub signal: SignalConfig,
    pub whatsapp: WhatsAppConfig,
    pub discord: DiscordConfig,
    pub slack: SlackConfig,
    pub web: WebChannelConfig,
    pub local: LocalChannelConfig,
    /// Pending pairing codes at most, over all channels; past it, new unknown senders get
    /// no code and no reply until the operator approves or denies some. Default 100.
    pub max_pending_pairings: u32,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        ChannelsConfig {
            telegram: TelegramConfig::default(),
            signal: SignalConfig::default(),
            whatsapp: WhatsAppConfig::default(),
            discord: DiscordConfig::default(),
            slack: SlackConfig::default(),
            web: WebChannelConfig::default(),
            local: LocalChannelConfig::default(),
            max_pending_pairings: 100,
        }
    }
}

/// Who may talk to the assistant in Telegram direct messages (shared with the gateway).
pub use moltmate_core::channel::DmPolicy;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct TelegramConfig {
    /// Default: enabled iff `botToken` is set. Use [`TelegramConfig::is_enabled`].
    pub enabled: Option<bool>,
    pub bot_token: Option<Secret>,
    /// Default `https://api.telegram.org`.
    pub api_url: String,
    pub dm_policy: DmPolicy,
    /// Telegram user ids (numbers are normalised to strings) or `"*"`.
    #[serde(deserialize_with = "de_allow_from")]
    pub allow_from: Vec<String>,
    /// Long-poll timeout. Default 30.
    pub poll_timeout_seconds: u64,
    /// Trust of Telegram users not listed under `users`. Default `stranger`: a Telegram sender
    /// is only as trusted as the owner says in `users.<id>.trust`.
    pub default_trust: TrustLevel,
    /// Pending pairing codes at most on Telegram (within `channels.maxPendingPairings`).
    /// Default 50.
    pub max_pending_pairings: u32,
}

impl Default for TelegramConfig {
    fn default() -> Self {
        TelegramConfig {
            enabled: None,
            bot_token: None,
            api_url: "https://api.telegram.org".to_string(),
            dm_policy: DmPolicy::Pairing,
            allow_from: Vec::new(),
            poll_timeout_seconds: 30,
            default_trust: TrustLevel::Stranger,
            max_pending_pairings: 50,
        }
    }
}

impl TelegramConfig {
    /// The effective `enabled`: explicit value, else whether a bot token is configured.
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(self.bot_token.is_some())
    }

    /// Whether `allowFrom` lists this sender (or `"*"`).
    pub fn allows(&self, peer: &str) -> bool {
        self.allow_from
            .iter()
            .any(|entry| entry == "*" || entry == peer)
    }
}

/// `channels.signal`: Signal through signal-cli's JSON-RPC daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SignalConfig {
    /// Default: enabled iff `account` is set.
    pub enabled: Option<bool>,
    /// The linked account, `+4917...` (E.164).
    pub account: Option<String>,
    /// The `signal-cli` program the gateway starts and supervises (default `signal-cli`,
    /// looked up in `PATH`). Unused when `daemon` is set.
    pub cli_path: String,
    /// signal-cli's data directory (keys, the linked session). Default `<home>/signal`, 0700.
    pub data_dir: Option<std::path::PathBuf>,
    /// Connect to a daemon the operator runs instead: `unix:/path` or `tcp:host:port`.
    pub daemon: Option<String>,
    /// Name of the linked device on the phone. Default `moltmate`.
    pub device_name: String,
    /// Send read receipts for stored messages. Default false.
    pub read_receipts: bool,
    pub dm_policy: DmPolicy,
    /// Phone numbers (`+4917...`) or `"*"`.
    #[serde(deserialize_with = "de_allow_from")]
    pub allow_from: Vec<String>,
    /// Trust of Signal users not listed under `users`. Default `stranger`.
    pub default_trust: TrustLevel,
    /// Pending pairing codes at most on Signal. Default 50.
    pub max_pending_pairings: u32,
}

impl Default for SignalConfig {
    fn default() -> Self {
        SignalConfig {
            enabled: None,
            account: None,
            cli_path: "signal-cli".to_string(),
            data_dir: None,
            daemon: None,
            device_name: "moltmate".to_string(),
            read_receipts: false,
            dm_policy: DmPolicy::Pairing,
            allow_from: Vec::new(),
            default_trust: TrustLevel::Stranger,
            max_pending_pairings: 50,
        }
    }
}

impl SignalConfig {
    /// The effective `enabled`: explicit value, else whether an account is configured.
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(self.account.is_some())
    }
}

/// `channels.whatsapp`: the WhatsApp Business Cloud API (webhook + Graph API).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct WhatsAppConfig {
    /// Default: enabled iff `phoneNumberId` is set.
    pub enabled: Option<bool>,
    /// The business phone number's id (Meta app → WhatsApp → API setup).
    pub phone_number_id: Option<String>,
    /// A system-user access token, e.g. `"${WHATSAPP_ACCESS_TOKEN}"`.
    pub access_token: Option<Secret>,
    /// The Meta app's secret (signs every webhook delivery), e.g. `"${WHATSAPP_APP_SECRET}"`.
    pub app_secret: Option<Secret>,
    /// What the webhook handshake must present, e.g. `"${WHATSAPP_VERIFY_TOKEN}"`.
    pub verify_token: Option<Secret>,
    /// Default `https://graph.facebook.com`.
    pub api_url: String,
    /// Default `v21.0`.
    pub api_version: String,
    pub dm_policy: DmPolicy,
    /// Phone numbers (`+4917...`) or `"*"`.
    #[serde(deserialize_with = "de_allow_from")]
    pub allow_from: Vec<String>,
    pub default_trust: TrustLevel,
    pub max_pending_pairings: u32,
}

impl Default for WhatsAppConfig {
    fn default() -> Self {
        WhatsAppConfig {
            enabled: None,
            phone_number_id: None,
            access_token: None,
            app_secret: None,
            verify_token: None,
            api_url: "https://graph.facebook.com".to_string(),
            api_version: "v21.0".to_string(),
            dm_policy: DmPolicy::Pairing,
            allow_from: Vec::new(),
            default_trust: TrustLevel::Stranger,
            max_pending_pairings: 50,
        }
    }
}

impl WhatsAppConfig {
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(self.phone_number_id.is_some())
    }
}

/// A Discord bot (Gateway websocket for receiving, REST for sending).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct DiscordConfig {
    /// Default: enabled iff `botToken` is set.
    pub enabled: Option<bool>,
    pub bot_token: Option<Secret>,
    /// REST base URL; the gateway's websocket URL is asked from it. Default
    /// `https://discord.com/api/v10`.
    pub api_url: String,
    pub dm_policy: DmPolicy,
    /// Discord user ids (write them as strings: they exceed JSON's exact integers), group
    /// peer ids (`"group/<channel id>"`) or `"*"`.
    #[serde(deserialize_with = "de_allow_from")]
    pub allow_from: Vec<String>,
    /// Default `stranger`.
    pub default_trust: TrustLevel,
    /// Default 50.
    pub max_pending_pairings: u32,
    pub groups: GroupsConfig,
}

impl Default for DiscordConfig {
    fn default() -> Self {
        DiscordConfig {
            enabled: None,
            bot_token: None,
            api_url: "https://discord.com/api/v10".to_string(),
            dm_policy: DmPolicy::Pairing,
            allow_from: Vec::new(),
            default_trust: TrustLevel::Stranger,
            max_pending_pairings: 50,
            groups: GroupsConfig::default(),
        }
    }
}

impl DiscordConfig {
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(self.bot_token.is_some())
    }
}

/// How Slack reaches the gateway (`channels.slack.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlackMode {
    /// Socket Mode (default): no public URL needed; needs `appToken`.
    #[default]
    Socket,
    /// Events API: Slack POSTs to `https://<host>/webhooks/slack`; needs `signingSecret`.
    Events,
}

/// A Slack app (Socket Mode or the Events API for receiving, Web API for sending).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SlackConfig {
    /// Default: enabled iff `botToken` is set.
    pub enabled: Option<bool>,
    /// `"socket"` (default) or `"events"`.
    pub mode: SlackMode,
    /// Bot token (`xoxb-…`): `chat.postMessage`, `auth.test`.
    pub bot_token: Option<Secret>,
    /// App-level token (`xapp-…`, scope `connections:write`): Socket Mode only.
    pub app_token: Option<Secret>,
    /// The app's signing secret (Basic Information → App Credentials): Events API only,
    /// e.g. `"${SLACK_SIGNING_SECRET}"`.
    pub signing_secret: Option<Secret>,
    /// Web API base URL. Default `https://slack.com/api`.
    pub api_url: String,
    pub dm_policy: DmPolicy,
    /// Slack user ids as `"<team id>/<user id>"` (e.g. `"T0123/U0456"`), group peer ids
    /// (`"group/<team>/<channel>"`) or `"*"`.
    #[serde(deserialize_with = "de_allow_from")]
    pub allow_from: Vec<String>,
    /// Default `stranger`.
    pub default_trust: TrustLevel,
    /// Default 50.
    pub max_pending_pairings: u32,
    pub groups: GroupsConfig,
}

impl Default for SlackConfig {
    fn default() -> Self {
        SlackConfig {
            enabled: None,
            mode: SlackMode::Socket,
            bot_token: None,
            app_token: None,
            signing_secret: None,
            api_url: "https://slack.com/api".to_string(),
            dm_policy: DmPolicy::Pairing,
            allow_from: Vec::new(),
            default_trust: TrustLevel::Stranger,
            max_pending_pairings: 50,
            groups: GroupsConfig::default(),
        }
    }
}

impl SlackConfig {
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(self.bot_token.is_some())
    }
}

/// Group conversations on a channel (`channels.<name>.groups`). Off by default. When enabled,
/// the assistant answers in a group only when mentioned (unless `mention` is false), and each
/// group is its own user (`<channel>:group/<id>`, own home, memory and trust), admitted only by
/// the operator: a pairing code approved with `moltmate pairing approve`, the group's peer id in
/// `allowFrom`, or the identity in `users.<id>.identities`. `"*"` never admits a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct GroupsConfig {
    /// Default false.
    pub enabled: bool,
    /// Answer only messages that mention the assistant. Default true.
    pub mention: bool,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig {
            enabled: false,
            mention: true,
        }
    }
}

impl GroupsConfig {
    pub fn to_core(self) -> moltmate_core::channel::GroupPolicy {
        moltmate_core::channel::GroupPolicy {
            enabled: self.enabled,
            require_mention: self.mention,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct WebChannelConfig {
    /// Default true.
    pub enabled: bool,
    /// Default `friend`.
    pub default_trust: TrustLevel,
}

impl Default for WebChannelConfig {
    fn default() -> Self {
        WebChannelConfig {
            enabled: true,
            default_trust: TrustLevel::Friend,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalChannelConfig {
    /// Default `owner`: the local terminal is the operator.
    pub default_trust: TrustLevel,
}

impl Default for LocalChannelConfig {
    fn default() -> Self {
        LocalChannelConfig {
            default_trust: TrustLevel::Owner,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// sandbox

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxBackend {
    /// Docker if reachable, else bubblewrap. Default.
    #[default]
    Auto,
    Docker,
    Bwrap,
}

/// What runs in the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// Every command and file tool. Default.
    #[default]
    All,
    /// Only `exec`.
    Tools,
    /// Nothing: commands run on the host. Requires `dangerouslyAllowHostExec: true`.
    None,
}

/// How long a sandbox lives / what it is shared by (never by two users).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxScope {
    /// One per conversation session. Default.
    #[default]
    Session,
    /// One per user, reused across sessions.
    User,
    /// A fresh one per command.
    Task,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SandboxConfig {
    pub backend: SandboxBackend,
    pub mode: SandboxMode,
    pub scope: SandboxScope,
    /// Default `rw`.
    pub workspace_access: WorkspaceAccess,
    /// Default `none`.
    pub network: SandboxNetwork,
    /// Hosts reachable through the proxy when `network` is `proxy`. Default empty.
    pub allowed_domains: Vec<String>,
    /// Destination ports the proxy connects to. Default `[80, 443]`.
    pub allowed_ports: Vec<u16>,
    /// Default `moltmate-sandbox:bookworm-slim`.
    pub image: String,
    /// Docker endpoint; default: the Docker client's own default.
    pub docker_host: Option<String>,
    /// Consent for `mode: "none"`. Default false.
    pub dangerously_allow_host_exec: bool,
    /// Start a user's sandbox in the background when a turn of theirs begins (only users whose
    /// tools include `exec`), so the first command does not wait for a container to start.
    /// Default true.
    pub prewarm: bool,
    /// Deprecated and ignored (a shared pool cannot be handed a user's mounts later); kept so
    /// configs written by earlier `moltmate init` still load. Use `prewarm`.
    pub warm_pool: Option<u32>,
    pub limits: SandboxLimitsConfig,
    pub prune: SandboxPruneConfig,
    /// Host ids a root gateway gives users' sandboxes (one uid per user, one gid per family).
    pub uid_range: UidRangeConfig,
    /// Sandboxes alive at once, all users together (running Docker containers, prewarmed ones
    /// included; running bubblewrap commands). Default 32.
    pub max_active: u32,
    /// How long a command waits for one of `maxActive` before the model is told the server is
    /// busy. Default 60.
    pub queue_timeout_seconds: u64,
    /// Limits of all sandboxes together (one parent cgroup).
    pub total: SandboxTotalConfig,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            backend: SandboxBackend::Auto,
            mode: SandboxMode::All,
            scope: SandboxScope::Session,
            workspace_access: WorkspaceAccess::Rw,
            network: SandboxNetwork::None,
            allowed_domains: Vec::new(),
            allowed_ports: vec![80, 443],
            image: "moltmate-sandbox:bookworm-slim".to_string(),
            docker_host: None,
            dangerously_allow_host_exec: false,
            prewarm: true,
            warm_pool: None,
            limits: SandboxLimitsConfig::default(),
            prune: SandboxPruneConfig::default(),
            uid_range: UidRangeConfig::default(),
            max_active: 32,
            queue_timeout_seconds: 60,
            total: SandboxTotalConfig::default(),
        }
    }
}

/// `sandbox.total`: what all sandboxes together may use, enforced by one parent cgroup the
/// gateway makes. Absent values are derived from the host when the gateway starts: memory =
/// RAM minus max(1 GiB, 20 %) (at least a quarter of RAM), CPUs = cores minus max(0.5, 10 %).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SandboxTotalConfig {
    /// Memory of all sandboxes together, MB. Default: from the host.
    pub memory_mb: Option<u64>,
    /// CPUs of all sandboxes together (fractional). Default: from the host.
    pub cpus: Option<f64>,
    /// Processes and threads of all sandboxes together. Default 4096 (or one sandbox's
    /// `limits.pids`, if that is more).
    pub pids: Option<u64>,
    /// Name of the parent cgroup (`/sys/fs/cgroup/…/<name>`; with Docker's systemd driver
    /// `<name>.slice`). One per gateway on a host. Default `moltmate`.
    pub cgroup: String,
}

impl Default for SandboxTotalConfig {
    fn default() -> Self {
        SandboxTotalConfig {
            memory_mb: None,
            cpus: None,
            pids: None,
            cgroup: "moltmate".to_string(),
        }
    }
}

impl SandboxConfig {
    /// The default profile of a sandbox, in core's terms.
    pub fn profile(&self) -> SandboxProfile {
        SandboxProfile {
            workspace_access: self.workspace_access,
            network: self.network.clone(),
            limits: self.limits.to_core(),
        }
    }
}

/// Resource limits in operator units (MB, KB, CPUs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SandboxLimitsConfig {
    /// Default 512.
    pub memory_mb: u64,
    /// Fractional CPUs. Default 1.0.
    pub cpus: f64,
    /// Default 128.
    pub pids: u32,
    /// Default 1024.
    pub disk_mb: u64,
    /// Default 64.
    pub tmp_mb: u64,
    /// Default 64.
    pub output_kb: u64,
}

impl Default for SandboxLimitsConfig {
    fn default() -> Self {
        SandboxLimitsConfig {
            memory_mb: 512,
            cpus: 1.0,
            pids: 128,
            disk_mb: 1024,
            tmp_mb: 64,
            output_kb: 64,
        }
    }
}

impl SandboxLimitsConfig {
    /// Core's byte/millicpu limits. Validation has bounded every value, so nothing overflows;
    /// saturating arithmetic keeps that true even for a hand-built struct.
    pub fn to_core(&self) -> SandboxLimits {
        const MIB: u64 = 1024 * 1024;
        let cpu_millis = (self.cpus * 1000.0).round();
        SandboxLimits {
            memory_bytes: self.memory_mb.saturating_mul(MIB),
            // `as` saturates for floats (NaN -> 0); validation keeps cpus in (0, 1024].
            cpu_millis: cpu_millis as u32,
            pids: self.pids,
            disk_bytes: self.disk_mb.saturating_mul(MIB),
            tmp_bytes: self.tmp_mb.saturating_mul(MIB),
            output_bytes: self.output_kb.saturating_mul(1024),
        }
    }
}

/// `sandbox.uidRange`: where a root gateway takes sandbox uids and family gids from. Each user
/// gets the next unused id on first need, kept in the database and never given to anyone else
/// (not even a later user of the same name). See README for why the default range.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct UidRangeConfig {
    /// First id. Default 2000000000.
    pub start: u32,
    /// How many ids. Default 1000000.
    pub count: u32,
}

impl Default for UidRangeConfig {
    fn default() -> Self {
        let core = UidRange::default();
        UidRangeConfig {
            start: core.start,
            count: core.count,
        }
    }
}

impl UidRangeConfig {
    pub fn to_core(&self) -> UidRange {
        UidRange {
            start: self.start,
            count: self.count,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SandboxPruneConfig {
    /// Remove sandboxes idle this long. Default 30.
    pub idle_minutes: u64,
}

impl Default for SandboxPruneConfig {
    fn default() -> Self {
        SandboxPruneConfig { idle_minutes: 30 }
    }
}

impl SandboxPruneConfig {
    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.idle_minutes.saturating_mul(60))
    }
}

// ---------------------------------------------------------------------------------------------
// tools

/// The tools the gateway knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolName {
    Read,
    Write,
    Edit,
    Exec,
    WebFetch,
    MemorySearch,
    WebSearch,
    /// Reminders and scheduled messages of the calling user.
    Schedule,
    SendFile,
}

impl ToolName {
    pub const ALL: [ToolName; 9] = [
        ToolName::Read,
        ToolName::Write,
        ToolName::Edit,
        ToolName::Exec,
        ToolName::WebFetch,
        ToolName::MemorySearch,
        ToolName::WebSearch,
        ToolName::Schedule,
        ToolName::SendFile,
    ];

    /// The name the model sees (and `Tool::name()` returns).
    pub fn as_str(self) -> &'static str {
        match self {
            ToolName::Read => "read",
            ToolName::Write => "write",
            ToolName::Edit => "edit",
            ToolName::Exec => "exec",
            ToolName::WebFetch => "web_fetch",
            ToolName::MemorySearch => "memory_search",
            ToolName::WebSearch => "web_search",
            ToolName::Schedule => "schedule",
            ToolName::SendFile => "send_file",
        }
    }
}

impl fmt::Display for ToolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ToolsConfig {
    /// Default: all known tools.
    pub allow: Vec<ToolName>,
    /// Wins over `allow`. Default empty.
    pub deny: Vec<ToolName>,
    pub exec: ExecConfig,
    pub web: WebToolsConfig,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        ToolsConfig {
            allow: ToolName::ALL.to_vec(),
            deny: Vec::new(),
            exec: ExecConfig::default(),
            web: WebToolsConfig::default(),
        }
    }
}

impl ToolsConfig {
    /// Allowed and not denied.
    pub fn is_enabled(&self, tool: ToolName) -> bool {
        self.allow.contains(&tool) && !self.deny.contains(&tool)
    }

    /// The enabled tools, in [`ToolName::ALL`] order.
    pub fn enabled(&self) -> Vec<ToolName> {
        ToolName::ALL
            .into_iter()
            .filter(|t| self.is_enabled(*t))
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ExecConfig {
    /// Default `allowlist`.
    pub security: ExecSecurity,
    pub safe_bins: Vec<String>,
    /// Programs of `safeBins` the project has not vetted and the operator vouches for (they
    /// checked it cannot run other programs or write files). Default empty.
    pub vouched_bins: Vec<String>,
    pub blocked_bins: Vec<String>,
    /// Default 30.
    pub timeout_seconds: u64,
    /// Default 300.
    pub max_timeout_seconds: u64,
}

impl Default for ExecConfig {
    fn default() -> Self {
        let strings = |items: &[&str]| items.iter().map(|s| (*s).to_string()).collect();
        ExecConfig {
            security: ExecSecurity::Allowlist,
            safe_bins: strings(moltmate_core::allowlist::DEFAULT_SAFE_BINS),
            vouched_bins: Vec::new(),
            blocked_bins: strings(&["curl", "wget", "nc", "ssh", "sudo", "su", "mount", "docker"]),
            timeout_seconds: 30,
            max_timeout_seconds: 300,
        }
    }
}

impl ExecConfig {
    /// Core's exec policy settings.
    pub fn to_core(&self) -> ExecSettings {
        ExecSettings {
            security: self.security,
            safe_bins: self.safe_bins.clone(),
            vouched_bins: self.vouched_bins.clone(),
            blocked_bins: self.blocked_bins.clone(),
            default_timeout: Duration::from_secs(self.timeout_seconds),
            max_timeout: Duration::from_secs(self.max_timeout_seconds),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct WebToolsConfig {
    pub fetch: WebFetchConfig,
    pub search: WebSearchConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct WebFetchConfig {
    /// Default true.
    pub enabled: bool,
    /// `None` (default): any public host. `Some(list)`: only these hosts.
    pub allowed_domains: Option<Vec<String>>,
    /// Destination ports that may be fetched from (first URL and every redirect). Default
    /// `[80, 443]`.
    pub allowed_ports: Vec<u16>,
    /// Default 1048576.
    pub max_bytes: u64,
    /// Default 20.
    pub timeout_seconds: u64,
}

impl Default for WebFetchConfig {
    fn default() -> Self {
        WebFetchConfig {
            enabled: true,
            allowed_domains: None,
            allowed_ports: vec![80, 443],
            max_bytes: 1_048_576,
            timeout_seconds: 20,
        }
    }
}

/// The search service behind `web_search`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchProvider {
    /// The Brave Search API (`X-Subscription-Token`). Default.
    #[default]
    Brave,
    /// A SearXNG instance's JSON API (`/search?format=json`), usually self-hosted.
    Searxng,
}

impl SearchProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            SearchProvider::Brave => "brave",
            SearchProvider::Searxng => "searxng",
        }
    }

    /// The base URL used when `baseUrl` is not set; SearXNG has none (it is self-hosted).
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            SearchProvider::Brave => Some("https://api.search.brave.com/res/v1"),
            SearchProvider::Searxng => None,
        }
    }
}

/// `tools.web.search`: the `web_search` tool.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct WebSearchConfig {
    /// Default false: searching needs a key (Brave) or an instance (SearXNG), so it is off until
    /// the operator configures one. Off, `web_search` is offered to nobody.
    pub enabled: bool,
    /// Default `brave`.
    pub provider: SearchProvider,
    /// Brave: default `https://api.search.brave.com/res/v1`. SearXNG: required, the instance's
    /// root (`http://127.0.0.1:8080`).
    pub base_url: Option<String>,
    /// Brave only. Default: `BRAVE_API_KEY` from the environment.
    pub api_key: Option<Secret>,
    /// Results returned at most per search, 1 to 20. Default 5.
    pub max_results: u64,
    /// The whole search (connect, a rate-limit wait, the answer) must finish within this, 1 to
    /// 60. Default 10.
    pub timeout_seconds: u64,
    /// Searches one user may run per hour, 1 to 10000. Default 60: the service's quota and
    /// rate limit are shared by everyone.
    pub per_user_per_hour: u64,
}

impl Default for WebSearchConfig {
    fn default() -> Self {
        WebSearchConfig {
            enabled: false,
            provider: SearchProvider::Brave,
            base_url: None,
            api_key: None,
            max_results: 5,
            timeout_seconds: 10,
            per_user_per_hour: 60,
        }
    }
}

impl WebSearchConfig {
    /// `baseUrl`, or the provider's public endpoint.
    pub fn effective_base_url(&self) -> Option<String> {
        self.base_url
            .clone()
            .or_else(|| self.provider.default_base_url().map(str::to_string))
    }
}

// ---------------------------------------------------------------------------------------------
// logging, onboarding, session

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LoggingConfig {
    /// A tracing filter: a level (`info`) or directives (`info,moltmate_gateway=debug`).
    pub level: String,
    /// Log each tool call (names and outcomes, not contents). Default false.
    pub tools: bool,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".to_string(),
            tools: false,
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct OnboardingConfig {
    /// Default true.
    pub enabled: bool,
    /// Default `en`.
    pub language: String,
    /// Default `cami`.
    pub default_persona: String,
}

impl Default for OnboardingConfig {
    fn default() -> Self {
        OnboardingConfig {
            enabled: true,
            language: "en".to_string(),
            default_persona: "cami".to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionConfig {
    /// Start a fresh session after this much silence. Default: never.
    pub idle_reset_minutes: Option<u64>,
    /// Compact the conversation when it fills this share of the context window. Default 0.8.
    pub compact_at_ratio: f64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_reset_minutes: None,
            compact_at_ratio: 0.8,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// families and users

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct FamilyConfig {
    /// Member user ids. A user may be in at most one family, so what a member's assistant may
    /// see of the family is never ambiguous; loading refuses a user listed in two.
    pub members: Vec<UserId>,
    /// What the members may use together per day / month. Default unlimited.
    pub budget: crate::limits::BudgetConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct UserConfig {
    /// `channel:peer` identities that are this user, e.g. `telegram:123456`.
    pub identities: Vec<Identity>,
    /// Default: the channel's `defaultTrust`.
    pub trust: Option<TrustLevel>,
    pub display_name: Option<String>,
    pub persona: Option<String>,
    /// IANA time zone the user's reminders are meant in (`Europe/Berlin`). Default: the
    /// server's time zone.
    pub timezone: Option<String>,
    /// Where reminders are delivered. Default: the channel the user last wrote from.
    pub preferred_channel: Option<moltmate_core::ChannelKind>,
}

// ---------------------------------------------------------------------------------------------
// field deserializers with operator-friendly expectations

fn de_port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = u16;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number from 1 to 65535")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u16, E> {
            u16::try_from(v)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u16, E> {
            Err(E::invalid_value(de::Unexpected::Signed(v), &self))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u16, E> {
            Err(E::invalid_value(de::Unexpected::Float(v), &self))
        }
    }
    d.deserialize_u64(V)
}

fn de_ip<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = IpAddr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an IP address such as \"127.0.0.1\", \"0.0.0.0\" or \"::1\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<IpAddr, E> {
            v.parse()
                .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
        }
    }
    d.deserialize_str(V)
}

fn de_ip_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<IpAddr>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of IP addresses such as [\"127.0.0.1\", \"172.18.0.2\"]")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<IpAddr>, A::Error> {
            let mut out = Vec::new();
            while let Some(text) = seq.next_element::<String>()? {
                let ip = text.parse().map_err(|_| {
                    de::Error::invalid_value(
                        de::Unexpected::Str(&text),
                        &"an IP address (ranges are not supported)",
                    )
                })?;
                out.push(ip);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

/// Telegram ids are numbers, but people write them as strings too; store strings.
fn de_allow_from<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Entry(String);
    impl<'de> Deserialize<'de> for Entry {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Entry;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a Telegram user id (number or string) or \"*\"")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Entry, E> {
                    Ok(Entry(v.to_string()))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Entry, E> {
                    Ok(Entry(v.to_string()))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Entry, E> {
                    Ok(Entry(v.to_string()))
                }
            }
            d.deserialize_any(V)
        }
    }
    let entries = Vec::<Entry>::deserialize(d)?;
    Ok(entries.into_iter().map(|e| e.0).collect())
}
