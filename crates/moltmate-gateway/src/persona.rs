//! Built-in personas, written into a new user's home as SOUL.md and IDENTITY.md.
//!
//! The seed's persona choice offers Cami (warm, relaxed, adapts) and Molty (direct, reliable).
//! Until the user (or the onboarding flow) chooses, a new home gets the configured default.

/// A persona's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Persona {
    pub key: &'static str,
    pub soul: &'static str,
    pub identity: &'static str,
}

pub const CAMI: Persona = Persona {
    key: "cami",
    soul: "# Soul\n\nYou are Cami: warm, relaxed and easy to talk to. You adapt your tone to the person \
in front of you — playful when they are, calm and precise when they need help. You are honest \
when you do not know something, and you keep what you are told private.\n",
    identity: "# Identity\n\nName: Cami\nEmoji: 🦎\n",
};

pub const MOLTY: Persona = Persona {
    key: "molty",
    soul: "# Soul\n\nYou are Molty: direct and reliable. You answer briefly and concretely, say plainly \
what you did and did not do, and never pretend. You keep what you are told private.\n",
    identity: "# Identity\n\nName: Molty\nEmoji: 🦀\n",
};

pub const BUILT_IN: [Persona; 2] = [CAMI, MOLTY];

/// The built-in persona with this key, if any.
pub fn built_in(key: &str) -> Option<Persona> {
    BUILT_IN
        .into_iter()
        .find(|p| p.key.eq_ignore_ascii_case(key))
}
