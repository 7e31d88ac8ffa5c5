//! End to end with the real bubblewrap backend: code in the sandbox plants symlinks pointing out
//! of the home (what an injected model would do through `exec`), and the file tools, which run
//! on the host, refuse to follow them.
//!
//! Prints `SKIP: <reason>` and passes when bubblewrap is missing or unusable, unless
//! `MOLTMATE_REQUIRE_SANDBOX=1`.

mod common;

use common::Fixture;
use moltmate_core::sandbox::{ExecSecurity, Sandbox};
use moltmate_core::tool::{Tool, ToolError};
use moltmate_sandbox::bwrap::BwrapSandbox;
use moltmate_sandbox::{BackendChoice, SandboxScope, SandboxSettings};
use moltmate_tools::{EditTool, ExecTool, ReadTool, WriteTool};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

fn skip(reason: &str) {
    if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("MOLTMATE_REQUIRE_SANDBOX=1 but bubblewrap is unusable: {reason}");
    }
    println!("SKIP: {reason}");
}

#[tokio::test]
async fn symlinks_planted_in_the_sandbox_are_refused_by_the_file_tools() {
    let fx = Fixture::new();
    let settings = SandboxSettings {
        backend: BackendChoice::Bwrap,
        scope: SandboxScope::Task,
        image: String::new(),
        docker_host: None,
        prune_idle: Duration::from_secs(3600),
        state_dir: fx.dir.path().join("sandboxes"),
        allowed_domains: Vec::new(),
        config_digest: String::new(),
    };
    let sandbox = match BwrapSandbox::new(&settings, None) {
        Ok(sandbox) => sandbox,
        Err(e) => return skip(&e.to_string()),
    };
    if let Err(e) = sandbox.probe().await {
        return skip(&e.to_string());
    }
    let sandbox: Arc<dyn Sandbox> = Arc::new(sandbox);
    let mut ctx = fx.ctx("anna");
    ctx.exec.security = ExecSecurity::Full;
    std::fs::create_dir_all(fx.home("anna")).unwrap();
    let exec = ExecTool::new(Some(sandbox));
    let out = exec
        .call(
            &ctx,
            json!({"command": "ln -s /etc/passwd pw && ln -s /etc etc && ln -s ../.. up && ln -s /proc/self/root root && ls -l"}),
        )
        .await
        .unwrap();
    if !out.content.contains("exit code: 0") {
        return skip(&format!(
            "the sandbox could not create symlinks in the workspace: {}",
            out.content
        ));
    }
    println!("sandbox: {}", out.content);
    assert!(std::fs::symlink_metadata(fx.home("anna").join("pw"))
        .unwrap()
        .file_type()
        .is_symlink());
    let passwd_before = std::fs::read("/etc/passwd").unwrap();

    for path in ["pw", "etc/passwd", "up/users/anna/pw", "root/etc/passwd"] {
        let r = ReadTool.call(&ctx, json!({"path": path})).await;
        assert!(
            matches!(r, Err(ToolError::Refused(_))),
            "read {path}: {r:?}"
        );
        let r = EditTool
            .call(
                &ctx,
                json!({"path": path, "old_text": "root", "new_text": "x"}),
            )
            .await;
        assert!(
            matches!(r, Err(ToolError::Refused(_))),
            "edit {path}: {r:?}"
        );
    }
    for path in ["etc/passwd", "up/escape.txt", "root/tmp/escape.txt"] {
        let r = WriteTool
            .call(&ctx, json!({"path": path, "content": "x"}))
            .await;
        assert!(
            matches!(r, Err(ToolError::Refused(_))),
            "write {path}: {r:?}"
        );
    }
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
    assert!(!fx.dir.path().join("escape.txt").exists());
    // The home was put on a capped volume (as root); unmount it so no loop device outlives us.
    let _ = moltmate_sandbox::disk::release_user_volume(&fx.home("anna"));
}
