//! End-to-end loading: every error kind with its exact key path, JSON5 syntax, env
//! substitution, defaults, provider resolution.

use moltmate_config::{
    Config, ConfigError, DmPolicy, Problem, ProviderApi, SandboxMode, ToolName, TrustLevel,
};
use moltmate_core::sandbox::{ExecSecurity, SandboxNetwork, WorkspaceAccess};
use moltmate_core::{ChannelKind, Identity, UserId};

fn no_env(_: &str) -> Option<String> {
    None
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_json5_str(text, "moltmate.json", &no_env)
}

fn err(text: &str) -> ConfigError {
    match load(text) {
        Ok(_) => panic!("expected an error for {text}"),
        Err(e) => e,
    }
}

/// Asserts the key path and that the rendered message contains `needle`.
fn assert_err(text: &str, key: &str, needle: &str) -> ConfigError {
    let e = err(text);
    assert_eq!(e.key_path(), Some(key), "wrong key for {text}: {e}");
    let message = e.to_string();
    assert!(
        message.contains(needle),
        "message {message:?} lacks {needle:?}"
    );
    assert!(message.starts_with("moltmate.json: "), "{message}");
    assert!(e.is_fixable_in_file());
    e
}

#[test]
fn empty_object_gives_all_defaults() {
    let c = load("{}").unwrap();
    assert_eq!(c.gateway.bind.to_string(), "127.0.0.1");
    assert_eq!(c.gateway.port, 18790);
    assert!(c.gateway.auth.token.is_none());
    assert_eq!(
        (c.gateway.rate_limit.per_minute, c.gateway.rate_limit.burst),
        (100, 50)
    );
    assert_eq!(c.model.primary.to_string(), "anthropic/claude-sonnet-4-5");
    assert!(c.model.fallbacks.is_empty());
    assert_eq!(c.model.max_tool_iterations, 8);
    assert_eq!(c.model.max_output_tokens, 4096);
    assert_eq!(c.model.request_timeout_seconds, 120);
    assert_eq!(c.model.max_retries, 2);
    assert_eq!(c.model.context_window_tokens, 200_000);
    assert!(!c.channels.telegram.is_enabled());
    assert_eq!(c.channels.telegram.api_url, "https://api.telegram.org");
    assert_eq!(c.channels.telegram.dm_policy, DmPolicy::Pairing);
    assert_eq!(c.channels.telegram.poll_timeout_seconds, 30);
    assert!(c.channels.web.enabled);
    assert_eq!(c.channels.web.default_trust, TrustLevel::Friend);
    assert_eq!(c.channels.local.default_trust, TrustLevel::Owner);
    assert_eq!(c.sandbox.mode, SandboxMode::All);
    assert_eq!(c.sandbox.workspace_access, WorkspaceAccess::Rw);
    assert_eq!(c.sandbox.network, SandboxNetwork::None);
    assert_eq!(c.sandbox.image, "moltmate-sandbox:bookworm-slim");
    assert!(c.sandbox.prewarm);
    assert_eq!(c.sandbox.warm_pool, None);
    assert_eq!(c.sandbox.limits.memory_mb, 512);
    assert_eq!(c.sandbox.limits.cpus, 1.0);
    assert_eq!(
        c.sandbox.limits.to_core(),
        moltmate_core::sandbox::SandboxLimits::default()
    );
    assert_eq!(c.sandbox.prune.idle_minutes, 30);
    assert_eq!(
        c.sandbox.uid_range.to_core(),
        moltmate_core::sandbox::UidRange::default()
    );
    assert_eq!(c.tools.enabled(), ToolName::ALL.to_vec());
    assert_eq!(c.tools.exec.security, ExecSecurity::Allowlist);
    assert_eq!(
        c.tools.exec.safe_bins,
        moltmate_core::allowlist::DEFAULT_SAFE_BINS
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
    );
    assert_eq!(c.tools.web.fetch.allowed_ports, [80, 443]);
    assert_eq!(c.sandbox.allowed_ports, [80, 443]);
    assert!(c.tools.exec.blocked_bins.contains(&"docker".to_string()));
    assert_eq!(c.tools.exec.to_core().max_timeout.as_secs(), 300);
    assert!(c.tools.web.fetch.enabled);
    assert!(c.tools.web.fetch.allowed_domains.is_none());
    assert_eq!(c.tools.web.fetch.max_bytes, 1_048_576);
    assert_eq!(c.logging.level, "info");
    assert_eq!(c.onboarding.default_persona, "cami");
    assert_eq!(c.session.compact_at_ratio, 0.8);
    assert!(c.session.idle_reset_minutes.is_none());
}

#[test]
fn default_config_matches_empty_file() {
    let from_file = load("{}").unwrap();
    let default = Config::default();
    assert_eq!(format!("{from_file:?}"), format!("{default:?}"));
    assert_eq!(
        from_file.digest_of_sandbox_section(),
        default.digest_of_sandbox_section()
    );
}

#[test]
fn json5_comments_trailing_commas_unquoted_keys() {
    let c = load(
        "// leading comment\n{\n  /* block */ gateway: { port: 8080, },\n  tools: { deny: ['exec',], },\n}\n",
    )
    .unwrap();
    assert_eq!(c.gateway.port, 8080);
    assert!(!c.tools.is_enabled(ToolName::Exec));
    assert!(c.tools.is_enabled(ToolName::Read));
}

#[test]
fn absurd_nesting_is_an_error_not_a_crash() {
    let text = format!("{{users: {}{}}}", "[".repeat(200_000), "]".repeat(200_000));
    let e = err(&text);
    assert!(
        matches!(e, ConfigError::Syntax { line: Some(1), .. }),
        "{e}"
    );
    assert!(e.to_string().contains("nested deeper than"), "{e}");
}

#[test]
fn byte_order_mark_is_ignored() {
    assert_eq!(
        load("\u{feff}{gateway: {port: 1234}}")
            .unwrap()
            .gateway
            .port,
        1234
    );
}

#[test]
fn validate_rechecks_a_changed_config() {
    let mut c = load("{}").unwrap();
    assert!(c.validate("in memory").is_ok());
    c.sandbox.mode = SandboxMode::None;
    let e = c.validate("in memory").unwrap_err();
    assert_eq!(e.key_path(), Some("sandbox.mode"));
    assert!(
        e.to_string().starts_with("in memory: sandbox.mode: "),
        "{e}"
    );
}

#[test]
fn syntax_error_has_line_and_column() {
    let e = err("{\n  gateway: {\n    port: 80 80,\n  },\n}");
    match &e {
        ConfigError::Syntax { line, column, .. } => {
            assert_eq!(*line, Some(3));
            assert!(column.is_some());
        }
        other => panic!("expected a syntax error, got {other}"),
    }
    assert!(e.to_string().contains("at line 3 column"), "{e}");
    assert!(e.key_path().is_none());
}

