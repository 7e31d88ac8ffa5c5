//! A worker's history cache trusts `sessions.history_changes`, which triggers bump on every
//! delete and update of a transcript row; rows may join a session only by a plain insert with
//! a new `AUTOINCREMENT` id (above every row the session has). `INSERT OR REPLACE` (its delete
//! fires no trigger) or an insert with an explicit id (a row below the newest) would change a
//! cached session unseen, so the store's code must not write the transcript that way.

#[test]
fn the_transcript_is_only_appended_to_with_new_ids() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (number, line) in text.lines().enumerate() {
            let upper = line.to_ascii_uppercase();
            let Some(at) = upper.find("INTO TRANSCRIPT") else {
                continue;
            };
            let replaces = upper.contains("REPLACE");
            // The column list of the insert: it must not name `id`.
            let columns = upper[at..]
                .split_once('(')
                .and_then(|(_, rest)| rest.split_once(')'))
                .map(|(columns, _)| columns.to_string())
                .unwrap_or_default();
            let explicit_id = columns.split(',').any(|c| c.trim() == "ID");
            if replaces || explicit_id {
                found.push(format!(
                    "{}:{}: {}",
                    path.display(),
                    number + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "transcript written around history_changes: {found:?}"
    );
}
