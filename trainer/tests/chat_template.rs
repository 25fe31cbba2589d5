//! The real Qwen3 chat template rendered and tokenized exactly as transformers does
//! (`tests/fixtures/tokenizer/chat_template_cases.json`, from `scripts/make_golden.py`, and
//! the reference implementation's `../shared/fixtures/tokenizer` where present), and the
//! hindsight teacher prompt in the reference's format.

use std::path::{Path, PathBuf};

use claas_trainer::template::{teacher_messages, ChatTokenizer, Message, HINDSIGHT_HEADER};
use serde_json::Value;

/// `tests/fixtures/tokenizer`, then `../shared/fixtures/tokenizer` when present.
fn dirs() -> Vec<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let shared = repo.join("../shared/fixtures/tokenizer");
    let mut dirs = vec![repo.join("tests/fixtures/tokenizer")];
    if shared.is_dir() {
        dirs.push(shared);
    }
    dirs
}

fn cases(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("chat_template_cases.json")).expect("cases");
    let doc: Value = serde_json::from_str(&text).expect("json");
    doc["cases"].as_array().expect("cases").clone()
}

#[test]
fn every_case_renders_and_tokenizes_exactly() {
    for dir in dirs() {
        let tok = ChatTokenizer::from_dir(&dir).expect("tokenizer");
        let cases = cases(&dir);
        assert!(cases.len() >= 4);
        for case in &cases {
            let name = format!("{}: {}", dir.display(), case["name"]);
            check_case(&tok, &name, case);
        }
    }
}

fn check_case(tok: &ChatTokenizer, name: &str, case: &Value) {
    let messages: Vec<Message> =
        serde_json::from_value(case["messages"].clone()).expect("messages");
    let kwargs = case["template_kwargs"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let gen = case["add_generation_prompt"].as_bool().expect("flag");
    let rendered = tok.render(&messages, gen, &kwargs).expect("render");
    assert_eq!(
        rendered,
        case["text"].as_str().expect("text"),
        "{name}: text"
    );
    let ids: Vec<u32> = serde_json::from_value(case["token_ids"].clone()).expect("ids");
    assert_eq!(
        tok.encode(&rendered).expect("encode"),
        ids,
        "{name}: token ids"
    );
}

#[test]
fn the_teacher_prompt_is_the_reference_hindsight_format() {
    for dir in dirs() {
        let tok = ChatTokenizer::from_dir(&dir).expect("tokenizer");
        let case = cases(&dir)
            .into_iter()
            .find(|c| c["name"] == "teacher_hindsight")
            .expect("teacher case");
        let want: Vec<Message> = serde_json::from_value(case["messages"].clone()).expect("msgs");
        // The case's own system prompt, prompt and feedback, read back out of its messages.
        let system = want[0].content.clone();
        let (prompt, feedback) = want[1]
            .content
            .split_once(HINDSIGHT_HEADER)
            .expect("the hindsight header");
        let messages = teacher_messages(&system, prompt, &format!("  {feedback}\n"));
        assert_eq!(messages, want, "{}", dir.display());
        let ids: Vec<u32> = serde_json::from_value(case["token_ids"].clone()).expect("ids");
        let got = tok
            .teacher_prompt_ids(&system, prompt, feedback)
            .expect("teacher ids");
        assert_eq!(got, ids, "{}", dir.display());
    }
    // No feedback: the prompt alone.
    assert_eq!(teacher_messages("s", "p", " ")[1].content, "p");
}
