//! Property tests of configuration loading: JSON5 text, `${VAR}` substitution, the strict
//! schema and validation.
//!
//! * arbitrary text and arbitrary JSON never panic, and every failure is a syntax error or an
//!   invalid key with a path;
//! * an unknown key anywhere in the schema is reported at its exact key path;
//! * a valid configuration loads to the same result whether written as JSON or as JSON5 in any
//!   style (quotes, unquoted keys, comments, trailing commas, hex numbers), and `${VAR}`
//!   references load like the values they stand for;
//! * `$${` escapes round-trip arbitrary text.
//!
//! Case counts: `MOLTMATE_PROPTEST_CASES` (see `moltmate_testkit::prop`).

use moltmate_config::{Config, ConfigError, Problem};
use moltmate_testkit::prop::config as prop_config;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

const FILE: &str = "moltmate.json";

fn no_env(_: &str) -> Option<String> {
    None
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_json5_str(text, FILE, &no_env)
}

fn load_with(text: &str, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    Config::from_json5_str(text, FILE, &|name| env.get(name).cloned())
}

/// What every failure must look like: a file-fixable error that names the file, and a key path
/// for errors about a key.
fn assert_well_formed_error(err: &ConfigError) -> Result<(), TestCaseError> {
    let message = err.to_string();
    prop_assert!(
        message.starts_with("moltmate.json: "),
        "error does not name the file: {message}"
    );
    prop_assert!(err.is_fixable_in_file(), "not fixable in the file: {err:?}");
    match err {
        ConfigError::Syntax { .. } => {}
        ConfigError::Invalid { key, problem, .. } => {
            prop_assert!(!key.is_empty(), "empty key path: {err:?}");
            prop_assert!(
                !problem.to_string().is_empty(),
                "empty problem text: {err:?}"
            );
        }
        other => prop_assert!(false, "unexpected error kind: {other:?}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A tiny deterministic choice source for rendering styles (the strategy draws its seed).

struct Choices(u64);

impl Choices {
    fn next(&mut self) -> u64 {
        // xorshift64*; never zero.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering a value as JSON5 in a random style.

/// `${` written so the loader reads it literally.
fn escape_references(text: &str) -> String {
    text.replace("${", "$${")
}

fn is_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

fn json5_string(text: &str, choices: &mut Choices) -> String {
    let quote = if choices.one_in(2) { '\'' } else { '"' };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn json5_number(n: &serde_json::Number, choices: &mut Choices) -> String {
    match n.as_u64() {
        Some(u) if u < (1 << 53) && choices.one_in(4) => format!("0x{u:x}"),
        Some(u) if choices.one_in(8) => format!("+{u}"),
        _ => n.to_string(),
    }
}

fn gap(choices: &mut Choices) -> &'static str {
    match choices.next() % 8 {
        0 => " /* a comment, with { brackets ] and 'quotes' */ ",
        1 => " // a line comment, with { brackets\n",
        2 => "\n    ",
        3 => "\t",
        4 => "",
        _ => " ",
    }
}

fn render_json5(value: &Value, choices: &mut Choices, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&json5_number(n, choices)),
        Value::String(s) => out.push_str(&json5_string(s, choices)),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                out.push_str(gap(choices));
                render_json5(item, choices, out);
                if i + 1 < items.len() || choices.one_in(2) {
                    out.push(',');
                }
            }
            out.push_str(gap(choices));
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            let len = map.len();
            for (i, (key, item)) in map.iter().enumerate() {
                out.push_str(gap(choices));
                if is_identifier(key) && choices.one_in(2) {
                    out.push_str(key);
                } else {
                    out.push_str(&json5_string(key, choices));
                }
                out.push_str(gap(choices));
                out.push(':');
                out.push_str(gap(choices));
                render_json5(item, choices, out);
                if i + 1 < len || choices.one_in(2) {
                    out.push(',');
                }
            }
            out.push_str(gap(choices));
            out.push('}');
        }
    }
}

/// Every string leaf of `value` with `${` escaped, so the file means the literal text.
fn escaped(value: &Value) -> Value {
    match value {
        Value::String(s) => Value::String(escape_references(s)),
        Value::Array(items) => Value::Array(items.iter().map(escaped).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), escaped(v)))
                .collect::<Map<String, Value>>(),
        ),
        other => other.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies for valid configurations.

