//! The Brave Search API: `GET <base>/web/search?q=…&count=…` with the key in
//! `X-Subscription-Token`; results in `web.results[].{title, url, description}`.
//!
//! What the service answers besides results (from its API reference): a wrong or unknown key
//! is a 422 (`SUBSCRIPTION_TOKEN_INVALID`) or 401/403, a missing subscription a 404
//! (`SUBSCRIPTION_NOT_FOUND`), errors are `{"type": "ErrorResponse", "error": {"code": …}}`
//! (older answers: `errors: [...]`), and limits are 429 (`RATE_LIMITED` per second,
//! `QUOTA_LIMITED` per month) with `X-RateLimit-Limit/Policy/Remaining/Reset`, each a comma
//! list with one entry per window (`Reset: 1, 1419704` = seconds until the per-second and the
//! monthly window reset). A query has at most 400 characters and 50 words; `count` is at most
//! 20. A response without a `web` section simply has no web results.

use super::http::{self, Answer, Http, Limit};
use super::{parse_hits, SearchApiKey, SearchBackend, SearchError, SearchHit, SearchQuery};
use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT};
use serde_json::Value;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use url::Url;

/// Brave's `count` maximum.
const MAX_COUNT: usize = 20;

#[derive(Debug)]
pub(crate) struct Brave {
    http: Http,
    endpoint: Url,
    headers: HeaderMap,
}

impl Brave {
    /// `base_url` is the API root (`https://api.search.brave.com/res/v1`).
    pub fn new(
        base_url: &Url,
        key: &SearchApiKey,
        timeout: Duration,
    ) -> Result<Brave, super::WebSearchError> {
        let endpoint = super::endpoint(base_url, "web/search")?;
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let mut token = HeaderValue::from_str(key.expose())
            .map_err(|_| super::WebSearchError::InvalidApiKey)?;
        // Keeps the value out of hyper's and reqwest's Debug output.
        token.set_sensitive(true);
        headers.insert(HeaderName::from_static("x-subscription-token"), token);
        let http = Http::new(timeout).map_err(super::WebSearchError::Client)?;
        Ok(Brave {
            http,
            endpoint,
            headers,
        })
    }
}

#[async_trait]
impl SearchBackend for Brave {
    fn name(&self) -> &'static str {
        "Brave Search"
    }

    async fn search(
        &self,
        query: &SearchQuery,
        count: usize,
        deadline: Instant,
    ) -> Result<Vec<SearchHit>, SearchError> {
        let count = count.clamp(1, MAX_COUNT);
        let mut url = self.endpoint.clone();
        url.query_pairs_mut()
            .append_pair("q", query.as_str())
            .append_pair("count", &count.to_string())
            .append_pair("text_decorations", "false");
        let answer = self.http.get(&url, &self.headers, deadline, limit).await?;
        if !answer.is_success() {
            return Err(status_error(&answer));
        }
        parse_hits(answer.body, count, results, "description").await
    }
}

/// `web.results` of a success body; none when there is no `web` section.
fn results(value: &Value) -> Result<&[Value], SearchError> {
    let Value::Object(top) = value else {
        return Err(SearchError::BadShape("the answer is not a JSON object"));
    };
    if top.get("type").and_then(Value::as_str) == Some("ErrorResponse") {
        return Err(SearchError::BadShape("the answer is an error"));
    }
    match top.get("web").and_then(|web| web.get("results")) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(SearchError::BadShape("web.results is not a list")),
    }
}

fn status_error(answer: &Answer) -> SearchError {
    let code = http::error_code(&answer.body);
    let code = code.as_deref();
    match answer.status {
        401 | 403 => SearchError::Unauthorized {
            status: answer.status,
        },
        422 if matches!(
            code,
            Some("SUBSCRIPTION_TOKEN_INVALID" | "SUBSCRIPTION_TOKEN_MISSING")
        ) =>
        {
            SearchError::Unauthorized {
                status: answer.status,
            }
        }
        404 if code == Some("SUBSCRIPTION_NOT_FOUND") => SearchError::Unauthorized {
            status: answer.status,
        },
        404 => SearchError::NotFound,
        status @ 400..=499 => SearchError::Refused(status),
        status => SearchError::Unavailable(status),
    }
}

