//! `ToolRegistry`: allow/deny selection for both what is offered and what can be called.

mod common;

use async_trait::async_trait;
use common::Fixture;
use moltmate_core::model::ToolSpec;
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use moltmate_tools::{RegistryError, ToolRegistry, ToolSelection, WebFetchSettings, BUILTIN_TOOLS};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

struct Echo(&'static str);

#[async_trait]
impl Tool for Echo {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: self.0.into(),
            description: "echo".into(),
            parameters: json!({"type": "object"}),
        }
    }

    async fn call(
        &self,
        _ctx: &ToolContext,
        arguments: serde_json::Value,
    ) -> Result<ToolOutput, ToolError> {
        Ok(ToolOutput::text(arguments.to_string()))
    }
}

fn web() -> WebFetchSettings {
    WebFetchSettings {
        allowed_domains: None,
        max_bytes: 1024,
        timeout: Duration::from_secs(5),
    }
}

fn selection(allow: &[&str], deny: &[&str]) -> ToolSelection {
    ToolSelection {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        deny: deny.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn builtins_are_all_offered_by_default_with_object_schemas() {
    let registry = ToolRegistry::with_builtins(ToolSelection::all(), None, web()).unwrap();
    let mut names: Vec<String> = registry.specs().into_iter().map(|s| s.name).collect();
    names.sort();
    let mut expected: Vec<String> = BUILTIN_TOOLS.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(names, expected);
    for spec in registry.specs() {
        assert_eq!(spec.parameters["type"], "object", "{}", spec.name);
        assert_eq!(
            spec.parameters["additionalProperties"], false,
            "{}",
            spec.name
        );
        assert!(spec.description.len() > 40, "{}", spec.name);
    }
}

#[tokio::test]
async fn allow_and_deny_filter_offers_and_calls() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    let mut registry = ToolRegistry::with_builtins(
        selection(&["read", "write", "memory_search"], &["write"]),
        None,
        web(),
    )
    .unwrap();
    registry.register(Arc::new(Echo("memory_search"))).unwrap();
    let names: Vec<String> = registry.specs().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["memory_search", "read"]);
    assert_eq!(registry.names(), vec!["memory_search", "read"]);

    // Denied and not-allowed tools are refused even when called by name.
    for name in ["write", "exec", "edit"] {
        let r = registry
            .call(name, &ctx, json!({"path": "x", "content": "y"}))
            .await;
        assert!(matches!(r, Err(ToolError::Refused(_))), "{name}: {r:?}");
    }
    assert_eq!(common::tree(&fx.users()), Vec::<String>::new());
    // Unknown tools are an argument error that lists what exists.
    match registry.call("rm", &ctx, json!({})).await {
        Err(ToolError::InvalidArguments(m)) => assert!(m.contains("memory_search, read"), "{m}"),
        other => panic!("{other:?}"),
    }
    let out = registry
        .call("memory_search", &ctx, json!({"q": 1}))
        .await
        .unwrap();
    assert_eq!(out.content, "{\"q\":1}");

    // Another selection over the same tools.
    let everything_but_exec = registry.with_selection(selection(&["*"], &["exec"]));
    assert!(everything_but_exec.names().contains(&"write"));
    assert!(!everything_but_exec.names().contains(&"exec"));
    let nothing = registry.with_selection(selection(&[], &["*"]));
    assert!(nothing.specs().is_empty());
}

#[test]
fn registration_errors() {
    let mut registry = ToolRegistry::with_builtins(ToolSelection::all(), None, web()).unwrap();
    assert_eq!(
        registry.register(Arc::new(Echo("read"))),
        Err(RegistryError::Duplicate("read".into()))
    );
    assert!(matches!(
        registry.register(Arc::new(Echo("Bad Name"))),
        Err(RegistryError::InvalidName(_))
    ));
    assert!(registry.register(Arc::new(Echo("memory_search"))).is_ok());
    assert_eq!(registry.registered_names().len(), 6);
}
