//! The layers every request passes: rate limits, request counting, security headers, and the
//! checks browser state changes need (same origin, CSRF token).
//!
//! **Rate limits fit who is asking.** `governor`'s keyed GCRA limiters (token buckets in
//! effect), three of them:
//!
//! * **per principal** (`gateway.rateLimit.perMinute/burst`): a request whose credential (bearer
//!   token, `mm_session` or `mm_admin` cookie) was verified counts against its user's bucket
//!   only; a user's tokens and browser sessions share that one bucket (the cost of a user is
//!   per user, and more tokens must not mean more requests); the operator's admin session has
//!   its own. A family behind one home router, or everyone behind a reverse proxy without
//!   `trustedProxies`, therefore does not share a bucket. Only the credential the route
//!   authenticates with counts (see [`route_credentials`]).
//! * **per client IP** (`gateway.rateLimit.unauthenticatedPerMinute/Burst`; IPv6 by /64, since
//!   one host usually owns a whole /64, and per /48 as well with [`IPV6_SITE_FACTOR`] times
//!   the quota): everything without a verified credential — no
//!   credential, and every credential not verified in the last [`VERIFIED_TTL`], which is
//!   charged here *before* the database is asked, so an IP spraying bogus tokens runs dry
//!   after its burst and costs nothing more — plus every sign-in (`POST /login`,
//!   `/login/{code}`, `/admin/login`), whatever cookie it carries.
//!
//! * **per sign-in account**, next to the per-IP one: a sign-in that its address (or /48) has no
//!   quota left for may still be tried on the bucket of the credential it presents — the
//!   link's code, the pasted token, the operator token, by SHA-256 digest — with
//!   [`SIGN_IN_ACCOUNT_BURST`] tries per [`SIGN_IN_ACCOUNT_PERIOD`] each (taken first, so a
//!   repeated guess costs nothing more), then from its site's share (IPv4 /24, IPv6 /48:
//!   [`SIGN_IN_OVERFLOW_SITE_PER_MINUTE`] a minute), all such tries on the server together
//!   at most [`SIGN_IN_OVERFLOW_PER_MINUTE`] a minute (the bound on the database look-ups
//!   strangers cause). A neighbour behind the same CGNAT address or in the same /24 or /48
//!   who floods sign-ins empties the address's bucket, but not the bucket of a link or token
//!   they do not know: the other person's sign-in still gets its own tries, unless the
//!   neighbour keeps up more than [`SIGN_IN_OVERFLOW_SITE_PER_MINUTE`] distinct guesses a
//!   minute past their quota. A client elsewhere cannot take a site's share; only clients in
//!   more than `OVERFLOW / SITE` sites together can reach the server's ceiling. Refusals
//!   count as `bucket="sign_in"`.
//!
//! A verified credential is remembered (digest → principal, in memory, at most
//! [`MAX_VERIFIED`], for [`VERIFIED_TTL`]) only to choose its bucket: handlers still check
//! every request's credential against the database, so a revoked token is refused at once.
//! The keyed maps only grow with keys seen within about one refill window: every few thousand
//! checks (and whenever a map passes [`MAX_TRACKED_KEYS`]) keys whose bucket is full again are
//! dropped.
//!
//! The client IP is the TCP peer. `X-Forwarded-For` is believed only from the peers listed in
//! [`crate::WebSettings::trusted_proxies`]; otherwise anyone could pick their own bucket.
//!
//! **Metrics take no text from requests.** The request counter runs inside the rate limit (a
//! refused flood only moves the fixed `rate_limited` counter) and labels by the route template
//! from [`crate::ROUTES`] (else `unmatched`), a fixed set of methods (else `other`) and the
//! status the server chose. `prometheus-client` does not escape label values, so no value
//! that is not one of ours may ever reach it.

