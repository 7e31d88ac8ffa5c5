//! `moltmate chat`: the local channel. The operator (or a script) talks to a user's assistant
//! from the terminal, through the same gateway, store and tools as every other channel.
//!
//! It runs its own in-process gateway on the same home. A running `moltmate serve` may be
//! answering the same user at the same time: the per-user lock and the atomic outbox claim in
//! the gateway keep the two from answering one message twice.

use crate::wiring::{self, Purpose};
use anyhow::{bail, Result};
use moltmate_core::channel::{Accepted, InboundMessage};
use moltmate_core::model::DeltaSink;
use moltmate_core::{ChannelKind, Identity, PeerId, UserId};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Prints streamed text as it arrives.
struct StdoutDeltas {
    printed: AtomicBool,
}

impl DeltaSink for StdoutDeltas {
    fn text_delta(&self, text: &str) {
        self.printed.store(true, Ordering::SeqCst);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

async fn send(gateway: &moltmate_gateway::Gateway, user: &UserId, text: &str) -> Result<()> {
    let message = InboundMessage {
        sender: Identity::new(ChannelKind::Local, PeerId::new(user.as_str())?),
        chat_id: user.as_str().to_string(),
        external_id: format!(
            "local-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ),
        cursor: None,
        text: text.to_string(),
        sender_name: None,
        language_code: None,
        attachments: Vec::new(),
    };
    let deltas = Arc::new(StdoutDeltas {
        printed: AtomicBool::new(false),
    });
    let submitted = gateway.submit(message, deltas.clone()).await?;
    if submitted.accepted != Accepted::Queued {
        bail!("the message was not accepted ({:?})", submitted.accepted);
    }
    let reply = submitted
        .reply
        .await
        .map_err(|_| anyhow::anyhow!("the gateway stopped before answering"))?
        .text;
    if deltas.printed.load(Ordering::SeqCst) {
        println!();
    } else {
        println!("{reply}");
    }
    Ok(())
}

pub async fn chat(home: &Path, user: UserId, message: Option<String>) -> Result<()> {
    crate::prepare_home(home)?;
    let config = wiring::load_config(home)?;
    wiring::check_startup_rules(&config)?;
    wiring::init_logging(&config, true);
    let built = wiring::build(home, &config, Purpose::Chat).await?;
    let result = match message {
        Some(text) => send(&built.gateway, &user, &text).await,
        None => {
            eprintln!("Chatting as {user}. /help for commands, Ctrl-D to quit.");
            let stdin = tokio::io::stdin();
            let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdin));
            loop {
                eprint!("> ");
                let Some(line) = lines.next_line().await? else {
                    break;
                };
                if line.trim().is_empty() {
                    continue;
                }
                if let Err(e) = send(&built.gateway, &user, &line).await {
                    eprintln!("error: {e:#}");
                }
            }
            Ok(())
        }
    };
    built.shutdown.cancel();
    built.gateway.drain(std::time::Duration::from_secs(5)).await;
    built.release_volumes().await;
    result
}
