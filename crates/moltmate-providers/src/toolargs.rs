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

    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(moltmate_testkit::prop::config(256))]

        /// Any text: blank is `{}`, JSON is its value, anything else is kept verbatim.
        #[test]
        fn prop_any_argument_text_is_a_value_or_kept_verbatim(
            raw in prop_oneof![
                any::<String>(),
                json_value().prop_map(|v| v.to_string()),
                (1usize..3000).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n))),
                r#"[ \t\n\r{}\[\]\\":,0-9a-z]{0,40}"#,
            ],
        ) {
            let parsed = parse_arguments(&raw);
            if raw.trim().is_empty() {
                prop_assert_eq!(parsed, serde_json::json!({}));
            } else {
                match serde_json::from_str::<Value>(&raw) {
                    Ok(value) => prop_assert_eq!(parsed, value),
                    Err(_) => prop_assert_eq!(parsed, Value::String(raw.clone())),
                }
            }
        }

        /// Arguments survive being streamed as text: the value a model meant is the value read.
        #[test]
        fn prop_arguments_round_trip_through_their_text(value in json_value()) {
            prop_assert_eq!(parse_arguments(&value.to_string()), value.clone());
            prop_assert_eq!(parse_arguments(&serde_json::to_string_pretty(&value).unwrap_or_default()), value);
        }
    }

    #[test]
    fn invalid_json_is_kept_as_string() {
        assert_eq!(parse_arguments(r#"{"a":1}"#), serde_json::json!({"a": 1}));
        assert_eq!(parse_arguments("{\"a\":"), Value::String("{\"a\":".into()));
        assert_eq!(parse_arguments("  "), serde_json::json!({}));
    }
}