#[test]
fn duplicate_keys_and_non_finite_numbers_are_syntax_errors() {
    let e = err("{\n  sandbox: { mode: 'all' },\n  sandbox: { mode: 'tools' },\n}");
    assert!(
        matches!(e, ConfigError::Syntax { line: Some(_), .. }),
        "{e}"
    );
    assert!(e.to_string().contains("duplicate key \"sandbox\""), "{e}");
    let e = err("{sandbox: {limits: {cpus: Infinity}}}");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
}

#[test]
fn unknown_key_suggests_nearest() {
    let e = assert_err(
        "{sandbox: {mood: 'all'}}",
        "sandbox.mood",
        "sandbox.mood: unknown key; did you mean \"mode\"?",
    );
    assert!(
        matches!(e.problem(), Some(Problem::UnknownKey { suggestion: Some(s), .. }) if s == "mode")
    );
    assert_err("{gatway: {}}", "gatway", "did you mean \"gateway\"?");
    assert_err(
        "{sandbox: {limits: {memoryMB: 1}}}",
        "sandbox.limits.memoryMB",
        "did you mean \"memoryMb\"?",
    );
    assert_err(
        "{channels: {telegram: {dm_policy: 'open'}}}",
        "channels.telegram.dm_policy",
        "did you mean \"dmPolicy\"?",
    );
    assert_err(
        "{users: {anna: {trusted: 'owner'}}}",
        "users.anna.trusted",
        "did you mean \"trust\"?",
    );
    // Nothing close: list what is allowed instead.
    assert_err(
        "{logging: {zzzzzz: 1}}",
        "logging.zzzzzz",
        "allowed keys: \"level\", \"tools\", \"format\"",
    );
}

#[test]
fn wrong_types_say_what_was_expected() {
    assert_err(
        "{gateway: {port: 'abc'}}",
        "gateway.port",
        "gateway.port: expected a number from 1 to 65535, found \"abc\"",
    );
    assert_err(
        "{gateway: {port: 70000}}",
        "gateway.port",
        "expected a number from 1 to 65535, found 70000",
    );
    assert_err(
        "{gateway: {port: 0}}",
        "gateway.port",
        "expected a number from 1 to 65535, found 0",
    );
    assert_err(
        "{gateway: {bind: 'localhost'}}",
        "gateway.bind",
        "expected an IP address",
    );
    assert_err(
        "{sandbox: {limits: {pids: -1}}}",
        "sandbox.limits.pids",
        "expected a whole number of 0 or more, found -1",
    );
    assert_err(
        "{sandbox: {limits: {cpus: 'two'}}}",
        "sandbox.limits.cpus",
        "expected a number, found \"two\"",
    );
    assert_err(
        "{onboarding: {enabled: 'yes'}}",
        "onboarding.enabled",
        "expected true or false, found \"yes\"",
    );
    assert_err("{gateway: 5}", "gateway", "expected an object, found 5");
    assert_err(
        "{tools: {allow: 'read'}}",
        "tools.allow",
        "expected an array, found \"read\"",
    );
    assert_err(
        "{users: {anna: {identities: ['telegram:1', 7]}}}",
        "users.anna.identities[1]",
        "found 7",
    );
    assert_err("[1]", "(top level)", "expected an object");
}

#[test]
fn unknown_enum_values_list_allowed_and_suggest() {
    let e = assert_err(
        "{sandbox: {mode: 'tool'}}",
        "sandbox.mode",
        "unknown value \"tool\"; expected one of \"all\", \"tools\", \"none\"; did you mean \"tools\"?",
    );
    assert!(matches!(e.problem(), Some(Problem::UnknownValue { .. })));
    assert_err(
        "{channels: {telegram: {dmPolicy: 'opne'}}}",
        "channels.telegram.dmPolicy",
        "did you mean \"open\"?",
    );
    assert_err(
        "{sandbox: {workspaceAccess: 'readonly'}}",
        "sandbox.workspaceAccess",
        "\"rw\", \"ro\", \"none\"",
    );
    assert_err(
        "{tools: {exec: {security: 'strict'}}}",
        "tools.exec.security",
        "\"allowlist\", \"blocklist\", \"full\"",
    );
    assert_err(
        "{users: {anna: {trust: 'admin'}}}",
        "users.anna.trust",
        "\"owner\", \"family\"",
    );
    assert_err(
        "{logging: {format: 'jsno'}}",
        "logging.format",
        "did you mean \"json\"?",
    );
}

#[test]
fn unknown_tools_are_refused_with_suggestion() {
    assert_err(
        "{tools: {allow: ['read', 'webfetch']}}",
        "tools.allow[1]",
        "did you mean \"web_fetch\"?",
    );
    assert_err(
        "{tools: {deny: ['shell']}}",
        "tools.deny[0]",
        "\"read\", \"write\", \"edit\", \"exec\", \"web_fetch\", \"memory_search\", \"web_search\"",
    );
    assert_err(
        "{tools: {deny: ['memory-search']}}",
        "tools.deny[0]",
        "did you mean \"memory_search\"?",
    );
}

#[test]
fn model_references_must_name_known_providers() {
    assert_err(
        "{model: {primary: 'claude'}}",
        "model.primary",
        "expected \"provider/model\"",
    );
    assert_err(
        "{model: {primary: 'anthropic/'}}",
        "model.primary",
        "expected \"provider/model\"",
    );
    assert_err(
        "{model: {primary: 'antropic/claude'}}",
        "model.primary",
        "did you mean \"anthropic\"?",
    );
    assert_err(
        "{model: {fallbacks: ['openai/gpt-4o', 'ollama/llama3']}}",
        "model.fallbacks[1]",
        "provider \"ollama\" is neither configured",
    );
    let c = load("{providers: {ollama: {api: 'openai', baseUrl: 'http://127.0.0.1:11434/v1'}}, model: {primary: 'ollama/llama3.1/8b'}}").unwrap();
    assert_eq!(c.model.primary.provider, "ollama");
    assert_eq!(c.model.primary.model, "llama3.1/8b");
}

#[test]
fn provider_rules() {
    assert_err(
        "{providers: {local: {baseUrl: 'http://127.0.0.1:1'}}}",
        "providers.local.api",
        "required",
    );
    assert_err(
        "{providers: {local: {api: 'openai', baseUrl: 'not a url'}}}",
        "providers.local.baseUrl",
        "expected an http(s) URL",
    );
    assert_err(
        "{providers: {Local: {api: 'openai'}}}",
        "providers.Local",
        "provider names",
    );
    assert_err(
        "{providers: {local: {api: 'gemini'}}}",
        "providers.local.api",
        "\"anthropic\", \"openai\"",
    );
    assert_err(
        "{providers: {anthropic: {apiKey: ''}}}",
        "providers.anthropic.apiKey",
        "must not be empty",
    );
}

