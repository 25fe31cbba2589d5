//! Readable units (ARCHITECTURE.md): no function of the product over 80 lines unless the
//! lines just above it state why (`// Long: <reason>`). Tests and the test kit are exempt.

mod sources;

use std::path::Path;

use sources::rust_files;

const LIMIT: usize = 80;

/// The name of the function `line` starts, if it starts one.
fn fn_name(line: &str) -> Option<&str> {
    let t = line.trim_start();
    let t = t
        .strip_prefix("pub(crate) ")
        .or_else(|| t.strip_prefix("pub(super) "))
        .or_else(|| t.strip_prefix("pub "))
        .unwrap_or(t);
    let t = t.strip_prefix("async ").unwrap_or(t);
    let rest = t.strip_prefix("fn ")?;
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    Some(&rest[..end])
}

/// `(name, first line, length)` of every function over the limit without a stated reason.
fn long_functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_start().starts_with("#[cfg(test)]") {
            break; // the rest of the file is its unit tests
        }
        let Some(name) = fn_name(lines[i]) else {
            i += 1;
            continue;
        };
        let (mut depth, mut opened, mut j) = (0i32, false, i);
        while j < lines.len() {
            let code = lines[j].split("//").next().unwrap_or_default();
            for c in code.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if (opened && depth == 0) || (!opened && code.trim_end().ends_with(';')) {
                break;
            }
            j += 1;
        }
        let len = j + 1 - i;
        let reason = lines[i.saturating_sub(4)..i]
            .iter()
            .any(|l| l.trim_start().starts_with("// Long:"));
        if opened && len > LIMIT && !reason {
            found.push((name.to_string(), i + 1, len));
        }
        i = if opened { j + 1 } else { i + 1 };
    }
    found
}

#[test]
fn no_long_function_without_a_stated_reason() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in [
        "src",
        "core/src",
        "api/src",
        "engine/src",
        "worker/src",
        "trainer/src",
        "eval/src",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut long = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("source");
        for (name, line, len) in long_functions(&text) {
            let rel = f.strip_prefix(root).unwrap_or(f).display().to_string();
            long.push(format!("{rel}:{line} {name}: {len} lines"));
        }
    }
    assert!(
        long.is_empty(),
        "functions over {LIMIT} lines with no `// Long: <reason>` above them:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_checker_measures_and_reads_reasons() {
    let body = "    let x = 1;\n".repeat(LIMIT);
    let long = format!("fn big() {{\n{body}}}\n");
    assert_eq!(
        long_functions(&long),
        vec![("big".to_string(), 1, LIMIT + 2)]
    );
    let excused = format!("// Long: a table of cases.\n{long}");
    assert!(long_functions(&excused).is_empty());
    let short = "pub async fn small() {\n    1\n}\n";
    assert!(long_functions(short).is_empty());
}
