//! All sandboxes together are bounded, not only each one (`sandbox.total`, `sandbox.maxActive`).
//!
//! Every sandbox of either backend lives under **one parent cgroup** that the gateway makes and
//! limits: Docker containers through `HostConfig.CgroupParent`, bubblewrap's per-exec cgroups as
//! its children. The kernel then enforces the totals over everything below it — fifty memory
//! bombs share `sandbox.total.memoryMb` and are OOM-killed inside the parent, never the gateway
//! or the database, which live outside it. [`ActiveSandboxes`] caps how many sandboxes are
//! alive at once on top of that.
//!
//! **Where the parent is.** At the top of the hierarchy, beside the gateway's own cgroup, named
//! `sandbox.total.cgroup` (default `moltmate`): `/sys/fs/cgroup/<controller>/moltmate` on cgroup
//! v1 (memory, pids, cpu and cpuacct, the same path in each, because Docker's cgroup parent is
//! one path for every controller), `/sys/fs/cgroup/moltmate` on v2 (with `memory pids cpu`
//! enabled in the root's and the parent's `cgroup.subtree_control`). With Docker's `systemd`
//! cgroup driver the parent must be a slice, so it is `moltmate.slice` (Docker is handed
//! `moltmate.slice`; names hold no `-`, which systemd would read as nesting). A child of the
//! gateway's own cgroup would not work on v1 (each controller puts the gateway somewhere else,
//! and Docker takes one path), and on v2 it would need the gateway to move itself into a leaf
//! first (no processes in inner nodes); the top level needs root, which creating cgroups at all
//! needs anyway. A gateway that cannot create it (not root, a remote Docker daemon) runs
//! without it and says so at start, on `/admin` and in `/metrics`; `maxActive` still holds.
//!
//! **Limits on the parent.** v1: `memory.limit_in_bytes` and `memory.memsw.limit_in_bytes`
//! (no swap beyond it), `pids.max`, `cpu.cfs_quota_us` over a 100 ms `cpu.cfs_period_us`.
//! v2: `memory.max`, `memory.swap.max = 0`, `pids.max`, `cpu.max`. Usage comes from the same
//! directory: `memory.usage_in_bytes`/`memory.current`, `memory.max_usage_in_bytes`/
//! `memory.peak`, `cpuacct.usage`/`cpu.stat usage_usec`, `pids.current`.

use crate::active::ActiveSandboxes;
use moltmate_core::sandbox::SandboxAggregate;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";
const GIB: u64 = 1024 * 1024 * 1024;
/// CFS period for the CPU quota (the kernel default).
pub(crate) const CPU_PERIOD_US: u64 = 100_000;
/// `sandbox.total.pids` by default: 32 sandboxes' worth of the default 128 each.
pub const DEFAULT_TOTAL_PIDS: u64 = 4096;
/// `sandbox.maxActive` by default.
pub const DEFAULT_MAX_ACTIVE: usize = 32;
/// `sandbox.queueTimeoutSeconds` by default.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);
/// `sandbox.total.cgroup` by default.
pub const DEFAULT_CGROUP_NAME: &str = "moltmate";

/// Total limits over all sandboxes together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TotalLimits {
    pub memory_bytes: u64,
    /// Thousandths of a CPU.
    pub cpu_millis: u64,
    pub pids: u64,
}

/// What the host has, as the defaults see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    pub memory_bytes: u64,
    pub cpu_millis: u64,
}

impl HostResources {
    /// `MemTotal` from `/proc/meminfo` and the CPUs this process may use
    /// (`available_parallelism`, which honours affinity and a cgroup CPU quota).
    pub fn detect() -> Self {
        let memory_bytes = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| meminfo_field(&text, "MemTotal"))
            .unwrap_or(4 * GIB);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        HostResources {
            memory_bytes,
            cpu_millis: cpus * 1000,
        }
    }
}

