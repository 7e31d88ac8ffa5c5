//! Typed deserialization of the (already env-substituted) JSON value, with structured errors.
//!
//! `serde_json::Value` deserializes with `serde_json::Error`, whose only structure is its message.
//! To report unknown keys with a suggestion and wrong types with what was expected, this module
//! walks the value with its own small deserializer whose error type ([`DeError`]) keeps what
//! serde tells it (the unknown field and the allowed ones, the unexpected value and the expected
//! type). `serde_path_to_error` wraps it to learn where in the tree the error happened.

use crate::error::{suggest, Problem};
use serde::de::value::{MapDeserializer, SeqDeserializer, StringDeserializer};
use serde::de::{self, Deserialize, Deserializer, Expected, IntoDeserializer, Unexpected, Visitor};
use serde_json::Value;
use std::fmt;

/// A structured deserialization error (see the module doc).
#[derive(Debug)]
pub(crate) enum DeError {
    UnknownField {
        field: String,
        allowed: &'static [&'static str],
    },
    UnknownVariant {
        variant: String,
        allowed: &'static [&'static str],
    },
    InvalidType {
        found: String,
        expected: String,
    },
    InvalidValue {
        found: String,
        expected: String,
    },
    InvalidLength {
        len: usize,
        expected: String,
    },
    MissingField(&'static str),
    Custom(String),
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeError::UnknownField { field, .. } => write!(f, "unknown key {field:?}"),
            DeError::UnknownVariant { variant, .. } => write!(f, "unknown value {variant:?}"),
            DeError::InvalidType { found, expected }
            | DeError::InvalidValue { found, expected } => {
                write!(f, "expected {expected}, found {found}")
            }
            DeError::InvalidLength { len, expected } => {
                write!(f, "expected {expected}, found {len} items")
            }
            DeError::MissingField(name) => write!(f, "missing key {name:?}"),
            DeError::Custom(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::Custom(msg.to_string())
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        DeError::InvalidType {
            found: describe_unexpected(&unexp),
            expected: humanize_expected(exp),
        }
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        DeError::InvalidValue {
            found: describe_unexpected(&unexp),
            expected: humanize_expected(exp),
        }
    }

    fn invalid_length(len: usize, exp: &dyn Expected) -> Self {
        DeError::InvalidLength {
            len,
            expected: humanize_expected(exp),
        }
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::UnknownVariant {
            variant: variant.to_string(),
            allowed: expected,
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError::UnknownField {
            field: field.to_string(),
            allowed: expected,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        DeError::MissingField(field)
    }
}

/// How the file's value looks, as the operator wrote it (`"abc"`, `70000`, `an object`).
fn describe_unexpected(unexp: &Unexpected<'_>) -> String {
    match unexp {
        Unexpected::Bool(b) => b.to_string(),
        Unexpected::Unsigned(n) => n.to_string(),
        Unexpected::Signed(n) => n.to_string(),
        Unexpected::Float(x) => x.to_string(),
        Unexpected::Char(c) => format!("{c:?}"),
        Unexpected::Str(s) => format!("{s:?}"),
        Unexpected::Bytes(_) => "bytes".to_string(),
        Unexpected::Unit | Unexpected::Option => "null".to_string(),
        Unexpected::NewtypeStruct | Unexpected::NewtypeVariant | Unexpected::TupleVariant => {
            "a value".to_string()
        }
        Unexpected::Seq => "an array".to_string(),
        Unexpected::Map | Unexpected::StructVariant => "an object".to_string(),
        Unexpected::UnitVariant => "a name".to_string(),
        Unexpected::Enum => "an enum".to_string(),
        Unexpected::Other(other) => (*other).to_string(),
    }
}

/// Serde's primitive visitors describe themselves in Rust terms (`u16`, `f64`); an operator
/// editing a JSON file wants JSON terms.
fn humanize_expected(exp: &dyn Expected) -> String {
    let raw = exp.to_string();
    match raw.as_str() {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number of 0 or more".to_string(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_string(),
        "f32" | "f64" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        _ if raw.starts_with("struct ") => "an object".to_string(),
        _ if raw.starts_with("a sequence") => "an array".to_string(),
        _ if raw.starts_with("a map") => "an object".to_string(),
        _ if raw.starts_with("variant identifier") || raw.starts_with("enum ") => {
            "a name".to_string()
        }
        _ => raw,
    }
}

/// Deserializes a `serde_json::Value` with [`DeError`] as the error type.
pub(crate) struct ValueDeserializer(pub(crate) Value);

impl<'de> IntoDeserializer<'de, DeError> for ValueDeserializer {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> Deserializer<'de> for ValueDeserializer {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else if let Some(x) = n.as_f64() {
                    visitor.visit_f64(x)
                } else {
                    Err(de::Error::custom(format!("unsupported number {n}")))
                }
            }
            Value::String(s) => visitor.visit_string(s),
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(ValueDeserializer));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Object(entries) => {
                let mut map = MapDeserializer::new(
                    entries.into_iter().map(|(k, v)| (k, ValueDeserializer(v))),
                );
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(ValueDeserializer(other)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.0 {
            // Config enums are all plain names ("docker", "open"), never tagged objects.
            Value::String(s) => visitor.visit_enum(StringDeserializer::<DeError>::new(s)),
            other => Err(de::Error::invalid_type(unexpected_of(&other), &visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.0 {
            // Derived struct visitors also accept arrays (`[100, 50]` for `rateLimit`), which
            // would make the file positional; sections are objects only.
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(de::Error::invalid_type(unexpected_of(&other), &visitor)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

fn unexpected_of(value: &Value) -> Unexpected<'_> {
    match value {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Unexpected::Unsigned(u)
            } else if let Some(i) = n.as_i64() {
                Unexpected::Signed(i)
            } else {
                Unexpected::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

/// Deserializes `value` into `T`; on error returns the dotted key path and the problem.
pub(crate) fn deserialize_typed<T: for<'de> Deserialize<'de>>(
    value: Value,
) -> Result<T, (String, Problem)> {
    serde_path_to_error::deserialize(ValueDeserializer(value)).map_err(|err| {
        let mut path = render_path(err.path());
        let problem = match err.into_inner() {
            // The path already ends with the unknown key: it was recorded when the key was read.
            DeError::UnknownField { field, allowed } => Problem::UnknownKey {
                suggestion: suggest(&field, allowed.iter().copied()),
                allowed: allowed.iter().map(|s| (*s).to_string()).collect(),
            },
            DeError::UnknownVariant { variant, allowed } => Problem::UnknownValue {
                suggestion: suggest(&variant, allowed.iter().copied()),
                allowed: allowed.iter().map(|s| (*s).to_string()).collect(),
                found: variant,
            },
            DeError::InvalidType { found, expected }
            | DeError::InvalidValue { found, expected } => Problem::WrongType { expected, found },
            DeError::InvalidLength { len, expected } => Problem::WrongType {
                expected,
                found: format!("{len} items"),
            },
            DeError::MissingField(field) => {
                path = join_key(&path, field);
                Problem::MissingKey
            }
            DeError::Custom(text) => Problem::Rule(text),
        };
        (path, problem)
    })
}

/// `a.b[2].c`, with the root written as `(top level)`.
fn render_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key }
            | serde_path_to_error::Segment::Enum { variant: key } => {
                out = join_key(&out, key);
            }
            serde_path_to_error::Segment::Unknown => out = join_key(&out, "?"),
        }
    }
    if out.is_empty() {
        out.push_str("(top level)");
    }
    out
}

pub(crate) fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() || parent == "(top level)" {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Section {
        #[serde(default)]
        max_bytes: u64,
        #[serde(default)]
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        flag: bool,
    }

    fn fail(value: Value) -> (String, Problem) {
        deserialize_typed::<Section>(value).map(|_| ()).unwrap_err()
    }

    #[test]
    fn paths_and_problems() {
        let (path, problem) = fail(serde_json::json!({"maxBytez": 1}));
        assert_eq!(path, "maxBytez");
        assert!(
            matches!(problem, Problem::UnknownKey { suggestion: Some(s), .. } if s == "maxBytes")
        );

        let (path, problem) = fail(serde_json::json!({"inner": {}}));
        assert_eq!(path, "inner.flag");
        assert_eq!(problem, Problem::MissingKey);

        let (path, problem) = fail(serde_json::json!({"inner": [true]}));
        assert_eq!(path, "inner");
        assert_eq!(problem.to_string(), "expected an object, found an array");

        let (path, problem) = fail(serde_json::json!({"maxBytes": 1.5}));
        assert_eq!(path, "maxBytes");
        assert_eq!(
            problem.to_string(),
            "expected a whole number of 0 or more, found 1.5"
        );
    }

    #[test]
    fn accepts_well_formed_values() {
        let s: Section =
            deserialize_typed(serde_json::json!({"maxBytes": 3, "inner": {"flag": true}})).unwrap();
        assert_eq!(s.max_bytes, 3);
        assert!(s.inner.is_some_and(|i| i.flag));
        let s: Section = deserialize_typed(serde_json::json!({"inner": null})).unwrap();
        assert!(s.inner.is_none());
    }
}
