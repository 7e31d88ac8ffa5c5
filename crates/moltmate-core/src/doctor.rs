//! The shape of `moltmate doctor`'s report, shared by the CLI and the admin page.
//!
//! The checks themselves live in the `moltmate-doctor` crate (they read the config, the files
//! of the home and ask the sandbox backend); the web layer knows neither, so it gets the
//! report through [`SecurityChecks`], which the binary implements with that crate and hands to
//! the web layer's settings. This module is only data: the JSON of `moltmate doctor --json` is
//! the serde form of [`Report`], `{version, checks: [{id, title, status, detail, fix}]}`, and is
//! a stable interface for monitoring (ids are never reused for another meaning).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// As the security checklist wants it.
    Pass,
    /// Works, but weaker than the checklist wants, or needs the operator's attention.
    Warn,
    /// Unsafe or broken: `moltmate doctor` exits non-zero.
    Fail,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Pass => "pass",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Stable machine name, e.g. `perm.config`, `gateway.tls`.
    pub id: String,
    /// What is checked, for people.
    pub title: String,
    pub status: CheckStatus,
    /// What was found (never a secret's value).
    pub detail: String,
    /// One line saying how to fix it; `None` when the check passed.
    pub fix: Option<String>,
}

impl Check {
    pub fn new(
        id: &str,
        title: &str,
        status: CheckStatus,
        detail: impl Into<String>,
        fix: Option<String>,
    ) -> Check {
        Check {
            id: id.to_string(),
            title: title.to_string(),
            status,
            detail: detail.into(),
            fix: if status == CheckStatus::Pass {
                None
            } else {
                fix
            },
        }
    }

    pub fn pass(id: &str, title: &str, detail: impl Into<String>) -> Check {
        Check::new(id, title, CheckStatus::Pass, detail, None)
    }

    pub fn warn(id: &str, title: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check::new(id, title, CheckStatus::Warn, detail, Some(fix.into()))
    }

    pub fn fail(id: &str, title: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check::new(id, title, CheckStatus::Fail, detail, Some(fix.into()))
    }
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The version of the moltmate that made the report.
    pub version: String,
    pub checks: Vec<Check>,
}

impl Report {
    /// The worst status of any check (`Pass` for an empty report).
    pub fn worst(&self) -> CheckStatus {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(CheckStatus::Pass)
    }

    /// How many checks have `status`.
    pub fn count(&self, status: CheckStatus) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// The check with this id.
    pub fn get(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }
}

/// Runs the checks on behalf of a layer that cannot (the web layer's `/admin`). Implemented by
/// the binary; the report describes the process that serves, which is what an operator wants
/// to see (its privileges, its systemd hardening).
#[async_trait]
pub trait SecurityChecks: Send + Sync {
    async fn report(&self) -> Report;
}