#[test]
fn gateway_rules() {
    assert_err(
        "{gateway: {bind: '0.0.0.0'}}",
        "gateway.auth.token",
        "required because gateway.bind (0.0.0.0) is not a loopback address",
    );
    assert_err(
        "{gateway: {bind: '::1', auth: {token: 'short'}}}",
        "gateway.auth.token",
        "too short",
    );
    load("{gateway: {bind: '::1'}}").unwrap();
    load("{gateway: {bind: '0.0.0.0', auth: {token: 'abcdefghijklmnopqrstuvwx'}}}").unwrap();
    assert_err(
        "{gateway: {rateLimit: {burst: 0}}}",
        "gateway.rateLimit.burst",
        "must be greater than 0",
    );
    for key in ["unauthenticatedPerMinute", "unauthenticatedBurst"] {
        assert_err(
            &format!("{{gateway: {{rateLimit: {{{key}: 0}}}}}}"),
            &format!("gateway.rateLimit.{key}"),
            "must be greater than 0",
        );
    }
    let limits = load("{}").unwrap().gateway.rate_limit;
    assert_eq!(
        (
            limits.per_minute,
            limits.burst,
            limits.unauthenticated_per_minute,
            limits.unauthenticated_burst
        ),
        (100, 50, 60, 30)
    );
}

#[test]
fn pending_pairing_caps() {
    let c = load("{}").unwrap();
    assert_eq!(c.channels.max_pending_pairings, 100);
    assert_eq!(c.channels.telegram.max_pending_pairings, 50);
    let c = load("{channels: {maxPendingPairings: 7, telegram: {maxPendingPairings: 3}}}").unwrap();
    assert_eq!(c.channels.max_pending_pairings, 7);
    assert_eq!(c.channels.telegram.max_pending_pairings, 3);
    assert_err(
        "{channels: {maxPendingPairings: 0}}",
        "channels.maxPendingPairings",
        "allowlist",
    );
    assert_err(
        "{channels: {telegram: {maxPendingPairings: 0}}}",
        "channels.telegram.maxPendingPairings",
        "at least 1",
    );
}

#[test]
fn public_url_and_trusted_proxies() {
    let c = load("{gateway: {publicUrl: 'https://Chat.Example.com/', trustedProxies: ['172.18.0.2', '::1']}}").unwrap();
    assert_eq!(
        c.gateway.public_origin().as_deref(),
        Some("https://chat.example.com")
    );
    assert!(c.gateway.served_over_https());
    assert_eq!(c.gateway.trusted_proxies.len(), 2);
    let c = load("{gateway: {publicUrl: 'http://10.0.0.5:18790'}}").unwrap();
    assert!(!c.gateway.served_over_https());
    assert!(!load("{}").unwrap().gateway.served_over_https());
    for (bad, needle) in [
        ("'chat.example.com'", "not a URL"),
        ("'ftp://chat.example.com'", "https://"),
        (
            "'https://user:pw@chat.example.com'",
            "user name or password",
        ),
        ("'https://chat.example.com/moltmate'", "origin only"),
        ("'https://chat.example.com/?a=b'", "origin only"),
        ("'https://chat.example.com:0'", "port 0"),
        ("' https://chat.example.com'", "plainly"),
        ("'https:chat.example.com'", "plainly"),
    ] {
        assert_err(
            &format!("{{gateway: {{publicUrl: {bad}}}}}"),
            "gateway.publicUrl",
            needle,
        );
    }
    assert_err(
        "{gateway: {trustedProxies: ['10.0.0.0/8']}}",
        "gateway.trustedProxies",
        "ranges are not supported",
    );
}

#[test]
fn telegram_rules() {
    assert_err(
        "{channels: {telegram: {botToken: 'x', dmPolicy: 'open'}}}",
        "channels.telegram.allowFrom",
        "confirm by adding \"*\"",
    );
    let c = load("{channels: {telegram: {botToken: 'x', dmPolicy: 'open', allowFrom: ['*']}}}")
        .unwrap();
    assert!(c.channels.telegram.is_enabled());
    assert!(c.channels.telegram.allows("42"));
    assert_err(
        "{channels: {telegram: {enabled: true}}}",
        "channels.telegram.botToken",
        "required when channels.telegram.enabled is true",
    );
    let c = load("{channels: {telegram: {botToken: 'x', enabled: false, allowFrom: [123456789, '987', -100123]}}}").unwrap();
    assert!(!c.channels.telegram.is_enabled());
    assert_eq!(
        c.channels.telegram.allow_from,
        vec!["123456789", "987", "-100123"]
    );
    assert!(c.channels.telegram.allows("987") && !c.channels.telegram.allows("1"));
    assert_err(
        "{channels: {telegram: {allowFrom: ['a b']}}}",
        "channels.telegram.allowFrom[0]",
        "expected a Telegram user id",
    );
    assert_err(
        "{channels: {telegram: {allowFrom: [true]}}}",
        "channels.telegram.allowFrom[0]",
        "expected a Telegram user id (number or string) or \"*\", found true",
    );
    assert_err(
        "{channels: {telegram: {pollTimeoutSeconds: 0}}}",
        "channels.telegram.pollTimeoutSeconds",
        "from 1 to 600",
    );
}

#[test]
fn sandbox_rules() {
    assert_err(
        "{sandbox: {mode: 'none'}}",
        "sandbox.mode",
        "requires sandbox.dangerouslyAllowHostExec: true",
    );
    let c = load("{sandbox: {mode: 'none', dangerouslyAllowHostExec: true}}").unwrap();
    assert_eq!(c.sandbox.mode, SandboxMode::None);
    for key in ["memoryMb", "pids", "diskMb", "tmpMb", "outputKb"] {
        assert_err(
            &format!("{{sandbox: {{limits: {{{key}: 0}}}}}}"),
            &format!("sandbox.limits.{key}"),
            "must be greater than 0",
        );
    }
    assert_err(
        "{sandbox: {limits: {cpus: 0}}}",
        "sandbox.limits.cpus",
        "greater than 0",
    );
    assert_err(
        "{sandbox: {prune: {idleMinutes: 0}}}",
        "sandbox.prune.idleMinutes",
        "greater than 0",
    );
    // Sandbox uids stay clear of logins, nobody and the 16-bit boundary, and below 2^31.
    for (range, text) in [
        ("{start: 1000, count: 10}", "at least 65536"),
        ("{start: 60000, count: 100000}", "at least 65536"),
        ("{start: 2000000000, count: 0}", "at least 1"),
        (
            "{start: 2147483000, count: 1000}",
            "must not exceed 2147483648",
        ),
    ] {
        assert_err(
            &format!("{{sandbox: {{uidRange: {range}}}}}"),
            "sandbox.uidRange",
            text,
        );
    }
    assert_err(
        "{sandbox: {uidRange: {begin: 100000}}}",
        "sandbox.uidRange.begin",
        "unknown",
    );
    let c = load("{sandbox: {uidRange: {start: 700000000, count: 5000}}}").unwrap();
    assert_eq!(
        c.sandbox.uid_range.to_core(),
        moltmate_core::sandbox::UidRange {
            start: 700_000_000,
            count: 5000
        }
    );
    assert_err(
        "{sandbox: {allowedDomains: ['https://x.org']}}",
        "sandbox.allowedDomains[0]",
        "expected a lowercase host name",
    );
    let c = load("{sandbox: {network: 'proxy', allowedDomains: ['pypi.org', '*.github.com'], limits: {cpus: 0.5}}}").unwrap();
    assert_eq!(c.sandbox.profile().limits.cpu_millis, 500);
    assert_eq!(c.sandbox.profile().network, SandboxNetwork::Proxy);
}