/// A field of `/proc/meminfo` (`MemTotal`, `MemAvailable`) in bytes.
pub fn meminfo_field(meminfo: &str, field: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// Memory kept for the gateway, its database and the system: max(1 GiB, 20 % of the host).
pub fn memory_reserve(host_memory: u64) -> u64 {
    GIB.max(host_memory / 5)
}

/// The default total memory of all sandboxes: the host minus [`memory_reserve`], but at least a
/// quarter of the host (a 1 GiB machine still gets 256 MiB of sandboxes); whole MiB (the kernel
/// keeps limits in pages, and a limit read back must match what was written).
pub fn default_total_memory(host_memory: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let total = host_memory
        .saturating_sub(memory_reserve(host_memory))
        .max(host_memory / 4);
    (total / MIB * MIB).max(MIB)
}

/// The default total CPU: the host's CPUs minus max(0.5, 10 %) of them (2 cores → 1.5).
pub fn default_total_cpu(host_cpu_millis: u64) -> u64 {
    host_cpu_millis
        .saturating_sub(500.max(host_cpu_millis / 10))
        .max(host_cpu_millis / 2)
        .max(100)
}

impl TotalLimits {
    /// The configured values, each absent one derived from the host.
    pub fn resolve(
        host: HostResources,
        memory_bytes: Option<u64>,
        cpu_millis: Option<u64>,
        pids: Option<u64>,
    ) -> Self {
        TotalLimits {
            memory_bytes: memory_bytes.unwrap_or_else(|| default_total_memory(host.memory_bytes)),
            cpu_millis: cpu_millis.unwrap_or_else(|| default_total_cpu(host.cpu_millis)),
            pids: pids.unwrap_or(DEFAULT_TOTAL_PIDS),
        }
    }
}

/// Everything about the aggregate bound that the config decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotalSettings {
    pub limits: TotalLimits,
    /// The parent cgroup's name (`sandbox.total.cgroup`): a lowercase letter, then lowercase
    /// letters, digits or `_` (at most 64).
    pub cgroup_name: String,
    /// `sandbox.maxActive`.
    pub max_active: usize,
    /// `sandbox.queueTimeoutSeconds`: how long a command waits for a slot.
    pub queue_timeout: Duration,
    /// Whether sandboxes found alive (Docker containers of an earlier run) are counted against
    /// `maxActive` and may be stopped to make room: the gateway, yes. A terminal
    /// `moltmate chat` beside a running gateway, no — those containers are the gateway's, and
    /// one of them may be running a command of another user right now; that process counts
    /// (and can stop) only what it started. The parent cgroup bounds both.
    pub adopt_found: bool,
}

pub use moltmate_core::sandbox::valid_cgroup_name;

/// How the parent is named for the engine that puts containers in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentStyle {
    /// A plain directory: bubblewrap, and Docker's `cgroupfs` driver (`CgroupParent: /name`).
    Path,
    /// A systemd slice: Docker's `systemd` driver (`CgroupParent: name.slice`).
    SystemdSlice,
}

impl ParentStyle {
    /// The directory's name below each hierarchy's root.
    pub fn dir_name(self, name: &str) -> String {
        match self {
            ParentStyle::Path => name.to_string(),
            ParentStyle::SystemdSlice => format!("{name}.slice"),
        }
    }

    /// What Docker is given as `HostConfig.CgroupParent`.
    pub fn docker_parent(self, name: &str) -> String {
        match self {
            ParentStyle::Path => format!("/{name}"),
            ParentStyle::SystemdSlice => format!("{name}.slice"),
        }
    }
}

/// The parent's directory in each hierarchy it is limited or measured in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentDirs {
    V1 {
        memory: PathBuf,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
        /// For measuring CPU time (`cpuacct.usage`); the same directory as `cpu` where the two
        /// controllers share a mount.
        cpuacct: Option<PathBuf>,
    },
    V2 {
        dir: PathBuf,
    },
}

