//! A fake OpenAI-compatible transcription server (`POST /v1/audio/transcriptions`,
//! multipart/form-data with a `file` and a `model` field), in-process on `127.0.0.1:0`.
//!
//! Answers `{"text": <transcript>}` with the transcript set by the test, refuses requests
//! without the expected bearer key with 401, and records each request's headers and body.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use std::sync::{Arc, Mutex};

/// One transcription request as received.
#[derive(Debug, Clone)]
pub struct TranscriptionRequest {
    pub content_type: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

impl TranscriptionRequest {
    /// Whether the multipart body carries `needle` (e.g. the audio bytes, or `whisper-1`).
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.body.windows(needle.len()).any(|w| w == needle)
    }
}

struct Shared {
    key: String,
    transcript: Mutex<String>,
    requests: Mutex<Vec<TranscriptionRequest>>,
}

/// The fake server. Stops serving when dropped.
pub struct FakeSpeech {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSpeech {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeSpeech {
    /// Serve on loopback, accepting `Authorization: Bearer <key>` only.
    pub async fn start(key: &str, transcript: &str) -> FakeSpeech {
        let shared = Arc::new(Shared {
            key: key.to_string(),
            transcript: Mutex::new(transcript.to_string()),
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/audio/transcriptions", post(transcribe))
            .with_state(shared.clone());
        #[allow(clippy::expect_used)] // test double: failing to bind loopback is a broken host
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake speech: bind 127.0.0.1:0");
        #[allow(clippy::expect_used)]
        let addr = listener.local_addr().expect("fake speech: local address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeSpeech {
            shared,
            addr,
            server,
        }
    }

    /// The `baseUrl` to configure (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<TranscriptionRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

async fn transcribe(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let request = TranscriptionRequest {
        content_type: header("content-type").unwrap_or_default(),
        authorization: header("authorization"),
        body: body.to_vec(),
    };
    let authorized = request.authorization.as_deref() == Some(&format!("Bearer {}", shared.key));
    let multipart = request.content_type.starts_with("multipart/form-data");
    shared
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(request);
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"error": {"message": "Incorrect API key provided"}})),
        )
            .into_response();
    }
    if !multipart {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": {"message": "expected multipart/form-data"}})),
        )
            .into_response();
    }
    let text = shared
        .transcript
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    axum::Json(serde_json::json!({ "text": text })).into_response()
}
