//! Decoding of tool arguments.
//!
//! Arguments come from the model and are untrusted: wrong types, missing or unknown fields, or a
//! JSON *string* (providers hand over arguments that were not valid JSON as `Value::String`).
//! Every such case becomes [`ToolError::InvalidArguments`] with a message the model can fix.

use moltmate_core::tool::ToolError;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Decodes `arguments` as `T` (which should `deny_unknown_fields`). `null` counts as `{}` so a
/// tool without required arguments accepts an omitted object.
pub(crate) fn parse<T: DeserializeOwned>(tool: &str, arguments: Value) -> Result<T, ToolError> {
    let object = match arguments {
        Value::Object(map) => Value::Object(map),
        Value::Null => Value::Object(serde_json::Map::new()),
        Value::String(_) => {
            return Err(ToolError::InvalidArguments(format!(
            "arguments for `{tool}` must be a JSON object; got a string (was the JSON malformed?)"
        )))
        }
        other => {
            return Err(ToolError::InvalidArguments(format!(
                "arguments for `{tool}` must be a JSON object, got {}",
                kind(&other)
            )))
        }
    };
    serde_json::from_value(object)
        .map_err(|e| ToolError::InvalidArguments(format!("arguments for `{tool}`: {e}")))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Args {
        path: String,
    }

    #[test]
    fn rejects_everything_but_a_matching_object() {
        for bad in [
            serde_json::json!("{\"path\": 1"),
            serde_json::json!([1]),
            serde_json::json!({"path": 1}),
            serde_json::json!({}),
            serde_json::json!({"path": "a", "extra": true}),
        ] {
            match parse::<Args>("read", bad) {
                Err(ToolError::InvalidArguments(message)) => assert!(message.contains("read")),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(parse::<Args>("read", serde_json::json!({"path": "a"})).is_ok());
    }
}
