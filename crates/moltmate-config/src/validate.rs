//! Semantic rules that types alone cannot express: cross-references (model -> provider,
//! family -> users), consent flags for dangerous settings, ranges. Runs after typed
//! deserialization; the first broken rule, in file order of sections, is reported with its key.
//!
//! One family per user: a family shares a folder and what members' assistants may know about
//! each other. If a user could be in two families, "what does this member's assistant see" would
//! depend on which family the request came through, so such a file is refused.

use crate::error::{suggest, Problem};
use crate::limits::Allowance;
use crate::schema::{
    Config, DmPolicy, ProviderApi, SandboxMode, SearchProvider, SlackMode, TrustLevel,
};
use moltmate_core::{Identity, PeerId, UserId};
use std::collections::BTreeMap;

type Failure = (String, Problem);

fn rule(key: impl Into<String>, text: impl Into<String>) -> Failure {
    (key.into(), Problem::Rule(text.into()))
}

fn positive(key: &str, value: u64) -> Result<(), Failure> {
    if value == 0 {
        Err(rule(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

pub(crate) fn validate(config: &Config) -> Result<(), Failure> {
    gateway(config)?;
    providers(config)?;
    model(config)?;
    channels(config)?;
    discord_and_slack(config)?;
    sandbox(config)?;
    tools(config)?;
    misc(config)?;
    limits(config)?;
    families(config)?;
    users(config)?;
    attachments(config)?;
    Ok(())
}

fn attachments(config: &Config) -> Result<(), Failure> {
    let a = &config.attachments;
    in_range("attachments.maxMb", a.max_mb, 1, 50)?;
    in_range(
        "attachments.maxPerMessage",
        u64::from(a.max_per_message),
        1,
        10,
    )?;
    in_range("attachments.timeoutSeconds", a.timeout_seconds, 1, 600)?;
    in_range(
        "attachments.downloads.expireDays",
        a.downloads.expire_days,
        1,
        90,
    )?;
    in_range(
        "attachments.downloads.maxFilesPerUser",
        a.downloads.max_files_per_user,
        1,
        1000,
    )?;
    in_range(
        "attachments.downloads.maxMbPerUser",
        a.downloads.max_mb_per_user,
        1,
        10_000,
    )?;
    in_range(
        "attachments.downloads.maxMbTotal",
        a.downloads.max_mb_total,
        1,
        1_000_000,
    )?;
    for (index, entry) in config.model.vision.iter().enumerate() {
        let ok = entry.split_once('/').is_some_and(|(p, m)| {
            !p.is_empty() && !m.is_empty() && !entry.contains(char::is_whitespace)
        });
        if !ok {
            return Err(rule(
                format!("model.vision[{index}]"),
                "must be \"provider/model\" or \"provider/*\"",
            ));
        }
    }
    if let Some(speech) = &config.speech {
        let url = url::Url::parse(&speech.base_url)
            .map_err(|e| rule("speech.baseUrl", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(rule("speech.baseUrl", "must be http or https"));
        }
        if speech.model.trim().is_empty() {
            return Err(rule("speech.model", "must not be empty"));
        }
        in_range("speech.maxMb", speech.max_mb, 1, 25)?;
        in_range("speech.maxSeconds", speech.max_seconds, 1, 3600)?;
        in_range("speech.timeoutSeconds", speech.timeout_seconds, 1, 600)?;
    }
    Ok(())
}

fn gateway(config: &Config) -> Result<(), Failure> {
    let g = &config.gateway;
    if let Some(token) = &g.auth.token {
        // Length only: the value itself never appears in an error.
        if token.expose().chars().count() < 16 {
            return Err(rule(
                "gateway.auth.token",
                "too short; use at least 16 random characters",
            ));
        }
    } else if !g.bind.is_loopback() {
        return Err(rule(
            "gateway.auth.token",
            format!(
                "required because gateway.bind ({}) is not a loopback address; anyone who can reach the port could otherwise use the gateway",
                g.bind
            ),
        ));
    }
    positive(
        "gateway.rateLimit.perMinute",
        u64::from(g.rate_limit.per_minute),
    )?;
    positive("gateway.rateLimit.burst", u64::from(g.rate_limit.burst))?;
    positive(
        "gateway.rateLimit.unauthenticatedPerMinute",
        u64::from(g.rate_limit.unauthenticated_per_minute),
    )?;
    positive(
        "gateway.rateLimit.unauthenticatedBurst",
        u64::from(g.rate_limit.unauthenticated_burst),
    )?;
    if let Some(public) = &g.public_url {
        public_url(public)?;
    }
    Ok(())
}

fn public_url(text: &str) -> Result<(), Failure> {
    const KEY: &str = "gateway.publicUrl";
    let url = url::Url::parse(text).map_err(|e| {
        rule(
            KEY,
            format!("not a URL ({e}); expected e.g. \"https://chat.example.com\""),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(rule(KEY, "must start with https:// (or http://)"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(rule(KEY, "needs a host name"));
    }
    if url.port() == Some(0) {
        return Err(rule(KEY, "port 0 cannot be reached"));
    }
    if text.trim() != text || !text.contains("://") {
        return Err(rule(
            KEY,
            "write it plainly, like \"https://chat.example.com\"",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(rule(KEY, "must not contain a user name or password"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(rule(
            KEY,
            "must be an origin only, like \"https://chat.example.com\" (the web UI does not run under a path)",
        ));
    }
    Ok(())
}

fn valid_provider_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn valid_http_url(raw: &str) -> bool {
    url::Url::parse(raw).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

fn providers(config: &Config) -> Result<(), Failure> {
    for (name, provider) in &config.providers {
        let key = format!("providers.{name}");
        if !valid_provider_name(name) {
            return Err(rule(
                key,
                "provider names must be 1-64 characters of a-z, 0-9, '_' or '-'",
            ));
        }
        if provider.api.is_none() && ProviderApi::builtin(name).is_none() {
            return Err((
                format!("{key}.api"),
                Problem::Rule("required (\"anthropic\" or \"openai\") for a provider not named like a builtin".into()),
            ));
        }
        if let Some(url) = &provider.base_url {
            if !valid_http_url(url) {
                return Err(rule(
                    format!("{key}.baseUrl"),
                    format!("expected an http(s) URL, found {url:?}"),
                ));
            }
        }
        if provider.api_key.as_ref().is_some_and(|k| k.is_empty()) {
            return Err(rule(
                format!("{key}.apiKey"),
                "must not be empty (leave it out to use the environment)",
            ));
        }
    }
    Ok(())
}

fn provider_exists(config: &Config, name: &str) -> bool {
    config.providers.contains_key(name) || ProviderApi::builtin(name).is_some()
}

fn unknown_provider(config: &Config, key: String, name: &str) -> Failure {
    let mut known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
    for builtin in ["anthropic", "openai"] {
        if !known.contains(&builtin) {
            known.push(builtin);
        }
    }
    let suggestion = suggest(name, known.iter().copied());
    let mut text = format!(
        "provider {name:?} is neither configured under \"providers\" nor a builtin; known providers: {}",
        known.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
    );
    if let Some(s) = suggestion {
        text.push_str(&format!("; did you mean {s:?}?"));
    }
    rule(key, text)
}

fn model(config: &Config) -> Result<(), Failure> {
    let m = &config.model;
    if !provider_exists(config, &m.primary.provider) {
        return Err(unknown_provider(
            config,
            "model.primary".into(),
            &m.primary.provider,
        ));
    }
    for (i, fallback) in m.fallbacks.iter().enumerate() {
        if !provider_exists(config, &fallback.provider) {
            return Err(unknown_provider(
                config,
                format!("model.fallbacks[{i}]"),
                &fallback.provider,
            ));
        }
    }
    positive("model.maxToolIterations", u64::from(m.max_tool_iterations))?;
    positive("model.maxOutputTokens", u64::from(m.max_output_tokens))?;
    positive("model.requestTimeoutSeconds", m.request_timeout_seconds)?;
    positive(
        "model.contextWindowTokens",
        u64::from(m.context_window_tokens),
    )?;
    for (key, price) in &m.prices {
        let path = format!("model.prices.{key}");
        let valid_key = crate::schema::ModelRef::parse(key).is_some();
        if !valid_key {
            return Err(rule(
                path,
                "expected a \"provider/model\" key (or \"provider/*\" for every model of a provider)",
            ));
        }
        for (name, value) in [
            ("inputPerMTok", price.input_per_m_tok),
            ("outputPerMTok", price.output_per_m_tok),
        ] {
            if !(value.is_finite() && (0.0..=100_000.0).contains(&value)) {
                return Err(rule(
                    format!("{path}.{name}"),
                    "must be US dollars per million tokens, from 0 to 100000",
                ));
            }
        }
    }
    if m.max_output_tokens >= m.context_window_tokens {
        return Err(rule(
            "model.maxOutputTokens",
            format!(
                "must be smaller than model.contextWindowTokens ({})",
                m.context_window_tokens
            ),
        ));
    }
    Ok(())
}

fn channels(config: &Config) -> Result<(), Failure> {
    let t = &config.channels.telegram;
    if t.bot_token.as_ref().is_some_and(|k| k.is_empty()) {
        return Err(rule("channels.telegram.botToken", "must not be empty"));
    }
    if t.enabled == Some(true) && t.bot_token.is_none() {
        return Err(rule(
            "channels.telegram.botToken",
            "required when channels.telegram.enabled is true",
        ));
    }
    if !valid_http_url(&t.api_url) {
        return Err(rule(
            "channels.telegram.apiUrl",
            format!("expected an http(s) URL, found {:?}", t.api_url),
        ));
    }
    for (i, entry) in t.allow_from.iter().enumerate() {
        if entry != "*" && PeerId::new(entry.as_str()).is_err() {
            return Err(rule(
                format!("channels.telegram.allowFrom[{i}]"),
                format!("expected a Telegram user id or \"*\", found {entry:?}"),
            ));
        }
    }
    if t.dm_policy == DmPolicy::Open && !t.allow_from.iter().any(|e| e == "*") {
        return Err(rule(
            "channels.telegram.allowFrom",
            "dmPolicy \"open\" lets anyone on Telegram talk to the assistant; confirm by adding \"*\" to allowFrom",
        ));
    }
    if !(1..=600).contains(&t.poll_timeout_seconds) {
        return Err(rule(
            "channels.telegram.pollTimeoutSeconds",
            "must be from 1 to 600",
        ));
    }
    signal(&config.channels.signal)?;
    whatsapp(&config.channels.whatsapp)?;
    // Zero would give nobody a code, which is `allowlist`; say so rather than accept it.
    for (key, value) in [
        (
            "channels.signal.maxPendingPairings",
            config.channels.signal.max_pending_pairings,
        ),
        (
            "channels.whatsapp.maxPendingPairings",
            config.channels.whatsapp.max_pending_pairings,
        ),
        (
            "channels.maxPendingPairings",
            config.channels.max_pending_pairings,
        ),
        (
            "channels.telegram.maxPendingPairings",
            t.max_pending_pairings,
        ),
    ] {
        if value == 0 {
            return Err(rule(
                key,
                "must be at least 1 (to give unknown senders no code at all, use dmPolicy \"allowlist\")",
            ));
        }
    }
    Ok(())
}

/// `+`, 7 to 15 digits, the first not 0 (E.164).
fn is_e164(raw: &str) -> bool {
    raw.strip_prefix('+').is_some_and(|digits| {
        (7..=15).contains(&digits.len())
            && digits.chars().all(|c| c.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

fn whatsapp(w: &crate::schema::WhatsAppConfig) -> Result<(), Failure> {
    if let Some(id) = &w.phone_number_id {
        if id.is_empty() || id.len() > 32 || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(rule(
                "channels.whatsapp.phoneNumberId",
                "expected the numeric phone number id from the Meta app's API setup (not the phone number)",
            ));
        }
    }
    if w.is_enabled() {
        if w.phone_number_id.is_none() {
            return Err(rule(
                "channels.whatsapp.phoneNumberId",
                "required when channels.whatsapp.enabled is true",
            ));
        }
        for (key, value) in [
            ("channels.whatsapp.accessToken", &w.access_token),
            ("channels.whatsapp.appSecret", &w.app_secret),
            ("channels.whatsapp.verifyToken", &w.verify_token),
        ] {
            match value {
                None => {
                    return Err(rule(
                        key,
                        "required when WhatsApp is enabled (use \"${VAR}\")",
                    ))
                }
                Some(secret) if secret.is_empty() => return Err(rule(key, "must not be empty")),
                Some(_) => {}
            }
        }
    }
    if !valid_http_url(&w.api_url) {
        return Err(rule(
            "channels.whatsapp.apiUrl",
            format!("expected an http(s) URL, found {:?}", w.api_url),
        ));
    }
    if w.api_version.is_empty()
        || w.api_version.len() > 16
        || !w
            .api_version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.')
    {
        return Err(rule(
            "channels.whatsapp.apiVersion",
            "expected a version like \"v21.0\"",
        ));
    }
    for (i, entry) in w.allow_from.iter().enumerate() {
        if entry != "*" && !is_e164(entry) {
            return Err(rule(
                format!("channels.whatsapp.allowFrom[{i}]"),
                format!(
                    "expected a phone number like \"+4917012345678\" or \"*\", found {entry:?}"
                ),
            ));
        }
    }
    if w.dm_policy == DmPolicy::Open && !w.allow_from.iter().any(|e| e == "*") {
        return Err(rule(
            "channels.whatsapp.allowFrom",
            "dmPolicy \"open\" lets anyone on WhatsApp talk to the assistant; confirm by adding \"*\" to allowFrom",
        ));
    }
    Ok(())
}

/// The rules every direct-message channel shares (Discord, Slack): a set token is not empty,
/// `enabled: true` needs the first token, the API URL is http(s), `allowFrom` holds peer ids or
/// `"*"`, `open` is confirmed by `"*"`, and the pending-code cap is at least 1.
struct DmChannelRules<'a> {
    name: &'a str,
    service: &'a str,
    enabled: Option<bool>,
    tokens: &'a [(&'a str, Option<&'a crate::Secret>)],
    api_url: &'a str,
    allow_from: &'a [String],
    dm_policy: DmPolicy,
    max_pending_pairings: u32,
}

fn dm_channel(r: DmChannelRules<'_>) -> Result<(), Failure> {
    let name = r.name;
    for (key, token) in r.tokens {
        if token.is_some_and(|t| t.is_empty()) {
            return Err(rule(format!("channels.{name}.{key}"), "must not be empty"));
        }
    }
    if let Some((key, None)) = r.tokens.first() {
        if r.enabled == Some(true) {
            return Err(rule(
                format!("channels.{name}.{key}"),
                format!("required when channels.{name}.enabled is true"),
            ));
        }
    }
    if !valid_http_url(r.api_url) {
        return Err(rule(
            format!("channels.{name}.apiUrl"),
            format!("expected an http(s) URL, found {:?}", r.api_url),
        ));
    }
    for (i, entry) in r.allow_from.iter().enumerate() {
        if entry != "*" && PeerId::new(entry.as_str()).is_err() {
            return Err(rule(
                format!("channels.{name}.allowFrom[{i}]"),
                format!("expected a {} user id or \"*\", found {entry:?}", r.service),
            ));
        }
    }
    if r.dm_policy == DmPolicy::Open && !r.allow_from.iter().any(|e| e == "*") {
        return Err(rule(
            format!("channels.{name}.allowFrom"),
            format!(
                "dmPolicy \"open\" lets anyone on {} talk to the assistant; confirm by adding \"*\" to allowFrom",
                r.service
            ),
        ));
    }
    if r.max_pending_pairings == 0 {
        return Err(rule(
            format!("channels.{name}.maxPendingPairings"),
            "must be at least 1 (to give unknown senders no code at all, use dmPolicy \"allowlist\")",
        ));
    }
    Ok(())
}

fn signal(s: &crate::schema::SignalConfig) -> Result<(), Failure> {
    match &s.account {
        Some(account) if !is_e164(account) => {
            return Err(rule(
                "channels.signal.account",
                "expected a phone number in international format, e.g. \"+4917012345678\"",
            ))
        }
        None if s.enabled == Some(true) => {
            return Err(rule(
                "channels.signal.account",
                "required when channels.signal.enabled is true",
            ))
        }
        _ => {}
    }
    if s.cli_path.trim().is_empty() {
        return Err(rule("channels.signal.cliPath", "must not be empty"));
    }
    if let Some(dir) = &s.data_dir {
        if !dir.is_absolute() {
            return Err(rule("channels.signal.dataDir", "must be an absolute path"));
        }
    }
    if let Some(daemon) = &s.daemon {
        let d = daemon.trim();
        let ok = if let Some(path) = d.strip_prefix("unix:") {
            path.starts_with('/') && path.len() < 108
        } else if let Some(hp) = d.strip_prefix("tcp:") {
            hp.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        } else {
            false
        };
        if !ok {
            return Err(rule(
                "channels.signal.daemon",
                "expected \"unix:/absolute/socket/path\" or \"tcp:host:port\"",
            ));
        }
    }
    if s.device_name.is_empty()
        || s.device_name.chars().count() > 50
        || s.device_name.chars().any(char::is_control)
    {
        return Err(rule(
            "channels.signal.deviceName",
            "must be 1 to 50 characters without control characters",
        ));
    }
    for (i, entry) in s.allow_from.iter().enumerate() {
        if entry != "*" && !is_e164(entry) {
            return Err(rule(
                format!("channels.signal.allowFrom[{i}]"),
                format!(
                    "expected a phone number like \"+4917012345678\" or \"*\", found {entry:?}"
                ),
            ));
        }
    }
    if s.dm_policy == DmPolicy::Open && !s.allow_from.iter().any(|e| e == "*") {
        return Err(rule(
            "channels.signal.allowFrom",
            "dmPolicy \"open\" lets anyone on Signal talk to the assistant; confirm by adding \"*\" to allowFrom",
        ));
    }
    Ok(())
}

fn discord_and_slack(config: &Config) -> Result<(), Failure> {
    let d = &config.channels.discord;
    dm_channel(DmChannelRules {
        name: "discord",
        service: "Discord",
        enabled: d.enabled,
        tokens: &[("botToken", d.bot_token.as_ref())],
        api_url: &d.api_url,
        allow_from: &d.allow_from,
        dm_policy: d.dm_policy,
        max_pending_pairings: d.max_pending_pairings,
    })?;
    for (i, entry) in d.allow_from.iter().enumerate() {
        let id = entry
            .strip_prefix(moltmate_core::ids::GROUP_PEER_PREFIX)
            .unwrap_or(entry);
        let snowflake = !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit());
        if entry != "*" && !snowflake {
            return Err(rule(
                format!("channels.discord.allowFrom[{i}]"),
                format!("expected a Discord user id (digits, as a string), \"group/<channel id>\" or \"*\", found {entry:?}"),
            ));
        }
    }
    let s = &config.channels.slack;
    dm_channel(DmChannelRules {
        name: "slack",
        service: "Slack",
        enabled: s.enabled,
        tokens: &[
            ("botToken", s.bot_token.as_ref()),
            ("appToken", s.app_token.as_ref()),
            ("signingSecret", s.signing_secret.as_ref()),
        ],
        api_url: &s.api_url,
        allow_from: &s.allow_from,
        dm_policy: s.dm_policy,
        max_pending_pairings: s.max_pending_pairings,
    })?;
    match s.mode {
        SlackMode::Socket => {
            if s.is_enabled() && s.app_token.is_none() {
                return Err(rule(
                    "channels.slack.appToken",
                    "required: Socket Mode needs an app-level token (\"xapp-...\" with connections:write)",
                ));
            }
            if s.signing_secret.is_some() {
                return Err(rule(
                    "channels.slack.signingSecret",
                    "only used with mode \"events\" (Socket Mode needs no signing secret); set mode: \"events\" or remove it",
                ));
            }
        }
        SlackMode::Events => {
            if s.is_enabled() && s.signing_secret.is_none() {
                return Err(rule(
                    "channels.slack.signingSecret",
                    "required with mode \"events\": every request from Slack is checked against it (Basic Information → App Credentials → Signing Secret)",
                ));
            }
            if s.app_token.is_some() {
                return Err(rule(
                    "channels.slack.appToken",
                    "only used with mode \"socket\"; remove it, or set mode: \"socket\"",
                ));
            }
            if let Some(secret) = &s.signing_secret {
                let v = secret.expose();
                if !(16..=128).contains(&v.len()) || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(rule(
                        "channels.slack.signingSecret",
                        "expected Slack's signing secret (32 hex digits), not the client secret or a token",
                    ));
                }
            }
        }
    }
    for (i, entry) in s.allow_from.iter().enumerate() {
        let id = entry
            .strip_prefix(moltmate_core::ids::GROUP_PEER_PREFIX)
            .unwrap_or(entry);
        if entry != "*" && !id.contains('/') {
            return Err(rule(
                format!("channels.slack.allowFrom[{i}]"),
                format!("expected \"<team id>/<user id>\" (e.g. \"T0123/U0456\"), \"group/<team>/<channel>\" or \"*\", found {entry:?}"),
            ));
        }
    }
    Ok(())
}

/// A host name (`example.com`) or a wildcard for its subdomains (`*.example.com`).
fn valid_domain(raw: &str) -> bool {
    let host = raw.strip_prefix("*.").unwrap_or(raw);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

fn domains(key: &str, list: &[String]) -> Result<(), Failure> {
    for (i, domain) in list.iter().enumerate() {
        if !valid_domain(domain) {
            return Err(rule(
                format!("{key}[{i}]"),
                format!("expected a lowercase host name like \"example.com\" or \"*.example.com\", found {domain:?}"),
            ));
        }
    }
    Ok(())
}

fn sandbox(config: &Config) -> Result<(), Failure> {
    let s = &config.sandbox;
    if s.mode == SandboxMode::None && !s.dangerously_allow_host_exec {
        return Err(rule(
            "sandbox.mode",
            "\"none\" runs the assistant's commands directly on this machine; it requires sandbox.dangerouslyAllowHostExec: true",
        ));
    }
    domains("sandbox.allowedDomains", &s.allowed_domains)?;
    ports("sandbox.allowedPorts", &s.allowed_ports)?;
    if s.image.trim().is_empty() {
        return Err(rule("sandbox.image", "must not be empty"));
    }
    if s.docker_host.as_ref().is_some_and(|h| h.trim().is_empty()) {
        return Err(rule(
            "sandbox.dockerHost",
            "must not be empty (leave it out for the default)",
        ));
    }
    let l = &s.limits;
    positive("sandbox.limits.memoryMb", l.memory_mb)?;
    if !(l.cpus.is_finite() && l.cpus > 0.0 && l.cpus <= 1024.0) {
        return Err(rule(
            "sandbox.limits.cpus",
            "must be a number greater than 0 and at most 1024",
        ));
    }
    if (l.cpus * 1000.0).round() < 1.0 {
        return Err(rule("sandbox.limits.cpus", "must be at least 0.001"));
    }
    positive("sandbox.limits.pids", u64::from(l.pids))?;
    positive("sandbox.limits.diskMb", l.disk_mb)?;
    positive("sandbox.limits.tmpMb", l.tmp_mb)?;
    positive("sandbox.limits.outputKb", l.output_kb)?;
    // Keeps the byte conversions in `to_core` far from overflow (1 PiB).
    for (key, mb) in [
        ("memoryMb", l.memory_mb),
        ("diskMb", l.disk_mb),
        ("tmpMb", l.tmp_mb),
    ] {
        if mb > 1 << 30 {
            return Err(rule(
                format!("sandbox.limits.{key}"),
                "is implausibly large (more than 1 PiB)",
            ));
        }
    }
    if l.output_kb > 1 << 20 {
        return Err(rule(
            "sandbox.limits.outputKb",
            "is implausibly large (more than 1 GiB)",
        ));
    }
    positive("sandbox.prune.idleMinutes", s.prune.idle_minutes)?;
    if let Some(problem) = s.uid_range.to_core().problem() {
        return Err(rule("sandbox.uidRange", problem));
    }
    if !(1..=10_000).contains(&s.max_active) {
        return Err(rule("sandbox.maxActive", "must be between 1 and 10000"));
    }
    if !(1..=3600).contains(&s.queue_timeout_seconds) {
        return Err(rule(
            "sandbox.queueTimeoutSeconds",
            "must be between 1 and 3600",
        ));
    }
    sandbox_total(s)
}

/// `sandbox.total`: plausible, and room for at least one sandbox of `sandbox.limits`.
fn sandbox_total(s: &crate::schema::SandboxConfig) -> Result<(), Failure> {
    let (t, l) = (&s.total, &s.limits);
    if let Some(mb) = t.memory_mb {
        if !(64..=1 << 30).contains(&mb) {
            return Err(rule(
                "sandbox.total.memoryMb",
                "must be between 64 and 1073741824 (1 PiB); leave it out to derive it from the host",
            ));
        }
        if mb < l.memory_mb {
            return Err(rule(
                "sandbox.total.memoryMb",
                format!("is {mb}, less than one sandbox's sandbox.limits.memoryMb ({}); raise it or lower that", l.memory_mb),
            ));
        }
    }
    if let Some(cpus) = t.cpus {
        if !(cpus.is_finite() && (0.01..=1024.0).contains(&cpus)) {
            return Err(rule(
                "sandbox.total.cpus",
                "must be a number between 0.01 and 1024; leave it out to derive it from the host",
            ));
        }
        if cpus < l.cpus {
            return Err(rule(
                "sandbox.total.cpus",
                format!("is {cpus}, less than one sandbox's sandbox.limits.cpus ({}); raise it or lower that", l.cpus),
            ));
        }
    }
    if let Some(pids) = t.pids {
        if !(16..=4_194_304).contains(&pids) {
            return Err(rule("sandbox.total.pids", "must be between 16 and 4194304"));
        }
        if pids < u64::from(l.pids) {
            return Err(rule(
                "sandbox.total.pids",
                format!("is {pids}, less than one sandbox's sandbox.limits.pids ({}); raise it or lower that", l.pids),
            ));
        }
    }
    if !moltmate_core::sandbox::valid_cgroup_name(&t.cgroup) {
        return Err(rule(
            "sandbox.total.cgroup",
            format!("expected a lowercase letter, then lowercase letters, digits or '_' (at most 64, no '-' or '/'), found {:?}", t.cgroup),
        ));
    }
    Ok(())
}

fn bins(key: &str, list: &[String]) -> Result<(), Failure> {
    for (i, bin) in list.iter().enumerate() {
        let ok = !bin.is_empty()
            && !bin.contains('/')
            && !bin.chars().any(|c| c.is_whitespace() || c.is_control());
        if !ok {
            return Err(rule(
                format!("{key}[{i}]"),
                format!("expected a program name without '/' or spaces, found {bin:?}"),
            ));
        }
    }
    Ok(())
}

/// `safeBins` may not hold a program that runs other programs or writes files: under
/// `allowlist` such a program would be a shell by another name (`awk 'BEGIN{system("id")}'`).
/// A known runner or writer is refused outright; any other name must be in the project's
/// vetted table or in `vouchedBins` (the operator's explicit word), which itself may only
/// name programs of `safeBins` and never a known runner.
fn safe_bins(
    key: &str,
    list: &[String],
    vouched_key: &str,
    vouched: &[String],
) -> Result<(), Failure> {
    for (i, bin) in vouched.iter().enumerate() {
        if let Some(why) = moltmate_core::allowlist::refused_safe_bin(bin) {
            return Err(rule(
                format!("{vouched_key}[{i}]"),
                format!("{bin:?} {why}; nobody can vouch for it (remove it; see README, \"The allowlist\")"),
            ));
        }
        if !list.contains(bin) {
            return Err(rule(
                format!("{vouched_key}[{i}]"),
                format!("{bin:?} is not in {key}; vouchedBins only confirms programs listed there"),
            ));
        }
    }
    for (i, bin) in list.iter().enumerate() {
        if let Some(why) = moltmate_core::allowlist::refused_safe_bin(bin) {
            return Err(rule(
                format!("{key}[{i}]"),
                format!("{bin:?} {why}; it cannot be allowlisted (remove it from the list; see README, \"The allowlist\")"),
            ));
        }
        if let Err(why) = moltmate_core::allowlist::safe_bin_verdict(bin, vouched) {
            return Err(rule(format!("{key}[{i}]"), format!("{bin:?} {why}")));
        }
    }
    Ok(())
}

fn ports(key: &str, list: &[u16]) -> Result<(), Failure> {
    if list.is_empty() {
        return Err(rule(key, "must list at least one port (e.g. [80, 443])"));
    }
    if let Some(i) = list.iter().position(|&p| p == 0) {
        return Err(rule(format!("{key}[{i}]"), "port 0 cannot be reached"));
    }
    Ok(())
}

fn tools(config: &Config) -> Result<(), Failure> {
    let t = &config.tools;
    let e = &t.exec;
    bins("tools.exec.safeBins", &e.safe_bins)?;
    bins("tools.exec.vouchedBins", &e.vouched_bins)?;
    safe_bins(
        "tools.exec.safeBins",
        &e.safe_bins,
        "tools.exec.vouchedBins",
        &e.vouched_bins,
    )?;
    bins("tools.exec.blockedBins", &e.blocked_bins)?;
    positive("tools.exec.timeoutSeconds", e.timeout_seconds)?;
    positive("tools.exec.maxTimeoutSeconds", e.max_timeout_seconds)?;
    if e.timeout_seconds > e.max_timeout_seconds {
        return Err(rule(
            "tools.exec.timeoutSeconds",
            format!(
                "must not exceed tools.exec.maxTimeoutSeconds ({})",
                e.max_timeout_seconds
            ),
        ));
    }
    let f = &t.web.fetch;
    if let Some(list) = &f.allowed_domains {
        domains("tools.web.fetch.allowedDomains", list)?;
    }
    ports("tools.web.fetch.allowedPorts", &f.allowed_ports)?;
    positive("tools.web.fetch.maxBytes", f.max_bytes)?;
    positive("tools.web.fetch.timeoutSeconds", f.timeout_seconds)?;
    web_search(config)
}

/// `tools.web.search`. Checked whether or not it is enabled (a file that is wrong stays
/// wrong when someone flips `enabled`), except the key, which only an enabled Brave search needs.
fn web_search(config: &Config) -> Result<(), Failure> {
    const KEY: &str = "tools.web.search";
    let s = &config.tools.web.search;
    in_range(&format!("{KEY}.maxResults"), s.max_results, 1, 20)?;
    in_range(&format!("{KEY}.timeoutSeconds"), s.timeout_seconds, 1, 60)?;
    in_range(
        &format!("{KEY}.perUserPerHour"),
        s.per_user_per_hour,
        1,
        10_000,
    )?;
    if s.api_key.as_ref().is_some_and(|k| k.is_empty()) {
        return Err(rule(format!("{KEY}.apiKey"), "must not be empty"));
    }
    match s.provider {
        SearchProvider::Brave => {}
        SearchProvider::Searxng => {
            if s.api_key.is_some() {
                return Err(rule(
                    format!("{KEY}.apiKey"),
                    "SearXNG takes no API key; remove apiKey (it is only for provider \"brave\")",
                ));
            }
            if s.base_url.is_none() {
                return Err(rule(
                    format!("{KEY}.baseUrl"),
                    "required for provider \"searxng\": the address of your instance, e.g. \"http://127.0.0.1:8080\"",
                ));
            }
        }
    }
    if let Some(base) = &s.base_url {
        search_base_url(&format!("{KEY}.baseUrl"), base, s.provider)?;
    }
    if s.enabled && s.provider == SearchProvider::Brave && config.web_search_api_key().is_none() {
        return Err(rule(
            format!("{KEY}.apiKey"),
            format!(
                "Brave Search needs an API key: set {} in the environment, or apiKey here (e.g. \"${{{}}}\")",
                crate::BRAVE_KEY_ENV_VAR,
                crate::BRAVE_KEY_ENV_VAR
            ),
        ));
    }
    Ok(())
}

/// A search service's base URL: operator config, so any host (a SearXNG next door is usually
/// on a private address), but only http(s), no credentials, no query; and a Brave key is never
/// sent unencrypted beyond this machine.
fn search_base_url(key: &str, text: &str, provider: SearchProvider) -> Result<(), Failure> {
    let url = url::Url::parse(text).map_err(|e| {
        rule(
            key,
            format!("not a URL ({e}); expected e.g. \"http://127.0.0.1:8080\""),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || !text.contains("://") {
        return Err(rule(key, "must start with https:// (or http://)"));
    }
    let Some(host) = url.host() else {
        return Err(rule(key, "needs a host name"));
    };
    if url.port() == Some(0) {
        return Err(rule(key, "port 0 cannot be reached"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(rule(
            key,
            "must not contain a user name or password (they would show wherever the URL does)",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(rule(key, "must not have a query (?...) or fragment (#...)"));
    }
    let loopback = match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    if provider == SearchProvider::Brave && url.scheme() == "http" && !loopback {
        return Err(rule(
            key,
            "the Brave API key would travel unencrypted; use https:// (http:// only for a loopback address)",
        ));
    }
    Ok(())
}

fn misc(config: &Config) -> Result<(), Failure> {
    if config.logging.level.trim().is_empty() {
        return Err(rule(
            "logging.level",
            "must not be empty (e.g. \"info\" or \"info,moltmate_gateway=debug\")",
        ));
    }
    if config.onboarding.language.trim().is_empty() {
        return Err(rule(
            "onboarding.language",
            "must not be empty (e.g. \"en\")",
        ));
    }
    if config.onboarding.default_persona.trim().is_empty() {
        return Err(rule("onboarding.defaultPersona", "must not be empty"));
    }
    if let Some(minutes) = config.session.idle_reset_minutes {
        positive("session.idleResetMinutes", minutes)?;
    }
    let ratio = config.session.compact_at_ratio;
    if !(ratio.is_finite() && ratio > 0.0 && ratio <= 1.0) {
        return Err(rule(
            "session.compactAtRatio",
            "must be greater than 0 and at most 1",
        ));
    }
    Ok(())
}

fn in_range(key: &str, value: u64, min: u64, max: u64) -> Result<(), Failure> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(rule(key, format!("must be from {min} to {max}")))
    }
}

/// Budgets: whole numbers up to 10^12, dollars up to 10^9 (keeps the micro-dollar arithmetic
/// far from overflow).
fn budget(
    prefix: &str,
    messages: Option<Allowance<u64>>,
    tokens: Option<Allowance<u64>>,
    spend: Option<Allowance<f64>>,
    exec: Option<Allowance<u64>>,
) -> Result<(), Failure> {
    for (key, value) in [
        ("messagesPerDay", messages),
        ("tokensPerDay", tokens),
        ("execSecondsPerDay", exec),
    ] {
        if let Some(Allowance::Limited(n)) = value {
            in_range(&format!("{prefix}.{key}"), n, 0, 1_000_000_000_000)?;
        }
    }
    if let Some(Allowance::Limited(dollars)) = spend {
        if !(dollars.is_finite() && (0.0..=1e9).contains(&dollars)) {
            return Err(rule(
                format!("{prefix}.spendPerMonth"),
                "must be from 0 to 1000000000 US dollars, or \"unlimited\"",
            ));
        }
    }
    Ok(())
}

fn caps(
    prefix: &str,
    tool_calls: Option<u32>,
    tool_output_kb: Option<u64>,
    stored_kb: Option<u64>,
    transcript_mb: Option<u64>,
    queued: Option<u32>,
) -> Result<(), Failure> {
    let key = |k: &str| format!("{prefix}.{k}");
    if let Some(n) = tool_calls {
        in_range(&key("toolCallsPerAnswer"), u64::from(n), 1, 1000)?;
    }
    if let Some(n) = tool_output_kb {
        in_range(&key("toolOutputKbPerTurn"), n, 1, 1 << 20)?;
    }
    if let Some(n) = stored_kb {
        // Room for a whole turn's bookkeeping (the user's message, placeholders).
        in_range(&key("storedKbPerTurn"), n, 64, 1 << 20)?;
    }
    if let Some(n) = transcript_mb {
        in_range(&key("transcriptMb"), n, 1, 1 << 20)?;
    }
    if let Some(n) = queued {
        in_range(&key("queuedMessages"), u64::from(n), 1, 10_000)?;
    }
    Ok(())
}

fn limits(config: &Config) -> Result<(), Failure> {
    let l = &config.limits;
    caps(
        "limits",
        Some(l.tool_calls_per_answer),
        Some(l.tool_output_kb_per_turn),
        Some(l.stored_kb_per_turn),
        Some(l.transcript_mb),
        Some(l.queued_messages),
    )?;
    in_range("limits.memoryIndexMb", l.memory_index_mb, 1, 1 << 20)?;
    in_range("limits.reminders", u64::from(l.reminders), 0, 10_000)?;
    // At most a day: the check of a recurring rule looks at the times of one day.
    in_range(
        "limits.reminderMinIntervalMinutes",
        l.reminder_min_interval_minutes,
        1,
        1440,
    )?;
    budget(
        "limits",
        Some(l.messages_per_day),
        Some(l.tokens_per_day),
        Some(l.spend_per_month),
        Some(l.exec_seconds_per_day),
    )?;
    for level in TrustLevel::ALL {
        let prefix = format!("limits.trust.{level}");
        let t = l.trust.level(level);
        caps(
            &prefix,
            t.tool_calls_per_answer,
            t.tool_output_kb_per_turn,
            t.stored_kb_per_turn,
            t.transcript_mb,
            t.queued_messages,
        )?;
        if let Some(n) = t.reminders {
            in_range(&format!("{prefix}.reminders"), u64::from(n), 0, 10_000)?;
        }
        budget(
            &prefix,
            t.messages_per_day,
            t.tokens_per_day,
            t.spend_per_month,
            t.exec_seconds_per_day,
        )?;
    }
    for (name, family) in &config.families {
        let b = &family.budget;
        budget(
            &format!("families.{name}.budget"),
            Some(b.messages_per_day),
            Some(b.tokens_per_day),
            Some(b.spend_per_month),
            Some(b.exec_seconds_per_day),
        )?;
    }
    Ok(())
}

fn valid_family_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn families(config: &Config) -> Result<(), Failure> {
    let mut family_of: BTreeMap<&UserId, &str> = BTreeMap::new();
    for (name, family) in &config.families {
        if !valid_family_name(name) {
            return Err(rule(
                format!("families.{name}"),
                "family names must be 1-64 characters of a-z, 0-9, '_' or '-'",
            ));
        }
        for (i, member) in family.members.iter().enumerate() {
            let key = format!("families.{name}.members[{i}]");
            match family_of.insert(member, name) {
                Some(other) if other == name => {
                    return Err(rule(
                        key,
                        format!("user {:?} is listed twice", member.as_str()),
                    ));
                }
                Some(other) => {
                    return Err(rule(
                        key,
                        format!(
                            "user {:?} is already in family {other:?}; a user belongs to at most one family",
                            member.as_str()
                        ),
                    ));
                }
                None => {}
            }
        }
    }
    Ok(())
}

fn users(config: &Config) -> Result<(), Failure> {
    let mut owner_of: BTreeMap<&Identity, &UserId> = BTreeMap::new();
    for (user, entry) in &config.users {
        // A group is its own scope: linking it to a person would hand that person's memory
        // and trust to everyone in the group.
        let groups = entry.identities.iter().filter(|i| i.is_group()).count();
        if groups > 0 && groups < entry.identities.len() {
            return Err(rule(
                format!("users.{user}.identities"),
                "mixes a group (\"<channel>:group/...\") with a person's identity; a group is a user of its own, so give it its own users entry",
            ));
        }
        for (i, identity) in entry.identities.iter().enumerate() {
            let key = format!("users.{user}.identities[{i}]");
            match owner_of.insert(identity, user) {
                Some(other) if other == user => {
                    return Err(rule(
                        key,
                        format!("identity \"{identity}\" is listed twice"),
                    ));
                }
                Some(other) => {
                    return Err(rule(
                        key,
                        format!("identity \"{identity}\" already belongs to user {:?}; an identity is one user", other.as_str()),
                    ));
                }
                None => {}
            }
        }
        if entry
            .display_name
            .as_ref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return Err(rule(
                format!("users.{user}.displayName"),
                "must not be empty",
            ));
        }
        if entry.persona.as_ref().is_some_and(|p| p.trim().is_empty()) {
            return Err(rule(format!("users.{user}.persona"), "must not be empty"));
        }
        if let Some(zone) = &entry.timezone {
            timezone(&format!("users.{user}.timezone"), zone)?;
        }
    }
    Ok(())
}

/// An IANA time zone name as the tz database spells it (`Europe/Berlin`, `UTC`); a near miss
/// gets the likely intended name.
fn timezone(key: &str, zone: &str) -> Result<(), Failure> {
    if zone.parse::<chrono_tz::Tz>().is_ok() {
        return Ok(());
    }
    let hint = chrono_tz::TZ_VARIANTS
        .iter()
        .find(|tz| tz.name().eq_ignore_ascii_case(zone))
        .map(|tz| tz.name().to_string())
        .or_else(|| suggest(zone, chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name())));
    Err(rule(
        key,
        match hint {
            Some(name) => format!("{zone:?} is not a time zone name; did you mean {name:?}?"),
            None => format!(
                "{zone:?} is not a time zone name; use an IANA name such as \"Europe/Berlin\" or \"UTC\""
            ),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_zones_are_iana_names_with_a_hint_for_near_misses() {
        for ok in ["Europe/Berlin", "UTC", "America/New_York", "Asia/Kolkata"] {
            assert!(timezone("k", ok).is_ok(), "{ok}");
        }
        for (bad, hint) in [
            ("europe/berlin", Some("Europe/Berlin")),
            ("Europe/Berln", Some("Europe/Berlin")),
            ("CEST", None),
            ("", None),
            ("../../etc/passwd", None),
        ] {
            let (key, problem) = timezone("users.anna.timezone", bad).unwrap_err();
            assert_eq!(key, "users.anna.timezone");
            let text = format!("{problem:?}");
            if let Some(hint) = hint {
                assert!(text.contains(hint), "{bad}: {text}");
            }
        }
    }

    #[test]
    fn domains() {
        for ok in [
            "example.com",
            "*.github.com",
            "pypi.org",
            "localhost",
            "a-b.c0",
        ] {
            assert!(valid_domain(ok), "{ok}");
        }
        for bad in [
            "",
            "*.",
            "https://x.org",
            "x.org/path",
            "Example.com",
            "-a.com",
            "a..b",
            "*",
            "a b",
        ] {
            assert!(!valid_domain(bad), "{bad}");
        }
    }

    #[test]
    fn default_config_is_valid() {
        assert!(validate(&Config::default()).is_ok());
    }

    #[test]
    fn http_urls() {
        assert!(valid_http_url("https://api.telegram.org"));
        assert!(valid_http_url("http://127.0.0.1:8080/v1"));
        assert!(!valid_http_url("ftp://x.org"));
        assert!(!valid_http_url("api.openai.com"));
    }
}