/// Text for free-form string settings: any characters, including `$`, `{`, quotes, control
/// characters and non-BMP ones, never blank (validation refuses blank names).
fn free_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ._-]{1,20}",
        any::<String>(),
        "[$]{0,3}[{]?[A-Z_]{0,5}[}]?[ -~]{0,8}",
    ]
    .prop_filter("blank", |s| !s.trim().is_empty())
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9_-]{0,15}"
}

fn secret() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{16,40}", any::<String>()].prop_filter("too short or blank", |s| {
        s.chars().count() >= 16 && !s.trim().is_empty()
    })
}

fn trust() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["owner", "family", "friend", "stranger", "restricted"])
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
        any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
    ]
}

fn domain() -> impl Strategy<Value = String> {
    "(\\*\\.)?[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]{1,8}){0,3}"
}

fn http_url() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "https://api.example.com",
        "http://127.0.0.1:8080/v1",
        "https://proxy.example.org:8443/api/",
        "http://[::1]:11434/v1",
    ])
    .prop_map(String::from)
}

/// `safeBins` entries: programs that cannot run other programs (validation refuses runners).
fn safe_bins() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![prop::sample::select(vec![
            "cat", "ls", "wc", "head", "tail", "grep", "echo", "date"
        ])
        .prop_map(String::from),],
        0..5,
    )
}

fn maybe(
    section: impl Strategy<Value = (String, Value)>,
) -> impl Strategy<Value = Option<(String, Value)>> {
    prop::option::weighted(0.7, section)
}

fn entry(
    key: &str,
    value: impl Strategy<Value = Value>,
) -> impl Strategy<Value = Option<(String, Value)>> {
    let key = key.to_string();
    maybe(value.prop_map(move |v| (key.clone(), v)))
}

fn gateway() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            // Loopback: a token is optional.
            (
                prop::sample::select(vec!["127.0.0.1", "::1", "127.0.0.2"]),
                prop::option::of(secret())
            ),
            // Anything else needs one.
            (
                prop::sample::select(vec!["0.0.0.0", "::", "192.168.1.10"]),
                secret().prop_map(Some)
            ),
        ],
        1u16..=u16::MAX,
        (1u32..=u32::MAX, 1u32..=u32::MAX),
        prop::option::of(prop::sample::select(vec![
            "https://chat.example.com",
            "http://127.0.0.1:8080",
            "https://moltbot.example.com:8443",
        ])),
        prop::collection::vec(ip(), 0..3),
    )
        .prop_map(
            |((bind, token), port, (per_minute, burst), public, proxies)| {
                let mut g = json!({
                    "bind": bind,
                    "port": port,
                    "rateLimit": {"perMinute": per_minute, "burst": burst},
                    "trustedProxies": proxies,
                });
                if let Some(token) = token {
                    g["auth"] = json!({ "token": token });
                }
                if let Some(public) = public {
                    g["publicUrl"] = json!(public);
                }
                g
            },
        )
}

/// Providers (by name) plus a `model` section that only names known providers.
fn providers_and_model() -> impl Strategy<Value = (Value, Value)> {
    let provider = (
        prop::option::of(prop::sample::select(vec!["anthropic", "openai"])),
        prop::option::of(http_url()),
        prop::option::of(secret()),
    );
    (
        prop::collection::btree_map(name(), provider, 0..3),
        prop::collection::vec("[a-zA-Z0-9._:/-]{1,20}", 1..4),
        (1u32..=u32::MAX, 2u32..=u32::MAX, 0u32..=u32::MAX),
        (1u64..=u64::MAX, 0u32..20),
        any::<u64>(),
    )
        .prop_map(
            |(configured, models, (iterations, window, output), (timeout, retries), pick)| {
                let mut providers = Map::new();
                let mut names = vec!["anthropic".to_string(), "openai".to_string()];
                for (name, (api, base_url, key)) in configured {
                    // A provider not named like a builtin needs its api.
                    let api = api.or(if ["anthropic", "openai"].contains(&name.as_str()) {
                        None
                    } else {
                        Some("openai")
                    });
                    let mut p = Map::new();
                    if let Some(api) = api {
                        p.insert("api".into(), json!(api));
                    }
                    if let Some(url) = base_url {
                        p.insert("baseUrl".into(), json!(url));
                    }
                    if let Some(key) = key {
                        p.insert("apiKey".into(), json!(key));
                    }
                    names.push(name.clone());
                    providers.insert(name, Value::Object(p));
                }
                let model_ref = |i: usize, model: &str| {
                    let provider = &names[(pick as usize).wrapping_add(i * 7) % names.len()];
                    format!("{provider}/{model}")
                };
                let fallbacks: Vec<String> = models[1..]
                    .iter()
                    .enumerate()
                    .map(|(i, m)| model_ref(i + 1, m))
                    .collect();
                let model = json!({
                    "primary": model_ref(0, &models[0]),
                    "fallbacks": fallbacks,
                    "maxToolIterations": iterations,
                    "contextWindowTokens": window,
                    "maxOutputTokens": 1 + output % (window - 1),
                    "requestTimeoutSeconds": timeout,
                    "maxRetries": retries,
                });
                (Value::Object(providers), model)
            },
        )
}

