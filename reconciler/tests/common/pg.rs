//! A PostgreSQL server of the test's own (initdb in a temp dir, a free
//! loopback port), so a test can stop, crash and restart it without
//! touching the shared server other tests use.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::TempDir;

pub struct PrivatePostgres {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
}

/// The directory of PostgreSQL's server binaries (`initdb`, `pg_ctl`).
fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok()).map(|d| d.path().join("bin")).filter(|b| b.join("initdb").exists()).collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: install them (apt-get install postgresql)"
        )
    })
}

fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

impl PrivatePostgres {
    /// initdb and start; panics with the server's log if it cannot.
    pub fn start() -> PrivatePostgres {
        let dir = TempDir::new("pg");
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().unwrap().port()
        };
        let pg = PrivatePostgres { bin: bin_dir(), dir, port };
        if running_as_root() {
            // PostgreSQL refuses to run as root: the cluster belongs to `postgres`.
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&pg.dir.0).status().unwrap();
            assert!(status.success(), "chown the test cluster to postgres");
        }
        let data = pg.data();
        pg.run("initdb", &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync", "--no-instructions"]);
        pg.start_again();
        pg
    }

    fn data(&self) -> String {
        self.dir.0.join("data").display().to_string()
    }

    fn log(&self) -> PathBuf {
        self.dir.0.join("server.log")
    }

    /// Run one of PostgreSQL's tools, as `postgres` when we are root.
    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut cmd = if running_as_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&program);
            cmd
        } else {
            Command::new(&program)
        };
        let out = cmd.args(args).current_dir(&self.dir.0).output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    /// Start (again) and wait until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=40",
            self.port,
            self.dir.0.display()
        );
        let log = self.log().display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-o", &options, "-w", "-t", "60", "start"]);
    }

    /// Stop: `fast` (sessions get "terminating connection due to
    /// administrator command", as in a restart or switchover) or
    /// `immediate` (a crash: no shutdown checkpoint, recovery at start).
    pub fn stop(&self, mode: &str) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", mode, "-w", "-t", "60", "stop"]);
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn path(&self) -> &Path {
        &self.dir.0
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let program = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = if running_as_root() {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(program).args(args).output()
        } else {
            Command::new(program).args(args).output()
        };
    }
}