use crate::error::{InvalidSettings, WebError};
use crate::session;
use crate::state::{RateLimitedLabels, RequestLabels, WebState};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use moltmate_core::UserId;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// Above this many tracked keys, stale ones are dropped at once rather than periodically.
pub const MAX_TRACKED_KEYS: usize = 50_000;
const CLEANUP_EVERY: u64 = 4096;
/// How long a verified credential keeps its principal's bucket without a new check.
pub const VERIFIED_TTL: Duration = Duration::from_secs(300);
/// Verified credentials remembered at most; past it, new ones are checked (and charged to
/// their IP) on every request until old ones expire.
pub const MAX_VERIFIED: usize = 10_000;

type KeyedLimiter = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// Who a verified credential belongs to: whose bucket its requests use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    User(UserId),
    Operator,
}

impl Principal {
    fn bucket(&self) -> String {
        match self {
            Principal::User(user) => format!("user:{user}"),
            Principal::Operator => "operator".to_string(),
        }
    }
}

/// A credential as presented: which kind, and the secret.
#[derive(Debug)]
enum Credential {
    Bearer(String),
    UserCookie(String),
    AdminCookie(String),
}

/// Which kind of credential a request may present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CredentialKind {
    Bearer,
    UserCookie,
    AdminCookie,
}

/// The credentials `route` authenticates with, in the order its handler looks at them. Only
/// these pick a request's bucket: a credential the route does not use (a bogus bearer next to
/// a valid `mm_session` cookie on a browser route) is ignored, as its handler ignores it, so
/// adding one can neither move a signed-in user out of their bucket nor buy a fresh one.
/// Routes that authenticate nobody (assets, health, metrics, unknown paths) go by the
/// browser's cookies, so a signed-in page load stays in its user's bucket.
fn route_credentials(route: Option<&str>) -> &'static [CredentialKind] {
    use CredentialKind::*;
    match route {
        Some("/v1/models" | "/v1/chat/completions") => &[Bearer],
        Some("/" | "/login" | "/login/{code}" | "/logout" | "/api/history" | "/api/chat") => {
            &[UserCookie]
        }
        Some("/admin" | "/admin/login" | "/admin/logout" | "/admin/pairing") => &[AdminCookie],
        Some("/files/{id}") => &[UserCookie, Bearer],
        _ => &[UserCookie, AdminCookie],
    }
}

impl Credential {
    /// The credential `route` authenticates with, if the request carries it (see
    /// [`route_credentials`]).
    fn for_route(headers: &HeaderMap, route: Option<&str>) -> Option<Credential> {
        route_credentials(route).iter().find_map(|kind| match kind {
            CredentialKind::Bearer => {
                bearer_token(headers).map(|token| Credential::Bearer(token.to_string()))
            }
            CredentialKind::UserCookie => session::cookie(headers, session::USER_COOKIE)
                .map(|secret| Credential::UserCookie(secret.to_string())),
            CredentialKind::AdminCookie => session::cookie(headers, session::ADMIN_COOKIE)
                .map(|secret| Credential::AdminCookie(secret.to_string())),
        })
    }

    /// What the credential is remembered by: a digest of kind and secret, never the secret.
    fn digest(&self) -> [u8; 16] {
        let (kind, secret) = match self {
            Credential::Bearer(s) => ("bearer", s),
            Credential::UserCookie(s) => ("user", s),
            Credential::AdminCookie(s) => ("admin", s),
        };
        let mut hasher = Sha256::new();
        hasher.update(kind.as_bytes());
        hasher.update([0]);
        hasher.update(secret.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&hasher.finalize()[..16]);
        out
    }

    /// Checks the credential against the store. A store failure counts as unverified (the
    /// handler meets the same failure and reports it).
    async fn verify(&self, state: &WebState) -> Option<Principal> {
        let store = state.gateway().store();
        let verified = match self {
            Credential::Bearer(token) => store
                .user_for_token(token)
                .await
                .map(|user| user.map(Principal::User)),
            Credential::UserCookie(secret) => store.web_session(secret).await.map(|s| match s {
                Some(s) if !s.is_admin => s.user.map(Principal::User),
                _ => None,
            }),
            Credential::AdminCookie(secret) => store.web_session(secret).await.map(|s| {
                s.filter(|s| s.is_admin && s.user.is_none())
                    .map(|_| Principal::Operator)
            }),
        };
        verified.ok().flatten()
    }
}

