//! Files users send: downloaded, checked and saved by the user's own worker (never on the accept
//! path), before the turn.
//!
//! For each attachment reference stored with the inbox row: the size claim is checked against
//! `attachments.maxMb`, the channel downloads it (bounded in bytes while streaming and in time),
//! the type is decided from the content (magic bytes via `infer`, UTF-8 for text), never from
//! the name or the sender's MIME claim, and the file is written 0600 beneath the user's home at
//! `inbox/YYYY-MM-DD/<random>-<name>.<ext>` through the store's `write_beneath` on the blocking
//! pool (the home is on its disk-capped volume by then, so it counts against the user's cap).
//! Nothing is ever executed. Photos go to a vision model as images of this turn only; voice
//! notes and audio are transcribed when `speech` is configured; documents are named to the model.
//! Whatever is refused is explained to the user in the reply, and the message's text is still
//! answered.

use super::Inner;
use base64::Engine as _;
use moltmate_core::blocking;
use moltmate_core::channel::{Attachment, AttachmentKind, ChannelError};
use moltmate_core::model::ConversationItem;
use moltmate_store::homes::write_beneath;
use moltmate_store::InboxItem;
use std::sync::Arc;
use std::time::Duration;

/// Time for writing one file into the home.
const SAVE_DEADLINE: Duration = Duration::from_secs(30);

/// What the attachments of one message became.
#[derive(Debug, Default)]
pub(super) struct Prepared {
    /// The text the model gets: the user's text (or transcript) and a line per saved file.
    pub text: String,
    /// Images for a vision model, of this turn only.
    pub images: Vec<ConversationItem>,
    /// Notes for the user, put before the answer (refusals; "heard: …").
    pub notes: Vec<String>,
    /// Whether there is anything for the model to answer.
    pub has_content: bool,
}

/// A file type decided from the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Detected {
    pub mime: &'static str,
    pub extension: &'static str,
    pub class: Class,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Image,
    Audio,
    Document,
    Text,
    /// Programs, archives, fonts, anything not a document: refused.
    Other,
}

/// Decide the type of `bytes` from their content.
pub(super) fn detect(bytes: &[u8]) -> Detected {
    if let Some(kind) = infer::get(bytes) {
        let mime = kind.mime_type();
        let class = match kind.matcher_type() {
            infer::MatcherType::Image => Class::Image,
            infer::MatcherType::Audio => Class::Audio,
            infer::MatcherType::Doc => Class::Document,
            // m4a and webm voice recordings are audio in a video container.
            infer::MatcherType::Video if matches!(mime, "video/mp4" | "video/webm") => Class::Audio,
            infer::MatcherType::Archive if mime == "application/pdf" => Class::Document,
            infer::MatcherType::Archive if mime == "application/rtf" => Class::Document,
            infer::MatcherType::Text => Class::Text,
            _ => Class::Other,
        };
        return Detected {
            mime,
            extension: kind.extension(),
            class,
        };
    }
    // No magic number: plain text if it is UTF-8 without NULs.
    if std::str::from_utf8(bytes).is_ok() && !bytes.contains(&0) && !bytes.is_empty() {
        return Detected {
            mime: "text/plain",
            extension: "txt",
            class: Class::Text,
        };
    }
    Detected {
        mime: "application/octet-stream",
        extension: "bin",
        class: Class::Other,
    }
}

/// Image types the providers accept as image input.
fn vision_type(mime: &str) -> bool {
    matches!(
        mime,
        "image/jpeg" | "image/png" | "image/gif" | "image/webp"
    )
}

/// A file name safe in any shell or listing: letters, digits, `.`, `_`, `-`; no leading dot;
/// at most 48 characters; the extension is the detected one (text keeps a short plain one).
pub(super) fn safe_name(
    claimed: Option<&str>,
    kind: AttachmentKind,
    detected: &Detected,
) -> String {
    let claimed = claimed.unwrap_or("");
    // Only the last path component of whatever was claimed.
    let base = claimed.rsplit(['/', '\\']).next().unwrap_or("");
    let (stem, claimed_ext) = match base.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, Some(ext)),
        _ => (base, None),
    };
    let mut clean = String::new();
    for c in stem.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        };
        if !(c == '_' && clean.ends_with('_')) {
            clean.push(c);
        }
        if clean.len() >= 48 {
            break;
        }
    }
    let clean = clean.trim_matches('_');
    let stem = if clean.is_empty() {
        kind.as_str()
    } else {
        clean
    };
    let extension = match (detected.class, claimed_ext) {
        (Class::Text, Some(ext))
            if (1..=8).contains(&ext.len())
                && ext.chars().all(|c| c.is_ascii_alphanumeric())
                && matches!(
                    ext.to_ascii_lowercase().as_str(),
                    "txt"
                        | "md"
                        | "csv"
                        | "tsv"
                        | "json"
                        | "log"
                        | "ics"
                        | "vcf"
                        | "xml"
                        | "html"
                        | "yaml"
                        | "yml"
                ) =>
        {
            ext.to_ascii_lowercase()
        }
        _ => detected.extension.to_string(),
    };
    format!("{stem}.{extension}")
}

