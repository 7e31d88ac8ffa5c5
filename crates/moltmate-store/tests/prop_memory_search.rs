//! Property test of `memory_search`'s query parsing (`MemoryIndex::search`): the model's query
//! text goes into an FTS5 `MATCH`, whose own syntax (quotes, `NEAR`, `*`, `^`, column filters,
//! `AND`/`OR`/`NOT`) must never reach SQLite as syntax. Any query text searches, never fails,
//! and a plain word of an indexed note is found.

use moltmate_core::UserId;
use moltmate_store::memory_index::{IndexedRoot, MemoryIndex};
use moltmate_testkit::prop::config as prop_config;
use proptest::prelude::*;
use std::sync::{Mutex, OnceLock};

fn query() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        "[a-z]{1,8}",
        prop::sample::select(vec![
            "\"", "'", "*", "^", "(", ")", ":", "-", "+", "NEAR", "NEAR(", "AND", "OR", "NOT",
            "content:", "source:", "{", "}", "\0", "«", "»", "%", "_", "\\", ";", "--", "/*",
        ])
        .prop_map(String::from),
        any::<String>(),
    ];
    prop::collection::vec(token, 0..12).prop_map(|t| t.join(" "))
}

/// One index for the whole run (opening a fresh database per case costs more than the case);
/// each case replaces the note file of the case before.
struct World {
    dir: tempfile::TempDir,
    index: MemoryIndex,
    cases: u64,
}

fn world() -> &'static Mutex<World> {
    static WORLD: OnceLock<Mutex<World>> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("home/memory")).unwrap();
        let user = UserId::new("anna").unwrap();
        let index = MemoryIndex::open(&dir.path().join("index"), &user).unwrap();
        Mutex::new(World {
            dir,
            index,
            cases: 0,
        })
    })
}

proptest! {
    #![proptest_config(prop_config(64))]

    #[test]
    fn prop_memory_search_accepts_any_query_text(
        notes in prop::collection::vec(prop_oneof!["[a-z ]{0,30}", any::<String>()], 0..6),
        query in query(),
        word in "[a-z]{3,8}",
    ) {
        let mut world = world().lock().unwrap_or_else(|e| e.into_inner());
        world.cases += 1;
        let home = world.dir.path().join("home");
        // The previous case's note goes (and out of the index), so each case costs the same.
        let _ = std::fs::remove_file(home.join(format!("memory/case-{}.md", world.cases - 1)));
        let mut memory = notes.join("\n");
        memory.push_str(&format!("\nremember {word} please\n"));
        std::fs::write(home.join(format!("memory/case-{}.md", world.cases)), &memory).unwrap();
        world
            .index
            .sync_files(&[IndexedRoot { root: &home, prefix: "", files: &[], directories: &["memory"] }])
            .unwrap();
        let hits = world.index.search(&query, 10);
        prop_assert!(hits.is_ok(), "{query:?} failed: {hits:?}");
        let hits = world.index.search(&format!("{query} {word}"), 100);
        prop_assert!(hits.is_ok(), "{query:?} failed: {hits:?}");
        let found = world.index.search(&word, 100).unwrap_or_default();
        prop_assert!(!found.is_empty(), "{word:?} is in a note but was not found");
    }
}