/// The rate limiters and the memory of verified credentials.
pub struct RateLimits {
    by_principal: KeyedLimiter,
    by_ip: KeyedLimiter,
    /// IPv6 clients per /48 as well, with [`IPV6_SITE_FACTOR`] times the per-IP quota: one
    /// site (a /48, what many providers hand a customer) must not get 65,536 fresh /64
    /// buckets.
    by_ip_site: KeyedLimiter,
    /// Sign-ins past their address's quota, per presented credential (digest).
    by_sign_in_account: KeyedLimiter,
    /// Those of one client site (IPv4 /24, IPv6 /48), so one source cannot use up the
    /// server's overflow for everyone.
    sign_in_overflow_site: KeyedLimiter,
    /// All of those together (one key): the ceiling.
    sign_in_overflow: KeyedLimiter,
    verified: Mutex<HashMap<[u8; 16], (Principal, Instant)>>,
    checks: AtomicU64,
}

/// How many per-IP quotas one IPv6 /48 gets together.
pub const IPV6_SITE_FACTOR: u32 = 16;
/// Sign-in tries one credential (a link, a token) gets once its address has no quota left…
pub const SIGN_IN_ACCOUNT_BURST: u32 = 5;
/// …and they come back at this pace (one every three minutes: five per quarter hour).
pub const SIGN_IN_ACCOUNT_PERIOD: Duration = Duration::from_secs(15 * 60);
/// Sign-ins past their address's quota on the whole server, per minute (and burst).
pub const SIGN_IN_OVERFLOW_PER_MINUTE: u32 = 120;
/// The share of that one client site (IPv4 /24, IPv6 /48) may take, per minute (and burst).
pub const SIGN_IN_OVERFLOW_SITE_PER_MINUTE: u32 = 30;

fn quota(per_minute: u32, burst: u32) -> Result<Quota, InvalidSettings> {
    let per_minute = NonZeroU32::new(per_minute).ok_or(InvalidSettings::ZeroRate)?;
    let burst = NonZeroU32::new(burst).ok_or(InvalidSettings::ZeroBurst)?;
    Ok(Quota::per_minute(per_minute).allow_burst(burst))
}

impl RateLimits {
    /// `per_minute`/`burst` per principal (a signed-in user, the operator);
    /// `ip_per_minute`/`ip_burst` per client IP for requests without a verified credential.
    pub fn new(
        per_minute: u32,
        burst: u32,
        ip_per_minute: u32,
        ip_burst: u32,
    ) -> Result<Self, InvalidSettings> {
        Ok(RateLimits {
            by_principal: RateLimiter::keyed(quota(per_minute, burst)?),
            by_ip: RateLimiter::keyed(quota(ip_per_minute, ip_burst)?),
            by_ip_site: RateLimiter::keyed(quota(
                ip_per_minute.saturating_mul(IPV6_SITE_FACTOR),
                ip_burst.saturating_mul(IPV6_SITE_FACTOR),
            )?),
            by_sign_in_account: RateLimiter::keyed(
                Quota::with_period(SIGN_IN_ACCOUNT_PERIOD / SIGN_IN_ACCOUNT_BURST)
                    .ok_or(InvalidSettings::ZeroRate)?
                    .allow_burst(
                        NonZeroU32::new(SIGN_IN_ACCOUNT_BURST).ok_or(InvalidSettings::ZeroBurst)?,
                    ),
            ),
            sign_in_overflow_site: RateLimiter::keyed(quota(
                SIGN_IN_OVERFLOW_SITE_PER_MINUTE,
                SIGN_IN_OVERFLOW_SITE_PER_MINUTE,
            )?),
            sign_in_overflow: RateLimiter::keyed(quota(
                SIGN_IN_OVERFLOW_PER_MINUTE,
                SIGN_IN_OVERFLOW_PER_MINUTE,
            )?),
            verified: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
        })
    }

