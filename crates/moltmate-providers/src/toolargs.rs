//! Tool-call arguments as the model wrote them.

use serde_json::Value;

/// Parses the accumulated argument text. Text that is not valid JSON is kept verbatim as a
/// JSON string, so the tool layer can tell the model what was wrong instead of the turn failing.
pub(crate) fn parse_arguments(raw: &str) -> Value {
    if raw.trim().is_empty() {
        return Value::Object(serde_json::Map::new());
    }
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_json_is_kept_as_string() {
        assert_eq!(parse_arguments(r#"{"a":1}"#), serde_json::json!({"a": 1}));
        assert_eq!(parse_arguments("{\"a\":"), Value::String("{\"a\":".into()));
        assert_eq!(parse_arguments("  "), serde_json::json!({}));
    }
}
