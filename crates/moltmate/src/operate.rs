//! `moltmate backup`, `moltmate restore` and `moltmate usage`: the CLI side of
//! `moltmate_ops` (progress on stderr, results on stdout).

use anyhow::{bail, Context, Result};
use moltmate_ops::backup::{BackupOptions, Progress};
use moltmate_ops::usage::{PriceTable, UsageQuery};
use moltmate_store::Store;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Text that came from a home (file names) for the operator's terminal: control characters
/// are shown escaped, so a file named with escape sequences cannot rewrite the screen.
fn for_terminal(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Progress lines on stderr: a line per report (twice a second at most, from the ops side).
fn progress_printer(verb: &'static str) -> impl FnMut(&Progress) {
    move |p: &Progress| {
        let mut err = std::io::stderr().lock();
        let _ = match p.phase {
            "database" => writeln!(err, "{verb}: copying the database"),
            "done" => writeln!(err, "{verb}: {} files, {}", p.files, mib(p.bytes)),
            phase => writeln!(err, "{verb}: {phase} — {} files, {}", p.files, mib(p.bytes)),
        };
    }
}

pub async fn backup(home: &Path, file: &Path, include_secrets: bool) -> Result<()> {
    let options = BackupOptions {
        include_secrets,
        ..BackupOptions::default()
    };
    let (home, file) = (home.to_path_buf(), file.to_path_buf());
    let report = tokio::task::spawn_blocking(move || {
        moltmate_ops::backup::backup(&home, &file, &options, &mut progress_printer("backup"))
    })
    .await
    .context("the backup stopped")?
    .map_err(|e| anyhow::anyhow!("{}", for_terminal(&e.to_string())))?;
    if report.skipped_total > 0 {
        eprintln!(
            "Note: {} item(s) were not backed up (listed in the archive's MANIFEST.json):",
            report.skipped_total
        );
        for line in report.skipped.iter().take(20) {
            eprintln!("  {}", for_terminal(line));
        }
    }
    if !report.secrets_left_out.is_empty() {
        eprintln!("Secrets were left out (use --include-secrets to keep them); a restored config reads them from:");
        for line in &report.secrets_left_out {
            eprintln!("  {line}");
        }
    }
    println!(
        "Backed up {} entries ({} files, {}) into {} ({} compressed).",
        report.entries,
        report.files,
        mib(report.bytes),
        report.file.display(),
        mib(report.archive_bytes)
    );
    Ok(())
}

pub async fn restore(file: &Path, target: &Path) -> Result<()> {
    let (file, target) = (file.to_path_buf(), target.to_path_buf());
    let report = tokio::task::spawn_blocking(move || {
        moltmate_ops::backup::restore(&file, &target, &mut progress_printer("restore"))
    })
    .await
    .context("the restore stopped")?
    .map_err(|e| anyhow::anyhow!("{}", for_terminal(&e.to_string())))?;
    if report.owners_kept {
        eprintln!("Note: not running as root, so every file belongs to you (owners in the archive were not applied).");
    }
    if !report.includes_secrets {
        eprintln!("The backup holds no secrets: admin.token is made anew at the first start, and API tokens, login links and sessions still work (only their digests are stored).");
        for line in &report.secrets_left_out {
            eprintln!("  set {line}");
        }
    }
    println!(
        "Restored {} entries ({} files, {}) into {}. Start it with `moltmate --home {} serve`.",
        report.entries,
        report.files,
        mib(report.bytes),
        report.home.display(),
        report.home.display()
    );
    Ok(())
}

/// Output formats of `moltmate usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UsageFormat {
    Table,
    Csv,
    Json,
}

pub async fn usage(
    home: &Path,
    user: Option<&str>,
    since: Option<&str>,
    format: UsageFormat,
) -> Result<()> {
    let config = crate::wiring::load_config(home)?;
    let store = Store::open(&home.join("moltmate.db")).context("opening the database")?;
    let mut query = UsageQuery::last_days(30);
    if let Some(user) = user {
        query.user = Some(crate::parse_user(user)?);
    }
    if let Some(since) = since {
        query.since = chrono::NaiveDate::parse_from_str(since, "%Y-%m-%d")
            .with_context(|| format!("--since {since:?}: expected a date like 2026-12-01"))?;
    }
    let families: BTreeMap<String, Vec<moltmate_core::UserId>> = config
        .families
        .iter()
        .map(|(name, family)| (name.clone(), family.members.clone()))
        .collect();
    let prices = PriceTable::from_config(&config.model.prices);
    let report = moltmate_ops::usage::report(&store, &query, &families, &prices).await?;
    let text = match format {
        UsageFormat::Table => moltmate_ops::usage::to_table(&report),
        UsageFormat::Csv => moltmate_ops::usage::to_csv(&report)?,
        UsageFormat::Json => moltmate_ops::usage::to_json(&report)? + "\n",
    };
    if text.is_empty() {
        bail!("nothing to report");
    }
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("writing the report")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn file_names_cannot_drive_the_terminal() {
        assert_eq!(
            super::for_terminal("users/x/\u{1b}]0;owned\u{7}a\nb"),
            "users/x/\\u{1b}]0;owned\\u{7}a\\nb"
        );
    }
}
