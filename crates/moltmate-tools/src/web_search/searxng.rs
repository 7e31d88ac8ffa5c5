//! A SearXNG instance's search API: `GET <base>/search?q=…&format=json`; results in
//! `results[].{title, url, content}`.
//!
//! What an instance answers besides results (from SearXNG's documentation): a format that is
//! not listed under `search.formats` in its `settings.yml` (the default lists only `html`) is
//! refused with 403 Forbidden, which is what an instance without JSON enabled says to us; its
//! limiter (bot detection, when `server.limiter` is on) refuses with 429. There is no key and
//! no result count: an instance returns a page of results (about 20) and we keep the first.

use super::http::{self, Answer, Http, Limit};
use super::{parse_hits, SearchBackend, SearchError, SearchHit, SearchQuery};
use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT};
use serde_json::Value;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use url::Url;

#[derive(Debug)]
pub(crate) struct Searxng {
    http: Http,
    endpoint: Url,
    headers: HeaderMap,
}

impl Searxng {
    /// `base_url` is the instance's root (`http://127.0.0.1:8080`, or `https://host/searx`).
    pub fn new(base_url: &Url, timeout: Duration) -> Result<Searxng, super::WebSearchError> {
        let endpoint = super::endpoint(base_url, "search")?;
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let http = Http::new(timeout).map_err(super::WebSearchError::Client)?;
        Ok(Searxng {
            http,
            endpoint,
            headers,
        })
    }
}

#[async_trait]
impl SearchBackend for Searxng {
    fn name(&self) -> &'static str {
        "SearXNG"
    }

    async fn search(
        &self,
        query: &SearchQuery,
        count: usize,
        deadline: Instant,
    ) -> Result<Vec<SearchHit>, SearchError> {
        let mut url = self.endpoint.clone();
        url.query_pairs_mut()
            .append_pair("q", query.as_str())
            .append_pair("format", "json");
        let answer = self.http.get(&url, &self.headers, deadline, limit).await?;
        if !answer.is_success() {
            return Err(status_error(&answer));
        }
        parse_hits(answer.body, count, results, "content").await
    }
}

fn results(value: &Value) -> Result<&[Value], SearchError> {
    match value {
        Value::Object(top) => match top.get("results") {
            Some(Value::Array(items)) => Ok(items),
            Some(_) => Err(SearchError::BadShape("results is not a list")),
            None => Err(SearchError::BadShape("it has no results list")),
        },
        _ => Err(SearchError::BadShape("the answer is not a JSON object")),
    }
}

fn status_error(answer: &Answer) -> SearchError {
    match answer.status {
        403 => SearchError::JsonDisabled,
        404 => SearchError::NotFound,
        401 => SearchError::Unauthorized {
            status: answer.status,
        },
        status @ 400..=499 => SearchError::Refused(status),
        status => SearchError::Unavailable(status),
    }
}

/// The limiter's 429 says nothing but, sometimes, `Retry-After`.
fn limit(answer: &Answer, now: SystemTime) -> Limit {
    Limit::Rate(http::retry_after(&answer.headers, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_means_json_is_not_enabled() {
        let answer = Answer {
            status: 403,
            headers: HeaderMap::new(),
            body: b"<!doctype html><title>403 Forbidden</title>".to_vec(),
        };
        assert_eq!(status_error(&answer), SearchError::JsonDisabled);
    }

    #[test]
    fn results_must_be_a_list() {
        assert!(results(&serde_json::json!({"results": []}))
            .unwrap()
            .is_empty());
        assert!(results(&serde_json::json!({"query": "x"})).is_err());
        assert!(results(&serde_json::json!({"results": {"a": 1}})).is_err());
        assert!(results(&serde_json::json!("results")).is_err());
    }
}