fn kib(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MB", bytes as f64 / f64::from(1u32 << 20))
    } else {
        format!("{} KB", bytes.div_ceil(1024))
    }
}

fn what(kind: AttachmentKind, german: bool) -> &'static str {
    match (kind, german) {
        (AttachmentKind::Photo, false) => "photo",
        (AttachmentKind::Voice, false) => "voice note",
        (AttachmentKind::Audio, false) => "audio file",
        (AttachmentKind::Document, false) => "file",
        (AttachmentKind::Photo, true) => "Foto",
        (AttachmentKind::Voice, true) => "Sprachnachricht",
        (AttachmentKind::Audio, true) => "Audiodatei",
        (AttachmentKind::Document, true) => "Datei",
    }
}

/// Why a file was not taken, in the user's language.
fn refusal(kind: AttachmentKind, german: bool, reason: &str) -> String {
    if german {
        format!(
            "Deine {} konnte ich nicht annehmen: {reason}",
            what(kind, true)
        )
    } else {
        format!("I could not take your {}: {reason}", what(kind, false))
    }
}

fn too_large(german: bool, size: Option<u64>, max: u64) -> String {
    match (german, size) {
        (false, Some(size)) => format!(
            "it is {}, more than the {} this server accepts.",
            kib(size),
            kib(max)
        ),
        (false, None) => format!("it is larger than the {} this server accepts.", kib(max)),
        (true, Some(size)) => format!(
            "sie ist {} groß, mehr als die {}, die dieser Server annimmt.",
            kib(size),
            kib(max)
        ),
        (true, None) => format!(
            "sie ist größer als die {}, die dieser Server annimmt.",
            kib(max)
        ),
    }
}

/// Download, check and save every attachment of `item`; build the turn's text.
pub(super) async fn prepare(
    inner: &Arc<Inner>,
    item: &InboxItem,
    writable: bool,
    language: &str,
) -> Prepared {
    let german = language.starts_with("de");
    let settings = &inner.settings.attachments;
    let mut prepared = Prepared {
        text: item.text.clone(),
        has_content: !item.text.trim().is_empty(),
        ..Prepared::default()
    };
    let mut lines: Vec<String> = Vec::new();
    let mut transcripts: Vec<String> = Vec::new();
    for (index, attachment) in item.attachments.iter().enumerate() {
        if index >= settings.max_per_message {
            prepared.notes.push(if german {
                format!(
                    "Ich nehme höchstens {} Dateien pro Nachricht; die übrigen habe ich nicht angesehen.",
                    settings.max_per_message
                )
            } else {
                format!(
                    "I take at most {} files per message; I did not look at the others.",
                    settings.max_per_message
                )
            });
            break;
        }
        match handle_one(inner, item, attachment, writable, german).await {
            Ok(Handled {
                line,
                image,
                transcript,
                note,
            }) => {
                if let Some(line) = line {
                    lines.push(line);
                }
                if let Some(image) = image {
                    prepared.images.push(image);
                }
                if let Some(transcript) = transcript {
                    transcripts.push(transcript);
                }
                if let Some(note) = note {
                    prepared.notes.push(note);
                }
            }
            Err(note) => prepared.notes.push(note),
        }
    }
    if !transcripts.is_empty() {
        let heard = transcripts.join("\n");
        if inner
            .settings
            .attachments
            .speech
            .as_ref()
            .is_some_and(|s| s.echo)
        {
            prepared.notes.push(format!(
                "{} {}",
                if german { "Gehört:" } else { "heard:" },
                heard
            ));
        }
        prepared.text = if prepared.text.trim().is_empty() {
            heard
        } else {
            format!("{}\n\n{heard}", prepared.text)
        };
        prepared.has_content = true;
    }
    if !lines.is_empty() {
        prepared.has_content = true;
        let block = lines.join("\n");
        prepared.text = if prepared.text.trim().is_empty() {
            block
        } else {
            format!("{}\n\n{block}", prepared.text)
        };
    }
    prepared
}

struct Handled {
    /// A line for the model naming the saved file.
    line: Option<String>,
    image: Option<ConversationItem>,
    transcript: Option<String>,
    note: Option<String>,
}