/// `sandbox.maxActive`, `queueTimeoutSeconds` and `sandbox.total`: defaults, explicit values,
/// and every value that cannot work refused with its key.
#[test]
fn sandbox_total_and_active_cap_rules() {
    let c = load("{}").unwrap();
    assert_eq!(c.sandbox.max_active, 32);
    assert_eq!(c.sandbox.queue_timeout_seconds, 60);
    assert_eq!(c.sandbox.total.memory_mb, None, "derived from the host");
    assert_eq!(c.sandbox.total.cpus, None, "derived from the host");
    assert_eq!(c.sandbox.total.pids, None);
    assert_eq!(c.sandbox.total.cgroup, "moltmate");
    let c = load("{sandbox: {maxActive: 2, queueTimeoutSeconds: 5, total: {memoryMb: 1024, cpus: 1.5, pids: 500, cgroup: 'moltmate_test_7'}}}").unwrap();
    assert_eq!(c.sandbox.max_active, 2);
    assert_eq!(c.sandbox.total.memory_mb, Some(1024));
    assert_eq!(c.sandbox.total.cpus, Some(1.5));
    assert_eq!(c.sandbox.total.pids, Some(500));
    assert_eq!(c.sandbox.total.cgroup, "moltmate_test_7");
    for (text, key, needle) in [
        (
            "{sandbox: {maxActive: 0}}",
            "sandbox.maxActive",
            "between 1 and 10000",
        ),
        (
            "{sandbox: {queueTimeoutSeconds: 0}}",
            "sandbox.queueTimeoutSeconds",
            "between 1 and 3600",
        ),
        (
            "{sandbox: {total: {memoryMb: 8}}}",
            "sandbox.total.memoryMb",
            "between 64",
        ),
        (
            "{sandbox: {total: {memoryMb: 256}}}",
            "sandbox.total.memoryMb",
            "less than one sandbox's sandbox.limits.memoryMb (512)",
        ),
        (
            "{sandbox: {total: {cpus: 0.5}}}",
            "sandbox.total.cpus",
            "less than one sandbox's",
        ),
        (
            "{sandbox: {total: {cpus: 0}}}",
            "sandbox.total.cpus",
            "between 0.01 and 1024",
        ),
        (
            "{sandbox: {total: {pids: 64}}}",
            "sandbox.total.pids",
            "less than one sandbox's sandbox.limits.pids (128)",
        ),
        (
            "{sandbox: {total: {pids: 5}}}",
            "sandbox.total.pids",
            "between 16",
        ),
        (
            "{sandbox: {total: {cgroup: '../docker'}}}",
            "sandbox.total.cgroup",
            "no '-' or '/'",
        ),
        (
            "{sandbox: {total: {cgroup: 'molt-mate'}}}",
            "sandbox.total.cgroup",
            "no '-' or '/'",
        ),
        (
            "{sandbox: {total: {cgroup: ''}}}",
            "sandbox.total.cgroup",
            "found \"\"",
        ),
    ] {
        assert_err(text, key, needle);
    }
    assert_err(
        "{sandbox: {total: {memmoryMb: 1}}}",
        "sandbox.total.memmoryMb",
        "memoryMb",
    );
}

