//! Property test of Telegram update parsing, end to end: the real channel long-polls the fake
//! Bot API, which serves batches of updates whose every field may be present, missing, `null`,
//! of the wrong type or surrounded by unknown fields, mixed with values that are not updates at
//! all. The channel must deliver exactly the private text messages of people, in order, with
//! sanitised names and language codes, skip everything else, and never stall or crash.

use async_trait::async_trait;
use moltmate_channels::{TelegramChannel, TelegramSettings};
use moltmate_core::channel::{AcceptError, Accepted, Channel, InboundMessage, InboundSink};
use moltmate_core::{ChannelKind, Shutdown};
use moltmate_testkit::prop::config as prop_config;
use moltmate_testkit::telegram::FakeTelegram;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "123456:PROP-secret_token";

/// Keeps what the channel accepted.
#[derive(Default)]
struct Sink {
    accepted: Mutex<Vec<InboundMessage>>,
    cursor: Mutex<Option<i64>>,
}

#[async_trait]
impl InboundSink for Sink {
    async fn accept(&self, message: InboundMessage) -> Result<Accepted, AcceptError> {
        *self.cursor.lock().unwrap() = message.cursor;
        self.accepted.lock().unwrap().push(message);
        Ok(Accepted::Queued)
    }

    async fn cursor(&self, _channel: ChannelKind) -> Result<Option<i64>, AcceptError> {
        Ok(*self.cursor.lock().unwrap())
    }

    async fn advance_cursor(&self, _channel: ChannelKind, cursor: i64) -> Result<(), AcceptError> {
        let mut stored = self.cursor.lock().unwrap();
        *stored = Some(stored.map_or(cursor, |s| s.max(cursor)));
        Ok(())
    }
}

/// A field of a generated update: what the wire carries, and whether it is well-typed.
#[derive(Debug, Clone)]
enum Field<T> {
    Absent,
    Null,
    Valid(T),
    Wrong(Value),
}

impl<T: Clone + Into<Value>> Field<T> {
    fn put(&self, object: &mut Map<String, Value>, key: &str) {
        match self {
            Field::Absent => {}
            Field::Null => {
                object.insert(key.into(), Value::Null);
            }
            Field::Valid(v) => {
                object.insert(key.into(), v.clone().into());
            }
            Field::Wrong(v) => {
                object.insert(key.into(), v.clone());
            }
        }
    }

    /// Well-typed for an optional field (`null` reads as absent).
    fn ok_optional(&self) -> bool {
        !matches!(self, Field::Wrong(_))
    }

    /// Well-typed for a required field.
    fn ok_required(&self) -> bool {
        matches!(self, Field::Valid(_))
    }

    fn valid(&self) -> Option<&T> {
        match self {
            Field::Valid(v) => Some(v),
            _ => None,
        }
    }
}

/// Values of the wrong JSON type for a field of each kind.
fn wrong_int() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!("12"),
        json!(1.5),
        json!(u64::MAX),
        json!(true),
        json!([1, 2]),
        json!({"id": 1}),
    ])
}

fn wrong_bool() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![json!("true"), json!(1), json!([]), json!({})])
}

fn wrong_string() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!(12),
        json!(false),
        json!(["a"]),
        json!({"a": "b"}),
    ])
}

/// Not an object (an object could happen to be a valid one).
fn wrong_object() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!("private"),
        json!(7),
        json!([{"id": 1}]),
        json!(true),
    ])
}

fn optional<T: std::fmt::Debug + Clone>(
    valid: impl Strategy<Value = T>,
    wrong: impl Strategy<Value = Value>,
) -> impl Strategy<Value = Field<T>> {
    prop_oneof![
        2 => Just(Field::Absent),
        1 => Just(Field::Null),
        6 => valid.prop_map(Field::Valid),
        1 => wrong.prop_map(Field::Wrong),
    ]
}

/// Arbitrary JSON for unknown fields.
fn junk() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn extra_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec(
        (
            prop::sample::select(vec![
                "message_id",
                "date",
                "entities",
                "photo",
                "sticker",
                "reply_to_message",
                "username",
                "title",
                "is_premium",
                "edited_message",
                "callback_query",
            ])
            .prop_map(String::from),
            junk(),
        ),
        0..3,
    )
}

