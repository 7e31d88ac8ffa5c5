//! The `moltmate` crate: CLI parsing, wiring, startup and shutdown. Everything else lives in the
//! library crates; see ARCHITECTURE.md. `main.rs` only calls [`main_entry`]; the modules are a
//! library so integration tests can start the gateway in-process through the same wiring.

pub mod admin;
pub mod chat;
pub mod doctor;
pub mod operate;
pub mod serve;
mod signal_link;
pub mod wiring;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use moltmate_core::UserId;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "moltmate",
    version,
    about = "Moltmates: one server, many people, each with their own AI assistant."
)]
struct Cli {
    /// The gateway's home (config, database, users). Default: $MOLTMATE_HOME, else ~/.moltmate.
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (channels, web UI and API) until interrupted.
    Serve,
    /// Create the home and write a commented starter moltmate.json.
    Init,
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Chat with the assistant as a user from this terminal (interactive, or one message).
    Chat {
        /// The user to chat as (a user id like `anna` or `telegram_123456`).
        #[arg(long)]
        user: String,
        /// Send this one message, print the answer and exit.
        #[arg(long)]
        message: Option<String>,
    },
    /// Pairing requests of unknown senders.
    Pairing {
        #[command(subcommand)]
        command: PairingCommand,
    },
    /// Users: list, inspect, add, reset, remove, export; API tokens and login links.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Sandboxes: list, prune, build the image.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
    /// Check the setup against the security checklist (exit 1 on any failing check).
    Doctor {
        /// Print the report as JSON: {version, checks: [{id, title, status, detail, fix}]}.
        #[arg(long)]
        json: bool,
        /// Apply the safe fixes first (permissions, missing directories) and say what changed.
        #[arg(long)]
        fix: bool,
    },
    /// Messaging channels: `moltmate channels signal link`.
    Channels {
        #[command(subcommand)]
        command: ChannelsCommand,
    },
    /// The gateway's own container image.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Back the home up into FILE (gzip'd tar with a checksummed manifest) while the gateway
    /// serves. Secrets stay out unless --include-secrets.
    Backup {
        file: PathBuf,
        /// Keep the config's inline secrets and admin.token in the archive.
        #[arg(long)]
        include_secrets: bool,
    },
    /// Restore a backup into a new or empty home: `moltmate restore FILE --home DIR`.
    Restore { file: PathBuf },
    /// Messages, tokens, estimated cost, tool calls and exec time per user and day.
    Usage {
        /// Only this user.
        #[arg(long)]
        user: Option<String>,
        /// First day (YYYY-MM-DD, local time). Default: 30 days ago.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: operate::UsageFormat,
    },
}

#[derive(Subcommand)]
enum ChannelsCommand {
    /// Signal (through signal-cli).
    Signal {
        #[command(subcommand)]
        command: SignalCommand,
    },
}

