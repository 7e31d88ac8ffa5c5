//! Shared fixtures: a tempdir with a `users/` directory and contexts for users in it.
#![allow(dead_code)]

use moltmate_core::sandbox::{ExecSettings, SandboxIds, SandboxProfile};
use moltmate_core::tool::{FamilyFolder, ToolContext, UserHome};
use moltmate_core::UserId;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("users")).unwrap();
        Fixture { dir }
    }

    pub fn users(&self) -> PathBuf {
        self.dir.path().join("users")
    }

    pub fn home(&self, user: &str) -> PathBuf {
        self.users().join(user)
    }

    /// A context for `user`, whose home exists (the gateway makes it before a turn).
    pub fn ctx(&self, user: &str) -> ToolContext {
        let id = UserId::new(user).unwrap();
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.home(user))
            .unwrap();
        ToolContext {
            user: id.clone(),
            home: UserHome::new(&self.users(), &id),
            session_id: format!("session-{user}"),
            family: None,
            read_only: false,
            sandbox: SandboxProfile::default(),
            sandbox_ids: ids_of(user),
            exec: ExecSettings {
                default_timeout: Duration::from_secs(30),
                max_timeout: Duration::from_secs(120),
                ..ExecSettings::default()
            },
            outlet: None,
        }
    }

    pub fn ctx_with_family(&self, user: &str) -> ToolContext {
        let root = self.dir.path().join("families").join("smith");
        std::fs::create_dir_all(&root).unwrap();
        let mut ctx = self.ctx(user);
        ctx.family = Some(FamilyFolder {
            name: "smith".into(),
            root,
            gid: None,
        });
        ctx
    }
}

/// A user's sandbox ids, distinct per user name (what a root gateway would allocate).
pub fn ids_of(user: &str) -> SandboxIds {
    let n = user
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    SandboxIds::same(2_130_000_000 + n % 10_000_000)
}

/// Every file below `dir`, relative, sorted (to show nothing unexpected appeared).
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(path.strip_prefix(base).unwrap().display().to_string());
            if entry.file_type().unwrap().is_dir() {
                walk(base, &path, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}
