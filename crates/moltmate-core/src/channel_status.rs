//! What the operator sees of each configured channel: connected or not, when the last event
//! came, how many errors of which class, and (for channels that link an account, like Signal)
//! the link state.
//!
//! Every channel owns one [`ChannelHealth`] and updates it as it works; `/healthz`, `/admin`
//! and `/metrics` read [`ChannelHealth::snapshot`]. Everything recorded here is from fixed
//! sets ([`ErrorClass`], [`LinkState`]): no text of a service, a user or a request is ever
//! stored, so none can become a metric label or leak through the unauthenticated `/healthz`.
//! The one free-form value, [`ChannelStatus::link_uri`] (a device-link URI while linking), is
//! for the operator's eyes on `/admin` only.

use crate::channel::ChannelError;
use crate::ChannelKind;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a channel failed, as a fixed label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorClass {
    /// The service (or a local daemon) could not be reached.
    Unreachable,
    /// The service asked us to slow down.
    RateLimited,
    /// The service failed (5xx).
    Server,
    /// The service refused a request (other 4xx).
    Rejected,
    /// The credentials were refused (401/403, a revoked token, a wrong app secret).
    Credentials,
    /// The service answered something we could not read.
    InvalidReply,
    /// A message could not be stored by the gateway.
    Storage,
    /// WhatsApp: a reply outside the 24-hour customer-service window was refused.
    OutsideWindow,
    /// The linked account is gone (Signal: the device was unlinked on the phone).
    LinkLost,
    /// A local program the channel needs is missing (signal-cli, Java).
    Missing,
    /// An incoming delivery was refused (a bad webhook signature, an oversize body).
    BadDelivery,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 11] = [
        ErrorClass::Unreachable,
        ErrorClass::RateLimited,
        ErrorClass::Server,
        ErrorClass::Rejected,
        ErrorClass::Credentials,
        ErrorClass::InvalidReply,
        ErrorClass::Storage,
        ErrorClass::OutsideWindow,
        ErrorClass::LinkLost,
        ErrorClass::Missing,
        ErrorClass::BadDelivery,
    ];

    /// The label value (`/metrics`, `/healthz`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Unreachable => "unreachable",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Server => "server",
            ErrorClass::Rejected => "rejected",
            ErrorClass::Credentials => "credentials",
            ErrorClass::InvalidReply => "invalid_reply",
            ErrorClass::Storage => "storage",
            ErrorClass::OutsideWindow => "outside_window",
            ErrorClass::LinkLost => "link_lost",
            ErrorClass::Missing => "missing",
            ErrorClass::BadDelivery => "bad_delivery",
        }
    }

    /// One line for the operator (`/admin`).
    pub fn describe(self) -> &'static str {
        match self {
            ErrorClass::Unreachable => "could not reach the service",
            ErrorClass::RateLimited => "the service asked us to slow down",
            ErrorClass::Server => "the service had an error",
            ErrorClass::Rejected => "the service refused a request",
            ErrorClass::Credentials => "the credentials were refused: check the token or secret",
            ErrorClass::InvalidReply => "the service sent something we could not read",
            ErrorClass::Storage => "a message could not be stored",
            ErrorClass::OutsideWindow => {
                "a reply was refused: the person last wrote more than 24 hours ago (WhatsApp customer-service window)"
            }
            ErrorClass::LinkLost => "the linked account is gone: link it again",
            ErrorClass::Missing => "a program the channel needs is missing",
            ErrorClass::BadDelivery => "an incoming delivery was refused (bad signature or size)",
        }
    }

    /// The class of a channel error.
    pub fn of(error: &ChannelError) -> ErrorClass {
        match error {
            ChannelError::Unreachable { .. } => ErrorClass::Unreachable,
            ChannelError::RateLimited { .. } => ErrorClass::RateLimited,
            ChannelError::Server { .. } => ErrorClass::Server,
            ChannelError::Rejected { status, .. } if *status == 401 || *status == 403 => {
                ErrorClass::Credentials
            }
            ChannelError::Rejected { .. } => ErrorClass::Rejected,
            ChannelError::InvalidReply { .. } => ErrorClass::InvalidReply,
        }
    }

    fn index(self) -> usize {
        // ALL lists every variant once, in declaration order.
        self as usize
    }
}

/// Whether the channel's account is linked (only channels that link a device have one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkState {
    /// The channel has no linking (bot tokens, webhooks).
    #[default]
    NotApplicable,
    /// Linked and usable.
    Linked,
    /// Never linked: run the link command (or scan the code on `/admin`).
    NotLinked,
    /// A link is being made: a code is waiting to be scanned.
    Linking,
    /// It was linked and the link is gone (unlinked on the phone, data lost).
    Lost,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::NotApplicable => "n/a",
            LinkState::Linked => "linked",
            LinkState::NotLinked => "not_linked",
            LinkState::Linking => "linking",
            LinkState::Lost => "lost",
        }
    }
}

