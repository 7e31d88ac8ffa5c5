//! Property test of path confinement (`paths.rs`) through the file tools: on a real temporary
//! home, random sequences of `read`, `write`, `edit` and symlink planting (what the user's own
//! `exec` could do) with random paths — relative, `..`, absolute, `/workspace/...`,
//! `family/...`, NUL bytes, through every symlink planted so far — never read, create, change or
//! reveal anything outside the caller's home (and, for a family member, the family folder).

mod common;

use common::{tree, Fixture};
use moltmate_core::tool::{Tool, ToolContext, ToolError};
use moltmate_testkit::prop::config as prop_config;
use moltmate_tools::{EditTool, ReadTool, WriteTool};
use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

const CANARY: &str = "CANARY-outside-the-home";
const FAMILY_CANARY: &str = "CANARY-in-the-family-folder";

/// Path components a hostile model would try.
fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "..", ".", "", "notes", "a", "b", "secret.txt", "out", "abs", "up", "loop", "self",
            "fam", "home2", "pipe", "hard", "link", "workspace", "family", "users", "outside",
            "anna", "bob", "proc", "self", "root", "etc",
        ])
        .prop_map(String::from),
        1 => "[a-z.]{1,6}",
        1 => Just("x\0y".to_string()),
        1 => Just("..\u{2215}..".to_string()),
    ]
}

fn model_path() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            "",
            "",
            "/",
            "/workspace/",
            "/workspace",
            "family/",
            "/family/",
            "./",
            "~/",
            " ",
            "/proc/self/root/",
            "//",
            "/tmp/",
        ]),
        prop::collection::vec(component(), 0..6),
        prop::sample::select(vec!["", "/", "/.", "/.."]),
    )
        .prop_map(|(prefix, parts, suffix)| format!("{prefix}{}{suffix}", parts.join("/")))
}

/// Where a planted symlink points: out of the home in every way, or somewhere inside. `{root}`
/// stands for the test's temporary directory.
fn link_target() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "../../outside",
        "../../outside/secret.txt",
        "{root}/outside",
        "{root}/outside/secret.txt",
        "{root}/families/smith",
        "../../families/smith",
        "{root}/users/bob",
        "../bob/notes.txt",
        "..",
        "../..",
        "/",
        "/proc/self/root",
        "/proc/self/cwd",
        ".",
        "notes",
        "a/../../..",
        "loop",
        "dangling/nowhere",
    ])
    .prop_map(String::from)
}

#[derive(Debug, Clone)]
enum Op {
    Read(String),
    Write(String, String),
    Edit(String, String, String),
    /// The user's own code plants a symlink at a path inside their home.
    Plant(String, String),
    Mkdir(String),
}

fn op() -> impl Strategy<Value = Op> {
    let name = prop::sample::select(vec![
        "out", "abs", "up", "fam", "link", "notes/l", "a/b", "loop", "home2",
    ]);
    prop_oneof![
        3 => model_path().prop_map(Op::Read),
        3 => (model_path(), "[a-z]{0,8}").prop_map(|(p, c)| Op::Write(p, format!("WRITTEN {c}"))),
        2 => (model_path(), prop::sample::select(vec!["CANARY", "WRITTEN", "x", "secret"]), "[a-z]{0,4}")
            .prop_map(|(p, old, new)| Op::Edit(p, old.to_string(), new)),
        2 => (name, link_target()).prop_map(|(n, t)| Op::Plant(n.to_string(), t)),
        1 => prop::sample::select(vec!["notes", "a", "a/b"]).prop_map(|d| Op::Mkdir(d.to_string())),
    ]
}

/// Every file and directory outside the caller's home, with file contents, symlink targets
/// and permissions: must not change.
fn snapshot(root: &Path, excluded: &[&Path]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for rel in tree(root) {
        let path = root.join(&rel);
        if excluded.iter().any(|e| path.starts_with(e)) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let what = if meta.file_type().is_symlink() {
            format!("link {:?}", std::fs::read_link(&path).unwrap())
        } else if meta.is_file() {
            format!("file {:?}", std::fs::read(&path).unwrap())
        } else {
            "other".to_string()
        };
        out.insert(
            rel,
            format!(
                "{what} mode {:o}",
                std::os::unix::fs::MetadataExt::mode(&meta)
            ),
        );
    }
    out
}

