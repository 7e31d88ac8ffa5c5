//! The Events API over HTTP: Slack POSTs each event to `/webhooks/slack` on the gateway's web
//! server (core's [`Webhook`] seam; the web layer knows no Slack).
//!
//! Every request is verified before its body is parsed: `X-Slack-Request-Timestamp` within
//! [`REPLAY_WINDOW`] of our clock, and `X-Slack-Signature` equal to `v0=` + hex
//! HMAC-SHA256(signing secret, `v0:{timestamp}:{raw body}`), compared in constant time.
//! Anything unsigned, wrongly signed, stale or larger than [`MAX_EVENT_BODY`] is refused (401 or
//! 413) and nothing of it is stored. A signed `url_verification` echoes its challenge. A signed
//! `event_callback` goes through the same [`SlackChannel::dispose`] as Socket Mode (access rules
//! follow in the gateway) and is stored through the gateway's inbox **before** the 200 answer;
//! the inbox deduplicates by channel + `ts`, so Slack's retries (`X-Slack-Retry-Num`, sent when
//! we did not answer 2xx within 3 s) and a replay inside the window are answered at most once.
//! Storing is one database commit, well inside Slack's 3 seconds.

use super::{Disposition, Payload, SlackChannel, SlackMode};
use async_trait::async_trait;
use hmac::{Hmac, Mac};
use moltmate_core::channel_status::ErrorClass;
use moltmate_core::webhook::{Webhook, WebhookRequest, WebhookResponse};
use moltmate_core::ChannelKind;
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest event request read (Slack's events are a few KB; a message is at most 40,000
/// characters). The web layer bounds every webhook body more loosely before this.
pub const MAX_EVENT_BODY: usize = 128 * 1024;

/// How far a request's timestamp may be from our clock (Slack recommends five minutes).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);

/// A signing secret as Slack issues them (32 hex digits), with room for other lengths.
pub(super) fn signing_secret_ok(secret: &str) -> bool {
    (16..=128).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `v0=<hex>`: Slack's signature of `body` sent at `timestamp` (for tests and doubles).
pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// Why a request was refused before reading its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    MissingHeaders,
    BadTimestamp,
    Stale,
    BadSignature,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::MissingHeaders => "missing X-Slack-Signature or X-Slack-Request-Timestamp",
            Refusal::BadTimestamp => "malformed X-Slack-Request-Timestamp",
            Refusal::Stale => "X-Slack-Request-Timestamp outside the replay window",
            Refusal::BadSignature => "bad X-Slack-Signature",
        }
    }
}

