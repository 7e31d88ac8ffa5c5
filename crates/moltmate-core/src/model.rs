//! The model contract: provider-neutral conversation types and the [`Provider`] trait.
//!
//! Providers (Anthropic Messages, OpenAI Chat Completions and every OpenAI-compatible server)
//! translate these types to and from their wire format. Nothing above a provider sees a wire
//! format, and nothing in these types may hold a credential.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::time::Duration;

/// One item of a conversation, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConversationItem {
    User {
        text: String,
    },
    Assistant {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    ToolResult {
        call_id: String,
        content: String,
        is_error: bool,
    },
    /// A picture the user sent, shown to a model that supports images together with the user
    /// item that follows it. Only ever part of the current turn's request: the transcript keeps
    /// the text that names where the picture was saved, never the picture itself.
    Image {
        /// `image/jpeg`, `image/png`, `image/gif` or `image/webp` (decided from the content).
        media_type: String,
        /// The picture, base64 (standard alphabet, padded).
        data: String,
    },
}

/// A tool call requested by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id for this call; echoed back in the matching [`ConversationItem::ToolResult`].
    pub id: String,
    pub name: String,
    /// Parsed JSON arguments. If the model produced invalid JSON, the provider puts the raw text
    /// in a JSON string here so the tool can return a clear error to the model.
    pub arguments: serde_json::Value,
}

/// A tool as offered to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object. Shared: a tool's spec is built once and offered on
    /// every turn, so a turn holds a pointer to it rather than its own tree of maps.
    pub parameters: std::sync::Arc<serde_json::Value>,
}

/// One request to a model. The prompt, the history and the tool specs are usually borrowed
/// from the turn (`Cow::Borrowed`): a session's history can be thousands of items, and a copy
/// of it per model call was a measurable share of a message's CPU.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest<'a> {
    /// The model name as the provider knows it (`claude-sonnet-4-5`), without the provider prefix.
    pub model: String,
    pub system: Cow<'a, str>,
    pub items: Cow<'a, [ConversationItem]>,
    pub tools: Cow<'a, [ToolSpec]>,
    pub max_output_tokens: u32,
    /// The stored items at the front of `items`, with their wire forms kept between the
    /// user's turns; `None` when the items are not (all) from a user's kept history.
    pub stored: Option<StoredItems<'a>>,
}

/// The front of a request's items that came from a user's stored transcript: `ids[i]` is the
/// transcript row of `items[i]`. A transcript row never changes while the history it was read
/// into is kept (that history is read afresh, with a new [`WireCache`], when any row of the
/// session changes), so a row's wire form can be made once and reused on every later turn.
#[derive(Clone, Copy)]
pub struct StoredItems<'a> {
    pub ids: &'a [i64],
    pub cache: &'a WireCache,
}

impl std::fmt::Debug for StoredItems<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredItems")
            .field("ids", &self.ids.len())
            .finish_non_exhaustive()
    }
}

impl PartialEq for StoredItems<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.ids == other.ids && std::ptr::eq(self.cache, other.cache)
    }
}

/// Wire forms (the bytes a provider sends for an item) of one user's stored transcript rows,
/// by wire format and row id, kept between that user's turns.
///
/// **Why.** Serialising the whole history into every model request was the largest single
/// cost of a message on the gateway's side (a 1,000-item history is ~100 KB of JSON, escaped
/// character by character, on every call); a turn adds two rows, so all but those are made
/// once. The bytes of one format lie in one buffer in row order, so a request copies them
/// from consecutive memory (an entry per row in a map cost as much in cache misses as the
/// encoding it saved). **Bounded**: the buffers' capacity and index are reserved in a budget
/// shared with the history cache this belongs to, per conversation and in all; when the
/// conversation's bound is reached the older half is dropped (a history window slides
/// forward), and a row that cannot be kept is encoded afresh each time, as without a cache.
/// **Never another user's**: a cache belongs to one user's worker and one session's kept
/// history, and dies with it.
pub struct WireCache {
    arenas: std::sync::Mutex<Vec<WireArena>>,
    budget: std::sync::Arc<std::sync::atomic::AtomicU64>,
    conversation_cap: u64,
    total_cap: u64,
}

/// The kept rows of one wire format: `index[i]` = (row, start, end) of its bytes in `bytes`,
/// rows strictly increasing.
struct WireArena {
    format: &'static str,
    bytes: Vec<u8>,
    index: Vec<(i64, usize, usize)>,
    /// Bytes reserved in the budget for this arena (its buffers' capacity).
    reserved: u64,
}

const WIRE_INDEX_ENTRY_BYTES: u64 = std::mem::size_of::<(i64, usize, usize)>() as u64;

