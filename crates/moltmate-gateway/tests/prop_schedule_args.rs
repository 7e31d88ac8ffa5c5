//! Property tests of the `schedule` tool's argument parsing, through the tool itself on an
//! in-memory store: whatever JSON the model sends (wrong types, unknown fields, any string as
//! a time, a zone or a cron rule, huge numbers), the tool answers with a result or an error
//! the model can act on — never a panic, never a fatal error — and everything it stores is in
//! the future, within the horizon, and (recurring) repeats no more often than the minimum
//! interval. A local time it accepts is the time it was asked for (DST gaps refused, overlaps
//! on the first pass).

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use moltmate_core::sandbox::{ExecSettings, SandboxIds, SandboxProfile};
use moltmate_core::tool::{Tool, ToolContext, ToolError, UserHome};
use moltmate_core::UserId;
use moltmate_gateway::schedule::rules::{self, When, HORIZON_DAYS};
use moltmate_gateway::schedule::{Clock, ScheduleBinding, ScheduleTool};
use moltmate_store::Store;
use moltmate_testkit::prop::config as prop_config;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;

/// The fixed "now" of every case: a Saturday evening before Berlin's spring-forward night.
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 28, 18, 30, 0).unwrap()
}

const MIN_INTERVAL: u32 = 15;
const MAX_REMINDERS: usize = 5;

fn context(user: &UserId) -> ToolContext {
    ToolContext {
        outlet: None,
        user: user.clone(),
        home: UserHome::new(Path::new("/nonexistent/users"), user),
        session_id: "s".into(),
        family: None,
        read_only: false,
        sandbox: SandboxProfile::default(),
        sandbox_ids: SandboxIds::same(4242),
        exec: ExecSettings::default(),
    }
}

fn tool(store: &Store, user: &UserId) -> ScheduleTool {
    ScheduleTool::new(
        store.clone(),
        ScheduleBinding {
            user: user.clone(),
            zone: "Europe/Berlin".parse().unwrap(),
            max_reminders: MAX_REMINDERS,
            min_interval_minutes: MIN_INTERVAL,
            clock: Clock::new(now),
        },
        Arc::new(tokio::sync::Notify::new()),
    )
}

/// Strings a model might put in `at`: well-formed times around DST nights, near misses, junk.
fn at_string() -> impl Strategy<Value = String> {
    prop_oneof![
        (2025i32..2033, 1u32..13, 1u32..29, 0u32..24, 0u32..60)
            .prop_map(|(y, mo, d, h, mi)| format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}")),
        // The Berlin DST nights of 2026 (29 March, 25 October), minute by minute.
        (
            prop_oneof![Just((3u32, 29u32)), Just((10, 25))],
            0u32..5,
            0u32..60
        )
            .prop_map(|((mo, d), h, mi)| format!("2026-{mo:02}-{d:02}T{h:02}:{mi:02}")),
        "[0-9T:Z+ -]{0,30}",
        any::<String>(),
    ]
}

/// Strings a model might put in `cron`: from the cron alphabet, nicknames, junk.
fn cron_string() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        Just("*".to_string()),
        (0u32..70).prop_map(|n| n.to_string()),
        (0u32..60, 1u32..30).prop_map(|(a, s)| format!("{a}/{s}")),
        (0u32..30, 0u32..30).prop_map(|(a, b)| format!("{a}-{b}")),
        Just("*/15".to_string()),
        Just("MON-FRI".to_string()),
        Just("L".to_string()),
        Just("15W".to_string()),
        Just("5#2".to_string()),
        Just("+MON".to_string()),
        "[0-9*,/#LW?+-]{1,6}",
    ]
    .boxed();
    prop_oneof![
        4 => proptest::collection::vec(field.clone(), 5..=5).prop_map(|fields| fields.join(" ")),
        1 => proptest::collection::vec(field, 0..8).prop_map(|fields| fields.join(" ")),
        1 => prop_oneof![Just("@daily"), Just("@hourly"), Just("@weekly"), Just("@reboot")]
            .prop_map(str::to_string),
        1 => "[ -~]{0,120}",
    ]
}

fn zone_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Europe/Berlin".to_string()),
        Just("America/New_York".to_string()),
        Just("Australia/Lord_Howe".to_string()),
        Just("UTC".to_string()),
        Just("europe/berlin".to_string()),
        "[A-Za-z/_+-]{0,40}",
    ]
}

