//! The age of the last backup, from the marker `moltmate backup` writes when it finishes:
//! `<home>/backups/last.json`, `{ "finishedAt": <unix milliseconds>, "file": "<path>" }`
//! (extra fields are ignored). Missing: "no backup yet".

use moltmate_core::doctor::Check;
use serde::Deserialize;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the marker lives, relative to the home.
pub const BACKUP_MARKER: &str = "backups/last.json";
/// Older backups are reported.
pub const BACKUP_MAX_AGE_DAYS: u64 = 7;
const MAX_MARKER_BYTES: u64 = 64 * 1024;
const ID: &str = "backup.age";
const TITLE: &str = "Recent backup";

/// The marker's content.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupMarker {
    /// When the backup finished, in milliseconds since the Unix epoch.
    pub finished_at: u64,
    /// The archive written.
    pub file: String,
}

fn read_marker(path: &Path) -> Result<Option<BackupMarker>, String> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    let mut text = String::new();
    file.take(MAX_MARKER_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("not a backup marker ({e})"))
}

fn age_text(age: Duration) -> String {
    let plural = |n: u64, unit: &str| format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" });
    match age.as_secs() {
        s if s < 3600 => plural(s / 60, "minute"),
        s if s < 48 * 3600 => plural(s / 3600, "hour"),
        s => plural(s / 86_400, "day"),
    }
}

pub(crate) fn check(home: &Path, now: SystemTime) -> Check {
    let path = home.join(BACKUP_MARKER);
    let fix = "run `moltmate backup FILE` (e.g. daily from a systemd timer or cron)";
    let marker = match read_marker(&path) {
        Ok(Some(marker)) => marker,
        Ok(None) => return Check::warn(ID, TITLE, "no backup yet", fix),
        Err(e) => return Check::warn(ID, TITLE, format!("{}: {e}", path.display()), fix),
    };
    let finished = UNIX_EPOCH + Duration::from_millis(marker.finished_at);
    let age = now.duration_since(finished).unwrap_or(Duration::ZERO);
    let file_present = std::fs::symlink_metadata(&marker.file).is_ok();
    let when = age_text(age);
    if age > Duration::from_secs(BACKUP_MAX_AGE_DAYS * 86_400) {
        Check::warn(
            ID,
            TITLE,
            format!(
                "the last backup finished {when} (older than {BACKUP_MAX_AGE_DAYS} days): {}",
                marker.file
            ),
            fix,
        )
    } else {
        let kept = if file_present {
            ""
        } else {
            " (no longer on this machine: kept elsewhere?)"
        };
        Check::pass(
            ID,
            TITLE,
            format!("the last backup finished {when}: {}{kept}", marker.file),
        )
    }
}
