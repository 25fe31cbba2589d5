//! Adapter directories on disk: what a crashed write leaves behind is cleaned up, and
//! nothing else is.

use claas_testutil::tempdir;

#[test]
fn stale_temp_dirs_of_crashed_writes_are_removed_and_nothing_else() {
    let root = tempdir("stale");
    std::fs::create_dir_all(root.join(".v3.00ff.tmp")).expect("crashed write");
    std::fs::write(root.join(".v3.00ff.tmp/adapter_model.safetensors"), b"half").expect("f");
    std::fs::create_dir_all(root.join("v2")).expect("a version");
    std::fs::write(root.join(".notes.tmp"), b"a file, not a write").expect("f");
    let n = claas_trainer::storage::remove_stale_temp_dirs(&root, std::time::Duration::ZERO)
        .expect("clean");
    assert_eq!(n, 1);
    assert!(!root.join(".v3.00ff.tmp").exists());
    assert!(root.join("v2").is_dir() && root.join(".notes.tmp").is_file());
    // A fresh write is not touched while it may still be running.
    std::fs::create_dir_all(root.join(".v4.0a0a.tmp")).expect("live write");
    let n =
        claas_trainer::storage::remove_stale_temp_dirs(&root, std::time::Duration::from_secs(600))
            .expect("clean");
    assert_eq!(n, 0);
}
