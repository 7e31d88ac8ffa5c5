//! Shared harness of the web layer's tests: a real gateway (in-memory store, homes on a
//! tempdir, default settings, no channels, no sandbox) answered by [`EchoModel`].
#![allow(dead_code)] // Each test binary uses a different subset of the helpers.

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use moltmate_core::model::{
    ConversationItem, DeltaSink, ModelResponse, StopReason, TokenUsage, ToolSpec,
};
use moltmate_core::{Shutdown, UserId};
use moltmate_gateway::agent::{ModelAnswer, ModelCaller, ModelFailure, ToolBox};
use moltmate_gateway::{Gateway, GatewayParts, GatewaySettings};
use moltmate_store::{Homes, Store};
use moltmate_web::{WebSettings, WebState};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

pub const ADMIN_TOKEN: &str = "operator-secret-token-for-tests";

/// One model call as the test model saw it.
#[derive(Debug, Clone)]
pub struct SeenCall {
    pub system: String,
    pub items: Vec<ConversationItem>,
}

impl SeenCall {
    pub fn last_user_text(&self) -> Option<&str> {
        self.items.iter().rev().find_map(|item| match item {
            ConversationItem::User { text } => Some(text.as_str()),
            _ => None,
        })
    }

    pub fn all_text(&self) -> String {
        let mut out = self.system.clone();
        for item in &self.items {
            out.push('\n');
            out.push_str(&serde_json::to_string(item).unwrap());
        }
        out
    }
}

/// Answers `echo: <last user text>`, streamed in three deltas, and records every call.
#[derive(Default)]
pub struct EchoModel {
    pub calls: Mutex<Vec<SeenCall>>,
}

impl EchoModel {
    pub fn calls(&self) -> Vec<SeenCall> {
        self.calls.lock().unwrap().clone()
    }
}

pub fn echo_of(text: &str) -> String {
    format!("echo: {text}")
}

#[async_trait]
impl ModelCaller for EchoModel {
    async fn call(
        &self,
        system: &str,
        items: &[ConversationItem],
        _stored: Option<moltmate_core::model::StoredItems<'_>>,
        _tools: &[ToolSpec],
        deltas: &dyn DeltaSink,
    ) -> Result<ModelAnswer, ModelFailure> {
        let call = SeenCall {
            system: system.to_string(),
            items: items.to_vec(),
        };
        let reply = echo_of(call.last_user_text().unwrap_or(""));
        self.calls.lock().unwrap().push(call);
        let chars: Vec<char> = reply.chars().collect();
        let third = chars.len().div_ceil(3).max(1);
        for piece in chars.chunks(third) {
            deltas.text_delta(&piece.iter().collect::<String>());
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        let usage = TokenUsage {
            input_tokens: 12,
            output_tokens: 7,
        };
        Ok(ModelAnswer {
            response: ModelResponse {
                text: reply,
                tool_calls: vec![],
                usage,
                stop_reason: StopReason::EndTurn,
            },
            provider: "test".to_string(),
            model: "echo".to_string(),
            usage: vec![("test".to_string(), "echo".to_string(), usage)],
        })
    }
}

pub struct Harness {
    pub state: WebState,
    pub gateway: Gateway,
    pub model: Arc<EchoModel>,
    pub shutdown: Shutdown,
    pub dir: tempfile::TempDir,
}

pub fn test_settings() -> WebSettings {
    WebSettings {
        admin_token: ADMIN_TOKEN.to_string(),
        ..WebSettings::default()
    }
}

pub fn harness() -> Harness {
    harness_with(test_settings())
}

pub fn harness_with(settings: WebSettings) -> Harness {
    harness_with_gateway(settings, GatewaySettings::default())
}

/// A harness whose gateway has `gateway` settings (families, trust names, configured
/// identities: what moltmate.json decides).
pub fn harness_with_gateway(settings: WebSettings, gateway: GatewaySettings) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(EchoModel::default());
    let shutdown = Shutdown::new();
    let gateway = Gateway::new(GatewayParts {
        store: Store::open_in_memory().unwrap(),
        homes: Homes::new(dir.path()),
        settings: gateway,
        model: model.clone(),
        tools: ToolBox::default(),
        channels: vec![],
        downloads: None,
        sandbox: None,
        disk_caps: None,
        shutdown: shutdown.clone(),
    });
    let state = WebState::new(gateway.clone(), settings, shutdown.clone()).unwrap();
    Harness {
        state,
        gateway,
        model,
        shutdown,
        dir,
    }
}

