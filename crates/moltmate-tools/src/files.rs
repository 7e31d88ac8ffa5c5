//! `read`, `write` and `edit`: the user's files, confined by [`crate::paths`].
//!
//! All filesystem work runs on the blocking pool; every open is beneath-resolved; every write is
//! atomic (temp file, fsync, rename), so a crash leaves either the old or the new content.

use crate::args;
use crate::paths::{self, Opened, Target};
use async_trait::async_trait;
use moltmate_core::model::ToolSpec;
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use rustix::fs::FileType;
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
/// Most directory entries read to make a listing: a directory of millions costs bounded work.
pub const LIST_SCAN_MAX: usize = 10_000;
/// Most bytes `read` scans through a file to reach `offset` and fill its output; a huge
/// (sparse) file costs bounded work. Past it the model is told to continue from a later line.
pub const READ_SCAN_MAX: u64 = 64 * 1024 * 1024;
/// Longest a file tool's filesystem work may take before the call is abandoned.
pub const FILE_TOOL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
/// Bytes inspected for a NUL to call a file binary.
const SNIFF_BYTES: usize = 8 * 1024;

const PATH_DOC: &str = "Relative to your home directory (also accepted as /workspace/...). Use family/... for the shared family folder.";

/// Runs a file tool's work on the blocking pool, abandoning it after [`FILE_TOOL_DEADLINE`]
/// (the model gets an error result; the runtime is never held).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ToolError> + Send + 'static,
) -> Result<T, ToolError> {
    match moltmate_core::blocking::run("file tool", FILE_TOOL_DEADLINE, f).await {
        Ok(result) => result,
        Err(e @ moltmate_core::blocking::BlockingError::TimedOut { .. }) => Err(ToolError::Failed(
            format!("the file operation took too long and was abandoned ({e})"),
        )),
        Err(e) => Err(ToolError::Fatal(format!("file tool task failed: {e}"))),
    }
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
            parameters: std::sync::Arc::new(json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": PATH_DOC},
                    "offset": {"type": "integer", "minimum": 1, "description": "First line to return, 1-based. Default 1."},
                    "limit": {"type": "integer", "minimum": 1, "description": "Maximum number of lines to return. Default: all (up to 256 KiB)."}
                },
                "required": ["path"],
                "additionalProperties": false
            })),
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
    // A FIFO, socket or device planted by the user's code is refused without being opened.
    match paths::open_checked(&root, &target.rel, &target.shown)? {
        Opened::Directory(fd) => list_directory(fd, &target.shown),
        Opened::File(fd, stat) => {
            refuse_hard_link(&stat, &target.shown)?;
            read_text(fd, &target.shown, offset, limit)
        }
    }
}

