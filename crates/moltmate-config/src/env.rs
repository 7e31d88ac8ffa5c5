//! `${VAR}` substitution in every string value of the parsed file.
//!
//! Runs on the untyped JSON tree before typed deserialization, so a reference works in any
//! string (a key, a URL, an allow-list entry). `$${X}` stands for a literal `${X}`; a `$` not
//! followed by `{` is an ordinary character. Object keys are never substituted: they are schema,
//! not data. Errors name the key path and the variable, never the value of anything.

use crate::de::join_key;
use crate::error::Problem;
use serde_json::Value;

/// Replaces references in place. On error returns the key path and the problem.
pub(crate) fn substitute(
    value: &mut Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, Problem)> {
    walk(value, String::new(), env)
}

fn walk(
    value: &mut Value,
    path: String,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, Problem)> {
    match value {
        Value::String(s) => {
            if s.contains('$') {
                *s = expand(s, env).map_err(|problem| (display_path(&path), problem))?;
            }
            Ok(())
        }
        Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                walk(item, format!("{path}[{index}]"), env)?;
            }
            Ok(())
        }
        Value::Object(entries) => {
            for (key, item) in entries.iter_mut() {
                walk(item, join_key(&path, key), env)?;
            }
            Ok(())
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "(top level)".to_string()
    } else {
        path.to_string()
    }
}

/// Expands one string.
pub(crate) fn expand(input: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, Problem> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(escaped) = after.strip_prefix("$${") {
            // `$${X}` -> literal `${X}`: emit `${` and continue after it, so the braces' content
            // is copied verbatim.
            out.push_str("${");
            rest = escaped;
        } else if let Some(reference) = after.strip_prefix("${") {
            let end = reference.find('}').ok_or_else(|| {
                Problem::BadEnvReference(
                    "unterminated \"${\" (write \"$${\" for a literal \"${\")".to_string(),
                )
            })?;
            let name = &reference[..end];
            if !is_var_name(name) {
                return Err(Problem::BadEnvReference(format!(
                    "{:?} is not an environment variable name (letters, digits and '_', not starting with a digit); write \"$${{\" for a literal \"${{\"",
                    name
                )));
            }
            let replacement = env(name).ok_or_else(|| Problem::MissingEnvVar {
                var: name.to_string(),
            })?;
            out.push_str(&replacement);
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("v4lue".to_string()),
            "WITH_DOLLAR" => Some("${KEY}".to_string()),
            _ => None,
        }
    }

    #[test]
    fn expands_references_and_keeps_plain_dollars() {
        assert_eq!(expand("a ${KEY} b", &env).unwrap(), "a v4lue b");
        assert_eq!(expand("${KEY}${KEY}", &env).unwrap(), "v4luev4lue");
        assert_eq!(expand("cost $5 $", &env).unwrap(), "cost $5 $");
    }

    #[test]
    fn escaped_reference_is_literal() {
        assert_eq!(expand("$${KEY}", &env).unwrap(), "${KEY}");
        assert_eq!(expand("x$${NOPE}y", &env).unwrap(), "x${NOPE}y");
    }

    #[test]
    fn substituted_values_are_not_expanded_again() {
        assert_eq!(expand("${WITH_DOLLAR}", &env).unwrap(), "${KEY}");
    }

    #[test]
    fn missing_and_malformed_references_are_errors() {
        assert_eq!(
            expand("${NOPE}", &env),
            Err(Problem::MissingEnvVar {
                var: "NOPE".to_string()
            })
        );
        assert!(matches!(
            expand("${KEY", &env),
            Err(Problem::BadEnvReference(_))
        ));
        assert!(matches!(
            expand("${1X}", &env),
            Err(Problem::BadEnvReference(_))
        ));
    }

    #[test]
    fn error_path_points_at_the_key() {
        let mut value = serde_json::json!({"a": {"b": ["ok", "${NOPE}"]}});
        let (path, _) = substitute(&mut value, &env).unwrap_err();
        assert_eq!(path, "a.b[1]");
    }
}
