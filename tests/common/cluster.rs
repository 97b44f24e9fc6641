//! A real cluster on 127.0.0.1: an etcd process of the test's own (a free
//! port, a temporary data dir, stopped by PID), and `stampede-server`
//! processes joined through it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::{ClusterReply, NodeRole};

use super::process::{server_command, TempDir, ADMIN, CHECKOUT};

pub const REPLICATION: &str = "proc-replication";

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An etcd of the test's own.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    _dir: TempDir,
}

impl Etcd {
    /// Start etcd; fails the test, saying how to install it, when there is
    /// no `etcd` binary.
    pub fn start() -> Etcd {
        let dir = TempDir::new("etcd");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("127.0.0.1:{client}");
        let child = Command::new("etcd")
            .args(["--data-dir", &dir.0.join("data").display().to_string()])
            .args(["--listen-client-urls", &format!("http://{endpoint}")])
            .args(["--advertise-client-urls", &format!("http://{endpoint}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("etcd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run etcd ({e}): these tests need it on PATH. Install it with \
                     `apt-get update && apt-get install -y etcd-server` (bash .ci/run does)"
                )
            });
        let etcd = Etcd { child, endpoint, _dir: dir };
        let started = Instant::now();
        while std::net::TcpStream::connect(&etcd.endpoint).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "etcd did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node: its port and data dir survive restarts.
pub struct Node {
    pub id: String,
    pub addr: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
        }
    }

    /// Whether the process is still there (a node exits 75 to rejoin).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct TestCluster {
    pub etcd: Etcd,
    pub nodes: Vec<Node>,
    pub name: String,
    extra: Vec<String>,
    _dir: TempDir,
}

impl TestCluster {
    /// etcd and `n` nodes, each started (joined) in turn.
    pub fn start(n: usize, extra: &[&str]) -> TestCluster {
        let etcd = Etcd::start();
        let dir = TempDir::new("cluster");
        let nodes = (1..=n)
            .map(|i| Node {
                id: format!("n{i}"),
                addr: format!("127.0.0.1:{}", free_port()),
                dir: dir.0.join(format!("n{i}")),
                log: dir.0.join(format!("n{i}.log")),
                child: None,
            })
            .collect();
        let mut cluster = TestCluster {
            etcd,
            nodes,
            name: format!("t{}", std::process::id()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _dir: dir,
        };
        for i in 0..n {
            cluster.start_node(i);
        }
        cluster
    }

    /// Start (or restart) node `i`; returns once it serves (it has found
    /// its leader or become it).
    pub fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.kill();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let mut child = server_command(&node.addr, &node.dir)
            .args(["--etcd", &self.etcd.endpoint, "--cluster", &self.name, "--node-id", &node.id])
            .args(&self.extra)
            .env("STAMPEDE_ADMIN_TOKEN", ADMIN)
            .env("STAMPEDE_CHECKOUT_TOKEN", CHECKOUT)
            .env("STAMPEDE_REPLICATION_TOKEN", REPLICATION)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn stampede-server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        if !line.contains("listening on") {
            let said = std::fs::read_to_string(&node.log).unwrap_or_default();
            let tail: String =
                said.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            panic!("node {} did not start: {line:?}\n{tail}", node.id);
        }
        node.child = Some(child);
    }

    /// Every node's address, comma-separated (what clients are given).
    pub fn addrs(&self) -> String {
        self.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",")
    }

    /// CLUSTER on node `i` (`None` if it does not answer).
    pub async fn describe(&self, i: usize) -> Option<ClusterReply> {
        let mut config = ClientConfig::new(&self.nodes[i].addr, ADMIN);
        config.max_attempts = 1;
        config.connect_timeout = Duration::from_millis(500);
        config.request_timeout = Duration::from_secs(2);
        let client = Client::connect(config).await.ok()?;
        client.cluster().await.ok()
    }

    /// The index of the node that leads, waiting up to `timeout`.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        let started = Instant::now();
        loop {
            for i in 0..self.nodes.len() {
                if self.nodes[i].child.is_some() {
                    if let Some(reply) = self.describe(i).await {
                        if reply.role == NodeRole::Leader {
                            return i;
                        }
                    }
                }
            }
            assert!(started.elapsed() < timeout, "no leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Be the nodes' supervisor: restart a node that exited to rejoin
    /// (status 75), as systemd's `Restart=` would.
    pub fn supervise(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(status) = self.nodes[i].exited() {
                assert_eq!(
                    status.code(),
                    Some(stampede::limits::EXIT_REJOIN),
                    "node {} exited with {status}, not to rejoin:\n{}",
                    self.nodes[i].id,
                    self.log_tails(20)
                );
                eprintln!("supervisor: restarting {} (it exited to rejoin)", self.nodes[i].id);
                self.nodes[i].child = None;
                self.start_node(i);
            }
        }
    }

    /// Wait until the leader reports every other running node streaming
    /// and durable up to its own last record (restarting nodes that exit
    /// to rejoin meanwhile).
    pub async fn wait_caught_up(&mut self, timeout: Duration) {
        let started = Instant::now();
        loop {
            tokio::task::block_in_place(|| self.supervise());
            let leader = self.wait_leader(timeout).await;
            if let Some(reply) = self.describe(leader).await {
                let head = reply.nodes.first().map_or(0, |n| n.durable_lsn);
                let running: Vec<&String> = self
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(i, n)| *i != leader && n.child.is_some())
                    .map(|(_, n)| &n.id)
                    .collect();
                let caught_up = running
                    .iter()
                    .all(|id| reply.nodes.iter().any(|n| &&n.id == id && n.streaming && n.durable_lsn >= head));
                if caught_up {
                    return;
                }
            }
            if started.elapsed() >= timeout {
                let leader = self.wait_leader(timeout).await;
                panic!(
                    "standbys did not catch up within {timeout:?}; the leader says {:#?}\n{}",
                    self.describe(leader).await,
                    self.log_tails(15)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of every node's log, for a failure's message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let said = std::fs::read_to_string(&node.log).unwrap_or_default();
            let tail: Vec<&str> = said.lines().rev().take(lines).collect();
            out.push_str(&format!("--- {} ({})\n", node.id, node.addr));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// A client of every node (it follows the leader).
    pub async fn client(&self, token: &str) -> Client {
        let mut config = ClientConfig::new(self.addrs(), token);
        config.connections = 2;
        config.failover_timeout = Duration::from_secs(20);
        Client::connect(config).await.expect("connect to the cluster")
    }
}
