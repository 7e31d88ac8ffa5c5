//! Full-text search over one user's memory: MEMORY.md, USER.md, `memory/*.md`, their family's
//! notes, and their past transcripts (SQLite FTS5, BM25 ranking).
//!
//! Each user has their own index database, `<MOLTMATE_HOME>/index/<user_id>.db`, outside the
//! user's home (which their sandbox can write). There is no shared search space: a query runs
//! against a file that only ever received that user's text, so no filter bug can leak another
//! user's notes. The index is brought up to date lazily, at search time: files are re-read when
//! their size or modification time changed, and transcript rows newer than the last indexed one
//! are added.

use crate::db::StoreError;
use crate::homes::{list_beneath, read_beneath};
use moltmate_core::model::ConversationItem;
use moltmate_core::UserId;
use rusqlite::{params, Connection, OptionalExtension};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::path::{Path, PathBuf};

/// Largest file indexed; bigger memory files are indexed up to this size.
const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;
/// Bytes of changed files (and new transcript text) indexed per sync at most; the rest is
/// indexed by a later search. Bounds the work one search can cause, however many notes a user
/// rewrites.
pub const MAX_SYNC_BYTES: u64 = 16 * 1024 * 1024;
/// Index rows (FTS5 inserts) per sync at most. Rows, not bytes, are what an insert costs:
/// one-character lines once made 32 MiB into 16 M rows and one search into minutes of CPU.
pub const MAX_SYNC_ROWS: u64 = 32 * 1024;
/// Lines are indexed together in entries of up to this many bytes (whole lines; a longer line
/// is cut into pieces of [`MAX_ENTRY_BYTES`]), so the rows of a file follow its bytes, not its
/// line count: at most about `size / (CHUNK_BYTES / 2)` rows.
pub const CHUNK_BYTES: usize = 1024;
/// Longest single entry (a piece of one long line).
pub const MAX_ENTRY_BYTES: usize = 4096;
/// Rows of one file at most (a backstop; chunking already keeps a 2 MiB file near 4,000).
pub const MAX_ROWS_PER_FILE: u64 = 8 * 1024;
/// Rows of one user's index at most: what one query may have to rank. Past it nothing new is
/// indexed (as with the byte cap, [`MemoryIndex::is_full`]).
pub const MAX_INDEX_ROWS: u64 = 500_000;
/// SQLite virtual-machine steps between deadline checks.
const PROGRESS_STEPS: i32 = 10_000;
/// Version of the index's own schema (`PRAGMA user_version`). The index is a cache of the
/// user's files and transcripts: an index of another version is dropped and rebuilt lazily,
/// except version 2, which only lacks the `file_rows` side table and gets it in place.
const INDEX_VERSION: i64 = 3;
/// The version [`MemoryIndex::open`] migrates in place (adds `file_rows`).
const MIGRATED_VERSION: i64 = 2;

/// Deletes the index rows of one file, by rowid through `file_rows`.
fn delete_file_rows(tx: &rusqlite::Transaction<'_>, path: &str) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM entries WHERE rowid IN (SELECT entry FROM file_rows WHERE path = ?1)",
        params![path],
    )?;
    tx.execute("DELETE FROM file_rows WHERE path = ?1", params![path])?;
    Ok(())
}

/// One search result.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryHit {
    /// `MEMORY.md`, `memory/2026-11-22.md`, `family/FAMILY.md`, or `transcript` for a past
    /// conversation.
    pub source: String,
    /// Line number in the file (1-based), or the day (`YYYY-MM-DD`) of a transcript entry.
    pub location: String,
    pub snippet: String,
    /// BM25 score (lower is better, as SQLite reports it).
    pub score: f64,
}

/// A folder whose notes are searched, and the prefix its paths get in results.
#[derive(Debug, Clone)]
pub struct IndexedRoot<'a> {
    pub root: &'a Path,
    /// `""` for the user's home, `"family/"` for the family folder.
    pub prefix: &'a str,
    /// Top-level files to index.
    pub files: &'a [&'a str],
    /// Directories whose `*.md` files are indexed (not recursive).
    pub directories: &'a [&'a str],
}

/// The user's own search index.
pub struct MemoryIndex {
    connection: Connection,
    /// Nothing new is indexed past this size (`limits.memoryIndexMb`).
    max_bytes: Option<u64>,
    /// Something was not indexed because the index is full.
    full: bool,
    /// Past it, indexing stops (what is committed stays) and statements are interrupted.
    deadline: Option<std::time::Instant>,
}