#[derive(Subcommand)]
enum SignalCommand {
    /// Link channels.signal.account as a new device: shows a QR code to scan with the phone
    /// (Signal → Settings → Linked devices). Stop the gateway first when it supervises
    /// signal-cli, or scan the code on /admin instead.
    Link,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the gateway image offline from Debian packages, with this moltmate binary in it.
    Build {
        /// Image name and tag.
        #[arg(long, default_value = concat!("moltmate-gateway:", env!("CARGO_PKG_VERSION")))]
        tag: String,
        /// The binary to put in (default: this one). It must run on Debian bookworm.
        #[arg(long, value_name = "FILE")]
        binary: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate moltmate.json without starting anything.
    Check,
}

#[derive(Subcommand)]
enum PairingCommand {
    /// Pending requests.
    List,
    /// Let a sender in: `moltmate pairing approve telegram ABCD2345`.
    Approve { channel: String, code: String },
    /// Refuse a request.
    Deny { channel: String, code: String },
}

#[derive(Subcommand)]
enum UsersCommand {
    List,
    Show {
        user: String,
    },
    /// Create a user (no messaging account needed: use a login link or token).
    Add {
        user: String,
        /// Link a channel identity, e.g. `telegram:123456` (repeatable).
        #[arg(long = "identity")]
        identities: Vec<String>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Archive, then delete a user entirely.
    Remove {
        user: String,
        #[arg(long)]
        yes: bool,
    },
    /// Archive, then wipe a user's home, sessions and pairings.
    Reset {
        user: String,
        #[arg(long)]
        yes: bool,
    },
    /// Print (or write) everything stored about a user as JSON.
    Export {
        user: String,
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Issue an API token (OpenAI-compatible API and web sign-in), or revoke all with --revoke.
    Token {
        user: String,
        #[arg(long)]
        revoke: bool,
        #[arg(long)]
        label: Option<String>,
    },
    /// Print a one-time web login link.
    LoginLink {
        user: String,
    },
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Sandboxes of this gateway.
    List,
    /// Remove idle sandboxes (older than sandbox.prune.idleMinutes).
    Prune,
    /// Build the sandbox image offline from Debian packages.
    Build,
}

pub(crate) fn parse_user(raw: &str) -> Result<UserId> {
    UserId::new(raw).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Most async worker threads `TOKIO_WORKER_THREADS` may ask for.
const MAX_WORKER_THREADS: usize = 1024;

/// How many async worker threads the runtime gets: `TOKIO_WORKER_THREADS` when the operator
/// set it (checked here: tokio itself would panic on a bad value), otherwise one per CPU but
/// one (at least one). The spare CPU is for the database thread, the blocking pool and the
/// sandboxes; and fewer workers means fewer wake-ups of a parked worker to steal work that is
/// not there, which on the 2-core VMs measured cost more than the second worker gained (one
/// worker: CPU per message −16 % for a lone API user, −23 % on Telegram, peak RSS at 200
/// clients −4 MB, throughput unchanged; see README, Performance).
fn worker_threads(
    configured: Option<std::ffi::OsString>,
    cpus: usize,
) -> std::result::Result<usize, String> {
    match configured {
        Some(raw) => raw
            .to_str()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .filter(|n| (1..=MAX_WORKER_THREADS).contains(n))
            .ok_or_else(|| {
                format!(
                    "TOKIO_WORKER_THREADS must be a whole number from 1 to {MAX_WORKER_THREADS}, not {:?}",
                    raw.to_string_lossy()
                )
            }),
        None => Ok(cpus.saturating_sub(1).max(1)),
    }
}

/// The binary's `main`.
pub fn main_entry() -> std::process::ExitCode {
    // Before any thread exists, as `sqlite3_config` requires.
    moltmate_store::db::configure_sqlite_before_use();
    let cli = Cli::parse();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = match worker_threads(std::env::var_os("TOKIO_WORKER_THREADS"), cpus) {
        Ok(workers) => workers,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The report already said what failed.
        Err(e) if e.is::<doctor::ChecksFailed>() => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::Restore { file } = &cli.command {
        // The target must be named: restoring into whatever home the environment points at
        // would be a surprise.
        let Some(target) = &cli.home else {
            anyhow::bail!("restore needs --home DIR: the new (or empty) home to restore into");
        };
        return operate::restore(file, target).await;
    }
    let home =
        moltmate_config::resolve_home(cli.home.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    match cli.command {
        Command::Init => init(&home),
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let config = wiring::load_config(&home)?;
            wiring::check_startup_rules(&config)?;
            println!("{}: OK", home.join("moltmate.json").display());
            Ok(())
        }
        Command::Serve => serve::serve(&home).await,
        Command::Chat { user, message } => chat::chat(&home, parse_user(&user)?, message).await,
        Command::Pairing { command } => {
            let admin = admin::Admin::open(&home)?;
            match command {
                PairingCommand::List => admin::pairing_list(&admin).await,
                PairingCommand::Approve { channel, code } => {
                    admin::pairing_decide(&admin, &channel, &code, true).await
                }
                PairingCommand::Deny { channel, code } => {
                    admin::pairing_decide(&admin, &channel, &code, false).await
                }
            }
        }
        Command::Users { command } => {
            let admin = admin::Admin::open(&home)?;
            match command {
                UsersCommand::List => admin::users_list(&admin).await,
                UsersCommand::Show { user } => {
                    let config = wiring::load_config(&home)?;
                    let settings = wiring::settings::gateway_settings(&config, &home);
                    admin::users_show(&admin, &parse_user(&user)?, &settings).await
                }
                UsersCommand::Add {
                    user,
                    identities,
                    name,
                } => {
                    admin::users_add(&admin, &parse_user(&user)?, &identities, name.as_deref())
                        .await
                }
                UsersCommand::Remove { user, yes } => {
                    admin::users_remove(&admin, &parse_user(&user)?, yes).await
                }
                UsersCommand::Reset { user, yes } => {
                    admin::users_reset(&admin, &parse_user(&user)?, yes).await
                }
                UsersCommand::Export { user, output } => {
                    admin::users_export(&admin, &parse_user(&user)?, output.as_deref()).await
                }
                UsersCommand::Token {
                    user,
                    revoke,
                    label,
                } => {
                    admin::users_token(&admin, &parse_user(&user)?, revoke, label.as_deref()).await
                }
                UsersCommand::LoginLink { user } => {
                    let config = wiring::load_config(&home)?;
                    let base = wiring::public_base_url(&config);
                    admin::users_login_link(&admin, &parse_user(&user)?, &base).await
                }
            }
        }
        Command::Doctor { json, fix } => doctor::doctor(&home, json, fix).await,
        Command::Channels {
            command:
                ChannelsCommand::Signal {
                    command: SignalCommand::Link,
                },
        } => signal_link::link(&home).await,
        Command::Image {
            command: ImageCommand::Build { tag, binary },
        } => {
            let config = wiring::load_config(&home)?;
            serve::image_build(&home, &config, &tag, binary).await
        }
        Command::Backup {
            file,
            include_secrets,
        } => operate::backup(&home, &file, include_secrets).await,
        // Handled above, before a home is resolved.
        Command::Restore { .. } => Ok(()),
        Command::Usage {
            user,
            since,
            format,
        } => operate::usage(&home, user.as_deref(), since.as_deref(), format).await,
        Command::Sandbox { command } => {
            let config = wiring::load_config(&home)?;
            match command {
                SandboxCommand::List => serve::sandbox_list(&home, &config).await,
                SandboxCommand::Prune => serve::sandbox_prune(&home, &config).await,
                SandboxCommand::Build => serve::sandbox_build(&home, &config).await,
            }
        }
    }
}

fn init(home: &Path) -> Result<()> {
    let path = moltmate_config::write_starter_config(home).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "Wrote {} (mode 0600). Edit it, then run `moltmate config check` and `moltmate serve`.",
        path.display()
    );
    Ok(())
}

/// Used by `serve` and `chat`: the home must exist and be private.
pub(crate) fn prepare_home(home: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(home)
        .with_context(|| format!("creating {}", home.display()))?;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_leave_a_cpu_spare_and_check_the_operators_number() {
        assert_eq!(worker_threads(None, 1), Ok(1));
        assert_eq!(worker_threads(None, 2), Ok(1));
        assert_eq!(worker_threads(None, 8), Ok(7));
        assert_eq!(worker_threads(Some("4".into()), 2), Ok(4));
        assert_eq!(worker_threads(Some(" 2 ".into()), 8), Ok(2));
        for bad in ["0", "-1", "two", "", "1025", "99999999999999999999999"] {
            let error = worker_threads(Some(bad.into()), 2).unwrap_err();
            assert!(error.contains("TOKIO_WORKER_THREADS"), "{error}");
        }
    }
}
