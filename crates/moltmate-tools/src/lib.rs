//! moltmate-tools (being written).
