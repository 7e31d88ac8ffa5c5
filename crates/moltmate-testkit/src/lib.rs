//! moltmate-testkit (being written).
pub mod llm;
pub mod telegram;
