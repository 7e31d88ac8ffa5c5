//! moltmate-gateway (being written).
