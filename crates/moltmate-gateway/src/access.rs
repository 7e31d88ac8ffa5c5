//! Access policy: who may reach the assistant through a channel.
//!
//! Decided for every inbound message before anything is stored or any model is called. A
//! sender who is not allowed never reaches the model; under `pairing` they get a one-time code
//! and nothing else.

pub use moltmate_core::channel::DmPolicy;
use moltmate_core::{Identity, UserId};

/// One channel's access rules.
#[derive(Debug, Clone, Default)]
pub struct ChannelAccess {
    pub policy: DmPolicy,
    /// Peer ids (as strings) allowed without pairing; `"*"` allows everyone.
    pub allow_from: Vec<String>,
}

/// What the stored identity links say about a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownSender {
    /// Linked by the operator's config (`users.<id>.identities`).
    Configured(UserId),
    /// Linked by an approved pairing request.
    Paired(UserId),
    /// Linked some other way (an earlier `open` or `allowlist` contact).
    Seen(UserId),
    Unknown,
}

/// The decision for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessDecision {
    Allowed(UserId),
    /// Send (or re-send) a pairing code; store nothing else.
    NeedsPairing,
    /// Drop silently.
    Refused,
}

impl ChannelAccess {
    fn allow_listed(&self, identity: &Identity) -> bool {
        self.allow_from
            .iter()
            .any(|entry| entry == "*" || entry == identity.peer.as_str())
    }

    pub fn decide(&self, identity: &Identity, known: &KnownSender) -> AccessDecision {
        let linked_user = match known {
            KnownSender::Configured(u) | KnownSender::Paired(u) | KnownSender::Seen(u) => {
                Some(u.clone())
            }
            KnownSender::Unknown => None,
        };
        let user = || {
            linked_user
                .clone()
                .unwrap_or_else(|| UserId::for_identity(identity))
        };
        match self.policy {
            DmPolicy::Disabled => AccessDecision::Refused,
            // The operator named this identity in the config: that is consent enough.
            _ if matches!(known, KnownSender::Configured(_)) => AccessDecision::Allowed(user()),
            DmPolicy::Open => AccessDecision::Allowed(user()),
            DmPolicy::Allowlist if self.allow_listed(identity) => AccessDecision::Allowed(user()),
            DmPolicy::Allowlist => AccessDecision::Refused,
            DmPolicy::Pairing
                if self.allow_listed(identity) || matches!(known, KnownSender::Paired(_)) =>
            {
                AccessDecision::Allowed(user())
            }
            DmPolicy::Pairing => AccessDecision::NeedsPairing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltmate_core::{ChannelKind, PeerId};

    fn who(peer: &str) -> Identity {
        Identity::new(ChannelKind::Telegram, PeerId::new(peer).unwrap())
    }

    #[test]
    fn each_policy_decides_as_documented() {
        let unknown = KnownSender::Unknown;
        let paired = KnownSender::Paired(UserId::new("telegram_2").unwrap());
        let access = |policy, allow: &[&str]| ChannelAccess {
            policy,
            allow_from: allow.iter().map(|s| s.to_string()).collect(),
        };

        assert_eq!(
            access(DmPolicy::Pairing, &[]).decide(&who("1"), &unknown),
            AccessDecision::NeedsPairing
        );
        assert!(matches!(
            access(DmPolicy::Pairing, &[]).decide(&who("2"), &paired),
            AccessDecision::Allowed(_)
        ));
        assert!(matches!(
            access(DmPolicy::Pairing, &["1"]).decide(&who("1"), &unknown),
            AccessDecision::Allowed(_)
        ));
        assert_eq!(
            access(DmPolicy::Allowlist, &["9"]).decide(&who("1"), &unknown),
            AccessDecision::Refused
        );
        assert_eq!(
            access(DmPolicy::Allowlist, &["9"]).decide(&who("2"), &paired),
            AccessDecision::Refused
        );
        assert_eq!(
            access(DmPolicy::Allowlist, &["1"]).decide(&who("1"), &unknown),
            AccessDecision::Allowed(UserId::new("telegram_1").unwrap())
        );
        assert!(matches!(
            access(DmPolicy::Open, &["*"]).decide(&who("5"), &unknown),
            AccessDecision::Allowed(_)
        ));
        let configured = KnownSender::Configured(UserId::new("anna").unwrap());
        assert_eq!(
            access(DmPolicy::Disabled, &["*"]).decide(&who("5"), &configured),
            AccessDecision::Refused
        );
        assert_eq!(
            access(DmPolicy::Allowlist, &[]).decide(&who("5"), &configured),
            AccessDecision::Allowed(UserId::new("anna").unwrap())
        );
    }
}
