//! `moltmate usage` against a home a real gateway has used: table, CSV (escaped, formulas
//! defused) and JSON, `--user` and `--since`.

mod common;

use common::{run_cli, Harness};
use moltmate_core::UserId;
use serde_json::json;

const HOSTILE_NAME: &str = "=HYPERLINK(\"http://evil.example\",\"click\"), \"quoted\"\nline";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_reports_per_user_and_day_as_table_csv_and_json() {
    let h = Harness::start(json!({
        "model": { "prices": { "fake/*": { "inputPerMTok": 3.0, "outputPerMTok": 15.0 } } },
        "families": { "smiths": { "members": ["telegram_1001", "telegram_3003"] } },
    }))
    .await;
    // A display name chosen by someone else, with everything a spreadsheet or CSV parser
    // could trip on.
    h.built
        .store
        .ensure_user(&UserId::new("telegram_3003").unwrap(), Some(HOSTILE_NAME))
        .await
        .unwrap();
    for (chat, text) in [(1001, "one"), (1001, "two"), (3003, "three")] {
        let before = h
            .telegram
            .sent_messages()
            .iter()
            .filter(|m| m.chat_id == chat.to_string())
            .count();
        h.telegram.push_text(chat, text);
        h.expect_reply(chat, before + 1).await;
    }
    let home = h.home.clone();
    let _dir = h.stop().await;

    let (status, table, stderr) = run_cli(&home, &["usage"]);
    assert!(status.success(), "{stderr}");
    assert!(
        table.contains("telegram_1001") && table.contains("telegram_3003"),
        "{table}"
    );
    assert!(
        table.contains("FAMILY") && table.contains("smiths"),
        "{table}"
    );
    assert!(table.contains('$'), "costs are estimated: {table}");

    let (status, csv, stderr) = run_cli(&home, &["usage", "--format", "csv"]);
    assert!(status.success(), "{stderr}");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("day,user,display_name,family,messages,model_calls,input_tokens,output_tokens,cost_usd,cost_partial,tool_calls,exec_calls,exec_seconds")
    );
    // The hostile name: quoted (comma, quotes, newline inside) and prefixed with ' so no
    // spreadsheet evaluates it.
    assert!(
        csv.contains(
            "\"'=HYPERLINK(\"\"http://evil.example\"\",\"\"click\"\"), \"\"quoted\"\"\nline\""
        ),
        "{csv}"
    );
    let alice_row = csv
        .lines()
        .find(|l| l.contains(",telegram_1001,"))
        .expect("a row for telegram_1001");
    let cells: Vec<&str> = alice_row.split(',').collect();
    assert_eq!(cells[3], "smiths");
    assert_eq!(cells[4], "2", "two messages: {alice_row}");

    let (status, out, stderr) = run_cli(
        &home,
        &["usage", "--format", "json", "--user", "telegram_1001"],
    );
    assert!(status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let users = report["users"].as_array().unwrap();
    assert_eq!(users.len(), 1, "--user filters");
    assert_eq!(users[0]["user"], "telegram_1001");
    assert_eq!(users[0]["totals"]["messages"], 2);
    assert!(users[0]["totals"]["costMicros"].as_u64().unwrap() > 0);
    assert!(report["priced"].as_bool().unwrap());

    let today = chrono::Local::now().date_naive();
    let tomorrow = (today + chrono::Days::new(1))
        .format("%Y-%m-%d")
        .to_string();
    let (status, _, stderr) = run_cli(&home, &["usage", "--since", &tomorrow]);
    assert!(
        !status.success() && stderr.contains("in the future"),
        "{stderr}"
    );
    let (status, _, stderr) = run_cli(&home, &["usage", "--since", "last week"]);
    assert!(
        !status.success() && stderr.contains("expected a date"),
        "{stderr}"
    );
    let today = today.format("%Y-%m-%d").to_string();
    let (status, out, _) = run_cli(&home, &["usage", "--since", &today, "--format", "csv"]);
    assert!(status.success());
    assert_eq!(
        out.lines().filter(|l| l.starts_with(&today)).count(),
        2,
        "today's rows: {out}"
    );
}
