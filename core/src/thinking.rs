//! What the client sees of an answer, and the key feedback finds it by.
//!
//! Qwen3 writes its reasoning as `<think>…</think>` before the answer. Clients see the
//! answer only; the trainer gets every sampled token. Feedback names an answer by its
//! visible text, so the key is the SHA-256 of that text with whitespace runs collapsed
//! (clients reflow newlines), as CLaaS computes it.

use sha2::{Digest, Sha256};

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Removes every `<think>…</think>` block; an orphan `</think>` (the opening tag was in the
/// prompt) drops everything up to it. The result is trimmed.
pub fn strip_thinking(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        match rest[start..].find(CLOSE) {
            Some(end) => {
                out.push_str(&rest[..start]);
                rest = &rest[start + end + CLOSE.len()..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    if let Some(i) = out.find(CLOSE) {
        out.drain(..i + CLOSE.len());
    }
    out.trim().to_owned()
}

/// The text the cache key is computed from.
pub fn normalize_for_hash(text: &str) -> String {
    strip_thinking(text)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// SHA-256 (hex) of the normalised visible text: the completion cache's key.
pub fn content_hash(text: &str) -> String {
    hex::encode(Sha256::digest(normalize_for_hash(text).as_bytes()))
}

/// Strips thinking from a stream of text deltas. Tags may be split across deltas, so a
/// possible partial tag at the end of a delta is held back until the next one decides it.
/// Leading whitespace after a thinking block is dropped, as `strip_thinking` trims it.
#[derive(Debug, Default)]
pub struct ThinkFilter {
    pending: String,
    inside: bool,
    /// Nothing visible has been emitted yet (leading whitespace is dropped).
    at_start: bool,
    started: bool,
}

impl ThinkFilter {
    pub fn new() -> ThinkFilter {
        ThinkFilter {
            at_start: true,
            ..ThinkFilter::default()
        }
    }

    /// The visible part of `delta` that can be emitted now.
    pub fn push(&mut self, delta: &str) -> String {
        self.started = true;
        self.pending.push_str(delta);
        let mut out = String::new();
        loop {
            if self.inside {
                match self.pending.find(CLOSE) {
                    Some(i) => {
                        self.pending.drain(..i + CLOSE.len());
                        self.inside = false;
                    }
                    None => {
                        // Keep only what could still be the start of `</think>`.
                        let keep = partial_suffix(&self.pending, CLOSE);
                        let cut = self.pending.len() - keep;
                        self.pending.drain(..cut);
                        break;
                    }
                }
            } else {
                match self.pending.find(OPEN) {
                    Some(i) => {
                        let before: String = self.pending.drain(..i).collect();
                        self.emit(&before, &mut out);
                        self.pending.drain(..OPEN.len());
                        self.inside = true;
                    }
                    None => {
                        let keep = partial_suffix(&self.pending, OPEN);
                        let cut = self.pending.len() - keep;
                        let now: String = self.pending.drain(..cut).collect();
                        self.emit(&now, &mut out);
                        break;
                    }
                }
            }
        }
        out
    }

    /// What is left when the stream ends (an unclosed `<think>` hides the rest).
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        if !self.inside {
            let rest = std::mem::take(&mut self.pending);
            self.emit(&rest, &mut out);
        }
        self.pending.clear();
        out
    }

    fn emit(&mut self, text: &str, out: &mut String) {
        let text = if self.at_start {
            text.trim_start()
        } else {
            text
        };
        if !text.is_empty() {
            self.at_start = false;
            out.push_str(text);
        }
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag`.
fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| {
            s.len() >= n && s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_blocks_orphans_and_trims() {
        assert_eq!(strip_thinking("<think>\nhmm\n</think>\n\nHello"), "Hello");
        assert_eq!(strip_thinking("a<think>x</think>b<think>y</think>c"), "abc");
        assert_eq!(
            strip_thinking("reasoning went here</think> Answer"),
            "Answer"
        );
        assert_eq!(strip_thinking("no tags  "), "no tags");
        assert_eq!(strip_thinking("<think>never closed"), "<think>never closed");
    }

    #[test]
    fn hash_ignores_thinking_and_whitespace_layout() {
        let a = content_hash("<think>x</think>Line one\nline  two");
        assert_eq!(a, content_hash("Line one line two"));
        assert_eq!(a, content_hash("  Line one\n\n line two\t"));
        assert_ne!(a, content_hash("Line one line three"));
        // The key is CLaaS's: sha256 of the collapsed text.
        assert_eq!(
            content_hash("hi there"),
            hex::encode(Sha256::digest(b"hi there"))
        );
    }

    #[test]
    fn the_stream_filter_matches_the_whole_text_filter_at_every_split() {
        let texts = [
            "<think>\nLet me see.\n</think>\n\nThe answer is 4.",
            "Plain answer, no thinking.",
            "a<think>b</think>c<think>d</think>e",
            "x </thi nk> < think> <",
            "é<think>ü</think>ö",
        ];
        for text in texts {
            let chars: Vec<char> = text.chars().collect();
            for size in 1..=4 {
                let mut f = ThinkFilter::new();
                let mut out = String::new();
                for chunk in chars.chunks(size) {
                    out.push_str(&f.push(&chunk.iter().collect::<String>()));
                }
                out.push_str(&f.finish());
                assert_eq!(
                    out.trim_end(),
                    strip_thinking(text),
                    "{text:?} in chunks of {size}"
                );
            }
        }
    }
}