/// Files written to limit the parent, in order: `(directory, file, value, required)`.
/// A required write that fails fails the set-up; the others are best effort (a kernel without
/// swap accounting has no `memory.memsw.*`).
pub fn limit_writes(
    dirs: &ParentDirs,
    limits: &TotalLimits,
) -> Vec<(PathBuf, &'static str, String, bool)> {
    let quota = limits.cpu_millis.max(10) * CPU_PERIOD_US / 1000;
    let mut out = Vec::new();
    match dirs {
        ParentDirs::V1 {
            memory, pids, cpu, ..
        } => {
            let mem = limits.memory_bytes.to_string();
            // memsw ≥ memory must hold at every step: raising needs memsw first, lowering
            // memory first. Both orders are written; whichever step the kernel refuses is
            // repeated by the other.
            out.push((
                memory.clone(),
                "memory.memsw.limit_in_bytes",
                mem.clone(),
                false,
            ));
            out.push((memory.clone(), "memory.limit_in_bytes", mem.clone(), true));
            out.push((memory.clone(), "memory.memsw.limit_in_bytes", mem, false));
            if let Some(pids) = pids {
                out.push((pids.clone(), "pids.max", limits.pids.to_string(), true));
            }
            if let Some(cpu) = cpu {
                out.push((
                    cpu.clone(),
                    "cpu.cfs_period_us",
                    CPU_PERIOD_US.to_string(),
                    false,
                ));
                out.push((cpu.clone(), "cpu.cfs_quota_us", quota.to_string(), true));
            }
        }
        ParentDirs::V2 { dir } => {
            out.push((
                dir.clone(),
                "memory.max",
                limits.memory_bytes.to_string(),
                true,
            ));
            out.push((dir.clone(), "memory.swap.max", "0".to_string(), false));
            out.push((dir.clone(), "pids.max", limits.pids.to_string(), true));
            out.push((
                dir.clone(),
                "cpu.max",
                format!("{quota} {CPU_PERIOD_US}"),
                false,
            ));
        }
    }
    out
}

/// The note appended to a command's stderr when the OOM killer ended it: which limit applies,
/// and — under a total — that all sandboxes together may have reached theirs.
pub fn oom_note(sandbox_limit_bytes: u64, total_bytes: Option<u64>) -> String {
    match total_bytes {
        Some(total) => format!(
            "\n[moltmate: killed: out of memory (this sandbox may use {} MiB; all sandboxes on this server together {} MiB)]",
            sandbox_limit_bytes >> 20,
            total >> 20
        ),
        None => format!(
            "\n[moltmate: killed: out of memory (limit {} MiB)]",
            sandbox_limit_bytes >> 20
        ),
    }
}

/// Whether a limit file read back as `read` holds the `written` value: equal, or (memory) the
/// same rounded down to the kernel's page (up to 64 KiB pages).
pub fn limit_holds(written: &str, read: &str) -> bool {
    let (written, read) = (written.trim(), read.trim());
    if written == read || written.split_whitespace().next() == read.split_whitespace().next() {
        return true;
    }
    match (written.parse::<u64>(), read.parse::<u64>()) {
        (Ok(w), Ok(r)) => r <= w && w - r < 64 * 1024,
        _ => false,
    }
}

/// Usage of all sandboxes together, read from the parent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParentUsage {
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_micros: Option<u64>,
    pub pids: Option<u64>,
}

/// The gateway's parent cgroup for every sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentCgroup {
    name: String,
    style: ParentStyle,
    dirs: ParentDirs,
    limits: TotalLimits,
}

impl ParentCgroup {
    /// Makes (or adopts) the parent at the host's cgroup root and limits it.
    pub fn create(name: &str, style: ParentStyle, limits: TotalLimits) -> Result<Self, String> {
        Self::create_at(Path::new(ROOT), name, style, limits)
    }

