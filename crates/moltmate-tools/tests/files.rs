//! `read`, `write`, `edit`: happy paths, argument errors, and confinement to the home.

mod common;

use common::{tree, Fixture};
use moltmate_core::tool::{Tool, ToolError};
use moltmate_tools::{EditTool, ReadTool, WriteTool};
use serde_json::json;
use std::os::unix::fs::{symlink, PermissionsExt};

async fn read(
    ctx: &moltmate_core::tool::ToolContext,
    args: serde_json::Value,
) -> Result<String, ToolError> {
    ReadTool.call(ctx, args).await.map(|o| o.content)
}

/// Regression (issue 9): the file tools created a missing home, so a turn still running when
/// its user was removed or reset could bring the wiped home back, with what it wrote, for
/// whoever gets the id next. A missing home is now an error and stays missing.
#[tokio::test]
async fn file_tools_never_recreate_a_wiped_home() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    std::fs::remove_dir_all(fx.home("anna")).unwrap();
    let write = WriteTool
        .call(&ctx, json!({"path": "MEMORY.md", "content": "old life"}))
        .await;
    let edit = EditTool
        .call(
            &ctx,
            json!({"path": "MEMORY.md", "old_text": "a", "new_text": "b"}),
        )
        .await;
    let listed = read(&ctx, json!({"path": "."})).await;
    for result in [write.map(|o| o.content), edit.map(|o| o.content), listed] {
        let error = result.expect_err("a wiped home is not written to");
        assert!(error.to_string().contains("does not exist"), "{error}");
    }
    assert!(!fx.home("anna").exists(), "the wiped home came back");
}

#[tokio::test]
async fn write_read_edit_round_trip() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    // The home is made by the gateway before a turn (0700); the tools write beneath it.
    let out = WriteTool
        .call(
            &ctx,
            json!({"path": "notes/today.md", "content": "one\ntwo\nthree\n"}),
        )
        .await
        .unwrap();
    assert!(out.content.contains("14 bytes"), "{}", out.content);
    let mode = std::fs::metadata(fx.home("anna"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    assert_eq!(
        std::fs::read_to_string(fx.home("anna").join("notes/today.md")).unwrap(),
        "one\ntwo\nthree\n"
    );

    assert_eq!(
        read(&ctx, json!({"path": "notes/today.md"})).await.unwrap(),
        "one\ntwo\nthree\n"
    );
    assert_eq!(
        read(&ctx, json!({"path": "/workspace/notes/today.md"}))
            .await
            .unwrap(),
        "one\ntwo\nthree\n"
    );

    EditTool
        .call(
            &ctx,
            json!({"path": "notes/today.md", "old_text": "two", "new_text": "2"}),
        )
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(fx.home("anna").join("notes/today.md")).unwrap(),
        "one\n2\nthree\n"
    );

    // Replace keeps the file's mode.
    std::fs::set_permissions(
        fx.home("anna").join("notes/today.md"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    WriteTool
        .call(&ctx, json!({"path": "notes/today.md", "content": "new"}))
        .await
        .unwrap();
    let mode = std::fs::metadata(fx.home("anna").join("notes/today.md"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640);

    // No temp files left behind.
    assert_eq!(tree(&fx.home("anna")), vec!["notes", "notes/today.md"]);
}

#[tokio::test]
async fn offset_and_limit_are_lines() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    let content: String = (1..=10).map(|i| format!("line {i}\n")).collect();
    WriteTool
        .call(&ctx, json!({"path": "f.txt", "content": content}))
        .await
        .unwrap();

    let out = read(&ctx, json!({"path": "f.txt", "offset": 3, "limit": 2}))
        .await
        .unwrap();
    assert!(out.starts_with("line 3\nline 4\n"), "{out}");
    assert!(out.contains("offset=5"), "{out}");
    let out = read(&ctx, json!({"path": "f.txt", "offset": 9}))
        .await
        .unwrap();
    assert_eq!(out, "line 9\nline 10\n");
    let out = read(&ctx, json!({"path": "f.txt", "offset": 50}))
        .await
        .unwrap();
    assert!(out.contains("past the end"), "{out}");
    assert!(matches!(
        read(&ctx, json!({"path": "f.txt", "offset": 0})).await,
        Err(ToolError::InvalidArguments(_))
    ));
    assert!(matches!(
        read(&ctx, json!({"path": "f.txt", "limit": -1})).await,
        Err(ToolError::InvalidArguments(_))
    ));
}

#[tokio::test]
async fn large_files_are_capped_and_binary_refused() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    std::fs::create_dir_all(fx.home("anna")).unwrap();
    let line = "x".repeat(1023) + "\n";
    std::fs::write(fx.home("anna").join("big.txt"), line.repeat(300)).unwrap();
    let out = read(&ctx, json!({"path": "big.txt"})).await.unwrap();
    assert!(
        out.len() <= moltmate_tools::READ_OUTPUT_CAP + 300,
        "{}",
        out.len()
    );
    assert!(
        out.contains("capped at 256 KiB") && out.contains("offset=257"),
        "{}",
        &out[out.len() - 200..]
    );

    std::fs::write(
        fx.home("anna").join("bin"),
        [0x7f, b'E', b'L', b'F', 0, 1, 2],
    )
    .unwrap();
    match read(&ctx, json!({"path": "bin"})).await {
        Err(ToolError::Refused(m)) => assert!(m.contains("binary"), "{m}"),
        other => panic!("{other:?}"),
    }
    std::fs::write(fx.home("anna").join("latin1"), [b'a', 0xe4, b'\n']).unwrap();
    assert!(matches!(
        read(&ctx, json!({"path": "latin1"})).await,
        Err(ToolError::Refused(_))
    ));
}

#[tokio::test]
async fn directories_are_listed() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    WriteTool
        .call(&ctx, json!({"path": "a/b.txt", "content": "x"}))
        .await
        .unwrap();
    WriteTool
        .call(&ctx, json!({"path": "c.txt", "content": "x"}))
        .await
        .unwrap();
    let out = read(&ctx, json!({"path": "."})).await.unwrap();
    assert!(out.contains("a/\n") && out.contains("c.txt\n"), "{out}");
    let out = read(&ctx, json!({"path": "/workspace"})).await.unwrap();
    assert!(out.contains("a/\n"), "{out}");
}

