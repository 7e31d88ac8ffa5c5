//! Per-exec cgroups for the bubblewrap backend: memory, pids and CPU limits for the whole
//! process tree, and a reliable way to kill every process of a sandbox.
//!
//! Detection order: a cgroup v2 hierarchy at /sys/fs/cgroup whose memory and pids controllers
//! can be enabled for a `moltmate` subtree; else cgroup v1 controllers at
//! /sys/fs/cgroup/{memory,pids,cpu}; else none (the caller falls back to rlimits). A hybrid host
//! with an empty v2 hierarchy at /sys/fs/cgroup/unified uses v1.

use crate::total::{ParentCgroup, ParentDirs};
use moltmate_core::sandbox::SandboxLimits;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";
const SUBTREE: &str = "moltmate";
/// CFS period used for the CPU quota (the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

/// Which cgroup hierarchy this host offers to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSupport {
    V2 {
        base: PathBuf,
    },
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
        /// Only for measuring (`cpuacct.usage` of the parent); `None` where it shares `cpu`'s
        /// mount or is absent.
        cpuacct: Option<PathBuf>,
    },
    None,
}

impl CgroupSupport {
    /// Probes the host once. Creating `moltmate/` is the test of whether we may use it.
    pub fn detect() -> Self {
        let root = Path::new(ROOT);
        if let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) {
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") {
                let base = root.join(SUBTREE);
                let ok = fs::create_dir_all(&base).is_ok()
                    && can_create_children(&base)
                    && fs::write(root.join("cgroup.subtree_control"), "+memory +pids +cpu")
                        .or_else(|_| {
                            fs::write(root.join("cgroup.subtree_control"), "+memory +pids")
                        })
                        .is_ok()
                    && fs::write(base.join("cgroup.subtree_control"), "+memory +pids +cpu")
                        .or_else(|_| {
                            fs::write(base.join("cgroup.subtree_control"), "+memory +pids")
                        })
                        .is_ok();
                if ok {
                    return CgroupSupport::V2 { base };
                }
            }
            return CgroupSupport::None;
        }
        let v1 = |ctrl: &str| {
            let dir = root.join(ctrl);
            if !dir.join("cgroup.procs").exists() {
                return None;
            }
            let base = dir.join(SUBTREE);
            (fs::create_dir_all(&base).is_ok() && can_create_children(&base)).then_some(base)
        };
        let (memory, pids, cpu) = (v1("memory"), v1("pids"), v1("cpu"));
        if memory.is_none() && pids.is_none() && cpu.is_none() {
            CgroupSupport::None
        } else {
            CgroupSupport::V1 {
                memory,
                pids,
                cpu,
                cpuacct: None,
            }
        }
    }

    /// Per-exec groups as children of the gateway's parent cgroup for all sandboxes
    /// ([`crate::total`]), so the totals hold over every bubblewrap command together.
    pub fn under(parent: &ParentCgroup) -> Self {
        let usable = |dir: &Path| can_create_children(dir).then(|| dir.to_path_buf());
        match parent.dirs() {
            ParentDirs::V2 { dir } => match usable(dir) {
                Some(base) => CgroupSupport::V2 { base },
                None => CgroupSupport::None,
            },
            ParentDirs::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            } => {
                let cpu = cpu.as_deref().and_then(usable);
                // Co-mounted `cpu,cpuacct`: the cpu group already is the cpuacct group.
                let same_mount = |a: &Path, b: &Path| {
                    fs::canonicalize(a)
                        .ok()
                        .is_some_and(|a| fs::canonicalize(b).ok() == Some(a))
                };
                let cpuacct = cpuacct
                    .as_deref()
                    .filter(|acct| !cpu.as_deref().is_some_and(|c| same_mount(c, acct)))
                    .and_then(usable);
                CgroupSupport::V1 {
                    memory: usable(memory),
                    pids: pids.as_deref().and_then(usable),
                    cpu,
                    cpuacct,
                }
            }
        }
    }

    pub fn limits_memory(&self) -> bool {
        matches!(
            self,
            CgroupSupport::V2 { .. }
                | CgroupSupport::V1 {
                    memory: Some(_),
                    ..
                }
        )
    }

    pub fn limits_pids(&self) -> bool {
        matches!(
            self,
            CgroupSupport::V2 { .. } | CgroupSupport::V1 { pids: Some(_), .. }
        )
    }

    /// Creates the cgroup(s) for one exec and applies `limits`. Failure to create is an error
    /// (the caller decided cgroups are available); a limit file the kernel lacks is skipped.
    pub fn create(&self, name: &str, limits: &SandboxLimits) -> std::io::Result<ExecCgroup> {
        let mut dirs = Vec::new();
        let result = self.create_inner(name, limits, &mut dirs);
        let memory = match self {
            CgroupSupport::V2 { base } => Some((base.join(name), true)),
            CgroupSupport::V1 {
                memory: Some(base), ..
            } => Some((base.join(name), false)),
            _ => None,
        };
        let group = ExecCgroup {
            dirs,
            procs: Vec::new(),
            memory,
        };
        result?;
        let mut group = group;
        for dir in &group.dirs {
            group.procs.push(
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))?,
            );
        }
        Ok(group)
    }

    fn create_inner(
        &self,
        name: &str,
        limits: &SandboxLimits,
        dirs: &mut Vec<PathBuf>,
    ) -> std::io::Result<()> {
        let quota = (limits.cpu_millis as u64).max(10) * CPU_PERIOD_US / 1000;
        match self {
            CgroupSupport::None => Ok(()),
            CgroupSupport::V2 { base } => {
                let dir = base.join(name);
                fs::create_dir(&dir)?;
                dirs.push(dir.clone());
                fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
                let _ = fs::write(dir.join("memory.swap.max"), "0");
                fs::write(dir.join("pids.max"), limits.pids.to_string())?;
                let _ = fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"));
                Ok(())
            }
            CgroupSupport::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            } => {
                if let Some(base) = memory {
                    let dir = base.join(name);
                    fs::create_dir(&dir)?;
                    dirs.push(dir.clone());
                    fs::write(
                        dir.join("memory.limit_in_bytes"),
                        limits.memory_bytes.to_string(),
                    )?;
                    // memsw ≥ memory must hold, so it is written second; equal means no swap.
                    let _ = fs::write(
                        dir.join("memory.memsw.limit_in_bytes"),
                        limits.memory_bytes.to_string(),
                    );
                }
                if let Some(base) = pids {
                    let dir = base.join(name);
                    fs::create_dir(&dir)?;
                    dirs.push(dir.clone());
                    fs::write(dir.join("pids.max"), limits.pids.to_string())?;
                }
                if let Some(base) = cpu {
                    let dir = base.join(name);
                    fs::create_dir(&dir)?;
                    dirs.push(dir.clone());
                    let _ = fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string());
                    let _ = fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string());
                }
                if let Some(base) = cpuacct {
                    // No limit: joined so the parent's `cpuacct.usage` counts this command.
                    let dir = base.join(name);
                    fs::create_dir(&dir)?;
                    dirs.push(dir);
                }
                Ok(())
            }
        }
    }
}

