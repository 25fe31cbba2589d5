//! A checkpoint's tokenizer and chat template (`tokenizer.json`, `tokenizer_config.json`),
//! rendered the way transformers' `apply_chat_template` renders it: Jinja with
//! `trim_blocks` and `lstrip_blocks`, Python string methods, `raise_exception`, the special
//! tokens as variables. Builds the SDPO teacher's hindsight prompt.

use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{checkpoint, invalid, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The text the reference inserts between the prompt and the feedback.
pub const HINDSIGHT_HEADER: &str = "\n\n=== HINDSIGHT CONTEXT ===\n[The following is a future user message. Use this to guide your answer to the user prompt.]\n";

/// The teacher's conversation: the student's system prompt, then the user prompt followed
/// by the feedback as hindsight context (the prompt alone when there is no feedback).
pub fn teacher_messages(system_prompt: &str, prompt: &str, feedback: &str) -> Vec<Message> {
    let feedback = feedback.trim();
    let user = if feedback.is_empty() {
        prompt.to_string()
    } else {
        format!("{prompt}{HINDSIGHT_HEADER}{feedback}")
    };
    vec![
        Message::new("system", system_prompt),
        Message::new("user", user),
    ]
}

/// A loaded tokenizer with its chat template.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    env: Environment<'static>,
    special: serde_json::Map<String, serde_json::Value>,
}

const TEMPLATE: &str = "chat";

impl ChatTokenizer {
    /// Loads `tokenizer.json` and the `chat_template` of `tokenizer_config.json` (or a
    /// `chat_template.jinja` beside them) from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| checkpoint(format!("cannot read {}: {e}", tok_path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| checkpoint(format!("{}: {e}", cfg_path.display())))?,
            Err(_) => serde_json::Value::Null,
        };
        let template = match cfg.get("chat_template").and_then(|t| t.as_str()) {
            Some(t) => t.to_string(),
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).map_err(|_| {
                checkpoint(format!(
                    "{} has no chat template (tokenizer_config.json chat_template or chat_template.jinja)",
                    dir.display()
                ))
            })?,
        };
        let mut special = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            let value = match cfg.get(key) {
                Some(serde_json::Value::String(s)) => serde_json::Value::String(s.clone()),
                // Older configs store added tokens as objects with a `content` field.
                Some(serde_json::Value::Object(o)) => {
                    o.get("content").cloned().unwrap_or(serde_json::Value::Null)
                }
                _ => serde_json::Value::Null,
            };
            special.insert(key.to_string(), value);
        }
        Self::new(tokenizer, template, special)
    }

    fn new(
        tokenizer: Tokenizer,
        template: String,
        special: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| checkpoint(format!("template syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(TEMPLATE, template)
            .map_err(|e| checkpoint(format!("the chat template does not parse: {e}")))?;
        Ok(ChatTokenizer {
            tokenizer,
            env,
            special,
        })
    }

    /// Renders `messages` with the chat template; `kwargs` are extra template variables
    /// (`enable_thinking`, ...).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let mut ctx = self.special.clone();
        ctx.insert("messages".into(), serde_json::to_value(messages)?);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        for (k, v) in kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| checkpoint(format!("chat template: {e}")))?;
        tmpl.render(minijinja::Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| invalid(format!("the chat template failed on these messages: {e}")))
    }

    /// Token ids of `text` without added special tokens (what `apply_chat_template`
    /// produces with `tokenize=True`: the template already wrote them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| invalid(format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| invalid(format!("cannot decode: {e}")))
    }

    /// The hindsight teacher prompt's token ids (generation prompt added).
    pub fn teacher_prompt_ids(
        &self,
        system_prompt: &str,
        prompt: &str,
        feedback: &str,
    ) -> Result<Vec<u32>> {
        self.encode(&self.teacher_prompt_text(system_prompt, prompt, feedback)?)
    }

    /// The teacher's prompt as rendered by the chat template (what the teacher reads
    /// before the response it scores).
    pub fn teacher_prompt_text(
        &self,
        system_prompt: &str,
        prompt: &str,
        feedback: &str,
    ) -> Result<String> {
        self.render(
            &teacher_messages(system_prompt, prompt, feedback),
            true,
            &serde_json::Map::new(),
        )
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}