    /// [`Self::create`] below `root` (tests use a plain directory shaped like a hierarchy).
    pub fn create_at(
        root: &Path,
        name: &str,
        style: ParentStyle,
        limits: TotalLimits,
    ) -> Result<Self, String> {
        if !valid_cgroup_name(name) {
            return Err(format!("{name:?} is not a valid cgroup name"));
        }
        let dir_name = style.dir_name(name);
        let dirs = if root.join("cgroup.controllers").is_file() {
            create_v2(root, &dir_name)?
        } else {
            create_v1(root, &dir_name)?
        };
        let parent = ParentCgroup {
            name: name.to_string(),
            style,
            dirs,
            limits,
        };
        parent.apply_limits()?;
        Ok(parent)
    }

    /// Writes the limits again (idempotent). Docker's `systemd` driver may reset a slice's
    /// limits when it realises the slice, so the Docker backend calls this after each create.
    pub fn apply_limits(&self) -> Result<(), String> {
        let mut first_error = None;
        let mut failed_required = Vec::new();
        for (dir, file, value, required) in limit_writes(&self.dirs, &self.limits) {
            let path = dir.join(file);
            match fs::write(&path, &value) {
                Ok(()) => {}
                Err(e) if required => {
                    failed_required.push(path.clone());
                    first_error
                        .get_or_insert(format!("cannot write {value} to {}: {e}", path.display()));
                }
                Err(_) => {}
            }
        }
        // A required write refused once (memsw ordering) may have succeeded on a later line;
        // what counts is whether each required file holds its value now.
        for (dir, file, value, required) in limit_writes(&self.dirs, &self.limits) {
            if !required {
                continue;
            }
            let path = dir.join(file);
            let now = fs::read_to_string(&path).unwrap_or_default();
            if !limit_holds(&value, &now) {
                return Err(first_error
                    .unwrap_or_else(|| format!("{} does not hold {value}", path.display())));
            }
        }
        Ok(())
    }

    /// The name configured (`moltmate`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn style(&self) -> ParentStyle {
        self.style
    }

    pub fn limits(&self) -> TotalLimits {
        self.limits
    }

    pub fn dirs(&self) -> &ParentDirs {
        &self.dirs
    }

    /// `HostConfig.CgroupParent` for Docker.
    pub fn docker_parent(&self) -> String {
        self.style.docker_parent(&self.name)
    }

    /// How the operator finds it (`/moltmate`, `moltmate.slice`).
    pub fn display(&self) -> String {
        match self.style {
            ParentStyle::Path => format!("/{}", self.name),
            ParentStyle::SystemdSlice => format!("{}.slice", self.name),
        }
    }

    /// Reads usage from the parent (small cgroup files; call off the async runtime).
    pub fn usage(&self) -> ParentUsage {
        let num =
            |path: PathBuf| -> Option<u64> { fs::read_to_string(path).ok()?.trim().parse().ok() };
        match &self.dirs {
            ParentDirs::V1 {
                memory,
                pids,
                cpuacct,
                ..
            } => ParentUsage {
                memory_bytes: num(memory.join("memory.usage_in_bytes")),
                memory_peak_bytes: num(memory.join("memory.max_usage_in_bytes")),
                cpu_micros: cpuacct
                    .as_ref()
                    .and_then(|d| num(d.join("cpuacct.usage")))
                    .map(|ns| ns / 1000),
                pids: pids.as_ref().and_then(|d| num(d.join("pids.current"))),
            },
            ParentDirs::V2 { dir } => ParentUsage {
                memory_bytes: num(dir.join("memory.current")),
                memory_peak_bytes: num(dir.join("memory.peak")),
                cpu_micros: fs::read_to_string(dir.join("cpu.stat")).ok().and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.trim().parse().ok())
                }),
                pids: num(dir.join("pids.current")),
            },
        }
    }
}

fn create_v2(root: &Path, dir_name: &str) -> Result<ParentDirs, String> {
    let controllers = fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| format!("cannot read {}/cgroup.controllers: {e}", root.display()))?;
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    if !has("memory") || !has("pids") {
        return Err("the cgroup v2 root offers no memory or pids controller".to_string());
    }
    let enable = v2_subtree_control(&controllers);
    fs::write(root.join("cgroup.subtree_control"), &enable).map_err(|e| {
        format!(
            "cannot enable {enable} in {}/cgroup.subtree_control: {e} (needs root in the host's cgroup namespace)",
            root.display()
        )
    })?;
    let dir = root.join(dir_name);
    mkdir(&dir)?;
    // Children (bubblewrap's per-exec groups, Docker's containers) get the same controllers.
    fs::write(dir.join("cgroup.subtree_control"), &enable)
        .map_err(|e| format!("cannot enable {enable} in {}: {e}", dir.display()))?;
    Ok(ParentDirs::V2 { dir })
}

