//! The layers every request passes: rate limits, request counting, security headers, and the
//! checks browser state changes need (same origin, CSRF token).
//!
//! Rate limits use `governor`'s keyed GCRA limiter (a token bucket in effect): one keyed by
//! client IP (IPv6 by /64, since one host usually owns a whole /64) and one keyed by the
//! digest of the request's credential (bearer token or session cookie), so neither many IPs
//! sharing one token nor one IP cycling through bogus tokens gets past. The keyed maps only
//! grow with keys seen within about one refill window: every few thousand checks (and whenever
//! the map passes [`MAX_TRACKED_KEYS`]) keys whose bucket is full again are dropped.
//!
//! The client IP is the TCP peer. `X-Forwarded-For` is believed only from the peers listed in
//! [`crate::WebSettings::trusted_proxies`]; otherwise anyone could pick their own bucket.

use crate::error::{InvalidSettings, WebError};
use crate::session;
use crate::state::{RequestLabels, WebState};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Above this many tracked keys, stale ones are dropped at once rather than periodically.
pub const MAX_TRACKED_KEYS: usize = 50_000;
const CLEANUP_EVERY: u64 = 4096;

type KeyedLimiter = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// Per-IP and per-credential token buckets.
pub struct RateLimits {
    by_ip: KeyedLimiter,
    by_credential: KeyedLimiter,
    checks: AtomicU64,
}

impl RateLimits {
    pub fn new(per_minute: u32, burst: u32) -> Result<Self, InvalidSettings> {
        let per_minute = NonZeroU32::new(per_minute).ok_or(InvalidSettings::ZeroRate)?;
        let burst = NonZeroU32::new(burst).ok_or(InvalidSettings::ZeroBurst)?;
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        Ok(RateLimits {
            by_ip: RateLimiter::keyed(quota),
            by_credential: RateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
        })
    }