#[tokio::test]
async fn edit_needs_exactly_one_match() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    WriteTool
        .call(&ctx, json!({"path": "f.txt", "content": "a b a"}))
        .await
        .unwrap();
    match EditTool
        .call(
            &ctx,
            json!({"path": "f.txt", "old_text": "zzz", "new_text": "y"}),
        )
        .await
    {
        Err(ToolError::Failed(m)) => assert!(m.contains("0 occurrences"), "{m}"),
        other => panic!("{other:?}"),
    }
    match EditTool
        .call(
            &ctx,
            json!({"path": "f.txt", "old_text": "a", "new_text": "y"}),
        )
        .await
    {
        Err(ToolError::Failed(m)) => assert!(m.contains("2 times"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        EditTool
            .call(
                &ctx,
                json!({"path": "f.txt", "old_text": "", "new_text": "y"})
            )
            .await,
        Err(ToolError::InvalidArguments(_))
    ));
    assert_eq!(
        std::fs::read_to_string(fx.home("anna").join("f.txt")).unwrap(),
        "a b a"
    );
    assert!(matches!(
        EditTool
            .call(
                &ctx,
                json!({"path": "missing.txt", "old_text": "a", "new_text": "y"})
            )
            .await,
        Err(ToolError::Failed(_))
    ));
    assert_eq!(tree(&fx.home("anna")), vec!["f.txt"]);
}

#[tokio::test]
async fn bad_arguments_are_invalid_arguments() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    for args in [
        json!("{\"path\": \"x\""),
        json!({"path": 3}),
        json!({}),
        json!({"path": "x", "content": "y", "mode": 7}),
        json!([1, 2]),
    ] {
        let result = WriteTool.call(&ctx, args.clone()).await;
        assert!(
            matches!(result, Err(ToolError::InvalidArguments(_))),
            "{args}: {result:?}"
        );
    }
    assert!(matches!(
        read(&ctx, json!({"path": "a\0b"})).await,
        Err(ToolError::InvalidArguments(_))
    ));
}

#[tokio::test]
async fn read_only_refuses_writes() {
    let fx = Fixture::new();
    let mut ctx = fx.ctx("anna");
    WriteTool
        .call(&ctx, json!({"path": "f.txt", "content": "a"}))
        .await
        .unwrap();
    ctx.read_only = true;
    assert!(matches!(
        WriteTool
            .call(&ctx, json!({"path": "g.txt", "content": "a"}))
            .await,
        Err(ToolError::Refused(_))
    ));
    assert!(matches!(
        EditTool
            .call(
                &ctx,
                json!({"path": "f.txt", "old_text": "a", "new_text": "b"})
            )
            .await,
        Err(ToolError::Refused(_))
    ));
    assert_eq!(read(&ctx, json!({"path": "f.txt"})).await.unwrap(), "a");
    assert_eq!(tree(&fx.home("anna")), vec!["f.txt"]);
}

