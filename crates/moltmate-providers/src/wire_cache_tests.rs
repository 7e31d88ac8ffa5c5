//! A request encoded with a user's [`WireCache`] is byte for byte the request encoded without
//! one, on the first call (filling the cache) and on every later call (reading it), for both
//! wire formats; and the cache stays within its bounds.

use crate::tools_wire::ToolsWire;
use moltmate_core::model::{ConversationItem, ModelRequest, StoredItems, ToolCall, WireCache};
use moltmate_testkit::prop::config as prop_config;
use proptest::prelude::*;
use std::borrow::Cow;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

fn item() -> impl Strategy<Value = ConversationItem> {
    // Text that needs escaping, blanks (left out or replaced on the wire) and plain words.
    let text = prop_oneof![
        Just(String::new()),
        Just("  \n".to_string()),
        "[a-z \"\\\\\n\u{1}é😀]{0,24}",
    ];
    let arguments = prop_oneof![
        Just(serde_json::json!({"path": "a.txt"})),
        Just(serde_json::json!("not json {")),
        Just(serde_json::json!(7)),
    ];
    prop_oneof![
        text.clone()
            .prop_map(|text| ConversationItem::User { text }),
        (
            text.clone(),
            proptest::collection::vec(("[a-z0-9]{1,6}", arguments), 0..3)
        )
            .prop_map(|(text, calls)| ConversationItem::Assistant {
                text,
                tool_calls: calls
                    .into_iter()
                    .map(|(id, arguments)| ToolCall {
                        id: id.clone(),
                        name: format!("tool_{id}"),
                        arguments,
                    })
                    .collect(),
            }),
        (text, "[a-z0-9]{1,6}", any::<bool>()).prop_map(|(content, call_id, is_error)| {
            ConversationItem::ToolResult {
                call_id,
                content,
                is_error,
            }
        }),
    ]
}

fn request<'a>(items: &'a [ConversationItem], stored: Option<StoredItems<'a>>) -> ModelRequest<'a> {
    ModelRequest {
        model: "m".into(),
        system: Cow::Borrowed("be brief"),
        items: Cow::Borrowed(items),
        tools: Cow::Borrowed(&[]),
        max_output_tokens: 64,
        stored,
    }
}

type Encode = fn(&ModelRequest<'_>) -> serde_json::Result<Vec<u8>>;

const FORMATS: [(&str, Encode); 2] = [
    ("anthropic", |r| {
        crate::anthropic::encode(r, &ToolsWire::default())
    }),
    ("openai", |r| {
        crate::openai::encode(r, &ToolsWire::default())
    }),
];

proptest! {
    #![proptest_config(prop_config(64))]

    #[test]
    fn a_request_encoded_from_the_wire_cache_is_the_request_encoded_afresh(
        history in proptest::collection::vec(item(), 0..12),
        turn in proptest::collection::vec(item(), 1..4),
        stored_len in 0usize..12,
    ) {
        let mut items = history.clone();
        items.extend(turn);
        let stored_len = stored_len.min(history.len());
        let ids: Vec<i64> = (0..stored_len as i64).map(|i| 1000 + i).collect();
        let budget = Arc::new(AtomicU64::new(0));
        let cache = WireCache::new(Arc::clone(&budget), 1 << 20, 1 << 24);
        for (name, encode) in FORMATS {
            let fresh = encode(&request(&items, None)).unwrap();
            let parsed: serde_json::Value = serde_json::from_slice(&fresh).unwrap();
            prop_assert!(parsed.is_object(), "{name}");
            for round in 0..2 {
                let cached = encode(&request(&items, Some(StoredItems { ids: &ids, cache: &cache }))).unwrap();
                prop_assert_eq!(
                    String::from_utf8_lossy(&cached),
                    String::from_utf8_lossy(&fresh),
                    "{} round {}", name, round
                );
            }
        }
        prop_assert_eq!(budget.load(std::sync::atomic::Ordering::SeqCst), cache.kept_bytes());
        drop(cache);
        prop_assert_eq!(budget.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// Anthropic: a message's content is the string shorthand exactly when the message is one
    /// item that is one text block, and the string is that item's text; every other message
    /// keeps its blocks. Messages are matched to the runs of items they were made of
    /// (consecutive items of one role; an assistant item with blank text and no call is left
    /// out). Cached and fresh alike (the test above).
    #[test]
    fn an_anthropic_message_is_shortened_only_when_it_is_one_text_block(
        items in proptest::collection::vec(item(), 1..12),
    ) {
        let body: serde_json::Value =
            serde_json::from_slice(&crate::anthropic::encode(&request(&items, None), &ToolsWire::default()).unwrap()).unwrap();
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        let blank = |t: &str| t.trim().is_empty();
        let mut runs: Vec<(&str, Vec<&ConversationItem>)> = Vec::new();
        for item in &items {
            let role = match item {
                ConversationItem::Assistant { text, tool_calls } if blank(text) && tool_calls.is_empty() => continue,
                ConversationItem::Assistant { .. } => "assistant",
                _ => "user",
            };
            match runs.last_mut() {
                Some((last, run)) if *last == role => run.push(item),
                _ => runs.push((role, vec![item])),
            }
        }
        prop_assert_eq!(messages.len(), runs.len());
        for (message, (role, run)) in messages.iter().zip(&runs) {
            prop_assert_eq!(message["role"].as_str(), Some(*role));
            let lone_text = match run.as_slice() {
                [ConversationItem::User { text }] => Some(if blank(text) { "(empty message)" } else { text.as_str() }),
                [ConversationItem::Assistant { text, tool_calls }] if tool_calls.is_empty() => Some(text.as_str()),
                _ => None,
            };
            match (lone_text, &message["content"]) {
                (Some(text), serde_json::Value::String(sent)) => prop_assert_eq!(sent.as_str(), text),
                (None, serde_json::Value::Array(blocks)) => prop_assert!(!blocks.is_empty(), "{}", message),
                (expected, sent) => prop_assert!(false, "expected {:?}, sent {}", expected, sent),
            }
        }
    }
}

/// Keeping stops at either bound; what is not kept is encoded afresh, the same bytes.
#[test]
fn the_wire_cache_keeps_no_more_than_its_bounds() {
    let items: Vec<ConversationItem> = (0..50)
        .map(|i| ConversationItem::User {
            text: format!("message {i} {}", "x".repeat(200)),
        })
        .collect();
    let ids: Vec<i64> = (1..=50).collect();
    for (conversation_cap, total_cap, shared_before) in [
        (2_000, 1 << 20, 0),
        (1 << 20, 3_000, 0),
        (1 << 20, 1 << 20, (1 << 20) - 500),
    ] {
        let budget = Arc::new(AtomicU64::new(shared_before));
        let cache = WireCache::new(Arc::clone(&budget), conversation_cap, total_cap);
        let stored = Some(StoredItems {
            ids: &ids,
            cache: &cache,
        });
        for (_, encode) in FORMATS {
            let fresh = encode(&request(&items, None)).unwrap();
            assert_eq!(encode(&request(&items, stored)).unwrap(), fresh);
            assert_eq!(encode(&request(&items, stored)).unwrap(), fresh);
        }
        assert!(cache.kept_bytes() <= conversation_cap);
        let total = budget.load(std::sync::atomic::Ordering::SeqCst);
        assert!(total <= total_cap, "{total} > {total_cap}");
        assert_eq!(total, shared_before + cache.kept_bytes());
        drop(cache);
        assert_eq!(
            budget.load(std::sync::atomic::Ordering::SeqCst),
            shared_before
        );
    }
}
