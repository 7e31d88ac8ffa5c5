//! `read`, `write` and `edit`: the user's files, confined by [`crate::paths`].
//!
//! All filesystem work runs on the blocking pool; every open is beneath-resolved; every write is
//! atomic (temp file, fsync, rename), so a crash leaves either the old or the new content.

use crate::args;
use crate::paths::{self, Target};
use async_trait::async_trait;
use moltmate_core::model::ToolSpec;
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use rustix::fs::{FileType, OFlags};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;

/// Most text `read` returns in one call; the model continues with `offset`.
pub const READ_OUTPUT_CAP: usize = 256 * 1024;
/// Largest file `edit` loads (it must hold the whole file to replace within it).
pub const EDIT_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// Largest `content` `write` accepts.
pub const WRITE_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Most directory entries listed.
const LIST_MAX_ENTRIES: usize = 1000;
/// Bytes inspected for a NUL to call a file binary.
const SNIFF_BYTES: usize = 8 * 1024;

const PATH_DOC: &str = "Relative to your home directory (also accepted as /workspace/...). Use family/... for the shared family folder.";

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ToolError> + Send + 'static,
) -> Result<T, ToolError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ToolError::Fatal(format!("file tool task failed: {e}")))?
}

fn refuse_read_only(ctx: &ToolContext, tool: &str) -> Result<(), ToolError> {
    if ctx.read_only {
        Err(ToolError::Refused(format!(
            "`{tool}` is not available: your files are read-only"
        )))
    } else {
        Ok(())
    }
}

/// `read {path, offset?, limit?}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    path: String,
    offset: Option<u64>,
    limit: Option<u64>,
}

#[async_trait]
impl Tool for ReadTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "read".into(),
            description: "Read a text file, or list a directory's entries. Returns the file's text; for long files use offset and limit (in lines) to read a part. Binary files are refused.".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": PATH_DOC},
                    "offset": {"type": "integer", "minimum": 1, "description": "First line to return, 1-based. Default 1."},
                    "limit": {"type": "integer", "minimum": 1, "description": "Maximum number of lines to return. Default: all (up to 256 KiB)."}
                },
                "required": ["path"],
                "additionalProperties": false
            }),
        }
    }

    async fn call(&self, ctx: &ToolContext, arguments: Value) -> Result<ToolOutput, ToolError> {
        let args: ReadArgs = args::parse("read", arguments)?;
        if args.offset == Some(0) {
            return Err(ToolError::InvalidArguments(
                "offset is 1-based: the first line is 1".into(),
            ));
        }
        if args.limit == Some(0) {
            return Err(ToolError::InvalidArguments(
                "limit must be at least 1".into(),
            ));
        }
        let target = paths::target(ctx, &args.path)?;
        blocking(move || read_blocking(&target, args.offset.unwrap_or(1), args.limit)).await
    }
}

fn read_blocking(
    target: &Target,
    offset: u64,
    limit: Option<u64>,
) -> Result<ToolOutput, ToolError> {
    let root = paths::open_root(target)?;
    // NONBLOCK: opening a FIFO planted by the user's code must not hang the tool.
    let fd = paths::open_beneath(
        &root,
        &target.rel,
        OFlags::RDONLY | OFlags::NONBLOCK,
        &target.shown,
    )?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| paths::open_error(e, &target.shown))?;
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::Directory => list_directory(fd, &target.shown),
        FileType::RegularFile => {
            refuse_hard_link(&stat, &target.shown)?;
            read_text(fd, &target.shown, offset, limit)
        }
        _ => Err(ToolError::Refused(format!(
            "`{}` is not a regular file or directory",
            target.shown
        ))),
    }
}

fn list_directory(fd: OwnedFd, shown: &str) -> Result<ToolOutput, ToolError> {
    let dir = rustix::fs::Dir::new(fd).map_err(|e| paths::open_error(e, shown))?;
    let mut entries = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| paths::open_error(e, shown))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        let suffix = match entry.file_type() {
            FileType::Directory => "/",
            FileType::Symlink => "@",
            _ => "",
        };
        entries.push(format!("{name}{suffix}"));
    }
    entries.sort();
    let total = entries.len();
    let mut out = if total == 0 {
        format!("`{shown}` is an empty directory.")
    } else {
        format!(
            "Directory `{shown}` ({total} entries; `/` marks directories, `@` symbolic links):\n"
        )
    };
    for entry in entries.iter().take(LIST_MAX_ENTRIES) {
        out.push_str(entry);
        out.push('\n');
    }
    if total > LIST_MAX_ENTRIES {
        out.push_str(&format!(
            "[{} more entries not shown]\n",
            total - LIST_MAX_ENTRIES
        ));
    }
    Ok(ToolOutput::text(out))
}

