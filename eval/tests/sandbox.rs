//! The coding probe's sandbox against hostile answers. Each payload first escapes the
//! probe's limited builtins (through `_wrap_close.__init__.__globals__`, as a real escape
//! would), so what stops it is the bubblewrap sandbox alone. Tests skip, saying so, only
//! where `bwrap` is not installed (`scripts/test-sandbox.sh` installs it).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use claas_eval::sandbox::BWRAP_ENV;
use claas_eval::text::{check_fibonacci, CodeVerdict, Sandbox};

/// The escape every payload starts with: the real builtins, from the globals of `os`,
/// which a `_wrap_close` method carries.
const ESCAPE: &str = "g = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0].__init__.__globals__
real = g['__builtins__']
print = real['print']
OSError = real['OSError']
imp = real['__import__']
os = imp('os')
";

/// A secret of the eval's own environment, which no payload may see.
const SECRET: &str = "s3cret-4f1d";

/// Short, so a contained run still returns quickly.
const LIMITS: Sandbox = Sandbox {
    timeout: Duration::from_secs(2),
    memory_bytes: 256 << 20,
};

/// Past the timeout: the one-off sandbox probe and process start on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(5);

/// Whether these tests can run: a bwrap named in `CLAAS_EVAL_BWRAP` must work (no skip),
/// else `bwrap` must be on `PATH`.
fn bwrap_is_installed() -> bool {
    if std::env::var_os(BWRAP_ENV).is_some() {
        return true;
    }
    let found = Command::new("bwrap").arg("--version").output().is_ok();
    if !found {
        eprintln!("skipped: bwrap is not installed (scripts/test-sandbox.sh installs it)");
    }
    found
}

fn set_secret() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var("CLAAS_TEST_SECRET", SECRET));
}

/// Runs `payload` after [`ESCAPE`] through the probe; fails the test if it takes longer
/// than the timeout allows.
fn run_escaped(payload: &str) -> CodeVerdict {
    let started = Instant::now();
    let verdict = check_fibonacci("python3", &format!("{ESCAPE}{payload}"), LIMITS);
    let took = started.elapsed();
    assert!(
        took < LIMITS.timeout + SLACK,
        "took {took:?}, over the timeout"
    );
    verdict
}

/// What the run printed, whatever its verdict.
fn output(verdict: &CodeVerdict) -> &str {
    match verdict {
        CodeVerdict::Correct => "ok",
        CodeVerdict::Incorrect(out) | CodeVerdict::Unavailable(out) => out,
    }
}

/// A host directory (outside the sandbox, under the host's temporary directory) anyone may
/// write to, so only the sandbox keeps a payload out of it (not the drop to `nobody`);
/// removed on drop, also when the test panics.
struct HostDir(claas_testutil::TempDir);

