//! moltmate-config (being written).
