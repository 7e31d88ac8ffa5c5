//! moltmate-providers (being written).
