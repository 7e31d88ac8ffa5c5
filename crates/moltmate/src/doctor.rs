//! `moltmate doctor [--json] [--fix]`, and the checks the admin page shows (the same
//! `moltmate-doctor` crate, handed to the web layer as a [`SecurityChecks`]).

use crate::wiring;
use anyhow::Result;
use moltmate_config::Config;
use moltmate_core::doctor::{CheckStatus, Report, SecurityChecks};
use moltmate_doctor::Context;
use std::path::{Path, PathBuf};

/// `moltmate doctor` found at least one failing check: exit 1 without an `error:` line (the
/// report already said everything).
#[derive(Debug, thiserror::Error)]
#[error("moltmate doctor found failing checks")]
pub struct ChecksFailed;

/// Runs the checks for `home` (loading its config with the process environment), applying the
/// safe fixes first with `fix`. Prints text or JSON; `Err(ChecksFailed)` when any check fails.
pub async fn doctor(home: &Path, json: bool, fix: bool) -> Result<()> {
    let (report, fixed) = report_for_cli(home, fix).await;
    if json {
        /// `{version, checks, fixed?}`: the report's own fields first, in its order.
        #[derive(serde::Serialize)]
        struct Json<'a> {
            version: &'a str,
            checks: &'a [moltmate_core::doctor::Check],
            #[serde(skip_serializing_if = "Option::is_none")]
            fixed: Option<&'a [String]>,
        }
        let out = Json {
            version: &report.version,
            checks: &report.checks,
            fixed: fixed.as_deref(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", render_text(home, &report, fixed.as_deref()));
    }
    if report.worst() == CheckStatus::Fail {
        return Err(ChecksFailed.into());
    }
    Ok(())
}

/// The report `moltmate doctor` prints, and with `fix` the lines saying what was changed
/// (applied before the checks run, so the report shows the state after the fixes).
pub async fn report_for_cli(home: &Path, fix: bool) -> (Report, Option<Vec<String>>) {
    let context = cli_context(home);
    let fixed = if fix {
        let home = home.to_path_buf();
        let config = context.config.config().cloned();
        let done =
            tokio::task::spawn_blocking(move || moltmate_doctor::fix(&home, config.as_ref()))
                .await
                .unwrap_or_else(|e| vec![format!("the fixes did not finish: {e}")]);
        Some(done)
    } else {
        None
    };
    (moltmate_doctor::run(&context).await, fixed)
}

fn cli_context(home: &Path) -> Context {
    let home_for_settings = home.to_path_buf();
    Context::for_cli(home, &|name| std::env::var(name).ok(), &move |config| {
        wiring::sandbox_settings(&home_for_settings, config)
    })
}

/// The text form: one block per check, failures and warnings with their fix.
pub fn render_text(home: &Path, report: &Report, fixed: Option<&[String]>) -> String {
    let mut out = format!(
        "moltmate doctor: {} (moltmate {})\n\n",
        home.display(),
        report.version
    );
    if let Some(fixed) = fixed {
        if fixed.is_empty() {
            out.push_str("--fix: nothing to change.\n\n");
        } else {
            out.push_str("--fix changed:\n");
            for line in fixed {
                out.push_str(&format!("  {line}\n"));
            }
            out.push('\n');
        }
    }
    for check in &report.checks {
        out.push_str(&format!(
            "{:<4}  {:<22} {}: {}\n",
            check.status.as_str().to_uppercase(),
            check.id,
            check.title,
            check.detail
        ));
        if let Some(fix) = &check.fix {
            out.push_str(&format!("      {:<22} fix: {fix}\n", ""));
        }
    }
    out.push_str(&format!(
        "\n{} fail, {} warn, {} pass\n",
        report.count(CheckStatus::Fail),
        report.count(CheckStatus::Warn),
        report.count(CheckStatus::Pass)
    ));
    out
}

/// The checks of a serving gateway, for `/admin`: its own config, backend and process.
pub struct RunningChecks {
    home: PathBuf,
    config: Config,
    backend: Option<&'static str>,
}

impl RunningChecks {
    pub fn new(home: &Path, config: &Config, backend: Option<&'static str>) -> RunningChecks {
        RunningChecks {
            home: home.to_path_buf(),
            config: config.clone(),
            backend,
        }
    }
}

#[async_trait::async_trait]
impl SecurityChecks for RunningChecks {
    async fn report(&self) -> Report {
        let settings = wiring::sandbox_settings(&self.home, &self.config);
        let (home, config, backend) = (self.home.clone(), self.config.clone(), self.backend);
        // Gathering the process facts reads /proc and statvfs()s / and /home: off the runtime,
        // with a deadline (a hung /home mount must not hang the admin page's worker).
        let context = moltmate_core::blocking::run(
            "doctor process facts",
            std::time::Duration::from_secs(10),
            move || Context::for_running(&home, config, settings, backend),
        )
        .await;
        match context {
            Ok(context) => moltmate_doctor::run(&context).await,
            Err(e) => Report {
                version: moltmate_doctor::VERSION.to_string(),
                checks: vec![moltmate_core::doctor::Check::fail(
                    "process.privileges",
                    "What the process holds, and what needs root",
                    format!("could not look at this process: {e}"),
                    "check the mounts of / and /home (a hung network mount?)",
                )],
            },
        }
    }
}