fn channels() -> impl Strategy<Value = Value> {
    let allow_entry = prop_oneof![
        Just(json!("*")),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        "[0-9]{1,12}".prop_map(|s| json!(s)),
    ];
    (
        prop::option::of(secret()),
        any::<bool>(),
        prop::sample::select(vec!["pairing", "allowlist", "open", "disabled"]),
        prop::collection::vec(allow_entry, 0..4),
        1u64..=600,
        (trust(), trust(), trust(), any::<bool>()),
        http_url(),
    )
        .prop_map(
            |(token, enabled, policy, mut allow_from, poll, (t1, t2, t3, web), api_url)| {
                if policy == "open" && !allow_from.contains(&json!("*")) {
                    allow_from.push(json!("*"));
                }
                let mut telegram = json!({
                    "apiUrl": api_url,
                    "dmPolicy": policy,
                    "allowFrom": allow_from,
                    "pollTimeoutSeconds": poll,
                    "defaultTrust": t1,
                });
                if let Some(token) = token {
                    telegram["botToken"] = json!(token);
                    telegram["enabled"] = json!(enabled);
                }
                json!({
                    "telegram": telegram,
                    "web": {"enabled": web, "defaultTrust": t2},
                    "local": {"defaultTrust": t3},
                })
            },
        )
}

fn sandbox() -> impl Strategy<Value = Value> {
    (
        (
            prop::sample::select(vec!["auto", "docker", "bwrap"]),
            prop::sample::select(vec!["all", "tools", "none"]),
            prop::sample::select(vec!["session", "user", "task"]),
            prop::sample::select(vec!["rw", "ro", "none"]),
            prop::sample::select(vec!["none", "proxy"]),
        ),
        prop::collection::vec(domain(), 0..3),
        free_text(),
        prop::option::of(free_text()),
        (any::<bool>(), any::<bool>()),
        (
            1u64..=(1 << 30),
            1u32..=1_024_000,
            1u32..=u32::MAX,
            1u64..=(1 << 30),
            1u64..=(1 << 30),
            1u64..=(1 << 20),
        ),
        1u64..=u64::MAX,
        (
            1u32..=10_000,
            1u64..=3600,
            prop::option::of(0u64..=(1 << 20)),
            prop::option::of(0u32..=100_000),
            prop::option::of(0u64..=100_000),
            "[a-z][a-z0-9_]{0,20}",
        ),
    )
        .prop_map(
            |(
                (backend, mode, scope, access, network),
                domains,
                image,
                docker_host,
                (host_exec, prewarm),
                (memory, millicpus, pids, disk, tmp, output),
                idle,
                (max_active, queue_timeout, extra_memory, extra_millicpus, extra_pids, cgroup),
            )| {
                let mut s = json!({
                    "backend": backend,
                    "mode": mode,
                    "scope": scope,
                    "workspaceAccess": access,
                    "network": network,
                    "allowedDomains": domains,
                    "image": image,
                    // `none` needs the consent flag.
                    "dangerouslyAllowHostExec": host_exec || mode == "none",
                    "prewarm": prewarm,
                    "limits": {
                        "memoryMb": memory,
                        "cpus": f64::from(millicpus) / 1000.0,
                        "pids": pids,
                        "diskMb": disk,
                        "tmpMb": tmp,
                        "outputKb": output,
                    },
                    "prune": {"idleMinutes": idle},
                    "maxActive": max_active,
                    "queueTimeoutSeconds": queue_timeout,
                    "total": {"cgroup": cgroup},
                });
                // Totals, when set, hold at least one sandbox's limits (and stay in range).
                if let Some(extra) = extra_memory {
                    s["total"]["memoryMb"] = json!((memory + extra).clamp(64, 1 << 30));
                }
                if let Some(extra) = extra_millicpus {
                    let cpus = f64::from(millicpus + extra) / 1000.0;
                    s["total"]["cpus"] = json!(cpus.clamp(0.01, 1024.0));
                }
                if let Some(extra) = extra_pids {
                    if pids <= 4_194_304 {
                        s["total"]["pids"] = json!((u64::from(pids) + extra).clamp(16, 4_194_304));
                    }
                }
                if let Some(host) = docker_host {
                    s["dockerHost"] = json!(host);
                }
                s
            },
        )
}