#[tokio::test]
async fn family_folder_mapping() {
    let fx = Fixture::new();
    let ctx = fx.ctx_with_family("anna");
    WriteTool
        .call(
            &ctx,
            json!({"path": "family/shopping.md", "content": "milk"}),
        )
        .await
        .unwrap();
    let family_root = ctx.family.as_ref().unwrap().root.clone();
    assert_eq!(
        std::fs::read_to_string(family_root.join("shopping.md")).unwrap(),
        "milk"
    );
    assert_eq!(
        read(&ctx, json!({"path": "/family/shopping.md"}))
            .await
            .unwrap(),
        "milk"
    );
    // `family/..` cannot climb out of the family folder.
    assert!(matches!(
        read(&ctx, json!({"path": "family/../users"})).await,
        Err(ToolError::Refused(_))
    ));

    let lone = fx.ctx("bert");
    match WriteTool
        .call(&lone, json!({"path": "family/x.md", "content": "x"}))
        .await
    {
        Err(ToolError::Refused(m)) => assert!(m.contains("family"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        read(&lone, json!({"path": "/family/shopping.md"})).await,
        Err(ToolError::Refused(_))
    ));
}

/// Every escape attempt is refused, for every tool, and nothing outside the home changes.
#[tokio::test]
async fn escapes_are_refused() {
    let fx = Fixture::new();
    let anna = fx.ctx("anna");
    let bert = fx.ctx("bert");
    WriteTool
        .call(
            &bert,
            json!({"path": "secret.txt", "content": "bert's secret"}),
        )
        .await
        .unwrap();
    WriteTool
        .call(&anna, json!({"path": "mine.txt", "content": "x"}))
        .await
        .unwrap();
    let outside = fx.dir.path().join("outside.txt");
    std::fs::write(&outside, "outside").unwrap();

    let home = fx.home("anna");
    symlink("/etc", home.join("etc_link")).unwrap();
    symlink("/etc/passwd", home.join("passwd_link")).unwrap();
    symlink("../../outside.txt", home.join("rel_escape")).unwrap();
    symlink("../bert/secret.txt", home.join("bert_secret")).unwrap();
    symlink("../bert", home.join("bert_home")).unwrap();
    symlink("/proc/self/root", home.join("proc_root")).unwrap();
    symlink("/proc/self/root/etc/passwd", home.join("proc_passwd")).unwrap();
    symlink("/proc/self/cwd", home.join("proc_cwd")).unwrap();
    let before_outside = tree(fx.dir.path());

    let paths = [
        "..",
        "../bert/secret.txt",
        "/etc/passwd",
        "/workspace/../x",
        "/workspace/../bert/secret.txt",
        "a/../../bert/secret.txt",
        "/proc/self/root/etc/passwd",
        "/tmp/x",
        "etc_link/passwd",
        "etc_link/hostname",
        "passwd_link",
        "rel_escape",
        "bert_secret",
        "bert_home/secret.txt",
        "proc_root/etc/passwd",
        "proc_passwd",
        "proc_cwd/x",
    ];
    for path in paths {
        let r = read(&anna, json!({"path": path})).await;
        assert!(
            matches!(r, Err(ToolError::Refused(_))),
            "read {path}: {r:?}"
        );
        let r = EditTool
            .call(
                &anna,
                json!({"path": path, "old_text": "root", "new_text": "pwned"}),
            )
            .await;
        assert!(
            matches!(r, Err(ToolError::Refused(_))),
            "edit {path}: {r:?}"
        );
        // Writes through a directory symlink must be refused; writing a *final* symlink name
        // replaces the link itself inside the home (checked below), which is harmless.
        if path.contains('/') {
            let r = WriteTool
                .call(&anna, json!({"path": path, "content": "pwned"}))
                .await;
            assert!(
                matches!(r, Err(ToolError::Refused(_))),
                "write {path}: {r:?}"
            );
        }
    }
    // Parent creation through an escaping symlink is refused too.
    let r = WriteTool
        .call(
            &anna,
            json!({"path": "bert_home/new/dir/f.txt", "content": "x"}),
        )
        .await;
    assert!(matches!(r, Err(ToolError::Refused(_))), "{r:?}");

    // Writing to a final-component symlink replaces the link, never its target.
    WriteTool
        .call(&anna, json!({"path": "bert_secret", "content": "replaced"}))
        .await
        .unwrap();
    assert!(!std::fs::symlink_metadata(home.join("bert_secret"))
        .unwrap()
        .file_type()
        .is_symlink());

    assert_eq!(
        std::fs::read_to_string(fx.home("bert").join("secret.txt")).unwrap(),
        "bert's secret"
    );
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "outside");
    assert_eq!(tree(fx.dir.path()), before_outside);
    assert_eq!(tree(&fx.home("bert")), vec!["secret.txt"]);
}

