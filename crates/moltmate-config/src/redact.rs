//! The config file without its secrets, for backups (`moltmate backup` without
//! `--include-secrets`).
//!
//! The secrets of `moltmate.json` are the values of `gateway.auth.token`,
//! `providers.<name>.apiKey`, `channels.telegram.botToken` and every other key whose name says
//! secret (`…token`, `…apiKey`, `…secret`, `…password`: `channels.<name>.appSecret`,
//! `tools.web.search.apiKey`, ... become `${MOLTMATE_<NAME>_APP_SECRET}`, ...). A value that is only a `${VAR}`
//! reference is no secret (the secret is in the environment) and is kept. Any other value is
//! replaced by a reference to a variable named after its key (`${MOLTMATE_TELEGRAM_BOT_TOKEN}`),
//! so a restored config loads once that variable is set — and until then refuses to load with
//! the key and the variable's name, instead of running without the secret.
//!
//! The file is edited as text (its comments and layout stay); the result is parsed again and
//! checked to hold no secret value anywhere, else the parsed tree is written out instead (valid
//! JSON, comments lost).

use crate::error::ConfigError;
use crate::strict;
use serde_json::Value;

/// The config text with its secrets replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redacted {
    pub text: String,
    /// `(key path, variable)` of each replaced secret, e.g.
    /// `("channels.telegram.botToken", "MOLTMATE_TELEGRAM_BOT_TOKEN")`.
    pub replaced: Vec<(String, String)>,
    /// True when the comments and layout could not be kept.
    pub reformatted: bool,
}

/// Whether `value` is exactly one `${VAR}` reference.
fn is_reference(value: &str) -> bool {
    value
        .strip_prefix("${")
        .and_then(|rest| rest.strip_suffix('}'))
        .is_some_and(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

fn variable_part(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Where the secrets live: `(key path, variable, pointer into the tree)`.
fn secret_locations(root: &Value) -> Vec<(String, String, Vec<String>)> {
    let mut out = vec![
        (
            "gateway.auth.token".to_string(),
            "MOLTMATE_GATEWAY_AUTH_TOKEN".to_string(),
            vec!["gateway".into(), "auth".into(), "token".into()],
        ),
        (
            "channels.telegram.botToken".to_string(),
            "MOLTMATE_TELEGRAM_BOT_TOKEN".to_string(),
            vec!["channels".into(), "telegram".into(), "botToken".into()],
        ),
    ];
    if let Some(providers) = root.get("providers").and_then(Value::as_object) {
        for name in providers.keys() {
            out.push((
                format!("providers.{name}.apiKey"),
                format!("MOLTMATE_PROVIDER_{}_API_KEY", variable_part(name)),
                vec!["providers".into(), name.clone(), "apiKey".into()],
            ));
        }
    }
    // Every other key that names a secret (`…token`, `…apiKey`, `…secret`, `…password`, the
    // rule `moltmate doctor` uses): the channels' app secrets and tokens, a search key, and
    // whatever a later release adds, without a list to forget to extend.
    let mut found = Vec::new();
    secret_keys_in(root, &mut Vec::new(), &mut found);
    for pointer in found {
        let path = pointer.join(".");
        if out.iter().any(|(known, _, _)| *known == path) {
            continue;
        }
        let named: Vec<&String> = match pointer.first().map(String::as_str) {
            Some("channels") => pointer.iter().skip(1).collect(),
            _ => pointer.iter().collect(),
        };
        let variable = format!(
            "MOLTMATE_{}",
            named
                .iter()
                .map(|part| screaming(part))
                .collect::<Vec<_>>()
                .join("_")
        );
        out.push((path, variable, pointer));
    }
    out
}

/// Pointers to every string value under a key [`crate::is_secret_key`] names, bounded in depth
/// like the config itself.
fn secret_keys_in(value: &Value, at: &mut Vec<String>, found: &mut Vec<Vec<String>>) {
    if at.len() > strict::MAX_DEPTH {
        return;
    }
    if let Value::Object(map) = value {
        for (key, child) in map {
            at.push(key.clone());
            if child.is_string() && crate::is_secret_key(key) {
                found.push(at.clone());
            } else {
                secret_keys_in(child, at, found);
            }
            at.pop();
        }
    }
}

/// `appSecret` → `APP_SECRET`, `bot-1` → `BOT_1`.
fn screaming(part: &str) -> String {
    let mut out = String::with_capacity(part.len() + 4);
    let mut previous_lower = false;
    for c in part.chars() {
        if c.is_ascii_uppercase() && previous_lower {
            out.push('_');
        }
        previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        });
    }
    out
}

fn get_mut<'a>(root: &'a mut Value, pointer: &[String]) -> Option<&'a mut Value> {
    pointer
        .iter()
        .try_fold(root, |value, key| value.as_object_mut()?.get_mut(key))
}

