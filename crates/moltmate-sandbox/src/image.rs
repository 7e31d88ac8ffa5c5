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
//!
//! Every image built here carries the label [`DOCKERFILE_LABEL`]: the SHA-256 of the Dockerfile
//! text it was built from. `moltmate doctor` compares it with the digest of the Dockerfile a
//! build would use now ([`dockerfile_for_build`]), so an image older than the binary's
//! Dockerfile is reported ([`image_state`]).
//!
//! [`build_gateway_image`] makes the gateway's own container image the same way
//! (`deploy/Dockerfile.gateway`, embedded as [`GATEWAY_DOCKERFILE`], plus the `moltmate`
//! binary in the build context).

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
/// `deploy/Dockerfile.gateway` as shipped with this binary: the gateway's container image.
pub const GATEWAY_DOCKERFILE: &str = include_str!("../../../deploy/Dockerfile.gateway");
/// Image label holding the SHA-256 (hex) of the Dockerfile an image was built from.
pub const DOCKERFILE_LABEL: &str = "moltmate.dockerfile-sha256";

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

/// SHA-256 (hex) of a Dockerfile's text: the value of [`DOCKERFILE_LABEL`].
pub fn dockerfile_digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The Dockerfile text `moltmate sandbox build` would build now: `repo_dockerfile` when it can
/// be read (a checkout), else the embedded one; its `FROM` pointed at `base_image`.
pub fn dockerfile_for_build(repo_dockerfile: &Path, base_image: &str) -> (String, bool) {
    let (text, from_repo) = match read_small(repo_dockerfile) {
        Some(text) => (text, true),
        None => (EMBEDDED_DOCKERFILE.to_string(), false),
    };
    (retarget_base(&text, base_image), from_repo)
}

/// A regular file of at most 1 MiB, read without blocking on a FIFO; `None` otherwise.
fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(1024 * 1024).read_to_string(&mut text).ok()?;
    Some(text)
}

/// What the engine has under an image name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageState {
    Missing,
    /// Present; `dockerfile_digest` is its [`DOCKERFILE_LABEL`] (`None`: built without it, by
    /// an older moltmate or by hand).
    Present {
        dockerfile_digest: Option<String>,
    },
}

/// Whether `image` exists and which Dockerfile it was built from.
pub async fn image_state(docker: &Docker, image: &str) -> Result<ImageState, SandboxError> {
    match docker.inspect_image(image).await {
        Ok(inspect) => Ok(ImageState::Present {
            dockerfile_digest: inspect
                .config
                .and_then(|c| c.labels)
                .and_then(|labels| labels.get(DOCKERFILE_LABEL).cloned()),
        }),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(ImageState::Missing),
        Err(e) => Err(err(format!("inspecting image {image}: {e}"))),
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
    ensure_base(&docker, options, progress).await?;
    let (dockerfile, from_repo) = dockerfile_for_build(repo_dockerfile, &options.base_image);
    if from_repo {
        progress(&format!("using {}", repo_dockerfile.display()));
    } else {
        progress("using the Dockerfile embedded in this binary");
    }
    let context = tar_files(&[TarEntry {
        name: "Dockerfile",
        content: dockerfile.as_bytes(),
        mode: 0o644,
    }])?;
    build_with_context(&docker, &settings.image, &dockerfile, context, progress).await
}

async fn ensure_base(
    docker: &Docker,
    options: &ImageBuildOptions,
    progress: &dyn Fn(&str),
) -> Result<(), SandboxError> {
    if image_exists(docker, &options.base_image).await? {
        progress(&format!("base image {} present", options.base_image));
        Ok(())
    } else {
        build_base(docker, options, progress).await
    }
}

/// Builds `tag` from a tar `context` whose `Dockerfile` is `dockerfile`, labelled with its
/// digest.
async fn build_with_context(
    docker: &Docker,
    tag: &str,
    dockerfile: &str,
    context: Vec<u8>,
    progress: &dyn Fn(&str),
) -> Result<(), SandboxError> {
    let labels = std::collections::HashMap::from([(
        DOCKERFILE_LABEL.to_string(),
        dockerfile_digest(dockerfile),
    )]);
    let build = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(tag)
        .rm(true)
        .forcerm(true)
        .labels(&labels)
        .build();
    progress(&format!("building {tag}"));
    let mut stream =
        docker.build_image(build, None, Some(bollard::body_full(Bytes::from(context))));
    while let Some(item) = stream.next().await {
        let info: BuildInfo = item.map_err(|e| err(format!("building {tag}: {e}")))?;
        if let Some(message) = info.error_detail.and_then(|d| d.message) {
            return Err(err(format!("building {tag}: {message}")));
        }
        for line in info.stream.iter().chain(info.status.iter()) {
            let line = line.trim_end();
            if !line.is_empty() {
                progress(line);
            }
        }
    }
    if !image_exists(docker, tag).await? {
        return Err(err(format!("the build finished but {tag} does not exist")));
    }
    progress(&format!("built {tag}"));
    Ok(())
}

/// Largest gateway binary put into a build context (the context is held in memory).
const MAX_GATEWAY_BINARY_BYTES: u64 = 512 * 1024 * 1024;

/// Builds the gateway's container image `tag` offline: the same debootstrap base as the
/// sandbox image, [`GATEWAY_DOCKERFILE`] (or `repo_dockerfile` when it can be read), and
/// `binary` copied in as `/usr/local/bin/moltmate`. The binary must run on Debian bookworm
/// (built on bookworm, or static).
pub async fn build_gateway_image(
    settings: &SandboxSettings,
    tag: &str,
    binary: &Path,
    repo_dockerfile: &Path,
    options: &ImageBuildOptions,
    progress: &dyn Fn(&str),
) -> Result<(), SandboxError> {
    let docker = connect_client(settings)?;
    let binary_bytes = {
        let path = binary.to_path_buf();
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let file = std::fs::File::open(&path)
                .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
            let meta = file
                .metadata()
                .map_err(|e| err(format!("cannot stat {}: {e}", path.display())))?;
            if !meta.is_file() || meta.len() > MAX_GATEWAY_BINARY_BYTES {
                return Err(err(format!(
                    "{} is not a regular file of at most {} MiB",
                    path.display(),
                    MAX_GATEWAY_BINARY_BYTES / (1024 * 1024)
                )));
            }
            let mut bytes = Vec::with_capacity(meta.len() as usize);
            file.take(MAX_GATEWAY_BINARY_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
            Ok(bytes)
        })
        .await
        .map_err(|e| err(format!("reading the binary: {e}")))??
    };
    ensure_base(&docker, options, progress).await?;
    let dockerfile = match read_small(repo_dockerfile) {
        Some(text) => {
            progress(&format!("using {}", repo_dockerfile.display()));
            text
        }
        None => {
            progress("using the gateway Dockerfile embedded in this binary");
            GATEWAY_DOCKERFILE.to_string()
        }
    };
    let dockerfile = retarget_base(&dockerfile, &options.base_image);
    let context = tar_files(&[
        TarEntry {
            name: "Dockerfile",
            content: dockerfile.as_bytes(),
            mode: 0o644,
        },
        TarEntry {
            name: "moltmate",
            content: &binary_bytes,
            mode: 0o755,
        },
    ])?;
    drop(binary_bytes);
    build_with_context(&docker, tag, &dockerfile, context, progress).await
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

/// One regular file of a build context.
struct TarEntry<'a> {
    name: &'a str,
    content: &'a [u8],
    mode: u64,
}

