//! The `memory_search {query}` tool: searches the calling user's own memory files, their
//! family's notes and their past conversations. The index is the user's own database file
//! ([`moltmate_store::memory_index`]), chosen by the user id in the tool context — never by
//! anything the model says.

use async_trait::async_trait;
use moltmate_core::blocking;
use moltmate_core::model::ToolSpec;
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use moltmate_store::memory_index::{IndexedRoot, MemoryIndex};
use moltmate_store::Store;
use serde::Deserialize;
use std::path::PathBuf;

/// Results returned to the model at most.
const MAX_HITS: usize = 10;
/// Longest a search (with the index update before it) may take.
const SEARCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);
/// When the index itself stops (indexing ends, statements are interrupted): before
/// [`SEARCH_DEADLINE`], so the work ends rather than being abandoned.
const INDEX_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn blocking_error(e: blocking::BlockingError) -> ToolError {
    match e {
        blocking::BlockingError::TimedOut { .. } => ToolError::Failed(format!(
            "memory search took too long and was abandoned ({e})"
        )),
        blocking::BlockingError::Failed { .. } => ToolError::Fatal(e.to_string()),
    }
}

pub struct MemorySearchTool {
    store: Store,
    index_dir: PathBuf,
    /// Size at which a user's index stops taking new content (`limits.memoryIndexMb`).
    max_index_bytes: u64,
}

/// Default of `limits.memoryIndexMb`.
pub const DEFAULT_MAX_INDEX_BYTES: u64 = 256 * 1024 * 1024;

impl MemorySearchTool {
    /// `index_dir` is `<MOLTMATE_HOME>/index`.
    pub fn new(store: Store, index_dir: PathBuf) -> Self {
        MemorySearchTool {
            store,
            index_dir,
            max_index_bytes: DEFAULT_MAX_INDEX_BYTES,
        }
    }

    /// Each user's index takes no new content past this size.
    pub fn with_max_index_bytes(mut self, max_bytes: u64) -> Self {
        self.max_index_bytes = max_bytes;
        self
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Arguments {
    query: String,
}

#[async_trait]
impl Tool for MemorySearchTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "memory_search".to_string(),
            description: "Search your user's long-term memory (MEMORY.md, USER.md, daily notes in memory/, \
                          shared family notes) and past conversations. Returns the best matching lines with \
                          their file and line number."
                .to_string(),
            parameters: std::sync::Arc::new(serde_json::json!({
                "type": "object",
                "properties": { "query": { "type": "string", "description": "Words to look for." } },
                "required": ["query"],
                "additionalProperties": false
            })),
        }
    }

    async fn call(
        &self,
        context: &ToolContext,
        arguments: serde_json::Value,
    ) -> Result<ToolOutput, ToolError> {
        let arguments: Arguments = serde_json::from_value(arguments).map_err(|e| {
            ToolError::InvalidArguments(format!("memory_search takes {{\"query\": string}}: {e}"))
        })?;
        if arguments.query.trim().is_empty() {
            return Err(ToolError::InvalidArguments("query is empty".to_string()));
        }
        // Which index file the transcript rows below are read for: a `/forget` in between
        // replaces it, and then these rows (perhaps the forgotten ones) are not indexed.
        let (instance, last) = {
            let index_dir = self.index_dir.clone();
            let user = context.user.clone();
            blocking::run(
                "opening the memory index",
                blocking::FILE_DEADLINE,
                move || {
                    let index = MemoryIndex::open(&index_dir, &user)?;
                    Ok::<_, moltmate_store::StoreError>((
                        index.instance()?,
                        index.last_transcript_id()?,
                    ))
                },
            )
            .await
            .map_err(blocking_error)?
            .map_err(|e| ToolError::Failed(format!("memory index unavailable: {e}")))?
        };
        let new_rows = self
            .store
            .transcript_since(
                &context.user,
                last,
                5_000,
                moltmate_store::memory_index::MAX_SYNC_BYTES,
            )
            .await
            .map_err(|e| ToolError::Fatal(e.to_string()))?;
        let index_dir = self.index_dir.clone();
        let user = context.user.clone();
        let home = context.home.root().to_path_buf();
        let family = context.family.as_ref().map(|f| f.root.clone());
        let query = arguments.query;
        // Reading the notes and indexing them: bounded (entries, bytes per file) and off the
        // runtime, abandoned after a deadline.
        let max_bytes = self.max_index_bytes;
        // The index stops its own work before the caller gives up on it, so an abandoned
        // search does not keep a core busy (SQLite's progress handler interrupts statements).
        let deadline = std::time::Instant::now() + INDEX_DEADLINE;
        let (hits, full) = blocking::run("searching memory", SEARCH_DEADLINE, move || {
            let mut index = MemoryIndex::open(&index_dir, &user)?
                .with_max_bytes(max_bytes)
                .with_deadline(deadline);
            let mut roots = vec![IndexedRoot {
                root: &home,
                prefix: "",
                files: &["MEMORY.md", "USER.md"],
                directories: &["memory"],
            }];
            if let Some(family) = &family {
                roots.push(IndexedRoot {
                    root: family,
                    prefix: "family/",
                    files: &["FAMILY.md"],
                    directories: &["notes"],
                });
            }
            index.sync_as(instance, &roots, &new_rows)?;
            Ok::<_, moltmate_store::StoreError>((index.search(&query, MAX_HITS)?, index.is_full()))
        })
        .await
        .map_err(blocking_error)?
        .map_err(|e| {
            if e.is_interrupted() {
                ToolError::Failed(
                    "memory search took too long and was stopped; try fewer or rarer words"
                        .to_string(),
                )
            } else {
                ToolError::Failed(format!("memory search failed: {e}"))
            }
        })?;
        let note = if full {
            format!(
                "\n(Note: this user's memory index is full ({} MB), so their newest notes and conversations are not searchable. Tell your user: /forget deletes past conversations, or the operator can raise limits.memoryIndexMb.)",
                max_bytes / (1024 * 1024)
            )
        } else {
            String::new()
        };
        if hits.is_empty() {
            return Ok(ToolOutput::text(format!("No matches in memory.{note}")));
        }
        let lines: Vec<String> = hits
            .iter()
            .map(|h| format!("{}:{}: {}", h.source, h.location, h.snippet))
            .collect();
        Ok(ToolOutput::text(format!("{}{note}", lines.join("\n"))))
    }
}
