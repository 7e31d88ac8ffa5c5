//! Regressions (issue 9 review): usage counters and what a provider's reply can do to them.

use moltmate_core::UserId;
use moltmate_store::{Store, UsageCharge};

/// Regression: a provider reply's `usage` was taken as any u64 (the Anthropic parser even saturates sums to
/// u64::MAX), and `charge_usage` stores it as `i64::MAX`. The next charge of the same day makes
/// SQLite's `input_tokens + excluded.input_tokens` overflow into a REAL, and even a single row
/// overflows in `input_tokens + output_tokens` of `totals_of`. From then on reading the user's
/// usage fails: every turn of that user (and of every member of their family) is stopped with
/// "could not check your usage budget", and `usage_overview` (the /admin page, `users show`)
/// fails for everyone, until the day (spend: the month) is over. Now every stored counter is
/// clamped to `COUNTER_MAX` and every addition saturates there (the gateway also clamps each
/// reply to `MAX_TOKENS_PER_REPLY` before charging).
#[tokio::test]
async fn a_huge_provider_token_count_does_not_poison_usage_reads() {
    let store = Store::open_in_memory().unwrap();
    let anna = UserId::new("anna").unwrap();
    let ben = UserId::new("ben").unwrap();
    store.ensure_user(&anna, None).await.unwrap();
    store.ensure_user(&ben, None).await.unwrap();
    let day = "2026-11-18";
    // What `BudgetGuard::charge_model` hands the store for `usage: {"input_tokens": <2^64-1>,
    // "output_tokens": 1}` (no price configured, so no cost).
    store
        .charge_usage(
            &anna,
            day,
            UsageCharge {
                messages: 1,
                input_tokens: u64::MAX,
                output_tokens: 1,
                ..UsageCharge::default()
            },
        )
        .await
        .unwrap();
    // And again: the addition saturates instead of overflowing into a REAL.
    store
        .charge_usage(
            &anna,
            day,
            UsageCharge {
                input_tokens: u64::MAX,
                output_tokens: u64::MAX,
                ..UsageCharge::default()
            },
        )
        .await
        .unwrap();
    // The user's own budget check before each turn and each model call.
    let own = store
        .usage_totals(std::slice::from_ref(&anna), day, "2026-11")
        .await;
    // Their family's check (ben is a member who never did anything wrong).
    let family = store
        .usage_totals(&[anna.clone(), ben.clone()], day, "2026-11")
        .await;
    // The operator's view of everyone.
    let overview = store.usage_overview(day, "2026-11").await;
    assert!(
        own.is_ok() && family.is_ok() && overview.is_ok(),
        "own: {own:?}\nfamily: {family:?}\noverview: {overview:?}"
    );
    // Still far over any budget: saturated, not wrapped.
    assert!(own.unwrap().tokens_today >= moltmate_store::usage::COUNTER_MAX as u64);
    let before_turn = store
        .usage_before_turn(&anna, Some(&[anna.clone(), ben.clone()]), day, "2026-11")
        .await;
    assert!(before_turn.is_ok(), "{before_turn:?}");
}

/// Regression: the same with a price configured: `Prices::cost_micros` saturates to u64::MAX, stored as
/// i64::MAX; a second day's spend in the month makes `SUM(cost_micros)` raise SQLite's
/// "integer overflow", so the month's spend could no longer be read at all. Now counters are
/// clamped and the month's sum is taken with `total()` (floating point, never raises) capped
/// at `COUNTER_MAX`.
#[tokio::test]
async fn a_saturated_cost_does_not_poison_the_months_spend() {
    let store = Store::open_in_memory().unwrap();
    let anna = UserId::new("anna").unwrap();
    store.ensure_user(&anna, None).await.unwrap();
    for (day, cost) in [("2026-11-17", u64::MAX), ("2026-11-18", 1)] {
        store
            .charge_usage(
                &anna,
                day,
                UsageCharge {
                    cost_micros: cost,
                    ..UsageCharge::default()
                },
            )
            .await
            .unwrap();
    }
    let totals = store
        .usage_totals(std::slice::from_ref(&anna), "2026-11-19", "2026-11")
        .await;
    assert!(totals.is_ok(), "{totals:?}");
    assert!(totals.unwrap().cost_micros_month >= moltmate_store::usage::COUNTER_MAX as u64);
}

/// The per-call rows (`token_usage`, summed by `moltmate usage`) saturate too: a reply's
/// `u64::MAX` was stored `as i64` (negative), and their `SUM` could overflow.
#[tokio::test]
async fn huge_per_call_token_counts_neither_wrap_nor_overflow_their_sum() {
    use moltmate_core::model::{ConversationItem, TokenUsage};
    use moltmate_store::TurnRecord;
    let store = Store::open_in_memory().unwrap();
    let anna = UserId::new("anna").unwrap();
    store.ensure_user(&anna, None).await.unwrap();
    let session = store.current_session(&anna).await.unwrap();
    for _ in 0..3 {
        let _ = store
            .complete_turn(TurnRecord {
                charge: None,
                inbox_id: inbox_row(&store, &anna).await,
                user: anna.clone(),
                session_id: session.id.clone(),
                items: vec![ConversationItem::User { text: "hi".into() }],
                reply: None,
                usage: vec![(
                    "p".into(),
                    "m".into(),
                    TokenUsage {
                        input_tokens: u64::MAX,
                        output_tokens: u64::MAX / 2 + 7,
                    },
                )],
            })
            .await
            .unwrap();
    }
    let rows = store.usage(Some(&anna)).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(
        rows[0].input_tokens > 0 && rows[0].output_tokens > 0,
        "{rows:?}"
    );
}

/// A fresh inbox row of `user` for a turn to complete (a turn whose inbox row is gone commits
/// nothing, as for a user removed meanwhile).
async fn inbox_row(store: &moltmate_store::Store, user: &moltmate_core::UserId) -> i64 {
    use moltmate_core::channel::InboundMessage;
    use moltmate_core::{ChannelKind, Identity, PeerId};
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    store
        .insert_inbound(
            &InboundMessage {
                attachments: Vec::new(),
                sender: Identity::new(ChannelKind::Telegram, PeerId::new("42").unwrap()),
                chat_id: "42".into(),
                external_id: format!("turn-{n}"),
                cursor: None,
                text: "x".into(),
                sender_name: None,
                language_code: None,
            },
            user,
        )
        .await
        .unwrap()
        .unwrap()
}