fn verify(secret: &str, request: &WebhookRequest, now_unix: u64) -> Result<(), Refusal> {
    let (Some(timestamp), Some(signature)) = (
        request.header("x-slack-request-timestamp"),
        request.header("x-slack-signature"),
    ) else {
        return Err(Refusal::MissingHeaders);
    };
    let timestamp = timestamp.trim();
    if timestamp.is_empty()
        || timestamp.len() > 12
        || !timestamp.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Refusal::BadTimestamp);
    }
    let sent: u64 = timestamp.parse().map_err(|_| Refusal::BadTimestamp)?;
    if sent.abs_diff(now_unix) > REPLAY_WINDOW.as_secs() {
        return Err(Refusal::Stale);
    }
    let Some(hex_sig) = signature.trim().strip_prefix("v0=") else {
        return Err(Refusal::BadSignature);
    };
    let Ok(given) = hex::decode(hex_sig) else {
        return Err(Refusal::BadSignature);
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return Err(Refusal::BadSignature);
    };
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(&request.body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&given).map_err(|_| Refusal::BadSignature)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A challenge we echo: Slack's are short letters and digits.
fn challenge_ok(challenge: &str) -> bool {
    !challenge.is_empty()
        && challenge.len() <= 256
        && challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl SlackChannel {
    async fn handle_event_request(&self, request: WebhookRequest) -> WebhookResponse {
        if !request.post {
            return WebhookResponse::new(405, "POST only");
        }
        if request.body.len() > MAX_EVENT_BODY {
            self.health.error(ErrorClass::BadDelivery);
            tracing::warn!(
                bytes = request.body.len(),
                "slack: refused an event request larger than {MAX_EVENT_BODY} bytes"
            );
            return WebhookResponse::new(413, "too large");
        }
        if let Err(refusal) = verify(&self.settings.signing_secret, &request, now_unix()) {
            self.health.error(ErrorClass::BadDelivery);
            tracing::warn!(
                reason = refusal.as_str(),
                "slack: refused an event request (check channels.slack.signingSecret and the server clock if this repeats)"
            );
            return WebhookResponse::new(401, "unauthorized");
        }
        let payload: Payload = match serde_json::from_slice(&request.body) {
            Ok(payload) => payload,
            Err(_) => {
                self.health.error(ErrorClass::BadDelivery);
                return WebhookResponse::new(400, "not an Events API payload");
            }
        };
        match payload.kind.as_deref() {
            Some("url_verification") => match payload.challenge.as_deref() {
                Some(challenge) if challenge_ok(challenge) => {
                    tracing::info!("slack: Request URL verified by Slack");
                    WebhookResponse::new(200, challenge)
                }
                _ => WebhookResponse::new(400, "bad challenge"),
            },
            Some("event_callback") => {
                let (Some(sink), Some(me)) = (self.sink.get(), self.me.get()) else {
                    // Not started, or the bot token was refused: Slack retries later.
                    return WebhookResponse::new(503, "not ready");
                };
                self.health.event();
                let retry = request
                    .header("x-slack-retry-num")
                    .and_then(|n| n.trim().parse::<u32>().ok());
                let Some(event) = payload.event else {
                    return WebhookResponse::new(200, "ok");
                };
                match self.dispose(payload.team_id.as_deref(), event, me) {
                    Disposition::Deliver(message) => match sink.accept(*message).await {
                        Ok(accepted) => {
                            tracing::debug!(?accepted, retry, "slack: event stored");
                            WebhookResponse::new(200, "ok")
                        }
                        Err(e) => {
                            self.health.error(ErrorClass::Storage);
                            tracing::warn!(error = %e, "slack: could not store an event; Slack will retry it");
                            WebhookResponse::new(500, "not stored")
                        }
                    },
                    Disposition::Skip(reason) => {
                        tracing::debug!(reason, "slack: skipping event");
                        WebhookResponse::new(200, "ok")
                    }
                }
            }
            _ => WebhookResponse::new(200, "ignored"),
        }
    }
}

#[async_trait]
impl Webhook for SlackChannel {
    fn channel(&self) -> ChannelKind {
        ChannelKind::Slack
    }

    async fn handle(&self, request: WebhookRequest) -> WebhookResponse {
        if self.settings.mode != SlackMode::Events {
            return WebhookResponse::new(404, "not found");
        }
        self.handle_event_request(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

    fn request(body: &[u8], timestamp: Option<&str>, signature: Option<String>) -> WebhookRequest {
        let mut headers = Vec::new();
        if let Some(t) = timestamp {
            headers.push(("x-slack-request-timestamp".to_string(), t.to_string()));
        }
        if let Some(s) = signature {
            headers.push(("x-slack-signature".to_string(), s));
        }
        WebhookRequest {
            post: true,
            query: vec![],
            headers,
            body: body.to_vec(),
        }
    }

    /// Slack's own example from "Verifying requests from Slack".
    #[test]
    fn the_signature_matches_slacks_documented_example() {
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        assert_eq!(
            signature(SECRET, "1531420618", body),
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
        );
    }

    #[test]
    fn unsigned_forged_and_stale_requests_are_refused() {
        let body = br#"{"type":"event_callback"}"#;
        let now = 1_700_000_000u64;
        let ts = now.to_string();
        let good = signature(SECRET, &ts, body);
        assert_eq!(
            verify(SECRET, &request(body, Some(&ts), Some(good.clone())), now),
            Ok(())
        );
        assert_eq!(
            verify(SECRET, &request(body, None, Some(good.clone())), now),
            Err(Refusal::MissingHeaders)
        );
        assert_eq!(
            verify(SECRET, &request(body, Some(&ts), None), now),
            Err(Refusal::MissingHeaders)
        );
        assert_eq!(
            verify(
                SECRET,
                &request(
                    body,
                    Some(&ts),
                    Some(signature("other-secret-123456", &ts, body))
                ),
                now
            ),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify(SECRET, &request(b"{}", Some(&ts), Some(good.clone())), now),
            Err(Refusal::BadSignature),
            "the body is signed"
        );
        let old = (now - 301).to_string();
        assert_eq!(
            verify(
                SECRET,
                &request(body, Some(&old), Some(signature(SECRET, &old, body))),
                now
            ),
            Err(Refusal::Stale)
        );
        let future = (now + 301).to_string();
        assert_eq!(
            verify(
                SECRET,
                &request(body, Some(&future), Some(signature(SECRET, &future, body))),
                now
            ),
            Err(Refusal::Stale)
        );
        for bad in ["-5", "1e9", "", "99999999999999999999"] {
            assert_eq!(
                verify(
                    SECRET,
                    &request(body, Some(bad), Some(signature(SECRET, bad, body))),
                    now
                ),
                Err(Refusal::BadTimestamp),
                "{bad}"
            );
        }
        for bad in ["v1=00", "v0=zz", "v0=", &good[3..]] {
            assert_eq!(
                verify(
                    SECRET,
                    &request(body, Some(&ts), Some(bad.to_string())),
                    now
                ),
                Err(Refusal::BadSignature),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_plain_challenges_are_echoed() {
        assert!(challenge_ok(
            "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
        ));
        assert!(!challenge_ok("<script>") && !challenge_ok("") && !challenge_ok(&"a".repeat(300)));
    }
}
