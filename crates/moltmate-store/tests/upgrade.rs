//! Upgrades: a database made by the previous release (`fixtures/v3.db`, schema 3 as of commit
//! b8bf992, made from `fixtures/v3.sql`) opens with this code, is migrated forward, and reads
//! back whole; a database from a newer moltmate is refused with a clear error.

use moltmate_core::{ChannelKind, Identity, PeerId, UserId};
use moltmate_store::{Store, StoreError, SCHEMA_VERSION};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Remakes `fixtures/v3.db` from `fixtures/v3.sql`:
/// `cargo test -p moltmate-store --test upgrade -- --ignored regenerate_v3_fixture`.
#[test]
#[ignore = "regenerates the committed fixture"]
fn regenerate_v3_fixture() {
    let path = fixture("v3.db");
    let _ = std::fs::remove_file(&path);
    let connection = rusqlite::Connection::open(&path).unwrap();
    connection
        .execute_batch(&std::fs::read_to_string(fixture("v3.sql")).unwrap())
        .unwrap();
    connection.execute_batch("VACUUM").unwrap();
}

fn copy_of_v3() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moltmate.db");
    std::fs::copy(fixture("v3.db"), &path).unwrap();
    (dir, path)
}

#[tokio::test]
async fn a_database_of_the_previous_release_is_migrated_and_reads_back_whole() {
    let (_dir, path) = copy_of_v3();
    assert_eq!(moltmate_store::db::check_database(&path).unwrap(), 3);
    let store = Store::open(&path).expect("the previous release's database opens");
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);

    // Users and identities.
    let users = store.list_users().await.unwrap();
    let ids: Vec<&str> = users.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(ids, ["anna", "telegram_1001", "telegram_2002"]);
    let anna = UserId::new("anna").unwrap();
    let record = store.user(&anna).await.unwrap().unwrap();
    assert_eq!(record.display_name.as_deref(), Some("Anna"));
    assert!(record.onboarded);
    assert_eq!(record.identities.len(), 2);
    let telegram = |peer: &str| Identity::new(ChannelKind::Telegram, PeerId::new(peer).unwrap());
    assert_eq!(
        store.user_for_identity(&telegram("555")).await.unwrap(),
        Some((anna.clone(), "config".to_string()))
    );
    let ben = UserId::new("telegram_1001").unwrap();
    assert_eq!(
        store
            .user(&ben)
            .await
            .unwrap()
            .unwrap()
            .display_name
            .as_deref(),
        Some("Ben 'the builder'")
    );
    let carol = UserId::new("telegram_2002").unwrap();
    assert_eq!(
        store.onboarding_step(&carol).await.unwrap().as_deref(),
        Some("persona")
    );

    // Sessions and transcripts: the open session continues, the old one is history.
    let session = store.current_session(&anna).await.unwrap();
    assert_eq!(session.id, "s-anna-now");
    let transcript = store.transcript(&session.id).await.unwrap();
    assert_eq!(transcript.len(), 4);
    let all = store.user_transcripts(&anna).await.unwrap();
    assert_eq!(all.len(), 6);

    // The unanswered message is still pending and is answered after the upgrade.
    let pending = store.users_with_pending_inbox().await.unwrap();
    assert_eq!(pending, vec![ben.clone()]);
    assert_eq!(
        store.cursor(ChannelKind::Telegram).await.unwrap(),
        Some(9002)
    );

    // Pairing: the pending code is still pending; the approved and denied ones are decided.
    let requests = store.pending_pairing_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].code, "K7QW2MXP");

    // Credentials: the live token signs in, the revoked one does not, the browser session
    // still works.
    assert_eq!(
        store
            .user_for_token("mm_fixture-token-of-anna")
            .await
            .unwrap(),
        Some(anna.clone())
    );
    assert_eq!(
        store
            .user_for_token("mm_fixture-revoked-token")
            .await
            .unwrap(),
        None
    );
    let web = store
        .web_session("fixture-web-session")
        .await
        .unwrap()
        .expect("the browser session survives the upgrade");
    assert_eq!(web.user, Some(anna.clone()));

    // The operator's records.
    let usage = store.usage(None).await.unwrap();
    let anna_tokens: i64 = usage
        .iter()
        .filter(|u| u.user == "anna")
        .map(|u| u.input_tokens + u.output_tokens)
        .sum();
    assert_eq!(anna_tokens, 1200 + 80 + 1500 + 40 + 1600 + 30);
    assert_eq!(store.recent_audit(None, 10).await.unwrap().len(), 3);
    let activity = store.activity(0, None).await.unwrap();
    assert!(activity
        .days
        .iter()
        .any(|d| d.user == "anna" && d.tool_calls == 1));

    // And it keeps working: a new user, a new token.
    let new = UserId::new("dora").unwrap();
    let token = store.issue_token(&new, None).await.unwrap();
    assert_eq!(store.user_for_token(&token).await.unwrap(), Some(new));
    drop(store);
    // Reopening an upgraded database is a no-op.
    let again = Store::open(&path).unwrap();
    assert_eq!(again.schema_version().await.unwrap(), SCHEMA_VERSION);
}

#[test]
fn a_database_from_a_newer_moltmate_is_refused_with_a_clear_error() {
    let (_dir, path) = copy_of_v3();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute(
            "UPDATE schema_version SET version = ?1",
            [SCHEMA_VERSION + 1],
        )
        .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let error = match Store::open(&path) {
        Ok(_) => panic!("a newer database must be refused"),
        Err(error) => error,
    };
    assert!(
        matches!(error, StoreError::TooNew { found, supported } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("newer") && message.contains("upgrade moltmate"),
        "{message}"
    );
    assert!(!error.is_retryable());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a refused database is not touched"
    );
    assert!(matches!(
        moltmate_store::db::check_database(&path),
        Err(StoreError::TooNew { .. })
    ));
}

/// F8: `/admin` usage read `token_usage` by `at` and `audit_events` by `(kind, at)` with no index
/// on either, scanning both tables whole at every page view.
#[tokio::test]
async fn usage_window_queries_use_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moltmate.db");
    drop(Store::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let plan = |sql: &str| -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect::<Vec<_>>();
        rows.join("; ")
    };
    let usage = plan("SELECT user_id FROM token_usage WHERE at >= 5");
    assert!(usage.contains("token_usage_at"), "{usage}");
    let audit = plan("SELECT user_id FROM audit_events WHERE kind = 'tool_call' AND at >= 5");
    assert!(audit.contains("audit_kind_at"), "{audit}");
}