struct Home {
    fx: Fixture,
    ctx: ToolContext,
}

/// A home for `anna` with a file and a FIFO, a hard link to the canary, `bob`'s home, a family
/// folder (anna belongs to it when `family` is set) and the canary outside all of them.
fn home(family: bool) -> Home {
    let fx = Fixture::new();
    let root = fx.dir.path();
    std::fs::create_dir_all(root.join("outside")).unwrap();
    std::fs::write(root.join("outside/secret.txt"), CANARY).unwrap();
    std::fs::create_dir_all(fx.home("bob")).unwrap();
    std::fs::write(fx.home("bob").join("notes.txt"), CANARY).unwrap();
    let ctx = if family {
        fx.ctx_with_family("anna")
    } else {
        std::fs::create_dir_all(root.join("families/smith")).unwrap();
        fx.ctx("anna")
    };
    std::fs::write(root.join("families/smith/FAMILY.md"), FAMILY_CANARY).unwrap();
    let anna = fx.home("anna");
    std::fs::create_dir_all(anna.join("notes")).unwrap();
    std::fs::write(anna.join("notes/today.md"), "WRITTEN first\n").unwrap();
    std::fs::hard_link(root.join("outside/secret.txt"), anna.join("hard")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        anna.join("pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    Home { fx, ctx }
}

fn run_op(rt: &tokio::runtime::Runtime, h: &Home, op: &Op) -> Result<Option<String>, ToolError> {
    let ctx = &h.ctx;
    let anna = h.fx.home("anna");
    match op {
        Op::Read(path) => rt
            .block_on(ReadTool.call(ctx, json!({ "path": path })))
            .map(|o| Some(o.content)),
        Op::Write(path, content) => rt
            .block_on(WriteTool.call(ctx, json!({ "path": path, "content": content })))
            .map(|_| None),
        Op::Edit(path, old, new) => rt
            .block_on(EditTool.call(
                ctx,
                json!({ "path": path, "old_text": old, "new_text": new }),
            ))
            .map(|_| None),
        Op::Plant(name, target) => {
            let at = anna.join(name);
            if let Some(parent) = at.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::remove_file(&at);
            let target = target.replace("{root}", &h.fx.dir.path().display().to_string());
            let _ = std::os::unix::fs::symlink(target, &at);
            Ok(None)
        }
        Op::Mkdir(dir) => {
            let _ = std::fs::create_dir_all(anna.join(dir));
            Ok(None)
        }
    }
}

fn check_sequence(family: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let h = home(family);
    let root = h.fx.dir.path().to_path_buf();
    let anna = h.fx.home("anna");
    let family_root = root.join("families/smith");
    let mut allowed: Vec<&Path> = vec![&anna];
    if family {
        allowed.push(&family_root);
    }
    let before = snapshot(&root, &allowed);
    for op in ops {
        let result = run_op(&rt, &h, op);
        match &result {
            Ok(Some(text)) => {
                prop_assert!(
                    !text.contains(CANARY),
                    "{op:?} read outside the home: {text}"
                );
                if !family {
                    prop_assert!(
                        !text.contains(FAMILY_CANARY),
                        "{op:?} read the family folder of a non-member"
                    );
                }
            }
            Ok(None) => {}
            Err(ToolError::Fatal(e)) => prop_assert!(false, "{op:?} was fatal: {e}"),
            Err(e) => {
                prop_assert!(
                    !e.to_string().contains(CANARY),
                    "an error revealed the canary: {e}"
                );
                if let Op::Read(p) | Op::Write(p, _) | Op::Edit(p, _, _) = op {
                    if p.contains('\0') {
                        prop_assert!(matches!(e, ToolError::InvalidArguments(_)), "{e:?}");
                    }
                }
            }
        }
        let after = snapshot(&root, &allowed);
        prop_assert_eq!(
            &after,
            &before,
            "{:?} changed something outside the home",
            op
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(prop_config(40))]

    /// A user without a family: nothing outside their home is read, written or revealed.
    #[test]
    fn prop_file_tools_stay_in_the_home(ops in prop::collection::vec(op(), 1..10)) {
        check_sequence(false, &ops)?;
    }

    /// A family member: the home and the family folder, nothing else.
    #[test]
    fn prop_file_tools_stay_in_home_and_family(ops in prop::collection::vec(op(), 1..10)) {
        check_sequence(true, &ops)?;
    }
}
