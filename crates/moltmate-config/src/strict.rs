//! Building the untyped JSON tree from JSON5 text, stricter than `serde_json::Value` itself.
//!
//! `serde_json::Value` silently keeps the last of two equal keys, so a second `sandbox: {...}`
//! further down a long file would quietly replace the first; and it turns `NaN`/`Infinity`
//! (legal JSON5) into `null`. Both are refused here, with the parser's line and column.

use crate::de::join_key;
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// A JSON value parsed without duplicate keys or non-finite numbers.
pub(crate) struct StrictValue(pub(crate) Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        StrictVisitor {
            path: String::new(),
        }
        .deserialize(d)
    }
}

/// Carries the key path down the tree, because the parser can only point at the start of the
/// object holding a duplicate key, which in a nested file is far from the key itself.
struct StrictVisitor {
    path: String,
}

impl<'de> DeserializeSeed<'de> for StrictVisitor {
    type Value = StrictValue;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<StrictValue, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON5 value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<StrictValue, E> {
        i64::try_from(v)
            .map(|v| StrictValue(Value::Number(v.into())))
            .map_err(|_| E::custom("number is too large"))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<StrictValue, E> {
        u64::try_from(v)
            .map(|v| StrictValue(Value::Number(v.into())))
            .map_err(|_| E::custom("number is too large"))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<StrictValue, E> {
        Number::from_f64(v)
            .map(|n| StrictValue(Value::Number(n)))
            .ok_or_else(|| E::custom("NaN and Infinity are not allowed in the configuration"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_string())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<StrictValue, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        loop {
            let seed = StrictVisitor {
                path: format!("{}[{}]", self.path, items.len()),
            };
            match seq.next_element_seed(seed)? {
                Some(StrictValue(item)) => items.push(item),
                None => break,
            }
        }
        Ok(StrictValue(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut entries = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = join_key(&self.path, &key);
            if entries.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {path:?}")));
            }
            let StrictValue(value) = map.next_value_seed(StrictVisitor { path })?;
            entries.insert(key, value);
        }
        Ok(StrictValue(Value::Object(entries)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_duplicate_keys_with_position() {
        let err = json5::from_str::<StrictValue>("{\n  a: 1,\n  a: 2,\n}")
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("duplicate key \"a\""), "{err}");
        assert!(err.position().is_some());
    }

    #[test]
    fn refuses_non_finite_numbers() {
        assert!(json5::from_str::<StrictValue>("{a: NaN}").is_err());
        assert!(json5::from_str::<StrictValue>("{a: -Infinity}").is_err());
    }

    #[test]
    fn keeps_everything_else() {
        let StrictValue(v) =
            json5::from_str("{a: [1, -2, 0.5, 0x10, 'x', null, true], b: {}}").unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": [1, -2, 0.5, 16, "x", null, true], "b": {}})
        );
    }
}

/// Deepest allowed nesting of objects and arrays. The schema needs 5; the JSON5 parser recurses
/// per level, so unbounded depth could overflow the stack instead of giving an error.
pub(crate) const MAX_DEPTH: usize = 64;

/// The 1-based line and column of the first bracket nested deeper than [`MAX_DEPTH`], if any.
/// A small scanner that skips strings and comments; it does not validate anything else (the
/// parser does that afterwards).
pub(crate) fn too_deep(text: &str) -> Option<(usize, usize)> {
    let mut depth = 0usize;
    let (mut line, mut column) = (1usize, 0usize);
    let mut chars = text.chars().peekable();
    let mut in_string: Option<char> = None;
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
            column = 0;
        } else {
            column += 1;
        }
        if let Some(quote) = in_string {
            if c == '\\' {
                // The escaped character cannot end the string; a line continuation still counts
                // as a new line.
                if chars.next() == Some('\n') {
                    line += 1;
                    column = 0;
                } else {
                    column += 1;
                }
            } else if c == quote {
                in_string = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => in_string = Some(c),
            '/' if chars.peek() == Some(&'/') => {
                for skipped in chars.by_ref() {
                    if skipped == '\n' {
                        line += 1;
                        column = 0;
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                column += 1;
                let mut previous = '\0';
                for skipped in chars.by_ref() {
                    if skipped == '\n' {
                        line += 1;
                        column = 0;
                    } else {
                        column += 1;
                    }
                    if previous == '*' && skipped == '/' {
                        break;
                    }
                    previous = skipped;
                }
            }
            '{' | '[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some((line, column));
                }
            }
            '}' | ']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod depth_tests {
    use super::*;

    #[test]
    fn finds_excessive_nesting_and_ignores_strings_and_comments() {
        let deep = format!("{{a: {}{}}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(too_deep(&deep), Some((1, 4 + MAX_DEPTH)));
        let fine = format!(
            "{{a: '{}', /* {} */ // {}\n b: \"\\\"[\"}}",
            "[".repeat(100),
            "{".repeat(100),
            "[".repeat(100)
        );
        assert_eq!(too_deep(&fine), None);
        assert!(json5::from_str::<StrictValue>(&fine).is_ok());
        assert_eq!(too_deep("{\n  a: {b: [1, [2]]},\n}"), None);
    }
}
