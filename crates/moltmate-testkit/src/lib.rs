//! moltmate-testkit (being written).
pub mod discord;
pub mod llm;
#[cfg(feature = "proptest")]
pub mod prop;
pub mod slack;
pub mod telegram;