impl WireArena {
    fn cost(&self) -> u64 {
        self.bytes.capacity() as u64 + self.index.capacity() as u64 * WIRE_INDEX_ENTRY_BYTES
    }

    fn find(&self, row: i64, hint: usize) -> Option<(usize, usize, usize)> {
        let at = match self.index.get(hint) {
            Some((kept, _, _)) if *kept == row => hint,
            _ => self
                .index
                .binary_search_by_key(&row, |(kept, _, _)| *kept)
                .ok()?,
        };
        let (_, start, end) = self.index.get(at)?;
        Some((at, *start, *end))
    }

    /// Drops the older half of the rows (their bytes moved down, offsets fixed).
    fn drop_older_half(&mut self) {
        let keep_from = self.index.len() / 2;
        let cut = self
            .index
            .get(keep_from)
            .map_or(self.bytes.len(), |(_, start, _)| *start);
        self.bytes.drain(..cut);
        self.index.drain(..keep_from);
        for (_, start, end) in &mut self.index {
            *start -= cut;
            *end -= cut;
        }
    }
}

impl WireCache {
    /// A cache that keeps at most `conversation_cap` bytes, and only while `budget` (shared
    /// with other caches) stays at most `total_cap`.
    pub fn new(
        budget: std::sync::Arc<std::sync::atomic::AtomicU64>,
        conversation_cap: u64,
        total_cap: u64,
    ) -> WireCache {
        WireCache {
            arenas: std::sync::Mutex::default(),
            budget,
            conversation_cap,
            total_cap,
        }
    }

    /// The kept rows of `format`, for one request: take it once, then
    /// [`WireRows::append`] each stored item in order.
    pub fn rows(&self, format: &'static str) -> WireRows<'_> {
        let mut arenas = self.arenas.lock().unwrap_or_else(|p| p.into_inner());
        let arena = match arenas.iter().position(|a| a.format == format) {
            Some(at) => at,
            None => {
                arenas.push(WireArena {
                    format,
                    bytes: Vec::new(),
                    index: Vec::new(),
                    reserved: 0,
                });
                arenas.len() - 1
            }
        };
        WireRows {
            cache: self,
            arenas,
            arena,
            hint: 0,
        }
    }

    /// Bytes kept (reserved in the budget).
    pub fn kept_bytes(&self) -> u64 {
        let arenas = self.arenas.lock().unwrap_or_else(|p| p.into_inner());
        arenas.iter().map(|a| a.reserved).sum()
    }

    /// Reserves `more` bytes in the shared budget, within the conversation's bound given
    /// what is `kept` already.
    fn reserve(&self, kept: u64, more: u64) -> bool {
        use std::sync::atomic::Ordering;
        if kept.saturating_add(more) > self.conversation_cap {
            return false;
        }
        let total_cap = self.total_cap;
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |total| {
                let total = total.checked_add(more)?;
                (total <= total_cap).then_some(total)
            })
            .is_ok()
    }