    /// A sign-in from `client`, whose address has no quota left, presenting the credential
    /// with `digest`: `Err(wait)` when that credential's tries, its site's share of the
    /// overflow, or the server's overflow are used up. The credential's own bucket is taken
    /// first, so a repeated guess costs no overflow; a site's share
    /// ([`SIGN_IN_OVERFLOW_SITE_PER_MINUTE`]) keeps one source from using up the ceiling.
    pub fn check_sign_in_account(
        &self,
        digest: &[u8; 16],
        client: &ClientKey,
    ) -> Result<(), Duration> {
        self.take(&self.by_sign_in_account, hex::encode(digest))?;
        self.take(&self.sign_in_overflow_site, client.sign_in_site())?;
        self.take(&self.sign_in_overflow, "all".to_string())
    }

    fn maintain(&self) {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks.is_multiple_of(CLEANUP_EVERY)
            || self.by_ip.len() > MAX_TRACKED_KEYS
            || self.by_principal.len() > MAX_TRACKED_KEYS
            || self.by_ip_site.len() > MAX_TRACKED_KEYS
            || self.by_sign_in_account.len() > MAX_TRACKED_KEYS
            || self.sign_in_overflow_site.len() > MAX_TRACKED_KEYS
        {
            for limiter in [
                &self.by_ip,
                &self.by_principal,
                &self.by_ip_site,
                &self.by_sign_in_account,
                &self.sign_in_overflow_site,
                &self.sign_in_overflow,
            ] {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
    }

    fn take(&self, limiter: &KeyedLimiter, key: String) -> Result<(), Duration> {
        self.maintain();
        limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// One request without a verified credential from `client`. `Err(wait)` when its
    /// bucket (or, for IPv6, its /48's) is empty.
    pub fn check_ip(&self, client: &ClientKey) -> Result<(), Duration> {
        if let Some(site) = &client.site {
            self.take(&self.by_ip_site, site.clone())?;
        }
        self.take(&self.by_ip, client.ip.clone())
    }

    /// One request of `principal`. `Err(wait)` when its bucket is empty.
    pub fn check_principal(&self, principal: &Principal) -> Result<(), Duration> {
        self.take(&self.by_principal, principal.bucket())
    }

    fn verified_map(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], (Principal, Instant)>> {
        // The map holds plain values; a panic elsewhere cannot leave it half-updated.
        self.verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn recall(&self, digest: &[u8; 16]) -> Option<Principal> {
        let mut map = self.verified_map();
        match map.get(digest) {
            Some((principal, at)) if at.elapsed() < VERIFIED_TTL => Some(principal.clone()),
            Some(_) => {
                map.remove(digest);
                None
            }
            None => None,
        }
    }

    fn remember(&self, digest: [u8; 16], principal: Principal) {
        let mut map = self.verified_map();
        if map.len() >= MAX_VERIFIED {
            map.retain(|_, (_, at)| at.elapsed() < VERIFIED_TTL);
        }
        if map.len() < MAX_VERIFIED {
            map.insert(digest, (principal, Instant::now()));
        }
    }
}

/// Lets one log line through per interval and counts the events in between, for events a
/// stranger can cause at will (a wrong operator token): the log stays bounded whatever the
/// rate limit lets through from many addresses.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    /// When the last line went out, and events since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    pub fn new(interval: Duration) -> Self {
        LogThrottle {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one event; `Some(events)` (this one included, since the last line) when a line
    /// is due now.
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.1 += 1;
        let due = state
            .0
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if !due {
            return None;
        }
        let events = state.1;
        *state = (Some(now), 0);
        Some(events)
    }
}

/// The rate-limit keys of a client address: its own bucket, and for IPv6 its /48's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey {
    pub ip: String,
    pub site: Option<String>,
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        let site = match ip.to_canonical() {
            IpAddr::V4(_) => None,
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Some(format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2]))
            }
        };
        ClientKey {
            ip: ip_key(ip),
            site,
        }
    }

    /// The site a sign-in overflow share belongs to: the IPv6 /48, else the IPv4 /24.
    fn sign_in_site(&self) -> String {
        if let Some(site) = &self.site {
            return site.clone();
        }
        match self.ip.parse::<std::net::Ipv4Addr>() {
            Ok(v4) => {
                let o = v4.octets();
                format!("{}.{}.{}.0/24", o[0], o[1], o[2])
            }
            Err(_) => self.ip.clone(),
        }
    }
}