/// A copy of one channel's health at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelStatus {
    pub channel: ChannelKind,
    /// The last exchange with the service worked.
    pub connected: bool,
    /// Unix milliseconds of the last inbound event (message, delivery), if any.
    pub last_event_ms: Option<i64>,
    /// Errors by class since start, every class listed (zeros included).
    pub errors: Vec<(ErrorClass, u64)>,
    /// The most recent error and its time (Unix milliseconds).
    pub last_error: Option<(ErrorClass, i64)>,
    pub link: LinkState,
    /// A device-link URI (`sgnl://linkdevice?...`) waiting to be scanned. Operator-only.
    pub link_uri: Option<String>,
}

impl ChannelStatus {
    pub fn errors_total(&self) -> u64 {
        self.errors.iter().map(|(_, n)| n).sum()
    }

    /// Connected and, where the channel links an account, linked.
    pub fn is_healthy(&self) -> bool {
        self.connected && matches!(self.link, LinkState::NotApplicable | LinkState::Linked)
    }
}

#[derive(Debug)]
struct State {
    connected: bool,
    last_event_ms: Option<i64>,
    errors: [u64; ErrorClass::ALL.len()],
    last_error: Option<(ErrorClass, i64)>,
    link: LinkState,
    link_uri: Option<String>,
}

/// One channel's live health. Shared (`Arc`) between the channel and the readers; every
/// method takes a short lock and never blocks on I/O.
#[derive(Debug)]
pub struct ChannelHealth {
    channel: ChannelKind,
    state: Mutex<State>,
}

/// Longest link URI kept (a real one is about 200 characters).
const MAX_LINK_URI: usize = 2048;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl ChannelHealth {
    pub fn new(channel: ChannelKind) -> Arc<Self> {
        Arc::new(ChannelHealth {
            channel,
            state: Mutex::new(State {
                connected: false,
                last_event_ms: None,
                errors: [0; ErrorClass::ALL.len()],
                last_error: None,
                link: LinkState::NotApplicable,
                link_uri: None,
            }),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A poisoned lock only means a panic elsewhere mid-update; the counters stay usable.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut state)
    }

    pub fn channel(&self) -> ChannelKind {
        self.channel
    }

    pub fn set_connected(&self, connected: bool) {
        self.with(|s| s.connected = connected);
    }

    /// An inbound event arrived (it also proves the connection works).
    pub fn event(&self) {
        self.with(|s| {
            s.connected = true;
            s.last_event_ms = Some(now_ms());
        });
    }

    /// Count an error of `class`.
    pub fn error(&self, class: ErrorClass) {
        self.with(|s| {
            s.errors[class.index()] = s.errors[class.index()].saturating_add(1);
            s.last_error = Some((class, now_ms()));
        });
    }

    /// Count an error of `class` that strangers can cause at will (a refused webhook
    /// delivery): counted, but it never replaces the last error shown, so a real one
    /// (credentials, outside the window) stays visible under a flood of refusals.
    pub fn refusal(&self, class: ErrorClass) {
        self.with(|s| {
            s.errors[class.index()] = s.errors[class.index()].saturating_add(1);
        });
    }

    /// Count a channel error by its class.
    pub fn channel_error(&self, error: &ChannelError) {
        self.error(ErrorClass::of(error));
    }

    pub fn set_link(&self, link: LinkState) {
        self.with(|s| {
            s.link = link;
            if link != LinkState::Linking {
                s.link_uri = None;
            }
        });
    }

    /// A device-link URI is waiting to be scanned (state becomes `Linking`).
    pub fn set_link_uri(&self, uri: &str) {
        let uri: String = uri.chars().take(MAX_LINK_URI).collect();
        self.with(|s| {
            s.link = LinkState::Linking;
            s.link_uri = Some(uri);
        });
    }

    pub fn snapshot(&self) -> ChannelStatus {
        self.with(|s| ChannelStatus {
            channel: self.channel,
            connected: s.connected,
            last_event_ms: s.last_event_ms,
            errors: ErrorClass::ALL
                .iter()
                .map(|c| (*c, s.errors[c.index()]))
                .collect(),
            last_error: s.last_error,
            link: s.link,
            link_uri: s.link_uri.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes_index_in_declaration_order() {
        for (i, class) in ErrorClass::ALL.iter().enumerate() {
            assert_eq!(class.index(), i);
        }
    }

    #[test]
    fn health_counts_and_snapshots() {
        let h = ChannelHealth::new(ChannelKind::Signal);
        assert!(!h.snapshot().connected);
        h.event();
        h.error(ErrorClass::Unreachable);
        h.error(ErrorClass::Unreachable);
        h.channel_error(&ChannelError::Rejected {
            service: "x",
            status: 401,
            detail: String::new(),
        });
        let s = h.snapshot();
        assert!(s.connected && s.last_event_ms.is_some());
        assert_eq!(s.errors_total(), 3);
        assert_eq!(s.last_error.map(|e| e.0), Some(ErrorClass::Credentials));
        h.set_link_uri("sgnl://linkdevice?uuid=x");
        assert_eq!(h.snapshot().link, LinkState::Linking);
        assert!(!h.snapshot().is_healthy());
        h.set_link(LinkState::Linked);
        assert_eq!(h.snapshot().link_uri, None);
        assert!(h.snapshot().is_healthy());
    }
}