    fn release(&self, bytes: u64) {
        self.budget
            .fetch_sub(bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One request's access to a [`WireCache`] (see [`WireCache::rows`]).
pub struct WireRows<'a> {
    cache: &'a WireCache,
    arenas: std::sync::MutexGuard<'a, Vec<WireArena>>,
    arena: usize,
    /// Where the next row is likely to be in the index (rows are appended in order).
    hint: usize,
}

impl WireRows<'_> {
    /// Appends the wire form of transcript row `row` to `out`: the kept bytes, or what
    /// `encode` writes (kept for next time when it is newer than every kept row and the
    /// bounds allow). `encode` must write the same bytes for the same row every time.
    pub fn append(
        &mut self,
        row: i64,
        out: &mut Vec<u8>,
        encode: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    ) -> serde_json::Result<()> {
        let kept: u64 = self.arenas.iter().map(|a| a.reserved).sum();
        let Some(arena) = self.arenas.get_mut(self.arena) else {
            return encode(out);
        };
        if let Some((at, start, end)) = arena.find(row, self.hint) {
            out.extend_from_slice(arena.bytes.get(start..end).unwrap_or_default());
            self.hint = at + 1;
            return Ok(());
        }
        let start = out.len();
        encode(out)?;
        let made = out.get(start..).unwrap_or_default();
        if arena.index.last().is_some_and(|(last, _, _)| *last >= row) {
            // Older than what is kept (a window that moved back): not kept.
            return Ok(());
        }
        let fits = |arena: &WireArena| {
            arena.bytes.len() + made.len() <= arena.bytes.capacity()
                && arena.index.len() < arena.index.capacity()
        };
        if !fits(arena) {
            // Grow to what is needed plus half again, reserved before it is allocated.
            let bytes = (arena.bytes.len() + made.len()) * 3 / 2;
            let entries = (arena.index.len() + 1) * 3 / 2;
            let wanted = bytes as u64 + entries as u64 * WIRE_INDEX_ENTRY_BYTES;
            let more = wanted.saturating_sub(arena.reserved);
            if !self.cache.reserve(kept, more) {
                // Over a bound: make room by dropping the older half, once.
                arena.drop_older_half();
                if !fits(arena) {
                    return Ok(());
                }
            } else {
                arena
                    .bytes
                    .reserve_exact(bytes.saturating_sub(arena.bytes.len()));
                arena
                    .index
                    .reserve_exact(entries.saturating_sub(arena.index.len()));
                // What was allocated may be more than asked; count what is really held.
                let cost = arena.cost();
                let reserved = arena.reserved + more;
                if cost > reserved && !self.cache.reserve(kept + more, cost - reserved) {
                    self.cache.release(reserved);
                    *arena = WireArena {
                        format: arena.format,
                        bytes: Vec::new(),
                        index: Vec::new(),
                        reserved: 0,
                    };
                    return Ok(());
                }
                arena.reserved = reserved.max(cost);
            }
        }
        let at = arena.bytes.len();
        arena.bytes.extend_from_slice(made);
        arena.index.push((row, at, at + made.len()));
        self.hint = arena.index.len();
        Ok(())
    }
}

impl Drop for WireCache {
    fn drop(&mut self) {
        let arenas = self.arenas.get_mut().unwrap_or_else(|p| p.into_inner());
        let reserved: u64 = arenas.iter().map(|a| a.reserved).sum();
        self.release(reserved);
    }
}

impl std::fmt::Debug for WireCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireCache")
            .field("kept_bytes", &self.kept_bytes())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl TokenUsage {
    /// Both counts added (saturating).
    pub fn plus(self, other: TokenUsage) -> TokenUsage {
        TokenUsage {
            input_tokens: self.input_tokens.saturating_add(other.input_tokens),
            output_tokens: self.output_tokens.saturating_add(other.output_tokens),
        }
    }

    /// Input plus output tokens.
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// Each count capped at [`MAX_TOKENS_PER_REPLY`]: what one provider reply may charge,
    /// whatever number it claims (a reply's `usage` is outside input).
    pub fn clamped(self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.input_tokens.min(MAX_TOKENS_PER_REPLY),
            output_tokens: self.output_tokens.min(MAX_TOKENS_PER_REPLY),
        }
    }

    /// Neither count is known (a provider or proxy that reports no usage).
    pub fn is_zero(&self) -> bool {
        self.input_tokens == 0 && self.output_tokens == 0
    }

    /// The usage of a reply that reported none, estimated at one token per 4 bytes of what was
    /// sent and what came back (at least one token each), so budgets still count it.
    pub fn estimated(sent_bytes: usize, received_bytes: usize) -> TokenUsage {
        let tokens = |bytes: usize| (u64::try_from(bytes).unwrap_or(u64::MAX) / 4).max(1);
        TokenUsage {
            input_tokens: tokens(sent_bytes),
            output_tokens: tokens(received_bytes),
        }
        .clamped()
    }
}

/// The most tokens one provider reply may charge per direction. The largest context windows are
/// a few million tokens; a reply claiming more is wrong or hostile, and its number must not
/// poison the day's counters (they saturate, see the store's `usage`).
pub const MAX_TOKENS_PER_REPLY: u64 = 100_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndTurn,
    ToolUse,
    MaxTokens,
    Other,
}

/// A complete model answer (after streaming finished).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelResponse {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: TokenUsage,
    pub stop_reason: StopReason,
}

/// Receives text as it streams in. Implemented by the web channel's SSE writer, for example.
pub trait DeltaSink: Send + Sync {
    fn text_delta(&self, text: &str);
    /// A file of this turn was put up for download (`send_file` on the web or the API); the
    /// caller shows the link next to the answer. Ignored by default.
    fn file_offered(&self, file: &crate::channel::OfferedFile) {
        let _ = file;
    }
}

/// A [`DeltaSink`] that drops everything.
pub struct IgnoreDeltas;

impl DeltaSink for IgnoreDeltas {
    fn text_delta(&self, _text: &str) {}
}

/// Why a model call failed. Messages never contain an API key or a request body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("could not connect to {provider}: {detail}")]
    Connect { provider: String, detail: String },
    #[error("{provider} did not answer in time")]
    Timeout { provider: String },
    #[error("{provider} is rate limiting requests")]
    RateLimited {
        provider: String,
        retry_after: Option<Duration>,
    },
    #[error("{provider} had a server error (HTTP {status})")]
    Server {
        provider: String,
        status: u16,
        detail: String,
    },
    #[error("{provider} refused the request (HTTP {status}): {detail}")]
    Rejected {
        provider: String,
        status: u16,
        detail: String,
    },
    #[error("{provider} sent a malformed reply: {detail}")]
    InvalidReply { provider: String, detail: String },
    #[error("provider {provider:?} is not configured: {detail}")]
    NotConfigured { provider: String, detail: String },
}

