//! The full offline image build: debootstrap → engine import → Dockerfile build.
//!
//! Takes minutes and needs root, debootstrap and a reachable Debian mirror, so it is ignored by
//! default: `cargo test -p moltmate-sandbox --test docker_image_build -- --ignored`. It builds
//! under throwaway names and removes them afterwards, leaving the real images alone.

use moltmate_sandbox::docker::{connect_client, docker_available};
use moltmate_sandbox::image::{self, ImageBuildOptions};
use moltmate_sandbox::{BackendChoice, SandboxScope, SandboxSettings};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[tokio::test]
#[ignore = "slow: debootstraps a Debian base (minutes)"]
async fn docker_image_builds_from_debootstrap() {
    let settings = SandboxSettings {
        backend: BackendChoice::Docker,
        scope: SandboxScope::User,
        image: "moltmate-sandbox:build-check".into(),
        docker_host: None,
        prune_idle: Duration::from_secs(60),
        state_dir: PathBuf::from("/tmp/moltmate-image-build-test"),
        allowed_domains: Vec::new(),
        config_digest: "build-check".into(),
    };
    if !docker_available(&settings).await {
        if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
            panic!("the Docker daemon does not answer");
        }
        println!("SKIP: the Docker daemon does not answer");
        return;
    }
    let options = ImageBuildOptions {
        base_image: "moltmate-base:build-check".into(),
        ..ImageBuildOptions::default()
    };
    // A path that does not exist: the embedded Dockerfile is used, as from an installed binary.
    let missing = Path::new("/nonexistent/Dockerfile.sandbox");
    let lines = std::sync::Mutex::new(Vec::<String>::new());
    let progress = |line: &str| {
        println!("{line}");
        lines.lock().unwrap().push(line.to_string());
    };
    image::build_image_with(&settings, missing, &options, &progress)
        .await
        .expect("image build");
    let docker = connect_client(&settings).unwrap();
    assert!(image::image_exists(&docker, "moltmate-base:build-check")
        .await
        .unwrap());
    assert!(image::image_exists(&docker, &settings.image).await.unwrap());
    let lines = lines.into_inner().unwrap();
    assert!(lines.iter().any(|l| l.contains("embedded")));
    assert!(lines.iter().any(|l| l.contains("Step")));
    for name in [settings.image.as_str(), "moltmate-base:build-check"] {
        let _ = docker
            .remove_image(
                name,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await;
    }
}
