//! The speech-to-text contract: voice notes and audio files become the text of a message.
//!
//! Implemented by the providers crate for OpenAI-compatible `POST /v1/audio/transcriptions`
//! servers (hosted, or a self-hosted Whisper server); the gateway only sees this trait.

use async_trait::async_trait;

/// Why a transcription failed. Never contains an API key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpeechError {
    #[error("could not reach the transcription service: {0}")]
    Unreachable(String),
    #[error("the transcription service refused the audio (HTTP {status}): {detail}")]
    Rejected { status: u16, detail: String },
    #[error("the transcription service sent a reply we could not understand: {0}")]
    InvalidReply(String),
}

impl SpeechError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            SpeechError::Unreachable(_) | SpeechError::InvalidReply(_) => true,
            SpeechError::Rejected { status, .. } => *status == 429 || *status >= 500,
        }
    }
}

/// Turns recorded speech into text.
#[async_trait]
pub trait Transcriber: Send + Sync {
    /// Transcribe `audio` (its content type decided from the bytes, e.g. `audio/ogg`).
    async fn transcribe(
        &self,
        audio: Vec<u8>,
        file_name: &str,
        media_type: &str,
    ) -> Result<String, SpeechError>;
}