/// The old default `safeBins` held `awk`, `sed`, `find` and `sort`, each of which runs other
/// programs: `awk 'BEGIN{system("id")}'` was a shell under `allowlist`.
#[test]
fn safe_bins_that_run_programs_are_refused_naming_why() {
    for (list, index, needle) in [
        (
            r#"["cat", "head", "tail", "awk"]"#,
            3,
            "\"awk\" runs other programs (system()",
        ),
        (
            r#"["sed"]"#,
            0,
            "\"sed\" runs other programs (GNU `e` command",
        ),
        (r#"["ls", "find"]"#, 1, "`-exec`"),
        (r#"["sort"]"#, 0, "--compress-program"),
        (r#"["sh"]"#, 0, "is a shell"),
        (r#"["cat", "bash"]"#, 1, "is a shell"),
        (r#"["busybox"]"#, 0, "is a shell"),
        (r#"["python3.11"]"#, 0, "interpreter"),
        (r#"["perl"]"#, 0, "interpreter"),
        (r#"["node"]"#, 0, "interpreter"),
        (r#"["gawk"]"#, 0, "system()"),
        (r#"["env"]"#, 0, "runs the program named in its arguments"),
        (r#"["xargs"]"#, 0, "runs the program named"),
        (r#"["timeout"]"#, 0, "runs the program named"),
        (r#"["nice"]"#, 0, "runs the program named"),
        (r#"["tar"]"#, 0, "--to-command"),
        (r#"["git"]"#, 0, "hooks"),
        (r#"["less"]"#, 0, "pager"),
        (r#"["vim"]"#, 0, "editor"),
        (r#"["tee"]"#, 0, "writes"),
        (r#"["dd"]"#, 0, "writes"),
        (r#"["split"]"#, 0, "--filter"),
        (r#"["eval"]"#, 0, "builtin"),
    ] {
        let text = format!("{{tools: {{exec: {{safeBins: {list}}}}}}}");
        let e = assert_err(&text, &format!("tools.exec.safeBins[{index}]"), needle);
        assert!(e.to_string().contains("cannot be allowlisted"), "{e}");
    }
    // Only `safeBins`: a blocklist may name anything.
    assert!(load("{tools: {exec: {blockedBins: ['awk', 'sh']}}}").is_ok());
    assert!(load("{tools: {exec: {safeBins: ['cat', 'jq', 'sha256sum']}}}").is_ok());
}

/// Regression (issue 9 review): runners of the sandbox image under names the known-bad table
/// did not know were accepted. Now a name outside the vetted table needs `vouchedBins`, and a
/// known runner cannot be vouched for.
#[test]
fn safe_bins_outside_the_vetted_table_need_the_operators_word() {
    for (list, needle) in [
        ("['x86_64']", "runs the program named"),
        ("['choom']", "runs the program named"),
        ("['pdb3']", "Python"),
        ("['vim.basic']", "editor"),
        ("['mkfs.ext4']", "writes"),
        ("['rename.ul']", "writes"),
        ("['fallocate']", "writes"),
        ("['mytool']", "vouchedBins"),
    ] {
        let text = format!("{{tools: {{exec: {{safeBins: {list}}}}}}}");
        assert_err(&text, "tools.exec.safeBins[0]", needle);
    }
    let c =
        load("{tools: {exec: {safeBins: ['cat', 'mytool'], vouchedBins: ['mytool']}}}").unwrap();
    assert_eq!(c.tools.exec.to_core().vouched_bins, ["mytool"]);
    assert_err(
        "{tools: {exec: {safeBins: ['x86_64'], vouchedBins: ['x86_64']}}}",
        "tools.exec.vouchedBins[0]",
        "nobody can vouch",
    );
    assert_err(
        "{tools: {exec: {safeBins: ['cat'], vouchedBins: ['mytool']}}}",
        "tools.exec.vouchedBins[0]",
        "not in tools.exec.safeBins",
    );
}

#[test]
fn allowed_ports_must_be_real_ports() {
    assert_err(
        "{tools: {web: {fetch: {allowedPorts: []}}}}",
        "tools.web.fetch.allowedPorts",
        "at least one port",
    );
    assert_err(
        "{tools: {web: {fetch: {allowedPorts: [443, 0]}}}}",
        "tools.web.fetch.allowedPorts[1]",
        "port 0",
    );
    assert_err(
        "{sandbox: {allowedPorts: []}}",
        "sandbox.allowedPorts",
        "at least one port",
    );
    let c = load("{tools: {web: {fetch: {allowedPorts: [8443]}}}, sandbox: {allowedPorts: [443]}}")
        .unwrap();
    assert_eq!(c.tools.web.fetch.allowed_ports, [8443]);
    assert_eq!(c.sandbox.allowed_ports, [443]);
}

#[test]
fn tool_and_misc_rules() {
    assert_err(
        "{tools: {exec: {timeoutSeconds: 400}}}",
        "tools.exec.timeoutSeconds",
        "must not exceed tools.exec.maxTimeoutSeconds (300)",
    );
    assert_err(
        "{tools: {exec: {safeBins: ['/bin/sh']}}}",
        "tools.exec.safeBins[0]",
        "without '/'",
    );
    assert_err(
        "{tools: {web: {fetch: {maxBytes: 0}}}}",
        "tools.web.fetch.maxBytes",
        "greater than 0",
    );
    assert_err(
        "{tools: {web: {fetch: {allowedDomains: ['Ex ample']}}}}",
        "tools.web.fetch.allowedDomains[0]",
        "host name",
    );
    assert_err(
        "{model: {maxToolIterations: 0}}",
        "model.maxToolIterations",
        "greater than 0",
    );
    assert_err(
        "{model: {maxOutputTokens: 300000}}",
        "model.maxOutputTokens",
        "smaller than model.contextWindowTokens",
    );
    assert_err(
        "{session: {compactAtRatio: 1.5}}",
        "session.compactAtRatio",
        "at most 1",
    );
    assert_err(
        "{session: {idleResetMinutes: 0}}",
        "session.idleResetMinutes",
        "greater than 0",
    );
    assert_err(
        "{logging: {level: ''}}",
        "logging.level",
        "must not be empty",
    );
}

#[test]
fn family_and_user_rules() {
    assert_err(
        "{families: {Home: {members: []}}}",
        "families.Home",
        "family names",
    );
    assert_err(
        "{families: {home: {members: ['Anna']}}}",
        "families.home.members[0]",
        "user id must be",
    );
    assert_err(
        "{families: {a: {members: ['anna']}, b: {members: ['ben', 'anna']}}}",
        "families.b.members[1]",
        "user \"anna\" is already in family \"a\"; a user belongs to at most one family",
    );
    assert_err(
        "{families: {a: {members: ['anna', 'anna']}}}",
        "families.a.members[1]",
        "listed twice",
    );
    assert_err(
        "{users: {'Bad User': {}}}",
        "users.Bad User",
        "user id must be",
    );
    assert_err(
        "{users: {anna: {identities: ['telegram']}}}",
        "users.anna.identities[0]",
        "identity must look like \"channel:peer\"",
    );
    assert_err(
        "{users: {anna: {identities: ['fax:1']}}}",
        "users.anna.identities[0]",
        "unknown channel",
    );
    assert_err(
        "{users: {anna: {identities: ['telegram:1']}, ben: {identities: ['web:ben', 'telegram:1']}}}",
        "users.ben.identities[1]",
        "identity \"telegram:1\" already belongs to user \"anna\"",
    );
    assert_err(
        "{users: {anna: {identities: ['telegram:1', 'discord:group/5']}}}",
        "users.anna.identities",
        "a group is a user of its own",
    );
    assert!(
        load("{users: {team: {identities: ['discord:group/5', 'slack:group/T1/C2']}}}").is_ok()
    );

    let c = load(
        "{families: {home: {members: ['anna', 'ben']}},
          users: {anna: {identities: ['telegram:1', 'web:anna'], trust: 'owner', displayName: 'Anna'}, ben: {}}}",
    )
    .unwrap();
    let anna = UserId::new("anna").unwrap();
    let ben = UserId::new("ben").unwrap();
    let id: Identity = "telegram:1".parse().unwrap();
    assert_eq!(c.user_for_identity(&id), Some(&anna));
    assert_eq!(c.family_of(&ben), Some("home"));
    assert_eq!(c.trust_of(&anna, ChannelKind::Telegram), TrustLevel::Owner);
    assert_eq!(c.trust_of(&ben, ChannelKind::Web), TrustLevel::Friend);
    assert_eq!(
        c.trust_of(&ben, ChannelKind::Telegram),
        TrustLevel::Stranger
    );
}

#[test]
fn env_substitution() {
    let env = |name: &str| match name {
        "TG_TOKEN" => Some("123:tg-secret-value".to_string()),
        "PORT_HOST" => Some("127.0.0.1".to_string()),
        _ => None,
    };
    let c = Config::from_json5_str(
        "{gateway: {bind: '${PORT_HOST}'}, channels: {telegram: {botToken: '${TG_TOKEN}'}}, onboarding: {defaultPersona: 'cost $5, $${HOME}'}}",
        "moltmate.json",
        &env,
    )
    .unwrap();
    assert_eq!(
        c.channels.telegram.bot_token.as_ref().map(|t| t.expose()),
        Some("123:tg-secret-value")
    );
    assert_eq!(c.onboarding.default_persona, "cost $5, ${HOME}");

    let e = Config::from_json5_str(
        "{channels: {telegram: {botToken: '${MISSING_TOKEN}'}}}",
        "moltmate.json",
        &env,
    )
    .map(|_| ())
    .unwrap_err();
    assert_eq!(e.key_path(), Some("channels.telegram.botToken"));
    assert!(matches!(e.problem(), Some(Problem::MissingEnvVar { var }) if var == "MISSING_TOKEN"));
    assert!(e.to_string().contains("MISSING_TOKEN is not set"), "{e}");

    let e = Config::from_json5_str(
        "{users: {anna: {identities: ['web:${ANNA'] }}}",
        "moltmate.json",
        &env,
    )
    .map(|_| ())
    .unwrap_err();
    assert_eq!(e.key_path(), Some("users.anna.identities[0]"));
    assert!(matches!(e.problem(), Some(Problem::BadEnvReference(_))));
}

#[test]
fn builtin_providers_and_env_key_fallbacks() {
    let env = |name: &str| match name {
        "ANTHROPIC_API_KEY" => Some("sk-ant-from-env".to_string()),
        "OPENAI_API_KEY" => Some(String::new()),
        _ => None,
    };
    let c = Config::from_json5_str(
        "{providers: {ollama: {api: 'openai', baseUrl: 'http://127.0.0.1:11434/v1'}, work: {api: 'anthropic', apiKey: 'sk-work'}}}",
        "moltmate.json",
        &env,
    )
    .unwrap();
    let providers = c.resolved_providers();
    let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["anthropic", "ollama", "openai", "work"]);
    let by = |n: &str| providers.iter().find(|p| p.name == n).unwrap();
    assert_eq!(by("anthropic").api, ProviderApi::Anthropic);
    assert_eq!(by("anthropic").base_url, "https://api.anthropic.com");
    assert_eq!(
        by("anthropic").api_key.as_ref().map(|k| k.expose()),
        Some("sk-ant-from-env")
    );
    assert_eq!(by("openai").base_url, "https://api.openai.com/v1");
    assert!(by("openai").api_key.is_none(), "an empty env var is no key");
    assert_eq!(by("ollama").base_url, "http://127.0.0.1:11434/v1");
    assert!(by("ollama").api_key.is_none());
    assert_eq!(
        by("work").api_key.as_ref().map(|k| k.expose()),
        Some("sk-work")
    );
    assert!(c.resolved_provider("nope").is_none());

    // A builtin name configured without `api` keeps its builtin kind and env key.
    let c = Config::from_json5_str(
        "{providers: {anthropic: {baseUrl: 'http://127.0.0.1:9'}}}",
        "m",
        &env,
    )
    .unwrap();
    let a = c.resolved_provider("anthropic").unwrap();
    assert_eq!(
        (a.api, a.base_url.as_str()),
        (ProviderApi::Anthropic, "http://127.0.0.1:9")
    );
    assert_eq!(
        a.api_key.as_ref().map(|k| k.expose()),
        Some("sk-ant-from-env")
    );
}

#[test]
fn debug_never_prints_secrets() {
    let env = |name: &str| (name == "ANTHROPIC_API_KEY").then(|| "sk-env-SECRET-1".to_string());
    let c = Config::from_json5_str(
        "{gateway: {auth: {token: 'gw-SECRET-token-0123456789'}},
          providers: {x: {api: 'openai', apiKey: 'sk-file-SECRET-2'}},
          channels: {telegram: {botToken: '123:tg-SECRET-3'}}}",
        "moltmate.json",
        &env,
    )
    .unwrap();
    let debug = format!("{c:?} {:?}", c.resolved_providers());
    assert!(!debug.contains("SECRET"), "{debug}");
    assert!(debug.contains("<redacted>"));
}

#[test]
fn errors_never_echo_secrets() {
    let e = err("{channels: {telegram: {botToken: 1234567890}}}");
    assert_eq!(e.key_path(), Some("channels.telegram.botToken"));
    assert!(!e.to_string().contains("1234567890"), "{e}");
    let e = err("{gateway: {bind: '0.0.0.0', auth: {token: 'SECRETshort'}}}");
    assert!(!e.to_string().contains("SECRET"), "{e}");
}

#[test]
fn sandbox_digest_is_stable_and_sensitive() {
    let a = load("{}").unwrap().digest_of_sandbox_section();
    assert_eq!(a.len(), 64);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    // Same settings, different spelling and order: same digest.
    let b = load(
        "{sandbox: {limits: {cpus: 1, memoryMb: 512}, image: 'moltmate-sandbox:bookworm-slim'}}",
    )
    .unwrap()
    .digest_of_sandbox_section();
    assert_eq!(a, b);
    // Settings that do not shape a sandbox do not change it.
    let c = load(
        "{sandbox: {warmPool: 3, prewarm: false, prune: {idleMinutes: 5}}, gateway: {port: 9999}}",
    )
    .unwrap();
    assert_eq!(a, c.digest_of_sandbox_section());
    for changed in [
        "{sandbox: {limits: {memoryMb: 1024}}}",
        "{sandbox: {image: 'other:latest'}}",
        "{sandbox: {network: 'proxy'}}",
        "{sandbox: {workspaceAccess: 'ro'}}",
        "{sandbox: {allowedDomains: ['pypi.org']}}",
    ] {
        assert_ne!(
            a,
            load(changed).unwrap().digest_of_sandbox_section(),
            "{changed}"
        );
    }
}

#[test]
fn limits_budgets_prices_and_family_budgets_load() {
    use moltmate_config::Allowance;
    let c = load(
        r#"{
          model: { prices: { "anthropic/claude-sonnet-4-5": { inputPerMTok: 3, outputPerMTok: 15 },
                             "ollama/*": { inputPerMTok: 0, outputPerMTok: 0 } } },
          limits: { tokensPerDay: "unlimited", spendPerMonth: 40.5,
                    trust: { stranger: { messagesPerDay: 20, spendPerMonth: 0.5, toolCallsPerAnswer: 4 } } },
          families: { home: { members: ["anna"], budget: { messagesPerDay: 300 } } },
        }"#,
    )
    .unwrap();
    assert_eq!(
        c.model.prices["anthropic/claude-sonnet-4-5"].output_per_m_tok,
        15.0
    );
    assert_eq!(c.limits.tokens_per_day, Allowance::Unlimited);
    let stranger = c.limits.for_trust(TrustLevel::Stranger);
    assert_eq!(stranger.messages_per_day, Allowance::Limited(20));
    assert_eq!(stranger.spend_per_month, Allowance::Limited(0.5));
    assert_eq!(stranger.tool_calls_per_answer, 4);
    assert_eq!(stranger.tokens_per_day, Allowance::Limited(300_000));
    assert_eq!(
        c.limits.for_trust(TrustLevel::Owner).spend_per_month,
        Allowance::Limited(40.5)
    );
    assert_eq!(
        c.families["home"].budget.messages_per_day,
        Allowance::Limited(300)
    );
    assert_eq!(
        c.families["home"].budget.tokens_per_day,
        Allowance::Unlimited
    );
}

#[test]
fn limit_rules() {
    assert_err(
        "{limits: {messagesPerDay: -1}}",
        "limits.messagesPerDay",
        "\"unlimited\"",
    );
    assert_err(
        "{limits: {messagesPerDay: 'lots'}}",
        "limits.messagesPerDay",
        "\"unlimited\"",
    );
    assert_err(
        "{limits: {tokensPerDay: 1.5}}",
        "limits.tokensPerDay",
        "whole number",
    );
    assert_err(
        "{limits: {toolCallsPerAnswer: 0}}",
        "limits.toolCallsPerAnswer",
        "from 1 to 1000",
    );
    assert_err(
        "{limits: {storedKbPerTurn: 8}}",
        "limits.storedKbPerTurn",
        "from 64",
    );
    assert_err(
        "{limits: {trust: {stranger: {queuedMessages: 0}}}}",
        "limits.trust.stranger.queuedMessages",
        "from 1",
    );
    assert_err(
        "{limits: {trust: {strangers: {}}}}",
        "limits.trust.strangers",
        "stranger",
    );
    assert_err(
        "{limits: {spendPerMonth: 1e12}}",
        "limits.spendPerMonth",
        "US dollars",
    );
    assert_err(
        "{model: {prices: {'sonnet': {inputPerMTok: 3, outputPerMTok: 15}}}}",
        "model.prices.sonnet",
        "provider/model",
    );
    assert_err(
        "{model: {prices: {'a/b': {inputPerMTok: -3, outputPerMTok: 15}}}}",
        "model.prices.a/b.inputPerMTok",
        "per million tokens",
    );
    assert_err(
        "{families: {home: {members: [], budget: {spendPerMonth: -2}}}}",
        "families.home.budget.spendPerMonth",
        "\"unlimited\"",
    );
    // Zero is a budget too: nothing allowed.
    let c = load("{limits: {trust: {restricted: {messagesPerDay: 0}}}}").unwrap();
    assert_eq!(
        c.limits.for_trust(TrustLevel::Restricted).messages_per_day,
        moltmate_config::Allowance::Limited(0)
    );
}

/// `Config::load` opened the file with a plain `open`, which waits for a writer when the file
/// is a FIFO: `serve`, `config check` and `doctor` hung forever.
#[test]
fn a_fifo_in_the_config_s_place_is_refused_not_waited_on() {
    let home = tempfile::tempdir().unwrap();
    let path = home.path().join("moltmate.json");
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = Config::load(path.parent().unwrap(), &no_env)
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = done.send(result);
    });
    let result = wait
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("load returns instead of waiting for a writer");
    let error = result.unwrap_err();
    assert!(error.contains("not a regular file"), "{error}");
}

#[test]
fn web_search_is_off_by_default_and_validated_when_configured() {
    use moltmate_config::SearchProvider;
    let c = load("{}").unwrap();
    let s = &c.tools.web.search;
    assert!(!s.enabled);
    assert_eq!(s.provider, SearchProvider::Brave);
    assert_eq!(
        (s.max_results, s.timeout_seconds, s.per_user_per_hour),
        (5, 10, 60)
    );
    assert_eq!(
        s.effective_base_url().as_deref(),
        Some("https://api.search.brave.com/res/v1")
    );
    assert!(c.web_search_api_key().is_none());
    assert!(c.tools.allow.contains(&ToolName::WebSearch));

    assert_err(
        "{tools: {web: {search: {enabled: true}}}}",
        "tools.web.search.apiKey",
        "BRAVE_API_KEY",
    );
    assert_err(
        "{tools: {web: {search: {maxResults: 21}}}}",
        "tools.web.search.maxResults",
        "from 1 to 20",
    );
    assert_err(
        "{tools: {web: {search: {perUserPerHour: 0}}}}",
        "tools.web.search.perUserPerHour",
        "from 1 to 10000",
    );
    assert_err(
        "{tools: {web: {search: {timeoutSeconds: 0}}}}",
        "tools.web.search.timeoutSeconds",
        "from 1 to 60",
    );
    assert_err(
        "{tools: {web: {search: {provider: 'searx'}}}}",
        "tools.web.search.provider",
        "did you mean \"searxng\"?",
    );
    assert_err(
        "{tools: {web: {search: {provider: 'searxng', enabled: true}}}}",
        "tools.web.search.baseUrl",
        "required for provider \"searxng\"",
    );
    assert_err(
        "{tools: {web: {search: {provider: 'searxng', baseUrl: 'http://s:8080', apiKey: 'k'}}}}",
        "tools.web.search.apiKey",
        "SearXNG takes no API key",
    );
    for (base, needle) in [
        ("ftp://s.example", "https://"),
        ("s.example:8080", "https://"),
        ("http://user:pw@s.example", "user name or password"),
        ("http://s.example/?format=json", "query"),
        ("http://s.example:0", "port 0"),
    ] {
        assert_err(
            &format!("{{tools: {{web: {{search: {{provider: 'searxng', baseUrl: '{base}'}}}}}}}}"),
            "tools.web.search.baseUrl",
            needle,
        );
    }
    // A Brave key never travels in clear text beyond this machine.
    assert_err(
        "{tools: {web: {search: {apiKey: 'k', baseUrl: 'http://search.example'}}}}",
        "tools.web.search.baseUrl",
        "unencrypted",
    );
    assert_err(
        "{tools: {web: {search: {apiKey: ''}}}}",
        "tools.web.search.apiKey",
        "must not be empty",
    );
    // A private address is fine for a SearXNG instance: it is the operator's own.
    let c = load(
        "{tools: {web: {search: {enabled: true, provider: 'searxng', baseUrl: 'http://10.0.0.7:8080'}}}}",
    )
    .unwrap();
    assert!(c.tools.web.search.enabled);
    assert!(c.web_search_api_key().is_none());
    load("{tools: {web: {search: {enabled: true, apiKey: 'k', baseUrl: 'http://127.0.0.1:9'}}}}")
        .unwrap();
}

#[test]
fn web_search_takes_its_brave_key_from_the_environment_and_never_shows_it() {
    let env = |name: &str| (name == "BRAVE_API_KEY").then(|| "BSA-from-env".to_string());
    let c = Config::from_json5_str("{tools: {web: {search: {enabled: true}}}}", "m.json", &env)
        .unwrap();
    assert_eq!(
        c.web_search_api_key().map(|k| k.expose().to_string()),
        Some("BSA-from-env".to_string())
    );
    assert!(!format!("{c:?}").contains("BSA-from-env"));
    // The file's key wins, and an empty variable counts as unset.
    let c = Config::from_json5_str(
        "{tools: {web: {search: {enabled: true, apiKey: 'BSA-file'}}}}",
        "m.json",
        &env,
    )
    .unwrap();
    assert_eq!(c.web_search_api_key().unwrap().expose(), "BSA-file");
    let empty = |name: &str| (name == "BRAVE_API_KEY").then(String::new);
    let e = Config::from_json5_str(
        "{tools: {web: {search: {enabled: true}}}}",
        "m.json",
        &empty,
    )
    .map(|_| ())
    .unwrap_err();
    assert_eq!(e.key_path(), Some("tools.web.search.apiKey"));
    // A mistyped key is not echoed.
    let e = Config::from_json5_str(
        "{tools: {web: {search: {apiKey: 12345678}}}}",
        "m.json",
        &env,
    )
    .map(|_| ())
    .unwrap_err();
    assert!(!e.to_string().contains("12345678"), "{e}");
}

#[test]
fn reminder_keys_load_and_bad_values_name_their_key() {
    let c = load(
        "{users: {anna: {timezone: 'Europe/Berlin', preferredChannel: 'telegram'}},
          limits: {reminders: 5, reminderMinIntervalMinutes: 60, trust: {stranger: {reminders: 2}}}}",
    )
    .unwrap();
    let anna = &c.users[&UserId::new("anna").unwrap()];
    assert_eq!(anna.timezone.as_deref(), Some("Europe/Berlin"));
    assert_eq!(anna.preferred_channel, Some(ChannelKind::Telegram));
    assert_eq!(c.limits.for_trust(TrustLevel::Owner).reminders, 5);
    assert_eq!(c.limits.for_trust(TrustLevel::Stranger).reminders, 2);
    assert_eq!(c.limits.reminder_min_interval_minutes, 60);
    let defaults = load("{}").unwrap();
    assert_eq!(defaults.limits.for_trust(TrustLevel::Owner).reminders, 50);
    assert_eq!(
        defaults.limits.for_trust(TrustLevel::Stranger).reminders,
        10
    );
    assert_eq!(defaults.limits.reminder_min_interval_minutes, 15);

    assert_err(
        "{users: {anna: {timezone: 'Europe/Berln'}}}",
        "users.anna.timezone",
        "did you mean \"Europe/Berlin\"",
    );
    assert_err(
        "{users: {anna: {timezone: 'CEST'}}}",
        "users.anna.timezone",
        "not a time zone name",
    );
    assert_err(
        "{users: {anna: {preferredChannel: 'pigeon'}}}",
        "users.anna.preferredChannel",
        "",
    );
    assert_err(
        "{limits: {reminderMinIntervalMinutes: 0}}",
        "limits.reminderMinIntervalMinutes",
        "from 1 to 1440",
    );
    assert_err(
        "{limits: {trust: {friend: {reminders: 100000}}}}",
        "limits.trust.friend.reminders",
        "from 0 to 10000",
    );
}

#[test]
fn signal_and_whatsapp_keys_load_with_env_secrets_and_are_refused_when_wrong() {
    let env = |name: &str| match name {
        "WA_TOKEN" => Some("EAAG-secret-token".to_string()),
        "WA_SECRET" => Some("app-secret".to_string()),
        "WA_VERIFY" => Some("verify-me".to_string()),
        _ => None,
    };
    let c = Config::from_json5_str(
        r#"{ channels: {
            signal: { account: "+4917012345678", allowFrom: ["+4917011111111"], dmPolicy: "allowlist" },
            whatsapp: { phoneNumberId: "106540352242922", accessToken: "${WA_TOKEN}",
                        appSecret: "${WA_SECRET}", verifyToken: "${WA_VERIFY}", defaultTrust: "friend" },
        },
        users: { anna: { identities: ["signal:+4917011111111", "whatsapp:+4917011111111"] } } }"#,
        "moltmate.json",
        &env,
    )
    .unwrap();
    assert!(c.channels.signal.is_enabled() && c.channels.whatsapp.is_enabled());
    assert_eq!(c.channels.signal.cli_path, "signal-cli");
    let token = c.channels.whatsapp.access_token.as_ref().unwrap();
    assert_eq!(token.expose(), "EAAG-secret-token");
    assert!(!format!("{:?}", c.channels.whatsapp).contains("EAAG-secret-token"));
    assert_eq!(
        c.trust_of(&UserId::new("x").unwrap(), ChannelKind::Whatsapp),
        TrustLevel::Friend
    );
    assert!(c.users[&UserId::new("anna").unwrap()]
        .identities
        .contains(&"signal:+4917011111111".parse::<Identity>().unwrap()));

    assert_err(
        r#"{ channels: { signal: { account: "017012345678" } } }"#,
        "channels.signal.account",
        "international format",
    );
    assert_err(
        r#"{ channels: { signal: { account: "+4917012345678", allowFrom: ["123"] } } }"#,
        "channels.signal.allowFrom[0]",
        "phone number",
    );
    assert_err(
        r#"{ channels: { signal: { account: "+4917012345678", daemon: "localhost" } } }"#,
        "channels.signal.daemon",
        "tcp:host:port",
    );
    assert_err(
        r#"{ channels: { whatsapp: { phoneNumberId: "106540352242922" } } }"#,
        "channels.whatsapp.accessToken",
        "required",
    );
    assert_err(
        r#"{ channels: { whatsapp: { phoneNumberId: "+49170" } } }"#,
        "channels.whatsapp.phoneNumberId",
        "numeric",
    );
    assert_err(
        r#"{ channels: { signal: { acount: "+4917012345678" } } }"#,
        "channels.signal.acount",
        "account",
    );
}

#[test]
fn discord_and_slack_rules() {
    assert_err(
        "{channels: {discord: {enabled: true}}}",
        "channels.discord.botToken",
        "required when channels.discord.enabled is true",
    );
    assert_err(
        "{channels: {discord: {botToken: 'x', dmPolicy: 'open'}}}",
        "channels.discord.allowFrom",
        "confirm by adding \"*\"",
    );
    assert_err(
        "{channels: {discord: {botToken: 'x', allowFrom: ['@anna']}}}",
        "channels.discord.allowFrom[0]",
        "expected a Discord user id",
    );
    assert_err(
        "{channels: {discord: {groups: {enabled: true, mentions: true}}}}",
        "channels.discord.groups.mentions",
        "unknown key",
    );
    assert_err(
        "{channels: {slack: {botToken: 'xoxb-1'}}}",
        "channels.slack.appToken",
        "Socket Mode needs an app-level token",
    );
    assert_err(
        "{channels: {slack: {botToken: 'xoxb-1', appToken: 'xapp-1', allowFrom: ['U0456']}}}",
        "channels.slack.allowFrom[0]",
        "<team id>/<user id>",
    );
    assert_err(
        "{channels: {slack: {botToken: 'xoxb-1', mode: 'events'}}}",
        "channels.slack.signingSecret",
        "required with mode \"events\"",
    );
    assert_err(
        "{channels: {slack: {botToken: 'xoxb-1', mode: 'webhook'}}}",
        "channels.slack.mode",
        "",
    );
    assert_err(
        "{channels: {slack: {botToken: 'xoxb-1', mode: 'events', signingSecret: 'short'}}}",
        "channels.slack.signingSecret",
        "32 hex digits",
    );
    assert_err(
        "{channels: {slack: {botToken: 'xoxb-1', mode: 'events', signingSecret: '8f742231b10e8888abcd99aaabbb85a5', appToken: 'xapp-1'}}}",
        "channels.slack.appToken",
        "only used with mode \"socket\"",
    );
    assert_err(
        "{channels: {slack: {botToken: 'xoxb-1', appToken: 'xapp-1', signingSecret: '8f742231b10e8888abcd99aaabbb85a5'}}}",
        "channels.slack.signingSecret",
        "only used with mode \"events\"",
    );
    assert_err(
        "{channels: {slack: {botToken: 'xoxb-1', mode: 'events', signingSecret: '8f742231b10e8888abcd99aaabbb85a5', requestUrl: 'x'}}}",
        "channels.slack.requestUrl",
        "unknown key",
    );
    let events = load(
        "{channels: {slack: {botToken: 'xoxb-1', mode: 'events', signingSecret: '8f742231b10e8888abcd99aaabbb85a5'}}}",
    )
    .unwrap();
    assert_eq!(
        events.channels.slack.mode,
        moltmate_config::SlackMode::Events
    );
    assert!(!format!("{:?}", events.channels.slack).contains("8f742231b10e8888"));
    let c = load(
        "{channels: {discord: {botToken: 'x', allowFrom: ['123', 'group/456'], groups: {enabled: true}},
                     slack: {botToken: 'xoxb-1', appToken: 'xapp-1', allowFrom: ['T1/U2']}}}",
    )
    .unwrap();
    assert!(c.channels.discord.is_enabled() && c.channels.discord.groups.enabled);
    assert!(
        c.channels.discord.groups.mention,
        "mention defaults to true"
    );
    assert!(c.channels.slack.is_enabled());
    assert!(!format!("{:?}", c.channels.slack).contains("xapp-1"));
}
