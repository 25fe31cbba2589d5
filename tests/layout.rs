//! The README's layout table names every crate of the workspace, and ARCHITECTURE.md's
//! crate table does too: a crate added without saying what it owns fails here.

mod sources;

fn workspace_members() -> Vec<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let cargo = std::fs::read_to_string(format!("{root}/Cargo.toml")).expect("Cargo.toml");
    let line = cargo
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("a members line");
    let list = line.split_once('[').and_then(|(_, r)| r.split_once(']'));
    let (list, _) = list.expect("members = [...] on one line");
    list.split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn the_readme_and_architecture_name_every_crate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let members = workspace_members();
    assert!(members.len() >= 6, "{members:?}");
    for doc in ["README.md", "ARCHITECTURE.md"] {
        let text = std::fs::read_to_string(format!("{root}/{doc}")).expect("doc");
        for m in &members {
            let top = m.split('/').next().unwrap_or(m);
            let named =
                text.contains(&format!("| `{m}/`")) || text.contains(&format!("| `{top}/`"));
            assert!(named, "{doc} has no table row for the crate {m}");
        }
    }
}

/// Tests run on many threads of one process; clearing the environment there while another
/// thread reads it through libc (a DNS lookup, SQLite, a child's spawn) is undefined
/// behaviour, and once crashed the config tests' binary with SIGSEGV. Configuration tests
/// pass a fixed environment (`config::Environment::Fixed`) instead.
#[test]
fn no_test_clears_the_process_environment() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources::rust_files(root, &mut files);
    assert!(files.len() > 50, "found only {} sources", files.len());
    let needles = [concat!("Jail", "::"), concat!("clear", "_env(")];
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for needle in needles {
            assert!(
                !text.contains(needle),
                "{} uses {needle}: give the code a fixed environment instead",
                file.display()
            );
        }
    }
}
