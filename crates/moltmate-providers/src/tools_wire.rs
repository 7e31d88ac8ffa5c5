//! The `tools` array of a request body, kept per provider for the tool lists it saw last.
//!
//! Every model call offers the turn's tools, and their JSON schemas were serialised anew each
//! time (~1 % of a lone Telegram user's CPU per message, more with tool loops). The specs
//! are built once per tool (`ToolBox::register`, the schedule tool's schema is a static), so
//! a list is recognised by each spec's name, description and the *pointer* of its schema:
//! comparing those is a few string compares, not a walk of JSON. The kept list holds clones
//! of those `Arc`s, so a schema's memory cannot be freed and reused by another schema while
//! its bytes are kept (no false hit by a recycled address). Tool specs are the gateway's, not
//! a user's: a hit gives exactly the bytes the same specs would be encoded to. Bounded:
//! [`KEPT_LISTS`] lists of at most [`KEPT_LIST_BYTES`] each.

use moltmate_core::model::ToolSpec;
use std::sync::{Arc, Mutex};

/// Tool lists kept at most (a gateway has a handful: per trust level, with or without
/// `schedule`, ...; a miss is only the old cost).
const KEPT_LISTS: usize = 8;

/// A list whose bytes are longer is not kept.
const KEPT_LIST_BYTES: usize = 256 * 1024;

#[derive(Default)]
pub(crate) struct ToolsWire {
    kept: Mutex<Vec<Kept>>,
}

struct Kept {
    specs: Vec<ToolSpec>,
    bytes: Vec<u8>,
}

fn same(kept: &[ToolSpec], tools: &[ToolSpec]) -> bool {
    kept.len() == tools.len()
        && kept.iter().zip(tools).all(|(a, b)| {
            a.name == b.name
                && a.description == b.description
                && Arc::ptr_eq(&a.parameters, &b.parameters)
        })
}

impl ToolsWire {
    /// Appends the `tools` value for `tools` to `out`: the kept bytes, or what `encode` writes
    /// (then kept). `encode` must write the same bytes for the same specs every time.
    pub(crate) fn write(
        &self,
        tools: &[ToolSpec],
        out: &mut Vec<u8>,
        encode: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    ) -> serde_json::Result<()> {
        {
            let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hit) = kept.iter().find(|k| same(&k.specs, tools)) {
                out.extend_from_slice(&hit.bytes);
                return Ok(());
            }
        }
        let start = out.len();
        encode(out)?;
        let made = out.get(start..).unwrap_or_default();
        if made.len() <= KEPT_LIST_BYTES {
            let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            if !kept.iter().any(|k| same(&k.specs, tools)) {
                if kept.len() >= KEPT_LISTS {
                    kept.remove(0);
                }
                kept.push(Kept {
                    specs: tools.to_vec(),
                    bytes: made.to_vec(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, schema: &Arc<serde_json::Value>) -> ToolSpec {
        ToolSpec {
            name: name.to_string(),
            description: format!("{name} things"),
            parameters: Arc::clone(schema),
        }
    }

    fn written(wire: &ToolsWire, tools: &[ToolSpec], calls: &mut usize) -> Vec<u8> {
        let mut out = Vec::new();
        wire.write(tools, &mut out, |out| {
            *calls += 1;
            serde_json::to_writer(out, tools)
        })
        .unwrap();
        out
    }

    #[test]
    fn a_list_is_reused_only_for_the_same_names_descriptions_and_schemas() {
        let wire = ToolsWire::default();
        let a = Arc::new(serde_json::json!({"type": "object"}));
        let b = Arc::new(serde_json::json!({"type": "object"}));
        let mut calls = 0;
        let first = written(&wire, &[spec("read", &a)], &mut calls);
        assert_eq!(written(&wire, &[spec("read", &a)], &mut calls), first);
        assert_eq!(calls, 1, "the same specs are encoded once");
        // An equal schema at another address, another name, another description, another
        // length: each encoded afresh, with its own bytes.
        let other_schema = written(&wire, &[spec("read", &b)], &mut calls);
        assert_eq!(calls, 2);
        assert_eq!(other_schema, first);
        let renamed = written(&wire, &[spec("write", &a)], &mut calls);
        assert_eq!(calls, 3);
        assert_ne!(renamed, first);
        let mut described = spec("read", &a);
        described.description = "something else".into();
        assert_ne!(written(&wire, &[described], &mut calls), first);
        assert_eq!(calls, 4);
        assert_ne!(
            written(&wire, &[spec("read", &a), spec("write", &a)], &mut calls),
            first
        );
        assert_eq!(calls, 5);
        assert!(written(&wire, &[], &mut calls) == b"[]");
        // Bounded: older lists make way.
        for n in 0..2 * KEPT_LISTS {
            written(&wire, &[spec(&format!("t{n}"), &a)], &mut calls);
        }
        assert_eq!(wire.kept.lock().unwrap().len(), KEPT_LISTS);
    }
}
