//! Regression (issue 9 review, §5): what the file tools wrote into a family folder was not
//! shared with the family's group, unlike what the store writes there. Root only (a root
//! gateway is what gives family folders their own gid).

mod common;

use common::Fixture;
use moltmate_core::tool::{FamilyFolder, Tool};
use moltmate_tools::{EditTool, WriteTool};
use serde_json::json;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

const FAMILY_GID: u32 = 2_140_000_001;
/// Another member's sandbox uid.
const BEN: u32 = 2_140_000_002;

/// Regression: `Homes::ensure_family` makes the folder 2770, group-owned by the family's gid, and the
/// store's `write_beneath` gives what it creates there `g+rw` (dirs `g+rwxs`). The file tools
/// (`write`, `edit`, and the directories `open_parent` creates) only copy the parent's owner
/// (`paths::inherit_owner`), with modes 0644 / 0755 under the gateway's umask: a file one
/// member's assistant wrote with `write family/...` cannot be changed by another member's
/// sandboxed commands, and nothing could be created in a directory the tool made. Now the
/// tools apply the same family rule as the store (`family_shared_mode`: files `g+rw`, dirs
/// `g+rwxs`, nothing for others), also to a file an older release left 0644 when it is
/// rewritten.
#[tokio::test]
async fn file_tool_writes_in_the_family_folder_are_group_writable() {
    if !rustix::process::geteuid().is_root() {
        println!("SKIP: needs root");
        return;
    }
    let fx = Fixture::new();
    let mut ctx = fx.ctx("anna");
    let root = fx.dir.path().join("families/smith");
    std::fs::create_dir_all(&root).unwrap();
    // Let other uids traverse down to the family folder (as the sandbox's bind mount does).
    for dir in [fx.dir.path().to_path_buf(), fx.dir.path().join("families")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::os::unix::fs::chown(&root, Some(FAMILY_GID), Some(FAMILY_GID)).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o2770)).unwrap();
    ctx.family = Some(FamilyFolder {
        name: "smith".into(),
        root: root.clone(),
        gid: Some(FAMILY_GID),
    });
    WriteTool
        .call(
            &ctx,
            json!({"path": "family/plans/picnic.md", "content": "bring cake"}),
        )
        .await
        .unwrap();
    // An older file (0644, as the tools used to leave it) rewritten by `edit`.
    std::fs::write(root.join("list.md"), "milk\n").unwrap();
    std::os::unix::fs::chown(root.join("list.md"), Some(FAMILY_GID), Some(FAMILY_GID)).unwrap();
    std::fs::set_permissions(root.join("list.md"), std::fs::Permissions::from_mode(0o644)).unwrap();
    EditTool
        .call(
            &ctx,
            json!({"path": "family/list.md", "old_text": "milk", "new_text": "oat milk"}),
        )
        .await
        .unwrap();
    let list = std::fs::metadata(root.join("list.md")).unwrap();
    assert_eq!(
        (list.gid(), list.mode() & 0o7777),
        (FAMILY_GID, 0o660),
        "edited file"
    );
    let dir = std::fs::metadata(root.join("plans")).unwrap();
    let file = std::fs::metadata(root.join("plans/picnic.md")).unwrap();
    // Ben, another member (the family gid as a supplementary group), edits the plan with exec.
    let ben_appends = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={BEN}"),
            &format!("--regid={BEN}"),
            &format!("--groups={FAMILY_GID}"),
            "sh",
            "-c",
        ])
        .arg(format!(
            "touch '{}' && echo 'and lemonade' >> '{}' && touch '{}'",
            root.join("ben-was-here.md").display(),
            root.join("plans/picnic.md").display(),
            root.join("plans/ben.md").display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        dir.mode() & 0o2007,
        0o2000,
        "dir setgid, nothing for others"
    );
    assert_eq!(
        file.mode() & 0o7007,
        0,
        "file: no special bits, nothing for others"
    );
    assert!(
        dir.mode() & 0o070 == 0o070 && file.mode() & 0o060 == 0o060 && ben_appends.status.success(),
        "dir {:o} (gid {}), file {:o} (gid {}); ben: {}",
        dir.mode() & 0o7777,
        dir.gid(),
        file.mode() & 0o7777,
        file.gid(),
        String::from_utf8_lossy(&ben_appends.stderr)
    );
}
