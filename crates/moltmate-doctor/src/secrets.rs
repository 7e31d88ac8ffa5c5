//! Secrets written into `moltmate.json` instead of referenced as `${VAR}`: the seed's "API keys
//! not in git" and the hardening checklist's credential management (keys in an environment
//! file, 0600). Names key paths and line numbers, never values.

use crate::list_some;
use moltmate_core::doctor::{Check, CheckStatus};
use regex::Regex;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::LazyLock;

const ID: &str = "secrets.plaintext";
const TITLE: &str = "Secrets referenced as ${VAR}, not written into moltmate.json";
/// The config crate refuses larger files; so does this check.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Strings that look like a provider key or a Telegram, Discord or Slack token wherever they are in the
/// text (a key in a comment, under a key name the scan does not know).
static SHAPES: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    [
        ("an Anthropic key", r"sk-ant-[A-Za-z0-9_-]{16,}"),
        ("an OpenAI-style key", r"\bsk-[A-Za-z0-9_-]{20,}"),
        (
            "a Telegram bot token",
            r"\b[0-9]{6,12}:[A-Za-z0-9_-]{30,}\b",
        ),
        ("a Slack token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
        (
            "a Slack app-level token",
            r"\bxapp-[0-9]+-[A-Za-z0-9-]{10,}",
        ),
        (
            "a Discord bot token",
            r"\b[A-Za-z0-9_-]{23,28}\.[A-Za-z0-9_-]{6,7}\.[A-Za-z0-9_-]{27,40}\b",
        ),
    ]
    .into_iter()
    .filter_map(|(what, pattern)| Regex::new(pattern).ok().map(|re| (what, re)))
    .collect()
});

/// The config text and its mode, when it is a readable regular file (a FIFO is not opened for
/// reading: `O_NONBLOCK` and a type check first).
fn read_config(path: &Path) -> Result<Option<(String, u32)>, String> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
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
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("larger than {MAX_CONFIG_BYTES} bytes"));
    }
    Ok(Some((text, meta.permissions().mode() & 0o7777)))
}

fn libc_flags() -> i32 {
    // O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
    rustix::fs::OFlags::NONBLOCK.bits() as i32
}

/// Environment variables `moltmate.json` references (empty when it cannot be read).
pub(crate) fn referenced_vars(home: &Path) -> Vec<String> {
    match read_config(&home.join("moltmate.json")) {
        Ok(Some((text, _))) => moltmate_config::scan_raw(&text, "moltmate.json")
            .map(|scan| scan.env_vars)
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

pub(crate) fn check(home: &Path) -> Check {
    let path = home.join("moltmate.json");
    let (text, mode) = match read_config(&path) {
        Ok(Some(found)) => found,
        Ok(None) => return Check::pass(
            ID,
            TITLE,
            "no moltmate.json; keys come from the environment (ANTHROPIC_API_KEY, OPENAI_API_KEY)",
        ),
        Err(e) => {
            return Check::fail(
                ID,
                TITLE,
                format!("cannot read {}: {e}", path.display()),
                "make moltmate.json a regular file the gateway can read",
            )
        }
    };
    let scan = match moltmate_config::scan_raw(&text, &path.display().to_string()) {
        Ok(scan) => scan,
        Err(e) => {
            return Check::fail(
                ID,
                TITLE,
                format!("cannot parse it: {e}"),
                "fix the syntax (`moltmate config check`)",
            )
        }
    };
    let mut found: Vec<String> = scan
        .plaintext_secrets
        .iter()
        .map(|key| format!("{key} is written into the file"))
        .collect();
    for (number, line) in text.lines().enumerate() {
        for (what, shape) in SHAPES.iter() {
            if shape.is_match(line) {
                found.push(format!("line {} holds what looks like {what}", number + 1));
                break;
            }
        }
    }
    if found.is_empty() {
        let referenced = if scan.referenced_secrets.is_empty() {
            "no secrets in the file".to_string()
        } else {
            format!(
                "referenced from the environment: {}",
                list_some(&scan.referenced_secrets, 6)
            )
        };
        return Check::pass(ID, TITLE, referenced);
    }
    let readable_by_others = mode & 0o077 != 0;
    let status = if readable_by_others {
        CheckStatus::Fail
    } else {
        CheckStatus::Warn
    };
    let mut detail = list_some(&found, 6);
    if readable_by_others {
        detail.push_str(&format!(
            "; and the file is {mode:04o}, readable by other users"
        ));
    }
    Check::new(
        ID,
        TITLE,
        status,
        detail,
        Some(
            "put each value into the service's environment file (/etc/moltmate/moltmate.env, 0600; \
             EnvironmentFile= in the unit) and write \"${NAME}\" in moltmate.json"
                .to_string(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_of(line: &str) -> Option<&'static str> {
        SHAPES
            .iter()
            .find(|(_, re)| re.is_match(line))
            .map(|(what, _)| *what)
    }

    #[test]
    fn discord_and_slack_tokens_written_into_the_file_are_found() {
        assert_eq!(
            shape_of("// botToken: \"xoxb-1234567890-abcdefghijkl\""),
            Some("a Slack token")
        );
        assert_eq!(
            shape_of("appToken: 'xapp-1-A0123-4567-abcdef0123'"),
            Some("a Slack app-level token")
        );
        assert_eq!(
            shape_of("MTIzNDU2Nzg5MDEyMzQ1Njc4.GAbCdE.abcdefghijklmnopqrstuvwxyz0123456"),
            Some("a Discord bot token")
        );
        assert_eq!(shape_of("botToken: \"${DISCORD_BOT_TOKEN}\""), None);
        assert_eq!(shape_of("apiUrl: \"https://discord.com/api/v10\""), None);
    }
}
