//! Bounded work for senders who are not let in.
//!
//! Anyone can write to a Telegram bot, as often as they like. What a message from a sender who
//! is not allowed costs is therefore bounded here, never by their goodwill:
//!
//! * **Pairing** (`dmPolicy: pairing`): one code, one reply per code lifetime, and a cap on
//!   pending codes (the store's [`moltmate_store::Store::pairing_for_stranger`]); past the cap a
//!   new sender is dropped silently, with one operator log line per [`CAP_LOG_INTERVAL`].
//! * **Refused** (`allowlist`, `disabled`): an `access_refused` audit row and a log line for the
//!   first message of each sender per [`REFUSED_AUDIT_WINDOW`], for at most
//!   [`MAX_REFUSED_AUDITS_PER_WINDOW`] senders per window; everything beyond is counted and
//!   summed up in one log line when the window ends. The `moltmate_messages_total` counter
//!   (`outcome="refused"`) still counts every message.
//!
//! The state is in memory and bounded by the caps: at most one identity per audit row written.

use moltmate_core::{ChannelKind, Identity};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A refused sender gets at most one audit row and log line per this window.
pub const REFUSED_AUDIT_WINDOW: Duration = Duration::from_secs(3600);
/// Audit rows for refused senders per window at most, over all senders.
pub const MAX_REFUSED_AUDITS_PER_WINDOW: usize = 100;
/// At most one "pairing cap reached" log line per this interval.
pub const CAP_LOG_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct State {
    window_started: Instant,
    /// Senders audited in this window (at most [`MAX_REFUSED_AUDITS_PER_WINDOW`]).
    audited: HashSet<Identity>,
    /// Refused messages of this window without an audit row.
    unaudited: u64,
    /// The "too many refused senders" line was logged in this window.
    warned_full: bool,
    /// New senders dropped at the pairing cap since the last log line about it.
    capped: u64,
    last_cap_log: Option<Instant>,
}

/// Throttles what senders who are not let in leave behind (audit rows, log lines).
#[derive(Debug)]
pub struct Strangers {
    state: Mutex<State>,
}

impl Default for Strangers {
    fn default() -> Self {
        Self::new()
    }
}

impl Strangers {
    pub fn new() -> Self {
        Strangers {
            state: Mutex::new(State {
                window_started: Instant::now(),
                audited: HashSet::new(),
                unaudited: 0,
                warned_full: false,
                capped: 0,
                last_cap_log: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding this lock leaves plain counters behind: keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether this refused message gets an audit row and a log line (the caller writes both).
    pub fn should_audit_refusal(&self, identity: &Identity) -> bool {
        self.should_audit_refusal_at(identity, Instant::now())
    }

    fn should_audit_refusal_at(&self, identity: &Identity, now: Instant) -> bool {
        let mut state = self.state();
        if now.saturating_duration_since(state.window_started) >= REFUSED_AUDIT_WINDOW {
            if state.unaudited > 0 {
                tracing::info!(
                    messages = state.unaudited,
                    senders_audited = state.audited.len(),
                    "more messages from senders who are not allowed were dropped in the last hour than were audited"
                );
            }
            state.window_started = now;
            state.audited.clear();
            state.audited.shrink_to(MAX_REFUSED_AUDITS_PER_WINDOW);
            state.unaudited = 0;
            state.warned_full = false;
        }
        if state.audited.contains(identity) {
            state.unaudited += 1;
            return false;
        }
        if state.audited.len() >= MAX_REFUSED_AUDITS_PER_WINDOW {
            state.unaudited += 1;
            if !state.warned_full {
                state.warned_full = true;
                tracing::warn!(
                    senders = MAX_REFUSED_AUDITS_PER_WINDOW,
                    "many different senders who are not allowed are writing; further ones are dropped without an audit row or log line for the rest of the hour"
                );
            }
            return false;
        }
        state.audited.insert(identity.clone());
        true
    }

    /// A new sender was dropped because too many pairing codes are pending. Logs at most once
    /// per [`CAP_LOG_INTERVAL`], with how many were dropped since the last line.
    pub fn pairing_cap_reached(&self, channel: ChannelKind, cap: &'static str) {
        self.pairing_cap_reached_at(channel, cap, Instant::now());
    }

    fn pairing_cap_reached_at(
        &self,
        channel: ChannelKind,
        cap: &'static str,
        now: Instant,
    ) -> bool {
        let mut state = self.state();
        state.capped += 1;
        let due = state
            .last_cap_log
            .is_none_or(|last| now.saturating_duration_since(last) >= CAP_LOG_INTERVAL);
        if due {
            tracing::warn!(
                channel = channel.as_str(),
                cap,
                dropped = state.capped,
                "pending pairing codes are at their cap: new senders get no code and no reply \
                 (approve or deny pending ones with `moltmate pairing list`)"
            );
            state.capped = 0;
            state.last_cap_log = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltmate_core::PeerId;

    fn who(peer: u32) -> Identity {
        Identity::new(
            ChannelKind::Telegram,
            PeerId::new(peer.to_string()).unwrap(),
        )
    }

    #[test]
    fn refused_senders_are_audited_once_per_window_and_at_most_the_cap() {
        let strangers = Strangers::new();
        let start = Instant::now();
        assert!(strangers.should_audit_refusal_at(&who(1), start));
        assert!(!strangers.should_audit_refusal_at(&who(1), start));
        let audited = (2..1000)
            .filter(|peer| strangers.should_audit_refusal_at(&who(*peer), start))
            .count();
        assert_eq!(audited, MAX_REFUSED_AUDITS_PER_WINDOW - 1);
        assert_eq!(
            strangers.state().audited.len(),
            MAX_REFUSED_AUDITS_PER_WINDOW
        );
        let later = start + REFUSED_AUDIT_WINDOW;
        assert!(
            strangers.should_audit_refusal_at(&who(1), later),
            "a new window audits again"
        );
        assert_eq!(strangers.state().audited.len(), 1);
    }

    #[test]
    fn the_pairing_cap_is_logged_once_per_interval() {
        let strangers = Strangers::new();
        let start = Instant::now();
        assert!(strangers.pairing_cap_reached_at(ChannelKind::Telegram, "total", start));
        for _ in 0..100 {
            assert!(!strangers.pairing_cap_reached_at(ChannelKind::Telegram, "total", start));
        }
        assert_eq!(strangers.state().capped, 100);
        assert!(strangers.pairing_cap_reached_at(
            ChannelKind::Telegram,
            "total",
            start + CAP_LOG_INTERVAL
        ));
        assert_eq!(strangers.state().capped, 0);
    }
}
