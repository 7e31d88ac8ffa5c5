//! `exec`: no sandbox → refusal with the install hint; with a fake sandbox, the request carries
//! exactly the vetted command and the context's identity; refused lines never reach it.

mod common;

use async_trait::async_trait;
use common::Fixture;
use moltmate_core::sandbox::{
    ExecCommand, ExecOutput, ExecRequest, ExecSecurity, Sandbox, SandboxError, SandboxInfo,
    SandboxNetwork,
};
use moltmate_core::tool::{Tool, ToolError};
use moltmate_core::UserId;
use moltmate_tools::ExecTool;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records requests and answers with a canned result (or error).
#[derive(Default)]
struct FakeSandbox {
    requests: Mutex<Vec<ExecRequest>>,
    fail: Option<fn() -> SandboxError>,
    timed_out: bool,
}

#[async_trait]
impl Sandbox for FakeSandbox {
    fn backend(&self) -> &'static str {
        "fake"
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, SandboxError> {
        self.requests.lock().unwrap().push(request);
        if let Some(fail) = self.fail {
            return Err(fail());
        }
        Ok(ExecOutput {
            exit_code: if self.timed_out { None } else { Some(3) },
            stdout: "hello out".into(),
            stderr: "hello err".into(),
            truncated: true,
            timed_out: self.timed_out,
            duration: Duration::from_millis(1500),
        })
    }

    async fn list(&self) -> Result<Vec<SandboxInfo>, SandboxError> {
        Ok(Vec::new())
    }

    async fn prune(&self, _idle: Duration) -> Result<Vec<String>, SandboxError> {
        Ok(Vec::new())
    }

    async fn end_session(&self, _user: &UserId, _session_id: &str) -> Result<(), SandboxError> {
        Ok(())
    }
    async fn end_user(&self, _user: &UserId) -> Result<(), SandboxError> {
        Ok(())
    }
}

#[tokio::test]
async fn without_a_sandbox_exec_is_refused_with_an_install_hint() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    match ExecTool::new(None)
        .call(&ctx, json!({"command": "ls"}))
        .await
    {
        Err(ToolError::Refused(m)) => {
            assert!(m.contains("no sandbox"), "{m}");
            assert!(
                m.contains("Docker") && m.contains("apt-get install bubblewrap"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_sandbox_receives_the_vetted_command_and_the_context_identity() {
    let fx = Fixture::new();
    let mut ctx = fx.ctx_with_family("anna");
    ctx.exec.security = ExecSecurity::Allowlist;
    ctx.exec.safe_bins = vec!["ls".into(), "grep".into()];
    ctx.sandbox.network = SandboxNetwork::Proxy;
    ctx.sandbox.limits.pids = 7;
    let fake = Arc::new(FakeSandbox::default());
    let tool = ExecTool::new(Some(fake.clone()));

    let out = tool
        .call(&ctx, json!({"command": "ls -la 'my dir'"}))
        .await
        .unwrap();
    assert!(out.content.contains("exit code: 3"), "{}", out.content);
    assert!(out.content.contains("duration: 1.50s"), "{}", out.content);
    assert!(
        out.content.contains("hello out") && out.content.contains("hello err"),
        "{}",
        out.content
    );
    assert!(out.content.contains("truncated"), "{}", out.content);

    let requests = fake.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(
        request.command,
        ExecCommand::Argv(vec!["ls".into(), "-la".into(), "my dir".into()])
    );
    assert_eq!(request.user, ctx.user);
    assert_eq!(request.home, ctx.home.root());
    assert_eq!(
        request.family.as_deref(),
        Some(ctx.family.as_ref().unwrap().root.as_path())
    );
    assert_eq!(request.session_id, ctx.session_id);
    assert_eq!(request.profile, ctx.sandbox);
    assert_eq!(request.timeout, ctx.exec.default_timeout);
}

#[tokio::test]
async fn refused_command_lines_never_reach_the_sandbox() {
    let fx = Fixture::new();
    let mut ctx = fx.ctx("anna");
    ctx.exec.safe_bins = vec!["ls".into()];
    let fake = Arc::new(FakeSandbox::default());
    let tool = ExecTool::new(Some(fake.clone()));
    for command in [
        "rm -rf /",
        "ls; rm -rf /",
        "ls > /etc/x",
        "ls $(id)",
        "/bin/ls",
        "",
    ] {
        let r = tool.call(&ctx, json!({"command": command})).await;
        assert!(matches!(r, Err(ToolError::Refused(_))), "{command}: {r:?}");
    }
    assert!(fake.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn timeouts_default_and_cap() {
    let fx = Fixture::new();
    let mut ctx = fx.ctx("anna");
    ctx.exec.security = ExecSecurity::Full;
    let fake = Arc::new(FakeSandbox {
        timed_out: true,
        ..FakeSandbox::default()
    });
    let tool = ExecTool::new(Some(fake.clone()));

    let out = tool
        .call(
            &ctx,
            json!({"command": "sleep 1000", "timeout_seconds": 5000}),
        )
        .await
        .unwrap();
    assert!(out.content.contains("lowered"), "{}", out.content);
    assert!(
        out.content.contains("killed after the 120s timeout"),
        "{}",
        out.content
    );
    tool.call(&ctx, json!({"command": "sleep 1", "timeout_seconds": 10}))
        .await
        .unwrap();
    let timeouts: Vec<Duration> = fake
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.timeout)
        .collect();
    assert_eq!(
        timeouts,
        vec![Duration::from_secs(120), Duration::from_secs(10)]
    );

    for args in [
        json!({"command": "ls", "timeout_seconds": 0}),
        json!({"command": "ls", "timeout_seconds": "5"}),
        json!({"command": "ls", "timeout_seconds": -1}),
        json!({"cmd": "ls"}),
        json!("ls"),
    ] {
        let r = tool.call(&ctx, args.clone()).await;
        assert!(
            matches!(r, Err(ToolError::InvalidArguments(_))),
            "{args}: {r:?}"
        );
    }
}

#[tokio::test]
async fn sandbox_errors_are_classified() {
    let fx = Fixture::new();
    let mut ctx = fx.ctx("anna");
    ctx.exec.security = ExecSecurity::Full;
    let unavailable = ExecTool::new(Some(Arc::new(FakeSandbox {
        fail: Some(|| SandboxError::Unavailable("install bubblewrap".into())),
        ..FakeSandbox::default()
    })));
    assert!(matches!(
        unavailable.call(&ctx, json!({"command": "ls"})).await,
        Err(ToolError::Refused(_))
    ));
    let backend = ExecTool::new(Some(Arc::new(FakeSandbox {
        fail: Some(|| SandboxError::Backend {
            backend: "fake",
            detail: "daemon hiccup".into(),
        }),
        ..FakeSandbox::default()
    })));
    assert!(matches!(
        backend.call(&ctx, json!({"command": "ls"})).await,
        Err(ToolError::Failed(_))
    ));
}