/// What one sync may still do.
struct Allowance {
    bytes: u64,
    rows: u64,
}

/// `text` as index entries: (first line number, content), lines joined up to [`CHUNK_BYTES`],
/// long lines cut into [`MAX_ENTRY_BYTES`] pieces, blank lines skipped, at most `max_rows`.
fn chunks(text: &str, max_rows: u64) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut current: Option<(usize, String)> = None;
    let limit = usize::try_from(max_rows).unwrap_or(usize::MAX);
    for (index, line) in text.lines().enumerate() {
        if out.len() >= limit {
            return out;
        }
        let number = index + 1;
        if line.trim().is_empty() {
            // Kept inside an entry (so its line offsets stay the file's), never starting one.
            match &mut current {
                Some((_, chunk)) if chunk.len() + 1 + line.len() <= CHUNK_BYTES => {
                    chunk.push('\n');
                    chunk.push_str(line);
                }
                _ => {
                    if let Some(chunk) = current.take() {
                        out.push(chunk);
                    }
                }
            }
            continue;
        }
        if line.len() > CHUNK_BYTES {
            if let Some(chunk) = current.take() {
                out.push(chunk);
            }
            let mut rest = line;
            while !rest.is_empty() && out.len() < limit {
                let mut end = rest.len().min(MAX_ENTRY_BYTES);
                while !rest.is_char_boundary(end) {
                    end -= 1;
                }
                out.push((number, rest[..end].to_string()));
                rest = &rest[end..];
            }
            continue;
        }
        match &mut current {
            Some((_, chunk)) if chunk.len() + 1 + line.len() <= CHUNK_BYTES => {
                chunk.push('\n');
                chunk.push_str(line);
            }
            _ => {
                if let Some(chunk) = current.replace((number, line.to_string())) {
                    out.push(chunk);
                }
            }
        }
    }
    if let Some(chunk) = current {
        if out.len() < limit {
            out.push(chunk);
        }
    }
    out
}