async fn handle_one(
    inner: &Arc<Inner>,
    item: &InboxItem,
    attachment: &Attachment,
    writable: bool,
    german: bool,
) -> Result<Handled, String> {
    let settings = &inner.settings.attachments;
    let kind = attachment.kind;
    let max = settings.max_bytes;
    if let Some(size) = attachment.size.filter(|s| *s > max) {
        return Err(refusal(kind, german, &too_large(german, Some(size), max)));
    }
    if !writable {
        return Err(refusal(
            kind,
            german,
            if german {
                "dein Speicher ist gerade nicht beschreibbar."
            } else {
                "your storage is not writable right now."
            },
        ));
    }
    let Some(channel) = inner.channels.get(&item.channel).cloned() else {
        return Err(refusal(kind, german, "this channel cannot deliver files."));
    };
    let bytes = match channel
        .fetch_attachment(attachment, max, settings.download_timeout)
        .await
    {
        Ok(bytes) => bytes,
        Err(ChannelError::Rejected { status: 413, .. }) => {
            return Err(refusal(kind, german, &too_large(german, None, max)))
        }
        Err(e) => {
            tracing::warn!(user = %item.user, error = %e, kind = kind.as_str(), "attachment download failed");
            return Err(refusal(
                kind,
                german,
                if german {
                    "das Herunterladen ist fehlgeschlagen. Schick sie bitte noch einmal."
                } else {
                    "downloading it failed. Please send it again."
                },
            ));
        }
    };
    let detected = detect(&bytes);
    let acceptable = match kind {
        AttachmentKind::Photo => detected.class == Class::Image && vision_type(detected.mime),
        AttachmentKind::Voice | AttachmentKind::Audio => detected.class == Class::Audio,
        AttachmentKind::Document => matches!(
            detected.class,
            Class::Document | Class::Text | Class::Image | Class::Audio
        ),
    };
    if !acceptable {
        tracing::info!(user = %item.user, kind = kind.as_str(), detected = detected.mime, "attachment refused by its content");
        return Err(refusal(
            kind,
            german,
            &if german {
                format!(
                    "der Inhalt ist kein Typ, den ich annehme (erkannt: {}).",
                    detected.mime
                )
            } else {
                format!(
                    "its content is not a type I accept (it looks like {}).",
                    detected.mime
                )
            },
        ));
    }
    let name = safe_name(attachment.file_name.as_deref(), kind, &detected);
    let relative = format!(
        "inbox/{}/{:08x}-{name}",
        chrono::Utc::now().format("%Y-%m-%d"),
        rand::random::<u32>()
    );
    let root = inner.homes.home(&item.user).root().to_path_buf();
    let size = bytes.len() as u64;
    // Kept for the image and the transcription; the write gets its own copy only when needed.
    let shared = Arc::new(bytes);
    let to_write = Arc::clone(&shared);
    let target = relative.clone();
    let see_it = matches!(kind, AttachmentKind::Photo) && settings.vision;
    let saved = blocking::run("saving your file", SAVE_DEADLINE, move || {
        write_beneath(&root, &target, &to_write)?;
        // The photo's base64 for the model is made here too, off the async worker: tens of
        // megabytes of it would hold up every other user's turn.
        Ok::<_, moltmate_store::HomeError>(
            see_it.then(|| base64::engine::general_purpose::STANDARD.encode(to_write.as_slice())),
        )
    })
    .await;
    let mut image_data = match saved {
        Ok(Ok(data)) => data,
        Ok(Err(e)) => {
            tracing::warn!(user = %item.user, error = %e, "attachment could not be saved");
            return Err(refusal(kind, german, &e.user_reason()));
        }
        Err(e) => {
            tracing::warn!(user = %item.user, error = %e, "attachment could not be saved in time");
            return Err(refusal(kind, german, "saving it took too long."));
        }
    };
    let described = format!(
        "[The user sent a {} ({}, {}), saved in their files as {relative}.",
        what(kind, false),
        detected.mime,
        kib(size)
    );
    let mut handled = Handled {
        line: None,
        image: None,
        transcript: None,
        note: None,
    };
    match kind {
        AttachmentKind::Photo if settings.vision => {
            handled.image = image_data.take().map(|data| ConversationItem::Image {
                media_type: detected.mime.to_string(),
                data,
            });
            handled.line = Some(format!("{described} It is shown above.]"));
        }
        AttachmentKind::Photo => {
            handled.line = Some(format!(
                "{described} This model cannot see images; the file can be worked with using tools.]"
            ));
        }
        AttachmentKind::Voice | AttachmentKind::Audio => {
            match transcribe(
                inner,
                item,
                attachment,
                &shared,
                &name,
                detected.mime,
                german,
            )
            .await
            {
                Ok(text) => {
                    handled.transcript = Some(text);
                    handled.line =
                        Some(format!("{described} Its transcript is the message above.]"));
                }
                Err(note) => {
                    handled.note = Some(note);
                    handled.line = Some(format!("{described} It was not transcribed.]"));
                }
            }
        }
        AttachmentKind::Document => {
            let hint = if detected.mime == "application/pdf" {
                " Read it with tools (e.g. `pdftotext` in exec, or read)."
            } else {
                " Read it with tools if needed."
            };
            handled.line = Some(format!("{described}{hint}]"));
        }
    }
    Ok(handled)
}