fn parse(text: &str) -> Result<Value, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Some((line, column)) = strict::too_deep(text) {
        return Err(ConfigError::Syntax {
            file: crate::CONFIG_FILE_NAME.to_string(),
            line: Some(line),
            column: Some(column),
            message: format!("nested deeper than {} levels", strict::MAX_DEPTH),
        });
    }
    let strict::StrictValue(value) = json5::from_str(text).map_err(|err| ConfigError::Syntax {
        file: crate::CONFIG_FILE_NAME.to_string(),
        line: err.position().map(|p| p.line + 1),
        column: err.position().map(|p| p.column + 1),
        message: err.to_string(),
    })?;
    Ok(value)
}

/// Replaces the secrets of a config file's `text` (see the module docs). Errors only when the
/// text is not JSON5; the error never quotes the text.
pub fn redact_secrets(text: &str) -> Result<Redacted, ConfigError> {
    let mut tree = parse(text)?;
    let mut secrets: Vec<String> = Vec::new();
    let mut replaced = Vec::new();
    for (key, variable, pointer) in secret_locations(&tree.clone()) {
        let Some(value) = get_mut(&mut tree, &pointer) else {
            continue;
        };
        let Some(secret) = value.as_str() else {
            continue;
        };
        if secret.is_empty() || is_reference(secret) {
            continue;
        }
        secrets.push(secret.to_string());
        *value = Value::String(format!("${{{variable}}}"));
        replaced.push((key, variable));
    }
    if secrets.is_empty() {
        return Ok(Redacted {
            text: text.to_string(),
            replaced,
            reformatted: false,
        });
    }
    // Text edit: each secret's string literal becomes its placeholder.
    let mut edited = text.to_string();
    for ((_, variable), secret) in replaced.iter().zip(&secrets) {
        for quote in ['"', '\''] {
            let literal = format!("{quote}{secret}{quote}");
            edited = edited.replace(&literal, &format!("\"${{{variable}}}\""));
        }
    }
    let kept = parse(&edited).is_ok_and(|value| value == tree)
        && secrets
            .iter()
            .all(|secret| !edited.contains(secret.as_str()));
    if kept {
        return Ok(Redacted {
            text: edited,
            replaced,
            reformatted: false,
        });
    }
    let text = serde_json::to_string_pretty(&tree).map_err(|e| ConfigError::Syntax {
        file: crate::CONFIG_FILE_NAME.to_string(),
        line: None,
        column: None,
        message: e.to_string(),
    })?;
    Ok(Redacted {
        text: text + "\n",
        replaced,
        reformatted: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_secrets_become_references_and_comments_stay() {
        let text = r#"// my gateway
{
  gateway: { auth: { token: "op-SECRET-1" } },
  providers: {
    anthropic: { apiKey: 'sk-ant-SECRET-2' }, // the main one
    "local llm": { api: "openai", baseUrl: "http://127.0.0.1:1", apiKey: "${LOCAL_KEY}" },
  },
  channels: { telegram: { botToken: "123:SECRET-3", dmPolicy: "pairing" } },
}"#;
        let redacted = redact_secrets(text).unwrap();
        assert!(!redacted.reformatted);
        for secret in ["op-SECRET-1", "sk-ant-SECRET-2", "123:SECRET-3"] {
            assert!(!redacted.text.contains(secret), "{}", redacted.text);
        }
        assert!(
            redacted.text.contains("// my gateway") && redacted.text.contains("// the main one")
        );
        assert!(
            redacted.text.contains("${LOCAL_KEY}"),
            "references are kept"
        );
        let variables: Vec<&str> = redacted.replaced.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(
            variables,
            [
                "MOLTMATE_GATEWAY_AUTH_TOKEN",
                "MOLTMATE_TELEGRAM_BOT_TOKEN",
                "MOLTMATE_PROVIDER_ANTHROPIC_API_KEY"
            ]
        );
        // The restored config loads once the variables are set, and says which is missing
        // until then.
        let env = |name: &str| match name {
            "LOCAL_KEY" => Some("k".to_string()),
            "MOLTMATE_GATEWAY_AUTH_TOKEN" => Some("t".to_string()),
            "MOLTMATE_TELEGRAM_BOT_TOKEN" => Some("1:b".to_string()),
            _ => None,
        };
        let error = crate::Config::from_json5_str(&redacted.text, "x", &env).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("MOLTMATE_PROVIDER_ANTHROPIC_API_KEY"),
            "{error}"
        );
    }

    /// Regression: only the three known secrets were replaced, so the key of a channel or tool
    /// added later (an app secret, a search key) went into every backup in clear text.
    #[test]
    fn every_key_that_names_a_secret_is_replaced_not_only_the_known_ones() {
        let text = r#"{
  channels: { whatsapp: { appSecret: "wa-SECRET-1", verifyToken: "wa-SECRET-2", phoneNumberId: "123" },
              slack: { appToken: "${SLACK_APP}", signingSecret: "sl-SECRET-3" } },
  tools: { web: { search: { apiKey: "BSA-SECRET-4", maxResults: 5 } } },
}"#;
        let redacted = redact_secrets(text).unwrap();
        for secret in ["wa-SECRET-1", "wa-SECRET-2", "sl-SECRET-3", "BSA-SECRET-4"] {
            assert!(!redacted.text.contains(secret), "{}", redacted.text);
        }
        assert!(redacted.text.contains("${SLACK_APP}") && redacted.text.contains("\"123\""));
        let mut variables: Vec<&str> = redacted.replaced.iter().map(|(_, v)| v.as_str()).collect();
        variables.sort();
        assert_eq!(
            variables,
            [
                "MOLTMATE_SLACK_SIGNING_SECRET",
                "MOLTMATE_TOOLS_WEB_SEARCH_API_KEY",
                "MOLTMATE_WHATSAPP_APP_SECRET",
                "MOLTMATE_WHATSAPP_VERIFY_TOKEN",
            ]
        );
    }

    #[test]
    fn a_secret_spelled_with_escapes_is_still_removed() {
        let text = r#"{ gateway: { auth: { token: "a\u0062c-SECRET" } } }"#;
        let redacted = redact_secrets(text).unwrap();
        assert!(redacted.reformatted);
        assert!(!redacted.text.contains("SECRET"), "{}", redacted.text);
        assert!(redacted.text.contains("${MOLTMATE_GATEWAY_AUTH_TOKEN}"));
    }

    #[test]
    fn a_config_without_secrets_is_unchanged() {
        let text = "{ gateway: { auth: { token: \"${TOKEN}\" } } } // c";
        let redacted = redact_secrets(text).unwrap();
        assert_eq!(redacted.text, text);
        assert!(redacted.replaced.is_empty());
    }
}
