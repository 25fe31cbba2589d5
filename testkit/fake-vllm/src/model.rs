//! The fake's deterministic "model": a character-level tokenizer with Qwen3's special
//! ids, a ChatML template, replies derived from the last user message, and their log-probs.

use crate::*;

/// Character-level tokenizer with Qwen3's special ids.
pub fn encode(text: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut rest = text;
    'outer: while let Some(c) = rest.chars().next() {
        for (s, id) in SPECIALS {
            if let Some(r) = rest.strip_prefix(s) {
                ids.push(id);
                rest = r;
                continue 'outer;
            }
        }
        let cp = c as u32;
        ids.push(1000 + if cp < 150_000 { cp } else { 0xFFFD });
        rest = &rest[c.len_utf8()..];
    }
    ids
}

pub fn decode_one(id: u32) -> String {
    if let Some((s, _)) = SPECIALS.iter().find(|(_, i)| *i == id) {
        return (*s).to_owned();
    }
    id.checked_sub(1000)
        .and_then(char::from_u32)
        .map(String::from)
        .unwrap_or_else(|| "\u{FFFD}".into())
}

pub fn decode(ids: &[u32]) -> String {
    ids.iter().map(|i| decode_one(*i)).collect()
}

/// Tiny preset ids (`claas model random tiny`): bytes 0..=255, then its special tokens.
pub(crate) const TINY_SPECIALS: [(&str, u32); 4] = [
    ("<|im_start|>", 257),
    ("<|im_end|>", 258),
    ("<think>", 259),
    ("</think>", 260),
];

/// The fake model's tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tokenizer {
    /// One token per character (id = 1000 + code point) and Qwen3's real special ids.
    #[default]
    Qwen3Like,
    /// One token per byte with the tiny random preset's special ids, so its rollouts train
    /// the tiny model (vocabulary 512).
    TinyBytes,
}

impl Tokenizer {
    pub fn encode(self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Qwen3Like => encode(text),
            Tokenizer::TinyBytes => {
                let mut ids = Vec::new();
                let mut rest = text;
                'outer: while !rest.is_empty() {
                    for (sp, id) in TINY_SPECIALS {
                        if let Some(r) = rest.strip_prefix(sp) {
                            ids.push(id);
                            rest = r;
                            continue 'outer;
                        }
                    }
                    let c = rest.chars().next().map_or(1, char::len_utf8);
                    ids.extend(rest.as_bytes()[..c].iter().map(|b| u32::from(*b)));
                    rest = &rest[c..];
                }
                ids
            }
        }
    }

    pub fn decode_one(self, id: u32) -> String {
        match self {
            Tokenizer::Qwen3Like => decode_one(id),
            Tokenizer::TinyBytes => match TINY_SPECIALS.iter().find(|(_, i)| *i == id) {
                Some((sp, _)) => (*sp).to_owned(),
                None => u8::try_from(id)
                    .map(|b| String::from_utf8_lossy(&[b]).into_owned())
                    .unwrap_or_else(|_| "\u{FFFD}".into()),
            },
        }
    }

    pub fn decode(self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Qwen3Like => decode(ids),
            Tokenizer::TinyBytes => {
                let mut bytes = Vec::new();
                for id in ids {
                    match u8::try_from(*id) {
                        Ok(b) => bytes.push(b),
                        Err(_) => bytes.extend(self.decode_one(*id).into_bytes()),
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    pub fn im_start(self) -> u32 {
        match self {
            Tokenizer::Qwen3Like => IM_START,
            Tokenizer::TinyBytes => 257,
        }
    }

    pub fn im_end(self) -> u32 {
        match self {
            Tokenizer::Qwen3Like => IM_END,
            Tokenizer::TinyBytes => 258,
        }
    }

    /// The k-th alternative a top-logprobs list offers.
    pub(crate) fn alternative(self, k: usize) -> u32 {
        match self {
            Tokenizer::Qwen3Like => 1000 + 32 + k as u32,
            Tokenizer::TinyBytes => 64 + k as u32,
        }
    }
}

/// The raw log-prob the fake reports for `id` at `position` under `model`.
pub fn logprob(model: &str, id: u32, position: usize) -> f64 {
    let m = model.bytes().map(u64::from).sum::<u64>() % 5;
    -(((u64::from(id) + position as u64) % 13) as f64 + 1.0 + m as f64) / 32.0
}

pub(crate) fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// ChatML as Qwen3 renders it; `enable_thinking: false` adds the empty think block.
pub(crate) fn render_chat(
    messages: &[Value],
    add_generation_prompt: bool,
    thinking: bool,
) -> String {
    let mut out = String::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let content = content_text(m.get("content").unwrap_or(&Value::Null));
        out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
        if !thinking {
            out.push_str("<think>\n\n</think>\n\n");
        }
    }
    out
}

pub(crate) fn reply_text(shared: &Shared, model: &str, user: &str) -> String {
    let fixed = shared
        .knobs
        .reply
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    fixed.unwrap_or_else(|| format!("[{model}] You said: {user}"))
}

pub(crate) struct Generation {
    pub(crate) model: String,
    pub(crate) prompt_ids: Vec<u32>,
    pub(crate) ids: Vec<u32>,
    pub(crate) finish: &'static str,
}

pub(crate) fn generate(
    shared: &Shared,
    model: &str,
    prompt_ids: Vec<u32>,
    last_user: &str,
    max_tokens: Option<u64>,
) -> Generation {
    let mut text = reply_text(shared, model, last_user);
    if shared.knobs.think.load(Ordering::SeqCst) {
        text = format!("<think>\nThe user wants a reply.\n</think>\n\n{text}");
    }
    let t = shared.opts.tokenizer;
    let mut ids = t.encode(&text);
    ids.push(t.im_end());
    let mut finish = "stop";
    if let Some(max) = max_tokens.and_then(|m| usize::try_from(m).ok()) {
        if ids.len() > max {
            ids.truncate(max);
            finish = "length";
        }
    }
    Generation {
        model: model.to_owned(),
        prompt_ids,
        ids,
        finish,
    }
}

/// Visible text of generated ids: special tokens are skipped, as vLLM's detokenizer does
/// by default (the think tags are ordinary added tokens and stay).
pub(crate) fn visible(t: Tokenizer, ids: &[u32]) -> String {
    let kept: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|i| *i != t.im_end() && *i != t.im_start())
        .collect();
    t.decode(&kept)
}

pub(crate) fn token_entry(t: Tokenizer, model: &str, id: u32, pos: usize, top: usize) -> Value {
    let tok = t.decode_one(id);
    let lp = logprob(model, id, pos);
    let mut tops = vec![json!({"token": tok, "logprob": lp, "bytes": tok.as_bytes()})];
    for k in 1..top {
        let alt = t.decode_one(t.alternative(k));
        tops.push(json!({"token": alt, "logprob": lp - k as f64, "bytes": alt.as_bytes()}));
    }
    json!({"token": tok, "logprob": lp, "bytes": tok.as_bytes(), "top_logprobs": tops})
}