/// A regular file with several links may share its inode with a file outside the root (a hard
/// link is not a path, so beneath-resolution cannot see where else it lives). Defence in depth:
/// homes on their own mount cannot hold such links at all.
fn refuse_hard_link(stat: &rustix::fs::Stat, shown: &str) -> Result<(), ToolError> {
    if stat.st_nlink > 1 {
        Err(ToolError::Refused(format!(
            "`{shown}` has {} hard links; hard-linked files are not opened because another link may be outside your files. Copy it (cp) and use the copy",
            stat.st_nlink
        )))
    } else {
        Ok(())
    }
}

fn binary_refusal(shown: &str) -> ToolError {
    ToolError::Refused(format!(
        "`{shown}` is a binary (non-UTF-8) file; read only handles text. Use exec (e.g. `file`, `xxd`) to inspect it."
    ))
}

fn read_text(
    fd: OwnedFd,
    shown: &str,
    offset: u64,
    limit: Option<u64>,
) -> Result<ToolOutput, ToolError> {
    let size = rustix::fs::fstat(&fd).map(|s| s.st_size).unwrap_or(0);
    let mut reader = BufReader::with_capacity(64 * 1024, std::fs::File::from(fd));
    let io_error = |e: std::io::Error| ToolError::Failed(format!("reading `{shown}`: {e}"));
    {
        let head = reader.fill_buf().map_err(io_error)?;
        if head[..head.len().min(SNIFF_BYTES)].contains(&0) {
            return Err(binary_refusal(shown));
        }
    }
    let mut out = String::new();
    let mut line_no: u64 = 0;
    let mut returned: u64 = 0;
    let mut cut_at: Option<u64> = None;
    let mut more_after_limit = false;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io_error)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if line_no < offset {
            continue;
        }
        if limit.is_some_and(|l| returned >= l) {
            more_after_limit = true;
            break;
        }
        let text = std::str::from_utf8(&buf).map_err(|_| binary_refusal(shown))?;
        if out.len() + text.len() > READ_OUTPUT_CAP {
            cut_at = Some(line_no);
            break;
        }
        out.push_str(text);
        returned += 1;
    }
    if returned == 0 && offset > 1 && cut_at.is_none() {
        return Ok(ToolOutput::text(format!(
            "`{shown}` has {line_no} lines; offset {offset} is past the end."
        )));
    }
    if returned == 0 && cut_at.is_none() {
        return Ok(ToolOutput::text(format!("`{shown}` is empty.")));
    }
    let last = offset + returned.saturating_sub(1);
    if let Some(next) = cut_at {
        if !out.ends_with('\n') {
            out.push('\n');
        }
        if returned == 0 {
            out.push_str(&format!(
                "[line {next} alone is longer than {} KiB and cannot be shown with read; use exec (e.g. `cut`, `head -c`)]",
                READ_OUTPUT_CAP / 1024
            ));
        } else {
            out.push_str(&format!(
                "[output capped at {} KiB: showed lines {offset}-{last} of a {size}-byte file; continue with offset={next}]",
                READ_OUTPUT_CAP / 1024
            ));
        }
    } else if more_after_limit {
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!(
            "[showed lines {offset}-{last}; more lines follow, continue with offset={}]",
            last + 1
        ));
    }
    Ok(ToolOutput::text(out))
}

/// `write {path, content}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    path: String,
    content: String,
}

