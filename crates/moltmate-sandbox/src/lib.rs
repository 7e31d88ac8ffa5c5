//! Sandboxes for the `exec` tool: one per user (or session, or task), never shared.
//!
//! * [`docker`] — production backend on the Docker Engine API (bollard): hardened, warm
//!   containers named `moltmate-sbx-<user>-<hash>`.
//! * [`bwrap`] — bubblewrap backend for hosts without Docker.
//! * [`select`] — `sandbox.backend = auto | docker | bwrap`; fails closed with a message saying
//!   what to install. There is no host backend here at all: `sandbox.mode = none` is handled
//!   (and refused unless explicitly allowed) by the gateway.
//! * [`policy`] — `tools.exec.security`: vets a command line before any backend sees it.
//! * [`proxy`] — the egress proxy behind `sandbox.network = proxy`.
//! * [`total`] — the parent cgroup every sandbox lives under (total memory, CPU and pids of all
//!   sandboxes together) and [`active`], the cap on sandboxes alive at once with its fair queue.
//! * [`image`] — builds `moltmate-sandbox:bookworm-slim` offline from Debian packages.

pub mod active;
pub mod bwrap;
pub mod disk;
pub mod docker;
mod docker_agent;
mod identity;
pub mod image;
pub mod policy;
pub mod proxy;
pub mod select;
pub mod settings;
pub mod total;

pub use settings::{BackendChoice, SandboxScope, SandboxSettings};
