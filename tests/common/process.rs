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

/// `stampede-server` with no tokens in its environment.
pub fn server_command(listen: &str, data_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stampede-server"));
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