#[async_trait]
impl Tool for WriteTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "write".into(),
            description: "Create a file or replace its whole content. Missing parent directories are created. The write is atomic: the file has either the old or the new content, never a mix.".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": PATH_DOC},
                    "content": {"type": "string", "description": "The complete new content of the file."}
                },
                "required": ["path", "content"],
                "additionalProperties": false
            }),
        }
    }

    async fn call(&self, ctx: &ToolContext, arguments: Value) -> Result<ToolOutput, ToolError> {
        let args: WriteArgs = args::parse("write", arguments)?;
        refuse_read_only(ctx, "write")?;
        if args.content.len() > WRITE_MAX_BYTES {
            return Err(ToolError::InvalidArguments(format!(
                "content is {} bytes; write accepts at most {} MiB",
                args.content.len(),
                WRITE_MAX_BYTES / (1024 * 1024)
            )));
        }
        let target = paths::target(ctx, &args.path)?;
        blocking(move || {
            let root = paths::open_root(&target)?;
            let (parent, name) = paths::open_parent(&root, &target, true)?;
            let mode = paths::existing_mode(&parent, &name).unwrap_or(0o644);
            paths::atomic_write(&parent, &name, args.content.as_bytes(), mode, &target.shown)?;
            Ok(ToolOutput::text(format!(
                "Wrote {} bytes to `{}`.",
                args.content.len(),
                target.shown
            )))
        })
        .await
    }
}

/// `edit {path, old_text, new_text}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EditTool;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EditArgs {
    path: String,
    old_text: String,
    new_text: String,
}

#[async_trait]
impl Tool for EditTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "edit".into(),
            description: "Replace one exact piece of text in a file. old_text must occur exactly once in the file (include enough surrounding lines to make it unique); it is replaced by new_text. The change is atomic.".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": PATH_DOC},
                    "old_text": {"type": "string", "minLength": 1, "description": "The exact text to replace, including whitespace and line breaks. Must occur exactly once."},
                    "new_text": {"type": "string", "description": "The replacement text (may be empty to delete old_text)."}
                },
                "required": ["path", "old_text", "new_text"],
                "additionalProperties": false
            }),
        }
    }

    async fn call(&self, ctx: &ToolContext, arguments: Value) -> Result<ToolOutput, ToolError> {
        let args: EditArgs = args::parse("edit", arguments)?;
        refuse_read_only(ctx, "edit")?;
        if args.old_text.is_empty() {
            return Err(ToolError::InvalidArguments(
                "old_text must not be empty".into(),
            ));
        }
        let target = paths::target(ctx, &args.path)?;
        blocking(move || edit_blocking(&target, &args.old_text, &args.new_text)).await
    }
}

fn edit_blocking(target: &Target, old_text: &str, new_text: &str) -> Result<ToolOutput, ToolError> {
    let shown = target.shown.as_str();
    let root = paths::open_root(target)?;
    let (parent, name) = paths::open_parent(&root, target, false)?;
    // The file itself is opened beneath the root too (it may be a symlink within the root).
    let fd = paths::open_beneath(&root, &target.rel, OFlags::RDONLY | OFlags::NONBLOCK, shown)?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| paths::open_error(e, shown))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(ToolError::Refused(format!(
            "`{shown}` is not a regular file"
        )));
    }
    refuse_hard_link(&stat, shown)?;
    if stat.st_size as u64 > EDIT_MAX_BYTES {
        return Err(ToolError::Refused(format!(
            "`{shown}` is {} bytes; edit handles files up to {} MiB (use exec with sed for larger ones)",
            stat.st_size,
            EDIT_MAX_BYTES / (1024 * 1024)
        )));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(EDIT_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ToolError::Failed(format!("reading `{shown}`: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| binary_refusal(shown))?;
    let count = text.matches(old_text).count();
    match count {
        1 => {}
        0 => {
            return Err(ToolError::Failed(format!(
                "old_text was not found in `{shown}` (0 occurrences); read the file and copy the text exactly, including whitespace"
            )))
        }
        n => {
            return Err(ToolError::Failed(format!(
                "old_text occurs {n} times in `{shown}`; it must occur exactly once. Include more surrounding text to make it unique"
            )))
        }
    }
    let updated = text.replacen(old_text, new_text, 1);
    let mode = stat.st_mode & 0o7777;
    paths::atomic_write(&parent, &name, updated.as_bytes(), mode, shown)?;
    Ok(ToolOutput::text(format!(
        "Edited `{shown}`: replaced 1 occurrence."
    )))
}
