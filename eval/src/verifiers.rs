//! Verifiers: does a response follow a preference? Each scores the response with its
//! `<think>` blocks removed, as CLaaS's `run_verifier` does.

use claas_core::thinking::strip_thinking;
use serde::{Deserialize, Serialize};
use unicode_categories::UnicodeCategories;

use crate::text::sentences;

/// A verifier as a preference file names it (`verifier: {kind: concise}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Verifier {
    /// No emoji: no character of Unicode category So nor in the emoji blocks. (Variants
    /// without settings are empty structs, so that a stray key is still refused.)
    NoEmoji {},
    /// At most 3 sentences (and at least 10 words); the score falls to 0 at 9 sentences.
    Concise {},
    /// The response says the assistant's name (case-insensitive).
    Identity {
        #[serde(default = "default_name")]
        name: String,
    },
    /// The response contains `text` (case-insensitive): for preferences of your own.
    Contains { text: String },
}

fn default_name() -> String {
    "Kuro".into()
}

/// A verifier's judgement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Verdict {
    /// In [0, 1].
    pub score: f64,
    pub passed: bool,
}

impl Verdict {
    fn binary(passed: bool) -> Verdict {
        Verdict {
            score: if passed { 1.0 } else { 0.0 },
            passed,
        }
    }
}

/// Fewer words than this is not an answer, however concise.
pub const CONCISE_MIN_WORDS: usize = 10;

/// The code point ranges CLaaS counts as emoji besides category So.
const EMOJI_RANGES: [(u32, u32); 6] = [
    (0x1F600, 0x1F64F),
    (0x1F300, 0x1F5FF),
    (0x1F680, 0x1F6FF),
    (0x1F900, 0x1F9FF),
    (0x1FA00, 0x1FAFF),
    (0x1F1E0, 0x1F1FF),
];

fn is_emoji(c: char) -> bool {
    let cp = c as u32;
    c.is_symbol_other()
        || EMOJI_RANGES
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&cp))
}

impl Verifier {
    /// Scores `response` (its thinking removed first).
    pub fn check(&self, response: &str) -> Verdict {
        let text = strip_thinking(response);
        match self {
            Verifier::NoEmoji {} => Verdict::binary(!text.chars().any(is_emoji)),
            Verifier::Concise {} => {
                if text.split_whitespace().count() < CONCISE_MIN_WORDS {
                    return Verdict::binary(false);
                }
                let n = sentences(&text).len();
                let score = match n {
                    0..=3 => 1.0,
                    9.. => 0.0,
                    n => 1.0 - (n as f64 - 3.0) / 6.0,
                };
                Verdict {
                    score,
                    passed: n <= 3,
                }
            }
            Verifier::Identity { name } => {
                Verdict::binary(text.to_lowercase().contains(&name.to_lowercase()))
            }
            Verifier::Contains { text: needle } => {
                Verdict::binary(text.to_lowercase().contains(&needle.to_lowercase()))
            }
        }
    }

    /// The verifier's name in outputs (`no_emoji`, `concise`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Verifier::NoEmoji {} => "no_emoji",
            Verifier::Concise {} => "concise",
            Verifier::Identity { .. } => "identity",
            Verifier::Contains { .. } => "contains",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_emoji_cases() {
        let v = Verifier::NoEmoji {};
        let cases: [(&str, bool); 8] = [
            ("Hello! How can I help you today?", true),
            ("Hello! \u{1F60A} How can I help?", false), // 😊 emoticons block
            ("Party time \u{1F389}", false),             // 🎉 symbols and pictographs
            ("Sparkles \u{2728}", false),                // ✨ category So
            ("Flag \u{1F1EB}\u{1F1F7}", false),          // regional indicators
            ("Rocket \u{1F680}", false),                 // transport block
            ("Math: 3 < 4, café, naïve, 日本語", true),  // letters and Sm are fine
            ("<think>\u{1F914} hmm</think>All plain.", true), // thinking is ignored
        ];
        for (text, want) in cases {
            assert_eq!(v.check(text).passed, want, "{text:?}");
            assert_eq!(v.check(text).score, if want { 1.0 } else { 0.0 });
        }
    }

    #[test]
    fn concise_cases() {
        let v = Verifier::Concise {};
        let s = |n: usize| {
            (0..n)
                .map(|i| format!("This is sentence number {i} of the whole long answer here."))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let cases: [(String, f64, bool); 7] = [
            ("Too short.".into(), 0.0, false),
            (s(1), 1.0, true),
            (s(3), 1.0, true),
            (s(4), 1.0 - 1.0 / 6.0, false),
            (s(6), 0.5, false),
            (s(9), 0.0, false),
            (s(12), 0.0, false),
        ];
        for (text, score, passed) in cases {
            let got = v.check(&text);
            assert!((got.score - score).abs() < 1e-12, "{text:?}: {got:?}");
            assert_eq!(got.passed, passed, "{text:?}");
        }
        // "?!" runs end one sentence; a trailing piece without a mark still counts.
        let mixed = "Is it fast?! Yes, very fast indeed. And it keeps going without a stop";
        assert!(v.check(mixed).passed);
    }

    #[test]
    fn identity_and_contains_ignore_case_and_thinking() {
        let id = Verifier::Identity {
            name: "Kuro".into(),
        };
        assert!(id.check("I'm KURO, nice to meet you").passed);
        assert!(!id.check("I'm an AI assistant.").passed);
        assert!(!id.check("<think>I am Kuro</think>I'm an assistant.").passed);
        let c = Verifier::Contains {
            text: "Bonjour".into(),
        };
        assert!(c.check("bonjour à tous").passed);
    }

    #[test]
    fn verifiers_read_from_yaml() {
        let v: Verifier = serde_yaml::from_str("kind: identity").expect("yaml");
        assert_eq!(
            v,
            Verifier::Identity {
                name: "Kuro".into()
            }
        );
        let v: Verifier = serde_yaml::from_str("{kind: contains, text: hi}").expect("yaml");
        assert_eq!(v.name(), "contains");
        assert!(serde_yaml::from_str::<Verifier>("kind: sarcasm").is_err());
        assert!(serde_yaml::from_str::<Verifier>("{kind: concise, max: 2}").is_err());
    }
}
