//! A real cluster on 127.0.0.1: an etcd process of the test's own (a free
//! port, a temporary data dir, stopped by PID), and `stampede-server`
//! processes joined through it. Processes may also run through a command
//! prefix on given addresses (`Etcd::start_wrapped`,
//! `TestCluster::start_placed`): the partition tests put each in a network
//! namespace of its own (`ip netns exec NS ...`, see `netns.rs`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::{ClusterReply, DumpEntry, NodeRole, ReservationEntry, SaleEntry};

use super::process::{server_command_wrapped, TempDir, ADMIN, CHECKOUT};

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
        Etcd::spawn(&[], "127.0.0.1", free_port(), free_port())
    }

    /// etcd on `host` (client port 2379, peer port 2380: the host is the
    /// test's alone, e.g. a network namespace's address), run through
    /// `wrap` (e.g. `ip netns exec NS`).
    pub fn start_wrapped(wrap: &[String], host: &str) -> Etcd {
        Etcd::spawn(wrap, host, 2379, 2380)
    }

    fn spawn(wrap: &[String], host: &str, client: u16, peer: u16) -> Etcd {
        let dir = TempDir::new("etcd");
        let endpoint = format!("{host}:{client}");
        let mut command = match wrap.split_first() {
            None => Command::new("etcd"),
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg("etcd");
                command
            }
        };
        let log = dir.0.join("etcd.log");
        let child = command
            .args(["--data-dir", &dir.0.join("data").display().to_string()])
            .args(["--listen-client-urls", &format!("http://{endpoint}")])
            .args(["--advertise-client-urls", &format!("http://{endpoint}")])
            .args(["--listen-peer-urls", &format!("http://{host}:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{host}:{peer}")])
            .args(["--initial-cluster", &format!("default=http://{host}:{peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run etcd ({e}): these tests need it on PATH. Install it with \
                     `apt-get update && apt-get install -y etcd-server` (bash .ci/run does)"
                )
            });
        let mut etcd = Etcd { child, endpoint, _dir: dir };
        let started = Instant::now();
        while std::net::TcpStream::connect_timeout(&etcd.endpoint.parse().unwrap(), Duration::from_secs(1)).is_err() {
            // Dead already (a wrapper that could not run it, a port in
            // use): say so now, with what it said, not after the timeout.
            if let Ok(Some(status)) = etcd.child.try_wait() {
                panic!("etcd exited ({status}) before listening on {}:\n{}", etcd.endpoint, tail(&log, 20));
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "etcd did not start listening on {}:\n{}",
                etcd.endpoint,
                tail(&log, 20)
            );
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

/// The last `lines` lines of a log file.
fn tail(path: &std::path::Path, lines: usize) -> String {
    let said = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = said.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// One node: its port and data dir survive restarts.
pub struct Node {
    pub id: String,
    pub addr: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// Command prefix the server runs through (empty: none).
    pub wrap: Vec<String>,
    /// The first stdout line of a process spawned but not yet seen serving.
    starting: Option<std::sync::mpsc::Receiver<String>>,
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
        let placement = (0..n).map(|_| (format!("127.0.0.1:{}", free_port()), Vec::new())).collect();
        TestCluster::start_placed(etcd, placement, extra)
    }

    /// Nodes joined through `etcd`, one per `(address, command prefix)`:
    /// node `i` listens on (and advertises) its address, run through its
    /// prefix. Each is started (joined) in turn.
    pub fn start_placed(etcd: Etcd, placement: Vec<(String, Vec<String>)>, extra: &[&str]) -> TestCluster {
        let dir = TempDir::new("cluster");
        let nodes: Vec<Node> = placement
            .into_iter()
            .enumerate()
            .map(|(i, (addr, wrap))| Node {
                id: format!("n{}", i + 1),
                addr,
                dir: dir.0.join(format!("n{}", i + 1)),
                log: dir.0.join(format!("n{}.log", i + 1)),
                child: None,
                wrap,
                starting: None,
            })
            .collect();
        let n = nodes.len();
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
        self.spawn_node(i);
        self.wait_started(i, Duration::from_secs(60));
    }

    /// Start (or restart) node `i` without waiting for it to serve: a node
    /// that cannot reach etcd or its leader waits in its join, before it
    /// listens ([`TestCluster::wait_started`] waits for it).
    pub fn spawn_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.kill();
        node.starting = None;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let mut child = server_command_wrapped(&node.wrap, &node.addr, &node.dir)
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
        node.child = Some(child);
        node.starting = Some(rx);
    }

    /// Wait up to `timeout` for node `i`, spawned by
    /// [`TestCluster::spawn_node`], to serve (at once if it was seen
    /// serving already).
    pub fn wait_started(&mut self, i: usize, timeout: Duration) {
        let node = &mut self.nodes[i];
        let Some(rx) = node.starting.take() else { return };
        let line = rx.recv_timeout(timeout).unwrap_or_default();
        if !line.contains("listening on") {
            // Its stdout closed: it is exiting (give the exit a moment to land).
            let mut status = node.exited();
            for _ in 0..20 {
                if status.is_some() || !line.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
                status = node.exited();
            }
            let how = match status {
                Some(status) => format!("exited ({status})"),
                None => format!("was not serving within {timeout:?}"),
            };
            panic!("node {} did not start: it {how}; stdout {line:?}\n{}", node.id, tail(&node.log, 30));
        }
    }

    /// Whether node `i` was spawned and has not been seen serving yet.
    pub fn is_starting(&self, i: usize) -> bool {
        self.nodes[i].starting.is_some()
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
        for i in self.supervise_nowait() {
            self.wait_started(i, Duration::from_secs(60));
        }
    }

    /// The same, without waiting for the restarted nodes to serve (a node
    /// cut off from etcd waits in its join): the nodes restarted.
    pub fn supervise_nowait(&mut self) -> Vec<usize> {
        let mut restarted = Vec::new();
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
                self.spawn_node(i);
                restarted.push(i);
            }
        }
        restarted
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

/// A STATE_DUMP's entries by key: sales by SKU, reservations by id.
pub fn split_dump(
    entries: Vec<DumpEntry>,
) -> (std::collections::HashMap<u64, SaleEntry>, std::collections::HashMap<u128, ReservationEntry>) {
    let mut sales = std::collections::HashMap::new();
    let mut reservations = std::collections::HashMap::new();
    for entry in entries {
        match entry {
            DumpEntry::Sale(s) => {
                sales.insert(s.sku, s);
            }
            DumpEntry::Reservation(r) => {
                reservations.insert(r.reservation_id, r);
            }
            // (These tests' sales have one location.)
            DumpEntry::Location(_) => {}
        }
    }
    (sales, reservations)
}
