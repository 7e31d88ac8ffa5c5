//! `moltmate backup` while the gateway serves, and `moltmate restore` onto a fresh home that a
//! new gateway then serves: the same users with the same memory, transcript, API token and
//! pairing state, end to end through the Telegram double and the web API.

mod common;

use common::{run_cli, Harness, API_KEY, BOT_TOKEN};
use moltmate_core::UserId;
use serde_json::json;
use std::io::Read;

const ALICE: i64 = 1001;
const BOB: i64 = 2002;
const STRANGER: i64 = 3003;

fn config() -> serde_json::Value {
    json!({
        "channels": { "telegram": { "dmPolicy": "pairing", "allowFrom": [] } },
        "users": {
            "alice": { "identities": ["telegram:1001"], "displayName": "Alice" },
            "bob": { "identities": ["telegram:2002"] }
        },
        "sandbox": { "mode": "none", "dangerouslyAllowHostExec": true }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_load_restores_to_a_gateway_that_serves_the_same_users() {
    let mut h = Harness::start(config()).await;
    let alice = UserId::new("alice").unwrap();

    // State worth keeping: a conversation, memory, an API token, a pending pairing request.
    h.telegram
        .push_text(ALICE, "my name is Alice and I play chess");
    h.expect_reply(ALICE, 1).await;
    let alice_home = h.home.join("users/alice");
    std::fs::write(
        alice_home.join("MEMORY.md"),
        "Alice plays chess on Tuesdays",
    )
    .unwrap();
    let token = h
        .built
        .store
        .issue_token(&alice, Some("laptop"))
        .await
        .unwrap();
    // Bulk, so the backup takes a while: 2,000 files, 32 MiB.
    let bulk = alice_home.join("workspace/bulk");
    std::fs::create_dir_all(&bulk).unwrap();
    let chunk: Vec<u8> = (0..16 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    for i in 0..2_000 {
        std::fs::write(bulk.join(format!("{i:04}.bin")), &chunk).unwrap();
    }
    // A stranger asks to pair: they get a code, the operator has not decided yet.
    h.telegram.push_text(STRANGER, "hi, can I join?");
    let code_reply = h.expect_reply(STRANGER, 1).await;
    let pending = h.built.store.pending_pairing_requests().await.unwrap();
    assert_eq!(pending.len(), 1);
    let code = pending[0].code.clone();
    assert!(code_reply[0].contains(&code), "{code_reply:?}");

    // The bystander's normal answer time, then the backup (the real binary, a separate
    // process) while they keep chatting.
    let normal = h.bystander_baseline(BOB, 3).await;
    let archive = h.dir.path().join("backup.tar.gz");
    let backup = tokio::task::spawn_blocking({
        let (home, archive) = (h.home.clone(), archive.clone());
        move || run_cli(&home, &["backup", archive.to_str().unwrap()])
    });
    let started = std::time::Instant::now();
    let (mut rounds, mut slowest) = (0, std::time::Duration::ZERO);
    while !backup.is_finished() || rounds == 0 {
        let (_, took) = h
            .round_trip(BOB, &format!("during the backup {rounds}"))
            .await;
        assert!(
            took <= common::bystander_bound(normal),
            "bystander answered in {took:?} during the backup (normal {normal:?})"
        );
        slowest = slowest.max(took);
        rounds += 1;
    }
    let took = started.elapsed();
    let (status, stdout, stderr) = backup.await.unwrap();
    assert!(status.success(), "backup failed: {stderr}");
    assert!(stdout.contains("Backed up"), "{stdout}");
    assert!(
        stderr.contains("backup: copying the database"),
        "progress on stderr: {stderr}"
    );
    assert!(stderr.contains("MOLTMATE_TELEGRAM_BOT_TOKEN"), "{stderr}");
    eprintln!(
        "backup of 32 MiB in 2,000 files took ~{took:?}; the bystander answered {rounds} time(s) meanwhile, slowest {slowest:?} (normal {normal:?})"
    );

    // No secret in the archive.
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&archive).unwrap())
        .read_to_end(&mut plain)
        .unwrap();
    for secret in [BOT_TOKEN, API_KEY] {
        assert!(
            !plain.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a secret is in the archive"
        );
    }
    let marker = std::fs::read_to_string(h.home.join("backups/last.json")).unwrap();
    assert!(
        marker.contains("finishedAt") && marker.contains("backup.tar.gz"),
        "{marker}"
    );

    // A corrupted copy is refused by the CLI with nothing written.
    let broken = h.dir.path().join("broken.tar.gz");
    let mut bytes = std::fs::read(&archive).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&broken, bytes).unwrap();
    let refused_home = h.dir.path().join("refused");
    let (status, _, stderr) = run_cli(&refused_home, &["restore", broken.to_str().unwrap()]);
    assert!(!status.success());
    assert!(stderr.contains("refusing the archive"), "{stderr}");
    assert!(!refused_home.exists(), "nothing written");
    // And a restore into the running home is refused.
    let (status, _, stderr) = run_cli(&h.home, &["restore", archive.to_str().unwrap()]);
    assert!(
        !status.success() && stderr.contains("not empty"),
        "{stderr}"
    );

    // Restore onto a fresh home and move the gateway there.
    let restored = h.dir.path().join("restored");
    let (status, stdout, stderr) = run_cli(&restored, &["restore", archive.to_str().unwrap()]);
    assert!(status.success(), "restore failed: {stderr}");
    assert!(stdout.contains("Restored"), "{stdout}");
    assert!(
        stderr.contains("set channels.telegram.botToken"),
        "{stderr}"
    );
    let env = |name: &str| match name {
        "MOLTMATE_TELEGRAM_BOT_TOKEN" => Some(BOT_TOKEN.to_string()),
        "MOLTMATE_PROVIDER_FAKE_API_KEY" => Some(API_KEY.to_string()),
        _ => None,
    };
    h = h.move_to(restored.clone(), &env).await;

    // Same memory and transcript: Alice's next turn sees both.
    h.llm.clear_requests();
    let before = h
        .telegram
        .sent_messages()
        .iter()
        .filter(|m| m.chat_id == ALICE.to_string())
        .count();
    h.telegram.push_text(ALICE, "what do you know about me?");
    h.expect_reply(ALICE, before + 1).await;
    // Messages the bystander sent while the snapshot was taken may be answered again by the
    // restored gateway, so pick Alice's request by its text.
    let request = h
        .llm
        .requests()
        .into_iter()
        .find(|r| r.last_user_text().as_deref() == Some("what do you know about me?"))
        .expect("the model was asked");
    assert!(
        request
            .system_text()
            .contains("Alice plays chess on Tuesdays"),
        "memory restored"
    );
    assert!(
        request
            .all_text()
            .contains("my name is Alice and I play chess"),
        "transcript restored"
    );
    assert_eq!(
        std::fs::read(restored.join("users/alice/workspace/bulk/1999.bin")).unwrap(),
        chunk
    );
    // Same API token, through the web API of the restored gateway.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = moltmate_web::WebState::new(
        h.built.gateway.clone(),
        moltmate_web::WebSettings::default(),
        h.built.shutdown.clone(),
    )
    .unwrap();
    tokio::spawn(moltmate_web::serve(
        state,
        listener,
        h.built.shutdown.clone(),
    ));
    let client = reqwest::Client::new();
    let models = client
        .get(format!("{url}/v1/models"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        models.status(),
        200,
        "the API token works after the restore"
    );
    let bogus = client
        .get(format!("{url}/v1/models"))
        .bearer_auth("mm_bogus")
        .send()
        .await
        .unwrap();
    assert_eq!(bogus.status(), 401);
    // Same pairing state: the pending code is still pending, the operator approves it, and
    // the stranger is answered by the model.
    let pending_now = h.built.store.pending_pairing_requests().await.unwrap();
    assert!(
        pending_now.iter().any(|r| r.code == code),
        "pairing request restored"
    );
    // As the operator runs it: with the secrets the restored config references.
    let (status, _, stderr) = common::run_cli_env(
        &restored,
        &["pairing", "approve", "telegram", &code],
        &[
            ("MOLTMATE_TELEGRAM_BOT_TOKEN", BOT_TOKEN),
            ("MOLTMATE_PROVIDER_FAKE_API_KEY", API_KEY),
        ],
    );
    assert!(status.success(), "{stderr}");
    let (reply, _) = h.round_trip(STRANGER, "thanks!").await;
    assert_eq!(reply, "echo: thanks!");
    // The bystander still gets answers.
    h.assert_bystander_answered(BOB, normal, "after the restore")
        .await;
    common::release_volumes(&restored);
}