/// `+memory +pids` and `+cpu` where offered: what a v2 parent enables for its children.
pub fn v2_subtree_control(controllers: &str) -> String {
    let mut enable = vec!["+memory", "+pids"];
    if controllers.split_whitespace().any(|c| c == "cpu") {
        enable.push("+cpu");
    }
    enable.join(" ")
}

fn create_v1(root: &Path, dir_name: &str) -> Result<ParentDirs, String> {
    let mounted = |ctrl: &str| root.join(ctrl).join("cgroup.procs").is_file();
    if !mounted("memory") {
        return Err(format!(
            "no memory controller at {}/memory (cgroup v1) or cgroup v2 at {}",
            root.display(),
            root.display()
        ));
    }
    let memory = root.join("memory").join(dir_name);
    mkdir(&memory)?;
    let optional = |ctrl: &str| -> Option<PathBuf> {
        if !mounted(ctrl) {
            return None;
        }
        let dir = root.join(ctrl).join(dir_name);
        match mkdir(&dir) {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!(error = %e, "sandbox parent cgroup: controller {ctrl} unusable");
                None
            }
        }
    };
    let pids = optional("pids");
    let cpu = optional("cpu");
    // `cpu` and `cpuacct` are often one mount (`cpu,cpuacct`, with symlinks): then one dir.
    let cpuacct = optional("cpuacct");
    Ok(ParentDirs::V1 {
        memory,
        pids,
        cpu,
        cpuacct,
    })
}

fn mkdir(dir: &Path) -> Result<(), String> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
    }
}

/// Removes the parent named `dir_name` and everything below it from every hierarchy under the
/// host's cgroup root, killing what still runs inside. For tests (and an operator cleaning up):
/// production keeps the parent, since warm containers outlive a gateway restart.
pub fn remove_parent(dir_name: &str) -> Result<(), String> {
    remove_parent_at(Path::new(ROOT), dir_name)
}

/// [`remove_parent`] below `root`.
pub fn remove_parent_at(root: &Path, dir_name: &str) -> Result<(), String> {
    if dir_name.is_empty() || dir_name.contains('/') || dir_name.starts_with('.') {
        return Err(format!("{dir_name:?} is not a cgroup directory name"));
    }
    let mut tops = vec![root.join(dir_name)];
    if let Ok(entries) = fs::read_dir(root) {
        for entry in entries.flatten() {
            tops.push(entry.path().join(dir_name));
        }
    }
    let mut left = Vec::new();
    for top in tops {
        if top.is_dir() && !remove_tree(&top) {
            left.push(top.display().to_string());
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("could not remove {}", left.join(", ")))
    }
}