impl HostDir {
    fn new(name: &str) -> HostDir {
        let dir = claas_testutil::tempdir(name);
        let open = std::os::unix::fs::PermissionsExt::from_mode(0o777);
        std::fs::set_permissions(&dir, open).expect("chmod host dir");
        HostDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

#[test]
fn introspection_escape_reaches_no_secret_and_no_host_file() {
    if !bwrap_is_installed() {
        return;
    }
    set_secret();
    let host = HostDir::new("escape");
    let marker = host.path("pwned");
    let payload = format!(
        "g['system']('echo pwned > /tmp/../../../tmp/x; echo pwned > {}; env')\n",
        marker.display()
    );
    let verdict = run_escaped(&payload);
    let out = output(&verdict);
    assert!(out.contains("PATH=/usr/bin"), "the escape ran `env`: {out}");
    assert!(!out.contains(SECRET), "the secret leaked: {out}");
    assert!(!marker.exists(), "the payload wrote {}", marker.display());
}

#[test]
fn fork_bomb_is_contained_within_the_timeout() {
    if !bwrap_is_installed() {
        return;
    }
    let verdict = run_escaped("while True:\n    os.fork()\n");
    assert!(matches!(verdict, CodeVerdict::Incorrect(_)), "{verdict:?}");
}

#[test]
fn persistent_fork_bomb_is_killed_at_the_timeout_with_all_its_processes() {
    if !bwrap_is_installed() {
        return;
    }
    let marker = format!("claas-sandbox-bomb-{}", std::process::id());
    let bomb =
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let payload =
        format!("os.execv('/usr/bin/python3', ['python3', '-c', {bomb:?}, '{marker}'])\n");
    let verdict = run_escaped(&payload);
    assert!(
        matches!(&verdict, CodeVerdict::Incorrect(m) if m.contains("did not finish")),
        "{verdict:?}"
    );
    assert_none_left(&marker);
}

/// Host processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(marker))
        .collect()
}

/// Fails unless every process marked `marker` is gone within a moment (the kernel reaps a
/// killed PID namespace asynchronously).
fn assert_none_left(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !processes_with(marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_with(marker), Vec::<String>::new());
}

#[test]
fn background_child_holding_stdout_neither_hangs_the_eval_nor_outlives_it() {
    if !bwrap_is_installed() {
        return;
    }
    let marker = format!("claas-sandbox-sleeper-{}", std::process::id());
    let payload = format!(
        "if os.fork() == 0:\n    os.execv('/usr/bin/python3', ['python3', '-c', 'import time; time.sleep(60)', '{marker}'])\nprint('x')\n"
    );
    let verdict = run_escaped(&payload);
    assert!(output(&verdict).lines().any(|l| l == "x"), "{verdict:?}");
    assert_none_left(&marker);
}

#[test]
fn writes_outside_the_sandbox_tmp_fail_and_reach_no_host_file() {
    if !bwrap_is_installed() {
        return;
    }
    let host = HostDir::new("writes");
    let unique = format!("claas-evil-{}", std::process::id());
    let targets = [
        Path::new("/usr").join(&unique),
        Path::new("/root").join(&unique),
        host.path("evil"),
    ];
    let mut payload = String::new();
    for t in &targets {
        payload += &format!(
            "try:\n    real['open']('{0}', 'w').write('x')\n    print('wrote {0}')\nexcept OSError as e:\n    print('refused', e)\n",
            t.display()
        );
    }
    let verdict = run_escaped(&payload);
    let out = output(&verdict);
    let appeared: Vec<&PathBuf> = targets.iter().filter(|t| t.exists()).collect();
    for t in &appeared {
        let _ = std::fs::remove_file(t);
    }
    assert!(appeared.is_empty(), "host files appeared: {appeared:?}");
    assert_eq!(out.matches("refused").count(), 3, "{out}");
}

#[test]
fn network_connect_to_a_host_listener_fails() {
    if !bwrap_is_installed() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let payload = format!(
        "try:\n    imp('socket').create_connection(('127.0.0.1', {port}), timeout=1)\n    print('connected')\nexcept OSError as e:\n    print('refused', e)\n"
    );
    let verdict = run_escaped(&payload);
    let out = output(&verdict);
    assert!(out.contains("refused"), "{out}");
    let accepted = listener.accept();
    assert!(
        accepted.is_err(),
        "the listener accepted {:?}",
        accepted.map(|(_, peer)| peer)
    );
}

#[test]
fn environment_shows_no_parent_secret() {
    if !bwrap_is_installed() {
        return;
    }
    set_secret();
    let verdict = run_escaped("print(os.environ)\n");
    let out = output(&verdict);
    assert!(out.contains("environ("), "{out}");
    assert!(!out.contains(SECRET), "the secret leaked: {out}");
    assert!(!out.contains("CLAAS_TEST_SECRET"), "{out}");
}

#[test]
fn correct_fibonacci_still_passes_in_the_sandbox() {
    if !bwrap_is_installed() {
        return;
    }
    let good = "def fibonacci(n):\n    \"\"\"The n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n";
    assert_eq!(
        check_fibonacci("python3", good, LIMITS),
        CodeVerdict::Correct
    );
    let wrong = "def fibonacci(n):\n    return n\n";
    assert!(matches!(
        check_fibonacci("python3", wrong, LIMITS),
        CodeVerdict::Incorrect(m) if m.contains("gave (0, 1, 10)")
    ));
}