/// The client a rate limit or connection cap counts: an IPv4 address alone (also written as
/// `::ffff:a.b.c.d`), an IPv6 address by its /64 (one host usually has a whole /64).
pub fn ip_bucket(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::V6(segments.into())
        }
        v4 => v4,
    }
}

/// The rate-limit key of a client address (its [`ip_bucket`]).
pub fn ip_key(ip: IpAddr) -> String {
    match ip_bucket(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
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

/// `POST` to a sign-in route: always limited per IP, whatever credential comes along.
fn is_sign_in(method: &Method, route: Option<&str>) -> bool {
    *method == Method::POST && matches!(route, Some("/login" | "/login/{code}" | "/admin/login"))
}

pub async fn rate_limit(State(state): State<WebState>, request: Request, next: Next) -> Response {
    let limits = &state.inner.limits;
    let trusted = &state.inner.settings.trusted_proxies;
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| ClientKey::of(client_ip(addr.ip(), request.headers(), trusted)))
        .unwrap_or_else(|| ClientKey {
            ip: "unknown".to_string(),
            site: None,
        });
    let refused = |bucket: &'static str, retry_after: Duration| {
        state
            .inner
            .metrics
            .rate_limited
            .get_or_create(&RateLimitedLabels { bucket })
            .inc();
        WebError::RateLimited { retry_after }.into_response()
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let route = route.as_deref();
    let mut ip_charged = false;
    let mut request = request;
    if is_sign_in(request.method(), route) {
        if let Err(ip_wait) = limits.check_ip(&ip) {
            // The address is out of sign-ins: the credential presented may still have its own.
            let (with_body, account) = sign_in_account(request, route).await;
            request = with_body;
            let allowed = match account {
                Some(digest) => limits.check_sign_in_account(&digest, &ip),
                None => Err(ip_wait),
            };
            if let Err(wait) = allowed {
                return refused("sign_in", wait.max(ip_wait));
            }
        }
        ip_charged = true;
    }
    let principal = match Credential::for_route(request.headers(), route) {
        None => None,
        Some(credential) => {
            let digest = credential.digest();
            match limits.recall(&digest) {
                Some(principal) => Some(principal),
                None => {
                    // Unverified: the IP pays for the look-up, before it happens.
                    if !ip_charged {
                        if let Err(wait) = limits.check_ip(&ip) {
                            return refused("ip", wait);
                        }
                        ip_charged = true;
                    }
                    let principal = credential.verify(&state).await;
                    if let Some(principal) = &principal {
                        limits.remember(digest, principal.clone());
                    }
                    principal
                }
            }
        }
    };
    match principal {
        Some(principal) => {
            if let Err(wait) = limits.check_principal(&principal) {
                return refused("principal", wait);
            }
        }
        None if !ip_charged => {
            if let Err(wait) = limits.check_ip(&ip) {
                return refused("ip", wait);
            }
        }
        None => {}
    }
    next.run(request).await
}

/// Largest sign-in form read to find the credential it presents.
const SIGN_IN_FORM_MAX: usize = 4096;
/// How long a sign-in past its address's quota may take to send that form.
pub const SIGN_IN_FORM_DEADLINE: Duration = Duration::from_secs(5);

/// The digest of the credential a sign-in presents: the link's code from the path, or the
/// form's `token` (the body is read, at most [`SIGN_IN_FORM_MAX`] bytes, and put back).
/// `None` when there is none to find (a larger body is refused with it).
async fn sign_in_account(request: Request, route: Option<&str>) -> (Request, Option<[u8; 16]>) {
    let digest = |secret: &str| -> Option<[u8; 16]> {
        let secret = secret.trim();
        if secret.is_empty() {
            return None;
        }
        let full = Sha256::digest(secret.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        Some(out)
    };
    if route == Some("/login/{code}") {
        let code = request
            .uri()
            .path()
            .strip_prefix("/login/")
            .map(str::to_string);
        let account = code.as_deref().and_then(digest);
        return (request, account);
    }
    // Only a form is read, and only for [`SIGN_IN_FORM_DEADLINE`]: a client past its quota
    // must not hold a request open by trickling (or never sending) a body.
    let is_form = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    let (parts, body) = request.into_parts();
    if !is_form {
        return (Request::from_parts(parts, axum::body::Body::empty()), None);
    }
    let bytes = match tokio::time::timeout(
        SIGN_IN_FORM_DEADLINE,
        axum::body::to_bytes(body, SIGN_IN_FORM_MAX),
    )
    .await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) | Err(_) => {
            return (Request::from_parts(parts, axum::body::Body::empty()), None)
        }
    };
    let account = form_urlencoded::parse(&bytes)
        .find(|(key, _)| key == "token")
        .and_then(|(_, token)| digest(&token));
    (
        Request::from_parts(parts, axum::body::Body::from(bytes)),
        account,
    )
}

