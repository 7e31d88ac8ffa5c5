//! Per-user disk caps (`disk::ensure_user_volume`): migration, idempotence, growth, remount.
//! Needs root (loop mounts); prints `SKIP` otherwise unless `MOLTMATE_REQUIRE_SANDBOX=1`.

use moltmate_core::sandbox::SandboxIds;
use moltmate_core::UserId;
use moltmate_sandbox::disk;
use std::path::PathBuf;

fn statvfs_bytes(path: &std::path::Path) -> u64 {
    let st = rustix::fs::statvfs(path).unwrap();
    st.f_blocks * st.f_frsize
}

#[test]
fn docker_disk_volume_migrates_grows_and_remounts() {
    if !disk::can_enforce() {
        if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
            panic!("disk caps need root");
        }
        println!("SKIP: disk caps need root");
        return;
    }
    let root = PathBuf::from(format!("/tmp/moltmate-disk-test-{}", std::process::id()));
    let state = root.join("state");
    let home = root.join("home");
    std::fs::create_dir_all(home.join("docs")).unwrap();
    std::fs::write(home.join("docs/note.txt"), "keep me\n").unwrap();
    let user = UserId::new("disktest").unwrap();
    let ids = SandboxIds::same(2_120_000_001);

    let cap = disk::ensure_user_volume(&state, &home, &user, 24 << 20, ids).unwrap();
    assert!(cap.enforced);
    assert_eq!(cap.cap_bytes, 24 << 20);
    // Migrated into the image, and the image is what is mounted.
    assert_eq!(
        std::fs::read_to_string(home.join("docs/note.txt")).unwrap(),
        "keep me\n"
    );
    let small = statvfs_bytes(&home);
    assert!(small <= 24 << 20, "{small}");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&home).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (ids.uid, ids.gid, 0o700)
    );
    let note = std::fs::metadata(home.join("docs/note.txt")).unwrap();
    assert_eq!(
        (note.uid(), note.gid()),
        (ids.uid, ids.gid),
        "migrated files are the user's"
    );

    // Idempotent.
    let again = disk::ensure_user_volume(&state, &home, &user, 24 << 20, ids).unwrap();
    assert_eq!(again, cap);

    // Growing the cap grows the filesystem: online when the kernel lets us
    // (CAP_SYS_RESOURCE), else at the next mount.
    let grown = disk::ensure_user_volume(&state, &home, &user, 48 << 20, ids).unwrap();
    if grown.cap_bytes == 48 << 20 {
        assert!(statvfs_bytes(&home) > small + (16 << 20));
    }

    // After an unmount (host reboot) the image is mounted again, contents intact; the
    // underlying directory holds nothing (migration cleared it).
    disk::release_user_volume(&home).unwrap();
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0);
    let remounted = disk::ensure_user_volume(&state, &home, &user, 48 << 20, ids).unwrap();
    assert_eq!(remounted.cap_bytes, 48 << 20);
    assert!(statvfs_bytes(&home) > small + (16 << 20));
    assert_eq!(
        std::fs::read_to_string(home.join("docs/note.txt")).unwrap(),
        "keep me\n"
    );

    // A volume made for another id (an older release's shared uid 1000, a changed range) is
    // re-owned on mount, entry by entry, and a symlink in it is changed, never followed.
    let outside = root.join("outside.txt");
    std::fs::write(&outside, "not the user's").unwrap();
    std::os::unix::fs::symlink(&outside, home.join("docs/link")).unwrap();
    disk::release_user_volume(&home).unwrap();
    let renumbered = SandboxIds::same(2_120_000_002);
    disk::ensure_user_volume(&state, &home, &user, 48 << 20, renumbered).unwrap();
    for path in [home.clone(), home.join("docs"), home.join("docs/note.txt")] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (renumbered.uid, renumbered.gid),
            "{path:?}"
        );
    }
    let link = std::fs::symlink_metadata(home.join("docs/link")).unwrap();
    assert_eq!(link.uid(), renumbered.uid);
    let target = std::fs::metadata(&outside).unwrap();
    assert_eq!((target.uid(), target.mode() & 0o777), (0, 0o644));

    disk::release_user_volume(&home).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

/// A family folder's tree is handed to the family's group: directories setgid and group
/// writable, files group read-write, nothing for others; symlinks inside never redirect it.
#[test]
fn family_tree_is_reowned_for_the_group_without_following_symlinks() {
    if !disk::can_enforce() {
        if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
            panic!("re-owning needs root");
        }
        println!("SKIP: re-owning needs root");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = PathBuf::from(format!("/tmp/moltmate-reown-test-{}", std::process::id()));
    let tree = root.join("family");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/plan.txt"), "picnic").unwrap();
    std::fs::set_permissions(
        tree.join("a/b/plan.txt"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    let outside = root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, tree.join("a/escape")).unwrap();
    let fifo = tree.join("a/fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();

    let family = SandboxIds::same(2_120_000_010);
    disk::reown_tree(&tree, disk::Owner::shared(family)).unwrap();
    for (path, mode) in [
        (tree.join("a"), 0o2770),
        (tree.join("a/b"), 0o2770),
        // setuid dropped, group gets read-write, others nothing.
        (tree.join("a/b/plan.txt"), 0o0770),
        (fifo.clone(), 0o660),
    ] {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (family.uid, family.gid, mode),
            "{path:?}"
        );
    }
    let outside_meta = std::fs::metadata(&outside).unwrap();
    assert_eq!(
        (outside_meta.uid(), outside_meta.mode() & 0o7777),
        (0, 0o755)
    );
    std::fs::remove_dir_all(&root).unwrap();
}