#[tokio::test]
async fn symlinks_inside_the_home_work() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    WriteTool
        .call(&ctx, json!({"path": "docs/a.txt", "content": "inside"}))
        .await
        .unwrap();
    symlink("docs/a.txt", fx.home("anna").join("link")).unwrap();
    symlink("/workspace", fx.home("anna").join("abs")).unwrap();
    assert_eq!(read(&ctx, json!({"path": "link"})).await.unwrap(), "inside");
    // An absolute symlink is refused even when it would mean the home inside the sandbox.
    assert!(matches!(
        read(&ctx, json!({"path": "abs/docs/a.txt"})).await,
        Err(ToolError::Refused(_))
    ));
}

#[tokio::test]
async fn fifos_are_refused_without_hanging() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    std::fs::create_dir_all(fx.home("anna")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        fx.home("anna").join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        read(&ctx, json!({"path": "fifo"})),
    )
    .await
    .unwrap();
    assert!(matches!(r, Err(ToolError::Refused(_))), "{r:?}");
}

#[tokio::test]
async fn hard_links_are_not_opened() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    std::fs::create_dir_all(fx.home("anna")).unwrap();
    let outside = fx.dir.path().join("outside.txt");
    std::fs::write(&outside, "outside secret").unwrap();
    std::fs::hard_link(&outside, fx.home("anna").join("linked.txt")).unwrap();
    assert!(matches!(
        read(&ctx, json!({"path": "linked.txt"})).await,
        Err(ToolError::Refused(_))
    ));
    assert!(matches!(
        EditTool
            .call(
                &ctx,
                json!({"path": "linked.txt", "old_text": "secret", "new_text": "x"})
            )
            .await,
        Err(ToolError::Refused(_))
    ));
    // Replacing the name breaks the link; the outside file is untouched.
    WriteTool
        .call(&ctx, json!({"path": "linked.txt", "content": "mine"}))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "outside secret");
    assert_eq!(
        read(&ctx, json!({"path": "linked.txt"})).await.unwrap(),
        "mine"
    );
}

#[tokio::test]
async fn write_edge_cases() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    WriteTool
        .call(
            &ctx,
            json!({"path": "/workspace/a/b/c/d.txt", "content": "deep"}),
        )
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(fx.home("anna").join("a/b/c/d.txt")).unwrap(),
        "deep"
    );
    for path in [".", "/workspace", "a/..", ""] {
        let r = WriteTool
            .call(&ctx, json!({"path": path, "content": "x"}))
            .await;
        assert!(
            matches!(r, Err(ToolError::InvalidArguments(_))),
            "{path}: {r:?}"
        );
    }
    // Replacing a directory with a file fails cleanly and leaves no temp file.
    let r = WriteTool
        .call(&ctx, json!({"path": "a/b", "content": "x"}))
        .await;
    assert!(matches!(r, Err(ToolError::Failed(_))), "{r:?}");
    // A file where a parent directory is needed.
    let r = WriteTool
        .call(&ctx, json!({"path": "a/b/c/d.txt/e.txt", "content": "x"}))
        .await;
    assert!(matches!(r, Err(ToolError::Failed(_))), "{r:?}");
    assert_eq!(
        tree(&fx.home("anna")),
        vec!["a", "a/b", "a/b/c", "a/b/c/d.txt"]
    );
}

fn mkfifo(path: &std::path::Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

/// Fails (instead of hanging) when a tool call does not return within 20 s.
async fn within<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(20), call)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// Regression: the class of "a file that blocks", for every file tool: FIFOs, sockets and a
/// /dev node reached through a symlink are refused (never opened), loops are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_sockets_devices_and_loops_are_refused_by_every_file_tool() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    let home = fx.home("anna");
    std::fs::create_dir_all(&home).unwrap();
    mkfifo(&home.join("pipe.md"));
    let _socket = std::os::unix::net::UnixListener::bind(home.join("sock.md")).unwrap();
    symlink("/dev/zero", home.join("zero.md")).unwrap();
    symlink("/dev/tty", home.join("tty.md")).unwrap();
    symlink("loop-b", home.join("loop-a")).unwrap();
    symlink("loop-a", home.join("loop-b")).unwrap();
    for (path, expected) in [
        ("pipe.md", "FIFO"),
        ("sock.md", "socket"),
        ("zero.md", "outside your files"),
        ("tty.md", "outside your files"),
        ("loop-a", "cannot be followed"),
    ] {
        let r = within(path, read(&ctx, json!({"path": path}))).await;
        match r {
            Err(ToolError::Refused(message)) => {
                assert!(message.contains(expected), "read {path}: {message}")
            }
            other => panic!("read {path}: {other:?}"),
        }
        let r = within(
            path,
            EditTool.call(
                &ctx,
                json!({"path": path, "old_text": "a", "new_text": "b"}),
            ),
        )
        .await;
        assert!(
            matches!(r, Err(ToolError::Refused(_))),
            "edit {path}: {r:?}"
        );
    }
    // Writing over a FIFO replaces it (the FIFO is never opened).
    within(
        "write",
        WriteTool.call(&ctx, json!({"path": "pipe.md", "content": "plain"})),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(home.join("pipe.md")).unwrap(),
        "plain"
    );
}