fn tools() -> impl Strategy<Value = Value> {
    let tool = prop::sample::select(vec![
        "read",
        "write",
        "edit",
        "exec",
        "web_fetch",
        "memory_search",
        "web_search",
    ]);
    (
        prop::collection::vec(tool.clone(), 0..6),
        prop::collection::vec(tool, 0..3),
        prop::sample::select(vec!["allowlist", "blocklist", "full"]),
        (
            safe_bins(),
            prop::collection::vec("[a-z][a-z0-9._+-]{0,10}", 0..5),
        ),
        (1u64..=u64::MAX, 1u64..=u64::MAX),
        (
            any::<bool>(),
            prop::option::of(prop::collection::vec(domain(), 0..3)),
            1u64..=u64::MAX,
            1u64..=u64::MAX,
        ),
        web_search(),
    )
        .prop_map(
            |(
                allow,
                deny,
                security,
                (safe, blocked),
                (a, b),
                (fetch, domains, max_bytes, fetch_timeout),
                search,
            )| {
                let mut web = json!({
                    "enabled": fetch,
                    "maxBytes": max_bytes,
                    "timeoutSeconds": fetch_timeout,
                });
                if let Some(domains) = domains {
                    web["allowedDomains"] = json!(domains);
                }
                json!({
                    "allow": allow,
                    "deny": deny,
                    "exec": {
                        "security": security,
                        "safeBins": safe,
                        "blockedBins": blocked,
                        "timeoutSeconds": a.min(b),
                        "maxTimeoutSeconds": a.max(b),
                    },
                    "web": {"fetch": web, "search": search},
                })
            },
        )
}

/// `tools.web.search`: Brave (with a key when enabled, https or loopback http) or SearXNG
/// (with an instance address, any host, no key).
fn web_search() -> impl Strategy<Value = Value> {
    let host = prop_oneof![
        // A letter starts the last label, so the URL parser never reads it as an address.
        "([a-z0-9]{1,8}\\.){0,3}[a-z]([a-z0-9-]{0,8}[a-z0-9])?",
        Just("127.0.0.1".to_string()),
        Just("localhost".to_string()),
        Just("[::1]".to_string()),
        Just("10.0.0.7".to_string()),
    ];
    (
        any::<bool>(),
        any::<bool>(),
        (host, prop::option::of(1u16..=u16::MAX), any::<bool>()),
        prop::option::of("[a-zA-Z0-9_-]{1,40}"),
        1u64..=20,
        (1u64..=60, 1u64..=10_000),
    )
        .prop_map(
            |(enabled, brave, (host, port, https), key, max_results, (timeout, per_user))| {
                let port = port.map(|p| format!(":{p}")).unwrap_or_default();
                let loopback = matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]");
                let scheme = if https || (brave && !loopback) {
                    "https"
                } else {
                    "http"
                };
                let mut search = json!({
                    "enabled": enabled,
                    "provider": if brave { "brave" } else { "searxng" },
                    "baseUrl": format!("{scheme}://{host}{port}"),
                    "maxResults": max_results,
                    "timeoutSeconds": timeout,
                    "perUserPerHour": per_user,
                });
                if brave {
                    search["apiKey"] = json!(key.unwrap_or_else(|| "k".to_string()));
                }
                search
            },
        )
}

fn misc() -> impl Strategy<Value = (Value, Value, Value)> {
    (
        (
            free_text(),
            any::<bool>(),
            prop::sample::select(vec!["text", "json"]),
        ),
        (any::<bool>(), free_text(), free_text()),
        (prop::option::of(1u64..=u64::MAX), 1u32..=1_000_000),
    )
        .prop_map(
            |((level, tools, format), (onboarding, language, persona), (idle, ratio))| {
                let mut session = json!({ "compactAtRatio": f64::from(ratio) / 1_000_000.0 });
                if let Some(idle) = idle {
                    session["idleResetMinutes"] = json!(idle);
                }
                (
                    json!({"level": level, "tools": tools, "format": format}),
                    json!({"enabled": onboarding, "language": language, "defaultPersona": persona}),
                    session,
                )
            },
        )
}