async fn transcribe(
    inner: &Arc<Inner>,
    item: &InboxItem,
    attachment: &Attachment,
    bytes: &Arc<Vec<u8>>,
    name: &str,
    mime: &str,
    german: bool,
) -> Result<String, String> {
    let Some(speech) = inner.settings.attachments.speech.clone() else {
        return Err(if german {
            "Sprachnachrichten sind auf diesem Server nicht eingerichtet; ich habe sie gespeichert, kann sie aber nicht anhören. Schreib mir bitte.".to_string()
        } else {
            "Voice notes are not enabled on this server: I saved it but cannot listen to it. Please type your message.".to_string()
        });
    };
    if bytes.len() as u64 > speech.max_bytes {
        return Err(refusal(
            attachment.kind,
            german,
            &too_large(german, Some(bytes.len() as u64), speech.max_bytes),
        ));
    }
    if let Some(seconds) = attachment
        .duration_seconds
        .filter(|s| *s > speech.max_seconds)
    {
        return Err(if german {
            format!(
                "Die Aufnahme ist {seconds} s lang; ich schreibe höchstens {} s ab.",
                speech.max_seconds
            )
        } else {
            format!(
                "The recording is {seconds} s long; I transcribe at most {} s.",
                speech.max_seconds
            )
        });
    }
    let work = speech
        .transcriber
        .transcribe(bytes.as_ref().clone(), name, mime);
    match tokio::time::timeout(speech.timeout, work).await {
        Ok(Ok(text)) if !text.trim().is_empty() => Ok(text.trim().to_string()),
        Ok(Ok(_)) => Err(if german {
            "In der Sprachnachricht habe ich nichts verstanden.".to_string()
        } else {
            "I could not make out any words in the recording.".to_string()
        }),
        Ok(Err(e)) => {
            tracing::warn!(user = %item.user, error = %e, "transcription failed");
            Err(if german {
                "Das Abschreiben der Sprachnachricht ist fehlgeschlagen.".to_string()
            } else {
                "Transcribing the recording failed.".to_string()
            })
        }
        Err(_) => Err(if german {
            "Das Abschreiben hat zu lange gedauert.".to_string()
        } else {
            "Transcribing the recording took too long.".to_string()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_come_from_the_content_not_the_name() {
        let png = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 0];
        assert_eq!(detect(&png).mime, "image/png");
        assert_eq!(detect(&png).class, Class::Image);
        let elf = [
            0x7F, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(detect(&elf).class, Class::Other);
        assert_eq!(detect(b"%PDF-1.7\n...").class, Class::Document);
        assert_eq!(detect(b"hello\nworld").class, Class::Text);
        assert_eq!(detect(b"PK\x03\x04rest of a zip").class, Class::Other);
        assert_eq!(detect(b"OggS\0\x02rest").class, Class::Audio);
        assert_eq!(detect(&[0xFF, 0xFE, 0, 0xC3]).class, Class::Other);
    }

    #[test]
    fn names_are_sanitised_and_take_the_detected_extension() {
        let png = detect(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 0]);
        let text = detect(b"plain");
        assert_eq!(
            safe_name(Some("../../etc/passwd.png"), AttachmentKind::Document, &png),
            "passwd.png"
        );
        assert_eq!(
            safe_name(Some("invoice.pdf.exe"), AttachmentKind::Document, &png),
            "invoice_pdf.png"
        );
        assert_eq!(
            safe_name(Some(".bashrc"), AttachmentKind::Document, &text),
            "bashrc.txt"
        );
        assert_eq!(safe_name(None, AttachmentKind::Photo, &png), "photo.png");
        assert_eq!(
            safe_name(Some("notes.MD"), AttachmentKind::Document, &text),
            "notes.md"
        );
        assert_eq!(
            safe_name(Some("run.sh"), AttachmentKind::Document, &text),
            "run.txt"
        );
        assert_eq!(
            safe_name(Some("a b;$(x)`.txt"), AttachmentKind::Document, &text),
            "a_b_x.txt"
        );
        assert!(safe_name(Some(&"x".repeat(500)), AttachmentKind::Document, &text).len() <= 60);
    }
}
