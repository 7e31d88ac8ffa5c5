//! `moltmate channels signal link`: link `channels.signal.account` by QR code in the terminal.

use crate::wiring;
use anyhow::{bail, Context, Result};
use moltmate_channels::signal::{self, DaemonAddress, SignalDaemon};
use std::path::Path;
use std::time::{Duration, Instant};

/// The QR code of `uri` for a terminal (two rows per character, dark on light).
pub fn terminal_qr(uri: &str) -> Result<String> {
    let code = qrcode::QrCode::new(uri.as_bytes()).context("making the QR code")?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

pub async fn link(home: &Path) -> Result<()> {
    let config = wiring::load_config(home)?;
    let Some(settings) = wiring::runtime::signal_settings(home, &config)? else {
        bail!("Signal is not configured: set channels.signal.account in moltmate.json first");
    };
    let show = |uri: &str| {
        match terminal_qr(uri) {
            Ok(qr) => println!("{qr}"),
            Err(e) => eprintln!("{e:#}"),
        }
        println!("Scan this code with the phone of {}: Signal → Settings → Linked devices → Link new device.", settings.account);
        println!("(Or open this link on the phone: {uri})");
        println!("Waiting for the phone...");
    };
    let (address, mut child, data_dir) = match &settings.daemon {
        SignalDaemon::External(address) => (address.clone(), None, None),
        SignalDaemon::Supervised { cli_path, data_dir } => {
            let program = signal::check_signal_cli(cli_path).map_err(|e| anyhow::anyhow!("{e}"))?;
            let socket = data_dir.join(signal::SOCKET_NAME);
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                bail!("signal-cli is already running for {} (is `moltmate serve` running?): stop the gateway first, or scan the code shown on /admin", data_dir.display());
            }
            let child = signal::spawn_daemon(&program, data_dir)
                .with_context(|| format!("starting {}", program.display()))?;
            (
                DaemonAddress::Unix(socket),
                Some(child),
                Some(data_dir.clone()),
            )
        }
    };
    // signal-cli's JVM takes a few seconds to open its socket.
    let started = Instant::now();
    let result = loop {
        match signal::link_once(&address, &settings.device_name, show).await {
            Err(signal::RpcError::Connect { .. })
                if child.is_some() && started.elapsed() < Duration::from_secs(60) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => break other,
        }
    };
    if let Some(child) = child.as_mut() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    match result {
        Ok(Some(number)) if number == settings.account => {
            if let Some(dir) = data_dir {
                signal::remember_linked(&dir).context("recording the link")?;
            }
            println!("Linked {number}. Start (or restart) `moltmate serve`.");
            Ok(())
        }
        Ok(other) => bail!(
            "the phone that scanned the code is {}, not channels.signal.account ({}): unlink that device on the phone and scan with the right one",
            other.as_deref().unwrap_or("an account without a number"),
            settings.account
        ),
        Err(signal::RpcError::Timeout { .. }) => {
            bail!("the code was not scanned in time; run the command again")
        }
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_link_uri_becomes_a_terminal_qr_code() {
        let qr = super::terminal_qr("sgnl://linkdevice?uuid=abc&pub_key=def").unwrap();
        assert!(qr.lines().count() > 10);
        assert!(qr.contains('█') || qr.contains('▀') || qr.contains('▄'));
    }
}
