//! The tools offered to the model: `read`, `write`, `edit`, `exec`, `web_fetch` and
//! `web_search`. Which of them a user is offered (and may call) is decided per user by the
//! gateway's `ToolBox` from `tools.allow` / `tools.deny` and the user's trust level.
//!
//! Every tool trusts nothing in its arguments: file paths are resolved by the kernel beneath the
//! caller's home or family folder (`openat2` with `RESOLVE_BENEATH`), commands run only in the caller's sandbox after the
//! exec policy vetted them, fetches reach only public addresses, re-checked after DNS and on
//! every redirect, and searches send only an encoded query to the operator's search service.

mod args;
mod exec;
mod files;
pub mod html;
mod paths;
mod send_file;
mod web_fetch;
pub mod web_search;

pub use exec::{ExecTool, NO_SANDBOX_MESSAGE};
pub use files::{
    EditTool, ReadTool, WriteTool, EDIT_MAX_BYTES, FILE_TOOL_DEADLINE, LIST_SCAN_MAX,
    READ_OUTPUT_CAP, READ_SCAN_MAX, WRITE_MAX_BYTES,
};
pub use send_file::{SendFileTool, SEND_FILE_MAX_BYTES};
pub use web_fetch::{WebFetchError, WebFetchSettings, WebFetchTool, MAX_REDIRECTS};
pub use web_search::{
    SearchApiKey, SearchBackend, SearchError, SearchHit, SearchProviderSettings, SearchQuery,
    WebSearchError, WebSearchSettings, WebSearchTool,
};
