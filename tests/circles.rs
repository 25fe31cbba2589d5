//! No file circles inside a crate (ARCHITECTURE.md): if `a.rs` uses `b.rs`, then `b.rs` does
//! not use `a.rs`, directly or through others. A module may use its parent's items (Rust's
//! own nesting), so only references to modules that are not its ancestors count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Module path (`routes::lora`) → source, for every `.rs` file under `src`.
fn modules(src: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            modules(src, &path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path
            .strip_prefix(src)
            .expect("under src")
            .with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts
            .last()
            .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
        {
            parts.pop();
        }
        let text = std::fs::read_to_string(&path).expect("source");
        out.insert(parts.join("::"), text);
    }
}

/// Paths after each `crate::` / `super::` in `line`, group imports expanded.
fn paths_in(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    for root in ["crate::", "super::"] {
        let mut rest = line;
        while let Some(at) = rest.find(root) {
            let before = rest[..at].chars().last();
            let after = &rest[at + root.len()..];
            rest = after;
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let head = &root[..root.len() - 2];
            if let Some(group) = after.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or_default();
                for item in group.split(',') {
                    found.push(format!("{head}::{}", ident_path(item.trim())));
                }
            } else {
                found.push(format!("{head}::{}", ident_path(after)));
            }
        }
    }
    found
}

/// The leading `a::b::c` of `s`.
fn ident_path(s: &str) -> String {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    s[..end].trim_end_matches(':').to_string()
}

/// The deepest module `path` (as written in module `from`) names, if any.
fn resolve(from: &str, path: &str, names: &BTreeSet<String>) -> Option<String> {
    let mut parts = path.split("::");
    let mut base: Vec<&str> = match parts.next()? {
        "crate" => Vec::new(),
        _ => {
            let mut b: Vec<&str> = from.split("::").filter(|p| !p.is_empty()).collect();
            b.pop();
            b
        }
    };
    let mut best = None;
    for p in parts {
        if p == "super" {
            base.pop();
            continue;
        }
        base.push(p);
        let name = base.join("::");
        if names.contains(&name) {
            best = Some(name);
        }
    }
    best
}

fn graph(src: &Path) -> Graph {
    let mut files = BTreeMap::new();
    modules(src, src, &mut files);
    let names: BTreeSet<String> = files.keys().cloned().collect();
    let mut g = Graph::new();
    for (m, text) in &files {
        let uses = g.entry(m.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or_default();
            for p in paths_in(code) {
                match resolve(m, &p, &names) {
                    Some(r) if !r.is_empty() && r != *m && !m.starts_with(&format!("{r}::")) => {
                        uses.insert(r);
                    }
                    _ => {}
                }
            }
        }
    }
    g
}

fn reaches(g: &Graph, from: &str, to: &str) -> bool {
    let (mut seen, mut stack) = (BTreeSet::new(), vec![from.to_string()]);
    while let Some(n) = stack.pop() {
        for next in g.get(&n).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.clone()) {
                stack.push(next.clone());
            }
        }
    }
    false
}

#[test]
fn no_crate_has_a_file_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut circles = Vec::new();
    for krate in ["core", "api", "engine", "worker", "trainer", "eval", "src"] {
        let src = if krate == "src" {
            root.join("src")
        } else {
            root.join(krate).join("src")
        };
        let g = graph(&src);
        assert!(!g.is_empty(), "{krate} has modules");
        for (a, uses) in &g {
            for b in uses {
                if a < b && reaches(&g, b, a) {
                    circles.push(format!("{krate}: {a} <-> {b}"));
                }
            }
        }
    }
    assert!(circles.is_empty(), "file circles:\n{}", circles.join("\n"));
}

#[test]
fn the_checker_sees_a_circle() {
    let names: BTreeSet<String> = ["a", "b", "routes", "routes::x"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        resolve("a", "crate::b::Thing", &names).as_deref(),
        Some("b")
    );
    assert_eq!(
        resolve("routes::x", "super::super::a::f", &names).as_deref(),
        Some("a")
    );
    assert_eq!(
        paths_in("use crate::{a::X, b};"),
        vec!["crate::a::X", "crate::b"]
    );
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("a".into());
    assert!(reaches(&g, "b", "a"));
}