/// Any JSON value, small.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Arguments: mostly the tool's own fields with plausible or wrong values, sometimes anything.
fn arguments() -> impl Strategy<Value = Value> {
    let field = |name: &'static str, weight: f64, value: BoxedStrategy<Value>| {
        proptest::option::weighted(weight, value).prop_map(move |v| (name, v))
    };
    let fields = (
        field(
            "action",
            0.95,
            prop_oneof![
                4 => Just(json!("create")),
                2 => Just(json!("list")),
                2 => Just(json!("cancel")),
                1 => any_json()
            ]
            .boxed(),
        ),
        field(
            "text",
            0.7,
            prop_oneof![9 => "[a-z ]{0,40}".prop_map(Value::String), 1 => any_json()].boxed(),
        ),
        field(
            "at",
            0.3,
            prop_oneof![9 => at_string().prop_map(Value::String), 1 => any_json()].boxed(),
        ),
        field(
            "in_minutes",
            0.2,
            prop_oneof![
                6 => (-5i64..10_000_000).prop_map(|n| json!(n)),
                2 => "[0-9#]{0,12}".prop_map(Value::String),
                1 => any_json()
            ]
            .boxed(),
        ),
        field(
            "cron",
            0.3,
            prop_oneof![9 => cron_string().prop_map(Value::String), 1 => any_json()].boxed(),
        ),
        field(
            "timezone",
            0.3,
            zone_string().prop_map(Value::String).boxed(),
        ),
        field(
            "id",
            0.2,
            prop_oneof![9 => (-3i64..10).prop_map(|n| json!(n)), 1 => any_json()].boxed(),
        ),
        field("user", 0.05, Just(json!("someone_else")).boxed()),
    );
    // Well-formed creates, so the checks of times and rules are reached often.
    let create = (
        "[a-z ]{1,30}",
        prop_oneof![
            at_string().prop_map(|at| ("at", json!(at))),
            (1i64..3_000_000).prop_map(|m| ("in_minutes", json!(m))),
            cron_string().prop_map(|rule| ("cron", json!(rule))),
        ],
        proptest::option::weighted(0.3, zone_string()),
    )
        .prop_map(|(text, (key, when), zone)| {
            let mut call = json!({"action": "create", "text": text});
            call[key] = when;
            if let Some(zone) = zone {
                call["timezone"] = json!(zone);
            }
            call
        });
    prop_oneof![
        4 => create,
        5 => fields.prop_map(|(a, b, c, d, e, f, g, h)| {
            Value::Object(
                [a, b, c, d, e, f, g, h]
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.to_string(), v?)))
                    .collect(),
            )
        }),
        1 => any_json(),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(prop_config(256))]

    #[test]
    fn prop_schedule_arguments_never_panic_and_store_only_sound_reminders(
        calls in proptest::collection::vec(arguments(), 1..6)
    ) {
        let rt = runtime();
        rt.block_on(async {
            let store = Store::open_in_memory().unwrap();
            let (anna, ben) = (UserId::new("anna").unwrap(), UserId::new("ben").unwrap());
            store.ensure_user(&anna, None).await.unwrap();
            store.ensure_user(&ben, None).await.unwrap();
            // Ben has a reminder Anna's calls must never reach.
            let bens = tool(&store, &ben)
                .call(&context(&ben), json!({"action": "create", "text": "ben's", "in_minutes": 60}))
                .await;
            prop_assert!(bens.is_ok(), "{bens:?}");
            let tool = tool(&store, &anna);
            for arguments in calls {
                let result = tool.call(&context(&anna), arguments.clone()).await;
                match &result {
                    Err(ToolError::Fatal(e)) => prop_assert!(false, "fatal for {arguments}: {e}"),
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                    Ok(output) => prop_assert!(!output.content.is_empty()),
                }
            }
            let reminders = store.list_reminders(&anna).await.unwrap();
            prop_assert!(reminders.len() <= MAX_REMINDERS);
            let horizon = now() + chrono::Duration::days(HORIZON_DAYS);
            for reminder in &reminders {
                let due = DateTime::from_timestamp_millis(reminder.due_at).unwrap();
                prop_assert!(due > now() && due <= horizon, "{reminder:?}");
                prop_assert!(reminder.text.chars().count() <= rules::MAX_TEXT_CHARS);
                prop_assert!(reminder.timezone.parse::<Tz>().is_ok());
                if let Some(rule) = &reminder.cron {
                    let cron = rules::parse_cron(rule).unwrap();
                    prop_assert!(rules::shortest_gap_minutes(&cron) >= MIN_INTERVAL, "{rule}");
                }
            }
            let ben_left = store.list_reminders(&ben).await.unwrap();
            prop_assert_eq!(ben_left.len(), 1, "Anna's calls never touch Ben's reminder");
            Ok(())
        })?;
    }

    #[test]
    fn prop_cron_rules_parse_or_refuse_and_accepted_ones_occur_within_the_horizon(
        rule in cron_string(),
        zone in prop_oneof![Just("Europe/Berlin"), Just("Australia/Lord_Howe"), Just("UTC")],
    ) {
        let zone: Tz = zone.parse().unwrap();
        if let Ok(planned) = rules::plan(&When::Cron(rule.clone()), zone, now(), MIN_INTERVAL) {
            prop_assert!(planned.first > now());
            prop_assert!(planned.first <= now() + chrono::Duration::days(HORIZON_DAYS));
            let cron = rules::parse_cron(&rule).unwrap();
            // The next occurrence after a delivery is later, and at least the interval later.
            let (next, _) = rules::after_delivery(&cron, zone, planned.first, planned.first, MIN_INTERVAL);
            if let Some(next) = next {
                prop_assert!(next - planned.first >= chrono::Duration::minutes(i64::from(MIN_INTERVAL)));
            }
        }
    }

    #[test]
    fn prop_an_accepted_local_time_is_the_time_that_was_asked_for(
        day in 0u32..400,
        minute in 0u32..(24 * 60),
        zone in prop_oneof![Just("Europe/Berlin"), Just("America/New_York"), Just("Australia/Lord_Howe")],
    ) {
        let zone: Tz = zone.parse().unwrap();
        let date = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap() + chrono::Days::new(u64::from(day));
        let local: NaiveDateTime = date.and_hms_opt(minute / 60, minute % 60, 0).unwrap();
        match rules::plan(&When::At(local), zone, now(), MIN_INTERVAL) {
            Ok(planned) => {
                prop_assert_eq!(planned.first.with_timezone(&zone).naive_local(), local);
                prop_assert!(planned.first > now());
                // On an overlap, the first of the two passes.
                prop_assert_eq!(Some(planned.first), zone.from_local_datetime(&local).earliest().map(|t| t.with_timezone(&Utc)));
            }
            Err(why) => prop_assert!(
                why.contains("has passed") || why.contains("does not exist"),
                "{local} in {zone}: {why}"
            ),
        }
    }
}