impl Harness {
    pub fn app(&self) -> Router {
        moltmate_web::app(self.state.clone())
    }

    /// A user who finished onboarding (so messages reach the model), with an API token.
    pub async fn user(&self, name: &str) -> (UserId, String) {
        let user = UserId::new(name).unwrap();
        let token = self
            .gateway
            .store()
            .issue_token(&user, Some("test"))
            .await
            .unwrap();
        self.gateway
            .store()
            .set_onboarded(&user, true)
            .await
            .unwrap();
        (user, token)
    }

    /// Signs `user` in through a login link; returns the session cookie and CSRF token.
    pub async fn browser_session(&self, user: &UserId) -> BrowserSession {
        let code = self
            .gateway
            .store()
            .create_login_link(user, Duration::from_secs(600))
            .await
            .unwrap();
        let response = send(
            &self.app(),
            Request::post(format!("/login/{code}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status, StatusCode::SEE_OTHER, "{}", response.body);
        let cookie = response.cookie("mm_session").expect("a session cookie");
        let page = send(
            &self.app(),
            Request::get("/")
                .header(header::COOKIE, format!("mm_session={cookie}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(page.status, StatusCode::OK);
        let csrf = meta_csrf(&page.body).expect("the chat page carries a CSRF token");
        BrowserSession {
            cookie: format!("mm_session={cookie}"),
            csrf,
        }
    }

    /// Signs the operator in; returns the admin cookie and the dashboard's CSRF token.
    pub async fn admin_session(&self) -> BrowserSession {
        let response = send(
            &self.app(),
            Request::post("/admin/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(format!("token={ADMIN_TOKEN}")))
                .unwrap(),
        )
        .await;
        assert_eq!(response.status, StatusCode::SEE_OTHER, "{}", response.body);
        let cookie = format!(
            "mm_admin={}",
            response.cookie("mm_admin").expect("an admin cookie")
        );
        let page = send(
            &self.app(),
            Request::get("/admin")
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        let csrf = hidden_csrf(&page.body).expect("the dashboard carries a CSRF token");
        BrowserSession { cookie, csrf }
    }
}

#[derive(Debug, Clone)]
pub struct BrowserSession {
    /// `name=value`, ready for a `Cookie` header.
    pub cookie: String,
    pub csrf: String,
}

pub fn meta_csrf(page: &str) -> Option<String> {
    let start =
        page.find("name=\"csrf-token\" content=\"")? + "name=\"csrf-token\" content=\"".len();
    Some(page[start..].split('"').next()?.to_string())
}

pub fn hidden_csrf(page: &str) -> Option<String> {
    let start = page.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(page[start..].split('"').next()?.to_string())
}

pub struct TestResponse {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

impl TestResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The value a `Set-Cookie` header gives cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, v)| *k == name && !v.is_empty())
            .map(|(_, v)| v.to_string())
    }
}

pub async fn send(app: &Router, request: Request<Body>) -> TestResponse {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    TestResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

pub fn completion_request(token: &str, body: serde_json::Value) -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, bearer(token))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

pub fn chat_request(session: &BrowserSession, message: &str) -> Request<Body> {
    Request::post("/api/chat")
        .header(header::COOKIE, &session.cookie)
        .header("x-csrf-token", &session.csrf)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::json!({ "message": message }).to_string(),
        ))
        .unwrap()
}

/// The NDJSON lines of a `/api/chat` answer.
pub fn ndjson(body: &str) -> Vec<serde_json::Value> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
