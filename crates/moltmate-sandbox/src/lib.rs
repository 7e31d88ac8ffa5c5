//! moltmate-sandbox (being written).
