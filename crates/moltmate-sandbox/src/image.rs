//! Builds the sandbox image offline, from Debian packages only (no container registry).
//!
//! Two steps, both through the Engine API:
//! 1. **Base** `moltmate-base:bookworm`, only when missing: `debootstrap --variant=minbase
//!    bookworm <tmpdir> <mirror>` (needs root), then the root filesystem is streamed as a tar
//!    into the engine's image import (`POST /images/create?fromSrc=-`); nothing is buffered
//!    whole in memory.
//! 2. **Sandbox image** `settings.image`: `Dockerfile.sandbox` (`FROM moltmate-base:bookworm`,
//!    `apt-get install` from the same Debian mirror, user `agent` uid 1000) sent as a one-file
//!    tar context to the build endpoint, with the engine's progress lines passed to `progress`.
//!
//! The Dockerfile is embedded in the binary ([`EMBEDDED_DOCKERFILE`]) so an installed `moltmate`
//! can build without the repository; a `repo_dockerfile` that exists takes precedence.
//! The mirror defaults to [`DEFAULT_MIRROR`]; `MOLTMATE_DEBIAN_MIRROR` overrides it, or pass
//! [`ImageBuildOptions`] to [`build_image_with`].

use crate::docker::connect_client;
use crate::settings::SandboxSettings;
use bollard::models::BuildInfo;
use bollard::query_parameters::{BuildImageOptionsBuilder, CreateImageOptions};
use bollard::Docker;
use bytes::Bytes;
use futures::StreamExt;
use moltmate_core::sandbox::SandboxError;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// The base image made by debootstrap.
pub const BASE_IMAGE: &str = "moltmate-base:bookworm";
/// Debian mirror used when nothing else is configured.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Environment variable overriding the Debian mirror.
pub const MIRROR_ENV: &str = "MOLTMATE_DEBIAN_MIRROR";
/// `Dockerfile.sandbox` as shipped with this binary.
pub const EMBEDDED_DOCKERFILE: &str = include_str!("../../../Dockerfile.sandbox");

const BACKEND: &str = "image";

fn err(detail: impl Into<String>) -> SandboxError {
    SandboxError::Backend {
        backend: BACKEND,
        detail: detail.into(),
    }
}

/// How to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBuildOptions {
    /// Debian mirror for debootstrap (the Dockerfile's apt-get uses the base's sources.list,
    /// which debootstrap points at the same mirror).
    pub mirror: String,
    /// Name of the base image (`FROM` in the Dockerfile).
    pub base_image: String,
}

impl Default for ImageBuildOptions {
    fn default() -> Self {
        ImageBuildOptions {
            mirror: std::env::var(MIRROR_ENV)
                .ok()
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| DEFAULT_MIRROR.to_string()),
            base_image: BASE_IMAGE.to_string(),
        }
    }
}

/// Whether `image` exists on the engine.
pub async fn image_exists(docker: &Docker, image: &str) -> Result<bool, SandboxError> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(e) => Err(err(format!("inspecting image {image}: {e}"))),
    }
}

/// Builds `settings.image` (and the base image first when it is missing). Always rebuilds the
/// sandbox image; the engine's layer cache makes an unchanged rebuild quick.
pub async fn build_image(
    settings: &SandboxSettings,
    repo_dockerfile: &Path,
    progress: &dyn Fn(&str),
) -> Result<(), SandboxError> {
    build_image_with(
        settings,
        repo_dockerfile,
        &ImageBuildOptions::default(),
        progress,
    )
    .await
}

/// Builds the image only when `settings.image` is missing; returns whether it built.
pub async fn ensure_image(
    settings: &SandboxSettings,
    repo_dockerfile: &Path,
    progress: &dyn Fn(&str),
) -> Result<bool, SandboxError> {
    let docker = connect_client(settings)?;
    if image_exists(&docker, &settings.image).await? {
        return Ok(false);
    }
    // Concurrent callers in one process build once: the later ones wait and find the image.
    // (Two debootstraps into one directory would also trip over each other.)
    let _building = BUILD_LOCK.lock().await;
    if image_exists(&docker, &settings.image).await? {
        return Ok(false);
    }
    build_image(settings, repo_dockerfile, progress).await?;
    Ok(true)
}

