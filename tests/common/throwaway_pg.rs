//! A Postgres cluster of its own for a test that must control the server's settings
//! (`max_connections`), started with the local installation's `initdb` and `pg_ctl` as the
//! `postgres` user, and stopped on drop (then its directory is removed).

use std::path::PathBuf;
use std::process::Command;

use claas_testutil::TempDir;

pub struct ThrowawayPg {
    bin: PathBuf,
    dir: TempDir,
    pub url: String,
}

/// The newest installed server's binaries (Debian's `/usr/lib/postgresql/<major>/bin`).
fn server_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

/// Runs a server binary as `postgres` when we are root (initdb refuses root).
fn as_postgres(bin: &std::path::Path, args: &[&str]) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

impl ThrowawayPg {
    /// A fresh cluster on a free port with `settings` (`-c name=value` each); `None` when
    /// no server installation is found.
    pub fn start(settings: &[&str]) -> Option<ThrowawayPg> {
        let bin = server_bin()?;
        let dir = claas_testutil::tempdir("pg");
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&*dir)
            .status();
        let data = dir.join("data");
        let data_s = data.display().to_string();
        let ok = as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        )
        .output()
        .expect("initdb");
        assert!(
            ok.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let port = super::free_port().to_string();
        let mut opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            dir.display()
        );
        for s in settings {
            opts.push_str(&format!(" -c {s}"));
        }
        let log = dir.join("server.log").display().to_string();
        let ok = as_postgres(
            &bin.join("pg_ctl"),
            &["-D", &data_s, "-l", &log, "-o", &opts, "-w", "start"],
        )
        .output()
        .expect("pg_ctl start");
        assert!(
            ok.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&ok.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Some(ThrowawayPg {
            bin,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
        })
    }
}

impl Drop for ThrowawayPg {
    fn drop(&mut self) {
        let data = self.dir.join("data").display().to_string();
        let _ = as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", &data, "-m", "immediate", "stop"],
        )
        .output();
        // `dir` (the cluster's files) goes when the fields drop, after the server stopped.
    }
}