    /// `Err(wait)` when either bucket is empty.
    pub fn check(&self, ip_key: &str, credential_key: Option<&str>) -> Result<(), Duration> {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks.is_multiple_of(CLEANUP_EVERY)
            || self.by_ip.len() > MAX_TRACKED_KEYS
            || self.by_credential.len() > MAX_TRACKED_KEYS
        {
            for limiter in [&self.by_ip, &self.by_credential] {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
        let wait = |limiter: &KeyedLimiter, key: &str| {
            limiter
                .check_key(&key.to_string())
                .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
        };
        wait(&self.by_ip, ip_key)?;
        if let Some(key) = credential_key {
            wait(&self.by_credential, key)?;
        }
        Ok(())
    }
}

/// The rate-limit key of a client address.
pub fn ip_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// A digest of the request's credential, if it carries one. Only the digest is kept in memory.
fn credential_key(headers: &HeaderMap) -> Option<String> {
    let credential = bearer_token(headers)
        .or_else(|| session::cookie(headers, session::USER_COOKIE))
        .or_else(|| session::cookie(headers, session::ADMIN_COOKIE))?;
    Some(hex::encode(&Sha256::digest(credential.as_bytes())[..16]))
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The client's address: the peer, or, when the peer is a trusted reverse proxy, the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy (entries further
/// left were written by the client and prove nothing).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[IpAddr]) -> IpAddr {
    // A dual-stack listener sees IPv4 peers as `::ffff:a.b.c.d`: compare canonical forms.
    let peer = peer.to_canonical();
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|t| t.to_canonical() == *ip);
    if !trusted(&peer) {
        return peer;
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for entry in forwarded.iter().rev() {
        match entry.parse::<IpAddr>() {
            Ok(ip) if trusted(&ip.to_canonical()) => continue,
            Ok(ip) => return ip.to_canonical(),
            // Garbage in the chain: stop trusting it and limit the proxy's own bucket.
            Err(_) => return peer,
        }
    }
    peer
}

pub async fn rate_limit(State(state): State<WebState>, request: Request, next: Next) -> Response {
    let trusted = &state.inner.settings.trusted_proxies;
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| ip_key(client_ip(addr.ip(), request.headers(), trusted)))
        .unwrap_or_else(|| "unknown".to_string());
    let credential = credential_key(request.headers());
    if let Err(retry_after) = state.inner.limits.check(&ip, credential.as_deref()) {
        state.inner.metrics.rate_limited.inc();
        return WebError::RateLimited { retry_after }.into_response();
    }
    next.run(request).await
}

pub async fn count_requests(
    State(state): State<WebState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().as_str().to_string();
    let response = next.run(request).await;
    let labels = RequestLabels {
        route,
        method,
        status: response.status().as_u16().to_string(),
    };
    state.inner.metrics.requests.get_or_create(&labels).inc();
    response
}

/// Security headers on every response. The CSP forbids inline script and style, so every
/// script and stylesheet is a file under `/assets/`.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let fixed: [(HeaderName, &'static str); 5] = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (HeaderName::from_static("cross-origin-opener-policy"), "same-origin"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

pub async fn not_found() -> WebError {
    WebError::NotFound
}

/// Refuses cross-site browser requests.
///
/// `Sec-Fetch-Site` decides when the browser sends it (every current browser does): only
/// `same-origin` and `none` (typed or bookmarked) pass. Otherwise a present `Origin` must name
/// the `Host`. `Origin: null` passes: browsers send it for same-origin form posts under
/// `Referrer-Policy: no-referrer`, so it tells nothing; requests without either header (curl)
/// pass too. The CSRF token and SameSite=Strict still protect every signed-in change.
pub fn check_same_origin(headers: &HeaderMap) -> Result<(), WebError> {
    const REFUSED: WebError = WebError::Forbidden("cross-site request refused");
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().map_err(|_| REFUSED)?;
        return if site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none") {
            Ok(())
        } else {
            Err(REFUSED)
        };
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().map_err(|_| REFUSED)?;
    if origin == "null" {
        return Ok(());
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'));
    match (origin_host, host) {
        (Some(origin_host), Some(host)) if origin_host.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(REFUSED),
    }
}

/// Compares a presented CSRF token with the session's, in constant time.
pub fn check_csrf(expected: &str, presented: Option<&str>) -> Result<(), WebError> {
    let Some(presented) = presented else {
        return Err(WebError::Forbidden("missing CSRF token; reload the page"));
    };
    let expected_digest = Sha256::digest(expected.as_bytes());
    let presented_digest = Sha256::digest(presented.as_bytes());
    if bool::from(expected_digest.ct_eq(&presented_digest)) {
        Ok(())
    } else {
        Err(WebError::Forbidden("wrong CSRF token; reload the page"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        assert_eq!(ip_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1");
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 1.2.3.4"),
        );
        let stranger: IpAddr = "9.9.9.9".parse().unwrap();
        assert_eq!(
            client_ip(stranger, &headers, &[proxy]),
            stranger,
            "an untrusted peer cannot pick its bucket"
        );
        assert_eq!(
            client_ip(proxy, &headers, &[proxy]),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, &headers, &[]), proxy);
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, 10.0.0.2"),
        );
        assert_eq!(
            client_ip(proxy, &headers, &[proxy]),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("nonsense"));
        assert_eq!(client_ip(proxy, &headers, &[proxy]), proxy);
        headers.remove("x-forwarded-for");
        assert_eq!(client_ip(proxy, &headers, &[proxy]), proxy);
        // Regression: behind a dual-stack (`::`) listener the proxy connects as
        // `::ffff:10.0.0.2`, which must still count as the configured `10.0.0.2`.
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        headers.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        assert_eq!(
            client_ip(mapped, &headers, &[proxy]),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn buckets_allow_the_burst_then_refuse_with_a_wait() {
        let limits = RateLimits::new(60, 3).unwrap();
        for _ in 0..3 {
            assert!(limits.check("1.2.3.4", None).is_ok());
        }
        let wait = limits.check("1.2.3.4", None).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(
            limits.check("5.6.7.8", None).is_ok(),
            "another IP has its own bucket"
        );
        assert!(RateLimits::new(0, 1).is_err());
        assert!(RateLimits::new(1, 0).is_err());
    }

    #[test]
    fn one_credential_is_limited_across_ips() {
        let limits = RateLimits::new(60, 2).unwrap();
        assert!(limits.check("1.1.1.1", Some("tok")).is_ok());
        assert!(limits.check("2.2.2.2", Some("tok")).is_ok());
        assert!(limits.check("3.3.3.3", Some("tok")).is_err());
    }

    #[test]
    fn csrf_and_origin_checks() {
        assert!(check_csrf("abc", Some("abc")).is_ok());
        assert!(check_csrf("abc", Some("abd")).is_err());
        assert!(check_csrf("abc", None).is_err());
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(check_same_origin(&headers).is_ok());
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(check_same_origin(&headers).is_ok());
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(check_same_origin(&headers).is_err());
        headers.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(
            check_same_origin(&headers).is_ok(),
            "same-origin form posts under no-referrer"
        );
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(check_same_origin(&headers).is_ok());
        for refused in ["cross-site", "same-site"] {
            headers.insert("sec-fetch-site", HeaderValue::from_static(refused));
            assert!(check_same_origin(&headers).is_err(), "{refused}");
        }
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer mm_abc"),
        );
        assert_eq!(bearer_token(&headers), Some("mm_abc"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9v"),
        );
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), None);
    }
}
