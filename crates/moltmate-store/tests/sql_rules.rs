//! Rules the store's SQL keeps, checked against its source, and the SQLite behaviour behind
//! them.
//!
//! * **No statement binds its `LIMIT`.** SQLite treats a LIMIT parameter as one that may change
//!   the query plan, so binding it (even to the same value) expires the statement, and a cached
//!   statement is compiled again on every run. On the hot path (a user's pending inbox, read
//!   before every turn) that was ~3 % of a message's CPU. Limits are integers chosen by the
//!   gateway, never text from a user, and go into the SQL text.
//! * **The transcript is only appended to, with new ids.** A worker's history cache trusts
//!   `sessions.history_changes`, which triggers bump on every delete and update of a transcript
//!   row; rows may join a session only by a plain insert with a new `AUTOINCREMENT` id (above
//!   every row the session has). `INSERT OR REPLACE` (its delete fires no trigger) or an insert
//!   with an explicit id (a row below the newest) would change a cached session unseen.

use rusqlite::{Connection, StatementStatus, ToSql};

/// Every `.rs` file of the store's `src`, with its path.
fn store_sources() -> Vec<(std::path::PathBuf, String)> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            files.push((path, text));
        }
    }
    assert!(!files.is_empty(), "no sources under {}", src.display());
    files
}

/// Runs `sql` five times from the statement cache; how often SQLite compiled it again.
fn reprepares(c: &Connection, sql: &str, params: &[&dyn ToSql]) -> i32 {
    for _ in 0..5 {
        let mut statement = c.prepare_cached(sql).unwrap();
        let rows: Vec<i64> = statement
            .query_map(params, |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows.len(), 2);
    }
    c.prepare_cached(sql)
        .unwrap()
        .get_status(StatementStatus::RePrepare)
}

#[test]
fn a_bound_limit_recompiles_a_cached_statement_on_every_run() {
    let c = Connection::open_in_memory().unwrap();
    c.execute_batch(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, user TEXT NOT NULL);
         INSERT INTO t (user) VALUES ('a'), ('a'), ('b');",
    )
    .unwrap();
    let bound = reprepares(
        &c,
        "SELECT id FROM t WHERE user = ?1 ORDER BY id LIMIT ?2",
        &[&"a", &10],
    );
    let literal = reprepares(
        &c,
        "SELECT id FROM t WHERE user = ?1 ORDER BY id LIMIT 10",
        &[&"a"],
    );
    assert!(
        bound >= 4,
        "SQLite no longer re-prepares on a bound LIMIT ({bound})"
    );
    assert_eq!(literal, 0);
}

#[test]
fn no_store_statement_binds_its_limit() {
    let mut found = Vec::new();
    for (path, text) in store_sources() {
        for (number, line) in text.lines().enumerate() {
            if line.contains("LIMIT ?") {
                found.push(format!("{}:{}", path.display(), number + 1));
            }
        }
    }
    assert!(found.is_empty(), "LIMIT bound as a parameter: {found:?}");
}

/// Byte offsets in `text` of transcript inserts that go around `history_changes`: `OR REPLACE`,
/// or a column list naming `id` (the list may span lines).
fn inserts_around_history_changes(text: &str) -> Vec<usize> {
    let upper = text.to_ascii_uppercase();
    let mut found = Vec::new();
    for (at, _) in upper.match_indices("INTO TRANSCRIPT") {
        // The statement starts after the string's opening quote.
        let start = upper[..at].rfind('"').map_or(0, |quote| quote + 1);
        let replaces = upper[start..at].contains("REPLACE");
        let columns = upper[at..]
            .split_once('(')
            .and_then(|(_, rest)| rest.split_once(')'))
            .map_or("", |(columns, _)| columns);
        let explicit_id = columns.split(',').any(|c| c.trim() == "ID");
        if replaces || explicit_id {
            found.push(at);
        }
    }
    found
}

#[test]
fn the_transcript_is_only_appended_to_with_new_ids() {
    // The check itself finds what it must.
    for bad in [
        r#""INSERT OR REPLACE INTO transcript (session_id, item) VALUES (?1, ?2)""#,
        "\"REPLACE INTO transcript (session_id) VALUES (?1)\"",
        "\"INSERT INTO transcript (\n    id, session_id) VALUES (?1, ?2)\"",
    ] {
        assert_eq!(inserts_around_history_changes(bad).len(), 1, "{bad}");
    }
    assert!(inserts_around_history_changes(
        r#""INSERT INTO transcript (session_id, user_id, item, created_at) VALUES (?1, ?2, ?3, ?4)""#
    )
    .is_empty());
    let mut found = Vec::new();
    for (path, text) in store_sources() {
        for at in inserts_around_history_changes(&text) {
            let line = text[..at].lines().count();
            found.push(format!("{}:{line}", path.display()));
        }
    }
    assert!(
        found.is_empty(),
        "transcript written around history_changes: {found:?}"
    );
}