static BUILD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// [`build_image`] with explicit options.
pub async fn build_image_with(
    settings: &SandboxSettings,
    repo_dockerfile: &Path,
    options: &ImageBuildOptions,
    progress: &dyn Fn(&str),
) -> Result<(), SandboxError> {
    let docker = connect_client(settings)?;
    if image_exists(&docker, &options.base_image).await? {
        progress(&format!("base image {} present", options.base_image));
    } else {
        build_base(&docker, options, progress).await?;
    }
    let dockerfile = match tokio::fs::read_to_string(repo_dockerfile).await {
        Ok(text) => {
            progress(&format!("using {}", repo_dockerfile.display()));
            text
        }
        Err(_) => {
            progress("using the Dockerfile embedded in this binary");
            EMBEDDED_DOCKERFILE.to_string()
        }
    };
    let dockerfile = retarget_base(&dockerfile, &options.base_image);
    let context = tar_single_file("Dockerfile", dockerfile.as_bytes())?;
    let build = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(&settings.image)
        .rm(true)
        .forcerm(true)
        .build();
    progress(&format!("building {}", settings.image));
    let mut stream =
        docker.build_image(build, None, Some(bollard::body_full(Bytes::from(context))));
    while let Some(item) = stream.next().await {
        let info: BuildInfo = item.map_err(|e| err(format!("building {}: {e}", settings.image)))?;
        if let Some(message) = info.error_detail.and_then(|d| d.message) {
            return Err(err(format!("building {}: {message}", settings.image)));
        }
        for line in info.stream.iter().chain(info.status.iter()) {
            let line = line.trim_end();
            if !line.is_empty() {
                progress(line);
            }
        }
    }
    if !image_exists(&docker, &settings.image).await? {
        return Err(err(format!(
            "the build finished but {} does not exist",
            settings.image
        )));
    }
    progress(&format!("built {}", settings.image));
    Ok(())
}

/// Points the `FROM` line at `base` when a non-default base name is configured.
fn retarget_base(dockerfile: &str, base: &str) -> String {
    if base == BASE_IMAGE {
        return dockerfile.to_string();
    }
    dockerfile.replace(&format!("FROM {BASE_IMAGE}"), &format!("FROM {base}"))
}

/// debootstrap into a temporary directory, then import it as `options.base_image`.
async fn build_base(
    docker: &Docker,
    options: &ImageBuildOptions,
    progress: &dyn Fn(&str),
) -> Result<(), SandboxError> {
    if !rustix::process::geteuid().is_root() {
        return Err(SandboxError::Unavailable(format!(
            "the base image {} is missing and making it needs root (debootstrap)",
            options.base_image
        )));
    }
    let (repo, tag) = options
        .base_image
        .rsplit_once(':')
        .ok_or_else(|| err(format!("base image {:?} needs a tag", options.base_image)))?;
    let root = std::env::temp_dir().join(format!(
        "moltmate-debootstrap-{:016x}",
        rand::random::<u64>()
    ));
    let result = async {
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(|e| err(format!("cannot create {}: {e}", root.display())))?;
        progress(&format!("debootstrap bookworm from {}", options.mirror));
        debootstrap(&root, &options.mirror, progress).await?;
        progress(&format!("importing {}", options.base_image));
        import_rootfs(docker, &root, repo, tag, progress).await
    }
    .await;
    let cleanup = root.clone();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(cleanup)).await;
    result
}

async fn debootstrap(
    root: &PathBuf,
    mirror: &str,
    progress: &dyn Fn(&str),
) -> Result<(), SandboxError> {
    let mut child = tokio::process::Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(root)
        .arg(mirror)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            SandboxError::Unavailable(format!(
                "cannot run debootstrap ({e}); install the debootstrap package"
            ))
        })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| err("debootstrap stdout missing"))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| err("debootstrap stderr missing"))?;
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        progress(&line);
    }
    let status = child
        .wait()
        .await
        .map_err(|e| err(format!("debootstrap: {e}")))?;
    let stderr_text = stderr_task.await.unwrap_or_default();
    if !status.success() {
        let tail: String = stderr_text
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ");
        return Err(err(format!("debootstrap failed ({status}): {tail}")));
    }
    Ok(())
}

