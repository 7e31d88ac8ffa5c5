//! `limits`: how much work one user may cause — caps per message and per user, and daily and
//! monthly budgets — plus model prices (`model.prices`) and family budgets
//! (`families.<name>.budget`).
//!
//! The top-level keys of `limits` apply to everyone (their defaults are generous: what an owner
//! gets). `limits.trust.<level>` can only take away from them, like trust levels everywhere:
//! a user's effective value is the smaller of the top-level value and their level's value, and
//! each level below `owner` has a tighter built-in default (see [`LimitsConfig::for_trust`] and
//! README's table).

use crate::schema::TrustLevel;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A budget value: a number, or `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Allowance<T> {
    Limited(T),
    Unlimited,
}

impl<T: PartialOrd + Copy> Allowance<T> {
    /// The tighter of two allowances.
    pub fn min(self, other: Allowance<T>) -> Allowance<T> {
        match (self, other) {
            (Allowance::Unlimited, x) | (x, Allowance::Unlimited) => x,
            (Allowance::Limited(a), Allowance::Limited(b)) => {
                Allowance::Limited(if b < a { b } else { a })
            }
        }
    }

    /// `None` for unlimited.
    pub fn limit(self) -> Option<T> {
        match self {
            Allowance::Limited(value) => Some(value),
            Allowance::Unlimited => None,
        }
    }
}

/// Numbers a budget can hold.
trait AllowanceNumber: Sized + Copy {
    const EXPECTING: &'static str;
    fn from_u64(v: u64) -> Option<Self>;
    fn from_i64(v: i64) -> Option<Self>;
    fn from_f64(v: f64) -> Option<Self>;
}

impl AllowanceNumber for u64 {
    const EXPECTING: &'static str = "a whole number of at least 0, or \"unlimited\"";
    fn from_u64(v: u64) -> Option<Self> {
        Some(v)
    }
    fn from_i64(v: i64) -> Option<Self> {
        u64::try_from(v).ok()
    }
    fn from_f64(_: f64) -> Option<Self> {
        None
    }
}

impl AllowanceNumber for f64 {
    const EXPECTING: &'static str = "an amount in US dollars (e.g. 5 or 2.50), or \"unlimited\"";
    fn from_u64(v: u64) -> Option<Self> {
        Some(v as f64)
    }
    fn from_i64(v: i64) -> Option<Self> {
        (v >= 0).then_some(v as f64)
    }
    fn from_f64(v: f64) -> Option<Self> {
        (v.is_finite() && v >= 0.0).then_some(v)
    }
}

impl<'de, T: AllowanceNumber> Deserialize<'de> for Allowance<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: AllowanceNumber> Visitor<'_> for V<T> {
            type Value = Allowance<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v == "unlimited" {
                    Ok(Allowance::Unlimited)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                T::from_u64(v)
                    .map(Allowance::Limited)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                T::from_i64(v)
                    .map(Allowance::Limited)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                T::from_f64(v)
                    .map(Allowance::Limited)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Float(v), &self))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// `limits`: the values everyone gets (an owner's), and per trust level what is taken away.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsConfig {
    /// Tool calls run from one model answer; the rest are dropped and the model is told.
    /// Default 32.
    pub tool_calls_per_answer: u32,
    /// Tool output handed to the model in one turn, all calls together. Default 1024.
    pub tool_output_kb_per_turn: u64,
    /// Transcript bytes one turn may add; larger tool results are elided first. Default 1024.
    pub stored_kb_per_turn: u64,
    /// Stored conversation history of one user, all sessions. Default 1024.
    pub transcript_mb: u64,
    /// Size of one user's memory search index; past it nothing new is indexed. Default 256.
    /// Applies to everyone (not per trust level).
    pub memory_index_mb: u64,
    /// Messages of one user waiting for an answer; more are refused with one notice. Default 50.
    pub queued_messages: u32,
    /// Messages answered by the model per user and day. Default 2000.
    pub messages_per_day: Allowance<u64>,
    /// Model tokens (input + output) per user and day. Default 10000000.
    pub tokens_per_day: Allowance<u64>,
    /// Model spend per user and calendar month in US dollars, by `model.prices`. Default
    /// unlimited.
    pub spend_per_month: Allowance<f64>,
    /// Seconds commands may run in the sandbox per user and day. Default 14400.
    pub exec_seconds_per_day: Allowance<u64>,
    /// Reminders (one-off and recurring) one user may have at once. Default 50.
    pub reminders: u32,
    /// Shortest time between two occurrences of a recurring reminder, in minutes. Default 15.
    /// Applies to everyone (not per trust level).
    pub reminder_min_interval_minutes: u64,
    pub trust: TrustLimitsConfig,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            tool_calls_per_answer: 32,
            tool_output_kb_per_turn: 1024,
            stored_kb_per_turn: 1024,
            transcript_mb: 1024,
            memory_index_mb: 256,
            queued_messages: 50,
            messages_per_day: Allowance::Limited(2000),
            tokens_per_day: Allowance::Limited(10_000_000),
            spend_per_month: Allowance::Unlimited,
            exec_seconds_per_day: Allowance::Limited(4 * 3600),
            reminders: 50,
            reminder_min_interval_minutes: 15,
            trust: TrustLimitsConfig::default(),
        }
    }
}

/// `limits.trust`: one entry per trust level.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct TrustLimitsConfig {
    pub owner: LevelLimits,
    pub family: LevelLimits,
    pub friend: LevelLimits,
    pub stranger: LevelLimits,
    pub restricted: LevelLimits,
}

impl TrustLimitsConfig {
    pub fn level(&self, trust: TrustLevel) -> &LevelLimits {
        match trust {
            TrustLevel::Owner => &self.owner,
            TrustLevel::Family => &self.family,
            TrustLevel::Friend => &self.friend,
            TrustLevel::Stranger => &self.stranger,
            TrustLevel::Restricted => &self.restricted,
        }
    }
}

/// `limits.trust.<level>`: the same keys as `limits` (but `memoryIndexMb` and
/// `reminderMinIntervalMinutes`); a key left out takes the level's built-in default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LevelLimits {
    pub tool_calls_per_answer: Option<u32>,
    pub tool_output_kb_per_turn: Option<u64>,
    pub stored_kb_per_turn: Option<u64>,
    pub transcript_mb: Option<u64>,
    pub queued_messages: Option<u32>,
    pub messages_per_day: Option<Allowance<u64>>,
    pub tokens_per_day: Option<Allowance<u64>>,
    pub spend_per_month: Option<Allowance<f64>>,
    pub exec_seconds_per_day: Option<Allowance<u64>>,
    pub reminders: Option<u32>,
}

/// `families.<name>.budget`: what the members use together. Default: unlimited (each member
/// still has their own budget).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct BudgetConfig {
    pub messages_per_day: Allowance<u64>,
    pub tokens_per_day: Allowance<u64>,
    pub spend_per_month: Allowance<f64>,
    pub exec_seconds_per_day: Allowance<u64>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            messages_per_day: Allowance::Unlimited,
            tokens_per_day: Allowance::Unlimited,
            spend_per_month: Allowance::Unlimited,
            exec_seconds_per_day: Allowance::Unlimited,
        }
    }
}

/// `model.prices."provider/model"`: US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PriceConfig {
    pub input_per_m_tok: f64,
    pub output_per_m_tok: f64,
}

/// What one trust level gets, everything resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveLimits {
    pub tool_calls_per_answer: u32,
    pub tool_output_kb_per_turn: u64,
    pub stored_kb_per_turn: u64,
    pub transcript_mb: u64,
    pub queued_messages: u32,
    pub messages_per_day: Allowance<u64>,
    pub tokens_per_day: Allowance<u64>,
    pub spend_per_month: Allowance<f64>,
    pub exec_seconds_per_day: Allowance<u64>,
    pub reminders: u32,
}

/// The built-in defaults of a trust level (an owner's are the top-level values themselves).
fn level_defaults(trust: TrustLevel) -> LevelLimits {
    let limited = |n: u64| Some(Allowance::Limited(n));
    let dollars = |n: f64| Some(Allowance::Limited(n));
    match trust {
        TrustLevel::Owner => LevelLimits::default(),
        TrustLevel::Family => LevelLimits {
            tool_calls_per_answer: Some(32),
            tool_output_kb_per_turn: Some(1024),
            stored_kb_per_turn: Some(1024),
            transcript_mb: Some(512),
            queued_messages: Some(30),
            messages_per_day: limited(1000),
            tokens_per_day: limited(5_000_000),
            spend_per_month: dollars(50.0),
            exec_seconds_per_day: limited(3600),
            reminders: Some(50),
        },
        TrustLevel::Friend => LevelLimits {
            tool_calls_per_answer: Some(16),
            tool_output_kb_per_turn: Some(512),
            stored_kb_per_turn: Some(512),
            transcript_mb: Some(256),
            queued_messages: Some(20),
            messages_per_day: limited(500),
            tokens_per_day: limited(2_000_000),
            spend_per_month: dollars(20.0),
            exec_seconds_per_day: limited(1800),
            reminders: Some(20),
        },
        TrustLevel::Stranger => LevelLimits {
            tool_calls_per_answer: Some(8),
            tool_output_kb_per_turn: Some(256),
            stored_kb_per_turn: Some(256),
            transcript_mb: Some(32),
            queued_messages: Some(10),
            messages_per_day: limited(100),
            tokens_per_day: limited(300_000),
            spend_per_month: dollars(2.0),
            exec_seconds_per_day: limited(0),
            reminders: Some(10),
        },
        TrustLevel::Restricted => LevelLimits {
            tool_calls_per_answer: Some(8),
            tool_output_kb_per_turn: Some(256),
            stored_kb_per_turn: Some(256),
            transcript_mb: Some(16),
            queued_messages: Some(10),
            messages_per_day: limited(50),
            tokens_per_day: limited(100_000),
            spend_per_month: dollars(1.0),
            exec_seconds_per_day: limited(0),
            reminders: Some(0),
        },
    }
}

impl LimitsConfig {
    /// What a user of this trust level gets: for each key the smaller of the top-level value
    /// and the level's (configured, else built-in) value.
    pub fn for_trust(&self, trust: TrustLevel) -> EffectiveLimits {
        let configured = self.trust.level(trust);
        let builtin = level_defaults(trust);
        fn pick<T: Copy>(configured: Option<T>, builtin: Option<T>) -> Option<T> {
            configured.or(builtin)
        }
        let count = |global: u64, level: Option<u64>| level.map_or(global, |l| l.min(global));
        let allowance = |global: Allowance<u64>, level: Option<Allowance<u64>>| {
            level.map_or(global, |l| global.min(l))
        };
        EffectiveLimits {
            tool_calls_per_answer: count(
                u64::from(self.tool_calls_per_answer),
                pick(
                    configured.tool_calls_per_answer,
                    builtin.tool_calls_per_answer,
                )
                .map(u64::from),
            ) as u32,
            tool_output_kb_per_turn: count(
                self.tool_output_kb_per_turn,
                pick(
                    configured.tool_output_kb_per_turn,
                    builtin.tool_output_kb_per_turn,
                ),
            ),
            stored_kb_per_turn: count(
                self.stored_kb_per_turn,
                pick(configured.stored_kb_per_turn, builtin.stored_kb_per_turn),
            ),
            transcript_mb: count(
                self.transcript_mb,
                pick(configured.transcript_mb, builtin.transcript_mb),
            ),
            queued_messages: count(
                u64::from(self.queued_messages),
                pick(configured.queued_messages, builtin.queued_messages).map(u64::from),
            ) as u32,
            messages_per_day: allowance(
                self.messages_per_day,
                pick(configured.messages_per_day, builtin.messages_per_day),
            ),
            tokens_per_day: allowance(
                self.tokens_per_day,
                pick(configured.tokens_per_day, builtin.tokens_per_day),
            ),
            spend_per_month: pick(configured.spend_per_month, builtin.spend_per_month)
                .map_or(self.spend_per_month, |l| self.spend_per_month.min(l)),
            exec_seconds_per_day: allowance(
                self.exec_seconds_per_day,
                pick(
                    configured.exec_seconds_per_day,
                    builtin.exec_seconds_per_day,
                ),
            ),
            reminders: count(
                u64::from(self.reminders),
                pick(configured.reminders, builtin.reminders).map(u64::from),
            ) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_only_take_away_from_the_top_level_values() {
        let limits = LimitsConfig::default();
        let owner = limits.for_trust(TrustLevel::Owner);
        assert_eq!(owner.tool_calls_per_answer, 32);
        assert_eq!(owner.messages_per_day, Allowance::Limited(2000));
        assert_eq!(owner.spend_per_month, Allowance::Unlimited);
        let stranger = limits.for_trust(TrustLevel::Stranger);
        assert_eq!(stranger.tool_calls_per_answer, 8);
        assert_eq!(stranger.messages_per_day, Allowance::Limited(100));
        assert_eq!(stranger.spend_per_month, Allowance::Limited(2.0));

        // Tightening everyone tightens every level; a level asking for more gets the top value.
        let mut tight = LimitsConfig {
            messages_per_day: Allowance::Limited(50),
            ..LimitsConfig::default()
        };
        tight.trust.family.messages_per_day = Some(Allowance::Unlimited);
        tight.trust.stranger.messages_per_day = Some(Allowance::Limited(3));
        assert_eq!(
            tight.for_trust(TrustLevel::Owner).messages_per_day,
            Allowance::Limited(50)
        );
        assert_eq!(
            tight.for_trust(TrustLevel::Family).messages_per_day,
            Allowance::Limited(50)
        );
        assert_eq!(
            tight.for_trust(TrustLevel::Stranger).messages_per_day,
            Allowance::Limited(3)
        );
        // Raising the top level does not loosen a level with a built-in default.
        let generous = LimitsConfig {
            tokens_per_day: Allowance::Unlimited,
            ..LimitsConfig::default()
        };
        assert_eq!(
            generous.for_trust(TrustLevel::Owner).tokens_per_day,
            Allowance::Unlimited
        );
        assert_eq!(
            generous.for_trust(TrustLevel::Stranger).tokens_per_day,
            Allowance::Limited(300_000)
        );
    }

    #[test]
    fn every_level_is_at_most_the_owners() {
        let limits = LimitsConfig::default();
        let owner = limits.for_trust(TrustLevel::Owner);
        for level in TrustLevel::ALL {
            let l = limits.for_trust(level);
            assert!(l.tool_calls_per_answer <= owner.tool_calls_per_answer);
            assert!(l.tool_output_kb_per_turn <= owner.tool_output_kb_per_turn);
            assert!(l.stored_kb_per_turn <= owner.stored_kb_per_turn);
            assert!(l.transcript_mb <= owner.transcript_mb);
            assert!(l.queued_messages <= owner.queued_messages);
            assert!(l.reminders <= owner.reminders);
        }
    }
}
