//! Regressions (issue 9 review, §3): what one `memory_search` could cost.

use moltmate_core::model::ConversationItem;
use moltmate_core::UserId;
use moltmate_store::memory_index::{
    IndexedRoot, MemoryIndex, MAX_ROWS_PER_FILE, MAX_SYNC_BYTES, MAX_SYNC_ROWS,
};

fn entries(index_dir: &std::path::Path) -> i64 {
    rusqlite::Connection::open(index_dir.join("anna.db"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM entries", [], |r| r.get(0))
        .unwrap()
}

/// Regression: `MAX_SYNC_BYTES` bounded the *bytes* re-indexed per search (32 MiB), but every
/// non-empty line was one FTS5 row insert, so notes of one-character lines cost 16 M inserts
/// in one search (~160 s of one core, far past `memory_search`'s 60 s deadline, and the
/// abandoned thread kept going). Now lines are indexed in entries of up to `CHUNK_BYTES`, one
/// sync inserts at most `MAX_SYNC_ROWS` rows and `MAX_SYNC_BYTES` of text, a file at most
/// `MAX_ROWS_PER_FILE`, a user's index at most `MAX_INDEX_ROWS`, and the rest is indexed by
/// later searches. (Counted in rows, not timed.)
#[test]
fn one_search_indexes_a_bounded_number_of_rows() {
    let base = tempfile::tempdir().unwrap();
    let home = base.path().join("home");
    std::fs::create_dir_all(home.join("memory")).unwrap();
    let note = "a\n".repeat(1024 * 1024); // 2 MiB, 1 M lines
    for i in 0..16 {
        std::fs::write(home.join(format!("memory/{i:02}.md")), &note).unwrap();
    }
    // The worst line length for entries: two lines never fit one entry.
    let wide = format!("{}\n", "b".repeat(513)).repeat(4000); // 2 MiB
    std::fs::write(home.join("MEMORY.md"), &wide).unwrap();
    let user = UserId::new("anna").unwrap();
    let index_dir = base.path().join("index");
    let mut index = MemoryIndex::open(&index_dir, &user)
        .unwrap()
        .with_max_bytes(256 * 1024 * 1024);
    let roots = [IndexedRoot {
        root: &home,
        prefix: "",
        files: &["MEMORY.md"],
        directories: &["memory"],
    }];
    index.sync_files(&roots).unwrap();
    let first = entries(&index_dir);
    assert!(first > 0, "something was indexed");
    assert!(
        first as u64 <= MAX_SYNC_ROWS,
        "one sync inserted {first} rows (cap {MAX_SYNC_ROWS})"
    );
    assert_eq!(index.row_count().unwrap(), first as u64, "row counts kept");
    // Later searches index the rest, each within the same bounds, and then nothing more.
    let mut previous = first;
    for _ in 0..8 {
        index.sync_files(&roots).unwrap();
        let now = entries(&index_dir);
        assert!((now - previous) as u64 <= MAX_SYNC_ROWS);
        previous = now;
    }
    // 17 files of 2 MiB, each within its row cap.
    assert!(previous as u64 <= 17 * MAX_ROWS_PER_FILE, "{previous} rows");
    assert!(
        index.size_bytes().unwrap() < 17 * 3 * 2 * 1024 * 1024,
        "index of {} bytes",
        index.size_bytes().unwrap()
    );
    let hits = index.search("a", 5).unwrap();
    assert!(!hits.is_empty());
    let _ = MAX_SYNC_BYTES;
    // The query itself is interrupted past the deadline (ranking ~100k rows takes far more
    // than one progress interval).
    let late = MemoryIndex::open(&index_dir, &user)
        .unwrap()
        .with_deadline(std::time::Instant::now());
    let interrupted = late.search("a", 5);
    assert!(
        matches!(&interrupted, Err(e) if e.is_interrupted()),
        "{interrupted:?}"
    );
}

/// Regression: the search's deadline was only the caller's: the abandoned blocking thread kept
/// indexing. Now past `with_deadline` nothing more is indexed (what was committed stays), and
/// statements still running are interrupted.
#[test]
fn past_its_deadline_a_search_indexes_nothing() {
    let base = tempfile::tempdir().unwrap();
    let home = base.path().join("home");
    std::fs::create_dir_all(home.join("memory")).unwrap();
    std::fs::write(home.join("MEMORY.md"), "Emma likes peanuts.\n").unwrap();
    let user = UserId::new("anna").unwrap();
    let index_dir = base.path().join("index");
    let mut index = MemoryIndex::open(&index_dir, &user)
        .unwrap()
        .with_deadline(std::time::Instant::now());
    let roots = [IndexedRoot {
        root: &home,
        prefix: "",
        files: &["MEMORY.md"],
        directories: &["memory"],
    }];
    index
        .sync(
            &roots,
            &[(
                1,
                0,
                ConversationItem::User {
                    text: "peanuts".into(),
                },
            )],
        )
        .unwrap();
    assert_eq!(entries(&index_dir), 0);
    assert_eq!(index.last_transcript_id().unwrap(), 0, "left for later");
    // Without the deadline the next search catches up.
    let mut index = MemoryIndex::open(&index_dir, &user).unwrap();
    index
        .sync(
            &roots,
            &[(
                1,
                0,
                ConversationItem::User {
                    text: "peanuts".into(),
                },
            )],
        )
        .unwrap();
    assert_eq!(index.search("peanuts", 5).unwrap().len(), 2);
}

/// Entries hold several lines; a hit still names the line that matched.
#[test]
fn a_hit_names_the_line_of_its_match() {
    let base = tempfile::tempdir().unwrap();
    let home = base.path().join("home");
    std::fs::create_dir_all(home.join("memory")).unwrap();
    std::fs::write(
        home.join("MEMORY.md"),
        "# Memory\n\nfirst\n\n\nsecond line\nEmma loves Cashews.\nlast\n",
    )
    .unwrap();
    let user = UserId::new("anna").unwrap();
    let mut index = MemoryIndex::open(&base.path().join("index"), &user).unwrap();
    index
        .sync_files(&[IndexedRoot {
            root: &home,
            prefix: "",
            files: &["MEMORY.md"],
            directories: &["memory"],
        }])
        .unwrap();
    let hits = index.search("cashews", 5).unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(
        (hits[0].source.as_str(), hits[0].location.as_str()),
        ("MEMORY.md", "7")
    );
}