impl CgroupSupport {
    /// The per-controller `moltmate/` directories in use.
    fn bases(&self) -> Vec<&Path> {
        match self {
            CgroupSupport::None => Vec::new(),
            CgroupSupport::V2 { base } => vec![base.as_path()],
            CgroupSupport::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            } => [memory, pids, cpu, cpuacct]
                .into_iter()
                .flatten()
                .map(PathBuf::as_path)
                .collect(),
        }
    }

    /// Removes exec groups that a crashed gateway left behind: empty ones older than
    /// `min_age`. A group with a process in it cannot be removed (the kernel refuses), and the
    /// age spares groups another gateway on this host has just created and not yet joined.
    /// Returns how many were removed.
    pub fn sweep_stale(&self, min_age: Duration) -> usize {
        let mut removed = 0;
        for base in self.bases() {
            let Ok(entries) = fs::read_dir(base) else {
                continue;
            };
            for entry in entries.flatten() {
                let old_enough = entry
                    .metadata()
                    .ok()
                    .filter(|m| m.is_dir())
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= min_age);
                if !old_enough {
                    continue;
                }
                let path = entry.path();
                let empty = fs::read_to_string(path.join("cgroup.procs"))
                    .is_ok_and(|procs| procs.trim().is_empty());
                if empty && fs::remove_dir(&path).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// `moltmate/` may exist (made by root) while this process cannot create groups below it.
fn can_create_children(base: &Path) -> bool {
    let probe = base.join(format!("probe-{}", std::process::id()));
    let ok = fs::create_dir(&probe).is_ok();
    if ok {
        let _ = fs::remove_dir(&probe);
    }
    ok
}

/// The cgroup directories of one exec. Dropping it kills what is left inside and removes them.
#[derive(Debug)]
pub struct ExecCgroup {
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each directory, opened before the fork so the child only has to
    /// `write(fd, "0")` (join as itself) — an async-signal-safe operation.
    procs: Vec<File>,
    /// The memory group, and whether it is cgroup v2 (for the OOM-kill counter).
    memory: Option<(PathBuf, bool)>,
}

impl ExecCgroup {
    pub fn procs_fds(&self) -> Vec<i32> {
        use std::os::fd::AsRawFd;
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Processes still in the group (from the first controller; all hold the same tree).
    pub fn pids(&self) -> Vec<i32> {
        let Some(dir) = self.dirs.first() else {
            return Vec::new();
        };
        fs::read_to_string(dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILLs every process in the group until it is empty (bounded retries: a fork bomb may
    /// spawn while we kill, but the pids limit bounds how many there can be).
    pub fn kill_all(&self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Processes of this group the kernel's OOM killer ended (its own limit or the parent's
    /// total); `None` where unreadable. A small cgroup file: call off the async runtime.
    pub fn oom_kills(&self) -> Option<u64> {
        let (dir, v2) = self.memory.as_ref()?;
        let file = if *v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = fs::read_to_string(dir.join(file)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
    }

    /// True when this exec is confined by at least one cgroup.
    pub fn is_active(&self) -> bool {
        !self.dirs.is_empty()
    }
}

impl Drop for ExecCgroup {
    fn drop(&mut self) {
        self.procs.clear();
        self.kill_all();
        for dir in &self.dirs {
            // Removal can race with the last process exiting; retry briefly.
            for _ in 0..20 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// A crashed gateway leaves its exec groups behind (Drop never ran). The next start removes
    /// the empty ones and leaves a group with a live process alone.
    #[test]
    fn stale_exec_groups_are_swept_and_busy_ones_kept() {
        let support = CgroupSupport::detect();
        if support == CgroupSupport::None {
            if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
                panic!("sandbox required but no usable cgroups (needs root)");
            }
            println!("SKIP: no usable cgroups here (needs root and a writable hierarchy)");
            return;
        }
        let limits = SandboxLimits::default();
        let stale_name = format!("sweep-stale-{}", std::process::id());
        let busy_name = format!("sweep-busy-{}", std::process::id());
        let stale = support.create(&stale_name, &limits).unwrap();
        let stale_dirs = stale.dirs.clone();
        std::mem::forget(stale);
        let busy = support.create(&busy_name, &limits).unwrap();
        // Join the busy group in the child with the fds opened before the fork (no allocation
        // after fork in a multi-threaded test process).
        let fds = busy.procs_fds();
        let mut sleeper = unsafe {
            std::process::Command::new("sleep")
                .arg("30")
                .pre_exec(move || {
                    for &fd in &fds {
                        if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                })
                .spawn()
                .unwrap()
        };

        support.sweep_stale(Duration::from_secs(3600));
        assert!(stale_dirs.iter().all(|d| d.exists()), "too young to sweep");
        support.sweep_stale(Duration::ZERO);
        assert!(stale_dirs.iter().all(|d| !d.exists()), "stale group kept");
        assert!(busy.dirs.iter().all(|d| d.exists()), "busy group removed");
        assert_eq!(busy.pids(), vec![sleeper.id() as i32]);

        drop(busy);
        let _ = sleeper.wait();
    }

    /// cgroup v2 is not what the CI host runs (v1, where `hostile_sandboxes` covers this end
    /// to end): under a v2-shaped parent, per-exec groups are made in the parent's directory
    /// with the v2 limit files, and an OOM kill is read from `memory.events`.
    #[test]
    fn v2_exec_groups_live_under_the_parent_and_report_oom_kills() {
        use crate::total::{ParentStyle, TotalLimits};
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let limits = TotalLimits {
            memory_bytes: 1 << 30,
            cpu_millis: 1500,
            pids: 4096,
        };
        let parent =
            ParentCgroup::create_at(root.path(), "moltmate", ParentStyle::Path, limits).unwrap();
        let base = root.path().join("moltmate");
        let support = CgroupSupport::under(&parent);
        assert_eq!(support, CgroupSupport::V2 { base: base.clone() });

        let mut dirs = Vec::new();
        support
            .create_inner("sbx-1", &SandboxLimits::default(), &mut dirs)
            .unwrap();
        let dir = base.join("sbx-1");
        assert_eq!(dirs, vec![dir.clone()]);
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(
            read("memory.max"),
            SandboxLimits::default().memory_bytes.to_string()
        );
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), SandboxLimits::default().pids.to_string());

        let group = ExecCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
            memory: Some((dir.clone(), true)),
        };
        assert_eq!(group.oom_kills(), None, "unreadable is not zero");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(group.oom_kills(), Some(1));
        // v1 keeps the counter in `memory.oom_control`.
        fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        let v1 = ExecCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
            memory: Some((dir, false)),
        };
        assert_eq!(v1.oom_kills(), Some(3));
    }
}