/// A ustar archive of regular files at the top level: a whole build context. (Hand-written:
/// a few dozen lines for the two entries a context needs, instead of the `tar` crate.)
fn tar_files(entries: &[TarEntry<'_>]) -> Result<Vec<u8>, SandboxError> {
    let total: usize = entries
        .iter()
        .map(|e| 512 + e.content.len().div_ceil(512) * 512)
        .sum();
    let mut out = Vec::with_capacity(total + 1024);
    for entry in entries {
        // ustar sizes are 11 octal digits: at most 8 GiB - 1.
        if entry.name.len() >= 100 || entry.content.len() as u64 >= 0o77777777777 {
            return Err(err("tar entry name or size too large"));
        }
        let mut header = [0u8; 512];
        header[..entry.name.len()].copy_from_slice(entry.name.as_bytes());
        write_octal(&mut header[100..108], entry.mode);
        write_octal(&mut header[108..116], 0);
        write_octal(&mut header[116..124], 0);
        write_octal(&mut header[124..136], entry.content.len() as u64);
        write_octal(&mut header[136..148], 0);
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        // The checksum is computed with its own field read as spaces.
        header[148..156].copy_from_slice(b"        ");
        let sum: u64 = header.iter().map(|&b| u64::from(b)).sum();
        let digits = format!("{sum:06o}\0 ");
        header[148..156].copy_from_slice(digits.as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(entry.content);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
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
        let tar = tar_files(&[TarEntry {
            name: "Dockerfile",
            content: b"FROM x\n",
            mode: 0o644,
        }])
        .unwrap();
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
    fn tar_of_two_files_pads_each() {
        let tar = tar_files(&[
            TarEntry {
                name: "Dockerfile",
                content: b"FROM x\n",
                mode: 0o644,
            },
            TarEntry {
                name: "moltmate",
                content: &[7u8; 513],
                mode: 0o755,
            },
        ])
        .unwrap();
        assert_eq!(tar.len(), 512 + 512 + 512 + 1024 + 1024);
        assert_eq!(&tar[1024..1032], b"moltmate");
        assert_eq!(&tar[1024 + 100..1024 + 107], b"0000755");
        assert_eq!(tar[1536 + 512], 7);
        assert_eq!(tar[1536 + 513], 0);
    }

    #[test]
    fn dockerfile_digest_is_sha256_hex() {
        assert_eq!(
            dockerfile_digest(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let (text, from_repo) =
            dockerfile_for_build(Path::new("/nonexistent/Dockerfile.sandbox"), BASE_IMAGE);
        assert!(!from_repo);
        assert_eq!(text, EMBEDDED_DOCKERFILE);
    }

    #[test]
    fn embedded_dockerfile_uses_the_base() {
        assert!(EMBEDDED_DOCKERFILE.contains("FROM moltmate-base:bookworm"));
        assert!(EMBEDDED_DOCKERFILE.contains("USER agent"));
        let other = retarget_base(EMBEDDED_DOCKERFILE, "local/base:1");
        assert!(other.contains("FROM local/base:1"));
    }
}
