//! The boundary around model-written code. Every run goes through Debian's bubblewrap
//! (`bwrap`): all namespaces unshared (no network; new PID, user, IPC and UTS namespaces; no
//! nested user namespaces), `/usr` read-only as the only host directory (with the merged-usr
//! links `/bin`, `/lib`, `/lib64`), a private 16 MiB tmpfs at `/tmp` as working directory, a
//! fresh `/proc` and minimal `/dev`, an empty environment but `PATH=/usr/bin`, and `prlimit`
//! capping processes, file size, open files, CPU time and address space. When the eval runs
//! as root, `setpriv` first drops to `nobody`: the kernel does not apply `RLIMIT_NPROC` to
//! root, so a fork bomb would otherwise be bounded only by the machine.
//!
//! The launcher leads its own process group. On timeout that group is killed, and the
//! sandbox goes with it (`--die-with-parent`, and the kernel ends a PID namespace with its
//! first process). Output is read on its own thread for at most the timeout, so a grandchild
//! that keeps stdout open cannot hang the caller.
//!
//! Without a working sandbox nothing runs: a trivial run (`true` under the same command
//! line) probes it once per process, and if that fails every run is [`Outcome::Unavailable`].
//! `CLAAS_EVAL_BWRAP` names the bwrap binary (default: `bwrap` on `PATH`); pointing it at a
//! missing path is how tests simulate a machine without one.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

/// The environment variable naming the bwrap binary (default `bwrap`, found on `PATH`).
pub const BWRAP_ENV: &str = "CLAAS_EVAL_BWRAP";

/// Tasks one run may hold: bwrap's init and the interpreter are two, the rest is headroom;
/// past it `fork` fails, which is what contains a fork bomb.
const MAX_PROCESSES: u64 = 16;
/// Bytes one file may grow to: the probes write no files.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Open descriptors: the interpreter needs a handful.
const MAX_OPEN_FILES: u64 = 64;
/// Size of the private `/tmp`: a tmpfs lives in memory, which `RLIMIT_AS` does not count.
const TMP_BYTES: u64 = 16 << 20;
/// Output kept from one run: a verdict is a line; the cap keeps a printing loop from
/// filling the eval's memory (the writer then gets a broken pipe).
const MAX_OUTPUT_BYTES: u64 = 64 << 10;
/// The uid and gid of `nobody`, which a root eval runs code as.
const NOBODY: &str = "65534";
/// How long the one probe may take to set up a sandbox and run `true` in it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The sandbox's filesystem, namespaces and environment (see the module doc).
const BWRAP_ARGS: &[&str] = &[
    "--unshare-all",
    "--unshare-user",
    "--disable-userns",
    "--die-with-parent",
    "--new-session",
    "--clearenv",
    "--setenv",
    "PATH",
    "/usr/bin",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/bin",
    "/bin",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
];

/// Limits of one run of model-written code.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock time for the whole run; CPU time is capped at the same whole seconds.
    pub timeout: Duration,
    /// The address space (`RLIMIT_AS`) of each process in the sandbox.
    pub memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(5),
            memory_bytes: 256 << 20,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The program ended within the timeout; its stdout (at most 64 KiB).
    Finished(String),
    /// The timeout passed; everything the run started has been killed.
    TimedOut,
    /// No sandbox here, or the program is not inside it: nothing was run.
    Unavailable(String),
}

/// Runs `program args` in the sandbox with `stdin` as its input. `program` is looked up
/// inside the sandbox, where `PATH` is `/usr/bin`: a bare name or a path under `/usr`.
pub fn run(program: &str, args: &[&str], stdin: &[u8], limits: Limits) -> Outcome {
    let launcher = match launcher() {
        Ok(l) => l,
        Err(why) => return Outcome::Unavailable(why.clone()),
    };
    if let Err(why) = visible_inside(program) {
        return Outcome::Unavailable(why);
    }
    let mut cmd = launcher.command(program, args, limits);
    cmd.stderr(Stdio::null());
    match execute(cmd, stdin, limits.timeout) {
        Ok(Ran::Exited { stdout, .. }) => Outcome::Finished(stdout),
        Ok(Ran::TimedOut) => Outcome::TimedOut,
        Err(e) => Outcome::Unavailable(format!("starting {}: {e}", launcher.bwrap.display())),
    }
}

/// How the sandbox is started on this machine.
struct Launcher {
    bwrap: PathBuf,
    /// Running as root: drop to `nobody` before bwrap, so `RLIMIT_NPROC` applies.
    as_nobody: bool,
}

/// The launcher, found and probed once per process.
fn launcher() -> &'static Result<Launcher, String> {
    static CACHED: OnceLock<Result<Launcher, String>> = OnceLock::new();
    CACHED.get_or_init(|| {
        let bwrap = std::env::var_os(BWRAP_ENV).map_or_else(|| "bwrap".into(), PathBuf::from);
        // When the uid cannot be read, assume root: dropping privileges is the safe side.
        let as_nobody = std::fs::metadata("/proc/self").map_or(true, |m| m.uid() == 0);
        let launcher = Launcher { bwrap, as_nobody };
        launcher.probe().map(|()| launcher)
    })
}

