//! The seccomp filter every bubblewrap sandbox runs under, compiled with `seccompiler`.
//!
//! A deny-list on top of bwrap's own hardening (no capabilities, `no_new_privs`, namespaces):
//! it removes the kernel interfaces a sandbox never needs and that carry most container-escape
//! history — tracing, mounting, keyrings, BPF, perf, userfaultfd, new namespaces, module and
//! kexec loading, io_uring. Denied calls fail with `EPERM` (so programs degrade instead of
//! dying); `clone3` fails with `ENOSYS` so libc falls back to `clone`, whose flags can be
//! inspected (clone3 passes them in memory, out of a filter's reach).
//!
//! On x86_64 the x32 ABI reaches the same system calls under numbers with bit 30 set, which a
//! per-number list would miss; a short hand-written prefix refuses every x32 call first.

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;
#[cfg(target_arch = "riscv64")]
const ARCH: TargetArch = TargetArch::riscv64;

/// System calls refused outright.
fn denied_syscalls() -> Vec<libc::c_long> {
    let mut v = vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kcmp,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_fanotify_init,
        libc::SYS_lookup_dcookie,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_uselib]);
    v
}

/// Namespace flags `clone` may not carry.
const NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

/// Why the filter could not be compiled (a programming error in the rule set, never input).
#[derive(Debug, thiserror::Error)]
#[error("cannot compile the sandbox seccomp filter: {0}")]
pub struct SeccompBuildError(String);

/// Compiles the filter to the raw `struct sock_filter` array `bwrap --seccomp FD` reads.
pub fn compile() -> Result<Vec<u8>, SeccompBuildError> {
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in denied_syscalls() {
        rules.insert(nr, Vec::new());
    }
    let mut clone_rules = Vec::new();
    for flag in NAMESPACE_FLAGS {
        let cond = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag as u64),
            flag as u64,
        )
        .map_err(|e| SeccompBuildError(e.to_string()))?;
        clone_rules
            .push(SeccompRule::new(vec![cond]).map_err(|e| SeccompBuildError(e.to_string()))?);
    }
    rules.insert(libc::SYS_clone, clone_rules);

    let main: BpfProgram = SeccompFilter::new(rules, SeccompAction::Allow, eperm, ARCH)
        .and_then(|f| f.try_into())
        .map_err(|e| SeccompBuildError(e.to_string()))?;

    // clone3 → ENOSYS needs a second action, which one seccompiler filter cannot express; a
    // tiny hand-written prefix handles it (and x32) before the compiled program runs.
    let mut program = prefix();
    program.extend(main);
    let mut bytes = Vec::with_capacity(program.len() * 8);
    for ins in &program {
        bytes.extend_from_slice(&ins.code.to_ne_bytes());
        bytes.push(ins.jt);
        bytes.push(ins.jf);
        bytes.extend_from_slice(&ins.k.to_ne_bytes());
    }
    Ok(bytes)
}

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// Offsets in `struct seccomp_data`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
#[cfg(target_arch = "riscv64")]
const AUDIT_ARCH: u32 = 0xc000_00f3;

/// Native arch only: anything else is handed to the compiled program, whose own arch check
/// kills it. For the native arch: x32 numbers → EPERM, clone3 → ENOSYS, else fall through.
fn prefix() -> Vec<sock_filter> {
    let ret_eperm = libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32);
    let ret_enosys = libc::SECCOMP_RET_ERRNO | (libc::ENOSYS as u32);
    let x32_bit: u32 = if cfg!(target_arch = "x86_64") {
        0x4000_0000
    } else {
        u32::MAX
    };
    vec![
        // 0: A = arch; if not native skip the whole prefix (5 more instructions).
        ins(BPF_LD_W_ABS, 0, 0, OFFSET_ARCH),
        ins(BPF_JEQ_K, 0, 5, AUDIT_ARCH),
        // 2: A = nr
        ins(BPF_LD_W_ABS, 0, 0, OFFSET_NR),
        // 3: x32 (or, elsewhere, nothing): → EPERM
        ins(BPF_JGE_K, 2, 0, x32_bit),
        // 4: clone3 → ENOSYS
        ins(BPF_JEQ_K, 0, 2, libc::SYS_clone3 as u32),
        ins(BPF_RET_K, 0, 0, ret_enosys),
        ins(BPF_RET_K, 0, 0, ret_eperm),
        // 7: the compiled program starts here.
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn compiles_to_whole_instructions() {
        let bytes = super::compile().unwrap();
        assert_eq!(bytes.len() % 8, 0);
        assert!(bytes.len() / 8 > 40);
        assert!(
            bytes.len() / 8 < 4096,
            "BPF programs are limited to 4096 instructions"
        );
    }
}
