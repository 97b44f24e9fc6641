//! Running the real binaries as child processes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const ADMIN: &str = "proc-admin";
pub const CHECKOUT: &str = "proc-checkout";

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "stampede-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `stampede-server` binary. Cargo names it to this crate's tests;
/// another workspace member's tests (the reconciler's, which share this
/// harness) find it next to their own binaries, where `cargo test
/// --workspace` builds it.
pub fn server_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_stampede-server") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> -> target/<profile>/stampede-server
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test binary lives in target/<profile>/deps")
        .join("stampede-server");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p stampede --bin stampede-server`, with --release for a \
         release test run); `cargo test --workspace` does",
        path.display()
    );
    path
}

/// `stampede-server` with no tokens in its environment.
pub fn server_command(listen: &str, data_dir: &Path) -> Command {
    server_command_wrapped(&[], listen, data_dir)
}

/// The same, run through `wrap` when it is not empty (a command that runs
/// the rest of its arguments, e.g. `ip netns exec NS`: it execs, so the
/// child's PID is the server's).
pub fn server_command_wrapped(wrap: &[String], listen: &str, data_dir: &Path) -> Command {
    let server = server_binary();
    let server = server.as_os_str();
    let mut cmd = match wrap.split_first() {
        None => Command::new(server),
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(server);
            cmd
        }
    };
    cmd.args(["--listen", listen, "--data-dir"]).arg(data_dir).args(["--no-pin"]);
    cmd.env_remove("STAMPEDE_ADMIN_TOKEN")
        .env_remove("STAMPEDE_CHECKOUT_TOKEN")
        .env_remove("STAMPEDE_REPLICATION_TOKEN")
        .env("RUST_LOG", "warn");
    cmd
}

/// A running server process; killed (SIGKILL) on drop.
pub struct ServerProcess {
    pub child: Child,
    pub addr: String,
}

impl ServerProcess {
    /// Start with the test tokens and `extra` flags; wait for "listening on".
    pub fn start(data_dir: &Path, extra: &[&str]) -> ServerProcess {
        Self::start_on("127.0.0.1:0", data_dir, extra)
    }

    /// Same, on a given listen address.
    pub fn start_on(listen: &str, data_dir: &Path, extra: &[&str]) -> ServerProcess {
        let mut child = server_command(listen, data_dir)
            .args(extra)
            .env("STAMPEDE_ADMIN_TOKEN", ADMIN)
            .env("STAMPEDE_CHECKOUT_TOKEN", CHECKOUT)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn stampede-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let Some(addr) = line.trim().strip_prefix("stampede-server listening on ") else {
            let status = child.wait().unwrap();
            panic!("server did not start ({status}); first stdout line {line:?}");
        };
        ServerProcess { addr: addr.to_string(), child }
    }

    /// Same, with the server's log (stderr, at `RUST_LOG=warn`) written to
    /// `log` (appended), for tests that check what it says.
    pub fn start_logged(data_dir: &Path, extra: &[&str], log: &Path) -> ServerProcess {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("server log file");
        let mut child = server_command("127.0.0.1:0", data_dir)
            .args(extra)
            .env("STAMPEDE_ADMIN_TOKEN", ADMIN)
            .env("STAMPEDE_CHECKOUT_TOKEN", CHECKOUT)
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("spawn stampede-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let Some(addr) = line.trim().strip_prefix("stampede-server listening on ") else {
            let status = child.wait().unwrap();
            let said = std::fs::read_to_string(log).unwrap_or_default();
            panic!("server did not start ({status}); it said:\n{said}");
        };
        ServerProcess { addr: addr.to_string(), child }
    }

    /// kill -9 and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        self.child.wait().expect("wait for server")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start a server that must refuse to start: its exit status and what it
/// wrote to stderr. Fails the test if it starts serving instead, or has not
/// exited within 30 s.
pub fn start_expecting_refusal(data_dir: &Path, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = server_command("127.0.0.1:0", data_dir)
        .args(extra)
        .env("STAMPEDE_ADMIN_TOKEN", ADMIN)
        .env("STAMPEDE_CHECKOUT_TOKEN", CHECKOUT)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stampede-server");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the server") {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the server neither refused nor exited within 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!stdout.contains("listening on"), "the server started serving: {stdout}\n{stderr}");
    (status, stderr)
}

/// Copy a data dir (its regular files) to a new temporary dir.
pub fn copy_dir(from: &Path, tag: &str) -> TempDir {
    let to = TempDir::new(tag);
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() && entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), to.0.join(entry.file_name())).unwrap();
        }
    }
    to
}
