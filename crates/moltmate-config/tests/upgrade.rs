//! Upgrades: the config the previous release's `moltmate init` wrote
//! (`fixtures/v3-starter.json5`, as of commit b8bf992) still loads, except for what this release
//! refuses on purpose — the `safeBins` that run other programs — which is refused with the key
//! and the reason (README, "Decisions"), and loads once those entries are removed.

use moltmate_config::{Config, ConfigError};

const V3_STARTER: &str = include_str!("fixtures/v3-starter.json5");

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn the_previous_starter_config_is_refused_only_for_its_unsafe_safe_bins() {
    let error = Config::from_json5_str(V3_STARTER, "moltmate.json", &no_env).unwrap_err();
    let ConfigError::Invalid { key, .. } = &error else {
        panic!("expected a key error, got {error}");
    };
    assert!(key.starts_with("tools.exec.safeBins["), "{error}");
    let message = error.to_string();
    assert!(
        ["sort", "sed", "awk", "find"]
            .iter()
            .any(|bin| message.contains(bin)),
        "{message}"
    );

    // The fix README gives: remove those entries. Then the old file loads as it is.
    let fixed = V3_STARTER.replace(
        r#"safeBins: ["cat", "head", "tail", "grep", "wc", "ls", "sort", "uniq", "cut", "tr", "sed",
                 "awk", "pdftotext", "echo", "date", "find"],"#,
        r#"safeBins: ["cat", "head", "tail", "grep", "wc", "ls", "uniq", "cut", "tr",
                 "pdftotext", "echo", "date"],"#,
    );
    assert_ne!(fixed, V3_STARTER, "the fixture's safeBins line moved");
    let config = Config::from_json5_str(&fixed, "moltmate.json", &no_env)
        .expect("the previous release's config loads once the refused safeBins are gone");
    assert!(config.model.prices.is_empty(), "new keys default");
}
