//! The subset of the Telegram Bot API wire format this channel reads and writes.
//!
//! Every reply of the Bot API is an envelope `{"ok": bool, "result": ..., "error_code": int,
//! "description": str, "parameters": {"retry_after": int}}`. Incoming types only name the
//! fields we use and ignore the rest, so new fields Telegram adds never break parsing.

use serde::{Deserialize, Serialize};

/// The envelope around every Bot API reply; `result` is kept raw and decoded by the caller,
/// so a reply whose `result` has an unexpected shape is reported separately from a broken body.
#[derive(Debug, Deserialize)]
pub(crate) struct Envelope {
    pub ok: bool,
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    #[serde(default)]
    pub error_code: Option<i64>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<ResponseParameters>,
}

/// `ResponseParameters`: why a request failed and what to do about it.
#[derive(Debug, Deserialize)]
pub(crate) struct ResponseParameters {
    #[serde(default)]
    pub retry_after: Option<u64>,
}

/// `getMe` result.
#[derive(Debug, Deserialize)]
pub(crate) struct BotUser {
    pub id: i64,
    #[serde(default)]
    pub username: Option<String>,
}

/// One `Update`. Only `message` is requested via `allowed_updates`; anything else that still
/// arrives is skipped.
#[derive(Debug, Deserialize)]
pub(crate) struct Update {
    pub update_id: i64,
    #[serde(default)]
    pub message: Option<Message>,
}

/// A `Message`. `text` is absent for stickers, photos, voice notes and service messages.
#[derive(Debug, Deserialize)]
pub(crate) struct Message {
    #[serde(default)]
    pub from: Option<User>,
    pub chat: Chat,
    #[serde(default)]
    pub text: Option<String>,
    /// The caption of a photo, document, audio or voice message.
    #[serde(default)]
    pub caption: Option<String>,
    /// The sizes of a photo, smallest first. A file field that does not parse is left out
    /// (`lenient`): the message's text is still delivered.
    #[serde(default, deserialize_with = "lenient")]
    pub photo: Option<Vec<FileRef>>,
    #[serde(default, deserialize_with = "lenient")]
    pub voice: Option<FileRef>,
    #[serde(default, deserialize_with = "lenient")]
    pub audio: Option<FileRef>,
    #[serde(default, deserialize_with = "lenient")]
    pub document: Option<FileRef>,
}

/// A field read as `T` if it parses and as absent if it does not, so one malformed part of a
/// message (a `photo` that is not a list of sizes) does not lose the rest of it.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).ok())
}

/// The fields of `PhotoSize`, `Voice`, `Audio` and `Document` we use.
#[derive(Debug, Deserialize)]
pub(crate) struct FileRef {
    pub file_id: String,
    #[serde(default)]
    pub file_size: Option<u64>,
    #[serde(default)]
    pub file_name: Option<String>,
    #[serde(default)]
    pub mime_type: Option<String>,
    #[serde(default)]
    pub duration: Option<u64>,
}

/// `getFile` parameters.
#[derive(Debug, Serialize)]
pub(crate) struct GetFile<'a> {
    pub file_id: &'a str,
}

/// `getFile` result: where to download the file (valid for at least an hour).
#[derive(Debug, Deserialize)]
pub(crate) struct File {
    #[serde(default)]
    pub file_size: Option<u64>,
    #[serde(default)]
    pub file_path: Option<String>,
}

/// A Telegram `User` (the sender of a message).
#[derive(Debug, Deserialize)]
pub(crate) struct User {
    pub id: i64,
    #[serde(default)]
    pub is_bot: bool,
    #[serde(default)]
    pub first_name: Option<String>,
    #[serde(default)]
    pub last_name: Option<String>,
    #[serde(default)]
    pub language_code: Option<String>,
}

/// A Telegram `Chat`; `type` is one of `private`, `group`, `supergroup`, `channel`.
#[derive(Debug, Deserialize)]
pub(crate) struct Chat {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: String,
}

/// `chat_id` parameter: an integer id, or `@username` for public channels.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum ChatRef<'a> {
    Id(i64),
    Name(&'a str),
}

impl<'a> ChatRef<'a> {
    pub fn parse(raw: &'a str) -> Self {
        match raw.trim().parse::<i64>() {
            Ok(id) => ChatRef::Id(id),
            Err(_) => ChatRef::Name(raw),
        }
    }
}

/// `getUpdates` parameters.
#[derive(Debug, Serialize)]
pub(crate) struct GetUpdates<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    pub timeout: u64,
    pub allowed_updates: &'a [&'a str],
}

/// `sendMessage` parameters. `parse_mode` is `HTML` for text built by `format` (every piece of
/// the model's text escaped), absent for the plain-text resend.
#[derive(Debug, Serialize)]
pub(crate) struct SendMessage<'a> {
    pub chat_id: ChatRef<'a>,
    pub text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parse_mode: Option<&'a str>,
}

/// `sendChatAction` parameters.
#[derive(Debug, Serialize)]
pub(crate) struct SendChatAction<'a> {
    pub chat_id: ChatRef<'a>,
    pub action: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_photo_field_does_not_lose_the_text() {
        let update: Update = serde_json::from_value(serde_json::json!({
            "update_id": 1,
            "message": {"chat": {"id": 5, "type": "private"}, "from": {"id": 5},
                        "text": "hello", "photo": "not a list", "voice": [1, 2]}
        }))
        .unwrap();
        let message = update.message.unwrap();
        assert_eq!(message.text.as_deref(), Some("hello"));
        assert!(message.photo.is_none() && message.voice.is_none());
        let update: Update = serde_json::from_value(serde_json::json!({
            "update_id": 2,
            "message": {"chat": {"id": 5, "type": "private"},
                        "photo": [{"file_id": "a", "file_size": 3}]}
        }))
        .unwrap();
        assert_eq!(update.message.unwrap().photo.unwrap()[0].file_id, "a");
    }
}
