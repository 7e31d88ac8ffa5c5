//! Fake LLM APIs (being written).