async fn import_rootfs(
    docker: &Docker,
    root: &Path,
    repo: &str,
    tag: &str,
    progress: &dyn Fn(&str),
) -> Result<(), SandboxError> {
    let mut tar = tokio::process::Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(root)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(format!("cannot run tar: {e}")))?;
    let stdout = tar.stdout.take().ok_or_else(|| err("tar stdout missing"))?;
    let body = futures::stream::unfold(stdout, |mut out| async move {
        let mut buf = vec![0u8; 256 * 1024];
        match out.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), out))
            }
            Err(e) => Some((Err(e), out)),
        }
    });
    let options = CreateImageOptions {
        from_src: Some("-".to_string()),
        repo: Some(repo.to_string()),
        tag: Some(tag.to_string()),
        message: Some("debootstrap --variant=minbase bookworm".to_string()),
        ..Default::default()
    };
    let mut stream = docker.create_image(Some(options), Some(bollard::body_try_stream(body)), None);
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| err(format!("importing the base image: {e}")))?;
        if let Some(message) = info.error_detail.and_then(|d| d.message) {
            return Err(err(format!("importing the base image: {message}")));
        }
        if let Some(status) = info.status {
            progress(&status);
        }
    }
    let status = tar.wait().await.map_err(|e| err(format!("tar: {e}")))?;
    if !status.success() {
        return Err(err(format!("tar of the base filesystem failed ({status})")));
    }
    Ok(())
}

/// A ustar archive holding one regular file: the whole build context.
fn tar_single_file(name: &str, content: &[u8]) -> Result<Vec<u8>, SandboxError> {
    if name.len() >= 100 {
        return Err(err("tar entry name too long"));
    }
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    write_octal(&mut header[100..108], 0o644);
    write_octal(&mut header[108..116], 0);
    write_octal(&mut header[116..124], 0);
    write_octal(&mut header[124..136], content.len() as u64);
    write_octal(&mut header[136..148], 0);
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field read as spaces.
    header[148..156].copy_from_slice(b"        ");
    let sum: u64 = header.iter().map(|&b| u64::from(b)).sum();
    let digits = format!("{sum:06o}\0 ");
    header[148..156].copy_from_slice(digits.as_bytes());

    let padded = content.len().div_ceil(512) * 512;
    let mut out = Vec::with_capacity(512 + padded + 1024);
    out.extend_from_slice(&header);
    out.extend_from_slice(content);
    out.resize(512 + padded + 1024, 0);
    Ok(out)
}

/// Zero-padded octal, NUL-terminated, filling `field`.
fn write_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let text = format!("{value:0width$o}");
    let bytes = text.as_bytes();
    let start = bytes.len().saturating_sub(width);
    field[..width].copy_from_slice(&bytes[start..]);
    field[width] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_header_is_valid_ustar() {
        let tar = tar_single_file("Dockerfile", b"FROM x\n").unwrap();
        assert_eq!(tar.len(), 512 + 512 + 1024);
        assert_eq!(&tar[..10], b"Dockerfile");
        assert_eq!(&tar[124..135], b"00000000007");
        let mut check = tar[..512].to_vec();
        check[148..156].copy_from_slice(b"        ");
        let sum: u64 = check.iter().map(|&b| u64::from(b)).sum();
        let field = std::str::from_utf8(&tar[148..154]).unwrap();
        assert_eq!(u64::from_str_radix(field, 8).unwrap(), sum);
        assert_eq!(&tar[512..519], b"FROM x\n");
    }

    #[test]
    fn embedded_dockerfile_uses_the_base() {
        assert!(EMBEDDED_DOCKERFILE.contains("FROM moltmate-base:bookworm"));
        assert!(EMBEDDED_DOCKERFILE.contains("USER agent"));
        let other = retarget_base(EMBEDDED_DOCKERFILE, "local/base:1");
        assert!(other.contains("FROM local/base:1"));
    }
}
