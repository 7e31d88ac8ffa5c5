//! Configuration of the Moltmates gateway: the only crate that knows the format of
//! `<home>/moltmate.json`.
//!
//! Loading is a pipeline that either yields a complete [`Config`] or one [`ConfigError`] naming
//! the file, the key path and what was expected — the gateway never starts half-configured:
//!
//! 1. read the file (missing file = every default);
//! 2. parse it as JSON5 (comments, trailing commas, unquoted keys), refusing duplicate keys;
//! 3. substitute `${VAR}` in every string from the given environment lookup (`$${X}` is a
//!    literal `${X}`; a missing variable is an error);
//! 4. deserialize into typed sections, refusing unknown keys (with a "did you mean" suggestion)
//!    and wrong types;
//! 5. check the rules types cannot express (see [`validate`]).
//!
//! Secrets are held in [`Secret`], whose `Debug`/`Display` print `<redacted>`, so the whole
//! `Config` can be logged with `{:?}`.

mod de;
mod env;
mod error;
mod limits;
mod redact;
mod scan;
mod schema;
mod secret;
mod starter;
mod strict;
mod validate;

pub use error::{ConfigError, Problem};
pub use limits::{
    Allowance, BudgetConfig, EffectiveLimits, LevelLimits, LimitsConfig, PriceConfig,
    TrustLimitsConfig,
};
pub use redact::{redact_secrets, Redacted};
pub use scan::{is_secret_key, scan_raw, RawScan};
pub use schema::{
    ChannelsConfig, Config, DiscordConfig, DmPolicy, ExecConfig, FamilyConfig, GatewayAuthConfig,
    GatewayConfig, GroupsConfig, LocalChannelConfig, LogFormat, LoggingConfig, ModelConfig,
    ModelRef, OnboardingConfig, ProviderApi, ProviderConfig, RateLimitConfig, ResolvedProvider,
    SandboxBackend, SandboxConfig, SandboxLimitsConfig, SandboxMode, SandboxPruneConfig,
    SandboxScope, SandboxTotalConfig, SessionConfig, SlackConfig, SlackMode, TelegramConfig,
    ToolName, ToolsConfig, TrustLevel, UidRangeConfig, UserConfig, WebChannelConfig,
    WebFetchConfig, WebToolsConfig,
};
pub use schema::{SearchProvider, WebSearchConfig};
pub use secret::Secret;
pub use starter::{write_starter_config, STARTER_CONFIG};

use moltmate_core::{ChannelKind, Identity, UserId};
use schema::EnvKeys;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// File name of the configuration inside the home.
pub const CONFIG_FILE_NAME: &str = "moltmate.json";

/// The environment variable `web_search` takes its Brave key from when `apiKey` is not set.
pub const BRAVE_KEY_ENV_VAR: &str = "BRAVE_API_KEY";

/// Configuration files larger than this are refused rather than read into memory.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The Moltmates home: `--home` if given, else `MOLTMATE_HOME`, else `$HOME/.moltmate`.
/// Reads the process environment; see [`resolve_home_with`] for an injectable lookup.
pub fn resolve_home(cli_override: Option<&Path>) -> Result<PathBuf, ConfigError> {
    resolve_home_with(cli_override, &|name| std::env::var(name).ok())
}