#[derive(Debug, Clone)]
struct GenUser {
    id: Field<i64>,
    is_bot: Field<bool>,
    first_name: Field<String>,
    last_name: Field<String>,
    language_code: Field<String>,
    extra: Vec<(String, Value)>,
}

#[derive(Debug, Clone)]
struct GenChat {
    id: Field<i64>,
    kind: Field<String>,
    extra: Vec<(String, Value)>,
}

#[derive(Debug, Clone)]
struct GenMessage {
    chat: Field<GenChat>,
    from: Field<GenUser>,
    text: Field<String>,
    extra: Vec<(String, Value)>,
}

/// One item of a `getUpdates` batch.
#[derive(Debug, Clone)]
enum GenUpdate {
    Update {
        message: Box<Field<GenMessage>>,
        extra: Vec<(String, Value)>,
    },
    /// Not an update object at all (an id is not even assigned).
    NotAnObject(Value),
}

fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z]{1,12}",
        any::<String>(),
        "[ \\n\\t\\r\u{7}\u{85}\u{2028}a-z]{0,12}",
        Just("x".repeat(300)),
        // Around the 128-character cut.
        "[a-z]{126,128}",
    ]
}

fn user() -> impl Strategy<Value = GenUser> {
    (
        optional(any::<i64>(), wrong_int()),
        optional(any::<bool>(), wrong_bool()),
        optional(name_text(), wrong_string()),
        optional(name_text(), wrong_string()),
        optional(
            prop_oneof![
                "[a-z]{2}(-[a-zA-Z]{2})?",
                any::<String>(),
                Just("x".repeat(40))
            ],
            wrong_string(),
        ),
        extra_fields(),
    )
        .prop_map(
            |(id, is_bot, first_name, last_name, language_code, extra)| GenUser {
                // `id` is required: a missing one counts as absent, which is not `Valid`.
                id,
                is_bot,
                first_name,
                last_name,
                language_code,
                extra,
            },
        )
}

fn chat() -> impl Strategy<Value = GenChat> {
    (
        optional(any::<i64>(), wrong_int()),
        optional(
            prop::sample::select(vec![
                "private",
                "private",
                "private",
                "group",
                "supergroup",
                "channel",
                "Private",
                "",
            ])
            .prop_map(String::from),
            wrong_string(),
        ),
        extra_fields(),
    )
        .prop_map(|(id, kind, extra)| GenChat { id, kind, extra })
}

fn message() -> impl Strategy<Value = GenMessage> {
    (
        optional(chat(), wrong_object()),
        optional(user(), wrong_object()),
        optional(
            prop_oneof![any::<String>(), "[a-z ]{1,20}", Just(String::new())],
            wrong_string(),
        ),
        extra_fields(),
    )
        .prop_map(|(chat, from, text, extra)| GenMessage {
            chat,
            from,
            text,
            extra,
        })
}

fn update() -> impl Strategy<Value = GenUpdate> {
    prop_oneof![
        // An update has one kind: other fields only stand in for another kind of update.
        12 => (optional(message(), wrong_object()), extra_fields())
            .prop_map(|(message, extra)| match message {
                Field::Absent => GenUpdate::Update { message: Box::new(message), extra },
                message => GenUpdate::Update { message: Box::new(message), extra: Vec::new() },
            }),
        1 => junk().prop_filter("objects get an id", |v| !v.is_object()).prop_map(GenUpdate::NotAnObject),
    ]
}

impl GenUpdate {
    /// The update as the Bot API sends it (the fake adds `update_id` to objects).
    fn to_json(&self) -> Value {
        match self {
            GenUpdate::Update { message, extra } => {
                let mut o: Map<String, Value> = extra.iter().cloned().collect();
                message.put(&mut o, "message");
                Value::Object(o)
            }
            GenUpdate::NotAnObject(value) => value.clone(),
        }
    }
}

impl From<GenUser> for Value {
    fn from(u: GenUser) -> Value {
        let mut o: Map<String, Value> = u.extra.into_iter().collect();
        u.id.put(&mut o, "id");
        u.is_bot.put(&mut o, "is_bot");
        u.first_name.put(&mut o, "first_name");
        u.last_name.put(&mut o, "last_name");
        u.language_code.put(&mut o, "language_code");
        Value::Object(o)
    }
}

