//! Signal channel settings.

use super::rpc::DaemonAddress;
use std::path::PathBuf;
use std::time::Duration;

/// How the gateway reaches signal-cli.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalDaemon {
    /// Start and supervise `signal-cli daemon` ourselves (multi-account mode, manual receive,
    /// a Unix socket inside `data_dir`).
    Supervised {
        /// The `signal-cli` program (a name looked up in `PATH`, or a path).
        cli_path: String,
        /// signal-cli's data directory (`--config`): keys and the linked session. 0700.
        data_dir: PathBuf,
    },
    /// Connect to a daemon the operator runs.
    External(DaemonAddress),
}

/// Everything the Signal channel needs. Nothing here is secret except what signal-cli keeps
/// in its data directory, which the gateway never reads.
#[derive(Debug, Clone)]
pub struct SignalSettings {
    /// The linked account, `+4917...` (E.164).
    pub account: String,
    pub daemon: SignalDaemon,
    /// Name of the linked device as the phone lists it.
    pub device_name: String,
    /// Send read receipts for messages the gateway stored.
    pub read_receipts: bool,
    /// Deadline of ordinary calls (send, typing, listAccounts).
    pub request_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Upper bound for a rate limit's requested wait.
    pub max_retry_after: Duration,
    /// Attempts per outgoing part.
    pub send_attempts: u32,
    /// How often the link is checked (`listAccounts`) while connected.
    pub link_check_interval: Duration,
    /// Largest file fetched (`getAttachment`) or sent (`send_file`); also bounds the length of
    /// a JSON-RPC line read from signal-cli (the file in base64).
    pub max_file_bytes: u64,
}

/// Default for [`SignalSettings::max_file_bytes`].
pub const DEFAULT_MAX_FILE_BYTES: u64 = 20 << 20;

impl SignalSettings {
    pub fn new(account: impl Into<String>, daemon: SignalDaemon) -> Self {
        SignalSettings {
            account: account.into(),
            daemon,
            device_name: "moltmate".to_string(),
            read_receipts: false,
            request_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
            send_attempts: 5,
            link_check_interval: Duration::from_secs(60),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

/// Whether `account` is an E.164 number: `+`, then 7 to 15 digits, the first not 0.
pub fn is_e164(account: &str) -> bool {
    account.strip_prefix('+').is_some_and(|digits| {
        (7..=15).contains(&digits.len())
            && digits.chars().all(|c| c.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164() {
        assert!(is_e164("+4917012345678"));
        for bad in [
            "4917012345678",
            "+",
            "+0123456789",
            "+49 170",
            "+1234",
            "+1234567890123456",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
    }
}