/// Families and users: every user in at most one family, every identity owned once.
fn people() -> impl Strategy<Value = (Value, Value)> {
    let channel = prop::sample::select(vec!["telegram", "web", "local", "signal"]);
    let identity = (channel, "[0-9a-zA-Z_+@.-]{1,16}").prop_map(|(c, p)| format!("{c}:{p}"));
    let user = (
        prop::collection::btree_set(identity, 0..3),
        prop::option::of(trust()),
        prop::option::of(free_text()),
        prop::option::of(free_text()),
    );
    (
        prop::collection::btree_map(name(), user, 0..4),
        prop::collection::vec((name(), any::<u8>()), 0..3),
    )
        .prop_map(|(users, families)| {
            let mut seen_identities = BTreeSet::new();
            let mut user_map = Map::new();
            for (id, (identities, trust, display, persona)) in &users {
                let identities: Vec<String> = identities
                    .iter()
                    .filter(|i| seen_identities.insert((*i).clone()))
                    .cloned()
                    .collect();
                let mut u = json!({ "identities": identities });
                if let Some(t) = trust {
                    u["trust"] = json!(t);
                }
                if let Some(d) = display {
                    u["displayName"] = json!(d);
                }
                if let Some(p) = persona {
                    u["persona"] = json!(p);
                }
                user_map.insert(id.clone(), u);
            }
            // Deal the users out to the families (a user may also be in none).
            let ids: Vec<&String> = users.keys().collect();
            let mut family_map = Map::new();
            let mut next = 0;
            for (family, take) in families {
                let take = usize::from(take) % (ids.len() + 1);
                let members: Vec<&String> = ids.iter().skip(next).take(take).copied().collect();
                next += members.len();
                family_map
                    .entry(family)
                    .or_insert_with(|| json!({ "members": members }));
            }
            (Value::Object(family_map), Value::Object(user_map))
        })
}

/// A configuration the schema and validation accept, each section present or not.
fn valid_config() -> impl Strategy<Value = Value> {
    (
        (
            entry("gateway", gateway()),
            maybe(providers_and_model().prop_map(|(p, m)| {
                (
                    "providersAndModel".to_string(),
                    json!({"providers": p, "model": m}),
                )
            })),
            entry("channels", channels()),
            entry("sandbox", sandbox()),
            entry("tools", tools()),
        ),
        maybe(misc().prop_map(|(l, o, s)| {
            (
                "misc".to_string(),
                json!({"logging": l, "onboarding": o, "session": s}),
            )
        })),
        maybe(
            people().prop_map(|(f, u)| ("people".to_string(), json!({"families": f, "users": u}))),
        ),
    )
        .prop_map(|((gateway, pm, channels, sandbox, tools), misc, people)| {
            let mut top = Map::new();
            for (key, value) in [gateway, channels, sandbox, tools].into_iter().flatten() {
                top.insert(key, value);
            }
            // Grouped sections are flattened into the top level.
            for (_, group) in [pm, misc, people].into_iter().flatten() {
                if let Value::Object(map) = group {
                    top.extend(map);
                }
            }
            Value::Object(top)
        })
}

/// Every object of the schema whose keys are fixed (structs, and one entry of each map).
const SECTIONS: &[&str] = &[
    "",
    "gateway",
    "gateway.auth",
    "gateway.rateLimit",
    "model",
    "providers.anthropic",
    "providers.local-llm",
    "channels",
    "channels.telegram",
    "channels.web",
    "channels.local",
    "sandbox",
    "sandbox.limits",
    "sandbox.prune",
    "tools",
    "tools.exec",
    "tools.web",
    "tools.web.fetch",
    "tools.web.search",
    "logging",
    "onboarding",
    "session",
    "families.smiths",
    "users.anna",
];

/// The object at dotted `path` inside `value`, created (empty) where missing.
fn object_at<'a>(value: &'a mut Value, path: &str) -> &'a mut Map<String, Value> {
    let mut current = value;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let Value::Object(map) = current else {
            unreachable!("sections are objects")
        };
        current = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    match current {
        Value::Object(map) => map,
        _ => unreachable!("sections are objects"),
    }
}

fn join_key(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    }
}

