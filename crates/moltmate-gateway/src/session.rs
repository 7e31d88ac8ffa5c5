//! Session lifecycle: compaction as the context nears the model's window, preceded by a silent
//! memory-flush turn so the assistant can save what matters before older turns are summarised.
//!
//! Token counts are estimated (4 bytes per token, the usual rule of thumb for English and
//! German) rather than asked from the provider: compaction only needs to happen *around* the
//! threshold, and an estimate costs nothing on the hot path.

use crate::agent::{run_turn, ModelCaller, ToolBox, Turn};
use crate::metrics::Metrics;
use moltmate_core::model::{ConversationItem, IgnoreDeltas, TokenUsage};
use moltmate_core::tool::ToolContext;
use moltmate_store::{Store, StoreError};

/// Transcript rows kept verbatim after compaction (the rest becomes the summary).
const KEEP_RECENT_ROWS: usize = 8;

/// Longest summary kept (the request asks for 200 words, ~1.5 KB); a longer answer is cut, so
/// a summary can never outgrow what it replaces by much.
pub const MAX_SUMMARY_BYTES: usize = 8 * 1024;

const FLUSH_NOTICE: &str = "[Moltmates system notice, not from your user] This conversation is about to be \
compacted: older messages will be replaced by a summary. If anything in it is worth keeping long-term, save it \
now with your file tools — curated facts to MEMORY.md, what happened today to memory/YYYY-MM-DD.md. Then reply \
with just: done";

const SUMMARY_REQUEST: &str = "[Moltmates system notice, not from your user] Summarise the conversation so far \
for your future self in at most 200 words: who said what that still matters, open questions, promises made. \
Reply with the summary only.";

/// Rough token estimate of a text.
pub fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(4)
}

fn item_text_len(item: &ConversationItem) -> usize {
    match item {
        ConversationItem::User { text } => text.len(),
        ConversationItem::Assistant { text, tool_calls } => {
            text.len()
                + tool_calls
                    .iter()
                    .map(|c| c.name.len() + c.arguments.to_string().len())
                    .sum::<usize>()
        }
        ConversationItem::ToolResult { content, .. } => content.len(),
        // About what providers charge for a picture (~1,500 tokens), in text bytes.
        ConversationItem::Image { .. } => 6_000,
    }
}

/// Estimated tokens of a system prompt plus history.
pub fn estimate_context(system: &str, history: &[ConversationItem]) -> usize {
    estimate_tokens(system) + history.iter().map(item_text_len).sum::<usize>().div_ceil(4)
}

/// Estimated tokens of a system prompt plus history rows (as the store returns them).
pub fn estimate_rows(system: &str, rows: &[(i64, ConversationItem)]) -> usize {
    estimate_tokens(system)
        + rows
            .iter()
            .map(|(_, item)| item_text_len(item))
            .sum::<usize>()
            .div_ceil(4)
}

/// What compaction needs.
pub struct Compaction<'a> {
    pub model: &'a dyn ModelCaller,
    pub tools: &'a ToolBox,
    pub store: &'a Store,
    pub metrics: &'a Metrics,
    pub context: ToolContext,
    pub allowed_tools: &'a [String],
    pub system: &'a str,
    pub session_id: &'a str,
    pub max_iterations: usize,
    pub limits: &'a crate::limits::UserLimits,
    pub budget: Option<&'a crate::budget::BudgetGuard>,
    /// The session's summary so far.
    pub summary: Option<&'a str>,
}

/// Where compaction cuts a page: the earliest user message (not the first row) that leaves at
/// most [`KEEP_RECENT_ROWS`] rows after it, else the last user message (a turn is never split,
/// so no tool result is orphaned). `None` when the page is a single turn.
fn cut_point(rows: &[(i64, ConversationItem)]) -> Option<usize> {
    let users: Vec<usize> = rows
        .iter()
        .enumerate()
        .filter(|(index, (_, item))| *index > 0 && matches!(item, ConversationItem::User { .. }))
        .map(|(index, _)| index)
        .collect();
    users
        .iter()
        .copied()
        .find(|index| rows.len() - index <= KEEP_RECENT_ROWS)
        .or(users.last().copied())
}

