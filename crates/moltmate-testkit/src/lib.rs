//! moltmate-testkit (being written).
pub mod llm;
#[cfg(feature = "proptest")]
pub mod prop;
pub mod speech;
pub mod telegram;
