//! Identifiers. Each is validated once, at construction, so holders never re-check.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("user id must be 1-64 characters of a-z, 0-9, '_' or '-' and start with a letter or digit, got {0:?}")]
    User(String),
    #[error("unknown channel {0:?} (expected one of: telegram, signal, discord, whatsapp, slack, web, local)")]
    Channel(String),
    #[error("peer id must be 1-128 printable characters without ':' or whitespace, got {0:?}")]
    Peer(String),
    #[error("identity must look like \"channel:peer\", e.g. \"telegram:123456\", got {0:?}")]
    Identity(String),
}

/// A user of the gateway, e.g. `telegram_123456` or `anna`.
///
/// The id doubles as the name of the user's home directory (`users/<id>/`), so its alphabet is
/// restricted to characters that can never form a path separator, `..`, or a hidden file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn new(raw: impl Into<String>) -> Result<Self, InvalidId> {
        let raw = raw.into();
        let valid_len = !raw.is_empty() && raw.len() <= 64;
        let valid_first = raw
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let valid_chars = raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if valid_len && valid_first && valid_chars {
            Ok(UserId(raw))
        } else {
            Err(InvalidId::User(raw))
        }
    }

    /// The default user id for a sender first seen on a channel: `<channel>_<peer>`, with every
    /// character outside the user-id alphabet replaced by `_` (Signal's `+49...` becomes `_49...`).
    pub fn for_identity(identity: &Identity) -> Self {
        let mut id =
            String::with_capacity(identity.channel.as_str().len() + 1 + identity.peer.0.len());
        id.push_str(identity.channel.as_str());
        id.push('_');
        for c in identity.peer.0.chars() {
            let c = c.to_ascii_lowercase();
            id.push(
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                    c
                } else {
                    '_'
                },
            );
        }
        id.truncate(64);
        // Proven invariant: starts with a channel name (lowercase letter), alphabet filtered above.
        UserId(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for UserId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UserId::new(s)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        UserId::new(raw).map_err(serde::de::Error::custom)
    }
}

/// A messaging channel the gateway can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Telegram,
    Signal,
    Discord,
    Whatsapp,
    Slack,
    Web,
    /// `moltmate chat` on the operator's terminal.
    Local,
}

impl ChannelKind {
    pub const ALL: [ChannelKind; 7] = [
        ChannelKind::Telegram,
        ChannelKind::Signal,
        ChannelKind::Discord,
        ChannelKind::Whatsapp,
        ChannelKind::Slack,
        ChannelKind::Web,
        ChannelKind::Local,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Telegram => "telegram",
            ChannelKind::Signal => "signal",
            ChannelKind::Discord => "discord",
            ChannelKind::Whatsapp => "whatsapp",
            ChannelKind::Slack => "slack",
            ChannelKind::Web => "web",
            ChannelKind::Local => "local",
        }
    }
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChannelKind {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChannelKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| InvalidId::Channel(s.to_string()))
    }
}

/// A sender's id on its channel (Telegram user id, Signal number, web login name...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct PeerId(String);

impl PeerId {
    pub fn new(raw: impl Into<String>) -> Result<Self, InvalidId> {
        let raw = raw.into();
        let valid = !raw.is_empty()
            && raw.len() <= 128
            && raw
                .chars()
                .all(|c| !c.is_whitespace() && !c.is_control() && c != ':');
        if valid {
            Ok(PeerId(raw))
        } else {
            Err(InvalidId::Peer(raw))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PeerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        PeerId::new(raw).map_err(serde::de::Error::custom)
    }
}

/// Who sent a message: a peer on a channel. Written `telegram:123456`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub channel: ChannelKind,
    pub peer: PeerId,
}

/// How a group conversation's peer id begins: `discord:group/<channel id>`,
/// `slack:group/<team>/<channel>`, `signal:group/<group id>`. No person's id on any channel
/// starts with it (they are numbers, `+49…`, `T…/U…`), so the prefix alone tells a group apart.
pub const GROUP_PEER_PREFIX: &str = "group/";

impl Identity {
    pub fn new(channel: ChannelKind, peer: PeerId) -> Self {
        Identity { channel, peer }
    }

    /// The identity of a group conversation (`<channel>:group/<scope>`): the group is its own
    /// user-like scope (home, memory, trust, queue), never the member who spoke.
    pub fn group(channel: ChannelKind, scope: &str) -> Result<Self, InvalidId> {
        Ok(Identity {
            channel,
            peer: PeerId::new(format!("{GROUP_PEER_PREFIX}{scope}"))?,
        })
    }

    /// Whether this is a group conversation rather than a person.
    pub fn is_group(&self) -> bool {
        self.peer
            .as_str()
            .strip_prefix(GROUP_PEER_PREFIX)
            .is_some_and(|rest| !rest.is_empty())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.channel, self.peer)
    }
}

impl FromStr for Identity {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (channel, peer) = s
            .split_once(':')
            .ok_or_else(|| InvalidId::Identity(s.to_string()))?;
        Ok(Identity {
            channel: channel.parse()?,
            peer: PeerId::new(peer)?,
        })
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_identities_are_recognised() {
        let g = Identity::group(ChannelKind::Discord, "123/456").unwrap();
        assert_eq!(g.to_string(), "discord:group/123/456");
        assert!(g.is_group());
        let parsed: Identity = "slack:group/T1/C2".parse().unwrap();
        assert!(parsed.is_group());
        for person in [
            "discord:123",
            "slack:T1/U2",
            "signal:+491",
            "telegram:group",
        ] {
            assert!(!person.parse::<Identity>().unwrap().is_group(), "{person}");
        }
        assert!(!"discord:group/".parse::<Identity>().unwrap().is_group());
        assert!(Identity::group(ChannelKind::Discord, "a b").is_err());
        assert_eq!(UserId::for_identity(&g).as_str(), "discord_group_123_456");
    }

    #[test]
    fn user_id_rejects_path_tricks() {
        for bad in [
            "",
            "..",
            "a/b",
            ".hidden",
            "A",
            "a b",
            "_x",
            &"x".repeat(65),
        ] {
            assert!(UserId::new(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(UserId::new("telegram_123456").is_ok());
    }

    #[test]
    fn user_id_for_identity_is_always_valid() {
        let id = Identity::new(ChannelKind::Signal, PeerId::new("+4915/../x").unwrap());
        let user = UserId::for_identity(&id);
        assert_eq!(user.as_str(), "signal__4915____x");
        assert!(UserId::new(user.as_str()).is_ok());
    }

    #[test]
    fn identity_round_trips() {
        let id: Identity = "telegram:123".parse().unwrap();
        assert_eq!(id.to_string(), "telegram:123");
        assert!("nochannel".parse::<Identity>().is_err());
        assert!("fax:1".parse::<Identity>().is_err());
    }
}
