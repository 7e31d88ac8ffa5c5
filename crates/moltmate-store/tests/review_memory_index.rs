//! Review findings (issue 9, §3): what one `memory_search` can cost. Ignored (it measures);
//! run with `--ignored --nocapture` to see the numbers.

use moltmate_core::UserId;
use moltmate_store::memory_index::{IndexedRoot, MemoryIndex};
use std::time::Instant;

/// `MAX_SYNC_BYTES` bounds the *bytes* re-indexed per search (32 MiB), but every non-empty line
/// is one FTS5 row insert, so notes of one-character lines cost 16 M inserts in one search (the
/// index cap is checked per file, so this one search also takes the index past its 256 MiB
/// cap). Measured here (debug build, dependencies at opt-level 1): ~160 s of one core for one
/// search, far past `memory_search`'s 60 s deadline — the abandoned thread keeps going (SQLite
/// cannot be cancelled from outside). `/forget` deletes the index, so `/forget` + one search
/// repeats it at will; none of it counts against any budget (exec seconds are the only CPU
/// budget), and the notes are written with `write` (16 MiB per call) or one `exec`.
#[test]
#[ignore = "review: one memory_search can cost minutes of CPU (16 M FTS rows from 32 MiB of one-character lines), unbudgeted and outliving its 60 s deadline"]
fn review_one_search_reindexes_sixteen_million_rows() {
    let base = tempfile::tempdir().unwrap();
    let home = base.path().join("home");
    std::fs::create_dir_all(home.join("memory")).unwrap();
    let note = "a\n".repeat(1024 * 1024); // 2 MiB, 1 M lines
    for i in 0..16 {
        std::fs::write(home.join(format!("memory/{i:02}.md")), &note).unwrap();
    }
    let user = UserId::new("anna").unwrap();
    let mut index = MemoryIndex::open(&base.path().join("index"), &user)
        .unwrap()
        .with_max_bytes(256 * 1024 * 1024);
    let roots = [IndexedRoot {
        root: &home,
        prefix: "",
        files: &["MEMORY.md"],
        directories: &["memory"],
    }];
    let started = Instant::now();
    index.sync_files(&roots).unwrap();
    let took = started.elapsed();
    println!(
        "one sync: {took:?}, index {} MiB",
        index.size_bytes().unwrap() / (1024 * 1024)
    );
    assert!(
        took.as_secs() < 10,
        "one search of one user took {took:?} of a core"
    );
}
