//! moltmate-channels (being written).