impl From<GenChat> for Value {
    fn from(c: GenChat) -> Value {
        let mut o: Map<String, Value> = c.extra.into_iter().collect();
        c.id.put(&mut o, "id");
        c.kind.put(&mut o, "type");
        Value::Object(o)
    }
}

impl From<GenMessage> for Value {
    fn from(m: GenMessage) -> Value {
        let mut o: Map<String, Value> = m.extra.into_iter().collect();
        m.chat.put(&mut o, "chat");
        m.from.put(&mut o, "from");
        m.text.put(&mut o, "text");
        Value::Object(o)
    }
}

/// What the channel must deliver for one update, if anything.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    sender: String,
    chat_id: String,
    text: String,
    first_name: Option<String>,
    last_name: Option<String>,
    language_code: Option<String>,
}

fn expected(update: &GenUpdate) -> Option<Expected> {
    let GenUpdate::Update { message, .. } = update else {
        return None;
    };
    let m = message.valid()?;
    let chat = m.chat.valid()?;
    let from_ok = match &m.from {
        Field::Valid(u) => {
            u.id.ok_required()
                && u.is_bot.ok_optional()
                && !matches!(u.is_bot, Field::Null)
                && u.first_name.ok_optional()
                && u.last_name.ok_optional()
                && u.language_code.ok_optional()
        }
        Field::Absent | Field::Null => true,
        Field::Wrong(_) => false,
    };
    // A malformed update is skipped as a whole.
    let parses =
        chat.id.ok_required() && chat.kind.ok_required() && from_ok && m.text.ok_optional();
    if !parses || chat.kind.valid().map(String::as_str) != Some("private") {
        return None;
    }
    let from = m.from.valid()?;
    if from.is_bot.valid() == Some(&true) {
        return None;
    }
    Some(Expected {
        sender: format!("telegram:{}", from.id.valid()?),
        chat_id: chat.id.valid()?.to_string(),
        text: m.text.valid()?.clone(),
        first_name: from.first_name.valid().cloned(),
        last_name: from.last_name.valid().cloned(),
        language_code: from.language_code.valid().cloned(),
    })
}

/// The name rule: words of the first and last name, control characters removed, single spaces,
/// at most 128 characters; none when nothing is left.
fn check_name(got: &InboundMessage, want: &Expected) -> Result<(), TestCaseError> {
    let Some(name) = &got.sender_name else {
        let raw = format!(
            "{} {}",
            want.first_name.as_deref().unwrap_or(""),
            want.last_name.as_deref().unwrap_or("")
        );
        prop_assert!(
            raw.chars().all(|c| c.is_whitespace() || c.is_control()),
            "a name was dropped: {raw:?}"
        );
        return Ok(());
    };
    prop_assert!(!name.is_empty() && name.chars().count() <= 128, "{name:?}");
    prop_assert!(
        !name.chars().any(char::is_control),
        "control character in {name:?}"
    );
    prop_assert!(
        !name.contains("  ") && name.trim() == name,
        "whitespace not collapsed: {name:?}"
    );
    prop_assert!(
        !name.chars().any(|c| c.is_whitespace() && c != ' '),
        "line break or tab in {name:?}"
    );
    let words = |s: &Option<String>| -> Vec<String> {
        s.as_deref()
            .unwrap_or("")
            .split(|c: char| c.is_whitespace() || c.is_control())
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect()
    };
    let mut all = words(&want.first_name);
    all.extend(words(&want.last_name));
    let joined = all.join(" ");
    if joined.chars().count() <= 128 {
        prop_assert_eq!(name, &joined);
    }
    Ok(())
}

fn check_message(got: &InboundMessage, want: &Expected) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.sender.to_string(), want.sender.clone());
    prop_assert_eq!(&got.chat_id, &want.chat_id);
    prop_assert_eq!(&got.text, &want.text);
    // The cursor is checked across the batch in `cursors_only_move_past_what_was_stored`.
    prop_assert!(got.external_id.parse::<i64>().is_ok());
    check_name(got, want)?;
    let tag_ok = |code: &str| {
        !code.is_empty()
            && code.len() <= 35
            && code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let want_code = want.language_code.clone().filter(|c| tag_ok(c));
    prop_assert_eq!(&got.language_code, &want_code);
    Ok(())
}

