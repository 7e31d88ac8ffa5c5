//! moltmate-store (being written).