impl Launcher {
    /// The full command line: [`setpriv` to nobody,] bwrap, prlimit, then the program.
    fn command(&self, program: &str, args: &[&str], limits: Limits) -> Command {
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"]);
            c.arg(&self.bwrap);
            c
        } else {
            Command::new(&self.bwrap)
        };
        let cpu_s = limits.timeout.as_secs().max(1);
        cmd.args(BWRAP_ARGS)
            .args(["--size", &TMP_BYTES.to_string(), "--tmpfs", "/tmp"])
            .args(["--chdir", "/tmp", "--", "/usr/bin/prlimit"])
            .arg(format!("--nproc={MAX_PROCESSES}"))
            .arg(format!("--fsize={MAX_FILE_BYTES}"))
            .arg(format!("--nofile={MAX_OPEN_FILES}"))
            .arg(format!("--cpu={cpu_s}"))
            .arg(format!("--as={}", limits.memory_bytes))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0);
        cmd
    }

    /// Runs `true` in a sandbox built exactly as real runs are; `Err` carries bwrap's reason.
    fn probe(&self) -> Result<(), String> {
        let limits = Limits {
            timeout: PROBE_TIMEOUT,
            ..Limits::default()
        };
        let mut cmd = self.command("true", &[], limits);
        cmd.stderr(Stdio::piped());
        let bwrap = self.bwrap.display();
        match execute(cmd, b"", PROBE_TIMEOUT) {
            Ok(Ran::Exited { status, .. }) if status.success() => Ok(()),
            Ok(Ran::Exited { status, stderr, .. }) => Err(format!(
                "{bwrap} could not set up a sandbox ({status}): {}",
                stderr.trim()
            )),
            Ok(Ran::TimedOut) => Err(format!("{bwrap} did not start a sandbox in time")),
            Err(e) => {
                let first = if self.as_nobody { "setpriv" } else { "bwrap" };
                Err(format!(
                    "no sandbox: {first} could not start ({e}); bwrap is {bwrap}"
                ))
            }
        }
    }
}

/// Checks from outside that `program` exists inside: only `/usr` is there, and a bare name
/// is found in `/usr/bin`.
fn visible_inside(program: &str) -> Result<(), String> {
    let host = if program.contains('/') {
        PathBuf::from(program)
    } else {
        Path::new("/usr/bin").join(program)
    };
    if !host.is_absolute() {
        return Err(format!(
            "{program}: name a program by a bare name or an absolute path"
        ));
    }
    match host.canonicalize() {
        Ok(real) if real.starts_with("/usr") => Ok(()),
        Ok(real) => Err(format!(
            "{program} is {}, outside the sandbox's /usr",
            real.display()
        )),
        Err(e) => Err(format!("{program} is not in the sandbox: {e}")),
    }
}

/// What [`execute`] saw.
enum Ran {
    Exited {
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
    TimedOut,
}

/// Spawns `cmd`, feeds it `stdin` and collects its piped output, all within `timeout`;
/// past it, kills the run's process group.
fn execute(mut cmd: Command, stdin: &[u8], timeout: Duration) -> std::io::Result<Ran> {
    let deadline = Instant::now() + timeout;
    let mut child = cmd.spawn()?;
    if let Some(mut pipe) = child.stdin.take() {
        let input = stdin.to_vec();
        // A program that exits before reading its input is judged by its output.
        std::thread::spawn(move || pipe.write_all(&input));
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let output = (recv_by(&stdout, deadline), recv_by(&stderr, deadline));
    let (Some(stdout), Some(stderr)) = output else {
        kill_group(&mut child);
        return Ok(Ran::TimedOut);
    };
    loop {
        // `try_wait` reaps only an exited child, so the group id is still ours to kill.
        if let Some(status) = child.try_wait()? {
            return Ok(Ran::Exited {
                status,
                stdout,
                stderr,
            });
        }
        if Instant::now() >= deadline {
            kill_group(&mut child);
            return Ok(Ran::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads a pipe to its end (or [`MAX_OUTPUT_BYTES`]) on its own thread; an absent pipe
/// reads as empty.
fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    match pipe {
        None => {
            let _ = tx.send(String::new());
        }
        Some(pipe) => {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                // A read error ends the output; what came before it is still judged.
                let _ = pipe.take(MAX_OUTPUT_BYTES).read_to_end(&mut bytes);
                let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
            });
        }
    }
    rx
}

/// What a [`drain`] read, if it finished by `deadline`.
fn recv_by(rx: &mpsc::Receiver<String>, deadline: Instant) -> Option<String> {
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .ok()
}

/// Kills the run's process group (the launcher, bwrap), whose end takes the sandbox with
/// it, then reaps the child. Called only before the child is reaped, so the group id
/// cannot yet belong to anyone else.
fn kill_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill")
        .args(["-KILL", "--", &group])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // Without a `kill` binary, killing bwrap alone still ends the sandbox.
    let _ = child.kill();
    let _ = child.wait();
}