/// A 429: a monthly quota (`QUOTA_LIMITED`) or a rate limit; the wait is `Retry-After`, else
/// the reset of the window that is used up.
fn limit(answer: &Answer, now: SystemTime) -> Limit {
    let wait = http::retry_after(&answer.headers, now).or_else(|| exhausted_reset(&answer.headers));
    match http::error_code(&answer.body).as_deref() {
        Some("QUOTA_LIMITED") => Limit::Quota(wait),
        _ => Limit::Rate(wait),
    }
}

/// Seconds until the longest used-up window resets (`Remaining` 0), else the shortest window's
/// reset.
fn exhausted_reset(headers: &HeaderMap) -> Option<Duration> {
    let reset = http::number_list(headers, "x-ratelimit-reset")?;
    let remaining = http::number_list(headers, "x-ratelimit-remaining").unwrap_or_default();
    let exhausted = reset
        .iter()
        .zip(remaining.iter())
        .filter(|(_, left)| **left == 0)
        .map(|(reset, _)| *reset)
        .max();
    exhausted
        .or_else(|| reset.iter().copied().min())
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, headers: &[(&'static str, &'static str)], body: &str) -> Answer {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_static(value));
        }
        Answer {
            status,
            headers: map,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn rate_limits_wait_for_the_window_that_is_used_up() {
        let now = SystemTime::now();
        let per_second = answer(
            429,
            &[
                ("x-ratelimit-remaining", "0, 1500"),
                ("x-ratelimit-reset", "1, 1419704"),
            ],
            r#"{"type":"ErrorResponse","error":{"code":"RATE_LIMITED","status":429}}"#,
        );
        assert_eq!(
            limit(&per_second, now),
            Limit::Rate(Some(Duration::from_secs(1)))
        );
        let monthly = answer(
            429,
            &[
                ("x-ratelimit-remaining", "1, 0"),
                ("x-ratelimit-reset", "1, 86400"),
            ],
            r#"{"type":"ErrorResponse","error":{"code":"QUOTA_LIMITED","status":429}}"#,
        );
        assert_eq!(
            limit(&monthly, now),
            Limit::Quota(Some(Duration::from_secs(86400)))
        );
        let retry_after = answer(429, &[("retry-after", "2"), ("x-ratelimit-reset", "9")], "");
        assert_eq!(
            limit(&retry_after, now),
            Limit::Rate(Some(Duration::from_secs(2)))
        );
        assert_eq!(limit(&answer(429, &[], "garbage"), now), Limit::Rate(None));
    }

    #[test]
    fn statuses_are_classified_by_code_first() {
        let token = r#"{"type":"ErrorResponse","error":{"code":"SUBSCRIPTION_TOKEN_INVALID","status":422}}"#;
        assert_eq!(
            status_error(&answer(422, &[], token)),
            SearchError::Unauthorized { status: 422 }
        );
        let validation = r#"{"type":"ErrorResponse","error":{"code":"VALIDATION","status":422}}"#;
        assert_eq!(
            status_error(&answer(422, &[], validation)),
            SearchError::Refused(422)
        );
        assert_eq!(
            status_error(&answer(401, &[], "")),
            SearchError::Unauthorized { status: 401 }
        );
        assert_eq!(
            status_error(&answer(404, &[], "<html>")),
            SearchError::NotFound
        );
        assert_eq!(
            status_error(&answer(502, &[], "<html>Bad gateway</html>")),
            SearchError::Unavailable(502)
        );
    }

    #[test]
    fn results_come_from_web_results_only() {
        let value: Value = serde_json::json!({"type": "search", "news": {"results": [{"url": "https://n.example"}]}});
        assert!(results(&value).unwrap().is_empty());
        let value: Value = serde_json::json!({"web": {"results": [{"url": "https://w.example"}]}});
        assert_eq!(results(&value).unwrap().len(), 1);
        assert!(results(&serde_json::json!([1, 2])).is_err());
        assert!(results(&serde_json::json!({"web": {"results": "many"}})).is_err());
    }
}