/// Kills every process in `dir` and below, then removes the directories bottom-up (retrying:
/// the kernel lets a cgroup go only when its last process has been reaped).
fn remove_tree(dir: &Path) -> bool {
    if !dir.join("cgroup.procs").is_file() {
        // Not a cgroup: nothing here is ours to delete.
        return false;
    }
    let mut ok = true;
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                ok &= remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..200 {
        let pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default();
        for pid in &pids {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return ok;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// The last CPU reading `(when, µs)` and the rate (thousandths of a CPU) seen between the last
/// two readings.
#[derive(Debug, Default)]
struct CpuSample {
    last: Option<(Instant, u64)>,
    rate: Option<u64>,
}

/// The aggregate bound a backend runs under: the parent cgroup (when the host gives one) and
/// the cap on sandboxes alive at once.
#[derive(Debug)]
pub struct SandboxBounds {
    pub settings: TotalSettings,
    /// `Err`: why there is no parent cgroup (then only `maxActive` holds).
    pub parent: Result<ParentCgroup, String>,
    pub active: Arc<ActiveSandboxes>,
    cpu_sample: Mutex<CpuSample>,
}

impl SandboxBounds {
    /// Sets up the bound: makes the parent cgroup (logging why not, when it cannot).
    pub fn new(settings: TotalSettings, style: ParentStyle) -> Arc<Self> {
        let parent = ParentCgroup::create(&settings.cgroup_name, style, settings.limits);
        Self::with_parent(settings, parent)
    }

    /// With a parent decided elsewhere (or none: `Err(reason)`).
    pub fn with_parent(settings: TotalSettings, parent: Result<ParentCgroup, String>) -> Arc<Self> {
        match &parent {
            Ok(p) => tracing::info!(
                cgroup = %p.display(),
                memory_mb = settings.limits.memory_bytes >> 20,
                cpus = settings.limits.cpu_millis as f64 / 1000.0,
                pids = settings.limits.pids,
                max_active = settings.max_active,
                "all sandboxes together are limited"
            ),
            Err(why) => tracing::warn!(
                reason = %why,
                max_active = settings.max_active,
                "no parent cgroup for the sandboxes: their total memory, CPU and pids are not bounded (only how many run at once)"
            ),
        }
        let active = ActiveSandboxes::new(settings.max_active, settings.queue_timeout);
        Arc::new(SandboxBounds {
            settings,
            parent,
            active,
            cpu_sample: Mutex::new(CpuSample::default()),
        })
    }

    pub fn parent(&self) -> Option<&ParentCgroup> {
        self.parent.as_ref().ok()
    }

    /// A per-sandbox CPU limit that fits under the total (cgroup v1 refuses a child quota above
    /// its parent's, and Docker then cannot start the container).
    pub fn clamp_cpu(&self, cpu_millis: u32) -> u32 {
        let total = u32::try_from(self.settings.limits.cpu_millis).unwrap_or(u32::MAX);
        cpu_millis.min(total.max(10))
    }

    /// The aggregate for `/metrics` and `/admin` (reads the parent off the runtime).
    pub async fn aggregate(&self) -> SandboxAggregate {
        let snapshot = self.active.snapshot();
        let usage = match self.parent() {
            Some(parent) => {
                let parent = parent.clone();
                tokio::task::spawn_blocking(move || parent.usage())
                    .await
                    .unwrap_or_default()
            }
            None => ParentUsage::default(),
        };
        let recent = usage.cpu_micros.and_then(|now_us| self.cpu_rate(now_us));
        let limits = self.settings.limits;
        SandboxAggregate {
            alive: snapshot.alive as u64,
            max_active: self.settings.max_active as u64,
            queued: snapshot.queued as u64,
            evicted: snapshot.evicted,
            queue_timeouts: snapshot.queue_timeouts,
            memory_limit_bytes: limits.memory_bytes,
            memory_used_bytes: usage.memory_bytes,
            memory_peak_bytes: usage.memory_peak_bytes,
            cpu_limit_millis: limits.cpu_millis,
            cpu_used_micros: usage.cpu_micros,
            cpu_recent_millis: recent,
            pids_limit: limits.pids,
            pids_used: usage.pids,
            cgroup: self.parent().map(ParentCgroup::display),
            cgroup_problem: self.parent.as_ref().err().cloned(),
        }
    }

    /// CPU in use (thousandths of a CPU) between the previous reading at least a second ago and
    /// this one; the last rate seen when readings come faster.
    fn cpu_rate(&self, now_us: u64) -> Option<u64> {
        let mut sample = self.cpu_sample.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match sample.last {
            Some((at, before_us)) if now.duration_since(at) >= Duration::from_secs(1) => {
                let elapsed_us = now.duration_since(at).as_micros().max(1) as u64;
                sample.rate =
                    Some(now_us.saturating_sub(before_us).saturating_mul(1000) / elapsed_us);
                sample.last = Some((now, now_us));
            }
            Some(_) => {}
            None => sample.last = Some((now, now_us)),
        }
        sample.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: TotalLimits = TotalLimits {
        memory_bytes: 1 << 30,
        cpu_millis: 1500,
        pids: 4096,
    };

    #[test]
    fn defaults_leave_room_for_the_gateway_and_the_system() {
        // 24 GiB, 2 cores: 20 % reserved (more than 1 GiB), half a core kept.
        let host = HostResources {
            memory_bytes: 24 * GIB,
            cpu_millis: 2000,
        };
        let limits = TotalLimits::resolve(host, None, None, None);
        assert_eq!(limits.memory_bytes, (24 * GIB - 24 * GIB / 5) >> 20 << 20);
        assert_eq!(limits.cpu_millis, 1500);
        assert_eq!(limits.pids, DEFAULT_TOTAL_PIDS);
        // Whole MiB, also where the host's RAM is not (the kernel rounds limits to pages).
        assert_eq!(default_total_memory(25_275_990_016) % (1 << 20), 0);
        assert_eq!(default_total_memory(25_275_990_016), 20_220_739_584);
        // 4 GiB: the 1 GiB floor of the reserve applies.
        assert_eq!(default_total_memory(4 * GIB), 3 * GIB);
        // 1 GiB: still a quarter for sandboxes.
        assert_eq!(default_total_memory(GIB), GIB / 4);
        // 32 cores keep 10 %.
        assert_eq!(default_total_cpu(32_000), 28_800);
        assert_eq!(default_total_cpu(1000), 500);
        // Configured values win.
        let set = TotalLimits::resolve(host, Some(GIB), Some(700), Some(100));
        assert_eq!(
            (set.memory_bytes, set.cpu_millis, set.pids),
            (GIB, 700, 100)
        );
    }

    /// Regression: the host-derived default (not a whole page) was rounded down by the kernel,
    /// read back as different, and the parent was dropped as "not limited".
    #[test]
    fn limits_read_back_rounded_to_a_page_still_hold() {
        assert!(limit_holds("20220792013", "20220788736\n"));
        assert!(limit_holds("4096", "4096\n"));
        assert!(limit_holds("150000 100000", "150000 100000\n"));
        assert!(
            !limit_holds("1073741824", "9223372036854771712\n"),
            "unlimited is not held"
        );
        assert!(!limit_holds("1073741824", "536870912"));
        assert!(!limit_holds("max", ""));
    }

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text = "MemTotal:       24683584 kB\nMemFree:  1 kB\nMemAvailable:   23200000 kB\n";
        assert_eq!(meminfo_field(text, "MemTotal"), Some(24683584 * 1024));
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(23200000 * 1024));
        assert_eq!(meminfo_field(text, "Mem"), None);
        assert_eq!(meminfo_field("MemTotal: lots\n", "MemTotal"), None);
    }

    #[test]
    fn cgroup_names_are_one_safe_component() {
        for ok in ["moltmate", "moltmate_test_1", "m"] {
            assert!(valid_cgroup_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Moltmate",
            "molt-mate",
            "../x",
            "a/b",
            "1abc",
            ".x",
            &"a".repeat(65),
        ] {
            assert!(!valid_cgroup_name(bad), "{bad}");
        }
    }

    #[test]
    fn docker_gets_a_path_or_a_slice() {
        assert_eq!(ParentStyle::Path.docker_parent("moltmate"), "/moltmate");
        assert_eq!(ParentStyle::Path.dir_name("moltmate"), "moltmate");
        assert_eq!(
            ParentStyle::SystemdSlice.docker_parent("moltmate"),
            "moltmate.slice"
        );
        assert_eq!(
            ParentStyle::SystemdSlice.dir_name("moltmate"),
            "moltmate.slice"
        );
    }

    /// cgroup v2 is not what this CI host runs (v1), so its paths and files are pinned here
    /// against a directory shaped like a v2 root.
    #[test]
    fn v2_parent_enables_controllers_and_writes_its_limits() {
        let root = tempfile::tempdir().unwrap();
        fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        let parent =
            ParentCgroup::create_at(root.path(), "moltmate", ParentStyle::Path, LIMITS).unwrap();
        let dir = root.path().join("moltmate");
        assert_eq!(parent.dirs(), &ParentDirs::V2 { dir: dir.clone() });
        let read = |p: PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(
            read(root.path().join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(
            read(dir.join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(read(dir.join("memory.max")), (1u64 << 30).to_string());
        assert_eq!(read(dir.join("memory.swap.max")), "0");
        assert_eq!(read(dir.join("pids.max")), "4096");
        assert_eq!(read(dir.join("cpu.max")), "150000 100000");
        assert_eq!(parent.docker_parent(), "/moltmate");

        // Usage comes from the v2 files.
        fs::write(dir.join("memory.current"), "1234\n").unwrap();
        fs::write(dir.join("memory.peak"), "5678\n").unwrap();
        fs::write(dir.join("cpu.stat"), "usage_usec 42000\nuser_usec 1\n").unwrap();
        fs::write(dir.join("pids.current"), "7\n").unwrap();
        assert_eq!(
            parent.usage(),
            ParentUsage {
                memory_bytes: Some(1234),
                memory_peak_bytes: Some(5678),
                cpu_micros: Some(42000),
                pids: Some(7)
            }
        );

        // With Docker's systemd driver the parent is a slice.
        let slice =
            ParentCgroup::create_at(root.path(), "moltmate", ParentStyle::SystemdSlice, LIMITS)
                .unwrap();
        assert_eq!(
            slice.dirs(),
            &ParentDirs::V2 {
                dir: root.path().join("moltmate.slice")
            }
        );
        assert_eq!(slice.docker_parent(), "moltmate.slice");

        // No cpu controller offered: memory and pids only.
        assert_eq!(v2_subtree_control("memory pids"), "+memory +pids");
    }

    #[test]
    fn v1_parent_is_made_in_each_controller_under_one_path() {
        let root = tempfile::tempdir().unwrap();
        for ctrl in ["memory", "pids", "cpu", "cpuacct"] {
            fs::create_dir(root.path().join(ctrl)).unwrap();
            fs::write(root.path().join(ctrl).join("cgroup.procs"), "").unwrap();
        }
        let parent =
            ParentCgroup::create_at(root.path(), "moltmate_t", ParentStyle::Path, LIMITS).unwrap();
        let read = |p: &str| fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(
            read("memory/moltmate_t/memory.limit_in_bytes"),
            (1u64 << 30).to_string()
        );
        assert_eq!(
            read("memory/moltmate_t/memory.memsw.limit_in_bytes"),
            (1u64 << 30).to_string()
        );
        assert_eq!(read("pids/moltmate_t/pids.max"), "4096");
        assert_eq!(read("cpu/moltmate_t/cpu.cfs_quota_us"), "150000");
        assert_eq!(read("cpu/moltmate_t/cpu.cfs_period_us"), "100000");
        fs::write(
            root.path().join("cpuacct/moltmate_t/cpuacct.usage"),
            "3000000\n",
        )
        .unwrap();
        assert_eq!(parent.usage().cpu_micros, Some(3000));

        // Plain directories are not cgroups: removal refuses to touch them.
        assert!(remove_parent_at(root.path(), "moltmate_t").is_err());
        assert!(root.path().join("memory/moltmate_t").is_dir());
        assert!(remove_parent_at(root.path(), "../etc").is_err());
    }

    #[test]
    fn no_memory_controller_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let err = ParentCgroup::create_at(root.path(), "moltmate", ParentStyle::Path, LIMITS)
            .unwrap_err();
        assert!(err.contains("no memory controller"), "{err}");
        let err =
            ParentCgroup::create_at(root.path(), "a/b", ParentStyle::Path, LIMITS).unwrap_err();
        assert!(err.contains("not a valid cgroup name"), "{err}");
    }
}
