//! Onboarding: a new user's first message gets the persona choice (seed 000), in the user's
//! language; the answer writes SOUL.md and IDENTITY.md into their home.
//!
//! Steps are stored per user (`users.onboarding_step`): `choose` (menu sent, waiting for a
//! number, a persona name or a free-text description) and `describe` (the user picked
//! "Custom" and we wait for the description). `/persona` starts again at `choose`. No model is
//! called during onboarding, so nothing the user types here reaches a provider before they
//! have an assistant.

use crate::persona::{self, Persona};
use moltmate_core::tool::UserHome;
use moltmate_store::homes::{list_beneath, read_beneath, write_beneath};
use moltmate_store::HomeError;
use std::path::Path;

/// Entries of the personas folder read at most.
const MAX_PERSONA_SCAN: usize = 1_000;
/// Operator personas offered at most (the menu is a chat message).
const MAX_PERSONAS: usize = 50;
/// Largest persona file read (the rest is cut).
const MAX_PERSONA_FILE: u64 = 64 * 1024;

/// A persona the user can pick: built-in or an operator's template folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonaChoice {
    pub key: String,
    pub label: String,
    pub description_en: String,
    pub description_de: String,
    pub emoji: String,
    pub soul: String,
    pub identity: String,
}

fn from_built_in(p: Persona, label: &str, en: &str, de: &str, emoji: &str) -> PersonaChoice {
    PersonaChoice {
        key: p.key.to_string(),
        label: label.to_string(),
        description_en: en.to_string(),
        description_de: de.to_string(),
        emoji: emoji.to_string(),
        soul: p.soul.to_string(),
        identity: p.identity.to_string(),
    }
}

/// Built-ins (Cami, Molty) followed by the operator's `personas/<key>/` folders, each with a
/// SOUL.md and an optional IDENTITY.md (`Name: ...` and `Emoji: ...` lines are read from it).
/// Blocking; symlinked folders and files are not followed.
pub fn available_personas(personas_dir: Option<&Path>) -> Vec<PersonaChoice> {
    let mut choices = vec![
        from_built_in(
            persona::CAMI,
            "Cami",
            "warm, relaxed, adapts to you",
            "Warm, locker, passt sich an",
            "🦎",
        ),
        from_built_in(
            persona::MOLTY,
            "Molty",
            "direct, reliable",
            "Direkt, zuverlässig",
            "🦀",
        ),
    ];
    let Some(dir) = personas_dir else {
        return choices;
    };
    // The folder is the operator's, but read as carefully as a home: no symlinks followed,
    // nothing but regular files opened (a FIFO here must not hang onboarding), bounded in
    // entries and size.
    let folders = match list_beneath(dir, ".", MAX_PERSONA_SCAN) {
        Ok(Some(listing)) => listing.entries,
        Ok(None) => return choices,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "the personas folder cannot be listed");
            return choices;
        }
    };
    let mut added = 0;
    for folder in folders {
        if !folder.is_dir() || added >= MAX_PERSONAS {
            continue;
        }
        let key = folder.name.to_lowercase();
        if choices.iter().any(|c| c.key == key)
            || key.starts_with('.')
            || !key
                .chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        {
            continue;
        }
        let soul = match read_beneath(dir, &format!("{}/SOUL.md", folder.name), MAX_PERSONA_FILE) {
            Ok(Some((soul, _))) => soul,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(persona = %key, error = %e, "an operator persona was skipped");
                continue;
            }
        };
        let identity = match read_beneath(
            dir,
            &format!("{}/IDENTITY.md", folder.name),
            MAX_PERSONA_FILE,
        ) {
            Ok(Some((identity, _))) => identity,
            _ => format!("# Identity\n\nName: {key}\n"),
        };
        added += 1;
        let field = |name: &str, max_chars: usize| {
            identity
                .lines()
                .find_map(|l| {
                    l.strip_prefix(name)
                        .map(|v| v.trim().chars().take(max_chars).collect::<String>())
                })
                .filter(|v| !v.is_empty())
        };
        let description = soul
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or("")
            .chars()
            .take(80)
            .collect::<String>();
        choices.push(PersonaChoice {
            label: field("Name:", 60).unwrap_or_else(|| key.clone()),
            emoji: field("Emoji:", 8).unwrap_or_else(|| "⭐".to_string()),
            key,
            description_en: description.clone(),
            description_de: description,
            soul,
            identity,
        });
    }
    choices
}

fn is_german(language: &str) -> bool {
    language.to_ascii_lowercase().starts_with("de")
}

/// The persona menu, numbered: 1 is Custom, then every available persona.
pub fn menu(language: &str, choices: &[PersonaChoice]) -> String {
    let german = is_german(language);
    let mut text = if german {
        "Hey! 👋 Ich bin dein neuer AI Companion.\nWie soll ich sein?\n\n1. ✨ Custom - Du beschreibst meine Persönlichkeit!\n".to_string()
    } else {
        "Hey! 👋 I'm your new AI companion.\nHow should I be?\n\n1. ✨ Custom - you describe my personality!\n".to_string()
    };
    for (index, choice) in choices.iter().enumerate() {
        let description = if german {
            &choice.description_de
        } else {
            &choice.description_en
        };
        text.push_str(&format!(
            "{}. {} {} - {}\n",
            index + 2,
            choice.emoji,
            choice.label,
            description
        ));
    }
    text.push_str(if german {
        "\nOder erzähl mir einfach wie ich sein soll..."
    } else {
        "\nOr just tell me how I should be..."
    });
    text
}

