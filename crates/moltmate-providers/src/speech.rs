//! Speech to text over an OpenAI-compatible `POST {baseUrl}/audio/transcriptions`
//! (multipart: `file`, `model`, `response_format=json`), e.g. OpenAI's `whisper-1` or a
//! self-hosted Whisper server. The API key goes only into the `Authorization` header; error
//! texts never include it or the request.

use crate::settings::ApiKey;
use async_trait::async_trait;
use moltmate_core::speech::{SpeechError, Transcriber};
use std::time::Duration;

/// Largest reply read (a transcript of a few minutes is a few KB).
const MAX_REPLY_BYTES: usize = 1 << 20;
/// Longest transcript passed on, in characters.
const MAX_TRANSCRIPT_CHARS: usize = 16_000;

/// An OpenAI-compatible transcription client.
#[derive(Debug, Clone)]
pub struct OpenAiTranscriber {
    http: reqwest::Client,
    url: String,
    api_key: Option<ApiKey>,
    model: String,
}

impl OpenAiTranscriber {
    /// `base_url` like `https://api.openai.com/v1` (the path `/audio/transcriptions` is added).
    pub fn new(
        base_url: &str,
        api_key: Option<ApiKey>,
        model: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let url = reqwest::Url::parse(base_url).map_err(|e| format!("speech.baseUrl: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("speech.baseUrl must be http or https".to_string());
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.without_url().to_string())?;
        Ok(OpenAiTranscriber {
            http,
            url: format!("{}/audio/transcriptions", base_url.trim_end_matches('/')),
            api_key,
            model: model.to_string(),
        })
    }
}

#[async_trait]
impl Transcriber for OpenAiTranscriber {
    async fn transcribe(
        &self,
        audio: Vec<u8>,
        file_name: &str,
        media_type: &str,
    ) -> Result<String, SpeechError> {
        let part = reqwest::multipart::Part::bytes(audio)
            .file_name(file_name.to_string())
            .mime_str(media_type)
            .map_err(|e| SpeechError::InvalidReply(e.without_url().to_string()))?;
        let form = reqwest::multipart::Form::new()
            .text("model", self.model.clone())
            .text("response_format", "json")
            .part("file", part);
        let mut request = self.http.post(&self.url).multipart(form);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose());
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| SpeechError::Unreachable(e.without_url().to_string()))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| SpeechError::Unreachable(e.without_url().to_string()))?
        {
            if body.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(SpeechError::InvalidReply("reply too large".to_string()));
            }
            body.extend_from_slice(&chunk);
        }
        if !(200..300).contains(&status) {
            let detail: String = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| "no details".to_string())
                .chars()
                .take(200)
                .collect();
            let detail = match &self.api_key {
                Some(key) if !key.expose().is_empty() => detail.replace(key.expose(), "[redacted]"),
                _ => detail,
            };
            return Err(SpeechError::Rejected { status, detail });
        }
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| SpeechError::InvalidReply("not JSON".to_string()))?;
        let text = value
            .get("text")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| SpeechError::InvalidReply("no \"text\" in the reply".to_string()))?;
        Ok(text.chars().take(MAX_TRANSCRIPT_CHARS).collect())
    }
}