impl ProviderError {
    /// Whether retrying the same request against the same provider may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Connect { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::RateLimited { .. }
            | ProviderError::Server { .. } => true,
            ProviderError::Rejected { .. }
            | ProviderError::InvalidReply { .. }
            | ProviderError::NotConfigured { .. } => false,
        }
    }

    /// Whether the next model in the fallback chain should be tried after this error
    /// (once retries, if any, are exhausted).
    pub fn should_fall_back(&self) -> bool {
        match self {
            ProviderError::Connect { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::RateLimited { .. }
            | ProviderError::Server { .. }
            | ProviderError::InvalidReply { .. }
            | ProviderError::NotConfigured { .. } => true,
            // A 4xx (bad key, unknown model, request too large) may well succeed elsewhere.
            ProviderError::Rejected { .. } => true,
        }
    }

    /// How long the server asked us to wait, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A model API (one configured `providers.<name>` entry).
#[async_trait]
pub trait Provider: Send + Sync {
    /// The configured provider name (`anthropic`, `ollama`, ...).
    fn name(&self) -> &str;
    /// One streamed request, without retries. Text deltas go to `deltas` as they arrive.
    async fn complete(
        &self,
        request: &ModelRequest<'_>,
        deltas: &dyn DeltaSink,
    ) -> Result<ModelResponse, ProviderError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// One request of a sliding history window: rows `first..=last`, each encoded as 100
    /// bytes naming its row; returns how many rows had to be encoded.
    fn request(cache: &WireCache, first: i64, last: i64) -> usize {
        let mut rows = cache.rows("test");
        let mut encoded = 0;
        let mut out = Vec::new();
        for row in first..=last {
            rows.append(row, &mut out, |out| {
                encoded += 1;
                out.extend_from_slice(format!("{row:0100}").as_bytes());
                Ok(())
            })
            .unwrap();
        }
        let expected: String = (first..=last).map(|row| format!("{row:0100}")).collect();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            expected,
            "rows {first}..={last}"
        );
        encoded
    }

    /// A conversation longer than its bound keeps its newest rows: after the window has slid
    /// far past the bound, a request still encodes only the row that is new.
    #[test]
    fn the_wire_cache_slides_with_the_history_and_stays_within_its_bound() {
        let budget = Arc::new(AtomicU64::new(0));
        let cache = WireCache::new(Arc::clone(&budget), 3_000, 1 << 20);
        assert_eq!(request(&cache, 1, 10), 10);
        assert_eq!(request(&cache, 1, 10), 0);
        for last in 11..200 {
            let encoded = request(&cache, last - 9, last);
            assert!(
                encoded <= 1 || last < 40,
                "{encoded} rows encoded at {last}"
            );
            assert!(cache.kept_bytes() <= 3_000);
            assert_eq!(budget.load(Ordering::SeqCst), cache.kept_bytes());
        }
        assert_eq!(request(&cache, 190, 199), 0);
        // A window that moved back: the older rows are encoded, and not kept.
        assert!(request(&cache, 1, 5) == 5);
        assert_eq!(request(&cache, 190, 199), 0);
        drop(cache);
        assert_eq!(budget.load(Ordering::SeqCst), 0);
    }

    /// Two formats in one cache each keep their own bytes; the shared budget's bound holds
    /// for both together.
    #[test]
    fn the_wire_cache_keeps_formats_apart_within_the_shared_budget() {
        let budget = Arc::new(AtomicU64::new(0));
        let cache = WireCache::new(Arc::clone(&budget), 1 << 20, 4_000);
        let mut out = Vec::new();
        for format in ["a", "b"] {
            let mut rows = cache.rows(format);
            for row in 1..=30 {
                rows.append(row, &mut out, |out| {
                    out.extend_from_slice(format!("{format}{row:099}").as_bytes());
                    Ok(())
                })
                .unwrap();
            }
        }
        let mut again = Vec::new();
        for format in ["a", "b"] {
            let mut rows = cache.rows(format);
            for row in 1..=30 {
                rows.append(row, &mut again, |out| {
                    out.extend_from_slice(format!("{format}{row:099}").as_bytes());
                    Ok(())
                })
                .unwrap();
            }
        }
        assert_eq!(out, again);
        assert!(budget.load(Ordering::SeqCst) <= 4_000);
        assert_eq!(budget.load(Ordering::SeqCst), cache.kept_bytes());
    }
}