/// What the user's answer at the `choose` step means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// "1" / "custom": ask for a description.
    WantsCustom,
    Persona(PersonaChoice),
    /// Free text: the description itself.
    Description(String),
}

pub fn interpret_choice(text: &str, choices: &[PersonaChoice]) -> Answer {
    let trimmed = text.trim();
    let lowered = trimmed.trim_end_matches('.').to_lowercase();
    if lowered == "1" || lowered == "custom" || lowered == "1. custom" {
        return Answer::WantsCustom;
    }
    if let Ok(number) = lowered.parse::<usize>() {
        if number >= 2 {
            if let Some(choice) = choices.get(number - 2) {
                return Answer::Persona(choice.clone());
            }
        }
    }
    if let Some(choice) = choices
        .iter()
        .find(|c| c.key == lowered || c.label.to_lowercase() == lowered)
    {
        return Answer::Persona(choice.clone());
    }
    Answer::Description(trimmed.to_string())
}

/// Writes a chosen persona into the home.
pub fn apply_persona(home: &UserHome, choice: &PersonaChoice) -> Result<(), HomeError> {
    write_beneath(home.root(), "SOUL.md", choice.soul.as_bytes())?;
    write_beneath(home.root(), "IDENTITY.md", choice.identity.as_bytes())
}

/// Writes a custom persona from the user's own description.
pub fn apply_custom(home: &UserHome, description: &str) -> Result<(), HomeError> {
    let description: String = description.chars().take(4000).collect();
    let quoted = description
        .lines()
        .map(|l| format!("> {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    let soul = format!(
        "# Soul\n\nYour user described the personality they want you to have, in their own words:\n\n{quoted}\n\n\
         Be that, consistently. If the description leaves something open, stay kind and honest.\n"
    );
    write_beneath(home.root(), "SOUL.md", soul.as_bytes())?;
    write_beneath(
        home.root(),
        "IDENTITY.md",
        b"# Identity\n\nName: (the user's custom assistant)\nEmoji: \xE2\x9C\xA8\n",
    )
}

pub fn ask_for_description(language: &str) -> String {
    if is_german(language) {
        "Super! Beschreib mir, wie ich sein soll – Ton, Stil, was dir wichtig ist.".to_string()
    } else {
        "Great! Describe how I should be — tone, style, what matters to you.".to_string()
    }
}

pub fn confirmation(language: &str, label: Option<&str>) -> String {
    match (is_german(language), label) {
        (true, Some(label)) => format!("Alles klar – ich bin jetzt {label}! Erzähl, wie kann ich dir helfen? (Mit /persona kannst du neu wählen.)"),
        (true, None) => "Alles klar – so bin ich ab jetzt! Erzähl, wie kann ich dir helfen? (Mit /persona kannst du neu wählen.)".to_string(),
        (false, Some(label)) => format!("All set — I'm {label} now! How can I help? (Send /persona to choose again.)"),
        (false, None) => "All set — that's who I'll be from now on! How can I help? (Send /persona to choose again.)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn menu_speaks_the_users_language_and_numbers_match_choices() {
        let choices = available_personas(None);
        let german = menu("de-DE", &choices);
        assert!(german.contains("Wie soll ich sein?"));
        assert!(german.contains("2. 🦎 Cami - Warm, locker, passt sich an"));
        assert!(german.contains("3. 🦀 Molty - Direkt, zuverlässig"));
        assert!(menu("en", &choices).contains("How should I be?"));
        assert_eq!(
            interpret_choice(" 3 ", &choices),
            Answer::Persona(choices[1].clone())
        );
        assert_eq!(
            interpret_choice("cami", &choices),
            Answer::Persona(choices[0].clone())
        );
        assert_eq!(interpret_choice("1", &choices), Answer::WantsCustom);
        assert_eq!(
            interpret_choice("9", &choices),
            Answer::Description("9".into())
        );
        assert_eq!(
            interpret_choice("Be a pirate", &choices),
            Answer::Description("Be a pirate".into())
        );
    }

    #[test]
    fn operator_personas_are_listed_after_built_ins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("nova")).unwrap();
        std::fs::write(
            dir.path().join("nova/SOUL.md"),
            "# Soul\n\nCurious science buddy.\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("nova/IDENTITY.md"),
            "Name: Nova\nEmoji: 🔭\n",
        )
        .unwrap();
        let choices = available_personas(Some(dir.path()));
        assert_eq!(choices.len(), 3);
        assert!(menu("en", &choices).contains("4. 🔭 Nova - Curious science buddy."));
    }
}