/// Every key the schema could use, to make arbitrary JSON reach deep into the schema.
const SCHEMA_KEYS: &[&str] = &[
    "gateway",
    "bind",
    "port",
    "auth",
    "token",
    "rateLimit",
    "perMinute",
    "burst",
    "publicUrl",
    "trustedProxies",
    "model",
    "primary",
    "fallbacks",
    "maxToolIterations",
    "maxOutputTokens",
    "requestTimeoutSeconds",
    "maxRetries",
    "contextWindowTokens",
    "providers",
    "anthropic",
    "openai",
    "api",
    "baseUrl",
    "apiKey",
    "channels",
    "telegram",
    "web",
    "local",
    "enabled",
    "botToken",
    "apiUrl",
    "dmPolicy",
    "allowFrom",
    "pollTimeoutSeconds",
    "defaultTrust",
    "sandbox",
    "backend",
    "mode",
    "scope",
    "workspaceAccess",
    "network",
    "allowedDomains",
    "image",
    "dockerHost",
    "dangerouslyAllowHostExec",
    "prewarm",
    "warmPool",
    "limits",
    "memoryMb",
    "cpus",
    "pids",
    "diskMb",
    "tmpMb",
    "outputKb",
    "prune",
    "idleMinutes",
    "maxActive",
    "queueTimeoutSeconds",
    "total",
    "cgroup",
    "tools",
    "allow",
    "deny",
    "exec",
    "security",
    "safeBins",
    "blockedBins",
    "timeoutSeconds",
    "maxTimeoutSeconds",
    "fetch",
    "maxBytes",
    "search",
    "provider",
    "maxResults",
    "perUserPerHour",
    "logging",
    "level",
    "format",
    "onboarding",
    "language",
    "defaultPersona",
    "session",
    "idleResetMinutes",
    "compactAtRatio",
    "families",
    "members",
    "users",
    "anna",
    "identities",
    "trust",
    "displayName",
    "persona",
];

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![
            "anthropic/x",
            "openai/gpt",
            "allowlist",
            "none",
            "all",
            "pairing",
            "open",
            "*",
            "127.0.0.1",
            "0.0.0.0",
            "https://x.org",
            "telegram:1",
            "owner",
            "${HOME}",
            "${",
            "$${X}",
            "${1}",
            "",
        ])
        .prop_map(|s| json!(s)),
        any::<String>().prop_map(Value::String),
    ];
    let key = prop_oneof![
        3 => prop::sample::select(SCHEMA_KEYS.to_vec()).prop_map(String::from),
        1 => any::<String>(),
    ];
    leaf.prop_recursive(6, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON5-ish token soup: brackets, separators, literals, comments and references in any order.
fn json5_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            "null",
            "true",
            "false",
            "NaN",
            "Infinity",
            "-Infinity",
            "0x",
            "0xFFFFFFFFFFFFFFFFFF",
            "1e999",
            "-0",
            ".5",
            "+1",
            "01",
            "18446744073709551616",
            "-9223372036854775809",
            "'",
            "\"",
            "\\",
            "\\u",
            "\\u{",
            "\\ud800",
            "/*",
            "*/",
            "//",
            "\n",
            "\u{feff}",
            "\u{2028}",
            "${",
            "$${",
            "}",
            "gateway",
            "port",
            "sandbox",
            "mode",
            "tools",
            "'a'",
            "\"b\"",
            "users",
            "anna",
            "identities",
        ])
        .prop_map(String::from),
        "[ -~]{1,6}",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(token, 0..60).prop_map(|tokens| tokens.concat())
}

/// Soup around a run of thousands of open brackets: nesting deeper than the parser's limit must
/// be an error however the text around it tries to hide it from the depth check.
fn deeply_nested() -> impl Strategy<Value = String> {
    (
        json5_soup(),
        prop::sample::select(vec!["[", "{a:", "[{'b':", "{\"c\":["]),
        0usize..4000,
        json5_soup(),
    )
        .prop_map(|(before, open, depth, after)| format!("{before}{}{after}", open.repeat(depth)))
}

