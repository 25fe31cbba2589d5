//! Every HTTP status the API answers with is decided in `api/src/error.rs` (README, Layout):
//! no other file of `api/src` names a `StatusCode::` or builds a `Redirect::`, except
//! `upstream.rs`, which only compares the statuses vLLM answers with.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("api/src is readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn statuses_are_decided_only_in_error_rs() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "found the sources: {files:?}");
    let mut found = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src").to_path_buf();
        if rel == Path::new("error.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read");
        for (i, line) in text.lines().enumerate() {
            if line.contains("Redirect::") {
                found.push(format!("{}:{}: {}", rel.display(), i + 1, line.trim()));
            }
            if !line.contains("StatusCode::") {
                continue;
            }
            let reads_vllm = rel == Path::new("upstream.rs")
                && (line.contains("== StatusCode::") || line.contains("StatusCode::from_u16"));
            if !reads_vllm {
                found.push(format!("{}:{}: {}", rel.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "statuses decided outside api/src/error.rs (add a named constructor there):\n{}",
        found.join("\n")
    );
}