/// The `method` label: the standard methods, else `other`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// The `route` label: one of [`crate::ROUTES`], else `unmatched`.
pub fn route_label(matched: Option<&MatchedPath>) -> &'static str {
    matched
        .and_then(|m| crate::ROUTES.iter().find(|r| **r == m.as_str()))
        .copied()
        .unwrap_or("unmatched")
}

pub async fn count_requests(
    State(state): State<WebState>,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let labels = RequestLabels {
        route,
        method,
        status: response.status().as_u16(),
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
        // `same-origin`, not `no-referrer`: other sites learn nothing, and our own form posts
        // carry their real `Origin` instead of `null` (see `check_sign_in_origin`).
        (header::REFERRER_POLICY, "same-origin"),
        (HeaderName::from_static("cross-origin-opener-policy"), "same-origin"),
    ];
    for (name, value) in fixed {
        // A handler's own, stricter policy stays (downloads: `sandbox; default-src 'none'`).
        if name == header::CONTENT_SECURITY_POLICY && headers.contains_key(&name) {
            continue;
        }
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

/// Refuses cross-site browser requests to routes that need a signed-in session (which the
/// CSRF token and SameSite=Strict protect as well).
///
/// `Sec-Fetch-Site` decides when the browser sends it (every current browser does): only
/// `same-origin` and `none` (typed or bookmarked) pass, so a missing `Origin` does not help a
/// cross-site request. Otherwise a present `Origin` must name the `Host`; `Origin: null`
/// passes here (a privacy setting or an old browser may send it for a same-origin form),
/// requests without either header (curl) pass too.
pub fn check_same_origin(headers: &HeaderMap) -> Result<(), WebError> {
    origin_check(headers, true)
}

/// Like [`check_same_origin`], for the sign-in routes (`POST /login`, `/login/{code}`,
/// `/admin/login`), which have no session and so no CSRF token yet: `Origin: null` is
/// refused. A sandboxed iframe, a `data:` page or a redirect chain sends `null`, and a login
/// CSRF (signing the victim into the attacker's account, so that what they type goes to the
/// attacker's assistant) needs nothing more. Our pages use `Referrer-Policy: same-origin`, so
/// a browser posting our own sign-in form sends the real origin.
pub fn check_sign_in_origin(headers: &HeaderMap) -> Result<(), WebError> {
    origin_check(headers, false)
}

fn origin_check(headers: &HeaderMap, allow_null_origin: bool) -> Result<(), WebError> {
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
    if origin.trim().eq_ignore_ascii_case("null") {
        return if allow_null_origin {
            Ok(())
        } else {
            Err(WebError::Forbidden(
                "sign-in refused: the request does not say which site it came from (Origin: null); sign in from this site's own page",
            ))
        };
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

    fn v4(ip: &str) -> ClientKey {
        ClientKey::of(ip.parse().unwrap())
    }

    #[test]
    fn ipv6_clients_of_one_48_share_a_larger_bucket_too() {
        // Per /64: a burst of 2; per /48: 16 times that.
        let limits = RateLimits::new(60, 2, 1, 2).unwrap();
        let mut served = 0;
        for subnet in 0..200u16 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 7, subnet, 0, 0, 0, 1,
            ));
            for _ in 0..2 {
                if limits.check_ip(&ClientKey::of(ip)).is_ok() {
                    served += 1;
                }
            }
        }
        assert_eq!(
            served,
            2 * IPV6_SITE_FACTOR,
            "200 /64s of one /48 share the /48's bucket"
        );
        let other_site = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 8, 0, 0, 0, 0, 1));
        assert!(limits.check_ip(&ClientKey::of(other_site)).is_ok());
        assert_eq!(v4("10.0.0.1").site, None, "IPv4 has no site bucket");
        assert_eq!(
            ClientKey::of("::ffff:10.0.0.1".parse().unwrap()),
            v4("10.0.0.1")
        );
    }

    #[test]
    fn only_the_credential_a_route_authenticates_with_picks_its_bucket() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer bogus"),
        );
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("mm_session=user; mm_admin=admin"),
        );
        let kind_in = |headers: &HeaderMap, route: Option<&str>| match Credential::for_route(
            headers, route,
        ) {
            Some(Credential::Bearer(s)) => format!("bearer {s}"),
            Some(Credential::UserCookie(s)) => format!("user {s}"),
            Some(Credential::AdminCookie(s)) => format!("admin {s}"),
            None => "none".to_string(),
        };
        let kind = |route: Option<&str>| kind_in(&headers, route);
        for route in ["/", "/logout", "/api/history", "/api/chat", "/login"] {
            assert_eq!(kind(Some(route)), "user user", "{route}");
        }
        for route in ["/v1/models", "/v1/chat/completions"] {
            assert_eq!(kind(Some(route)), "bearer bogus", "{route}");
        }
        for route in ["/admin", "/admin/pairing", "/admin/logout"] {
            assert_eq!(kind(Some(route)), "admin admin", "{route}");
        }
        for route in [Some("/assets/{name}"), Some("/healthz"), None] {
            assert_eq!(kind(route), "user user", "{route:?}");
        }
        // Every route of the app is classified on purpose.
        for route in crate::ROUTES {
            assert!(!route_credentials(Some(route)).is_empty(), "{route}");
        }
        let mut headers = headers.clone();
        headers.remove(header::COOKIE);
        assert_eq!(
            kind_in(&headers, Some("/api/chat")),
            "none",
            "a bearer never stands in for the cookie"
        );
        assert_eq!(kind_in(&headers, Some("/assets/{name}")), "none");
    }

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
        let limits = RateLimits::new(1000, 1000, 60, 3).unwrap();
        for _ in 0..3 {
            assert!(limits.check_ip(&v4("1.2.3.4")).is_ok());
        }
        let wait = limits.check_ip(&v4("1.2.3.4")).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(
            limits.check_ip(&v4("5.6.7.8")).is_ok(),
            "another IP has its own bucket"
        );
        assert!(RateLimits::new(0, 1, 1, 1).is_err());
        assert!(RateLimits::new(1, 0, 1, 1).is_err());
        assert!(RateLimits::new(1, 1, 0, 1).is_err());
        assert!(RateLimits::new(1, 1, 1, 0).is_err());
    }

    #[test]
    fn principals_have_their_own_buckets_apart_from_ips() {
        let limits = RateLimits::new(60, 2, 60, 1).unwrap();
        let anna = Principal::User(UserId::new("anna").unwrap());
        let bob = Principal::User(UserId::new("bob").unwrap());
        assert!(limits.check_principal(&anna).is_ok());
        assert!(limits.check_principal(&anna).is_ok());
        assert!(limits.check_principal(&anna).is_err());
        assert!(limits.check_principal(&bob).is_ok());
        assert!(limits.check_principal(&Principal::Operator).is_ok());
        assert!(
            limits.check_ip(&v4("1.1.1.1")).is_ok(),
            "users do not drain IPs"
        );
    }

    #[test]
    fn verified_credentials_are_remembered_for_a_while_and_bounded() {
        let limits = RateLimits::new(60, 2, 60, 1).unwrap();
        let anna = Principal::User(UserId::new("anna").unwrap());
        let token = Credential::Bearer("mm_abc".to_string());
        assert_eq!(limits.recall(&token.digest()), None);
        limits.remember(token.digest(), anna.clone());
        assert_eq!(limits.recall(&token.digest()), Some(anna.clone()));
        assert_ne!(
            token.digest(),
            Credential::UserCookie("mm_abc".to_string()).digest(),
            "kinds do not collide"
        );
        // Expired entries are forgotten.
        limits.verified_map().insert(
            [7; 16],
            (
                anna.clone(),
                Instant::now() - VERIFIED_TTL - Duration::from_secs(1),
            ),
        );
        assert_eq!(limits.recall(&[7; 16]), None);
        // The map never grows past its bound.
        for i in 0..(MAX_VERIFIED as u32 + 10) {
            let mut digest = [0u8; 16];
            digest[..4].copy_from_slice(&i.to_be_bytes());
            digest[15] = 1;
            limits.remember(digest, anna.clone());
        }
        assert_eq!(limits.verified_map().len(), MAX_VERIFIED);
    }

    #[test]
    fn log_throttle_lets_one_line_through_per_interval() {
        let throttle = LogThrottle::new(Duration::from_secs(60));
        let start = Instant::now();
        assert_eq!(throttle.hit_at(start), Some(1));
        for _ in 0..99 {
            assert_eq!(throttle.hit_at(start + Duration::from_secs(1)), None);
        }
        assert_eq!(throttle.hit_at(start + Duration::from_secs(60)), Some(100));
    }

    #[test]
    fn labels_are_fixed_sets() {
        for (method, label) in [
            (Method::GET, "GET"),
            (Method::POST, "POST"),
            (Method::from_bytes(b"FOO").unwrap(), "other"),
            (Method::from_bytes(&[b'X'; 300]).unwrap(), "other"),
        ] {
            assert_eq!(method_label(&method), label);
        }
        assert_eq!(route_label(None), "unmatched");
        assert!(is_sign_in(&Method::POST, Some("/login/{code}")));
        assert!(is_sign_in(&Method::POST, Some("/admin/login")));
        assert!(!is_sign_in(&Method::GET, Some("/login/{code}")));
        assert!(!is_sign_in(&Method::POST, Some("/api/chat")));
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
            "a signed-in change still needs its CSRF token"
        );
        assert!(
            check_sign_in_origin(&headers).is_err(),
            "login CSRF from a sandboxed frame or data: page"
        );
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(check_sign_in_origin(&headers).is_ok());
        headers.remove(header::ORIGIN);
        assert!(check_sign_in_origin(&headers).is_ok(), "curl");
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(
            check_sign_in_origin(&headers).is_err(),
            "a missing Origin does not help a cross-site request"
        );
        headers.insert(header::ORIGIN, HeaderValue::from_static("null"));
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
