//! `send_file {path, caption?}`: sends a file from the caller's own home to the caller, on the
//! channel and chat their message came from (the tool context's outlet, never anything the model
//! names); on the web chat and the API, where nothing is pushed, a copy is put up for download
//! behind a link only the same user can open. The path is confined like every file tool (`openat2` beneath the home, no symlinks,
//! `O_PATH` look first so a FIFO or device is refused without being opened, no hard-linked
//! files), the size is capped before reading and the read is bounded, all on the blocking pool.

use crate::args;
use crate::paths::{self, Opened};
use async_trait::async_trait;
use moltmate_core::channel::{ChannelError, OutboundFile};
use moltmate_core::model::ToolSpec;
use moltmate_core::tool::{FileOutlet, Tool, ToolContext, ToolError, ToolOutput};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::Read;

/// Default cap on a file sent (Telegram bots may upload up to 50 MB).
pub const SEND_FILE_MAX_BYTES: u64 = 20 << 20;

/// The `send_file` tool.
#[derive(Debug, Clone, Copy)]
pub struct SendFileTool {
    max_bytes: u64,
}

impl Default for SendFileTool {
    fn default() -> Self {
        SendFileTool {
            max_bytes: SEND_FILE_MAX_BYTES,
        }
    }
}

impl SendFileTool {
    pub fn new(max_bytes: u64) -> Self {
        SendFileTool { max_bytes }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Arguments {
    path: String,
    caption: Option<String>,
}

#[async_trait]
impl Tool for SendFileTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "send_file".into(),
            description: format!(
                "Send a file from your files to the user, in the chat they wrote from (e.g. a document you made for them). At most {} MB.",
                self.max_bytes >> 20
            ),
            parameters: std::sync::Arc::new(json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Relative to your home directory (also accepted as /workspace/...)."},
                    "caption": {"type": "string", "description": "A short text sent with the file."}
                },
                "required": ["path"],
                "additionalProperties": false
            })),
        }
    }

    async fn call(&self, ctx: &ToolContext, arguments: Value) -> Result<ToolOutput, ToolError> {
        let args: Arguments = args::parse("send_file", arguments)?;
        let Some(outlet) = ctx.outlet.clone() else {
            return Err(ToolError::Refused(
                "this chat cannot receive files; tell the user where the file is instead".into(),
            ));
        };
        let target = paths::target(ctx, &args.path)?;
        let max = self.max_bytes;
        let shown = target.shown.clone();
        let (name, content) = match moltmate_core::blocking::run(
            "send_file",
            crate::files::FILE_TOOL_DEADLINE,
            move || read_file(&target, max),
        )
        .await
        {
            Ok(result) => result?,
            Err(e) => return Err(ToolError::Failed(format!("reading the file failed: {e}"))),
        };
        let size = content.len();
        let file = OutboundFile {
            file_name: name,
            content,
            caption: args
                .caption
                .map(|c| c.chars().take(1024).collect::<String>()),
        };
        match outlet {
            FileOutlet::Channel { channel, chat_id } => {
                channel
                    .send_file(&chat_id, &file)
                    .await
                    .map_err(|e| ToolError::Failed(format!("sending `{shown}` failed: {e}")))?;
                Ok(ToolOutput::text(format!(
                    "sent `{shown}` ({size} bytes) to the user"
                )))
            }
            FileOutlet::Download { area, notify } => {
                let offered = area.offer(&ctx.user, &file).await.map_err(|e| match e {
                    ChannelError::Rejected { detail, .. } => {
                        ToolError::Refused(format!("`{shown}` cannot be offered: {detail}"))
                    }
                    other => ToolError::Failed(format!("offering `{shown}` failed: {other}")),
                })?;
                notify.file_offered(&offered);
                Ok(ToolOutput::text(format!(
                    "`{shown}` ({size} bytes) is ready for the user to download at {} (only they can open it; the chat shows the link). Mention the link in your answer.",
                    offered.url
                )))
            }
        }
    }
}

fn read_file(target: &paths::Target, max: u64) -> Result<(String, Vec<u8>), ToolError> {
    let root = paths::open_root(target)?;
    let (fd, stat) = match paths::open_checked(&root, &target.rel, &target.shown)? {
        Opened::File(fd, stat) => (fd, stat),
        Opened::Directory(_) => {
            return Err(ToolError::Refused(format!(
                "`{}` is a directory; send a file (pack a folder with exec first)",
                target.shown
            )))
        }
    };
    if stat.st_nlink > 1 {
        return Err(ToolError::Refused(format!(
            "`{}` has {} hard links; copy it and send the copy",
            target.shown, stat.st_nlink
        )));
    }
    let claimed = u64::try_from(stat.st_size).unwrap_or(u64::MAX);
    if claimed > max {
        return Err(ToolError::Refused(format!(
            "`{}` is {claimed} bytes; at most {max} can be sent",
            target.shown
        )));
    }
    let mut content = Vec::new();
    std::fs::File::from(fd)
        .take(max.saturating_add(1))
        .read_to_end(&mut content)
        .map_err(|e| ToolError::Failed(format!("reading `{}`: {e}", target.shown)))?;
    if content.len() as u64 > max {
        return Err(ToolError::Refused(format!(
            "`{}` grew past {max} bytes while being read",
            target.shown
        )));
    }
    let name = target
        .rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_string());
    let name: String = name
        .chars()
        .map(|c| if c.is_control() || c == '"' { '_' } else { c })
        .take(128)
        .collect();
    Ok((name, content))
}
