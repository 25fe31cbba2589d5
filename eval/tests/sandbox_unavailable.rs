//! Without a sandbox the coding probe runs nothing. Its own test binary: the bwrap path is
//! read once per process, and here it must be missing from the start.

use claas_eval::sandbox::BWRAP_ENV;
use claas_eval::text::{check_fibonacci, CodeVerdict, Sandbox};

#[test]
fn without_bwrap_the_probe_is_unavailable_and_runs_nothing() {
    std::env::set_var(BWRAP_ENV, "/nonexistent/bwrap");
    // On the host, writable by anyone (so a drop to `nobody` alone would not stop it).
    let host = claas_testutil::tempdir("unsandboxed");
    let open = std::os::unix::fs::PermissionsExt::from_mode(0o777);
    std::fs::set_permissions(&host, open).expect("chmod host dir");
    let marker = host.join("pwned");
    let payload = format!(
        "g = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0].__init__.__globals__\n\
         g['system']('touch {}')\n\
         def fibonacci(n):\n    return 0\n",
        marker.display()
    );
    let verdict = check_fibonacci("python3", &payload, Sandbox::default());
    let ran = marker.exists();
    assert!(
        matches!(&verdict, CodeVerdict::Unavailable(why) if why.contains("/nonexistent/bwrap")),
        "{verdict:?}"
    );
    assert!(!ran, "the code ran outside a sandbox");
}
