//! Per-user disk caps (`disk::ensure_user_volume`): migration, idempotence, growth, remount.
//! Needs root (loop mounts); prints `SKIP` otherwise unless `MOLTMATE_REQUIRE_SANDBOX=1`.

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

    let cap = disk::ensure_user_volume(&state, &home, &user, 24 << 20).unwrap();
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
    assert_eq!(std::fs::metadata(&home).unwrap().uid(), disk::SANDBOX_UID);

    // Idempotent.
    let again = disk::ensure_user_volume(&state, &home, &user, 24 << 20).unwrap();
    assert_eq!(again, cap);

    // Growing the cap grows the filesystem: online when the kernel lets us
    // (CAP_SYS_RESOURCE), else at the next mount.
    let grown = disk::ensure_user_volume(&state, &home, &user, 48 << 20).unwrap();
    if grown.cap_bytes == 48 << 20 {
        assert!(statvfs_bytes(&home) > small + (16 << 20));
    }

    // After an unmount (host reboot) the image is mounted again, contents intact; the
    // underlying directory holds nothing (migration cleared it).
    disk::release_user_volume(&home).unwrap();
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0);
    let remounted = disk::ensure_user_volume(&state, &home, &user, 48 << 20).unwrap();
    assert_eq!(remounted.cap_bytes, 48 << 20);
    assert!(statvfs_bytes(&home) > small + (16 << 20));
    assert_eq!(
        std::fs::read_to_string(home.join("docs/note.txt")).unwrap(),
        "keep me\n"
    );

    disk::release_user_volume(&home).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}