fn list_directory(fd: OwnedFd, shown: &str) -> Result<ToolOutput, ToolError> {
    let dir = rustix::fs::Dir::new(fd).map_err(|e| paths::open_error(e, shown))?;
    let mut entries = Vec::new();
    let mut complete = true;
    for entry in dir {
        let entry = entry.map_err(|e| paths::open_error(e, shown))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        if entries.len() >= LIST_SCAN_MAX {
            complete = false;
            break;
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
    let counted = if complete {
        format!("{total} entries")
    } else {
        format!("more than {LIST_SCAN_MAX} entries; only the first {LIST_SCAN_MAX} the filesystem returned were read, in no useful order")
    };
    let mut out = if total == 0 {
        format!("`{shown}` is an empty directory.")
    } else {
        format!("Directory `{shown}` ({counted}; `/` marks directories, `@` symbolic links):\n")
    };
    for entry in entries.iter().take(LIST_MAX_ENTRIES) {
        out.push_str(entry);
        out.push('\n');
    }
    if total > LIST_MAX_ENTRIES {
        out.push_str(&format!(
            "[{} more entries not shown{}]\n",
            total - LIST_MAX_ENTRIES,
            if complete {
                ""
            } else {
                ", and more beyond those"
            }
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
    let mut scanned: u64 = 0;
    let mut scan_exhausted = false;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Never more than the output cap (plus one byte, to see it is exceeded) per line, and
        // never more than the scan budget in total: a file of one endless line, or a sparse
        // file of any apparent size, costs bounded memory and work.
        let line_cap = (READ_OUTPUT_CAP as u64 + 1).min(READ_SCAN_MAX - scanned);
        if line_cap == 0 {
            scan_exhausted = true;
            break;
        }
        let n = (&mut reader)
            .take(line_cap)
            .read_until(b'\n', &mut buf)
            .map_err(io_error)?;
        if n == 0 {
            break;
        }
        scanned += n as u64;
        let whole_line = buf.ends_with(b"\n") || n as u64 != line_cap;
        if !whole_line && line_cap <= READ_OUTPUT_CAP as u64 {
            // Cut by the scan budget, not by the line's own length.
            scan_exhausted = true;
            break;
        }
        if !whole_line {
            // The rest of this line is longer than the output cap: skip it without keeping it.
            loop {
                let room = READ_SCAN_MAX - scanned;
                if room == 0 {
                    break;
                }
                let mut rest = Vec::new();
                let m = (&mut reader)
                    .take(room.min(64 * 1024))
                    .read_until(b'\n', &mut rest)
                    .map_err(io_error)?;
                scanned += m as u64;
                if m == 0 || rest.ends_with(b"\n") {
                    break;
                }
            }
        }
        line_no += 1;
        if line_no < offset {
            continue;
        }
        if limit.is_some_and(|l| returned >= l) {
            more_after_limit = true;
            break;
        }
        if !whole_line || out.len() + buf.len() > READ_OUTPUT_CAP {
            cut_at = Some(line_no);
            break;
        }
        let text = std::str::from_utf8(&buf).map_err(|_| binary_refusal(shown))?;
        out.push_str(text);
        returned += 1;
    }
    if scan_exhausted && returned == 0 && cut_at.is_none() {
        return Ok(ToolOutput::text(format!(
            "`{shown}` is too large to scan to line {offset}: read looked through the first {} MiB ({line_no} lines) only. Use exec (e.g. `tail`, `sed -n`) for the rest.",
            READ_SCAN_MAX / (1024 * 1024)
        )));
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
    } else if scan_exhausted {
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!(
            "[read stops scanning after {} MiB: showed lines {offset}-{last}; continue with offset={}]",
            READ_SCAN_MAX / (1024 * 1024),
            last + 1
        ));
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
            parameters: std::sync::Arc::new(json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": PATH_DOC},
                    "content": {"type": "string", "description": "The complete new content of the file."}
                },
                "required": ["path", "content"],
                "additionalProperties": false
            })),
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
            parameters: std::sync::Arc::new(json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": PATH_DOC},
                    "old_text": {"type": "string", "minLength": 1, "description": "The exact text to replace, including whitespace and line breaks. Must occur exactly once."},
                    "new_text": {"type": "string", "description": "The replacement text (may be empty to delete old_text)."}
                },
                "required": ["path", "old_text", "new_text"],
                "additionalProperties": false
            })),
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
    // The file itself is opened beneath the root too (it may be a symlink within the root),
    // and only if it is a regular file (a FIFO is refused without being opened).
    let (fd, stat) = match paths::open_checked(&root, &target.rel, shown)? {
        Opened::File(fd, stat) => (fd, stat),
        Opened::Directory(_) => return Err(ToolError::Failed(format!("`{shown}` is a directory"))),
    };
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
    let mode = stat.st_mode & 0o777;
    paths::atomic_write(&parent, &name, updated.as_bytes(), mode, shown)?;
    Ok(ToolOutput::text(format!(
        "Edited `{shown}`: replaced 1 occurrence."
    )))
}
