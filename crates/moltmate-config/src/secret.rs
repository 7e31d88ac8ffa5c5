//! [`Secret`]: a string that never shows up in Debug output, Display output, logs or errors.
//!
//! Deliberately not `Serialize` and not `PartialEq`: a secret cannot be written back out by
//! accident, and comparing one (a gateway token against a request) belongs in a constant-time
//! helper at the place that does it, not in `==`.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::fmt;

/// An API key, bot token or access token read from the configuration.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value. Empty strings are allowed here; the loader refuses empty secrets in files.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Call only where it is sent to the service it belongs to.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SecretVisitor)
    }
}

/// Accepts only strings, and never echoes a rejected value: a mistyped secret (a number, an
/// object) might still be the secret.
struct SecretVisitor;

impl SecretVisitor {
    fn refuse<E: de::Error>(found: &str) -> E {
        E::custom(format!(
            "expected a string, found {found} (value not shown: this key holds a secret)"
        ))
    }
}

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
        Ok(Secret(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Secret, E> {
        Ok(Secret(v))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
        Err(Self::refuse("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
        Err(Self::refuse("a number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
        Err(Self::refuse("a number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
        Err(Self::refuse("a number"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Secret, E> {
        Err(Self::refuse("null"))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(Self::refuse("an array"))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(Self::refuse("an object"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("sk-very-secret");
        assert_eq!(format!("{s:?}"), "\"<redacted>\"");
        assert_eq!(s.to_string(), "<redacted>");
        assert_eq!(s.expose(), "sk-very-secret");
    }

    #[test]
    fn rejected_values_are_not_echoed() {
        let err = serde_json::from_str::<Secret>("123456789")
            .map(|_| ())
            .unwrap_err();
        assert!(!err.to_string().contains("123456789"), "{err}");
    }
}
