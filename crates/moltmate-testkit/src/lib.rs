//! moltmate-testkit (being written).
pub mod discord;
pub mod llm;
pub mod multipart;
#[cfg(feature = "proptest")]
pub mod prop;
pub mod search;
pub mod signal;
pub mod slack;
pub mod speech;
pub mod telegram;
pub mod whatsapp;
