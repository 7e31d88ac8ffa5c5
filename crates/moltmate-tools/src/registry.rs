//! The set of tools offered to the model, filtered by `tools.allow` / `tools.deny`.
//!
//! The model is offered only allowed tools ([`ToolRegistry::specs`]), and [`ToolRegistry::call`]
//! enforces the same selection again: a model may name a tool it was never offered.

use crate::{
    EditTool, ExecTool, ReadTool, WebFetchError, WebFetchSettings, WebFetchTool, WriteTool,
};
use moltmate_core::model::ToolSpec;
use moltmate_core::sandbox::Sandbox;
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Names of the built-in tools.
pub const BUILTIN_TOOLS: [&str; 5] = ["read", "write", "edit", "exec", "web_fetch"];

/// `tools.allow` / `tools.deny`. An empty `allow` (or one containing `*`) allows every tool;
/// `deny` always wins (`*` denies everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolSelection {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl ToolSelection {
    /// Every tool.
    pub fn all() -> Self {
        ToolSelection::default()
    }

    pub fn permits(&self, name: &str) -> bool {
        let listed = |list: &[String]| list.iter().any(|entry| entry == name || entry == "*");
        let allowed = self.allow.is_empty() || listed(&self.allow);
        allowed && !listed(&self.deny)
    }
}

/// Why a tool could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("a tool named `{0}` is already registered")]
    Duplicate(String),
    #[error("tool name {0:?} is invalid: use 1-64 characters of a-z, 0-9 and '_'")]
    InvalidName(String),
}

impl RegistryError {
    /// Programming errors in the wiring; retrying never helps.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Duplicate(_) | RegistryError::InvalidName(_) => false,
        }
    }
}

/// Registered tools plus the selection in force.
#[derive(Clone)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
    selection: ToolSelection,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRegistry")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .field("selection", &self.selection)
            .finish()
    }
}

impl ToolRegistry {
    /// An empty registry using `selection`.
    pub fn new(selection: ToolSelection) -> Self {
        ToolRegistry {
            tools: BTreeMap::new(),
            selection,
        }
    }

    /// The five built-in tools. `sandbox: None` keeps `exec` registered but refusing (with an
    /// install hint), so the model learns why rather than not seeing the tool.
    pub fn with_builtins(
        selection: ToolSelection,
        sandbox: Option<Arc<dyn Sandbox>>,
        web_fetch: WebFetchSettings,
    ) -> Result<Self, WebFetchError> {
        let mut registry = ToolRegistry::new(selection);
        let builtins: [Arc<dyn Tool>; 5] = [
            Arc::new(ReadTool),
            Arc::new(WriteTool),
            Arc::new(EditTool),
            Arc::new(ExecTool::new(sandbox)),
            Arc::new(WebFetchTool::new(web_fetch)?),
        ];
        for tool in builtins {
            let name = tool.spec().name;
            // Proven invariant: the built-in names are distinct and valid.
            registry.tools.insert(name, tool);
        }
        Ok(registry)
    }

    /// Adds a tool (e.g. the gateway's `memory_search`). Its spec name is its call name.
    pub fn register(&mut self, tool: Arc<dyn Tool>) -> Result<(), RegistryError> {
        let name = tool.spec().name;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(RegistryError::InvalidName(name));
        }
        if self.tools.contains_key(&name) {
            return Err(RegistryError::Duplicate(name));
        }
        self.tools.insert(name, tool);
        Ok(())
    }

    /// The same tools under another selection (per-user trust levels); tools are shared.
    pub fn with_selection(&self, selection: ToolSelection) -> Self {
        ToolRegistry {
            tools: self.tools.clone(),
            selection,
        }
    }

    pub fn selection(&self) -> &ToolSelection {
        &self.selection
    }

    /// Names of the tools the selection allows, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tools
            .keys()
            .map(String::as_str)
            .filter(|name| self.selection.permits(name))
            .collect()
    }

    /// Every registered name, allowed or not (for config validation and diagnostics).
    pub fn registered_names(&self) -> Vec<&str> {
        self.tools.keys().map(String::as_str).collect()
    }

    /// Specs of the allowed tools, sorted by name: what the model is offered.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools
            .iter()
            .filter(|(name, _)| self.selection.permits(name))
            .map(|(_, tool)| tool.spec())
            .collect()
    }

    /// Calls an allowed tool. Unknown names are an argument error for the model; registered but
    /// not allowed ones are refused.
    pub async fn call(
        &self,
        name: &str,
        ctx: &ToolContext,
        arguments: serde_json::Value,
    ) -> Result<ToolOutput, ToolError> {
        let Some(tool) = self.tools.get(name) else {
            let available = self.names().join(", ");
            return Err(ToolError::InvalidArguments(format!(
                "there is no tool named `{name}`; available tools: {}",
                if available.is_empty() {
                    "(none)"
                } else {
                    &available
                }
            )));
        };
        if !self.selection.permits(name) {
            return Err(ToolError::Refused(format!(
                "the tool `{name}` is not enabled for you"
            )));
        }
        tool.call(ctx, arguments).await
    }
}