proptest! {
    #![proptest_config(prop_config(96))]

    /// Any text at all loads or fails with a file error; nothing panics.
    #[test]
    fn prop_arbitrary_text_never_panics(text in prop_oneof![any::<String>(), json5_soup(), deeply_nested()]) {
        if let Err(err) = load(&text) {
            assert_well_formed_error(&err)?;
        }
    }

    /// Deeply nested or not, any JSON document gives a config or a key-path error.
    #[test]
    fn prop_arbitrary_json_gives_a_config_or_a_key_path(value in arbitrary_json()) {
        let text = value.to_string();
        match load(&text) {
            Ok(config) => prop_assert!(config.validate(FILE).is_ok()),
            Err(err) => {
                assert_well_formed_error(&err)?;
                // Parsing JSON cannot fail: the only syntax error left is the depth limit.
                if let ConfigError::Syntax { message, .. } = &err {
                    prop_assert!(message.contains("nested deeper"), "{err}");
                }
            }
        }
    }

    /// An unknown key in any section is reported at exactly its path, with the allowed keys.
    #[test]
    fn prop_unknown_keys_name_their_key_path(
        config in valid_config(),
        section in prop::sample::select(SECTIONS.to_vec()),
        // Schema keys are camelCase ASCII: an underscore or anything else outside that makes
        // the key unknown everywhere.
        unknown in prop_oneof![
            "_[a-zA-Z0-9_]{0,12}",
            "[a-z]{1,8}_[a-z]{0,8}",
            any::<String>().prop_map(|s| format!("{s}_")),
        ],
        seed in any::<u64>(),
    ) {
        let mut config = config;
        object_at(&mut config, section).insert(unknown.clone(), json!(1));
        let mut text = String::new();
        render_json5(&escaped(&config), &mut Choices(seed | 1), &mut text);
        let err = match load(&text) {
            Ok(_) => return Err(TestCaseError::fail(format!("{unknown:?} in {section:?} was accepted"))),
            Err(err) => err,
        };
        let expected = join_key(section, &unknown);
        prop_assert_eq!(err.key_path(), Some(expected.as_str()), "{}", err);
        match err.problem() {
            Some(Problem::UnknownKey { suggestion, allowed }) => {
                prop_assert!(!allowed.is_empty());
                prop_assert!(!allowed.contains(&unknown));
                if let Some(s) = suggestion {
                    prop_assert!(allowed.contains(s), "suggested {s:?} is not allowed");
                }
            }
            other => prop_assert!(false, "expected an unknown key, got {other:?}: {err}"),
        }
    }

    /// A valid configuration loads, and JSON and every JSON5 style give the same result.
    #[test]
    fn prop_valid_configs_load_the_same_in_json_and_json5(
        config in valid_config(),
        seed in any::<u64>(),
    ) {
        let file_value = escaped(&config);
        let as_json = load(&file_value.to_string());
        let as_json = match as_json {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("valid config refused: {e}\n{config:#}"))),
        };
        let mut text = String::new();
        render_json5(&file_value, &mut Choices(seed | 1), &mut text);
        let as_json5 = match load(&text) {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("JSON5 form refused: {e}\n{text}"))),
        };
        prop_assert_eq!(format!("{as_json:?}"), format!("{as_json5:?}"));
        check_fields(&as_json5, &config)?;
    }

    /// `${VAR}` in any string setting loads exactly like the value it names.
    #[test]
    fn prop_env_references_load_like_their_values(
        config in valid_config(),
        pick in any::<u64>(),
        seed in any::<u64>(),
    ) {
        let literal = match load(&escaped(&config).to_string()) {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("valid config refused: {e}"))),
        };
        let mut env = BTreeMap::new();
        let mut counter = 0u64;
        let referenced = to_references(&config, pick, &mut env, &mut counter);
        let mut text = String::new();
        render_json5(&referenced, &mut Choices(seed | 1), &mut text);
        let substituted = match load_with(&text, &env) {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("references refused: {e}\n{text}"))),
        };
        prop_assert_eq!(format!("{literal:?}"), format!("{substituted:?}"));
        check_fields(&substituted, &config)?;
        // A missing variable is an error at the right key, naming the variable only.
        if let Some((var, _)) = env.iter().next() {
            let mut fewer = env.clone();
            fewer.remove(var);
            match load_with(&text, &fewer) {
                Ok(_) => prop_assert!(false, "{var} missing but accepted"),
                Err(err) => {
                    prop_assert!(matches!(err.problem(), Some(Problem::MissingEnvVar { var: v }) if v == var), "{err}");
                    // The message is made of the key path and the variable's name only.
                    let key = err.key_path().unwrap_or_default();
                    let expected = format!(
                        "{FILE}: {key}: environment variable {var} is not set (referenced as ${{{var}}})"
                    );
                    prop_assert_eq!(err.to_string(), expected);
                }
            }
        }
    }

    /// `$${` makes any text literal: escaping then loading gives the text back.
    #[test]
    fn prop_escaped_references_round_trip_any_text(
        text in prop_oneof![any::<String>(), "[$\\{\\}A-Z_ ]{0,24}"]
            .prop_filter("blank", |s| !s.trim().is_empty()),
    ) {
        let file = json!({"users": {"anna": {"displayName": escape_references(&text)}}});
        let config = match load(&file.to_string()) {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("refused: {e}"))),
        };
        let anna = moltmate_core::UserId::new("anna").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(
            config.users.get(&anna).and_then(|u| u.display_name.as_deref()),
            Some(text.as_str())
        );
    }
}

