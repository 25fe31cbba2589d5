//! The real Qwen3 chat template rendered and tokenized exactly as transformers does
//! (`../shared/fixtures/tokenizer/chat_template_cases.json`), and the hindsight teacher
//! prompt in the reference's format.

use std::path::{Path, PathBuf};

use claas_trainer::template::{teacher_messages, ChatTokenizer, Message};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tokenizer")
}

#[test]
fn every_case_renders_and_tokenizes_exactly() {
    let tok = ChatTokenizer::from_dir(&dir()).expect("tokenizer");
    let text = std::fs::read_to_string(dir().join("chat_template_cases.json")).expect("cases");
    let doc: Value = serde_json::from_str(&text).expect("json");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 4);
    for case in cases {
        let name = case["name"].as_str().expect("name");
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
}

#[test]
fn the_teacher_prompt_is_the_reference_hindsight_format() {
    let tok = ChatTokenizer::from_dir(&dir()).expect("tokenizer");
    let text = std::fs::read_to_string(dir().join("chat_template_cases.json")).expect("cases");
    let doc: Value = serde_json::from_str(&text).expect("json");
    let case = doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == "teacher_hindsight")
        .expect("teacher case");
    let messages = teacher_messages(
        "You are a helpful assistant.",
        "Write a function to calculate factorial",
        "  Good recursive solution\n",
    );
    let want: Vec<Message> = serde_json::from_value(case["messages"].clone()).expect("msgs");
    assert_eq!(messages, want);
    let ids: Vec<u32> = serde_json::from_value(case["token_ids"].clone()).expect("ids");
    let got = tok
        .teacher_prompt_ids(
            "You are a helpful assistant.",
            "Write a function to calculate factorial",
            "Good recursive solution",
        )
        .expect("teacher ids");
    assert_eq!(got, ids);
    // No feedback: the prompt alone.
    assert_eq!(teacher_messages("s", "p", " ")[1].content, "p");
}
