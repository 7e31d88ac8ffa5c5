//! `moltmate serve` and the `sandbox` commands: start everything, stop on SIGINT/SIGTERM.

use crate::wiring::{self, Purpose};
use anyhow::{Context, Result};
use moltmate_config::Config;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long running turns get to finish after a shutdown signal. Whatever is still running
/// then is answered after the next start (its message is in the inbox).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

pub async fn serve(home: &Path) -> Result<()> {
    let started = Instant::now();
    crate::prepare_home(home)?;
    let config = wiring::load_config(home)?;
    wiring::check_startup_rules(&config)?;
    wiring::init_logging(&config, false);
    let built = wiring::build(home, &config, Purpose::Serve).await?;
    built
        .gateway
        .recover()
        .await
        .context("recovering unfinished work")?;
    let web = wiring::start_web(home, &config, &built).await?;
    tracing::info!(
        home = %home.display(),
        web = %web,
        sandbox = built.sandbox.as_ref().map(|s| s.backend()).unwrap_or("none"),
        startup_ms = started.elapsed().as_millis() as u64,
        "moltmate is running"
    );
    let channels = {
        let gateway = built.gateway.clone();
        tokio::spawn(async move { gateway.run_channels().await })
    };
    let pruner = wiring::spawn_pruner(&config, &built);
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down"),
        _ = built.shutdown.cancelled() => {}
    }
    built.shutdown.cancel();
    if let Some(pruner) = pruner {
        pruner.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), channels).await;
    built.gateway.drain(SHUTDOWN_GRACE).await;
    // Nothing the gateway mounted outlives it (the next start mounts again).
    built.release_volumes().await;
    Ok(())
}

pub async fn sandbox_list(home: &Path, config: &Config) -> Result<()> {
    let sandbox = wiring::sandbox_backend(home, config).await?;
    let list = sandbox.list().await?;
    if list.is_empty() {
        println!("No sandboxes ({} backend).", sandbox.backend());
        return Ok(());
    }
    println!(
        "{:<48} {:<24} {:<8} {:<10} {:>8}",
        "NAME", "USER", "BACKEND", "STATE", "IDLE"
    );
    for s in list {
        println!(
            "{:<48} {:<24} {:<8} {:<10} {:>8}",
            s.name,
            s.user,
            s.backend,
            s.state,
            s.idle_seconds
                .map(|i| format!("{i}s"))
                .unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}

pub async fn sandbox_prune(home: &Path, config: &Config) -> Result<()> {
    let sandbox = wiring::sandbox_backend(home, config).await?;
    let removed = sandbox
        .prune(Duration::from_secs(config.sandbox.prune.idle_minutes * 60))
        .await?;
    println!(
        "Removed {} sandbox(es){}",
        removed.len(),
        if removed.is_empty() { "." } else { ":" }
    );
    for name in removed {
        println!("  {name}");
    }
    Ok(())
}

pub async fn sandbox_build(home: &Path, config: &Config) -> Result<()> {
    let settings = wiring::sandbox_settings(home, config);
    // A Dockerfile.sandbox in the current directory (a checkout) wins over the embedded one.
    moltmate_sandbox::image::build_image(
        &settings,
        Path::new("Dockerfile.sandbox"),
        &|line: &str| println!("{line}"),
    )
    .await
    .context("building the sandbox image")?;
    println!("Built {}.", settings.image);
    Ok(())
}

pub async fn image_build(
    home: &Path,
    config: &Config,
    tag: &str,
    binary: Option<std::path::PathBuf>,
) -> Result<()> {
    let settings = wiring::sandbox_settings(home, config);
    let binary = match binary {
        Some(path) => path,
        None => std::env::current_exe().context("finding this binary")?,
    };
    // A deploy/Dockerfile.gateway in the current directory (a checkout) wins over the embedded one.
    moltmate_sandbox::image::build_gateway_image(
        &settings,
        tag,
        &binary,
        Path::new("deploy/Dockerfile.gateway"),
        &moltmate_sandbox::image::ImageBuildOptions::default(),
        &|line: &str| println!("{line}"),
    )
    .await
    .context("building the gateway image")?;
    println!("Built {tag} (with {}).", binary.display());
    Ok(())
}
