//! `LIMIT ?` as a bound parameter made SQLite compile the statement again on every run: SQLite
//! treats a LIMIT parameter as one that may change the query plan, so binding it (even to the
//! same value) expires the statement, and a cached statement is re-prepared each time. On the
//! hot path (a user's pending inbox, read before every turn) that was ~3 % of a message's CPU.
//! The store writes its limits into the SQL text instead (they are integers chosen by the
//! gateway, never text from a user).

use rusqlite::{Connection, StatementStatus};

fn table() -> Connection {
    let c = Connection::open_in_memory().unwrap();
    c.execute_batch(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, user TEXT NOT NULL);
         INSERT INTO t (user) VALUES ('a'), ('a'), ('b');",
    )
    .unwrap();
    c
}

fn run(c: &Connection, sql: &str, limit: Option<i64>) -> i32 {
    for _ in 0..5 {
        let mut statement = c.prepare_cached(sql).unwrap();
        let rows: Vec<i64> = match limit {
            Some(limit) => statement
                .query_map(rusqlite::params!["a", limit], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap(),
            None => statement
                .query_map(rusqlite::params!["a"], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap(),
        };
        assert_eq!(rows.len(), 2);
    }
    c.prepare_cached(sql)
        .unwrap()
        .get_status(StatementStatus::RePrepare)
}

#[test]
fn a_bound_limit_recompiles_a_cached_statement_on_every_run() {
    let c = table();
    let bound = run(
        &c,
        "SELECT id FROM t WHERE user = ?1 ORDER BY id LIMIT ?2",
        Some(10),
    );
    let literal = run(
        &c,
        "SELECT id FROM t WHERE user = ?1 ORDER BY id LIMIT 10",
        None,
    );
    assert!(
        bound >= 4,
        "SQLite no longer re-prepares on a bound LIMIT ({bound})"
    );
    assert_eq!(literal, 0);
}

#[test]
fn no_store_statement_binds_its_limit() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (number, line) in text.lines().enumerate() {
            if line.contains("LIMIT ?") {
                found.push(format!("{}:{}", path.display(), number + 1));
            }
        }
    }
    assert!(found.is_empty(), "LIMIT bound as a parameter: {found:?}");
}