impl MemoryIndex {
    /// Opens (creating) `index_dir/<user>.db`.
    pub fn open(index_dir: &Path, user: &UserId) -> Result<Self, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(index_dir)?;
        let path = index_dir.join(format!("{}.db", user.as_str()));
        let mut connection = Connection::open(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        connection.execute_batch("PRAGMA journal_mode = WAL;")?;
        let version: i64 = connection.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let migrate = version == MIGRATED_VERSION;
        if version != INDEX_VERSION && !migrate {
            // An older layout (one row per line, no row counts): rebuilt from the files and
            // transcripts, in bounded steps, by the next searches.
            connection.execute_batch(
                "DROP TABLE IF EXISTS entries; DROP TABLE IF EXISTS files; DROP TABLE IF EXISTS state; DROP TABLE IF EXISTS file_rows;",
            )?;
        }
        // `file_rows`: which index rows belong to which file, so a changed or vanished file's
        // rows are deleted by rowid. (`DELETE FROM entries WHERE source = ?` cannot use an
        // index on an FTS5 table: it scanned every row of the user's index per changed file.)
        let tx = connection.transaction()?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime INTEGER NOT NULL, rows INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE VIRTUAL TABLE IF NOT EXISTS entries USING fts5(source UNINDEXED, location UNINDEXED, content, tokenize = 'unicode61 remove_diacritics 2');
             CREATE TABLE IF NOT EXISTS file_rows (path TEXT NOT NULL, entry INTEGER NOT NULL, PRIMARY KEY (path, entry)) WITHOUT ROWID;",
        )?;
        if migrate {
            // Once per index, at most MAX_INDEX_ROWS rows (a linear pass): version 2 kept
            // only the FTS rows themselves.
            tx.execute(
                "INSERT OR IGNORE INTO file_rows (path, entry) SELECT source, rowid FROM entries WHERE source <> 'transcript'",
                [],
            )?;
        }
        // A random id of this index file: a search that read transcript rows for one file
        // adds them to no other (`/forget` deletes the file; see `sync_as`).
        tx.execute(
            "INSERT OR IGNORE INTO state (key, value) VALUES ('instance', ?1)",
            params![rand::random::<i64>()],
        )?;
        tx.execute_batch(&format!("PRAGMA user_version = {INDEX_VERSION};"))?;
        tx.commit()?;
        Ok(MemoryIndex {
            connection,
            max_bytes: None,
            full: false,
            deadline: None,
        })
    }

    /// Stops all work at `deadline`: indexing ends after the last committed file (the rest is
    /// left for a later search) and any statement still running — the search itself included
    /// — is interrupted by SQLite's progress handler and fails. So a search that is abandoned
    /// by its caller's deadline does not keep a core busy behind it.
    pub fn with_deadline(mut self, deadline: std::time::Instant) -> Self {
        self.deadline = Some(deadline);
        self.connection.progress_handler(
            PROGRESS_STEPS,
            Some(move || std::time::Instant::now() >= deadline),
        );
        self
    }

    fn expired(&self) -> bool {
        self.deadline
            .is_some_and(|deadline| std::time::Instant::now() >= deadline)
    }

    /// Rows in the index (files' and transcripts'), from the row counts kept with them.
    pub fn row_count(&self) -> Result<u64, StoreError> {
        let rows: i64 = self.connection.query_row(
            "SELECT COALESCE((SELECT SUM(rows) FROM files), 0)
                  + COALESCE((SELECT value FROM state WHERE key = 'transcript_rows'), 0)",
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(rows).unwrap_or(0))
    }

    /// Stops indexing new content once the index file holds `max_bytes`: searches still
    /// answer from what is indexed, and [`MemoryIndex::is_full`] says something was left out.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// Bytes of the index database (its pages; the write-ahead log is checkpointed into it).
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        let pages: i64 = self
            .connection
            .query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let page_size: i64 = self
            .connection
            .query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(u64::try_from(pages.saturating_mul(page_size)).unwrap_or(0))
    }

    /// Whether content was left unindexed because the index reached its size limit.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Whether `bytes` more of text in `rows` more rows still fit the index's caps (bytes:
    /// counted three times, FTS5's usual overhead, so one file cannot take the index far past
    /// its cap).
    fn has_room(&mut self, bytes: u64, rows: u64) -> Result<bool, StoreError> {
        let over_bytes = match self.max_bytes {
            Some(max) => self.size_bytes()?.saturating_add(bytes.saturating_mul(3)) > max,
            None => false,
        };
        if over_bytes || self.row_count()?.saturating_add(rows) > MAX_INDEX_ROWS {
            self.full = true;
            return Ok(false);
        }
        Ok(true)
    }

    /// Path of a user's index file (for deletion on user reset).
    pub fn path_for(index_dir: &Path, user: &UserId) -> PathBuf {
        index_dir.join(format!("{}.db", user.as_str()))
    }

    /// Re-indexes files that changed under the given roots; drops entries of files that are
    /// gone. Files are read beneath their root without following symlinks.
    pub fn sync_files(&mut self, roots: &[IndexedRoot<'_>]) -> Result<(), StoreError> {
        let mut allowance = Allowance {
            bytes: MAX_SYNC_BYTES,
            rows: MAX_SYNC_ROWS,
        };
        self.sync_files_within(roots, &mut allowance)
    }

    fn sync_files_within(
        &mut self,
        roots: &[IndexedRoot<'_>],
        allowance: &mut Allowance,
    ) -> Result<(), StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut complete = true;
        for root in roots {
            let mut candidates: Vec<String> = root.files.iter().map(|f| f.to_string()).collect();
            for dir in root.directories {
                for name in list_markdown_beneath(root.root, dir) {
                    candidates.push(format!("{dir}/{name}"));
                }
            }
            for relative in candidates {
                let Some((size, mtime)) = stat_beneath(root.root, &relative) else {
                    continue;
                };
                let source = format!("{}{relative}", root.prefix);
                seen.insert(source.clone());
                let known: Option<(i64, i64)> = self
                    .connection
                    .query_row(
                        "SELECT size, mtime FROM files WHERE path = ?1",
                        params![source],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                if known == Some((size, mtime)) {
                    continue;
                }
                let cost = u64::try_from(size).unwrap_or(0).min(MAX_FILE_BYTES);
                if self.expired() || cost > allowance.bytes || allowance.rows == 0 {
                    // Left as it was (the old entries of a changed file stay searchable), for
                    // a later search.
                    complete = false;
                    continue;
                }
                let text = match read_beneath(root.root, &relative, MAX_FILE_BYTES) {
                    Ok(Some((text, _))) => text,
                    _ => continue,
                };
                let entries = chunks(&text, MAX_ROWS_PER_FILE);
                let rows = entries.len() as u64;
                if rows > allowance.rows {
                    complete = false;
                    continue;
                }
                let old_rows: i64 = self
                    .connection
                    .query_row(
                        "SELECT rows FROM files WHERE path = ?1",
                        params![source],
                        |r| r.get(0),
                    )
                    .optional()?
                    .unwrap_or(0);
                let growth = rows.saturating_sub(u64::try_from(old_rows).unwrap_or(0));
                if !self.has_room(text.len() as u64, growth)? {
                    continue;
                }
                allowance.bytes = allowance.bytes.saturating_sub(text.len() as u64);
                allowance.rows = allowance.rows.saturating_sub(rows);
                let tx = self.connection.transaction()?;
                delete_file_rows(&tx, &source)?;
                {
                    let mut insert = tx.prepare_cached(
                        "INSERT INTO entries (source, location, content) VALUES (?1, ?2, ?3)",
                    )?;
                    let mut owned =
                        tx.prepare_cached("INSERT INTO file_rows (path, entry) VALUES (?1, ?2)")?;
                    for (number, content) in &entries {
                        insert.execute(params![source, number.to_string(), content])?;
                        owned.execute(params![source, tx.last_insert_rowid()])?;
                    }
                }
                tx.execute(
                    "INSERT INTO files (path, size, mtime, rows) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime = excluded.mtime, rows = excluded.rows",
                    params![source, size, mtime, rows as i64],
                )?;
                // Dropped (interrupted) when the deadline passed: nothing half-indexed stays.
                tx.commit()?;
            }
        }
        if !complete && self.expired() {
            return Ok(());
        }
        let known: Vec<String> = self
            .connection
            .prepare("SELECT path FROM files")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for path in known.into_iter().filter(|p| !seen.contains(p)) {
            let tx = self.connection.transaction()?;
            delete_file_rows(&tx, &path)?;
            tx.execute("DELETE FROM files WHERE path = ?1", params![path])?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The random id of this index file (made when the file was created).
    pub fn instance(&self) -> Result<i64, StoreError> {
        Ok(self
            .connection
            .query_row("SELECT value FROM state WHERE key = 'instance'", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0))
    }

    /// The id of the last transcript row indexed.
    pub fn last_transcript_id(&self) -> Result<i64, StoreError> {
        Ok(self
            .connection
            .query_row(
                "SELECT value FROM state WHERE key = 'transcript'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    /// Adds transcript rows `(row id, unix millis, item)`; only user and assistant text is
    /// indexed (tool output is noise and may hold file contents already indexed).
    /// Rows are taken in order while the sync's allowance (bytes, rows), the index's caps and
    /// the deadline last; the last one taken is remembered, the rest waits for a later search.
    pub fn add_transcript(
        &mut self,
        rows: &[(i64, i64, ConversationItem)],
    ) -> Result<(), StoreError> {
        let mut allowance = Allowance {
            bytes: MAX_SYNC_BYTES,
            rows: MAX_SYNC_ROWS,
        };
        self.add_transcript_within(rows, &mut allowance)
    }

    fn add_transcript_within(
        &mut self,
        rows: &[(i64, i64, ConversationItem)],
        allowance: &mut Allowance,
    ) -> Result<(), StoreError> {
        if rows.is_empty() || self.expired() {
            return Ok(());
        }
        let mut taken: Vec<(String, String)> = Vec::new();
        let mut last = None;
        let (mut bytes, mut count) = (0u64, 0u64);
        for (id, at, item) in rows {
            let text = match item {
                ConversationItem::User { text } => Some(("user", text)),
                ConversationItem::Assistant { text, .. } => Some(("assistant", text)),
                ConversationItem::ToolResult { .. } | ConversationItem::Image { .. } => None,
            }
            .filter(|(_, text)| !text.trim().is_empty());
            let Some((who, text)) = text else {
                last = Some(*id);
                continue;
            };
            let day = chrono::DateTime::from_timestamp_millis(*at)
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default();
            let location = format!("{day} ({who})");
            let pieces = chunks(text, MAX_ROWS_PER_FILE);
            let (more_bytes, more_rows) = (text.len() as u64, pieces.len() as u64);
            if bytes.saturating_add(more_bytes) > allowance.bytes
                || count.saturating_add(more_rows) > allowance.rows
            {
                break;
            }
            bytes += more_bytes;
            count += more_rows;
            taken.extend(
                pieces
                    .into_iter()
                    .map(|(_, piece)| (location.clone(), piece)),
            );
            last = Some(*id);
        }
        let Some(last) = last else {
            return Ok(());
        };
        if !self.has_room(bytes, count)? {
            // Not marked as indexed: once there is room again they are added.
            return Ok(());
        }
        allowance.bytes = allowance.bytes.saturating_sub(bytes);
        allowance.rows = allowance.rows.saturating_sub(count);
        let tx = self.connection.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO entries (source, location, content) VALUES ('transcript', ?1, ?2)",
            )?;
            for (location, content) in &taken {
                insert.execute(params![location, content])?;
            }
        }
        tx.execute(
            "INSERT INTO state (key, value) VALUES ('transcript', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![last],
        )?;
        tx.execute(
            "INSERT INTO state (key, value) VALUES ('transcript_rows', ?1)
             ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            params![count as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// [`MemoryIndex::sync`] for transcript rows read after `instance` (from
    /// [`MemoryIndex::instance`]) told where the index stood: when this is another index file
    /// — `/forget` deleted the one the rows were read for, and this one was made since — the
    /// rows are not added (they may be the forgotten conversation; the next search reads
    /// what is left). A `/forget` after this open deletes the file this connection writes,
    /// so nothing it adds can reach the next index either.
    pub fn sync_as(
        &mut self,
        instance: i64,
        roots: &[IndexedRoot<'_>],
        transcript: &[(i64, i64, ConversationItem)],
    ) -> Result<(), StoreError> {
        let transcript = if self.instance()? == instance {
            transcript
        } else {
            tracing::info!("the memory index was replaced (forgotten) during a search; its transcript rows are not indexed");
            &[]
        };
        self.sync(roots, transcript)
    }

    /// One search's indexing: changed files, then new transcript rows, sharing one allowance
    /// of [`MAX_SYNC_BYTES`] and [`MAX_SYNC_ROWS`] (and the deadline, if set).
    pub fn sync(
        &mut self,
        roots: &[IndexedRoot<'_>],
        transcript: &[(i64, i64, ConversationItem)],
    ) -> Result<(), StoreError> {
        let mut allowance = Allowance {
            bytes: MAX_SYNC_BYTES,
            rows: MAX_SYNC_ROWS,
        };
        self.sync_files_within(roots, &mut allowance)?;
        self.add_transcript_within(transcript, &mut allowance)
    }

    /// BM25-ranked search. The query is split into words and each is matched as a literal
    /// (FTS5 query syntax from the model is never interpreted).
    pub fn search(&self, query: &str, limit: usize) -> Result<Vec<MemoryHit>, StoreError> {
        let terms: Vec<String> = query
            .split(|c: char| !c.is_alphanumeric())
            .filter(|t| !t.is_empty())
            .take(16)
            .map(|t| format!("\"{t}\""))
            .collect();
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let expression = terms.join(" OR ");
        let mut statement = self.connection.prepare(&format!(
            "SELECT source, location, snippet(entries, 2, '«', '»', '…', 16), bm25(entries), content FROM entries
             WHERE entries MATCH ?1 ORDER BY bm25(entries) LIMIT {limit}"
        ))?;
        let words: Vec<String> = query
            .split(|c: char| !c.is_alphanumeric())
            .filter(|t| !t.is_empty())
            .take(16)
            .map(str::to_lowercase)
            .collect();
        let rows = statement.query_map(params![expression], |r| {
            let source: String = r.get(0)?;
            let location: String = r.get(1)?;
            let content: String = r.get(4)?;
            Ok(MemoryHit {
                location: line_of_match(&source, location, &content, &words),
                source,
                snippet: r.get(2)?,
                score: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// The line of a file hit: entries hold several lines and store the first one's number, so the
/// number is moved to the first line of the entry that holds a query word (case-insensitive;
/// the entry's first line when none is found, e.g. after diacritics folding).
fn line_of_match(source: &str, location: String, content: &str, words: &[String]) -> String {
    let Ok(first) = location.parse::<usize>() else {
        return location;
    };
    if source == "transcript" {
        return location;
    }
    content
        .lines()
        .position(|line| {
            let line = line.to_lowercase();
            words.iter().any(|w| line.contains(w.as_str()))
        })
        .map(|offset| (first + offset).to_string())
        .unwrap_or(location)
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

fn stat_beneath(root: &Path, relative: &str) -> Option<(i64, i64)> {
    let dir = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let fd = rustix::fs::openat2(
        &dir,
        relative,
        OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        BENEATH,
    )
    .ok()?;
    let stat = rustix::fs::fstat(&fd).ok()?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return None;
    }
    Some((
        stat.st_size,
        stat.st_mtime * 1_000_000_000 + stat.st_mtime_nsec as i64,
    ))
}

/// Directory entries read at most per indexed directory: a `memory/` of millions of entries
/// costs bounded work (the first entries the kernel returns are indexed, the rest ignored).
pub const MAX_DIRECTORY_SCAN: usize = 10_000;
/// Notes indexed at most per directory.
const MAX_NOTES: usize = 2_000;

fn list_markdown_beneath(root: &Path, directory: &str) -> Vec<String> {
    let Ok(Some(listing)) = list_beneath(root, directory, MAX_DIRECTORY_SCAN) else {
        return Vec::new();
    };
    let mut names: Vec<String> = listing
        .entries
        .into_iter()
        .map(|e| e.name)
        .filter(|n| n.ends_with(".md") && !n.starts_with('.'))
        .collect();
    names.truncate(MAX_NOTES);
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::homes::{write_beneath, Homes};

    #[test]
    fn search_finds_own_notes_with_file_and_line_and_ignores_query_syntax() {
        let base = tempfile::tempdir().unwrap();
        let homes = Homes::new(base.path());
        let user = UserId::new("alice").unwrap();
        let home = homes
            .ensure(
                &user,
                moltmate_core::sandbox::SandboxIds::same(2_000_000_000),
            )
            .unwrap();
        write_beneath(
            home.root(),
            "MEMORY.md",
            b"# Memory\n\nEmma is allergic to peanuts.\n",
        )
        .unwrap();
        write_beneath(
            home.root(),
            "memory/2026-11-22.md",
            b"Bought a blue bicycle for Emma.\n",
        )
        .unwrap();
        let mut index = MemoryIndex::open(&base.path().join("index"), &user).unwrap();
        let roots = [IndexedRoot {
            root: home.root(),
            prefix: "",
            files: &["MEMORY.md", "USER.md"],
            directories: &["memory"],
        }];
        index.sync_files(&roots).unwrap();
        let hits = index.search("peanuts", 5).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(
            (hits[0].source.as_str(), hits[0].location.as_str()),
            ("MEMORY.md", "3")
        );
        assert!(hits[0].snippet.contains("«peanuts»"));
        assert_eq!(
            index.search("bicycle \" OR NEAR(", 5).unwrap()[0].source,
            "memory/2026-11-22.md"
        );

        // A changed file is re-indexed; a deleted one disappears.
        write_beneath(home.root(), "MEMORY.md", b"Emma loves cashews.\n").unwrap();
        std::fs::remove_file(home.root().join("memory/2026-11-22.md")).unwrap();
        index.sync_files(&roots).unwrap();
        assert!(index.search("peanuts bicycle", 5).unwrap().is_empty());
        assert_eq!(index.search("cashews", 5).unwrap().len(), 1);
    }

    #[test]
    fn a_full_index_keeps_answering_and_indexes_nothing_new() {
        let base = tempfile::tempdir().unwrap();
        let homes = Homes::new(base.path());
        let user = UserId::new("alice").unwrap();
        let home = homes
            .ensure(
                &user,
                moltmate_core::sandbox::SandboxIds::same(2_000_000_000),
            )
            .unwrap();
        write_beneath(home.root(), "MEMORY.md", b"Emma likes peanuts.\n").unwrap();
        let roots = [IndexedRoot {
            root: home.root(),
            prefix: "",
            files: &["MEMORY.md"],
            directories: &["memory"],
        }];
        let mut index = MemoryIndex::open(&base.path().join("index"), &user).unwrap();
        index.sync_files(&roots).unwrap();
        let size = index.size_bytes().unwrap();
        assert!(size > 0);
        let mut index = MemoryIndex::open(&base.path().join("index"), &user)
            .unwrap()
            .with_max_bytes(size);
        let many: String = (0..2000)
            .map(|n| format!("line {n} about bicycles\n"))
            .collect();
        write_beneath(home.root(), "memory/2026-01-01.md", many.as_bytes()).unwrap();
        index.sync_files(&roots).unwrap();
        index
            .add_transcript(&[(
                1,
                0,
                ConversationItem::User {
                    text: "bicycles".into(),
                },
            )])
            .unwrap();
        assert!(index.is_full());
        assert_eq!(index.size_bytes().unwrap(), size);
        assert_eq!(
            index.last_transcript_id().unwrap(),
            0,
            "not marked as indexed"
        );
        assert!(index.search("bicycles", 5).unwrap().is_empty());
        assert_eq!(index.search("peanuts", 5).unwrap().len(), 1);
    }

    /// Distinct words per row, so every row is its own entry.
    fn note(rows: usize, tag: &str) -> String {
        (0..rows)
            .map(|i| format!("{tag} line {i} {}\n", "x".repeat(CHUNK_BYTES / 2 + 64)))
            .collect()
    }

    fn sync_dir(index: &mut MemoryIndex, root: &Path) {
        let roots = [IndexedRoot {
            root,
            prefix: "",
            files: &["MEMORY.md"],
            directories: &["memory"],
        }];
        // Several syncs: each indexes at most MAX_SYNC_ROWS rows.
        for _ in 0..8 {
            index.sync_files(&roots).unwrap();
        }
    }

    /// VM steps of deleting `path`'s rows the old way and the new way (rolled back).
    fn delete_steps(index: &mut MemoryIndex, path: &str) -> (i32, i32) {
        use rusqlite::StatementStatus;
        let tx = index.connection.transaction().unwrap();
        let old = {
            let mut stmt = tx
                .prepare("SELECT count(*) FROM entries WHERE source = ?1")
                .unwrap();
            let _: i64 = stmt.query_row(params![path], |r| r.get(0)).unwrap();
            stmt.get_status(StatementStatus::VmStep)
        };
        let new = {
            let mut stmt = tx
                .prepare("DELETE FROM entries WHERE rowid IN (SELECT entry FROM file_rows WHERE path = ?1)")
                .unwrap();
            stmt.execute(params![path]).unwrap();
            stmt.get_status(StatementStatus::VmStep)
        };
        tx.rollback().unwrap();
        (old, new)
    }

    #[test]
    fn memory_index_deletes_scan_the_table_no_more() {
        let base = tempfile::tempdir().unwrap();
        let home = base.path().join("home");
        std::fs::create_dir_all(home.join("memory")).unwrap();
        // 20,000 rows of other notes, and one small note that changes.
        for i in 0..10 {
            std::fs::write(home.join(format!("memory/big-{i}.md")), note(2_000, "big")).unwrap();
        }
        std::fs::write(home.join("MEMORY.md"), note(3, "kiwi")).unwrap();
        let user = UserId::new("alice").unwrap();
        let mut index = MemoryIndex::open(&base.path().join("index"), &user).unwrap();
        sync_dir(&mut index, &home);
        assert_eq!(index.row_count().unwrap(), 20_003);
        let (scan, by_rowid) = delete_steps(&mut index, "MEMORY.md");
        eprintln!("deleting a 3-row file from 20,003 rows: {by_rowid} VM steps by rowid, {scan} by scanning");
        assert!(
            by_rowid * 100 < scan,
            "deleting 3 rows took {by_rowid} steps (a scan takes {scan})"
        );
        // A changed and a vanished file lose exactly their rows.
        std::fs::write(home.join("MEMORY.md"), note(2, "mango")).unwrap();
        std::fs::remove_file(home.join("memory/big-0.md")).unwrap();
        sync_dir(&mut index, &home);
        assert!(index.search("kiwi", 5).unwrap().is_empty());
        assert_eq!(index.search("mango", 5).unwrap().len(), 2);
        let count =
            |sql: &str| -> i64 { index.connection.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(count("SELECT count(*) FROM entries"), 18_002);
        assert_eq!(count("SELECT count(*) FROM file_rows"), 18_002);
        assert_eq!(index.row_count().unwrap(), 18_002);
    }

    #[test]
    fn memory_index_deletes_scan_the_table_an_index_of_version_2_is_migrated_in_place() {
        let base = tempfile::tempdir().unwrap();
        let home = base.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("MEMORY.md"), note(3, "kiwi")).unwrap();
        let user = UserId::new("alice").unwrap();
        let dir = base.path().join("index");
        {
            let mut index = MemoryIndex::open(&dir, &user).unwrap();
            sync_dir(&mut index, &home);
            index
                .add_transcript(&[(
                    1,
                    0,
                    ConversationItem::User {
                        text: "papaya talk".into(),
                    },
                )])
                .unwrap();
            // As version 2 left it: no side table.
            index
                .connection
                .execute_batch("DROP TABLE file_rows; PRAGMA user_version = 2;")
                .unwrap();
        }
        let mut index = MemoryIndex::open(&dir, &user).unwrap();
        let count = |index: &MemoryIndex, sql: &str| -> i64 {
            index.connection.query_row(sql, [], |r| r.get(0)).unwrap()
        };
        assert_eq!(count(&index, "SELECT count(*) FROM file_rows"), 3);
        assert_eq!(count(&index, "PRAGMA user_version"), INDEX_VERSION);
        // Nothing rebuilt: the transcript stays indexed once.
        assert_eq!(index.last_transcript_id().unwrap(), 1);
        std::fs::write(home.join("MEMORY.md"), note(1, "mango")).unwrap();
        sync_dir(&mut index, &home);
        assert!(index.search("kiwi", 5).unwrap().is_empty());
        assert_eq!(index.search("papaya", 5).unwrap().len(), 1);
        assert_eq!(count(&index, "SELECT count(*) FROM entries"), 2);
    }

    #[test]
    fn forget_race_rows_read_for_a_forgotten_index_are_not_indexed_into_the_next() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("index");
        let user = UserId::new("alice").unwrap();
        let forgotten = vec![(
            7,
            0,
            ConversationItem::User {
                text: "the forgotten secret".into(),
            },
        )];
        // The search opened the index and read the rows after its last one...
        let instance = MemoryIndex::open(&dir, &user).unwrap().instance().unwrap();
        // ...then `/forget` deleted the index (and the rows from the store)...
        std::fs::remove_file(MemoryIndex::path_for(&dir, &user)).unwrap();
        // ...and the search's indexing opens a fresh one.
        let mut index = MemoryIndex::open(&dir, &user).unwrap();
        assert_ne!(index.instance().unwrap(), instance);
        index.sync_as(instance, &[], &forgotten).unwrap();
        assert!(index.search("secret", 5).unwrap().is_empty());
        assert_eq!(index.last_transcript_id().unwrap(), 0);
        // Without a forget in between, the same call indexes them.
        let same = index.instance().unwrap();
        index.sync_as(same, &[], &forgotten).unwrap();
        assert_eq!(index.search("secret", 5).unwrap().len(), 1);
    }

    #[test]
    fn transcripts_are_indexed_once() {
        let base = tempfile::tempdir().unwrap();
        let user = UserId::new("alice").unwrap();
        let mut index = MemoryIndex::open(base.path(), &user).unwrap();
        let rows = vec![
            (
                1,
                0,
                ConversationItem::User {
                    text: "my dentist is Dr. Gruber".into(),
                },
            ),
            (
                2,
                0,
                ConversationItem::ToolResult {
                    call_id: "x".into(),
                    content: "Gruber".into(),
                    is_error: false,
                },
            ),
        ];
        index.add_transcript(&rows).unwrap();
        assert_eq!(index.last_transcript_id().unwrap(), 2);
        let hits = index.search("gruber", 5).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].source, "transcript");
    }

    #[test]
    fn index_sync_skips_fifos_and_reads_a_bounded_part_of_a_huge_memory_directory() {
        let base = tempfile::tempdir().unwrap();
        let homes = Homes::new(base.path());
        let user = UserId::new("alice").unwrap();
        let home = homes
            .ensure(
                &user,
                moltmate_core::sandbox::SandboxIds::same(2_000_000_000),
            )
            .unwrap();
        for name in ["MEMORY.md", "memory/0-fifo.md"] {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                home.root().join(name),
                rustix::fs::FileType::Fifo,
                Mode::from_raw_mode(0o600),
                0,
            )
            .unwrap();
        }
        for i in 0..(MAX_DIRECTORY_SCAN * 2) {
            std::fs::write(home.root().join(format!("memory/{i:06}.md")), "marmalade\n").unwrap();
        }
        let root = home.root().to_path_buf();
        let index_dir = base.path().join("index");
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut index = MemoryIndex::open(&index_dir, &user).unwrap();
            index
                .sync_files(&[IndexedRoot {
                    root: &root,
                    prefix: "",
                    files: &["MEMORY.md", "USER.md"],
                    directories: &["memory"],
                }])
                .unwrap();
            let _ = send.send(index.search("marmalade", 100_000).unwrap().len());
        });
        let hits = receive
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("indexing blocked on a FIFO");
        assert!(hits > 0 && hits <= MAX_NOTES, "{hits} notes indexed");
    }
}