/// Replaces roughly every other string leaf (chosen by `pick`'s bits) by a `${VAR}` reference
/// to a fresh variable holding that string; the other strings are escaped literals.
fn to_references(
    value: &Value,
    pick: u64,
    env: &mut BTreeMap<String, String>,
    counter: &mut u64,
) -> Value {
    match value {
        Value::String(s) => {
            *counter += 1;
            if (pick.rotate_left((*counter % 64) as u32)) & 1 == 1 {
                let var = format!("MM_PROP_{counter}");
                env.insert(var.clone(), s.clone());
                // Some references embedded in text that is escaped around them.
                Value::String(format!("${{{var}}}"))
            } else {
                Value::String(escape_references(s))
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| to_references(v, pick, env, counter))
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), to_references(v, pick, env, counter)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Spot checks that the loaded configuration holds what the generated value said.
fn check_fields(config: &Config, value: &Value) -> Result<(), TestCaseError> {
    if let Some(port) = value.pointer("/gateway/port").and_then(Value::as_u64) {
        prop_assert_eq!(u64::from(config.gateway.port), port);
    }
    if let Some(bind) = value.pointer("/gateway/bind").and_then(Value::as_str) {
        prop_assert_eq!(
            config.gateway.bind.to_string(),
            bind.parse::<std::net::IpAddr>()
                .map(|i| i.to_string())
                .unwrap_or_default()
        );
    }
    if let Some(token) = value.pointer("/gateway/auth/token").and_then(Value::as_str) {
        prop_assert_eq!(
            config.gateway.auth.token.as_ref().map(|t| t.expose()),
            Some(token)
        );
    }
    if let Some(primary) = value.pointer("/model/primary").and_then(Value::as_str) {
        prop_assert_eq!(config.model.primary.to_string(), primary);
    }
    if let Some(timeout) = value
        .pointer("/model/requestTimeoutSeconds")
        .and_then(Value::as_u64)
    {
        prop_assert_eq!(config.model.request_timeout_seconds, timeout);
    }
    if let Some(Value::Object(providers)) = value.get("providers") {
        for (name, p) in providers {
            let loaded = config.providers.get(name);
            prop_assert!(loaded.is_some(), "provider {name} missing");
            if let (Some(loaded), Some(key)) = (loaded, p.get("apiKey").and_then(Value::as_str)) {
                prop_assert_eq!(loaded.api_key.as_ref().map(|k| k.expose()), Some(key));
            }
        }
    }
    if let Some(token) = value
        .pointer("/channels/telegram/botToken")
        .and_then(Value::as_str)
    {
        prop_assert_eq!(
            config
                .channels
                .telegram
                .bot_token
                .as_ref()
                .map(|t| t.expose()),
            Some(token)
        );
    }
    if let Some(cpus) = value
        .pointer("/sandbox/limits/cpus")
        .and_then(Value::as_f64)
    {
        prop_assert_eq!(config.sandbox.limits.cpus, cpus);
    }
    if let Some(image) = value.pointer("/sandbox/image").and_then(Value::as_str) {
        prop_assert_eq!(config.sandbox.image.as_str(), image);
    }
    if let Some(level) = value.pointer("/logging/level").and_then(Value::as_str) {
        prop_assert_eq!(config.logging.level.as_str(), level);
    }
    if let Some(Value::Object(users)) = value.get("users") {
        prop_assert_eq!(config.users.len(), users.len());
        for (id, u) in users {
            let user = moltmate_core::UserId::new(id.as_str())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let loaded = config.users.get(&user);
            prop_assert!(loaded.is_some(), "user {id} missing");
            if let (Some(loaded), Some(name)) =
                (loaded, u.get("displayName").and_then(Value::as_str))
            {
                prop_assert_eq!(loaded.display_name.as_deref(), Some(name));
            }
        }
    }
    Ok(())
}