/// A sparse file of 100 GB apparent size (one "line" of zeros after some text): `read`
/// scans a bounded amount, never holds the line in memory, and says how to go on.
#[tokio::test]
async fn sparse_100_gb_file_read_is_bounded() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    let home = fx.home("anna");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("big.txt"), "abc\n".repeat(4096)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(home.join("big.txt"))
        .unwrap()
        .set_len(100 << 30)
        .unwrap();
    let first = within("read", read(&ctx, json!({"path": "big.txt"})))
        .await
        .unwrap();
    assert!(first.starts_with("abc\nabc\n"), "{}", &first[..20]);
    assert!(
        first.contains("continue with offset=4097"),
        "{}",
        &first[first.len() - 200..]
    );
    let long = within(
        "read",
        read(&ctx, json!({"path": "big.txt", "offset": 4097})),
    )
    .await
    .unwrap();
    assert!(long.contains("alone is longer"), "{long}");
    let far = within(
        "read",
        read(&ctx, json!({"path": "big.txt", "offset": 1_000_000_000u64})),
    )
    .await
    .unwrap();
    assert!(far.contains("too large to scan"), "{far}");
}

/// A directory of 100k entries: listing it reads a bounded number and says so.
#[tokio::test]
async fn listing_a_directory_of_100k_entries_is_bounded() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    let many = fx.home("anna").join("many");
    std::fs::create_dir_all(&many).unwrap();
    for i in 0..100_000 {
        std::fs::File::create(many.join(format!("{i:06}"))).unwrap();
    }
    let listing = within("listing", read(&ctx, json!({"path": "many"})))
        .await
        .unwrap();
    assert!(
        listing.contains(&format!(
            "more than {} entries",
            moltmate_tools::LIST_SCAN_MAX
        )),
        "{}",
        &listing[..300]
    );
    assert!(listing.len() < 64 * 1024, "{} bytes", listing.len());
}

/// 1000 nested directories: paths that deep are refused up front, and writes to a deep new
/// path create parents with bounded work.
#[tokio::test]
async fn deep_directory_trees_are_bounded() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    let mut deep = fx.home("anna");
    for _ in 0..1000 {
        deep.push("d");
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("x.md"), "deep").unwrap();
    let path = format!("{}x.md", "d/".repeat(1000));
    let r = read(&ctx, json!({"path": path})).await;
    assert!(
        matches!(&r, Err(ToolError::InvalidArguments(m)) if m.contains("nested too deeply")),
        "{r:?}"
    );
    let path = format!("{}x.md", "n/".repeat(100));
    within(
        "deep write",
        WriteTool.call(&ctx, json!({"path": path, "content": "ok"})),
    )
    .await
    .unwrap();
    assert_eq!(read(&ctx, json!({"path": path})).await.unwrap(), "ok");
}

/// Concurrent writers of one file: every write succeeds, the file holds one writer's whole
/// content, and no temporary file is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_file_never_collide_or_leave_temp_files() {
    let fx = Fixture::new();
    let ctx = fx.ctx("anna");
    let mut writers = Vec::new();
    for writer in 0..16 {
        let ctx = ctx.clone();
        writers.push(tokio::spawn(async move {
            for round in 0..20 {
                let content = format!("writer {writer} round {round}\n").repeat(200);
                WriteTool
                    .call(&ctx, json!({"path": "notes/shared.md", "content": content}))
                    .await
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let text = std::fs::read_to_string(fx.home("anna").join("notes/shared.md")).unwrap();
    let first = text.lines().next().unwrap();
    assert!(text.lines().all(|l| l == first), "never a mix of writers");
    assert_eq!(tree(&fx.home("anna")), vec!["notes", "notes/shared.md"]);
}