/// Messages of a batch from several senders carry no cursor: the channel stores the cursor
/// past the batch once all of it is stored (its senders are stored at once, so per-message
/// cursors would move out of order). Only the last message of a batch from one sender carries
/// the cursor past that batch (stored in the same commit). So a cursor is past its own
/// update, and nothing accepted after it is from before the cursor.
fn cursors_only_move_past_what_was_stored(got: &[InboundMessage]) -> Result<(), TestCaseError> {
    let id = |m: &InboundMessage| m.external_id.parse::<i64>().unwrap_or(i64::MAX);
    for (at, message) in got.iter().enumerate() {
        let Some(cursor) = message.cursor else {
            continue;
        };
        prop_assert!(
            cursor > id(message),
            "cursor {} not past its own update {}",
            cursor,
            id(message)
        );
        for later in got.iter().skip(at + 1) {
            prop_assert!(
                id(later) >= cursor,
                "update {} accepted after the cursor {} moved past it",
                id(later),
                cursor
            );
        }
    }
    Ok(())
}

struct World {
    /// Runs the fake and the channel; dropped (stopping both) with the world.
    _runtime: tokio::runtime::Runtime,
    fake: FakeTelegram,
    sink: Arc<Sink>,
    shutdown: Shutdown,
    sentinel: std::cell::Cell<u64>,
}

impl World {
    fn start() -> World {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sink = Arc::new(Sink::default());
        let shutdown = Shutdown::new();
        let fake = runtime.block_on(async {
            let fake = FakeTelegram::start(TOKEN).await;
            let mut settings = TelegramSettings::new(TOKEN).with_api_url(fake.api_url());
            settings.poll_timeout = Duration::from_secs(1);
            settings.request_timeout = Duration::from_secs(3);
            settings.backoff_initial = Duration::from_millis(5);
            settings.backoff_max = Duration::from_millis(50);
            let channel = TelegramChannel::new(settings).unwrap();
            let (sink, shutdown) = (sink.clone(), shutdown.clone());
            tokio::spawn(async move { channel.run(sink, shutdown).await });
            fake
        });
        World {
            _runtime: runtime,
            fake,
            sink,
            shutdown,
            sentinel: std::cell::Cell::new(0),
        }
    }

    /// Pushes the batch plus a sentinel message and returns what was accepted before it.
    fn deliver(&self, batch: &[GenUpdate]) -> Result<Vec<InboundMessage>, TestCaseError> {
        self.sink.accepted.lock().unwrap().clear();
        for update in batch {
            self.fake.push_raw_update(update.to_json());
        }
        let n = self.sentinel.get() + 1;
        self.sentinel.set(n);
        let sentinel = format!("sentinel {n}");
        self.fake.push_text(1, &sentinel);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            {
                let accepted = self.sink.accepted.lock().unwrap();
                if let Some(pos) = accepted.iter().position(|m| m.text == sentinel) {
                    prop_assert_eq!(
                        pos + 1,
                        accepted.len(),
                        "accepted something after the sentinel"
                    );
                    return Ok(accepted[..pos].to_vec());
                }
            }
            prop_assert!(
                Instant::now() < deadline,
                "the channel stalled: the sentinel never arrived"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[test]
fn prop_telegram_delivers_exactly_the_private_text_messages() {
    let world = World::start();
    let mut runner = proptest::test_runner::TestRunner::new(prop_config(48));
    let result = runner.run(&prop::collection::vec(update(), 0..8), |batch| {
        let got = world.deliver(&batch)?;
        let want: Vec<Expected> = batch.iter().filter_map(expected).collect();
        prop_assert_eq!(
            got.len(),
            want.len(),
            "delivered {:?}, expected {:?}, batch {}",
            got.iter().map(|m| &m.text).collect::<Vec<_>>(),
            want.iter().map(|m| &m.text).collect::<Vec<_>>(),
            batch
                .iter()
                .map(|u| u.to_json().to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        for (g, w) in got.iter().zip(&want) {
            check_message(g, w)?;
        }
        cursors_only_move_past_what_was_stored(&got)?;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Everything gets confirmed (by the next poll's offset): nothing stays pending at the fake.
    let deadline = Instant::now() + Duration::from_secs(20);
    while world.fake.pending_updates() > 0 {
        assert!(Instant::now() < deadline, "updates were never confirmed");
        std::thread::sleep(Duration::from_millis(5));
    }
}
