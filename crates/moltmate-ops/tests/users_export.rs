//! What a user's home can make an export (`users export`, the export of a reset or removal,
//! run inside the gateway for `/admin`) cost.

use moltmate_core::UserId;
use moltmate_ops::users::{Environment, UserAdmin, EXPORT_BUDGET};
use moltmate_ops::OpsError;
use moltmate_store::{Homes, Store};
use std::sync::Arc;

struct NoSandboxes;

#[async_trait::async_trait]
impl Environment for NoSandboxes {
    async fn ensure_home(&self, _user: &UserId) -> Result<(), OpsError> {
        Ok(())
    }
    async fn remove_containers(&self, _user: &UserId) -> Result<usize, String> {
        Ok(0)
    }
}

/// Peak resident memory of this process (kB), from `/proc/self/status`.
fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// F2: 60 sparse 4 MiB files of NULs cost no disk, but each NUL is six bytes of JSON; the
/// export read them all into one value (1.77 GB RSS in the gateway for `/admin`).
#[tokio::test]
async fn export_of_many_sparse_files_is_bounded() {
    let base = tempfile::tempdir().unwrap();
    let home = base.path();
    let store = Store::open(&home.join("moltmate.db")).unwrap();
    let user = UserId::new("mallory").unwrap();
    store.ensure_user(&user, None).await.unwrap();
    let ids = moltmate_core::sandbox::SandboxIds::same(rustix::process::geteuid().as_raw());
    let root = Homes::new(home)
        .ensure(&user, ids)
        .unwrap()
        .root()
        .to_path_buf();
    std::fs::write(root.join("MEMORY.md"), "mallory's notes").unwrap();
    for i in 0..60 {
        std::fs::File::create(root.join(format!("memory/sparse-{i:02}.md")))
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
    }
    let before = peak_rss_kb();
    let admin = UserAdmin::new(home, store, Arc::new(NoSandboxes));
    let export = admin.export(&user).await.unwrap();
    let text = serde_json::to_vec_pretty(&export).unwrap();
    let grown = peak_rss_kb().saturating_sub(before);
    assert!(
        (text.len() as u64) < EXPORT_BUDGET + (1 << 20),
        "export of {} bytes",
        text.len()
    );
    assert!(grown < 200 * 1024, "peak RSS grew by {grown} kB");
    assert_eq!(export["files"]["MEMORY.md"], "mallory's notes");
    let left_out = export["filesLeftOut"].as_array().unwrap();
    assert!(
        left_out.len() >= 55,
        "what did not fit is listed: {left_out:?}"
    );
}
