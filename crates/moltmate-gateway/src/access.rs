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
    /// Peer ids (as strings) allowed without pairing; `"*"` allows every person (never a
    /// group: a group is admitted only by its own peer id, a pairing approval or the config).
    pub allow_from: Vec<String>,
    /// Group conversations are enabled on this channel (`channels.<name>.groups.enabled`).
    /// When false, every group identity is refused whatever else says.
    pub groups: bool,
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
        if identity.is_group() {
            return self.decide_group(identity, known);
        }
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

impl ChannelAccess {
    /// A group is its own scope with the channel's default trust, reachable by everyone in
    /// it: it needs the operator's explicit consent for that very group. `"*"` and `open` are
    /// consent for persons, not for every group the bot is added to, so under `open` a new
    /// group gets a pairing code like a stranger does under `pairing`.
    fn decide_group(&self, identity: &Identity, known: &KnownSender) -> AccessDecision {
        if !self.groups || self.policy == DmPolicy::Disabled {
            return AccessDecision::Refused;
        }
        let named = self
            .allow_from
            .iter()
            .any(|entry| entry == identity.peer.as_str());
        let linked = match known {
            KnownSender::Configured(u) | KnownSender::Paired(u) | KnownSender::Seen(u) => {
                Some(u.clone())
            }
            KnownSender::Unknown => None,
        };
        let user = || {
            linked
                .clone()
                .unwrap_or_else(|| UserId::for_identity(identity))
        };
        match (self.policy, known) {
            (_, KnownSender::Configured(_)) => AccessDecision::Allowed(user()),
            _ if named => AccessDecision::Allowed(user()),
            (DmPolicy::Allowlist, _) => AccessDecision::Refused,
            (_, KnownSender::Paired(_)) => AccessDecision::Allowed(user()),
            _ => AccessDecision::NeedsPairing,
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
            groups: false,
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

    #[test]
    fn groups_need_their_own_consent() {
        let group = Identity::group(ChannelKind::Discord, "42").unwrap();
        let access = |policy, allow: &[&str], groups| ChannelAccess {
            policy,
            allow_from: allow.iter().map(|s| s.to_string()).collect(),
            groups,
        };
        let unknown = KnownSender::Unknown;
        let configured = KnownSender::Configured(UserId::new("team").unwrap());
        let paired = KnownSender::Paired(UserId::new("discord_group_42").unwrap());
        // Groups off: refused even when configured or listed.
        for known in [&unknown, &configured, &paired] {
            assert_eq!(
                access(DmPolicy::Open, &["*", "group/42"], false).decide(&group, known),
                AccessDecision::Refused
            );
        }
        // "*" and open are not consent for a group: a code instead.
        assert_eq!(
            access(DmPolicy::Open, &["*"], true).decide(&group, &unknown),
            AccessDecision::NeedsPairing
        );
        assert_eq!(
            access(DmPolicy::Pairing, &["*"], true).decide(&group, &unknown),
            AccessDecision::NeedsPairing
        );
        assert_eq!(
            access(DmPolicy::Allowlist, &["*"], true).decide(&group, &unknown),
            AccessDecision::Refused
        );
        assert_eq!(
            access(DmPolicy::Allowlist, &["group/42"], true).decide(&group, &unknown),
            AccessDecision::Allowed(UserId::new("discord_group_42").unwrap())
        );
        assert!(matches!(
            access(DmPolicy::Pairing, &[], true).decide(&group, &paired),
            AccessDecision::Allowed(_)
        ));
        assert_eq!(
            access(DmPolicy::Allowlist, &[], true).decide(&group, &paired),
            AccessDecision::Refused
        );
        assert_eq!(
            access(DmPolicy::Allowlist, &[], true).decide(&group, &configured),
            AccessDecision::Allowed(UserId::new("team").unwrap())
        );
        assert_eq!(
            access(DmPolicy::Disabled, &["group/42"], true).decide(&group, &configured),
            AccessDecision::Refused
        );
    }
}
