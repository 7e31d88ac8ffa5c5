//! The `/etc/passwd` and `/etc/group` a sandbox sees: its user is `agent` under the user's own
//! sandbox ids ([`SandboxIds`]), so `whoami`, `id -un` and programs that look their user up
//! work whatever uid the gateway gave the user. Nothing of the host's user database enters.

use moltmate_core::sandbox::SandboxIds;

/// `/etc/passwd`: `root`, the sandbox user `agent` (home `/workspace`) and `nobody`.
pub(crate) fn passwd(ids: SandboxIds) -> String {
    format!(
        "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n\
         agent:x:{}:{}:Moltmates sandbox:/workspace:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        ids.uid, ids.gid
    )
}

/// `/etc/group`: the user's own group, and the family folder's group (`family`, with `agent`
/// as its member) where the sandbox runs with it. (Under bubblewrap the family gid is not
/// mapped into the sandbox's user namespace, so it is left out there: it shows as `nogroup`,
/// while the kernel still grants its access on `/family`.)
pub(crate) fn group(ids: SandboxIds, family_gid: Option<u32>) -> String {
    let mut text = format!("root:x:0:\nagent:x:{}:\n", ids.gid);
    if let Some(gid) = family_gid {
        text.push_str(&format!("family:x:{gid}:agent\n"));
    }
    text.push_str("nogroup:x:65534:\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_user_is_agent_under_its_own_ids() {
        let ids = SandboxIds::same(2_000_000_007);
        assert!(passwd(ids).contains("\nagent:x:2000000007:2000000007:"));
        assert_eq!(
            group(ids, Some(2_000_000_009)),
            "root:x:0:\nagent:x:2000000007:\nfamily:x:2000000009:agent\nnogroup:x:65534:\n"
        );
        assert!(!group(ids, None).contains("family"));
    }
}