/// Flushes memory and compacts the session: the part of the page before the cut is summarised,
/// and it (with any rows older than the page, which the model no longer sees anyway) is moved
/// out of the session into an ended one — still the user's, never deleted silently. Returns the
/// session's summary and the usage spent.
///
/// Bounded: one flush turn (bounded like any turn, budget-checked) and one summary call (cut
/// to [`MAX_SUMMARY_BYTES`]), at most once per message (the caller), and not again after an
/// attempt that did not bring the session under the threshold until it has grown by half a
/// window (`limits::compaction_due`). Each compaction that gets past the flush moves at least
/// one row out, whether or not the summary call answered with anything.
pub async fn compact(
    job: Compaction<'_>,
    page: &moltmate_store::HistoryPage,
) -> Result<Option<(String, Vec<(String, String, TokenUsage)>)>, StoreError> {
    let rows = &page.rows;
    let Some(cut) = cut_point(rows) else {
        // A single turn fills the page: nothing visible to summarise, but rows older than the
        // page are past the window; move them out so the session fits again.
        if let (true, Some((first, _))) = (page.truncated, rows.first()) {
            let summary = job.summary.unwrap_or_default().to_string();
            job.store
                .archive_before(job.session_id, &summary, *first)
                .await?;
            return Ok(Some((summary, Vec::new())));
        }
        return Ok(None);
    };
    let history: Vec<ConversationItem> = rows.iter().map(|(_, item)| item.clone()).collect();
    let mut usage = Vec::new();

    // 1. Silent memory flush: a full turn with tools, whose transcript is discarded.
    let flush = run_turn(Turn {
        model: job.model,
        tools: job.tools,
        store: job.store,
        context: job.context.clone(),
        allowed_tools: job.allowed_tools,
        system: job.system.to_string(),
        history: history.clone(),
        stored: None,
        user_text: FLUSH_NOTICE.to_string(),
        images: Vec::new(),
        max_iterations: job.max_iterations,
        deltas: &IgnoreDeltas,
        log_tool_calls: false,
        metrics: job.metrics,
        limits: job.limits,
        budget: job.budget,
    })
    .await;
    if let Some(budget) = job.budget {
        budget.charge_held(budget.take_deferred()).await;
    }
    usage.extend(flush.usage);
    if let Some(budget) = job.budget {
        if budget.check().await.is_some() {
            // The budget ran out during the flush; the turn itself will say so.
            return Ok(None);
        }
    }

    // 2. Summary of everything before the cut, without tools.
    let mut to_summarise: Vec<ConversationItem> = history[..cut].to_vec();
    to_summarise.push(ConversationItem::User {
        text: SUMMARY_REQUEST.to_string(),
    });
    let answer = match job
        .model
        .call(job.system, &to_summarise, None, &[], &IgnoreDeltas)
        .await
    {
        Ok(mut answer) => {
            answer.normalise_usage(job.system, &to_summarise);
            Some(answer)
        }
        Err(failure) => {
            tracing::warn!(error = %failure.detail, "compaction summary failed; archiving with the previous summary");
            None
        }
    };
    if let (Some(budget), Some(answer)) = (job.budget, &answer) {
        budget.charge_model(&answer.usage).await;
    }
    if let Some(answer) = &answer {
        usage.extend(answer.usage.iter().cloned());
    }
    let mut summary = answer
        .map(|a| a.response.text.trim().to_string())
        .unwrap_or_default();
    if summary.is_empty() {
        // A failed or empty summary (a provider error, or a model told to answer nothing)
        // must not switch compaction off: the rows still move out of the session, under the
        // summary it had, so the current session stays bounded by the window whatever the
        // model does. Nothing is lost: archived rows stay the user's.
        tracing::warn!("compaction got no summary; archiving with the previous summary");
        summary = job.summary.unwrap_or_default().to_string();
    }
    if summary.len() > MAX_SUMMARY_BYTES {
        let mut end = MAX_SUMMARY_BYTES;
        while !summary.is_char_boundary(end) {
            end -= 1;
        }
        summary.truncate(end);
        summary.push_str(" […]");
    }
    job.store
        .archive_before(job.session_id, &summary, rows[cut].0)
        .await?;
    Ok(Some((summary, usage)))
}
