//! What `moltmate doctor` needs to know about the file as written, before `${VAR}` substitution:
//! which secret keys hold a value written into the file rather than a `${VAR}` reference, and
//! which variables the file references.
//!
//! The secret keys are the ones typed [`crate::Secret`] in the schema (`gateway.auth.token`,
//! `providers.<name>.apiKey`, `channels.telegram.botToken`), plus, for keys a later version
//! adds, any key whose name ends in `token`, `apikey`, `secret` or `password` (case-insensitive).
//! Findings name key paths only, never values.

use crate::de::join_key;
use crate::env::expand;
use crate::error::ConfigError;
use serde_json::Value;
use std::cell::RefCell;

/// The result of [`scan_raw`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawScan {
    /// Key paths of secrets written into the file (`providers.anthropic.apiKey`).
    pub plaintext_secrets: Vec<String>,
    /// Key paths of secrets given as `${VAR}` references.
    pub referenced_secrets: Vec<String>,
    /// Every environment variable the file references, sorted, without duplicates.
    pub env_vars: Vec<String>,
}

/// Whether a key (its last path component) names a secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.ends_with("token")
        || key.ends_with("apikey")
        || key.ends_with("secret")
        || key.ends_with("password")
}

/// Scans configuration text (JSON5) without substituting or validating anything. Errors only
/// when the text does not parse (the same error `Config::from_json5_str` would give).
pub fn scan_raw(text: &str, source_name: &str) -> Result<RawScan, ConfigError> {
    let value = crate::parse_json5(text, source_name)?;
    let mut scan = RawScan::default();
    let vars = RefCell::new(Vec::new());
    walk(&value, String::new(), &mut scan, &vars);
    let mut env_vars = vars.into_inner();
    env_vars.sort();
    env_vars.dedup();
    scan.env_vars = env_vars;
    Ok(scan)
}

fn walk(value: &Value, path: String, scan: &mut RawScan, vars: &RefCell<Vec<String>>) {
    match value {
        Value::String(text) => {
            let record = |name: &str| {
                vars.borrow_mut().push(name.to_string());
                Some(String::new())
            };
            // A malformed reference expands to an error: then it is not a clean reference.
            let expanded = expand(text, &record);
            let key = path.rsplit('.').next().unwrap_or(&path);
            if is_secret_key(key) && !text.is_empty() {
                // Only references and nothing else: every `${VAR}` expands to "" above.
                let only_references = text.contains("${") && expanded.is_ok_and(|e| e.is_empty());
                if only_references {
                    scan.referenced_secrets.push(path);
                } else {
                    scan.plaintext_secrets.push(path);
                }
            }
        }
        Value::Number(_) => {
            let key = path.rsplit('.').next().unwrap_or(&path);
            if is_secret_key(key) {
                scan.plaintext_secrets.push(path);
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                walk(item, format!("{path}[{index}]"), scan, vars);
            }
        }
        Value::Object(entries) => {
            for (key, item) in entries {
                walk(item, join_key(&path, key), scan, vars);
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_plaintext_and_referenced_secrets() {
        let scan = scan_raw(
            r#"{
              // a comment with ${NOT_A_VAR}
              gateway: { auth: { token: "abc123" }, publicUrl: "${PUBLIC}" },
              providers: {
                anthropic: { apiKey: "${ANTHROPIC_API_KEY}" },
                local: { api: "openai", baseUrl: "http://x", apiKey: "sk-${SUFFIX}" },
              },
              channels: { telegram: { botToken: "$${LITERAL}" } },
            }"#,
            "test",
        )
        .unwrap();
        assert_eq!(
            scan.plaintext_secrets,
            vec![
                "channels.telegram.botToken",
                "gateway.auth.token",
                "providers.local.apiKey"
            ]
        );
        assert_eq!(scan.referenced_secrets, vec!["providers.anthropic.apiKey"]);
        assert_eq!(scan.env_vars, vec!["ANTHROPIC_API_KEY", "PUBLIC", "SUFFIX"]);
    }

    #[test]
    fn secret_key_names() {
        for key in ["apiKey", "botToken", "token", "clientSecret", "password"] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["maxTokens", "contextWindowTokens", "publicUrl", "keyring"] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn unparsable_text_is_an_error_not_a_panic() {
        assert!(scan_raw("{", "t").is_err());
        let deep = "[".repeat(100_000);
        assert!(scan_raw(&deep, "t").is_err());
    }
}