/// [`resolve_home`] with an explicit environment lookup. Empty variables count as unset.
pub fn resolve_home_with(
    cli_override: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PathBuf, ConfigError> {
    if let Some(path) = cli_override {
        return Ok(path.to_path_buf());
    }
    let non_empty = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(home) = non_empty("MOLTMATE_HOME") {
        return Ok(PathBuf::from(home));
    }
    if let Some(home) = non_empty("HOME") {
        return Ok(PathBuf::from(home).join(".moltmate"));
    }
    Err(ConfigError::NoHome)
}

impl Config {
    /// Loads `<home>/moltmate.json`. A missing file yields the defaults (still validated, and
    /// still picking up provider keys from `env`).
    pub fn load(home: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::load_file(&home.join(CONFIG_FILE_NAME), env)
    }

    /// Loads one configuration file; a missing file yields the defaults.
    pub fn load_file(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        // O_NONBLOCK: a FIFO in the config's place is refused below instead of blocking the
        // open until some writer appears (reads of a regular file are unaffected).
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Config::from_value(
                    Value::Object(serde_json::Map::new()),
                    &path.display().to_string(),
                    env,
                );
            }
            Err(err) => return Err(read_error(err)),
        };
        let metadata = file.metadata().map_err(read_error)?;
        if !metadata.is_file() {
            return Err(read_error(std::io::Error::other("not a regular file")));
        }
        let mode = std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o7777;
        if mode & 0o002 != 0 {
            return Err(ConfigError::InsecurePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(read_error(std::io::Error::other(format!(
                "larger than {MAX_CONFIG_BYTES} bytes"
            ))));
        }
        Config::from_json5_str(&text, &path.display().to_string(), env)
    }

    /// Parses configuration text. `source_name` (usually the file path) prefixes every error.
    pub fn from_json5_str(
        text: &str,
        source_name: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let value = parse_json5(text, source_name)?;
        Config::from_value(value, source_name, env)
    }

    fn from_value(
        mut value: Value,
        source_name: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let invalid = |(key, problem): (String, Problem)| ConfigError::Invalid {
            file: source_name.to_string(),
            key,
            problem,
        };
        env::substitute(&mut value, env).map_err(invalid)?;
        let mut config: Config = de::deserialize_typed(value).map_err(invalid)?;
        let key_from_env = |name: &str| env(name).filter(|k| !k.is_empty()).map(Secret::new);
        // Before validation: whether `web_search` has a key depends on the environment too.
        config.env_keys = EnvKeys {
            anthropic: key_from_env(ProviderApi::Anthropic.key_env_var()),
            openai: key_from_env(ProviderApi::Openai.key_env_var()),
            brave: key_from_env(BRAVE_KEY_ENV_VAR),
        };
        validate::validate(&config).map_err(invalid)?;
        Ok(config)
    }

    /// Re-checks the semantic rules, e.g. after changing a loaded `Config` in code.
    /// `source_name` prefixes the error like a file name would.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        validate::validate(self).map_err(|(key, problem)| ConfigError::Invalid {
            file: source_name.to_string(),
            key,
            problem,
        })
    }

    /// Every usable provider: the configured ones plus the builtins `anthropic` and `openai`
    /// (unless configured under those names), with effective base URL and key. Sorted by name.
    pub fn resolved_providers(&self) -> Vec<ResolvedProvider> {
        let mut out: Vec<ResolvedProvider> = self
            .providers
            .iter()
            .filter_map(|(name, provider)| {
                // Validation guarantees `api` or a builtin name; filter_map keeps a hand-built
                // Config that breaks this from panicking.
                let api = provider.api.or_else(|| ProviderApi::builtin(name))?;
                Some(ResolvedProvider {
                    name: name.clone(),
                    api,
                    base_url: provider
                        .base_url
                        .clone()
                        .unwrap_or_else(|| api.default_base_url().to_string()),
                    api_key: provider.api_key.clone().or_else(|| self.env_key(api)),
                })
            })
            .collect();
        for api in [ProviderApi::Anthropic, ProviderApi::Openai] {
            if !self.providers.contains_key(api.as_str()) {
                out.push(ResolvedProvider {
                    name: api.as_str().to_string(),
                    api,
                    base_url: api.default_base_url().to_string(),
                    api_key: self.env_key(api),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One resolved provider by name (`model.primary.provider`, a fallback's provider).
    pub fn resolved_provider(&self, name: &str) -> Option<ResolvedProvider> {
        self.resolved_providers()
            .into_iter()
            .find(|p| p.name == name)
    }

    /// The key `web_search` sends to Brave: `tools.web.search.apiKey`, else `BRAVE_API_KEY`.
    /// `None` for SearXNG, which takes none.
    pub fn web_search_api_key(&self) -> Option<Secret> {
        let search = &self.tools.web.search;
        match search.provider {
            SearchProvider::Brave => search
                .api_key
                .clone()
                .or_else(|| self.env_keys.brave.clone()),
            SearchProvider::Searxng => None,
        }
    }

    fn env_key(&self, api: ProviderApi) -> Option<Secret> {
        match api {
            ProviderApi::Anthropic => self.env_keys.anthropic.clone(),
            ProviderApi::Openai => self.env_keys.openai.clone(),
        }
    }

    /// The configured user an identity belongs to (`users.<id>.identities`).
    pub fn user_for_identity(&self, identity: &Identity) -> Option<&UserId> {
        self.users
            .iter()
            .find(|(_, u)| u.identities.contains(identity))
            .map(|(id, _)| id)
    }

    /// The family a user belongs to (at most one; see the `validate` module doc).
    pub fn family_of(&self, user: &UserId) -> Option<&str> {
        self.families
            .iter()
            .find(|(_, f)| f.members.contains(user))
            .map(|(name, _)| name.as_str())
    }

    /// A user's trust: `users.<id>.trust` if set, else the default of the channel they came
    /// through (`stranger` for channels without their own setting).
    pub fn trust_of(&self, user: &UserId, channel: ChannelKind) -> TrustLevel {
        if let Some(trust) = self.users.get(user).and_then(|u| u.trust) {
            return trust;
        }
        match channel {
            ChannelKind::Telegram => self.channels.telegram.default_trust,
            ChannelKind::Web => self.channels.web.default_trust,
            ChannelKind::Local => self.channels.local.default_trust,
            ChannelKind::Signal => self.channels.signal.default_trust,
            ChannelKind::Whatsapp => self.channels.whatsapp.default_trust,
            ChannelKind::Discord => self.channels.discord.default_trust,
            ChannelKind::Slack => self.channels.slack.default_trust,
        }
    }

    /// A stable SHA-256 hex digest of the settings that shape a sandbox (everything under
    /// `sandbox` except `prewarm`, `warmPool` and `prune`, which only decide when and how long).
    /// A sandbox created under a different digest is stale and should be recreated.
    pub fn digest_of_sandbox_section(&self) -> String {
        let s = &self.sandbox;
        let relevant = serde_json::json!({
            "version": 1,
            "backend": s.backend,
            "mode": s.mode,
            "scope": s.scope,
            "workspaceAccess": s.workspace_access,
            "network": s.network,
            "allowedDomains": s.allowed_domains,
            "image": s.image,
            "dockerHost": s.docker_host,
            "dangerouslyAllowHostExec": s.dangerously_allow_host_exec,
            "limits": s.limits,
        });
        let mut canonical = String::new();
        write_canonical(&relevant, &mut canonical);
        hex::encode(Sha256::digest(canonical.as_bytes()))
    }
}

/// Parses JSON5 text into an untyped tree: byte-order mark skipped, nesting bounded, duplicate
/// keys refused. No substitution, no schema.
pub(crate) fn parse_json5(text: &str, source_name: &str) -> Result<Value, ConfigError> {
    // Editors on some platforms prepend a byte-order mark; it is not JSON5 whitespace.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Some((line, column)) = strict::too_deep(text) {
        return Err(ConfigError::Syntax {
            file: source_name.to_string(),
            line: Some(line),
            column: Some(column),
            message: format!("nested deeper than {} levels", strict::MAX_DEPTH),
        });
    }
    let strict::StrictValue(value) = json5::from_str(text).map_err(|err| {
        let position = err.position();
        ConfigError::Syntax {
            file: source_name.to_string(),
            line: position.map(|p| p.line + 1),
            column: position.map(|p| p.column + 1),
            message: match err.code() {
                Some(code) => code.to_string(),
                None => strip_position(&err.to_string()),
            },
        }
    })?;
    Ok(value)
}

/// JSON with object keys sorted at every level, so the digest does not depend on whether
/// `serde_json` was built with `preserve_order` somewhere in the workspace.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(item) = map.get(key) {
                    write_canonical(item, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// json5's custom messages end in " at line L column C"; the position is reported separately.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(pos) => message[..pos].to_string(),
        None => message.to_string(),
    }
}
